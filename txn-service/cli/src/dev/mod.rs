//! `writ dev`: the identity server, an agent and the transaction token service in one
//! process on embedded defaults, plus a development OpenID Provider ([`issuer`]), so the
//! whole chain can be tried with no other software; and `writ demo` ([`demo`]), which
//! runs the end-to-end example on it.
//!
//! Everything lives in one data dir (default [`DEFAULT_DATA_DIR`]):
//!
//! | file | what |
//! |---|---|
//! | `datastore.sqlite3` | entries, CA journal, bundles, sub-agent leases |
//! | `keys/` | the CA and JWT signing keys (0600) |
//! | `server.sock` | the admin API (`writ entry ...`; 0600) |
//! | `agent.sock` | the SPIFFE Workload API and `writ.delegation.v1.SubAgents` |
//! | `txn/` | the token service's signing keys and audit log (0600) |
//! | `policy.toml` | the token service's issuance policy, written on first start |
//! | `oidc-key.pem` | the development issuer's key (0600) |
//! | `oidc-listen` | the development issuer's address, rebound on restart ([`OIDC_LISTEN_FILE`]) |
//! | `dev.json` | what is running where, while it runs ([`DevState`]) |
//!
//! A restart on the same data dir keeps the CA, the trust bundle, the entries, every key
//! and the trust domain: without `--trust-domain` it reuses the recorded one, and another
//! one is refused. The embedded agent is `spiffe://<td>/writ/agent/dev`; entries created without a
//! parent get it. The token service is a workload of that agent like any other: its entry
//! (`spiffe://<td>/writ/tts`) matches this uid and the selector `writ:dev:self`, which
//! [`DevAttestor`] gives the `writ dev` process alone.

pub mod demo;
pub mod issuer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use writ_identity::agent::node_api::LocalNode;
use writ_identity::agent::{self, RunningAgent};
use writ_identity::attest::workload::{
    AttestError, Attestation, Attestors, Caller, DockerAttestor, DockerAttestorConfig,
    SelectorDemand, UnixAttestor, WorkloadAttestor,
};
use writ_identity::clock::{Clock, SystemClock};
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::Selector;
use writ_identity::server::config::ServerConfig;
use writ_identity::server::{self, ServerState, oidc_discovery};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::EntryFilter;

use issuer::{DEV_AUDIENCE, DevIssuer};
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::IssuerConfig;
use writ_txn_service::policy::Policy;

/// Default data dir.
pub const DEFAULT_DATA_DIR: &str = "./writ-dev";
/// The trust domain of a new data dir when none is given.
pub const DEFAULT_TRUST_DOMAIN: &str = "example.org";
/// Default token service address.
pub const DEFAULT_TTS_LISTEN: &str = "127.0.0.1:8443";
/// The state file in the data dir.
pub const STATE_FILE: &str = "dev.json";
/// Where each part's operations listener binds (a free port each; `dev.json` names them).
pub const OPS_LISTEN: &str = "127.0.0.1:0";
/// The policy file in the data dir.
pub const POLICY_FILE: &str = "policy.toml";
/// The token service's directory (signing keys, audit log) in the data dir.
pub const TXN_DIR: &str = "txn";
/// Mode of the data dir: 0711, so that workloads of other uids reach `agent.sock` in
/// it by name (they cannot list it); its files are 0600 and its subdirectories 0700.
pub const DATA_DIR_MODE: u32 = 0o711;
/// The development issuer's key file in the data dir.
pub const OIDC_KEY_FILE: &str = "oidc-key.pem";
/// The development issuer's last address in the data dir: a restart binds it again, so
/// the issuer URL (`iss`) stays the same and tokens minted before the restart still pass.
pub const OIDC_LISTEN_FILE: &str = "oidc-listen";
/// The embedded agent's path.
pub const AGENT_PATH: &str = "/writ/agent/dev";
/// The token service's path.
pub const TTS_PATH: &str = "/writ/tts";

