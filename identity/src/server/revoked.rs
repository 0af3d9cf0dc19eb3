//! The kill switch at the identity server: the revocations in force, kept in memory
//! from the store, so the server signs no SVID for a workload a revocation covers.
//!
//! [`Revocations`] is loaded when the server starts and read again, past the last `seq`
//! it has, on every [`StoreChange::Revocation`] (from this server or, on PostgreSQL,
//! from any server of the fleet); a missed change ([`StoreChange::Resync`], a lagging
//! receiver) reloads it whole. Each time it changes, agents are told (the node API's
//! change generation moves), they sync, and the sync no longer lists a revoked entry:
//! the agent drops it like a deleted entry, stops renewing its SVID and tells its
//! Workload API streams. Signing refuses a revoked identity whatever the agent asks:
//! entries (X509 and JWT), template entries (the rendered ID) and sub-agent leases (the
//! child ID; the lease reads as ended).

use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use tokio::sync::broadcast;
use writ_spiffe::revocation::{Revocation, RevocationSet};

use crate::clock::SharedClock;
use crate::store::revocation::MAX_LIST;
use crate::store::{Store, StoreChange, StoreError};

/// The revocations in force as this server knows them (see the module docs).
#[derive(Debug, Default)]
pub struct Revocations {
    set: ArcSwap<RevocationSet>,
}

impl Revocations {
    /// The set in use.
    pub fn snapshot(&self) -> Arc<RevocationSet> {
        self.set.load_full()
    }

    /// The first revocation in force at `now` (Unix seconds) that covers the workload
    /// `spiffe_id`.
    pub fn workload(&self, spiffe_id: &str, now: i64) -> Option<Revocation> {
        self.set.load().workload(spiffe_id, now).cloned()
    }

    /// Reads what the store holds past the last `seq` known (everything with `full`),
    /// in force at `now`; whether the set changed.
    ///
    /// # Errors
    /// [`StoreError`] if the store fails; the set in use is then unchanged.
    pub async fn refresh(
        &self,
        store: &dyn Store,
        now: i64,
        full: bool,
    ) -> Result<bool, StoreError> {
        let current = self.set.load_full();
        let mut next = if full {
            RevocationSet::default()
        } else {
            RevocationSet::clone(&current)
        };
        let mut after = next.seq();
        let mut added = 0usize;
        loop {
            let rows = store.list_revocations(after, now, MAX_LIST).await?;
            let count = rows.len();
            for row in rows {
                after = after.max(row.revocation.seq);
                next.insert(row.revocation);
                added += 1;
            }
            if count < MAX_LIST as usize {
                break;
            }
        }
        let before = next.len();
        next.prune(now);
        let changed = full || added > 0 || next.len() != before;
        if changed {
            self.set.store(Arc::new(next));
        }
        Ok(changed)
    }
}

/// Follows the store's change events: reads revocations on each
/// [`StoreChange::Revocation`] and tells agents (`agents`) when the set changed. Ends
/// when the store's events end or the server is dropped.
pub(crate) async fn follow(
    mut events: broadcast::Receiver<StoreChange>,
    store: Weak<dyn Store>,
    revocations: Weak<Revocations>,
    clock: SharedClock,
    agents: tokio::sync::watch::Sender<u64>,
) {
    use broadcast::error::RecvError;
    loop {
        let full = match events.recv().await {
            Ok(StoreChange::Revocation) => false,
            Ok(StoreChange::Resync) | Err(RecvError::Lagged(_)) => true,
            Ok(_) => continue,
            Err(RecvError::Closed) => return,
        };
        let (Some(store), Some(revocations)) = (store.upgrade(), revocations.upgrade()) else {
            return;
        };
        match revocations
            .refresh(store.as_ref(), clock.unix_seconds(), full)
            .await
        {
            Ok(true) => {
                tracing::info!(
                    in_force = revocations.snapshot().len(),
                    "revocations changed; agents re-sync"
                );
                agents.send_modify(|g| *g += 1);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not read revocations; the next change retries");
            }
        }
    }
}
