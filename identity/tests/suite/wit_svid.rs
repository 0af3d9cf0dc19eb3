//! WIT-SVIDs on the Workload API (the SPIFFE Workload API's WIT-SVID profile): what a
//! workload gets, who gets nothing, the bundles that verify them, and rotation.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use writ_identity::agent::node_api::LocalNode;
use writ_identity::agent::{self, RunningAgent};
use writ_identity::attest::workload::StaticAttestor;
use writ_identity::entry::RegistrationEntry;
use writ_identity::proto::workload as pb;
use writ_identity::server::ServerState;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::svid::wit::{self, WitBundles, WitKey};
use writ_tests::{connect_raw, server_state, with_header};

fn agent_id() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/writ/agent/test").unwrap()
}

/// An entry for `id` under the test agent, for callers with `unix:uid:7`.
async fn register(server: &ServerState, id: &str, jwt_ttl: u64) {
    let mut entry = RegistrationEntry::new(
        SpiffeId::new(id).unwrap(),
        agent_id(),
        vec!["unix:uid:7".parse().unwrap()],
    );
    entry.jwt_svid_ttl = jwt_ttl;
    entry.hint = "internal".into();
    entry.created_at = server.clock.unix_seconds();
    server.store.create_entry(&entry).await.unwrap();
    server.notify_change();
}

async fn agent_with(
    server: &Arc<ServerState>,
    dir: &std::path::Path,
    name: &str,
    selectors: &[&str],
) -> RunningAgent {
    let node = Arc::new(LocalNode::new(server.clone(), agent_id()));
    let attestor = StaticAttestor::new(selectors.iter().map(|s| s.parse().unwrap()).collect());
    let running = agent::start(node, &dir.join(format!("{name}.sock")), Arc::new(attestor))
        .await
        .unwrap();
    running.cache.refresh(true).await.unwrap();
    running
}

async fn wit_bundles(agent: &RunningAgent) -> WitBundles {
    let mut client = connect_raw(agent.socket.clone()).await;
    let first = client
        .fetch_wit_bundles(with_header(pb::WitBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let mut bundles = WitBundles::new();
    for (td, jwks) in first.bundles {
        assert!(jwks.contains("\"use\":\"wit-svid\""), "{jwks}");
        bundles
            .insert_jwks(TrustDomain::new(&td).unwrap(), &jwks)
            .unwrap();
    }
    bundles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_gets_a_wit_bound_to_the_key_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    register(&server, "spiffe://example.org/web", 0).await;
    let agent = agent_with(&server, dir.path(), "web", &["unix:uid:7"]).await;

    let mut client = connect_raw(agent.socket.clone()).await;
    let first = client
        .fetch_witsvid(with_header(pb::WitsvidRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.svids.len(), 1);
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
    assert_eq!(svid.hint, "internal");
    let key = WitKey::from_jwk(&svid.wit_svid_key).unwrap();
    let bundles = wit_bundles(&agent).await;
    let validated = wit::validate(&svid.wit_svid, &bundles, server.clock.now()).unwrap();
    assert_eq!(validated.spiffe_id.as_str(), "spiffe://example.org/web");
    assert_eq!(&validated.cnf, key.public_jwk());
    assert!(validated.kid.starts_with(wit::KID_PREFIX));

    // Asking for that ID gets it; for another, nothing; a malformed one is refused.
    let named = client
        .fetch_witsvid(with_header(pb::WitsvidRequest {
            spiffe_id: "spiffe://example.org/web".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        named.svids[0].wit_svid, svid.wit_svid,
        "the cached WIT is shared"
    );
    let other = client
        .fetch_witsvid(with_header(pb::WitsvidRequest {
            spiffe_id: "spiffe://example.org/db".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    let bad = client
        .fetch_witsvid(with_header(pb::WitsvidRequest {
            spiffe_id: "not an id".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_the_header_or_an_identity_get_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    register(&server, "spiffe://example.org/web", 0).await;
    let stranger = agent_with(&server, dir.path(), "stranger", &["unix:uid:8"]).await;
    let mut client = connect_raw(stranger.socket.clone()).await;
    let status = client
        .fetch_witsvid(tonic::Request::new(pb::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "no security header");
    let status = client
        .fetch_witsvid(with_header(pb::WitsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
    let status = client
        .fetch_wit_bundles(with_header(pb::WitBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wit_svids_are_renewed_with_a_fresh_key() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    // Two-second WITs: renewed after one.
    register(&server, "spiffe://example.org/web", 2).await;
    let agent = agent_with(&server, dir.path(), "web", &["unix:uid:7"]).await;
    let mut client = connect_raw(agent.socket.clone()).await;
    let mut stream = client
        .fetch_witsvid(with_header(pb::WitsvidRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let second = stream.message().await.unwrap().unwrap();
    assert_ne!(first.svids[0].wit_svid, second.svids[0].wit_svid);
    let (a, b) = (
        WitKey::from_jwk(&first.svids[0].wit_svid_key).unwrap(),
        WitKey::from_jwk(&second.svids[0].wit_svid_key).unwrap(),
    );
    assert_ne!(a.public_jwk(), b.public_jwk(), "a renewal brings a new key");
    let bundles = wit_bundles(&agent).await;
    let renewed = wit::validate(&second.svids[0].wit_svid, &bundles, server.clock.now()).unwrap();
    assert_eq!(&renewed.cnf, b.public_jwk());
}
