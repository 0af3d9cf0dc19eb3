//! [`X509Source`]: a workload's own X509-SVID and the trust bundles, kept current by one
//! long-lived `FetchX509SVID` stream.
//!
//! The snapshot sits behind an `ArcSwap`, so reading it never waits; TLS configs built
//! from a source ([`crate::tls`]) read it at every handshake, which is how a rotation
//! reaches new connections without a restart. When the stream fails the source keeps
//! its last snapshot and reconnects with jittered exponential backoff. An update whose
//! chosen SVID has already expired is refused (the previous snapshot stays).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use writ_spiffe::bundle::{Bundle, BundleSet};
use writ_spiffe::clock::{SharedClock, SystemClock};
use writ_spiffe::key::PrivateKey;
use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use writ_spiffe::svid::x509::{X509Svid, check_leaf};
use writ_spiffe::tls::{BundleSource, SvidResolver};

use super::{WorkloadClient, WorkloadError, X509Context};

/// First reconnect delay after the stream fails.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// How long [`X509SourceBuilder::build`] waits for an identity by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One consistent view: the chosen SVID and every bundle the workload trusts.
#[derive(Debug, Clone)]
pub struct X509Snapshot {
    /// The SVID this source presents.
    pub svid: X509Svid,
    /// The own trust domain's bundle and the federated ones.
    pub bundles: BundleSet,
}

/// Builds an [`X509Source`].
#[derive(Debug, Clone, Default)]
pub struct X509SourceBuilder {
    endpoint: Option<String>,
    spiffe_id: Option<SpiffeId>,
    wait: Option<Duration>,
    clock: Option<SharedClock>,
}

impl X509SourceBuilder {
    /// Uses `endpoint` (`unix:///path`) instead of `SPIFFE_ENDPOINT_SOCKET`.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Presents the SVID with this ID when the agent issues several (go-spiffe's picker);
    /// by default the first, which the Workload API names the default.
    pub fn spiffe_id(mut self, id: SpiffeId) -> Self {
        self.spiffe_id = Some(id);
        self
    }

    /// Keeps trying for up to `wait` while the agent is unreachable or has not issued
    /// the identity yet (a workload often starts before its registration reaches the
    /// agent). Default: [`DEFAULT_WAIT`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Reads the time from `clock` when it checks an SVID's expiry (default: the system
    /// clock).
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Connects, waits for the first usable snapshot and starts following updates.
    ///
    /// # Errors
    /// [`WorkloadError`] if, for the whole wait, the agent is unreachable or issues no
    /// identity (or not the one asked for); at once if it sends an expired or malformed
    /// SVID, or if no endpoint was given and `SPIFFE_ENDPOINT_SOCKET` is unset
    /// ([`WorkloadError::EndpointUnset`]).
    pub async fn build(self) -> Result<X509Source, WorkloadError> {
        let endpoint = match self.endpoint {
            Some(e) => e,
            None => super::endpoint_from_env()?,
        };
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let deadline = tokio::time::Instant::now() + self.wait.unwrap_or(DEFAULT_WAIT);
        let (watch, first) = loop {
            let attempt = async {
                let mut client = WorkloadClient::connect(&endpoint).await?;
                let mut watch = client.watch_x509().await?;
                let first = snapshot(&watch.next().await?, self.spiffe_id.as_ref(), clock.now())?;
                Ok::<_, WorkloadError>((watch, first))
            };
            match attempt.await {
                Ok(ok) => break ok,
                Err(WorkloadError::Malformed(m)) => return Err(WorkloadError::Malformed(m)),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(BACKOFF_MIN).await,
            }
        };
        let resolver = SvidResolver::new();
        resolver
            .set(&first.svid)
            .map_err(|e| WorkloadError::Malformed(e.to_string()))?;
        let (updates, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(first),
            resolver,
            updates,
            clock,
        });
        let task = tokio::spawn(follow(
            shared.clone(),
            endpoint,
            self.spiffe_id,
            Some(watch),
        ));
        Ok(X509Source {
            shared,
            _task: Arc::new(AbortOnDropHandle::new(task)),
        })
    }
}

#[derive(Debug)]
struct Shared {
    current: ArcSwap<X509Snapshot>,
    resolver: Arc<SvidResolver>,
    updates: watch::Sender<u64>,
    clock: SharedClock,
}

/// A workload's X509-SVID and bundles from the Workload API, kept current in the
/// background. Clones share one stream; the stream closes when the last clone is dropped.
///
/// ```no_run
/// # async fn demo() -> Result<(), writ_sdk::workload::WorkloadError> {
/// let source = writ_sdk::workload::X509Source::new().await?;
/// println!("I am {}", source.spiffe_id());
/// let mut updates = source.updated();
/// updates.changed().await.ok(); // the next rotation
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct X509Source {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDropHandle<()>>,
}

impl X509Source {
    /// A source on `SPIFFE_ENDPOINT_SOCKET` (which must be set) presenting the
    /// default SVID.
    ///
    /// # Errors
    /// As [`X509SourceBuilder::build`].
    pub async fn new() -> Result<Self, WorkloadError> {
        Self::builder().build().await
    }

