//! `txn.toml`, the transaction token service's configuration, and [`TxnServer`], the
//! running service built from it.
//!
//! ```toml
//! listen = "127.0.0.1:8443"              # HTTPS address
//! issuer = "https://127.0.0.1:8443"      # `iss` of issued tokens; default https://<listen>
//! workload_api = "unix:///tmp/writ/agent.sock"  # default: SPIFFE_ENDPOINT_SOCKET, then this
//! spiffe_id = "spiffe://example.org/tts"        # which SVID to present, if given several
//! data_dir = "./writ-txn"                # signing keys (0600)
//! audit_log = "./writ-txn/audit.log"     # default <data_dir>/audit.log; "-" (or no data_dir): stdout
//! audit_on_failure = "refuse"            # a grant that cannot be recorded is refused (503); or "allow"
//! audit_max_size = "100MiB"              # rotate at this size (0: never; then rotate it yourself)
//! audit_keep = 10                        # rotated files kept: audit.log.1 ... audit.log.10
//! audit_unauthenticated = { per_second = 1, burst = 20 }  # per source IP; the rest are counted
//! token_lifetime = "5m"                  # default lifetime (policy caps it)
//! max_chain_depth = 8
//! max_replacements = 7                  # times one transaction's Txn-Token may be replaced (0-16)
//! key_rotation = "24h"                   # old keys stay published until their tokens expire
//! subject_token_cache = true             # remember validated subject tokens until they expire
//! client_assertions = false              # accept JWT-SVID client assertions (policy per caller)
//! client_assertion_replay_protection = true  # each assertion once (needs `jti`); see docs
//! replica = "tts-a"                      # this replica's name (default: the host name)
//! dns_names = ["tts.example.org", "10.0.0.7"]  # names clients dial; the SVID must carry them
//! revocation_poll = "200ms"              # how often revocations are read from the identity store
//!
//! [audit]                               # the durable audit trail (needs [identity_store]; docs/audit.md)
//! durable = true                         # also write every decision to the store's hash-chained table
//! retention = "30d"                      # prune rows older than this (a checkpoint keeps `verify` working); default: keep all
//!
//! [identity_store]                       # the identity server's [datastore]: sub-agent
//! backend = "postgres"                   # leases, and the replicas' shared public keys
//! connection = "postgres://writ@db/writ"
//!
//! [connections]                          # limits of each HTTPS connection (these are the defaults)
//! handshake_timeout = "10s"
//! header_read_timeout = "10s"
//! body_read_timeout = "30s"
//! idle_timeout = "60s"
//! max_pending_handshakes = 256           # beyond it the oldest pending handshake gives way
//! max_connections_per_ip = 64            # handshaking or open, per client address (IPv6: /64)
//! # max_connections = 10000              # default: RLIMIT_NOFILE minus a reserve
//!
//! [overload]                             # admission of POST /token (`writ_txn_service::shed`)
//! # max_in_flight = 8                    # exchanges at once; default 4 x cores
//! # max_queue = 256                      # waiting for a slot; default 32 x max_in_flight
//! queue_timeout = "10ms"                 # then 503 + Retry-After: 1
//!
//! [[oidc]]
//! issuer = "https://idp.example.com"
//! audiences = ["writ"]
//! subject_claim = "sub"                  # default
//! scope_claim = "scope"                  # default
//! algorithms = ["RS256", "ES256"]        # default RS256, ES256, PS256, EdDSA; never none/HS*
//! leeway = "30s"
//! max_token_lifetime = "24h"             # refuse tokens whose `exp` is further ahead
//! access_token_typ = ["at+jwt"]          # default; add "JWT" for an issuer that types them so
//! allow_untyped_access_tokens = false    # accept access tokens without `typ`
//! ca_file = "idp-ca.pem"                 # TLS roots for discovery and JWKS (default: system)
//!
//! [policy]                               # see `writ_txn_service::policy`
//! max_lifetime = "15m"
//! [[policy.caller]]
//! id = "spiffe://example.org/gateway"
//! subject_token_types = ["access_token"]
//! max_scope = ["orders.read"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;
use writ_identity::clock::{SharedClock, SystemClock};
use writ_identity::duration::ConfigDuration;
use writ_identity::server::config::{Datastore, FileDatastore, toml_error_line};
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::workload::{WorkloadClient, WorkloadError, X509Source};

use crate::audit::durable::DurableAudit;
use crate::audit::{
    AuditLog, DEFAULT_KEEP, DEFAULT_MAX_SIZE, DEFAULT_UNAUTHENTICATED_RATE, OnFailure, Rotation,
    SUMMARY_INTERVAL,
};
use crate::exchange::{DEFAULT_LIFETIME, DEFAULT_MAX_CHAIN_DEPTH, ExchangeService};
use crate::lease::Leases;
use crate::listener::{self, ConnectionLimits, ServeError};
use crate::oidc::{IssuerConfig, OidcError, OidcOptions, OidcValidator};
use crate::policy::{FilePolicy, FileRateLimit, Policy, PolicyError};
use crate::rate_limit::Rate;
use crate::replica::{Replica, ReplicaError, ReplicaName};
use crate::server_name::{ServerNameError, ServerNames};
use crate::txn_token::{KeyRingError, SigningAlgorithm, SigningKeys};

