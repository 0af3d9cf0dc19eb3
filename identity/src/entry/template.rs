//! Identity templates: a registration entry whose SPIFFE ID is filled from the attested
//! selectors of each workload it matches, so one entry names every service account of a
//! cluster (`spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}`) or every labelled container
//! (`spiffe://example.org/agents/{docker:label:app}`).
//!
//! A placeholder `{P}` takes its value from the workload's one selector that starts with
//! `P:` (`{k8s:ns}` reads `k8s:ns:<value>`). None or several such selectors: the entry
//! does not apply to that workload. The value must be a SPIFFE path segment of at most
//! [`MAX_VALUE_LEN`] bytes (only `[A-Za-z0-9._-]`, not `.` or `..`); a placeholder fills
//! a whole segment or part of one, never more. A rendered ID is checked like any other:
//! never in Writ's reserved namespace `/writ/`, never with a `sub` segment.
//!
//! ```
//! use writ_identity::entry::template::IdTemplate;
//! use writ_identity::selector::Selector;
//! let t = IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}")?;
//! let sel = |s: &str| s.parse::<Selector>().unwrap();
//! let (values, id) = t.render_for(&[sel("k8s:ns:prod"), sel("k8s:sa:web")])?;
//! assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
//! assert_eq!(values["k8s:ns"], "prod");
//! // A value that is not a path segment fills nothing.
//! assert!(t.render_for(&[sel("k8s:ns:a/b"), sel("k8s:sa:web")]).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::fmt;

use crate::selector::{INTERNAL_TYPE, Selector};
use crate::spiffe_id::{
    MAX_SPIFFE_ID_LEN, ReservedIdError, SCHEME_PREFIX, SpiffeId, SpiffeIdError, TrustDomain,
};

/// Longest value a placeholder may take, in bytes.
pub const MAX_VALUE_LEN: usize = 128;
/// Most placeholders in one template.
pub const MAX_PLACEHOLDERS: usize = 16;
/// Longest placeholder name (`docker:label:app`), in bytes.
pub const MAX_PLACEHOLDER_LEN: usize = 256;
/// The path of the stand-in SPIFFE ID a template entry stores in its `spiffe_id` field:
/// `spiffe://<td>/writ/template`. It lies in the reserved namespace, so no other entry,
/// agent or rendered ID can ever be it, and an SVID is never issued for it.
pub const STAND_IN_PATH: &str = "/writ/template";

/// Placeholder name -> value, as the agent sends them and the server renders from.
pub type TemplateValues = BTreeMap<String, String>;

/// Why a template text is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The text is longer than a SPIFFE ID may be.
    #[error("template is longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// The text does not start with `spiffe://<trust domain>/`.
    #[error("template must start with spiffe://<trust domain>/ (placeholders go in the path)")]
    NoPath,
    /// A `{` without its `}`, a `}` without its `{`, or a `{` inside a placeholder.
    #[error("unbalanced braces: every placeholder is {{type:key}}")]
    Braces,
    /// A placeholder is malformed.
    #[error("placeholder {{{name}}}: {reason}")]
    Placeholder {
        /// The name (at most 80 characters of it).
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// More placeholders than allowed.
    #[error("more than {max} placeholders")]
    TooManyPlaceholders {
        /// The limit.
        max: usize,
    },
    /// No placeholder: an entry with a fixed ID uses `spiffe_id`.
    #[error("template has no placeholder; use spiffe_id for a fixed ID")]
    NoPlaceholder,
    /// The text around the placeholders is not a SPIFFE ID.
    #[error("{0}")]
    Id(SpiffeIdError),
    /// The template's fixed part lies in Writ's reserved namespace.
    #[error("{0}")]
    Reserved(ReservedIdError),
    /// A fixed path segment is `sub`, reserved for sub-agents.
    #[error("the path segment `sub` is reserved for sub-agents")]
    SubSegment,
}

/// Why a template yields no ID for a workload (or for the values an agent sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RenderError {
    /// The workload has no selector for a placeholder.
    #[error("no selector {placeholder}:<value> to fill {{{placeholder}}}")]
    Missing {
        /// The placeholder.
        placeholder: String,
    },
    /// The workload has several selectors for a placeholder.
    #[error("{count} selectors {placeholder}:<value>; {{{placeholder}}} needs exactly one")]
    Ambiguous {
        /// The placeholder.
        placeholder: String,
        /// How many.
        count: usize,
    },
    /// A value that is not a SPIFFE path segment.
    #[error("value {value:?} for {{{placeholder}}} refused: {reason}")]
    BadValue {
        /// The placeholder.
        placeholder: String,
        /// The value (at most 80 characters of it).
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A value for a name that is not a placeholder of the template.
    #[error("{placeholder:?} is not a placeholder of this template")]
    Unexpected {
        /// The name (at most 80 characters of it).
        placeholder: String,
    },
    /// The rendered ID lies in Writ's reserved namespace.
    #[error("{0}")]
    Reserved(ReservedIdError),
    /// The rendered ID has a `sub` segment.
    #[error("rendered ID {0} uses the path segment `sub`, reserved for sub-agents")]
    SubSegment(String),
    /// The rendered ID is not a SPIFFE ID (too long).
    #[error("rendered ID: {0}")]
    Id(SpiffeIdError),
}