/// Why `writ dev` could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// A file or directory of the data dir.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The identity server could not start.
    #[error("identity server: {0}")]
    Server(#[from] server::ServerError),
    /// The embedded agent (its Workload API socket) could not start.
    #[error("agent: {0}")]
    Agent(server::ServerError),
    /// The embedded token service's entry could not be written.
    #[error("token service entry: {0}")]
    Entry(String),
    /// The token service could not start.
    #[error("token service: {0}")]
    Txn(#[from] writ_txn_service::config::TxnConfigError),
    /// The development issuer could not start.
    #[error(transparent)]
    Issuer(#[from] issuer::DevIssuerError),
    /// `writ dev` is not running on this data dir.
    #[error("writ dev is not running on {0} (no {STATE_FILE}); start it with `writ dev`")]
    NotRunning(PathBuf),
}

fn file_err(path: &Path, reason: impl ToString) -> DevError {
    DevError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The data dir (created if absent).
    pub data_dir: PathBuf,
    /// The trust domain. `None`: the one the data dir recorded at its first start, or
    /// `example.org` on a new data dir. One the data dir did not record is refused.
    pub trust_domain: Option<TrustDomain>,
    /// The token service's HTTPS address (port 0 picks one).
    pub tts_listen: SocketAddr,
    /// The development issuer's HTTP address (port 0 picks one).
    pub oidc_listen: SocketAddr,
    /// Start over when the datastore has no CA while `keys/` holds CA keys (see
    /// [`ServerConfig::reset_ca`]).
    pub reset_ca: bool,
    /// The SPIFFE bundle endpoint's HTTPS address (`https_spiffe`; port 0 picks one).
    pub bundle_endpoint_listen: SocketAddr,
    /// OIDC discovery for JWT-SVIDs, plain HTTP (port 0 picks one); its URL is the
    /// JWT-SVIDs' `iss`.
    pub oidc_discovery_listen: SocketAddr,
}

impl DevOptions {
    /// The defaults, on `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            trust_domain: None,
            reset_ca: false,
            tts_listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            oidc_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            bundle_endpoint_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            oidc_discovery_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

/// What runs where, written to `<data dir>/dev.json` while `writ dev` runs (scripts and
/// `writ dev login` read it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevState {
    /// The trust domain.
    pub trust_domain: String,
    /// The data dir (absolute).
    pub data_dir: PathBuf,
    /// The admin socket (`--server-socket`, `WRIT_SERVER_SOCKET`).
    pub server_socket: PathBuf,
    /// The Workload API endpoint (`unix:///...`, `SPIFFE_ENDPOINT_SOCKET`).
    pub workload_api: String,
    /// The embedded agent's SPIFFE ID.
    pub agent_id: String,
    /// The token service's URL.
    pub tts_url: String,
    /// The token service's SPIFFE ID.
    pub tts_id: String,
    /// The development issuer's URL.
    pub oidc_issuer: String,
    /// The audience of its tokens.
    pub oidc_audience: String,
    /// The policy file.
    pub policy_file: PathBuf,
    /// The `writ dev` process.
    pub pid: u32,
    /// The SPIFFE bundle endpoint (`https_spiffe`) other trust domains federate with.
    #[serde(default)]
    pub bundle_endpoint_url: String,
    /// The SPIFFE ID the bundle endpoint presents (`--endpoint-spiffe-id` of a
    /// `writ federation create` on the other side).
    #[serde(default)]
    pub bundle_endpoint_spiffe_id: String,
    /// OIDC discovery for JWT-SVIDs (`<url>/.well-known/openid-configuration`); also
    /// the `iss` of the JWT-SVIDs `writ dev` issues.
    #[serde(default)]
    pub oidc_discovery_url: String,
    /// The identity server's Prometheus metrics (`http://127.0.0.1:<port>/metrics`).
    #[serde(default)]
    pub server_metrics_url: String,
    /// The agent's Prometheus metrics.
    #[serde(default)]
    pub agent_metrics_url: String,
    /// The token service's Prometheus metrics.
    #[serde(default)]
    pub txn_metrics_url: String,
    /// The identity server's readiness (`/readyz`; `/healthz` beside it).
    #[serde(default)]
    pub server_health_url: String,
    /// The agent's readiness.
    #[serde(default)]
    pub agent_health_url: String,
    /// The token service's readiness.
    #[serde(default)]
    pub txn_health_url: String,
    /// The chain explorer, on the token service's operations listener.
    #[serde(default)]
    pub explorer_url: String,
}

impl DevState {
    /// Reads the state of the `writ dev` running on `data_dir`.
    ///
    /// # Errors
    /// [`DevError::NotRunning`] if there is no state file, [`DevError::File`] if it is
    /// unreadable.
    pub fn read(data_dir: &Path) -> Result<Self, DevError> {
        let path = data_dir.join(STATE_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DevError::NotRunning(data_dir.to_path_buf()));
            }
            Err(e) => return Err(file_err(&path, e)),
        };
        serde_json::from_str(&text).map_err(|e| file_err(&path, e))
    }
}

