//! The RFC 8693 token exchange endpoint of the transaction token service
//! (draft-ietf-oauth-transaction-tokens-11; the conformance table is in docs/txn.md).
//!
//! A workload authenticated by mTLS (its SPIFFE ID arrives as the request extension
//! [`CallerId`], inserted by the listener) posts a form to `POST /token`:
//!
//! - `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (else
//!   `unsupported_grant_type`);
//! - `requested_token_type=urn:ietf:params:oauth:token-type:txn_token` (required by the
//!   draft; missing or other -> `invalid_request`);
//! - `audience`: the trust domain (required by the draft; missing -> `invalid_request`,
//!   another value -> `invalid_target`); `resource` is refused with `invalid_target`;
//! - `scope` (required by draft-11, space-separated; missing -> `invalid_request`);
//! - `subject_token` and `subject_token_type` (required): an OIDC `access_token`,
//!   `id_token` or `jwt`, a `txn_token` of this service for a replacement, or a
//!   `self_signed` / `unsigned_json` token the caller asserts ([`crate::subject`]) for
//!   callers whose policy rule names them. A subject token whose scope is unknown (no
//!   `scope`) is refused, never treated as unconstrained;
//! - `request_context` (JSON object, added to `rctx`) and `request_details` (JSON
//!   object, becomes `tctx`), each at most [`MAX_CONTEXT_BYTES`];
//! - `actor_token` / `actor_token_type` are not supported: their presence is refused
//!   with `invalid_request` (the caller's mTLS identity is the actor);
//! - `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-spiffe` and
//!   `client_assertion` (a JWT-SVID whose audience is the service's issuer URL): client
//!   authentication for callers behind a TLS-terminating proxy, accepted only for
//!   callers whose policy rule sets `client_assertion = true`, and never together with
//!   a client certificate (RFC 6749 section 2.3: one method per request). Each assertion
//!   is accepted once within its lifetime, and must carry a `jti` (RFC 7523 section 3;
//!   [`crate::client_assertion::ReplayCache`]), unless replay protection is turned off.
//!
//! The body is at most [`MAX_BODY_BYTES`], each field at most [`MAX_FIELD_BYTES`], and a
//! field may not appear twice (RFC 6749 section 3.2). Unknown fields are ignored (RFC
//! 6749 section 3.2). Errors are RFC 6749 section 5.2 JSON, mapped in one place: the
//! `IntoResponse` implementation of [`ExchangeError`].
//!
//! Replacement (`subject_token_type=...:txn_token`): the old token must verify with the
//! service's own key and be unexpired; `txn`, `sub`, `aud`, `tctx` and `rctx` are kept,
//! the scope only narrows, the caller becomes `req_wl` and the outermost `act` with the
//! previous chain nested inside it (when the old token has no `act`, its `req_wl` is the
//! previous actor), and the new expiry is never later than the old one. A Txn-Token may be
//! replaced at most [`ExchangeService::with_max_replacements`] times, counted from its
//! signed `act` chain ([`TxnToken::replacements`]) so every replica agrees. Each actor the
//! service adds carries `iss` and `sub_profile` (draft-mcguinness-oauth-actor-profile-00);
//! inherited actors are never rewritten.
//! `request_context` and `request_details` are refused on a replacement, since they
//! would change contexts that the draft keeps for the whole transaction.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Map, Value, json};
use writ_identity::bundle::Jwk;
use writ_identity::clock::{SharedClock, from_unix_seconds};
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::LeaseRecord;
use writ_sdk::oauth::{
    CLIENT_ASSERTION_TYPE_JWT_SPIFFE, GRANT_TYPE_TOKEN_EXCHANGE, TOKEN_TYPE_N_A, TokenType,
};
use writ_sdk::txn_token::{Actor, TxnToken, TxnVerifier};
use writ_sdk::workload::WorkloadClient;

use crate::audit::durable::{DurableAudit, unix_ms};
use crate::audit::{AuditError, AuditLog, AuditRecord};
use crate::client_assertion::ReplayCache;
use crate::lease::{LeaseError, Leases, is_sub_agent_id, root_parent};
use crate::oidc::{OidcError, OidcValidator, ValidatedSubject};
use crate::policy::condition::Input as ConditionInput;
use crate::policy::{CallerRule, Policy, is_scope_token};
use crate::rate_limit::RateLimiter;
use crate::replica::Replica;
use crate::txn_token::{MintError, SigningKeys};

/// The `Retry-After` of a 503 refusal (the audit log or the lease store unavailable).
pub const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Largest request body accepted, in bytes (64 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Largest single form field accepted after decoding, in bytes (16 KiB).
pub const MAX_FIELD_BYTES: usize = 16 * 1024;
/// Largest `request_context` or `request_details` JSON accepted, in bytes (4 KiB).
pub const MAX_CONTEXT_BYTES: usize = 4 * 1024;
/// Default lifetime of an issued Txn-Token (5 minutes).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Largest Txn-Token issued, in bytes: it travels in an HTTP header, and common proxies
/// refuse headers above 8 KB in total.
pub const MAX_ISSUED_TOKEN_BYTES: usize = 4 * 1024;
/// Default deepest `act` chain a replacement may produce.
pub const DEFAULT_MAX_CHAIN_DEPTH: usize = 8;
/// Default most times one transaction's Txn-Token may be replaced (draft-11 asks a
/// service to limit it); with [`DEFAULT_MAX_CHAIN_DEPTH`] every replacement the chain
/// depth allows.
pub const DEFAULT_MAX_REPLACEMENTS: usize = 7;
/// Most subject token validations remembered by the validation cache.
pub const SUBJECT_CACHE_CAPACITY: u64 = 100_000;
/// Longest time a subject token validation is remembered, by the service's clock (5
/// minutes, the JWKS cache's lifetime): a key the provider withdraws stops validating
/// cached tokens as soon as it stops validating new ones. The token's `exp` ends it
/// sooner, and `exp` itself is bounded by the issuer's `max_token_lifetime`.
pub const SUBJECT_CACHE_MAX_AGE: Duration = Duration::from_secs(300);
/// The `rctx` members the service fills and a caller may not set.
pub const RESERVED_RCTX: [&str; 3] = ["req_ip", "authn", "transport"];

/// The SPIFFE ID of the mTLS-authenticated caller, a request extension set by the
/// listener. A request without it (and without an accepted client assertion) is refused
/// with `invalid_client`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerId(pub SpiffeId);

/// How a caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// With its X509-SVID in the TLS handshake.
    Mtls,
    /// With a JWT-SVID client assertion.
    JwtSvid,
}

impl ClientAuth {
    /// The name in `rctx.transport` and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mtls => "mtls",
            Self::JwtSvid => "jwt-svid",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its SPIFFE ID.
    pub id: SpiffeId,
    /// How it proved it.
    pub auth: ClientAuth,
}

