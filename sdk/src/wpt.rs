//! Sender-constrained hops: WIT-SVIDs and WIMSE Workload Proof Tokens.
//!
//! Where mTLS does not reach end to end (a TLS-terminating proxy, a gateway, a queue),
//! a Txn-Token alone is a bearer token: whoever copies it can use it. On such hops the
//! caller also sends its WIT-SVID (`Workload-Identity-Token`, which binds its SPIFFE ID
//! to a key it holds, see [`writ_spiffe::svid::wit`]) and a Workload Proof Token
//! (`Workload-Proof-Token`, draft-ietf-wimse-wpt-02): a JWT signed with that key, typed
//! `wpt+jwt`, whose `aud` is the target URI (without query or fragment), `exp` a few
//! seconds ahead, `jti` random, `wth` the SHA-256 of the WIT and `tth` the SHA-256 of the
//! Txn-Token (both base64url). The receiver ([`WptVerifier`], and `TxnLayer::with_proof`
//! in [`crate::middleware`]) checks:
//!
//! * the WIT against the trust domain's WIT-SVID keys ([`WitBundles`]: `typ`, `alg`,
//!   `kid`, signature, `exp`, `sub` a SPIFFE ID, `cnf.jwk`), remembered by its SHA-256
//!   until it expires or the bundles are replaced;
//! * the WPT: `typ: wpt+jwt`, `alg` equal to `cnf.jwk.alg`, the signature with
//!   `cnf.jwk`, `aud` equal to one of the service's configured base URIs followed by the
//!   request path (never taken from `Host`), `exp` not passed and at most
//!   [`MAX_LIFETIME`] ahead, `jti` not seen before (a bounded replay cache, keyed by WIT
//!   subject and `jti`, remembers it until it expires), `wth` the presented WIT, `tth`
//!   the presented Txn-Token, no `oth` entries (none are understood here);
//! * and, in the middleware, that the WIT's subject is the Txn-Token's current actor.
//!
//! A copied Txn-Token is then useless without the caller's key; a copied WIT and WPT are
//! useless for another token, another URI, after a few seconds, or a second time.
//!
//! ```no_run
//! use writ_sdk::wpt::{WitSvid, WptVerifier};
//! use writ_sdk::spiffe::svid::wit::WitBundles;
//! # fn demo(wit: String, key_jwk: &str, txn: &str, bundles: WitBundles)
//! #     -> Result<(), writ_sdk::wpt::WptError> {
//! let now = std::time::SystemTime::now();
//! // The caller: its WIT-SVID (from the Workload API) proves each request.
//! let svid = WitSvid::new(wit, key_jwk)?;
//! let wpt = svid.proof("https://orders.internal/orders/42", Some(txn), now)?;
//! // The receiver: trusts its trust domain's WIT keys and knows its own base URI.
//! let verifier = WptVerifier::new(bundles, "https://orders.internal");
//! let proof = verifier.verify(svid.token(), &wpt, "/orders/42", Some(txn))?;
//! assert_eq!(&proof.caller, svid.spiffe_id());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde::{Deserialize, Serialize};
use writ_spiffe::clock::{SharedClock, SystemClock, unix_seconds};
use writ_spiffe::fingerprint::sha256;
use writ_spiffe::spiffe_id::SpiffeId;
use writ_spiffe::svid::wit::{self, Wit, WitBundles, WitError, WitKey};

/// The HTTP header that carries the WIT (draft-ietf-wimse-workload-creds).
pub const WIT_HEADER: &str = "Workload-Identity-Token";
/// The HTTP header that carries the WPT (draft-ietf-wimse-wpt).
pub const WPT_HEADER: &str = "Workload-Proof-Token";
/// The `typ` of a WPT (media type `application/wpt+jwt`).
pub const TYP: &str = "wpt+jwt";
/// Largest WPT accepted, in bytes.
pub const MAX_WPT_BYTES: usize = 4 * 1024;
/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_BYTES: usize = 256;
/// Longest `aud` accepted, in bytes.
pub const MAX_AUD_BYTES: usize = 2048;
/// Furthest ahead of now a WPT's `exp` may be (plus [`SKEW`]): a proof valid longer is
/// refused ("WPT lifetimes MUST be short").
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);
/// Lifetime of the WPTs [`WitSvid::proof`] makes.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(30);
/// Clock skew tolerated on `exp` being too far ahead and on `iat`.
pub const SKEW: Duration = Duration::from_secs(5);
/// Default capacity of the replay cache (`jti`s remembered until they expire).
pub const DEFAULT_REPLAY_CAPACITY: usize = 100_000;
/// Most validated WITs remembered (by SHA-256, until they expire or the bundles change):
/// a caller sends the same WIT with every request.
pub const WIT_CACHE_CAPACITY: usize = 1024;

