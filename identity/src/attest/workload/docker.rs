//! The `docker` workload attestor: selectors from the Docker Engine API for a process
//! that runs in a Docker container, as SPIRE's `docker` workload attestor writes them.
//!
//! The container ID comes from the kernel (`/proc/<pid>/cgroup`, see [`super::cgroup`]),
//! never from the process; the agent then inspects that container on the daemon's Unix
//! socket (`GET /containers/<id>/json`) and turns its configuration into selectors:
//!
//! | selector | source (container inspect) | example |
//! |---|---|---|
//! | `docker:label:<key>:<value>` | each of `Config.Labels` (the image's labels included) | `docker:label:app:billing` |
//! | `docker:image_id:<image>` | `Config.Image`: the image as the container was created from it | `docker:image_id:writ-demo:1` |
//! | `docker:env:<KEY>=<value>` | each of `Config.Env` whose name is in the allow-list | `docker:env:TENANT=acme` |
//!
//! The names and shapes are SPIRE's (its `plugin_agent_workloadattestor_docker.md`):
//! labels as `label:<key>:<value>`, environment variables as the raw `KEY=value` string
//! (`docker:env:VAR=val`, not `VAR:val`), and `image_id` as the container's configured
//! image, which is what the user named at `docker run`: a tag (`app:1`), a digest
//! reference (`app@sha256:...`) or an image ID (`sha256:77af...`). SPIRE gives every
//! environment variable; Writ gives only those named in
//! [`DockerAttestorConfig::env_allow`], since environments often hold secrets and
//! selectors are logged.
//!
//! # What the selectors prove
//!
//! That the process runs in a container which whoever created it (anyone who can reach
//! the Docker socket: root, in effect) gave those labels, image reference and variables.
//! They do not prove what code runs: a tag names whatever image it pointed to when the
//! container was created, and labels are chosen by the creator. Combine with
//! `unix:sha256` where the binary matters, and keep the Docker socket root-only.
//!
//! # Cache, events, timeouts
//!
//! The selectors of a container are cached by container ID: a cached attestation makes
//! no Docker API call ([`DockerAttestor::api_calls`] counts them). A task follows the
//! daemon's event stream and drops a container on `die`, `destroy`, `rename` and
//! `update`; when the stream fails the cache is cleared and not used until the stream is
//! back (restarted with a growing pause, up to [`MAX_EVENTS_BACKOFF`]). Each API call is
//! bounded by [`DockerAttestorConfig::timeout`].
//!
//! # When the daemon is down
//!
//! A process whose daemon cannot be reached (no socket, refused, no answer in time)
//! gets no `docker` selectors and no error: the other attestors' selectors still count,
//! so an entry with only `unix` selectors still matches, and an entry with `docker`
//! selectors does not. One warning is logged per [`WARN_INTERVAL`], not one per call. A
//! container the daemon does not know (another runtime's, or already removed) is
//! treated the same way, with its own warning.
//!
//! # Limits
//!
//! At most [`MAX_LABELS`] label selectors (by key order; the rest are left out and
//! logged), at most [`MAX_ENV_ALLOW`] allowed variable names, and a label or variable
//! whose selector would be longer than [`crate::selector::MAX_VALUE_LEN`] or hold a
//! control character is left out and logged. At most [`MAX_CACHED_CONTAINERS`]
//! containers are cached, and at most [`MAX_ENV_ALLOW`] variable selectors are given
//! per container (a name repeated in `Config.Env` counts each time). The daemon's answer
//! itself is read whole: the daemon is trusted as root is.
//!
//! ```no_run
//! use std::sync::Arc;
//! use writ_identity::attest::workload::{Attestors, UnixAttestor};
//! use writ_identity::attest::workload::docker::{DockerAttestor, DockerAttestorConfig};
//! let docker = DockerAttestor::new(DockerAttestorConfig {
//!     env_allow: vec!["TENANT".to_owned()],
//!     ..DockerAttestorConfig::default()
//! });
//! let attestors = Attestors::new()
//!     .with("unix", Arc::new(UnixAttestor::default()))
//!     .with("docker", Arc::new(docker));
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::EventsOptions;
use futures::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use super::{AttestError, Attestation, Caller, SelectorDemand, SelectorTypes, WorkloadAttestor};
use crate::clock::{Clock, SystemClock};
use crate::selector::{MAX_VALUE_LEN, Selector};

