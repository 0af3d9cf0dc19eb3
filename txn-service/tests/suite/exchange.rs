//! The RFC 8693 token exchange endpoint through its axum router (`oneshot`): the
//! replacement chain, the policy, every error code with its status, hostile bodies and
//! the two well-known documents.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util_shim::collect;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::bundle::Jwk;
use writ_identity::clock::{Clock, ManualClock};
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_sdk::txn_token::{TXN_TOKEN_TYP, TxnToken, TxnVerifier};
use writ_txn_service::audit::AuditLog;
use writ_txn_service::exchange::{
    CallerId, ExchangeService, MAX_BODY_BYTES, MAX_CONTEXT_BYTES, router,
};
use writ_txn_service::oidc::OidcValidator;
use writ_txn_service::policy::Policy;
use writ_txn_service::txn_token::{Minter, SigningKeys};

/// Reads a whole response body (axum's own helper, so no extra dependency).
mod http_body_util_shim {
    pub(super) async fn collect(body: axum::body::Body) -> Vec<u8> {
        axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }
}

pub(crate) const NOW: i64 = 1_800_000_000;
pub(crate) const ISSUER: &str = "https://tts.example.org";
pub(crate) const TD: &str = "example.org";
pub(crate) const GATEWAY: &str = "spiffe://example.org/gateway";
pub(crate) const PLANNER: &str = "spiffe://example.org/agents/planner";
pub(crate) const SUB_AGENT: &str = "spiffe://example.org/agents/planner/worker";
const STRANGER: &str = "spiffe://example.org/stranger";

const POLICY: &str = r#"
[[caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["access_token"]
max_scope = ["orders.read", "orders.write"]

[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]
"#;

const RFC_ERRORS: [&str; 7] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "invalid_scope",
    "invalid_target",
    "unauthorized_client",
    "unsupported_grant_type",
];

pub(crate) struct Harness {
    pub(crate) app: Router,
    pub(crate) clock: ManualClock,
    pub(crate) minter: Minter,
    pub(crate) verifier: TxnVerifier,
}

pub(crate) fn harness_with(depth: Option<usize>) -> Harness {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let mut service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(POLICY).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    );
    if let Some(depth) = depth {
        service = service.with_max_chain_depth(depth);
    }
    Harness {
        app: router(audited(service)),
        clock,
        minter,
        verifier,
    }
}

thread_local! {
    /// The audit log of the service the current test talks to (tests run on one thread).
    static AUDIT: std::cell::RefCell<Option<AuditLog>> = const { std::cell::RefCell::new(None) };
}

/// Shares `service` and remembers its audit log for [`assert_error`].
pub(crate) fn audited(service: ExchangeService) -> Arc<ExchangeService> {
    AUDIT.with(|a| *a.borrow_mut() = Some(service.audit().clone()));
    Arc::new(service)
}

/// The last audit line of the current test's service.
pub(crate) fn last_audit() -> Value {
    let lines = AUDIT.with(|a| a.borrow().as_ref().map(AuditLog::lines).unwrap_or_default());
    serde_json::from_str(lines.last().expect("an audit line")).unwrap()
}

pub(crate) fn harness() -> Harness {
    harness_with(None)
}

/// A Txn-Token as the service would have issued it to the gateway for alice.
pub(crate) fn initial_token(h: &Harness) -> (TxnToken, String) {
    let claims = TxnToken {
        iss: ISSUER.into(),
        iat: NOW,
        exp: NOW + 300,
        aud: TD.into(),
        txn: "0b9f2a8e-2c1d-4c43-9a36-6a3f7f0d2b11".into(),
        sub: "alice".into(),
        scope: "orders.read orders.write".into(),
        req_wl: GATEWAY.into(),
        tctx: Some(BTreeMap::from([("order".into(), json!(42))])),
        rctx: Some(BTreeMap::from([("req_ip".into(), json!("192.0.2.7"))])),
        act: None,
    };
    let token = h.minter.mint(&claims).unwrap();
    (claims, token)
}

