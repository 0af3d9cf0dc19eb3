//! Replicas of one logical token service: several `writ txn run` behind one issuer URL
//! share the identity server's store (`[identity_store]`), and through its `txn_keys`
//! table, their public signing keys.
//!
//! Each replica keeps its private keys to itself ([`SigningKeys`], in its own data
//! directory) and publishes only the public keys, each with the time after which no
//! token it signed is still valid. A replica's key set, the one its JWKS serves and
//! the one it verifies a Txn-Token presented for replacement with, is its own keys and
//! every unexpired published key. So a token minted by one replica is replaced by
//! another, and either JWKS verifies both replicas' tokens.
//!
//! The published keys are read again every [`REFRESH_INTERVAL`], and at once (at most
//! once per [`MIN_REFRESH_GAP`]) when a presented token names a key id this replica does
//! not know: a token another replica minted a moment ago is replaced without waiting. A
//! replica publishes a new key before it returns the first token the key signed. A
//! replica that stops leaves its keys published until they expire, which is when the
//! last token they signed expires; expired rows are pruned by any replica.
//!
//! Rate limits stay per replica: the limiter protects the replica's own CPU, and a
//! shared counter would put a database round trip on every exchange.
//!
//! ```no_run
//! # async fn demo(store: writ_identity::store::SharedStore,
//! #     keys: std::sync::Arc<writ_txn_service::txn_token::SigningKeys>)
//! #     -> Result<(), writ_txn_service::replica::ReplicaError> {
//! use std::sync::Arc;
//! use writ_identity::clock::SystemClock;
//! use writ_txn_service::replica::{Replica, ReplicaName};
//! let replica = Arc::new(Replica::new(
//!     ReplicaName::new("tts-a")?,
//!     store,
//!     keys,
//!     Arc::new(SystemClock),
//! ));
//! replica.publish().await?;
//! replica.refresh().await?;
//! let _task = replica.clone().spawn(); // publish, refresh and prune every 5 s
//! let key_set = replica.public_keys(); // own keys + the other replicas'
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use writ_identity::bundle::Jwk;
use writ_identity::clock::SharedClock;
use writ_identity::store::{
    MAX_TXN_KEY_JWK_BYTES, MAX_TXN_KEYS, SharedStore, StoreError, TxnKeyRecord,
};

use crate::txn_token::SigningKeys;

/// How often a replica reads the other replicas' keys (and publishes and prunes).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest time between two reads of the keys caused by unknown key ids: a
/// stream of tokens naming made-up key ids costs at most one query per this period.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);
/// The longest replica name.
pub const MAX_REPLICA_NAME: usize = 64;

/// Why a replica could not be named, publish or read keys.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// The replica name is empty, too long or has characters other than letters,
    /// digits, `.`, `_` and `-`.
    #[error("replica name {0:?} must be 1 to {MAX_REPLICA_NAME} letters, digits, '.', '_' or '-'")]
    Name(String),
    /// The identity store failed.
    #[error("identity store: {0}")]
    Store(#[from] StoreError),
}

/// The name of a replica, recorded beside the keys it publishes (for operators: which
/// replica signs with which key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaName(String);

