//! OIDC ingress: validation of subject tokens issued by configured OpenID Providers.
//!
//! The transaction token service accepts, as the `subject_token` of an RFC 8693 exchange,
//! a JWT issued by one of the OpenID Providers it is configured to trust: an access token
//! (RFC 9068, `typ: at+jwt`), an ID token, or a plain JWT. [`OidcValidator`] finds the
//! issuer's keys through OpenID Connect Discovery and a JWKS cache, verifies the
//! signature with an algorithm allow-list, and checks `iss`, `aud`, `exp`, `nbf` and
//! `iat` against the injected [`Clock`](writ_identity::clock::Clock), never the system
//! time, with the shared [`writ_identity::numeric_date`] rule: `exp` at most
//! [`IssuerConfig::max_token_lifetime`] ahead (default 24 h), `nbf`/`iat` not in the
//! future, every time claim a sane NumericDate (`exp = 1e300` is refused).
//!
//! Token kinds (RFC 9068 sections 2.1 and 4, RFC 8725 section 3.11): tokens are told
//! apart by their `typ` header and by claims, so that one kind never passes as another.
//! - `access_token`: `typ` must be `at+jwt` (or `application/at+jwt`, case-insensitive);
//!   an issuer that types access tokens otherwise (`JWT`, or no `typ`) is accepted only
//!   with [`IssuerConfig::access_token_typ`] / [`IssuerConfig::allow_untyped_access_tokens`].
//!   Whatever the `typ`, a token carrying a claim that only ID tokens carry (`nonce`,
//!   `at_hash`, `c_hash`, `s_hash`; OpenID Connect Core sections 2 and 3.3.2.11) is not
//!   an access token.
//! - `id_token`: `typ` absent or `JWT` (`at+jwt` is refused, RFC 9068 section 4), and a
//!   token carrying `client_id` (REQUIRED in RFC 9068 access tokens, not an ID token
//!   claim) is not an ID token.
//! - `jwt`: any of `JWT`, `at+jwt` or no `typ`, without the kind checks (the caller
//!   claims no kind).
//!
//! Hardening:
//! - tokens larger than [`OidcOptions::max_token_bytes`] are refused before parsing;
//! - `alg: none` and the HMAC algorithms are never accepted (they cannot even be
//!   configured), and symmetric (`kty: oct`) keys in a JWKS are ignored;
//! - discovery and JWKS documents are size-limited, fetched with a timeout, without
//!   following redirects, and over HTTPS (plain HTTP only for loopback hosts);
//! - each issuer's keys are fetched, cached and fetched again by the SDK's one remote
//!   key set policy ([`writ_sdk::jwks`]): used for [`OidcOptions::jwks_ttl`] by the
//!   injected clock; a token whose `kid` is not in the cached JWKS triggers at most one
//!   refetch per [`OidcOptions::refetch_interval`] per issuer, so a flood of random
//!   `kid`s cannot hammer the provider; after a failed fetch the keys already fetched
//!   stay in use and the provider is asked again only after the refetch interval;
//!   concurrent validations share one fetch; a JWKS of more than
//!   [`MAX_KEYS`] keys is refused;
//! - a token is never logged: only its SHA-256
//!   ([`writ_identity::fingerprint::token`]).
//!
//! The token types are the shared [`TokenType`]s of `access_token`, `id_token` and `jwt`;
//! [`TokenType::TxnToken`] is refused ([`OidcError::UnsupportedTokenType`]): Txn-Tokens
//! are the service's own, not an OpenID Provider's.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_txn_service::oidc::OidcError> {
//! use std::sync::Arc;
//! use writ_identity::clock::SystemClock;
//! use writ_sdk::oauth::TokenType;
//! use writ_txn_service::oidc::{IssuerConfig, OidcValidator};
//!
//! let issuer = IssuerConfig::new("https://login.example.com", ["https://tts.example.com"]);
//! let validator = OidcValidator::new(vec![issuer], Arc::new(SystemClock))?;
//! let subject = validator
//!     .validate("eyJ...", TokenType::AccessToken)
//!     .await?;
//! println!("{} from {}", subject.subject, subject.issuer);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::Value;
use writ_identity::clock::SharedClock;
use writ_identity::fingerprint;
use writ_identity::numeric_date::{TimeClaims, TimeError, TimeWindow};
use writ_sdk::jwks::{FetchError, KeyCache, MAX_KEYS};
use writ_sdk::oauth::TokenType;

/// The default largest token accepted, in bytes (16 KiB).
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The default largest discovery or JWKS document accepted, in bytes (1 MiB).
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// The default time a fetched JWKS is used before it is fetched again (5 minutes).
pub const DEFAULT_JWKS_TTL: Duration = Duration::from_secs(300);
/// The default shortest time between two refetches caused by an unknown `kid` (30 s).
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// The default timeout of a discovery or JWKS request (10 s).
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// The default clock skew tolerated on `exp`, `nbf` and `iat` (30 s).
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// The default furthest ahead of now a subject token's `exp` may be (24 hours).
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The `typ` of an RFC 9068 access token, the only one accepted for access tokens by
/// default.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";
/// Claims only an ID token carries (OpenID Connect Core sections 2 and 3.3.2.11): a
/// token with one of them is never accepted as an access token.
pub const ID_TOKEN_ONLY_CLAIMS: [&str; 4] = ["nonce", "at_hash", "c_hash", "s_hash"];

