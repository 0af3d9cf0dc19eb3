//! Spawning sub-agents is rate limited per root parent workload (`spawn_rate`), not only
//! capped in concurrency: a parent cannot spawn faster through its own children.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use writ_identity::clock::{Clock, ManualClock};
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::rate_limit::Rate;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::lease::ChildRequest;
use writ_identity::server::node::{NodeError, NodeHandler};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;

struct World {
    handler: NodeHandler,
    clock: ManualClock,
    agent: SpiffeId,
    _dir: tempfile::TempDir,
}

impl World {
    /// A server whose spawn rate is a burst of 2, then one every 2 seconds.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let mut config = ServerConfig::with_defaults(td.clone(), dir.path()).unwrap();
        config.spawn_rate = Rate {
            per_second: 0.5,
            burst: 2,
        };
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite3"))
                .await
                .unwrap(),
        );
        let server = ServerState::with_parts(
            config,
            Arc::new(clock.clone()),
            store,
            Arc::new(MemoryKeyManager::new()),
        )
        .await
        .unwrap();
        Self {
            handler: NodeHandler::new(server),
            clock,
            agent: td.spiffe_id("/writ/agent/test").unwrap(),
            _dir: dir,
        }
    }

    /// A workload entry under the agent that may spawn (depth 2, 100 live children).
    async fn parent(&self, path: &str) -> RegistrationEntry {
        let state = self.handler.state();
        let td = state.config.trust_domain.clone();
        let mut entry = RegistrationEntry::new(
            td.spiffe_id(path).unwrap(),
            self.agent.clone(),
            vec!["unix:uid:1000".parse().unwrap()],
        );
        entry.spawn_max_ttl = Some(300);
        entry.spawn_max_depth = Some(2);
        entry.spawn_max_children = Some(100);
        entry.created_at = state.clock.unix_seconds();
        state.store.create_entry(&entry).await.unwrap()
    }

    async fn spawn(
        &self,
        parent: &SpiffeId,
        entry: Option<&RegistrationEntry>,
        pid: i32,
    ) -> Result<SpiffeId, NodeError> {
        let request = ChildRequest {
            parent_id: parent.clone(),
            parent_entry_id: entry.map(|e| e.id.clone()),
            child_pid: pid,
            child_start_time: 1,
            task: "work".into(),
            ttl_seconds: 0,
            parent_expires_at: self.clock.unix_seconds() + 3600,
        };
        self.handler
            .register_child(&self.agent, &request)
            .await
            .map(|lease| lease.child_id)
    }
}

#[track_caller]
fn rate_limited(result: Result<SpiffeId, NodeError>) {
    match result {
        Err(NodeError::SpawnLimit(message)) => {
            assert!(message.contains("spawn_rate"), "{message}");
        }
        other => panic!("expected a spawn_rate refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn spawning_beyond_the_rate_is_refused_also_through_children() {
    let world = World::start().await;
    let planner = world.parent("/planner").await;
    let other = world.parent("/other").await;

    // The burst: two children at once.
    let child = world
        .spawn(&planner.spiffe_id, Some(&planner), 100)
        .await
        .unwrap();
    world
        .spawn(&planner.spiffe_id, Some(&planner), 101)
        .await
        .unwrap();
    // A third is refused (gRPC ResourceExhausted on the wire), well under the
    // children cap of 100.
    rate_limited(world.spawn(&planner.spiffe_id, Some(&planner), 102).await);
    // Its child spawning a grandchild counts against the same root parent.
    rate_limited(world.spawn(&child, None, 103).await);
    // Another workload has its own bucket.
    world
        .spawn(&other.spiffe_id, Some(&other), 104)
        .await
        .unwrap();

    // After 2 seconds (the injected clock), one more spawn, through the child.
    world.clock.advance(Duration::from_secs(2));
    world.spawn(&child, None, 105).await.unwrap();
    rate_limited(world.spawn(&planner.spiffe_id, Some(&planner), 106).await);
}
