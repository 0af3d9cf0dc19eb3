//! `agent.toml`: raw [`FileConfig`] -> validated [`AgentConfig`].
//!
//! ```
//! use writ_identity::agent::config::{AgentConfig, FileConfig};
//! let file: FileConfig = toml::from_str(r#"
//!     trust_domain = "example.org"
//!     server_address = "writ-server.internal:8081"
//!     insecure_bootstrap = true
//! "#).unwrap();
//! let config = AgentConfig::try_from(file).unwrap();
//! assert_eq!(config.socket_path.to_str(), Some("/tmp/writ/agent.sock"));
//! ```

use std::path::PathBuf;

use serde::Deserialize;

use crate::attest::workload::docker::{self, DockerAttestorConfig};
use crate::attest::workload::k8s::K8sAttestorConfig;
use crate::duration::ConfigDuration;

use super::node_client::{Bootstrap, K8sPsatAgentConfig, NodeClientConfig};
use super::server_address::ServerAddresses;
use crate::bundle::Bundle;
use crate::server::config::ConfigError;
use crate::spiffe_id::TrustDomain;

/// The server address when none is given.
pub const DEFAULT_SERVER_ADDRESS: &str = "127.0.0.1:8081";

/// Default agent data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/writ/agent";

/// `agent.toml` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Trust domain (default `example.org`).
    pub trust_domain: Option<String>,
    /// `host:port` of the server's node API (default `127.0.0.1:8081`), or an array of
    /// them (up to 16): every server of the trust domain, tried in turn.
    pub server_address: Option<FileServerAddress>,
    /// Where the agent keeps its SVID and key.
    pub data_dir: Option<PathBuf>,
    /// Workload API socket path (default `/tmp/writ/agent.sock`).
    pub socket_path: Option<PathBuf>,
    /// Join token for the first start (usually given as `--join-token`).
    pub join_token: Option<String>,
    /// Bootstrap bundle: PEM certificates or SPIFFE bundle JSON of the trust domain.
    pub trust_bundle_path: Option<PathBuf>,
    /// DANGEROUS: trust any server on first contact.
    #[serde(default)]
    pub insecure_bootstrap: bool,
    /// Workload attestors beside `unix` (which is always on).
    #[serde(default)]
    pub workload_attestors: FileWorkloadAttestors,
    /// How the agent attests instead of a join token (`[node_attestor.k8s_psat]`).
    #[serde(default)]
    pub node_attestor: FileNodeAttestor,
    /// `[ops]`: the operations listener (`/metrics`, `/healthz`, `/readyz`); absent, none.
    pub ops: Option<crate::ops::FileOps>,
}

/// `server_address` as written: one `host:port` or an array of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum FileServerAddress {
    /// `server_address = "host:port"`.
    One(String),
    /// `server_address = ["host1:port", "host2:port"]`.
    Many(Vec<String>),
}

impl FileServerAddress {
    fn validate(self) -> Result<ServerAddresses, ConfigError> {
        match self {
            Self::One(a) => ServerAddresses::new([a]),
            Self::Many(list) => ServerAddresses::new(list),
        }
        .map_err(|e| value("server_address", e))
    }
}

/// `[workload_attestors]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWorkloadAttestors {
    /// `[workload_attestors.docker]`.
    pub docker: Option<FileDockerAttestor>,
    /// `[workload_attestors.k8s]`: the node's kubelet names the caller's pod.
    pub k8s: Option<K8sAttestorConfig>,
}

/// `[workload_attestors.docker]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDockerAttestor {
    /// On unless `false` (the table's presence turns it on).
    pub enabled: Option<bool>,
    /// The daemon's Unix socket (default `/var/run/docker.sock`; `unix://` accepted).
    pub socket_path: Option<PathBuf>,
    /// Longest time one Docker API call may take (default `2s`).
    pub timeout: Option<ConfigDuration>,
    /// Environment variable names given as `docker:env:<NAME>=<value>` selectors
    /// (default none).
    #[serde(default)]
    pub env_allow: Vec<String>,
}

