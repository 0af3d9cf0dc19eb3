//! The identity server's and the agent's metrics, each part with its own registry (no
//! global state: `writ dev` runs both in one process and they stay apart).
//!
//! Names follow Prometheus conventions: `writ_<part>_..._total` counters (the encoder adds
//! `_total`), `_seconds` in base units; labels are low-cardinality (a kind, a reason, a
//! state), never a workload's or a user's SPIFFE ID. Every label value is created up
//! front, so a series exists (at 0) before its first event and `increase()` sees the
//! first one. Recording is an atomic add on a pre-made series: no allocation.
//!
//! ```
//! use writ_identity::ops::metrics::{AgentMetrics, SvidKind};
//! let metrics = AgentMetrics::new();
//! metrics.renewed(SvidKind::X509);
//! let mut text = String::new();
//! writ_identity::ops::prometheus_client::encoding::text::encode(&mut text, &metrics.registry())?;
//! assert!(text.contains("writ_agent_svid_renewals_total{kind=\"x509\"} 1"));
//! # Ok::<(), std::fmt::Error>(())
//! ```

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A label set of one pair.
pub type Label = [(&'static str, &'static str); 1];
/// A label set of two pairs.
pub type Labels2 = [(&'static str, &'static str); 2];
/// A counter per label value.
pub type CounterFamily = Family<Label, Counter>;
/// A float gauge (seconds) per pair of label values.
pub type SecondsGauges = Family<Labels2, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// Latency buckets: 100 us to about 13 s, doubling.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

/// Delay buckets (propagation, sync): 10 ms to about 160 s, doubling.
pub fn delay_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.01, 2.0, 15)
}

/// The kind of an SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvidKind {
    /// An X509-SVID.
    X509,
    /// A JWT-SVID.
    Jwt,
}

impl SvidKind {
    /// Both kinds.
    pub const ALL: [SvidKind; 2] = [SvidKind::X509, SvidKind::Jwt];

    /// The label value: `x509` or `jwt`.
    pub fn as_str(self) -> &'static str {
        match self {
            SvidKind::X509 => "x509",
            SvidKind::Jwt => "jwt",
        }
    }

    fn label(self) -> Label {
        [("kind", self.as_str())]
    }
}

/// Why a Workload API caller got no identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttestationFailure {
    /// Attested, but no entry matches its selectors.
    NoMatchingEntry,
    /// The attestor could not attest it (process gone, Docker or kubelet unreachable).
    AttestorError,
    /// The `workload.spiffe.io` header was missing.
    MissingHeader,
}

impl AttestationFailure {
    /// Every reason.
    pub const ALL: [AttestationFailure; 3] = [
        AttestationFailure::NoMatchingEntry,
        AttestationFailure::AttestorError,
        AttestationFailure::MissingHeader,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttestationFailure::NoMatchingEntry => "no_matching_entry",
            AttestationFailure::AttestorError => "attestor_error",
            AttestationFailure::MissingHeader => "missing_header",
        }
    }
}

fn counter_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    labels: &[Label],
) -> CounterFamily {
    let family = CounterFamily::default();
    for l in labels {
        family.get_or_create(l).get();
    }
    registry.register(name, help, family.clone());
    family
}

