//! The server-side entry cache: a [`CachedStore`] wraps any [`Store`] and answers entry
//! and agent reads (`fetch_entry`, `list_entries`, `find_entries_by_selectors`,
//! `count_entries`, `fetch_agent`, `list_agents`) from an in-memory index instead of SQL.
//!
//! The index is built from the inner store when the cache is made. Writes go to the inner
//! store first and, when they succeed, into the index at once, so a server sees its own
//! writes immediately. Writes by anyone else (another server on the same PostgreSQL, or
//! a caller of the inner store) arrive as [`StoreChange`]s: a background task re-reads
//! the named entry or agent, or rebuilds the whole index on [`StoreChange::Resync`], when
//! its receiver lagged, or when more than [`REBUILD_AFTER`] changes are pending at once.
//! A rebuild builds a new index beside the old one and swaps it in, so reads never wait
//! for it. The cache's own [`Store::changes`] re-emits the inner store's changes once
//! the index reflects them.
//!
//! The index keeps each entry once (`Arc`) and finds it by id (ordered, for listings),
//! by parent, by SPIFFE ID, and under one of its selectors: the one with the fewest
//! entries when it was indexed. An entry matches a workload only if all its selectors
//! are the workload's, so it is found under whichever of its selectors it is filed
//! under; a lookup touches only the entries filed under the workload's own selectors
//! and checks each against the workload's (sorted) selectors.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_identity::store::StoreError> {
//! use std::sync::Arc;
//! use writ_identity::store::{Store, cache::CachedStore, sqlite::SqliteStore};
//! let sqlite = SqliteStore::open(std::path::Path::new("/var/lib/writ/datastore.sqlite3")).await?;
//! let store = CachedStore::new(Arc::new(sqlite)).await?;
//! let selectors = vec!["unix:uid:1000".parse().unwrap()];
//! let entries = store.find_entries_by_selectors(&selectors).await?;
//! println!("{} entries, {:?}", entries.len(), store.stats());
//! # Ok(()) }
//! ```

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::schema::{self, EntryParams};
use super::{
    AttestedAgent, BundleRecord, CHANGE_BACKLOG, EntryFilter, FederationRecord, JoinTokenRecord,
    JournalRecord, LeaseRecord, SharedStore, Store, StoreChange, StoreError, TemplateIssue,
    TxnKeyRecord,
};
use crate::entry::RegistrationEntry;
use crate::selector::Selector;
use crate::spiffe_id::SpiffeId;

/// More changes than this pending at once are applied by a full rebuild rather than by
/// re-reading each one.
pub const REBUILD_AFTER: usize = 1_000;

/// The first wait before retrying a rebuild that failed (the store was unreachable);
/// doubled on each failure up to [`REBUILD_RETRY_MAX`].
const REBUILD_RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between rebuild attempts.
const REBUILD_RETRY_MAX: Duration = Duration::from_secs(5);
/// Estimated bytes a map key costs beyond its text (the allocation, the map slot).
const KEY_OVERHEAD: usize = 64;
/// Estimated bytes each place an entry is filed under costs (a pointer and its share of
/// the map or tree around it).
const FILING_OVERHEAD: usize = 16;

/// What the cache holds and what its last full build cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Entries in the index.
    pub entries: usize,
    /// Agents in the index.
    pub agents: usize,
    /// How long the last full build took (reading the inner store and indexing).
    pub last_build: Duration,
    /// Full builds so far (the first one included).
    pub builds: u64,
    /// An estimate of the bytes the index holds per entry (the entry itself and its
    /// filings), from the lengths of its strings; the entry bench measures the real
    /// figure with a counting allocator.
    pub bytes_per_entry: usize,
}

/// A [`Store`] that serves entry and agent reads from memory; see the module docs.
#[derive(Debug)]
pub struct CachedStore {
    shared: Arc<Shared>,
    follower: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    inner: SharedStore,
    index: RwLock<Index>,
    /// Serializes point updates against a rebuild's swap; while a rebuild runs, it holds
    /// the updates made meanwhile, to replay them on the new index before the swap.
    gate: Mutex<Option<Vec<Update>>>,
    changes: broadcast::Sender<StoreChange>,
    builds: Mutex<(u64, Duration)>,
}

