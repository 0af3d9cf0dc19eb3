//! The kill switch at a verifier (`cargo bench -p writ-tests --bench revocation`):
//!
//! - (1) revocation-to-refusal latency: a `TxnVerifier` follows a revocation feed over
//!   HTTP with `RevocationFeed` (long-poll, the default 30 s wait) while a loop verifies
//!   a token of one transaction again and again (the verified-token cache on, as a busy
//!   service has it); the feed's server records a revocation of that transaction, and
//!   the figure is the time from the revocation being recorded to the first refusal.
//!   The feed's server is `writ_tests::revocation_feed`, a stand-in with the token
//!   service's contract (`GET /revocations?after=N&wait=S`, held until news), on plain
//!   HTTP at 127.0.0.1: the figure is the feed client's and the verifier's part, without
//!   the token service's store write and mTLS;
//! - (2) what the check adds to a cached verification, with 0, 1,000 and 10,000
//!   revocations in force that do not cover the token.
//!
//! `WRIT_BENCH_OPS` (200) sets the revocations measured in (1); (2) runs 20,000
//! verifications per figure.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "benchmark code: a failed setup step or verification should abort the run loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use writ_identity::clock::{Clock, SystemClock};
use writ_sdk::revocation::RevocationFeed;
use writ_sdk::spiffe::revocation::{FeedPage, Revocation, Target};
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnTokenError, TxnVerifier};
use writ_tests::revocation_feed::FeedServer;
use writ_txn_service::txn_token::SigningKeys;

const TD: &str = "example.org";

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token(keys: &SigningKeys, txn: &str) -> String {
    let now = SystemClock.unix_seconds();
    keys.mint(&TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: txn.into(),
        sub: "alice".into(),
        scope: "read".into(),
        req_wl: "spiffe://example.org/gateway".into(),
        tctx: None,
        rctx: None,
        act: Some(writ_sdk::txn_token::Actor::new(
            "spiffe://example.org/agents/planner",
        )),
    })
    .unwrap()
}

fn verifier(keys: &SigningKeys, feed: RevocationFeed) -> TxnVerifier {
    TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::Keys(Jwks::from_keys(keys.public_keys())),
    )
    .revocations(feed)
    .build()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn latency(keys: &SigningKeys, n: usize) {
    let server = FeedServer::start().await;
    let feed = RevocationFeed::builder(reqwest::Client::new(), &server.base_url)
        .build()
        .unwrap();
    feed.ready().await;
    let verifier = verifier(keys, feed.clone());
    let now = SystemClock.unix_seconds();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let txn = format!("bench-{i}");
        let token = token(keys, &txn);
        verifier.verify(&token).await.unwrap();
        // Let the feed's next long-poll be in flight, as in a steady state.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        server.revoke(Target::Txn { txn }, now, now + 3600);
        loop {
            match verifier.verify(&token).await {
                Ok(_) => tokio::task::yield_now().await,
                Err(TxnTokenError::Revoked(_)) => break,
                Err(e) => panic!("unexpected refusal: {e}"),
            }
        }
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "revocation-to-refusal at a verifier (feed over HTTP, stand-in server), {n} revocations: \
         p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap()),
    );
}

async fn check_cost(keys: &SigningKeys) {
    let token = token(keys, "clean");
    let now = SystemClock.unix_seconds();
    let ops = 20_000u32;
    for entries in [0u64, 1_000, 10_000] {
        let feed = RevocationFeed::manual(Arc::new(SystemClock));
        // In pages of at most 1,000, as the feed delivers them.
        for start in (0..entries).step_by(1000) {
            let revocations: Vec<Revocation> = (start..(start + 1000).min(entries))
                .map(|i| Revocation {
                    seq: i + 1,
                    target: Target::Txn {
                        txn: format!("other-{i}"),
                    },
                    revoked_at: now,
                    lapses_at: now + 3600,
                    reason: None,
                })
                .collect();
            let seq = revocations.last().map_or(0, |r| r.seq);
            feed.apply(FeedPage {
                seq,
                revocations,
                more: false,
            })
            .unwrap();
        }
        let verifier = verifier(keys, feed);
        verifier.verify(&token).await.unwrap();
        let started = Instant::now();
        for _ in 0..ops {
            verifier.verify(&token).await.unwrap();
        }
        let per = started.elapsed() / ops;
        println!(
            "cached verify with {entries} revocations in force (none covering): {:.2} us",
            per.as_secs_f64() * 1e6
        );
    }
}

fn main() {
    let n = count("WRIT_BENCH_OPS", 200);
    let keys = SigningKeys::single(
        writ_txn_service::txn_token::Minter::new(
            writ_identity::key_manager::PrivateKey::generate().unwrap(),
        )
        .unwrap(),
        Arc::new(SystemClock),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        latency(&keys, n).await;
        check_cost(&keys).await;
    });
}
