//! Accepting connections so that no client can hold a listener hostage: the limits of
//! one connection ([`ConnectionLimits`]), the admission of new TCP connections
//! ([`Gate`]: a cap per client address, a bounded set of pending TLS handshakes in which
//! the oldest gives way to a new one, a connection cap per listener and a process-wide
//! budget that keeps file descriptors in reserve for the Unix sockets), and back-off on
//! accept errors with one log line per interval ([`AcceptBackoff`], [`unix_incoming`]).
//!
//! What nginx and Go's `http.Server` do: every phase of a connection has a deadline
//! (TLS handshake, request header, request body, idle keep-alive; the HTTP ones are
//! enforced by `writ_sdk::listener`), and running out of file descriptors slows the
//! accept loop down instead of spinning it.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
#[cfg(feature = "grpc-server")]
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// Default longest TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest wait for a complete request header (the first one from the end of
/// the handshake, later ones from their first byte).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default longest wait for a whole request body, from the end of its header.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest keep-alive wait for the next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default number of TLS handshakes in flight per listener.
pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 256;
/// Default number of connections (handshaking or open) per client address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Shortest and longest sleep after a failed accept (Go's `http.Server` uses the same).
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this interval for repeated accept errors and refusals.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The limits of the connections of one listener. `Default` gives the documented
/// defaults; set fields to change them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// Longest TLS handshake; a connection still handshaking then is closed.
    pub handshake_timeout: Duration,
    /// Longest wait for a complete request header: for the first request from the end
    /// of the handshake, for later ones from their first byte.
    pub header_read_timeout: Duration,
    /// Longest wait for a whole request body, from the end of its header.
    pub body_read_timeout: Duration,
    /// Longest wait, after a response, for the next request to start.
    pub idle_timeout: Duration,
    /// TLS handshakes in flight at once; beyond it the oldest is dropped for the new one.
    pub max_pending_handshakes: usize,
    /// Connections (handshaking or open) from one client address (an IPv6 client: its
    /// /64); beyond it new connections from that address are closed at once.
    pub max_connections_per_ip: usize,
    /// Connections of this listener at once; `None`: the process budget
    /// ([`process_budget`]). Beyond it the listener stops accepting until one closes.
    pub max_connections: Option<usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_pending_handshakes: DEFAULT_MAX_PENDING_HANDSHAKES,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_connections: None,
        }
    }
}

/// File descriptors kept out of the network listeners' reach for a process allowed
/// `nofile` of them: a quarter, at least 32 and at most 1024.
pub fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 4).clamp(32, 1024)
}

/// Connections all network listeners of this process may hold together: the soft
/// `RLIMIT_NOFILE` minus [`fd_reserve`], so the Workload API and admin sockets (and
/// files) of the same process keep working when a listener is full.
pub fn process_budget() -> usize {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    let budget = nofile.saturating_sub(fd_reserve(nofile)).max(1);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

fn budget_semaphore() -> Arc<Semaphore> {
    static BUDGET: OnceLock<Arc<Semaphore>> = OnceLock::new();
    BUDGET
        .get_or_init(|| Arc::new(Semaphore::new(process_budget().min(Semaphore::MAX_PERMITS))))
        .clone()
}

/// Counts events and says when to log them: the first at once, then at most one line
/// per interval carrying how many happened since the last line.
#[derive(Debug)]
pub struct LogEvery {
    interval: Duration,
    last: Option<Instant>,
    unlogged: u64,
}

impl LogEvery {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            unlogged: 0,
        }
    }

    /// Records one event at `now`; `Some(count)` when a line is due, with the number of
    /// events it stands for.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged = self.unlogged.saturating_add(1);
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= self.interval);
        if due {
            self.last = Some(now);
            Some(std::mem::take(&mut self.unlogged))
        } else {
            None
        }
    }
}

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptFailure {
    /// How long to sleep before accepting again (zero: the error concerned only that
    /// connection).
    pub sleep: Duration,
    /// `Some(count)`: log one line for this many failures.
    pub log: Option<u64>,
}

/// The state of one accept loop after errors: the sleep doubles from 5 ms to 1 s while
/// accepts keep failing (out of file descriptors, buffers or memory) and resets at the
/// first success; failures are logged at most once per [`LOG_INTERVAL`] with a count.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    log: LogEvery,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self::new(LOG_INTERVAL)
    }
}

