//! The SPIFFE Workload API server: the standard `SpiffeWorkloadAPI` service on the
//! agent's Unix socket.
//!
//! Every call must carry the metadata `workload.spiffe.io: true` (InvalidArgument
//! otherwise). The caller is identified from the socket's peer credentials, attested by
//! the workload attestor, never from anything it says; a caller with no matching entry
//! gets PermissionDenied `no identity issued`. Streams send the full state first and again
//! on every change.

use crate::ops::metrics::{AttestationFailure, StreamGuard};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::cache::{Cache, CachedSvid, Snapshot};
use crate::attest::workload::{
    AllSelectors, Caller, SelectorDemand, SelectorTypes, WorkloadAttestor, process_start_time,
    read_stat,
};
use crate::bundle::{Bundle, BundleSet};
use crate::clock::unix_seconds;
use crate::proto::workload as pb;
use crate::selector::Selector;
use crate::server::node::NodeError;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::jwt;

pub use pb::spiffe_workload_api_server::SpiffeWorkloadApiServer;

/// The metadata key every Workload API request must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The text clients (go-spiffe, rust-spiffe) match on when a caller has no identity.
pub const NO_IDENTITY: &str = "no identity issued";
/// Most audiences in one JWT-SVID request.
pub const MAX_AUDIENCES: usize = jwt::MAX_AUDIENCES;
/// Longest audience string.
pub const MAX_AUDIENCE_LEN: usize = 256;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Why a Workload API call failed. Mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadApiError {
    /// The `workload.spiffe.io: true` header is missing.
    #[error("security header missing from request")]
    MissingHeader,
    /// The caller's process could not be identified or attested.
    #[error("could not attest the caller: {0}")]
    Attestation(String),
    /// The caller matches no entry.
    #[error("no identity issued")]
    NoIdentity,
    /// A request field is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The JWT-SVID failed validation.
    #[error("{0}")]
    InvalidToken(#[from] jwt::JwtSvidError),
    /// The server could not be reached or refused.
    #[error("identity server: {0}")]
    Node(#[from] NodeError),
}

impl From<WorkloadApiError> for Status {
    fn from(e: WorkloadApiError) -> Status {
        match &e {
            WorkloadApiError::MissingHeader | WorkloadApiError::Invalid(_) => {
                Status::invalid_argument(e.to_string())
            }
            WorkloadApiError::InvalidToken(_) => Status::invalid_argument(e.to_string()),
            WorkloadApiError::NoIdentity => Status::permission_denied(NO_IDENTITY),
            WorkloadApiError::Attestation(_) => {
                tracing::warn!(error = %e, "workload attestation failed");
                Status::permission_denied(NO_IDENTITY)
            }
            WorkloadApiError::Node(_) => {
                tracing::warn!(error = %e, "Workload API call failed");
                Status::unavailable("identity server unavailable; try again")
            }
        }
    }
}

/// An attested caller: its process and the selectors that describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    /// The caller's pid (from `SO_PEERCRED`).
    pub pid: i32,
    /// Its start time, read after attestation: with the pid it names one process.
    pub start_time: u64,
    /// The selectors the attestor found.
    pub selectors: Vec<Selector>,
    /// The selector types attestation left out because no entry that could match the
    /// caller used them (see [`WorkloadAttestor::attest_for`]).
    pub skipped: SelectorTypes,
    /// The caller's peer credentials.
    pub caller: Caller,
    /// Whether an ancestor process is a sub-agent: such a process is neither the
    /// sub-agent nor a stranger, and gets no identity (a sub-agent cannot fork its way
    /// to the identities its uid would match).
    pub under_sub_agent: bool,
}

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<Cache>,
    attestor: Arc<dyn WorkloadAttestor>,
    proc_root: PathBuf,
    /// WIT-SVIDs and their keys (the WIT-SVID profile, [`super::wit`]).
    wits: Arc<super::wit::WitCache>,
}

impl WorkloadApi {
    /// The service over an agent cache and a workload attestor, reading processes
    /// under `/proc`.
    pub fn new(cache: Arc<Cache>, attestor: Arc<dyn WorkloadAttestor>) -> Self {
        Self {
            cache,
            attestor,
            proc_root: PathBuf::from("/proc"),
            wits: Arc::new(super::wit::WitCache::new()),
        }
    }

