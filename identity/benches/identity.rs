//! Crypto throughput of the identity core on one core (`cargo bench -p writ-identity
//! --bench identity`): X509-SVID issuance (key generation + signing), X509-SVID signing
//! of a given public key, JWT-SVID signing and validation, X509-SVID validation, and an
//! identity template's parse and per-caller rendering.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use writ_identity::bundle::BundleSet;
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::SystemClock;
use writ_identity::entry::template::IdTemplate;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::selector::Selector;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::svid::{jwt, x509};

const RUN_FOR: Duration = Duration::from_secs(3);

fn measure(name: &str, mut op: impl FnMut()) {
    // Warm up, then run for a fixed wall time on this (single) thread.
    for _ in 0..50 {
        op();
    }
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < RUN_FOR {
        op();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<44} {:>10.0} /s   {:>8.1} us/op   ({n} ops)",
        n as f64 / secs,
        secs * 1e6 / n as f64
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let td = TrustDomain::new("example.org")?;
    let ca = rt.block_on(async {
        CertificateAuthority::load(
            CaConfig::new(td.clone()),
            Arc::new(SystemClock),
            Arc::new(MemoryKeyManager::new()),
            Arc::new(
                SqliteStore::open_in_memory()
                    .await
                    .map_err(|e| e.to_string())?,
            ),
        )
        .await
        .map_err(|e| e.to_string())
    })?;
    let id = SpiffeId::new("spiffe://example.org/agents/planner")?;
    let bundles = BundleSet::of((*ca.bundle()).clone());
    let workload_key = PrivateKey::generate()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&workload_key.to_rcgen()?);

    println!("one core, {} s per figure", RUN_FOR.as_secs());
    measure("X509-SVID issue (P-256 keygen + sign)", || {
        black_box(ca.mint_x509_svid(&id, None, &[]).ok());
    });
    measure("X509-SVID sign (given public key)", || {
        black_box(ca.sign_x509_svid(&id, &spki, None, &[]).ok());
    });
    let svid = ca.mint_x509_svid(&id, None, &[])?;
    measure("X509-SVID validate (chain + leaf rules)", || {
        black_box(x509::validate(&svid.cert_chain, &bundles, std::time::SystemTime::now()).ok());
    });
    let aud = vec!["tool-server".to_owned()];
    measure("JWT-SVID sign (ES256)", || {
        black_box(ca.sign_jwt_svid(&id, &aud, None).ok());
    });
    let (token, _) = ca.sign_jwt_svid(&id, &aud, None)?;
    measure("JWT-SVID validate (ES256)", || {
        black_box(
            jwt::validate(
                &token,
                &["tool-server"],
                &bundles,
                std::time::SystemTime::now(),
            )
            .ok(),
        );
    });
    let text = "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}";
    measure("template parse (2 placeholders)", || {
        black_box(IdTemplate::parse(black_box(text)).ok());
    });
    let template = IdTemplate::parse(text)?;
    let selectors: Vec<Selector> = [
        "k8s:ns:shop",
        "k8s:sa:cart",
        "k8s:pod-name:cart-7d9f",
        "k8s:pod-uid:0b6c",
        "k8s:container-name:cart",
        "k8s:node-name:n1",
        "unix:uid:1000",
        "unix:gid:1000",
    ]
    .iter()
    .map(|s| s.parse())
    .collect::<Result<_, _>>()?;
    measure("template render for a caller (8 selectors)", || {
        black_box(template.render_for(black_box(&selectors)).ok());
    });
    Ok(())
}