/// Default HTTPS address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
/// Default signing key rotation period.
pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(24 * 3600);
/// Deepest chain a configuration may allow.
pub const MAX_CHAIN_DEPTH_LIMIT: usize = 16;
/// Name of the key ring file in `data_dir`.
pub const KEYS_FILE: &str = "signing-keys.json";

/// Why the service could not be configured or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxnConfigError {
    /// The TOML is malformed or has unknown fields.
    #[error("txn.toml: {0}")]
    Syntax(String),
    /// A value is out of range.
    #[error("txn.toml: {0}")]
    Invalid(String),
    /// The policy is invalid.
    #[error("txn.toml [policy]: {0}")]
    Policy(#[from] PolicyError),
    /// An OIDC issuer is invalid.
    #[error("txn.toml [[oidc]]: {0}")]
    Oidc(#[from] OidcError),
    /// The Workload API did not give the service its identity.
    #[error("workload identity: {0}")]
    Workload(#[from] WorkloadError),
    /// The signing keys could not be loaded or created.
    #[error(transparent)]
    Keys(#[from] KeyRingError),
    /// The listener could not start.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// `dns_names` is invalid, or the service's X509-SVID does not carry every name.
    #[error("txn.toml: {0}")]
    Names(#[from] ServerNameError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// `txn.toml` as serde reads it; every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnFileConfig {
    /// HTTPS address.
    pub listen: Option<String>,
    /// `iss` of issued tokens and base of the metadata URLs.
    pub issuer: Option<String>,
    /// Workload API endpoint.
    pub workload_api: Option<String>,
    /// The SVID to present when the agent issues several.
    pub spiffe_id: Option<String>,
    /// Where the signing keys live (none: keys live in memory only).
    pub data_dir: Option<PathBuf>,
    /// Audit log file, or `-` for standard output.
    pub audit_log: Option<String>,
    /// `refuse` (default) or `allow` an exchange whose grant cannot be recorded.
    pub audit_on_failure: Option<String>,
    /// Rotate the audit log file at this size (`100MiB`, `512KiB`, a number of bytes;
    /// 0: never).
    pub audit_max_size: Option<FileSize>,
    /// Rotated audit log files kept.
    pub audit_keep: Option<u32>,
    /// Rate of recorded unauthenticated refusals per source IP.
    pub audit_unauthenticated: Option<FileRateLimit>,
    /// Default token lifetime.
    pub token_lifetime: Option<ConfigDuration>,
    /// Deepest `act` chain.
    pub max_chain_depth: Option<usize>,
    /// Most replacements of one transaction's Txn-Token.
    pub max_replacements: Option<usize>,
    /// Signing key rotation period.
    pub key_rotation: Option<ConfigDuration>,
    /// The Txn-Token signing algorithm: `"ES256"` or `"EdDSA"`.
    pub signing_algorithm: Option<String>,
    /// Cache subject token validations.
    pub subject_token_cache: Option<bool>,
    /// Accept JWT-SVID client assertions.
    pub client_assertions: Option<bool>,
    /// Accept each client assertion once (by `jti`) within its lifetime (default true).
    pub client_assertion_replay_protection: Option<bool>,
    /// Trusted OpenID Providers.
    #[serde(default)]
    pub oidc: Vec<FileIssuer>,
    /// The identity server's store (`[identity_store]`, the same
    /// `backend`/`connection` as the server's `[datastore]`), read for sub-agent leases
    /// and shared with the other replicas for their public keys.
    pub identity_store: Option<FileDatastore>,
    /// This replica's name, recorded beside the keys it publishes (default: the host
    /// name).
    pub replica: Option<String>,
    /// The DNS names and IP addresses clients reach this service by: its X509-SVID
    /// must carry each (checked at start and at every rotation).
    pub dns_names: Option<Vec<String>>,
    /// The issuance policy.
    #[serde(default)]
    pub policy: FilePolicy,
    /// Limits of each connection to the HTTPS listener.
    #[serde(default)]
    pub connections: FileConnections,
    /// `[overload]`: admission limits of `POST /token` (see [`crate::shed`]).
    #[serde(default)]
    pub overload: crate::shed::FileOverload,
    /// `[ops]`: the operations listener (`/metrics`, `/healthz`, `/readyz`); absent, none.
    pub ops: Option<writ_identity::ops::FileOps>,
    /// The durable audit trail.
    #[serde(default)]
    pub audit: FileAudit,
    /// How often revocations are read from the identity store (default 200ms; the
    /// store's own announcements wake it sooner).
    pub revocation_poll: Option<ConfigDuration>,
}

/// The `[audit]` table: the durable, hash-chained audit trail in the identity store.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAudit {
    /// Write every decision to the store's audit table too (default: true when an
    /// `[identity_store]` is configured).
    pub durable: Option<bool>,
    /// Rows older than this are pruned (default: kept).
    pub retention: Option<ConfigDuration>,
}

/// The `[connections]` table: limits of each connection to the HTTPS listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConnections {
    /// Longest TLS handshake.
    pub handshake_timeout: Option<ConfigDuration>,
    /// Longest wait for a complete request header.
    pub header_read_timeout: Option<ConfigDuration>,
    /// Longest wait for a whole request body.
    pub body_read_timeout: Option<ConfigDuration>,
    /// Longest keep-alive wait for the next request.
    pub idle_timeout: Option<ConfigDuration>,
    /// TLS handshakes in flight at once.
    pub max_pending_handshakes: Option<usize>,
    /// Connections from one client address.
    pub max_connections_per_ip: Option<usize>,
    /// Connections of the listener at once (default: from the file descriptor limit).
    pub max_connections: Option<usize>,
}

/// A size: a number of bytes, or a string such as `"100MiB"`, `"512KiB"`, `"1GiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FileSize {
    /// Bytes.
    Bytes(u64),
    /// A number with an optional `B`, `KiB`, `MiB` or `GiB` suffix.
    Text(String),
}

impl FileSize {
    fn bytes(&self, field: &str) -> Result<u64, TxnConfigError> {
        let text = match self {
            Self::Bytes(n) => return Ok(*n),
            Self::Text(t) => t.trim(),
        };
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let unit_size: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => 0,
        };
        number
            .parse::<u64>()
            .ok()
            .filter(|_| unit_size > 0)
            .and_then(|n| n.checked_mul(unit_size))
            .ok_or_else(|| {
                TxnConfigError::Invalid(format!(
                    "`{field}`: {text:?} is not a size like 100MiB, 512KiB or a number of bytes"
                ))
            })
    }
}

