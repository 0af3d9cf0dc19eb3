//! Issuance policy: which workloads may ask the transaction token service for a
//! Txn-Token, with which subject tokens, for which scopes and for how long.
//!
//! The policy is TOML. It is parsed into the raw [`FilePolicy`] (serde, unknown fields
//! refused) and turned into the validated [`Policy`] by `TryFrom`; only [`Policy`] is used
//! by the exchange.
//!
//! ```toml
//! # Optional ceiling for every rule's `max_lifetime` (default 15m, at most 1h).
//! max_lifetime = "15m"
//!
//! [[caller]]
//! id = "spiffe://example.org/gateway"          # exact SPIFFE ID
//! subject_token_types = ["access_token", "id_token"]
//! max_scope = ["orders.read", "orders.write"]
//! max_lifetime = "5m"                          # default 5m
//! rate_limit = { per_second = 50, burst = 100 } # default: none
//!
//! [[caller]]
//! prefix = "spiffe://example.org/agents/"      # this path and everything below it
//! subject_token_types = ["txn_token"]
//! max_scope = ["orders.read"]
//! client_assertion = true   # may authenticate with a JWT-SVID (behind a TLS proxy)
//!
//! [[caller]]
//! trust_domain = "example.org"                 # any workload of the trust domain
//! subject_token_types = ["txn_token"]
//! max_scope = ["orders.read"]
//!
//! [[caller]]
//! id = "spiffe://example.org/batch"            # named by `id` or `prefix` only
//! subject_token_types = ["unsigned_json", "self_signed"]
//! max_scope = ["reports.run"]
//! # the keys its self-signed JWTs verify with (a JWKS, EC P-256 or Ed25519, each with `kid`)
//! self_signed_jwks = '{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"...","y":"..."}]}'
//! ```
//!
//! Semantics:
//! - **deny by default**: a caller that no rule matches may not exchange anything;
//! - **first match wins**: rules are tried in file order and the first whose matcher
//!   accepts the caller decides, even if a later rule would be more generous, so put
//!   exact IDs before prefixes and prefixes before trust domains;
//! - a rule with a `condition` (a CEL expression, see [`condition`]) applies only when
//!   the condition holds for the exchange at hand; when it is false the next matching
//!   rule is tried, when it cannot be evaluated (or is not a bool) the exchange is
//!   refused. `rate_limit` and `client_assertion` are those of the first rule whose
//!   matcher accepts the caller, conditions aside;
//! - a `prefix` matches at a path-segment boundary: `spiffe://example.org/agents/` (the
//!   trailing `/` is optional) matches `.../agents` and `.../agents/planner`, never
//!   `.../agents-evil`;
//! - the granted scope is the requested scope ∩ `max_scope` ∩ the subject token's scope;
//! - `unsigned_json` and `self_signed` subject tokens (draft-ietf-oauth-transaction-tokens-11)
//!   are accepted only from callers a rule names by `id` or `prefix`; a rule naming
//!   `self_signed` must give `self_signed_jwks`, and one naming `unsigned_json` refuses
//!   callers that authenticated with a client assertion (only mTLS callers).
//!
//! ```
//! use writ_identity::spiffe_id::SpiffeId;
//! use writ_sdk::oauth::TokenType;
//! use writ_txn_service::policy::Policy;
//!
//! let policy = Policy::from_toml(r#"
//!     [[caller]]
//!     prefix = "spiffe://example.org/agents/"
//!     subject_token_types = ["txn_token"]
//!     max_scope = ["orders.read"]
//! "#).unwrap();
//! let caller = SpiffeId::new("spiffe://example.org/agents/planner").unwrap();
//! let rule = policy.rule_for(&caller).unwrap();
//! assert!(rule.allows(TokenType::TxnToken));
//! assert!(!rule.allows(TokenType::AccessToken));
//! ```

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;
use writ_identity::duration::ConfigDuration;
use writ_identity::server::config::toml_error_line;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_sdk::oauth::TokenType;

