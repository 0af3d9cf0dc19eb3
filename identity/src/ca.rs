//! The trust domain's certificate authority and JWT signer, with SPIRE-style rotation.
//!
//! The X.509 CA is self-signed (EC P-256) by default, or an intermediate signed by an
//! upstream CA loaded from PEM files. JWT-SVIDs are signed with separate P-256 keys.
//! Both rotate the same way:
//!
//! - at half of the active authority's lifetime the next one is *prepared* and published
//!   in the bundle, so relying parties learn it before it is used;
//! - at five sixths it is *activated* and the previous one becomes *old*;
//! - an old authority stays in the bundle until its own expiry, and since every SVID is
//!   capped to expire no later than its signer, nothing it signed outlives it.
//!
//! State survives restarts: slot metadata lives in the store's key journal and private
//! keys in a [`crate::key_manager::KeyManager`]. Time comes from a [`crate::clock::Clock`]; call
//! [`CertificateAuthority::rotate`] periodically (the server does it every few seconds).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::bundle::{Bundle, Jwk};
use crate::clock::{SharedClock, from_unix_seconds};
use crate::key_manager::ToRcgen as _;
use crate::key_manager::{KeyError, PrivateKey, SharedKeyManager};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{BundleRecord, JournalRecord, SharedStore, StoreError};
use crate::svid::jwt::{self, MAX_AUDIENCES};
use crate::svid::x509::X509Svid;

mod leaf;

use leaf::{LeafFields, LeafTemplate, SanName};

/// How far back an SVID's notBefore is set, to absorb clock skew.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// The subject organizational unit that marks the identity server's own node API SVID
/// (`spiffe://<td>/writ/server`). Only the CA's server path
/// (`CertificateAuthority::mint_server_svid`, crate-private) sets it: SVIDs signed for
/// entries, `x509 mint`, leases and agents never carry an organizational unit at all. An
/// agent requires it (see [`is_server_svid`]), so no other SVID of the trust domain, even
/// one that carries the server's SPIFFE ID, can pose as the server.
pub const SERVER_SVID_MARKER: &str = "Writ identity server";

/// Whether a leaf certificate (DER) carries [`SERVER_SVID_MARKER`] in its subject. Says
/// nothing about its chain: check that first.
pub fn is_server_svid(leaf_der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(leaf_der).is_ok_and(|(_, cert)| {
        cert.subject()
            .iter_organizational_unit()
            .any(|ou| ou.as_str() == Ok(SERVER_SVID_MARKER))
    })
}

/// What went wrong in the CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A key could not be generated, stored or loaded.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The journal or bundle could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Building or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Signing a JWT failed.
    #[error(transparent)]
    Jwt(#[from] jwt::JwtSvidError),
    /// The requested SPIFFE ID is not in this CA's trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The ID.
        id: String,
        /// This CA's trust domain.
        trust_domain: String,
    },
    /// The request is malformed (no audience, bad public key, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No usable authority (the CA has not been initialised, or everything expired).
    #[error("no active {0} authority")]
    NoActiveAuthority(&'static str),
    /// The upstream CA files are unusable.
    #[error("upstream CA: {0}")]
    Upstream(String),
}

fn cert_err(e: rcgen::Error) -> CaError {
    CaError::Certificate(e.to_string())
}

/// An upstream CA that signs Writ's intermediate CAs.
#[derive(Debug, Clone)]
pub struct UpstreamAuthority {
    /// The upstream signing certificate first, then its issuers up to the root (DER).
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
    not_after: i64,
}

impl UpstreamAuthority {
    /// Loads the upstream CA certificate chain (PEM, signing certificate first) and its
    /// private key (PEM).
    ///
    /// # Errors
    /// [`CaError::Upstream`] if a file is unreadable or the key does not match.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let chain = crate::svid::x509::chain_from_pem(cert_pem)
            .map_err(|e| CaError::Upstream(e.to_string()))?;
        let first = chain
            .first()
            .ok_or_else(|| CaError::Upstream("certificate file holds no certificate".into()))?;
        let key = PrivateKey::from_pem(key_pem).map_err(|e| CaError::Upstream(e.to_string()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| CaError::Upstream(e.to_string()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Upstream(
                "private key does not match the certificate".into(),
            ));
        }
        if !cert.is_ca() {
            return Err(CaError::Upstream("certificate is not a CA".into()));
        }
        Ok(Self {
            not_after: cert.validity().not_after.timestamp(),
            chain,
            key,
        })
    }