/// One `[[oidc]]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIssuer {
    /// Issuer identifier.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Subject claim (default `sub`).
    pub subject_claim: Option<String>,
    /// Scope claim (default `scope`).
    pub scope_claim: Option<String>,
    /// Allowed algorithms.
    pub algorithms: Option<Vec<String>>,
    /// Clock skew tolerance.
    pub leeway: Option<ConfigDuration>,
    /// Furthest ahead a token's `exp` may be (default 24h).
    pub max_token_lifetime: Option<ConfigDuration>,
    /// `typ` values accepted on access tokens (default `["at+jwt"]`).
    pub access_token_typ: Option<Vec<String>>,
    /// Accept access tokens without `typ` (default false).
    pub allow_untyped_access_tokens: Option<bool>,
    /// PEM file of TLS roots for this issuer.
    pub ca_file: Option<PathBuf>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct TxnConfig {
    /// HTTPS address.
    pub listen: SocketAddr,
    /// `iss` of issued tokens.
    pub issuer: String,
    /// Workload API endpoint.
    pub workload_api: String,
    /// The SVID to present.
    pub spiffe_id: Option<SpiffeId>,
    /// Where the signing keys live.
    pub data_dir: Option<PathBuf>,
    /// Audit log file; `None` is standard output.
    pub audit_log: Option<PathBuf>,
    /// What happens to an exchange whose grant cannot be recorded.
    pub audit_on_failure: OnFailure,
    /// Size rotation of the audit log file; `None`: never.
    pub audit_rotation: Option<Rotation>,
    /// Rate of recorded unauthenticated refusals per source IP.
    pub audit_unauthenticated: Rate,
    /// Default token lifetime.
    pub token_lifetime: Duration,
    /// Deepest `act` chain.
    pub max_chain_depth: usize,
    /// Most replacements of one transaction's Txn-Token (draft-ietf-oauth-transaction-tokens-11).
    pub max_replacements: usize,
    /// Key rotation period.
    pub key_rotation: Duration,
    /// The algorithm new signing keys are made for (a key ring of another algorithm
    /// rotates at start).
    pub signing_algorithm: SigningAlgorithm,
    /// Cache subject token validations.
    pub subject_token_cache: bool,
    /// Accept JWT-SVID client assertions.
    pub client_assertions: bool,
    /// Refuse a client assertion seen before within its lifetime, and one without `jti`.
    pub client_assertion_replay_protection: bool,
    /// OpenID Providers.
    pub oidc: Vec<IssuerConfig>,
    /// The identity server's store, for sub-agent leases and the replicas' shared keys;
    /// `None` refuses sub-agents and serves this replica's keys only.
    pub identity_store: Option<Datastore>,
    /// This replica's name.
    pub replica: ReplicaName,
    /// The policy.
    pub policy: Policy,
    /// Limits of each connection to the HTTPS listener.
    pub connections: ConnectionLimits,
    /// Admission limits of `POST /token`: beyond them exchanges are shed with 503.
    pub overload: crate::shed::OverloadLimits,
    /// Accept the `writ dev` development issuer's tokens. Only `writ dev` sets this; no
    /// `txn.toml` key can.
    pub accept_dev_tokens: bool,
    /// The names clients reach this service by, which its X509-SVID must carry.
    pub dns_names: ServerNames,
    /// The operations listener (`[ops]`; `None`: none), see [`crate::ops`].
    pub ops: Option<writ_identity::ops::OpsConfig>,
    /// Record metrics ([`crate::metrics`]; on by default). Only benchmarks turn them
    /// off, to measure their cost; no `txn.toml` key can.
    pub metrics: bool,
    /// Write decisions to the identity store's audit table too (needs `identity_store`).
    pub audit_durable: bool,
    /// Prune durable audit rows older than this; `None` keeps them.
    pub audit_retention: Option<Duration>,
    /// How often revocations are read from the identity store
    /// ([`crate::revocation::DEFAULT_POLL_INTERVAL`] by default).
    pub revocation_poll: Duration,
}

fn duration(
    field: &str,
    value: Option<ConfigDuration>,
    default: Duration,
) -> Result<Duration, TxnConfigError> {
    match value {
        None => Ok(default),
        Some(d) if d.get().is_zero() => Err(TxnConfigError::Invalid(format!(
            "`{field}` must be positive"
        ))),
        Some(d) => Ok(d.get()),
    }
}

