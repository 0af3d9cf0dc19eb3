//! One suite, two implementations of the agent's view of the server: the in-process
//! `LocalNode` (`writ dev`) and the gRPC-over-mTLS `GrpcNode` (split deployment).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use writ_identity::agent::node_api::{LocalNode, NodeApi};
use writ_identity::agent::node_client::{Bootstrap, GrpcNode, NodeClientConfig};
use writ_identity::clock::SystemClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey, sha256};
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::node_service;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::JoinTokenRecord;
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::svid::{jwt, x509};

async fn server(dir: &std::path::Path) -> Arc<ServerState> {
    let td = TrustDomain::new("example.org").unwrap();
    let config = ServerConfig::with_defaults(td, dir).unwrap();
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

async fn add(server: &ServerState, parent: &SpiffeId, path: &str) -> RegistrationEntry {
    let td = server.config.trust_domain.clone();
    let mut e = RegistrationEntry::new(
        td.spiffe_id(path).unwrap(),
        parent.clone(),
        vec!["unix:uid:1".parse().unwrap()],
    );
    e.validate(&td).unwrap();
    let e = server.store.create_entry(&e).await.unwrap();
    server.notify_change();
    e
}

fn spki() -> Vec<u8> {
    let key = PrivateKey::generate().unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap())
}

/// What every `NodeApi` must do.
async fn conformance(node: Arc<dyn NodeApi>, server: &ServerState) {
    let me = node.agent_id().clone();
    let other = SpiffeId::new("spiffe://example.org/writ/agent/someone-else").unwrap();
    let mut changes = node.changes();
    changes.borrow_and_update();

    // Authorized: children of the agent, and children of those (nested).
    let a = add(server, &me, "/suite/a").await;
    let nested = add(server, &a.spiffe_id, "/suite/a/nested").await;
    let foreign = add(server, &other, "/suite/foreign").await;
    tokio::time::timeout(Duration::from_secs(5), changes.changed())
        .await
        .expect("a change signal after entries were created")
        .unwrap();

    let sync = node.sync_entries(&BTreeMap::new()).await.unwrap();
    let mut ids = sync.ids.clone();
    ids.sort();
    let mut want = vec![a.id.clone(), nested.id.clone()];
    want.sort();
    assert_eq!(ids, want, "exactly the authorized entries");
    assert_eq!(sync.changed.len(), 2);

    // Incremental: what the agent has at the current revision is not sent again.
    let known: BTreeMap<String, i64> = sync
        .changed
        .iter()
        .map(|e| (e.id.clone(), e.revision))
        .collect();
    let again = node.sync_entries(&known).await.unwrap();
    assert!(again.changed.is_empty());
    assert_eq!(again.ids.len(), 2);
    let mut updated = a.clone();
    updated.hint = "changed".into();
    server.store.update_entry(&updated).await.unwrap();
    let third = node.sync_entries(&known).await.unwrap();
    assert_eq!(third.changed.len(), 1);
    assert_eq!(third.changed[0].hint, "changed");

    // Signing: only authorized entries, with the entry's identity.
    let signed = node
        .sign_x509_svids(&[(a.id.clone(), spki())])
        .await
        .unwrap();
    assert_eq!(signed.len(), 1);
    assert_eq!(signed[0].1.spiffe_id, a.spiffe_id);
    let bundles = node.bundles().await.unwrap();
    x509::validate(
        &signed[0].1.cert_chain,
        &bundles,
        std::time::SystemTime::now(),
    )
    .unwrap();
    assert!(
        node.sign_x509_svids(&[(foreign.id.clone(), spki())])
            .await
            .is_err()
    );
    assert!(
        node.sign_x509_svids(&[(a.id.clone(), spki()), (foreign.id.clone(), spki())])
            .await
            .is_err()
    );
    assert!(
        node.sign_x509_svids(&[(a.id.clone(), vec![1, 2, 3])])
            .await
            .is_err(),
        "garbage key"
    );

    let (token, iat, exp) = node
        .sign_jwt_svid(&nested.id, &["aud".into()])
        .await
        .unwrap();
    assert!(exp > iat);
    let v = jwt::validate(&token, &["aud"], &bundles, std::time::SystemTime::now()).unwrap();
    assert_eq!(v.spiffe_id, nested.spiffe_id);
    assert!(
        node.sign_jwt_svid(&foreign.id, &["aud".into()])
            .await
            .is_err()
    );
    assert!(node.sign_jwt_svid(&a.id, &[]).await.is_err(), "no audience");
    assert!(
        node.sign_jwt_svid("no-such-entry", &["aud".into()])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn local_node_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let id = server
        .config
        .trust_domain
        .spiffe_id("/writ/agent/local")
        .unwrap();
    conformance(Arc::new(LocalNode::new(server.clone(), id)), &server).await;
}

#[tokio::test]
async fn grpc_node_passes_the_suite() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    let listener = node_service::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let state = server.clone();
    let _serve = tokio::spawn(async move {
        node_service::serve_node_api(state, listener, std::future::pending())
            .await
            .unwrap();
    });
    let token = "suite-token";
    server
        .store
        .create_join_token(&JoinTokenRecord {
            token_hash: sha256(token.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            expires_at: server.clock.unix_seconds() + 60,
            selectors: Vec::new(),
        })
        .await
        .unwrap();
    let node = GrpcNode::connect(NodeClientConfig {
        server_addresses: addr.into(),
        trust_domain: server.config.trust_domain.clone(),
        data_dir: dir.path().join("agent"),
        join_token: Some(token.into()),
        k8s_psat: None,
        bootstrap: Bootstrap::Insecure,
        clock: std::sync::Arc::new(writ_identity::clock::SystemClock),
    })
    .await
    .unwrap();
    conformance(node, &server).await;
}
