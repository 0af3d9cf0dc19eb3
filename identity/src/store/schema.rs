//! How the store lays its data out in SQL: the tables of both backends, the migration
//! runner that creates them, the statements both backends share, and the mapping between
//! rows and Rust values.
//!
//! The statements are written with `$1`-style placeholders, which PostgreSQL requires
//! and SQLite also accepts (as numbered parameters), so one text serves both backends.
//!
//! Every value read back from the database is parsed again (`SpiffeId::new`, selector
//! parsing, JSON); a value that does not parse gives [`StoreError::Corrupt`], never a
//! panic.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};
use sqlx::{ColumnIndex, Decode, PgPool, Row, SqlitePool, Type};

use super::{
    AttestedAgent, BundleRecord, FederationRecord, JoinTokenRecord, JournalRecord, LeaseRecord,
    StoreError, TemplateIssue, TxnKeyRecord,
};
use crate::entry::RegistrationEntry;
use crate::entry::template::IdTemplate;
use crate::selector::{MAX_SELECTORS, Selector};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// One schema version: statements applied together, in order, in one transaction.
#[derive(Debug)]
pub(super) struct Migration {
    /// Recorded in `schema_migrations.version` once applied.
    pub version: i64,
    /// The DDL, one statement per item.
    pub statements: &'static [&'static str],
}

/// The bookkeeping table, the same text on both backends.
const CREATE_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
     version BIGINT PRIMARY KEY NOT NULL, \
     applied_at BIGINT NOT NULL)";

/// SQLite migrations, oldest first.
pub(super) const SQLITE_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        statements: &[
            "CREATE TABLE entries (
            id TEXT PRIMARY KEY NOT NULL,
            spiffe_id TEXT NOT NULL,
            parent_id TEXT NOT NULL,
            identity_key TEXT NOT NULL UNIQUE,
            selector_count INTEGER NOT NULL,
            x509_svid_ttl INTEGER NOT NULL,
            jwt_svid_ttl INTEGER NOT NULL,
            dns_names TEXT NOT NULL,
            federates_with TEXT NOT NULL,
            admin BOOLEAN NOT NULL,
            downstream BOOLEAN NOT NULL,
            expires_at INTEGER,
            hint TEXT NOT NULL,
            revision INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            spawn_max_ttl INTEGER,
            spawn_max_depth INTEGER
        )",
            "CREATE INDEX entries_spiffe_id ON entries (spiffe_id)",
            "CREATE INDEX entries_parent_id ON entries (parent_id)",
            // `selector_count` repeats the entry's own so that the subset lookup is answered
            // from this table's index alone (see `FIND_BY_SELECTORS`).
            "CREATE TABLE entry_selectors (
            entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            type TEXT NOT NULL,
            value TEXT NOT NULL,
            selector_count INTEGER NOT NULL,
            PRIMARY KEY (entry_id, type, value)
        ) WITHOUT ROWID",
            "CREATE INDEX entry_selectors_type_value \
         ON entry_selectors (type, value, entry_id, selector_count)",
            "CREATE TABLE agents (
            spiffe_id TEXT PRIMARY KEY NOT NULL,
            attestation_type TEXT NOT NULL,
            cert_serial TEXT NOT NULL,
            cert_expires_at INTEGER NOT NULL,
            selectors TEXT NOT NULL,
            banned BOOLEAN NOT NULL,
            created_at INTEGER NOT NULL
        )",
            "CREATE TABLE join_tokens (
            token_hash TEXT PRIMARY KEY NOT NULL,
            expires_at INTEGER NOT NULL,
            selectors TEXT NOT NULL
        )",
            "CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at)",
            "CREATE TABLE bundles (
            trust_domain_id TEXT PRIMARY KEY NOT NULL,
            document TEXT NOT NULL,
            sequence INTEGER NOT NULL
        )",
            "CREATE TABLE ca_journal (
            id TEXT PRIMARY KEY NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            updated_at INTEGER NOT NULL
        )",
        ],
    },
    Migration {
        version: 2,
        statements: &[
            "CREATE TABLE leases (
            id TEXT PRIMARY KEY NOT NULL,
            child_id TEXT NOT NULL UNIQUE,
            parent_id TEXT NOT NULL,
            entry_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            depth INTEGER NOT NULL,
            task TEXT NOT NULL,
            child_pid INTEGER NOT NULL,
            child_start_time INTEGER NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            released_at INTEGER
        )",
            "CREATE INDEX leases_parent ON leases (parent_id, created_at)",
        ],
    },
    Migration {
        version: 3,
        statements: &["ALTER TABLE entries ADD COLUMN spawn_max_children INTEGER"],
    },
    Migration {
        version: 4,
        statements: &[
            "ALTER TABLE agents ADD COLUMN cert_sha256 TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE agents ADD COLUMN next_cert_sha256 TEXT NOT NULL DEFAULT ''",
            "CREATE TABLE settings (
            name TEXT PRIMARY KEY NOT NULL,
            value TEXT NOT NULL
        )",
        ],
    },
    Migration {
        version: 5,
        statements: &[
            "ALTER TABLE entries ADD COLUMN spiffe_id_template TEXT",
            "CREATE TABLE template_issues (
            entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            agent_id TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            first_issued_at INTEGER NOT NULL,
            last_issued_at INTEGER NOT NULL,
            PRIMARY KEY (entry_id, agent_id, spiffe_id)
        ) WITHOUT ROWID",
        ],
    },
    // PostgreSQL's version 6 adds change notifications; a SQLite store has one server,
    // which announces its own changes in process. The version keeps the two in step.
    Migration {
        version: 6,
        statements: &[],
    },
    Migration {
        version: 7,
        statements: &[
            "CREATE TABLE txn_keys (
            kid TEXT PRIMARY KEY NOT NULL,
            jwk TEXT NOT NULL,
            replica TEXT NOT NULL,
            published_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL
        )",
            "CREATE INDEX txn_keys_expires_at ON txn_keys (expires_at)",
        ],
    },
    Migration {
        version: 8,
        statements: &["CREATE TABLE federations (
            trust_domain_id TEXT PRIMARY KEY NOT NULL,
            bundle_endpoint_url TEXT NOT NULL,
            profile TEXT NOT NULL,
            endpoint_spiffe_id TEXT NOT NULL,
            web_ca_pem TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            last_refresh_at INTEGER,
            last_error TEXT,
            next_refresh_at INTEGER
        )"],
    },
    Migration {
        version: 9,
        statements: &[
            "CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY NOT NULL,
            at_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            decision TEXT NOT NULL,
            txn TEXT NOT NULL,
            sub TEXT NOT NULL,
            caller TEXT NOT NULL,
            service TEXT NOT NULL,
            lease TEXT NOT NULL,
            record TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )",
            "CREATE INDEX audit_events_txn ON audit_events (txn, seq)",
            "CREATE INDEX audit_events_at_ms ON audit_events (at_ms)",
            "CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
            pruned_seq INTEGER NOT NULL,
            pruned_hash TEXT NOT NULL,
            head_seq INTEGER NOT NULL,
            head_hash TEXT NOT NULL
        )",
            "INSERT INTO audit_anchor (id, pruned_seq, pruned_hash, head_seq, head_hash) \
             VALUES (1, 0, '', 0, '')",
        ],
    },
    // The kill switch (`store::revocation`). AUTOINCREMENT: a seq is never reused, even
    // after the highest row is pruned.
    Migration {
        version: 10,
        statements: &[
            "CREATE TABLE revocations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            subtree BOOLEAN NOT NULL,
            revoked_at INTEGER NOT NULL,
            lapses_at INTEGER NOT NULL,
            reason TEXT,
            revoked_by TEXT NOT NULL
        )",
            "CREATE INDEX revocations_lapses_at ON revocations (lapses_at)",
        ],
    },
];

