//! `server.toml`: the raw [`FileConfig`] (strings, as written) and the validated
//! [`ServerConfig`] it becomes through `TryFrom`, the way SPIRE turns its HCL into
//! `server.Config`.
//!
//! ```
//! use writ_identity::server::config::{FileConfig, ServerConfig};
//! let file: FileConfig = toml::from_str(r#"
//!     trust_domain = "example.org"
//!     data_dir = "/var/lib/writ/server"
//!     [ca]
//!     ttl = "24h"
//! "#).unwrap();
//! let config = ServerConfig::try_from(file).unwrap();
//! assert_eq!(config.ca.ca_ttl.as_secs(), 86_400);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::ca::{CaConfig, UpstreamAuthority};
use crate::duration::ConfigDuration;
use crate::rate_limit::Rate;
use crate::spiffe_id::TrustDomain;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{SharedStore, StoreError};

/// Default admin socket.
pub const DEFAULT_ADMIN_SOCKET: &str = "/tmp/writ/server.sock";
/// Default port of the node API.
pub const DEFAULT_NODE_PORT: u16 = 8081;
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/writ/server";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, has unknown keys, or a value of the wrong form (a
    /// duration that is not one): one line naming the key when serde found the fault.
    #[error("invalid configuration: {}", toml_error_line(.0).unwrap_or_else(|| .0.to_string()))]
    Toml(#[from] toml::de::Error),
    /// A value is out of range or malformed.
    #[error("{key}: {reason}")]
    Value {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

fn value(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Value {
        key,
        reason: reason.to_string(),
    }
}

/// `server.toml` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain name (default `example.org`).
    pub trust_domain: Option<String>,
    /// Where the SQLite store and keys live.
    pub data_dir: Option<PathBuf>,
    /// Admin API Unix socket path.
    pub admin_socket: Option<PathBuf>,
    /// Address of the node API agents call (mTLS), `0.0.0.0:8081` by default; `""`
    /// disables it.
    pub bind_address: Option<String>,
    /// CA settings.
    #[serde(default)]
    pub ca: FileCa,
    /// SVID defaults.
    #[serde(default)]
    pub svid: FileSvid,
    /// Store settings.
    #[serde(default)]
    pub datastore: FileDatastore,
    /// Key manager settings.
    #[serde(default)]
    pub key_manager: FileKeyManager,
    /// Join token settings.
    #[serde(default)]
    pub join_token: FileJoinToken,
    /// How fast one workload may spawn sub-agents (its own and its sub-agents' spawns
    /// together): `{ per_second, burst }`.
    pub spawn_rate: Option<FileSpawnRate>,
    /// Node attestors beyond join tokens.
    #[serde(default)]
    pub node_attestors: FileNodeAttestors,
    /// SPIFFE federation: the bundle endpoint and the refresher's bounds.
    #[serde(default)]
    pub federation: FileFederation,
    /// `[oidc_discovery]`: serve OIDC discovery for JWT-SVIDs (needs `ca.jwt_issuer`).
    pub oidc_discovery: Option<FileOidcDiscovery>,
    /// `[ops]`: the operations listener (`/metrics`, `/healthz`, `/readyz`); absent, none.
    pub ops: Option<crate::ops::FileOps>,
}

/// `[oidc_discovery]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOidcDiscovery {
    /// Listen address, e.g. `127.0.0.1:8008`.
    pub listen: String,
    /// HTTPS certificate chain (PEM); without it the listener speaks plain HTTP.
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS private key (PEM).
    pub tls_key_file: Option<PathBuf>,
}

/// `[federation]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFederation {
    /// Serve this trust domain's bundle to other trust domains (absent: no endpoint).
    pub bundle_endpoint: Option<FileBundleEndpoint>,
    /// Shortest wait between two fetches of one foreign bundle (default 5s).
    pub min_refresh: Option<ConfigDuration>,
    /// How long one fetch of a foreign bundle may take (default 10s).
    pub fetch_timeout: Option<ConfigDuration>,
}

/// `[federation.bundle_endpoint]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBundleEndpoint {
    /// Listen address (default `0.0.0.0`).
    pub address: Option<String>,
    /// Listen port (default 8443).
    pub port: Option<u16>,
    /// `https_spiffe` (default: the server's own SVID) or `https_web`.
    pub profile: Option<String>,
    /// `https_web`: the certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// `https_web`: the private key (PEM).
    pub key_file: Option<PathBuf>,
}

