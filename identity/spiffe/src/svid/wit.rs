//! WIT-SVIDs: the SPIFFE profile (WIT-SVID, incubating in the SPIFFE standards, 2026) of
//! the WIMSE Workload Identity Token (draft-ietf-wimse-workload-creds-02/-03).
//!
//! A WIT-SVID binds a workload's public key (`cnf.jwk`) to its SPIFFE ID (`sub`). It is
//! never a bearer token: a validator accepts it only with a proof of possession of the
//! key, the Workload Proof Token (WPT, `writ_sdk::wpt`).
//!
//! Header: `alg` (ES256, from the trust domain's JWT authority), `kid` ([`KID_PREFIX`] and
//! the authority's id, so it never equals a JWT-SVID key id in the same bundle, as the
//! WIT-SVID text requires), `typ: wit+jwt`. Claims: `sub`, `exp`, `iat`, `jti`, `cnf`
//! (`jwk` with `kty`, `crv`, `x`, `y`, `alg`), never `aud`.
//!
//! [`validate`] refuses: more than [`MAX_TOKEN_BYTES`]; `typ` other than `wit+jwt`; an
//! `alg` outside [`ALLOWED_ALGORITHMS`] (`none` and HMAC never); a `crit` header; a
//! missing or unknown `kid`; a bad signature; an `aud` claim; a `sub` that is not a
//! SPIFFE ID; a missing or unusable `cnf.jwk` (only EC P-256/ES256 and P-384/ES384
//! workload keys); `exp` passed or further ahead than [`MAX_LIFETIME`]. Keys come from
//! [`WitBundles`]: the JWKS of `FetchWITBundles` (entries with `use: wit-svid`), or a
//! trust bundle's JWT authorities under their WIT key ids.
//!
//! ```no_run
//! use writ_spiffe::svid::wit::{self, WitBundles, WitKey};
//! # fn demo(token: &str, bundles: &writ_spiffe::bundle::BundleSet) -> Result<(), wit::WitError> {
//! let wit = wit::validate(token, &WitBundles::from_bundles(bundles), std::time::SystemTime::now())?;
//! println!("{} holds the key {:?}", wit.spiffe_id, wit.cnf.thumbprint());
//! let key = WitKey::generate()?; // what the agent hands the workload (as a private JWK)
//! # let _ = key; Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use aws_lc_rs::encoding::AsBigEndian as _;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::bundle::{BundleSet, Jwk};
use crate::clock::unix_seconds;
use crate::key::PrivateKey;
use crate::numeric_date::{TimeClaims, TimeError, TimeWindow};
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// The `typ` of a WIT (the media type `application/wit+jwt` without its prefix).
pub const TYP: &str = "wit+jwt";
/// The `use` of a WIT-SVID signing key in a SPIFFE bundle or `FetchWITBundles` JWKS.
pub const BUNDLE_USE: &str = "wit-svid";
/// Prefix of a WIT-SVID `kid`: the signing JWT authority's id follows it.
pub const KID_PREFIX: &str = "wit-";
/// The workload key algorithm Writ issues (`cnf.jwk.alg`).
pub const KEY_ALGORITHM: &str = "ES256";
/// Largest WIT accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest private JWK accepted by [`WitKey::from_jwk`], in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_BYTES: usize = 256;
/// Most keys one trust domain's WIT bundle may hold.
pub const MAX_BUNDLE_KEYS: usize = 64;
/// Clock skew tolerated on `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Furthest ahead of now a WIT's `exp` may be (one day; Writ issues WITs for an hour).
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The time rule of [`validate`].
pub const TIME_WINDOW: TimeWindow = TimeWindow::new(LEEWAY, MAX_LIFETIME);
/// Algorithms a WIT-SVID may be signed with: the WIT-SVID text allows the same RS, ES
/// and PS families as the JWT-SVID standard. `none` and HS* can never appear here.
pub const ALLOWED_ALGORITHMS: &[Algorithm] = super::jwt::ALLOWED_ALGORITHMS;