/// The errors of OIDC ingress. Every message is safe to show a client: none contains
/// the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OidcError {
    /// The issuer configuration is invalid (found when the validator is built).
    #[error("invalid OIDC issuer configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// The token is larger than the configured limit.
    #[error("subject token is larger than {max} bytes")]
    TooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// The token is not a well-formed signed JWT (JWS compact serialization).
    #[error("subject token is malformed: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The presented token type is not one OIDC ingress validates (a Txn-Token).
    #[error("OIDC ingress does not validate `{token_type}` tokens")]
    UnsupportedTokenType {
        /// The presented type.
        token_type: TokenType,
    },
    /// The header `typ` does not fit the presented subject token type (for example an
    /// access token without `typ: at+jwt` from an issuer not configured to allow it).
    #[error("subject token type does not match its `typ` header")]
    TokenType,
    /// The claims show another kind of token than the presented subject token type (an
    /// ID token presented as an access token, or the reverse).
    #[error("subject token is not an {expected}: it carries `{claim}`")]
    TokenKind {
        /// The presented kind (`access token`, `ID token`).
        expected: &'static str,
        /// The claim that gives it away.
        claim: &'static str,
    },
    /// A time claim is out of range: `exp` more than the issuer's
    /// `max_token_lifetime` ahead, `nbf` or `iat` after `exp`, or not a sane NumericDate.
    #[error("subject token time claims are out of range: {0}")]
    Time(TimeError),
    /// The header `alg` is `none`, unknown, or not in the issuer's allow-list.
    #[error("subject token algorithm is not allowed")]
    Algorithm,
    /// The unverified `iss` claim names no configured issuer.
    #[error("subject token issuer is not trusted")]
    UnknownIssuer,
    /// The issuer's discovery document could not be fetched or is invalid.
    #[error("OIDC discovery failed for issuer {issuer}: {reason}")]
    Discovery {
        /// The configured issuer.
        issuer: String,
        /// What went wrong.
        reason: String,
    },
    /// The issuer's JWKS could not be fetched or is invalid.
    #[error("JWKS fetch failed for issuer {issuer}: {reason}")]
    Jwks {
        /// The configured issuer.
        issuer: String,
        /// What went wrong.
        reason: String,
    },
    /// No key of the issuer's JWKS matches the token's `kid` and `alg` (after at most
    /// one rate-limited refetch), or the token has no `kid` and the JWKS has several keys.
    #[error("no issuer key matches the subject token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("subject token signature is invalid")]
    Signature,
    /// The verified `iss` claim is not the configured issuer.
    #[error("subject token issuer does not match")]
    Issuer,
    /// The `aud` claim contains none of the configured audiences.
    #[error("subject token audience is not accepted")]
    Audience,
    /// The token has expired (`exp`, with leeway).
    #[error("subject token has expired")]
    Expired,
    /// The token is not valid yet (`nbf`, or an `iat` in the future, with leeway).
    #[error("subject token is not valid yet")]
    NotYetValid,
    /// A required claim is missing or has the wrong type.
    #[error("subject token claim `{claim}` is missing or invalid")]
    MissingClaim {
        /// The claim name.
        claim: String,
    },
    /// The token comes from the `writ dev` development issuer (it carries the
    /// [`DEV_TOKEN_CLAIM`] claim), and this validator is not `writ dev`'s.
    #[error("subject token is a `writ dev` development token, accepted only by `writ dev`")]
    DevelopmentToken,
}

/// The claim that marks a token of the `writ dev` development issuer. Validators refuse
/// such tokens unless [`OidcOptions::accept_dev_tokens`] is set, which only `writ dev`
/// does (no configuration file can).
pub const DEV_TOKEN_CLAIM: &str = "writ_dev";

/// One trusted OpenID Provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The issuer identifier (URL), compared exactly with `iss` and with the discovery
    /// document's `issuer`.
    pub issuer: String,
    /// Accepted audiences: a token's `aud` must contain at least one.
    pub audiences: Vec<String>,
    /// The claim holding the subject (default `sub`).
    pub subject_claim: String,
    /// The claim holding the scope, a space-separated string or an array (default
    /// `scope`).
    pub scope_claim: String,
    /// Accepted signature algorithms (default RS256, ES256, PS256, EdDSA). HMAC
    /// algorithms are refused when the validator is built; `none` cannot be expressed.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat` (default 30 s).
    pub leeway: Duration,
    /// Furthest ahead of now a token's `exp` may be (default
    /// [`DEFAULT_MAX_TOKEN_LIFETIME`], 24 h). Also bounds how long a validation is cached.
    pub max_token_lifetime: Duration,
    /// The `typ` values accepted on access tokens, compared case-insensitively and
    /// without an `application/` prefix (default `["at+jwt"]`, RFC 9068). Add `"JWT"`
    /// for an issuer that types its access tokens `JWT`.
    pub access_token_typ: Vec<String>,
    /// Accept access tokens without a `typ` header from this issuer (default `false`).
    pub allow_untyped_access_tokens: bool,
    /// PEM certificates that are the only TLS roots trusted for this issuer's discovery
    /// and JWKS requests (default: the platform's roots).
    pub ca_bundle_pem: Option<String>,
}