/// One change to apply to the index.
#[derive(Debug, Clone)]
enum Update {
    /// Insert or replace an entry (unless the index holds a later revision).
    PutEntry(Arc<RegistrationEntry>),
    /// Remove the entry with this id.
    RemoveEntry(String),
    /// Insert or replace an agent.
    PutAgent(AttestedAgent),
    /// Remove the agent with this SPIFFE ID.
    RemoveAgent(String),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CachedStore {
    /// Builds the index from `inner` and follows `inner`'s [`Store::changes`].
    ///
    /// # Errors
    /// Whatever `inner` returns listing its entries or agents.
    pub async fn new(inner: SharedStore) -> Result<Self, StoreError> {
        // Subscribe before reading, so that no change made during the build is missed.
        let changes = inner.changes();
        Self::with_changes(inner, changes).await
    }

    /// As [`Self::new`], following `changes` instead of `inner.changes()`: for a store
    /// whose changes are announced elsewhere (and for tests that announce them by hand).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub async fn with_changes(
        inner: SharedStore,
        changes: broadcast::Receiver<StoreChange>,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        let index = Index::load(inner.as_ref()).await?;
        let (sender, _) = broadcast::channel(CHANGE_BACKLOG);
        let shared = Arc::new(Shared {
            inner,
            index: RwLock::new(index),
            gate: Mutex::new(None),
            changes: sender,
            builds: Mutex::new((1, started.elapsed())),
        });
        let follower = tokio::spawn(follow(shared.clone(), changes));
        Ok(Self { shared, follower })
    }

    /// What the index holds and what its last full build cost.
    pub fn stats(&self) -> CacheStats {
        let (builds, last_build) = *lock(&self.shared.builds);
        let index = self.shared.read();
        let entries = index.by_id.len();
        CacheStats {
            entries,
            agents: index.agents.len(),
            last_build,
            builds,
            bytes_per_entry: index.bytes.checked_div(entries).unwrap_or(0),
        }
    }

    /// Re-reads everything from the inner store into a new index and swaps it in (what a
    /// [`StoreChange::Resync`] does).
    ///
    /// # Errors
    /// Whatever the inner store returns; the old index stays in place then.
    pub async fn rebuild(&self) -> Result<(), StoreError> {
        self.shared.rebuild().await
    }

    /// The inner store.
    pub fn inner(&self) -> &SharedStore {
        &self.shared.inner
    }
}

impl Drop for CachedStore {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `update` to the index now (and to the one a rebuild is making).
    fn update(&self, update: Update) {
        let mut gate = lock(&self.gate);
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(&update);
        if let Some(pending) = gate.as_mut() {
            pending.push(update);
        }
    }

    async fn rebuild(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        // From here on, point updates are also kept for the new index: whatever the
        // reads below miss was written after they started and is replayed.
        *lock(&self.gate) = Some(Vec::new());
        let mut fresh = match Index::load(self.inner.as_ref()).await {
            Ok(index) => index,
            Err(e) => {
                *lock(&self.gate) = None;
                return Err(e);
            }
        };
        let old = {
            let mut gate = lock(&self.gate);
            for update in gate.take().unwrap_or_default() {
                fresh.apply(&update);
            }
            let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *index, fresh)
        };
        // The old index is freed outside every lock.
        drop(old);
        let mut builds = lock(&self.builds);
        *builds = (builds.0.saturating_add(1), started.elapsed());
        Ok(())
    }

    async fn rebuild_until_done(&self) {
        let mut wait = REBUILD_RETRY_FIRST;
        while let Err(e) = self.rebuild().await {
            tracing::warn!(error = %e, "entry cache: rebuild failed; retrying in {wait:?}");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REBUILD_RETRY_MAX);
        }
    }

    /// Re-reads what `change` names into the index.
    async fn apply_change(&self, change: &StoreChange) -> Result<(), StoreError> {
        match change {
            StoreChange::Entry(id) => {
                let update = match self.inner.fetch_entry(id).await? {
                    Some(entry) => Update::PutEntry(Arc::new(entry)),
                    None => Update::RemoveEntry(id.clone()),
                };
                self.update(update);
            }
            StoreChange::Agent(id) => {
                let Ok(spiffe_id) = SpiffeId::new(id) else {
                    tracing::warn!(agent = %id, "entry cache: ignoring a change naming no SPIFFE ID");
                    return Ok(());
                };
                self.refresh_agent(&spiffe_id).await?;
            }
            StoreChange::Journal
            | StoreChange::Bundle(_)
            | StoreChange::Revocation
            | StoreChange::Resync => {}
        }
        Ok(())
    }

    async fn refresh_agent(&self, id: &SpiffeId) -> Result<(), StoreError> {
        let update = match self.inner.fetch_agent(id).await? {
            Some(agent) => Update::PutAgent(agent),
            None => Update::RemoveAgent(id.as_str().to_owned()),
        };
        self.update(update);
        Ok(())
    }
}

