//! The conformance suite every [`Store`] implementation must pass.
//!
//! Each check is a small public function that asserts one behaviour and panics (as a
//! test does) when the store gets it wrong. Every check makes its own SPIFFE IDs,
//! selectors, token hashes and bundle names from a fresh UUID, so all checks can share
//! one store, and one store can go through [`run_all`] more than once. The checks run
//! one after another; [`entry_count`] and [`join_token_prune`] count store-wide and
//! assume no other writer touches the store meanwhile.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_identity::store::StoreError> {
//! use writ_identity::store::{sqlite::SqliteStore, suite};
//! let store = SqliteStore::open_in_memory().await?;
//! suite::run_all(&store).await;
//! # Ok(()) }
//! ```
#![expect(
    clippy::expect_used,
    reason = "a conformance check reports a broken store by panicking, like a test"
)]

use futures::future::join_all;

use super::{
    AttestedAgent, BundleRecord, EntryFilter, FederationRecord, JoinTokenRecord, JournalRecord,
    LeaseRecord, MAX_TEMPLATE_ISSUES_PER_ENTRY, MAX_TXN_KEY_JWK_BYTES, Store, StoreChange,
    StoreError, TxnKeyRecord,
};
use crate::entry::RegistrationEntry;
use crate::entry::template::IdTemplate;
use crate::selector::{MAX_SELECTORS, Selector};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// A time far in the future (2096) for records that must not expire during the suite.
const FAR_FUTURE: i64 = 4_000_000_000;

/// Runs every check against `store`, in order.
pub async fn run_all(store: &dyn Store) {
    entry_create_and_fetch(store).await;
    entry_round_trips_every_field(store).await;
    entry_selectors_are_normalized(store).await;
    entry_update_bumps_revision(store).await;
    entry_update_stale_revision_conflicts(store).await;
    entry_update_into_duplicate_refused(store).await;
    entry_delete(store).await;
    entry_duplicate_refused(store).await;
    entry_reused_id_refused(store).await;
    entry_invalid_refused(store).await;
    entry_count(store).await;
    find_subset_semantics(store).await;
    find_orders_by_id(store).await;
    find_limits(store).await;
    find_follows_updates_and_deletes(store).await;
    list_entries_filters(store).await;
    create_entries_all_or_nothing(store).await;
    agents_crud(store).await;
    agent_svid_switch(store).await;
    trust_domain_recorded_once(store).await;
    join_token_single_use(store).await;
    join_token_expired(store).await;
    join_token_prune(store).await;
    bundles_crud(store).await;
    journal_crud(store).await;
    leases_lifecycle(store).await;
    concurrent_consume_join_token(store).await;
    concurrent_update_entry(store).await;
    template_entries_round_trip(store).await;
    template_issues_recorded_and_bounded(store).await;
    bundle_swap_is_conditional(store).await;
    changes_are_announced(store).await;
    txn_keys_published_listed_and_pruned(store).await;
    federations_crud_and_refresh_status(store).await;
    audit_chain_appended_read_and_pruned(store).await;
    audit_appends_never_fork(store).await;
    revocations_recorded_listed_and_pruned(store).await;
    revocations_concurrent_inserts_keep_order(store).await;
}

/// Fresh names for one check.
#[derive(Debug, Clone)]
struct Scope {
    tag: String,
}