impl IssuerConfig {
    /// The time rule of this issuer's tokens: its leeway and longest lifetime.
    pub fn time_window(&self) -> TimeWindow {
        TimeWindow::new(self.leeway, self.max_token_lifetime)
    }

    /// An issuer with the default claims, algorithms and leeway.
    pub fn new<I, A>(issuer: impl Into<String>, audiences: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        Self {
            issuer: issuer.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            subject_claim: "sub".to_owned(),
            scope_claim: "scope".to_owned(),
            algorithms: vec![
                Algorithm::RS256,
                Algorithm::ES256,
                Algorithm::PS256,
                Algorithm::EdDSA,
            ],
            leeway: DEFAULT_LEEWAY,
            max_token_lifetime: DEFAULT_MAX_TOKEN_LIFETIME,
            access_token_typ: vec![ACCESS_TOKEN_TYP.to_owned()],
            allow_untyped_access_tokens: false,
            ca_bundle_pem: None,
        }
    }
}

/// Limits and cache timings shared by all issuers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcOptions {
    /// Largest token accepted, in bytes.
    pub max_token_bytes: usize,
    /// Largest discovery or JWKS document accepted, in bytes.
    pub max_document_bytes: usize,
    /// How long a fetched JWKS is used (measured with the injected clock).
    pub jwks_ttl: Duration,
    /// Shortest time between two refetches caused by an unknown `kid`, per issuer.
    pub refetch_interval: Duration,
    /// Timeout of each discovery or JWKS request.
    pub http_timeout: Duration,
    /// Accept tokens marked with [`DEV_TOKEN_CLAIM`] (only `writ dev` sets this).
    pub accept_dev_tokens: bool,
}

impl Default for OidcOptions {
    fn default() -> Self {
        Self {
            max_token_bytes: DEFAULT_MAX_TOKEN_BYTES,
            max_document_bytes: DEFAULT_MAX_DOCUMENT_BYTES,
            jwks_ttl: DEFAULT_JWKS_TTL,
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
            accept_dev_tokens: false,
        }
    }
}

/// What a valid subject token says.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedSubject {
    /// The issuer (`iss`).
    pub issuer: String,
    /// The subject, from the issuer's configured subject claim.
    pub subject: String,
    /// The scope, from the issuer's configured scope claim (empty when absent).
    pub scope: Vec<String>,
    /// The audiences (`aud`).
    pub audience: Vec<String>,
    /// Authentication methods (`amr`, empty when absent).
    pub amr: Vec<String>,
    /// Authentication context class (`acr`).
    pub acr: Option<String>,
    /// Expiry (`exp`), seconds since the Unix epoch.
    pub expires_at: i64,
    /// All claims, as verified.
    pub claims: Value,
}

/// One usable key of a JWKS, parsed once (when the JWKS is fetched) for each algorithm
/// the issuer allows that fits the key: a verification never parses a key (for RSA,
/// building the key is a large part of the cost of a verification).
struct IssuerKey {
    kid: Option<String>,
    alg: Option<String>,
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
}

impl IssuerKey {
    fn for_alg(&self, alg: Algorithm) -> Option<&ParsedPublicKey> {
        self.parsed.iter().find(|(a, _)| *a == alg).map(|(_, k)| k)
    }
}

/// An issuer's usable keys.
struct KeySet {
    keys: Vec<IssuerKey>,
}

/// A configured issuer with its HTTP client and its keys.
struct Issuer {
    config: IssuerConfig,
    discovery_url: String,
    client: reqwest::Client,
    keys: KeyCache<KeySet, OidcError>,
}

/// Validates subject tokens from the configured OpenID Providers.
pub struct OidcValidator {
    issuers: HashMap<String, Arc<Issuer>>,
    clock: SharedClock,
    options: OidcOptions,
    /// Signature verifications made (see [`OidcValidator::signature_verifications`]).
    verifications: AtomicU64,
}

impl std::fmt::Debug for OidcValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut issuers: Vec<&String> = self.issuers.keys().collect();
        issuers.sort();
        f.debug_struct("OidcValidator")
            .field("issuers", &issuers)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn config_error(reason: impl Into<String>) -> OidcError {
    OidcError::Config {
        reason: reason.into(),
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// Refuses URLs that are not HTTPS, except plain HTTP to a loopback host.
fn check_url(url: &str) -> Result<(), &'static str> {
    let parsed = url::Url::parse(url).map_err(|_| "not a URL")?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match parsed.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err("plain http is allowed only for loopback hosts")
            }
        }
        _ => Err("scheme must be https"),
    }
}

