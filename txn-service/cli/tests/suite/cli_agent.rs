//! `writ agent run` and `writ api ...` end to end: a server process, a join token, an
//! agent process attesting over mTLS, and the Workload API used from the command line.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{
    Server, WRIT, agent_cmd, api, join_token_and_bundle, openssl, start_agent, uid,
};

#[test]
fn agent_attests_with_a_join_token_and_serves_the_workload_api() {
    let server = Server::start();
    let dir = server.dir.path();
    let (_agent, socket, agent_id) = start_agent(&server);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&socket),
        0o777,
        "workloads of any uid can reach the Workload API"
    );
    assert_eq!(
        mode(&server.socket()),
        0o600,
        "only the owner reaches the admin API"
    );
    assert!(server.ok(&["agent", "list"]).contains(&agent_id));

    // No entry yet: a one-line "no identity issued".
    let out = api(&["api", "fetch", "x509"], &socket);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no identity issued"));

    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/cli/workload",
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    let out_dir = dir.join("fetched");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = api(
            &["api", "fetch", "x509", "--write", out_dir.to_str().unwrap()],
            &socket,
        );
        if out.status.success() {
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/cli/workload")
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new entry did not reach the agent within 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let verify = openssl(&[
        "verify",
        "-CAfile",
        out_dir.join("bundle.0.pem").to_str().unwrap(),
        out_dir.join("svid.0.pem").to_str().unwrap(),
    ]);
    assert!(verify.trim_end().ends_with(": OK"));

    let out = api(
        &["api", "fetch", "jwt", "--audience", "tool-server"],
        &socket,
    );
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let token = text.lines().nth(1).unwrap().trim();
    let out = api(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "tool-server",
            "--svid",
            token,
        ],
        &socket,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/cli/workload"));
    let out = api(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "someone-else",
            "--svid",
            token,
        ],
        &socket,
    );
    assert!(!out.status.success());
    let out = api(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "tool-server",
            "--svid",
            "garbage",
        ],
        &socket,
    );
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );

    // The same token again, from another agent: refused, one line, nothing stored.
    let out = agent_cmd(
        &server,
        &token_of(&agent_id),
        &dir.join("agent2"),
        &dir.join("agent2.sock"),
        &dir.join("bundle.pem"),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with("error: ") && last.contains("already been used"),
        "{err}"
    );
    assert_eq!(
        server.ok(&["agent", "list"]).matches("SPIFFE ID").count(),
        1
    );

    // Healthy while the server accepts it.
    let endpoint = format!("unix://{}", socket.display());
    let health = || api(&["healthcheck", "--socket", &endpoint], &socket);
    let out = health();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Agent is healthy."
    );

    // Ban, then evict: the agent notices at its next sync and its healthcheck says so.
    server.ok(&["agent", "ban", "--spiffe-id", &agent_id]);
    assert!(
        server
            .ok(&["agent", "show", "--spiffe-id", &agent_id])
            .contains("Banned            : true")
    );
    let unhealthy = |expect: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = health();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            if !out.status.success() && err.contains(expect) {
                assert!(out.stdout.is_empty(), "nothing on stdout when unhealthy");
                assert_eq!(err.trim_end().lines().count(), 1, "{err}");
                assert!(err.contains("agent is unhealthy: "), "{err}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not report {expect:?} within 20 s: {err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    unhealthy("agent is banned");
    server.ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    assert!(
        server
            .ok(&["agent", "list"])
            .contains("Found 0 attested agents")
    );
    server.fails(&["agent", "show", "--spiffe-id", &agent_id]);
    unhealthy("evicted");
}

/// Data dirs are 0700 (the agent's, the server's and their `keys/`), tightened if an
/// older version made them 0755; the agent socket stays reachable (0777).
#[test]
fn data_dirs_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // A server data dir left 0755 by an older version is tightened at start.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("server.toml"), "").unwrap();
    let (child, node_addr) = Server::spawn_on_free_port(dir.path());
    let server = Server {
        child,
        node_addr,
        dir,
    };
    server.wait_ready();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("keys")), 0o700);
    let (_agent, socket, _) = start_agent(&server);
    assert_eq!(mode(&server.dir.path().join("agent")), 0o700);
    assert_eq!(mode(&socket), 0o777);
}

/// A regular file where a socket should go is an error naming the path, and the file
/// is left as it was (only a stale socket is ever removed).
#[test]
fn a_regular_file_at_a_socket_path_is_never_removed() {
    let server = Server::start();
    let dir = server.dir.path();
    let token = join_token_and_bundle(&server);
    let occupied = dir.join("occupied.sock");
    std::fs::write(&occupied, "precious").unwrap();
    let out = agent_cmd(
        &server,
        &token,
        &dir.join("agent"),
        &occupied,
        &dir.join("bundle.pem"),
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.contains(&occupied.display().to_string()) && last.contains("is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&occupied).unwrap(), "precious");

    // The server's admin socket likewise.
    let other = tempfile::tempdir().unwrap();
    let admin = other.path().join("server.sock");
    std::fs::write(&admin, "precious").unwrap();
    let out = Command::new(WRIT)
        .args(["server", "run", "--data-dir"])
        .arg(other.path().join("data"))
        .arg("--server-socket")
        .arg(&admin)
        .env_remove("WRIT_SERVER_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&admin.display().to_string()) && err.contains("is not a socket"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&admin).unwrap(), "precious");
}

fn token_of(agent_id: &str) -> String {
    agent_id.rsplit('/').next().unwrap().to_owned()
}

#[test]
fn agent_needs_a_bootstrap_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(WRIT)
        .args([
            "agent",
            "run",
            "--server-address",
            "127.0.0.1:1",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("trust_bundle_path"), "{err}");
    let out = Command::new(WRIT)
        .args([
            "agent",
            "run",
            "--server-address",
            "127.0.0.1:1",
            "--insecure-bootstrap",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("join token"), "{err}");
}

#[test]
fn server_address_is_repeatable_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let run = |addresses: &[&str]| {
        let mut cmd = Command::new(WRIT);
        cmd.args(["agent", "run", "--insecure-bootstrap", "--data-dir"])
            .arg(dir.path());
        for a in addresses {
            cmd.args(["--server-address", a]);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    // Two servers: the list is taken, and the agent stops only for want of a token.
    let err = run(&["127.0.0.1:1", "localhost:2"]);
    assert!(err.contains("join token"), "{err}");
    let err = run(&["127.0.0.1:1", "127.0.0.1:1"]);
    assert!(
        err.contains("server_address") && err.contains("given twice"),
        "{err}"
    );
    let err = run(&["writ-server"]);
    assert!(
        err.contains("server_address") && err.contains("port is missing"),
        "{err}"
    );
}
