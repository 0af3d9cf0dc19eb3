//! The audit log: one JSON line per token exchange decision, and (with an identity
//! store) the durable, hash-chained audit trail of every hop: [`durable`] writes the
//! decisions and the sub-agent spawns to the store's audit table, [`ingest`] takes the
//! verifications services report, [`tree`] shows a transaction as its delegation tree,
//! and [`explorer_api`] serves it to the chain explorer. See `docs/audit.md`.
//!
//! Each line holds the time, the decision (`granted` or `refused`) and, for a refusal,
//! the RFC 6749 error code and reason; the caller's SPIFFE ID, the transaction id, the
//! subject, the requested and granted scope, the SHA-256 of the subject token and the
//! actor chain, as far as the request got before the decision. Never a whole token.
//!
//! - **Fails closed**: [`AuditLog::granted`] returns an error when the record cannot be
//!   written, and the exchange is then refused (unless [`OnFailure::Allow`] is chosen).
//! - **Never tears**: each record is one `write` of the whole line under the log's lock;
//!   after a short or failed write the file is cut back to its previous length, so no
//!   partial line stays and the next record starts on a line of its own.
//! - **Bounded**: refusals of unauthenticated requests (no client certificate, a bad
//!   one, garbage) are recorded at most at a [`Rate`] per source address; the others
//!   are counted and written as one `"decision":"suppressed"` summary with the count.
//!   Granted exchanges and refusals of authenticated callers are always recorded.
//! - **Rotates** by size on its own ([`Rotation`]).
//!
//! ```
//! use writ_txn_service::audit::{AuditLog, AuditRecord};
//! let log = AuditLog::memory();
//! let mut record = AuditRecord::new(std::time::UNIX_EPOCH);
//! record.caller = Some("spiffe://example.org/gateway".into());
//! log.refused(record, "unauthorized_client", "caller may not request Txn-Tokens");
//! let lines = log.lines();
//! assert!(lines[0].contains(r#""decision":"refused""#));
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use writ_identity::clock::{SharedClock, SystemClock};

use crate::rate_limit::{Rate, RateLimiter};

pub mod durable;
pub mod explorer;
pub mod ingest;
pub mod tree;

pub use explorer::{ExplorerState, explorer_api};

/// What the service does with an exchange whose grant cannot be written to the audit log
/// (`audit_on_failure` in `txn.toml`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnFailure {
    /// Refuse the exchange (503 `temporarily_unavailable`): nothing is granted that is
    /// not recorded. The default.
    #[default]
    Refuse,
    /// Grant it anyway and report the failure on the service log only.
    Allow,
}

/// Why a record could not be written. Nothing of the record remains in the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The record could not be encoded as JSON.
    #[error("cannot encode an audit record: {0}")]
    Encode(String),
    /// The write failed or was short (e.g. `ENOSPC`, a full disk).
    #[error("cannot write the audit log: {0}")]
    Write(#[from] std::io::Error),
    /// A writer panicked while holding the log's lock.
    #[error("the audit log lock is poisoned")]
    Poisoned,
    /// The durable audit store did not commit the record.
    #[error("cannot write the durable audit trail: {0}")]
    Store(String),
}

/// Size-based rotation of an audit log file: when the next record would make the file
/// larger than `max_size` bytes, `audit.log` becomes `audit.log.1` (`.1` becomes `.2`,
/// ...; at most `keep` old files are kept) and a new `audit.log` is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Largest file, in bytes (a single larger record is still written whole).
    pub max_size: u64,
    /// Old files kept (`.1` to `.<keep>`); 0 keeps none.
    pub keep: u32,
}

/// Default rotation size: 100 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 10;
/// Default rate at which refusals of unauthenticated requests are recorded, per source
/// IP address: 20 at once, then one per second.
pub const DEFAULT_UNAUTHENTICATED_RATE: Rate = Rate {
    per_second: 1.0,
    burst: 20,
};
/// Longest time a count of suppressed refusals waits before it is written as a summary.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// Most source addresses with pending suppressed counts; beyond it, counts are summed
/// under `caller_ip = "*"`.
const MAX_PENDING: usize = 10_000;

