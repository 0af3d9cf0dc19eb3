//! The RFC 8693 exchange client: asks the transaction token service for a Txn-Token over
//! mTLS, authenticated by the workload's own X509-SVID.
//!
//! The client sends user tokens and Txn-Tokens to the service, so it must know whom it
//! talks to: [`TxnClient::new`] takes the service's SPIFFE ID and accepts no other
//! server. Accepting any member of a trust domain exists only under
//! [`TxnClientBuilder::dangerous`].
//!
//! ```no_run
//! # async fn demo(oidc_access_token: &str) -> Result<(), Box<dyn std::error::Error>> {
//! use writ_sdk::exchange::{TxnClient, TxnRequest};
//! use writ_sdk::workload::X509Source;
//! let source = X509Source::new().await?;
//! let tts_id = "spiffe://example.org/writ/tts".parse()?;
//! let client = TxnClient::new(&source, "https://127.0.0.1:8443", tts_id)?;
//! let issued = client
//!     .exchange(TxnRequest::access_token(oidc_access_token).scope("orders.read"))
//!     .await?;
//! let narrower = client.replace(&issued.access_token, Some("orders.read")).await?;
//! # let _ = narrower; Ok(()) }
//! ```

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::jwks::error_chain;
use crate::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_spiffe::spiffe_id::{SpiffeId, TrustDomain};

use crate::tls::{self, Authorizer, TlsError};
use crate::trace::TraceContext;
use crate::txn_token::JwksSource;
use crate::workload::X509Source;

/// Longest response body read from the service.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The service refused, with an RFC 6749 error code.
    #[error("{code} (HTTP {status}): {description}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The RFC 6749 `error` code, e.g. `invalid_scope`.
        code: String,
        /// The `error_description`.
        description: String,
        /// How long the service asked the caller to wait before trying again: its
        /// `Retry-After` in seconds (on 429 and 503), at most [`MAX_RETRY_AFTER`]; `None`
        /// when absent or not a number of seconds (an HTTP-date is not read).
        retry_after: Option<Duration>,
    },
    /// The service could not be reached or the TLS handshake failed.
    #[error("cannot reach the token service: {0}")]
    Transport(String),
    /// The service answered something that is not an RFC 8693 response.
    #[error("malformed token service response: {0}")]
    Response(String),
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl ExchangeError {
    /// The RFC 6749 error code, when the service refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// How long to wait before retrying, when the service said (`Retry-After` on a 429
    /// rate limit or a 503 shed): a caller that waits this long instead of retrying at
    /// once is what lets a service under overload recover.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The longest `Retry-After` the client reports; a longer one is cut to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A `Retry-After` of delay-seconds (RFC 9110 section 10.2.3), at most
/// [`MAX_RETRY_AFTER`]; `None` for anything else.
fn retry_after(value: &[u8]) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.len() > 10 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds: u64 = text.parse().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// What to exchange.
#[derive(Debug, Clone)]
pub struct TxnRequest {
    subject_token: String,
    subject_token_type: TokenType,
    scope: Option<String>,
    request_details: Option<Value>,
    request_context: Option<Value>,
    trace: Option<TraceContext>,
}

impl TxnRequest {
    /// Exchanges `token` of RFC 8693 type `token_type`.
    pub fn new(token: impl Into<String>, token_type: TokenType) -> Self {
        Self {
            subject_token: token.into(),
            subject_token_type: token_type,
            scope: None,
            request_details: None,
            request_context: None,
            trace: None,
        }
    }

    /// Exchanges an OAuth access token.
    pub fn access_token(token: impl Into<String>) -> Self {
        Self::new(token, TokenType::AccessToken)
    }

    /// Replaces a Txn-Token.
    pub fn txn_token(token: impl Into<String>) -> Self {
        Self::new(token, TokenType::TxnToken)
    }

    /// Asks for these space-separated scopes (default: the subject token's `scope`,
    /// read from it without verification and sent, since draft-ietf-oauth-transaction-tokens-11
    /// requires `scope` in every request).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Transaction details, which become the token's `tctx`.
    pub fn request_details(mut self, details: Value) -> Self {
        self.request_details = Some(details);
        self
    }

    /// Request context, added to the token's `rctx`.
    pub fn request_context(mut self, context: Value) -> Self {
        self.request_context = Some(context);
        self
    }

    /// Sends `trace` (`traceparent`, and `tracestate` if any) with the request, so the
    /// token service's work joins the caller's trace. Pass the context of this hop's
    /// outgoing call, usually `incoming.child()`.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }
}

/// A successful RFC 8693 response.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Issued {
    /// The Txn-Token.
    pub access_token: String,
    /// `urn:ietf:params:oauth:token-type:txn_token`.
    pub issued_token_type: String,
    /// `N_A`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: i64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// A client of one transaction token service.
#[derive(Debug, Clone)]
pub struct TxnClient {
    http: reqwest::Client,
    base_url: String,
    /// `<base_url>/token`, parsed once (a URL that does not parse is kept as text: the
    /// exchange then reports reqwest's error for it).
    token_url: Result<reqwest::Url, String>,
    audience: String,
}

/// Builds a [`TxnClient`]: name the service's SPIFFE ID with
/// [`TxnClientBuilder::tts_id`], or, knowingly, accept more through
/// [`TxnClientBuilder::dangerous`].
#[derive(Debug)]
pub struct TxnClientBuilder<'a> {
    source: &'a X509Source,
    base_url: String,
    http2: bool,
}

