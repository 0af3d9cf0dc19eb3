//! The agent's own health, served on the Workload API socket as the standard gRPC health
//! service (`grpc.health.v1.Health/Check`), which `writ healthcheck --agent-socket` asks.
//!
//! The agent is unhealthy, and says why in one line, when
//! - the server refuses its entry sync with PermissionDenied: it was evicted
//!   (`writ agent evict`) or banned (`writ agent ban`); it serves what it still holds
//!   until it expires, but gets nothing new;
//! - its own SVID has expired (renewal kept failing): the server will refuse it.
//!
//! A NOT_SERVING answer carries the reason in the response metadata
//! [`REASON_METADATA`]; any gRPC health client sees the status.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::cache::Cache;
use crate::ops::metrics::near_expiry;
use crate::ops::{Check, Ops, Readiness};
use crate::proto::grpc::health::v1 as pb;

pub use pb::health_server::HealthServer;

/// The response metadata key that carries the reason of a NOT_SERVING answer.
pub const REASON_METADATA: &str = "writ-health-reason";

/// The services whose health is asked: `""` (the agent as a whole) or the Workload API.
const SERVICES: [&str; 2] = ["", "SpiffeWorkloadAPI"];

/// Why an agent is unhealthy, from what it knows: the server's refusal of its last sync
/// and the expiry of its own SVID. `None` when healthy.
pub fn unhealthy_reason(
    refused: Option<&str>,
    agent_svid_expires_at: Option<SystemTime>,
    now: SystemTime,
) -> Option<String> {
    readiness_of(refused, agent_svid_expires_at, now)
        .failing()
        .and_then(|c| c.error.clone())
}

/// The agent's readiness from what it knows: `registration` (the server accepts its
/// entry sync: not evicted or banned) and `identity` (its own SVID is unexpired). The
/// gRPC health answer and `/readyz` both come from here.
pub fn readiness_of(
    refused: Option<&str>,
    agent_svid_expires_at: Option<SystemTime>,
    now: SystemTime,
) -> Readiness {
    let registration = match refused {
        Some(reason) => Check::fail(
            "registration",
            format!(
                "the server refuses this agent (evicted or banned; attest again with a new join token): {reason}"
            ),
        ),
        None => Check::pass("registration"),
    };
    let identity = match agent_svid_expires_at {
        Some(expires) if expires <= now => Check::fail(
            "identity",
            format!(
                "the agent SVID expired at {} (renewal failed)",
                humantime::format_rfc3339_seconds(expires)
            ),
        ),
        _ => Check::pass("identity"),
    };
    Readiness::new(vec![registration, identity])
}

/// The readiness of the agent that owns `cache` now.
pub fn readiness(cache: &Cache) -> Readiness {
    readiness_of(
        cache.refused_by_server().as_deref(),
        cache.node().agent_svid_expires_at(),
        cache.clock().now(),
    )
}

/// The operations listener's content for the agent that owns `cache`: its metrics (the
/// cache gauges refreshed at each scrape) and [`readiness`].
pub fn ops(cache: &Arc<Cache>) -> Ops {
    let ready = cache.clone();
    let refresh = Arc::downgrade(cache);
    Ops::new(
        cache.metrics().registry(),
        Arc::new(move || {
            let readiness = readiness(&ready);
            Box::pin(async move { readiness })
        }),
    )
    .with_refresh(Arc::new(move || {
        if let Some(cache) = refresh.upgrade() {
            refresh_gauges(&cache);
        }
        Box::pin(async {})
    }))
}

/// Sets the cache gauges: SVIDs held, those within 10 % of expiry, live leases.
fn refresh_gauges(cache: &Cache) {
    let snapshot = cache.snapshot();
    let now = cache.clock().unix_seconds();
    let near = snapshot
        .svids
        .iter()
        .filter(|c| {
            let not_after = crate::clock::unix_seconds(c.svid.expires_at);
            let not_before = c
                .svid
                .leaf()
                .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
                .map_or(not_after, |(_, cert)| {
                    cert.validity().not_before.timestamp()
                });
            near_expiry(not_before, not_after, now)
        })
        .count();
    let metrics = cache.metrics();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    metrics.svids.set(count(snapshot.svids.len()));
    metrics.svids_near_expiry.set(count(near));
    metrics.live_leases.set(count(
        snapshot
            .children
            .iter()
            .filter(|c| c.lease.released_at.is_none() && c.svid.is_some())
            .count(),
    ));
}

/// The health service over the agent's cache.
#[derive(Debug, Clone)]
pub struct AgentHealth {
    cache: Arc<Cache>,
}

impl AgentHealth {
    /// The service for the agent that owns `cache`.
    pub fn new(cache: Arc<Cache>) -> Self {
        Self { cache }
    }

    /// Why the agent is unhealthy now, or `None` (the first failing check of
    /// [`readiness`]).
    pub fn unhealthy(&self) -> Option<String> {
        readiness(&self.cache)
            .failing()
            .and_then(|c| c.error.clone())
    }
}

#[tonic::async_trait]
impl pb::health_server::Health for AgentHealth {
    async fn check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        if !SERVICES.contains(&service.as_str()) {
            return Err(Status::not_found("unknown service"));
        }
        let reason = self.unhealthy();
        let status = if reason.is_some() {
            pb::health_check_response::ServingStatus::NotServing
        } else {
            pb::health_check_response::ServingStatus::Serving
        };
        let mut response = Response::new(pb::HealthCheckResponse {
            status: status.into(),
        });
        if let Some(reason) = reason {
            // Metadata is ASCII: anything else becomes '?'.
            let ascii: String = reason
                .chars()
                .map(|c| {
                    if c.is_ascii() && !c.is_ascii_control() {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            if let Ok(value) = tonic::metadata::MetadataValue::try_from(ascii) {
                response.metadata_mut().insert(REASON_METADATA, value);
            }
        }
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reasons() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        assert_eq!(unhealthy_reason(None, None, now), None);
        assert_eq!(
            unhealthy_reason(None, Some(now + Duration::from_secs(1)), now),
            None
        );
        let expired = unhealthy_reason(None, Some(now), now).unwrap();
        assert!(
            expired.contains("agent SVID expired at 2033-05-18T03:33:20Z"),
            "{expired}"
        );
        let refused = unhealthy_reason(Some("agent is banned"), None, now).unwrap();
        assert!(refused.contains("evicted or banned"), "{refused}");
        assert!(refused.ends_with(": agent is banned"), "{refused}");
        assert!(!refused.contains('\n'));
    }

    #[test]
    fn readyz_and_grpc_health_agree_on_an_evicted_agent() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let ready = readiness_of(None, Some(now + Duration::from_secs(60)), now);
        assert!(ready.ready);
        assert_eq!(
            unhealthy_reason(None, Some(now + Duration::from_secs(60)), now),
            None
        );
        let evicted = readiness_of(Some("agent was evicted"), None, now);
        assert!(!evicted.ready);
        let failing = evicted.failing().unwrap();
        assert_eq!(failing.name, "registration");
        assert_eq!(
            failing.error,
            unhealthy_reason(Some("agent was evicted"), None, now),
            "/readyz and the gRPC health answer give the same reason"
        );
        let both = readiness_of(Some("banned"), Some(now), now);
        assert_eq!(both.checks.iter().filter(|c| !c.ok).count(), 2);
    }
}
