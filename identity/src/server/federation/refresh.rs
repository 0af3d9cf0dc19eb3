//! Fetching foreign bundles from their bundle endpoints, and the server task that keeps
//! every relationship's bundle fresh.
//!
//! Each relationship is fetched when due: at first, then after the bundle's
//! `spiffe_refresh_hint` (bounded, see [`super::refresh_interval`]); a failure is retried
//! with a doubling wait (from the configured minimum up to [`super::DEFAULT_REFRESH`]).
//! Every outcome is recorded on the relationship (`writ federation show`: last refresh,
//! last error, next refresh) and a failure keeps the last good bundle. A new bundle is
//! stored with `Store::swap_bundle` on the held sequence, so several servers sharing a
//! database may refresh the same relationship without overwriting each other; the
//! store's change event then carries it to agents and workloads.
//!
//! ```no_run
//! # async fn demo(rel: writ_identity::server::federation::Relationship,
//! #     held: writ_identity::bundle::BundleSet) {
//! use writ_identity::server::federation::{FETCH_TIMEOUT, refresh};
//! match refresh::fetch(&rel, &held, FETCH_TIMEOUT).await {
//!     Ok(body) => println!("{} bytes", body.len()),
//!     Err(e) => eprintln!("{e}"),
//! }
//! # }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{FederationError, Profile, Relationship, check_fetched, refresh_interval};
use crate::bundle::{Bundle, BundleSet, MAX_BUNDLE_BYTES};
use crate::server::ServerState;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{BundleRecord, FederationRecord};
use crate::tls::SpiffeServerVerifier;

/// Longest the refresher sleeps with nothing due (it also wakes on admin changes).
const IDLE: Duration = Duration::from_secs(60);

/// The refresher's bounds (`[federation]` in `server.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshLimits {
    /// Shortest wait between two fetches of one relationship (and the first retry).
    pub min_refresh: Duration,
    /// How long one fetch may take in all.
    pub fetch_timeout: Duration,
}

impl Default for RefreshLimits {
    fn default() -> Self {
        Self {
            min_refresh: super::MIN_REFRESH,
            fetch_timeout: super::FETCH_TIMEOUT,
        }
    }
}

/// The error and its causes on one line (reqwest's own text names only the outer layer).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The HTTP client for one relationship: TLS per its profile, no redirects, no proxy.
fn client(
    rel: &Relationship,
    held: &BundleSet,
    timeout: Duration,
) -> Result<reqwest::Client, FederationError> {
    let url = rel.url().to_string();
    let fetch_err = |reason: String| FederationError::Fetch {
        url: url.clone(),
        reason,
    };
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout);
    let builder = match rel.profile() {
        Profile::HttpsSpiffe { endpoint_id } => {
            let td = endpoint_id.trust_domain();
            let Some(bundle) = held.get(&td) else {
                return Err(FederationError::NoBundle(td.to_string()));
            };
            let anchors = BundleSet::of(bundle.clone());
            let expected = endpoint_id.clone();
            let verifier = SpiffeServerVerifier::new(
                Arc::new(move || anchors.clone()),
                Arc::new(move |peer: &SpiffeId| *peer == expected),
            );
            let mut config = rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder.tls_backend_preconfigured(config)
        }
        Profile::HttpsWeb { ca_pem: Some(pem) } => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in super::endpoint::pem_certificates(pem).map_err(fetch_err)? {
                roots
                    .add(cert)
                    .map_err(|e| fetch_err(format!("web CA: {e}")))?;
            }
            let mut config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder.tls_backend_preconfigured(config)
        }
        Profile::HttpsWeb { ca_pem: None } => builder,
    };
    builder
        .build()
        .map_err(|e| fetch_err(format!("HTTP client: {}", chain(&e))))
}

