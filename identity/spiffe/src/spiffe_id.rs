//! SPIFFE IDs and trust domains, parsed to the letter of the SPIFFE-ID standard.
//!
//! A SPIFFE ID is `spiffe://<trust domain><path>`:
//! - the scheme is exactly `spiffe`;
//! - the trust domain is 1..=255 bytes of lowercase letters, digits, `.`, `-` and `_`
//!   (no port, no userinfo);
//! - the path is empty or a sequence of `/segment`, each segment non-empty, not `.` or
//!   `..`, made of letters, digits, `.`, `-` and `_`; no trailing slash;
//! - no query, fragment or percent-encoding; at most 2048 bytes in all.
//!
//! ```
//! use writ_spiffe::spiffe_id::SpiffeId;
//! let id = SpiffeId::new("spiffe://example.org/agents/planner")?;
//! assert_eq!(id.trust_domain().as_str(), "example.org");
//! assert_eq!(id.path(), "/agents/planner");
//! # Ok::<(), writ_spiffe::spiffe_id::SpiffeIdError>(())
//! ```

use std::fmt;
use std::str::FromStr;

/// The scheme prefix every SPIFFE ID starts with.
pub const SCHEME_PREFIX: &str = "spiffe://";
/// Longest trust domain name, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest SPIFFE ID, in bytes, scheme included.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The first path segment of Writ's own identities: `spiffe://<td>/writ/...` holds the
/// server (`/writ/server`), the agents (`/writ/agent/...`) and `writ dev`'s token
/// service, as `/spire/` is SPIRE's. No registration entry, minted SVID or sub-agent
/// lease may produce an ID there ([`SpiffeId::check_not_reserved`]).
pub const RESERVED_SEGMENT: &str = "writ";

/// A SPIFFE ID in Writ's reserved namespace ([`RESERVED_SEGMENT`]), where only Writ
/// issues identities.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{id} is in the reserved namespace {namespace} (Writ's own identities)")]
pub struct ReservedIdError {
    /// The refused ID.
    pub id: String,
    /// The namespace, `spiffe://<td>/writ/`.
    pub namespace: String,
}

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("scheme is missing or is not \"spiffe\"")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error(
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores (found {found:?})"
    )]
    BadTrustDomainChar {
        /// The offending character.
        found: char,
    },
    /// The trust domain is longer than allowed.
    #[error("trust domain is longer than {max} bytes")]
    TrustDomainTooLong {
        /// The limit.
        max: usize,
    },
    /// The whole ID is longer than allowed.
    #[error("SPIFFE ID is longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// The authority carries a port.
    #[error("trust domain must not contain a port")]
    Port,
    /// The authority carries user information.
    #[error("trust domain must not contain user info")]
    UserInfo,
    /// A `?` query part.
    #[error("SPIFFE ID must not contain a query")]
    Query,
    /// A `#` fragment part.
    #[error("SPIFFE ID must not contain a fragment")]
    Fragment,
    /// A `%` escape.
    #[error("SPIFFE ID must not contain percent-encoding")]
    PercentEncoded,
    /// Two slashes in a row, or a lone `/` path.
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// A `.` or `..` segment.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A character outside `[a-zA-Z0-9._-]` in the path.
    #[error(
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores (found {found:?})"
    )]
    BadPathChar {
        /// The offending character.
        found: char,
    },
}

