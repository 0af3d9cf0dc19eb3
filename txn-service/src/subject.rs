//! Subject tokens a workload asserts itself (draft-ietf-oauth-transaction-tokens-11,
//! "Self-Signed Subject Token Type" and "Unsigned JSON Object Subject Token Type"): for
//! a transaction a workload starts on its own (a scheduled job, an internal trigger)
//! with no inbound token to exchange.
//!
//! - `urn:ietf:params:oauth:token-type:unsigned_json`: a JSON object (at most
//!   [`MAX_UNSIGNED_JSON_BYTES`]) with `sub` and `scope`, and optionally `exp` (refused
//!   once passed). Accepted only from callers that authenticated with their X509-SVID.
//! - `urn:ietf:params:oauth:token-type:self_signed`: a JWT (`ES256` or `EdDSA`, with a
//!   `kid` of the rule's [`SelfSignedKeys`]) with `iss` = the caller's SPIFFE ID, `aud` =
//!   the service's issuer URL, `iat` (at most [`MAX_SELF_SIGNED_AGE`] old), `exp`
//!   (unexpired, at most [`MAX_SELF_SIGNED_LIFETIME`] ahead), `sub` and `scope`.
//!
//! Both must carry `scope`: a subject token whose scope is unknown is refused, never
//! treated as unconstrained (draft-11, "Unknown `subject_token` scope"). `sub` is at most
//! [`MAX_SUB_BYTES`] of printable text; `scope` a space-separated string or an array of
//! RFC 6749 scope tokens, at most [`MAX_SCOPES`].
//!
//! ```
//! use writ_txn_service::subject::unsigned_json;
//!
//! let s = unsigned_json(r#"{"sub":"alice","scope":"reports.run"}"#, 1_800_000_000).unwrap();
//! assert_eq!(s.sub, "alice");
//! assert!(s.scope.contains("reports.run"));
//! assert!(unsigned_json(r#"{"sub":"alice"}"#, 1_800_000_000).is_err()); // scope unknown
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use writ_identity::spiffe_id::SpiffeId;

use crate::policy::is_scope_token;

/// Largest `unsigned_json` subject token, in bytes.
pub const MAX_UNSIGNED_JSON_BYTES: usize = 4 * 1024;
/// Largest `sub` of a workload-asserted subject, in bytes.
pub const MAX_SUB_BYTES: usize = 256;
/// Most scopes a workload-asserted subject may carry.
pub const MAX_SCOPES: usize = 64;
/// Oldest `iat` of a self-signed subject token accepted.
pub const MAX_SELF_SIGNED_AGE: Duration = Duration::from_secs(300);
/// Furthest ahead a self-signed subject token's `exp` may be.
pub const MAX_SELF_SIGNED_LIFETIME: Duration = Duration::from_secs(3600);
/// Most keys in a rule's `self_signed_jwks`.
pub const MAX_SELF_SIGNED_KEYS: usize = 16;
/// Largest `self_signed_jwks` text, in bytes.
pub const MAX_SELF_SIGNED_JWKS_BYTES: usize = 16 * 1024;
/// Clock skew tolerated on `iat` and `exp`, in seconds.
const LEEWAY_SECS: i64 = 30;

/// Why a workload-asserted subject token was refused (the exchange answers
/// `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubjectError {
    /// Larger than its limit.
    #[error("subject token is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Not a JSON object, or not a well-formed JWT.
    #[error("subject token is malformed: {0}")]
    Malformed(&'static str),
    /// `sub` missing, empty, too long or not printable text.
    #[error("subject token needs a `sub` of 1 to {MAX_SUB_BYTES} printable bytes")]
    Sub,
    /// No `scope`, or an empty one: the service will not treat it as unconstrained.
    #[error(
        "the subject token's scope is unknown (no `scope`): it is never treated as unconstrained"
    )]
    ScopeUnknown,
    /// `scope` is not scope tokens, or too many.
    #[error("subject token `scope` is malformed or has more than {MAX_SCOPES} scopes")]
    Scope,
    /// Past `exp`.
    #[error("subject token has expired")]
    Expired,
    /// A time claim is missing, malformed or out of bounds.
    #[error("subject token {0}")]
    Time(&'static str),
    /// The JWT's key is not one the caller's rule names, or its algorithm is not allowed.
    #[error("self-signed subject token is signed with an unknown key or algorithm")]
    UnknownKey,
    /// The signature does not verify.
    #[error("self-signed subject token signature does not verify")]
    Signature,
    /// `iss` is not the requesting workload.
    #[error("self-signed subject token `iss` must be the requesting workload's SPIFFE ID")]
    Issuer,
    /// `aud` is not this service.
    #[error("self-signed subject token `aud` must be this service's issuer URL")]
    Audience,
}

/// What a workload-asserted subject token establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSubject {
    /// The subject of the transaction.
    pub sub: String,
    /// Its scope (never empty).
    pub scope: BTreeSet<String>,
    /// Its `exp`, if it has one.
    pub expires_at: Option<i64>,
}

