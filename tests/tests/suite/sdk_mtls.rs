//! The SDK's SPIFFE mTLS end to end (issue 5): workloads that get their X509-SVIDs from
//! a real Writ server and agent serve and call each other with `writ_sdk::tls`,
//! `writ_sdk::listener` and `writ_sdk::middleware`.
//!
//! Every identity is registered for `unix:uid:<uid>`, so this one process holds all of
//! them and each side picks its SVID by SPIFFE ID.
//!
//! - The refusal tests check each bad client at the handshake: the request fails, the
//!   server's handshake-failure hook reports why (the verifier's own words, so a chain
//!   refused for the wrong reason does not pass), and the handler never ran.
//! - The expired X509-SVID is minted by the stack's own CA (`stack.server.ca`) with a
//!   one-second lifetime, so it has a valid chain to the real trust domain and only its
//!   `notAfter` is wrong. The CA reads the stack's system clock, so the test waits (at
//!   most two seconds, bounded) for it to lapse rather than run a second server on a
//!   manual clock.
//! - The certificate that is not an SVID (a DNS SAN only) is self-signed: the test-util
//!   API does not expose the CA's private key and the CA only signs SVIDs. The server's
//!   error shows that it is refused by the SVID leaf rule (no URI SAN), which is checked
//!   before the chain, so the signer would not change the outcome.
//! - The rotation test runs the stack with four-second X509-SVIDs (what the other
//!   rotation suites use; the agent renews at about half-life) and keeps traffic going
//!   until the first client SVID has expired.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use writ_identity::clock::{Clock, SystemClock};
use writ_identity::key_manager::{PrivateKey, sha256};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::svid::x509::X509Svid;
use writ_identity::tls::SpiffeServerVerifier;
use writ_sdk::listener::{self, Peer, TlsListener};
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::txn_token::{Actor, HEADER, TxnToken, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_tests::{Stack, uid_selector};
use writ_txn_service::txn_token::{Minter, SigningKeys};

const TD: &str = "example.org";
const SERVER: &str = "/svc/server";
const CLIENT: &str = "/svc/client";
const INTRUDER: &str = "/svc/intruder";
const GATEWAY: &str = "/svc/gateway";
const HOUR: Duration = Duration::from_secs(3600);
/// How long a test waits for something that should happen at once.
const PROMPTLY: Duration = Duration::from_secs(5);

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}{path}")).unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn leaf_sha256(svid: &X509Svid) -> String {
    hex(&sha256(&svid.cert_chain[0]))
}

/// An error and all its sources, for matching on the words of the innermost one.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        text.push_str(": ");
        text.push_str(&source.to_string());
        next = source.source();
    }
    text
}

/// A stack with `paths` registered for this process.
async fn stack_with(x509_ttl: Duration, paths: &[&str]) -> Stack {
    let stack = Stack::start(x509_ttl).await;
    for path in paths {
        stack.register(path, &[&uid_selector()]).await;
    }
    stack
}

async fn source(stack: &Stack, path: &str) -> X509Source {
    X509Source::builder()
        .endpoint(stack.endpoint())
        .spiffe_id(id(path))
        .build()
        .await
        .unwrap()
}

/// How a reqwest client treats connections.
#[derive(Clone, Copy)]
enum Pool {
    /// Keeps one connection alive and reuses it.
    KeepAlive,
    /// Opens a new connection (a full handshake) for every request.
    Fresh,
}

/// A reqwest client over `config`, speaking HTTP/1.1, reporting the server's leaf.
fn https_client(mut config: rustls::ClientConfig, pool: Pool) -> reqwest::Client {
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let builder = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .tls_info(true);
    match pool {
        Pool::KeepAlive => builder,
        Pool::Fresh => builder.pool_max_idle_per_host(0),
    }
    .build()
    .unwrap()
}

/// The SDK's client: presents `source`'s SVID, accepts only `server`.
fn sdk_client(source: &X509Source, server: SpiffeId, pool: Pool) -> reqwest::Client {
    https_client(
        tls::client_config(source, Authorizer::id(server)).unwrap(),
        pool,
    )
}

