//! The kill switch's durable half: the revocations in force, as `writ txn revoke` records
//! them through the server's admin API and every token service replica, server and
//! agent reads them back.
//!
//! One row holds one [`writ_spiffe::revocation::Revocation`] and who made it. Its `seq`
//! comes from the database and is never reused (SQLite `AUTOINCREMENT`, a PostgreSQL
//! identity column); inserts hold the audit chain's lock, so on a shared PostgreSQL store
//! they commit in `seq` order and a reader that polls `seq > after` never skips one. The
//! insert appends an audit event (kind `revocation`, decision `deny`, the whole entry as
//! its record) in the same transaction: a revocation is never in force unaudited. A
//! revocation is refused when [`MAX_IN_FORCE`] are in force; lapsed ones are pruned.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_identity::store::StoreError> {
//! use writ_identity::store::{Store, revocation::NewRevocation, sqlite::SqliteStore};
//! use writ_spiffe::revocation::Target;
//! let store = SqliteStore::open_in_memory().await?;
//! let made = store
//!     .insert_revocation(&NewRevocation {
//!         target: Target::Txn { txn: "6d1f0c1e".into() },
//!         revoked_at: 1_700_000_000,
//!         lapses_at: 1_700_000_600,
//!         reason: Some("prompt injection".into()),
//!         revoked_by: "admin socket (uid 0)".into(),
//!     })
//!     .await?;
//! let in_force = store.list_revocations(0, 1_700_000_001, 100).await?;
//! assert_eq!(in_force[0].revocation.seq, made.seq);
//! # Ok(()) }
//! ```

use writ_spiffe::revocation::{MAX_PAGE, MAX_REASON, Revocation, Target};

pub use writ_spiffe::revocation::MAX_IN_FORCE;

use super::StoreError;
use super::audit::AuditEvent;

/// Most rows one [`super::Store::list_revocations`] returns (a feed page).
pub const MAX_LIST: u32 = MAX_PAGE as u32;
/// Longest `revoked_by` kept, in bytes.
pub const MAX_REVOKED_BY: usize = 256;

/// A revocation to record; the store gives it its `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRevocation {
    /// What it covers (checked with [`Target::check`]).
    pub target: Target,
    /// When it was made, Unix seconds.
    pub revoked_at: i64,
    /// When everything it covers has expired, Unix seconds (after `revoked_at`).
    pub lapses_at: i64,
    /// Why, as the operator said it (at most [`MAX_REASON`] bytes, no control
    /// characters).
    pub reason: Option<String>,
    /// Who made it (the admin caller), for listings and the audit trail (at most
    /// [`MAX_REVOKED_BY`] bytes).
    pub revoked_by: String,
}

impl NewRevocation {
    /// Checks the limits.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] saying which.
    pub fn check(&self) -> Result<(), StoreError> {
        self.target
            .check()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        if let Some(reason) = &self.reason
            && (reason.len() > MAX_REASON || reason.chars().any(char::is_control))
        {
            return Err(StoreError::Invalid(format!(
                "a revocation reason must be at most {MAX_REASON} bytes without control characters"
            )));
        }
        if self.revoked_by.len() > MAX_REVOKED_BY || self.revoked_by.chars().any(char::is_control) {
            return Err(StoreError::Invalid(format!(
                "a revocation's `revoked_by` must be at most {MAX_REVOKED_BY} bytes without control characters"
            )));
        }
        if self.lapses_at <= self.revoked_at {
            return Err(StoreError::Invalid(
                "a revocation must lapse after it is made".into(),
            ));
        }
        Ok(())
    }

    /// The entry as stored with `seq`.
    pub fn with_seq(&self, seq: u64) -> Revocation {
        Revocation {
            seq,
            target: self.target.clone(),
            revoked_at: self.revoked_at,
            lapses_at: self.lapses_at,
            reason: self.reason.clone(),
        }
    }

    /// The audit event recorded with the entry `seq`: kind `revocation`, decision
    /// `deny`, its transaction, user or lease in the indexed columns, the whole entry and
    /// who made it as the record.
    pub(super) fn audit_event(&self, seq: u64) -> AuditEvent {
        let revocation = self.with_seq(seq);
        let record = serde_json::json!({
            "revocation": revocation,
            "revoked_by": self.revoked_by,
        });
        let (txn, sub, lease) = match &self.target {
            Target::Txn { txn } => (txn.clone(), String::new(), String::new()),
            Target::Sub { sub } => (String::new(), sub.clone(), String::new()),
            Target::Lease { lease, .. } => (String::new(), String::new(), lease.clone()),
            Target::Workload { .. } => (String::new(), String::new(), String::new()),
        };
        AuditEvent {
            at_ms: self.revoked_at.saturating_mul(1000),
            kind: "revocation".into(),
            decision: "deny".into(),
            txn,
            sub,
            caller: String::new(),
            service: String::new(),
            lease,
            record: record.to_string(),
        }
    }
}

