//! Envoy's Secret Discovery Service (SDS v3,
//! `envoy.service.secret.v3.SecretDiscoveryService`) on the agent's Workload API socket.
//!
//! Envoy asks for secrets by name; the names are SPIRE's:
//!
//! | name | secret |
//! |------|--------|
//! | a SPIFFE ID the caller holds | `tls_certificate` (chain and key, inline PEM) |
//! | `default` | the caller's first (default) SVID, named `default` |
//! | `spiffe://<trust domain>` | `validation_context.trusted_ca`: that bundle (own or federated) |
//! | `ROOTCA` | the caller's own trust domain's bundle, named `ROOTCA` |
//! | `ALL` | a validation context with the `envoy.tls.cert_validator.spiffe` validator and every bundle the caller may see |
//!
//! An empty name list on a stream asks for everything the caller may have (each SVID by
//! its SPIFFE ID, each bundle by its trust domain ID, and `ALL`), as SPIRE's agent does.
//! A name the caller does not hold gets nothing (logged); unlike SPIRE the stream is not
//! ended, so a typo does not take the other secrets away.
//!
//! The caller is attested as for the Workload API ([`WorkloadApi::attest_peer`]), from
//! the socket's peer credentials; the `workload.spiffe.io` header is not required (Envoy
//! does not send it). A caller matching no entry gets PermissionDenied.
//!
//! Streams follow the xDS state-of-the-world protocol: every response carries a
//! `version_info` (bumped when the secrets change) and a fresh `nonce`; a request whose
//! `response_nonce` is the last nonce is an ACK, or a NACK when it carries
//! `error_detail` (logged; the last state is kept and not sent again); a request with
//! another nonce is stale and ignored. A new response is pushed on every rotation or
//! bundle change. `DeltaSecrets` answers UNIMPLEMENTED.
//!
//! ```no_run
//! # async fn demo(api: writ_identity::agent::workload_api::WorkloadApi) {
//! use writ_identity::agent::sds::Sds;
//! let service = Sds::new(api).into_server();
//! tonic::transport::Server::builder().add_service(service);
//! # }
//! ```

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::cache::{CachedSvid, Snapshot};
use super::workload_api::{Attested, WorkloadApi, WorkloadApiError, visible_bundles};
use crate::proto::envoy::config::core::v3 as core;
use crate::proto::envoy::extensions::transport_sockets::tls::v3 as tls;
use crate::proto::envoy::service::discovery::v3 as discovery;
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server as server;
use crate::spiffe_id::TrustDomain;

pub use server::SecretDiscoveryServiceServer;

/// The type URL of every resource SDS serves.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The type URL of the SPIFFE certificate validator's configuration.
pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
/// The name of Envoy's SPIFFE certificate validator.
pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
/// The name of the caller's default SVID (SPIRE's `default_svid_name`).
pub const DEFAULT_SVID_NAME: &str = "default";
/// The name of the caller's own trust domain bundle (SPIRE's `default_bundle_name`).
pub const DEFAULT_BUNDLE_NAME: &str = "ROOTCA";
/// The name of the validation context with every bundle (SPIRE's
/// `default_all_bundles_name`).
pub const ALL_BUNDLES_NAME: &str = "ALL";
/// Most resource names in one request.
pub const MAX_NAMES: usize = 64;
/// Longest resource name (the longest SPIFFE ID).
pub const MAX_NAME_LEN: usize = 2048;
/// Largest request message, in bytes.
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024;
/// Longest NACK error text logged.
const MAX_LOGGED_ERROR: usize = 512;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One SVID as SDS serves it.
#[derive(Clone)]
pub struct SvidSecret {
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    /// The chain as PEM.
    pub chain_pem: String,
    /// The private key as PEM (PKCS#8).
    pub key_pem: zeroize::Zeroizing<String>,
}

