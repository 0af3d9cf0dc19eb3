//! Txn-Token verification in the SDK (`cargo bench -p writ-tests --bench verify`), on
//! one core (a current-thread runtime):
//!
//! - (1) `TxnVerifier::verify` with the verified-token cache off (full ES256 check and
//!   claim checks every time) and on (the same token again: a SHA-256 and a cache hit);
//! - (2) the middleware's added latency per request: one axum router called in process
//!   (`tower::ServiceExt::oneshot`, no network, the mTLS peer set as `ConnectInfo<Peer>`)
//!   with and without `TxnLayer`, with the cache off and on. The difference is what the
//!   layer adds to each request; TLS and HTTP parsing are the same with or without it;
//! - (3) the same layer recording every request (`TxnLayer::with_audit`) to a JSON-lines
//!   sink and the log sink: what building and queueing one verification record adds.
//!
//! The keys are the service's own (`SigningKeys`, the ring the TTS mints with), given to
//! the verifier as a fixed JWKS, so no fetch is measured. Every verification is checked
//! (a refused token panics the bench). `WRIT_BENCH_OPS` (20,000) sets the operations per
//! figure; each figure is the median of 3 runs.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step or verification should abort the run loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use tower::ServiceExt as _;
use writ_identity::clock::{Clock, SystemClock};
use writ_sdk::audit::{JsonLinesSink, LogSink};
use writ_sdk::listener::Peer;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_sdk::{SpiffeId, TrustDomain};
use writ_txn_service::txn_token::SigningKeys;

const TD: &str = "example.org";
const CALLER: &str = "spiffe://example.org/gateway";
/// The verifying service, as its audit records name it.
const SERVICE: &str = "spiffe://example.org/orders";
const ROUNDS: usize = 3;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token(keys: &SigningKeys) -> String {
    let now = SystemClock.unix_seconds();
    keys.mint(&TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: "8d0c8f2e-2b1e-4e7a-9f51-3c2f0e6b7a10".into(),
        sub: "alice".into(),
        scope: "read write".into(),
        req_wl: CALLER.into(),
        tctx: None,
        rctx: None,
        act: Some(writ_sdk::txn_token::Actor::new(CALLER)),
    })
    .unwrap()
}

fn verifier(keys: &SigningKeys, cache: bool) -> TxnVerifier {
    TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::Keys(Jwks::from_keys(keys.public_keys())),
    )
    .cache_capacity(if cache { 10_000 } else { 0 })
    .build()
}

/// Median over [`ROUNDS`] runs of `ops` calls of `f`, per operation.
async fn per_op<F, Fut>(ops: usize, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..ops / 10 {
        f().await;
    }
    let mut runs = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..ops {
            f().await;
        }
        runs.push(start.elapsed() / u32::try_from(ops).unwrap());
    }
    runs.sort();
    runs[ROUNDS / 2]
}

fn app(layer: Option<TxnLayer>) -> Router {
    let router = Router::new();
    match layer {
        Some(layer) => router
            .route("/", get(|v: Verified| async move { v.txn.sub }))
            .layer(layer),
        None => router.route("/", get(|| async { "alice".to_owned() })),
    }
}

async fn request(app: &Router, token: &str) {
    let mut request = Request::get("/")
        .header("Txn-Token", token)
        .body(Body::empty())
        .unwrap();
    request.extensions_mut().insert(ConnectInfo(Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        id: Some(SpiffeId::new(CALLER).unwrap()),
        cert_sha256: None,
    }));
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn main() {
    let ops = count("WRIT_BENCH_OPS", 20_000).max(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = SigningKeys::ephemeral(
        Arc::new(SystemClock),
        Duration::from_secs(3600),
        Duration::from_secs(900),
    )
    .unwrap();
    let token = token(&keys);
    println!("verify bench: one core, {ops} operations per figure, median of {ROUNDS} runs");
    rt.block_on(async {
        let mut rows = Vec::new();
        for cache in [false, true] {
            let v = verifier(&keys, cache);
            let t = per_op(ops, || {
                let v = v.clone();
                let token = token.clone();
                async move {
                    assert_eq!(v.verify(&token).await.unwrap().sub, "alice");
                }
            })
            .await;
            rows.push((
                format!(
                    "`TxnVerifier::verify`, cache {}",
                    if cache { "on (hit)" } else { "off" }
                ),
                t,
            ));
        }

        let td = TrustDomain::new(TD).unwrap();
        let bare = app(None);
        let base = per_op(ops, || request(&bare, &token)).await;
        rows.push(("axum router without the layer".into(), base));
        let mut added = Vec::new();
        for cache in [false, true] {
            let policy = TxnPolicy::new(Authorizer::member_of(td.clone()))
                .require_scope("read")
                .strict_chain();
            let guarded = app(Some(TxnLayer::new(verifier(&keys, cache), policy)));
            let t = per_op(ops, || request(&guarded, &token)).await;
            let label = if cache { "on (hit)" } else { "off" };
            rows.push((format!("axum router with `TxnLayer`, cache {label}"), t));
            added.push((label, t.saturating_sub(base)));
        }

        // (3) The same with every request recorded (`TxnLayer::with_audit`): to a
        // JSON-lines sink (its queue and writer thread, writing to `io::sink()`) and to
        // the log sink with no subscriber. The record is built and queued on the request
        // path; the writing is not.
        let mut audited = Vec::new();
        for cache in [false, true] {
            let policy = TxnPolicy::new(Authorizer::member_of(td.clone()))
                .require_scope("read")
                .strict_chain();
            let sink = Arc::new(JsonLinesSink::new(std::io::sink()).unwrap());
            let guarded = app(Some(
                TxnLayer::new(verifier(&keys, cache), policy)
                    .with_audit(SpiffeId::new(SERVICE).unwrap(), (sink.clone(), LogSink)),
            ));
            let t = per_op(ops, || request(&guarded, &token)).await;
            let label = if cache { "on (hit)" } else { "off" };
            rows.push((
                format!("axum router with `TxnLayer` + audit sinks, cache {label}"),
                t,
            ));
            sink.flush();
            let stats = sink.stats();
            audited.push((label, t, stats.delivered, stats.dropped));
        }

        println!();
        println!("| measure (one core) | per second | per operation |");
        println!("|---|---:|---:|");
        for (name, t) in &rows {
            println!(
                "| {name} | {:.0} | {:.1} µs |",
                1.0 / t.as_secs_f64(),
                t.as_secs_f64() * 1e6
            );
        }
        println!();
        let plain: Vec<Duration> = added.iter().map(|(_, t)| *t + base).collect();
        for (label, t) in added {
            println!(
                "middleware added latency, cache {label}: {:.1} µs per request",
                t.as_secs_f64() * 1e6
            );
        }
        for ((label, t, delivered, dropped), without) in audited.into_iter().zip(plain) {
            println!(
                "audit recording added, cache {label}: {:.2} µs per request ({delivered} written, {dropped} dropped)",
                (t.as_secs_f64() - without.as_secs_f64()) * 1e6
            );
        }
    });
}
