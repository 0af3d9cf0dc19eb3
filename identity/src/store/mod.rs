//! The registration store: entries, attested agents, join tokens, bundles and the CA key
//! journal, behind one [`Store`] trait with two implementations that pass one test suite:
//! [`sqlite::SqliteStore`] (the embedded default) and [`postgres::PostgresStore`] (state
//! shared by many servers).
//!
//! Finding the entries that match a workload uses an index on `(type, value)` of the
//! selectors table: the lookup touches only rows that share a selector with the workload,
//! never every entry.
//!
//! ```no_run
//! # async fn demo() -> Result<(), writ_identity::store::StoreError> {
//! use writ_identity::store::{Store, sqlite::SqliteStore};
//! let store = SqliteStore::open(std::path::Path::new("/var/lib/writ/datastore.sqlite3")).await?;
//! let selectors = vec!["unix:uid:1000".parse().unwrap()];
//! let entries = store.find_entries_by_selectors(&selectors).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use crate::entry::RegistrationEntry;
use crate::selector::Selector;
use crate::spiffe_id::SpiffeId;

pub mod audit;
pub mod cache;
#[cfg(any(test, feature = "test-util"))]
pub mod pg_harness;
pub mod postgres;
pub mod revocation;
mod schema;
mod sql;
pub mod sqlite;
#[cfg(any(test, feature = "test-util"))]
pub mod suite;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No record with that key.
    #[error("{kind} not found")]
    NotFound {
        /// What was looked up.
        kind: &'static str,
    },
    /// A record with the same identity already exists.
    #[error("{kind} already exists")]
    AlreadyExists {
        /// What was created.
        kind: &'static str,
    },
    /// An update lost a race with another writer (its revision was stale).
    #[error("{kind} was changed concurrently (revision conflict)")]
    Conflict {
        /// What was updated.
        kind: &'static str,
    },
    /// Another process holds the SQLite store: a SQLite store serves one server.
    #[error(
        "{path} is held by {holder}: a SQLite store serves one identity server; to run \
         several servers, share a PostgreSQL store (docs/operations.md, \"Many servers\")"
    )]
    Locked {
        /// The lock file.
        path: std::path::PathBuf,
        /// Who holds it (`pid N`), or why it could not be locked.
        holder: String,
    },
    /// A stored row could not be decoded (corruption or a newer schema).
    #[error("stored {kind} is corrupt: {detail}")]
    Corrupt {
        /// What was read.
        kind: &'static str,
        /// Why.
        detail: String,
    },
    /// A bounded table is full (`writ txn revoke` beyond the revocations in force).
    #[error("at most {max} {kind}")]
    TooMany {
        /// What is counted.
        kind: &'static str,
        /// The bound.
        max: usize,
    },
    /// A join token exists but is past its expiry.
    #[error("join token has expired")]
    TokenExpired,
    /// The request was malformed (too many selectors, bad filter).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A reader that never migrates found a database its writer (the identity server)
    /// has not brought up to this build's schema, or has not created yet.
    #[error(
        "database schema version {found} is older than this build's ({supported}): start the identity server (which migrates it) first"
    )]
    SchemaTooOld {
        /// The newest version recorded in the database (0: none).
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The database was migrated by a newer build to a schema this one does not know.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    SchemaTooNew {
        /// The newest version recorded in the database.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
}

/// A node that proved its identity to the server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttestedAgent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// The attestation method (`join_token`, ...).
    pub attestation_type: String,
    /// Serial number of the agent's current SVID (hex).
    pub cert_serial: String,
    /// Unix seconds when the agent's current SVID expires.
    pub cert_expires_at: i64,
    /// Lowercase hex SHA-256 of the agent's current SVID (its leaf certificate, DER): the
    /// node API accepts this certificate and no other. Empty for a record written before
    /// fingerprints were kept (the serial is checked then, once, and the fingerprint
    /// pinned).
    #[serde(default)]
    pub cert_sha256: String,
    /// Lowercase hex SHA-256 of the SVID issued at the last renewal, until the agent
    /// first calls with it (which makes it current and drops the older one); empty when
    /// none is pending.
    #[serde(default)]
    pub next_cert_sha256: String,
    /// Selectors that describe the node.
    pub selectors: Vec<Selector>,
    /// A banned agent may never attest again.
    pub banned: bool,
    /// Unix seconds at first attestation.
    pub created_at: i64,
}