impl std::fmt::Debug for SvidSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidSecret")
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// One trust bundle as SDS serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSecret {
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// Its X.509 authorities as PEM.
    pub pem: String,
}

/// Everything one caller may receive.
#[derive(Debug, Clone, Default)]
pub struct CallerSecrets {
    /// Its SVIDs, the default first.
    pub svids: Vec<SvidSecret>,
    /// The trust domain `ROOTCA` names (the default SVID's).
    pub own: Option<TrustDomain>,
    /// The bundles it may see (own and federated), ordered by trust domain.
    pub bundles: Vec<BundleSecret>,
}

impl CallerSecrets {
    /// What `svids` (a caller's identities, default first) may receive from `snapshot`.
    pub fn from_snapshot(snapshot: &Snapshot, svids: &[Arc<CachedSvid>]) -> Self {
        Self {
            svids: svids
                .iter()
                .filter_map(|c| {
                    Some(SvidSecret {
                        spiffe_id: c.entry.spiffe_id.to_string(),
                        chain_pem: c.svid.chain_pem(),
                        key_pem: c.svid.private_key.as_ref()?.to_pem(),
                    })
                })
                .collect(),
            own: svids.first().map(|c| c.entry.spiffe_id.trust_domain()),
            bundles: visible_bundles(snapshot, svids)
                .into_iter()
                .map(|b| BundleSecret {
                    trust_domain: b.trust_domain().clone(),
                    pem: b.to_pem(),
                })
                .collect(),
        }
    }
}

/// What a set of names resolves to for one caller.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    /// The secrets, as `Any` resources: bundles by trust domain, `ROOTCA`, `ALL`, then
    /// SVIDs in the caller's order, `default` with the first.
    pub resources: Vec<prost_types::Any>,
    /// The secret names of `resources`, in the same order.
    pub names: Vec<String>,
    /// Names asked for that the caller does not hold, sorted.
    pub missing: Vec<String>,
}

fn inline(bytes: impl Into<Vec<u8>>) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(bytes.into())),
    })
}

fn any(secret: &tls::Secret) -> prost_types::Any {
    prost_types::Any {
        type_url: SECRET_TYPE_URL.to_owned(),
        value: secret.encode_to_vec(),
    }
}

fn trusted_ca(name: &str, bundle: &BundleSecret) -> tls::Secret {
    tls::Secret {
        name: name.to_owned(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: inline(bundle.pem.as_bytes()),
                custom_validator_config: None,
            },
        )),
    }
}

fn all_bundles(bundles: &[BundleSecret]) -> tls::Secret {
    let config = tls::SpiffeCertValidatorConfig {
        trust_domains: bundles
            .iter()
            .map(|b| tls::spiffe_cert_validator_config::TrustDomain {
                name: b.trust_domain.as_str().to_owned(),
                trust_bundle: inline(b.pem.as_bytes()),
            })
            .collect(),
    };
    tls::Secret {
        name: ALL_BUNDLES_NAME.to_owned(),
        r#type: Some(tls::secret::Type::ValidationContext(
            tls::CertificateValidationContext {
                trusted_ca: None,
                custom_validator_config: Some(core::TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_owned(),
                    typed_config: Some(prost_types::Any {
                        type_url: SPIFFE_VALIDATOR_TYPE_URL.to_owned(),
                        value: config.encode_to_vec(),
                    }),
                }),
            },
        )),
    }
}

fn certificate(name: &str, svid: &SvidSecret) -> tls::Secret {
    tls::Secret {
        name: name.to_owned(),
        r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
            certificate_chain: inline(svid.chain_pem.as_bytes()),
            private_key: inline(svid.key_pem.as_bytes()),
        })),
    }
}