    /// Reads processes under `proc_root` instead of `/proc`.
    #[must_use]
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// The agent cache.
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The directory processes are read from.
    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    /// Checks the header and attests the caller.
    ///
    /// # Errors
    /// [`WorkloadApiError::MissingHeader`], or [`WorkloadApiError::Attestation`] when the
    /// caller cannot be identified.
    pub async fn caller<T>(&self, request: &Request<T>) -> Result<Attested, WorkloadApiError> {
        let header = request
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok());
        if header != Some("true") {
            self.cache
                .metrics()
                .attestation_failed(AttestationFailure::MissingHeader);
            return Err(WorkloadApiError::MissingHeader);
        }
        let attested = self.attest_peer(request).await;
        if let Err(WorkloadApiError::Attestation(_)) = &attested {
            self.cache
                .metrics()
                .attestation_failed(AttestationFailure::AttestorError);
        }
        attested
    }

    /// Attests the caller from the socket's peer credentials, without the header check
    /// (Envoy's SDS client does not send it; see [`super::sds`]).
    ///
    /// # Errors
    /// [`WorkloadApiError::Attestation`] when the caller cannot be identified.
    pub async fn attest_peer<T>(&self, request: &Request<T>) -> Result<Attested, WorkloadApiError> {
        let cred = request
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or_else(|| WorkloadApiError::Attestation("no peer credentials".into()))?;
        let pid = cred
            .pid()
            .ok_or_else(|| WorkloadApiError::Attestation("no peer pid".into()))?;
        let caller = Caller {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
        };
        let (selectors, skipped) = self.attest(caller).await?;
        let root = self.proc_root.clone();
        let snapshot = self.cache.snapshot();
        let (start_time, under_sub_agent) = tokio::task::spawn_blocking(move || {
            let start_time = process_start_time(&root, pid)?;
            let under = snapshot.child_process(pid, start_time).is_none()
                && !snapshot.children.is_empty()
                && ancestors(&root, pid)
                    .any(|(p, start)| snapshot.child_process(p, start).is_some());
            Ok::<_, crate::attest::workload::AttestError>((start_time, under))
        })
        .await
        .map_err(|e| WorkloadApiError::Attestation(e.to_string()))?
        .map_err(|e| WorkloadApiError::Attestation(e.to_string()))?;
        let attested = Attested {
            pid,
            start_time,
            selectors,
            skipped,
            caller,
            under_sub_agent,
        };
        self.ensure_templates(&attested).await;
        Ok(attested)
    }

    /// Has the cache render and sign the template entries that apply to `caller` (and
    /// marks those it holds as fetched), unless the caller is or runs under a
    /// sub-agent, which gets no entry's identity. A failure is logged: the caller still
    /// gets every other identity it has.
    pub async fn ensure_templates(&self, caller: &Attested) {
        if caller.under_sub_agent
            || self
                .cache
                .snapshot()
                .child_process(caller.pid, caller.start_time)
                .is_some()
        {
            return;
        }
        if let Err(e) = self.cache.ensure_templates(&caller.selectors).await {
            tracing::warn!(pid = caller.pid, error = %e, "no template identity for the caller");
        }
    }

    /// The caller's selectors, computing only the types the cached entries that could
    /// match it use: a caller that matches no entry's `uid` costs no hashing. If the
    /// entries changed meanwhile so that a skipped type now matters, it attests again
    /// (at most twice, then computes everything).
    async fn attest(
        &self,
        caller: Caller,
    ) -> Result<(Vec<Selector>, SelectorTypes), WorkloadApiError> {
        const ROUNDS: usize = 3;
        let failed =
            |e: crate::attest::workload::AttestError| WorkloadApiError::Attestation(e.to_string());
        for round in 0..ROUNDS {
            let snapshot = self.cache.snapshot();
            let demand: Arc<dyn SelectorDemand> = if round + 1 < ROUNDS {
                snapshot
            } else {
                Arc::new(AllSelectors)
            };
            let found = self
                .attestor
                .attest_for(&caller, demand)
                .await
                .map_err(failed)?;
            if !self
                .cache
                .snapshot()
                .needs_any(&found.selectors, &found.skipped)
            {
                return Ok((found.selectors, found.skipped));
            }
        }
        let selectors = self.attestor.attest(&caller).await.map_err(failed)?;
        Ok((selectors, SelectorTypes::default()))
    }

    /// [`WorkloadApiError::NoIdentity`] for `caller`, logged with the selectors that
    /// were seen (selectors are not secrets), so an operator can tell which entry is
    /// missing. One line a second at info; the rest at debug, so that a stranger's
    /// calls cannot flood the log.
    pub fn no_identity(&self, caller: &Attested) -> WorkloadApiError {
        self.cache
            .metrics()
            .attestation_failed(AttestationFailure::NoMatchingEntry);
        static LAST_INFO: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
        let selectors: Vec<String> = caller.selectors.iter().map(ToString::to_string).collect();
        let skipped = caller.skipped.names();
        let now = self.cache.clock().unix_seconds();
        let last = LAST_INFO.load(std::sync::atomic::Ordering::Relaxed);
        if now > last
            && LAST_INFO
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::info!(pid = caller.pid, uid = caller.caller.uid, ?selectors, not_computed = ?skipped,
                under_sub_agent = caller.under_sub_agent, "no identity issued: no entry matches the caller's selectors");
        } else {
            tracing::debug!(pid = caller.pid, uid = caller.caller.uid, ?selectors, not_computed = ?skipped,
                under_sub_agent = caller.under_sub_agent, "no identity issued: no entry matches the caller's selectors");
        }
        WorkloadApiError::NoIdentity
    }

    /// `caller` attested again (for the current entries), if its process is still the
    /// one attested before.
    ///
    /// # Errors
    /// [`WorkloadApiError::Attestation`] if it cannot be attested or its pid now names
    /// another process.
    pub async fn reattest(&self, caller: &Attested) -> Result<Attested, WorkloadApiError> {
        let (selectors, skipped) = self.attest(caller.caller).await?;
        let root = self.proc_root.clone();
        let pid = caller.pid;
        let start_time = tokio::task::spawn_blocking(move || process_start_time(&root, pid))
            .await
            .map_err(|e| WorkloadApiError::Attestation(e.to_string()))?
            .map_err(|e| WorkloadApiError::Attestation(e.to_string()))?;
        if start_time != caller.start_time {
            return Err(WorkloadApiError::Attestation(format!(
                "process {pid} was replaced by another process"
            )));
        }
        let attested = Attested {
            selectors,
            skipped,
            ..caller.clone()
        };
        self.ensure_templates(&attested).await;
        Ok(attested)
    }

    /// The caller's identities: a registered sub-agent process gets its own SVID only
    /// (none once its lease ended); any other caller the entries its selectors match.
    pub fn identities(&self, caller: &Attested) -> (Arc<Snapshot>, Vec<Arc<CachedSvid>>) {
        let snapshot = self.cache.snapshot();
        let now = self.cache.clock().unix_seconds();
        if caller.under_sub_agent {
            return (snapshot, Vec::new());
        }
        let matching = match snapshot.child_process(caller.pid, caller.start_time) {
            Some(child) => child
                .svid
                .iter()
                .filter(|c| unix_seconds(c.svid.expires_at) > now)
                .cloned()
                .collect(),
            None => snapshot.matching(&caller.selectors, now),
        };
        (snapshot, matching)
    }
}