/// A client that presents `chain` and `key`, whatever they are, and verifies the server
/// as the SDK does (its SVID against `trusting`'s bundles, exactly `/svc/server`).
fn client_presenting(
    trusting: &X509Source,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> reqwest::Client {
    let server = id(SERVER);
    let verifier = SpiffeServerVerifier::new(
        trusting.bundle_source(),
        Arc::new(move |peer: &SpiffeId| *peer == server),
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(verifier)
    .with_client_auth_cert(chain, key)
    .unwrap();
    https_client(config, Pool::Fresh)
}

/// An SVID's chain and key as rustls takes them.
fn rustls_parts(svid: &X509Svid) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let chain = svid
        .cert_chain
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = svid.private_key.as_ref().expect("the SVID's key");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
    (chain, key)
}

/// Leaf parameters that satisfy every X509-SVID leaf rule but the SAN, which is `san`.
fn leaf_params(san: SanType) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

fn rcgen_key(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(key.serialize_der().into())
}

/// A well-formed X509-SVID for `spiffe://other.org/svc/client`, chained to a CA of
/// `other.org` (which `example.org` does not federate with).
fn foreign_svid() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.subject_alt_names = vec![SanType::URI("spiffe://other.org".try_into().unwrap())];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params(SanType::URI(
        "spiffe://other.org/svc/client".try_into().unwrap(),
    ))
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    (
        vec![leaf.der().clone(), ca_cert.der().clone()],
        rcgen_key(&leaf_key),
    )
}

/// A self-signed certificate with a DNS SAN and no URI SAN: not an X509-SVID.
fn dns_only_cert() -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params(SanType::DnsName("client.example.org".try_into().unwrap()))
        .self_signed(&key)
        .unwrap();
    (vec![cert.der().clone()], rcgen_key(&key))
}

/// An axum app whose handler records and echoes the caller's `Peer`, served on a
/// `TlsListener` exactly as `listener::serve` does but with a failure hook, so failed
/// handshakes are reported on a channel (the Txn-Token test uses `listener::serve`).
struct Echo {
    url: String,
    seen: Arc<Mutex<Vec<Peer>>>,
    refused: mpsc::UnboundedReceiver<String>,
}