    /// A builder to choose the endpoint or the SVID.
    pub fn builder() -> X509SourceBuilder {
        X509SourceBuilder::default()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<X509Snapshot> {
        self.shared.current.load_full()
    }

    /// The SPIFFE ID of the current SVID.
    pub fn spiffe_id(&self) -> SpiffeId {
        self.shared.current.load().svid.spiffe_id.clone()
    }

    /// The current SVID (with its private key).
    pub fn svid(&self) -> X509Svid {
        self.shared.current.load().svid.clone()
    }

    /// The current bundle of `trust_domain`: the own one or a federated one.
    pub fn bundle(&self, trust_domain: &TrustDomain) -> Option<Bundle> {
        self.shared
            .current
            .load()
            .bundles
            .get(trust_domain)
            .cloned()
    }

    /// Every bundle, read fresh at each call (for the verifiers of [`writ_spiffe::tls`]).
    pub fn bundle_source(&self) -> BundleSource {
        let shared = self.shared.clone();
        Arc::new(move || shared.current.load().bundles.clone())
    }

    /// The certificate resolver that presents the current SVID in TLS handshakes.
    pub fn resolver(&self) -> Arc<SvidResolver> {
        self.shared.resolver.clone()
    }

    /// A receiver that changes at every accepted update (its value counts updates).
    pub fn updated(&self) -> watch::Receiver<u64> {
        self.shared.updates.subscribe()
    }
}

/// Picks the SVID and assembles the bundles of one Workload API response.
fn snapshot(
    ctx: &X509Context,
    want: Option<&SpiffeId>,
    now: SystemTime,
) -> Result<X509Snapshot, WorkloadError> {
    let entry = match want {
        Some(id) => ctx.svids.iter().find(|s| &s.spiffe_id == id),
        None => ctx.svids.first(),
    }
    .ok_or(WorkloadError::NoIdentity)?;
    let leaf = entry
        .cert_chain
        .first()
        .ok_or_else(|| WorkloadError::Malformed("empty X509-SVID chain".into()))?;
    let checked = check_leaf(leaf).map_err(|e| WorkloadError::Malformed(e.to_string()))?;
    if checked.spiffe_id != entry.spiffe_id {
        return Err(WorkloadError::Malformed(
            "X509-SVID does not carry the SPIFFE ID the agent named".into(),
        ));
    }
    if checked.expires_at <= now {
        return Err(WorkloadError::Malformed("X509-SVID has expired".into()));
    }
    let key = PrivateKey::from_pkcs8_der(&entry.private_key)
        .map_err(|e| WorkloadError::Malformed(format!("X509-SVID key: {e}")))?;
    let mut bundles = BundleSet::new();
    bundles.insert(bundle_of(entry.spiffe_id.trust_domain(), &entry.bundle)?);
    for (name, certs) in &ctx.federated {
        let td = TrustDomain::new(name.strip_prefix("spiffe://").unwrap_or(name))
            .map_err(|e| WorkloadError::Malformed(format!("federated bundle name: {e}")))?;
        bundles.insert(bundle_of(td, certs)?);
    }
    Ok(X509Snapshot {
        svid: X509Svid {
            spiffe_id: entry.spiffe_id.clone(),
            cert_chain: entry.cert_chain.clone(),
            private_key: Some(key),
            expires_at: checked.expires_at,
        },
        bundles,
    })
}

fn bundle_of(td: TrustDomain, certs: &[Vec<u8>]) -> Result<Bundle, WorkloadError> {
    let mut bundle = Bundle::new(td);
    for der in certs {
        bundle
            .add_x509_authority(der.clone())
            .map_err(|e| WorkloadError::Malformed(format!("bundle: {e}")))?;
    }
    Ok(bundle)
}

/// Follows the stream, reconnecting with jittered backoff, until the source is dropped.
async fn follow(
    shared: Arc<Shared>,
    endpoint: String,
    want: Option<SpiffeId>,
    mut watch: Option<super::X509Watch>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let stream = match watch.take() {
            Some(w) => Ok(w),
            None => match WorkloadClient::connect(&endpoint).await {
                Ok(mut client) => client.watch_x509().await,
                Err(e) => Err(e),
            },
        };
        let error = match stream {
            Ok(mut stream) => loop {
                match stream.next().await {
                    Ok(ctx) => {
                        backoff = BACKOFF_MIN;
                        apply(&shared, &ctx, want.as_ref());
                    }
                    Err(e) => break e,
                }
            },
            Err(e) => e,
        };
        let delay = backoff.mul_f64(jitter());
        tracing::warn!(error = %error, retry_in = ?delay, "Workload API stream lost; reconnecting");
        tokio::time::sleep(delay).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn apply(shared: &Shared, ctx: &X509Context, want: Option<&SpiffeId>) {
    match snapshot(ctx, want, shared.clock.now()) {
        Ok(next) => {
            if let Err(e) = shared.resolver.set(&next.svid) {
                tracing::warn!(error = %e, "Workload API update refused");
                return;
            }
            tracing::debug!(spiffe_id = %next.svid.spiffe_id, "X509-SVID updated");
            shared.current.store(Arc::new(next));
            shared.updates.send_modify(|n| *n += 1);
        }
        Err(e) => tracing::warn!(error = %e, "Workload API update refused; keeping the last one"),
    }
}

/// A factor in `[0.5, 1.5]` that spreads retries of many workloads apart.
fn jitter() -> f64 {
    let mut byte = [0u8; 1];
    // A failed random source only loses the spread, not the retry.
    let _ = aws_lc_rs::rand::fill(&mut byte);
    let [random] = byte;
    0.5 + f64::from(random) / 255.0
}
