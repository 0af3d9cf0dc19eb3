//! A data dir keeps its trust domain and its CA, driven through the real `writ` binary:
//! `writ dev` restarted without `--trust-domain` reuses the recorded one and refuses
//! another; `writ server run` refuses another; a datastore that lost its CA while
//! `keys/` still holds CA keys refuses to start unless `--reset-ca` says to start over.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::WRIT;

/// Runs `writ dev` on `dir` with `extra` flags until its banner is out, reads the trust
/// domain from `dev.json`, then stops it with Ctrl-C.
fn dev_trust_domain(dir: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(WRIT)
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args([
            "--tts-listen",
            "127.0.0.1:0",
            "--oidc-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("writ dev ended early").unwrap();
        if line.starts_with("Ctrl-C stops") {
            break;
        }
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let td = state["trust_domain"].as_str().unwrap().to_owned();
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    for _ in lines.by_ref() {}
    assert!(child.wait().unwrap().success());
    td
}

/// Runs `writ` to completion (it must not start serving), at most 60 s.
fn run_to_end(args: &[&str], dir: &Path) -> Output {
    let mut child = Command::new(WRIT)
        .args(args)
        .current_dir(dir)
        .env_remove("WRIT_SERVER_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("writ {args:?} kept running: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The one error line of a refused start.
fn refusal(out: &Output) -> String {
    assert!(!out.status.success(), "the start must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.to_lowercase().contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    errors[0].to_owned()
}

#[test]
fn writ_dev_keeps_the_trust_domain_of_its_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    assert_eq!(
        dev_trust_domain(&data, &["--trust-domain", "acme.test"]),
        "acme.test"
    );
    // Restarted without the flag: the recorded one, not example.org.
    assert_eq!(dev_trust_domain(&data, &[]), "acme.test");
    assert_eq!(
        dev_trust_domain(&data, &["--trust-domain", "acme.test"]),
        "acme.test"
    );
    // Another one, explicitly: refused, naming both.
    let out = run_to_end(
        &[
            "dev",
            "--data-dir",
            data.to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--tts-listen",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    let line = refusal(&out);
    assert!(
        line.contains("acme.test") && line.contains("example.org"),
        "{line}"
    );
    assert!(!data.join("dev.json").exists(), "nothing started");
    // And the data dir is untouched by the refusal.
    assert_eq!(dev_trust_domain(&data, &[]), "acme.test");
}

/// `writ server run` on `dir/data` with `extra` flags: refused (its output) or ready
/// (then stopped, `None`).
fn server_run(dir: &Path, extra: &[&str]) -> Option<Output> {
    let socket = dir.join("server.sock");
    let mut child = Command::new(WRIT)
        .args(["server", "run", "--bind-address", "", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--server-socket")
        .arg(&socket)
        .args(extra)
        .env_remove("WRIT_SERVER_SOCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if socket.exists()
            && Command::new(WRIT)
                .args(["healthcheck", "--shallow"])
                .env("WRIT_SERVER_SOCKET", &socket)
                .output()
                .unwrap()
                .status
                .success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "writ server run never got ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    None
}

fn ca_keys(dir: &Path) -> Vec<String> {
    let mut keys: Vec<String> = std::fs::read_dir(dir.join("data").join("keys"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("slot-"))
        .collect();
    keys.sort();
    keys
}

#[test]
fn writ_server_run_refuses_another_trust_domain_on_its_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    assert!(server_run(dir.path(), &["--trust-domain", "acme.test"]).is_none());
    let line = refusal(&server_run(dir.path(), &["--trust-domain", "other.test"]).unwrap());
    assert!(
        line.contains("acme.test") && line.contains("other.test"),
        "{line}"
    );
    // No flag means example.org, which is not this data dir's either.
    let line = refusal(&server_run(dir.path(), &[]).unwrap());
    assert!(
        line.contains("acme.test") && line.contains("example.org"),
        "{line}"
    );
    assert!(server_run(dir.path(), &["--trust-domain", "acme.test"]).is_none());
}

#[test]
fn a_datastore_without_its_ca_keys_refuses_to_start_unless_reset_ca() {
    let dir = tempfile::tempdir().unwrap();
    assert!(server_run(dir.path(), &["--trust-domain", "acme.test"]).is_none());
    let old_keys = ca_keys(dir.path());
    assert!(!old_keys.is_empty());
    // The datastore is lost; the keys are not.
    for name in [
        "datastore.sqlite3",
        "datastore.sqlite3-wal",
        "datastore.sqlite3-shm",
    ] {
        let _ = std::fs::remove_file(dir.path().join("data").join(name));
    }
    let line = refusal(&server_run(dir.path(), &["--trust-domain", "acme.test"]).unwrap());
    assert!(
        line.contains("--reset-ca") && line.contains("keys"),
        "{line}"
    );
    assert_eq!(ca_keys(dir.path()), old_keys, "the refusal deletes nothing");

    // Starting over is explicit: the old keys go, a new CA is made.
    assert!(server_run(dir.path(), &["--trust-domain", "acme.test", "--reset-ca"]).is_none());
    let new_keys = ca_keys(dir.path());
    assert!(!new_keys.is_empty());
    assert!(
        new_keys.iter().all(|k| !old_keys.contains(k)),
        "old {old_keys:?}, new {new_keys:?}"
    );
    // And the new CA is kept as any other: a plain restart works.
    assert!(server_run(dir.path(), &["--trust-domain", "acme.test"]).is_none());
}
