//! `k8s_psat` node attestation, the server's side: an agent running in a Kubernetes pod
//! sends its projected service-account token (PSAT); the server asks the cluster's API
//! server whether the token is valid (`TokenReview`), for which service account and pod,
//! then reads the pod and its node, and issues
//! `spiffe://<td>/writ/agent/k8s_psat/<cluster>/<node-uid>` with node selectors.
//!
//! Checks, in order, each with its own refusal ([`PsatError`]):
//!
//! 1. The token is a JWT of bounded size. Its claims are read *unverified*, only to
//!    refuse early and clearly a token whose audience is not the cluster's or which has
//!    expired (by the server's [`Clock`](crate::clock::Clock)). Nothing is trusted from
//!    them.
//! 2. The cluster is configured.
//! 3. The cluster's API server authenticates the token for the configured audience
//!    (`TokenReview`; a token of another cluster is not authenticated there).
//! 4. The user is `system:serviceaccount:<ns>:<sa>` and `<ns>:<sa>` is allowed.
//! 5. The token review names the pod (`authentication.kubernetes.io/pod-name`,
//!    `pod-uid`); the pod exists with that UID and is scheduled on a node; when the review
//!    names the node too (Kubernetes 1.32+), it is the pod's node.
//! 6. The node exists (and has the UID the review names, if any).
//!
//! The same node attesting again gets the same ID (a restarted agent keeps it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, PostParams};

use crate::selector::{K8S_PSAT_TYPE, Selector};

/// The audience agents' tokens must carry unless a cluster names another.
pub const DEFAULT_AUDIENCE: &str = "writ-server";
/// Where the agent reads its token unless configured otherwise.
pub const DEFAULT_TOKEN_PATH: &str = "/var/run/secrets/tokens/writ-agent";
/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest one Kubernetes API call may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The token review's extra keys naming the pod and node.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const EXTRA_NODE_UID: &str = "authentication.kubernetes.io/node-uid";

/// Why a PSAT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PsatError {
    /// No cluster of this name is configured.
    #[error("k8s_psat: cluster {cluster:?} is not configured on this server")]
    UnknownCluster {
        /// The cluster named by the agent (at most 64 characters).
        cluster: String,
    },
    /// The token is not a JWT (or too long).
    #[error("k8s_psat: malformed token: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// The token is not for this server's audience.
    #[error("k8s_psat: token audience {found:?} does not include {expected:?}")]
    WrongAudience {
        /// The audience the cluster requires.
        expected: String,
        /// The audiences the token carries.
        found: Vec<String>,
    },
    /// The token has expired.
    #[error("k8s_psat: token expired at {exp} (Unix seconds)")]
    Expired {
        /// Its `exp`.
        exp: i64,
    },
    /// The cluster's API server did not authenticate the token (revoked, signed by
    /// another cluster, its pod deleted, ...).
    #[error(
        "k8s_psat: the API server of cluster {cluster:?} did not authenticate the token: {reason}"
    )]
    Unauthenticated {
        /// The cluster asked.
        cluster: String,
        /// The API server's reason.
        reason: String,
    },
    /// The token is not a service account's.
    #[error("k8s_psat: {username:?} is not a service account")]
    NotServiceAccount {
        /// The authenticated user name (at most 128 characters).
        username: String,
    },
    /// The service account is not in the cluster's allow list.
    #[error("k8s_psat: service account {namespace}:{name} is not allowed for cluster {cluster:?}")]
    ServiceAccountNotAllowed {
        /// The cluster.
        cluster: String,
        /// The service account's namespace.
        namespace: String,
        /// The service account's name.
        name: String,
    },
    /// The token review names no pod (not a pod-bound token).
    #[error("k8s_psat: the token is not bound to a pod")]
    NotPodBound,
    /// The pod or node the token is bound to is not the one the API server has.
    #[error("k8s_psat: {reason}")]
    PodMismatch {
        /// What does not match.
        reason: String,
    },
    /// The cluster's API server could not be asked.
    #[error("k8s_psat: cannot ask the API server of cluster {cluster:?}: {detail}")]
    Api {
        /// The cluster.
        cluster: String,
        /// Why.
        detail: String,
    },
}