/// The selector type this attestor produces.
pub const KIND: &str = "docker";
/// The keys of `docker` selectors (`docker:<key>:...`).
pub const KEYS: &[&str] = &["label", "image_id", "env"];
/// The daemon's socket unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// How long one Docker API call may take unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most label selectors per container.
pub const MAX_LABELS: usize = 48;
/// Most environment variable names in the allow-list.
pub const MAX_ENV_ALLOW: usize = 16;
/// Most containers whose selectors are cached.
pub const MAX_CACHED_CONTAINERS: usize = 4096;
/// Least time between two warnings of the same kind (daemon down, unknown container).
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);
/// Longest pause before the event stream is restarted.
pub const MAX_EVENTS_BACKOFF: Duration = Duration::from_secs(30);
/// The container events that drop a container from the cache.
const INVALIDATING_EVENTS: &[&str] = &["die", "destroy", "rename", "update"];

/// How the `docker` attestor reaches the daemon and what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerAttestorConfig {
    /// The daemon's Unix socket (a `unix://` prefix is accepted).
    pub socket_path: PathBuf,
    /// Longest time one API call may take.
    pub timeout: Duration,
    /// Environment variable names given as `docker:env:<NAME>=<value>` selectors.
    pub env_allow: Vec<String>,
    /// Where `/proc` is mounted (the cgroup of the caller is read there).
    pub proc_root: PathBuf,
}

impl Default for DockerAttestorConfig {
    fn default() -> Self {
        Self {
            socket_path: PathBuf::from(DEFAULT_SOCKET),
            timeout: DEFAULT_TIMEOUT,
            env_allow: Vec::new(),
            proc_root: PathBuf::from(super::unix::DEFAULT_PROC_ROOT),
        }
    }
}

/// Why a [`DockerAttestorConfig`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DockerConfigError {
    /// More allowed environment variable names than [`MAX_ENV_ALLOW`].
    #[error("at most {max} environment variable names may be allowed")]
    TooManyEnv {
        /// The limit.
        max: usize,
    },
    /// An allowed name is empty or holds `=` or a control character.
    #[error("{name:?} is not an environment variable name")]
    BadEnvName {
        /// The name (at most 80 characters of it).
        name: String,
    },
    /// The timeout is zero or longer than a minute.
    #[error("timeout must be between 1 ms and 60 s")]
    BadTimeout,
    /// The socket path is not an absolute path (or `unix://` + absolute path).
    #[error("socket path {path:?} must be absolute (TCP and TLS daemons are not supported)")]
    BadSocket {
        /// The path given.
        path: String,
    },
}

impl DockerAttestorConfig {
    /// Checks the limits, and strips a `unix://` prefix from the socket path.
    ///
    /// # Errors
    /// [`DockerConfigError`] naming what is wrong.
    pub fn validate(mut self) -> Result<Self, DockerConfigError> {
        let raw = self.socket_path.to_string_lossy().into_owned();
        let path = raw.strip_prefix("unix://").unwrap_or(&raw);
        if !path.starts_with('/') {
            return Err(DockerConfigError::BadSocket { path: raw });
        }
        self.socket_path = PathBuf::from(path);
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err(DockerConfigError::BadTimeout);
        }
        if self.env_allow.len() > MAX_ENV_ALLOW {
            return Err(DockerConfigError::TooManyEnv { max: MAX_ENV_ALLOW });
        }
        if let Some(bad) = self.env_allow.iter().find(|n| {
            n.is_empty() || n.len() > 256 || n.contains('=') || n.chars().any(char::is_control)
        }) {
            return Err(DockerConfigError::BadEnvName {
                name: bad.chars().take(80).collect(),
            });
        }
        Ok(self)
    }
}

