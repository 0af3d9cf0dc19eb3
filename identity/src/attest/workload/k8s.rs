//! The Kubernetes workload attestor: the pod and container behind a Workload API caller,
//! from the kubelet's `/pods`, with the selectors SPIRE's `k8s` attestor gives.
//!
//! 1. The caller's container ID and pod UID come from its `/proc/<pid>/cgroup`
//!    ([`cgroup::container_info`]). A process outside a pod (no pod UID in its cgroup
//!    path) gets no `k8s` selectors and no error.
//! 2. The kubelet lists the pods of its node (`GET /pods`, on the secure port 10250 with
//!    the agent's service-account token and the kubelet CA, or on the read-only port if
//!    one is configured). The answer is read with a size limit and a timeout, parsed as
//!    `k8s-openapi` [`Pod`]s, and cached for a short time so that a burst of callers
//!    makes one request.
//! 3. The pod with that UID, and in it the container status (regular, init or ephemeral)
//!    whose `containerID` (`containerd://<id>`, `cri-o://<id>`, `docker://<id>`) is the
//!    caller's, give the selectors. A container that started before the kubelet lists
//!    it is looked for again every [`K8sAttestorConfig::poll_retry_interval`], at most
//!    [`K8sAttestorConfig::max_poll_attempts`] times (SPIRE: 60 x 500 ms, spire#3092);
//!    the wait is logged and kept in [`K8sStats`].
//!
//! | selector | value |
//! |---|---|
//! | `k8s:ns:<ns>` | the pod's namespace |
//! | `k8s:sa:<sa>` | the pod's service account |
//! | `k8s:pod-name:<name>` | the pod's name |
//! | `k8s:pod-uid:<uid>` | the pod's UID |
//! | `k8s:pod-label:<key>:<value>` | one per pod label |
//! | `k8s:pod-owner:<kind>:<name>`, `k8s:pod-owner-uid:<kind>:<uid>` | one per owner reference |
//! | `k8s:pod-image:<image>` | the image and the image ID of each (regular) container of the pod |
//! | `k8s:pod-image-count:<n>` | how many regular containers the pod has |
//! | `k8s:pod-init-image:<image>`, `k8s:pod-init-image-count:<n>` | the same for init containers |
//! | `k8s:container-name:<name>` | the caller's container |
//! | `k8s:container-image:<image>` | its image and its image ID |
//! | `k8s:node-name:<node>` | the node the pod is scheduled on |
//!
//! ```no_run
//! use writ_identity::attest::workload::k8s::{K8sAttestor, K8sAttestorConfig};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config: K8sAttestorConfig = toml::from_str(r#"
//!     node_name = "node-1"
//!     kubelet_ca_path = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
//! "#)?;
//! let attestor = K8sAttestor::new(config)?;
//! let cgroup = std::fs::read_to_string("/proc/4242/cgroup")?;
//! for selector in attestor.attest_cgroup(&cgroup).await? {
//!     println!("{selector}"); // k8s:ns:default, k8s:sa:web, ...
//! }
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde::Deserialize;
use tokio::time::Instant;

use super::cgroup::{self, ContainerInfo};
use super::{AttestError, Caller, WorkloadAttestor};
use crate::duration::ConfigDuration;
use crate::selector::{K8S_TYPE, Selector};

