//! The audit log: one JSON line per token exchange decision.
//!
//! Each line holds the time, the decision (`granted` or `refused`) and, for a refusal,
//! the RFC 6749 error code and reason; the caller's SPIFFE ID, the transaction id, the
//! subject, the requested and granted scope, the SHA-256 of the subject token and the
//! actor chain, as far as the request got before the decision. Never a whole token.
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

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

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

/// Where audit lines go. Writes are serialized; a failed write is reported on the
/// service log and does not change the decision.
#[derive(Clone)]
pub struct AuditLog {
    sink: Arc<Mutex<Sink>>,
}

enum Sink {
    Writer(Box<dyn Write + Send>),
    Memory(Vec<String>),
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Appends to `path`, created with mode 0600.
    ///
    /// # Errors
    /// The I/O error if the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            writ_identity::key_manager::create_private_dir(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self::writer(Box::new(file)))
    }

    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self::writer(Box::new(std::io::stdout()))
    }

    /// Keeps lines in memory (tests, benchmarks); read them with [`AuditLog::lines`].
    pub fn memory() -> Self {
        Self {
            sink: Arc::new(Mutex::new(Sink::Memory(Vec::new()))),
        }
    }

    fn writer(w: Box<dyn Write + Send>) -> Self {
        Self {
            sink: Arc::new(Mutex::new(Sink::Writer(w))),
        }
    }

    /// The lines kept by a [`AuditLog::memory`] log (empty for others).
    pub fn lines(&self) -> Vec<String> {
        match self.sink.lock() {
            Ok(sink) => match &*sink {
                Sink::Memory(lines) => lines.clone(),
                Sink::Writer(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }

    /// Records a granted exchange.
    pub fn granted(&self, mut record: AuditRecord) {
        record.decision = "granted";
        self.write(&record);
    }

    /// Records a refusal with its error code and reason.
    pub fn refused(&self, mut record: AuditRecord, error: &'static str, reason: &str) {
        record.decision = "refused";
        record.error = Some(error);
        record.reason = Some(reason.to_owned());
        self.write(&record);
    }

    fn write(&self, record: &AuditRecord) {
        let line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an audit record");
                return;
            }
        };
        let Ok(mut sink) = self.sink.lock() else {
            tracing::error!("audit log lock poisoned");
            return;
        };
        match &mut *sink {
            Sink::Memory(lines) => lines.push(line),
            Sink::Writer(w) => {
                if let Err(e) = writeln!(w, "{line}").and_then(|()| w.flush()) {
                    tracing::error!(error = %e, "cannot write the audit log");
                }
            }
        }
    }
}
