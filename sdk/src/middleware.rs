//! Txn-Token and caller verification for axum and tower services.
//!
//! [`TxnLayer`] verifies, for every request, the caller's SPIFFE ID from the mTLS
//! connection ([`crate::listener::Peer`]) and the Txn-Token in the `Txn-Token` header,
//! applies a [`TxnPolicy`], and hands the handler a [`Verified`]; otherwise it answers
//! with a JSON error and the handler never runs:
//!
//! | status | `error`               | when |
//! |--------|-----------------------|------|
//! | 401    | `unauthenticated`     | the connection carries no verified X509-SVID (nor, with [`TxnLayer::with_proof`], a WIT and WPT) |
//! | 401    | `missing_txn_token`   | no `Txn-Token` header, or more than one |
//! | 401    | `invalid_txn_token`   | the token does not verify |
//! | 401    | `revoked`             | a revocation covers the token or the caller (the verifier follows a [`RevocationFeed`](crate::revocation::RevocationFeed)) |
//! | 403    | `caller_not_allowed`  | the policy does not accept the caller |
//! | 403    | `insufficient_scope`  | the token lacks a scope the policy requires |
//! | 403    | `not_current_actor`   | strict chaining: the caller is not the token's current actor |
//! | 403    | `forbidden`           | a custom check refused |
//! | 400    | `invalid_proof`       | with [`TxnLayer::with_proof`]: the WIT/WPT headers are incomplete, or the pair does not verify (see [`crate::wpt`]) |
//! | 503    | `keys_unavailable`    | the service's signing keys could not be loaded |
//! | 503    | `revocations_unavailable` | the revocation feed fails closed and is stale |
//!
//! With [`TxnLayer::with_audit`], every request, allowed or refused, also leaves one
//! [`VerificationRecord`] in the service's [`AuditSink`]: the service's and the caller's
//! SPIFFE IDs, the transaction, user and `act` chain of a verified token, the route
//! (`METHOD /path`), the decision and error code, the verification's latency, the
//! token's SHA-256 (never the token) and the request's `traceparent`. The record is
//! handed to the sink before the handler runs; sinks queue it and never block.
//!
//! On hops where mTLS does not reach end to end, [`TxnLayer::with_proof`] also accepts a
//! caller that proves itself with a WIT-SVID and a Workload Proof Token bound to the
//! request's URI and Txn-Token ([`crate::wpt`]); such a caller must be the token's
//! current actor (as with [`TxnPolicy::strict_chain`]), so a copied Txn-Token is useless.
//!
//! A valid W3C `traceparent` on the request lands in [`Verified::trace`], and the
//! handler runs inside a `txn_request` span with the fields `trace_id` and `txn`, so
//! any log or tracing backend can join a transaction's hops on them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use axum::{Json, Router, routing::get};
//! use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
//! use writ_sdk::tls::Authorizer;
//! use writ_sdk::txn_token::TxnVerifier;
//! use writ_sdk::{exchange::TxnClient, listener, workload::X509Source};
//!
//! let source = X509Source::new().await?;
//! let td = source.spiffe_id().trust_domain();
//! let tts = TxnClient::new(&source, "https://127.0.0.1:8443",
//!     "spiffe://example.org/writ/tts".parse()?)?;
//! let verifier = TxnVerifier::builder(td.clone(), tts.jwks_source()).build();
//! let policy = TxnPolicy::new(Authorizer::path_prefix(td.clone(), "/agents"))
//!     .require_scope("orders.read")
//!     .strict_chain();
//! let app = Router::new()
//!     .route("/orders", get(|v: Verified| async move {
//!         Json(serde_json::json!({ "user": v.txn.sub, "caller": v.caller.to_string() }))
//!     }))
//!     .layer(TxnLayer::new(verifier, policy));
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! listener::serve(app, &source, Authorizer::member_of(td), tcp, std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use writ_spiffe::spiffe_id::SpiffeId;

use tracing::Instrument as _;

use crate::audit::{AuditSink, Decision, MAX_ACT, MAX_FIELD, VerificationRecord};
use crate::listener::Peer;
use crate::tls::Authorizer;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};
use crate::txn_token::{HEADER, TxnToken, TxnTokenError, TxnVerifier};

