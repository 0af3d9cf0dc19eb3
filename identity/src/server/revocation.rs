//! The kill switch on the admin API: `Revoke` and `ListRevocations`, mapping
//! `writ txn revoke` and `writ txn revocations` to the store.
//!
//! # When a revocation lapses
//!
//! An entry is kept until everything it covers has expired, then dropped (verifiers
//! stop carrying it). From its `revoked_at`, it lapses after the longest lifetime of
//! what it covers, plus [`SKEW`] for clocks and verifiers' leeway:
//!
//! | target | covers | lapses at `revoked_at` + |
//! |---|---|---|
//! | `txn` | its Txn-Tokens: a replacement never outlives its subject token, so none lives past the first token's lifetime | [`TXN_TOKEN_CEILING`] (1 h, the token service's hard ceiling) |
//! | `sub` | the user's Txn-Tokens and the OIDC subject tokens they could still be exchanged from | [`SUBJECT_TOKEN_CEILING`] (24 h, the token service's default `max_token_lifetime`) |
//! | `workload` | its SVIDs (none outlives the CA certificate that signed it, at most `ca.ttl`) and the Txn-Tokens it requested or acts in | the longest of `ca.ttl` and [`TXN_TOKEN_CEILING`] |
//! | `lease` | the child's SVID and tokens, all cut at the lease's end | the lease's end (at least [`TXN_TOKEN_CEILING`] if the lease is still live) |
//!
//! A `hold` (`writ txn revoke --for`) keeps it longer, up to [`MAX_HOLD`]. A lapsed
//! workload revocation lets the workload back in (its entry still stands): to keep it
//! out for good, delete its entry as well.

use std::time::Duration;

use writ_spiffe::revocation::{MAX_REASON, MAX_VALUE, Target};

use super::ServerState;
use super::admin::AdminError;
use crate::proto::admin as pb;
use crate::spiffe_id::SpiffeId;
use crate::store::StoreError;
use crate::store::revocation::{MAX_LIST, NewRevocation, RevocationRecord};

/// The longest a Txn-Token lives: the token service's hard ceiling on every policy's
/// `max_lifetime` (`writ_txn_service::policy::HARD_MAX_LIFETIME`, checked equal in its
/// tests).
pub const TXN_TOKEN_CEILING: Duration = Duration::from_secs(3600);
/// The longest an OIDC subject token is accepted for: the token service's default
/// `max_token_lifetime` (a service configured longer needs `--for`).
pub const SUBJECT_TOKEN_CEILING: Duration = Duration::from_secs(24 * 3600);
/// Added to every lapse: clock skew and verifiers' leeway on `exp`.
pub const SKEW: Duration = Duration::from_secs(60);
/// The longest `hold` a revocation may ask for.
pub const MAX_HOLD: Duration = Duration::from_secs(90 * 24 * 3600);

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn invalid(field: &'static str, reason: impl ToString) -> AdminError {
    AdminError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// When a revocation of `target` made at `now` lapses (see the module docs), given the
/// server's CA lifetime, a lease's end (for a lease) and a requested `hold`.
pub fn lapses_at(
    target: &Target,
    now: i64,
    ca_ttl: Duration,
    lease_end: Option<i64>,
    hold: Duration,
) -> i64 {
    let txn = now.saturating_add(secs(TXN_TOKEN_CEILING));
    let covered = match target {
        Target::Txn { .. } => txn,
        Target::Sub { .. } => {
            now.saturating_add(secs(SUBJECT_TOKEN_CEILING.max(TXN_TOKEN_CEILING)))
        }
        Target::Workload { .. } => now.saturating_add(secs(ca_ttl.max(TXN_TOKEN_CEILING))),
        Target::Lease { .. } => match lease_end {
            Some(end) if end > now => end.max(txn),
            _ => now,
        },
    };
    covered
        .saturating_add(secs(SKEW))
        .max(now.saturating_add(secs(hold)))
}

/// The validated target of a request (a lease resolved to its child's SPIFFE ID), with
/// the lease's end.
async fn target(
    state: &ServerState,
    r: &pb::RevokeRequest,
) -> Result<(Target, Option<i64>), AdminError> {
    use pb::revoke_request::Target as T;
    let value_ok = |field: &'static str, v: &str| -> Result<(), AdminError> {
        if v.is_empty() || v.len() > MAX_VALUE || v.chars().any(char::is_control) {
            return Err(invalid(
                field,
                format!("must be 1 to {MAX_VALUE} bytes without control characters"),
            ));
        }
        Ok(())
    };
    let target = r
        .target
        .as_ref()
        .ok_or_else(|| invalid("target", "one of txn, sub, workload or lease is required"))?;
    if r.subtree && !matches!(target, T::Workload(_)) {
        return Err(invalid("subtree", "applies to a workload only"));
    }
    Ok(match target {
        T::Txn(txn) => {
            value_ok("txn", txn)?;
            (Target::Txn { txn: txn.clone() }, None)
        }
        T::Sub(sub) => {
            value_ok("sub", sub)?;
            (Target::Sub { sub: sub.clone() }, None)
        }
        T::Workload(id) => {
            value_ok("workload", id)?;
            let id = SpiffeId::new(id).map_err(|e| invalid("workload", e))?;
            if id.path().is_empty() {
                return Err(invalid(
                    "workload",
                    "a trust domain's own ID covers no workload; name a workload",
                ));
            }
            (
                Target::Workload {
                    spiffe_id: id.to_string(),
                    subtree: r.subtree,
                },
                None,
            )
        }
        T::Lease(lease) => {
            value_ok("lease", lease)?;
            let found = state
                .store
                .fetch_lease(lease)
                .await?
                .ok_or(AdminError::Store(StoreError::NotFound { kind: "lease" }))?;
            (
                Target::Lease {
                    lease: found.id.clone(),
                    spiffe_id: found.child_id.to_string(),
                },
                Some(found.expires_at),
            )
        }
    })
}

