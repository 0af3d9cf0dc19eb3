//! `writ dev`, `writ dev login` and `writ demo`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use writ_identity::spiffe_id::TrustDomain;

use super::out::{self, OutputArg, errln, outln};
use super::parse_ttl;
use super::server::{LogFormat, init_logging, shutdown_signal};
use crate::dev::demo::{self, DemoOptions};
use crate::dev::{DEFAULT_DATA_DIR, DEFAULT_TTS_LISTEN, Dev, DevOptions};

/// `writ dev`: run everything in one process on embedded defaults.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    #[command(flatten)]
    run: DevRunArgs,
}

#[derive(Debug, clap::Args)]
struct DevRunArgs {
    /// Where the store, keys, sockets and logs live (kept across restarts).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// The trust domain: `example.org` on a new data dir; left out, a restart reuses the
    /// one the data dir recorded, and another one is refused.
    #[arg(long)]
    trust_domain: Option<TrustDomain>,
    /// Start over when the datastore is gone but `keys/` still holds CA keys: delete
    /// those keys and make a new CA (relying parties must fetch the new bundle).
    #[arg(long)]
    reset_ca: bool,
    /// The token service's HTTPS address (port 0 picks a free one).
    #[arg(long, default_value = DEFAULT_TTS_LISTEN)]
    tts_listen: SocketAddr,
    /// The development OIDC issuer's HTTP address (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    oidc_listen: SocketAddr,
    /// Log filter (`info`, `debug`, `writ_identity=debug`, ...).
    #[arg(long, env = "WRIT_LOG", default_value = "warn")]
    log_level: String,
    /// Log format: `text` (colour only on a terminal) or `json` (one object a line).
    #[arg(long, env = "WRIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The SPIFFE bundle endpoint's HTTPS address (https_spiffe; port 0 picks a free
    /// one; its URL is `bundle_endpoint_url` in dev.json).
    #[arg(long, default_value = "127.0.0.1:0")]
    bundle_endpoint_listen: SocketAddr,
}

#[derive(Debug, clap::Subcommand)]
enum DevCommand {
    /// Print a user access token from the running `writ dev`'s development OIDC issuer
    /// (the token is the last line of standard output).
    Login {
        /// The data dir of the running `writ dev`.
        #[arg(long, default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The user (`sub`).
        #[arg(long)]
        user: String,
        /// Space-separated scopes.
        #[arg(long, default_value = "")]
        scope: String,
        /// Lifetime (at most 1h).
        #[arg(long, default_value = "10m", value_parser = parse_ttl)]
        ttl: u64,
        /// `json`: `{"access_token", "user", "scope", "expires_in"}`.
        #[command(flatten)]
        output: OutputArg,
    },
}

/// `writ demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Run separately built example programs (gateway, planner, sub_agent, tool_server)
    /// from this directory. Default: the ones built into `writ`.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep the temporary data dir (programs' logs, audit log) and print its path.
    #[arg(long)]
    keep: bool,
    /// Log filter for `writ dev`'s own log (standard error).
    #[arg(long, env = "WRIT_LOG", default_value = "error")]
    log_level: String,
}

pub(crate) async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(DevCommand::Login {
            data_dir,
            user,
            scope,
            ttl,
            output,
        }) => {
            let token = crate::dev::login(&data_dir, &user, &scope, Duration::from_secs(ttl))?;
            if output.json() {
                out::json(&serde_json::json!({
                    "access_token": token,
                    "user": user,
                    "scope": scope,
                    "expires_in": ttl,
                }))?;
                return Ok(ExitCode::SUCCESS);
            }
            errln!(
                "access token for {user} (scope \"{scope}\", {ttl} s) from the development issuer; \
                 exchange it with `writ exchange --subject-token <file>`"
            );
            outln!("{token}")?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let a = args.run;
            init_logging(&a.log_level, a.log_format)?;
            let mut options = DevOptions::new(a.data_dir);
            options.trust_domain = a.trust_domain;
            options.reset_ca = a.reset_ca;
            options.tts_listen = a.tts_listen;
            options.oidc_listen = a.oidc_listen;
            options.bundle_endpoint_listen = a.bundle_endpoint_listen;
            let dev = Dev::start(options).await?;
            let stop = shutdown_signal();
            // Whoever started us may stop reading standard output; that must not kill us.
            let say = |text: &str| {
                let _ = writeln!(std::io::stdout(), "{text}");
            };
            say(&dev.banner());
            stop.await;
            say("writ dev: stopping");
            dev.shutdown().await;
            say("writ dev: stopped");
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) async fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    init_logging(&args.log_level, LogFormat::Text)?;
    let outcome = demo::run(DemoOptions {
        bin_dir: args.bin_dir,
        keep: args.keep,
    })
    .await?;
    if outcome.passed() {
        outln!("demo: the delegation chain verified end to end")?;
        Ok(ExitCode::SUCCESS)
    } else {
        outln!("demo: FAILED (see the checks above)")?;
        Ok(ExitCode::FAILURE)
    }
}
