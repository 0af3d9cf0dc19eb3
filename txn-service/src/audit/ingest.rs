//! `POST /audit/verifications` ([`writ_sdk::audit::INGEST_PATH`]) on the token service's
//! mTLS listener: services send the verifications they made, as a
//! [`VerificationBatch`], into the durable audit trail.
//!
//! The caller is its X509-SVID only (none: 401). Every record's `service` must be the
//! caller's SPIFFE ID (else 403 and nothing of the batch is stored): a service records
//! verifications only as itself. The body is at most [`MAX_BODY`] bytes of JSON with no
//! unknown field, checked by [`VerificationBatch::check`]; each caller (its root parent,
//! so sub-agents share their parent's budget) is held to [`DEFAULT_INGEST_RATE`]. The
//! answer is `202 {"accepted": n}` once the batch is committed.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use writ_identity::clock::SharedClock;
use writ_sdk::audit::{INGEST_PATH, MAX_BODY, VerificationBatch};

use super::durable::{DurableAudit, verification_event};
use crate::exchange::CallerId;
use crate::lease::root_parent;
use crate::rate_limit::{Rate, RateLimiter};

/// Batches each caller may send: 20 a second, 100 at once.
pub const DEFAULT_INGEST_RATE: Rate = Rate {
    per_second: 20.0,
    burst: 100,
};

/// The ingest endpoint's state.
#[derive(Debug)]
pub struct IngestState {
    durable: Option<DurableAudit>,
    limiter: RateLimiter,
    rate: Rate,
}

impl IngestState {
    /// Writes to `durable` (none: every batch is refused with 503), each caller held to
    /// `rate`, time from `clock`.
    pub fn new(durable: Option<DurableAudit>, rate: Rate, clock: SharedClock) -> Self {
        Self {
            durable,
            limiter: RateLimiter::new(clock),
            rate,
        }
    }
}

/// The route `POST /audit/verifications`. The caller's SPIFFE ID is read from the
/// [`CallerId`] request extension (the listener sets it from the client certificate).
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route(INGEST_PATH, post(ingest))
        .with_state(Arc::new(state))
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    let mut response = (
        status,
        axum::Json(json!({"error": code, "error_description": description})),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn ingest(State(state): State<Arc<IngestState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Some(CallerId(caller)) = parts.extensions.get::<CallerId>().cloned() else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "a client X509-SVID is required",
        );
    };
    if let Err(retry_after) = state.limiter.check(&root_parent(&caller), state.rate) {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many audit batches from this caller",
        );
        if let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return response;
    }
    let json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "Content-Type must be application/json",
        );
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            &format!("the body is larger than {MAX_BODY} bytes"),
        )
    };
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let Ok(bytes) = axum::body::to_bytes(Body::new(body), MAX_BODY).await else {
        return too_large();
    };
    let batch: VerificationBatch = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("the body is not a verification batch: {e}"),
            );
        }
    };
    if let Err(e) = batch.check() {
        return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string());
    }
    if let Some(at) = batch
        .records
        .iter()
        .position(|r| r.service != caller.as_str())
    {
        tracing::warn!(%caller, record = at, "audit ingest: a record names another service");
        return error(
            StatusCode::FORBIDDEN,
            "access_denied",
            &format!("record {at}: `service` must be the caller's own SPIFFE ID"),
        );
    }
    let Some(durable) = &state.durable else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "this token service has no durable audit store",
        );
    };
    let events = match batch
        .records
        .iter()
        .map(verification_event)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(events) => events,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string()),
    };
    let n = events.len();
    match durable.commit(events).await {
        Ok(_) => {
            let mut response =
                (StatusCode::ACCEPTED, axum::Json(json!({"accepted": n}))).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => {
            tracing::error!(error = %e, %caller, "audit ingest: the batch could not be stored");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the audit store cannot be written now",
            )
        }
    }
}
