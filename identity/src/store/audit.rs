//! The durable audit trail: a hash-chained table of decisions (token grants, refusals,
//! sub-agent spawns, verifications at services), appended by the transaction token
//! service and checked by `writ audit verify`.
//!
//! Each row carries `hash = SHA-256(prev_hash || canonical row)`, where `prev_hash` is
//! the hash of the row before it (64 zeros before the first) and the canonical row is
//! the JSON array `[seq, at_ms, kind, decision, txn, sub, caller, service, lease,
//! record]`. An anchor row beside the table holds the chain's head (its last sequence
//! and hash) and the last row removed by retention, so [`ChainVerifier`] detects an
//! edited row, a row removed from the middle, and a row removed from the head, while
//! accepting the prefix that retention pruned.
//!
//! Appends serialize the chain head: SQLite writes under `BEGIN IMMEDIATE`, PostgreSQL
//! takes a transaction-scoped advisory lock, so many token service replicas appending to
//! one PostgreSQL store never fork the chain.
//!
//! ```
//! use writ_identity::store::audit::{AuditEvent, AuditRow, ChainVerifier, AuditAnchor, GENESIS_HASH};
//! let event = AuditEvent { at_ms: 1, kind: "grant".into(), decision: "allow".into(),
//!     txn: "t1".into(), sub: "alice".into(), caller: "spiffe://example.org/gw".into(),
//!     service: String::new(), lease: String::new(), record: "{}".into() };
//! let row = AuditRow::chain(1, GENESIS_HASH, event);
//! let mut verifier = ChainVerifier::new(&AuditAnchor { head_seq: 1, head_hash: row.hash.clone(),
//!     ..AuditAnchor::default() });
//! verifier.push(&row);
//! assert!(verifier.finish().is_ok());
//! ```

use sha2::{Digest, Sha256};

/// `prev_hash` of the first row of a chain that was never pruned.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest `record` JSON an event may carry, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Longest text field (kind, decision, txn, sub, caller, service, lease), in bytes.
pub const MAX_FIELD_BYTES: usize = 2048;
/// Most events one [`super::Store::append_audit`] call writes.
pub const MAX_APPEND: usize = 4096;
/// Most rows one read returns.
pub const MAX_READ: u32 = 10_000;

/// An event to append (the store numbers and chains it). Empty strings stand for
/// "none".
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds of the decision.
    pub at_ms: i64,
    /// `grant`, `replacement`, `refusal`, `spawn` or `verification`.
    pub kind: String,
    /// `allow` or `deny`.
    pub decision: String,
    /// The transaction id.
    pub txn: String,
    /// The user (`sub`).
    pub sub: String,
    /// The calling workload's SPIFFE ID.
    pub caller: String,
    /// For a verification: the service that verified.
    pub service: String,
    /// For a sub-agent: its lease id.
    pub lease: String,
    /// The whole record, as JSON (never a whole token).
    pub record: String,
}

impl AuditEvent {
    /// Checks the limits ([`MAX_FIELD_BYTES`], [`MAX_RECORD_BYTES`]).
    ///
    /// # Errors
    /// [`super::StoreError::Invalid`] naming the field.
    pub fn check(&self) -> Result<(), super::StoreError> {
        let fields = [
            ("kind", &self.kind),
            ("decision", &self.decision),
            ("txn", &self.txn),
            ("sub", &self.sub),
            ("caller", &self.caller),
            ("service", &self.service),
            ("lease", &self.lease),
        ];
        if let Some((name, _)) = fields.iter().find(|(_, v)| v.len() > MAX_FIELD_BYTES) {
            return Err(super::StoreError::Invalid(format!(
                "audit event `{name}` is longer than {MAX_FIELD_BYTES} bytes"
            )));
        }
        if self.kind.is_empty() {
            return Err(super::StoreError::Invalid(
                "audit event `kind` is empty".into(),
            ));
        }
        if self.record.len() > MAX_RECORD_BYTES {
            return Err(super::StoreError::Invalid(format!(
                "audit event `record` is longer than {MAX_RECORD_BYTES} bytes"
            )));
        }
        Ok(())
    }
}

/// A stored row: an event with its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRow {
    /// Sequence number (1, 2, ...; never reused).
    pub seq: u64,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the row before (hex).
    pub prev_hash: String,
    /// `SHA-256(prev_hash || canonical row)` (hex).
    pub hash: String,
}