/// The background task: applies the inner store's changes, then re-emits them.
async fn follow(shared: Arc<Shared>, mut changes: broadcast::Receiver<StoreChange>) {
    loop {
        let mut batch = Vec::new();
        let mut lagged = false;
        match changes.recv().await {
            Ok(change) => batch.push(change),
            Err(RecvError::Lagged(_)) => lagged = true,
            Err(RecvError::Closed) => return,
        }
        // Take what else is pending, to decide between point reads and a rebuild.
        while batch.len() < CHANGE_BACKLOG {
            match changes.try_recv() {
                Ok(change) => batch.push(change),
                Err(TryRecvError::Lagged(_)) => lagged = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let mut rebuild =
            lagged || batch.len() > REBUILD_AFTER || batch.contains(&StoreChange::Resync);
        if !rebuild {
            for change in &batch {
                if let Err(e) = shared.apply_change(change).await {
                    tracing::warn!(error = %e, "entry cache: re-reading a change failed; rebuilding");
                    rebuild = true;
                    break;
                }
            }
        }
        if rebuild {
            shared.rebuild_until_done().await;
        }
        // Subscribers see a change only once the index reflects it. Nobody listening is
        // not an error.
        if lagged {
            let _ = shared.changes.send(StoreChange::Resync);
        }
        for change in batch {
            let _ = shared.changes.send(change);
        }
    }
}

/// The entries filed under one key: most keys hold one entry, so that case needs no
/// allocation of its own.
#[derive(Debug, Clone)]
enum Postings {
    One(Arc<RegistrationEntry>),
    Many(Vec<Arc<RegistrationEntry>>),
}

impl Postings {
    fn as_slice(&self) -> &[Arc<RegistrationEntry>] {
        match self {
            Self::One(entry) => std::slice::from_ref(entry),
            Self::Many(entries) => entries,
        }
    }

    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn push(&mut self, entry: Arc<RegistrationEntry>) {
        match self {
            Self::One(first) => *self = Self::Many(vec![first.clone(), entry]),
            Self::Many(entries) => entries.push(entry),
        }
    }

    /// Removes `entry` (by identity); returns whether it was there and whether the
    /// postings are now empty.
    fn remove(&mut self, entry: &Arc<RegistrationEntry>) -> (bool, bool) {
        match self {
            Self::One(only) => {
                let found = Arc::ptr_eq(only, entry);
                (found, found)
            }
            Self::Many(entries) => {
                let Some(at) = entries.iter().position(|e| Arc::ptr_eq(e, entry)) else {
                    return (false, false);
                };
                entries.swap_remove(at);
                let empty = entries.is_empty();
                if entries.len() == 1
                    && let Some(last) = entries.pop()
                {
                    *self = Self::One(last);
                }
                (true, empty)
            }
        }
    }
}

/// Files `entry` under `key` of `map`; returns the bytes a new key cost.
fn file(map: &mut HashMap<Box<str>, Postings>, key: &str, entry: &Arc<RegistrationEntry>) -> usize {
    if let Some(postings) = map.get_mut(key) {
        postings.push(entry.clone());
        0
    } else {
        map.insert(key.into(), Postings::One(entry.clone()));
        key.len() + KEY_OVERHEAD
    }
}

/// Removes `entry` from `key` of `map`; returns whether it was there and the bytes a
/// removed key freed.
fn unfile(
    map: &mut HashMap<Box<str>, Postings>,
    key: &str,
    entry: &Arc<RegistrationEntry>,
) -> (bool, usize) {
    let Some(postings) = map.get_mut(key) else {
        return (false, 0);
    };
    let (found, empty) = postings.remove(entry);
    if empty {
        map.remove(key);
        return (found, key.len() + KEY_OVERHEAD);
    }
    (found, 0)
}

/// An entry in the id-ordered set, compared by id.
#[derive(Debug, Clone)]
struct ById(Arc<RegistrationEntry>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// The in-memory index.
#[derive(Debug, Default)]
struct Index {
    by_id: BTreeSet<ById>,
    by_parent: HashMap<Box<str>, Postings>,
    by_spiffe_id: HashMap<Box<str>, Postings>,
    /// Selector type, then value: the entries filed under that selector (each entry under
    /// exactly one of its selectors; an entry with none is in no list).
    by_selector: HashMap<Box<str>, HashMap<Box<str>, Postings>>,
    agents: BTreeMap<String, AttestedAgent>,
    /// Estimated bytes of the entries and their filings.
    bytes: usize,
}

impl Index {
    /// Reads every entry and agent of `store`.
    async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let entries = store.list_entries(&EntryFilter::default()).await?;
        let agents = store.list_agents().await?;
        Ok(Self::from_parts(entries, agents))
    }

    /// An index of `entries` and `agents`.
    fn from_parts(mut entries: Vec<RegistrationEntry>, agents: Vec<AttestedAgent>) -> Self {
        // In id order (as the store lists them already, so this sort only checks), the
        // id tree is filled along its hot right edge instead of at random places.
        entries.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let mut index = Self::default();
        for entry in entries {
            index.insert(Arc::new(entry));
        }
        index.agents = agents
            .into_iter()
            .map(|agent| (agent.spiffe_id.as_str().to_owned(), agent))
            .collect();
        index
    }

    fn apply(&mut self, update: &Update) {
        match update {
            Update::PutEntry(entry) => {
                if let Some(held) = self.by_id.get(entry.id.as_str())
                    && held.0.revision > entry.revision
                {
                    // A later revision is in already (a change re-read it first).
                    return;
                }
                self.remove(&entry.id);
                self.insert(entry.clone());
            }
            Update::RemoveEntry(id) => self.remove(id),
            Update::PutAgent(agent) => {
                self.agents
                    .insert(agent.spiffe_id.as_str().to_owned(), agent.clone());
            }
            Update::RemoveAgent(id) => {
                self.agents.remove(id);
            }
        }
    }

    fn insert(&mut self, entry: Arc<RegistrationEntry>) {
        let mut bytes = entry_bytes(&entry) + 3 * FILING_OVERHEAD;
        bytes += file(&mut self.by_parent, entry.parent_id.as_str(), &entry);
        bytes += file(&mut self.by_spiffe_id, entry.spiffe_id.as_str(), &entry);
        // File it under its selector with the fewest entries so far.
        let emptiest = entry.selectors.iter().min_by_key(|s| {
            self.by_selector
                .get(s.kind())
                .and_then(|values| values.get(s.value()))
                .map_or(0, Postings::len)
        });
        if let Some(selector) = emptiest {
            bytes += FILING_OVERHEAD;
            let values = match self.by_selector.get_mut(selector.kind()) {
                Some(values) => values,
                None => self.by_selector.entry(selector.kind().into()).or_default(),
            };
            bytes += file(values, selector.value(), &entry);
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.by_id.replace(ById(entry));
    }

    fn remove(&mut self, id: &str) {
        let Some(ById(entry)) = self.by_id.take(id) else {
            return;
        };
        let mut freed = entry_bytes(&entry) + 3 * FILING_OVERHEAD;
        freed += unfile(&mut self.by_parent, entry.parent_id.as_str(), &entry).1;
        freed += unfile(&mut self.by_spiffe_id, entry.spiffe_id.as_str(), &entry).1;
        for selector in &entry.selectors {
            let Some(values) = self.by_selector.get_mut(selector.kind()) else {
                continue;
            };
            let (found, key_bytes) = unfile(values, selector.value(), &entry);
            if values.is_empty() {
                self.by_selector.remove(selector.kind());
            }
            if found {
                freed += FILING_OVERHEAD + key_bytes;
                break;
            }
        }
        self.bytes = self.bytes.saturating_sub(freed);
    }

    fn fetch(&self, id: &str) -> Option<Arc<RegistrationEntry>> {
        self.by_id.get(id).map(|e| e.0.clone())
    }

    fn list(&self, filter: &EntryFilter) -> Vec<Arc<RegistrationEntry>> {
        let postings = |map: &HashMap<Box<str>, Postings>, key: &SpiffeId| {
            map.get(key.as_str())
                .map_or(&[][..], Postings::as_slice)
                .to_vec()
        };
        match (&filter.spiffe_id, &filter.parent_id) {
            (None, None) => self.by_id.iter().map(|e| e.0.clone()).collect(),
            (Some(id), None) => postings(&self.by_spiffe_id, id),
            (None, Some(parent)) => postings(&self.by_parent, parent),
            (Some(id), Some(parent)) => {
                let by_id = self.by_spiffe_id.get(id.as_str());
                let by_parent = self.by_parent.get(parent.as_str());
                let (Some(by_id), Some(by_parent)) = (by_id, by_parent) else {
                    return Vec::new();
                };
                let shorter = if by_id.len() <= by_parent.len() {
                    by_id
                } else {
                    by_parent
                };
                shorter
                    .as_slice()
                    .iter()
                    .filter(|e| e.spiffe_id == *id && e.parent_id == *parent)
                    .cloned()
                    .collect()
            }
        }
    }

    /// The entries all of whose selectors are among `workload` (sorted, no duplicates).
    fn find(&self, workload: &[&Selector]) -> Vec<Arc<RegistrationEntry>> {
        let mut found = Vec::new();
        for selector in workload {
            let Some(filed) = self
                .by_selector
                .get(selector.kind())
                .and_then(|values| values.get(selector.value()))
            else {
                continue;
            };
            found.extend(
                filed
                    .as_slice()
                    .iter()
                    .filter(|e| {
                        e.selectors
                            .iter()
                            .all(|s| workload.binary_search(&s).is_ok())
                    })
                    .cloned(),
            );
        }
        found
    }
}

/// Estimated bytes `entry` holds: its struct, its `Arc`, and its strings.
fn entry_bytes(entry: &RegistrationEntry) -> usize {
    let selectors: usize = entry
        .selectors
        .iter()
        .map(|s| std::mem::size_of::<Selector>() + s.kind().len() + s.value().len())
        .sum();
    let dns: usize = entry
        .dns_names
        .iter()
        .map(|d| std::mem::size_of::<String>() + d.len())
        .sum();
    std::mem::size_of::<RegistrationEntry>()
        + 2 * std::mem::size_of::<usize>()
        + entry.id.len()
        + entry.spiffe_id.as_str().len()
        + entry.parent_id.as_str().len()
        + entry.hint.len()
        + selectors
        + dns
        + entry.federates_with.len() * 48
}

/// Sorts `entries` by id and clones them out of the index.
fn ordered(mut entries: Vec<Arc<RegistrationEntry>>) -> Vec<RegistrationEntry> {
    entries.sort_unstable_by(|a, b| a.id.cmp(&b.id));
    entries
        .iter()
        .map(|e| RegistrationEntry::clone(e))
        .collect()
}

#[async_trait::async_trait]
impl Store for CachedStore {
    async fn create_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let created = self.shared.inner.create_entry(entry).await?;
        self.shared
            .update(Update::PutEntry(Arc::new(created.clone())));
        Ok(created)
    }

    async fn create_entries(&self, entries: &[RegistrationEntry]) -> Result<(), StoreError> {
        // The entries as stored, worked out before the write (so a refusal is the inner
        // store's own, and nothing is stored that could not be indexed).
        let created = entries
            .iter()
            .map(|entry| EntryParams::new(entry).map(|params| params.created(entry)))
            .collect::<Result<Vec<_>, _>>()?;
        self.shared.inner.create_entries(entries).await?;
        for entry in created {
            self.shared.update(Update::PutEntry(Arc::new(entry)));
        }
        Ok(())
    }

    async fn fetch_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, StoreError> {
        let found = self.shared.read().fetch(id);
        Ok(found.map(|e| RegistrationEntry::clone(&e)))
    }

    async fn update_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let updated = self.shared.inner.update_entry(entry).await?;
        self.shared
            .update(Update::PutEntry(Arc::new(updated.clone())));
        Ok(updated)
    }

    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry, StoreError> {
        let deleted = self.shared.inner.delete_entry(id).await?;
        self.shared.update(Update::RemoveEntry(deleted.id.clone()));
        Ok(deleted)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let listed = self.shared.read().list(filter);
        Ok(ordered(listed))
    }

    async fn find_entries_by_selectors(
        &self,
        selectors: &[Selector],
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let Some(workload) = schema::lookup_selectors(selectors)? else {
            return Ok(Vec::new());
        };
        let found = self.shared.read().find(&workload);
        Ok(ordered(found))
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        let count = self.shared.read().by_id.len();
        u64::try_from(count).map_err(|_| StoreError::Invalid("entry count overflows".into()))
    }

    async fn create_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
        self.shared.inner.create_agent(agent).await?;
        self.shared.update(Update::PutAgent(agent.clone()));
        Ok(())
    }

    async fn fetch_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, StoreError> {
        Ok(self.shared.read().agents.get(id.as_str()).cloned())
    }

    async fn update_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
        self.shared.inner.update_agent(agent).await?;
        self.shared.update(Update::PutAgent(agent.clone()));
        Ok(())
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<(), StoreError> {
        self.shared.inner.delete_agent(id).await?;
        self.shared
            .update(Update::RemoveAgent(id.as_str().to_owned()));
        Ok(())
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, StoreError> {
        Ok(self.shared.read().agents.values().cloned().collect())
    }

    async fn switch_agent_svid(
        &self,
        id: &SpiffeId,
        cert_sha256: &str,
        cert_serial: &str,
        cert_expires_at: i64,
    ) -> Result<bool, StoreError> {
        let done = self
            .shared
            .inner
            .switch_agent_svid(id, cert_sha256, cert_serial, cert_expires_at)
            .await?;
        if done {
            self.shared.refresh_agent(id).await?;
        }
        Ok(done)
    }

    async fn set_next_agent_svid(
        &self,
        id: &SpiffeId,
        current_cert_sha256: &str,
        next_cert_sha256: &str,
    ) -> Result<bool, StoreError> {
        let done = self
            .shared
            .inner
            .set_next_agent_svid(id, current_cert_sha256, next_cert_sha256)
            .await?;
        if done {
            self.shared.refresh_agent(id).await?;
        }
        Ok(done)
    }

    async fn record_trust_domain(&self, trust_domain: &str) -> Result<String, StoreError> {
        self.shared.inner.record_trust_domain(trust_domain).await
    }

    async fn fetch_trust_domain(&self) -> Result<Option<String>, StoreError> {
        self.shared.inner.fetch_trust_domain().await
    }

    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        self.shared.inner.create_join_token(token).await
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinTokenRecord, StoreError> {
        self.shared.inner.consume_join_token(token_hash, now).await
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        self.shared.inner.prune_join_tokens(now).await
    }

    async fn put_bundle(&self, bundle: &BundleRecord) -> Result<(), StoreError> {
        self.shared.inner.put_bundle(bundle).await
    }

    async fn fetch_bundle(
        &self,
        trust_domain_id: &str,
    ) -> Result<Option<BundleRecord>, StoreError> {
        self.shared.inner.fetch_bundle(trust_domain_id).await
    }

    async fn list_bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        self.shared.inner.list_bundles().await
    }

    async fn swap_bundle(
        &self,
        bundle: &BundleRecord,
        previous: Option<u64>,
    ) -> Result<bool, StoreError> {
        self.shared.inner.swap_bundle(bundle, previous).await
    }

    async fn delete_bundle(&self, trust_domain_id: &str) -> Result<(), StoreError> {
        self.shared.inner.delete_bundle(trust_domain_id).await
    }

    async fn create_federation(&self, record: &FederationRecord) -> Result<(), StoreError> {
        self.shared.inner.create_federation(record).await
    }

    async fn update_federation(&self, record: &FederationRecord) -> Result<(), StoreError> {
        self.shared.inner.update_federation(record).await
    }

    async fn fetch_federation(
        &self,
        trust_domain_id: &str,
    ) -> Result<Option<FederationRecord>, StoreError> {
        self.shared.inner.fetch_federation(trust_domain_id).await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRecord>, StoreError> {
        self.shared.inner.list_federations().await
    }

    async fn delete_federation(&self, trust_domain_id: &str) -> Result<(), StoreError> {
        self.shared.inner.delete_federation(trust_domain_id).await
    }

    async fn record_federation_refresh(
        &self,
        trust_domain_id: &str,
        refreshed_at: Option<i64>,
        error: Option<&str>,
        next_refresh_at: i64,
    ) -> Result<bool, StoreError> {
        self.shared
            .inner
            .record_federation_refresh(trust_domain_id, refreshed_at, error, next_refresh_at)
            .await
    }

    async fn put_journal(&self, record: &JournalRecord) -> Result<(), StoreError> {
        self.shared.inner.put_journal(record).await
    }

    async fn list_journal(&self) -> Result<Vec<JournalRecord>, StoreError> {
        self.shared.inner.list_journal().await
    }

    async fn delete_journal(&self, id: &str) -> Result<(), StoreError> {
        self.shared.inner.delete_journal(id).await
    }

    async fn create_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError> {
        self.shared.inner.create_lease(lease).await
    }

    async fn fetch_lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.shared.inner.fetch_lease(id).await
    }

    async fn fetch_lease_by_child(
        &self,
        child_id: &SpiffeId,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        self.shared.inner.fetch_lease_by_child(child_id).await
    }

    async fn release_lease(&self, id: &str, now: i64) -> Result<LeaseRecord, StoreError> {
        self.shared.inner.release_lease(id, now).await
    }

    async fn list_leases(
        &self,
        parent_id: Option<&SpiffeId>,
        live_at: Option<i64>,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        self.shared.inner.list_leases(parent_id, live_at).await
    }

    async fn prune_leases(&self, before: i64) -> Result<u64, StoreError> {
        self.shared.inner.prune_leases(before).await
    }

    async fn record_template_issue(
        &self,
        entry_id: &str,
        agent_id: &SpiffeId,
        spiffe_id: &SpiffeId,
        now: i64,
    ) -> Result<(), StoreError> {
        self.shared
            .inner
            .record_template_issue(entry_id, agent_id, spiffe_id, now)
            .await
    }

    async fn list_template_issues(&self, entry_id: &str) -> Result<Vec<TemplateIssue>, StoreError> {
        self.shared.inner.list_template_issues(entry_id).await
    }

    async fn put_txn_key(&self, key: &TxnKeyRecord) -> Result<(), StoreError> {
        self.shared.inner.put_txn_key(key).await
    }

    async fn list_txn_keys(&self, now: i64) -> Result<Vec<TxnKeyRecord>, StoreError> {
        self.shared.inner.list_txn_keys(now).await
    }

    async fn prune_txn_keys(&self, now: i64) -> Result<u64, StoreError> {
        self.shared.inner.prune_txn_keys(now).await
    }

    async fn append_audit(&self, events: &[super::audit::AuditEvent]) -> Result<u64, StoreError> {
        self.shared.inner.append_audit(events).await
    }

    async fn audit_anchor(&self) -> Result<super::audit::AuditAnchor, StoreError> {
        self.shared.inner.audit_anchor().await
    }

    async fn list_audit(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<super::audit::AuditRow>, StoreError> {
        self.shared.inner.list_audit(after, limit).await
    }

    async fn audit_txn(
        &self,
        txn: &str,
        limit: u32,
    ) -> Result<Vec<super::audit::AuditRow>, StoreError> {
        self.shared.inner.audit_txn(txn, limit).await
    }

    async fn list_audit_txns(
        &self,
        query: &str,
        limit: u32,
    ) -> Result<Vec<super::audit::AuditTxnSummary>, StoreError> {
        self.shared.inner.list_audit_txns(query, limit).await
    }

    async fn audit_txns_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.shared.inner.audit_txns_after(after, limit).await
    }

    async fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.shared.inner.prune_audit(before_ms).await
    }

    async fn insert_revocation(
        &self,
        revocation: &super::revocation::NewRevocation,
    ) -> Result<writ_spiffe::revocation::Revocation, StoreError> {
        self.shared.inner.insert_revocation(revocation).await
    }

    async fn list_revocations(
        &self,
        after: u64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<super::revocation::RevocationRecord>, StoreError> {
        self.shared.inner.list_revocations(after, now, limit).await
    }

    async fn prune_revocations(&self, now: i64) -> Result<u64, StoreError> {
        self.shared.inner.prune_revocations(now).await
    }

    fn changes(&self) -> broadcast::Receiver<StoreChange> {
        self.shared.changes.subscribe()
    }
}

