//! The benches' OpenID Provider: discovery and a JWKS over plain HTTP on 127.0.0.1 (the
//! token service allows plain HTTP for loopback issuers), with one RSA-2048 (RS256), one
//! P-256 (ES256) and one Ed25519 (EdDSA) key, and RFC 9068 access tokens (`typ: at+jwt`)
//! signed here with any of them. It stands for the external IdP whose tokens are the
//! subject tokens of an exchange.
//!
//! Tokens are signed with aws-lc-rs directly, each key parsed once; the benches mint the
//! subject tokens before anything is timed, so this signing is never in a measurement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// The audience the provider puts in its access tokens.
pub const AUDIENCE: &str = "https://tts.bench.example.org";
/// The scopes of every access token.
pub const SUBJECT_SCOPE: &str = "orders.read orders.write profile";
/// Lifetime of the access tokens, in seconds: longer than any bench.
pub const TOKEN_LIFETIME: i64 = 3600;

/// A signature algorithm of the provider's access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SubjectAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA-2048 (what most providers use).
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
    /// Ed25519.
    Eddsa,
}

impl SubjectAlg {
    /// Every algorithm, in report order.
    pub const ALL: [Self; 3] = [Self::Rs256, Self::Es256, Self::Eddsa];

    /// The JOSE name (`RS256`, `ES256`, `EdDSA`).
    pub fn jose(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::Eddsa => "EdDSA",
        }
    }

    fn kid(self) -> &'static str {
        match self {
            Self::Rs256 => "bench-rs256",
            Self::Es256 => "bench-es256",
            Self::Eddsa => "bench-eddsa",
        }
    }
}

/// One signing key of the provider.
enum SigningKey {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Rsa(_) => "SigningKey::Rsa(..)",
            Self::Ec(_) => "SigningKey::Ec(..)",
            Self::Ed(_) => "SigningKey::Ed(..)",
        })
    }
}

impl SigningKey {
    fn generate(alg: SubjectAlg) -> anyhow::Result<Self> {
        let failed = |_| anyhow::anyhow!("cannot generate a {} key", alg.jose());
        Ok(match alg {
            SubjectAlg::Rs256 => Self::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).map_err(failed)?),
            SubjectAlg::Es256 => {
                Self::Ec(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(failed)?)
            }
            SubjectAlg::Eddsa => Self::Ed(Ed25519KeyPair::generate().map_err(failed)?),
        })
    }

    /// The public JWK (with `kid`, `alg` and `use`).
    fn jwk(&self, alg: SubjectAlg) -> anyhow::Result<Value> {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk: Value = match self {
            Self::Rsa(key) => {
                let public = key.public_key();
                json!({
                    "kty": "RSA",
                    "n": b64(public.modulus().big_endian_without_leading_zero()),
                    "e": b64(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Self::Ec(key) => {
                // Uncompressed point: 0x04 || x || y.
                let point = key.public_key().as_ref();
                let (x, y) = point
                    .get(1..33)
                    .zip(point.get(33..65))
                    .context("a P-256 public key of 65 bytes")?;
                json!({ "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y) })
            }
            Self::Ed(key) => {
                json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().as_ref()) })
            }
        };
        if let Some(fields) = jwk.as_object_mut() {
            fields.insert("kid".into(), json!(alg.kid()));
            fields.insert("alg".into(), json!(alg.jose()));
            fields.insert("use".into(), json!("sig"));
        }
        Ok(jwk)
    }

    fn sign(&self, rng: &SystemRandom, input: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Self::Rsa(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, rng, input, &mut signature)
                    .map_err(|_| anyhow::anyhow!("RS256 signature failed"))?;
                signature
            }
            Self::Ec(key) => key
                .sign(rng, input)
                .map_err(|_| anyhow::anyhow!("ES256 signature failed"))?
                .as_ref()
                .to_vec(),
            Self::Ed(key) => key.sign(input).as_ref().to_vec(),
        })
    }
}

