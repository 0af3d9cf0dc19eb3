//! RFC 8693 token exchange through the real transaction token service, end to end over
//! keep-alive mTLS on loopback (`cargo bench -p writ-tests --bench exchange`).
//!
//! The setup, all in this process: a Writ stack (server + agent on a temp socket) that
//! issues this process two X509-SVIDs, `spiffe://example.org/tts` (the service) and
//! `spiffe://example.org/gateway` (the caller); a minimal OpenID Provider (axum on
//! 127.0.0.1, discovery document and a JWKS with one ES256 key) that stands for the
//! external IdP and whose access tokens (`typ: at+jwt`) are the subject tokens; and a
//! `TxnServer` started from a `txn.toml` whose policy lets the gateway exchange access
//! tokens.
//!
//! Prints:
//! - (1) the crypto bound, on one core, in the same run: (a) verifying one subject token
//!   (`OidcValidator::validate`, JWKS already cached) and (b) signing one Txn-Token
//!   (`Minter::mint`); bound = 1 / (a + b) exchanges per second per core. For reference,
//!   also a bare `jsonwebtoken` ES256 verify and an ECDSA P-256 signature with the key
//!   parsed once (the rustls aws-lc-rs signer), which show what the JWT libraries add;
//! - (2) exchanges per second with C concurrent clients (each one `TxnClient`, so one
//!   keep-alive mTLS connection each), p50/p99 latency per exchange, the process CPU time
//!   per exchange (clients, service, agent and IdP share the process), and the ratio of
//!   the throughput to the crypto bound × the cores (and to the one-core bound), for:
//!   - the subject token cache off, every exchange presenting a distinct fresh token;
//!   - the cache on, distinct tokens (every lookup misses: the cache's own cost);
//!   - the cache on, the same token every time (every lookup hits: no verification);
//! - a markdown table for BENCHMARKS.md.
//!
//! Any failed exchange panics the bench; every response's `issued_token_type` is checked,
//! the first token of each run is verified against the service's keys, and the audit log
//! must hold one `granted` line per exchange.
//!
//! Counts come from the environment: `WRIT_BENCH_CLIENTS` (8), `WRIT_BENCH_EXCHANGES`
//! (4000 per run), `WRIT_BENCH_ROUNDS` (3 runs per case, interleaved; the median run's
//! throughput is reported, latencies over all runs), `WRIT_BENCH_WARMUP` (200 per run,
//! spread over the clients),
//! `WRIT_BENCH_CRYPTO_OPS` (2000), `WRIT_BENCH_CORES` (default: the available
//! parallelism). `WRIT_BENCH_DURABLE_AUDIT=1` turns the durable audit trail on (a SQLite
//! store per run): compare with a run without it. `WRIT_BENCH_AUDIT_ON_FAILURE=allow` sets
//! `audit_on_failure` (grants then do not wait for the durable trail's commit).
//! `WRIT_BENCH_CONDITION='<CEL>'` gives the gateway's policy rule that `condition` (it
//! must hold for every exchange, e.g. `subject.client_id == "bench-frontend" &&
//! request.scope.all(s, s.startsWith("orders.")) && rctx.transport == "mtls"`): compare
//! with a run without it.
//! `WRIT_BENCH_SUBJECT_ALG` (`ES256`, `RS256` or `EdDSA`; default `ES256`) is the
//! algorithm of the IdP's access tokens; with RS256 compare with the sign-only bound.
//! `WRIT_BENCH_SIGNING_ALG` (`ES256` or `EdDSA`; default: the service's default) is the
//! service's `signing_algorithm`. `WRIT_BENCH_MODES` (comma-separated slugs, e.g.
//! `off-distinct,on-same`; default all) runs only those modes.
//!
//! Before the runs, (alg) compares the Txn-Token algorithms on one core: `Minter::mint`
//! and an SDK `TxnVerifier::verify_at` (distinct tokens) for ES256 and EdDSA: the cost
//! that chooses the default `signing_algorithm`.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step or exchange should abort the run loudly"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use axum::Json;
use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use writ_identity::bundle::Jwk;
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::PrivateKey;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::oauth::TokenType;
use writ_sdk::txn_token::{TxnToken, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_tests::{Stack, uid_selector};
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::{IssuerConfig, OidcValidator};
use writ_txn_service::txn_token::{Minter, SigningAlgorithm};

const TRUST_DOMAIN: &str = "example.org";
const TTS_ID: &str = "spiffe://example.org/tts";
const GATEWAY_ID: &str = "spiffe://example.org/gateway";
/// `iss` of the Txn-Tokens (the service's issuer URL; any https URL will do).
const TTS_ISSUER: &str = "https://tts.example.org";
/// The audience the IdP puts in access tokens and the service accepts.
const AUDIENCE: &str = "https://tts.example.org";
/// Scopes of every subject token.
const SUBJECT_SCOPE: &str = "orders.read orders.write profile";
/// Scopes the gateway asks for (and is granted).
const REQUESTED_SCOPE: &str = "orders.read";
/// Lifetime of the subject tokens: longer than the whole bench.
const SUBJECT_LIFETIME: i64 = 3600;

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(samples: &[Duration]) -> Duration {
    samples.iter().sum::<Duration>() / u32::try_from(samples.len()).unwrap()
}

fn now_unix() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// User + system CPU time of this whole process (`/proc/self/stat`, USER_HZ = 100).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the parenthesised command name start at field 3 (`state`).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Timing of one operation repeated on one core.
struct OpStats {
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

impl OpStats {
    fn of(mut samples: Vec<Duration>) -> Self {
        let mean = mean(&samples);
        samples.sort();
        Self {
            mean,
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
        }
    }

    fn per_second(&self) -> f64 {
        1.0 / self.mean.as_secs_f64()
    }

    fn print(&self, what: &str) {
        println!(
            "  {what}: mean {} p50 {} p99 {} ({:.0}/s)",
            micros(self.mean),
            micros(self.p50),
            micros(self.p99),
            self.per_second()
        );
    }
}

/// The IdP's signing key, parsed once.
enum ProviderKey {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

/// `WRIT_BENCH_SUBJECT_ALG`: the algorithm of the subject tokens.
fn subject_alg() -> Algorithm {
    match std::env::var("WRIT_BENCH_SUBJECT_ALG").as_deref() {
        Err(_) | Ok("ES256") => Algorithm::ES256,
        Ok("RS256") => Algorithm::RS256,
        Ok("EdDSA") => Algorithm::EdDSA,
        Ok(other) => panic!("WRIT_BENCH_SUBJECT_ALG={other}: not ES256, RS256 or EdDSA"),
    }
}

/// `WRIT_BENCH_SIGNING_ALG`: the service's Txn-Token algorithm (default: its default).
fn signing_alg() -> SigningAlgorithm {
    std::env::var("WRIT_BENCH_SIGNING_ALG").map_or_else(
        |_| SigningAlgorithm::default(),
        |name| {
            SigningAlgorithm::from_name(&name)
                .unwrap_or_else(|| panic!("WRIT_BENCH_SIGNING_ALG={name}: not ES256 or EdDSA"))
        },
    )
}

/// The two INTEGERs (n, e) of a DER `RSAPublicKey` (RFC 8017), without leading zeros.
fn rsa_n_e(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn read(der: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = der[0];
        let (len, start) = match der[1] {
            l if l < 0x80 => (l as usize, 2),
            0x81 => (der[2] as usize, 3),
            0x82 => (((der[2] as usize) << 8) | der[3] as usize, 4),
            _ => panic!("DER length too long"),
        };
        (tag, &der[start..start + len], &der[start + len..])
    }
    let (tag, seq, _) = read(der);
    assert_eq!(tag, 0x30);
    let (tag, n, rest) = read(seq);
    assert_eq!(tag, 0x02);
    let (tag, e, _) = read(rest);
    assert_eq!(tag, 0x02);
    let strip = |i: &[u8]| {
        let first = i.iter().position(|b| *b != 0).unwrap_or(i.len() - 1);
        i[first..].to_vec()
    };
    (strip(n), strip(e))
}

/// The bench's OpenID Provider: discovery and a JWKS over plain HTTP on loopback (the
/// validator allows that for loopback issuers), and access tokens signed here (ES256 by
/// default; `WRIT_BENCH_SUBJECT_ALG`), the key parsed once.
struct Provider {
    issuer: String,
    kid: String,
    alg: Algorithm,
    key: ProviderKey,
    decoding: DecodingKey,
    next_jti: AtomicU64,
    task: tokio::task::JoinHandle<()>,
}

impl Provider {
    async fn start(alg: Algorithm) -> Self {
        let rng = SystemRandom::new();
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let (key, mut public) = match alg {
            Algorithm::ES256 => {
                let private = PrivateKey::generate().unwrap();
                let (x, y) = private.ec_p256_xy().expect("an EC P-256 key");
                let jwk = serde_json::to_value(Jwk::ec_p256(x, y)).unwrap();
                let key =
                    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, private.pkcs8_der())
                        .unwrap();
                (ProviderKey::Es256(key), jwk)
            }
            Algorithm::RS256 => {
                let key = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
                let (n, e) = rsa_n_e(key.public_key().as_ref());
                let jwk = json!({"kty": "RSA", "n": b64(&n), "e": b64(&e)});
                (ProviderKey::Rs256(key), jwk)
            }
            Algorithm::EdDSA => {
                let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
                let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
                let jwk =
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.public_key().as_ref())});
                (ProviderKey::EdDsa(key), jwk)
            }
            other => panic!("no provider key for {other:?}"),
        };
        let kid = format!("bench-{alg:?}");
        public["kid"] = json!(kid);
        public["alg"] = json!(format!("{alg:?}"));
        public["use"] = json!("sig");
        let decoding =
            DecodingKey::from_jwk(&serde_json::from_value(public.clone()).unwrap()).unwrap();

        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", tcp.local_addr().unwrap());
        let discovery = json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [format!("{alg:?}")],
        });
        let jwks = json!({ "keys": [public] });
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let d = discovery.clone();
                    async move { Json(d) }
                }),
            )
            .route(
                "/jwks",
                get(move || {
                    let k = jwks.clone();
                    async move { Json(k) }
                }),
            );
        let task = tokio::spawn(async move {
            axum::serve(tcp, app).await.unwrap();
        });
        Self {
            issuer,
            kid,
            alg,
            key,
            decoding,
            next_jti: AtomicU64::new(0),
            task,
        }
    }

    fn alg_name(&self) -> String {
        format!("{:?}", self.alg)
    }

    fn issuer_config(&self) -> IssuerConfig {
        let mut config = IssuerConfig::new(self.issuer.clone(), [AUDIENCE]);
        config.algorithms = vec![self.alg];
        config
    }

    /// A fresh RFC 9068 access token for a new user (distinct `sub` and `jti`).
    fn access_token(&self) -> String {
        let n = self.next_jti.fetch_add(1, Ordering::Relaxed);
        let now = now_unix();
        let header = json!({"alg": self.alg_name(), "typ": "at+jwt", "kid": self.kid});
        let claims = json!({
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": format!("user-{n}"),
            "client_id": "bench-frontend",
            "scope": SUBJECT_SCOPE,
            "iat": now,
            "exp": now + SUBJECT_LIFETIME,
            "jti": format!("bench-{n}"),
        });
        let mut token = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()));
        let signature = match &self.key {
            ProviderKey::Es256(key) => key
                .sign(&SystemRandom::new(), token.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            ProviderKey::Rs256(key) => {
                let mut sig = vec![0; key.public_modulus_len()];
                key.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    token.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            ProviderKey::EdDsa(key) => key.sign(token.as_bytes()).as_ref().to_vec(),
        };
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature));
        token
    }

    fn access_tokens(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.access_token()).collect()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The claims the service would mint for one exchange.