/// The kubelet's secure port.
pub const DEFAULT_KUBELET_SECURE_PORT: u16 = 10250;
/// The service-account token the agent authenticates to the kubelet with.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA, which signs the kubelet's serving certificate in most clusters.
pub const DEFAULT_KUBELET_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The environment variable the node name is read from by default (the downward API).
pub const DEFAULT_NODE_NAME_ENV: &str = "MY_NODE_NAME";
/// Largest kubelet `/pods` answer read (a node with 110 pods answers well under 4 MiB).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// `[workload_attestors.k8s]`: how the agent reaches the kubelet and how long it waits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K8sAttestorConfig {
    /// The node's name. When absent, read from [`Self::node_name_env`].
    pub node_name: Option<String>,
    /// The environment variable holding the node name (`MY_NODE_NAME`).
    pub node_name_env: String,
    /// Where the kubelet listens (`127.0.0.1`: the agent runs with host networking).
    pub kubelet_host: String,
    /// The kubelet's secure port (10250).
    pub kubelet_secure_port: u16,
    /// The kubelet's read-only port (plain HTTP, no authentication). When set, it is
    /// used instead of the secure port.
    pub kubelet_read_only_port: Option<u16>,
    /// CA certificates (PEM) that verify the kubelet's serving certificate.
    pub kubelet_ca_path: PathBuf,
    /// The name the kubelet's certificate is checked against (default: the node name,
    /// else the host).
    pub kubelet_tls_server_name: Option<String>,
    /// The bearer token presented to the kubelet (re-read when it rotates).
    pub token_path: PathBuf,
    /// The longest one kubelet request may take, connect to last byte (5s).
    pub request_timeout: ConfigDuration,
    /// Largest kubelet answer accepted, in bytes.
    pub max_response_bytes: usize,
    /// How long a pod list serves later callers (1s). A caller whose container is not
    /// in the cached list always gets a fresh one.
    pub pod_list_cache_ttl: ConfigDuration,
    /// How often a container the kubelet does not list yet is looked for (500ms).
    pub poll_retry_interval: ConfigDuration,
    /// How many times it is looked for before attestation fails (60).
    pub max_poll_attempts: u32,
    /// Escape hatches that weaken attestation.
    pub dangerous: K8sDangerousConfig,
}

/// `[workload_attestors.k8s.dangerous]`: settings that let a network attacker choose a
/// workload's selectors. Each logs a warning when used.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sDangerousConfig {
    /// DANGEROUS: accept any certificate from the kubelet. Whoever can answer on the
    /// kubelet's address then names every workload's pod.
    #[serde(default)]
    pub skip_kubelet_verification: bool,
}

impl Default for K8sAttestorConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            node_name_env: DEFAULT_NODE_NAME_ENV.to_owned(),
            kubelet_host: "127.0.0.1".to_owned(),
            kubelet_secure_port: DEFAULT_KUBELET_SECURE_PORT,
            kubelet_read_only_port: None,
            kubelet_ca_path: PathBuf::from(DEFAULT_KUBELET_CA_PATH),
            kubelet_tls_server_name: None,
            token_path: PathBuf::from(DEFAULT_TOKEN_PATH),
            request_timeout: ConfigDuration::from(Duration::from_secs(5)),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            pod_list_cache_ttl: ConfigDuration::from(Duration::from_secs(1)),
            poll_retry_interval: ConfigDuration::from(Duration::from_millis(500)),
            max_poll_attempts: 60,
            dangerous: K8sDangerousConfig::default(),
        }
    }
}

/// Why the k8s attestor could not attest a caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The configuration is unusable.
    #[error("k8s attestor configuration: {0}")]
    Config(String),
    /// The kubelet could not be reached or refused the request.
    #[error("kubelet request failed: {0}")]
    Kubelet(String),
    /// The kubelet answered with an error status.
    #[error("kubelet answered HTTP {status}")]
    Status {
        /// The HTTP status.
        status: u16,
    },
    /// The kubelet did not answer within the request timeout.
    #[error("kubelet did not answer within {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The kubelet's answer is larger than the limit.
    #[error("kubelet answer is larger than {max} bytes")]
    TooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// The kubelet's answer is not a pod list.
    #[error("kubelet answer is not a pod list: {0}")]
    Malformed(String),
    /// The caller's pod or container was not listed by the kubelet within the window.
    #[error(
        "container {container_id} of pod {pod_uid} is not listed by the kubelet after \
         {attempts} attempts ({waited:?})"
    )]
    NotListed {
        /// The container ID from the caller's cgroup.
        container_id: String,
        /// The pod UID from the caller's cgroup.
        pod_uid: String,
        /// How many pod lists were searched.
        attempts: u32,
        /// How long the search took.
        waited: Duration,
    },
    /// The caller's cgroup could not be read.
    #[error("cannot read the caller's cgroup: {0}")]
    Cgroup(String),
}

impl From<K8sError> for AttestError {
    fn from(e: K8sError) -> Self {
        // AttestError has no variant for a remote source yet; the message stays whole.
        AttestError::Io {
            path: PathBuf::from("kubelet /pods"),
            source: std::io::Error::other(e),
        }
    }
}

/// What the attestor has done, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct K8sStats {
    /// Pod lists fetched from the kubelet.
    pub kubelet_requests: u64,
    /// Lookups answered from the cached pod list.
    pub cache_hits: u64,
    /// Attestations that had to wait for the kubelet to list the container.
    pub waited_attestations: u64,
    /// The wait of the last such attestation.
    pub last_wait: Duration,
    /// The longest such wait.
    pub max_wait: Duration,
}