/// The `docker` workload attestor. Cheap to share: clones see one cache.
#[derive(Debug, Clone)]
pub struct DockerAttestor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: DockerAttestorConfig,
    shared: Arc<Shared>,
    events: Mutex<Option<AbortOnDropHandle<()>>>,
    daemon_warning: RateLimit,
    unknown_warning: RateLimit,
}

/// What the attestor and its event task share.
#[derive(Debug)]
struct Shared {
    socket: PathBuf,
    timeout: Duration,
    client: tokio::sync::Mutex<Option<Docker>>,
    cache: Mutex<Cache>,
    events_up: AtomicBool,
    api_calls: AtomicU64,
}

/// Selectors by container ID, and a generation bumped by every invalidation so an
/// inspect that started before an event cannot put back what the event removed. The
/// last [`RECENT_REMOVALS`] removals are remembered with their generation, so that an
/// event about another container does not void an inspect in flight (on a busy host
/// there is nearly always one).
#[derive(Debug, Default)]
struct Cache {
    containers: HashMap<String, Arc<Vec<Selector>>>,
    generation: u64,
    /// The generation at which `generation` was last bumped by a `clear`.
    cleared_at: u64,
    /// Recently removed container IDs, with the generation their removal made.
    removed: std::collections::VecDeque<(String, u64)>,
}

/// How many removals the cache remembers to tell whose event an inspect missed.
const RECENT_REMOVALS: usize = 256;

impl Cache {
    fn get(&self, id: &str) -> Option<Arc<Vec<Selector>>> {
        self.containers.get(id).cloned()
    }

    /// Caches `selectors` for `id`, read by an inspect that began at `generation`,
    /// unless `id` was removed since (or the cache cleared, or more removals came than
    /// are remembered).
    fn insert(&mut self, id: &str, generation: u64, selectors: Arc<Vec<Selector>>) {
        if generation != self.generation {
            // Every removal since `generation` is still in `removed` only if the oldest
            // one kept is not newer than the first that could have followed it.
            let oldest_kept = self.removed.front().map_or(self.generation, |(_, g)| *g);
            if self.cleared_at > generation
                || oldest_kept > generation.wrapping_add(1)
                || self
                    .removed
                    .iter()
                    .any(|(removed, at)| *at > generation && removed == id)
            {
                return;
            }
        }
        if self.containers.len() >= MAX_CACHED_CONTAINERS {
            self.containers.clear();
        }
        self.containers.insert(id.to_owned(), selectors);
    }

    fn remove(&mut self, id: &str) -> bool {
        self.generation = self.generation.wrapping_add(1);
        if self.removed.len() >= RECENT_REMOVALS {
            self.removed.pop_front();
        }
        self.removed.push_back((id.to_owned(), self.generation));
        self.containers.remove(id).is_some()
    }

    fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.cleared_at = self.generation;
        self.containers.clear();
    }
}

/// Lets one message through per [`WARN_INTERVAL`] and counts the ones held back.
#[derive(Debug)]
struct RateLimit {
    clock: Arc<dyn Clock>,
    state: Mutex<(Option<SystemTime>, u64)>,
}