fn sample_claims(i: usize) -> TxnToken {
    let now = now_unix();
    let mut rctx = BTreeMap::new();
    rctx.insert("req_ip".to_owned(), json!("127.0.0.1"));
    rctx.insert("transport".to_owned(), json!("mtls"));
    TxnToken {
        iss: TTS_ISSUER.to_owned(),
        iat: now,
        exp: now + 300,
        aud: TRUST_DOMAIN.to_owned(),
        txn: format!("6f1c2a9e-0000-4000-8000-{i:012}"),
        sub: format!("user-{i}"),
        scope: REQUESTED_SCOPE.to_owned(),
        req_wl: GATEWAY_ID.to_owned(),
        tctx: None,
        rctx: Some(rctx),
        act: None,
    }
}

/// The crypto bound's parts, each alone on one core.
struct CryptoBound {
    verify: OpStats,
    sign: OpStats,
}

impl CryptoBound {
    /// Verify + sign per second on one core.
    fn per_core(&self) -> f64 {
        1.0 / (self.verify.mean + self.sign.mean).as_secs_f64()
    }

    /// Sign alone per second on one core (all the crypto of a cache hit).
    fn sign_per_core(&self) -> f64 {
        self.sign.per_second()
    }
}

/// (1) The crypto bound, measured sequentially on this thread.
async fn crypto_bound(provider: &Provider, ops: usize) -> CryptoBound {
    println!("(1) crypto bound, one core, {ops} operations each:");
    let validator =
        OidcValidator::new(vec![provider.issuer_config()], Arc::new(SystemClock)).unwrap();
    let tokens = provider.access_tokens(ops + 50);
    // The first validation fetches discovery and the JWKS; then warm up.
    for token in &tokens[..50] {
        validator
            .validate(token, TokenType::AccessToken)
            .await
            .unwrap();
    }
    let mut samples = Vec::with_capacity(ops);
    for token in &tokens[50..] {
        let t = Instant::now();
        let subject = validator
            .validate(token, TokenType::AccessToken)
            .await
            .unwrap();
        samples.push(t.elapsed());
        assert_eq!(subject.scope.len(), 3);
    }
    let verify = OpStats::of(samples);
    verify.print("(a) subject token verify, OidcValidator::validate (JWKS cached)");

    let mut validation = Validation::new(provider.alg);
    validation.set_audience(&[AUDIENCE]);
    validation.set_issuer(&[provider.issuer.as_str()]);
    let samples = tokens[50..]
        .iter()
        .map(|token| {
            let t = Instant::now();
            jsonwebtoken::decode::<Value>(token, &provider.decoding, &validation).unwrap();
            t.elapsed()
        })
        .collect();
    OpStats::of(samples).print(&format!(
        "    reference: bare jsonwebtoken::decode, {}",
        provider.alg_name()
    ));

    let minter = Minter::generate(signing_alg()).unwrap();
    let claims: Vec<TxnToken> = (0..ops + 50).map(sample_claims).collect();
    for c in &claims[..50] {
        minter.mint(c).unwrap();
    }
    let samples = claims[50..]
        .iter()
        .map(|c| {
            let t = Instant::now();
            let token = minter.mint(c).unwrap();
            let elapsed = t.elapsed();
            assert!(token.len() > 100);
            elapsed
        })
        .collect();
    let sign = OpStats::of(samples);
    sign.print(&format!(
        "(b) Txn-Token sign, Minter::mint, {}",
        minter.algorithm()
    ));

    // Reference: an ECDSA P-256 / SHA-256 signature over the same signing input with the
    // key parsed once (jsonwebtoken parses the PKCS#8 key on every signature).
    let reference = PrivateKey::generate().unwrap();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        reference.pkcs8_der().to_vec(),
    ));
    let key = rustls::crypto::aws_lc_rs::sign::any_ecdsa_type(&der).unwrap();
    let signer = key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("a P-256 signer");
    let minted = minter.mint(&claims[0]).unwrap();
    let input = &minted[..minted.rfind('.').unwrap()];
    let samples = (0..ops)
        .map(|_| {
            let t = Instant::now();
            signer.sign(input.as_bytes()).unwrap();
            t.elapsed()
        })
        .collect();
    OpStats::of(samples).print("    reference: ECDSA P-256 sign, key parsed once (aws-lc-rs)");

    let bound = CryptoBound { verify, sign };
    algorithms(ops);
    println!(
        "  bound = 1/(a+b) = {:.0} exchanges/s per core (sign alone: {:.0}/s per core)",
        bound.per_core(),
        bound.sign_per_core()
    );
    bound
}

