//! The identity agent: attests local workloads and serves them the SPIFFE Workload API
//! on a Unix socket, with SVIDs it obtains from the server for the entries authorized
//! for its node.
//!
//! ```no_run
//! use std::sync::Arc;
//! use writ_identity::agent::{self, node_api::LocalNode};
//! use writ_identity::attest::workload::UnixAttestor;
//! # async fn demo(server: Arc<writ_identity::server::ServerState>) -> Result<(), Box<dyn std::error::Error>> {
//! let agent_id = server.config.trust_domain.spiffe_id("/writ/agent/local")?;
//! let node = Arc::new(LocalNode::new(server, agent_id));
//! let running = agent::start(node, std::path::Path::new("/tmp/writ/agent.sock"),
//!     Arc::new(UnixAttestor::default())).await?;
//! # Ok(()) }
//! ```

pub mod cache;
pub mod config;
pub mod delegation;
pub mod health;
pub mod node_api;
pub mod node_client;
pub mod sds;
pub mod server_address;
pub mod uds_transport;
pub mod wit;
pub mod workload_api;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::attest::workload::WorkloadAttestor;
use crate::clock::SystemClock;
use crate::server::{ServerError, bind_unix_socket};
use cache::Cache;
use delegation::{Delegation, SubAgentsServer};
use health::{AgentHealth, HealthServer};
use node_api::NodeApi;
use workload_api::{SpiffeWorkloadApiServer, WorkloadApi};

/// Default Workload API socket.
pub const DEFAULT_SOCKET: &str = "/tmp/writ/agent.sock";

/// A running agent: its cache and Workload API server. Stops when dropped.
#[derive(Debug)]
pub struct RunningAgent {
    /// The SVID cache.
    pub cache: Arc<Cache>,
    /// The Workload API socket path.
    pub socket: PathBuf,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Fills the cache once, then serves the Workload API, Envoy's SDS (see [`sds`]), Writ's sub-agent delegation
/// service (`writ.delegation.v1.SubAgents`) and the agent's health
/// (`grpc.health.v1.Health`, see [`health`]) on `socket` (mode 0777 in a 0755 directory,
/// so workloads of any uid can reach it, as SPIRE's public socket), and keeps the cache
/// and the sub-agent leases fresh in the background.
///
/// # Errors
/// [`ServerError::Socket`] if the socket cannot be bound.
pub async fn start(
    node: Arc<dyn NodeApi>,
    socket: &Path,
    attestor: Arc<dyn WorkloadAttestor>,
) -> Result<RunningAgent, ServerError> {
    let cache = Cache::new(node, Arc::new(SystemClock));
    if let Err(e) = cache.refresh(true).await {
        tracing::warn!(error = %e, "initial sync failed; will retry");
    }
    let listener = bind_unix_socket(socket, 0o777)?;
    let api = WorkloadApi::new(cache.clone(), attestor);
    let delegation = Delegation::new(api.clone());
    let subagents = SubAgentsServer::new(delegation.clone());
    let health = HealthServer::new(AgentHealth::new(cache.clone()));
    let sds = sds::Sds::new(api.clone()).into_server();
    let service = SpiffeWorkloadApiServer::new(api);
    let serve = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(sds)
            .add_service(subagents)
            .add_service(health)
            .serve_with_incoming(futures::TryStreamExt::map_ok(
                crate::accept::unix_incoming(listener, "Workload API"),
                uds_transport::UdsStream::new,
            ))
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "Workload API server stopped");
        }
    });
    let refresh = tokio::spawn(cache.clone().run());
    let watch = tokio::spawn(delegation.run());
    tracing::info!(socket = %socket.display(), "Workload API ready");
    Ok(RunningAgent {
        cache,
        socket: socket.to_path_buf(),
        tasks: vec![serve, refresh, watch],
    })
}