/// The secrets `names` select from `secrets` (SPIRE's rules, see the module docs). An
/// empty list (empty names ignored) selects everything the caller may have.
pub fn resolve(secrets: &CallerSecrets, names: &[String]) -> Resolved {
    let mut wanted: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect();
    let everything = wanted.is_empty();
    let mut out = Resolved::default();
    let push = |out: &mut Resolved, secret: tls::Secret| {
        out.resources.push(any(&secret));
        out.names.push(secret.name);
    };
    let mut take = |name: &str| everything || wanted.remove(name);
    for b in &secrets.bundles {
        let id = b.trust_domain.id_string();
        if take(&id) {
            push(&mut out, trusted_ca(&id, b));
        }
    }
    if let Some(own) = secrets
        .own
        .as_ref()
        .and_then(|td| secrets.bundles.iter().find(|b| &b.trust_domain == td))
        && !everything
        && take(DEFAULT_BUNDLE_NAME)
    {
        push(&mut out, trusted_ca(DEFAULT_BUNDLE_NAME, own));
    }
    if take(ALL_BUNDLES_NAME) {
        push(&mut out, all_bundles(&secrets.bundles));
    }
    for (i, svid) in secrets.svids.iter().enumerate() {
        if take(&svid.spiffe_id) {
            push(&mut out, certificate(&svid.spiffe_id, svid));
        }
        if i == 0 && !everything && take(DEFAULT_SVID_NAME) {
            push(&mut out, certificate(DEFAULT_SVID_NAME, svid));
        }
    }
    out.missing = wanted.into_iter().map(str::to_owned).collect();
    out
}

/// Why an SDS request was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdsError {
    /// The request breaks a limit or names another resource type.
    #[error("{0}")]
    Invalid(String),
    /// The caller could not be attested or has no identity.
    #[error(transparent)]
    Workload(#[from] WorkloadApiError),
    /// The incremental (delta) protocol is not served.
    #[error(
        "DeltaSecrets is not implemented: use StreamSecrets (Envoy: api_type GRPC, not DELTA_GRPC)"
    )]
    DeltaUnimplemented,
}

impl From<SdsError> for Status {
    fn from(e: SdsError) -> Status {
        match e {
            SdsError::Invalid(m) => Status::invalid_argument(m),
            SdsError::Workload(w) => w.into(),
            SdsError::DeltaUnimplemented => Status::unimplemented(e.to_string()),
        }
    }
}

/// Checks a request's limits and type URL.
///
/// # Errors
/// [`SdsError::Invalid`] saying which.
pub fn check_request(req: &discovery::DiscoveryRequest) -> Result<(), SdsError> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE_URL {
        return Err(SdsError::Invalid(format!(
            "type_url must be {SECRET_TYPE_URL}"
        )));
    }
    if req.resource_names.len() > MAX_NAMES {
        return Err(SdsError::Invalid(format!(
            "at most {MAX_NAMES} resource names per request"
        )));
    }
    if req.resource_names.iter().any(|n| n.len() > MAX_NAME_LEN) {
        return Err(SdsError::Invalid(format!(
            "resource names are at most {MAX_NAME_LEN} bytes"
        )));
    }
    Ok(())
}

/// What a request on a stream means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// A first request, or one with no nonce: a (re)subscription, answered.
    Subscribe,
    /// The client applied the response with this version.
    Ack {
        /// The version acknowledged.
        version: String,
    },
    /// The client rejected the last response.
    Nack {
        /// Its error text.
        error: String,
    },
    /// The nonce is not the last one sent: stale or bogus, ignored.
    Stale,
}

/// The xDS state of one stream: names subscribed, version and nonce sent, what the
/// client acknowledged. Pure: the stream task feeds it requests and renderings.
#[derive(Debug, Default)]
pub struct XdsState {
    names: Vec<String>,
    subscribed: bool,
    pending: bool,
    version: u64,
    nonce: Option<String>,
    sent: Option<Vec<prost_types::Any>>,
    acked: Option<String>,
    nonces: u64,
}

impl XdsState {
    /// A stream that has seen no request.
    pub fn new() -> Self {
        Self::default()
    }

