//! draft-ietf-oauth-transaction-tokens-11 conformance of the token service: one test per
//! MUST / SHOULD that docs/txn.md's conformance table names (the rest are in
//! `exchange`, `txn_token`, `oidc_token_kinds` and `replicas`).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::http::StatusCode;
use serde_json::{Value, json};
use writ_identity::clock::ManualClock;
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::TrustDomain;
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_sdk::txn_token::TxnVerifier;
use writ_txn_service::exchange::{ExchangeService, router};
use writ_txn_service::policy::Policy;
use writ_txn_service::txn_token::{Minter, SigningKeys, jwk_with_kid};

use crate::exchange::{
    GATEWAY, Harness, ISSUER, NOW, PLANNER, SUB_AGENT, TD, assert_error, audited, form,
    initial_token, issued, last_audit, post, replacement_form,
};

const BATCH: &str = "spiffe://example.org/jobs/batch";
const OTHER_JOB: &str = "spiffe://example.org/other-job";

/// The exchange suite's policy plus a batch job that may assert its own subjects.
fn policy(self_signed_key: &Minter) -> String {
    let jwks = json!({"keys": [jwk_with_kid(self_signed_key.jwk(), self_signed_key.kid())]});
    format!(
        r#"
[[caller]]
id = "{BATCH}"
subject_token_types = ["unsigned_json", "self_signed"]
max_scope = ["reports.run", "reports.read"]
self_signed_jwks = '{jwks}'

[[caller]]
id = "{GATEWAY}"
subject_token_types = ["access_token"]
max_scope = ["orders.read", "orders.write"]

[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]

[[caller]]
id = "{OTHER_JOB}"
subject_token_types = ["access_token"]
max_scope = ["reports.run"]
"#
    )
}

/// A service with `max_replacements` (default when `None`), signing with its own key;
/// also the key batch jobs sign self-signed subject tokens with.
fn harness(max_replacements: Option<usize>) -> (Harness, Minter) {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let job_key = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let mut service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(&policy(&job_key)).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    );
    if let Some(max) = max_replacements {
        service = service.with_max_replacements(max);
    }
    let h = Harness {
        app: router(audited(service)),
        clock,
        minter,
        verifier,
    };
    (h, job_key)
}

fn workload_form(kind: TokenType, token: &str, scope: Option<&str>) -> String {
    let mut pairs = vec![
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("requested_token_type", TokenType::TxnToken.as_urn()),
        ("audience", TD),
        ("subject_token", token),
        ("subject_token_type", kind.as_urn()),
    ];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    form(&pairs)
}

/// The payload of a JWT, undecoded claims as JSON.
fn raw_claims(token: &str) -> Value {
    jsonwebtoken::dangerous::insecure_decode_claims::<Value>(token).unwrap()
}

/// draft-11 "Txn-Token Request": `scope` REQUIRED; its absence is `invalid_request`
/// with a description that says so.
#[tokio::test]
async fn scope_is_required_in_the_request() {
    let (h, _) = harness(None);
    let (_, token) = initial_token(&h);
    let body = form(&[
        ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
        ("requested_token_type", TokenType::TxnToken.as_urn()),
        ("audience", TD),
        ("subject_token", &token),
        ("subject_token_type", TokenType::TxnToken.as_urn()),
    ]);
    let reply = post(&h.app, PLANNER, body).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.body["error_description"]
            .as_str()
            .unwrap()
            .contains("missing `scope`"),
        "{}",
        reply.body
    );
}