/// (alg) Txn-Token sign (`Minter::mint`) and verify (an SDK `TxnVerifier`, distinct
/// tokens so none is a cache hit) for each algorithm, one core.
fn algorithms(ops: usize) {
    println!("(alg) Txn-Token algorithms, one core, {ops} operations each:");
    for alg in [SigningAlgorithm::Es256, SigningAlgorithm::EdDsa] {
        let minter = Minter::generate(alg).unwrap();
        let verifier = TxnVerifier::new(
            TRUST_DOMAIN.parse().unwrap(),
            BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
        );
        let claims: Vec<TxnToken> = (0..ops).map(sample_claims).collect();
        let mut tokens = Vec::with_capacity(ops);
        let samples = claims
            .iter()
            .map(|c| {
                let t = Instant::now();
                let token = minter.mint(c).unwrap();
                let elapsed = t.elapsed();
                tokens.push(token);
                elapsed
            })
            .collect();
        let sign = OpStats::of(samples);
        let now = SystemTime::now();
        let samples = tokens
            .iter()
            .map(|token| {
                let t = Instant::now();
                verifier.verify_at(token, now).unwrap();
                t.elapsed()
            })
            .collect();
        let verify = OpStats::of(samples);
        sign.print(&format!("{alg} sign (Minter::mint)"));
        verify.print(&format!("{alg} verify (TxnVerifier::verify_at, uncached)"));
        println!(
            "  {alg}: sign + verify = {} (one issue plus one check downstream)",
            micros(sign.mean + verify.mean)
        );
    }
}

