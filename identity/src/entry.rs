//! Registration entries: which workloads (by selectors, under which parent) get which
//! SPIFFE ID, with what TTLs — SPIRE's registration entry, plus Writ's spawn policy.

use std::time::Duration;

use crate::selector::{self, Selector, SelectorError};
use crate::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};

/// Longest DNS name accepted on an entry.
pub const MAX_DNS_NAME_LEN: usize = 253;
/// Most DNS names on one entry.
pub const MAX_DNS_NAMES: usize = 32;
/// Most federated trust domains on one entry.
pub const MAX_FEDERATES_WITH: usize = 32;
/// Longest hint.
pub const MAX_HINT_LEN: usize = 256;
/// Longest SVID TTL an entry may ask for (the CA caps it further).
pub const MAX_SVID_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a registration entry is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// A SPIFFE ID field is malformed.
    #[error("{field}: {source}")]
    SpiffeId {
        /// Which field.
        field: &'static str,
        /// Why.
        source: SpiffeIdError,
    },
    /// A selector is malformed or there are too many.
    #[error("selector: {0}")]
    Selector(#[from] SelectorError),
    /// An entry must have at least one selector.
    #[error("an entry needs at least one selector")]
    NoSelectors,
    /// A TTL is out of range.
    #[error("{field} must be at most {max_secs} seconds")]
    TtlTooLong {
        /// Which field.
        field: &'static str,
        /// The limit.
        max_secs: u64,
    },
    /// A DNS name is malformed.
    #[error("invalid DNS name {0:?}")]
    DnsName(String),
    /// Too many items in a list field.
    #[error("{field} holds more than {max} items")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// The hint is too long or has control characters.
    #[error("hint must be at most {max} printable bytes")]
    Hint {
        /// The limit.
        max: usize,
    },
    /// The entry's SPIFFE ID is in another trust domain.
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// The ID.
        id: String,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// The spawn depth is out of range.
    #[error("spawn_max_depth must be between 1 and {max}")]
    SpawnDepth {
        /// The limit.
        max: u32,
    },
    /// The SPIFFE ID uses the `sub` path segment, which only sub-agent leases may use.
    #[error("SPIFFE ID {0} uses the path segment `sub`, reserved for sub-agents")]
    ReservedSegment(String),
    /// The cap on live sub-agents is out of range.
    #[error("spawn_max_children must be between 1 and {max}")]
    SpawnChildren {
        /// The limit.
        max: u32,
    },
}

/// Deepest sub-agent nesting a spawn policy may allow.
pub const MAX_SPAWN_DEPTH: u32 = 8;
/// Most live sub-agents a spawn policy may allow one workload to hold at once.
pub const MAX_SPAWN_CHILDREN: u32 = 1024;
/// The cap on live sub-agents when an entry that can spawn sets none.
pub const DEFAULT_SPAWN_MAX_CHILDREN: u32 = 16;

/// A registration entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegistrationEntry {
    /// Unique id (a UUID assigned at creation).
    pub id: String,
    /// The identity issued to matching workloads.
    pub spiffe_id: SpiffeId,
    /// The agent (or entry) under which the workload must run.
    pub parent_id: SpiffeId,
    /// All of these must hold of a workload for it to match. Sorted, no duplicates.
    pub selectors: Vec<Selector>,
    /// X509-SVID lifetime in seconds; 0 means the server default.
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime in seconds; 0 means the server default.
    pub jwt_svid_ttl: u64,
    /// DNS SANs added to the X509-SVID.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the workload also receives.
    pub federates_with: Vec<TrustDomain>,
    /// Whether the workload may use the admin API.
    pub admin: bool,
    /// Whether the workload is a downstream CA.
    pub downstream: bool,
    /// Unix seconds after which the entry no longer applies.
    pub expires_at: Option<i64>,
    /// A free-form hint passed to workloads.
    pub hint: String,
    /// Bumped on every update; starts at 1.
    pub revision: i64,
    /// Unix seconds at creation.
    pub created_at: i64,
    /// Longest lifetime, in seconds, of a sub-agent SVID spawned by this workload; `None`
    /// forbids spawning.
    pub spawn_max_ttl: Option<u64>,
    /// Deepest chain of sub-agents under this workload; `None` forbids spawning.
    pub spawn_max_depth: Option<u32>,
    /// Most live sub-agents this workload may hold at once; `None` means the default cap
    /// [`DEFAULT_SPAWN_MAX_CHILDREN`] (16) when the entry can spawn.
    pub spawn_max_children: Option<u32>,
}

