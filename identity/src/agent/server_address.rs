//! The server addresses of a split-mode agent, and the failover between them.
//!
//! An agent is given one or more `host:port` addresses of the identity servers that
//! serve its trust domain (`server_address` in `agent.toml`, a string or an array;
//! `--server-address`, repeatable). A host name may resolve to several IP addresses: all
//! of them are tried. Each new node API connection tries the resolved addresses in turn,
//! starting with the last one that answered, each TCP connect bounded by
//! [`CONNECT_TIMEOUT`], so a dead server (refused, or a black hole) costs at most about a
//! second before the next is tried. Every server of the trust domain accepts the agent's
//! SVID, so a switch needs no new attestation.
//!
//! ```
//! use writ_identity::agent::server_address::ServerAddresses;
//! let servers = ServerAddresses::new(["writ-1.internal:8081", "10.0.0.7:8081", "[::1]:8081"]).unwrap();
//! assert_eq!(servers.len(), 3);
//! assert_eq!(servers.to_string(), "writ-1.internal:8081, 10.0.0.7:8081, [::1]:8081");
//! assert!(ServerAddresses::new(["writ-1.internal"]).is_err(), "no port");
//! assert!(ServerAddresses::new(Vec::<String>::new()).is_err(), "empty list");
//! ```

use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most server addresses one agent is given.
pub const MAX_SERVER_ADDRESSES: usize = 16;
/// Longest host name (DNS: 253 characters).
pub const MAX_HOST_LEN: usize = 253;
/// Most IP addresses taken from the resolution of one host name.
pub const MAX_RESOLVED_PER_HOST: usize = 16;
/// How long one TCP connect may take before the next address is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one host name lookup may take before the next address is tried.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a server address list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerAddressError {
    /// No address at all.
    #[error("no server address given (expected host:port)")]
    Empty,
    /// More addresses than [`MAX_SERVER_ADDRESSES`].
    #[error("{count} server addresses given; at most {max}")]
    TooMany {
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An address without `:port`.
    #[error("{address:?}: expected host:port (the port is missing)")]
    MissingPort {
        /// The address as given.
        address: String,
    },
    /// A port that is not a number in 1..=65535.
    #[error("{address:?}: the port is not a number in 1..=65535")]
    BadPort {
        /// The address as given.
        address: String,
    },
    /// The host is empty.
    #[error("{address:?}: the host is empty (expected host:port)")]
    EmptyHost {
        /// The address as given.
        address: String,
    },
    /// The host is longer than [`MAX_HOST_LEN`].
    #[error("a server host name of {len} characters; at most {max}")]
    HostTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The host is neither a DNS name, an IPv4 address nor a bracketed IPv6 address.
    #[error(
        "{address:?}: not host:port (a DNS name, an IPv4 address or [IPv6]; no scheme, path or spaces)"
    )]
    BadHost {
        /// The address as given.
        address: String,
    },
    /// The same address twice.
    #[error("{address:?} is given twice")]
    Duplicate {
        /// The address.
        address: String,
    },
}

/// One `host:port`: a DNS name, an IPv4 address or a bracketed IPv6 address, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddress {
    host: String,
    port: u16,
}

