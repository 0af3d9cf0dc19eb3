//! `writ server run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use writ_identity::clock::SystemClock;
use writ_identity::server::config::{ConfigError, FileConfig, ServerConfig};
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
        /// Log format: `text` (colour only on a terminal) or `json` (one object a line).
        #[arg(long, env = "WRIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
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
        log_format,
    } = cmd;
    init_logging(&log_level, log_format)?;
    let mut file = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(ConfigError::from)
                .with_context(|| format!("{}", path.display()))?
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
    writ_identity::key_manager::create_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    // A SQLite store serves one server: a second one on the file stops here.
    let _lock = config.datastore.lock()?;
    let state = ServerState::open(config, Arc::new(SystemClock)).await?;
    super::out::errln!(
        "writ server: trust domain {}, admin socket {}, data dir {}",
        state.config.trust_domain,
        state.config.admin_socket.display(),
        state.config.data_dir.display()
    );
    server::serve(state, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// The levels a log filter may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Installs the log (standard error) with the `--log-level` / `WRIT_LOG` filter: a
/// level (`debug`) or comma-separated `target=level` directives
/// (`info,writ_identity=debug`). A word that is neither is a typo, not a target: it is
/// refused instead of silently logging nothing. Colour only when standard error is a
/// terminal and `NO_COLOR` is not set (no-color.org), so a log written to a file or a
/// pipe carries no ANSI codes.
///
/// # Errors
/// One line naming the flag and the valid levels.
pub(crate) fn init_logging(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = check_log_filter(filter)?;
    match format {
        LogFormat::Text => {
            let color = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(color)
                .try_init();
        }
        LogFormat::Json => {
            // One JSON object a line; the event's fields (`spiffe_id`, `txn`, `decision`,
            // `error`, `lease`, ...) at the top level beside `timestamp`, `level`,
            // `target` and `message`.
            let _ = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .try_init();
        }
    }
    Ok(())
}

/// `--log-format` (`WRIT_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines; ANSI colour only on a terminal.
    #[default]
    Text,
    /// One JSON object a line, with stable field names.
    Json,
}

fn check_log_filter(filter: &str) -> anyhow::Result<tracing_subscriber::EnvFilter> {
    let refuse = |what: &str| {
        anyhow::anyhow!(
            "--log-level (or WRIT_LOG): {what:?} is not a log level; use one of {} \
             or target=level (e.g. info,writ_identity=debug)",
            LEVELS.join(", ")
        )
    };
    for directive in filter.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(refuse(directive)),
            None => directive,
        };
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(refuse(directive));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| refuse(&format!("{filter} ({e})")))
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

#[cfg(test)]
mod tests {
    use super::check_log_filter;

    #[test]
    fn a_typo_in_the_log_filter_is_refused() {
        for good in [
            "info",
            "DEBUG",
            "warn,writ_identity=debug",
            "writ_txn_service=trace",
        ] {
            assert!(check_log_filter(good).is_ok(), "{good}");
        }
        for bad in ["debgu", "", "info,", "writ_identity=verbose", "=debug"] {
            let err = check_log_filter(bad).unwrap_err().to_string();
            assert!(err.starts_with("--log-level"), "{err}");
            assert!(
                err.contains("trace, debug, info, warn, error, off"),
                "{err}"
            );
        }
    }
}
