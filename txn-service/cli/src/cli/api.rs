//! `writ api fetch x509|jwt`, `writ api validate jwt`, `writ api watch`: the Workload
//! API from the command line, as `spire-agent api` does; `writ api spawn`: a program as
//! a sub-agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use writ_identity::key_manager::{set_mode, write_secret_file};
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::spawn::{SUBAGENT_PID_ENV, Spawn, TXN_TOKEN_ENV};
use writ_sdk::workload::{ENDPOINT_ENV, WorkloadClient, WorkloadError, X509Context};

use super::out::{self, OutputArg, errln, outln};

/// The socket the CLI talks to when neither `--socket` nor `SPIFFE_ENDPOINT_SOCKET` names
/// one: the agent's default socket (`writ_identity::agent::DEFAULT_SOCKET`). The SDK has
/// no such default; the command line keeps one for convenience.
pub(crate) const DEFAULT_AGENT_SOCKET: &str = "unix:///tmp/writ/agent.sock";

/// The Workload API socket flag every `writ api` command takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AgentSocket {
    /// Workload API socket (`unix:///path` or a path).
    #[arg(long = "socket", env = ENDPOINT_ENV, default_value = DEFAULT_AGENT_SOCKET)]
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
    /// Print every X509-SVID update (rotation) until Ctrl-C; with `--write DIR`, keep
    /// SVID, key, bundle (and JWT-SVID) files in DIR fresh for software that reads
    /// files, and reload it after each change (docs/helper.md).
    Watch {
        #[command(flatten)]
        socket: AgentSocket,
        /// `json` prints one compact JSON array per update, one per line (with
        /// `--write`: one object per write, with `files`, `serial`, `write_us`, `reload`).
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        write: WatchWrite,
    },
    /// Run a program as a sub-agent of this process: it gets its own short-lived
    /// identity `<this identity>/sub/<name>-<hex>` (and `WRIT_TXN_TOKEN` if set here),
    /// released when it exits. Exits with the program's status. The identity is bound to
    /// that one process: a shell wrapper must `exec` the command that uses it
    /// (`sh -c 'cd /x && exec writ api fetch x509'`); what the shell forks gets nothing.
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

/// `writ api watch --write` and what goes with it.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WatchWrite {
    /// Write svid.N.pem, svid.N.key (0600), svid.N.combined.pem (0600), bundle.N.pem and
    /// federated_bundle.<td>.pem here, atomically, at first issue and at every rotation.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Also write `jwt_svid.<audience>.token` (0600) for this audience, refreshed at
    /// half its lifetime; repeat for several.
    #[arg(long = "jwt-audience", requires = "write")]
    jwt_audience: Vec<String>,
    /// Run this after every write: a program and its arguments split on spaces, no
    /// shell (e.g. `"nginx -s reload"`). Its failure is logged, not fatal.
    #[arg(long, requires = "write", conflicts_with_all = ["signal_pid", "pid_file"])]
    reload_cmd: Option<String>,
    /// Run `--reload-cmd` with `sh -c` instead (quotes, pipes).
    #[arg(long, requires = "reload_cmd")]
    reload_shell: bool,
    /// Longest run of `--reload-cmd`; it is killed then.
    #[arg(long, default_value = "30s", requires = "reload_cmd")]
    reload_timeout: String,
    /// Send `--signal` to this process after every write.
    #[arg(long, requires = "write", conflicts_with = "pid_file")]
    signal_pid: Option<i32>,
    /// Send `--signal` to the process whose pid this file holds (read at every write).
    #[arg(long, requires = "write")]
    pid_file: Option<PathBuf>,
    /// The signal for `--signal-pid`/`--pid-file`.
    #[arg(long, default_value = "HUP")]
    signal: String,
    /// Write once and exit (spiffe-helper's `daemon_mode = false`).
    #[arg(long, requires = "write")]
    once: bool,
    /// Read the settings from this file instead (spiffe-helper's `helper.conf` keys,
    /// TOML syntax: `cert_dir`, `svid_file_name`, `cmd`, `cmd_args`, `jwt_svids`, ...).
    #[arg(long, conflicts_with_all = ["write", "jwt_audience", "reload_cmd", "signal_pid", "pid_file", "once"])]
    config: Option<PathBuf>,
}

