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
    join_token_from_row, journal_from_row,
};
use super::{
    AttestedAgent, BundleRecord, EntryFilter, JoinTokenRecord, JournalRecord, Store, StoreError,
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

/// Writes entries and their selectors, many rows per statement.
async fn insert_entries(
    conn: &mut SqliteConnection,
    entries: &[EntryParams<'_>],
) -> Result<(), StoreError> {
    for chunk in entries.chunks(schema::ENTRY_ROWS_PER_INSERT) {
        let mut query = sqlx::query(schema::insert_entries_sql(chunk.len())?);
        for params in chunk {
            query = bind_entry(query, params).bind(params.created_at);
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(schema::unique_violation_is("entry"))?;
    }
    insert_selectors(conn, entries).await
}

/// Writes the selector rows of entries already written.
async fn insert_selectors(
    conn: &mut SqliteConnection,
    entries: &[EntryParams<'_>],
) -> Result<(), StoreError> {
    let rows: Vec<_> = schema::selector_rows(entries).collect();
    for chunk in rows.chunks(schema::SELECTOR_ROWS_PER_INSERT) {
        let mut query = sqlx::query(schema::insert_selectors_sql(chunk.len())?);
        for (entry_id, count, selector) in chunk {
            query = query
                .bind(*entry_id)
                .bind(*count)
                .bind(selector.kind())
                .bind(selector.value());
        }
        query
            .execute(&mut *conn)
            .await
            .map_err(schema::unique_violation_is("entry"))?;
    }
    Ok(())
}

async fn fetch_entry_on(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<RegistrationEntry>, StoreError> {
    sqlx::query(schema::FETCH_ENTRY)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .as_ref()
        .map(entry_from_row)
        .transpose()
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let params = EntryParams::new(entry)?;
        let mut tx = self.begin_write().await?;
        insert_entries(&mut tx, std::slice::from_ref(&params)).await?;
        tx.commit().await?;
        Ok(params.created(entry))
    }

    async fn create_entries(&self, entries: &[RegistrationEntry]) -> Result<(), StoreError> {
        let params = entries
            .iter()
            .map(EntryParams::new)
            .collect::<Result<Vec<_>, _>>()?;
        let mut tx = self.begin_write().await?;
        insert_entries(&mut tx, &params).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        fetch_entry_on(&mut conn, id).await
    }

    async fn update_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError> {
        let params = EntryParams::new(entry)?;
        let mut tx = self.begin_write().await?;
        let done = bind_entry(sqlx::query(schema::UPDATE_ENTRY), &params)
            .bind(entry.revision)
            .execute(&mut *tx)
            .await
            .map_err(schema::unique_violation_is("entry"))?;
        if done.rows_affected() == 0 {
            let stored: Option<i64> = sqlx::query_scalar(schema::ENTRY_REVISION)
                .bind(params.id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(schema::not_updated(stored));
        }
        sqlx::query(schema::DELETE_ENTRY_SELECTORS)
            .bind(params.id)
            .execute(&mut *tx)
            .await?;
        insert_selectors(&mut tx, std::slice::from_ref(&params)).await?;
        let updated = fetch_entry_on(&mut tx, params.id)
            .await?
            .ok_or(StoreError::NotFound { kind: "entry" })?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry, StoreError> {
        let mut tx = self.begin_write().await?;
        let entry = fetch_entry_on(&mut tx, id)
            .await?
            .ok_or(StoreError::NotFound { kind: "entry" })?;
        sqlx::query(schema::DELETE_ENTRY)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(entry)
    }

    async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let query = match (&filter.spiffe_id, &filter.parent_id) {
            (None, None) => sqlx::query(schema::LIST_ENTRIES),
            (Some(id), None) => sqlx::query(schema::LIST_ENTRIES_BY_SPIFFE_ID).bind(id.as_str()),
            (None, Some(parent)) => {
                sqlx::query(schema::LIST_ENTRIES_BY_PARENT_ID).bind(parent.as_str())
            }
            (Some(id), Some(parent)) => sqlx::query(schema::LIST_ENTRIES_BY_BOTH)
                .bind(id.as_str())
                .bind(parent.as_str()),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn find_entries_by_selectors(
        &self,
        selectors: &[Selector],
    ) -> Result<Vec<RegistrationEntry>, StoreError> {
        let Some(selectors) = schema::lookup_selectors(selectors)? else {
            return Ok(Vec::new());
        };
        let mut query = sqlx::query(schema::find_by_selectors_sql(selectors.len())?);
        for selector in selectors {
            query = query.bind(selector.kind()).bind(selector.value());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn count_entries(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(schema::COUNT_ENTRIES)
            .fetch_one(&self.pool)
            .await?;
        schema::count_from_i64(count)
    }

    async fn create_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
        sqlx::query(schema::INSERT_AGENT)
            .bind(agent.spiffe_id.as_str())
            .bind(agent.attestation_type.as_str())
            .bind(agent.cert_serial.as_str())
            .bind(agent.cert_expires_at)
            .bind(schema::selectors_json(&agent.selectors)?)
            .bind(agent.banned)
            .bind(agent.created_at)
            .execute(&self.pool)
            .await
            .map_err(schema::unique_violation_is("agent"))?;
        Ok(())
    }

    async fn fetch_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, StoreError> {
        sqlx::query(schema::FETCH_AGENT)
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(agent_from_row)
            .transpose()
    }

    async fn update_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError> {
        let done = sqlx::query(schema::UPDATE_AGENT)
            .bind(agent.spiffe_id.as_str())
            .bind(agent.attestation_type.as_str())
            .bind(agent.cert_serial.as_str())
            .bind(agent.cert_expires_at)
            .bind(schema::selectors_json(&agent.selectors)?)
            .bind(agent.banned)
            .bind(agent.created_at)
            .execute(&self.pool)
            .await?;
        schema::expect_one(done.rows_affected(), "agent")
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<(), StoreError> {
        let done = sqlx::query(schema::DELETE_AGENT)
            .bind(id.as_str())
            .execute(&self.pool)
            .await?;
        schema::expect_one(done.rows_affected(), "agent")
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, StoreError> {
        let rows = sqlx::query(schema::LIST_AGENTS)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        sqlx::query(schema::INSERT_JOIN_TOKEN)
            .bind(token.token_hash.as_str())
            .bind(token.expires_at)
            .bind(schema::selectors_json(&token.selectors)?)
            .execute(&self.pool)
            .await
            .map_err(schema::unique_violation_is("join token"))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinTokenRecord, StoreError> {
        let row = sqlx::query(schema::CONSUME_JOIN_TOKEN)
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound { kind: "join token" })?;
        schema::unexpired(join_token_from_row(&row)?, now)
    }

    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(schema::PRUNE_JOIN_TOKENS)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn put_bundle(&self, bundle: &BundleRecord) -> Result<(), StoreError> {
        sqlx::query(schema::PUT_BUNDLE)
            .bind(bundle.trust_domain_id.as_str())
            .bind(bundle.document.as_str())
            .bind(schema::to_i64(bundle.sequence, "bundle sequence")?)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn fetch_bundle(
        &self,
        trust_domain_id: &str,
    ) -> Result<Option<BundleRecord>, StoreError> {
        sqlx::query(schema::FETCH_BUNDLE)
            .bind(trust_domain_id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(bundle_from_row)
            .transpose()
    }

    async fn list_bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        let rows = sqlx::query(schema::LIST_BUNDLES)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(bundle_from_row).collect()
    }

    async fn delete_bundle(&self, trust_domain_id: &str) -> Result<(), StoreError> {
        let done = sqlx::query(schema::DELETE_BUNDLE)
            .bind(trust_domain_id)
            .execute(&self.pool)
            .await?;
        schema::expect_one(done.rows_affected(), "bundle")
    }

    async fn put_journal(&self, record: &JournalRecord) -> Result<(), StoreError> {
        sqlx::query(schema::PUT_JOURNAL)
            .bind(record.id.as_str())
            .bind(record.kind.as_str())
            .bind(record.payload.as_str())
            .bind(record.updated_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_journal(&self) -> Result<Vec<JournalRecord>, StoreError> {
        let rows = sqlx::query(schema::LIST_JOURNAL)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(journal_from_row).collect()
    }

    async fn delete_journal(&self, id: &str) -> Result<(), StoreError> {
        let done = sqlx::query(schema::DELETE_JOURNAL)
            .bind(id)
            .execute(&self.pool)
            .await?;
        schema::expect_one(done.rows_affected(), "journal record")
    }
}