impl RenderError {
    /// Whether the workload simply lacks what the template needs (no selector, or
    /// several), as opposed to a value that was refused.
    pub fn is_not_applicable(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::Ambiguous { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Part {
    Literal(String),
    /// `kind`, `rest`: the placeholder `{kind:rest}`.
    Placeholder(String),
}

/// A parsed SPIFFE ID template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdTemplate {
    text: String,
    trust_domain: TrustDomain,
    /// The path segments, each a sequence of literal text and placeholders.
    segments: Vec<Vec<Part>>,
}

impl IdTemplate {
    /// Parses a template: `spiffe://<td>/<path>` where path segments may hold
    /// placeholders `{type:key...}`. The fixed part must be a SPIFFE ID outside `/writ/`
    /// with no `sub` segment.
    ///
    /// # Errors
    /// [`TemplateError`] naming the first rule the text breaks.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        if text.len() > MAX_SPIFFE_ID_LEN {
            return Err(TemplateError::TooLong {
                max: MAX_SPIFFE_ID_LEN,
            });
        }
        let rest = text
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(TemplateError::Id(SpiffeIdError::WrongScheme))?;
        let (td, path) = rest.split_once('/').ok_or(TemplateError::NoPath)?;
        if td.contains(['{', '}']) {
            return Err(TemplateError::Placeholder {
                name: td.chars().take(80).collect(),
                reason: "placeholders may appear in the path only",
            });
        }
        let trust_domain = TrustDomain::new(td).map_err(TemplateError::Id)?;
        let mut segments = Vec::new();
        let mut count = 0;
        for segment in path.split('/') {
            let parts = parse_segment(segment)?;
            count += parts
                .iter()
                .filter(|p| matches!(p, Part::Placeholder(_)))
                .count();
            segments.push(parts);
        }
        if count == 0 {
            return Err(TemplateError::NoPlaceholder);
        }
        if count > MAX_PLACEHOLDERS {
            return Err(TemplateError::TooManyPlaceholders {
                max: MAX_PLACEHOLDERS,
            });
        }
        let template = Self {
            text: text.to_owned(),
            trust_domain,
            segments,
        };
        // The fixed part, with every placeholder standing as `x`, must be an ID.
        let probe = template.assemble(|_| "x");
        let probe = SpiffeId::new(&probe).map_err(TemplateError::Id)?;
        probe.check_not_reserved().map_err(|e| {
            TemplateError::Reserved(ReservedIdError {
                id: text.to_owned(),
                ..e
            })
        })?;
        for parts in &template.segments {
            if let [Part::Literal(l)] = parts.as_slice()
                && l == crate::server::lease::SUB_SEGMENT
            {
                return Err(TemplateError::SubSegment);
            }
        }
        Ok(template)
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The trust domain of every ID it yields.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The placeholder names, in order of first appearance, each once.
    pub fn placeholders(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for part in self.segments.iter().flatten() {
            if let Part::Placeholder(name) = part
                && !out.contains(&name.as_str())
            {
                out.push(name);
            }
        }
        out
    }

    /// The selector type each placeholder reads, as `(kind, name)` (`{k8s:ns}` ->
    /// `("k8s", "ns")`, `{docker:label:app}` -> `("docker", "label")`): what the
    /// workload attestor must compute for the template to fill.
    pub fn selector_types(&self) -> Vec<(&str, &str)> {
        self.placeholders()
            .into_iter()
            .filter_map(|p| {
                let (kind, rest) = p.split_once(':')?;
                Some((kind, rest.split_once(':').map_or(rest, |(name, _)| name)))
            })
            .collect()
    }

    /// The stand-in ID a template entry keeps in `spiffe_id` (see [`STAND_IN_PATH`]).
    ///
    /// # Errors
    /// Never for a parsed template; the type says so only because IDs are parsed.
    pub fn stand_in(&self) -> Result<SpiffeId, SpiffeIdError> {
        self.trust_domain.spiffe_id(STAND_IN_PATH)
    }

    /// The placeholder values found in a workload's selectors: for each placeholder
    /// `P`, the rest of the one selector that starts with `P:`.
    ///
    /// # Errors
    /// [`RenderError::Missing`] or [`RenderError::Ambiguous`] (the entry does not apply
    /// to the workload); values are checked by [`Self::render`].
    pub fn values_from(&self, selectors: &[Selector]) -> Result<TemplateValues, RenderError> {
        let mut values = TemplateValues::new();
        for placeholder in self.placeholders() {
            let (kind, prefix) = placeholder.split_once(':').unwrap_or((placeholder, ""));
            let mut found = selectors.iter().filter_map(|s| {
                if s.kind() != kind {
                    return None;
                }
                s.value().strip_prefix(prefix)?.strip_prefix(':')
            });
            let Some(first) = found.next() else {
                return Err(RenderError::Missing {
                    placeholder: placeholder.to_owned(),
                });
            };
            let others = found.count();
            if others > 0 {
                return Err(RenderError::Ambiguous {
                    placeholder: placeholder.to_owned(),
                    count: others + 1,
                });
            }
            values.insert(placeholder.to_owned(), first.to_owned());
        }
        Ok(values)
    }

    /// The ID for exactly these values (one per placeholder, each a valid path segment),
    /// checked as every issued ID is: outside `/writ/`, with no `sub` segment. The
    /// server calls it with the values an agent sent; it never takes an ID string.
    ///
    /// # Errors
    /// [`RenderError`] for a missing, unexpected or refused value, or a refused ID.
    pub fn render(&self, values: &TemplateValues) -> Result<SpiffeId, RenderError> {
        let names = self.placeholders();
        if let Some(extra) = values.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(RenderError::Unexpected {
                placeholder: extra.chars().take(80).collect(),
            });
        }
        for name in &names {
            let value = values.get(*name).ok_or_else(|| RenderError::Missing {
                placeholder: (*name).to_owned(),
            })?;
            check_value(value).map_err(|reason| RenderError::BadValue {
                placeholder: (*name).to_owned(),
                value: value.chars().take(80).collect(),
                reason,
            })?;
        }
        let text = self.assemble(|name| values.get(name).map_or("", String::as_str));
        let id = SpiffeId::new(&text).map_err(RenderError::Id)?;
        id.check_not_reserved().map_err(RenderError::Reserved)?;
        if crate::server::lease::is_sub_agent_id(&id) {
            return Err(RenderError::SubSegment(id.to_string()));
        }
        Ok(id)
    }