    /// Loads the upstream CA from PEM files.
    ///
    /// # Errors
    /// [`CaError::Upstream`] if a file is unreadable or unusable.
    pub fn from_pem_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, CaError> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| CaError::Upstream(format!("{}: {e}", p.display())))
        };
        Self::from_pem(&read(cert)?, &zeroize::Zeroizing::new(read(key)?))
    }

    fn root(&self) -> Option<&Vec<u8>> {
        self.chain.last()
    }
}

/// How the CA behaves.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The trust domain the CA serves.
    pub trust_domain: TrustDomain,
    /// Lifetime of each X.509 CA.
    pub ca_ttl: Duration,
    /// Lifetime of each JWT signing key.
    pub jwt_key_ttl: Duration,
    /// X509-SVID lifetime when none is asked for.
    pub default_x509_svid_ttl: Duration,
    /// JWT-SVID lifetime when none is asked for.
    pub default_jwt_svid_ttl: Duration,
    /// `spiffe_refresh_hint` published in the bundle.
    pub refresh_hint: Option<Duration>,
    /// Sign intermediates with this CA instead of self-signing.
    pub upstream: Option<UpstreamAuthority>,
    /// The `iss` claim of JWT-SVIDs (`[ca] jwt_issuer`, SPIRE's name): the URL the OIDC
    /// discovery document is served under. `None`: JWT-SVIDs carry no `iss`.
    pub jwt_issuer: Option<String>,
}

impl CaConfig {
    /// Defaults: CA and JWT keys live 24 hours, X509-SVIDs 1 hour, JWT-SVIDs 5 minutes.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            ca_ttl: Duration::from_secs(24 * 3600),
            jwt_key_ttl: Duration::from_secs(24 * 3600),
            default_x509_svid_ttl: Duration::from_secs(3600),
            default_jwt_svid_ttl: Duration::from_secs(300),
            refresh_hint: Some(Duration::from_secs(300)),
            upstream: None,
            jwt_issuer: None,
        }
    }
}

/// Life stage of an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Published in the bundle, not yet signing.
    Prepared,
    /// Signing.
    Active,
    /// Retired, still published until it expires.
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SlotKind {
    X509,
    Jwt,
}

impl SlotKind {
    fn as_str(self) -> &'static str {
        match self {
            SlotKind::X509 => "x509",
            SlotKind::Jwt => "jwt",
        }
    }
}

/// The journal form of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SlotRecord {
    id: String,
    kind: SlotKind,
    state: SlotState,
    not_before: i64,
    not_after: i64,
    /// X.509 only: the CA certificate, then upstream intermediates (not the root), base64.
    #[serde(default)]
    chain: Vec<String>,
    /// JWT only: the public key, so that the other servers sharing the store publish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    jwk: Option<Jwk>,
}

/// Another server's authority, read from the shared journal: published in the bundle
/// until it expires, never signed with, rotated or deleted by this server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PeerSlot {
    record: SlotRecord,
    /// X.509: the CA certificate (DER).
    cert: Option<Vec<u8>>,
}

impl PeerSlot {
    fn from_record(record: SlotRecord) -> Result<Self, CaError> {
        let cert = match record.kind {
            SlotKind::X509 => Some(
                record
                    .chain
                    .first()
                    .map(|c| STANDARD.decode(c))
                    .transpose()
                    .map_err(|e| CaError::Certificate(format!("journal certificate: {e}")))?
                    .ok_or_else(|| {
                        CaError::Certificate("journal slot has no certificate".into())
                    })?,
            ),
            SlotKind::Jwt => None,
        };
        Ok(Self { record, cert })
    }
}