/// Why a WIT-SVID (or a workload key) was refused, or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitError {
    /// The token is larger than allowed.
    #[error("WIT is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Not a well-formed JWS with a JSON header and claims.
    #[error("WIT is malformed: {0}")]
    Malformed(String),
    /// The header's `typ` is not `wit+jwt`.
    #[error("header typ {0:?} is not wit+jwt")]
    Type(String),
    /// The algorithm is not allowed.
    #[error("algorithm {0} is not allowed for WIT-SVIDs")]
    Algorithm(String),
    /// The header carries `crit`: no extension is understood.
    #[error("the WIT header names critical extensions")]
    Critical,
    /// The header has no `kid`.
    #[error("WIT header has no kid")]
    MissingKid,
    /// No WIT keys for the token's trust domain.
    #[error("no WIT bundle for trust domain {0}")]
    NoBundle(String),
    /// The bundle has no key with the token's `kid`.
    #[error("no WIT-SVID authority with key id {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("WIT signature does not verify: {0}")]
    Signature(String),
    /// A required claim is missing or malformed, or a forbidden one (`aud`) is present.
    #[error("WIT claim {0} is missing, malformed or not allowed")]
    Claim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("WIT sub is not a SPIFFE ID: {0}")]
    Subject(#[from] SpiffeIdError),
    /// The confirmation key is unusable (type, curve, `alg`, coordinates).
    #[error("WIT cnf.jwk is unusable: {0}")]
    Key(String),
    /// The token has expired.
    #[error("WIT has expired")]
    Expired,
    /// A time claim is out of range.
    #[error("WIT {0}")]
    Time(TimeError),
    /// A bundle JWKS could not be read.
    #[error("WIT bundle: {0}")]
    Bundle(String),
    /// Signing or key generation failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The public key of a workload, as `cnf.jwk` carries it (RFC 7800): an EC key with its
/// algorithm.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmationJwk {
    /// `EC`.
    pub kty: String,
    /// `P-256` or `P-384`.
    pub crv: String,
    /// The x coordinate, base64url.
    pub x: String,
    /// The y coordinate, base64url.
    pub y: String,
    /// `ES256` (P-256) or `ES384` (P-384): the algorithm every proof must use.
    pub alg: String,
}

impl fmt::Debug for ConfirmationJwk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmationJwk")
            .field("crv", &self.crv)
            .field("alg", &self.alg)
            .field("thumbprint", &self.thumbprint().unwrap_or_default())
            .finish()
    }
}

impl ConfirmationJwk {
    /// The algorithm proofs are signed with, after checking the key's shape.
    ///
    /// # Errors
    /// [`WitError::Key`] for another key type, curve or `alg`, or bad coordinates.
    pub fn algorithm(&self) -> Result<Algorithm, WitError> {
        let bad = |what: &str| WitError::Key(what.to_owned());
        if self.kty != "EC" {
            return Err(bad("kty must be EC"));
        }
        let (alg, len) = match (self.crv.as_str(), self.alg.as_str()) {
            ("P-256", "ES256") => (Algorithm::ES256, 32),
            ("P-384", "ES384") => (Algorithm::ES384, 48),
            _ => return Err(bad("crv/alg must be P-256/ES256 or P-384/ES384")),
        };
        for c in [&self.x, &self.y] {
            let bytes = URL_SAFE_NO_PAD
                .decode(c)
                .map_err(|_| bad("coordinate is not base64url"))?;
            if bytes.len() != len {
                return Err(bad("wrong coordinate length"));
            }
        }
        Ok(alg)
    }

    /// The key that verifies proofs.
    ///
    /// # Errors
    /// [`WitError::Key`] if the key is unusable.
    pub fn decoding_key(&self) -> Result<DecodingKey, WitError> {
        self.algorithm()?;
        DecodingKey::from_ec_components(&self.x, &self.y).map_err(|e| WitError::Key(e.to_string()))
    }

    /// The RFC 7638 thumbprint (SHA-256, base64url).
    ///
    /// # Errors
    /// [`WitError::Key`] if the key cannot be thumbprinted.
    pub fn thumbprint(&self) -> Result<String, WitError> {
        Jwk {
            kty: self.kty.clone(),
            crv: Some(self.crv.clone()),
            x: Some(self.x.clone()),
            y: Some(self.y.clone()),
            n: None,
            e: None,
        }
        .thumbprint()
        .map_err(|e| WitError::Key(e.to_string()))
    }
}

/// `cnf`: the confirmation claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The workload's public key.
    pub jwk: ConfirmationJwk,
}

