//! What a service records of each Txn-Token verification, so that the record of a
//! transaction does not stop at the token service.
//!
//! [`VerificationRecord`] is the one shape of that record: the SDK's `TxnLayer` fills it,
//! a service's sink writes or sends it, and the token service ingests a
//! [`VerificationBatch`] of them at [`INGEST_PATH`] over mTLS, where the `service` of each
//! record must be the SPIFFE ID of the connection's client certificate (a service records
//! verifications only as itself). Records never carry a token, only its SHA-256.
//!
//! ```
//! use writ_sdk::audit::{Decision, VerificationBatch, VerificationRecord};
//!
//! let record = VerificationRecord {
//!     at_ms: 1_790_000_000_000,
//!     service: "spiffe://example.org/tool".into(),
//!     caller: Some("spiffe://example.org/agents/planner".into()),
//!     txn: Some("2d1b7c1e-0a4f-4c35-9a9e-6f5c8a3b1d20".into()),
//!     sub: Some("alice".into()),
//!     act: vec!["spiffe://example.org/agents/planner".into()],
//!     route: "GET /orders".into(),
//!     decision: Decision::Allow,
//!     error: None,
//!     latency_us: 180,
//!     token_sha256: Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()),
//!     traceparent: None,
//! };
//! let batch = VerificationBatch { records: vec![record] };
//! assert!(batch.check().is_ok());
//! ```
//!
//! A service chooses where its records go with an [`AuditSink`] given to
//! `TxnLayer::with_audit`: [`LogSink`] (one `tracing` event each), [`JsonLinesSink`] (a
//! file, written off the request path), [`MemorySink`], `TtsSink` (feature `exchange`:
//! batches sent to the token service), or a pair of them.

use serde::{Deserialize, Serialize};

mod sink;
pub use sink::{AuditSink, JsonLinesSink, LogSink, MemorySink, SinkStats};
#[cfg(feature = "exchange")]
mod tts;
#[cfg(feature = "exchange")]
pub use tts::{SinkError, TtsSink, TtsSinkBuilder};

/// Where the token service ingests verification records (`POST`, JSON
/// [`VerificationBatch`], mTLS with the service's X509-SVID).
pub const INGEST_PATH: &str = "/audit/verifications";
/// At most this many records per batch.
pub const MAX_BATCH: usize = 256;
/// At most this many bytes in one ingest request body.
pub const MAX_BODY: usize = 256 * 1024;
/// At most this many bytes in any one string field of a record.
pub const MAX_FIELD: usize = 2048;
/// At most this many entries in a record's `act` chain.
pub const MAX_ACT: usize = 32;

/// What the service decided about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The caller and its Txn-Token were verified and the policy accepted them.
    Allow,
    /// Refused (see the record's `error`).
    Deny,
}

/// One verification at a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationRecord {
    /// When, Unix milliseconds.
    pub at_ms: i64,
    /// The verifying service's SPIFFE ID.
    pub service: String,
    /// The caller's SPIFFE ID, from its X509-SVID (none when the connection had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The transaction id (`txn`), when the token verified far enough to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<String>,
    /// The user (`sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The token's `act` chain, current actor first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub act: Vec<String>,
    /// The route or resource (`METHOD /path`).
    pub route: String,
    /// Allowed or denied.
    pub decision: Decision,
    /// The middleware's error code when denied (`invalid_txn_token`, `insufficient_scope`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the verification took, microseconds.
    pub latency_us: u64,
    /// SHA-256 (hex) of the Txn-Token presented, never the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// The W3C `traceparent` of the request, if it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A batch of records, the ingest request body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationBatch {
    /// The records, oldest first.
    pub records: Vec<VerificationRecord>,
}