/// The validated `[federation]` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FederationConfig {
    /// The bundle endpoint, if served.
    pub bundle_endpoint: Option<crate::server::federation::endpoint::EndpointConfig>,
    /// The refresher's bounds.
    pub limits: crate::server::federation::refresh::RefreshLimits,
}

impl TryFrom<FileFederation> for FederationConfig {
    type Error = ConfigError;

    fn try_from(file: FileFederation) -> Result<Self, ConfigError> {
        use crate::server::federation::endpoint::{DEFAULT_PORT, EndpointConfig, EndpointProfile};
        let bundle_endpoint = match file.bundle_endpoint {
            None => None,
            Some(e) => {
                let ip: std::net::IpAddr = e
                    .address
                    .as_deref()
                    .unwrap_or("0.0.0.0")
                    .parse()
                    .map_err(|err| value("federation.bundle_endpoint.address", err))?;
                let profile = match (e.profile.as_deref(), e.cert_file, e.key_file) {
                    (None | Some("https_spiffe"), None, None) => EndpointProfile::HttpsSpiffe,
                    (Some("https_web"), Some(cert_file), Some(key_file)) => {
                        EndpointProfile::HttpsWeb {
                            cert_file,
                            key_file,
                        }
                    }
                    (Some("https_web"), _, _) => {
                        return Err(value(
                            "federation.bundle_endpoint.cert_file",
                            "https_web needs cert_file and key_file",
                        ));
                    }
                    (None | Some("https_spiffe"), _, _) => {
                        return Err(value(
                            "federation.bundle_endpoint.cert_file",
                            "cert_file and key_file go with profile = \"https_web\"",
                        ));
                    }
                    (Some(other), _, _) => {
                        return Err(value(
                            "federation.bundle_endpoint.profile",
                            format!("{other:?} is not https_spiffe or https_web"),
                        ));
                    }
                };
                Some(EndpointConfig {
                    address: std::net::SocketAddr::new(ip, e.port.unwrap_or(DEFAULT_PORT)),
                    profile,
                })
            }
        };
        let defaults = crate::server::federation::refresh::RefreshLimits::default();
        Ok(Self {
            bundle_endpoint,
            limits: crate::server::federation::refresh::RefreshLimits {
                min_refresh: duration(
                    "federation.min_refresh",
                    file.min_refresh,
                    defaults.min_refresh,
                )?,
                fetch_timeout: duration(
                    "federation.fetch_timeout",
                    file.fetch_timeout,
                    defaults.fetch_timeout,
                )?,
            },
        })
    }
}

/// `[node_attestors]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNodeAttestors {
    /// `[node_attestors.k8s_psat]`: Kubernetes projected service-account tokens.
    #[serde(default)]
    pub k8s_psat: crate::attest::node::k8s_psat::FileK8sPsat,
}

/// `spawn_rate = { per_second = .., burst = .. }`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpawnRate {
    /// Sustained spawns per second (> 0).
    pub per_second: f64,
    /// Spawns allowed at once (default: [`DEFAULT_SPAWN_RATE`]'s burst).
    pub burst: Option<u32>,
}

/// Default spawn rate per root parent workload: 20 at once, then one per second.
pub const DEFAULT_SPAWN_RATE: Rate = Rate {
    per_second: 1.0,
    burst: 20,
};

/// `[ca]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCa {
    /// Lifetime of each X.509 CA (`24h`).
    pub ttl: Option<ConfigDuration>,
    /// Lifetime of each JWT signing key (`24h`).
    pub jwt_key_ttl: Option<ConfigDuration>,
    /// Key type; only `ec-p256` today.
    pub key_type: Option<String>,
    /// `spiffe_refresh_hint` (`5m`).
    pub refresh_hint: Option<ConfigDuration>,
    /// Upstream CA certificate chain (PEM, signing certificate first).
    pub upstream_cert_file: Option<PathBuf>,
    /// Upstream CA private key (PEM).
    pub upstream_key_file: Option<PathBuf>,
    /// The `iss` claim of JWT-SVIDs: the URL OIDC discovery is served under
    /// (`https://oidc.example.org`). Absent: JWT-SVIDs carry no `iss`.
    pub jwt_issuer: Option<String>,
}

