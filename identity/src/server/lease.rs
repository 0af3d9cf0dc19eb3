//! The server's side of sub-agent leases: it re-checks every child an agent registers
//! against the parent's spawn policy, signs child SVIDs only while their lease stands,
//! and releases a lease together with every lease under it.
//!
//! The agent brings the kernel's evidence (the child's parent is the calling workload);
//! the server brings the policy. An agent can therefore mint no child except under an
//! identity authorized for it, within that identity's entry limits:
//!
//! - the parent is an entry authorized for the agent whose `spawn_max_ttl` is set, or
//!   the child of a live lease held by the same agent (its policy is the root entry's);
//! - depth (1 for a child of an entry) stays within `spawn_max_depth`, and the parent's
//!   live children within `spawn_max_children`;
//! - the lease lives min(requested, `spawn_max_ttl`, the parent's remaining lifetime);
//!   a request above the cap is capped, never refused;
//! - the child ID is `<parent ID>/sub/<task>-<8 hex digits>`, never in Writ's reserved
//!   namespace `spiffe://<td>/writ/`.

use std::time::Duration;

use super::node::{NodeError, NodeHandler};
use crate::entry::RegistrationEntry;
use crate::proto::node as pb;
use crate::spiffe_id::SpiffeId;
use crate::store::{LeaseRecord, StoreError};
use crate::svid::x509::X509Svid;

/// The path segment that introduces a sub-agent below its parent's path. Reserved:
/// registration entries cannot use it.
pub const SUB_SEGMENT: &str = "sub";
/// Longest task name.
pub const MAX_TASK_LEN: usize = 32;
/// How long ended leases stay listed to their agent (and in the store) before pruning.
pub const ENDED_LEASE_RETENTION: Duration = Duration::from_secs(3600);
/// Deepest parent chain followed when checking that every ancestor lease stands.
const MAX_CHAIN_WALK: u32 = 64;

/// A child registration, as the agent sends it after checking the kernel's evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildRequest {
    /// The parent identity: an entry's SPIFFE ID or a live lease's child ID.
    pub parent_id: SpiffeId,
    /// With an entry parent: which entry (several may share a SPIFFE ID).
    pub parent_entry_id: Option<String>,
    /// The child process.
    pub child_pid: i32,
    /// Its start time (field 22 of `/proc/<pid>/stat`).
    pub child_start_time: u64,
    /// The task name, `[a-z0-9-]{1,32}`.
    pub task: String,
    /// Seconds asked for; 0 for the longest allowed.
    pub ttl_seconds: i64,
    /// Unix seconds when the parent's own SVID expires.
    pub parent_expires_at: i64,
}