#[derive(Clone, Copy)]
struct Mode {
    label: &'static str,
    slug: &'static str,
    cache: bool,
    distinct: bool,
    /// The token service records its metrics (`TxnConfig::metrics`).
    metrics: bool,
}

const MODES: [Mode; 4] = [
    Mode {
        label: "cache off, distinct tokens",
        slug: "off-distinct",
        cache: false,
        distinct: true,
        metrics: true,
    },
    Mode {
        label: "cache on, distinct tokens (misses)",
        slug: "on-distinct",
        cache: true,
        distinct: true,
        metrics: true,
    },
    Mode {
        label: "cache on, same token (hits)",
        slug: "on-same",
        cache: true,
        distinct: false,
        metrics: true,
    },
    Mode {
        label: "cache off, distinct tokens, metrics off",
        slug: "off-distinct-nometrics",
        cache: false,
        distinct: true,
        metrics: false,
    },
];

/// One timed run.
struct Round {
    samples: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
}

/// All rounds of one mode.
struct Outcome {
    mode: Mode,
    /// Median over the rounds.
    throughput: f64,
    min_throughput: f64,
    max_throughput: f64,
    /// Over the latencies of all rounds.
    p50: Duration,
    p99: Duration,
    cpu_per_exchange: Duration,
}

impl Outcome {
    fn of(mode: Mode, rounds: Vec<Round>) -> Self {
        let mut throughputs: Vec<f64> = rounds
            .iter()
            .map(|r| r.samples.len() as f64 / r.wall.as_secs_f64())
            .collect();
        throughputs.sort_by(f64::total_cmp);
        let mut samples: Vec<Duration> = rounds.iter().flat_map(|r| r.samples.clone()).collect();
        samples.sort();
        let cpu: Duration = rounds.iter().map(|r| r.cpu).sum();
        Self {
            mode,
            throughput: throughputs[throughputs.len() / 2],
            min_throughput: throughputs[0],
            max_throughput: throughputs[throughputs.len() - 1],
            p50: percentile(&samples, 50.0),
            p99: percentile(&samples, 99.0),
            cpu_per_exchange: cpu / u32::try_from(samples.len()).unwrap(),
        }
    }
}