/// draft-11 "Txn-Token Response": `token_type` N_A, `issued_token_type` the Txn-Token
/// URN, `access_token` the Txn-Token, never a `refresh_token`; and "JWT Body Claims":
/// every REQUIRED claim present, `req_wl` a single string, header `typ: txntoken+jwt`.
#[tokio::test]
async fn response_and_issued_token_have_every_required_member() {
    let (h, _) = harness(None);
    let reply = post(
        &h.app,
        BATCH,
        workload_form(
            TokenType::UnsignedJson,
            r#"{"sub":"alice","scope":"reports.run"}"#,
            Some("reports.run"),
        ),
    )
    .await;
    issued(&h, &reply);
    let mut members: Vec<&str> = reply
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    members.sort_unstable();
    assert_eq!(
        members,
        [
            "access_token",
            "expires_in",
            "issued_token_type",
            "token_type"
        ]
    );
    assert_eq!(reply.body["token_type"], "N_A");
    assert_eq!(
        reply.body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:txn_token"
    );
    let token = reply.body["access_token"].as_str().unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.typ.as_deref(), Some("txntoken+jwt"));
    assert!(header.kid.is_some());
    let claims = raw_claims(token);
    for claim in ["iat", "exp"] {
        assert!(claims[claim].is_i64(), "{claim}: {claims}");
    }
    for claim in ["aud", "txn", "sub", "scope", "req_wl"] {
        assert!(
            claims[claim].as_str().is_some_and(|v| !v.is_empty()),
            "{claim}: {claims}"
        );
    }
    assert_eq!(claims["iat"], NOW);
    assert_eq!(claims["aud"], TD);
    assert_eq!(claims["req_wl"], BATCH);
    assert_eq!(claims["sub"], "alice");
}