use crate::rate_limit::Rate;

pub mod condition;

use condition::{Condition, ConditionError};

/// A rule's token lifetime when it names none (5 minutes).
pub const DEFAULT_RULE_LIFETIME: Duration = Duration::from_secs(300);
/// The policy-wide lifetime ceiling when the file names none (15 minutes).
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(900);
/// The largest policy-wide lifetime ceiling a file may set (1 hour).
pub const HARD_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// Why a policy file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file is not valid TOML or does not have the expected shape.
    #[error("policy is not valid TOML: {0}")]
    Syntax(String),
    /// A rule has no matcher, or more than one of `id`, `prefix`, `trust_domain`.
    #[error("caller rule {index}: exactly one of `id`, `prefix`, `trust_domain` is required")]
    Matcher {
        /// Position of the rule in the file (from 0).
        index: usize,
    },
    /// A matcher is not a valid SPIFFE ID or trust domain.
    #[error("caller rule {index}: invalid {field}: {reason}")]
    Identity {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// `id`, `prefix` or `trust_domain`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A subject token type is unknown.
    #[error("caller rule {index}: unknown subject token type `{name}`")]
    UnknownTokenType {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// The name as written.
        name: String,
    },
    /// A subject token type is not allowed for this rule: `unsigned_json` or
    /// `self_signed` for a `trust_domain` rule.
    #[error("caller rule {index}: subject token type `{name}` is not supported")]
    UnsupportedTokenType {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// The name as written.
        name: String,
    },
    /// `self_signed_jwks` is missing, malformed, or given without `self_signed`.
    #[error("caller rule {index}: {reason}")]
    SelfSignedKeys {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A rule allows no subject token type.
    #[error("caller rule {index}: `subject_token_types` must not be empty")]
    NoTokenTypes {
        /// Position of the rule in the file (from 0).
        index: usize,
    },
    /// A `max_scope` entry is not an RFC 6749 scope token, or the list is empty.
    #[error("caller rule {index}: invalid `max_scope`: {reason}")]
    Scope {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A rate limit is not positive.
    #[error("caller rule {index}: `rate_limit` needs per_second > 0 and burst >= 1")]
    RateLimit {
        /// Position of the rule in the file (from 0).
        index: usize,
    },
    /// A rule's `condition` does not compile, names an unknown variable or function,
    /// cannot be a bool, or is over a limit.
    #[error("caller rule {index}: {error}")]
    Condition {
        /// Position of the rule in the file (from 0).
        index: usize,
        /// What is wrong.
        error: ConditionError,
    },
    /// A lifetime is zero or exceeds its ceiling. (A text that is not a duration at all
    /// is a [`PolicyError::Syntax`] naming the key.)
    #[error("invalid lifetime `{value}`: {reason}")]
    Lifetime {
        /// The value, in the canonical duration form.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// The raw policy file, as serde reads it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePolicy {
    /// Ceiling for every rule's lifetime (a duration such as `15m`).
    #[serde(default)]
    pub max_lifetime: Option<ConfigDuration>,
    /// The caller rules, in order.
    #[serde(default)]
    pub caller: Vec<FileCallerRule>,
}

/// One raw `[[caller]]` rule.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCallerRule {
    /// Exact SPIFFE ID.
    #[serde(default)]
    pub id: Option<String>,
    /// SPIFFE ID path prefix (segment boundary).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Trust domain name.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Allowed subject token types (`access_token`, `id_token`, `jwt`, `txn_token`,
    /// `self_signed`, `unsigned_json`).
    #[serde(default)]
    pub subject_token_types: Vec<String>,
    /// The JWKS (JSON text) that `self_signed` subject tokens of this rule's callers
    /// verify with.
    #[serde(default)]
    pub self_signed_jwks: Option<String>,
    /// Scope ceiling.
    #[serde(default)]
    pub max_scope: Vec<String>,
    /// Longest token lifetime (a duration, default `5m`).
    #[serde(default)]
    pub max_lifetime: Option<ConfigDuration>,
    /// Whether the caller may authenticate with a JWT-SVID client assertion instead of
    /// its X509-SVID (for callers behind a TLS-terminating proxy). Default: no.
    #[serde(default)]
    pub client_assertion: bool,
    /// Per-caller rate limit; none by default.
    #[serde(default)]
    pub rate_limit: Option<FileRateLimit>,
    /// A CEL expression that must be true for the rule to apply (see [`condition`]).
    #[serde(default)]
    pub condition: Option<String>,
}

/// A raw `rate_limit = { per_second = .., burst = .. }` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    /// Sustained requests per second (> 0).
    pub per_second: f64,
    /// Requests allowed at once (default: `per_second` rounded up, at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Which callers a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallerMatcher {
    /// Exactly this SPIFFE ID.
    Id(SpiffeId),
    /// This SPIFFE ID or any ID below it (segment boundary).
    Prefix(SpiffeId),
    /// Any SPIFFE ID of this trust domain.
    TrustDomain(TrustDomain),
}

impl CallerMatcher {
    /// Whether `caller` is matched.
    pub fn matches(&self, caller: &SpiffeId) -> bool {
        match self {
            Self::Id(id) => caller == id,
            Self::Prefix(prefix) => caller.is_under(prefix),
            Self::TrustDomain(td) => caller.trust_domain_str() == td.as_str(),
        }
    }
}

/// A validated caller rule.
#[derive(Debug, Clone, PartialEq)]
pub struct CallerRule {
    matcher: CallerMatcher,
    token_types: BTreeSet<TokenType>,
    max_scope: BTreeSet<String>,
    max_lifetime: Duration,
    client_assertion: bool,
    rate_limit: Option<Rate>,
    self_signed_keys: Option<crate::subject::SelfSignedKeys>,
    condition: Option<Condition>,
}

impl CallerRule {
    /// The rule's CEL condition, if any: the rule applies only when it holds.
    pub fn condition(&self) -> Option<&Condition> {
        self.condition.as_ref()
    }

    /// The keys `self_signed` subject tokens verify with, if the rule accepts them.
    pub fn self_signed_keys(&self) -> Option<&crate::subject::SelfSignedKeys> {
        self.self_signed_keys.as_ref()
    }

    /// Whether the caller may authenticate with a JWT-SVID client assertion.
    pub fn client_assertion(&self) -> bool {
        self.client_assertion
    }

    /// The caller's rate limit, if any.
    pub fn rate_limit(&self) -> Option<Rate> {
        self.rate_limit
    }

    /// Which callers the rule applies to.
    pub fn matcher(&self) -> &CallerMatcher {
        &self.matcher
    }

    /// Whether the rule lets its callers present subject tokens of `kind`.
    pub fn allows(&self, kind: TokenType) -> bool {
        self.token_types.contains(&kind)
    }

    /// The scope ceiling.
    pub fn max_scope(&self) -> &BTreeSet<String> {
        &self.max_scope
    }

    /// The longest lifetime of a token issued under this rule.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }
}

/// A validated issuance policy. Deny by default; the first matching rule wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    rules: Vec<CallerRule>,
    max_lifetime: Duration,
}

