//! [`ConfigDuration`]: the one duration syntax of every Writ configuration file
//! (`server.toml`, `txn.toml` and its `[policy]`, a policy file) and of the command
//! line's duration flags, so the same text means the same everywhere.
//!
//! The syntax:
//! - a bare number of seconds: `90`, as a TOML integer or a string (`"90"`);
//! - or one or more `<number><unit>` parts, largest first or not, optionally separated
//!   by spaces: `"90s"`, `"15m"`, `"1h30m"`, `"500ms"`, `"2d"`. Units: `d` (24 h), `h`,
//!   `m`, `s`, `ms`, `us`, `ns`.
//!
//! Numbers are whole and unsigned (no sign, no fraction, no exponent). Anything else is
//! refused, as is a total beyond `u64::MAX` seconds. The canonical form
//! ([`Display`](std::fmt::Display)) is the parts from `d` down to `ns`, zero parts
//! left out (`0s` for zero): `5400` is shown as `1h30m`, and parses back to the same
//! value. Ranges (at least one second, at most a ceiling) belong to each field and are
//! checked where the field is validated.
//!
//! ```
//! use std::time::Duration;
//! use writ_spiffe::duration::ConfigDuration;
//!
//! let d: ConfigDuration = "1h30m".parse()?;
//! assert_eq!(d.get(), Duration::from_secs(5400));
//! assert_eq!("5400".parse::<ConfigDuration>()?, d);
//! assert_eq!(d.to_string(), "1h30m");
//! assert!("1.5h".parse::<ConfigDuration>().is_err());
//! # Ok::<(), writ_spiffe::duration::DurationError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Units, largest first: the order of the canonical form.
const UNITS: [(&str, u128); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Why a text is not a duration. Every message shows the text and the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The text is empty (or only spaces).
    #[error("an empty text is not a duration (write e.g. 90s, 15m, 1h30m or 90)")]
    Empty,
    /// The text is not in the syntax (a sign, a fraction, a missing number or unit).
    #[error("{text:?} is not a duration like 90s, 15m, 1h30m, 500ms or a number of seconds")]
    Syntax {
        /// The text as written.
        text: String,
    },
    /// A part names a unit that does not exist.
    #[error("{text:?}: unknown unit {unit:?} (units: d, h, m, s, ms, us, ns)")]
    Unit {
        /// The text as written.
        text: String,
        /// The unknown unit.
        unit: String,
    },
    /// The total is larger than `u64::MAX` seconds.
    #[error("{text:?} is too long a duration")]
    Overflow {
        /// The text as written.
        text: String,
    },
    /// A TOML integer below zero.
    #[error("{value} is not a duration: a number of seconds cannot be negative")]
    Negative {
        /// The value as written.
        value: i64,
    },
}

/// A duration as configuration files and flags write it; see the [module
/// documentation](self) for the syntax. Deserializes from a string or a non-negative
/// integer (seconds); serializes to the canonical string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConfigDuration(Duration);

impl ConfigDuration {
    /// Zero.
    pub const ZERO: Self = Self(Duration::ZERO);

    /// A duration of `duration`.
    pub const fn new(duration: Duration) -> Self {
        Self(duration)
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// The [`Duration`].
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for ConfigDuration {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl From<ConfigDuration> for Duration {
    fn from(d: ConfigDuration) -> Self {
        d.0
    }
}

impl FromStr for ConfigDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, DurationError> {
        parse(text).map(Self)
    }
}

fn parse(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let syntax = || DurationError::Syntax {
        text: text.to_owned(),
    };
    let overflow = || DurationError::Overflow {
        text: text.to_owned(),
    };
    if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        let secs = trimmed.parse::<u64>().map_err(|_| overflow())?;
        return Ok(Duration::from_secs(secs));
    }
    let mut total: u128 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(syntax());
        }
        let (number, after) = rest.split_at(digits);
        let letters = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        if letters == 0 {
            // A number without a unit inside a multi-part text, or a sign or dot.
            return Err(syntax());
        }
        let (unit, after) = after.split_at(letters);
        let scale = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, scale)| *scale)
            .ok_or_else(|| DurationError::Unit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            })?;
        let number: u128 = number.parse::<u64>().map_err(|_| overflow())?.into();
        total = number
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(overflow)?;
        rest = after.trim_start_matches(' ');
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| overflow())?;
    let nanos = u32::try_from(total % NANOS_PER_SEC).map_err(|_| overflow())?;
    Ok(Duration::new(secs, nanos))
}

impl fmt::Display for ConfigDuration {
    /// The canonical form: `1h30m`, `500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0.as_nanos();
        if rest == 0 {
            return f.write_str("0s");
        }
        for (name, scale) in UNITS {
            let count = rest / scale;
            if count > 0 {
                write!(f, "{count}{name}")?;
                rest %= scale;
            }
        }
        Ok(())
    }
}

