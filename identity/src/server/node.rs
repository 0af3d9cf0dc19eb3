//! The server's side of the server <-> agent protocol: which entries an agent may see,
//! and signing SVIDs only for those. [`NodeHandler`] holds the logic; the in-process
//! agent of `writ dev` calls it directly, the gRPC `writ.node.v1.Node` service wraps it.

use crate::ops::metrics::SvidKind;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::ServerState;
use crate::bundle::{Bundle, BundleSet};
use crate::ca::CaError;
use crate::entry::RegistrationEntry;
use crate::entry::template::TemplateValues;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{EntryFilter, StoreError};
use crate::svid::x509::X509Svid;

/// Most entries one agent may be authorized for (a guard against runaway nesting).
pub const MAX_ENTRIES_PER_AGENT: usize = 100_000;
/// Most SVIDs signed in one request.
pub const MAX_SIGN_BATCH: usize = 500;

/// Why a node request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The entry does not exist or is not authorized for this agent.
    #[error("entry {0:?} is not authorized for this agent")]
    NotAuthorized(String),
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The server could not be reached (agent side).
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The parent may not spawn this child (no spawn policy, not its identity, ended).
    #[error("spawn refused: {0}")]
    SpawnRefused(String),
    /// The parent's depth or live-children cap is reached.
    #[error("spawn limit reached: {0}")]
    SpawnLimit(String),
    /// The sub-agent lease does not exist for this agent, was released or expired.
    #[error("sub-agent lease {0:?} has ended")]
    LeaseEnded(String),
    /// A call other than attestation came without an agent SVID.
    #[error("an agent SVID is required")]
    SvidRequired,
    /// The agent SVID presented has expired.
    #[error("the agent SVID has expired; attest again with a new join token")]
    SvidExpired,
    /// The agent is banned.
    #[error("agent is banned")]
    Banned,
    /// The SVID carries an agent's ID but is not the one the server issued to it.
    #[error(
        "this agent SVID is not the one the server issued to this agent (replaced by a \
         renewal, or never issued); attest again with a new join token"
    )]
    SvidNotIssued,
    /// The SVID renewing is no longer the agent's current one.
    #[error(
        "this agent SVID is no longer current (the agent was renewed, banned or evicted \
         meanwhile); attest again with a new join token"
    )]
    SvidNotCurrent,
    /// No attested agent has this ID.
    #[error("agent is not attested (evicted?); attest again with a new join token")]
    NotAttested,
    /// The join token is not in the join-token alphabet or too long.
    #[error("malformed join token")]
    JoinTokenMalformed,
    /// No such join token, or it was used.
    #[error("join token does not exist or has already been used")]
    JoinTokenUnknown,
    /// The join token has expired.
    #[error("join token has expired")]
    JoinTokenExpired,
    /// The public key to certify is empty or too large.
    #[error("public_key must be a DER SubjectPublicKeyInfo")]
    InvalidPublicKey,
    /// The server has no `[node_attestors.k8s_psat]` cluster configured.
    #[error("k8s_psat node attestation is not enabled on this server")]
    K8sPsatDisabled,
    /// The k8s_psat token is not a JWT, or too long.
    #[error("{0}")]
    K8sPsatMalformed(crate::attest::node::k8s_psat::PsatError),
    /// The k8s_psat attestation was refused: unknown cluster, wrong audience, expired or
    /// unauthenticated token, service account not allowed, pod or node not the token's.
    #[error("{0}")]
    K8sPsatRefused(crate::attest::node::k8s_psat::PsatError),
    /// The cluster's API server could not be asked.
    #[error("{0}")]
    K8sPsatUnavailable(crate::attest::node::k8s_psat::PsatError),
}