/// PostgreSQL migrations, oldest first. Keys use the `C` collation so that `ORDER BY`
/// is byte order, as in SQLite, whatever the database's default locale.
pub(super) const POSTGRES_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        statements: &[
            r#"CREATE TABLE entries (
            id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            spiffe_id TEXT COLLATE "C" NOT NULL,
            parent_id TEXT COLLATE "C" NOT NULL,
            identity_key TEXT NOT NULL UNIQUE,
            selector_count BIGINT NOT NULL,
            x509_svid_ttl BIGINT NOT NULL,
            jwt_svid_ttl BIGINT NOT NULL,
            dns_names TEXT NOT NULL,
            federates_with TEXT NOT NULL,
            admin BOOLEAN NOT NULL,
            downstream BOOLEAN NOT NULL,
            expires_at BIGINT,
            hint TEXT NOT NULL,
            revision BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            spawn_max_ttl BIGINT,
            spawn_max_depth BIGINT
        )"#,
            "CREATE INDEX entries_spiffe_id ON entries (spiffe_id)",
            "CREATE INDEX entries_parent_id ON entries (parent_id)",
            r#"CREATE TABLE entry_selectors (
            entry_id TEXT COLLATE "C" NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            type TEXT COLLATE "C" NOT NULL,
            value TEXT COLLATE "C" NOT NULL,
            selector_count BIGINT NOT NULL,
            PRIMARY KEY (entry_id, type, value)
        )"#,
            "CREATE INDEX entry_selectors_type_value \
         ON entry_selectors (type, value, entry_id, selector_count)",
            r#"CREATE TABLE agents (
            spiffe_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            attestation_type TEXT NOT NULL,
            cert_serial TEXT NOT NULL,
            cert_expires_at BIGINT NOT NULL,
            selectors TEXT NOT NULL,
            banned BOOLEAN NOT NULL,
            created_at BIGINT NOT NULL
        )"#,
            r#"CREATE TABLE join_tokens (
            token_hash TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            expires_at BIGINT NOT NULL,
            selectors TEXT NOT NULL
        )"#,
            "CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at)",
            r#"CREATE TABLE bundles (
            trust_domain_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            document TEXT NOT NULL,
            sequence BIGINT NOT NULL
        )"#,
            r#"CREATE TABLE ca_journal (
            id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )"#,
        ],
    },
    Migration {
        version: 2,
        statements: &[
            r#"CREATE TABLE leases (
            id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            child_id TEXT COLLATE "C" NOT NULL UNIQUE,
            parent_id TEXT COLLATE "C" NOT NULL,
            entry_id TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            depth BIGINT NOT NULL,
            task TEXT NOT NULL,
            child_pid BIGINT NOT NULL,
            child_start_time BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            released_at BIGINT
        )"#,
            "CREATE INDEX leases_parent ON leases (parent_id, created_at)",
        ],
    },
    Migration {
        version: 3,
        statements: &["ALTER TABLE entries ADD COLUMN spawn_max_children BIGINT"],
    },
    Migration {
        version: 4,
        statements: &[
            "ALTER TABLE agents ADD COLUMN cert_sha256 TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE agents ADD COLUMN next_cert_sha256 TEXT NOT NULL DEFAULT ''",
            r#"CREATE TABLE settings (
            name TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            value TEXT NOT NULL
        )"#,
        ],
    },
    Migration {
        version: 5,
        statements: &[
            "ALTER TABLE entries ADD COLUMN spiffe_id_template TEXT",
            r#"CREATE TABLE template_issues (
            entry_id TEXT COLLATE "C" NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
            agent_id TEXT COLLATE "C" NOT NULL,
            spiffe_id TEXT COLLATE "C" NOT NULL,
            first_issued_at BIGINT NOT NULL,
            last_issued_at BIGINT NOT NULL,
            PRIMARY KEY (entry_id, agent_id, spiffe_id)
        )"#,
        ],
    },
    Migration {
        version: 6,
        statements: &[
            // Every committed change to entries, agents, the CA journal and bundles is
            // announced on `writ_changes` as `<kind>:<key>`, by whichever server (or
            // tool) wrote it, so that servers sharing the database follow each other.
            r#"CREATE FUNCTION writ_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
            DECLARE row_data JSONB;
            BEGIN
                IF TG_OP = 'DELETE' THEN row_data := to_jsonb(OLD); ELSE row_data := to_jsonb(NEW); END IF;
                PERFORM pg_notify('writ_changes', TG_ARGV[0] || ':' || COALESCE(row_data ->> TG_ARGV[1], ''));
                RETURN NULL;
            END $$"#,
            "CREATE TRIGGER entries_changed AFTER INSERT OR UPDATE OR DELETE ON entries \
             FOR EACH ROW EXECUTE FUNCTION writ_notify_change('entry', 'id')",
            "CREATE TRIGGER agents_changed AFTER INSERT OR UPDATE OR DELETE ON agents \
             FOR EACH ROW EXECUTE FUNCTION writ_notify_change('agent', 'spiffe_id')",
            "CREATE TRIGGER ca_journal_changed AFTER INSERT OR UPDATE OR DELETE ON ca_journal \
             FOR EACH ROW EXECUTE FUNCTION writ_notify_change('journal', 'id')",
            "CREATE TRIGGER bundles_changed AFTER INSERT OR UPDATE OR DELETE ON bundles \
             FOR EACH ROW EXECUTE FUNCTION writ_notify_change('bundle', 'trust_domain_id')",
        ],
    },
    Migration {
        version: 7,
        statements: &[
            r#"CREATE TABLE txn_keys (
            kid TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            jwk TEXT NOT NULL,
            replica TEXT NOT NULL,
            published_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL
        )"#,
            "CREATE INDEX txn_keys_expires_at ON txn_keys (expires_at)",
        ],
    },
    Migration {
        version: 8,
        statements: &[r#"CREATE TABLE federations (
            trust_domain_id TEXT COLLATE "C" PRIMARY KEY NOT NULL,
            bundle_endpoint_url TEXT NOT NULL,
            profile TEXT NOT NULL,
            endpoint_spiffe_id TEXT NOT NULL,
            web_ca_pem TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            last_refresh_at BIGINT,
            last_error TEXT,
            next_refresh_at BIGINT
        )"#],
    },
    Migration {
        version: 9,
        statements: &[
            r#"CREATE TABLE audit_events (
            seq BIGINT PRIMARY KEY NOT NULL,
            at_ms BIGINT NOT NULL,
            kind TEXT NOT NULL,
            decision TEXT NOT NULL,
            txn TEXT COLLATE "C" NOT NULL,
            sub TEXT NOT NULL,
            caller TEXT NOT NULL,
            service TEXT NOT NULL,
            lease TEXT NOT NULL,
            record TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )"#,
            "CREATE INDEX audit_events_txn ON audit_events (txn, seq)",
            "CREATE INDEX audit_events_at_ms ON audit_events (at_ms)",
            "CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
            pruned_seq BIGINT NOT NULL,
            pruned_hash TEXT NOT NULL,
            head_seq BIGINT NOT NULL,
            head_hash TEXT NOT NULL
        )",
            "INSERT INTO audit_anchor (id, pruned_seq, pruned_hash, head_seq, head_hash) \
             VALUES (1, 0, '', 0, '')",
        ],
    },
    // The kill switch (`store::revocation`). An identity column is never reused; inserts
    // take the audit lock first, so seqs commit in order and a reader polling
    // `seq > after` never skips one. Each insert is announced as `revocation:<seq>`.
    Migration {
        version: 10,
        statements: &[
            r#"CREATE TABLE revocations (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            kind TEXT NOT NULL,
            value TEXT COLLATE "C" NOT NULL,
            spiffe_id TEXT COLLATE "C" NOT NULL,
            subtree BOOLEAN NOT NULL,
            revoked_at BIGINT NOT NULL,
            lapses_at BIGINT NOT NULL,
            reason TEXT,
            revoked_by TEXT NOT NULL
        )"#,
            "CREATE INDEX revocations_lapses_at ON revocations (lapses_at)",
            "CREATE TRIGGER revocations_changed AFTER INSERT ON revocations \
             FOR EACH ROW EXECUTE FUNCTION writ_notify_change('revocation', 'seq')",
        ],
    },
];

/// The PostgreSQL channel [`POSTGRES_MIGRATIONS`]' triggers announce changes on.
pub(super) const CHANGES_CHANNEL: &str = "writ_changes";

/// Key of the PostgreSQL advisory lock held while migrating (`"writ_sch"` in ASCII), so
/// that servers starting together on one database migrate one after another.
const POSTGRES_MIGRATION_LOCK: i64 = 0x7772_6974_5f73_6368;

