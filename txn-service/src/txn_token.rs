//! Minting Txn-Tokens: header `typ: txntoken+jwt` and `kid` (the RFC 7638 JWK thumbprint
//! of the signing key), ES256 (EC P-256) or EdDSA (Ed25519) by the key's type
//! ([`SigningAlgorithm`], `signing_algorithm` in `txn.toml`), claims as
//! [`writ_sdk::txn_token::TxnToken`] defines them; and [`SigningKeys`], the rotating ring
//! of signing keys.
//!
//! Signing is on every exchange, so a [`Minter`] parses its key once and encodes the
//! JWS header once; a token costs one claims serialization, one base64 pass and one
//! signature.
//!
//! ```
//! use writ_txn_service::txn_token::{Minter, SigningAlgorithm};
//! let minter = Minter::generate(SigningAlgorithm::EdDsa).unwrap();
//! assert_eq!(minter.jwk().kty, "OKP");
//! let token = minter.sign("JWT", &serde_json::json!({"sub": "alice"})).unwrap();
//! assert_eq!(token.split('.').count(), 3);
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use writ_identity::bundle::Jwk;
use writ_identity::clock::SharedClock;
use writ_identity::key_manager::PrivateKey;
use writ_sdk::txn_token::{TXN_TOKEN_TYP, TxnToken};

/// Why a Txn-Token could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The key is neither an EC P-256 nor an Ed25519 key.
    #[error("the Txn-Token signing key must be EC P-256 (ES256) or Ed25519 (EdDSA)")]
    KeyType,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// The JWS algorithm Txn-Tokens are signed with (`signing_algorithm` in `txn.toml`). The
/// SDK verifier accepts both; the JWKS publishes each key with its `alg`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SigningAlgorithm {
    /// ECDSA P-256 with SHA-256 (RFC 7518), keys `kty: EC, crv: P-256`. The default.
    #[default]
    Es256,
    /// Ed25519 (RFC 8037), keys `kty: OKP, crv: Ed25519`.
    EdDsa,
}

impl SigningAlgorithm {
    /// The JWS `alg` name: `ES256` or `EdDSA`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }

    /// The algorithm of a JWS `alg` name (exact: `ES256` or `EdDSA`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    /// A fresh private key for this algorithm (PKCS#8).
    ///
    /// # Errors
    /// [`KeyRingError::Key`] if the system random source fails.
    pub fn generate_key(self) -> Result<PrivateKey, KeyRingError> {
        let rng = SystemRandom::new();
        let pkcs8 = match self {
            Self::Es256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
                .map_err(|_| KeyRingError::Key("P-256 key generation failed".into()))?,
            Self::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| KeyRingError::Key("Ed25519 key generation failed".into()))?,
        };
        PrivateKey::from_pkcs8_der(pkcs8.as_ref()).map_err(|e| KeyRingError::Key(e.to_string()))
    }
}

impl std::fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The parsed private key of a [`Minter`].
enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// Signs Txn-Tokens with one key, parsed once (signing is on every exchange).
#[derive(Clone)]
pub struct Minter {
    key: PrivateKey,
    signer: Arc<Signer>,
    algorithm: SigningAlgorithm,
    kid: String,
    jwk: Jwk,
    /// The base64url JWS header of a Txn-Token, encoded once.
    txn_header: Arc<str>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("kid", &self.kid)
            .field("alg", &self.algorithm.name())
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter over an EC P-256 key (ES256) or an Ed25519 key (EdDSA); its key id is the
    /// key's JWK thumbprint.
    ///
    /// # Errors
    /// [`MintError::KeyType`] for other keys.
    pub fn new(key: PrivateKey) -> Result<Self, MintError> {
        let (signer, algorithm, jwk) = if let Some((x, y)) = key.ec_p256_xy() {
            let signer =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
                    .map_err(|_| MintError::KeyType)?;
            (
                Signer::Es256(signer),
                SigningAlgorithm::Es256,
                Jwk::ec_p256(x, y),
            )
        } else {
            let signer = Ed25519KeyPair::from_pkcs8_maybe_unchecked(key.pkcs8_der())
                .map_err(|_| MintError::KeyType)?;
            let jwk = Jwk {
                kty: "OKP".into(),
                crv: Some("Ed25519".into()),
                x: Some(URL_SAFE_NO_PAD.encode(signer.public_key().as_ref())),
                y: None,
                n: None,
                e: None,
            };
            (Signer::EdDsa(signer), SigningAlgorithm::EdDsa, jwk)
        };
        let kid = jwk.thumbprint().map_err(|_| MintError::KeyType)?;
        let txn_header = header_segment(algorithm, TXN_TOKEN_TYP, &kid)?.into();
        Ok(Self {
            kid,
            jwk,
            signer: Arc::new(signer),
            algorithm,
            key,
            txn_header,
        })
    }