    /// [`Self::values_from`] then [`Self::render`]: the values and the ID for a
    /// workload with these selectors.
    ///
    /// # Errors
    /// As those two.
    pub fn render_for(
        &self,
        selectors: &[Selector],
    ) -> Result<(TemplateValues, SpiffeId), RenderError> {
        let values = self.values_from(selectors)?;
        let id = self.render(&values)?;
        Ok((values, id))
    }

    fn assemble<'a>(&'a self, value: impl Fn(&str) -> &'a str) -> String {
        let mut out = format!("{SCHEME_PREFIX}{}", self.trust_domain);
        for parts in &self.segments {
            out.push('/');
            for part in parts {
                match part {
                    Part::Literal(l) => out.push_str(l),
                    Part::Placeholder(p) => out.push_str(value(p)),
                }
            }
        }
        out
    }
}

/// Splits one path segment into literal text and placeholders.
fn parse_segment(segment: &str) -> Result<Vec<Part>, TemplateError> {
    let mut parts = Vec::new();
    let mut rest = segment;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            None => {
                parts.push(Part::Literal(rest.to_owned()));
                break;
            }
            Some(i) => {
                let (literal, tail) = rest.split_at(i);
                if !literal.is_empty() {
                    parts.push(Part::Literal(literal.to_owned()));
                }
                let inner = tail.strip_prefix('{').ok_or(TemplateError::Braces)?;
                let end = inner.find('}').ok_or(TemplateError::Braces)?;
                let (name, after) = inner.split_at(end);
                if name.contains('{') {
                    return Err(TemplateError::Braces);
                }
                check_placeholder(name)?;
                parts.push(Part::Placeholder(name.to_owned()));
                rest = after.get(1..).unwrap_or_default();
            }
        }
    }
    Ok(parts)
}