/// Seconds since the Unix epoch, for `schema_migrations.applied_at` (bookkeeping only).
fn applied_at() -> i64 {
    crate::clock::unix_seconds(std::time::SystemTime::now())
}

/// The migrations of `all` not among `applied`, oldest first; refuses a database that a
/// newer build has migrated further than this one knows.
fn pending<'a>(
    all: &'a [Migration],
    applied: &[i64],
) -> Result<impl Iterator<Item = &'a Migration>, StoreError> {
    let supported = all.iter().map(|m| m.version).max().unwrap_or(0);
    if let Some(&found) = applied.iter().max()
        && found > supported
    {
        return Err(StoreError::SchemaTooNew { found, supported });
    }
    Ok(all.iter().filter(move |m| !applied.contains(&m.version)))
}

/// Creates the migrations table and applies the pending migrations in one transaction
/// (the same steps for both backends; only the transaction type differs).
macro_rules! apply_migrations {
    ($tx:ident, $migrations:expr, $backend:literal) => {{
        sqlx::query(CREATE_MIGRATIONS_TABLE)
            .execute(&mut *$tx)
            .await?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all(&mut *$tx)
            .await?;
        for migration in pending($migrations, &applied)? {
            for statement in migration.statements {
                sqlx::query(*statement).execute(&mut *$tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(migration.version)
                .bind(applied_at())
                .execute(&mut *$tx)
                .await?;
            tracing::info!(
                version = migration.version,
                backend = $backend,
                "applied store migration"
            );
        }
        $tx.commit().await?;
        Ok(())
    }};
}

/// Checks, without changing anything, that a database is at exactly this build's
/// schema: what a reader that must never migrate (the token service reading leases)
/// opens with.
macro_rules! check_current {
    ($pool:expr, $migrations:expr) => {{
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
            .fetch_all($pool)
            .await
            .unwrap_or_default();
        if pending($migrations, &applied)?.next().is_some() {
            return Err(StoreError::SchemaTooOld {
                found: applied.iter().copied().max().unwrap_or(0),
                supported: $migrations.iter().map(|m| m.version).max().unwrap_or(0),
            });
        }
        Ok(())
    }};
}

/// Checks that a SQLite database is at this build's schema (see [`check_current`]).
///
/// # Errors
/// [`StoreError::SchemaTooOld`] or [`StoreError::SchemaTooNew`].
pub(super) async fn check_sqlite(pool: &SqlitePool) -> Result<(), StoreError> {
    check_current!(pool, SQLITE_MIGRATIONS)
}

/// Checks that a PostgreSQL database is at this build's schema.
///
/// # Errors
/// [`StoreError::SchemaTooOld`] or [`StoreError::SchemaTooNew`].
pub(super) async fn check_postgres(pool: &PgPool) -> Result<(), StoreError> {
    check_current!(pool, POSTGRES_MIGRATIONS)
}

/// Brings a SQLite database up to date. The whole run holds SQLite's write lock
/// (`BEGIN IMMEDIATE`), so concurrent openers migrate one after another; running it on an
/// up-to-date database changes nothing.
///
/// # Errors
/// [`StoreError::Database`] if a statement fails (nothing is applied then),
/// [`StoreError::SchemaTooNew`] for a database from a newer build.
pub(super) async fn migrate_sqlite(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    apply_migrations!(tx, SQLITE_MIGRATIONS, "SQLite")
}

/// Brings a PostgreSQL database up to date, under a transaction-scoped advisory lock so
/// that several servers starting at once on one database do not race; running it on an
/// up-to-date database changes nothing.
///
/// # Errors
/// [`StoreError::Database`] if a statement fails (nothing is applied then),
/// [`StoreError::SchemaTooNew`] for a database from a newer build.
pub(super) async fn migrate_postgres(pool: &PgPool) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(POSTGRES_MIGRATION_LOCK)
        .execute(&mut *tx)
        .await?;
    apply_migrations!(tx, POSTGRES_MIGRATIONS, "PostgreSQL")
}

// ---------------------------------------------------------------------------------------
// Statements shared by both backends.
// ---------------------------------------------------------------------------------------

/// The entry columns every entry query selects, in the order [`EntryRow::from_row`]
/// reads them by name. The selectors come back as one `type:value` list separated by
/// newlines (which neither part of a selector may contain).
macro_rules! entry_select {
    () => {
        "SELECT e.id, e.spiffe_id, e.parent_id, e.selector_count, e.x509_svid_ttl, \
         e.jwt_svid_ttl, e.dns_names, e.federates_with, e.admin, e.downstream, \
         e.expires_at, e.hint, e.revision, e.created_at, e.spawn_max_ttl, \
         e.spawn_max_depth, e.spawn_max_children, e.spiffe_id_template, \
         (SELECT string_agg(s.type || ':' || s.value, '\n') \
            FROM entry_selectors s WHERE s.entry_id = e.id) AS selectors \
         FROM entries e"
    };
}

/// Most entry rows one `INSERT` writes (18 parameters each).
pub(super) const ENTRY_ROWS_PER_INSERT: usize = 32;
/// Most selector rows one `INSERT` writes (4 parameters each).
pub(super) const SELECTOR_ROWS_PER_INSERT: usize = 128;

/// `(`$first`, ..., `$last`)`: one row of consecutive placeholders.
fn placeholders(first: usize, count: usize, tail: &str) -> String {
    let params: Vec<String> = (first..first + count).map(|i| format!("${i}")).collect();
    format!("({}{tail})", params.join(", "))
}

/// Inserts 1..=ENTRY_ROWS_PER_INSERT entry rows, each bound as `$1..=$17` of
/// [`bind_entry`] followed by the creation time; the revision starts at 1. Writing many
/// rows per statement matters to SQLite, whose driver hands every statement to a worker
/// thread and back.
static INSERT_ENTRIES: LazyLock<Vec<String>> = LazyLock::new(|| {
    (1..=ENTRY_ROWS_PER_INSERT)
        .map(|n| {
            let rows: Vec<String> = (0..n)
                .map(|i| placeholders(18 * i + 1, 18, ", 1"))
                .collect();
            format!(
                "INSERT INTO entries (id, spiffe_id, parent_id, identity_key, selector_count, \
                 x509_svid_ttl, jwt_svid_ttl, dns_names, federates_with, admin, downstream, \
                 expires_at, hint, spawn_max_ttl, spawn_max_depth, spawn_max_children, \
                 spiffe_id_template, created_at, revision) \
                 VALUES {}",
                rows.join(", ")
            )
        })
        .collect()
});

/// Inserts 1..=SELECTOR_ROWS_PER_INSERT selector rows, each bound as
/// `(entry_id, selector_count, type, value)`.
static INSERT_SELECTORS: LazyLock<Vec<String>> = LazyLock::new(|| {
    (1..=SELECTOR_ROWS_PER_INSERT)
        .map(|n| {
            let rows: Vec<String> = (0..n).map(|i| placeholders(4 * i + 1, 4, "")).collect();
            format!(
                "INSERT INTO entry_selectors (entry_id, selector_count, type, value) VALUES {}",
                rows.join(", ")
            )
        })
        .collect()
});

/// The statement inserting `n` entry rows (1..=ENTRY_ROWS_PER_INSERT).
pub(super) fn insert_entries_sql(n: usize) -> Result<&'static str, StoreError> {
    generated(&INSERT_ENTRIES, n)
}

/// The statement inserting `n` selector rows (1..=SELECTOR_ROWS_PER_INSERT).
pub(super) fn insert_selectors_sql(n: usize) -> Result<&'static str, StoreError> {
    generated(&INSERT_SELECTORS, n)
}

/// The `n`-th statement of a table of generated statements (`n` counts from 1).
fn generated(table: &'static [String], n: usize) -> Result<&'static str, StoreError> {
    n.checked_sub(1)
        .and_then(|i| table.get(i))
        .map(String::as_str)
        .ok_or_else(|| StoreError::Invalid(format!("no statement for {n} rows")))
}

/// The selector rows of `entries`, as [`insert_selectors_sql`] binds them.
pub(super) fn selector_rows<'p, 'a>(
    entries: &'p [EntryParams<'a>],
) -> impl Iterator<Item = (&'a str, i64, &'a Selector)> + 'p {
    entries.iter().flat_map(|p| {
        p.selectors
            .iter()
            .map(move |s| (p.id, p.selector_count, *s))
    })
}