    /// A minter over a fresh key for `algorithm`.
    ///
    /// # Errors
    /// [`MintError::Sign`] if no key can be generated.
    pub fn generate(algorithm: SigningAlgorithm) -> Result<Self, MintError> {
        let key = algorithm
            .generate_key()
            .map_err(|e| MintError::Sign(e.to_string()))?;
        Self::new(key)
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, for the JWKS.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// Signs `claims`.
    ///
    /// # Errors
    /// [`MintError::Sign`] if the key cannot sign.
    pub fn mint(&self, claims: &TxnToken) -> Result<String, MintError> {
        self.sign_with_header(&self.txn_header, claims)
    }

    /// Signs any claims as a JWT (ES256 or EdDSA, by the key) with header `typ` and this
    /// key's `kid`.
    ///
    /// # Errors
    /// [`MintError::Sign`] if the claims do not serialize or the key cannot sign.
    pub fn sign(&self, typ: &str, claims: &impl Serialize) -> Result<String, MintError> {
        if typ == TXN_TOKEN_TYP {
            return self.sign_with_header(&self.txn_header, claims);
        }
        let header = header_segment(self.algorithm, typ, &self.kid)?;
        self.sign_with_header(&header, claims)
    }

    /// `header.payload.signature`, with the header segment already encoded: one buffer
    /// for the claims JSON and one for the token.
    fn sign_with_header(&self, header: &str, claims: &impl Serialize) -> Result<String, MintError> {
        let payload = serde_json::to_vec(claims).map_err(|e| MintError::Sign(e.to_string()))?;
        // base64url: 4 characters per 3 bytes; the signature is 64 bytes (86 characters).
        let mut token =
            String::with_capacity(header.len() + 1 + payload.len().div_ceil(3) * 4 + 1 + 88);
        token.push_str(header);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        drop(payload);
        let input = token.as_bytes();
        match &*self.signer {
            Signer::Es256(key) => {
                let signature = key
                    .sign(&SystemRandom::new(), input)
                    .map_err(|_| MintError::Sign("ECDSA signing failed".into()))?;
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
            }
            Signer::EdDsa(key) => {
                let signature = key.sign(input);
                token.push('.');
                URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
            }
        }
        Ok(token)
    }
}

/// The base64url JWS header `{"alg", "typ", "kid"}`.
fn header_segment(algorithm: SigningAlgorithm, typ: &str, kid: &str) -> Result<String, MintError> {
    let header = serde_json::json!({"alg": algorithm.name(), "typ": typ, "kid": kid});
    b64_json(&header)
}

/// The signing keys of a transaction token service: one current key that signs, and
/// the keys it replaced, still published (JWKS) and trusted (replacement) until every
/// token they signed has expired.
///
/// The current key is replaced when it is older than the rotation period; the old key
/// stays for `retain` more (the longest token lifetime plus leeway). With a `path`, the
/// ring is kept in that file (0600) so a restart keeps the keys and their ids.
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, UNIX_EPOCH};
/// use writ_identity::clock::ManualClock;
/// use writ_txn_service::txn_token::SigningKeys;
///
/// let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
/// let keys = SigningKeys::ephemeral(Arc::new(clock.clone()), Duration::from_secs(3600), Duration::from_secs(900)).unwrap();
/// let first = keys.current_kid();
/// clock.advance(Duration::from_secs(3601));
/// keys.rotate_if_due().unwrap();
/// assert_ne!(keys.current_kid(), first);
/// assert_eq!(keys.public_keys().len(), 2); // the old key is still published
/// clock.advance(Duration::from_secs(901));
/// keys.rotate_if_due().unwrap();
/// assert_eq!(keys.public_keys().len(), 1);
/// ```
#[derive(Debug)]
pub struct SigningKeys {
    ring: arc_swap::ArcSwap<Ring>,
    clock: SharedClock,
    rotate_every: Duration,
    retain: Duration,
    path: Option<PathBuf>,
    rotating: Mutex<()>,
    /// Bumped each time the ring changes, so that a publisher of the public keys sees
    /// cheaply when it must publish again.
    generation: AtomicU64,
    /// The algorithm of the keys this ring creates.
    algorithm: SigningAlgorithm,
    /// Tokens signed (see [`SigningKeys::signatures`]).
    signatures: AtomicU64,
}

