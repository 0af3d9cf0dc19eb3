//! Selectors: `type:value` facts about a node or workload (`unix:uid:1000`), the way
//! SPIRE writes them.
//!
//! ```
//! use writ_identity::selector::Selector;
//! let s: Selector = "unix:uid:1000".parse()?;
//! assert_eq!(s.kind(), "unix");
//! assert_eq!(s.value(), "uid:1000");
//! # Ok::<(), writ_identity::selector::SelectorError>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// Longest selector type, in bytes.
pub const MAX_TYPE_LEN: usize = 64;
/// Longest selector value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;
/// Most selectors one registration entry, or one workload lookup, may carry.
pub const MAX_SELECTORS: usize = 64;
/// The selector type of the `unix` workload attestor.
pub const UNIX_TYPE: &str = "unix";
/// The keys of `unix` selectors (`unix:<key>:<value>`), as the attestor produces them.
pub const UNIX_KEYS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "supplementary_gid",
    "supplementary_group",
    "path",
    "sha256",
];
/// The selector type of the `docker` workload attestor.
pub const DOCKER_TYPE: &str = "docker";
/// The keys of `docker` selectors (`docker:label:<key>:<value>`,
/// `docker:image_id:<image>`, `docker:env:<NAME>=<value>`), as SPIRE writes them.
pub const DOCKER_KEYS: &[&str] = &["label", "image_id", "env"];
/// The node selector type of join-token attestation: `join_token:<SHA-256 of the
/// token, hex>`, which a node alias made by `writ token generate --spiffe-id` selects.
pub const JOIN_TOKEN_TYPE: &str = "join_token";
/// The selector types Writ's attestors produce (for messages that name them).
pub const KNOWN_TYPES: &[&str] = &[
    UNIX_TYPE,
    DOCKER_TYPE,
    K8S_TYPE,
    K8S_PSAT_TYPE,
    INTERNAL_TYPE,
];
/// The selector type of the Kubernetes workload attestor (`k8s:ns:default`).
pub const K8S_TYPE: &str = "k8s";
/// The keys of `k8s` selectors (`k8s:<key>:<value>`), as SPIRE names them.
pub const K8S_KEYS: &[&str] = &[
    "ns",
    "sa",
    "pod-name",
    "pod-uid",
    "pod-label",
    "pod-owner",
    "pod-owner-uid",
    "pod-image",
    "pod-image-count",
    "pod-init-image",
    "pod-init-image-count",
    "container-name",
    "container-image",
    "node-name",
];
/// The selector type of `k8s_psat` node attestation (`k8s_psat:cluster:prod`).
pub const K8S_PSAT_TYPE: &str = "k8s_psat";
/// The keys of `k8s_psat` node selectors, as SPIRE names them.
pub const K8S_PSAT_KEYS: &[&str] = &[
    "cluster",
    "agent_ns",
    "agent_sa",
    "agent_pod_name",
    "agent_pod_uid",
    "agent_node_name",
    "agent_node_uid",
    "agent_node_label",
];
/// The selector type of Writ's internal selectors (`writ:dev:self`, which `writ dev`
/// gives its own process). Only entries Writ makes itself may carry one.
pub const INTERNAL_TYPE: &str = "writ";
/// The internal selector values Writ knows (`writ:<value>`).
pub const INTERNAL_VALUES: &[&str] = &["dev:self"];

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `:` between type and value.
    #[error("selector {0:?} is not of the form type:value")]
    MissingSeparator(String),
    /// The type part is empty.
    #[error("selector type is empty")]
    EmptyType,
    /// The value part is empty.
    #[error("selector value is empty")]
    EmptyValue,
    /// The type has a character outside `[a-z0-9_-]`.
    #[error("selector type may hold only lowercase letters, digits, '_' and '-' (found {found:?})")]
    BadTypeChar {
        /// The offending character.
        found: char,
    },
    /// The value has a control character.
    #[error("selector value must not contain control characters")]
    ControlChar,
    /// The type is too long.
    #[error("selector type is longer than {max} bytes")]
    TypeTooLong {
        /// The limit.
        max: usize,
    },
    /// The value is too long.
    #[error("selector value is longer than {max} bytes")]
    ValueTooLong {
        /// The limit.
        max: usize,
    },
    /// More selectors than allowed.
    #[error("more than {max} selectors")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// A selector of a type Writ knows has a value no attestor can produce.
    #[error("{selector}: {reason}")]
    BadValue {
        /// The selector (at most 80 characters of it).
        selector: String,
        /// What its value should look like.
        reason: String,
    },
    /// The type is a `unix` key: the `unix:` prefix is missing.
    #[error("{selector} has no selector type (did you mean unix:{selector}?)")]
    MissingType {
        /// The selector as given (at most 80 characters of it).
        selector: String,
    },
    /// A selector of Writ's internal type, which only Writ's own entries carry.
    #[error("{selector}: the selector type {INTERNAL_TYPE} is Writ's own")]
    Internal {
        /// The selector (at most 80 characters of it).
        selector: String,
    },
    /// The same selector appears twice in one entry.
    #[error("{selector} is given twice")]
    Duplicate {
        /// The selector (at most 80 characters of it).
        selector: String,
    },
}