impl AuditRow {
    /// The row `seq` after a row whose hash is `prev_hash`.
    pub fn chain(seq: u64, prev_hash: &str, event: AuditEvent) -> Self {
        let hash = row_hash(seq, prev_hash, &event);
        Self {
            seq,
            event,
            prev_hash: prev_hash.to_owned(),
            hash,
        }
    }

    /// Whether `hash` is what the row's content gives.
    pub fn hash_matches(&self) -> bool {
        row_hash(self.seq, &self.prev_hash, &self.event) == self.hash
    }
}

/// `SHA-256(prev_hash || canonical row)`, lowercase hex.
///
/// The canonical row is the compact JSON array `[seq, at_ms, kind, decision, txn, sub,
/// caller, service, lease, record]`, written straight from the fields.
pub fn row_hash(seq: u64, prev_hash: &str, event: &AuditEvent) -> String {
    let canonical = (
        seq,
        event.at_ms,
        &event.kind,
        &event.decision,
        &event.txn,
        &event.sub,
        &event.caller,
        &event.service,
        &event.lease,
        &event.record,
    );
    let mut hasher = Sha256::new();
    hasher.update(prev_hash.as_bytes());
    // Writing JSON into a hasher cannot fail: the fields are plain strings and numbers.
    let _ = serde_json::to_writer(HashWriter(&mut hasher), &canonical);
    hex::encode(hasher.finalize())
}

/// Feeds what is written to a SHA-256.
struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The chain's anchor: its head and the last row retention removed. Zero and empty
/// mean none.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditAnchor {
    /// Sequence of the last row removed by retention (0: none).
    pub pruned_seq: u64,
    /// Hash of that row (empty: none).
    pub pruned_hash: String,
    /// Sequence of the last row appended (0: none).
    pub head_seq: u64,
    /// Hash of that row.
    pub head_hash: String,
}

/// What is wrong with a chain, at the first bad row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// Row `seq` is not what was appended (its content or its hash changed).
    #[error("row {seq} was edited")]
    Edited {
        /// The row.
        seq: u64,
    },
    /// Row `seq` is missing.
    #[error("row {seq} was removed")]
    Removed {
        /// The first missing row.
        seq: u64,
    },
}

impl ChainError {
    /// The bad row's sequence.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Edited { seq } | Self::Removed { seq } => *seq,
        }
    }
}

/// What a good chain holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChainSummary {
    /// Rows checked.
    pub rows: u64,
    /// First sequence kept (after the pruned prefix).
    pub first_seq: u64,
    /// The head.
    pub head_seq: u64,
    /// Rows removed by retention.
    pub pruned: u64,
}

/// Checks rows pushed in sequence order against an [`AuditAnchor`], without holding
/// them all.
#[derive(Debug)]
pub struct ChainVerifier {
    anchor: AuditAnchor,
    next_seq: u64,
    prev_hash: String,
    /// The previous row (its seq), whose hash the next row's `prev_hash` must repeat.
    rows: u64,
    error: Option<ChainError>,
}

impl ChainVerifier {
    /// A verifier for the chain `anchor` describes.
    pub fn new(anchor: &AuditAnchor) -> Self {
        let prev_hash = if anchor.pruned_seq == 0 {
            GENESIS_HASH.to_owned()
        } else {
            anchor.pruned_hash.clone()
        };
        Self {
            anchor: anchor.clone(),
            next_seq: anchor.pruned_seq.saturating_add(1),
            prev_hash,
            rows: 0,
            error: None,
        }
    }

    /// Checks the next row (rows must come in ascending `seq`). After the first error,
    /// later rows are ignored.
    pub fn push(&mut self, row: &AuditRow) {
        if self.error.is_some() {
            return;
        }
        if row.seq != self.next_seq {
            self.error = Some(if row.seq > self.next_seq {
                ChainError::Removed { seq: self.next_seq }
            } else {
                // A row before the pruned prefix's end, or a duplicate: not appended so.
                ChainError::Edited { seq: row.seq }
            });
            return;
        }
        if !row.hash_matches() {
            self.error = Some(ChainError::Edited { seq: row.seq });
            return;
        }
        if row.prev_hash != self.prev_hash {
            // The previous row's stored hash was rewritten along with its content.
            self.error = Some(ChainError::Edited {
                seq: row.seq.saturating_sub(1).max(1),
            });
            return;
        }
        self.prev_hash = row.hash.clone();
        self.next_seq = row.seq.saturating_add(1);
        self.rows += 1;
    }

