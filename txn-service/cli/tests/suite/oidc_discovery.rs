//! OIDC discovery for JWT-SVIDs, as `writ dev` serves it: the discovery document and
//! JWKS over raw HTTP (and what it refuses), then real relying-party libraries, PyJWT's
//! `PyJWKClient` and npm `jose`'s `createRemoteJWKSet`, that start from the discovery
//! URL and verify a JWT-SVID with its `iss` and `aud`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::helper::{DevRun, jwt_claims};

const AUDIENCE: &str = "https://sts.example.com";

/// One raw HTTP/1.1 request; the status code and body.
fn http(url: &str, request: &[u8]) -> (u16, String) {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // A refused request may close the socket before the whole request was written.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn get(url: &str, path: &str) -> (u16, String) {
    http(
        url,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn mint(dev: &DevRun, audience: &str) -> String {
    dev.ok(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/workload",
        "--audience",
        audience,
    ])
    .trim()
    .to_owned()
}

#[test]
fn writ_dev_serves_discovery_and_keys_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    let url = dev.get("oidc_discovery_url");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let (code, body) = get(&url, "/.well-known/openid-configuration");
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], url.as_str());
    assert_eq!(doc["jwks_uri"], format!("{url}/keys").as_str());
    assert_eq!(
        doc["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert!(
        doc["id_token_signing_alg_values_supported"]
            .as_array()
            .unwrap()
            .contains(&"ES256".into())
    );

    let token = mint(&dev, AUDIENCE);
    let claims = jwt_claims(&token);
    assert_eq!(claims["iss"], url.as_str());
    let (code, body) = get(&url, "/keys");
    assert_eq!(code, 200);
    let jwks: Value = serde_json::from_str(&body).unwrap();
    let kid = {
        use base64::Engine as _;
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .unwrap(),
        )
        .unwrap();
        header["kid"].as_str().unwrap().to_owned()
    };
    let keys = jwks["keys"].as_array().unwrap();
    assert!(keys.iter().any(|k| k["kid"] == kid.as_str()), "{jwks}");
    for k in keys {
        assert_eq!(k["use"], "sig");
        assert!(k.get("d").is_none() && k.get("x5c").is_none(), "{k}");
    }

    assert_eq!(get(&url, "/nope").0, 404);
    assert_eq!(get(&url, "/.well-known/openid-configuration/x").0, 404);
    let post =
        b"POST /keys HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
    assert_eq!(http(&url, post).0, 405);
    let huge = format!(
        "GET /keys HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let (code, _) = http(&url, huge.as_bytes());
    assert!(
        code == 431 || code == 0,
        "a huge request is refused: {code}"
    );
    let garbage = b"\x16\x03\x01\x02\x00garbage\r\n\r\n";
    assert_ne!(http(&url, garbage).0, 200);
    // Still serving after all that.
    assert_eq!(get(&url, "/keys").0, 200);
}

const PYJWT_CHECK: &str = r#"
import json, sys, urllib.request
import jwt
url, token, audience = sys.argv[1], sys.argv[2], sys.argv[3]
doc = json.load(urllib.request.urlopen(url + "/.well-known/openid-configuration"))
client = jwt.PyJWKClient(doc["jwks_uri"])
key = client.get_signing_key_from_jwt(token)
claims = jwt.decode(token, key.key, algorithms=doc["id_token_signing_alg_values_supported"],
                    audience=audience, issuer=doc["issuer"])
try:
    jwt.decode(token, key.key, algorithms=["ES256"], audience="someone-else", issuer=doc["issuer"])
    print("WRONG AUDIENCE ACCEPTED")
    sys.exit(1)
except jwt.InvalidAudienceError:
    pass
try:
    jwt.decode(token, key.key, algorithms=["ES256"], audience=audience, issuer="https://evil.example")
    print("WRONG ISSUER ACCEPTED")
    sys.exit(1)
except jwt.InvalidIssuerError:
    pass
print(claims["sub"])
"#;

#[test]
fn pyjwt_verifies_a_jwt_svid_through_discovery() {
    let py = writ_tests::python::python();
    if !writ_tests::env::available("PyJWT (with py-spiffe)", py.is_some()) {
        return;
    }
    let py = py.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    let token = mint(&dev, AUDIENCE);
    let out = Command::new(&py.exe)
        .args(["-c", PYJWT_CHECK])
        .arg(dev.get("oidc_discovery_url"))
        .arg(&token)
        .arg(AUDIENCE)
        .env("PYTHONPATH", &py.site)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "spiffe://example.org/workload"
    );
}

