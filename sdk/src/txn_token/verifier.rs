//! [`TxnVerifier`]: checks a Txn-Token's signature against the service's JWKS and its
//! claims against this service's trust domain, with the keys and the already-verified
//! tokens cached.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize as _;
use serde_json::Value;
use writ_spiffe::clock::{SharedClock, SystemClock, unix_seconds};
use writ_spiffe::numeric_date::{TimeClaims, TimeError};
use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};

use super::jwks::{Jwks, JwksSource};
use super::{
    ALGORITHMS, MAX_CHAIN_DEPTH, MAX_TOKEN_BYTES, TIME_WINDOW, TXN_TOKEN_TYP, TxnToken,
    TxnTokenError,
};
use crate::jwks::KeyCache;
use crate::revocation::{RevocationCheck, RevocationFeed, describe};

/// How long a fetched JWKS is used before it is fetched again.
pub const DEFAULT_KEYS_MAX_AGE: Duration = Duration::from_secs(300);
/// Least time between two fetches caused by unknown `kid`s.
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Default capacity of the verified-token cache.
pub const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
/// Whose keys the verifier's key cache holds, in logs.
const KEYS_NAME: &str = "Txn-Token signing keys";

/// Builds a [`TxnVerifier`].
#[derive(Debug)]
pub struct TxnVerifierBuilder {
    trust_domain: String,
    issuer: Option<String>,
    source: JwksSource,
    clock: SharedClock,
    max_age: Duration,
    refetch_interval: Duration,
    cache_capacity: u64,
    revocations: Option<RevocationFeed>,
}

impl TxnVerifierBuilder {
    /// Also refuses every token a revocation in `feed` covers, with
    /// [`TxnTokenError::Revoked`] (see [`crate::revocation`]).
    pub fn revocations(mut self, feed: RevocationFeed) -> Self {
        self.revocations = Some(feed);
        self
    }

    /// Also requires `iss` to be `issuer` (by default any issuer whose keys verify).
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    /// Reads time from `clock` (default: the system clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Uses a fetched JWKS for at most `max_age` (default [`DEFAULT_KEYS_MAX_AGE`]).
    pub fn keys_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Fetches again on an unknown `kid` at most once per `interval` (default
    /// [`DEFAULT_REFETCH_INTERVAL`]), so tokens with made-up key ids cannot make the
    /// verifier hammer the service.
    pub fn refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// Remembers up to `capacity` verified tokens until they expire; 0
    /// turns the cache off. Default [`DEFAULT_CACHE_CAPACITY`].
    pub fn cache_capacity(mut self, capacity: u64) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// The verifier. Keys from a file or URL are loaded at the first verification.
    pub fn build(self) -> TxnVerifier {
        let keys = match &self.source {
            JwksSource::Keys(jwks) => KeyCache::fixed(KEYS_NAME, self.clock.clone(), jwks.clone()),
            _ => KeyCache::new(
                KEYS_NAME,
                self.clock.clone(),
                self.max_age,
                self.refetch_interval,
            ),
        };
        let verified = (self.cache_capacity > 0).then(|| {
            quick_cache::sync::Cache::new(
                usize::try_from(self.cache_capacity).unwrap_or(usize::MAX),
            )
        });
        TxnVerifier {
            inner: Arc::new(Inner {
                trust_domain: self.trust_domain,
                issuer: self.issuer,
                source: self.source,
                clock: self.clock,
                keys,
                verified,
                revocations: self.revocations,
            }),
        }
    }
}

struct Inner {
    trust_domain: String,
    issuer: Option<String>,
    source: JwksSource,
    clock: SharedClock,
    /// The service's keys, fetched, cached and fetched again by the SDK's one policy
    /// ([`crate::jwks`]); a load error is kept as its message.
    keys: KeyCache<Jwks, String>,
    /// Verified tokens, keyed by the whole token (compared in full on a hit, hashed by
    /// its signature segment only: see [`CachedToken`]), bounded in count; an entry is
    /// used only while its token is within its time window by the clock, so an expired
    /// one is never served (it stays until evicted, which the bound makes harmless).
    verified: Option<quick_cache::sync::Cache<CachedToken, Arc<TxnToken>>>,
    /// What the operator revoked, when the service follows the feed.
    revocations: Option<RevocationFeed>,
}

/// Verifies Txn-Tokens: `typ: txntoken+jwt`, an allowed algorithm with a key from the
/// service's JWKS, `aud` = this trust domain, `exp`/`nbf`/`iat` within
/// [`TIME_WINDOW`](super::TIME_WINDOW) (unexpired, not valid only later, `exp` at most
/// [`MAX_LIFETIME`](super::MAX_LIFETIME) ahead), the required claims (`txn`, `sub`,
/// `req_wl`, ...), and an `act` chain whose every level is an object with a SPIFFE ID
/// `sub`, at most [`MAX_CHAIN_DEPTH`] deep. Clones share keys and cache.
///
/// ```no_run
/// # async fn demo(token: &str) -> Result<(), Box<dyn std::error::Error>> {
/// use writ_sdk::exchange::TxnClient;
/// use writ_sdk::txn_token::TxnVerifier;
/// use writ_sdk::workload::X509Source;
/// let source = X509Source::new().await?;
/// let tts_id = "spiffe://example.org/writ/tts".parse()?;
/// let tts = TxnClient::new(&source, "https://127.0.0.1:8443", tts_id)?;
/// let td = source.spiffe_id().trust_domain();
/// let verifier = TxnVerifier::builder(td, tts.jwks_source()).build();
/// let txn = verifier.verify(token).await?;
/// println!("{} for {} via {:?}", txn.txn, txn.sub, txn.chain());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TxnVerifier {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TxnVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxnVerifier")
            .field("trust_domain", &self.inner.trust_domain)
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

impl TxnVerifier {
    /// The clock the verifier reads (the middleware stamps its records with it).
    #[cfg(feature = "axum")]
    pub(crate) fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// A verifier for tokens of `trust_domain` signed by one of `keys` (key id -> JWK),
    /// on the system clock, without a verified-token cache.
    pub fn new(
        trust_domain: TrustDomain,
        keys: std::collections::BTreeMap<String, writ_spiffe::bundle::Jwk>,
    ) -> Self {
        Self::builder(trust_domain, JwksSource::Keys(Jwks::from_keys(keys)))
            .cache_capacity(0)
            .build()
    }

