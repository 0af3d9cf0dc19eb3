//! The identity server: the trust domain's CA, registration store and admin API.
//!
//! [`ServerState::open`] opens the store and key manager named by a [`ServerConfig`] and
//! loads the CA; [`serve`] runs the admin API on the admin Unix socket (mode 0600, as
//! spire-server's) and rotates the CA until shut down.
//!
//! ```no_run
//! use std::sync::Arc;
//! use writ_identity::{clock::SystemClock, server::{self, config::ServerConfig}};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ServerConfig::from_file(std::path::Path::new("server.toml"))?;
//! let state = server::ServerState::open(config, Arc::new(SystemClock)).await?;
//! server::serve(state, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod config;
pub mod federation;
pub mod lease;
pub mod node;
pub mod node_service;
pub mod oidc_discovery;
pub mod revocation;
pub mod revoked;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::SharedClock;
use crate::key_manager::{
    DiskKeyManager, KeyError, KeyManager, MemoryKeyManager, SharedKeyManager, set_mode,
};
use crate::spiffe_id::TrustDomain;
use crate::store::cache::CachedStore;
use crate::store::{SharedStore, Store, StoreError};
use config::{KeyManagerKind, ServerConfig};

/// How often the CA rotation state machine runs.
pub const ROTATION_INTERVAL: Duration = Duration::from_secs(5);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store could not be opened.
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    /// The key manager could not be opened.
    #[error("key manager: {0}")]
    Key(#[from] KeyError),
    /// The CA could not be loaded.
    #[error("CA: {0}")]
    Ca(#[from] CaError),
    /// A Unix socket (the admin socket, or an agent's Workload API socket) could not be
    /// created; the path says which.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The OIDC discovery listener could not start.
    #[error("OIDC discovery: {0}")]
    OidcDiscovery(#[from] oidc_discovery::OidcDiscoveryError),
    /// The operations listener could not start.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// The gRPC server failed.
    #[error("admin API: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The datastore serves another trust domain than this start asks for.
    #[error(
        "the datastore serves trust domain {recorded}, not {configured}: start with \
         --trust-domain {recorded} (trust_domain in server.toml), or use another data dir \
         for {configured}"
    )]
    TrustDomainMismatch {
        /// The trust domain the datastore recorded at its first start.
        recorded: String,
        /// The one this start asked for.
        configured: String,
    },
    /// The datastore has no CA while the key directory holds CA keys: the datastore was
    /// lost or replaced, and silently making a new CA would break every relying party.
    #[error(
        "the datastore has no CA but {} holds {count} CA key(s) (was the datastore lost or \
         replaced?): restore it, or start once with --reset-ca to delete those keys and \
         make a new CA",
        dir.display()
    )]
    OrphanCaKeys {
        /// The key directory.
        dir: std::path::PathBuf,
        /// How many CA keys it holds.
        count: usize,
    },
}

/// Everything a running server holds.
#[derive(Debug)]
pub struct ServerState {
    /// The validated configuration.
    pub config: ServerConfig,
    /// The registration store.
    pub store: SharedStore,
    /// The CA.
    pub ca: Arc<CertificateAuthority>,
    /// The clock.
    pub clock: SharedClock,
    /// Bumped whenever entries or bundles may have changed; agents re-sync on it.
    changes: tokio::sync::watch::Sender<u64>,
    /// Spawn buckets per root parent workload (`config.spawn_rate`).
    spawns: crate::rate_limit::RateLimiter,
    /// Wakes the federation refresher when a relationship changed.
    federation_wake: Arc<tokio::sync::Notify>,
    /// This server's metrics (served on its operations listener, [`crate::ops`]).
    pub metrics: Arc<crate::ops::metrics::ServerMetrics>,
    /// The revocations in force: no SVID is signed for a workload they cover.
    pub revocations: Arc<revoked::Revocations>,
}

impl ServerState {
    /// Opens the store and key manager and loads (or, on first start, creates) the CA.
    ///
    /// # Errors
    /// [`ServerError`] naming the part that failed.
    pub async fn open(config: ServerConfig, clock: SharedClock) -> Result<Arc<Self>, ServerError> {
        let store: SharedStore = Arc::new(CachedStore::new(config.datastore.open().await?).await?);
        let keys: SharedKeyManager = match config.key_manager {
            KeyManagerKind::Disk => {
                let disk = DiskKeyManager::open(&config.data_dir.join("keys"))?;
                check_orphan_ca_keys(&disk, store.as_ref(), config.reset_ca).await?;
                Arc::new(disk)
            }
            KeyManagerKind::Memory => Arc::new(MemoryKeyManager::new()),
        };
        Self::with_parts(config, clock, store, keys).await
    }

