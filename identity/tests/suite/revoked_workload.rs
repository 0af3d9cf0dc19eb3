//! The kill switch at the server and the agent: a revocation of a workload (recorded in
//! the store, as `writ txn revoke --workload` does) makes the server refuse its SVIDs
//! (X509, JWT, template renderings, sub-agent children) and drop it from the agents'
//! sync; the agent stops serving it and its open Workload API streams hear of it: an
//! update without that SVID, or PermissionDenied `no identity issued` when the workload
//! has none left. A lapsed revocation lets the workload back in.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use writ_identity::agent::node_api::LocalNode;
use writ_identity::agent::{self, RunningAgent};
use writ_identity::attest::workload::StaticAttestor;
use writ_identity::clock::ManualClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::proto::workload as pb;
use writ_identity::selector::Selector;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::node::{NodeError, NodeHandler};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::revocation::NewRevocation;
use writ_identity::store::sqlite::SqliteStore;
use writ_spiffe::revocation::Target;
use writ_tests::{connect_raw, server_state, with_header};

/// Long enough for any step of a loaded machine; no duration is asserted.
const PATIENCE: Duration = Duration::from_secs(30);

fn id(path: &str) -> SpiffeId {
    SpiffeId::new(&format!("spiffe://example.org{path}")).unwrap()
}

fn agent_id() -> SpiffeId {
    id("/writ/agent/test")
}

async fn register(server: &ServerState, path: &str, selector: &str) -> RegistrationEntry {
    let mut entry = RegistrationEntry::new(
        id(path),
        agent_id(),
        vec![selector.parse::<Selector>().unwrap()],
    );
    entry.created_at = server.clock.unix_seconds();
    let stored = server.store.create_entry(&entry).await.unwrap();
    server.notify_change();
    stored
}

async fn revoke(server: &ServerState, target: Target, lapses_in: i64) -> u64 {
    let now = server.clock.unix_seconds();
    server
        .store
        .insert_revocation(&NewRevocation {
            target,
            revoked_at: now,
            lapses_at: now + lapses_in,
            reason: Some("test".into()),
            revoked_by: "spiffe://example.org/admin".into(),
        })
        .await
        .unwrap()
        .seq
}

fn spki() -> Vec<u8> {
    let key = PrivateKey::generate().unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap())
}

async fn start_agent(
    server: &Arc<ServerState>,
    dir: &std::path::Path,
    selectors: &[&str],
) -> RunningAgent {
    let node = Arc::new(LocalNode::new(server.clone(), agent_id()));
    let attestor = StaticAttestor::new(selectors.iter().map(|s| s.parse().unwrap()).collect());
    let running = agent::start(node, &dir.join("agent.sock"), Arc::new(attestor))
        .await
        .unwrap();
    running.cache.refresh(true).await.unwrap();
    running
}

/// Waits until the server's in-memory set holds `seq` (it follows the store's events).
async fn until_known(server: &ServerState, seq: u64) {
    tokio::time::timeout(PATIENCE, async {
        while server.revocations.snapshot().seq() < seq {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the server learns of the revocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_workload_gets_no_svid_and_its_streams_are_told() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    let planner = register(&server, "/agents/planner", "docker:label:app:planner").await;
    let tool = register(&server, "/tools/search", "docker:label:app:planner").await;
    let agent = start_agent(&server, dir.path(), &["docker:label:app:planner"]).await;

    let mut client = connect_raw(agent.socket.clone()).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mut ids: Vec<String> = first.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            "spiffe://example.org/agents/planner",
            "spiffe://example.org/tools/search"
        ]
    );

    // Revoke the planner and everything under it.
    let seq = revoke(
        &server,
        Target::Workload {
            spiffe_id: planner.spiffe_id.to_string(),
            subtree: true,
        },
        3600,
    )
    .await;
    until_known(&server, seq).await;

    // The server signs nothing for it, whatever the agent asks.
    let handler = NodeHandler::new(server.clone());
    let refused = handler
        .sign_x509_svids(&agent_id(), &[(planner.id.clone(), spki())])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, NodeError::NotAuthorized(_)),
        "{refused:?}"
    );
    let refused = handler
        .sign_jwt_svid(&agent_id(), &planner.id, &["aud".into()])
        .await
        .unwrap_err();
    assert!(
        matches!(refused, NodeError::NotAuthorized(_)),
        "{refused:?}"
    );
    handler
        .sign_x509_svids(&agent_id(), &[(tool.id.clone(), spki())])
        .await
        .unwrap();
    // The sync no longer lists it.
    let sync = handler
        .sync(&agent_id(), &Default::default())
        .await
        .unwrap();
    assert_eq!(sync.ids, vec![tool.id.clone()]);

    // The open stream gets an update without the planner's SVID.
    let update = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("an update")
        .unwrap()
        .unwrap();
    let ids: Vec<String> = update.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    assert_eq!(ids, vec!["spiffe://example.org/tools/search"]);

    // Revoking the last one: PermissionDenied, as for a workload with no identity.
    let seq = revoke(
        &server,
        Target::Workload {
            spiffe_id: tool.spiffe_id.to_string(),
            subtree: false,
        },
        3600,
    )
    .await;
    until_known(&server, seq).await;
    let status = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream is told");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
    // A new call is refused the same way.
    let status = match client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await
    {
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
}

/// A server on the SQLite store in `dir`, with `keys` and `clock`.
async fn open(
    dir: &std::path::Path,
    keys: &Arc<MemoryKeyManager>,
    clock: &ManualClock,
) -> Arc<ServerState> {
    let td = TrustDomain::new("example.org").unwrap();
    let config = ServerConfig::with_defaults(td, dir).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("db.sqlite3")).await.unwrap());
    ServerState::with_parts(config, Arc::new(clock.clone()), store, keys.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_survive_a_restart_and_lapse() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(MemoryKeyManager::new());
    let clock = ManualClock::new(std::time::SystemTime::now());
    let server = open(dir.path(), &keys, &clock).await;
    let entry = register(&server, "/agents/short", "docker:label:app:short").await;
    let seq = revoke(
        &server,
        Target::Workload {
            spiffe_id: entry.spiffe_id.to_string(),
            subtree: false,
        },
        60,
    )
    .await;
    until_known(&server, seq).await;
    drop(server);
    // A server opened on the same store loads what is in force.
    let server = open(dir.path(), &keys, &clock).await;
    assert_eq!(server.revocations.snapshot().seq(), seq);
    let handler = NodeHandler::new(server.clone());
    assert!(
        handler
            .sync(&agent_id(), &Default::default())
            .await
            .unwrap()
            .ids
            .is_empty()
    );
    // After it lapses (by the server's clock), the entry is the agent's again.
    clock.advance(Duration::from_secs(61));
    assert_eq!(
        handler
            .sync(&agent_id(), &Default::default())
            .await
            .unwrap()
            .ids,
        vec![entry.id]
    );
}