/// `Revoke`: checks the request, works out when the entry lapses, records it (with its
/// audit event) and logs it.
///
/// # Errors
/// [`AdminError::Invalid`] for a malformed request; the store's refusal otherwise
/// (`NotFound` for an unknown lease, `TooMany` when too many are in force).
pub async fn revoke(
    state: &ServerState,
    r: pb::RevokeRequest,
    revoked_by: String,
) -> Result<pb::Revocation, AdminError> {
    if r.reason.len() > MAX_REASON || r.reason.chars().any(char::is_control) {
        return Err(invalid(
            "reason",
            format!("at most {MAX_REASON} bytes without control characters"),
        ));
    }
    let hold = Duration::from_secs(r.hold_secs);
    if hold > MAX_HOLD {
        return Err(invalid(
            "hold_secs",
            format!(
                "at most {}s ({} days)",
                MAX_HOLD.as_secs(),
                MAX_HOLD.as_secs() / 86_400
            ),
        ));
    }
    let (target, lease_end) = target(state, &r).await?;
    let now = state.clock.unix_seconds();
    let new = NewRevocation {
        lapses_at: lapses_at(&target, now, state.config.ca.ca_ttl, lease_end, hold),
        target,
        revoked_at: now,
        reason: (!r.reason.is_empty()).then_some(r.reason),
        revoked_by: revoked_by.clone(),
    };
    let made = state.store.insert_revocation(&new).await?;
    tracing::warn!(
        seq = made.seq,
        kind = kind(&made.target),
        value = %made.target.value(),
        lapses_at = made.lapses_at,
        revoked_by = %revoked_by,
        "revoked"
    );
    Ok(to_proto(&RevocationRecord {
        revocation: made,
        revoked_by,
    }))
}

/// `ListRevocations`: the entries in force, oldest first, a page at a time.
///
/// # Errors
/// The store's.
pub async fn list(
    state: &ServerState,
    r: pb::ListRevocationsRequest,
) -> Result<pb::ListRevocationsResponse, AdminError> {
    let limit = if r.limit == 0 {
        MAX_LIST
    } else {
        r.limit.min(MAX_LIST)
    };
    let now = state.clock.unix_seconds();
    let found = state.store.list_revocations(r.after, now, limit).await?;
    Ok(pb::ListRevocationsResponse {
        more: found.len() >= usize::try_from(limit).unwrap_or(usize::MAX),
        revocations: found.iter().map(to_proto).collect(),
    })
}

fn kind(target: &Target) -> &'static str {
    match target {
        Target::Txn { .. } => "txn",
        Target::Sub { .. } => "sub",
        Target::Workload { .. } => "workload",
        Target::Lease { .. } => "lease",
    }
}

/// A stored revocation in its wire form.
pub fn to_proto(r: &RevocationRecord) -> pb::Revocation {
    let t = &r.revocation.target;
    let (spiffe_id, subtree) = match t {
        Target::Workload { subtree, .. } => (String::new(), *subtree),
        Target::Lease { spiffe_id, .. } => (spiffe_id.clone(), false),
        Target::Txn { .. } | Target::Sub { .. } => (String::new(), false),
    };
    pb::Revocation {
        seq: r.revocation.seq,
        kind: kind(t).into(),
        value: t.value().into(),
        spiffe_id,
        subtree,
        revoked_at: r.revocation.revoked_at,
        lapses_at: r.revocation.lapses_at,
        reason: r.revocation.reason.clone().unwrap_or_default(),
        revoked_by: r.revoked_by.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapses_follow_the_rule() {
        let day = Duration::from_secs(86_400);
        let txn = Target::Txn { txn: "t".into() };
        let sub = Target::Sub { sub: "u".into() };
        let wl = Target::Workload {
            spiffe_id: "spiffe://td/a".into(),
            subtree: false,
        };
        let lease = Target::Lease {
            lease: "L".into(),
            spiffe_id: "spiffe://td/a/sub/L".into(),
        };
        let z = Duration::ZERO;
        assert_eq!(lapses_at(&txn, 1000, day, None, z), 1000 + 3600 + 60);
        assert_eq!(lapses_at(&sub, 1000, day, None, z), 1000 + 86_400 + 60);
        assert_eq!(lapses_at(&wl, 1000, day, None, z), 1000 + 86_400 + 60);
        let short_ca = Duration::from_secs(600);
        assert_eq!(lapses_at(&wl, 1000, short_ca, None, z), 1000 + 3600 + 60);
        // A live lease: its end, at least the Txn-Token ceiling; an ended one: the skew.
        assert_eq!(lapses_at(&lease, 1000, day, Some(9000), z), 9000 + 60);
        assert_eq!(
            lapses_at(&lease, 1000, day, Some(1300), z),
            1000 + 3600 + 60
        );
        assert_eq!(lapses_at(&lease, 1000, day, Some(900), z), 1000 + 60);
        // A hold keeps it longer, never shorter.
        assert_eq!(lapses_at(&txn, 1000, day, None, day), 1000 + 86_400);
        assert_eq!(
            lapses_at(&txn, 1000, day, None, Duration::from_secs(5)),
            1000 + 3660
        );
    }
}
