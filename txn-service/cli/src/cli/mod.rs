//! The `writ` command line. Verbs follow what SPIRE users already type, in kebab-case
//! flags: `writ server run`, `writ entry create|list|show|update|delete`,
//! `writ token generate`, `writ bundle show`, `writ x509 mint`, `writ jwt mint`,
//! `writ healthcheck`, `writ agent ...`, `writ api ...`, `writ txn run|decode`,
//! `writ exchange`, `writ dev`, `writ demo`.

mod agent;
mod api;
mod audit;
mod bench;
mod bundle;
mod dev;
mod entry;
pub mod entry_data;
mod federation;
pub mod out;
mod revoke;
mod server;
mod svid;
mod svid_files;
mod txn;

/// Checks a `writ api watch --config` file (spiffe-helper's `helper.conf` keys, in TOML)
/// as `writ api watch` reads it, without touching the files it names.
///
/// # Errors
/// The text is not TOML, has unknown keys or bad values.
pub fn check_helper_conf(text: &str) -> anyhow::Result<()> {
    svid_files::HelperConf::parse(text)?
        .options(false)
        .map(drop)
}

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use writ_identity::server::admin::{self, AdminClient};
use writ_identity::server::config::DEFAULT_ADMIN_SOCKET;

use out::{OutputArg, outln};

/// Writ: attested workload identity and transaction tokens for AI agents.
#[derive(Debug, Parser)]
#[command(name = "writ", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the identity server.
    #[command(subcommand)]
    Server(server::ServerCommand),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// Node attestation join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// SPIFFE federation with other trust domains.
    #[command(subcommand)]
    Federation(federation::FederationCommand),
    /// Mint X509-SVIDs from the server.
    #[command(subcommand)]
    X509(svid::X509Command),
    /// Mint JWT-SVIDs from the server.
    #[command(subcommand)]
    Jwt(svid::JwtCommand),
    /// Run or manage agents (nodes).
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Use the SPIFFE Workload API as this process.
    #[command(subcommand)]
    Api(api::ApiCommand),
    /// Run the transaction token service, or decode a Txn-Token.
    #[command(subcommand)]
    Txn(txn::TxnCommand),
    /// The durable audit trail: verify its hash chain, show a transaction's tree.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Exchange a subject token for a Txn-Token, authenticated by this workload's SVID.
    Exchange(txn::ExchangeArgs),
    /// Run server, agent and token service in one process on embedded defaults, with a
    /// development OIDC issuer (`writ dev login` mints user tokens from it).
    Dev(dev::DevArgs),
    /// Run the end-to-end example: a user's request through a gateway, a planner and
    /// the sub-agent it spawns to a tool server, on a temporary `writ dev`.
    Demo(dev::DemoArgs),
    /// Measure throughput and latency on loopback against bounds measured in the same
    /// run (bounded in requests and time; `--json` for scripts).
    Bench(bench::BenchArgs),
    /// Check that the server (or, with --socket, the agent) answers.
    Healthcheck {
        #[command(flatten)]
        server: ServerSocket,
        /// Check the agent's Workload API socket instead of the server.
        #[arg(long = "socket")]
        agent_socket: Option<String>,
        /// Print nothing on success.
        #[arg(long)]
        shallow: bool,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Generate a single-use join token for `writ agent run --join-token`.
    Generate {
        #[command(flatten)]
        server: ServerSocket,
        /// Lifetime, e.g. 10m (default: the server's, 10m).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Make a node alias with this SPIFFE ID for the agent that uses the token
        /// (SPIRE's `token generate -spiffeID`): entries whose parent is this ID apply to
        /// that agent, so they can be written before the agent exists.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Also write what an agent needs to join into this directory: `join-token`
        /// (0600) and the trust bundle `bundle.pem` (for `writ agent run
        /// --join-token-file DIR/join-token --trust-bundle DIR/bundle.pem`). The token is
        /// then not printed.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArg,
    },
}

/// The admin socket flag every server command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerSocket {
    /// Path of the server's admin socket.
    #[arg(long = "server-socket", env = "WRIT_SERVER_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    path: PathBuf,
}

impl ServerSocket {
    async fn connect(&self) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
        admin::connect(&self.path)
            .await
            .with_context(|| format!("cannot reach the server at {}", self.path.display()))
    }
}

/// The join token's file in `writ token generate --out-dir`.
const JOIN_TOKEN_FILE: &str = "join-token";
/// The trust bundle's file in `writ token generate --out-dir`.
const BUNDLE_FILE: &str = "bundle.pem";

