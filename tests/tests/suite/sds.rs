//! Envoy SDS v3 on the agent socket against the official Envoy API protos (PyPI
//! `xds-protos`, with grpcio) from Python 3: `tests/interop/py/sds_client.py` streams
//! secrets, ACKs, sees rotations, NACKs, sends a bogus nonce and asks for a name it does
//! not hold; a stranger gets PermissionDenied. Envoy itself is not run here.
//!
//! xds-protos is installed on first use into `<workspace>/.interop/xds`; py-spiffe's
//! install (`.interop/py`) provides `cryptography` to parse the certificates. Without
//! Python, pip or the registry the tests skip, or fail under `WRIT_REQUIRE_ALL=1`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use writ_identity::proto::envoy::service::discovery::v3 as discovery;
use writ_identity::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use writ_tests::python::{Python, python, xds};
use writ_tests::{Stack, available, uid_selector};

const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);
const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// xds-protos and py-spiffe's site (for `cryptography`), or `None` to skip.
fn sites_or_skip() -> Option<(Python, PathBuf)> {
    let xds = xds();
    if !available("xds-protos (Python)", xds.is_some()) {
        return None;
    }
    let py = python();
    if !available("py-spiffe (Python, for cryptography)", py.is_some()) {
        return None;
    }
    let xds = xds?;
    let py_site = py?.site;
    Some((xds, py_site))
}

async fn run_script(py: &Python, extra_site: &Path, stack: &Stack, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/py/sds_client.py");
    let path = std::env::join_paths([py.site.as_path(), extra_site]).unwrap();
    let mut cmd = tokio::process::Command::new(&py.exe);
    cmd.arg("-s")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", path)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SPIFFE_ENDPOINT_SOCKET", stack.endpoint())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("sds_client.py did not finish within {SCRIPT_TIMEOUT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "sds_client.py failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("sds_client.py printed no JSON:\n{stdout}\n{stderr}"));
    serde_json::from_str(line).unwrap()
}

async fn wait_for_svids(stack: &Stack, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.len() < n {
        assert!(Instant::now() < deadline, "entries did not reach the agent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sds_client(socket: PathBuf) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    let channel = writ_tests::uds_channel(socket).await;
    SecretDiscoveryServiceClient::new(channel)
}

fn request(names: &[&str]) -> discovery::DiscoveryRequest {
    discovery::DiscoveryRequest {
        resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    }
}

/// The names of a response's secrets, sorted.
fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> = v["secrets"].as_object().unwrap().keys().cloned().collect();
    n.sort();
    n
}

#[tokio::test]
async fn envoy_protos_client_streams_acks_rotates_and_nacks() {
    let Some((py, py_site)) = sites_or_skip() else {
        return;
    };
    // SVIDs live 4 s, so the agent renews them at about 2 s.
    let stack = Stack::start(Duration::from_secs(4)).await;
    let path = format!("unix:path:{}", py.exe.display());
    // Same uid, another binary: neither Python nor anyone else here gets it.
    stack
        .register(
            "/sds/never",
            &[&uid_selector(), "unix:path:/nonexistent/envoy"],
        )
        .await;
    wait_for_svids(&stack, 1).await;

    // A stranger: Python matching no entry gets PermissionDenied, not someone's secret.
    let out = run_script(&py, &py_site, &stack, &["stranger"]).await;
    eprintln!("stranger saw: {out}");
    assert_eq!(out["stream"], "StatusCode.PERMISSION_DENIED");
    assert_eq!(out["fetch"], "StatusCode.PERMISSION_DENIED");

    let id = "spiffe://example.org/sds/envoy";
    stack
        .register("/sds/envoy", &[&uid_selector(), &path])
        .await;
    wait_for_svids(&stack, 2).await;

    // This test process (no header sent either) has the uid but not the path.
    let mut client = sds_client(stack.socket()).await;
    let err = client
        .fetch_secrets(request(&["default"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = client
        .stream_secrets(futures::stream::iter([request(&[])]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    let out = run_script(&py, &py_site, &stack, &["stream", id, "30"]).await;
    eprintln!("sds client saw: {out}");
    assert_eq!(out["errors"], serde_json::json!([]));
    let all = ["ALL", "ROOTCA", "default", id];
    let first = &out["first"];
    assert_eq!(names(first), all);
    assert_eq!(first["secrets"][id]["uris"], serde_json::json!([id]));
    assert_eq!(first["secrets"]["default"]["uris"], serde_json::json!([id]));
    assert_eq!(first["secrets"]["default"]["has_key"], true);
    assert_eq!(first["secrets"]["ROOTCA"]["kind"], "trusted_ca");
    assert!(first["secrets"]["ROOTCA"]["cas"].as_u64().unwrap() >= 1);
    assert_eq!(
        first["secrets"]["ALL"]["validator"],
        "envoy.tls.cert_validator.spiffe"
    );
    assert_eq!(
        first["secrets"]["ALL"]["trust_domains"],
        serde_json::json!(["example.org"])
    );
    assert!(!first["nonce"].as_str().unwrap().is_empty());

    // The bogus nonce's names never took effect; the rotation came with a new version
    // and nonce.
    let rotated = &out["rotated"];
    assert_eq!(names(rotated), all);
    assert_ne!(rotated["version"], first["version"]);
    assert_ne!(rotated["nonce"], first["nonce"]);
    assert_ne!(
        rotated["secrets"]["default"]["serial"],
        first["secrets"]["default"]["serial"]
    );

    // After the NACK the stream stayed up and the next rotation arrived.
    let after = &out["after_nack"];
    assert_eq!(names(after), all);
    let v = |x: &Value| x["version"].as_str().unwrap().parse::<u64>().unwrap();
    assert!(v(after) > v(rotated));

    // A name the caller does not hold: nothing for it, the rest still served.
    assert_eq!(names(&out["widened"]), all);

    // FetchSecrets.
    assert_eq!(names(&out["fetch_default"]), ["default"]);
    assert_eq!(
        out["fetch_all_names"],
        serde_json::json!(["ALL", "spiffe://example.org", id])
    );
    assert_eq!(out["delta"], "StatusCode.UNIMPLEMENTED");
}