impl Scope {
    fn new(check: &str) -> Self {
        Self {
            tag: format!("{check}-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// `spiffe://example.org/suite/<tag>/<path>`.
    fn id(&self, path: &str) -> SpiffeId {
        SpiffeId::new(&format!("spiffe://example.org/suite/{}/{path}", self.tag))
            .expect("suite SPIFFE ID")
    }

    /// `suite:<tag>-<name>`, a selector no other check uses.
    fn sel(&self, name: &str) -> Selector {
        Selector::new("suite", &format!("{}-{name}", self.tag)).expect("suite selector")
    }

    fn sels(&self, names: &[&str]) -> Vec<Selector> {
        names.iter().map(|n| self.sel(n)).collect()
    }

    /// An entry for `path` under this scope's agent, with the named selectors.
    fn entry(&self, path: &str, selectors: &[&str]) -> RegistrationEntry {
        let mut entry =
            RegistrationEntry::new(self.id(path), self.id("agent"), self.sels(selectors));
        entry.created_at = 1_700_000_000;
        entry
    }

    /// A token hash no other check uses.
    fn token_hash(&self, name: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(format!("{}-{name}", self.tag)))
    }
}

fn ids(entries: &[RegistrationEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

fn sorted_ids<'a>(entries: &[&'a RegistrationEntry]) -> Vec<&'a str> {
    let mut ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids
}

async fn fetch(store: &dyn Store, id: &str) -> Option<RegistrationEntry> {
    store.fetch_entry(id).await.expect("fetch_entry")
}

async fn find(store: &dyn Store, selectors: &[Selector]) -> Vec<RegistrationEntry> {
    let found = store
        .find_entries_by_selectors(selectors)
        .await
        .expect("find_entries_by_selectors");
    for entry in &found {
        assert!(
            entry.selectors.iter().all(|s| selectors.contains(s)),
            "entry {} returned for workload {selectors:?} though not all of its selectors {:?} are the workload's",
            entry.id,
            entry.selectors
        );
    }
    let mut sorted = ids(&found);
    sorted.sort_unstable();
    assert_eq!(ids(&found), sorted, "lookup results must be ordered by id");
    found
}

/// Create returns the stored entry with revision 1 whatever revision it was given, and
/// fetch returns the same; an unknown id is `None`.
pub async fn entry_create_and_fetch(store: &dyn Store) {
    let s = Scope::new("create");
    let mut entry = s.entry("workload", &["a", "b"]);
    entry.revision = 7;
    let created = store.create_entry(&entry).await.expect("create_entry");
    assert_eq!(created.revision, 1, "a new entry has revision 1");
    assert_eq!(created.id, entry.id);
    assert_eq!(
        created,
        RegistrationEntry {
            revision: 1,
            ..entry
        }
    );
    assert_eq!(fetch(store, &created.id).await, Some(created));
    assert_eq!(fetch(store, &format!("{}-missing", s.tag)).await, None);
}

/// Every field, including empty and `None` ones, reads back exactly as written.
pub async fn entry_round_trips_every_field(store: &dyn Store) {
    let s = Scope::new("round-trip");
    let mut full = s.entry("full", &["a"]);
    full.selectors = vec![
        Selector::new(
            "docker",
            &format!("label:com.example.name=it's 100% \"{}\"", s.tag),
        )
        .expect("selector"),
        Selector::new("k8s", &format!("pod-label:app=web ✓ {}", s.tag)).expect("selector"),
        s.sel("plain"),
    ];
    full.selectors.sort();
    full.x509_svid_ttl = 3_600;
    full.jwt_svid_ttl = 300;
    full.dns_names = vec!["api.example.org".into(), "*.svc.example.org".into()];
    full.federates_with = vec![
        TrustDomain::new("partner.example").expect("trust domain"),
        TrustDomain::new("other.example").expect("trust domain"),
    ];
    full.admin = true;
    full.downstream = true;
    full.expires_at = Some(FAR_FUTURE);
    full.hint = "héllo, wörld: \"quoted\" 'single' ✓".into();
    full.created_at = 1_234_567_890;
    full.spawn_max_ttl = Some(300);
    full.spawn_max_depth = Some(3);
    full.spawn_max_children = Some(5);
    let created = store.create_entry(&full).await.expect("create full entry");
    assert_eq!(
        created,
        RegistrationEntry {
            revision: 1,
            ..full.clone()
        }
    );
    assert_eq!(fetch(store, &full.id).await, Some(created));

    let mut minimal = s.entry("minimal", &["b"]);
    minimal.expires_at = Some(-5);
    minimal.created_at = 0;
    let created = store
        .create_entry(&minimal)
        .await
        .expect("create minimal entry");
    let fetched = fetch(store, &minimal.id)
        .await
        .expect("minimal entry stored");
    assert_eq!(fetched, created);
    assert_eq!(fetched.spawn_max_ttl, None);
    assert_eq!(fetched.spawn_max_depth, None);
    assert_eq!(fetched.spawn_max_children, None);
    assert_eq!(fetched.expires_at, Some(-5));
    assert!(fetched.dns_names.is_empty() && fetched.federates_with.is_empty());
    assert!(!fetched.admin && !fetched.downstream && fetched.hint.is_empty());

    let mut extremes = s.entry("extremes", &["c"]);
    extremes.x509_svid_ttl = i64::MAX.unsigned_abs();
    extremes.expires_at = Some(i64::MIN);
    extremes.created_at = i64::MAX;
    extremes.spawn_max_ttl = Some(0);
    extremes.spawn_max_depth = Some(u32::MAX);
    extremes.spawn_max_children = Some(u32::MAX);
    let created = store
        .create_entry(&extremes)
        .await
        .expect("create extreme entry");
    assert_eq!(fetch(store, &extremes.id).await, Some(created));
}

/// Selectors come back sorted and without duplicates, whatever order they went in.
pub async fn entry_selectors_are_normalized(store: &dyn Store) {
    let s = Scope::new("normalize");
    let mut entry = s.entry("workload", &["c", "a", "b", "a"]);
    let created = store.create_entry(&entry).await.expect("create_entry");
    entry.selectors = s.sels(&["a", "b", "c"]);
    assert_eq!(created.selectors, entry.selectors);
    let fetched = fetch(store, &entry.id).await.expect("stored");
    assert_eq!(fetched.selectors, entry.selectors);
}

/// An update with the stored revision replaces the entry (selectors included) and bumps
/// the revision; `created_at` keeps the creation time.
pub async fn entry_update_bumps_revision(store: &dyn Store) {
    let s = Scope::new("update");
    let created = store
        .create_entry(&s.entry("workload", &["a", "b"]))
        .await
        .expect("create_entry");
    let mut change = created.clone();
    change.spiffe_id = s.id("renamed");
    change.selectors = s.sels(&["c"]);
    change.dns_names = vec!["new.example.org".into()];
    change.hint = "changed".into();
    change.spawn_max_ttl = Some(60);
    change.spawn_max_children = Some(2);
    change.expires_at = None;
    change.created_at = 42;
    let updated = store.update_entry(&change).await.expect("update_entry");
    assert_eq!(updated.revision, 2);
    assert_eq!(
        updated,
        RegistrationEntry {
            revision: 2,
            created_at: created.created_at,
            ..change
        }
    );
    assert_eq!(fetch(store, &created.id).await, Some(updated.clone()));

    let again = store.update_entry(&updated).await.expect("second update");
    assert_eq!(again.revision, 3);
    assert_eq!(fetch(store, &created.id).await.map(|e| e.revision), Some(3));
}

/// A stale revision gives `Conflict` and changes nothing; an unknown id gives
/// `NotFound`.
pub async fn entry_update_stale_revision_conflicts(store: &dyn Store) {
    let s = Scope::new("conflict");
    let created = store
        .create_entry(&s.entry("workload", &["a"]))
        .await
        .expect("create_entry");
    let first = RegistrationEntry {
        hint: "first".into(),
        ..created.clone()
    };
    store.update_entry(&first).await.expect("first update");
    let stale = RegistrationEntry {
        hint: "stale".into(),
        selectors: s.sels(&["z"]),
        ..created.clone()
    };
    let err = store
        .update_entry(&stale)
        .await
        .expect_err("stale revision");
    assert!(matches!(err, StoreError::Conflict { .. }), "got {err:?}");
    let stored = fetch(store, &created.id).await.expect("still stored");
    assert_eq!(stored.hint, "first");
    assert_eq!(stored.revision, 2);
    assert_eq!(stored.selectors, s.sels(&["a"]));

    let missing = s.entry("missing", &["m"]);
    let err = store.update_entry(&missing).await.expect_err("unknown id");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    assert_eq!(fetch(store, &missing.id).await, None);
}

/// An update that would make an entry identical to another is refused and rolled back.
pub async fn entry_update_into_duplicate_refused(store: &dyn Store) {
    let s = Scope::new("update-dup");
    let one = store
        .create_entry(&s.entry("workload", &["a"]))
        .await
        .expect("create one");
    let two = store
        .create_entry(&s.entry("workload", &["b"]))
        .await
        .expect("create two");
    let clash = RegistrationEntry {
        selectors: one.selectors.clone(),
        hint: "clash".into(),
        ..two.clone()
    };
    let err = store.update_entry(&clash).await.expect_err("duplicate");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(fetch(store, &two.id).await, Some(two.clone()));
    assert_eq!(fetch(store, &one.id).await, Some(one));
    assert_eq!(
        ids(&find(store, &s.sels(&["b"])).await),
        vec![two.id.as_str()]
    );
}

/// Delete returns the entry and removes it with its selectors; a second delete is
/// `NotFound`.
pub async fn entry_delete(store: &dyn Store) {
    let s = Scope::new("delete");
    let created = store
        .create_entry(&s.entry("workload", &["a", "b"]))
        .await
        .expect("create_entry");
    let deleted = store.delete_entry(&created.id).await.expect("delete_entry");
    assert_eq!(deleted, created);
    assert_eq!(fetch(store, &created.id).await, None);
    assert!(find(store, &s.sels(&["a", "b"])).await.is_empty());
    let err = store
        .delete_entry(&created.id)
        .await
        .expect_err("second delete");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    // The same identity may be registered again once the old entry is gone.
    store
        .create_entry(&s.entry("workload", &["a", "b"]))
        .await
        .expect("re-create after delete");
}

/// Same SPIFFE ID, parent and selector set (in any order) as a stored entry is
/// `AlreadyExists` and stores nothing; changing any one of the three is fine.
pub async fn entry_duplicate_refused(store: &dyn Store) {
    let s = Scope::new("duplicate");
    let original = store
        .create_entry(&s.entry("workload", &["a", "b"]))
        .await
        .expect("create_entry");
    let duplicate = s.entry("workload", &["b", "a"]);
    let err = store.create_entry(&duplicate).await.expect_err("duplicate");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(fetch(store, &duplicate.id).await, None);
    assert_eq!(
        ids(&find(store, &s.sels(&["a", "b"])).await),
        vec![original.id.as_str()]
    );

    store
        .create_entry(&s.entry("workload", &["a"]))
        .await
        .expect("subset of selectors is another entry");
    store
        .create_entry(&s.entry("other", &["a", "b"]))
        .await
        .expect("other SPIFFE ID is another entry");
    let mut other_parent = s.entry("workload", &["a", "b"]);
    other_parent.parent_id = s.id("agent-2");
    store
        .create_entry(&other_parent)
        .await
        .expect("other parent is another entry");
}

/// An id already in use is `AlreadyExists`; the stored entry is untouched.
pub async fn entry_reused_id_refused(store: &dyn Store) {
    let s = Scope::new("reused-id");
    let original = store
        .create_entry(&s.entry("workload", &["a"]))
        .await
        .expect("create_entry");
    let mut reuse = s.entry("other", &["b"]);
    reuse.id.clone_from(&original.id);
    let err = store.create_entry(&reuse).await.expect_err("reused id");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(fetch(store, &original.id).await, Some(original));
    assert!(find(store, &s.sels(&["b"])).await.is_empty());
}

/// Entries the columns cannot hold are `Invalid` and store nothing: no selectors, a TTL
/// beyond `i64::MAX`.
pub async fn entry_invalid_refused(store: &dyn Store) {
    let s = Scope::new("invalid");
    let no_selectors = s.entry("none", &[]);
    let err = store
        .create_entry(&no_selectors)
        .await
        .expect_err("no selectors");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(fetch(store, &no_selectors.id).await, None);

    let mut huge = s.entry("huge", &["a"]);
    huge.jwt_svid_ttl = u64::MAX;
    let err = store.create_entry(&huge).await.expect_err("TTL too large");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(fetch(store, &huge.id).await, None);

    let mut huge_spawn = s.entry("huge-spawn", &["a"]);
    huge_spawn.spawn_max_ttl = Some(u64::MAX);
    let err = store
        .create_entry(&huge_spawn)
        .await
        .expect_err("spawn TTL too large");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(fetch(store, &huge_spawn.id).await, None);
}

/// `count_entries` follows creates and deletes.
pub async fn entry_count(store: &dyn Store) {
    let s = Scope::new("count");
    let before = store.count_entries().await.expect("count_entries");
    let one = s.entry("one", &["a"]);
    let batch = vec![
        one.clone(),
        s.entry("two", &["a"]),
        s.entry("three", &["a"]),
    ];
    store.create_entries(&batch).await.expect("create_entries");
    assert_eq!(
        store.count_entries().await.expect("count_entries"),
        before + 3
    );
    store.delete_entry(&one.id).await.expect("delete_entry");
    assert_eq!(
        store.count_entries().await.expect("count_entries"),
        before + 2
    );
}

/// An entry matches a workload when all of its selectors are among the workload's:
/// `{a,b}` matches `{a,b,c}` but not `{a}`; an entry sharing no selector never comes
/// back.
pub async fn find_subset_semantics(store: &dyn Store) {
    let s = Scope::new("subset");
    let ab = store
        .create_entry(&s.entry("ab", &["a", "b"]))
        .await
        .expect("create ab");
    let a = store
        .create_entry(&s.entry("a", &["a"]))
        .await
        .expect("create a");
    let c = store
        .create_entry(&s.entry("c", &["c"]))
        .await
        .expect("create c");
    let abd = store
        .create_entry(&s.entry("abd", &["a", "b", "d"]))
        .await
        .expect("create abd");
    let e = store
        .create_entry(&s.entry("e", &["e"]))
        .await
        .expect("create e");

    let found = find(store, &s.sels(&["a", "b", "c"])).await;
    assert_eq!(ids(&found), sorted_ids(&[&ab, &a, &c]));
    assert_eq!(
        found.iter().find(|x| x.id == ab.id),
        Some(&ab),
        "whole entries come back"
    );

    assert_eq!(
        ids(&find(store, &s.sels(&["a"])).await),
        vec![a.id.as_str()]
    );
    assert_eq!(ids(&find(store, &s.sels(&["b"])).await), Vec::<&str>::new());
    assert_eq!(
        ids(&find(store, &s.sels(&["d", "b", "a", "x"])).await),
        sorted_ids(&[&ab, &a, &abd])
    );
    assert_eq!(
        ids(&find(store, &s.sels(&["e"])).await),
        vec![e.id.as_str()]
    );
    assert!(find(store, &s.sels(&["x", "y"])).await.is_empty());
    // Duplicates in the workload's list change nothing.
    assert_eq!(
        ids(&find(store, &s.sels(&["a", "a", "b", "b"])).await),
        sorted_ids(&[&ab, &a])
    );
    // A selector of another type with the same value is another selector.
    let other_type = Selector::new("suite2", s.sel("a").value()).expect("selector");
    assert!(find(store, &[other_type]).await.is_empty());
}

/// Lookup results are ordered by id, whatever the creation order.
pub async fn find_orders_by_id(store: &dyn Store) {
    let s = Scope::new("order");
    let mut created = Vec::new();
    for i in 0..12 {
        let mut entry = s.entry(&format!("w{i}"), &["shared"]);
        // Ids in an order unrelated to creation.
        entry.id = format!("{}-{}", (i * 7) % 12, uuid::Uuid::new_v4());
        created.push(store.create_entry(&entry).await.expect("create_entry"));
    }
    let found = find(store, &s.sels(&["shared", "unrelated"])).await;
    let refs: Vec<&RegistrationEntry> = created.iter().collect();
    assert_eq!(ids(&found), sorted_ids(&refs));
}

/// An empty workload matches nothing; up to `MAX_SELECTORS` selectors are accepted and
/// more are `Invalid`.
pub async fn find_limits(store: &dyn Store) {
    let s = Scope::new("limits");
    let entry = store
        .create_entry(&s.entry("w", &["0"]))
        .await
        .expect("create_entry");
    assert!(find(store, &[]).await.is_empty());

    let names: Vec<String> = (0..=MAX_SELECTORS).map(|i| i.to_string()).collect();
    let all: Vec<Selector> = names.iter().map(|n| s.sel(n)).collect();
    let (max, _) = all.split_at(MAX_SELECTORS);
    assert_eq!(ids(&find(store, max).await), vec![entry.id.as_str()]);
    let err = store
        .find_entries_by_selectors(&all)
        .await
        .expect_err("too many selectors");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");

    let mut wide = s.entry("wide", &[]);
    wide.selectors = max.to_vec();
    let wide = store
        .create_entry(&wide)
        .await
        .expect("entry with MAX_SELECTORS");
    assert_eq!(ids(&find(store, max).await), sorted_ids(&[&entry, &wide]));
}

/// Lookups see updated selectors and forget deleted entries.
pub async fn find_follows_updates_and_deletes(store: &dyn Store) {
    let s = Scope::new("find-follow");
    let created = store
        .create_entry(&s.entry("w", &["old"]))
        .await
        .expect("create_entry");
    let updated = store
        .update_entry(&RegistrationEntry {
            selectors: s.sels(&["new", "more"]),
            ..created.clone()
        })
        .await
        .expect("update_entry");
    assert!(find(store, &s.sels(&["old"])).await.is_empty());
    assert!(find(store, &s.sels(&["new"])).await.is_empty());
    assert_eq!(
        find(store, &s.sels(&["new", "more", "old"])).await,
        vec![updated.clone()]
    );
    store.delete_entry(&created.id).await.expect("delete_entry");
    assert!(find(store, &s.sels(&["new", "more"])).await.is_empty());
}

/// `list_entries` filters by SPIFFE ID, by parent, by both, and orders by id.
pub async fn list_entries_filters(store: &dyn Store) {
    let s = Scope::new("list");
    let p1 = s.id("agent-1");
    let p2 = s.id("agent-2");
    let x = s.id("x");
    let y = s.id("y");
    let make = |spiffe_id: &SpiffeId, parent: &SpiffeId, sel: &str| {
        let mut e = s.entry("unused", &[sel]);
        e.spiffe_id = spiffe_id.clone();
        e.parent_id = parent.clone();
        e
    };
    let x1 = store
        .create_entry(&make(&x, &p1, "a"))
        .await
        .expect("create");
    let y1 = store
        .create_entry(&make(&y, &p1, "b"))
        .await
        .expect("create");
    let x2 = store
        .create_entry(&make(&x, &p2, "c"))
        .await
        .expect("create");

    let list = |spiffe_id: Option<&SpiffeId>, parent_id: Option<&SpiffeId>| {
        let filter = EntryFilter {
            spiffe_id: spiffe_id.cloned(),
            parent_id: parent_id.cloned(),
        };
        async move { store.list_entries(&filter).await.expect("list_entries") }
    };
    assert_eq!(list(None, Some(&p1)).await, sorted_entries(&[&x1, &y1]));
    assert_eq!(list(None, Some(&p2)).await, vec![x2.clone()]);
    assert_eq!(list(Some(&x), None).await, sorted_entries(&[&x1, &x2]));
    assert_eq!(list(Some(&y), None).await, vec![y1.clone()]);
    assert_eq!(list(Some(&x), Some(&p2)).await, vec![x2.clone()]);
    assert!(list(Some(&y), Some(&p2)).await.is_empty());
    assert!(list(Some(&s.id("nobody")), None).await.is_empty());

    let all = list(None, None).await;
    let mut sorted = ids(&all);
    sorted.sort_unstable();
    assert_eq!(ids(&all), sorted, "list_entries must be ordered by id");
    for mine in [&x1, &y1, &x2] {
        assert!(all.contains(mine), "unfiltered list lacks {}", mine.id);
    }
}

fn sorted_entries(entries: &[&RegistrationEntry]) -> Vec<RegistrationEntry> {
    let mut out: Vec<RegistrationEntry> = entries.iter().map(|e| (*e).clone()).collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// `create_entries` stores a whole batch, or nothing when any entry is refused.
pub async fn create_entries_all_or_nothing(store: &dyn Store) {
    let s = Scope::new("batch");
    store.create_entries(&[]).await.expect("empty batch");

    let good = vec![
        s.entry("one", &["a"]),
        s.entry("two", &["a", "b"]),
        s.entry("three", &["c"]),
    ];
    store.create_entries(&good).await.expect("create_entries");
    for entry in &good {
        let stored = fetch(store, &entry.id).await.expect("batch entry stored");
        assert_eq!(
            stored,
            RegistrationEntry {
                revision: 1,
                ..entry.clone()
            }
        );
    }

    let batch_with_inner_duplicate = vec![
        s.entry("four", &["d"]),
        s.entry("five", &["d"]),
        s.entry("four", &["d"]),
    ];
    let err = store
        .create_entries(&batch_with_inner_duplicate)
        .await
        .expect_err("duplicate inside the batch");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    for entry in &batch_with_inner_duplicate {
        assert_eq!(
            fetch(store, &entry.id).await,
            None,
            "a refused batch stores nothing"
        );
    }
    assert!(find(store, &s.sels(&["d"])).await.is_empty());

    let six = s.entry("six", &["e"]);
    let err = store
        .create_entries(&[six.clone(), s.entry("one", &["a"])])
        .await
        .expect_err("duplicate of a stored entry");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(fetch(store, &six.id).await, None);

    let eight = s.entry("eight", &["f"]);
    let mut reused = s.entry("seven", &["f"]);
    reused.id = good.first().map(|e| e.id.clone()).expect("batch entry");
    let err = store
        .create_entries(&[eight.clone(), reused])
        .await
        .expect_err("reused id");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );
    assert_eq!(fetch(store, &eight.id).await, None);

    let nine = s.entry("nine", &["g"]);
    let err = store
        .create_entries(&[nine.clone(), s.entry("ten", &[])])
        .await
        .expect_err("invalid entry");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(fetch(store, &nine.id).await, None);
}

fn agent(s: &Scope, name: &str) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: s.id(name),
        attestation_type: "join_token".into(),
        cert_serial: "0a1b2c".into(),
        cert_expires_at: FAR_FUTURE,
        selectors: vec![
            Selector::new("join_token", &s.tag).expect("selector"),
            s.sel("node"),
        ],
        banned: false,
        created_at: 1_700_000_000,
        cert_sha256: "aa".repeat(32),
        next_cert_sha256: String::new(),
    }
}