impl Policy {
    /// Parses and validates a TOML policy.
    ///
    /// # Errors
    /// [`PolicyError`] for the first problem found.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let file: FilePolicy = toml::from_str(text).map_err(|e| {
            PolicyError::Syntax(toml_error_line(&e).unwrap_or_else(|| e.message().to_owned()))
        })?;
        Self::try_from(file)
    }

    /// The first rule that matches `caller`, or `None`: the caller may not exchange.
    pub fn rule_for(&self, caller: &SpiffeId) -> Option<&CallerRule> {
        self.rules.iter().find(|r| r.matcher.matches(caller))
    }

    /// The rules that may decide for `caller`, with their positions: those whose matcher
    /// accepts it, in order, up to the first without a condition. The exchange takes
    /// the first whose condition holds.
    pub fn candidates<'a>(
        &'a self,
        caller: &SpiffeId,
    ) -> impl Iterator<Item = (usize, &'a CallerRule)> {
        let mut done = false;
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matcher.matches(caller))
            .take_while(move |(_, r)| {
                let take = !done;
                done = r.condition.is_none();
                take
            })
    }

    /// Whether any rule has a condition.
    pub fn has_conditions(&self) -> bool {
        self.rules.iter().any(|r| r.condition.is_some())
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[CallerRule] {
        &self.rules
    }

    /// The policy-wide lifetime ceiling.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }
}

