//! The CA end to end: SVID profile, TTL caps, SPIRE-style rotation driven by an injected
//! clock, persistence across restarts, and an upstream CA.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use writ_identity::bundle::BundleSet;
use writ_identity::ca::{CaConfig, CertificateAuthority, SlotState, UpstreamAuthority};
use writ_identity::clock::{Clock, ManualClock, unix_seconds};
use writ_identity::key_manager::{DiskKeyManager, KeyManager, MemoryKeyManager};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::Store;
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::svid::{jwt, x509};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    td().spiffe_id(path).unwrap()
}

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

async fn ca_with(
    clock: &ManualClock,
    keys: Arc<dyn KeyManager>,
    store: Arc<dyn Store>,
) -> CertificateAuthority {
    CertificateAuthority::load(CaConfig::new(td()), Arc::new(clock.clone()), keys, store)
        .await
        .unwrap()
}

async fn memory_ca(clock: &ManualClock) -> CertificateAuthority {
    ca_with(
        clock,
        Arc::new(MemoryKeyManager::new()),
        Arc::new(SqliteStore::open_in_memory().await.unwrap()),
    )
    .await
}

fn bundles(ca: &CertificateAuthority) -> BundleSet {
    BundleSet::of((*ca.bundle()).clone())
}

#[tokio::test]
async fn x509_svid_follows_the_standard_profile() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    let svid = ca
        .mint_x509_svid(
            &id("/agents/planner"),
            None,
            &["planner.example.org".into()],
        )
        .unwrap();
    assert_eq!(
        svid.cert_chain.len(),
        1,
        "self-signed CA: the chain is the leaf alone"
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();

    let uris: Vec<_> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://example.org/agents/planner"]);

    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("explicit basicConstraints");
    assert!(!bc.value.ca);
    let ku = cert
        .extensions()
        .iter()
        .find(|e| matches!(e.parsed_extension(), ParsedExtension::KeyUsage(_)))
        .unwrap();
    assert!(ku.critical, "keyUsage must be critical");
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert_eq!(
        cert.validity().not_before.timestamp(),
        unix_seconds(start()) - 10,
        "NotBefore is backdated 10 s"
    );
    assert_eq!(
        cert.validity().not_after.timestamp(),
        unix_seconds(start() + HOUR)
    );

    let ok = x509::validate(&svid.cert_chain, &bundles(&ca), clock.now()).unwrap();
    assert_eq!(ok.spiffe_id, id("/agents/planner"));
}