/// Whether `task` is a valid task name: `[a-z0-9-]{1,32}`.
pub fn valid_task(task: &str) -> bool {
    !task.is_empty()
        && task.len() <= MAX_TASK_LEN
        && task
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Whether `id` names a sub-agent: its path has a `sub` segment.
pub fn is_sub_agent_id(id: &SpiffeId) -> bool {
    id.path().split('/').any(|segment| segment == SUB_SEGMENT)
}

/// The SPIFFE ID (as text) of the workload at the root of `id`'s lease chain: a child ID
/// is `<parent ID>/sub/<task>-<hex>` and no registration entry may use a `sub` segment,
/// so the root is `id` up to its first `sub` segment. Any other ID is its own root.
/// Rate limits are counted per root, so a workload's sub-agents share its limit.
pub fn root_parent(id: &SpiffeId) -> String {
    let mut root = format!("spiffe://{}", id.trust_domain_str());
    for segment in id.path().split('/').skip(1) {
        if segment == SUB_SEGMENT {
            break;
        }
        root.push('/');
        root.push_str(segment);
    }
    root
}

impl NodeHandler {
    /// Registers a child under `request.parent_id` for the calling agent, after checking
    /// the parent's spawn policy. Returns the stored lease.
    ///
    /// # Errors
    /// [`NodeError::Invalid`] for a malformed request, [`NodeError::SpawnRefused`] when the
    /// parent may not spawn (no such identity for this agent, no spawn policy, ended
    /// parent lease), [`NodeError::SpawnLimit`] when the depth, children cap or spawn rate is reached.
    pub async fn register_child(
        &self,
        agent_id: &SpiffeId,
        request: &ChildRequest,
    ) -> Result<LeaseRecord, NodeError> {
        if !valid_task(&request.task) {
            return Err(NodeError::Invalid(format!(
                "task must match [a-z0-9-]{{1,{MAX_TASK_LEN}}}"
            )));
        }
        if request.child_pid <= 0 || request.ttl_seconds < 0 {
            return Err(NodeError::Invalid(
                "child pid and TTL must be positive".into(),
            ));
        }
        let state = self.state();
        let now = state.clock.unix_seconds();
        // Who the parent is decides the policy, the depth and the parent's lifetime.
        let (entry, depth, parent_end) =
            match state.store.fetch_lease_by_child(&request.parent_id).await? {
                Some(parent) => {
                    if parent.agent_id != *agent_id || !parent.is_live(now) {
                        return Err(NodeError::SpawnRefused(
                            "the parent's own lease has ended".into(),
                        ));
                    }
                    let entry = self.policy_entry(agent_id, &parent.entry_id).await?;
                    (entry, parent.depth.saturating_add(1), parent.expires_at)
                }
                None => {
                    let entry_id = request.parent_entry_id.as_deref().unwrap_or_default();
                    let entry = self.policy_entry(agent_id, entry_id).await?;
                    if entry.spiffe_id != request.parent_id {
                        return Err(NodeError::SpawnRefused(
                            "the parent entry does not have the parent's SPIFFE ID".into(),
                        ));
                    }
                    let longest = i64::try_from(entry.x509_svid_ttl).unwrap_or(i64::MAX);
                    let longest = if longest > 0 {
                        now.saturating_add(longest)
                    } else {
                        i64::MAX
                    };
                    (entry, 1, longest)
                }
            };
        let (Some(max_ttl), Some(max_depth)) = (entry.spawn_max_ttl, entry.spawn_max_depth) else {
            return Err(NodeError::SpawnRefused(format!(
                "{} has no spawn policy",
                entry.spiffe_id
            )));
        };
        if depth > max_depth {
            return Err(NodeError::SpawnLimit(format!(
                "depth {depth} is beyond spawn_max_depth {max_depth}"
            )));
        }
        let live = state
            .store
            .list_leases(Some(&request.parent_id), Some(now))
            .await?
            .len();
        let cap = entry.spawn_children_cap();
        if live >= usize::try_from(cap).unwrap_or(usize::MAX) {
            return Err(NodeError::SpawnLimit(format!(
                "{} already holds {live} live sub-agents (spawn_max_children {cap})",
                request.parent_id
            )));
        }
        // Spawning is rate limited per root parent: a sub-agent's spawns count against
        // the workload at the root of its chain, so children cannot multiply the rate.
        let root = root_parent(&request.parent_id);
        if let Err(wait) = state.take_spawn(&root) {
            let rate = state.config.spawn_rate;
            return Err(NodeError::SpawnLimit(format!(
                "{root} spawns sub-agents faster than spawn_rate ({} per second, burst {}); retry in {}s",
                rate.per_second,
                rate.burst,
                wait.as_secs().max(1)
            )));
        }
        let max_ttl = i64::try_from(max_ttl).unwrap_or(i64::MAX);
        let asked = if request.ttl_seconds == 0 {
            max_ttl
        } else {
            request.ttl_seconds
        };
        let expires_at = now
            .saturating_add(asked.min(max_ttl))
            .min(parent_end)
            .min(request.parent_expires_at);
        if expires_at <= now {
            return Err(NodeError::SpawnRefused(
                "the parent's identity expires now".into(),
            ));
        }
        let mut attempts = 0;
        loop {
            let suffix: [u8; 4] = rand::random();
            let child_id = request
                .parent_id
                .join(SUB_SEGMENT)
                .and_then(|id| id.join(&format!("{}-{}", request.task, hex::encode(suffix))))
                .map_err(|e| NodeError::Invalid(format!("child ID: {e}")))?;
            // Only an entry stored before the reserved namespace was enforced can get here.
            child_id
                .check_not_reserved()
                .map_err(|e| NodeError::SpawnRefused(format!("child ID: {e}")))?;
            let lease = LeaseRecord {
                id: uuid::Uuid::new_v4().to_string(),
                child_id,
                parent_id: request.parent_id.clone(),
                entry_id: entry.id.clone(),
                agent_id: agent_id.clone(),
                depth,
                task: request.task.clone(),
                child_pid: request.child_pid,
                child_start_time: request.child_start_time,
                created_at: now,
                expires_at,
                released_at: None,
            };
            match state.store.create_lease(&lease).await {
                Ok(()) => {
                    tracing::info!(lease = %lease.id, parent = %lease.parent_id,
                        child = %lease.child_id, agent = %agent_id, depth,
                        expires_at, "sub-agent lease granted");
                    return Ok(lease);
                }
                Err(StoreError::AlreadyExists { .. }) if attempts < 3 => attempts += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The entry `entry_id` if it is authorized for the agent; it is the policy source.
    async fn policy_entry(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
    ) -> Result<RegistrationEntry, NodeError> {
        self.authorized_entry(agent_id, entry_id)
            .await
            .map_err(|e| match e {
                NodeError::NotAuthorized(_) => NodeError::SpawnRefused(
                    "the parent identity is not authorized for this agent".into(),
                ),
                other => other,
            })
    }

    /// The lease `lease_id` if it belongs to the agent and it, every ancestor lease and
    /// its policy entry still stand at `now`.
    async fn standing_lease(
        &self,
        agent_id: &SpiffeId,
        lease_id: &str,
        now: i64,
    ) -> Result<(LeaseRecord, RegistrationEntry), NodeError> {
        let store = &self.state().store;
        let ended = || NodeError::LeaseEnded(lease_id.chars().take(64).collect());
        let lease = store.fetch_lease(lease_id).await?.ok_or_else(ended)?;
        if lease.agent_id != *agent_id || !lease.is_live(now) || self.revoked(&lease.child_id, now)
        {
            return Err(ended());
        }
        let mut parent = lease.parent_id.clone();
        for _ in 0..MAX_CHAIN_WALK {
            match store.fetch_lease_by_child(&parent).await? {
                Some(up) if up.is_live(now) => parent = up.parent_id,
                Some(_) => return Err(ended()),
                None => break,
            }
        }
        let entry = self
            .policy_entry(agent_id, &lease.entry_id)
            .await
            .map_err(|_| ended())?;
        Ok((lease, entry))
    }

    /// An X509-SVID for the child of a standing lease, expiring at the earlier of the
    /// lease's end and the entry's X509-SVID TTL.
    ///
    /// # Errors
    /// [`NodeError::LeaseEnded`] once the lease (or an ancestor, or the policy entry) is
    /// gone, or a CA error.
    pub async fn sign_child_x509_svid(
        &self,
        agent_id: &SpiffeId,
        lease_id: &str,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        let now = self.state().clock.unix_seconds();
        let (lease, entry) = self.standing_lease(agent_id, lease_id, now).await?;
        let ttl = capped_ttl(lease.expires_at - now, entry.x509_svid_ttl);
        Ok(self
            .state()
            .ca
            .sign_x509_svid(&lease.child_id, spki, Some(ttl), &[])?)
    }

    /// A JWT-SVID for the child of a standing lease: `(token, issued_at, expires_at)`.
    ///
    /// # Errors
    /// As [`Self::sign_child_x509_svid`]; a CA error for a bad audience.
    pub async fn sign_child_jwt_svid(
        &self,
        agent_id: &SpiffeId,
        lease_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let now = self.state().clock.unix_seconds();
        let (lease, entry) = self.standing_lease(agent_id, lease_id, now).await?;
        let ttl = capped_ttl(lease.expires_at - now, entry.jwt_svid_ttl);
        let (token, exp) = self
            .state()
            .ca
            .sign_jwt_svid(&lease.child_id, audience, Some(ttl))?;
        Ok((token, now, crate::clock::unix_seconds(exp)))
    }

    /// Releases the agent's lease `lease_id` and every lease under it. Releasing an ended
    /// lease is not an error. Returns the released leases, the named one first.
    ///
    /// # Errors
    /// [`NodeError::LeaseEnded`] if the agent holds no such lease.
    pub async fn release_child(
        &self,
        agent_id: &SpiffeId,
        lease_id: &str,
    ) -> Result<Vec<LeaseRecord>, NodeError> {
        let store = &self.state().store;
        let now = self.state().clock.unix_seconds();
        match store.fetch_lease(lease_id).await? {
            Some(l) if l.agent_id == *agent_id => {}
            _ => return Err(NodeError::LeaseEnded(lease_id.chars().take(64).collect())),
        }
        let mut released = Vec::new();
        let mut queue = vec![lease_id.to_owned()];
        while let Some(id) = queue.pop() {
            let lease = store.release_lease(&id, now).await?;
            for child in store.list_leases(Some(&lease.child_id), Some(now)).await? {
                queue.push(child.id);
            }
            tracing::info!(lease = %lease.id, parent = %lease.parent_id,
                child = %lease.child_id, "sub-agent lease released");
            released.push(lease);
            if released.len() > 100_000 {
                break;
            }
        }
        Ok(released)
    }

    /// The agent's leases: those held and those that ended within
    /// [`ENDED_LEASE_RETENTION`]. Older ended leases are pruned on the way.
    ///
    /// # Errors
    /// [`NodeError::Store`] if the store fails.
    pub async fn list_children(&self, agent_id: &SpiffeId) -> Result<Vec<LeaseRecord>, NodeError> {
        let store = &self.state().store;
        let now = self.state().clock.unix_seconds();
        let retention = i64::try_from(ENDED_LEASE_RETENTION.as_secs()).unwrap_or(i64::MAX);
        store.prune_leases(now.saturating_sub(retention)).await?;
        Ok(store
            .list_leases(None, None)
            .await?
            .into_iter()
            .filter(|l| l.agent_id == *agent_id)
            .collect())
    }
}

/// `remaining` seconds, at most `entry_ttl` when that is set, at least one second.
fn capped_ttl(remaining: i64, entry_ttl: u64) -> Duration {
    let remaining = u64::try_from(remaining).unwrap_or(0).max(1);
    let ttl = if entry_ttl > 0 {
        remaining.min(entry_ttl)
    } else {
        remaining
    };
    Duration::from_secs(ttl)
}

/// A lease on the node wire.
pub fn lease_to_proto(lease: &LeaseRecord) -> pb::ChildLease {
    pb::ChildLease {
        id: lease.id.clone(),
        child_spiffe_id: lease.child_id.to_string(),
        parent_spiffe_id: lease.parent_id.to_string(),
        entry_id: lease.entry_id.clone(),
        depth: lease.depth,
        task: lease.task.clone(),
        child_pid: lease.child_pid,
        child_start_time: lease.child_start_time,
        created_at: lease.created_at,
        expires_at: lease.expires_at,
        released_at: lease.released_at.unwrap_or(0),
    }
}

/// A lease from the node wire, held by `agent_id`.
///
/// # Errors
/// [`NodeError::Invalid`] if an ID does not parse.
pub fn lease_from_proto(p: pb::ChildLease, agent_id: &SpiffeId) -> Result<LeaseRecord, NodeError> {
    let id = |s: &str| SpiffeId::new(s).map_err(|e| NodeError::Invalid(format!("lease: {e}")));
    Ok(LeaseRecord {
        child_id: id(&p.child_spiffe_id)?,
        parent_id: id(&p.parent_spiffe_id)?,
        id: p.id,
        entry_id: p.entry_id,
        agent_id: agent_id.clone(),
        depth: p.depth,
        task: p.task,
        child_pid: p.child_pid,
        child_start_time: p.child_start_time,
        created_at: p.created_at,
        expires_at: p.expires_at,
        released_at: (p.released_at != 0).then_some(p.released_at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names() {
        for ok in ["a", "summarize", "step-2", &"x".repeat(MAX_TASK_LEN)] {
            assert!(valid_task(ok), "{ok}");
        }
        for bad in [
            "",
            "Sum",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(MAX_TASK_LEN + 1),
            "a.b",
        ] {
            assert!(!valid_task(bad), "{bad}");
        }
    }

    #[test]
    fn sub_agent_ids() {
        let yes = SpiffeId::new("spiffe://example.org/agents/p/sub/t-00ff00ff").unwrap();
        let no = SpiffeId::new("spiffe://example.org/agents/subway").unwrap();
        assert!(is_sub_agent_id(&yes));
        assert!(!is_sub_agent_id(&no));
    }

    #[test]
    fn ttl_caps() {
        assert_eq!(capped_ttl(300, 3600), Duration::from_secs(300));
        assert_eq!(capped_ttl(300, 60), Duration::from_secs(60));
        assert_eq!(capped_ttl(-5, 60), Duration::from_secs(1));
        assert_eq!(capped_ttl(300, 0), Duration::from_secs(300));
    }

    #[test]
    fn root_parent_is_the_id_up_to_the_first_sub_segment() {
        let id = |s: &str| SpiffeId::new(s).unwrap();
        assert_eq!(
            root_parent(&id("spiffe://td/planner")),
            "spiffe://td/planner"
        );
        assert_eq!(
            root_parent(&id("spiffe://td/ns/planner/sub/search-0a1b2c3d")),
            "spiffe://td/ns/planner"
        );
        assert_eq!(
            root_parent(&id(
                "spiffe://td/planner/sub/search-0a1b2c3d/sub/fetch-11223344"
            )),
            "spiffe://td/planner"
        );
        assert_eq!(
            root_parent(&id("spiffe://td/substitute")),
            "spiffe://td/substitute"
        );
    }
}
