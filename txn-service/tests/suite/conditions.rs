//! CEL conditions on policy rules, through the exchange endpoint: a rule applies only
//! when its condition holds (else the next matching rule is tried), an evaluation error
//! refuses, and a sub-agent's token is held to its tool (per-tool scopes).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::clock::ManualClock;
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::{LeaseRecord, Store};
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_sdk::txn_token::{TxnToken, TxnVerifier};
use writ_txn_service::audit::AuditLog;
use writ_txn_service::exchange::{CallerId, ExchangeService, router};
use writ_txn_service::lease::Leases;
use writ_txn_service::policy::condition::ConditionError;
use writ_txn_service::policy::{Policy, PolicyError};
use writ_txn_service::txn_token::{Minter, SigningKeys};

const NOW: i64 = 1_800_000_000;
const ISSUER: &str = "https://tts.example.org";
const TD: &str = "example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const OTHER_AGENT: &str = "spiffe://example.org/agents/other";
const SEARCH_CHILD: &str = "spiffe://example.org/agents/planner/sub/search-0a0b0c0d";
const MAIL_CHILD: &str = "spiffe://example.org/agents/planner/sub/mail-0a0b0c0d";
const SHELL_CHILD: &str = "spiffe://example.org/agents/planner/sub/shell-0a0b0c0d";

struct Harness {
    app: Router,
    minter: Minter,
    verifier: TxnVerifier,
    audit: AuditLog,
}

fn harness(policy: &str, leases: Option<Leases>) -> Harness {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let audit = AuditLog::memory();
    let mut service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(policy).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock),
    )
    .with_audit(audit.clone());
    if let Some(leases) = leases {
        service = service.with_leases(leases);
    }
    Harness {
        app: router(Arc::new(service)),
        minter,
        verifier,
        audit,
    }
}

/// A Txn-Token as the service would have issued it to the gateway for alice.
fn token(h: &Harness, scope: &str, tctx: Value) -> String {
    let claims = TxnToken {
        iss: ISSUER.into(),
        iat: NOW,
        exp: NOW + 300,
        aud: TD.into(),
        txn: "0b9f2a8e-2c1d-4c43-9a36-6a3f7f0d2b11".into(),
        sub: "alice".into(),
        scope: scope.into(),
        req_wl: GATEWAY.into(),
        tctx: Some(serde_json::from_value(tctx).unwrap()),
        rctx: Some(BTreeMap::from([("req_ip".into(), json!("192.0.2.7"))])),
        act: None,
    };
    h.minter.mint(&claims).unwrap()
}

