//! `writ api watch --write`: the file-writing helper, with a real nginx serving mTLS from
//! its files through SVID rotations while curl verifies it (chain and name) and presents
//! its own SVID; every request must succeed and the certificate nginx serves must
//! change. Also: the files' modes, the JWT-SVID file (with `iss` = `writ dev`'s OIDC
//! discovery URL), `--once`, and a reload command that fails without stopping anything.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{WRIT, uid};

/// A running `writ dev`, killed on drop.
pub(crate) struct DevRun {
    child: Child,
    /// Its `dev.json`.
    pub(crate) state: Value,
}

impl DevRun {
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
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let ready = line.starts_with("Ctrl-C stops");
                let _ = tx.send(ready);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false) {
            assert!(Instant::now() < deadline, "writ dev did not start");
        }
        let state =
            serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
        Self { child, state }
    }

    pub(crate) fn get(&self, key: &str) -> String {
        self.state[key].as_str().unwrap().to_owned()
    }

    /// Runs `writ` with the admin socket; its stdout, after asserting success.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(WRIT)
            .args(args)
            .env("WRIT_SERVER_SOCKET", self.get("server_socket"))
            .env("SPIFFE_ENDPOINT_SOCKET", self.get("workload_api"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "writ {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for DevRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn writ_exe() -> String {
    std::fs::canonicalize(WRIT)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned()
}

/// The helper (`writ api watch --write`), its JSON lines on a channel.
fn start_helper(dev: &DevRun, dir: &Path, extra: &[&str]) -> (Running, mpsc::Receiver<Value>) {
    let mut child = Command::new(WRIT)
        .args(["api", "watch", "--output", "json", "--write"])
        .arg(dir)
        .args(extra)
        .env("SPIFFE_ENDPOINT_SOCKET", dev.get("workload_api"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v: Value = serde_json::from_str(&line).unwrap();
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    (Running(child), rx)
}

/// The claims of a JWT, not verified.
pub(crate) fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let payload = token.trim().split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nginx_conf(prefix: &Path, files: &Path, port: u16) -> String {
    let p = prefix.display();
    let f = files.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {p}/access.log;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        # Key and chain in one file, renamed in place at once: never a mismatched pair.
        ssl_certificate {f}/svid.0.combined.pem;
        ssl_certificate_key {f}/svid.0.combined.pem;
        # The trust bundle: only SVIDs of the trust domain may connect.
        ssl_client_certificate {f}/bundle.0.pem;
        ssl_verify_client on;
        ssl_verify_depth 3;
        location / {{
            return 200 "verified=$ssl_client_verify\n";
        }}
    }}
}}
"#
    )
}

/// One curl request: (HTTP status, body, the served leaf's serial as curl prints it).
fn curl(port: u16, client: &Path, bundle: &Path) -> (String, String, Option<String>) {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(bundle)
        .arg("--cert")
        .arg(client.join("svid.pem"))
        .arg("--key")
        .arg(client.join("key.pem"))
        .args(["--write-out", "\n@@code=%{http_code}\n%{certs}"])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let body = text.lines().next().unwrap_or_default().to_owned();
    let code = text
        .lines()
        .find_map(|l| l.strip_prefix("@@code="))
        .unwrap_or_default()
        .to_owned();
    // The first certificate curl lists is the leaf nginx served.
    let serial = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Serial Number:"))
        .map(|s| s.trim().replace(':', "").to_ascii_lowercase());
    if !out.status.success() {
        return (
            format!("curl failed: {}", String::from_utf8_lossy(&out.stderr)),
            body,
            serial,
        );
    }
    (code, body, serial)
}