impl TxnConfig {
    /// Parses and validates `txn.toml`; relative `ca_file`s are read relative to `base`.
    ///
    /// # Errors
    /// [`TxnConfigError`] for the first problem found.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self, TxnConfigError> {
        let file: TxnFileConfig = toml::from_str(text).map_err(|e| {
            TxnConfigError::Syntax(toml_error_line(&e).unwrap_or_else(|| e.message().to_owned()))
        })?;
        Self::from_file(file, base)
    }

    /// Validates a parsed file.
    ///
    /// # Errors
    /// [`TxnConfigError`] for the first problem found.
    pub fn from_file(file: TxnFileConfig, base: &Path) -> Result<Self, TxnConfigError> {
        let listen_text = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = SocketAddr::from_str(listen_text).map_err(|_| {
            TxnConfigError::Invalid(format!("`listen` is not an address: {listen_text:?}"))
        })?;
        let issuer = file
            .issuer
            .unwrap_or_else(|| format!("https://{listen}"))
            .trim_end_matches('/')
            .to_owned();
        let parsed = url::Url::parse(&issuer)
            .map_err(|_| TxnConfigError::Invalid("`issuer` is not a URL".into()))?;
        if parsed.scheme() != "https" || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(TxnConfigError::Invalid(
                "`issuer` must be an https URL without query or fragment (RFC 8414)".into(),
            ));
        }
        let spiffe_id = file
            .spiffe_id
            .as_deref()
            .map(SpiffeId::new)
            .transpose()
            .map_err(|e| TxnConfigError::Invalid(format!("`spiffe_id`: {e}")))?;
        let max_chain_depth = file.max_chain_depth.unwrap_or(DEFAULT_MAX_CHAIN_DEPTH);
        if !(1..=MAX_CHAIN_DEPTH_LIMIT).contains(&max_chain_depth) {
            return Err(TxnConfigError::Invalid(format!(
                "`max_chain_depth` must be 1 to {MAX_CHAIN_DEPTH_LIMIT}"
            )));
        }
        let max_replacements = file
            .max_replacements
            .unwrap_or(crate::exchange::DEFAULT_MAX_REPLACEMENTS);
        if max_replacements > MAX_CHAIN_DEPTH_LIMIT {
            return Err(TxnConfigError::Invalid(format!(
                "`max_replacements` must be 0 to {MAX_CHAIN_DEPTH_LIMIT}"
            )));
        }
        let policy = Policy::try_from(file.policy)?;
        let identity_store = match &file.identity_store {
            None => None,
            Some(table) => Some(
                Datastore::from_file(table, base)
                    .map_err(|(field, e)| {
                        TxnConfigError::Invalid(format!("`identity_store.{field}`: {e}"))
                    })?
                    .ok_or_else(|| {
                        TxnConfigError::Invalid(
                            "`identity_store`: `connection` (the SQLite file) is required".into(),
                        )
                    })?,
            ),
        };
        let replica = match file.replica.as_deref() {
            Some(name) => ReplicaName::new(name)
                .map_err(|e| TxnConfigError::Invalid(format!("`replica`: {e}")))?,
            None => ReplicaName::from_host(),
        };
        let token_lifetime = duration("token_lifetime", file.token_lifetime, DEFAULT_LIFETIME)?;
        if token_lifetime > policy.max_lifetime() {
            return Err(TxnConfigError::Invalid(
                "`token_lifetime` exceeds the policy's `max_lifetime`".into(),
            ));
        }
        let audit_on_failure = match file.audit_on_failure.as_deref() {
            None | Some("refuse") => OnFailure::Refuse,
            Some("allow") => OnFailure::Allow,
            Some(other) => {
                return Err(TxnConfigError::Invalid(format!(
                    "`audit_on_failure`: {other:?} is not \"refuse\" or \"allow\""
                )));
            }
        };
        let max_size = match &file.audit_max_size {
            None => DEFAULT_MAX_SIZE,
            Some(size) => size.bytes("audit_max_size")?,
        };
        let audit_rotation = (max_size > 0).then_some(Rotation {
            max_size,
            keep: file.audit_keep.unwrap_or(DEFAULT_KEEP),
        });
        let audit_unauthenticated = match &file.audit_unauthenticated {
            None => DEFAULT_UNAUTHENTICATED_RATE,
            Some(r) if r.per_second.is_finite() && r.per_second > 0.0 && r.burst != Some(0) => {
                Rate {
                    per_second: r.per_second,
                    burst: r.burst.unwrap_or(DEFAULT_UNAUTHENTICATED_RATE.burst),
                }
            }
            Some(_) => {
                return Err(TxnConfigError::Invalid(
                    "`audit_unauthenticated` needs per_second > 0 and burst >= 1".into(),
                ));
            }
        };
        let connections = connection_limits(&file.connections)?;
        let overload = crate::shed::OverloadLimits::from_file(&file.overload)
            .map_err(TxnConfigError::Invalid)?;
        let signing_algorithm = match file.signing_algorithm.as_deref() {
            None => SigningAlgorithm::default(),
            Some(name) => SigningAlgorithm::from_name(name).ok_or_else(|| {
                TxnConfigError::Invalid(format!(
                    "`signing_algorithm`: {name:?} is not \"ES256\" or \"EdDSA\""
                ))
            })?,
        };
        let ops = writ_identity::ops::OpsConfig::from_file(file.ops.clone())
            .map_err(|e| TxnConfigError::Invalid(e.to_string()))?;
        let audit_durable = file.audit.durable.unwrap_or(identity_store.is_some());
        if audit_durable && identity_store.is_none() {
            return Err(TxnConfigError::Invalid(
                "`audit.durable` needs an `[identity_store]` to write to".into(),
            ));
        }
        let audit_retention = match file.audit.retention {
            None => None,
            Some(d) if d.get() < Duration::from_secs(3600) => {
                return Err(TxnConfigError::Invalid(
                    "`audit.retention` must be at least 1h".into(),
                ));
            }
            Some(d) => Some(d.get()),
        };
        let oidc = file
            .oidc
            .into_iter()
            .map(|i| issuer_config(i, base))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            ops,
            metrics: true,
            listen,
            issuer,
            workload_api: file
                .workload_api
                .or_else(|| writ_sdk::workload::endpoint_from_env().ok())
                .unwrap_or_else(|| format!("unix://{}", writ_identity::agent::DEFAULT_SOCKET)),
            spiffe_id,
            data_dir: file.data_dir.clone(),
            audit_log: match file.audit_log.as_deref() {
                Some("-") => None,
                Some(path) => Some(PathBuf::from(path)),
                None => file.data_dir.as_ref().map(|d| d.join("audit.log")),
            },
            audit_on_failure,
            audit_rotation,
            audit_unauthenticated,
            token_lifetime,
            max_chain_depth,
            max_replacements,
            key_rotation: duration("key_rotation", file.key_rotation, DEFAULT_KEY_ROTATION)?,
            signing_algorithm,
            subject_token_cache: file.subject_token_cache.unwrap_or(true),
            client_assertions: file.client_assertions.unwrap_or(false),
            client_assertion_replay_protection: file
                .client_assertion_replay_protection
                .unwrap_or(true),
            oidc,
            identity_store,
            replica,
            accept_dev_tokens: false,
            policy,
            connections,
            overload,
            dns_names: ServerNames::new(file.dns_names.unwrap_or_default())?,
            audit_durable,
            audit_retention,
            revocation_poll: duration(
                "revocation_poll",
                file.revocation_poll,
                crate::revocation::DEFAULT_POLL_INTERVAL,
            )?,
        })
    }
}

