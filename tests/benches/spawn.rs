//! Sub-agents under load (`cargo bench -p writ-tests --bench spawn`), end to end over the
//! agent socket with the in-process server and its SQLite store.
//!
//! Prints:
//! - (a) spawn to first SVID: from `Spawn::spawn()` (start the gated process, wait for
//!   it to stop, Register: kernel checks + server policy check + lease write + first
//!   child SVID signed) until the child process (`subagent_probe x509`) has printed the
//!   SPIFFE ID it fetched over the Workload API, p50/p99;
//! - (b) child SVID issuance rate: `Register` calls for already running children of
//!   this process, one after another (each grants a lease and signs the child's
//!   X509-SVID), per second;
//! - (c) child X509-SVID renewal-equivalent signing (`SignChildX509Svid` through the
//!   node API, lease checks included), per second.
//!
//! Counts: `WRIT_BENCH_SPAWNS` (50), `WRIT_BENCH_REGISTRATIONS` (200).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step should abort the run loudly"
)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::spawn::{Registration, Spawn, SubAgents};
use writ_tests::{Stack, uid_selector};

const PROBE: &str = env!("CARGO_BIN_EXE_subagent_probe");

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    stack
        .register_with("/agents/planner", &[&uid_selector()], |e| {
            e.spawn_max_ttl = Some(300);
            e.spawn_max_depth = Some(1);
            e.spawn_max_children = Some(1024);
        })
        .await;
    while stack.agent.cache.snapshot().svids.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let planner = SpiffeId::new("spiffe://example.org/agents/planner").unwrap();

    // (a)
    let spawns = count("WRIT_BENCH_SPAWNS", 50);
    let mut samples = Vec::with_capacity(spawns);
    for _ in 0..spawns {
        let mut command = std::process::Command::new(PROBE);
        command.arg("x509");
        let started = Instant::now();
        let mut child = Spawn::new("bench", command)
            .endpoint(stack.endpoint())
            .parent(planner.clone())
            .stdout(Stdio::piped())
            .spawn()
            .await
            .unwrap();
        let mut out = String::new();
        child
            .child_mut()
            .stdout
            .as_mut()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        samples.push(started.elapsed());
        assert!(out.contains("/sub/bench-"), "{out}");
        child.wait().await.unwrap();
    }
    samples.sort();
    println!(
        "(a) spawn to first SVID: n={} p50={:.3?} p99={:.3?} min={:.3?} max={:.3?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[0],
        samples[samples.len() - 1]
    );

    // (b)
    let n = count("WRIT_BENCH_REGISTRATIONS", 200).min(1000);
    let mut sleepers = Vec::with_capacity(n);
    for _ in 0..n {
        sleepers.push(
            tokio::process::Command::new("sleep")
                .arg("120")
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    let regs: Vec<Registration> = sleepers
        .iter()
        .map(|c| {
            let pid = i32::try_from(c.id().unwrap()).unwrap();
            Registration {
                pid,
                start_time: 0,
                task: "rate".into(),
                ttl: None,
                parent: Some(planner.clone()),
            }
        })
        .collect();
    let mut agents = SubAgents::connect(&stack.endpoint()).await.unwrap();
    let started = Instant::now();
    let mut leases = Vec::with_capacity(n);
    for reg in &regs {
        leases.push(agents.register(reg).await.unwrap());
    }
    let took = started.elapsed();
    println!(
        "(b) child SVID issuance (Register): {n} in {took:.3?} = {:.0}/s",
        n as f64 / took.as_secs_f64()
    );

    // (c)
    let key = writ_identity::key_manager::PrivateKey::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap());
    let node = stack.agent.cache.node().clone();
    let started = Instant::now();
    for lease in &leases {
        node.sign_child_x509_svid(&lease.id, &spki).await.unwrap();
    }
    let took = started.elapsed();
    println!(
        "(c) child X509-SVID signing (lease checked): {n} in {took:.3?} = {:.0}/s",
        n as f64 / took.as_secs_f64()
    );
}
