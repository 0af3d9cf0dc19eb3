//! `writ bench issue`: X509-SVID and JWT-SVID issuance by the CA against the raw
//! signing rate, in the same run.
//!
//! Issuance is measured in process, on the CA's own API
//! ([`CertificateAuthority::sign_x509_svid`], [`CertificateAuthority::sign_jwt_svid`]):
//! a CA of a fresh trust domain on an in-memory store and key manager, on this one
//! thread. That is the signing path the node API and the agent's Workload API reach
//! after their authorization checks, without the gRPC and store work around it (the
//! `workload-api` bench measures that path end to end).
//!
//! - `x509`: an X509-SVID for a workload's public key (a DER SubjectPublicKeyInfo, as
//!   the agent sends it): certificate parameters, the TBS DER and its ECDSA P-256
//!   signature by the CA key. The bound: ECDSA P-256 SHA-256 signatures (ASN.1) of a
//!   message as long as the certificate, with a key parsed once (aws-lc-rs);
//! - `jwt`: a JWT-SVID (ES256) for one audience. The bound: ES256 signatures (`r || s`)
//!   of a message as long as the token's signing input, with a key parsed once.
//!
//! The bound and the issuance are alternated in rounds. Every result is checked.

use std::sync::Arc;

use anyhow::Context as _;
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair as _,
};
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;

use super::{Budget, Report, Totals, time_loop};

/// Options of `writ bench issue`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Only this case (default: both).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
}

/// A case of `writ bench issue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// X509-SVIDs for a given public key.
    X509,
    /// JWT-SVIDs (ES256) for one audience.
    Jwt,
}

/// Rounds each case is split into, alternating issuance and its bound.
const ROUNDS: u32 = 4;
/// The ratio to the raw signing rate that issue 20 asks of issuance.
const TARGET: f64 = 0.9;

/// Runs the Issue bench: one report per case, with its ratio to the raw signing rate.
///
/// # Errors
/// The CA cannot start, or an issuance fails.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    let td = TrustDomain::new("bench.example.org")?;
    let ca = CertificateAuthority::load(
        CaConfig::new(td.clone()),
        Arc::new(SystemClock),
        Arc::new(MemoryKeyManager::new()),
        Arc::new(SqliteStore::open_in_memory().await?),
    )
    .await
    .context("in-memory CA")?;
    let id = td.spiffe_id("/bench/issue/workload")?;
    let mut reports = Vec::new();
    if args.mode != Some(Mode::Jwt) {
        reports.push(x509(&ca, &id, budget)?);
    }
    if args.mode != Some(Mode::X509) {
        reports.push(jwt(&ca, &id, budget)?);
    }
    Ok(reports)
}

fn x509(ca: &CertificateAuthority, id: &SpiffeId, budget: Budget) -> anyhow::Result<Report> {
    let rng = SystemRandom::new();
    let workload = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)?;
    let spki = workload.public_key().as_der()?.as_ref().to_vec();
    let first = ca.sign_x509_svid(id, &spki, None, &[])?;
    let len = first.cert_chain.first().map_or(0, Vec::len);
    let (raw, message) = raw_signer(&ECDSA_P256_SHA256_ASN1_SIGNING, len)?;
    let (issued, bound) = alternate(
        budget,
        || {
            let svid = ca.sign_x509_svid(id, &spki, None, &[])?;
            anyhow::ensure!(
                svid.cert_chain.first().is_some_and(|c| !c.is_empty()),
                "an X509-SVID without a certificate"
            );
            Ok(())
        },
        || {
            raw.sign(&rng, &message)?;
            Ok(())
        },
    )?;
    Ok(issued
        .report("issue", "x509")
        .bound(
            "ECDSA P-256 signatures (aws-lc-rs, key parsed once), same run",
            bound.rate(),
        )
        .target(TARGET)
        .note("CertificateAuthority::sign_x509_svid in process, one thread"))
}

fn jwt(ca: &CertificateAuthority, id: &SpiffeId, budget: Budget) -> anyhow::Result<Report> {
    let rng = SystemRandom::new();
    let audience = vec!["bench-audience".to_owned()];
    let (first, _) = ca.sign_jwt_svid(id, &audience, None)?;
    let len = first.rfind('.').unwrap_or(first.len());
    let (raw, message) = raw_signer(&ECDSA_P256_SHA256_FIXED_SIGNING, len)?;
    let (issued, bound) = alternate(
        budget,
        || {
            let (token, _) = ca.sign_jwt_svid(id, &audience, None)?;
            anyhow::ensure!(token.split('.').count() == 3, "not a compact JWS");
            Ok(())
        },
        || {
            raw.sign(&rng, &message)?;
            Ok(())
        },
    )?;
    Ok(issued
        .report("issue", "jwt")
        .subject_alg("ES256")
        .bound(
            "ES256 signatures (aws-lc-rs, key parsed once), same run",
            bound.rate(),
        )
        .target(TARGET)
        .note("CertificateAuthority::sign_jwt_svid in process, one thread"))
}

/// A P-256 key of `alg`, parsed once, and a message of `len` bytes to sign.
fn raw_signer(
    alg: &'static EcdsaSigningAlgorithm,
    len: usize,
) -> anyhow::Result<(EcdsaKeyPair, Vec<u8>)> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new())?;
    let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref())?;
    Ok((key, vec![0x42; len.max(1)]))
}

/// `measured` and `bound` alternated in [`ROUNDS`] rounds of a share of `budget` each.
fn alternate(
    budget: Budget,
    mut measured: impl FnMut() -> anyhow::Result<()>,
    mut bound: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Totals, Totals)> {
    let round = Budget {
        ops: budget.ops.div_ceil(u64::from(ROUNDS)).max(1),
        time: budget.time / (2 * ROUNDS),
    };
    let (mut m, mut b) = (Totals::default(), Totals::default());
    for _ in 0..ROUNDS {
        m.add(time_loop(round, |_| measured())?);
        b.add(time_loop(round, |_| bound())?);
    }
    Ok((m, b))
}