pub(crate) fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A replacement request. `scope: None` asks for the subject token's own scope, read
/// from it unverified (as `writ_sdk::exchange::TxnClient` does: draft-11 makes `scope`
/// required in every request).
pub(crate) fn replacement_form(token: &str, scope: Option<&str>) -> String {
    let own = jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token)
        .ok()
        .and_then(|c| c["scope"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "orders.read".to_owned());
    let scope = Some(scope.unwrap_or(&own));
    let mut pairs = vec![
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("requested_token_type", TokenType::TxnToken.as_urn()),
        ("audience", TD),
        ("subject_token", token),
        ("subject_token_type", TokenType::TxnToken.as_urn()),
    ];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    form(&pairs)
}

pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) cache_control: Option<String>,
    pub(crate) body: Value,
}

pub(crate) async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let cache_control = response
        .headers()
        .get(header::CACHE_CONTROL)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = collect(response.into_body()).await;
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        cache_control,
        body,
    }
}

pub(crate) fn token_request(caller: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut request = Request::post("/token")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body.into())
        .unwrap();
    if let Some(caller) = caller {
        request
            .extensions_mut()
            .insert(CallerId(SpiffeId::new(caller).unwrap()));
    }
    request
}

pub(crate) async fn post(app: &Router, caller: &str, body: impl Into<Body>) -> Reply {
    send(app, token_request(Some(caller), body)).await
}

#[track_caller]
pub(crate) fn assert_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(reply.body["error"], code, "body: {}", reply.body);
    assert!(reply.body["error_description"].is_string());
    assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
    assert!(reply.body.get("access_token").is_none());
    // Nothing was minted, and the audit line says so.
    let line = last_audit();
    assert_eq!(line["decision"], "refused", "{line}");
    assert_eq!(line["error"], code, "{line}");
    assert!(
        line["granted_scope"].is_null() && line["txn"].is_null(),
        "{line}"
    );
}

/// Checks the success response shape and returns the verified claims.
pub(crate) fn issued(h: &Harness, reply: &Reply) -> TxnToken {
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.body);
    assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
    assert_eq!(
        reply.body["issued_token_type"],
        TokenType::TxnToken.as_urn()
    );
    assert_eq!(reply.body["token_type"], "N_A");
    assert!(reply.body.get("refresh_token").is_none());
    let token = reply.body["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some(TXN_TOKEN_TYP));
    assert_eq!(header.kid.as_deref(), Some(h.minter.kid()));
    let claims = h.verifier.verify_at(token, h.clock.now()).unwrap();
    assert_eq!(
        reply.body["expires_in"].as_i64().unwrap(),
        claims.exp - h.clock.unix_seconds()
    );
    claims
}

#[tokio::test]
async fn three_hop_replacement_chain_narrows_and_never_extends() {
    let h = harness();
    let (old, token) = initial_token(&h);
    h.clock.advance(Duration::from_secs(60));

    // Hop 1: the planner narrows to orders.read.
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&token, Some("orders.read")),
    )
    .await;
    let first = issued(&h, &reply);
    assert_eq!(first.txn, old.txn);
    assert_eq!(first.sub, "alice");
    assert_eq!(first.aud, TD);
    assert_eq!(first.iss, ISSUER);
    assert_eq!(first.scope, "orders.read");
    assert_eq!(first.req_wl, PLANNER);
    assert_eq!(first.tctx, old.tctx);
    assert_eq!(first.rctx, old.rctx);
    assert_eq!(first.chain(), vec![PLANNER, GATEWAY]);
    assert_eq!(first.iat, NOW + 60);
    assert_eq!(
        first.exp, old.exp,
        "5 minutes from now is capped at the old exp"
    );
    assert_eq!(reply.body["expires_in"], 240);

    // Hop 2: the sub-agent, no scope asked: keeps what it had.
    h.clock.advance(Duration::from_secs(30));
    let token1 = reply.body["access_token"].as_str().unwrap().to_owned();
    let reply = post(&h.app, SUB_AGENT, replacement_form(&token1, None)).await;
    let second = issued(&h, &reply);
    assert_eq!(second.txn, old.txn);
    assert_eq!(second.sub, "alice");
    assert_eq!(second.scope, "orders.read");
    assert_eq!(second.req_wl, SUB_AGENT);
    assert_eq!(second.chain(), vec![SUB_AGENT, PLANNER, GATEWAY]);
    assert!(second.exp <= first.exp);
    assert_eq!(second.exp, old.exp);

    // Widening is refused, even to a scope the policy and the original token allow.
    let reply = post(
        &h.app,
        SUB_AGENT,
        replacement_form(&token1, Some("orders.read orders.write")),
    )
    .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
}