impl TryFrom<FilePolicy> for Policy {
    type Error = PolicyError;

    fn try_from(file: FilePolicy) -> Result<Self, PolicyError> {
        let max_lifetime = match file.max_lifetime {
            None => DEFAULT_MAX_LIFETIME,
            Some(d) => check_lifetime(d, HARD_MAX_LIFETIME)?,
        };
        let rules = file
            .caller
            .into_iter()
            .enumerate()
            .map(|(index, rule)| validate_rule(index, rule, max_lifetime))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rules,
            max_lifetime,
        })
    }
}

fn validate_rule(
    index: usize,
    rule: FileCallerRule,
    ceiling: Duration,
) -> Result<CallerRule, PolicyError> {
    let identity = |field: &'static str, reason: String| PolicyError::Identity {
        index,
        field,
        reason,
    };
    let matcher = match (rule.id, rule.prefix, rule.trust_domain) {
        (Some(id), None, None) => {
            CallerMatcher::Id(SpiffeId::new(&id).map_err(|e| identity("id", e.to_string()))?)
        }
        (None, Some(prefix), None) => {
            let trimmed = prefix.strip_suffix('/').unwrap_or(&prefix);
            CallerMatcher::Prefix(
                SpiffeId::new(trimmed).map_err(|e| identity("prefix", e.to_string()))?,
            )
        }
        (None, None, Some(td)) => CallerMatcher::TrustDomain(
            TrustDomain::new(&td).map_err(|e| identity("trust_domain", e.to_string()))?,
        ),
        _ => return Err(PolicyError::Matcher { index }),
    };
    let mut token_types = BTreeSet::new();
    for name in rule.subject_token_types {
        match TokenType::from_name(&name) {
            Some(kind) => {
                token_types.insert(kind);
            }
            None => return Err(PolicyError::UnknownTokenType { index, name }),
        }
    }
    if token_types.is_empty() {
        return Err(PolicyError::NoTokenTypes { index });
    }
    let self_signed_keys =
        check_workload_subjects(index, &matcher, &token_types, rule.self_signed_jwks)?;
    if rule.max_scope.is_empty() {
        return Err(PolicyError::Scope {
            index,
            reason: "must not be empty".into(),
        });
    }
    let mut max_scope = BTreeSet::new();
    for scope in rule.max_scope {
        if !is_scope_token(&scope) {
            return Err(PolicyError::Scope {
                index,
                reason: format!("`{scope}` is not a scope token"),
            });
        }
        max_scope.insert(scope);
    }
    let max_lifetime = match rule.max_lifetime {
        None => DEFAULT_RULE_LIFETIME.min(ceiling),
        Some(d) => check_lifetime(d, ceiling)?,
    };
    let rate_limit = match rule.rate_limit {
        None => None,
        Some(r) if r.per_second.is_finite() && r.per_second > 0.0 && r.burst != Some(0) => {
            Some(Rate {
                per_second: r.per_second,
                burst: r.burst.unwrap_or_else(|| {
                    // Saturating float-to-int cast of a positive finite number.
                    let b = r.per_second.ceil().min(f64::from(u32::MAX)) as u32;
                    b.max(1)
                }),
            })
        }
        Some(_) => return Err(PolicyError::RateLimit { index }),
    };
    let condition = rule
        .condition
        .as_deref()
        .map(Condition::new)
        .transpose()
        .map_err(|error| PolicyError::Condition { index, error })?;
    Ok(CallerRule {
        matcher,
        token_types,
        max_scope,
        max_lifetime,
        client_assertion: rule.client_assertion,
        rate_limit,
        self_signed_keys,
        condition,
    })
}