/// Why an exchange was refused. Each variant is one RFC 6749 / RFC 8693 error code;
/// `reason` is safe to show the client (it never holds a token or key material).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// `invalid_request` (400): malformed, oversized, duplicated or missing parameters,
    /// an unsupported token type or actor token.
    #[error("invalid_request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// `invalid_request` (413): the declared `Content-Length` is over the limit; refused
    /// before the body is read (and before `100 Continue`).
    #[error("invalid_request: request body is larger than {max} bytes")]
    BodyTooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// `invalid_client` (401): the caller is not authenticated.
    #[error("invalid_client: {reason}")]
    InvalidClient {
        /// What is wrong.
        reason: String,
    },
    /// `invalid_scope` (400): the scope is malformed, widens a replaced token, or
    /// nothing would be granted.
    #[error("invalid_scope: {reason}")]
    InvalidScope {
        /// What is wrong.
        reason: String,
    },
    /// `invalid_target` (400): the audience is not this trust domain.
    #[error("invalid_target: {reason}")]
    InvalidTarget {
        /// What is wrong.
        reason: String,
    },
    /// `unauthorized_client` (403): the policy does not let this caller exchange, or not
    /// this subject token type.
    #[error("unauthorized_client: {reason}")]
    UnauthorizedClient {
        /// What is wrong.
        reason: String,
    },
    /// `unsupported_grant_type` (400): `grant_type` is not token exchange.
    #[error("unsupported_grant_type: only token exchange is supported")]
    UnsupportedGrantType,
    /// `temporarily_unavailable` (429, with `Retry-After`): the caller is over its rate
    /// limit. RFC 6749 has no token-endpoint code for this; the registered
    /// `temporarily_unavailable` is the closest.
    #[error("temporarily_unavailable: rate limit exceeded")]
    RateLimited {
        /// When the caller may try again.
        retry_after: Duration,
    },
    /// `server_error` (500): the token could not be signed. Details go to the log only.
    #[error("server_error: {0}")]
    Mint(#[from] MintError),
    /// `temporarily_unavailable` (503, with `Retry-After`): a sub-agent's lease could not
    /// be looked up. Details go to the log only.
    #[error("temporarily_unavailable: {0}")]
    LeasesUnavailable(String),
    /// `temporarily_unavailable` (503, with `Retry-After`): the grant could not be
    /// written to the audit log (e.g. a full disk), so nothing is granted. Details go to
    /// the log only.
    #[error("temporarily_unavailable: {0}")]
    AuditUnavailable(#[from] AuditError),
}

impl ExchangeError {
    fn invalid_request(reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            reason: reason.into(),
        }
    }

    /// An invalid, expired or untrusted subject token. RFC 8693 section 2.2.2 makes this
    /// `invalid_request` (not `invalid_grant`).
    fn invalid_subject_token(reason: impl Into<String>) -> Self {
        Self::InvalidRequest {
            reason: format!("subject_token: {}", reason.into()),
        }
    }

    fn invalid_scope(reason: impl Into<String>) -> Self {
        Self::InvalidScope {
            reason: reason.into(),
        }
    }

    fn invalid_client(reason: impl Into<String>) -> Self {
        Self::InvalidClient {
            reason: reason.into(),
        }
    }

    fn unauthorized(reason: impl Into<String>) -> Self {
        Self::UnauthorizedClient {
            reason: reason.into(),
        }
    }

    /// The RFC 6749 error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } | Self::BodyTooLarge { .. } => "invalid_request",
            Self::InvalidClient { .. } => "invalid_client",
            Self::RateLimited { .. } => "temporarily_unavailable",
            Self::InvalidScope { .. } => "invalid_scope",
            Self::InvalidTarget { .. } => "invalid_target",
            Self::UnauthorizedClient { .. } => "unauthorized_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::Mint(_) => "server_error",
            Self::LeasesUnavailable(_) | Self::AuditUnavailable(_) => "temporarily_unavailable",
        }
    }

    /// The `error_description`: what is wrong, safe to show the client and to audit.
    /// RFC 6749 section 5.2 allows only printable ASCII without `"` and `\\` there; any
    /// other character (echoed from the request) becomes `?`.
    pub fn description(&self) -> String {
        self.raw_description()
            .chars()
            .map(|c| match c {
                ' ' | '!' | '#'..='[' | ']'..='~' => c,
                _ => '?',
            })
            .collect()
    }

    fn raw_description(&self) -> String {
        match self {
            Self::InvalidRequest { reason }
            | Self::InvalidClient { reason }
            | Self::InvalidScope { reason }
            | Self::InvalidTarget { reason }
            | Self::UnauthorizedClient { reason } => reason.clone(),
            Self::BodyTooLarge { max } => format!("request body is larger than {max} bytes"),
            Self::UnsupportedGrantType => "only token exchange is supported".to_owned(),
            Self::RateLimited { .. } => "rate limit exceeded".to_owned(),
            Self::Mint(_) => "internal error".to_owned(),
            Self::LeasesUnavailable(_) => "sub-agent leases cannot be checked now".to_owned(),
            Self::AuditUnavailable(_) => "the decision cannot be recorded now".to_owned(),
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. }
            | Self::InvalidScope { .. }
            | Self::InvalidTarget { .. }
            | Self::UnsupportedGrantType => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidClient { .. } => StatusCode::UNAUTHORIZED,
            Self::UnauthorizedClient { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Mint(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::LeasesUnavailable(_) | Self::AuditUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// The one mapping of [`ExchangeError`] to the wire: RFC 6749 section 5.2 JSON
/// `{error, error_description}` with its HTTP status and `Cache-Control: no-store`.
impl IntoResponse for ExchangeError {
    fn into_response(self) -> Response {
        if let Self::Mint(e) = &self {
            tracing::error!(error = %e, "minting a Txn-Token failed");
        }
        if let Self::LeasesUnavailable(e) = &self {
            tracing::error!(error = %e, "sub-agent lease lookup failed");
        }
        let body = json!({"error": self.code(), "error_description": self.description()});
        let mut response = no_store((self.status(), Json(body)).into_response());
        let retry_after = match &self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::LeasesUnavailable(_) | Self::AuditUnavailable(_) => Some(UNAVAILABLE_RETRY_AFTER),
            _ => None,
        };
        if let Some(retry_after) = retry_after {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// A parsed and size-checked token exchange request.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeRequest {
    audience: String,
    scope: Option<BTreeSet<String>>,
    subject_token: String,
    /// The SHA-256 (hex) of `subject_token`, computed once: the audit record and the
    /// subject cache both key on it.
    subject_token_sha256: String,
    subject_token_type: TokenType,
    request_context: Option<Map<String, Value>>,
    request_details: Option<Map<String, Value>>,
    client_assertion: Option<String>,
}

impl ExchangeRequest {
    /// Parses an `application/x-www-form-urlencoded` body.
    ///
    /// # Errors
    /// [`ExchangeError::UnsupportedGrantType`] for another grant type,
    /// [`ExchangeError::InvalidScope`] for a malformed scope, and
    /// [`ExchangeError::InvalidRequest`] for everything else that is wrong.
    pub fn from_form(body: &[u8]) -> Result<Self, ExchangeError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(ExchangeError::invalid_request(format!(
                "request body is larger than {MAX_BODY_BYTES} bytes"
            )));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(ExchangeError::invalid_request("request body is not UTF-8"));
        }
        // Borrowed from the body unless percent-decoding changed them.
        let mut fields: BTreeMap<Cow<'_, str>, Cow<'_, str>> = BTreeMap::new();
        for (name, value) in url::form_urlencoded::parse(body) {
            if name.contains('\u{FFFD}') || value.contains('\u{FFFD}') {
                return Err(ExchangeError::invalid_request(
                    "a parameter is not valid percent-encoded UTF-8",
                ));
            }
            if value.len() > MAX_FIELD_BYTES || name.len() > MAX_FIELD_BYTES {
                return Err(ExchangeError::invalid_request(format!(
                    "a parameter is larger than {MAX_FIELD_BYTES} bytes"
                )));
            }
            if fields.contains_key(&name) {
                return Err(ExchangeError::invalid_request(format!(
                    "parameter `{}` appears more than once",
                    short(&name)
                )));
            }
            fields.insert(name, value);
        }
        let scope_text = fields.remove("scope");
        let mut take = |name: &str| fields.remove(name).filter(|v| !v.is_empty());
        let grant_type = take("grant_type")
            .ok_or_else(|| ExchangeError::invalid_request("missing `grant_type`"))?;
        if grant_type != GRANT_TYPE_TOKEN_EXCHANGE {
            return Err(ExchangeError::UnsupportedGrantType);
        }
        match take("requested_token_type") {
            Some(t) if t == TokenType::TxnToken.as_urn() => {}
            Some(_) => {
                return Err(ExchangeError::invalid_request(format!(
                    "`requested_token_type` must be {}",
                    TokenType::TxnToken
                )));
            }
            None => {
                return Err(ExchangeError::invalid_request(
                    "missing `requested_token_type`",
                ));
            }
        }
        if take("actor_token").is_some() || take("actor_token_type").is_some() {
            return Err(ExchangeError::invalid_request(
                "actor_token is not supported: the mTLS caller is the actor",
            ));
        }
        if take("resource").is_some() {
            return Err(ExchangeError::InvalidTarget {
                reason: "`resource` is not supported; use `audience`".into(),
            });
        }
        let client_assertion = match (take("client_assertion_type"), take("client_assertion")) {
            (None, None) => None,
            (Some(t), Some(a)) if t == CLIENT_ASSERTION_TYPE_JWT_SPIFFE => Some(a.into_owned()),
            (Some(_), Some(_)) => {
                return Err(ExchangeError::invalid_client(format!(
                    "`client_assertion_type` must be {CLIENT_ASSERTION_TYPE_JWT_SPIFFE}"
                )));
            }
            _ => {
                return Err(ExchangeError::invalid_request(
                    "`client_assertion` and `client_assertion_type` go together",
                ));
            }
        };
        let audience = take("audience")
            .ok_or_else(|| ExchangeError::invalid_request("missing `audience`"))?
            .into_owned();
        let subject_token = take("subject_token")
            .ok_or_else(|| ExchangeError::invalid_request("missing `subject_token`"))?
            .into_owned();
        let type_urn = take("subject_token_type")
            .ok_or_else(|| ExchangeError::invalid_request("missing `subject_token_type`"))?;
        let subject_token_type = TokenType::from_urn(&type_urn)
            .ok_or_else(|| ExchangeError::invalid_request("unsupported `subject_token_type`"))?;
        let scope = Some(parse_scope(&scope_text.ok_or_else(|| {
            ExchangeError::invalid_request(
                "missing `scope`: the purpose of the transaction is required",
            )
        })?)?);
        let request_context = take("request_context")
            .map(|t| parse_context("request_context", &t))
            .transpose()?;
        let request_details = take("request_details")
            .map(|t| parse_context("request_details", &t))
            .transpose()?;
        Ok(Self {
            audience,
            scope,
            subject_token_sha256: writ_sdk::spiffe::fingerprint::token(&subject_token),
            subject_token,
            subject_token_type,
            request_context,
            request_details,
            client_assertion,
        })
    }

    /// The requested audience.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The requested scopes (always present in a parsed request).
    pub fn scope(&self) -> Option<&BTreeSet<String>> {
        self.scope.as_ref()
    }

    /// The subject token type.
    pub fn subject_token_type(&self) -> TokenType {
        self.subject_token_type
    }

    /// The SHA-256 of the subject token (hex), for logs.
    pub fn subject_token_fingerprint(&self) -> String {
        self.subject_token_sha256.clone()
    }

    /// The `request_context` object.
    pub fn request_context(&self) -> Option<&Map<String, Value>> {
        self.request_context.as_ref()
    }

    /// The `request_details` object.
    pub fn request_details(&self) -> Option<&Map<String, Value>> {
        self.request_details.as_ref()
    }
}

/// At most 64 characters of a client-supplied name, for error messages.
fn short(name: &str) -> String {
    name.chars().take(64).collect()
}

fn parse_scope(text: &str) -> Result<BTreeSet<String>, ExchangeError> {
    let mut out = BTreeSet::new();
    for s in text.split(' ').filter(|s| !s.is_empty()) {
        if !is_scope_token(s) {
            return Err(ExchangeError::invalid_scope("`scope` is malformed"));
        }
        out.insert(s.to_owned());
    }
    if out.is_empty() {
        return Err(ExchangeError::invalid_scope("`scope` is empty"));
    }
    Ok(out)
}

fn parse_context(name: &str, text: &str) -> Result<Map<String, Value>, ExchangeError> {
    if text.len() > MAX_CONTEXT_BYTES {
        return Err(ExchangeError::invalid_request(format!(
            "`{name}` is larger than {MAX_CONTEXT_BYTES} bytes"
        )));
    }
    match writ_identity::bundle::parse_strict_json(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ExchangeError::invalid_request(format!(
            "`{name}` must be a JSON object"
        ))),
        Err(_) => Err(ExchangeError::invalid_request(format!(
            "`{name}` is not valid JSON"
        ))),
    }
}

/// A successful exchange: RFC 8693 section 2.2.1, never with a refresh token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExchangeResponse {
    /// The Txn-Token.
    pub access_token: String,
    /// Always the URN of [`TokenType::TxnToken`].
    pub issued_token_type: &'static str,
    /// Always `N_A`.
    pub token_type: &'static str,
    /// Seconds until the Txn-Token expires.
    pub expires_in: i64,
}

