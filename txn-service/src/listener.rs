//! The transaction token service's HTTPS listener.
//!
//! TLS comes from the service's own [`X509Source`]: it presents its current X509-SVID and
//! verifies a client's X509-SVID against the bundle of the client's trust domain (own or
//! federated) at every handshake, so a rotation needs no restart. A client certificate
//! that does not verify fails the handshake (and is audited as refused); a client
//! without a certificate may connect, and `POST /token` then refuses it with
//! `invalid_client` unless its body carries a client assertion its policy accepts.
//! Which verified callers may exchange is the policy's decision, not the listener's.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use tokio::net::TcpListener;
use writ_sdk::listener::TlsListener;
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::workload::X509Source;

pub use writ_sdk::listener::{ConnectionLimits, Peer, ServeError};

use crate::audit::{AuditLog, AuditRecord};
use crate::exchange::{CallerId, ExchangeService, router};
use crate::shed::{OverloadLimits, Shedder};

/// Builds the service's listener: every caller whose X509-SVID verifies against a
/// trusted bundle gets through the handshake (the policy decides what it may do), and a
/// refused client certificate is written to `audit`.
///
/// # Errors
/// [`ServeError`] if the TLS configuration cannot be built or the socket has no local
/// address.
pub fn tls_listener(
    tcp: TcpListener,
    source: &X509Source,
    audit: AuditLog,
    limits: ConnectionLimits,
) -> Result<TlsListener, ServeError> {
    let config = tls::server_config_client_optional(source, Authorizer::custom(|_| true))?;
    TlsListener::with_limits(
        tcp,
        config,
        Arc::new(move |addr, e| handshake_failed(&audit, addr, e)),
        limits,
    )
}

/// A refused client certificate is an access decision: audit it. Other handshake
/// failures (scanners, plain HTTP) only reach the debug log.
fn handshake_failed(audit: &AuditLog, addr: SocketAddr, e: &std::io::Error) {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|r| {
            matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if certificate {
        let mut record = AuditRecord::new(std::time::SystemTime::now());
        record.caller_ip = Some(addr.ip().to_string());
        record.client_auth = Some("mtls");
        audit.refused(record, "invalid_client", &format!("TLS handshake: {e}"));
    } else {
        tracing::debug!(%addr, error = %e, "TLS handshake failed");
    }
}

/// Serves `service` on `tcp` with the TLS of `source`, each connection held to
/// `limits` (handshake, header, body and idle timeouts, per-address and per-listener
/// caps), until `shutdown` completes.
///
/// # Errors
/// [`ServeError`] if the TLS configuration cannot be built or the socket fails.
pub async fn serve(
    service: Arc<ExchangeService>,
    source: &X509Source,
    tcp: TcpListener,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_overload(
        service,
        source,
        tcp,
        limits,
        OverloadLimits::default(),
        shutdown,
    )
    .await
}

/// As [`serve`], with `POST /token` held to `overload` (see [`crate::shed`]): beyond it
/// exchanges are shed with 503 before their body is read.
///
/// # Errors
/// [`ServeError`] if the TLS configuration cannot be built or the socket fails.
pub async fn serve_with_overload(
    service: Arc<ExchangeService>,
    source: &X509Source,
    tcp: TcpListener,
    limits: ConnectionLimits,
    overload: OverloadLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let shed = Shedder::for_service(overload, &service);
    let _summaries = shed.spawn_summaries();
    let listener = tls_listener(tcp, source, service.audit().clone(), limits)?;
    let ingest = crate::audit::ingest::IngestState::new(
        service.durable_audit().cloned(),
        crate::audit::ingest::DEFAULT_INGEST_RATE,
        service.clock().clone(),
    );
    let feed = service
        .revocations()
        .map(|r| crate::revocation::router(r.clone(), source.svid().spiffe_id.trust_domain()));
    let app = router(service)
        .merge(crate::audit::ingest::router(ingest))
        .merge(feed.unwrap_or_default())
        .layer(axum::middleware::from_fn(peer_extensions));
    let app = shed.apply(app);
    let served = writ_sdk::listener::serve_tls(listener, app, shutdown).await;
    shed.flush();
    served
}

/// Hands the connection's peer to the handlers as [`CallerId`] and
/// `ConnectInfo<SocketAddr>`.
async fn peer_extensions(
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(id) = peer.id {
        request.extensions_mut().insert(CallerId(id));
    }
    request.extensions_mut().insert(ConnectInfo(peer.addr));
    next.run(request).await
}