impl Issuer {
    fn new(
        config: IssuerConfig,
        options: &OidcOptions,
        clock: SharedClock,
    ) -> Result<Self, OidcError> {
        let name = &config.issuer;
        check_url(name).map_err(|r| config_error(format!("issuer {name}: {r}")))?;
        if config.audiences.is_empty() || config.audiences.iter().any(String::is_empty) {
            return Err(config_error(format!(
                "issuer {name}: audiences must be non-empty"
            )));
        }
        if config.subject_claim.is_empty() || config.scope_claim.is_empty() {
            return Err(config_error(format!(
                "issuer {name}: subject and scope claim names must be non-empty"
            )));
        }
        if config.algorithms.is_empty() {
            return Err(config_error(format!(
                "issuer {name}: at least one algorithm is required"
            )));
        }
        if config.max_token_lifetime.is_zero() {
            return Err(config_error(format!(
                "issuer {name}: max_token_lifetime must be positive"
            )));
        }
        if config.access_token_typ.is_empty() && !config.allow_untyped_access_tokens {
            return Err(config_error(format!(
                "issuer {name}: access_token_typ is empty and untyped access tokens are not allowed"
            )));
        }
        if let Some(bad) = config
            .access_token_typ
            .iter()
            .find(|t| !matches!(normalize_typ(t).as_str(), "at+jwt" | "jwt"))
        {
            return Err(config_error(format!(
                "issuer {name}: access_token_typ {bad:?} is neither \"at+jwt\" nor \"JWT\""
            )));
        }
        if config.algorithms.iter().any(|a| is_hmac(*a)) {
            return Err(config_error(format!(
                "issuer {name}: HMAC algorithms (HS*) are not allowed"
            )));
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(options.http_timeout)
            .connect_timeout(options.http_timeout);
        if let Some(pem) = &config.ca_bundle_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|_| config_error(format!("issuer {name}: invalid CA bundle")))?;
            if certs.is_empty() {
                return Err(config_error(format!("issuer {name}: empty CA bundle")));
            }
            builder = builder.tls_certs_only(certs);
        }
        let client = builder
            .build()
            .map_err(|_| config_error(format!("issuer {name}: cannot build HTTP client")))?;
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            name.trim_end_matches('/')
        );
        let keys = KeyCache::new(
            format!("JWKS of OIDC issuer {name}"),
            clock,
            options.jwks_ttl,
            options.refetch_interval,
        );
        Ok(Self {
            config,
            discovery_url,
            client,
            keys,
        })
    }

    /// GETs `url` (the SDK's bounded fetch) and parses a JSON object of at most `max`
    /// bytes. The reason returned is safe to show a client; details go to the log.
    async fn get_json(&self, url: &str, max: usize, timeout: Duration) -> Result<Value, String> {
        let body = writ_sdk::jwks::fetch(&self.client, url, max, timeout)
            .await
            .map_err(|e| {
                match &e {
                    FetchError::Transport(_) | FetchError::Body(_) | FetchError::Timeout => {
                        tracing::warn!(issuer = %self.config.issuer, url, error = %e, "OIDC request failed");
                    }
                    _ => {}
                }
                match e {
                    FetchError::Transport(_) => "request failed".to_owned(),
                    FetchError::Body(_) => "reading the response failed".to_owned(),
                    other => other.to_string(),
                }
            })?;
        let value: Value =
            serde_json::from_slice(&body).map_err(|_| "response is not JSON".to_owned())?;
        if !value.is_object() {
            return Err("response is not a JSON object".to_owned());
        }
        Ok(value)
    }

    /// Discovery then JWKS: the issuer's current keys.
    async fn fetch_keys(&self, options: &OidcOptions) -> Result<KeySet, OidcError> {
        let issuer = &self.config.issuer;
        let discovery_error = |reason: String| OidcError::Discovery {
            issuer: issuer.clone(),
            reason,
        };
        let jwks_error = |reason: String| OidcError::Jwks {
            issuer: issuer.clone(),
            reason,
        };
        let metadata = self
            .get_json(
                &self.discovery_url,
                options.max_document_bytes,
                options.http_timeout,
            )
            .await
            .map_err(discovery_error)?;
        if metadata.get("issuer").and_then(Value::as_str) != Some(issuer.as_str()) {
            return Err(discovery_error(
                "metadata `issuer` does not equal the configured issuer".to_owned(),
            ));
        }
        let jwks_uri = metadata
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| discovery_error("metadata has no `jwks_uri`".to_owned()))?;
        check_url(jwks_uri).map_err(|r| discovery_error(format!("`jwks_uri`: {r}")))?;
        let jwks = self
            .get_json(jwks_uri, options.max_document_bytes, options.http_timeout)
            .await
            .map_err(jwks_error)?;
        let raw_keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| jwks_error("document has no `keys` array".to_owned()))?;
        if raw_keys.len() > MAX_KEYS {
            return Err(jwks_error(format!(
                "document has more than {MAX_KEYS} keys"
            )));
        }
        let keys: Vec<IssuerKey> = raw_keys
            .iter()
            .filter_map(|raw| parse_jwk(raw, &self.config.algorithms))
            .collect();
        tracing::debug!(
            issuer = %issuer,
            listed = raw_keys.len(),
            usable = keys.len(),
            "fetched JWKS"
        );
        Ok(KeySet { keys })
    }
}