/// `[svid]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSvid {
    /// Default X509-SVID lifetime (`1h`).
    pub default_x509_ttl: Option<ConfigDuration>,
    /// Default JWT-SVID lifetime (`5m`).
    pub default_jwt_ttl: Option<ConfigDuration>,
}

/// `[datastore]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDatastore {
    /// `sqlite` (default) or `postgres`.
    pub backend: Option<String>,
    /// SQLite: file path (default `<data_dir>/datastore.sqlite3`); PostgreSQL: URL.
    pub connection: Option<String>,
}

/// `[key_manager]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeyManager {
    /// `disk` (default, keys under `<data_dir>/keys`, 0600) or `memory`.
    pub kind: Option<String>,
}

/// `[join_token]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJoinToken {
    /// Default lifetime of generated join tokens (`10m`).
    pub default_ttl: Option<ConfigDuration>,
}

/// Where the registration store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datastore {
    /// An embedded SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by several servers.
    Postgres(String),
}

impl Datastore {
    /// Opens (and migrates) the store.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be opened.
    pub async fn open(&self) -> Result<SharedStore, StoreError> {
        Ok(match self {
            Datastore::Sqlite(path) => Arc::new(SqliteStore::open(path).await?),
            Datastore::Postgres(url) => Arc::new(PostgresStore::connect(url).await?),
        })
    }

    /// For a SQLite store, the process-wide lock that keeps a second server off its
    /// file ([`crate::store::sqlite::StoreLock`]); `None` for PostgreSQL, which many
    /// servers share. Hold it for as long as the server runs.
    ///
    /// # Errors
    /// [`StoreError::Locked`] if another process serves the file.
    pub fn lock(&self) -> Result<Option<crate::store::sqlite::StoreLock>, StoreError> {
        match self {
            Datastore::Sqlite(path) => crate::store::sqlite::StoreLock::acquire(path).map(Some),
            Datastore::Postgres(_) => Ok(None),
        }
    }

    /// Opens the store for reading only, never creating or migrating it (see
    /// [`SqliteStore::open_read_only`], [`PostgresStore::connect_read_only`]).
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be opened or is not at this build's schema.
    pub async fn open_read_only(&self) -> Result<SharedStore, StoreError> {
        Ok(match self {
            Datastore::Sqlite(path) => Arc::new(SqliteStore::open_read_only(path).await?),
            Datastore::Postgres(url) => Arc::new(PostgresStore::connect_read_only(url).await?),
        })
    }

    /// Opens the store to share it with the identity server that owns it: writes are
    /// allowed, but nothing is created or migrated (see [`SqliteStore::open_shared`],
    /// [`PostgresStore::connect_shared`]).
    ///
    /// # Errors
    /// [`StoreError`] if it cannot be opened or is not at this build's schema.
    pub async fn open_shared(&self) -> Result<SharedStore, StoreError> {
        Ok(match self {
            Datastore::Sqlite(path) => Arc::new(SqliteStore::open_shared(path).await?),
            Datastore::Postgres(url) => Arc::new(PostgresStore::connect_shared(url).await?),
        })
    }

    /// The `[datastore]` table's meaning, with a relative SQLite path taken from `base`;
    /// `None` when SQLite has no `connection`.
    ///
    /// # Errors
    /// The bad field (`backend` or `connection`) and what is wrong with it.
    pub fn from_file(
        file: &FileDatastore,
        base: &Path,
    ) -> Result<Option<Self>, (&'static str, String)> {
        match file.backend.as_deref() {
            None | Some("sqlite") => Ok(file
                .connection
                .as_ref()
                .map(|c| Datastore::Sqlite(base.join(c)))),
            Some("postgres") => file
                .connection
                .clone()
                .map(|url| Some(Datastore::Postgres(url)))
                .ok_or(("connection", "a PostgreSQL URL is required".to_owned())),
            Some(other) => Err(("backend", format!("{other:?} is not sqlite or postgres"))),
        }
    }
}

