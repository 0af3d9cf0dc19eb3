//! The `writ.node.v1.Node` gRPC service over mTLS: agents attest with a join token,
//! then call with their agent SVID. The server presents its own SVID
//! (`spiffe://<td>/writ/server`), renewed at half-life.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::AbortOnDropHandle;

use futures::Stream;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::{Request, Response, Status};

use super::lease::{ChildRequest, lease_to_proto};
use super::node::{NodeError, NodeHandler};
use super::{ServerError, ServerState};
use crate::accept::{AcceptBackoff, AdmittedStream, ConnectionLimits, Gate};
use crate::attest::node::k8s_psat::PsatVerifier;
use crate::bundle::BundleSet;
use crate::key_manager::sha256;
use crate::proto::node as pb;
use crate::server::admin::entry_to_proto;
use crate::spiffe_id::SpiffeId;
use crate::store::{AttestedAgent, StoreError};
use crate::tls::{SpiffeClientVerifier, SvidResolver};

pub use pb::node_client::NodeClient;
pub use pb::node_server::NodeServer;

/// Path prefix of every agent SPIFFE ID.
pub const AGENT_PATH_PREFIX: &str = "/writ/agent/";
/// Path of the server's own SVID.
pub const SERVER_PATH: &str = "/writ/server";
/// Lifetime of agent SVIDs.
pub const AGENT_SVID_TTL: Duration = Duration::from_secs(3600);
/// Longest join token accepted.
pub const MAX_JOIN_TOKEN_LEN: usize = 128;
/// Largest public key accepted.
const MAX_PUBLIC_KEY_LEN: usize = 4096;

/// The node API's errors on the wire: the one place a node status is chosen.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        match &e {
            NodeError::SvidRequired | NodeError::SvidExpired => {
                Status::unauthenticated(e.to_string())
            }
            NodeError::NotAuthorized(_)
            | NodeError::Banned
            | NodeError::SvidNotIssued
            | NodeError::SvidNotCurrent
            | NodeError::NotAttested
            | NodeError::JoinTokenUnknown
            | NodeError::JoinTokenExpired
            | NodeError::K8sPsatRefused(_) => Status::permission_denied(e.to_string()),
            NodeError::Invalid(_)
            | NodeError::JoinTokenMalformed
            | NodeError::InvalidPublicKey
            | NodeError::K8sPsatMalformed(_) => Status::invalid_argument(e.to_string()),
            NodeError::K8sPsatDisabled => Status::failed_precondition(e.to_string()),
            NodeError::K8sPsatUnavailable(_) => {
                tracing::warn!(error = %e, "k8s_psat attestation could not ask the cluster");
                Status::unavailable(e.to_string())
            }
            NodeError::SpawnRefused(_) => Status::failed_precondition(e.to_string()),
            NodeError::SpawnLimit(_) => Status::resource_exhausted(e.to_string()),
            NodeError::LeaseEnded(_) => Status::not_found(e.to_string()),
            NodeError::Ca(crate::ca::CaError::InvalidRequest(_)) => {
                Status::invalid_argument(e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "node request failed");
                Status::internal("internal error; see the server log")
            }
        }
    }
}

/// The node service.
#[derive(Debug, Clone)]
pub struct NodeService {
    handler: NodeHandler,
    /// The k8s_psat verifier of the configured clusters (none: attestation refused).
    psat: Arc<PsatVerifier>,
}

impl NodeService {
    /// The service over a server's state.
    pub fn new(state: Arc<ServerState>) -> Self {
        let psat = Arc::new(PsatVerifier::new(state.config.k8s_psat.clone()));
        Self {
            handler: NodeHandler::new(state),
            psat,
        }
    }

    fn state(&self) -> &Arc<ServerState> {
        self.handler.state()
    }

    /// The calling agent: its mTLS SVID (already verified by the TLS layer) must name an
    /// attested, unbanned agent.
    async fn agent<T>(&self, request: &Request<T>) -> Result<SpiffeId, Status> {
        Ok(self.agent_svid(request).await?.0)
    }