/// Replaces an entry row (`$1..=$17` as [`bind_entry`] binds them) if its revision is
/// `$18`, and bumps the revision. `created_at` keeps the time of the first creation.
pub(super) const UPDATE_ENTRY: &str = "UPDATE entries SET spiffe_id = $2, parent_id = $3, \
     identity_key = $4, selector_count = $5, x509_svid_ttl = $6, jwt_svid_ttl = $7, \
     dns_names = $8, federates_with = $9, admin = $10, downstream = $11, expires_at = $12, \
     hint = $13, spawn_max_ttl = $14, spawn_max_depth = $15, spawn_max_children = $16, \
     spiffe_id_template = $17, revision = revision + 1 WHERE id = $1 AND revision = $18";

/// The stored revision of an entry.
pub(super) const ENTRY_REVISION: &str = "SELECT revision FROM entries WHERE id = $1";

/// Removes an entry (its selectors go with it, `ON DELETE CASCADE`).
pub(super) const DELETE_ENTRY: &str = "DELETE FROM entries WHERE id = $1";

/// Removes an entry's selectors before they are written again.
pub(super) const DELETE_ENTRY_SELECTORS: &str = "DELETE FROM entry_selectors WHERE entry_id = $1";

/// One entry by id.
pub(super) const FETCH_ENTRY: &str = concat!(entry_select!(), " WHERE e.id = $1");

/// Every entry, by id.
pub(super) const LIST_ENTRIES: &str = concat!(entry_select!(), " ORDER BY e.id");

/// Entries with SPIFFE ID `$1`, by id.
pub(super) const LIST_ENTRIES_BY_SPIFFE_ID: &str =
    concat!(entry_select!(), " WHERE e.spiffe_id = $1 ORDER BY e.id");

/// Entries with parent `$1`, by id.
pub(super) const LIST_ENTRIES_BY_PARENT_ID: &str =
    concat!(entry_select!(), " WHERE e.parent_id = $1 ORDER BY e.id");

/// Entries with SPIFFE ID `$1` and parent `$2`, by id.
pub(super) const LIST_ENTRIES_BY_BOTH: &str = concat!(
    entry_select!(),
    " WHERE e.spiffe_id = $1 AND e.parent_id = $2 ORDER BY e.id"
);

/// How many entries.
pub(super) const COUNT_ENTRIES: &str = "SELECT COUNT(*) FROM entries";

/// The subset lookup for each count 1..=MAX_SELECTORS of workload selectors, bound as
/// `(type, value)` pairs from `$1`.
///
/// The inner query reads only the selector rows equal to one of the workload's selectors:
/// one branch of the `UNION ALL` per workload selector, each a search of the
/// `(type, value, entry_id, selector_count)` index that never touches a table. It counts
/// those rows per entry and keeps the entries for which the count is the entry's own
/// number of selectors, i.e. whose selectors all belong to the workload. The outer query
/// then loads just those entries by primary key. The cost is one index row per
/// (workload selector, entry holding it) pair, plus a row read per matching entry.
///
/// (`UNION ALL` rather than one `WHERE ... OR ...`: SQLite's multi-index OR removes
/// duplicate rows with a temporary index, which made lookups several times slower; the
/// workload's selectors are de-duplicated beforehand, so the branches never overlap.)
static FIND_BY_SELECTORS: LazyLock<Vec<String>> = LazyLock::new(|| {
    (1..=MAX_SELECTORS)
        .map(|n| {
            let branches: Vec<String> = (0..n)
                .map(|i| {
                    format!(
                        "SELECT es.entry_id, es.selector_count FROM entry_selectors es \
                         WHERE es.type = ${} AND es.value = ${}",
                        2 * i + 1,
                        2 * i + 2
                    )
                })
                .collect();
            format!(
                "{} WHERE e.id IN (SELECT m.entry_id FROM ({}) AS m \
                 GROUP BY m.entry_id, m.selector_count \
                 HAVING COUNT(*) = m.selector_count) \
                 ORDER BY e.id",
                entry_select!(),
                branches.join(" UNION ALL ")
            )
        })
        .collect()
});

/// The subset lookup for `n` workload selectors (1..=MAX_SELECTORS).
pub(super) fn find_by_selectors_sql(n: usize) -> Result<&'static str, StoreError> {
    generated(&FIND_BY_SELECTORS, n).map_err(|_| too_many_selectors(n))
}

fn too_many_selectors(n: usize) -> StoreError {
    StoreError::Invalid(format!(
        "{n} selectors given; between 1 and {MAX_SELECTORS} are allowed"
    ))
}

/// Checks a workload's selector list for a lookup and removes duplicates. An empty list
/// gives `Ok(None)`: it matches nothing.
pub(super) fn lookup_selectors(
    selectors: &[Selector],
) -> Result<Option<Vec<&Selector>>, StoreError> {
    if selectors.len() > MAX_SELECTORS {
        return Err(StoreError::Invalid(format!(
            "a lookup may carry at most {MAX_SELECTORS} selectors, got {}",
            selectors.len()
        )));
    }
    if selectors.is_empty() {
        return Ok(None);
    }
    let mut unique: Vec<&Selector> = selectors.iter().collect();
    unique.sort();
    unique.dedup();
    Ok(Some(unique))
}

pub(super) const INSERT_AGENT: &str = "INSERT INTO agents (spiffe_id, attestation_type, \
     cert_serial, cert_expires_at, selectors, banned, created_at, cert_sha256, \
     next_cert_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(super) const UPDATE_AGENT: &str = "UPDATE agents SET attestation_type = $2, \
     cert_serial = $3, cert_expires_at = $4, selectors = $5, banned = $6, created_at = $7, \
     cert_sha256 = $8, next_cert_sha256 = $9 WHERE spiffe_id = $1";
pub(super) const FETCH_AGENT: &str = "SELECT spiffe_id, attestation_type, cert_serial, \
     cert_expires_at, selectors, banned, created_at, cert_sha256, next_cert_sha256 \
     FROM agents WHERE spiffe_id = $1";
pub(super) const LIST_AGENTS: &str = "SELECT spiffe_id, attestation_type, cert_serial, \
     cert_expires_at, selectors, banned, created_at, cert_sha256, next_cert_sha256 \
     FROM agents ORDER BY spiffe_id";
/// `$2`: the presented SVID's fingerprint, `$3` its serial, `$4` its expiry. It becomes
/// current if it is the pending one, or (a record from before fingerprints) if its
/// serial is the stored one.
pub(super) const SWITCH_AGENT_SVID: &str = "UPDATE agents SET cert_sha256 = $2, \
     cert_serial = $3, cert_expires_at = $4, next_cert_sha256 = '' WHERE spiffe_id = $1 \
     AND $2 <> '' AND (next_cert_sha256 = $2 OR (cert_sha256 = '' AND cert_serial = $3))";
/// `$2`: the current SVID's fingerprint (the renewal's caller), `$3`: the new one.
pub(super) const SET_NEXT_AGENT_SVID: &str = "UPDATE agents SET next_cert_sha256 = $3 \
     WHERE spiffe_id = $1 AND $2 <> '' AND cert_sha256 = $2 AND NOT banned";
pub(super) const DELETE_AGENT: &str = "DELETE FROM agents WHERE spiffe_id = $1";

/// Records `$1` as the store's trust domain unless one is recorded, and returns the
/// recorded one. Always a write (the no-op update included), so that a store that
/// cannot be written fails here, at start.
pub(super) const RECORD_TRUST_DOMAIN: &str = "INSERT INTO settings (name, value) \
     VALUES ('trust_domain', $1) ON CONFLICT (name) DO UPDATE SET value = settings.value \
     RETURNING value";
pub(super) const FETCH_TRUST_DOMAIN: &str =
    "SELECT value FROM settings WHERE name = 'trust_domain'";

pub(super) const INSERT_JOIN_TOKEN: &str =
    "INSERT INTO join_tokens (token_hash, expires_at, selectors) VALUES ($1, $2, $3)";
/// Removes and returns a token in one statement, so that only one caller can get it.
pub(super) const CONSUME_JOIN_TOKEN: &str = "DELETE FROM join_tokens WHERE token_hash = $1 \
     RETURNING token_hash, expires_at, selectors";
