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
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::serve::{IncomingStream, Listener};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt;
use writ_spiffe::accept::{AcceptBackoff, AdmittedStream, Gate};
use writ_spiffe::spiffe_id::SpiffeId;

pub use writ_spiffe::accept::ConnectionLimits;

use crate::tls::{self, Authorizer, TlsError};
use crate::workload::X509Source;

/// Default longest TLS handshake ([`ConnectionLimits::handshake_timeout`]).
pub const HANDSHAKE_TIMEOUT: Duration = writ_spiffe::accept::DEFAULT_HANDSHAKE_TIMEOUT;
/// Established connections waiting for the server to pick them up.
const ESTABLISHED_QUEUE: usize = 256;
/// How long a connection closed for a timeout may take to say goodbye (TLS
/// `close_notify`, HTTP/2 `GOAWAY`) before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

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

/// An established TLS connection from a [`TlsListener`]: the stream, holding the
/// connection's place in the listener's counts (per client address, per listener, in
/// the process budget) until it is dropped.
pub type TlsConnection = AdmittedStream<TlsStream<TcpStream>>;

/// A TCP listener that completes TLS handshakes concurrently under its
/// [`ConnectionLimits`] and yields the established connections with their [`Peer`].
/// Serve it with [`serve_tls`] to get the HTTP timeouts too (`axum::serve` has none).
pub struct TlsListener {
    established: mpsc::Receiver<(TlsConnection, Peer)>,
    local: SocketAddr,
    limits: ConnectionLimits,
    _accept: AbortOnDropHandle<()>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .field("limits", &self.limits)
            .finish()
    }
}

impl TlsListener {
    /// Accepts on `tcp` with `config` (e.g. from [`tls::server_config`]) and the default
    /// [`ConnectionLimits`]; failed handshakes go to the debug log.
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
        Self::with_limits(tcp, config, failed, ConnectionLimits::default())
    }

    /// Like [`TlsListener::with_failure_hook`], under `limits`.
    ///
    /// # Errors
    /// [`ServeError::Io`] if the socket has no local address.
    pub fn with_limits(
        tcp: TcpListener,
        config: rustls::ServerConfig,
        failed: HandshakeFailed,
        limits: ConnectionLimits,
    ) -> Result<Self, ServeError> {
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let local = tcp.local_addr()?;
        let (tx, established) = mpsc::channel(ESTABLISHED_QUEUE);
        let gate = Gate::new("TLS listener", limits);
        let task = tokio::spawn(async move {
            let mut backoff = AcceptBackoff::default();
            loop {
                let (stream, addr, admitted) = gate.accept(&tcp, &mut backoff).await;
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                let failed = failed.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    match gate.handshake(acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let certs = tls.get_ref().1.peer_certificates();
                            let peer = Peer {
                                addr,
                                id: certs.and_then(writ_spiffe::tls::peer_id),
                                cert_sha256: certs
                                    .and_then(|c| c.first())
                                    .map(|leaf| writ_spiffe::fingerprint::sha256(leaf)),
                            };
                            let _ = tx.send((AdmittedStream::new(tls, admitted), peer)).await;
                        }
                        Ok(Err(e)) => failed(addr, &e),
                        Err(cut) => tracing::debug!(%addr, "{cut}"),
                    }
                });
            }
        });
        Ok(Self {
            established,
            local,
            limits,
            _accept: AbortOnDropHandle::new(task),
        })
    }

    /// The limits this listener's connections are held to.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }
}

impl Listener for TlsListener {
    type Io = TlsConnection;
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
/// X509-SVID `clients` authorizes, until `shutdown` completes, under the default
/// [`ConnectionLimits`]. Handlers (and [`crate::middleware`]) see the client as
/// `ConnectInfo<Peer>`.
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
    serve_tls(listener, app, shutdown).await
}