/// A placeholder names a selector prefix `type:key[:...]`.
fn check_placeholder(name: &str) -> Result<(), TemplateError> {
    let bad = |reason| TemplateError::Placeholder {
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.len() > MAX_PLACEHOLDER_LEN {
        return Err(bad("name is too long"));
    }
    let Some((kind, key)) = name.split_once(':') else {
        return Err(bad(
            "names a selector prefix type:key (e.g. {k8s:ns}, {docker:label:app})",
        ));
    };
    if kind.is_empty()
        || !kind
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
    {
        return Err(bad(
            "the selector type holds only lowercase letters, digits, '_' and '-'",
        ));
    }
    if kind == INTERNAL_TYPE {
        return Err(bad("the selector type writ is Writ's own"));
    }
    if key.is_empty() || key.split(':').any(str::is_empty) {
        return Err(bad("the key is empty"));
    }
    if key
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(bad("the key holds a space, '/' or a control character"));
    }
    Ok(())
}

/// Whether `value` may fill a placeholder: a SPIFFE path segment of 1 to
/// [`MAX_VALUE_LEN`] bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// Why not, as a short phrase.
pub fn check_value(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("empty");
    }
    if value.len() > MAX_VALUE_LEN {
        return Err("longer than 128 bytes");
    }
    if value == "." || value == ".." {
        return Err("a dot segment");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only letters, digits, '.', '_' and '-' may appear in a path segment");
    }
    Ok(())
}