/// A public key of the ring and until when it must stay published: see
/// [`SigningKeys::published_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedKey {
    /// The key id.
    pub kid: String,
    /// The public key.
    pub jwk: Jwk,
    /// Unix seconds after which no token it signed is still valid: for a retired key,
    /// its retirement plus the longest token lifetime; for the current key, the same
    /// counted from when it is due for rotation.
    pub expires_at: i64,
}

#[derive(Debug)]
struct Ring {
    current: Minter,
    created_at: i64,
    /// Retired keys and when they stop being published.
    previous: Vec<(Minter, i64)>,
}

/// The file form of the key ring.
#[derive(Serialize, Deserialize)]
struct RingFile {
    current: KeyFile,
    #[serde(default)]
    previous: Vec<KeyFile>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    /// PKCS#8 PEM.
    key: String,
    created_at: i64,
    #[serde(default)]
    retire_at: Option<i64>,
}

/// Why the signing keys could not be loaded, created or rotated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyRingError {
    /// A key could not be generated or used.
    #[error("signing key: {0}")]
    Key(String),
    /// The key file could not be read or written.
    #[error("signing key file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl SigningKeys {
    /// A ring held in memory only (lost at exit), of keys for the default
    /// [`SigningAlgorithm`].
    ///
    /// # Errors
    /// [`KeyRingError::Key`] if a key cannot be generated.
    pub fn ephemeral(
        clock: SharedClock,
        rotate_every: Duration,
        retain: Duration,
    ) -> Result<Self, KeyRingError> {
        Self::ephemeral_with(SigningAlgorithm::default(), clock, rotate_every, retain)
    }

    /// A ring held in memory only (lost at exit), of keys for `algorithm`.
    ///
    /// # Errors
    /// [`KeyRingError::Key`] if a key cannot be generated.
    pub fn ephemeral_with(
        algorithm: SigningAlgorithm,
        clock: SharedClock,
        rotate_every: Duration,
        retain: Duration,
    ) -> Result<Self, KeyRingError> {
        let ring = Ring {
            current: fresh_minter(algorithm)?,
            created_at: clock.unix_seconds(),
            previous: Vec::new(),
        };
        Ok(Self::from_ring(
            ring,
            clock,
            rotate_every,
            retain,
            None,
            algorithm,
        ))
    }

    /// A ring of one given key (tests, or a key managed elsewhere). It never rotates.
    pub fn single(minter: Minter, clock: SharedClock) -> Self {
        let algorithm = minter.algorithm();
        let ring = Ring {
            current: minter,
            created_at: clock.unix_seconds(),
            previous: Vec::new(),
        };
        Self::from_ring(ring, clock, Duration::MAX, Duration::ZERO, None, algorithm)
    }

    /// The ring kept in `path` (created 0600 with a fresh key if absent), of keys for the
    /// default [`SigningAlgorithm`].
    ///
    /// # Errors
    /// [`KeyRingError`] if the file is unreadable or malformed, or cannot be written.
    pub fn load_or_create(
        path: PathBuf,
        clock: SharedClock,
        rotate_every: Duration,
        retain: Duration,
    ) -> Result<Self, KeyRingError> {
        Self::load_or_create_with(
            path,
            SigningAlgorithm::default(),
            clock,
            rotate_every,
            retain,
        )
    }

    /// The ring kept in `path` (created 0600 with a fresh key if absent), of keys for
    /// `algorithm`. A ring whose current key is of another algorithm (the setting
    /// changed) rotates at once: the old key stays published, and trusted for
    /// replacements, for `retain` like any retired key.
    ///
    /// # Errors
    /// [`KeyRingError`] if the file is unreadable or malformed, or cannot be written.
    pub fn load_or_create_with(
        path: PathBuf,
        algorithm: SigningAlgorithm,
        clock: SharedClock,
        rotate_every: Duration,
        retain: Duration,
    ) -> Result<Self, KeyRingError> {
        let file_err = |reason: String| KeyRingError::File {
            path: path.clone(),
            reason,
        };
        let ring = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: RingFile =
                    serde_json::from_str(&text).map_err(|e| file_err(e.to_string()))?;
                let minter = |k: &KeyFile| {
                    PrivateKey::from_pem(&k.key)
                        .map_err(|e| file_err(e.to_string()))
                        .and_then(|key| Minter::new(key).map_err(|e| file_err(e.to_string())))
                };
                Ring {
                    current: minter(&file.current)?,
                    created_at: file.current.created_at,
                    previous: file
                        .previous
                        .iter()
                        .map(|k| Ok((minter(k)?, k.retire_at.unwrap_or(0))))
                        .collect::<Result<_, KeyRingError>>()?,
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ring {
                current: fresh_minter(algorithm)?,
                created_at: clock.unix_seconds(),
                previous: Vec::new(),
            },
            Err(e) => return Err(file_err(e.to_string())),
        };
        let switch = ring.current.algorithm() != algorithm;
        let keys = Self::from_ring(ring, clock, rotate_every, retain, Some(path), algorithm);
        if switch {
            tracing::info!(algorithm = %algorithm, "Txn-Token signing algorithm changed: rotating to a new key");
            keys.rotate()?;
        } else {
            keys.save(&keys.ring.load())?;
        }
        Ok(keys)
    }

    fn from_ring(
        ring: Ring,
        clock: SharedClock,
        rotate_every: Duration,
        retain: Duration,
        path: Option<PathBuf>,
        algorithm: SigningAlgorithm,
    ) -> Self {
        Self {
            ring: arc_swap::ArcSwap::from_pointee(ring),
            clock,
            rotate_every,
            retain,
            path,
            rotating: Mutex::new(()),
            generation: AtomicU64::new(0),
            algorithm,
            signatures: AtomicU64::new(0),
        }
    }

    /// The algorithm of the keys this ring creates (the current key's, unless it was
    /// given to [`SigningKeys::single`]).
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.algorithm
    }

    /// How many tokens [`SigningKeys::mint`] has signed: one signature each. A cheap
    /// counter for tests and benchmarks that count the crypto work of a request.
    pub fn signatures(&self) -> u64 {
        self.signatures.load(Ordering::Relaxed)
    }

    fn save(&self, ring: &Ring) -> Result<(), KeyRingError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = RingFile {
            current: KeyFile {
                key: ring.current.key.to_pem().to_string(),
                created_at: ring.created_at,
                retire_at: None,
            },
            previous: ring
                .previous
                .iter()
                .map(|(m, retire_at)| KeyFile {
                    key: m.key.to_pem().to_string(),
                    created_at: 0,
                    retire_at: Some(*retire_at),
                })
                .collect(),
        };
        let text = zeroize::Zeroizing::new(
            serde_json::to_string_pretty(&file).map_err(|e| KeyRingError::Key(e.to_string()))?,
        );
        writ_identity::key_manager::write_secret_file(path, text.as_bytes()).map_err(|e| {
            KeyRingError::File {
                path: path.clone(),
                reason: e.to_string(),
            }
        })
    }

    /// Replaces the current key if it is older than the rotation period, and drops
    /// retired keys whose tokens have all expired.
    ///
    /// # Errors
    /// [`KeyRingError`] if a key cannot be generated or the file cannot be written.
    pub fn rotate_if_due(&self) -> Result<(), KeyRingError> {
        let now = self.clock.unix_seconds();
        let ring = self.ring.load();
        let stale = ring.previous.iter().any(|(_, retire)| *retire <= now);
        if self.is_due(&ring, now) || stale {
            self.rotate_at(now, false)?;
        }
        Ok(())
    }

    /// Replaces the current key now.
    ///
    /// # Errors
    /// [`KeyRingError`] if a key cannot be generated or the file cannot be written.
    pub fn rotate(&self) -> Result<(), KeyRingError> {
        self.rotate_at(self.clock.unix_seconds(), true)
    }

    fn is_due(&self, ring: &Ring, now: i64) -> bool {
        now.saturating_sub(ring.created_at) >= secs(self.rotate_every)
    }

    /// Under the lock, so that concurrent callers who all saw the key due rotate once.
    fn rotate_at(&self, now: i64, force: bool) -> Result<(), KeyRingError> {
        let _guard = self
            .rotating
            .lock()
            .map_err(|_| KeyRingError::Key("rotation lock poisoned".into()))?;
        let ring = self.ring.load();
        let mut previous: Vec<(Minter, i64)> = ring
            .previous
            .iter()
            .filter(|(_, retire)| *retire > now)
            .cloned()
            .collect();
        let (current, created_at) = if force || self.is_due(&ring, now) {
            previous.push((ring.current.clone(), now.saturating_add(secs(self.retain))));
            (fresh_minter(self.algorithm)?, now)
        } else {
            (ring.current.clone(), ring.created_at)
        };
        let next = Ring {
            current,
            created_at,
            previous,
        };
        self.save(&next)?;
        if next.current.kid() != ring.current.kid() {
            tracing::info!(kid = %next.current.kid(), "Txn-Token signing key rotated");
        }
        self.ring.store(Arc::new(next));
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// The id of the key that signs now.
    pub fn current_kid(&self) -> String {
        self.ring.load().current.kid().to_owned()
    }

    /// Signs `claims` with the current key (rotating first if due).
    ///
    /// # Errors
    /// [`MintError`] if signing fails.
    pub fn mint(&self, claims: &TxnToken) -> Result<String, MintError> {
        if let Err(e) = self.rotate_if_due() {
            tracing::error!(error = %e, "Txn-Token key rotation failed; signing with the current key");
        }
        let token = self.ring.load().current.mint(claims)?;
        self.signatures.fetch_add(1, Ordering::Relaxed);
        Ok(token)
    }

    /// Every published key: key id -> public JWK (current first is not implied).
    pub fn public_keys(&self) -> BTreeMap<String, Jwk> {
        let now = self.clock.unix_seconds();
        let ring = self.ring.load();
        std::iter::once(&ring.current)
            .chain(
                ring.previous
                    .iter()
                    .filter(|(_, retire)| *retire > now)
                    .map(|(m, _)| m),
            )
            .map(|m| (m.kid().to_owned(), m.jwk().clone()))
            .collect()
    }

    /// The JWKS document (RFC 7517) of the published keys.
    pub fn jwks(&self) -> serde_json::Value {
        jwks(&self.public_keys())
    }

    /// A number that changes whenever the ring does (a rotation, a retired key
    /// dropped): what [`SigningKeys::published_keys`] returns changes only with it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every published key with the time it may stop being published (what replicas
    /// share through the identity store; the private keys never leave the ring). A
    /// token the current key signs before its rotation is due expires before the
    /// current key's `expires_at`, since minting rotates a key that is due first.
    pub fn published_keys(&self) -> Vec<PublishedKey> {
        let now = self.clock.unix_seconds();
        let ring = self.ring.load();
        let current_until = ring
            .created_at
            .saturating_add(secs(self.rotate_every))
            .saturating_add(secs(self.retain));
        std::iter::once((&ring.current, current_until))
            .chain(
                ring.previous
                    .iter()
                    .filter(|(_, retire)| *retire > now)
                    .map(|(m, retire)| (m, *retire)),
            )
            .map(|(m, expires_at)| PublishedKey {
                kid: m.kid().to_owned(),
                jwk: m.jwk().clone(),
                expires_at,
            })
            .collect()
    }
}

