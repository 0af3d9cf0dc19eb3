//! `writ txn run`, `writ exchange` and `writ txn decode` end to end: a server process, an
//! agent process, the transaction token service as its own process with its SVID from
//! the agent, and `writ exchange` authenticating with the SVID it picks.
//!
//! The subject token comes from the npm `oidc-provider` (see `writ_tests::oidc_provider`); without
//! Node the test skips, unless `WRIT_REQUIRE_ALL=1`.
use writ_tests::oidc_provider;

use std::io::Write;
use std::process::{Child, Command, Output, Stdio};

use crate::common::{Server, WRIT, bound_address, start_agent, uid};
use serde_json::Value;

struct Txn(Child);

impl Drop for Txn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn writ(args: &[&str], endpoint: &str, stdin: Option<&str>) -> Output {
    let mut child = Command::new(WRIT)
        .args(args)
        .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
        .env_remove("WRIT_TXN_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn txn_run_exchange_and_decode() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let Some(provider) = oidc_provider::Provider::start() else {
        return;
    };
    let access_token = runtime.block_on(provider.access_token("read write"));

    let server = Server::start();
    let (_agent, socket, agent_id) = start_agent(&server);
    let endpoint = format!("unix://{}", socket.display());
    for path in ["/tts", "/gateway", "/agents/planner"] {
        server.ok(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org{path}"),
            "--parent-id",
            &agent_id,
            "--selector",
            &format!("unix:uid:{}", uid()),
        ]);
    }
    let dir = server.dir.path();
    let config = format!(
        r#"
listen = "127.0.0.1:0"
workload_api = "{endpoint}"
spiffe_id = "spiffe://example.org/tts"
data_dir = "{data}"

[[oidc]]
issuer = "{issuer}"
audiences = ["{resource}"]

[policy]
[[policy.caller]]
id = "spiffe://example.org/gateway"
subject_token_types = ["access_token"]
max_scope = ["read", "write"]
[[policy.caller]]
prefix = "spiffe://example.org/agents"
subject_token_types = ["txn_token"]
max_scope = ["read"]
"#,
        data = dir.join("txn").display(),
        issuer = provider.issuer,
        resource = provider.resource,
    );
    std::fs::write(dir.join("txn.toml"), config).unwrap();

    // A bad config is one line, and nothing starts.
    std::fs::write(
        dir.join("bad.toml"),
        "listen = \"127.0.0.1:1\"\nbogus = 1\n",
    )
    .unwrap();
    let out = writ(
        &[
            "txn",
            "run",
            "--config",
            dir.join("bad.toml").to_str().unwrap(),
        ],
        &endpoint,
        None,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bogus"), "{stderr}");

    let mut txn = Command::new(WRIT)
        .args(["txn", "run", "--config"])
        .arg(dir.join("txn.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = txn.stdout.take().unwrap();
    let _txn = Txn(txn);
    let url = format!(
        "https://{}",
        bound_address(stdout, "Transaction token service listening")
    );

    // The gateway exchanges the access token (from a file).
    std::fs::write(dir.join("access_token"), &access_token).unwrap();
    let token = ok(&writ(
        &[
            "exchange",
            "--subject-token",
            dir.join("access_token").to_str().unwrap(),
            "--scope",
            "read write",
            "--request-details",
            r#"{"order":7}"#,
            "--spiffe-id",
            "spiffe://example.org/gateway",
            "--server-id",
            "spiffe://example.org/tts",
            "--url",
            &url,
        ],
        &endpoint,
        None,
    ))
    .trim()
    .to_owned();
    assert_eq!(token.split('.').count(), 3, "{token}");

    // The planner replaces it (token on standard input), narrowed by its ceiling.
    let response: Value = serde_json::from_str(&ok(&writ(
        &[
            "exchange",
            "--subject-token",
            "-",
            "--subject-token-type",
            "txn_token",
            "--spiffe-id",
            "spiffe://example.org/agents/planner",
            "--url",
            &url,
            "--json",
        ],
        &endpoint,
        Some(&token),
    )))
    .unwrap();
    assert_eq!(
        response["issued_token_type"],
        "urn:ietf:params:oauth:token-type:txn_token"
    );
    assert_eq!(response["token_type"], "N_A");
    let replaced = response["access_token"].as_str().unwrap();

    // Decoded: claims and the chain as a tree, the planner as current actor.
    let text = ok(&writ(&["txn", "decode", replaced], &endpoint, None));
    assert!(text.contains("\"typ\": \"txntoken+jwt\""), "{text}");
    assert!(text.contains("\"scope\": \"read\""), "{text}");
    let gateway = text.find("└─ spiffe://example.org/gateway").unwrap();
    let planner = text
        .find("└─ spiffe://example.org/agents/planner (current actor)")
        .unwrap();
    assert!(gateway < planner, "{text}");
    let json: Value = serde_json::from_str(&ok(&writ(
        &["txn", "decode", "--json", "-"],
        &endpoint,
        Some(replaced),
    )))
    .unwrap();
    assert_eq!(json["claims"]["tctx"]["order"], 7);
    assert_eq!(
        json["claims"]["act"]["sub"],
        "spiffe://example.org/agents/planner"
    );
    let garbage = writ(&["txn", "decode", "not-a-token"], &endpoint, None);
    assert!(!garbage.status.success());

    // A refusal: the planner may not present an access token. One line with the code;
    // `--json` prints the RFC 6749 body.
    let token_file = dir.join("access_token");
    let args = [
        "exchange",
        "--subject-token",
        token_file.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://example.org/agents/planner",
        "--url",
        &url,
    ];
    let out = writ(&args, &endpoint, None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unauthorized_client"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = writ(&json_args, &endpoint, None);
    assert!(!out.status.success());
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["error"], "unauthorized_client");
    assert_eq!(body["status"], 403);

    // The audit log: two grants, two refusals, no token in it.
    let audit = std::fs::read_to_string(dir.join("txn/audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let decisions: Vec<&str> = lines
        .iter()
        .map(|l| l["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["granted", "granted", "refused", "refused"]);
    assert!(!audit.contains(&access_token) && !audit.contains(&token));
}
