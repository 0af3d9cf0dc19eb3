//! Server and agent as separate parts: join-token node attestation over the node API
//! (gRPC, mTLS), incremental entry sync, the Workload API served from the split agent to
//! the Rust `spiffe` crate, and the agent riding out a server outage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe::{WorkloadApiClient, X509Source};
use writ_identity::agent::node_api::NodeApi;
use writ_identity::agent::node_client::{AgentError, Bootstrap, GrpcNode, NodeClientConfig};
use writ_identity::agent::{self};
use writ_identity::attest::workload::UnixAttestor;
use writ_identity::clock::SystemClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::{MemoryKeyManager, sha256};
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::node_service;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::JoinTokenRecord;
use writ_identity::store::sqlite::SqliteStore;
use writ_tests::uid_selector;

/// The node API of a server on its own SQLite store. Its port stays bound from start to
/// drop, also while [`Server::stop`] has it down (connections are then accepted and
/// closed at once), so no other process can take the port before [`Server::listen`]
/// serves on it again.
struct Server {
    state: Arc<ServerState>,
    /// The bound port; each serving or refusing task gets its own handle on it.
    listener: std::net::TcpListener,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// While down: the task closing every connection.
    refuser: Option<tokio::task::JoinHandle<()>>,
    /// Connections closed while down, counted.
    turned_away: tokio::sync::watch::Sender<usize>,
}

impl Server {
    async fn start(dir: &std::path::Path, x509_ttl: Duration) -> Self {
        let td = TrustDomain::new("example.org").unwrap();
        let mut config = ServerConfig::with_defaults(td, dir).unwrap();
        config.ca.default_x509_svid_ttl = x509_ttl;
        let store = Arc::new(SqliteStore::open(&dir.join("db.sqlite3")).await.unwrap());
        let state = ServerState::with_parts(
            config,
            Arc::new(SystemClock),
            store,
            Arc::new(MemoryKeyManager::new()),
        )
        .await
        .unwrap();
        let listener = node_service::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
            .into_std()
            .unwrap();
        let mut server = Self {
            state,
            addr: listener.local_addr().unwrap(),
            listener,
            stop: None,
            task: None,
            refuser: None,
            turned_away: tokio::sync::watch::Sender::new(0),
        };
        server.listen().await;
        server
    }

    /// A tokio listener on the server's port.
    fn handle(&self) -> tokio::net::TcpListener {
        tokio::net::TcpListener::from_std(self.listener.try_clone().unwrap()).unwrap()
    }