impl<'a> TxnClientBuilder<'a> {
    /// Offers HTTP/2 (ALPN `h2`): every exchange of this client and its clones shares
    /// one connection as concurrent streams, instead of one keep-alive HTTP/1.1
    /// connection per exchange in flight. `writ bench exchange --http2` measures both.
    #[must_use]
    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// A client that accepts only a server whose X509-SVID has `tts_id`.
    ///
    /// # Errors
    /// [`ExchangeError::Tls`] if the TLS configuration cannot be built.
    pub fn tts_id(self, tts_id: SpiffeId) -> Result<TxnClient, ExchangeError> {
        self.build(Authorizer::id(tts_id))
    }

    /// Options that weaken the check of the service's identity.
    pub fn dangerous(self) -> DangerousTxnClientBuilder<'a> {
        DangerousTxnClientBuilder { inner: self }
    }

    fn build(self, server: Authorizer) -> Result<TxnClient, ExchangeError> {
        let http = if self.http2 {
            tls::http2_client(self.source, server)?
        } else {
            tls::http_client(self.source, server)?
        };
        let base_url = self.base_url.trim_end_matches('/').to_owned();
        Ok(TxnClient {
            http,
            token_url: {
                let url = format!("{base_url}/token");
                reqwest::Url::parse(&url).map_err(|_| url)
            },
            base_url,
            audience: self.source.spiffe_id().trust_domain().to_string(),
        })
    }
}

/// **Dangerous**: a [`TxnClient`] that does not pin the service's SPIFFE ID. The
/// client sends user access tokens and Txn-Tokens to whichever server it accepts, so
/// any workload it accepts that can take the service's address (DNS, a moved port, a
/// compromised node) receives them and can replay them. Use
/// [`TxnClientBuilder::tts_id`] unless the service's ID really is unknown.
#[derive(Debug)]
pub struct DangerousTxnClientBuilder<'a> {
    inner: TxnClientBuilder<'a>,
}

impl DangerousTxnClientBuilder<'_> {
    /// **Dangerous**: accepts as the service any workload of `trust_domain` (any SVID
    /// that chains to its bundle), not only the token service.
    ///
    /// # Errors
    /// [`ExchangeError::Tls`] if the TLS configuration cannot be built.
    pub fn accept_any_member_of(
        self,
        trust_domain: TrustDomain,
    ) -> Result<TxnClient, ExchangeError> {
        self.inner.build(Authorizer::member_of(trust_domain))
    }

    /// **Dangerous**: accepts as the service any server `authorizer` accepts (e.g.
    /// several IDs during a migration). Prefer [`TxnClientBuilder::tts_id`].
    ///
    /// # Errors
    /// [`ExchangeError::Tls`] if the TLS configuration cannot be built.
    pub fn with_authorizer(self, authorizer: Authorizer) -> Result<TxnClient, ExchangeError> {
        self.inner.build(authorizer)
    }
}

impl TxnClient {
    /// A client of the service at `base_url` (e.g. `https://127.0.0.1:8443`) that
    /// accepts only a server whose X509-SVID has `tts_id`, and asks for tokens for the
    /// workload's own trust domain. Same as
    /// `TxnClient::builder(source, base_url).tts_id(tts_id)`.
    ///
    /// # Errors
    /// [`ExchangeError::Tls`] if the TLS configuration cannot be built.
    pub fn new(
        source: &X509Source,
        base_url: &str,
        tts_id: SpiffeId,
    ) -> Result<Self, ExchangeError> {
        Self::builder(source, base_url).tts_id(tts_id)
    }

