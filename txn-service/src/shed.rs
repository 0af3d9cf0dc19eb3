//! Overload shedding: an admission limit on the exchanges in flight, with a short
//! bounded queue in front of it.
//!
//! `POST /token` is admitted while fewer than [`OverloadLimits::max_in_flight`]
//! exchanges run; beyond that a request waits in a queue of at most
//! [`OverloadLimits::max_queue`] requests for at most [`OverloadLimits::queue_timeout`].
//! A request that is not admitted by then is answered at once, before its body is read
//! or parsed, with `503 Service Unavailable`, `Retry-After: 1` and the RFC 6749 error
//! body `{"error":"temporarily_unavailable",...}` (section 4.1.2.1). A caller over its own
//! policy rate limit still gets `429` from the exchange itself ([`crate::rate_limit`]):
//! 503 says the service is busy, 429 that the caller is.
//!
//! Shed requests are counted in `writ_txn_shed_total` ([`crate::metrics`]) and
//! written to the audit log as one aggregated `suppressed` line per
//! [`SUMMARY_INTERVAL`] (and at shutdown), never one line per shed request: under
//! overload that would itself be the overload. The JWKS, the metadata document and
//! every other route are never shed.
//!
//! In `txn.toml` (these are the defaults on a machine with 2 cores):
//!
//! ```toml
//! [overload]
//! max_in_flight = 8        # exchanges running at once (default 4 x cores)
//! max_queue = 256          # requests waiting for a slot (default: 32 x max_in_flight; 0: none)
//! queue_timeout = "10ms"   # longest wait for a slot before the 503
//! ```
//!
//! ```
//! use std::sync::Arc;
//! use writ_txn_service::shed::{FileOverload, OverloadLimits, Shedder};
//!
//! let file: FileOverload = toml::from_str("max_in_flight = 1\nmax_queue = 0")?;
//! let limits = OverloadLimits::from_file(&file)?;
//! assert_eq!(limits.max_in_flight, 1);
//! let shed = Shedder::new(limits, None, None, Arc::new(writ_identity::clock::SystemClock));
//! let held = shed.try_admit().expect("a free slot");
//! assert!(shed.try_admit().is_none(), "one slot, taken");
//! drop(held);
//! assert!(shed.try_admit().is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use writ_identity::clock::SharedClock;
use writ_identity::duration::ConfigDuration;

use crate::audit::{AuditLog, AuditRecord};
use crate::metrics::TxnMetrics;

/// The most exchanges in flight a configuration may allow.
pub const MAX_IN_FLIGHT_LIMIT: usize = 65_536;
/// The longest queue a configuration may allow.
pub const MAX_QUEUE_LIMIT: usize = 65_536;
/// The longest queue wait a configuration may allow: beyond it a request had better be
/// refused and retried than held.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default queue wait: with an exchange's own millisecond or so, an admitted request
/// stays well under 20 ms.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_millis(10);
/// Default exchanges in flight per core.
pub const IN_FLIGHT_PER_CORE: usize = 4;
/// Default requests waiting per slot: enough that a burst from a few dozen keep-alive
/// clients waits (for at most the queue timeout) instead of being refused at once.
pub const QUEUED_PER_SLOT: usize = 32;
/// How often the count of shed requests is written to the audit log (when not zero).
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// The `Retry-After` of a shed request, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The body of a shed request's 503 (RFC 6749 section 5.2 shape).
const SHED_BODY: &str = r#"{"error":"temporarily_unavailable","error_description":"the token service is at its admission limit; retry later"}"#;

/// The `[overload]` table of `txn.toml`, as serde reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOverload {
    /// Exchanges running at once.
    pub max_in_flight: Option<usize>,
    /// Requests waiting for a slot (0: none wait).
    pub max_queue: Option<usize>,
    /// Longest wait for a slot.
    pub queue_timeout: Option<ConfigDuration>,
}

