//! The embedded store: one SQLite file in WAL mode, the default of `writ dev` and of a
//! single server.
//!
//! Writes take SQLite's write lock up front (`BEGIN IMMEDIATE`), so concurrent writers
//! wait for each other (up to the busy timeout) instead of failing part way; readers are
//! never blocked (WAL).

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::schema::{
    self, EntryParams, agent_from_row, bind_entry, bundle_from_row, entry_from_row,
    federation_from_row, join_token_from_row, journal_from_row, lease_from_row,
    template_issue_from_row, txn_key_from_row,
};
use super::{
    AttestedAgent, BundleRecord, EntryFilter, FederationRecord, JoinTokenRecord, JournalRecord,
    LeaseRecord, Store, StoreChange, StoreError, TemplateIssue, TxnKeyRecord,
};
use crate::entry::RegistrationEntry;
use crate::selector::Selector;
use crate::spiffe_id::SpiffeId;

/// What an audit append runs first to hold the chain head: nothing more, as every write
/// begins with `BEGIN IMMEDIATE`, which already holds SQLite's one write lock.
const AUDIT_LOCK: Option<&str> = None;

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections of a file-backed store (writes still go one at a time).
const MAX_CONNECTIONS: u32 = 8;
/// Prepared statements kept per connection: room for every generated lookup and
/// selector insert as well as the fixed statements.
const STATEMENT_CACHE: usize = 256;
/// SQLite's page cache per connection, in KiB (`PRAGMA cache_size` takes a negative
/// number for KiB). The default 2 MiB makes a store of a million entries read most index
/// pages from the OS for every lookup.
const PAGE_CACHE_KIB: i64 = 64 * 1024;

/// A [`Store`] in a SQLite database.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One server writes a SQLite store, so its changes are announced in process.
    changes: tokio::sync::broadcast::Sender<StoreChange>,
}