impl IntoResponse for ExchangeResponse {
    fn into_response(self) -> Response {
        no_store((StatusCode::OK, Json(self)).into_response())
    }
}

/// What the subject token established: who, what scope, until when, and the contexts.
struct Subject {
    sub: String,
    scope: BTreeSet<String>,
    expires_at: i64,
    replaced: Option<TxnToken>,
    authn: Option<String>,
    /// The validated OIDC subject token (`None` on a replacement).
    oidc: Option<Arc<ValidatedSubject>>,
}

/// Validated subjects by (token type, SHA-256 of the token), with when (clock seconds)
/// they were validated.
type SubjectCache = moka::future::Cache<(TokenType, String), (Arc<ValidatedSubject>, i64)>;

/// The token exchange service: policy, subject token validation and minting.
#[derive(Debug)]
pub struct ExchangeService {
    trust_domain: TrustDomain,
    issuer_url: String,
    policy: Policy,
    oidc: Option<Arc<OidcValidator>>,
    keys: Arc<SigningKeys>,
    clock: SharedClock,
    default_lifetime: Duration,
    max_chain_depth: usize,
    max_replacements: usize,
    audit: AuditLog,
    limiter: RateLimiter,
    /// Validated subjects and when (clock seconds) they were validated.
    subject_cache: Option<SubjectCache>,
    assertions: Option<WorkloadClient>,
    assertion_replay: Option<ReplayCache>,
    leases: Option<Leases>,
    /// Other replicas' keys and the publication of this one's (see [`crate::replica`]).
    replica: Option<Arc<Replica>>,
    /// Exchange, cache and rate-limit metrics (`None`: off).
    metrics: Option<Arc<crate::metrics::TxnMetrics>>,
    /// The durable audit trail in the identity store, if on.
    durable: Option<DurableAudit>,
    /// The kill switch (see [`crate::revocation`]), with an identity store.
    revocations: Option<Arc<crate::revocation::Revocations>>,
}

