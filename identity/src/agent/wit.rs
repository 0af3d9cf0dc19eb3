//! WIT-SVIDs on the Workload API: the WIT-SVID profile of the SPIFFE Workload API
//! (incubating, section 7: `FetchWITSVID`, `FetchWITBundles`).
//!
//! The agent generates a P-256 key pair for each of a workload's identities, has the
//! server sign a WIT-SVID binding its public half (`SignWitSvid` on the node API, signed
//! with the trust domain's JWT authority under a `wit-` key id), and returns the WIT with
//! the private key as a JWK, as the profile defines (`WITSVID.wit_svid_key`). Instances
//! of one workload on this host share the WIT and key, which the WIT-SVID text allows.
//! Each WIT is renewed, with a fresh key, once half its lifetime has passed, and the
//! stream sends the new set. Sub-agents (leases) get no WIT-SVIDs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::cache::{Cache, CachedSvid};
use super::workload_api::{Attested, WorkloadApi, WorkloadApiError};
use crate::proto::workload as pb;
use crate::server::node::NodeError;
use crate::spiffe_id::SpiffeId;
use crate::svid::wit::WitKey;

/// Most WIT-SVIDs the agent keeps (entries times template renderings).
pub const MAX_CACHED_WITS: usize = 10_000;

/// One identity's current WIT-SVID and key.
#[derive(Debug, Clone)]
struct CachedWit {
    token: String,
    key: WitKey,
    refresh_at: i64,
    expires_at: i64,
}

/// The agent's WIT-SVIDs, per entry (and rendered ID), renewed at half their lifetime.
#[derive(Debug, Default)]
pub struct WitCache {
    wits: Mutex<HashMap<String, CachedWit>>,
}

impl WitCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn wits(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedWit>> {
        self.wits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The WIT-SVID of `identity`: the cached one until half its lifetime has passed,
    /// otherwise a fresh key and WIT signed by the server. Returns `(token, private JWK,
    /// refresh_at)`.
    ///
    /// # Errors
    /// [`NodeError`] if the server refuses or cannot be reached.
    pub async fn wit_svid(
        &self,
        cache: &Cache,
        identity: &CachedSvid,
    ) -> Result<CurrentWit, NodeError> {
        let entry = &identity.entry;
        let slot = format!("{} {}", entry.id, entry.spiffe_id);
        let now = cache.clock().unix_seconds();
        if let Some(hit) = self.wits().get(&slot)
            && hit.refresh_at > now
            && hit.expires_at > now
        {
            return Ok(CurrentWit::of(hit));
        }
        let key = WitKey::generate().map_err(|e| NodeError::Invalid(e.to_string()))?;
        let cnf = serde_json::to_string(key.public_jwk())
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let values = identity.template.as_ref().map(|t| &t.values);
        let (token, iat, exp) = cache.node().sign_wit_svid(&entry.id, values, &cnf).await?;
        let fresh = CachedWit {
            token,
            key,
            refresh_at: iat + (exp - iat) / 2,
            expires_at: exp,
        };
        let current = CurrentWit::of(&fresh);
        let mut wits = self.wits();
        if wits.len() >= MAX_CACHED_WITS {
            wits.retain(|_, w| w.expires_at > now);
            if wits.len() >= MAX_CACHED_WITS {
                wits.clear();
            }
        }
        wits.insert(slot, fresh);
        Ok(current)
    }
}

/// A WIT-SVID as the Workload API returns it.
#[derive(Clone)]
pub struct CurrentWit {
    /// The WIT, compact JWS.
    pub token: String,
    /// The private key, a JWK.
    pub key_jwk: zeroize::Zeroizing<String>,
    /// When the agent renews it.
    pub refresh_at: i64,
}

impl std::fmt::Debug for CurrentWit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentWit")
            .field("token_sha256", &crate::fingerprint::token(&self.token))
            .field("refresh_at", &self.refresh_at)
            .finish_non_exhaustive()
    }
}