#[tokio::test]
async fn an_ip_literal_becomes_an_ip_san_and_names_dns_sans() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    let names = ["127.0.0.1", "localhost", "::1", "tts.example.org"].map(String::from);
    let svid = ca.mint_x509_svid(&id("/tts"), None, &names).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    let (mut uris, mut dns, mut ips) = (vec![], vec![], vec![]);
    for san in sans {
        match san {
            GeneralName::URI(u) => uris.push(u.to_string()),
            GeneralName::DNSName(d) => dns.push(d.to_string()),
            GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    assert_eq!(uris, ["spiffe://example.org/tts"], "exactly one URI SAN");
    assert_eq!(dns, ["localhost", "tts.example.org"]);
    let mut v6 = vec![0u8; 15];
    v6.push(1);
    assert_eq!(ips, [vec![127, 0, 0, 1], v6]);
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cn,
        ["localhost"],
        "the CN is the first DNS name, never an IP"
    );
    let ok = x509::validate(&svid.cert_chain, &bundles(&ca), clock.now()).unwrap();
    assert_eq!(ok.spiffe_id, id("/tts"));

    for bad in ["10.0.0", "[::1]", "a_b.org", "1.2.3.4:80"] {
        assert!(
            ca.mint_x509_svid(&id("/tts"), None, &[bad.to_owned()])
                .is_err(),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn validator_refuses_foreign_expired_and_non_svid_chains() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    let other = memory_ca(&clock).await; // same trust domain name, different root
    let svid = other.mint_x509_svid(&id("/w"), None, &[]).unwrap();
    assert!(matches!(
        x509::validate(&svid.cert_chain, &bundles(&ca), clock.now()),
        Err(x509::X509SvidError::Chain(_))
    ));

    let svid = ca
        .mint_x509_svid(&id("/w"), Some(Duration::from_secs(60)), &[])
        .unwrap();
    clock.advance(Duration::from_secs(61));
    assert!(matches!(
        x509::validate(&svid.cert_chain, &bundles(&ca), clock.now()),
        Err(x509::X509SvidError::Chain(_))
    ));

    // The CA certificate itself is not an SVID (cA=true, keyCertSign).
    let root = ca.bundle().x509_authorities()[0].clone();
    assert!(x509::validate(&[root], &bundles(&ca), clock.now()).is_err());
    assert!(matches!(
        x509::validate(&[vec![0x30, 0x03, 1, 2, 3]], &bundles(&ca), clock.now()),
        Err(x509::X509SvidError::Parse { .. })
    ));
    assert!(matches!(
        x509::validate(&[], &bundles(&ca), clock.now()),
        Err(x509::X509SvidError::EmptyChain)
    ));
    // A foreign trust domain is refused before any key is generated.
    let foreign = SpiffeId::new("spiffe://other.org/w").unwrap();
    assert!(ca.mint_x509_svid(&foreign, None, &[]).is_err());
}

#[tokio::test]
async fn svid_ttl_is_capped_by_the_signing_ca() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    // 30 days asked, the CA lives 24 h.
    let svid = ca
        .mint_x509_svid(&id("/w"), Some(Duration::from_secs(30 * 24 * 3600)), &[])
        .unwrap();
    let ca_expiry = ca
        .authorities()
        .into_iter()
        .find(|(k, _, s, _)| k == "x509" && *s == SlotState::Active)
        .unwrap()
        .3;
    assert_eq!(svid.expires_at, ca_expiry);
    let (_, exp) = ca
        .sign_jwt_svid(
            &id("/w"),
            &["a".into()],
            Some(Duration::from_secs(30 * 24 * 3600)),
        )
        .unwrap();
    assert!(exp <= clock.now() + 24 * HOUR);
}

#[tokio::test]
async fn rotation_prepares_activates_and_retires_like_spire() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    let states = |ca: &CertificateAuthority, kind: &str| {
        let mut v: Vec<SlotState> = ca
            .authorities()
            .into_iter()
            .filter(|(k, ..)| k == kind)
            .map(|(_, _, s, _)| s)
            .collect();
        v.sort_by_key(|s| format!("{s:?}"));
        v
    };
    assert_eq!(states(&ca, "x509"), vec![SlotState::Active]);
    let seq0 = ca.bundle().sequence();
    assert_eq!(ca.bundle().x509_authorities().len(), 1);

    // An SVID signed late in the first CA's life, capped at its expiry (24 h).
    clock.advance(19 * HOUR);
    ca.rotate().await.unwrap();
    // Past half-life: the next CA is prepared and published, not yet used.
    assert_eq!(
        states(&ca, "x509"),
        vec![SlotState::Active, SlotState::Prepared]
    );
    assert_eq!(ca.bundle().x509_authorities().len(), 2);
    assert!(ca.bundle().sequence() > seq0);
    let old_svid = ca.mint_x509_svid(&id("/w"), Some(10 * HOUR), &[]).unwrap();
    assert_eq!(old_svid.expires_at, start() + 24 * HOUR);
    let old_jwt = ca
        .sign_jwt_svid(&id("/w"), &["aud".into()], Some(10 * HOUR))
        .unwrap()
        .0;

    // Past five sixths (20 h): the prepared CA becomes active, the first one old.
    clock.advance(HOUR + Duration::from_secs(1));
    ca.rotate().await.unwrap();
    assert_eq!(states(&ca, "x509"), vec![SlotState::Active, SlotState::Old]);
    let new_svid = ca.mint_x509_svid(&id("/w"), Some(10 * HOUR), &[]).unwrap();
    assert_ne!(
        x509_parser::parse_x509_certificate(&new_svid.cert_chain[0])
            .unwrap()
            .1
            .issuer()
            .to_string(),
        x509_parser::parse_x509_certificate(&old_svid.cert_chain[0])
            .unwrap()
            .1
            .issuer()
            .to_string(),
        "new SVIDs come from the new CA"
    );
    // Both the earlier SVID and JWT-SVID still validate against the current bundle.
    x509::validate(&old_svid.cert_chain, &bundles(&ca), clock.now()).unwrap();
    x509::validate(&new_svid.cert_chain, &bundles(&ca), clock.now()).unwrap();
    jwt::validate(&old_jwt, &["aud"], &bundles(&ca), clock.now()).unwrap();

    // After the old CA's expiry it leaves the bundle: nothing it signed is valid anyway.
    clock.set(start() + 24 * HOUR + Duration::from_secs(1));
    ca.rotate().await.unwrap();
    assert_eq!(states(&ca, "x509"), vec![SlotState::Active]);
    assert_eq!(ca.bundle().x509_authorities().len(), 1);
    assert!(x509::validate(&old_svid.cert_chain, &bundles(&ca), clock.now()).is_err());
    x509::validate(&new_svid.cert_chain, &bundles(&ca), clock.now()).unwrap();
}

