//! The agent's view of the server: one trait, [`NodeApi`], with an in-process
//! implementation ([`LocalNode`], used when server and agent share a process) and, split,
//! a gRPC client over mTLS. Both pass the same agent test suite.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use tokio::sync::watch;

use crate::bundle::BundleSet;
use crate::entry::template::TemplateValues;
use crate::server::ServerState;
use crate::server::lease::ChildRequest;
use crate::server::node::{EntrySync, NodeError, NodeHandler};
use crate::spiffe_id::SpiffeId;
use crate::store::LeaseRecord;
use crate::svid::x509::X509Svid;

/// What an agent asks of its server.
#[async_trait::async_trait]
pub trait NodeApi: Send + Sync + Debug {
    /// The agent's own SPIFFE ID.
    fn agent_id(&self) -> &SpiffeId;
    /// Entries the agent lacks at their current revision, and all authorized ids.
    async fn sync_entries(&self, known: &BTreeMap<String, i64>) -> Result<EntrySync, NodeError>;
    /// X509-SVIDs for `(entry id, DER SubjectPublicKeyInfo)` pairs.
    async fn sign_x509_svids(
        &self,
        requests: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, X509Svid)>, NodeError>;
    /// A JWT-SVID for an entry: `(token, issued_at, expires_at)`.
    async fn sign_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError>;
    /// An X509-SVID for a template entry, for the ID its template yields with `values`
    /// (placeholder -> value read from the workload's attested selectors; the server
    /// renders and checks the ID itself), for a DER SubjectPublicKeyInfo.
    async fn sign_template_x509_svid(
        &self,
        entry_id: &str,
        values: &TemplateValues,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError>;
    /// A JWT-SVID for a template entry and `values`: `(token, issued_at, expires_at)`.
    async fn sign_template_jwt_svid(
        &self,
        entry_id: &str,
        values: &TemplateValues,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError>;
    /// The trust domain's bundle and the federated ones.
    async fn bundles(&self) -> Result<BundleSet, NodeError>;
    /// A generation counter that moves when entries or bundles may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
    /// When the agent's own SVID expires, for an agent that holds one (`None` in
    /// process, where the agent needs none).
    fn agent_svid_expires_at(&self) -> Option<std::time::SystemTime> {
        None
    }
    /// Registers a sub-agent; the server re-checks the parent's spawn policy.
    async fn register_child(&self, request: &ChildRequest) -> Result<LeaseRecord, NodeError>;
    /// Releases a lease and those under it; returns every lease released.
    async fn release_child(&self, lease_id: &str) -> Result<Vec<LeaseRecord>, NodeError>;
    /// The agent's leases, held and recently ended.
    async fn list_children(&self) -> Result<Vec<LeaseRecord>, NodeError>;
    /// An X509-SVID for a standing lease's child, for a DER SubjectPublicKeyInfo.
    async fn sign_child_x509_svid(
        &self,
        lease_id: &str,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError>;
    /// A JWT-SVID for a standing lease's child: `(token, issued_at, expires_at)`.
    async fn sign_child_jwt_svid(
        &self,
        lease_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError>;
    /// A WIT-SVID for an entry (a template entry with `values`) binding the public JWK
    /// `cnf_jwk`: `(token, issued_at, expires_at)`. The default refuses (a server
    /// without WIT-SVIDs).
    async fn sign_wit_svid(
        &self,
        entry_id: &str,
        values: Option<&TemplateValues>,
        cnf_jwk: &str,
    ) -> Result<(String, i64, i64), NodeError> {
        let _ = (entry_id, values, cnf_jwk);
        Err(NodeError::Invalid(
            "this server does not issue WIT-SVIDs".into(),
        ))
    }
}

/// The in-process node API: direct calls into a server in the same process.
#[derive(Debug, Clone)]
pub struct LocalNode {
    handler: NodeHandler,
    agent_id: SpiffeId,
}

impl LocalNode {
    /// An in-process agent connection with the given agent identity.
    pub fn new(state: Arc<ServerState>, agent_id: SpiffeId) -> Self {
        Self {
            handler: NodeHandler::new(state),
            agent_id,
        }
    }
}

#[async_trait::async_trait]
impl NodeApi for LocalNode {
    fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    async fn sync_entries(&self, known: &BTreeMap<String, i64>) -> Result<EntrySync, NodeError> {
        self.handler.sync(&self.agent_id, known).await
    }

    async fn sign_x509_svids(
        &self,
        requests: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, X509Svid)>, NodeError> {
        self.handler.sign_x509_svids(&self.agent_id, requests).await
    }

    async fn sign_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        self.handler
            .sign_jwt_svid(&self.agent_id, entry_id, audience)
            .await
    }

    async fn sign_template_x509_svid(
        &self,
        entry_id: &str,
        values: &TemplateValues,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        self.handler
            .sign_template_x509_svid(&self.agent_id, entry_id, values, spki)
            .await
    }

    async fn sign_template_jwt_svid(
        &self,
        entry_id: &str,
        values: &TemplateValues,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        self.handler
            .sign_template_jwt_svid(&self.agent_id, entry_id, values, audience)
            .await
    }

    async fn bundles(&self) -> Result<BundleSet, NodeError> {
        self.handler.bundles().await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.handler.state().subscribe_changes()
    }

    async fn register_child(&self, request: &ChildRequest) -> Result<LeaseRecord, NodeError> {
        self.handler.register_child(&self.agent_id, request).await
    }

    async fn release_child(&self, lease_id: &str) -> Result<Vec<LeaseRecord>, NodeError> {
        self.handler.release_child(&self.agent_id, lease_id).await
    }

    async fn list_children(&self) -> Result<Vec<LeaseRecord>, NodeError> {
        self.handler.list_children(&self.agent_id).await
    }

    async fn sign_child_x509_svid(
        &self,
        lease_id: &str,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        self.handler
            .sign_child_x509_svid(&self.agent_id, lease_id, spki)
            .await
    }

    async fn sign_child_jwt_svid(
        &self,
        lease_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        self.handler
            .sign_child_jwt_svid(&self.agent_id, lease_id, audience)
            .await
    }

    async fn sign_wit_svid(
        &self,
        entry_id: &str,
        values: Option<&TemplateValues>,
        cnf_jwk: &str,
    ) -> Result<(String, i64, i64), NodeError> {
        self.handler
            .sign_wit_svid(&self.agent_id, entry_id, values, cnf_jwk)
            .await
    }
}
