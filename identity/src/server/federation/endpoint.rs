//! The SPIFFE bundle endpoint: `GET /` over HTTPS answers this trust domain's bundle as
//! SPIFFE bundle JSON (with `spiffe_sequence` and `spiffe_refresh_hint`).
//!
//! Bounded as any listener facing other organisations: a request head of at most
//! [`MAX_REQUEST_HEAD`] bytes read within [`HEADER_TIMEOUT`], one request per connection,
//! every connection cut after [`CONNECTION_TIMEOUT`], at most [`MAX_CONNECTIONS`] at
//! once; any method but `GET` (and `HEAD`) gets 405, any other path 404.
//!
//! ```no_run
//! # async fn demo(state: std::sync::Arc<writ_identity::server::ServerState>) -> Result<(), Box<dyn std::error::Error>> {
//! use writ_identity::server::federation::endpoint::{self, EndpointProfile};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let url = format!("https://{}/", listener.local_addr()?);
//! tokio::spawn(endpoint::serve_for(state, listener, EndpointProfile::HttpsSpiffe, std::future::pending()));
//! println!("bundle endpoint at {url}");
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::AbortOnDropHandle;

use crate::server::ServerState;
use crate::server::node_service::SERVER_PATH;
use crate::spiffe_id::SpiffeId;
use crate::tls::SvidResolver;

/// Longest request head read (the smallest buffer hyper allows).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Default port of the bundle endpoint (SPIRE's).
pub const DEFAULT_PORT: u16 = 8443;

/// What the bundle endpoint presents.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndpointProfile {
    /// The server's own X509-SVID (`spiffe://<td>/writ/server`), minted from its CA and
    /// renewed at half-life.
    HttpsSpiffe,
    /// A Web PKI certificate chain and key from PEM files (read at start).
    HttpsWeb {
        /// The certificate chain, leaf first.
        cert_file: PathBuf,
        /// The private key (PKCS#8, SEC1 or PKCS#1).
        key_file: PathBuf,
    },
}

/// The bundle endpoint's configuration (`[federation.bundle_endpoint]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// Where it listens.
    pub address: SocketAddr,
    /// What it presents.
    pub profile: EndpointProfile,
}

/// What the endpoint serves: the current bundle document.
pub type DocumentSource = Arc<dyn Fn() -> String + Send + Sync>;

/// The SPIFFE ID the `https_spiffe` endpoint of trust domain `td` presents (the one a
/// relationship's `--endpoint-spiffe-id` names).
///
/// # Errors
/// Never for a valid trust domain.
pub fn endpoint_spiffe_id(
    td: &crate::spiffe_id::TrustDomain,
) -> Result<SpiffeId, crate::spiffe_id::SpiffeIdError> {
    td.spiffe_id(SERVER_PATH)
}

/// The certificates of a PEM text (at least one).
///
/// # Errors
/// A message if the text holds none or one is malformed.
pub fn pem_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("the PEM text holds no CERTIFICATE".into());
    }
    Ok(certs)
}

fn io_err(what: &Path, e: impl std::fmt::Display) -> super::super::ServerError {
    super::super::ServerError::Socket {
        path: what.display().to_string(),
        source: std::io::Error::other(format!("bundle endpoint: {e}")),
    }
}

/// A TLS server configuration presenting the `https_web` certificate and key files.
///
/// # Errors
/// [`super::super::ServerError::Socket`] naming the file that cannot be used.
pub fn web_tls(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, super::super::ServerError> {
    let cert_pem = std::fs::read_to_string(cert_file).map_err(|e| io_err(cert_file, e))?;
    let certs = pem_certificates(&cert_pem).map_err(|e| io_err(cert_file, e))?;
    let key_pem = std::fs::read(key_file).map_err(|e| io_err(key_file, e))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| io_err(key_file, e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| io_err(cert_file, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps the server's own SVID in `resolver`, renewed at half-life.
async fn keep_svid(state: Arc<ServerState>, resolver: Arc<SvidResolver>) {
    loop {
        let minted = endpoint_spiffe_id(&state.config.trust_domain)
            .map_err(|e| e.to_string())
            .and_then(|id| {
                state
                    .ca
                    .mint_server_svid(&id, Some(state.config.ca.default_x509_svid_ttl))
                    .map_err(|e| e.to_string())
            });
        let next = match minted {
            Ok(svid) => {
                if let Err(e) = resolver.set(&svid) {
                    tracing::error!(error = %e, "bundle endpoint: cannot use the server SVID");
                }
                let life = svid
                    .expires_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                (life / 2).max(Duration::from_secs(1))
            }
            Err(e) => {
                tracing::error!(error = %e, "bundle endpoint: cannot mint the server SVID; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// Serves the trust domain's bundle on `listener` with `profile` until `shutdown`
/// completes.
///
/// # Errors
/// [`super::super::ServerError`] if the `https_web` files cannot be used.
pub async fn serve_for(
    state: Arc<ServerState>,
    listener: TcpListener,
    profile: EndpointProfile,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), super::super::ServerError> {
    let mut _svid_task = None;
    let tls = match &profile {
        EndpointProfile::HttpsSpiffe => {
            let resolver = SvidResolver::new();
            _svid_task = Some(AbortOnDropHandle::new(tokio::spawn(keep_svid(
                state.clone(),
                resolver.clone(),
            ))));
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(resolver);
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        }
        EndpointProfile::HttpsWeb {
            cert_file,
            key_file,
        } => web_tls(cert_file, key_file)?,
    };
    let ca = state.ca.clone();
    let document: DocumentSource = Arc::new(move || ca.bundle().to_json());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, profile = ?profile, "bundle endpoint ready");
    }
    serve(listener, tls, document, shutdown).await;
    Ok(())
}

/// Serves `document()` at `GET /` on `listener` over TLS with `tls` until `shutdown`
/// completes. Tests and `writ dev` use it directly; [`serve_for`] wires it to the CA.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    document: DocumentSource,
    shutdown: impl Future<Output = ()> + Send,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let accept = async {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "bundle endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "bundle endpoint: too many connections; closed");
                continue;
            };
            let acceptor = acceptor.clone();
            let document = document.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let served = tokio::time::timeout(CONNECTION_TIMEOUT, async {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "bundle endpoint: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "bundle endpoint: TLS handshake timed out");
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let body = document.clone();
                        async move { Ok::<_, Infallible>(respond(&req, &*body)) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(MAX_REQUEST_HEAD)
                        .keep_alive(false);
                    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                        tracing::debug!(%peer, error = %e, "bundle endpoint: connection failed");
                    }
                })
                .await;
                if served.is_err() {
                    tracing::debug!(%peer, "bundle endpoint: connection cut after the time limit");
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

/// The answer to one request.
fn respond(
    req: &Request<Incoming>,
    document: &(dyn Fn() -> String + Send + Sync),
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"GET only\n"),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    if req.uri().path() != "/" {
        return reply(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"the bundle is at /\n"),
        );
    }
    let mut r = reply(StatusCode::OK, Bytes::from(document()));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}