    /// The verdict once every row was pushed.
    ///
    /// # Errors
    /// The first bad row.
    pub fn finish(self) -> Result<ChainSummary, ChainError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let last = self.next_seq.saturating_sub(1);
        if last < self.anchor.head_seq {
            return Err(ChainError::Removed { seq: last + 1 });
        }
        if last > self.anchor.pruned_seq && last == self.anchor.head_seq {
            if self.prev_hash != self.anchor.head_hash {
                return Err(ChainError::Edited { seq: last });
            }
        } else if last > self.anchor.head_seq {
            // Rows beyond the recorded head were not appended through the store.
            return Err(ChainError::Edited {
                seq: self.anchor.head_seq + 1,
            });
        }
        Ok(ChainSummary {
            rows: self.rows,
            first_seq: self.anchor.pruned_seq + 1,
            head_seq: self.anchor.head_seq,
            pruned: self.anchor.pruned_seq,
        })
    }
}

/// One transaction, summed over its rows (for lists of recent transactions).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditTxnSummary {
    /// The transaction id.
    pub txn: String,
    /// The user.
    pub sub: String,
    /// First event, Unix milliseconds.
    pub started_ms: i64,
    /// Last event, Unix milliseconds.
    pub last_ms: i64,
    /// Highest sequence among its rows.
    pub last_seq: u64,
    /// Every workload SPIFFE ID that called or verified in it, sorted.
    pub workloads: Vec<String>,
    /// Grants and replacements.
    pub grants: u64,
    /// Refusals.
    pub refusals: u64,
    /// Verifications at services.
    pub verifications: u64,
    /// Sub-agent spawns.
    pub spawns: u64,
    /// Whether any event was a refusal or a deny.
    pub denied: bool,
}

/// Longest search text [`super::Store::list_audit_txns`] accepts, in bytes.
pub const MAX_QUERY_BYTES: usize = 256;
/// Most transactions one list returns.
pub const MAX_TXN_LIST: u32 = 200;

/// The `LIKE` pattern matching `q` as a lowercase substring, `\` escaping.
pub(super) fn like_pattern(q: &str) -> String {
    let mut out = String::with_capacity(q.len() + 2);
    out.push('%');
    for c in q.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

pub(super) const FETCH_ANCHOR: &str =
    "SELECT pruned_seq, pruned_hash, head_seq, head_hash FROM audit_anchor WHERE id = 1";
pub(super) const INSERT_ROW: &str = "INSERT INTO audit_events (seq, at_ms, kind, decision, \
     txn, sub, caller, service, lease, record, prev_hash, hash) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
pub(super) const SET_HEAD: &str =
    "UPDATE audit_anchor SET head_seq = $1, head_hash = $2 WHERE id = 1";
pub(super) const SET_PRUNED: &str =
    "UPDATE audit_anchor SET pruned_seq = $1, pruned_hash = $2 WHERE id = 1";
pub(super) const LIST_AFTER: &str = "SELECT seq, at_ms, kind, decision, txn, sub, caller, \
     service, lease, record, prev_hash, hash FROM audit_events WHERE seq > $1 \
     ORDER BY seq LIMIT $2";
pub(super) const LIST_TXN: &str = "SELECT seq, at_ms, kind, decision, txn, sub, caller, \
     service, lease, record, prev_hash, hash FROM audit_events WHERE txn = $1 \
     ORDER BY seq LIMIT $2";
/// The last row of the prefix older than `$1` (every row up to it is older).
pub(super) const PRUNE_CUT: &str = "SELECT seq, hash FROM audit_events WHERE seq < \
     COALESCE((SELECT MIN(seq) FROM audit_events WHERE at_ms >= $1), $2) \
     ORDER BY seq DESC LIMIT 1";
pub(super) const PRUNE: &str = "DELETE FROM audit_events WHERE seq <= $1";
pub(super) const TXNS_AFTER: &str = "SELECT txn, MAX(seq) AS last_seq FROM audit_events \
     WHERE seq > $1 AND txn <> '' GROUP BY txn ORDER BY MAX(seq) LIMIT $2";
pub(super) const LIST_TXNS: &str = "SELECT txn, MAX(sub) AS sub, MIN(at_ms) AS started_ms, \
     MAX(at_ms) AS last_ms, MAX(seq) AS last_seq, \
     SUM(CASE WHEN kind = 'grant' OR kind = 'replacement' THEN 1 ELSE 0 END) AS grants, \
     SUM(CASE WHEN kind = 'refusal' THEN 1 ELSE 0 END) AS refusals, \
     SUM(CASE WHEN kind = 'verification' THEN 1 ELSE 0 END) AS verifications, \
     SUM(CASE WHEN kind = 'spawn' THEN 1 ELSE 0 END) AS spawns, \
     SUM(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS denials \
     FROM audit_events WHERE txn <> '' AND ($1 = '' OR txn IN (SELECT txn FROM audit_events \
     WHERE lower(txn) LIKE $1 ESCAPE '\\' OR lower(sub) LIKE $1 ESCAPE '\\' \
     OR lower(caller) LIKE $1 ESCAPE '\\' OR lower(service) LIKE $1 ESCAPE '\\')) \
     GROUP BY txn ORDER BY MAX(seq) DESC LIMIT $2";
pub(super) const TXN_WORKLOADS: &str = "SELECT caller AS id FROM audit_events \
     WHERE txn = $1 AND caller <> '' UNION SELECT service AS id FROM audit_events \
     WHERE txn = $1 AND service <> '' ORDER BY id LIMIT 64";

/// Reads an `audit_events` row.
pub(super) fn row_from_sql<R>(row: &R) -> Result<AuditRow, super::StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let text = |c: &str| -> Result<String, super::StoreError> {
        row.try_get(c).map_err(|e| corrupt(c, &e))
    };
    let seq: i64 = row.try_get("seq").map_err(|e| corrupt("seq", &e))?;
    Ok(AuditRow {
        seq: u64::try_from(seq).map_err(|_| corrupt("seq", &"negative"))?,
        event: AuditEvent {
            at_ms: row.try_get("at_ms").map_err(|e| corrupt("at_ms", &e))?,
            kind: text("kind")?,
            decision: text("decision")?,
            txn: text("txn")?,
            sub: text("sub")?,
            caller: text("caller")?,
            service: text("service")?,
            lease: text("lease")?,
            record: text("record")?,
        },
        prev_hash: text("prev_hash")?,
        hash: text("hash")?,
    })
}