/// Writes `join-token` (0600) and `bundle.pem` into `dir` (made if missing), each
/// atomically, so an agent waiting for them never reads half a file.
fn write_join_files(dir: &Path, token: &str, bundle_pem: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, data: &[u8]| {
        let path = dir.join(name);
        writ_identity::key_manager::write_secret_file(&path, data)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(JOIN_TOKEN_FILE, format!("{token}\n").as_bytes())?;
    write(BUNDLE_FILE, bundle_pem.as_bytes())?;
    // The bundle is public; the agent may run as another user than this command.
    let bundle = dir.join(BUNDLE_FILE);
    std::fs::set_permissions(&bundle, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .with_context(|| format!("cannot make {} readable", bundle.display()))?;
    Ok(())
}

/// Parses a TTL flag (`90`, `90s`, `5m`, `1h`) into seconds.
fn parse_ttl(text: &str) -> Result<u64, String> {
    let d = text
        .parse::<writ_identity::duration::ConfigDuration>()
        .map_err(|e| e.to_string())?
        .get();
    if d.as_secs() == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(d.as_secs())
}

/// Turns a gRPC status into a one-line error.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command failed with, for `main` to print on one line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // One crypto backend, installed explicitly as a guard against a second one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(cmd) => server::run(cmd).await,
            Command::Entry(cmd) => entry::run(cmd).await,
            Command::Bundle(cmd) => bundle::run(cmd).await,
            Command::Federation(cmd) => federation::run(cmd).await,
            Command::X509(cmd) => svid::run_x509(cmd).await,
            Command::Jwt(cmd) => svid::run_jwt(cmd).await,
            Command::Token(TokenCommand::Generate {
                server,
                ttl,
                spiffe_id,
                out_dir,
                output,
            }) => {
                let mut client = server.connect().await?;
                let token = client
                    .generate_join_token(writ_identity::proto::admin::GenerateJoinTokenRequest {
                        ttl: ttl.unwrap_or(0),
                        spiffe_id: spiffe_id.clone().unwrap_or_default(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                if let Some(dir) = out_dir {
                    let bundle = client
                        .get_bundle(writ_identity::proto::admin::GetBundleRequest {})
                        .await
                        .map_err(status)?
                        .into_inner();
                    write_join_files(&dir, &token.token, &bundle.pem)?;
                    let token_sha256 = writ_identity::fingerprint::token(&token.token);
                    if output.json() {
                        out::json(&serde_json::json!({
                            "dir": dir.display().to_string(),
                            "token_sha256": token_sha256,
                            "alias_entry_id": token.alias_entry_id,
                        }))?;
                    } else {
                        outln!(
                            "Wrote {} and {} (token sha256 {token_sha256})",
                            dir.join(JOIN_TOKEN_FILE).display(),
                            dir.join(BUNDLE_FILE).display()
                        )?;
                    }
                } else if output.json() {
                    out::json(&serde_json::json!({
                        "token": token.token,
                        "alias_entry_id": token.alias_entry_id,
                    }))?;
                } else {
                    outln!("Token: {}", token.token)?;
                }
                if let (Some(id), false) = (&spiffe_id, output.json()) {
                    outln!("Alias: {id} (entry {})", token.alias_entry_id)?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Agent(cmd) => agent::run(cmd).await,
            Command::Api(cmd) => api::run(cmd).await,
            Command::Txn(cmd) => txn::run(cmd).await,
            Command::Audit(cmd) => audit::run(cmd).await,
            Command::Exchange(args) => txn::exchange(args).await,
            Command::Dev(args) => dev::run(args).await,
            Command::Demo(args) => dev::demo(args).await,
            Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Healthcheck {
                agent_socket: Some(endpoint),
                shallow,
                output,
                ..
            } => {
                // An agent that answers, even "no identity issued" for this caller, is up.
                let mut client = writ_sdk::workload::WorkloadClient::connect(&endpoint).await?;
                match client.fetch_x509().await {
                    Ok(_) | Err(writ_sdk::workload::WorkloadError::NoIdentity) => {}
                    Err(e) => return Err(e.into()),
                }
                // Up is not healthy: an evicted agent, or one with an expired SVID, says so.
                agent::check_health(&endpoint).await?;
                if shallow {
                } else if output.json() {
                    out::json(&serde_json::json!({ "healthy": true }))?;
                } else {
                    outln!("Agent is healthy.")?;
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Healthcheck {
                server,
                shallow,
                output,
                ..
            } => {
                let mut client = server.connect().await?;
                let health = client
                    .health(writ_identity::proto::admin::HealthRequest {})
                    .await
                    .map_err(status)?
                    .into_inner();
                if shallow {
                } else if output.json() {
                    out::json(&serde_json::json!({
                        "healthy": true,
                        "trust_domain": health.trust_domain,
                        "entries": health.entries,
                        "bundle_sequence": health.bundle_sequence,
                    }))?;
                } else {
                    outln!(
                        "Server is healthy (trust domain {}, {} entries, bundle sequence {}).",
                        health.trust_domain,
                        health.entries,
                        health.bundle_sequence
                    )?;
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
