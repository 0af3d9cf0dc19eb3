//! Spawning sub-agents: child processes with their own short-lived SPIFFE identity
//! under the parent's, through the agent's `writ.delegation.v1.SubAgents` service.
//!
//! [`Spawn`] starts the program behind a gate: a `/bin/sh` that stops itself
//! (`SIGSTOP`) before it `exec`s the program, so the program cannot run (nor fetch an
//! identity) before the agent has registered the process. Once the shell is stopped, the
//! parent registers its pid and start time, then lets it continue. The program then
//! fetches its SVID with any SPIFFE client, as any workload; the parent's Txn-Token, if
//! given, reaches it in the environment variable [`TXN_TOKEN_ENV`] (never on disk).
//!
//! The lease ends when [`SubAgent::wait`] returns, when [`SubAgent::release`] is
//! called, when the handle is dropped, and, whatever the parent does, when either
//! process exits (the agent watches both).
//!
//! ```no_run
//! use std::time::Duration;
//! use writ_sdk::spawn::Spawn;
//! # async fn demo(txn_token: String) -> Result<(), writ_sdk::spawn::SpawnError> {
//! let mut command = std::process::Command::new("python3");
//! command.arg("summarize.py");
//! let mut child = Spawn::new("summarize", command)
//!     .ttl(Duration::from_secs(300))
//!     .txn_token(txn_token)
//!     .spawn()
//!     .await?;
//! println!("{} runs as {}", child.lease().pid, child.lease().child_id);
//! let status = child.wait().await?; // and the lease is released
//! # let _ = status;
//! # Ok(()) }
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use tonic::transport::Channel;
use writ_spiffe::clock::from_unix_seconds;
use writ_spiffe::process::read_stat;
use writ_spiffe::proto::delegation as pb;
use writ_spiffe::proto::delegation::sub_agents_client::SubAgentsClient;
use writ_spiffe::spiffe_id::SpiffeId;

use crate::workload::{WorkloadError, channel, endpoint_from_env, with_header};

/// The environment variable that carries the parent's Txn-Token to the child.
pub const TXN_TOKEN_ENV: &str = "WRIT_TXN_TOKEN";
/// How long the gate shell may take to stop itself.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that tells the child, and whatever it starts, the pid the
/// sub-agent identity is bound to. Only a diagnostic: a process that finds another pid
/// there (a command run by a shell wrapper without `exec`) can say why the agent issued
/// it nothing. It grants nothing; the agent attests the caller's pid and start time.
pub const SUBAGENT_PID_ENV: &str = "WRIT_SUBAGENT_PID";
/// The gate: record its pid, stop, then become the program (`$@`; `exec` keeps the pid
/// and start time the lease is bound to).
const GATE_SCRIPT: &str =
    "WRIT_SUBAGENT_PID=$$ && export WRIT_SUBAGENT_PID && kill -STOP $$ && exec \"$@\"";

/// Why spawning or a lease call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The agent socket could not be reached.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The agent refused: the gRPC code and its message (for example
    /// `FailedPrecondition` for a process that is not the caller's child or a caller
    /// without a spawn policy, `ResourceExhausted` for the depth or children cap).
    #[error("sub-agent {code:?}: {message}")]
    Refused {
        /// The gRPC status code.
        code: tonic::Code,
        /// The agent's explanation.
        message: String,
    },
    /// The child process could not be started or watched.
    #[error("child process: {0}")]
    Process(String),
    /// The agent's answer was malformed.
    #[error("malformed lease: {0}")]
    Malformed(String),
}

impl From<tonic::Status> for SpawnError {
    fn from(s: tonic::Status) -> Self {
        SpawnError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// A sub-agent lease as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The lease id (for [`SubAgents::release`]).
    pub id: String,
    /// The child's SPIFFE ID: `<parent>/sub/<task>-<hex>`.
    pub child_id: SpiffeId,
    /// The parent's SPIFFE ID.
    pub parent_id: SpiffeId,
    /// The child process.
    pub pid: i32,
    /// The task name.
    pub task: String,
    /// 1 for a child of a registered workload, 2 for its child, ...
    pub depth: u32,
    /// When the lease (and the child's identity) ends at the latest.
    pub expires_at: SystemTime,
    /// When it was released, if it was.
    pub released_at: Option<SystemTime>,
}

impl TryFrom<pb::Lease> for Lease {
    type Error = SpawnError;

