//! `writ bench`: reproducible performance figures on loopback, each held against the
//! bound that the same run measures.
//!
//! Every mode is bounded in requests and in time, binds only to 127.0.0.1 (or a
//! temporary Unix socket), and returns one [`Report`] per case it measured. A report
//! carries the throughput, latency percentiles, the CPU time of this process per
//! operation, the bound the operation is held against (measured in the same run, on the
//! same machine) and the ratio of the two, so a script reading `writ bench --json` can
//! hold a figure to its target:
//!
//! ```
//! use writ_cli::bench::{Latency, Report};
//! use std::time::Duration;
//!
//! let samples = vec![Duration::from_micros(300); 100];
//! let report = Report::new("verify", "uncached")
//!     .throughput(1000, Duration::from_secs(1))
//!     .latency(Latency::of(samples))
//!     .bound("raw ES256 verify, 2 cores", 2200.0);
//! assert!((report.ratio.unwrap_or(0.0) - 1000.0 / 2200.0).abs() < 1e-9);
//! let line = serde_json::to_string(&report).unwrap_or_default();
//! assert!(line.contains("\"ops_per_s\":1000"));
//! ```

use std::time::{Duration, Instant};

use serde::Serialize;

pub mod exchange;
pub mod generator;
pub mod handshake;
pub mod issue;
pub mod overload;
pub mod provider;
pub mod stack;
pub mod verify;
pub mod wire;
pub mod workload_api;