/// The keys `self_signed` subject tokens of one policy rule verify with: a JWKS of EC
/// P-256 (`ES256`) or Ed25519 (`EdDSA`) keys, each with a distinct `kid`.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfSignedKeys {
    keys: Vec<(String, Algorithm, Jwk)>,
}

impl SelfSignedKeys {
    /// Parses a JWKS text.
    ///
    /// # Errors
    /// What is wrong with it, for the policy error.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_SELF_SIGNED_JWKS_BYTES {
            return Err(format!(
                "`self_signed_jwks` is larger than {MAX_SELF_SIGNED_JWKS_BYTES} bytes"
            ));
        }
        let set: JwkSet = writ_identity::bundle::parse_strict_json(text)
            .and_then(serde_json::from_value)
            .map_err(|e| format!("`self_signed_jwks` is not a JWKS: {e}"))?;
        if set.keys.is_empty() || set.keys.len() > MAX_SELF_SIGNED_KEYS {
            return Err(format!(
                "`self_signed_jwks` needs 1 to {MAX_SELF_SIGNED_KEYS} keys"
            ));
        }
        let mut keys: Vec<(String, Algorithm, Jwk)> = Vec::new();
        for jwk in set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .filter(|k| !k.is_empty())
                .ok_or("every `self_signed_jwks` key needs a `kid`")?;
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                    Algorithm::EdDSA
                }
                _ => {
                    return Err(format!(
                        "`self_signed_jwks` key `{kid}` is not EC P-256 or Ed25519"
                    ));
                }
            };
            DecodingKey::from_jwk(&jwk)
                .map_err(|e| format!("`self_signed_jwks` key `{kid}`: {e}"))?;
            if keys.iter().any(|(k, _, _)| *k == kid) {
                return Err(format!("`self_signed_jwks` has `kid` `{kid}` twice"));
            }
            keys.push((kid, alg, jwk));
        }
        Ok(Self { keys })
    }

    fn get(&self, kid: &str) -> Option<(Algorithm, &Jwk)> {
        self.keys
            .iter()
            .find(|(k, _, _)| k == kid)
            .map(|(_, alg, jwk)| (*alg, jwk))
    }
}

/// Reads an `unsigned_json` subject token at `now` (Unix seconds).
///
/// # Errors
/// [`SubjectError`] naming what is wrong.
pub fn unsigned_json(token: &str, now: i64) -> Result<WorkloadSubject, SubjectError> {
    if token.len() > MAX_UNSIGNED_JSON_BYTES {
        return Err(SubjectError::TooLarge {
            max: MAX_UNSIGNED_JSON_BYTES,
        });
    }
    let Ok(Value::Object(claims)) = writ_identity::bundle::parse_strict_json(token) else {
        return Err(SubjectError::Malformed("not a JSON object"));
    };
    let claims = Value::Object(claims);
    let expires_at = match claims.get("exp") {
        None => None,
        Some(exp) => Some(
            exp.as_i64()
                .ok_or(SubjectError::Time("`exp` is malformed"))?,
        ),
    };
    if expires_at.is_some_and(|exp| exp <= now) {
        return Err(SubjectError::Expired);
    }
    Ok(WorkloadSubject {
        sub: subject(&claims)?,
        scope: scope(&claims)?,
        expires_at,
    })
}

/// Verifies a `self_signed` subject token presented by `caller` to the service whose
/// issuer URL is `audience`, at `now` (Unix seconds).
///
/// # Errors
/// [`SubjectError`] naming what is wrong.
pub fn self_signed(
    token: &str,
    keys: &SelfSignedKeys,
    caller: &SpiffeId,
    audience: &str,
    now: i64,
) -> Result<WorkloadSubject, SubjectError> {
    if token.len() > crate::exchange::MAX_FIELD_BYTES {
        return Err(SubjectError::TooLarge {
            max: crate::exchange::MAX_FIELD_BYTES,
        });
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| SubjectError::Malformed("not a JWT"))?;
    let (alg, jwk) = header
        .kid
        .as_deref()
        .and_then(|kid| keys.get(kid))
        .filter(|(alg, _)| *alg == header.alg)
        .ok_or(SubjectError::UnknownKey)?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| SubjectError::UnknownKey)?;
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => {
                SubjectError::Malformed("claims are not a JSON object")
            }
            _ => SubjectError::Signature,
        })?
        .claims;
    if claims.get("iss").and_then(Value::as_str) != Some(caller.as_str()) {
        return Err(SubjectError::Issuer);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(SubjectError::Audience);
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or(SubjectError::Time("needs a numeric `iat`"))?;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(SubjectError::Time("needs a numeric `exp`"))?;
    if iat > now.saturating_add(LEEWAY_SECS) {
        return Err(SubjectError::Time("`iat` is in the future"));
    }
    if iat < now.saturating_sub(secs(MAX_SELF_SIGNED_AGE)) {
        return Err(SubjectError::Time("`iat` is too far in the past"));
    }
    if exp <= now {
        return Err(SubjectError::Expired);
    }
    if exp > now.saturating_add(secs(MAX_SELF_SIGNED_LIFETIME)) {
        return Err(SubjectError::Time("`exp` is too far ahead"));
    }
    Ok(WorkloadSubject {
        sub: subject(&claims)?,
        scope: scope(&claims)?,
        expires_at: Some(exp),
    })
}

