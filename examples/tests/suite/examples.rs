//! The example programs as a user runs them: the built `mtls_hello` and `verify_service`
//! binaries as child processes against a real identity server and agent (the
//! `writ-tests` harness), with Txn-Tokens minted by the transaction token service's
//! own signing code.
//!
//! Every identity is registered for `unix:uid:<uid>`, so each child process gets all of
//! them and picks its own with `--spiffe-id`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use writ_identity::clock::{Clock, SystemClock};
use writ_sdk::SpiffeId;
use writ_sdk::exchange::TxnClient;
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::txn_token::{Actor, HEADER, TxnToken};
use writ_sdk::workload::X509Source;
use writ_tests::{Stack, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::txn_token::SigningKeys;

const HELLO: &str = env!("CARGO_BIN_EXE_mtls_hello");
const VERIFY: &str = env!("CARGO_BIN_EXE_verify_service");
/// Longest wait for a ready line or a client run.
const WAIT: Duration = Duration::from_secs(20);

const HELLO_SERVER: &str = "/hello-server";
const HELLO_CLIENT: &str = "/hello-client";
const OUTSIDER: &str = "/outsider";
const ORDERS: &str = "/orders";
const GATEWAY: &str = "/gateway";
const INGRESS: &str = "/ingress";
const TTS: &str = "/tts";

fn id(path: &str) -> String {
    format!("spiffe://example.org{path}")
}

/// A stack with `paths` registered for this uid.
async fn stack_with(paths: &[&str]) -> Stack {
    let stack = Stack::start(Duration::from_secs(3600)).await;
    for path in paths {
        stack.register(path, &[&uid_selector()]).await;
    }
    stack
}

/// A server child process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its SPIFFE ID, from the ready line.
    id: String,
    /// Kept open so the child never writes to a closed pipe.
    _stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `bin` with `args` and waits for `listening on <addr> as <id>`.
    async fn start(bin: &str, args: &[&str], endpoint: &str) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .env("SPIFFE_ENDPOINT_SOCKET", endpoint)
            // Failed TLS handshakes are logged at debug.
            .env("WRIT_LOG", "info,writ_sdk::listener=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        let stderr_done = tokio::spawn(async move {
            while let Ok(Some(line)) = err_lines.next_line().await {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = match tokio::time::timeout(WAIT, stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => {
                // Stop the child so its stderr ends, and report all of it.
                let _ = child.kill().await;
                let _ = tokio::time::timeout(WAIT, stderr_done).await;
                panic!(
                    "{bin} printed no ready line ({other:?}); stderr:\n{}",
                    stderr.lock().unwrap()
                )
            }
        };
        let (addr, id) = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_once(" as "))
            .unwrap_or_else(|| panic!("not a ready line: {line:?}"));
        Self {
            addr: addr.parse().unwrap(),
            id: id.to_owned(),
            child,
            _stdout: stdout,
            stderr,
        }
    }

    /// Its stderr once it holds `needle` (waiting up to [`WAIT`]).
    async fn stderr_containing(&self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.stderr.lock().unwrap().clone();
            if text.contains(needle) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {needle:?} on stderr:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    /// Sends SIGTERM and asserts a clean exit.
    async fn terminate(mut self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("the server did not stop on SIGTERM")
            .unwrap();
        assert!(
            exit.success(),
            "exit {exit:?}; stderr:\n{}",
            self.stderr.lock().unwrap()
        );
    }
}

/// Runs `mtls_hello client` to completion (with `--socket`, not the environment).
async fn hello_client(endpoint: &str, args: &[&str]) -> Output {
    let run = Command::new(HELLO)
        .arg("client")
        .args(["--socket", endpoint])
        .args(args)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("mtls_hello client did not finish")
        .unwrap()
}

/// `mtls_hello client` as `client_id`, calling `server`'s `/hello` and expecting it to
/// be `server_id`.
async fn hello_as(stack: &Stack, server: &Server, server_id: &str, client_id: &str) -> Output {
    hello_client(
        &stack.endpoint(),
        &[
            "--url",
            &server.url("/hello"),
            "--server-id",
            server_id,
            "--spiffe-id",
            client_id,
        ],
    )
    .await
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the run failed with one `error: ...` line on stderr and nothing on stdout.
fn assert_refused(o: &Output) {
    assert!(!o.status.success(), "expected a failure: {}", stdout(o));
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
    let err = stderr(o);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "stderr: {err}");
}

async fn hello_server(stack: &Stack, allow: &[&str]) -> Server {
    let server_id = id(HELLO_SERVER);
    let mut args = vec![
        "server",
        "--listen",
        "127.0.0.1:0",
        "--spiffe-id",
        &server_id,
    ];
    args.extend_from_slice(allow);
    let server = Server::start(HELLO, &args, &stack.endpoint()).await;
    assert_eq!(server.id, server_id);
    server
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_answers_an_allowed_client_and_stops_on_sigterm() {
    let stack = stack_with(&[HELLO_SERVER, HELLO_CLIENT]).await;
    let client_id = id(HELLO_CLIENT);
    let server = hello_server(&stack, &["--allow", &client_id]).await;
    let out = hello_as(&stack, &server, &id(HELLO_SERVER), &client_id).await;
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("hello {client_id}\n"));
    server.terminate().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_refuses_a_client_it_does_not_allow() {
    let stack = stack_with(&[HELLO_SERVER, HELLO_CLIENT, OUTSIDER]).await;
    let server = hello_server(&stack, &["--allow", &id(HELLO_CLIENT)]).await;
    let out = hello_as(&stack, &server, &id(HELLO_SERVER), &id(OUTSIDER)).await;
    assert_refused(&out);
    // TLS 1.3: the server refuses the client certificate after the client's side of the
    // handshake is done, so the client sees either the alert or a connection closed
    // before its request went out. The server's log says why.
    let log = server.stderr_containing("TLS handshake failed").await;
    assert!(log.contains(&id(OUTSIDER)), "{log}");
    assert!(log.contains("not authorized"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_client_refuses_a_server_with_another_id() {
    let stack = stack_with(&[HELLO_SERVER, HELLO_CLIENT]).await;
    let server = hello_server(&stack, &["--allow", &id(HELLO_CLIENT)]).await;
    let out = hello_as(&stack, &server, &id("/somebody-else"), &id(HELLO_CLIENT)).await;
    assert_refused(&out);
    assert!(
        stderr(&out).contains("is not authorized"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_allows_a_whole_trust_domain() {
    let stack = stack_with(&[HELLO_SERVER, OUTSIDER]).await;
    let server = hello_server(&stack, &["--allow-trust-domain", "example.org"]).await;
    let out = hello_as(&stack, &server, &id(HELLO_SERVER), &id(OUTSIDER)).await;
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("hello {}\n", id(OUTSIDER)));
}

fn txn_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:08x}-0000-4000-8000-000000000000")
}

/// A token for alice, requested by the ingress and passed on to the gateway.
fn claims(scope: &str) -> TxnToken {
    let now = SystemClock.unix_seconds();
    TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: "example.org".into(),
        txn: txn_id(),
        sub: "alice".into(),
        scope: scope.into(),
        req_wl: id(GATEWAY),
        tctx: None,
        rctx: None,
        act: Some(Actor::new(id(GATEWAY)).acting_for(Actor::new(id(INGRESS)))),
    }
}

fn write_jwks(path: &Path, keys: &SigningKeys) {
    std::fs::write(path, serde_json::to_vec(&keys.jwks()).unwrap()).unwrap();
}

fn signing_keys() -> SigningKeys {
    SigningKeys::ephemeral(
        Arc::new(SystemClock),
        Duration::from_secs(3600),
        Duration::from_secs(900),
    )
    .unwrap()
}

/// An mTLS client presenting `who`'s SVID to the orders service.
async fn client_as(stack: &Stack, who: &str) -> (X509Source, reqwest::Client) {
    let source = X509Source::builder()
        .endpoint(stack.endpoint())
        .spiffe_id(SpiffeId::new(&id(who)).unwrap())
        .build()
        .await
        .unwrap();
    let http = tls::http_client(&source, Authorizer::id(SpiffeId::new(&id(ORDERS)).unwrap()));
    (source, http.unwrap())
}

async fn get_orders(
    client: &reqwest::Client,
    server: &Server,
    token: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = client.get(server.url("/orders"));
    if let Some(token) = token {
        request = request.header(HEADER, token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.json().await.unwrap(), headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_service_requires_a_known_caller_and_a_valid_token() {
    let stack = stack_with(&[ORDERS, GATEWAY, OUTSIDER]).await;
    let keys = signing_keys();
    let jwks = stack.dir.path().join("jwks.json");
    write_jwks(&jwks, &keys);
    let server = Server::start(
        VERIFY,
        &[
            "--listen",
            "127.0.0.1:0",
            "--trust-domain",
            "example.org",
            "--jwks-file",
            jwks.to_str().unwrap(),
            "--allow",
            &id(GATEWAY),
            "--scope",
            "orders.read",
            "--strict",
            "--spiffe-id",
            &id(ORDERS),
        ],
        &stack.endpoint(),
    )
    .await;
    assert_eq!(server.id, id(ORDERS));
    let (_gateway_source, gateway) = client_as(&stack, GATEWAY).await;

    let txn = claims("orders.read orders.write");
    let token = keys.mint(&txn).unwrap();
    let (status, body, _) = get_orders(&gateway, &server, Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({
            "user": "alice",
            "caller": id(GATEWAY),
            "txn": txn.txn,
            "scope": "orders.read orders.write",
            "chain": [id(GATEWAY), id(INGRESS)],
        })
    );

    let (status, body, headers) = get_orders(&gateway, &server, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "missing_txn_token", "{body}");
    assert_eq!(headers["www-authenticate"], "Txn-Token");

    let narrow = keys.mint(&claims("orders.write")).unwrap();
    let (status, body, _) = get_orders(&gateway, &server, Some(&narrow)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("insufficient_scope"))
    );

    // A member of the trust domain passes TLS but is not an allowed caller.
    let (_outsider_source, outsider) = client_as(&stack, OUTSIDER).await;
    let (status, body, _) = get_orders(&outsider, &server, Some(&token)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("caller_not_allowed"))
    );

    // The service rotates its key and publishes both: a token with the new `kid` makes
    // the verifier read the file again.
    keys.rotate().unwrap();
    write_jwks(&jwks, &keys);
    let rotated = keys.mint(&claims("orders.read")).unwrap();
    let (status, body, _) = get_orders(&gateway, &server, Some(&rotated)).await;
    assert_eq!(status, 200, "{body}");

    // A key the service never published.
    let forged = signing_keys().mint(&claims("orders.read")).unwrap();
    let (status, body, _) = get_orders(&gateway, &server, Some(&forged)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_txn_token"))
    );

    // The hello client can carry a token too: the command docs/sdk.md shows.
    let token_file = stack.dir.path().join("txn.jwt");
    std::fs::write(&token_file, &token).unwrap();
    let out = hello_client(
        &stack.endpoint(),
        &[
            "--url",
            &server.url("/orders"),
            "--server-id",
            &id(ORDERS),
            "--spiffe-id",
            &id(GATEWAY),
            "--txn-token",
            token_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let printed: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed["user"], "alice");
    let out = hello_client(
        &stack.endpoint(),
        &[
            "--url",
            &server.url("/orders"),
            "--server-id",
            &id(ORDERS),
            "--spiffe-id",
            &id(GATEWAY),
        ],
    )
    .await;
    assert_refused(&out);
    assert!(
        stderr(&out).contains("missing_txn_token"),
        "{}",
        stderr(&out)
    );

    server.terminate().await;
}

/// A transaction token service in this process that lets the gateway replace tokens.
async fn tts(stack: &Stack) -> TxnServer {
    let toml = format!(
        r#"
listen = "127.0.0.1:0"
issuer = "https://tts.example.org"
workload_api = "{}"
spiffe_id = "{}"
audit_log = "{}"

[[policy.caller]]
id = "{}"
subject_token_types = ["txn_token"]
max_scope = ["orders.read"]
"#,
        stack.endpoint(),
        id(TTS),
        stack.dir.path().join("audit.log").display(),
        id(GATEWAY),
    );
    let config = TxnConfig::from_toml(&toml, stack.dir.path()).unwrap();
    TxnServer::start(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_service_fetches_the_keys_from_the_tts() {
    let stack = stack_with(&[TTS, ORDERS, GATEWAY]).await;
    let tts = tts(&stack).await;
    let jwks_url = format!("https://{}/.well-known/jwks.json", tts.addr);
    let verify = |tts_id: String| {
        let endpoint = stack.endpoint();
        let jwks_url = jwks_url.clone();
        async move {
            Server::start(
                VERIFY,
                &[
                    "--listen",
                    "127.0.0.1:0",
                    "--trust-domain",
                    "example.org",
                    "--jwks-url",
                    &jwks_url,
                    "--tts-id",
                    &tts_id,
                    "--allow",
                    &id(GATEWAY),
                    "--strict",
                    "--spiffe-id",
                    &id(ORDERS),
                ],
                &endpoint,
            )
            .await
        }
    };
    let server = verify(id(TTS)).await;

    // The ingress got alice's token; the gateway replaces it, naming itself, before it
    // calls on (strict chaining), and narrows the scope on the way.
    let mut original = claims("orders.read orders.write");
    original.req_wl = id(INGRESS);
    original.act = None;
    let token = tts.service.keys().mint(&original).unwrap();
    let (gateway_source, gateway) = client_as(&stack, GATEWAY).await;
    let exchange = TxnClient::new(
        &gateway_source,
        &format!("https://{}", tts.addr),
        id(TTS).parse().unwrap(),
    )
    .unwrap();
    let replaced = exchange.replace(&token, Some("orders.read")).await.unwrap();

    let (status, body, _) = get_orders(&gateway, &server, Some(&replaced.access_token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["txn"], original.txn.as_str());
    assert_eq!(body["scope"], "orders.read");
    assert_eq!(body["chain"], json!([id(GATEWAY), id(INGRESS)]));
    // Not replaced: the gateway is not the token's current actor.
    let (status, body, _) = get_orders(&gateway, &server, Some(&token)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("not_current_actor"))
    );

    // The JWKS is fetched only from the service named by --tts-id.
    let wrong = verify(id("/not-the-tts")).await;
    let (status, body, _) = get_orders(&gateway, &wrong, Some(&replaced.access_token)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("keys_unavailable"))
    );
}