/// Agent SVID pinning: a renewal records the pending SVID only for the current one (and
/// not for a banned agent); the pending one becomes current on its first use, which drops
/// the older one; nothing else ever becomes current; a record from before fingerprints
/// pins its fingerprint once, by serial.
pub async fn agent_svid_switch(store: &dyn Store) {
    let s = Scope::new("agent-svid");
    let a = agent(&s, "a");
    store.create_agent(&a).await.expect("create_agent");
    let (old, next, other) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
    let fetch = |id: SpiffeId| async move {
        store
            .fetch_agent(&id)
            .await
            .expect("fetch_agent")
            .expect("agent")
    };

    // Only the current SVID may renew.
    assert!(
        !store
            .set_next_agent_svid(&a.spiffe_id, &other, &next)
            .await
            .expect("set_next_agent_svid"),
        "an SVID that is not current cannot renew"
    );
    assert!(
        !store
            .set_next_agent_svid(&a.spiffe_id, "", &next)
            .await
            .expect("set_next_agent_svid")
    );
    assert!(
        store
            .set_next_agent_svid(&a.spiffe_id, &old, &next)
            .await
            .expect("set_next_agent_svid")
    );
    let pending = fetch(a.spiffe_id.clone()).await;
    assert_eq!(
        (
            pending.cert_sha256.as_str(),
            pending.next_cert_sha256.as_str()
        ),
        (old.as_str(), next.as_str())
    );

    // Neither a stranger nor the current one "switches"; the pending one does, once.
    assert!(
        !store
            .switch_agent_svid(&a.spiffe_id, &other, "0a1b2c", 5)
            .await
            .expect("switch"),
        "a fingerprint never issued does not become current, even with the right serial"
    );
    assert!(
        !store
            .switch_agent_svid(&a.spiffe_id, "", "0a1b2c", 5)
            .await
            .expect("switch")
    );
    assert!(
        store
            .switch_agent_svid(&a.spiffe_id, &next, "0d0e", 77)
            .await
            .expect("switch")
    );
    let switched = fetch(a.spiffe_id.clone()).await;
    assert_eq!(switched.cert_sha256, next);
    assert_eq!(switched.next_cert_sha256, "");
    assert_eq!(switched.cert_serial, "0d0e");
    assert_eq!(switched.cert_expires_at, 77);
    assert_eq!(switched.selectors, a.selectors, "the rest is untouched");
    assert!(
        !store
            .set_next_agent_svid(&a.spiffe_id, &old, &other)
            .await
            .expect("set_next_agent_svid"),
        "the replaced SVID cannot renew"
    );
    assert!(
        !store
            .switch_agent_svid(&a.spiffe_id, &old, "0a1b2c", 5)
            .await
            .expect("switch"),
        "the replaced SVID cannot come back"
    );

    // A banned agent cannot renew.
    store
        .update_agent(&AttestedAgent {
            banned: true,
            ..switched.clone()
        })
        .await
        .expect("update_agent");
    assert!(
        !store
            .set_next_agent_svid(&a.spiffe_id, &next, &other)
            .await
            .expect("set_next_agent_svid")
    );

    // A record from before fingerprints: pinned by serial, once.
    let legacy = AttestedAgent {
        cert_sha256: String::new(),
        ..agent(&s, "legacy")
    };
    store.create_agent(&legacy).await.expect("create_agent");
    assert!(
        !store
            .switch_agent_svid(&legacy.spiffe_id, &other, "ffff", 5)
            .await
            .expect("switch"),
        "another serial does not pin"
    );
    assert!(
        store
            .switch_agent_svid(&legacy.spiffe_id, &other, &legacy.cert_serial, 5)
            .await
            .expect("switch")
    );
    assert!(
        !store
            .switch_agent_svid(&legacy.spiffe_id, &next, &legacy.cert_serial, 5)
            .await
            .expect("switch"),
        "once pinned, the serial alone no longer matches"
    );
    assert!(
        !store
            .switch_agent_svid(&s.id("missing"), &next, "0a1b2c", 5)
            .await
            .expect("switch")
    );
}

