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
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::tls::{self, Authorizer, TlsError};
use writ_sdk::workload::X509Source;

use crate::audit::{AuditLog, AuditRecord};
use crate::exchange::{CallerId, ExchangeService, router};

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; beyond it new connections wait to be accepted.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Why the listener could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The socket failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The SPIFFE ID of the client's verified X509-SVID, if it presented one.
    pub id: Option<SpiffeId>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// A TCP listener that completes TLS handshakes concurrently and yields the
/// established connections with their [`Peer`].
pub struct TlsListener {
    established: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
    local: SocketAddr,
    _accept: AbortOnDrop,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    /// Accepts on `tcp` with the TLS of `source`; failed client certificates are written
    /// to `audit`.
    ///
    /// # Errors
    /// [`ServeError`] if the TLS configuration cannot be built or the socket has no
    /// local address.
    pub fn new(tcp: TcpListener, source: &X509Source, audit: AuditLog) -> Result<Self, ServeError> {
        // Every caller whose X509-SVID verifies against a trusted bundle gets through the
        // handshake; the policy decides what it may do.
        let config = tls::server_config_client_optional(source, Authorizer::custom(|_| true))?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = tcp.local_addr()?;
        let (tx, established) = mpsc::channel(MAX_PENDING_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (stream, addr) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let audit = audit.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let id = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(writ_identity::tls::peer_id);
                            let _ = tx.send((tls, Peer { addr, id })).await;
                        }
                        Ok(Err(e)) => handshake_failed(&audit, addr, &e),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            established,
            local,
            _accept: AbortOnDrop(task),
        })
    }
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
                rustls::Error::General(_)
                    | rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
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

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.established.recv().await {
            Some(conn) => conn,
            // The accept task only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer {
            addr: self.local,
            id: None,
        })
    }
}

/// Serves `service` on `tcp` with the TLS of `source` until `shutdown` completes.
///
/// # Errors
/// [`ServeError`] if the TLS configuration cannot be built or the socket fails.
pub async fn serve(
    service: Arc<ExchangeService>,
    source: &X509Source,
    tcp: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = TlsListener::new(tcp, source, service.audit().clone())?;
    let app = router(service).layer(axum::middleware::from_fn(peer_extensions));
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
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