pub(super) const PRUNE_JOIN_TOKENS: &str = "DELETE FROM join_tokens WHERE expires_at <= $1";

pub(super) const PUT_BUNDLE: &str = "INSERT INTO bundles (trust_domain_id, document, sequence) \
     VALUES ($1, $2, $3) ON CONFLICT (trust_domain_id) \
     DO UPDATE SET document = excluded.document, sequence = excluded.sequence";
pub(super) const FETCH_BUNDLE: &str =
    "SELECT trust_domain_id, document, sequence FROM bundles WHERE trust_domain_id = $1";
pub(super) const LIST_BUNDLES: &str =
    "SELECT trust_domain_id, document, sequence FROM bundles ORDER BY trust_domain_id";
pub(super) const DELETE_BUNDLE: &str = "DELETE FROM bundles WHERE trust_domain_id = $1";
/// A new bundle row, only if there is none.
pub(super) const CREATE_BUNDLE: &str = "INSERT INTO bundles (trust_domain_id, document, sequence) \
     VALUES ($1, $2, $3) ON CONFLICT (trust_domain_id) DO NOTHING";
/// A bundle replaced only if its stored sequence is still `$4`.
pub(super) const SWAP_BUNDLE: &str =
    "UPDATE bundles SET document = $2, sequence = $3 WHERE trust_domain_id = $1 AND sequence = $4";

const FEDERATION_COLUMNS: &str = "trust_domain_id, bundle_endpoint_url, profile, \
     endpoint_spiffe_id, web_ca_pem, created_at, last_refresh_at, last_error, next_refresh_at";
pub(super) const CREATE_FEDERATION: &str = "INSERT INTO federations (trust_domain_id, \
     bundle_endpoint_url, profile, endpoint_spiffe_id, web_ca_pem, created_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";
/// Replaces a relationship's settings; its refresh status stays.
pub(super) const UPDATE_FEDERATION: &str = "UPDATE federations SET bundle_endpoint_url = $2, \
     profile = $3, endpoint_spiffe_id = $4, web_ca_pem = $5 WHERE trust_domain_id = $1";
pub(super) static FETCH_FEDERATION: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {FEDERATION_COLUMNS} FROM federations WHERE trust_domain_id = $1")
});
pub(super) static LIST_FEDERATIONS: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {FEDERATION_COLUMNS} FROM federations ORDER BY trust_domain_id")
});
pub(super) const DELETE_FEDERATION: &str = "DELETE FROM federations WHERE trust_domain_id = $1";
/// A refresh's outcome: a success sets `last_refresh_at` and clears the error; a failure
/// keeps the last success and records the error.
pub(super) const RECORD_FEDERATION_REFRESH: &str = "UPDATE federations SET \
     last_refresh_at = COALESCE($2, last_refresh_at), last_error = $3, next_refresh_at = $4 \
     WHERE trust_domain_id = $1";

/// Refuses a relationship the `federations` table is not meant to hold.
pub(super) fn check_federation(record: &FederationRecord) -> Result<(), StoreError> {
    use super::MAX_FEDERATION_FIELD_BYTES;
    for (name, value) in [
        ("trust domain", record.trust_domain_id.as_str()),
        ("bundle endpoint URL", record.bundle_endpoint_url.as_str()),
        ("profile", record.profile.as_str()),
        ("endpoint SPIFFE ID", record.endpoint_spiffe_id.as_str()),
        ("web CA", record.web_ca_pem.as_str()),
    ] {
        if value.len() > MAX_FEDERATION_FIELD_BYTES {
            return Err(StoreError::Invalid(format!(
                "a federation relationship's {name} is {} bytes, more than \
                 {MAX_FEDERATION_FIELD_BYTES}",
                value.len()
            )));
        }
    }
    if record.trust_domain_id.is_empty() || record.bundle_endpoint_url.is_empty() {
        return Err(StoreError::Invalid(
            "a federation relationship needs a trust domain and a bundle endpoint URL".into(),
        ));
    }
    Ok(())
}

/// Reads a `federations` row.
pub(super) fn federation_from_row<R>(row: &R) -> Result<FederationRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "federation relationship";
    Ok(FederationRecord {
        trust_domain_id: get(row, "trust_domain_id", KIND)?,
        bundle_endpoint_url: get(row, "bundle_endpoint_url", KIND)?,
        profile: get(row, "profile", KIND)?,
        endpoint_spiffe_id: get(row, "endpoint_spiffe_id", KIND)?,
        web_ca_pem: get(row, "web_ca_pem", KIND)?,
        created_at: get(row, "created_at", KIND)?,
        last_refresh_at: get(row, "last_refresh_at", KIND)?,
        last_error: get(row, "last_error", KIND)?,
        next_refresh_at: get(row, "next_refresh_at", KIND)?,
    })
}

pub(super) const PUT_JOURNAL: &str = "INSERT INTO ca_journal (id, kind, payload, updated_at) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (id) \
     DO UPDATE SET kind = excluded.kind, payload = excluded.payload, \
     updated_at = excluded.updated_at";
pub(super) const LIST_JOURNAL: &str =
    "SELECT id, kind, payload, updated_at FROM ca_journal ORDER BY id";
pub(super) const DELETE_JOURNAL: &str = "DELETE FROM ca_journal WHERE id = $1";

const LEASE_COLUMNS: &str = "id, child_id, parent_id, entry_id, agent_id, depth, task, \
     child_pid, child_start_time, created_at, expires_at, released_at";
pub(super) const INSERT_LEASE: &str = "INSERT INTO leases (id, child_id, parent_id, entry_id, \
     agent_id, depth, task, child_pid, child_start_time, created_at, expires_at, released_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
pub(super) static FETCH_LEASE: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1"));
pub(super) static FETCH_LEASE_BY_CHILD: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {LEASE_COLUMNS} FROM leases WHERE child_id = $1"));
pub(super) const RELEASE_LEASE: &str =
    "UPDATE leases SET released_at = COALESCE(released_at, $2) WHERE id = $1";
/// `$1`: the parent ID, or `''` for every parent; `$2`: the time leases must be live
/// at, or `-1` for all (sentinels keep one statement text for both backends).
pub(super) static LIST_LEASES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {LEASE_COLUMNS} FROM leases WHERE ($1 = '' OR parent_id = $1) \
         AND ($2 < 0 OR (released_at IS NULL AND expires_at > $2)) ORDER BY created_at, id"
    )
});
pub(super) const PRUNE_LEASES: &str = "DELETE FROM leases WHERE expires_at < $1 \
     OR (released_at IS NOT NULL AND released_at < $1)";

/// Records one issue of a template's rendered ID to an agent: `$1` entry, `$2` agent,
/// `$3` SPIFFE ID, `$4` now.
pub(super) const RECORD_TEMPLATE_ISSUE: &str = "INSERT INTO template_issues (entry_id, \
     agent_id, spiffe_id, first_issued_at, last_issued_at) VALUES ($1, $2, $3, $4, $4) \
     ON CONFLICT (entry_id, agent_id, spiffe_id) \
     DO UPDATE SET last_issued_at = excluded.last_issued_at";
/// Keeps the `$2` most recently issued rows of entry `$1` and deletes the rest.
pub(super) const PRUNE_TEMPLATE_ISSUES: &str = "DELETE FROM template_issues \
     WHERE entry_id = $1 AND agent_id || ' ' || spiffe_id NOT IN \
     (SELECT agent_id || ' ' || spiffe_id FROM template_issues WHERE entry_id = $1 \
     ORDER BY last_issued_at DESC, agent_id, spiffe_id LIMIT $2)";
/// The issues of entry `$1`, most recent first.
pub(super) const LIST_TEMPLATE_ISSUES: &str = "SELECT entry_id, agent_id, spiffe_id, \
     first_issued_at, last_issued_at FROM template_issues WHERE entry_id = $1 \
     ORDER BY last_issued_at DESC, agent_id, spiffe_id";

/// Stores or replaces a token service replica's public key: `$1` kid, `$2` JWK, `$3`
/// replica, `$4` published at, `$5` expires at.
pub(super) const PUT_TXN_KEY: &str = "INSERT INTO txn_keys (kid, jwk, replica, published_at, \
     expires_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (kid) DO UPDATE SET \
     jwk = excluded.jwk, replica = excluded.replica, published_at = excluded.published_at, \
     expires_at = excluded.expires_at";
