//! JWT-SVIDs per the SPIFFE JWT-SVID standard.
//!
//! Header: `alg` (ES256 by default), `kid`, `typ: JWT`. Claims: `sub` (the SPIFFE ID),
//! `aud` (one or more audiences), `exp`, `iat`, and `jti` (a random id, which the
//! JWT-SVID standard allows as an extra claim, so a validator can refuse a replayed
//! token, RFC 7523 section 3). [`validate`] refuses `alg: none`, any HMAC algorithm, a
//! missing `kid`, an unknown key, a missing or wrong audience, a `sub` that is not a
//! SPIFFE ID, and time claims outside [`TIME_WINDOW`]: expired, `exp` more than
//! [`MAX_LIFETIME`] ahead (or not a sane NumericDate, such as `1e300`), `nbf` or `iat`
//! in the future beyond [`LEEWAY`]. Time comes from the caller, so expiry follows the
//! injected [`crate::clock::Clock`].
//!
//! ```no_run
//! use writ_spiffe::bundle::BundleSet;
//! use writ_spiffe::svid::jwt;
//! # fn demo(token: &str, bundles: BundleSet) -> Result<(), jwt::JwtSvidError> {
//! let svid = jwt::validate(token, &["tool-server"], &bundles, std::time::SystemTime::now())?;
//! println!("caller is {}", svid.spiffe_id);
//! # Ok(()) }
//! ```

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::bundle::{BundleSet, Jwk};
use crate::clock::unix_seconds;
use crate::key::PrivateKey;
use crate::numeric_date::{TimeClaims, TimeError, TimeWindow};
use crate::spiffe_id::{SpiffeId, SpiffeIdError};

/// Largest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most audiences one JWT-SVID may name.
pub const MAX_AUDIENCES: usize = 32;
/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_BYTES: usize = 256;
/// Clock skew tolerated on `nbf` and `iat` (an `exp` in the past is expired: the
/// issuer and the validator share the trust domain's clock discipline).
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Furthest ahead of now a JWT-SVID's `exp` may be (one year): a token claiming to be
/// valid longer was not minted by a sane issuer.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// The time rule of [`validate`].
pub const TIME_WINDOW: TimeWindow = TimeWindow::new(LEEWAY, MAX_LIFETIME);

/// Algorithms a JWT-SVID may be signed with (the JWT-SVID standard's RS, ES and PS
/// families). `none` and HS* can never appear here.
pub const ALLOWED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Why a JWT-SVID was refused (or could not be made).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// The token is larger than allowed.
    #[error("token is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// The token is not a well-formed JWS (or uses an algorithm this library does not
    /// know, such as `none`).
    #[error("token is malformed: {0}")]
    Malformed(String),
    /// The algorithm is not allowed for JWT-SVIDs.
    #[error("algorithm {0} is not allowed for JWT-SVIDs")]
    Algorithm(String),
    /// The header has a `typ` other than `JWT` or `JOSE`.
    #[error("header typ {0:?} is not JWT or JOSE")]
    Type(String),
    /// The header has no `kid`.
    #[error("token header has no kid")]
    MissingKid,
    /// No bundle for the token's trust domain.
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    /// The bundle has no key with the token's `kid`.
    #[error("no JWT authority with key id {0:?}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("signature does not verify: {0}")]
    Signature(String),
    /// A required claim is missing or has the wrong type.
    #[error("claim {0} is missing or malformed")]
    Claim(&'static str),
    /// `sub` is not a SPIFFE ID.
    #[error("sub is not a SPIFFE ID: {0}")]
    Subject(#[from] SpiffeIdError),
    /// None of the token's audiences is one the validator expects.
    #[error("audience does not match")]
    Audience,
    /// The token has expired.
    #[error("token has expired")]
    Expired,
    /// A time claim is out of range: not a sane NumericDate, `exp` too far ahead, or
    /// `nbf`/`iat` in the future.
    #[error("{0}")]
    Time(TimeError),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// `aud`: one string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single audience.
    One(String),
    /// Several audiences.
    Many(Vec<String>),
}

impl Audience {
    /// The audiences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Audience::One(a) => vec![a.clone()],
            Audience::Many(v) => v.clone(),
        }
    }
}