/// Where CA keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyManagerKind {
    /// 0600 files under `<data_dir>/keys`.
    Disk,
    /// Memory only (keys are lost at exit).
    Memory,
}

/// The validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Node API address (`None`: no node API, e.g. when the only agent is in-process).
    pub bind_address: Option<std::net::SocketAddr>,
    /// Store.
    pub datastore: Datastore,
    /// Key manager.
    pub key_manager: KeyManagerKind,
    /// CA settings.
    pub ca: CaConfig,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// The parent of an entry created without one. Only `writ dev` sets it (to its
    /// embedded agent); no configuration file can, so a production server always
    /// requires `parent_id`.
    pub default_parent_id: Option<crate::spiffe_id::SpiffeId>,
    /// How fast one root parent workload (with all its sub-agents) may spawn
    /// sub-agents.
    pub spawn_rate: Rate,
    /// Start over when the datastore has no CA while `<data_dir>/keys` holds CA keys:
    /// those keys are deleted and a new CA is made. Without it such a start is refused.
    /// Only the command line sets it (`--reset-ca`); no configuration file can.
    pub reset_ca: bool,
    /// `k8s_psat` node attestation: the clusters whose agents may attest (none: off).
    pub k8s_psat: crate::attest::node::k8s_psat::K8sPsatConfig,
    /// SPIFFE federation (`[federation]`).
    pub federation: FederationConfig,
    /// OIDC discovery for JWT-SVIDs (`[oidc_discovery]`); its issuer is
    /// `ca.jwt_issuer`.
    pub oidc_discovery: Option<crate::server::oidc_discovery::OidcDiscoveryConfig>,
    /// The operations listener (`[ops]`; `None`: none), see [`crate::ops`].
    pub ops: Option<crate::ops::OpsConfig>,
}