impl ExchangeService {
    /// A service for `trust_domain` whose tokens carry `iss = issuer_url` (also the base
    /// of its metadata URLs) and are signed by `keys`, with no OIDC issuer (only
    /// replacements), a 5-minute default lifetime, a chain depth limit of
    /// [`DEFAULT_MAX_CHAIN_DEPTH`], no subject validation cache, no client assertions
    /// and an in-memory audit log. Replaced tokens are verified against the published
    /// keys.
    pub fn new(
        trust_domain: TrustDomain,
        issuer_url: impl Into<String>,
        policy: Policy,
        keys: Arc<SigningKeys>,
        clock: SharedClock,
    ) -> Self {
        Self {
            trust_domain,
            issuer_url: issuer_url.into().trim_end_matches('/').to_owned(),
            policy,
            oidc: None,
            keys,
            limiter: RateLimiter::new(clock.clone()),
            clock,
            default_lifetime: DEFAULT_LIFETIME,
            max_chain_depth: DEFAULT_MAX_CHAIN_DEPTH,
            max_replacements: DEFAULT_MAX_REPLACEMENTS,
            audit: AuditLog::memory(),
            subject_cache: None,
            assertions: None,
            assertion_replay: None,
            leases: None,
            replica: None,
            metrics: Some(Arc::new(crate::metrics::TxnMetrics::new())),
            durable: None,
            revocations: None,
        }
    }

