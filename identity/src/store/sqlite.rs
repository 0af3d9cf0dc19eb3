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
    join_token_from_row, journal_from_row, lease_from_row,
};
use super::{
    AttestedAgent, BundleRecord, EntryFilter, JoinTokenRecord, JournalRecord, LeaseRecord, Store,
    StoreError,
};
use crate::entry::RegistrationEntry;
use crate::selector::Selector;
use crate::spiffe_id::SpiffeId;

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
            .max_connections(MAX_CONNECTIONS)
            // A local file needs no liveness ping before each use; the ping is a round
            // trip to the connection's worker thread on every query.
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Self::start(pool).await
    }

    /// A store in memory, gone when dropped: for tests and throw-away runs. The pool
    /// holds exactly one connection, which never expires, so every query sees the same
    /// database.
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
        Ok(Self { pool })
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