/// The policy written on first start: any workload of the trust domain may exchange a
/// user token or replace a Txn-Token, for a few example scopes.
pub fn default_policy(trust_domain: &TrustDomain) -> String {
    format!(
        r#"# policy.toml: who may ask `writ dev`'s token service for what. Deny by default;
# the first matching rule wins. Edit it and restart `writ dev`. Reference: docs/txn.md.
max_lifetime = "15m"

[[caller]]
trust_domain = "{trust_domain}"                 # any workload of the trust domain
subject_token_types = ["access_token", "id_token", "jwt", "txn_token"]
max_scope = ["docs.read", "docs.summarize", "orders.read", "orders.write"]
"#
    )
}

/// A running `writ dev`.
#[derive(Debug)]
pub struct Dev {
    /// What runs where.
    pub state: DevState,
    /// The identity server.
    pub server: Arc<ServerState>,
    /// How long start-up took.
    pub startup: Duration,
    issuer: DevIssuer,
    tts: TxnServer,
    agent: RunningAgent,
    admin: tokio::task::JoinHandle<Result<(), server::ServerError>>,
    stop_admin: tokio::sync::oneshot::Sender<()>,
    /// Serves OIDC discovery; aborted when `writ dev` stops.
    _oidc_discovery: tokio_util::task::AbortOnDropHandle<()>,
    /// Keeps a second server off the SQLite store until `writ dev` stops.
    _store_lock: Option<writ_identity::store::sqlite::StoreLock>,
    /// The SPIFFE bundle endpoint.
    bundle_endpoint: tokio::task::JoinHandle<Result<(), server::ServerError>>,
    /// The identity server's and the agent's operations listeners (the token service
    /// runs its own).
    _ops: [writ_identity::ops::RunningOps; 2],
}

