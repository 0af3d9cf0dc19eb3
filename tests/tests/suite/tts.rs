//! The transaction token service end to end: a real identity server and agent, the TTS
//! started from `txn.toml` with its own SVID from the Workload API, and callers that
//! authenticate with their own SVIDs over mTLS (or a JWT-SVID client assertion).
//!
//! Every identity is registered for `unix:uid:<uid>`, so this one process holds all of
//! them; each side picks its SVID by SPIFFE ID, as go-spiffe's picker does.
//!
//! The OIDC suite runs the npm `oidc-provider` (installed into `.interop/node`) and checks
//! the Txn-Token with josekit and with PyJWT (installed with py-spiffe into
//! `.interop/py`); without Node or Python it skips, unless `WRIT_REQUIRE_ALL=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use writ_identity::clock::{Clock, ManualClock, SharedClock, SystemClock};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::tls::SpiffeServerVerifier;
use writ_sdk::exchange::{ExchangeError, TxnClient, TxnRequest};
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_sdk::workload::{WorkloadClient, X509Source};
use writ_tests::python::python;
use writ_tests::{Stack, available, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};

const TD: &str = "example.org";
const ISSUER: &str = "https://tts.example.org";
const TTS: &str = "/tts";
const GATEWAY: &str = "/gateway";
const PLANNER: &str = "/agents/planner";
const SUB_AGENT: &str = "/agents/planner/worker";
const OUTSIDER: &str = "/outsider";
const LIMITED: &str = "/limited";
const PROXIED: &str = "/behind-proxy";

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}{path}")).unwrap()
}

struct Tts {
    stack: Stack,
    server: TxnServer,
    audit_path: PathBuf,
    url: String,
}

fn policy() -> &'static str {
    r#"