/// Why a batch or record is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// No records.
    #[error("the batch holds no records")]
    Empty,
    /// More than [`MAX_BATCH`] records.
    #[error("the batch holds {0} records, more than {MAX_BATCH}")]
    TooMany(usize),
    /// A field over [`MAX_FIELD`] bytes, or an `act` chain over [`MAX_ACT`].
    #[error("record {index}: {field} is too long")]
    TooLong {
        /// The record's index in the batch.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// `token_sha256` is not 64 lowercase hex digits.
    #[error("record {0}: token_sha256 is not a hex SHA-256")]
    BadHash(usize),
}

impl VerificationBatch {
    /// Checks the limits: 1 to [`MAX_BATCH`] records, fields at most [`MAX_FIELD`] bytes,
    /// `act` at most [`MAX_ACT`] entries, `token_sha256` a hex SHA-256.
    pub fn check(&self) -> Result<(), RecordError> {
        if self.records.is_empty() {
            return Err(RecordError::Empty);
        }
        if self.records.len() > MAX_BATCH {
            return Err(RecordError::TooMany(self.records.len()));
        }
        self.records
            .iter()
            .enumerate()
            .try_for_each(|(index, r)| r.check(index))
    }
}

impl VerificationRecord {
    /// Checks one record's limits, as [`VerificationBatch::check`] does for each.
    ///
    /// # Errors
    /// [`RecordError::TooLong`] or [`RecordError::BadHash`] (with index 0).
    pub fn check_limits(&self) -> Result<(), RecordError> {
        self.check(0)
    }

    fn check(&self, index: usize) -> Result<(), RecordError> {
        let long = |field| RecordError::TooLong { index, field };
        let fields: [(&'static str, Option<&str>); 7] = [
            ("service", Some(&self.service)),
            ("caller", self.caller.as_deref()),
            ("txn", self.txn.as_deref()),
            ("sub", self.sub.as_deref()),
            ("route", Some(&self.route)),
            ("error", self.error.as_deref()),
            ("traceparent", self.traceparent.as_deref()),
        ];
        if let Some((field, _)) = fields
            .iter()
            .find(|(_, v)| v.is_some_and(|v| v.len() > MAX_FIELD))
        {
            return Err(long(field));
        }
        if self.act.len() > MAX_ACT || self.act.iter().any(|a| a.len() > MAX_FIELD) {
            return Err(long("act"));
        }
        if let Some(h) = &self.token_sha256
            && (h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(RecordError::BadHash(index));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VerificationRecord {
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
            latency_us: 3,
            token_sha256: None,
            traceparent: None,
        }
    }

    #[test]
    fn limits_are_checked() {
        let batch = |records| VerificationBatch { records };
        assert_eq!(batch(vec![]).check(), Err(RecordError::Empty));
        assert_eq!(
            batch(vec![record(); MAX_BATCH + 1]).check(),
            Err(RecordError::TooMany(MAX_BATCH + 1))
        );
        let mut long = record();
        long.route = "x".repeat(MAX_FIELD + 1);
        assert_eq!(
            batch(vec![record(), long]).check(),
            Err(RecordError::TooLong {
                index: 1,
                field: "route"
            })
        );
        let mut chain = record();
        chain.act = vec!["a".into(); MAX_ACT + 1];
        assert!(matches!(
            batch(vec![chain]).check(),
            Err(RecordError::TooLong { field: "act", .. })
        ));
        let mut hash = record();
        hash.token_sha256 = Some("ABC".into());
        assert_eq!(batch(vec![hash]).check(), Err(RecordError::BadHash(0)));
        assert!(batch(vec![record()]).check().is_ok());
    }

    #[test]
    fn unknown_fields_and_garbage_are_refused() {
        let ok = serde_json::to_value(VerificationBatch {
            records: vec![record()],
        })
        .unwrap();
        let mut extra = ok.clone();
        extra["records"][0]["token"] = "eyJ...".into();
        assert!(serde_json::from_value::<VerificationBatch>(extra).is_err());
        assert!(serde_json::from_str::<VerificationBatch>("{\"records\":[1]}").is_err());
        assert!(serde_json::from_value::<VerificationBatch>(ok).is_ok());
    }
}
