//! The recipes in `examples/recipes/` run for real against `writ dev` (the `writ`
//! binary): the Python gateway (py-spiffe) exchanges a user token at the token service
//! and calls the Python service (PyJWT), and the Node gateway (the files
//! `writ api fetch x509 --write` makes) calls the Node service (`jose`), each TLS
//! connection verified with the bundle as CA, the host name and the peer's SPIFFE ID.
//! The service accepts the right `sub` and `req_wl`, and refuses a caller it does not
//! allow; the gateway refuses a server whose name or SPIFFE ID is not the one it dialed.
//! py-spiffe installs into `.interop/py`, `jose@5` into `.interop/node-jose`; without
//! python3 or node/npm the tests skip (and fail under `WRIT_REQUIRE_ALL=1`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use writ_tests::env::{available, install_once, run_bounded, skip, workspace_root};

use crate::common::{WRIT, bound_address, uid};
use crate::tls_names::{Dev, have};

const TD: &str = "spiffe://example.org";
const TTS_ID: &str = "spiffe://example.org/writ/tts";

fn recipe(lang: &str, file: &str) -> PathBuf {
    workspace_root()
        .join("examples/recipes")
        .join(lang)
        .join(file)
}

/// A running recipe service, killed on drop.
struct Service {
    child: Child,
    port: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let addr = bound_address(child.stdout.take().unwrap(), "listening on");
        let port = addr.rsplit(':').next().unwrap().to_owned();
        Self { child, port }
    }
}

/// What a gateway run did.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a gateway to completion (bounded).
fn run(mut command: Command) -> Ran {
    let (ok, stdout, stderr) =
        run_bounded(&mut command, Duration::from_secs(120)).expect("the gateway starts");
    Ran { ok, stdout, stderr }
}