/// A request whose caller and Txn-Token were verified, as [`TxnLayer`] hands it to the
/// handler (an axum extractor).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The caller's SPIFFE ID, from its X509-SVID.
    pub caller: SpiffeId,
    /// The verified Txn-Token claims.
    pub txn: TxnToken,
    /// The Txn-Token as received, to forward unchanged (see [`Verified::forward`]).
    pub token: String,
    /// The request's W3C trace context (`traceparent`, `tracestate`), when it carried a
    /// valid one.
    pub trace: Option<TraceContext>,
}

impl Verified {
    /// Adds the `Txn-Token` header, unchanged, to an outbound request, and, when the
    /// request carried a trace context, its child (same trace id, new parent id).
    pub fn forward(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let mut request = request.header(HEADER, &self.token);
        if let Some(next) = self.trace.as_ref().map(|_| self.next_trace()) {
            for (name, value) in next.headers() {
                request = request.header(name, value);
            }
        }
        request
    }

    /// The trace context for this hop's next call: a child of the request's, or a new
    /// trace if the request carried none.
    pub fn next_trace(&self) -> TraceContext {
        // With OpenTelemetry, the handler's span (a child of the caller's) is the parent.
        #[cfg(feature = "otel")]
        if let Some(current) = TraceContext::current() {
            return current;
        }
        self.trace
            .as_ref()
            .map_or_else(TraceContext::new_root, TraceContext::child)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Verified {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Verified>().cloned().ok_or_else(|| {
            tracing::error!("the Verified extractor is used on a route without TxnLayer");
            reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "this route is not protected by TxnLayer",
            )
        })
    }
}

type Check = Arc<dyn Fn(&Verified) -> Result<(), String> + Send + Sync>;

/// Who may call and with what token. There is no policy that accepts anyone: every
/// policy starts from an [`Authorizer`] for the caller's SPIFFE ID.
#[derive(Clone)]
pub struct TxnPolicy {
    callers: Authorizer,
    scopes: Vec<String>,
    strict_chain: bool,
    checks: Vec<Check>,
}

impl fmt::Debug for TxnPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TxnPolicy")
            .field("scopes", &self.scopes)
            .field("strict_chain", &self.strict_chain)
            .field("checks", &self.checks.len())
            .finish_non_exhaustive()
    }
}

/// Why [`TxnPolicy`] refused a verified request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The caller's SPIFFE ID is not accepted.
    #[error("caller {0} is not allowed")]
    CallerNotAllowed(String),
    /// A required scope is missing.
    #[error("the Txn-Token lacks scope {0:?}")]
    InsufficientScope(String),
    /// Strict chaining: the caller is not the token's current actor.
    #[error("caller {caller} is not the token's current actor {actor}")]
    NotCurrentActor {
        /// The caller.
        caller: String,
        /// The current actor (`req_wl` when the chain is empty).
        actor: String,
    },
    /// A custom check refused.
    #[error("{0}")]
    Custom(String),
}

impl TxnPolicy {
    /// Accepts callers that `callers` authorizes, with any valid Txn-Token.
    pub fn new(callers: Authorizer) -> Self {
        Self {
            callers,
            scopes: Vec::new(),
            strict_chain: false,
            checks: Vec::new(),
        }
    }

    /// Also requires the token to grant `scope`.
    pub fn require_scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }

    /// Also requires the caller to be the token's current actor: the outermost `act`,
    /// or `req_wl` if the token was not delegated. A workload that received a token
    /// must then replace it (naming itself) before calling further.
    pub fn strict_chain(mut self) -> Self {
        self.strict_chain = true;
        self
    }

    /// Also runs `check`; an `Err` refuses the request with 403 and its message.
    pub fn check(
        mut self,
        check: impl Fn(&Verified) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// Applies the policy to a verified request.
    ///
    /// # Errors
    /// [`PolicyError`] for the first rule that refuses.
    pub fn evaluate(&self, verified: &Verified) -> Result<(), PolicyError> {
        if !self.callers.allows(&verified.caller) {
            return Err(PolicyError::CallerNotAllowed(verified.caller.to_string()));
        }
        if let Some(missing) = self.scopes.iter().find(|s| !verified.txn.has_scope(s)) {
            return Err(PolicyError::InsufficientScope(missing.clone()));
        }
        if self.strict_chain {
            current_actor(verified)?;
        }
        for check in &self.checks {
            check(verified).map_err(PolicyError::Custom)?;
        }
        Ok(())
    }
}

