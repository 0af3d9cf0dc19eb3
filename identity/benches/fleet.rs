//! Propagation between servers sharing one PostgreSQL database
//! (`cargo bench -p writ-identity --bench fleet`; needs PostgreSQL's `initdb`, as the
//! store tests do).
//!
//! Three servers (`ServerState` over their own connections and key managers) run in this
//! process on a private PostgreSQL. Measured, each over `WRIT_BENCH_ROUNDS` rounds
//! (default 200):
//!
//! - **entry propagation**: an entry created through server 1's store until server 2's
//!   and server 3's agent change signal fires (what wakes their agents' streams);
//! - **bundle propagation**: a new JWT authority written to the journal (as another
//!   server's rotation writes it) until all three servers publish a bundle holding it.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use writ_identity::clock::SystemClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::spiffe_id::TrustDomain;
use writ_identity::store::pg_harness::TempPostgres;
use writ_identity::store::postgres::PostgresStore;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let rounds: usize = std::env::var("WRIT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let Some(pg) = TempPostgres::start()? else {
        return Ok(());
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(&pg.url(), rounds))
}

async fn server(
    url: &str,
    dir: &std::path::Path,
    ttl: Duration,
) -> Result<Arc<ServerState>, BoxError> {
    let td = TrustDomain::new("example.org")?;
    let mut config = ServerConfig::with_defaults(td, dir)?;
    config.ca.ca_ttl = ttl;
    let store = Arc::new(PostgresStore::connect(url).await?);
    Ok(ServerState::with_parts(
        config,
        Arc::new(SystemClock),
        store,
        Arc::new(MemoryKeyManager::new()),
    )
    .await?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "| {what} | {} | {:.2} ms | {:.2} ms | {:.2} ms |",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}

async fn run(url: &str, rounds: usize) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let servers = [
        server(url, &dir.path().join("1"), Duration::from_secs(3600)).await?,
        server(url, &dir.path().join("2"), Duration::from_secs(3600)).await?,
        server(url, &dir.path().join("3"), Duration::from_secs(3600)).await?,
    ];
    let [first, others @ ..] = &servers;
    let td = first.config.trust_domain.clone();
    println!("| propagation across 3 servers (one PostgreSQL) | rounds | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");

    let mut entries = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let mut signals: Vec<_> = others.iter().map(|s| s.subscribe_changes()).collect();
        for s in &mut signals {
            s.borrow_and_update();
        }
        let entry = RegistrationEntry::new(
            td.spiffe_id(&format!("/bench/{i}"))?,
            td.spiffe_id("/agent")?,
            vec![format!("unix:uid:{i}").parse()?],
        );
        let started = Instant::now();
        first.store.create_entry(&entry).await?;
        for s in &mut signals {
            tokio::time::timeout(Duration::from_secs(10), s.changed()).await??;
        }
        entries.push(started.elapsed());
    }
    report(
        "entry created on server 1 → change signal on servers 2 and 3",
        entries,
    );

    let mut bundles = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let before = first.ca.bundle().jwt_authorities().len();
        let mut watches: Vec<_> = servers.iter().map(|s| s.ca.subscribe()).collect();
        // A new JWT authority in the journal, as another server's rotation writes it.
        let key = writ_identity::key_manager::PrivateKey::generate()?;
        let (x, y) = key.ec_p256_xy().ok_or("not a P-256 key")?;
        let now = writ_identity::clock::unix_seconds(std::time::SystemTime::now());
        let slot = serde_json::json!({
            "id": format!("bench-{i}"), "kind": "jwt", "state": "prepared",
            "not_before": now - 10, "not_after": now + 3600,
            "jwk": writ_identity::bundle::Jwk::ec_p256(x, y),
        });
        let record = writ_identity::store::JournalRecord {
            id: format!("bench-{i}"),
            kind: "jwt".into(),
            payload: slot.to_string(),
            updated_at: now,
        };
        let started = Instant::now();
        first.store.put_journal(&record).await?;
        for w in &mut watches {
            tokio::time::timeout(
                Duration::from_secs(10),
                w.wait_for(|b| b.jwt_authorities().len() > before),
            )
            .await??;
        }
        bundles.push(started.elapsed());
        first.store.delete_journal(&record.id).await?;
        for w in &mut watches {
            tokio::time::timeout(
                Duration::from_secs(10),
                w.wait_for(|b| b.jwt_authorities().len() == before),
            )
            .await??;
        }
    }
    report(
        "new authority in the journal → in the bundle of all 3 servers",
        bundles,
    );
    Ok(())
}