/// The identity server's metrics (`writ_server_*`).
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Arc<Registry>,
    issued: CounterFamily,
    failed: CounterFamily,
    rate_limited: CounterFamily,
    /// Seconds until each CA slot expires, by `kind` (`x509`, `jwt`) and `state`
    /// (`prepared`, `active`, `old`); set before each scrape.
    pub ca_slot_expiry: SecondsGauges,
    /// Registration entries in the store; set before each scrape.
    pub entries: Gauge,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// The metrics, in a registry of their own.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let kinds = SvidKind::ALL.map(SvidKind::label);
        let issued = counter_family(
            &mut r,
            "writ_server_svids_issued",
            "SVIDs the server signed for agents, by kind (x509, jwt)",
            &kinds,
        );
        let failed = counter_family(
            &mut r,
            "writ_server_svid_failures",
            "SVID signing requests the server refused or failed, by kind (x509, jwt)",
            &kinds,
        );
        let rate_limited = counter_family(
            &mut r,
            "writ_server_rate_limited",
            "Requests refused by a rate limit, by limit (spawn: sub-agent spawns per root workload)",
            &[[("limit", "spawn")]],
        );
        let ca_slot_expiry = SecondsGauges::default();
        r.register(
            "writ_server_ca_slot_expiry_seconds",
            "Seconds until the soonest-expiring CA slot of each kind (x509, jwt) and state (prepared, active, old) expires",
            ca_slot_expiry.clone(),
        );
        let entries = Gauge::default();
        r.register(
            "writ_server_entries",
            "Registration entries in the store",
            entries.clone(),
        );
        Self {
            registry: Arc::new(r),
            issued,
            failed,
            rate_limited,
            ca_slot_expiry,
            entries,
        }
    }

    /// The registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// `n` SVIDs of `kind` signed.
    pub fn issued(&self, kind: SvidKind, n: u64) {
        self.issued.get_or_create(&kind.label()).inc_by(n);
    }

    /// A signing request of `kind` refused or failed.
    pub fn failed(&self, kind: SvidKind) {
        self.failed.get_or_create(&kind.label()).inc();
    }

    /// A spawn refused by its rate limit.
    pub fn spawn_rate_limited(&self) {
        self.rate_limited.get_or_create(&[("limit", "spawn")]).inc();
    }

    /// Records the CA slots `(kind, state, seconds until expiry)`: the soonest per kind
    /// and state; a kind and state with no slot is removed.
    pub fn set_ca_slots(&self, slots: impl IntoIterator<Item = (&'static str, &'static str, f64)>) {
        let mut soonest: std::collections::BTreeMap<(&str, &str), f64> = Default::default();
        for (kind, state, left) in slots {
            let e = soonest.entry((kind, state)).or_insert(left);
            *e = e.min(left);
        }
        self.ca_slot_expiry.clear();
        for ((kind, state), left) in soonest {
            self.ca_slot_expiry
                .get_or_create(&[("kind", kind), ("state", state)])
                .set(left);
        }
    }
}

/// The agent's metrics (`writ_agent_*`).
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    renewed: CounterFamily,
    failed: CounterFamily,
    attestation_failures: CounterFamily,
    /// How long a full entry sync with the server took.
    pub entry_sync: Histogram,
    /// From an entry's creation on the server to the agent holding its SVID.
    pub entry_propagation: Histogram,
    /// From the server's change signal to the agent holding the new bundle.
    pub bundle_sync: Histogram,
    /// Open Workload API streams.
    pub streams: Gauge,
    /// X509-SVIDs in the cache; set before each scrape.
    pub svids: Gauge,
    /// X509-SVIDs in the cache within 10 % of their lifetime of expiry; set before each
    /// scrape.
    pub svids_near_expiry: Gauge,
    /// Live sub-agent leases this agent holds; set before each scrape.
    pub live_leases: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// The metrics, in a registry of their own.
    pub fn new() -> Self {
        let mut r = Registry::default();
        let kinds = SvidKind::ALL.map(SvidKind::label);
        let renewed = counter_family(
            &mut r,
            "writ_agent_svid_renewals",
            "SVIDs the agent renewed before expiry, by kind (x509; jwt: a cached JWT-SVID signed again)",
            &kinds,
        );
        let failed = counter_family(
            &mut r,
            "writ_agent_svid_failures",
            "SVID signing requests to the server that failed, by kind (x509, jwt)",
            &kinds,
        );
        let attestation_failures = counter_family(
            &mut r,
            "writ_agent_attestation_failures",
            "Workload API callers that got no identity, by reason (no_matching_entry, attestor_error, missing_header)",
            &AttestationFailure::ALL.map(|r| [("reason", r.as_str())]),
        );
        let entry_sync = Histogram::new(latency_buckets());
        r.register(
            "writ_agent_entry_sync_duration_seconds",
            "Duration of a full entry and bundle sync with the server",
            entry_sync.clone(),
        );
        let entry_propagation = Histogram::new(delay_buckets());
        r.register(
            "writ_agent_entry_propagation_delay_seconds",
            "From a new entry's creation on the server to the agent holding its SVID (whole seconds of the server clock)",
            entry_propagation.clone(),
        );
        let bundle_sync = Histogram::new(delay_buckets());
        r.register(
            "writ_agent_bundle_sync_delay_seconds",
            "From the server's change signal to the agent holding the changed bundle set",
            bundle_sync.clone(),
        );
        let streams = Gauge::default();
        r.register(
            "writ_agent_workload_api_streams",
            "Open Workload API streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles)",
            streams.clone(),
        );
        let svids = Gauge::default();
        r.register(
            "writ_agent_svids",
            "X509-SVIDs in the agent cache",
            svids.clone(),
        );
        let svids_near_expiry = Gauge::default();
        r.register(
            "writ_agent_svids_near_expiry",
            "X509-SVIDs in the agent cache within 10 % of their lifetime of expiry",
            svids_near_expiry.clone(),
        );
        let live_leases = Gauge::default();
        r.register(
            "writ_agent_live_leases",
            "Live sub-agent leases (child SVIDs) the agent holds",
            live_leases.clone(),
        );
        Self {
            registry: Arc::new(r),
            renewed,
            failed,
            attestation_failures,
            entry_sync,
            entry_propagation,
            bundle_sync,
            streams,
            svids,
            svids_near_expiry,
            live_leases,
        }
    }

    /// The registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// An SVID of `kind` renewed.
    pub fn renewed(&self, kind: SvidKind) {
        self.renewed.get_or_create(&kind.label()).inc();
    }

    /// A signing request of `kind` failed.
    pub fn failed(&self, kind: SvidKind) {
        self.failed.get_or_create(&kind.label()).inc();
    }

    /// A caller got no identity for `reason`.
    pub fn attestation_failed(&self, reason: AttestationFailure) {
        self.attestation_failures
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// Counts an open stream until the guard is dropped.
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.streams.inc();
        StreamGuard(self.clone())
    }
}