impl ReplicaName {
    /// Checks a configured name.
    ///
    /// # Errors
    /// [`ReplicaError::Name`] for an empty, over-long or oddly spelled name.
    pub fn new(name: &str) -> Result<Self, ReplicaError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_REPLICA_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(ReplicaError::Name(name.to_owned()))
        }
    }

    /// The default name: the host name (in Kubernetes, the pod name), or `tts-<random>`
    /// when there is none usable.
    pub fn from_host() -> Self {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .and_then(|h| Self::new(h.trim()).ok())
            .unwrap_or_else(|| {
                let id = uuid::Uuid::new_v4().simple().to_string();
                Self(format!("tts-{}", id.get(..12).unwrap_or(&id)))
            })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ReplicaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key read from the store.
#[derive(Debug, Clone)]
struct PeerKey {
    jwk: Jwk,
    expires_at: i64,
}

/// One replica of a logical token service: its own signing keys, published to the
/// shared store, and the keys the other replicas published there.
#[derive(Debug)]
pub struct Replica {
    name: ReplicaName,
    store: SharedStore,
    keys: Arc<SigningKeys>,
    clock: SharedClock,
    /// Every unexpired key read from the store at the last refresh, by kid.
    peers: arc_swap::ArcSwap<BTreeMap<String, PeerKey>>,
    /// When the keys were last read for an unknown key id (held across every read:
    /// one read at a time).
    last_refresh: tokio::sync::Mutex<Option<SystemTime>>,
    /// What was published: kid -> `expires_at` (held across a publication).
    published: tokio::sync::Mutex<BTreeMap<String, i64>>,
    /// The ring generation last published completely (`u64::MAX`: none yet).
    published_generation: AtomicU64,
    /// Key ids of malformed rows already warned about (cleared when large).
    warned: std::sync::Mutex<BTreeSet<String>>,
}

impl Replica {
    /// A replica named `name` that publishes `keys` to `store` (a connection that may
    /// write, see `writ_identity::server::config::Datastore::open_shared`). Nothing is
    /// read or written until [`Replica::publish`] and [`Replica::refresh`].
    pub fn new(
        name: ReplicaName,
        store: SharedStore,
        keys: Arc<SigningKeys>,
        clock: SharedClock,
    ) -> Self {
        Self {
            name,
            store,
            keys,
            clock,
            peers: arc_swap::ArcSwap::from_pointee(BTreeMap::new()),
            last_refresh: tokio::sync::Mutex::new(None),
            published: tokio::sync::Mutex::new(BTreeMap::new()),
            published_generation: AtomicU64::new(u64::MAX),
            warned: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    /// The replica's name.
    pub fn name(&self) -> &ReplicaName {
        &self.name
    }

    /// The replica's own signing keys.
    pub fn keys(&self) -> &Arc<SigningKeys> {
        &self.keys
    }

    /// Whether the ring changed since it was last published completely (cheap: what
    /// the exchange path asks after every mint).
    pub fn needs_publish(&self) -> bool {
        self.keys.generation() != self.published_generation.load(Ordering::Acquire)
    }

    /// Publishes each of the ring's public keys whose row is missing or has another
    /// `expires_at` (a rotation rewrites the retired key's row with its retirement
    /// time). Returns how many rows were written.
    ///
    /// # Errors
    /// [`ReplicaError::Store`] if a row cannot be written (the next call tries again).
    pub async fn publish(&self) -> Result<usize, ReplicaError> {
        let mut published = self.published.lock().await;
        let generation = self.keys.generation();
        if generation == self.published_generation.load(Ordering::Acquire) {
            return Ok(0);
        }
        let now = self.clock.unix_seconds();
        let mut written = 0;
        for key in self.keys.published_keys() {
            if published.get(&key.kid) == Some(&key.expires_at) {
                continue;
            }
            let jwk = serde_json::to_string(&key.jwk)
                .map_err(|e| StoreError::Invalid(format!("public key: {e}")))?;
            self.store
                .put_txn_key(&TxnKeyRecord {
                    kid: key.kid.clone(),
                    jwk,
                    replica: self.name.0.clone(),
                    published_at: now,
                    expires_at: key.expires_at,
                })
                .await?;
            tracing::info!(kid = %key.kid, replica = %self.name, expires_at = key.expires_at, "published Txn-Token key");
            published.insert(key.kid, key.expires_at);
            written += 1;
        }
        published.retain(|_, expires_at| *expires_at > now);
        self.published_generation
            .store(generation, Ordering::Release);
        Ok(written)
    }

    /// Reads every unexpired published key again. Returns how many were read and
    /// usable; a malformed row is skipped with a warning.
    ///
    /// # Errors
    /// [`ReplicaError::Store`] if the store cannot be read (the keys read before stay).
    pub async fn refresh(&self) -> Result<usize, ReplicaError> {
        let _one_at_a_time = self.last_refresh.lock().await;
        self.read_keys().await
    }

    /// Reads the keys; the caller holds `last_refresh`.
    async fn read_keys(&self) -> Result<usize, ReplicaError> {
        let rows = self.store.list_txn_keys(self.clock.unix_seconds()).await?;
        if rows.len() >= MAX_TXN_KEYS as usize {
            tracing::warn!(
                max = MAX_TXN_KEYS,
                "the identity store holds more Txn-Token keys than a replica reads"
            );
        }
        let peers: BTreeMap<String, PeerKey> = rows
            .into_iter()
            .filter_map(|row| match parse_key(&row) {
                Ok(jwk) => Some((
                    row.kid,
                    PeerKey {
                        jwk,
                        expires_at: row.expires_at,
                    },
                )),
                Err(why) => {
                    self.warn_once(&row, &why);
                    None
                }
            })
            .collect();
        let count = peers.len();
        self.peers.store(Arc::new(peers));
        Ok(count)
    }

    fn warn_once(&self, row: &TxnKeyRecord, why: &str) {
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        if warned.len() >= MAX_TXN_KEYS as usize {
            warned.clear();
        }
        if warned.insert(row.kid.clone()) {
            tracing::warn!(kid = %row.kid.escape_debug(), replica = %row.replica.escape_debug(), reason = why, "skipping a malformed Txn-Token key in the identity store");
        }
    }

    /// Whether `kid` is in the key set.
    pub fn knows(&self, kid: &str) -> bool {
        let now = self.clock.unix_seconds();
        self.keys.public_keys().contains_key(kid)
            || self
                .peers
                .load()
                .get(kid)
                .is_some_and(|k| k.expires_at > now)
    }

    /// Makes sure `kid` is known if any replica has published it: reads the keys again
    /// when it is unknown, unless an unknown key id made them be read less than
    /// [`MIN_REFRESH_GAP`] ago. Concurrent callers wait for one read. Returns whether
    /// `kid` is known.
    pub async fn refresh_for(&self, kid: &str) -> bool {
        if self.knows(kid) {
            return true;
        }
        let mut last = self.last_refresh.lock().await;
        if self.knows(kid) {
            return true;
        }
        let now = self.clock.now();
        let recent = last.is_some_and(|at| {
            now.duration_since(at)
                .map_or(true, |gap| gap < MIN_REFRESH_GAP)
        });
        if recent {
            return false;
        }
        *last = Some(now);
        if let Err(e) = self.read_keys().await {
            tracing::warn!(error = %e, "reading the Txn-Token keys for an unknown key id failed");
        }
        self.knows(kid)
    }

    /// The key set: the replica's own published keys and every other replica's
    /// unexpired key (key id -> public key). What the JWKS serves and what a replaced
    /// Txn-Token is verified with.
    pub fn public_keys(&self) -> BTreeMap<String, Jwk> {
        let now = self.clock.unix_seconds();
        let mut keys: BTreeMap<String, Jwk> = self
            .peers
            .load()
            .iter()
            .filter(|(_, k)| k.expires_at > now)
            .map(|(kid, k)| (kid.clone(), k.jwk.clone()))
            .collect();
        keys.extend(self.keys.public_keys());
        keys
    }

    /// One round of upkeep: rotates the own key if due, publishes what changed, reads
    /// the other replicas' keys and prunes expired rows. Failures are logged; the next
    /// round tries again.
    pub async fn tick(&self) {
        if let Err(e) = self.keys.rotate_if_due() {
            tracing::error!(error = %e, "Txn-Token key rotation failed");
        }
        if let Err(e) = self.publish().await {
            tracing::warn!(error = %e, "publishing the Txn-Token keys failed");
        }
        if let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "reading the Txn-Token keys failed");
        }
        match self.store.prune_txn_keys(self.clock.unix_seconds()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pruned = n, "pruned expired Txn-Token keys"),
            Err(e) => tracing::warn!(error = %e, "pruning the Txn-Token keys failed"),
        }
    }

    /// Runs [`Replica::tick`] every [`REFRESH_INTERVAL`] until the task is aborted.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REFRESH_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.tick().await;
            }
        })
    }
}

