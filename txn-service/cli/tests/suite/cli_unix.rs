//! The `writ` command line as a Unix tool, driven as a user drives it: a reader that
//! closes the pipe early, tokens pasted where a file name belongs, typos in flags and
//! log filters, `--output json` shapes a script can rely on, and logs without colour
//! codes when they go to a file.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Server, WRIT, start_agent, uid};
use serde_json::Value;

/// A JWT-shaped value, as `$(cat alice.jwt)` would paste it.
const JWT: &str = "eyJhbGciOiJFUzI1NiIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiJhbGljZSIsInNlY3JldCI6MX0.c2lnbmF0dXJlLW5vdC1yZWFsbHk";

/// Runs `writ` with standard output connected to a pipe whose reader is already gone.
fn with_closed_stdout(args: &[&str], server: Option<&Server>) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(WRIT);
    cmd.args(args).stdout(writer).stderr(Stdio::piped());
    if let Some(server) = server {
        cmd.env("WRIT_SERVER_SOCKET", server.socket());
    }
    cmd.output().unwrap()
}

/// Registers `path` under `parent` (an attested agent: a parent must be held).
fn create(server: &Server, parent: &str, path: &str) {
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://example.org/{path}"),
        "--parent-id",
        parent,
        "--selector",
        &format!("unix:uid:{}", 5000 + path.len()),
    ]);
}

fn json(server: &Server, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = server.ok(&args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[test]
fn a_closed_pipe_ends_every_command_quietly() {
    let server = Server::start();
    let (_agent, _socket, agent_id) = start_agent(&server);
    for path in ["a", "bb", "ccc"] {
        create(&server, &agent_id, path);
    }
    for args in [
        &["entry", "list"][..],
        &["entry", "list", "--output", "json"],
        &["agent", "list"],
        &["bundle", "show"],
        &["bundle", "show", "--format", "spiffe"],
        &["token", "generate"],
        &["healthcheck"],
        &["txn", "decode", JWT],
        &["txn", "decode", JWT, "--output", "json"],
        &["--help"],
        &["entry", "create", "--help"],
    ] {
        let out = with_closed_stdout(args, Some(&server));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "writ {args:?} exits 0 on a closed pipe, got {:?}: {stderr}",
            out.status.code()
        );
        assert!(stderr.is_empty(), "writ {args:?} says nothing: {stderr}");
    }
}

#[test]
fn output_json_has_a_stable_shape() {
    let server = Server::start();
    let agents = json(&server, &["agent", "list"]);
    assert_eq!(agents, Value::Array(vec![]));
    let (_agent, socket, agent_id) = start_agent(&server);
    // A list is an array for 0, 1 and 2 items.
    for (n, path) in [(0, None), (1, Some("one")), (2, Some("two"))] {
        if let Some(path) = path {
            create(&server, &agent_id, path);
        }
        let list = json(&server, &["entry", "list"]);
        assert_eq!(list.as_array().map(Vec::len), Some(n), "{list}");
    }
    // One thing is an object.
    let list = json(&server, &["entry", "list"]);
    let id = list[0]["id"].as_str().unwrap();
    let shown = json(&server, &["entry", "show", "--entry-id", id]);
    assert_eq!(shown, list[0]);
    let updated = json(
        &server,
        &["entry", "update", "--entry-id", id, "--hint", "h"],
    );
    assert_eq!(updated["hint"], "h");
    let token = json(&server, &["token", "generate"]);
    assert_eq!(token["token"].as_str().map(str::len), Some(36), "{token}");
    let health = json(&server, &["healthcheck"]);
    assert_eq!(health["healthy"], true);
    assert_eq!(health["trust_domain"], "example.org");
    let bundle = json(&server, &["bundle", "show"]);
    assert!(bundle["keys"].is_array(), "SPIFFE bundle JSON: {bundle}");
    let jwt = json(
        &server,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/w",
            "--audience",
            "a",
        ],
    );
    assert_eq!(jwt["token"].as_str().unwrap().split('.').count(), 3);
    let decoded = json(&server, &["txn", "decode", jwt["token"].as_str().unwrap()]);
    assert_eq!(decoded["claims"]["sub"], "spiffe://example.org/w");
    let deleted = json(&server, &["entry", "delete", "--entry-id", id]);
    assert_eq!(deleted["deleted"], id);
    // `pretty`, the flag's earlier value, still means text.
    assert!(
        server
            .ok(&["entry", "list", "--output", "pretty"])
            .starts_with("Found 1 entry")
    );

    // The Workload API commands: arrays of SVIDs, also for one.
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/me",
        "--parent-id",
        &agent_id,
        "--selector",
        &format!("unix:uid:{}", uid()),
    ]);
    let endpoint = format!("unix://{}", socket.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    let svids = loop {
        let out = crate::common::api(&["api", "fetch", "x509", "--output", "json"], &socket);
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).unwrap();
        }
        assert!(Instant::now() < deadline, "no SVID");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(svids.as_array().map(Vec::len), Some(1), "{svids}");
    assert_eq!(svids[0]["spiffe_id"], "spiffe://example.org/me");
    let dir = server.dir.path().join("fetched");
    let out = crate::common::api(
        &[
            "api",
            "fetch",
            "x509",
            "--output",
            "json",
            "--write",
            dir.to_str().unwrap(),
        ],
        &socket,
    );
    let written: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(dir.join("svid.0.pem").exists());
    assert_eq!(
        written[0]["svid_file"],
        dir.join("svid.0.pem").to_str().unwrap()
    );
    let out = crate::common::api(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--output",
            "json",
            "--socket",
            &endpoint,
        ],
        &socket,
    );
    let tokens: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tokens.as_array().map(Vec::len), Some(1), "{tokens}");
    let token = tokens[0]["token"].as_str().unwrap();
    // `--svid -` reads the token from standard input.
    let mut child = Command::new(WRIT)
        .args([
            "api",
            "validate",
            "jwt",
            "--audience",
            "a",
            "--svid",
            "-",
            "--output",
            "json",
        ])
        .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), token.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let valid: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(valid["spiffe_id"], "spiffe://example.org/me");
    let agents = json(&server, &["agent", "list"]);
    assert_eq!(agents.as_array().map(Vec::len), Some(1), "{agents}");
}