impl Dev {
    /// Starts the server, the agent, the development issuer and the token service on
    /// `options.data_dir`, and writes `dev.json`.
    ///
    /// # Errors
    /// [`DevError`] naming the part that failed.
    pub async fn start(options: DevOptions) -> Result<Self, DevError> {
        let started = Instant::now();
        let dir = &options.data_dir;
        writ_identity::key_manager::create_dir_with_mode(dir, DATA_DIR_MODE)
            .map_err(|e| file_err(dir, e))?;
        let dir = std::fs::canonicalize(dir).map_err(|e| file_err(dir, e))?;
        let td = match options.trust_domain.clone() {
            Some(td) => td,
            None => recorded_trust_domain(&dir).await?,
        };
        let agent_id = spiffe_id(&td, AGENT_PATH)?;
        let tts_id = spiffe_id(&td, TTS_PATH)?;

        let mut config =
            ServerConfig::with_defaults(td.clone(), &dir).map_err(|e| file_err(&dir, e))?;
        config.admin_socket = dir.join("server.sock");
        config.bind_address = None;
        config.default_parent_id = Some(agent_id.clone());
        config.reset_ca = options.reset_ca;
        let listen_err = |e| file_err(Path::new(&options.oidc_discovery_listen.to_string()), e);
        let discovery_tcp = tokio::net::TcpListener::bind(options.oidc_discovery_listen)
            .await
            .map_err(listen_err)?;
        let discovery_addr = discovery_tcp.local_addr().map_err(listen_err)?;
        let oidc_discovery_url = format!("http://{discovery_addr}");
        config.ca.jwt_issuer = Some(oidc_discovery_url.clone());
        let datastore = config.datastore.clone();
        let server_socket = config.admin_socket.clone();
        let store_lock = datastore.lock().map_err(server::ServerError::from)?;
        let state = ServerState::open(config, Arc::new(SystemClock)).await?;
        let (stop_admin, stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = tokio::spawn(server::serve(state.clone(), async move {
            let _ = stopped.await;
        }));

        let bundle_tcp = tokio::net::TcpListener::bind(options.bundle_endpoint_listen)
            .await
            .map_err(|e| file_err(Path::new(&options.bundle_endpoint_listen.to_string()), e))?;
        let bundle_addr = bundle_tcp
            .local_addr()
            .map_err(|e| file_err(Path::new(&options.bundle_endpoint_listen.to_string()), e))?;
        let bundle_endpoint_spiffe_id =
            writ_identity::server::federation::endpoint::endpoint_spiffe_id(&td)
                .map_err(|e| file_err(&dir, e))?;
        let bundle_endpoint = tokio::spawn(writ_identity::server::federation::endpoint::serve_for(
            state.clone(),
            bundle_tcp,
            writ_identity::server::federation::endpoint::EndpointProfile::HttpsSpiffe,
            std::future::pending(),
        ));
        let discovery_config = oidc_discovery::OidcDiscoveryConfig {
            listen: discovery_addr,
            tls: None,
        };
        let discovery_router = oidc_discovery::router(&oidc_discovery_url, state.ca.subscribe());
        let oidc_discovery = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let serve = oidc_discovery::serve(
                &discovery_config,
                discovery_tcp,
                discovery_router,
                std::future::pending(),
            );
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "OIDC discovery stopped");
            }
        }));

        let tts_names = tts_dns_names(options.tts_listen.ip());
        ensure_tts_entry(&state, &agent_id, &tts_id, &tts_names).await?;
        let node = Arc::new(LocalNode::new(state.clone(), agent_id.clone()));
        let agent_socket = dir.join("agent.sock");
        let attestor = DevAttestor::detect().await;
        let agent = agent::start(node, &agent_socket, Arc::new(attestor))
            .await
            .map_err(DevError::Agent)?;
        let ops_err = |e: writ_identity::ops::OpsError| file_err(Path::new(OPS_LISTEN), e);
        let ops_config = writ_identity::ops::OpsConfig::parse(OPS_LISTEN).map_err(ops_err)?;
        let server_ops =
            writ_identity::ops::start(&ops_config, writ_identity::ops::router(state.ops()))
                .await
                .map_err(ops_err)?;
        let agent_ops = writ_identity::ops::start(
            &ops_config,
            writ_identity::ops::router(agent::health::ops(&agent.cache)),
        )
        .await
        .map_err(ops_err)?;
        let workload_api = format!("unix://{}", agent_socket.display());

        let issuer = start_issuer(&dir, options.oidc_listen).await?;
        let policy_file = dir.join(POLICY_FILE);
        let policy = load_policy(&policy_file, &td)?;

        let tcp = tokio::net::TcpListener::bind(options.tts_listen)
            .await
            .map_err(|e| file_err(Path::new(&options.tts_listen.to_string()), e))?;
        let tts_addr = tcp
            .local_addr()
            .map_err(|e| file_err(Path::new(&options.tts_listen.to_string()), e))?;
        let tts_url = format!("https://{tts_addr}");
        let mut txn = TxnConfig::from_toml("", &dir)?;
        txn.listen = tts_addr;
        txn.issuer = tts_url.clone();
        txn.workload_api = workload_api.clone();
        txn.spiffe_id = Some(tts_id.clone());
        txn.data_dir = Some(dir.join(TXN_DIR));
        txn.audit_log = Some(dir.join(TXN_DIR).join("audit.log"));
        txn.oidc = vec![IssuerConfig::new(issuer.url(), [DEV_AUDIENCE])];
        txn.identity_store = Some(datastore);
        txn.policy = policy;
        txn.accept_dev_tokens = true;
        txn.ops = Some(ops_config);
        txn.dns_names = writ_txn_service::server_name::ServerNames::new(tts_names)
            .map_err(writ_txn_service::config::TxnConfigError::from)?;
        let tts = TxnServer::start_on(txn, Arc::new(SystemClock), tcp).await?;

        let state_record = DevState {
            trust_domain: td.to_string(),
            data_dir: dir.clone(),
            server_socket,
            workload_api,
            agent_id: agent_id.to_string(),
            tts_url,
            tts_id: tts_id.to_string(),
            oidc_issuer: issuer.url().to_owned(),
            oidc_audience: DEV_AUDIENCE.to_owned(),
            policy_file,
            pid: std::process::id(),
            bundle_endpoint_url: format!("https://{bundle_addr}/"),
            bundle_endpoint_spiffe_id: bundle_endpoint_spiffe_id.to_string(),
            oidc_discovery_url,
            server_metrics_url: format!("{}/metrics", server_ops.base_url()),
            agent_metrics_url: format!("{}/metrics", agent_ops.base_url()),
            txn_metrics_url: tts
                .ops_addr()
                .map(|a| format!("http://{a}/metrics"))
                .unwrap_or_default(),
            server_health_url: format!("{}/readyz", server_ops.base_url()),
            agent_health_url: format!("{}/readyz", agent_ops.base_url()),
            txn_health_url: tts
                .ops_addr()
                .map(|a| format!("http://{a}/readyz"))
                .unwrap_or_default(),
            explorer_url: tts
                .ops_addr()
                .map(|a| format!("http://{a}/explorer"))
                .unwrap_or_default(),
        };
        wait_for_socket(&state_record.server_socket).await?;
        let state_path = dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state_record).map_err(|e| file_err(&dir, e))?;
        write_atomically(&state_path, &json)?;
        Ok(Self {
            state: state_record,
            server: state,
            startup: started.elapsed(),
            issuer,
            tts,
            agent,
            admin,
            stop_admin,
            _oidc_discovery: oidc_discovery,
            _store_lock: store_lock,
            bundle_endpoint,
            _ops: [server_ops, agent_ops],
        })
    }

    /// The development issuer.
    pub fn issuer(&self) -> &DevIssuer {
        &self.issuer
    }

    /// The token service's audit log.
    pub fn audit_log(&self) -> PathBuf {
        self.state.data_dir.join(TXN_DIR).join("audit.log")
    }

    /// What `writ dev` prints when ready: a few lines saying what runs where.
    pub fn banner(&self) -> String {
        let s = &self.state;
        format!(
            "writ dev: ready in {} ms (trust domain {}, data in {})\n\
             \x20 identity server  admin socket {}\n\
             \x20 agent            {}, Workload API {}\n\
             \x20 token service    {} as {} (policy {})\n\
             \x20 OIDC issuer      {}  DEVELOPMENT ONLY: its tokens are refused outside `writ dev`\n\
             \x20 use it:          export WRIT_SERVER_SOCKET={} SPIFFE_ENDPOINT_SOCKET={}\n\
             \x20                  writ dev login --data-dir {} --user alice --scope docs.read\n\
             Ctrl-C stops; a restart on the same data dir keeps the CA, entries and keys.",
            self.startup.as_millis(),
            s.trust_domain,
            s.data_dir.display(),
            s.server_socket.display(),
            s.agent_id,
            s.workload_api,
            s.tts_url,
            s.tts_id,
            s.policy_file.display(),
            s.oidc_issuer,
            s.server_socket.display(),
            s.workload_api,
            s.data_dir.display(),
        )
    }

    /// Stops everything and removes `dev.json`.
    pub async fn shutdown(self) {
        let _ = std::fs::remove_file(self.state.data_dir.join(STATE_FILE));
        if let Err(e) = self.tts.shutdown().await {
            tracing::warn!(error = %e, "token service stopped with an error");
        }
        drop(self.issuer);
        drop(self.agent);
        self.bundle_endpoint.abort();
        let _ = self.stop_admin.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.admin).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "identity server stopped with an error"),
            Ok(_) => {}
            Err(_) => tracing::warn!("identity server did not stop within 5 s"),
        }
    }
}