/// Validated admission limits of `POST /token`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverloadLimits {
    /// Exchanges running at once (1 to [`MAX_IN_FLIGHT_LIMIT`]).
    pub max_in_flight: usize,
    /// Requests waiting for a slot (0 to [`MAX_QUEUE_LIMIT`]).
    pub max_queue: usize,
    /// Longest wait for a slot (1 ms to [`MAX_QUEUE_TIMEOUT`]).
    pub queue_timeout: Duration,
}

impl Default for OverloadLimits {
    /// [`IN_FLIGHT_PER_CORE`] × the cores in flight, [`QUEUED_PER_SLOT`] times as many
    /// waiting, for at most [`DEFAULT_QUEUE_TIMEOUT`].
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let max_in_flight = (IN_FLIGHT_PER_CORE * cores).min(MAX_IN_FLIGHT_LIMIT);
        Self {
            max_in_flight,
            max_queue: (QUEUED_PER_SLOT * max_in_flight).min(MAX_QUEUE_LIMIT),
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
        }
    }
}

impl OverloadLimits {
    /// Validates the `[overload]` table; absent fields take the defaults.
    ///
    /// # Errors
    /// A message naming the field for a value out of range.
    pub fn from_file(file: &FileOverload) -> Result<Self, String> {
        let defaults = Self::default();
        let max_in_flight = match file.max_in_flight {
            None => defaults.max_in_flight,
            Some(n) if (1..=MAX_IN_FLIGHT_LIMIT).contains(&n) => n,
            Some(n) => {
                return Err(format!(
                    "`overload.max_in_flight` must be 1 to {MAX_IN_FLIGHT_LIMIT}, not {n}"
                ));
            }
        };
        let max_queue = match file.max_queue {
            None => (QUEUED_PER_SLOT * max_in_flight).min(MAX_QUEUE_LIMIT),
            Some(n) if n <= MAX_QUEUE_LIMIT => n,
            Some(n) => {
                return Err(format!(
                    "`overload.max_queue` must be 0 to {MAX_QUEUE_LIMIT}, not {n}"
                ));
            }
        };
        let queue_timeout = match file.queue_timeout.map(ConfigDuration::get) {
            None => defaults.queue_timeout,
            Some(d) if d >= Duration::from_millis(1) && d <= MAX_QUEUE_TIMEOUT => d,
            Some(d) => {
                return Err(format!(
                    "`overload.queue_timeout` must be 1ms to {}, not {}",
                    humantime::format_duration(MAX_QUEUE_TIMEOUT),
                    humantime::format_duration(d)
                ));
            }
        };
        Ok(Self {
            max_in_flight,
            max_queue,
            queue_timeout,
        })
    }
}

/// The admission of one exchange: its slot is free again when this is dropped.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
}

/// Admits or sheds `POST /token` under [`OverloadLimits`]; see the [module](self).
#[derive(Debug)]
pub struct Shedder {
    limits: OverloadLimits,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    shed_total: AtomicU64,
    /// Shed since the last audit summary.
    unsummarized: AtomicU64,
    metrics: Option<Arc<TxnMetrics>>,
    audit: Option<AuditLog>,
    clock: SharedClock,
}

