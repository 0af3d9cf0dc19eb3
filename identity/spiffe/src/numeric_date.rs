//! The time claims of a JWT (RFC 7519 section 2 NumericDate: `exp`, `nbf`, `iat`) and the
//! one rule every Writ validator applies to them, whoever issued the token: OIDC subject
//! tokens, JWT-SVIDs (client assertions too) and Txn-Tokens.
//!
//! A [`TimeWindow`] refuses a token that has expired, is not valid yet, was issued in the
//! future, or expires further ahead than the longest lifetime its kind may have. The last
//! rule also bounds every cache keyed by a token: no validation is remembered longer than
//! that lifetime. Values outside `0..=`[`MAX_NUMERIC_DATE`] (year 9999), non-finite or
//! non-numeric values are refused before any comparison, so `exp = 1e300` never means
//! "valid forever".
//!
//! ```
//! use std::time::Duration;
//! use writ_spiffe::numeric_date::{TimeClaims, TimeError, TimeWindow};
//! let window = TimeWindow::new(Duration::from_secs(30), Duration::from_secs(3600));
//! let now = 1_800_000_000;
//! let ok = TimeClaims { exp: now + 300, iat: Some(now), nbf: None };
//! assert_eq!(window.check(&ok, now), Ok(()));
//! let far = TimeClaims { exp: now + 5 * 365 * 86_400, iat: Some(now), nbf: None };
//! assert!(matches!(window.check(&far, now), Err(TimeError::TooFarAhead { .. })));
//! ```

use std::time::Duration;

use serde_json::Value;

/// The latest NumericDate accepted: 9999-12-31T23:59:59Z.
pub const MAX_NUMERIC_DATE: i64 = 253_402_300_799;

/// Why a token's time claims were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimeError {
    /// A time claim is not a number in `0..=`[`MAX_NUMERIC_DATE`] (or `exp` is missing).
    #[error("claim `{claim}` is missing or not a valid NumericDate")]
    Invalid {
        /// The claim name.
        claim: &'static str,
    },
    /// `exp` has passed (with leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (with leeway).
    #[error("token is not valid yet (`nbf` is in the future)")]
    NotYetValid,
    /// `iat` is in the future (with leeway).
    #[error("token is issued in the future (`iat`)")]
    IssuedInFuture,
    /// `exp` is further ahead than the longest lifetime accepted.
    #[error("token expires more than {max_secs} s from now (`exp` too far ahead)")]
    TooFarAhead {
        /// The longest lifetime accepted, in seconds.
        max_secs: u64,
    },
    /// `nbf` or `iat` is after `exp`.
    #[error("claim `{claim}` is after `exp`")]
    AfterExpiry {
        /// The claim name.
        claim: &'static str,
    },
}

/// A NumericDate claim read from JSON: `Ok(None)` when absent, whole seconds (a
/// fraction, which RFC 7519 allows, is dropped) when a finite number in range.
///
/// # Errors
/// [`TimeError::Invalid`] for any other value (string, `null`, negative, `1e300`...).
pub fn from_claim(claims: &Value, claim: &'static str) -> Result<Option<i64>, TimeError> {
    let Some(value) = claims.get(claim) else {
        return Ok(None);
    };
    let invalid = TimeError::Invalid { claim };
    let secs = match value {
        Value::Number(n) => match n.as_i64() {
            Some(i) => i,
            None => {
                let f = n.as_f64().filter(|f| f.is_finite()).ok_or(invalid)?;
                // Range-checked first, so the conversion cannot saturate
                // (MAX_NUMERIC_DATE is far below 2^53).
                if !(0.0..=MAX_NUMERIC_DATE as f64).contains(&f) {
                    return Err(invalid);
                }
                f.floor() as i64
            }
        },
        _ => return Err(invalid),
    };
    in_range(secs, claim).map(Some)
}

fn in_range(secs: i64, claim: &'static str) -> Result<i64, TimeError> {
    if (0..=MAX_NUMERIC_DATE).contains(&secs) {
        Ok(secs)
    } else {
        Err(TimeError::Invalid { claim })
    }
}

/// The time claims of one token, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeClaims {
    /// `exp` (required).
    pub exp: i64,
    /// `iat`, if present.
    pub iat: Option<i64>,
    /// `nbf`, if present.
    pub nbf: Option<i64>,
}

impl TimeClaims {
    /// Reads `exp` (required), `iat` and `nbf` from a claims object.
    ///
    /// # Errors
    /// [`TimeError::Invalid`] if `exp` is missing or a claim is not a valid NumericDate.
    pub fn from_claims(claims: &Value) -> Result<Self, TimeError> {
        Ok(Self {
            exp: from_claim(claims, "exp")?.ok_or(TimeError::Invalid { claim: "exp" })?,
            iat: from_claim(claims, "iat")?,
            nbf: from_claim(claims, "nbf")?,
        })
    }
}

/// The clock skew tolerated and the longest lifetime accepted for one kind of token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// How far ahead of now `exp` may be (plus the leeway).
    pub max_lifetime: Duration,
}

impl TimeWindow {
    /// A window with `leeway` and `max_lifetime`.
    pub const fn new(leeway: Duration, max_lifetime: Duration) -> Self {
        Self {
            leeway,
            max_lifetime,
        }
    }