#[tokio::test]
async fn replacement_of_an_expired_txn_token_is_refused() {
    let h = harness();
    let (_, token) = initial_token(&h);
    // Inside the verifier's leeway but past exp: still refused, never re-extended.
    h.clock.advance(Duration::from_secs(310));
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    h.clock.advance(Duration::from_secs(3600));
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn tampered_and_foreign_txn_tokens_are_invalid_request() {
    let h = harness();
    let (claims, token) = initial_token(&h);
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    let reply = post(&h.app, PLANNER, replacement_form(&tampered, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    let foreign = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&foreign.mint(&claims).unwrap(), None),
    )
    .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    // Same key, another issuer URL.
    let mut other = claims.clone();
    other.iss = "https://other.example.org".into();
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&h.minter.mint(&other).unwrap(), None),
    )
    .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    let reply = post(&h.app, PLANNER, replacement_form("not.a.jwt", None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

/// On replacement, a Txn-Token that verifies but is not valid yet (`nbf`), claims a
/// lifetime the service never issues, or carries an `act` of the wrong shape is refused
/// as an invalid subject token (defense in depth: the service's key signed it).
#[tokio::test]
async fn replacement_checks_nbf_exp_bounds_and_act_shape() {
    let h = harness();
    let (claims, _) = initial_token(&h);
    let raw = serde_json::to_value(&claims).unwrap();
    let signed = |extra: Value| {
        let mut c = raw.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        h.minter.sign(TXN_TOKEN_TYP, &c).unwrap()
    };
    for (extra, what) in [
        (json!({"nbf": NOW + 120}), "not valid yet"),
        (json!({"exp": NOW + 5 * 365 * 86_400}), "expires"),
        (json!({"exp": i64::MAX}), "exp"),
        (
            json!({"act": {"sub": "alice"}}),
            "delegation chain is malformed",
        ),
        (
            json!({"act": {"sub": GATEWAY, "act": "x"}}),
            "delegation chain is malformed",
        ),
        (json!({"act": null}), "delegation chain is malformed"),
    ] {
        let reply = post(
            &h.app,
            PLANNER,
            replacement_form(&signed(extra.clone()), None),
        )
        .await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
        let description = reply.body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with("subject_token:") && description.contains(what),
            "{extra}: {description}"
        );
    }
    // The same token with a sane nbf and a well-formed chain is replaced.
    let ok = signed(json!({"nbf": NOW, "act": {"sub": GATEWAY}}));
    let reply = post(&h.app, PLANNER, replacement_form(&ok, None)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn chain_depth_is_limited() {
    let h = harness_with(Some(2));
    let (_, token) = initial_token(&h);
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    let first = issued(&h, &reply);
    assert_eq!(first.chain().len(), 2);
    let token1 = reply.body["access_token"].as_str().unwrap();
    let reply = post(&h.app, SUB_AGENT, replacement_form(token1, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn policy_refusals_are_unauthorized_client() {
    let h = harness();
    let (_, token) = initial_token(&h);
    // No rule names the caller.
    let reply = post(&h.app, STRANGER, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
    let reply = post(
        &h.app,
        "spiffe://other.org/agents/x",
        replacement_form(&token, None),
    )
    .await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
    // The gateway may present access tokens only, not Txn-Tokens.
    let reply = post(&h.app, GATEWAY, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
    // Agents may not present access tokens.
    let body = form(&[
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("requested_token_type", TokenType::TxnToken.as_urn()),
        ("audience", TD),
        ("subject_token", "eyJ.eyJ.sig"),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("scope", "orders.read"),
    ]);
    let reply = post(&h.app, PLANNER, body.clone()).await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
    // The gateway may, but no OpenID Provider is configured here.
    let reply = post(&h.app, GATEWAY, body).await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
}

#[tokio::test]
async fn missing_caller_is_invalid_client() {
    let h = harness();
    let (_, token) = initial_token(&h);
    let reply = send(&h.app, token_request(None, replacement_form(&token, None))).await;
    assert_error(&reply, StatusCode::UNAUTHORIZED, "invalid_client");
}

#[tokio::test]
async fn every_request_error_has_its_code_and_status() {
    let h = harness();
    let (_, token) = initial_token(&h);
    let t = token.as_str();
    let base = |skip: &str, extra: &[(&'static str, &'static str)]| {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
            ("requested_token_type", TokenType::TxnToken.as_urn()),
            ("audience", TD),
            ("subject_token", t),
            ("subject_token_type", TokenType::TxnToken.as_urn()),
            ("scope", "orders.read"),
        ];
        pairs.retain(|(k, _)| *k != skip && !extra.iter().any(|(e, _)| e == k));
        pairs.extend_from_slice(extra);
        form(&pairs)
    };
    let big_details = format!("{{\"k\":\"{}\"}}", "x".repeat(MAX_CONTEXT_BYTES));
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            base("grant_type", &[("grant_type", "authorization_code")]),
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            base("grant_type", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base(
                "requested_token_type",
                &[(
                    "requested_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                )],
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("requested_token_type", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("audience", &[("audience", "other.org")]),
            StatusCode::BAD_REQUEST,
            "invalid_target",
        ),
        (
            base("audience", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("", &[("resource", "https://api.example.org")]),
            StatusCode::BAD_REQUEST,
            "invalid_target",
        ),
        (
            base("subject_token", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("subject_token_type", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base(
                "subject_token_type",
                &[(
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:saml2",
                )],
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base(
                "subject_token_type",
                &[(
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:unsigned_json",
                )],
            ),
            StatusCode::FORBIDDEN,
            "unauthorized_client",
        ),
        (
            base(
                "subject_token_type",
                &[(
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:refresh_token",
                )],
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // draft-11: `scope` is required.
        (
            base("scope", &[]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base(
                "",
                &[
                    ("actor_token", "x.y.z"),
                    ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("", &[("scope", "orders\"read")]),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            base("", &[("scope", "")]),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            base("", &[("scope", "admin")]),
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            base("", &[("request_details", "{not json")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("", &[("request_details", "[1,2]")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("", &[("request_details", "{\"a\":1,\"a\":2}")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            base("", &[("request_context", "\"text\"")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Valid JSON, but a replacement keeps tctx/rctx.
        (
            base("", &[("request_details", "{\"a\":1}")]),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            format!("{}&request_details={}", base("", &[]), enc(&big_details)),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Duplicated parameters, even with the same value.
        (
            format!("{}&audience={TD}", base("", &[])),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            format!(
                "{}&grant_type={}",
                base("", &[]),
                enc(GRANT_TYPE_TOKEN_EXCHANGE)
            ),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // Invalid UTF-8 after percent-decoding.
        (
            format!("{}&x=%FF%FE", base("", &[])),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        // A field over 16 KiB.
        (
            format!("{}&x={}", base("", &[]), "a".repeat(16 * 1024 + 1)),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let reply = post(&h.app, PLANNER, body.clone()).await;
        assert_eq!(reply.status, status, "{body:.200} -> {}", reply.body);
        assert_eq!(reply.body["error"], code, "{body:.200} -> {}", reply.body);
        assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
    }
    // Unknown parameters are ignored (RFC 6749 section 3.2).
    let reply = post(&h.app, PLANNER, base("", &[("client_id", "whatever")])).await;
    issued(&h, &reply);
}

#[tokio::test]
async fn wrong_content_type_and_oversized_bodies_are_invalid_request() {
    let h = harness();
    let (_, token) = initial_token(&h);
    let mut request = token_request(Some(PLANNER), replacement_form(&token, None));
    request
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    assert_error(
        &send(&h.app, request).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let mut request = token_request(Some(PLANNER), replacement_form(&token, None));
    request.headers_mut().remove(header::CONTENT_TYPE);
    assert_error(
        &send(&h.app, request).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    // A charset parameter is fine.
    let mut request = token_request(Some(PLANNER), replacement_form(&token, None));
    request.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/x-www-form-urlencoded; charset=UTF-8"
            .parse()
            .unwrap(),
    );
    issued(&h, &send(&h.app, request).await);

    let huge = format!(
        "{}&pad={}",
        replacement_form(&token, None),
        "a".repeat(MAX_BODY_BYTES)
    );
    assert_error(
        &post(&h.app, PLANNER, huge).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
    let binary: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    assert_error(
        &post(&h.app, PLANNER, binary).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );
}

#[tokio::test]
async fn jwks_publishes_the_signing_key() {
    let h = harness();
    let (_, token) = initial_token(&h);
    let reply = send(
        &h.app,
        Request::get("/.well-known/jwks.json")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let keys = reply.body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert_eq!(key["kid"], h.minter.kid());
    assert_eq!(key["use"], "sig");
    assert_eq!(key["alg"], "ES256");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    // A verifier built from the published document alone accepts the service's tokens.
    let jwk: Jwk = serde_json::from_value(key.clone()).unwrap();
    assert_eq!(jwk.thumbprint().unwrap(), h.minter.kid());
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(jwk.thumbprint().unwrap(), jwk)]),
    );
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    let issued_token = reply.body["access_token"].as_str().unwrap();
    verifier.verify_at(issued_token, h.clock.now()).unwrap();
}

#[tokio::test]
async fn authorization_server_metadata() {
    let h = harness();
    let reply = send(
        &h.app,
        Request::get("/.well-known/oauth-authorization-server")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let m = &reply.body;
    assert_eq!(m["issuer"], ISSUER);
    assert_eq!(m["token_endpoint"], format!("{ISSUER}/token"));
    assert_eq!(m["jwks_uri"], format!("{ISSUER}/.well-known/jwks.json"));
    assert_eq!(
        m["grant_types_supported"],
        json!([GRANT_TYPE_TOKEN_EXCHANGE])
    );
    assert_eq!(
        m["token_endpoint_auth_methods_supported"],
        json!(["tls_client_auth"])
    );
}

/// Form bodies built from the real parameter names and values, mutated and mixed with
/// noise, so that the parser is exercised past its first check.
fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    let names = prop::sample::select(vec![
        "grant_type",
        "requested_token_type",
        "audience",
        "scope",
        "subject_token",
        "subject_token_type",
        "actor_token",
        "request_context",
        "request_details",
        "resource",
        "x",
    ]);
    let values = prop_oneof![
        Just(GRANT_TYPE_TOKEN_EXCHANGE.to_owned()),
        Just(TokenType::TxnToken.as_urn().to_owned()),
        Just(TD.to_owned()),
        Just("orders.read".to_owned()),
        Just("{\"a\":1}".to_owned()),
        Just("eyJhbGciOiJFUzI1NiJ9.e30.sig".to_owned()),
        ".{0,40}",
        "[%&=+a-z0-9]{0,20}",
    ];
    let structured = prop::collection::vec((names, values), 0..10).prop_map(|pairs| {
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", enc(v)))
            .collect::<Vec<_>>()
            .join("&")
            .into_bytes()
    });
    prop_oneof![
        structured,
        prop::collection::vec(any::<u8>(), 0..512),
        "[%&=+a-z_:.0-9\\-]{0,300}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bodies_always_get_an_rfc_6749_error(body in body_strategy()) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let h = harness();
        let reply = runtime.block_on(post(&h.app, PLANNER, body));
        prop_assert!(reply.status.is_client_error(), "status {}", reply.status);
        let code = reply.body["error"].as_str().unwrap_or_default();
        prop_assert!(RFC_ERRORS.contains(&code), "error {code:?}");
        prop_assert!(reply.body["error_description"].is_string());
        prop_assert_eq!(reply.cache_control.as_deref(), Some("no-store"));
    }
}

/// The OIDC path end to end: a real `oidc-provider` access token is exchanged by the
/// gateway, then replaced by an agent.
#[tokio::test]
async fn exchanges_a_real_oidc_access_token() {
    let Some(provider) = oidc_provider::Provider::start() else {
        return;
    };
    let clock = ManualClock::new(std::time::SystemTime::now());
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let oidc = OidcValidator::new(vec![provider.config()], Arc::new(clock.clone())).unwrap();
    let policy = Policy::from_toml(
        r#"
        [[caller]]
        id = "spiffe://example.org/gateway"
        subject_token_types = ["access_token", "jwt"]
        max_scope = ["read"]
        [[caller]]
        prefix = "spiffe://example.org/agents"
        subject_token_types = ["txn_token"]
        max_scope = ["read", "write"]
        "#,
    )
    .unwrap();
    let service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        policy,
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    )
    .with_oidc(Arc::new(oidc));
    let h = Harness {
        app: router(audited(service)),
        clock,
        minter,
        verifier,
    };
    let subject = provider.access_token("read write").await;
    let exchange = |scope: Option<&'static str>, context: &'static str| {
        let mut pairs = vec![
            ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
            ("requested_token_type", TokenType::TxnToken.as_urn()),
            ("audience", TD),
            ("subject_token", subject.as_str()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("request_context", context),
            ("request_details", "{\"order\":42,\"action\":\"refund\"}"),
        ];
        if let Some(scope) = scope {
            pairs.push(("scope", scope));
        }
        let mut request = token_request(Some(GATEWAY), form(&pairs));
        request.extensions_mut().insert(axum::extract::ConnectInfo(
            "127.0.0.1:40000".parse::<std::net::SocketAddr>().unwrap(),
        ));
        request
    };

    // No scope asked: refused (draft-11 requires it).
    let reply = send(&h.app, exchange(None, "{}")).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    // Token scope (read write) ∩ asked (read write) ∩ ceiling (read).
    let reply = send(
        &h.app,
        exchange(Some("read write"), "{\"device\":\"kiosk-7\"}"),
    )
    .await;
    let claims = issued(&h, &reply);
    assert_eq!(claims.sub, provider.client_id);
    assert_eq!(claims.scope, "read");
    assert_eq!(claims.req_wl, GATEWAY);
    assert_eq!(claims.aud, TD);
    assert_eq!(claims.iss, ISSUER);
    assert!(claims.act.is_none());
    assert!(uuid::Uuid::parse_str(&claims.txn).is_ok());
    assert!(claims.exp - claims.iat <= 300);
    let rctx = claims.rctx.clone().unwrap();
    assert_eq!(rctx["req_ip"], "127.0.0.1");
    assert_eq!(rctx["transport"], "mtls");
    assert_eq!(rctx["device"], "kiosk-7");
    let tctx = claims.tctx.clone().unwrap();
    assert_eq!(tctx["order"], 42);
    assert_eq!(tctx["action"], "refund");

    // Two exchanges of the same subject token are two transactions.
    let again = issued(&h, &send(&h.app, exchange(Some("read"), "{}")).await);
    assert_ne!(again.txn, claims.txn);

    // A scope outside the ceiling, and a caller-set reserved rctx member.
    let reply = send(&h.app, exchange(Some("write"), "{}")).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let reply = send(
        &h.app,
        exchange(Some("read"), "{\"transport\":\"carrier-pigeon\"}"),
    )
    .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    // A tampered access token.
    let mut tampered = subject.clone();
    tampered.insert(tampered.len() / 2, 'x');
    let body = form(&[
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("requested_token_type", TokenType::TxnToken.as_urn()),
        ("audience", TD),
        ("subject_token", &tampered),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("scope", "read"),
    ]);
    assert_error(
        &post(&h.app, GATEWAY, body).await,
        StatusCode::BAD_REQUEST,
        "invalid_request",
    );

    // The agent replaces the gateway's token: chain grows, scope cannot widen to write.
    let token = reply_token(&send(&h.app, exchange(Some("read"), "{}")).await);
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&token, Some("read write")),
    )
    .await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let replaced = issued(
        &h,
        &post(&h.app, PLANNER, replacement_form(&token, None)).await,
    );
    assert_eq!(replaced.chain(), vec![PLANNER, GATEWAY]);
    assert_eq!(replaced.sub, provider.client_id);
    assert_eq!(replaced.scope, "read");
}

fn reply_token(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.body);
    reply.body["access_token"].as_str().unwrap().to_owned()
}

use writ_tests::oidc_provider;

/// Every way an OIDC subject token can be bad, through the exchange: `invalid_request`
/// (RFC 8693 section 2.2.2), nothing minted, one refused audit line each.
#[tokio::test]
async fn bad_oidc_subject_tokens_are_invalid_request() {
    let Some(provider) = oidc_provider::Provider::start() else {
        return;
    };
    let clock = ManualClock::new(std::time::SystemTime::now());
    let service_for = |audience: &str| {
        let mut config = provider.config();
        config.audiences = vec![audience.to_owned()];
        let oidc = OidcValidator::new(vec![config], Arc::new(clock.clone())).unwrap();
        let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
        let service = ExchangeService::new(
            TrustDomain::new(TD).unwrap(),
            ISSUER,
            Policy::from_toml(
                r#"
                [[caller]]
                id = "spiffe://example.org/gateway"
                subject_token_types = ["access_token"]
                max_scope = ["read", "write"]
                "#,
            )
            .unwrap(),
            Arc::new(SigningKeys::single(minter, Arc::new(clock.clone()))),
            Arc::new(clock.clone()),
        )
        .with_oidc(Arc::new(oidc));
        router(audited(service))
    };
    let body = |token: &str| {
        form(&[
            ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
            ("requested_token_type", TokenType::TxnToken.as_urn()),
            ("audience", TD),
            ("subject_token", token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("scope", "read"),
        ])
    };
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = provider.access_token("read write").await;
    let parts: Vec<&str> = token.split('.').collect();

    // Wrong audience: the service accepts another audience.
    let app = service_for("https://someone-else.example");
    let reply = post(&app, GATEWAY, body(&token)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");

    let app = service_for(&provider.resource);
    // The token is good for this service.
    assert_eq!(
        post(&app, GATEWAY, body(&token)).await.status,
        StatusCode::OK
    );

    let now = clock.unix_seconds();
    let mut wrong_issuer = provider.claims(now);
    wrong_issuer["iss"] = json!("https://evil.example");
    let rogue_key =
        jsonwebtoken::EncodingKey::from_ec_pem(provider.rogue_key_pem.as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("rogue".into());
    let jwks = reqwest::get(format!("{}/jwks", provider.issuer))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &provider.claims(now),
        &jsonwebtoken::EncodingKey::from_secret(jwks.as_bytes()),
    )
    .unwrap();
    let cases = [
        (
            "wrong issuer",
            jsonwebtoken::encode(&header, &wrong_issuer, &rogue_key).unwrap(),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "at+jwt"})),
                parts[1]
            ),
        ),
        ("HS256 keyed with the public JWKS", hs256),
        (
            "unknown kid after refetch",
            provider.rogue_token(Some("rogue-kid"), now),
        ),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&json!({"sub": "mallory", "scope": "read write"})),
                parts[2]
            ),
        ),
    ];
    for (what, forged) in cases {
        let reply = post(&app, GATEWAY, body(&forged)).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
        assert!(
            reply.body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("subject_token"),
            "{what}: {}",
            reply.body
        );
    }

    // Expired: the same good token once the clock passes exp (and the leeway).
    let exp = jsonwebtoken::dangerous::insecure_decode::<Value>(&token)
        .map(|d| d.claims["exp"].as_i64().unwrap())
        .unwrap_or(now + 600);
    clock.set(UNIX_EPOCH + Duration::from_secs((exp + 120) as u64));
    let reply = post(&app, GATEWAY, body(&token)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

/// A service for `policy` writing its audit log to `audit`, with sub-agent leases from
/// `leases` when given.
fn service_with(
    policy: &str,
    audit: AuditLog,
    leases: Option<writ_txn_service::lease::Leases>,
) -> Harness {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let mut service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(policy).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    )
    .with_audit(audit);
    if let Some(leases) = leases {
        service = service.with_leases(leases);
    }
    Harness {
        app: router(Arc::new(service)),
        clock,
        minter,
        verifier,
    }
}

/// The audit log on `/dev/full` (every write fails with ENOSPC): no exchange is granted,
/// each is refused with 503 `temporarily_unavailable` and a `Retry-After`.
#[tokio::test]
async fn an_exchange_that_cannot_be_audited_is_refused() {
    let audit = AuditLog::open(std::path::Path::new("/dev/full")).unwrap();
    let h = service_with(POLICY, audit, None);
    let (_, token) = initial_token(&h);
    for _ in 0..40 {
        let response = h
            .app
            .clone()
            .oneshot(token_request(
                Some(PLANNER),
                replacement_form(&token, Some("orders.read")),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body: Value = serde_json::from_slice(&collect(response.into_body()).await).unwrap();
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        assert!(body.get("access_token").is_none(), "{body}");
    }

    // `audit_on_failure = "allow"` grants anyway (the failure goes to the service log).
    let audit = AuditLog::open(std::path::Path::new("/dev/full"))
        .unwrap()
        .with_on_failure(writ_txn_service::audit::OnFailure::Allow);
    let h = service_with(POLICY, audit, None);
    let (_, token) = initial_token(&h);
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&token, Some("orders.read")),
    )
    .await;
    issued(&h, &reply);
}

/// A sub-agent's exchanges count against its root parent's rate limit: a parent at its
/// limit gets nothing more through its children (or theirs), while another workload of
/// the same rule keeps its own bucket.
#[tokio::test]
async fn sub_agents_share_their_root_parents_rate_limit() {
    use writ_identity::store::{LeaseRecord, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        writ_identity::store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite3"))
            .await
            .unwrap(),
    );
    let child = |parent: &str, task: &str| format!("{parent}/sub/{task}-0a0b0c0d");
    let children = [
        child(PLANNER, "one"),
        child(PLANNER, "two"),
        child(&child(PLANNER, "one"), "deep"),
    ];
    for (i, id) in children.iter().enumerate() {
        let parent = id.rsplit_once("/sub/").unwrap().0;
        store
            .create_lease(&LeaseRecord {
                id: format!("lease-{i}"),
                child_id: SpiffeId::new(id).unwrap(),
                parent_id: SpiffeId::new(parent).unwrap(),
                entry_id: "entry".into(),
                agent_id: SpiffeId::new("spiffe://example.org/writ/agent/test").unwrap(),
                depth: u32::try_from(id.matches("/sub/").count()).unwrap(),
                task: "work".into(),
                child_pid: 100 + i32::try_from(i).unwrap(),
                child_start_time: 1,
                created_at: NOW,
                expires_at: NOW + 300,
                released_at: None,
            })
            .await
            .unwrap();
    }
    // A bucket of 2 that refills once in 1000 s: no refill during the test.
    let policy = r#"
[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]
rate_limit = { per_second = 0.001, burst = 2 }
"#;
    let h = service_with(
        policy,
        AuditLog::memory(),
        Some(writ_txn_service::lease::Leases::new(store)),
    );
    let (_, token) = initial_token(&h);
    let form = || replacement_form(&token, Some("orders.read"));
    issued(&h, &post(&h.app, PLANNER, form()).await);
    issued(&h, &post(&h.app, PLANNER, form()).await);
    assert_eq!(
        post(&h.app, PLANNER, form()).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    for id in &children {
        let reply = post(&h.app, id, form()).await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{id} counts against the planner: {}",
            reply.body
        );
        assert_eq!(reply.body["error"], "temporarily_unavailable");
    }
    // Another workload under the same rule has its own bucket.
    issued(
        &h,
        &post(&h.app, "spiffe://example.org/agents/other", form()).await,
    );
}
