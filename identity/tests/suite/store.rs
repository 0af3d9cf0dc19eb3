//! The store conformance suite against SQLite (file and memory) and PostgreSQL, plus
//! what only one backend can show: SQLite restarts, its query plan, corrupt rows, file
//! modes, and concurrent PostgreSQL start-up.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sqlx::Connection;
use std::sync::Arc;
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::{MAX_SELECTORS, Selector};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::pg_harness::TempPostgres;
use writ_identity::store::postgres::PostgresStore;
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::store::{
    AttestedAgent, BundleRecord, EntryFilter, JoinTokenRecord, JournalRecord, Store, StoreError,
    TxnKeyRecord, suite,
};

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://example.org{path}")).unwrap()
}

fn sel(text: &str) -> Selector {
    text.parse().unwrap()
}

fn entry(n: usize) -> RegistrationEntry {
    RegistrationEntry::new(
        id(&format!("/workload/{n}")),
        id("/agent"),
        vec![
            sel(&format!("unix:uid:{n}")),
            sel(&format!("k8s:ns:{}", n % 3)),
        ],
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A raw connection to a store's SQLite file, to write what the store never would.
async fn raw_sqlite(path: &Path) -> sqlx::SqliteConnection {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_in_memory_passes_the_suite() {
    let store = SqliteStore::open_in_memory().await.unwrap();
    suite::run_all(&store).await;
    // Checks make fresh names, so a second pass over the same store passes too.
    suite::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data").join("writ");
    let path = data_dir.join("datastore.sqlite3");
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(mode(&data_dir), 0o700, "a new data directory is private");
    assert_eq!(mode(&path), 0o600, "a new database file is private");
    suite::run_all(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_suite() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let store = PostgresStore::connect(&pg.url()).await.unwrap();
    suite::run_all(&store).await;
    suite::run_all(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_servers_starting_together_migrate_once() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let url = pg.url();
    let stores = futures::future::join_all((0..6).map(|_| PostgresStore::connect(&url))).await;
    let stores: Vec<PostgresStore> = stores.into_iter().map(Result::unwrap).collect();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let newest = *versions.last().unwrap();
    assert!(newest >= 6, "change notifications (6) are applied");
    assert_eq!(
        versions,
        (1..=newest).collect::<Vec<_>>(),
        "every migration recorded once"
    );
    // All of them work on the same data.
    let (first, rest) = stores.split_first().unwrap();
    let created = first.create_entry(&entry(1)).await.unwrap();
    for store in rest {
        assert_eq!(
            store.fetch_entry(&created.id).await.unwrap(),
            Some(created.clone())
        );
    }
}

#[tokio::test]
async fn sqlite_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let entries: Vec<RegistrationEntry> = (0..50).map(entry).collect();
    store.create_entries(&entries).await.unwrap();
    let agent = AttestedAgent {
        spiffe_id: id("/agent"),
        attestation_type: "join_token".into(),
        cert_serial: "01".into(),
        cert_expires_at: 2_000_000_000,
        selectors: vec![sel("join_token:abc")],
        banned: true,
        created_at: 1_700_000_000,
        cert_sha256: "ab".repeat(32),
        next_cert_sha256: String::new(),
    };
    store.create_agent(&agent).await.unwrap();
    let token = JoinTokenRecord {
        token_hash: "ab".repeat(32),
        expires_at: 2_000_000_000,
        selectors: vec![sel("unix:uid:0")],
    };
    store.create_join_token(&token).await.unwrap();
    let bundle = BundleRecord {
        trust_domain_id: "spiffe://example.org".into(),
        document: "{}".into(),
        sequence: 3,
    };
    store.put_bundle(&bundle).await.unwrap();
    let record = JournalRecord {
        id: "x509-1".into(),
        kind: "x509".into(),
        payload: "{}".into(),
        updated_at: 5,
    };
    store.put_journal(&record).await.unwrap();
    let before = store.list_entries(&EntryFilter::default()).await.unwrap();
    store.close().await;
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.count_entries().await.unwrap(), 50);
    assert_eq!(
        store.list_entries(&EntryFilter::default()).await.unwrap(),
        before
    );
    let found = store
        .find_entries_by_selectors(&[sel("unix:uid:7"), sel("k8s:ns:1")])
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found.first().map(|e| e.spiffe_id.clone()),
        Some(id("/workload/7"))
    );
    assert_eq!(
        store.fetch_agent(&agent.spiffe_id).await.unwrap(),
        Some(agent)
    );
    assert_eq!(
        store
            .consume_join_token(&token.token_hash, 0)
            .await
            .unwrap(),
        token
    );
    assert_eq!(
        store.fetch_bundle(&bundle.trust_domain_id).await.unwrap(),
        Some(bundle)
    );
    assert_eq!(store.list_journal().await.unwrap(), vec![record]);
}

#[tokio::test]
async fn sqlite_lookup_uses_the_selector_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"))
        .await
        .unwrap();
    let entries: Vec<RegistrationEntry> = (0..2_000).map(entry).collect();
    store.create_entries(&entries).await.unwrap();

    for n in [1, 2, 3, MAX_SELECTORS] {
        let workload: Vec<Selector> = (0..n).map(|i| sel(&format!("unix:uid:{i}"))).collect();
        let plan = store.explain_lookup(&workload).await.unwrap();
        let text = plan.join("\n");
        assert!(
            plan.iter()
                .any(|line| line.contains("entry_selectors_type_value")
                    && (line.contains("USING INDEX") || line.contains("USING COVERING INDEX"))),
            "lookup of {n} selectors does not search the selector index:\n{text}"
        );
        // The only scans allowed are of the query's own intermediate results (the
        // union of index searches), never of the entries or selectors tables.
        assert!(
            plan.iter()
                .filter(|line| line.starts_with("SCAN"))
                .all(|line| line == "SCAN m" || line.starts_with("SCAN (subquery")),
            "lookup of {n} selectors scans a table:\n{text}"
        );
        assert!(
            !plan
                .iter()
                .any(|line| line.contains("entries") && line.starts_with("SCAN")
                    || line.contains("entry_selectors") && line.starts_with("SCAN")),
            "lookup of {n} selectors scans a table:\n{text}"
        );
    }
    assert!(store.explain_lookup(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_corrupt_rows_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let mut conn = raw_sqlite(&path).await;

    let corruptions: [(&str, &str); 8] = [
        (
            "bad SPIFFE ID",
            "UPDATE entries SET spiffe_id = 'https://not-spiffe' WHERE id = $1",
        ),
        (
            "bad parent",
            "UPDATE entries SET parent_id = 'spiffe://UPPER.case' WHERE id = $1",
        ),
        (
            "bad JSON",
            "UPDATE entries SET dns_names = '[\"unterminated' WHERE id = $1",
        ),
        (
            "bad trust domain",
            "UPDATE entries SET federates_with = '[\"a b\"]' WHERE id = $1",
        ),
        (
            "text in a number",
            "UPDATE entries SET x509_svid_ttl = 'soon' WHERE id = $1",
        ),
        (
            "negative TTL",
            "UPDATE entries SET jwt_svid_ttl = -1 WHERE id = $1",
        ),
        (
            "bad selector",
            "UPDATE entry_selectors SET type = 'Bad Type' WHERE entry_id = $1",
        ),
        (
            "selector count",
            "UPDATE entries SET selector_count = 7 WHERE id = $1",
        ),
    ];
    for (i, (what, sql)) in corruptions.iter().enumerate() {
        let mut e = entry(i);
        e.spiffe_id = id(&format!("/corrupt/{i}"));
        let created = store.create_entry(&e).await.unwrap();
        sqlx::query(*sql)
            .bind(&created.id)
            .execute(&mut conn)
            .await
            .unwrap();

        let fetched = store.fetch_entry(&created.id).await;
        assert!(
            matches!(fetched, Err(StoreError::Corrupt { .. })),
            "{what}: {fetched:?}"
        );
        let listed = store.list_entries(&EntryFilter::default()).await;
        assert!(
            matches!(listed, Err(StoreError::Corrupt { .. })),
            "{what}: {listed:?}"
        );
        sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(&created.id)
            .execute(&mut conn)
            .await
            .unwrap();
    }

    let created = store.create_entry(&entry(100)).await.unwrap();
    sqlx::query("UPDATE entries SET spiffe_id = 'garbage' WHERE id = $1")
        .bind(&created.id)
        .execute(&mut conn)
        .await
        .unwrap();
    let found = store.find_entries_by_selectors(&created.selectors).await;
    assert!(
        matches!(found, Err(StoreError::Corrupt { .. })),
        "{found:?}"
    );

    sqlx::query(
        "INSERT INTO agents VALUES ('spiffe://example.org/agent', 'x', 'x', 0, '[\"nocolon\"]', 0, 0, '', '')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let agents = store.list_agents().await;
    assert!(
        matches!(agents, Err(StoreError::Corrupt { .. })),
        "{agents:?}"
    );

    sqlx::query("INSERT INTO bundles VALUES ('spiffe://example.org', '{}', -1)")
        .execute(&mut conn)
        .await
        .unwrap();
    let bundle = store.fetch_bundle("spiffe://example.org").await;
    assert!(
        matches!(bundle, Err(StoreError::Corrupt { .. })),
        "{bundle:?}"
    );

    sqlx::query("INSERT INTO join_tokens VALUES ('t', 10, 'not json')")
        .execute(&mut conn)
        .await
        .unwrap();
    let token = store.consume_join_token("t", 0).await;
    assert!(
        matches!(token, Err(StoreError::Corrupt { .. })),
        "{token:?}"
    );
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    SqliteStore::open(&path).await.unwrap().close().await;
    let mut conn = raw_sqlite(&path).await;
    sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)")
        .execute(&mut conn)
        .await
        .unwrap();
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 999, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_concurrent_writers_wait_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db"))
        .await
        .unwrap();
    let writes = (0..16).map(|batch| {
        let store = store.clone();
        tokio::spawn(async move {
            let entries: Vec<RegistrationEntry> =
                (batch * 100..(batch + 1) * 100).map(entry).collect();
            store.create_entries(&entries).await
        })
    });
    for result in futures::future::join_all(writes).await {
        result.unwrap().unwrap();
    }
    assert_eq!(store.count_entries().await.unwrap(), 1_600);
}

#[tokio::test]
async fn sqlite_upgrades_a_version_1_database_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).await.unwrap();
    let entries: Vec<RegistrationEntry> = (0..5).map(entry).collect();
    store.create_entries(&entries).await.unwrap();
    let agent = AttestedAgent {
        spiffe_id: id("/writ/agent/join_token/old"),
        attestation_type: "join_token".into(),
        cert_serial: "4a:01".into(),
        cert_expires_at: 2_000_000_000,
        selectors: Vec::new(),
        banned: false,
        created_at: 1_700_000_000,
        cert_sha256: "ab".repeat(32),
        next_cert_sha256: String::new(),
    };
    store.create_agent(&agent).await.unwrap();
    store.close().await;
    // Turn it back into a database written before leases, the live sub-agent cap, agent
    // SVID fingerprints and the recorded trust domain existed (schema version 1).
    let mut conn = raw_sqlite(&path).await;
    for statement in [
        "DROP TABLE leases",
        "ALTER TABLE entries DROP COLUMN spawn_max_children",
        "ALTER TABLE agents DROP COLUMN cert_sha256",
        "ALTER TABLE agents DROP COLUMN next_cert_sha256",
        "DROP TABLE settings",
        "DROP TABLE template_issues",
        "ALTER TABLE entries DROP COLUMN spiffe_id_template",
        "DELETE FROM schema_migrations WHERE version IN (2, 3, 4, 5)",
    ] {
        sqlx::query(statement).execute(&mut conn).await.unwrap();
    }
    drop(conn);

    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.count_entries().await.unwrap(), 5, "entries kept");
    for old in &entries {
        let fetched = store.fetch_entry(&old.id).await.unwrap().unwrap();
        assert_eq!(fetched.spawn_max_children, None, "old rows have no cap");
        assert_eq!(
            fetched.spiffe_id_template, None,
            "old rows are no templates"
        );
    }
    // Version 5: template entries and the IDs they produced.
    let template =
        writ_identity::entry::template::IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}")
            .unwrap();
    let t = writ_identity::entry::RegistrationEntry::from_template(template, id("/agent"), vec![])
        .unwrap();
    let t = store.create_entry(&t).await.unwrap();
    assert_eq!(store.fetch_entry(&t.id).await.unwrap(), Some(t.clone()));
    store
        .record_template_issue(&t.id, &id("/agent"), &id("/ns/prod"), 5)
        .await
        .unwrap();
    assert_eq!(store.list_template_issues(&t.id).await.unwrap().len(), 1);
    let mut capped = store.fetch_entry(&entries[0].id).await.unwrap().unwrap();
    capped.spawn_max_children = Some(4);
    let capped = store.update_entry(&capped).await.unwrap();
    assert_eq!(
        store.fetch_entry(&capped.id).await.unwrap(),
        Some(capped),
        "the new column is writable"
    );
    let lease = writ_identity::store::LeaseRecord {
        id: "l1".into(),
        child_id: id("/planner/sub/t-1"),
        parent_id: id("/planner"),
        entry_id: entries[0].id.clone(),
        agent_id: id("/agent"),
        depth: 1,
        task: "t".into(),
        child_pid: 7,
        child_start_time: 9,
        created_at: 1,
        expires_at: 2,
        released_at: None,
    };
    store.create_lease(&lease).await.unwrap();
    assert_eq!(store.fetch_lease("l1").await.unwrap(), Some(lease));

    // An agent attested before fingerprints: its SVID is pinned at its next call, by
    // the serial the old record kept, and only then.
    let old = store.fetch_agent(&agent.spiffe_id).await.unwrap().unwrap();
    assert_eq!(
        (old.cert_sha256.as_str(), old.next_cert_sha256.as_str()),
        ("", "")
    );
    let pinned = "cd".repeat(32);
    assert!(
        !store
            .switch_agent_svid(&agent.spiffe_id, &pinned, "4a:02", 5)
            .await
            .unwrap()
    );
    assert!(
        store
            .switch_agent_svid(&agent.spiffe_id, &pinned, "4a:01", 5)
            .await
            .unwrap()
    );
    let fetched = store.fetch_agent(&agent.spiffe_id).await.unwrap().unwrap();
    assert_eq!(fetched.cert_sha256, pinned);
    assert_eq!(store.fetch_trust_domain().await.unwrap(), None);
    assert_eq!(
        store.record_trust_domain("example.org").await.unwrap(),
        "example.org"
    );
    store.close().await;
}