/// A stored join token. The token itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Lowercase hex SHA-256 of the token text.
    pub token_hash: String,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
    /// Selectors given to the agent that uses it (may be empty).
    pub selectors: Vec<Selector>,
}

/// A trust bundle as stored: the SPIFFE bundle JSON document for one trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRecord {
    /// `spiffe://<trust domain>`.
    pub trust_domain_id: String,
    /// SPIFFE bundle JSON.
    pub document: String,
    /// The bundle's `spiffe_sequence`.
    pub sequence: u64,
}

/// Longest field [`Store::create_federation`] and [`Store::update_federation`] accept,
/// in bytes (a web CA PEM is the longest one).
pub const MAX_FEDERATION_FIELD_BYTES: usize = 64 * 1024;
/// Longest refresh error [`Store::record_federation_refresh`] keeps, in bytes (longer
/// ones are cut).
pub const MAX_FEDERATION_ERROR_BYTES: usize = 1024;

/// A federation relationship as stored: where the bundle of a foreign trust domain is
/// fetched from, and how the last refresh went. `crate::server::federation` turns it
/// into a validated `Relationship`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRecord {
    /// `spiffe://<foreign trust domain>`.
    pub trust_domain_id: String,
    /// The foreign bundle endpoint (`https://...`).
    pub bundle_endpoint_url: String,
    /// `https_spiffe` or `https_web`.
    pub profile: String,
    /// The endpoint server's SPIFFE ID (`https_spiffe`); empty for `https_web`.
    pub endpoint_spiffe_id: String,
    /// PEM CA certificates an `https_web` endpoint is verified with instead of the
    /// system roots; empty: the system roots.
    pub web_ca_pem: String,
    /// Unix seconds at creation.
    pub created_at: i64,
    /// Unix seconds of the last successful refresh.
    pub last_refresh_at: Option<i64>,
    /// Why the last refresh failed (`None` after a success).
    pub last_error: Option<String>,
    /// Unix seconds of the next planned refresh.
    pub next_refresh_at: Option<i64>,
}

/// One record of the CA key journal: a CA certificate or JWT key slot with its state,
/// as JSON the CA manager owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// Slot id (unique).
    pub id: String,
    /// `x509` or `jwt`.
    pub kind: String,
    /// The slot, as JSON.
    pub payload: String,
    /// Unix seconds of the last write.
    pub updated_at: i64,
}

/// A sub-agent lease: the child identity an agent granted to a parent workload's child
/// process, until it expires or is released. The TTS reads it to refuse a released
/// child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Unique id (a UUID).
    pub id: String,
    /// The child's SPIFFE ID (under the parent's path). Unique among live leases.
    pub child_id: SpiffeId,
    /// The parent workload's SPIFFE ID.
    pub parent_id: SpiffeId,
    /// The registration entry whose spawn policy allowed the lease.
    pub entry_id: String,
    /// The agent that holds the lease.
    pub agent_id: SpiffeId,
    /// 1 for a child of a registered workload, 2 for its child, ...
    pub depth: u32,
    /// The task name the parent gave.
    pub task: String,
    /// The child's pid and its start time (clock ticks since boot), against pid reuse.
    pub child_pid: i32,
    /// See `child_pid`.
    pub child_start_time: u64,
    /// Unix seconds at creation.
    pub created_at: i64,
    /// Unix seconds when the lease (and the child's SVID) ends.
    pub expires_at: i64,
    /// Unix seconds when the parent released it (or exited); `None` while held.
    pub released_at: Option<i64>,
}

impl LeaseRecord {
    /// Whether the lease still stands at `now`: not released and not expired.
    pub fn is_live(&self, now: i64) -> bool {
        self.released_at.is_none() && now < self.expires_at
    }
}

/// Most IDs remembered per template entry as produced ([`Store::record_template_issue`]
/// keeps the most recently issued ones).
pub const MAX_TEMPLATE_ISSUES_PER_ENTRY: u32 = 256;

