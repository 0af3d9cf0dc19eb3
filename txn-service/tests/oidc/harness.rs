//! The OpenID Provider used by the OIDC suites: npm `oidc-provider` 9, installed by the
//! tests into `<workspace>/.interop/node` (git-ignored) and run by `provider.js` beside
//! this file. Without node/npm the tests skip with a message, unless
//! `WRIT_REQUIRE_ALL=1`, which makes them fail instead. Included by `tests/oidc.rs` and
//! `tests/exchange.rs` with `#[path]`.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test harness shared by several test crates; not every crate uses every helper"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use writ_txn_service::oidc::IssuerConfig;

pub fn require_all() -> bool {
    std::env::var("WRIT_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

pub fn skip(reason: &str) -> Option<Provider> {
    if require_all() {
        panic!("WRIT_REQUIRE_ALL=1 but the OIDC provider is unavailable: {reason}");
    }
    eprintln!("SKIPPED: OIDC interop test needs node and npm `oidc-provider` 9: {reason}");
    None
}

/// The workspace root (every crate including this file sits one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn interop_dir() -> PathBuf {
    workspace_root().join(".interop").join("node")
}

pub fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs `oidc-provider@9` once (across test processes, guarded by a lock file).
pub fn install() -> Result<PathBuf, String> {
    static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if !have("node") || !have("npm") {
                return Err("node or npm not found on PATH".to_owned());
            }
            let dir = interop_dir();
            let modules = dir.join("node_modules");
            let installed = || modules.join("oidc-provider").join("package.json").exists();
            if installed() {
                return Ok(modules);
            }
            std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
            let lock = dir.join(".install.lock");
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&lock)
                {
                    Ok(_) => break,
                    Err(_) if installed() => return Ok(modules),
                    Err(_) => {
                        // Another process installs; a lock older than 10 minutes is stale.
                        let stale = std::fs::metadata(&lock)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|m| m.elapsed().ok())
                            .is_some_and(|age| age > Duration::from_secs(600));
                        if stale {
                            let _ = std::fs::remove_file(&lock);
                        }
                        if Instant::now() > deadline {
                            return Err("timed out waiting for the npm install lock".into());
                        }
                        std::thread::sleep(Duration::from_millis(250));
                    }
                }
            }
            let result = if installed() {
                Ok(())
            } else {
                eprintln!("installing npm oidc-provider@9 into {dir:?}");
                Command::new("npm")
                    .args(["install", "--no-audit", "--no-fund", "--prefix"])
                    .arg(&dir)
                    .arg("oidc-provider@9")
                    .stdout(Stdio::null())
                    .status()
                    .map_err(|e| format!("running npm: {e}"))
                    .and_then(|s| {
                        if s.success() && installed() {
                            Ok(())
                        } else {
                            Err(format!("npm install failed ({s})"))
                        }
                    })
            };
            let _ = std::fs::remove_file(&lock);
            result.map(|()| modules)
        })
        .clone()
}

/// A running `provider.js`, killed on drop.
pub struct Provider {
    child: Child,
    pub issuer: String,
    pub client_id: String,
    client_secret: String,
    pub resource: String,
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
    pub fn start() -> Option<Self> {
        let modules = match install() {
            Ok(m) => m,
            Err(e) => return skip(&e),
        };
        let script = workspace_root().join("txn-service/tests/oidc/provider.js");
        let mut child = match Command::new("node")
            .arg(&script)
            .arg(&modules)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => return skip(&format!("starting node: {e}")),
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
            return skip("provider.js did not report its issuer");
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

    pub fn rogue_token(&self, kid: Option<&str>, now: i64) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("at+jwt".to_owned());
        header.kid = kid.map(str::to_owned);
        let key = EncodingKey::from_ec_pem(self.rogue_key_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &self.claims(now), &key).unwrap()
    }
}