/// Whether a selector's type is one Writ checks ([`Selector::check_value`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SelectorType {
    /// A type Writ's attestors produce; its value has the shape they give it.
    Known,
    /// A type no attestor of Writ produces: accepted unchecked (it may come from a
    /// plugin or a newer agent), and an entry with it matches only what reports it.
    Unknown,
}

/// One validated selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// A selector from its two parts.
    ///
    /// # Errors
    /// [`SelectorError`] if either part breaks a rule.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        if kind.is_empty() {
            return Err(SelectorError::EmptyType);
        }
        if kind.len() > MAX_TYPE_LEN {
            return Err(SelectorError::TypeTooLong { max: MAX_TYPE_LEN });
        }
        if let Some(found) = kind
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        {
            return Err(SelectorError::BadTypeChar { found });
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue);
        }
        if value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::ValueTooLong { max: MAX_VALUE_LEN });
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar);
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The selector type (`unix`, `join_token`, ...).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value (`uid:1000`).
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Checks that a selector of a type Writ knows has a value its attestor can produce
    /// (`unix:uid:<0..=4294967295>`, `unix:path:<absolute path>`, `unix:sha256:<64 hex>`,
    /// `writ:dev:self`...), and that a bare `unix` key (`uid:0`) is not mistaken for a
    /// type. Says whether the type is known; values of unknown types are not checked.
    ///
    /// # Errors
    /// [`SelectorError::BadValue`] or [`SelectorError::MissingType`].
    pub fn check_value(&self) -> Result<SelectorType, SelectorError> {
        let shown = || self.to_string().chars().take(80).collect::<String>();
        let bad = |reason: String| SelectorError::BadValue {
            selector: shown(),
            reason,
        };
        match self.kind.as_str() {
            UNIX_TYPE => {
                let (key, value) = self.value.split_once(':').unwrap_or((&self.value, ""));
                check_unix_value(key, value).map_err(bad)?;
                Ok(SelectorType::Known)
            }
            DOCKER_TYPE => {
                let (key, value) = self.value.split_once(':').unwrap_or((&self.value, ""));
                check_docker_value(key, value).map_err(bad)?;
                Ok(SelectorType::Known)
            }
            K8S_TYPE | K8S_PSAT_TYPE => {
                check_keyed_value(&self.kind, &self.value).map_err(bad)?;
                Ok(SelectorType::Known)
            }
            JOIN_TOKEN_TYPE => {
                let hex = self.value.len() == 64
                    && self
                        .value
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                if !hex {
                    return Err(bad(
                        "join_token selectors are join_token:<SHA-256 of the token, 64 lowercase hex digits>"
                            .to_owned(),
                    ));
                }
                Ok(SelectorType::Known)
            }
            INTERNAL_TYPE => {
                if !INTERNAL_VALUES.contains(&self.value.as_str()) {
                    return Err(bad(format!(
                        "the {INTERNAL_TYPE} selectors are {}",
                        INTERNAL_VALUES
                            .iter()
                            .map(|v| format!("{INTERNAL_TYPE}:{v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                Ok(SelectorType::Known)
            }
            kind if UNIX_KEYS.contains(&kind) => {
                Err(SelectorError::MissingType { selector: shown() })
            }
            _ => Ok(SelectorType::Unknown),
        }
    }
}

/// The shape of `unix:<key>:<value>` as the `unix` attestor writes it, or why not.
fn check_unix_value(key: &str, value: &str) -> Result<(), String> {
    let id = |what: &str| {
        // The attestor writes ids as plain decimal numbers: `007` or `+7` never match.
        if value.parse::<u32>().is_ok_and(|n| n.to_string() == value) {
            Ok(())
        } else {
            Err(format!(
                "{what} must be a decimal number from 0 to {}",
                u32::MAX
            ))
        }
    };
    match key {
        "uid" | "gid" | "supplementary_gid" => id(key),
        "user" | "group" | "supplementary_group" if value.is_empty() => {
            Err(format!("the {key} name is empty"))
        }
        "user" | "group" | "supplementary_group" => Ok(()),
        "path" if value.starts_with('/') => Ok(()),
        "path" => Err("path must be absolute (start with /)".to_owned()),
        "sha256"
            if value.len() == 64
                && value
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(())
        }
        "sha256" => Err("sha256 must be 64 lowercase hex digits".to_owned()),
        _ => Err(format!(
            "unix selectors are unix:<key>:<value> with key one of {}",
            UNIX_KEYS.join(", ")
        )),
    }
}

/// The shape of `docker:<key>:<value>` as the `docker` attestor writes it, or why not.
fn check_docker_value(key: &str, value: &str) -> Result<(), String> {
    match key {
        "label" => match value.split_once(':') {
            Some((name, _)) if !name.is_empty() => Ok(()),
            _ => Err(
                "docker labels are docker:label:<key>:<value> (the value may be empty)".to_owned(),
            ),
        },
        "image_id" if value.is_empty() => Err("the image is empty".to_owned()),
        "image_id" => Ok(()),
        "env" => match value.split_once('=') {
            Some((name, _)) if !name.is_empty() && !name.contains(':') => Ok(()),
            _ => Err(
                "docker environment variables are docker:env:<NAME>=<value>, as SPIRE writes them"
                    .to_owned(),
            ),
        },
        _ => Err(format!(
            "docker selectors are docker:<key>:<value> with key one of {}",
            DOCKER_KEYS.join(", ")
        )),
    }
}

/// The shape of `k8s:<key>:<value>` and `k8s_psat:<key>:<value>`: a known key, a
/// non-empty value, and for the label keys (`pod-label`, `agent_node_label`) and the
/// owner keys a non-empty `<name>:` before the value.
fn check_keyed_value(kind: &str, value: &str) -> Result<(), String> {
    let keys = if kind == K8S_TYPE {
        K8S_KEYS
    } else {
        K8S_PSAT_KEYS
    };
    let (key, rest) = value.split_once(':').unwrap_or((value, ""));
    if !keys.contains(&key) {
        return Err(format!(
            "{kind} selectors are {kind}:<key>:<value> with key one of {}",
            keys.join(", ")
        ));
    }
    if rest.is_empty() {
        return Err(format!("the {key} value is empty"));
    }
    let two_part = matches!(
        key,
        "pod-label" | "pod-owner" | "pod-owner-uid" | "agent_node_label"
    );
    if two_part && rest.split_once(':').is_none_or(|(name, _)| name.is_empty()) {
        return Err(format!("{key} values are {key}:<name>:<value>"));
    }
    Ok(())
}

/// Sorts, removes duplicates and enforces [`MAX_SELECTORS`].
///
/// # Errors
/// [`SelectorError::TooMany`] past the limit.
pub fn normalize(mut selectors: Vec<Selector>) -> Result<Vec<Selector>, SelectorError> {
    selectors.sort();
    selectors.dedup();
    if selectors.len() > MAX_SELECTORS {
        return Err(SelectorError::TooMany { max: MAX_SELECTORS });
    }
    Ok(selectors)
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| SelectorError::MissingSeparator(s.chars().take(80).collect()))?;
        Self::new(kind, value)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let s: Selector = "unix:uid:1000".parse().unwrap();
        assert_eq!(s.to_string(), "unix:uid:1000");
        assert_eq!(
            "nocolon".parse::<Selector>(),
            Err(SelectorError::MissingSeparator("nocolon".into()))
        );
        assert_eq!(":x".parse::<Selector>(), Err(SelectorError::EmptyType));
        assert_eq!("unix:".parse::<Selector>(), Err(SelectorError::EmptyValue));
        assert_eq!(
            "Unix:x".parse::<Selector>(),
            Err(SelectorError::BadTypeChar { found: 'U' })
        );
        assert_eq!(
            "unix:a\nb".parse::<Selector>(),
            Err(SelectorError::ControlChar)
        );
    }

    #[test]
    fn known_types_have_checked_values() {
        let check = |s: &str| s.parse::<Selector>().unwrap().check_value();
        for good in [
            "unix:uid:0",
            "unix:uid:4294967295",
            "unix:gid:1000",
            "unix:supplementary_gid:27",
            "unix:user:alice",
            "unix:group:writ-txn",
            "unix:supplementary_group:docker",
            "unix:path:/usr/bin/python3",
            &format!("unix:sha256:{}", "ab01".repeat(16)),
            "writ:dev:self",
            "docker:label:app:a",
            "docker:label:com.example.tier:web:1",
            "docker:label:empty:",
            "docker:image_id:writ-demo:1",
            "docker:image_id:sha256:77af4d6b9913",
            "docker:env:TENANT=acme",
            "docker:env:EMPTY=",
            "k8s:ns:default",
            "k8s:pod-label:app:web",
            "k8s_psat:cluster:prod",
            "k8s_psat:agent_node_label:topology.kubernetes.io/zone:a",
        ] {
            assert_eq!(check(good), Ok(SelectorType::Known), "{good}");
        }
        assert_eq!(
            check(&format!("join_token:{}", "0f".repeat(32))),
            Ok(SelectorType::Known)
        );
        assert!(check("join_token:x").is_err());
        for unknown in ["aws_iid:x", "spiffe_id:spiffe://example.org/x"] {
            assert_eq!(check(unknown), Ok(SelectorType::Unknown), "{unknown}");
        }
        for (bad, why) in [
            ("unix:uid:", "decimal number"),
            ("unix:uid:abc", "decimal number"),
            ("unix:uid:-1", "decimal number"),
            ("unix:uid:4294967296", "decimal number"),
            ("unix:uid:007", "decimal number"),
            ("unix:gid:+1", "decimal number"),
            ("unix:user:", "name is empty"),
            ("unix:path:bin/sh", "absolute"),
            ("unix:sha256:ABCD", "64 lowercase hex"),
            ("unix:1000", "key one of uid, gid"),
            ("unix:pid:1", "key one of"),
            ("writ:dev:other", "writ:dev:self"),
            ("docker:label:app", "docker:label:<key>:<value>"),
            ("docker:label::a", "docker:label:<key>:<value>"),
            ("docker:image_id:", "image is empty"),
            ("docker:env:TENANT:acme", "<NAME>=<value>"),
            ("docker:env:=x", "<NAME>=<value>"),
            ("docker:name:x", "key one of label, image_id, env"),
            ("k8s:namespace:default", "key one of ns, sa"),
            ("k8s:ns", "ns value is empty"),
            ("k8s:pod-label:app", "pod-label:<name>:<value>"),
            (
                "k8s_psat:agent_node_label::x",
                "agent_node_label:<name>:<value>",
            ),
            ("k8s_psat:node:x", "key one of cluster"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(
                matches!(err, SelectorError::BadValue { .. }),
                "{bad}: {err:?}"
            );
            assert!(err.to_string().starts_with(bad), "{bad}: {err}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
        assert_eq!(
            check("uid:0").unwrap_err().to_string(),
            "uid:0 has no selector type (did you mean unix:uid:0?)"
        );
    }

    #[test]
    fn normalize_dedups_and_limits() {
        let a: Selector = "a:1".parse().unwrap();
        let out = normalize(vec![a.clone(), a.clone()]).unwrap();
        assert_eq!(out, vec![a]);
        let many = (0..=MAX_SELECTORS)
            .map(|i| Selector::new("t", &i.to_string()).unwrap())
            .collect();
        assert_eq!(
            normalize(many),
            Err(SelectorError::TooMany { max: MAX_SELECTORS })
        );
    }
}
