//! `writ dev` as a child process, shared by the suites that drive it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::WRIT;

/// A running `writ dev`, killed on drop; its stdout lines arrive on `lines`.
pub(crate) struct DevProcess {
    pub(crate) child: Child,
    pub(crate) lines: mpsc::Receiver<String>,
    pub(crate) banner: Vec<String>,
}

impl DevProcess {
    pub(crate) fn start(dir: &Path) -> Self {
        let mut child = Command::new(WRIT)
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--tts-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut dev = Self {
            child,
            lines,
            banner: Vec::new(),
        };
        let first = dev.next_line();
        assert!(first.starts_with("writ dev: ready in "), "{first}");
        dev.banner.push(first);
        while !dev.banner.last().unwrap().starts_with("Ctrl-C stops") {
            let line = dev.next_line();
            dev.banner.push(line);
        }
        dev
    }

    pub(crate) fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("writ dev printed nothing for 30 s")
    }

    /// Sends `signal` (`-INT` is Ctrl-C); returns whether it exited 0, and what it printed
    /// meanwhile.
    pub(crate) fn stop(mut self, signal: &str) -> (bool, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(15)) {
            rest.push(line);
        }
        let status = self.child.wait().unwrap();
        (status.success(), rest)
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `writ args` against the server admin socket `server_socket`.
pub(crate) fn writ(args: &[&str], server_socket: &str) -> Output {
    Command::new(WRIT)
        .args(args)
        .env("WRIT_SERVER_SOCKET", server_socket)
        .env_remove("WRIT_TXN_URL")
        .output()
        .unwrap()
}

/// [`writ`], which must succeed; its standard output.
pub(crate) fn ok(args: &[&str], server_socket: &str) -> String {
    let out = writ(args, server_socket);
    assert!(
        out.status.success(),
        "writ {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `dev.json` of the `writ dev` on `dir`.
pub(crate) fn state(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap()
}