#[tokio::test]
async fn a_data_dir_keeps_its_trust_domain() {
    use writ_identity::server::{ServerError, ServerState, config::ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let open = |td: &str| {
        let config =
            ServerConfig::with_defaults(TrustDomain::new(td).unwrap(), dir.path()).unwrap();
        ServerState::open(config, Arc::new(writ_identity::clock::SystemClock))
    };
    drop(open("acme.test").await.unwrap());
    let err = open("other.test").await.expect_err("another trust domain");
    assert!(
        matches!(&err, ServerError::TrustDomainMismatch { recorded, configured }
            if recorded == "acme.test" && configured == "other.test"),
        "{err}"
    );
    drop(open("acme.test").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_fails_at_start() {
    use writ_identity::server::{ServerState, config::Datastore, config::ServerConfig};
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        ServerConfig::with_defaults(TrustDomain::new("example.org").unwrap(), dir.path()).unwrap();
    config.datastore = Datastore::Postgres(pg.url());
    let clock = Arc::new(writ_identity::clock::SystemClock);
    drop(
        ServerState::open(config.clone(), clock.clone())
            .await
            .unwrap(),
    );
    // The database turns read-only (a standby, a revoked grant...): the next start
    // fails at once, not at the first entry written.
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_read_only = on', \
         current_database()); END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);
    let err = ServerState::open(config, clock)
        .await
        .expect_err("a read-only store must fail at start");
    assert!(err.to_string().contains("read-only"), "{err}");
}

/// A tmpfs of a given size mounted on a temporary directory, unmounted on drop (also
/// when the test fails). Mounting needs root: without it the test is skipped with a
/// message, or fails under `WRIT_REQUIRE_ALL=1` (CI runs as root).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        if writ_tests::uid() != 0 {
            return writ_tests::skip("a tmpfs to fill", "mounting one needs root");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        if !out.status.success() {
            return writ_tests::skip(
                "a tmpfs to fill",
                format!("mount: {}", String::from_utf8_lossy(&out.stderr).trim()),
            );
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a connection the failed test left open): detach it lazily.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = [0xa5_u8; 4096];
    loop {
        match file.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = file.sync_all();
}

/// A write that fails on a full disk leaves no connection of the pool inside a
/// transaction: once space is freed, every write succeeds (before, each later write that
/// drew the failed write's connection failed with "attempted to call begin_with at
/// non-zero transaction depth" until a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_disk_fails_a_write_and_every_write_after_freeing_succeeds() {
    let Some(fs) = Tmpfs::mount("4m") else {
        return;
    };
    let store = SqliteStore::open(&fs.path().join("datastore.sqlite3"))
        .await
        .unwrap();
    for n in 0..10 {
        store.create_entry(&entry(n)).await.unwrap();
    }
    let filler = fs.path().join("filler");
    fill(&filler);
    // Writes that fit in pages SQLite already holds may still pass; one soon fails.
    let mut failed = None;
    for n in 1000..3000 {
        if let Err(e) = store.create_entry(&entry(n)).await {
            failed = Some(e);
            break;
        }
    }
    let failed = failed.expect("a write on the full disk fails");
    assert!(
        matches!(failed, StoreError::Database(_)),
        "a database error: {failed}"
    );
    std::fs::remove_file(&filler).unwrap();
    // More writes than the pool has connections, so every connection is drawn again.
    for n in 5000..5040 {
        if let Err(e) = store.create_entry(&entry(n)).await {
            panic!("write {n} after space was freed failed: {e}");
        }
    }
    let entries = store.list_entries(&EntryFilter::default()).await.unwrap();
    assert!(entries.iter().any(|e| e.spiffe_id == id("/workload/5039")));
    store.close().await;
}

/// PostgreSQL: a write that fails in its second statement, and one that fails at
/// `COMMIT` (a deferred constraint trigger), leave the pool clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failed_writes_leave_every_connection_clean() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let store = PostgresStore::connect(&pg.url()).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&pg.url()).await.unwrap();
    for sql in [
        "CREATE FUNCTION fail_write() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'simulated failure'; END $$",
        "CREATE TRIGGER fail_mid_write BEFORE INSERT ON entry_selectors FOR EACH ROW \
         WHEN (NEW.value = 'uid:4343') EXECUTE FUNCTION fail_write()",
        "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON entry_selectors \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
         WHEN (NEW.value = 'uid:4242') EXECUTE FUNCTION fail_write()",
    ] {
        sqlx::raw_sql(sql).execute(&mut conn).await.unwrap();
    }
    for n in [4343, 4242] {
        let err = store.create_entry(&entry(n)).await.unwrap_err();
        assert!(err.to_string().contains("simulated"), "{err}");
    }
    for n in 0..40 {
        store.create_entry(&entry(n)).await.unwrap();
    }
    assert_eq!(store.count_entries().await.unwrap(), 40);
    store.close().await;
}

/// A reader of another process's store (the token service reading leases) never creates,
/// migrates or writes it.
#[tokio::test]
async fn sqlite_read_only_never_creates_migrates_or_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Missing: an error, and still missing.
    assert!(SqliteStore::open_read_only(&path).await.is_err());
    assert!(!path.exists());
    // Created by something else but never migrated: refused, and left unmigrated.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let mut created = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("PRAGMA user_version = 0")
        .execute(&mut created)
        .await
        .unwrap();
    drop(created);
    let err = SqliteStore::open_read_only(&path).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 0, .. }),
        "{err:?}"
    );
    let mut conn = raw_sqlite(&path).await;
    let tables: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(tables, 0, "a read-only open created nothing");
    drop(conn);
    std::fs::remove_file(&path).unwrap();
    // Migrated by its owner: readable, not writable.
    let owner = SqliteStore::open(&path).await.unwrap();
    let created = owner.create_entry(&entry(1)).await.unwrap();
    let reader = SqliteStore::open_read_only(&path).await.unwrap();
    assert_eq!(
        reader.fetch_entry(&created.id).await.unwrap(),
        Some(created)
    );
    assert!(reader.create_entry(&entry(2)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_never_migrates_or_writes() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let err = PostgresStore::connect_read_only(&pg.url())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 0, .. }),
        "{err:?}"
    );
    let owner = PostgresStore::connect(&pg.url()).await.unwrap();
    let created = owner.create_entry(&entry(1)).await.unwrap();
    let reader = PostgresStore::connect_read_only(&pg.url()).await.unwrap();
    assert_eq!(
        reader.fetch_entry(&created.id).await.unwrap(),
        Some(created)
    );
    assert!(reader.create_entry(&entry(2)).await.is_err());
}

