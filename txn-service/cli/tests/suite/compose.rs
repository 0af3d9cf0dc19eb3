//! The Compose example (`examples/deploy/compose/`) brought up for real: the image built
//! from this test's `writ` binary with `examples/deploy/docker/context.sh` (FROM scratch,
//! no registry), `docker-compose up` of the server, the one-shot join and register
//! steps, the agent with the Docker socket and the TTS, then the demo workload, which
//! gets its SVID by its label and exchanges a real OpenID Provider's token for a
//! Txn-Token. Everything is torn down at the end, volumes included.
//!
//! Needs Docker, Docker Compose and Node (the OpenID Provider); skips without them,
//! except under `WRIT_REQUIRE_ALL=1`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use writ_tests::docker::{Daemon, daemon};
use writ_tests::env::{run_bounded, skip, workspace_root};
use writ_tests::oidc_provider::Provider;

use crate::common::WRIT;

/// Builds the example's image from the test binary, tagged `tag`.
fn build_image(docker: &Daemon, tag: &str, scratch: &Path) {
    let context = scratch.join("image");
    let script = workspace_root().join("examples/deploy/docker/context.sh");
    let (ok, stdout, stderr) = run_bounded(
        Command::new(&script).arg(WRIT).arg(&context),
        Duration::from_secs(120),
    )
    .expect("context.sh ran");
    assert!(ok, "context.sh failed: {stdout}{stderr}");
    let context = context.display().to_string();
    docker
        .docker(&["build", "-q", "-t", tag, &context])
        .expect("the example's Dockerfile builds");
}

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `docker-compose -p <project> -f compose.yaml <args>` with the test's variables.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
    docker_host: String,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let dir = workspace_root().join("examples/deploy/compose");
        let mut command = Command::new("docker-compose");
        command
            .current_dir(&dir)
            .env("DOCKER_HOST", &self.docker_host)
            .args(["-p", &self.project, "-f", "compose.yaml"])
            .args(args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        command
    }

    fn run(&self, args: &[&str], timeout: Duration) -> (bool, String, String) {
        run_bounded(&mut self.command(args), timeout)
            .unwrap_or_else(|| panic!("docker-compose {args:?} did not finish in {timeout:?}"))
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = run_bounded(
            &mut self.command(&["down", "-v", "--remove-orphans", "-t", "2"]),
            Duration::from_secs(120),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_example_comes_up_issues_by_label_and_exchanges_a_token() {
    let Some(docker) = daemon() else {
        return;
    };
    let compose_ok = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !compose_ok {
        return skip(
            "the Compose example",
            "docker-compose is not installed (apt-get install docker-compose)",
        )
        .unwrap_or(());
    }
    let Some(provider) = Provider::start() else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let tag = format!("writ-compose-test:{}", std::process::id());
    build_image(docker, &tag, scratch.path());

    // The TTS of the example names a placeholder OpenID Provider: give it the real one.
    let txn_port = free_port();
    let node_port = free_port();
    let txn_toml = scratch.path().join("txn.toml");
    std::fs::write(
        &txn_toml,
        format!(
            r#"# txn.toml for the Compose test
listen = "127.0.0.1:{txn_port}"
issuer = "https://127.0.0.1:{txn_port}"
workload_api = "unix:///run/writ/agent.sock"
spiffe_id = "spiffe://example.org/tts"
data_dir = "/var/lib/writ/txn"
audit_log = "/var/lib/writ/txn/audit.log"

[[oidc]]
issuer = "{issuer}"
audiences = ["{resource}"]

[[policy.caller]]
id = "spiffe://example.org/demo"
subject_token_types = ["access_token"]
max_scope = ["read"]
"#,
            issuer = provider.issuer,
            resource = provider.resource,
        ),
    )
    .unwrap();
    let demo_dir = scratch.path().join("demo");
    std::fs::create_dir(&demo_dir).unwrap();
    let token = provider.access_token("read").await;
    std::fs::write(demo_dir.join("subject-token"), &token).unwrap();
    // The containers run as 10001: let them read the test's files.
    for path in [scratch.path(), &demo_dir] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    for path in [&txn_toml, &demo_dir.join("subject-token")] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
    }

    let compose = Compose {
        project: format!("writ-test-{}", std::process::id()),
        docker_host: docker.host(),
        env: vec![
            ("WRIT_IMAGE".into(), tag.clone()),
            ("WRIT_NODE_PORT".into(), node_port.to_string()),
            ("WRIT_TXN_PORT".into(), txn_port.to_string()),
            ("WRIT_TXN_CONFIG".into(), txn_toml.display().to_string()),
            ("WRIT_DEMO_DIR".into(), demo_dir.display().to_string()),
            ("WRIT_DEMO_SCOPE".into(), "read".into()),
            ("DOCKER_SOCKET".into(), docker.socket.display().to_string()),
        ],
    };
    let (ok, stdout, stderr) = compose.run(
        &["up", "-d", "server", "join", "register", "agent", "txn"],
        Duration::from_secs(300),
    );
    assert!(ok, "docker-compose up failed:\n{stdout}\n{stderr}");

    // The TTS listens once it holds its SVID, which it gets by its label.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", txn_port)).is_err() {
        if Instant::now() > deadline {
            let (_, logs, _) = compose.run(&["logs", "--no-color"], Duration::from_secs(60));
            panic!("the TTS never listened on {txn_port}; logs:\n{logs}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (ok, stdout, stderr) = compose.run(&["run", "--rm", "demo"], Duration::from_secs(120));
    if !ok {
        let (_, logs, _) = compose.run(&["logs", "--no-color"], Duration::from_secs(60));
        panic!("the demo workload failed:\n{stdout}\n{stderr}\nlogs:\n{logs}");
    }
    let start = stdout.find('{').expect("JSON on standard output");
    let answer: serde_json::Value = serde_json::from_str(&stdout[start..]).unwrap();
    let txn_token = answer["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no Txn-Token in {answer}"));
    let payload = txn_token.split('.').nth(1).expect("a JWS");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["scope"], "read");
    // The demo workload's identity came from its label, and the chain names it.
    assert!(
        claims.to_string().contains("spiffe://example.org/demo"),
        "the Txn-Token does not name the demo workload: {claims}"
    );

    // Down, volumes included: nothing of the project is left.
    drop(compose);
    let filter = format!(
        "label=com.docker.compose.project=writ-test-{}",
        std::process::id()
    );
    let left = docker.docker(&["ps", "-aq", "--filter", &filter]).unwrap();
    assert!(left.is_empty(), "containers left behind: {left}");
    let volumes = docker
        .docker(&["volume", "ls", "-q", "--filter", &filter])
        .unwrap();
    assert!(volumes.is_empty(), "volumes left behind: {volumes}");
    docker.docker(&["rmi", &tag]).unwrap();
}