/// Mints a development access token with the key of the `writ dev` running on
/// `data_dir` (what `writ dev login` prints).
///
/// # Errors
/// [`DevError::NotRunning`] if `writ dev` does not run there, or the issuer's refusal.
pub fn login(data_dir: &Path, user: &str, scope: &str, ttl: Duration) -> Result<String, DevError> {
    let state = DevState::read(data_dir)?;
    let issuer = DevIssuer::open(&state.data_dir.join(OIDC_KEY_FILE), state.oidc_issuer)?;
    Ok(issuer.access_token(user, scope, ttl, SystemClock.unix_seconds())?)
}

/// The trust domain `dir`'s datastore recorded, or `example.org` for a new data dir.
async fn recorded_trust_domain(dir: &Path) -> Result<TrustDomain, DevError> {
    let default = TrustDomain::new(DEFAULT_TRUST_DOMAIN).map_err(|e| file_err(dir, e))?;
    let datastore = ServerConfig::with_defaults(default.clone(), dir)
        .map_err(|e| file_err(dir, e))?
        .datastore;
    let store = datastore.open().await.map_err(server::ServerError::from)?;
    match server::recorded_trust_domain(store.as_ref()).await? {
        Some(recorded) => TrustDomain::new(&recorded).map_err(|e| {
            DevError::Server(server::ServerError::Store(
                writ_identity::store::StoreError::Corrupt {
                    kind: "trust domain",
                    detail: e.to_string(),
                },
            ))
        }),
        None => Ok(default),
    }
}