impl WatchWrite {
    fn options(
        self,
        socket: &mut AgentSocket,
        json: bool,
    ) -> anyhow::Result<Option<super::svid_files::WriteOptions>> {
        use super::svid_files::{
            HelperConf, Notify, PidSource, WriteOptions, jwt_file_name, parse_signal,
        };
        if let Some(path) = &self.config {
            let mut conf = HelperConf::read(path)?;
            if let Some(address) = conf.agent_address.take() {
                socket.endpoint = if address.contains("://") {
                    address
                } else {
                    format!("unix://{address}")
                };
            }
            return Ok(Some(conf.options(json)?));
        }
        let Some(dir) = self.write else {
            return Ok(None);
        };
        let notify = match (self.reload_cmd, self.signal_pid, self.pid_file) {
            (Some(cmd), _, _) => {
                let timeout = cmd_duration(&self.reload_timeout)?;
                let argv: Vec<String> = if self.reload_shell {
                    vec!["sh".into(), "-c".into(), cmd]
                } else {
                    cmd.split_whitespace().map(str::to_owned).collect()
                };
                anyhow::ensure!(!argv.is_empty(), "--reload-cmd is empty");
                Some(Notify::Command { argv, timeout })
            }
            (None, Some(pid), _) => Some(Notify::Signal {
                target: PidSource::Pid(pid),
                signal: parse_signal(&self.signal)?,
            }),
            (None, None, Some(file)) => Some(Notify::Signal {
                target: PidSource::File(file),
                signal: parse_signal(&self.signal)?,
            }),
            (None, None, None) => None,
        };
        for a in &self.jwt_audience {
            anyhow::ensure!(
                !a.is_empty() && a.len() <= 256,
                "--jwt-audience must be 1 to 256 bytes"
            );
        }
        Ok(Some(WriteOptions {
            dir,
            jwt_svids: self
                .jwt_audience
                .into_iter()
                .map(|a| {
                    let file = jwt_file_name(&a);
                    (a, file)
                })
                .collect(),
            names: None,
            notify,
            once: self.once,
            json,
        }))
    }
}

fn cmd_duration(text: &str) -> anyhow::Result<std::time::Duration> {
    Ok(text
        .parse::<writ_identity::duration::ConfigDuration>()
        .map_err(|e| anyhow::anyhow!("--reload-timeout: {e}"))?
        .get())
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
        #[command(flatten)]
        output: OutputArg,
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
        #[command(flatten)]
        output: OutputArg,
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
        /// The token, `-` to read it from standard input, or `@file` to read it from a
        /// file (a token on the command line is visible to other users of the machine).
        #[arg(long)]
        svid: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

fn pem(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| ::pem::encode(&::pem::Pem::new(tag, d.clone())))
        .collect()
}

fn print_x509(ctx: &X509Context) -> anyhow::Result<()> {
    outln!(
        "Received {} svid{}",
        ctx.svids.len(),
        if ctx.svids.len() == 1 { "" } else { "s" }
    )?;
    for s in &ctx.svids {
        outln!()?;
        outln!("SPIFFE ID:       {}", s.spiffe_id)?;
        if let Some(expires) = expires_at(s) {
            outln!("SVID valid until {expires}")?;
        }
        outln!("Intermediates:   {}", s.cert_chain.len().saturating_sub(1))?;
        outln!("CA certificates: {}", s.bundle.len())?;
        if !s.hint.is_empty() {
            outln!("Hint:            {}", s.hint)?;
        }
    }
    Ok(())
}

fn expires_at(s: &writ_sdk::workload::X509SvidEntry) -> Option<String> {
    let leaf = s.cert_chain.first()?;
    let v = writ_identity::svid::x509::check_leaf(leaf).ok()?;
    Some(humantime::format_rfc3339_seconds(v.expires_at).to_string())
}

/// The SVIDs as a JSON array (also for one), each with the files `--write` made.
fn x509_json(ctx: &X509Context, dir: Option<&Path>) -> serde_json::Value {
    let list = ctx.svids.iter().enumerate().map(|(i, s)| {
        let mut doc = serde_json::json!({
            "spiffe_id": s.spiffe_id.to_string(),
            "expires_at": expires_at(s),
            "intermediates": s.cert_chain.len().saturating_sub(1),
            "ca_certificates": s.bundle.len(),
            "hint": s.hint,
        });
        if let (Some(dir), Some(obj)) = (dir, doc.as_object_mut()) {
            for (key, name) in [
                ("svid_file", format!("svid.{i}.pem")),
                ("key_file", format!("svid.{i}.key")),
                ("bundle_file", format!("bundle.{i}.pem")),
            ] {
                obj.insert(key.into(), serde_json::json!(dir.join(name)));
            }
        }
        doc
    });
    serde_json::Value::Array(list.collect())
}

