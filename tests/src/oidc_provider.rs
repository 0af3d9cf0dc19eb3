//! The OpenID Provider the OIDC suites exchange real tokens from: npm `oidc-provider` 9,
//! installed by the tests into `<workspace>/.interop/node` (git-ignored) and run by
//! `oidc_provider.js` beside this file. Without node/npm the tests skip with a message,
//! unless `WRIT_REQUIRE_ALL=1`, which makes them fail instead.
#![expect(
    clippy::indexing_slicing,
    reason = "test harness: JSON fields it wrote itself"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use writ_txn_service::oidc::IssuerConfig;

use crate::env::skip;

/// Whether `cmd --version` runs.
fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const WHAT: &str = "the OIDC provider (node and npm oidc-provider 9)";

/// Installs `oidc-provider@9` into `.interop/node` once (across test processes) and
/// returns its `node_modules`.
///
/// # Errors
/// Why it is unavailable.
pub fn install() -> Result<PathBuf, String> {
    static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if !have("node") || !have("npm") {
                return Err("node or npm not found on PATH".to_owned());
            }
            crate::env::install_once(
                "node",
                |dir| {
                    dir.join("node_modules/oidc-provider/package.json")
                        .is_file()
                },
                |staging| {
                    eprintln!("installing npm oidc-provider@9 into {}", staging.display());
                    let mut npm = Command::new("npm");
                    npm.args(["install", "--no-audit", "--no-fund", "--prefix"])
                        .arg(staging)
                        .arg("oidc-provider@9");
                    match crate::env::run_bounded(&mut npm, Duration::from_secs(600)) {
                        Some((true, _, _)) => Ok(()),
                        Some((false, _, stderr)) => Err(format!("npm install failed: {stderr}")),
                        None => Err("npm could not be started".to_owned()),
                    }
                },
            )
            .map(|dir| dir.join("node_modules"))
        })
        .clone()
}

/// A running `provider.js`, killed on drop.
pub struct Provider {
    child: Child,
    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub issuer: String,
    /// The client the tests get tokens as.
    pub client_id: String,
    client_secret: String,
    /// The resource indicator (the tokens' audience).
    pub resource: String,
    /// A key the provider does not publish, for forged tokens.
    pub rogue_key_pem: String,
    http: reqwest::Client,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Provider {
    /// Installs and starts the provider, or skips (`None`) when it cannot run.
    pub fn start() -> Option<Self> {
        let modules = match install() {
            Ok(m) => m,
            Err(e) => return skip(WHAT, e),
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/oidc_provider.js");
        let mut child = match Command::new("node")
            .arg(&script)
            .arg(&modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return skip(WHAT, format!("starting node: {e}")),
        };
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Ok(info) = serde_json::from_str::<Value>(&line) else {
            let _ = child.kill();
            let _ = child.wait();
            return skip(WHAT, "provider.js did not report its issuer");
        };
        let s = |k: &str| info[k].as_str().unwrap().to_owned();
        Some(Self {
            issuer: s("issuer"),
            client_id: s("client_id"),
            client_secret: s("client_secret"),
            resource: s("resource"),
            rogue_key_pem: s("rogue_key_pem"),
            child,
            http: reqwest::Client::new(),
        })
    }

    /// A JWT access token from the token endpoint (client_credentials + resource).
    pub async fn access_token(&self, scope: &str) -> String {
        let body = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}&resource={}",
            self.client_id,
            self.client_secret,
            scope.replace(' ', "%20"),
            self.resource.replace(':', "%3A").replace('/', "%2F"),
        );
        let response: Value = self
            .http
            .post(format!("{}/token", self.issuer))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        response["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access token: {response}"))
            .to_owned()
    }

    /// How many times the provider's JWKS was fetched.
    pub async fn jwks_hits(&self) -> u64 {
        let v: Value = self
            .http
            .get(format!("{}/__test/jwks_hits", self.issuer))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["hits"].as_u64().unwrap()
    }

    /// The TTS's `[[oidc]]` entry for this provider.
    pub fn config(&self) -> IssuerConfig {
        IssuerConfig::new(self.issuer.clone(), [self.resource.clone()])
    }

    /// Claims like the provider's, for tokens the test signs itself.
    pub fn claims(&self, now: i64) -> Value {
        json!({
            "iss": self.issuer,
            "sub": "forged",
            "aud": self.resource,
            "iat": now,
            "exp": now + 120,
            "scope": "read admin",
        })
    }

    /// A token signed with the rogue key, with `kid` in its header.
    pub fn rogue_token(&self, kid: Option<&str>, now: i64) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("at+jwt".to_owned());
        header.kid = kid.map(str::to_owned);
        let key = EncodingKey::from_ec_pem(self.rogue_key_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &self.claims(now), &key).unwrap()
    }
}
