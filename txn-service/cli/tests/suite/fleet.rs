//! A fleet on one PostgreSQL database (issue 16), as processes: three `writ server run`,
//! two `writ agent run` each given every server's address, two `writ txn run` replicas
//! sharing their public keys through the store, and this test process as their
//! workloads (`writ api`, `writ exchange`). One server is killed with SIGKILL, PostgreSQL
//! is restarted, the dead server comes back; the workloads keep valid SVIDs, new entries
//! keep arriving, and a Txn-Token minted by one replica is replaced by the other
//! throughout. The subject token comes from the npm `oidc-provider`; without Node the
//! token service part is left out (never under `WRIT_REQUIRE_ALL=1`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use writ_identity::store::Store as _;
use writ_identity::store::pg_harness::TempPostgres;

use crate::common::{Agent, Server, WRIT, api, bound_address, join_token_and_bundle, uid};

/// A `writ txn run` replica, killed on drop, and its URL.
struct Replica {
    child: std::process::Child,
    url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two token service replicas on `url`'s store, with their SVIDs from the agent on
/// `socket`, trusting `provider`'s access tokens.
fn replicas(
    dir: &Path,
    socket: &Path,
    url: &str,
    provider: &writ_tests::oidc_provider::Provider,
) -> Vec<Replica> {
    (0..2)
        .map(|n| {
            let config = format!(
                r#"
listen = "127.0.0.1:0"
issuer = "https://tts.fleet.example"
replica = "tts-{n}"
workload_api = "unix://{socket}"
spiffe_id = "spiffe://example.org/tts"
data_dir = "{data}"

[identity_store]
backend = "postgres"
connection = "{url}"

[[oidc]]
issuer = "{issuer}"
audiences = ["{resource}"]

[policy]
[[policy.caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["access_token"]
max_scope = ["read", "write"]
[[policy.caller]]
prefix = "spiffe://example.org/agents"
subject_token_types = ["txn_token"]
max_scope = ["read"]
"#,
                socket = socket.display(),
                data = dir.join(format!("txn-{n}")).display(),
                issuer = provider.issuer,
                resource = provider.resource,
            );
            let path = dir.join(format!("txn-{n}.toml"));
            std::fs::write(&path, config).unwrap();
            let mut child = Command::new(WRIT)
                .args(["txn", "run", "--config"])
                .arg(&path)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let url = format!(
                "https://{}",
                bound_address(stdout, "Transaction token service listening")
            );
            Replica { child, url }
        })
        .collect()
}

/// `writ exchange` as `spiffe_id` through the agent on `socket`, at `url`; the token.
fn exchange(socket: &Path, url: &str, spiffe_id: &str, subject: &str, kind: &str) -> String {
    let mut child = Command::new(WRIT)
        .args([
            "exchange",
            "--subject-token",
            "-",
            "--subject-token-type",
            kind,
            "--scope",
            "read",
            "--spiffe-id",
            spiffe_id,
            "--server-id",
            "spiffe://example.org/tts",
            "--url",
            url,
        ])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .env_remove("WRIT_TXN_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut input = child.stdin.take().unwrap();
        input.write_all(subject.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "exchange at {url} as {spiffe_id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The gateway exchanges an access token at replica `from`, the planner replaces the
/// Txn-Token at replica `to`.
fn exchange_across(
    socket: &Path,
    replicas: &[Replica],
    from: usize,
    to: usize,
    access_token: &str,
) {
    let token = exchange(
        socket,
        &replicas[from].url,
        "spiffe://example.org/gateway",
        access_token,
        "access_token",
    );
    let replaced = exchange(
        socket,
        &replicas[to].url,
        "spiffe://example.org/agents/planner",
        &token,
        "txn_token",
    );
    assert_eq!(replaced.split('.').count(), 3, "{replaced}");
}

/// The SPIFFE IDs `writ api fetch x509` gets on `socket` (empty while it gets none).
fn ids(socket: &Path) -> BTreeSet<String> {
    let out = api(&["api", "fetch", "x509", "--output", "json"], socket);
    if !out.status.success() {
        return BTreeSet::new();
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["spiffe_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded) until `socket` serves `id`; returns how long it took.
fn wait_for_id(socket: &Path, id: &str) -> Duration {
    let started = Instant::now();
    while !ids(socket).contains(id) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{id} never reached the workload on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// Fetches the workload's SVIDs into `dir` and checks each against its bundle with
/// OpenSSL: a valid chain at this moment.
fn assert_valid_svids(socket: &Path, dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let out = api(
        &[
            "api",
            "fetch",
            "x509",
            "--output",
            "json",
            "--write",
            dir.to_str().unwrap(),
        ],
        socket,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert!(!list.is_empty());
    for svid in list {
        let verify = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(svid["bundle_file"].as_str().unwrap())
            .arg(svid["svid_file"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}: {}",
            svid["spiffe_id"],
            String::from_utf8_lossy(&verify.stdout)
        );
    }
}

fn certificates(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

fn journal(url: &str) -> BTreeSet<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = writ_identity::store::postgres::PostgresStore::connect(url)
            .await
            .unwrap();
        let ids = store
            .list_journal()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        store.close().await;
        ids
    })
}

/// An agent given `addresses` in that order, joined with a token from `server`.
fn agent(server: &Server, addresses: &[&str], dir: &Path, name: &str) -> (Agent, PathBuf, String) {
    let token = join_token_and_bundle(server);
    let bundle = server.dir.path().join("bundle.pem");
    let socket = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(WRIT);
    cmd.args(["agent", "run", "--join-token", &token]);
    for address in addresses {
        cmd.args(["--server-address", address]);
    }
    cmd.arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--socket-path")
        .arg(&socket)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = Agent(cmd.spawn().unwrap());
    let id = format!("spiffe://example.org/writ/agent/join_token/{token}");
    (agent, socket, id)
}

#[test]
fn three_servers_two_agents_survive_a_killed_server_and_a_database_restart() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let provider = writ_tests::oidc_provider::Provider::start();
    let url = pg.url();
    let config = format!("[datastore]\nbackend = \"postgres\"\nconnection = \"{url}\"\n");
    let mut servers: Vec<Server> = (0..3).map(|_| Server::start_with_config(&config)).collect();
    let addrs: Vec<String> = servers.iter().map(|s| s.node_addr.clone()).collect();
    // Every server publishes the three CAs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while servers
        .iter()
        .any(|s| certificates(&s.ok(&["bundle", "show"])) != 3)
    {
        assert!(
            Instant::now() < deadline,
            "the servers never published the union"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let dir = tempfile::tempdir().unwrap();
    // Agent a starts on server 0, agent b on server 1; each knows all three.
    let (_a, sock_a, id_a) = agent(
        &servers[0],
        &[&addrs[0], &addrs[1], &addrs[2]],
        dir.path(),
        "a",
    );
    let (_b, sock_b, id_b) = agent(
        &servers[1],
        &[&addrs[1], &addrs[2], &addrs[0]],
        dir.path(),
        "b",
    );
    // Both attested (through whichever server answered).
    let deadline = Instant::now() + Duration::from_secs(30);
    while ![&id_a, &id_b].iter().all(|id| {
        servers[2]
            .ok(&["agent", "list", "--output", "json"])
            .contains(id.as_str())
    }) {
        assert!(Instant::now() < deadline, "the agents never attested");
        std::thread::sleep(Duration::from_millis(50));
    }
    let selector = format!("unix:uid:{}", uid());
    let register = |server: &Server, id: &str, parent: &str| {
        server.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            parent,
            "--selector",
            &selector,
        ]);
    };
    register(&servers[2], "spiffe://example.org/fleet/a", &id_a);
    register(&servers[2], "spiffe://example.org/fleet/b", &id_b);
    wait_for_id(&sock_a, "spiffe://example.org/fleet/a");
    wait_for_id(&sock_b, "spiffe://example.org/fleet/b");
    // The token service and its callers are workloads of agent a.
    let tts = provider.as_ref().map(|provider| {
        for path in ["/tts", "/gateway", "/agents/planner"] {
            register(&servers[2], &format!("spiffe://example.org{path}"), &id_a);
        }
        wait_for_id(&sock_a, "spiffe://example.org/tts");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let access_token = runtime.block_on(provider.access_token("read write"));
        let replicas = replicas(dir.path(), &sock_a, &url, provider);
        exchange_across(&sock_a, &replicas, 0, 1, &access_token);
        exchange_across(&sock_a, &replicas, 1, 0, &access_token);
        (replicas, access_token)
    });
    let rows = journal(&url);
    assert_eq!(rows.len(), 6, "two slots (X.509, JWT) per server");
    let expected_entries = if tts.is_some() { 3 } else { 0 };

    // SIGKILL server 0, agent a's server.
    servers[0].child.kill().unwrap();
    servers[0].child.wait().unwrap();
    assert_valid_svids(&sock_a, &dir.path().join("svids-a"));
    assert_valid_svids(&sock_b, &dir.path().join("svids-b"));
    register(&servers[1], "spiffe://example.org/fleet/a2", &id_a);
    let took = wait_for_id(&sock_a, "spiffe://example.org/fleet/a2");
    eprintln!("entry created on a surviving server reached a failed-over agent in {took:?}");
    assert_valid_svids(&sock_a, &dir.path().join("svids-a"));
    // Nobody attested again: still two agents.
    let agents: serde_json::Value =
        serde_json::from_str(&servers[1].ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(agents.as_array().unwrap().len(), 2, "{agents}");
    if let Some((replicas, access_token)) = &tts {
        exchange_across(&sock_a, replicas, 0, 1, access_token);
    }

    // PostgreSQL restarts under the servers: they reconnect, nothing acknowledged is lost.
    pg.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = servers[2].writ(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/fleet/b2",
            "--parent-id",
            &id_b,
            "--selector",
            &selector,
        ]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the servers never reconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_id(&sock_b, "spiffe://example.org/fleet/b2");
    assert_eq!(servers[1].entry_count(), 4 + expected_entries);
    if let Some((replicas, access_token)) = &tts {
        exchange_across(&sock_a, replicas, 1, 0, access_token);
    }
    assert_valid_svids(&sock_a, &dir.path().join("svids-a"));
    assert_valid_svids(&sock_b, &dir.path().join("svids-b"));

    // The dead server comes back on its data dir: it rejoins and deletes nothing.
    let node_addr = servers[0].node_addr.clone();
    servers[0].child = Server::spawn(servers[0].dir.path(), &node_addr);
    servers[0].wait_ready();
    assert!(
        journal(&url).is_superset(&rows),
        "a restarted server deleted a slot"
    );
    assert_eq!(certificates(&servers[0].ok(&["bundle", "show"])), 3);
    register(&servers[0], "spiffe://example.org/fleet/a3", &id_a);
    wait_for_id(&sock_a, "spiffe://example.org/fleet/a3");
}