/// Turns "no identity issued" into why, when this process runs under a sub-agent of
/// `writ api spawn` but is not that process: the lease is bound to the one process the
/// spawn started (its pid and start time), never to what that process forks, so a
/// shell wrapper's commands get nothing unless the shell `exec`s them.
pub(crate) fn explain_no_identity(e: anyhow::Error) -> anyhow::Error {
    let no_identity = e
        .chain()
        .any(|c| matches!(c.downcast_ref(), Some(WorkloadError::NoIdentity)));
    let lease_pid = std::env::var(SUBAGENT_PID_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    match lease_pid {
        Some(pid) if no_identity && pid != std::process::id() => anyhow::anyhow!(
            "no identity issued to this process (pid {me}): the sub-agent identity of \
             `writ api spawn` is bound to pid {pid}, the program it started, and is not \
             handed to the processes that program starts; make the wrapper `exec` this \
             command (`sh -c '...; exec writ ...'`) or spawn it directly (docs/subagents.md)",
            me = std::process::id()
        ),
        _ => e,
    }
}

fn write_x509(dir: &Path, ctx: &X509Context, announce: bool) -> anyhow::Result<()> {
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
        if announce {
            outln!(
                "Writing SVID #{i} to {}",
                dir.join(format!("svid.{i}.pem")).display()
            )?;
        }
    }
    Ok(())
}

pub(crate) async fn run(cmd: ApiCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ApiCommand::Fetch(FetchCommand::X509 {
            socket,
            write,
            output,
        }) => {
            let ctx = socket
                .connect()
                .await?
                .fetch_x509()
                .await
                .map_err(|e| explain_no_identity(e.into()))?;
            if output.json() {
                if let Some(dir) = &write {
                    write_x509(dir, &ctx, false)?;
                }
                out::json(&x509_json(&ctx, write.as_deref()))?;
            } else {
                print_x509(&ctx)?;
                if let Some(dir) = &write {
                    write_x509(dir, &ctx, true)?;
                }
            }
        }
        ApiCommand::Fetch(FetchCommand::Jwt {
            socket,
            audience,
            spiffe_id,
            output,
        }) => {
            let id = spiffe_id.as_deref().map(SpiffeId::new).transpose()?;
            let svids = socket
                .connect()
                .await?
                .fetch_jwt(&audience, id.as_ref())
                .await
                .map_err(|e| explain_no_identity(e.into()))?;
            if output.json() {
                let list = svids.iter().map(|(id, token)| {
                    serde_json::json!({ "spiffe_id": id.to_string(), "token": token })
                });
                out::json(&serde_json::Value::Array(list.collect()))?;
            } else {
                for (id, token) in svids {
                    outln!("token({id}):\n\t{token}")?;
                }
            }
        }
        ApiCommand::Validate(ValidateCommand::Jwt {
            socket,
            audience,
            svid,
            output,
        }) => {
            let svid = if svid == "-" || svid.starts_with('@') {
                super::txn::read_token("--svid", &svid)?
            } else {
                svid.trim().to_owned()
            };
            let (id, claims) = socket
                .connect()
                .await?
                .validate_jwt(&audience, &svid)
                .await?;
            if output.json() {
                out::json(&serde_json::json!({
                    "valid": true,
                    "spiffe_id": id.to_string(),
                    "claims": claims,
                }))?;
            } else {
                outln!("SVID is valid.")?;
                outln!("SPIFFE ID : {id}")?;
                outln!("Claims    : {claims}")?;
            }
        }
        ApiCommand::Spawn {
            socket,
            name,
            ttl,
            parent,
            command,
        } => return spawn(socket, name, ttl, parent, command).await,
        ApiCommand::Watch {
            mut socket,
            output,
            write,
        } => {
            if let Some(opts) = write.options(&mut socket, output.json())? {
                super::svid_files::watch(&socket.endpoint, opts).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut watch = socket
                .connect()
                .await?
                .watch_x509()
                .await
                .map_err(|e| explain_no_identity(e.into()))?;
            loop {
                tokio::select! {
                    next = watch.next() => {
                        let ctx = next?;
                        if output.json() {
                            outln!("{}", x509_json(&ctx, None))?;
                        } else {
                            print_x509(&ctx)?;
                        }
                    }
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
            ttl.parse::<writ_identity::duration::ConfigDuration>()
                .map_err(|e| anyhow::anyhow!("--ttl: {e}"))?
                .get(),
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
    errln!(
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_socket_is_the_agents() {
        assert_eq!(
            super::DEFAULT_AGENT_SOCKET,
            format!("unix://{}", writ_identity::agent::DEFAULT_SOCKET)
        );
    }
}