fn connection_limits(file: &FileConnections) -> Result<ConnectionLimits, TxnConfigError> {
    let mut limits = ConnectionLimits::default();
    let timeout = |field: &str, value: &Option<ConfigDuration>, default| {
        duration(&format!("connections.{field}"), *value, default)
    };
    limits.handshake_timeout = timeout(
        "handshake_timeout",
        &file.handshake_timeout,
        limits.handshake_timeout,
    )?;
    limits.header_read_timeout = timeout(
        "header_read_timeout",
        &file.header_read_timeout,
        limits.header_read_timeout,
    )?;
    limits.body_read_timeout = timeout(
        "body_read_timeout",
        &file.body_read_timeout,
        limits.body_read_timeout,
    )?;
    limits.idle_timeout = timeout("idle_timeout", &file.idle_timeout, limits.idle_timeout)?;
    let count = |field: &str, value: Option<usize>| match value {
        Some(0) => Err(TxnConfigError::Invalid(format!(
            "`connections.{field}` must be at least 1"
        ))),
        other => Ok(other),
    };
    if let Some(n) = count("max_pending_handshakes", file.max_pending_handshakes)? {
        limits.max_pending_handshakes = n;
    }
    if let Some(n) = count("max_connections_per_ip", file.max_connections_per_ip)? {
        limits.max_connections_per_ip = n;
    }
    limits.max_connections = count("max_connections", file.max_connections)?;
    Ok(limits)
}

fn issuer_config(file: FileIssuer, base: &Path) -> Result<IssuerConfig, TxnConfigError> {
    let mut config = IssuerConfig::new(file.issuer, file.audiences);
    if let Some(claim) = file.subject_claim {
        config.subject_claim = claim;
    }
    if let Some(claim) = file.scope_claim {
        config.scope_claim = claim;
    }
    if let Some(names) = file.algorithms {
        config.algorithms = names
            .iter()
            .map(|n| {
                Algorithm::from_str(n)
                    .map_err(|_| TxnConfigError::Invalid(format!("unknown algorithm `{n}`")))
            })
            .collect::<Result<_, _>>()?;
    }
    config.leeway = duration("leeway", file.leeway, config.leeway)?;
    config.max_token_lifetime = duration(
        "max_token_lifetime",
        file.max_token_lifetime,
        config.max_token_lifetime,
    )?;
    if let Some(types) = file.access_token_typ {
        config.access_token_typ = types;
    }
    if let Some(untyped) = file.allow_untyped_access_tokens {
        config.allow_untyped_access_tokens = untyped;
    }
    if let Some(ca) = file.ca_file {
        let path = base.join(ca);
        config.ca_bundle_pem =
            Some(
                std::fs::read_to_string(&path).map_err(|e| TxnConfigError::File {
                    path,
                    reason: e.to_string(),
                })?,
            );
    }
    Ok(config)
}

