//! The benches' lean load generator (`--wire`): RFC 8693 exchanges over keep-alive mTLS
//! HTTP/1.1 with nothing between the socket and the bytes.
//!
//! By default `writ bench exchange` and `overload` send with the SDK's [`TxnClient`]
//! (reqwest and hyper): what a workload runs. That client costs its machine about
//! 100 µs of CPU per exchange, as much as half the service's own, and on the benches' two
//! cores it is then the client, not the service, that runs out first: it cannot offer
//! ten times the service's peak. With `--wire`, each request is the bytes of
//! `POST /token` encoded once before the clock starts (the body is [`TxnClient::form`],
//! the SDK's own encoding), written to a connection that has no other request in flight,
//! and its response read back with `httparse`: status, `content-length`, body. The TLS
//! is the SDK's ([`writ_sdk::tls::client_config`]: the caller's X509-SVID, the service
//! authorized by its SPIFFE ID), offering only `http/1.1`.
//!
//! Like `wrk` against a web server: the figures are then the service's, with less of the
//! machine spent on the load. [`Wire::metadata`] sends a `GET` of the service's metadata
//! on the same connections instead: the transport alone (`exchange --modes transport`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::workload::X509Source;

/// Longest response head read.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest response body read.
const MAX_BODY_BYTES: usize = 256 * 1024;
/// Most response headers parsed.
const MAX_HEADERS: usize = 32;
/// The token service's RFC 8414 metadata.
const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";

/// What a response came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 200 with a non-empty `access_token`.
    Granted,
    /// 503 `temporarily_unavailable`: shed at the admission limit.
    Shed,
    /// 429: the caller over its policy rate limit.
    RateLimited,
}

/// The requests, the TLS configuration and the idle connections of one load generator.
pub struct Wire {
    connector: TlsConnector,
    addr: SocketAddr,
    requests: Vec<Vec<u8>>,
    /// `GET` of the service's metadata: the transport alone (`--modes transport`).
    metadata: Vec<u8>,
    idle: Mutex<Vec<Conn<TlsStream<TcpStream>>>>,
}