/// One measured case of one bench: a line of `writ bench --json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The bench: `exchange`, `verify`, `workload-api`, `issue`, `handshake`, `overload`.
    pub bench: &'static str,
    /// The case within the bench (e.g. `fresh`, `repeated`, `cached`, `uncached`,
    /// `x509`, `jwt`, `writ`, `rustls`).
    pub mode: String,
    /// Signature algorithm of the subject tokens (exchange) or of the verified tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_alg: Option<String>,
    /// HTTP version of the requests, where the bench speaks HTTP: `http/1.1` or `h2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// The load generator's HTTP client, where the bench has a choice: `sdk` (the SDK's
    /// `TxnClient`) or `wire` (the bench's lean HTTP/1.1 client, `--wire`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<&'static str>,
    /// Concurrent clients (1 for single-threaded measurements).
    pub clients: usize,
    /// Operations measured (warm-up excluded).
    pub ops: u64,
    /// Wall time of the measured operations, in seconds.
    pub seconds: f64,
    /// Operations per second.
    pub ops_per_s: f64,
    /// Median latency of one operation, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, in milliseconds.
    pub p999_ms: f64,
    /// CPU time of this whole process (user + system, all threads) per operation, in
    /// microseconds: clients, servers and load generator together unless the bench
    /// says otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_op: Option<f64>,
    /// What the bound is, in words (e.g. `ES256 verify + sign x 2 cores`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound: Option<String>,
    /// The bound, in operations per second, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_ops_per_s: Option<f64>,
    /// `ops_per_s / bound_ops_per_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// The ratio this case is held to (issue 20's targets), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_ratio: Option<f64>,
    /// The highest `ratio` this case's operation could reach on this machine, given
    /// what the transport alone costs it (`writ bench exchange --modes transport`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<f64>,
    /// Responses refused by the server (overload: 429/503), not counted in `ops`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// Anything else worth a word (e.g. `offered 10x peak`, `cache hit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Report {
    /// An empty report for `bench`'s case `mode`, one client.
    pub fn new(bench: &'static str, mode: impl Into<String>) -> Self {
        Self {
            bench,
            mode: mode.into(),
            clients: 1,
            ..Self::default()
        }
    }

    /// Sets the subject token (or verified token) algorithm.
    #[must_use]
    pub fn subject_alg(mut self, alg: impl Into<String>) -> Self {
        self.subject_alg = Some(alg.into());
        self
    }

    /// Sets the HTTP version the requests used: `h2` when `http2`, else `http/1.1`.
    #[must_use]
    pub fn http_version(mut self, http2: bool) -> Self {
        self.protocol = Some(if http2 { "h2" } else { "http/1.1" });
        self
    }

    /// Sets the load generator's client: `wire` when `wire`, else `sdk`.
    #[must_use]
    pub fn generator(mut self, wire: bool) -> Self {
        self.client = Some(if wire { "wire" } else { "sdk" });
        self
    }

    /// Sets the number of concurrent clients.
    #[must_use]
    pub fn clients(mut self, clients: usize) -> Self {
        self.clients = clients;
        self
    }

    /// Sets `ops` operations done in `elapsed` (and the ratio, if a bound is set).
    #[must_use]
    pub fn throughput(mut self, ops: u64, elapsed: Duration) -> Self {
        self.ops = ops;
        self.seconds = elapsed.as_secs_f64();
        self.ops_per_s = if self.seconds > 0.0 {
            ops as f64 / self.seconds
        } else {
            0.0
        };
        self.update_ratio();
        self
    }

    /// Sets the latency percentiles.
    #[must_use]
    pub fn latency(mut self, latency: Latency) -> Self {
        self.p50_ms = latency.p50.as_secs_f64() * 1e3;
        self.p99_ms = latency.p99.as_secs_f64() * 1e3;
        self.p999_ms = latency.p999.as_secs_f64() * 1e3;
        self
    }

    /// Sets the process CPU time spent over the measured operations.
    #[must_use]
    pub fn cpu(mut self, cpu: Duration) -> Self {
        if self.ops > 0 {
            self.cpu_us_per_op = Some(cpu.as_secs_f64() * 1e6 / self.ops as f64);
        }
        self
    }

    /// Sets the bound (described by `what`) in operations per second.
    #[must_use]
    pub fn bound(mut self, what: impl Into<String>, ops_per_s: f64) -> Self {
        self.bound = Some(what.into());
        self.bound_ops_per_s = Some(ops_per_s);
        self.update_ratio();
        self
    }

    /// Sets the ratio this case is held to.
    #[must_use]
    pub fn target(mut self, ratio: f64) -> Self {
        self.target_ratio = Some(ratio);
        self
    }

    /// Sets the ceiling of the ratio.
    #[must_use]
    pub fn ceiling(mut self, ceiling: f64) -> Self {
        self.ceiling = Some(ceiling);
        self
    }

    /// Sets the number of refused requests.
    #[must_use]
    pub fn refused(mut self, refused: u64) -> Self {
        self.refused = Some(refused);
        self
    }

    /// Adds a note.
    #[must_use]
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn update_ratio(&mut self) {
        self.ratio = match self.bound_ops_per_s {
            Some(bound) if bound > 0.0 && self.ops > 0 => Some(self.ops_per_s / bound),
            _ => None,
        };
    }

    /// Whether the ratio meets its target (true when either is unknown).
    pub fn meets_target(&self) -> bool {
        match (self.ratio, self.target_ratio) {
            (Some(ratio), Some(target)) => ratio >= target,
            _ => true,
        }
    }

    /// One human-readable line.
    pub fn text(&self) -> String {
        let mut line = format!(
            "{:<12} {:<22} {:>9.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms",
            self.bench,
            match &self.subject_alg {
                Some(alg) => format!("{} {alg}", self.mode),
                None => self.mode.clone(),
            },
            self.ops_per_s,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
        );
        if self.clients != 1 {
            line.push_str(&format!("  {} clients", self.clients));
        }
        if let Some(protocol) = self.protocol {
            line.push_str(&format!("  {protocol}"));
        }
        if let Some(client) = self.client {
            line.push_str(&format!(" ({client})"));
        }
        if let Some(cpu) = self.cpu_us_per_op {
            line.push_str(&format!("  cpu {cpu:.1} µs/op"));
        }
        if let (Some(bound), Some(what)) = (self.bound_ops_per_s, &self.bound) {
            line.push_str(&format!("  bound {bound:.0}/s ({what})"));
        }
        if let Some(ratio) = self.ratio {
            line.push_str(&format!("  ratio {ratio:.2}"));
            if let Some(target) = self.target_ratio {
                let verdict = if ratio >= target { "meets" } else { "BELOW" };
                line.push_str(&format!(" ({verdict} {target:.2})"));
            }
        }
        if let Some(ceiling) = self.ceiling {
            line.push_str(&format!("  ceiling {ceiling:.2}"));
        }
        if let Some(refused) = self.refused {
            line.push_str(&format!("  refused {refused}"));
        }
        if let Some(note) = &self.note {
            line.push_str(&format!("  [{note}]"));
        }
        line
    }
}

/// Latency percentiles of a set of samples (nearest rank).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
}

impl Latency {
    /// The percentiles of `samples` (all zero when there are none).
    pub fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Self {
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            p999: percentile(&samples, 99.9),
        }
    }
}

/// Nearest-rank percentile of sorted samples (zero when there are none).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Rounded before `ceil`: 0.99 x 1000 is 990.0000000000001 in floating point.
    let rank = ((p / 100.0) * sorted.len() as f64 * 1e6).round() / 1e6;
    let rank = rank.ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or_default()
}