fn replacement_form(token: &str, scope: Option<&str>) -> String {
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
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

struct Reply {
    status: StatusCode,
    body: Value,
}

async fn post(app: &Router, caller: &str, body: String) -> Reply {
    let mut request = Request::post("/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    request
        .extensions_mut()
        .insert(CallerId(SpiffeId::new(caller).unwrap()));
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

#[track_caller]
fn granted(h: &Harness, reply: &Reply) -> TxnToken {
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.body);
    let token = reply.body["access_token"].as_str().unwrap();
    h.verifier
        .verify_at(token, UNIX_EPOCH + Duration::from_secs(NOW as u64))
        .unwrap()
}

#[track_caller]
fn refused(h: &Harness, reply: &Reply, status: StatusCode, code: &str) -> String {
    assert_eq!(reply.status, status, "body: {}", reply.body);
    assert_eq!(reply.body["error"], code, "body: {}", reply.body);
    assert!(reply.body.get("access_token").is_none());
    let lines = h.audit.lines();
    let line: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(line["decision"], "refused", "{line}");
    reply.body["error_description"].as_str().unwrap().to_owned()
}

/// A rule whose condition is false does not apply: the next matching rule decides.
#[tokio::test]
async fn a_false_condition_falls_through_to_the_next_rule() {
    let policy = r#"
[[caller]]
prefix = "spiffe://example.org/agents/"
condition = 'caller.path == "/agents/planner" && tctx.order == 42 && subject.sub == "alice" && rctx.req_ip == "192.0.2.7"'
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]

[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read"]
"#;
    let h = harness(policy, None);
    let t = token(&h, "orders.read orders.write", json!({"order": 42}));
    let write = granted(
        &h,
        &post(&h.app, PLANNER, replacement_form(&t, Some("orders.write"))).await,
    );
    assert_eq!(write.scope, "orders.write");
    // Another agent: the first rule's condition is false, the second caps the scope.
    let reply = post(
        &h.app,
        OTHER_AGENT,
        replacement_form(&t, Some("orders.write")),
    )
    .await;
    refused(&h, &reply, StatusCode::BAD_REQUEST, "invalid_scope");
    let read = granted(
        &h,
        &post(
            &h.app,
            OTHER_AGENT,
            replacement_form(&t, Some("orders.read")),
        )
        .await,
    );
    assert_eq!(read.scope, "orders.read");
    // The planner on another order: the condition reads the token's tctx.
    let t = token(&h, "orders.read orders.write", json!({"order": 7}));
    let reply = post(&h.app, PLANNER, replacement_form(&t, Some("orders.write"))).await;
    refused(&h, &reply, StatusCode::BAD_REQUEST, "invalid_scope");
}

/// No fall-through when every candidate is conditional and none holds; and a condition
/// that cannot be evaluated refuses at once, even with a generous rule after it.
#[tokio::test]
async fn no_holding_condition_or_an_evaluation_error_refuses() {
    let policy = r#"
[[caller]]
id = "spiffe://example.org/agents/planner"
condition = 'request.scope.all(s, s.endsWith(".read"))'
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]

[[caller]]
id = "spiffe://example.org/agents/other"
condition = 'tctx.missing == 1'
subject_token_types = ["txn_token"]
max_scope = ["orders.read"]

[[caller]]
prefix = "spiffe://example.org/agents/other"
subject_token_types = ["txn_token"]
max_scope = ["orders.read"]
"#;
    let h = harness(policy, None);
    let t = token(&h, "orders.read orders.write", json!({"order": 42}));
    granted(
        &h,
        &post(&h.app, PLANNER, replacement_form(&t, Some("orders.read"))).await,
    );
    let reply = post(&h.app, PLANNER, replacement_form(&t, Some("orders.write"))).await;
    let why = refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
    assert!(why.contains("condition holds"), "{why}");
    let reply = post(
        &h.app,
        OTHER_AGENT,
        replacement_form(&t, Some("orders.read")),
    )
    .await;
    let why = refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
    assert!(why.contains("policy rule 1"), "{why}");
}

/// A policy with a bad condition is refused when it loads, naming the rule and the
/// problem.
#[test]
fn bad_conditions_are_refused_when_the_policy_loads() {
    let policy = |condition: &str| {
        format!(
            "[[caller]]\nid = \"{GATEWAY}\"\nsubject_token_types = [\"txn_token\"]\nmax_scope = [\"a\"]\n\
             [[caller]]\nid = \"{PLANNER}\"\nsubject_token_types = [\"txn_token\"]\nmax_scope = [\"a\"]\n\
             condition = '''{condition}'''\n"
        )
    };
    type Check = fn(&ConditionError) -> bool;
    let cases: [(&str, Check, &str); 6] = [
        (
            "tctx.tool ==",
            |e| matches!(e, ConditionError::Syntax(_)),
            "does not compile",
        ),
        (
            "user.admin",
            |e| matches!(e, ConditionError::UnknownVariable { .. }),
            "unknown variable `user`",
        ),
        (
            "size(tctx) + 1",
            |e| matches!(e, ConditionError::NotBool { .. }),
            "must be a bool",
        ),
        (
            // Loops that would never end on a real machine: refused, not run.
            "subject.groups.all(a, subject.groups.all(b, subject.groups.all(c, a == b)))",
            |e| matches!(e, ConditionError::TooLarge(_)),
            "nested deeper",
        ),
        (
            "tctx.a.all(x, tctx.b.exists(y, x + y == 'ab'))",
            |e| matches!(e, ConditionError::TooCostly { .. }),
            "steps",
        ),
        (
            "sh('reboot')",
            |e| matches!(e, ConditionError::UnknownFunction { .. }),
            "unknown or unsupported function `sh`",
        ),
    ];
    for (condition, check, text) in cases {
        let err = Policy::from_toml(&policy(condition)).unwrap_err();
        match &err {
            PolicyError::Condition { index: 1, error } => assert!(check(error), "{err}"),
            other => panic!("{condition}: {other:?}"),
        }
        let message = err.to_string();
        assert!(message.starts_with("caller rule 1: "), "{message}");
        assert!(message.contains(text), "{message}");
    }
    let huge = format!("tctx.tool == '{}'", "x".repeat(2000));
    let err = Policy::from_toml(&policy(&huge)).unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}

async fn lease_store(children: &[(&str, &str)]) -> (tempfile::TempDir, Leases) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        writ_identity::store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite3"))
            .await
            .unwrap(),
    );
    for (i, (child, task)) in children.iter().enumerate() {
        store
            .create_lease(&LeaseRecord {
                id: format!("lease-{task}"),
                child_id: SpiffeId::new(child).unwrap(),
                parent_id: SpiffeId::new(PLANNER).unwrap(),
                entry_id: "entry".into(),
                agent_id: SpiffeId::new("spiffe://example.org/writ/agent/test").unwrap(),
                depth: 1,
                task: (*task).into(),
                child_pid: 100 + i32::try_from(i).unwrap(),
                child_start_time: 1,
                created_at: NOW,
                expires_at: NOW + 300,
                released_at: None,
            })
            .await
            .unwrap();
    }
    (dir, Leases::new(store))
}

