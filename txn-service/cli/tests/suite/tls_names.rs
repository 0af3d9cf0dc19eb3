//! The token service is an ordinary HTTPS server to any client: `writ dev`'s TTS X509-SVID
//! carries `localhost` and `127.0.0.1` (and the address it listens on), so real `curl`
//! verifies it with the trust bundle as its CA and a workload's SVID as its client
//! certificate, with no `-k`; a name the SVID lacks fails verification. A data dir whose
//! TTS entry predates the names (or another listen address) gets its entry brought up
//! to date at start.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::{WRIT, uid};

/// A running `writ dev` on a temp data dir, killed on drop.
pub(crate) struct Dev {
    child: Child,
    /// The data dir.
    pub(crate) dir: PathBuf,
    /// `dev.json`.
    pub(crate) state: Value,
}

impl Dev {
    /// Starts `writ dev --data-dir dir --tts-listen listen` and waits for its `dev.json`.
    pub(crate) fn start(dir: &Path, listen: &str) -> Self {
        let mut child = Command::new(WRIT)
            .args(["dev", "--data-dir"])
            .arg(dir)
            .args(["--tts-listen", listen])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let state_file = dir.join("dev.json");
        let mut waited = Duration::ZERO;
        let state = loop {
            if let Ok(text) = std::fs::read_to_string(&state_file)
                && let Ok(state) = serde_json::from_str::<Value>(&text)
                && state["pid"] == child.id()
            {
                break state;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("writ dev exited at start: {status}");
            }
            assert!(
                waited < Duration::from_secs(120),
                "writ dev never got ready"
            );
            std::thread::sleep(Duration::from_millis(50));
            waited += Duration::from_millis(50);
        };
        Self {
            child,
            dir: dir.to_path_buf(),
            state,
        }
    }

    /// A `dev.json` field.
    pub(crate) fn field(&self, name: &str) -> String {
        self.state[name].as_str().unwrap().to_owned()
    }

    /// Runs `writ` against this dev's server socket.
    pub(crate) fn writ(&self, args: &[&str]) -> Output {
        Command::new(WRIT)
            .args(args)
            .env("WRIT_SERVER_SOCKET", self.field("server_socket"))
            .output()
            .unwrap()
    }

    /// As [`Dev::writ`], asserting success; standard output.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.writ(args);
        assert!(
            out.status.success(),
            "writ {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers `selectors` as `spiffe_id` (parent: the dev agent).
    pub(crate) fn register(&self, spiffe_id: &str, selectors: &[String]) {
        let mut args = vec!["entry", "create", "--spiffe-id", spiffe_id];
        for s in selectors {
            args.extend(["--selector", s.as_str()]);
        }
        self.ok(&args);
    }

    /// `writ dev login`: a development user token for `user` with `scope`.
    pub(crate) fn login(&self, user: &str, scope: &str) -> String {
        let dir = self.dir.to_str().unwrap();
        let out = self.ok(&[
            "dev",
            "login",
            "--data-dir",
            dir,
            "--user",
            user,
            "--scope",
            scope,
        ]);
        out.lines().last().unwrap().trim().to_owned()
    }

    /// `writ api fetch x509 --write dir` as this test's process (uid workload).
    pub(crate) fn fetch_x509(&self, dir: &Path) {
        let out = Command::new(WRIT)
            .args([
                "api",
                "fetch",
                "x509",
                "--socket",
                &self.field("workload_api"),
            ])
            .arg("--write")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The TTS port.
    pub(crate) fn tts_port(&self) -> u16 {
        let url = self.field("tts_url");
        url.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
        assert!(self.child.wait().unwrap().success());
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `program --version` runs.
pub(crate) fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// curl with full server verification: the bundle as CA, the SVID as client certificate.
fn curl(files: &Path, extra: &[&str], url: &str) -> Output {
    Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--max-time",
            "30",
        ])
        .arg("--cacert")
        .arg(files.join("bundle.0.pem"))
        .arg("--cert")
        .arg(files.join("svid.0.pem"))
        .arg("--key")
        .arg(files.join("svid.0.key"))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

fn exchange_args(user_token: &str) -> Vec<String> {
    [
        "grant_type=urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_token_type=urn:ietf:params:oauth:token-type:txn_token",
        "audience=example.org",
        "scope=docs.read",
        "subject_token_type=urn:ietf:params:oauth:token-type:access_token",
    ]
    .iter()
    .flat_map(|f| ["--data-urlencode".to_owned(), (*f).to_owned()])
    .chain([
        "--data-urlencode".to_owned(),
        format!("subject_token={user_token}"),
    ])
    .collect()
}

#[test]
fn curl_verifies_the_token_service_by_name_and_address() {
    if !writ_tests::env::available("curl", have("curl")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let dev = Dev::start(&dir, "127.0.0.1:0");
    let me = "spiffe://example.org/curl";
    dev.register(me, &[format!("unix:uid:{}", uid())]);
    let files = tmp.path().join("svid");
    dev.fetch_x509(&files);
    let user_token = dev.login("alice", "docs.read");
    let port = dev.tts_port();

    // POST /token over mTLS to both names, fully verified.
    let form = exchange_args(&user_token);
    let form: Vec<&str> = form.iter().map(String::as_str).collect();
    for host in ["localhost", "127.0.0.1"] {
        let out = curl(&files, &form, &format!("https://{host}:{port}/token"));
        assert!(
            out.status.success(),
            "curl https://{host}:{port}/token: {} {}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let body: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            body["issued_token_type"],
            "urn:ietf:params:oauth:token-type:txn_token"
        );
        let txn = body["access_token"].as_str().unwrap();
        let claims: Value =
            serde_json::from_str(&dev.ok(&["txn", "decode", txn, "--output", "json"])).unwrap();
        assert_eq!(claims["claims"]["sub"], "alice");
        assert_eq!(claims["claims"]["req_wl"], me);
    }

    // A name the SVID does not carry: curl refuses the certificate (exit 60), it does
    // not fail for another reason.
    let resolve = format!("wrong.example:{port}:127.0.0.1");
    let out = curl(
        &files,
        &["--resolve", &resolve],
        &format!("https://wrong.example:{port}/.well-known/jwks.json"),
    );
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl must refuse a name the SVID lacks: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dev.stop();
}

#[test]
fn an_older_tts_entry_gets_the_names_of_a_new_listen_address() {
    if !writ_tests::env::available("curl", have("curl")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    // The first run makes the TTS entry for 127.0.0.1 ...
    Dev::start(&dir, "127.0.0.1:0").stop();
    // ... the second, on another loopback address, updates it: the SVID names that
    // address too.
    let dev = Dev::start(&dir, "127.0.0.2:0");
    let shown = dev.ok(&[
        "entry",
        "list",
        "--spiffe-id",
        "spiffe://example.org/writ/tts",
    ]);
    for name in ["localhost", "127.0.0.1", "127.0.0.2"] {
        assert!(shown.contains(name), "{shown}");
    }
    dev.register(
        "spiffe://example.org/curl",
        &[format!("unix:uid:{}", uid())],
    );
    let files = tmp.path().join("svid");
    dev.fetch_x509(&files);
    let port = dev.tts_port();
    let out = curl(
        &files,
        &[],
        &format!("https://127.0.0.2:{port}/.well-known/jwks.json"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwks: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!jwks["keys"].as_array().unwrap().is_empty());
    dev.stop();
}