/// A running provider; it stops serving when dropped.
#[derive(Debug)]
pub struct Provider {
    issuer: String,
    rsa: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
    rng: SystemRandom,
    next: AtomicU64,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl Provider {
    /// Generates the three keys and serves discovery and the JWKS on 127.0.0.1 (a free
    /// port).
    ///
    /// # Errors
    /// If a key cannot be generated or the port cannot be bound.
    pub async fn start() -> anyhow::Result<Arc<Self>> {
        let rsa = SigningKey::generate(SubjectAlg::Rs256)?;
        let ec = SigningKey::generate(SubjectAlg::Es256)?;
        let ed = SigningKey::generate(SubjectAlg::Eddsa)?;
        let jwks = json!({ "keys": [
            rsa.jwk(SubjectAlg::Rs256)?,
            ec.jwk(SubjectAlg::Es256)?,
            ed.jwk(SubjectAlg::Eddsa)?,
        ]});
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("the provider's listener")?;
        let issuer = format!("http://{}", tcp.local_addr()?);
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        });
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                axum::routing::get(move || {
                    let d = discovery.clone();
                    async move { axum::Json(d) }
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    let k = jwks.clone();
                    async move { axum::Json(k) }
                }),
            );
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).await {
                tracing::error!(error = %e, "bench OpenID Provider stopped");
            }
        });
        Ok(Arc::new(Self {
            issuer,
            rsa,
            ec,
            ed,
            rng: SystemRandom::new(),
            next: AtomicU64::new(0),
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }))
    }

    /// The issuer URL (`http://127.0.0.1:<port>`).
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A fresh access token signed with `alg`, for a new user: distinct `sub` (`user-N`)
    /// and `jti` on every call.
    ///
    /// # Errors
    /// If signing fails.
    pub fn access_token(&self, alg: SubjectAlg) -> anyhow::Result<String> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs(),
        )?;
        let header = json!({ "alg": alg.jose(), "typ": "at+jwt", "kid": alg.kid() });
        let claims = json!({
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": format!("user-{n}"),
            "client_id": "bench-frontend",
            "scope": SUBJECT_SCOPE,
            "iat": now,
            "exp": now + TOKEN_LIFETIME,
            "jti": format!("bench-{n}"),
        });
        let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?));
        let key = match alg {
            SubjectAlg::Rs256 => &self.rsa,
            SubjectAlg::Es256 => &self.ec,
            SubjectAlg::Eddsa => &self.ed,
        };
        let signature = key.sign(&self.rng, token.as_bytes())?;
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(token)
    }

    /// `n` fresh access tokens signed with `alg`, minted on every core (off the async
    /// runtime's threads).
    ///
    /// # Errors
    /// If signing fails.
    pub async fn access_tokens(
        self: &Arc<Self>,
        alg: SubjectAlg,
        n: usize,
    ) -> anyhow::Result<Vec<String>> {
        let workers = super::cores().max(1);
        let per = n.div_ceil(workers);
        let mut tasks = Vec::with_capacity(workers);
        let mut left = n;
        while left > 0 {
            let take = per.min(left);
            left -= take;
            let provider = self.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                (0..take)
                    .map(|_| provider.access_token(alg))
                    .collect::<anyhow::Result<Vec<String>>>()
            }));
        }
        let mut tokens = Vec::with_capacity(n);
        for task in tasks {
            tokens.extend(task.await.context("a minting thread")??);
        }
        Ok(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_carry_the_algorithm_kid_and_a_distinct_subject() {
        let provider = Provider::start().await.unwrap();
        for alg in SubjectAlg::ALL {
            let tokens = provider.access_tokens(alg, 3).await.unwrap();
            assert_eq!(tokens.len(), 3);
            let parts: Vec<&str> = tokens[0].split('.').collect();
            assert_eq!(parts.len(), 3);
            let header: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
            assert_eq!(header["alg"], alg.jose());
            assert_eq!(header["typ"], "at+jwt");
            assert_ne!(tokens[0], tokens[1]);
        }
        let jwk = provider.rsa.jwk(SubjectAlg::Rs256).unwrap();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["e"], "AQAB");
    }
}