/// A stored revocation and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevocationRecord {
    /// The entry.
    pub revocation: Revocation,
    /// Who made it.
    pub revoked_by: String,
}

/// The column values of a target: kind, value, SPIFFE ID (a lease's child, else empty),
/// subtree.
pub(super) fn target_columns(target: &Target) -> (&'static str, &str, &str, bool) {
    match target {
        Target::Txn { txn } => ("txn", txn, "", false),
        Target::Sub { sub } => ("sub", sub, "", false),
        Target::Workload { spiffe_id, subtree } => ("workload", spiffe_id, "", *subtree),
        Target::Lease { lease, spiffe_id } => ("lease", lease, spiffe_id, false),
    }
}

pub(super) const COUNT_IN_FORCE: &str = "SELECT COUNT(*) FROM revocations WHERE lapses_at > $1";
pub(super) const INSERT: &str = "INSERT INTO revocations (kind, value, spiffe_id, subtree, \
     revoked_at, lapses_at, reason, revoked_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     RETURNING seq";
pub(super) const LIST: &str = "SELECT seq, kind, value, spiffe_id, subtree, revoked_at, \
     lapses_at, reason, revoked_by FROM revocations WHERE seq > $1 AND lapses_at > $2 \
     ORDER BY seq LIMIT $3";
pub(super) const PRUNE: &str = "DELETE FROM revocations WHERE lapses_at <= $1";

/// Reads a `revocations` row.
pub(super) fn from_sql<R>(row: &R) -> Result<RevocationRecord, StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let text = |c: &str| -> Result<String, StoreError> {
        row.try_get(c)
            .map_err(|e| corrupt(&format!("column {c}: {e}")))
    };
    let num = |c: &str| -> Result<i64, StoreError> {
        row.try_get(c)
            .map_err(|e| corrupt(&format!("column {c}: {e}")))
    };
    let seq = num("seq")?;
    let kind = text("kind")?;
    let value = text("value")?;
    let subtree: bool = row
        .try_get("subtree")
        .map_err(|e| corrupt(&format!("column subtree: {e}")))?;
    let target = match kind.as_str() {
        "txn" => Target::Txn { txn: value },
        "sub" => Target::Sub { sub: value },
        "workload" => Target::Workload {
            spiffe_id: value,
            subtree,
        },
        "lease" => Target::Lease {
            lease: value,
            spiffe_id: text("spiffe_id")?,
        },
        other => return Err(corrupt(&format!("unknown kind {other:?}"))),
    };
    Ok(RevocationRecord {
        revocation: Revocation {
            seq: u64::try_from(seq).map_err(|_| corrupt("negative seq"))?,
            target,
            revoked_at: num("revoked_at")?,
            lapses_at: num("lapses_at")?,
            reason: row
                .try_get("reason")
                .map_err(|e| corrupt(&format!("column reason: {e}")))?,
        },
        revoked_by: text("revoked_by")?,
    })
}

fn corrupt(detail: &str) -> StoreError {
    StoreError::Corrupt {
        kind: "revocation",
        detail: detail.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(target: Target) -> NewRevocation {
        NewRevocation {
            target,
            revoked_at: 10,
            lapses_at: 20,
            reason: None,
            revoked_by: "admin".into(),
        }
    }

    #[test]
    fn limits_are_checked() {
        assert!(new(Target::Txn { txn: "t".into() }).check().is_ok());
        assert!(new(Target::Txn { txn: String::new() }).check().is_err());
        let mut r = new(Target::Sub { sub: "u".into() });
        r.reason = Some("x".repeat(MAX_REASON + 1));
        assert!(r.check().is_err());
        r.reason = Some("bad\u{7}bell".into());
        assert!(r.check().is_err());
        r.reason = None;
        r.revoked_by = "y".repeat(MAX_REVOKED_BY + 1);
        assert!(r.check().is_err());
        r.revoked_by = "admin".into();
        r.lapses_at = r.revoked_at;
        assert!(r.check().is_err(), "must lapse after it is made");
    }

    #[test]
    fn audit_event_names_the_target_and_fits_the_limits() {
        let r = new(Target::Lease {
            lease: "L1".into(),
            spiffe_id: "spiffe://td/p/sub/x".into(),
        });
        let e = r.audit_event(7);
        assert_eq!((e.kind.as_str(), e.lease.as_str()), ("revocation", "L1"));
        assert!(e.check().is_ok());
        let back: serde_json::Value = serde_json::from_str(&e.record).unwrap();
        assert_eq!(back["revocation"]["seq"], 7);
        assert_eq!(back["revoked_by"], "admin");
        let t = new(Target::Txn { txn: "t9".into() }).audit_event(1);
        assert_eq!(t.txn, "t9");
    }
}
