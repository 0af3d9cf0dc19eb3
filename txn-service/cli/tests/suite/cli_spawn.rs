//! `writ api spawn` and `writ agent children` as a user runs them: the `writ` binary is
//! the parent, a py-spiffe script (or another `writ`) the child, against a real server
//! and agent. py-spiffe is installed into `.interop/py` on first use; without Python
//! the Python test skips, unless `WRIT_REQUIRE_ALL=1`.
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use writ_tests::python::python;
use writ_tests::{Stack, available, uid_selector};

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const PLANNER: &str = "spiffe://example.org/agents/planner";

/// A stack where the planner (every process of this uid) may spawn for 5 minutes, one
/// level deep.
async fn stack() -> Stack {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    stack
        .register_with("/agents/planner", &[&uid_selector()], |e| {
            e.spawn_max_ttl = Some(300);
            e.spawn_max_depth = Some(1);
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the entry did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack
}

async fn writ(stack: &Stack, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = tokio::process::Command::new(WRIT);
    cmd.args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", stack.endpoint())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("writ finished in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_child_gets_the_child_id_with_py_spiffe_and_a_capped_ttl() {
    let py = python();
    if !available("py-spiffe", py.is_some()) {
        return;
    }
    let py = py.unwrap();
    let stack = stack().await;
    let script = writ_tests::env::workspace_root().join("tests/interop/py/workload_client.py");
    let before = SystemTime::now();
    let out = writ(
        &stack,
        &[
            "api",
            "spawn",
            "--name",
            "summarize",
            "--ttl",
            "1h",
            "--parent",
            PLANNER,
            "--",
            py.exe.to_str().unwrap(),
            "-s",
            script.to_str().unwrap(),
            "tool-server",
        ],
        &[
            ("PYTHONPATH", &py.site),
            ("PYTHONDONTWRITEBYTECODE", Path::new("1")),
        ],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let seen: Value = serde_json::from_str(
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("{stdout}\n{stderr}")),
    )
    .unwrap();
    let child = seen["x509_id"].as_str().unwrap();
    let suffix = child
        .strip_prefix(&format!("{PLANNER}/sub/summarize-"))
        .unwrap_or_else(|| panic!("{child} is not under the planner"));
    assert!(
        suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
        "{child}"
    );
    assert_eq!(
        seen["x509_ids"],
        serde_json::json!([child]),
        "only the child identity"
    );
    assert_eq!(seen["jwt_id"], child);
    assert_eq!(seen["leaf_issued_by_bundle"], true);
    // The lease asked for 1h and got the policy's 5 minutes.
    let until = stderr
        .split(" until ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no lease line: {stderr}"));
    let until = humantime::parse_rfc3339(until).unwrap();
    let lives = until.duration_since(before).unwrap();
    assert!(
        lives <= Duration::from_secs(301),
        "capped at 300 s: {lives:?}"
    );
    assert!(lives >= Duration::from_secs(295), "{lives:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depth_beyond_the_policy_is_refused_and_children_are_listed() {
    let stack = stack().await;
    // A child (depth 1) spawning its own child (depth 2) under spawn_max_depth 1.
    let out = writ(
        &stack,
        &[
            "api", "spawn", "--name", "outer", "--parent", PLANNER, "--", WRIT, "api", "spawn",
            "--name", "inner", "--", "true",
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("depth 2 is beyond spawn_max_depth 1"),
        "{stderr}"
    );
    assert!(stderr.contains("ResourceExhausted"), "{stderr}");

    // While a child runs, `writ agent children` lists it; the test process holds the
    // planner identity too (same uid), so it sees the planner's children.
    let socket = stack.endpoint();
    let mut sleeper = tokio::process::Command::new(WRIT)
        .args([
            "api", "spawn", "--socket", &socket, "--name", "sleeper", "--parent", PLANNER, "--",
            "sleep", "5",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = writ(&stack, &["agent", "children", "--socket", &socket], &[]).await;
        let listed = String::from_utf8_lossy(&out.stdout);
        if listed.contains(&format!("{PLANNER}/sub/sleeper-")) {
            assert!(
                listed.contains("depth 1") && listed.contains("until"),
                "{listed}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child was never listed: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sleeper.wait().await.unwrap().success());
}

/// A sub-agent's identity is bound to the one process `writ api spawn` started: a shell
/// wrapper that forks the command gets nothing for it, and the command says why; with
/// `exec` (same pid, same start time) the command is the sub-agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_wrapper_must_exec_the_command_that_uses_the_identity() {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    // The planner is the `writ` binary itself; a copy of it elsewhere is nobody.
    let writ_path = std::fs::canonicalize(WRIT).unwrap();
    let path_selector = format!("unix:path:{}", writ_path.display());
    stack
        .register_with("/agents/planner", &[&path_selector], |e| {
            e.spawn_max_ttl = Some(300);
            e.spawn_max_depth = Some(1);
        })
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the entry did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("writ-copy");
    std::fs::copy(&writ_path, &copy).unwrap();
    let copy = copy.to_str().unwrap();

    // Forked by the shell: a different process, no identity, and the reason.
    let forked = format!("{copy} api fetch x509; status=$?; exit $status");
    let out = writ(
        &stack,
        &[
            "api", "spawn", "--name", "wrap", "--parent", PLANNER, "--", "sh", "-c", &forked,
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("no identity issued to this process"),
        "{stderr}"
    );
    assert!(stderr.contains("bound to pid"), "{stderr}");
    assert!(stderr.contains("exec"), "{stderr}");

    // `exec`: the command is the sub-agent.
    let execed = format!("true; exec {copy} api fetch x509 --output json");
    let out = writ(
        &stack,
        &[
            "api", "spawn", "--name", "wrap", "--parent", PLANNER, "--", "sh", "-c", &execed,
        ],
        &[],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let svids: Value = serde_json::from_slice(&out.stdout).unwrap();
    let svids = svids.as_array().unwrap();
    assert_eq!(svids.len(), 1, "{svids:?}");
    let id = svids[0]["spiffe_id"].as_str().unwrap();
    assert!(id.starts_with(&format!("{PLANNER}/sub/wrap-")), "{id}");
}