/// One ID a template entry produced on one agent: when it was first and last issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateIssue {
    /// The template entry.
    pub entry_id: String,
    /// The agent the SVID was issued through.
    pub agent_id: SpiffeId,
    /// The rendered SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Unix seconds of the first issue.
    pub first_issued_at: i64,
    /// Unix seconds of the latest issue (a renewal counts).
    pub last_issued_at: i64,
}

/// Largest public JWK [`Store::put_txn_key`] accepts, in bytes of JSON.
pub const MAX_TXN_KEY_JWK_BYTES: usize = 4096;
/// Longest key id or replica name [`Store::put_txn_key`] accepts, in bytes.
pub const MAX_TXN_KEY_NAME_BYTES: usize = 256;
/// Most rows [`Store::list_txn_keys`] returns (the first by key id): a bound on what a
/// token service reads, far above what replicas publish (a few keys each).
pub const MAX_TXN_KEYS: u32 = 1024;

/// One public Txn-Token signing key a token service replica publishes, so that every
/// replica serves it in its JWKS and accepts the tokens it signed. Only the public key
/// is ever stored; each replica keeps its private key to itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnKeyRecord {
    /// The key id (the RFC 7638 thumbprint of the key).
    pub kid: String,
    /// The public JWK, as JSON (at most [`MAX_TXN_KEY_JWK_BYTES`]).
    pub jwk: String,
    /// The replica that signs with it.
    pub replica: String,
    /// Unix seconds of the (last) publication.
    pub published_at: i64,
    /// Unix seconds when the key stops being published: its retirement plus the longest
    /// lifetime of a token it signed.
    pub expires_at: i64,
}

/// Narrows [`Store::list_entries`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this parent.
    pub parent_id: Option<SpiffeId>,
}

