//! Work-per-request guards of the identity server's signing paths (issue 20): this test
//! target's own counting global allocator (bytes), and the process-wide count of JWS
//! key parses ([`writ_spiffe::key::jws_key_parses`]), around one X509-SVID or JWT-SVID
//! signature by the CA after warm-up. They count work, never time: the figures are in
//! `writ bench issue`.
//!
//! - signing a JWT-SVID (and a WIT-SVID) parses no key: the authority's key is parsed
//!   at its first signature and kept;
//! - signing an X509-SVID and a JWT-SVID allocates a bounded amount (the certificate's
//!   DER and its parameters; the token's JSON and text).
#![expect(
    unused_crate_dependencies,
    reason = "a test target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed setup step should abort the test loudly"
)]

use std::alloc::System;
use std::sync::Arc;

use cap::Cap;
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;
use writ_spiffe::key::jws_key_parses;

/// Counts the bytes every allocation asks for (`cap` with its `stats`), process-wide:
/// each guard runs in the one test of this binary, on a current-thread runtime, so
/// nothing else allocates while a call is measured.
#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes allocated so far (freed ones included).
fn allocated() -> u64 {
    ALLOCATOR.total_allocated() as u64
}

/// Bytes allocated and JWS key parses of one `op`.
fn work<T>(op: impl FnOnce() -> T) -> (u64, u64, T) {
    let (a, p) = (allocated(), jws_key_parses());
    let out = op();
    (allocated() - a, jws_key_parses() - p, out)
}

fn ca(rt: &tokio::runtime::Runtime) -> CertificateAuthority {
    rt.block_on(async {
        CertificateAuthority::load(
            CaConfig::new(TrustDomain::new("example.org").unwrap()),
            Arc::new(SystemClock),
            Arc::new(MemoryKeyManager::new()),
            Arc::new(SqliteStore::open_in_memory().await.unwrap()),
        )
        .await
        .unwrap()
    })
}

/// Measured after tuning: 1,278 bytes per JWT-SVID (header and claims JSON, the base64
/// text, the `jti`, the audience copy). The bound is set just above.
const JWT_SVID_MAX_BYTES: u64 = 1_600;
/// Measured after tuning: 1,244 bytes per X509-SVID (the TBS and certificate DER, the
/// signature, the chain and the SPIFFE ID copy) since the CA encodes leaves from a
/// per-authority template (`ca/leaf.rs`); rcgen's parameters and DER writer took 6,146.
/// The bound is set just above.
const X509_SVID_MAX_BYTES: u64 = 1_600;

/// The one test of this binary (the allocator's count is process-wide, so the guards
/// run one after another).
#[test]
fn svid_signing_parses_no_key_and_allocates_within_its_bounds() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = ca(&rt);
    let id = SpiffeId::new("spiffe://example.org/agents/planner").unwrap();

    // JWT-SVIDs: the first signature parses the authority's key, once.
    let aud = vec!["tool-server".to_owned()];
    ca.sign_jwt_svid(&id, &aud, None).unwrap();
    let (bytes, parses, token) = work(|| ca.sign_jwt_svid(&id, &aud, None));
    assert!(token.is_ok(), "{token:?}");
    eprintln!("JWT-SVID: {bytes} bytes, {parses} key parses");
    assert_eq!(parses, 0, "a JWT-SVID signature parsed a key");
    assert!(
        bytes <= JWT_SVID_MAX_BYTES,
        "{bytes} bytes per JWT-SVID, at most {JWT_SVID_MAX_BYTES}"
    );
    let (_, parses, more) = work(|| {
        (0..10)
            .map(|_| ca.sign_jwt_svid(&id, &aud, None))
            .collect::<Result<Vec<_>, _>>()
    });
    assert_eq!(more.map(|v| v.len()).unwrap(), 10);
    assert_eq!(parses, 0, "JWT-SVID signatures parsed a key");

    // X509-SVIDs for a workload's public key.
    let key = PrivateKey::generate().unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap());
    ca.sign_x509_svid(&id, &spki, None, &[]).unwrap();
    let (bytes, parses, svid) = work(|| ca.sign_x509_svid(&id, &spki, None, &[]));
    assert_eq!(svid.unwrap().cert_chain.len(), 1);
    eprintln!("X509-SVID: {bytes} bytes, {parses} key parses");
    assert_eq!(parses, 0);
    assert!(
        bytes <= X509_SVID_MAX_BYTES,
        "{bytes} bytes per X509-SVID, at most {X509_SVID_MAX_BYTES}"
    );
}