/// The caller must be the token's current actor: the outermost `act`, or `req_wl`.
fn current_actor(verified: &Verified) -> Result<(), PolicyError> {
    let actor = verified
        .txn
        .current_actor()
        .unwrap_or(verified.txn.req_wl.as_str());
    if actor != verified.caller.as_str() {
        return Err(PolicyError::NotCurrentActor {
            caller: verified.caller.to_string(),
            actor: actor.to_owned(),
        });
    }
    Ok(())
}

/// A tower layer that verifies the caller and the Txn-Token of every request (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct TxnLayer {
    guard: Arc<Guard>,
}

#[derive(Debug, Clone)]
struct Guard {
    verifier: TxnVerifier,
    policy: TxnPolicy,
    audit: Option<Audit>,
    proof: Option<crate::wpt::WptVerifier>,
}

/// Where the layer records verifications, and as whom.
#[derive(Clone)]
struct Audit {
    service: String,
    sink: Arc<dyn AuditSink>,
}

impl fmt::Debug for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Audit")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl TxnLayer {
    /// Verifies tokens with `verifier` and applies `policy`.
    pub fn new(verifier: TxnVerifier, policy: TxnPolicy) -> Self {
        Self {
            guard: Arc::new(Guard {
                verifier,
                policy,
                audit: None,
                proof: None,
            }),
        }
    }

    /// Also records every request, allowed or refused, as a [`VerificationRecord`] of
    /// `service` (this service's own SPIFFE ID, usually `source.spiffe_id()`) in `sink`
    /// (see [`crate::audit`]).
    #[must_use]
    pub fn with_audit(self, service: SpiffeId, sink: impl AuditSink) -> Self {
        let mut guard = Arc::unwrap_or_clone(self.guard);
        guard.audit = Some(Audit {
            service: service.to_string(),
            sink: Arc::new(sink),
        });
        Self {
            guard: Arc::new(guard),
        }
    }
}

impl TxnLayer {
    /// Also accepts callers without an X509-SVID on the connection that send a WIT-SVID
    /// and a Workload Proof Token `verifier` accepts (see [`crate::wpt`]); such a caller
    /// must be the Txn-Token's current actor. A WIT/WPT pair on an mTLS connection is
    /// verified too, and must name the connection's peer.
    #[must_use]
    pub fn with_proof(self, verifier: crate::wpt::WptVerifier) -> Self {
        let mut guard = Arc::unwrap_or_clone(self.guard);
        guard.proof = Some(verifier);
        Self {
            guard: Arc::new(guard),
        }
    }
}