/// Most ancestors looked at above a caller.
const MAX_ANCESTORS: usize = 64;

/// The `(pid, start time)` of each ancestor of `pid`, nearest first, up to (not
/// including) pid 1 or the first that cannot be read. Blocking.
fn ancestors(root: &Path, pid: i32) -> impl Iterator<Item = (i32, u64)> + '_ {
    let mut next = read_stat(root, pid).ok().map(|s| s.ppid());
    std::iter::from_fn(move || {
        let ppid = next.take().filter(|&p| p > 1)?;
        let stat = read_stat(root, ppid).ok()?;
        next = Some(stat.ppid());
        Some((ppid, stat.start_time()))
    })
    .take(MAX_ANCESTORS)
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

/// The bundles a workload gets: its own trust domain's and those its entries federate
/// with, ordered by trust domain. Shared with [`super::sds`].
pub(crate) fn visible_bundles<'a>(
    snapshot: &'a Snapshot,
    svids: &[Arc<CachedSvid>],
) -> Vec<&'a Bundle> {
    let mut tds: Vec<TrustDomain> = Vec::new();
    for c in svids {
        tds.push(c.entry.spiffe_id.trust_domain());
        tds.extend(c.entry.federates_with.iter().cloned());
    }
    tds.sort();
    tds.dedup();
    tds.iter()
        .filter_map(|td| snapshot.bundles.get(td))
        .collect()
}

