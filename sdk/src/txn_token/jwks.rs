//! The transaction token service's signing keys as a JWKS (RFC 7517), and where a
//! verifier gets them: given once, read from a file, or fetched from the service.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ED25519, ParsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use writ_spiffe::bundle::{Jwk, parse_strict_json};

use crate::jwks::FetchError;

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys accepted in one JWKS.
pub const MAX_JWKS_KEYS: usize = crate::jwks::MAX_KEYS;
/// Longest a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// Larger than [`MAX_JWKS_BYTES`] or with more than [`MAX_JWKS_KEYS`] keys.
    #[error("JWKS is larger than {MAX_JWKS_BYTES} bytes or {MAX_JWKS_KEYS} keys")]
    TooLarge,
    /// Not a JWKS.
    #[error("malformed JWKS: {0}")]
    Malformed(String),
    /// The file could not be read.
    #[error("cannot read the JWKS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The URL could not be fetched.
    #[error("cannot fetch the JWKS from {url}: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// One usable verification key, parsed once when the JWKS is loaded (so a verification
/// does no key parsing: see the `guards` test target).
#[derive(Clone)]
pub(crate) struct VerifyKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: ParsedPublicKey,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("alg", &self.alg).finish()
    }
}

/// A parsed JWKS: key id -> public key. Only keys a Txn-Token may be signed with are
/// kept (EC P-256 for ES256, Ed25519 for EdDSA); other keys are skipped, so a service
/// that publishes more kinds of keys does not break its verifiers.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: BTreeMap<String, Jwk>,
    usable: BTreeMap<String, VerifyKey>,
}

impl Jwks {
    /// Parses a JWKS document (`{"keys": [...]}`, every key with a `kid`).
    ///
    /// ```
    /// let jwks = writ_sdk::txn_token::Jwks::parse(br#"{"keys": [{"kty": "EC",
    ///     "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
    ///     "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
    ///     "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"}]}"#).unwrap();
    /// assert!(jwks.keys().contains_key("k1"));
    /// ```
    ///
    /// # Errors
    /// [`JwksError`] if the document is too large, not strict JSON, has a key without
    /// `kid`, or names a `kid` twice.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let text =
            std::str::from_utf8(bytes).map_err(|_| JwksError::Malformed("not UTF-8".into()))?;
        let doc = parse_strict_json(text).map_err(|e| JwksError::Malformed(e.to_string()))?;
        let entries = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or_else(|| JwksError::Malformed("no \"keys\" array".into()))?;
        if entries.len() > MAX_JWKS_KEYS {
            return Err(JwksError::TooLarge);
        }
        let mut keys = BTreeMap::new();
        for entry in entries {
            let kid = entry
                .get("kid")
                .and_then(|k| k.as_str())
                .filter(|k| !k.is_empty())
                .ok_or_else(|| JwksError::Malformed("a key has no \"kid\"".into()))?;
            if entry.get("use").is_some_and(|u| u != "sig") {
                continue;
            }
            let jwk: Jwk = serde_json::from_value(entry.clone())
                .map_err(|e| JwksError::Malformed(format!("key {kid}: {e}")))?;
            if keys.insert(kid.to_owned(), jwk).is_some() {
                return Err(JwksError::Malformed(format!("kid {kid} appears twice")));
            }
        }
        Ok(Self::from_keys(keys))
    }

    /// A JWKS of these keys.
    pub fn from_keys(keys: BTreeMap<String, Jwk>) -> Self {
        let usable = keys
            .iter()
            .filter_map(|(kid, jwk)| Some((kid.clone(), verify_key(jwk)?)))
            .collect();
        Self { keys, usable }
    }

    /// Every key, by id.
    pub fn keys(&self) -> &BTreeMap<String, Jwk> {
        &self.keys
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&VerifyKey> {
        self.usable.get(kid)
    }
}

/// The key and the one algorithm it may verify, for the kinds of keys Txn-Tokens use.
fn verify_key(jwk: &Jwk) -> Option<VerifyKey> {
    let alg = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => Algorithm::ES256,
        ("OKP", Some("Ed25519")) => Algorithm::EdDSA,
        _ => return None,
    };
    let coordinate = |c: &Option<String>| {
        let text = c.as_deref()?;
        // A P-256 coordinate and an Ed25519 key are both 32 bytes (43 base64url chars).
        if text.len() != 43 {
            return None;
        }
        URL_SAFE_NO_PAD.decode(text).ok()
    };
    let key = match alg {
        Algorithm::ES256 => {
            let mut point = vec![0x04];
            point.extend(coordinate(&jwk.x)?);
            point.extend(coordinate(&jwk.y)?);
            ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).ok()?
        }
        _ => ParsedPublicKey::new(&ED25519, coordinate(&jwk.x)?).ok()?,
    };
    Some(VerifyKey { alg, key })
}

