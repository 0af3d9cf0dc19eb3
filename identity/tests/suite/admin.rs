//! The admin API as any client drives it (not the CLI): registration refuses what
//! cannot be meant and Writ's reserved namespace, naming the field, and stores nothing.

use std::sync::Arc;

use tonic::{Code, Request};
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::proto::admin as pb;
use writ_identity::proto::admin::admin_server::Admin;
use writ_identity::server::ServerState;
use writ_identity::server::admin::AdminService;
use writ_identity::server::config::ServerConfig;
use writ_identity::spiffe_id::TrustDomain;
use writ_identity::store::sqlite::SqliteStore;

const AGENT: &str = "spiffe://example.org/writ/agent/a";

async fn service() -> (tempfile::TempDir, Arc<ServerState>, AdminService) {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let mut config = ServerConfig::with_defaults(td.clone(), dir.path()).unwrap();
    // The server's own agent, as `writ dev` has, holds the parent ID.
    config.default_parent_id = Some(td.spiffe_id("/writ/agent/a").unwrap());
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("db.sqlite3"))
            .await
            .unwrap(),
    );
    let state = ServerState::with_parts(
        config,
        Arc::new(SystemClock),
        store,
        Arc::new(MemoryKeyManager::new()),
    )
    .await
    .unwrap();
    let service = AdminService::new(state.clone());
    (dir, state, service)
}

fn entry(spiffe_id: &str) -> pb::Entry {
    pb::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: AGENT.into(),
        selectors: vec!["unix:uid:1".into()],
        ..pb::Entry::default()
    }
}

async fn create(service: &AdminService, e: pb::Entry) -> Result<pb::Entry, tonic::Status> {
    service
        .create_entry(Request::new(pb::CreateEntryRequest { entry: Some(e) }))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn create_refuses_what_cannot_be_meant_naming_the_field() {
    let (_dir, state, service) = service().await;
    let held = create(&service, entry("spiffe://example.org/held"))
        .await
        .unwrap();
    type Change = fn(&mut pb::Entry);
    let cases: &[(Change, &str)] = &[
        (
            |e| e.spiffe_id = "spiffe://example.org/writ/server".into(),
            "spiffe_id: spiffe://example.org/writ/server is in the reserved namespace \
             spiffe://example.org/writ/ (Writ's own identities)",
        ),
        (
            |e| e.spiffe_id = "spiffe://example.org/writ/agent/join_token/t".into(),
            "spiffe_id: spiffe://example.org/writ/agent/join_token/t is in the reserved",
        ),
        (
            |e| e.spiffe_id = "spiffe://example.org".into(),
            "spiffe_id: spiffe://example.org is the trust domain itself",
        ),
        (
            |e| e.parent_id = "spiffe://other.org/writ/agent/a".into(),
            "parent_id: SPIFFE ID spiffe://other.org/writ/agent/a is not in trust domain",
        ),
        (
            |e| e.parent_id = e.spiffe_id.clone(),
            "parent_id: an entry cannot be its own parent",
        ),
        (
            |e| e.parent_id = "spiffe://example.org/writ/agent/nobody".into(),
            "parent_id: nothing holds spiffe://example.org/writ/agent/nobody",
        ),
        (
            |e| e.selectors = vec!["unix:uid:4294967296".into()],
            "selectors: unix:uid:4294967296: uid must be a decimal number",
        ),
        (
            |e| e.selectors = vec!["writ:dev:self".into()],
            "selectors: writ:dev:self: the selector type writ is Writ's own",
        ),
        (
            |e| e.selectors = vec!["unix:uid:1".into(), "unix:uid:1".into()],
            "selectors: unix:uid:1 is given twice",
        ),
        (
            |e| e.selectors = vec!["gid:0".into()],
            "selectors: gid:0 has no selector type (did you mean unix:gid:0?)",
        ),
        (
            |e| e.spawn_max_ttl = Some(300),
            "spawn_max_depth: is required with spawn_max_ttl",
        ),
    ];
    for (change, expected) in cases {
        let mut e = entry("spiffe://example.org/w");
        change(&mut e);
        let status = create(&service, e).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}");
        assert!(
            status.message().starts_with(expected),
            "{:?} should start with {expected:?}",
            status.message()
        );
    }
    // Another entry's SPIFFE ID holds a parent.
    let mut nested = entry("spiffe://example.org/nested");
    nested.parent_id = held.spiffe_id.clone();
    create(&service, nested).await.unwrap();
    assert_eq!(
        state.store.count_entries().await.unwrap(),
        2,
        "nothing else stored"
    );
}

