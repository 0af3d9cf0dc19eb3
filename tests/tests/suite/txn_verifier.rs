//! The SDK's Txn-Token verifier and middleware against tokens from the service's own
//! signing code (`SigningKeys`, the ring the TTS mints with and whose `jwks()` it serves
//! at `/.well-known/jwks.json`):
//!
//! - one set of good and bad tokens goes to the SDK and to a Python service that checks
//!   them with PyJWT against the same JWKS URL; both must accept and refuse the same
//!   tokens (the Python suite skips without Python, unless `WRIT_REQUIRE_ALL=1`);
//! - the JWKS is fetched at first use, fetched again on an unknown `kid` at most once per
//!   refetch interval, and read from a file as well as a URL;
//! - the verified-token cache answers until the token's expiry by the injected clock;
//! - the middleware's refusals that need no TLS connection (no peer, two headers, custom
//!   check, keys unavailable, the extractor without the layer). The refusals that do
//!   (caller, scope, strict chain) run over real mTLS in `sdk_mtls.rs`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::clock::{Clock, ManualClock, SharedClock};
use writ_identity::key_manager::PrivateKey;
use writ_sdk::listener::Peer;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{JwksSource, TxnToken, TxnTokenError, TxnVerifier};
use writ_sdk::{SpiffeId, TrustDomain};
use writ_tests::available;
use writ_tests::python::python;
use writ_txn_service::txn_token::{Minter, SigningKeys};

const TD: &str = "example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const START: u64 = 1_800_000_000;

/// The service's key ring and a JWKS endpoint serving it (plain HTTP on 127.0.0.1),
/// counting fetches.
struct Service {
    keys: Arc<SigningKeys>,
    /// The ring's first key, to sign claims the minter would never produce.
    key: PrivateKey,
    kid: String,
    clock: ManualClock,
    url: String,
    fetches: Arc<AtomicUsize>,
    /// While set, the JWKS endpoint answers 503.
    down: Arc<std::sync::atomic::AtomicBool>,
    _server: tokio::task::JoinHandle<()>,
}

impl Service {
    async fn start() -> Self {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(START));
        let shared: SharedClock = Arc::new(clock.clone());
        let key = PrivateKey::generate().unwrap();
        let minter = Minter::new(key.clone()).unwrap();
        let kid = minter.kid().to_owned();
        let keys = Arc::new(SigningKeys::single(minter, shared));
        let fetches = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let app = Router::new().route(
            "/.well-known/jwks.json",
            get({
                let keys = keys.clone();
                let fetches = fetches.clone();
                let down = down.clone();
                move || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        return Err(StatusCode::SERVICE_UNAVAILABLE);
                    }
                    Ok(axum::Json(keys.jwks()))
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/.well-known/jwks.json", tcp.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(tcp, app).await.unwrap();
        });
        Self {
            keys,
            key,
            kid,
            clock,
            url,
            fetches,
            down,
            _server: server,
        }
    }

    fn source(&self) -> JwksSource {
        JwksSource::Url {
            url: self.url.clone(),
            http: reqwest::Client::new(),
        }
    }

    fn verifier(&self) -> TxnVerifier {
        TxnVerifier::builder(TD.parse().unwrap(), self.source())
            .clock(Arc::new(self.clock.clone()))
            .build()
    }

    fn now(&self) -> i64 {
        self.clock.unix_seconds()
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn mint(&self, claims: &TxnToken) -> String {
        self.keys.mint(claims).unwrap()
    }

    /// Signs arbitrary claims with the ring's first key under `header` (plus its `kid`).
    fn sign_raw(&self, header: Value, claims: &Value) -> String {
        let mut header = header;
        header["kid"] = self.kid.clone().into();
        let signing_input = format!("{}.{}", b64(&header), b64(claims));
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            self.key.pkcs8_der(),
        )
        .unwrap();
        let sig = pair
            .sign(
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
            )
            .unwrap();
        format!(
            "{signing_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.as_ref())
        )
    }
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn claims(now: i64) -> TxnToken {
    TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: "8d0c8f2e-2b1e-4e7a-9f51-3c2f0e6b7a10".into(),
        sub: "alice".into(),
        scope: "read write".into(),
        req_wl: GATEWAY.into(),
        tctx: Some(BTreeMap::from([("order".into(), json!(42))])),
        rctx: None,
        act: None,
    }
}