/// Why a WIT/WPT pair was refused, or a WPT could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WptError {
    /// No `Workload-Identity-Token` or no `Workload-Proof-Token` header, or more than
    /// one of either.
    #[error("exactly one Workload-Identity-Token and one Workload-Proof-Token header are required")]
    Headers,
    /// The WIT was refused.
    #[error("{0}")]
    Wit(#[from] WitError),
    /// The WPT is larger than allowed.
    #[error("WPT is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Not a well-formed JWS with a JSON header and claims.
    #[error("WPT is malformed: {0}")]
    Malformed(String),
    /// `typ` is not `wpt+jwt`.
    #[error("WPT header typ {0:?} is not wpt+jwt")]
    Type(String),
    /// `alg` is not the WIT's `cnf.jwk.alg`.
    #[error("WPT alg {0:?} is not the WIT's cnf.jwk.alg")]
    Algorithm(String),
    /// The header carries `crit`.
    #[error("the WPT header names critical extensions")]
    Critical,
    /// The signature does not verify with the WIT's key.
    #[error("WPT signature does not verify with the WIT's key")]
    Signature,
    /// A required claim is missing or malformed.
    #[error("WPT claim {0} is missing or malformed")]
    Claim(&'static str),
    /// `aud` is not this request's target URI.
    #[error("WPT aud is not this request's URI")]
    Audience,
    /// `exp` has passed.
    #[error("WPT has expired")]
    Expired,
    /// `exp` is further ahead than allowed, or `iat` is in the future.
    #[error("WPT lifetime exceeds {max_secs} s")]
    TooLong {
        /// The limit, in seconds.
        max_secs: u64,
    },
    /// `wth` is not the hash of the presented WIT.
    #[error("WPT wth does not match the presented WIT")]
    WitHash,
    /// `tth` is missing or not the hash of the presented Txn-Token.
    #[error("WPT tth does not match the presented Txn-Token")]
    TxnTokenHash,
    /// `oth` names tokens this verifier does not understand.
    #[error("WPT oth names tokens this service does not understand")]
    OtherTokens,
    /// The `jti` was seen before.
    #[error("WPT was already used (replayed jti)")]
    Replayed,
    /// The replay cache is full of unexpired entries: refused rather than unchecked.
    #[error("too many recent WPTs to check for replay")]
    ReplayCacheFull,
    /// On an mTLS connection, the WIT names another workload than the peer.
    #[error("the WIT's subject is not the connection's peer")]
    PeerMismatch,
    /// Making a WPT failed.
    #[error("cannot make a WPT: {0}")]
    Sign(String),
}

/// The claims of a WPT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WptClaims {
    /// The target URI, without query or fragment.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Random, unique per WPT.
    pub jti: String,
    /// base64url(SHA-256(WIT)).
    pub wth: String,
    /// base64url(SHA-256(Txn-Token)), when the request carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tth: Option<String>,
    /// base64url(SHA-256(access token)), when the request carries one (not checked
    /// here: `TxnLayer` does not read `Authorization`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ath: Option<String>,
    /// Hashes of other tokens; refused when it has entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oth: Option<serde_json::Map<String, serde_json::Value>>,
}

/// base64url(SHA-256(token)): the `wth`, `tth` and `ath` of a token.
pub fn token_hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha256(token.as_bytes()))
}

/// `uri` without its query and fragment: a WPT's `aud`.
pub fn audience_of(uri: &str) -> &str {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    uri.get(..end).unwrap_or(uri)
}

/// A workload's WIT-SVID and its key, as `FetchWITSVID` returns them: what it proves
/// requests with.
#[derive(Clone)]
pub struct WitSvid {
    spiffe_id: SpiffeId,
    token: String,
    key: WitKey,
    expires_at: i64,
    hint: String,
}

impl fmt::Debug for WitSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WitSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field(
                "token_sha256",
                &writ_spiffe::fingerprint::token(&self.token),
            )
            .field("expires_at", &self.expires_at)
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct UnverifiedWit {
    sub: String,
    exp: i64,
    cnf: wit::Confirmation,
}