/// A usable signature key from one JWK, parsed for each of `algorithms` that fits it,
/// or `None` (encryption or symmetric keys, malformed keys, keys no allowed algorithm
/// uses).
fn parse_jwk(raw: &Value, algorithms: &[Algorithm]) -> Option<IssuerKey> {
    let kty = raw.get("kty").and_then(Value::as_str)?;
    if kty == "oct" {
        return None;
    }
    if raw
        .get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return None;
    }
    let kid = raw.get("kid").and_then(Value::as_str).map(str::to_owned);
    let alg = raw.get("alg").and_then(Value::as_str).map(str::to_owned);
    let member = |name: &str| {
        raw.get(name)
            .and_then(Value::as_str)
            .and_then(|v| URL_SAFE_NO_PAD.decode(v.trim_end_matches('=')).ok())
    };
    let crv = raw.get("crv").and_then(Value::as_str);
    let mut parsed = Vec::new();
    match (kty, crv) {
        ("RSA", _) => {
            let (n, e) = (member("n")?, member("e")?);
            let components = RsaPublicKeyComponents {
                n: n.as_slice(),
                e: e.as_slice(),
            };
            for &a in algorithms {
                let params: &'static sig::RsaParameters = match a {
                    Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
                    _ => continue,
                };
                parsed.push((a, components.to_parsed_public_key(params).ok()?));
            }
        }
        ("EC", Some(curve @ ("P-256" | "P-384"))) => {
            let (alg, verification, len): (_, &'static sig::EcdsaVerificationAlgorithm, _) =
                if curve == "P-256" {
                    (Algorithm::ES256, &sig::ECDSA_P256_SHA256_FIXED, 32)
                } else {
                    (Algorithm::ES384, &sig::ECDSA_P384_SHA384_FIXED, 48)
                };
            let (x, y) = (member("x")?, member("y")?);
            if x.len() != len || y.len() != len || !algorithms.contains(&alg) {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            parsed.push((alg, ParsedPublicKey::new(verification, &point).ok()?));
        }
        ("OKP", Some("Ed25519")) => {
            let x = member("x")?;
            if !algorithms.contains(&Algorithm::EdDSA) {
                return None;
            }
            parsed.push((
                Algorithm::EdDSA,
                ParsedPublicKey::new(&sig::ED25519, &x).ok()?,
            ));
        }
        _ => return None,
    }
    if parsed.is_empty() {
        return None;
    }
    Some(IssuerKey { kid, alg, parsed })
}

enum KeyChoice<'a> {
    Found(&'a IssuerKey),
    NotFound,
    KidRequired,
}

fn choose_key<'a>(set: &'a KeySet, kid: Option<&str>, alg: &str) -> KeyChoice<'a> {
    let fits = |k: &&IssuerKey| k.alg.as_deref().is_none_or(|a| a == alg);
    match kid {
        Some(kid) => set
            .keys
            .iter()
            .filter(|k| k.kid.as_deref() == Some(kid))
            .find(fits)
            .map_or(KeyChoice::NotFound, KeyChoice::Found),
        None => match set.keys.as_slice() {
            [only] if fits(&only) => KeyChoice::Found(only),
            [_] | [] => KeyChoice::NotFound,
            _ => KeyChoice::KidRequired,
        },
    }
}

/// A compact JWS: the header and payload decoded (once), the signing input, and the
/// signature segment still encoded.
struct Parts<'a> {
    header: Value,
    payload: Value,
    /// `header.payload`, the bytes the signature covers.
    signing_input: &'a str,
    signature: &'a str,
}

fn decode_segment(segment: &str) -> Result<Value, OidcError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| OidcError::Malformed {
            reason: "segment is not base64url",
        })?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed {
        reason: "segment is not JSON",
    })?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(OidcError::Malformed {
            reason: "segment is not a JSON object",
        })
    }
}

fn split_token(token: &str) -> Result<Parts<'_>, OidcError> {
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(OidcError::Malformed {
            reason: "not a three-part compact JWS",
        });
    };
    if header.is_empty() || payload.is_empty() {
        return Err(OidcError::Malformed {
            reason: "empty segment",
        });
    }
    if signature.is_empty() {
        // An unsecured JWT (`alg: none`) has an empty signature.
        return Err(OidcError::Algorithm);
    }
    Ok(Parts {
        header: decode_segment(header)?,
        payload: decode_segment(payload)?,
        signing_input: token.get(..header.len() + 1 + payload.len()).ok_or(
            OidcError::Malformed {
                reason: "not a three-part compact JWS",
            },
        )?,
        signature,
    })
}

/// A claim that is a string or an array of strings (absent: empty).
fn string_list(claims: &Value, name: &str, split_spaces: bool) -> Result<Vec<String>, OidcError> {
    let invalid = || OidcError::MissingClaim {
        claim: name.to_owned(),
    };
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) if split_spaces => {
            Ok(s.split_whitespace().map(str::to_owned).collect())
        }
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(invalid))
            .collect(),
        Some(_) => Err(invalid()),
    }
}

