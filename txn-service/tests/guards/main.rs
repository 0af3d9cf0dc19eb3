//! Guards of the exchange hot path: the work one `POST /token` costs, counted, never
//! timed. A test fails when a change adds allocations or signature operations to an
//! exchange; the figures it measures are printed (`--nocapture`) so a bound can be
//! tightened when the path gets cheaper.
//!
//! The exchanges go through the service's axum router (`oneshot`) with the caller's
//! SPIFFE ID as the listener would insert it, an OIDC provider on 127.0.0.1 (discovery
//! and a JWKS with one ES256 key) whose access tokens are the subject tokens, signing
//! keys in memory and the audit log in a temporary file. TLS and HTTP parsing are not
//! counted here (the exchange bench measures them).
//!
//! Allocations are measured as the bytes this binary's global allocator hands out
//! (`cap::Cap` with its `stats`: the workspace forbids `unsafe`, so no hand-written
//! counting allocator), process-wide: the cases run one after another in one test on a
//! current-thread runtime, so nothing else allocates meanwhile. Signature operations
//! are read from the counters the service exposes: [`SigningKeys::signatures`] and
//! [`OidcValidator::signature_verifications`].
//!
//! Run: `cargo test -p writ-txn-service --test guards -- --nocapture`.
#![expect(
    unused_crate_dependencies,
    reason = "an integration-test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

use std::alloc::System;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cap::Cap;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::bundle::Jwk;
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_txn_service::audit::AuditLog;
use writ_txn_service::exchange::{CallerId, ExchangeService, router};
use writ_txn_service::oidc::{IssuerConfig, OidcValidator};
use writ_txn_service::policy::Policy;
use writ_txn_service::txn_token::{Minter, SigningAlgorithm, SigningKeys};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes allocated so far by the whole process (freed ones included).
fn allocated() -> u64 {
    ALLOCATOR.total_allocated() as u64
}

const TD: &str = "example.org";
const ISSUER: &str = "https://tts.example.org";
const AUDIENCE: &str = "https://tts.example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const POLICY: &str = r#"
[[caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["access_token"]
max_scope = ["orders.read", "orders.write"]
"#;

/// Bytes one exchange with a fresh subject token may allocate through the router (form
/// parsing, the subject token's claims, the Txn-Token's claims and its encoding, the
/// audit record and its line, the response; freed bytes count too). Set a little above
/// the figure measured after tuning (printed by the test).
const MAX_BYTES_FRESH: u64 = 24_000;
/// The same with the subject cache on and a subject token seen before (a cache lookup
/// instead of the validation).
const MAX_BYTES_REPEATED: u64 = 19_000;
/// Exchanges counted per case (after the warm-up).
const EXCHANGES: u64 = 50;

/// An OpenID Provider on 127.0.0.1 with one ES256 key; its access tokens are signed here.
struct Provider {
    issuer: String,
    key: EcdsaKeyPair,
    next: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start() -> Self {
        let private = PrivateKey::generate().unwrap();
        let (x, y) = private.ec_p256_xy().unwrap();
        let mut jwk = serde_json::to_value(Jwk::ec_p256(x, y)).unwrap();
        jwk["kid"] = json!("guard-1");
        jwk["alg"] = json!("ES256");
        jwk["use"] = json!("sig");
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", tcp.local_addr().unwrap());
        let discovery = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")});
        let jwks = json!({"keys": [jwk]});
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || std::future::ready(Json(discovery.clone()))),
            )
            .route("/jwks", get(move || std::future::ready(Json(jwks.clone()))));
        let task = tokio::spawn(async move {
            axum::serve(tcp, app).await.unwrap();
        });
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, private.pkcs8_der())
            .unwrap();
        Self {
            issuer,
            key,
            next: AtomicU64::new(0),
            task,
        }
    }

    /// A fresh access token for a new user.
    fn access_token(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let header = json!({"alg": "ES256", "typ": "at+jwt", "kid": "guard-1"});
        let claims = json!({
            "iss": self.issuer, "aud": AUDIENCE, "sub": format!("user-{n}"),
            "client_id": "guard", "scope": "orders.read orders.write profile",
            "iat": now, "exp": now + 3600, "jti": format!("guard-{n}"),
        });
        let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()));
        let signature = self
            .key
            .sign(&SystemRandom::new(), token.as_bytes())
            .unwrap();
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        token
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A token service as `writ txn run` would build it, minus the listener.
struct Service {
    app: Router,
    keys: Arc<SigningKeys>,
    oidc: Arc<OidcValidator>,
    _audit_dir: tempfile::TempDir,
}