impl ServerAddress {
    /// Parses `host:port`.
    ///
    /// # Errors
    /// [`ServerAddressError`] naming what is wrong.
    pub fn new(address: &str) -> Result<Self, ServerAddressError> {
        let bad_host = || ServerAddressError::BadHost {
            address: shorten(address),
        };
        if address.len() > MAX_HOST_LEN + 2 + 6 {
            return Err(ServerAddressError::HostTooLong {
                len: address.len(),
                max: MAX_HOST_LEN,
            });
        }
        let (host, port) = if let Some(rest) = address.strip_prefix('[') {
            let (v6, port) = rest.split_once(']').ok_or_else(bad_host)?;
            Ipv6Addr::from_str(v6).map_err(|_| bad_host())?;
            let port = port
                .strip_prefix(':')
                .ok_or_else(|| ServerAddressError::MissingPort {
                    address: address.to_owned(),
                })?;
            (format!("[{v6}]"), port)
        } else {
            let (host, port) =
                address
                    .rsplit_once(':')
                    .ok_or_else(|| ServerAddressError::MissingPort {
                        address: shorten(address),
                    })?;
            if host.is_empty() {
                return Err(ServerAddressError::EmptyHost {
                    address: address.to_owned(),
                });
            }
            if host.len() > MAX_HOST_LEN {
                return Err(ServerAddressError::HostTooLong {
                    len: host.len(),
                    max: MAX_HOST_LEN,
                });
            }
            let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if !host.chars().all(name_char)
                || host.starts_with(['-', '.'])
                || host.contains("..")
                || host.split('.').any(|label| label.len() > 63)
            {
                return Err(bad_host());
            }
            (host.to_owned(), port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => {
                return Err(ServerAddressError::BadPort {
                    address: address.to_owned(),
                });
            }
        };
        Ok(Self { host, port })
    }

    /// The host as written (an IPv6 address in brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// An address for an error message, cut to a readable length.
fn shorten(address: &str) -> String {
    const MAX: usize = 80;
    match address.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", address.get(..i).unwrap_or_default()),
        None => address.to_owned(),
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for ServerAddress {
    type Err = ServerAddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl From<SocketAddr> for ServerAddress {
    fn from(addr: SocketAddr) -> Self {
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        Self {
            host,
            port: addr.port(),
        }
    }
}

/// The agent's server addresses, in the order they are tried first: 1 to
/// [`MAX_SERVER_ADDRESSES`], no duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddresses(Vec<ServerAddress>);

impl ServerAddresses {
    /// Parses every `host:port`.
    ///
    /// # Errors
    /// [`ServerAddressError`] for an empty or over-long list, a duplicate, or the first
    /// address that is not `host:port`.
    pub fn new<I>(addresses: I) -> Result<Self, ServerAddressError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut out: Vec<ServerAddress> = Vec::new();
        for (n, a) in addresses.into_iter().enumerate() {
            if n >= MAX_SERVER_ADDRESSES {
                return Err(ServerAddressError::TooMany {
                    count: n + 1,
                    max: MAX_SERVER_ADDRESSES,
                });
            }
            let a = ServerAddress::new(a.as_ref().trim())?;
            if out.contains(&a) {
                return Err(ServerAddressError::Duplicate {
                    address: a.to_string(),
                });
            }
            out.push(a);
        }
        if out.is_empty() {
            return Err(ServerAddressError::Empty);
        }
        Ok(Self(out))
    }

    /// The addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = &ServerAddress> {
        self.0.iter()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always `false`: the list holds at least one address.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<SocketAddr> for ServerAddresses {
    fn from(addr: SocketAddr) -> Self {
        Self(vec![addr.into()])
    }
}

impl From<ServerAddress> for ServerAddresses {
    fn from(addr: ServerAddress) -> Self {
        Self(vec![addr])
    }
}

impl FromIterator<SocketAddr> for ServerAddresses {
    /// Up to [`MAX_SERVER_ADDRESSES`] distinct addresses, in order (for tests and
    /// embedding; an empty iterator gives an empty list, which connects nowhere).
    fn from_iter<T: IntoIterator<Item = SocketAddr>>(iter: T) -> Self {
        let mut out: Vec<ServerAddress> = Vec::new();
        for a in iter.into_iter().map(ServerAddress::from) {
            if out.len() < MAX_SERVER_ADDRESSES && !out.contains(&a) {
                out.push(a);
            }
        }
        Self(out)
    }
}

impl fmt::Display for ServerAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, a) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

/// One resolved candidate: the configured address it came from, and the IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Candidate {
    /// Index into the configured list.
    pub(crate) configured: usize,
    /// The resolved address.
    pub(crate) addr: SocketAddr,
}

/// `candidates` starting with `last` (the one that answered last) if it is among them,
/// then the ones after it, wrapping around (as given otherwise); `avoid` (the server of
/// a connection that just broke: it died, or went silent and keep-alive gave up on it)
/// moved to the end, so a black hole is not waited on first again.
pub(crate) fn rotate(
    mut candidates: Vec<Candidate>,
    last: Option<SocketAddr>,
    avoid: Option<SocketAddr>,
) -> Vec<Candidate> {
    if let Some(i) = last.and_then(|l| candidates.iter().position(|c| c.addr == l)) {
        candidates.rotate_left(i);
    }
    if let Some(i) = avoid.and_then(|a| candidates.iter().position(|c| c.addr == a)) {
        let broken = candidates.remove(i);
        candidates.push(broken);
    }
    candidates
}

/// Tries the servers in turn for each new connection, starting with the last one that
/// answered, and logs each switch once. Shared by every channel of one agent.
#[derive(Debug)]
pub(crate) struct Failover {
    addresses: ServerAddresses,
    /// The server address that answered last.
    current: Mutex<Option<SocketAddr>>,
}

impl Failover {
    pub(crate) fn new(addresses: ServerAddresses) -> Arc<Self> {
        Arc::new(Self {
            addresses,
            current: Mutex::new(None),
        })
    }

    pub(crate) fn addresses(&self) -> &ServerAddresses {
        &self.addresses
    }

    /// The server that answered last, if any did.
    pub(crate) fn current(&self) -> Option<SocketAddr> {
        *self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every configured address resolved (each lookup bounded by [`RESOLVE_TIMEOUT`]),
    /// in configured order, duplicates dropped; then rotated to start with the last
    /// one that answered, `avoid` last (see [`rotate`]).
    pub(crate) async fn candidates(&self, avoid: Option<SocketAddr>) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for (configured, a) in self.addresses.iter().enumerate() {
            let host = a.host().trim_start_matches('[').trim_end_matches(']');
            let resolved =
                tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, a.port())))
                    .await;
            match resolved {
                Ok(Ok(addrs)) => {
                    for addr in addrs.take(MAX_RESOLVED_PER_HOST) {
                        if !out.iter().any(|c| c.addr == addr) {
                            out.push(Candidate { configured, addr });
                        }
                    }
                }
                Ok(Err(e)) => tracing::debug!(server = %a, error = %e, "cannot resolve"),
                Err(_) => tracing::debug!(server = %a, "name lookup timed out"),
            }
        }
        rotate(out, self.current(), avoid)
    }

    /// Runs `attempt` on each candidate in turn (`avoid` last) until one succeeds;
    /// records it as the current server (logging a switch once, at `info`) and returns
    /// its answer and address.
    ///
    /// # Errors
    /// The last error when no candidate answered (or that no address resolved).
    pub(crate) async fn first_answer<T, F, Fut>(
        &self,
        avoid: Option<SocketAddr>,
        mut attempt: F,
    ) -> std::io::Result<(T, SocketAddr)>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        let candidates = self.candidates(avoid).await;
        let mut last_error = None;
        for c in candidates {
            match attempt(c.addr).await {
                Ok(answer) => {
                    self.answered(c);
                    return Ok((answer, c.addr));
                }
                Err(e) => {
                    tracing::debug!(server = %c.addr, error = %e, "server did not answer");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no server address resolved ({})", self.addresses),
            )
        }))
    }

    fn answered(&self, c: Candidate) {
        let previous = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(c.addr);
        let name = self
            .addresses
            .0
            .get(c.configured)
            .map(ToString::to_string)
            .unwrap_or_default();
        match previous {
            Some(p) if p != c.addr => {
                tracing::info!(from = %p, to = %c.addr, server = %name, "switched to another identity server");
            }
            Some(_) => {}
            None => {
                tracing::debug!(to = %c.addr, server = %name, "connected to the identity server")
            }
        }
    }
}