/// The keys unexpired at `$1`, by kid, at most `$2`.
pub(super) const LIST_TXN_KEYS: &str = "SELECT kid, jwk, replica, published_at, expires_at \
     FROM txn_keys WHERE expires_at > $1 ORDER BY kid LIMIT $2";
pub(super) const PRUNE_TXN_KEYS: &str = "DELETE FROM txn_keys WHERE expires_at <= $1";

/// Refuses a replica's key the `txn_keys` table is not meant to hold.
pub(super) fn check_txn_key(key: &TxnKeyRecord) -> Result<(), StoreError> {
    use super::{MAX_TXN_KEY_JWK_BYTES, MAX_TXN_KEY_NAME_BYTES};
    if key.jwk.len() > MAX_TXN_KEY_JWK_BYTES {
        return Err(StoreError::Invalid(format!(
            "a Txn-Token key's JWK is {} bytes, more than {MAX_TXN_KEY_JWK_BYTES}",
            key.jwk.len()
        )));
    }
    for (name, value) in [("kid", &key.kid), ("replica", &key.replica)] {
        if value.is_empty() || value.len() > MAX_TXN_KEY_NAME_BYTES {
            return Err(StoreError::Invalid(format!(
                "a Txn-Token key's {name} must be 1 to {MAX_TXN_KEY_NAME_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Outcomes shared by both backends.
// ---------------------------------------------------------------------------------------

/// Maps a unique-constraint violation to [`StoreError::AlreadyExists`] for `kind`; other
/// database errors pass through.
pub(super) fn unique_violation_is(kind: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists { kind },
        _ => StoreError::Database(e),
    }
}

/// Why a conditional entry update changed no row: the entry is gone, or its revision is
/// not the caller's (`stored` is the revision found, if any).
pub(super) fn not_updated(stored: Option<i64>) -> StoreError {
    match stored {
        None => StoreError::NotFound { kind: "entry" },
        Some(_) => StoreError::Conflict { kind: "entry" },
    }
}

/// A keyed update or delete must have touched its row.
pub(super) fn expect_one(rows_affected: u64, kind: &'static str) -> Result<(), StoreError> {
    if rows_affected == 0 {
        Err(StoreError::NotFound { kind })
    } else {
        Ok(())
    }
}

/// A consumed join token, refused if it expired at or before `now`.
pub(super) fn unexpired(token: JoinTokenRecord, now: i64) -> Result<JoinTokenRecord, StoreError> {
    if token.expires_at <= now {
        Err(StoreError::TokenExpired)
    } else {
        Ok(token)
    }
}

// ---------------------------------------------------------------------------------------
// Rust values -> SQL values.
// ---------------------------------------------------------------------------------------

/// An entry turned into the values of its row, checked for what the columns can hold.
#[derive(Debug)]
pub(super) struct EntryParams<'a> {
    /// `$1`.
    pub id: &'a str,
    /// `$2`.
    pub spiffe_id: &'a str,
    /// `$3`.
    pub parent_id: &'a str,
    /// `$4`: see [`identity_key`].
    pub identity_key: String,
    /// `$5`.
    pub selector_count: i64,
    /// `$6`.
    pub x509_svid_ttl: i64,
    /// `$7`.
    pub jwt_svid_ttl: i64,
    /// `$8`: JSON array of strings.
    pub dns_names: String,
    /// `$9`: JSON array of trust domain names.
    pub federates_with: String,
    /// `$10`.
    pub admin: bool,
    /// `$11`.
    pub downstream: bool,
    /// `$12`.
    pub expires_at: Option<i64>,
    /// `$13`.
    pub hint: &'a str,
    /// `$14`.
    pub spawn_max_ttl: Option<i64>,
    /// `$15`.
    pub spawn_max_depth: Option<i64>,
    /// `$16`.
    pub spawn_max_children: Option<i64>,
    /// `$17`: the template text, for a template entry.
    pub spiffe_id_template: Option<&'a str>,
    /// Bound by the insert only, as `$18`.
    pub created_at: i64,
    /// Sorted, without duplicates; stored in `entry_selectors`.
    pub selectors: Vec<&'a Selector>,
}

impl<'a> EntryParams<'a> {
    /// The row values of `entry`.
    ///
    /// # Errors
    /// [`StoreError::Invalid`] for an entry with no selectors (but a template entry), more than
    /// [`MAX_SELECTORS`], or a TTL beyond `i64::MAX`.
    pub(super) fn new(entry: &'a RegistrationEntry) -> Result<Self, StoreError> {
        let mut selectors: Vec<&Selector> = entry.selectors.iter().collect();
        selectors.sort();
        selectors.dedup();
        if selectors.is_empty() && entry.spiffe_id_template.is_none() {
            return Err(StoreError::Invalid(
                "an entry needs at least one selector".into(),
            ));
        }
        if selectors.len() > MAX_SELECTORS {
            return Err(too_many_selectors(selectors.len()));
        }
        let federates_with: Vec<&str> = entry
            .federates_with
            .iter()
            .map(TrustDomain::as_str)
            .collect();
        Ok(Self {
            id: &entry.id,
            spiffe_id: entry.spiffe_id.as_str(),
            parent_id: entry.parent_id.as_str(),
            identity_key: identity_key(
                &entry.spiffe_id,
                entry.spiffe_id_template.as_ref().map(IdTemplate::as_str),
                &entry.parent_id,
                &selectors,
            ),
            selector_count: i64::try_from(selectors.len())
                .map_err(|_| too_many_selectors(selectors.len()))?,
            x509_svid_ttl: to_i64(entry.x509_svid_ttl, "x509_svid_ttl")?,
            jwt_svid_ttl: to_i64(entry.jwt_svid_ttl, "jwt_svid_ttl")?,
            dns_names: to_json(&entry.dns_names)?,
            federates_with: to_json(&federates_with)?,
            admin: entry.admin,
            downstream: entry.downstream,
            expires_at: entry.expires_at,
            hint: &entry.hint,
            created_at: entry.created_at,
            spawn_max_ttl: entry
                .spawn_max_ttl
                .map(|t| to_i64(t, "spawn_max_ttl"))
                .transpose()?,
            spawn_max_depth: entry.spawn_max_depth.map(i64::from),
            spawn_max_children: entry.spawn_max_children.map(i64::from),
            spiffe_id_template: entry.spiffe_id_template.as_ref().map(IdTemplate::as_str),
            selectors,
        })
    }

    /// The entry as stored by a create: normalized selectors, revision 1.
    pub(super) fn created(&self, entry: &RegistrationEntry) -> RegistrationEntry {
        RegistrationEntry {
            selectors: self.selectors.iter().map(|s| (*s).clone()).collect(),
            revision: 1,
            ..entry.clone()
        }
    }
}

/// Binds [`EntryParams`] (all but `created_at`) as `$1..=$17` of `query`, whichever the
/// backend.
pub(super) fn bind_entry<'q, DB>(
    query: sqlx::query::Query<'q, DB, DB::Arguments>,
    p: &EntryParams<'_>,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    DB: sqlx::Database,
    for<'t> &'t str: sqlx::Encode<'t, DB> + Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB> + Type<DB>,
    for<'t> Option<i64>: sqlx::Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: sqlx::Encode<'t, DB> + Type<DB>,
    for<'t> bool: sqlx::Encode<'t, DB> + Type<DB>,
{
    query
        .bind(p.id)
        .bind(p.spiffe_id)
        .bind(p.parent_id)
        .bind(p.identity_key.as_str())
        .bind(p.selector_count)
        .bind(p.x509_svid_ttl)
        .bind(p.jwt_svid_ttl)
        .bind(p.dns_names.as_str())
        .bind(p.federates_with.as_str())
        .bind(p.admin)
        .bind(p.downstream)
        .bind(p.expires_at)
        .bind(p.hint)
        .bind(p.spawn_max_ttl)
        .bind(p.spawn_max_depth)
        .bind(p.spawn_max_children)
        .bind(p.spiffe_id_template)
}

/// Hex SHA-256 of `spiffe_id \n parent_id \n selector \n selector ...` over the sorted
/// selectors (for a template entry, `spiffe_id` is followed by `\t` and the template):
/// two entries that would match the same workloads with the same identity share this
/// key, which the `UNIQUE` constraint then refuses.
pub(super) fn identity_key(
    spiffe_id: &SpiffeId,
    template: Option<&str>,
    parent_id: &SpiffeId,
    sorted: &[&Selector],
) -> String {
    let mut hash = Sha256::new();
    hash.update(spiffe_id.as_str().as_bytes());
    if let Some(template) = template {
        hash.update(b"\t");
        hash.update(template.as_bytes());
    }
    hash.update(b"\n");
    hash.update(parent_id.as_str().as_bytes());
    for selector in sorted {
        hash.update(b"\n");
        hash.update(selector.to_string().as_bytes());
    }
    hex::encode(hash.finalize())
}

/// Values that must fit a signed 64-bit column.
pub(super) fn to_i64(value: u64, field: &str) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::Invalid(format!("{field} {value} is too large to store")))
}

/// A list as JSON text.
pub(super) fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Invalid(format!("cannot encode list: {e}")))
}