/// Reads the anchor row.
pub(super) fn anchor_from_sql<R>(row: &R) -> Result<AuditAnchor, super::StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let num = |c: &str| -> Result<u64, super::StoreError> {
        let v: i64 = row.try_get(c).map_err(|e| corrupt(c, &e))?;
        u64::try_from(v).map_err(|_| corrupt(c, &"negative"))
    };
    let text = |c: &str| -> Result<String, super::StoreError> {
        row.try_get(c).map_err(|e| corrupt(c, &e))
    };
    Ok(AuditAnchor {
        pruned_seq: num("pruned_seq")?,
        pruned_hash: text("pruned_hash")?,
        head_seq: num("head_seq")?,
        head_hash: text("head_hash")?,
    })
}

/// Reads a [`LIST_TXNS`] row (workloads are filled in by a second query).
pub(super) fn summary_from_sql<R>(row: &R) -> Result<AuditTxnSummary, super::StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let num =
        |c: &str| -> Result<i64, super::StoreError> { row.try_get(c).map_err(|e| corrupt(c, &e)) };
    let count =
        |c: &str| -> Result<u64, super::StoreError> { Ok(u64::try_from(num(c)?).unwrap_or(0)) };
    Ok(AuditTxnSummary {
        txn: row.try_get("txn").map_err(|e| corrupt("txn", &e))?,
        sub: row.try_get("sub").map_err(|e| corrupt("sub", &e))?,
        started_ms: num("started_ms")?,
        last_ms: num("last_ms")?,
        last_seq: count("last_seq")?,
        workloads: Vec::new(),
        grants: count("grants")?,
        refusals: count("refusals")?,
        verifications: count("verifications")?,
        spawns: count("spawns")?,
        denied: num("denials")? > 0,
    })
}