impl From<crate::attest::node::k8s_psat::PsatError> for NodeError {
    fn from(e: crate::attest::node::k8s_psat::PsatError) -> Self {
        use crate::attest::node::k8s_psat::PsatError;
        match e {
            PsatError::Malformed { .. } => Self::K8sPsatMalformed(e),
            PsatError::Api { .. } => Self::K8sPsatUnavailable(e),
            _ => Self::K8sPsatRefused(e),
        }
    }
}

/// The refusal of a plain signature for a template entry (its ID needs values).
fn template_needs_values(entry: &RegistrationEntry) -> NodeError {
    NodeError::Invalid(format!(
        "entry {} is a template entry: its ID is rendered from the workload's selector values, which the request must carry",
        entry.id
    ))
}

/// What an agent learns from a sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntrySync {
    /// Entries the agent did not have at their current revision.
    pub changed: Vec<RegistrationEntry>,
    /// Ids of every entry authorized for the agent.
    pub ids: Vec<String>,
}

/// The node API's logic over a server's state.
#[derive(Debug, Clone)]
pub struct NodeHandler {
    state: Arc<ServerState>,
}

impl NodeHandler {
    /// A handler over a running server's state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// The server state.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Counts a signing result in the server's metrics.
    fn count<T>(&self, kind: SvidKind, result: &Result<T, NodeError>, n: impl Fn(&T) -> u64) {
        match result {
            Ok(v) => self.state.metrics.issued(kind, n(v)),
            Err(_) => self.state.metrics.failed(kind),
        }
    }

