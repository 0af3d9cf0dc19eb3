//! Private keys: an SVID's key as the Workload API hands it over (PKCS#8), zeroized on
//! drop and never printed, and the errors of key handling.
//!
//! Parsing and generation use aws-lc-rs directly, so a workload that only holds an SVID
//! builds no certificate generator.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair,
    RsaKeyPair,
};
use zeroize::Zeroizing;

use crate::fingerprint;

/// What went wrong with a key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Key generation or parsing failed in the crypto library.
    #[error("key crypto failed: {0}")]
    Crypto(String),
    /// No key with that id.
    #[error("key {0:?} not found")]
    NotFound(String),
    /// A key id with characters other than `[A-Za-z0-9_-]`.
    #[error("invalid key id {0:?}")]
    InvalidId(String),
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A private key (PKCS#8 DER: EC P-256/P-384, RSA or Ed25519), zeroized on drop, never
/// printed: its `Debug` shows only the SHA-256 of the public key.
#[derive(Clone)]
pub struct PrivateKey {
    pkcs8: Zeroizing<Vec<u8>>,
    public_key_raw: Vec<u8>,
    /// The key parsed for JWS ES256 signing (`r || s`), at its first use and then kept
    /// (shared by clones), so signing a token parses nothing; `None` for a key that is
    /// not P-256.
    es256: Arc<OnceLock<Option<EcdsaKeyPair>>>,
}

/// Parses of a private key for JWS signing since the process started (each key is
/// parsed once, at its first signature): the hot-path guards hold token signing to no
/// parse per token.
static JWS_KEY_PARSES: AtomicU64 = AtomicU64::new(0);

/// How many times this process has parsed a private key for JWS (ES256) signing: once
/// per key, never per token (the guards of issue 20 count it around a signature).
pub fn jws_key_parses() -> u64 {
    JWS_KEY_PARSES.load(Ordering::Relaxed)
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field(
                "public_key_sha256",
                &fingerprint::sha256_hex(&self.public_key_raw),
            )
            .finish_non_exhaustive()
    }
}

const EC_ALGORITHMS: [&EcdsaSigningAlgorithm; 2] = [
    &ECDSA_P256_SHA256_ASN1_SIGNING,
    &ECDSA_P384_SHA384_ASN1_SIGNING,
];

fn crypto(what: &str) -> KeyError {
    KeyError::Crypto(what.to_owned())
}

