//! Federation against live endpoints in process: a server's https_spiffe bundle endpoint
//! refreshed by another server's relationship (bootstrap bundle, then each refresh), an
//! https_web endpoint with a test CA, and bad input: an endpoint serving garbage, a huge
//! bundle, a bundle of another trust domain, a sequence going backwards, and a hung
//! endpoint (bounded by the fetch timeout). Each bad answer keeps the last good bundle
//! and leaves a clear error on the relationship.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use writ_identity::bundle::Bundle;
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::proto::admin as pb;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::federation::endpoint::{self, DocumentSource, EndpointProfile};
use writ_identity::server::federation::manage;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::tls::SvidResolver;

async fn server(td: &str, dir: &std::path::Path) -> Arc<ServerState> {
    let td = TrustDomain::new(td).unwrap();
    let mut config = ServerConfig::with_defaults(td, dir).unwrap();
    config.federation.limits.fetch_timeout = Duration::from_secs(2);
    let store = Arc::new(SqliteStore::open(&dir.join("db.sqlite3")).await.unwrap());
    ServerState::with_parts(
        config,
        Arc::new(SystemClock),
        store,
        Arc::new(MemoryKeyManager::new()),
    )
    .await
    .unwrap()
}

fn relationship(url: &str, endpoint_id: &str, bundle: &str) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: "partner.test".into(),
        bundle_endpoint_url: url.into(),
        bundle_endpoint_profile: "https_spiffe".into(),
        endpoint_spiffe_id: endpoint_id.into(),
        trust_domain_bundle: bundle.into(),
        trust_domain_bundle_format: "spiffe".into(),
        ..pb::FederationRelationship::default()
    }
}

async fn held(state: &ServerState) -> (u64, String) {
    let b = state
        .store
        .fetch_bundle("spiffe://partner.test")
        .await
        .unwrap()
        .expect("a partner.test bundle is held");
    (b.sequence, b.document)
}

/// A fake partner.test endpoint presenting an SVID of partner.test's CA
/// (`spiffe://partner.test/fake-endpoint`) and serving whatever `doc` holds.
async fn fake_endpoint(partner: &ServerState, doc: Arc<Mutex<String>>) -> String {
    let id = SpiffeId::new("spiffe://partner.test/fake-endpoint").unwrap();
    let svid = partner.ca.mint_x509_svid(&id, None, &[]).unwrap();
    let resolver = SvidResolver::new();
    resolver.set(&svid).unwrap();
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    let document: DocumentSource = Arc::new(move || doc.lock().unwrap().clone());
    tokio::spawn(endpoint::serve(
        listener,
        Arc::new(tls),
        document,
        std::future::pending(),
    ));
    url
}

