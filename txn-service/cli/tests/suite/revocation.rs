//! The kill switch end to end, as an operator drives it: `writ dev`, a user's transaction
//! exchanged and replaced by this workload, `writ txn revoke --txn` through the admin
//! socket, and the next replacement refused; the revocation listed with its lapse by
//! `writ txn revocations`, enforced by a second `writ txn run` replica sharing the
//! store, and still enforced after `writ dev` restarts. Malformed and unknown targets are
//! refused clearly.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::dev::{DevProcess as Dev, ok, state, writ};
use crate::common::{WRIT, bound_address, uid};

const ME: &str = "spiffe://example.org/revoker-test";

/// A `writ txn run` replica, killed on drop.
struct Replica(Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `writ exchange` of the subject token in `file` (of type `kind`) at `url`.
fn exchange(url: &str, file: &Path, kind: &str, workload_api: &str, sock: &str) -> Output {
    writ(
        &[
            "exchange",
            "--url",
            url,
            "--subject-token",
            file.to_str().unwrap(),
            "--subject-token-type",
            kind,
            "--scope",
            "docs.read",
            "--spiffe-id",
            ME,
            "--socket",
            workload_api,
        ],
        sock,
    )
}

fn token(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits (bounded) until the replacement of `file` at `url` is refused as revoked;
/// returns the error text.
fn refused(url: &str, file: &Path, workload_api: &str, sock: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = exchange(url, file, "txn_token", workload_api, sock);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && err.contains("revoked") {
            return err;
        }
        assert!(
            Instant::now() < deadline,
            "the replacement at {url} was never refused as revoked: {err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `writ dev` on `dir`, this test's workload registered as [`ME`], and alice's access
/// token (scope `docs.read`) written to `user.jwt` beside `dir`.
struct Setup {
    dev: Dev,
    sock: String,
    workload_api: String,
    tts_url: String,
    tts_id: String,
    user_file: std::path::PathBuf,
}

fn setup(dir: &Path) -> Setup {
    let dev = Dev::start(dir);
    let s = state(dir);
    let sock = s["server_socket"].as_str().unwrap().to_owned();
    ok(
        &[
            "entry",
            "create",
            "--spiffe-id",
            ME,
            "--selector",
            &format!("unix:uid:{}", uid()),
        ],
        &sock,
    );
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
    let user_file = dir.with_file_name("user.jwt");
    std::fs::write(&user_file, login.lines().last().unwrap()).unwrap();
    Setup {
        dev,
        workload_api: s["workload_api"].as_str().unwrap().to_owned(),
        tts_url: s["tts_url"].as_str().unwrap().to_owned(),
        tts_id: s["tts_id"].as_str().unwrap().to_owned(),
        sock,
        user_file,
    }
}

#[test]
fn a_revoked_transaction_is_refused_by_every_replica_and_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let Setup {
        dev,
        sock,
        workload_api,
        tts_url,
        user_file,
        ..
    } = setup(&dir);
    // Two transactions of alice: the first will be revoked, the second not.
    let mut files = Vec::new();
    for n in 0..2 {
        let first = token(&exchange(
            &tts_url,
            &user_file,
            "access_token",
            &workload_api,
            &sock,
        ));
        let first_file = tmp.path().join(format!("txn-{n}.jwt"));
        std::fs::write(&first_file, &first).unwrap();
        let replaced = token(&exchange(
            &tts_url,
            &first_file,
            "txn_token",
            &workload_api,
            &sock,
        ));
        let file = tmp.path().join(format!("txn-{n}-replaced.jwt"));
        std::fs::write(&file, &replaced).unwrap();
        files.push((first, file));
    }
    let claims: Value = serde_json::from_str(&ok(
        &["txn", "decode", &files[0].0, "--output", "json"],
        &sock,
    ))
    .unwrap();
    let txn = claims["claims"]["txn"].as_str().unwrap().to_owned();

    // Revoke it; the next replacement is refused, the other transaction goes on.
    let revoked: Value = serde_json::from_str(&ok(
        &[
            "txn",
            "revoke",
            "--txn",
            &txn,
            "--reason",
            "prompt injection",
            "--json",
        ],
        &sock,
    ))
    .unwrap();
    assert_eq!(revoked["kind"], "txn");
    assert_eq!(revoked["value"], txn.as_str());
    assert_eq!(revoked["reason"], "prompt injection");
    let lapse = revoked["lapses_at"].as_i64().unwrap() - revoked["revoked_at"].as_i64().unwrap();
    assert_eq!(lapse, 3600 + 60, "the Txn-Token ceiling and the skew");
    let err = refused(&tts_url, &files[0].1, &workload_api, &sock);
    assert!(err.contains("invalid_request"), "{err}");
    token(&exchange(
        &tts_url,
        &files[1].1,
        "txn_token",
        &workload_api,
        &sock,
    ));

    // Listed with its lapse.
    let listed: Value =
        serde_json::from_str(&ok(&["txn", "revocations", "--json"], &sock)).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["value"], txn.as_str());
    assert_eq!(listed[0]["lapses_at"], revoked["lapses_at"]);
    let text = ok(&["txn", "revocations"], &sock);
    assert!(text.contains(&txn) && text.contains("lapses"), "{text}");

    // Bad input is refused clearly, and nothing more is stored.
    for (args, expected) in [
        (vec!["--lease", "no-such-lease"], "lease not found"),
        (vec!["--workload", "not-an-id"], "workload:"),
        (vec!["--sub", ""], "sub: must be 1 to"),
    ] {
        let mut all = vec!["txn", "revoke"];
        all.extend(args);
        let out = writ(&all, &sock);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{all:?}: {err}");
    }
    let huge = "x".repeat(64 * 1024);
    let out = writ(&["txn", "revoke", "--txn", &huge], &sock);
    assert!(!out.status.success(), "a huge target is refused");

    // A second replica sharing the store refuses it too (and serves the other).
    let config = tmp.path().join("txn.toml");
    std::fs::write(
        &config,
        format!(
            r#"listen = "127.0.0.1:0"
issuer = "{tts_url}"
workload_api = "{workload_api}"
spiffe_id = "{ME}"
audit_log = "-"
replica = "second"
[identity_store]
backend = "sqlite"
connection = "{db}"
[audit]
durable = false
[[policy.caller]]
trust_domain = "example.org"
subject_token_types = ["txn_token"]
max_scope = ["docs.read"]
"#,
            db = dir.join("datastore.sqlite3").display(),
        ),
    )
    .unwrap();
    let replica = |config: &Path| {
        let mut child = Command::new(WRIT)
            .args(["txn", "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let running = Replica(child);
        let url = format!(
            "https://{}",
            bound_address(stderr, "Transaction token service listening")
        );
        (running, url)
    };
    let (second, url) = replica(&config);
    refused(&url, &files[0].1, &workload_api, &sock);
    token(&exchange(
        &url,
        &files[1].1,
        "txn_token",
        &workload_api,
        &sock,
    ));
    drop(second);

    // It survives a restart of everything: `writ dev` lists it again, and a replica
    // refuses it from its first request (it reads what is in force before it listens).
    dev.stop("-INT");
    let dev = Dev::start(&dir);
    let sock = state(&dir)["server_socket"].as_str().unwrap().to_owned();
    let listed: Value =
        serde_json::from_str(&ok(&["txn", "revocations", "--json"], &sock)).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let (restarted, url) = replica(&config);
    let out = exchange(&url, &files[0].1, "txn_token", &workload_api, &sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("revoked"), "{err}");
    drop(restarted);
    drop(dev);
}

/// The kill switch reaches a service's SDK verifier: a tool server's `TxnVerifier`,
/// following the real token service's revocation feed over mTLS, accepts a transaction's
/// Txn-Token, and refuses it once `writ txn revoke --txn` returns (the time it took is
/// printed; its p50/p99 are a benchmark figure, `--bench revocation_e2e`, not asserted here).
#[test]
fn a_tool_servers_verifier_refuses_a_revoked_transaction() {
    use writ_sdk::txn_token::{TxnTokenError, TxnVerifier};
    use writ_sdk::workload::X509Source;
    use writ_sdk::{SpiffeId, TrustDomain};

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let Setup {
        dev,
        sock,
        workload_api,
        tts_url,
        tts_id,
        user_file,
    } = setup(&dir);
    let tts_id = SpiffeId::new(&tts_id).unwrap();
    let txn_token = token(&exchange(
        &tts_url,
        &user_file,
        "access_token",
        &workload_api,
        &sock,
    ));
    let claims: Value = serde_json::from_str(&ok(
        &["txn", "decode", &txn_token, "--output", "json"],
        &sock,
    ))
    .unwrap();
    let txn = claims["claims"]["txn"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The tool server's side: its SVID, the token service's keys and its feed.
        let source = X509Source::builder()
            .endpoint(&workload_api)
            .spiffe_id(SpiffeId::new(ME).unwrap())
            .build()
            .await
            .unwrap();
        let client = writ_sdk::exchange::TxnClient::new(&source, &tts_url, tts_id).unwrap();
        let feed = client.revocation_feed().unwrap();
        let verifier = TxnVerifier::builder(
            TrustDomain::new("example.org").unwrap(),
            client.jwks_source(),
        )
        .revocations(feed.clone())
        .build();
        tokio::time::timeout(Duration::from_secs(20), feed.ready())
            .await
            .expect("the feed answered its first request");
        let verified = verifier.verify(&txn_token).await.unwrap();
        assert_eq!(verified.txn, txn);

        let revoke = {
            let sock = sock.clone();
            let txn = txn.clone();
            tokio::task::spawn_blocking(move || {
                ok(&["txn", "revoke", "--txn", &txn, "--json"], &sock)
            })
        };
        let revoked: Value = serde_json::from_str(&revoke.await.unwrap()).unwrap();
        let returned = Instant::now();
        let seq = revoked["seq"].as_u64().unwrap();
        tokio::time::timeout(Duration::from_secs(20), feed.wait_for(seq))
            .await
            .expect("the feed delivered the revocation");
        match verifier.verify(&txn_token).await {
            Err(TxnTokenError::Revoked(why)) => assert!(why.contains(&txn), "{why}"),
            other => panic!("a revoked transaction's token was not refused: {other:?}"),
        }
        eprintln!(
            "revocation reached the verifier {:?} after `writ txn revoke` returned",
            returned.elapsed()
        );
    });
    drop(dev);
}
