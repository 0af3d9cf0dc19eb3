//! The durable audit trail's endpoints: the ingest route refuses every bad batch and
//! stores nothing of it; the explorer API answers the contract and refuses garbage.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;
use writ_identity::clock::SystemClock;
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::audit::AuditEvent;
use writ_identity::store::{SharedStore, sqlite::SqliteStore};
use writ_sdk::audit::{Decision, INGEST_PATH, MAX_BATCH, MAX_BODY, VerificationRecord};
use writ_txn_service::audit::durable::DurableAudit;
use writ_txn_service::audit::ingest::{DEFAULT_INGEST_RATE, IngestState, router};
use writ_txn_service::audit::{ExplorerState, OnFailure, explorer_api};
use writ_txn_service::exchange::CallerId;

const TOOL: &str = "spiffe://example.org/demo/tool";
const GW: &str = "spiffe://example.org/demo/gateway";
const PLANNER: &str = "spiffe://example.org/demo/planner";

async fn store() -> SharedStore {
    Arc::new(SqliteStore::open_in_memory().await.unwrap())
}

fn record(service: &str) -> VerificationRecord {
    VerificationRecord {
        at_ms: 1_790_000_000_100,
        service: service.into(),
        caller: Some(PLANNER.into()),
        txn: Some("txn-1".into()),
        sub: Some("alice".into()),
        act: vec![PLANNER.into(), GW.into()],
        route: "GET /orders".into(),
        decision: Decision::Allow,
        error: None,
        latency_us: 180,
        token_sha256: Some(
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        ),
        traceparent: None,
    }
}