const TOOL_POLICY: &str = r#"
[[caller]]
id = "spiffe://example.org/agents/planner"
subject_token_types = ["txn_token"]
max_scope = ["search.query", "mail.send"]

[[caller]]
prefix = "spiffe://example.org/agents/planner/sub/"
condition = 'lease.task == "search"'
subject_token_types = ["txn_token"]
max_scope = ["search.query"]

[[caller]]
prefix = "spiffe://example.org/agents/planner/sub/"
condition = 'lease.task == "mail" && request.scope.all(s, s == "mail.send")'
subject_token_types = ["txn_token"]
max_scope = ["mail.send"]
"#;

/// Per-tool scopes: each sub-agent, by its lease's task, gets a token for its own tool
/// only; a child of another task gets nothing.
#[tokio::test]
async fn a_sub_agent_gets_tokens_for_its_own_tool_only() {
    let (_dir, leases) = lease_store(&[
        (SEARCH_CHILD, "search"),
        (MAIL_CHILD, "mail"),
        (SHELL_CHILD, "shell"),
    ])
    .await;
    let h = harness(TOOL_POLICY, Some(leases));
    let t = token(&h, "search.query mail.send", json!({}));
    // The planner holds both; it passes its token on to each child.
    let planner = post(
        &h.app,
        PLANNER,
        replacement_form(&t, Some("search.query mail.send")),
    )
    .await;
    let planner_token = planner.body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(granted(&h, &planner).scope, "mail.send search.query");

    let search = granted(
        &h,
        &post(
            &h.app,
            SEARCH_CHILD,
            replacement_form(&planner_token, Some("search.query")),
        )
        .await,
    );
    assert_eq!(search.scope, "search.query");
    assert_eq!(search.req_wl, SEARCH_CHILD);
    let reply = post(
        &h.app,
        SEARCH_CHILD,
        replacement_form(&planner_token, Some("mail.send")),
    )
    .await;
    refused(&h, &reply, StatusCode::BAD_REQUEST, "invalid_scope");

    let mail = granted(
        &h,
        &post(
            &h.app,
            MAIL_CHILD,
            replacement_form(&planner_token, Some("mail.send")),
        )
        .await,
    );
    assert_eq!(mail.scope, "mail.send");
    // The mail rule also refuses a request that names another tool's scope outright.
    let reply = post(
        &h.app,
        MAIL_CHILD,
        replacement_form(&planner_token, Some("mail.send search.query")),
    )
    .await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");

    // A child whose task no rule names gets nothing.
    let reply = post(
        &h.app,
        SHELL_CHILD,
        replacement_form(&planner_token, Some("search.query")),
    )
    .await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
}