impl SqliteStore {
    /// Opens the database at `path`, creating it (and its directory) if missing, and
    /// brings its schema up to date. A new directory is made `0700` and a new file `0600`;
    /// existing ones are left as they are. The database runs in WAL mode with
    /// `synchronous = NORMAL`, foreign keys on and a 5 second busy timeout.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the file cannot be created or opened or a migration
    /// fails; [`StoreError::SchemaTooNew`] for a database written by a newer build.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_connections(path, MAX_CONNECTIONS).await
    }

    /// As [`Self::open`], with a pool of `connections` connections (tests use one, so
    /// that every write reuses the connection of the one before).
    ///
    /// # Errors
    /// As [`Self::open`].
    #[cfg(any(test, feature = "test-util"))]
    pub async fn open_with_pool_size(path: &Path, connections: u32) -> Result<Self, StoreError> {
        Self::open_with_connections(path, connections).await
    }

    async fn open_with_connections(path: &Path, connections: u32) -> Result<Self, StoreError> {
        create_private_file(path).await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", format!("-{PAGE_CACHE_KIB}"))
            .pragma("temp_store", "memory")
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = SqlitePoolOptions::new()
            .max_connections(connections)
            // A local file needs no liveness ping before each use; the ping is a round
            // trip to the connection's worker thread on every query.
            .test_before_acquire(false)
            // A connection a failed write left inside a transaction is replaced.
            .after_release(super::sql::release_clean)
            .connect_with(options)
            .await?;
        Self::start(pool).await
    }

    /// Opens an existing database at `path` for reading only: no file or directory is
    /// created, nothing is migrated, and every write fails. What a reader of another
    /// process's store (the token service reading leases) opens with.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the file is missing or unreadable;
    /// [`StoreError::SchemaTooOld`] if its writer has not migrated it to this build's
    /// schema; [`StoreError::SchemaTooNew`].
    pub async fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .read_only(true)
            .busy_timeout(BUSY_TIMEOUT)
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        schema::check_sqlite(&pool).await?;
        Ok(Self::with_pool(pool))
    }

    /// Opens an existing database at `path` as a process that shares it with the
    /// identity server without owning its schema (a token service replica publishing
    /// its public keys): no file or directory is created, nothing is migrated, the
    /// schema must be current, writes are allowed (they wait for the server's, up to the
    /// busy timeout).
    ///
    /// # Errors
    /// [`StoreError::Database`] if the file is missing or cannot be opened for writing;
    /// [`StoreError::SchemaTooOld`] if its writer has not migrated it to this build's
    /// schema; [`StoreError::SchemaTooNew`].
    pub async fn open_shared(path: &Path) -> Result<Self, StoreError> {
        // Commits as the server's own connections do (WAL, `synchronous = NORMAL`), not
        // SQLite's default `FULL`, which syncs the log on every commit.
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(false)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .test_before_acquire(false)
            .after_release(super::sql::release_clean)
            .connect_with(options)
            .await?;
        schema::check_sqlite(&pool).await?;
        Ok(Self::with_pool(pool))
    }

    /// A store in memory, gone when dropped: for tests and throw-away runs. The pool
    /// holds exactly one connection, which never expires, so every query sees the same
    /// database (and which, unlike a file store's, is never replaced: a write that fails
    /// on a full disk can leave this one unusable).
    ///
    /// # Errors
    /// [`StoreError::Database`] if SQLite cannot start.
    pub async fn open_in_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .foreign_keys(true)
            .statement_cache_capacity(STATEMENT_CACHE);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Self::start(pool).await
    }

    async fn start(pool: SqlitePool) -> Result<Self, StoreError> {
        schema::migrate_sqlite(&pool).await?;
        Ok(Self::with_pool(pool))
    }

    fn with_pool(pool: SqlitePool) -> Self {
        Self {
            pool,
            changes: tokio::sync::broadcast::channel(super::CHANGE_BACKLOG).0,
        }
    }

    /// Announces a committed change to this process's subscribers.
    fn changed(&self, change: StoreChange) {
        // No subscriber is not an error.
        let _ = self.changes.send(change);
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreChange> {
        self.changes.subscribe()
    }

    /// Closes every connection, waiting for queries in flight. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// SQLite's query plan (the `detail` column of `EXPLAIN QUERY PLAN`) for the exact
    /// statement [`Store::find_entries_by_selectors`] runs for `selectors`; empty for an
    /// empty list.
    ///
    /// # Errors
    /// As [`Store::find_entries_by_selectors`].
    #[cfg(any(test, feature = "test-util"))]
    pub async fn explain_lookup(&self, selectors: &[Selector]) -> Result<Vec<String>, StoreError> {
        use sqlx::Row;
        let Some(selectors) = schema::lookup_selectors(selectors)? else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "EXPLAIN QUERY PLAN {}",
            schema::find_by_selectors_sql(selectors.len())?
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for selector in selectors {
            query = query.bind(selector.kind()).bind(selector.value());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("detail").map_err(StoreError::from))
            .collect()
    }

    /// A transaction holding SQLite's write lock from its first statement.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// An exclusive lock on `<database>.lock`, held by the process that serves a SQLite
/// store (`writ server run`, `writ dev`) until it is dropped: a SQLite store serves one
/// server, and a second one on the same file is refused instead of two CAs writing one
/// journal. Taken by the process, not by [`SqliteStore`], so that a server dropped and
/// opened again within one process (tests) never finds its own lock.
#[derive(Debug)]
pub struct StoreLock {
    _file: std::fs::File,
}

impl StoreLock {
    /// Takes the lock of the database at `path`, writing this process's id into it.
    ///
    /// # Errors
    /// [`StoreError::Locked`] naming the holder's pid, or why the file cannot be locked.
    pub fn acquire(path: &Path) -> Result<Self, StoreError> {
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = std::path::PathBuf::from(lock_path);
        let io = |e: std::io::Error| StoreError::Locked {
            path: lock_path.clone(),
            holder: format!("nobody, but it cannot be locked: {e}"),
        };
        // A new directory is made private; an existing one is left as it is (`writ dev`'s
        // is 0711 on purpose).
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            crate::key_manager::create_private_dir(dir).map_err(io)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = writ_spiffe::process::read_bounded(&lock_path, 64).unwrap_or_default();
                let holder = String::from_utf8_lossy(&holder).trim().to_owned();
                return Err(StoreError::Locked {
                    path: lock_path.clone(),
                    holder: if holder.is_empty() {
                        "another process".to_owned()
                    } else {
                        format!("pid {holder}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        use std::io::Write as _;
        file.set_len(0).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// Creates the database's directory (`0700`) and an empty database file (`0600`) when
/// they do not exist yet, so that SQLite never creates them with the umask's looser
/// modes. SQLite gives its `-wal` and `-shm` files the database file's mode.
async fn create_private_file(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !tokio::fs::try_exists(dir).await.map_err(sqlx::Error::Io)?
    {
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .await
            .map_err(sqlx::Error::Io)?;
    }
    match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(sqlx::Error::Io(e).into()),
    }
}

super::sql::sql_store!(SqliteStore, SqliteConnection);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> RegistrationEntry {
        let id = |path: &str| SpiffeId::new(&format!("spiffe://example.org{path}")).unwrap();
        RegistrationEntry::new(
            id(&format!("/w/{n}")),
            id("/writ/agent/a"),
            vec![format!("unix:uid:{n}").parse().unwrap()],
        )
    }

    /// SQLite ends the whole transaction by itself on some failures (a full disk, an I/O
    /// error); `RAISE(ROLLBACK)` in a trigger does the same, here in the second statement
    /// of a write. On a pool of one connection, every later write reuses that connection.
    #[tokio::test]
    async fn a_write_sqlite_rolled_back_itself_leaves_the_store_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with_pool_size(&dir.path().join("db"), 1)
            .await
            .unwrap();
        sqlx::query(
            "CREATE TRIGGER fail_like_a_full_disk BEFORE INSERT ON entry_selectors \
             WHEN NEW.value = 'uid:4242' \
             BEGIN SELECT RAISE(ROLLBACK, 'database or disk is full (simulated)'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let failed = entry(4242);
        let err = store.create_entry(&failed).await.unwrap_err();
        assert!(err.to_string().contains("simulated"), "{err}");
        for n in 0..5 {
            let created = store.create_entry(&entry(n)).await.unwrap();
            let mut changed = created.clone();
            changed.hint = "changed".into();
            store.update_entry(&changed).await.unwrap();
        }
        let gone = store.create_entry(&entry(99)).await.unwrap();
        store.delete_entry(&gone.id).await.unwrap();
        assert_eq!(store.count_entries().await.unwrap(), 5);
        assert_eq!(store.fetch_entry(&failed.id).await.unwrap(), None);
    }

    /// A statement that fails inside a transaction SQLite keeps open (`RAISE(ABORT)`,
    /// as a constraint violation, after a first statement): the rollback runs and the connection is clean.
    /// (This one held before the `after_release` check too; it guards the common path.)
    #[tokio::test]
    async fn a_write_refused_mid_transaction_leaves_the_store_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_with_pool_size(&dir.path().join("db"), 1)
            .await
            .unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_a_selector BEFORE INSERT ON entry_selectors \
             WHEN NEW.value = 'uid:3' BEGIN SELECT RAISE(ABORT, 'refused (simulated)'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        store.create_entry(&entry(1)).await.unwrap();
        // The entry row goes in; its selector row is then refused.
        let err = store.create_entry(&entry(3)).await.unwrap_err();
        assert!(err.to_string().contains("simulated"), "{err}");
        for n in 4..8 {
            store.create_entry(&entry(n)).await.unwrap();
        }
        assert_eq!(
            store.count_entries().await.unwrap(),
            5,
            "entry 3 rolled back"
        );
    }

    /// A token service sharing the server's file commits as the server does (WAL,
    /// `synchronous = NORMAL`): SQLite's default `FULL` syncs the log on every commit,
    /// which held the durable audit trail to about three quarters of its rate.
    #[tokio::test]
    async fn a_shared_store_commits_with_the_servers_durability() {
        use sqlx::Row;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let owner = SqliteStore::open(&path).await.unwrap();
        let shared = SqliteStore::open_shared(&path).await.unwrap();
        for store in [&owner, &shared] {
            let mut tx = store.begin_write().await.unwrap();
            let synchronous = sqlx::query("PRAGMA synchronous")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(synchronous.get::<i64, _>(0), 1, "synchronous = NORMAL");
            let mode = sqlx::query("PRAGMA journal_mode")
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            assert_eq!(mode.get::<String, _>(0), "wal");
            tx.rollback().await.unwrap();
        }
    }

    /// Beyond `MAX_IN_FORCE` revocations in force, another is refused; once some lapse
    /// and are pruned, revoking works again.
    #[tokio::test]
    async fn revocations_in_force_are_bounded() {
        use crate::store::revocation::{MAX_IN_FORCE, NewRevocation};
        use writ_spiffe::revocation::Target;
        let store = SqliteStore::open_in_memory().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO revocations (kind, value, spiffe_id, subtree, revoked_at, lapses_at, \
             reason, revoked_by) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 \
             FROM n WHERE i < {MAX_IN_FORCE}) SELECT 'txn', 'bulk-' || i, '', 0, 10, \
             CASE WHEN i = 1 THEN 15 ELSE 20 END, NULL, 'bulk' FROM n"
        )))
        .execute(&store.pool)
        .await
        .unwrap();
        let new = |revoked_at: i64| NewRevocation {
            target: Target::Txn {
                txn: "one more".into(),
            },
            revoked_at,
            lapses_at: 100,
            reason: None,
            revoked_by: "test".into(),
        };
        let err = store.insert_revocation(&new(11)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::TooMany { max, .. } if max == MAX_IN_FORCE),
            "{err}"
        );
        // At 15 the first has lapsed: room for one.
        let made = store.insert_revocation(&new(15)).await.unwrap();
        assert!(made.seq > MAX_IN_FORCE as u64);
        assert_eq!(
            store.prune_revocations(20).await.unwrap(),
            MAX_IN_FORCE as u64
        );
    }
}