/// Fetches the relationship's bundle document: `GET` its URL, authenticating the endpoint
/// by its profile (`https_spiffe`: its SVID must chain to the bundle `held` for the
/// endpoint ID's trust domain and carry exactly the endpoint ID), within `timeout` in all
/// and at most [`MAX_BUNDLE_BYTES`].
///
/// # Errors
/// [`FederationError::Fetch`], [`FederationError::Timeout`],
/// [`FederationError::Status`], [`FederationError::TooLarge`] or
/// [`FederationError::NoBundle`].
pub async fn fetch(
    rel: &Relationship,
    held: &BundleSet,
    timeout: Duration,
) -> Result<Vec<u8>, FederationError> {
    let url = rel.url().to_string();
    let client = client(rel, held, timeout)?;
    let fetch_err = |e: reqwest::Error| {
        if e.is_timeout() {
            FederationError::Timeout {
                url: url.clone(),
                timeout,
            }
        } else {
            FederationError::Fetch {
                url: url.clone(),
                reason: chain(&e),
            }
        }
    };
    let too_large = || FederationError::TooLarge {
        url: url.clone(),
        max: MAX_BUNDLE_BYTES,
    };
    let work = async {
        let mut response = client
            .get(rel.url().clone())
            .send()
            .await
            .map_err(fetch_err)?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(FederationError::Status {
                url: url.clone(),
                status: status.as_u16(),
            });
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BUNDLE_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fetch_err)? {
            if body.len() + chunk.len() > MAX_BUNDLE_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(FederationError::Timeout {
            url: url.clone(),
            timeout,
        }),
    }
}

/// The bundles the server holds: its own (the CA's) and every stored foreign one.
///
/// # Errors
/// [`FederationError::Store`] if the store cannot be read.
pub async fn held_bundles(state: &ServerState) -> Result<BundleSet, FederationError> {
    let mut set = BundleSet::of((*state.ca.bundle()).clone());
    let own = state.config.trust_domain.id_string();
    let records = state
        .store
        .list_bundles()
        .await
        .map_err(|e| FederationError::Store(e.to_string()))?;
    for record in records {
        if record.trust_domain_id == own {
            continue;
        }
        if let Some(b) = TrustDomain::new(&record.trust_domain_id)
            .ok()
            .and_then(|td| Bundle::from_json(td, &record.document).ok())
        {
            set.insert(b);
        }
    }
    Ok(set)
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// A new bundle (this sequence) was stored.
    Stored(u64),
    /// The endpoint serves the bundle already held.
    Unchanged(u64),
}

/// Refreshes one relationship now: fetch, validate against the held bundle, store if
/// new. Returns what it did and the refresh interval the bundle asks for.
///
/// # Errors
/// Why the fetched bundle was not taken; the held bundle stays.
pub async fn refresh_one(
    state: &ServerState,
    rel: &Relationship,
    limits: RefreshLimits,
) -> Result<(Refreshed, Duration), FederationError> {
    let td = rel.trust_domain();
    if *td == state.config.trust_domain {
        return Err(FederationError::OwnTrustDomain(td.to_string()));
    }
    let held = held_bundles(state).await?;
    let stored = state
        .store
        .fetch_bundle(&td.id_string())
        .await
        .map_err(|e| FederationError::Store(e.to_string()))?;
    let body = fetch(rel, &held, limits.fetch_timeout).await?;
    let held_sequence = stored.as_ref().map(|r| r.sequence);
    let bundle = check_fetched(td, rel.url().as_str(), &body, held_sequence)?;
    let interval = refresh_interval(bundle.refresh_hint(), limits.min_refresh);
    if let Some(current) = held.get(td)
        && held_sequence == Some(bundle.sequence())
        && current.same_content(&bundle)
    {
        return Ok((Refreshed::Unchanged(bundle.sequence()), interval));
    }
    let record = BundleRecord {
        trust_domain_id: td.id_string(),
        document: bundle.to_json(),
        sequence: bundle.sequence(),
    };
    let swapped = state
        .store
        .swap_bundle(&record, held_sequence)
        .await
        .map_err(|e| FederationError::Store(e.to_string()))?;
    if !swapped {
        // Another server stored one meanwhile: its refresh stands.
        tracing::debug!(trust_domain = %td, "another server refreshed this bundle first");
    }
    Ok((Refreshed::Stored(bundle.sequence()), interval))
}

