//! An agent given several server addresses: it attests once, fails over when its server
//! dies, keeps its workloads served (an entry created through the surviving server
//! reaches the workload's stream), never attests again, and renews its SVID with
//! whichever server answers. Two servers of one trust domain share one store and one key
//! manager (so one CA) until the multi-server CA lands; each serves its own node API on
//! 127.0.0.1:0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use writ_identity::agent::node_api::NodeApi as _;
use writ_identity::agent::node_client::{Bootstrap, GrpcNode, NodeClientConfig};
use writ_identity::agent::server_address::ServerAddresses;
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
use writ_spiffe::proto::workload::X509svidRequest;
use writ_spiffe::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

/// Longest any step may take before the test gives up (a hang guard, not a figure).
const PATIENCE: Duration = Duration::from_secs(90);

/// The store and key manager every server of the trust domain shares.
struct Shared {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    keys: Arc<MemoryKeyManager>,
}

impl Shared {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("db.sqlite3"))
                .await
                .unwrap(),
        );
        Self {
            dir,
            store,
            keys: Arc::new(MemoryKeyManager::new()),
        }
    }

    /// A server state over the shared store and keys; its SVIDs (the agent's too) live
    /// `ttl`.
    fn state(
        &self,
        name: &str,
        ttl: Duration,
    ) -> impl std::future::Future<Output = Arc<ServerState>> + Send + 'static {
        let data = self.dir.path().join(name);
        let store = self.store.clone();
        let keys = self.keys.clone();
        async move {
            std::fs::create_dir_all(&data).unwrap();
            let td = TrustDomain::new("example.org").unwrap();
            let mut config = ServerConfig::with_defaults(td, &data).unwrap();
            config.ca.default_x509_svid_ttl = ttl;
            ServerState::with_parts(config, Arc::new(SystemClock), store, keys)
                .await
                .unwrap()
        }
    }
}

/// Serves `state`'s node API on 127.0.0.1:0 until the task ends.
async fn serve(state: Arc<ServerState>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = node_service::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        node_service::serve_node_api(state, listener, std::future::pending())
            .await
            .unwrap();
    });
    (addr, task)
}

/// A server on a runtime of its own: [`Doomed::kill`] drops the runtime, which ends
/// every task of that server and closes every connection it holds at once, as the death
/// of its process would.
struct Doomed {
    runtime: Option<tokio::runtime::Runtime>,
    state: Arc<ServerState>,
    addr: SocketAddr,
}