impl fmt::Display for IdTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for IdTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for IdTemplate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for IdTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_renders() {
        let t = IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}").unwrap();
        assert_eq!(t.placeholders(), vec!["k8s:ns", "k8s:sa"]);
        assert_eq!(t.selector_types(), vec![("k8s", "ns"), ("k8s", "sa")]);
        let (values, id) = t
            .render_for(&[
                sel("k8s:ns:prod"),
                sel("k8s:sa:web"),
                sel("unix:uid:1"),
                sel("k8s:pod-name:x"),
            ])
            .unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/prod/sa/web");
        assert_eq!(t.render(&values).unwrap(), id);

        let t = IdTemplate::parse("spiffe://example.org/agents/{docker:label:app}").unwrap();
        assert_eq!(t.selector_types(), vec![("docker", "label")]);
        let (_, id) = t
            .render_for(&[sel("docker:label:app:planner"), sel("docker:label:tier:x")])
            .unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/agents/planner");
        // `{docker:label:app}` does not read `docker:label:application:...`.
        assert!(matches!(
            t.render_for(&[sel("docker:label:application:x")]),
            Err(RenderError::Missing { .. })
        ));

        // Part of a segment, and the same placeholder twice.
        let t = IdTemplate::parse("spiffe://example.org/agent-{k8s:sa}/{k8s:sa}.v1").unwrap();
        let (_, id) = t.render_for(&[sel("k8s:sa:web")]).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/agent-web/web.v1");
        assert_eq!(
            t.to_string(),
            "spiffe://example.org/agent-{k8s:sa}/{k8s:sa}.v1"
        );
        assert_eq!(t.stand_in().unwrap().path(), STAND_IN_PATH);
    }

    #[test]
    fn none_or_several_selectors_do_not_apply() {
        let t = IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}").unwrap();
        let e = t.render_for(&[sel("unix:uid:1")]).unwrap_err();
        assert!(e.is_not_applicable(), "{e}");
        let e = t
            .render_for(&[sel("k8s:ns:a"), sel("k8s:ns:b")])
            .unwrap_err();
        assert_eq!(
            e,
            RenderError::Ambiguous {
                placeholder: "k8s:ns".into(),
                count: 2
            }
        );
        assert!(e.is_not_applicable());
    }

    #[test]
    fn every_bad_value_shape_is_refused() {
        let t = IdTemplate::parse("spiffe://example.org/ns/{k8s:ns}").unwrap();
        let long = "a".repeat(MAX_VALUE_LEN + 1);
        for bad in [
            "a/b",
            "/",
            "..",
            ".",
            "%2F",
            "a%2Fb",
            "",
            long.as_str(),
            "é",
            "ｗｅｂ",
            "a b",
            "a:b",
            "a?b",
            "a#b",
            "{x}",
            "a\\b",
        ] {
            let mut values = TemplateValues::new();
            values.insert("k8s:ns".into(), bad.into());
            let e = t.render(&values).unwrap_err();
            assert!(
                matches!(e, RenderError::BadValue { .. }),
                "{bad:?} gave {e:?}"
            );
            assert!(!e.is_not_applicable());
            assert!(e.to_string().contains("refused"), "{e}");
        }
        // Through selectors: the selector value `a/b` reaches the same check.
        assert!(matches!(
            t.render_for(&[sel("k8s:ns:a/b")]),
            Err(RenderError::BadValue { .. })
        ));
        let ok = "a".repeat(MAX_VALUE_LEN);
        let mut values = TemplateValues::new();
        values.insert("k8s:ns".into(), ok);
        t.render(&values).unwrap();
    }

    #[test]
    fn a_value_never_makes_a_reserved_or_sub_id() {
        let t = IdTemplate::parse("spiffe://example.org/{k8s:ns}/x").unwrap();
        for reserved in ["writ", "WRIT", "Writ"] {
            let e = t
                .render_for(&[sel(&format!("k8s:ns:{reserved}"))])
                .unwrap_err();
            assert!(matches!(e, RenderError::Reserved(_)), "{reserved}: {e:?}");
        }
        let t = IdTemplate::parse("spiffe://example.org/{k8s:ns}it/x").unwrap();
        assert!(matches!(
            t.render_for(&[sel("k8s:ns:wr")]),
            Err(RenderError::Reserved(_))
        ));
        let t = IdTemplate::parse("spiffe://example.org/a/{k8s:ns}").unwrap();
        assert!(matches!(
            t.render_for(&[sel("k8s:ns:sub")]),
            Err(RenderError::SubSegment(_))
        ));
        // The server checks the set of values: none missing, none extra.
        let mut values = TemplateValues::new();
        assert!(matches!(
            t.render(&values),
            Err(RenderError::Missing { .. })
        ));
        values.insert("k8s:ns".into(), "a".into());
        values.insert("k8s:sa".into(), "a".into());
        assert!(matches!(
            t.render(&values),
            Err(RenderError::Unexpected { .. })
        ));
    }

    #[test]
    fn bad_templates_are_refused() {
        for (bad, why) in [
            ("spiffe://example.org/writ/{k8s:ns}", "reserved namespace"),
            ("spiffe://example.org/Writ/{k8s:ns}", "reserved namespace"),
            ("spiffe://example.org/a/sub/{k8s:ns}", "`sub`"),
            ("spiffe://example.org/a/b", "no placeholder"),
            ("spiffe://example.org", "must start with"),
            ("http://example.org/{k8s:ns}", "scheme"),
            ("spiffe://{k8s:ns}/a", "path only"),
            ("spiffe://example.org/{k8s:ns", "unbalanced"),
            ("spiffe://example.org/k8s:ns}", "unbalanced"),
            ("spiffe://example.org/{{k8s:ns}}", "unbalanced"),
            ("spiffe://example.org/{ns}", "type:key"),
            ("spiffe://example.org/{K8s:ns}", "lowercase"),
            ("spiffe://example.org/{writ:dev}", "Writ's own"),
            ("spiffe://example.org/{k8s:}", "key is empty"),
            ("spiffe://example.org/{k8s:a::b}", "key is empty"),
            ("spiffe://example.org/{k8s:a b}", "space"),
            ("spiffe://example.org/{}", "type:key"),
            ("spiffe://example.org//{k8s:ns}", "empty segments"),
            ("spiffe://example.org/{k8s:ns}/", "trailing slash"),
            ("spiffe://example.org/../{k8s:ns}", "dot segments"),
            ("spiffe://example.org/a%2F/{k8s:ns}", "percent"),
            ("spiffe://example.org/a b/{k8s:ns}", "limited to"),
        ] {
            let e = IdTemplate::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many = format!(
            "spiffe://example.org/{}",
            "{k8s:a}".repeat(MAX_PLACEHOLDERS + 1)
        );
        assert!(matches!(
            IdTemplate::parse(&many),
            Err(TemplateError::TooManyPlaceholders { .. })
        ));
        let long = format!(
            "spiffe://example.org/{{k8s:ns}}/{}",
            "a".repeat(MAX_SPIFFE_ID_LEN)
        );
        assert!(matches!(
            IdTemplate::parse(&long),
            Err(TemplateError::TooLong { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A bounded sweep of short strings over the characters that matter.
        let alphabet = ['{', '}', '/', ':', 'a', 'w', '.', '%'];
        let mut text = String::new();
        for n in 0..4096_u32 {
            text.clear();
            text.push_str("spiffe://example.org/");
            let mut k = n;
            for _ in 0..4 {
                text.push(alphabet[(k % 8) as usize]);
                k /= 8;
            }
            if let Ok(t) = IdTemplate::parse(&text) {
                // Whatever parses renders only checked IDs.
                if let Ok((_, id)) = t.render_for(&[sel("a:a:x")]) {
                    assert!(!id.is_reserved());
                }
                assert_eq!(IdTemplate::parse(t.as_str()).unwrap(), t);
            }
        }
    }
}
