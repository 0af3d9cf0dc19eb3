//! JWT-SVID client assertions (draft-ietf-oauth-spiffe-client-auth, a profile of RFC
//! 7523): the replay check the service applies after the agent has validated one.
//!
//! RFC 7523 section 3: "The authorization server MAY ensure that JWTs are not replayed
//! by maintaining the set of used `jti` values for the length of time for which the JWT
//! would be considered valid". [`ReplayCache`] does that, keyed by (`sub`, `jti`):
//! an assertion is accepted once; presented again before it expires, it is refused. An
//! assertion without `jti` is refused (it could not be told from its replay). Entries
//! live until the assertion's `exp` plus the leeway, and since an assertion whose `exp`
//! is more than [`MAX_ASSERTION_LIFETIME`] ahead is refused, no entry lives longer. The
//! cache holds at most [`DEFAULT_CAPACITY`] entries; past that, the least recently used
//! are dropped first.
//!
//! ```
//! use std::sync::Arc;
//! use writ_identity::clock::SystemClock;
//! use writ_identity::spiffe_id::SpiffeId;
//! use writ_txn_service::client_assertion::{ReplayCache, ReplayError};
//!
//! let cache = ReplayCache::new(Arc::new(SystemClock));
//! let id = SpiffeId::new("spiffe://example.org/proxied").unwrap();
//! let now = writ_identity::clock::unix_seconds(std::time::SystemTime::now());
//! let claims = serde_json::json!({ "jti": "a1", "exp": now + 60, "iat": now });
//! assert_eq!(cache.check(&id, &claims), Ok(()));
//! assert_eq!(cache.check(&id, &claims), Err(ReplayError::Replayed));
//! ```

use std::time::{Duration, Instant};

use serde_json::Value;
use writ_identity::clock::SharedClock;
use writ_identity::numeric_date::{TimeClaims, TimeError, TimeWindow};
use writ_identity::spiffe_id::SpiffeId;

/// Most assertions remembered.
pub const DEFAULT_CAPACITY: u64 = 100_000;
/// Furthest ahead of now an assertion's `exp` may be (1 hour; RFC 7523 section 3 lets
/// the server refuse an `exp` unreasonably far in the future).
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// Clock skew tolerated on the assertion's time claims.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Longest `jti` accepted, in bytes.
pub const MAX_JTI_BYTES: usize = 256;
/// The time rule of client assertions.
pub const TIME_WINDOW: TimeWindow = TimeWindow::new(LEEWAY, MAX_ASSERTION_LIFETIME);

/// Why a client assertion was refused by the replay check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// No `jti` (or not a string of 1 to [`MAX_JTI_BYTES`] bytes).
    #[error("client assertion has no `jti`, so its replay cannot be detected")]
    MissingJti,
    /// The time claims are out of range (for example `exp` more than
    /// [`MAX_ASSERTION_LIFETIME`] ahead).
    #[error("client assertion time claims are out of range: {0}")]
    Time(TimeError),
    /// This (`sub`, `jti`) was accepted before and has not expired.
    #[error("client assertion was already used")]
    Replayed,
}

/// The (`sub`, `jti`) pairs of accepted client assertions, each until its `exp`.
#[derive(Debug)]
pub struct ReplayCache {
    seen: moka::sync::Cache<(String, String), i64>,
    clock: SharedClock,
}

/// An entry lives until its assertion's `exp` plus the leeway (by the cache's clock).
struct UntilExpiry(SharedClock);

impl moka::Expiry<(String, String), i64> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &(String, String),
        exp: &i64,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(TIME_WINDOW.cache_ttl(*exp, self.0.unix_seconds()))
    }
}

impl ReplayCache {
    /// An empty cache of [`DEFAULT_CAPACITY`], reading time from `clock`.
    pub fn new(clock: SharedClock) -> Self {
        Self::with_capacity(clock, DEFAULT_CAPACITY)
    }

    /// An empty cache of `capacity` entries.
    pub fn with_capacity(clock: SharedClock, capacity: u64) -> Self {
        Self {
            seen: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExpiry(clock.clone()))
                .build(),
            clock,
        }
    }

    /// Records the assertion of `id` whose (already verified) claims are `claims`.
    ///
    /// # Errors
    /// [`ReplayError::MissingJti`], [`ReplayError::Time`], or [`ReplayError::Replayed`]
    /// if the same `sub` and `jti` were accepted before and have not expired.
    pub fn check(&self, id: &SpiffeId, claims: &Value) -> Result<(), ReplayError> {
        let jti = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_BYTES)
            .ok_or(ReplayError::MissingJti)?;
        let times = TimeClaims::from_claims(claims).map_err(ReplayError::Time)?;
        let now = self.clock.unix_seconds();
        TIME_WINDOW.check(&times, now).map_err(ReplayError::Time)?;
        let entry = self
            .seen
            .entry((id.as_str().to_owned(), jti.to_owned()))
            .or_insert(times.exp);
        if entry.is_fresh() {
            Ok(())
        } else {
            Err(ReplayError::Replayed)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    use serde_json::json;
    use writ_identity::clock::ManualClock;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn cache() -> (ReplayCache, ManualClock) {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
        (ReplayCache::new(Arc::new(clock.clone())), clock)
    }

    fn id(path: &str) -> SpiffeId {
        SpiffeId::new(&format!("spiffe://example.org/{path}")).unwrap()
    }

    #[test]
    fn an_assertion_is_accepted_once() {
        let (cache, _) = cache();
        let claims = json!({"jti": "one", "exp": NOW + 300, "iat": NOW});
        assert_eq!(cache.check(&id("a"), &claims), Ok(()));
        for _ in 0..4 {
            assert_eq!(cache.check(&id("a"), &claims), Err(ReplayError::Replayed));
        }
        // Another subject with the same jti, or another jti, is another assertion.
        assert_eq!(cache.check(&id("b"), &claims), Ok(()));
        let other = json!({"jti": "two", "exp": NOW + 300, "iat": NOW});
        assert_eq!(cache.check(&id("a"), &other), Ok(()));
    }

    #[test]
    fn jti_is_required_and_time_is_bounded() {
        let (cache, _) = cache();
        for claims in [
            json!({"exp": NOW + 300}),
            json!({"jti": "", "exp": NOW + 300}),
            json!({"jti": 7, "exp": NOW + 300}),
            json!({"jti": "x".repeat(MAX_JTI_BYTES + 1), "exp": NOW + 300}),
        ] {
            assert_eq!(
                cache.check(&id("a"), &claims),
                Err(ReplayError::MissingJti),
                "{claims}"
            );
        }
        assert_eq!(
            cache.check(&id("a"), &json!({"jti": "far", "exp": NOW + 7200})),
            Err(ReplayError::Time(TimeError::TooFarAhead { max_secs: 3600 }))
        );
        assert_eq!(
            cache.check(&id("a"), &json!({"jti": "huge", "exp": 1e300})),
            Err(ReplayError::Time(TimeError::Invalid { claim: "exp" }))
        );
    }
}
