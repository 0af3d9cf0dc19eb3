//! `specs/openapi.yaml` against a live transaction token service.
//!
//! A real identity server and agent issue the SVIDs; the TTS starts from a `txn.toml`
//! as `writ txn run` would. Schemathesis (PyPI, pinned, installed into
//! `.interop/schemathesis`) then generates requests from the spec for every operation
//! and checks that every response is one the spec allows: no 5xx, a documented status,
//! the documented content type, a body matching the schema, the documented headers.
//! Schemathesis cannot mint a valid subject token, so a real replacement exchange is
//! driven from Rust and its response checked against the spec's `200` with the same
//! JSON Schema engine (`jsonschema_rs`).
//!
//! The TTS's certificate carries the DNS name `localhost` (from its registration
//! entry), so Python's hostname check passes with the trust bundle as the only CA.
//! Without Python and pip it skips, unless `WRIT_REQUIRE_ALL=1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use writ_identity::clock::{Clock, SystemClock};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_tests::env::{run_bounded, workspace_root};
use writ_tests::python::{Python, SCHEMATHESIS_VERSION, schemathesis};
use writ_tests::{Stack, available, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};

const TD: &str = "example.org";
const ISSUER: &str = "https://tts.example.org";
const TTS: &str = "/tts";
const CALLER: &str = "/gateway";
const OPERATIONS: [&str; 3] = [
    "POST /token",
    "GET /.well-known/jwks.json",
    "GET /.well-known/oauth-authorization-server",
];
/// The checks a spec-conformant server passes whatever it is sent.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_schema_conformance,response_headers_conformance";
/// Longest the Schemathesis run may take before the test fails.
const SCHEMATHESIS_TIMEOUT: Duration = Duration::from_secs(300);

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://{TD}{path}")).unwrap()
}

fn spec_path() -> PathBuf {
    workspace_root().join("specs/openapi.yaml")
}

/// A TTS whose policy lets the caller replace Txn-Tokens (`read`, `write`), and the
/// caller's SVID, key and trust bundle as PEM files.
struct Tts {
    /// Keeps the identity server and agent running.
    _stack: Stack,
    server: TxnServer,
    caller: X509Source,
    pem: tempfile::TempDir,
    port: u16,
}

impl Tts {
    async fn start() -> Self {
        let stack = Stack::start(Duration::from_secs(3600)).await;
        stack
            .register_with(TTS, &[&uid_selector()], |e| {
                e.dns_names = vec!["localhost".into()];
            })
            .await;
        stack.register(CALLER, &[&uid_selector()]).await;
        let toml = format!(
            r#"
listen = "127.0.0.1:0"
issuer = "{ISSUER}"
workload_api = "{}"
spiffe_id = "spiffe://{TD}{TTS}"
data_dir = "{}"

[[policy.caller]]
id = "spiffe://{TD}{CALLER}"
subject_token_types = ["txn_token"]
max_scope = ["read", "write"]
"#,
            stack.endpoint(),
            stack.dir.path().join("txn").display(),
        );
        let config = TxnConfig::from_toml(&toml, stack.dir.path()).unwrap();
        let server = TxnServer::start(config).await.unwrap();
        let caller = X509Source::builder()
            .endpoint(stack.endpoint())
            .spiffe_id(id(CALLER))
            .build()
            .await
            .unwrap();
        let pem = tempfile::tempdir().unwrap();
        let svid = caller.svid();
        std::fs::write(pem.path().join("svid.pem"), svid.chain_pem()).unwrap();
        std::fs::write(
            pem.path().join("svid.key"),
            svid.private_key.as_ref().unwrap().to_pem().as_bytes(),
        )
        .unwrap();
        let bundle = caller.bundle(&TrustDomain::new(TD).unwrap()).unwrap();
        std::fs::write(pem.path().join("bundle.pem"), bundle.to_pem()).unwrap();
        let port = server.addr.port();
        Self {
            _stack: stack,
            server,
            caller,
            pem,
            port,
        }
    }