impl CurrentWit {
    fn of(w: &CachedWit) -> Self {
        Self {
            token: w.token.clone(),
            key_jwk: w.key.to_jwk(),
            refresh_at: w.refresh_at,
        }
    }
}

type ResponseStream<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

/// The identities of `caller` that get WIT-SVIDs: not sub-agents', only `wanted` if set.
fn wit_identities(
    api: &WorkloadApi,
    caller: &Attested,
    wanted: Option<&SpiffeId>,
) -> Vec<Arc<CachedSvid>> {
    api.identities(caller)
        .1
        .into_iter()
        .filter(|c| c.lease_id.is_none())
        .filter(|c| wanted.is_none_or(|id| &c.entry.spiffe_id == id))
        .collect()
}

/// `FetchWITSVID`: the caller's WIT-SVIDs now, and again after every change or renewal;
/// the stream ends with PermissionDenied once the caller has no identity.
///
/// # Errors
/// PermissionDenied if the caller has no identity now; InvalidArgument for a malformed
/// `spiffe_id`.
pub(crate) fn fetch_wit_svid(
    api: WorkloadApi,
    wits: Arc<WitCache>,
    caller: Attested,
    request: &pb::WitsvidRequest,
) -> Result<ResponseStream<pb::WitsvidResponse>, WorkloadApiError> {
    let wanted = if request.spiffe_id.is_empty() {
        None
    } else {
        Some(
            SpiffeId::new(&request.spiffe_id)
                .map_err(|e| WorkloadApiError::Invalid(format!("spiffe_id: {e}")))?,
        )
    };
    if wit_identities(&api, &caller, wanted.as_ref()).is_empty() {
        return Err(api.no_identity(&caller));
    }
    struct State {
        api: WorkloadApi,
        wits: Arc<WitCache>,
        caller: Attested,
        wanted: Option<SpiffeId>,
        updates: tokio::sync::watch::Receiver<u64>,
        last: Option<pb::WitsvidResponse>,
        done: bool,
    }
    let state = State {
        updates: api.cache().subscribe(),
        api,
        wits,
        caller,
        wanted,
        last: None,
        done: false,
    };
    Ok(Box::pin(futures::stream::unfold(
        state,
        |mut st| async move {
            if st.done {
                return None;
            }
            loop {
                if st
                    .api
                    .cache()
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
                st.api.ensure_templates(&st.caller).await;
                let svids = wit_identities(&st.api, &st.caller, st.wanted.as_ref());
                if svids.is_empty() {
                    st.done = true;
                    let e = st.api.no_identity(&st.caller);
                    return Some((Err(Status::from(e)), st));
                }
                let mut out = Vec::with_capacity(svids.len());
                let mut next_refresh = i64::MAX;
                for c in &svids {
                    match st.wits.wit_svid(st.api.cache(), c).await {
                        Ok(w) => {
                            next_refresh = next_refresh.min(w.refresh_at);
                            out.push(pb::Witsvid {
                                spiffe_id: c.entry.spiffe_id.to_string(),
                                wit_svid: w.token,
                                wit_svid_key: w.key_jwk.to_string(),
                                hint: c.entry.hint.clone(),
                            });
                        }
                        Err(e) => {
                            st.done = true;
                            return Some((Err(Status::from(WorkloadApiError::from(e))), st));
                        }
                    }
                }
                let msg = pb::WitsvidResponse { svids: out };
                if st.last.as_ref() != Some(&msg) {
                    st.last = Some(msg.clone());
                    return Some((Ok(msg), st));
                }
                let now = st.api.cache().clock().unix_seconds();
                let until = u64::try_from(next_refresh.saturating_sub(now)).unwrap_or(0);
                let wait = std::time::Duration::from_secs(until).clamp(
                    std::time::Duration::from_millis(10),
                    std::time::Duration::from_secs(60),
                );
                if let Ok(Err(_)) = tokio::time::timeout(wait, st.updates.changed()).await {
                    return None;
                }
            }
        },
    )))
}