    /// The names currently subscribed.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The version the client last acknowledged.
    pub fn acked(&self) -> Option<&str> {
        self.acked.as_deref()
    }

    /// The last nonce sent.
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref()
    }

    /// Takes in a request (already checked by [`check_request`]): classifies it and, when
    /// it subscribes or changes the names, marks a response as due.
    pub fn on_request(&mut self, req: &discovery::DiscoveryRequest) -> RequestKind {
        if !req.response_nonce.is_empty() && self.nonce.as_deref() != Some(&req.response_nonce) {
            return RequestKind::Stale;
        }
        let names_changed = !self.subscribed || req.resource_names != self.names;
        self.subscribed = true;
        self.names.clone_from(&req.resource_names);
        let kind = if req.response_nonce.is_empty() {
            self.pending = true;
            RequestKind::Subscribe
        } else if let Some(status) = &req.error_detail {
            RequestKind::Nack {
                error: status.message.chars().take(MAX_LOGGED_ERROR).collect(),
            }
        } else {
            self.acked = Some(req.version_info.clone());
            RequestKind::Ack {
                version: req.version_info.clone(),
            }
        };
        if names_changed {
            self.pending = true;
        }
        kind
    }

    /// The response to send for `resources` (the current rendering of the subscribed
    /// names), if one is due: when a request awaits an answer, or the resources changed
    /// since the last response. The version is bumped only when they changed; every
    /// response gets a new nonce.
    pub fn next_response(
        &mut self,
        resources: Vec<prost_types::Any>,
    ) -> Option<discovery::DiscoveryResponse> {
        if !self.subscribed {
            return None;
        }
        let changed = self.sent.as_ref() != Some(&resources);
        if !changed && !self.pending {
            return None;
        }
        if changed {
            self.version += 1;
        }
        self.pending = false;
        self.nonces += 1;
        let nonce = format!("{:016x}{:x}", rand::random::<u64>(), self.nonces);
        self.nonce = Some(nonce.clone());
        self.sent = Some(resources.clone());
        Some(discovery::DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce,
        })
    }
}

/// The SDS service over the Workload API's attestation and cache.
#[derive(Debug, Clone)]
pub struct Sds {
    api: WorkloadApi,
}

impl Sds {
    /// The service sharing `api`'s cache and attestor.
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    /// The tonic service, with the request size limit ([`MAX_MESSAGE_SIZE`]).
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// The caller's secrets now, re-attesting it first when new entries need a selector
    /// type it was not attested for.
    ///
    /// # Errors
    /// [`WorkloadApiError`] when it cannot be attested again or has no identity left.
    async fn current(&self, caller: &mut Attested) -> Result<CallerSecrets, WorkloadApiError> {
        if self
            .api
            .cache()
            .snapshot()
            .needs_any(&caller.selectors, &caller.skipped)
        {
            *caller = self.api.reattest(caller).await?;
        }
        self.api.ensure_templates(caller).await;
        let (snapshot, svids) = self.api.identities(caller);
        if svids.is_empty() {
            return Err(self.api.no_identity(caller));
        }
        Ok(CallerSecrets::from_snapshot(&snapshot, &svids))
    }

    /// Time until the first of the caller's SVIDs expires (it must then drop out).
    fn until_expiry(&self, caller: &Attested) -> Duration {
        let (_, svids) = self.api.identities(caller);
        svids
            .iter()
            .map(|c| c.svid.expires_at)
            .min()
            .and_then(|t| t.duration_since(self.api.cache().clock().now()).ok())
            .unwrap_or_default()
            .clamp(Duration::from_millis(10), Duration::from_secs(60))
    }