/// `self_signed` and `unsigned_json` subject tokens carry a subject the caller itself
/// asserts: only for callers a rule names (`id` or `prefix`), and `self_signed` only
/// with the keys its tokens verify with.
fn check_workload_subjects(
    index: usize,
    matcher: &CallerMatcher,
    token_types: &BTreeSet<TokenType>,
    jwks: Option<String>,
) -> Result<Option<crate::subject::SelfSignedKeys>, PolicyError> {
    let workload_asserted = [TokenType::SelfSigned, TokenType::UnsignedJson]
        .into_iter()
        .find(|t| token_types.contains(t));
    if let (Some(kind), CallerMatcher::TrustDomain(_)) = (workload_asserted, matcher) {
        return Err(PolicyError::UnsupportedTokenType {
            index,
            name: format!(
                "{} (only for callers named by `id` or `prefix`, not a whole trust domain)",
                kind.name()
            ),
        });
    }
    match (token_types.contains(&TokenType::SelfSigned), jwks) {
        (true, Some(text)) => crate::subject::SelfSignedKeys::parse(&text)
            .map(Some)
            .map_err(|reason| PolicyError::SelfSignedKeys { index, reason }),
        (true, None) => Err(PolicyError::SelfSignedKeys {
            index,
            reason: "a rule accepting `self_signed` needs `self_signed_jwks`".into(),
        }),
        (false, Some(_)) => Err(PolicyError::SelfSignedKeys {
            index,
            reason: "`self_signed_jwks` is only for a rule accepting `self_signed`".into(),
        }),
        (false, None) => Ok(None),
    }
}

fn check_lifetime(value: ConfigDuration, ceiling: Duration) -> Result<Duration, PolicyError> {
    let err = |reason: String| PolicyError::Lifetime {
        value: value.to_string(),
        reason,
    };
    let d = value.get();
    if d.as_secs() == 0 {
        return Err(err("must be at least one second".into()));
    }
    if d > ceiling {
        return Err(err(format!(
            "exceeds the ceiling of {}",
            ConfigDuration::new(ceiling)
        )));
    }
    Ok(d)
}