/// A running transaction token service.
#[derive(Debug)]
pub struct TxnServer {
    /// The bound address.
    pub addr: SocketAddr,
    /// The service (its audit log and keys are reachable from here).
    pub service: Arc<ExchangeService>,
    /// The service's own identity.
    pub source: X509Source,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    /// Writes the audit log's counts of suppressed refusals every [`SUMMARY_INTERVAL`].
    summaries: tokio::task::JoinHandle<()>,
    /// Publishes this replica's keys and reads the others' (with an identity store).
    upkeep: Option<tokio::task::JoinHandle<()>>,
    /// Prunes the durable audit trail.
    _retention: Option<tokio_util::task::AbortOnDropHandle<()>>,
    /// Keeps the revocations in force current (with an identity store).
    _revocation_poll: Option<tokio_util::task::AbortOnDropHandle<()>>,
    /// Checks the configured names at each rotation of the SVID.
    names_watch: Option<tokio::task::JoinHandle<()>>,
    /// The operations listener, when configured (stops when dropped).
    ops: Option<writ_identity::ops::RunningOps>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TxnServer {
    /// Gets the service's SVID from the Workload API, builds the service and starts
    /// serving on `config.listen`, with the system clock.
    ///
    /// # Errors
    /// [`TxnConfigError`] if any part cannot start.
    pub async fn start(config: TxnConfig) -> Result<Self, TxnConfigError> {
        Self::start_with_clock(config, Arc::new(SystemClock)).await
    }

    /// As [`TxnServer::start`], reading time from `clock`.
    ///
    /// # Errors
    /// [`TxnConfigError`] if any part cannot start.
    pub async fn start_with_clock(
        config: TxnConfig,
        clock: SharedClock,
    ) -> Result<Self, TxnConfigError> {
        let tcp = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| TxnConfigError::Serve(ServeError::Io(e)))?;
        Self::start_on(config, clock, tcp).await
    }