    /// A builder for tokens of `trust_domain` with keys from `source`.
    pub fn builder(trust_domain: TrustDomain, source: JwksSource) -> TxnVerifierBuilder {
        TxnVerifierBuilder {
            trust_domain: trust_domain.as_str().to_owned(),
            issuer: None,
            source,
            clock: Arc::new(SystemClock),
            max_age: DEFAULT_KEYS_MAX_AGE,
            refetch_interval: DEFAULT_REFETCH_INTERVAL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            revocations: None,
        }
    }

    /// Verifies `token` now: from the verified-token cache if it was verified before,
    /// otherwise against the keys, loading them first if they are missing or older
    /// than their max age, and fetching them again (rate-bounded) if the `kid` is not
    /// among them; then, with a revocation feed ([`TxnVerifierBuilder::revocations`]),
    /// refuses a token a revocation in force covers.
    ///
    /// # Errors
    /// [`TxnTokenError`] for the first problem found.
    pub async fn verify(&self, token: &str) -> Result<TxnToken, TxnTokenError> {
        self.verify_shared(token).await.map(Arc::unwrap_or_clone)
    }

    /// [`TxnVerifier::verify`], returning the claims shared with the verified-token
    /// cache: a cache hit allocates nothing and copies no claim (a hit costs a hash of
    /// the token's signature segment, a comparison of the whole token and the time
    /// checks; see "What verification costs" in `docs/sdk.md`).
    ///
    /// ```no_run
    /// # async fn demo(verifier: writ_sdk::txn_token::TxnVerifier, token: &str)
    /// # -> Result<(), writ_sdk::txn_token::TxnTokenError> {
    /// let txn = verifier.verify_shared(token).await?;
    /// println!("{} for {}", txn.txn, txn.sub);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`TxnVerifier::verify`].
    pub async fn verify_shared(&self, token: &str) -> Result<Arc<TxnToken>, TxnTokenError> {
        let claims = self.verify_unrevoked_shared(token).await?;
        self.check_revoked(&claims, None)?;
        Ok(claims)
    }

    /// Whether a revocation in force covers `claims`, or `caller` (the mTLS peer that
    /// presented them) when given. Always `Ok` without a revocation feed.
    ///
    /// # Errors
    /// [`TxnTokenError::Revoked`] naming the revocation, or
    /// [`TxnTokenError::RevocationsStale`] when the feed fails closed.
    pub fn check_revoked(
        &self,
        claims: &TxnToken,
        caller: Option<&SpiffeId>,
    ) -> Result<(), TxnTokenError> {
        let Some(feed) = &self.inner.revocations else {
            return Ok(());
        };
        let found = match feed.check_token(claims) {
            RevocationCheck::Clear => {
                caller.map_or(RevocationCheck::Clear, |c| feed.check_workload(c.as_str()))
            }
            other => other,
        };
        match found {
            RevocationCheck::Clear => Ok(()),
            RevocationCheck::Revoked(r) => Err(TxnTokenError::Revoked(describe(&r))),
            RevocationCheck::Stale => Err(TxnTokenError::RevocationsStale),
        }
    }

