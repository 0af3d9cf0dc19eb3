//! Registration entries: which workloads (by selectors, under which parent) get which
//! SPIFFE ID, with what TTLs — SPIRE's registration entry, plus Writ's spawn policy.

use std::time::Duration;

use crate::selector::{self, Selector, SelectorError};
use crate::spiffe_id::{ReservedIdError, SpiffeId, SpiffeIdError, TrustDomain};

pub mod template;

use template::{IdTemplate, TemplateError};

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

/// Why a registration entry is not acceptable. Every message starts with the name of
/// the field at fault (`spiffe_id: ...`, `selectors: ...`), as the admin API's wire
/// fields are named, so a client can point at its own flag or form field.
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
    /// A SPIFFE ID field lies in Writ's reserved namespace (`spiffe://<td>/writ/`).
    #[error("{field}: {source}")]
    Reserved {
        /// Which field.
        field: &'static str,
        /// The ID and the namespace.
        source: ReservedIdError,
    },
    /// A SPIFFE ID field has no path: the trust domain itself names no workload or agent.
    #[error(
        "{field}: {id} is the trust domain itself; a workload's or agent's ID has a path (e.g. {id}/web)"
    )]
    NoPath {
        /// Which field.
        field: &'static str,
        /// The ID.
        id: String,
    },
    /// The entry names itself as its parent.
    #[error("parent_id: an entry cannot be its own parent ({id})")]
    OwnParent {
        /// The ID given as both.
        id: String,
    },
    /// A selector is malformed, of the wrong shape, internal or repeated, or there are
    /// too many.
    #[error("selectors: {0}")]
    Selector(#[from] SelectorError),
    /// An entry must have at least one selector.
    #[error("selectors: an entry needs at least one selector")]
    NoSelectors,
    /// A TTL is out of range.
    #[error("{field}: must be at most {max_secs} seconds")]
    TtlTooLong {
        /// Which field.
        field: &'static str,
        /// The limit.
        max_secs: u64,
    },
    /// A name is neither a DNS name nor an IP address literal.
    #[error("dns_names: {0:?} is neither a DNS name nor an IP address")]
    DnsName(String),
    /// Too many items in a list field.
    #[error("{field}: holds more than {max} items")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// The limit.
        max: usize,
    },
    /// The hint is too long or has control characters.
    #[error("hint: must be at most {max} printable bytes")]
    Hint {
        /// The limit.
        max: usize,
    },
    /// A SPIFFE ID field is in another trust domain than the server's.
    #[error("{field}: SPIFFE ID {id} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// Which field.
        field: &'static str,
        /// The ID.
        id: String,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// The spawn depth is out of range.
    #[error("spawn_max_depth: must be between 1 and {max}")]
    SpawnDepth {
        /// The limit.
        max: u32,
    },
    /// The SPIFFE ID uses the `sub` path segment, which only sub-agent leases may use.
    #[error("spiffe_id: SPIFFE ID {0} uses the path segment `sub`, reserved for sub-agents")]
    ReservedSegment(String),
    /// The cap on live sub-agents is out of range.
    #[error("spawn_max_children: must be between 1 and {max}")]
    SpawnChildren {
        /// The limit.
        max: u32,
    },
    /// A spawn policy field is set without the one it needs: `spawn_max_ttl` and
    /// `spawn_max_depth` go together (either alone stores an entry every spawn of which
    /// is refused), and `spawn_max_children` needs both.
    #[error("{field}: is required with {with} (a spawn policy needs both)")]
    SpawnPolicy {
        /// The missing field.
        field: &'static str,
        /// The field that was given.
        with: &'static str,
    },
    /// A spawn TTL of zero would refuse every spawn.
    #[error("spawn_max_ttl: must be at least 1 second")]
    SpawnTtlZero,
    /// The SPIFFE ID template is malformed or could yield a refused ID.
    #[error("spiffe_id_template: {0}")]
    Template(#[from] TemplateError),
    /// A template entry's `spiffe_id` is not its stand-in (give one or the other).
    #[error(
        "spiffe_id: a template entry's SPIFFE ID comes from its template; give spiffe_id or spiffe_id_template, not both"
    )]
    TemplateAndId,
    /// A kind of entry that cannot have this field (a template entry cannot spawn or be
    /// a node alias; a node alias cannot spawn).
    #[error("{field}: {reason}")]
    NotForKind {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Deepest sub-agent nesting a spawn policy may allow.
pub const MAX_SPAWN_DEPTH: u32 = 8;
/// Most live sub-agents a spawn policy may allow one workload to hold at once.
pub const MAX_SPAWN_CHILDREN: u32 = 1024;
/// The cap on live sub-agents when an entry that can spawn sets none.
pub const DEFAULT_SPAWN_MAX_CHILDREN: u32 = 16;

/// Who makes an entry: which rules of [`RegistrationEntry::validate`] apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registrant {
    /// An operator, through the admin API.
    Operator,
    /// Writ itself (`writ dev`'s token service).
    Writ,
}

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
    /// For a template entry, the template its IDs are rendered from, per workload, from
    /// attested selector values ([`template`]); `spiffe_id` then holds the stand-in
    /// `spiffe://<td>/writ/template` ([`template::STAND_IN_PATH`]), never issued. A
    /// template entry is a leaf: never the parent of another entry.
    #[serde(default)]
    pub spiffe_id_template: Option<IdTemplate>,
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
            spiffe_id_template: None,
        }
    }

    /// A template entry: `spiffe_id` is the template's stand-in.
    ///
    /// # Errors
    /// [`EntryError::SpiffeId`] never for a parsed template (the stand-in is a valid ID).
    pub fn from_template(
        template: IdTemplate,
        parent_id: SpiffeId,
        selectors: Vec<Selector>,
    ) -> Result<Self, EntryError> {
        let stand_in = template.stand_in().map_err(|source| EntryError::SpiffeId {
            field: "spiffe_id_template",
            source,
        })?;
        let mut entry = Self::new(stand_in, parent_id, selectors);
        entry.spiffe_id_template = Some(template);
        Ok(entry)
    }

    /// Whether the entry's ID is a template, rendered per workload.
    pub fn is_template(&self) -> bool {
        self.spiffe_id_template.is_some()
    }

    /// Whether the entry is a node alias: its parent is the server's own ID
    /// (`spiffe://<td>/writ/server`) and its selectors are node selectors. Every agent
    /// whose node selectors include them holds the alias's ID as a parent, so entries
    /// under the alias apply to all those nodes (SPIRE's `entry create -node`).
    pub fn is_node_alias(&self) -> bool {
        is_server_id(&self.parent_id)
    }

    /// Checks every field of an entry an operator registers (through the admin API),
    /// sorts the selector list, and checks the entry belongs to `trust_domain`. Refused,
    /// among malformed fields: an ID in Writ's reserved namespace
    /// ([`SpiffeId::check_not_reserved`]) or with no path, a parent in another trust
    /// domain or equal to the entry's own ID, a selector of a known type with a value
    /// no attestor produces ([`Selector::check_value`]), an internal `writ:` selector, a
    /// repeated selector, and half a spawn policy. Whether the parent exists is the
    /// server's to check (it needs the store).
    ///
    /// # Errors
    /// [`EntryError`] for the first field that breaks a rule.
    pub fn validate(&mut self, trust_domain: &TrustDomain) -> Result<(), EntryError> {
        self.check(trust_domain, Registrant::Operator)
    }

    /// As [`Self::validate`], for the few entries Writ makes itself (`writ dev`'s token
    /// service): the SPIFFE ID may lie in the reserved namespace and selectors may be of
    /// the internal type `writ`. Never reachable from the admin API.
    ///
    /// # Errors
    /// As [`Self::validate`].
    pub fn validate_own(&mut self, trust_domain: &TrustDomain) -> Result<(), EntryError> {
        self.check(trust_domain, Registrant::Writ)
    }

    fn check(&mut self, trust_domain: &TrustDomain, by: Registrant) -> Result<(), EntryError> {
        if let Some(template) = &self.spiffe_id_template {
            if template.trust_domain() != trust_domain {
                return Err(EntryError::ForeignTrustDomain {
                    field: "spiffe_id_template",
                    id: template.to_string(),
                    trust_domain: trust_domain.to_string(),
                });
            }
            if template.stand_in().ok().as_ref() != Some(&self.spiffe_id) {
                return Err(EntryError::TemplateAndId);
            }
            if self.is_node_alias() {
                return Err(EntryError::NotForKind {
                    field: "spiffe_id_template",
                    reason: "a node alias has a fixed SPIFFE ID",
                });
            }
            if self.spawn_max_ttl.is_some() || self.spawn_max_depth.is_some() {
                return Err(EntryError::NotForKind {
                    field: "spawn_max_ttl",
                    reason: "a template entry cannot spawn sub-agents",
                });
            }
        }
        if self.is_node_alias() && (self.spawn_max_ttl.is_some() || self.spawn_max_depth.is_some())
        {
            return Err(EntryError::NotForKind {
                field: "spawn_max_ttl",
                reason: "a node alias names nodes, which spawn no sub-agents",
            });
        }
        for (field, id) in [
            ("spiffe_id", &self.spiffe_id),
            ("parent_id", &self.parent_id),
        ] {
            if id.trust_domain_str() != trust_domain.as_str() {
                return Err(EntryError::ForeignTrustDomain {
                    field,
                    id: id.to_string(),
                    trust_domain: trust_domain.to_string(),
                });
            }
            if id.path().is_empty() {
                return Err(EntryError::NoPath {
                    field,
                    id: id.to_string(),
                });
            }
        }
        if by == Registrant::Operator && !self.is_template() {
            self.spiffe_id
                .check_not_reserved()
                .map_err(|source| EntryError::Reserved {
                    field: "spiffe_id",
                    source,
                })?;
        }
        if crate::server::lease::is_sub_agent_id(&self.spiffe_id) {
            return Err(EntryError::ReservedSegment(self.spiffe_id.to_string()));
        }
        if self.parent_id == self.spiffe_id {
            return Err(EntryError::OwnParent {
                id: self.spiffe_id.to_string(),
            });
        }
        // A template entry may have none: its placeholders are then its requirement.
        if self.selectors.is_empty() && !self.is_template() {
            return Err(EntryError::NoSelectors);
        }
        if self.selectors.len() > selector::MAX_SELECTORS {
            return Err(SelectorError::TooMany {
                max: selector::MAX_SELECTORS,
            }
            .into());
        }
        for s in &self.selectors {
            s.check_value()?;
            if s.kind() == selector::INTERNAL_TYPE && by == Registrant::Operator {
                return Err(SelectorError::Internal {
                    selector: s.to_string().chars().take(80).collect(),
                }
                .into());
            }
        }
        self.selectors.sort();
        if let Some([twice, _]) = self
            .selectors
            .windows(2)
            .find(|w| matches!(w, [a, b] if a == b))
        {
            return Err(SelectorError::Duplicate {
                selector: twice.to_string().chars().take(80).collect(),
            }
            .into());
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
        if self.spawn_max_ttl == Some(0) {
            return Err(EntryError::SpawnTtlZero);
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
        match (
            self.spawn_max_ttl,
            self.spawn_max_depth,
            self.spawn_max_children,
        ) {
            (Some(_), None, _) => {
                return Err(EntryError::SpawnPolicy {
                    field: "spawn_max_depth",
                    with: "spawn_max_ttl",
                });
            }
            (None, Some(_), _) => {
                return Err(EntryError::SpawnPolicy {
                    field: "spawn_max_ttl",
                    with: "spawn_max_depth",
                });
            }
            (None, None, Some(_)) => {
                return Err(EntryError::SpawnPolicy {
                    field: "spawn_max_ttl",
                    with: "spawn_max_children",
                });
            }
            _ => {}
        }
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(EntryError::TooMany {
                field: "dns_names",
                max: MAX_DNS_NAMES,
            });
        }
        if let Some(bad) = self.dns_names.iter().find(|n| !is_san_name(n)) {
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

    /// Whether `other` is the same registration in every field an update can change
    /// (everything but the revision): storing it would change nothing.
    pub fn same_registration(&self, other: &RegistrationEntry) -> bool {
        let mut other = other.clone();
        other.revision = self.revision;
        *self == other
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

/// Whether `id` is the identity server's own SPIFFE ID, `spiffe://<td>/writ/server`: as
/// an entry's parent, it makes the entry a node alias.
pub fn is_server_id(id: &SpiffeId) -> bool {
    id.path() == crate::server::node_service::SERVER_PATH
}

/// Whether `name` is a DNS name (optionally with a leading `*.` wildcard).
///
/// The last label may not be all digits (RFC 3696 section 2), so a dotted string of
/// numbers such as `10.0.0` or `300.1.1.1` is not taken for a host name: an IP address
/// is an [`ip_literal`], never a DNS name.
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
        && !name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
}

/// The IP address `name` spells, if it is an IPv4 (`127.0.0.1`) or IPv6 (`::1`) literal
/// in its canonical text form: such an entry of `dns_names` becomes an IP SAN of the
/// X509-SVID (the X509-SVID standard allows SANs of any type besides the one URI SAN),
/// never a DNS SAN nor the subject's common name. No brackets, zone (`%eth0`) or
/// leading zeros.
pub fn ip_literal(name: &str) -> Option<std::net::IpAddr> {
    let ip = name.parse::<std::net::IpAddr>().ok()?;
    // `Ipv4Addr` parsing already refuses leading zeros; IPv6 must be written as Rust
    // (RFC 5952) writes it, so one address has one spelling in an entry.
    (ip.to_string() == name).then_some(ip)
}

/// Whether `name` may be one of an entry's `dns_names`: a DNS name ([`is_dns_name`]) or
/// an IP address literal ([`ip_literal`]).
pub fn is_san_name(name: &str) -> bool {
    ip_literal(name).is_some() || is_dns_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RegistrationEntry {
        RegistrationEntry::new(
            SpiffeId::new("spiffe://example.org/w").unwrap(),
            SpiffeId::new("spiffe://example.org/agent").unwrap(),
            vec!["unix:uid:2".parse().unwrap(), "unix:uid:1".parse().unwrap()],
        )
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn validate_sorts_and_checks() {
        let td = td();
        let mut e = entry();
        e.validate(&td).unwrap();
        assert_eq!(e.selectors[0].to_string(), "unix:uid:1", "sorted");

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
            Err(EntryError::ForeignTrustDomain {
                field: "spiffe_id",
                ..
            })
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

    /// Each case: what is changed, and the start of the one-line error (field first).
    #[test]
    fn what_cannot_be_meant_is_refused_naming_the_field() {
        let td = td();
        fn id(s: &str) -> SpiffeId {
            SpiffeId::new(s).unwrap()
        }
        fn sel(s: &str) -> Selector {
            s.parse().unwrap()
        }
        type Change = Box<dyn Fn(&mut RegistrationEntry)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|e| e.spiffe_id = id("spiffe://example.org/writ/server")),
                "spiffe_id: spiffe://example.org/writ/server is in the reserved namespace \
                 spiffe://example.org/writ/ (Writ's own identities)",
            ),
            (
                Box::new(|e| e.spiffe_id = id("spiffe://example.org/writ/agent/join_token/t")),
                "spiffe_id: spiffe://example.org/writ/agent/join_token/t is in the reserved",
            ),
            (
                Box::new(|e| e.spiffe_id = id("spiffe://example.org/writ/tts")),
                "spiffe_id: spiffe://example.org/writ/tts is in the reserved",
            ),
            (
                Box::new(|e| e.spiffe_id = id("spiffe://example.org")),
                "spiffe_id: spiffe://example.org is the trust domain itself",
            ),
            (
                Box::new(|e| e.parent_id = id("spiffe://example.org")),
                "parent_id: spiffe://example.org is the trust domain itself",
            ),
            (
                Box::new(|e| e.parent_id = id("spiffe://other.org/agent")),
                "parent_id: SPIFFE ID spiffe://other.org/agent is not in trust domain",
            ),
            (
                Box::new(|e| e.parent_id = e.spiffe_id.clone()),
                "parent_id: an entry cannot be its own parent",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:abc")]),
                "selectors: unix:uid:abc: uid must be a decimal number",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:-1")]),
                "selectors: unix:uid:-1: uid must be a decimal number",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:4294967296")]),
                "selectors: unix:uid:4294967296: uid must be a decimal number",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:")]),
                "selectors: unix:uid:: uid must be a decimal number",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("uid:0")]),
                "selectors: uid:0 has no selector type (did you mean unix:uid:0?)",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:1"), sel("writ:dev:self")]),
                "selectors: writ:dev:self: the selector type writ is Writ's own",
            ),
            (
                Box::new(|e| e.selectors = vec![sel("unix:uid:1"), sel("unix:uid:1")]),
                "selectors: unix:uid:1 is given twice",
            ),
            (
                Box::new(|e| e.spawn_max_ttl = Some(300)),
                "spawn_max_depth: is required with spawn_max_ttl",
            ),
            (
                Box::new(|e| e.spawn_max_depth = Some(2)),
                "spawn_max_ttl: is required with spawn_max_depth",
            ),
            (
                Box::new(|e| e.spawn_max_children = Some(2)),
                "spawn_max_ttl: is required with spawn_max_children",
            ),
            (
                Box::new(|e| {
                    e.spawn_max_ttl = Some(0);
                    e.spawn_max_depth = Some(1);
                }),
                "spawn_max_ttl: must be at least 1 second",
            ),
        ];
        for (change, expected) in cases {
            let mut e = entry();
            change(&mut e);
            let err = e.validate(&td).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "{err:?} should start with {expected:?}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        // Unknown selector types are accepted as they are.
        let mut e = entry();
        e.selectors = vec![sel("k8s:ns:default")];
        e.validate(&td).unwrap();
        // A complete spawn policy is.
        let mut e = entry();
        e.spawn_max_ttl = Some(300);
        e.spawn_max_depth = Some(1);
        e.validate(&td).unwrap();
    }

    #[test]
    fn writ_makes_its_own_entries_in_the_reserved_namespace() {
        let td = td();
        let mut e = RegistrationEntry::new(
            td.spiffe_id("/writ/tts").unwrap(),
            td.spiffe_id("/writ/agent/dev").unwrap(),
            vec![
                "unix:uid:1".parse().unwrap(),
                "writ:dev:self".parse().unwrap(),
            ],
        );
        assert!(matches!(
            e.clone().validate(&td),
            Err(EntryError::Reserved { .. })
        ));
        e.validate_own(&td).unwrap();
        // Every other rule still holds.
        e.selectors.push("unix:uid:x".parse().unwrap());
        assert!(matches!(
            e.validate_own(&td),
            Err(EntryError::Selector(SelectorError::BadValue { .. }))
        ));
    }

    #[test]
    fn same_registration_ignores_only_the_revision() {
        let mut a = entry();
        a.revision = 3;
        let mut b = a.clone();
        b.revision = 4;
        assert!(a.same_registration(&b));
        b.dns_names.push("x.example.org".into());
        assert!(!a.same_registration(&b));
    }

    #[test]
    fn spawn_max_children_bounds() {
        let td = td();
        let spawning = || {
            let mut e = entry();
            e.spawn_max_ttl = Some(300);
            e.spawn_max_depth = Some(1);
            e
        };
        for bad in [0, MAX_SPAWN_CHILDREN + 1, u32::MAX] {
            let mut e = spawning();
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
            let mut e = spawning();
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
    fn template_entries() {
        let td = td();
        let template = IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}").unwrap();
        let agent = td.spiffe_id("/writ/agent/join_token/x").unwrap();
        let mut e =
            RegistrationEntry::from_template(template.clone(), agent.clone(), vec![]).unwrap();
        assert_eq!(e.spiffe_id.path(), template::STAND_IN_PATH);
        e.validate(&td).unwrap();
        assert!(e.is_template() && !e.is_node_alias());

        // Its spiffe_id must be the stand-in.
        let mut bad = e.clone();
        bad.spiffe_id = td.spiffe_id("/other").unwrap();
        assert_eq!(bad.validate(&td), Err(EntryError::TemplateAndId));
        // No spawn policy.
        let mut bad = e.clone();
        bad.spawn_max_ttl = Some(60);
        bad.spawn_max_depth = Some(1);
        assert!(
            bad.validate(&td)
                .unwrap_err()
                .to_string()
                .starts_with("spawn_max_ttl: a template entry cannot spawn")
        );
        // Not a node alias.
        let mut bad = e.clone();
        bad.parent_id = td.spiffe_id("/writ/server").unwrap();
        assert!(matches!(
            bad.validate(&td),
            Err(EntryError::NotForKind {
                field: "spiffe_id_template",
                ..
            })
        ));
        // In the server's trust domain.
        let other = TrustDomain::new("other.org").unwrap();
        assert!(matches!(
            e.clone().validate(&other),
            Err(EntryError::ForeignTrustDomain {
                field: "spiffe_id_template",
                ..
            })
        ));
        // A plain entry still needs a selector.
        let mut plain = entry();
        plain.selectors.clear();
        assert_eq!(plain.validate(&td), Err(EntryError::NoSelectors));
        // The error names the field.
        let err =
            EntryError::from(IdTemplate::parse("spiffe://example.org/writ/{k8s:ns}").unwrap_err());
        assert!(err.to_string().starts_with("spiffe_id_template: "), "{err}");
        // Serde keeps the template.
        let json = serde_json::to_string(&e).unwrap();
        let back: RegistrationEntry = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn node_aliases() {
        let td = td();
        let server = td.spiffe_id("/writ/server").unwrap();
        let mut alias = RegistrationEntry::new(
            td.spiffe_id("/cluster/prod").unwrap(),
            server.clone(),
            vec!["k8s_psat:cluster:prod".parse().unwrap()],
        );
        alias.validate(&td).unwrap();
        assert!(alias.is_node_alias());
        // Its own ID is never in /writ/.
        let mut bad = alias.clone();
        bad.spiffe_id = td.spiffe_id("/writ/agent/x").unwrap();
        assert!(matches!(
            bad.validate(&td),
            Err(EntryError::Reserved { .. })
        ));
        // Nodes spawn no sub-agents.
        let mut bad = alias.clone();
        bad.spawn_max_ttl = Some(60);
        bad.spawn_max_depth = Some(1);
        assert!(matches!(
            bad.validate(&td),
            Err(EntryError::NotForKind { .. })
        ));
        assert!(!entry().is_node_alias());
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("api.example.org"));
        assert!(is_dns_name("*.example.org"));
        assert!(!is_dns_name("-x.org"));
        assert!(!is_dns_name("a..b"));
        assert!(is_dns_name("localhost"));
        assert!(is_dns_name("tts.writ.svc.cluster.local"));
        assert!(is_dns_name("1password.com"));
        // Numbers are not host names: an address is an IP literal or nothing.
        assert!(!is_dns_name("127.0.0.1"));
        assert!(!is_dns_name("10.0.0"));
        assert!(!is_dns_name("300.1.1.1"));
        assert!(!is_dns_name("::1"));
    }

    #[test]
    fn ip_literals() {
        assert_eq!(ip_literal("127.0.0.1"), Some([127, 0, 0, 1].into()));
        assert_eq!(
            ip_literal("::1"),
            Some(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST))
        );
        assert!(ip_literal("2001:db8::7").is_some());
        for bad in [
            "[::1]",
            "fe80::1%eth0",
            "127.000.0.1",
            "300.1.1.1",
            "10.0.0",
            "2001:DB8::7",
            "2001:db8:0:0:0:0:0:7",
            " 127.0.0.1",
            "localhost",
            "",
        ] {
            assert_eq!(ip_literal(bad), None, "{bad:?}");
        }
        assert!(is_san_name("127.0.0.1"));
        assert!(is_san_name("localhost"));
        assert!(!is_san_name("10.0.0"));
        assert!(!is_san_name("[::1]"));
    }

    #[test]
    fn an_entry_takes_ip_literals_and_refuses_garbage() {
        let mut e = entry();
        e.dns_names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        e.validate(&td()).unwrap();
        for bad in ["10.0.0", "[::1]", "a b", "x_y.org", "1.2.3.4:80", "\u{0}"] {
            e.dns_names = vec![bad.into()];
            assert!(
                matches!(e.validate(&td()), Err(EntryError::DnsName(_))),
                "{bad:?}"
            );
        }
    }
}