fn spiffe_id(td: &TrustDomain, path: &str) -> Result<SpiffeId, DevError> {
    td.spiffe_id(path)
        .map_err(|e| DevError::Entry(e.to_string()))
}

/// The selector [`DevAttestor`] adds for the `writ dev` process itself.
pub const SELF_SELECTOR: &str = "writ:dev:self";

/// The embedded agent's attestor: the attestor chain's selectors (`unix`, and `docker`
/// when a Docker daemon answers, see [`DevAttestor::detect`]), plus [`SELF_SELECTOR`]
/// when the caller is this very process (the kernel's peer credentials say so, and a
/// live process's pid cannot be reused), so the embedded token service's entry matches
/// it and nothing else.
#[derive(Debug)]
pub struct DevAttestor {
    chain: Attestors,
}

impl Default for DevAttestor {
    /// The `unix` attestor alone.
    fn default() -> Self {
        Self {
            chain: Attestors::new().with("unix", Arc::new(UnixAttestor::default())),
        }
    }
}

/// How long `writ dev` waits for a Docker daemon to answer a ping at start.
const DOCKER_PING_TIMEOUT: Duration = Duration::from_secs(1);

impl DevAttestor {
    /// `unix`, plus `docker` when a Docker socket is reachable (`DOCKER_HOST` if it is
    /// `unix://...`, else `/var/run/docker.sock`, answering a ping within a second).
    /// Logs which attestors are on.
    pub async fn detect() -> Self {
        let mut dev = Self::default();
        if let Some(socket) =
            writ_identity::attest::workload::docker::reachable_socket(DOCKER_PING_TIMEOUT).await
        {
            dev.chain = dev.chain.with(
                "docker",
                Arc::new(DockerAttestor::new(DockerAttestorConfig {
                    socket_path: socket,
                    ..DockerAttestorConfig::default()
                })),
            );
        }
        tracing::info!(attestors = ?dev.chain.names(), "writ dev: workload attestors");
        dev
    }

    /// The names of the attestors on, in order.
    pub fn names(&self) -> Vec<&str> {
        self.chain.names()
    }
}

#[async_trait::async_trait]
impl WorkloadAttestor for DevAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let mut selectors = self.chain.attest(caller).await?;
        selectors.extend(self_selector(caller));
        Ok(selectors)
    }

    async fn attest_for(
        &self,
        caller: &Caller,
        demand: Arc<dyn SelectorDemand>,
    ) -> Result<Attestation, AttestError> {
        let mut found = self.chain.attest_for(caller, demand).await?;
        found.selectors.extend(self_selector(caller));
        Ok(found)
    }
}

/// [`SELF_SELECTOR`] if `caller` is this very process.
fn self_selector(caller: &Caller) -> Option<Selector> {
    if u32::try_from(caller.pid).ok() != Some(std::process::id()) {
        return None;
    }
    let (kind, value) = SELF_SELECTOR.split_once(':')?;
    Selector::new(kind, value).ok()
}

/// The token service's entry: this uid and [`SELF_SELECTOR`], under the agent. Replaced
/// if an older `writ dev` wrote it with other selectors.
/// The names `writ dev`'s token service is reached by, which its X509-SVID carries so
/// that any HTTPS client verifies it: `localhost`, `127.0.0.1`, and the address it
/// listens on when that is another (not unspecified) IP.
fn tts_dns_names(listen: std::net::IpAddr) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let ip = listen.to_string();
    if !listen.is_unspecified() && !names.contains(&ip) {
        names.push(ip);
    }
    names
}