/// The registered claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtSvidClaims {
    /// The SPIFFE ID.
    pub sub: String,
    /// Audiences.
    pub aud: Audience,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: i64,
    /// A unique id of this token (random), for replay detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The issuer, when the trust domain configures one (`[ca] jwt_issuer`): the URL an
    /// OIDC discovery document is served under. Validation does not require it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// A validated JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// All audiences the token names.
    pub audience: Vec<String>,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Issued at, Unix seconds.
    pub issued_at: i64,
    /// The key id that signed it.
    pub kid: String,
    /// The token's `jti`, if it has one (every JWT-SVID Writ mints does).
    pub jti: Option<String>,
}

/// Signs a JWT-SVID with an EC P-256 key (ES256), with a fresh random `jti`.
///
/// # Errors
/// [`JwtSvidError::Sign`] if the key cannot sign.
pub fn sign(
    key: &PrivateKey,
    kid: &str,
    spiffe_id: &SpiffeId,
    audience: &[String],
    issued_at: i64,
    expires_at: i64,
) -> Result<String, JwtSvidError> {
    sign_with_issuer(key, kid, spiffe_id, audience, issued_at, expires_at, None)
}

/// As [`sign`], with an `iss` claim when `issuer` is given (the OIDC discovery issuer
/// URL relying parties such as cloud providers match).
///
/// # Errors
/// [`JwtSvidError::Sign`] if the key cannot sign.
pub fn sign_with_issuer(
    key: &PrivateKey,
    kid: &str,
    spiffe_id: &SpiffeId,
    audience: &[String],
    issued_at: i64,
    expires_at: i64,
    issuer: Option<&str>,
) -> Result<String, JwtSvidError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    let aud = match audience {
        [one] => Audience::One(one.clone()),
        many => Audience::Many(many.to_vec()),
    };
    let claims = JwtSvidClaims {
        sub: spiffe_id.to_string(),
        aud,
        exp: expires_at,
        iat: issued_at,
        jti: Some(uuid::Uuid::new_v4().to_string()),
        iss: issuer.map(str::to_owned),
    };
    compact_es256(key, &header, &claims).map_err(JwtSvidError::Sign)
}

