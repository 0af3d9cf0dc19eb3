//! Sub-agents end to end: a real server, agent and TTS (reading leases from the
//! server's SQLite store), with parents and children as real processes
//! (`subagent_probe`) spawned through `writ_sdk::spawn`.
//!
//! Every identity is registered for `unix:uid:<uid>`, so the test process and its
//! probes all hold them; parents name theirs with `parent`. A sub-agent process is
//! matched by its (pid, start time) instead, and gets only its own identity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use writ_identity::clock::{Clock, SystemClock};
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::TxnClient;
use writ_sdk::spawn::{Registration, SpawnError, SubAgents};
use writ_sdk::txn_token::TxnToken;
use writ_sdk::workload::X509Source;
use writ_tests::{Stack, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};

const TD: &str = "example.org";
const ISSUER: &str = "https://tts.example.org";
const TTS: &str = "/tts";
const GATEWAY: &str = "/gateway";
const PLANNER: &str = "/agents/planner";
const PROBE: &str = env!("CARGO_BIN_EXE_subagent_probe");
/// How long a lease change may take to reach a child (agent watch + TTS cache + slack).
const WITHIN: Duration = Duration::from_secs(10);

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}{path}")).unwrap()
}

fn now() -> i64 {
    SystemClock.unix_seconds()
}

struct World {
    stack: Stack,
    tts: TxnServer,
    audit_path: PathBuf,
    url: String,
}