#[tokio::test]
async fn bundle_sequence_moves_only_on_change() {
    let clock = ManualClock::new(start());
    let ca = memory_ca(&clock).await;
    let mut rx = ca.subscribe();
    let seq = ca.bundle().sequence();
    assert!(!ca.rotate().await.unwrap(), "nothing to do yet");
    assert_eq!(ca.bundle().sequence(), seq);
    clock.advance(13 * HOUR);
    assert!(ca.rotate().await.unwrap());
    assert_eq!(ca.bundle().sequence(), seq + 1);
    assert!(rx.has_changed().unwrap(), "subscribers see the new bundle");
    assert_eq!(rx.borrow_and_update().sequence(), seq + 1);
}

#[tokio::test]
async fn state_survives_restart_with_disk_keys_and_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(start());
    let open = || async {
        let keys: Arc<dyn KeyManager> =
            Arc::new(DiskKeyManager::open(&dir.path().join("keys")).unwrap());
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite3"))
                .await
                .unwrap(),
        );
        ca_with(&clock, keys, store).await
    };
    let first = open().await;
    let bundle = first.bundle();
    let svid = first.mint_x509_svid(&id("/w"), None, &[]).unwrap();
    let token = first
        .sign_jwt_svid(&id("/w"), &["aud".into()], None)
        .unwrap()
        .0;
    drop(first);

    let second = open().await;
    assert_eq!(*second.bundle(), *bundle, "same authorities, same sequence");
    x509::validate(&svid.cert_chain, &bundles(&second), clock.now()).unwrap();
    jwt::validate(&token, &["aud"], &bundles(&second), clock.now()).unwrap();
    // And it keeps signing with the same CA.
    let again = second.mint_x509_svid(&id("/w"), None, &[]).unwrap();
    x509::validate(
        &again.cert_chain,
        &BundleSet::of((*bundle).clone()),
        clock.now(),
    )
    .unwrap();
}

#[tokio::test]
async fn upstream_ca_signs_intermediates() {
    // An upstream root made with rcgen, as an operator's existing PKI would be.
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = (start() - HOUR).into();
    params.not_after = (start() + 10 * HOUR).into();
    let root = params.self_signed(&root_key).unwrap();

    let upstream = UpstreamAuthority::from_pem(&root.pem(), &root_key.serialize_pem()).unwrap();
    let clock = ManualClock::new(start());
    let mut config = CaConfig::new(td());
    config.upstream = Some(upstream);
    let ca = CertificateAuthority::load(
        config,
        Arc::new(clock.clone()),
        Arc::new(MemoryKeyManager::new()),
        Arc::new(SqliteStore::open_in_memory().await.unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(
        ca.bundle().x509_authorities(),
        &[root.der().to_vec()],
        "bundle holds the upstream root"
    );
    let svid = ca.mint_x509_svid(&id("/w"), Some(24 * HOUR), &[]).unwrap();
    assert_eq!(svid.cert_chain.len(), 2, "leaf, then Writ's intermediate");
    assert_eq!(
        svid.expires_at,
        start() + 10 * HOUR,
        "capped by the upstream CA's expiry"
    );
    x509::validate(&svid.cert_chain, &bundles(&ca), clock.now()).unwrap();

    // A key that does not match the certificate is refused.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(UpstreamAuthority::from_pem(&root.pem(), &other.serialize_pem()).is_err());
}