/// npm `jose` (v6, ESM), installed explicitly into `.interop/jose`.
fn jose() -> Option<std::path::PathBuf> {
    let runs = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !runs("node") || !runs("npm") {
        return writ_tests::env::skip("npm jose", "node or npm not found on PATH");
    }
    let installed = writ_tests::env::install_once(
        "jose",
        |dir| dir.join("node_modules/jose/package.json").is_file(),
        |staging| {
            let mut npm = Command::new("npm");
            npm.args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(staging)
                .arg("jose@6");
            match writ_tests::env::run_bounded(&mut npm, Duration::from_secs(600)) {
                Some((true, _, _)) => Ok(()),
                Some((false, _, stderr)) => Err(format!("npm install jose failed: {stderr}")),
                None => Err("npm could not be started".to_owned()),
            }
        },
    );
    match installed {
        Ok(dir) => Some(dir),
        Err(e) => writ_tests::env::skip("npm jose", e),
    }
}

const JOSE_CHECK: &str = r#"
const { createRequire } = require('module');
const { pathToFileURL } = require('url');
const [dir, url, token, audience] = process.argv.slice(1);
const r = createRequire(dir + '/');
(async () => {
  const jose = await import(pathToFileURL(r.resolve('jose')).href);
  const doc = await (await fetch(url + '/.well-known/openid-configuration')).json();
  const jwks = jose.createRemoteJWKSet(new URL(doc.jwks_uri));
  const { payload } = await jose.jwtVerify(token, jwks, { issuer: doc.issuer, audience });
  let refused = false;
  try { await jose.jwtVerify(token, jwks, { issuer: 'https://evil.example', audience }); }
  catch (e) { refused = e.code === 'ERR_JWT_CLAIM_VALIDATION_FAILED'; }
  if (!refused) { console.log('WRONG ISSUER ACCEPTED'); process.exit(1); }
  console.log(payload.sub);
})().catch((e) => { console.error(e); process.exit(1); });
"#;

#[test]
fn node_jose_verifies_a_jwt_svid_through_discovery() {
    let Some(dir) = jose() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dev = DevRun::start(&tmp.path().join("dev"));
    let token = mint(&dev, AUDIENCE);
    let out = Command::new("node")
        .args(["-e", JOSE_CHECK])
        .arg(&dir)
        .arg(dev.get("oidc_discovery_url"))
        .arg(&token)
        .arg(AUDIENCE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "spiffe://example.org/workload"
    );
}

/// `writ server run` with `[ca] jwt_issuer` and `[oidc_discovery]` over HTTPS: the JWKS
/// holds the key of the JWT-SVID it mints, whose `iss` is the configured issuer.
#[test]
fn writ_server_serves_discovery_over_https_from_its_config() {
    if !writ_tests::env::available(
        "curl",
        Command::new("curl").arg("--version").output().is_ok(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("oidc.crt"), dir.path().join("oidc.key"));
    crate::common::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    let config = format!(
        "[ca]\njwt_issuer = \"https://oidc.example.org/\"\n\
         [oidc_discovery]\nlisten = \"127.0.0.1:0\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    );
    std::fs::write(dir.path().join("server.toml"), config).unwrap();
    let socket = dir.path().join("server.sock");
    let mut child = Command::new(crate::common::WRIT)
        .args(["server", "run", "--config"])
        .arg(dir.path().join("server.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--server-socket")
        .arg(&socket)
        .args(["--bind-address", ""])
        .env_remove("WRIT_SERVER_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let addr = crate::common::bound_address(stderr, "OIDC discovery ready");
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let fetch = |path: &str| {
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "10"])
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&cert)
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let doc = fetch("/.well-known/openid-configuration");
    assert_eq!(doc["issuer"], "https://oidc.example.org");
    assert_eq!(doc["jwks_uri"], "https://oidc.example.org/keys");

    let mut token = String::new();
    for _ in 0..100 {
        let out = Command::new(crate::common::WRIT)
            .args(["jwt", "mint", "--spiffe-id", "spiffe://example.org/w"])
            .args(["--audience", AUDIENCE, "--server-socket"])
            .arg(&socket)
            .output()
            .unwrap();
        if out.status.success() {
            token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!token.is_empty(), "writ jwt mint never succeeded");
    assert_eq!(jwt_claims(&token)["iss"], "https://oidc.example.org");
    let keys = fetch("/keys");
    assert!(!keys["keys"].as_array().unwrap().is_empty(), "{keys}");
    let _ = child.kill();
    let _ = child.wait();
}