/// The registration store. Every implementation passes the shared conformance suite
/// (`store::suite`, built with the `test-util` feature).
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Stores a validated entry. Its `revision` becomes 1. An entry with the same
    /// SPIFFE ID, parent and selectors as an existing one is refused with
    /// [`StoreError::AlreadyExists`], and so is a reused id.
    async fn create_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError>;
    /// Stores many validated entries in one transaction (all or none), as
    /// [`Store::create_entry`] would one by one. For imports and benchmarks.
    async fn create_entries(&self, entries: &[RegistrationEntry]) -> Result<(), StoreError>;
    /// The entry with this id.
    async fn fetch_entry(&self, id: &str) -> Result<Option<RegistrationEntry>, StoreError>;
    /// Replaces an entry if `entry.revision` is the stored revision; the stored revision
    /// is bumped. A stale revision gives [`StoreError::Conflict`].
    async fn update_entry(
        &self,
        entry: &RegistrationEntry,
    ) -> Result<RegistrationEntry, StoreError>;
    /// Removes an entry and returns it.
    async fn delete_entry(&self, id: &str) -> Result<RegistrationEntry, StoreError>;
    /// Entries matching the filter, ordered by id.
    async fn list_entries(
        &self,
        filter: &EntryFilter,
    ) -> Result<Vec<RegistrationEntry>, StoreError>;
    /// Entries all of whose selectors are among `selectors` (at most
    /// [`crate::selector::MAX_SELECTORS`]), ordered by id. Uses the selector index.
    async fn find_entries_by_selectors(
        &self,
        selectors: &[Selector],
    ) -> Result<Vec<RegistrationEntry>, StoreError>;
    /// How many entries are stored.
    async fn count_entries(&self) -> Result<u64, StoreError>;

    /// Records a newly attested agent (refuses a duplicate SPIFFE ID).
    async fn create_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError>;
    /// The agent with this SPIFFE ID.
    async fn fetch_agent(&self, id: &SpiffeId) -> Result<Option<AttestedAgent>, StoreError>;
    /// Replaces an agent's record.
    async fn update_agent(&self, agent: &AttestedAgent) -> Result<(), StoreError>;
    /// Removes an agent record.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<(), StoreError>;
    /// All agents, ordered by SPIFFE ID.
    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, StoreError>;
    /// Makes the SVID with fingerprint `cert_sha256` (serial `cert_serial`, expiring at
    /// `cert_expires_at`) the agent's current one, dropping the older one and clearing
    /// the pending one, if it is the pending one (`next_cert_sha256`), or if the record
    /// predates fingerprints (`cert_sha256` empty) and `cert_serial` is the stored serial.
    /// Returns whether it did: one statement, so a concurrent ban or renewal is never
    /// overwritten.
    async fn switch_agent_svid(
        &self,
        id: &SpiffeId,
        cert_sha256: &str,
        cert_serial: &str,
        cert_expires_at: i64,
    ) -> Result<bool, StoreError>;
    /// Records `next_cert_sha256` as the agent's pending SVID (issued by a renewal) if
    /// `current_cert_sha256` is still the agent's current SVID and the agent is not
    /// banned; a renewal before it replaces an unused pending SVID. Returns whether it
    /// did.
    async fn set_next_agent_svid(
        &self,
        id: &SpiffeId,
        current_cert_sha256: &str,
        next_cert_sha256: &str,
    ) -> Result<bool, StoreError>;

    /// Records `trust_domain` (`example.org`) as the trust domain the store serves
    /// unless one is recorded already, and returns the recorded one. Always writes, so a
    /// store that cannot be written fails here (the server calls it at start).
    async fn record_trust_domain(&self, trust_domain: &str) -> Result<String, StoreError>;
    /// The recorded trust domain, if any.
    async fn fetch_trust_domain(&self) -> Result<Option<String>, StoreError>;

    /// Stores a join token (by hash).
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Atomically removes and returns the token with this hash. Succeeds at most once per
    /// token; an expired token is removed and refused with [`StoreError::TokenExpired`].
    async fn consume_join_token(
        &self,
        token_hash: &str,
        now: i64,
    ) -> Result<JoinTokenRecord, StoreError>;
    /// Removes tokens expired at `now`; returns how many.
    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError>;

    /// Stores or replaces a trust bundle.
    async fn put_bundle(&self, bundle: &BundleRecord) -> Result<(), StoreError>;
    /// The bundle for `spiffe://<td>`.
    async fn fetch_bundle(&self, trust_domain_id: &str)
    -> Result<Option<BundleRecord>, StoreError>;
    /// All bundles, ordered by trust domain.
    async fn list_bundles(&self) -> Result<Vec<BundleRecord>, StoreError>;
    /// Stores `bundle` only if the stored bundle's sequence is still `previous` (`None`:
    /// only if there is none): how servers sharing a store publish one bundle without
    /// overwriting each other. Returns whether it did.
    async fn swap_bundle(
        &self,
        bundle: &BundleRecord,
        previous: Option<u64>,
    ) -> Result<bool, StoreError>;
    /// Removes a bundle.
    async fn delete_bundle(&self, trust_domain_id: &str) -> Result<(), StoreError>;

    /// Stores a new federation relationship ([`StoreError::AlreadyExists`] if its trust
    /// domain has one); its refresh status starts empty. [`StoreError::Invalid`] for a
    /// field longer than [`MAX_FEDERATION_FIELD_BYTES`] or an empty trust domain or URL.
    async fn create_federation(&self, record: &FederationRecord) -> Result<(), StoreError>;
    /// Replaces a relationship's settings (URL, profile, endpoint ID, web CA), keeping its
    /// creation time and refresh status. [`StoreError::NotFound`] if there is none.
    async fn update_federation(&self, record: &FederationRecord) -> Result<(), StoreError>;
    /// The relationship with the trust domain `spiffe://<td>`.
    async fn fetch_federation(
        &self,
        trust_domain_id: &str,
    ) -> Result<Option<FederationRecord>, StoreError>;
    /// All relationships, ordered by trust domain.
    async fn list_federations(&self) -> Result<Vec<FederationRecord>, StoreError>;
    /// Removes a relationship ([`StoreError::NotFound`] if there is none). The trust
    /// domain's stored bundle stays (as SPIRE's): `delete_bundle` removes it.
    async fn delete_federation(&self, trust_domain_id: &str) -> Result<(), StoreError>;
    /// Records a refresh: `refreshed_at` (a success: clears the error) or `error` (a
    /// failure: the last success stays), and when the next refresh is due. Returns
    /// whether the relationship still exists. An error is cut to
    /// [`MAX_FEDERATION_ERROR_BYTES`].
    async fn record_federation_refresh(
        &self,
        trust_domain_id: &str,
        refreshed_at: Option<i64>,
        error: Option<&str>,
        next_refresh_at: i64,
    ) -> Result<bool, StoreError>;

    /// Stores or replaces a journal record.
    async fn put_journal(&self, record: &JournalRecord) -> Result<(), StoreError>;
    /// All journal records, ordered by id.
    async fn list_journal(&self) -> Result<Vec<JournalRecord>, StoreError>;
    /// Removes a journal record.
    async fn delete_journal(&self, id: &str) -> Result<(), StoreError>;

    /// Stores a new lease. [`StoreError::AlreadyExists`] if its id or child ID is taken.
    async fn create_lease(&self, lease: &LeaseRecord) -> Result<(), StoreError>;
    /// The lease with this id.
    async fn fetch_lease(&self, id: &str) -> Result<Option<LeaseRecord>, StoreError>;
    /// The lease of this child SPIFFE ID.
    async fn fetch_lease_by_child(
        &self,
        child_id: &SpiffeId,
    ) -> Result<Option<LeaseRecord>, StoreError>;
    /// Marks the lease released at `now` (kept if already released) and returns it.
    /// [`StoreError::NotFound`] if there is no such lease.
    async fn release_lease(&self, id: &str, now: i64) -> Result<LeaseRecord, StoreError>;
    /// The leases of `parent_id` (all parents when `None`), oldest first; with `live_at`,
    /// only those live at that time.
    async fn list_leases(
        &self,
        parent_id: Option<&SpiffeId>,
        live_at: Option<i64>,
    ) -> Result<Vec<LeaseRecord>, StoreError>;
    /// Deletes leases that ended (expired or released) before `before`; returns how many.
    async fn prune_leases(&self, before: i64) -> Result<u64, StoreError>;

    /// Records that template entry `entry_id` produced `spiffe_id` on `agent_id` at
    /// `now`: a new row, or a later `last_issued_at` on the existing one. Keeps at most
    /// [`MAX_TEMPLATE_ISSUES_PER_ENTRY`] rows per entry (the most recently issued); the
    /// rows go with the entry when it is deleted.
    async fn record_template_issue(
        &self,
        entry_id: &str,
        agent_id: &SpiffeId,
        spiffe_id: &SpiffeId,
        now: i64,
    ) -> Result<(), StoreError>;
    /// The IDs template entry `entry_id` produced, most recently issued first.
    async fn list_template_issues(&self, entry_id: &str) -> Result<Vec<TemplateIssue>, StoreError>;

    /// Every change written to the store from now on, by this process or (PostgreSQL)
    /// any other server on the same database, after it committed. A receiver that falls
    /// [`CHANGE_BACKLOG`] behind gets `Lagged`, which means the same as
    /// [`StoreChange::Resync`].
    fn changes(&self) -> tokio::sync::broadcast::Receiver<StoreChange>;
    /// Stores or replaces (by `kid`) a token service replica's public key. Refuses with
    /// [`StoreError::Invalid`] a JWK larger than [`MAX_TXN_KEY_JWK_BYTES`], an empty or
    /// over-long kid or replica name.
    async fn put_txn_key(&self, key: &TxnKeyRecord) -> Result<(), StoreError>;
    /// The published keys not yet expired at `now` (`expires_at > now`), ordered by kid,
    /// at most [`MAX_TXN_KEYS`].
    async fn list_txn_keys(&self, now: i64) -> Result<Vec<TxnKeyRecord>, StoreError>;
    /// Removes the keys expired at `now`; returns how many.
    async fn prune_txn_keys(&self, now: i64) -> Result<u64, StoreError>;

    /// Appends `events` (at most [`audit::MAX_APPEND`], each within the limits of
    /// [`audit::AuditEvent::check`]) to the audit chain in one transaction that holds
    /// the chain head, so concurrent writers (other replicas on one PostgreSQL store)
    /// never fork it. Returns the sequence of the last row (the head).
    async fn append_audit(&self, events: &[audit::AuditEvent]) -> Result<u64, StoreError>;
    /// The chain's anchor: its head and the end of the pruned prefix.
    async fn audit_anchor(&self) -> Result<audit::AuditAnchor, StoreError>;
    /// Rows with a sequence above `after`, ascending, at most `limit` (capped at
    /// [`audit::MAX_READ`]).
    async fn list_audit(&self, after: u64, limit: u32) -> Result<Vec<audit::AuditRow>, StoreError>;
    /// The rows of transaction `txn`, ascending, at most `limit` (capped at
    /// [`audit::MAX_READ`]).
    async fn audit_txn(&self, txn: &str, limit: u32) -> Result<Vec<audit::AuditRow>, StoreError>;
    /// Transactions, latest activity first, at most `limit` (capped at
    /// [`audit::MAX_TXN_LIST`]); with a non-empty `query` (at most
    /// [`audit::MAX_QUERY_BYTES`]), only those whose id, user or any workload contains
    /// it, ignoring case.
    async fn list_audit_txns(
        &self,
        query: &str,
        limit: u32,
    ) -> Result<Vec<audit::AuditTxnSummary>, StoreError>;
    /// The transactions with rows above sequence `after`, each with its highest
    /// sequence, in that order, at most `limit` (capped at [`audit::MAX_TXN_LIST`]).
    async fn audit_txns_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Retention: removes the longest prefix of rows all older than `before_ms` (Unix
    /// milliseconds) and records its last row in the anchor, so the chain still
    /// verifies. Returns how many rows went.
    async fn prune_audit(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Records a revocation (checked with [`revocation::NewRevocation::check`]) and its
    /// audit event (kind `revocation`) in one transaction, and returns it with its `seq`,
    /// greater than every `seq` before it and never reused. Refuses with
    /// [`StoreError::TooMany`] when [`revocation::MAX_IN_FORCE`] are in force at its
    /// `revoked_at`, with [`StoreError::Invalid`] what fails the check.
    async fn insert_revocation(
        &self,
        revocation: &revocation::NewRevocation,
    ) -> Result<writ_spiffe::revocation::Revocation, StoreError>;
    /// The revocations in force at `now` (`lapses_at > now`) with a `seq` above `after`,
    /// ascending, at most `limit` (capped at [`revocation::MAX_LIST`]).
    async fn list_revocations(
        &self,
        after: u64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<revocation::RevocationRecord>, StoreError>;
    /// Removes the revocations lapsed at `now`; returns how many.
    async fn prune_revocations(&self, now: i64) -> Result<u64, StoreError>;
}

/// A change some writer (this process or another server on the same database) made to
/// the store: what a reader holding a copy should re-read. [`Store::changes`] delivers
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreChange {
    /// The entry with this id was created, updated or deleted.
    Entry(String),
    /// The agent with this SPIFFE ID was created, updated or deleted.
    Agent(String),
    /// The CA key journal changed.
    Journal,
    /// The bundle of this trust domain (`spiffe://<td>`) was stored or deleted.
    Bundle(String),
    /// A revocation was recorded: read `list_revocations` past the last `seq` seen.
    Revocation,
    /// Changes may have been missed (the listener reconnected, or a receiver lagged
    /// behind): re-read everything.
    Resync,
}

impl StoreChange {
    /// The change a notification payload (`entry:<id>`, `agent:<spiffe id>`,
    /// `journal:<id>`, `bundle:<td>`, `revocation:<seq>`) names; `None` for one this build does not know.
    pub fn from_payload(payload: &str) -> Option<Self> {
        let (kind, key) = payload.split_once(':')?;
        Some(match kind {
            "entry" => Self::Entry(key.to_owned()),
            "agent" => Self::Agent(key.to_owned()),
            "journal" => Self::Journal,
            "bundle" => Self::Bundle(key.to_owned()),
            "revocation" => Self::Revocation,
            _ => return None,
        })
    }
}

/// How many changes a subscriber may fall behind before it sees
/// [`tokio::sync::broadcast::error::RecvError::Lagged`] (treat it as
/// [`StoreChange::Resync`]).
pub const CHANGE_BACKLOG: usize = 4096;

/// A shared store handle.
pub type SharedStore = Arc<dyn Store>;