/// Serves `app` on the connections of `listener` until `shutdown` completes, then lets
/// requests in flight finish. Each connection is held to the listener's
/// [`ConnectionLimits`]: its first request header must arrive within
/// `header_read_timeout` of the handshake, a later one within `header_read_timeout` of
/// its first byte; a request body within `body_read_timeout` of its header (the handler
/// then reads an error and the connection closes); and a connection waiting for its next
/// request is closed after `idle_timeout`. Handlers see the client as
/// `ConnectInfo<Peer>`.
///
/// # Errors
/// None today; the signature leaves room for listener errors.
pub async fn serve_tls(
    mut listener: TlsListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let limits = *listener.limits();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            conn = Listener::accept(&mut listener) => conn,
            () = &mut shutdown => break,
        };
        tokio::spawn(serve_connection(
            io,
            peer,
            app.clone(),
            limits,
            stop_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(listener);
    drop(done_tx);
    let _ = stop_tx.send(true);
    // Every connection task holds a sender; the channel closes when the last ends.
    let _ = done_rx.recv().await;
    Ok(())
}

/// What a connection is doing, for its deadlines.
#[derive(Debug)]
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the connection's watchdog when a deadline moves.
    changed: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    /// Requests whose response has not been fully sent.
    in_flight: usize,
    /// Waiting for a request header (the first one, or one whose first byte came).
    header_phase: bool,
    /// When the current wait began.
    since: Instant,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                header_phase: true,
                since: Instant::now(),
            }),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Applies `f`; wakes the watchdog when the deadline moved.
    fn update(&self, f: impl FnOnce(&mut ActivityState)) {
        let moved = match self.state.lock() {
            Ok(mut s) => {
                let before = (s.in_flight == 0, s.header_phase, s.since);
                f(&mut s);
                before != (s.in_flight == 0, s.header_phase, s.since)
            }
            Err(_) => false,
        };
        if moved {
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: between requests they start a header.
    fn read(&self) {
        self.update(|s| {
            if s.in_flight == 0 && !s.header_phase {
                s.header_phase = true;
                s.since = Instant::now();
            }
        });
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.update(|s| s.in_flight += 1);
        InFlight(self.clone())
    }

    /// When the connection must be closed if nothing changes; `None` while a request
    /// is in flight (its body has its own deadline).
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let s = *self.state.lock().ok()?;
        if s.in_flight > 0 {
            return None;
        }
        let wait = if s.header_phase {
            limits.header_read_timeout
        } else {
            limits.idle_timeout
        };
        Some(s.since + wait)
    }
}

/// A request in flight: ends when the response body is dropped (fully sent or not).
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(|s| {
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.header_phase = false;
                s.since = Instant::now();
            }
        });
    }
}

/// The connection's stream, telling its [`Activity`] when bytes arrive.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that must arrive whole by a deadline.
struct DeadlineBody<B> {
    inner: B,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

/// A request body did not arrive within [`ConnectionLimits::body_read_timeout`].
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0:?}")]
pub struct BodyTimeout(pub Duration);

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout(self.limit).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct InFlightBody {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for InFlightBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_connection(
    io: TlsConnection,
    peer: Peer,
    app: axum::Router,
    limits: ConnectionLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let activity = Activity::new();
    let io = TokioIo::new(Watched {
        inner: io,
        activity: activity.clone(),
    });
    let requests = activity.clone();
    let addr = peer.addr;
    let service = tower::service_fn(move |request: Request<hyper::body::Incoming>| {
        let in_flight = requests.request_started();
        let mut request = request.map(|body| {
            Body::new(DeadlineBody {
                inner: body,
                deadline: Box::pin(tokio::time::sleep(limits.body_read_timeout)),
                limit: limits.body_read_timeout,
            })
        });
        request.extensions_mut().insert(ConnectInfo(peer.clone()));
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await?;
            Ok::<_, std::convert::Infallible>(response.map(|inner| {
                Body::new(InFlightBody {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    // Hyper's own header timer runs from the start of each wait; ours is tighter, so
    // this is only a backstop.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, TowerToHyperService::new(service));
    let mut conn = std::pin::pin!(conn);
    let mut closing: Option<Instant> = None;
    let mut stopping = false;
    loop {
        let wake = match (closing, activity.deadline(&limits)) {
            (Some(at), _) => at,
            (None, Some(at)) => at,
            // A request in flight: look again later.
            (None, None) => Instant::now() + limits.header_read_timeout,
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(%addr, error = %e, "connection ended");
                }
                return;
            }
            () = activity.changed.notified(), if closing.is_none() => {}
            () = tokio::time::sleep_until(wake) => {
                if closing.is_some() {
                    tracing::debug!(%addr, "connection dropped after its grace");
                    return;
                }
                if activity.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    tracing::debug!(%addr, "connection closed: header or idle timeout");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                    // Requests in flight may finish; idle connections close now.
                    closing = activity.deadline(&limits).map(|_| Instant::now() + CLOSE_GRACE);
                }
            }
        }
    }
}