/// draft-11 "Txn-Token as a `subject_token`": a TTS SHOULD limit how many times a
/// Txn-Token is replaced. Writ refuses a replacement once the transaction was replaced
/// `max_replacements` times, counted from the signed `act` chain, so a second replica
/// with the same limit (and the same published key) refuses the same token.
#[tokio::test]
async fn replacements_are_limited_to_max_replacements_on_every_replica() {
    let (h, _) = harness(Some(2));
    let (_, t0) = initial_token(&h);
    let r1 = post(&h.app, PLANNER, replacement_form(&t0, None)).await;
    assert_eq!(issued(&h, &r1).replacements(), 1);
    let t1 = r1.body["access_token"].as_str().unwrap().to_owned();
    let r2 = post(&h.app, SUB_AGENT, replacement_form(&t1, None)).await;
    assert_eq!(issued(&h, &r2).replacements(), 2);
    let t2 = r2.body["access_token"].as_str().unwrap().to_owned();
    let reply = post(&h.app, PLANNER, replacement_form(&t2, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.body["error_description"]
            .as_str()
            .unwrap()
            .contains("already replaced 2 times"),
        "{}",
        reply.body
    );

    // Another replica: same published key, its own process state. It counts the same.
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let replica = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(&policy(&h.minter)).unwrap(),
        Arc::new(SigningKeys::single(
            h.minter.clone(),
            Arc::new(clock.clone()),
        )),
        Arc::new(clock),
    )
    .with_max_replacements(2);
    let replica = router(audited(replica));
    let reply = post(&replica, PLANNER, replacement_form(&t2, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    // With 0, no replacement at all.
    let (h, _) = harness(Some(0));
    let (_, token) = initial_token(&h);
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
}

/// draft-11: a replacement MUST NOT be issued once the replaced Txn-Token has expired,
/// even one second after `exp` (inside a verifier's usual leeway).
#[tokio::test]
async fn an_expired_txn_token_is_never_replaced() {
    let (h, _) = harness(None);
    let (claims, token) = initial_token(&h);
    h.clock
        .advance(Duration::from_secs((claims.exp - NOW) as u64));
    let reply = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        reply.body["error_description"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{}",
        reply.body
    );
}

/// draft-11: a replacement MUST NOT change `txn`, `sub` or `aud`, and keeps the chain
/// of requesters; each actor Writ adds has the actor-profile shape (`iss`,
/// `sub_profile`), and inherited actors are never rewritten.
#[tokio::test]
async fn replacement_keeps_txn_sub_aud_and_profiles_each_new_actor() {
    let (h, _) = harness(None);
    let (old, token) = initial_token(&h);
    let r1 = post(&h.app, PLANNER, replacement_form(&token, None)).await;
    let first = issued(&h, &r1);
    let t1 = r1.body["access_token"].as_str().unwrap().to_owned();
    let r2 = post(&h.app, SUB_AGENT, replacement_form(&t1, None)).await;
    let second = issued(&h, &r2);
    for t in [&first, &second] {
        assert_eq!((&t.txn, &t.sub, &t.aud), (&old.txn, &old.sub, &old.aud));
    }
    // draft-11 "Access Tokens" and "Logging": the issued token never contains the token
    // presented, and the audit line records its SHA-256, never the token itself.
    let issued_token = r2.body["access_token"].as_str().unwrap();
    assert!(!issued_token.contains(&t1) && !raw_claims(issued_token).to_string().contains(&t1));
    let line = last_audit().to_string();
    assert!(
        !line.contains(&t1) && !line.contains(issued_token),
        "{line}"
    );
    assert_eq!(
        last_audit()["subject_token_sha256"],
        writ_sdk::spiffe::fingerprint::token(&t1)
    );
    let act = &raw_claims(r2.body["access_token"].as_str().unwrap())["act"];
    assert_eq!(
        act,
        &json!({
            "sub": SUB_AGENT, "iss": "spiffe://example.org", "sub_profile": "service",
            "act": {
                "sub": PLANNER, "iss": "spiffe://example.org", "sub_profile": "service",
                "act": {"sub": GATEWAY, "iss": "spiffe://example.org", "sub_profile": "service"}
            }
        })
    );
    // An inherited actor without the profile members (a token minted before them) is
    // carried as it is.
    let mut legacy = old.clone();
    legacy.act = Some(writ_sdk::txn_token::Actor::new(GATEWAY));
    let reply = post(
        &h.app,
        PLANNER,
        replacement_form(&h.minter.mint(&legacy).unwrap(), None),
    )
    .await;
    issued(&h, &reply);
    let act = &raw_claims(reply.body["access_token"].as_str().unwrap())["act"];
    assert_eq!(act["act"], json!({"sub": GATEWAY}));
}

/// draft-11 "Unsigned JSON Object Subject Token Type", for callers a policy names, only
/// over mTLS (the exchange unit tests cover a client-assertion caller), with limits; an
/// unknown scope is refused.
#[tokio::test]
async fn unsigned_json_subject_tokens_for_named_callers() {
    let (h, _) = harness(None);
    let ok = |scope: &'static str| {
        workload_form(
            TokenType::UnsignedJson,
            r#"{"sub":"alice","scope":"reports.run reports.read admin"}"#,
            Some(scope),
        )
    };
    let claims = issued(&h, &post(&h.app, BATCH, ok("reports.run admin")).await);
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.scope, "reports.run", "capped by max_scope");
    assert_eq!(claims.req_wl, BATCH);
    assert!(claims.act.is_none());
    assert!(claims.exp - claims.iat <= 300);

    // Callers no rule names for it.
    for caller in [OTHER_JOB, PLANNER, GATEWAY] {
        let reply = post(&h.app, caller, ok("reports.run")).await;
        assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
    }
    // Unknown scope, garbage and limits: invalid_request.
    for (token, what) in [
        (r#"{"sub":"alice"}"#.to_owned(), "scope is unknown"),
        (
            r#"{"sub":"alice","scope":[]}"#.to_owned(),
            "scope is unknown",
        ),
        (r#"{"scope":"reports.run"}"#.to_owned(), "`sub`"),
        (
            r#"{"sub":"alice","scope":"reports.run","exp":1800000000}"#.to_owned(),
            "expired",
        ),
        ("not json".to_owned(), "malformed"),
        ("[\"sub\"]".to_owned(), "malformed"),
        (
            format!(
                r#"{{"sub":"alice","scope":"reports.run","x":"{}"}}"#,
                "y".repeat(5000)
            ),
            "larger than",
        ),
    ] {
        let reply = post(
            &h.app,
            BATCH,
            workload_form(TokenType::UnsignedJson, &token, Some("reports.run")),
        )
        .await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
        let description = reply.body["error_description"].as_str().unwrap();
        assert!(description.contains(what), "{token:.40}: {description}");
    }
}

/// draft-11 "Self-Signed Subject Token Type": `iss` the requesting workload, `aud` the
/// TTS, `iat`, `exp`, `sub`; the signature verified against the keys the caller's rule
/// names.
#[tokio::test]
async fn self_signed_subject_tokens_verify_against_the_rules_keys() {
    let (h, job_key) = harness(None);
    let base = json!({
        "iss": BATCH, "aud": ISSUER, "iat": NOW - 10, "exp": NOW + 60,
        "sub": "alice", "scope": "reports.read",
    });
    let signed = |key: &Minter, changes: Value| {
        let mut claims = base.clone();
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        key.sign("JWT", &claims).unwrap()
    };
    let exchange = |token: String| {
        post(
            &h.app,
            BATCH,
            workload_form(TokenType::SelfSigned, &token, Some("reports.read")),
        )
    };
    let claims = issued(&h, &exchange(signed(&job_key, json!({}))).await);
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.scope, "reports.read");
    assert_eq!(claims.req_wl, BATCH);
    assert!(claims.exp <= NOW + 60, "never outlives the subject token");

    let stranger = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    // Another signature over the same header and claims.
    let good = signed(&job_key, json!({}));
    let (signing_input, _) = good.rsplit_once('.').unwrap();
    let other = signed(&job_key, json!({"sub": "mallory"}));
    let tampered = format!("{signing_input}.{}", other.rsplit_once('.').unwrap().1);
    for (token, what) in [
        (signed(&stranger, json!({})), "unknown key"),
        (tampered, "signature"),
        (signed(&job_key, json!({"iss": OTHER_JOB})), "`iss`"),
        (signed(&job_key, json!({"iss": null})), "`iss`"),
        (signed(&job_key, json!({"aud": TD})), "`aud`"),
        (signed(&job_key, json!({"exp": NOW})), "expired"),
        (
            signed(&job_key, json!({"exp": NOW + 86_400})),
            "too far ahead",
        ),
        (
            signed(&job_key, json!({"iat": NOW - 3600})),
            "too far in the past",
        ),
        (
            signed(&job_key, json!({"iat": NOW + 3600})),
            "in the future",
        ),
        (signed(&job_key, json!({"iat": null})), "`iat`"),
        (signed(&job_key, json!({"scope": null})), "scope is unknown"),
        (signed(&job_key, json!({"sub": ""})), "`sub`"),
        ("a.b.c".to_owned(), "malformed"),
        (
            r#"{"sub":"alice","scope":"reports.read"}"#.to_owned(),
            "malformed",
        ),
    ] {
        let reply = exchange(token).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request");
        let description = reply.body["error_description"].as_str().unwrap();
        assert!(description.contains(what), "{what}: {description}");
    }
    // The token a named caller signed is still refused from another caller.
    let reply = post(
        &h.app,
        OTHER_JOB,
        workload_form(
            TokenType::SelfSigned,
            &signed(&job_key, json!({})),
            Some("reports.read"),
        ),
    )
    .await;
    assert_error(&reply, StatusCode::FORBIDDEN, "unauthorized_client");
}

/// A policy may not give `unsigned_json` or `self_signed` to a whole trust domain, nor
/// `self_signed` without keys: refused when it loads.
#[test]
fn workload_asserted_subjects_need_a_named_caller() {
    for text in [
        "[[caller]]\ntrust_domain = \"example.org\"\nsubject_token_types = [\"unsigned_json\"]\nmax_scope = [\"a\"]",
        "[[caller]]\nid = \"spiffe://example.org/a\"\nsubject_token_types = [\"self_signed\"]\nmax_scope = [\"a\"]",
    ] {
        assert!(Policy::from_toml(text).is_err(), "{text}");
    }
    assert!(
        Policy::from_toml(
            "[[caller]]\nprefix = \"spiffe://example.org/jobs/\"\nsubject_token_types = [\"unsigned_json\"]\nmax_scope = [\"a\"]"
        )
        .is_ok()
    );
}
