//! The Writ stack the network benches run against: an identity server (SQLite store,
//! keys in memory) and an agent serving the Workload API on a Unix socket, all in this
//! process under a temporary directory, for trust domain `example.org`.
//!
//! The benches register their own workloads ([`BenchStack::register`]); the entries match
//! this uid (`unix:uid`), so this process and any process it starts as the same user (the
//! separate load generator of `writ bench exchange`) get their SVIDs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use writ_identity::agent::{self, RunningAgent, node_api::LocalNode};
use writ_identity::attest::workload::UnixAttestor;
use writ_identity::clock::SystemClock;
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::Selector;
use writ_identity::server::ServerState;
use writ_identity::server::config::{KeyManagerKind, ServerConfig};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};

/// The benches' trust domain.
pub const TRUST_DOMAIN: &str = "example.org";

/// A server and an in-process agent on temporary paths (removed when dropped).
#[derive(Debug)]
pub struct BenchStack {
    /// The identity server.
    pub server: Arc<ServerState>,
    /// The agent.
    pub agent: RunningAgent,
    agent_id: SpiffeId,
    /// Holds the data dir and the socket; dropped last.
    _dir: tempfile::TempDir,
}

impl BenchStack {
    /// Starts a server and an agent whose X509-SVIDs live an hour (longer than any
    /// bench), under a new temporary directory.
    ///
    /// # Errors
    /// If the directory, the store, the server or the agent cannot be made.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("writ-bench-")
            .tempdir()
            .context("temporary directory")?;
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let mut config = ServerConfig::with_defaults(td.clone(), dir.path())?;
        config.key_manager = KeyManagerKind::Memory;
        config.ca.default_x509_svid_ttl = Duration::from_secs(3600);
        let server = ServerState::open(config, Arc::new(SystemClock))
            .await
            .context("identity server")?;
        let agent_id = td.spiffe_id("/writ/agent/bench")?;
        let node = Arc::new(LocalNode::new(server.clone(), agent_id.clone()));
        let agent = agent::start(
            node,
            &dir.path().join("agent.sock"),
            Arc::new(UnixAttestor::default()),
        )
        .await
        .context("agent")?;
        Ok(Self {
            server,
            agent,
            agent_id,
            _dir: dir,
        })
    }

    /// The Workload API socket.
    pub fn socket(&self) -> PathBuf {
        self.agent.socket.clone()
    }

    /// The Workload API endpoint, `unix:///path`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// Registers `spiffe://example.org<path>` for workloads of this uid, under the
    /// agent, with `dns_names` in its X509-SVID; returns its SPIFFE ID.
    ///
    /// # Errors
    /// If the entry is invalid or the store refuses it.
    pub async fn register(&self, path: &str, dns_names: &[&str]) -> anyhow::Result<SpiffeId> {
        let td = self.server.config.trust_domain.clone();
        let uid = crate::dev::current_uid().context("this process's uid")?;
        let selector: Selector = format!("unix:uid:{uid}").parse()?;
        let id = td.spiffe_id(path)?;
        let mut entry = RegistrationEntry::new(id.clone(), self.agent_id.clone(), vec![selector]);
        entry.dns_names = dns_names.iter().map(|n| (*n).to_owned()).collect();
        entry.validate(&td)?;
        entry.created_at = self.server.clock.unix_seconds();
        self.server
            .store
            .create_entry(&entry)
            .await
            .with_context(|| format!("entry {id}"))?;
        self.server.notify_change();
        Ok(id)
    }

    /// Waits (at most 30 s) until the agent holds `n` X509-SVIDs.
    ///
    /// # Errors
    /// If it does not within 30 s.
    pub async fn wait_for_svids(&self, n: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.agent.cache.snapshot().svids.len() < n {
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("the agent did not issue {n} X509-SVIDs within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}