/// A loaded slot: its record and its key, plus the leaf template of X.509 slots.
struct Slot {
    record: SlotRecord,
    key: PrivateKey,
    chain: Vec<Vec<u8>>,
    leaf: Option<LeafTemplate>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl Slot {
    fn load(record: SlotRecord, key: PrivateKey) -> Result<Self, CaError> {
        let chain = record
            .chain
            .iter()
            .map(|c| STANDARD.decode(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::Certificate(format!("journal certificate: {e}")))?;
        let leaf = match (record.kind, chain.first()) {
            (SlotKind::X509, Some(cert)) => Some(LeafTemplate::new(cert, &key)?),
            (SlotKind::X509, None) => {
                return Err(CaError::Certificate(
                    "journal slot has no certificate".into(),
                ));
            }
            (SlotKind::Jwt, _) => None,
        };
        Ok(Self {
            record,
            key,
            chain,
            leaf,
        })
    }

    fn key_id(&self) -> String {
        key_id(&self.record.id)
    }

    fn jwk(&self) -> Option<Jwk> {
        self.key.ec_p256_xy().map(|(x, y)| Jwk::ec_p256(x, y))
    }

    /// Whether `now` is at or past `num/den` of the lifetime.
    fn past_fraction(&self, now: i64, num: i64, den: i64) -> bool {
        let life = self.record.not_after - self.record.not_before;
        now >= self.record.not_before + life * num / den
    }
}

/// How the key manager names a CA slot's key: this prefix, then the slot id.
pub const CA_KEY_PREFIX: &str = "slot-";

fn key_id(slot_id: &str) -> String {
    format!("{CA_KEY_PREFIX}{slot_id}")
}

/// The trust domain the CA in `store`'s key journal signs for (the URI SAN of its X.509
/// authorities), or `None` if the journal holds none. Records of a store written before
/// the trust domain was recorded on its own carry it only there.
///
/// # Errors
/// [`CaError::Store`] if the journal cannot be read.
pub async fn journal_trust_domain(
    store: &dyn crate::store::Store,
) -> Result<Option<String>, CaError> {
    for rec in store.list_journal().await? {
        let Ok(record) = serde_json::from_str::<SlotRecord>(&rec.payload) else {
            continue;
        };
        let Some(der) = record.chain.first().and_then(|c| STANDARD.decode(c).ok()) else {
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && let Some(td) = uri.strip_prefix("spiffe://")
                {
                    return Ok(Some(td.to_owned()));
                }
            }
        }
    }
    Ok(None)
}

/// What the bundle takes of an authority: its record, its X.509 certificate (DER), its
/// JWT key.
type Published<'a> = (&'a SlotRecord, Option<&'a Vec<u8>>, Option<Jwk>);

/// The journal's slots, skipping (with a warning) records that cannot be read.
async fn read_journal(store: &dyn crate::store::Store) -> Result<Vec<SlotRecord>, CaError> {
    let mut out = Vec::new();
    for rec in store.list_journal().await? {
        match serde_json::from_str::<SlotRecord>(&rec.payload) {
            Ok(r) => out.push(r),
            Err(e) => {
                tracing::warn!(slot = %rec.id, error = %e, "skipping unreadable CA journal record");
            }
        }
    }
    Ok(out)
}

#[derive(Debug)]
struct CaState {
    /// This server's authorities (it holds their keys).
    slots: Vec<Arc<Slot>>,
    /// The unexpired authorities of the other servers sharing the store.
    peers: Vec<PeerSlot>,
    bundle: Arc<Bundle>,
}

impl CaState {
    fn active(&self, kind: SlotKind) -> Option<&Arc<Slot>> {
        self.slots
            .iter()
            .find(|s| s.record.kind == kind && s.record.state == SlotState::Active)
    }
}

/// The certificate authority of one trust domain.
#[derive(Debug)]
pub struct CertificateAuthority {
    config: CaConfig,
    clock: SharedClock,
    keys: SharedKeyManager,
    store: SharedStore,
    state: ArcSwap<CaState>,
    rotation: Mutex<()>,
    bundle_tx: watch::Sender<Arc<Bundle>>,
}

impl CertificateAuthority {
    /// Loads the CA's state from the journal and key manager, then rotates once (which
    /// creates the first authorities on a fresh store).
    ///
    /// # Errors
    /// [`CaError`] if the journal, keys or store cannot be read or written.
    pub async fn load(
        config: CaConfig,
        clock: SharedClock,
        keys: SharedKeyManager,
        store: SharedStore,
    ) -> Result<Self, CaError> {
        let td_id = config.trust_domain.id_string();
        let mut bundle = Bundle::new(config.trust_domain.clone());
        if let Some(stored) = store.fetch_bundle(&td_id).await? {
            // Only the sequence is carried over; the content is rebuilt from the journal.
            match Bundle::from_json(config.trust_domain.clone(), &stored.document) {
                Ok(b) => bundle = b,
                Err(e) => tracing::warn!(error = %e, "stored bundle is unreadable; rebuilding it"),
            }
        }
        // This server's authorities are the journal's slots whose keys it holds; the
        // others belong to the other servers sharing the store (or to a key directory
        // that was lost) and are published until they expire, never deleted here.
        let mut slots = Vec::new();
        for record in read_journal(store.as_ref()).await? {
            match keys.get(&key_id(&record.id)) {
                Ok(key) => slots.push(Arc::new(Slot::load(record, key)?)),
                Err(KeyError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let bundle = Arc::new(bundle);
        let (bundle_tx, _) = watch::channel(bundle.clone());
        let ca = Self {
            config,
            clock,
            keys,
            store,
            state: ArcSwap::from_pointee(CaState {
                slots,
                peers: Vec::new(),
                bundle,
            }),
            rotation: Mutex::new(()),
            bundle_tx,
        };
        ca.rotate().await?;
        Ok(ca)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// The CA configuration.
    pub fn config(&self) -> &CaConfig {
        &self.config
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.state.load().bundle.clone()
    }

    /// A receiver that sees every new bundle.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle_tx.subscribe()
    }

    /// Advances the rotation state machine of this server's authorities to the clock's
    /// current time (prepares, activates and retires them), reads the other servers'
    /// authorities from the journal, and publishes the union as the trust domain's
    /// bundle when it changes. Returns whether anything changed.
    ///
    /// Servers sharing a store publish one bundle: each writes it only over the
    /// sequence it read ([`crate::store::Store::swap_bundle`]), and adopts the stored
    /// one when it already holds the same authorities, so their sequences agree.
    ///
    /// # Errors
    /// [`CaError`] if a key or journal write fails; the previous state stays in force.
    pub async fn rotate(&self) -> Result<bool, CaError> {
        let _guard = self.rotation.lock().await;
        let now = self.clock.unix_seconds();
        let current = self.state.load_full();
        let mut slots: Vec<Arc<Slot>> = Vec::new();
        let mut changed = false;

        // Drop own authorities whose lifetime is over: nothing they signed is still
        // valid. Another server's are its own business.
        for slot in &current.slots {
            if slot.record.not_after <= now {
                self.store.delete_journal(&slot.record.id).await?;
                self.keys.delete(&slot.key_id())?;
                changed = true;
            } else {
                slots.push(slot.clone());
            }
        }
        for kind in [SlotKind::X509, SlotKind::Jwt] {
            changed |= self.rotate_kind(kind, now, &mut slots).await?;
        }
        let (peers, bundle) = self.publish(&slots, now, &current.bundle).await?;
        changed |= peers != current.peers;
        let bundle_changed =
            !bundle.same_content(&current.bundle) || bundle.sequence() != current.bundle.sequence();
        if changed || bundle_changed {
            self.state.store(Arc::new(CaState {
                slots,
                peers,
                bundle: bundle.clone(),
            }));
        }
        if bundle_changed {
            tracing::info!(sequence = bundle.sequence(), "trust bundle updated");
            self.bundle_tx.send_replace(bundle);
        }
        Ok(changed || bundle_changed)
    }

    /// Reads the other servers' authorities and makes the stored bundle hold exactly
    /// the union of theirs and `own`: adopts the stored bundle when it does, otherwise
    /// replaces it over the sequence read (again after a lost race).
    async fn publish(
        &self,
        own: &[Arc<Slot>],
        now: i64,
        previous: &Arc<Bundle>,
    ) -> Result<(Vec<PeerSlot>, Arc<Bundle>), CaError> {
        let td_id = self.config.trust_domain.id_string();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let peers = self.peers(own, now).await?;
            let computed = self.build_bundle(own, &peers, previous);
            let stored = self.store.fetch_bundle(&td_id).await?;
            let stored_bundle = stored.as_ref().and_then(|r| {
                Bundle::from_json(self.config.trust_domain.clone(), &r.document).ok()
            });
            if let Some(b) = &stored_bundle
                && b.same_content(&computed)
            {
                if b.same_content(previous) && b.sequence() == previous.sequence() {
                    return Ok((peers, previous.clone()));
                }
                return Ok((peers, Arc::new(b.clone())));
            }
            let mut next = computed;
            let base = stored.as_ref().map_or(0, |r| r.sequence);
            next.set_sequence(base.max(previous.sequence()).saturating_add(1));
            let record = BundleRecord {
                trust_domain_id: td_id.clone(),
                document: next.to_json(),
                sequence: next.sequence(),
            };
            if self
                .store
                .swap_bundle(&record, stored.as_ref().map(|r| r.sequence))
                .await?
            {
                return Ok((peers, Arc::new(next)));
            }
            if attempt >= 5 {
                // Another server keeps publishing: keep ours in memory, agree next time.
                tracing::warn!("trust bundle: lost the race to publish five times; will retry");
                return Ok((peers, Arc::new(next)));
            }
        }
    }

    /// The unexpired journal slots that are not `own`.
    async fn peers(&self, own: &[Arc<Slot>], now: i64) -> Result<Vec<PeerSlot>, CaError> {
        let mut peers = Vec::new();
        for record in read_journal(self.store.as_ref()).await? {
            if record.not_after <= now || own.iter().any(|s| s.record.id == record.id) {
                continue;
            }
            match PeerSlot::from_record(record) {
                Ok(p) => peers.push(p),
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable CA journal slot"),
            }
        }
        Ok(peers)
    }

    async fn rotate_kind(
        &self,
        kind: SlotKind,
        now: i64,
        slots: &mut Vec<Arc<Slot>>,
    ) -> Result<bool, CaError> {
        let find = |slots: &[Arc<Slot>], state| {
            slots
                .iter()
                .position(|s| s.record.kind == kind && s.record.state == state)
        };
        let mut changed = false;
        let prepared = find(slots, SlotState::Prepared);
        match find(slots, SlotState::Active) {
            None => {
                // First start, or everything lapsed while the server was down.
                match prepared {
                    Some(i) => self.set_state(slots, i, SlotState::Active).await?,
                    None => {
                        let slot = self.new_slot(kind, SlotState::Active, now).await?;
                        slots.push(slot);
                    }
                }
                changed = true;
            }
            Some(active) => {
                let active_slot = slots.get(active).cloned();
                if let Some(a) = active_slot {
                    if prepared.is_none() && a.past_fraction(now, 1, 2) {
                        let slot = self.new_slot(kind, SlotState::Prepared, now).await?;
                        tracing::info!(kind = kind.as_str(), slot = %slot.record.id, "prepared next authority");
                        slots.push(slot);
                        changed = true;
                    }
                    if let Some(p) = find(slots, SlotState::Prepared)
                        && a.past_fraction(now, 5, 6)
                    {
                        self.set_state(slots, active, SlotState::Old).await?;
                        self.set_state(slots, p, SlotState::Active).await?;
                        tracing::info!(kind = kind.as_str(), "activated next authority");
                        changed = true;
                    }
                }
            }
        }
        Ok(changed)
    }

    async fn set_state(
        &self,
        slots: &mut [Arc<Slot>],
        index: usize,
        state: SlotState,
    ) -> Result<(), CaError> {
        let Some(slot) = slots.get_mut(index) else {
            return Ok(());
        };
        let mut record = slot.record.clone();
        record.state = state;
        if record.kind == SlotKind::Jwt && record.jwk.is_none() {
            // A slot journaled before public keys were: let the other servers see it.
            record.jwk = slot.jwk();
        }
        self.persist(&record).await?;
        *slot = Arc::new(Slot::load(record, slot.key.clone())?);
        Ok(())
    }

    async fn persist(&self, record: &SlotRecord) -> Result<(), CaError> {
        let payload = serde_json::to_string(record)
            .map_err(|e| CaError::Certificate(format!("journal encode: {e}")))?;
        self.store
            .put_journal(&JournalRecord {
                id: record.id.clone(),
                kind: record.kind.as_str().into(),
                payload,
                updated_at: self.clock.unix_seconds(),
            })
            .await?;
        Ok(())
    }

    async fn new_slot(
        &self,
        kind: SlotKind,
        state: SlotState,
        now: i64,
    ) -> Result<Arc<Slot>, CaError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let key = self.keys.generate(&key_id(&id))?;
        let not_before = now - secs(BACKDATE);
        let (ttl, cap) = match kind {
            SlotKind::X509 => (
                self.config.ca_ttl,
                self.config.upstream.as_ref().map(|u| u.not_after),
            ),
            SlotKind::Jwt => (self.config.jwt_key_ttl, None),
        };
        let mut not_after = now + secs(ttl);
        if let Some(cap) = cap {
            not_after = not_after.min(cap);
        }
        if not_after <= now {
            return Err(CaError::Upstream("upstream CA has expired".into()));
        }
        let chain = match kind {
            SlotKind::X509 => self.ca_certificate(&id, &key, not_before, not_after)?,
            SlotKind::Jwt => Vec::new(),
        };
        let jwk = match kind {
            SlotKind::Jwt => key.ec_p256_xy().map(|(x, y)| Jwk::ec_p256(x, y)),
            SlotKind::X509 => None,
        };
        let record = SlotRecord {
            id,
            kind,
            state,
            not_before,
            not_after,
            chain: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            jwk,
        };
        self.persist(&record).await?;
        Ok(Arc::new(Slot::load(record, key)?))
    }

    /// The CA certificate for a new X.509 slot, then the upstream intermediates.
    fn ca_certificate(
        &self,
        id: &str,
        key: &PrivateKey,
        not_before: i64,
        not_after: i64,
    ) -> Result<Vec<Vec<u8>>, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Writ");
        dn.push(
            DnType::CommonName,
            format!("Writ CA {}", id.get(..8).unwrap_or(id)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            self.config
                .trust_domain
                .id_string()
                .try_into()
                .map_err(cert_err)?,
        )];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.not_before = from_unix_seconds(not_before).into();
        params.not_after = from_unix_seconds(not_after).into();
        params.use_authority_key_identifier_extension = true;
        let keypair = key.to_rcgen()?;
        match &self.config.upstream {
            None => Ok(vec![
                params
                    .self_signed(&keypair)
                    .map_err(cert_err)?
                    .der()
                    .to_vec(),
            ]),
            Some(up) => {
                let signer = up
                    .chain
                    .first()
                    .ok_or_else(|| CaError::Upstream("empty chain".into()))?;
                let issuer = Issuer::from_ca_cert_der(
                    &CertificateDer::from(signer.as_slice()),
                    up.key.to_rcgen()?,
                )
                .map_err(cert_err)?;
                let cert = params.signed_by(&keypair, &issuer).map_err(cert_err)?;
                let mut chain = vec![cert.der().to_vec()];
                // Upstream intermediates (everything but the root, which is in the bundle).
                let n = up.chain.len().saturating_sub(1);
                chain.extend(up.chain.iter().take(n).cloned());
                Ok(chain)
            }
        }
    }