#[derive(Debug, Default)]
struct Counters {
    kubelet_requests: AtomicU64,
    cache_hits: AtomicU64,
    waited_attestations: AtomicU64,
    last_wait_us: AtomicU64,
    max_wait_us: AtomicU64,
}

#[derive(Debug)]
struct CachedPods {
    fetched_at: Instant,
    pods: Arc<Vec<Pod>>,
}

/// The kubelet's pod list as it answers `GET /pods`.
#[derive(Debug, Deserialize)]
struct PodList {
    items: Vec<Pod>,
}

/// The Kubernetes workload attestor.
pub struct K8sAttestor {
    client: kube::Client,
    request_timeout: Duration,
    max_response_bytes: usize,
    cache_ttl: Duration,
    retry_interval: Duration,
    max_attempts: u32,
    proc_root: PathBuf,
    cache: tokio::sync::Mutex<Option<CachedPods>>,
    counters: Counters,
}

impl std::fmt::Debug for K8sAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sAttestor")
            .field("request_timeout", &self.request_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("cache_ttl", &self.cache_ttl)
            .field("retry_interval", &self.retry_interval)
            .field("max_attempts", &self.max_attempts)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl K8sAttestor {
    /// An attestor from its configuration. Reads the kubelet CA file; the token file is
    /// read at each request (it rotates).
    ///
    /// # Errors
    /// [`K8sError::Config`] if the CA file is unreadable or the address is malformed.
    pub fn new(config: K8sAttestorConfig) -> Result<Self, K8sError> {
        let bad = |e: String| K8sError::Config(e);
        let node_name = config
            .node_name
            .clone()
            .or_else(|| std::env::var(&config.node_name_env).ok())
            .filter(|n| !n.is_empty());
        let host = &config.kubelet_host;
        let url = match config.kubelet_read_only_port {
            Some(port) => format!("http://{}:{port}", url_host(host)),
            None => format!("https://{}:{}", url_host(host), config.kubelet_secure_port),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e| bad(format!("kubelet address {url:?}: {e}")))?;
        let mut kc = kube::Config::new(uri);
        kc.default_retry = false;
        kc.connect_timeout = Some(config.request_timeout.get());
        kc.read_timeout = Some(config.request_timeout.get());
        kc.write_timeout = Some(config.request_timeout.get());
        if config.kubelet_read_only_port.is_none() {
            if config.dangerous.skip_kubelet_verification {
                tracing::warn!(
                    "skip_kubelet_verification: any server on {url} is trusted to name pods"
                );
                kc.accept_invalid_certs = true;
            } else {
                let pem = std::fs::read(&config.kubelet_ca_path).map_err(|e| {
                    bad(format!(
                        "kubelet_ca_path {}: {e}",
                        config.kubelet_ca_path.display()
                    ))
                })?;
                kc.root_cert = Some(pem_certificates(&pem).map_err(|e| {
                    bad(format!(
                        "kubelet_ca_path {}: {e}",
                        config.kubelet_ca_path.display()
                    ))
                })?);
            }
            kc.tls_server_name = config
                .kubelet_tls_server_name
                .clone()
                .or_else(|| node_name.clone());
            kc.auth_info.token_file = Some(config.token_path.to_string_lossy().into_owned());
        }
        let client = kube::Client::try_from(kc).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            client,
            request_timeout: config.request_timeout.get(),
            max_response_bytes: config.max_response_bytes,
            cache_ttl: config.pod_list_cache_ttl.get(),
            retry_interval: config.poll_retry_interval.get(),
            max_attempts: config.max_poll_attempts.max(1),
            proc_root: PathBuf::from("/proc"),
            cache: tokio::sync::Mutex::new(None),
            counters: Counters::default(),
        })
    }

    /// Reads callers' cgroups under `root` instead of `/proc` (tests).
    #[must_use]
    pub fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    /// What the attestor has done so far.
    pub fn stats(&self) -> K8sStats {
        let c = &self.counters;
        K8sStats {
            kubelet_requests: c.kubelet_requests.load(Ordering::Relaxed),
            cache_hits: c.cache_hits.load(Ordering::Relaxed),
            waited_attestations: c.waited_attestations.load(Ordering::Relaxed),
            last_wait: Duration::from_micros(c.last_wait_us.load(Ordering::Relaxed)),
            max_wait: Duration::from_micros(c.max_wait_us.load(Ordering::Relaxed)),
        }
    }

    /// The selectors of a process whose `/proc/<pid>/cgroup` reads `cgroup`.
    ///
    /// # Errors
    /// As [`Self::attest_container`].
    pub async fn attest_cgroup(&self, cgroup: &str) -> Result<Vec<Selector>, K8sError> {
        self.attest_container(&cgroup::container_info(cgroup)).await
    }

    /// The selectors of a container: none when it is not in a pod; otherwise those of
    /// its pod and container status, waiting (bounded) for the kubelet to list it.
    ///
    /// # Errors
    /// [`K8sError`] when the kubelet fails, answers garbage, or does not list the
    /// container within the poll window.
    pub async fn attest_container(&self, info: &ContainerInfo) -> Result<Vec<Selector>, K8sError> {
        let (Some(container_id), Some(pod_uid)) = (&info.container_id, &info.pod_uid) else {
            return Ok(Vec::new());
        };
        let started = Instant::now();
        let mut fresher_than = None;
        for attempt in 1..=self.max_attempts {
            let (pods, fetched_at) = self.pods(fresher_than).await?;
            if let Some(selectors) = find(&pods, pod_uid, container_id) {
                if attempt > 1 {
                    self.record_wait(started.elapsed(), attempt, container_id);
                }
                return Ok(selectors);
            }
            if attempt < self.max_attempts {
                tokio::time::sleep(self.retry_interval).await;
            }
            fresher_than = Some(fetched_at);
        }
        let waited = started.elapsed();
        tracing::warn!(container = %container_id, pod_uid = %pod_uid, ?waited, "the kubelet does not list the caller's container");
        Err(K8sError::NotListed {
            container_id: container_id.clone(),
            pod_uid: pod_uid.clone(),
            attempts: self.max_attempts,
            waited,
        })
    }

    fn record_wait(&self, waited: Duration, attempts: u32, container_id: &str) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        let c = &self.counters;
        c.waited_attestations.fetch_add(1, Ordering::Relaxed);
        c.last_wait_us.store(us, Ordering::Relaxed);
        c.max_wait_us.fetch_max(us, Ordering::Relaxed);
        tracing::info!(container = %container_id, attempts, ?waited, "the kubelet listed the container after a wait");
    }

    /// The pod list: the cached one if it is younger than the TTL and fetched after
    /// `fresher_than`, else a new one. Callers wait on one fetch together.
    async fn pods(
        &self,
        fresher_than: Option<Instant>,
    ) -> Result<(Arc<Vec<Pod>>, Instant), K8sError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && c.fetched_at.elapsed() < self.cache_ttl
            && fresher_than.is_none_or(|t| c.fetched_at > t)
        {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok((c.pods.clone(), c.fetched_at));
        }
        let fetched_at = Instant::now();
        self.counters
            .kubelet_requests
            .fetch_add(1, Ordering::Relaxed);
        let pods = Arc::new(self.fetch_pods().await?);
        *cache = Some(CachedPods {
            fetched_at,
            pods: pods.clone(),
        });
        Ok((pods, fetched_at))
    }

    async fn fetch_pods(&self) -> Result<Vec<Pod>, K8sError> {
        let body = tokio::time::timeout(self.request_timeout, self.fetch_body())
            .await
            .map_err(|_| K8sError::Timeout {
                after: self.request_timeout,
            })??;
        parse_pod_list(&body)
    }

    async fn fetch_body(&self) -> Result<Vec<u8>, K8sError> {
        let request = http::Request::get("/pods")
            .body(kube::client::Body::empty())
            .map_err(|e| K8sError::Kubelet(e.to_string()))?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| K8sError::Kubelet(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            return Err(K8sError::Status {
                status: status.as_u16(),
            });
        }
        let max = self.max_response_bytes;
        let declared = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(K8sError::TooLarge { max });
        }
        let limited = http_body_util::Limited::new(response.into_body(), max);
        match limited.collect().await {
            Ok(collected) => Ok(collected.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(K8sError::TooLarge { max }),
            Err(e) => Err(K8sError::Kubelet(e.to_string())),
        }
    }
}