/// A selector list as JSON text (`["type:value", ...]`).
pub(super) fn selectors_json(selectors: &[Selector]) -> Result<String, StoreError> {
    let texts: Vec<String> = selectors.iter().map(Selector::to_string).collect();
    to_json(&texts)
}

// ---------------------------------------------------------------------------------------
// SQL values -> Rust values.
// ---------------------------------------------------------------------------------------

/// Reads column `column` of `row`; a missing column or a value of the wrong type is
/// corruption of a `kind` record.
fn get<'r, R, T>(row: &'r R, column: &str, kind: &'static str) -> Result<T, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt {
        kind,
        detail: format!("column {column}: {e}"),
    })
}

/// A row of one of the entry queries, before parsing.
#[derive(Debug)]
pub(super) struct EntryRow {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selector_count: i64,
    x509_svid_ttl: i64,
    jwt_svid_ttl: i64,
    dns_names: String,
    federates_with: String,
    admin: bool,
    downstream: bool,
    expires_at: Option<i64>,
    hint: String,
    revision: i64,
    created_at: i64,
    spawn_max_ttl: Option<i64>,
    spawn_max_depth: Option<i64>,
    spawn_max_children: Option<i64>,
    spiffe_id_template: Option<String>,
    selectors: Option<String>,
}

const ENTRY: &str = "entry";

impl EntryRow {
    /// Reads the columns of an entry query (see `entry_select!`).
    pub(super) fn from_row<R>(row: &R) -> Result<Self, StoreError>
    where
        R: Row,
        for<'c> &'c str: ColumnIndex<R>,
        for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
        for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(Self {
            id: get(row, "id", ENTRY)?,
            spiffe_id: get(row, "spiffe_id", ENTRY)?,
            parent_id: get(row, "parent_id", ENTRY)?,
            selector_count: get(row, "selector_count", ENTRY)?,
            x509_svid_ttl: get(row, "x509_svid_ttl", ENTRY)?,
            jwt_svid_ttl: get(row, "jwt_svid_ttl", ENTRY)?,
            dns_names: get(row, "dns_names", ENTRY)?,
            federates_with: get(row, "federates_with", ENTRY)?,
            admin: get(row, "admin", ENTRY)?,
            downstream: get(row, "downstream", ENTRY)?,
            expires_at: get(row, "expires_at", ENTRY)?,
            hint: get(row, "hint", ENTRY)?,
            revision: get(row, "revision", ENTRY)?,
            created_at: get(row, "created_at", ENTRY)?,
            spawn_max_ttl: get(row, "spawn_max_ttl", ENTRY)?,
            spawn_max_depth: get(row, "spawn_max_depth", ENTRY)?,
            spawn_max_children: get(row, "spawn_max_children", ENTRY)?,
            spiffe_id_template: get(row, "spiffe_id_template", ENTRY)?,
            selectors: get(row, "selectors", ENTRY)?,
        })
    }

    /// Parses every field.
    pub(super) fn decode(self) -> Result<RegistrationEntry, StoreError> {
        let mut selectors = self
            .selectors
            .as_deref()
            .unwrap_or_default()
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(|s| parse_selector(s, ENTRY))
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        let spiffe_id_template = self
            .spiffe_id_template
            .as_deref()
            .map(|t| {
                IdTemplate::parse(t).map_err(|e| {
                    corrupt(ENTRY, format!("spiffe_id_template {:?}: {e}", truncated(t)))
                })
            })
            .transpose()?;
        if i64::try_from(selectors.len()).ok() != Some(self.selector_count)
            || (selectors.is_empty() && spiffe_id_template.is_none())
        {
            return Err(corrupt(
                ENTRY,
                format!(
                    "entry {} has {} selector rows but records {}",
                    self.id,
                    selectors.len(),
                    self.selector_count
                ),
            ));
        }
        let dns_names: Vec<String> = from_json(&self.dns_names, ENTRY, "dns_names")?;
        let federates_with: Vec<String> = from_json(&self.federates_with, ENTRY, "federates_with")?;
        let federates_with = federates_with
            .iter()
            .map(|td| {
                TrustDomain::new(td)
                    .map_err(|e| corrupt(ENTRY, format!("federates_with {td:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RegistrationEntry {
            spiffe_id: parse_spiffe_id(&self.spiffe_id, ENTRY)?,
            parent_id: parse_spiffe_id(&self.parent_id, ENTRY)?,
            selectors,
            x509_svid_ttl: from_i64(self.x509_svid_ttl, ENTRY, "x509_svid_ttl")?,
            jwt_svid_ttl: from_i64(self.jwt_svid_ttl, ENTRY, "jwt_svid_ttl")?,
            dns_names,
            federates_with,
            admin: self.admin,
            downstream: self.downstream,
            expires_at: self.expires_at,
            hint: self.hint,
            revision: self.revision,
            created_at: self.created_at,
            spawn_max_ttl: self
                .spawn_max_ttl
                .map(|t| from_i64(t, ENTRY, "spawn_max_ttl"))
                .transpose()?,
            spawn_max_depth: self
                .spawn_max_depth
                .map(|d| {
                    u32::try_from(d)
                        .map_err(|_| corrupt(ENTRY, format!("spawn_max_depth {d} out of range")))
                })
                .transpose()?,
            spawn_max_children: self
                .spawn_max_children
                .map(|c| {
                    u32::try_from(c)
                        .map_err(|_| corrupt(ENTRY, format!("spawn_max_children {c} out of range")))
                })
                .transpose()?,
            spiffe_id_template,
            id: self.id,
        })
    }
}

/// Reads and parses an entry row.
pub(super) fn entry_from_row<R>(row: &R) -> Result<RegistrationEntry, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    EntryRow::from_row(row)?.decode()
}

/// Reads and parses an `agents` row.
pub(super) fn agent_from_row<R>(row: &R) -> Result<AttestedAgent, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "agent";
    let spiffe_id: String = get(row, "spiffe_id", KIND)?;
    let selectors: String = get(row, "selectors", KIND)?;
    Ok(AttestedAgent {
        spiffe_id: parse_spiffe_id(&spiffe_id, KIND)?,
        attestation_type: get(row, "attestation_type", KIND)?,
        cert_serial: get(row, "cert_serial", KIND)?,
        cert_expires_at: get(row, "cert_expires_at", KIND)?,
        selectors: parse_selector_json(&selectors, KIND)?,
        banned: get(row, "banned", KIND)?,
        created_at: get(row, "created_at", KIND)?,
        cert_sha256: get(row, "cert_sha256", KIND)?,
        next_cert_sha256: get(row, "next_cert_sha256", KIND)?,
    })
}

/// Reads and parses a `join_tokens` row.
pub(super) fn join_token_from_row<R>(row: &R) -> Result<JoinTokenRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "join token";
    let selectors: String = get(row, "selectors", KIND)?;
    Ok(JoinTokenRecord {
        token_hash: get(row, "token_hash", KIND)?,
        expires_at: get(row, "expires_at", KIND)?,
        selectors: parse_selector_json(&selectors, KIND)?,
    })
}