impl AcceptBackoff {
    /// A back-off logging at most once per `log_interval`.
    pub fn new(log_interval: Duration) -> Self {
        Self {
            delay: Duration::ZERO,
            log: LogEvery::new(log_interval),
        }
    }

    /// Records `error` at `now`.
    pub fn failed(&mut self, error: &std::io::Error, now: Instant) -> AcceptFailure {
        let log = self.log.record(now);
        if is_connection_error(error) {
            return AcceptFailure {
                sleep: Duration::ZERO,
                log,
            };
        }
        self.delay = (self.delay * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        AcceptFailure {
            sleep: self.delay,
            log,
        }
    }

    /// Records a successful accept.
    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    /// Runs `accept` until it succeeds, sleeping and logging (as `listener`) between
    /// failures.
    pub async fn accept<T, F, Fut>(&mut self, listener: &str, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(conn) => {
                    self.succeeded();
                    return conn;
                }
                Err(e) => {
                    let failure = self.failed(&e, Instant::now());
                    if let Some(count) = failure.log {
                        tracing::warn!(
                            listener,
                            error = %e,
                            failures = count,
                            backoff_ms = u64::try_from(failure.sleep.as_millis()).unwrap_or(u64::MAX),
                            "accept failed; backing off"
                        );
                    }
                    if !failure.sleep.is_zero() {
                        tokio::time::sleep(failure.sleep).await;
                    }
                }
            }
        }
    }
}

/// An error that concerns only the connection being accepted, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted
    )
}

/// The connections of a Unix socket listener for tonic's `serve_with_incoming`: accept
/// errors never reach tonic (which would retry at once, spinning a core); the loop backs
/// off and logs instead, as `name`.
#[cfg(feature = "grpc-server")]
pub fn unix_incoming(
    listener: UnixListener,
    name: &'static str,
) -> impl futures::Stream<Item = std::io::Result<UnixStream>> + Send + 'static {
    futures::stream::unfold(
        (listener, AcceptBackoff::default()),
        move |(listener, mut backoff)| async move {
            let (stream, _) = backoff.accept(name, || listener.accept()).await;
            Some((Ok(stream), (listener, backoff)))
        },
    )
}