#[derive(Debug, Clone, Copy)]
struct Due {
    at: Instant,
    failures: u32,
}

/// Keeps every stored relationship's bundle fresh until the task is dropped. Wakes at
/// the earliest due refresh, or when [`ServerState::wake_federation`] is called (a
/// relationship was created, updated or deleted: everything is fetched again).
pub async fn run(state: Arc<ServerState>, limits: RefreshLimits) {
    let wake = state.federation_wake();
    let mut schedule: HashMap<String, Due> = HashMap::new();
    loop {
        let woken = wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let records = match state.store.list_federations().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "federation: cannot list relationships; will retry");
                tokio::time::sleep(limits.min_refresh).await;
                continue;
            }
        };
        let now = Instant::now();
        schedule.retain(|td, _| records.iter().any(|r| &r.trust_domain_id == td));
        let due: Vec<&FederationRecord> = records
            .iter()
            .filter(|r| schedule.get(&r.trust_domain_id).is_none_or(|d| d.at <= now))
            .collect();
        let outcomes =
            futures::future::join_all(due.iter().map(|r| refresh_record(&state, r, limits))).await;
        for (record, outcome) in due.iter().zip(outcomes) {
            let failures = schedule
                .get(&record.trust_domain_id)
                .map_or(0, |d| d.failures);
            let unix_now = state.clock.unix_seconds();
            let (wait, failures, refreshed_at, error) = match outcome {
                Ok((what, interval)) => {
                    match what {
                        Refreshed::Stored(seq) => tracing::info!(
                            trust_domain = %record.trust_domain_id, sequence = seq,
                            next_in_s = interval.as_secs(), "federation: stored a new bundle"
                        ),
                        Refreshed::Unchanged(_) => tracing::debug!(
                            trust_domain = %record.trust_domain_id, "federation: bundle unchanged"
                        ),
                    }
                    (interval, 0, Some(unix_now), None)
                }
                Err(e) => {
                    let failures = failures.saturating_add(1);
                    let wait = limits
                        .min_refresh
                        .saturating_mul(1 << failures.saturating_sub(1).min(16))
                        .min(super::DEFAULT_REFRESH.max(limits.min_refresh));
                    tracing::warn!(
                        trust_domain = %record.trust_domain_id, error = %e,
                        retry_in_s = wait.as_secs(),
                        "federation: refresh failed; the last good bundle is kept"
                    );
                    (wait, failures, None, Some(e.to_string()))
                }
            };
            schedule.insert(
                record.trust_domain_id.clone(),
                Due {
                    at: Instant::now() + wait,
                    failures,
                },
            );
            let next_unix =
                unix_now.saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
            if let Err(e) = state
                .store
                .record_federation_refresh(
                    &record.trust_domain_id,
                    refreshed_at,
                    error.as_deref(),
                    next_unix,
                )
                .await
            {
                tracing::warn!(error = %e, "federation: cannot record the refresh");
            }
        }
        let next = schedule
            .values()
            .map(|d| d.at)
            .min()
            .unwrap_or_else(|| Instant::now() + IDLE)
            .min(Instant::now() + IDLE);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = &mut woken => {
                // A relationship changed: fetch everything again now.
                schedule.clear();
            }
        }
    }
}

async fn refresh_record(
    state: &ServerState,
    record: &FederationRecord,
    limits: RefreshLimits,
) -> Result<(Refreshed, Duration), FederationError> {
    let rel = Relationship::from_record(record)?;
    refresh_one(state, &rel, limits).await
}