    /// Refuses what a revocation in force covers (see [`crate::revocation`]), and serves
    /// the revocation feed on the listener.
    pub fn with_revocations(mut self, revocations: Arc<crate::revocation::Revocations>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The revocations this service enforces, if any.
    pub fn revocations(&self) -> Option<&Arc<crate::revocation::Revocations>> {
        self.revocations.as_ref()
    }

    /// Records no metrics (for the benchmark that compares metrics on and off).
    pub fn without_metrics(mut self) -> Self {
        self.metrics = None;
        self
    }

    /// The service's metrics, unless turned off.
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::TxnMetrics>> {
        self.metrics.as_ref()
    }

    /// Runs as one replica of a logical token service: the key set (JWKS and the
    /// verification of replaced Txn-Tokens) adds the other replicas' published keys,
    /// and a key this replica starts signing with is published before the first token
    /// it signed is returned. `replica` must publish this service's signing keys.
    pub fn with_replica(mut self, replica: Arc<Replica>) -> Self {
        self.replica = Some(replica);
        self
    }

    /// The replica this service runs as, if any.
    pub fn replica(&self) -> Option<&Arc<Replica>> {
        self.replica.as_ref()
    }

    /// The key set: key id -> public key. This service's keys, and as a replica, every
    /// other replica's unexpired key.
    pub fn public_keys(&self) -> BTreeMap<String, Jwk> {
        match &self.replica {
            Some(replica) => replica.public_keys(),
            None => self.keys.public_keys(),
        }
    }

    /// The JWKS document (RFC 7517) of [`ExchangeService::public_keys`].
    pub fn jwks(&self) -> Value {
        crate::txn_token::jwks(&self.public_keys())
    }

    /// Serves sub-agent callers while their lease (looked up in `leases`) stands, with
    /// tokens that end with it. Without this, sub-agent callers are refused.
    pub fn with_leases(mut self, leases: Leases) -> Self {
        self.leases = Some(leases);
        self
    }

    /// Writes decisions to `audit`.
    pub fn with_audit(mut self, audit: AuditLog) -> Self {
        self.audit = audit;
        self
    }

    /// Also writes decisions (and sub-agent spawns) to the durable audit trail.
    pub fn with_durable_audit(mut self, durable: DurableAudit) -> Self {
        self.durable = Some(durable);
        self
    }

    /// The durable audit trail, if on.
    pub fn durable_audit(&self) -> Option<&DurableAudit> {
        self.durable.as_ref()
    }

    /// The clock the service reads.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Remembers validated OIDC subject tokens (keyed by their SHA-256, until they
    /// expire and at most [`SUBJECT_CACHE_MAX_AGE`]) so a token presented again skips
    /// signature verification.
    pub fn with_subject_cache(mut self) -> Self {
        self.subject_cache = Some(
            moka::future::Cache::builder()
                .max_capacity(SUBJECT_CACHE_CAPACITY)
                .time_to_live(SUBJECT_CACHE_MAX_AGE)
                .build(),
        );
        self
    }

    /// Accepts JWT-SVID client assertions (for callers whose rule allows them),
    /// validated by the agent behind `workload` with the issuer URL as audience, each
    /// once (replay protection on; see
    /// [`ExchangeService::with_client_assertion_replay_protection`]).
    pub fn with_client_assertions(mut self, workload: WorkloadClient) -> Self {
        self.assertions = Some(workload);
        self.assertion_replay = Some(ReplayCache::new(self.clock.clone()));
        self
    }

    /// Turns the client assertion replay check on (the default) or off. Off, an
    /// assertion without `jti` is accepted, and any assertion may be presented again
    /// until it expires.
    pub fn with_client_assertion_replay_protection(mut self, on: bool) -> Self {
        self.assertion_replay = on.then(|| ReplayCache::new(self.clock.clone()));
        self
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The signing keys.
    pub fn keys(&self) -> &Arc<SigningKeys> {
        &self.keys
    }

    /// Accepts OIDC subject tokens validated by `oidc`.
    pub fn with_oidc(mut self, oidc: Arc<OidcValidator>) -> Self {
        self.oidc = Some(oidc);
        self
    }

    /// Sets the default lifetime of issued tokens (policy and subject token still cap it).
    pub fn with_default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// Sets the deepest `act` chain a replacement may produce.
    pub fn with_max_chain_depth(mut self, depth: usize) -> Self {
        self.max_chain_depth = depth;
        self
    }

    /// Sets the most times one transaction's Txn-Token may be replaced (0: never).
    pub fn with_max_replacements(mut self, replacements: usize) -> Self {
        self.max_replacements = replacements;
        self
    }

    /// The issuer URL (`iss` of issued tokens).
    pub fn issuer_url(&self) -> &str {
        &self.issuer_url
    }

    /// The id of the key that signs now.
    pub fn kid(&self) -> String {
        self.keys.current_kid()
    }

    /// Handles one `POST /token` body: authenticates the caller (its mTLS identity, or a
    /// client assertion in the body), exchanges, and writes one audit line whatever the
    /// outcome.
    ///
    /// # Errors
    /// The [`ExchangeError`] naming why nothing was minted.
    pub async fn handle(
        &self,
        mtls_caller: Option<SpiffeId>,
        caller_ip: Option<IpAddr>,
        body: Result<&[u8], ExchangeError>,
    ) -> Result<ExchangeResponse, ExchangeError> {
        self.handle_traced(mtls_caller, caller_ip, body, None).await
    }

    /// As [`ExchangeService::handle`], recording the request's W3C `traceparent` (see
    /// [`crate::audit::traceparent`]) with the decision.
    ///
    /// # Errors
    /// The [`ExchangeError`] naming why nothing was minted.
    pub async fn handle_traced(
        &self,
        mtls_caller: Option<SpiffeId>,
        caller_ip: Option<IpAddr>,
        body: Result<&[u8], ExchangeError>,
        traceparent: Option<String>,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let req = body.and_then(ExchangeRequest::from_form);
        self.decide_counted(mtls_caller, caller_ip, req, traceparent)
            .await
    }

    /// Exchanges the subject token of `req` for a Txn-Token on behalf of the
    /// mTLS-authenticated `caller`, and writes the audit line.
    ///
    /// # Errors
    /// The [`ExchangeError`] naming why nothing was minted.
    pub async fn exchange(
        &self,
        caller: &SpiffeId,
        caller_ip: Option<IpAddr>,
        req: ExchangeRequest,
    ) -> Result<ExchangeResponse, ExchangeError> {
        self.decide_counted(Some(caller.clone()), caller_ip, Ok(req), None)
            .await
    }

    async fn decide(
        &self,
        mtls_caller: Option<SpiffeId>,
        caller_ip: Option<IpAddr>,
        req: Result<ExchangeRequest, ExchangeError>,
        traceparent: Option<String>,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let mut record = AuditRecord::new(self.clock.now());
        record.traceparent = traceparent;
        record.caller_ip = caller_ip.map(|ip| ip.to_string());
        record.caller = mtls_caller.as_ref().map(|id| id.as_str().to_owned());
        let result = async {
            let req = req?;
            record.subject_token_sha256 = Some(req.subject_token_fingerprint());
            record.subject_token_type = Some(req.subject_token_type.name());
            record.requested_scope = req
                .scope
                .as_ref()
                .map(|s| s.iter().map(String::as_str).collect::<Vec<_>>().join(" "));
            let caller = self.authenticate(mtls_caller, &req).await?;
            if record.caller.as_deref() != Some(caller.id.as_str()) {
                record.caller = Some(caller.id.as_str().to_owned());
            }
            record.client_auth = Some(caller.auth.name());
            let lease = self.sub_agent_lease(&caller.id).await?;
            if let Some(lease) = &lease {
                record.lease = Some(lease.id.clone());
                record.parent = Some(lease.parent_id.to_string());
                if !lease.is_live(self.clock.unix_seconds()) {
                    return Err(ExchangeError::unauthorized(LeaseError::Ended.to_string()));
                }
            }
            let (token, response) = self
                .exchange_inner(&caller, caller_ip, req, lease.as_ref())
                .await?;
            if let Some(revocations) = &self.revocations {
                revocations.check(&token, &caller.id)?;
            }
            Ok((token, response))
        }
        .await;
        match result {
            Ok((token, response)) => {
                record.txn = Some(token.txn.clone());
                record.sub = Some(token.sub.clone());
                record.granted_scope = Some(token.scope.clone());
                record.act = token.chain().into_iter().map(str::to_owned).collect();
                record.expires_in = Some(response.expires_in);
                if let Some(durable) = &self.durable
                    && let Err(e) = durable.granted(&record, unix_ms(self.clock.now())).await
                {
                    let e = ExchangeError::from(e);
                    self.audit.refused(record, e.code(), &e.description());
                    return Err(e);
                }
                // Fails closed: a grant that cannot be recorded is not handed out.
                self.audit.granted(record)?;
                Ok(response)
            }
            Err(e) => {
                if let Some(durable) = &self.durable {
                    durable.refused(
                        &record,
                        e.code(),
                        &e.description(),
                        unix_ms(self.clock.now()),
                    );
                }
                self.audit.refused(record, e.code(), &e.description());
                Err(e)
            }
        }
    }

    /// The caller: its mTLS identity, or the SPIFFE ID of a valid JWT-SVID client
    /// assertion that its policy rule accepts.
    async fn authenticate(
        &self,
        mtls_caller: Option<SpiffeId>,
        req: &ExchangeRequest,
    ) -> Result<Caller, ExchangeError> {
        match (mtls_caller, &req.client_assertion) {
            (Some(_), Some(_)) => Err(ExchangeError::invalid_request(
                "use one client authentication method: a client certificate or a client assertion",
            )),
            (Some(id), None) => Ok(Caller {
                id,
                auth: ClientAuth::Mtls,
            }),
            (None, None) => Err(ExchangeError::invalid_client(
                "a client X509-SVID (or an enabled client assertion) is required",
            )),
            (None, Some(assertion)) => {
                let Some(workload) = &self.assertions else {
                    return Err(ExchangeError::invalid_client(
                        "client assertions are not enabled",
                    ));
                };
                let (id, claims) = workload
                    .clone()
                    .validate_jwt(&self.issuer_url, assertion)
                    .await
                    .map_err(|e| {
                        tracing::info!(error = %e, "client assertion refused");
                        ExchangeError::invalid_client(
                            "client assertion is not a valid JWT-SVID for this service",
                        )
                    })?;
                if !self
                    .policy
                    .rule_for(&id)
                    .is_some_and(CallerRule::client_assertion)
                {
                    return Err(ExchangeError::invalid_client(
                        "this caller may not authenticate with a client assertion",
                    ));
                }
                if let Some(replay) = &self.assertion_replay {
                    replay.check(&id, &claims).map_err(|e| {
                        tracing::info!(
                            assertion_sha256 = %writ_sdk::spiffe::fingerprint::token(assertion),
                            caller = %id,
                            error = %e,
                            "client assertion refused"
                        );
                        ExchangeError::invalid_client(e.to_string())
                    })?;
                }
                Ok(Caller {
                    id,
                    auth: ClientAuth::JwtSvid,
                })
            }
        }
    }

    /// For a sub-agent caller, its lease (perhaps ended); `None` for any other caller.
    async fn sub_agent_lease(
        &self,
        caller: &SpiffeId,
    ) -> Result<Option<LeaseRecord>, ExchangeError> {
        if !is_sub_agent_id(caller) {
            return Ok(None);
        }
        let Some(leases) = &self.leases else {
            return Err(ExchangeError::unauthorized(LeaseError::NoStore.to_string()));
        };
        match leases.lookup(caller).await {
            Ok(lease) => Ok(Some(lease)),
            Err(LeaseError::Store(e)) => Err(ExchangeError::LeasesUnavailable(e)),
            Err(e) => Err(ExchangeError::unauthorized(e.to_string())),
        }
    }

    /// Mints for an authenticated caller. `lease`: a sub-agent's lease, whose end the
    /// token never outlives (no child SVID outlives it either).
    async fn exchange_inner(
        &self,
        caller: &Caller,
        caller_ip: Option<IpAddr>,
        req: ExchangeRequest,
        lease: Option<&LeaseRecord>,
    ) -> Result<(TxnToken, ExchangeResponse), ExchangeError> {
        let lease_end = lease.map(|l| l.expires_at);
        if req.audience != self.trust_domain.as_str() {
            return Err(ExchangeError::InvalidTarget {
                reason: "`audience` must be this service's trust domain".into(),
            });
        }
        let rule = self
            .policy
            .rule_for(&caller.id)
            .ok_or_else(|| ExchangeError::unauthorized("caller may not request Txn-Tokens"))?;
        if let Some(rate) = rule.rate_limit()
            && let Err(retry_after) = self.limiter.check(&root_parent(&caller.id), rate)
        {
            return Err(ExchangeError::RateLimited { retry_after });
        }
        if !self
            .policy
            .candidates(&caller.id)
            .any(|(_, r)| r.allows(req.subject_token_type))
        {
            return Err(ExchangeError::unauthorized(
                "caller may not present this subject token type",
            ));
        }
        let subject = match req.subject_token_type {
            TokenType::TxnToken => self.replaced(&req).await?,
            TokenType::SelfSigned | TokenType::UnsignedJson => {
                // With conditional rules: the keys of the first candidate taking the type.
                let keys_rule = self
                    .policy
                    .candidates(&caller.id)
                    .map(|(_, r)| r)
                    .find(|r| r.allows(req.subject_token_type))
                    .unwrap_or(rule);
                self.workload_subject(&req, caller, keys_rule)?
            }
            kind => self.oidc_subject(&req, kind).await?,
        };
        let now = self.clock.unix_seconds();
        let remaining = subject.expires_at.saturating_sub(now);
        if remaining <= 0 {
            return Err(ExchangeError::invalid_subject_token(
                "subject token has expired",
            ));
        }
        let rule = self.applicable_rule(caller, caller_ip, &req, &subject, lease)?;
        let scope = grant_scope(&req, &subject, rule)?;
        let lifetime = rule
            .max_lifetime()
            .min(self.default_lifetime)
            .min(self.policy.max_lifetime());
        let lifetime = i64::try_from(lifetime.as_secs())
            .unwrap_or(i64::MAX)
            .min(remaining);
        let exp = now
            .saturating_add(lifetime)
            .min(lease_end.unwrap_or(i64::MAX));

        let claims = match subject.replaced {
            Some(old) => {
                let previous = old
                    .act
                    .clone()
                    .unwrap_or_else(|| profiled_actor(&old.req_wl));
                let act = profiled_actor(caller.id.as_str()).acting_for(previous);
                let depth = act.depth();
                if depth > self.max_chain_depth {
                    return Err(ExchangeError::invalid_request(format!(
                        "delegation chain would be deeper than {}",
                        self.max_chain_depth
                    )));
                }
                TxnToken {
                    iss: self.issuer_url.clone(),
                    iat: now,
                    exp: exp.min(old.exp),
                    aud: old.aud,
                    txn: old.txn,
                    sub: old.sub,
                    scope,
                    req_wl: caller.id.as_str().to_owned(),
                    tctx: old.tctx,
                    rctx: old.rctx,
                    act: Some(act),
                }
            }
            None => {
                let mut rctx = BTreeMap::new();
                if let Some(ip) = caller_ip {
                    rctx.insert("req_ip".to_owned(), Value::String(ip.to_string()));
                }
                if let Some(authn) = subject.authn {
                    rctx.insert("authn".to_owned(), Value::String(authn));
                }
                rctx.insert(
                    "transport".to_owned(),
                    Value::String(caller.auth.name().into()),
                );
                for (k, v) in req.request_context.unwrap_or_default() {
                    rctx.insert(k, v);
                }
                TxnToken {
                    iss: self.issuer_url.clone(),
                    iat: now,
                    exp,
                    aud: self.trust_domain.as_str().to_owned(),
                    txn: uuid::Uuid::new_v4().to_string(),
                    sub: subject.sub,
                    scope,
                    req_wl: caller.id.as_str().to_owned(),
                    tctx: req.request_details.map(|m| m.into_iter().collect()),
                    rctx: Some(rctx),
                    act: None,
                }
            }
        };
        let access_token = self.keys.mint(&claims)?;
        if let Some(replica) = &self.replica
            && replica.needs_publish()
            && let Err(e) = replica.publish().await
        {
            // The token stands; other replicas accept it once a later round publishes.
            tracing::warn!(error = %e, "publishing a new Txn-Token key failed");
        }
        if access_token.len() > MAX_ISSUED_TOKEN_BYTES {
            return Err(ExchangeError::invalid_request(format!(
                "the Txn-Token would be larger than {MAX_ISSUED_TOKEN_BYTES} bytes"
            )));
        }
        let response = ExchangeResponse {
            access_token,
            issued_token_type: TokenType::TxnToken.as_urn(),
            token_type: TOKEN_TYPE_N_A,
            expires_in: claims.exp.saturating_sub(now),
        };
        Ok((claims, response))
    }

    /// Verifies a Txn-Token presented for replacement.
    async fn replaced(&self, req: &ExchangeRequest) -> Result<Subject, ExchangeError> {
        if req.request_context.is_some() || req.request_details.is_some() {
            return Err(ExchangeError::invalid_request(
                "request_context and request_details cannot change a replaced Txn-Token",
            ));
        }
        // A key id no replica was known to have a moment ago: another replica may have
        // just started signing with it.
        if let Some(replica) = &self.replica
            && let Ok(header) = jsonwebtoken::decode_header(&req.subject_token)
            && let Some(kid) = header.kid.as_deref()
        {
            replica.refresh_for(kid).await;
        }
        let verifier = TxnVerifier::new(self.trust_domain.clone(), self.public_keys());
        let old = verifier
            .verify_at(
                &req.subject_token,
                from_unix_seconds(self.clock.unix_seconds()),
            )
            .map_err(|e| ExchangeError::invalid_subject_token(format!("subject Txn-Token: {e}")))?;
        if old.iss != self.issuer_url {
            return Err(ExchangeError::invalid_subject_token(
                "subject Txn-Token was issued by another service",
            ));
        }
        check_replacements(&old, self.max_replacements)?;
        Ok(Subject {
            sub: old.sub.clone(),
            scope: old.scopes().map(str::to_owned).collect(),
            expires_at: old.exp,
            authn: None,
            oidc: None,
            replaced: Some(old),
        })
    }

    /// Validates an OIDC subject token.
    async fn oidc_subject(
        &self,
        req: &ExchangeRequest,
        token_type: TokenType,
    ) -> Result<Subject, ExchangeError> {
        let oidc = self.oidc.as_ref().ok_or_else(|| {
            ExchangeError::unauthorized(
                "no OpenID Provider is configured for this subject token type",
            )
        })?;
        let validated = self
            .validate_subject(
                oidc,
                &req.subject_token,
                &req.subject_token_sha256,
                token_type,
            )
            .await
            .map_err(|e| match e {
                OidcError::Discovery { .. } | OidcError::Jwks { .. } | OidcError::Config { .. } => {
                    tracing::warn!(error = %e, "OIDC provider unavailable");
                    ExchangeError::invalid_subject_token("subject token could not be validated")
                }
                other => ExchangeError::invalid_subject_token(other.to_string()),
            })?;
        let sub = if oidc.issuers().count() > 1 {
            format!("{}#{}", validated.issuer, validated.subject)
        } else {
            validated.subject.clone()
        };
        let authn = validated
            .acr
            .clone()
            .or_else(|| (!validated.amr.is_empty()).then(|| validated.amr.join(" ")));
        if let Some(ctx) = &req.request_context
            && let Some(key) = RESERVED_RCTX.iter().find(|k| ctx.contains_key(**k))
        {
            return Err(ExchangeError::invalid_request(format!(
                "`request_context` may not set `{key}`"
            )));
        }
        let scope = validated.scope.iter().cloned().collect();
        check_scope_known(&scope)?;
        Ok(Subject {
            sub,
            scope,
            expires_at: validated.expires_at,
            replaced: None,
            authn,
            oidc: Some(validated),
        })
    }

    /// A `self_signed` or `unsigned_json` subject token ([`crate::subject`]): the rule
    /// has already named this type for the caller; `unsigned_json` is only taken from a
    /// caller that authenticated with its X509-SVID.
    fn workload_subject(
        &self,
        req: &ExchangeRequest,
        caller: &Caller,
        rule: &CallerRule,
    ) -> Result<Subject, ExchangeError> {
        let now = self.clock.unix_seconds();
        let validated = match req.subject_token_type {
            TokenType::UnsignedJson => {
                check_unsigned_json_caller(caller.auth)?;
                crate::subject::unsigned_json(&req.subject_token, now)
            }
            _ => {
                let keys = rule.self_signed_keys().ok_or_else(|| {
                    ExchangeError::unauthorized(
                        "no keys are configured for self-signed subject tokens",
                    )
                })?;
                crate::subject::self_signed(
                    &req.subject_token,
                    keys,
                    &caller.id,
                    &self.issuer_url,
                    now,
                )
            }
        }
        .map_err(|e| ExchangeError::invalid_subject_token(e.to_string()))?;
        if let Some(ctx) = &req.request_context
            && let Some(key) = RESERVED_RCTX.iter().find(|k| ctx.contains_key(**k))
        {
            return Err(ExchangeError::invalid_request(format!(
                "`request_context` may not set `{key}`"
            )));
        }
        Ok(Subject {
            sub: validated.sub,
            scope: validated.scope,
            expires_at: validated.expires_at.unwrap_or(i64::MAX),
            replaced: None,
            authn: None,
            oidc: None,
        })
    }
}

impl ExchangeService {
    /// [`Self::decide`], counted in the metrics (outcome, error code, latency, rate
    /// limit).
    async fn decide_counted(
        &self,
        mtls_caller: Option<SpiffeId>,
        caller_ip: Option<IpAddr>,
        req: Result<ExchangeRequest, ExchangeError>,
        traceparent: Option<String>,
    ) -> Result<ExchangeResponse, ExchangeError> {
        let started = std::time::Instant::now();
        let result = self.decide(mtls_caller, caller_ip, req, traceparent).await;
        if let Some(m) = &self.metrics {
            m.exchanged(
                result.as_ref().err().map(ExchangeError::code),
                started.elapsed(),
            );
            if let Err(ExchangeError::RateLimited { .. }) = &result {
                m.rate_limited();
            }
        }
        result
    }

    /// Validates an OIDC subject token, through the validation cache when enabled. A
    /// cached validation is used only while the token is unexpired.
    async fn validate_subject(
        &self,
        oidc: &OidcValidator,
        token: &str,
        token_sha256: &str,
        token_type: TokenType,
    ) -> Result<Arc<ValidatedSubject>, OidcError> {
        let Some(cache) = &self.subject_cache else {
            return oidc.validate(token, token_type).await.map(Arc::new);
        };
        let key = (token_type, token_sha256.to_owned());
        let now = self.clock.unix_seconds();
        let max_age = i64::try_from(SUBJECT_CACHE_MAX_AGE.as_secs()).unwrap_or(i64::MAX);
        if let Some((hit, validated_at)) = cache.get(&key).await
            && hit.expires_at > now
            && (validated_at..validated_at.saturating_add(max_age)).contains(&now)
        {
            self.metrics.as_ref().inspect(|m| m.subject_cache(true));
            return Ok(hit);
        }
        self.metrics.as_ref().inspect(|m| m.subject_cache(false));
        let validated = Arc::new(oidc.validate(token, token_type).await?);
        cache.insert(key, (validated.clone(), now)).await;
        Ok(validated)
    }
}

impl ExchangeService {
    /// The rule that decides for `caller`: the first candidate whose CEL condition holds
    /// (see [`crate::policy::condition`]). Without conditions, the first rule matching
    /// the caller. A condition that cannot be evaluated refuses the exchange.
    fn applicable_rule(
        &self,
        caller: &Caller,
        caller_ip: Option<IpAddr>,
        req: &ExchangeRequest,
        subject: &Subject,
        lease: Option<&LeaseRecord>,
    ) -> Result<&CallerRule, ExchangeError> {
        let mut input = None;
        for (index, rule) in self.policy.candidates(&caller.id) {
            let Some(condition) = rule.condition() else {
                return self.rule_allowing(rule, req);
            };
            let input = input.get_or_insert_with(|| {
                self.condition_input(caller, caller_ip, req, subject, lease)
            });
            match condition.evaluate(input) {
                Ok(true) => return self.rule_allowing(rule, req),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(caller = %caller.id, rule = index, error = %e, "policy condition refused the exchange");
                    return Err(ExchangeError::unauthorized(format!(
                        "the condition of policy rule {index} could not be evaluated for this request"
                    )));
                }
            }
        }
        Err(ExchangeError::unauthorized(
            "no policy rule's condition holds for this request",
        ))
    }

    fn rule_allowing<'a>(
        &self,
        rule: &'a CallerRule,
        req: &ExchangeRequest,
    ) -> Result<&'a CallerRule, ExchangeError> {
        if rule.allows(req.subject_token_type) {
            Ok(rule)
        } else {
            Err(ExchangeError::unauthorized(
                "caller may not present this subject token type",
            ))
        }
    }

    /// What a condition sees: the token's `tctx` and `rctx` as they will be issued.
    fn condition_input(
        &self,
        caller: &Caller,
        caller_ip: Option<IpAddr>,
        req: &ExchangeRequest,
        subject: &Subject,
        lease: Option<&LeaseRecord>,
    ) -> ConditionInput {
        let mut input = ConditionInput::new(self.clock.unix_seconds());
        input
            .only(
                self.policy
                    .candidates(&caller.id)
                    .filter_map(|(_, r)| r.condition())
                    .flat_map(|c| c.reads().iter().copied()),
            )
            .caller(&caller.id)
            .request(req.scope(), req.audience(), req.subject_token_type());
        if let Some(lease) = lease {
            input.lease(lease);
        }
        if let Some(old) = &subject.replaced {
            if input.wants("subject")
                && let Ok(Value::Object(claims)) = serde_json::to_value(old)
            {
                input.subject(&claims);
            }
            input.tctx(old.tctx.iter().flatten());
            input.rctx(old.rctx.iter().flatten());
        } else {
            if let Some(Value::Object(claims)) = subject.oidc.as_ref().map(|v| &v.claims) {
                input.subject(claims);
            } else if input.wants("subject") {
                // A token the workload asserted (`self_signed`, `unsigned_json`).
                let scope = subject.scope.iter().cloned().collect::<Vec<_>>().join(" ");
                let claims = BTreeMap::from([
                    ("sub".to_owned(), Value::String(subject.sub.clone())),
                    ("scope".to_owned(), Value::String(scope)),
                ]);
                input.subject(&claims);
            }
            input.tctx(req.request_details().into_iter().flatten());
            if !input.wants("rctx") {
                return input;
            }
            // As `exchange_inner` builds it for a new token.
            let mut rctx = BTreeMap::new();
            if let Some(ip) = caller_ip {
                rctx.insert("req_ip".to_owned(), Value::String(ip.to_string()));
            }
            if let Some(authn) = &subject.authn {
                rctx.insert("authn".to_owned(), Value::String(authn.clone()));
            }
            rctx.insert(
                "transport".to_owned(),
                Value::String(caller.auth.name().into()),
            );
            for (k, v) in req.request_context().into_iter().flatten() {
                rctx.insert(k.clone(), v.clone());
            }
            input.rctx(&rctx);
        }
        input
    }
}

