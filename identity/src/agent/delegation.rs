//! Sub-agents on the agent side: the `writ.delegation.v1.SubAgents` service on the
//! Workload API socket, and the watch that ends a lease with its parent.
//!
//! - **Register**: the caller is attested like any Workload API caller. The kernel must
//!   report it as the parent of the child pid (`/proc/<pid>/stat`); the child's start
//!   time is recorded so that a reused pid never inherits the identity. The server
//!   re-checks the spawn policy and grants the lease; the agent signs the child's first
//!   SVID before answering, so the child can fetch it at once.
//! - **The child is an ordinary workload**: the Workload API matches it by (pid, start
//!   time) and gives it its own SVID only, never the identities its selectors (same uid
//!   as the parent) would match, and none at all once the lease ended.
//! - **The watch** ([`Delegation::run`], every [`WATCH_INTERVAL`]): a lease ends when the
//!   parent process exits, the parent loses its identity (its entry is gone or its own
//!   lease ended), or the lease expires; an ended child is forgotten once its process
//!   exits. Child SVIDs are renewed at half-life, never past the lease (the server caps
//!   them).
//! - **After an agent restart** the parents of old leases can no longer be watched, so
//!   they are released at once; their children keep getting no identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::cache::{Cache, CachedChild, CachedSvid, renew_time};
use super::workload_api::{Attested, WorkloadApi, WorkloadApiError};
use crate::attest::workload::{AttestError, read_stat};
use crate::clock::unix_seconds;
use crate::entry::RegistrationEntry;
use crate::key_manager::PrivateKey;
use crate::key_manager::ToRcgen as _;
use crate::proto::delegation as pb;
use crate::server::lease::{ChildRequest, valid_task};
use crate::server::node::NodeError;
use crate::spiffe_id::SpiffeId;
use crate::store::LeaseRecord;

pub use pb::sub_agents_server::SubAgentsServer;

/// How often leases are checked against their processes and renewed.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Longest TTL a request may name (larger ones are capped by the policy anyway).
const MAX_TTL_SECONDS: i64 = 366 * 24 * 3600;

/// Why a delegation call failed. Mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DelegationError {
    /// The caller could not be attested, or has no identity.
    #[error(transparent)]
    Caller(#[from] WorkloadApiError),
    /// A request field is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The kernel does not back the request (not the caller's child, pid reused, gone).
    #[error("{0}")]
    Process(String),
    /// The caller holds no such lease.
    #[error("no lease {0:?} held by the caller")]
    UnknownLease(String),
    /// The server refused or could not be reached.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<DelegationError> for Status {
    fn from(e: DelegationError) -> Status {
        match e {
            DelegationError::Caller(inner) => inner.into(),
            DelegationError::Invalid(_) => Status::invalid_argument(e.to_string()),
            DelegationError::Process(_) => Status::failed_precondition(e.to_string()),
            DelegationError::UnknownLease(_) => Status::not_found(e.to_string()),
            DelegationError::Node(NodeError::SpawnRefused(_)) => {
                Status::failed_precondition(e.to_string())
            }
            DelegationError::Node(NodeError::SpawnLimit(_)) => {
                Status::resource_exhausted(e.to_string())
            }
            DelegationError::Node(NodeError::Invalid(_)) => Status::invalid_argument(e.to_string()),
            DelegationError::Node(NodeError::LeaseEnded(_)) => Status::not_found(e.to_string()),
            DelegationError::Node(inner) => WorkloadApiError::Node(inner).into(),
        }
    }
}

/// The delegation service and lease watch over an agent's cache.
#[derive(Debug, Clone)]
pub struct Delegation {
    api: WorkloadApi,
}

/// The identity a caller spawns under.
struct Parent {
    id: SpiffeId,
    entry_id: Option<String>,
    expires_at: i64,
}

impl Delegation {
    /// The service over the Workload API's cache, attestor and `/proc` root.
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    /// The attested caller of a gRPC request, or the status refusing it.
    async fn attested<T>(&self, request: &Request<T>) -> Result<Attested, Status> {
        Ok(self
            .api
            .caller(request)
            .await
            .map_err(DelegationError::from)?)
    }

    fn cache(&self) -> &Arc<Cache> {
        self.api.cache()
    }

    fn proc_root(&self) -> PathBuf {
        self.api.proc_root().to_path_buf()
    }

    /// The identities the caller holds: its own sub-agent identity, or its entries'.
    fn caller_ids(&self, caller: &Attested) -> Vec<SpiffeId> {
        let (_, svids) = self.api.identities(caller);
        svids.iter().map(|c| c.entry.spiffe_id.clone()).collect()
    }