impl Wire {
    /// A generator that sends `client`'s exchange of each of `tokens` for `scope` to the
    /// service at `base_url` (`https://<ip>:<port>`), authorized as `tts_id`, from the
    /// X509-SVID of `source`.
    ///
    /// # Errors
    /// An address that is not `https://<ip>:<port>`, or a TLS configuration rustls
    /// refuses.
    pub fn new(
        source: &X509Source,
        client: &TxnClient,
        base_url: &str,
        tts_id: SpiffeId,
        tokens: &[String],
        scope: &str,
    ) -> anyhow::Result<Arc<Self>> {
        let host = base_url
            .strip_prefix("https://")
            .context("the service's URL is not https://")?;
        let addr: SocketAddr = host
            .parse()
            .with_context(|| format!("the service's address {host} is not <ip>:<port>"))?;
        let mut config = tls::client_config(source, Authorizer::id(tts_id))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let requests = tokens
            .iter()
            .map(|token| {
                let body = client.form(&TxnRequest::access_token(token.as_str()).scope(scope));
                let mut request = format!(
                    "POST /token HTTP/1.1\r\nhost: {host}\r\n\
                     content-type: application/x-www-form-urlencoded\r\n\
                     content-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                request.extend_from_slice(body.as_bytes());
                request
            })
            .collect();
        let metadata = format!("GET {METADATA_PATH} HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes();
        Ok(Arc::new(Self {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
            requests,
            metadata,
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Sends the exchange of subject token `i` (modulo their number) on an idle
    /// connection, or on a new one when none is idle, and reads its answer; the
    /// connection is idle again afterwards unless the service closed it. Unlike a
    /// pooled HTTP client it never resends: a kept connection the service closed while
    /// idle (after its `idle_timeout`, 60 s by default; the benches' pauses between
    /// cases are seconds) fails the run with that error.
    ///
    /// # Errors
    /// A connection or TLS failure, a malformed or oversized response, or any answer but
    /// a grant, a shed (503) or a rate limit (429).
    pub async fn exchange(&self, i: usize) -> anyhow::Result<Answer> {
        let request = self
            .requests
            .get(i % self.requests.len().max(1))
            .context("no subject tokens")?;
        self.send(request, classify).await
    }

    /// Gets the service's metadata (`/.well-known/oauth-authorization-server`) as
    /// [`Wire::exchange`] sends an exchange: the same connections, TLS and HTTP/1.1,
    /// and no token verified, signed or audited.
    ///
    /// # Errors
    /// As [`Wire::exchange`]; any answer but a 200 that names the token endpoint.
    pub async fn metadata(&self) -> anyhow::Result<()> {
        self.send(&self.metadata, check_metadata).await
    }

    /// Sends `request` on an idle connection, or a new one, and reads its answer with
    /// `read`.
    async fn send<T>(
        &self,
        request: &[u8],
        read: impl FnOnce(u16, &[u8]) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        let (status, body) = conn.round_trip(request).await?;
        let answer = read(status, body)?;
        if conn.open
            && let Ok(mut idle) = self.idle.lock()
        {
            idle.push(conn);
        }
        Ok(answer)
    }

    async fn connect(&self) -> anyhow::Result<Conn<TlsStream<TcpStream>>> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("the mTLS handshake with the token service")?;
        Ok(Conn::new(tls))
    }
}

/// One keep-alive connection, one request at a time.
struct Conn<S> {
    tls: S,
    buf: Vec<u8>,
    /// False once the service said `connection: close`.
    open: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(tls: S) -> Self {
        Self {
            tls,
            buf: Vec::with_capacity(4096),
            open: true,
        }
    }

    /// Writes `request` and reads one response: its status and body.
    async fn round_trip(&mut self, request: &[u8]) -> anyhow::Result<(u16, &[u8])> {
        self.tls.write_all(request).await.context("sending")?;
        self.tls.flush().await.context("sending")?;
        self.buf.clear();
        let (head, status, length) = loop {
            self.fill().await?;
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.buf).context("a malformed response")? {
                httparse::Status::Partial => {
                    anyhow::ensure!(
                        self.buf.len() <= MAX_HEAD_BYTES,
                        "a response head over {MAX_HEAD_BYTES} bytes"
                    );
                }
                httparse::Status::Complete(head) => {
                    let status = response.code.context("a response without a status")?;
                    let mut length = None;
                    for header in response.headers.iter() {
                        if header.name.eq_ignore_ascii_case("content-length") {
                            let text = std::str::from_utf8(header.value).unwrap_or("");
                            length = Some(
                                text.trim()
                                    .parse::<usize>()
                                    .context("a response with an unreadable content-length")?,
                            );
                        } else if header.name.eq_ignore_ascii_case("connection")
                            && header.value.eq_ignore_ascii_case(b"close")
                        {
                            self.open = false;
                        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                            anyhow::bail!("a response with transfer-encoding (not sent by Writ)");
                        }
                    }
                    let length = length.context("a response without content-length")?;
                    anyhow::ensure!(
                        length <= MAX_BODY_BYTES,
                        "a response body of {length} bytes (over {MAX_BODY_BYTES})"
                    );
                    break (head, status, length);
                }
            }
        };
        while self.buf.len() < head + length {
            self.fill().await?;
        }
        anyhow::ensure!(
            self.buf.len() == head + length,
            "bytes after the response to the only request in flight"
        );
        Ok((status, self.buf.get(head..).unwrap_or_default()))
    }

    /// Reads what the connection has into the buffer; fails at its end.
    async fn fill(&mut self) -> anyhow::Result<()> {
        self.buf.reserve(4096);
        let n = self
            .tls
            .read_buf(&mut self.buf)
            .await
            .context("receiving")?;
        anyhow::ensure!(n > 0, "the service closed the connection before answering");
        Ok(())
    }
}

/// What a status and body come to; an error for anything but a grant, a shed or a rate
/// limit.
fn classify(status: u16, body: &[u8]) -> anyhow::Result<Answer> {
    const TOKEN: &[u8] = b"\"access_token\":\"";
    match status {
        200 => match position(body, TOKEN).and_then(|at| body.get(at + TOKEN.len())) {
            Some(b) if *b != b'"' => Ok(Answer::Granted),
            _ => anyhow::bail!("a 200 without an access_token"),
        },
        503 if contains(body, b"temporarily_unavailable") => Ok(Answer::Shed),
        429 => Ok(Answer::RateLimited),
        _ => {
            let text = String::from_utf8_lossy(body);
            anyhow::bail!(
                "the exchange failed with HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )
        }
    }
}

/// A metadata answer: a 200 that names the token endpoint, or an error.
fn check_metadata(status: u16, body: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        status == 200 && contains(body, b"\"token_endpoint\""),
        "the metadata request got HTTP {status} without a token_endpoint"
    );
    Ok(())
}

/// Where `needle` first starts in `body`.
fn position(body: &[u8], needle: &[u8]) -> Option<usize> {
    body.windows(needle.len()).position(|w| w == needle)
}

fn contains(body: &[u8], needle: &[u8]) -> bool {
    position(body, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The response `reply` gets, read by a connection over an in-memory pipe.
    async fn read(reply: &[u8]) -> anyhow::Result<(u16, Vec<u8>, bool)> {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let reply = reply.to_vec();
        let server = tokio::spawn(async move {
            let mut request = [0_u8; 64];
            let n = theirs.read(&mut request).await?;
            assert_eq!(&request[..n], b"POST /token");
            theirs.write_all(&reply).await?;
            // The end of the stream: what a server that stops there leaves.
            drop(theirs);
            std::io::Result::Ok(())
        });
        let mut conn = Conn::new(ours);
        let result = conn
            .round_trip(b"POST /token")
            .await
            .map(|(status, body)| (status, body.to_vec()));
        server.await??;
        result.map(|(status, body)| (status, body, conn.open))
    }

    #[tokio::test]
    async fn responses_are_read_to_their_length_and_garbage_is_an_error() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(read(ok).await.unwrap(), (200, b"hello".to_vec(), true));
        let close =
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read(close).await.unwrap(), (503, Vec::new(), false));
        for (reply, says) in [
            (&b"garbage\r\n\r\n"[..], "malformed"),
            (b"HTTP/1.1 200 OK\r\n\r\nbody", "without content-length"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
                "unreadable content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 999999999\r\n\r\n",
                "over",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "transfer-encoding",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
                "closed the connection",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nab",
                "bytes after",
            ),
            (b"HTTP/1.1 200 OK\r\n", "closed the connection"),
            (b"", "closed the connection"),
        ] {
            let error = read(reply).await.unwrap_err();
            assert!(
                format!("{error:#}").contains(says),
                "{:?}: {error:#}",
                String::from_utf8_lossy(reply)
            );
        }
        // A head that never ends is cut off at its limit, not read forever.
        let mut endless = b"HTTP/1.1 200 OK\r\nx-filler: ".to_vec();
        endless.resize(2 * MAX_HEAD_BYTES, b'a');
        let error = read(&endless).await.unwrap_err();
        assert!(format!("{error:#}").contains("head over"), "{error:#}");
    }

    #[test]
    fn answers_are_classified_and_anything_else_fails() {
        let granted = br#"{"access_token":"eyJ.a.b","issued_token_type":"urn:ietf:params:oauth:token-type:txn_token"}"#;
        assert_eq!(classify(200, granted).unwrap(), Answer::Granted);
        assert!(classify(200, br#"{"access_token":""}"#).is_err());
        assert!(classify(200, b"{}").is_err());
        assert!(classify(200, b"").is_err());
        let shed = br#"{"error":"temporarily_unavailable"}"#;
        assert_eq!(classify(503, shed).unwrap(), Answer::Shed);
        assert!(classify(503, br#"{"error":"server_error"}"#).is_err());
        assert_eq!(classify(429, b"").unwrap(), Answer::RateLimited);
        let refused = classify(400, br#"{"error":"invalid_request"}"#).unwrap_err();
        assert!(refused.to_string().contains("HTTP 400"), "{refused}");
        assert!(refused.to_string().contains("invalid_request"), "{refused}");
        // The transport case's metadata answer.
        assert!(check_metadata(200, br#"{"issuer":"x","token_endpoint":"x/token"}"#).is_ok());
        for (status, body) in [(200, &b"{}"[..]), (200, b""), (404, b"\"token_endpoint\"")] {
            let error = check_metadata(status, body).unwrap_err().to_string();
            assert!(error.contains(&format!("HTTP {status}")), "{error}");
        }
        // Garbage is reported, not a panic, however long.
        let long = vec![0xff_u8; 10_000];
        let message = classify(500, &long).unwrap_err().to_string();
        assert!(message.len() < 1_000, "{}", message.len());
    }
}
