//! The server-side entry cache (`store::cache::CachedStore`): the store conformance
//! suite over SQLite and PostgreSQL, changes made behind its back reaching it through
//! change events, rebuilds, and malformed requests refused as the SQL stores refuse them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::{MAX_SELECTORS, Selector};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::cache::CachedStore;
use writ_identity::store::pg_harness::TempPostgres;
use writ_identity::store::postgres::PostgresStore;
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::store::{
    AttestedAgent, EntryFilter, SharedStore, Store, StoreChange, StoreError, suite,
};

/// The longest a test waits for the cache to apply a change: a bound on a hang, not a
/// timed assertion.
const PATIENCE: Duration = Duration::from_secs(60);

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://example.org{path}")).unwrap()
}

fn sel(text: &str) -> Selector {
    text.parse().unwrap()
}

fn entry(n: usize) -> RegistrationEntry {
    RegistrationEntry::new(
        id(&format!("/cache/workload/{n}")),
        id("/cache/agent"),
        vec![sel(&format!("unix:uid:{n}")), sel("k8s:ns:cache")],
    )
}

fn agent(path: &str) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: id(path),
        attestation_type: "join_token".into(),
        cert_serial: "01".into(),
        cert_expires_at: 4_000_000_000,
        cert_sha256: "aa".into(),
        next_cert_sha256: String::new(),
        selectors: vec![sel("k8s:ns:cache")],
        banned: false,
        created_at: 1,
    }
}

/// A cache over an in-memory SQLite store whose change events the test sends by hand.
async fn cache_with_manual_events() -> (CachedStore, SharedStore, broadcast::Sender<StoreChange>) {
    let inner: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let (events, rx) = broadcast::channel(64);
    let cache = CachedStore::with_changes(inner.clone(), rx).await.unwrap();
    (cache, inner, events)
}

/// Waits (at most [`PATIENCE`]) until `changes` re-emits `want`.
async fn until_emitted(changes: &mut broadcast::Receiver<StoreChange>, want: &StoreChange) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            match changes.recv().await {
                Ok(change) if change == *want => return,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the cache stopped"),
            }
        }
    })
    .await
    .expect("the cache re-emits the change once applied");
}