/// A TCP connection to `addr`, bounded by [`CONNECT_TIMEOUT`].
///
/// # Errors
/// The connect error, or `TimedOut`.
pub(crate) async fn tcp_connect(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_ipv4_and_bracketed_ipv6() {
        let a = ServerAddress::new("writ-server.internal:8081").unwrap();
        assert_eq!((a.host(), a.port()), ("writ-server.internal", 8081));
        let a = ServerAddress::new("10.1.2.3:1").unwrap();
        assert_eq!(a.to_string(), "10.1.2.3:1");
        let a = ServerAddress::new("[::1]:8081").unwrap();
        assert_eq!((a.host(), a.port()), ("[::1]", 8081));
        assert_eq!(a.to_string(), "[::1]:8081");
        let a = ServerAddress::new("localhost:65535").unwrap();
        assert_eq!(a.port(), 65535);
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(ServerAddress::from(v6).to_string(), "[::1]:9");
    }

    #[test]
    fn refuses_garbage_with_a_clear_error() {
        use ServerAddressError as E;
        let err = |s: &str| ServerAddress::new(s).unwrap_err();
        assert!(matches!(err("writ-server"), E::MissingPort { .. }));
        assert!(matches!(err(""), E::MissingPort { .. }));
        assert!(matches!(err(":8081"), E::EmptyHost { .. }));
        assert!(matches!(err("host:"), E::BadPort { .. }));
        assert!(matches!(err("host:0"), E::BadPort { .. }));
        assert!(matches!(err("host:65536"), E::BadPort { .. }));
        assert!(matches!(err("host:+80"), E::BadPort { .. }));
        assert!(matches!(err("host:http"), E::BadPort { .. }));
        assert!(matches!(err("http://host:80"), E::BadHost { .. }));
        assert!(matches!(err("host/x:80"), E::BadHost { .. }));
        assert!(matches!(err("a b:80"), E::BadHost { .. }));
        assert!(
            matches!(err("::1:80"), E::BadHost { .. }),
            "unbracketed IPv6"
        );
        assert!(matches!(err("[::1:80"), E::BadHost { .. }));
        assert!(matches!(err("[nope]:80"), E::BadHost { .. }));
        assert!(matches!(err("[::1]80"), E::MissingPort { .. }));
        assert!(matches!(err("-x:80"), E::BadHost { .. }));
        assert!(matches!(err("a..b:80"), E::BadHost { .. }));
        assert!(matches!(err("user@host:80"), E::BadHost { .. }));
        assert!(matches!(err("h\u{e9}:80"), E::BadHost { .. }));
        assert!(matches!(err("h\n:80"), E::BadHost { .. }));
        let label = format!("{}.example:80", "a".repeat(64));
        assert!(matches!(err(&label), E::BadHost { .. }));
        let long = format!("{}:80", "a.".repeat(200));
        assert!(
            matches!(err(&long), E::HostTooLong { .. }),
            "{}",
            err(&long)
        );
        let huge = "x".repeat(100_000);
        let e = err(&huge);
        assert!(matches!(e, E::HostTooLong { .. }));
        assert!(e.to_string().len() < 200, "the message stays short: {e}");
        assert!(err("writ-server").to_string().contains("host:port"));
    }

    #[test]
    fn lists_are_bounded_non_empty_and_without_duplicates() {
        use ServerAddressError as E;
        assert_eq!(
            ServerAddresses::new(Vec::<&str>::new()).unwrap_err(),
            E::Empty
        );
        let many: Vec<String> = (1..=17).map(|p| format!("h:{p}")).collect();
        assert!(matches!(
            ServerAddresses::new(&many).unwrap_err(),
            E::TooMany { max: 16, .. }
        ));
        assert_eq!(ServerAddresses::new(&many[..16]).unwrap().len(), 16);
        assert!(matches!(
            ServerAddresses::new(["a:1", "b:1", "a:1"]).unwrap_err(),
            E::Duplicate { .. }
        ));
        assert!(matches!(
            ServerAddresses::new(["a:1", "b"]).unwrap_err(),
            E::MissingPort { .. }
        ));
        let list = ServerAddresses::new([" a:1", "b:2 "]).unwrap();
        let order: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(order, ["a:1", "b:2"]);
        // An unbounded iterator stops at the limit.
        let endless = std::iter::repeat("a:1");
        assert!(matches!(
            ServerAddresses::new(endless).unwrap_err(),
            E::Duplicate { .. }
        ));
        let endless = (1..).map(|p: u32| format!("h:{}", p % 60_000 + 1));
        assert!(matches!(
            ServerAddresses::new(endless).unwrap_err(),
            E::TooMany { .. }
        ));
    }

    fn c(configured: usize, port: u16) -> Candidate {
        Candidate {
            configured,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn rotation_starts_with_the_last_that_answered() {
        let list = vec![c(0, 1), c(1, 2), c(1, 3), c(2, 4)];
        let port = |p: u16| Some(SocketAddr::from(([127, 0, 0, 1], p)));
        assert_eq!(rotate(list.clone(), None, None), list);
        assert_eq!(
            rotate(list.clone(), port(3), None),
            [c(1, 3), c(2, 4), c(0, 1), c(1, 2)]
        );
        // The server of a broken connection is tried last.
        assert_eq!(
            rotate(list.clone(), port(3), port(3)),
            [c(2, 4), c(0, 1), c(1, 2), c(1, 3)]
        );
        assert_eq!(
            rotate(list.clone(), port(3), port(1)),
            [c(1, 3), c(2, 4), c(1, 2), c(0, 1)]
        );
        assert_eq!(
            rotate(list.clone(), None, port(1)),
            [c(1, 2), c(1, 3), c(2, 4), c(0, 1)]
        );
        assert_eq!(rotate(list.clone(), port(9), port(9)), list);
        assert!(rotate(Vec::new(), port(3), port(3)).is_empty());
    }

    #[tokio::test]
    async fn tries_each_server_in_turn_and_remembers_the_one_that_answered() {
        // One port refuses (bound, then closed), one answers.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let failover = Failover::new([dead_addr, live_addr].into_iter().collect());
        let candidates = failover.candidates(None).await;
        assert_eq!(
            candidates.iter().map(|c| c.addr).collect::<Vec<_>>(),
            [dead_addr, live_addr]
        );
        let mut tried = Vec::new();
        failover
            .first_answer(None, |a| {
                tried.push(a);
                tcp_connect(a)
            })
            .await
            .unwrap();
        assert_eq!(tried, [dead_addr, live_addr]);
        assert_eq!(failover.current(), Some(live_addr));
        // The next connection starts with the one that answered.
        let mut tried = Vec::new();
        failover
            .first_answer(None, |a| {
                tried.push(a);
                tcp_connect(a)
            })
            .await
            .unwrap();
        assert_eq!(tried, [live_addr]);
        // None answers: the last error.
        drop(live);
        assert!(failover.first_answer(None, tcp_connect).await.is_err());
    }

    #[tokio::test]
    async fn a_name_resolves_to_every_address() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = live.local_addr().unwrap().port();
        let failover = Failover::new(ServerAddresses::new([format!("localhost:{port}")]).unwrap());
        let candidates = failover.candidates(None).await;
        if candidates.is_empty() {
            // No resolver for localhost here: nothing to check.
            return;
        }
        assert!(
            candidates
                .iter()
                .all(|c| c.configured == 0 && c.addr.port() == port)
        );
        failover.first_answer(None, tcp_connect).await.unwrap();
        assert_eq!(
            failover.current(),
            Some(live.local_addr().unwrap()),
            "whatever localhost resolves to first, the IPv4 listener answers"
        );
        let unresolvable = Failover::new(ServerAddresses::new(["no-such-host.invalid:1"]).unwrap());
        assert!(unresolvable.first_answer(None, tcp_connect).await.is_err());
    }
}
