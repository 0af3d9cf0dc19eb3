//! The shared store: one PostgreSQL database that many servers use at once.
//!
//! Every write is one statement or one transaction, and conflicting writers are
//! serialized by row locks and unique constraints: an entry update is a conditional
//! `UPDATE ... WHERE revision = $n`, a join token is consumed by `DELETE ... RETURNING`,
//! so two servers can never both succeed where only one may.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};

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

/// Connections per server.
const MAX_CONNECTIONS: u32 = 16;

/// What an audit append runs first to hold the chain head: a transaction-scoped
/// advisory lock (key `"writ_aud"` in ASCII), so that appends of every server and token
/// service replica on the database take turns and the chain never forks.
const AUDIT_LOCK: Option<&str> = Some("SELECT pg_advisory_xact_lock(8607057786395784548)");
/// How long a caller waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A [`Store`] in a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    changes: tokio::sync::broadcast::Sender<StoreChange>,
    /// Lives as long as some clone of the store: the change listener stops when it goes.
    alive: Arc<()>,
    /// Whether the change listener was started (at the first subscription).
    listening: Arc<std::sync::Once>,
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
        let pool = writer_pool(url).await?;
        schema::migrate_postgres(&pool).await?;
        Ok(Self::with_pool(pool))
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
        Ok(Self::with_pool(pool))
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
        let pool = writer_pool(url).await?;
        schema::check_postgres(&pool).await?;
        Ok(Self::with_pool(pool))
    }

    /// Closes every connection, waiting for queries in flight. Later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn with_pool(pool: PgPool) -> Self {
        Self {
            pool,
            changes: tokio::sync::broadcast::channel(super::CHANGE_BACKLOG).0,
            alive: Arc::new(()),
            listening: Arc::new(std::sync::Once::new()),
        }
    }

    /// Changes reach subscribers through the database's notifications (the schema's
    /// triggers announce every committed row change, whoever wrote it), this server's
    /// own included, so nothing is announced in process.
    fn changed(&self, _change: StoreChange) {}

    /// Subscribes to the change listener, starting it at the first call.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<StoreChange> {
        let rx = self.changes.subscribe();
        self.listening.call_once(|| {
            tokio::spawn(listen(
                self.pool.clone(),
                self.changes.clone(),
                Arc::downgrade(&self.alive),
            ));
        });
        rx
    }

    /// A transaction for a write of several statements.
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

/// A pool of connections that may write: a connection a failed write left inside a
/// transaction is replaced, not reused.
async fn writer_pool(url: &str) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_release(super::sql::release_clean)
        .connect(url)
        .await?)
}

/// How often the listener looks whether its store is gone, and the longest it waits
/// between reconnection attempts.
const LISTEN_TICK: Duration = Duration::from_secs(1);

/// Follows the database's change notifications until the store is dropped. Once
/// listening (first, and again after a lost connection) it announces
/// [`StoreChange::Resync`]: notifications sent before that are lost.
async fn listen(
    pool: PgPool,
    tx: tokio::sync::broadcast::Sender<StoreChange>,
    alive: std::sync::Weak<()>,
) {
    let mut first = true;
    let mut backoff = Duration::from_millis(50);
    while alive.strong_count() > 0 {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(mut l) => match l.listen(schema::CHANGES_CHANNEL).await {
                Ok(()) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "store change listener: LISTEN failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(LISTEN_TICK);
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "store change listener: cannot connect; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(LISTEN_TICK);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // Whatever was committed before this LISTEN took effect went unannounced: at a
        // reconnection, and also at the first connection, which a subscriber (the entry
        // cache reading the store at start) may have raced.
        if !first {
            tracing::info!("store change listener reconnected; re-reading everything");
        }
        let _ = tx.send(StoreChange::Resync);
        first = false;
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => {
                        if let Some(change) = StoreChange::from_payload(n.payload()) {
                            let _ = tx.send(change);
                        }
                    }
                    // The connection was lost: listen again on a new one.
                    Ok(None) | Err(_) => break,
                },
                () = tokio::time::sleep(LISTEN_TICK) => {
                    if alive.strong_count() == 0 {
                        return;
                    }
                }
            }
        }
    }
}

super::sql::sql_store!(PostgresStore, PgConnection);