fn service(provider: &Provider, cache: bool, algorithm: SigningAlgorithm) -> Service {
    let clock = Arc::new(SystemClock);
    let keys = Arc::new(SigningKeys::single(
        Minter::generate(algorithm).unwrap(),
        clock.clone(),
    ));
    let mut issuer = IssuerConfig::new(provider.issuer.clone(), [AUDIENCE]);
    issuer.algorithms = vec![jsonwebtoken::Algorithm::ES256];
    let oidc = Arc::new(OidcValidator::new(vec![issuer], clock.clone()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let audit = AuditLog::open(&dir.path().join("audit.log")).unwrap();
    let mut service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(POLICY).unwrap(),
        keys.clone(),
        clock,
    )
    .with_oidc(oidc.clone())
    .with_audit(audit);
    if cache {
        service = service.with_subject_cache();
    }
    Service {
        app: router(Arc::new(service)),
        keys,
        oidc,
        _audit_dir: dir,
    }
}

/// `POST /token` from the gateway, as the listener hands it to the router.
fn request(subject_token: &str) -> Request<Body> {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", GRANT_TYPE_TOKEN_EXCHANGE)
        .append_pair("requested_token_type", TokenType::TxnToken.as_urn())
        .append_pair("audience", TD)
        .append_pair("scope", "orders.read")
        .append_pair("subject_token", subject_token)
        .append_pair("subject_token_type", TokenType::AccessToken.as_urn())
        .finish();
    let mut request = Request::post("/token")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    request
        .extensions_mut()
        .insert(CallerId(SpiffeId::new(GATEWAY).unwrap()));
    request
        .extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
    request
}

/// One exchange; panics unless a Txn-Token is issued.
async fn exchange(app: &Router, request: Request<Body>) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let issued: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(issued["issued_token_type"], TokenType::TxnToken.as_urn());
}

/// What `EXCHANGES` exchanges cost, each request built before counting.
struct Cost {
    bytes_per_exchange: u64,
    signatures: u64,
    verifications: u64,
}

async fn measure(service: &Service, tokens: Vec<String>) -> Cost {
    let requests: Vec<Request<Body>> = tokens.iter().map(|t| request(t)).collect();
    let (signatures, verifications) = (
        service.keys.signatures(),
        service.oidc.signature_verifications(),
    );
    let before = allocated();
    for request in requests {
        exchange(&service.app, request).await;
    }
    let bytes = allocated() - before;
    Cost {
        bytes_per_exchange: bytes / tokens.len() as u64,
        signatures: service.keys.signatures() - signatures,
        verifications: service.oidc.signature_verifications() - verifications,
    }
}

async fn warm_up(service: &Service, provider: &Provider) {
    // The first exchange fetches discovery and the JWKS; a few more fill what grows once.
    for _ in 0..20 {
        exchange(&service.app, request(&provider.access_token())).await;
    }
}

async fn fresh_exchanges(algorithm: SigningAlgorithm, cache: bool) {
    let provider = Provider::start().await;
    let service = service(&provider, cache, algorithm);
    warm_up(&service, &provider).await;
    let tokens = (0..EXCHANGES).map(|_| provider.access_token()).collect();
    let cost = measure(&service, tokens).await;
    println!(
        "fresh subject tokens, {algorithm} Txn-Tokens, subject cache {}: {} bytes allocated per exchange",
        if cache { "on" } else { "off" },
        cost.bytes_per_exchange
    );
    assert_eq!(cost.signatures, EXCHANGES, "one signature per exchange");
    assert_eq!(
        cost.verifications, EXCHANGES,
        "one subject token verification per fresh exchange"
    );
    assert!(
        cost.bytes_per_exchange <= MAX_BYTES_FRESH,
        "{} bytes allocated per exchange, more than {MAX_BYTES_FRESH}",
        cost.bytes_per_exchange
    );
}

async fn repeated_exchanges() {
    let provider = Provider::start().await;
    let service = service(&provider, true, SigningAlgorithm::Es256);
    warm_up(&service, &provider).await;
    let token = provider.access_token();
    exchange(&service.app, request(&token)).await;
    let cost = measure(&service, vec![token; EXCHANGES as usize]).await;
    println!(
        "repeated subject token, subject cache on: {} bytes allocated per exchange",
        cost.bytes_per_exchange
    );
    assert_eq!(cost.signatures, EXCHANGES, "one signature per exchange");
    assert_eq!(
        cost.verifications, 0,
        "a cached subject token is not verified again"
    );
    assert!(
        cost.bytes_per_exchange <= MAX_BYTES_REPEATED,
        "{} bytes allocated per exchange, more than {MAX_BYTES_REPEATED}",
        cost.bytes_per_exchange
    );
}

/// The one test of this binary: the allocator's count is process-wide, so the cases run
/// one after another.
#[tokio::test]
async fn exchanges_cost_one_verification_one_signature_and_bounded_allocations() {
    // Fresh subject tokens: one verification and one signature each, with or without
    // the subject cache, with either Txn-Token algorithm.
    fresh_exchanges(SigningAlgorithm::Es256, false).await;
    fresh_exchanges(SigningAlgorithm::Es256, true).await;
    fresh_exchanges(SigningAlgorithm::EdDsa, false).await;
    // A subject token presented again: no verification.
    repeated_exchanges().await;
}
