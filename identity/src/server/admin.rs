//! The admin gRPC service (`writ.admin.v1.Admin`) and its client over the admin socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use super::ServerState;
use super::federation::manage;
use crate::ca::CaError;
use crate::entry::template::IdTemplate;
use crate::entry::{EntryError, RegistrationEntry};
use crate::proto::admin as pb;
use crate::selector::{Selector, SelectorError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{EntryFilter, JoinTokenRecord, StoreError, TemplateIssue};

pub use pb::admin_client::AdminClient;
pub use pb::admin_server::AdminServer;

/// Longest join token lifetime a caller may ask for.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// A field of the request is malformed.
    #[error("{field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// The entry is not acceptable.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA refused or failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A federation relationship or foreign bundle was refused.
    #[error(transparent)]
    Federation(#[from] super::federation::FederationError),
    /// The request cannot be served in the current state.
    #[error("{0}")]
    Precondition(String),
}

fn invalid(field: &'static str, reason: impl ToString) -> AdminError {
    AdminError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// The one place admin errors become gRPC statuses. Clients get the code and a safe
/// message; internal failures are logged and reported without detail.
impl From<AdminError> for Status {
    fn from(e: AdminError) -> Status {
        match &e {
            AdminError::Invalid { .. } | AdminError::Entry(_) => {
                Status::invalid_argument(e.to_string())
            }
            AdminError::Store(StoreError::NotFound { .. }) => Status::not_found(e.to_string()),
            AdminError::Store(StoreError::AlreadyExists { .. }) => {
                Status::already_exists(e.to_string())
            }
            AdminError::Store(StoreError::Conflict { .. }) => Status::aborted(e.to_string()),
            AdminError::Store(StoreError::Invalid(_)) => Status::invalid_argument(e.to_string()),
            AdminError::Store(StoreError::TooMany { .. }) => {
                Status::resource_exhausted(e.to_string())
            }
            AdminError::Ca(CaError::ForeignTrustDomain { .. } | CaError::InvalidRequest(_)) => {
                Status::invalid_argument(e.to_string())
            }
            AdminError::Federation(f) if f.is_invalid_request() => {
                Status::invalid_argument(e.to_string())
            }
            AdminError::Federation(_) | AdminError::Precondition(_) => {
                Status::failed_precondition(e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "admin request failed");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

/// Converts a wire entry into a validated [`RegistrationEntry`] for `trust_domain`.
///
/// # Errors
/// [`AdminError`] naming the first malformed field.
pub fn entry_from_proto(
    p: pb::Entry,
    trust_domain: &TrustDomain,
) -> Result<RegistrationEntry, AdminError> {
    let template = if p.spiffe_id_template.is_empty() {
        None
    } else {
        Some(IdTemplate::parse(&p.spiffe_id_template).map_err(EntryError::from)?)
    };
    let spiffe_id = match &template {
        Some(t) => {
            let stand_in = t.stand_in().map_err(|e| invalid("spiffe_id_template", e))?;
            if !p.spiffe_id.is_empty() && p.spiffe_id != stand_in.as_str() {
                return Err(EntryError::TemplateAndId.into());
            }
            stand_in
        }
        None => SpiffeId::new(&p.spiffe_id).map_err(|e| invalid("spiffe_id", e))?,
    };
    let parent_id = SpiffeId::new(&p.parent_id).map_err(|e| invalid("parent_id", e))?;
    if p.selectors.len() > crate::selector::MAX_SELECTORS {
        return Err(EntryError::Selector(SelectorError::TooMany {
            max: crate::selector::MAX_SELECTORS,
        })
        .into());
    }
    let selectors = p
        .selectors
        .iter()
        .map(|s| s.parse::<Selector>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(EntryError::from)?;
    let federates_with = p
        .federates_with
        .iter()
        .map(|t| TrustDomain::new(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("federates_with", e))?;
    let mut entry = RegistrationEntry::new(spiffe_id, parent_id, selectors);
    if !p.id.is_empty() {
        entry.id = p.id;
    }
    entry.x509_svid_ttl = p.x509_svid_ttl;
    entry.jwt_svid_ttl = p.jwt_svid_ttl;
    entry.dns_names = p.dns_names;
    entry.federates_with = federates_with;
    entry.admin = p.admin;
    entry.downstream = p.downstream;
    entry.expires_at = p.expires_at;
    entry.hint = p.hint;
    entry.revision = p.revision;
    entry.created_at = p.created_at;
    entry.spawn_max_ttl = p.spawn_max_ttl;
    entry.spawn_max_depth = p.spawn_max_depth;
    entry.spawn_max_children = p.spawn_max_children;
    entry.spiffe_id_template = template;
    entry.validate(trust_domain)?;
    Ok(entry)
}

/// Converts a stored entry to its wire form.
pub fn entry_to_proto(e: &RegistrationEntry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_svid_ttl: e.x509_svid_ttl,
        jwt_svid_ttl: e.jwt_svid_ttl,
        dns_names: e.dns_names.clone(),
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
        admin: e.admin,
        downstream: e.downstream,
        expires_at: e.expires_at,
        hint: e.hint.clone(),
        revision: e.revision,
        created_at: e.created_at,
        spawn_max_ttl: e.spawn_max_ttl,
        spawn_max_depth: e.spawn_max_depth,
        spawn_max_children: e.spawn_max_children,
        spiffe_id_template: e
            .spiffe_id_template
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        template_issues: Vec::new(),
    }
}

/// A template issue in its wire form.
pub fn template_issue_to_proto(i: &TemplateIssue) -> pb::TemplateIssue {
    pb::TemplateIssue {
        agent_id: i.agent_id.to_string(),
        spiffe_id: i.spiffe_id.to_string(),
        first_issued_at: i.first_issued_at,
        last_issued_at: i.last_issued_at,
    }
}

fn ttl(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    state: Arc<ServerState>,
}

impl AdminService {
    /// The service over a running server's state.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    fn td(&self) -> &TrustDomain {
        &self.state.config.trust_domain
    }

    /// Stores a new, validated entry stamped with the current time, logs it and tells
    /// agents that entries changed.
    async fn store_new_entry(
        &self,
        mut entry: RegistrationEntry,
    ) -> Result<RegistrationEntry, Status> {
        entry.created_at = self.state.clock.unix_seconds();
        let stored = self
            .state
            .store
            .create_entry(&entry)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(id = %stored.id, spiffe_id = %stored.spiffe_id, node_alias = stored.is_node_alias(), "entry created");
        self.state.notify_change();
        Ok(stored)
    }

    /// The server's own ID, the parent of node aliases.
    fn server_id(&self) -> Result<SpiffeId, Status> {
        self.td()
            .spiffe_id(crate::server::node_service::SERVER_PATH)
            .map_err(|e| Status::internal(format!("server ID: {e}")))
    }
}

fn entry_id(id: &str) -> Result<&str, AdminError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(invalid("id", "entry ids are 1-64 letters, digits or '-'"));
    }
    Ok(id)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let mut p = request
            .into_inner()
            .entry
            .ok_or_else(|| invalid("entry", "missing"))?;
        if p.parent_id.is_empty() {
            // Only `writ dev` has a default parent (its embedded agent).
            p.parent_id = self
                .state
                .config
                .default_parent_id
                .as_ref()
                .ok_or_else(|| invalid("parent_id", "is required"))?
                .to_string();
        }
        let entry = entry_from_proto(p, self.td())?;
        entry_id(&entry.id)?;
        self.check_parent(&entry.parent_id).await?;
        let stored = self.store_new_entry(entry).await?;
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let p = request
            .into_inner()
            .entry
            .ok_or_else(|| invalid("entry", "missing"))?;
        entry_id(&p.id)?;
        let mut entry = entry_from_proto(p, self.td())?;
        let existing = self
            .state
            .store
            .fetch_entry(&entry.id)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::Store(StoreError::NotFound { kind: "entry" }))?;
        entry.created_at = existing.created_at;
        if entry.same_registration(&existing) {
            // Nothing changes: no write, no new revision, nothing for agents to fetch.
            return Ok(Response::new(entry_to_proto(&existing)));
        }
        if entry.parent_id != existing.parent_id {
            self.check_parent(&entry.parent_id).await?;
        }
        let stored = self
            .state
            .store
            .update_entry(&entry)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(id = %stored.id, revision = stored.revision, "entry updated");
        self.state.notify_change();
        Ok(Response::new(entry_to_proto(&stored)))
    }

    async fn get_entry(
        &self,
        request: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = request.into_inner().id;
        let entry = self
            .state
            .store
            .fetch_entry(entry_id(&id)?)
            .await
            .map_err(AdminError::from)?
            .ok_or(AdminError::Store(StoreError::NotFound { kind: "entry" }))?;
        let mut out = entry_to_proto(&entry);
        if entry.is_template() {
            out.template_issues = self
                .state
                .store
                .list_template_issues(&entry.id)
                .await
                .map_err(AdminError::from)?
                .iter()
                .map(template_issue_to_proto)
                .collect();
        }
        Ok(Response::new(out))
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = request.into_inner();
        let opt_id = |field, s: &str| -> Result<Option<SpiffeId>, AdminError> {
            if s.is_empty() {
                Ok(None)
            } else {
                SpiffeId::new(s).map(Some).map_err(|e| invalid(field, e))
            }
        };
        let filter = EntryFilter {
            spiffe_id: opt_id("spiffe_id", &r.spiffe_id)?,
            parent_id: opt_id("parent_id", &r.parent_id)?,
        };
        let entries = if r.selectors.is_empty() {
            self.state.store.list_entries(&filter).await
        } else {
            let selectors = r
                .selectors
                .iter()
                .map(|s| s.parse::<Selector>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("selectors", e))?;
            self.state
                .store
                .find_entries_by_selectors(&selectors)
                .await
                .map(|found| {
                    found
                        .into_iter()
                        .filter(|e| {
                            filter
                                .spiffe_id
                                .as_ref()
                                .is_none_or(|id| &e.spiffe_id == id)
                        })
                        .filter(|e| {
                            filter
                                .parent_id
                                .as_ref()
                                .is_none_or(|id| &e.parent_id == id)
                        })
                        .collect()
                })
        }
        .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_proto).collect(),
        }))
    }

    async fn delete_entry(
        &self,
        request: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = request.into_inner().id;
        let entry = self
            .state
            .store
            .delete_entry(entry_id(&id)?)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(id = %entry.id, "entry deleted");
        self.state.notify_change();
        Ok(Response::new(entry_to_proto(&entry)))
    }

    async fn generate_join_token(
        &self,
        request: Request<pb::GenerateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        let r = request.into_inner();
        let ttl = ttl(r.ttl).unwrap_or(self.state.config.join_token_ttl);
        if ttl > MAX_JOIN_TOKEN_TTL {
            return Err(
                invalid("ttl", format!("at most {}s", MAX_JOIN_TOKEN_TTL.as_secs())).into(),
            );
        }
        let token = uuid::Uuid::new_v4().to_string();
        let token_hash = writ_spiffe::fingerprint::token(&token);
        let expires_at =
            self.state.clock.unix_seconds() + i64::try_from(ttl.as_secs()).unwrap_or(0);
        // The node selector the agent gets when it attests with this token.
        let selector: Selector = format!("{}:{token_hash}", crate::selector::JOIN_TOKEN_TYPE)
            .parse()
            .map_err(|e| Status::internal(format!("join token selector: {e}")))?;
        // The alias is checked before the token is stored, so a bad ID stores nothing.
        let alias = if r.spiffe_id.is_empty() {
            None
        } else {
            let id = SpiffeId::new(&r.spiffe_id).map_err(|e| invalid("spiffe_id", e))?;
            let mut entry = RegistrationEntry::new(id, self.server_id()?, vec![selector.clone()]);
            entry.validate(self.td()).map_err(AdminError::from)?;
            Some(entry)
        };
        // The alias first: a token stored without the alias it was asked with would let
        // an agent join outside it; an alias whose token never comes selects nothing.
        let alias_entry_id = match alias {
            Some(entry) => self.store_new_entry(entry).await?.id,
            None => String::new(),
        };
        self.state
            .store
            .create_join_token(&JoinTokenRecord {
                token_hash,
                expires_at,
                selectors: vec![selector],
            })
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::JoinToken {
            token,
            expires_at,
            alias_entry_id,
        }))
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let bundle = self.state.ca.bundle();
        Ok(Response::new(pb::Bundle {
            trust_domain: bundle.trust_domain().to_string(),
            spiffe: bundle.to_json(),
            pem: bundle.to_pem(),
            sequence: bundle.sequence(),
        }))
    }

    async fn mint_x509_svid(
        &self,
        request: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let r = request.into_inner();
        let id = SpiffeId::new(&r.spiffe_id).map_err(|e| invalid("spiffe_id", e))?;
        id.check_not_reserved()
            .map_err(|e| invalid("spiffe_id", e))?;
        let svid = self
            .state
            .ca
            .mint_x509_svid(&id, ttl(r.ttl), &r.dns_names)
            .map_err(AdminError::from)?;
        let private_key = svid
            .private_key
            .as_ref()
            .map(|k| k.pkcs8_der().to_vec())
            .unwrap_or_default();
        tracing::info!(spiffe_id = %id, "minted X509-SVID");
        Ok(Response::new(pb::MintX509SvidResponse {
            cert_chain: svid.cert_chain,
            private_key,
            bundle: self.state.ca.bundle().x509_authorities().to_vec(),
            expires_at: crate::clock::unix_seconds(svid.expires_at),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let r = request.into_inner();
        let id = SpiffeId::new(&r.spiffe_id).map_err(|e| invalid("spiffe_id", e))?;
        id.check_not_reserved()
            .map_err(|e| invalid("spiffe_id", e))?;
        let (token, expires_at) = self
            .state
            .ca
            .sign_jwt_svid(&id, &r.audience, ttl(r.ttl))
            .map_err(AdminError::from)?;
        tracing::info!(spiffe_id = %id, token_sha256 = %writ_spiffe::fingerprint::token(&token), "minted JWT-SVID");
        Ok(Response::new(pb::MintJwtSvidResponse {
            token,
            expires_at: crate::clock::unix_seconds(expires_at),
        }))
    }

    async fn list_agents(
        &self,
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .state
            .store
            .list_agents()
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent_to_proto).collect(),
        }))
    }

    async fn get_agent(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let agent = self.agent(&request.into_inner().spiffe_id).await?;
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn evict_agent(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let agent = self.agent(&request.into_inner().spiffe_id).await?;
        self.state
            .store
            .delete_agent(&agent.spiffe_id)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(spiffe_id = %agent.spiffe_id, "agent evicted");
        self.state.notify_change();
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn ban_agent(
        &self,
        request: Request<pb::AgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let mut agent = self.agent(&request.into_inner().spiffe_id).await?;
        agent.banned = true;
        self.state
            .store
            .update_agent(&agent)
            .await
            .map_err(AdminError::from)?;
        tracing::info!(spiffe_id = %agent.spiffe_id, "agent banned");
        self.state.notify_change();
        Ok(Response::new(agent_to_proto(&agent)))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        // The one readiness `/readyz` answers from: both agree.
        if let Some(reason) = self.state.readiness().await.reason() {
            return Err(Status::unavailable(format!("server not ready: {reason}")));
        }
        let entries = self
            .state
            .store
            .count_entries()
            .await
            .map_err(AdminError::from)?;
        Ok(Response::new(pb::HealthResponse {
            trust_domain: self.td().to_string(),
            entries,
            bundle_sequence: self.state.ca.bundle().sequence(),
        }))
    }

    async fn create_federation(
        &self,
        request: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let r = manage::create(&self.state, request.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn update_federation(
        &self,
        request: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let r = manage::update(&self.state, request.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn get_federation(
        &self,
        request: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let r = manage::get(&self.state, &request.into_inner().trust_domain).await?;
        Ok(Response::new(r))
    }

    async fn list_federations(
        &self,
        _request: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        let relationships = manage::list(&self.state).await?;
        Ok(Response::new(pb::ListFederationsResponse { relationships }))
    }

    async fn delete_federation(
        &self,
        request: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let r = manage::delete(&self.state, &request.into_inner().trust_domain).await?;
        Ok(Response::new(r))
    }

    async fn refresh_federation(
        &self,
        request: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let r = manage::refresh(&self.state, &request.into_inner().trust_domain).await?;
        Ok(Response::new(r))
    }

    async fn set_bundle(
        &self,
        request: Request<pb::SetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let r = manage::set_bundle(&self.state, request.into_inner()).await?;
        Ok(Response::new(r))
    }

    async fn list_bundles(
        &self,
        _request: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesResponse>, Status> {
        let bundles = manage::list_bundles(&self.state).await?;
        Ok(Response::new(pb::ListBundlesResponse { bundles }))
    }

    async fn delete_bundle(
        &self,
        request: Request<pb::DeleteBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let r = manage::delete_bundle(&self.state, &request.into_inner().trust_domain).await?;
        Ok(Response::new(r))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::Revocation>, Status> {
        let by = admin_caller(&request);
        let r = super::revocation::revoke(&self.state, request.into_inner(), by).await?;
        Ok(Response::new(r))
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        let r = super::revocation::list(&self.state, request.into_inner()).await?;
        Ok(Response::new(r))
    }
}

/// Who called on the admin socket: `admin socket (uid N)` from the peer's credentials.
fn admin_caller<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map_or_else(
            || "admin socket".to_owned(),
            |cred| format!("admin socket (uid {})", cred.uid()),
        )
}

fn agent_to_proto(a: &crate::store::AttestedAgent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        cert_serial: a.cert_serial.clone(),
        cert_expires_at: a.cert_expires_at,
        banned: a.banned,
        created_at: a.created_at,
    }
}

impl AdminService {
    /// `Ok` if something holds `parent`: the server's own agent (`writ dev`'s embedded
    /// one), an attested agent, the SPIFFE ID of another entry (not a template entry's
    /// stand-in: template entries are leaves), or the server itself (a node alias). An
    /// entry under a parent nothing holds can never be served.
    async fn check_parent(&self, parent: &SpiffeId) -> Result<(), AdminError> {
        if self.state.config.default_parent_id.as_ref() == Some(parent)
            || crate::entry::is_server_id(parent)
            || self.state.store.fetch_agent(parent).await?.is_some()
        {
            return Ok(());
        }
        let holders = self
            .state
            .store
            .list_entries(&EntryFilter {
                spiffe_id: Some(parent.clone()),
                parent_id: None,
            })
            .await?;
        if holders.iter().all(RegistrationEntry::is_template) {
            return Err(invalid(
                "parent_id",
                format!(
                    "nothing holds {parent}: a parent is an attested agent (`writ agent list`) \
                     or the SPIFFE ID of another entry"
                ),
            ));
        }
        Ok(())
    }

    async fn agent(&self, id: &str) -> Result<crate::store::AttestedAgent, AdminError> {
        let id = SpiffeId::new(id).map_err(|e| invalid("spiffe_id", e))?;
        self.state
            .store
            .fetch_agent(&id)
            .await?
            .ok_or(AdminError::Store(StoreError::NotFound { kind: "agent" }))
    }
}

/// Connects an admin client to the server's Unix socket.
///
/// # Errors
/// The transport error if the socket cannot be reached.
pub async fn connect(socket: &Path) -> Result<AdminClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    let channel = Endpoint::from_static("http://writ-server.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(AdminClient::new(channel))
}
