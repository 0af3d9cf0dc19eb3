//! `writ agent run|children|list|show|evict|ban`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use writ_identity::agent::config::{AgentConfig, FileConfig, FileServerAddress};
use writ_identity::agent::node_client::GrpcNode;
use writ_identity::attest::workload::k8s::K8sAttestor;
use writ_identity::attest::workload::{Attestors, DockerAttestor, UnixAttestor};
use writ_identity::proto::admin as pb;

use super::api::AgentSocket;
use super::out::{self, OutputArg, outln};
use super::server::{LogFormat, init_logging, shutdown_signal};
use super::{ServerSocket, status};
use writ_sdk::spawn::SubAgents;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum AgentCommand {
    /// Run the agent: join the server, serve the Workload API until Ctrl-C.
    Run {
        /// Path to agent.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A join token from `writ token generate` (first start only).
        #[arg(long, env = "WRIT_JOIN_TOKEN")]
        join_token: Option<String>,
        /// Read the join token from this file (first start only; what `writ token
        /// generate --out-dir` writes). A missing file is an error only when the agent
        /// has no SVID yet.
        #[arg(long, value_name = "FILE", conflicts_with = "join_token")]
        join_token_file: Option<PathBuf>,
        /// Overrides `server_address`: `host:port` of a server's node API. Repeat it to
        /// give every server of the trust domain (up to 16); the agent tries them in turn
        /// and fails over when its server goes away.
        #[arg(long, value_name = "HOST:PORT")]
        server_address: Vec<String>,
        /// Overrides `trust_domain`.
        #[arg(long)]
        trust_domain: Option<String>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `socket_path`.
        #[arg(long)]
        socket_path: Option<PathBuf>,
        /// Overrides `trust_bundle_path`.
        #[arg(long)]
        trust_bundle: Option<PathBuf>,
        /// DANGEROUS: trust any server on first contact.
        #[arg(long)]
        insecure_bootstrap: bool,
        /// Log filter.
        #[arg(long, env = "WRIT_LOG", default_value = "info")]
        log_level: String,
        /// Log format: `text` (colour only on a terminal) or `json` (one object a line).
        #[arg(long, env = "WRIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// The sub-agent leases of this process's identities (held ones first), from the
    /// agent's Workload API socket.
    Children {
        #[command(flatten)]
        socket: AgentSocket,
        #[command(flatten)]
        output: OutputArg,
    },
    /// List attested agents.
    List {
        #[command(flatten)]
        server: ServerSocket,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one agent.
    Show {
        #[command(flatten)]
        server: ServerSocket,
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Forget an agent: it must attest again with a new join token.
    Evict {
        #[command(flatten)]
        server: ServerSocket,
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Ban an agent: refused from now on.
    Ban {
        #[command(flatten)]
        server: ServerSocket,
        /// The agent's SPIFFE ID.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

fn print_agent(a: &pb::Agent) -> anyhow::Result<()> {
    outln!("SPIFFE ID         : {}", a.spiffe_id)?;
    outln!("Attestation type  : {}", a.attestation_type)?;
    outln!("Expiration time   : {}", a.cert_expires_at)?;
    outln!("Serial number     : {}", a.cert_serial)?;
    outln!("Banned            : {}", a.banned)
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "cert_expires_at": a.cert_expires_at,
        "cert_serial": a.cert_serial,
        "banned": a.banned,
        "created_at": a.created_at,
    })
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) async fn run(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::Children { socket, output } => {
            let leases = SubAgents::connect(&socket.endpoint).await?.list().await?;
            if output.json() {
                let list = leases.iter().map(|l| {
                    serde_json::json!({
                        "lease": l.id,
                        "child_id": l.child_id.to_string(),
                        "parent_id": l.parent_id.to_string(),
                        "pid": l.pid,
                        "task": l.task,
                        "depth": l.depth,
                        "expires_at": rfc3339(l.expires_at),
                        "released_at": l.released_at.map(rfc3339),
                    })
                });
                out::json(&serde_json::Value::Array(list.collect()))?;
                return Ok(ExitCode::SUCCESS);
            }
            if leases.is_empty() {
                outln!("No sub-agents.")?;
            }
            for l in leases {
                let state = match l.released_at {
                    Some(t) => format!("released {}", rfc3339(t)),
                    None => format!("until {}", rfc3339(l.expires_at)),
                };
                outln!(
                    "{}  pid {}  depth {}  {}  lease {}",
                    l.child_id,
                    l.pid,
                    l.depth,
                    state,
                    l.id
                )?;
            }
        }
        AgentCommand::Run {
            config,
            join_token,
            join_token_file,
            server_address,
            trust_domain,
            data_dir,
            socket_path,
            trust_bundle,
            insecure_bootstrap,
            log_level,
            log_format,
        } => {
            init_logging(&log_level, log_format)?;
            let mut file = match &config {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    toml::from_str::<FileConfig>(&text)
                        .with_context(|| format!("{}", path.display()))?
                }
                None => FileConfig::default(),
            };
            let join_token = match join_token_file {
                Some(path) => read_join_token(&path)?,
                None => join_token,
            };
            file.join_token = join_token.or(file.join_token);
            if !server_address.is_empty() {
                file.server_address = Some(FileServerAddress::Many(server_address));
            }
            file.trust_domain = trust_domain.or(file.trust_domain);
            file.data_dir = data_dir.or(file.data_dir);
            file.socket_path = socket_path.or(file.socket_path);
            file.trust_bundle_path = trust_bundle.or(file.trust_bundle_path);
            file.insecure_bootstrap |= insecure_bootstrap;
            let config = AgentConfig::try_from(file)?;
            let node = GrpcNode::connect(config.node.clone()).await?;
            let agent_id = writ_identity::agent::node_api::NodeApi::agent_id(node.as_ref()).clone();
            let mut attestors = Attestors::new().with("unix", Arc::new(UnixAttestor::default()));
            if let Some(docker) = config.docker.clone() {
                tracing::info!(socket = %docker.socket_path.display(), timeout = ?docker.timeout,
                    env_allow = ?docker.env_allow, "docker workload attestor on");
                attestors = attestors.with("docker", Arc::new(DockerAttestor::new(docker)));
            }
            if let Some(k8s) = config.k8s.clone() {
                let k8s = K8sAttestor::new(k8s).context("[workload_attestors.k8s]")?;
                attestors = attestors.with("k8s", Arc::new(k8s));
            }
            tracing::info!(attestors = ?attestors.names(), "workload attestors");
            let running =
                writ_identity::agent::start(node, &config.socket_path, Arc::new(attestors)).await?;
            let _ops = match &config.ops {
                Some(ops) => Some(
                    writ_identity::ops::start(
                        ops,
                        writ_identity::ops::router(writ_identity::agent::health::ops(
                            &running.cache,
                        )),
                    )
                    .await?,
                ),
                None => None,
            };
            let stop = shutdown_signal();
            out::errln!(
                "writ agent: {} joined {}; Workload API on unix://{}",
                agent_id,
                config.node.server_addresses,
                running.socket.display()
            );
            stop.await;
            drop(running);
        }
        AgentCommand::List { server, output } => {
            let agents = server
                .connect()
                .await?
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .agents;
            if output.json() {
                out::json(&serde_json::Value::Array(
                    agents.iter().map(agent_json).collect(),
                ))?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!(
                "Found {} attested agent{}",
                agents.len(),
                if agents.len() == 1 { "" } else { "s" }
            )?;
            for a in &agents {
                outln!()?;
                print_agent(a)?;
            }
        }
        AgentCommand::Show {
            server,
            spiffe_id,
            output,
        } => {
            let a = server
                .connect()
                .await?
                .get_agent(pb::AgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            if output.json() {
                out::json(&agent_json(&a))?;
            } else {
                print_agent(&a)?;
            }
        }
        AgentCommand::Evict {
            server,
            spiffe_id,
            output,
        } => {
            let a = server
                .connect()
                .await?
                .evict_agent(pb::AgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            if output.json() {
                out::json(&agent_json(&a))?;
            } else {
                outln!("Agent {} evicted", a.spiffe_id)?;
            }
        }
        AgentCommand::Ban {
            server,
            spiffe_id,
            output,
        } => {
            let a = server
                .connect()
                .await?
                .ban_agent(pb::AgentRequest { spiffe_id })
                .await
                .map_err(status)?
                .into_inner();
            if output.json() {
                out::json(&agent_json(&a))?;
            } else {
                outln!("Agent {} banned", a.spiffe_id)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the agent at `endpoint` (`unix:///path`) for its health
/// (`grpc.health.v1.Health/Check`); an error with the agent's one-line reason if it is
/// not serving. An agent without the health service (older) counts as healthy.
pub(crate) async fn check_health(endpoint: &str) -> anyhow::Result<()> {
    use writ_identity::agent::health::REASON_METADATA;
    use writ_identity::proto::grpc::health::v1 as health;
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint)
        .to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the agent at {endpoint}"))?;
    let response = match health::health_client::HealthClient::new(channel)
        .check(health::HealthCheckRequest::default())
        .await
    {
        Ok(r) => r,
        Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(()),
        Err(s) => anyhow::bail!("agent health check failed: {}", s.message()),
    };
    let reason = response
        .metadata()
        .get(REASON_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match response.into_inner().status() {
        health::health_check_response::ServingStatus::Serving => Ok(()),
        other => anyhow::bail!(
            "agent is unhealthy: {}",
            reason.unwrap_or_else(|| format!("status {}", other.as_str_name()))
        ),
    }
}

/// Longest join-token file read (a token is a few dozen bytes).
const MAX_JOIN_TOKEN_FILE_BYTES: u64 = 4096;

/// The join token in `path`, trimmed; `None` when the file does not exist (an agent
/// that already holds its SVID needs none, and one that does not says so itself).
fn read_join_token(path: &std::path::Path) -> anyhow::Result<Option<String>> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_JOIN_TOKEN_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_JOIN_TOKEN_FILE_BYTES {
        anyhow::bail!(
            "{}: longer than {MAX_JOIN_TOKEN_FILE_BYTES} bytes, not a join token",
            path.display()
        );
    }
    let token = text.trim();
    Ok((!token.is_empty()).then(|| token.to_owned()))
}