    /// The base URL under the name in the TTS's certificate.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.pem.path().join(name)
    }

    /// An mTLS client holding the caller's SVID that accepts only the TTS's SPIFFE ID.
    fn http(&self) -> reqwest::Client {
        writ_sdk::tls::http_client(&self.caller, Authorizer::id(id(TTS))).unwrap()
    }

    /// A Txn-Token for alice as the service would issue it to another workload.
    fn initial_token(&self) -> String {
        let now = SystemClock.unix_seconds();
        let claims = TxnToken {
            iss: ISSUER.into(),
            iat: now,
            exp: now + 300,
            aud: TD.into(),
            txn: "4b0e5d0c-8a43-4f0e-9a55-0d4c1f2f9e61".into(),
            sub: "alice".into(),
            scope: "read write".into(),
            req_wl: id("/frontend").to_string(),
            tctx: Some(BTreeMap::from([("order".into(), json!(42))])),
            rctx: None,
            act: None,
        };
        self.server.service.keys().mint(&claims).unwrap()
    }
}

fn python_available() -> Option<Python> {
    let py = schemathesis();
    available(
        &format!("python3 with pip (schemathesis {SCHEMATHESIS_VERSION})"),
        py.is_some(),
    )
    .then(|| py.unwrap())
}

fn python_command(py: &Python, cwd: &Path) -> Command {
    let mut cmd = Command::new(&py.exe);
    cmd.arg("-s")
        .current_dir(cwd)
        .env("PYTHONPATH", &py.site)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("NO_COLOR", "1")
        .env_remove("SCHEMATHESIS_HOOKS");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_every_response_conformant_to_the_spec() {
    let Some(py) = python_available() else {
        return;
    };
    let tts = Tts::start().await;
    let work = tempfile::tempdir().unwrap();
    let report = work.path().join("events.ndjson");
    let mut cmd = python_command(&py, work.path());
    cmd.args(["-m", "schemathesis.cli", "run"])
        .arg(spec_path())
        .arg("--url")
        .arg(tts.url())
        .arg("--request-cert")
        .arg(tts.file("svid.pem"))
        .arg("--request-cert-key")
        .arg(tts.file("svid.key"))
        .arg("--tls-verify")
        .arg(tts.file("bundle.pem"))
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "50"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        .args(["--generation-database", "none"])
        .args(["--report", "ndjson", "--report-ndjson-path"])
        .arg(&report)
        .arg("--no-color");
    let command_line = format!("{cmd:?}");
    // A run whose only trouble is a transport error (the server closed a connection the
    // fuzzer was still writing to: Python reports an SSL EOF) says nothing about the
    // responses; it is run again once, and a second one fails the test.
    let mut attempt = 0;
    let (ok, stdout, stderr) = loop {
        attempt += 1;
        let started = Instant::now();
        let mut run = python_command(&py, work.path());
        run.args(cmd.get_args());
        let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
            run_bounded(&mut run, SCHEMATHESIS_TIMEOUT).expect("python3 runs")
        })
        .await
        .unwrap();
        eprintln!(
            "{command_line}\nrun {attempt} took {:?}\n{stdout}",
            started.elapsed()
        );
        let transport_only = !ok
            && stdout.contains("Network Error")
            && !stdout.contains("FAILURES")
            && !stdout.contains("Failed checks");
        if transport_only && attempt == 1 {
            eprintln!("run {attempt}: a network error only; running again");
            continue;
        }
        break (ok, stdout, stderr);
    };
    assert!(
        ok,
        "schemathesis found responses the spec does not allow (or could not run):\n\
         {stdout}\n{stderr}"
    );

    // Every operation was called, and every selected check ran on its responses.
    let events = std::fs::read_to_string(&report).unwrap();
    let mut checked: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut statuses: BTreeMap<String, BTreeMap<u64, usize>> = BTreeMap::new();
    for line in events.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        let (kind, body) = event.as_object().unwrap().iter().next().unwrap();
        assert!(
            !kind.contains("Error"),
            "schemathesis reported an error: {line}"
        );
        let Some(recorder) = body.get("recorder").filter(|_| kind == "ScenarioFinished") else {
            continue;
        };
        let label = recorder["label"].as_str().unwrap().to_owned();
        for checks in recorder["checks"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            for check in checks.as_array().unwrap() {
                assert_eq!(check["status"], "success", "{label}: {check}");
                *checked
                    .entry(label.clone())
                    .or_default()
                    .entry(check["name"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
        }
        for interaction in recorder["interactions"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            if let Some(status) = interaction["response"]["status_code"].as_u64() {
                *statuses
                    .entry(label.clone())
                    .or_default()
                    .entry(status)
                    .or_default() += 1;
            }
        }
    }
    eprintln!("statuses per operation: {statuses:?}");
    for operation in OPERATIONS {
        let ran = checked
            .get(operation)
            .unwrap_or_else(|| panic!("schemathesis never checked {operation}: {checked:?}"));
        for check in CHECKS.split(',') {
            assert!(
                ran.get(check).is_some_and(|n| *n > 0),
                "{operation}: check {check} never ran: {ran:?}"
            );
        }
    }
    let token = &checked["POST /token"];
    assert!(
        token["response_schema_conformance"] >= 50,
        "too few POST /token cases: {token:?}"
    );
    // The client certificate reached the service: the policy, which matches the caller's
    // SPIFFE ID, refused some requests (a caller without one gets 401).
    assert!(
        statuses["POST /token"].contains_key(&403),
        "no request reached the policy: {statuses:?}"
    );
}

/// Checks responses against the spec: the status is documented, the content type is one
/// the response declares, the body matches its schema (`jsonschema_rs`, with the spec
/// as the root so `$ref`s resolve) and every declared header is present when required
/// and matches its schema. `validate.py SPEC RESPONSES`: RESPONSES is a JSON file
/// `[{method, path, status, headers, body}]`; prints one line per violation.
const VALIDATE: &str = r##"
import json, sys
import jsonschema_rs, yaml

spec = yaml.safe_load(open(sys.argv[1], encoding="utf-8"))

def escape(s):
    return s.replace("~", "~0").replace("/", "~1")

def resolve(obj, pointer):
    while isinstance(obj, dict) and "$ref" in obj:
        pointer = obj["$ref"][1:]
        obj = spec
        for part in pointer[1:].split("/"):
            obj = obj[part.replace("~1", "/").replace("~0", "~")]
    return obj, pointer

def validator(pointer):
    root = dict(spec)
    root["$ref"] = "#" + pointer
    return jsonschema_rs.validator_for(root)

errors = []
for case in json.load(open(sys.argv[2], encoding="utf-8")):
    method = case["method"].lower()
    where = "%s %s -> %s" % (case["method"], case["path"], case["status"])
    responses = spec["paths"][case["path"]][method]["responses"]
    status = str(case["status"])
    if status not in responses:
        errors.append(where + ": status not documented")
        continue
    response, pointer = resolve(
        responses[status], "/paths/%s/%s/responses/%s" % (escape(case["path"]), method, status))
    media = case["headers"].get("content-type", "").split(";")[0].strip()
    if media not in response.get("content", {}):
        errors.append("%s: content type %r not documented" % (where, media))
    else:
        schema = "%s/content/%s/schema" % (pointer, escape(media))
        errors += ["%s: body: %s" % (where, e) for e in validator(schema).iter_errors(case["body"])]
    for name, header in response.get("headers", {}).items():
        header, header_pointer = resolve(header, "%s/headers/%s" % (pointer, escape(name)))
        value = case["headers"].get(name.lower())
        if value is None:
            if header.get("required"):
                errors.append("%s: header %s missing" % (where, name))
            continue
        if header["schema"].get("type") == "integer":
            try:
                value = int(value)
            except ValueError:
                errors.append("%s: header %s is not an integer: %r" % (where, name, value))
                continue
        validate = validator(header_pointer + "/schema")
        errors += ["%s: header %s: %s" % (where, name, e) for e in validate.iter_errors(value)]
for e in errors:
    print(e)
sys.exit(1 if errors else 0)
"##;

/// One response as the validator reads it.
async fn observed(method: &str, path: &str, response: reqwest::Response) -> Value {
    let status = response.status().as_u16();
    let mut headers = serde_json::Map::new();
    for name in response.headers().keys() {
        let values: Vec<&str> = response
            .headers()
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        headers.insert(name.as_str().to_owned(), Value::from(values.join(", ")));
    }
    let body: Value = response.json().await.unwrap();
    json!({"method": method, "path": path, "status": status, "headers": headers, "body": body})
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_and_refusals_match_the_spec() {
    let Some(py) = python_available() else {
        return;
    };
    let tts = Tts::start().await;
    let http = tts.http();
    let base = format!("https://127.0.0.1:{}", tts.port);
    let post = |body: Vec<u8>, content_type: &'static str| {
        http.post(format!("{base}/token"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let old = tts.initial_token();
    let replacement = |scope: &str| {
        form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:txn_token",
            ),
            ("audience", TD),
            ("scope", scope),
            ("subject_token", &old),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:txn_token",
            ),
        ])
        .into_bytes()
    };
    const FORM: &str = "application/x-www-form-urlencoded";

    let mut cases = Vec::new();
    // A real replacement: 200.
    let granted = observed(
        "POST",
        "/token",
        post(replacement("read"), FORM).await.unwrap(),
    )
    .await;
    assert_eq!(granted["status"], 200, "{granted}");
    assert_eq!(granted["body"]["token_type"], "N_A");
    assert_eq!(
        granted["body"]["issued_token_type"],
        "urn:ietf:params:oauth:token-type:txn_token"
    );
    assert_eq!(granted["headers"]["cache-control"], "no-store");
    cases.push(granted.clone());
    // Garbage, a JSON body, a foreign grant, a wider scope: 400 with their codes.
    let refusals: [(Vec<u8>, &str, &str); 4] = [
        (
            b"\xff\xfe%%%&&==garbage\x00".to_vec(),
            FORM,
            "invalid_request",
        ),
        (
            br#"{"grant_type":"urn:ietf:params:oauth:grant-type:token-exchange"}"#.to_vec(),
            "application/json",
            "invalid_request",
        ),
        (
            b"grant_type=password&username=alice&password=x".to_vec(),
            FORM,
            "unsupported_grant_type",
        ),
        (replacement("read admin"), FORM, "invalid_scope"),
    ];
    for (body, content_type, code) in refusals {
        let refused = observed("POST", "/token", post(body, content_type).await.unwrap()).await;
        assert_eq!(refused["status"], 400, "{refused}");
        assert_eq!(refused["body"]["error"], code, "{refused}");
        cases.push(refused);
    }
    // The discovery documents.
    let mut jwks = Value::Null;
    for path in OPERATIONS.iter().filter_map(|o| o.strip_prefix("GET ")) {
        let seen = observed(
            "GET",
            path,
            http.get(format!("{base}{path}")).send().await.unwrap(),
        )
        .await;
        assert_eq!(seen["status"], 200, "{seen}");
        if path.ends_with("jwks.json") {
            jwks = seen["body"].clone();
        }
        cases.push(seen);
    }

    // The replacement is a Txn-Token the JWKS verifies, with the caller as the actor.
    let verifier = TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::Keys(Jwks::parse(jwks.to_string().as_bytes()).unwrap()),
    )
    .build();
    let token = verifier
        .verify_at(
            granted["body"]["access_token"].as_str().unwrap(),
            std::time::SystemTime::now(),
        )
        .unwrap();
    assert_eq!(token.scope, "read");
    assert_eq!(token.req_wl, id(CALLER).to_string());
    assert_eq!(
        token.chain(),
        [id(CALLER).as_str(), id("/frontend").as_str()]
    );

    // Every response against the spec, in Python with Schemathesis's schema engine.
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("responses.json");
    std::fs::write(&input, Value::from(cases).to_string()).unwrap();
    let script = work.path().join("validate.py");
    std::fs::write(&script, VALIDATE).unwrap();
    let mut cmd = python_command(&py, work.path());
    cmd.arg(&script).arg(spec_path()).arg(&input);
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || run_bounded(&mut cmd, Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("python3 runs");
    assert!(
        ok,
        "responses that do not match specs/openapi.yaml:\n{stdout}\n{stderr}"
    );
}
