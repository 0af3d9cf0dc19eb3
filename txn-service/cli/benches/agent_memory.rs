//! Agent memory per cached X509-SVID, for the agent alone:
//! `cargo bench -p writ-cli --bench agent_memory`.
//!
//! The server runs in this process (SQLite store in a temp dir, node API on 127.0.0.1:0);
//! the agent is the real `writ agent run` binary in a child process, joined with a join
//! token. For each N (`WRIT_BENCH_AGENT_ENTRIES`, comma-separated, default `2000,10000`)
//! a fresh agent gets one warm-up entry that matches this process (so every code path a
//! cached SVID takes is warm), then N entries for its node, then one sentinel entry that
//! matches this process. The sentinel reaches this process's Workload API stream only in
//! a snapshot taken after a sync that saw all N entries signed, so its arrival means the
//! agent caches N + 2 SVIDs. The N entries match another uid: the measure is the cache,
//! not the Workload API response that would carry them all. With
//! `WRIT_BENCH_AGENT_SERVED=1` they match this process instead, whose stream then
//! carries all N + 2 (the agent encodes each response whole).
//!
//! Printed per N: the agent's `VmRSS` (`/proc/<pid>/status`) and its private memory
//! (`/proc/<pid>/smaps_rollup`, `Private_Clean + Private_Dirty`) before the N entries and
//! after the sentinel arrived (and 1 s later, settled), and (after - before) / N.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a bench binary: a failed step aborts it loudly, results go to stdout"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::sha256;
use writ_identity::proto::workload as pb;
use writ_identity::server::ServerState;
use writ_identity::server::node_service;
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::JoinTokenRecord;
use writ_tests::{connect_raw, uid_selector, with_header};

const WRIT: &str = env!("CARGO_BIN_EXE_writ");

/// A uid no workload of this bench runs as: the N entries match nobody.
const OTHER_UID: &str = "unix:uid:4000000";

/// `key:` of `/proc/<pid>/<file>`, in KiB, summed over every line with that key.
fn proc_kib(pid: u32, file: &str, keys: &[&str]) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            keys.contains(&k.trim())
                .then(|| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        })
        .sum()
}

#[derive(Debug, Clone, Copy)]
struct Memory {
    rss: u64,
    private: u64,
}

fn memory(pid: u32) -> Memory {
    Memory {
        rss: proc_kib(pid, "status", &["VmRSS"]),
        private: proc_kib(pid, "smaps_rollup", &["Private_Clean", "Private_Dirty"]),
    }
}

/// Kills the agent when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn create(state: &ServerState, parent: &SpiffeId, path: &str, selector: &str) {
    let td = state.config.trust_domain.clone();
    let mut e = RegistrationEntry::new(
        td.spiffe_id(path).unwrap(),
        parent.clone(),
        vec![selector.parse().unwrap()],
    );
    e.validate(&td).unwrap();
    state.store.create_entry(&e).await.unwrap();
}

/// Waits until this process's Workload API stream holds `id`.
async fn until_served(socket: &Path, id: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < within,
            "{id} not served within {within:?}"
        );
        if !socket.exists() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut client = connect_raw(socket.to_path_buf())
            .await
            .max_decoding_message_size(256 * 1024 * 1024);
        let Ok(response) = client
            .fetch_x509svid(with_header(pb::X509svidRequest {}))
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Ok(Some(message)) = stream.message().await {
            if message.svids.iter().any(|s| s.spiffe_id == id) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{id} not served within {within:?}"
            );
        }
    }
}

async fn run(
    n: usize,
    served: bool,
    state: &Arc<ServerState>,
    addr: std::net::SocketAddr,
    root: &Path,
) {
    let dir = root.join(format!("agent-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token = format!("agent-memory-{n}-{}", std::process::id());
    state
        .store
        .create_join_token(&JoinTokenRecord {
            token_hash: hex_sha256(&token),
            expires_at: state.clock.unix_seconds() + 600,
            selectors: Vec::new(),
        })
        .await
        .unwrap();
    let bundle = dir.join("bundle.json");
    std::fs::write(&bundle, state.ca.bundle().to_json()).unwrap();
    let socket = dir.join("agent.sock");
    let child = Command::new(WRIT)
        .args(["agent", "run", "--trust-domain", "example.org"])
        .arg("--server-address")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--trust-bundle")
        .arg(&bundle)
        .args(["--join-token", &token, "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let agent = Agent(child);
    let pid = agent.0.id();
    let agent_id = state
        .config
        .trust_domain
        .spiffe_id(&format!("/writ/agent/join_token/{token}"))
        .unwrap();

    let uid = uid_selector();
    create(state, &agent_id, &format!("/mem{n}/warm"), &uid).await;
    state.notify_change();
    until_served(
        &socket,
        &format!("spiffe://example.org/mem{n}/warm"),
        Duration::from_secs(60),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = memory(pid);

    let started = Instant::now();
    for i in 0..n {
        let selector = if served { uid.as_str() } else { OTHER_UID };
        create(state, &agent_id, &format!("/mem{n}/{i}"), selector).await;
        if i % 500 == 499 {
            state.notify_change();
        }
    }
    create(state, &agent_id, &format!("/mem{n}/sentinel"), &uid).await;
    state.notify_change();
    let registered = started.elapsed();
    let synced = until_served(
        &socket,
        &format!("spiffe://example.org/mem{n}/sentinel"),
        Duration::from_secs(600),
    )
    .await;
    let after = memory(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = memory(pid);
    let per = |a: u64, b: u64| (a.saturating_sub(b) as f64 * 1024.0) / n as f64;
    println!(
        "agent alone, N={n}{}: VmRSS {} -> {} KiB (settled {} KiB) = {:.0} B/SVID (settled {:.0}); \
         private {} -> {} KiB (settled {} KiB) = {:.0} B/SVID (settled {:.0}); \
         registering took {registered:.2?}, the agent caught up {synced:.2?} after",
        if served {
            " (all served to this process)"
        } else {
            ""
        },
        before.rss,
        after.rss,
        settled.rss,
        per(after.rss, before.rss),
        per(settled.rss, before.rss),
        before.private,
        after.private,
        settled.private,
        per(after.private, before.private),
        per(settled.private, before.private),
    );
    drop(agent);
}

fn hex_sha256(text: &str) -> String {
    sha256(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn main() {
    let counts: Vec<usize> = std::env::var("WRIT_BENCH_AGENT_ENTRIES")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .map(|c| c.trim().replace('_', "").parse().expect("a count"))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let state = writ_tests::server_state(tmp.path(), Duration::from_secs(3600)).await;
        let listener = node_service::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = state.clone();
        let _server = tokio::spawn(async move {
            node_service::serve_node_api(serving, listener, std::future::pending())
                .await
                .unwrap();
        });
        let served = std::env::var("WRIT_BENCH_AGENT_SERVED").is_ok_and(|v| v == "1");
        for n in counts {
            run(n, served, &state, addr, tmp.path()).await;
        }
    });
}