/// The public key of a stored row: JSON of an EC P-256 (ES256) or Ed25519 (EdDSA) JWK,
/// at most [`MAX_TXN_KEY_JWK_BYTES`], whose thumbprint is the row's key id.
fn parse_key(row: &TxnKeyRecord) -> Result<Jwk, String> {
    if row.jwk.len() > MAX_TXN_KEY_JWK_BYTES {
        return Err(format!("JWK larger than {MAX_TXN_KEY_JWK_BYTES} bytes"));
    }
    let jwk: Jwk = serde_json::from_str(&row.jwk).map_err(|e| format!("JWK: {e}"))?;
    let coordinate = |v: &Option<String>| {
        v.as_deref()
            .and_then(|c| {
                base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, c).ok()
            })
            .is_some_and(|c| c.len() == 32)
    };
    let ec_p256 = jwk.kty == "EC"
        && jwk.crv.as_deref() == Some("P-256")
        && coordinate(&jwk.x)
        && coordinate(&jwk.y);
    let ed25519 = jwk.kty == "OKP"
        && jwk.crv.as_deref() == Some("Ed25519")
        && coordinate(&jwk.x)
        && jwk.y.is_none();
    if !ec_p256 && !ed25519 {
        return Err("not an EC P-256 or Ed25519 public key".into());
    }
    if jwk.thumbprint().map_err(|e| e.to_string())? != row.kid {
        return Err("the key id is not the key's thumbprint".into());
    }
    Ok(jwk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_names() {
        for good in [
            "tts-a",
            "tts-7d9f8c-x2x",
            "a",
            &"a".repeat(MAX_REPLICA_NAME),
        ] {
            assert_eq!(ReplicaName::new(good).unwrap().as_str(), good);
        }
        for bad in ["", "a b", "tts/a", "é", &"a".repeat(MAX_REPLICA_NAME + 1)] {
            assert!(ReplicaName::new(bad).is_err(), "{bad:?}");
        }
        let host = ReplicaName::from_host();
        assert!(ReplicaName::new(host.as_str()).is_ok());
    }

    #[test]
    fn garbage_rows_are_refused_not_panicked_on() {
        let key = writ_identity::key_manager::PrivateKey::generate().unwrap();
        let minter = crate::txn_token::Minter::new(key).unwrap();
        let row = |kid: &str, jwk: String| TxnKeyRecord {
            kid: kid.into(),
            jwk,
            replica: "r".into(),
            published_at: 0,
            expires_at: i64::MAX,
        };
        let good = serde_json::to_string(minter.jwk()).unwrap();
        assert_eq!(
            parse_key(&row(minter.kid(), good.clone())).unwrap(),
            *minter.jwk()
        );
        for (kid, jwk) in [
            ("k", good.clone()),
            (minter.kid(), "{".into()),
            (minter.kid(), "null".into()),
            (minter.kid(), r#"{"kty":"EC"}"#.into()),
            (minter.kid(), r#"{"kty":"oct","k":"AAAA"}"#.into()),
            (
                minter.kid(),
                r#"{"kty":"EC","crv":"P-256","x":"!!","y":"AA"}"#.into(),
            ),
            (minter.kid(), " ".repeat(MAX_TXN_KEY_JWK_BYTES + 1)),
        ] {
            assert!(parse_key(&row(kid, jwk.clone())).is_err(), "{jwk}");
        }
        // An EdDSA replica's key is shared the same way.
        let ed =
            crate::txn_token::Minter::generate(crate::txn_token::SigningAlgorithm::EdDsa).unwrap();
        let good = serde_json::to_string(ed.jwk()).unwrap();
        assert_eq!(parse_key(&row(ed.kid(), good)).unwrap(), *ed.jwk());
        let bad = format!(
            r#"{{"kty":"OKP","crv":"Ed25519","x":{:?},"y":"AA"}}"#,
            ed.jwk().x.as_deref().unwrap()
        );
        assert!(parse_key(&row(ed.kid(), bad)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_rows_never_panic(kid in ".{0,80}", jwk in ".{0,300}") {
            let _ = parse_key(&TxnKeyRecord {
                kid,
                jwk,
                replica: "r".into(),
                published_at: 0,
                expires_at: 0,
            });
        }
    }
}