/// The claims of a WIT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitClaims {
    /// The workload's SPIFFE ID.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// A random id, for audit (never for replay detection: the WIT-SVID text allows the
    /// same WIT for several instances of a workload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The workload's public key.
    pub cnf: Confirmation,
}

/// A validated WIT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wit {
    /// The workload's SPIFFE ID (`sub`).
    pub spiffe_id: SpiffeId,
    /// The key the workload must prove it holds.
    pub cnf: ConfirmationJwk,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// The signing key's id.
    pub kid: String,
    /// The `jti`, if any.
    pub jti: Option<String>,
}

/// A workload's WIT key pair (EC P-256, ES256). The private half is zeroized on drop and
/// never printed; it travels only as the private JWK of `WITSVID.wit_svid_key`.
#[derive(Clone)]
pub struct WitKey {
    key: PrivateKey,
    d: Zeroizing<Vec<u8>>,
    public: ConfirmationJwk,
}

impl fmt::Debug for WitKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WitKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct PrivateJwk {
    kty: String,
    crv: String,
    x: String,
    y: String,
    d: String,
    #[serde(default)]
    alg: Option<String>,
}

impl WitKey {
    /// A fresh P-256 key pair.
    ///
    /// # Errors
    /// [`WitError::Sign`] if the system random source fails.
    pub fn generate() -> Result<Self, WitError> {
        let key = PrivateKey::generate().map_err(|e| WitError::Sign(e.to_string()))?;
        Self::from_private_key(key)
    }

    fn from_private_key(key: PrivateKey) -> Result<Self, WitError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.pkcs8_der())
            .map_err(|_| WitError::Key("not a P-256 key".into()))?;
        let d = pair
            .private_key()
            .as_be_bytes()
            .map_err(|_| WitError::Key("private scalar unavailable".into()))?;
        let (x, y) = key
            .ec_p256_xy()
            .ok_or_else(|| WitError::Key("not a P-256 key".into()))?;
        let public = ConfirmationJwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
            alg: KEY_ALGORITHM.into(),
        };
        Ok(Self {
            d: Zeroizing::new(d.as_ref().to_vec()),
            key,
            public,
        })
    }

    /// Reads a private JWK (`kty: EC`, `crv: P-256`, `x`, `y`, `d`, `alg: ES256` if
    /// present), as `FetchWITSVID` returns it.
    ///
    /// # Errors
    /// [`WitError::Key`] if the text is too large, not such a JWK, or `d` does not
    /// match `x`/`y`.
    pub fn from_jwk(text: &str) -> Result<Self, WitError> {
        let bad = |what: &str| WitError::Key(what.to_owned());
        if text.len() > MAX_KEY_BYTES {
            return Err(bad("private JWK is too large"));
        }
        let jwk: PrivateJwk =
            serde_json::from_str(text).map_err(|_| bad("not a private EC JWK"))?;
        if jwk.kty != "EC" || jwk.crv != "P-256" {
            return Err(bad("only EC P-256 workload keys are supported"));
        }
        if jwk.alg.as_deref().is_some_and(|a| a != KEY_ALGORITHM) {
            return Err(bad("alg must be ES256"));
        }
        let decode = |v: &str| {
            URL_SAFE_NO_PAD
                .decode(v)
                .map_err(|_| bad("member is not base64url"))
        };
        let d = Zeroizing::new(decode(&jwk.d)?);
        let mut point = vec![0x04];
        point.extend(decode(&jwk.x)?);
        point.extend(decode(&jwk.y)?);
        if d.len() != 32 || point.len() != 65 {
            return Err(bad("wrong key length"));
        }
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            &d,
            &point,
        )
        .map_err(|_| bad("d does not match x and y"))?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| bad("cannot encode the key"))?;
        let key = PrivateKey::from_pkcs8_der(pkcs8.as_ref()).map_err(|e| bad(&e.to_string()))?;
        Self::from_private_key(key)
    }

    /// The private JWK (with `d`). Handle with care.
    pub fn to_jwk(&self) -> Zeroizing<String> {
        Zeroizing::new(
            serde_json::json!({
                "kty": self.public.kty,
                "crv": self.public.crv,
                "x": self.public.x,
                "y": self.public.y,
                "d": URL_SAFE_NO_PAD.encode(self.d.as_slice()),
                "alg": self.public.alg,
            })
            .to_string(),
        )
    }

    /// The public half, for `cnf.jwk`.
    pub fn public_jwk(&self) -> &ConfirmationJwk {
        &self.public
    }

    /// The key as jsonwebtoken signs with it (ES256).
    pub fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ec_der(self.key.pkcs8_der())
    }
}