/// A validated trust domain name, such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a trust domain from its bare name (`example.org`) or its SPIFFE ID form
    /// (`spiffe://example.org`).
    ///
    /// # Errors
    /// [`SpiffeIdError`] naming the first rule the input breaks.
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if input.contains("://") {
            let id = SpiffeId::new(input)?;
            if !id.path().is_empty() {
                return Err(SpiffeIdError::BadTrustDomainChar { found: '/' });
            }
            return Ok(id.trust_domain());
        }
        validate_trust_domain(input)?;
        Ok(Self(input.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, as used for bundle map keys
    /// and CA certificates.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.0)
    }

    /// A SPIFFE ID in this trust domain with the given path (which must start with `/`).
    ///
    /// # Errors
    /// [`SpiffeIdError`] if the path breaks a path rule.
    pub fn spiffe_id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    /// Byte offset where the path starts (== len when the path is empty).
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID.
    ///
    /// # Errors
    /// [`SpiffeIdError`] naming the first rule the input breaks.
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong {
                max: MAX_SPIFFE_ID_LEN,
            });
        }
        let rest = input
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(SpiffeIdError::WrongScheme)?;
        // Query, fragment and escapes are refused wherever they appear.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            id: input.to_owned(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The trust domain name, borrowed.
    pub fn trust_domain_str(&self) -> &str {
        self.id
            .get(SCHEME_PREFIX.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or_default()
    }

    /// The whole ID as text.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// Whether this ID is `other` or lies under it (`other`'s path followed by `/...`).
    pub fn is_under(&self, other: &SpiffeId) -> bool {
        if self.trust_domain_str() != other.trust_domain_str() {
            return false;
        }
        let (mine, theirs) = (self.path(), other.path());
        mine == theirs
            || (mine.starts_with(theirs) && mine.as_bytes().get(theirs.len()) == Some(&b'/'))
    }

    /// Whether this ID lies in Writ's reserved namespace: its first path segment is
    /// [`RESERVED_SEGMENT`], in any letter case (`/Writ/server` looks like the server to
    /// a human reader and is refused as well).
    pub fn is_reserved(&self) -> bool {
        self.path()
            .split('/')
            .nth(1)
            .is_some_and(|first| first.eq_ignore_ascii_case(RESERVED_SEGMENT))
    }

    /// `Ok` unless this ID lies in Writ's reserved namespace. The one rule every path
    /// that makes an identity from outside input calls (registration entries, `x509
    /// mint`, `jwt mint`, sub-agent leases); Writ's own identities are made without it.
    ///
    /// # Errors
    /// [`ReservedIdError`] naming the ID and the namespace.
    pub fn check_not_reserved(&self) -> Result<(), ReservedIdError> {
        if self.is_reserved() {
            return Err(ReservedIdError {
                id: self.id.clone(),
                namespace: format!(
                    "{SCHEME_PREFIX}{}/{RESERVED_SEGMENT}/",
                    self.trust_domain_str()
                ),
            });
        }
        Ok(())
    }

    /// This ID with one more path segment appended.
    ///
    /// # Errors
    /// [`SpiffeIdError`] if the segment is not a valid path segment or the result is too
    /// long.
    pub fn join(&self, segment: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(&format!("{}/{segment}", self.id))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    if let Some(found) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar { found });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            max: MAX_TRUST_DOMAIN_LEN,
        });
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is the empty prefix.
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment.is_empty() {
            return Err(if last {
                SpiffeIdError::TrailingSlash
            } else {
                SpiffeIdError::EmptySegment
            });
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        if let Some(found) = segment
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
        {
            return Err(SpiffeIdError::BadPathChar { found });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_path_is_empty_segment_not_trailing_slash_only() {
        // "spiffe://example.org/" has a path of "/" — SPIFFE calls this a trailing slash.
        assert_eq!(
            SpiffeId::new("spiffe://example.org/"),
            Err(SpiffeIdError::TrailingSlash)
        );
        assert_eq!(
            SpiffeId::new("spiffe://example.org//a"),
            Err(SpiffeIdError::EmptySegment)
        );
    }

    #[test]
    fn is_under_respects_segment_boundaries() {
        let parent = SpiffeId::new("spiffe://example.org/agents/planner").unwrap();
        let child = SpiffeId::new("spiffe://example.org/agents/planner/sub/x").unwrap();
        let sibling = SpiffeId::new("spiffe://example.org/agents/planner2").unwrap();
        assert!(child.is_under(&parent));
        assert!(parent.is_under(&parent));
        assert!(!sibling.is_under(&parent));
        assert!(!parent.is_under(&child));
    }

    #[test]
    fn reserved_namespace() {
        for reserved in [
            "spiffe://example.org/writ",
            "spiffe://example.org/writ/server",
            "spiffe://example.org/writ/agent/join_token/x",
            "spiffe://example.org/writ/tts",
            "spiffe://example.org/Writ/server",
            "spiffe://example.org/WRIT/agent/a",
        ] {
            let id = SpiffeId::new(reserved).unwrap();
            assert!(id.is_reserved(), "{reserved}");
            assert_eq!(
                id.check_not_reserved().unwrap_err().to_string(),
                format!(
                    "{reserved} is in the reserved namespace spiffe://example.org/writ/ \
                     (Writ's own identities)"
                )
            );
        }
        for free in [
            "spiffe://example.org",
            "spiffe://example.org/writer",
            "spiffe://example.org/writs/x",
            "spiffe://example.org/a/writ/server",
            "spiffe://writ/server-not",
        ] {
            let id = SpiffeId::new(free).unwrap();
            assert!(!id.is_reserved(), "{free}");
            id.check_not_reserved().unwrap();
        }
    }

    #[test]
    fn trust_domain_accepts_id_form() {
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/x").is_err());
        assert_eq!(
            TrustDomain::new("Example.org"),
            Err(SpiffeIdError::BadTrustDomainChar { found: 'E' })
        );
    }
}
