//! The agent's Workload API under load, end to end over its Unix socket
//! (`cargo bench -p writ-tests --bench workload_api`). The caller is this process,
//! attested by the agent's `unix` attestor like any workload (one attestation per call).
//!
//! Prints:
//! - (a) `FetchJWTSVID` latency, p50/p99, when the agent has the token cached (same
//!   audience every call), on one open connection;
//! - (b) `FetchX509SVID` time to first message: new connection + stream open + first
//!   response, p50/p99;
//! - (c) agent memory per cached X509-SVID: the growth of this process's RSS
//!   (`/proc/self/status` `VmRSS`) from registering N entries that match the caller until
//!   the agent holds an SVID for each, divided by N (server, store and agent share the
//!   process, so this is an upper bound for the agent alone);
//! - (d) entry propagation: from `register` (store write + change signal) to the caller
//!   seeing the new identity on an already open `FetchX509SVID` stream, p50/p99;
//! - (e) the `unix` attestor alone on this process, with and without the `unix:sha256`
//!   hash of the executable (this bench binary is larger than the attestor's default hash
//!   limit, so (a) to (d) do not include hashing; a smaller workload binary pays it on
//!   every call).
//!
//! Counts come from the environment: `WRIT_BENCH_JWT_CALLS` (2000), `WRIT_BENCH_X509_TRIES`
//! (200), `WRIT_BENCH_MEMORY_ENTRIES` (2000), `WRIT_BENCH_PROPAGATION_ENTRIES` (50).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step should abort the run loudly"
)]

use std::time::{Duration, Instant};

use writ_identity::proto::workload as pb;
use writ_tests::{Stack, connect_raw, uid_selector, with_header};

const WARM_UP: usize = 50;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.3?} p99={:.3?} min={:.3?} max={:.3?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[0],
        samples[samples.len() - 1],
    );
}

/// `VmRSS` of this process, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