impl Doomed {
    async fn start(shared: &Shared, name: &str, ttl: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let state = shared.state(name, ttl);
        runtime.spawn(async move {
            let state = state.await;
            let (addr, task) = serve(state.clone()).await;
            let _ = tx.send((state, addr));
            let _ = task.await;
        });
        let (state, addr) = rx.await.unwrap();
        Self {
            runtime: Some(runtime),
            state,
            addr,
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Doomed {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn join_token(state: &ServerState) -> String {
    let token = format!(
        "failover-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    state
        .store
        .create_join_token(&JoinTokenRecord {
            token_hash: hex::encode(sha256(token.as_bytes())),
            expires_at: state.clock.unix_seconds() + 600,
            selectors: Vec::new(),
        })
        .await
        .unwrap();
    token
}

fn agent_config(
    state: &ServerState,
    servers: ServerAddresses,
    data_dir: &Path,
    token: Option<String>,
) -> NodeClientConfig {
    NodeClientConfig {
        server_addresses: servers,
        trust_domain: state.config.trust_domain.clone(),
        data_dir: data_dir.to_path_buf(),
        join_token: token,
        k8s_psat: None,
        bootstrap: Bootstrap::Bundle((*state.ca.bundle()).clone()),
        clock: Arc::new(SystemClock),
    }
}

/// An entry for this test process (its uid) under `parent`, created through `state`.
async fn register(state: &ServerState, parent: &SpiffeId, path: &str) -> SpiffeId {
    let td = state.config.trust_domain.clone();
    let id = td.spiffe_id(path).unwrap();
    let mut e = RegistrationEntry::new(
        id.clone(),
        parent.clone(),
        vec![writ_tests::uid_selector().parse().unwrap()],
    );
    e.validate(&td).unwrap();
    state.store.create_entry(&e).await.unwrap();
    state.notify_change();
    id
}

/// A Workload API client on the agent's socket.
async fn workload_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn x509_request() -> tonic::Request<X509svidRequest> {
    let mut request = tonic::Request::new(X509svidRequest {});
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    request
}

/// The SPIFFE IDs of each X509 response on one FetchX509SVID stream, opened again when
/// the agent has no identity for the caller yet.
struct Stream {
    client: SpiffeWorkloadApiClient<Channel>,
    stream: Option<tonic::Streaming<writ_spiffe::proto::workload::X509svidResponse>>,
}

impl Stream {
    async fn open(socket: &Path) -> Self {
        Self {
            client: workload_client(socket).await,
            stream: None,
        }
    }

    /// Waits until a response holds `id`; returns every SPIFFE ID of that response.
    async fn until_it_holds(&mut self, id: &SpiffeId) -> Vec<String> {
        let want = id.to_string();
        tokio::time::timeout(PATIENCE, async {
            loop {
                let stream = match &mut self.stream {
                    Some(s) => s,
                    None => match self.client.fetch_x509svid(x509_request()).await {
                        Ok(r) => self.stream.insert(r.into_inner()),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                match stream.message().await {
                    Ok(Some(r)) if r.svids.iter().any(|s| s.spiffe_id == want) => {
                        return r.svids.into_iter().map(|s| s.spiffe_id).collect::<Vec<_>>();
                    }
                    Ok(Some(_)) => {}
                    _ => {
                        self.stream = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{want} never reached the workload"))
    }
}

/// The agent's clock, ahead of the servers' by all but 10 s of the agent SVID's
/// lifetime: the agent renews its SVID every 5 s or so instead of every half hour.
#[derive(Debug)]
struct RenewSoon;

impl writ_identity::clock::Clock for RenewSoon {
    fn now(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() + node_service::AGENT_SVID_TTL - Duration::from_secs(10)
    }
}

/// The agent SVID file's leaf, as its lowercase hex SHA-256.
fn agent_svid_sha256(data_dir: &Path) -> String {
    let pem = std::fs::read_to_string(data_dir.join("agent_svid.pem")).unwrap();
    let chain = writ_identity::svid::x509::chain_from_pem(&pem).unwrap();
    hex::encode(sha256(chain.first().unwrap()))
}

#[tokio::test]
async fn an_agent_fails_over_to_the_surviving_server_without_attesting_again() {
    let shared = Shared::new().await;
    let ttl = Duration::from_secs(12);
    let mut first = Doomed::start(&shared, "server-1", ttl).await;
    let second = shared.state("server-2", ttl).await;
    let (second_addr, _second_task) = serve(second.clone()).await;
    assert_eq!(
        first.state.ca.bundle().to_json(),
        second.ca.bundle().to_json(),
        "the two servers share one CA"
    );

    // Attestation tries the addresses in order: the first server attests.
    let data: PathBuf = shared.dir.path().join("agent");
    let token = join_token(&second).await;
    let servers: ServerAddresses = [first.addr, second_addr].into_iter().collect();
    let mut config = agent_config(&second, servers, &data, Some(token));
    config.clock = Arc::new(RenewSoon);
    let node = GrpcNode::connect(config).await.unwrap();
    let agent_id = node.agent_id().clone();
    let before = first
        .state
        .store
        .fetch_agent(&agent_id)
        .await
        .unwrap()
        .unwrap();
    let svid_before = agent_svid_sha256(&data);

    let old = register(&first.state, &agent_id, "/failover/old").await;
    let running = agent::start(
        node.clone(),
        &shared.dir.path().join("agent.sock"),
        Arc::new(UnixAttestor::default()),
    )
    .await
    .unwrap();
    let mut stream = Stream::open(&running.socket).await;
    stream.until_it_holds(&old).await;
    assert_eq!(node.current_server(), Some(first.addr));

    // The first server dies; an entry created through the second reaches the workload's
    // stream, which stays open throughout.
    let svid_at_kill = agent_svid_sha256(&data);
    first.kill();
    let killed = std::time::Instant::now();
    let new = register(&second, &agent_id, "/failover/new").await;
    let served = stream.until_it_holds(&new).await;
    assert!(
        served.contains(&old.to_string()),
        "the cached SVID is still served: {served:?}"
    );
    eprintln!(
        "server killed -> new entry on the workload's stream: {:?}",
        killed.elapsed()
    );
    assert_eq!(node.current_server(), Some(second_addr));
    assert!(
        stream.client.fetch_x509svid(x509_request()).await.is_ok(),
        "a new stream is served too"
    );

    // No new attestation: one agent, its record as first written.
    let agents = second.store.list_agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    let after = second.store.fetch_agent(&agent_id).await.unwrap().unwrap();
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.attestation_type, before.attestation_type);
    let svid_now = agent_svid_sha256(&data);
    assert!(
        svid_now == svid_before
            || svid_now == after.cert_sha256
            || svid_now == after.next_cert_sha256,
        "the agent SVID on disk is the attested one or its renewal"
    );

    // Renewal reaches the surviving server.
    tokio::time::timeout(PATIENCE, async {
        while agent_svid_sha256(&data) == svid_at_kill {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the agent SVID was renewed");
    let renewed = agent_svid_sha256(&data);
    let record = second.store.fetch_agent(&agent_id).await.unwrap().unwrap();
    assert!(
        renewed == record.cert_sha256 || renewed == record.next_cert_sha256,
        "the surviving server issued the renewed SVID"
    );
    assert_eq!(record.created_at, before.created_at);
    // The renewed SVID is accepted by the surviving server. (A call already under way
    // with the previous SVID when the new one is first used is refused once; the agent
    // retries such calls, and so does this test.)
    let mut tries = 0;
    let sync = loop {
        match node.sync_entries(&Default::default()).await {
            Ok(sync) => break sync,
            Err(e) if tries < 20 => {
                tries += 1;
                eprintln!("sync after renewal: {e}; again");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the surviving server refuses the renewed agent: {e}"),
        }
    };
    assert_eq!(sync.ids.len(), 2);
    assert_eq!(node.current_server(), Some(second_addr));
    drop(running);
}

#[tokio::test]
async fn a_dead_first_address_and_a_dns_name_that_resolves() {
    let shared = Shared::new().await;
    let state = shared.state("server", Duration::from_secs(3600)).await;
    let (addr, _task) = serve(state.clone()).await;
    // A port nobody listens on (bound, then closed): refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let servers =
        ServerAddresses::new([dead_addr.to_string(), format!("localhost:{}", addr.port())])
            .unwrap();
    let data = shared.dir.path().join("agent");
    let token = join_token(&state).await;
    let node = GrpcNode::connect(agent_config(&state, servers.clone(), &data, Some(token)))
        .await
        .unwrap();
    let sync = node.sync_entries(&Default::default()).await.unwrap();
    assert!(sync.ids.is_empty());
    assert_eq!(
        node.current_server(),
        Some(addr),
        "localhost resolved to it"
    );
    assert_eq!(node.server_addresses(), &servers);

    // Restarted with no token: the stored SVID, the same servers, no attestation.
    drop(node);
    let again = GrpcNode::connect(agent_config(&state, servers, &data, None))
        .await
        .unwrap();
    again.sync_entries(&Default::default()).await.unwrap();
    assert_eq!(state.store.list_agents().await.unwrap().len(), 1);
}

/// A TCP proxy to `target` that can go silent: after [`Freezable::freeze`] it forwards
/// nothing more and answers no new connection, yet closes nothing, as a server behind a
/// dropped network path (a black hole).
struct Freezable {
    addr: SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    _task: tokio::task::JoinHandle<()>,
}

impl Freezable {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = tokio::sync::watch::Sender::new(false);
        let watch = frozen.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    held.push(inbound);
                    continue;
                }
                let mut stop = watch.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut ri, mut wi) = inbound.into_split();
                    let (mut ro, mut wo) = outbound.into_split();
                    let frozen = async move {
                        let _ = stop.wait_for(|f| *f).await.map(|_| ());
                    };
                    tokio::select! {
                        _ = tokio::io::copy(&mut ri, &mut wo) => {}
                        _ = tokio::io::copy(&mut ro, &mut wi) => {}
                        () = frozen => {
                            // Silent from now on, but never closed.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            frozen,
            _task: task,
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

#[tokio::test]
async fn a_server_that_goes_silent_is_left_for_the_next() {
    let shared = Shared::new().await;
    let state = shared.state("server", Duration::from_secs(3600)).await;
    let (direct, _task) = serve(state.clone()).await;
    let proxy = Freezable::start(direct).await;
    let data = shared.dir.path().join("agent");
    let token = join_token(&state).await;
    let servers: ServerAddresses = [proxy.addr, direct].into_iter().collect();
    let node = GrpcNode::connect(agent_config(&state, servers, &data, Some(token)))
        .await
        .unwrap();
    let agent_id = node.agent_id().clone();
    let first = register(&state, &agent_id, "/silent/first").await;
    let running = agent::start(
        node.clone(),
        &shared.dir.path().join("agent.sock"),
        Arc::new(UnixAttestor::default()),
    )
    .await
    .unwrap();
    let mut stream = Stream::open(&running.socket).await;
    stream.until_it_holds(&first).await;
    assert_eq!(node.current_server(), Some(proxy.addr));

    // The path to the first address drops everything: keep-alive notices, the new
    // connection's handshake there times out, and the next address serves the agent.
    proxy.freeze();
    let frozen = std::time::Instant::now();
    let second = register(&state, &agent_id, "/silent/second").await;
    stream.until_it_holds(&second).await;
    eprintln!(
        "server silent -> new entry on the workload's stream: {:?}",
        frozen.elapsed()
    );
    assert_eq!(node.current_server(), Some(direct));
    drop(running);
}
