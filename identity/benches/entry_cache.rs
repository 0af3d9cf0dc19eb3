//! The server-side entry cache at scale (`cargo bench -p writ-identity --bench
//! entry_cache`).
//!
//! For each size N (from the command line or `WRIT_BENCH_ENTRIES`, comma separated;
//! default 10000 and 1000000) it makes N entries for N / 10 simulated agents of 10
//! workloads each: entry `i` has SPIFFE ID `spiffe://example.org/workload/<i>`, parent
//! `spiffe://example.org/writ/agent/a-<i / 10>`, and the selectors `unix:uid:<i>` (its
//! own) and `k8s:ns:ns-<i % (N / 1000)>` (shared by 1,000 entries), as the store bench
//! does. Then it measures, and prints as a Markdown table:
//!
//! - the index build from entries in memory, and the heap the index holds per entry,
//!   counted by a counting global allocator (bytes allocated after the build minus before,
//!   over N), beside the cache's own estimate;
//! - `find_entries_by_selectors` p50/p99 over 1,000 random workloads (each workload
//!   carries its entry's selectors plus one no entry has, and must match exactly its
//!   entry), cloning the matches out as the store does; and the by-parent lookup an
//!   agent sync makes;
//! - with min(N, `WRIT_BENCH_SQLITE_MAX`, default 100000) of the entries in a SQLite file:
//!   the cache's build from that store, `find_entries_by_selectors` through the
//!   [`Store`] trait of the cache and of SQLite, and the server's work per agent sync
//!   (`NodeHandler::authorized_entries` for 1,000 random agents) with and without the
//!   cache.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use cap::Cap;
use rand::Rng;
use writ_identity::clock::ManualClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::selector::Selector;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::node::NodeHandler;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::cache::{CachedStore, DetachedIndex};
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::store::{SharedStore, Store};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

const DEFAULT_SIZES: [usize; 2] = [10_000, 1_000_000];
const DEFAULT_SQLITE_MAX: usize = 100_000;
const WORKLOADS_PER_AGENT: usize = 10;
const BATCH: usize = 10_000;
const WARM_UP: usize = 100;
const LOOKUPS: usize = 1_000;
const AGENT_SYNCS: usize = 1_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One row of the printed table.
struct Row {
    n: usize,
    what: String,
    figure: String,
}

fn main() -> Result<(), BoxError> {
    let sizes = sizes()?;
    let sqlite_max = std::env::var("WRIT_BENCH_SQLITE_MAX")
        .ok()
        .map(|v| v.replace('_', "").parse::<usize>())
        .transpose()?
        .unwrap_or(DEFAULT_SQLITE_MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    rt.block_on(async {
        for n in sizes {
            in_memory(n, &mut rows)?;
            if sqlite_max > 0 {
                through_sqlite(n, n.min(sqlite_max), &mut rows).await?;
            }
        }
        Ok::<_, BoxError>(())
    })?;
    println!();
    println!("| entries | measure | figure |");
    println!("| ---: | --- | ---: |");
    for row in rows {
        println!("| {} | {} | {} |", row.n, row.what, row.figure);
    }
    Ok(())
}

/// Entry counts from the arguments (ignoring cargo's `--bench` flag) or the environment.
fn sizes() -> Result<Vec<usize>, BoxError> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let text = if args.is_empty() {
        std::env::var("WRIT_BENCH_ENTRIES").unwrap_or_default()
    } else {
        args.join(",")
    };
    let sizes = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('_', "").parse::<usize>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if sizes.is_empty() {
        DEFAULT_SIZES.to_vec()
    } else {
        sizes
    })
}

fn agent_id(k: usize) -> Result<SpiffeId, BoxError> {
    Ok(SpiffeId::new(&format!(
        "spiffe://example.org/writ/agent/a-{k}"
    ))?)
}

fn selectors_of(i: usize, n: usize) -> Result<Vec<Selector>, BoxError> {
    let namespaces = (n / 1000).max(1);
    let mut selectors = vec![
        Selector::new("k8s", &format!("ns:ns-{}", i % namespaces))?,
        Selector::new("unix", &format!("uid:{i}"))?,
    ];
    selectors.sort();
    Ok(selectors)
}

fn entries(n: usize) -> Result<Vec<RegistrationEntry>, BoxError> {
    (0..n)
        .map(|i| {
            let mut entry = RegistrationEntry::new(
                SpiffeId::new(&format!("spiffe://example.org/workload/{i}"))?,
                agent_id(i / WORKLOADS_PER_AGENT)?,
                selectors_of(i, n)?,
            );
            entry.x509_svid_ttl = 3_600;
            entry.created_at = 1_700_000_000;
            entry.revision = 1;
            Ok(entry)
        })
        .collect()
}

/// A workload of entry `j`: its selectors and one no entry has.
fn workload(j: usize, n: usize) -> Result<Vec<Selector>, BoxError> {
    let mut selectors = selectors_of(j, n)?;
    selectors.push(Selector::new("k8s", &format!("node:node-{}", j % 50))?);
    Ok(selectors)
}

fn check_match(j: usize, found: &[RegistrationEntry]) -> Result<(), BoxError> {
    let ids: Vec<&str> = found.iter().map(|e| e.spiffe_id.path()).collect();
    if ids != [format!("/workload/{j}")] {
        return Err(format!("workload {j} matched {ids:?}").into());
    }
    Ok(())
}