    /// The unexpired entries whose parent is the agent, one of the node aliases that
    /// cover it, or (transitively) another entry authorized for it. A node alias (an
    /// entry whose parent is the server's ID, [`RegistrationEntry::is_node_alias`])
    /// covers the agent when all its selectors are among the agent's stored node
    /// selectors; the alias itself is not returned (it names nodes, not workloads).
    /// Template entries are leaves: their stand-in ID is never a parent.
    ///
    /// # Errors
    /// [`NodeError::Store`] if the store fails.
    pub async fn authorized_entries(
        &self,
        agent_id: &SpiffeId,
    ) -> Result<Vec<RegistrationEntry>, NodeError> {
        let now = self.state.clock.unix_seconds();
        let mut out = Vec::new();
        let mut seen_parents = HashSet::new();
        let mut queue = VecDeque::from([agent_id.clone()]);
        queue.extend(self.node_aliases(agent_id, now).await?);
        while let Some(parent) = queue.pop_front() {
            if !seen_parents.insert(parent.clone()) {
                continue;
            }
            let children = self
                .state
                .store
                .list_entries(&EntryFilter {
                    parent_id: Some(parent),
                    ..EntryFilter::default()
                })
                .await?;
            for entry in children {
                if entry.is_expired(now) || entry.is_node_alias() {
                    continue;
                }
                if !entry.is_template() {
                    queue.push_back(entry.spiffe_id.clone());
                }
                // A revoked identity is not the agent's while the revocation is in force.
                if self.revoked(&entry.spiffe_id, now) {
                    continue;
                }
                out.push(entry);
                if out.len() > MAX_ENTRIES_PER_AGENT {
                    return Err(NodeError::Invalid(format!(
                        "more than {MAX_ENTRIES_PER_AGENT} entries for one agent"
                    )));
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The IDs of the unexpired node aliases whose selectors are all among the agent's
    /// stored node selectors (none for an agent with no record, such as `writ dev`'s).
    async fn node_aliases(
        &self,
        agent_id: &SpiffeId,
        now: i64,
    ) -> Result<Vec<SpiffeId>, NodeError> {
        let Some(agent) = self.state.store.fetch_agent(agent_id).await? else {
            return Ok(Vec::new());
        };
        if agent.selectors.is_empty() {
            return Ok(Vec::new());
        }
        let server_id = self
            .state
            .config
            .trust_domain
            .spiffe_id(super::node_service::SERVER_PATH)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let have: HashSet<_> = agent.selectors.iter().collect();
        let aliases = self
            .state
            .store
            .list_entries(&EntryFilter {
                parent_id: Some(server_id),
                ..EntryFilter::default()
            })
            .await?;
        Ok(aliases
            .into_iter()
            .filter(|a| !a.is_expired(now) && !a.is_template() && !a.selectors.is_empty())
            .filter(|a| a.selectors.iter().all(|s| have.contains(s)))
            .map(|a| a.spiffe_id)
            .collect())
    }

    /// The entries the agent lacks (by id and revision) and all authorized ids.
    ///
    /// # Errors
    /// [`NodeError::Store`] if the store fails.
    pub async fn sync(
        &self,
        agent_id: &SpiffeId,
        known: &BTreeMap<String, i64>,
    ) -> Result<EntrySync, NodeError> {
        let entries = self.authorized_entries(agent_id).await?;
        let ids = entries.iter().map(|e| e.id.clone()).collect();
        let changed = entries
            .into_iter()
            .filter(|e| known.get(&e.id) != Some(&e.revision))
            .collect();
        Ok(EntrySync { changed, ids })
    }

    pub(crate) async fn authorized_entry(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
    ) -> Result<RegistrationEntry, NodeError> {
        // The same walk as a sync: an agent gets nothing it could not have synced.
        self.authorized_entries(agent_id)
            .await?
            .into_iter()
            .find(|e| e.id == entry_id)
            .ok_or_else(|| NodeError::NotAuthorized(entry_id.chars().take(64).collect()))
    }

    /// Signs X509-SVIDs for `(entry id, DER SubjectPublicKeyInfo)` pairs, each only if the
    /// entry is authorized for the agent, with the entry's TTL and DNS names.
    ///
    /// # Errors
    /// [`NodeError::NotAuthorized`] for any entry the agent may not have (nothing is
    /// signed then), or a CA error.
    pub async fn sign_x509_svids(
        &self,
        agent_id: &SpiffeId,
        requests: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, X509Svid)>, NodeError> {
        let result = self.sign_x509_svids_uncounted(agent_id, requests).await;
        self.count(SvidKind::X509, &result, |v: &Vec<(String, X509Svid)>| {
            v.len() as u64
        });
        result
    }

    async fn sign_x509_svids_uncounted(
        &self,
        agent_id: &SpiffeId,
        requests: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, X509Svid)>, NodeError> {
        if requests.len() > MAX_SIGN_BATCH {
            return Err(NodeError::Invalid(format!(
                "at most {MAX_SIGN_BATCH} SVIDs per request"
            )));
        }
        let authorized: BTreeMap<String, RegistrationEntry> = self
            .authorized_entries(agent_id)
            .await?
            .into_iter()
            .map(|e| (e.id.clone(), e))
            .collect();
        let mut out = Vec::with_capacity(requests.len());
        for (entry_id, _) in requests {
            match authorized.get(entry_id) {
                None => {
                    return Err(NodeError::NotAuthorized(
                        entry_id.chars().take(64).collect(),
                    ));
                }
                Some(entry) if entry.is_template() => return Err(template_needs_values(entry)),
                Some(_) => {}
            }
        }
        for (entry_id, spki) in requests {
            let Some(entry) = authorized.get(entry_id) else {
                continue;
            };
            let ttl = (entry.x509_svid_ttl > 0).then(|| Duration::from_secs(entry.x509_svid_ttl));
            let svid =
                self.state
                    .ca
                    .sign_x509_svid(&entry.spiffe_id, spki, ttl, &entry.dns_names)?;
            out.push((entry_id.clone(), svid));
        }
        Ok(out)
    }

    /// Signs a JWT-SVID for an authorized entry. Returns `(token, issued_at, expires_at)`
    /// in Unix seconds.
    ///
    /// # Errors
    /// [`NodeError::NotAuthorized`] or a CA error (bad audience).
    pub async fn sign_jwt_svid(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let result = self
            .sign_jwt_svid_uncounted(agent_id, entry_id, audience)
            .await;
        self.count(SvidKind::Jwt, &result, |_: &(String, i64, i64)| 1);
        result
    }

    async fn sign_jwt_svid_uncounted(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let entry = self.authorized_entry(agent_id, entry_id).await?;
        if entry.is_template() {
            return Err(template_needs_values(&entry));
        }
        let ttl = (entry.jwt_svid_ttl > 0).then(|| Duration::from_secs(entry.jwt_svid_ttl));
        let issued_at = self.state.clock.unix_seconds();
        let (token, exp) = self
            .state
            .ca
            .sign_jwt_svid(&entry.spiffe_id, audience, ttl)?;
        Ok((token, issued_at, crate::clock::unix_seconds(exp)))
    }

    /// The ID template entry `entry_id` yields for `values` (the placeholder values the
    /// agent read from the workload's attested selectors), re-rendered and checked here:
    /// the agent never sends an ID. Records the issue ([`crate::store::Store::record_template_issue`]).
    async fn rendered(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: &TemplateValues,
    ) -> Result<(RegistrationEntry, SpiffeId), NodeError> {
        if values.len() > crate::entry::template::MAX_PLACEHOLDERS {
            return Err(NodeError::Invalid(format!(
                "at most {} template values",
                crate::entry::template::MAX_PLACEHOLDERS
            )));
        }
        let entry = self.authorized_entry(agent_id, entry_id).await?;
        let Some(template) = &entry.spiffe_id_template else {
            return Err(NodeError::Invalid(format!(
                "entry {} is not a template entry; send no template values",
                entry.id
            )));
        };
        let id = template.render(values).map_err(|e| {
            tracing::info!(entry = %entry.id, agent = %agent_id, reason = %e, "template value refused; nothing issued");
            NodeError::Invalid(format!("entry {}: {e}", entry.id))
        })?;
        let now = self.state.clock.unix_seconds();
        if self.revoked(&id, now) {
            return Err(NodeError::NotAuthorized(
                entry.id.chars().take(64).collect(),
            ));
        }
        self.state
            .store
            .record_template_issue(&entry.id, agent_id, &id, now)
            .await?;
        Ok((entry, id))
    }

    /// Whether a revocation in force at `now` covers `id` (logged: nothing is issued).
    pub(crate) fn revoked(&self, id: &SpiffeId, now: i64) -> bool {
        let Some(r) = self.state.revocations.workload(id.as_str(), now) else {
            return false;
        };
        tracing::debug!(spiffe_id = %id, revocation = r.seq, "revoked; nothing issued");
        true
    }

    /// Signs an X509-SVID for template entry `entry_id`, for the ID its template yields
    /// with `values`, if the entry is authorized for the agent.
    ///
    /// # Errors
    /// [`NodeError::NotAuthorized`], [`NodeError::Invalid`] for values that fill no
    /// valid ID (or an entry that is not a template), a store or CA error.
    pub async fn sign_template_x509_svid(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: &TemplateValues,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        let result = self
            .sign_template_x509_svid_uncounted(agent_id, entry_id, values, spki)
            .await;
        self.count(SvidKind::X509, &result, |_: &X509Svid| 1);
        result
    }

    async fn sign_template_x509_svid_uncounted(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: &TemplateValues,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        let (entry, id) = self.rendered(agent_id, entry_id, values).await?;
        let ttl = (entry.x509_svid_ttl > 0).then(|| Duration::from_secs(entry.x509_svid_ttl));
        Ok(self
            .state
            .ca
            .sign_x509_svid(&id, spki, ttl, &entry.dns_names)?)
    }

    /// Signs a JWT-SVID for template entry `entry_id` and `values`, as
    /// [`Self::sign_template_x509_svid`]. Returns `(token, issued_at, expires_at)`.
    ///
    /// # Errors
    /// As [`Self::sign_template_x509_svid`], or a bad audience.
    pub async fn sign_template_jwt_svid(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: &TemplateValues,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let result = self
            .sign_template_jwt_svid_uncounted(agent_id, entry_id, values, audience)
            .await;
        self.count(SvidKind::Jwt, &result, |_: &(String, i64, i64)| 1);
        result
    }

    async fn sign_template_jwt_svid_uncounted(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: &TemplateValues,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let (entry, id) = self.rendered(agent_id, entry_id, values).await?;
        let ttl = (entry.jwt_svid_ttl > 0).then(|| Duration::from_secs(entry.jwt_svid_ttl));
        let issued_at = self.state.clock.unix_seconds();
        let (token, exp) = self.state.ca.sign_jwt_svid(&id, audience, ttl)?;
        Ok((token, issued_at, crate::clock::unix_seconds(exp)))
    }

    /// Signs a WIT-SVID for an authorized entry (a template entry with `values`),
    /// binding `cnf_jwk`, the workload key the agent generated (a public JWK). Returns
    /// `(token, issued_at, expires_at)` in Unix seconds.
    ///
    /// # Errors
    /// [`NodeError::NotAuthorized`], [`NodeError::Invalid`] for an unusable key, or a CA
    /// error.
    pub async fn sign_wit_svid(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: Option<&TemplateValues>,
        cnf_jwk: &str,
    ) -> Result<(String, i64, i64), NodeError> {
        let result = self
            .sign_wit_svid_uncounted(agent_id, entry_id, values, cnf_jwk)
            .await;
        self.count(SvidKind::Jwt, &result, |_: &(String, i64, i64)| 1);
        result
    }

    async fn sign_wit_svid_uncounted(
        &self,
        agent_id: &SpiffeId,
        entry_id: &str,
        values: Option<&TemplateValues>,
        cnf_jwk: &str,
    ) -> Result<(String, i64, i64), NodeError> {
        if cnf_jwk.len() > crate::svid::wit::MAX_KEY_BYTES {
            return Err(NodeError::Invalid("cnf_jwk is too large".into()));
        }
        let cnf: crate::svid::wit::ConfirmationJwk = serde_json::from_str(cnf_jwk)
            .map_err(|e| NodeError::Invalid(format!("cnf_jwk: {e}")))?;
        cnf.algorithm()
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let (entry, id) = match values {
            Some(values) => self.rendered(agent_id, entry_id, values).await?,
            None => {
                let entry = self.authorized_entry(agent_id, entry_id).await?;
                if entry.is_template() {
                    return Err(template_needs_values(&entry));
                }
                let id = entry.spiffe_id.clone();
                (entry, id)
            }
        };
        let ttl = (entry.jwt_svid_ttl > 0).then(|| Duration::from_secs(entry.jwt_svid_ttl));
        let issued_at = self.state.clock.unix_seconds();
        let (token, exp) = self.state.ca.sign_wit_svid(&id, &cnf, ttl)?;
        Ok((token, issued_at, crate::clock::unix_seconds(exp)))
    }

    /// All bundles the server holds: its own (from the CA) and the federated ones stored.
    ///
    /// # Errors
    /// [`NodeError::Store`] if the store fails.
    pub async fn bundles(&self) -> Result<BundleSet, NodeError> {
        let state = &self.state;
        let mut set = BundleSet::of((*state.ca.bundle()).clone());
        let own = state.config.trust_domain.id_string();
        for record in state.store.list_bundles().await? {
            if record.trust_domain_id == own {
                continue;
            }
            let parsed = TrustDomain::new(&record.trust_domain_id)
                .ok()
                .and_then(|td| Bundle::from_json(td, &record.document).ok());
            match parsed {
                Some(b) => set.insert(b),
                None => {
                    tracing::warn!(trust_domain = %record.trust_domain_id, "skipping unreadable federated bundle")
                }
            }
        }
        Ok(set)
    }
}
