//! Test harness shared by the cross-crate suites: a whole Writ stack (server state on a
//! SQLite file, an in-process agent serving the Workload API on a temp socket) and the
//! helpers that make interop tests short. It owns the cross-crate suite
//! (`tests/tests/suite`) and benches; a package's own tests live in that package.
//! [`env`](mod@env) is the test environment every package's suites share: skipping,
//! this process's ids, and installs into `.interop/`.
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]
#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test harness: a failed setup step should abort the test loudly"
)]

// The `subagent_probe` binary (a sub-agent the suites spawn) links the SDK.
use writ_sdk as _;

pub mod docker;
pub mod env;
pub mod explorer;
pub mod k8s;
pub mod oidc_provider;
pub mod python;
pub mod revocation_feed;

pub use env::{available, gid, require_all, skip, uid};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use writ_identity::agent::{self, RunningAgent, node_api::LocalNode};
use writ_identity::attest::workload::{UnixAttestor, WorkloadAttestor};
use writ_identity::clock::SystemClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::MemoryKeyManager;
use writ_identity::selector::Selector;
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;

/// A server and an in-process agent on temp paths.
pub struct Stack {
    /// Holds the data dir and socket.
    pub dir: tempfile::TempDir,
    /// The server.
    pub server: Arc<ServerState>,
    /// The agent.
    pub agent: RunningAgent,
    /// The agent's SPIFFE ID (parent of the entries tests create).
    pub agent_id: SpiffeId,
}

impl Stack {
    /// Starts a stack whose X509-SVIDs live `x509_ttl` by default.
    pub async fn start(x509_ttl: Duration) -> Self {
        Self::start_with(x509_ttl, Arc::new(UnixAttestor::default())).await
    }

    /// As [`Stack::start`], with the agent attesting workloads through `attestor`.
    pub async fn start_with(x509_ttl: Duration, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let server = server_state(dir.path(), x509_ttl).await;
        let agent_id = td.spiffe_id("/writ/agent/test").unwrap();
        let node = Arc::new(LocalNode::new(server.clone(), agent_id.clone()));
        let agent = agent::start(node, &dir.path().join("agent.sock"), attestor)
            .await
            .unwrap();
        Self {
            dir,
            server,
            agent,
            agent_id,
        }
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.agent.socket.clone()
    }

    /// `unix:///path`, as `SPIFFE_ENDPOINT_SOCKET` takes it.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Registers `spiffe://example.org<path>` for workloads with all of `selectors`,
    /// under the agent, and tells the agent.
    pub async fn register(&self, path: &str, selectors: &[&str]) -> RegistrationEntry {
        self.register_with(path, selectors, |_| {}).await
    }

    /// As [`Stack::register`], with `adjust` applied to the entry first (a spawn policy,
    /// TTLs, ...). The entry is created now unless `adjust` sets `created_at` (entries
    /// order by creation second, then id: a test orders them without waiting a second).
    pub async fn register_with(
        &self,
        path: &str,
        selectors: &[&str],
        adjust: impl FnOnce(&mut RegistrationEntry),
    ) -> RegistrationEntry {
        let td = self.server.config.trust_domain.clone();
        let selectors: Vec<Selector> = selectors.iter().map(|s| s.parse().unwrap()).collect();
        let mut entry = RegistrationEntry::new(
            td.spiffe_id(path).unwrap(),
            self.agent_id.clone(),
            selectors,
        );
        adjust(&mut entry);
        entry.validate(&td).unwrap();
        if entry.created_at == 0 {
            entry.created_at = self.server.clock.unix_seconds();
        }
        let stored = self.server.store.create_entry(&entry).await.unwrap();
        self.server.notify_change();
        stored
    }
}

/// A gRPC channel to the agent's Unix socket at `socket` (the Workload API, SDS, the
/// sub-agent service), for raw tonic clients in tests and benches.
pub async fn uds_channel(socket: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap()
}

/// A raw tonic client for the standard Workload API service on one new connection, so
/// tests control the metadata (see [`with_header`]).
pub async fn connect_raw(
    socket: PathBuf,
) -> writ_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    let channel = uds_channel(socket).await;
    writ_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        channel,
    )
}

/// An identity server for trust domain `example.org` on a SQLite store in `dir`, with
/// in-memory keys and X509-SVIDs of `x509_ttl` by default.
pub async fn server_state(dir: &std::path::Path, x509_ttl: Duration) -> Arc<ServerState> {
    let td = TrustDomain::new("example.org").unwrap();
    let mut config = ServerConfig::with_defaults(td, dir).unwrap();
    config.ca.default_x509_svid_ttl = x509_ttl;
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

/// A request with the `workload.spiffe.io: true` security header.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// `unix:uid:<uid of this process>`.
pub fn uid_selector() -> String {
    format!("unix:uid:{}", uid())
}