/// A tool pinned through the transaction context: the child's task must be the tool
/// the transaction was started for (`tctx.tool`), which no replacement can change.
#[tokio::test]
async fn a_sub_agent_is_held_to_the_transactions_tool() {
    let policy = r#"
[[caller]]
id = "spiffe://example.org/agents/planner"
subject_token_types = ["txn_token"]
max_scope = ["tools.call"]

[[caller]]
prefix = "spiffe://example.org/agents/planner/sub/"
condition = 'lease != null && has(tctx.tool) && lease.task == tctx.tool'
subject_token_types = ["txn_token"]
max_scope = ["tools.call"]
"#;
    let (_dir, leases) = lease_store(&[(SEARCH_CHILD, "search"), (MAIL_CHILD, "mail")]).await;
    let h = harness(policy, Some(leases));
    let t = token(&h, "tools.call", json!({"tool": "search"}));
    let planner = post(&h.app, PLANNER, replacement_form(&t, Some("tools.call"))).await;
    let planner_token = planner.body["access_token"].as_str().unwrap().to_owned();
    granted(&h, &planner);
    granted(
        &h,
        &post(
            &h.app,
            SEARCH_CHILD,
            replacement_form(&planner_token, Some("tools.call")),
        )
        .await,
    );
    let reply = post(
        &h.app,
        MAIL_CHILD,
        replacement_form(&planner_token, Some("tools.call")),
    )
    .await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
    // A token without a tool: `has` is false, nothing applies.
    let t = token(&h, "tools.call", json!({}));
    let reply = post(
        &h.app,
        SEARCH_CHILD,
        replacement_form(&t, Some("tools.call")),
    )
    .await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
}

/// A new token from a real OIDC access token: the condition reads the verified claims,
/// the request's `request_details` (`tctx`) and the `rctx` the token will carry.
#[tokio::test]
async fn conditions_read_oidc_claims_and_the_new_tokens_contexts() {
    use writ_tests::oidc_provider;
    let Some(provider) = oidc_provider::Provider::start() else {
        return;
    };
    let clock = ManualClock::new(std::time::SystemTime::now());
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let oidc = writ_txn_service::oidc::OidcValidator::new(
        vec![provider.config()],
        Arc::new(clock.clone()),
    )
    .unwrap();
    let policy = format!(
        r#"
[[caller]]
id = "spiffe://example.org/gateway"
condition = '''subject.sub == "{client}" && request.subject_token_type == "access_token" && tctx.action == "refund" && rctx.transport == "mtls" && rctx.req_ip == "127.0.0.1" && rctx.device == "kiosk-7" && caller.id == "{GATEWAY}" && lease == null'''
subject_token_types = ["access_token"]
max_scope = ["read"]
"#,
        client = provider.client_id
    );
    let audit = AuditLog::memory();
    let service = ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(&policy).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    )
    .with_oidc(Arc::new(oidc))
    .with_audit(audit.clone());
    let h = Harness {
        app: router(Arc::new(service)),
        verifier: TxnVerifier::new(
            TrustDomain::new(TD).unwrap(),
            BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
        ),
        minter,
        audit,
    };
    let subject = provider.access_token("read write").await;
    let exchange = |details: &str| {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
                ("requested_token_type", TokenType::TxnToken.as_urn()),
                ("audience", TD),
                ("subject_token", subject.as_str()),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:access_token",
                ),
                ("request_context", "{\"device\":\"kiosk-7\"}"),
                ("request_details", details),
                ("scope", "read"),
            ])
            .finish();
        let mut request = Request::post("/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        request
            .extensions_mut()
            .insert(CallerId(SpiffeId::new(GATEWAY).unwrap()));
        request.extensions_mut().insert(axum::extract::ConnectInfo(
            "127.0.0.1:40000".parse::<std::net::SocketAddr>().unwrap(),
        ));
        request
    };
    let send = |request: Request<Body>| {
        let app = h.app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            Reply {
                status,
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            }
        }
    };
    let reply = send(exchange("{\"order\":42,\"action\":\"refund\"}")).await;
    assert_eq!(reply.status, StatusCode::OK, "body: {}", reply.body);
    let token = reply.body["access_token"].as_str().unwrap();
    let claims = h.verifier.verify_at(token, clock_now(&clock)).unwrap();
    assert_eq!(claims.scope, "read");
    let reply = send(exchange("{\"order\":42,\"action\":\"delete\"}")).await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
    // No `action` at all: the condition cannot be evaluated; refused all the same.
    let reply = send(exchange("{\"order\":42}")).await;
    refused(&h, &reply, StatusCode::FORBIDDEN, "unauthorized_client");
}

fn clock_now(clock: &ManualClock) -> std::time::SystemTime {
    use writ_identity::clock::Clock as _;
    clock.now()
}