    /// The calling agent and the fingerprint of the SVID it presents, which must be the
    /// one the server issued to that agent: its current SVID, or the one issued at the
    /// last renewal (whose first use makes it current and retires the older one). Any
    /// other SVID of the trust domain carrying the agent's ID is refused, however it
    /// was obtained, and so is an SVID past its expiry on a long-lived connection.
    async fn agent_svid<T>(&self, request: &Request<T>) -> Result<(SpiffeId, String), Status> {
        let required = || Status::from(NodeError::SvidRequired);
        let certs = request.peer_certs().ok_or_else(required)?;
        let leaf = certs.first().ok_or_else(required)?;
        let checked = crate::svid::x509::check_leaf(leaf).map_err(|_| required())?;
        let id = checked.spiffe_id;
        let state = self.state();
        let expires_at = crate::clock::unix_seconds(checked.expires_at);
        if expires_at <= state.clock.unix_seconds() {
            return Err(NodeError::SvidExpired.into());
        }
        let presented = fingerprint(leaf);
        let record = state
            .store
            .fetch_agent(&id)
            .await
            .map_err(NodeError::from)?;
        match record {
            Some(a) if a.banned => Err(NodeError::Banned.into()),
            Some(a) if !a.cert_sha256.is_empty() && a.cert_sha256 == presented => {
                Ok((id, presented))
            }
            Some(_) => {
                if state
                    .store
                    .switch_agent_svid(&id, &presented, &leaf_serial(leaf), expires_at)
                    .await
                    .map_err(NodeError::from)?
                {
                    tracing::info!(spiffe_id = %id, cert_sha256 = %presented, "agent switched to its renewed SVID; the previous one no longer works");
                    Ok((id, presented))
                } else {
                    tracing::warn!(spiffe_id = %id, cert_sha256 = %presented, "refused an agent SVID the server did not issue to this agent, or has replaced");
                    Err(NodeError::SvidNotIssued.into())
                }
            }
            None => Err(NodeError::NotAttested.into()),
        }
    }

    fn sign_agent_svid(
        &self,
        id: &SpiffeId,
        public_key: &[u8],
    ) -> Result<crate::svid::x509::X509Svid, Status> {
        if public_key.is_empty() || public_key.len() > MAX_PUBLIC_KEY_LEN {
            return Err(NodeError::InvalidPublicKey.into());
        }
        self.state()
            .ca
            .sign_x509_svid(id, public_key, Some(AGENT_SVID_TTL), &[])
            .map_err(|e| Status::from(NodeError::from(e)))
    }

    /// Refuses an agent ID that is banned (attesting again never lifts a ban).
    async fn refuse_banned(&self, id: &SpiffeId) -> Result<(), Status> {
        match self.state().store.fetch_agent(id).await {
            Ok(Some(existing)) if existing.banned => Err(NodeError::Banned.into()),
            Ok(_) => Ok(()),
            Err(e) => Err(NodeError::from(e).into()),
        }
    }

    /// Records an attested agent (a new one, or the same agent attesting again).
    async fn store_agent(
        &self,
        id: &SpiffeId,
        attestation_type: &str,
        selectors: Vec<crate::selector::Selector>,
        svid: &crate::svid::x509::X509Svid,
    ) -> Result<(), Status> {
        let state = self.state();
        let (cert_serial, cert_expires_at) = serial_and_expiry(svid);
        let record = AttestedAgent {
            spiffe_id: id.clone(),
            attestation_type: attestation_type.into(),
            cert_serial,
            cert_expires_at,
            selectors,
            banned: false,
            created_at: state.clock.unix_seconds(),
            cert_sha256: svid.leaf().map(fingerprint).unwrap_or_default(),
            next_cert_sha256: String::new(),
        };
        match state.store.create_agent(&record).await {
            Err(StoreError::AlreadyExists { .. }) => {
                state
                    .store
                    .update_agent(&record)
                    .await
                    .map_err(NodeError::from)?;
            }
            other => other.map_err(NodeError::from)?,
        }
        Ok(())
    }

    fn agent_response(
        &self,
        id: &SpiffeId,
        svid: crate::svid::x509::X509Svid,
    ) -> pb::AgentSvidResponse {
        pb::AgentSvidResponse {
            spiffe_id: id.to_string(),
            cert_chain: svid.cert_chain,
            bundle: self.state().ca.bundle().to_json(),
        }
    }
}

fn serial_and_expiry(svid: &crate::svid::x509::X509Svid) -> (String, i64) {
    let serial = svid.leaf().map(leaf_serial).unwrap_or_default();
    (serial, crate::clock::unix_seconds(svid.expires_at))
}

/// A certificate's serial number as stored (hex bytes separated by colons).
fn leaf_serial(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.raw_serial_as_string())
        .unwrap_or_default()
}

