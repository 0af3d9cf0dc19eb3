//! The agent's cache: the entries authorized for its node, an X509-SVID (with its
//! private key) for each, the bundles, and JWT-SVIDs per (entry, audience set).
//!
//! - Entries are synced incrementally (by id and revision) whenever the server signals a
//!   change, and every [`FULL_SYNC_INTERVAL`] as a safety net.
//! - Each X509-SVID is renewed at half its lifetime, with +/-10 % jitter so that many
//!   agents do not hit the server at once; every change publishes a new [`Snapshot`] and
//!   wakes every Workload API stream.
//! - JWT-SVIDs are reused until half their lifetime.
//! - When the server cannot be reached, the cache keeps what it has; expired SVIDs are
//!   never served (the Workload API filters them) and the next tick retries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::watch;

use super::node_api::NodeApi;
use crate::attest::workload::{SelectorDemand, SelectorTypes};
use crate::bundle::BundleSet;
use crate::clock::{SharedClock, unix_seconds};
use crate::entry::RegistrationEntry;
use crate::key_manager::PrivateKey;
use crate::key_manager::ToRcgen as _;
use crate::selector::Selector;
use crate::server::node::NodeError;
use crate::store::LeaseRecord;
use crate::svid::x509::X509Svid;

/// How often the cache looks for SVIDs due for renewal.
pub const RENEW_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How often the cache re-syncs with the server when nothing signalled a change.
pub const FULL_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Most cached JWT-SVIDs before the oldest are dropped.
pub const MAX_CACHED_JWTS: usize = 10_000;

/// One authorized entry with its current X509-SVID.
#[derive(Debug, Clone)]
pub struct CachedSvid {
    /// The entry. For a sub-agent, a stand-in: the lease id as its id, the child ID,
    /// no selectors (a child is matched by its process, not by selectors).
    pub entry: RegistrationEntry,
    /// Its SVID, private key included.
    pub svid: X509Svid,
    /// Unix seconds when the SVID is due for renewal.
    pub renew_at: i64,
    /// The sub-agent lease this SVID belongs to, if any.
    pub lease_id: Option<String>,
}

/// A sub-agent registered through this agent: its lease, the processes it is bound to,
/// and its SVID while the lease stands.
#[derive(Debug, Clone)]
pub struct CachedChild {
    /// The lease as the server granted it (`released_at` set once it ended).
    pub lease: LeaseRecord,
    /// The parent process `(pid, start time)`; the lease ends when it exits. `None` for
    /// a lease found after an agent restart (no longer watched, so already ended).
    pub parent_process: Option<(i32, u64)>,
    /// The child's SVID; `None` once the lease ended. The child process then gets no
    /// identity at all (it never falls back to the parent's selectors).
    pub svid: Option<Arc<CachedSvid>>,
}

impl CachedChild {
    /// Whether this child is the process `(pid, start_time)`.
    pub fn is_process(&self, pid: i32, start_time: u64) -> bool {
        self.lease.child_pid == pid && self.lease.child_start_time == start_time
    }
}

/// What the cache holds at one moment. Replaced whole on every change.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Entries with SVIDs, in (created_at, id) order: the first match is the default SVID.
    pub svids: Vec<Arc<CachedSvid>>,
    /// The trust domain's bundle and federated ones.
    pub bundles: BundleSet,
    /// Bumped on every change.
    pub generation: u64,
    /// Sub-agents registered through this agent, ended ones included while their
    /// process lives.
    pub children: Vec<Arc<CachedChild>>,
    /// The selector types the entries in `svids` use, recomputed with them: attestation
    /// skips every other type without looking at the entries.
    pub selector_types: SelectorTypes,
}

impl Snapshot {
    /// The sub-agent that is process `(pid, start_time)`, if any.
    pub fn child_process(&self, pid: i32, start_time: u64) -> Option<&Arc<CachedChild>> {
        self.children.iter().find(|c| c.is_process(pid, start_time))
    }

    /// The cached SVIDs whose entry selectors are all among `selectors` and that have not
    /// expired at `now` (Unix seconds).
    pub fn matching(&self, selectors: &[Selector], now: i64) -> Vec<Arc<CachedSvid>> {
        let have: HashSet<&Selector> = selectors.iter().collect();
        self.svids
            .iter()
            .filter(|c| c.entry.selectors.iter().all(|s| have.contains(s)))
            .filter(|c| unix_seconds(c.svid.expires_at) > now)
            .cloned()
            .collect()
    }

    /// Whether an entry that could match a caller with `found` selectors uses a type in
    /// `skipped` (left out of its attestation): the caller must then be attested again.
    pub fn needs_any(&self, found: &[Selector], skipped: &SelectorTypes) -> bool {
        if !skipped.intersects(&self.selector_types) {
            return false;
        }
        let have: HashSet<&Selector> = found.iter().collect();
        self.svids.iter().any(|c| {
            let sels = &c.entry.selectors;
            sels.iter().any(|s| skipped.contains_type_of(s))
                && sels
                    .iter()
                    .all(|s| skipped.contains_type_of(s) || have.contains(s))
        })
    }
}