#[test]
fn no_error_echoes_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("unix://{}", dir.path().join("none.sock").display());
    let cases: &[&[&str]] = &[
        // The token where a file name belongs.
        &["exchange", "--subject-token", JWT],
        &["exchange", &format!("--subject-token={JWT}")],
        &["exchange", "--subject-token", &format!("@{JWT}")],
        &["exchange", "--subject-token", "opaque-secret-token-value"],
        // clap's own errors: an unexpected argument, a bad value next to a token.
        &["exchange", JWT],
        &["exchange", "--subject-token", JWT, "--output", "yaml"],
        &["exchange", "--subject-token", JWT, "--subject-token", JWT],
        &["txn", "decode", JWT, "extra"],
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "a",
            "--svid",
            JWT,
            "--socket",
            &nowhere,
        ],
        &[
            "agent",
            "run",
            "--join-token",
            "0123456789abcdef-join",
            "--no-such-flag",
        ],
    ];
    for args in cases {
        let out = Command::new(WRIT)
            .args(*args)
            .env("SPIFFE_ENDPOINT_SOCKET", &nowhere)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for secret in [JWT, "opaque-secret-token-value", "0123456789abcdef-join"] {
            assert!(!all.contains(secret), "writ {args:?} echoed a token: {all}");
        }
        // Nor a recognisable part of it.
        assert!(!all.contains(&JWT[..30]), "writ {args:?}: {all}");
    }
    // It says what to do instead.
    let out = Command::new(WRIT)
        .args(["exchange", "--subject-token", JWT])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--subject-token -"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn clap_suggestions_are_kept_and_typos_in_log_filters_refused() {
    let out = Command::new(WRIT)
        .args(["entry", "list", "--spiffe-idd", "x"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("error: unexpected argument '--spiffe-idd'"),
        "{err}"
    );
    assert!(err.contains("--spiffe-id"), "the suggestion is kept: {err}");
    assert!(err.contains("Usage:"), "{err}");
    let out = Command::new(WRIT)
        .args(["entry", "list", "--output", "yaml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[possible values: text, json]"), "{err}");
    assert!(!err.contains('\x1b'), "no colour off a terminal: {err:?}");

    let dir = tempfile::tempdir().unwrap();
    for (args, env) in [
        (vec!["server", "run", "--log-level", "debgu"], None),
        (vec!["server", "run"], Some("debgu")),
        (
            vec!["dev", "--log-level", "info,writ_identity=verbose"],
            None,
        ),
    ] {
        let mut cmd = Command::new(WRIT);
        cmd.args(&args)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("WRIT_LOG");
        if let Some(filter) = env {
            cmd.env("WRIT_LOG", filter);
        }
        if args[0] == "server" {
            cmd.arg("--server-socket").arg(dir.path().join("s.sock"));
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} {env:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains("--log-level"), "{err}");
        assert!(
            err.contains("trace, debug, info, warn, error, off"),
            "{err}"
        );
        assert!(
            !dir.path().join("data").exists(),
            "nothing started: {args:?}"
        );
    }
}

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let socket = dir.path().join("s.sock");
    let mut child = Command::new(WRIT)
        .args([
            "server",
            "run",
            "--log-level",
            "debug",
            "--bind-address",
            "",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--server-socket")
        .arg(&socket)
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Command::new(WRIT)
        .args(["healthcheck", "--shallow", "--server-socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("DEBUG") || text.contains("INFO"), "{text}");
    assert!(!text.contains('\x1b'), "ANSI codes in a log file: {text:?}");
}
