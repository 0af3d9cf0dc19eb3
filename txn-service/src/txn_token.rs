//! Minting Txn-Tokens: header `typ: txntoken+jwt` and `kid` (the RFC 7638 JWK thumbprint
//! of the signing key), ES256, claims as [`writ_sdk::txn_token::TxnToken`] defines them.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use writ_identity::bundle::Jwk;
use writ_identity::key_manager::PrivateKey;
use writ_sdk::txn_token::{TXN_TOKEN_TYP, TxnToken};

/// Why a Txn-Token could not be minted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MintError {
    /// The key is not an EC P-256 key.
    #[error("the Txn-Token signing key must be EC P-256")]
    KeyType,
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Signs Txn-Tokens with one key.
#[derive(Debug, Clone)]
pub struct Minter {
    key: PrivateKey,
    kid: String,
    jwk: Jwk,
}

impl Minter {
    /// A minter over an EC P-256 key; its key id is the key's JWK thumbprint.
    ///
    /// # Errors
    /// [`MintError::KeyType`] for other keys.
    pub fn new(key: PrivateKey) -> Result<Self, MintError> {
        let (x, y) = key.ec_p256_xy().ok_or(MintError::KeyType)?;
        let jwk = Jwk::ec_p256(x, y);
        Ok(Self {
            kid: jwk.thumbprint(),
            jwk,
            key,
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key, for the JWKS.
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// Signs `claims`.
    ///
    /// # Errors
    /// [`MintError::Sign`] if the key cannot sign.
    pub fn mint(&self, claims: &TxnToken) -> Result<String, MintError> {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(TXN_TOKEN_TYP.into());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_ec_der(self.key.pkcs8_der()),
        )
        .map_err(|e| MintError::Sign(e.to_string()))
    }
}
