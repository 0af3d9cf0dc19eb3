//! Sender-constrained hops: a Txn-Token copied by a third party is refused by
//! `TxnLayer::with_proof`, with and without mTLS on the hop; garbage WIT/WPT headers are
//! refused clearly; and an ordinary JWT library (PyJWT) verifies the WIT and WPT the SDK
//! makes (skipped without Python, unless `WRIT_REQUIRE_ALL=1`).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::bundle::BundleSet;
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::{Clock as _, ManualClock, SharedClock};
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::svid::wit::{self, WitBundles, WitKey};
use writ_sdk::listener::Peer;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_sdk::wpt::{WIT_HEADER, WPT_HEADER, WitSvid, WptVerifier, token_hash};
use writ_sdk::{SpiffeId, TrustDomain};
use writ_tests::available;
use writ_tests::python::python;
use writ_txn_service::txn_token::{Minter, SigningKeys};

const TD: &str = "example.org";
const AGENT: &str = "spiffe://example.org/agents/planner";
const THIEF: &str = "spiffe://example.org/agents/thief";
const BASE: &str = "https://orders.internal";

/// A trust domain's CA (for WIT-SVIDs), a Txn-Token minter, and their shared clock.
struct World {
    ca: CertificateAuthority,
    keys: SigningKeys,
    clock: ManualClock,
}

impl World {
    async fn new(start: SystemTime) -> Self {
        let clock = ManualClock::new(start);
        let shared: SharedClock = Arc::new(clock.clone());
        let store = SqliteStore::open_in_memory().await.unwrap();
        let ca = CertificateAuthority::load(
            CaConfig::new(TrustDomain::new(TD).unwrap()),
            shared.clone(),
            Arc::new(MemoryKeyManager::new()),
            Arc::new(store),
        )
        .await
        .unwrap();
        let keys = SigningKeys::single(
            Minter::new(PrivateKey::generate().unwrap()).unwrap(),
            shared,
        );
        Self { ca, keys, clock }
    }

    fn wit_bundles(&self) -> WitBundles {
        WitBundles::from_bundles(&BundleSet::of((*self.ca.bundle()).clone()))
    }

    /// A WIT-SVID for `id`, as the agent hands it to the workload.
    fn svid(&self, id: &str) -> WitSvid {
        let key = WitKey::generate().unwrap();
        let (token, _) = self
            .ca
            .sign_wit_svid(&SpiffeId::new(id).unwrap(), key.public_jwk(), None)
            .unwrap();
        WitSvid::new(token, &key.to_jwk()).unwrap()
    }

    /// A Txn-Token whose current actor is `AGENT`.
    fn txn_token(&self, txn: &str) -> String {
        let now = self.clock.unix_seconds();
        self.keys
            .mint(&TxnToken {
                iss: "https://tts.example.org".into(),
                iat: now,
                exp: now + 300,
                aud: TD.into(),
                txn: txn.into(),
                sub: "alice".into(),
                scope: "orders.read".into(),
                req_wl: AGENT.into(),
                tctx: None,
                rctx: None,
                act: None,
            })
            .unwrap()
    }

    fn app(&self, policy: TxnPolicy) -> Router {
        let jwks = Jwks::parse(self.keys.jwks().to_string().as_bytes()).unwrap();
        let verifier = TxnVerifier::builder(TD.parse().unwrap(), JwksSource::Keys(jwks))
            .clock(Arc::new(self.clock.clone()))
            .build();
        let proof =
            WptVerifier::new(self.wit_bundles(), BASE).with_clock(Arc::new(self.clock.clone()));
        Router::new()
            .route(
                "/orders",
                get(|v: Verified| async move { v.caller.to_string() }),
            )
            .layer(TxnLayer::new(verifier, policy).with_proof(proof))
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }
}

fn policy() -> TxnPolicy {
    TxnPolicy::new(Authorizer::member_of(TrustDomain::new(TD).unwrap()))
}

fn peer(id: &str) -> Peer {
    Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        id: Some(SpiffeId::new(id).unwrap()),
        cert_sha256: Some([0; 32]),
    }
}