fn txn_toml(endpoint: &str, audit: &Path, cache: bool, issuer: &str, alg: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
signing_algorithm = "{signing}"
issuer = "{TTS_ISSUER}"
workload_api = {endpoint:?}
spiffe_id = "{TTS_ID}"
audit_log = {audit:?}
subject_token_cache = {cache}

[[oidc]]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
algorithms = ["{alg}"]

[policy]
[[policy.caller]]
id = "{GATEWAY_ID}"
subject_token_types = ["access_token"]
max_scope = ["orders.read", "orders.write"]
{condition}
"#,
        audit = audit.display().to_string(),
        signing = signing_alg().name(),
        condition = std::env::var("WRIT_BENCH_CONDITION")
            .map(|c| format!("condition = '''{c}'''"))
            .unwrap_or_default(),
    )
}

/// `WRIT_BENCH_DURABLE_AUDIT=1`: every run also writes its decisions to the durable,
/// hash-chained audit table (group commit; grants wait for their batch's commit).
fn durable_audit() -> bool {
    std::env::var("WRIT_BENCH_DURABLE_AUDIT").is_ok_and(|v| v == "1")
}

async fn exchange_or_panic(client: &TxnClient, token: String, what: &str) -> String {
    let issued = client
        .exchange(TxnRequest::access_token(token).scope(REQUESTED_SCOPE))
        .await
        .unwrap_or_else(|e| panic!("{what}: exchange failed: {e}"));
    assert_eq!(
        issued.issued_token_type,
        TokenType::TxnToken.as_urn(),
        "{what}: issued_token_type"
    );
    assert_eq!(issued.token_type, "N_A", "{what}: token_type");
    assert!(issued.expires_in > 0, "{what}: expires_in");
    issued.access_token
}