/// Takes a place in the queue back when the waiting request is admitted, refused or
/// dropped (its client gone).
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shedder {
    /// A shedder under `limits` that counts in `metrics` and summarizes in `audit`.
    pub fn new(
        limits: OverloadLimits,
        metrics: Option<Arc<TxnMetrics>>,
        audit: Option<AuditLog>,
        clock: SharedClock,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            slots: Arc::new(Semaphore::new(limits.max_in_flight)),
            queued: AtomicUsize::new(0),
            shed_total: AtomicU64::new(0),
            unsummarized: AtomicU64::new(0),
            metrics,
            audit,
            clock,
        })
    }

    /// A shedder for `service`: its metrics, audit log and clock.
    pub fn for_service(
        limits: OverloadLimits,
        service: &crate::exchange::ExchangeService,
    ) -> Arc<Self> {
        Self::new(
            limits,
            service.metrics().cloned(),
            Some(service.audit().clone()),
            service.clock().clone(),
        )
    }

    /// The limits.
    pub fn limits(&self) -> OverloadLimits {
        self.limits
    }

    /// Requests shed so far.
    pub fn shed_total(&self) -> u64 {
        self.shed_total.load(Ordering::Relaxed)
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Exchanges admitted and running now.
    pub fn in_flight(&self) -> usize {
        self.limits
            .max_in_flight
            .saturating_sub(self.slots.available_permits())
    }

    /// A slot if one is free now, without queueing.
    pub fn try_admit(&self) -> Option<Admission> {
        self.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|p| Admission { _permit: p })
    }

    /// A slot now, or after a wait in the queue of at most the queue timeout; `None`
    /// when the queue is full or the wait ran out (the request is then to be shed).
    pub async fn admit(&self) -> Option<Admission> {
        if let Some(admission) = self.try_admit() {
            return Some(admission);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limits.max_queue {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _place = QueuePlace(&self.queued);
        let queued_at = tokio::time::Instant::now();
        match tokio::time::timeout(
            self.limits.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await
        {
            // A slot granted while the runtime was late (the waiter polled after its
            // deadline) is given back: admitting it would break the latency the queue
            // budget protects.
            Ok(Ok(permit)) if queued_at.elapsed() <= self.limits.queue_timeout => {
                Some(Admission { _permit: permit })
            }
            Ok(_) | Err(_) => None,
        }
    }

    /// Counts one shed request and builds its response: 503, `Retry-After: 1`,
    /// `temporarily_unavailable`.
    pub fn shed(&self) -> Response {
        self.shed_total.fetch_add(1, Ordering::Relaxed);
        self.unsummarized.fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &self.metrics {
            metrics.shed();
        }
        shed_response()
    }

    /// Writes the count of requests shed since the last summary to the audit log as one
    /// `suppressed` line (nothing when none were).
    pub fn flush(&self) {
        let n = self.unsummarized.swap(0, Ordering::AcqRel);
        if n == 0 {
            return;
        }
        tracing::warn!(
            shed = n,
            max_in_flight = self.limits.max_in_flight,
            "token service over its admission limit: exchanges shed with 503"
        );
        if let Some(audit) = &self.audit {
            let mut record = AuditRecord::new(self.clock.now());
            record.decision = "suppressed";
            record.error = Some("temporarily_unavailable");
            record.suppressed = Some(n);
            record.reason = Some(format!(
                "{n} exchange requests were shed (503) at the admission limit and not recorded one by one"
            ));
            audit.summary(&record);
        }
    }

    /// Writes [`Shedder::flush`] every [`SUMMARY_INTERVAL`] until the handle is dropped.
    pub fn spawn_summaries(self: &Arc<Self>) -> tokio_util::task::AbortOnDropHandle<()> {
        let shed = self.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                shed.flush();
            }
        }))
    }

    /// `app` with `POST /token` held to the limits. Other routes pass untouched.
    pub fn apply(self: &Arc<Self>, app: Router) -> Router {
        app.layer(axum::middleware::from_fn_with_state(self.clone(), admit))
    }
}

/// The middleware: sheds `POST /token` before its body is read when no slot is free
/// within the queue timeout.
async fn admit(State(shed): State<Arc<Shedder>>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || request.uri().path() != "/token" {
        return next.run(request).await;
    }
    let Some(admission) = shed.admit().await else {
        return shed.shed();
    };
    let response = next.run(request).await;
    drop(admission);
    response
}