/// A host as it goes in a URL (IPv6 in brackets).
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The DER certificates of a PEM file.
fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text".to_owned())?;
    let certs: Vec<Vec<u8>> = crate::svid::x509::chain_from_pem(text)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    if certs.is_empty() {
        return Err("no certificate in the file".to_owned());
    }
    Ok(certs)
}

/// Parses the kubelet's `/pods` answer.
///
/// # Errors
/// [`K8sError::Malformed`] with serde's reason (line and column) when it is not a
/// `PodList` of `v1` pods.
pub fn parse_pod_list(body: &[u8]) -> Result<Vec<Pod>, K8sError> {
    serde_json::from_slice::<PodList>(body)
        .map(|l| l.items)
        .map_err(|e| K8sError::Malformed(e.to_string()))
}

/// The ID part of a status's `containerID` (`containerd://<id>` -> `<id>`).
fn status_container_id(status: &ContainerStatus) -> Option<&str> {
    let full = status.container_id.as_deref()?;
    Some(full.split_once("://").map_or(full, |(_, id)| id))
}

/// The selectors of the container `container_id` in the pod `pod_uid`, if listed.
pub fn find(pods: &[Pod], pod_uid: &str, container_id: &str) -> Option<Vec<Selector>> {
    let pod = pods
        .iter()
        .find(|p| p.metadata.uid.as_deref() == Some(pod_uid))?;
    let status = pod.status.as_ref()?;
    let container = [
        status.container_statuses.as_deref(),
        status.init_container_statuses.as_deref(),
        status.ephemeral_container_statuses.as_deref(),
    ]
    .into_iter()
    .flatten()
    .flatten()
    .find(|c| status_container_id(c) == Some(container_id))?;
    Some(selectors_of(pod, container))
}