    /// Serves the node API (again).
    async fn listen(&mut self) {
        if let Some(refuser) = self.refuser.take() {
            refuser.abort();
            let _ = refuser.await;
        }
        let listener = self.handle();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = self.state.clone();
        self.task = Some(tokio::spawn(async move {
            node_service::serve_node_api(state, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
        self.stop = Some(tx);
    }

    /// Takes the node API down: from now on every connection is closed unanswered.
    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let listener = self.handle();
        let turned_away = self.turned_away.clone();
        self.refuser = Some(tokio::spawn(async move {
            while let Ok((connection, _)) = listener.accept().await {
                drop(connection);
                turned_away.send_modify(|n| *n += 1);
            }
        }));
    }

    async fn token(&self) -> String {
        let token = uuid_like();
        self.state
            .store
            .create_join_token(&JoinTokenRecord {
                token_hash: hex(sha256(token.as_bytes())),
                expires_at: self.state.clock.unix_seconds() + 600,
                selectors: Vec::new(),
            })
            .await
            .unwrap();
        token
    }

    fn config(&self, dir: &std::path::Path, token: Option<String>) -> NodeClientConfig {
        NodeClientConfig {
            server_addresses: self.addr.into(),
            trust_domain: self.state.config.trust_domain.clone(),
            data_dir: dir.to_path_buf(),
            join_token: token,
            k8s_psat: None,
            bootstrap: Bootstrap::Bundle((*self.state.ca.bundle()).clone()),
            clock: std::sync::Arc::new(writ_identity::clock::SystemClock),
        }
    }

    async fn register(&self, parent: &SpiffeId, path: &str, selector: &str) {
        let td = self.state.config.trust_domain.clone();
        let mut e = RegistrationEntry::new(
            td.spiffe_id(path).unwrap(),
            parent.clone(),
            vec![selector.parse().unwrap()],
        );
        e.validate(&td).unwrap();
        self.state.store.create_entry(&e).await.unwrap();
        self.state.notify_change();
    }
}

fn hex(bytes: [u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn uuid_like() -> String {
    let n: u128 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("tok-{n:x}-{}", std::process::id())
}

#[tokio::test]
async fn join_token_attestation_and_workload_api_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(3600)).await;
    let token = server.token().await;
    let node = GrpcNode::connect(server.config(&dir.path().join("agent"), Some(token.clone())))
        .await
        .unwrap();
    let agent_id = node.agent_id().clone();
    assert_eq!(
        agent_id.to_string(),
        format!("spiffe://example.org/writ/agent/join_token/{token}")
    );
    assert!(
        server
            .state
            .store
            .fetch_agent(&agent_id)
            .await
            .unwrap()
            .is_some(),
        "agent recorded"
    );

    server
        .register(&agent_id, "/agents/split", &uid_selector())
        .await;
    let running = agent::start(
        node.clone(),
        &dir.path().join("agent.sock"),
        Arc::new(UnixAttestor::default()),
    )
    .await
    .unwrap();
    let client = WorkloadApiClient::connect_to(format!("unix://{}", running.socket.display()))
        .await
        .unwrap();
    let started = Instant::now();
    let svid = loop {
        if let Ok(s) = client.fetch_x509_svid().await {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "entry did not reach the split agent"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/agents/split"
    );
    let token_jwt = client.fetch_jwt_token(["aud"], None).await.unwrap();
    client.validate_jwt_token("aud", &token_jwt).await.unwrap();

    // Entries of other agents are never synced or signed for this one.
    let other = SpiffeId::new("spiffe://example.org/writ/agent/join_token/someone-else").unwrap();
    server
        .register(&other, "/agents/not-mine", &uid_selector())
        .await;
    let sync = node.sync_entries(&Default::default()).await.unwrap();
    assert_eq!(sync.ids.len(), 1);
    let foreign = server
        .state
        .store
        .list_entries(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.parent_id == other)
        .unwrap();
    let key_spki = vec![0u8; 10];
    assert!(
        node.sign_x509_svids(&[(foreign.id.clone(), key_spki)])
            .await
            .is_err()
    );
    assert!(
        node.sign_jwt_svid(&foreign.id, &["a".into()])
            .await
            .is_err()
    );

    // A restarted agent reuses its stored SVID: no token needed.
    drop(running);
    let again = GrpcNode::connect(server.config(&dir.path().join("agent"), None))
        .await
        .unwrap();
    assert_eq!(again.agent_id(), &agent_id);
    assert_eq!(
        again
            .sync_entries(&Default::default())
            .await
            .unwrap()
            .ids
            .len(),
        1
    );

    // Evicted: the agent must attest again. Banned: refused even with its SVID.
    server.state.store.delete_agent(&agent_id).await.unwrap();
    assert!(again.sync_entries(&Default::default()).await.is_err());
}

#[tokio::test]
async fn join_tokens_are_single_use_and_malformed_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(3600)).await;
    let token = server.token().await;
    GrpcNode::connect(server.config(&dir.path().join("a1"), Some(token.clone())))
        .await
        .unwrap();
    let err = GrpcNode::connect(server.config(&dir.path().join("a2"), Some(token)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::Refused(ref m) if m.contains("already been used")),
        "{err}"
    );
    for bad in ["", "../../etc", "a b", &"x".repeat(500), "unknown-token"] {
        let err = GrpcNode::connect(server.config(&dir.path().join("a3"), Some(bad.to_owned())))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Refused(_)), "{bad:?}: {err}");
    }
    assert_eq!(
        server.state.store.list_agents().await.unwrap().len(),
        1,
        "no state change"
    );
    let err = GrpcNode::connect(server.config(&dir.path().join("a4"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NeedsJoinToken));

    // A banned agent is refused even with a valid SVID.
    let token = server.token().await;
    let node = GrpcNode::connect(server.config(&dir.path().join("a5"), Some(token)))
        .await
        .unwrap();
    let mut record = server
        .state
        .store
        .fetch_agent(node.agent_id())
        .await
        .unwrap()
        .unwrap();
    record.banned = true;
    server.state.store.update_agent(&record).await.unwrap();
    assert!(node.sync_entries(&Default::default()).await.is_err());
}

#[tokio::test]
async fn agent_serves_cached_svids_while_the_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), Duration::from_secs(8)).await;
    let token = server.token().await;
    let node = GrpcNode::connect(server.config(&dir.path().join("agent"), Some(token)))
        .await
        .unwrap();
    server
        .register(node.agent_id(), "/agents/resilient", &uid_selector())
        .await;
    let running = agent::start(
        node.clone(),
        &dir.path().join("agent.sock"),
        Arc::new(UnixAttestor::default()),
    )
    .await
    .unwrap();
    let endpoint = format!("unix://{}", running.socket.display());
    let source = X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let before = source.svid().unwrap();

    server.stop().await;
    // The server is gone: workloads still get the cached SVID.
    let client = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    let cached = client.fetch_x509_svid().await.unwrap();
    assert_eq!(cached.leaf().as_bytes(), before.leaf().as_bytes());

    // The agent finds the server down (its connection is closed unanswered)...
    tokio::time::timeout(
        Duration::from_secs(20),
        server.turned_away.subscribe().wait_for(|n| *n > 0),
    )
    .await
    .expect("the agent tried the server while it was down")
    .unwrap();
    // ...and when it is back on the same port, rotation resumes without restarting the
    // agent.
    server.listen().await;
    let mut updates = source.updated();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            updates.changed().await.unwrap();
            if source.svid().unwrap().leaf().as_bytes() != before.leaf().as_bytes() {
                break;
            }
        }
    })
    .await
    .expect("a rotated SVID after the server came back");
}