/// A `typ` value as compared: lowercase, without an `application/` prefix (RFC 7515
/// section 4.1.9).
fn normalize_typ(typ: &str) -> String {
    let typ = typ.to_ascii_lowercase();
    typ.strip_prefix("application/")
        .map(str::to_owned)
        .unwrap_or(typ)
}

/// The `typ` rules of the module documentation, for a token of `config`'s issuer.
fn check_typ(
    header: &Value,
    token_type: TokenType,
    config: &IssuerConfig,
) -> Result<(), OidcError> {
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(t)) => Some(normalize_typ(t)),
        Some(_) => {
            return Err(OidcError::Malformed {
                reason: "header `typ` is not a string",
            });
        }
    };
    let ok = match (token_type, typ.as_deref()) {
        (TokenType::AccessToken, None) => config.allow_untyped_access_tokens,
        (TokenType::AccessToken, Some(t)) => config
            .access_token_typ
            .iter()
            .any(|allowed| normalize_typ(allowed) == t),
        // An access token must not pass as an ID token (RFC 9068 section 4).
        (TokenType::IdToken, None | Some("jwt")) => true,
        (TokenType::Jwt, None | Some("jwt" | "at+jwt")) => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(OidcError::TokenType)
    }
}

/// The claim rules of the module documentation: an ID token never passes as an access
/// token, nor an access token as an ID token.
fn check_kind(claims: &Value, token_type: TokenType) -> Result<(), OidcError> {
    match token_type {
        TokenType::AccessToken => {
            if let Some(claim) = ID_TOKEN_ONLY_CLAIMS
                .into_iter()
                .find(|c| claims.get(*c).is_some())
            {
                return Err(OidcError::TokenKind {
                    expected: "access token",
                    claim,
                });
            }
        }
        TokenType::IdToken if claims.get("client_id").is_some() => {
            return Err(OidcError::TokenKind {
                expected: "ID token",
                claim: "client_id",
            });
        }
        // Plain JWTs: no kind checks; other types never get this far.
        _ => {}
    }
    Ok(())
}

impl OidcValidator {
    /// A validator for `issuers` with the default [`OidcOptions`].
    ///
    /// # Errors
    ///
    /// [`OidcError::Config`] if an issuer is not an HTTPS URL (plain HTTP is allowed for
    /// loopback hosts only), is configured twice, has no audience, allows an HMAC
    /// algorithm or none at all, or has an unreadable CA bundle.
    pub fn new(issuers: Vec<IssuerConfig>, clock: SharedClock) -> Result<Self, OidcError> {
        Self::with_options(issuers, clock, OidcOptions::default())
    }

    /// A validator for `issuers` with explicit limits and cache timings.
    ///
    /// # Errors
    ///
    /// As [`OidcValidator::new`], and [`OidcError::Config`] for zero limits.
    pub fn with_options(
        issuers: Vec<IssuerConfig>,
        clock: SharedClock,
        options: OidcOptions,
    ) -> Result<Self, OidcError> {
        if options.max_token_bytes == 0 || options.max_document_bytes == 0 {
            return Err(config_error("size limits must be non-zero"));
        }
        if options.http_timeout.is_zero() {
            return Err(config_error("HTTP timeout must be non-zero"));
        }
        let mut map = HashMap::new();
        for config in issuers {
            let name = config.issuer.clone();
            let issuer = Issuer::new(config, &options, clock.clone())?;
            if map.insert(name.clone(), Arc::new(issuer)).is_some() {
                return Err(config_error(format!("issuer {name} is configured twice")));
            }
        }
        Ok(Self {
            issuers: map,
            clock,
            options,
            verifications: AtomicU64::new(0),
        })
    }