    fn try_from(p: pb::Lease) -> Result<Self, SpawnError> {
        let id = |s: &str| SpiffeId::new(s).map_err(|e| SpawnError::Malformed(e.to_string()));
        Ok(Lease {
            child_id: id(&p.child_spiffe_id)?,
            parent_id: id(&p.parent_spiffe_id)?,
            id: p.id,
            pid: p.pid,
            task: p.task,
            depth: p.depth,
            expires_at: from_unix_seconds(p.expires_at),
            released_at: (p.released_at != 0).then(|| from_unix_seconds(p.released_at)),
        })
    }
}

/// A client of the agent's `SubAgents` service, calling as this process.
#[derive(Debug, Clone)]
pub struct SubAgents {
    client: SubAgentsClient<Channel>,
}

/// What to register: a child process and the identity it should get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// The child process; the kernel must report this process as its parent.
    pub pid: i32,
    /// Its start time as this process saw it (0: unchecked), against pid reuse.
    pub start_time: u64,
    /// `[a-z0-9-]{1,32}`.
    pub task: String,
    /// The lifetime asked for (`None`: the longest the policy allows); capped by the
    /// policy and the parent's own lifetime, never refused for being long.
    pub ttl: Option<Duration>,
    /// Which of this process's identities is the parent, when it has several.
    pub parent: Option<SpiffeId>,
}

impl SubAgents {
    /// Connects to the agent socket named by `SPIFFE_ENDPOINT_SOCKET`.
    ///
    /// # Errors
    /// [`SpawnError::Workload`] if the variable is unset
    /// ([`WorkloadError::EndpointUnset`]) or the socket cannot be reached.
    pub async fn connect_env() -> Result<Self, SpawnError> {
        Self::connect(&endpoint_from_env()?).await
    }

    /// Connects to `unix:///path`.
    ///
    /// # Errors
    /// [`SpawnError::Workload`] if it cannot be reached.
    pub async fn connect(endpoint: &str) -> Result<Self, SpawnError> {
        Ok(Self {
            client: SubAgentsClient::new(channel(endpoint).await?),
        })
    }

    /// Registers a child process of this process as a sub-agent.
    ///
    /// # Errors
    /// [`SpawnError::Refused`] with the agent's reason.
    pub async fn register(&mut self, registration: &Registration) -> Result<Lease, SpawnError> {
        let ttl_seconds = registration
            .ttl
            .map_or(0, |d| i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX));
        let request = pb::RegisterRequest {
            pid: registration.pid,
            task: registration.task.clone(),
            ttl_seconds,
            parent_spiffe_id: registration
                .parent
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            start_time: registration.start_time,
        };
        self.client
            .register(with_header(request))
            .await?
            .into_inner()
            .try_into()
    }

    /// Releases one of this process's leases (and every lease under it). Releasing an
    /// ended lease is not an error.
    ///
    /// # Errors
    /// [`SpawnError::Refused`] (`NotFound`) if this process holds no such lease.
    pub async fn release(&mut self, id: &str) -> Result<Lease, SpawnError> {
        self.client
            .release(with_header(pb::ReleaseRequest { id: id.to_owned() }))
            .await?
            .into_inner()
            .try_into()
    }

    /// The leases whose parent is one of this process's identities, live ones first.
    ///
    /// # Errors
    /// [`SpawnError::Refused`] if this process has no identity.
    pub async fn list(&mut self) -> Result<Vec<Lease>, SpawnError> {
        self.client
            .list(with_header(pb::ListRequest {}))
            .await?
            .into_inner()
            .leases
            .into_iter()
            .map(Lease::try_from)
            .collect()
    }
}

/// Builds and starts a sub-agent process.
#[derive(Debug)]
pub struct Spawn {
    task: String,
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    current_dir: Option<PathBuf>,
    ttl: Option<Duration>,
    parent: Option<SpiffeId>,
    txn_token: Option<String>,
    endpoint: Option<String>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
}