impl RateLimit {
    fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(number held back since the last one)` if a message may be logged now.
    fn allow(&self) -> Option<u64> {
        let now = self.clock.now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = state.0.is_none_or(|last| {
            now.duration_since(last)
                .map_or(true, |since| since >= WARN_INTERVAL)
        });
        if due {
            let held = state.1;
            *state = (Some(now), 0);
            Some(held)
        } else {
            state.1 = state.1.saturating_add(1);
            None
        }
    }
}

/// Why the daemon gave no answer about a container.
#[derive(Debug, thiserror::Error)]
enum DaemonError {
    #[error("the Docker daemon at {socket} is not reachable: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error("the Docker daemon at {socket} did not answer within {timeout:?}")]
    Timeout { socket: String, timeout: Duration },
    #[error("the Docker daemon does not know container {id} (another runtime's, or removed)")]
    UnknownContainer { id: String },
}

impl DockerAttestor {
    /// An attestor with `config` (checked with [`DockerAttestorConfig::validate`]; a
    /// config that fails the checks is used with its limits clipped). Connects lazily:
    /// nothing is asked of the daemon until the first caller in a container.
    pub fn new(config: DockerAttestorConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// As [`Self::new`], with the clock that paces the warnings.
    pub fn with_clock(config: DockerAttestorConfig, clock: Arc<dyn Clock>) -> Self {
        let config = match config.clone().validate() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "docker attestor: config clipped to its limits");
                let mut c = config;
                c.env_allow.truncate(MAX_ENV_ALLOW);
                c.env_allow.retain(|n| !n.is_empty() && !n.contains('='));
                if c.timeout.is_zero() || c.timeout > Duration::from_secs(60) {
                    c.timeout = DEFAULT_TIMEOUT;
                }
                c
            }
        };
        let shared = Arc::new(Shared {
            socket: config.socket_path.clone(),
            timeout: config.timeout,
            client: tokio::sync::Mutex::new(None),
            cache: Mutex::new(Cache::default()),
            events_up: AtomicBool::new(false),
            api_calls: AtomicU64::new(0),
        });
        Self {
            inner: Arc::new(Inner {
                config,
                shared,
                events: Mutex::new(None),
                daemon_warning: RateLimit::new(clock.clone()),
                unknown_warning: RateLimit::new(clock),
            }),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerAttestorConfig {
        &self.inner.config
    }

    /// How many Docker API requests this attestor made for attestations (event stream
    /// connections not counted): the figure a cached attestation must not raise.
    pub fn api_calls(&self) -> u64 {
        self.inner.shared.api_calls.load(Ordering::Relaxed)
    }

    /// Whether the selectors of container `id` are cached.
    pub fn is_cached(&self, id: &str) -> bool {
        self.inner.shared.lock_cache().get(id).is_some()
    }

    /// Whether the event stream is connected (the cache is used only then).
    pub fn events_connected(&self) -> bool {
        self.inner.shared.events_up.load(Ordering::Acquire)
    }

    /// The `docker` selectors of container `id`: from the cache, or by inspecting it.
    /// A daemon that is down, slow, or does not know the container gives no selectors
    /// (and a rate-limited warning), never an error.
    pub async fn selectors_of_container(&self, id: &str) -> Vec<Selector> {
        self.ensure_events();
        let shared = &self.inner.shared;
        let use_cache = shared.events_up.load(Ordering::Acquire);
        let generation = {
            let cache = shared.lock_cache();
            if use_cache && let Some(hit) = cache.get(id) {
                return hit.as_ref().clone();
            }
            cache.generation
        };
        match shared.inspect(id).await {
            Ok(inspect) => {
                let selectors = Arc::new(selectors_from_inspect(
                    id,
                    &inspect,
                    &self.inner.config.env_allow,
                ));
                if use_cache {
                    shared
                        .lock_cache()
                        .insert(id, generation, selectors.clone());
                }
                selectors.as_ref().clone()
            }
            Err(e @ DaemonError::UnknownContainer { .. }) => {
                if let Some(held) = self.inner.unknown_warning.allow() {
                    tracing::warn!(error = %e, similar_since_last = held,
                        "docker attestor: no docker selectors for this caller");
                }
                Vec::new()
            }
            Err(e) => {
                if let Some(held) = self.inner.daemon_warning.allow() {
                    tracing::warn!(error = %e, similar_since_last = held,
                        "docker attestor: callers in containers get no docker selectors until the daemon answers");
                }
                Vec::new()
            }
        }
    }

    /// Starts the event task once, inside the runtime of the first caller.
    fn ensure_events(&self) {
        let mut events = self.inner.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let shared = self.inner.shared.clone();
        *events = Some(AbortOnDropHandle::new(tokio::spawn(follow_events(shared))));
    }
}

impl Shared {
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    /// A client that speaks an API version the daemon accepts (negotiated once).
    async fn client(&self) -> Result<Docker, DaemonError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let unreachable = |reason: String| DaemonError::Unreachable {
            socket: self.socket_name(),
            reason,
        };
        let secs = self.timeout.as_secs().max(1);
        let client = Docker::connect_with_unix(
            &self.socket.to_string_lossy(),
            secs,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| unreachable(e.to_string()))?;
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let client = tokio::time::timeout(self.timeout, client.negotiate_version())
            .await
            .map_err(|_| DaemonError::Timeout {
                socket: self.socket_name(),
                timeout: self.timeout,
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerInspectResponse, DaemonError> {
        let started = tokio::time::Instant::now();
        let client = self.client().await?;
        let left = self.timeout.saturating_sub(started.elapsed());
        self.api_calls.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(left, client.inspect_container(id, None))
            .await
            .map_err(|_| DaemonError::Timeout {
                socket: self.socket_name(),
                timeout: self.timeout,
            })?;
        match answer {
            Ok(inspect) => Ok(inspect),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Err(DaemonError::UnknownContainer { id: id.to_owned() }),
            Err(e) => {
                // A broken connection may mean a restarted daemon: negotiate again.
                *self.client.lock().await = None;
                Err(DaemonError::Unreachable {
                    socket: self.socket_name(),
                    reason: e.to_string(),
                })
            }
        }
    }
}

/// Follows the daemon's container events for as long as the attestor lives, dropping
/// containers from the cache; restarts the stream after a failure, with the cache
/// cleared and unused meanwhile (events may have been missed).
async fn follow_events(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if let Ok(client) = shared.client().await {
            let filters = HashMap::from([
                ("type".to_owned(), vec!["container".to_owned()]),
                (
                    "event".to_owned(),
                    INVALIDATING_EVENTS
                        .iter()
                        .map(|e| (*e).to_owned())
                        .collect(),
                ),
            ]);
            let mut stream = client.events(Some(EventsOptions {
                filters: Some(filters),
                ..EventsOptions::default()
            }));
            shared.lock_cache().clear();
            shared.events_up.store(true, Ordering::Release);
            tracing::debug!(socket = %shared.socket_name(), "docker attestor: following container events");
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { break };
                backoff = Duration::from_millis(250);
                if let Some(id) = event.actor.and_then(|a| a.id)
                    && shared.lock_cache().remove(&id)
                {
                    tracing::debug!(container = %id, action = ?event.action,
                        "docker attestor: container dropped from the cache");
                }
            }
            shared.events_up.store(false, Ordering::Release);
            shared.lock_cache().clear();
            *shared.client.lock().await = None;
            tracing::debug!("docker attestor: event stream ended; restarting it");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_EVENTS_BACKOFF);
    }
}

/// The selector types this attestor produces.
fn docker_types() -> SelectorTypes {
    let mut types = SelectorTypes::default();
    for key in KEYS {
        types.insert(KIND, key);
    }
    types
}

/// The `docker` selectors of one inspected container, with the limits applied.
fn selectors_from_inspect(
    id: &str,
    inspect: &ContainerInspectResponse,
    env_allow: &[String],
) -> Vec<Selector> {
    let mut out = Vec::new();
    let Some(config) = inspect.config.as_ref() else {
        return out;
    };
    let mut left_out = Vec::new();
    let mut push = |value: String, out: &mut Vec<Selector>| match Selector::new(KIND, &value) {
        Ok(s) => out.push(s),
        Err(e) => left_out.push(format!(
            "{}: {e}",
            value.chars().take(40).collect::<String>()
        )),
    };
    if let Some(labels) = &config.labels {
        let mut keys: Vec<&String> = labels.keys().collect();
        keys.sort();
        if keys.len() > MAX_LABELS {
            tracing::warn!(container = %id, labels = keys.len(), max = MAX_LABELS,
                "docker attestor: container has too many labels; the last ones by key are left out");
        }
        for key in keys.into_iter().take(MAX_LABELS) {
            let value = labels.get(key).map_or("", String::as_str);
            push(format!("label:{key}:{value}"), &mut out);
        }
    }
    if let Some(image) = config.image.as_deref().filter(|i| !i.is_empty()) {
        push(format!("image_id:{image}"), &mut out);
    }
    if !env_allow.is_empty() {
        let allowed: HashSet<&str> = env_allow.iter().map(String::as_str).collect();
        let mut given = 0;
        for var in config.env.iter().flatten() {
            let name = var.split_once('=').map_or(var.as_str(), |(n, _)| n);
            if allowed.contains(name) && given < MAX_ENV_ALLOW {
                given += 1;
                push(format!("env:{var}"), &mut out);
            }
        }
    }
    if !left_out.is_empty() {
        tracing::warn!(container = %id, ?left_out, max_len = MAX_VALUE_LEN,
            "docker attestor: some labels or variables cannot be selectors and are left out");
    }
    out
}

#[async_trait::async_trait]
impl WorkloadAttestor for DockerAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let proc_root = self.inner.config.proc_root.clone();
        let pid = caller.pid;
        let info =
            tokio::task::spawn_blocking(move || super::cgroup::container_of_pid(&proc_root, pid))
                .await
                .map_err(AttestError::TaskFailed)??;
        match info.container_id {
            Some(id) => Ok(self.selectors_of_container(&id).await),
            None => Ok(Vec::new()),
        }
    }

    async fn attest_for(
        &self,
        caller: &Caller,
        demand: Arc<dyn SelectorDemand>,
    ) -> Result<Attestation, AttestError> {
        let wanted = demand.wanted(&[], &SelectorTypes::default());
        if !KEYS.iter().any(|key| wanted.contains(KIND, key)) {
            return Ok(Attestation {
                selectors: Vec::new(),
                skipped: docker_types(),
            });
        }
        Ok(Attestation {
            selectors: self.attest(caller).await?,
            skipped: SelectorTypes::default(),
        })
    }
}

/// The Docker socket `writ dev` uses when it is there and answers a ping within
/// `timeout`: `DOCKER_HOST` if it is a `unix://` address, else [`DEFAULT_SOCKET`].
pub async fn reachable_socket(timeout: Duration) -> Option<PathBuf> {
    let path = match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => PathBuf::from(host.strip_prefix("unix://")?),
        _ => PathBuf::from(DEFAULT_SOCKET),
    };
    ping(&path, timeout).await.then_some(path)
}

