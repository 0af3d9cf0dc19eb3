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
