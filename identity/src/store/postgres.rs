//! The shared store: one PostgreSQL database that many servers use at once.
//!
//! Every write is one statement or one transaction, and conflicting writers are
//! serialized by row locks and unique constraints: an entry update is a conditional
//! `UPDATE ... WHERE revision = $n`, a join token is consumed by `DELETE ... RETURNING`,
//! so two servers can never both succeed where only one may.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

use super::schema::{
    self, EntryParams, agent_from_row, bind_entry, bundle_from_row, entry_from_row,
    join_token_from_row, journal_from_row, lease_from_row, template_issue_from_row,
    txn_key_from_row,
};
use super::{
    AttestedAgent, BundleRecord, EntryFilter, JoinTokenRecord, JournalRecord, LeaseRecord, Store,
    StoreError, TemplateIssue, TxnKeyRecord,
};
use crate::entry::RegistrationEntry;
use crate::selector::Selector;
use crate::spiffe_id::SpiffeId;

/// Connections per server.
const MAX_CONNECTIONS: u32 = 16;
/// How long a caller waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Store`] in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db`) and
    /// brings its schema up to date. Servers that start at the same time on one database
    /// migrate one after another, under a PostgreSQL advisory lock.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the server cannot be reached or a migration fails;
    /// [`StoreError::SchemaTooNew`] for a database migrated by a newer build.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // A connection a failed write left inside a transaction is replaced.
            .after_release(super::sql::release_clean)
            .connect(url)
            .await?;
        schema::migrate_postgres(&pool).await?;
        Ok(Self { pool })
    }

    /// Connects to the database at `url` for reading only: nothing is migrated and every
    /// session is `default_transaction_read_only`, so every write fails. What a reader
    /// of the identity server's store (the token service reading leases) connects with.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the server cannot be reached;
    /// [`StoreError::SchemaTooOld`] if the identity server has not migrated the database
    /// to this build's schema; [`StoreError::SchemaTooNew`].
    pub async fn connect_read_only(url: &str) -> Result<Self, StoreError> {
        let options = url
            .parse::<PgConnectOptions>()?
            .options([("default_transaction_read_only", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        schema::check_postgres(&pool).await?;
        Ok(Self { pool })
    }

    /// Connects to the database at `url` as a process that shares the identity server's
    /// database without owning its schema (a token service replica publishing its
    /// public keys): nothing is migrated, the schema must be current, writes are
    /// allowed.
    ///
    /// # Errors
    /// [`StoreError::Database`] if the server cannot be reached;
    /// [`StoreError::SchemaTooOld`] if the identity server has not migrated the database
    /// to this build's schema; [`StoreError::SchemaTooNew`].
    pub async fn connect_shared(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_release(super::sql::release_clean)
            .connect(url)
            .await?;
        schema::check_postgres(&pool).await?;
        Ok(Self { pool })
    }

    /// Closes every connection, waiting for queries in flight. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// A transaction for a write of several statements.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

super::sql::sql_store!(PostgresStore, PgConnection);