/// The trust domain is recorded by the first caller and never replaced; a later caller
/// learns the recorded one. (The suite may run twice on one store: it never records
/// anything but `example.org`.)
pub async fn trust_domain_recorded_once(store: &dyn Store) {
    let first = store
        .record_trust_domain("example.org")
        .await
        .expect("record_trust_domain");
    assert_eq!(first, "example.org");
    assert_eq!(
        store
            .record_trust_domain("other.test")
            .await
            .expect("record_trust_domain"),
        "example.org",
        "a recorded trust domain is kept"
    );
    assert_eq!(
        store
            .fetch_trust_domain()
            .await
            .expect("fetch_trust_domain"),
        Some("example.org".to_owned())
    );
}

/// Agents: create (a duplicate is `AlreadyExists`), fetch, update (the banned flag
/// included), list by SPIFFE ID, delete.
pub async fn agents_crud(store: &dyn Store) {
    let s = Scope::new("agents");
    let b = agent(&s, "b");
    store.create_agent(&b).await.expect("create_agent");
    assert_eq!(
        store.fetch_agent(&b.spiffe_id).await.expect("fetch_agent"),
        Some(b.clone())
    );
    let err = store.create_agent(&b).await.expect_err("duplicate agent");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );

    let mut a = agent(&s, "a");
    a.selectors.clear();
    store.create_agent(&a).await.expect("create_agent");
    let c = agent(&s, "c");
    store.create_agent(&c).await.expect("create_agent");

    let banned = AttestedAgent {
        banned: true,
        cert_serial: "ffee".into(),
        cert_expires_at: 123,
        selectors: vec![s.sel("other")],
        ..b.clone()
    };
    store.update_agent(&banned).await.expect("update_agent");
    assert_eq!(
        store.fetch_agent(&b.spiffe_id).await.expect("fetch_agent"),
        Some(banned.clone())
    );
    let err = store
        .update_agent(&agent(&s, "missing"))
        .await
        .expect_err("unknown agent");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    assert_eq!(
        store
            .fetch_agent(&s.id("missing"))
            .await
            .expect("fetch_agent"),
        None
    );

    let prefix = format!("spiffe://example.org/suite/{}/", s.tag);
    let mine: Vec<AttestedAgent> = store
        .list_agents()
        .await
        .expect("list_agents")
        .into_iter()
        .filter(|x| x.spiffe_id.as_str().starts_with(&prefix))
        .collect();
    assert_eq!(mine, vec![a.clone(), banned, c.clone()]);

    store
        .delete_agent(&a.spiffe_id)
        .await
        .expect("delete_agent");
    assert_eq!(
        store.fetch_agent(&a.spiffe_id).await.expect("fetch_agent"),
        None
    );
    let err = store
        .delete_agent(&a.spiffe_id)
        .await
        .expect_err("second delete");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    assert_eq!(
        store.fetch_agent(&c.spiffe_id).await.expect("fetch_agent"),
        Some(c)
    );
}

/// A join token is consumed once: the second consume is `NotFound`. A duplicate hash is
/// `AlreadyExists`.
pub async fn join_token_single_use(store: &dyn Store) {
    let s = Scope::new("token");
    let token = JoinTokenRecord {
        token_hash: s.token_hash("t"),
        expires_at: FAR_FUTURE,
        selectors: vec![s.sel("a"), s.sel("b")],
    };
    store
        .create_join_token(&token)
        .await
        .expect("create_join_token");
    let err = store
        .create_join_token(&token)
        .await
        .expect_err("duplicate token");
    assert!(
        matches!(err, StoreError::AlreadyExists { .. }),
        "got {err:?}"
    );

    let consumed = store
        .consume_join_token(&token.token_hash, FAR_FUTURE - 1)
        .await
        .expect("consume_join_token");
    assert_eq!(consumed, token);
    let err = store
        .consume_join_token(&token.token_hash, FAR_FUTURE - 1)
        .await
        .expect_err("second consume");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");

    let bare = JoinTokenRecord {
        token_hash: s.token_hash("bare"),
        expires_at: FAR_FUTURE,
        selectors: Vec::new(),
    };
    store
        .create_join_token(&bare)
        .await
        .expect("create_join_token");
    assert_eq!(
        store
            .consume_join_token(&bare.token_hash, 0)
            .await
            .expect("consume"),
        bare
    );
    let err = store
        .consume_join_token(&s.token_hash("never"), 0)
        .await
        .expect_err("unknown token");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
}

/// A token consumed at or after its expiry is `TokenExpired`, and is gone afterwards.
pub async fn join_token_expired(store: &dyn Store) {
    let s = Scope::new("token-expired");
    let token = JoinTokenRecord {
        token_hash: s.token_hash("t"),
        expires_at: 1_000,
        selectors: vec![s.sel("a")],
    };
    store
        .create_join_token(&token)
        .await
        .expect("create_join_token");
    let err = store
        .consume_join_token(&token.token_hash, 1_000)
        .await
        .expect_err("expired token");
    assert!(matches!(err, StoreError::TokenExpired), "got {err:?}");
    let err = store
        .consume_join_token(&token.token_hash, 0)
        .await
        .expect_err("expired token was removed");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
}

/// `prune_join_tokens` removes exactly the tokens expired at `now` and counts them.
pub async fn join_token_prune(store: &dyn Store) {
    let s = Scope::new("token-prune");
    let make = |name: &str, expires_at: i64| JoinTokenRecord {
        token_hash: s.token_hash(name),
        expires_at,
        selectors: Vec::new(),
    };
    let (old, edge, live) = (make("old", 10), make("edge", 20), make("live", 21));
    for token in [&old, &edge, &live] {
        store
            .create_join_token(token)
            .await
            .expect("create_join_token");
    }
    assert_eq!(
        store
            .prune_join_tokens(20)
            .await
            .expect("prune_join_tokens"),
        2
    );
    assert_eq!(
        store
            .prune_join_tokens(20)
            .await
            .expect("prune_join_tokens"),
        0
    );
    for gone in [&old, &edge] {
        let err = store
            .consume_join_token(&gone.token_hash, 0)
            .await
            .expect_err("pruned token");
        assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    }
    assert_eq!(
        store
            .consume_join_token(&live.token_hash, 0)
            .await
            .expect("consume"),
        live
    );
}