async fn wait_for_svids(stack: &Stack, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    while stack.agent.cache.snapshot().svids.len() < n {
        assert!(
            started.elapsed() < within,
            "the agent holds {} of {n} SVIDs after {within:?}",
            stack.agent.cache.snapshot().svids.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    started.elapsed()
}

/// (c) RSS growth per cached SVID. Runs first, on a fresh heap.
async fn memory_per_svid(n: usize) {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    let uid = uid_selector();
    // One entry first, so that code paths and pools used by every SVID are warm.
    stack.register("/mem/warm", &[&uid]).await;
    wait_for_svids(&stack, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib();
    let started = Instant::now();
    for i in 0..n {
        stack.register(&format!("/mem/{i}"), &[&uid]).await;
    }
    let registered = started.elapsed();
    let synced = wait_for_svids(&stack, n + 1, Duration::from_secs(300)).await;
    // Let the sync settle (the last change signal may start one more, empty, sync).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib();
    let per = (after.saturating_sub(before) as f64 * 1024.0) / n as f64;
    println!(
        "(c) memory per cached SVID: N={n} RSS {before} KiB -> {after} KiB = {:.1} KiB/SVID \
         ({per:.0} B; registering took {registered:.2?}, agent caught up {synced:.2?} later)",
        per / 1024.0
    );
}

/// (a) and (b) on one stack with one identity for the caller.
async fn fetch_latencies(jwt_calls: usize, x509_tries: usize) {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    stack.register("/bench/caller", &[&uid_selector()]).await;
    wait_for_svids(&stack, 1, Duration::from_secs(10)).await;

    let mut client = connect_raw(stack.socket()).await;
    let request = || {
        with_header(pb::JwtsvidRequest {
            audience: vec!["bench-audience".into()],
            spiffe_id: String::new(),
        })
    };
    let first = client.fetch_jwtsvid(request()).await.unwrap().into_inner();
    let token = first.svids[0].svid.clone();
    for _ in 0..WARM_UP {
        client.fetch_jwtsvid(request()).await.unwrap();
    }
    let mut samples = Vec::with_capacity(jwt_calls);
    for _ in 0..jwt_calls {
        let t = Instant::now();
        let r = client.fetch_jwtsvid(request()).await.unwrap().into_inner();
        samples.push(t.elapsed());
        assert_eq!(r.svids[0].svid, token, "served from the agent's cache");
    }
    report("(a) FetchJWTSVID, cached, one connection", samples);

    let mut samples = Vec::with_capacity(x509_tries);
    for i in 0..WARM_UP.min(x509_tries) + x509_tries {
        let t = Instant::now();
        let mut client = connect_raw(stack.socket()).await;
        let mut stream = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let msg = stream.message().await.unwrap().expect("a first message");
        let elapsed = t.elapsed();
        assert_eq!(msg.svids.len(), 1);
        if i >= WARM_UP.min(x509_tries) {
            samples.push(elapsed);
        }
    }
    report(
        "(b) FetchX509SVID time to first message (new connection + stream + first message)",
        samples,
    );
}

/// (d) From `register` to the new identity on an open stream.
async fn propagation(n: usize) {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    let uid = uid_selector();
    stack.register("/prop/base", &[&uid]).await;
    wait_for_svids(&stack, 1, Duration::from_secs(10)).await;
    let mut client = connect_raw(stack.socket()).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first message");
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let wanted = format!("spiffe://example.org/prop/{i}");
        let t = Instant::now();
        stack.register(&format!("/prop/{i}"), &[&uid]).await;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .expect("the new identity within 30 s")
                .unwrap()
                .expect("the stream stays open");
            if msg.svids.iter().any(|s| s.spiffe_id == wanted) {
                break;
            }
        }
        samples.push(t.elapsed());
        // Spread the entries out a little, as registrations by an operator would be.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report(
        "(d) entry propagation, register -> identity on an open FetchX509SVID stream",
        samples,
    );
}

/// (e) The `unix` attestor alone on this process, without and with hashing the
/// executable: what every Workload API call pays before the cache is consulted.
fn attestation_cost() {
    use writ_identity::attest::workload::{Caller, UnixAttestor};
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    let caller = Caller {
        pid: i32::try_from(std::process::id()).unwrap(),
        uid: field("Uid:"),
        gid: field("Gid:"),
    };
    let exe_size = std::fs::metadata(std::env::current_exe().unwrap())
        .unwrap()
        .len();
    for (label, max, runs) in [("no sha256", 0, 500), ("with sha256", exe_size + 1, 10)] {
        let attestor = UnixAttestor::builder().max_hash_bytes(max).build();
        let selectors = attestor.attest_blocking(&caller).unwrap();
        let hashed = selectors
            .iter()
            .any(|s| s.to_string().starts_with("unix:sha256:"));
        assert_eq!(hashed, max > 0, "{label}: {selectors:?}");
        let samples = (0..runs)
            .map(|_| {
                let t = Instant::now();
                attestor.attest_blocking(&caller).unwrap();
                t.elapsed()
            })
            .collect();
        report(
            &format!(
                "(e) unix attestation of this process, {label} ({:.1} MiB executable)",
                exe_size as f64 / (1024.0 * 1024.0)
            ),
            samples,
        );
    }
    // A stranger: no entry that could match it uses anything beyond uid/gid, so the
    // agent computes nothing else (what a refused Workload API call costs to attest).
    #[derive(Debug)]
    struct Nothing;
    impl writ_identity::attest::workload::SelectorDemand for Nothing {
        fn wanted(
            &self,
            _found: &[writ_identity::selector::Selector],
            _computed: &writ_identity::attest::workload::SelectorTypes,
        ) -> writ_identity::attest::workload::SelectorTypes {
            writ_identity::attest::workload::SelectorTypes::default()
        }
    }
    let attestor = UnixAttestor::builder().max_hash_bytes(u64::MAX).build();
    let samples = (0..2_000)
        .map(|_| {
            let t = Instant::now();
            attestor.attest_for_blocking(&caller, &Nothing).unwrap();
            t.elapsed()
        })
        .collect();
    assert_eq!(attestor.hashes_computed(), 0);
    report(
        "(e) unix attestation of a stranger (no entry could use path or sha256)",
        samples,
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let exe_size = std::fs::metadata(&exe).map(|m| m.len()).unwrap_or_default();
    println!(
        "workload_api bench: caller {} ({:.1} MiB; the unix attestor hashes executables up to {} MiB on every call)",
        exe.display(),
        exe_size as f64 / (1024.0 * 1024.0),
        writ_identity::attest::workload::unix::DEFAULT_MAX_HASH_BYTES / (1024 * 1024),
    );
    rt.block_on(async {
        memory_per_svid(count("WRIT_BENCH_MEMORY_ENTRIES", 2_000)).await;
        fetch_latencies(
            count("WRIT_BENCH_JWT_CALLS", 2_000),
            count("WRIT_BENCH_X509_TRIES", 200),
        )
        .await;
        propagation(count("WRIT_BENCH_PROPAGATION_ENTRIES", 50)).await;
    });
    attestation_cost();
}