/// The file an audit log appends to, as a trait so tests can make writes fail midway.
pub trait Appender: Send {
    /// The current length in bytes.
    ///
    /// # Errors
    /// The I/O error.
    fn size(&self) -> std::io::Result<u64>;
    /// Whether the log may be rotated (renamed): a regular file.
    fn is_regular_file(&self) -> bool;
    /// One write at the end; may write less than `buf`.
    ///
    /// # Errors
    /// The I/O error; then nothing was written.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<usize>;
    /// Cuts the file back to `len` bytes.
    ///
    /// # Errors
    /// The I/O error.
    fn truncate(&mut self, len: u64) -> std::io::Result<()>;
}

impl Appender for std::fs::File {
    fn size(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }

    fn is_regular_file(&self) -> bool {
        self.metadata().is_ok_and(|m| m.is_file())
    }

    fn append(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Opened with O_APPEND: one write(2) at the end of the file.
        self.write(buf)
    }

    fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)
    }
}

/// One decision.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    /// When (RFC 3339, UTC).
    pub time: String,
    /// `granted` or `refused`.
    pub decision: &'static str,
    /// The RFC 6749 error code of a refusal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The authenticated caller's SPIFFE ID.
    pub caller: Option<String>,
    /// For a sub-agent caller: its lease id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// For a sub-agent caller: the parent workload that spawned it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How the caller authenticated (`mtls` or `jwt-svid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<&'static str>,
    /// The caller's IP address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    /// The transaction id of the issued (or replaced) token.
    pub txn: Option<String>,
    /// The subject (user).
    pub sub: Option<String>,
    /// The subject token type (policy name, e.g. `access_token`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_token_type: Option<&'static str>,
    /// SHA-256 (hex) of the subject token.
    pub subject_token_sha256: Option<String>,
    /// The requested scope (space-separated), if any.
    pub requested_scope: Option<String>,
    /// The granted scope.
    pub granted_scope: Option<String>,
    /// The actor chain of the issued token, current actor first.
    pub act: Vec<String>,
    /// Seconds the issued token lives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<i64>,
    /// For a `suppressed` summary: how many unauthenticated refusals from `caller_ip`
    /// were not recorded one by one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// The request's W3C `traceparent` header, if it carried a well-formed one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl AuditRecord {
    /// An empty record stamped `time`.
    pub fn new(time: SystemTime) -> Self {
        Self {
            time: humantime::format_rfc3339_millis(time).to_string(),
            ..Self::default()
        }
    }
}

/// Where audit lines go. Writes are serialized under one lock.
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Mutex<Sink>>,
    on_failure: OnFailure,
    sampler: Arc<Sampler>,
}

enum Sink {
    File(FileSink),
    Stream {
        writer: Box<dyn Write + Send>,
        /// A previous record was cut midway: start the next one on a new line.
        torn: bool,
    },
    Memory(Vec<String>),
}

