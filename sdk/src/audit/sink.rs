//! Where a service's verification records go: the [`AuditSink`] trait and the sinks
//! that need no network ([`LogSink`], [`JsonLinesSink`], [`MemorySink`]).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use super::{Decision, VerificationRecord};

/// Receives one [`VerificationRecord`] per verified (or refused) request.
///
/// `record` runs on the request path, so it must not block: a sink queues the record
/// and returns, and drops it (counting the drop) when its queue is full rather than
/// slow the request down.
pub trait AuditSink: Send + Sync + 'static {
    /// Takes one record. Never blocks.
    fn record(&self, record: VerificationRecord);
}

impl<T: AuditSink + ?Sized> AuditSink for Arc<T> {
    fn record(&self, record: VerificationRecord) {
        (**self).record(record);
    }
}

impl<T: AuditSink + ?Sized> AuditSink for Box<T> {
    fn record(&self, record: VerificationRecord) {
        (**self).record(record);
    }
}

/// Both sinks get every record (e.g. the log and the token service).
impl<A: AuditSink, B: AuditSink> AuditSink for (A, B) {
    fn record(&self, record: VerificationRecord) {
        self.0.record(record.clone());
        self.1.record(record);
    }
}

/// How many records a queued sink took, delivered, dropped and failed to deliver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SinkStats {
    /// Records handed to the sink.
    pub recorded: u64,
    /// Records written, or accepted by the token service.
    pub delivered: u64,
    /// Records dropped because the queue was full or the sink had shut down.
    pub dropped: u64,
    /// Records that could not be delivered (write error, refused, retries exhausted).
    pub failed: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    recorded: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Counters {
    pub(crate) fn recorded(&self) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn failed(&self, n: u64) {
        self.failed.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn snapshot(&self) -> SinkStats {
        SinkStats {
            recorded: self.recorded.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }
}

/// Logs each record as one `tracing` event (target `writ_sdk::audit`, level INFO for
/// allowed, WARN for refused) with stable fields: `service`, `caller`, `txn`, `sub`,
/// `act` (current actor first, joined by `,`), `route`, `decision`, `error`,
/// `latency_us`, `token_sha256`, `trace_id`, `traceparent`. Absent values are empty
/// strings, so every event has every field.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

impl AuditSink for LogSink {
    fn record(&self, r: VerificationRecord) {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        let trace_id = r
            .traceparent
            .as_deref()
            .and_then(|t| t.get(3..35))
            .unwrap_or_default()
            .to_owned();
        macro_rules! event {
            ($level:expr, $decision:literal) => {
                tracing::event!(
                    target: "writ_sdk::audit",
                    $level,
                    service = %r.service,
                    caller = %opt(&r.caller),
                    txn = %opt(&r.txn),
                    sub = %opt(&r.sub),
                    act = %r.act.join(","),
                    route = %r.route,
                    decision = $decision,
                    error = %opt(&r.error),
                    latency_us = r.latency_us,
                    token_sha256 = %opt(&r.token_sha256),
                    trace_id = %trace_id,
                    traceparent = %opt(&r.traceparent),
                    "verification"
                )
            };
        }
        match r.decision {
            Decision::Allow => event!(tracing::Level::INFO, "allow"),
            Decision::Deny => event!(tracing::Level::WARN, "deny"),
        }
    }
}

/// Keeps every record in memory (tests, small tools). Clones share the records.
#[derive(Debug, Clone, Default)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<VerificationRecord>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The records so far, oldest first.
    pub fn records(&self) -> Vec<VerificationRecord> {
        self.records
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }
}

impl AuditSink for MemorySink {
    fn record(&self, record: VerificationRecord) {
        match self.records.lock() {
            Ok(mut r) => r.push(record),
            Err(poisoned) => poisoned.into_inner().push(record),
        }
    }
}

enum Line {
    Record(Box<VerificationRecord>),
    Flush(mpsc::SyncSender<()>),
}

/// Writes each record as one JSON line, on a thread of its own so the request path
/// never waits for the disk: records go through a bounded queue (default
/// [`JsonLinesSink::DEFAULT_QUEUE`]) and are dropped, and counted, when it is full. Dropping
/// the sink writes what is queued and flushes the writer.
///
/// ```no_run
/// use writ_sdk::audit::JsonLinesSink;
/// let sink = JsonLinesSink::create("/var/log/orders/verifications.jsonl")?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct JsonLinesSink {
    tx: Option<mpsc::SyncSender<Line>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl JsonLinesSink {
    /// Records queued at most, by default.
    pub const DEFAULT_QUEUE: usize = 8192;

    /// Writes to `writer`, queueing at most [`Self::DEFAULT_QUEUE`] records.
    ///
    /// # Errors
    /// If the writer thread cannot be started.
    pub fn new(writer: impl Write + Send + 'static) -> std::io::Result<Self> {
        Self::with_queue(writer, Self::DEFAULT_QUEUE)
    }

    /// Appends to the file at `path` (created 0600 if missing).
    ///
    /// # Errors
    /// If the file cannot be opened or the writer thread cannot be started.
    pub fn create(path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        Self::new(options.open(path)?)
    }

    /// Writes to `writer`, queueing at most `queue` records (at least 1).
    ///
    /// # Errors
    /// If the writer thread cannot be started.
    pub fn with_queue(writer: impl Write + Send + 'static, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(queue.max(1));
        let counters = Arc::new(Counters::default());
        let thread = std::thread::Builder::new()
            .name("writ-audit-jsonl".into())
            .spawn({
                let counters = counters.clone();
                move || write_lines(std::io::BufWriter::new(writer), &rx, &counters)
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            counters,
        })
    }

    /// Waits until every record queued so far is written and the writer flushed.
    pub fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if let Some(tx) = &self.tx
            && tx.send(Line::Flush(ack)).is_ok()
        {
            let _ = done.recv();
        }
    }

    /// What the sink has done so far.
    pub fn stats(&self) -> SinkStats {
        self.counters.snapshot()
    }
}