fn accepted(out: &Ran) -> Value {
    assert!(out.ok, "the chain failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

fn refused(out: &Ran, because: &[&str]) {
    assert!(!out.ok, "accepted: {}", out.stdout);
    assert!(
        because.iter().any(|b| out.stderr.contains(b)),
        "refused, but not for {because:?}: {}",
        out.stderr
    );
}

/// The arguments both gateways take.
fn gateway_args(
    dev: &Dev,
    token_file: &Path,
    service_port: &str,
    service_host: &str,
    lang: &str,
) -> Vec<String> {
    vec![
        "--tts-url".into(),
        format!("https://localhost:{}", dev.tts_port()),
        "--tts-id".into(),
        TTS_ID.into(),
        "--service-url".into(),
        format!("https://{service_host}:{service_port}"),
        "--service-id".into(),
        format!("{TD}/recipes/{lang}/service"),
        "--subject-token-file".into(),
        token_file.to_str().unwrap().into(),
        "--scope".into(),
        "orders.read".into(),
    ]
}

fn service_args(dev: &Dev, lang: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--issuer".into(),
        dev.field("tts_url"),
        "--jwks-url".into(),
        format!("https://localhost:{}/.well-known/jwks.json", dev.tts_port()),
        "--allow-caller".into(),
        format!("{TD}/recipes/{lang}/gateway"),
    ]
}

/// Registers gateway, service (valid for `localhost` only) and stranger for `selectors`.
fn register_recipe(dev: &Dev, lang: &str, selectors: &[String]) {
    for name in ["gateway", "stranger"] {
        dev.register(&format!("{TD}/recipes/{lang}/{name}"), selectors);
    }
    let mut args = vec![
        "entry".to_owned(),
        "create".into(),
        "--spiffe-id".into(),
        format!("{TD}/recipes/{lang}/service"),
        "--dns-name".into(),
        "localhost".into(),
    ];
    for s in selectors {
        args.extend(["--selector".into(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    dev.ok(&args);
}

fn check_chain(
    lang: &str,
    gateway: impl Fn(&[String]) -> Ran,
    dev: &Dev,
    token_file: &Path,
    service: &Service,
) {
    let base = gateway_args(dev, token_file, &service.port, "localhost", lang);
    let me = format!("{TD}/recipes/{lang}/gateway");
    let id = |name: &str| format!("{TD}/recipes/{lang}/{name}");

    // gateway -> TTS -> service, every hop verified.
    let answer = accepted(&gateway(&with(&base, &[("--spiffe-id", &me)])));
    assert_eq!(answer["sub"], "alice");
    assert_eq!(answer["req_wl"], me.as_str());
    assert_eq!(answer["caller"], me.as_str());
    assert_eq!(answer["scope"], "orders.read");

    // A caller the service does not allow: refused by the service.
    let out = gateway(&with(&base, &[("--spiffe-id", &id("stranger"))]));
    refused(&out, &["403", "not allowed"]);
    // The service dialed by a name its SVID lacks (only `localhost`): the gateway's TLS refuses.
    let mut by_ip = gateway_args(dev, token_file, &service.port, "127.0.0.1", lang);
    by_ip.extend(["--spiffe-id".into(), me.clone()]);
    refused(
        &gateway(&by_ip),
        &[
            "IP address mismatch",
            "certificate verify failed",
            "IP: 127.0.0.1 is not in the cert",
        ],
    );
    // The token service is not the SPIFFE ID the gateway expects.
    let out = gateway(&with(
        &base,
        &[
            ("--spiffe-id", &me),
            ("--tts-id", "spiffe://example.org/not-the-tts"),
        ],
    ));
    refused(&out, &["not spiffe://example.org/not-the-tts"]);
}

/// `base` with each `(flag, value)` replaced or appended.
fn with(base: &[String], pairs: &[(&str, &str)]) -> Vec<String> {
    let mut out = base.to_vec();
    for (flag, value) in pairs {
        match out.iter().position(|a| a == flag) {
            Some(i) => out[i + 1] = (*value).to_owned(),
            None => out.extend([(*flag).to_owned(), (*value).to_owned()]),
        }
    }
    out
}

fn user_token(dev: &Dev, dir: &Path) -> PathBuf {
    let file = dir.join("user.jwt");
    std::fs::write(&file, dev.login("alice", "orders.read")).unwrap();
    file
}

#[test]
fn python_gateway_and_service_verify_every_hop() {
    let Some(py) = writ_tests::python::python() else {
        available("python3 with py-spiffe", false);
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("dev"), "127.0.0.1:0");
    let selectors = [
        format!("unix:uid:{}", uid()),
        format!("unix:path:{}", py.exe.display()),
    ];
    register_recipe(&dev, "py", &selectors);
    let token_file = user_token(&dev, tmp.path());
    let python = |script: &str, args: &[String]| {
        let mut c = Command::new(&py.exe);
        c.arg(recipe("python", script))
            .args(args)
            .env("PYTHONPATH", &py.site)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("SPIFFE_ENDPOINT_SOCKET", dev.field("workload_api"));
        c
    };
    let mut args = service_args(&dev, "py");
    args.extend(["--spiffe-id".into(), format!("{TD}/recipes/py/service")]);
    let service = Service::start(python("service.py", &args));
    check_chain(
        "py",
        |args| run(python("gateway.py", args)),
        &dev,
        &token_file,
        &service,
    );
}

/// npm `jose` 5 (CommonJS, and an `agent` for the JWKS's TLS) in `.interop/node-jose`.
fn jose() -> Option<PathBuf> {
    if !have("node") || !have("npm") {
        return skip("node and npm (the Node recipes)", "not found on PATH");
    }
    let installed = install_once(
        "node-jose",
        |dir| dir.join("node_modules/jose/package.json").is_file(),
        |staging| {
            let mut npm = Command::new("npm");
            npm.args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(staging)
                .arg("jose@5");
            match run_bounded(&mut npm, Duration::from_secs(600)) {
                Some((true, _, _)) => Ok(()),
                Some((false, _, stderr)) => Err(format!("npm install jose@5 failed: {stderr}")),
                None => Err("npm could not be started".to_owned()),
            }
        },
    );
    match installed {
        Ok(dir) => Some(dir.join("node_modules")),
        Err(e) => skip("npm jose", e),
    }
}

#[test]
fn node_gateway_and_service_verify_every_hop() {
    let Some(modules) = jose() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dev = Dev::start(&tmp.path().join("dev"), "127.0.0.1:0");
    // The files come from `writ api fetch x509 --write`: the `writ` binary is the workload.
    let writ = std::fs::canonicalize(WRIT).unwrap();
    let selectors = [
        format!("unix:uid:{}", uid()),
        format!("unix:path:{}", writ.display()),
    ];
    register_recipe(&dev, "node", &selectors);
    let all = tmp.path().join("all");
    let out = Command::new(WRIT)
        .args([
            "api",
            "fetch",
            "x509",
            "--socket",
            &dev.field("workload_api"),
            "--output",
            "json",
            "--write",
        ])
        .arg(&all)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svids: Value = serde_json::from_slice(&out.stdout).unwrap();
    // One directory per identity, with the names `fetch --write` (and `watch --write`) use.
    let dir_of = |name: &str| {
        let id = format!("{TD}/recipes/node/{name}");
        let svid = svids
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["spiffe_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no SVID for {id}: {svids}"));
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (field, file) in [
            ("svid_file", "svid.0.pem"),
            ("key_file", "svid.0.key"),
            ("bundle_file", "bundle.0.pem"),
        ] {
            std::fs::copy(svid[field].as_str().unwrap(), dir.join(file)).unwrap();
        }
        dir
    };
    let token_file = user_token(&dev, tmp.path());
    let node = |script: &str, svid_dir: &Path, args: &[String]| {
        let mut c = Command::new("node");
        c.arg(recipe("node", script))
            .arg("--svid-dir")
            .arg(svid_dir)
            .args(args)
            .env("NODE_PATH", &modules);
        c
    };
    let service = Service::start(node(
        "service.js",
        &dir_of("service"),
        &service_args(&dev, "node"),
    ));
    let (gateway_dir, stranger_dir) = (dir_of("gateway"), dir_of("stranger"));
    check_chain(
        "node",
        |args| {
            // The Node gateway is whoever its files say: `--spiffe-id` picks the directory.
            let i = args.iter().position(|a| a == "--spiffe-id").unwrap();
            let dir = if args[i + 1].ends_with("/stranger") {
                &stranger_dir
            } else {
                &gateway_dir
            };
            let mut rest = args.to_vec();
            rest.drain(i..i + 2);
            run(node("gateway.js", dir, &rest))
        },
        &dev,
        &token_file,
        &service,
    );
}