#[tokio::test]
async fn update_refuses_the_reserved_namespace_and_a_no_op_keeps_the_revision() {
    let (_dir, state, service) = service().await;
    let created = create(&service, entry("spiffe://example.org/w"))
        .await
        .unwrap();
    let update = |e: pb::Entry| {
        service.update_entry(Request::new(pb::UpdateEntryRequest { entry: Some(e) }))
    };
    let same = update(created.clone()).await.unwrap().into_inner();
    assert_eq!(same, created, "no change, no new revision");

    let mut reserved = created.clone();
    reserved.spiffe_id = "spiffe://example.org/writ/server".into();
    let status = update(reserved).await.unwrap_err();
    assert!(
        status
            .message()
            .starts_with("spiffe_id: spiffe://example.org/writ/server is in"),
        "{}",
        status.message()
    );
    let mut unheld = created.clone();
    unheld.parent_id = "spiffe://example.org/nobody".into();
    let status = update(unheld).await.unwrap_err();
    assert!(
        status.message().starts_with("parent_id: nothing holds"),
        "{}",
        status.message()
    );
    let stored = state.store.fetch_entry(&created.id).await.unwrap().unwrap();
    assert_eq!(stored.revision, created.revision);
    assert_eq!(stored.spiffe_id.as_str(), "spiffe://example.org/w");

    let mut changed = created.clone();
    changed.dns_names = vec!["w.example.org".into()];
    let changed = update(changed).await.unwrap().into_inner();
    assert_eq!(changed.revision, created.revision + 1);
}

#[tokio::test]
async fn nothing_is_minted_in_the_reserved_namespace() {
    let (_dir, _state, service) = service().await;
    for id in [
        "spiffe://example.org/writ/server",
        "spiffe://example.org/writ/agent/a",
        "spiffe://example.org/writ/tts",
    ] {
        let status = service
            .mint_x509_svid(Request::new(pb::MintX509SvidRequest {
                spiffe_id: id.into(),
                ..pb::MintX509SvidRequest::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("reserved namespace"), "{status}");
        let status = service
            .mint_jwt_svid(Request::new(pb::MintJwtSvidRequest {
                spiffe_id: id.into(),
                audience: vec!["a".into()],
                ttl: 0,
            }))
            .await
            .unwrap_err();
        assert!(status.message().contains("reserved namespace"), "{status}");
    }
    service
        .mint_x509_svid(Request::new(pb::MintX509SvidRequest {
            spiffe_id: "spiffe://example.org/w".into(),
            ..pb::MintX509SvidRequest::default()
        }))
        .await
        .unwrap();
}

/// An entry in the reserved namespace stored before the rule existed (written to the
/// store directly here) still yields no sub-agent: its child ID would be reserved.
#[tokio::test]
async fn no_lease_produces_a_reserved_child_id() {
    use writ_identity::entry::RegistrationEntry;
    use writ_identity::server::lease::ChildRequest;
    use writ_identity::server::node::{NodeError, NodeHandler};
    let (_dir, state, _service) = service().await;
    let td = state.config.trust_domain.clone();
    let agent = td.spiffe_id("/writ/agent/a").unwrap();
    let mut legacy = RegistrationEntry::new(
        td.spiffe_id("/writ/agent/legacy").unwrap(),
        agent.clone(),
        vec!["unix:uid:1".parse().unwrap()],
    );
    legacy.spawn_max_ttl = Some(300);
    legacy.spawn_max_depth = Some(1);
    let legacy = state.store.create_entry(&legacy).await.unwrap();
    let now = state.clock.unix_seconds();
    let err = NodeHandler::new(state.clone())
        .register_child(
            &agent,
            &ChildRequest {
                parent_id: legacy.spiffe_id.clone(),
                parent_entry_id: Some(legacy.id.clone()),
                child_pid: 4242,
                child_start_time: 1,
                task: "t".into(),
                ttl_seconds: 0,
                parent_expires_at: now + 3600,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, NodeError::SpawnRefused(why) if why.contains("reserved namespace")),
        "{err}"
    );
    assert!(
        state
            .store
            .list_leases(None, None)
            .await
            .unwrap()
            .is_empty()
    );
}