#[tokio::test]
async fn https_spiffe_refresh_and_bad_input_keep_the_last_good_bundle() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ours = server("example.org", dirs.0.path()).await;
    let partner = server("partner.test", dirs.1.path()).await;

    // partner.test's real endpoint (its server SVID).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    tokio::spawn(endpoint::serve_for(
        partner.clone(),
        listener,
        EndpointProfile::HttpsSpiffe,
        std::future::pending(),
    ));
    let partner_bundle = partner.ca.bundle();
    // Without a bootstrap bundle, https_spiffe cannot authenticate the endpoint.
    let created = manage::create(
        &ours,
        relationship(&url, "spiffe://partner.test/writ/server", ""),
    )
    .await
    .unwrap();
    assert!(!created.has_bundle);
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert!(
        r.last_error.contains("no bundle of partner.test"),
        "{}",
        r.last_error
    );
    manage::delete(&ours, "partner.test").await.unwrap();

    manage::create(
        &ours,
        relationship(
            &url,
            "spiffe://partner.test/writ/server",
            &partner_bundle.to_json(),
        ),
    )
    .await
    .unwrap();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert_eq!(r.last_error, "");
    assert!(r.last_refresh_at > 0);
    let (seq, _) = held(&ours).await;
    assert_eq!(seq, partner_bundle.sequence());

    // The endpoint must present the SPIFFE ID the relationship names.
    let mut wrong_id = relationship(&url, "spiffe://partner.test/someone-else", "");
    manage::update(&ours, wrong_id.clone()).await.unwrap();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert!(r.last_error.contains("cannot fetch"), "{}", r.last_error);

    // Bad input from a (fake) endpoint the relationship trusts.
    let doc = Arc::new(Mutex::new(String::new()));
    let fake = fake_endpoint(&partner, doc.clone()).await;
    wrong_id.bundle_endpoint_url = fake.clone();
    wrong_id.endpoint_spiffe_id = "spiffe://partner.test/fake-endpoint".into();
    manage::update(&ours, wrong_id).await.unwrap();

    let good = held(&ours).await;
    let mut newer = (*partner_bundle).clone();
    newer.set_sequence(partner_bundle.sequence() + 10);
    let mut older = (*partner_bundle).clone();
    older.set_sequence(partner_bundle.sequence() + 5);
    let huge = format!(
        r#"{{"keys":[],"pad":"{}"}}"#,
        "x".repeat(writ_identity::bundle::MAX_BUNDLE_BYTES)
    );
    let cases: Vec<(String, &str)> = vec![
        ("<html>garbage</html>".into(), "is invalid"),
        (huge, "larger than"),
        (
            ours.ca.bundle().to_json(),
            "is for example.org, not partner.test",
        ),
        (r#"{"keys":[]}"#.into(), "holds no authority"),
    ];
    for (served, expected) in cases {
        *doc.lock().unwrap() = served;
        let r = manage::refresh(&ours, "partner.test").await.unwrap();
        assert!(
            r.last_error.contains(expected),
            "{expected}: {}",
            r.last_error
        );
        assert_eq!(held(&ours).await, good, "the last good bundle is kept");
        let shown = manage::get(&ours, "partner.test").await.unwrap();
        assert_eq!(shown.last_error, r.last_error);
        assert_eq!(shown.last_refresh_at, r.last_refresh_at);
    }
    // A newer bundle is taken; then one whose sequence goes backwards is refused.
    *doc.lock().unwrap() = newer.to_json();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert_eq!(r.last_error, "");
    assert_eq!(held(&ours).await.0, newer.sequence());
    *doc.lock().unwrap() = older.to_json();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert!(
        r.last_error.contains("lower than the held bundle's"),
        "{}",
        r.last_error
    );
    assert_eq!(held(&ours).await.0, newer.sequence());

    // A hung endpoint: accepts and never answers; the fetch ends at the timeout.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_url = format!("https://{}/", hung.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held_open = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held_open.push(s);
        }
    });
    manage::update(
        &ours,
        relationship(&hung_url, "spiffe://partner.test/fake-endpoint", ""),
    )
    .await
    .unwrap();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert!(
        r.last_error.contains("did not answer within 2s"),
        "{}",
        r.last_error
    );
    assert_eq!(held(&ours).await.0, newer.sequence());

    // The own trust domain is refused everywhere.
    let own = pb::FederationRelationship {
        trust_domain: "example.org".into(),
        ..relationship(&url, "spiffe://example.org/writ/server", "")
    };
    assert!(manage::create(&ours, own).await.is_err());
    assert!(
        manage::set_bundle(
            &ours,
            pb::SetBundleRequest {
                trust_domain: "spiffe://example.org".into(),
                bundle: ours.ca.bundle().to_json(),
                format: "spiffe".into(),
            }
        )
        .await
        .is_err()
    );
    assert!(manage::delete_bundle(&ours, "example.org").await.is_err());
}

#[tokio::test]
async fn https_web_endpoint_with_a_test_ca() {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ours = server("example.org", dirs.0.path()).await;
    let partner = server("partner.test", dirs.1.path()).await;

    // A test CA and a certificate for localhost and 127.0.0.1.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    leaf_params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    let cert_file = dirs.1.path().join("web.pem");
    let key_file = dirs.1.path().join("web-key.pem");
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(endpoint::serve_for(
        partner.clone(),
        listener,
        EndpointProfile::HttpsWeb {
            cert_file,
            key_file,
        },
        std::future::pending(),
    ));
    let web = |url: String, ca_pem: String| pb::FederationRelationship {
        trust_domain: "partner.test".into(),
        bundle_endpoint_url: url,
        bundle_endpoint_profile: "https_web".into(),
        web_ca_pem: ca_pem,
        ..pb::FederationRelationship::default()
    };
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}/");
        let _ = manage::delete(&ours, "partner.test").await;
        manage::create(&ours, web(url, ca.pem())).await.unwrap();
        let r = manage::refresh(&ours, "partner.test").await.unwrap();
        assert_eq!(r.last_error, "", "{host}");
        assert!(r.has_bundle);
    }
    let stored = held(&ours).await;
    let parsed = Bundle::from_json(TrustDomain::new("partner.test").unwrap(), &stored.1).unwrap();
    assert!(parsed.same_content(&partner.ca.bundle()));

    // Another CA does not vouch for the endpoint: refused, the bundle stays.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other.self_signed(&other_key).unwrap();
    manage::update(
        &ours,
        web(format!("https://localhost:{port}/"), other.pem()),
    )
    .await
    .unwrap();
    let r = manage::refresh(&ours, "partner.test").await.unwrap();
    assert!(r.last_error.contains("cannot fetch"), "{}", r.last_error);
    assert_eq!(held(&ours).await, stored);

    // A bundle delete is refused while the relationship exists, then allowed.
    assert!(manage::delete_bundle(&ours, "partner.test").await.is_err());
    manage::delete(&ours, "partner.test").await.unwrap();
    manage::delete_bundle(&ours, "partner.test").await.unwrap();
    assert!(
        ours.store
            .fetch_bundle("spiffe://partner.test")
            .await
            .unwrap()
            .is_none()
    );
}