    /// A builder for a client of the service at `base_url`; it is finished by naming the
    /// service's SPIFFE ID ([`TxnClientBuilder::tts_id`]) or, dangerously, by accepting
    /// more ([`TxnClientBuilder::dangerous`]).
    ///
    /// ```no_run
    /// # async fn demo(source: &writ_sdk::workload::X509Source) -> Result<(), Box<dyn std::error::Error>> {
    /// use writ_sdk::exchange::TxnClient;
    /// // Only when the token service's SPIFFE ID is not known: see the risks on
    /// // `DangerousTxnClientBuilder`.
    /// let client = TxnClient::builder(source, "https://127.0.0.1:8443")
    ///     .dangerous()
    ///     .accept_any_member_of("example.org".parse()?)?;
    /// # let _ = client; Ok(()) }
    /// ```
    pub fn builder<'a>(source: &'a X509Source, base_url: &str) -> TxnClientBuilder<'a> {
        TxnClientBuilder {
            source,
            base_url: base_url.to_owned(),
            http2: false,
        }
    }

    /// The mTLS client, for the token service's other endpoints (the audit sink).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The URL of `path` at the service.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// A sink that sends verification records to this token service over this client's
    /// mTLS (see [`crate::audit::TtsSink`]).
    ///
    /// # Errors
    /// [`crate::audit::SinkError::NoRuntime`] outside a Tokio runtime.
    pub fn audit_sink(&self) -> Result<crate::audit::TtsSink, crate::audit::SinkError> {
        crate::audit::TtsSink::new(self)
    }

    /// The service's revocation feed, followed over this client's mTLS with the default
    /// options (see [`crate::revocation`]); give it to
    /// [`TxnVerifierBuilder::revocations`](crate::txn_token::TxnVerifierBuilder::revocations).
    ///
    /// # Errors
    /// [`crate::revocation::RevocationFeedError::NoRuntime`] outside a Tokio runtime.
    pub fn revocation_feed(
        &self,
    ) -> Result<crate::revocation::RevocationFeed, crate::revocation::RevocationFeedError> {
        self.revocation_feed_builder().build()
    }

    /// Options for the service's revocation feed, over this client's mTLS.
    pub fn revocation_feed_builder(&self) -> crate::revocation::RevocationFeedBuilder {
        crate::revocation::RevocationFeed::builder(self.http.clone(), &self.base_url)
    }

    /// The service's JWKS (`/.well-known/jwks.json`), fetched over this client's mTLS,
    /// for a [`crate::txn_token::TxnVerifier`].
    pub fn jwks_source(&self) -> JwksSource {
        JwksSource::Url {
            url: format!("{}/.well-known/jwks.json", self.base_url),
            http: self.http.clone(),
        }
    }

    /// The `application/x-www-form-urlencoded` body [`TxnClient::exchange`] posts to
    /// the service's `/token` for `request` (RFC 8693 section 2.1), for a caller that
    /// sends it over an HTTP stack of its own (as `writ bench`'s load generator does).
    /// Without a scope in `request`, the subject token's own is asked for.
    ///
    /// ```no_run
    /// # fn demo(client: &writ_sdk::exchange::TxnClient) {
    /// use writ_sdk::exchange::TxnRequest;
    /// let body = client.form(&TxnRequest::access_token("eyJ...").scope("orders.read"));
    /// assert!(body.starts_with("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"));
    /// # }
    /// ```
    pub fn form(&self, request: &TxnRequest) -> String {
        let derived;
        let scope = match &request.scope {
            Some(scope) => Some(scope.as_str()),
            None => {
                derived = subject_scope(&request.subject_token, request.subject_token_type);
                derived.as_deref()
            }
        };
        let mut form = url::form_urlencoded::Serializer::new(String::with_capacity(
            request.subject_token.len() + 256,
        ));
        form.append_pair("grant_type", GRANT_TYPE_TOKEN_EXCHANGE)
            .append_pair("requested_token_type", TokenType::TxnToken.as_urn())
            .append_pair("audience", &self.audience)
            .append_pair("subject_token", &request.subject_token)
            .append_pair("subject_token_type", request.subject_token_type.as_urn());
        if let Some(scope) = scope {
            form.append_pair("scope", scope);
        }
        if let Some(details) = &request.request_details {
            form.append_pair("request_details", &details.to_string());
        }
        if let Some(context) = &request.request_context {
            form.append_pair("request_context", &context.to_string());
        }
        form.finish()
    }

    /// Exchanges `request.subject_token` for a Txn-Token.
    ///
    /// # Errors
    /// [`ExchangeError::Refused`] with the service's error code, or a transport error.
    pub async fn exchange(&self, request: TxnRequest) -> Result<Issued, ExchangeError> {
        let body = self.form(&request);
        let post = match &self.token_url {
            Ok(url) => self.http.post(url.clone()),
            Err(text) => self.http.post(text.as_str()),
        };
        let mut post = post.header("content-type", "application/x-www-form-urlencoded");
        // Without an explicit context, the current OpenTelemetry span's (feature `otel`).
        #[cfg(feature = "otel")]
        let trace = request.trace.or_else(TraceContext::current);
        #[cfg(not(feature = "otel"))]
        let trace = request.trace;
        for (name, value) in trace.iter().flat_map(TraceContext::headers) {
            post = post.header(name, value);
        }
        let response = post
            .body(body)
            .send()
            .await
            .map_err(|e| ExchangeError::Transport(error_chain(&e)))?;
        let status = response.status().as_u16();
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| retry_after(v.as_bytes()));
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ExchangeError::Transport(error_chain(&e)))?;
        if bytes.len() > MAX_RESPONSE_BYTES {
            return Err(ExchangeError::Response("response is too large".into()));
        }
        if status == 200 {
            return serde_json::from_slice(&bytes)
                .map_err(|e| ExchangeError::Response(e.to_string()));
        }
        let body: ErrorBody = serde_json::from_slice(&bytes)
            .map_err(|_| ExchangeError::Response(format!("HTTP {status} without an error")))?;
        Err(ExchangeError::Refused {
            status,
            code: body.error,
            description: body.error_description,
            retry_after: wait,
        })
    }

    /// Replaces `txn_token` with one that names this workload as the current actor,
    /// narrowed to `scope` when given.
    ///
    /// # Errors
    /// As [`TxnClient::exchange`].
    pub async fn replace(
        &self,
        txn_token: &str,
        scope: Option<&str>,
    ) -> Result<Issued, ExchangeError> {
        let mut request = TxnRequest::txn_token(txn_token);
        if let Some(scope) = scope {
            request = request.scope(scope);
        }
        self.exchange(request).await
    }
}

