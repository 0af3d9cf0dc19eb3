//! The durable audit trail's costs (`cargo bench -p writ-identity --bench audit`), on a
//! SQLite store in a file in a temporary directory:
//! - one audit row appended per transaction (what a lone grant that waits costs), and
//!   rows appended in batches of 256 (the token service's group commit under load);
//! - the explorer's list query (`list_audit_txns`, 50 latest, and a search) with
//!   `WRIT_BENCH_AUDIT_TXNS` transactions (default 10000, four rows each) in the store;
//! - `writ audit verify`'s work: reading and checking the whole chain.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed step should abort the run loudly"
)]

use std::time::{Duration, Instant};

use writ_identity::store::Store;
use writ_identity::store::audit::{AuditEvent, ChainVerifier};
use writ_identity::store::sqlite::SqliteStore;

fn event(txn: usize, kind: &str, caller: &str) -> AuditEvent {
    AuditEvent {
        at_ms: 1_790_000_000_000 + txn as i64,
        kind: kind.into(),
        decision: "allow".into(),
        txn: format!("{txn:08x}-5e1f-4c35-9a9e-6f5c8a3b1d20"),
        sub: format!("user-{}", txn % 500),
        caller: format!("spiffe://example.org/demo/{caller}"),
        service: String::new(),
        lease: String::new(),
        record: r#"{"time":"2026-11-30T22:00:00.000Z","decision":"granted","caller":"spiffe://example.org/demo/gateway","granted_scope":"orders.read","act":[],"expires_in":300,"subject_token_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}"#.into(),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let txns: usize = std::env::var("WRIT_BENCH_AUDIT_TXNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("datastore.sqlite3"))
            .await
            .unwrap();

        let single = 2_000;
        let start = Instant::now();
        for i in 0..single {
            store.append_audit(&[event(i, "grant", "gateway")]).await.unwrap();
        }
        let t = start.elapsed();
        println!(
            "append, one row per transaction: {single} rows in {:.2?} = {:.0} rows/s ({:.1} us/row)",
            t,
            single as f64 / t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / single as f64
        );

        let batches = 100;
        let batch: Vec<AuditEvent> = (0..256).map(|i| event(i, "grant", "gateway")).collect();
        let start = Instant::now();
        for _ in 0..batches {
            store.append_audit(&batch).await.unwrap();
        }
        let t = start.elapsed();
        let rows = batches * batch.len();
        println!(
            "append, batches of 256: {rows} rows in {:.2?} = {:.0} rows/s ({:.1} us/row)",
            t,
            rows as f64 / t.as_secs_f64(),
            t.as_secs_f64() * 1e6 / rows as f64
        );

        // A store of `txns` transactions: grant, replacement, spawn, verification.
        let fresh = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&fresh.path().join("datastore.sqlite3"))
            .await
            .unwrap();
        let mut all = Vec::new();
        for t in 0..txns {
            all.push(event(t, "grant", "gateway"));
            all.push(event(t, "replacement", "planner"));
            all.push(event(t, "spawn", "planner/sub/1"));
            let mut v = event(t, "verification", "planner/sub/1");
            v.service = "spiffe://example.org/demo/tool".into();
            all.push(v);
        }
        for chunk in all.chunks(4096) {
            store.append_audit(chunk).await.unwrap();
        }
        for (what, q) in [("50 latest", ""), ("search by user", "user-77"), ("search by txn", "00000abc")] {
            let mut times = Vec::new();
            let mut found = 0;
            for _ in 0..20 {
                let start = Instant::now();
                found = store.list_audit_txns(q, 50).await.unwrap().len();
                times.push(start.elapsed());
            }
            println!(
                "explorer list ({what}, {found} shown) over {txns} transactions ({} rows): median {:.2?}",
                all.len(),
                median(times)
            );
        }
        let mut times = Vec::new();
        for _ in 0..5 {
            let start = Instant::now();
            let anchor = store.audit_anchor().await.unwrap();
            let mut verifier = ChainVerifier::new(&anchor);
            let mut after = 0;
            loop {
                let rows = store.list_audit(after, 10_000).await.unwrap();
                let Some(last) = rows.last() else { break };
                after = last.seq;
                rows.iter().for_each(|r| verifier.push(r));
            }
            verifier.finish().unwrap();
            times.push(start.elapsed());
        }
        println!("verify {} rows: median {:.2?}", all.len(), median(times));
    });
}
