//! A real TTS (identity server, agent, development OIDC issuer) and the clients that try
//! to hold its connections hostage: silent TCP connections, TLS connections that trickle
//! their header, and a legitimate caller that exchanges a token. Shared by
//! `tests/suite/hostage.rs` and `benches/hostage.rs`.
#![expect(
    dead_code,
    reason = "shared by a test file and a bench, each using a part"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use writ_cli::dev::issuer::{DEV_AUDIENCE, DevIssuer};
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::tls::Authorizer;
use writ_sdk::workload::X509Source;
use writ_tests::{Stack, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::IssuerConfig;

pub(crate) const TD: &str = "example.org";
pub(crate) const GATEWAY: &str = "/gateway";

pub(crate) struct Hostage {
    pub(crate) stack: Stack,
    pub(crate) server: TxnServer,
    pub(crate) issuer: DevIssuer,
    pub(crate) source: X509Source,
    pub(crate) url: String,
}

impl Hostage {
    /// A TTS whose `[connections]` table is `connections` (TOML lines).
    pub(crate) async fn start(connections: &str) -> Self {
        let stack = Stack::start(Duration::from_secs(3600)).await;
        for path in ["/tts", GATEWAY] {
            stack.register(path, &[&uid_selector()]).await;
        }
        let issuer = DevIssuer::start(
            &stack.dir.path().join("oidc-key.pem"),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let toml = format!(
            r#"
listen = "127.0.0.1:0"
workload_api = "{}"
spiffe_id = "spiffe://{TD}/tts"
audit_log = "{}"

[connections]
{connections}

[[policy.caller]]
id = "spiffe://{TD}{GATEWAY}"
subject_token_types = ["access_token"]
max_scope = ["read"]
"#,
            stack.endpoint(),
            stack.dir.path().join("audit.log").display(),
        );
        let mut config = TxnConfig::from_toml(&toml, stack.dir.path()).unwrap();
        config.oidc = vec![IssuerConfig::new(issuer.url(), [DEV_AUDIENCE])];
        config.accept_dev_tokens = true;
        let server = TxnServer::start(config).await.unwrap();
        let url = format!("https://{}", server.addr);
        let source = X509Source::builder()
            .endpoint(stack.endpoint())
            .spiffe_id(SpiffeId::new(&format!("spiffe://{TD}{GATEWAY}")).unwrap())
            .build()
            .await
            .unwrap();
        Self {
            stack,
            server,
            issuer,
            source,
            url,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// One legitimate exchange on a new connection (a full mTLS handshake).
    pub(crate) async fn exchange(&self, user: &str) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = self
            .issuer
            .access_token(user, "read", Duration::from_secs(300), now as i64)
            .unwrap();
        let client = TxnClient::new(
            &self.source,
            &self.url,
            SpiffeId::new(&format!("spiffe://{TD}/tts")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        client
            .exchange(TxnRequest::access_token(token).scope("read"))
            .await
            .map(|issued| issued.access_token)
            .map_err(|e| e.to_string())
    }

    /// A TLS client (presenting the gateway's SVID) speaking HTTP/1.1 only.
    pub(crate) fn connector(&self) -> TlsConnector {
        let td = writ_identity::spiffe_id::TrustDomain::new(TD).unwrap();
        let mut config =
            writ_sdk::tls::client_config(&self.source, Authorizer::member_of(td)).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsConnector::from(Arc::new(config))
    }

    /// A TLS connection from `from`, handshake done.
    pub(crate) async fn tls_from(&self, from: IpAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = tcp_from(from, self.addr()).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        self.connector().connect(name, tcp).await
    }
}

/// A TCP connection to `to` from the loopback address `from` (any of 127.0.0.0/8).
pub(crate) async fn tcp_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Reads until the peer closes (end of stream or a reset); returns what was read.
pub(crate) async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends the start of a request, then one more header byte every `every` until the
/// server closes the connection (or `max` bytes went out).
pub(crate) async fn trickle_header<S: tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    every: Duration,
    max: usize,
) {
    if stream
        .write_all(b"POST /token HTTP/1.1\r\nHost: tts\r\nX-Slow: ")
        .await
        .is_err()
    {
        return;
    }
    for _ in 0..max {
        // Intentional: a slowloris peer is slow on purpose, one byte every `every`.
        tokio::time::sleep(every).await;
        if stream.write_all(b"a").await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}
