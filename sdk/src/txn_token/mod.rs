//! Transaction tokens (draft-ietf-oauth-transaction-tokens-11): the claims type that the
//! transaction token service mints and that services verify, so both share one
//! definition, and an offline verifier over a JWKS.
//!
//! A Txn-Token is a JWT with header `typ: txntoken+jwt` and `kid`, carried in the HTTP
//! header `Txn-Token`. Claims: `iss`, `iat`, `exp`, `aud` (the trust domain), `txn`
//! (unique per transaction), `sub` (the user), `scope`, `req_wl` (the requesting
//! workload's SPIFFE ID, a single string), `tctx`, `rctx`, and `act`, the RFC 8693
//! delegation chain with the current actor outermost. Each actor the service adds also
//! carries `iss` (the namespace authority of its `sub`: `spiffe://<trust domain>`) and
//! `sub_profile` (`service`, or `ai_agent` for a sub-agent), the shape of
//! draft-mcguinness-oauth-actor-profile-00.
//!
//! ```
//! use writ_sdk::txn_token::{Actor, TxnToken};
//! let token = TxnToken {
//!     iss: "https://tts.example.org".into(),
//!     iat: 1_800_000_000,
//!     exp: 1_800_000_300,
//!     aud: "example.org".into(),
//!     txn: "5b1b0c7e-0000-4000-8000-000000000000".into(),
//!     sub: "alice@idp.example".into(),
//!     scope: "orders.read orders.write".into(),
//!     req_wl: "spiffe://example.org/gateway".into(),
//!     tctx: None,
//!     rctx: None,
//!     act: Some(Actor::new("spiffe://example.org/agents/sub").acting_for(
//!         Actor::new("spiffe://example.org/agents/planner"),
//!     )),
//! };
//! assert_eq!(token.current_actor(), Some("spiffe://example.org/agents/sub"));
//! assert_eq!(token.chain(), vec!["spiffe://example.org/agents/sub", "spiffe://example.org/agents/planner"]);
//! assert!(token.has_scope("orders.read"));
//! ```

use std::collections::BTreeMap;

use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

mod jwks;
mod verifier;

pub use jwks::{Jwks, JwksError, JwksSource, MAX_JWKS_BYTES, MAX_JWKS_KEYS};
pub use verifier::{
    DEFAULT_CACHE_CAPACITY, DEFAULT_KEYS_MAX_AGE, DEFAULT_REFETCH_INTERVAL, TxnVerifier,
    TxnVerifierBuilder,
};

/// How [`TxnVerifier`] checks `exp`, `nbf` and `iat`.
pub const TIME_WINDOW: writ_spiffe::numeric_date::TimeWindow =
    writ_spiffe::numeric_date::TimeWindow::new(std::time::Duration::from_secs(30), MAX_LIFETIME);

/// The JWT `typ` of a Txn-Token.
pub const TXN_TOKEN_TYP: &str = "txntoken+jwt";
/// The HTTP header that carries a Txn-Token.
pub const HEADER: &str = "Txn-Token";
/// Largest Txn-Token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 32 * 1024;
/// Deepest `act` chain accepted.
pub const MAX_CHAIN_DEPTH: usize = 16;
/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECS: i64 = 30;
/// Furthest ahead of now a Txn-Token's `exp` may be (1 hour, the longest lifetime the
/// service issues): a later `exp` is refused, and no verified token is cached longer.
pub const MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3600);
/// Algorithms a Txn-Token may be signed with.
pub const ALGORITHMS: &[Algorithm] = &[Algorithm::ES256, Algorithm::EdDSA];

/// One actor of the RFC 8693 `act` chain: who acts, and for whom (`act` inside).
///
/// `iss` and `sub_profile` follow draft-mcguinness-oauth-actor-profile-00 (section 4.3:
/// the namespace authority of `sub`, and the entity profile of the actor); both are
/// optional here so tokens minted before they were added still verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor (a SPIFFE ID for Writ workloads).
    pub sub: String,
    /// The namespace authority of `sub` (`spiffe://<trust domain>` for a SPIFFE ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The actor's entity profile (`service`, `ai_agent`), space-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_profile: Option<String>,
    /// The actor this one acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// An actor acting for nobody further.
    pub fn new(sub: impl Into<String>) -> Self {
        Self {
            sub: sub.into(),
            iss: None,
            sub_profile: None,
            act: None,
        }
    }

    /// Names the namespace authority of `sub` (the actor profile's `act.iss`).
    pub fn with_iss(mut self, iss: impl Into<String>) -> Self {
        self.iss = Some(iss.into());
        self
    }

    /// Names the actor's entity profile (the actor profile's `act.sub_profile`).
    pub fn with_sub_profile(mut self, profile: impl Into<String>) -> Self {
        self.sub_profile = Some(profile.into());
        self
    }

    /// How many actors the chain holds, this one included.
    pub fn depth(&self) -> usize {
        let mut depth = 1;
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            depth += 1;
            next = a.act.as_deref();
        }
        depth
    }

    /// This actor, acting for `previous` (the chain so far).
    pub fn acting_for(mut self, previous: Actor) -> Self {
        self.act = Some(Box::new(previous));
        self
    }
}