impl<S> tower::Layer<S> for TxnLayer {
    type Service = TxnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TxnService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The service [`TxnLayer`] wraps around an inner one.
#[derive(Debug, Clone)]
pub struct TxnService<S> {
    inner: S,
    guard: Arc<Guard>,
}

impl<S> tower::Service<Request> for TxnService<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        // The clone that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let guard = self.guard.clone();
        let started = Instant::now();
        let trace = read_trace(&request);
        // Read before anything is awaited: the request body is not `Sync`.
        let route = guard.audit.as_ref().map(|_| route(&request));
        let mut caller = peer_id(&request);
        let token = read_token(&request);
        let proof = guard.proof.as_ref().map(|_| {
            (
                crate::wpt::read_headers(request.headers()),
                request.uri().path().to_owned(),
            )
        });
        Box::pin(async move {
            let token_sha256 = token
                .as_ref()
                .ok()
                .map(|t| writ_spiffe::fingerprint::token(t));
            let mut proved = false;
            let proof_error = match (guard.proof.as_ref(), proof) {
                (Some(verifier), Some((headers, path))) => {
                    let txn = token.as_ref().ok().map(String::as_str);
                    match crate::wpt::authenticate(verifier, caller.as_ref(), headers, &path, txn) {
                        Ok(Some(id)) => {
                            caller = Some(id);
                            proved = true;
                            None
                        }
                        Ok(None) => None,
                        Err(e) => Some(proof_rejection(&e)),
                    }
                }
                _ => None,
            };
            let admitted = match (proof_error, caller.clone(), token) {
                (Some(rejection), _, _) => Err(Denied::early(rejection)),
                (None, None, _) => Err(Denied::early(reject(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "the connection carries no verified X509-SVID",
                ))),
                (None, Some(_), Err(rejection)) => Err(Denied::early(rejection)),
                (None, Some(caller), Ok(token)) => {
                    guard.admit(caller, token, trace.clone(), proved).await
                }
            };
            if let (Some(audit), Some(route)) = (&guard.audit, route) {
                let (decision, error, verified) = match &admitted {
                    Ok(v) => (Decision::Allow, None, Some(v)),
                    Err(d) => (
                        Decision::Deny,
                        Some(d.rejection.code),
                        d.verified.as_deref(),
                    ),
                };
                let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                audit.sink.record(VerificationRecord {
                    at_ms: unix_ms(guard.verifier.clock().now()),
                    service: audit.service.clone(),
                    caller: caller.map(|c| c.to_string()),
                    txn: verified.map(|v| clamp(&v.txn.txn)),
                    sub: verified.map(|v| clamp(&v.txn.sub)),
                    act: verified
                        .map(|v| v.txn.chain().into_iter().take(MAX_ACT).map(clamp).collect())
                        .unwrap_or_default(),
                    route,
                    decision,
                    error: error.map(str::to_owned),
                    latency_us,
                    token_sha256,
                    traceparent: trace.as_ref().map(TraceContext::traceparent),
                });
            }
            match admitted {
                Ok(verified) => {
                    let span = tracing::info_span!(
                        "txn_request",
                        trace_id = tracing::field::Empty,
                        txn = %verified.txn.txn,
                    );
                    if let Some(t) = &verified.trace {
                        span.record("trace_id", t.trace_id());
                        #[cfg(feature = "otel")]
                        {
                            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
                            // Fails only without an OpenTelemetry layer: nothing to join.
                            let _ = span.set_parent(t.to_otel());
                        }
                    }
                    request.extensions_mut().insert(verified);
                    inner.call(request).instrument(span).await
                }
                Err(denied) => Ok(denied.rejection.into_response()),
            }
        })
    }
}

/// A refused request, with what was verified before the policy refused it.
struct Denied {
    rejection: Rejection,
    verified: Option<Box<Verified>>,
}

impl Denied {
    fn early(rejection: Rejection) -> Self {
        Self {
            rejection,
            verified: None,
        }
    }
}

/// The caller's SPIFFE ID, from the connection.
fn peer_id(request: &Request) -> Option<SpiffeId> {
    request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| &c.0)
        .or_else(|| request.extensions().get::<Peer>())
        .and_then(|p| p.id.clone())
}

/// Exactly one ASCII `Txn-Token` header.
fn read_token(request: &Request) -> Result<String, Rejection> {
    let mut headers = request.headers().get_all(HEADER).iter();
    match (headers.next(), headers.next()) {
        (Some(value), None) => value.to_str().map(str::to_owned).map_err(|_| {
            reject(
                StatusCode::UNAUTHORIZED,
                "invalid_txn_token",
                "the Txn-Token header is not ASCII",
            )
        }),
        _ => Err(reject(
            StatusCode::UNAUTHORIZED,
            "missing_txn_token",
            "exactly one Txn-Token header is required",
        )),
    }
}

/// The request's trace context: exactly one valid `traceparent` (anything else is
/// ignored, as the W3C specification asks), with its `tracestate` if valid.
fn read_trace(request: &Request) -> Option<TraceContext> {
    let mut parents = request.headers().get_all(TRACEPARENT).iter();
    let (Some(parent), None) = (parents.next(), parents.next()) else {
        return None;
    };
    let context = TraceContext::parse(parent.to_str().ok()?).ok()?;
    // Several tracestate headers are one list, joined by commas.
    let state: Vec<&str> = request
        .headers()
        .get_all(TRACESTATE)
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    Some(if state.is_empty() {
        context
    } else {
        context.with_tracestate(&state.join(","))
    })
}

