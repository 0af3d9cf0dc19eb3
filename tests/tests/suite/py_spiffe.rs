//! The SPIFFE Workload API against py-spiffe (PyPI `spiffe` 0.3.2), from Python 3: the
//! scripts under `tests/interop/py/` fetch X509-SVIDs, bundles and JWT-SVIDs, validate
//! tokens remotely and locally, and watch rotation; these tests assert what they print.
//!
//! py-spiffe is installed on first use into `<workspace>/.interop/py` (ignored by git) with
//! `python3 -m pip install --target`, under a file lock so parallel tests and test
//! processes install it once. Without Python, pip or the registry the tests skip, or fail
//! under `WRIT_REQUIRE_ALL=1`.
//!
//! The identities are registered for `unix:uid:<uid>` and `unix:path:<the Python
//! binary>`, so only the Python process is attested into them: the test process (same uid,
//! another binary) must get `no identity issued`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use writ_tests::python::{Python, python};
use writ_tests::{Stack, available, uid_selector};

/// Why a reset stream most likely happened.
const AUTHORITY_HINT: &str = "gRPC C-core (py-spiffe's transport) sends the percent-encoded socket \
     path as `:authority` over a Unix socket (`tmp%2Fdir%2Fagent.sock`), which the h2 crate's \
     server rejects with PROTOCOL_ERROR (hyperium/h2#487): the agent must accept it";
/// Longest one interop script may run.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop/py")
        .join(name)
}

/// Python with py-spiffe, or `None` when the test should skip (panics in CI).
fn python_or_skip() -> Option<Python> {
    let py = python();
    available("py-spiffe", py.is_some());
    py
}

/// Runs an interop script as its own process against the stack's socket and returns the
/// JSON line it printed.
async fn run_script(py: &Python, stack: &Stack, name: &str, args: &[&str]) -> Value {
    let mut cmd = tokio::process::Command::new(&py.exe);
    cmd.arg("-s")
        .arg(script(name))
        .args(args)
        .env("PYTHONPATH", &py.site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SPIFFE_ENDPOINT_SOCKET", stack.endpoint())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {SCRIPT_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !(stderr.contains("RST_STREAM") || stdout.contains("RST_STREAM")),
        "{name}: the agent reset the stream (HTTP/2 PROTOCOL_ERROR). {AUTHORITY_HINT}\n\
         stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        output.status.success(),
        "{name} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("{name} printed no JSON:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

fn path_selector(exe: &Path) -> String {
    format!("unix:path:{}", exe.display())
}

/// Waits until the agent holds an SVID for each of `n` entries.
async fn wait_for_svids(stack: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.len() < n {
        assert!(Instant::now() < deadline, "entries did not reach the agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The test process has the uid but not the Python binary's path: no identity for it.
async fn assert_rust_process_has_no_identity(stack: &Stack) {
    let client = spiffe::WorkloadApiClient::connect_to(stack.endpoint())
        .await
        .unwrap();
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(err.to_string().contains("no identity issued"), "{err}");
    let err = client
        .fetch_jwt_token(["tool-server"], None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no identity issued"), "{err}");
}

#[tokio::test]
async fn py_spiffe_fetches_svids_bundles_and_jwts() {
    let Some(py) = python_or_skip() else { return };
    let stack = Stack::start(Duration::from_secs(3600)).await;
    let (uid, path) = (uid_selector(), path_selector(&py.exe));
    let first = stack.register("/py/client", &[&uid, &path]).await;
    // Created one second later (entries order by creation second, then id), so the
    // first one stays the default SVID.
    stack
        .register_with("/py/second", &[&uid, &path], |e| {
            e.created_at = first.created_at + 1;
        })
        .await;
    // Same uid, another binary: Python must not get it.
    stack
        .register("/py/never", &[&uid, "unix:path:/nonexistent/python3"])
        .await;
    wait_for_svids(&stack, 3).await;
    assert_rust_process_has_no_identity(&stack).await;

    let out = run_script(&py, &stack, "workload_client.py", &["tool-server"]).await;
    eprintln!("py-spiffe saw: {out}");
    assert_ne!(out["pid"], std::process::id(), "another process");
    // X.509.
    assert_eq!(out["x509_id"], "spiffe://example.org/py/client");
    assert_eq!(
        out["x509_ids"],
        serde_json::json!([
            "spiffe://example.org/py/client",
            "spiffe://example.org/py/second"
        ]),
        "both Python identities, default first, and not /py/never"
    );
    assert_eq!(
        out["x509_context_default"],
        "spiffe://example.org/py/client"
    );
    assert_eq!(out["x509_has_key"], true);
    assert!(out["x509_chain_len"].as_u64().unwrap() >= 1);
    assert_eq!(out["x509_bundle_tds"], serde_json::json!(["example.org"]));
    assert!(out["x509_bundle_authorities"].as_u64().unwrap() >= 1);
    assert_eq!(out["leaf_issued_by_bundle"], true);
    // JWT: fetched, validated by the agent, refused when wrong, validated locally.
    assert_eq!(out["jwt_id"], "spiffe://example.org/py/client");
    assert_eq!(out["jwt_audience"], serde_json::json!(["tool-server"]));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(out["jwt_expiry"].as_u64().unwrap() > now);
    assert_eq!(out["jwt_same_when_cached"], true);
    assert_eq!(out["validated_id"], "spiffe://example.org/py/client");
    assert_eq!(out["wrong_audience_rejected"], true);
    assert_eq!(out["tampered_rejected"], true);
    assert_eq!(out["jwt_bundle_tds"], serde_json::json!(["example.org"]));
    assert!(out["jwt_bundle_keys"].as_u64().unwrap() >= 1);
    assert_eq!(out["local_validated_id"], "spiffe://example.org/py/client");
    assert_eq!(out["local_audience"], serde_json::json!(["tool-server"]));
    assert_eq!(out["local_wrong_audience_rejected"], true);
    // X509Source.
    assert_eq!(out["source_id"], "spiffe://example.org/py/client");
}

#[tokio::test]
async fn py_spiffe_stream_sees_rotation() {
    let Some(py) = python_or_skip() else { return };
    // SVIDs live 4 s, so the agent renews them at about 2 s.
    let stack = Stack::start(Duration::from_secs(4)).await;
    stack
        .register("/py/rotating", &[&uid_selector(), &path_selector(&py.exe)])
        .await;
    wait_for_svids(&stack, 1).await;
    assert_rust_process_has_no_identity(&stack).await;

    let out = run_script(&py, &stack, "watch_rotation.py", &["15"]).await;
    eprintln!("py-spiffe saw: {out}");
    assert_eq!(
        out["errors"],
        serde_json::json!([]),
        "py-spiffe's stream failed; if with StatusCode.INTERNAL: {AUTHORITY_HINT}"
    );
    assert_eq!(out["first_id"], "spiffe://example.org/py/rotating");
    assert_eq!(out["rotated"], true, "a rotated SVID within 15 s");
    assert_eq!(out["rotated_id"], "spiffe://example.org/py/rotating");
    assert_eq!(out["serials_differ"], true);
    assert!(
        out["rotated_not_after"].as_i64().unwrap() >= out["first_not_after"].as_i64().unwrap(),
        "the new SVID does not expire before the old one"
    );
    assert!(out["updates"].as_u64().unwrap() >= 2);
}
