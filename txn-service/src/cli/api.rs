//! `writ api fetch x509|jwt`, `writ api validate jwt`, `writ api watch`: the Workload
//! API from the command line, as `spire-agent api` does; `writ api spawn`: a program as
//! a sub-agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use writ_identity::key_manager::{set_mode, write_secret_file};
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::spawn::{Spawn, TXN_TOKEN_ENV};
use writ_sdk::workload::{DEFAULT_ENDPOINT, ENDPOINT_ENV, WorkloadClient, X509Context};

/// The Workload API socket flag every `writ api` command takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AgentSocket {
    /// Workload API socket (`unix:///path` or a path).
    #[arg(long = "socket", env = ENDPOINT_ENV, default_value = DEFAULT_ENDPOINT)]
    pub(crate) endpoint: String,
}

impl AgentSocket {
    pub(crate) async fn connect(&self) -> anyhow::Result<WorkloadClient> {
        Ok(WorkloadClient::connect(&self.endpoint).await?)
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ApiCommand {
    /// Fetch SVIDs.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate with the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Print every X509-SVID update (rotation) until Ctrl-C.
    Watch {
        #[command(flatten)]
        socket: AgentSocket,
    },
    /// Run a program as a sub-agent of this process: it gets its own short-lived
    /// identity `<this identity>/sub/<name>-<hex>` (and `WRIT_TXN_TOKEN` if set here),
    /// released when it exits. Exits with the program's status.
    Spawn {
        #[command(flatten)]
        socket: AgentSocket,
        /// Task name, `[a-z0-9-]{1,32}`.
        #[arg(long)]
        name: String,
        /// Lifetime asked for, e.g. `5m` (capped by the spawn policy; default: the cap).
        #[arg(long)]
        ttl: Option<String>,
        /// Which of this process's identities is the parent, when it has several.
        #[arg(long)]
        parent: Option<String>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum FetchCommand {
    /// This process's X509-SVIDs and bundle.
    X509 {
        #[command(flatten)]
        socket: AgentSocket,
        /// Write svid.N.pem, svid.N.key (0600) and bundle.N.pem here.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// A JWT-SVID for an audience.
    Jwt {
        #[command(flatten)]
        socket: AgentSocket,
        /// Audience; repeat for several.
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Only this identity.
        #[arg(long)]
        spiffe_id: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ValidateCommand {
    /// Validate a JWT-SVID for an audience.
    Jwt {
        #[command(flatten)]
        socket: AgentSocket,
        /// The audience the token must name.
        #[arg(long)]
        audience: String,
        /// The token.
        #[arg(long)]
        svid: String,
    },
}

fn pem(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| ::pem::encode(&::pem::Pem::new(tag, d.clone())))
        .collect()
}

fn print_x509(ctx: &X509Context) {
    println!(
        "Received {} svid{}",
        ctx.svids.len(),
        if ctx.svids.len() == 1 { "" } else { "s" }
    );
    for s in &ctx.svids {
        println!();
        println!("SPIFFE ID:       {}", s.spiffe_id);
        if let Some(leaf) = s.cert_chain.first()
            && let Ok(v) = writ_identity::svid::x509::check_leaf(leaf)
        {
            println!(
                "SVID valid until {}",
                humantime::format_rfc3339_seconds(v.expires_at)
            );
        }
        println!("Intermediates:   {}", s.cert_chain.len().saturating_sub(1));
        println!("CA certificates: {}", s.bundle.len());
        if !s.hint.is_empty() {
            println!("Hint:            {}", s.hint);
        }
    }
}

fn write_x509(dir: &Path, ctx: &X509Context) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (i, s) in ctx.svids.iter().enumerate() {
        let public = |name: String, text: String| -> anyhow::Result<()> {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(set_mode(&path, 0o644)?)
        };
        public(format!("svid.{i}.pem"), pem("CERTIFICATE", &s.cert_chain))?;
        public(format!("bundle.{i}.pem"), pem("CERTIFICATE", &s.bundle))?;
        let key = zeroize::Zeroizing::new(pem("PRIVATE KEY", std::slice::from_ref(&s.private_key)));
        write_secret_file(&dir.join(format!("svid.{i}.key")), key.as_bytes())?;
        println!(
            "Writing SVID #{i} to {}",
            dir.join(format!("svid.{i}.pem")).display()
        );
    }
    Ok(())
}

pub(crate) async fn run(cmd: ApiCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 { socket, write }) => {
            let ctx = socket.connect().await?.fetch_x509().await?;
            print_x509(&ctx);
            if let Some(dir) = write {
                write_x509(&dir, &ctx)?;
            }
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            socket,
            audience,
            spiffe_id,
        }) => {
            let id = spiffe_id.as_deref().map(SpiffeId::new).transpose()?;
            let svids = socket
                .connect()
                .await?
                .fetch_jwt(&audience, id.as_ref())
                .await?;
            for (id, token) in svids {
                println!("token({id}):\n\t{token}");
            }
        }
        ApiCommand::Validate(ValidateCommand::Jwt {
            socket,
            audience,
            svid,
        }) => {
            let (id, claims) = socket
                .connect()
                .await?
                .validate_jwt(&audience, &svid)
                .await?;
            println!("SVID is valid.");
            println!("SPIFFE ID : {id}");
            println!("Claims    : {claims}");
        }
        ApiCommand::Spawn {
            socket,
            name,
            ttl,
            parent,
            command,
        } => return spawn(socket, name, ttl, parent, command).await,
        ApiCommand::Watch { socket } => {
            let mut watch = socket.connect().await?.watch_x509().await?;
            loop {
                tokio::select! {
                    next = watch.next() => print_x509(&next?),
                    () = super::server::shutdown_signal() => break,
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn spawn(
    socket: AgentSocket,
    name: String,
    ttl: Option<String>,
    parent: Option<String>,
    command: Vec<std::ffi::OsString>,
) -> anyhow::Result<ExitCode> {
    let (program, args) = command
        .split_first()
        .context("a program to run is required after `--`")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let mut spawn = Spawn::new(name, cmd).endpoint(socket.endpoint);
    if let Some(ttl) = ttl {
        spawn = spawn.ttl(
            writ_identity::server::config::parse_duration(&ttl)
                .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?,
        );
    }
    if let Some(parent) = parent {
        spawn = spawn.parent(SpiffeId::new(&parent).context("--parent")?);
    }
    if let Ok(token) = std::env::var(TXN_TOKEN_ENV) {
        spawn = spawn.txn_token(token);
    }
    let mut child = spawn.spawn().await?;
    let lease = child.lease();
    eprintln!(
        "writ: sub-agent {} (pid {}, lease {}, depth {}) until {}",
        lease.child_id,
        lease.pid,
        lease.id,
        lease.depth,
        humantime::format_rfc3339_seconds(lease.expires_at)
    );
    let status = child.wait().await?;
    Ok(match status.code() {
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::from(128),
    })
}