/// `[node_attestors.k8s_psat.clusters.<name>]` as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8sPsatCluster {
    /// `"<namespace>:<service account>"` entries allowed to attest as agents.
    #[serde(default)]
    pub service_account_allow_list: Vec<String>,
    /// The audience agents' tokens must carry (`writ-server`).
    pub audience: Option<String>,
    /// A kubeconfig file for this cluster's API server; without it, the in-cluster
    /// configuration (the server's own service account) is used.
    pub kube_config_file: Option<PathBuf>,
}

/// `[node_attestors.k8s_psat]` as written.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileK8sPsat {
    /// Clusters by name.
    #[serde(default)]
    pub clusters: BTreeMap<String, FileK8sPsatCluster>,
}

/// One cluster's validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPsatCluster {
    /// Allowed `(namespace, service account)` pairs.
    pub allowed: BTreeSet<(String, String)>,
    /// The required audience.
    pub audience: String,
    /// The kubeconfig file, or `None` for in-cluster.
    pub kube_config_file: Option<PathBuf>,
}

/// The validated `[node_attestors.k8s_psat]`: empty when no cluster is configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sPsatConfig {
    /// Clusters by name.
    pub clusters: BTreeMap<String, K8sPsatCluster>,
}

/// Whether `s` can be one segment of a SPIFFE ID path (`[A-Za-z0-9._-]`, not `.`/`..`).
fn is_path_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl TryFrom<FileK8sPsat> for K8sPsatConfig {
    type Error = String;

    fn try_from(file: FileK8sPsat) -> Result<Self, String> {
        let mut clusters = BTreeMap::new();
        for (name, c) in file.clusters {
            if !is_path_segment(&name) {
                return Err(format!(
                    "cluster name {name:?} must be letters, digits, '.', '_' or '-' (it goes in agent IDs)"
                ));
            }
            let mut allowed = BTreeSet::new();
            for entry in &c.service_account_allow_list {
                match entry.split_once(':') {
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
                        allowed.insert((ns.to_owned(), sa.to_owned()));
                    }
                    _ => {
                        return Err(format!(
                            "cluster {name:?}: service_account_allow_list entry {entry:?} is not \"<namespace>:<name>\""
                        ));
                    }
                }
            }
            if allowed.is_empty() {
                return Err(format!(
                    "cluster {name:?}: service_account_allow_list is empty (no agent could attest)"
                ));
            }
            let audience = c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.to_owned());
            if audience.is_empty() {
                return Err(format!("cluster {name:?}: audience is empty"));
            }
            clusters.insert(
                name,
                K8sPsatCluster {
                    allowed,
                    audience,
                    kube_config_file: c.kube_config_file,
                },
            );
        }
        Ok(Self { clusters })
    }
}

/// What a successful attestation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatAttestation {
    /// The cluster.
    pub cluster: String,
    /// The node's UID (the last segment of the agent ID).
    pub node_uid: String,
    /// The node selectors (`k8s_psat:cluster:<c>`, `k8s_psat:agent_ns:<ns>`, ...).
    pub selectors: Vec<Selector>,
}

/// The claims of a PSAT read for early refusals only (unverified).
#[derive(Debug, serde::Deserialize)]
struct UnverifiedClaims {
    #[serde(default)]
    aud: Audience,
    exp: Option<i64>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn list(self) -> Vec<String> {
        match self {
            Audience::None => Vec::new(),
            Audience::One(a) => vec![a],
            Audience::Many(v) => v,
        }
    }
}