    /// How many signatures this validator has verified (whatever the outcome): one per
    /// subject token that reached its issuer's key. A cheap counter for tests and
    /// benchmarks that count the crypto work of a request.
    pub fn signature_verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// The configured issuer identifiers.
    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.keys().map(String::as_str)
    }

    /// Validates a subject token of type `token_type`.
    ///
    /// # Errors
    ///
    /// The [`OidcError`] variant naming the first check that failed; discovery and JWKS
    /// failures surface as [`OidcError::Discovery`] and [`OidcError::Jwks`].
    pub async fn validate(
        &self,
        token: &str,
        token_type: TokenType,
    ) -> Result<ValidatedSubject, OidcError> {
        let result = self.validate_inner(token, token_type).await;
        match &result {
            Ok(s) => tracing::debug!(
                token_sha256 = %fingerprint::token(token),
                issuer = %s.issuer,
                subject = %s.subject,
                "subject token accepted"
            ),
            Err(e) => tracing::info!(
                token_sha256 = %fingerprint::token(token),
                error = %e,
                "subject token refused"
            ),
        }
        result
    }

    async fn validate_inner(
        &self,
        token: &str,
        token_type: TokenType,
    ) -> Result<ValidatedSubject, OidcError> {
        if !matches!(
            token_type,
            TokenType::AccessToken | TokenType::IdToken | TokenType::Jwt
        ) {
            return Err(OidcError::UnsupportedTokenType { token_type });
        }
        if token.len() > self.options.max_token_bytes {
            return Err(OidcError::TooLarge {
                max: self.options.max_token_bytes,
            });
        }
        let Parts {
            header,
            payload,
            signing_input,
            signature,
        } = split_token(token)?;

        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(OidcError::Algorithm)?;
        let alg = Algorithm::from_str(alg_name).map_err(|_| OidcError::Algorithm)?;
        if is_hmac(alg) {
            return Err(OidcError::Algorithm);
        }
        if header.get("crit").is_some() {
            return Err(OidcError::Malformed {
                reason: "unsupported `crit` header",
            });
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => {
                return Err(OidcError::Malformed {
                    reason: "header `kid` is not a string",
                });
            }
        };

        let unverified_iss =
            payload
                .get("iss")
                .and_then(Value::as_str)
                .ok_or_else(|| OidcError::MissingClaim {
                    claim: "iss".to_owned(),
                })?;
        let issuer = self
            .issuers
            .get(unverified_iss)
            .ok_or(OidcError::UnknownIssuer)?;
        let config = &issuer.config;
        if !config.algorithms.contains(&alg) {
            return Err(OidcError::Algorithm);
        }
        check_typ(&header, token_type, config)?;

        self.verify_signature(issuer, signing_input, signature, kid, alg, alg_name)
            .await?;
        // The payload was decoded once, before the signature was checked; it is trusted
        // only now.
        self.check_claims(config, payload, token_type)
    }

    /// Verifies `signature` over `signing_input` with the issuer's key for `kid` and
    /// `alg` (fetching the JWKS when needed).
    async fn verify_signature(
        &self,
        issuer: &Arc<Issuer>,
        signing_input: &str,
        signature: &str,
        kid: Option<&str>,
        alg: Algorithm,
        alg_name: &str,
    ) -> Result<(), OidcError> {
        let load = || issuer.fetch_keys(&self.options);
        let mut set = issuer.keys.keys(load).await?;
        if matches!(choose_key(&set, kid, alg_name), KeyChoice::NotFound) {
            set = issuer.keys.refetch(load).await?;
        }
        let key = match choose_key(&set, kid, alg_name) {
            KeyChoice::Found(key) => key,
            KeyChoice::NotFound | KeyChoice::KidRequired => return Err(OidcError::UnknownKey),
        };
        // The key's type does not fit `alg` (an RSA key named by an ES256 token).
        let key = key.for_alg(alg).ok_or(OidcError::Algorithm)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| OidcError::Malformed {
                reason: "signature is not base64url",
            })?;
        self.verifications.fetch_add(1, Ordering::Relaxed);
        key.verify_sig(signing_input.as_bytes(), &signature)
            .map_err(|_| OidcError::Signature)
    }

    fn check_claims(
        &self,
        config: &IssuerConfig,
        claims: Value,
        token_type: TokenType,
    ) -> Result<ValidatedSubject, OidcError> {
        if claims.get("iss").and_then(Value::as_str) != Some(config.issuer.as_str()) {
            return Err(OidcError::Issuer);
        }
        if claims.get(DEV_TOKEN_CLAIM).is_some() && !self.options.accept_dev_tokens {
            return Err(OidcError::DevelopmentToken);
        }

        let audience = string_list(&claims, "aud", false)?;
        if !audience.iter().any(|a| config.audiences.contains(a)) {
            return Err(OidcError::Audience);
        }

        check_kind(&claims, token_type)?;

        let now = self.clock.unix_seconds();
        let times = TimeClaims::from_claims(&claims).map_err(|e| match e {
            TimeError::Invalid { claim } => OidcError::MissingClaim {
                claim: claim.to_owned(),
            },
            other => OidcError::Time(other),
        })?;
        config
            .time_window()
            .check(&times, now)
            .map_err(|e| match e {
                TimeError::Expired => OidcError::Expired,
                TimeError::NotYetValid | TimeError::IssuedInFuture => OidcError::NotYetValid,
                other => OidcError::Time(other),
            })?;
        let expires_at = times.exp;

        let subject = claims
            .get(&config.subject_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| OidcError::MissingClaim {
                claim: config.subject_claim.clone(),
            })?
            .to_owned();
        let scope = string_list(&claims, &config.scope_claim, true)?;
        let amr = string_list(&claims, "amr", false)?;
        let acr = match claims.get("acr") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(OidcError::MissingClaim {
                    claim: "acr".to_owned(),
                });
            }
        };

        Ok(ValidatedSubject {
            issuer: config.issuer.clone(),
            subject,
            scope,
            audience,
            amr,
            acr,
            expires_at,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typ_rules() {
        use TokenType::{AccessToken, IdToken, Jwt};
        let h = |t: &str| serde_json::json!({ "typ": t });
        let none = serde_json::json!({});
        let strict = IssuerConfig::new("https://idp.example", ["aud"]);
        let mut lax = strict.clone();
        lax.access_token_typ = vec!["at+jwt".into(), "JWT".into()];
        lax.allow_untyped_access_tokens = true;

        // Access tokens: at+jwt (any case, with or without application/) by default.
        for typ in [
            "at+jwt",
            "AT+JWT",
            "application/at+jwt",
            "Application/At+Jwt",
        ] {
            assert!(check_typ(&h(typ), AccessToken, &strict).is_ok(), "{typ}");
        }
        for (header, what) in [(h("JWT"), "JWT"), (none.clone(), "no typ")] {
            assert_eq!(
                check_typ(&header, AccessToken, &strict),
                Err(OidcError::TokenType),
                "{what} refused by default"
            );
            assert!(
                check_typ(&header, AccessToken, &lax).is_ok(),
                "{what} allowed"
            );
        }
        assert_eq!(
            check_typ(&h("txntoken+jwt"), AccessToken, &lax),
            Err(OidcError::TokenType)
        );
        // ID tokens: JWT or no typ; never at+jwt.
        assert!(check_typ(&h("JWT"), IdToken, &strict).is_ok());
        assert!(check_typ(&none, IdToken, &strict).is_ok());
        assert_eq!(
            check_typ(&h("at+jwt"), IdToken, &lax),
            Err(OidcError::TokenType)
        );
        // Plain JWTs: either.
        assert!(check_typ(&h("application/at+jwt"), Jwt, &strict).is_ok());
        assert!(check_typ(&h("JWT"), Jwt, &strict).is_ok());
        assert!(check_typ(&h("dpop+jwt"), Jwt, &strict).is_err());
    }

    #[test]
    fn kind_rules() {
        use TokenType::{AccessToken, IdToken, Jwt};
        let id_token = serde_json::json!({ "sub": "a", "nonce": "n", "at_hash": "x" });
        let access = serde_json::json!({ "sub": "a", "client_id": "c", "jti": "j" });
        assert_eq!(
            check_kind(&id_token, AccessToken),
            Err(OidcError::TokenKind {
                expected: "access token",
                claim: "nonce"
            })
        );
        assert!(check_kind(&access, AccessToken).is_ok());
        assert_eq!(
            check_kind(&access, IdToken),
            Err(OidcError::TokenKind {
                expected: "ID token",
                claim: "client_id"
            })
        );
        assert!(check_kind(&id_token, IdToken).is_ok());
        assert!(check_kind(&id_token, Jwt).is_ok());
    }

    #[tokio::test]
    async fn refuses_txn_tokens() {
        let clock: SharedClock = Arc::new(writ_identity::clock::SystemClock);
        let v = OidcValidator::new(
            vec![IssuerConfig::new("https://idp.example", ["aud"])],
            clock,
        )
        .unwrap();
        assert_eq!(
            v.validate("a.b.c", TokenType::TxnToken).await,
            Err(OidcError::UnsupportedTokenType {
                token_type: TokenType::TxnToken
            })
        );
    }

    #[test]
    fn url_policy() {
        assert!(check_url("https://login.example.com").is_ok());
        assert!(check_url("http://127.0.0.1:8080").is_ok());
        assert!(check_url("http://localhost").is_ok());
        assert!(check_url("http://login.example.com").is_err());
        assert!(check_url("ftp://x").is_err());
    }

    #[test]
    fn refuses_hmac_config() {
        let mut c = IssuerConfig::new("https://idp.example", ["aud"]);
        c.algorithms = vec![Algorithm::HS256];
        let clock: SharedClock = Arc::new(writ_identity::clock::SystemClock);
        assert!(matches!(
            OidcValidator::new(vec![c], clock),
            Err(OidcError::Config { .. })
        ));
    }

    #[test]
    fn refuses_unknown_access_token_typ_and_zero_lifetime() {
        let clock: SharedClock = Arc::new(writ_identity::clock::SystemClock);
        let mut c = IssuerConfig::new("https://idp.example", ["aud"]);
        c.access_token_typ = vec!["dpop+jwt".into()];
        assert!(matches!(
            OidcValidator::new(vec![c.clone()], clock.clone()),
            Err(OidcError::Config { reason }) if reason.contains("dpop+jwt")
        ));
        c.access_token_typ = vec![];
        assert!(OidcValidator::new(vec![c.clone()], clock.clone()).is_err());
        c.allow_untyped_access_tokens = true;
        assert!(OidcValidator::new(vec![c.clone()], clock.clone()).is_ok());
        c.max_token_lifetime = Duration::ZERO;
        assert!(OidcValidator::new(vec![c], clock).is_err());
    }

    #[test]
    fn scope_string_or_array() {
        let c = serde_json::json!({ "a": "x  y", "b": ["x", "y"], "c": 3 });
        assert_eq!(
            string_list(&c, "a", true).ok(),
            Some(vec!["x".into(), "y".into()])
        );
        assert_eq!(
            string_list(&c, "b", true).ok(),
            Some(vec!["x".into(), "y".into()])
        );
        assert!(string_list(&c, "c", true).is_err());
        assert_eq!(string_list(&c, "d", true).ok(), Some(vec![]));
    }
}
