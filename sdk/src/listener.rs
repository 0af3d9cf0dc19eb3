//! Serving HTTPS with SPIFFE mTLS: a TCP listener that completes TLS handshakes
//! concurrently and hands axum each connection with its [`Peer`] (address and verified
//! SPIFFE ID), which [`crate::middleware`] reads as the caller.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use writ_sdk::listener;
//! use writ_sdk::tls::Authorizer;
//! use writ_sdk::workload::X509Source;
//! let source = X509Source::new().await?;
//! let td = source.spiffe_id().trust_domain();
//! let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! listener::serve(app, &source, Authorizer::member_of(td), tcp, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use writ_identity::spiffe_id::SpiffeId;

use crate::tls::{self, Authorizer, TlsError};
use crate::workload::X509Source;

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; beyond it new connections wait to be accepted.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Why a listener could not start or stopped.
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

/// Who is at the other end of a connection (axum's `ConnectInfo` for
/// [`TlsListener`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The SPIFFE ID of the client's verified X509-SVID, if it presented one.
    pub id: Option<SpiffeId>,
    /// SHA-256 of the client's leaf certificate, if it presented one: tells one SVID
    /// from the next after a rotation.
    pub cert_sha256: Option<[u8; 32]>,
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Called with the remote address and the error when a handshake fails.
pub type HandshakeFailed = Arc<dyn Fn(SocketAddr, &std::io::Error) + Send + Sync>;

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
    /// Accepts on `tcp` with `config` (e.g. from [`tls::server_config`]); failed
    /// handshakes go to the debug log.
    ///
    /// # Errors
    /// [`ServeError::Io`] if the socket has no local address.
    pub fn new(tcp: TcpListener, config: rustls::ServerConfig) -> Result<Self, ServeError> {
        Self::with_failure_hook(
            tcp,
            config,
            Arc::new(|addr, e| tracing::debug!(%addr, error = %e, "TLS handshake failed")),
        )
    }

    /// Like [`TlsListener::new`], calling `failed` for every failed handshake (to audit
    /// refused client certificates, for example).
    ///
    /// # Errors
    /// [`ServeError::Io`] if the socket has no local address.
    pub fn with_failure_hook(
        tcp: TcpListener,
        config: rustls::ServerConfig,
        failed: HandshakeFailed,
    ) -> Result<Self, ServeError> {
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
                let failed = failed.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let certs = tls.get_ref().1.peer_certificates();
                            let peer = Peer {
                                addr,
                                id: certs.and_then(writ_identity::tls::peer_id),
                                cert_sha256: certs
                                    .and_then(|c| c.first())
                                    .map(|leaf| writ_identity::key_manager::sha256(leaf)),
                            };
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => failed(addr, &e),
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
            cert_sha256: None,
        })
    }
}

/// Serves `app` on `tcp` over mTLS with the SVID of `source`, accepting clients whose
/// X509-SVID `clients` authorizes, until `shutdown` completes. Handlers (and
/// [`crate::middleware`]) see the client as `ConnectInfo<Peer>`.
///
/// # Errors
/// [`ServeError`] if the TLS configuration cannot be built or the socket fails.
pub async fn serve(
    app: axum::Router,
    source: &X509Source,
    clients: Authorizer,
    tcp: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = TlsListener::new(tcp, tls::server_config(source, clients)?)?;
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
