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
pub mod lease;
pub mod node;
pub mod node_service;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::{CaError, CertificateAuthority};
use crate::clock::SharedClock;
use crate::key_manager::{DiskKeyManager, KeyError, MemoryKeyManager, SharedKeyManager, set_mode};
use crate::store::{SharedStore, StoreError};
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
    /// The gRPC server failed.
    #[error("admin API: {0}")]
    Transport(#[from] tonic::transport::Error),
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
}

impl ServerState {
    /// Opens the store and key manager and loads (or, on first start, creates) the CA.
    ///
    /// # Errors
    /// [`ServerError`] naming the part that failed.
    pub async fn open(config: ServerConfig, clock: SharedClock) -> Result<Arc<Self>, ServerError> {
        let store = config.datastore.open().await?;
        let keys: SharedKeyManager = match config.key_manager {
            KeyManagerKind::Disk => Arc::new(DiskKeyManager::open(&config.data_dir.join("keys"))?),
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
        Ok(Arc::new(Self {
            config,
            store,
            ca,
            spawns: crate::rate_limit::RateLimiter::new(clock.clone()),
            clock,
            changes,
        }))
    }

    /// Takes one spawn from the bucket of `root` (a root parent workload's SPIFFE ID),
    /// or says how long until one is available.
    ///
    /// # Errors
    /// The wait before a spawn may succeed.
    pub fn take_spawn(&self, root: &str) -> Result<(), std::time::Duration> {
        self.spawns.check(root, self.config.spawn_rate)
    }

    /// Tells agents that entries or bundles may have changed.
    pub fn notify_change(&self) {
        self.changes.send_modify(|g| *g += 1);
    }

    /// A receiver of change notifications (the value is a generation counter).
    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
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
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
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
    rotation.abort();
    let _ = std::fs::remove_file(&socket);
    result?;
    Ok(())
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