/// The `kid` of a WIT-SVID signed by the JWT authority `authority_kid`.
pub fn kid(authority_kid: &str) -> String {
    format!("{KID_PREFIX}{authority_kid}")
}

/// Signs a WIT-SVID for `spiffe_id` binding `cnf`, with the trust domain's JWT authority
/// key `authority` (ES256) and a random `jti`.
///
/// # Errors
/// [`WitError::Key`] for an unusable `cnf`, [`WitError::Sign`] if signing fails.
pub fn sign(
    authority: &PrivateKey,
    authority_kid: &str,
    spiffe_id: &SpiffeId,
    cnf: &ConfirmationJwk,
    issued_at: i64,
    expires_at: i64,
) -> Result<String, WitError> {
    cnf.algorithm()?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid(authority_kid));
    header.typ = Some(TYP.into());
    let mut jti = [0u8; 16];
    aws_lc_rs::rand::fill(&mut jti).map_err(|_| WitError::Sign("random source".into()))?;
    let claims = WitClaims {
        sub: spiffe_id.to_string(),
        exp: expires_at,
        iat: issued_at,
        jti: Some(URL_SAFE_NO_PAD.encode(jti)),
        cnf: Confirmation { jwk: cnf.clone() },
    };
    super::jwt::compact_es256(authority, &header, &claims).map_err(WitError::Sign)
}

/// The WIT-SVID signing keys of the trust domains a validator trusts: per trust domain,
/// `kid` -> public key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WitBundles {
    keys: BTreeMap<TrustDomain, BTreeMap<String, Jwk>>,
}

#[derive(Deserialize)]
struct JwksEntry {
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
    #[serde(flatten)]
    key: Jwk,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

impl WitBundles {
    /// No trust domains.
    pub fn new() -> Self {
        Self::default()
    }

    /// The JWT authorities of every bundle in `bundles`, under their WIT key ids
    /// ([`kid`]): Writ signs WIT-SVIDs with its JWT authorities.
    pub fn from_bundles(bundles: &BundleSet) -> Self {
        let mut out = Self::new();
        for bundle in bundles.iter() {
            let keys = bundle
                .jwt_authorities()
                .iter()
                .take(MAX_BUNDLE_KEYS)
                .map(|(k, jwk)| (kid(k), jwk.clone()))
                .collect();
            out.keys.insert(bundle.trust_domain().clone(), keys);
        }
        out
    }

    /// Adds (or replaces) the keys of `trust_domain` from a JWKS as `FetchWITBundles`
    /// returns it: entries with `use: wit-svid` (or no `use`) and a `kid`; others are
    /// skipped.
    ///
    /// # Errors
    /// [`WitError::Bundle`] if the text is too large or not a JWKS, or has more than
    /// [`MAX_BUNDLE_KEYS`] keys.
    pub fn insert_jwks(&mut self, trust_domain: TrustDomain, text: &str) -> Result<(), WitError> {
        if text.len() > MAX_BUNDLE_KEYS * 2048 {
            return Err(WitError::Bundle("JWKS is too large".into()));
        }
        let jwks: Jwks =
            serde_json::from_str(text).map_err(|e| WitError::Bundle(format!("not a JWKS: {e}")))?;
        if jwks.keys.len() > MAX_BUNDLE_KEYS {
            return Err(WitError::Bundle(format!(
                "more than {MAX_BUNDLE_KEYS} keys"
            )));
        }
        let mut keys = BTreeMap::new();
        for value in jwks.keys {
            // An entry this validator cannot read is skipped, as RFC 7517 asks.
            let Ok(entry) = serde_json::from_value::<JwksEntry>(value) else {
                continue;
            };
            if entry.key_use.as_deref().is_some_and(|u| u != BUNDLE_USE) {
                continue;
            }
            if let Some(kid) = entry.kid {
                keys.insert(kid, entry.key);
            }
        }
        self.keys.insert(trust_domain, keys);
        Ok(())
    }

    /// The key `kid` of `trust_domain`.
    pub fn key(&self, trust_domain: &TrustDomain, kid: &str) -> Option<&Jwk> {
        self.keys.get(trust_domain).and_then(|k| k.get(kid))
    }

