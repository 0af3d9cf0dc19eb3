//! The kill switch end to end, at a verifier (`cargo bench -p writ-cli --bench
//! revocation_e2e`): a real `writ dev` (identity server, agent and token service on one
//! SQLite store) and, in this process, a tool server's `TxnVerifier` following the token
//! service's revocation feed over mTLS with the SDK's `RevocationFeed`. Each round
//! exchanges a fresh transaction, verifies its Txn-Token (so it sits in the verifier's
//! cache, as at a busy service), runs `writ txn revoke --txn` and times the first refusal,
//! from the command's start (process start, admin RPC, store write with its audit event)
//! and from its return.
//!
//! `WRIT_BENCH_REVOCATIONS` (30) sets the rounds.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    clippy::print_stdout,
    reason = "a bench binary: a failed step aborts it loudly, results go to stdout"
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::oauth::TokenType;
use writ_sdk::txn_token::{TxnTokenError, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_sdk::{SpiffeId, TrustDomain};

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const ME: &str = "spiffe://example.org/revocation-bench";

fn writ(args: &[&str], sock: &str) -> String {
    let out = Command::new(WRIT)
        .args(args)
        .env("WRIT_SERVER_SOCKET", sock)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "writ {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{label:<52} n={:<3} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
        samples.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1])
    );
}

fn main() {
    let rounds: usize = std::env::var("WRIT_BENCH_REVOCATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let mut dev = Command::new(WRIT)
        .args(["dev", "--data-dir"])
        .arg(&dir)
        .args(["--tts-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("Ctrl-C stops") {
            break;
        }
    }
    let drain = std::thread::spawn(move || lines.for_each(drop));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let sock = state["server_socket"].as_str().unwrap().to_owned();
    let workload_api = state["workload_api"].as_str().unwrap().to_owned();
    let tts_url = state["tts_url"].as_str().unwrap().to_owned();
    let tts_id = SpiffeId::new(state["tts_id"].as_str().unwrap()).unwrap();
    let uid = process_uid();
    writ(
        &[
            "entry",
            "create",
            "--spiffe-id",
            ME,
            "--selector",
            &format!("unix:uid:{uid}"),
        ],
        &sock,
    );
    let login = writ(
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

    let rt = tokio::runtime::Runtime::new().unwrap();
    let (from_start, from_return) = rt.block_on(async {
        let source = X509Source::builder()
            .endpoint(&workload_api)
            .spiffe_id(SpiffeId::new(ME).unwrap())
            .build()
            .await
            .unwrap();
        let client = TxnClient::new(&source, &tts_url, tts_id).unwrap();
        let feed = client.revocation_feed().unwrap();
        let verifier = TxnVerifier::builder(
            TrustDomain::new("example.org").unwrap(),
            client.jwks_source(),
        )
        .revocations(feed.clone())
        .build();
        feed.ready().await;
        let mut from_start = Vec::new();
        let mut from_return = Vec::new();
        for _ in 0..rounds {
            let issued = client
                .exchange(TxnRequest::new(&user_token, TokenType::AccessToken).scope("docs.read"))
                .await
                .unwrap();
            let txn = verifier.verify(&issued.access_token).await.unwrap().txn;
            let sock = sock.clone();
            let started = Instant::now();
            let out = tokio::task::spawn_blocking(move || {
                writ(&["txn", "revoke", "--txn", &txn, "--json"], &sock)
            })
            .await
            .unwrap();
            let returned = Instant::now();
            let seq = serde_json::from_str::<Value>(&out).unwrap()["seq"]
                .as_u64()
                .unwrap();
            tokio::time::timeout(Duration::from_secs(30), feed.wait_for(seq))
                .await
                .unwrap();
            match verifier.verify(&issued.access_token).await {
                Err(TxnTokenError::Revoked(_)) => {}
                other => panic!("not refused: {other:?}"),
            }
            let refused = Instant::now();
            from_start.push(refused - started);
            from_return.push(refused - returned);
        }
        (from_start, from_return)
    });
    summary("revoke command started -> verifier refuses", from_start);
    summary("revoke command returned -> verifier refuses", from_return);
    let pid = dev.id().to_string();
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let _ = dev.wait();
    let _ = drain.join();
}

/// This process's user id (the selector the bench's entry uses), from `/proc`.
fn process_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}