/// Bundles: put, replace, fetch, list by trust domain, delete; a sequence beyond
/// `i64::MAX` is `Invalid`.
pub async fn bundles_crud(store: &dyn Store) {
    let s = Scope::new("bundles");
    let bundle = |name: &str, sequence: u64| BundleRecord {
        trust_domain_id: format!("spiffe://{name}.{}.example", s.tag),
        document: format!(r#"{{"keys":[],"spiffe_sequence":{sequence},"name":"{name}"}}"#),
        sequence,
    };
    let b = bundle("b", 1);
    store.put_bundle(&b).await.expect("put_bundle");
    assert_eq!(
        store
            .fetch_bundle(&b.trust_domain_id)
            .await
            .expect("fetch_bundle"),
        Some(b.clone())
    );
    let b2 = BundleRecord {
        document: r#"{"keys":[{"kty":"EC"}]}"#.into(),
        sequence: i64::MAX.unsigned_abs(),
        ..b.clone()
    };
    store.put_bundle(&b2).await.expect("replace bundle");
    assert_eq!(
        store
            .fetch_bundle(&b.trust_domain_id)
            .await
            .expect("fetch_bundle"),
        Some(b2.clone())
    );

    let (a, c) = (bundle("a", 5), bundle("c", 0));
    store.put_bundle(&c).await.expect("put_bundle");
    store.put_bundle(&a).await.expect("put_bundle");
    let mine: Vec<BundleRecord> = store
        .list_bundles()
        .await
        .expect("list_bundles")
        .into_iter()
        .filter(|x| x.trust_domain_id.ends_with(&format!(".{}.example", s.tag)))
        .collect();
    assert_eq!(mine, vec![a.clone(), b2, c.clone()]);

    let err = store
        .put_bundle(&bundle("huge", u64::MAX))
        .await
        .expect_err("sequence too large");
    assert!(matches!(err, StoreError::Invalid(_)), "got {err:?}");
    assert_eq!(
        store
            .fetch_bundle(&bundle("huge", 0).trust_domain_id)
            .await
            .expect("fetch"),
        None
    );

    store
        .delete_bundle(&a.trust_domain_id)
        .await
        .expect("delete_bundle");
    assert_eq!(
        store
            .fetch_bundle(&a.trust_domain_id)
            .await
            .expect("fetch_bundle"),
        None
    );
    let err = store
        .delete_bundle(&a.trust_domain_id)
        .await
        .expect_err("second delete");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
    assert_eq!(
        store
            .fetch_bundle(&c.trust_domain_id)
            .await
            .expect("fetch_bundle"),
        Some(c)
    );
}

/// Journal records: put, replace, list by id, delete.
pub async fn journal_crud(store: &dyn Store) {
    let s = Scope::new("journal");
    let record = |name: &str, kind: &str, updated_at: i64| JournalRecord {
        id: format!("{}-{name}", s.tag),
        kind: kind.into(),
        payload: format!(r#"{{"slot":"{name}","state":"active"}}"#),
        updated_at,
    };
    let mine = || async {
        store
            .list_journal()
            .await
            .expect("list_journal")
            .into_iter()
            .filter(|r| r.id.starts_with(&s.tag))
            .collect::<Vec<_>>()
    };
    let (x509, jwt) = (record("x509-b", "x509", 100), record("jwt-a", "jwt", 200));
    store.put_journal(&x509).await.expect("put_journal");
    store.put_journal(&jwt).await.expect("put_journal");
    assert_eq!(mine().await, vec![jwt.clone(), x509.clone()]);

    let replaced = JournalRecord {
        payload: r#"{"slot":"x509-b","state":"old"}"#.into(),
        updated_at: 300,
        ..x509.clone()
    };
    store
        .put_journal(&replaced)
        .await
        .expect("replace journal record");
    assert_eq!(mine().await, vec![jwt.clone(), replaced]);

    store
        .delete_journal(&x509.id)
        .await
        .expect("delete_journal");
    assert_eq!(mine().await, vec![jwt]);
    let err = store
        .delete_journal(&x509.id)
        .await
        .expect_err("second delete");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");
}

/// Leases: create, fetch by id and by child, the live filter, release (kept on a second
/// release), duplicates refused, extremes round-trip, prune.
pub async fn leases_lifecycle(store: &dyn Store) {
    let s = Scope::new("leases");
    let lease = |task: &str, created_at: i64, expires_at: i64| LeaseRecord {
        id: format!("{}-{task}", s.tag),
        child_id: s.id(&format!("parent/sub/{task}")),
        parent_id: s.id("parent"),
        entry_id: format!("{}-entry", s.tag),
        agent_id: s.id("agent"),
        depth: 1,
        task: task.into(),
        child_pid: 4242,
        child_start_time: 987_654_321,
        created_at,
        expires_at,
        released_at: None,
    };
    let (a, b) = (lease("a", 100, 400), lease("b", 200, 300));
    store.create_lease(&a).await.expect("create_lease");
    store.create_lease(&b).await.expect("create_lease");
    assert_eq!(
        store.fetch_lease(&a.id).await.expect("fetch"),
        Some(a.clone())
    );
    assert_eq!(
        store
            .fetch_lease_by_child(&b.child_id)
            .await
            .expect("by child"),
        Some(b.clone())
    );
    assert_eq!(store.fetch_lease("missing").await.expect("fetch"), None);

    // The same id, or the same child ID, again.
    for dup in [
        a.clone(),
        LeaseRecord {
            id: format!("{}-other", s.tag),
            ..a.clone()
        },
    ] {
        let err = store.create_lease(&dup).await.expect_err("duplicate lease");
        assert!(
            matches!(err, StoreError::AlreadyExists { .. }),
            "got {err:?}"
        );
    }

    let parent = s.id("parent");
    let listed = store.list_leases(Some(&parent), None).await.expect("list");
    assert_eq!(listed, vec![a.clone(), b.clone()]);
    let live = store
        .list_leases(Some(&parent), Some(350))
        .await
        .expect("list live");
    assert_eq!(live, vec![a.clone()], "b expired at 300");
    assert!(
        store
            .list_leases(Some(&s.id("nobody")), None)
            .await
            .expect("list")
            .is_empty()
    );

    // Released once; a second release keeps the first time.
    let released = store.release_lease(&a.id, 250).await.expect("release");
    assert_eq!(released.released_at, Some(250));
    assert!(!released.is_live(260) && b.is_live(260));
    let again = store
        .release_lease(&a.id, 260)
        .await
        .expect("release again");
    assert_eq!(again.released_at, Some(250));
    assert!(
        store
            .list_leases(Some(&parent), Some(260))
            .await
            .expect("list live")
            .iter()
            .all(|l| l.id == b.id)
    );
    let err = store
        .release_lease("missing", 1)
        .await
        .expect_err("missing");
    assert!(matches!(err, StoreError::NotFound { .. }), "got {err:?}");

    // Extremes round-trip.
    let wide = LeaseRecord {
        depth: u32::MAX,
        child_pid: i32::MAX,
        child_start_time: i64::MAX.unsigned_abs(),
        ..lease("wide", 100, FAR_FUTURE)
    };
    store.create_lease(&wide).await.expect("create wide");
    assert_eq!(
        store.fetch_lease(&wide.id).await.expect("fetch"),
        Some(wide.clone())
    );
    let too_wide = LeaseRecord {
        child_start_time: u64::MAX,
        ..lease("too-wide", 100, FAR_FUTURE)
    };
    assert!(store.create_lease(&too_wide).await.is_err());
    assert_eq!(store.fetch_lease(&too_wide.id).await.expect("fetch"), None);

    // Pruning removes what ended before the cut-off, whoever owns it.
    let pruned = store.prune_leases(350).await.expect("prune");
    assert!(
        pruned >= 2,
        "a (released at 250) and b (expired at 300): {pruned}"
    );
    assert_eq!(store.fetch_lease(&a.id).await.expect("fetch"), None);
    assert_eq!(store.fetch_lease(&b.id).await.expect("fetch"), None);
    assert!(store.fetch_lease(&wide.id).await.expect("fetch").is_some());
}

/// Many concurrent consumers of one join token: exactly one gets it.
pub async fn concurrent_consume_join_token(store: &dyn Store) {
    let s = Scope::new("token-race");
    for round in 0..4 {
        let token = JoinTokenRecord {
            token_hash: s.token_hash(&round.to_string()),
            expires_at: FAR_FUTURE,
            selectors: vec![s.sel("a")],
        };
        store
            .create_join_token(&token)
            .await
            .expect("create_join_token");
        let results =
            join_all((0..8).map(|_| store.consume_join_token(&token.token_hash, 0))).await;
        let winners: Vec<&JoinTokenRecord> =
            results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            winners,
            vec![&token],
            "exactly one consumer must win: {results:?}"
        );
        for result in &results {
            if let Err(err) = result {
                assert!(
                    matches!(err, StoreError::NotFound { .. }),
                    "loser got {err:?}"
                );
            }
        }
    }
}

/// Two concurrent updates from the same revision: one succeeds, the other is
/// `Conflict`.
pub async fn concurrent_update_entry(store: &dyn Store) {
    let s = Scope::new("update-race");
    let created = store
        .create_entry(&s.entry("w", &["a"]))
        .await
        .expect("create_entry");
    let left = RegistrationEntry {
        hint: "left".into(),
        ..created.clone()
    };
    let right = RegistrationEntry {
        hint: "right".into(),
        selectors: s.sels(&["b"]),
        ..created.clone()
    };
    let (l, r) = futures::join!(store.update_entry(&left), store.update_entry(&right));
    let results = [l, r];
    let winners: Vec<&RegistrationEntry> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one update must succeed: {results:?}"
    );
    for result in &results {
        if let Err(err) = result {
            assert!(
                matches!(err, StoreError::Conflict { .. }),
                "loser got {err:?}"
            );
        }
    }
    let winner = winners.first().copied().cloned().expect("one winner");
    assert_eq!(winner.revision, 2);
    assert_eq!(fetch(store, &created.id).await, Some(winner));
}

impl Scope {
    /// A template entry `spiffe://example.org/suite/<tag>/<path>/{k8s:ns}` under this
    /// scope's agent, with the named selectors (may be none).
    fn template_entry(&self, path: &str, selectors: &[&str]) -> RegistrationEntry {
        let template = IdTemplate::parse(&format!(
            "spiffe://example.org/suite/{}/{path}/{{k8s:ns}}",
            self.tag
        ))
        .expect("suite template");
        let mut entry =
            RegistrationEntry::from_template(template, self.id("agent"), self.sels(selectors))
                .expect("template entry");
        entry.created_at = 1_700_000_000;
        entry
    }
}