fn x509_response(snapshot: &Snapshot, svids: &[Arc<CachedSvid>]) -> pb::X509svidResponse {
    let mut federated = HashMap::new();
    for c in svids {
        for td in &c.entry.federates_with {
            if let Some(b) = snapshot.bundles.get(td) {
                federated.insert(td.id_string(), concat(b.x509_authorities()));
            }
        }
    }
    pb::X509svidResponse {
        svids: svids
            .iter()
            .map(|c| pb::X509svid {
                spiffe_id: c.entry.spiffe_id.to_string(),
                x509_svid: concat(&c.svid.cert_chain),
                x509_svid_key: c
                    .svid
                    .private_key
                    .as_ref()
                    .map(|k| k.pkcs8_der().to_vec())
                    .unwrap_or_default(),
                bundle: snapshot
                    .bundles
                    .get(&c.entry.spiffe_id.trust_domain())
                    .map(|b| concat(b.x509_authorities()))
                    .unwrap_or_default(),
                hint: c.entry.hint.clone(),
            })
            .collect(),
        crl: Vec::new(),
        federated_bundles: federated,
    }
}

/// JWKS document of a bundle's JWT authorities, every key with its `kid`.
fn jwks(bundle: &Bundle) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = bundle
        .jwt_authorities()
        .iter()
        .filter_map(|(kid, jwk)| {
            let mut v = serde_json::to_value(jwk).ok()?;
            let obj = v.as_object_mut()?;
            obj.insert("kid".into(), serde_json::Value::String(kid.clone()));
            obj.insert("use".into(), serde_json::Value::String("jwt-svid".into()));
            Some(v)
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string().into_bytes()
}

/// Streams `render(snapshot, matching)` now and after every cache change, skipping
/// repeats; ends the stream with `no identity issued` once the caller has none.
fn watch_stream<T, F>(api: WorkloadApi, caller: Attested, render: F) -> ResponseStream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Snapshot, &[Arc<CachedSvid>]) -> T + Send + Sync + 'static,
{
    struct State<T, F> {
        api: WorkloadApi,
        caller: Attested,
        render: F,
        updates: tokio::sync::watch::Receiver<u64>,
        last: Option<T>,
        done: bool,
        /// Counts the stream as open while it lives.
        _open: StreamGuard,
    }
    let state = State {
        _open: api.cache.metrics().stream_opened(),
        updates: api.cache.subscribe(),
        api,
        caller,
        render,
        last: None,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            // New entries may use a selector type this caller was not attested for.
            if st
                .api
                .cache
                .snapshot()
                .needs_any(&st.caller.selectors, &st.caller.skipped)
            {
                match st.api.reattest(&st.caller).await {
                    Ok(again) => st.caller = again,
                    Err(e) => {
                        st.done = true;
                        return Some((Err(Status::from(e)), st));
                    }
                }
            }
            // Keeps the caller's template identities fetched (and signed again if the
            // entry changed) while the stream is open.
            st.api.ensure_templates(&st.caller).await;
            let (snapshot, svids) = st.api.identities(&st.caller);
            if svids.is_empty() {
                st.done = true;
                let e = st.api.no_identity(&st.caller);
                return Some((Err(Status::from(e)), st));
            }
            let msg = (st.render)(&snapshot, &svids);
            if st.last.as_ref() != Some(&msg) {
                st.last = Some(msg.clone());
                return Some((Ok(msg), st));
            }
            // Nothing new for this caller: wait for a cache change, or until the first of
            // its SVIDs expires (then it must drop out of the response).
            let until_expiry = svids
                .iter()
                .map(|c| c.svid.expires_at)
                .min()
                .and_then(|t| t.duration_since(st.api.cache.clock().now()).ok())
                .unwrap_or_default()
                .clamp(
                    std::time::Duration::from_millis(10),
                    std::time::Duration::from_secs(60),
                );
            let waited = tokio::time::timeout(until_expiry, st.updates.changed()).await;
            if let Ok(Err(_)) = waited {
                return None; // the agent is shutting down
            }
        }
    }))
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = ResponseStream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = ResponseStream<pb::WitBundlesResponse>;

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        let caller = self.caller(&request).await?;
        let stream =
            super::wit::fetch_wit_svid(self.clone(), self.wits.clone(), caller, request.get_ref())?;
        Ok(Response::new(stream))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        let caller = self.caller(&request).await?;
        if self.identities(&caller).1.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        Ok(Response::new(watch_stream(
            self.clone(),
            caller,
            |snapshot: &Snapshot, svids: &[Arc<CachedSvid>]| pb::WitBundlesResponse {
                bundles: visible_bundles(snapshot, svids)
                    .into_iter()
                    .map(|b| {
                        (
                            b.trust_domain().id_string(),
                            crate::svid::wit::bundle_jwks(b),
                        )
                    })
                    .collect(),
            },
        )))
    }

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.caller(&request).await?;
        if self.identities(&caller).1.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        Ok(Response::new(watch_stream(
            self.clone(),
            caller,
            x509_response,
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.caller(&request).await?;
        if self.identities(&caller).1.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        Ok(Response::new(watch_stream(
            self.clone(),
            caller,
            |snapshot: &Snapshot, svids: &[Arc<CachedSvid>]| pb::X509BundlesResponse {
                crl: Vec::new(),
                bundles: visible_bundles(snapshot, svids)
                    .into_iter()
                    .map(|b| (b.trust_domain().id_string(), concat(b.x509_authorities())))
                    .collect(),
            },
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        check_audience(&r.audience)?;
        let wanted = if r.spiffe_id.is_empty() {
            None
        } else {
            Some(
                SpiffeId::new(&r.spiffe_id)
                    .map_err(|e| WorkloadApiError::Invalid(format!("spiffe_id: {e}")))?,
            )
        };
        let (_, svids) = self.identities(&caller);
        let chosen: Vec<_> = svids
            .into_iter()
            .filter(|c| wanted.as_ref().is_none_or(|id| &c.entry.spiffe_id == id))
            .collect();
        if chosen.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        let mut out = Vec::with_capacity(chosen.len());
        for c in chosen {
            let token = self
                .cache
                .jwt_svid(&c, &r.audience)
                .await
                .map_err(WorkloadApiError::from)?;
            out.push(pb::Jwtsvid {
                spiffe_id: c.entry.spiffe_id.to_string(),
                svid: token,
                hint: c.entry.hint.clone(),
            });
        }
        Ok(Response::new(pb::JwtsvidResponse { svids: out }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.caller(&request).await?;
        if self.identities(&caller).1.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        Ok(Response::new(watch_stream(
            self.clone(),
            caller,
            |snapshot: &Snapshot, svids: &[Arc<CachedSvid>]| pb::JwtBundlesResponse {
                bundles: visible_bundles(snapshot, svids)
                    .into_iter()
                    .map(|b| (b.trust_domain().id_string(), jwks(b)))
                    .collect(),
            },
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        if r.audience.is_empty() {
            return Err(WorkloadApiError::Invalid("audience must be specified".into()).into());
        }
        if r.svid.is_empty() {
            return Err(WorkloadApiError::Invalid("svid must be specified".into()).into());
        }
        check_audience(std::slice::from_ref(&r.audience))?;
        let (snapshot, svids) = self.identities(&caller);
        if svids.is_empty() {
            return Err(self.no_identity(&caller).into());
        }
        let visible: BundleSet = {
            let mut set = BundleSet::new();
            for b in visible_bundles(&snapshot, &svids) {
                set.insert(b.clone());
            }
            set
        };
        let now = self.cache.clock().now();
        let validated = jwt::validate(&r.svid, &[r.audience.as_str()], &visible, now)
            .map_err(WorkloadApiError::from)?;
        let claims = claims_struct(&r.svid);
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(claims),
        }))
    }
}

fn check_audience(audience: &[String]) -> Result<(), WorkloadApiError> {
    if audience.is_empty() {
        return Err(WorkloadApiError::Invalid(
            "audience must be specified".into(),
        ));
    }
    if audience.len() > MAX_AUDIENCES
        || audience
            .iter()
            .any(|a| a.is_empty() || a.len() > MAX_AUDIENCE_LEN)
    {
        return Err(WorkloadApiError::Invalid(format!(
            "at most {MAX_AUDIENCES} audiences of 1 to {MAX_AUDIENCE_LEN} bytes"
        )));
    }
    Ok(())
}

/// The (already validated) token's claims as a protobuf Struct.
fn claims_struct(token: &str) -> prost_types::Struct {
    let claims: serde_json::Value =
        jsonwebtoken::dangerous::insecure_decode_claims(token).unwrap_or_default();
    match json_to_prost(claims) {
        prost_types::value::Kind::StructValue(s) => s,
        _ => prost_types::Struct::default(),
    }
}

fn json_to_prost(v: serde_json::Value) -> prost_types::value::Kind {
    use prost_types::value::Kind;
    match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a
                .into_iter()
                .map(|v| prost_types::Value {
                    kind: Some(json_to_prost(v)),
                })
                .collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        prost_types::Value {
                            kind: Some(json_to_prost(v)),
                        },
                    )
                })
                .collect(),
        }),
    }
}