impl SelectorDemand for Snapshot {
    fn wanted(&self, found: &[Selector], computed: &SelectorTypes) -> SelectorTypes {
        let mut out = SelectorTypes::default();
        let uncomputed = |s: &&Selector| !computed.contains_type_of(s);
        // Cheap first: nothing the entries use is left to compute.
        if self.selector_types.is_subset_of(computed) {
            return out;
        }
        let have: HashSet<&Selector> = found.iter().collect();
        for c in &self.svids {
            let sels = &c.entry.selectors;
            if sels
                .iter()
                .all(|s| !computed.contains_type_of(s) || have.contains(s))
            {
                for s in sels.iter().filter(uncomputed) {
                    out.insert_type_of(s);
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct CachedJwt {
    token: String,
    refresh_at: i64,
    expires_at: i64,
}

/// The agent's SVID cache.
#[derive(Debug)]
pub struct Cache {
    node: Arc<dyn NodeApi>,
    clock: SharedClock,
    snapshot: ArcSwap<Snapshot>,
    updates: watch::Sender<u64>,
    jwts: Mutex<HashMap<(String, Vec<String>), CachedJwt>>,
    refresh_lock: tokio::sync::Mutex<()>,
    /// The server's reason, while it refuses this agent's entry sync (PermissionDenied:
    /// the agent was evicted or banned); cleared by the next accepted sync.
    refused: Mutex<Option<String>>,
}

impl Cache {
    /// An empty cache over a node API.
    pub fn new(node: Arc<dyn NodeApi>, clock: SharedClock) -> Arc<Self> {
        let (updates, _) = watch::channel(0);
        Arc::new(Self {
            node,
            clock,
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            updates,
            jwts: Mutex::new(HashMap::new()),
            refresh_lock: tokio::sync::Mutex::new(()),
            refused: Mutex::new(None),
        })
    }

    /// The node API this cache talks to.
    pub fn node(&self) -> &Arc<dyn NodeApi> {
        &self.node
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Why the server refused this agent's last entry sync (it was evicted or banned),
    /// or `None` if the last sync was accepted.
    pub fn refused_by_server(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A receiver that moves on every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Syncs entries and bundles with the server and signs whatever is new, changed or
    /// due for renewal. With `full == false` only renewals are considered (no server call
    /// unless something is due). Returns whether the snapshot changed.
    ///
    /// # Errors
    /// [`NodeError`] if the server fails; the snapshot stays as it was.
    pub async fn refresh(&self, full: bool) -> Result<bool, NodeError> {
        let _guard = self.refresh_lock.lock().await;
        let now = self.clock.unix_seconds();
        let current = self.snapshot.load_full();
        let mut by_id: BTreeMap<String, Arc<CachedSvid>> = current
            .svids
            .iter()
            .map(|c| (c.entry.id.clone(), c.clone()))
            .collect();
        let mut changed = false;
        let mut bundles = current.bundles.clone();
        let mut pending: Vec<RegistrationEntry> = Vec::new();

        if full {
            let known: BTreeMap<String, i64> = by_id
                .values()
                .map(|c| (c.entry.id.clone(), c.entry.revision))
                .collect();
            let sync = self.node.sync_entries(&known).await;
            // Only the sync says whether the server still knows this agent: a refused
            // signature may be an entry deleted meanwhile.
            // An unreachable server changes nothing.
            match &sync {
                Ok(_) => *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = None,
                Err(NodeError::NotAuthorized(reason)) => {
                    *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                }
                Err(_) => {}
            }
            let sync = sync?;
            let ids: HashSet<&String> = sync.ids.iter().collect();
            let before = by_id.len();
            by_id.retain(|id, _| ids.contains(id));
            changed |= by_id.len() != before;
            pending.extend(sync.changed);
            let fresh = self.node.bundles().await?;
            if fresh != bundles {
                bundles = fresh;
                changed = true;
            }
        }
        let pending_ids: HashSet<String> = pending.iter().map(|e| e.id.clone()).collect();
        for c in by_id.values() {
            if c.renew_at <= now && !pending_ids.contains(&c.entry.id) {
                pending.push(c.entry.clone());
            }
        }
        if !pending.is_empty() {
            let mut keys = HashMap::new();
            let mut requests = Vec::with_capacity(pending.len());
            for entry in &pending {
                let key = PrivateKey::generate().map_err(|e| NodeError::Invalid(e.to_string()))?;
                let spki = rcgen::PublicKeyData::subject_public_key_info(
                    &key.to_rcgen()
                        .map_err(|e| NodeError::Invalid(e.to_string()))?,
                );
                requests.push((entry.id.clone(), spki));
                keys.insert(entry.id.clone(), key);
            }
            let entries: HashMap<String, RegistrationEntry> =
                pending.into_iter().map(|e| (e.id.clone(), e)).collect();
            for chunk in requests.chunks(crate::server::node::MAX_SIGN_BATCH) {
                for (entry_id, mut svid) in self.node.sign_x509_svids(chunk).await? {
                    let (Some(entry), Some(key)) = (entries.get(&entry_id), keys.remove(&entry_id))
                    else {
                        continue;
                    };
                    svid.private_key = Some(key);
                    let renew_at = renew_time(now, unix_seconds(svid.expires_at));
                    by_id.insert(
                        entry_id,
                        Arc::new(CachedSvid {
                            entry: entry.clone(),
                            svid,
                            renew_at,
                            lease_id: None,
                        }),
                    );
                    changed = true;
                }
            }
        }
        if changed {
            let mut svids: Vec<Arc<CachedSvid>> = by_id.into_values().collect();
            svids.sort_by(|a, b| {
                (a.entry.created_at, &a.entry.id).cmp(&(b.entry.created_at, &b.entry.id))
            });
            let generation = current.generation + 1;
            let selector_types = SelectorTypes::of(svids.iter().flat_map(|c| &c.entry.selectors));
            self.snapshot.store(Arc::new(Snapshot {
                svids,
                bundles,
                generation,
                children: current.children.clone(),
                selector_types,
            }));
            self.updates.send_replace(generation);
        }
        Ok(changed)
    }

    /// Replaces the sub-agent list with what `update` makes of it (under the same lock
    /// as [`Self::refresh`], so neither loses the other's change) and publishes a new
    /// snapshot if it changed.
    pub async fn update_children<F>(&self, update: F)
    where
        F: FnOnce(&mut Vec<Arc<CachedChild>>) -> bool,
    {
        let _guard = self.refresh_lock.lock().await;
        let current = self.snapshot.load_full();
        let mut children = current.children.clone();
        if !update(&mut children) {
            return;
        }
        let generation = current.generation + 1;
        self.snapshot.store(Arc::new(Snapshot {
            svids: current.svids.clone(),
            bundles: current.bundles.clone(),
            generation,
            children,
            selector_types: current.selector_types.clone(),
        }));
        self.updates.send_replace(generation);
    }

    /// Runs the cache until the task is dropped: a full sync on every server change
    /// signal and every [`FULL_SYNC_INTERVAL`], renewal checks every
    /// [`RENEW_CHECK_INTERVAL`]. Failures are logged and retried with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.node.changes();
        let mut renew = tokio::time::interval(RENEW_CHECK_INTERVAL);
        let mut full = tokio::time::interval(FULL_SYNC_INTERVAL);
        let mut backoff = Duration::from_millis(200);
        loop {
            let do_full = tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        // The sender is gone (server shut down in-process): poll instead.
                        changes = self.node.changes();
                        tokio::time::sleep(RENEW_CHECK_INTERVAL).await;
                    }
                    true
                }
                _ = full.tick() => true,
                _ = renew.tick() => false,
            };
            match self.refresh(do_full).await {
                Ok(_) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "agent cache refresh failed; serving cached SVIDs");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// A JWT-SVID for an identity (an entry's or a sub-agent's) and `audience`, from the cache while less than half its
    /// lifetime has passed, otherwise freshly signed by the server.
    ///
    /// # Errors
    /// [`NodeError`] if the server refuses or cannot be reached.
    pub async fn jwt_svid(
        &self,
        identity: &CachedSvid,
        audience: &[String],
    ) -> Result<String, NodeError> {
        let entry = &identity.entry;
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key = (entry.id.clone(), aud.clone());
        let now = self.clock.unix_seconds();
        if let Some(hit) = self.jwts().get(&key)
            && hit.refresh_at > now
            && hit.expires_at > now
        {
            return Ok(hit.token.clone());
        }
        let (token, iat, exp) = match &identity.lease_id {
            Some(lease) => self.node.sign_child_jwt_svid(lease, &aud).await?,
            None => self.node.sign_jwt_svid(&entry.id, &aud).await?,
        };
        let mut jwts = self.jwts();
        if jwts.len() >= MAX_CACHED_JWTS {
            jwts.retain(|_, j| j.expires_at > now);
            if jwts.len() >= MAX_CACHED_JWTS {
                jwts.clear();
            }
        }
        jwts.insert(
            key,
            CachedJwt {
                token: token.clone(),
                refresh_at: iat + (exp - iat) / 2,
                expires_at: exp,
            },
        );
        Ok(token)
    }

    fn jwts(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Vec<String>), CachedJwt>> {
        self.jwts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Half-life with +/-10 % jitter, never earlier than one second from now.
pub(crate) fn renew_time(now: i64, expires_at: i64) -> i64 {
    let life = (expires_at - now).max(0) as f64;
    let factor = rand::rng().random_range(0.4..=0.6);
    now + ((life * factor) as i64).max(1)
}