/// `[node_attestor]`: node attestation other than a join token.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNodeAttestor {
    /// `[node_attestor.k8s_psat]`: attest with the pod's projected service-account token.
    pub k8s_psat: Option<FileAgentK8sPsat>,
}

/// `[node_attestor.k8s_psat]` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAgentK8sPsat {
    /// The cluster name, as the server's `[node_attestors.k8s_psat.clusters.<name>]`.
    pub cluster: String,
    /// The token file (default `/var/run/secrets/tokens/writ-agent`).
    pub token_path: Option<PathBuf>,
}

impl FileAgentK8sPsat {
    fn validate(self) -> Result<K8sPsatAgentConfig, ConfigError> {
        if self.cluster.is_empty() {
            return Err(value("node_attestor.k8s_psat.cluster", "is empty"));
        }
        Ok(K8sPsatAgentConfig {
            cluster: self.cluster,
            token_path: self.token_path.unwrap_or_else(|| {
                PathBuf::from(crate::attest::node::k8s_psat::DEFAULT_TOKEN_PATH)
            }),
        })
    }
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// How to reach and trust the server.
    pub node: NodeClientConfig,
    /// Workload API socket.
    pub socket_path: PathBuf,
    /// The `docker` workload attestor's settings, if it is on.
    pub docker: Option<DockerAttestorConfig>,
    /// The `k8s` workload attestor's settings, if it is on.
    pub k8s: Option<K8sAttestorConfig>,
    /// The operations listener (`[ops]`; `None`: none), see [`crate::ops`].
    pub ops: Option<crate::ops::OpsConfig>,
}

fn value(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Value {
        key,
        reason: reason.to_string(),
    }
}

impl TryFrom<FileConfig> for AgentConfig {
    type Error = ConfigError;

    fn try_from(file: FileConfig) -> Result<Self, ConfigError> {
        let trust_domain = TrustDomain::new(file.trust_domain.as_deref().unwrap_or("example.org"))
            .map_err(|e| value("trust_domain", e))?;
        let bootstrap = match (file.trust_bundle_path, file.insecure_bootstrap) {
            (Some(_), true) => {
                return Err(value(
                    "insecure_bootstrap",
                    "give trust_bundle_path or insecure_bootstrap, not both",
                ));
            }
            (Some(path), false) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| value("trust_bundle_path", format!("{}: {e}", path.display())))?;
                let bundle = if text.trim_start().starts_with('{') {
                    Bundle::from_json(trust_domain.clone(), &text)
                } else {
                    Bundle::from_pem(trust_domain.clone(), &text)
                }
                .map_err(|e| value("trust_bundle_path", e))?;
                Bootstrap::Bundle(bundle)
            }
            (None, true) => Bootstrap::Insecure,
            (None, false) => {
                return Err(value(
                    "trust_bundle_path",
                    "the agent needs a bootstrap bundle (writ bundle show > bundle.pem) or insecure_bootstrap = true",
                ));
            }
        };
        let server_addresses = file
            .server_address
            .unwrap_or_else(|| FileServerAddress::One(DEFAULT_SERVER_ADDRESS.to_owned()))
            .validate()?;
        let k8s_psat = file
            .node_attestor
            .k8s_psat
            .map(FileAgentK8sPsat::validate)
            .transpose()?;
        if k8s_psat.is_some() && file.join_token.is_some() {
            return Err(value(
                "node_attestor.k8s_psat",
                "give a join token or [node_attestor.k8s_psat], not both",
            ));
        }
        let ops = crate::ops::OpsConfig::from_file(file.ops).map_err(|e| value("ops.listen", e))?;
        Ok(Self {
            ops,
            node: NodeClientConfig {
                k8s_psat,
                server_addresses,
                trust_domain,
                data_dir: file
                    .data_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
                join_token: file.join_token,
                bootstrap,
                clock: std::sync::Arc::new(crate::clock::SystemClock),
            },
            socket_path: file
                .socket_path
                .unwrap_or_else(|| PathBuf::from(super::DEFAULT_SOCKET)),
            docker: docker_config(file.workload_attestors.docker)?,
            k8s: file.workload_attestors.k8s,
        })
    }
}