    /// Whether `trust_domain` has any WIT keys here.
    pub fn has(&self, trust_domain: &TrustDomain) -> bool {
        self.keys.contains_key(trust_domain)
    }
}

/// The JWKS of `FetchWITBundles` for one bundle: its JWT authorities under their WIT key
/// ids, each with `use: wit-svid`.
pub fn bundle_jwks(bundle: &crate::bundle::Bundle) -> String {
    let keys: Vec<serde_json::Value> = bundle
        .jwt_authorities()
        .iter()
        .filter_map(|(k, jwk)| {
            let mut v = serde_json::to_value(jwk).ok()?;
            let map = v.as_object_mut()?;
            map.insert("kid".into(), kid(k).into());
            map.insert("use".into(), BUNDLE_USE.into());
            Some(v)
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

/// The JOSE header of a compact JWS, parsed as JSON, without verifying anything. Used by
/// the WIT and WPT validators to check `typ` and `crit` before anything else.
///
/// # Errors
/// A message if the token is not three base64url parts with a JSON object header.
pub fn unverified_header(
    token: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let mut parts = token.split('.');
    let (Some(head), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(head)
        .map_err(|_| "header is not base64url".to_owned())?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err("header is not a JSON object".into()),
    }
}

/// Whether a `typ` value names `media` (`wit+jwt`, `wpt+jwt`): compared without case,
/// with or without the `application/` prefix (RFC 7515 section 4.1.9).
pub fn typ_is(typ: &str, media: &str) -> bool {
    let t = typ.to_ascii_lowercase();
    t == media || t.strip_prefix("application/") == Some(media)
}

/// Validates a WIT-SVID at `now` against `bundles` (see the module docs). It proves only
/// who the issuer bound the key to: accept it only with a proof of possession.
///
/// # Errors
/// [`WitError`] for the first problem found.
pub fn validate(token: &str, bundles: &WitBundles, now: SystemTime) -> Result<Wit, WitError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(WitError::TooLarge {
            max: MAX_TOKEN_BYTES,
        });
    }
    let raw = unverified_header(token).map_err(WitError::Malformed)?;
    let typ = raw
        .get("typ")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("");
    if !typ_is(typ, TYP) {
        return Err(WitError::Type(typ.chars().take(32).collect()));
    }
    if raw.contains_key("crit") {
        return Err(WitError::Critical);
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| WitError::Malformed(e.to_string()))?;
    if !ALLOWED_ALGORITHMS.contains(&header.alg) {
        return Err(WitError::Algorithm(format!("{:?}", header.alg)));
    }
    let kid = header.kid.ok_or(WitError::MissingKid)?;
    let unverified: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| WitError::Malformed(e.to_string()))?;
    let sub = unverified
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or(WitError::Claim("sub"))?;
    let spiffe_id = SpiffeId::new(sub)?;
    let td = spiffe_id.trust_domain();
    if !bundles.has(&td) {
        return Err(WitError::NoBundle(td.to_string()));
    }
    let jwk = bundles
        .key(&td, &kid)
        .ok_or_else(|| WitError::UnknownKey(kid.chars().take(64).collect()))?;
    let key =
        crate::svid::jwt::decoding_key(jwk).map_err(|e| WitError::Signature(e.to_string()))?;
    let mut validation = Validation::new(header.alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| WitError::Signature(e.to_string()))?
        .claims;
    if claims.get("aud").is_some() {
        return Err(WitError::Claim("aud"));
    }
    let cnf: Confirmation = claims
        .get("cnf")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or(WitError::Claim("cnf"))?;
    cnf.jwk.algorithm()?;
    let jti = match claims.get("jti") {
        None => None,
        Some(serde_json::Value::String(j)) if !j.is_empty() && j.len() <= MAX_JTI_BYTES => {
            Some(j.clone())
        }
        Some(_) => return Err(WitError::Claim("jti")),
    };
    let times = TimeClaims::from_claims(&claims).map_err(|e| match e {
        TimeError::Invalid { claim: "exp" } => WitError::Claim("exp"),
        other => WitError::Time(other),
    })?;
    let now = unix_seconds(now);
    if times.exp <= now {
        return Err(WitError::Expired);
    }
    TIME_WINDOW.check(&times, now).map_err(|e| match e {
        TimeError::Expired => WitError::Expired,
        other => WitError::Time(other),
    })?;
    Ok(Wit {
        spiffe_id,
        cnf: cnf.jwk,
        expires_at: times.exp,
        kid,
        jti,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Bundle;

    const NOW: i64 = 1_800_000_000;

    fn at(secs: i64) -> SystemTime {
        crate::clock::from_unix_seconds(secs)
    }

    fn setup() -> (PrivateKey, WitBundles, SpiffeId) {
        let authority = PrivateKey::generate().unwrap();
        let (x, y) = authority.ec_p256_xy().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let mut bundle = Bundle::new(td);
        bundle
            .put_jwt_authority("a1".into(), Jwk::ec_p256(x, y))
            .unwrap();
        let bundles = WitBundles::from_bundles(&BundleSet::of(bundle));
        (
            authority,
            bundles,
            SpiffeId::new("spiffe://example.org/web").unwrap(),
        )
    }

    #[test]
    fn signed_wits_validate_and_bind_the_key() {
        let (authority, bundles, id) = setup();
        let key = WitKey::generate().unwrap();
        let token = sign(&authority, "a1", &id, key.public_jwk(), NOW, NOW + 3600).unwrap();
        let wit = validate(&token, &bundles, at(NOW)).unwrap();
        assert_eq!(wit.spiffe_id, id);
        assert_eq!(&wit.cnf, key.public_jwk());
        assert_eq!(wit.kid, "wit-a1");
        assert_eq!(
            validate(&token, &bundles, at(NOW + 3600)),
            Err(WitError::Expired)
        );
        assert!(matches!(
            validate(&token, &WitBundles::new(), at(NOW)),
            Err(WitError::NoBundle(_))
        ));
    }

    #[test]
    fn private_jwks_round_trip_and_never_print() {
        let key = WitKey::generate().unwrap();
        let again = WitKey::from_jwk(&key.to_jwk()).unwrap();
        assert_eq!(again.public_jwk(), key.public_jwk());
        assert!(!format!("{key:?}").contains(&*key.to_jwk()));
        let mut other: serde_json::Value = serde_json::from_str(&key.to_jwk()).unwrap();
        other["d"] = URL_SAFE_NO_PAD
            .encode(WitKey::generate().unwrap().d.as_slice())
            .into();
        assert!(WitKey::from_jwk(&other.to_string()).is_err());
        for garbage in ["", "{}", "null", &"x".repeat(MAX_KEY_BYTES + 1)] {
            assert!(WitKey::from_jwk(garbage).is_err(), "{garbage:.20}");
        }
    }

    #[test]
    fn jwt_svids_and_garbage_are_not_wits() {
        let (authority, bundles, id) = setup();
        let jwt =
            crate::svid::jwt::sign(&authority, "a1", &id, &["x".into()], NOW, NOW + 60).unwrap();
        assert!(matches!(
            validate(&jwt, &bundles, at(NOW)),
            Err(WitError::Type(_))
        ));
        let b64 = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(serde_json::json!({"alg": "none", "typ": "wit+jwt"})),
            b64(serde_json::json!({"sub": id.to_string(), "exp": NOW + 60}))
        );
        assert!(validate(&none, &bundles, at(NOW)).is_err());
        for garbage in [
            "",
            "a.b",
            "a.b.c",
            "!!.??.##",
            &"a".repeat(MAX_TOKEN_BYTES + 1),
        ] {
            assert!(
                validate(garbage, &bundles, at(NOW)).is_err(),
                "{garbage:.20}"
            );
        }
    }

    #[test]
    fn fetch_wit_bundles_jwks_round_trips() {
        let (authority, bundles, id) = setup();
        let (x, y) = authority.ec_p256_xy().unwrap();
        let mut bundle = Bundle::new(id.trust_domain());
        bundle
            .put_jwt_authority("a1".into(), Jwk::ec_p256(x, y))
            .unwrap();
        let text = bundle_jwks(&bundle);
        assert!(text.contains("\"use\":\"wit-svid\""));
        let mut parsed = WitBundles::new();
        parsed.insert_jwks(id.trust_domain(), &text).unwrap();
        assert_eq!(parsed, bundles);
        assert!(parsed.insert_jwks(id.trust_domain(), "[]").is_err());
    }
}
