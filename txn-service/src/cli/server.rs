//! `writ server run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use writ_identity::clock::SystemClock;
use writ_identity::server::config::{FileConfig, ServerConfig};
use writ_identity::server::{self, ServerState};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ServerCommand {
    /// Run the identity server (CA, registration store, admin API) until Ctrl-C.
    Run {
        /// Path to server.toml (defaults apply to everything it leaves out).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `trust_domain`. A data dir keeps the trust domain of its first
        /// start: another one is refused.
        #[arg(long)]
        trust_domain: Option<String>,
        /// Start over when the datastore has no CA but `<data_dir>/keys` holds CA keys
        /// (the datastore was lost or replaced): delete those keys and make a new CA.
        /// Without it such a start is refused.
        #[arg(long)]
        reset_ca: bool,
        /// Overrides `admin_socket`.
        #[arg(long = "server-socket", env = "WRIT_SERVER_SOCKET")]
        admin_socket: Option<PathBuf>,
        /// Overrides `bind_address`, the node API agents call (`""` disables it).
        #[arg(long)]
        bind_address: Option<String>,
        /// Log filter (`info`, `debug`, `writ_identity=debug`, ...).
        #[arg(long, env = "WRIT_LOG", default_value = "info")]
        log_level: String,
    },
}

pub(crate) async fn run(cmd: ServerCommand) -> anyhow::Result<ExitCode> {
    let ServerCommand::Run {
        config,
        data_dir,
        trust_domain,
        reset_ca,
        admin_socket,
        bind_address,
        log_level,
    } = cmd;
    init_logging(&log_level);
    let mut file = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str::<FileConfig>(&text).with_context(|| format!("{}", path.display()))?
        }
        None => FileConfig::default(),
    };
    if data_dir.is_some() {
        file.data_dir = data_dir;
    }
    if trust_domain.is_some() {
        file.trust_domain = trust_domain;
    }
    if admin_socket.is_some() {
        file.admin_socket = admin_socket;
    }
    if bind_address.is_some() {
        file.bind_address = bind_address;
    }
    let mut config = ServerConfig::try_from(file)?;
    config.reset_ca = reset_ca;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let state = ServerState::open(config, Arc::new(SystemClock)).await?;
    eprintln!(
        "writ server: trust domain {}, admin socket {}, data dir {}",
        state.config.trust_domain,
        state.config.admin_socket.display(),
        state.config.data_dir.display()
    );
    server::serve(state, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives right after a
/// "ready" line is not lost (nor kills the process with the default disposition).
pub(crate) fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async move {
        tokio::select! {
            () = recv(interrupt.as_mut()) => {},
            () = recv(terminate.as_mut()) => {},
        }
    }
}

async fn recv(signal: Option<&mut tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