/// The claims of a Txn-Token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnToken {
    /// The transaction token service.
    pub iss: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// The trust domain the token is valid in.
    pub aud: String,
    /// Unique transaction id (a UUID), kept across replacements.
    pub txn: String,
    /// The user the transaction is for, unique in the trust domain.
    pub sub: String,
    /// Space-separated scopes; replacements may only narrow it.
    pub scope: String,
    /// SPIFFE ID of the workload that requested the token.
    pub req_wl: String,
    /// Transaction context (from `request_details`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tctx: Option<BTreeMap<String, serde_json::Value>>,
    /// Request context filled by the service (caller IP, authentication, transport).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rctx: Option<BTreeMap<String, serde_json::Value>>,
    /// The delegation chain, current actor outermost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
}

impl TxnToken {
    /// The current (outermost) actor, if the token was delegated.
    pub fn current_actor(&self) -> Option<&str> {
        self.act.as_ref().map(|a| a.sub.as_str())
    }

    /// Every actor, current first.
    pub fn chain(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(actor) = next {
            out.push(actor.sub.as_str());
            next = actor.act.as_deref();
        }
        out
    }

    /// How many times this token's transaction was replaced: Writ records the first
    /// requester as the innermost actor at the first replacement and adds one actor at
    /// each, so it is the `act` depth minus one (0 without `act`). Derived from the signed
    /// chain, every replica of the service counts the same.
    pub fn replacements(&self) -> usize {
        self.act.as_ref().map_or(0, |a| a.depth().saturating_sub(1))
    }

    /// The scopes.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split_ascii_whitespace()
    }

    /// Whether `scope` is granted.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }
}

/// Why a Txn-Token was refused.
///
/// Every variant but [`TxnTokenError::Keys`] and [`TxnTokenError::RevocationsStale`] is
/// the token's fault; those two mean the verifier could not get the service's keys or
/// revocations, and the caller may retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxnTokenError {
    /// Larger than [`MAX_TOKEN_BYTES`].
    #[error("Txn-Token is larger than {max} bytes")]
    TooLarge {
        /// The limit.
        max: usize,
    },
    /// Not a well-formed JWS, or an algorithm this library does not know.
    #[error("Txn-Token is malformed: {0}")]
    Malformed(String),
    /// `typ` is not `txntoken+jwt`.
    #[error("token typ is not txntoken+jwt")]
    Type,
    /// The algorithm is not allowed.
    #[error("algorithm {0} is not allowed for Txn-Tokens")]
    Algorithm(String),
    /// No `kid`, or no key with that id.
    #[error("unknown signing key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature does not verify")]
    Signature,
    /// A required claim is missing or malformed.
    #[error("claims are missing or malformed: {0}")]
    Claims(String),
    /// `iss` is not the expected token service.
    #[error("token is from another issuer")]
    Issuer,
    /// The signing keys could not be loaded (the JWKS could not be fetched or parsed).
    #[error("signing keys unavailable: {0}")]
    Keys(String),
    /// `aud` is not the expected trust domain.
    #[error("token is for another trust domain")]
    Audience,
    /// Past `exp`.
    #[error("token has expired")]
    Expired,
    /// `iat` is in the future.
    #[error("token is issued in the future")]
    IssuedInFuture,
    /// `nbf` is in the future, `exp` is further ahead than [`MAX_LIFETIME`], or a time
    /// claim is not a sane NumericDate.
    #[error("{0}")]
    Time(writ_spiffe::numeric_date::TimeError),
    /// The `act` chain is not a well-formed RFC 8693 delegation chain: every level an
    /// object whose `sub` is a SPIFFE ID and whose `act`, if present, is such an object.
    #[error("delegation chain is malformed: {0}")]
    Actor(&'static str),
    /// The `act` chain is deeper than [`MAX_CHAIN_DEPTH`].
    #[error("delegation chain deeper than {max}")]
    ChainTooDeep {
        /// The limit.
        max: usize,
    },
    /// A revocation in force covers the token (its transaction, its user, or a workload
    /// of its chain) or the caller presenting it (see [`crate::revocation`]).
    #[error("Txn-Token is revoked: {0}")]
    Revoked(String),
    /// The verifier's revocation feed has not heard from the token service for longer
    /// than its `max_staleness`, so revocations cannot be checked (the caller may retry).
    #[error("revocations cannot be checked: the revocation feed is stale")]
    RevocationsStale,
}