impl Spawn {
    /// A sub-agent for `task` (`[a-z0-9-]{1,32}`) running `command`: its program,
    /// arguments, environment changes and working directory are used; its standard I/O
    /// settings cannot be read back, so set them here ([`Self::stdin`] ...; inherited by
    /// default).
    pub fn new(task: impl Into<String>, command: std::process::Command) -> Self {
        Self {
            task: task.into(),
            program: command.get_program().to_owned(),
            args: command.get_args().map(ToOwned::to_owned).collect(),
            envs: command
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(ToOwned::to_owned)))
                .collect(),
            current_dir: command.get_current_dir().map(ToOwned::to_owned),
            ttl: None,
            parent: None,
            txn_token: None,
            endpoint: None,
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }

    /// The lifetime asked for (capped by the policy and the parent's lifetime).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Which of this process's identities is the parent.
    #[must_use]
    pub fn parent(mut self, parent: SpiffeId) -> Self {
        self.parent = Some(parent);
        self
    }

    /// A Txn-Token handed to the child in [`TXN_TOKEN_ENV`], for it to replace at the
    /// TTS under its own identity.
    #[must_use]
    pub fn txn_token(mut self, token: impl Into<String>) -> Self {
        self.txn_token = Some(token.into());
        self
    }

    /// The agent socket (default: `SPIFFE_ENDPOINT_SOCKET`, which must then be set).
    /// The child gets the same in `SPIFFE_ENDPOINT_SOCKET`.
    #[must_use]
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// The child's standard input.
    #[must_use]
    pub fn stdin(mut self, cfg: impl Into<Stdio>) -> Self {
        self.stdin = Some(cfg.into());
        self
    }

    /// The child's standard output.
    #[must_use]
    pub fn stdout(mut self, cfg: impl Into<Stdio>) -> Self {
        self.stdout = Some(cfg.into());
        self
    }

    /// The child's standard error.
    #[must_use]
    pub fn stderr(mut self, cfg: impl Into<Stdio>) -> Self {
        self.stderr = Some(cfg.into());
        self
    }

    /// Starts the gated process, registers it, and lets it run. If registration fails
    /// the process is killed before the program ever ran.
    ///
    /// # Errors
    /// [`SpawnError`]: the agent's refusal, or the process could not be started.
    pub async fn spawn(self) -> Result<SubAgent, SpawnError> {
        let endpoint = match self.endpoint {
            Some(endpoint) => endpoint,
            None => endpoint_from_env()?,
        };
        let mut agent = SubAgents::connect(&endpoint).await?;
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(GATE_SCRIPT)
            .arg("writ-spawn")
            .arg(&self.program)
            .args(&self.args)
            .kill_on_drop(false);
        for (key, value) in &self.envs {
            match value {
                Some(v) => command.env(key, v),
                None => command.env_remove(key),
            };
        }
        command.env(crate::workload::ENDPOINT_ENV, &endpoint);
        match &self.txn_token {
            Some(token) => command.env(TXN_TOKEN_ENV, token),
            None => command.env_remove(TXN_TOKEN_ENV),
        };
        if let Some(dir) = &self.current_dir {
            command.current_dir(dir);
        }
        if let Some(cfg) = self.stdin {
            command.stdin(cfg);
        }
        if let Some(cfg) = self.stdout {
            command.stdout(cfg);
        }
        if let Some(cfg) = self.stderr {
            command.stderr(cfg);
        }
        let mut child = command
            .spawn()
            .map_err(|e| SpawnError::Process(format!("cannot start /bin/sh: {e}")))?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| SpawnError::Process("the child has no pid".into()))?;
        let registered = async {
            let start_time = wait_stopped(pid).await?;
            let lease = agent
                .register(&Registration {
                    pid,
                    start_time,
                    task: self.task,
                    ttl: self.ttl,
                    parent: self.parent,
                })
                .await?;
            continue_process(pid)?;
            Ok::<_, SpawnError>(lease)
        }
        .await;
        match registered {
            Ok(lease) => Ok(SubAgent {
                child,
                lease,
                agent,
                released: false,
            }),
            Err(e) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(e)
            }
        }
    }
}

/// Waits until the gate shell `pid` has stopped itself; returns its start time.
async fn wait_stopped(pid: i32) -> Result<u64, SpawnError> {
    let proc_root = std::path::Path::new("/proc");
    let deadline = tokio::time::Instant::now() + GATE_TIMEOUT;
    loop {
        let stat = read_stat(proc_root, pid).map_err(|e| SpawnError::Process(e.to_string()))?;
        if stat.is_stopped() {
            return Ok(stat.start_time());
        }
        if stat.is_exited() {
            return Err(SpawnError::Process("the child exited before it ran".into()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(SpawnError::Process(format!(
                "the child did not reach its start gate within {GATE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Lets the stopped process `pid` continue.
fn continue_process(pid: i32) -> Result<(), SpawnError> {
    let target = rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| SpawnError::Process(format!("{pid} is not a pid")))?;
    rustix::process::kill_process(target, rustix::process::Signal::CONT)
        .map_err(|e| SpawnError::Process(format!("cannot continue the child: {e}")))
}

/// A running sub-agent. Dropping it releases the lease (the process keeps running
/// without an identity; the agent also releases it when either process exits).
#[derive(Debug)]
pub struct SubAgent {
    child: tokio::process::Child,
    lease: Lease,
    agent: SubAgents,
    released: bool,
}

impl SubAgent {
    /// The lease.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The process (for its pipes, `kill`, ...).
    pub fn child_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }

    /// Waits for the process to exit, then releases the lease.
    ///
    /// # Errors
    /// [`SpawnError::Process`] if waiting fails; a failed release is only logged (the
    /// agent releases the lease of an exited child on its own).
    pub async fn wait(&mut self) -> Result<ExitStatus, SpawnError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| SpawnError::Process(e.to_string()));
        if let Err(e) = self.release().await {
            tracing::debug!(error = %e, lease = %self.lease.id, "release after exit failed");
        }
        status
    }

    /// Releases the lease now: the child gets no new SVID and the TTS refuses its
    /// exchanges within a few seconds. The process keeps running.
    ///
    /// # Errors
    /// [`SpawnError`] if the agent cannot be reached or refuses.
    pub async fn release(&mut self) -> Result<Lease, SpawnError> {
        let lease = self.agent.release(&self.lease.id).await?;
        self.released = true;
        self.lease = lease.clone();
        Ok(lease)
    }
}

impl Drop for SubAgent {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut agent = self.agent.clone();
            let id = self.lease.id.clone();
            runtime.spawn(async move {
                if let Err(e) = agent.release(&id).await {
                    tracing::debug!(error = %e, lease = %id, "release on drop failed");
                }
            });
        }
    }
}