/// Builds an index from entries in memory, with no store: for the entry bench, which
/// measures the build and the memory of the index alone.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug)]
pub struct DetachedIndex(Index);

#[cfg(any(test, feature = "test-util"))]
impl DetachedIndex {
    /// Indexes `entries`.
    pub fn build(entries: Vec<RegistrationEntry>) -> Self {
        Self(Index::from_parts(entries, Vec::new()))
    }

    /// The entries all of whose selectors are among `selectors`, ordered by id.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for more than [`crate::selector::MAX_SELECTORS`].
    pub fn find(&self, selectors: &[Selector]) -> Result<Vec<Arc<RegistrationEntry>>, StoreError> {
        let Some(workload) = schema::lookup_selectors(selectors)? else {
            return Ok(Vec::new());
        };
        let mut found = self.0.find(&workload);
        found.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// The entries whose parent is `parent`, ordered by id.
    pub fn by_parent(&self, parent: &SpiffeId) -> Vec<Arc<RegistrationEntry>> {
        let mut found = self.0.list(&EntryFilter {
            parent_id: Some(parent.clone()),
            ..EntryFilter::default()
        });
        found.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// How many entries it holds.
    pub fn len(&self) -> usize {
        self.0.by_id.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.by_id.is_empty()
    }

    /// The index's own estimate of its bytes per entry ([`CacheStats::bytes_per_entry`]).
    pub fn estimated_bytes_per_entry(&self) -> usize {
        self.0.bytes.checked_div(self.0.by_id.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, selectors: &[&str]) -> RegistrationEntry {
        let mut e = RegistrationEntry::new(
            SpiffeId::new(&format!("spiffe://example.org/w/{n}")).unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            selectors.iter().map(|s| s.parse().unwrap()).collect(),
        );
        e.selectors.sort();
        e.revision = 1;
        e
    }

    fn sels(list: &[&str]) -> Vec<Selector> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn postings_stay_small() {
        assert_eq!(
            std::mem::size_of::<Postings>(),
            std::mem::size_of::<Vec<Arc<RegistrationEntry>>>()
        );
    }

    #[test]
    fn subset_lookup_and_removal() {
        let a = entry(1, &["unix:uid:1", "k8s:ns:a"]);
        let b = entry(2, &["k8s:ns:a"]);
        let c = entry(3, &["unix:uid:3", "k8s:ns:a"]);
        let index = DetachedIndex::build(vec![a.clone(), b.clone(), c.clone()]);
        let ids = |found: Vec<Arc<RegistrationEntry>>| -> Vec<String> {
            found.iter().map(|e| e.id.clone()).collect()
        };
        let mut want = vec![a.id.clone(), b.id.clone()];
        want.sort();
        assert_eq!(
            ids(index
                .find(&sels(&["k8s:ns:a", "unix:uid:1", "unix:uid:9"]))
                .unwrap()),
            want
        );
        assert_eq!(
            ids(index.find(&sels(&["unix:uid:1"])).unwrap()),
            Vec::<String>::new()
        );
        let mut index = index.0;
        index.remove(&b.id);
        assert_eq!(index.find(&[&"k8s:ns:a".parse().unwrap()]).len(), 0);
        index.remove(&a.id);
        index.remove(&c.id);
        assert!(index.by_selector.is_empty());
        assert!(index.by_parent.is_empty());
        assert!(index.by_spiffe_id.is_empty());
        assert_eq!(index.bytes, 0, "every byte counted in is counted out");
    }

    #[test]
    fn a_stale_revision_never_replaces_a_later_one() {
        let mut index = Index::default();
        let mut e = entry(1, &["unix:uid:1"]);
        e.revision = 3;
        index.apply(&Update::PutEntry(Arc::new(e.clone())));
        let mut stale = e.clone();
        stale.revision = 2;
        stale.hint = "stale".into();
        index.apply(&Update::PutEntry(Arc::new(stale)));
        assert_eq!(index.fetch(&e.id).unwrap().hint, "");
    }
}