/// GET /orders with `headers`, over mTLS as `peer` if given.
async fn call(
    app: &Router,
    peer: Option<Peer>,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut request = Request::get("/orders?page=2");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut request = request.body(Body::empty()).unwrap();
    if let Some(peer) = peer {
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
    }
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(body) => (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
            body["error_description"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        Err(_) => (
            status,
            String::new(),
            String::from_utf8_lossy(&bytes).into(),
        ),
    }
}

/// (what, headers, expected status, expected error code).
type Refusal<'a> = (&'a str, Vec<(&'a str, String)>, StatusCode, &'a str);

fn uri() -> String {
    format!("{BASE}/orders?page=2")
}

#[tokio::test]
async fn a_stolen_txn_token_is_useless_without_mtls() {
    let w = World::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000)).await;
    let app = w.app(policy());
    let agent = w.svid(AGENT);
    let thief = w.svid(THIEF);
    let token = w.txn_token("t-1");
    let other_token = w.txn_token("t-2");
    let wpt =
        |svid: &WitSvid, target: &str, txn: &str| svid.proof(target, Some(txn), w.now()).unwrap();

    // The workload the token names, proving itself: accepted, as itself.
    let good = wpt(&agent, &uri(), &token);
    let (status, _, body) = call(
        &app,
        None,
        &[
            ("Txn-Token", &token),
            (WIT_HEADER, agent.token()),
            (WPT_HEADER, &good),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, AGENT));

    let refused: Vec<Refusal<'_>> = vec![
        (
            "the token alone",
            vec![("Txn-Token", token.clone())],
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (
            "the thief's own WIT and WPT",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, thief.token().into()),
                (WPT_HEADER, wpt(&thief, &uri(), &token)),
            ],
            StatusCode::FORBIDDEN,
            "not_current_actor",
        ),
        (
            "a WPT for another token",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, agent.token().into()),
                (WPT_HEADER, wpt(&agent, &uri(), &other_token)),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_proof",
        ),
        (
            "a WPT for another URI",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, agent.token().into()),
                (WPT_HEADER, wpt(&agent, &format!("{BASE}/admin"), &token)),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_proof",
        ),
        (
            "a replayed WPT",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, agent.token().into()),
                (WPT_HEADER, good.clone()),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_proof",
        ),
        (
            "another workload's WIT with the agent's WPT",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, thief.token().into()),
                (WPT_HEADER, wpt(&agent, &uri(), &token)),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_proof",
        ),
        (
            "a WIT without a WPT",
            vec![
                ("Txn-Token", token.clone()),
                (WIT_HEADER, agent.token().into()),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_proof",
        ),
    ];
    for (what, headers, status, code) in refused {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (got, error, description) = call(&app, None, &headers).await;
        assert_eq!(
            (got, error.as_str()),
            (status, code),
            "{what}: {description}"
        );
        assert!(!description.is_empty(), "{what}");
    }

    // An expired WPT (the Txn-Token and WIT are still valid).
    let old = wpt(&agent, &uri(), &token);
    w.clock.advance(Duration::from_secs(31));
    let (status, error, description) = call(
        &app,
        None,
        &[
            ("Txn-Token", &token),
            (WIT_HEADER, agent.token()),
            (WPT_HEADER, &old),
        ],
    )
    .await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_proof")
    );
    assert!(description.contains("expired"), "{description}");
}

#[tokio::test]
async fn a_stolen_txn_token_is_useless_over_mtls() {
    let w = World::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000)).await;
    let app = w.app(policy().strict_chain());
    let agent = w.svid(AGENT);
    let token = w.txn_token("t-1");

    // The caller the token names, by its X509-SVID alone: accepted.
    let (status, _, body) = call(&app, Some(peer(AGENT)), &[("Txn-Token", &token)]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, AGENT));
    // Another workload with the copied token: not the current actor.
    let (status, error, _) = call(&app, Some(peer(THIEF)), &[("Txn-Token", &token)]).await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::FORBIDDEN, "not_current_actor")
    );
    // ... even with a copied WIT and WPT: they must name the connection's peer.
    let wpt = agent.proof(&uri(), Some(&token), w.now()).unwrap();
    let (status, error, description) = call(
        &app,
        Some(peer(THIEF)),
        &[
            ("Txn-Token", &token),
            (WIT_HEADER, agent.token()),
            (WPT_HEADER, &wpt),
        ],
    )
    .await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_proof"),
        "{description}"
    );
}