/// The agreement set: (name, token, whether it must verify).
fn token_set(service: &Service) -> Vec<(&'static str, String, bool)> {
    let now = service.now();
    let good = service.mint(&claims(now));
    let body = good.split('.').nth(1).unwrap().to_owned();
    let sig = good.split('.').nth(2).unwrap().to_owned();
    let raw = serde_json::to_value(claims(now)).unwrap();
    let without = |claim: &str| {
        let mut c = raw.clone();
        c.as_object_mut().unwrap().remove(claim);
        service.sign_raw(json!({"alg": "ES256", "typ": "txntoken+jwt"}), &c)
    };
    let tampered = {
        let mut c = raw.clone();
        c["sub"] = "mallory".into();
        format!("{}.{}.{sig}", good.split('.').next().unwrap(), b64(&c))
    };
    let public = service.key.public_key_raw().to_vec();
    let hs256 = {
        let header = json!({"alg": "HS256", "typ": "txntoken+jwt", "kid": service.kid});
        let input = format!("{}.{body}", b64(&header));
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &public);
        let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!(
            "{input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    };
    let none = format!(
        "{}.{body}.",
        b64(&json!({"alg": "none", "typ": "txntoken+jwt"}))
    );
    let stranger = Minter::new(PrivateKey::generate().unwrap())
        .unwrap()
        .mint(&claims(now))
        .unwrap();
    let delegated = service.mint(&TxnToken {
        act: Some(writ_sdk::txn_token::Actor::new(
            "spiffe://example.org/agents/planner",
        )),
        ..claims(now)
    });
    vec![
        ("valid", good.clone(), true),
        ("valid with act", delegated, true),
        (
            "typ JWT",
            service.sign_raw(json!({"alg": "ES256", "typ": "JWT"}), &raw),
            false,
        ),
        (
            "no typ",
            service.sign_raw(json!({"alg": "ES256"}), &raw),
            false,
        ),
        (
            "aud other.org",
            service.mint(&TxnToken {
                aud: "other.org".into(),
                ..claims(now)
            }),
            false,
        ),
        (
            "expired",
            service.mint(&TxnToken {
                iat: now - 900,
                exp: now - 600,
                ..claims(now)
            }),
            false,
        ),
        ("tampered payload", tampered, false),
        ("alg none", none, false),
        ("HS256 keyed with the public key", hs256, false),
        ("unknown kid", stranger, false),
        ("no txn", without("txn"), false),
        ("no sub", without("sub"), false),
        ("no req_wl", without("req_wl"), false),
        ("no exp", without("exp"), false),
        ("garbage", "not.a.token".into(), false),
    ]
}

#[tokio::test]
async fn verifier_accepts_and_refuses_the_set() {
    let service = Service::start().await;
    let verifier = service.verifier();
    for (name, token, ok) in token_set(&service) {
        let got = verifier.verify(&token).await;
        assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
    }
    // The precise reasons for the cases the issue names.
    let set: BTreeMap<_, _> = token_set(&service)
        .into_iter()
        .map(|(n, t, _)| (n, t))
        .collect();
    let reason = |name: &str| {
        let token = set[name].clone();
        let verifier = verifier.clone();
        async move { verifier.verify(&token).await.unwrap_err() }
    };
    assert_eq!(reason("typ JWT").await, TxnTokenError::Type);
    assert_eq!(reason("aud other.org").await, TxnTokenError::Audience);
    assert_eq!(reason("expired").await, TxnTokenError::Expired);
    assert_eq!(reason("tampered payload").await, TxnTokenError::Signature);
    assert!(matches!(
        reason("alg none").await,
        TxnTokenError::Malformed(_)
    ));
    assert!(matches!(
        reason("HS256 keyed with the public key").await,
        TxnTokenError::Algorithm(_)
    ));
    assert_eq!(reason("unknown kid").await, TxnTokenError::UnknownKey);
    for missing in ["no txn", "no sub", "no req_wl"] {
        assert!(
            matches!(reason(missing).await, TxnTokenError::Claims(_)),
            "{missing}"
        );
    }
}

/// The verifier takes a `TrustDomain`, not a string: the trust domain's SPIFFE ID form
/// (`spiffe://example.org`, what a bundle map key or a config often holds) names the
/// same trust domain as the bare name. As a string it made every token fail `aud`.
#[tokio::test]
async fn the_verifier_trust_domain_is_a_parsed_trust_domain() {
    let service = Service::start().await;
    let token = service.mint(&claims(service.now()));
    for name in ["example.org", "spiffe://example.org"] {
        let verifier = TxnVerifier::builder(TrustDomain::new(name).unwrap(), service.source())
            .clock(Arc::new(service.clock.clone()))
            .build();
        let txn = verifier.verify(&token).await.unwrap();
        assert_eq!(txn.aud, TD, "{name}");
    }
    let other = TxnVerifier::builder(TrustDomain::new("other.org").unwrap(), service.source())
        .clock(Arc::new(service.clock.clone()))
        .build();
    assert_eq!(other.verify(&token).await, Err(TxnTokenError::Audience));
}

#[tokio::test]
async fn unknown_kid_refetches_at_a_bounded_rate() {
    let service = Service::start().await;
    let verifier = service.verifier();
    let now = service.now();
    assert_eq!(service.fetches(), 0, "keys are loaded at first use");
    verifier.verify(&service.mint(&claims(now))).await.unwrap();
    assert_eq!(service.fetches(), 1);

    // An unknown kid: fetched again once, still unknown, refused.
    let stranger = Minter::new(PrivateKey::generate().unwrap())
        .unwrap()
        .mint(&claims(now))
        .unwrap();
    assert_eq!(
        verifier.verify(&stranger).await,
        Err(TxnTokenError::UnknownKey)
    );
    assert_eq!(service.fetches(), 2, "one refetch for the unknown kid");
    for _ in 0..20 {
        assert_eq!(
            verifier.verify(&stranger).await,
            Err(TxnTokenError::UnknownKey)
        );
    }
    assert_eq!(
        service.fetches(),
        2,
        "no more refetches within the interval"
    );

    // The service rotates; a token from the new key verifies once the interval has
    // passed, after one more fetch.
    service.keys.rotate().unwrap();
    let rotated = service.mint(&claims(now));
    assert_eq!(
        verifier.verify(&rotated).await,
        Err(TxnTokenError::UnknownKey),
        "still within the refetch interval"
    );
    service.clock.advance(Duration::from_secs(11));
    let verified = verifier.verify(&rotated).await.unwrap();
    assert_eq!(verified.sub, "alice");
    assert_eq!(service.fetches(), 3);
}

#[tokio::test]
async fn keys_are_fetched_again_after_their_max_age() {
    let service = Service::start().await;
    let verifier = TxnVerifier::builder(TD.parse().unwrap(), service.source())
        .clock(Arc::new(service.clock.clone()))
        .keys_max_age(Duration::from_secs(60))
        .cache_capacity(0)
        .build();
    let token = service.mint(&claims(service.now()));
    verifier.verify(&token).await.unwrap();
    verifier.verify(&token).await.unwrap();
    assert_eq!(service.fetches(), 1);
    service.clock.advance(Duration::from_secs(61));
    verifier.verify(&token).await.unwrap();
    assert_eq!(service.fetches(), 2);
}

#[tokio::test]
async fn an_unreachable_jwks_is_retried_at_a_bounded_rate() {
    let service = Service::start().await;
    let verifier = TxnVerifier::builder(TD.parse().unwrap(), service.source())
        .clock(Arc::new(service.clock.clone()))
        .keys_max_age(Duration::from_secs(60))
        .cache_capacity(0)
        .build();
    let token = service.mint(&claims(service.now()));

    // Never loaded: the first request fetches and fails; the next ones within the
    // refetch interval fail at once, without a fetch.
    service.down.store(true, Ordering::SeqCst);
    for _ in 0..5 {
        assert!(matches!(
            verifier.verify(&token).await,
            Err(TxnTokenError::Keys(_))
        ));
    }
    assert_eq!(service.fetches(), 1);

    // Back up, after the interval: loaded, verified.
    service.down.store(false, Ordering::SeqCst);
    service.clock.advance(Duration::from_secs(11));
    verifier.verify(&token).await.unwrap();
    assert_eq!(service.fetches(), 2);

    // Down again when the keys are due: one failed fetch, then the old keys keep
    // working without a fetch per request.
    service.down.store(true, Ordering::SeqCst);
    service.clock.advance(Duration::from_secs(61));
    for _ in 0..5 {
        verifier.verify(&token).await.unwrap();
    }
    assert_eq!(service.fetches(), 3);
}

#[tokio::test]
async fn jwks_from_a_file() {
    let service = Service::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, service.keys.jwks().to_string()).unwrap();
    let verifier = TxnVerifier::builder(TD.parse().unwrap(), JwksSource::File(path.clone()))
        .clock(Arc::new(service.clock.clone()))
        .build();
    verifier
        .verify(&service.mint(&claims(service.now())))
        .await
        .unwrap();

    // A new key appears in the file: picked up by the unknown-kid refetch.
    service.keys.rotate().unwrap();
    std::fs::write(&path, service.keys.jwks().to_string()).unwrap();
    verifier
        .verify(&service.mint(&claims(service.now())))
        .await
        .unwrap();

    // A garbage file is refused with a clear error and the loaded keys stay in use.
    std::fs::write(&path, "{ not json").unwrap();
    assert!(matches!(
        JwksSource::File(path.clone()).load().await,
        Err(writ_sdk::txn_token::JwksError::Malformed(_))
    ));
    verifier.refresh().await.unwrap();
    verifier
        .verify(&service.mint(&claims(service.now())))
        .await
        .unwrap();

    // No file and no keys yet: the keys are unavailable, not the token invalid.
    let missing = TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::File(dir.path().join("absent")),
    )
    .build();
    assert!(matches!(
        missing.verify(&service.mint(&claims(service.now()))).await,
        Err(TxnTokenError::Keys(_))
    ));
}