/// A SQLite store serves one server: while one process holds the store's lock, taking
/// it again is refused with the holder's pid; dropping it releases it.
#[tokio::test]
async fn sqlite_store_lock_keeps_a_second_server_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("store.db");
    let lock = writ_identity::store::sqlite::StoreLock::acquire(&path).unwrap();
    let err = writ_identity::store::sqlite::StoreLock::acquire(&path).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("pid {}", std::process::id())) && text.contains("PostgreSQL"),
        "{text}"
    );
    // The lock is not the store: the file still opens (read by tools, the TTS).
    SqliteStore::open(&path).await.unwrap();
    drop(lock);
    writ_identity::store::sqlite::StoreLock::acquire(&path).unwrap();
}

fn txn_key(kid: &str) -> TxnKeyRecord {
    TxnKeyRecord {
        kid: kid.into(),
        jwk: r#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}"#.into(),
        replica: "tts-1".into(),
        published_at: 1_000,
        expires_at: 4_000_000_000,
    }
}

/// A token service replica shares the identity server's SQLite store: it never creates
/// or migrates it, but may publish its keys (and a read-only reader may not).
#[tokio::test]
async fn sqlite_shared_never_creates_or_migrates_but_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    assert!(SqliteStore::open_shared(&path).await.is_err());
    assert!(!path.exists(), "a shared open creates no file");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    drop(
        sqlx::SqliteConnection::connect_with(&options)
            .await
            .unwrap(),
    );
    let err = SqliteStore::open_shared(&path).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 0, .. }),
        "{err:?}"
    );
    std::fs::remove_file(&path).unwrap();
    let owner = SqliteStore::open(&path).await.unwrap();
    let shared = SqliteStore::open_shared(&path).await.unwrap();
    shared.put_txn_key(&txn_key("k1")).await.unwrap();
    assert_eq!(owner.list_txn_keys(0).await.unwrap(), vec![txn_key("k1")]);
    let reader = SqliteStore::open_read_only(&path).await.unwrap();
    assert!(reader.put_txn_key(&txn_key("k2")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shared_never_migrates_but_writes() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let err = PostgresStore::connect_shared(&pg.url()).await.unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooOld { found: 0, .. }),
        "{err:?}"
    );
    let owner = PostgresStore::connect(&pg.url()).await.unwrap();
    let shared = PostgresStore::connect_shared(&pg.url()).await.unwrap();
    shared.put_txn_key(&txn_key("k1")).await.unwrap();
    assert_eq!(owner.list_txn_keys(0).await.unwrap(), vec![txn_key("k1")]);
    let reader = PostgresStore::connect_read_only(&pg.url()).await.unwrap();
    assert!(reader.put_txn_key(&txn_key("k2")).await.is_err());
}