    /// Which of the caller's identities spawns: a sub-agent spawns under its own ID;
    /// otherwise the first matching entry (with `wanted`'s ID, if given) that has a spawn
    /// policy, or the first at all (the server then refuses it).
    fn parent(
        &self,
        caller: &Attested,
        wanted: Option<&SpiffeId>,
    ) -> Result<Parent, DelegationError> {
        let snapshot = self.cache().snapshot();
        if let Some(child) = snapshot.child_process(caller.pid, caller.start_time) {
            let svid = child.svid.as_ref().ok_or_else(|| {
                NodeError::SpawnRefused("the caller's own lease has ended".into())
            })?;
            return Ok(Parent {
                id: child.lease.child_id.clone(),
                entry_id: None,
                expires_at: child
                    .lease
                    .expires_at
                    .min(unix_seconds(svid.svid.expires_at)),
            });
        }
        let (_, svids) = self.api.identities(caller);
        let candidates: Vec<&Arc<CachedSvid>> = svids
            .iter()
            .filter(|c| wanted.is_none_or(|id| &c.entry.spiffe_id == id))
            .collect();
        let chosen = candidates
            .iter()
            .find(|c| can_spawn(&c.entry))
            .or_else(|| candidates.first())
            .ok_or_else(|| self.api.no_identity(caller))?;
        Ok(Parent {
            id: chosen.entry.spiffe_id.clone(),
            entry_id: Some(chosen.entry.id.clone()),
            expires_at: unix_seconds(chosen.svid.expires_at),
        })
    }

    /// Registers `request.pid` as a sub-agent of the caller.
    ///
    /// # Errors
    /// [`DelegationError`] naming the refusal.
    pub async fn register(
        &self,
        caller: &Attested,
        request: pb::RegisterRequest,
    ) -> Result<LeaseRecord, DelegationError> {
        if !valid_task(&request.task) {
            return Err(DelegationError::Invalid(
                "task must match [a-z0-9-]{1,32}".into(),
            ));
        }
        if !(0..=MAX_TTL_SECONDS).contains(&request.ttl_seconds) {
            return Err(DelegationError::Invalid(format!(
                "ttl_seconds must be between 0 and {MAX_TTL_SECONDS}"
            )));
        }
        let wanted = if request.parent_spiffe_id.is_empty() {
            None
        } else {
            Some(
                SpiffeId::new(&request.parent_spiffe_id)
                    .map_err(|e| DelegationError::Invalid(format!("parent_spiffe_id: {e}")))?,
            )
        };
        let parent = self.parent(caller, wanted.as_ref())?;
        // The kernel's evidence: the child's parent is the caller, and it is the process
        // the caller saw.
        let root = self.proc_root();
        let pid = request.pid;
        let stat = tokio::task::spawn_blocking(move || read_stat(&root, pid))
            .await
            .map_err(|e| DelegationError::Process(e.to_string()))?
            .map_err(|e| match e {
                AttestError::InvalidPid { .. } => {
                    DelegationError::Invalid(format!("pid {pid} is not a process id"))
                }
                other => DelegationError::Process(format!("process {pid}: {other}")),
            })?;
        if stat.ppid() != caller.pid || stat.is_exited() {
            return Err(DelegationError::Process(format!(
                "process {pid} is not a running child of the caller"
            )));
        }
        if request.start_time != 0 && request.start_time != stat.start_time() {
            return Err(DelegationError::Process(format!(
                "process {pid} is not the process the caller started (pid reused)"
            )));
        }
        if self
            .cache()
            .snapshot()
            .child_process(pid, stat.start_time())
            .is_some()
        {
            return Err(DelegationError::Process(format!(
                "process {pid} is already a sub-agent"
            )));
        }
        let lease = self
            .cache()
            .node()
            .register_child(&ChildRequest {
                parent_id: parent.id,
                parent_entry_id: parent.entry_id,
                child_pid: pid,
                child_start_time: stat.start_time(),
                task: request.task,
                ttl_seconds: request.ttl_seconds,
                parent_expires_at: parent.expires_at,
            })
            .await?;
        let svid = match self.sign(&lease).await {
            Ok(svid) => svid,
            Err(e) => {
                let _ = self.cache().node().release_child(&lease.id).await;
                return Err(e.into());
            }
        };
        let child = CachedChild {
            lease: lease.clone(),
            parent_process: Some((caller.pid, caller.start_time)),
            svid: Some(svid),
        };
        self.cache()
            .update_children(|children| {
                children.push(Arc::new(child));
                true
            })
            .await;
        Ok(lease)
    }