#[test]
fn nginx_serves_mtls_from_the_helpers_files_through_rotations() {
    if !writ_tests::env::available("nginx", have("nginx", "-v"))
        || !writ_tests::env::available("curl", have("curl", "--version"))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    // The helper (the writ binary itself) gets the nginx identity: valid for
    // `localhost`, a short lifetime so that it rotates during the test.
    dev.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/nginx",
        "--selector",
        &format!("unix:uid:{}", uid()),
        "--selector",
        &format!("unix:path:{}", writ_exe()),
        "--dns-name",
        "localhost",
        "--x509-svid-ttl",
        "8s",
    ]);
    // The client's own SVID, minted by the server.
    let client = tmp.path().join("client");
    dev.ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/curl",
        "--ttl",
        "1h",
        "--write",
        client.to_str().unwrap(),
    ]);

    let files = tmp.path().join("files");
    let prefix = tmp.path().join("nginx");
    std::fs::create_dir_all(&prefix).unwrap();
    let port = free_port();
    let conf = prefix.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&prefix, &files, port)).unwrap();
    let reload = format!(
        "nginx -p {} -c {} -e {}/error.log -s reload",
        prefix.display(),
        conf.display(),
        prefix.display()
    );
    let (_helper, writes) = start_helper(
        &dev,
        &files,
        &[
            "--reload-cmd",
            &reload,
            "--jwt-audience",
            "https://sts.example.com",
        ],
    );
    let first = writes.recv_timeout(Duration::from_secs(30)).unwrap();
    // nginx does not run yet: the reload fails, is reported, and the helper goes on.
    assert_ne!(first["reload"], "ok", "{first}");
    let first_serial = first["serial"].as_str().unwrap().to_ascii_lowercase();
    assert_eq!(mode(&files.join("svid.0.key")), 0o600);
    assert_eq!(mode(&files.join("svid.0.combined.pem")), 0o600);
    assert_eq!(mode(&files.join("svid.0.pem")), 0o644);
    assert_eq!(mode(&files.join("bundle.0.pem")), 0o644);
    let jwt_file = files.join("jwt_svid.https___sts.example.com.token");
    assert_eq!(mode(&jwt_file), 0o600);
    let token = std::fs::read_to_string(&jwt_file).unwrap();
    let claims = jwt_claims(&token);
    assert_eq!(claims["sub"], "spiffe://example.org/nginx");
    assert_eq!(claims["aud"], "https://sts.example.com");
    assert_eq!(claims["iss"], dev.get("oidc_discovery_url").as_str());

    let nginx = Running(
        Command::new("nginx")
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let bundle = files.join("bundle.0.pem");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, _) = curl(port, &client, &bundle);
        if code == "200" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nginx never answered: {code}\n{}",
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Requests in a loop while the SVID rotates twice: every one verified, 200.
    let mut served = vec![];
    let mut requests = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reloads = vec![];
    while served.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "nginx served only {served:?} in 60 s (helper writes: {reloads:?})"
        );
        while let Ok(w) = writes.try_recv() {
            reloads.push(w);
        }
        let (code, body, serial) = curl(port, &client, &bundle);
        requests += 1;
        assert_eq!(code, "200", "request {requests}: {body}");
        assert_eq!(body, "verified=SUCCESS");
        let serial = serial.expect("curl shows the served certificate");
        if served.last() != Some(&serial) {
            served.push(serial);
        }
    }
    while let Ok(w) = writes.try_recv() {
        reloads.push(w);
    }
    assert_eq!(served[0], first_serial.replace(':', ""));
    assert!(
        reloads.iter().all(|w| w["reload"] == "ok"),
        "every reload with nginx up succeeds: {reloads:?}"
    );
    eprintln!(
        "helper: {requests} requests, all 200, through {} served certificates; write_us {:?}",
        served.len(),
        reloads
            .iter()
            .map(|w| w["write_us"].as_u64().unwrap())
            .collect::<Vec<_>>()
    );
    drop(nginx);
}