    /// [`TxnVerifier::verify`] without the revocation check (the middleware checks the
    /// token and the caller together afterwards, so its record names the transaction).
    #[cfg(feature = "axum")]
    pub(crate) async fn verify_unrevoked(&self, token: &str) -> Result<TxnToken, TxnTokenError> {
        self.verify_unrevoked_shared(token)
            .await
            .map(Arc::unwrap_or_clone)
    }

    /// `verify_unrevoked`, with the claims shared with the cache.
    pub(crate) async fn verify_unrevoked_shared(
        &self,
        token: &str,
    ) -> Result<Arc<TxnToken>, TxnTokenError> {
        let inner = &self.inner;
        check_size(token)?;
        if let Some(cache) = &inner.verified
            && let Some(hit) = cache.get(&TokenRef(token))
        {
            // Expired entries are not dropped eagerly: the clock decides.
            check_times(&hit, unix_seconds(inner.clock.now()))?;
            return Ok(hit);
        }
        let header = header(token)?;
        let kid = header.kid.as_deref().ok_or(TxnTokenError::UnknownKey)?;
        let source = &inner.source;
        let load = || async move { source.load().await.map_err(|e| e.to_string()) };
        let mut jwks = inner.keys.keys(load).await.map_err(TxnTokenError::Keys)?;
        if jwks.get(kid).is_none() {
            jwks = inner
                .keys
                .refetch(load)
                .await
                .map_err(TxnTokenError::Keys)?;
        }
        let claims = Arc::new(self.verify_with_keys(&jwks, token, &header, inner.clock.now())?);
        if let Some(cache) = &inner.verified {
            cache.insert(CachedToken(token.into()), claims.clone());
        }
        Ok(claims)
    }

    /// Verifies `token` at `now` with the keys already loaded: no fetch, no cache (a
    /// revocation feed is consulted at its own clock's time).
    ///
    /// # Errors
    /// [`TxnTokenError`] for the first problem found.
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<TxnToken, TxnTokenError> {
        check_size(token)?;
        let header = header(token)?;
        let jwks = self.inner.keys.current().unwrap_or_default();
        let claims = self.verify_with_keys(&jwks, token, &header, now)?;
        self.check_revoked(&claims, None)?;
        Ok(claims)
    }

    /// Loads the keys again now, whatever their age.
    ///
    /// # Errors
    /// [`TxnTokenError::Keys`] if the source fails and no keys were ever loaded; when
    /// earlier keys exist they stay in use and this returns `Ok` (the failure is logged).
    pub async fn refresh(&self) -> Result<(), TxnTokenError> {
        let source = &self.inner.source;
        self.inner
            .keys
            .refresh(|| async move { source.load().await.map_err(|e| e.to_string()) })
            .await
            .map(|_| ())
            .map_err(TxnTokenError::Keys)
    }

    fn verify_with_keys(
        &self,
        jwks: &Jwks,
        token: &str,
        header: &jsonwebtoken::Header,
        now: SystemTime,
    ) -> Result<TxnToken, TxnTokenError> {
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| jwks.get(kid))
            .ok_or(TxnTokenError::UnknownKey)?;
        if key.alg != header.alg {
            return Err(TxnTokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let raw = verified_payload(token, &key.key)?;
        // The chain's shape first, so a malformed `act` is named as such rather than as
        // a claims type error.
        check_actor_chain(raw.get("act"))?;
        let claims =
            TxnToken::deserialize(&raw).map_err(|e| TxnTokenError::Claims(e.to_string()))?;
        self.check_claims(&claims, &raw, unix_seconds(now))?;
        Ok(claims)
    }

    fn check_claims(&self, claims: &TxnToken, raw: &Value, now: i64) -> Result<(), TxnTokenError> {
        if claims.aud != self.inner.trust_domain {
            return Err(TxnTokenError::Audience);
        }
        if self
            .inner
            .issuer
            .as_deref()
            .is_some_and(|iss| iss != claims.iss)
        {
            return Err(TxnTokenError::Issuer);
        }
        let times = TimeClaims::from_claims(raw).map_err(TxnTokenError::Time)?;
        TIME_WINDOW.check(&times, now).map_err(time_error)?;
        if claims.txn.is_empty()
            || claims.sub.is_empty()
            || claims.req_wl.is_empty()
            || claims.scopes().next().is_none()
        {
            return Err(TxnTokenError::Claims(
                "txn, sub, scope and req_wl are required".into(),
            ));
        }
        Ok(())
    }
}

/// Refuses a token larger than [`MAX_TOKEN_BYTES`] before anything parses it.
fn check_size(token: &str) -> Result<(), TxnTokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TxnTokenError::TooLarge {
            max: MAX_TOKEN_BYTES,
        });
    }
    Ok(())
}

/// The JWS signature of a Txn-Token (ES256: r || s; EdDSA: Ed25519), at most this long.
const MAX_SIGNATURE_BYTES: usize = 64;