/// Reads the claims of a JWT without verifying it.
fn unverified_claims(token: &str) -> Result<UnverifiedClaims, PsatError> {
    let malformed = |reason: &str| PsatError::Malformed {
        reason: reason.to_owned(),
    };
    if token.len() > MAX_TOKEN_LEN {
        return Err(malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a JWT (three dot-separated parts)"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| malformed("the claims are not base64url"))?;
    serde_json::from_slice(&bytes).map_err(|e| PsatError::Malformed {
        reason: format!("the claims are not JSON: {e}"),
    })
}

/// The server's k8s_psat verifier: one Kubernetes client per configured cluster, made
/// on first use.
pub struct PsatVerifier {
    config: K8sPsatConfig,
    clients: tokio::sync::Mutex<BTreeMap<String, kube::Client>>,
}

impl std::fmt::Debug for PsatVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PsatVerifier")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PsatVerifier {
    /// A verifier for the configured clusters.
    pub fn new(config: K8sPsatConfig) -> Self {
        Self {
            config,
            clients: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether any cluster is configured.
    pub fn is_enabled(&self) -> bool {
        !self.config.clusters.is_empty()
    }

    async fn client(
        &self,
        name: &str,
        cluster: &K8sPsatCluster,
    ) -> Result<kube::Client, PsatError> {
        let api = |detail: String| PsatError::Api {
            cluster: name.to_owned(),
            detail,
        };
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(name) {
            return Ok(c.clone());
        }
        let mut config = match &cluster.kube_config_file {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| api(format!("kube_config_file {}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                    .await
                    .map_err(|e| api(format!("kube_config_file {}: {e}", path.display())))?
            }
            None => {
                kube::Config::incluster().map_err(|e| api(format!("in-cluster config: {e}")))?
            }
        };
        config.default_retry = false;
        config.read_timeout = Some(API_TIMEOUT);
        let client = kube::Client::try_from(config).map_err(|e| api(e.to_string()))?;
        clients.insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// Verifies `token` as a PSAT of `cluster` at `now` (Unix seconds).
    ///
    /// # Errors
    /// [`PsatError`] naming the first check that failed.
    pub async fn verify(
        &self,
        cluster_name: &str,
        token: &str,
        now: i64,
    ) -> Result<PsatAttestation, PsatError> {
        let claims = unverified_claims(token)?;
        let cluster =
            self.config
                .clusters
                .get(cluster_name)
                .ok_or_else(|| PsatError::UnknownCluster {
                    cluster: cluster_name.chars().take(64).collect(),
                })?;
        let audiences = claims.aud.list();
        if !audiences.contains(&cluster.audience) {
            return Err(PsatError::WrongAudience {
                expected: cluster.audience.clone(),
                found: audiences,
            });
        }
        if let Some(exp) = claims.exp
            && exp <= now
        {
            return Err(PsatError::Expired { exp });
        }
        let client = self.client(cluster_name, cluster).await?;
        let api_err = |detail: String| PsatError::Api {
            cluster: cluster_name.to_owned(),
            detail,
        };
        let timed = |what: &'static str| {
            move |_| api_err(format!("{what}: no answer within {API_TIMEOUT:?}"))
        };

        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![cluster.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = tokio::time::timeout(
            API_TIMEOUT,
            Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &review),
        )
        .await
        .map_err(timed("token review"))?
        .map_err(|e| api_err(format!("token review: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(PsatError::Unauthenticated {
                cluster: cluster_name.to_owned(),
                reason: status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned())
                    .chars()
                    .take(256)
                    .collect(),
            });
        }
        if let Some(reviewed_aud) = &status.audiences
            && !reviewed_aud.contains(&cluster.audience)
        {
            return Err(PsatError::WrongAudience {
                expected: cluster.audience.clone(),
                found: reviewed_aud.clone(),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(|| PsatError::NotServiceAccount {
                username: username.chars().take(128).collect(),
            })?;
        if !cluster
            .allowed
            .contains(&(namespace.to_owned(), sa.to_owned()))
        {
            return Err(PsatError::ServiceAccountNotAllowed {
                cluster: cluster_name.to_owned(),
                namespace: namespace.to_owned(),
                name: sa.to_owned(),
            });
        }
        let extra = user.extra.unwrap_or_default();
        let one = |key: &str| {
            extra
                .get(key)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
            return Err(PsatError::NotPodBound);
        };

        let pod: Pod = tokio::time::timeout(
            API_TIMEOUT,
            Api::<Pod>::namespaced(client.clone(), namespace).get_opt(&pod_name),
        )
        .await
        .map_err(timed("pod lookup"))?
        .map_err(|e| api_err(format!("pod {namespace}/{pod_name}: {e}")))?
        .ok_or_else(|| PsatError::PodMismatch {
            reason: format!("pod {namespace}/{pod_name} of the token does not exist"),
        })?;
        if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
            return Err(PsatError::PodMismatch {
                reason: format!(
                    "pod {namespace}/{pod_name} has UID {:?}, the token is bound to {pod_uid:?} (a former pod of that name)",
                    pod.metadata.uid.as_deref().unwrap_or("")
                ),
            });
        }
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| PsatError::PodMismatch {
                reason: format!("pod {namespace}/{pod_name} is not scheduled on a node"),
            })?;
        if let Some(claimed) = one(EXTRA_NODE_NAME)
            && claimed != node_name
        {
            return Err(PsatError::PodMismatch {
                reason: format!(
                    "the token is bound to node {claimed:?} but pod {namespace}/{pod_name} is on node {node_name:?}"
                ),
            });
        }
        let node: Node =
            tokio::time::timeout(API_TIMEOUT, Api::<Node>::all(client).get_opt(&node_name))
                .await
                .map_err(timed("node lookup"))?
                .map_err(|e| api_err(format!("node {node_name}: {e}")))?
                .ok_or_else(|| PsatError::PodMismatch {
                    reason: format!(
                        "node {node_name:?} of pod {namespace}/{pod_name} does not exist"
                    ),
                })?;
        let node_uid = node
            .metadata
            .uid
            .clone()
            .filter(|u| is_path_segment(u))
            .ok_or_else(|| PsatError::PodMismatch {
                reason: format!("node {node_name:?} has no usable UID"),
            })?;
        if let Some(claimed) = one(EXTRA_NODE_UID)
            && claimed != node_uid
        {
            return Err(PsatError::PodMismatch {
                reason: format!(
                    "the token is bound to node UID {claimed:?} but node {node_name:?} has UID {node_uid:?}"
                ),
            });
        }

        let mut values = vec![
            format!("cluster:{cluster_name}"),
            format!("agent_ns:{namespace}"),
            format!("agent_sa:{sa}"),
            format!("agent_pod_name:{pod_name}"),
            format!("agent_pod_uid:{pod_uid}"),
            format!("agent_node_name:{node_name}"),
            format!("agent_node_uid:{node_uid}"),
        ];
        for (k, v) in node.metadata.labels.iter().flatten() {
            values.push(format!("agent_node_label:{k}:{v}"));
        }
        let mut selectors: Vec<Selector> = values
            .iter()
            .filter_map(|v| Selector::new(K8S_PSAT_TYPE, v).ok())
            .collect();
        selectors.sort();
        selectors.dedup();
        Ok(PsatAttestation {
            cluster: cluster_name.to_owned(),
            node_uid,
            selectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"fixture"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"not-a-signature")
        )
    }

    fn verifier() -> PsatVerifier {
        let file: FileK8sPsat =
            toml::from_str("[clusters.prod]\nservice_account_allow_list = [\"writ:writ-agent\"]\n")
                .unwrap();
        PsatVerifier::new(K8sPsatConfig::try_from(file).unwrap())
    }

    #[tokio::test]
    async fn early_refusals_need_no_api_server() {
        let v = verifier();
        let good = serde_json::json!({"aud": ["writ-server"], "exp": 2_000});
        assert_eq!(
            v.verify("staging", &jwt(&good), 1_000).await.unwrap_err(),
            PsatError::UnknownCluster {
                cluster: "staging".into()
            }
        );
        let wrong = serde_json::json!({"aud": "kubernetes", "exp": 2_000});
        assert!(matches!(
            v.verify("prod", &jwt(&wrong), 1_000).await.unwrap_err(),
            PsatError::WrongAudience { .. }
        ));
        assert_eq!(
            v.verify("prod", &jwt(&good), 3_000).await.unwrap_err(),
            PsatError::Expired { exp: 2_000 }
        );
        for garbage in [
            "",
            "a.b",
            "a.b.c.d",
            "a.!!!.c",
            &"x".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(
                    v.verify("prod", garbage, 1_000).await.unwrap_err(),
                    PsatError::Malformed { .. }
                ),
                "{garbage:.20}"
            );
        }
    }

    #[test]
    fn config_is_validated() {
        let load =
            |text: &str| K8sPsatConfig::try_from(toml::from_str::<FileK8sPsat>(text).unwrap());
        let ok = load(
            "[clusters.prod]\nservice_account_allow_list = [\"writ:writ-agent\"]\naudience = \"x\"",
        )
        .unwrap();
        assert_eq!(ok.clusters["prod"].audience, "x");
        for bad in [
            "[clusters.prod]\nservice_account_allow_list = []",
            "[clusters.prod]\nservice_account_allow_list = [\"writ\"]",
            "[clusters.prod]\nservice_account_allow_list = [\":sa\"]",
            "[clusters.\"a/b\"]\nservice_account_allow_list = [\"writ:a\"]",
            "[clusters.\"..\"]\nservice_account_allow_list = [\"writ:a\"]",
            "[clusters.prod]\nservice_account_allow_list = [\"writ:a\"]\naudience = \"\"",
        ] {
            assert!(load(bad).is_err(), "{bad}");
        }
    }
}