    /// Builds the state from an already opened store and key manager.
    ///
    /// # Errors
    /// [`ServerError::Ca`] if the CA cannot be loaded.
    pub async fn with_parts(
        config: ServerConfig,
        clock: SharedClock,
        store: SharedStore,
        keys: SharedKeyManager,
    ) -> Result<Arc<Self>, ServerError> {
        check_trust_domain(store.as_ref(), &config.trust_domain).await?;
        let ca = Arc::new(
            CertificateAuthority::load(config.ca.clone(), clock.clone(), keys, store.clone())
                .await?,
        );
        let (changes, _) = tokio::sync::watch::channel(0);
        // Bundle rotations are changes agents must hear about too.
        let mut bundles = ca.subscribe();
        let forward = changes.clone();
        tokio::spawn(async move {
            while bundles.changed().await.is_ok() {
                forward.send_modify(|g| *g += 1);
            }
        });
        tokio::spawn(follow_store(
            store.changes(),
            Arc::downgrade(&ca),
            changes.clone(),
        ));
        let revocations = Arc::new(revoked::Revocations::default());
        revocations
            .refresh(store.as_ref(), clock.unix_seconds(), true)
            .await?;
        tokio::spawn(revoked::follow(
            store.changes(),
            Arc::downgrade(&store),
            Arc::downgrade(&revocations),
            clock.clone(),
            changes.clone(),
        ));
        Ok(Arc::new(Self {
            config,
            store,
            ca,
            spawns: crate::rate_limit::RateLimiter::new(clock.clone()),
            clock,
            changes,
            federation_wake: Arc::new(tokio::sync::Notify::new()),
            metrics: Arc::new(crate::ops::metrics::ServerMetrics::new()),
            revocations,
        }))
    }

    /// Takes one spawn from the bucket of `root` (a root parent workload's SPIFFE ID),
    /// or says how long until one is available.
    ///
    /// # Errors
    /// The wait before a spawn may succeed.
    pub fn take_spawn(&self, root: &str) -> Result<(), std::time::Duration> {
        let taken = self.spawns.check(root, self.config.spawn_rate);
        if taken.is_err() {
            self.metrics.spawn_rate_limited();
        }
        taken
    }

    /// Whether the server is ready: its CA holds an unexpired active X.509 and JWT
    /// authority (`keys`), the bundle it serves has an X.509 authority (`identity`), and
    /// the store answers (`store`). `/readyz` and the admin API's `Health` (what
    /// `writ healthcheck` asks) both answer from this.
    pub async fn readiness(&self) -> crate::ops::Readiness {
        use crate::ops::Check;
        let now = self.clock.now();
        let active = |kind: &str| {
            self.ca
                .authorities()
                .iter()
                .any(|(k, _, state, not_after)| {
                    k == kind && *state == crate::ca::SlotState::Active && *not_after > now
                })
        };
        let keys = match (active("x509"), active("jwt")) {
            (true, true) => Check::pass("keys"),
            (x509, _) => Check::fail(
                "keys",
                format!(
                    "no unexpired active {} authority is loaded",
                    if x509 { "JWT" } else { "X.509" }
                ),
            ),
        };
        let identity = if self.ca.bundle().x509_authorities().is_empty() {
            Check::fail("identity", "the trust bundle has no X.509 authority")
        } else {
            Check::pass("identity")
        };
        let store = Check::of("store", self.store.count_entries().await);
        crate::ops::Readiness::new(vec![identity, store, keys])
    }

    /// The operations listener's content for this server: its metrics (the CA slot
    /// expiry and entry gauges refreshed at each scrape) and [`Self::readiness`].
    pub fn ops(self: &Arc<Self>) -> crate::ops::Ops {
        let ready = self.clone();
        let refresh = Arc::downgrade(self);
        crate::ops::Ops::new(
            self.metrics.registry(),
            Arc::new(move || {
                let state = ready.clone();
                Box::pin(async move { state.readiness().await })
            }),
        )
        .with_refresh(Arc::new(move || {
            let state = refresh.clone();
            Box::pin(async move {
                let Some(state) = state.upgrade() else { return };
                let now = state.clock.now();
                state
                    .metrics
                    .set_ca_slots(state.ca.authorities().into_iter().map(
                        |(kind, _, slot, not_after)| {
                            let left = not_after
                                .duration_since(now)
                                .map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64());
                            let kind = if kind == "jwt" { "jwt" } else { "x509" };
                            let slot = match slot {
                                crate::ca::SlotState::Prepared => "prepared",
                                crate::ca::SlotState::Active => "active",
                                crate::ca::SlotState::Old => "old",
                            };
                            (kind, slot, left)
                        },
                    ));
                if let Ok(n) = state.store.count_entries().await {
                    state
                        .metrics
                        .entries
                        .set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            })
        }))
    }