    async fn run_stream(
        self,
        mut caller: Attested,
        mut inbound: Streaming<discovery::DiscoveryRequest>,
        tx: tokio::sync::mpsc::Sender<Result<discovery::DiscoveryResponse, Status>>,
    ) {
        let mut state = XdsState::new();
        let mut updates = self.api.cache().subscribe();
        let mut missing: Vec<String> = Vec::new();
        let pid = caller.pid;
        loop {
            let wait = self.until_expiry(&caller);
            tokio::select! {
                next = inbound.next() => match next {
                    Some(Ok(req)) => {
                        if let Err(e) = check_request(&req) {
                            tracing::warn!(pid, error = %e, "SDS request refused");
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                        match state.on_request(&req) {
                            RequestKind::Stale => {
                                tracing::debug!(pid, nonce = %req.response_nonce,
                                    "SDS request with a stale or unknown nonce ignored");
                                continue;
                            }
                            RequestKind::Nack { error } => tracing::warn!(pid,
                                version = %req.version_info, %error,
                                "SDS client rejected the secrets (NACK); keeping the last state"),
                            RequestKind::Ack { version } => {
                                tracing::debug!(pid, %version, "SDS client applied the secrets");
                            }
                            RequestKind::Subscribe => {}
                        }
                    }
                    Some(Err(status)) => {
                        tracing::debug!(pid, %status, "SDS stream ended by the client");
                        return;
                    }
                    None => return,
                },
                changed = updates.changed() => if changed.is_err() {
                    return; // the agent is shutting down
                },
                () = tokio::time::sleep(wait) => {}
                () = tx.closed() => return,
            }
            let secrets = match self.current(&mut caller).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let resolved = resolve(&secrets, state.names());
            if resolved.missing != missing {
                if !resolved.missing.is_empty() {
                    tracing::warn!(pid, names = ?resolved.missing,
                        "SDS: the caller holds no secret by these names; nothing sent for them");
                }
                missing = resolved.missing;
            }
            if let Some(resp) = state.next_response(resolved.resources) {
                tracing::debug!(pid, version = %resp.version_info, names = ?resolved.names,
                    "SDS secrets sent");
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl server::SecretDiscoveryService for Sds {
    type DeltaSecretsStream = ResponseStream<discovery::DeltaDiscoveryResponse>;
    type StreamSecretsStream = ResponseStream<discovery::DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<discovery::DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(SdsError::DeltaUnimplemented.into())
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<discovery::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let caller = self
            .api
            .attest_peer(&request)
            .await
            .map_err(SdsError::from)?;
        if self.api.identities(&caller).1.is_empty() {
            return Err(self.api.no_identity(&caller).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(self.clone().run_stream(caller, request.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<discovery::DiscoveryRequest>,
    ) -> Result<Response<discovery::DiscoveryResponse>, Status> {
        let mut caller = self
            .api
            .attest_peer(&request)
            .await
            .map_err(SdsError::from)?;
        let req = request.into_inner();
        check_request(&req)?;
        let secrets = self.current(&mut caller).await.map_err(SdsError::from)?;
        let resolved = resolve(&secrets, &req.resource_names);
        if !resolved.missing.is_empty() {
            tracing::warn!(pid = caller.pid, names = ?resolved.missing,
                "SDS: the caller holds no secret by these names; nothing sent for them");
        }
        Ok(Response::new(discovery::DiscoveryResponse {
            version_info: String::new(),
            resources: resolved.resources,
            canary: false,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn secrets() -> CallerSecrets {
        let svid = |id: &str| SvidSecret {
            spiffe_id: id.to_owned(),
            chain_pem: format!("chain of {id}"),
            key_pem: zeroize::Zeroizing::new(format!("key of {id}")),
        };
        let bundle = |name: &str| BundleSecret {
            trust_domain: td(name),
            pem: format!("bundle of {name}"),
        };
        CallerSecrets {
            svids: vec![
                svid("spiffe://example.org/a"),
                svid("spiffe://example.org/b"),
            ],
            own: Some(td("example.org")),
            bundles: vec![bundle("example.org"), bundle("other.org")],
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn decode(any: &prost_types::Any) -> tls::Secret {
        assert_eq!(any.type_url, SECRET_TYPE_URL);
        tls::Secret::decode(any.value.as_slice()).unwrap()
    }

    fn cert_of(secret: &tls::Secret) -> Vec<u8> {
        match &secret.r#type {
            Some(tls::secret::Type::TlsCertificate(c)) => {
                match &c.certificate_chain.as_ref().unwrap().specifier {
                    Some(core::data_source::Specifier::InlineBytes(b)) => b.clone(),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("not a certificate: {other:?}"),
        }
    }

    #[test]
    fn names_resolve_as_spire_defines_them() {
        let s = secrets();
        let r = resolve(&s, &names(&["default", "spiffe://example.org/b"]));
        assert_eq!(r.names, names(&["default", "spiffe://example.org/b"]));
        assert!(r.missing.is_empty());
        assert_eq!(
            cert_of(&decode(&r.resources[0])),
            b"chain of spiffe://example.org/a"
        );
        assert_eq!(
            cert_of(&decode(&r.resources[1])),
            b"chain of spiffe://example.org/b"
        );

        let r = resolve(&s, &names(&["ROOTCA", "spiffe://other.org"]));
        assert_eq!(r.names, names(&["spiffe://other.org", "ROOTCA"]));
        let root = decode(&r.resources[1]);
        match root.r#type {
            Some(tls::secret::Type::ValidationContext(v)) => assert_eq!(
                v.trusted_ca.unwrap().specifier,
                Some(core::data_source::Specifier::InlineBytes(
                    b"bundle of example.org".to_vec()
                ))
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn all_carries_every_bundle_in_the_spiffe_validator() {
        let r = resolve(&secrets(), &names(&["ALL"]));
        assert_eq!(r.names, names(&["ALL"]));
        let Some(tls::secret::Type::ValidationContext(v)) = decode(&r.resources[0]).r#type else {
            panic!("not a validation context")
        };
        let custom = v.custom_validator_config.unwrap();
        assert_eq!(custom.name, SPIFFE_VALIDATOR_NAME);
        let typed = custom.typed_config.unwrap();
        assert_eq!(typed.type_url, SPIFFE_VALIDATOR_TYPE_URL);
        let config = tls::SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
        let tds: Vec<_> = config
            .trust_domains
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(tds, ["example.org", "other.org"]);
    }

    #[test]
    fn empty_names_select_everything_the_caller_has() {
        let r = resolve(&secrets(), &names(&[]));
        assert_eq!(
            r.names,
            names(&[
                "spiffe://example.org",
                "spiffe://other.org",
                "ALL",
                "spiffe://example.org/a",
                "spiffe://example.org/b"
            ])
        );
        assert_eq!(resolve(&secrets(), &names(&[""])).names.len(), 5);
    }

    #[test]
    fn names_the_caller_lacks_get_nothing() {
        let r = resolve(
            &secrets(),
            &names(&[
                "spiffe://example.org/someone-else",
                "spiffe://third.org",
                "default",
            ]),
        );
        assert_eq!(r.names, names(&["default"]));
        assert_eq!(
            r.missing,
            names(&["spiffe://example.org/someone-else", "spiffe://third.org"])
        );
        let none = CallerSecrets::default();
        let r = resolve(&none, &names(&["default", "ROOTCA"]));
        assert!(r.resources.is_empty());
        assert_eq!(r.missing, names(&["ROOTCA", "default"]));
    }

    fn request(names: &[&str], nonce: &str, version: &str) -> discovery::DiscoveryRequest {
        discovery::DiscoveryRequest {
            version_info: version.to_owned(),
            node: None,
            resource_names: self::names(names),
            type_url: SECRET_TYPE_URL.to_owned(),
            response_nonce: nonce.to_owned(),
            error_detail: None,
        }
    }

    fn res(tag: &str) -> Vec<prost_types::Any> {
        vec![prost_types::Any {
            type_url: SECRET_TYPE_URL.to_owned(),
            value: tag.as_bytes().to_vec(),
        }]
    }

    #[test]
    fn ack_nack_and_stale_nonces() {
        let mut st = XdsState::new();
        assert!(
            st.next_response(res("v1")).is_none(),
            "nothing before a request"
        );
        assert_eq!(
            st.on_request(&request(&["default"], "", "")),
            RequestKind::Subscribe
        );
        let first = st.next_response(res("v1")).unwrap();
        assert_eq!(first.version_info, "1");
        assert!(!first.nonce.is_empty());
        assert!(st.next_response(res("v1")).is_none(), "no repeat");

        // ACK.
        let ack = request(&["default"], &first.nonce, "1");
        assert_eq!(
            st.on_request(&ack),
            RequestKind::Ack {
                version: "1".into()
            }
        );
        assert_eq!(st.acked(), Some("1"));
        assert!(
            st.next_response(res("v1")).is_none(),
            "an ACK is not answered"
        );

        // A stale or bogus nonce is ignored.
        assert_eq!(
            st.on_request(&request(&["other"], "bogus", "1")),
            RequestKind::Stale
        );
        assert_eq!(st.names(), names(&["default"]));

        // Rotation: a new version and nonce.
        let second = st.next_response(res("v2")).unwrap();
        assert_eq!(second.version_info, "2");
        assert_ne!(second.nonce, first.nonce);
        // The old nonce is stale now.
        assert_eq!(st.on_request(&ack), RequestKind::Stale);

        // NACK: logged, the last state kept, nothing resent.
        let mut nack = request(&["default"], &second.nonce, "1");
        nack.error_detail = Some(crate::proto::google::rpc::Status {
            code: 3,
            message: "bad certificate".into(),
            details: Vec::new(),
        });
        assert_eq!(
            st.on_request(&nack),
            RequestKind::Nack {
                error: "bad certificate".into()
            }
        );
        assert_eq!(st.acked(), Some("1"));
        assert!(st.next_response(res("v2")).is_none(), "no resend loop");
        // The next rotation still goes out.
        assert_eq!(st.next_response(res("v3")).unwrap().version_info, "3");
    }

    #[test]
    fn new_names_are_answered_even_with_the_same_resources() {
        let mut st = XdsState::new();
        st.on_request(&request(&["a"], "", ""));
        let first = st.next_response(res("x")).unwrap();
        assert_eq!(
            st.on_request(&request(&["a", "b"], &first.nonce, "1")),
            RequestKind::Ack {
                version: "1".into()
            }
        );
        let again = st.next_response(res("x")).unwrap();
        assert_eq!(again.version_info, "1", "same resources, same version");
        assert_ne!(again.nonce, first.nonce);
        // A new subscription (no nonce) is always answered.
        st.on_request(&request(&["a", "b"], "", ""));
        assert!(st.next_response(res("x")).is_some());
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let mut r = request(&[], "", "");
        r.resource_names = vec!["x".into(); MAX_NAMES + 1];
        assert!(matches!(check_request(&r), Err(SdsError::Invalid(_))));
        r.resource_names = vec!["x".repeat(MAX_NAME_LEN + 1)];
        assert!(matches!(check_request(&r), Err(SdsError::Invalid(_))));
        let mut r = request(&["default"], "", "");
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(matches!(check_request(&r), Err(SdsError::Invalid(_))));
        assert!(check_request(&request(&["default"], "", "")).is_ok());
        // Garbage bytes never panic the decoder.
        for seed in 0u8..64 {
            let bytes: Vec<u8> = (0..200u32)
                .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
                .collect();
            if let Ok(req) = discovery::DiscoveryRequest::decode(bytes.as_slice()) {
                let _ = check_request(&req);
                XdsState::new().on_request(&req);
            }
        }
    }
}
