//! Registration store lookups at scale (`cargo bench -p writ-identity --bench store`).
//!
//! Fills a SQLite store (a file in a temporary directory) with N entries through
//! `create_entries`, then times `find_entries_by_selectors` for random workloads and
//! prints the median and 99th percentile. Entry `i` has SPIFFE ID
//! `spiffe://example.org/workload/<i>`, parent `spiffe://example.org/agent`, and the
//! selectors `unix:uid:<i>`, `k8s:ns:ns-<i % 1000>` and, for every third entry,
//! `k8s:sa:sa-<i % 5000>`. A workload for entry `j` carries those selectors plus one
//! (`k8s:node:...`) no entry has, so every lookup must return exactly entry `j` after
//! weighing every entry that shares its namespace (N / 1000 of them).
//!
//! N comes from the command line or `WRIT_BENCH_ENTRIES` (comma separated), default
//! 100000 and 1000000.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]

use std::time::{Duration, Instant};

use rand::Rng;
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::Selector;
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::Store;
use writ_identity::store::sqlite::SqliteStore;

const DEFAULT_SIZES: [usize; 2] = [100_000, 1_000_000];
const BATCH: usize = 10_000;
const WARM_UP: usize = 100;
const LOOKUPS: usize = 1_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    let sizes = sizes()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        for n in sizes {
            run(n).await?;
        }
        Ok(())
    })
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

fn selectors_of(i: usize) -> Result<Vec<Selector>, BoxError> {
    let mut selectors = vec![
        Selector::new("unix", &format!("uid:{i}"))?,
        Selector::new("k8s", &format!("ns:ns-{}", i % 1000))?,
    ];
    if i.is_multiple_of(3) {
        selectors.push(Selector::new("k8s", &format!("sa:sa-{}", i % 5000))?);
    }
    Ok(selectors)
}

fn entry(i: usize, parent: &SpiffeId) -> Result<RegistrationEntry, BoxError> {
    let mut entry = RegistrationEntry::new(
        SpiffeId::new(&format!("spiffe://example.org/workload/{i}"))?,
        parent.clone(),
        selectors_of(i)?,
    );
    entry.x509_svid_ttl = 3_600;
    entry.created_at = 1_700_000_000;
    Ok(entry)
}

async fn run(n: usize) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await?;
    let parent = SpiffeId::new("spiffe://example.org/agent")?;

    let start = Instant::now();
    let mut next = 0;
    while next < n {
        let end = (next + BATCH).min(n);
        let batch = (next..end)
            .map(|i| entry(i, &parent))
            .collect::<Result<Vec<_>, _>>()?;
        store.create_entries(&batch).await?;
        next = end;
    }
    let fill = start.elapsed();
    let size = std::fs::metadata(&path)?.len()
        + std::fs::metadata(path.with_extension("db-wal")).map_or(0, |m| m.len());
    println!(
        "N = {n}: filled in {:.1} s ({:.0} entries/s), database {} MiB",
        fill.as_secs_f64(),
        n as f64 / fill.as_secs_f64(),
        size / (1 << 20)
    );

    let mut rng = rand::rng();
    let mut timings = Vec::with_capacity(LOOKUPS);
    for round in 0..WARM_UP + LOOKUPS {
        let j = rng.random_range(0..n);
        let mut workload = selectors_of(j)?;
        workload.push(Selector::new("k8s", &format!("node:node-{}", j % 50))?);
        let start = Instant::now();
        let found = store.find_entries_by_selectors(&workload).await?;
        let took = start.elapsed();
        let ids: Vec<&str> = found.iter().map(|e| e.spiffe_id.path()).collect();
        if ids != [format!("/workload/{j}")] {
            return Err(format!("workload {j} matched {ids:?}").into());
        }
        if round >= WARM_UP {
            timings.push(took);
        }
    }
    timings.sort_unstable();
    println!(
        "N = {n}: {LOOKUPS} lookups, median {:.0} us, p99 {:.0} us, max {:.0} us",
        micros(percentile(&timings, 50)),
        micros(percentile(&timings, 99)),
        micros(timings.last().copied().unwrap_or_default()),
    );
    store.close().await;
    Ok(())
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted.get(rank).copied().unwrap_or_default()
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