    /// A fresh SVID for the lease's child, with a new key.
    async fn sign(&self, lease: &LeaseRecord) -> Result<Arc<CachedSvid>, NodeError> {
        let key = PrivateKey::generate().map_err(|e| NodeError::Invalid(e.to_string()))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(
            &key.to_rcgen()
                .map_err(|e| NodeError::Invalid(e.to_string()))?,
        );
        let mut svid = self
            .cache()
            .node()
            .sign_child_x509_svid(&lease.id, &spki)
            .await?;
        svid.private_key = Some(key);
        let now = self.cache().clock().unix_seconds();
        let mut entry =
            RegistrationEntry::new(lease.child_id.clone(), lease.parent_id.clone(), Vec::new());
        entry.id.clone_from(&lease.id);
        entry.created_at = lease.created_at;
        entry.hint = format!("sub-agent:{}", lease.task);
        Ok(Arc::new(CachedSvid {
            renew_at: renew_time(now, unix_seconds(svid.expires_at)),
            entry,
            svid,
            lease_id: Some(lease.id.clone()),
            template: None,
        }))
    }

    /// Releases the caller's lease `id` (and every lease under it).
    ///
    /// # Errors
    /// [`DelegationError::UnknownLease`] if the caller is not the lease's parent.
    pub async fn release(
        &self,
        caller: &Attested,
        id: &str,
    ) -> Result<LeaseRecord, DelegationError> {
        let mine = self.caller_ids(caller);
        let held = self
            .cache()
            .snapshot()
            .children
            .iter()
            .find(|c| c.lease.id == id && mine.contains(&c.lease.parent_id))
            .map(|c| c.lease.clone())
            .ok_or_else(|| DelegationError::UnknownLease(id.chars().take(64).collect()))?;
        if held.released_at.is_some() {
            return Ok(held);
        }
        let released = self.cache().node().release_child(id).await?;
        self.mark_ended(&released).await;
        Ok(released.into_iter().find(|l| l.id == id).unwrap_or(held))
    }

    /// The leases whose parent is one of the caller's identities, live ones first.
    pub fn list(&self, caller: &Attested) -> Vec<LeaseRecord> {
        let mine = self.caller_ids(caller);
        let now = self.cache().clock().unix_seconds();
        let mut leases: Vec<LeaseRecord> = self
            .cache()
            .snapshot()
            .children
            .iter()
            .filter(|c| mine.contains(&c.lease.parent_id))
            .map(|c| c.lease.clone())
            .collect();
        leases.sort_by_key(|l| (!l.is_live(now), l.created_at));
        leases
    }

    /// Records that `released` ended: their children get no SVID from now on.
    async fn mark_ended(&self, released: &[LeaseRecord]) {
        if released.is_empty() {
            return;
        }
        self.cache()
            .update_children(|children| {
                for child in children.iter_mut() {
                    if let Some(r) = released.iter().find(|r| r.id == child.lease.id) {
                        let mut ended = CachedChild::clone(child);
                        ended.lease.released_at = r.released_at;
                        ended.svid = None;
                        *child = Arc::new(ended);
                    }
                }
                true
            })
            .await;
    }

    /// Adopts the leases the server lists for this agent after a restart: none can be
    /// watched any more, so held ones are released; all stay known while their child
    /// process lives, so it never falls back to its selectors' identities.
    ///
    /// # Errors
    /// [`NodeError`] if the server cannot be asked.
    pub async fn adopt(&self) -> Result<(), NodeError> {
        let leases = self.cache().node().list_children().await?;
        let root = self.proc_root();
        let now = self.cache().clock().unix_seconds();
        let mut adopted = Vec::new();
        for mut lease in leases {
            if !process_is(&root, lease.child_pid, lease.child_start_time).await {
                continue;
            }
            if lease.is_live(now) {
                tracing::info!(lease = %lease.id, child = %lease.child_id,
                    "releasing a sub-agent lease held before the agent restarted");
                self.cache().node().release_child(&lease.id).await?;
                lease.released_at = Some(now);
            }
            adopted.push(Arc::new(CachedChild {
                lease,
                parent_process: None,
                svid: None,
            }));
        }
        self.cache()
            .update_children(|children| {
                let changed = !adopted.is_empty();
                children.extend(adopted);
                changed
            })
            .await;
        Ok(())
    }

