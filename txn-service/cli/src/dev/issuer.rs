//! The development OpenID Provider of `writ dev`: an ES256 key, an OpenID discovery
//! document and a JWKS on a loopback HTTP port, and [`DevIssuer::access_token`], which
//! `writ dev login` uses to mint a user's access token (RFC 9068, `typ: at+jwt`).
//!
//! It is for trying the whole chain with no other software. Every token it mints carries
//! the claim [`DEV_TOKEN_CLAIM`] (`"writ_dev": true`), and every OIDC validator refuses
//! such tokens unless `writ dev` built it ([`writ_txn_service::oidc::OidcOptions::accept_dev_tokens`]
//! cannot be set from `txn.toml`). There is no login page and no password: whoever can
//! read the key file (0600, in the data dir) can mint tokens for any user.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};
use writ_identity::key_manager::PrivateKey;

use writ_txn_service::oidc::DEV_TOKEN_CLAIM;
use writ_txn_service::txn_token::{Minter, jwk_with_kid};

/// The audience of the tokens it mints, which `writ dev`'s token service accepts.
pub const DEV_AUDIENCE: &str = "writ-dev";
/// The longest lifetime `writ dev login` may ask for (1 hour).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest user name accepted.
pub const MAX_USER_BYTES: usize = 256;
/// The most scopes one token may carry.
pub const MAX_SCOPES: usize = 64;
/// The longest scope accepted.
pub const MAX_SCOPE_BYTES: usize = 128;

/// Why the development issuer could not start or mint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevIssuerError {
    /// The key file could not be read, parsed or written.
    #[error("development OIDC key {path}: {reason}")]
    Key {
        /// The key file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The listener could not be bound.
    #[error("development OIDC issuer on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A login request was refused.
    #[error("{0}")]
    Login(String),
}

/// The development issuer: its signing key and (once started) its URL.
#[derive(Debug)]
pub struct DevIssuer {
    minter: Minter,
    url: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Loads the key at `path`, creating it (0600) on first use.
///
/// # Errors
/// [`DevIssuerError::Key`] if the file is unreadable or not an EC P-256 key.
fn load_or_create_key(path: &Path) -> Result<Minter, DevIssuerError> {
    let err = |reason: String| DevIssuerError::Key {
        path: path.display().to_string(),
        reason,
    };
    let key = match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_pem(&text).map_err(|e| err(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = PrivateKey::generate().map_err(|e| err(e.to_string()))?;
            writ_identity::key_manager::write_secret_file(path, key.to_pem().as_bytes())
                .map_err(|e| err(e.to_string()))?;
            key
        }
        Err(e) => return Err(err(e.to_string())),
    };
    Minter::new(key).map_err(|e| err(e.to_string()))
}

impl DevIssuer {
    /// The issuer at `url` with the key kept in `key_file`, not serving (what
    /// `writ dev login` uses to mint).
    ///
    /// # Errors
    /// [`DevIssuerError::Key`] if the key cannot be loaded or created.
    pub fn open(key_file: &Path, url: impl Into<String>) -> Result<Self, DevIssuerError> {
        Ok(Self {
            minter: load_or_create_key(key_file)?,
            url: url.into(),
            task: None,
        })
    }