/// Lowercase hex SHA-256 of a certificate (DER): what pins an agent's SVID.
fn fingerprint(der: &[u8]) -> String {
    hex::encode(sha256(der))
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::Change, Status>> + Send>>;

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    type WatchChangesStream = ChangeStream;

    async fn attest_join_token(
        &self,
        request: Request<pb::AttestJoinTokenRequest>,
    ) -> Result<Response<pb::AgentSvidResponse>, Status> {
        let r = request.into_inner();
        let token = r.join_token;
        if token.is_empty()
            || token.len() > MAX_JOIN_TOKEN_LEN
            || !token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(NodeError::JoinTokenMalformed.into());
        }
        let state = self.state();
        // Check the agent ID first so a malformed one consumes nothing.
        let id = state
            .config
            .trust_domain
            .spiffe_id(&format!("{AGENT_PATH_PREFIX}join_token/{token}"))
            .map_err(|_| Status::from(NodeError::JoinTokenMalformed))?;
        self.refuse_banned(&id).await?;
        let now = state.clock.unix_seconds();
        let token_record = match state
            .store
            .consume_join_token(&writ_spiffe::fingerprint::token(&token), now)
            .await
        {
            Ok(record) => record,
            Err(StoreError::NotFound { .. }) => {
                tracing::warn!(token_sha256 = %writ_spiffe::fingerprint::token(&token), "unknown or reused join token");
                return Err(NodeError::JoinTokenUnknown.into());
            }
            Err(StoreError::TokenExpired) => {
                return Err(NodeError::JoinTokenExpired.into());
            }
            Err(e) => return Err(NodeError::from(e).into()),
        };
        let svid = self.sign_agent_svid(&id, &r.public_key)?;
        // The token's node selectors (`join_token:<sha256>`), which node aliases made
        // with `writ token generate --spiffe-id` select.
        self.store_agent(&id, "join_token", token_record.selectors, &svid)
            .await?;
        tracing::info!(spiffe_id = %id, "agent attested with a join token");
        Ok(Response::new(self.agent_response(&id, svid)))
    }

    async fn attest_k8s_psat(
        &self,
        request: Request<pb::AttestK8sPsatRequest>,
    ) -> Result<Response<pb::AgentSvidResponse>, Status> {
        let r = request.into_inner();
        if !self.psat.is_enabled() {
            return Err(NodeError::K8sPsatDisabled.into());
        }
        let token_sha256 = writ_spiffe::fingerprint::token(&r.token);
        let state = self.state();
        let now = state.clock.unix_seconds();
        let attested = match self.psat.verify(&r.cluster, &r.token, now).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(%token_sha256, error = %e, "k8s_psat attestation refused");
                return Err(NodeError::from(e).into());
            }
        };
        let id = state
            .config
            .trust_domain
            .spiffe_id(&format!(
                "{AGENT_PATH_PREFIX}k8s_psat/{}/{}",
                attested.cluster, attested.node_uid
            ))
            .map_err(|e| Status::from(NodeError::Invalid(format!("agent ID: {e}"))))?;
        self.refuse_banned(&id).await?;
        let svid = self.sign_agent_svid(&id, &r.public_key)?;
        self.store_agent(&id, "k8s_psat", attested.selectors, &svid)
            .await?;
        tracing::info!(spiffe_id = %id, %token_sha256, "agent attested with k8s_psat");
        Ok(Response::new(self.agent_response(&id, svid)))
    }

    async fn renew_agent_svid(
        &self,
        request: Request<pb::RenewAgentSvidRequest>,
    ) -> Result<Response<pb::AgentSvidResponse>, Status> {
        let (id, current) = self.agent_svid(&request).await?;
        let svid = self.sign_agent_svid(&id, &request.into_inner().public_key)?;
        let next = svid.leaf().map(fingerprint).unwrap_or_default();
        // Only the current SVID renews; the new one is pending until its first use.
        if !self
            .state()
            .store
            .set_next_agent_svid(&id, &current, &next)
            .await
            .map_err(NodeError::from)?
        {
            return Err(NodeError::SvidNotCurrent.into());
        }
        Ok(Response::new(self.agent_response(&id, svid)))
    }

    async fn sync_entries(
        &self,
        request: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let id = self.agent(&request).await?;
        let known = request.into_inner().known.into_iter().collect();
        let sync = self.handler.sync(&id, &known).await?;
        Ok(Response::new(pb::SyncEntriesResponse {
            changed: sync.changed.iter().map(entry_to_proto).collect(),
            ids: sync.ids,
        }))
    }

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        self.agent(&request).await?;
        let rx = self.state().subscribe_changes();
        let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
            if !first && rx.changed().await.is_err() {
                return None;
            }
            let generation = *rx.borrow_and_update();
            Some((Ok(pb::Change { generation }), (rx, false)))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sign_x509_svids(
        &self,
        request: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let id = self.agent(&request).await?;
        let all = request.into_inner().requests;
        if all.len() > super::node::MAX_SIGN_BATCH {
            return Err(NodeError::Invalid(format!(
                "at most {} SVIDs per request",
                super::node::MAX_SIGN_BATCH
            ))
            .into());
        }
        // Template entries carry their placeholder values and are signed one by one.
        let (templated, plain): (Vec<_>, Vec<_>) =
            all.into_iter().partition(|r| !r.template_values.is_empty());
        let requests: Vec<(String, Vec<u8>)> = plain
            .into_iter()
            .map(|r| (r.entry_id, r.public_key))
            .collect();
        let mut signed = self.handler.sign_x509_svids(&id, &requests).await?;
        for r in templated {
            let values = r.template_values.into_iter().collect();
            let svid = self
                .handler
                .sign_template_x509_svid(&id, &r.entry_id, &values, &r.public_key)
                .await?;
            signed.push((r.entry_id, svid));
        }
        Ok(Response::new(pb::SignX509SvidsResponse {
            svids: signed
                .into_iter()
                .map(|(entry_id, svid)| pb::SignedX509Svid {
                    entry_id,
                    expires_at: crate::clock::unix_seconds(svid.expires_at),
                    cert_chain: svid.cert_chain,
                })
                .collect(),
        }))
    }

    async fn sign_jwt_svid(
        &self,
        request: Request<pb::SignJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let id = self.agent(&request).await?;
        let r = request.into_inner();
        let (token, issued_at, expires_at) = if r.template_values.is_empty() {
            self.handler
                .sign_jwt_svid(&id, &r.entry_id, &r.audience)
                .await?
        } else {
            let values = r.template_values.into_iter().collect();
            self.handler
                .sign_template_jwt_svid(&id, &r.entry_id, &values, &r.audience)
                .await?
        };
        Ok(Response::new(pb::SignJwtSvidResponse {
            token,
            expires_at,
            issued_at,
        }))
    }

    async fn sign_wit_svid(
        &self,
        request: Request<pb::SignWitSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let id = self.agent(&request).await?;
        let r = request.into_inner();
        let values: Option<crate::entry::template::TemplateValues> =
            (!r.template_values.is_empty()).then(|| r.template_values.into_iter().collect());
        let (token, issued_at, expires_at) = self
            .handler
            .sign_wit_svid(&id, &r.entry_id, values.as_ref(), &r.cnf_jwk)
            .await?;
        Ok(Response::new(pb::SignJwtSvidResponse {
            token,
            expires_at,
            issued_at,
        }))
    }

    async fn register_child(
        &self,
        request: Request<pb::RegisterChildRequest>,
    ) -> Result<Response<pb::ChildLease>, Status> {
        let agent = self.agent(&request).await?;
        let r = request.into_inner();
        let parent_id = SpiffeId::new(&r.parent_spiffe_id)
            .map_err(|e| Status::from(NodeError::Invalid(format!("parent_spiffe_id: {e}"))))?;
        let child = ChildRequest {
            parent_id,
            parent_entry_id: (!r.parent_entry_id.is_empty()).then_some(r.parent_entry_id),
            child_pid: r.child_pid,
            child_start_time: r.child_start_time,
            task: r.task,
            ttl_seconds: r.ttl_seconds,
            parent_expires_at: r.parent_expires_at,
        };
        let lease = self.handler.register_child(&agent, &child).await?;
        Ok(Response::new(lease_to_proto(&lease)))
    }

    async fn release_child(
        &self,
        request: Request<pb::ReleaseChildRequest>,
    ) -> Result<Response<pb::ReleaseChildResponse>, Status> {
        let agent = self.agent(&request).await?;
        let released = self
            .handler
            .release_child(&agent, &request.into_inner().id)
            .await?;
        Ok(Response::new(pb::ReleaseChildResponse {
            released: released.iter().map(lease_to_proto).collect(),
        }))
    }

    async fn list_children(
        &self,
        request: Request<pb::ListChildrenRequest>,
    ) -> Result<Response<pb::ListChildrenResponse>, Status> {
        let agent = self.agent(&request).await?;
        let leases = self.handler.list_children(&agent).await?;
        Ok(Response::new(pb::ListChildrenResponse {
            leases: leases.iter().map(lease_to_proto).collect(),
        }))
    }

    async fn sign_child_x509_svid(
        &self,
        request: Request<pb::SignChildX509SvidRequest>,
    ) -> Result<Response<pb::SignedX509Svid>, Status> {
        let agent = self.agent(&request).await?;
        let r = request.into_inner();
        if r.public_key.is_empty() || r.public_key.len() > MAX_PUBLIC_KEY_LEN {
            return Err(NodeError::InvalidPublicKey.into());
        }
        let svid = self
            .handler
            .sign_child_x509_svid(&agent, &r.lease_id, &r.public_key)
            .await?;
        Ok(Response::new(pb::SignedX509Svid {
            entry_id: String::new(),
            expires_at: crate::clock::unix_seconds(svid.expires_at),
            cert_chain: svid.cert_chain,
        }))
    }

    async fn sign_child_jwt_svid(
        &self,
        request: Request<pb::SignChildJwtSvidRequest>,
    ) -> Result<Response<pb::SignJwtSvidResponse>, Status> {
        let agent = self.agent(&request).await?;
        let r = request.into_inner();
        let (token, issued_at, expires_at) = self
            .handler
            .sign_child_jwt_svid(&agent, &r.lease_id, &r.audience)
            .await?;
        Ok(Response::new(pb::SignJwtSvidResponse {
            token,
            expires_at,
            issued_at,
        }))
    }

    async fn get_bundles(
        &self,
        request: Request<pb::GetBundlesRequest>,
    ) -> Result<Response<pb::GetBundlesResponse>, Status> {
        self.agent(&request).await?;
        let bundles = self
            .handler
            .bundles()
            .await?
            .iter()
            .map(|b| (b.trust_domain().id_string(), b.to_json()))
            .collect();
        Ok(Response::new(pb::GetBundlesResponse { bundles }))
    }
}