[[policy.caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["access_token", "txn_token"]
max_scope = ["read", "write"]

[[policy.caller]]
prefix = "spiffe://example.org/agents"
subject_token_types = ["txn_token"]
max_scope = ["read", "write"]

[[policy.caller]]
id = "spiffe://example.org/limited"
subject_token_types = ["txn_token"]
max_scope = ["read"]
rate_limit = { per_second = 0.01, burst = 2 }

[[policy.caller]]
id = "spiffe://example.org/behind-proxy"
subject_token_types = ["txn_token"]
max_scope = ["read"]
client_assertion = true
"#
}

impl Tts {
    async fn start(oidc: Option<&writ_tests::oidc_provider::Provider>, clock: SharedClock) -> Self {
        let stack = Stack::start(Duration::from_secs(3600)).await;
        for path in [TTS, GATEWAY, PLANNER, SUB_AGENT, OUTSIDER, LIMITED, PROXIED] {
            stack.register(path, &[&uid_selector()]).await;
        }
        let audit_path = stack.dir.path().join("txn/audit.log");
        let mut toml = format!(
            r#"
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
workload_api = "{}"
spiffe_id = "spiffe://{TD}{TTS}"
data_dir = "{}"
key_rotation = "1h"
client_assertions = true
"#,
            stack.endpoint(),
            stack.dir.path().join("txn").display(),
        );
        if let Some(p) = oidc {
            toml.push_str(&format!(
                "[[oidc]]\nissuer = \"{}\"\naudiences = [\"{}\"]\n",
                p.issuer, p.resource
            ));
        }
        toml.push_str(policy());
        let config = TxnConfig::from_toml(&toml, stack.dir.path()).unwrap();
        let server = TxnServer::start_with_clock(config, clock).await.unwrap();
        let url = format!("https://{}", server.addr);
        Self {
            stack,
            server,
            audit_path,
            url,
        }
    }

    async fn source(&self, path: &str) -> X509Source {
        X509Source::builder()
            .endpoint(self.stack.endpoint())
            .spiffe_id(id(path))
            .build()
            .await
            .unwrap()
    }

    async fn client(&self, path: &str) -> TxnClient {
        TxnClient::new(&self.source(path).await, &self.url, id(TTS)).unwrap()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn last_audit(&self) -> Value {
        self.audit().pop().expect("an audit line")
    }

    /// A Txn-Token as the service issues it to the gateway for alice (signed with the
    /// service's own current key).
    fn initial_token(&self, now: i64) -> (TxnToken, String) {
        let claims = TxnToken {
            iss: ISSUER.into(),
            iat: now,
            exp: now + 300,
            aud: TD.into(),
            txn: uuid_like(),
            sub: "alice".into(),
            scope: "read write".into(),
            req_wl: id(GATEWAY).to_string(),
            tctx: Some(BTreeMap::from([("order".into(), json!(42))])),
            rctx: None,
            act: None,
        };
        let token = self.server.service.keys().mint(&claims).unwrap();
        (claims, token)
    }

    /// The JWKS, fetched over mTLS like any caller would.
    async fn jwks(&self, source: &X509Source) -> Value {
        writ_sdk::tls::http_client(source, writ_sdk::tls::Authorizer::id(id(TTS)))
            .unwrap()
            .get(format!("{}/.well-known/jwks.json", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

fn uuid_like() -> String {
    format!(
        "{:08x}-0000-4000-8000-000000000000",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    )
}

fn now() -> i64 {
    SystemClock.unix_seconds()
}

fn verifier_from(jwks: &Value) -> TxnVerifier {
    let jwks = Jwks::parse(jwks.to_string().as_bytes()).unwrap();
    TxnVerifier::builder(TD.parse().unwrap(), JwksSource::Keys(jwks)).build()
}

fn decode_claims(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

/// The RFC 6749 error code of a refused exchange.
#[track_caller]
fn code(result: Result<writ_sdk::exchange::Issued, writ_sdk::exchange::ExchangeError>) -> String {
    match result {
        Ok(_) => panic!("the exchange was granted"),
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not refused: {e}"))
            .to_owned(),
    }
}

#[track_caller]
fn assert_refused(tts: &Tts, error: &str) {
    let line = tts.last_audit();
    assert_eq!(line["decision"], "refused", "{line}");
    assert_eq!(line["error"], error, "{line}");
    assert!(line["granted_scope"].is_null(), "{line}");
}

/// A `TxnClient` is built for one TTS SPIFFE ID: a server of the same trust domain that
/// presents another ID (here the real TTS, `/tts`, to a client built for `/planner`'s
/// ID) is refused at the handshake, before the subject token is sent. Accepting any
/// member of the trust domain takes the explicit `dangerous()` path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_client_accepts_only_the_token_service_it_names() {
    let tts = Tts::start(None, Arc::new(SystemClock)).await;
    let gateway = tts.source(GATEWAY).await;
    let (_, token) = tts.initial_token(now());

    let elsewhere = TxnClient::new(&gateway, &tts.url, id(PLANNER)).unwrap();
    let err = elsewhere
        .exchange(TxnRequest::txn_token(token.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ExchangeError::Transport(_)),
        "not a transport error: {err}"
    );
    assert!(
        err.to_string()
            .contains("peer spiffe://example.org/tts is not authorized"),
        "{err}"
    );
    assert!(
        tts.audit()
            .iter()
            .all(|l| l["caller"] != id(GATEWAY).to_string()),
        "the service saw the request"
    );

    let named = TxnClient::new(&gateway, &tts.url, id(TTS)).unwrap();
    named
        .exchange(TxnRequest::txn_token(token.clone()))
        .await
        .unwrap();

    let any_member = TxnClient::builder(&gateway, &tts.url)
        .dangerous()
        .accept_any_member_of(TD.parse().unwrap())
        .unwrap();
    any_member
        .exchange(TxnRequest::txn_token(token))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_client_multiplexes_over_http2_when_asked() {
    use writ_sdk::tls::{Authorizer, http_client, http2_client};
    let tts = Tts::start(None, Arc::new(SystemClock)).await;
    let gateway = tts.source(GATEWAY).await;
    let jwks = format!("{}/.well-known/jwks.json", tts.url);

    // The service takes both; each client gets what its ALPN offers.
    for (client, version) in [
        (
            http_client(&gateway, Authorizer::id(id(TTS))),
            reqwest::Version::HTTP_11,
        ),
        (
            http2_client(&gateway, Authorizer::id(id(TTS))),
            reqwest::Version::HTTP_2,
        ),
    ] {
        let response = client.unwrap().get(&jwks).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
    }

    // Concurrent exchanges of one HTTP/2 client (streams of one connection) each get
    // the answer to their own request: the replacement keeps its subject's `txn`.
    let client = TxnClient::builder(&gateway, &tts.url)
        .http2()
        .tts_id(id(TTS))
        .unwrap();
    let exchanges = (0..8).map(|_| {
        let (claims, token) = tts.initial_token(now());
        let client = client.clone();
        async move {
            let issued = client.exchange(TxnRequest::txn_token(token)).await;
            (claims.txn, issued)
        }
    });
    let verifier = verifier_from(&tts.jwks(&gateway).await);
    for (txn, issued) in futures::future::join_all(exchanges).await {
        let token = issued.unwrap().access_token;
        assert_eq!(
            verifier.verify_at(&token, SystemTime::now()).unwrap().txn,
            txn
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_access_token_becomes_a_txn_token_that_josekit_and_pyjwt_verify() {
    let Some(provider) = writ_tests::oidc_provider::Provider::start() else {
        return;
    };
    let py = python();
    if !available("Python with PyJWT", py.is_some()) {
        return;
    }
    let py = py.unwrap();
    let tts = Tts::start(Some(&provider), Arc::new(SystemClock)).await;
    let access_token = provider.access_token("read write").await;
    let gateway = tts.source(GATEWAY).await;
    let client = TxnClient::new(&gateway, &tts.url, id(TTS)).unwrap();
    let issued = client
        .exchange(
            TxnRequest::access_token(access_token.clone())
                .scope("read")
                .request_details(json!({"order": 42, "action": "refund"})),
        )
        .await
        .unwrap();
    assert_eq!(
        issued.issued_token_type,
        "urn:ietf:params:oauth:token-type:txn_token"
    );
    assert_eq!(issued.token_type, "N_A");
    assert!(issued.expires_in > 0 && issued.expires_in <= 300);

    // The SDK, with the JWKS fetched over mTLS.
    let jwks = tts.jwks(&gateway).await;
    let token = verifier_from(&jwks)
        .verify_at(&issued.access_token, SystemTime::now())
        .unwrap();
    assert_eq!(token.aud, TD);
    assert_eq!(token.iss, ISSUER);
    assert_eq!(token.scope, "read");
    assert_eq!(token.req_wl, id(GATEWAY).to_string());
    assert!(!token.sub.is_empty());
    assert_eq!(token.tctx.as_ref().unwrap()["order"], json!(42));
    let rctx = token.rctx.as_ref().unwrap();
    assert_eq!(rctx["transport"], json!("mtls"));
    assert_eq!(rctx["req_ip"], json!("127.0.0.1"));

    // josekit, independently.
    let header = decode_header(&issued.access_token);
    assert_eq!(header["typ"], "txntoken+jwt");
    assert_eq!(header["alg"], "ES256");
    let jwk_value = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap()
        .clone();
    let jwk = josekit::jwk::Jwk::from_bytes(jwk_value.to_string().as_bytes()).unwrap();
    let verifier = josekit::jws::ES256.verifier_from_jwk(&jwk).unwrap();
    let (payload, jose_header) =
        josekit::jwt::decode_with_verifier(&issued.access_token, &verifier).unwrap();
    assert_eq!(jose_header.token_type(), Some("txntoken+jwt"));
    for claim in [
        "aud", "txn", "sub", "req_wl", "scope", "rctx", "tctx", "iat", "exp",
    ] {
        assert!(payload.claim(claim).is_some(), "josekit: no {claim}");
    }

    // PyJWT, in its own process.
    let script = r#"
import json, sys, jwt
token, jwks = sys.argv[1], json.loads(sys.argv[2])
header = jwt.get_unverified_header(token)
key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
claims = jwt.decode(token, key=key, algorithms=["ES256"], audience=sys.argv[3],
                    options={"require": ["exp", "iat", "aud", "txn", "sub", "req_wl", "scope"]})
print(json.dumps({"typ": header["typ"], "claims": claims}))
"#;
    let out = tokio::process::Command::new(&py.exe)
        .arg("-s")
        .arg("-c")
        .arg(script)
        .arg(&issued.access_token)
        .arg(jwks.to_string())
        .arg(TD)
        .env("PYTHONPATH", &py.site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "PyJWT refused the Txn-Token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py_view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(py_view["typ"], "txntoken+jwt");
    assert_eq!(py_view["claims"]["txn"], json!(token.txn));
    assert_eq!(py_view["claims"]["req_wl"], json!(id(GATEWAY).to_string()));
    assert_eq!(py_view["claims"]["rctx"]["transport"], "mtls");

    // One audit line, granted, with the subject token's SHA-256 and never the token.
    let line = tts.last_audit();
    assert_eq!(line["decision"], "granted");
    assert_eq!(line["caller"], id(GATEWAY).to_string());
    assert_eq!(line["txn"], json!(token.txn));
    assert_eq!(line["granted_scope"], "read");
    assert_eq!(line["requested_scope"], "read");
    assert_eq!(
        line["subject_token_sha256"],
        json!(writ_sdk::spiffe::fingerprint::token(&access_token))
    );
    let audit_text = std::fs::read_to_string(&tts.audit_path).unwrap();
    assert!(!audit_text.contains(&access_token));
    assert!(!audit_text.contains(&issued.access_token));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&tts.audit_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The same subject token again: served from the validation cache, same answer.
    let again = client
        .exchange(TxnRequest::access_token(access_token).scope("read"))
        .await
        .unwrap();
    assert_ne!(decode_claims(&again.access_token)["txn"], json!(token.txn));

    // A subject token from a key the provider never published.
    let rogue = provider.rogue_token(Some("rogue-kid"), now());
    assert_eq!(
        code(client.exchange(TxnRequest::access_token(rogue)).await),
        "invalid_request"
    );
    assert_refused(&tts, "invalid_request");
}

fn decode_header(token: &str) -> Value {
    use base64::Engine;
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hop_replacement_chain_nests_actors_in_order() {
    let tts = Tts::start(None, Arc::new(SystemClock)).await;
    let (first, token) = tts.initial_token(now());
    let gateway = tts.client(GATEWAY).await;
    let planner = tts.client(PLANNER).await;
    let sub_agent = tts.client(SUB_AGENT).await;

    let hop1 = gateway.replace(&token, None).await.unwrap();
    let hop2 = planner
        .replace(&hop1.access_token, Some("read write"))
        .await
        .unwrap();
    let hop3 = sub_agent
        .replace(&hop2.access_token, Some("read"))
        .await
        .unwrap();

    // The SDK verifier fetching the JWKS itself, over the sub-agent's mTLS.
    let verifier = TxnVerifier::builder(
        TD.parse().unwrap(),
        tts.client(SUB_AGENT).await.jwks_source(),
    )
    .issuer(ISSUER)
    .build();
    let last = verifier.verify(&hop3.access_token).await.unwrap();
    assert_eq!(last.txn, first.txn);
    assert_eq!(last.sub, "alice");
    assert_eq!(last.tctx, first.tctx);
    assert_eq!(last.scope, "read");
    assert_eq!(last.req_wl, id(SUB_AGENT).to_string());
    assert_eq!(
        last.chain(),
        vec![
            id(SUB_AGENT).as_str(),
            id(PLANNER).as_str(),
            id(GATEWAY).as_str(),
            id(GATEWAY).as_str(),
        ],
        "current actor outermost, the original requester innermost"
    );
    assert!(
        last.exp <= first.exp,
        "a replacement never outlives the original"
    );
    let claims = decode_claims(&hop3.access_token);
    assert_eq!(claims["act"]["sub"], id(SUB_AGENT).to_string());
    assert_eq!(claims["act"]["act"]["sub"], id(PLANNER).to_string());

    // Widening is refused, and audited as refused.
    assert_eq!(
        code(
            sub_agent
                .replace(&hop3.access_token, Some("read write"))
                .await
        ),
        "invalid_scope"
    );
    assert_refused(&tts, "invalid_scope");
    let granted: Vec<Value> = tts
        .audit()
        .into_iter()
        .filter(|l| l["decision"] == "granted")
        .collect();
    assert_eq!(granted.len(), 3);
    assert_eq!(granted[2]["act"].as_array().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_authenticated_and_authorized() {
    let tts = Tts::start(None, Arc::new(SystemClock)).await;
    let (_, token) = tts.initial_token(now());
    let gateway_source = tts.source(GATEWAY).await;
    let bundles = gateway_source.bundle_source();
    let tts_id = id(TTS);
    let server_verifier = SpiffeServerVerifier::new(bundles, Arc::new(move |p| *p == tts_id));
    let form = |extra: &[(&str, &str)]| {
        let mut pairs = vec![
            ("grant_type", writ_sdk::oauth::GRANT_TYPE_TOKEN_EXCHANGE),
            (
                "requested_token_type",
                writ_sdk::oauth::TokenType::TxnToken.as_urn(),
            ),
            ("audience", TD),
            ("subject_token", token.as_str()),
            (
                "subject_token_type",
                writ_sdk::oauth::TokenType::TxnToken.as_urn(),
            ),
            ("scope", "read"),
        ];
        pairs.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
        pairs.extend_from_slice(extra);
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    };
    let post = |config: rustls::ClientConfig, body: String| {
        let url = format!("{}/token", tts.url);
        async move {
            let mut config = config;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            reqwest::Client::builder()
                .tls_backend_preconfigured(config)
                .build()
                .unwrap()
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
        }
    };

    // No client certificate: invalid_client (401), audited.
    let anonymous = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier.clone())
        .with_no_client_auth();
    let response = post(anonymous.clone(), form(&[])).await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_refused(&tts, "invalid_client");

    // A certificate from another trust domain: the handshake fails, audited.
    let before = tts.audit().len();
    let (chain, key) = foreign_svid("spiffe://other.org/gateway");
    let foreign = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(server_verifier.clone())
        .with_client_auth_cert(chain, key)
        .unwrap();
    let refused = post(foreign, form(&[])).await;
    assert!(
        refused.is_err(),
        "a foreign SVID must not get through the handshake"
    );
    let mut line = Value::Null;
    for _ in 0..50 {
        if tts.audit().len() > before {
            line = tts.last_audit();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(line["decision"], "refused", "{line}");
    assert_eq!(line["error"], "invalid_client");
    assert!(
        line["reason"].as_str().unwrap().contains("TLS handshake"),
        "{line}"
    );

    // A caller the policy does not name: unauthorized_client (403).
    let outsider = tts.client(OUTSIDER).await;
    let e = outsider.replace(&token, None).await.unwrap_err();
    assert_eq!(e.code(), Some("unauthorized_client"));
    assert!(matches!(
        e,
        writ_sdk::exchange::ExchangeError::Refused { status: 403, .. }
    ));
    assert_refused(&tts, "unauthorized_client");

    // Rate limit: a burst of 2, then 429 with Retry-After.
    let limited = tts.client(LIMITED).await;
    limited.replace(&token, Some("read")).await.unwrap();
    limited.replace(&token, Some("read")).await.unwrap();
    let e = limited.replace(&token, Some("read")).await.unwrap_err();
    assert!(
        matches!(
            e,
            writ_sdk::exchange::ExchangeError::Refused { status: 429, .. }
        ),
        "{e}"
    );
    assert_eq!(e.code(), Some("temporarily_unavailable"));
    // The SDK hands the caller the service's Retry-After.
    let wait = e.retry_after().expect("a Retry-After on the 429");
    assert!(wait >= Duration::from_secs(1), "{wait:?}");
    assert_refused(&tts, "temporarily_unavailable");
    let limited_source = tts.source(LIMITED).await;
    let raw = post(
        writ_sdk::tls::client_config(&limited_source, writ_sdk::tls::Authorizer::id(id(TTS)))
            .unwrap(),
        form(&[("scope", "read")]),
    )
    .await
    .unwrap();
    assert_eq!(raw.status(), 429);
    let retry: u64 = raw.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);

    // JWT-SVID client assertion, no client certificate: accepted for a caller whose rule
    // allows it, with audience = the service's issuer.
    let mut workload = WorkloadClient::connect(&tts.stack.endpoint())
        .await
        .unwrap();
    let assertion = jwt_svid(&mut workload, &[ISSUER.to_owned()], PROXIED).await;
    let ok = post(
        anonymous.clone(),
        form(&[
            ASSERTION_TYPE,
            ("client_assertion", &assertion),
            ("scope", "read"),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);
    let issued: Value = ok.json().await.unwrap();
    let claims = decode_claims(issued["access_token"].as_str().unwrap());
    assert_eq!(claims["req_wl"], id(PROXIED).to_string());
    assert_eq!(claims["act"]["sub"], id(PROXIED).to_string());
    let line = tts.last_audit();
    assert_eq!(line["decision"], "granted");
    assert_eq!(line["client_auth"], "jwt-svid");

    // The same assertion a second time is a replay (RFC 7523 section 3): refused.
    let replayed = post(
        anonymous.clone(),
        form(&[
            ASSERTION_TYPE,
            ("client_assertion", &assertion),
            ("scope", "read"),
        ]),
    )
    .await
    .unwrap();
    assert_eq!(replayed.status(), 401);
    let body: Value = replayed.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(
        body["error_description"],
        "client assertion was already used"
    );
    assert_refused(&tts, "invalid_client");

    // ... refused for a caller whose rule does not allow it, and for another audience.
    let gateway_assertion = jwt_svid(&mut workload, &[ISSUER.to_owned()], GATEWAY).await;
    let wrong_audience = jwt_svid(
        &mut workload,
        &["https://elsewhere.example".to_owned()],
        PROXIED,
    )
    .await;
    for assertion in [gateway_assertion, wrong_audience, "not-a-jwt".to_owned()] {
        let response = post(
            anonymous.clone(),
            form(&[ASSERTION_TYPE, ("client_assertion", &assertion)]),
        )
        .await
        .unwrap();
        assert_eq!(response.status(), 401);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");
        assert_refused(&tts, "invalid_client");
    }
}

/// The form field naming a JWT-SVID client assertion.
const ASSERTION_TYPE: (&str, &str) = (
    "client_assertion_type",
    writ_sdk::oauth::CLIENT_ASSERTION_TYPE_JWT_SPIFFE,
);

/// A JWT-SVID of `path` for `audience`, from the Workload API.
async fn jwt_svid(workload: &mut WorkloadClient, audience: &[String], path: &str) -> String {
    workload
        .fetch_jwt(audience, Some(&id(path)))
        .await
        .unwrap()
        .remove(0)
        .1
}

/// A self-signed CA of another trust domain and a leaf SVID from it.
fn foreign_svid(
    spiffe_id: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.subject_alt_names = vec![SanType::URI("spiffe://other.org".try_into().unwrap())];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (
        vec![leaf.der().clone(), ca_cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_keep_verifying_until_their_tokens_expire() {
    let clock = ManualClock::new(SystemTime::now());
    let tts = Tts::start(None, Arc::new(clock.clone())).await;
    let gateway = tts.client(GATEWAY).await;
    let source = tts.source(GATEWAY).await;
    let (_, seed) = tts.initial_token(clock.unix_seconds());
    let before = gateway.replace(&seed, None).await.unwrap();
    let old_kid = decode_header(&before.access_token)["kid"].clone();

    // Past the rotation period (1h): the next token is signed by a new key, and the JWKS
    // publishes both.
    clock.advance(Duration::from_secs(3601));
    let (_, seed2) = tts.initial_token(clock.unix_seconds());
    let after = gateway.replace(&seed2, None).await.unwrap();
    let new_kid = decode_header(&after.access_token)["kid"].clone();
    assert_ne!(old_kid, new_kid);
    let jwks = tts.jwks(&source).await;
    let kids: Vec<&Value> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["kid"])
        .collect();
    assert!(
        kids.contains(&&old_kid) && kids.contains(&&new_kid),
        "{jwks}"
    );
    verifier_from(&jwks)
        .verify_at(&after.access_token, clock.now())
        .unwrap();

    // A token signed by the old key still verifies (and may be replaced) while the key is
    // published: it is checked at a time it was still valid.
    let issued_at = decode_claims(&before.access_token)["iat"].as_i64().unwrap();
    let old_claims = verifier_from(&jwks)
        .verify_at(
            &before.access_token,
            writ_identity::clock::from_unix_seconds(issued_at),
        )
        .unwrap();
    assert_eq!(old_claims.req_wl, id(GATEWAY).to_string());

    // After the retention (policy max lifetime 15m + 1m), the old key is gone.
    clock.advance(Duration::from_secs(16 * 60 + 1));
    let (_, seed3) = tts.initial_token(clock.unix_seconds());
    gateway.replace(&seed3, None).await.unwrap();
    let jwks = tts.jwks(&source).await;
    let kids: Vec<&Value> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| &k["kid"])
        .collect();
    assert!(!kids.contains(&&old_kid), "{jwks}");

    // The key ring survives a restart (same file, same current key id).
    let current = tts.server.service.kid();
    let file = tts.stack.dir.path().join("txn/signing-keys.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let reloaded = writ_txn_service::txn_token::SigningKeys::load_or_create(
        file,
        Arc::new(clock.clone()),
        Duration::from_secs(3600),
        Duration::from_secs(960),
    )
    .unwrap();
    assert_eq!(reloaded.current_kid(), current);
}

/// Refusals of requests without a client certificate are recorded at most at the
/// default `audit_unauthenticated` rate per source address (a burst of 20, then one a
/// second on the service's clock); the rest are counted into one `suppressed` record.
/// An authenticated caller's exchange is still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_refusals_are_sampled_in_the_audit_log() {
    let clock = ManualClock::new(SystemTime::now());
    let tts = Tts::start(None, Arc::new(clock.clone())).await;
    let source = tts.source(GATEWAY).await;
    let tts_id = id(TTS);
    let verifier =
        SpiffeServerVerifier::new(source.bundle_source(), Arc::new(move |p| *p == tts_id));
    let mut anonymous = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"http/1.1".to_vec()];
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(anonymous)
        .build()
        .unwrap();
    let garbage = || async {
        http.post(format!("{}/token", tts.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=nonsense")
            .send()
            .await
            .unwrap()
            .status()
    };
    for _ in 0..100 {
        assert_eq!(garbage().await, 400);
    }
    let refused = |audit: &[Value]| {
        audit
            .iter()
            .filter(|l| l["decision"] == "refused" && l["caller"].is_null())
            .count()
    };
    assert_eq!(refused(&tts.audit()), 20, "the burst only");

    // An authenticated caller is always recorded.
    let (_, token) = tts.initial_token(clock.unix_seconds());
    tts.client(PLANNER)
        .await
        .replace(&token, Some("read"))
        .await
        .unwrap();
    assert_eq!(tts.last_audit()["decision"], "granted");

    // A second later the address is recorded again, after the count of the others.
    clock.advance(Duration::from_secs(1));
    assert_eq!(garbage().await, 400);
    let audit = tts.audit();
    let summary = &audit[audit.len() - 2];
    assert_eq!(summary["decision"], "suppressed", "{summary}");
    assert_eq!(summary["suppressed"], 80, "{summary}");
    assert_eq!(summary["caller_ip"], "127.0.0.1");
    assert_eq!(refused(&audit), 21);
}