    /// The bundle of `own` and `peers` authorities, in the same order on every server
    /// (by `not_before`, then id).
    fn build_bundle(&self, own: &[Arc<Slot>], peers: &[PeerSlot], previous: &Bundle) -> Bundle {
        let mut bundle = Bundle::new(self.config.trust_domain.clone());
        let mut ordered: Vec<Published<'_>> = own
            .iter()
            .map(|s| (&s.record, s.chain.first(), s.jwk()))
            .chain(
                peers
                    .iter()
                    .map(|p| (&p.record, p.cert.as_ref(), p.record.jwk.clone())),
            )
            .collect();
        ordered.sort_by(|a, b| (a.0.not_before, &a.0.id).cmp(&(b.0.not_before, &b.0.id)));
        match &self.config.upstream {
            Some(up) => {
                if let Some(root) = up.root() {
                    self.add_authority(&mut bundle, root.clone());
                }
            }
            None => {
                for (_, cert, _) in ordered.iter().filter(|s| s.0.kind == SlotKind::X509) {
                    if let Some(cert) = cert {
                        self.add_authority(&mut bundle, (*cert).clone());
                    }
                }
            }
        }
        for (record, _, jwk) in ordered.iter().filter(|s| s.0.kind == SlotKind::Jwt) {
            if let Some(jwk) = jwk
                && let Err(e) = bundle.put_jwt_authority(record.id.clone(), jwk.clone())
            {
                tracing::error!(slot = %record.id, error = %e, "JWT key left out of the bundle");
            }
        }
        bundle.set_refresh_hint(self.config.refresh_hint.map(|d| d.as_secs()));
        bundle.set_sequence(previous.sequence());
        bundle
    }