impl WitSvid {
    /// A WIT-SVID and its private JWK. The WIT is read, not verified (it comes from this
    /// workload's agent); its `cnf.jwk` must be the key's public half.
    ///
    /// # Errors
    /// [`WptError::Wit`] if the WIT is unreadable or the key does not match it.
    pub fn new(token: String, key_jwk: &str) -> Result<Self, WptError> {
        let key = WitKey::from_jwk(key_jwk)?;
        Self::with_key(token, key)
    }

    /// As [`WitSvid::new`], with the key already read.
    ///
    /// # Errors
    /// [`WptError::Wit`] if the WIT is unreadable or the key does not match it.
    pub fn with_key(token: String, key: WitKey) -> Result<Self, WptError> {
        if token.len() > wit::MAX_TOKEN_BYTES {
            return Err(WitError::TooLarge {
                max: wit::MAX_TOKEN_BYTES,
            }
            .into());
        }
        let claims: UnverifiedWit = jsonwebtoken::dangerous::insecure_decode_claims(&token)
            .map_err(|e| WitError::Malformed(e.to_string()))?;
        if &claims.cnf.jwk != key.public_jwk() {
            return Err(WitError::Key("the key is not the WIT's cnf.jwk".into()).into());
        }
        Ok(Self {
            spiffe_id: SpiffeId::new(&claims.sub).map_err(WitError::from)?,
            token,
            key,
            expires_at: claims.exp,
            hint: String::new(),
        })
    }

    /// Sets the operator's hint (`WITSVID.hint`).
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    /// The workload's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The WIT, as sent in `Workload-Identity-Token`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The WIT's expiry, Unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// The operator's hint, empty if none.
    pub fn hint(&self) -> &str {
        &self.hint
    }

    /// A WPT for a request to `target_uri` (its query and fragment are dropped),
    /// binding `txn_token` if the request carries one, valid [`DEFAULT_LIFETIME`] from
    /// `now`.
    ///
    /// # Errors
    /// [`WptError::Sign`] if signing fails.
    pub fn proof(
        &self,
        target_uri: &str,
        txn_token: Option<&str>,
        now: SystemTime,
    ) -> Result<String, WptError> {
        self.proof_for(target_uri, txn_token, now, DEFAULT_LIFETIME)
    }

    /// As [`WitSvid::proof`], valid for `lifetime`.
    ///
    /// # Errors
    /// [`WptError::Sign`] if signing fails.
    pub fn proof_for(
        &self,
        target_uri: &str,
        txn_token: Option<&str>,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<String, WptError> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| WptError::Sign("random source".into()))?;
        let now = unix_seconds(now);
        let claims = WptClaims {
            aud: audience_of(target_uri).to_owned(),
            exp: now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            iat: Some(now),
            jti: URL_SAFE_NO_PAD.encode(jti),
            wth: token_hash(&self.token),
            tth: txn_token.map(token_hash),
            ath: None,
            oth: None,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(TYP.into());
        jsonwebtoken::encode(&header, &claims, &self.key.encoding_key())
            .map_err(|e| WptError::Sign(e.to_string()))
    }

    /// Adds `Workload-Identity-Token`, a fresh `Workload-Proof-Token` for `target_uri`
    /// (the request's URL) and, if given, the `Txn-Token` it binds.
    ///
    /// # Errors
    /// [`WptError::Sign`] if signing fails.
    pub fn attach(
        &self,
        request: reqwest::RequestBuilder,
        target_uri: &str,
        txn_token: Option<&str>,
        now: SystemTime,
    ) -> Result<reqwest::RequestBuilder, WptError> {
        let wpt = self.proof(target_uri, txn_token, now)?;
        let mut request = request
            .header(WIT_HEADER, &self.token)
            .header(WPT_HEADER, wpt);
        if let Some(token) = txn_token {
            request = request.header(crate::txn_token::HEADER, token);
        }
        Ok(request)
    }
}

/// A verified WIT/WPT pair: who proved possession of the WIT's key for this request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The WIT's subject: the caller.
    pub caller: SpiffeId,
    /// The verified WIT.
    pub wit: Wit,
    /// The WPT's `jti`.
    pub jti: String,
    /// The WPT's expiry, Unix seconds.
    pub expires_at: i64,
}

