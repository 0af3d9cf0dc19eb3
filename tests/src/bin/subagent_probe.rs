//! A workload for the sub-agent tests, run as a real process (a parent or a child of
//! the test process). Prints one JSON line per observation on stdout.
//!
//! - `x509`: fetch the X509-SVID once: `{"x509": "<id>" | "no identity issued" | ...}`.
//! - `watch`: fetch every 100 ms (and, with `WRIT_TTS_URL`, `WRIT_TTS_ID` and
//!   `WRIT_TXN_TOKEN`, replace the token at the TTS) for at most 60 s; print a line
//!   whenever the outcome changes: `{"x509": ..., "exchange": "granted" | "<error code>"}`.
//! - `parent <task> <parent-id>`: spawn `watch` as a sub-agent (stdio inherited), print
//!   `{"lease": ..., "child": ..., "pid": ...}`, then obey stdin lines: `release`, or
//!   `exit` (exits at once, without releasing: the agent must notice).
//! - `exchange <scope>`: replace `WRIT_TXN_TOKEN` at `WRIT_TTS_URL` (a service with the
//!   SPIFFE ID `WRIT_TTS_ID`): `{"token": ...}` or `{"error": "<code>"}`.
//! - `fork-x509`: run `x509` as an ordinary (unregistered) child and relay its line.
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a test helper process: failing loudly is the point"
)]

use std::io::BufRead;
use std::time::{Duration, Instant};

use serde_json::json;
use writ_sdk::exchange::TxnClient;
use writ_sdk::spawn::{Spawn, TXN_TOKEN_ENV};
use writ_sdk::workload::{WorkloadClient, WorkloadError, X509Source};

/// The TTS's SPIFFE ID, from `WRIT_TTS_ID`.
fn tts_id() -> writ_sdk::SpiffeId {
    writ_sdk::SpiffeId::new(&std::env::var("WRIT_TTS_ID").expect("WRIT_TTS_ID")).unwrap()
}

async fn x509_state() -> String {
    let result = async {
        let mut client = WorkloadClient::connect_env().await?;
        client.fetch_x509().await
    }
    .await;
    match result {
        Ok(ctx) => ctx
            .svids
            .first()
            .map_or_else(|| "empty".to_owned(), |s| s.spiffe_id.to_string()),
        Err(WorkloadError::NoIdentity) => "no identity issued".to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

async fn exchange(client: &TxnClient, token: &str, scope: Option<&str>) -> Result<String, String> {
    client
        .replace(token, scope)
        .await
        .map(|issued| issued.access_token)
        .map_err(|e| {
            e.code()
                .map_or_else(|| format!("error: {e}"), ToOwned::to_owned)
        })
}

/// Prints one line; exits quietly once nobody reads any more (the test ended).
fn say(value: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{value}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tts = std::env::var("WRIT_TTS_URL").ok();
    let token = std::env::var(TXN_TOKEN_ENV).ok();
    match args.first().map(String::as_str) {
        Some("x509") => say(&json!({ "x509": x509_state().await })),
        Some("watch") => {
            let client = match (&tts, &token) {
                (Some(url), Some(_)) => {
                    let source = X509Source::builder().build().await.unwrap();
                    Some(TxnClient::new(&source, url, tts_id()).unwrap())
                }
                _ => None,
            };
            let started = Instant::now();
            let mut last = serde_json::Value::Null;
            while started.elapsed() < Duration::from_secs(60) {
                let exchanged = match (&client, &token) {
                    (Some(c), Some(t)) => match exchange(c, t, None).await {
                        Ok(_) => "granted".to_owned(),
                        Err(code) => code,
                    },
                    _ => "none".to_owned(),
                };
                let now = json!({ "x509": x509_state().await, "exchange": exchanged });
                if now != last {
                    say(&now);
                    last = now;
                }
                // Polling: the probe reports each change of what it sees until killed.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some("parent") => {
            let (task, parent) = (&args[1], &args[2]);
            let mut command = std::process::Command::new(std::env::current_exe().unwrap());
            command.arg("watch");
            let mut spawn = Spawn::new(task.clone(), command).parent(parent.parse().unwrap());
            if let Some(t) = &token {
                spawn = spawn.txn_token(t.clone());
            }
            let mut child = spawn.spawn().await.unwrap();
            let lease = child.lease().clone();
            say(
                &json!({ "lease": lease.id, "child": lease.child_id.to_string(), "pid": lease.pid }),
            );
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line.unwrap().trim() {
                    "release" => {
                        let released = child.release().await.unwrap();
                        say(&json!({ "released": released.id }));
                    }
                    "exit" => std::process::exit(0),
                    other => panic!("unknown command {other:?}"),
                }
            }
        }
        Some("exchange") => {
            let source = X509Source::builder().build().await.unwrap();
            let client = TxnClient::new(&source, tts.as_deref().unwrap(), tts_id()).unwrap();
            let scope = args.get(1).map(String::as_str);
            match exchange(&client, token.as_deref().unwrap(), scope).await {
                Ok(t) => say(&json!({ "token": t, "id": source.spiffe_id().to_string() })),
                Err(code) => say(&json!({ "error": code })),
            }
        }
        Some("fork-x509") => {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .arg("x509")
                .output()
                .unwrap();
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        other => panic!("unknown mode {other:?}"),
    }
}