#[tokio::test]
async fn cached_sqlite_passes_the_suite() {
    let inner = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let cache = CachedStore::new(inner).await.unwrap();
    suite::run_all(&cache).await;
    suite::run_all(&cache).await;
    // What the index holds is what the store holds.
    let from_cache = cache.list_entries(&EntryFilter::default()).await.unwrap();
    let from_store = cache
        .inner()
        .list_entries(&EntryFilter::default())
        .await
        .unwrap();
    assert_eq!(from_cache, from_store);
    assert_eq!(
        cache.list_agents().await.unwrap(),
        cache.inner().list_agents().await.unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_postgres_passes_the_suite() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let inner = Arc::new(PostgresStore::connect(&pg.url()).await.unwrap());
    let cache = CachedStore::new(inner.clone()).await.unwrap();
    suite::run_all(&cache).await;
    assert_eq!(
        cache.list_entries(&EntryFilter::default()).await.unwrap(),
        inner.list_entries(&EntryFilter::default()).await.unwrap()
    );
    drop(cache);
    inner.close().await;
}

#[tokio::test]
async fn the_build_reads_what_the_store_holds() {
    let inner: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let entries: Vec<RegistrationEntry> = (0..50).map(entry).collect();
    inner.create_entries(&entries).await.unwrap();
    inner.create_agent(&agent("/cache/agent")).await.unwrap();
    let cache = CachedStore::new(inner.clone()).await.unwrap();
    let stats = cache.stats();
    assert_eq!((stats.entries, stats.agents, stats.builds), (50, 1, 1));
    assert!(stats.bytes_per_entry > 0);
    let found = cache
        .find_entries_by_selectors(&[sel("unix:uid:7"), sel("k8s:ns:cache")])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].spiffe_id, id("/cache/workload/7"));
    assert_eq!(
        found,
        inner
            .find_entries_by_selectors(&[sel("unix:uid:7"), sel("k8s:ns:cache")])
            .await
            .unwrap()
    );
    let children = cache
        .list_entries(&EntryFilter {
            parent_id: Some(id("/cache/agent")),
            ..EntryFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(children.len(), 50);
    assert!(
        children.windows(2).all(|w| w[0].id < w[1].id),
        "ordered by id"
    );
}

#[tokio::test]
async fn writes_behind_its_back_arrive_through_change_events() {
    let (cache, inner, events) = cache_with_manual_events().await;
    let mut seen = cache.changes();

    // Another writer creates an entry: the cache learns of it from the event.
    let created = inner.create_entry(&entry(1)).await.unwrap();
    let change = StoreChange::Entry(created.id.clone());
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert_eq!(
        cache.fetch_entry(&created.id).await.unwrap(),
        Some(created.clone())
    );
    assert_eq!(
        cache
            .find_entries_by_selectors(&created.selectors)
            .await
            .unwrap(),
        vec![created.clone()]
    );

    // ... updates it ...
    let mut changed = created.clone();
    changed.hint = "moved".into();
    changed.selectors = vec![sel("unix:uid:99")];
    let updated = inner.update_entry(&changed).await.unwrap();
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert_eq!(
        cache.fetch_entry(&created.id).await.unwrap(),
        Some(updated.clone())
    );
    assert!(
        cache
            .find_entries_by_selectors(&created.selectors)
            .await
            .unwrap()
            .is_empty(),
        "the old selectors no longer find it"
    );
    assert_eq!(
        cache
            .find_entries_by_selectors(&[sel("unix:uid:99")])
            .await
            .unwrap(),
        vec![updated]
    );

    // ... and deletes it.
    inner.delete_entry(&created.id).await.unwrap();
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert_eq!(cache.fetch_entry(&created.id).await.unwrap(), None);
    assert_eq!(cache.count_entries().await.unwrap(), 0);

    // Agents too, and a ban made elsewhere is seen.
    let mut node = agent("/cache/node");
    inner.create_agent(&node).await.unwrap();
    let change = StoreChange::Agent(node.spiffe_id.as_str().to_owned());
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert_eq!(
        cache.fetch_agent(&node.spiffe_id).await.unwrap(),
        Some(node.clone())
    );
    node.banned = true;
    inner.update_agent(&node).await.unwrap();
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert!(
        cache
            .fetch_agent(&node.spiffe_id)
            .await
            .unwrap()
            .unwrap()
            .banned
    );
    inner.delete_agent(&node.spiffe_id).await.unwrap();
    events.send(change.clone()).unwrap();
    until_emitted(&mut seen, &change).await;
    assert_eq!(cache.fetch_agent(&node.spiffe_id).await.unwrap(), None);

    // A change naming no SPIFFE ID, and kinds the cache does not hold, pass through.
    for change in [
        StoreChange::Agent("not an id".into()),
        StoreChange::Journal,
        StoreChange::Bundle("spiffe://example.org".into()),
    ] {
        events.send(change.clone()).unwrap();
        until_emitted(&mut seen, &change).await;
    }
}

#[tokio::test]
async fn own_writes_are_visible_at_once() {
    let (cache, inner, _events) = cache_with_manual_events().await;
    let created = cache.create_entry(&entry(1)).await.unwrap();
    assert_eq!(
        cache.fetch_entry(&created.id).await.unwrap(),
        Some(created.clone())
    );
    cache.create_entries(&[entry(2), entry(3)]).await.unwrap();
    assert_eq!(cache.count_entries().await.unwrap(), 3);
    assert_eq!(
        cache.list_entries(&EntryFilter::default()).await.unwrap(),
        inner.list_entries(&EntryFilter::default()).await.unwrap(),
        "entries created in bulk are indexed as the store stored them"
    );
    let node = agent("/cache/node");
    cache.create_agent(&node).await.unwrap();
    assert!(
        cache
            .set_next_agent_svid(&node.spiffe_id, "aa", "bb")
            .await
            .unwrap()
    );
    assert_eq!(
        cache
            .fetch_agent(&node.spiffe_id)
            .await
            .unwrap()
            .unwrap()
            .next_cert_sha256,
        "bb"
    );
    assert!(
        cache
            .switch_agent_svid(&node.spiffe_id, "bb", "02", 4_000_000_000)
            .await
            .unwrap()
    );
    assert_eq!(
        cache.fetch_agent(&node.spiffe_id).await.unwrap(),
        inner.fetch_agent(&node.spiffe_id).await.unwrap()
    );
    // A refused write leaves the index as it was.
    let err = cache.create_entry(&created).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(cache.count_entries().await.unwrap(), 3);
}

#[tokio::test]
async fn a_resync_rebuilds_the_index() {
    let (cache, inner, events) = cache_with_manual_events().await;
    let mut seen = cache.changes();
    let entries: Vec<RegistrationEntry> = (0..20).map(entry).collect();
    inner.create_entries(&entries).await.unwrap();
    inner.create_agent(&agent("/cache/node")).await.unwrap();
    assert_eq!(cache.count_entries().await.unwrap(), 0, "no event yet");
    events.send(StoreChange::Resync).unwrap();
    until_emitted(&mut seen, &StoreChange::Resync).await;
    assert_eq!(cache.count_entries().await.unwrap(), 20);
    assert_eq!(cache.list_agents().await.unwrap().len(), 1);
    assert_eq!(cache.stats().builds, 2);
}

#[tokio::test]
async fn a_lagging_receiver_rebuilds_and_tells_its_subscribers() {
    let inner: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let (events, rx) = broadcast::channel(1);
    let cache = CachedStore::with_changes(inner.clone(), rx).await.unwrap();
    let mut seen = cache.changes();
    let created = inner.create_entry(&entry(1)).await.unwrap();
    // Three events into a channel of one, before the cache's task runs again (this
    // test runs on one thread and does not yield in between): it lags.
    for _ in 0..3 {
        events.send(StoreChange::Journal).unwrap();
    }
    until_emitted(&mut seen, &StoreChange::Resync).await;
    assert_eq!(cache.fetch_entry(&created.id).await.unwrap(), Some(created));
    assert_eq!(cache.stats().builds, 2);
}

#[tokio::test]
async fn malformed_requests_are_refused_as_the_store_refuses_them() {
    let (cache, inner, _events) = cache_with_manual_events().await;
    cache.create_entry(&entry(1)).await.unwrap();

    // Too many selectors in a lookup: the same error as the SQL store's.
    let many: Vec<Selector> = (0..=MAX_SELECTORS)
        .map(|i| sel(&format!("unix:uid:{i}")))
        .collect();
    let ours = cache.find_entries_by_selectors(&many).await.unwrap_err();
    let theirs = inner.find_entries_by_selectors(&many).await.unwrap_err();
    assert!(matches!(ours, StoreError::Invalid(_)), "{ours}");
    assert_eq!(ours.to_string(), theirs.to_string());
    // Exactly the limit, duplicates, and nothing at all are fine.
    assert_eq!(
        cache
            .find_entries_by_selectors(&many[..MAX_SELECTORS])
            .await
            .unwrap(),
        inner
            .find_entries_by_selectors(&many[..MAX_SELECTORS])
            .await
            .unwrap()
    );
    let twice = vec![sel("unix:uid:1"), sel("unix:uid:1"), sel("k8s:ns:cache")];
    assert_eq!(
        cache.find_entries_by_selectors(&twice).await.unwrap().len(),
        1
    );
    assert!(
        cache
            .find_entries_by_selectors(&[])
            .await
            .unwrap()
            .is_empty()
    );

    // Garbage and oversized keys find nothing, as in SQL.
    let huge = "x".repeat(1 << 20);
    for key in ["", "\0", "../../etc", huge.as_str(), "🦀"] {
        assert_eq!(cache.fetch_entry(key).await.unwrap(), None);
        assert_eq!(inner.fetch_entry(key).await.unwrap(), None);
    }
    let nobody = EntryFilter {
        spiffe_id: Some(id("/nobody")),
        parent_id: Some(id("/cache/agent")),
    };
    assert!(cache.list_entries(&nobody).await.unwrap().is_empty());

    // An invalid entry is refused before anything is stored or indexed.
    let mut bad = entry(2);
    bad.selectors.clear();
    let err = cache.create_entries(&[entry(3), bad]).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(cache.count_entries().await.unwrap(), 1);
    assert_eq!(inner.count_entries().await.unwrap(), 1);
}

/// Waits (at most [`PATIENCE`]) until `cache` holds entry `id` as `want`.
async fn until_cached(cache: &CachedStore, id: &str, want: Option<&RegistrationEntry>) {
    tokio::time::timeout(PATIENCE, async {
        loop {
            if cache.fetch_entry(id).await.unwrap().as_ref() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the change reaches the cache");
}

#[tokio::test]
async fn a_write_on_the_inner_sqlite_store_reaches_the_cache() {
    let inner: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
    let cache = CachedStore::new(inner.clone()).await.unwrap();
    let created = inner.create_entry(&entry(1)).await.unwrap();
    until_cached(&cache, &created.id, Some(&created)).await;
    inner.delete_entry(&created.id).await.unwrap();
    until_cached(&cache, &created.id, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_postgres_server_reaches_the_cache() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let ours = Arc::new(PostgresStore::connect(&pg.url()).await.unwrap());
    let theirs = PostgresStore::connect(&pg.url()).await.unwrap();
    let cache = CachedStore::new(ours.clone()).await.unwrap();
    let created = theirs.create_entry(&entry(1)).await.unwrap();
    until_cached(&cache, &created.id, Some(&created)).await;
    let mut changed = created.clone();
    changed.hint = "moved".into();
    let updated = theirs.update_entry(&changed).await.unwrap();
    until_cached(&cache, &created.id, Some(&updated)).await;
    let node = agent("/cache/pg-node");
    theirs.create_agent(&node).await.unwrap();
    tokio::time::timeout(PATIENCE, async {
        while cache.fetch_agent(&node.spiffe_id).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the agent reaches the cache");
    theirs.delete_entry(&created.id).await.unwrap();
    until_cached(&cache, &created.id, None).await;
    drop(cache);
    theirs.close().await;
    ours.close().await;
}
