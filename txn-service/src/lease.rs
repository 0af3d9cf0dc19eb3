//! Sub-agent callers: the TTS serves a sub-agent (a SPIFFE ID with a `sub` path
//! segment, see `writ_identity::server::lease`) only while its lease stands, and never
//! issues it a token that outlives the lease.
//!
//! Lease state comes from the identity server's store (the same SQLite file or
//! PostgreSQL database), looked up by the caller's SPIFFE ID and remembered for at most
//! [`LEASE_CACHE_TTL`], so a released child is refused within that time. Without a store
//! every sub-agent caller is refused (deny by default).

use std::time::Duration;

use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::{LeaseRecord, SharedStore};

pub use writ_identity::server::lease::{is_sub_agent_id, root_parent};

/// Longest time a lease lookup is reused.
pub const LEASE_CACHE_TTL: Duration = Duration::from_secs(2);
/// Most remembered lookups.
const LEASE_CACHE_CAPACITY: u64 = 100_000;

/// Why a sub-agent caller was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// No lease store is configured, so no sub-agent can be checked.
    #[error("sub-agent callers are not accepted: no identity store is configured")]
    NoStore,
    /// The caller has no lease.
    #[error("the caller has no sub-agent lease")]
    Unknown,
    /// The caller's lease was released or expired.
    #[error("the caller's sub-agent lease has ended")]
    Ended,
    /// The store could not be read.
    #[error("the lease store is unavailable: {0}")]
    Store(String),
}

/// Lease lookups by child SPIFFE ID, cached for [`LEASE_CACHE_TTL`].
#[derive(Debug, Clone)]
pub struct Leases {
    store: SharedStore,
    cache: moka::future::Cache<SpiffeId, Option<LeaseRecord>>,
}

impl Leases {
    /// Lookups in `store`.
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            cache: moka::future::Cache::builder()
                .max_capacity(LEASE_CACHE_CAPACITY)
                .time_to_live(LEASE_CACHE_TTL)
                .build(),
        }
    }

    /// The lease of sub-agent `caller`, standing or ended (check with
    /// [`LeaseRecord::is_live`]).
    ///
    /// # Errors
    /// [`LeaseError::Unknown`] to refuse the caller; [`LeaseError::Store`] when the
    /// store fails (not cached).
    pub async fn lookup(&self, caller: &SpiffeId) -> Result<LeaseRecord, LeaseError> {
        let lease = match self.cache.get(caller).await {
            Some(hit) => hit,
            None => {
                let fetched = self
                    .store
                    .fetch_lease_by_child(caller)
                    .await
                    .map_err(|e| LeaseError::Store(e.to_string()))?;
                self.cache.insert(caller.clone(), fetched.clone()).await;
                fetched
            }
        };
        lease.ok_or(LeaseError::Unknown)
    }
}