    /// Loads (or creates) the key in `key_file` and serves discovery and the JWKS on
    /// `listen` (plain HTTP; the validator allows that for loopback hosts only) until
    /// dropped. The issuer URL is `http://<bound address>`.
    ///
    /// # Errors
    /// [`DevIssuerError`] if the key cannot be loaded or the address cannot be bound.
    pub async fn start(key_file: &Path, listen: SocketAddr) -> Result<Self, DevIssuerError> {
        let minter = load_or_create_key(key_file)?;
        let bind_err = |source| DevIssuerError::Bind {
            addr: listen,
            source,
        };
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(bind_err)?;
        let url = format!("http://{}", tcp.local_addr().map_err(bind_err)?);
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}/jwks"),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "token_endpoint_auth_methods_supported": ["none"],
            DEV_TOKEN_CLAIM: true,
        });
        let jwks = json!({ "keys": [jwk_with_kid(minter.jwk(), minter.kid())] });
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route("/jwks", get(move || async move { Json(jwks) }));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::error!(error = %e, "development OIDC issuer stopped");
            }
        });
        Ok(Self {
            minter,
            url,
            task: Some(task),
        })
    }

    /// The issuer URL (`iss`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Mints an access token for `user` with `scope` (space-separated), valid for `ttl`
    /// from `now` (Unix seconds).
    ///
    /// # Errors
    /// [`DevIssuerError::Login`] for an empty, overlong or control-character user, a
    /// malformed scope, or a lifetime of zero or over [`MAX_TOKEN_TTL`].
    pub fn access_token(
        &self,
        user: &str,
        scope: &str,
        ttl: Duration,
        now: i64,
    ) -> Result<String, DevIssuerError> {
        let refuse = |m: &str| Err(DevIssuerError::Login(m.to_owned()));
        if user.is_empty() || user.len() > MAX_USER_BYTES || user.chars().any(char::is_control) {
            return refuse("--user must be 1-256 bytes without control characters");
        }
        let scopes: Vec<&str> = scope.split_whitespace().collect();
        if scopes.len() > MAX_SCOPES
            || scopes.iter().any(|s| {
                s.len() > MAX_SCOPE_BYTES
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
            })
        {
            return refuse(
                "--scope must be at most 64 space-separated scopes of printable ASCII (RFC 6749 §3.3)",
            );
        }
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return refuse("--ttl must be between 1s and 1h");
        }
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let claims: Value = json!({
            "iss": self.url,
            "sub": user,
            "aud": DEV_AUDIENCE,
            "scope": scopes.join(" "),
            "iat": now,
            "exp": now.saturating_add(ttl),
            "jti": uuid::Uuid::new_v4().to_string(),
            "client_id": "writ-dev-login",
            DEV_TOKEN_CLAIM: true,
        });
        self.minter
            .sign("at+jwt", &claims)
            .map_err(|e| DevIssuerError::Login(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> (tempfile::TempDir, DevIssuer) {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open(&dir.path().join("key.pem"), "http://127.0.0.1:1").unwrap();
        (dir, issuer)
    }

    #[test]
    fn the_key_persists_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, first) = issuer();
        let path = dir.path().join("key.pem");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = DevIssuer::open(&path, "http://127.0.0.1:1").unwrap();
        assert_eq!(first.minter.kid(), again.minter.kid());
    }

    #[test]
    fn tokens_are_marked_as_development_tokens() {
        let (_dir, issuer) = issuer();
        let token = issuer
            .access_token(
                "alice",
                "docs.read  docs.summarize",
                Duration::from_secs(60),
                1000,
            )
            .unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["scope"], "docs.read docs.summarize");
        assert_eq!(claims["exp"], 1060);
        assert_eq!(claims[DEV_TOKEN_CLAIM], true);
        assert_eq!(claims["aud"], DEV_AUDIENCE);
    }

    #[test]
    fn bad_login_requests_are_refused() {
        let (_dir, issuer) = issuer();
        let minute = Duration::from_secs(60);
        for (user, scope, ttl) in [
            ("", "a", minute),
            ("a\nb", "a", minute),
            (&*"u".repeat(300), "a", minute),
            ("alice", "a\"b", minute),
            ("alice", &*"s ".repeat(65), minute),
            ("alice", "a", Duration::ZERO),
            ("alice", "a", Duration::from_secs(7200)),
        ] {
            let err = issuer.access_token(user, scope, ttl, 0).unwrap_err();
            assert!(
                matches!(err, DevIssuerError::Login(_)),
                "{user:?} {scope:?}"
            );
        }
    }
}
