//! The kill switch on the admin API: `Revoke` records what it is given with the lapse
//! its rule gives, resolves a lease to its child, audits it, lists it; malformed, huge
//! or unknown requests are refused naming the field, and store nothing.

use std::sync::Arc;

use tonic::{Code, Request};
use writ_identity::clock::SystemClock;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::proto::admin as pb;
use writ_identity::proto::admin::admin_server::Admin;
use writ_identity::server::ServerState;
use writ_identity::server::admin::AdminService;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::revocation::{MAX_HOLD, SKEW, TXN_TOKEN_CEILING};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::LeaseRecord;
use writ_identity::store::sqlite::SqliteStore;

use pb::revoke_request::Target;

async fn service() -> (tempfile::TempDir, Arc<ServerState>, AdminService) {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let config = ServerConfig::with_defaults(td, dir.path()).unwrap();
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

fn request(target: Target) -> pb::RevokeRequest {
    pb::RevokeRequest {
        target: Some(target),
        ..pb::RevokeRequest::default()
    }
}

async fn revoke(
    service: &AdminService,
    r: pb::RevokeRequest,
) -> Result<pb::Revocation, tonic::Status> {
    service
        .revoke(Request::new(r))
        .await
        .map(tonic::Response::into_inner)
}

async fn list(service: &AdminService) -> Vec<pb::Revocation> {
    service
        .list_revocations(Request::new(pb::ListRevocationsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .revocations
}

#[tokio::test]
async fn revocations_are_recorded_with_their_lapse_audited_and_listed() {
    let (_dir, state, service) = service().await;
    let ceiling = i64::try_from((TXN_TOKEN_CEILING + SKEW).as_secs()).unwrap();

    let mut r = request(Target::Txn("6d1f0c1e-txn".into()));
    r.reason = "prompt injection".into();
    let txn = revoke(&service, r).await.unwrap();
    assert_eq!(
        (txn.kind.as_str(), txn.value.as_str()),
        ("txn", "6d1f0c1e-txn")
    );
    assert_eq!(txn.lapses_at - txn.revoked_at, ceiling);
    assert_eq!(txn.reason, "prompt injection");
    assert!(
        txn.revoked_by.starts_with("admin socket"),
        "{}",
        txn.revoked_by
    );

    // A hold keeps it longer.
    let mut r = request(Target::Sub("alice".into()));
    r.hold_secs = 30 * 86_400;
    let sub = revoke(&service, r).await.unwrap();
    assert_eq!(sub.lapses_at - sub.revoked_at, 30 * 86_400);

    let mut r = request(Target::Workload(
        "spiffe://example.org/agents/planner".into(),
    ));
    r.subtree = true;
    let wl = revoke(&service, r).await.unwrap();
    assert!(wl.subtree);
    assert!(wl.lapses_at - wl.revoked_at >= ceiling);

    // A lease resolves to its child, and lapses when the lease ends (at least the
    // Txn-Token ceiling while it is live).
    let id = |p: &str| SpiffeId::new(&format!("spiffe://example.org{p}")).unwrap();
    let now = writ_identity::clock::Clock::unix_seconds(&SystemClock);
    let lease = LeaseRecord {
        id: "8b0e-lease".into(),
        child_id: id("/agents/planner/sub/summarize-1"),
        parent_id: id("/agents/planner"),
        entry_id: "e1".into(),
        agent_id: id("/writ/agent/a"),
        depth: 1,
        task: "summarize".into(),
        child_pid: 7,
        child_start_time: 9,
        created_at: now,
        expires_at: now + 3 * 3600,
        released_at: None,
    };
    state.store.create_lease(&lease).await.unwrap();
    let leased = revoke(&service, request(Target::Lease(lease.id.clone())))
        .await
        .unwrap();
    assert_eq!(leased.spiffe_id, lease.child_id.to_string());
    assert_eq!(leased.lapses_at, lease.expires_at + 60);

    let listed = list(&service).await;
    assert_eq!(listed, vec![txn.clone(), sub, wl, leased]);
    assert!(listed.windows(2).all(|w| w[0].seq < w[1].seq));
    // Paged from a cursor.
    let page = service
        .list_revocations(Request::new(pb::ListRevocationsRequest {
            after: txn.seq,
            limit: 2,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.revocations.len(), 2);
    assert!(page.more);

    // Audited in the store's chain.
    let rows = state.store.audit_txn("6d1f0c1e-txn", 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].event.kind, "revocation");
}

#[tokio::test]
async fn malformed_huge_or_unknown_requests_are_refused_and_store_nothing() {
    let (_dir, _state, service) = service().await;
    let huge = "x".repeat(1024 * 1024);
    let with = |target: Option<Target>, f: fn(&mut pb::RevokeRequest)| {
        let mut r = pb::RevokeRequest {
            target,
            ..pb::RevokeRequest::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(pb::RevokeRequest, Code, &str)> = vec![
        (with(None, |_| {}), Code::InvalidArgument, "target: one of"),
        (
            with(Some(Target::Txn(String::new())), |_| {}),
            Code::InvalidArgument,
            "txn: must be 1 to",
        ),
        (
            with(Some(Target::Txn(huge.clone())), |_| {}),
            Code::InvalidArgument,
            "txn: must be 1 to",
        ),
        (
            with(Some(Target::Sub("a\nb".into())), |_| {}),
            Code::InvalidArgument,
            "sub: must be 1 to",
        ),
        (
            with(Some(Target::Txn("t".into())), |r| {
                r.reason = "r".repeat(300)
            }),
            Code::InvalidArgument,
            "reason: at most 256",
        ),
        (
            with(Some(Target::Txn("t".into())), |r| r.subtree = true),
            Code::InvalidArgument,
            "subtree: applies to a workload only",
        ),
        (
            with(Some(Target::Workload("planner".into())), |_| {}),
            Code::InvalidArgument,
            "workload: ",
        ),
        (
            with(
                Some(Target::Workload("spiffe://example.org".into())),
                |_| {},
            ),
            Code::InvalidArgument,
            "workload: a trust domain's own ID",
        ),
        (
            with(Some(Target::Lease("no-such-lease".into())), |_| {}),
            Code::NotFound,
            "lease not found",
        ),
        (
            with(Some(Target::Txn("t".into())), |r| r.hold_secs = u64::MAX),
            Code::InvalidArgument,
            "hold_secs: at most",
        ),
    ];
    for (r, code, message) in cases {
        let status = revoke(&service, r).await.unwrap_err();
        assert_eq!(status.code(), code, "{message}: {status:?}");
        assert!(
            status.message().starts_with(message),
            "{:?} should start with {message:?}",
            status.message()
        );
    }
    assert!(MAX_HOLD.as_secs() < u64::MAX);
    assert!(list(&service).await.is_empty(), "nothing stored");
}