/// Keeps the server's own SVID (`spiffe://<td>/writ/server`) in `resolver`, renewed at
/// half-life.
async fn keep_server_svid(state: Arc<ServerState>, resolver: Arc<SvidResolver>) {
    loop {
        let next = match state.config.trust_domain.spiffe_id(SERVER_PATH).map(|id| {
            state
                .ca
                .mint_server_svid(&id, Some(state.config.ca.default_x509_svid_ttl))
        }) {
            Ok(Ok(svid)) => {
                let life = svid
                    .expires_at
                    .duration_since(std::time::SystemTime::now())
                    .unwrap_or_default();
                if let Err(e) = resolver.set(&svid) {
                    tracing::error!(error = %e, "cannot use the server SVID");
                }
                (life / 2).max(Duration::from_secs(1))
            }
            other => {
                tracing::error!(result = ?other.err(), "cannot mint the server SVID; retrying");
                Duration::from_secs(1)
            }
        };
        tokio::time::sleep(next).await;
    }
}

/// Serves the node API on `listener` over mTLS until `shutdown` completes.
///
/// # Errors
/// [`ServerError`] if the server fails.
pub async fn serve_node_api(
    state: Arc<ServerState>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let resolver = SvidResolver::new();
    let _svid_task = AbortOnDropHandle::new(tokio::spawn(keep_server_svid(
        state.clone(),
        resolver.clone(),
    )));
    let bundle_state = state.clone();
    let bundles: crate::tls::BundleSource =
        Arc::new(move || BundleSet::of((*bundle_state.ca.bundle()).clone()));
    let verifier = SpiffeClientVerifier::new(
        bundles,
        Arc::new(|id: &SpiffeId| id.path().starts_with(AGENT_PATH_PREFIX)),
        false,
    );
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // The listener lives in this task: it must end with the server, even when the
    // server's own future is dropped rather than shut down. The gate caps connections
    // per client address and pending handshakes, and keeps file descriptors in reserve.
    let gate = Gate::new("node API", ConnectionLimits::default());
    let _accept_task = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let (tcp, peer, admitted) = gate.accept(&listener, &mut backoff).await;
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                match gate.handshake(acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let stream = AdmittedStream::new(tls, admitted);
                        let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(cut) => tracing::debug!(%peer, "{cut}"),
                }
            });
        }
    }));
    tonic::transport::Server::builder()
        .add_service(NodeServer::new(NodeService::new(state)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await?;
    Ok(())
}

/// Binds the node API's TCP listener.
///
/// # Errors
/// [`ServerError::Socket`] if the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Socket {
            path: addr.to_string(),
            source,
        })
}