    /// One pass of the watch: ends leases whose parent exited or lost its identity or
    /// that expired, forgets children whose process exited, renews child SVIDs.
    pub async fn check(&self) {
        let snapshot = self.cache().snapshot();
        let now = self.cache().clock().unix_seconds();
        let root = self.proc_root();
        let mut to_release = Vec::new();
        let mut gone = Vec::new();
        let mut renewed = Vec::new();
        let mut lost = Vec::new();
        for child in &snapshot.children {
            let lease = &child.lease;
            if !process_is(&root, lease.child_pid, lease.child_start_time).await {
                gone.push(lease.id.clone());
                if child.svid.is_some() {
                    to_release.push(lease.id.clone());
                }
                continue;
            }
            let Some(svid) = &child.svid else { continue };
            let parent_alive = match child.parent_process {
                Some((pid, start)) => process_is(&root, pid, start).await,
                None => false,
            };
            let parent_holds = if lease.depth <= 1 {
                snapshot.svids.iter().any(|c| c.entry.id == lease.entry_id)
            } else {
                snapshot
                    .children
                    .iter()
                    .any(|c| c.lease.child_id == lease.parent_id && c.svid.is_some())
            };
            if !parent_alive || !parent_holds || now >= lease.expires_at {
                to_release.push(lease.id.clone());
            } else if svid.renew_at <= now {
                match self.sign(lease).await {
                    Ok(fresh) => renewed.push(fresh),
                    Err(NodeError::Unavailable(e)) => {
                        tracing::warn!(lease = %lease.id, error = %e, "child SVID renewal failed; retrying");
                    }
                    Err(e) => {
                        tracing::info!(lease = %lease.id, error = %e, "child SVID not renewed; the lease ended");
                        lost.push(lease.clone());
                    }
                }
            }
        }
        let mut ended = lost;
        for id in to_release {
            match self.cache().node().release_child(&id).await {
                Ok(released) => ended.extend(released),
                Err(NodeError::Unavailable(e)) => {
                    tracing::warn!(lease = %id, error = %e, "could not release a lease; retrying");
                }
                Err(e) => {
                    tracing::info!(lease = %id, error = %e, "lease already ended at the server");
                    if let Some(c) = snapshot.children.iter().find(|c| c.lease.id == id) {
                        let mut l = c.lease.clone();
                        l.released_at.get_or_insert(now);
                        ended.push(l);
                    }
                }
            }
        }
        if ended.is_empty() && gone.is_empty() && renewed.is_empty() {
            return;
        }
        self.cache()
            .update_children(|children| {
                children.retain(|c| !gone.contains(&c.lease.id));
                for child in children.iter_mut() {
                    if let Some(r) = ended.iter().find(|r| r.id == child.lease.id) {
                        let mut next = CachedChild::clone(child);
                        next.lease.released_at = r.released_at.or(Some(now));
                        next.svid = None;
                        *child = Arc::new(next);
                    } else if let Some(fresh) = renewed
                        .iter()
                        .find(|f| f.lease_id.as_deref() == Some(&child.lease.id))
                    {
                        let mut next = CachedChild::clone(child);
                        next.svid = Some(fresh.clone());
                        *child = Arc::new(next);
                    }
                }
                true
            })
            .await;
    }

    /// Adopts the leases of a previous run, then checks every [`WATCH_INTERVAL`] until
    /// the task is dropped.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        while let Err(e) = self.adopt().await {
            tracing::warn!(error = %e, retry_in = ?backoff, "could not list this agent's sub-agent leases");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tick.tick().await;
            self.check().await;
        }
    }
}

/// Whether an entry carries a spawn policy.
fn can_spawn(entry: &RegistrationEntry) -> bool {
    entry.spawn_max_ttl.is_some() && entry.spawn_max_depth.is_some()
}

/// Whether `pid` still names the running (not exited) process that started at `start`.
async fn process_is(root: &Path, pid: i32, start: u64) -> bool {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || read_stat(&root, pid))
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|s| s.start_time() == start && !s.is_exited())
}

/// A lease on the delegation wire.
pub fn lease_to_proto(lease: &LeaseRecord) -> pb::Lease {
    pb::Lease {
        id: lease.id.clone(),
        child_spiffe_id: lease.child_id.to_string(),
        parent_spiffe_id: lease.parent_id.to_string(),
        pid: lease.child_pid,
        task: lease.task.clone(),
        depth: lease.depth,
        expires_at: lease.expires_at,
        released_at: lease.released_at.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl pb::sub_agents_server::SubAgents for Delegation {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.attested(&request).await?;
        let lease = Delegation::register(self, &caller, request.into_inner()).await?;
        Ok(Response::new(lease_to_proto(&lease)))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::Lease>, Status> {
        let caller = self.attested(&request).await?;
        let lease = Delegation::release(self, &caller, &request.into_inner().id).await?;
        Ok(Response::new(lease_to_proto(&lease)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = self.attested(&request).await?;
        Ok(Response::new(pb::ListResponse {
            leases: Delegation::list(self, &caller)
                .iter()
                .map(lease_to_proto)
                .collect(),
        }))
    }
}