/// Makes (or brings up to date) the token service's entry: its selectors and the
/// `names` its SVID carries. A data dir made before the names existed gets them here.
async fn ensure_tts_entry(
    state: &ServerState,
    agent_id: &SpiffeId,
    tts_id: &SpiffeId,
    names: &[String],
) -> Result<(), DevError> {
    let entry_err = |e: &dyn std::fmt::Display| DevError::Entry(e.to_string());
    let uid = current_uid().map_err(|e| entry_err(&e))?;
    let selectors = [format!("unix:uid:{uid}"), SELF_SELECTOR.to_owned()]
        .iter()
        .map(|s| s.parse::<Selector>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| entry_err(&e))?;
    let existing = state
        .store
        .list_entries(&EntryFilter {
            spiffe_id: Some(tts_id.clone()),
            parent_id: Some(agent_id.clone()),
        })
        .await
        .map_err(|e| entry_err(&e))?;
    if let Some(current) = existing.iter().find(|e| e.selectors == selectors) {
        if current.dns_names == names {
            return Ok(());
        }
        let mut entry = current.clone();
        entry.dns_names = names.to_vec();
        entry
            .validate_own(&state.config.trust_domain)
            .map_err(|e| entry_err(&e))?;
        state
            .store
            .update_entry(&entry)
            .await
            .map_err(|e| entry_err(&e))?;
        state.notify_change();
        return Ok(());
    }
    for stale in existing {
        state
            .store
            .delete_entry(&stale.id)
            .await
            .map_err(|e| entry_err(&e))?;
    }
    let mut entry = RegistrationEntry::new(tts_id.clone(), agent_id.clone(), selectors);
    entry.hint = "writ dev token service".to_owned();
    entry.dns_names = names.to_vec();
    // Writ's own entry, in the reserved namespace: made here, never through the admin API.
    entry
        .validate_own(&state.config.trust_domain)
        .map_err(|e| entry_err(&e))?;
    entry.created_at = state.clock.unix_seconds();
    state
        .store
        .create_entry(&entry)
        .await
        .map_err(|e| entry_err(&e))?;
    state.notify_change();
    Ok(())
}

/// This process's uid (the owner of `/proc/self`), for `unix:uid` selectors.
pub(crate) fn current_uid() -> std::io::Result<u32> {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m))
}

/// Reads the policy file, writing the default one first if there is none.
fn load_policy(path: &Path, td: &TrustDomain) -> Result<Policy, DevError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = default_policy(td);
            write_atomically(path, text.as_bytes())?;
            text
        }
        Err(e) => return Err(file_err(path, e)),
    };
    Policy::from_toml(&text).map_err(|e| file_err(path, e))
}

/// Writes `data` atomically (temporary file, fsync, rename), 0600 like every file of
/// the data dir that matters.
fn write_atomically(path: &Path, data: &[u8]) -> Result<(), DevError> {
    writ_identity::key_manager::write_secret_file(path, data).map_err(|e| file_err(path, e))
}

/// Starts the development issuer. With port 0 (the default) it binds the address of the
/// previous run, recorded in [`OIDC_LISTEN_FILE`], so its URL survives a restart; if
/// that port is taken now it says so and takes a free one (tokens minted before are
/// then refused: their `iss` names the old URL). The address bound is recorded.
async fn start_issuer(dir: &Path, listen: SocketAddr) -> Result<DevIssuer, DevError> {
    let key = dir.join(OIDC_KEY_FILE);
    let record = dir.join(OIDC_LISTEN_FILE);
    let previous = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| t.trim().parse::<SocketAddr>().ok())
        .filter(|p| listen.port() == 0 && p.port() != 0)
        .map(|p| SocketAddr::new(listen.ip(), p.port()));
    let issuer = match previous {
        Some(addr) => match DevIssuer::start(&key, addr).await {
            Ok(issuer) => issuer,
            Err(issuer::DevIssuerError::Bind { source, .. }) => {
                let issuer = DevIssuer::start(&key, listen).await?;
                tracing::warn!(
                    previous = %addr,
                    error = %source,
                    now = issuer.url(),
                    "the development OIDC issuer cannot bind its previous address: its URL \
                     changed, so tokens minted before this restart are refused (mint new \
                     ones with `writ dev login`)"
                );
                issuer
            }
            Err(e) => return Err(e.into()),
        },
        None => DevIssuer::start(&key, listen).await?,
    };
    let bound = issuer
        .url()
        .strip_prefix("http://")
        .unwrap_or_default()
        .to_owned();
    write_atomically(&record, format!("{bound}\n").as_bytes())?;
    Ok(issuer)
}

/// Waits (at most 5 s) for the admin socket the server binds in its task.
async fn wait_for_socket(path: &Path) -> Result<(), DevError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            return Err(file_err(
                path,
                "the admin socket did not come up within 5 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