    /// Tells agents that entries or bundles may have changed.
    pub fn notify_change(&self) {
        self.changes.send_modify(|g| *g += 1);
    }

    /// Tells the federation refresher that relationships changed (it fetches them all
    /// again at once).
    pub fn wake_federation(&self) {
        self.federation_wake.notify_waiters();
    }

    /// What [`Self::wake_federation`] notifies.
    pub fn federation_wake(&self) -> Arc<tokio::sync::Notify> {
        self.federation_wake.clone()
    }

    /// A receiver of change notifications (the value is a generation counter).
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// The trust domain `store` serves: the one recorded at its first start, or, for a store
/// from before it was recorded, the one its CA signs for; `None` for a new store.
///
/// # Errors
/// [`ServerError::Store`] or [`ServerError::Ca`] if the store cannot be read.
pub async fn recorded_trust_domain(store: &dyn Store) -> Result<Option<String>, ServerError> {
    Ok(match store.fetch_trust_domain().await? {
        Some(td) => Some(td),
        None => crate::ca::journal_trust_domain(store).await?,
    })
}

/// Refuses a store that serves another trust domain than `configured`, and records
/// `configured` in a new one. The record is a write, so a store that cannot be written
/// fails here, at start, rather than at the first entry or rotation.
async fn check_trust_domain(
    store: &dyn Store,
    configured: &TrustDomain,
) -> Result<(), ServerError> {
    let mismatch = |recorded: String| ServerError::TrustDomainMismatch {
        recorded,
        configured: configured.to_string(),
    };
    if let Some(recorded) = recorded_trust_domain(store).await?
        && recorded != configured.as_str()
    {
        return Err(mismatch(recorded));
    }
    // Another server may have recorded one meanwhile: the store's answer is final.
    let recorded = store.record_trust_domain(configured.as_str()).await?;
    if recorded != configured.as_str() {
        return Err(mismatch(recorded));
    }
    Ok(())
}

/// Refuses to start when the datastore has no CA while the key directory holds CA keys
/// (the datastore was lost or replaced: a silent new CA would break every relying
/// party); with `reset`, deletes those keys so that a new CA is made.
async fn check_orphan_ca_keys(
    keys: &DiskKeyManager,
    store: &dyn Store,
    reset: bool,
) -> Result<(), ServerError> {
    if !store.list_journal().await?.is_empty() {
        return Ok(());
    }
    let orphans: Vec<String> = keys
        .ids()?
        .into_iter()
        .filter(|id| id.starts_with(crate::ca::CA_KEY_PREFIX))
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    if !reset {
        return Err(ServerError::OrphanCaKeys {
            dir: keys.dir().to_path_buf(),
            count: orphans.len(),
        });
    }
    for id in &orphans {
        keys.delete(id)?;
    }
    tracing::warn!(
        count = orphans.len(),
        dir = %keys.dir().display(),
        "--reset-ca: deleted CA keys the datastore no longer knew; a new CA is made"
    );
    Ok(())
}

/// Binds a Unix socket at `path` with permission bits `mode`, replacing a stale socket
/// and creating the parent directory (0755) if needed. Anything else at `path` (a
/// regular file, a directory, a symlink) is an error and is left untouched.
///
/// # Errors
/// The I/O error, with the path.
pub fn bind_unix_socket(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, ServerError> {
    let err = |source| ServerError::Socket {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(err)?;
        set_mode(dir, 0o755).map_err(err)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a socket is ever removed: a file, directory or symlink there is someone
        // else's (or a mistyped path) and is left alone.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it or choose another path",
            )));
        }
        // A socket nobody answers on is stale; a live one means another server runs.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is serving on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    set_mode(path, mode).map_err(err)?;
    Ok(listener)
}

