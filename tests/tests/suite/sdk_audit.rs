//! The SDK's verification records and trace context (issue 18), over real SPIFFE mTLS
//! with SVIDs from a real server and agent:
//!
//! - `TxnLayer::with_audit` leaves one record per request, allowed or refused, and
//!   `TtsSink` delivers them to a token service peer that implements the ingest shape of
//!   `writ_sdk::audit` (`POST /audit/verifications`, 202 `{"accepted": n}`, a record's
//!   `service` must be the client certificate's SPIFFE ID); no token crosses the wire;
//! - a batch the service refuses is counted and not retried, a 503 is retried;
//! - one `traceparent` started at the gateway survives gateway -> planner -> tool (and the
//!   planner's exchange request), with one trace id and a new parent id per hop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use writ_identity::clock::{Clock, SystemClock};
use writ_identity::key_manager::PrivateKey;
use writ_sdk::audit::{
    AuditSink, Decision, INGEST_PATH, MAX_BODY, MemorySink, TtsSink, VerificationBatch,
    VerificationRecord,
};
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::listener::{self, Peer};
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::spiffe::fingerprint;
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::trace::TraceContext;
use writ_sdk::txn_token::{Actor, HEADER, TxnToken, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_sdk::{SpiffeId, TrustDomain};
use writ_tests::{Stack, uid_selector};
use writ_txn_service::txn_token::{Minter, SigningKeys};

const TD: &str = "example.org";
const TTS: &str = "/svc/tts";
const GATEWAY: &str = "/svc/gateway";
const PLANNER: &str = "/svc/planner";
const TOOL: &str = "/svc/tool";
const OTHER: &str = "/svc/other";
const HOUR: Duration = Duration::from_secs(3600);
const ROOT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}{path}")).unwrap()
}

fn td() -> TrustDomain {
    TD.parse().unwrap()
}