async fn echo(
    State(seen): State<Arc<Mutex<Vec<Peer>>>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> Json<Value> {
    seen.lock().unwrap().push(peer.clone());
    Json(json!({
        "id": peer.id.map(|id| id.to_string()),
        "cert": peer.cert_sha256.map(|c| hex(&c)),
        "port": peer.addr.port(),
    }))
}

impl Echo {
    /// Serves as `source` and lets in the clients `clients` authorizes.
    async fn start(source: &X509Source, clients: Authorizer) -> Self {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/", tcp.local_addr().unwrap());
        let (report, refused) = mpsc::unbounded_channel();
        let listener = TlsListener::with_failure_hook(
            tcp,
            tls::server_config(source, clients).unwrap(),
            Arc::new(move |_, e| {
                let _ = report.send(error_chain(e));
            }),
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().route("/", get(echo)).with_state(seen.clone());
        tokio::spawn(async move {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .await
                .unwrap();
        });
        Self { url, seen, refused }
    }

    fn seen(&self) -> Vec<Peer> {
        self.seen.lock().unwrap().clone()
    }

    async fn get(&self, client: &reqwest::Client) -> reqwest::Result<reqwest::Response> {
        client.get(&self.url).send().await
    }

    /// The next failed handshake's error.
    async fn next_refusal(&mut self) -> String {
        tokio::time::timeout(PROMPTLY, self.refused.recv())
            .await
            .expect("the server reported no failed handshake")
            .unwrap()
    }

    /// Asserts that `client`'s request fails at the handshake, that the server refused
    /// it saying `reason`, and that the handler did not run.
    async fn assert_refused(&mut self, client: &reqwest::Client, reason: &str) {
        let before = self.seen().len();
        let result = self.get(client).await;
        assert!(result.is_err(), "the request went through: {result:?}");
        let refusal = self.next_refusal().await;
        assert!(
            refusal.contains(reason),
            "the server refused for another reason: {refusal}"
        );
        assert_eq!(self.seen().len(), before, "the handler ran");
    }
}

/// The stack, the client's source and an echo server (`/svc/server`) that lets exactly
/// `/svc/client` in.
struct Mesh {
    stack: Stack,
    server: X509Source,
    client: X509Source,
    echo: Echo,
}

impl Mesh {
    async fn start() -> Self {
        let stack = stack_with(HOUR, &[SERVER, CLIENT, INTRUDER]).await;
        let server = source(&stack, SERVER).await;
        let client = source(&stack, CLIENT).await;
        let echo = Echo::start(&server, Authorizer::id(id(CLIENT))).await;
        Self {
            stack,
            server,
            client,
            echo,
        }
    }

    /// A client presenting `chain` and `key`, verifying the server as the SDK does.
    fn presenting(
        &self,
        (chain, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ) -> reqwest::Client {
        client_presenting(&self.client, chain, key)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorized_client_connects_and_the_handler_sees_its_svid() {
    let mesh = Mesh::start().await;
    let expected = json!({
        "id": id(CLIENT).to_string(),
        "cert": leaf_sha256(&mesh.client.svid()),
    });
    let check = |body: Value| {
        assert_eq!(body["id"], expected["id"], "{body}");
        assert_eq!(body["cert"], expected["cert"], "{body}");
    };

    let response = mesh
        .echo
        .get(&sdk_client(&mesh.client, id(SERVER), Pool::Fresh))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let server_leaf = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(|der| hex(&sha256(der)));
    assert_eq!(server_leaf, Some(leaf_sha256(&mesh.server.svid())));
    check(response.json().await.unwrap());

    // The hand-built client the refusal tests use gets in with the real SVID: what
    // refuses them is their certificate, not the way they connect.
    let response = mesh
        .echo
        .get(&mesh.presenting(rustls_parts(&mesh.client.svid())))
        .await
        .unwrap();
    check(response.json().await.unwrap());

    let seen = mesh.echo.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|p| p.id == Some(id(CLIENT))), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_another_workload_of_its_trust_domain() {
    let mut mesh = Mesh::start().await;
    let intruder = source(&mesh.stack, INTRUDER).await;
    mesh.echo
        .assert_refused(
            &sdk_client(&intruder, id(SERVER), Pool::Fresh),
            "peer spiffe://example.org/svc/intruder is not authorized",
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_its_authorizer_does_not_accept() {
    let mut mesh = Mesh::start().await;
    let client = sdk_client(&mesh.client, id("/svc/elsewhere"), Pool::Fresh);
    let err = mesh.echo.get(&client).await.unwrap_err();
    let err = error_chain(&err);
    assert!(
        err.contains("peer spiffe://example.org/svc/server is not authorized"),
        "{err}"
    );
    // The server only learns that the client gave up.
    let refusal = mesh.echo.next_refusal().await;
    assert!(refusal.contains("alert"), "{refusal}");
    assert!(mesh.echo.seen().is_empty(), "the handler ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_an_svid_of_another_trust_domain() {
    let mut mesh = Mesh::start().await;
    let client = mesh.presenting(foreign_svid());
    mesh.echo.assert_refused(&client, "UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_an_expired_svid_from_the_trust_domain_ca() {
    let mut mesh = Mesh::start().await;
    let expired = mesh
        .stack
        .server
        .ca
        .mint_x509_svid(&id(CLIENT), Some(Duration::from_secs(1)), &[])
        .unwrap();
    // Certificate times are whole seconds and expired means strictly after notAfter.
    let lapsed = expired.expires_at + Duration::from_secs(1);
    let wait = lapsed.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(wait <= Duration::from_secs(2), "minted for {wait:?}");
    // Until the computed instant it has lapsed: the TLS verifier reads the wall clock,
    // which the stack's CA (on `SystemClock`) minted it by.
    tokio::time::sleep(wait).await;
    let client = mesh.presenting(rustls_parts(&expired));
    mesh.echo
        .assert_refused(&client, "certificate expired")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_a_certificate_that_is_not_an_svid() {
    let mut mesh = Mesh::start().await;
    let client = mesh.presenting(dns_only_cert());
    mesh.echo
        .assert_refused(&client, "leaf must have exactly one URI SAN, found 0")
        .await;
}

/// `Authorizer::any()` is go-spiffe's `AuthorizeAny`: every workload whose X509-SVID
/// verifies gets in, whatever its SPIFFE ID, and a certificate that does not chain to a
/// trusted bundle, or is not an SVID, still does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizer_any_admits_every_verified_svid_and_nothing_else() {
    let stack = stack_with(HOUR, &[SERVER, CLIENT, INTRUDER]).await;
    let server = source(&stack, SERVER).await;
    let mut echo = Echo::start(&server, Authorizer::any()).await;
    for path in [CLIENT, INTRUDER] {
        let client = source(&stack, path).await;
        let response = echo
            .get(&sdk_client(&client, id(SERVER), Pool::Fresh))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["id"], id(path).to_string(), "{body}");
    }
    let trusting = source(&stack, CLIENT).await;
    let (chain, key) = foreign_svid();
    echo.assert_refused(&client_presenting(&trusting, chain, key), "UnknownIssuer")
        .await;
    let (chain, key) = dns_only_cert();
    echo.assert_refused(
        &client_presenting(&trusting, chain, key),
        "leaf must have exactly one URI SAN, found 0",
    )
    .await;
}

/// What one request through the echo server showed: the client leaf the server saw,
/// the client port, and the server leaf the client saw.
struct RoundTrip {
    client_cert: String,
    port: u16,
    server_cert: String,
}

async fn round_trip(echo: &Echo, client: &reqwest::Client, what: &str) -> RoundTrip {
    let response = echo
        .get(client)
        .await
        .unwrap_or_else(|e| panic!("{what} request failed: {}", error_chain(&e)));
    assert_eq!(response.status(), StatusCode::OK, "{what}");
    let server_cert = hex(&sha256(
        response
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|info| info.peer_certificate())
            .expect("the server's leaf"),
    ));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["id"], id(CLIENT).to_string(), "{what}: {body}");
    RoundTrip {
        client_cert: body["cert"].as_str().unwrap().to_owned(),
        port: u16::try_from(body["port"].as_u64().unwrap()).unwrap(),
        server_cert,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svids_rotate_under_traffic_without_a_failed_request() {
    let stack = stack_with(Duration::from_secs(4), &[SERVER, CLIENT]).await;
    let server = source(&stack, SERVER).await;
    let client = source(&stack, CLIENT).await;
    let mut server_updates = server.updated();
    let echo = Echo::start(&server, Authorizer::id(id(CLIENT))).await;

    // One connection opened now and kept alive across the rotation.
    let kept = sdk_client(&client, id(SERVER), Pool::KeepAlive);
    let first_svid = client.svid();
    let opened = round_trip(&echo, &kept, "kept-alive").await;
    assert_eq!(opened.client_cert, leaf_sha256(&first_svid));

    // Fresh connections (full handshakes) and the kept one, until the SVID the kept
    // connection authenticated with has expired and both sides have rotated.
    let fresh = sdk_client(&client, id(SERVER), Pool::Fresh);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut client_certs = BTreeSet::new();
    let mut server_certs = BTreeSet::new();
    let mut issued = BTreeSet::from([leaf_sha256(&first_svid)]);
    let mut kept_after_expiry = 0;
    loop {
        let new = round_trip(&echo, &fresh, "fresh-connection").await;
        assert_ne!(
            new.port, opened.port,
            "a fresh request reused the kept connection"
        );
        // Whole seconds, and expired means strictly after notAfter: one second of margin.
        assert!(
            new.client_cert != opened.client_cert
                || SystemTime::now() <= first_svid.expires_at + Duration::from_secs(1),
            "a new connection was accepted on the first client SVID after it expired \
             (a resumed TLS session skips the verifier)"
        );
        client_certs.insert(new.client_cert);
        server_certs.insert(new.server_cert);
        issued.insert(leaf_sha256(&client.svid()));

        let again = round_trip(&echo, &kept, "kept-alive").await;
        assert_eq!(
            again.port, opened.port,
            "the kept-alive connection was replaced"
        );
        assert_eq!(again.client_cert, opened.client_cert);
        assert_eq!(again.server_cert, opened.server_cert);
        if SystemTime::now() > first_svid.expires_at {
            kept_after_expiry += 1;
        }

        if kept_after_expiry > 0 && client_certs.len() >= 2 && server_certs.len() >= 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rotation seen in 30 s: {} client and {} server certificates",
            client_certs.len(),
            server_certs.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What the server saw on new connections is what the agent issued to the client.
    issued.insert(leaf_sha256(&client.svid()));
    assert!(
        client_certs.is_subset(&issued),
        "{client_certs:?} not among {issued:?}"
    );
    // The server's source reported its rotation.
    tokio::time::timeout(PROMPTLY, server_updates.changed())
        .await
        .unwrap()
        .unwrap();
}

/// The claims of a Txn-Token for alice, requested by `req_wl`, acting as `act`.
fn claims(req_wl: &str, act: Option<Actor>, scope: &str) -> TxnToken {
    let now = SystemClock.unix_seconds();
    TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: "00000000-0000-4000-8000-000000000005".into(),
        sub: "alice".into(),
        scope: scope.into(),
        req_wl: id(req_wl).to_string(),
        tctx: None,
        rctx: None,
        act,
    }
}

/// `token` with its claims changed to `scope`, the signature kept.
fn tampered(token: &str, scope: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["scope"] = scope.into();
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap());
    format!("{}.{payload}.{}", parts[0], parts[2])
}

/// Calls the protected route; the status and the JSON body.
async fn call(url: &str, client: &reqwest::Client, token: Option<&str>) -> (StatusCode, Value) {
    let mut request = client.get(url);
    if let Some(token) = token {
        request = request.header(HEADER, token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

#[track_caller]
fn assert_rejected((status, body): (StatusCode, Value), expected: StatusCode, error: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["error"], error, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_layer_behind_the_listener_checks_caller_and_token() {
    const OTHER: &str = "/svc/other";
    let stack = stack_with(HOUR, &[SERVER, CLIENT, OTHER]).await;
    let server = source(&stack, SERVER).await;
    let keys = SigningKeys::single(
        Minter::new(PrivateKey::generate().unwrap()).unwrap(),
        Arc::new(SystemClock),
    );
    let policy = TxnPolicy::new(Authorizer::id(id(CLIENT)))
        .require_scope("read")
        .strict_chain();
    let app = Router::new()
        .route(
            "/orders",
            get(|v: Verified| async move {
                Json(json!({ "caller": v.caller.to_string(), "sub": v.txn.sub, "chain": v.txn.chain() }))
            }),
        )
        .layer(TxnLayer::new(TxnVerifier::new(TD.parse().unwrap(), keys.public_keys()), policy));
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/orders", tcp.local_addr().unwrap());
    // The listener lets the whole trust domain in; the policy narrows it.
    let td = id(SERVER).trust_domain();
    tokio::spawn(async move {
        listener::serve(
            app,
            &server,
            Authorizer::member_of(td),
            tcp,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    let client = sdk_client(&source(&stack, CLIENT).await, id(SERVER), Pool::KeepAlive);
    let other = sdk_client(&source(&stack, OTHER).await, id(SERVER), Pool::KeepAlive);
    let mint = |c: TxnToken| keys.mint(&c).unwrap();

    // The caller is the requesting workload of an undelegated token.
    let own = mint(claims(CLIENT, None, "read write"));
    let (status, body) = call(&url, &client, Some(&own)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({ "caller": id(CLIENT).to_string(), "sub": "alice", "chain": [] })
    );
    // The caller is the current actor of a delegated token.
    let delegated = mint(claims(
        GATEWAY,
        Some(Actor::new(id(CLIENT).to_string()).acting_for(Actor::new(id(GATEWAY).to_string()))),
        "read",
    ));
    let (status, body) = call(&url, &client, Some(&delegated)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["chain"],
        json!([id(CLIENT).to_string(), id(GATEWAY).to_string()])
    );

    assert_rejected(
        call(&url, &client, None).await,
        StatusCode::UNAUTHORIZED,
        "missing_txn_token",
    );
    assert_rejected(
        call(&url, &client, Some(&tampered(&own, "read write admin"))).await,
        StatusCode::UNAUTHORIZED,
        "invalid_txn_token",
    );
    assert_rejected(
        call(&url, &other, Some(&mint(claims(OTHER, None, "read")))).await,
        StatusCode::FORBIDDEN,
        "caller_not_allowed",
    );
    // A valid token whose current actor is the gateway, replayed by the client.
    assert_rejected(
        call(&url, &client, Some(&mint(claims(GATEWAY, None, "read")))).await,
        StatusCode::FORBIDDEN,
        "not_current_actor",
    );
    assert_rejected(
        call(&url, &client, Some(&mint(claims(CLIENT, None, "write")))).await,
        StatusCode::FORBIDDEN,
        "insufficient_scope",
    );
}