struct FileSink {
    file: Box<dyn Appender>,
    /// The path, to rotate; `None` never rotates.
    path: Option<PathBuf>,
    rotation: Option<Rotation>,
    /// A failed write could not be cut back: cut to this length before the next write.
    repair: Option<u64>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Appends to `path`, created with mode 0600, rotated at [`DEFAULT_MAX_SIZE`]
    /// keeping [`DEFAULT_KEEP`] old files.
    ///
    /// # Errors
    /// The I/O error if the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_rotated(
            path,
            Some(Rotation {
                max_size: DEFAULT_MAX_SIZE,
                keep: DEFAULT_KEEP,
            }),
        )
    }

    /// Appends to `path`, created with mode 0600, rotated by `rotation` (`None`: never).
    ///
    /// # Errors
    /// The I/O error if the file cannot be opened.
    pub fn open_rotated(path: &Path, rotation: Option<Rotation>) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            writ_identity::key_manager::create_private_dir(dir)?;
        }
        let file = open_append(path)?;
        Ok(Self::from_sink(Sink::File(FileSink {
            file: Box::new(file),
            path: Some(path.to_path_buf()),
            rotation,
            repair: None,
        })))
    }

    /// Appends to `file` (never rotated). Tests use it with a file whose writes fail.
    pub fn appender(file: Box<dyn Appender>) -> Self {
        Self::from_sink(Sink::File(FileSink {
            file,
            path: None,
            rotation: None,
            repair: None,
        }))
    }

    /// Writes to standard output: only the JSON records go there (the service logs
    /// to standard error).
    pub fn stdout() -> Self {
        Self::writer(Box::new(std::io::stdout()))
    }

    /// Keeps lines in memory (tests, benchmarks); read them with [`AuditLog::lines`].
    pub fn memory() -> Self {
        Self::from_sink(Sink::Memory(Vec::new()))
    }

    /// Writes to any stream (no rotation; a record cut midway is followed by a new line).
    pub fn writer(writer: Box<dyn Write + Send>) -> Self {
        Self::from_sink(Sink::Stream {
            writer,
            torn: false,
        })
    }

    fn from_sink(sink: Sink) -> Self {
        Self {
            sink: Arc::new(Mutex::new(sink)),
            on_failure: OnFailure::Refuse,
            sampler: Arc::new(Sampler::new(None, Arc::new(SystemClock))),
        }
    }

    /// Chooses what happens to an exchange whose grant cannot be recorded (default:
    /// [`OnFailure::Refuse`]).
    pub fn with_on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = on_failure;
        self
    }

    /// Records refusals of unauthenticated requests at most at `rate` per source
    /// address (`None`: every one), with time from `clock`; the rest are counted and
    /// summarized.
    pub fn with_unauthenticated_rate(mut self, rate: Option<Rate>, clock: SharedClock) -> Self {
        self.sampler = Arc::new(Sampler::new(rate, clock));
        self
    }

    /// What happens to an exchange whose grant cannot be recorded.
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// The lines kept by a [`AuditLog::memory`] log (empty for others).
    pub fn lines(&self) -> Vec<String> {
        match self.sink.lock() {
            Ok(sink) => match &*sink {
                Sink::Memory(lines) => lines.clone(),
                Sink::File(_) | Sink::Stream { .. } => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }

    /// Records a granted exchange.
    ///
    /// # Errors
    /// [`AuditError`] when the record could not be written and the log fails closed
    /// ([`OnFailure::Refuse`]): the exchange must then be refused. With
    /// [`OnFailure::Allow`] a failure is only logged.
    pub fn granted(&self, mut record: AuditRecord) -> Result<(), AuditError> {
        record.decision = "granted";
        self.flush_due();
        match self.write(&record) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, txn = record.txn.as_deref().unwrap_or_default(),
                    "a granted exchange could not be recorded");
                match self.on_failure {
                    OnFailure::Refuse => Err(e),
                    OnFailure::Allow => Ok(()),
                }
            }
        }
    }

    /// Records a refusal with its error code and reason. A refusal of an
    /// unauthenticated request (no `caller`) may be counted instead of recorded (see
    /// [`AuditLog::with_unauthenticated_rate`]). A failed write is logged: the request
    /// is refused either way.
    pub fn refused(&self, mut record: AuditRecord, error: &'static str, reason: &str) {
        record.decision = "refused";
        record.error = Some(error);
        record.reason = Some(reason.to_owned());
        if record.caller.is_none() {
            let ip = record.caller_ip.as_deref().unwrap_or("unknown");
            match self.sampler.admit(ip) {
                None => return,
                Some(0) => {}
                Some(n) => self.write_logged(&self.sampler.summary(ip, n)),
            }
        }
        self.flush_due();
        self.write_logged(&record);
    }

    /// Writes the summaries of every pending count of suppressed refusals now (the
    /// service calls it every [`SUMMARY_INTERVAL`] and at shutdown).
    pub fn flush_suppressed(&self) {
        for (ip, n) in self.sampler.take_all() {
            self.write_logged(&self.sampler.summary(&ip, n));
        }
    }

    /// Writes an aggregated record as it is (e.g. the count of requests shed under
    /// overload, [`crate::shed`]); a failed write is logged.
    pub fn summary(&self, record: &AuditRecord) {
        self.write_logged(record);
    }

    /// Writes pending summaries when the last ones are [`SUMMARY_INTERVAL`] old.
    fn flush_due(&self) {
        if self.sampler.due() {
            self.flush_suppressed();
        }
    }

    fn write_logged(&self, record: &AuditRecord) {
        if let Err(e) = self.write(record) {
            tracing::error!(error = %e, decision = record.decision,
                "an audit record could not be written");
        }
    }

    fn write(&self, record: &AuditRecord) -> Result<(), AuditError> {
        // Encoded before the lock, into one buffer with room for the newline.
        let mut line = Vec::with_capacity(768);
        serde_json::to_writer(&mut line, record).map_err(|e| AuditError::Encode(e.to_string()))?;
        let mut sink = self.sink.lock().map_err(|_| AuditError::Poisoned)?;
        match &mut *sink {
            Sink::Memory(lines) => {
                lines.push(String::from_utf8_lossy(&line).into_owned());
                Ok(())
            }
            Sink::File(file) => {
                line.push(b'\n');
                file.append_whole(&line).map_err(AuditError::Write)
            }
            Sink::Stream { writer, torn } => {
                line.push(b'\n');
                if *torn {
                    line.insert(0, b'\n');
                }
                write_stream(writer.as_mut(), &line, torn).map_err(AuditError::Write)
            }
        }
    }
}