    fn add_authority(&self, bundle: &mut Bundle, der: Vec<u8>) {
        if let Err(e) = bundle.add_x509_authority(der) {
            tracing::error!(error = %e, "CA certificate left out of the bundle");
        }
    }

    fn check_trust_domain(&self, id: &SpiffeId) -> Result<(), CaError> {
        if id.trust_domain_str() != self.config.trust_domain.as_str() {
            return Err(CaError::ForeignTrustDomain {
                id: id.to_string(),
                trust_domain: self.config.trust_domain.to_string(),
            });
        }
        Ok(())
    }

    /// Signs an X509-SVID for `spiffe_id` over the public key in `spki_der`
    /// (a DER SubjectPublicKeyInfo). The lifetime is `ttl` (or the default), capped so
    /// that the SVID does not outlive the signing CA.
    ///
    /// # Errors
    /// [`CaError`] if the ID is foreign, the key is unusable or signing fails.
    pub fn sign_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        spki_der: &[u8],
        ttl: Option<Duration>,
        dns_names: &[String],
    ) -> Result<X509Svid, CaError> {
        let spki = leaf::subject_public_key(spki_der)?;
        self.sign_leaf(spiffe_id, spki, ttl, dns_names, Leaf::Workload)
    }

    /// Generates a key pair and signs an X509-SVID for it (`writ x509 mint`).
    ///
    /// # Errors
    /// [`CaError`] as for [`Self::sign_x509_svid`].
    pub fn mint_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        ttl: Option<Duration>,
        dns_names: &[String],
    ) -> Result<X509Svid, CaError> {
        let key = PrivateKey::generate()?;
        let spki = key.to_rcgen()?.subject_public_key_info();
        let mut svid = self.sign_leaf(spiffe_id, &spki, ttl, dns_names, Leaf::Workload)?;
        svid.private_key = Some(key);
        Ok(svid)
    }

    /// Generates a key pair and signs the identity server's own node API SVID: `server_id`
    /// with [`SERVER_SVID_MARKER`], which nothing else the CA signs carries.
    ///
    /// # Errors
    /// [`CaError`] as for [`Self::sign_x509_svid`].
    pub(crate) fn mint_server_svid(
        &self,
        server_id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<X509Svid, CaError> {
        let key = PrivateKey::generate()?;
        let spki = key.to_rcgen()?.subject_public_key_info();
        let mut svid = self.sign_leaf(server_id, &spki, ttl, &[], Leaf::Server)?;
        svid.private_key = Some(key);
        Ok(svid)
    }

    fn sign_leaf(
        &self,
        spiffe_id: &SpiffeId,
        spki: &[u8],
        ttl: Option<Duration>,
        dns_names: &[String],
        kind: Leaf,
    ) -> Result<X509Svid, CaError> {
        self.check_trust_domain(spiffe_id)?;
        if let Some(bad) = dns_names.iter().find(|n| !crate::entry::is_san_name(n)) {
            return Err(CaError::InvalidRequest(format!(
                "{bad:?} is neither a DNS name nor an IP address"
            )));
        }
        let state = self.state.load();
        let slot = state
            .active(SlotKind::X509)
            .ok_or(CaError::NoActiveAuthority("X.509"))?;
        let template = slot
            .leaf
            .as_ref()
            .ok_or(CaError::NoActiveAuthority("X.509"))?;
        let now = self.clock.unix_seconds();
        let ttl = ttl.unwrap_or(self.config.default_x509_svid_ttl);
        let not_after = (now + secs(ttl)).min(slot.record.not_after);
        if not_after <= now {
            return Err(CaError::NoActiveAuthority("X.509"));
        }
        // One URI SAN, then the entry's names: an IP literal as an IP SAN, the rest as
        // DNS SANs (the X509-SVID standard allows other SAN types beside the URI SAN).
        let names: Vec<SanName<'_>> = dns_names
            .iter()
            .map(|n| match crate::entry::ip_literal(n) {
                Some(ip) => SanName::Ip(ip),
                None => SanName::Dns(n),
            })
            .collect();
        let der = template.sign(&LeafFields {
            serial: random_serial(),
            not_before: now - secs(BACKDATE),
            not_after,
            organizational_unit: (kind == Leaf::Server).then_some(SERVER_SVID_MARKER),
            // The common name, when there is one, is the first DNS name: an IP address is
            // an IP SAN only (RFC 6125 clients match names against SANs, never the CN).
            common_name: names.iter().find_map(|n| match n {
                SanName::Dns(d) => Some(*d),
                SanName::Ip(_) => None,
            }),
            spiffe_id: spiffe_id.as_str(),
            names: &names,
            spki,
        })?;
        let mut cert_chain = vec![der];
        if self.config.upstream.is_some() {
            cert_chain.extend(slot.chain.iter().cloned());
        }
        Ok(X509Svid {
            spiffe_id: spiffe_id.clone(),
            cert_chain,
            private_key: None,
            expires_at: from_unix_seconds(not_after),
        })
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audience`, valid for `ttl` (or the default),
    /// capped to the signing key's lifetime. Returns the token and its expiry.
    ///
    /// # Errors
    /// [`CaError`] if the ID is foreign, the audience list is empty or too long, or
    /// signing fails.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Duration>,
    ) -> Result<(String, SystemTime), CaError> {
        self.check_trust_domain(spiffe_id)?;
        if audience.is_empty() || audience.len() > MAX_AUDIENCES {
            return Err(CaError::InvalidRequest(format!(
                "between 1 and {MAX_AUDIENCES} audiences are required"
            )));
        }
        if audience.iter().any(|a| a.is_empty() || a.len() > 256) {
            return Err(CaError::InvalidRequest(
                "an audience must be 1 to 256 bytes".into(),
            ));
        }
        let state = self.state.load();
        let slot = state
            .active(SlotKind::Jwt)
            .ok_or(CaError::NoActiveAuthority("JWT"))?;
        let now = self.clock.unix_seconds();
        let ttl = ttl.unwrap_or(self.config.default_jwt_svid_ttl);
        let exp = (now + secs(ttl)).min(slot.record.not_after);
        let token = jwt::sign_with_issuer(
            &slot.key,
            &slot.record.id,
            spiffe_id,
            audience,
            now,
            exp,
            self.config.jwt_issuer.as_deref(),
        )?;
        Ok((token, from_unix_seconds(exp)))
    }

    /// Signs a WIT-SVID for `spiffe_id` binding the workload key `cnf`, with the active
    /// JWT authority (its key id prefixed, see [`crate::svid::wit`]), valid for `ttl` (or
    /// the default JWT-SVID TTL), capped to the signing key's lifetime. Returns the token
    /// and its expiry.
    ///
    /// # Errors
    /// [`CaError`] if the ID is foreign, the key unusable, or signing fails.
    pub fn sign_wit_svid(
        &self,
        spiffe_id: &SpiffeId,
        cnf: &crate::svid::wit::ConfirmationJwk,
        ttl: Option<Duration>,
    ) -> Result<(String, SystemTime), CaError> {
        self.check_trust_domain(spiffe_id)?;
        let state = self.state.load();
        let slot = state
            .active(SlotKind::Jwt)
            .ok_or(CaError::NoActiveAuthority("JWT"))?;
        let now = self.clock.unix_seconds();
        let ttl = ttl.unwrap_or(self.config.default_jwt_svid_ttl);
        let exp = (now + secs(ttl)).min(slot.record.not_after);
        let token = crate::svid::wit::sign(&slot.key, &slot.record.id, spiffe_id, cnf, now, exp)
            .map_err(|e| CaError::InvalidRequest(e.to_string()))?;
        Ok((token, from_unix_seconds(exp)))
    }

    /// The states of this server's authorities, for operators: `(kind, id, state,
    /// not_after)`.
    pub fn authorities(&self) -> Vec<(String, String, SlotState, SystemTime)> {
        self.state
            .load()
            .slots
            .iter()
            .map(|s| {
                (
                    s.record.kind.as_str().to_owned(),
                    s.record.id.clone(),
                    s.record.state,
                    from_unix_seconds(s.record.not_after),
                )
            })
            .collect()
    }

    /// The ids of the other servers' unexpired authorities this server publishes.
    pub fn peer_authorities(&self) -> Vec<String> {
        self.state
            .load()
            .peers
            .iter()
            .map(|p| p.record.id.clone())
            .collect()
    }
}

/// Which path an X509-SVID is signed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    /// Entries, mints, leases, agents: never marked.
    Workload,
    /// The identity server's own SVID: marked with [`SERVER_SVID_MARKER`].
    Server,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

fn random_serial() -> [u8; 16] {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    bytes
}