/// The compact JWS (`header.payload.signature`, base64url) of `header` and `claims`
/// signed ES256 with `key`, which is parsed once and kept ([`PrivateKey::sign_es256`]):
/// what `jsonwebtoken::encode` produces, without its parse of the key per token.
///
/// # Errors
/// Why serializing or signing failed, in words.
pub fn compact_es256(
    key: &PrivateKey,
    header: &Header,
    claims: &impl Serialize,
) -> Result<String, String> {
    let header = serde_json::to_vec(header).map_err(|e| e.to_string())?;
    let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
    let mut token = String::with_capacity((header.len() + claims.len() + 64) * 4 / 3 + 8);
    URL_SAFE_NO_PAD.encode_string(header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims, &mut token);
    let signature = key
        .sign_es256(token.as_bytes())
        .map_err(|e| e.to_string())?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

/// The decoding key for a bundle JWK.
///
/// # Errors
/// [`JwtSvidError::Signature`] if the JWK does not describe a usable key.
pub fn decoding_key(jwk: &Jwk) -> Result<DecodingKey, JwtSvidError> {
    let bad = |e: jsonwebtoken::errors::Error| JwtSvidError::Signature(e.to_string());
    let missing = || JwtSvidError::Signature("incomplete JWK".into());
    match jwk.kty.as_str() {
        "EC" => DecodingKey::from_ec_components(
            jwk.x.as_deref().ok_or_else(missing)?,
            jwk.y.as_deref().ok_or_else(missing)?,
        )
        .map_err(bad),
        "RSA" => DecodingKey::from_rsa_components(
            jwk.n.as_deref().ok_or_else(missing)?,
            jwk.e.as_deref().ok_or_else(missing)?,
        )
        .map_err(bad),
        "OKP" => {
            DecodingKey::from_ed_components(jwk.x.as_deref().ok_or_else(missing)?).map_err(bad)
        }
        _ => Err(JwtSvidError::Signature("unsupported key type".into())),
    }
}

/// Validates a JWT-SVID against the bundle of the trust domain named in its `sub`,
/// requiring at least one of `expected_audiences` in its `aud`, at time `now`.
///
/// # Errors
/// [`JwtSvidError`] for the first problem found.
pub fn validate(
    token: &str,
    expected_audiences: &[&str],
    bundles: &BundleSet,
    now: SystemTime,
) -> Result<JwtSvid, JwtSvidError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtSvidError::TooLarge {
            max: MAX_TOKEN_BYTES,
        });
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtSvidError::Malformed(e.to_string()))?;
    if !ALLOWED_ALGORITHMS.contains(&header.alg) {
        return Err(JwtSvidError::Algorithm(format!("{:?}", header.alg)));
    }
    if let Some(typ) = header.typ.as_deref()
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(JwtSvidError::Type(typ.chars().take(32).collect()));
    }
    let kid = header.kid.ok_or(JwtSvidError::MissingKid)?;
    // The trust domain is read from the (not yet trusted) sub to pick the bundle; the
    // signature check below then binds it.
    let unverified: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| JwtSvidError::Malformed(e.to_string()))?;
    let sub = unverified
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .ok_or(JwtSvidError::Claim("sub"))?;
    let spiffe_id = SpiffeId::new(sub)?;
    let td = spiffe_id.trust_domain();
    let bundle = bundles
        .get(&td)
        .ok_or_else(|| JwtSvidError::NoBundle(td.to_string()))?;
    let jwk = bundle
        .jwt_authority(&kid)
        .ok_or_else(|| JwtSvidError::UnknownKey(kid.chars().take(64).collect()))?;
    let key = decoding_key(jwk)?;

    let mut validation = Validation::new(header.alg);
    // exp and aud are checked below against the injected clock and the caller's list.
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| JwtSvidError::Signature(e.to_string()))?;
    let claims = data.claims;
    let jti = match claims.get("jti") {
        None => None,
        Some(serde_json::Value::String(j)) if !j.is_empty() && j.len() <= MAX_JTI_BYTES => {
            Some(j.clone())
        }
        Some(_) => return Err(JwtSvidError::Claim("jti")),
    };
    let audience: Audience = claims
        .get("aud")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .ok_or(JwtSvidError::Claim("aud"))?;
    let audience = audience.to_vec();
    if audience.is_empty() || audience.len() > MAX_AUDIENCES {
        return Err(JwtSvidError::Claim("aud"));
    }
    if !audience
        .iter()
        .any(|a| expected_audiences.contains(&a.as_str()))
    {
        return Err(JwtSvidError::Audience);
    }
    // An `exp` in the past is expired without leeway (as before); the window's leeway
    // applies to `nbf` and `iat`.
    let times = TimeClaims::from_claims(&claims).map_err(|e| match e {
        TimeError::Invalid { claim: "exp" } => JwtSvidError::Claim("exp"),
        other => JwtSvidError::Time(other),
    })?;
    let now = unix_seconds(now);
    if times.exp <= now {
        return Err(JwtSvidError::Expired);
    }
    TIME_WINDOW.check(&times, now).map_err(|e| match e {
        TimeError::Expired => JwtSvidError::Expired,
        other => JwtSvidError::Time(other),
    })?;
    Ok(JwtSvid {
        spiffe_id,
        audience,
        expires_at: times.exp,
        issued_at: times.iat.unwrap_or(0),
        kid,
        jti,
    })
}