#[tokio::test]
async fn garbage_wit_and_wpt_headers_are_refused_clearly() {
    let w = World::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000)).await;
    let app = w.app(policy());
    let agent = w.svid(AGENT);
    let token = w.txn_token("t-1");
    let now = w.clock.unix_seconds();
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = b64(json!({
        "aud": format!("{BASE}/orders"), "exp": now + 10, "jti": "j1",
        "wth": token_hash(agent.token()), "tth": token_hash(&token),
    }));
    let good = agent.proof(&uri(), Some(&token), w.now()).unwrap();
    let signature = good.rsplit('.').next().unwrap().to_owned();
    let cases: Vec<(&str, String, String)> = vec![
        ("a huge WPT", agent.token().into(), "a".repeat(64 * 1024)),
        ("a huge WIT", "a".repeat(64 * 1024), good.clone()),
        ("bad base64", agent.token().into(), "%%%.***.!!!".into()),
        ("a WIT in bad base64", "!!.??.##".into(), good.clone()),
        (
            "alg none",
            agent.token().into(),
            format!(
                "{}.{claims}.",
                b64(json!({"alg": "none", "typ": "wpt+jwt"}))
            ),
        ),
        (
            "typ JWT",
            agent.token().into(),
            format!(
                "{}.{claims}.{signature}",
                b64(json!({"alg": "ES256", "typ": "JWT"}))
            ),
        ),
        (
            "alg HS256",
            agent.token().into(),
            format!(
                "{}.{claims}.{signature}",
                b64(json!({"alg": "HS256", "typ": "wpt+jwt"}))
            ),
        ),
        ("a WPT as the WIT", good.clone(), good.clone()),
        ("a Txn-Token as the WIT", token.clone(), good.clone()),
    ];
    for (what, wit_token, wpt) in cases {
        let (status, error, description) = call(
            &app,
            None,
            &[
                ("Txn-Token", &token),
                (WIT_HEADER, &wit_token),
                (WPT_HEADER, &wpt),
            ],
        )
        .await;
        assert_eq!(
            (status, error.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_proof"),
            "{what}: {description}"
        );
        assert!(
            !description.is_empty() && description.len() < 300,
            "{what}: {description}"
        );
    }
    // Two WPT headers.
    let (status, error, _) = call(
        &app,
        None,
        &[
            ("Txn-Token", &token),
            (WIT_HEADER, agent.token()),
            (WPT_HEADER, &good),
            (WPT_HEADER, &good),
        ],
    )
    .await;
    assert_eq!(
        (status, error.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_proof")
    );
    // None of these consumed the good proof: it still works once.
    let (status, _, _) = call(
        &app,
        None,
        &[
            ("Txn-Token", &token),
            (WIT_HEADER, agent.token()),
            (WPT_HEADER, &good),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Verifies a WIT and a WPT with PyJWT alone: the WIT against the WIT bundle JWKS, the WPT
/// against the WIT's `cnf.jwk`, then `aud`, `wth` and `tth`. Reads JSON cases on stdin,
/// prints one line per case: `ok` or the error.
const PY_VERIFY: &str = r#"
import base64, hashlib, json, sys
import jwt

def h(token):
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()

cases = json.load(sys.stdin)
for case in cases:
    try:
        keys = {k["kid"]: k for k in json.loads(case["jwks"])["keys"] if k.get("use") == "wit-svid"}
        wit_header = jwt.get_unverified_header(case["wit"])
        if wit_header.get("typ") != "wit+jwt":
            raise ValueError("WIT typ")
        wit_key = jwt.PyJWK(keys[wit_header["kid"]], algorithm="ES256")
        wit = jwt.decode(case["wit"], wit_key.key, algorithms=["ES256"], options={"require": ["exp", "sub", "cnf"], "verify_aud": False})
        if "aud" in wit:
            raise ValueError("WIT aud")
        wpt_header = jwt.get_unverified_header(case["wpt"])
        if wpt_header.get("typ") != "wpt+jwt" or wpt_header.get("alg") != wit["cnf"]["jwk"]["alg"]:
            raise ValueError("WPT header")
        cnf = jwt.PyJWK(wit["cnf"]["jwk"])
        wpt = jwt.decode(case["wpt"], cnf.key, algorithms=[wit["cnf"]["jwk"]["alg"]], audience=case["aud"], options={"require": ["exp", "jti", "aud"]})
        if wpt["wth"] != h(case["wit"]):
            raise ValueError("wth")
        if wpt["tth"] != h(case["txn"]):
            raise ValueError("tth")
        print("ok " + wit["sub"], flush=True)
    except Exception as e:
        print("refused " + type(e).__name__ + ": " + str(e), flush=True)
"#;

#[tokio::test]
async fn pyjwt_verifies_the_wit_and_the_wpt() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    if !available("Python 3 with PyJWT", py.is_some()) {
        return;
    }
    let py = py.unwrap();
    // PyJWT checks exp against the real clock.
    let w = World::new(SystemTime::now()).await;
    let agent = w.svid(AGENT);
    let thief = w.svid(THIEF);
    let token = w.txn_token("t-1");
    let jwks = wit::bundle_jwks(&w.ca.bundle());
    let aud = format!("{BASE}/orders");
    let wpt = agent.proof(&uri(), Some(&token), w.now()).unwrap();
    let case = |wit: &str, wpt: &str, txn: &str, aud: &str| json!({"jwks": jwks, "wit": wit, "wpt": wpt, "txn": txn, "aud": aud});
    let mut tampered = wpt.clone();
    tampered.pop();
    tampered.push(if wpt.ends_with('A') { 'B' } else { 'A' });
    let cases = [
        ("good", case(agent.token(), &wpt, &token, &aud), true),
        (
            "another token",
            case(agent.token(), &wpt, "other", &aud),
            false,
        ),
        (
            "another aud",
            case(agent.token(), &wpt, &token, &format!("{BASE}/admin")),
            false,
        ),
        (
            "another WIT",
            case(thief.token(), &wpt, &token, &aud),
            false,
        ),
        (
            "tampered",
            case(agent.token(), &tampered, &token, &aud),
            false,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify_wpt.py");
    std::fs::write(&script, PY_VERIFY).unwrap();
    let input = Value::Array(cases.iter().map(|(_, c, _)| c.clone()).collect()).to_string();
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(&py.exe)
            .arg(&script)
            .env("PYTHONPATH", &py.site)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
        let lines: Vec<String> = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map(Result::unwrap)
            .collect();
        child.wait().unwrap();
        lines
    })
    .await
    .unwrap();
    assert_eq!(output.len(), cases.len(), "{output:#?}");
    for ((name, _, ok), line) in cases.iter().zip(&output) {
        assert_eq!(line.starts_with("ok "), *ok, "{name}: {line}");
    }
    assert_eq!(output[0], format!("ok {AGENT}"));
}

/// The SDK's Workload API client gets a WIT-SVID and the WIT bundles from a real agent,
/// and a proof made with them verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_fetches_wit_svids_from_the_agent() {
    use writ_identity::agent::{self, node_api::LocalNode};
    use writ_identity::attest::workload::StaticAttestor;
    use writ_identity::entry::RegistrationEntry;

    let dir = tempfile::tempdir().unwrap();
    let server = writ_tests::server_state(dir.path(), Duration::from_secs(3600)).await;
    let agent_id = SpiffeId::new("spiffe://example.org/writ/agent/test").unwrap();
    let mut entry = RegistrationEntry::new(
        SpiffeId::new(AGENT).unwrap(),
        agent_id.clone(),
        vec!["unix:uid:7".parse().unwrap()],
    );
    entry.created_at = server.clock.unix_seconds();
    server.store.create_entry(&entry).await.unwrap();
    server.notify_change();
    let node = Arc::new(LocalNode::new(server.clone(), agent_id));
    let attestor = StaticAttestor::new(vec!["unix:uid:7".parse().unwrap()]);
    let running = agent::start(node, &dir.path().join("agent.sock"), Arc::new(attestor))
        .await
        .unwrap();
    running.cache.refresh(true).await.unwrap();

    let endpoint = format!("unix://{}", running.socket.display());
    let mut client = writ_sdk::workload::WorkloadClient::connect(&endpoint)
        .await
        .unwrap();
    let svids = client.fetch_wit().await.unwrap();
    assert_eq!(svids.len(), 1);
    assert_eq!(svids[0].spiffe_id().as_str(), AGENT);
    let bundles = client.fetch_wit_bundles().await.unwrap();
    let wpt = svids[0]
        .proof(&uri(), Some("txn"), server.clock.now())
        .unwrap();
    let proof = WptVerifier::new(bundles, BASE)
        .verify(svids[0].token(), &wpt, "/orders", Some("txn"))
        .unwrap();
    assert_eq!(proof.caller.as_str(), AGENT);
}