/// Serves the admin API on the configured socket (mode 0600) and the node API for agents
/// on the configured address (mTLS), and rotates the CA every [`ROTATION_INTERVAL`],
/// until `shutdown` completes; then removes the socket.
///
/// # Errors
/// [`ServerError`] if a socket cannot be bound or a server fails.
pub async fn serve(
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let socket = state.config.admin_socket.clone();
    let listener = bind_unix_socket(&socket, 0o600)?;
    let node_listener = match state.config.bind_address {
        Some(addr) => Some(node_service::bind(addr).await?),
        None => None,
    };
    let rotation = tokio::spawn(rotation_loop(state.ca.clone()));
    let refresher = tokio::spawn(federation::refresh::run(
        state.clone(),
        state.config.federation.limits,
    ));
    let bundle_endpoint = match &state.config.federation.bundle_endpoint {
        Some(endpoint) => {
            // Unusable https_web files stop the start, not only the endpoint.
            if let federation::endpoint::EndpointProfile::HttpsWeb {
                cert_file,
                key_file,
            } = &endpoint.profile
            {
                federation::endpoint::web_tls(cert_file, key_file)?;
            }
            let listener = node_service::bind(endpoint.address).await?;
            Some(tokio::spawn(federation::endpoint::serve_for(
                state.clone(),
                listener,
                endpoint.profile.clone(),
                std::future::pending(),
            )))
        }
        None => None,
    };
    let _ops = match &state.config.ops {
        Some(config) => Some(crate::ops::start(config, crate::ops::router(state.ops())).await?),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let discovery_task = match (&state.config.oidc_discovery, &state.config.ca.jwt_issuer) {
        (Some(d), Some(issuer)) => {
            let listener = oidc_discovery::bind(d).await?;
            let router = oidc_discovery::router(issuer, state.ca.subscribe());
            let config = d.clone();
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(async move {
                oidc_discovery::serve(&config, listener, router, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
            }))
        }
        _ => None,
    };
    let node_task = node_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(address = %addr, "node API (mTLS) ready");
        }
        let mut stop = stop_rx.clone();
        tokio::spawn(node_service::serve_node_api(state.clone(), l, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    tracing::info!(
        trust_domain = %state.config.trust_domain,
        admin_socket = %socket.display(),
        "identity server ready"
    );
    let result = tonic::transport::Server::builder()
        .add_service(admin::AdminServer::new(admin::AdminService::new(
            state.clone(),
        )))
        .serve_with_incoming_shutdown(
            crate::accept::unix_incoming(listener, "admin API"),
            shutdown,
        )
        .await;
    let _ = stop_tx.send(true);
    if let Some(t) = node_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    if let Some(t) = discovery_task
        && let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), t).await
    {
        tracing::error!(error = %e, "OIDC discovery failed");
    }
    rotation.abort();
    refresher.abort();
    if let Some(t) = bundle_endpoint {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket);
    result?;
    Ok(())
}

/// Follows the store's change events (other servers' writes as well as this one's):
/// entry changes wake the agents' change streams; journal and bundle changes make the
/// CA read the other servers' authorities and publish the new union at once (which
/// wakes the agents too). Agent record changes wake nobody: each renewal is one, and
/// the node API reads the record at every call. Events that arrive together are
/// handled once. Ends with the CA or the store.
async fn follow_store(
    mut events: tokio::sync::broadcast::Receiver<crate::store::StoreChange>,
    ca: std::sync::Weak<CertificateAuthority>,
    agents: tokio::sync::watch::Sender<u64>,
) {
    use crate::store::StoreChange;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        let first = match events.recv().await {
            Ok(change) => change,
            Err(RecvError::Lagged(_)) => StoreChange::Resync,
            Err(RecvError::Closed) => return,
        };
        let kind = |change: &StoreChange| match change {
            StoreChange::Agent(_) => (false, false),
            StoreChange::Entry(_) => (true, false),
            StoreChange::Revocation => (false, false),
            _ => (true, true),
        };
        let (mut entries, mut authorities) = kind(&first);
        loop {
            let (e, a) = match events.try_recv() {
                Ok(change) => kind(&change),
                Err(TryRecvError::Lagged(_)) => (true, true),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            };
            entries |= e;
            authorities |= a;
        }
        if authorities {
            let Some(ca) = ca.upgrade() else { return };
            // A changed bundle reaches the agents through the CA's own subscription.
            if let Err(e) = ca.rotate().await {
                tracing::warn!(error = %e, "could not follow the other servers' authorities; will retry");
            }
        }
        if entries {
            agents.send_modify(|g| *g += 1);
        }
    }
}

async fn rotation_loop(ca: Arc<CertificateAuthority>) {
    let mut tick = tokio::time::interval(ROTATION_INTERVAL);
    loop {
        tick.tick().await;
        if let Err(e) = ca.rotate().await {
            tracing::error!(error = %e, "CA rotation failed; will retry");
        }
    }
}