/// `METHOD /path`, without the query string, at most [`MAX_FIELD`] bytes.
fn route(request: &Request) -> String {
    clamp(&format!("{} {}", request.method(), request.uri().path()))
}

/// `text`, cut to at most [`MAX_FIELD`] bytes on a character boundary.
fn clamp(text: &str) -> String {
    if text.len() <= MAX_FIELD {
        return text.to_owned();
    }
    let mut end = MAX_FIELD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or_default().to_owned()
}

fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Guard {
    async fn admit(
        &self,
        caller: SpiffeId,
        token: String,
        trace: Option<TraceContext>,
        proved: bool,
    ) -> Result<Verified, Denied> {
        let txn = self.verifier.verify_unrevoked(&token).await.map_err(|e| {
            tracing::info!(
                %caller,
                token_sha256 = %writ_spiffe::fingerprint::token(&token),
                error = %e,
                "Txn-Token refused"
            );
            Denied::early(match e {
                TxnTokenError::Keys(_) => reject(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "keys_unavailable",
                    &e.to_string(),
                ),
                e => reject(
                    StatusCode::UNAUTHORIZED,
                    "invalid_txn_token",
                    &e.to_string(),
                ),
            })
        })?;
        let verified = Verified {
            caller,
            txn,
            token,
            trace,
        };
        if let Some(rejection) = revocation_rejection(&self.verifier, &verified) {
            return Err(Denied {
                rejection,
                verified: Some(Box::new(verified)),
            });
        }
        let decision = self.policy.evaluate(&verified).and_then(|()| {
            // A caller proved by WIT/WPT must be the token's current actor.
            if proved {
                current_actor(&verified)
            } else {
                Ok(())
            }
        });
        if let Err(e) = decision {
            tracing::info!(caller = %verified.caller, txn = %verified.txn.txn, error = %e, "request refused");
            let code = match e {
                PolicyError::CallerNotAllowed(_) => "caller_not_allowed",
                PolicyError::InsufficientScope(_) => "insufficient_scope",
                PolicyError::NotCurrentActor { .. } => "not_current_actor",
                PolicyError::Custom(_) => "forbidden",
            };
            return Err(Denied {
                rejection: reject(StatusCode::FORBIDDEN, code, &e.to_string()),
                verified: Some(Box::new(verified)),
            });
        }
        Ok(verified)
    }
}

/// The refusal when a revocation covers the verified token or its caller (`revoked`,
/// 401), or when the revocation feed fails closed (`revocations_unavailable`, 503).
fn revocation_rejection(verifier: &TxnVerifier, verified: &Verified) -> Option<Rejection> {
    let e = verifier
        .check_revoked(&verified.txn, Some(&verified.caller))
        .err()?;
    tracing::info!(caller = %verified.caller, txn = %verified.txn.txn, error = %e, "request refused");
    Some(match e {
        TxnTokenError::RevocationsStale => reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "revocations_unavailable",
            &e.to_string(),
        ),
        e => reject(StatusCode::UNAUTHORIZED, "revoked", &e.to_string()),
    })
}

/// A refused request: answered as JSON `{"error": code, "error_description": ...}`
/// (401s also carry `WWW-Authenticate: Txn-Token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `error` code (see the module docs).
    pub code: &'static str,
    /// The `error_description`.
    pub description: String,
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(
                serde_json::json!({ "error": self.code, "error_description": self.description }),
            ),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Txn-Token"),
            );
        }
        response
    }
}

/// A refused WIT/WPT pair (400, as draft-ietf-wimse-wpt asks, not 401).
fn proof_rejection(e: &crate::wpt::WptError) -> Rejection {
    tracing::info!(error = %e, "WIT/WPT refused");
    reject(StatusCode::BAD_REQUEST, "invalid_proof", &e.to_string())
}

fn reject(status: StatusCode, code: &'static str, description: &str) -> Rejection {
    Rejection {
        status,
        code,
        description: description.to_owned(),
    }
}