/// A template entry (with no selectors, or some) stores its template and reads back
/// equal; two templates under one parent with the same selectors are two entries (the
/// template is part of the entry's identity), the same one twice is refused; an update
/// can change the template; the selector lookup finds a template entry like any other.
pub async fn template_entries_round_trip(store: &dyn Store) {
    let s = Scope::new("template");
    let bare = s.template_entry("a", &[]);
    let created = store
        .create_entry(&bare)
        .await
        .expect("create template entry");
    assert_eq!(created.spiffe_id_template, bare.spiffe_id_template);
    let fetched = fetch(store, &bare.id).await.expect("template entry stored");
    assert_eq!(fetched, created, "a template entry reads back as written");
    assert!(fetched.selectors.is_empty());
    assert!(fetched.is_template());

    let other = s.template_entry("b", &[]);
    assert_eq!(
        other.spiffe_id, bare.spiffe_id,
        "one stand-in for every template"
    );
    store
        .create_entry(&other)
        .await
        .expect("another template under the same parent is another entry");
    let mut again = s.template_entry("a", &[]);
    again.id = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        store.create_entry(&again).await,
        Err(StoreError::AlreadyExists { kind: "entry" })
    ));

    let with_selectors = s.template_entry("c", &["x"]);
    store
        .create_entry(&with_selectors)
        .await
        .expect("template entry with selectors");
    let found = find(store, &s.sels(&["x", "y"])).await;
    assert_eq!(ids(&found), vec![with_selectors.id.as_str()]);
    assert_eq!(
        found.first().and_then(|e| e.spiffe_id_template.as_ref()),
        with_selectors.spiffe_id_template.as_ref()
    );

    let mut changed = fetched.clone();
    changed.spiffe_id_template = s.template_entry("d", &[]).spiffe_id_template;
    let updated = store.update_entry(&changed).await.expect("update template");
    assert_eq!(updated.spiffe_id_template, changed.spiffe_id_template);
    assert_eq!(updated.revision, 2);
    // A plain entry has none.
    let plain = s.entry("plain", &["p"]);
    store.create_entry(&plain).await.expect("plain entry");
    assert_eq!(
        fetch(store, &plain.id)
            .await
            .expect("plain")
            .spiffe_id_template,
        None
    );
}

/// Issues of a template's rendered IDs are recorded per (entry, agent, ID): a repeat
/// moves `last_issued_at` and keeps `first_issued_at`; at most
/// [`MAX_TEMPLATE_ISSUES_PER_ENTRY`] are kept per entry (the most recent); they go with
/// the entry, and recording against a deleted entry is `NotFound`.
pub async fn template_issues_recorded_and_bounded(store: &dyn Store) {
    let s = Scope::new("issues");
    let entry = s.template_entry("t", &[]);
    store.create_entry(&entry).await.expect("template entry");
    let agent = s.id("agent");
    let other_agent = s.id("agent2");
    let web = s.id("t/web");
    store
        .record_template_issue(&entry.id, &agent, &web, 100)
        .await
        .expect("record");
    store
        .record_template_issue(&entry.id, &agent, &web, 150)
        .await
        .expect("record again");
    store
        .record_template_issue(&entry.id, &other_agent, &web, 120)
        .await
        .expect("record on another agent");
    let issues = store
        .list_template_issues(&entry.id)
        .await
        .expect("list issues");
    assert_eq!(issues.len(), 2, "{issues:?}");
    let (latest, earlier) = (
        issues.first().expect("an issue"),
        issues.get(1).expect("a second issue"),
    );
    assert_eq!(latest.agent_id, agent, "most recent first");
    assert_eq!(latest.spiffe_id, web);
    assert_eq!((latest.first_issued_at, latest.last_issued_at), (100, 150));
    assert_eq!(earlier.agent_id, other_agent);
    assert!(
        store
            .list_template_issues("no-such-entry")
            .await
            .expect("list")
            .is_empty()
    );

    let max = i64::from(MAX_TEMPLATE_ISSUES_PER_ENTRY);
    for n in 0..max + 5 {
        store
            .record_template_issue(&entry.id, &agent, &s.id(&format!("t/n{n}")), 1_000 + n)
            .await
            .expect("record many");
    }
    let issues = store
        .list_template_issues(&entry.id)
        .await
        .expect("list issues");
    assert_eq!(issues.len(), MAX_TEMPLATE_ISSUES_PER_ENTRY as usize);
    assert_eq!(
        issues.first().map(|i| &i.spiffe_id),
        Some(&s.id(&format!("t/n{}", max + 4)))
    );
    assert!(
        issues.iter().all(|i| i.spiffe_id != web),
        "the oldest issues were dropped"
    );

    store.delete_entry(&entry.id).await.expect("delete entry");
    assert!(
        store
            .list_template_issues(&entry.id)
            .await
            .expect("list")
            .is_empty(),
        "issues go with their entry"
    );
    assert!(matches!(
        store
            .record_template_issue(&entry.id, &agent, &web, 2_000)
            .await,
        Err(StoreError::NotFound { kind: "entry" })
    ));
}

/// `swap_bundle` writes only over the sequence it was given: of two writers that read
/// the same bundle, one wins.
pub async fn bundle_swap_is_conditional(store: &dyn Store) {
    let s = Scope::new("swap");
    let td = format!("spiffe://swap.{}.example", s.tag);
    let record = |sequence: u64, name: &str| BundleRecord {
        trust_domain_id: td.clone(),
        document: format!(r#"{{"keys":[],"name":"{name}"}}"#),
        sequence,
    };
    assert!(
        store
            .swap_bundle(&record(1, "a"), None)
            .await
            .expect("create")
    );
    assert!(
        !store
            .swap_bundle(&record(1, "b"), None)
            .await
            .expect("second create"),
        "a bundle that exists is not created again"
    );
    assert!(
        store
            .swap_bundle(&record(2, "c"), Some(1))
            .await
            .expect("swap")
    );
    assert!(
        !store
            .swap_bundle(&record(2, "d"), Some(1))
            .await
            .expect("stale swap"),
        "a swap over a sequence that moved on is refused"
    );
    let stored = store
        .fetch_bundle(&td)
        .await
        .expect("fetch")
        .expect("stored");
    assert_eq!(stored, record(2, "c"));
    store.delete_bundle(&td).await.expect("delete");
}

/// Each kind of write is announced to a subscriber after it committed (PostgreSQL: by
/// the database, to every server on it). Other writers may share the store, so the
/// check looks for its own changes among whatever arrives.
pub async fn changes_are_announced(store: &dyn Store) {
    let s = Scope::new("changes");
    let mut rx = store.changes();
    // PostgreSQL's listener starts at the first subscription: wait until it hears.
    let probe = s.entry("probe", &["p"]);
    let mut heard = false;
    for _ in 0..200 {
        store.create_entry(&probe).await.expect("create probe");
        if wait_for(&mut rx, &StoreChange::Entry(probe.id.clone()), 50).await {
            heard = true;
            break;
        }
        store.delete_entry(&probe.id).await.expect("delete probe");
    }
    assert!(heard, "the store never announced an entry change");
    let entry = s.entry("workload", &["a"]);
    store.create_entry(&entry).await.expect("create");
    assert!(wait_for(&mut rx, &StoreChange::Entry(entry.id.clone()), 5_000).await);
    store.delete_entry(&entry.id).await.expect("delete");
    assert!(wait_for(&mut rx, &StoreChange::Entry(entry.id.clone()), 5_000).await);
    let agent = AttestedAgent {
        spiffe_id: s.id("agent"),
        attestation_type: "join_token".into(),
        cert_serial: "01".into(),
        cert_expires_at: FAR_FUTURE,
        cert_sha256: String::new(),
        next_cert_sha256: String::new(),
        selectors: Vec::new(),
        banned: false,
        created_at: 1_700_000_000,
    };
    store.create_agent(&agent).await.expect("create agent");
    let agent_change = StoreChange::Agent(agent.spiffe_id.to_string());
    assert!(wait_for(&mut rx, &agent_change, 5_000).await);
    store
        .delete_agent(&agent.spiffe_id)
        .await
        .expect("delete agent");
    assert!(wait_for(&mut rx, &agent_change, 5_000).await);
    let journal = JournalRecord {
        id: s.tag.clone(),
        kind: "jwt".into(),
        payload: "{}".into(),
        updated_at: 1,
    };
    store.put_journal(&journal).await.expect("put journal");
    assert!(wait_for(&mut rx, &StoreChange::Journal, 5_000).await);
    store
        .delete_journal(&journal.id)
        .await
        .expect("delete journal");
    let td = format!("spiffe://changes.{}.example", s.tag);
    let bundle = BundleRecord {
        trust_domain_id: td.clone(),
        document: "{}".into(),
        sequence: 1,
    };
    store.put_bundle(&bundle).await.expect("put bundle");
    assert!(wait_for(&mut rx, &StoreChange::Bundle(td.clone()), 5_000).await);
    store.delete_bundle(&td).await.expect("delete bundle");
    store.delete_entry(&probe.id).await.expect("delete probe");
}

/// Whether `want` arrives within `millis` (a lagged receiver counts as a miss).
async fn wait_for(
    rx: &mut tokio::sync::broadcast::Receiver<StoreChange>,
    want: &StoreChange,
    millis: u64,
) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(millis);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(change)) if &change == want => return true,
            Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) | Err(_) => return false,
        }
    }
}

