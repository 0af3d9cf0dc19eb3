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
//! - Template entries ([`crate::entry::template`]) cannot be signed ahead: their ID
//!   depends on the caller. [`Cache::ensure_templates`] renders each template that
//!   applies to a caller from its attested selectors and has the server sign that ID
//!   (sending the placeholder values, never the ID). Rendered SVIDs are cached per
//!   (entry, rendered ID), renewed like the others, and dropped once no workload has
//!   fetched them for one SVID lifetime, so a removed container's identity is released.

use crate::ops::metrics::{AgentMetrics, SvidKind};
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
use crate::entry::template::TemplateValues;
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
/// Most SVIDs rendered from template entries one agent holds at once; past it, a new
/// rendering is refused (with a warning) until idle ones are released.
pub const MAX_RENDERED_SVIDS: usize = 10_000;

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
    /// For an SVID rendered from a template entry: the values it was rendered from
    /// (`entry.spiffe_id` is then the rendered ID).
    pub template: Option<Rendered>,
}

/// How a template entry's SVID was rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Placeholder -> value, as sent to the server.
    pub values: TemplateValues,
    /// The SVID's lifetime in seconds when signed: it is dropped once no workload has
    /// fetched it for that long.
    pub lifetime: i64,
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
    /// The selector types the entries in `svids` and `templates` use (placeholders
    /// included), recomputed with them: attestation skips every other type without
    /// looking at the entries.
    pub selector_types: SelectorTypes,
    /// The template entries authorized for this agent, rendered per caller
    /// ([`Cache::ensure_templates`]); their SVIDs are in `svids` once signed.
    pub templates: Vec<RegistrationEntry>,
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
            .filter(|c| match &c.entry.spiffe_id_template {
                None => true,
                // A rendered SVID is the caller's only if its selectors render that ID.
                Some(t) => {
                    c.template.is_some()
                        && t.render_for(selectors)
                            .is_ok_and(|(_, id)| id == c.entry.spiffe_id)
                }
            })
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
        let plain = self.svids.iter().any(|c| {
            let sels = &c.entry.selectors;
            sels.iter().any(|s| skipped.contains_type_of(s))
                && sels
                    .iter()
                    .all(|s| skipped.contains_type_of(s) || have.contains(s))
        });
        plain
            || self.templates.iter().any(|t| {
                let sels = &t.selectors;
                let placeholder_skipped = t.spiffe_id_template.as_ref().is_some_and(|tp| {
                    tp.selector_types()
                        .into_iter()
                        .any(|(k, n)| skipped.contains(k, n))
                });
                (placeholder_skipped || sels.iter().any(|s| skipped.contains_type_of(s)))
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
        for t in &self.templates {
            let sels = &t.selectors;
            if sels
                .iter()
                .all(|s| !computed.contains_type_of(s) || have.contains(s))
            {
                for s in sels.iter().filter(uncomputed) {
                    out.insert_type_of(s);
                }
                for (kind, name) in t
                    .spiffe_id_template
                    .iter()
                    .flat_map(|tp| tp.selector_types())
                {
                    if !computed.contains(kind, name) {
                        out.insert(kind, name);
                    }
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
    /// When a workload last fetched each rendered template SVID, by (entry id,
    /// rendered ID).
    template_use: Mutex<HashMap<(String, String), i64>>,
    /// The agent's metrics.
    metrics: Arc<AgentMetrics>,
    /// When the server's last change signal arrived (for the bundle sync delay).
    change_seen: Mutex<Option<std::time::Instant>>,
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
            template_use: Mutex::new(HashMap::new()),
            metrics: Arc::new(AgentMetrics::new()),
            change_seen: Mutex::new(None),
        })
    }

    /// The agent's metrics (served on its operations listener, [`crate::ops`]).
    pub fn metrics(&self) -> &Arc<AgentMetrics> {
        &self.metrics
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
            .filter(|c| c.template.is_none())
            .map(|c| (c.entry.id.clone(), c.clone()))
            .collect();
        let mut rendered: BTreeMap<(String, String), Arc<CachedSvid>> = current
            .svids
            .iter()
            .filter(|c| c.template.is_some())
            .map(|c| (rendered_key(c), c.clone()))
            .collect();
        let mut templates: BTreeMap<String, RegistrationEntry> = current
            .templates
            .iter()
            .map(|e| (e.id.clone(), e.clone()))
            .collect();
        let mut changed = false;
        let mut bundles = current.bundles.clone();
        let mut pending: Vec<RegistrationEntry> = Vec::new();

        if full {
            let known: BTreeMap<String, i64> = by_id
                .values()
                .map(|c| (c.entry.id.clone(), c.entry.revision))
                .chain(templates.values().map(|e| (e.id.clone(), e.revision)))
                .collect();
            let sync_started = std::time::Instant::now();
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
            let before = (by_id.len(), templates.len(), rendered.len());
            by_id.retain(|id, _| ids.contains(id));
            templates.retain(|id, _| ids.contains(id));
            for entry in sync.changed {
                // A changed entry drops what was rendered from its older revision; the
                // next fetch renders it again.
                rendered.retain(|(id, _), _| id != &entry.id);
                if entry.is_template() {
                    by_id.remove(&entry.id);
                    templates.insert(entry.id.clone(), entry);
                    changed = true;
                } else {
                    templates.remove(&entry.id);
                    pending.push(entry);
                }
            }
            rendered.retain(|(id, _), _| templates.contains_key(id));
            changed |= before != (by_id.len(), templates.len(), rendered.len());
            let fresh = self.node.bundles().await?;
            self.metrics
                .entry_sync
                .observe(sync_started.elapsed().as_secs_f64());
            let signalled = self
                .change_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if fresh != bundles {
                bundles = fresh;
                changed = true;
                if let Some(at) = signalled {
                    self.metrics.bundle_sync.observe(at.elapsed().as_secs_f64());
                }
            }
        }
        let pending_ids: HashSet<String> = pending.iter().map(|e| e.id.clone()).collect();
        let mut renewing: HashSet<String> = HashSet::new();
        for c in by_id.values() {
            if c.renew_at <= now && !pending_ids.contains(&c.entry.id) {
                pending.push(c.entry.clone());
                renewing.insert(c.entry.id.clone());
            }
        }
        if !pending.is_empty() {
            let mut keys = HashMap::new();
            let mut requests = Vec::with_capacity(pending.len());
            for entry in &pending {
                let (key, spki) = new_key()?;
                requests.push((entry.id.clone(), spki));
                keys.insert(entry.id.clone(), key);
            }
            let entries: HashMap<String, RegistrationEntry> =
                pending.into_iter().map(|e| (e.id.clone(), e)).collect();
            for chunk in requests.chunks(crate::server::node::MAX_SIGN_BATCH) {
                let signed = self.node.sign_x509_svids(chunk).await;
                if signed.is_err() {
                    self.metrics.failed(SvidKind::X509);
                }
                for (entry_id, mut svid) in signed? {
                    let (Some(entry), Some(key)) = (entries.get(&entry_id), keys.remove(&entry_id))
                    else {
                        continue;
                    };
                    if renewing.contains(&entry_id) {
                        self.metrics.renewed(SvidKind::X509);
                    } else if entry.revision == 1 {
                        let delay = self.clock.unix_seconds().saturating_sub(entry.created_at);
                        self.metrics.entry_propagation.observe(delay.max(0) as f64);
                    }
                    svid.private_key = Some(key);
                    let renew_at = renew_time(now, unix_seconds(svid.expires_at));
                    by_id.insert(
                        entry_id,
                        Arc::new(CachedSvid {
                            entry: entry.clone(),
                            svid,
                            renew_at,
                            lease_id: None,
                            template: None,
                        }),
                    );
                    changed = true;
                }
            }
        }
        changed |= self.refresh_rendered(&mut rendered, now).await;
        if changed {
            let svids = by_id.into_values().chain(rendered.into_values()).collect();
            self.publish(
                &current,
                svids,
                bundles,
                current.children.clone(),
                templates.into_values().collect(),
            );
        }
        Ok(changed)
    }

    /// Drops the rendered SVIDs no workload fetched for one SVID lifetime and renews
    /// those due. A server that refuses a renewal (the entry changed or went away)
    /// drops the SVID; one that cannot be reached keeps it for the next tick. Returns
    /// whether anything changed.
    async fn refresh_rendered(
        &self,
        rendered: &mut BTreeMap<(String, String), Arc<CachedSvid>>,
        now: i64,
    ) -> bool {
        let mut changed = false;
        {
            let mut uses = self.uses();
            rendered.retain(|key, c| {
                let last = uses.get(key).copied().unwrap_or(i64::MIN);
                let lifetime = c.template.as_ref().map_or(0, |r| r.lifetime).max(1);
                let keep = now.saturating_sub(last) < lifetime;
                if !keep {
                    tracing::info!(entry = %c.entry.id, spiffe_id = %c.entry.spiffe_id,
                        "released a template identity no workload fetched for one SVID lifetime");
                    changed = true;
                }
                keep
            });
            uses.retain(|key, _| rendered.contains_key(key));
        }
        let due: Vec<Arc<CachedSvid>> = rendered
            .values()
            .filter(|c| c.renew_at <= now)
            .cloned()
            .collect();
        for c in due {
            let key = rendered_key(&c);
            match self
                .sign_rendered(&c.entry, &c.entry.spiffe_id, c.template.as_ref(), now)
                .await
            {
                Ok(fresh) => {
                    rendered.insert(key, fresh);
                    changed = true;
                }
                Err(NodeError::NotAuthorized(_) | NodeError::Invalid(_)) => {
                    rendered.remove(&key);
                    changed = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, entry = %c.entry.id, "renewing a template SVID failed; will retry");
                }
            }
        }
        changed
    }

    /// Signs the SVID of `entry` (a template entry, `spiffe_id` its stand-in or an
    /// earlier rendering) for `id`, rendered from `rendering`'s values.
    async fn sign_rendered(
        &self,
        entry: &RegistrationEntry,
        id: &crate::spiffe_id::SpiffeId,
        rendering: Option<&Rendered>,
        now: i64,
    ) -> Result<Arc<CachedSvid>, NodeError> {
        let values = rendering.map(|r| r.values.clone()).unwrap_or_default();
        let (key, spki) = new_key()?;
        let mut svid = self
            .node
            .sign_template_x509_svid(&entry.id, &values, &spki)
            .await?;
        if &svid.spiffe_id != id {
            return Err(NodeError::Invalid(format!(
                "the server signed {} for entry {}, not {id}",
                svid.spiffe_id, entry.id
            )));
        }
        svid.private_key = Some(key);
        let expires_at = unix_seconds(svid.expires_at);
        let mut shown = entry.clone();
        shown.spiffe_id = id.clone();
        Ok(Arc::new(CachedSvid {
            entry: shown,
            svid,
            renew_at: renew_time(now, expires_at),
            lease_id: None,
            template: Some(Rendered {
                values,
                lifetime: (expires_at - now).max(1),
            }),
        }))
    }

    /// Renders each template entry that applies to a caller with `selectors` (its
    /// explicit selectors all held, every placeholder filled by exactly one selector
    /// with a valid value), marks the rendered SVIDs as fetched now, and has the server
    /// sign those not cached yet. A template that does not apply is logged at debug;
    /// a refused value at info (nothing is issued for it).
    ///
    /// # Errors
    /// The first [`NodeError`] if nothing could be signed; SVIDs that were signed are
    /// kept.
    pub async fn ensure_templates(&self, selectors: &[Selector]) -> Result<(), NodeError> {
        let snapshot = self.snapshot();
        if snapshot.templates.is_empty() {
            return Ok(());
        }
        let now = self.clock.unix_seconds();
        let have: HashSet<&Selector> = selectors.iter().collect();
        let mut wanted = Vec::new();
        for t in &snapshot.templates {
            let Some(template) = &t.spiffe_id_template else {
                continue;
            };
            if t.is_expired(now) || !t.selectors.iter().all(|s| have.contains(s)) {
                continue;
            }
            match template.render_for(selectors) {
                Ok((values, id)) => {
                    let key = (t.id.clone(), id.to_string());
                    self.uses().insert(key.clone(), now);
                    if !has_rendered(&snapshot.svids, &key, now) {
                        wanted.push((t.clone(), values, id, key));
                    }
                }
                Err(e) if e.is_not_applicable() => {
                    tracing::debug!(entry = %t.id, reason = %e, "template entry does not apply to the caller");
                }
                Err(e) => {
                    // A workload chooses its labels: at most one line a second at info.
                    static LAST_INFO: std::sync::atomic::AtomicI64 =
                        std::sync::atomic::AtomicI64::new(0);
                    let last = LAST_INFO.swap(now, std::sync::atomic::Ordering::Relaxed);
                    if last < now {
                        tracing::info!(entry = %t.id, reason = %e, "template value refused; nothing issued");
                    } else {
                        tracing::debug!(entry = %t.id, reason = %e, "template value refused; nothing issued");
                    }
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let _guard = self.refresh_lock.lock().await;
        let current = self.snapshot.load_full();
        let mut svids = current.svids.clone();
        let mut added = false;
        let mut first_error = None;
        for (entry, values, id, key) in wanted {
            if has_rendered(&svids, &key, now) {
                continue;
            }
            if svids.iter().filter(|c| c.template.is_some()).count() >= MAX_RENDERED_SVIDS {
                tracing::warn!(entry = %entry.id, spiffe_id = %id, max = MAX_RENDERED_SVIDS,
                    "too many template identities on this agent; refusing a new one until idle ones are released");
                first_error.get_or_insert(NodeError::Invalid(format!(
                    "more than {MAX_RENDERED_SVIDS} template identities on this agent"
                )));
                continue;
            }
            let rendering = Rendered {
                values,
                lifetime: 0,
            };
            match self.sign_rendered(&entry, &id, Some(&rendering), now).await {
                Ok(fresh) => {
                    svids.retain(|c| !(c.template.is_some() && rendered_key(c) == key));
                    svids.push(fresh);
                    // Again, under the lock: a refresh meanwhile forgets uses of keys it
                    // did not hold yet.
                    self.uses().insert(key, now);
                    added = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, entry = %entry.id, spiffe_id = %id, "signing a template SVID failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        if added {
            self.publish(
                &current,
                svids,
                current.bundles.clone(),
                current.children.clone(),
                current.templates.clone(),
            );
        }
        match first_error {
            Some(e) if !added => Err(e),
            _ => Ok(()),
        }
    }

    /// Stores and announces a new snapshot after `current`, sorting the SVIDs and
    /// recomputing the selector types.
    fn publish(
        &self,
        current: &Snapshot,
        mut svids: Vec<Arc<CachedSvid>>,
        bundles: BundleSet,
        children: Vec<Arc<CachedChild>>,
        templates: Vec<RegistrationEntry>,
    ) {
        svids.sort_by(|a, b| {
            (a.entry.created_at, &a.entry.id, &a.entry.spiffe_id).cmp(&(
                b.entry.created_at,
                &b.entry.id,
                &b.entry.spiffe_id,
            ))
        });
        let generation = current.generation + 1;
        let selector_types = selector_types(&svids, &templates);
        self.snapshot.store(Arc::new(Snapshot {
            svids,
            bundles,
            generation,
            children,
            selector_types,
            templates,
        }));
        self.updates.send_replace(generation);
    }

    fn uses(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), i64>> {
        self.template_use.lock().unwrap_or_else(|e| e.into_inner())
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
            templates: current.templates.clone(),
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
            if do_full {
                self.change_seen
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(std::time::Instant::now);
            }
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
        let key = match identity.template {
            Some(_) => (format!("{} {}", entry.id, entry.spiffe_id), aud.clone()),
            None => (entry.id.clone(), aud.clone()),
        };
        let now = self.clock.unix_seconds();
        let renewal = match self.jwts().get(&key) {
            Some(hit) if hit.refresh_at > now && hit.expires_at > now => {
                return Ok(hit.token.clone());
            }
            Some(_) => true,
            None => false,
        };
        let signed = match (&identity.lease_id, &identity.template) {
            (Some(lease), _) => self.node.sign_child_jwt_svid(lease, &aud).await,
            (None, Some(rendered)) => {
                self.node
                    .sign_template_jwt_svid(&entry.id, &rendered.values, &aud)
                    .await
            }
            (None, None) => self.node.sign_jwt_svid(&entry.id, &aud).await,
        };
        match &signed {
            Ok(_) if renewal => self.metrics.renewed(SvidKind::Jwt),
            Ok(_) => {}
            Err(_) => self.metrics.failed(SvidKind::Jwt),
        }
        let (token, iat, exp) = signed?;
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

/// The key of a rendered SVID: (entry id, rendered ID).
fn rendered_key(c: &CachedSvid) -> (String, String) {
    (c.entry.id.clone(), c.entry.spiffe_id.to_string())
}

/// Whether `svids` holds an unexpired rendering with this key.
fn has_rendered(svids: &[Arc<CachedSvid>], key: &(String, String), now: i64) -> bool {
    svids.iter().any(|c| {
        c.template.is_some() && &rendered_key(c) == key && unix_seconds(c.svid.expires_at) > now
    })
}

/// A fresh private key and its DER SubjectPublicKeyInfo.
fn new_key() -> Result<(PrivateKey, Vec<u8>), NodeError> {
    let key = PrivateKey::generate().map_err(|e| NodeError::Invalid(e.to_string()))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(
        &key.to_rcgen()
            .map_err(|e| NodeError::Invalid(e.to_string()))?,
    );
    Ok((key, spki))
}

/// The selector types the entries use: every selector of `svids` and `templates`, and
/// the types the templates' placeholders read.
fn selector_types(svids: &[Arc<CachedSvid>], templates: &[RegistrationEntry]) -> SelectorTypes {
    let mut types = SelectorTypes::of(
        svids
            .iter()
            .flat_map(|c| &c.entry.selectors)
            .chain(templates.iter().flat_map(|t| &t.selectors)),
    );
    for (kind, name) in templates
        .iter()
        .filter_map(|t| t.spiffe_id_template.as_ref())
        .flat_map(|t| t.selector_types())
    {
        types.insert(kind, name);
    }
    types
}

/// Half-life with +/-10 % jitter, never earlier than one second from now.
pub(crate) fn renew_time(now: i64, expires_at: i64) -> i64 {
    let life = (expires_at - now).max(0) as f64;
    let factor = rand::rng().random_range(0.4..=0.6);
    now + ((life * factor) as i64).max(1)
}