#[tokio::test]
async fn verified_tokens_are_cached_until_they_expire() {
    let service = Service::start().await;
    let cached = service.verifier();
    let uncached = TxnVerifier::builder(TD.parse().unwrap(), service.source())
        .clock(Arc::new(service.clock.clone()))
        .cache_capacity(0)
        .build();
    let token = service.mint(&claims(service.now()));
    cached.verify(&token).await.unwrap();
    uncached.verify(&token).await.unwrap();

    // The key leaves the JWKS: the uncached verifier refuses after its refetch, the
    // cached one answers from the cache (the token was verified while its key was
    // published, and the cache never outlives the token).
    let replaced = SigningKeys::single(
        Minter::new(PrivateKey::generate().unwrap()).unwrap(),
        Arc::new(service.clock.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, replaced.jwks().to_string()).unwrap();
    let file_cached = TxnVerifier::builder(TD.parse().unwrap(), JwksSource::File(path.clone()))
        .clock(Arc::new(service.clock.clone()))
        .build();
    assert_eq!(
        file_cached.verify(&token).await,
        Err(TxnTokenError::UnknownKey)
    );
    assert_eq!(cached.verify(&token).await.unwrap().sub, "alice");

    // Past expiry (plus leeway) by the clock, the cached entry refuses too.
    service.clock.advance(Duration::from_secs(300 + 31));
    assert_eq!(cached.verify(&token).await, Err(TxnTokenError::Expired));
    assert_eq!(uncached.verify(&token).await, Err(TxnTokenError::Expired));
}

// ---- middleware without TLS ----

fn app(verifier: TxnVerifier, policy: TxnPolicy) -> Router {
    Router::new()
        .route(
            "/",
            get(|v: Verified| async move { format!("{} for {}", v.caller, v.txn.sub) }),
        )
        .layer(TxnLayer::new(verifier, policy))
}

fn peer(id: &str) -> Peer {
    Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        id: Some(SpiffeId::new(id).unwrap()),
        cert_sha256: Some([0; 32]),
    }
}