#[test]
fn once_writes_and_exits_and_a_stranger_gets_no_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    let files = tmp.path().join("files");
    // No entry names this process yet: `--once` fails on "no identity issued".
    let out = Command::new(WRIT)
        .args(["api", "watch", "--once", "--write"])
        .arg(&files)
        .env("SPIFFE_ENDPOINT_SOCKET", dev.get("workload_api"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read_dir(&files).unwrap().next().is_none());

    dev.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/once",
        "--selector",
        &format!("unix:path:{}", writ_exe()),
    ]);
    let out = dev.ok(&[
        "api",
        "watch",
        "--once",
        "--output",
        "json",
        "--write",
        files.to_str().unwrap(),
        "--reload-cmd",
        "/nonexistent/reloader --now",
    ]);
    let written: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(written["spiffe_ids"][0], "spiffe://example.org/once");
    assert!(
        written["reload"]
            .as_str()
            .unwrap()
            .contains("cannot run /nonexistent/reloader")
    );
    let mut names: Vec<String> = std::fs::read_dir(&files)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "bundle.0.pem",
            "svid.0.combined.pem",
            "svid.0.key",
            "svid.0.pem"
        ]
    );
    let key = std::fs::read_to_string(files.join("svid.0.key")).unwrap();
    let combined = std::fs::read_to_string(files.join("svid.0.combined.pem")).unwrap();
    let chain = std::fs::read_to_string(files.join("svid.0.pem")).unwrap();
    assert_eq!(combined, format!("{key}{chain}"));
}

#[test]
fn the_files_stay_while_the_agent_is_down_and_are_rewritten_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("dev");
    let dev = DevRun::start(&data);
    dev.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/reader",
        "--selector",
        &format!("unix:path:{}", writ_exe()),
    ]);
    let files = tmp.path().join("files");
    let (_helper, writes) = start_helper(&dev, &files, &[]);
    let first = writes.recv_timeout(Duration::from_secs(30)).unwrap();
    let chain = std::fs::read(files.join("svid.0.pem")).unwrap();

    drop(dev);
    // The agent is gone: nothing is written, nothing is removed.
    assert!(writes.recv_timeout(Duration::from_secs(2)).is_err());
    assert_eq!(std::fs::read(files.join("svid.0.pem")).unwrap(), chain);
    assert!(files.join("svid.0.key").is_file());

    // Back on the same data dir: the helper reconnects by itself and writes again.
    let _dev = DevRun::start(&data);
    let again = writes.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(again["spiffe_ids"], first["spiffe_ids"]);
    assert_ne!(again["serial"], first["serial"]);
}

#[test]
fn a_spiffe_helper_style_config_file_names_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    dev.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/conf",
        "--selector",
        &format!("unix:path:{}", writ_exe()),
    ]);
    let certs = tmp.path().join("certs");
    let conf = tmp.path().join("helper.conf");
    let socket = dev.get("workload_api");
    std::fs::write(
        &conf,
        format!(
            r#"agent_address = "{}"
cert_dir = "{}"
svid_file_name = "svid.pem"
svid_key_file_name = "svid_key.pem"
svid_bundle_file_name = "svid_bundle.pem"
daemon_mode = false
jwt_svids = [{{ jwt_audience = "sts.amazonaws.com", jwt_svid_file_name = "aws.token" }}]
"#,
            socket.strip_prefix("unix://").unwrap(),
            certs.display()
        ),
    )
    .unwrap();
    let out = Command::new(WRIT)
        .args(["api", "watch", "--config"])
        .arg(&conf)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["svid.pem", "svid_key.pem", "svid_bundle.pem", "aws.token"] {
        assert!(certs.join(name).is_file(), "{name}");
    }
    assert_eq!(mode(&certs.join("svid_key.pem")), 0o600);
    assert_eq!(mode(&certs.join("aws.token")), 0o600);
    let token = std::fs::read_to_string(certs.join("aws.token")).unwrap();
    assert_eq!(jwt_claims(&token)["aud"], "sts.amazonaws.com");
    assert_eq!(jwt_claims(&token)["sub"], "spiffe://example.org/conf");
}