/// CPU time (user + system, every thread) of this process so far.
pub fn process_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// How long a bench may run: it stops at whichever of the two comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Most operations per measured case.
    pub ops: u64,
    /// Longest wall time per measured case.
    pub time: Duration,
}

impl Budget {
    /// Whether a case that started at `start` and did `done` operations must stop.
    pub fn exhausted(&self, done: u64, start: Instant) -> bool {
        done >= self.ops || start.elapsed() >= self.time
    }
}

/// What the timed runs of one case (or of several rounds of it) add up to.
#[derive(Debug, Default)]
pub struct Totals {
    /// Operations timed.
    pub ops: u64,
    /// Their wall time.
    pub elapsed: Duration,
    /// The process CPU time spent meanwhile.
    pub cpu: Duration,
    /// Latencies of the operations sampled (all of them unless the caller samples).
    pub samples: Vec<Duration>,
}

impl Totals {
    /// Adds another round's totals.
    pub fn add(&mut self, other: Totals) {
        self.ops += other.ops;
        self.elapsed += other.elapsed;
        self.cpu += other.cpu;
        self.samples.extend(other.samples);
    }

    /// Operations per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.ops as f64 / secs
        } else {
            0.0
        }
    }

    /// A report of `bench`'s case `mode` with these operations, latencies and CPU.
    pub fn report(self, bench: &'static str, mode: &str) -> Report {
        Report::new(bench, mode)
            .throughput(self.ops, self.elapsed)
            .latency(Latency::of(self.samples))
            .cpu(self.cpu)
    }
}

/// Times `op` repeated on this thread: `ops` times after `ops / 10` warm-up runs (at most
/// a tenth of `budget.time`), or until `budget.time` has passed. The rate of a
/// single-threaded loop like this, times the cores, is the bound the concurrent figures
/// are held against.
pub fn time_loop<E>(budget: Budget, mut op: impl FnMut(u64) -> Result<(), E>) -> Result<Totals, E> {
    let warm_up = Instant::now();
    for i in 0..budget.ops / 10 {
        if warm_up.elapsed() >= budget.time / 10 {
            break;
        }
        op(i)?;
    }
    // Room for the common case only: `ops` may be far more than `time` allows.
    let mut samples = Vec::with_capacity(usize::try_from(budget.ops.min(1 << 16)).unwrap_or(0));
    let cpu = process_cpu();
    let start = Instant::now();
    let mut done = 0;
    while !budget.exhausted(done, start) {
        let t = Instant::now();
        op(done)?;
        samples.push(t.elapsed());
        done += 1;
    }
    Ok(Totals {
        ops: done,
        elapsed: start.elapsed(),
        cpu: process_cpu().saturating_sub(cpu),
        samples,
    })
}

/// The cores this machine offers this process (at least 1).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=1000).map(Duration::from_micros).collect();
        let l = Latency::of(samples);
        assert_eq!(l.p50, Duration::from_micros(500));
        assert_eq!(l.p99, Duration::from_micros(990));
        assert_eq!(l.p999, Duration::from_micros(999));
        assert_eq!(Latency::of(Vec::new()), Latency::default());
    }

    #[test]
    fn a_report_computes_its_ratio_and_verdict() {
        let r = Report::new("exchange", "fresh")
            .throughput(700, Duration::from_secs(1))
            .bound("verify + sign x 2 cores", 1000.0)
            .target(0.7);
        assert_eq!(r.ratio, Some(0.7));
        assert!(r.meets_target());
        let r = r.throughput(600, Duration::from_secs(1));
        assert!(!r.meets_target());
        assert!(r.text().contains("BELOW 0.70"), "{}", r.text());
        let json: serde_json::Value = serde_json::to_value(&r).unwrap_or_default();
        for key in [
            "bench",
            "mode",
            "ops_per_s",
            "p50_ms",
            "p99_ms",
            "bound_ops_per_s",
            "ratio",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }

    #[test]
    fn time_loop_stops_at_its_budget() {
        let budget = Budget {
            ops: 50,
            time: Duration::from_secs(10),
        };
        let totals = time_loop::<()>(budget, |_| Ok(())).unwrap_or_default();
        assert_eq!(totals.ops, 50);
        assert_eq!(totals.samples.len(), 50);
        let budget = Budget {
            ops: u64::MAX,
            time: Duration::ZERO,
        };
        let totals = time_loop::<()>(budget, |_| Ok(())).unwrap_or_default();
        assert_eq!(totals.ops, 0);
    }
}