/// An actor the service adds to a chain, in the shape of
/// draft-mcguinness-oauth-actor-profile-00: `iss` = the namespace authority of the SPIFFE
/// ID (`spiffe://<trust domain>`), `sub_profile` = `ai_agent` for a sub-agent (a child
/// SVID under a lease), `service` for any other workload.
fn profiled_actor(id: &str) -> Actor {
    let actor = Actor::new(id);
    match SpiffeId::new(id) {
        Ok(spiffe) => {
            let profile = if is_sub_agent_id(&spiffe) {
                "ai_agent"
            } else {
                "service"
            };
            actor
                .with_iss(format!("spiffe://{}", spiffe.trust_domain_str()))
                .with_sub_profile(profile)
        }
        Err(_) => actor,
    }
}

/// draft-11, "Txn-Token as a `subject_token`": a replacement is refused once the
/// transaction's token has been replaced `max` times.
fn check_replacements(old: &TxnToken, max: usize) -> Result<(), ExchangeError> {
    let done = old.replacements();
    if done >= max {
        return Err(ExchangeError::invalid_request(format!(
            "subject Txn-Token was already replaced {done} times, the most allowed is {max}"
        )));
    }
    Ok(())
}

/// An `unsigned_json` subject token proves nothing by itself: it is taken only from a
/// caller that authenticated with its X509-SVID (not a bearer client assertion).
fn check_unsigned_json_caller(auth: ClientAuth) -> Result<(), ExchangeError> {
    if auth != ClientAuth::Mtls {
        return Err(ExchangeError::unauthorized(
            "an unsigned_json subject token is accepted only from a caller authenticated with its X509-SVID",
        ));
    }
    Ok(())
}