/// The W3C trace context of a `traceparent` header value when well formed
/// (`00-<32 hex>-<16 hex>-<2 hex>`, lowercase); anything else is ignored.
pub fn traceparent(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    match parts.as_slice() {
        [version, trace, parent, flags]
            if hex(version, 2)
                && *version != "ff"
                && hex(trace, 32)
                && hex(parent, 16)
                && hex(flags, 2) =>
        {
            Some(value.trim().to_owned())
        }
        _ => None,
    }
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Writes `buf` whole to a stream; if it fails after part of it went out, `torn` makes
/// the next record start on a new line.
fn write_stream(w: &mut dyn Write, buf: &[u8], torn: &mut bool) -> std::io::Result<()> {
    let mut written = 0;
    while let Some(rest) = buf.get(written..).filter(|r| !r.is_empty()) {
        match w.write(rest) {
            Ok(0) => {
                *torn = written > 0;
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                *torn = written > 0;
                return Err(e);
            }
        }
    }
    *torn = false;
    w.flush()
}

impl FileSink {
    /// Appends `line` in one write, or leaves the file as it was.
    fn append_whole(&mut self, line: &[u8]) -> std::io::Result<()> {
        if let Some(len) = self.repair {
            self.file.truncate(len)?;
            self.repair = None;
        }
        // One `fstat` per record: the size decides rotation and is what a short write
        // is cut back to.
        let before = self.rotate_if_full(line.len())?;
        let written = self.file.append(line)?;
        if written == line.len() {
            return Ok(());
        }
        // A short write (a full disk): cut the partial line off again.
        if written > 0
            && let Err(e) = self.file.truncate(before)
        {
            tracing::error!(error = %e, "cannot remove a partial audit record; retrying before the next record");
            self.repair = Some(before);
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("short write: {written} of {} bytes", line.len()),
        ))
    }

    /// Rotates when `incoming` more bytes would pass the size limit (a failure is
    /// logged and the current file kept); returns the size of the file written next.
    fn rotate_if_full(&mut self, incoming: usize) -> std::io::Result<u64> {
        let len = self.file.size()?;
        let (Some(rotation), Some(path)) = (self.rotation, self.path.as_ref()) else {
            return Ok(len);
        };
        let incoming = u64::try_from(incoming).unwrap_or(u64::MAX);
        if len == 0
            || len.saturating_add(incoming) <= rotation.max_size
            || !self.file.is_regular_file()
        {
            return Ok(len);
        }
        match rotate(path, rotation.keep) {
            Ok(file) => {
                self.file = Box::new(file);
                self.file.size()
            }
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot rotate the audit log");
                Ok(len)
            }
        }
    }
}