/// The claims of compact JWS `token` once its signature checks with `key` (parsed when
/// the keys were loaded): the signing input is verified in place, the signature decoded
/// onto the stack, and only then is the payload decoded and parsed.
fn verified_payload(
    token: &str,
    key: &aws_lc_rs::signature::ParsedPublicKey,
) -> Result<Value, TxnTokenError> {
    let (signing_input, signature) = token.rsplit_once('.').ok_or(TxnTokenError::Signature)?;
    let (_, payload) = signing_input
        .split_once('.')
        .ok_or(TxnTokenError::Signature)?;
    let mut sig = [0u8; MAX_SIGNATURE_BYTES];
    if signature.len() > MAX_SIGNATURE_BYTES.div_ceil(3) * 4 {
        return Err(TxnTokenError::Signature);
    }
    let len = URL_SAFE_NO_PAD
        .decode_slice(signature, &mut sig)
        .map_err(|_| TxnTokenError::Signature)?;
    let sig = sig.get(..len).ok_or(TxnTokenError::Signature)?;
    key.verify_sig(signing_input.as_bytes(), sig)
        .map_err(|_| TxnTokenError::Signature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TxnTokenError::Signature)?;
    serde_json::from_slice(&payload).map_err(|e| TxnTokenError::Claims(e.to_string()))
}

/// A verified token as the cache holds it: the whole token. Equality is the whole
/// token; the hash covers only its signature segment (the text after the last `.`),
/// which is short and, for tokens that verified, unique in practice, so a lookup hashes
/// ~86 bytes instead of the whole token and then compares it in full. Only verified
/// tokens are inserted, so no one can fill a bucket with colliding entries.
#[derive(PartialEq, Eq)]
struct CachedToken(Box<str>);

/// A lookup of a presented token in the cache, without copying it.
struct TokenRef<'a>(&'a str);

fn signature_segment(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(_, sig)| sig)
}

impl Hash for CachedToken {
    fn hash<H: Hasher>(&self, state: &mut H) {
        signature_segment(&self.0).hash(state);
    }
}

impl Hash for TokenRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        signature_segment(self.0).hash(state);
    }
}

impl quick_cache::Equivalent<CachedToken> for TokenRef<'_> {
    fn equivalent(&self, key: &CachedToken) -> bool {
        *self.0 == *key.0
    }
}

/// The JOSE header, with the checks that need no key: `typ` and an allowed algorithm.
fn header(token: &str) -> Result<jsonwebtoken::Header, TxnTokenError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| TxnTokenError::Malformed(e.to_string()))?;
    if header.typ.as_deref() != Some(TXN_TOKEN_TYP) {
        return Err(TxnTokenError::Type);
    }
    if !ALGORITHMS.contains(&header.alg) {
        return Err(TxnTokenError::Algorithm(format!("{:?}", header.alg)));
    }
    Ok(header)
}

/// The time checks of an already verified (cached) token: `exp` and `iat` (its `nbf`,
/// if any, was checked when it was verified, and only moves into the past).
fn check_times(claims: &TxnToken, now: i64) -> Result<(), TxnTokenError> {
    let times = TimeClaims {
        exp: claims.exp,
        iat: Some(claims.iat),
        nbf: None,
    };
    TIME_WINDOW.check(&times, now).map_err(time_error)
}

fn time_error(e: TimeError) -> TxnTokenError {
    match e {
        TimeError::Expired => TxnTokenError::Expired,
        TimeError::IssuedInFuture => TxnTokenError::IssuedInFuture,
        other => TxnTokenError::Time(other),
    }
}

/// The RFC 8693 `act` chain, as the claims carry it: absent, or an object with a `sub`
/// that is a SPIFFE ID (the service puts workload identities there) and optionally a
/// nested `act` of the same shape, at most [`MAX_CHAIN_DEPTH`] levels. Other members of
/// an actor object are allowed (RFC 8693 section 4.1 lets it carry more claims about
/// the actor), but nothing where an actor must be: `act: null`, a string, an array.
fn check_actor_chain(act: Option<&Value>) -> Result<(), TxnTokenError> {
    let mut next = act;
    let mut depth = 0;
    while let Some(level) = next {
        depth += 1;
        if depth > MAX_CHAIN_DEPTH {
            return Err(TxnTokenError::ChainTooDeep {
                max: MAX_CHAIN_DEPTH,
            });
        }
        let actor = level
            .as_object()
            .ok_or(TxnTokenError::Actor("an `act` is not an object"))?;
        let sub = actor
            .get("sub")
            .and_then(Value::as_str)
            .ok_or(TxnTokenError::Actor("an actor has no `sub` string"))?;
        SpiffeId::new(sub)
            .map_err(|_| TxnTokenError::Actor("an actor's `sub` is not a SPIFFE ID"))?;
        next = actor.get("act");
    }
    Ok(())
}