fn shed_response() -> Response {
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, SHED_BODY).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> Result<OverloadLimits, String> {
        let file: FileOverload = toml::from_str(text).map_err(|e| e.to_string())?;
        OverloadLimits::from_file(&file)
    }

    #[test]
    fn defaults_follow_the_cores() {
        let d = limits("").unwrap();
        assert_eq!(d, OverloadLimits::default());
        assert!(d.max_in_flight >= IN_FLIGHT_PER_CORE);
        assert_eq!(d.max_queue, QUEUED_PER_SLOT * d.max_in_flight);
        assert_eq!(d.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
        let l = limits("max_in_flight = 3\nmax_queue = 0\nqueue_timeout = \"20ms\"").unwrap();
        assert_eq!(
            l,
            OverloadLimits {
                max_in_flight: 3,
                max_queue: 0,
                queue_timeout: Duration::from_millis(20)
            }
        );
        assert_eq!(
            limits("max_in_flight = 2").unwrap().max_queue,
            2 * QUEUED_PER_SLOT
        );
    }

    #[test]
    fn garbage_values_are_refused_with_the_field() {
        for (text, field) in [
            ("max_in_flight = 0", "max_in_flight"),
            ("max_in_flight = 1000000000", "max_in_flight"),
            ("max_queue = 1000000000", "max_queue"),
            ("queue_timeout = \"0s\"", "queue_timeout"),
            ("queue_timeout = \"1h\"", "queue_timeout"),
        ] {
            let e = limits(text).unwrap_err();
            assert!(e.contains(field), "{text}: {e}");
        }
        for text in [
            "max_in_flight = -1",
            "max_in_flight = \"8\"",
            "queue_timeout = \"soon\"",
            "max_inflight = 8",
            "max_queue = 1e9",
        ] {
            assert!(limits(text).is_err(), "{text}");
        }
    }

    /// A shedder of one slot and a queue of one, waiting at most `queue_timeout`.
    fn one_slot_one_queued(queue_timeout: Duration) -> Arc<Shedder> {
        Shedder::new(
            OverloadLimits {
                max_in_flight: 1,
                max_queue: 1,
                queue_timeout,
            },
            None,
            None,
            Arc::new(writ_identity::clock::SystemClock),
        )
    }

    /// A task waiting in `shed`'s queue (returned once it is queued); it ends admitted
    /// or not.
    async fn queue_one(shed: &Arc<Shedder>) -> tokio::task::JoinHandle<bool> {
        let waiter = {
            let shed = shed.clone();
            tokio::spawn(async move { shed.admit().await.is_some() })
        };
        while shed.queued() == 0 {
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[tokio::test]
    async fn a_full_queue_sheds_at_once_and_a_freed_slot_admits_the_waiter() {
        let shed = one_slot_one_queued(MAX_QUEUE_TIMEOUT);
        let held = shed.try_admit().unwrap();
        let waiter = queue_one(&shed).await;
        assert!(shed.admit().await.is_none(), "the queue is full");
        drop(held);
        assert!(waiter.await.unwrap(), "the waiter got the freed slot");
        assert_eq!(shed.queued(), 0);
        assert_eq!(shed.in_flight(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slot_granted_after_the_queue_budget_is_given_back() {
        let shed = one_slot_one_queued(Duration::from_millis(5));
        let held = shed.try_admit().unwrap();
        let waiter = queue_one(&shed).await;
        // The slot frees, but the waiter runs only after its budget has passed: this
        // thread is the runtime's only one, and blocking it makes the runtime late.
        drop(held);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.await.unwrap(), "admitted after its queue budget");
        assert_eq!(shed.in_flight(), 0, "the late slot was given back");
        assert!(shed.try_admit().is_some());
    }

    #[test]
    fn the_shed_response_is_an_rfc_6749_error_with_retry_after() {
        let shed = Shedder::new(
            OverloadLimits::default(),
            None,
            None,
            Arc::new(writ_identity::clock::SystemClock),
        );
        let response = shed.shed();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body: serde_json::Value = serde_json::from_str(SHED_BODY).unwrap();
        assert_eq!(body["error"], "temporarily_unavailable");
        assert_eq!(shed.shed_total(), 1);
    }
}