/// Reads and parses a `bundles` row.
pub(super) fn bundle_from_row<R>(row: &R) -> Result<BundleRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "bundle";
    Ok(BundleRecord {
        trust_domain_id: get(row, "trust_domain_id", KIND)?,
        document: get(row, "document", KIND)?,
        sequence: from_i64(get(row, "sequence", KIND)?, KIND, "sequence")?,
    })
}

/// Reads a `ca_journal` row.
pub(super) fn journal_from_row<R>(row: &R) -> Result<JournalRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "journal record";
    Ok(JournalRecord {
        id: get(row, "id", KIND)?,
        kind: get(row, "kind", KIND)?,
        payload: get(row, "payload", KIND)?,
        updated_at: get(row, "updated_at", KIND)?,
    })
}

/// Reads a `leases` row.
pub(super) fn lease_from_row<R>(row: &R) -> Result<LeaseRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "lease";
    let id_of = |column: &str| -> Result<SpiffeId, StoreError> {
        let text: String = get(row, column, KIND)?;
        SpiffeId::new(&text).map_err(|e| corrupt(KIND, format!("{column}: {e}")))
    };
    let depth = from_i64(get(row, "depth", KIND)?, KIND, "depth")?;
    let pid: i64 = get(row, "child_pid", KIND)?;
    Ok(LeaseRecord {
        id: get(row, "id", KIND)?,
        child_id: id_of("child_id")?,
        parent_id: id_of("parent_id")?,
        entry_id: get(row, "entry_id", KIND)?,
        agent_id: id_of("agent_id")?,
        depth: u32::try_from(depth).map_err(|_| corrupt(KIND, format!("depth {depth}")))?,
        task: get(row, "task", KIND)?,
        child_pid: i32::try_from(pid).map_err(|_| corrupt(KIND, format!("child_pid {pid}")))?,
        child_start_time: from_i64(
            get(row, "child_start_time", KIND)?,
            KIND,
            "child_start_time",
        )?,
        created_at: get(row, "created_at", KIND)?,
        expires_at: get(row, "expires_at", KIND)?,
        released_at: get(row, "released_at", KIND)?,
    })
}

/// Reads a `txn_keys` row (the JWK stays text: its reader parses it).
pub(super) fn txn_key_from_row<R>(row: &R) -> Result<TxnKeyRecord, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "Txn-Token key";
    Ok(TxnKeyRecord {
        kid: get(row, "kid", KIND)?,
        jwk: get(row, "jwk", KIND)?,
        replica: get(row, "replica", KIND)?,
        published_at: get(row, "published_at", KIND)?,
        expires_at: get(row, "expires_at", KIND)?,
    })
}

/// Reads a `template_issues` row.
pub(super) fn template_issue_from_row<R>(row: &R) -> Result<TemplateIssue, StoreError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    const KIND: &str = "template issue";
    let agent_id: String = get(row, "agent_id", KIND)?;
    let spiffe_id: String = get(row, "spiffe_id", KIND)?;
    Ok(TemplateIssue {
        entry_id: get(row, "entry_id", KIND)?,
        agent_id: parse_spiffe_id(&agent_id, KIND)?,
        spiffe_id: parse_spiffe_id(&spiffe_id, KIND)?,
        first_issued_at: get(row, "first_issued_at", KIND)?,
        last_issued_at: get(row, "last_issued_at", KIND)?,
    })
}

/// A stored count as `u64`.
pub(super) fn count_from_i64(count: i64) -> Result<u64, StoreError> {
    from_i64(count, "entry", "count")
}

fn corrupt(kind: &'static str, detail: String) -> StoreError {
    StoreError::Corrupt { kind, detail }
}

fn from_i64(value: i64, kind: &'static str, field: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| corrupt(kind, format!("{field} {value} is negative")))
}

fn parse_spiffe_id(text: &str, kind: &'static str) -> Result<SpiffeId, StoreError> {
    SpiffeId::new(text).map_err(|e| corrupt(kind, format!("SPIFFE ID {:?}: {e}", truncated(text))))
}

fn parse_selector(text: &str, kind: &'static str) -> Result<Selector, StoreError> {
    text.parse()
        .map_err(|e| corrupt(kind, format!("selector {:?}: {e}", truncated(text))))
}

fn parse_selector_json(text: &str, kind: &'static str) -> Result<Vec<Selector>, StoreError> {
    let texts: Vec<String> = from_json(text, kind, "selectors")?;
    texts.iter().map(|s| parse_selector(s, kind)).collect()
}

fn from_json<T: serde::de::DeserializeOwned>(
    text: &str,
    kind: &'static str,
    field: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| corrupt(kind, format!("{field} is not the expected JSON: {e}")))
}

/// At most 80 characters of a stored value, for error messages.
fn truncated(text: &str) -> String {
    text.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_key_depends_on_every_part() {
        let a = SpiffeId::new("spiffe://example.org/a").unwrap();
        let b = SpiffeId::new("spiffe://example.org/b").unwrap();
        let s1: Selector = "unix:uid:1".parse().unwrap();
        let s2: Selector = "unix:uid:2".parse().unwrap();
        let base = identity_key(&a, None, &b, &[&s1, &s2]);
        assert_eq!(base.len(), 64);
        assert_ne!(base, identity_key(&b, None, &a, &[&s1, &s2]));
        assert_ne!(base, identity_key(&a, None, &b, &[&s1]));
        assert_ne!(base, identity_key(&a, Some("t"), &b, &[&s1, &s2]));
        assert_ne!(
            identity_key(&a, Some("t"), &b, &[]),
            identity_key(&a, Some("u"), &b, &[])
        );
        assert_eq!(base, identity_key(&a, None, &b, &[&s1, &s2]));
    }

    #[test]
    fn generated_statements_number_their_parameters() {
        assert_eq!(
            insert_selectors_sql(2).unwrap(),
            "INSERT INTO entry_selectors (entry_id, selector_count, type, value) \
             VALUES ($1, $2, $3, $4), ($5, $6, $7, $8)"
        );
        assert!(insert_entries_sql(2).unwrap().ends_with(
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, 1), ($19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, \
             $33, $34, $35, $36, 1)"
        ));
        assert!(insert_entries_sql(ENTRY_ROWS_PER_INSERT).is_ok());
        assert!(insert_entries_sql(ENTRY_ROWS_PER_INSERT + 1).is_err());
        assert!(insert_selectors_sql(SELECTOR_ROWS_PER_INSERT).is_ok());
        assert!(insert_selectors_sql(0).is_err());
        assert!(find_by_selectors_sql(2).unwrap().contains(
            "WHERE es.type = $1 AND es.value = $2 UNION ALL SELECT es.entry_id, \
             es.selector_count FROM entry_selectors es WHERE es.type = $3 AND es.value = $4) \
             AS m GROUP BY"
        ));
        assert!(find_by_selectors_sql(0).is_err());
        assert!(find_by_selectors_sql(MAX_SELECTORS).is_ok());
        assert!(find_by_selectors_sql(MAX_SELECTORS + 1).is_err());
    }

    #[test]
    fn newer_schema_is_refused() {
        let applied = [1, 2, 3, 4, 5, 99];
        let newest = SQLITE_MIGRATIONS.iter().map(|m| m.version).max();
        assert!(matches!(
            pending(SQLITE_MIGRATIONS, &applied).map(|p| p.count()),
            Err(StoreError::SchemaTooNew {
                found: 99,
                supported
            }) if Some(supported) == newest
        ));
        let versions = |all: &[Migration]| all.iter().map(|m| m.version).collect::<Vec<_>>();
        let pending_after = |all: &[Migration], applied: &[i64]| {
            pending(all, applied)
                .map(|p| p.map(|m| m.version).collect::<Vec<_>>())
                .unwrap()
        };
        for all in [SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS] {
            // Versions count up from 1 without a gap.
            let every = versions(all);
            assert_eq!(every, (1..=every.len() as i64).collect::<Vec<_>>());
            // A current database gets nothing, a version-1 one everything after 1, a
            // version-3 one everything after 3, a new one everything.
            assert!(pending_after(all, &every).is_empty());
            assert_eq!(pending_after(all, &[1]), every[1..].to_vec());
            assert_eq!(pending_after(all, &[1, 2, 3]), every[3..].to_vec());
            assert_eq!(pending_after(all, &[]), every);
        }
    }
}