impl World {
    /// The planner may spawn (5 minutes, depth 2, 3 live children); the gateway may not.
    async fn start() -> Self {
        let stack = Stack::start(Duration::from_secs(3600)).await;
        stack.register(TTS, &[&uid_selector()]).await;
        stack.register(GATEWAY, &[&uid_selector()]).await;
        stack
            .register_with(PLANNER, &[&uid_selector()], |e| {
                e.spawn_max_ttl = Some(300);
                e.spawn_max_depth = Some(2);
                e.spawn_max_children = Some(3);
            })
            .await;
        let audit_path = stack.dir.path().join("txn/audit.log");
        let toml = format!(
            r#"
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
workload_api = "{}"
spiffe_id = "spiffe://{TD}{TTS}"
data_dir = "{}"

[identity_store]
connection = "{}"

[[policy.caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["txn_token"]
max_scope = ["read", "write", "admin"]

[[policy.caller]]
prefix = "spiffe://example.org/agents"
subject_token_types = ["txn_token"]
max_scope = ["read", "write"]
"#,
            stack.endpoint(),
            stack.dir.path().join("txn").display(),
            stack.dir.path().join("db.sqlite3").display(),
        );
        let config = TxnConfig::from_toml(&toml, stack.dir.path()).unwrap();
        let tts = loop {
            // The TTS needs its own SVID, which reaches the agent a moment after the entry.
            match TxnServer::start(config.clone()).await {
                Ok(t) => break t,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let url = format!("https://{}", tts.addr);
        Self {
            stack,
            tts,
            audit_path,
            url,
        }
    }

    async fn client(&self, path: &str) -> TxnClient {
        let source = X509Source::builder()
            .endpoint(self.stack.endpoint())
            .spiffe_id(id(path))
            .build()
            .await
            .unwrap();
        TxnClient::new(&source, &self.url, id(TTS)).unwrap()
    }

    /// alice's Txn-Token as the gateway got it (scope `read write admin`), replaced by
    /// the planner for `read write`.
    async fn planner_token(&self) -> String {
        let t = now();
        let first = TxnToken {
            iss: ISSUER.into(),
            iat: t,
            exp: t + 300,
            aud: TD.into(),
            txn: "6c1e5a0e-0000-4000-8000-000000000001".into(),
            sub: "alice".into(),
            scope: "read write admin".into(),
            req_wl: id(GATEWAY).to_string(),
            tctx: Some(BTreeMap::from([("order".into(), json!(7))])),
            rctx: None,
            act: None,
        };
        let token = self.tts.service.keys().mint(&first).unwrap();
        self.client(PLANNER)
            .await
            .replace(&token, Some("read write"))
            .await
            .unwrap()
            .access_token
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn sub_agents(&self) -> SubAgents {
        SubAgents::connect(&self.stack.endpoint()).await.unwrap()
    }

    fn probe(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(PROBE);
        cmd.args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", self.stack.endpoint())
            .env("WRIT_TTS_URL", &self.url)
            .env("WRIT_TTS_ID", id(TTS).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }
}

/// The next JSON line a probe printed, within [`WITHIN`].
async fn next_line(lines: &mut Lines<BufReader<ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WITHIN, lines.next_line())
        .await
        .expect("a probe line in time")
        .unwrap()
        .expect("the probe is still running");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"))
}

/// Reads probe lines until one satisfies `done`, within [`WITHIN`].
async fn until(lines: &mut Lines<BufReader<ChildStdout>>, done: impl Fn(&Value) -> bool) -> Value {
    loop {
        let line = next_line(lines).await;
        if done(&line) {
            return line;
        }
    }
}

/// A parent probe (the planner) with a `watch` child; returns the parent, its output,
/// and the child's lease line and first observation.
async fn parent_with_child(
    world: &World,
    task: &str,
    token: &str,
) -> (Child, Lines<BufReader<ChildStdout>>, Value) {
    let mut parent = world
        .probe(&["parent", task, id(PLANNER).as_str()])
        .env("WRIT_TXN_TOKEN", token)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let lease = next_line(&mut lines).await;
    let child_id = lease["child"].as_str().unwrap().to_owned();
    let prefix = format!("{}/sub/{task}-", id(PLANNER));
    assert!(child_id.starts_with(&prefix), "{lease}");
    assert_eq!(child_id.len(), prefix.len() + 8, "8 hex digits: {lease}");
    // The child has its own identity, not the uid's, and its exchange is granted.
    let seen = until(&mut lines, |l| l["exchange"] != "none").await;
    assert_eq!(seen["x509"], child_id.as_str(), "{seen}");
    assert_eq!(seen["exchange"], "granted", "{seen}");
    (parent, lines, lease)
}

async fn tell(parent: &mut Child, line: &str) {
    let stdin = parent.stdin.as_mut().unwrap();
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    stdin.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_and_parent_exit_end_the_child_identity_and_its_exchanges() {
    let world = World::start().await;
    let token = world.planner_token().await;

    // Explicit release.
    let (mut parent, mut lines, lease) = parent_with_child(&world, "released", &token).await;
    tell(&mut parent, "release").await;
    let released = until(&mut lines, |l| l.get("released").is_some()).await;
    assert_eq!(released["released"], lease["lease"]);
    let gone = until(&mut lines, |l| {
        l["x509"] == "no identity issued" && l["exchange"] == "unauthorized_client"
    })
    .await;
    assert_eq!(gone["exchange"], "unauthorized_client");
    let refused = world
        .audit()
        .into_iter()
        .rev()
        .find(|l| l["decision"] == "refused" && l["lease"] == lease["lease"])
        .expect("the refused exchange is audited with its lease");
    assert_eq!(refused["caller"], lease["child"]);
    assert_eq!(refused["parent"], id(PLANNER).to_string());
    assert!(
        refused["reason"].as_str().unwrap().contains("ended"),
        "{refused}"
    );
    tell(&mut parent, "exit").await;
    let _ = parent.wait().await;

    // The parent exits without releasing: the agent notices.
    let (mut parent, mut lines, lease) = parent_with_child(&world, "orphaned", &token).await;
    tell(&mut parent, "exit").await;
    assert!(parent.wait().await.unwrap().success());
    until(&mut lines, |l| {
        l["x509"] == "no identity issued" && l["exchange"] == "unauthorized_client"
    })
    .await;
    let listed = world.sub_agents().await.list().await.unwrap();
    let ended = listed
        .iter()
        .find(|l| l.id == lease["lease"].as_str().unwrap());
    // The watch child still runs, so the agent still knows the ended lease.
    let ended = ended.expect("the ended lease is listed while its child lives");
    assert!(ended.released_at.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_user_gateway_planner_sub_agent_is_in_act_and_in_the_audit() {
    let world = World::start().await;
    let token = world.planner_token().await;
    let mut command = std::process::Command::new(PROBE);
    command
        .arg("exchange")
        .arg("read")
        .env("WRIT_TTS_URL", &world.url)
        .env("WRIT_TTS_ID", id(TTS).to_string());
    let mut child = writ_sdk::spawn::Spawn::new("summarize", command)
        .endpoint(world.stack.endpoint())
        .parent(id(PLANNER))
        .txn_token(token)
        .stdout(Stdio::piped())
        .spawn()
        .await
        .unwrap();
    let lease = child.lease().clone();
    assert_eq!(lease.depth, 1);
    assert_eq!(lease.parent_id, id(PLANNER));
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.child_mut().stdout.as_mut().unwrap(), &mut out)
        .await
        .unwrap();
    assert!(child.wait().await.unwrap().success());
    let printed: Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(printed["id"], lease.child_id.to_string());
    let token = printed["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{printed}"));
    let verified = writ_sdk::txn_token::TxnVerifier::new(
        TD.parse().unwrap(),
        world.tts.service.keys().public_keys(),
    )
    .verify_at(token, std::time::SystemTime::now())
    .unwrap();
    assert_eq!(verified.sub, "alice");
    assert_eq!(verified.scope, "read", "scope narrows at each hop");
    assert_eq!(verified.req_wl, lease.child_id.to_string());
    assert_eq!(
        verified.chain(),
        vec![
            lease.child_id.as_str(),
            id(PLANNER).as_str(),
            id(GATEWAY).as_str()
        ],
        "sub-agent outermost, then planner, then the gateway that requested it"
    );
    let lease_end = lease
        .expires_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        u64::try_from(verified.exp).unwrap() <= lease_end,
        "never outlives the lease"
    );

    let granted: Vec<Value> = world
        .audit()
        .into_iter()
        .filter(|l| l["decision"] == "granted")
        .collect();
    assert_eq!(granted.len(), 2, "{granted:?}");
    assert_eq!(granted[0]["caller"], id(PLANNER).to_string());
    assert_eq!(granted[0]["granted_scope"], "read write");
    assert!(granted[0].get("lease").is_none());
    assert_eq!(granted[1]["caller"], lease.child_id.to_string());
    assert_eq!(granted[1]["lease"], lease.id.as_str());
    assert_eq!(granted[1]["parent"], id(PLANNER).to_string());
    assert_eq!(granted[1]["granted_scope"], "read");
    assert_eq!(
        granted[1]["act"],
        json!([
            lease.child_id.as_str(),
            id(PLANNER).as_str(),
            id(GATEWAY).as_str()
        ])
    );
}

/// A plain child process of this test process, kept until dropped.
fn sleeper() -> (Child, i32) {
    let child = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    (child, pid)
}

fn start_time(pid: i32) -> u64 {
    writ_identity::attest::workload::process_start_time(std::path::Path::new("/proc"), pid).unwrap()
}

#[track_caller]
fn refused(result: Result<writ_sdk::spawn::Lease, SpawnError>, code: tonic::Code, text: &str) {
    match result {
        Err(SpawnError::Refused { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(text), "{message:?} lacks {text:?}");
        }
        other => panic!("expected {code:?} ({text}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_are_checked_against_the_kernel_and_the_policy() {
    let world = World::start().await;
    let mut agents = world.sub_agents().await;
    let planner = Some(id(PLANNER));
    let (_a, pid) = sleeper();
    let reg = |pid: i32, task: &str| Registration {
        pid,
        start_time: start_time(pid),
        task: task.into(),
        ttl: None,
        parent: planner.clone(),
    };

    // No spawn policy on the gateway's entry.
    let mut by_gateway = reg(pid, "work");
    by_gateway.parent = Some(id(GATEWAY));
    refused(
        agents.register(&by_gateway).await,
        tonic::Code::FailedPrecondition,
        "no spawn policy",
    );
    // Not this process's child (pid 1), and a reused pid (another start time).
    let mut init = reg(pid, "work");
    init.pid = 1;
    init.start_time = 0;
    refused(
        agents.register(&init).await,
        tonic::Code::FailedPrecondition,
        "not a running child",
    );
    let mut reused = reg(pid, "work");
    reused.start_time += 1;
    refused(
        agents.register(&reused).await,
        tonic::Code::FailedPrecondition,
        "pid reused",
    );
    // Malformed task names.
    for bad in ["", "Caps", "a/b", &"x".repeat(33)] {
        refused(
            agents.register(&reg(pid, bad)).await,
            tonic::Code::InvalidArgument,
            "task",
        );
    }
    // A TTL above the policy is capped at spawn_max_ttl (300 s), not refused.
    let mut long = reg(pid, "capped");
    long.ttl = Some(Duration::from_secs(3600));
    let before = now();
    let lease = agents.register(&long).await.unwrap();
    let lives = lease
        .expires_at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let lives = i64::try_from(lives).unwrap() - before;
    assert!((299..=301).contains(&lives), "capped to 300 s, got {lives}");
    // The same process twice.
    refused(
        agents.register(&reg(pid, "again")).await,
        tonic::Code::FailedPrecondition,
        "already a sub-agent",
    );
    // The children cap (3): two more, then refused.
    let (_b, pid_b) = sleeper();
    let (_c, pid_c) = sleeper();
    let (_d, pid_d) = sleeper();
    agents.register(&reg(pid_b, "two")).await.unwrap();
    agents.register(&reg(pid_c, "three")).await.unwrap();
    refused(
        agents.register(&reg(pid_d, "four")).await,
        tonic::Code::ResourceExhausted,
        "spawn_max_children 3",
    );
    // Releasing one makes room.
    let listed = agents.list().await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|l| l.released_at.is_none()));
    agents.release(&lease.id).await.unwrap();
    let again = agents.release(&lease.id).await.unwrap();
    assert!(
        again.released_at.is_some(),
        "releasing twice is not an error"
    );
    agents.register(&reg(pid_d, "four")).await.unwrap();
    // Nobody else's lease can be released.
    refused(
        agents.release("00000000-0000-0000-0000-000000000000").await,
        tonic::Code::NotFound,
        "no lease",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_agent_cannot_fork_its_way_to_the_parent_identities() {
    let world = World::start().await;
    let mut command = std::process::Command::new(PROBE);
    command.arg("fork-x509");
    let mut child = writ_sdk::spawn::Spawn::new("forker", command)
        .endpoint(world.stack.endpoint())
        .parent(id(PLANNER))
        .stdout(Stdio::piped())
        .spawn()
        .await
        .unwrap();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(child.child_mut().stdout.as_mut().unwrap(), &mut out)
        .await
        .unwrap();
    child.wait().await.unwrap();
    let printed: Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(
        printed["x509"], "no identity issued",
        "an unregistered descendant of a sub-agent gets nothing"
    );
    // While an ordinary process of the same uid still gets the uid's identities.
    let plain = world.probe(&["x509"]).output().await.unwrap();
    let plain: Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_ne!(plain["x509"], "no identity issued", "{plain}");
}