    /// Checks `claims` at `now` (seconds since the Unix epoch).
    ///
    /// # Errors
    /// The [`TimeError`] of the first rule broken: range, then `exp` passed, `exp` too
    /// far ahead, `nbf` in the future, `iat` in the future, `nbf`/`iat` after `exp`.
    pub fn check(&self, claims: &TimeClaims, now: i64) -> Result<(), TimeError> {
        let exp = in_range(claims.exp, "exp")?;
        let iat = claims.iat.map(|t| in_range(t, "iat")).transpose()?;
        let nbf = claims.nbf.map(|t| in_range(t, "nbf")).transpose()?;
        let leeway = secs(self.leeway);
        if exp.saturating_add(leeway) <= now {
            return Err(TimeError::Expired);
        }
        if exp
            > now
                .saturating_add(secs(self.max_lifetime))
                .saturating_add(leeway)
        {
            return Err(TimeError::TooFarAhead {
                max_secs: self.max_lifetime.as_secs(),
            });
        }
        if nbf.is_some_and(|t| t.saturating_sub(leeway) > now) {
            return Err(TimeError::NotYetValid);
        }
        if iat.is_some_and(|t| t.saturating_sub(leeway) > now) {
            return Err(TimeError::IssuedInFuture);
        }
        if nbf.is_some_and(|t| t > exp) {
            return Err(TimeError::AfterExpiry { claim: "nbf" });
        }
        if iat.is_some_and(|t| t > exp) {
            return Err(TimeError::AfterExpiry { claim: "iat" });
        }
        Ok(())
    }

    /// How long a validation of a token expiring at `exp` may be remembered at `now`:
    /// until `exp` plus the leeway, never longer than the longest lifetime.
    pub fn cache_ttl(&self, exp: i64, now: i64) -> Duration {
        let left = exp.saturating_add(secs(self.leeway)).saturating_sub(now);
        Duration::from_secs(u64::try_from(left).unwrap_or(0)).min(self.max_lifetime)
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;

    fn window() -> TimeWindow {
        TimeWindow::new(Duration::from_secs(30), Duration::from_secs(24 * 3600))
    }

    fn times(exp: i64, iat: Option<i64>, nbf: Option<i64>) -> TimeClaims {
        TimeClaims { exp, iat, nbf }
    }

    #[test]
    fn numeric_dates_out_of_range_are_invalid() {
        for bad in [
            json!({"exp": 1e300}),
            json!({"exp": -1}),
            json!({"exp": "1800000000"}),
            json!({"exp": null}),
            json!({"exp": 253_402_300_800_i64}),
            json!({"exp": i64::MAX}),
            json!({"exp": u64::MAX}),
            json!({}),
        ] {
            assert_eq!(
                TimeClaims::from_claims(&bad),
                Err(TimeError::Invalid { claim: "exp" }),
                "{bad}"
            );
        }
        let ok = TimeClaims::from_claims(&json!({"exp": 1_800_000_300.7, "iat": NOW})).unwrap();
        assert_eq!(ok, times(1_800_000_300, Some(NOW), None));
        assert_eq!(
            TimeClaims::from_claims(&json!({"exp": NOW, "nbf": 1e300})),
            Err(TimeError::Invalid { claim: "nbf" })
        );
    }

    #[test]
    fn window_rules() {
        let w = window();
        assert_eq!(
            w.check(&times(NOW + 300, Some(NOW), Some(NOW)), NOW),
            Ok(())
        );
        // Leeway both ways.
        assert_eq!(w.check(&times(NOW - 29, None, None), NOW), Ok(()));
        assert_eq!(
            w.check(&times(NOW - 30, None, None), NOW),
            Err(TimeError::Expired)
        );
        assert_eq!(
            w.check(&times(NOW + 300, Some(NOW + 30), None), NOW),
            Ok(())
        );
        assert_eq!(
            w.check(&times(NOW + 300, Some(NOW + 31), None), NOW),
            Err(TimeError::IssuedInFuture)
        );
        assert_eq!(
            w.check(&times(NOW + 300, None, Some(NOW + 31)), NOW),
            Err(TimeError::NotYetValid)
        );
        // In the future and after exp: named as in the future.
        assert_eq!(
            w.check(&times(NOW + 300, Some(NOW + 3600), None), NOW),
            Err(TimeError::IssuedInFuture)
        );
        assert_eq!(
            w.check(&times(NOW + 5 * 365 * 86_400, Some(NOW), None), NOW),
            Err(TimeError::TooFarAhead { max_secs: 86_400 })
        );
        assert_eq!(w.check(&times(NOW + 86_400 + 30, None, None), NOW), Ok(()));
        assert_eq!(
            w.check(&times(NOW + 10, None, Some(NOW + 20)), NOW),
            Err(TimeError::AfterExpiry { claim: "nbf" })
        );
        assert_eq!(
            w.check(&times(i64::MAX, None, None), NOW),
            Err(TimeError::Invalid { claim: "exp" })
        );
    }

    #[test]
    fn cache_ttl_is_bounded() {
        let w = window();
        assert_eq!(w.cache_ttl(NOW + 60, NOW), Duration::from_secs(90));
        assert_eq!(w.cache_ttl(MAX_NUMERIC_DATE, NOW), w.max_lifetime);
        assert_eq!(w.cache_ttl(NOW - 100, NOW), Duration::ZERO);
    }
}
