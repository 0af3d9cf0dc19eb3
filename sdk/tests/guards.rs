//! Work-per-request guards of the SDK's hot paths (issue 20): a counting global
//! allocator (this test target's own) holds `TxnVerifier` to a fixed number of bytes
//! allocated per verification after warm-up. These count work, never time: the figures
//! are in `writ bench verify`.
//!
//! - a cache hit (`verify_shared`) allocates nothing;
//! - an uncached verification allocates a small, bounded amount (decoding the header
//!   and payload, the JSON claims and their strings), ES256 and EdDSA alike; the keys
//!   are parsed when the JWKS is loaded, not per token.
#![expect(
    unused_crate_dependencies,
    reason = "a test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "test code: a failed setup step should abort the test loudly"
)]

use std::alloc::System;
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cap::Cap;
use writ_sdk::txn_token::{Actor, Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_spiffe::bundle::Jwk;

/// Counts the bytes every allocation asks for (`cap` with its `stats`), process-wide:
/// each guard runs in the one test of this binary, on a current-thread runtime, so
/// nothing else allocates while a call is measured.
#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes allocated so far (freed ones included).
fn allocated() -> u64 {
    ALLOCATOR.total_allocated() as u64
}

const TD: &str = "example.org";
const CALLER: &str = "spiffe://example.org/gateway";

/// A signing key of either algorithm, and its public JWK.
enum Signer {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

impl Signer {
    fn new(alg: &str) -> Self {
        let rng = SystemRandom::new();
        if alg == "ES256" {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            Self::Es256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap(),
            )
        } else {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            Self::EdDsa(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap())
        }
    }

    fn jwk(&self) -> Jwk {
        match self {
            Self::Es256(k) => {
                let point = k.public_key().as_ref();
                Jwk::ec_p256(&point[1..33], &point[33..65])
            }
            Self::EdDsa(k) => Jwk {
                kty: "OKP".into(),
                crv: Some("Ed25519".into()),
                x: Some(URL_SAFE_NO_PAD.encode(k.public_key().as_ref())),
                y: None,
                n: None,
                e: None,
            },
        }
    }

    fn mint(&self, claims: &TxnToken) -> String {
        let alg = match self {
            Self::Es256(_) => "ES256",
            Self::EdDsa(_) => "EdDSA",
        };
        let header = format!(r#"{{"alg":"{alg}","typ":"txntoken+jwt","kid":"k1"}}"#);
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap()));
        let sig = match self {
            Self::Es256(k) => k
                .sign(&SystemRandom::new(), token.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Self::EdDsa(k) => k.sign(token.as_bytes()).as_ref().to_vec(),
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(sig));
        token
    }
}

fn claims(txn: u64) -> TxnToken {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap();
    TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: format!("txn-{txn}"),
        sub: "alice".into(),
        scope: "read write".into(),
        req_wl: CALLER.into(),
        tctx: None,
        rctx: None,
        act: Some(Actor::new(CALLER)),
    }
}

fn verifier(signer: &Signer, cache: u64) -> TxnVerifier {
    let keys = BTreeMap::from([("k1".to_owned(), signer.jwk())]);
    TxnVerifier::builder(TD.parse().unwrap(), JwksSource::Keys(Jwks::from_keys(keys)))
        .cache_capacity(cache)
        .build()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// Bytes allocated by one `verify_shared` of `token`, after `token` was verified once.
fn bytes_per_verify(rt: &tokio::runtime::Runtime, v: &TxnVerifier, token: &str) -> u64 {
    rt.block_on(async {
        v.verify_shared(token).await.unwrap();
        let before = allocated();
        let claims = v.verify_shared(token).await.unwrap();
        let n = allocated() - before;
        assert_eq!(claims.sub, "alice");
        n
    })
}

/// Measured after tuning: 2,151 bytes per uncached verification, ES256 and EdDSA alike
/// (the decoded header and payload, the JSON claims tree, the claims' strings), when
/// `writ-sdk` is built alone (`cargo test -p writ-sdk`); 4,047 bytes in the workspace
/// build (`cargo test --workspace`), where another package turns on serde_json's
/// `preserve_order` and every JSON object of the claims tree becomes an `IndexMap`. The
/// bound is set just above the larger figure, so the guard holds in both builds.
const UNCACHED_MAX_BYTES: u64 = 4_500;

/// The one test of this binary (the allocator's count is process-wide, so the guards
/// run one after another): a cache hit allocates nothing; an uncached verification
/// allocates at most [`UNCACHED_MAX_BYTES`].
#[test]
fn verification_allocates_within_its_bounds() {
    let rt = runtime();
    for alg in ["ES256", "EdDSA"] {
        let signer = Signer::new(alg);
        let cached = verifier(&signer, 1000);
        let hit = bytes_per_verify(&rt, &cached, &signer.mint(&claims(1)));
        let uncached = verifier(&signer, 0);
        let full = bytes_per_verify(&rt, &uncached, &signer.mint(&claims(2)));
        eprintln!("{alg}: cache hit {hit} bytes, uncached {full} bytes");
        assert_eq!(hit, 0, "{alg}: a cache hit allocated {hit} bytes");
        assert!(
            full <= UNCACHED_MAX_BYTES,
            "{alg}: {full} bytes per uncached verification, at most {UNCACHED_MAX_BYTES}"
        );
    }
}
