//! `writ dev` end to end, as a user drives it: the real binary on a temp data dir; an
//! entry created without `--parent-id`; `writ dev login` and `writ exchange` through the
//! embedded token service; a standalone `writ txn run` that refuses the development
//! issuer's tokens; Ctrl-C; and a restart that keeps the trust bundle and the entries.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::dev::{DevProcess, ok, state, writ};
use crate::common::{WRIT, bound_address, uid};
use serde_json::Value;

#[test]
fn writ_dev_runs_the_chain_and_restarts_with_the_same_bundle_and_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let dev = DevProcess::start(&dir);
    let banner = dev.banner.join("\n");
    for part in [
        "identity server",
        "agent.sock",
        "token service",
        "DEVELOPMENT ONLY",
        "writ dev login",
    ] {
        assert!(banner.contains(part), "banner lacks {part:?}:\n{banner}");
    }
    assert!(dev.banner.len() <= 10, "a few lines:\n{banner}");
    let s = state(&dir);
    let sock = s["server_socket"].as_str().unwrap().to_owned();
    let workload_api = s["workload_api"].as_str().unwrap().to_owned();
    let tts_url = s["tts_url"].as_str().unwrap().to_owned();
    assert_eq!(s["agent_id"], "spiffe://example.org/writ/agent/dev");
    // The data dir is 0711: workloads of other uids reach agent.sock (0777) by name but
    // cannot list the dir; every subdirectory is 0700.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o711);
        assert_eq!(mode(&dir.join("agent.sock")), 0o777);
        assert_eq!(mode(&dir.join("server.sock")), 0o600);
        for sub in std::fs::read_dir(&dir).unwrap() {
            let sub = sub.unwrap().path();
            if sub.is_dir() {
                assert_eq!(mode(&sub), 0o700, "{}", sub.display());
            }
        }
    }

    // In dev mode the parent may be left out: it is the embedded agent.
    let me = "spiffe://example.org/tester";
    let created = ok(
        &[
            "entry",
            "create",
            "--spiffe-id",
            me,
            "--selector",
            &format!("unix:uid:{}", uid()),
            "--output",
            "json",
        ],
        &sock,
    );
    let created: Value = serde_json::from_str(&created).unwrap();
    let entry = &created;
    assert_eq!(entry["parent_id"], "spiffe://example.org/writ/agent/dev");
    let entry_id = entry["id"].as_str().unwrap().to_owned();
    let bundle = ok(&["bundle", "show"], &sock);
    assert!(bundle.contains("BEGIN CERTIFICATE"));

    // A user token from the development issuer, exchanged by this workload.
    let login = ok(
        &[
            "dev",
            "login",
            "--data-dir",
            dir.to_str().unwrap(),
            "--user",
            "alice",
            "--scope",
            "docs.read",
        ],
        &sock,
    );
    let user_token = login.lines().last().unwrap().to_owned();
    let token_file = tmp.path().join("user.jwt");
    std::fs::write(&token_file, &user_token).unwrap();
    let exchange = |url: &str| {
        writ(
            &[
                "exchange",
                "--url",
                url,
                "--subject-token",
                token_file.to_str().unwrap(),
                "--scope",
                "docs.read",
                "--spiffe-id",
                me,
                "--socket",
                &workload_api,
            ],
            &sock,
        )
    };
    let out = exchange(&tts_url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let txn = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let claims: Value =
        serde_json::from_str(&ok(&["txn", "decode", &txn, "--output", "json"], &sock)).unwrap();
    let claims = &claims["claims"];
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["req_wl"], me);
    assert_eq!(claims["scope"], "docs.read");

    // A token service outside `writ dev` refuses the development issuer's tokens, even
    // when configured to trust that issuer. (It runs as this test's workload: only the
    // `writ dev` process itself gets the embedded service's identity.)
    let config = tmp.path().join("txn.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
workload_api = "{workload_api}"
spiffe_id = "{me}"
audit_log = "-"
[[oidc]]
issuer = "{issuer}"
audiences = ["writ-dev"]
[[policy.caller]]
trust_domain = "example.org"
subject_token_types = ["access_token"]
max_scope = ["docs.read"]
"#,
            issuer = s["oidc_issuer"].as_str().unwrap()
        ),
    )
    .unwrap();
    let mut standalone = Command::new(WRIT)
        .args(["txn", "run", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // With `audit_log = "-"` standard output holds only audit records: the ready line
    // goes to standard error with the logs.
    let stderr = standalone.stderr.take().unwrap();
    let addr = bound_address(stderr, "Transaction token service listening");
    let out = exchange(&format!("https://{addr}"));
    let _ = standalone.kill();
    let _ = standalone.wait();
    let mut audit = String::new();
    standalone
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut audit)
        .unwrap();
    assert!(
        !audit.is_empty(),
        "the refusal is audited on standard output"
    );
    for record in audit.lines() {
        let record: Value = serde_json::from_str(record)
            .unwrap_or_else(|e| panic!("standard output holds only JSON records: {record:?}: {e}"));
        assert_eq!(record["decision"], "refused", "{record}");
    }
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid_request"), "{err}"); // RFC 8693 §2.2.2
    assert!(err.contains("development token"), "{err}");

    // Ctrl-C stops cleanly and removes dev.json; login then says dev is not running.
    let (clean, rest) = dev.stop("-INT");
    assert!(clean, "writ dev exits 0 on Ctrl-C: {rest:?}");
    assert!(rest.iter().any(|l| l == "writ dev: stopped"), "{rest:?}");
    assert!(!dir.join("dev.json").exists());
    let out = writ(
        &[
            "dev",
            "login",
            "--data-dir",
            dir.to_str().unwrap(),
            "--user",
            "a",
        ],
        &sock,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));

    // A restart keeps the CA (same bundle), the entries and the token service's keys.
    let keys = std::fs::read(dir.join("txn").join("signing-keys.json")).unwrap();
    let dev = DevProcess::start(&dir);
    assert_eq!(ok(&["bundle", "show"], &sock), bundle);
    let shown = ok(&["entry", "show", "--entry-id", &entry_id], &sock);
    assert!(shown.contains(me), "{shown}");
    assert_eq!(
        std::fs::read(dir.join("txn").join("signing-keys.json")).unwrap(),
        keys
    );
    let out = Command::new(WRIT)
        .args(["api", "fetch", "x509", "--socket", &workload_api])
        .output()
        .unwrap();
    let fetched = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && fetched.contains(me), "{fetched}");
    // The development issuer kept its URL, so the token minted before the restart is
    // still accepted.
    let again = state(&dir);
    assert_eq!(again["oidc_issuer"], s["oidc_issuer"], "same issuer URL");
    let out = exchange(again["tts_url"].as_str().unwrap());
    assert!(
        out.status.success(),
        "a token minted before the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !fetched.contains("/writ/tts"),
        "only writ dev itself holds the token service's identity: {fetched}"
    );
    let (clean, rest) = dev.stop("-TERM");
    assert!(clean, "writ dev exits 0 on SIGTERM: {rest:?}");
}

/// A socket that cannot be bound is named for what it is (the agent's, not "admin"),
/// in one line that says each cause once.
#[test]
fn an_agent_socket_that_cannot_be_bound_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    // Something that is not a socket sits where the agent's socket goes.
    std::fs::create_dir_all(dir.join("agent.sock").join("inside")).unwrap();
    let out = Command::new(WRIT)
        .args(["dev", "--data-dir"])
        .arg(&dir)
        .args(["--tts-listen", "127.0.0.1:0"])
        .env_remove("WRIT_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let line = err.trim_end().lines().last().unwrap();
    assert!(line.starts_with("error: agent: "), "{err}");
    assert!(
        line.contains(&format!("{}", dir.join("agent.sock").display())),
        "{err}"
    );
    assert!(!line.contains("admin socket"), "{err}");
    let parts: Vec<&str> = line.split(": ").collect();
    assert!(
        parts.windows(2).all(|w| w[0] != w[1]),
        "a cause repeated: {line}"
    );
}
