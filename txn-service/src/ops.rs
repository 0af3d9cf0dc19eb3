//! The token service's operations listener (`[ops] listen` in txn.toml; `writ dev` runs
//! one on `127.0.0.1:0`): `/metrics` ([`crate::metrics`]), `/healthz`, `/readyz`
//! ([`readiness`]), served by [`writ_identity::ops`]. [`router`] is the one place its
//! routes are composed.

use std::sync::Arc;

use axum::Router;
use writ_identity::clock::SharedClock;
use writ_identity::ops::{Check, Ops, Readiness};
use writ_sdk::workload::X509Source;

use crate::exchange::ExchangeService;

/// The token service's readiness: `identity` (its X509-SVID is unexpired), `keys` (it
/// holds a signing key and publishes it) and, with an identity store, `store` (the
/// store answers: other replicas' keys and sub-agent leases come from there).
pub async fn readiness(
    service: &ExchangeService,
    source: &X509Source,
    clock: &SharedClock,
) -> Readiness {
    let svid = source.svid();
    let identity = if svid.expires_at > clock.now() {
        Check::pass("identity")
    } else {
        Check::fail(
            "identity",
            format!(
                "the X509-SVID of {} expired at {}",
                svid.spiffe_id,
                humantime::format_rfc3339_seconds(svid.expires_at)
            ),
        )
    };
    let keys = service.keys();
    let keys = if keys.public_keys().contains_key(&keys.current_kid()) {
        Check::pass("keys")
    } else {
        Check::fail("keys", "no current Txn-Token signing key")
    };
    let mut checks = vec![identity, keys];
    if let Some(replica) = service.replica() {
        checks.push(Check::of("store", replica.refresh().await));
    }
    Readiness::new(checks)
}

/// The service's [`Ops`]: its metrics registry (an empty one when metrics are off) and
/// [`readiness`].
pub fn ops(service: Arc<ExchangeService>, source: X509Source, clock: SharedClock) -> Ops {
    let registry = service.metrics().map(|m| m.registry()).unwrap_or_default();
    Ops::new(
        registry,
        Arc::new(move || {
            let service = service.clone();
            let source = source.clone();
            let clock = clock.clone();
            Box::pin(async move { readiness(&service, &source, &clock).await })
        }),
    )
}

/// The token service's operations router: `/metrics`, `/healthz`, `/readyz`, and
/// the chain explorer (the page, and its JSON API over the durable audit trail when the
/// service writes one), then the JSON `404` for every other path.
pub fn router(service: Arc<ExchangeService>, source: X509Source, clock: SharedClock) -> Router {
    let trail = service
        .durable_audit()
        .map(|durable| crate::audit::ExplorerState::new(durable.store().clone()));
    let mut router =
        writ_identity::ops::routes(ops(service, source, clock)).merge(crate::explorer::router());
    if let Some(trail) = trail {
        router = router.merge(crate::audit::explorer_api(trail));
    }
    // Routers merged here set no fallback: this one answers every other path.
    router.fallback(writ_identity::ops::not_found)
}