/// draft-11, "Unknown `subject_token` scope": a subject token that carries no scope is
/// refused, never treated as unconstrained.
fn check_scope_known(scope: &BTreeSet<String>) -> Result<(), ExchangeError> {
    if scope.is_empty() {
        return Err(ExchangeError::invalid_subject_token(
            "its scope is unknown (no `scope` claim), and it is never treated as unconstrained",
        ));
    }
    Ok(())
}

/// granted = requested ∩ ceiling ∩ subject scope. On a replacement the request must not
/// name a scope the old token lacks.
fn grant_scope(
    req: &ExchangeRequest,
    subject: &Subject,
    rule: &CallerRule,
) -> Result<String, ExchangeError> {
    let requested = req.scope.as_ref().unwrap_or(&subject.scope);
    if subject.replaced.is_some() && !requested.is_subset(&subject.scope) {
        return Err(ExchangeError::invalid_scope(
            "a replacement may only narrow the scope",
        ));
    }
    let granted: Vec<&str> = requested
        .iter()
        .filter(|s| rule.max_scope().contains(*s) && subject.scope.contains(*s))
        .map(String::as_str)
        .collect();
    if granted.is_empty() {
        return Err(ExchangeError::invalid_scope(
            "no requested scope can be granted",
        ));
    }
    Ok(granted.join(" "))
}