fn in_memory(n: usize, rows: &mut Vec<Row>) -> Result<(), BoxError> {
    // Counted from before the entries are made: the index takes them over (their Vec
    // is freed by the build), so what stays allocated is what the index holds.
    let before = ALLOCATOR.allocated();
    let made = entries(n)?;
    let started = Instant::now();
    let index = DetachedIndex::build(made);
    let build = started.elapsed();
    let held = ALLOCATOR.allocated().saturating_sub(before);
    println!(
        "N = {n}: index built from memory in {:.0} ms, {} bytes/entry counted ({} estimated)",
        millis(build),
        held / n.max(1),
        index.estimated_bytes_per_entry()
    );
    rows.push(Row {
        n,
        what: "index build from entries in memory".into(),
        figure: format!("{:.0} ms", millis(build)),
    });
    rows.push(Row {
        n,
        what: "heap per entry (counting allocator; the cache's estimate)".into(),
        figure: format!(
            "{} B ({} B)",
            held / n.max(1),
            index.estimated_bytes_per_entry()
        ),
    });

    let mut rng = rand::rng();
    let mut finds = Vec::with_capacity(LOOKUPS);
    let mut parents = Vec::with_capacity(LOOKUPS);
    for round in 0..WARM_UP + LOOKUPS {
        let j = rng.random_range(0..n);
        let selectors = workload(j, n)?;
        let started = Instant::now();
        let found: Vec<RegistrationEntry> = index
            .find(&selectors)?
            .iter()
            .map(|e| RegistrationEntry::clone(e))
            .collect();
        let took = started.elapsed();
        check_match(j, &found)?;
        let parent = agent_id(j / WORKLOADS_PER_AGENT)?;
        let started = Instant::now();
        let children: Vec<RegistrationEntry> = index
            .by_parent(&parent)
            .iter()
            .map(|e| RegistrationEntry::clone(e))
            .collect();
        let took_parent = started.elapsed();
        if children.len() != WORKLOADS_PER_AGENT.min(n) {
            return Err(format!("agent of {j} has {} entries", children.len()).into());
        }
        if round >= WARM_UP {
            finds.push(took);
            parents.push(took_parent);
        }
    }
    rows.push(lookup_row(
        n,
        "find_entries_by_selectors (index)",
        &mut finds,
    ));
    rows.push(lookup_row(
        n,
        "entries by parent, 10 per agent (index)",
        &mut parents,
    ));
    drop(index);
    Ok(())
}

async fn through_sqlite(n: usize, m: usize, rows: &mut Vec<Row>) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let sqlite = Arc::new(SqliteStore::open(&dir.path().join("store.db")).await?);
    let made = entries(m)?;
    let started = Instant::now();
    for batch in made.chunks(BATCH) {
        sqlite.create_entries(batch).await?;
    }
    println!(
        "N = {n}: {m} entries written to SQLite in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(made);

    let started = Instant::now();
    let cache = Arc::new(CachedStore::new(sqlite.clone()).await?);
    let build = started.elapsed();
    rows.push(Row {
        n: m,
        what: "cache build from a SQLite file".into(),
        figure: format!("{:.0} ms", millis(build)),
    });

    let stores: [(&str, SharedStore); 2] = [("cache", cache.clone()), ("SQLite", sqlite.clone())];
    for (name, store) in &stores {
        let mut rng = rand::rng();
        let mut finds = Vec::with_capacity(LOOKUPS);
        for round in 0..WARM_UP + LOOKUPS {
            let j = rng.random_range(0..m);
            let selectors = workload(j, m)?;
            let started = Instant::now();
            let found = store.find_entries_by_selectors(&selectors).await?;
            let took = started.elapsed();
            check_match(j, &found)?;
            if round >= WARM_UP {
                finds.push(took);
            }
        }
        rows.push(lookup_row(
            m,
            &format!("find_entries_by_selectors through Store ({name})"),
            &mut finds,
        ));
    }

    // The server's side of an agent sync: the entries authorized for one agent. Both
    // servers load the one CA the first makes, so they share its keys.
    let keys = Arc::new(MemoryKeyManager::new());
    for (name, store) in stores {
        let config = ServerConfig::with_defaults(TrustDomain::new("example.org")?, dir.path())?;
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let server = ServerState::with_parts(config, Arc::new(clock), store, keys.clone()).await?;
        let handler = NodeHandler::new(server);
        let agents = m.div_ceil(WORKLOADS_PER_AGENT);
        let mut rng = rand::rng();
        let mut syncs = Vec::with_capacity(AGENT_SYNCS);
        let mut total = Duration::ZERO;
        for round in 0..WARM_UP + AGENT_SYNCS {
            let agent = agent_id(rng.random_range(0..agents))?;
            let started = Instant::now();
            let authorized = handler.authorized_entries(&agent).await?;
            let took = started.elapsed();
            if authorized.is_empty() {
                return Err(format!("{agent} is authorized for nothing").into());
            }
            if round >= WARM_UP {
                syncs.push(took);
                total += took;
            }
        }
        let mean = total / u32::try_from(AGENT_SYNCS)?;
        let mut row = lookup_row(
            m,
            &format!("agent sync: authorized_entries, {} agents ({name})", agents),
            &mut syncs,
        );
        row.figure = format!("{}, mean {:.1} µs", row.figure, micros(mean));
        rows.push(row);
    }
    let stats = cache.stats();
    println!(
        "N = {n}: cache over SQLite holds {} entries, ~{} bytes/entry (estimate)",
        stats.entries, stats.bytes_per_entry
    );
    drop(cache);
    if let Ok(sqlite) = Arc::try_unwrap(sqlite) {
        sqlite.close().await;
    }
    Ok(())
}

fn lookup_row(n: usize, what: &str, timings: &mut [Duration]) -> Row {
    timings.sort_unstable();
    Row {
        n,
        what: what.to_owned(),
        figure: format!(
            "p50 {:.1} µs, p99 {:.1} µs",
            micros(percentile(timings, 50)),
            micros(percentile(timings, 99))
        ),
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted.get(rank).copied().unwrap_or_default()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