fn write_lines(mut out: impl Write, rx: &mpsc::Receiver<Line>, counters: &Counters) {
    let write = |out: &mut dyn Write, record: &VerificationRecord| {
        let written = serde_json::to_writer(&mut *out, record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => counters.delivered(1),
            Err(e) => {
                counters.failed(1);
                tracing::warn!(error = %e, "cannot write a verification record");
            }
        }
    };
    while let Ok(line) = rx.recv() {
        match line {
            Line::Record(record) => write(&mut out, &record),
            Line::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.send(());
                continue;
            }
        }
        // Drain what is queued, then flush once the queue is empty.
        while let Ok(line) = rx.try_recv() {
            match line {
                Line::Record(record) => write(&mut out, &record),
                Line::Flush(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                }
            }
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

impl AuditSink for JsonLinesSink {
    fn record(&self, record: VerificationRecord) {
        self.counters.recorded();
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Line::Record(Box::new(record))).is_ok());
        if !sent {
            self.counters.dropped();
        }
    }
}

impl Drop for JsonLinesSink {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what is queued.
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> VerificationRecord {
        VerificationRecord {
            at_ms: 1,
            service: "spiffe://example.org/tool".into(),
            caller: None,
            txn: None,
            sub: None,
            act: vec![],
            route: "GET /".into(),
            decision: Decision::Deny,
            error: Some("missing_txn_token".into()),
            latency_us: n,
            token_sha256: None,
            traceparent: None,
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_are_written_in_order_and_flushed_on_drop() {
        let out = Shared::default();
        let sink = JsonLinesSink::new(out.clone()).unwrap();
        for n in 0..100 {
            sink.record(record(n));
        }
        sink.flush();
        assert_eq!(sink.stats().delivered, 100);
        sink.record(record(100));
        drop(sink);
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<VerificationRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 101);
        assert!(
            lines
                .iter()
                .enumerate()
                .all(|(i, r)| r.latency_us == i as u64)
        );
    }

    /// A writer that blocks until released, to fill the queue.
    struct Gate(Arc<Mutex<()>>);
    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            drop(self.0.lock().unwrap());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let sink = JsonLinesSink::with_queue(Gate(gate.clone()), 4).unwrap();
        // Longer than the writer's buffer, so writing it reaches the gate and blocks.
        let mut first = record(0);
        first.route = "x".repeat(16 * 1024);
        sink.record(first);
        for n in 1..50 {
            sink.record(record(n));
        }
        let stats = sink.stats();
        assert_eq!(stats.recorded, 50);
        // The writer holds at most one record and the queue four.
        assert!(stats.dropped >= 45, "{stats:?}");
        drop(held);
        sink.flush();
        let stats = sink.stats();
        assert_eq!(stats.delivered + stats.dropped, 50, "{stats:?}");
    }

    #[test]
    fn memory_and_pairs() {
        let (a, b) = (MemorySink::new(), MemorySink::new());
        let both = (a.clone(), Arc::new(b.clone()));
        both.record(record(1));
        LogSink.record(record(2));
        assert_eq!(a.records().len(), 1);
        assert_eq!(b.records(), a.records());
    }
}
