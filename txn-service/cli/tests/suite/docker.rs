//! The `docker` workload attestor against a real Docker daemon (found or started by
//! `writ_tests::docker`; skipped with a message when there is none, never under
//! `WRIT_REQUIRE_ALL=1`): `writ dev` turns it on when `DOCKER_HOST` answers, containers
//! built `FROM scratch` around the `writ` binary fetch their SVIDs through the
//! bind-mounted agent socket, and the attestor's cache follows the daemon's events.
//!
//! The latency figures: `cargo test -p writ-cli --test suite docker::attestation_latency
//! -- --ignored --nocapture`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use writ_identity::attest::workload::{
    Attestors, Caller, DockerAttestor, DockerAttestorConfig, UnixAttestor, WorkloadAttestor,
};
use writ_tests::docker::Daemon;

use crate::common::{Agent, Server, WRIT, agent_cmd, join_token_and_bundle};

/// The image holding the `writ` binary, built once per test process.
fn writ_image(docker: &Daemon) -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let tag = format!("writ-test-writ:{}", std::process::id());
        docker.scratch_image(&tag, Path::new(WRIT), &[]).unwrap()
    })
}

/// An image whose entry point is `sleep` (a long-lived process to attest).
fn sleep_image(docker: &Daemon) -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let sleep = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("a sleep binary");
        let tag = format!("writ-test-sleep:{}", std::process::id());
        docker.scratch_image(&tag, &sleep, &[]).unwrap()
    })
}

/// Removes containers when the test ends, passing or not.
struct Containers<'a> {
    docker: &'a Daemon,
    ids: Vec<String>,
}

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.docker.docker(&["rm", "-f", id]);
        }
    }
}

/// A running `writ dev` with `DOCKER_HOST` set to the test daemon, killed on drop.
struct Dev {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
}