/// The validated `[workload_attestors.docker]`, or `None` when it is absent or off.
fn docker_config(
    file: Option<FileDockerAttestor>,
) -> Result<Option<DockerAttestorConfig>, ConfigError> {
    let Some(file) = file.filter(|f| f.enabled != Some(false)) else {
        return Ok(None);
    };
    DockerAttestorConfig {
        socket_path: file
            .socket_path
            .unwrap_or_else(|| PathBuf::from(docker::DEFAULT_SOCKET)),
        timeout: file
            .timeout
            .map_or(docker::DEFAULT_TIMEOUT, ConfigDuration::get),
        env_allow: file.env_allow,
        ..DockerAttestorConfig::default()
    }
    .validate()
    .map(Some)
    .map_err(|e| value("workload_attestors.docker", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads_through_the_real_loader() {
        let text = include_str!("../../../examples/config/agent.toml");
        let mut file: FileConfig = toml::from_str(text).unwrap();
        assert_eq!(
            file.trust_bundle_path.as_deref(),
            Some(std::path::Path::new("/etc/writ/bundle.pem"))
        );
        // Point the bootstrap bundle at a real file for the loader to read.
        let dir = tempfile::tempdir().unwrap();
        let bundle = crate::bundle::Bundle::new(TrustDomain::new("example.org").unwrap());
        let path = dir.path().join("bundle.json");
        std::fs::write(&path, bundle.to_json()).unwrap();
        file.trust_bundle_path = Some(path);
        let config = AgentConfig::try_from(file).unwrap();
        assert_eq!(config.node.server_addresses.to_string(), "127.0.0.1:8081");
        assert_eq!(config.socket_path, PathBuf::from("/tmp/writ/agent.sock"));
        assert!(matches!(config.node.bootstrap, Bootstrap::Bundle(_)));
        assert_eq!(config.docker, None, "the example leaves docker off");
    }

    #[test]
    fn docker_attestor_table() {
        let load = |extra: &str| {
            let file: FileConfig =
                toml::from_str(&format!("insecure_bootstrap = true\n{extra}")).unwrap();
            AgentConfig::try_from(file)
        };
        assert_eq!(load("").unwrap().docker, None);
        let on = load("[workload_attestors.docker]").unwrap().docker.unwrap();
        assert_eq!(on, DockerAttestorConfig::default());
        let set = load(
            "[workload_attestors.docker]\nsocket_path = \"unix:///run/d.sock\"\ntimeout = \"500ms\"\nenv_allow = [\"TENANT\"]",
        )
        .unwrap()
        .docker
        .unwrap();
        assert_eq!(set.socket_path, PathBuf::from("/run/d.sock"));
        assert_eq!(set.timeout, std::time::Duration::from_millis(500));
        assert_eq!(set.env_allow, ["TENANT"]);
        assert_eq!(
            load("[workload_attestors.docker]\nenabled = false")
                .unwrap()
                .docker,
            None
        );
        let err = load("[workload_attestors.docker]\nenv_allow = [\"A=B\"]").unwrap_err();
        assert!(
            err.to_string().contains("workload_attestors.docker"),
            "{err}"
        );
        assert!(
            toml::from_str::<FileConfig>("[workload_attestors.docker]\nsocket = \"/x\"").is_err()
        );
    }

    #[test]
    fn k8s_attestor_table() {
        let load = |extra: &str| {
            let file: FileConfig =
                toml::from_str(&format!("insecure_bootstrap = true\n{extra}")).unwrap();
            AgentConfig::try_from(file)
        };
        assert!(load("").unwrap().k8s.is_none());
        let k8s =
            load("[workload_attestors.k8s]\nkubelet_read_only_port = 10255\nnode_name = \"n1\"")
                .unwrap()
                .k8s
                .unwrap();
        assert_eq!(k8s.kubelet_read_only_port, Some(10255));
        assert_eq!(k8s.node_name.as_deref(), Some("n1"));
        assert!(toml::from_str::<FileConfig>("[workload_attestors.k8s]\nkubelet = 1").is_err());
    }

    #[test]
    fn k8s_psat_node_attestor() {
        let file: FileConfig = toml::from_str(
            "insecure_bootstrap = true\n[node_attestor.k8s_psat]\ncluster = \"prod\"",
        )
        .unwrap();
        let c = AgentConfig::try_from(file).unwrap();
        let psat = c.node.k8s_psat.unwrap();
        assert_eq!(psat.cluster, "prod");
        assert_eq!(
            psat.token_path,
            PathBuf::from("/var/run/secrets/tokens/writ-agent")
        );
        let both: FileConfig = toml::from_str(
            "insecure_bootstrap = true\njoin_token = \"x\"\n[node_attestor.k8s_psat]\ncluster = \"prod\"",
        )
        .unwrap();
        assert!(AgentConfig::try_from(both).is_err());
        let empty: FileConfig =
            toml::from_str("insecure_bootstrap = true\n[node_attestor.k8s_psat]\ncluster = \"\"")
                .unwrap();
        assert!(AgentConfig::try_from(empty).is_err());
    }

    #[test]
    fn refuses_ambiguous_or_missing_bootstrap() {
        let both: FileConfig =
            toml::from_str("trust_bundle_path = \"/x\"\ninsecure_bootstrap = true").unwrap();
        assert!(
            AgentConfig::try_from(both)
                .unwrap_err()
                .to_string()
                .contains("not both")
        );
        assert!(AgentConfig::try_from(FileConfig::default()).is_err());
        assert!(toml::from_str::<FileConfig>("unknown = 1").is_err());
        let bad: FileConfig =
            toml::from_str("insecure_bootstrap = true\nserver_address = \"http://x/y\"").unwrap();
        assert!(AgentConfig::try_from(bad).is_err());
    }

    #[test]
    fn server_address_is_a_string_or_an_array() {
        let load = |extra: &str| {
            let file: FileConfig =
                toml::from_str(&format!("insecure_bootstrap = true\n{extra}")).unwrap();
            AgentConfig::try_from(file).map(|c| c.node.server_addresses.to_string())
        };
        assert_eq!(load("").unwrap(), "127.0.0.1:8081");
        assert_eq!(
            load("server_address = \"writ.internal:8081\"").unwrap(),
            "writ.internal:8081"
        );
        assert_eq!(
            load("server_address = [\"a.internal:8081\", \"10.0.0.2:8081\", \"[::1]:8081\"]")
                .unwrap(),
            "a.internal:8081, 10.0.0.2:8081, [::1]:8081"
        );
        for (bad, says) in [
            ("server_address = []", "no server address"),
            ("server_address = \"writ.internal\"", "port is missing"),
            ("server_address = [\"a:1\", \"a:1\"]", "twice"),
            ("server_address = [\"a:1\", \"\"]", "host:port"),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.starts_with("server_address: "), "{bad}: {err}");
            assert!(err.contains(says), "{bad}: {err}");
        }
        let many = (1..=17)
            .map(|p| format!("\"h:{p}\""))
            .collect::<Vec<_>>()
            .join(",");
        let err = load(&format!("server_address = [{many}]")).unwrap_err();
        assert!(err.to_string().contains("at most 16"), "{err}");
        // Neither a string nor an array of strings.
        assert!(toml::from_str::<FileConfig>("server_address = 8081").is_err());
        assert!(toml::from_str::<FileConfig>("server_address = [1, 2]").is_err());
    }
}
