//! The file-writing helper (`writ api watch --write`) after a rotation, on the real
//! release binary: `cargo bench -p writ-cli --bench helper`.
//!
//! A `writ dev`, an entry for the helper with a 2 s X509-SVID (renewed at about half its
//! lifetime, so about every second), and the helper writing into a temp dir with
//! `--output json`. Each write reports `write_us`: from the agent's response arriving at
//! the helper to the last file renamed in place and the directory fsynced (bundle, key,
//! chain, combined file). Printed: p50, p99 and max over [`ROTATIONS`] rotations, once
//! without and once with a JWT-SVID audience (the JWT file is written after the X.509
//! files and is not in `write_us`).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a bench binary: a failed step aborts it loudly, results go to stdout"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const WRIT: &str = env!("CARGO_BIN_EXE_writ");
const ROTATIONS: usize = 40;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_dev(dir: &Path) -> (Kill, serde_json::Value) {
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
    while !line.starts_with("Ctrl-C stops") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "writ dev exited");
    }
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let state =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    (Kill(child), state)
}

fn measure(state: &serde_json::Value, files: &Path, extra: &[&str]) -> Vec<u64> {
    let mut helper = Command::new(WRIT)
        .args(["api", "watch", "--output", "json", "--write"])
        .arg(files)
        .args(extra)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            state["workload_api"].as_str().unwrap(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(helper.stdout.take().unwrap());
    let _helper = Kill(helper);
    let mut samples = Vec::new();
    // The first write is the first issue, not a rotation.
    for line in stdout.lines().skip(1).take(ROTATIONS) {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        samples.push(v["write_us"].as_u64().unwrap());
    }
    samples
}

fn summary(label: &str, mut us: Vec<u64>) {
    us.sort_unstable();
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{label:<52} n={:<3} p50 {:>6} us   p99 {:>6} us   max {:>6} us",
        us.len(),
        at(0.50),
        at(0.99),
        us[us.len() - 1]
    );
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let (_dev, state) = start_dev(&tmp.path().join("dev"));
    let writ = std::fs::canonicalize(WRIT).unwrap();
    let out = Command::new(WRIT)
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/helper",
        ])
        .arg("--selector")
        .arg(format!("unix:path:{}", writ.display()))
        .args(["--x509-svid-ttl", "2s"])
        .env(
            "WRIT_SERVER_SOCKET",
            state["server_socket"].as_str().unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary(
        "helper rewrite after rotation (X.509 files)",
        measure(&state, &tmp.path().join("a"), &[]),
    );
    summary(
        "helper rewrite after rotation (with --jwt-audience)",
        measure(&state, &tmp.path().join("b"), &["--jwt-audience", "bench"]),
    );
}