impl Dev {
    fn start(docker: &Daemon, tmp: &Path) -> Self {
        let dir = tmp.join("dev");
        let log = tmp.join("dev.log");
        let mut child = Command::new(WRIT)
            .args(["dev", "--data-dir"])
            .arg(&dir)
            .args(["--tts-listen", "127.0.0.1:0"])
            .env("DOCKER_HOST", docker.host())
            .env(
                "WRIT_LOG",
                "info,writ_identity::agent=debug,writ_identity::attest=debug",
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
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
        loop {
            let line = lines
                .recv_timeout(Duration::from_secs(60))
                .expect("writ dev printed nothing for 60 s");
            if line.starts_with("Ctrl-C stops") {
                break;
            }
        }
        Self { child, dir, log }
    }

    fn server_socket(&self) -> PathBuf {
        self.dir.join("server.sock")
    }

    fn entry(&self, id: &str, selector: &str) {
        let out = Command::new(WRIT)
            .args(["entry", "create", "--spiffe-id", id, "--selector", selector])
            .env("WRIT_SERVER_SOCKET", self.server_socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "entry create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `writ api fetch x509` in a new container labelled `app=<app>`, with `socket_dir` (which
/// holds `agent.sock`) mounted at `/run/writ`: (success, stdout, stderr).
fn fetch_in_container(docker: &Daemon, socket_dir: &Path, app: &str) -> (bool, String, String) {
    let mount = format!("{}:/run/writ", socket_dir.display());
    let label = format!("app={app}");
    let args = [
        "run",
        "--rm",
        "--network",
        "none",
        "--label",
        &label,
        "-v",
        &mount,
        writ_image(docker),
        "api",
        "fetch",
        "x509",
        "--socket",
        "unix:///run/writ/agent.sock",
    ];
    writ_tests::env::run_bounded(
        docker.command().args(args),
        writ_tests::docker::COMMAND_TIMEOUT,
    )
    .unwrap()
}

/// As [`fetch_in_container`], retried until it succeeds (the agent learns new entries
/// from the server within a few seconds), failing after a minute.
fn fetch_until_issued(
    docker: &Daemon,
    socket_dir: &Path,
    app: &str,
    log: impl Fn() -> String,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out, err) = fetch_in_container(docker, socket_dir, app);
        if ok {
            return out;
        }
        assert!(
            Instant::now() < deadline && err.contains("no identity issued"),
            "container {app}: {out}\n{err}\nagent log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn containers_get_the_identity_of_their_labels() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(docker, tmp.path());
    let log = dev.log();
    assert!(
        log.contains("workload attestors") && log.contains("docker"),
        "writ dev logs that docker is on:\n{log}"
    );
    dev.entry("spiffe://example.org/app-a", "docker:label:app:a");
    dev.entry("spiffe://example.org/app-b", "docker:label:app:b");
    writ_image(docker);

    let out = fetch_until_issued(docker, &dev.dir, "a", || dev.log());
    assert!(out.contains("spiffe://example.org/app-a"), "{out}");
    assert!(!out.contains("app-b"), "{out}");

    let out = fetch_until_issued(docker, &dev.dir, "b", || dev.log());
    assert!(out.contains("spiffe://example.org/app-b"), "{out}");
    assert!(!out.contains("app-a"), "{out}");

    // Labels no entry names: nothing issued.
    let (ok, out, err) = fetch_in_container(docker, &dev.dir, "c");
    assert!(!ok, "container c got an identity: {out}");
    assert!(err.contains("no identity issued"), "{err}");
    // The agent logged the docker selectors it saw for c.
    assert!(dev.log().contains("docker:label:app:c"), "{}", dev.log());
}

/// One template entry names every container by its `app` label; `writ entry show`
/// lists the IDs it produced; a label value that is not a path segment gets nothing.
#[test]
fn a_template_entry_names_each_container_by_its_label() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(docker, tmp.path());
    let out = Command::new(WRIT)
        .args([
            "entry",
            "create",
            "--template",
            "spiffe://example.org/agents/{docker:label:app}",
            "--output",
            "json",
        ])
        .env("WRIT_SERVER_SOCKET", dev.server_socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "entry create --template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry_id = created["id"].as_str().unwrap().to_owned();
    writ_image(docker);

    for app in ["planner", "tool-1"] {
        let out = fetch_until_issued(docker, &dev.dir, app, || dev.log());
        assert!(
            out.contains(&format!("spiffe://example.org/agents/{app}")),
            "{app}: {out}"
        );
    }
    // A label value that is not one path segment names nothing.
    let (ok, out, err) = fetch_in_container(docker, &dev.dir, "a/../writ");
    assert!(!ok, "a label with a slash got an identity: {out}");
    assert!(err.contains("no identity issued"), "{err}");

    let show = Command::new(WRIT)
        .args(["entry", "show", "--entry-id", &entry_id, "--output", "json"])
        .env("WRIT_SERVER_SOCKET", dev.server_socket())
        .output()
        .unwrap();
    assert!(show.status.success());
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let produced: Vec<&str> = shown["template_issues"]
        .as_array()
        .unwrap_or_else(|| panic!("no template_issues in {shown}"))
        .iter()
        .filter_map(|i| i["spiffe_id"].as_str())
        .collect();
    for app in ["planner", "tool-1"] {
        let id = format!("spiffe://example.org/agents/{app}");
        assert!(produced.contains(&id.as_str()), "{id} not in {produced:?}");
    }
    assert_eq!(produced.len(), 2, "{produced:?}");
}

/// The production path: `writ server run`, and `writ agent run` whose `agent.toml` turns
/// the docker attestor on (with the test daemon's socket).
#[test]
fn writ_agent_run_turns_docker_on_by_config() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    let server = Server::start();
    let dir = server.dir.path();
    let token = join_token_and_bundle(&server);
    let socket_dir = dir.join("run");
    let socket = socket_dir.join("agent.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[workload_attestors.docker]\nsocket_path = \"{}\"\ntimeout = \"2s\"\n",
            docker.host()
        ),
    )
    .unwrap();
    let log = dir.join("agent.log");
    let _agent = Agent(
        agent_cmd(
            &server,
            &token,
            &dir.join("agent"),
            &socket,
            &dir.join("bundle.pem"),
        )
        .arg("--config")
        .arg(&config)
        .env("WRIT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("Workload API on") {
        assert!(
            Instant::now() < deadline,
            "agent did not come up:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        read_log().contains("docker workload attestor on"),
        "{}",
        read_log()
    );
    let agent_id = format!("spiffe://example.org/writ/agent/join_token/{token}");
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/agent-app-a",
        "--parent-id",
        &agent_id,
        "--selector",
        "docker:label:app:a",
    ]);
    writ_image(docker);
    let out = fetch_until_issued(docker, &socket_dir, "a", read_log);
    assert!(out.contains("spiffe://example.org/agent-app-a"), "{out}");
    let (ok, out, err) = fetch_in_container(docker, &socket_dir, "b");
    assert!(!ok, "container b got an identity: {out}");
    assert!(err.contains("no identity issued"), "{err}");
}

fn attestor(docker: &Daemon) -> DockerAttestor {
    DockerAttestor::new(DockerAttestorConfig {
        socket_path: docker.socket.clone(),
        env_allow: vec!["TENANT".to_owned()],
        ..DockerAttestorConfig::default()
    })
}

fn caller(pid: i32) -> Caller {
    Caller {
        pid,
        uid: 0,
        gid: 0,
    }
}

/// Polls `done` until it holds, failing after `within`.
async fn eventually(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_used_then_dropped_when_the_container_goes() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    let image = sleep_image(docker);
    let id = docker
        .run(&[
            "--label",
            "app=cached",
            "--env",
            "TENANT=acme",
            "--env",
            "SECRET=hidden",
            image,
            "600",
        ])
        .unwrap();
    let mut containers = Containers {
        docker,
        ids: vec![id.clone()],
    };
    let pid = docker.pid_of(&id).unwrap();
    let a = attestor(docker);

    let first = a.attest(&caller(pid)).await.unwrap();
    let names: Vec<String> = first.iter().map(ToString::to_string).collect();
    assert!(
        names.contains(&"docker:label:app:cached".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"docker:env:TENANT=acme".to_owned()),
        "{names:?}"
    );
    assert!(names.iter().all(|n| !n.contains("SECRET")), "{names:?}");
    assert!(
        names.contains(&format!("docker:image_id:{image}")),
        "{names:?}"
    );
    // The event stream is up: from now on the container's selectors are cached.
    eventually(Duration::from_secs(30), "event stream connection", || {
        a.events_connected()
    })
    .await;
    let again = a.attest(&caller(pid)).await.unwrap();
    assert_eq!(again, first);
    assert!(a.is_cached(&id));
    let calls = a.api_calls();
    for _ in 0..10 {
        assert_eq!(a.attest(&caller(pid)).await.unwrap(), first);
    }
    assert_eq!(
        a.api_calls(),
        calls,
        "cached attestations ask the daemon nothing"
    );

    // Removing the container drops it from the cache (the events stream says so).
    docker.docker(&["rm", "-f", &id]).unwrap();
    containers.ids.clear();
    eventually(Duration::from_secs(30), "cache invalidation", || {
        !a.is_cached(&id)
    })
    .await;
}

#[tokio::test]
async fn a_container_docker_does_not_know_gets_no_docker_selectors() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    let a = attestor(docker);
    let unknown = "0123456789abcdef".repeat(4);
    assert!(a.selectors_of_container(&unknown).await.is_empty());
    assert!(!a.is_cached(&unknown));
    // The same through a caller whose cgroup names it.
    let proc = tempfile::tempdir().unwrap();
    std::fs::create_dir(proc.path().join("9")).unwrap();
    std::fs::write(
        proc.path().join("9/cgroup"),
        format!("0::/docker/{unknown}\n"),
    )
    .unwrap();
    let a = DockerAttestor::new(DockerAttestorConfig {
        socket_path: docker.socket.clone(),
        proc_root: proc.path().to_owned(),
        ..DockerAttestorConfig::default()
    });
    assert!(a.attest(&caller(9)).await.unwrap().is_empty());
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:?} p99={:?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99)
    );
}