/// SPIRE's `k8s` selectors of a pod and one of its container statuses.
pub fn selectors_of(pod: &Pod, container: &ContainerStatus) -> Vec<Selector> {
    let mut values = Vec::new();
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    if let Some(ns) = &meta.namespace {
        values.push(format!("ns:{ns}"));
    }
    let sa = spec
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    values.push(format!("sa:{sa}"));
    if let Some(name) = &meta.name {
        values.push(format!("pod-name:{name}"));
    }
    if let Some(uid) = &meta.uid {
        values.push(format!("pod-uid:{uid}"));
    }
    if let Some(node) = spec.and_then(|s| s.node_name.as_deref()) {
        values.push(format!("node-name:{node}"));
    }
    for (k, v) in meta.labels.iter().flatten() {
        values.push(format!("pod-label:{k}:{v}"));
    }
    for owner in meta.owner_references.iter().flatten() {
        values.push(format!("pod-owner:{}:{}", owner.kind, owner.name));
        values.push(format!("pod-owner-uid:{}:{}", owner.kind, owner.uid));
    }
    let status = pod.status.as_ref();
    let regular = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    let init = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default();
    values.push(format!("pod-image-count:{}", regular.len()));
    values.push(format!("pod-init-image-count:{}", init.len()));
    for (key, statuses) in [("pod-image", regular), ("pod-init-image", init)] {
        for c in statuses {
            for image in images(c) {
                values.push(format!("{key}:{image}"));
            }
        }
    }
    values.push(format!("container-name:{}", container.name));
    for image in images(container) {
        values.push(format!("container-image:{image}"));
    }
    let mut out: Vec<Selector> = values
        .iter()
        .filter_map(|v| match Selector::new(K8S_TYPE, v) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "leaving out a k8s selector that is not one");
                None
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The image and the image ID of a container status, those not empty.
fn images(c: &ContainerStatus) -> impl Iterator<Item = &str> {
    [c.image.as_str(), c.image_id.as_str()]
        .into_iter()
        .filter(|i| !i.is_empty())
}

#[async_trait::async_trait]
impl WorkloadAttestor for K8sAttestor {
    async fn attest(&self, caller: &Caller) -> Result<Vec<Selector>, AttestError> {
        let (root, pid) = (self.proc_root.clone(), caller.pid);
        let info = tokio::task::spawn_blocking(move || cgroup::container_of_pid(&root, pid))
            .await
            .map_err(AttestError::TaskFailed)??;
        Ok(self.attest_container(&info).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD_LIST: &str = include_str!("../../../../specs/vectors/k8s/kubelet_pods.json");
    const CONTAINER: &str = "9d5f2a4e0c1b3a7d8e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";
    const POD_UID: &str = "5a1c7e9e-3b2f-4c8d-9a6e-1f2b3c4d5e6f";

    fn texts(s: &[Selector]) -> Vec<String> {
        s.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn recorded_pod_list_gives_spire_selectors() {
        let pods = parse_pod_list(POD_LIST.as_bytes()).unwrap();
        let selectors = texts(&find(&pods, POD_UID, CONTAINER).unwrap());
        for expected in [
            "k8s:ns:payments",
            "k8s:sa:checkout",
            "k8s:pod-name:checkout-7d9f8c6b5-x2x7q",
            &format!("k8s:pod-uid:{POD_UID}"),
            "k8s:pod-label:app:checkout",
            "k8s:node-name:node-1",
            "k8s:container-name:checkout",
            "k8s:container-image:registry.example/checkout:1.4.2",
            "k8s:pod-image:registry.example/checkout:1.4.2",
            "k8s:pod-image:registry.example/log-shipper:0.9",
            "k8s:pod-image-count:2",
            "k8s:pod-init-image-count:1",
            "k8s:pod-owner:ReplicaSet:checkout-7d9f8c6b5",
        ] {
            assert!(
                selectors.iter().any(|s| s == expected),
                "{expected} in {selectors:#?}"
            );
        }
        for s in find(&pods, POD_UID, CONTAINER).unwrap() {
            s.check_value().unwrap();
        }
    }

    #[test]
    fn init_and_ephemeral_containers_are_found() {
        let pods = parse_pod_list(POD_LIST.as_bytes()).unwrap();
        let init = "1111111111111111111111111111111111111111111111111111111111111111";
        let s = texts(&find(&pods, POD_UID, init).unwrap());
        assert!(
            s.contains(&"k8s:container-name:migrate".to_owned()),
            "{s:?}"
        );
        let debug = "2222222222222222222222222222222222222222222222222222222222222222";
        let s = texts(&find(&pods, POD_UID, debug).unwrap());
        assert!(
            s.contains(&"k8s:container-name:debugger".to_owned()),
            "{s:?}"
        );
        // The pod UID must match too: the right container under the wrong pod is nothing.
        assert!(find(&pods, "0000", CONTAINER).is_none());
        assert!(find(&pods, POD_UID, &"3".repeat(64)).is_none());
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"items\": 3}",
            b"{\"items\": [{\"apiVersion\": \"v2\"}]}",
            b"\xff\xfe",
        ] {
            let e = parse_pod_list(bad).unwrap_err();
            assert!(matches!(e, K8sError::Malformed(_)), "{e}");
            assert!(
                e.to_string()
                    .starts_with("kubelet answer is not a pod list")
            );
        }
        // Deep nesting stops at serde_json's recursion limit, not the stack.
        let deep = format!(
            "{{\"items\": {}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(parse_pod_list(deep.as_bytes()).is_err());
    }

    #[tokio::test]
    async fn not_in_a_pod_means_no_selectors() {
        let config = K8sAttestorConfig {
            kubelet_read_only_port: Some(1),
            ..K8sAttestorConfig::default()
        };
        let a = K8sAttestor::new(config).unwrap();
        // A Docker container (no pod UID) and a host process: no kubelet request made.
        let docker = format!("0::/system.slice/docker-{CONTAINER}.scope\n");
        assert!(a.attest_cgroup(&docker).await.unwrap().is_empty());
        assert!(
            a.attest_cgroup("0::/user.slice/session-1.scope\n")
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(a.stats().kubelet_requests, 0);
    }

    #[test]
    fn config_defaults_and_refusals() {
        let c: K8sAttestorConfig = toml::from_str("").unwrap();
        assert_eq!(c.kubelet_secure_port, 10250);
        assert_eq!(c.max_poll_attempts, 60);
        assert_eq!(c.poll_retry_interval.get(), Duration::from_millis(500));
        assert!(toml::from_str::<K8sAttestorConfig>("skip_kubelet_verification = true").is_err());
        let c: K8sAttestorConfig =
            toml::from_str("[dangerous]\nskip_kubelet_verification = true").unwrap();
        assert!(c.dangerous.skip_kubelet_verification);
        let missing = K8sAttestorConfig {
            kubelet_ca_path: PathBuf::from("/nonexistent/ca.crt"),
            ..K8sAttestorConfig::default()
        };
        let e = K8sAttestor::new(missing).unwrap_err().to_string();
        assert!(e.contains("kubelet_ca_path"), "{e}");
    }
}
