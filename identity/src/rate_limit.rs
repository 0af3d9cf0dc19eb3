//! Token buckets keyed by a name (a caller, a parent workload): a key may make `burst`
//! requests at once and then `per_second` on average. Time comes from the clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::SharedClock;

/// Most callers tracked at once; beyond it, callers whose bucket is full are forgotten
/// (a full bucket is the same as no bucket).
const MAX_TRACKED: usize = 100_000;

/// A rate: `per_second` requests on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Bucket size (>= 1).
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: f64,
}

/// Token buckets keyed by caller.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
    clock: SharedClock,
}

impl RateLimiter {
    /// No caller tracked yet.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            clock,
        }
    }

    /// Takes one token from `caller`'s bucket, or says how long until one is available.
    ///
    /// # Errors
    /// The wait before the next request may succeed.
    pub fn check(&self, caller: &str, rate: Rate) -> Result<(), Duration> {
        let now = self
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let burst = f64::from(rate.burst.max(1));
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(caller) {
            buckets.retain(|_, b| b.tokens + (now - b.at) * rate.per_second < burst);
        }
        let bucket = buckets.entry(caller.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = (now - bucket.at).max(0.0);
        bucket.tokens = (bucket.tokens + elapsed * rate.per_second).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                ((1.0 - bucket.tokens) / rate.per_second).clamp(0.001, 3600.0),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Arc;

    #[test]
    fn burst_then_rate() {
        let clock = ManualClock::new(std::time::UNIX_EPOCH + Duration::from_secs(1_000));
        let limiter = RateLimiter::new(Arc::new(clock.clone()));
        let rate = Rate {
            per_second: 2.0,
            burst: 3,
        };
        for _ in 0..3 {
            assert!(limiter.check("a", rate).is_ok());
        }
        let wait = limiter.check("a", rate).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO);
        assert!(limiter.check("b", rate).is_ok(), "buckets are per caller");
        clock.advance(Duration::from_millis(500));
        assert!(limiter.check("a", rate).is_ok());
        assert!(limiter.check("a", rate).is_err());
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(
                limiter.check("a", rate).is_ok(),
                "refills to the burst only"
            );
        }
        assert!(limiter.check("a", rate).is_err());
    }
}