/// Attestation latency of a process in a container, cold (first attestation of the
/// container: one inspect) and cached, for the docker attestor alone and for the
/// `unix` + `docker` chain; and Docker API calls per cached attestation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn attestation_latency() {
    let Some(docker) = writ_tests::docker::daemon() else {
        return;
    };
    const CONTAINERS: usize = 20;
    const CACHED: usize = 2000;
    let image = sleep_image(docker);
    let mut containers = Containers {
        docker,
        ids: Vec::new(),
    };
    let mut pids = Vec::new();
    for i in 0..CONTAINERS {
        let label = format!("app=bench-{i}");
        let id = docker.run(&["--label", &label, image, "600"]).unwrap();
        pids.push(docker.pid_of(&id).unwrap());
        containers.ids.push(id);
    }
    let a = attestor(docker);
    // Negotiate the API version and connect the event stream first.
    a.attest(&caller(pids[0])).await.unwrap();
    eventually(Duration::from_secs(30), "event stream connection", || {
        a.events_connected()
    })
    .await;
    a.attest(&caller(pids[0])).await.unwrap();

    let mut cold = Vec::new();
    for pid in &pids[1..] {
        let t = Instant::now();
        let s = a.attest(&caller(*pid)).await.unwrap();
        cold.push(t.elapsed());
        assert!(!s.is_empty());
    }
    let before = a.api_calls();
    let mut cached = Vec::new();
    for i in 0..CACHED {
        let pid = pids[i % pids.len()];
        let t = Instant::now();
        a.attest(&caller(pid)).await.unwrap();
        cached.push(t.elapsed());
    }
    let calls = a.api_calls() - before;

    let chain = Attestors::new()
        .with("unix", Arc::new(UnixAttestor::default()))
        .with("docker", Arc::new(a.clone()));
    let mut chain_cached = Vec::new();
    for i in 0..CACHED {
        let pid = pids[i % pids.len()];
        let t = Instant::now();
        chain.attest(&caller(pid)).await.unwrap();
        chain_cached.push(t.elapsed());
    }
    report("docker attestor, cold (one inspect)", cold);
    report("docker attestor, cached", cached);
    report("unix + docker chain, docker cached", chain_cached);
    println!(
        "Docker API calls per cached attestation: {} ({calls} in {CACHED})",
        calls as f64 / CACHED as f64
    );
    assert_eq!(calls, 0);
}