/// Token service keys: upsert by kid, the unexpired ones listed by kid, an oversized or
/// unnamed key refused, the expired ones pruned.
pub async fn txn_keys_published_listed_and_pruned(store: &dyn Store) {
    let s = Scope::new("txn-keys");
    let key = |name: &str, replica: &str, expires_at: i64| TxnKeyRecord {
        kid: format!("{}-{name}", s.tag),
        jwk: format!(r#"{{"kty":"EC","crv":"P-256","x":"{name}","y":"{name}"}}"#),
        replica: replica.into(),
        published_at: 1_000,
        expires_at,
    };
    let tag = s.tag.as_str();
    let mine = |now: i64| async move {
        store
            .list_txn_keys(now)
            .await
            .expect("list_txn_keys")
            .into_iter()
            .filter(|k| k.kid.starts_with(tag))
            .collect::<Vec<_>>()
    };
    let (b, a, old) = (
        key("b", "replica-1", FAR_FUTURE),
        key("a", "replica-2", FAR_FUTURE),
        key("old", "replica-1", 2_000),
    );
    for k in [&b, &a, &old] {
        store.put_txn_key(k).await.expect("put_txn_key");
    }
    assert_eq!(mine(1_500).await, vec![a.clone(), b.clone(), old.clone()]);
    assert_eq!(
        mine(2_000).await,
        vec![a.clone(), b.clone()],
        "a key is listed while expires_at > now"
    );

    // A rotation republishes the key that was current with its retirement time.
    let retired = TxnKeyRecord {
        published_at: 1_200,
        expires_at: 3_000,
        ..b.clone()
    };
    store.put_txn_key(&retired).await.expect("replace");
    assert_eq!(mine(1_500).await, vec![a.clone(), retired.clone(), old]);

    for (bad, why) in [
        (
            TxnKeyRecord {
                jwk: "x".repeat(MAX_TXN_KEY_JWK_BYTES + 1),
                ..key("big", "replica-1", FAR_FUTURE)
            },
            "oversized JWK",
        ),
        (
            TxnKeyRecord {
                kid: String::new(),
                ..key("nokid", "replica-1", FAR_FUTURE)
            },
            "empty kid",
        ),
        (key("norep", "", FAR_FUTURE), "empty replica"),
    ] {
        let err = store.put_txn_key(&bad).await.expect_err(why);
        assert!(matches!(err, StoreError::Invalid(_)), "{why}: {err:?}");
    }
    let fits = TxnKeyRecord {
        jwk: "x".repeat(MAX_TXN_KEY_JWK_BYTES),
        ..key("fits", "replica-1", FAR_FUTURE)
    };
    store
        .put_txn_key(&fits)
        .await
        .expect("a JWK of exactly the limit");

    let pruned = store.prune_txn_keys(2_000).await.expect("prune_txn_keys");
    assert!(pruned >= 1, "the expired key is pruned (got {pruned})");
    assert_eq!(
        mine(0).await,
        vec![a.clone(), retired.clone(), fits.clone()]
    );
    store.prune_txn_keys(3_000).await.expect("prune_txn_keys");
    assert_eq!(mine(0).await, vec![a, fits]);
}

/// Federation relationships: create (once per trust domain), fetch, list in order,
/// update keeps the creation time and status, refresh status (a failure keeps the last
/// success), delete; limits on field sizes and the error length.
pub async fn federations_crud_and_refresh_status(store: &dyn Store) {
    let s = Scope::new("federations");
    let record = |name: &str| FederationRecord {
        trust_domain_id: format!("spiffe://{name}.{}.example", s.tag),
        bundle_endpoint_url: format!("https://{name}.example:8443/"),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: format!("spiffe://{name}.{}.example/writ/server", s.tag),
        web_ca_pem: String::new(),
        created_at: 1_700_000_000,
        last_refresh_at: None,
        last_error: None,
        next_refresh_at: None,
    };
    let a = record("a");
    let b = record("b");
    store.create_federation(&b).await.expect("create b");
    store.create_federation(&a).await.expect("create a");
    assert!(matches!(
        store.create_federation(&a).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    assert_eq!(
        store
            .fetch_federation(&a.trust_domain_id)
            .await
            .expect("fetch"),
        Some(a.clone())
    );
    let listed: Vec<String> = store
        .list_federations()
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.trust_domain_id)
        .filter(|td| td.contains(&s.tag))
        .collect();
    assert_eq!(
        listed,
        vec![a.trust_domain_id.clone(), b.trust_domain_id.clone()]
    );

    assert!(
        store
            .record_federation_refresh(&a.trust_domain_id, Some(1_700_000_100), None, 1_700_000_400)
            .await
            .expect("record success")
    );
    let long = "x".repeat(super::MAX_FEDERATION_ERROR_BYTES * 2);
    assert!(
        store
            .record_federation_refresh(&a.trust_domain_id, None, Some(&long), 1_700_000_500)
            .await
            .expect("record failure")
    );
    let updated = FederationRecord {
        bundle_endpoint_url: "https://a2.example/".into(),
        profile: "https_web".into(),
        endpoint_spiffe_id: String::new(),
        web_ca_pem: "-----BEGIN CERTIFICATE-----".into(),
        created_at: 1,
        ..a.clone()
    };
    store.update_federation(&updated).await.expect("update");
    let got = store
        .fetch_federation(&a.trust_domain_id)
        .await
        .expect("fetch")
        .expect("present");
    assert_eq!(got.bundle_endpoint_url, "https://a2.example/");
    assert_eq!(got.profile, "https_web");
    assert_eq!(
        got.created_at, 1_700_000_000,
        "update keeps the creation time"
    );
    assert_eq!(
        got.last_refresh_at,
        Some(1_700_000_100),
        "a failure keeps the last success"
    );
    assert_eq!(
        got.last_error.as_deref().map(str::len),
        Some(super::MAX_FEDERATION_ERROR_BYTES)
    );
    assert_eq!(got.next_refresh_at, Some(1_700_000_500));
    store
        .record_federation_refresh(&a.trust_domain_id, Some(1_700_000_600), None, 1_700_000_900)
        .await
        .expect("record success");
    let got = store
        .fetch_federation(&a.trust_domain_id)
        .await
        .expect("fetch")
        .expect("present");
    assert_eq!(got.last_error, None, "a success clears the error");

    let huge = FederationRecord {
        web_ca_pem: "x".repeat(super::MAX_FEDERATION_FIELD_BYTES + 1),
        ..record("c")
    };
    assert!(matches!(
        store.create_federation(&huge).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.update_federation(&record("missing")).await,
        Err(StoreError::NotFound { .. })
    ));

    store
        .delete_federation(&a.trust_domain_id)
        .await
        .expect("delete");
    assert_eq!(
        store
            .fetch_federation(&a.trust_domain_id)
            .await
            .expect("fetch"),
        None
    );
    assert!(matches!(
        store.delete_federation(&a.trust_domain_id).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(
        !store
            .record_federation_refresh(&a.trust_domain_id, Some(1), None, 2)
            .await
            .expect("record on a deleted relationship"),
        "a refresh of a deleted relationship records nothing"
    );
    store
        .delete_federation(&b.trust_domain_id)
        .await
        .expect("delete b");
}

fn audit_event(txn: &str, kind: &str, decision: &str, at_ms: i64) -> super::audit::AuditEvent {
    super::audit::AuditEvent {
        at_ms,
        kind: kind.into(),
        decision: decision.into(),
        txn: txn.into(),
        sub: "Alice".into(),
        caller: format!("spiffe://example.org/{txn}/gateway"),
        service: String::new(),
        lease: String::new(),
        record: "{}".into(),
    }
}

/// The whole chain verifies against its anchor.
async fn audit_verify(store: &dyn Store) -> super::audit::ChainSummary {
    let anchor = store.audit_anchor().await.expect("audit_anchor");
    let mut verifier = super::audit::ChainVerifier::new(&anchor);
    let mut after = 0;
    loop {
        let rows = store.list_audit(after, 1000).await.expect("list_audit");
        let Some(last) = rows.last() else { break };
        after = last.seq;
        rows.iter().for_each(|r| verifier.push(r));
    }
    verifier.finish().expect("the audit chain verifies")
}

/// Audit events are chained, read back by transaction, summed, searched, and pruned
/// with a checkpoint that keeps the chain verifiable.
#[expect(
    clippy::indexing_slicing,
    reason = "a conformance check reports a broken store by panicking, like a test"
)]
pub async fn audit_chain_appended_read_and_pruned(store: &dyn Store) {
    use super::audit::{MAX_FIELD_BYTES, MAX_QUERY_BYTES};
    let scope = Scope::new("audit");
    let txn = scope.tag.clone();
    let before = store.audit_anchor().await.expect("audit_anchor");
    let mut verification = audit_event(&txn, "verification", "allow", 2);
    verification.service = format!("spiffe://example.org/{txn}/tool");
    let events = vec![
        audit_event(&txn, "grant", "allow", 1),
        verification,
        audit_event(&txn, "refusal", "deny", 3),
    ];
    let head = store.append_audit(&events).await.expect("append_audit");
    assert_eq!(head, before.head_seq + 3);
    let anchor = store.audit_anchor().await.expect("audit_anchor");
    assert_eq!(anchor.head_seq, head);

    let rows = store.audit_txn(&txn, 100).await.expect("audit_txn");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].event, events[0]);
    assert_eq!(rows[1].prev_hash, rows[0].hash, "chained");
    assert!(rows.iter().all(super::audit::AuditRow::hash_matches));
    assert_eq!(anchor.head_hash, rows[2].hash);
    let after = store
        .list_audit(before.head_seq, 2)
        .await
        .expect("list_audit");
    assert_eq!(after, rows[..2].to_vec(), "ascending, limited");

    let found = store
        .list_audit_txns(&txn.to_uppercase(), 10)
        .await
        .expect("list_audit_txns");
    assert_eq!(found.len(), 1, "found by txn, ignoring case");
    let summary = &found[0];
    assert_eq!(
        (
            summary.grants,
            summary.verifications,
            summary.refusals,
            summary.spawns
        ),
        (1, 1, 1, 0)
    );
    assert!(summary.denied);
    assert_eq!(
        (summary.started_ms, summary.last_ms, summary.last_seq),
        (1, 3, head)
    );
    assert_eq!(summary.sub, "Alice");
    assert_eq!(
        summary.workloads,
        vec![
            format!("spiffe://example.org/{txn}/gateway"),
            format!("spiffe://example.org/{txn}/tool")
        ]
    );
    let by_workload = store
        .list_audit_txns(&format!("{txn}/TOOL"), 10)
        .await
        .expect("list_audit_txns");
    assert_eq!(by_workload.len(), 1, "found by workload");
    let wildcard = store
        .list_audit_txns("%_", 200)
        .await
        .expect("list_audit_txns");
    assert!(wildcard.is_empty(), "LIKE wildcards are taken literally");
    let latest = store.list_audit_txns("", 1).await.expect("list_audit_txns");
    assert_eq!(
        latest.first().map(|s| s.txn.as_str()),
        Some(txn.as_str()),
        "latest first"
    );
    let changed = store
        .audit_txns_after(before.head_seq, 10)
        .await
        .expect("audit_txns_after");
    assert_eq!(changed, vec![(txn.clone(), head)]);

    // Limits: nothing of a refused append is stored.
    let mut long = audit_event(&txn, "grant", "allow", 4);
    long.sub = "x".repeat(MAX_FIELD_BYTES + 1);
    let err = store
        .append_audit(&[audit_event(&txn, "grant", "allow", 4), long])
        .await
        .expect_err("an over-long field is refused");
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    let err = store
        .list_audit_txns(&"q".repeat(MAX_QUERY_BYTES + 1), 10)
        .await
        .expect_err("an over-long query is refused");
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(
        store.audit_anchor().await.expect("audit_anchor").head_seq,
        head
    );
    assert_eq!(store.append_audit(&[]).await.expect("empty append"), head);

    // Retention: on a fresh chain, the two oldest rows go and the rest verifies.
    if before.head_seq == 0 {
        assert_eq!(store.prune_audit(3).await.expect("prune_audit"), 2);
        let anchor = store.audit_anchor().await.expect("audit_anchor");
        assert_eq!(anchor.pruned_seq, 2);
        assert_eq!(anchor.pruned_hash, rows[1].hash);
        assert_eq!(
            store.prune_audit(3).await.expect("prune_audit"),
            0,
            "done once"
        );
    } else {
        assert_eq!(store.prune_audit(i64::MIN).await.expect("prune_audit"), 0);
    }
    audit_verify(store).await;
}

