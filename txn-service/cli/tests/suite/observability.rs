//! Observability end to end: `writ dev --log-format json` with its three operations
//! listeners, scraped by a real Prometheus (Debian `prometheus`; skipped when absent
//! unless `WRIT_REQUIRE_ALL=1`). After an X509 fetch, a JWT fetch, a token exchange and
//! a Workload API caller no entry matches, Prometheus's HTTP API shows the issuance and
//! exchange counters risen and the attestation failure counted. The log is one JSON
//! object a line, with `spiffe_id` as a field. Also: the operations listener refuses bad
//! requests, and `/readyz` agrees with `writ healthcheck`, for the server and the agent,
//! healthy and evicted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{WRIT, api, uid};

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.1 request; returns the status and the body.
fn http(addr: &str, request: &str) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

/// The value of the series `name{labels}` (labels as written in the exposition) in an
/// OpenMetrics text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `writ dev --log-format json` on `dir`, its log in `log`; returns once ready.
fn start_dev(dir: &Path, log: &Path) -> Killed {
    let mut child = Command::new(WRIT)
        .args([
            "dev",
            "--log-format",
            "json",
            "--log-level",
            "info",
            "--data-dir",
        ])
        .arg(dir)
        .args(["--tts-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let dev = Killed(child);
    loop {
        let line = lines
            .next()
            .expect("writ dev stopped before it was ready")
            .unwrap();
        if line.starts_with("Ctrl-C stops") {
            break;
        }
    }
    // Keep draining stdout so writ dev never blocks on it.
    std::thread::spawn(move || for _ in lines {});
    dev
}

#[test]
fn prometheus_scrapes_every_part_and_sees_issuance_exchanges_and_attestation_failures() {
    let prometheus_found = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !writ_tests::env::available("prometheus (Debian package `prometheus`)", prometheus_found) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let log = tmp.path().join("dev.log");
    let dev = start_dev(&dir, &log);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let url = |key: &str| state[key].as_str().unwrap().to_owned();
    for key in ["server", "agent", "txn"] {
        let metrics = url(&format!("{key}_metrics_url"));
        assert!(metrics.starts_with("http://127.0.0.1:"), "{metrics}");
        let (status, body) = get(&metrics);
        assert_eq!(status, 200, "{metrics}: {body}");
        assert!(body.contains(&format!("# TYPE writ_{key}_")), "{body}");
        assert!(body.trim_end().ends_with("# EOF"), "{body}");
        let (status, body) = get(&url(&format!("{key}_health_url")));
        assert_eq!(status, 200, "{key} not ready: {body}");
    }
    assert!(url("explorer_url").ends_with("/explorer"));
    let socket = Path::new(url("workload_api").strip_prefix("unix://").unwrap()).to_path_buf();
    let sock = url("server_socket");

    // Before traffic.
    let server_before = get(&url("server_metrics_url")).1;
    let txn_before = get(&url("txn_metrics_url")).1;
    let x509_before = sample(
        &server_before,
        "writ_server_svids_issued_total{kind=\"x509\"}",
    );
    let jwt_before = sample(
        &server_before,
        "writ_server_svids_issued_total{kind=\"jwt\"}",
    );
    let granted_before = sample(
        &txn_before,
        "writ_txn_exchanges_total{outcome=\"granted\",error=\"none\"}",
    );

    // A caller no entry matches yet: an attestation failure.
    let out = api(&["api", "fetch", "x509"], &socket);
    assert!(!out.status.success());
    // An entry for this test's uid, then an X509 and a JWT fetch, and an exchange.
    let me = "spiffe://example.org/observed";
    let writ = |args: &[&str]| {
        let out = Command::new(WRIT)
            .args(args)
            .env("WRIT_SERVER_SOCKET", &sock)
            .env("SPIFFE_ENDPOINT_SOCKET", url("workload_api"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "writ {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    writ(&[
        "entry",
        "create",
        "--spiffe-id",
        me,
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api(&["api", "fetch", "x509"], &socket).status.success() {
        assert!(
            Instant::now() < deadline,
            "the new entry never reached the agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    writ(&["api", "fetch", "jwt", "--audience", "observability-test"]);
    let login = writ(&[
        "dev",
        "login",
        "--data-dir",
        dir.to_str().unwrap(),
        "--user",
        "alice",
        "--scope",
        "docs.read",
    ]);
    let token_file = tmp.path().join("user.jwt");
    std::fs::write(&token_file, login.lines().last().unwrap()).unwrap();
    writ(&[
        "exchange",
        "--url",
        &url("tts_url"),
        "--subject-token",
        token_file.to_str().unwrap(),
        "--scope",
        "docs.read",
        "--spiffe-id",
        me,
        "--socket",
        &url("workload_api"),
    ]);

    // A real Prometheus scrapes the three parts every second.
    let config = tmp.path().join("prometheus.yml");
    let target = |key: &str| {
        let u = url(&format!("{key}_metrics_url"));
        u.strip_prefix("http://")
            .unwrap()
            .strip_suffix("/metrics")
            .unwrap()
            .to_owned()
    };
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             - job_name: writ-server\n  static_configs:\n  - targets: ['{}']\n\
             - job_name: writ-agent\n  static_configs:\n  - targets: ['{}']\n\
             - job_name: writ-txn\n  static_configs:\n  - targets: ['{}']\n",
            target("server"),
            target("agent"),
            target("txn")
        ),
    )
    .unwrap();
    let port = free_port();
    let prometheus_addr = format!("127.0.0.1:{port}");
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let query = |promql: &str| -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let stream = TcpStream::connect(&prometheus_addr).ok()?;
        drop(stream);
        let (status, body) = get(&format!(
            "http://{prometheus_addr}/api/v1/query?query={encoded}"
        ));
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let wanted: Vec<(String, f64)> = vec![
        (
            "sum(writ_server_svids_issued_total{kind=\"x509\"})".into(),
            x509_before,
        ),
        (
            "sum(writ_server_svids_issued_total{kind=\"jwt\"})".into(),
            jwt_before,
        ),
        (
            "sum(writ_txn_exchanges_total{outcome=\"granted\"})".into(),
            granted_before,
        ),
        (
            "sum(writ_agent_attestation_failures_total{reason=\"no_matching_entry\"})".into(),
            0.0,
        ),
        ("count(up == 1)".into(), 2.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let last = wanted
            .iter()
            .map(|(q, before)| (q.clone(), *before, query(q)))
            .collect::<Vec<_>>();
        if last
            .iter()
            .all(|(_, before, now)| now.is_some_and(|n| n > *before))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not see the traffic within 90 s: {last:?}; its log:\n{}",
            std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(dev);

    // The log: one JSON object a line, and `spiffe_id` is a field of some event.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\x1b'), "ANSI codes in a JSON log");
    let mut with_id = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            event["level"].is_string() && event["timestamp"].is_string(),
            "{line}"
        );
        if event["spiffe_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("spiffe://"))
        {
            with_id += 1;
        }
    }
    assert!(with_id > 0, "no event with a spiffe_id field:\n{text}");
}

#[test]
fn ops_listener_refuses_bad_requests_and_readyz_agrees_with_healthcheck() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dev");
    let dev = start_dev(&dir, &tmp.path().join("dev.log"));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("dev.json")).unwrap()).unwrap();
    let metrics = state["agent_metrics_url"].as_str().unwrap();
    let addr: SocketAddr = metrics
        .strip_prefix("http://")
        .unwrap()
        .strip_suffix("/metrics")
        .unwrap()
        .parse()
        .unwrap();
    let addr = addr.to_string();
    let (status, body) = get(&format!("http://{addr}/nothing-here"));
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not_found"), "{body}");
    let (status, _) = http(
        &addr,
        &format!(
            "POST /metrics HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        ),
    );
    assert_eq!(status, 405);
    let huge = "a".repeat(64 * 1024);
    let (status, _) = http(
        &addr,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Huge: {huge}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 431, "a 64 KiB header is refused");
    let (status, body) = get(&format!("http://{addr}/healthz"));
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "alive"
    );

    // Ready and healthy together, for the server and for the agent.
    let sock = state["server_socket"].as_str().unwrap();
    let workload_api = state["workload_api"].as_str().unwrap();
    let healthcheck = |args: &[&str]| {
        Command::new(WRIT)
            .arg("healthcheck")
            .args(args)
            .env("WRIT_SERVER_SOCKET", sock)
            .output()
            .unwrap()
            .status
            .success()
    };
    for (health, args) in [
        ("server_health_url", vec![]),
        ("agent_health_url", vec!["--socket", workload_api]),
    ] {
        let (status, body) = get(state[health].as_str().unwrap());
        let ready: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(ready["ready"], true, "{body}");
        assert!(
            healthcheck(&args),
            "{health} ready but writ healthcheck fails"
        );
    }
    drop(dev);
}

/// A split agent with `[ops] listen` in its agent.toml: `/readyz` is 200 while
/// `writ healthcheck --socket` succeeds; evicted, both say so (503 naming the
/// `registration` check, and a failing healthcheck).
#[test]
fn an_evicted_agent_is_not_ready_on_readyz_nor_healthcheck() {
    let server = crate::common::Server::start();
    let dir = server.dir.path();
    let token = crate::common::join_token_and_bundle(&server);
    let socket = dir.join("agent.sock");
    let config = dir.join("agent.toml");
    std::fs::write(&config, "[ops]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut child = crate::common::agent_cmd(
        &server,
        &token,
        &dir.join("agent"),
        &socket,
        &dir.join("bundle.pem"),
    )
    .arg("--config")
    .arg(&config)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _agent = Killed(child);
    let ops = crate::common::bound_address(stderr, "operations listener");
    let endpoint = format!("unix://{}", socket.display());
    let healthy = || {
        api(&["healthcheck", "--socket", &endpoint], &socket)
            .status
            .success()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy() {
        assert!(
            Instant::now() < deadline,
            "the agent did not become healthy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = get(&format!("http://{ops}/readyz"));
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&format!("http://{ops}/metrics"));
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE writ_agent_svids gauge"), "{body}");

    let agent_id = format!("spiffe://example.org/writ/agent/join_token/{token}");
    server.ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (status, body) = get(&format!("http://{ops}/readyz"));
        if status == 503 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "an evicted agent stayed ready: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false, "{body}");
    let failing: Vec<&Value> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failing.len(), 1, "{body}");
    assert_eq!(failing[0]["name"], "registration", "{body}");
    assert!(
        failing[0]["error"].as_str().unwrap().contains("evicted"),
        "{body}"
    );
    assert!(
        !healthy(),
        "writ healthcheck says healthy while /readyz answers 503"
    );
}