/// Whether `s` is an RFC 6749 section 3.3 scope token (`%x21 / %x23-5B / %x5D-7E`, at
/// least one character).
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    const GOOD: &str = r#"
        max_lifetime = "10m"
        [[caller]]
        id = "spiffe://example.org/gateway"
        subject_token_types = ["access_token", "id_token"]
        max_scope = ["orders.read", "orders.write"]
        max_lifetime = "2m"
        [[caller]]
        prefix = "spiffe://example.org/agents/"
        subject_token_types = ["txn_token"]
        max_scope = ["orders.read"]
        [[caller]]
        trust_domain = "example.org"
        subject_token_types = ["jwt"]
        max_scope = ["x"]
    "#;

    #[test]
    fn parses_and_matches_first_rule() {
        let p = Policy::from_toml(GOOD).unwrap();
        assert_eq!(p.max_lifetime(), Duration::from_secs(600));
        let gw = p.rule_for(&id("spiffe://example.org/gateway")).unwrap();
        assert!(gw.allows(TokenType::AccessToken));
        assert!(!gw.allows(TokenType::TxnToken));
        assert_eq!(gw.max_lifetime(), Duration::from_secs(120));
        let agent = p.rule_for(&id("spiffe://example.org/agents/a/b")).unwrap();
        assert!(agent.allows(TokenType::TxnToken));
        assert_eq!(agent.max_lifetime(), DEFAULT_RULE_LIFETIME);
        assert!(p.rule_for(&id("spiffe://example.org/agents")).is_some());
        // Segment boundary: falls through to the trust-domain rule.
        let evil = p.rule_for(&id("spiffe://example.org/agents-evil")).unwrap();
        assert!(evil.allows(TokenType::Jwt));
        assert!(!evil.allows(TokenType::TxnToken));
        assert!(p.rule_for(&id("spiffe://other.org/gateway")).is_none());
    }

    #[test]
    fn lifetimes_take_the_one_duration_syntax() {
        let p = Policy::from_toml(
            "max_lifetime = 900\n[[caller]]\nid = \"spiffe://example.org/a\"\n\
             subject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]\nmax_lifetime = \"90\"",
        )
        .unwrap();
        assert_eq!(p.max_lifetime(), Duration::from_secs(900));
        assert_eq!(p.rules()[0].max_lifetime(), Duration::from_secs(90));
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = Policy::from_toml("").unwrap();
        assert!(p.rule_for(&id("spiffe://example.org/gateway")).is_none());
    }

    #[test]
    fn refuses_bad_files() {
        let rule = |body: &str| format!("[[caller]]\n{body}\n");
        type Check = fn(&PolicyError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("not toml [".into(), |e| matches!(e, PolicyError::Syntax(_))),
            ("surprise = 1".into(), |e| {
                matches!(e, PolicyError::Syntax(_))
            }),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]\nextra = 1",
                ),
                |e| matches!(e, PolicyError::Syntax(_)),
            ),
            (
                rule("subject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]"),
                |e| matches!(e, PolicyError::Matcher { index: 0 }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\ntrust_domain = \"example.org\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::Matcher { .. }),
            ),
            (
                rule(
                    "id = \"https://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::Identity { field: "id", .. }),
            ),
            (
                rule(
                    "trust_domain = \"Bad Domain\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]",
                ),
                |e| {
                    matches!(
                        e,
                        PolicyError::Identity {
                            field: "trust_domain",
                            ..
                        }
                    )
                },
            ),
            (
                rule(
                    "trust_domain = \"example.org\"\nsubject_token_types = [\"unsigned_json\"]\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::UnsupportedTokenType { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"self_signed\"]\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::SelfSignedKeys { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"self_signed\"]\nmax_scope = [\"a\"]\nself_signed_jwks = \"{]\"",
                ),
                |e| matches!(e, PolicyError::SelfSignedKeys { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]\nself_signed_jwks = \"{}\"",
                ),
                |e| matches!(e, PolicyError::SelfSignedKeys { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"saml2\"]\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::UnknownTokenType { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = []\nmax_scope = [\"a\"]",
                ),
                |e| matches!(e, PolicyError::NoTokenTypes { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = []",
                ),
                |e| matches!(e, PolicyError::Scope { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a b\"]",
                ),
                |e| matches!(e, PolicyError::Scope { .. }),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]\nmax_lifetime = \"soon\"",
                ),
                |e| matches!(e, PolicyError::Syntax(m) if m.contains("caller.max_lifetime")),
            ),
            (
                rule(
                    "id = \"spiffe://example.org/a\"\nsubject_token_types = [\"jwt\"]\nmax_scope = [\"a\"]\nmax_lifetime = \"20m\"",
                ),
                |e| matches!(e, PolicyError::Lifetime { .. }),
            ),
            ("max_lifetime = \"2h\"".into(), |e| {
                matches!(e, PolicyError::Lifetime { .. })
            }),
            ("max_lifetime = \"0s\"".into(), |e| {
                matches!(e, PolicyError::Lifetime { .. })
            }),
        ];
        for (text, check) in cases {
            let err = Policy::from_toml(&text).unwrap_err();
            assert!(check(&err), "{text:?} gave {err:?}");
        }
    }
}