/// An open Workload API stream, counted in [`AgentMetrics::streams`] while it lives.
#[derive(Debug)]
pub struct StreamGuard(Arc<AgentMetrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.dec();
    }
}

/// Whether an SVID valid from `not_before` to `not_after` (Unix seconds) is within 10 %
/// of its lifetime of expiry at `now` (an expired one is).
pub fn near_expiry(not_before: i64, not_after: i64, now: i64) -> bool {
    let life = not_after.saturating_sub(not_before).max(0);
    not_after.saturating_sub(now) <= life / 10
}

/// Seconds as `f64` from a duration.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    #[test]
    fn exposition_names_help_and_types() {
        let server = ServerMetrics::new();
        server.issued(SvidKind::X509, 3);
        server.failed(SvidKind::Jwt);
        server.set_ca_slots([
            ("x509", "active", 100.0),
            ("x509", "active", 50.0),
            ("jwt", "prepared", 7.5),
        ]);
        let t = text(&server.registry());
        for line in [
            "# TYPE writ_server_svids_issued counter",
            "# HELP writ_server_svids_issued SVIDs the server signed",
            "writ_server_svids_issued_total{kind=\"x509\"} 3",
            "writ_server_svids_issued_total{kind=\"jwt\"} 0",
            "writ_server_svid_failures_total{kind=\"jwt\"} 1",
            "# TYPE writ_server_ca_slot_expiry_seconds gauge",
            "writ_server_ca_slot_expiry_seconds{kind=\"x509\",state=\"active\"} 50.0",
            "writ_server_ca_slot_expiry_seconds{kind=\"jwt\",state=\"prepared\"} 7.5",
            "writ_server_rate_limited_total{limit=\"spawn\"} 0",
            "# EOF",
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
        let agent = Arc::new(AgentMetrics::new());
        agent.attestation_failed(AttestationFailure::NoMatchingEntry);
        let guard = agent.stream_opened();
        agent.entry_sync.observe(0.002);
        let t = text(&agent.registry());
        for line in [
            "writ_agent_attestation_failures_total{reason=\"no_matching_entry\"} 1",
            "writ_agent_attestation_failures_total{reason=\"attestor_error\"} 0",
            "writ_agent_workload_api_streams 1",
            "# TYPE writ_agent_entry_sync_duration_seconds histogram",
            "writ_agent_entry_sync_duration_seconds_count 1",
            "# TYPE writ_agent_svids_near_expiry gauge",
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
        drop(guard);
        assert_eq!(agent.streams.get(), 0);
        for help in t.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(!help.ends_with(".."), "{help}");
        }
        // Every metric name is writ_<part>_ and no label carries a SPIFFE ID.
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("writ_agent_"), "{line}");
            assert!(!line.contains("spiffe://"), "{line}");
        }
    }

    #[test]
    fn near_expiry_is_the_last_tenth() {
        assert!(!near_expiry(0, 100, 0));
        assert!(!near_expiry(0, 100, 89));
        assert!(near_expiry(0, 100, 90));
        assert!(near_expiry(0, 100, 200));
        assert!(near_expiry(100, 100, 100));
    }
}