fn corrupt(column: &str, e: &dyn std::fmt::Display) -> super::StoreError {
    super::StoreError::Corrupt {
        kind: "audit row",
        detail: format!("column {column}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            at_ms: n,
            kind: "grant".into(),
            decision: "allow".into(),
            txn: format!("t{n}"),
            record: "{}".into(),
            ..AuditEvent::default()
        }
    }

    fn chain(n: u64) -> (Vec<AuditRow>, AuditAnchor) {
        let mut rows: Vec<AuditRow> = Vec::new();
        for seq in 1..=n {
            let prev = rows
                .last()
                .map_or(GENESIS_HASH.to_owned(), |r| r.hash.clone());
            rows.push(AuditRow::chain(seq, &prev, event(seq as i64)));
        }
        let anchor = AuditAnchor {
            head_seq: n,
            head_hash: rows.last().map(|r| r.hash.clone()).unwrap_or_default(),
            ..AuditAnchor::default()
        };
        (rows, anchor)
    }

    fn verify(rows: &[AuditRow], anchor: &AuditAnchor) -> Result<ChainSummary, ChainError> {
        let mut v = ChainVerifier::new(anchor);
        rows.iter().for_each(|r| v.push(r));
        v.finish()
    }

    #[test]
    fn intact_edited_removed() {
        let (rows, anchor) = chain(5);
        assert_eq!(verify(&rows, &anchor).unwrap().rows, 5);
        // Edited content.
        let mut edited = rows.clone();
        edited[2].event.sub = "mallory".into();
        assert_eq!(verify(&edited, &anchor), Err(ChainError::Edited { seq: 3 }));
        // Edited content with its hash recomputed: the next row gives it away.
        let mut rehashed = rows.clone();
        rehashed[2].event.sub = "mallory".into();
        rehashed[2].hash = row_hash(3, &rehashed[2].prev_hash, &rehashed[2].event);
        assert_eq!(
            verify(&rehashed, &anchor),
            Err(ChainError::Edited { seq: 3 })
        );
        // Removed from the middle, the start and the head.
        for (i, seq) in [(2usize, 3u64), (0, 1), (4, 5)] {
            let mut removed = rows.clone();
            removed.remove(i);
            assert_eq!(verify(&removed, &anchor), Err(ChainError::Removed { seq }));
        }
        // The head edited (its hash recomputed): the anchor gives it away.
        let mut head = rows.clone();
        head[4].event.decision = "deny".into();
        head[4].hash = row_hash(5, &head[4].prev_hash, &head[4].event);
        assert_eq!(verify(&head, &anchor), Err(ChainError::Edited { seq: 5 }));
    }

    #[test]
    fn pruned_prefix_is_accepted_but_not_more() {
        let (rows, mut anchor) = chain(6);
        anchor.pruned_seq = 2;
        anchor.pruned_hash = rows[1].hash.clone();
        let kept = &rows[2..];
        let summary = verify(kept, &anchor).unwrap();
        assert_eq!((summary.rows, summary.first_seq, summary.pruned), (4, 3, 2));
        assert_eq!(
            verify(&rows[3..], &anchor),
            Err(ChainError::Removed { seq: 3 })
        );
        // Everything pruned.
        anchor.pruned_seq = 6;
        anchor.pruned_hash = rows[5].hash.clone();
        assert!(verify(&[], &anchor).is_ok());
    }

    /// The canonical form is fixed: rows hashed by earlier builds (a `serde_json::Value`
    /// array) still verify.
    #[test]
    fn row_hash_is_sha256_of_prev_and_the_json_array() {
        let event = AuditEvent {
            at_ms: 1_700_000_000_000,
            kind: "grant".into(),
            decision: "allow".into(),
            txn: "t-1".into(),
            sub: "alice \"quoted\" é".into(),
            caller: "spiffe://example.org/gw".into(),
            service: String::new(),
            lease: String::new(),
            record: r#"{"decision":"granted","n":1}"#.into(),
        };
        let canonical = serde_json::json!([
            7,
            event.at_ms,
            event.kind,
            event.decision,
            event.txn,
            event.sub,
            event.caller,
            event.service,
            event.lease,
            event.record,
        ])
        .to_string();
        let mut hasher = Sha256::new();
        hasher.update(GENESIS_HASH.as_bytes());
        hasher.update(canonical.as_bytes());
        assert_eq!(
            row_hash(7, GENESIS_HASH, &event),
            hex::encode(hasher.finalize())
        );
    }

    #[test]
    fn garbage_rows_never_panic() {
        let (rows, anchor) = chain(3);
        let mut garbage = rows.clone();
        garbage[0].seq = u64::MAX;
        garbage[1].prev_hash = "\u{0}".repeat(3);
        assert!(verify(&garbage, &anchor).is_err());
        let empty = AuditAnchor::default();
        assert!(verify(&[], &empty).is_ok());
        assert!(verify(&rows, &empty).is_err(), "rows beyond the head");
    }

    #[test]
    fn like_pattern_escapes() {
        assert_eq!(like_pattern("A_b%"), "%a\\_b\\%%");
    }
}