impl RegistrationEntry {
    /// An entry with a fresh id and defaults, to be completed by the caller.
    pub fn new(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: Vec<Selector>) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            dns_names: Vec::new(),
            federates_with: Vec::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            hint: String::new(),
            revision: 0,
            created_at: 0,
            spawn_max_ttl: None,
            spawn_max_depth: None,
            spawn_max_children: None,
        }
    }

    /// Checks every field, normalizes the selector list, and checks the entry belongs to
    /// `trust_domain`.
    ///
    /// # Errors
    /// [`EntryError`] for the first field that breaks a rule.
    pub fn validate(&mut self, trust_domain: &TrustDomain) -> Result<(), EntryError> {
        if self.spiffe_id.trust_domain_str() != trust_domain.as_str() {
            return Err(EntryError::ForeignTrustDomain {
                id: self.spiffe_id.to_string(),
                trust_domain: trust_domain.to_string(),
            });
        }
        if crate::server::lease::is_sub_agent_id(&self.spiffe_id) {
            return Err(EntryError::ReservedSegment(self.spiffe_id.to_string()));
        }
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        self.selectors = selector::normalize(std::mem::take(&mut self.selectors))?;
        for (field, ttl) in [
            ("x509_svid_ttl", self.x509_svid_ttl),
            ("jwt_svid_ttl", self.jwt_svid_ttl),
            ("spawn_max_ttl", self.spawn_max_ttl.unwrap_or(0)),
        ] {
            if ttl > MAX_SVID_TTL.as_secs() {
                return Err(EntryError::TtlTooLong {
                    field,
                    max_secs: MAX_SVID_TTL.as_secs(),
                });
            }
        }
        if let Some(depth) = self.spawn_max_depth
            && !(1..=MAX_SPAWN_DEPTH).contains(&depth)
        {
            return Err(EntryError::SpawnDepth {
                max: MAX_SPAWN_DEPTH,
            });
        }
        if let Some(children) = self.spawn_max_children
            && !(1..=MAX_SPAWN_CHILDREN).contains(&children)
        {
            return Err(EntryError::SpawnChildren {
                max: MAX_SPAWN_CHILDREN,
            });
        }
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::TooMany {
                field: "dns_names",
                max: MAX_DNS_NAMES,
            });
        }
        if let Some(bad) = self.dns_names.iter().find(|n| !is_dns_name(n)) {
            return Err(EntryError::DnsName(bad.chars().take(80).collect()));
        }
        if self.federates_with.len() > MAX_FEDERATES_WITH {
            return Err(EntryError::TooMany {
                field: "federates_with",
                max: MAX_FEDERATES_WITH,
            });
        }
        if self.hint.len() > MAX_HINT_LEN || self.hint.chars().any(char::is_control) {
            return Err(EntryError::Hint { max: MAX_HINT_LEN });
        }
        Ok(())
    }

    /// The cap on live sub-agents this workload may hold at once: `spawn_max_children`,
    /// or [`DEFAULT_SPAWN_MAX_CHILDREN`] when unset. Whether the entry can spawn at all
    /// is still decided by `spawn_max_ttl`.
    pub fn spawn_children_cap(&self) -> u32 {
        self.spawn_max_children
            .unwrap_or(DEFAULT_SPAWN_MAX_CHILDREN)
    }

    /// Whether the entry can no longer be used at `now` (Unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// Whether `name` is a DNS name (optionally with a leading `*.` wildcard).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= MAX_DNS_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RegistrationEntry {
        RegistrationEntry::new(
            SpiffeId::new("spiffe://example.org/w").unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            vec!["unix:uid:1".parse().unwrap(), "unix:uid:1".parse().unwrap()],
        )
    }

    #[test]
    fn validate_normalizes_and_checks() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut e = entry();
        e.validate(&td).unwrap();
        assert_eq!(e.selectors.len(), 1);

        let mut e = entry();
        e.selectors.clear();
        assert_eq!(e.validate(&td), Err(EntryError::NoSelectors));

        let mut e = entry();
        e.x509_svid_ttl = MAX_SVID_TTL.as_secs() + 1;
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::TtlTooLong { .. })
        ));

        let mut e = entry();
        e.dns_names = vec!["bad_name".into()];
        assert!(matches!(e.validate(&td), Err(EntryError::DnsName(_))));

        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            entry().validate(&other),
            Err(EntryError::ForeignTrustDomain { .. })
        ));

        let mut e = entry();
        e.spawn_max_depth = Some(0);
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::SpawnDepth { .. })
        ));

        let mut e = entry();
        e.spiffe_id = td.spiffe_id("/agents/planner/sub/x").unwrap();
        assert!(matches!(
            e.validate(&td),
            Err(EntryError::ReservedSegment(_))
        ));
        e.spiffe_id = td.spiffe_id("/agents/planner/subway").unwrap();
        e.validate(&td).unwrap();
    }

    #[test]
    fn spawn_max_children_bounds() {
        let td = TrustDomain::new("example.org").unwrap();
        for bad in [0, MAX_SPAWN_CHILDREN + 1, u32::MAX] {
            let mut e = entry();
            e.spawn_max_children = Some(bad);
            assert_eq!(
                e.validate(&td),
                Err(EntryError::SpawnChildren {
                    max: MAX_SPAWN_CHILDREN
                }),
                "{bad}"
            );
        }
        for good in [1, MAX_SPAWN_CHILDREN] {
            let mut e = entry();
            e.spawn_max_children = Some(good);
            e.validate(&td).unwrap();
            assert_eq!(e.spawn_children_cap(), good);
        }
        let e = entry();
        assert_eq!(e.spawn_max_children, None);
        assert_eq!(e.spawn_children_cap(), DEFAULT_SPAWN_MAX_CHILDREN);
        assert_eq!(e.spawn_max_ttl, None, "a default entry still cannot spawn");
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("api.example.org"));
        assert!(is_dns_name("*.example.org"));
        assert!(!is_dns_name("-x.org"));
        assert!(!is_dns_name("a..b"));
    }
}
