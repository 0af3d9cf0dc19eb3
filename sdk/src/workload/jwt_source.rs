//! [`JwtSource`]: a workload's JWT-SVIDs, fetched per audience from the Workload API and
//! reused until half their lifetime, and the JWT bundles of every trust domain the
//! workload trusts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use writ_spiffe::bundle::{Bundle, BundleSet};
use writ_spiffe::clock::{SharedClock, SystemClock};
use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};

use super::{WorkloadClient, WorkloadError};

/// Most audience sets remembered; beyond it the cache starts over.
const MAX_CACHED: usize = 1024;

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    refresh_at: i64,
}

/// Builds a [`JwtSource`].
#[derive(Debug, Default)]
pub struct JwtSourceBuilder {
    endpoint: Option<String>,
    spiffe_id: Option<SpiffeId>,
    clock: Option<SharedClock>,
}

impl JwtSourceBuilder {
    /// Uses `endpoint` (`unix:///path`) instead of `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Asks for JWT-SVIDs of this identity when the workload has several (by default
    /// the first the agent returns).
    pub fn spiffe_id(mut self, id: SpiffeId) -> Self {
        self.spiffe_id = Some(id);
        self
    }

    /// Reads time from `clock` to decide when a cached JWT-SVID is due.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Connects to the Workload API.
    ///
    /// # Errors
    /// [`WorkloadError::EndpointUnset`] if no endpoint was given and
    /// `SPIFFE_ENDPOINT_SOCKET` is unset; [`WorkloadError`] if the endpoint is malformed
    /// or unreachable.
    pub async fn build(self) -> Result<JwtSource, WorkloadError> {
        let endpoint = match self.endpoint {
            Some(endpoint) => endpoint,
            None => super::endpoint_from_env()?,
        };
        Ok(JwtSource {
            client: WorkloadClient::connect(&endpoint).await?,
            spiffe_id: self.spiffe_id,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            cache: Arc::new(Mutex::new(HashMap::new())),
        })
    }
}

/// JWT-SVIDs from the Workload API, cached per audience until half their lifetime.
/// Clones share the connection and the cache.
///
/// ```no_run
/// # async fn demo() -> Result<(), writ_sdk::workload::WorkloadError> {
/// let jwts = writ_sdk::workload::JwtSource::new().await?;
/// let token = jwts.fetch(&["https://tts.example.org"]).await?;
/// // The same token again, until half its lifetime has passed.
/// assert_eq!(token, jwts.fetch(&["https://tts.example.org"]).await?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct JwtSource {
    client: WorkloadClient,
    spiffe_id: Option<SpiffeId>,
    clock: SharedClock,
    cache: Arc<Mutex<HashMap<Vec<String>, Cached>>>,
}

impl JwtSource {
    /// A source on `SPIFFE_ENDPOINT_SOCKET` (which must be set).
    ///
    /// # Errors
    /// [`WorkloadError`] if the endpoint is malformed or unreachable.
    pub async fn new() -> Result<Self, WorkloadError> {
        Self::builder().build().await
    }

    /// A builder to choose the endpoint, the identity or the clock.
    pub fn builder() -> JwtSourceBuilder {
        JwtSourceBuilder::default()
    }

    /// A JWT-SVID for `audience` (the first audience is the primary one): from the
    /// cache while less than half its lifetime has passed, otherwise from the agent.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers, or [`WorkloadError::NoIdentity`] if it
    /// returns no SVID for the identity asked for.
    pub async fn fetch(&self, audience: &[&str]) -> Result<String, WorkloadError> {
        let key: Vec<String> = audience.iter().map(|a| (*a).to_owned()).collect();
        let now = self.clock.unix_seconds();
        if let Some(hit) = self.cache().get(&key).filter(|c| c.refresh_at > now) {
            return Ok(hit.token.clone());
        }
        let mut client = self.client.clone();
        let svids = client.fetch_jwt(&key, self.spiffe_id.as_ref()).await?;
        let (_, token) = svids
            .into_iter()
            .find(|(id, _)| self.spiffe_id.as_ref().is_none_or(|want| want == id))
            .ok_or(WorkloadError::NoIdentity)?;
        if let Some(refresh_at) = half_life(&token) {
            let mut cache = self.cache();
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(
                key,
                Cached {
                    token: token.clone(),
                    refresh_at,
                },
            );
        }
        Ok(token)
    }

    /// Has the agent validate a JWT-SVID addressed to `audience`; returns its SPIFFE ID
    /// and claims.
    ///
    /// # Errors
    /// [`WorkloadError`] if the token is invalid or the agent refuses.
    pub async fn validate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(SpiffeId, serde_json::Value), WorkloadError> {
        self.client.clone().validate_jwt(audience, token).await
    }

    /// The JWT bundles of the own trust domain and the federated ones, as the agent
    /// has them now.
    ///
    /// # Errors
    /// [`WorkloadError`] as the agent answers, or if a bundle is malformed.
    pub async fn bundles(&self) -> Result<BundleSet, WorkloadError> {
        let raw = self.client.clone().fetch_jwt_bundles().await?;
        let mut set = BundleSet::new();
        for (name, jwks) in raw {
            let td = TrustDomain::new(name.strip_prefix("spiffe://").unwrap_or(&name))?;
            let text = String::from_utf8(jwks)
                .map_err(|_| WorkloadError::Malformed("JWT bundle is not UTF-8".into()))?;
            set.insert(
                Bundle::from_json(td, &text)
                    .map_err(|e| WorkloadError::Malformed(format!("JWT bundle {name}: {e}")))?,
            );
        }
        Ok(set)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<String>, Cached>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// When half of the token's lifetime (`iat`..`exp`) has passed, read from its payload
/// without verification: the agent issued it to us, and a wrong value only makes us
/// fetch sooner or later.
fn half_life(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_i64()?;
    let iat = claims.get("iat").and_then(serde_json::Value::as_i64)?;
    (exp > iat).then(|| iat + (exp - iat) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(payload: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", b64(r#"{"alg":"ES256"}"#), b64(payload))
    }

    #[test]
    fn half_life_from_the_payload() {
        assert_eq!(half_life(&token(r#"{"iat":100,"exp":400}"#)), Some(250));
        assert_eq!(half_life(&token(r#"{"exp":400}"#)), None);
        assert_eq!(half_life(&token(r#"{"iat":400,"exp":100}"#)), None);
        assert_eq!(half_life("garbage"), None);
        assert_eq!(half_life("a.!!!.c"), None);
    }
}
