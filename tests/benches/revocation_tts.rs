//! The kill switch at the token service (`cargo bench -p writ-tests --bench revocation_tts`).
//!
//! Prints:
//! - (a) revocation to refusal at a replica: from the identity server's
//!   `insert_revocation` (the admin RPC's write, audit event included) on one handle of a
//!   SQLite store until another handle's `Revocations` (as a `writ txn run` replica opens
//!   it, polling every 200 ms with no notification from the writer, the worst case) refuses
//!   a Txn-Token of that transaction, p50/p99;
//! - (b) the same with the replica woken by the store's change announcement (one
//!   process: `writ dev`, or any replica on PostgreSQL with `LISTEN/NOTIFY`), p50/p99;
//! - (c) the cost of `Revocations::check` on an exchange with 1, 1 000 and 100 000
//!   entries in force.
//!
//! Count: `WRIT_BENCH_REVOCATIONS` (50).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step should abort the run loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use writ_identity::clock::{Clock as _, SystemClock};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::revocation::NewRevocation;
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::store::{SharedStore, Store as _};
use writ_sdk::spiffe::revocation::Target;
use writ_sdk::txn_token::TxnToken;
use writ_txn_service::revocation::{DEFAULT_POLL_INTERVAL, Revocations};

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token(txn: &str) -> TxnToken {
    TxnToken {
        iss: "https://tts".into(),
        iat: 0,
        exp: i64::MAX,
        aud: "example.org".into(),
        txn: txn.into(),
        sub: "alice".into(),
        scope: "read".into(),
        req_wl: "spiffe://example.org/gateway".into(),
        tctx: None,
        rctx: None,
        act: None,
    }
}

fn new(txn: String) -> NewRevocation {
    let now = SystemClock.unix_seconds();
    NewRevocation {
        target: Target::Txn { txn },
        revoked_at: now,
        lapses_at: now + 3600,
        reason: None,
        revoked_by: "bench".into(),
    }
}

fn percentiles(mut d: Vec<Duration>) -> (Duration, Duration) {
    d.sort_unstable();
    let at = |p: f64| d[((d.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99))
}

/// Revokes `n` transactions on `writer`; returns how long each took to be refused by
/// `replica`.
async fn latencies(writer: &SqliteStore, replica: &Revocations, n: usize) -> Vec<Duration> {
    let caller = SpiffeId::new("spiffe://example.org/gateway").unwrap();
    let mut out = Vec::new();
    for i in 0..n {
        let txn = format!("txn-{i}-{:p}", replica);
        let t = token(&txn);
        let started = Instant::now();
        writer.insert_revocation(&new(txn)).await.unwrap();
        while replica.check(&t, &caller).is_ok() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        out.push(started.elapsed());
        // Revocations arrive at random moments, not in step with the poll.
        tokio::time::sleep(Duration::from_millis(37)).await;
    }
    out
}

#[tokio::main]
async fn main() {
    let n = count("WRIT_BENCH_REVOCATIONS", 50);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite3");
    let writer = SqliteStore::open(&path).await.unwrap();
    let clock = Arc::new(SystemClock);

    // (a) another process's handle: polling only.
    let shared: SharedStore = Arc::new(SqliteStore::open_shared(&path).await.unwrap());
    let replica = Revocations::load(shared, clock.clone()).await.unwrap();
    let poller = replica.clone().spawn(DEFAULT_POLL_INTERVAL);
    let (p50, p99) = percentiles(latencies(&writer, &replica, n).await);
    println!(
        "(a) revocation to refusal, polling every {DEFAULT_POLL_INTERVAL:?}: p50 {p50:?}, p99 {p99:?} ({n} revocations)"
    );
    drop(poller);

    // (b) the writer's own handle: woken by its change announcement.
    let own: SharedStore = Arc::new(writer.clone());
    let replica = Revocations::load(own, clock.clone()).await.unwrap();
    let poller = replica.clone().spawn(DEFAULT_POLL_INTERVAL);
    let (p50, p99) = percentiles(latencies(&writer, &replica, n).await);
    println!(
        "(b) revocation to refusal, woken by the store: p50 {p50:?}, p99 {p99:?} ({n} revocations)"
    );
    drop(poller);

    // (c) the check's cost with many entries in force.
    let caller = SpiffeId::new("spiffe://example.org/gateway").unwrap();
    let miss = token("not-revoked");
    for in_force in [1usize, 1_000, 100_000] {
        let store = SqliteStore::open_in_memory().await.unwrap();
        fill(&store, in_force).await;
        let set = Revocations::load(Arc::new(store), clock.clone())
            .await
            .unwrap();
        let rounds = 2_000;
        let started = Instant::now();
        for _ in 0..rounds {
            assert!(set.check(&miss, &caller).is_ok());
        }
        let each = started.elapsed() / rounds;
        println!("(c) check with {in_force} in force: {each:?} per exchange");
    }
}

async fn fill(store: &SqliteStore, n: usize) {
    let now = SystemClock.unix_seconds();
    for i in 0..n {
        store
            .insert_revocation(&NewRevocation {
                target: Target::Sub {
                    sub: format!("bulk-{i}"),
                },
                revoked_at: now,
                lapses_at: now + 3600,
                reason: None,
                revoked_by: "bench".into(),
            })
            .await
            .unwrap();
    }
}