// `TxnClient::exchange` futures can be spawned on a multi-threaded runtime: checked at
// compile time (the closure is type-checked, never run).
const _: fn(&TxnClient) = |client| {
    fn send<T: Send>(_: T) {}
    send(client.exchange(TxnRequest::access_token(String::new())));
};

/// The `scope` a subject token carries (a space-separated string or an array of
/// strings), read without verification: what a request asks for when the caller names no
/// scope. `None` when the token has none (the service then refuses the request).
fn subject_scope(token: &str, kind: TokenType) -> Option<String> {
    if token.len() > 16 * 1024 {
        return None;
    }
    let claims: Value = match kind {
        TokenType::UnsignedJson => serde_json::from_str(token).ok()?,
        _ => jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?,
    };
    let scope = match claims.get("scope")? {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    (!scope.trim().is_empty()).then_some(scope)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_as_seconds_and_garbage_is_ignored() {
        assert_eq!(retry_after(b"1"), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(b" 30 "), Some(Duration::from_secs(30)));
        assert_eq!(retry_after(b"0"), Some(Duration::ZERO));
        assert_eq!(retry_after(b"9999999999"), Some(MAX_RETRY_AFTER));
        for garbage in [
            &b""[..],
            b"-1",
            b"1.5",
            b"+3",
            b"soon",
            b"Wed, 21 Oct 2015 07:28:00 GMT",
            b"99999999999999999999",
            b"\xff\xfe",
        ] {
            assert_eq!(retry_after(garbage), None, "{garbage:?}");
        }
        let shed = ExchangeError::Refused {
            status: 503,
            code: "temporarily_unavailable".into(),
            description: String::new(),
            retry_after: Some(Duration::from_secs(1)),
        };
        assert_eq!(shed.retry_after(), Some(Duration::from_secs(1)));
        assert_eq!(ExchangeError::Transport("down".into()).retry_after(), None);
    }

    #[test]
    fn a_request_without_scope_asks_for_the_subject_tokens() {
        // header.payload.signature (base64url of {"alg":"ES256"} and the claims); the
        // signature is not checked here.
        let jwt = |payload: &str| {
            let p = match payload {
                r#"{"scope":"a b"}"# => "eyJzY29wZSI6ImEgYiJ9",
                r#"{"scope":["a","b"]}"# => "eyJzY29wZSI6WyJhIiwiYiJdfQ",
                _ => "eyJzdWIiOiJ4In0",
            };
            format!("eyJhbGciOiJFUzI1NiJ9.{p}.c2ln")
        };
        assert_eq!(
            subject_scope(&jwt(r#"{"scope":"a b"}"#), TokenType::TxnToken).as_deref(),
            Some("a b")
        );
        assert_eq!(
            subject_scope(&jwt(r#"{"scope":["a","b"]}"#), TokenType::AccessToken).as_deref(),
            Some("a b")
        );
        assert_eq!(subject_scope(&jwt(r#"{"sub":"x"}"#), TokenType::Jwt), None);
        assert_eq!(
            subject_scope(r#"{"sub":"alice","scope":"r"}"#, TokenType::UnsignedJson).as_deref(),
            Some("r")
        );
        for garbage in ["", "..", "not a token", "{", "a.b.c", &"x".repeat(20_000)] {
            assert_eq!(subject_scope(garbage, TokenType::AccessToken), None);
            assert_eq!(subject_scope(garbage, TokenType::UnsignedJson), None);
        }
    }
}