    /// As [`TxnServer::start_with_clock`], serving on an already bound `tcp` (whose
    /// address wins over `config.listen`).
    ///
    /// # Errors
    /// [`TxnConfigError`] if any part cannot start.
    pub async fn start_on(
        config: TxnConfig,
        clock: SharedClock,
        tcp: tokio::net::TcpListener,
    ) -> Result<Self, TxnConfigError> {
        let mut builder = X509Source::builder().endpoint(config.workload_api.clone());
        if let Some(id) = &config.spiffe_id {
            builder = builder.spiffe_id(id.clone());
        }
        let source = builder.build().await?;
        // Refuse to start with a certificate HTTPS clients would refuse.
        config.dns_names.check(&source.svid())?;
        let trust_domain = source.svid().spiffe_id.trust_domain();
        let retain = config.policy.max_lifetime() + Duration::from_secs(60);
        let keys = match &config.data_dir {
            Some(dir) => {
                writ_identity::key_manager::create_private_dir(dir).map_err(|e| {
                    TxnConfigError::File {
                        path: dir.clone(),
                        reason: e.to_string(),
                    }
                })?;
                SigningKeys::load_or_create_with(
                    dir.join(KEYS_FILE),
                    config.signing_algorithm,
                    clock.clone(),
                    config.key_rotation,
                    retain,
                )?
            }
            None => SigningKeys::ephemeral_with(
                config.signing_algorithm,
                clock.clone(),
                config.key_rotation,
                retain,
            )?,
        };
        let audit = match &config.audit_log {
            Some(path) => AuditLog::open_rotated(path, config.audit_rotation).map_err(|e| {
                TxnConfigError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?,
            None => AuditLog::stdout(),
        }
        .with_on_failure(config.audit_on_failure)
        .with_unauthenticated_rate(Some(config.audit_unauthenticated), clock.clone());
        let keys = Arc::new(keys);
        let ops_clock = clock.clone();
        let mut service = ExchangeService::new(
            trust_domain,
            config.issuer.clone(),
            config.policy.clone(),
            keys.clone(),
            clock.clone(),
        )
        .with_default_lifetime(config.token_lifetime)
        .with_max_chain_depth(config.max_chain_depth)
        .with_max_replacements(config.max_replacements)
        .with_audit(audit);
        if !config.oidc.is_empty() {
            let options = OidcOptions {
                accept_dev_tokens: config.accept_dev_tokens,
                ..OidcOptions::default()
            };
            service = service.with_oidc(Arc::new(OidcValidator::with_options(
                config.oidc.clone(),
                clock.clone(),
                options,
            )?));
        }
        if config.subject_token_cache {
            service = service.with_subject_cache();
        }
        if !config.metrics {
            service = service.without_metrics();
        }
        let mut upkeep = None;
        let mut retention = None;
        let mut revocation_poll = None;
        if let Some(store) = &config.identity_store {
            // Shared, never migrated: the identity server owns (and migrates) its store;
            // the token service writes only its public keys there.
            let store = store
                .open_shared()
                .await
                .map_err(|e| TxnConfigError::Invalid(format!("`identity_store`: {e}")))?;
            let replica = Arc::new(Replica::new(
                config.replica.clone(),
                store.clone(),
                keys,
                clock.clone(),
            ));
            let store_error =
                |e: ReplicaError| TxnConfigError::Invalid(format!("`identity_store`: {e}"));
            replica.publish().await.map_err(store_error)?;
            let peers = replica.refresh().await.map_err(store_error)?;
            tracing::info!(replica = %config.replica, keys_in_store = peers, "token service replica sharing its keys through the identity store");
            upkeep = Some(replica.clone().spawn());
            if config.audit_durable {
                let durable = DurableAudit::spawn(store.clone(), config.audit_on_failure);
                retention = config
                    .audit_retention
                    .map(|keep| durable.spawn_retention(keep, clock.clone()));
                service = service.with_durable_audit(durable);
            }
            let revocations = crate::revocation::Revocations::load(store.clone(), clock.clone())
                .await
                .map_err(|e| {
                    TxnConfigError::Invalid(format!("`identity_store`: revocations: {e}"))
                })?;
            revocation_poll = Some(revocations.clone().spawn(config.revocation_poll));
            service = service
                .with_revocations(revocations)
                .with_leases(Leases::new(store))
                .with_replica(replica);
        } else {
            tracing::info!(replica = %config.replica, "token service replica without an identity store: it serves its own keys only");
        }
        if config.client_assertions {
            service = service
                .with_client_assertions(WorkloadClient::connect(&config.workload_api).await?)
                .with_client_assertion_replay_protection(config.client_assertion_replay_protection);
        }
        let service = Arc::new(service);
        let addr = tcp
            .local_addr()
            .map_err(|e| TxnConfigError::Serve(ServeError::Io(e)))?;
        let summaries = {
            let audit = service.audit().clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    audit.flush_suppressed();
                }
            })
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = config.connections;
        let overload = config.overload;
        let task = {
            let service = service.clone();
            let source = source.clone();
            tokio::spawn(async move {
                listener::serve_with_overload(service, &source, tcp, limits, overload, async move {
                    let _ = stopped.await;
                })
                .await
            })
        };
        let names_watch =
            (!config.dns_names.is_empty()).then(|| config.dns_names.clone().watch(source.clone()));
        let ops = match &config.ops {
            Some(ops) => Some(
                writ_identity::ops::start(
                    ops,
                    crate::ops::router(service.clone(), source.clone(), ops_clock),
                )
                .await
                .map_err(|e| TxnConfigError::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        tracing::info!(%addr, issuer = %config.issuer, spiffe_id = %source.svid().spiffe_id, "transaction token service listening");
        Ok(Self {
            addr,
            service,
            source,
            task,
            summaries,
            upkeep,
            _retention: retention,
            _revocation_poll: revocation_poll,
            names_watch,
            ops,
            stop: Some(stop),
        })
    }

    /// The operations listener's address, when `[ops]` is configured.
    pub fn ops_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().map(writ_identity::ops::RunningOps::addr)
    }

    /// Stops accepting, lets requests in flight finish, and waits.
    ///
    /// # Errors
    /// [`ServeError`] if the listener failed.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = (&mut self.task).await;
        self.summaries.abort();
        if let Some(upkeep) = &self.upkeep {
            upkeep.abort();
        }
        if let Some(watch) = &self.names_watch {
            watch.abort();
        }
        self.service.audit().flush_suppressed();
        match result {
            Ok(result) => result,
            Err(e) => Err(ServeError::Io(std::io::Error::other(e.to_string()))),
        }
    }
}

impl Drop for TxnServer {
    fn drop(&mut self) {
        self.task.abort();
        self.summaries.abort();
        if let Some(upkeep) = &self.upkeep {
            upkeep.abort();
        }
        if let Some(watch) = &self.names_watch {
            watch.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_default_and_parse() {
        let config = TxnConfig::from_toml("", Path::new(".")).unwrap();
        assert_eq!(config.connections, ConnectionLimits::default());
        let text = "[connections]\nhandshake_timeout = \"2s\"\nheader_read_timeout = \"3s\"\n\
            body_read_timeout = \"4s\"\nidle_timeout = \"5s\"\nmax_pending_handshakes = 6\n\
            max_connections_per_ip = 7\nmax_connections = 8\n";
        let c = TxnConfig::from_toml(text, Path::new("."))
            .unwrap()
            .connections;
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.header_read_timeout, Duration::from_secs(3));
        assert_eq!(c.body_read_timeout, Duration::from_secs(4));
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.max_pending_handshakes, 6);
        assert_eq!(c.max_connections_per_ip, 7);
        assert_eq!(c.max_connections, Some(8));
        for bad in [
            "[connections]\nmax_connections_per_ip = 0",
            "[connections]\nidle_timeout = \"0s\"",
            "[connections]\nread_timeout = \"1s\"",
        ] {
            assert!(TxnConfig::from_toml(bad, Path::new(".")).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns_names_parse_and_refuse_garbage() {
        let config = TxnConfig::from_toml("", Path::new(".")).unwrap();
        assert!(config.dns_names.is_empty(), "no names: nothing to check");
        let text = "dns_names = [\"tts.example.org\", \"10.0.0.7\", \"::1\"]";
        let config = TxnConfig::from_toml(text, Path::new(".")).unwrap();
        assert_eq!(
            config.dns_names.as_slice(),
            ["tts.example.org", "10.0.0.7", "::1"]
        );
        for bad in [
            "dns_names = [\"*.example.org\"]",
            "dns_names = [\"10.0.0\"]",
            "dns_names = [\"https://tts\"]",
            "dns_names = \"tts\"",
            "dns_names = [1]",
        ] {
            assert!(TxnConfig::from_toml(bad, Path::new(".")).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../examples/config/txn.toml");
        let config = TxnConfig::from_toml(text, Path::new(".")).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(config.policy.rules().len(), 4);
        assert_eq!(
            config.policy.rules()[1].condition().map(|c| c.source()),
            Some(r#"lease.task == "search""#)
        );
        assert_eq!(config.oidc.len(), 1);
        assert_eq!(config.max_chain_depth, 8);
        assert_eq!(config.max_replacements, 7);
        assert_eq!(
            config.audit_log.as_deref(),
            Some(Path::new("./writ-txn/audit.log"))
        );
    }

    #[test]
    fn defaults() {
        let config = TxnConfig::from_toml("", Path::new(".")).unwrap();
        assert_eq!(config.issuer, "https://127.0.0.1:8443");
        assert_eq!(config.token_lifetime, DEFAULT_LIFETIME);
        assert!(config.audit_log.is_none(), "no data_dir: standard output");
        assert!(config.policy.rules().is_empty(), "deny by default");
        assert!(!config.client_assertions);
        assert!(config.client_assertion_replay_protection);
        assert_eq!(config.audit_on_failure, OnFailure::Refuse, "fails closed");
        assert_eq!(
            config.audit_rotation,
            Some(Rotation {
                max_size: DEFAULT_MAX_SIZE,
                keep: DEFAULT_KEEP
            })
        );
        assert_eq!(config.audit_unauthenticated, DEFAULT_UNAUTHENTICATED_RATE);
        assert_eq!(config.signing_algorithm, SigningAlgorithm::default());
        for (text, algorithm) in [
            ("signing_algorithm = \"ES256\"", SigningAlgorithm::Es256),
            ("signing_algorithm = \"EdDSA\"", SigningAlgorithm::EdDsa),
        ] {
            let config = TxnConfig::from_toml(text, Path::new(".")).unwrap();
            assert_eq!(config.signing_algorithm, algorithm);
        }
    }

    #[test]
    fn token_kind_and_lifetime_keys() {
        let config = TxnConfig::from_toml(
            r#"
            client_assertion_replay_protection = false
            [[oidc]]
            issuer = "https://idp.example.com"
            audiences = ["writ"]
            max_token_lifetime = "1h"
            access_token_typ = ["at+jwt", "JWT"]
            allow_untyped_access_tokens = true
            [[oidc]]
            issuer = "https://other.example.com"
            audiences = ["writ"]
            "#,
            Path::new("."),
        )
        .unwrap();
        assert!(!config.client_assertion_replay_protection);
        let [lax, strict] = config.oidc.as_slice() else {
            panic!("two issuers")
        };
        assert_eq!(lax.max_token_lifetime, Duration::from_secs(3600));
        assert_eq!(lax.access_token_typ, ["at+jwt", "JWT"]);
        assert!(lax.allow_untyped_access_tokens);
        assert_eq!(
            strict.max_token_lifetime,
            crate::oidc::DEFAULT_MAX_TOKEN_LIFETIME
        );
        assert_eq!(strict.access_token_typ, [crate::oidc::ACCESS_TOKEN_TYP]);
        assert!(!strict.allow_untyped_access_tokens);
    }

    #[test]
    fn audit_settings() {
        let config = TxnConfig::from_toml(
            "audit_on_failure = \"allow\"\naudit_max_size = \"2MiB\"\naudit_keep = 3\naudit_unauthenticated = { per_second = 5, burst = 7 }",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(config.audit_on_failure, OnFailure::Allow);
        assert_eq!(
            config.audit_rotation,
            Some(Rotation {
                max_size: 2 << 20,
                keep: 3
            })
        );
        assert_eq!(config.audit_unauthenticated.burst, 7);
        let config = TxnConfig::from_toml("audit_max_size = 0", Path::new(".")).unwrap();
        assert_eq!(config.audit_rotation, None, "0 never rotates");
    }

    #[test]
    fn bad_configs_are_refused_with_the_field() {
        for (text, needle) in [
            ("bogus = 1", "bogus"),
            ("listen = \"nowhere\"", "listen"),
            ("issuer = \"http://tts.example\"", "issuer"),
            ("issuer = \"https://tts.example?x=1\"", "issuer"),
            ("max_chain_depth = 0", "max_chain_depth"),
            ("max_chain_depth = 99", "max_chain_depth"),
            ("max_replacements = 17", "max_replacements"),
            ("max_replacements = -1", "max_replacements"),
            ("token_lifetime = \"0s\"", "token_lifetime"),
            ("token_lifetime = \"2h\"", "token_lifetime"),
            ("key_rotation = \"soon\"", "key_rotation"),
            ("spiffe_id = \"http://x\"", "spiffe_id"),
            ("audit_on_failure = \"maybe\"", "audit_on_failure"),
            ("signing_algorithm = \"RS256\"", "signing_algorithm"),
            ("signing_algorithm = \"eddsa\"", "signing_algorithm"),
            ("audit_max_size = \"10 parsecs\"", "audit_max_size"),
            (
                "audit_unauthenticated = { per_second = 0 }",
                "audit_unauthenticated",
            ),
            (
                "[[oidc]]\nissuer = \"https://i\"\naudiences = []\nalgorithms = [\"HS256\"]",
                "oidc",
            ),
            (
                "[[oidc]]\nissuer = \"https://i\"\naudiences = [\"a\"]\nalgorithms = [\"XX1\"]",
                "XX1",
            ),
            (
                "[policy]\n[[policy.caller]]\nid = \"spiffe://td/a\"\nsubject_token_types = [\"txn_token\"]\nmax_scope = [\"r\"]\nrate_limit = { per_second = 0 }",
                "rate_limit",
            ),
        ] {
            let err = TxnConfig::from_toml(text, Path::new("."))
                .and_then(|c| OidcValidator::new(c.oidc, Arc::new(SystemClock)).map_err(Into::into))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
