//! The token service's metrics (`writ_txn_*`), in a registry of its own, served on its
//! operations listener ([`crate::ops`]). Labels are an outcome and an RFC 6749 error
//! code: never a caller's or a user's identity.
//!
//! ```
//! use writ_txn_service::metrics::TxnMetrics;
//! let metrics = TxnMetrics::new();
//! metrics.exchanged(None, std::time::Duration::from_millis(2));
//! metrics.exchanged(Some("invalid_scope"), std::time::Duration::from_millis(1));
//! let mut text = String::new();
//! writ_identity::ops::prometheus_client::encoding::text::encode(&mut text, &metrics.registry())?;
//! assert!(text.contains("writ_txn_exchanges_total{outcome=\"granted\",error=\"none\"} 1"));
//! assert!(text.contains("writ_txn_exchanges_total{outcome=\"refused\",error=\"invalid_scope\"} 1"));
//! # Ok::<(), std::fmt::Error>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use writ_identity::ops::metrics::{CounterFamily, Label, Labels2, latency_buckets};
use writ_identity::ops::prometheus_client::metrics::counter::Counter;
use writ_identity::ops::prometheus_client::metrics::family::Family;
use writ_identity::ops::prometheus_client::metrics::histogram::Histogram;
use writ_identity::ops::prometheus_client::registry::Registry;

/// Every error code an exchange may be refused with (RFC 6749 section 5.2, and
/// `temporarily_unavailable` / `server_error`).
pub const ERROR_CODES: [&str; 8] = [
    "invalid_request",
    "invalid_client",
    "invalid_scope",
    "invalid_target",
    "unauthorized_client",
    "unsupported_grant_type",
    "temporarily_unavailable",
    "server_error",
];

/// The token service's metrics.
#[derive(Debug)]
pub struct TxnMetrics {
    registry: Arc<Registry>,
    exchanges: Family<Labels2, Counter>,
    duration: Family<Label, Histogram, fn() -> Histogram>,
    rate_limited: Counter,
    shed: Counter,
    /// The series every granted exchange updates, looked up once (a family lookup
    /// hashes the labels under a lock).
    granted: Counter,
    granted_duration: Histogram,
    cache_hit: Counter,
    cache_miss: Counter,
}

impl Default for TxnMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

impl TxnMetrics {
    /// The metrics, in a registry of their own.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let exchanges = Family::<Labels2, Counter>::default();
        exchanges
            .get_or_create(&[("outcome", "granted"), ("error", "none")])
            .get();
        for code in ERROR_CODES {
            exchanges
                .get_or_create(&[("outcome", "refused"), ("error", code)])
                .get();
        }
        r.register(
            "writ_txn_exchanges",
            "Token exchanges (POST /token), by outcome (granted, refused) and RFC 6749 error code (none when granted)",
            exchanges.clone(),
        );
        let duration =
            Family::<Label, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        for outcome in ["granted", "refused"] {
            drop(duration.get_or_create(&[("outcome", outcome)]));
        }
        r.register(
            "writ_txn_exchange_duration_seconds",
            "Time to decide a token exchange (validation, policy, minting, audit), by outcome",
            duration.clone(),
        );
        let cache = CounterFamily::default();
        for result in ["hit", "miss"] {
            cache.get_or_create(&[("result", result)]).get();
        }
        r.register(
            "writ_txn_subject_cache_lookups",
            "Subject token validation cache lookups, by result (hit, miss); hit ratio = hit / (hit + miss)",
            cache.clone(),
        );
        let rate_limited = Counter::default();
        r.register(
            "writ_txn_rate_limited",
            "Exchanges refused because the caller was over its policy rate limit",
            rate_limited.clone(),
        );
        let shed = Counter::default();
        r.register(
            "writ_txn_shed",
            "Exchanges refused with 503 before being read because the service was at its admission limit ([overload])",
            shed.clone(),
        );
        let granted = exchanges
            .get_or_create(&[("outcome", "granted"), ("error", "none")])
            .clone();
        let granted_duration = duration.get_or_create(&[("outcome", "granted")]).clone();
        let cache_hit = cache.get_or_create(&[("result", "hit")]).clone();
        let cache_miss = cache.get_or_create(&[("result", "miss")]).clone();
        Self {
            registry: Arc::new(r),
            exchanges,
            duration,
            rate_limited,
            shed,
            granted,
            granted_duration,
            cache_hit,
            cache_miss,
        }
    }

    /// The registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// One exchange decided in `took`: granted (`error` `None`) or refused with the error
    /// code `error`.
    pub fn exchanged(&self, error: Option<&'static str>, took: Duration) {
        let Some(code) = error else {
            self.granted.inc();
            self.granted_duration.observe(took.as_secs_f64());
            return;
        };
        self.exchanges
            .get_or_create(&[("outcome", "refused"), ("error", code)])
            .inc();
        self.duration
            .get_or_create(&[("outcome", "refused")])
            .observe(took.as_secs_f64());
    }

    /// An exchange refused by its rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// An exchange shed at the admission limit ([`crate::shed`]).
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// A subject token validation cache lookup: `hit` or not.
    pub fn subject_cache(&self, hit: bool) {
        if hit {
            self.cache_hit.inc();
        } else {
            self.cache_miss.inc();
        }
    }
}