/// Concurrent appends take turns on the chain head: no sequence is used twice and the
/// chain verifies.
pub async fn audit_appends_never_fork(store: &dyn Store) {
    let scope = Scope::new("audit-fork");
    let before = store.audit_anchor().await.expect("audit_anchor");
    let writers = (0..8).map(|w| {
        let txn = format!("{}-{w}", scope.tag);
        async move {
            for i in 0..5 {
                let events = vec![audit_event(&txn, "grant", "allow", 1_000 + i); 2];
                store.append_audit(&events).await.expect("append_audit");
            }
        }
    });
    join_all(writers).await;
    let summary = audit_verify(store).await;
    assert_eq!(summary.head_seq, before.head_seq + 80);
}

/// When the revocation checks make their entries (2033): later than any other check's.
const REVOKED_AT: i64 = 2_000_000_000;

fn new_revocation(
    target: writ_spiffe::revocation::Target,
    lapses_in: i64,
) -> super::revocation::NewRevocation {
    super::revocation::NewRevocation {
        target,
        revoked_at: REVOKED_AT,
        lapses_at: REVOKED_AT + lapses_in,
        reason: Some("suite".into()),
        revoked_by: "suite admin".into(),
    }
}

/// The highest seq among the revocations in force at [`REVOKED_AT`] (0: none).
async fn revocation_head(store: &dyn Store) -> u64 {
    let mut after = 0;
    loop {
        let page = store
            .list_revocations(after, REVOKED_AT, super::revocation::MAX_LIST)
            .await
            .expect("list_revocations");
        match page.last() {
            Some(last) => after = last.revocation.seq,
            None => return after,
        }
    }
}

/// Revocations: numbered in increasing order, audited in the same transaction, listed
/// while in force from a cursor, refused when malformed, pruned once lapsed, and a seq
/// is never reused even after the highest row is pruned.
pub async fn revocations_recorded_listed_and_pruned(store: &dyn Store) {
    use writ_spiffe::revocation::Target;
    let s = Scope::new("revocations");
    let mut rx = store.changes();
    let head = revocation_head(store).await;
    let txn = Target::Txn { txn: s.tag.clone() };
    let workload = Target::Workload {
        spiffe_id: s.id("planner").to_string(),
        subtree: true,
    };
    let lease = Target::Lease {
        lease: format!("{}-lease", s.tag),
        spiffe_id: s.id("planner/sub/1").to_string(),
    };
    let mut made = Vec::new();
    for (target, lapses_in) in [(txn, 100), (workload, 5), (lease, 100)] {
        let new = new_revocation(target, lapses_in);
        let r = store
            .insert_revocation(&new)
            .await
            .expect("insert_revocation");
        assert_eq!(r, new.with_seq(r.seq), "returned as given, with its seq");
        made.push(r);
    }
    let seqs: Vec<u64> = made.iter().map(|r| r.seq).collect();
    assert!(
        seqs.first().is_some_and(|first| *first > head)
            && seqs.windows(2).all(|w| matches!(w, [a, b] if a < b)),
        "seqs increase: {seqs:?} after {head}"
    );
    assert!(
        wait_for(&mut rx, &StoreChange::Revocation, 5_000).await,
        "a revocation is announced"
    );

    // Audited in the same transaction.
    let rows = store.audit_txn(&s.tag, 10).await.expect("audit_txn");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let audited = rows.first().expect("the audit row");
    assert_eq!(
        (audited.event.kind.as_str(), audited.event.decision.as_str()),
        ("revocation", "deny")
    );
    assert!(audited.event.record.contains("suite admin"));

    // Listed from a cursor, in order, limited; lapsed ones are left out.
    let listed = store
        .list_revocations(head, REVOKED_AT + 1, 100)
        .await
        .expect("list_revocations");
    let listed_entries: Vec<_> = listed.iter().map(|r| r.revocation.clone()).collect();
    assert_eq!(listed_entries, made);
    assert!(listed.iter().all(|r| r.revoked_by == "suite admin"));
    let first = seqs.first().copied().unwrap_or_default();
    let two = store
        .list_revocations(head, REVOKED_AT + 1, 2)
        .await
        .expect("list_revocations");
    assert_eq!(two.len(), 2);
    let later = store
        .list_revocations(first, REVOKED_AT + 5, 100)
        .await
        .expect("list_revocations");
    assert_eq!(
        later.iter().map(|r| r.revocation.seq).collect::<Vec<_>>(),
        seqs.get(2..).unwrap_or_default().to_vec(),
        "after the cursor, without the lapsed workload entry"
    );

    // Malformed ones are refused, and nothing of them is stored.
    let mut bad = Vec::new();
    bad.push(new_revocation(Target::Sub { sub: String::new() }, 10));
    bad.push(new_revocation(
        Target::Txn {
            txn: "x".repeat(writ_spiffe::revocation::MAX_VALUE + 1),
        },
        10,
    ));
    bad.push(new_revocation(Target::Sub { sub: "u".into() }, 0));
    let mut control = new_revocation(Target::Sub { sub: "u".into() }, 10);
    control.reason = Some("line\nbreak".into());
    bad.push(control);
    for new in bad {
        let err = store
            .insert_revocation(&new)
            .await
            .expect_err("a malformed revocation is refused");
        assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    }
    let last = seqs.last().copied().unwrap_or_default();
    assert!(
        store
            .list_revocations(last, REVOKED_AT, 100)
            .await
            .expect("list_revocations")
            .is_empty()
    );

    // Pruned once lapsed; a seq is never reused.
    assert!(
        store
            .prune_revocations(REVOKED_AT + 5)
            .await
            .expect("prune")
            >= 1
    );
    let kept = store
        .list_revocations(head, REVOKED_AT, 100)
        .await
        .expect("list_revocations");
    assert_eq!(kept.len(), 2, "the lapsed one is gone");
    store
        .prune_revocations(REVOKED_AT + 100)
        .await
        .expect("prune");
    assert!(
        store
            .list_revocations(0, REVOKED_AT, 100)
            .await
            .expect("list_revocations")
            .is_empty()
    );
    let again = store
        .insert_revocation(&new_revocation(Target::Sub { sub: s.tag.clone() }, 1))
        .await
        .expect("insert_revocation");
    assert!(again.seq > last, "seq {} reused (last {last})", again.seq);
    store
        .prune_revocations(REVOKED_AT + 1)
        .await
        .expect("prune");
}

/// Concurrent revocations each get their own seq, are all listed in seq order, and the
/// audit chain they extend still verifies.
pub async fn revocations_concurrent_inserts_keep_order(store: &dyn Store) {
    use writ_spiffe::revocation::Target;
    let s = Scope::new("revocations-race");
    let head = revocation_head(store).await;
    let writers = (0..8).map(|w| {
        let tag = s.tag.clone();
        async move {
            let mut seqs = Vec::new();
            for i in 0..3 {
                let target = Target::Txn {
                    txn: format!("{tag}-{w}-{i}"),
                };
                let r = store
                    .insert_revocation(&new_revocation(target, 10))
                    .await
                    .expect("insert_revocation");
                seqs.push(r.seq);
            }
            seqs
        }
    });
    let mut made: Vec<u64> = join_all(writers).await.into_iter().flatten().collect();
    made.sort_unstable();
    made.dedup();
    assert_eq!(made.len(), 24, "every insert has its own seq");
    let listed: Vec<u64> = store
        .list_revocations(head, REVOKED_AT, 100)
        .await
        .expect("list_revocations")
        .iter()
        .map(|r| r.revocation.seq)
        .collect();
    assert_eq!(listed, made, "listed ascending, none missing");
    audit_verify(store).await;
    store
        .prune_revocations(REVOKED_AT + 10)
        .await
        .expect("prune");
}
