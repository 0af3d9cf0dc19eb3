//! Overload shedding of `POST /token` ([`writ_txn_service::shed`]) through the service's
//! router: a request beyond the admission limit gets 503 with `Retry-After` and the RFC
//! 6749 error before its body is read, the JWKS and metadata are never shed, the service
//! serves again once a slot is free, every admitted exchange has its one audit line and
//! the shed ones are counted (metric and one aggregated audit line). No timing: the
//! tests hold a slot themselves to make the service "busy".
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use tower::ServiceExt as _;
use writ_identity::clock::{Clock, ManualClock};
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::TrustDomain;
use writ_sdk::txn_token::TxnVerifier;
use writ_txn_service::config::TxnConfig;
use writ_txn_service::exchange::{ExchangeService, router};
use writ_txn_service::policy::Policy;
use writ_txn_service::shed::{OverloadLimits, Shedder};
use writ_txn_service::txn_token::{Minter, SigningKeys};

use crate::exchange::{
    GATEWAY, Harness, ISSUER, NOW, PLANNER, TD, initial_token, replacement_form, token_request,
};

const POLICY: &str = r#"
[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]
"#;

struct Busy {
    harness: Harness,
    service: Arc<ExchangeService>,
    shed: Arc<Shedder>,
}

/// A service behind a shedder with `max_in_flight` slots and no queue.
fn busy(max_in_flight: usize) -> Busy {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let verifier = TxnVerifier::new(
        TrustDomain::new(TD).unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    let service = Arc::new(ExchangeService::new(
        TrustDomain::new(TD).unwrap(),
        ISSUER,
        Policy::from_toml(POLICY).unwrap(),
        Arc::new(SigningKeys::single(minter.clone(), Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    ));
    let limits = OverloadLimits {
        max_in_flight,
        max_queue: 0,
        queue_timeout: Duration::from_millis(5),
    };
    let shed = Shedder::for_service(limits, &service);
    Busy {
        harness: Harness {
            app: shed.apply(router(service.clone())),
            clock,
            minter,
            verifier,
        },
        service,
        shed,
    }
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    cache_control: Option<String>,
    body: Value,
}

fn header_of(response: &axum::response::Response, name: header::HeaderName) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let retry_after = header_of(&response, header::RETRY_AFTER);
    let cache_control = header_of(&response, header::CACHE_CONTROL);
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    Answer {
        status,
        retry_after,
        cache_control,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

async fn exchange(app: &Router, token: &str) -> Answer {
    send(
        app,
        token_request(Some(PLANNER), replacement_form(token, None)),
    )
    .await
}

async fn get(app: &Router, path: &str) -> StatusCode {
    send(app, Request::get(path).body(Body::empty()).unwrap())
        .await
        .status
}

#[track_caller]
fn assert_shed(answer: &Answer) {
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert_eq!(answer.retry_after.as_deref(), Some("1"));
    assert_eq!(answer.cache_control.as_deref(), Some("no-store"));
    assert_eq!(answer.body["error"], "temporarily_unavailable");
    assert!(answer.body["error_description"].is_string());
    assert!(answer.body.get("access_token").is_none());
}

fn audit_lines(service: &ExchangeService) -> Vec<Value> {
    service
        .audit()
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn shed_metric(service: &ExchangeService) -> u64 {
    let mut text = String::new();
    writ_identity::ops::prometheus_client::encoding::text::encode(
        &mut text,
        &service.metrics().unwrap().registry(),
    )
    .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("writ_txn_shed_total "))
        .expect("writ_txn_shed_total in the metrics")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn beyond_the_limit_an_exchange_is_shed_before_its_body_is_read() {
    let b = busy(1);
    let app = &b.harness.app;
    let (_, token) = initial_token(&b.harness);
    let held = b.shed.try_admit().expect("the one slot");

    assert_shed(&exchange(app, &token).await);
    // A body the exchange would refuse with 400 is shed just the same: never parsed.
    let garbage = send(app, token_request(Some(PLANNER), "\u{0}%%garbage")).await;
    assert_shed(&garbage);
    // The other endpoints are never shed.
    assert_eq!(get(app, "/.well-known/jwks.json").await, StatusCode::OK);
    assert_eq!(
        get(app, "/.well-known/oauth-authorization-server").await,
        StatusCode::OK
    );
    assert!(
        audit_lines(&b.service).is_empty(),
        "nothing written per shed request"
    );
    assert_eq!(shed_metric(&b.service), 2);

    // A free slot: served again.
    drop(held);
    let answer = exchange(app, &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(answer.retry_after.is_none());
    let issued = answer.body["access_token"].as_str().unwrap();
    let claims = b
        .harness
        .verifier
        .verify_at(issued, b.harness.clock.now())
        .unwrap();
    assert_eq!(claims.chain(), vec![PLANNER, GATEWAY]);

    b.shed.flush();
    b.shed.flush();
    let lines = audit_lines(&b.service);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["decision"], "granted");
    assert_eq!(lines[1]["decision"], "suppressed");
    assert_eq!(lines[1]["error"], "temporarily_unavailable");
    assert_eq!(lines[1]["suppressed"], 2);
    assert_eq!(b.shed.shed_total(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exchanges_each_get_a_whole_answer_and_one_audit_line() {
    const REQUESTS: usize = 48;
    let b = Arc::new(busy(1));
    let (_, token) = initial_token(&b.harness);
    let token = Arc::new(token);
    // The first half arrives while the slot is held: all shed. The second half races
    // for the one slot: some are admitted, maybe some shed.
    let mut held = Some(b.shed.try_admit().expect("the one slot"));
    let mut answers = Vec::new();
    for round in 0..2 {
        let tasks: Vec<_> = (0..REQUESTS / 2)
            .map(|_| {
                let (b, token) = (b.clone(), token.clone());
                tokio::spawn(async move { exchange(&b.harness.app, &token).await })
            })
            .collect();
        if round == 0 {
            assert_eq!(
                get(&b.harness.app, "/.well-known/jwks.json").await,
                StatusCode::OK,
                "the JWKS is answered during overload"
            );
        }
        for task in tasks {
            answers.push(task.await.unwrap());
        }
        if round == 0 {
            assert!(
                answers
                    .iter()
                    .all(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
            );
            held = None;
        }
    }
    assert!(held.is_none());
    let mut granted = 0;
    let mut shed = 0;
    for answer in &answers {
        if answer.status == StatusCode::OK {
            assert!(answer.body["access_token"].is_string(), "{}", answer.body);
            granted += 1;
        } else {
            assert_shed(answer);
            shed += 1;
        }
    }
    assert!(
        granted >= 1,
        "the service served again once the slot was free"
    );
    assert!(shed >= REQUESTS / 2);
    assert_eq!(b.shed.shed_total(), shed as u64);
    assert_eq!(shed_metric(&b.service), shed as u64);
    assert_eq!(b.shed.in_flight(), 0);
    b.shed.flush();
    let lines = audit_lines(&b.service);
    let granted_lines = lines.iter().filter(|l| l["decision"] == "granted").count();
    assert_eq!(
        granted_lines, granted,
        "one audit line per admitted exchange"
    );
    let summarized: u64 = lines
        .iter()
        .filter(|l| l["decision"] == "suppressed")
        .map(|l| l["suppressed"].as_u64().unwrap())
        .sum();
    assert_eq!(summarized, shed as u64, "every shed request summarized");
    assert_eq!(lines.len(), granted + 1, "{lines:?}");
}

#[test]
fn overload_config_is_read_and_garbage_refused() {
    let base = Path::new(".");
    let config = TxnConfig::from_toml("", base).unwrap();
    assert_eq!(config.overload, OverloadLimits::default());
    let config = TxnConfig::from_toml(
        "[overload]\nmax_in_flight = 2\nmax_queue = 0\nqueue_timeout = \"10ms\"",
        base,
    )
    .unwrap();
    assert_eq!(
        config.overload,
        OverloadLimits {
            max_in_flight: 2,
            max_queue: 0,
            queue_timeout: Duration::from_millis(10),
        }
    );
    for (text, message) in [
        ("[overload]\nmax_in_flight = 0", "overload.max_in_flight"),
        (
            "[overload]\nmax_in_flight = 99999999999",
            "overload.max_in_flight",
        ),
        ("[overload]\nmax_queue = 99999999999", "overload.max_queue"),
        (
            "[overload]\nqueue_timeout = \"0s\"",
            "overload.queue_timeout",
        ),
        (
            "[overload]\nqueue_timeout = \"10m\"",
            "overload.queue_timeout",
        ),
        ("[overload]\nmax_in_fligth = 8", "max_in_fligth"),
        ("[overload]\nmax_queue = -1", "max_queue"),
    ] {
        let e = TxnConfig::from_toml(text, base).unwrap_err().to_string();
        assert!(e.contains(message), "{text}: {e}");
    }
}