async fn stack() -> Stack {
    let stack = Stack::start(HOUR).await;
    for path in [TTS, GATEWAY, PLANNER, TOOL, OTHER] {
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

/// Serves `app` over SPIFFE mTLS to the trust domain; its base URL.
async fn serve(app: Router, source: &X509Source) -> String {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", tcp.local_addr().unwrap());
    let source = source.clone();
    tokio::spawn(async move {
        listener::serve(
            app,
            &source,
            Authorizer::member_of(td()),
            tcp,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    url
}

/// The `traceparent` and `tracestate` a request carried.
type TraceHeaders = (Option<String>, Option<String>);

/// A token service peer with the ingest endpoint's shape, and a `/token` that records
/// the trace context it was sent and refuses.
#[derive(Clone, Default)]
struct FakeTts {
    /// Each accepted batch: the client's SPIFFE ID and the raw body.
    batches: Arc<Mutex<Vec<(String, String)>>>,
    /// Every ingest request, accepted or not.
    posts: Arc<AtomicUsize>,
    /// Answer 503 to this many ingest requests first.
    fail_next: Arc<AtomicUsize>,
    /// The `traceparent` and `tracestate` of each `/token` request.
    token_traces: Arc<Mutex<Vec<TraceHeaders>>>,
}

fn error(status: StatusCode, code: &str) -> (StatusCode, Json<Value>) {
    (
        status,
        Json(json!({ "error": code, "error_description": code })),
    )
}

impl FakeTts {
    async fn start(source: &X509Source) -> (Self, String) {
        let fake = Self::default();
        let ingest = {
            let fake = fake.clone();
            move |ConnectInfo(peer): ConnectInfo<Peer>, body: Bytes| async move {
                fake.posts.fetch_add(1, Ordering::SeqCst);
                if fake
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable");
                }
                if body.len() > MAX_BODY {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "too_large");
                }
                let Some(caller) = peer.id else {
                    return error(StatusCode::UNAUTHORIZED, "unauthenticated");
                };
                let Ok(batch) = serde_json::from_slice::<VerificationBatch>(&body) else {
                    return error(StatusCode::BAD_REQUEST, "invalid_request");
                };
                if batch.check().is_err() {
                    return error(StatusCode::BAD_REQUEST, "invalid_request");
                }
                if batch.records.iter().any(|r| r.service != caller.as_str()) {
                    return error(StatusCode::FORBIDDEN, "forbidden");
                }
                fake.batches.lock().unwrap().push((
                    caller.to_string(),
                    String::from_utf8(body.to_vec()).unwrap(),
                ));
                (
                    StatusCode::ACCEPTED,
                    Json(json!({ "accepted": batch.records.len() })),
                )
            }
        };
        let token = {
            let fake = fake.clone();
            move |headers: HeaderMap| async move {
                let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
                fake.token_traces
                    .lock()
                    .unwrap()
                    .push((header("traceparent"), header("tracestate")));
                error(StatusCode::BAD_REQUEST, "invalid_request")
            }
        };
        let app = Router::new()
            .route(INGEST_PATH, post(ingest))
            .route("/token", post(token));
        let url = serve(app, source).await;
        (fake, url)
    }

    /// Every record received, with the client that sent it.
    fn records(&self) -> Vec<(String, VerificationRecord)> {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(caller, body)| {
                let batch: VerificationBatch = serde_json::from_str(body).unwrap();
                batch.records.into_iter().map(move |r| (caller.clone(), r))
            })
            .collect()
    }
}

fn signing_keys() -> SigningKeys {
    SigningKeys::single(
        Minter::new(PrivateKey::generate().unwrap()).unwrap(),
        Arc::new(SystemClock),
    )
}

fn claims(req_wl: &str, act: Option<Actor>, scope: &str) -> TxnToken {
    let now = SystemClock.unix_seconds();
    TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: "00000000-0000-4000-8000-000000000018".into(),
        sub: "alice".into(),
        scope: scope.into(),
        req_wl: id(req_wl).to_string(),
        tctx: None,
        rctx: None,
        act,
    }
}

/// An HTTP/1.1 client presenting `source`'s SVID to exactly `server`.
fn client(source: &X509Source, server: &str) -> reqwest::Client {
    tls::http_client(source, Authorizer::id(id(server))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tts_sink_delivers_every_verification_and_never_the_token() {
    let stack = stack().await;
    let (tts, tts_url) = FakeTts::start(&source(&stack, TTS).await).await;
    let tool = source(&stack, TOOL).await;
    let tts_client = TxnClient::new(&tool, &tts_url, id(TTS)).unwrap();
    // Sent only when the test flushes, so the test decides when records arrive.
    let sink = TtsSink::builder(&tts_client)
        .flush_interval(HOUR)
        .build()
        .unwrap();
    let memory = MemorySink::new();
    let keys = signing_keys();
    let policy = TxnPolicy::new(Authorizer::id(id(GATEWAY))).require_scope("read");
    let layer = TxnLayer::new(TxnVerifier::new(td(), keys.public_keys()), policy)
        .with_audit(id(TOOL), (sink.clone(), memory.clone()));
    let app = Router::new()
        .route(
            "/orders",
            get(|v: Verified| async move { Json(json!({ "sub": v.txn.sub })) }),
        )
        .layer(layer);
    let url = format!("{}/orders", serve(app, &tool).await);
    let gateway = client(&source(&stack, GATEWAY).await, TOOL);

    let good = keys
        .mint(&claims(
            OTHER,
            Some(Actor::new(id(GATEWAY).to_string()).acting_for(Actor::new(id(OTHER).to_string()))),
            "read",
        ))
        .unwrap();
    let narrow = keys.mint(&claims(GATEWAY, None, "write")).unwrap();
    let forged = format!("{}x", &good[..good.len() - 1]);
    let calls: [(Option<&str>, StatusCode); 4] = [
        (Some(&good), StatusCode::OK),
        (None, StatusCode::UNAUTHORIZED),
        (Some(&narrow), StatusCode::FORBIDDEN),
        (Some(&forged), StatusCode::UNAUTHORIZED),
    ];
    for (token, status) in calls {
        let mut request = gateway
            .get(format!("{url}?q=secret"))
            .header("traceparent", ROOT);
        if let Some(token) = token {
            request = request.header(HEADER, token);
        }
        assert_eq!(request.send().await.unwrap().status(), status);
    }
    sink.flush().await;
    let stats = sink.stats();
    assert_eq!(
        (stats.recorded, stats.delivered, stats.dropped, stats.failed),
        (4, 4, 0, 0),
        "{stats:?}"
    );
    let received = tts.records();
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|(caller, r)| caller == id(TOOL).as_str()
                && r.service == id(TOOL).as_str()
                && r.caller.as_deref() == Some(id(GATEWAY).as_str())
                && r.route == "GET /orders"
                && r.traceparent.as_deref() == Some(ROOT))
    );
    let records: Vec<VerificationRecord> = received.into_iter().map(|(_, r)| r).collect();
    assert_eq!(records, memory.records(), "both sinks saw the same records");

    let [allowed, missing, scope, invalid] = &records[..] else {
        panic!("{records:?}");
    };
    assert_eq!(allowed.decision, Decision::Allow);
    assert_eq!(allowed.error, None);
    assert_eq!(
        allowed.txn.as_deref(),
        Some("00000000-0000-4000-8000-000000000018")
    );
    assert_eq!(allowed.sub.as_deref(), Some("alice"));
    assert_eq!(
        allowed.act,
        [id(GATEWAY).to_string(), id(OTHER).to_string()]
    );
    assert_eq!(allowed.token_sha256, Some(fingerprint::token(&good)));
    assert_eq!(
        (
            missing.decision,
            missing.error.as_deref(),
            &missing.token_sha256
        ),
        (Decision::Deny, Some("missing_txn_token"), &None)
    );
    assert_eq!(
        (scope.decision, scope.error.as_deref(), scope.sub.as_deref()),
        (Decision::Deny, Some("insufficient_scope"), Some("alice")),
        "a policy refusal names the verified transaction"
    );
    assert_eq!(
        (invalid.error.as_deref(), &invalid.txn, &invalid.sub),
        (Some("invalid_txn_token"), &None, &None),
        "claims of a token that did not verify are not recorded"
    );
    assert_eq!(invalid.token_sha256, Some(fingerprint::token(&forged)));
    let bodies = tts.batches.lock().unwrap().clone();
    for (_, body) in &bodies {
        for token in [&good, &narrow, &forged] {
            assert!(!body.contains(token.as_str()), "a token crossed the wire");
        }
        assert!(!body.contains("secret"), "the query string is not recorded");
    }

    // After a shutdown the queue is closed: later records are dropped and counted.
    sink.shutdown().await;
    sink.record(records[0].clone());
    assert_eq!(sink.stats().dropped, 1);
}

fn record_as(service: &str) -> VerificationRecord {
    VerificationRecord {
        at_ms: 1,
        service: id(service).to_string(),
        caller: None,
        txn: None,
        sub: None,
        act: vec![],
        route: "GET /".into(),
        decision: Decision::Deny,
        error: Some("missing_txn_token".into()),
        latency_us: 1,
        token_sha256: None,
        traceparent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_are_counted_and_unavailable_ones_retried() {
    let stack = stack().await;
    let (tts, tts_url) = FakeTts::start(&source(&stack, TTS).await).await;
    let other = source(&stack, OTHER).await;
    let tts_client = TxnClient::new(&other, &tts_url, id(TTS)).unwrap();
    let sink = TtsSink::builder(&tts_client)
        .flush_interval(HOUR)
        .retries(4, Duration::from_millis(10))
        .build()
        .unwrap();

    // A service records only as itself: the peer answers 403, which is not retried.
    sink.record(record_as(TOOL));
    sink.flush().await;
    assert_eq!(tts.posts.load(Ordering::SeqCst), 1);
    assert_eq!((sink.stats().delivered, sink.stats().failed), (0, 1));

    // Two 503s, then accepted.
    tts.fail_next.store(2, Ordering::SeqCst);
    for _ in 0..3 {
        sink.record(record_as(OTHER));
    }
    sink.flush().await;
    // Both 503s were answered (and retried); the three records may have left in one
    // batch or, when the sender woke between two of them, in more.
    assert_eq!(tts.fail_next.load(Ordering::SeqCst), 0);
    assert!(tts.posts.load(Ordering::SeqCst) >= 4);
    assert_eq!((sink.stats().delivered, sink.stats().failed), (3, 1));
    assert_eq!(tts.records().len(), 3);

    // Over MAX_BATCH records go as several batches; a record over the limits is not sent.
    let mut long = record_as(OTHER);
    long.route = "x".repeat(writ_sdk::audit::MAX_FIELD + 1);
    sink.record(long);
    for _ in 0..(writ_sdk::audit::MAX_BATCH + 10) {
        sink.record(record_as(OTHER));
    }
    sink.flush().await;
    let stats = sink.stats();
    assert_eq!(
        (stats.delivered, stats.failed),
        (3 + writ_sdk::audit::MAX_BATCH as u64 + 10, 2),
        "{stats:?}"
    );
    assert!(tts.batches.lock().unwrap().len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_from_gateway_through_planner_to_tool() {
    let stack = stack().await;
    let (tts, tts_url) = FakeTts::start(&source(&stack, TTS).await).await;
    let keys = signing_keys();
    let verifier = TxnVerifier::new(td(), keys.public_keys());

    // The tool answers the trace context it was handed.
    let tool_records = MemorySink::new();
    let tool = source(&stack, TOOL).await;
    let tool_app = Router::new()
        .route(
            "/search",
            get(|v: Verified| async move {
                Json(json!({
                    "trace_id": v.trace.as_ref().map(TraceContext::trace_id),
                    "parent_id": v.trace.as_ref().map(TraceContext::parent_id),
                    "tracestate": v.trace.as_ref().and_then(TraceContext::tracestate),
                }))
            }),
        )
        .layer(
            TxnLayer::new(
                verifier.clone(),
                TxnPolicy::new(Authorizer::id(id(PLANNER))),
            )
            .with_audit(id(TOOL), tool_records.clone()),
        );
    let tool_url = serve(tool_app, &tool).await;

    // The planner asks the token service (with the trace) and forwards the token to the
    // tool with `Verified::forward`.
    let planner = source(&stack, PLANNER).await;
    let planner_records = MemorySink::new();
    let to_tool = client(&planner, TOOL);
    let exchange = TxnClient::new(&planner, &tts_url, id(TTS)).unwrap();
    let planner_app = Router::new()
        .route(
            "/plan",
            get(move |v: Verified| async move {
                let refused = exchange
                    .exchange(TxnRequest::txn_token(v.token.clone()).trace(v.next_trace()))
                    .await;
                assert_eq!(refused.unwrap_err().code(), Some("invalid_request"));
                let answer: Value = v
                    .forward(to_tool.get(format!("{tool_url}/search")))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                Json(answer)
            }),
        )
        .layer(
            TxnLayer::new(verifier, TxnPolicy::new(Authorizer::id(id(GATEWAY))))
                .with_audit(id(PLANNER), planner_records.clone()),
        );
    let planner_url = serve(planner_app, &planner).await;

    let gateway = client(&source(&stack, GATEWAY).await, PLANNER);
    let token = keys.mint(&claims(GATEWAY, None, "read")).unwrap();
    let root = TraceContext::parse(ROOT).unwrap();
    let tool_saw: Value = gateway
        .get(format!("{planner_url}/plan"))
        .header(HEADER, &token)
        .header("traceparent", ROOT)
        .header("tracestate", "writ=gw")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tool_saw["trace_id"], root.trace_id(), "{tool_saw}");
    assert_ne!(
        tool_saw["parent_id"],
        root.parent_id(),
        "a new parent id per hop"
    );
    assert_eq!(tool_saw["tracestate"], "writ=gw");

    let traces = tts.token_traces.lock().unwrap().clone();
    let [(Some(exchange_parent), Some(exchange_state))] = &traces[..] else {
        panic!("the exchange carried no trace context: {traces:?}");
    };
    let exchange_trace = TraceContext::parse(exchange_parent).unwrap();
    assert_eq!(exchange_trace.trace_id(), root.trace_id());
    assert_ne!(exchange_trace.parent_id(), root.parent_id());
    assert_eq!(exchange_state, "writ=gw");

    let planner_saw = planner_records.records();
    let tool_saw_records = tool_records.records();
    assert_eq!(planner_saw.len(), 1);
    assert_eq!(tool_saw_records.len(), 1);
    assert_eq!(planner_saw[0].traceparent.as_deref(), Some(ROOT));
    let at_tool = TraceContext::parse(tool_saw_records[0].traceparent.as_deref().unwrap()).unwrap();
    assert_eq!(at_tool.trace_id(), root.trace_id());
    assert_eq!(at_tool.parent_id(), tool_saw["parent_id"]);

    // A malformed traceparent is ignored: no trace at the planner, none forwarded.
    let tool_saw: Value = gateway
        .get(format!("{planner_url}/plan"))
        .header(HEADER, &token)
        .header("traceparent", ROOT.to_uppercase())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tool_saw["trace_id"], Value::Null, "{tool_saw}");
    let planner_saw = planner_records.records();
    assert_eq!(planner_saw.len(), 2);
    assert_eq!(planner_saw[1].traceparent, None);
}