/// `path.<keep-1>` -> `path.<keep>`, ..., `path` -> `path.1`; returns a new `path`.
fn rotate(path: &Path, keep: u32) -> std::io::Result<std::fs::File> {
    let numbered = |i: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{i}"));
        PathBuf::from(name)
    };
    if keep == 0 {
        std::fs::remove_file(path)?;
    } else {
        for i in (1..keep).rev() {
            match std::fs::rename(numbered(i), numbered(i + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(path, numbered(1))?;
    }
    open_append(path)
}

/// Per-address token buckets for unauthenticated refusals, and the counts of those not
/// recorded.
struct Sampler {
    rate: Option<Rate>,
    limiter: RateLimiter,
    clock: SharedClock,
    pending: Mutex<Pending>,
}

struct Pending {
    counts: BTreeMap<String, u64>,
    since: SystemTime,
}

impl Sampler {
    fn new(rate: Option<Rate>, clock: SharedClock) -> Self {
        Self {
            rate,
            limiter: RateLimiter::new(clock.clone()),
            pending: Mutex::new(Pending {
                counts: BTreeMap::new(),
                since: clock.now(),
            }),
            clock,
        }
    }

    /// `None`: do not record this refusal (it is counted). `Some(n)`: record it, after a
    /// summary of the `n` refusals from `ip` suppressed before it (when `n > 0`).
    fn admit(&self, ip: &str) -> Option<u64> {
        let Some(rate) = self.rate else {
            return Some(0);
        };
        let Ok(mut pending) = self.pending.lock() else {
            return Some(0);
        };
        if self.limiter.check(ip, rate).is_ok() {
            return Some(pending.counts.remove(ip).unwrap_or(0));
        }
        let key = if pending.counts.len() >= MAX_PENDING && !pending.counts.contains_key(ip) {
            "*".to_owned()
        } else {
            ip.to_owned()
        };
        let count = pending.counts.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        None
    }

    /// Whether pending counts are [`SUMMARY_INTERVAL`] old.
    fn due(&self) -> bool {
        let now = self.clock.now();
        self.pending.lock().is_ok_and(|p| {
            !p.counts.is_empty()
                && now.duration_since(p.since).unwrap_or_default() >= SUMMARY_INTERVAL
        })
    }

    fn take_all(&self) -> BTreeMap<String, u64> {
        let now = self.clock.now();
        match self.pending.lock() {
            Ok(mut p) => {
                p.since = now;
                std::mem::take(&mut p.counts)
            }
            Err(_) => BTreeMap::new(),
        }
    }

    fn summary(&self, ip: &str, n: u64) -> AuditRecord {
        let mut record = AuditRecord::new(self.clock.now());
        record.decision = "suppressed";
        record.caller_ip = Some(ip.to_owned());
        record.suppressed = Some(n);
        record.reason = Some(format!(
            "{n} similar refusals of unauthenticated requests from this address were not recorded one by one"
        ));
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use writ_identity::clock::ManualClock;

    /// An in-memory file whose writes stop after `budget` bytes: the write that crosses
    /// it is short (as on a disk that fills up midway), later ones fail with ENOSPC.
    #[derive(Clone)]
    struct FillingFile {
        data: Arc<Mutex<Vec<u8>>>,
        budget: Arc<Mutex<usize>>,
    }

    impl Appender for FillingFile {
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
        fn is_regular_file(&self) -> bool {
            true
        }
        fn append(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut budget = self.budget.lock().unwrap();
            if *budget == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(*budget);
            *budget -= n;
            self.data.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            self.data.lock().unwrap().truncate(len as usize);
            Ok(())
        }
    }

    fn granted(txn: &str) -> AuditRecord {
        let mut record = AuditRecord::new(SystemTime::UNIX_EPOCH);
        record.caller = Some("spiffe://example.org/gateway".into());
        record.txn = Some(txn.into());
        record
    }

    fn unauthenticated(ip: &str) -> AuditRecord {
        let mut record = AuditRecord::new(SystemTime::UNIX_EPOCH);
        record.caller_ip = Some(ip.into());
        record
    }

    fn parse(text: &str) -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}")))
            .collect()
    }

    #[test]
    fn a_short_write_leaves_no_torn_line() {
        let file = FillingFile {
            data: Arc::default(),
            budget: Arc::new(Mutex::new(0)),
        };
        let log = AuditLog::appender(Box::new(file.clone()));
        *file.budget.lock().unwrap() = 10_000;
        log.granted(granted("first")).unwrap();
        let whole = file.data.lock().unwrap().len();
        // Room for half a record: the write is short, the record refused and removed.
        *file.budget.lock().unwrap() = whole / 2;
        assert!(matches!(
            log.granted(granted("second")),
            Err(AuditError::Write(_))
        ));
        assert_eq!(file.data.lock().unwrap().len(), whole, "cut back");
        // A full disk: nothing is written, the grant is refused.
        assert!(log.granted(granted("third")).is_err());
        // Space again: the next record starts on its own line.
        *file.budget.lock().unwrap() = 10_000;
        log.granted(granted("fourth")).unwrap();
        let text = String::from_utf8(file.data.lock().unwrap().clone()).unwrap();
        let records = parse(&text);
        let txns: Vec<_> = records.iter().map(|r| r["txn"].as_str().unwrap()).collect();
        assert_eq!(txns, ["first", "fourth"]);
    }

    #[test]
    fn a_failing_grant_may_be_allowed_by_setting() {
        let file = FillingFile {
            data: Arc::default(),
            budget: Arc::new(Mutex::new(0)),
        };
        let log = AuditLog::appender(Box::new(file)).with_on_failure(OnFailure::Allow);
        assert!(log.granted(granted("x")).is_ok());
    }

    #[test]
    fn dev_full_fails_every_grant() {
        let log = AuditLog::open(Path::new("/dev/full")).unwrap();
        for _ in 0..3 {
            assert!(matches!(
                log.granted(granted("x")),
                Err(AuditError::Write(e)) if e.raw_os_error() == Some(28)
            ));
        }
        // A refusal that cannot be written is still a refusal: nothing to return.
        log.refused(granted("y"), "invalid_scope", "no");
    }

    #[test]
    fn a_stream_cut_midway_starts_the_next_record_on_a_new_line() {
        struct Cut(Arc<Mutex<Vec<u8>>>, usize);
        impl Write for Cut {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                if self.1 == 0 {
                    return Err(std::io::Error::from_raw_os_error(28));
                }
                let n = buf.len().min(self.1).min(7);
                self.1 -= n;
                self.0.lock().unwrap().extend_from_slice(&buf[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let log = AuditLog::writer(Box::new(Cut(out.clone(), 20)));
        assert!(log.granted(granted("cut")).is_err());
        // Unblock the stream by swapping in a healthy writer on the same buffer.
        if let Ok(mut sink) = log.sink.lock()
            && let Sink::Stream { writer, .. } = &mut *sink
        {
            *writer = Box::new(Cut(out.clone(), usize::MAX));
        }
        log.granted(granted("whole")).unwrap();
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let last = text.lines().last().unwrap();
        let record: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(record["txn"], "whole", "{text}");
    }

    #[test]
    fn the_log_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open_rotated(
            &path,
            Some(Rotation {
                max_size: 600,
                keep: 2,
            }),
        )
        .unwrap();
        for i in 0..40 {
            log.granted(granted(&format!("txn-{i}"))).unwrap();
        }
        let mut seen = Vec::new();
        for name in ["audit.log.2", "audit.log.1", "audit.log"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.len() <= 600, "{name} is {} bytes", text.len());
            seen.extend(parse(&text).into_iter().map(|r| r["txn"].clone()));
        }
        assert!(!dir.path().join("audit.log.3").exists(), "keeps 2");
        // The newest records, in order, with none lost between the kept files.
        let last: Vec<String> = seen.iter().map(|t| t.as_str().unwrap().into()).collect();
        let first: usize = last[0].trim_start_matches("txn-").parse().unwrap();
        let want: Vec<String> = (first..40).map(|i| format!("txn-{i}")).collect();
        assert_eq!(last, want);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a new file is 0600 too");
    }

    #[test]
    fn unauthenticated_refusals_are_rate_limited_per_address_and_summarized() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000));
        let log = AuditLog::memory().with_unauthenticated_rate(
            Some(Rate {
                per_second: 1.0,
                burst: 3,
            }),
            Arc::new(clock.clone()),
        );
        for _ in 0..1000 {
            log.refused(
                unauthenticated("192.0.2.1"),
                "invalid_client",
                "no certificate",
            );
        }
        assert_eq!(log.lines().len(), 3, "the burst only");
        // Another address has its own bucket.
        log.refused(
            unauthenticated("192.0.2.2"),
            "invalid_client",
            "no certificate",
        );
        // Authenticated refusals and grants are always recorded.
        for _ in 0..10 {
            log.refused(granted("t"), "invalid_scope", "no");
            log.granted(granted("t")).unwrap();
        }
        assert_eq!(log.lines().len(), 3 + 1 + 20);
        // A second later the address may be recorded again, after a summary of the 997
        // refusals it made meanwhile.
        clock.advance(Duration::from_secs(1));
        log.refused(
            unauthenticated("192.0.2.1"),
            "invalid_client",
            "no certificate",
        );
        let lines = log.lines();
        let summary: serde_json::Value = serde_json::from_str(&lines[24]).unwrap();
        assert_eq!(summary["decision"], "suppressed");
        assert_eq!(summary["caller_ip"], "192.0.2.1");
        assert_eq!(summary["suppressed"], 997);
        assert_eq!(lines.len(), 26);
        // Counts are also written periodically, by the next record after the interval.
        for _ in 0..5 {
            log.refused(
                unauthenticated("192.0.2.1"),
                "invalid_client",
                "no certificate",
            );
        }
        clock.advance(SUMMARY_INTERVAL);
        log.granted(granted("later")).unwrap();
        let lines = log.lines();
        let summary: serde_json::Value = serde_json::from_str(&lines[26]).unwrap();
        assert_eq!(summary["suppressed"], 5, "{summary}");
        assert_eq!(lines.len(), 28);
        // And on demand (the service's timer, and at shutdown).
        for _ in 0..4 {
            log.refused(
                unauthenticated("192.0.2.1"),
                "invalid_client",
                "no certificate",
            );
        }
        log.flush_suppressed();
        let lines = log.lines();
        let total: u64 = lines
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["decision"] == "suppressed")
            .map(|r| r["suppressed"].as_u64().unwrap())
            .sum();
        let recorded = lines
            .iter()
            .filter(|l| l.contains("192.0.2.1") && l.contains(r#""refused""#))
            .count();
        assert_eq!(
            total as usize + recorded,
            1000 + 1 + 5 + 4,
            "every refusal is accounted for"
        );
    }
}