fn subject(claims: &Value) -> Result<String, SubjectError> {
    match claims.get("sub").and_then(Value::as_str) {
        Some(sub)
            if !sub.is_empty()
                && sub.len() <= MAX_SUB_BYTES
                && !sub.chars().any(char::is_control) =>
        {
            Ok(sub.to_owned())
        }
        _ => Err(SubjectError::Sub),
    }
}

/// The `scope` of a subject token: a space-separated string or an array of strings.
fn scope(claims: &Value) -> Result<BTreeSet<String>, SubjectError> {
    let items: Vec<&str> = match claims.get("scope") {
        None | Some(Value::Null) => return Err(SubjectError::ScopeUnknown),
        Some(Value::String(s)) => s.split(' ').filter(|s| !s.is_empty()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().ok_or(SubjectError::Scope))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(SubjectError::Scope),
    };
    if items.is_empty() {
        return Err(SubjectError::ScopeUnknown);
    }
    if items.len() > MAX_SCOPES || !items.iter().all(|s| is_scope_token(s)) {
        return Err(SubjectError::Scope);
    }
    Ok(items.into_iter().map(str::to_owned).collect())
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn unsigned_json_needs_sub_and_scope() {
        let ok =
            unsigned_json(r#"{"sub":"alice","scope":["a","b"],"exp":1800000060}"#, NOW).unwrap();
        assert_eq!(ok.scope.len(), 2);
        assert_eq!(ok.expires_at, Some(NOW + 60));
        let cases: [(&str, SubjectError); 9] = [
            (r#"{"sub":"alice"}"#, SubjectError::ScopeUnknown),
            (r#"{"sub":"alice","scope":""}"#, SubjectError::ScopeUnknown),
            (r#"{"sub":"alice","scope":[]}"#, SubjectError::ScopeUnknown),
            (r#"{"sub":"alice","scope":7}"#, SubjectError::Scope),
            (r#"{"sub":"alice","scope":"a\"b"}"#, SubjectError::Scope),
            (r#"{"scope":"a"}"#, SubjectError::Sub),
            (r#"{"sub":"","scope":"a"}"#, SubjectError::Sub),
            (
                r#"{"sub":"alice","scope":"a","exp":1800000000}"#,
                SubjectError::Expired,
            ),
            ("[1,2]", SubjectError::Malformed("not a JSON object")),
        ];
        for (text, want) in cases {
            assert_eq!(unsigned_json(text, NOW).unwrap_err(), want, "{text}");
        }
        let long = format!(
            r#"{{"sub":"{}","scope":"a"}}"#,
            "x".repeat(MAX_SUB_BYTES + 1)
        );
        assert_eq!(unsigned_json(&long, NOW).unwrap_err(), SubjectError::Sub);
        let huge = format!(r#"{{"sub":"a","scope":"a","pad":"{}"}}"#, "x".repeat(5000));
        assert!(matches!(
            unsigned_json(&huge, NOW).unwrap_err(),
            SubjectError::TooLarge { .. }
        ));
        let many = format!(
            r#"{{"sub":"a","scope":"{}"}}"#,
            (0..=MAX_SCOPES)
                .map(|i| format!("s{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert_eq!(unsigned_json(&many, NOW).unwrap_err(), SubjectError::Scope);
        assert!(matches!(
            unsigned_json(r#"{"sub":"a","sub":"b","scope":"a"}"#, NOW).unwrap_err(),
            SubjectError::Malformed(_)
        ));
    }

    #[test]
    fn self_signed_keys_refuse_bad_jwks() {
        for bad in [
            "",
            "{}",
            r#"{"keys":[]}"#,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#,
            r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#,
        ] {
            assert!(SelfSignedKeys::parse(bad).is_err(), "{bad}");
        }
        assert!(SelfSignedKeys::parse(&"x".repeat(MAX_SELF_SIGNED_JWKS_BYTES + 1)).is_err());
    }

    proptest! {
        #[test]
        fn garbage_is_refused_not_a_panic(text in ".{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let caller = SpiffeId::new("spiffe://example.org/batch").unwrap();
            let keys = SelfSignedKeys::parse(
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
            ).unwrap();
            let lossy = String::from_utf8_lossy(&bytes);
            for t in [text.as_str(), &lossy] {
                let _ = unsigned_json(t, NOW);
                prop_assert!(self_signed(t, &keys, &caller, "https://tts", NOW).is_err());
            }
        }
    }
}