/// Checks a `jwt_issuer`: an `https` (or `http`, for development) URL with a host and
/// no query or fragment, at most 512 bytes; returned without a trailing slash.
///
/// # Errors
/// [`ConfigError::Value`] naming `ca.jwt_issuer`.
pub fn jwt_issuer(text: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| value("ca.jwt_issuer", format!("{text:?}: {why}"));
    if text.len() > 512 {
        return Err(bad("longer than 512 bytes"));
    }
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| bad("must be an https:// URL"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty()
        || rest.contains(['?', '#'])
        || text.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad("needs a host and no query, fragment or spaces"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

impl ServerConfig {
    /// Reads and validates a `server.toml`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or key at fault.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::try_from(toml::from_str::<FileConfig>(&text)?)
    }

    /// Defaults for a trust domain and data dir (SQLite, disk keys).
    ///
    /// # Errors
    /// Never for valid inputs; kept fallible for symmetry with the file path.
    pub fn with_defaults(trust_domain: TrustDomain, data_dir: &Path) -> Result<Self, ConfigError> {
        Self::try_from(FileConfig {
            trust_domain: Some(trust_domain.to_string()),
            data_dir: Some(data_dir.to_path_buf()),
            ..FileConfig::default()
        })
    }
}

/// A TOML error found under a key (a value of the wrong form, such as a duration that is
/// not one) as one line naming the key: `ca.ttl: "soon" is not a duration ...`; `None`
/// for an error toml names no key for (malformed TOML).
pub fn toml_error_line(e: &toml::de::Error) -> Option<String> {
    // Without the input, toml names the key path instead of quoting the line.
    let mut bare = e.clone();
    bare.set_input(None);
    let text = bare.to_string();
    let (message, keys) = text.trim_end().rsplit_once("\nin `")?;
    Some(format!(
        "{}: {}",
        keys.trim_end_matches('`'),
        message.trim()
    ))
}

fn duration(
    key: &'static str,
    v: Option<ConfigDuration>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let d = v.map_or(default, ConfigDuration::get);
    if d < Duration::from_secs(1) {
        return Err(value(key, "must be at least 1s"));
    }
    Ok(d)
}

impl TryFrom<FileConfig> for ServerConfig {
    type Error = ConfigError;

    fn try_from(file: FileConfig) -> Result<Self, ConfigError> {
        let trust_domain = TrustDomain::new(file.trust_domain.as_deref().unwrap_or("example.org"))
            .map_err(|e| value("trust_domain", e))?;
        let data_dir = file
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let admin_socket = file
            .admin_socket
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));

        let bind_address = match file.bind_address.as_deref() {
            None => Some(std::net::SocketAddr::from((
                [0, 0, 0, 0],
                DEFAULT_NODE_PORT,
            ))),
            Some("") => None,
            Some(text) => Some(
                text.parse()
                    .map_err(|e| value("bind_address", format!("{text:?}: {e}")))?,
            ),
        };
        let mut ca = CaConfig::new(trust_domain.clone());
        ca.ca_ttl = duration("ca.ttl", file.ca.ttl, ca.ca_ttl)?;
        ca.jwt_key_ttl = duration("ca.jwt_key_ttl", file.ca.jwt_key_ttl, ca.jwt_key_ttl)?;
        ca.refresh_hint = Some(duration(
            "ca.refresh_hint",
            file.ca.refresh_hint,
            Duration::from_secs(300),
        )?);
        match file.ca.key_type.as_deref() {
            None | Some("ec-p256") => {}
            Some(other) => {
                return Err(value(
                    "ca.key_type",
                    format!("{other:?} is not supported (ec-p256)"),
                ));
            }
        }
        ca.default_x509_svid_ttl = duration(
            "svid.default_x509_ttl",
            file.svid.default_x509_ttl,
            ca.default_x509_svid_ttl,
        )?;
        ca.default_jwt_svid_ttl = duration(
            "svid.default_jwt_ttl",
            file.svid.default_jwt_ttl,
            ca.default_jwt_svid_ttl,
        )?;
        ca.upstream = match (file.ca.upstream_cert_file, file.ca.upstream_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(
                UpstreamAuthority::from_pem_files(&cert, &key)
                    .map_err(|e| value("ca.upstream_cert_file", e))?,
            ),
            _ => {
                return Err(value(
                    "ca.upstream_cert_file",
                    "upstream_cert_file and upstream_key_file go together",
                ));
            }
        };

        ca.jwt_issuer = file.ca.jwt_issuer.as_deref().map(jwt_issuer).transpose()?;
        let oidc_discovery = match file.oidc_discovery {
            None => None,
            Some(_) if ca.jwt_issuer.is_none() => {
                return Err(value(
                    "oidc_discovery",
                    "needs ca.jwt_issuer (the public URL discovery is served under)",
                ));
            }
            Some(d) => {
                let listen = d
                    .listen
                    .parse()
                    .map_err(|e| value("oidc_discovery.listen", format!("{:?}: {e}", d.listen)))?;
                let tls = match (d.tls_cert_file, d.tls_key_file) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((c, k)),
                    _ => {
                        return Err(value(
                            "oidc_discovery.tls_cert_file",
                            "tls_cert_file and tls_key_file go together",
                        ));
                    }
                };
                Some(crate::server::oidc_discovery::OidcDiscoveryConfig { listen, tls })
            }
        };

        let datastore = Datastore::from_file(&file.datastore, Path::new(""))
            .map_err(|(field, e)| {
                let key = if field == "backend" {
                    "datastore.backend"
                } else {
                    "datastore.connection"
                };
                value(key, e)
            })?
            .unwrap_or_else(|| Datastore::Sqlite(data_dir.join("datastore.sqlite3")));
        let key_manager = match file.key_manager.kind.as_deref() {
            None | Some("disk") => KeyManagerKind::Disk,
            Some("memory") => KeyManagerKind::Memory,
            Some(other) => {
                return Err(value(
                    "key_manager.kind",
                    format!("{other:?} is not disk or memory"),
                ));
            }
        };
        let join_token_ttl = duration(
            "join_token.default_ttl",
            file.join_token.default_ttl,
            Duration::from_secs(600),
        )?;
        let spawn_rate = match file.spawn_rate {
            None => DEFAULT_SPAWN_RATE,
            Some(r) if r.per_second.is_finite() && r.per_second > 0.0 && r.burst != Some(0) => {
                Rate {
                    per_second: r.per_second,
                    burst: r.burst.unwrap_or(DEFAULT_SPAWN_RATE.burst),
                }
            }
            Some(_) => return Err(value("spawn_rate", "needs per_second > 0 and burst >= 1")),
        };
        let k8s_psat =
            crate::attest::node::k8s_psat::K8sPsatConfig::try_from(file.node_attestors.k8s_psat)
                .map_err(|e| value("node_attestors.k8s_psat", e))?;
        let federation = FederationConfig::try_from(file.federation)?;
        let ops = crate::ops::OpsConfig::from_file(file.ops).map_err(|e| value("ops.listen", e))?;
        Ok(Self {
            ops,
            oidc_discovery,
            k8s_psat,
            federation,
            trust_domain,
            data_dir,
            admin_socket,
            bind_address,
            datastore,
            key_manager,
            ca,
            join_token_ttl,
            default_parent_id: None,
            spawn_rate,
            reset_ca: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn federation_section() {
        use crate::server::federation::endpoint::EndpointProfile;
        let c: FileConfig = toml::from_str(
            "[federation]\nmin_refresh = \"30s\"\n[federation.bundle_endpoint]\nport = 9443\n",
        )
        .unwrap();
        let c = ServerConfig::try_from(c).unwrap();
        let e = c.federation.bundle_endpoint.unwrap();
        assert_eq!(e.address.port(), 9443);
        assert_eq!(e.profile, EndpointProfile::HttpsSpiffe);
        assert_eq!(c.federation.limits.min_refresh, Duration::from_secs(30));
        for bad in [
            "[federation.bundle_endpoint]\nprofile = \"https_web\"\n",
            "[federation.bundle_endpoint]\nprofile = \"tls\"\n",
            "[federation.bundle_endpoint]\ncert_file = \"c.pem\"\n",
            "[federation.bundle_endpoint]\naddress = \"nowhere\"\n",
        ] {
            let f: FileConfig = toml::from_str(bad).unwrap();
            assert!(ServerConfig::try_from(f).is_err(), "{bad}");
        }
        let none = ServerConfig::try_from(FileConfig::default()).unwrap();
        assert_eq!(none.federation.bundle_endpoint, None);
    }

    #[test]
    fn defaults_and_errors() {
        let c = ServerConfig::try_from(FileConfig::default()).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(
            c.datastore,
            Datastore::Sqlite(PathBuf::from(DEFAULT_DATA_DIR).join("datastore.sqlite3"))
        );
        assert!(
            toml::from_str::<FileConfig>("nonsense = 1").is_err(),
            "unknown keys are refused"
        );
        let bad = toml::from_str::<FileConfig>("[ca]\nttl = \"soon\"").unwrap_err();
        assert!(
            ConfigError::from(bad)
                .to_string()
                .starts_with("invalid configuration: ca.ttl")
        );
        let zero: FileConfig = toml::from_str("[ca]\nttl = \"0s\"").unwrap();
        assert!(
            ServerConfig::try_from(zero)
                .unwrap_err()
                .to_string()
                .starts_with("ca.ttl")
        );
        let bad: FileConfig = toml::from_str("[datastore]\nbackend = \"postgres\"").unwrap();
        assert!(ServerConfig::try_from(bad).is_err());
        let bad: FileConfig = toml::from_str("trust_domain = \"Bad TD\"").unwrap();
        assert!(ServerConfig::try_from(bad).is_err());
        assert_eq!(c.spawn_rate, DEFAULT_SPAWN_RATE);
        let bad: FileConfig = toml::from_str("spawn_rate = { per_second = 0 }").unwrap();
        assert!(
            ServerConfig::try_from(bad)
                .unwrap_err()
                .to_string()
                .starts_with("spawn_rate")
        );
        let slow: FileConfig =
            toml::from_str("spawn_rate = { per_second = 0.5, burst = 3 }").unwrap();
        assert_eq!(
            ServerConfig::try_from(slow).unwrap().spawn_rate,
            Rate {
                per_second: 0.5,
                burst: 3
            }
        );
    }

    #[test]
    fn k8s_psat_clusters_are_read_and_checked() {
        let load = |text: &str| {
            toml::from_str::<FileConfig>(text)
                .map_err(ConfigError::from)
                .and_then(ServerConfig::try_from)
        };
        let c = load(
            "[node_attestors.k8s_psat.clusters.prod]\n\
             service_account_allow_list = [\"writ:writ-agent\"]\n\
             kube_config_file = \"/etc/writ/prod.kubeconfig\"",
        )
        .unwrap();
        let prod = &c.k8s_psat.clusters["prod"];
        assert_eq!(prod.audience, "writ-server");
        assert!(prod.allowed.contains(&("writ".into(), "writ-agent".into())));
        assert!(load("").unwrap().k8s_psat.clusters.is_empty());
        let err =
            load("[node_attestors.k8s_psat.clusters.prod]\nservice_account_allow_list = [\"x\"]")
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("node_attestors.k8s_psat: "), "{err}");
    }

    #[test]
    fn example_config_loads_through_the_real_loader() {
        let text = include_str!("../../../examples/config/server.toml");
        let c = ServerConfig::try_from(toml::from_str::<FileConfig>(text).unwrap()).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.ca.ca_ttl, Duration::from_secs(86_400));
        assert_eq!(c.key_manager, KeyManagerKind::Disk);
        assert_eq!(c.join_token_ttl, Duration::from_secs(600));
    }

    #[test]
    fn durations_take_the_one_syntax_and_errors_name_the_key() {
        let load = |text: &str| {
            toml::from_str::<FileConfig>(text)
                .map_err(ConfigError::from)
                .and_then(ServerConfig::try_from)
        };
        let c = load("[ca]\nttl = 90\nrefresh_hint = \"90\"\n[svid]\ndefault_x509_ttl = \"1h30m\"")
            .unwrap();
        assert_eq!(c.ca.ca_ttl, Duration::from_secs(90));
        assert_eq!(c.ca.refresh_hint, Some(Duration::from_secs(90)));
        assert_eq!(c.ca.default_x509_svid_ttl, Duration::from_secs(5400));
        for (text, key) in [
            ("[ca]\nttl = \"soon\"", "ca.ttl: \"soon\" is not a duration"),
            ("[ca]\nttl = -1", "ca.ttl: -1 is not a duration"),
            (
                "[join_token]\ndefault_ttl = \"0s\"",
                "join_token.default_ttl: must be at least 1s",
            ),
            (
                "[svid]\ndefault_jwt_ttl = \"5min\"",
                "svid.default_jwt_ttl: \"5min\": unknown unit",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
            assert!(!err.contains('\n'), "one line: {err:?}");
        }
    }

    #[test]
    fn jwt_issuer_and_oidc_discovery_are_checked() {
        let load = |text: &str| {
            toml::from_str::<FileConfig>(text)
                .map_err(ConfigError::from)
                .and_then(ServerConfig::try_from)
        };
        let c = load(
            "[ca]\njwt_issuer = \"https://oidc.example.org/\"\n\
             [oidc_discovery]\nlisten = \"127.0.0.1:8008\"",
        )
        .unwrap();
        assert_eq!(c.ca.jwt_issuer.as_deref(), Some("https://oidc.example.org"));
        let d = c.oidc_discovery.unwrap();
        assert_eq!(d.listen.port(), 8008);
        assert!(d.tls.is_none());
        assert!(load("").unwrap().ca.jwt_issuer.is_none());
        for (text, key) in [
            (
                "[oidc_discovery]\nlisten = \"127.0.0.1:8008\"",
                "needs ca.jwt_issuer",
            ),
            ("[ca]\njwt_issuer = \"oidc.example.org\"", "ca.jwt_issuer"),
            ("[ca]\njwt_issuer = \"https://\"", "ca.jwt_issuer"),
            ("[ca]\njwt_issuer = \"https://x.org/?a=b\"", "ca.jwt_issuer"),
            (
                "[ca]\njwt_issuer = \"https://x.org\"\n[oidc_discovery]\nlisten = \"nowhere\"",
                "oidc_discovery.listen",
            ),
            (
                "[ca]\njwt_issuer = \"https://x.org\"\n[oidc_discovery]\nlisten = \"127.0.0.1:1\"\ntls_cert_file = \"/c\"",
                "go together",
            ),
            (
                "[oidc_discovery]\nlisten = \"127.0.0.1:1\"\nport = 3",
                "port",
            ),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
        let long = format!("[ca]\njwt_issuer = \"https://{}.org\"", "a".repeat(600));
        assert!(load(&long).is_err());
    }
}