impl<'de> serde::Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = ConfigDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"90s\", \"15m\", \"1h30m\" or a number of seconds")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ConfigDuration, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration::from_secs(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ConfigDuration, E> {
                u64::try_from(v)
                    .map(ConfigDuration::from_secs)
                    .map_err(|_| E::custom(DurationError::Negative { value: v }))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

impl serde::Serialize for ConfigDuration {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Result<ConfigDuration, DurationError> {
        Ok(ConfigDuration::from_secs(s))
    }

    #[test]
    fn parses_the_one_syntax() {
        for (text, want) in [
            ("90", secs(90)),
            (" 90 ", secs(90)),
            ("0", secs(0)),
            ("90s", secs(90)),
            ("15m", secs(900)),
            ("1h30m", secs(5400)),
            ("1h 30m", secs(5400)),
            ("30m1h", secs(5400)),
            ("2d", secs(172_800)),
            ("0s", secs(0)),
            ("18446744073709551615", secs(u64::MAX)),
        ] {
            assert_eq!(text.parse::<ConfigDuration>(), want, "{text:?}");
        }
        assert_eq!(
            "500ms".parse::<ConfigDuration>().map(ConfigDuration::get),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            "1s250ms7ns"
                .parse::<ConfigDuration>()
                .map(ConfigDuration::get),
            Ok(Duration::new(1, 250_000_007))
        );
    }

    #[test]
    fn refuses_garbage() {
        for text in ["", "   "] {
            assert_eq!(text.parse::<ConfigDuration>(), Err(DurationError::Empty));
        }
        for text in [
            "-1", "-5m", "+5m", "1.5h", "1e3", "m", "h5", "5m30", "1h-30m", "5 m", "5m,", "soon",
            "٣s", "5m\n1s", "0x10",
        ] {
            assert!(
                matches!(
                    text.parse::<ConfigDuration>(),
                    Err(DurationError::Syntax { .. } | DurationError::Unit { .. })
                ),
                "{text:?} gave {:?}",
                text.parse::<ConfigDuration>()
            );
        }
        for text in ["5min", "2days", "1w", "5S", "10sec"] {
            assert!(
                matches!(
                    text.parse::<ConfigDuration>(),
                    Err(DurationError::Unit { .. })
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn refuses_overflow() {
        for text in [
            "18446744073709551616",
            "18446744073709551616s",
            "18446744073709551615s1s",
            "213503982334602d",
            "99999999999999999999999999ns",
        ] {
            assert!(
                matches!(
                    text.parse::<ConfigDuration>(),
                    Err(DurationError::Overflow { .. })
                ),
                "{text:?}"
            );
        }
        // The largest value is reachable.
        let max = ConfigDuration::new(Duration::new(u64::MAX, 999_999_999));
        assert_eq!(max.to_string().parse::<ConfigDuration>(), Ok(max));
    }

    #[test]
    fn canonical_form() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(5400), "1h30m"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_millis(500), "500ms"),
            (Duration::new(1, 1_001), "1s1us1ns"),
        ] {
            assert_eq!(ConfigDuration::new(d).to_string(), text);
        }
    }

    proptest::proptest! {
        /// The canonical form of any duration parses back to it.
        #[test]
        fn format_then_parse_round_trips(secs in proptest::prelude::any::<u64>(), nanos in 0u32..1_000_000_000) {
            let d = ConfigDuration::new(Duration::new(secs, nanos));
            proptest::prop_assert_eq!(d.to_string().parse::<ConfigDuration>(), Ok(d));
        }

        /// Whatever text parses, its canonical form means the same; nothing panics.
        #[test]
        fn parse_agrees_with_its_canonical_form(text in "[0-9a-z .+-]{0,16}") {
            if let Ok(d) = text.parse::<ConfigDuration>() {
                proptest::prop_assert_eq!(d.to_string().parse::<ConfigDuration>(), Ok(d));
            }
        }
    }

    #[test]
    fn deserializes_strings_and_integers() {
        #[derive(serde::Deserialize)]
        struct File {
            d: ConfigDuration,
        }
        let parse = |v: serde_json::Value| {
            serde_json::from_value::<File>(serde_json::json!({ "d": v })).map(|f| f.d)
        };
        assert_eq!(parse(serde_json::json!("5m")).ok(), secs(300).ok());
        assert_eq!(parse(serde_json::json!(300)).ok(), secs(300).ok());
        assert_eq!(parse(serde_json::json!("300")).ok(), secs(300).ok());
        assert!(parse(serde_json::json!(-1)).is_err());
        assert!(parse(serde_json::json!(1.5)).is_err());
        assert!(parse(serde_json::json!("soon")).is_err());
        assert!(parse(serde_json::json!(null)).is_err());
        assert_eq!(
            serde_json::to_string(&ConfigDuration::from_secs(5400)).ok(),
            Some("\"1h30m\"".to_owned())
        );
    }
}