/// Where a [`super::TxnVerifier`] gets the service's keys.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum JwksSource {
    /// Fixed keys.
    Keys(Jwks),
    /// A JWKS file, read again at each refresh.
    File(PathBuf),
    /// The service's JWKS URL, fetched with this client (for the Writ service, an mTLS
    /// client: see [`crate::exchange::TxnClient::jwks_source`]).
    Url {
        /// The URL.
        url: String,
        /// The HTTP client.
        http: reqwest::Client,
    },
}

impl JwksSource {
    /// Loads the current JWKS.
    ///
    /// # Errors
    /// [`JwksError`] if it cannot be read, fetched or parsed.
    pub async fn load(&self) -> Result<Jwks, JwksError> {
        match self {
            Self::Keys(jwks) => Ok(jwks.clone()),
            Self::File(path) => {
                let read = |source| JwksError::Read {
                    path: path.clone(),
                    source,
                };
                let meta = tokio::fs::metadata(path).await.map_err(read)?;
                if meta.len() > MAX_JWKS_BYTES as u64 {
                    return Err(JwksError::TooLarge);
                }
                Jwks::parse(&tokio::fs::read(path).await.map_err(read)?)
            }
            Self::Url { url, http } => {
                let body = crate::jwks::fetch(http, url, MAX_JWKS_BYTES, FETCH_TIMEOUT)
                    .await
                    .map_err(|e| match e {
                        FetchError::TooLarge { .. } => JwksError::TooLarge,
                        e => JwksError::Fetch {
                            url: url.clone(),
                            reason: e.to_string(),
                        },
                    })?;
                Jwks::parse(&body)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: &str = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
    const Y: &str = "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM";

    fn key(kid: &str) -> String {
        format!(r#"{{"kty":"EC","crv":"P-256","kid":"{kid}","x":"{X}","y":"{Y}"}}"#)
    }

    #[test]
    fn parses_and_refuses_garbage() {
        let ok = Jwks::parse(format!(r#"{{"keys":[{}]}}"#, key("a")).as_bytes());
        assert!(ok.is_ok_and(|j| j.get("a").is_some_and(|k| k.alg == Algorithm::ES256)));
        for bad in [
            "".to_owned(),
            "[]".to_owned(),
            r#"{"keys": {}}"#.to_owned(),
            r#"{"keys": [{"kty": "EC"}]}"#.to_owned(),
            format!(r#"{{"keys":[{},{}]}}"#, key("a"), key("a")),
            format!(r#"{{"keys":[{}], "keys": []}}"#, key("a")),
            r#"{"keys":[{"kid":"a","kty":7}]}"#.to_owned(),
        ] {
            assert!(
                matches!(Jwks::parse(bad.as_bytes()), Err(JwksError::Malformed(_))),
                "{bad}"
            );
        }
        let many = vec![key("k"); MAX_JWKS_KEYS + 1].join(",");
        assert!(matches!(
            Jwks::parse(format!(r#"{{"keys":[{many}]}}"#).as_bytes()),
            Err(JwksError::TooLarge)
        ));
        assert!(matches!(
            Jwks::parse(&vec![b' '; MAX_JWKS_BYTES + 1]),
            Err(JwksError::TooLarge)
        ));
    }

    #[test]
    fn skips_keys_txn_tokens_cannot_use() {
        let doc = format!(
            r#"{{"keys":[{}, {{"kid":"enc","use":"enc","kty":"EC","crv":"P-256","x":"{X}","y":"{Y}"}},
            {{"kid":"p384","kty":"EC","crv":"P-384","x":"{X}","y":"{Y}"}}]}}"#,
            key("a")
        );
        let jwks = Jwks::parse(doc.as_bytes()).unwrap_or_default();
        assert!(jwks.get("a").is_some());
        assert!(jwks.get("enc").is_none() && !jwks.keys().contains_key("enc"));
        assert!(jwks.get("p384").is_none());
    }
}