fn post(body: impl Into<Body>, caller: Option<&str>, content_type: &str) -> Request<Body> {
    let mut req = Request::post(INGEST_PATH)
        .header(header::CONTENT_TYPE, content_type)
        .body(body.into())
        .unwrap();
    if let Some(id) = caller {
        req.extensions_mut()
            .insert(CallerId(SpiffeId::new(id).unwrap()));
    }
    req
}

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
    let response = app.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn ingest_refuses_bad_batches_and_stores_nothing_of_them() {
    let store = store().await;
    let durable = DurableAudit::spawn(store.clone(), OnFailure::Refuse);
    let app = router(IngestState::new(
        Some(durable),
        DEFAULT_INGEST_RATE,
        Arc::new(SystemClock),
    ));
    let good = serde_json::json!({"records": [record(TOOL)]}).to_string();
    let json = "application/json";
    let forged = serde_json::json!({"records": [record(TOOL), record(GW)]}).to_string();
    let unknown = serde_json::json!({"records": [record(TOOL)], "admin": true}).to_string();
    let mut unknown_in_record = serde_json::to_value(record(TOOL)).unwrap();
    unknown_in_record["extra"] = serde_json::json!(1);
    let unknown_in_record = serde_json::json!({"records": [unknown_in_record]}).to_string();
    let too_many = serde_json::json!({"records": vec![record(TOOL); MAX_BATCH + 1]}).to_string();
    let huge = format!("{{\"records\": [], \"x\": \"{}\"}}", "a".repeat(MAX_BODY));
    let mut long_route = record(TOOL);
    long_route.route = "r".repeat(5000);
    let long_route = serde_json::json!({"records": [long_route]}).to_string();
    let cases: Vec<(&str, Request<Body>, StatusCode)> = vec![
        (
            "unauthenticated",
            post(good.clone(), None, json),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "forged service",
            post(forged, Some(TOOL), json),
            StatusCode::FORBIDDEN,
        ),
        (
            "another service's record",
            post(good.clone(), Some(GW), json),
            StatusCode::FORBIDDEN,
        ),
        (
            "malformed",
            post("{\"records\": [", Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "not JSON at all",
            post(vec![0xffu8, 0, 7], Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown field",
            post(unknown, Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "unknown record field",
            post(unknown_in_record, Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "too many records",
            post(too_many, Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty batch",
            post("{\"records\": []}", Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "over-long field",
            post(long_route, Some(TOOL), json),
            StatusCode::BAD_REQUEST,
        ),
        (
            "huge",
            post(huge, Some(TOOL), json),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "form body",
            post(
                good.clone(),
                Some(TOOL),
                "application/x-www-form-urlencoded",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (what, req, status) in cases {
        let (got, body) = send(&app, req).await;
        assert_eq!(got, status, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: a JSON error: {body}");
        assert!(body["error_description"].is_string(), "{what}: {body}");
    }
    assert_eq!(
        store.audit_anchor().await.unwrap().head_seq,
        0,
        "nothing stored"
    );

    let (status, body) = send(&app, post(good, Some(TOOL), json)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, serde_json::json!({"accepted": 1}));
    let rows = store.audit_txn("txn-1", 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].event.kind.as_str(), rows[0].event.service.as_str()),
        ("verification", TOOL)
    );
}

#[tokio::test]
async fn ingest_without_a_durable_store_is_unavailable() {
    let app = router(IngestState::new(
        None,
        DEFAULT_INGEST_RATE,
        Arc::new(SystemClock),
    ));
    let good = serde_json::json!({"records": [record(TOOL)]}).to_string();
    let (status, _) = send(&app, post(good, Some(TOOL), "application/json")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

fn event(kind: &str, caller: &str, record: serde_json::Value, at_ms: i64) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: kind.into(),
        decision: "allow".into(),
        txn: "2d1b-demo".into(),
        sub: "alice".into(),
        caller: caller.into(),
        service: String::new(),
        lease: String::new(),
        record: record.to_string(),
    }
}

async fn get(app: &axum::Router, uri: &str) -> (StatusCode, serde_json::Value) {
    let response = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get(header::CACHE_CONTROL)
            .map(|v| v.to_str().unwrap()),
        Some("no-store"),
        "{uri}"
    );
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn explorer_api_answers_the_contract_and_refuses_garbage() {
    let store = store().await;
    let mut verification = event(
        "verification",
        PLANNER,
        serde_json::json!({"act": [PLANNER, GW], "route": "GET /orders", "latency_us": 180}),
        3,
    );
    verification.service = TOOL.into();
    store
        .append_audit(&[
            event(
                "grant",
                GW,
                serde_json::json!({"act": [], "granted_scope": "orders.read", "expires_in": 300}),
                1,
            ),
            event(
                "replacement",
                PLANNER,
                serde_json::json!({"act": [PLANNER, GW]}),
                2,
            ),
            verification,
        ])
        .await
        .unwrap();
    let app = explorer_api(ExplorerState::new(store.clone()));

    let (status, list) = get(&app, "/explorer/api/txns?q=ALICE&limit=10").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["cursor"], 3);
    let txn = &list["txns"][0];
    assert_eq!(txn["txn"], "2d1b-demo");
    assert_eq!(
        (txn["grants"].as_u64(), txn["verifications"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(txn["denied"], false);
    assert_eq!(txn["workloads"], serde_json::json!([GW, PLANNER, TOOL]));
    assert_eq!(
        (txn["started_ms"].as_i64(), txn["last_ms"].as_i64()),
        (Some(1), Some(3))
    );
    let (_, none) = get(&app, "/explorer/api/txns?q=bob").await;
    assert_eq!(none["txns"], serde_json::json!([]));

    let (status, tree) = get(&app, "/explorer/api/txns/2d1b-demo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tree["root"]["id"], "user:alice");
    let gw = &tree["root"]["children"][0];
    assert_eq!(
        (gw["id"].as_str(), gw["kind"].as_str()),
        (Some(GW), Some("workload"))
    );
    assert_eq!(gw["events"][0]["scope"], "orders.read");
    assert_eq!(gw["events"][0]["expires_in"], 300);
    let tool = &gw["children"][0]["children"][0];
    assert_eq!(
        (tool["id"].as_str(), tool["kind"].as_str()),
        (Some(TOOL), Some("service"))
    );
    assert_eq!(tool["events"][0]["route"], "GET /orders");

    let (status, changes) = get(&app, "/explorer/api/changes?after=1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        changes,
        serde_json::json!({"cursor": 3, "txns": ["2d1b-demo"]})
    );
    let (_, changes) = get(&app, "/explorer/api/changes?after=3").await;
    assert_eq!(changes, serde_json::json!({"cursor": 3, "txns": []}));

    let (status, body) = get(&app, "/explorer/api/txns/unknown").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    let long_q = format!("/explorer/api/txns?q={}", "a".repeat(257));
    let long_txn = format!("/explorer/api/txns/{}", "t".repeat(129));
    let garbage = [
        long_q.as_str(),
        "/explorer/api/txns?limit=0",
        "/explorer/api/txns?limit=201",
        "/explorer/api/txns?limit=-1",
        "/explorer/api/txns?limit=ten",
        "/explorer/api/txns?limit=1&limit=2",
        long_txn.as_str(),
        "/explorer/api/txns/a%01b",
        "/explorer/api/txns/a%20b",
        "/explorer/api/txns/%C3%A9",
        "/explorer/api/changes?after=-1",
        "/explorer/api/changes?after=x",
        "/explorer/api/changes?after=99999999999999999999999",
    ];
    for uri in garbage {
        let (status, body) = get(&app, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert_eq!(body["error"], "invalid_request", "{uri}");
    }
}
