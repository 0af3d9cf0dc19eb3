//! `writ dev` start-up time to ready, and `writ demo` end to end, measured on the real
//! release binary: `cargo bench -p writ-txn-service --bench dev`.
//!
//! Start-up is from spawning `writ dev` to its `writ dev: ready` line, on a fresh data dir
//! (first start: CA and keys created) and on the same data dir again (restart). The demo
//! is the whole `writ demo` command (a temporary `writ dev`, three programs started, the
//! request through four hops, the checks); it needs the example programs next to `writ`
//! (`cargo build --release -p writ-examples`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a bench binary: a failed step aborts it loudly, results go to stdout"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const STARTS: usize = 10;
const DEMOS: usize = 5;

/// Spawns `writ dev` on `dir`, returns the time to its ready line, then stops it.
fn start_once(dir: &Path) -> Duration {
    let started = Instant::now();
    let mut child = Command::new(WRIT)
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--tts-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let elapsed = started.elapsed();
    // Keep reading: the rest of the banner, then the stop lines.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    assert!(line.starts_with("writ dev: ready"), "{line}");
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    assert!(child.wait().unwrap().success());
    let _ = drain.join();
    elapsed
}

fn summary(label: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{label:<44} n={:<3} p50 {:>7.1} ms   max {:>7.1} ms",
        samples.len(),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    );
}

fn main() {
    let mut first = Vec::new();
    let mut again = Vec::new();
    for _ in 0..STARTS {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        first.push(start_once(&dir));
        again.push(start_once(&dir));
    }
    summary("writ dev to ready, fresh data dir", first);
    summary("writ dev to ready, restart on same data dir", again);

    let mut demos = Vec::new();
    for _ in 0..DEMOS {
        let started = Instant::now();
        let out = Command::new(WRIT).arg("demo").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        demos.push(started.elapsed());
    }
    summary("writ demo end to end (whole command)", demos);
}