/// The service's routes: `POST /token`, `GET /.well-known/jwks.json` and
/// `GET /.well-known/oauth-authorization-server` (RFC 8414). The caller's SPIFFE ID is
/// read from the [`CallerId`] request extension; its IP from axum's
/// `ConnectInfo<SocketAddr>` when present.
pub fn router(service: Arc<ExchangeService>) -> Router {
    Router::new()
        .route("/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .with_state(service)
}

async fn token(State(service): State<Arc<ExchangeService>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let caller = parts.extensions.get::<CallerId>().map(|c| c.0.clone());
    let caller_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::audit::traceparent);
    let result = match read_form(&parts.headers, body).await {
        Ok(bytes) => {
            service
                .handle_traced(caller, caller_ip, Ok(&bytes), trace)
                .await
        }
        Err(e) => {
            service
                .handle_traced(caller, caller_ip, Err(e), trace)
                .await
        }
    };
    match result {
        Ok(resp) => resp.into_response(),
        Err(e) => e.into_response(),
    }
}

/// The body of a form POST, at most [`MAX_BODY_BYTES`].
async fn read_form(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, ExchangeError> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(ExchangeError::invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    // Refused on its declared length, before the body is read: hyper sends
    // `100 Continue` only when the body is first polled, so a client that asked for it
    // never gets it.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ExchangeError::BodyTooLarge {
            max: MAX_BODY_BYTES,
        });
    }
    axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ExchangeError::invalid_request(format!(
                "request body is larger than {MAX_BODY_BYTES} bytes or unreadable"
            ))
        })
}

async fn jwks(State(service): State<Arc<ExchangeService>>) -> Response {
    let mut response = Json(service.jwks()).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    response
}

async fn metadata(State(service): State<Arc<ExchangeService>>) -> Response {
    let base = &service.issuer_url;
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": [GRANT_TYPE_TOKEN_EXCHANGE],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "tls_client_certificate_bound_access_tokens": false,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_json_only_from_mtls_callers() {
        assert!(check_unsigned_json_caller(ClientAuth::Mtls).is_ok());
        let e = check_unsigned_json_caller(ClientAuth::JwtSvid).unwrap_err();
        assert_eq!(e.code(), "unauthorized_client");
    }

    #[test]
    fn new_actors_have_the_actor_profile_shape() {
        let planner = profiled_actor("spiffe://example.org/planner");
        assert_eq!(planner.iss.as_deref(), Some("spiffe://example.org"));
        assert_eq!(planner.sub_profile.as_deref(), Some("service"));
        let child = profiled_actor("spiffe://example.org/planner/sub/summarize-0a1b");
        assert_eq!(child.sub_profile.as_deref(), Some("ai_agent"));
        let odd = profiled_actor("not a spiffe id");
        assert_eq!((odd.iss, odd.sub_profile), (None, None));
    }

    #[test]
    fn error_descriptions_are_rfc_6749_safe() {
        let e = ExchangeError::InvalidRequest {
            reason: "parameter `é\"\\\n` appears more than once".to_owned(),
        };
        let text = e.description();
        assert_eq!(text, "parameter `????` appears more than once");
        assert!(
            text.chars()
                .all(|c| matches!(c, ' ' | '!' | '#'..='[' | ']'..='~'))
        );
    }
}