/// The JWKS document (RFC 7517) of `keys` (key id -> public key).
pub fn jwks(keys: &BTreeMap<String, Jwk>) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(kid, jwk)| jwk_with_kid(jwk, kid))
        .collect();
    serde_json::json!({ "keys": keys })
}

/// A public signing key as a JWKS entry: the JWK plus `kid`, `use` and `alg` (`EdDSA`
/// for an `OKP` key, `ES256` otherwise).
pub fn jwk_with_kid(jwk: &Jwk, kid: &str) -> serde_json::Value {
    let alg = if jwk.kty == "OKP" {
        SigningAlgorithm::EdDsa
    } else {
        SigningAlgorithm::Es256
    };
    let mut key = serde_json::to_value(jwk).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(map) = &mut key {
        map.insert("kid".into(), kid.into());
        map.insert("use".into(), "sig".into());
        map.insert("alg".into(), alg.name().into());
    }
    key
}

/// The base64url (no padding) of `value`'s JSON: one JWS segment.
fn b64_json(value: &impl Serialize) -> Result<String, MintError> {
    serde_json::to_vec(value)
        .map(|bytes| URL_SAFE_NO_PAD.encode(bytes))
        .map_err(|e| MintError::Sign(e.to_string()))
}

fn fresh_minter(algorithm: SigningAlgorithm) -> Result<Minter, KeyRingError> {
    let key = algorithm.generate_key()?;
    Minter::new(key).map_err(|e| KeyRingError::Key(e.to_string()))
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
