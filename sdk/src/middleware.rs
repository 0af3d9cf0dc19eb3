//! Txn-Token and caller verification for axum and tower services.
//!
//! [`TxnLayer`] verifies, for every request, the caller's SPIFFE ID from the mTLS
//! connection ([`crate::listener::Peer`]) and the Txn-Token in the `Txn-Token` header,
//! applies a [`TxnPolicy`], and hands the handler a [`Verified`]; otherwise it answers
//! with a JSON error and the handler never runs:
//!
//! | status | `error`               | when |
//! |--------|-----------------------|------|
//! | 401    | `unauthenticated`     | the connection carries no verified X509-SVID |
//! | 401    | `missing_txn_token`   | no `Txn-Token` header, or more than one |
//! | 401    | `invalid_txn_token`   | the token does not verify |
//! | 403    | `caller_not_allowed`  | the policy does not accept the caller |
//! | 403    | `insufficient_scope`  | the token lacks a scope the policy requires |
//! | 403    | `not_current_actor`   | strict chaining: the caller is not the token's current actor |
//! | 403    | `forbidden`           | a custom check refused |
//! | 503    | `keys_unavailable`    | the service's signing keys could not be loaded |
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

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use writ_spiffe::spiffe_id::SpiffeId;

use crate::listener::Peer;
use crate::tls::Authorizer;
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
}

impl Verified {
    /// Adds the `Txn-Token` header, unchanged, to an outbound request.
    pub fn forward(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.header(HEADER, &self.token)
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
        }
        for check in &self.checks {
            check(verified).map_err(PolicyError::Custom)?;
        }
        Ok(())
    }
}

/// A tower layer that verifies the caller and the Txn-Token of every request (see the
/// module docs).
#[derive(Debug, Clone)]
pub struct TxnLayer {
    guard: Arc<Guard>,
}

#[derive(Debug)]
struct Guard {
    verifier: TxnVerifier,
    policy: TxnPolicy,
}

impl TxnLayer {
    /// Verifies tokens with `verifier` and applies `policy`.
    pub fn new(verifier: TxnVerifier, policy: TxnPolicy) -> Self {
        Self {
            guard: Arc::new(Guard { verifier, policy }),
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
        Box::pin(async move {
            let admitted = match guard.identify(&request) {
                Ok((caller, token)) => guard.admit(caller, token).await,
                Err(rejection) => Err(rejection),
            };
            match admitted {
                Ok(verified) => {
                    request.extensions_mut().insert(verified);
                    inner.call(request).await
                }
                Err(rejection) => Ok(rejection.into_response()),
            }
        })
    }
}

impl Guard {
    /// The caller's SPIFFE ID and the Txn-Token, read before anything is awaited (the
    /// request body is not `Sync`).
    fn identify(&self, request: &Request) -> Result<(SpiffeId, String), Rejection> {
        let caller = request
            .extensions()
            .get::<ConnectInfo<Peer>>()
            .map(|c| &c.0)
            .or_else(|| request.extensions().get::<Peer>())
            .and_then(|p| p.id.clone())
            .ok_or_else(|| {
                reject(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "the connection carries no verified X509-SVID",
                )
            })?;
        let mut headers = request.headers().get_all(HEADER).iter();
        let token = match (headers.next(), headers.next()) {
            (Some(value), None) => value.to_str().map_err(|_| {
                reject(
                    StatusCode::UNAUTHORIZED,
                    "invalid_txn_token",
                    "the Txn-Token header is not ASCII",
                )
            })?,
            _ => {
                return Err(reject(
                    StatusCode::UNAUTHORIZED,
                    "missing_txn_token",
                    "exactly one Txn-Token header is required",
                ));
            }
        };
        Ok((caller, token.to_owned()))
    }

    async fn admit(&self, caller: SpiffeId, token: String) -> Result<Verified, Rejection> {
        let txn = self.verifier.verify(&token).await.map_err(|e| {
            tracing::info!(
                %caller,
                token_sha256 = %writ_spiffe::fingerprint::token(&token),
                error = %e,
                "Txn-Token refused"
            );
            match e {
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
            }
        })?;
        let verified = Verified { caller, txn, token };
        self.policy.evaluate(&verified).map_err(|e| {
            tracing::info!(caller = %verified.caller, txn = %verified.txn.txn, error = %e, "request refused");
            let code = match e {
                PolicyError::CallerNotAllowed(_) => "caller_not_allowed",
                PolicyError::InsufficientScope(_) => "insufficient_scope",
                PolicyError::NotCurrentActor { .. } => "not_current_actor",
                PolicyError::Custom(_) => "forbidden",
            };
            reject(StatusCode::FORBIDDEN, code, &e.to_string())
        })?;
        Ok(verified)
    }
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

fn reject(status: StatusCode, code: &'static str, description: &str) -> Rejection {
    Rejection {
        status,
        code,
        description: description.to_owned(),
    }
}