async fn call(app: &Router, peer: Option<Peer>, tokens: &[&str]) -> (StatusCode, Value) {
    let mut request = Request::get("/");
    for t in tokens {
        request = request.header("Txn-Token", *t);
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
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, body)
}

#[tokio::test]
async fn middleware_refusals_without_tls() {
    let service = Service::start().await;
    let td = TrustDomain::new(TD).unwrap();
    let policy = TxnPolicy::new(Authorizer::member_of(td.clone())).check(|v| {
        if v.txn.tctx.as_ref().and_then(|c| c.get("order")) == Some(&json!(42)) {
            Ok(())
        } else {
            Err("only order 42".into())
        }
    });
    let guarded = app(service.verifier(), policy.clone());
    let token = service.mint(&claims(service.now()));

    let (status, body) = call(&guarded, Some(peer(GATEWAY)), &[&token]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!(format!("{GATEWAY} for alice")));

    let (status, body) = call(&guarded, None, &[&token]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthenticated"))
    );
    let (status, body) = call(&guarded, Some(peer(GATEWAY)), &[&token, &token]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("missing_txn_token"))
    );
    let (status, body) = call(&guarded, Some(peer(GATEWAY)), &["garbage"]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_txn_token"))
    );
    let other_order = service.mint(&TxnToken {
        tctx: None,
        ..claims(service.now())
    });
    let (status, body) = call(&guarded, Some(peer(GATEWAY)), &[&other_order]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    assert_eq!(body["error_description"], "only order 42");

    // Keys that cannot be loaded are the service's problem, not the caller's.
    let unreachable = TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::Url {
            url: "http://127.0.0.1:9/jwks.json".into(),
            http: reqwest::Client::new(),
        },
    )
    .build();
    let (status, body) = call(&app(unreachable, policy), Some(peer(GATEWAY)), &[&token]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("keys_unavailable"))
    );

    // The extractor on a route the layer does not cover is a server bug, said plainly.
    let bare = Router::new().route("/", get(|_: Verified| async { "unreachable" }));
    let (status, body) = call(&bare, Some(peer(GATEWAY)), &[&token]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("server_error"))
    );
}