/// (2) One run of `n` exchanges by `clients` concurrent clients against a fresh service.
async fn run_exchanges(
    stack: &Stack,
    provider: &Provider,
    mode: Mode,
    clients: usize,
    n: usize,
    warm: usize,
) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join(format!("audit-{}.log", mode.slug));
    let mut toml = txn_toml(
        &stack.endpoint(),
        &audit,
        mode.cache,
        &provider.issuer,
        &provider.alg_name(),
    );
    if let Ok(choice) = std::env::var("WRIT_BENCH_AUDIT_ON_FAILURE") {
        // `allow`: grants do not wait for the durable trail's commit.
        toml = format!("audit_on_failure = {choice:?}\n{toml}");
    }
    if durable_audit() {
        // The durable audit trail on: a migrated SQLite store the service appends to.
        let db = dir.path().join("datastore.sqlite3");
        writ_identity::store::sqlite::SqliteStore::open(&db)
            .await
            .unwrap()
            .close()
            .await;
        toml.push_str(&format!(
            "\n[identity_store]\nbackend = \"sqlite\"\nconnection = {:?}\n\n[audit]\ndurable = true\n",
            db.display().to_string()
        ));
    }
    let config = TxnConfig::from_toml(&toml, dir.path()).unwrap();
    assert_eq!(config.subject_token_cache, mode.cache);
    let mut config = config;
    config.metrics = mode.metrics;
    let server = TxnServer::start(config).await.unwrap();
    let url = format!("https://{}", server.addr);
    let source = X509Source::builder()
        .endpoint(stack.endpoint())
        .spiffe_id(SpiffeId::new(GATEWAY_ID).unwrap())
        .build()
        .await
        .unwrap();
    let txn_clients: Vec<TxnClient> = (0..clients)
        .map(|_| TxnClient::new(&source, &url, SpiffeId::new(TTS_ID).unwrap()).unwrap())
        .collect();

    // Subject tokens, minted before anything is timed.
    let per_client_warm = warm.div_ceil(clients).max(1);
    let (warm_tokens, tokens) = if mode.distinct {
        (
            provider.access_tokens(per_client_warm * clients),
            provider.access_tokens(n),
        )
    } else {
        let one = provider.access_token();
        (vec![one.clone()], vec![one])
    };
    let (warm_tokens, tokens) = (Arc::new(warm_tokens), Arc::new(tokens));

    // Warm-up: every client opens its connection (mTLS handshake) and exchanges a few.
    let mut warm_tasks = Vec::new();
    for (c, client) in txn_clients.iter().cloned().enumerate() {
        let warm_tokens = warm_tokens.clone();
        warm_tasks.push(tokio::spawn(async move {
            let mut first = None;
            for k in 0..per_client_warm {
                let token = warm_tokens[(c * per_client_warm + k) % warm_tokens.len()].clone();
                let issued = exchange_or_panic(&client, token, "warm-up").await;
                first.get_or_insert(issued);
            }
            first.unwrap()
        }));
    }
    let mut firsts = Vec::new();
    for task in warm_tasks {
        firsts.push(task.await.expect("a warm-up client panicked"));
    }
    // The issued tokens are real Txn-Tokens for the gateway, with the narrowed scope.
    let verifier = TxnVerifier::new(
        TRUST_DOMAIN.parse().unwrap(),
        server.service.keys().public_keys(),
    );
    for token in &firsts {
        let claims = verifier.verify_at(token, SystemTime::now()).unwrap();
        assert_eq!(claims.iss, TTS_ISSUER);
        assert_eq!(claims.req_wl, GATEWAY_ID);
        assert_eq!(claims.scope, REQUESTED_SCOPE);
        assert!(claims.sub.starts_with("user-"), "sub {}", claims.sub);
    }

    // Timed: clients take the next token until `n` exchanges have been made.
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in txn_clients {
        let next = next.clone();
        let tokens = tokens.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return samples;
                }
                let token = tokens[i % tokens.len()].clone();
                let t = Instant::now();
                exchange_or_panic(&client, token, &format!("exchange {i}")).await;
                samples.push(t.elapsed());
            }
        }));
    }
    let mut samples = Vec::with_capacity(n);
    for task in tasks {
        samples.extend(task.await.expect("a client panicked"));
    }
    let wall = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    assert_eq!(samples.len(), n);
    drop(server);

    // One audit line per exchange, all granted.
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let granted = lines
        .iter()
        .filter(|l| l.contains(r#""decision":"granted""#))
        .count();
    let expected = n + per_client_warm * clients;
    assert_eq!(
        (lines.len(), granted),
        (expected, expected),
        "audit log of run `{}`",
        mode.label
    );

    samples.sort();
    println!(
        "  {}: {n} exchanges in {wall:.2?} = {:.0}/s, p50 {} p99 {} max {}, \
         process CPU {:.2} s = {} per exchange ({:.2} cores busy)",
        mode.label,
        n as f64 / wall.as_secs_f64(),
        millis(percentile(&samples, 50.0)),
        millis(percentile(&samples, 99.0)),
        millis(samples[samples.len() - 1]),
        cpu.as_secs_f64(),
        micros(cpu / u32::try_from(n).unwrap()),
        cpu.as_secs_f64() / wall.as_secs_f64(),
    );
    Round { samples, wall, cpu }
}

async fn wait_for_svids(stack: &Stack, n: usize) {
    let started = Instant::now();
    while stack.agent.cache.snapshot().svids.len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the agent did not issue {n} SVIDs"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the token service's metrics add to one exchange, one core: the outcome counter
/// and the latency histogram (`TxnMetrics::exchanged`), and the `Instant` reads around it.
fn metrics_cost(ops: usize) {
    let metrics = writ_txn_service::metrics::TxnMetrics::new();
    let n = ops * 1000;
    let started = Instant::now();
    for i in 0..n {
        let took = Instant::now();
        let error = (i % 16 == 0).then_some("invalid_scope");
        metrics.exchanged(std::hint::black_box(error), took.elapsed());
    }
    let per = started.elapsed() / u32::try_from(n).unwrap();
    println!(
        "(metrics) recording one exchange (counter + histogram + clock reads): {} ns, over {n} calls",
        per.as_nanos()
    );
}

fn main() {
    let clients = count("WRIT_BENCH_CLIENTS", 8).max(1);
    let n = count("WRIT_BENCH_EXCHANGES", 4_000).max(1);
    let warm = count("WRIT_BENCH_WARMUP", 200);
    let ops = count("WRIT_BENCH_CRYPTO_OPS", 2_000).max(1);
    let rounds = count("WRIT_BENCH_ROUNDS", 3).max(1);
    let cores = count(
        "WRIT_BENCH_CORES",
        std::thread::available_parallelism().map_or(1, usize::from),
    )
    .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "exchange bench: {cores} cores, {clients} clients, {n} exchanges per run, \
         {rounds} runs per mode, {warm} warm-up exchanges per run, {ops} crypto operations, \
         durable audit {}",
        if durable_audit() { "on" } else { "off" }
    );
    rt.block_on(async {
        let stack = Stack::start(Duration::from_secs(3600)).await;
        stack.register("/tts", &[&uid_selector()]).await;
        stack.register("/gateway", &[&uid_selector()]).await;
        wait_for_svids(&stack, 2).await;
        let provider = Provider::start(subject_alg()).await;
        println!(
            "subject tokens {}, Txn-Tokens {}",
            provider.alg_name(),
            signing_alg()
        );

        let bound = crypto_bound(&provider, ops).await;
        metrics_cost(ops);

        println!(
            "(2) exchanges over keep-alive mTLS, {clients} concurrent clients, \
             {rounds} interleaved rounds per mode:"
        );
        let modes: Vec<Mode> = match std::env::var("WRIT_BENCH_MODES") {
            Ok(list) => {
                let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
                MODES
                    .iter()
                    .copied()
                    .filter(|m| wanted.contains(&m.slug))
                    .collect()
            }
            Err(_) => MODES.to_vec(),
        };
        assert!(!modes.is_empty(), "WRIT_BENCH_MODES names no mode");
        let mut rounds_of: Vec<Vec<Round>> = modes.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (mode, done) in modes.iter().zip(&mut rounds_of) {
                done.push(run_exchanges(&stack, &provider, *mode, clients, n, warm).await);
            }
        }
        let outcomes: Vec<Outcome> = modes
            .iter()
            .zip(rounds_of)
            .map(|(mode, rounds)| Outcome::of(*mode, rounds))
            .collect();
        let by_slug = |slug: &str| outcomes.iter().find(|o| o.mode.slug == slug);

        let all_cores = bound.per_core() * cores as f64;
        for o in &outcomes {
            println!(
                "  {}: median {:.0}/s (rounds {:.0} to {:.0}/s), p50 {} p99 {}, {} CPU per exchange",
                o.mode.label,
                o.throughput,
                o.min_throughput,
                o.max_throughput,
                millis(o.p50),
                millis(o.p99),
                micros(o.cpu_per_exchange),
            );
            println!(
                "    = {:.2} × the verify+sign bound × {cores} cores ({:.0}/s), \
                 {:.2} × the one-core bound; {:.2} × the sign-only bound × {cores} cores",
                o.throughput / all_cores,
                all_cores,
                o.throughput / bound.per_core(),
                o.throughput / (bound.sign_per_core() * cores as f64),
            );
        }
        if let (Some(off), Some(hits), Some(misses)) = (
            by_slug("off-distinct"),
            by_slug("on-same"),
            by_slug("on-distinct"),
        ) {
            println!(
                "  cache effect: hits {:.2}× and misses {:.2}× the throughput with the cache off",
                hits.throughput / off.throughput,
                misses.throughput / off.throughput,
            );
        }
        if let (Some(on), Some(off)) = (by_slug("off-distinct"), by_slug("off-distinct-nometrics")) {
            println!(
                "  metrics effect: with metrics {:.0}/s, without {:.0}/s ({:+.1} % with metrics on)",
                on.throughput,
                off.throughput,
                (on.throughput / off.throughput - 1.0) * 100.0,
            );
        }

        println!();
        println!(
            "| Crypto bound (one core, {ops} ops) | mean | p50 | p99 | per second |"
        );
        println!("|---|---|---|---|---|");
        for (what, s) in [
            (
                format!(
                    "subject token verify (`OidcValidator::validate`, {}, JWKS cached)",
                    provider.alg_name()
                ),
                &bound.verify,
            ),
            (
                format!("Txn-Token sign (`Minter::mint`, {})", signing_alg()),
                &bound.sign,
            ),
        ] {
            println!(
                "| {what} | {} | {} | {} | {:.0} |",
                micros(s.mean),
                micros(s.p50),
                micros(s.p99),
                s.per_second()
            );
        }
        println!(
            "| **bound** = 1/(verify + sign) | {} | | | **{:.0}** per core ({:.0} on {cores} cores) |",
            micros(bound.verify.mean + bound.sign.mean),
            bound.per_core(),
            all_cores,
        );
        println!();
        println!(
            "| Exchange ({clients} keep-alive mTLS clients, loopback, {rounds} × {n} exchanges) | exchanges/s (median; range) | p50 | p99 | process CPU / exchange | vs bound × {cores} cores | vs one-core bound |"
        );
        println!("|---|---|---|---|---|---|---|");
        for o in &outcomes {
            println!(
                "| {} | {:.0} ({:.0}–{:.0}) | {} | {} | {} | {:.2} | {:.2} |",
                o.mode.label,
                o.throughput,
                o.min_throughput,
                o.max_throughput,
                millis(o.p50),
                millis(o.p99),
                micros(o.cpu_per_exchange),
                o.throughput / all_cores,
                o.throughput / bound.per_core(),
            );
        }
    });
}