/// Remembers `(WIT subject, jti)` until the WPT expires; bounded.
#[derive(Debug)]
struct ReplayCache {
    capacity: usize,
    seen: Mutex<HashMap<(String, String), i64>>,
}

impl ReplayCache {
    /// Records a first use; refuses a second one, or any when full of live entries.
    fn first_use(&self, sub: &str, jti: &str, exp: i64, now: i64) -> Result<(), WptError> {
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (sub.to_owned(), jti.to_owned());
        if let Some(&until) = seen.get(&key)
            && until >= now
        {
            return Err(WptError::Replayed);
        }
        if seen.len() >= self.capacity {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= self.capacity {
                return Err(WptError::ReplayCacheFull);
            }
        }
        seen.insert(key, exp);
        Ok(())
    }
}

/// Verifies WIT/WPT pairs for one service (see the module docs). Clones share the
/// replay cache and the keys.
#[derive(Debug, Clone)]
pub struct WptVerifier {
    bundles: Arc<ArcSwap<WitBundles>>,
    audiences: Arc<Vec<String>>,
    max_lifetime: Duration,
    clock: SharedClock,
    replay: Arc<ReplayCache>,
    wits: Arc<Mutex<HashMap<[u8; 32], Wit>>>,
}

impl WptVerifier {
    /// Trusts the WIT keys in `bundles`, and accepts WPTs whose `aud` is `base_uri`
    /// (this service's URI as its callers address it, from configuration, such as
    /// `https://orders.internal`) followed by the request's path.
    pub fn new(bundles: WitBundles, base_uri: impl Into<String>) -> Self {
        Self {
            bundles: Arc::new(ArcSwap::from_pointee(bundles)),
            audiences: Arc::new(vec![trim_base(base_uri.into())]),
            max_lifetime: MAX_LIFETIME,
            clock: Arc::new(SystemClock),
            replay: Arc::new(ReplayCache {
                capacity: DEFAULT_REPLAY_CAPACITY,
                seen: Mutex::new(HashMap::new()),
            }),
            wits: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Also accepts `base_uri` (another name callers use for this service).
    #[must_use]
    pub fn also_base_uri(mut self, base_uri: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.audiences).push(trim_base(base_uri.into()));
        self
    }

    /// Reads time from `clock` (default: the system clock).
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Refuses WPTs valid longer than `max` from now (default and ceiling
    /// [`MAX_LIFETIME`]).
    #[must_use]
    pub fn max_lifetime(mut self, max: Duration) -> Self {
        self.max_lifetime = max.min(MAX_LIFETIME);
        self
    }

    /// Remembers at most `capacity` unexpired `jti`s (default
    /// [`DEFAULT_REPLAY_CAPACITY`]); when full, proofs are refused, never unchecked.
    #[must_use]
    pub fn replay_capacity(mut self, capacity: usize) -> Self {
        self.replay = Arc::new(ReplayCache {
            capacity: capacity.max(1),
            seen: Mutex::new(HashMap::new()),
        });
        self
    }

    /// Replaces the trusted WIT keys (after a bundle rotation).
    pub fn set_bundles(&self, bundles: WitBundles) {
        self.bundles.store(Arc::new(bundles));
        self.wit_cache().clear();
    }

    fn wit_cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Wit>> {
        self.wits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The WIT validated, from the cache while it has not expired.
    fn wit(&self, token: &str, now: SystemTime) -> Result<Wit, WitError> {
        let digest = sha256(token.as_bytes());
        let now_secs = unix_seconds(now);
        if let Some(hit) = self.wit_cache().get(&digest)
            && hit.expires_at > now_secs
        {
            return Ok(hit.clone());
        }
        let wit = wit::validate(token, &self.bundles.load(), now)?;
        let mut cache = self.wit_cache();
        if cache.len() >= WIT_CACHE_CAPACITY {
            cache.retain(|_, w| w.expires_at > now_secs);
            if cache.len() >= WIT_CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(digest, wit.clone());
        Ok(wit)
    }

    /// The clock this verifier reads.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Verifies the WIT `wit` and the WPT `wpt` of a request to `path` (the request
    /// URI's path, without query) carrying `txn_token`, and records the WPT's `jti`.
    ///
    /// # Errors
    /// [`WptError`] for the first problem found.
    pub fn verify(
        &self,
        wit_token: &str,
        wpt: &str,
        path: &str,
        txn_token: Option<&str>,
    ) -> Result<Proof, WptError> {
        let now_time = self.clock.now();
        let wit = self.wit(wit_token, now_time)?;
        let now = unix_seconds(now_time);
        if wpt.len() > MAX_WPT_BYTES {
            return Err(WptError::TooLarge { max: MAX_WPT_BYTES });
        }
        let raw = wit::unverified_header(wpt).map_err(WptError::Malformed)?;
        let typ = raw
            .get("typ")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if !wit::typ_is(typ, TYP) {
            return Err(WptError::Type(typ.chars().take(32).collect()));
        }
        if raw.contains_key("crit") {
            return Err(WptError::Critical);
        }
        let alg = raw
            .get("alg")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if alg != wit.cnf.alg {
            return Err(WptError::Algorithm(alg.chars().take(16).collect()));
        }
        let algorithm = wit.cnf.algorithm()?;
        let key = wit.cnf.decoding_key()?;
        let mut validation = Validation::new(algorithm);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(wpt, &key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => WptError::Signature,
                _ => WptError::Malformed(e.to_string()),
            })?
            .claims;
        let claims: WptClaims =
            serde_json::from_value(claims).map_err(|e| WptError::Malformed(e.to_string()))?;
        if claims.aud.len() > MAX_AUD_BYTES
            || !self
                .audiences
                .iter()
                .any(|base| is_audience(&claims.aud, base, path))
        {
            return Err(WptError::Audience);
        }
        if claims.exp <= now {
            return Err(WptError::Expired);
        }
        let skew = i64::try_from(SKEW.as_secs()).unwrap_or(0);
        let max = i64::try_from(self.max_lifetime.as_secs()).unwrap_or(0);
        if claims.exp > now.saturating_add(max).saturating_add(skew)
            || claims.iat.is_some_and(|iat| iat > now.saturating_add(skew))
        {
            return Err(WptError::TooLong {
                max_secs: self.max_lifetime.as_secs(),
            });
        }
        if claims.jti.is_empty() || claims.jti.len() > MAX_JTI_BYTES {
            return Err(WptError::Claim("jti"));
        }
        if claims.wth != token_hash(wit_token) {
            return Err(WptError::WitHash);
        }
        if let Some(token) = txn_token
            && claims.tth.as_deref() != Some(token_hash(token).as_str())
        {
            return Err(WptError::TxnTokenHash);
        }
        if claims.oth.as_ref().is_some_and(|o| !o.is_empty()) {
            return Err(WptError::OtherTokens);
        }
        self.replay
            .first_use(wit.spiffe_id.as_str(), &claims.jti, claims.exp, now)?;
        Ok(Proof {
            caller: wit.spiffe_id.clone(),
            wit,
            jti: claims.jti,
            expires_at: claims.exp,
        })
    }
}

fn trim_base(mut base: String) -> String {
    while base.ends_with('/') {
        base.pop();
    }
    base
}

/// Whether `aud` is `base` followed by `path` (an empty path is `/`).
fn is_audience(aud: &str, base: &str, path: &str) -> bool {
    let path = if path.is_empty() { "/" } else { path };
    aud.strip_prefix(base) == Some(path)
}

/// The WIT and WPT headers of a request: `None` when it carries neither, the pair when
/// it carries exactly one of each (ASCII).
///
/// # Errors
/// [`WptError::Headers`] for a missing half, a repeated or a non-ASCII header.
#[cfg(feature = "axum")]
pub fn read_headers(headers: &axum::http::HeaderMap) -> Result<Option<(String, String)>, WptError> {
    let one = |name: &str| -> Result<Option<String>, WptError> {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => v
                .to_str()
                .map(|s| Some(s.trim().to_owned()))
                .map_err(|_| WptError::Headers),
            _ => Err(WptError::Headers),
        }
    };
    match (one(WIT_HEADER)?, one(WPT_HEADER)?) {
        (None, None) => Ok(None),
        (Some(wit), Some(wpt)) => Ok(Some((wit, wpt))),
        _ => Err(WptError::Headers),
    }
}

/// The middleware's step: `None` when the request carries no WIT/WPT (the mTLS caller,
/// if any, stands); the proved caller when it carries a pair that verifies and, on an
/// mTLS connection, names the connection's peer.
#[cfg(feature = "axum")]
pub(crate) fn authenticate(
    verifier: &WptVerifier,
    peer: Option<&SpiffeId>,
    headers: Result<Option<(String, String)>, WptError>,
    path: &str,
    txn_token: Option<&str>,
) -> Result<Option<SpiffeId>, WptError> {
    let Some((wit_token, wpt)) = headers? else {
        return Ok(None);
    };
    let proof = verifier.verify(&wit_token, &wpt, path, txn_token)?;
    if peer.is_some_and(|p| *p != proof.caller) {
        return Err(WptError::PeerMismatch);
    }
    Ok(Some(proof.caller))
}

#[cfg(feature = "axum")]
impl crate::middleware::Verified {
    /// As [`crate::middleware::Verified::forward`], for a hop without mTLS end to end:
    /// also sends this workload's WIT-SVID and a WPT for `target_uri` (the outbound
    /// request's URL) bound to the forwarded Txn-Token.
    ///
    /// # Errors
    /// [`WptError::Sign`] if signing fails.
    pub fn forward_with_proof(
        &self,
        request: reqwest::RequestBuilder,
        svid: &WitSvid,
        target_uri: &str,
        now: SystemTime,
    ) -> Result<reqwest::RequestBuilder, WptError> {
        let wpt = svid.proof(target_uri, Some(&self.token), now)?;
        Ok(self
            .forward(request)
            .header(WIT_HEADER, svid.token())
            .header(WPT_HEADER, wpt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use writ_spiffe::bundle::{Bundle, BundleSet, Jwk};
    use writ_spiffe::clock::{Clock as _, ManualClock, from_unix_seconds};
    use writ_spiffe::key::PrivateKey;

    const NOW: i64 = 1_800_000_000;
    const BASE: &str = "https://orders.internal";

    struct World {
        authority: PrivateKey,
        bundles: WitBundles,
        clock: Arc<ManualClock>,
    }

    fn world() -> World {
        let authority = PrivateKey::generate().unwrap();
        let (x, y) = authority.ec_p256_xy().unwrap();
        let mut bundle = Bundle::new("example.org".parse().unwrap());
        bundle
            .put_jwt_authority("a1".into(), Jwk::ec_p256(x, y))
            .unwrap();
        World {
            bundles: WitBundles::from_bundles(&BundleSet::of(bundle)),
            authority,
            clock: Arc::new(ManualClock::new(from_unix_seconds(NOW))),
        }
    }

    impl World {
        fn svid(&self, id: &str) -> WitSvid {
            let key = WitKey::generate().unwrap();
            let token = wit::sign(
                &self.authority,
                "a1",
                &SpiffeId::new(id).unwrap(),
                key.public_jwk(),
                NOW,
                NOW + 3600,
            )
            .unwrap();
            WitSvid::with_key(token, key).unwrap()
        }
        fn verifier(&self) -> WptVerifier {
            WptVerifier::new(self.bundles.clone(), format!("{BASE}/"))
                .with_clock(self.clock.clone())
        }
        fn now(&self) -> SystemTime {
            self.clock.now()
        }
    }

    #[test]
    fn a_proof_verifies_once() {
        let w = world();
        let svid = w.svid("spiffe://example.org/agent");
        let v = w.verifier();
        let wpt = svid
            .proof(&format!("{BASE}/orders?x=1#f"), Some("txn-token"), w.now())
            .unwrap();
        let proof = v
            .verify(svid.token(), &wpt, "/orders", Some("txn-token"))
            .unwrap();
        assert_eq!(proof.caller.as_str(), "spiffe://example.org/agent");
        assert_eq!(
            v.clone()
                .verify(svid.token(), &wpt, "/orders", Some("txn-token")),
            Err(WptError::Replayed)
        );
    }

    #[test]
    fn proofs_for_other_tokens_uris_times_or_workloads_are_refused() {
        let w = world();
        let svid = w.svid("spiffe://example.org/agent");
        let other = w.svid("spiffe://example.org/other");
        let v = w.verifier();
        let uri = format!("{BASE}/orders");
        let wpt = |s: &WitSvid, t: &str| s.proof(&uri, Some(t), w.now()).unwrap();
        assert_eq!(
            v.verify(svid.token(), &wpt(&svid, "a"), "/orders", Some("b")),
            Err(WptError::TxnTokenHash)
        );
        assert_eq!(
            v.verify(svid.token(), &wpt(&svid, "a"), "/admin", Some("a")),
            Err(WptError::Audience)
        );
        // Another workload's WIT with this workload's proof.
        assert_eq!(
            v.verify(other.token(), &wpt(&svid, "a"), "/orders", Some("a")),
            Err(WptError::Signature)
        );
        // Without a tth.
        let bare = svid.proof(&uri, None, w.now()).unwrap();
        assert_eq!(
            v.verify(svid.token(), &bare, "/orders", Some("a")),
            Err(WptError::TxnTokenHash)
        );
        // Expired, and too long-lived.
        let old = wpt(&svid, "a");
        w.clock.advance(Duration::from_secs(31));
        assert_eq!(
            v.verify(svid.token(), &old, "/orders", Some("a")),
            Err(WptError::Expired)
        );
        let long = svid
            .proof_for(&uri, Some("a"), w.now(), Duration::from_secs(600))
            .unwrap();
        assert!(matches!(
            v.verify(svid.token(), &long, "/orders", Some("a")),
            Err(WptError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_headers_are_refused_clearly() {
        let w = world();
        let svid = w.svid("spiffe://example.org/agent");
        let v = w.verifier();
        let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let claims = b64(serde_json::json!({
            "aud": format!("{BASE}/x"), "exp": NOW + 10, "jti": "j",
            "wth": token_hash(svid.token()), "tth": token_hash("t"),
        }));
        let none = format!(
            "{}.{claims}.",
            b64(serde_json::json!({"alg": "none", "typ": "wpt+jwt"}))
        );
        let jwt_typ = format!(
            "{}.{claims}.c2ln",
            b64(serde_json::json!({"alg": "ES256", "typ": "JWT"}))
        );
        let crit = format!(
            "{}.{claims}.c2ln",
            b64(serde_json::json!({"alg": "ES256", "typ": "wpt+jwt", "crit": ["x"]}))
        );
        let cases: Vec<(String, String)> = vec![
            (svid.token().into(), "a".repeat(MAX_WPT_BYTES + 1)),
            (svid.token().into(), "%%%.***.!!!".into()),
            (svid.token().into(), none),
            (svid.token().into(), jwt_typ),
            (svid.token().into(), crit),
            ("a".repeat(20_000), "x.y.z".into()),
            ("not-base64!.x.y".into(), "x.y.z".into()),
        ];
        for (wit_token, wpt) in cases {
            let e = v.verify(&wit_token, &wpt, "/x", Some("t")).unwrap_err();
            assert!(!e.to_string().is_empty(), "{e:?}");
        }
    }

    #[test]
    fn a_remembered_wit_is_forgotten_with_its_bundles_and_at_expiry() {
        let w = world();
        let svid = w.svid("spiffe://example.org/agent");
        let v = w.verifier();
        let uri = format!("{BASE}/orders");
        let prove = || svid.proof(&uri, Some("t"), w.now()).unwrap();
        v.verify(svid.token(), &prove(), "/orders", Some("t"))
            .unwrap();
        v.verify(svid.token(), &prove(), "/orders", Some("t"))
            .unwrap();
        v.set_bundles(WitBundles::new());
        assert!(matches!(
            v.verify(svid.token(), &prove(), "/orders", Some("t")),
            Err(WptError::Wit(WitError::NoBundle(_)))
        ));
        v.set_bundles(w.bundles.clone());
        v.verify(svid.token(), &prove(), "/orders", Some("t"))
            .unwrap();
        w.clock.advance(Duration::from_secs(3600));
        assert_eq!(
            v.verify(svid.token(), &prove(), "/orders", Some("t")),
            Err(WptError::Wit(WitError::Expired))
        );
    }

    #[test]
    fn the_replay_cache_is_bounded_and_forgets_expired_entries() {
        let cache = ReplayCache {
            capacity: 2,
            seen: Mutex::new(HashMap::new()),
        };
        cache.first_use("s", "1", NOW + 10, NOW).unwrap();
        cache.first_use("s", "2", NOW + 10, NOW).unwrap();
        assert_eq!(
            cache.first_use("s", "3", NOW + 10, NOW),
            Err(WptError::ReplayCacheFull)
        );
        assert_eq!(
            cache.first_use("s", "1", NOW + 10, NOW),
            Err(WptError::Replayed)
        );
        cache.first_use("s", "3", NOW + 30, NOW + 11).unwrap();
        // The same jti from another workload is its own entry.
        cache.first_use("t", "3", NOW + 30, NOW + 11).unwrap();
    }
}