// ---- PyJWT agreement ----

/// A Python HTTP service that verifies the `Txn-Token` header with PyJWT against the
/// JWKS at argv[1]: 200 or 401 with the reason.
const PY_SERVICE: &str = r#"
import json, sys, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
import jwt

JWKS = json.load(urllib.request.urlopen(sys.argv[1]))
KEYS = {k["kid"]: jwt.PyJWK(k) for k in JWKS["keys"]}

def verify(token):
    header = jwt.get_unverified_header(token)
    if header.get("typ") != "txntoken+jwt":
        raise ValueError("typ")
    key = KEYS.get(header.get("kid"))
    if key is None:
        raise ValueError("unknown kid")
    claims = jwt.decode(token, key.key, algorithms=["ES256", "EdDSA"], audience="example.org",
                        leeway=30, options={"require": ["exp", "iat", "txn", "sub", "req_wl", "aud", "iss"]})
    for name in ("txn", "sub", "req_wl"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise ValueError(name)
    return claims

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            verify(self.headers.get("Txn-Token", ""))
            code, body = 200, {"ok": True}
        except Exception as e:
            code, body = 401, {"error": type(e).__name__ + ": " + str(e)}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass

server = HTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pyjwt_agrees_with_the_sdk() {
    let py = tokio::task::spawn_blocking(python).await.unwrap();
    if !available("Python 3 with PyJWT", py.is_some()) {
        return;
    }
    let py = py.unwrap();
    // PyJWT checks exp/iat against the real clock: mint at the real time.
    let service = Service::start().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    service.clock.set(UNIX_EPOCH + Duration::from_secs(now));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify_service.py");
    std::fs::write(&script, PY_SERVICE).unwrap();
    let mut child = KillOnDrop(
        Command::new(&py.exe)
            .arg(&script)
            .arg(&service.url)
            .env("PYTHONPATH", &py.site)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let port = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line.trim().parse::<u16>().unwrap()
    });
    let port = tokio::time::timeout(Duration::from_secs(30), port)
        .await
        .expect("the Python service starts within 30 s")
        .unwrap();

    let verifier = service.verifier();
    let http = reqwest::Client::new();
    let mut disagreements = Vec::new();
    for (name, token, expected) in token_set(&service) {
        let sdk = verifier.verify(&token).await;
        let response = http
            .get(format!("http://127.0.0.1:{port}/"))
            .header("Txn-Token", &token)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        let pyjwt = status == StatusCode::OK;
        if sdk.is_ok() != pyjwt || pyjwt != expected {
            disagreements.push(format!("{name}: sdk {sdk:?}, pyjwt {status} {body}"));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
}

/// `exp`, `nbf` and `iat` out of range, and an `act` chain of the wrong shape, are
/// refused with their own reasons, whoever signed them (the service's key here: defense
/// in depth against a token the minter would never produce).
#[tokio::test]
async fn time_claims_and_act_shape_are_checked() {
    use writ_identity::numeric_date::TimeError;
    let service = Service::start().await;
    let verifier = service.verifier();
    let now = service.now();
    let raw = serde_json::to_value(claims(now)).unwrap();
    let with = |extra: Value| {
        let mut c = raw.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        service.sign_raw(json!({"alg": "ES256", "typ": "txntoken+jwt"}), &c)
    };
    let reason = |token: String| {
        let verifier = verifier.clone();
        async move { verifier.verify(&token).await.unwrap_err() }
    };
    let planner = "spiffe://example.org/agents/planner";
    assert!(verifier.verify(&with(json!({"nbf": now}))).await.is_ok());
    assert!(
        verifier
            .verify(&with(
                json!({"act": {"sub": planner, "act": {"sub": GATEWAY}}})
            ))
            .await
            .is_ok()
    );

    // Time claims.
    assert_eq!(
        reason(with(json!({"nbf": now + 120}))).await,
        TxnTokenError::Time(TimeError::NotYetValid)
    );
    assert_eq!(
        reason(with(json!({"iat": now + 120}))).await,
        TxnTokenError::IssuedInFuture
    );
    assert_eq!(
        reason(with(json!({"exp": now + 5 * 365 * 86_400}))).await,
        TxnTokenError::Time(TimeError::TooFarAhead { max_secs: 3600 })
    );
    // Not an i64: the claims type refuses it before the time rule.
    assert!(matches!(
        reason(with(json!({"exp": 1e300}))).await,
        TxnTokenError::Claims(_)
    ));
    assert_eq!(
        reason(with(json!({"exp": i64::MAX}))).await,
        TxnTokenError::Time(TimeError::Invalid { claim: "exp" })
    );
    assert_eq!(
        reason(with(json!({"nbf": "soon"}))).await,
        TxnTokenError::Time(TimeError::Invalid { claim: "nbf" })
    );

    // The act chain.
    for (act, what) in [
        (json!(null), "act null"),
        (json!("spiffe://example.org/x"), "act a string"),
        (json!({"sub": "alice"}), "sub not a SPIFFE ID"),
        (
            json!({"sub": planner, "act": {"sub": 7}}),
            "nested sub a number",
        ),
        (json!({"sub": planner, "act": []}), "nested act an array"),
        (json!({"act": {"sub": planner}}), "no sub"),
    ] {
        assert!(
            matches!(
                reason(with(json!({ "act": act }))).await,
                TxnTokenError::Actor(_) | TxnTokenError::Claims(_)
            ),
            "{what}"
        );
    }
    assert!(matches!(
        reason(with(json!({"act": {"sub": "alice"}}))).await,
        TxnTokenError::Actor(_)
    ));
    let mut deep = json!({"sub": planner});
    for _ in 0..writ_sdk::txn_token::MAX_CHAIN_DEPTH {
        deep = json!({"sub": planner, "act": deep});
    }
    assert_eq!(
        reason(with(json!({ "act": deep }))).await,
        TxnTokenError::ChainTooDeep {
            max: writ_sdk::txn_token::MAX_CHAIN_DEPTH
        }
    );
}