/// Whether the daemon at `socket` answers a ping within `timeout`.
pub async fn ping(socket: &Path, timeout: Duration) -> bool {
    if !socket.exists() {
        return false;
    }
    let Ok(client) = Docker::connect_with_unix(
        &socket.to_string_lossy(),
        timeout.as_secs().max(1),
        bollard::API_DEFAULT_VERSION,
    ) else {
        return false;
    };
    matches!(
        tokio::time::timeout(timeout, client.ping()).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ContainerConfig;

    const ID: &str = "475fb92707b652f3b5095de773bc9d2e86dd2afec1f52f767413bd3294460d98";

    fn inspect(labels: &[(&str, &str)], env: &[&str], image: &str) -> ContainerInspectResponse {
        ContainerInspectResponse {
            config: Some(ContainerConfig {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                env: Some(env.iter().map(|e| (*e).to_owned()).collect()),
                image: Some(image.to_owned()),
                ..ContainerConfig::default()
            }),
            ..ContainerInspectResponse::default()
        }
    }

    fn strings(selectors: &[Selector]) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn selectors_as_spire_names_them() {
        let got = selectors_from_inspect(
            ID,
            &inspect(
                &[("app", "a"), ("com.example.tier", "web:1")],
                &["PATH=/bin", "TENANT=acme", "SECRET=x", "EMPTY="],
                "writ-demo:1",
            ),
            &["TENANT".to_owned(), "EMPTY".to_owned()],
        );
        assert_eq!(
            strings(&got),
            [
                "docker:label:app:a",
                "docker:label:com.example.tier:web:1",
                "docker:image_id:writ-demo:1",
                "docker:env:TENANT=acme",
                "docker:env:EMPTY=",
            ]
        );
        for s in &got {
            assert_eq!(
                s.check_value(),
                Ok(crate::selector::SelectorType::Known),
                "{s}"
            );
        }
        // No allow-list: no env selectors at all.
        let none = selectors_from_inspect(ID, &inspect(&[], &["TENANT=acme"], ""), &[]);
        assert!(none.is_empty());
        // No config in the answer: nothing.
        assert!(selectors_from_inspect(ID, &ContainerInspectResponse::default(), &[]).is_empty());
    }

    #[test]
    fn labels_and_values_are_clipped() {
        let many: Vec<(String, String)> = (0..100)
            .map(|i| (format!("k{i:03}"), "v".to_owned()))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let got = selectors_from_inspect(ID, &inspect(&refs, &[], ""), &[]);
        assert_eq!(got.len(), MAX_LABELS);
        assert_eq!(got[0].to_string(), "docker:label:k000:v");
        let long = "x".repeat(MAX_VALUE_LEN);
        let got = selectors_from_inspect(
            ID,
            &inspect(&[("big", &long), ("nl", "a\nb"), ("ok", "1")], &[], ""),
            &[],
        );
        assert_eq!(strings(&got), ["docker:label:ok:1"]);
    }

    #[test]
    fn config_limits() {
        let ok = DockerAttestorConfig {
            socket_path: "unix:///run/docker.sock".into(),
            ..DockerAttestorConfig::default()
        }
        .validate()
        .unwrap();
        assert_eq!(ok.socket_path, PathBuf::from("/run/docker.sock"));
        let bad = |c: DockerAttestorConfig| c.validate().unwrap_err();
        assert!(matches!(
            bad(DockerAttestorConfig {
                socket_path: "tcp://1.2.3.4:2375".into(),
                ..DockerAttestorConfig::default()
            }),
            DockerConfigError::BadSocket { .. }
        ));
        assert_eq!(
            bad(DockerAttestorConfig {
                timeout: Duration::ZERO,
                ..DockerAttestorConfig::default()
            }),
            DockerConfigError::BadTimeout
        );
        assert!(matches!(
            bad(DockerAttestorConfig {
                env_allow: vec!["A=B".into()],
                ..DockerAttestorConfig::default()
            }),
            DockerConfigError::BadEnvName { .. }
        ));
        assert_eq!(
            bad(DockerAttestorConfig {
                env_allow: (0..=MAX_ENV_ALLOW).map(|i| format!("V{i}")).collect(),
                ..DockerAttestorConfig::default()
            }),
            DockerConfigError::TooManyEnv { max: MAX_ENV_ALLOW }
        );
    }

    #[test]
    fn invalidation_wins_over_an_inspect_in_flight() {
        let mut cache = Cache::default();
        let sels = Arc::new(vec![Selector::new(KIND, "label:app:a").unwrap()]);
        let g = cache.generation;
        cache.insert(ID, g, sels.clone());
        assert!(cache.get(ID).is_some());
        assert!(cache.remove(ID));
        assert!(cache.get(ID).is_none());
        // An inspect that began before the event must not put the container back.
        cache.insert(ID, g, sels.clone());
        assert!(cache.get(ID).is_none());
        cache.insert(ID, cache.generation, sels.clone());
        assert!(cache.get(ID).is_some());
        cache.clear();
        assert!(cache.get(ID).is_none());
        // Nor may one that began before a clear (the event stream restarted).
        let g = cache.generation;
        cache.clear();
        cache.insert(ID, g, sels);
        assert!(cache.get(ID).is_none());
    }

    #[test]
    fn an_event_about_another_container_does_not_void_an_inspect() {
        let mut cache = Cache::default();
        let sels = Arc::new(vec![Selector::new(KIND, "label:app:a").unwrap()]);
        let g = cache.generation;
        // Other containers come and go while ID's inspect is in flight.
        assert!(!cache.remove("other-1"));
        assert!(!cache.remove("other-2"));
        cache.insert(ID, g, sels.clone());
        assert!(
            cache.get(ID).is_some(),
            "an unrelated event voided the insert"
        );
        // ID's own event still wins, among others.
        let g = cache.generation;
        assert!(cache.remove(ID));
        cache.remove("other-3");
        cache.insert(ID, g, sels.clone());
        assert!(cache.get(ID).is_none());
        // More events than are remembered: the insert is refused (unknown whose).
        let g = cache.generation;
        for i in 0..=RECENT_REMOVALS {
            cache.remove(&format!("c{i}"));
        }
        cache.insert(ID, g, sels);
        assert!(cache.get(ID).is_none());
        assert!(cache.removed.len() <= RECENT_REMOVALS);
    }

    #[test]
    fn warnings_are_rate_limited() {
        #[derive(Debug)]
        struct Fixed(Mutex<SystemTime>);
        impl Clock for Fixed {
            fn now(&self) -> SystemTime {
                *self.0.lock().unwrap()
            }
        }
        let clock = Arc::new(Fixed(Mutex::new(SystemTime::UNIX_EPOCH)));
        let limit = RateLimit::new(clock.clone());
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        *clock.0.lock().unwrap() += WARN_INTERVAL;
        assert_eq!(limit.allow(), Some(2));
    }

    /// A process directory with a cgroup file naming container `ID`.
    fn fake_proc(pid: i32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("cgroup"), format!("0::/docker/{ID}\n")).unwrap();
        dir
    }

    fn attestor(socket: &Path, proc_root: &Path) -> DockerAttestor {
        DockerAttestor::new(DockerAttestorConfig {
            socket_path: socket.to_owned(),
            timeout: Duration::from_millis(300),
            env_allow: Vec::new(),
            proc_root: proc_root.to_owned(),
        })
    }

    const CALLER: Caller = Caller {
        pid: 7,
        uid: 0,
        gid: 0,
    };

    #[tokio::test]
    async fn daemon_down_gives_no_selectors_and_no_error() {
        let proc = fake_proc(CALLER.pid);
        let dir = tempfile::tempdir().unwrap();
        // No socket at all.
        let a = attestor(&dir.path().join("absent.sock"), proc.path());
        assert!(a.attest(&CALLER).await.unwrap().is_empty());
        // A socket nobody accepts on (bound, not listening: connect is refused).
        let refused = dir.path().join("refused.sock");
        let listener = std::os::unix::net::UnixListener::bind(&refused).unwrap();
        drop(listener);
        let a = attestor(&refused, proc.path());
        assert!(a.attest(&CALLER).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn in_a_chain_a_down_daemon_leaves_the_other_selectors() {
        let proc = fake_proc(CALLER.pid);
        let dir = tempfile::tempdir().unwrap();
        let unix = Selector::new("unix", "uid:0").unwrap();
        let chain = super::super::Attestors::new()
            .with(
                "unix",
                Arc::new(super::super::StaticAttestor::new(vec![unix.clone()])),
            )
            .with(
                "docker",
                Arc::new(attestor(&dir.path().join("absent.sock"), proc.path())),
            );
        let got = chain
            .attest_for(&CALLER, Arc::new(super::super::AllSelectors))
            .await
            .unwrap();
        assert_eq!(got.selectors, [unix]);
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_costs_one_timeout() {
        let proc = fake_proc(CALLER.pid);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts and reads, never writes.
        let _server = AbortOnDropHandle::new(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        }));
        let a = attestor(&path, proc.path());
        // Returns (after the 300 ms timeout, not bollard's own 120 s) with no selectors.
        assert!(a.attest(&CALLER).await.unwrap().is_empty());
        assert!(a.attest(&CALLER).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn not_in_a_container_asks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("7");
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("cgroup"), "0::/user.slice/session-1.scope\n").unwrap();
        let a = attestor(Path::new("/nonexistent/docker.sock"), dir.path());
        assert!(a.attest(&CALLER).await.unwrap().is_empty());
        assert_eq!(a.api_calls(), 0);
    }

    #[tokio::test]
    async fn no_entry_wants_docker_selectors_no_call() {
        #[derive(Debug)]
        struct UnixOnly;
        impl SelectorDemand for UnixOnly {
            fn wanted(&self, _: &[Selector], _: &SelectorTypes) -> SelectorTypes {
                let mut t = SelectorTypes::default();
                t.insert("unix", "uid");
                t
            }
        }
        let proc = fake_proc(CALLER.pid);
        let a = attestor(Path::new("/nonexistent/docker.sock"), proc.path());
        let got = a.attest_for(&CALLER, Arc::new(UnixOnly)).await.unwrap();
        assert!(got.selectors.is_empty());
        assert!(got.skipped.contains(KIND, "label"));
        assert_eq!(a.api_calls(), 0);
    }
}