impl PrivateKey {
    /// Generates a fresh P-256 key.
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if the system random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
                .map_err(|_| crypto("P-256 key generation failed"))?;
        Self::from_pkcs8_der(doc.as_ref())
    }

    /// Loads a PKCS#8 DER key (EC P-256/P-384, RSA or Ed25519).
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if the bytes are not a supported PKCS#8 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let public_key_raw = EC_ALGORITHMS
            .iter()
            .find_map(|alg| EcdsaKeyPair::from_pkcs8(alg, der).ok())
            .map(|kp| kp.public_key().as_ref().to_vec())
            .or_else(|| {
                Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                    .ok()
                    .map(|kp| kp.public_key().as_ref().to_vec())
            })
            .or_else(|| {
                RsaKeyPair::from_pkcs8(der)
                    .ok()
                    .map(|kp| kp.public_key().as_ref().to_vec())
            })
            .ok_or_else(|| crypto("not a supported PKCS#8 private key"))?;
        Ok(Self {
            pkcs8: Zeroizing::new(der.to_vec()),
            public_key_raw,
            es256: Arc::default(),
        })
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8), `EC PRIVATE KEY` (SEC 1) or `RSA PRIVATE KEY`
    /// (PKCS#1) block; the key is kept as PKCS#8.
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if no supported key is found.
    pub fn from_pem(pem_text: &str) -> Result<Self, KeyError> {
        let block = pem::parse(pem_text).map_err(|e| KeyError::Crypto(e.to_string()))?;
        let der = Zeroizing::new(block.contents().to_vec());
        match block.tag() {
            "PRIVATE KEY" => Self::from_pkcs8_der(&der),
            "EC PRIVATE KEY" => {
                let pkcs8 = EC_ALGORITHMS
                    .iter()
                    .find_map(|alg| EcdsaKeyPair::from_private_key_der(alg, &der).ok())
                    .and_then(|kp| kp.to_pkcs8v1().ok())
                    .ok_or_else(|| crypto("not a supported EC private key"))?;
                Self::from_pkcs8_der(pkcs8.as_ref())
            }
            "RSA PRIVATE KEY" => {
                let pkcs8 = RsaKeyPair::from_der(&der)
                    .ok()
                    .and_then(|kp| AsDer::as_der(&kp).ok())
                    .ok_or_else(|| crypto("not a supported RSA private key"))?;
                Self::from_pkcs8_der(pkcs8.as_ref())
            }
            other => Err(KeyError::Crypto(format!(
                "expected a PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block, found {other}"
            ))),
        }
    }

    /// An ES256 JWS signature (`r || s`, 64 bytes) of `message` with this P-256 key,
    /// parsed at the first signature and kept.
    ///
    /// # Errors
    /// [`KeyError::Crypto`] if the key is not P-256 or signing fails.
    pub fn sign_es256(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let pair = self
            .es256
            .get_or_init(|| {
                JWS_KEY_PARSES.fetch_add(1, Ordering::Relaxed);
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8).ok()
            })
            .as_ref()
            .ok_or_else(|| crypto("not a P-256 key: cannot sign ES256"))?;
        let signature = pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| crypto("ES256 signing failed"))?;
        Ok(signature.as_ref().to_vec())
    }

    /// The PKCS#8 DER bytes. Handle with care.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The key as PEM (`PRIVATE KEY`). Handle with care.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.pkcs8.to_vec(),
        )))
    }

    /// The raw public key (an uncompressed EC point for EC keys).
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public_key_raw
    }

    /// The uncompressed EC point split into `(x, y)`, for P-256 keys.
    pub fn ec_p256_xy(&self) -> Option<(&[u8], &[u8])> {
        match self.public_key_raw.split_first() {
            Some((0x04, xy)) if xy.len() == 64 => Some(xy.split_at(32)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem_and_never_print() {
        let key = PrivateKey::generate().unwrap();
        assert!(key.ec_p256_xy().is_some());
        let again = PrivateKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again.pkcs8_der(), key.pkcs8_der());
        assert_eq!(again.public_key_raw(), key.public_key_raw());
        let shown = format!("{key:?}");
        assert!(shown.contains("public_key_sha256"));
        assert!(!shown.contains(&hex_of(key.pkcs8_der())));
    }

    #[test]
    fn sec1_ec_keys_are_kept_as_pkcs8() {
        let key = PrivateKey::generate().unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key.pkcs8_der()).unwrap();
        let sec1 =
            AsDer::<aws_lc_rs::encoding::EcPrivateKeyRfc5915Der<'_>>::as_der(&kp.private_key())
                .unwrap();
        let pem_text = pem::encode(&pem::Pem::new("EC PRIVATE KEY", sec1.as_ref().to_vec()));
        let parsed = PrivateKey::from_pem(&pem_text).unwrap();
        assert_eq!(parsed.public_key_raw(), key.public_key_raw());
        assert!(PrivateKey::from_pkcs8_der(parsed.pkcs8_der()).is_ok());
    }

    #[test]
    fn garbage_is_a_crypto_error() {
        assert!(matches!(
            PrivateKey::from_pkcs8_der(b"nope"),
            Err(KeyError::Crypto(_))
        ));
        assert!(matches!(
            PrivateKey::from_pem("nope"),
            Err(KeyError::Crypto(_))
        ));
        let cert = pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]));
        assert!(matches!(
            PrivateKey::from_pem(&cert),
            Err(KeyError::Crypto(_))
        ));
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}