/// The key a client address is counted under: the address itself, or an IPv6
/// address's /64 (one host commonly holds a whole /64).
fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Pending {
    next: u64,
    /// Oldest first; dropping a sender tells its handshake to give up.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

#[derive(Debug)]
struct Refusals {
    per_ip: LogEvery,
    evicted: LogEvery,
}

/// Admission of a listener's TCP connections under its [`ConnectionLimits`]. Shared by
/// the accept loop and every connection it admitted.
#[derive(Debug)]
pub struct Gate {
    name: &'static str,
    limits: ConnectionLimits,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    pending: Mutex<Pending>,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    refusals: Mutex<Refusals>,
}

/// A connection the [`Gate`] admitted: holds its per-address count, its listener slot
/// and its share of the process budget until dropped (with the connection).
#[derive(Debug)]
pub struct Admitted {
    gate: Arc<Gate>,
    key: IpAddr,
    _slot: OwnedSemaphorePermit,
    _budget: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut map) = self.gate.per_ip.lock()
            && let Some(n) = map.get_mut(&self.key)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A stream with the [`Admitted`] it was let in under: the connection's place in its
/// listener's counts is released when the stream is dropped.
#[derive(Debug)]
pub struct AdmittedStream<T> {
    inner: T,
    _admitted: Admitted,
}

impl<T> AdmittedStream<T> {
    /// Ties `inner` to `admitted`.
    pub fn new(inner: T, admitted: Admitted) -> Self {
        Self {
            inner,
            _admitted: admitted,
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AdmittedStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AdmittedStream<T> {
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

#[cfg(feature = "grpc-server")]
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AdmittedStream<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Why a handshake run by [`Gate::handshake`] did not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeCut {
    /// It took longer than the handshake timeout.
    #[error("TLS handshake timed out")]
    TimedOut,
    /// It was the oldest pending when the pending cap was reached, and gave way.
    #[error("TLS handshake dropped for a newer connection (too many pending)")]
    Evicted,
}

struct PendingEntry<'a> {
    gate: &'a Gate,
    id: u64,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.gate.pending.lock() {
            pending.waiting.remove(&self.id);
        }
    }
}

impl Gate {
    /// A gate for the listener called `name` (in log lines).
    pub fn new(name: &'static str, limits: ConnectionLimits) -> Arc<Self> {
        let budget = budget_semaphore();
        let slots = limits
            .max_connections
            .unwrap_or_else(process_budget)
            .clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            name,
            limits,
            per_ip: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            slots: Arc::new(Semaphore::new(slots)),
            budget,
            refusals: Mutex::new(Refusals {
                per_ip: LogEvery::new(LOG_INTERVAL),
                evicted: LogEvery::new(LOG_INTERVAL),
            }),
        })
    }

    /// The limits this gate enforces.
    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Waits for a free slot (a full listener first drops its oldest pending
    /// handshake), accepts with back-off, and admits the connection, closing at once any
    /// whose client address is at its cap.
    pub async fn accept(
        self: &Arc<Self>,
        tcp: &TcpListener,
        backoff: &mut AcceptBackoff,
    ) -> (TcpStream, SocketAddr, Admitted) {
        loop {
            let slot = match self.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    self.evict_oldest();
                    let Ok(p) = self.slots.clone().acquire_owned().await else {
                        // The semaphore is never closed.
                        continue;
                    };
                    p
                }
            };
            let Ok(budget) = self.budget.clone().acquire_owned().await else {
                continue;
            };
            let (stream, addr) = backoff.accept(self.name, || tcp.accept()).await;
            match self.admit(addr.ip(), slot, budget) {
                Some(admitted) => return (stream, addr, admitted),
                None => {
                    let due = self
                        .refusals
                        .lock()
                        .ok()
                        .and_then(|mut r| r.per_ip.record(Instant::now()));
                    if let Some(count) = due {
                        tracing::warn!(
                            listener = self.name,
                            client = %addr.ip(),
                            refused = count,
                            max_connections_per_ip = self.limits.max_connections_per_ip,
                            "connections closed: client address at its connection cap"
                        );
                    }
                    drop(stream);
                }
            }
        }
    }

    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        slot: OwnedSemaphorePermit,
        budget: OwnedSemaphorePermit,
    ) -> Option<Admitted> {
        let key = ip_key(ip);
        let mut map = self.per_ip.lock().ok()?;
        let n = map.entry(key).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return None;
        }
        *n += 1;
        Some(Admitted {
            gate: self.clone(),
            key,
            _slot: slot,
            _budget: budget,
        })
    }

    /// Drops the oldest pending handshake, if any.
    fn evict_oldest(&self) {
        let evicted = self
            .pending
            .lock()
            .ok()
            .and_then(|mut p| p.waiting.pop_first())
            .is_some();
        if evicted {
            self.note_eviction();
        }
    }

    fn note_eviction(&self) {
        let due = self
            .refusals
            .lock()
            .ok()
            .and_then(|mut r| r.evicted.record(Instant::now()));
        if let Some(count) = due {
            tracing::warn!(
                listener = self.name,
                dropped = count,
                max_pending_handshakes = self.limits.max_pending_handshakes,
                "pending TLS handshakes dropped for newer connections"
            );
        }
    }

    /// Runs `handshake` as one of the pending handshakes: it ends with
    /// [`HandshakeCut::TimedOut`] after the handshake timeout, or with
    /// [`HandshakeCut::Evicted`] when it is the oldest of a full pending set and a new
    /// connection arrives.
    ///
    /// # Errors
    /// [`HandshakeCut`] as above.
    pub async fn handshake<T>(
        &self,
        handshake: impl Future<Output = T>,
    ) -> Result<T, HandshakeCut> {
        let (tx, evicted) = oneshot::channel::<()>();
        let (id, dropped) = {
            let Ok(mut pending) = self.pending.lock() else {
                return Err(HandshakeCut::Evicted);
            };
            let mut dropped = false;
            while pending.waiting.len() >= self.limits.max_pending_handshakes.max(1) {
                dropped |= pending.waiting.pop_first().is_some();
            }
            let id = pending.next;
            pending.next = pending.next.wrapping_add(1);
            pending.waiting.insert(id, tx);
            (id, dropped)
        };
        if dropped {
            self.note_eviction();
        }
        let _entry = PendingEntry { gate: self, id };
        tokio::select! {
            done = tokio::time::timeout(self.limits.handshake_timeout, handshake) => {
                done.map_err(|_| HandshakeCut::TimedOut)
            }
            _ = evicted => Err(HandshakeCut::Evicted),
        }
    }

    /// Handshakes pending now.
    pub fn pending_handshakes(&self) -> usize {
        self.pending.lock().map(|p| p.waiting.len()).unwrap_or(0)
    }

    /// Connections admitted now from `ip` (counted under its key, see
    /// [`ConnectionLimits::max_connections_per_ip`]).
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.per_ip
            .lock()
            .ok()
            .and_then(|m| m.get(&ip_key(ip)).copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> std::io::Error {
        std::io::Error::from_raw_os_error(24)
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets_on_success() {
        let start = Instant::now();
        let mut b = AcceptBackoff::new(Duration::from_secs(10));
        let sleeps: Vec<_> = (0..10).map(|_| b.failed(&emfile(), start).sleep).collect();
        assert_eq!(sleeps[0], Duration::from_millis(5));
        assert_eq!(sleeps[1], Duration::from_millis(10));
        assert_eq!(sleeps[2], Duration::from_millis(20));
        assert_eq!(sleeps[9], Duration::from_secs(1));
        assert!(sleeps.windows(2).all(|w| w[0] <= w[1]));
        b.succeeded();
        assert_eq!(b.failed(&emfile(), start).sleep, Duration::from_millis(5));
    }

    #[test]
    fn backoff_logs_once_per_interval_with_the_count() {
        let start = Instant::now();
        let mut b = AcceptBackoff::new(Duration::from_secs(10));
        // 20 failures a second for a minute (what the attack run saw): one line at the
        // first, then one per 10 s carrying the failures since the last line.
        let mut lines = Vec::new();
        for i in 0..1200u64 {
            let now = start + Duration::from_millis(50 * i);
            if let Some(n) = b.failed(&emfile(), now).log {
                lines.push(n);
            }
        }
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert_eq!(lines[0], 1);
        assert_eq!(lines[1], 200);
        assert_eq!(lines.iter().sum::<u64>(), 1200 - 199);
    }

    #[test]
    fn a_connection_error_does_not_back_off() {
        let mut b = AcceptBackoff::default();
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionAborted);
        assert_eq!(b.failed(&e, Instant::now()).sleep, Duration::ZERO);
        let e = std::io::Error::from_raw_os_error(23); // ENFILE
        assert_eq!(b.failed(&e, Instant::now()).sleep, Duration::from_millis(5));
        let e = std::io::Error::from_raw_os_error(105); // ENOBUFS
        assert_eq!(
            b.failed(&e, Instant::now()).sleep,
            Duration::from_millis(10)
        );
    }

    #[test]
    fn reserve_is_a_quarter_within_bounds() {
        assert_eq!(fd_reserve(64), 32);
        assert_eq!(fd_reserve(1024), 256);
        assert_eq!(fd_reserve(1 << 20), 1024);
        assert!(process_budget() >= 1);
    }

    #[test]
    fn ipv6_clients_count_by_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(ip_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn the_oldest_pending_handshake_gives_way() {
        let limits = ConnectionLimits {
            max_pending_handshakes: 2,
            ..ConnectionLimits::default()
        };
        let gate = Gate::new("test", limits);
        let (a_tx, a_rx) = oneshot::channel::<Result<(), HandshakeCut>>();
        let g = gate.clone();
        let a = tokio::spawn(async move {
            let r = g.handshake(std::future::pending::<()>()).await;
            let _ = a_tx.send(r);
        });
        while gate.pending_handshakes() < 1 {
            tokio::task::yield_now().await;
        }
        let g = gate.clone();
        let b = tokio::spawn(async move { g.handshake(std::future::pending::<()>()).await });
        while gate.pending_handshakes() < 2 {
            tokio::task::yield_now().await;
        }
        // A third arrives: the first gives way, the third completes.
        assert_eq!(gate.handshake(async { 7 }).await, Ok(7));
        assert_eq!(a_rx.await.unwrap(), Err(HandshakeCut::Evicted));
        a.await.unwrap();
        assert_eq!(gate.pending_handshakes(), 1);
        b.abort();
    }
}
