//! SPIFFE IDs and trust domains against the spec vectors in
//! `specs/vectors/spiffe_id.json`, plus property tests: round-trips, agreement with an
//! independent oracle of the SPIFFE-ID rules, and `TrustDomain` / `SpiffeId` agreement.

use proptest::prelude::*;
use serde_json::Value;
use writ_identity::spiffe_id::{
    MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, SpiffeIdError, TrustDomain,
};

// ---------------------------------------------------------------------------------------
// Vectors
// ---------------------------------------------------------------------------------------

fn vectors() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/vectors/spiffe_id.json"
    );
    let text = std::fs::read_to_string(path).expect("read spiffe_id.json");
    serde_json::from_str(&text).expect("spiffe_id.json is JSON")
}

/// A vector string: either a JSON string, or an array of pieces where each piece is a
/// string or `{"repeat": s, "times": n}` (used for the long boundary cases).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(pieces) => pieces.iter().map(piece).collect(),
        other => panic!("vector string must be a string or an array of pieces: {other}"),
    }
}

fn piece(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => {
            let s = m["repeat"].as_str().expect("repeat is a string");
            let n = m["times"].as_u64().expect("times is a number");
            s.repeat(usize::try_from(n).unwrap())
        }
        other => panic!("bad piece {other}"),
    }
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is an array"))
}

/// The snake_case vector name of an error variant (a variant added later maps to
/// "unmapped" and fails any vector that names it).
fn variant_name(e: &SpiffeIdError) -> &'static str {
    match e {
        SpiffeIdError::Empty => "empty",
        SpiffeIdError::WrongScheme => "wrong_scheme",
        SpiffeIdError::MissingTrustDomain => "missing_trust_domain",
        SpiffeIdError::BadTrustDomainChar { .. } => "bad_trust_domain_char",
        SpiffeIdError::TrustDomainTooLong { .. } => "trust_domain_too_long",
        SpiffeIdError::TooLong { .. } => "too_long",
        SpiffeIdError::Port => "port",
        SpiffeIdError::UserInfo => "user_info",
        SpiffeIdError::Query => "query",
        SpiffeIdError::Fragment => "fragment",
        SpiffeIdError::PercentEncoded => "percent_encoded",
        SpiffeIdError::EmptySegment => "empty_segment",
        SpiffeIdError::DotSegment => "dot_segment",
        SpiffeIdError::TrailingSlash => "trailing_slash",
        SpiffeIdError::BadPathChar { .. } => "bad_path_char",
        _ => "unmapped",
    }
}

/// Checks an error against an invalid vector: the variant, and its fields (`found`, or
/// the `max` limit) where it has some.
fn check_error(input: &str, err: &SpiffeIdError, vector: &Value) {
    let want = vector["reason"].as_str().expect("reason is a string");
    assert_eq!(variant_name(err), want, "input {input:?}: got {err:?}");
    match err {
        SpiffeIdError::BadTrustDomainChar { found } | SpiffeIdError::BadPathChar { found } => {
            if let Some(f) = vector.get("found") {
                assert_eq!(found.to_string(), f.as_str().unwrap(), "input {input:?}");
            }
        }
        SpiffeIdError::TrustDomainTooLong { max } => assert_eq!(*max, MAX_TRUST_DOMAIN_LEN),
        SpiffeIdError::TooLong { max } => assert_eq!(*max, MAX_SPIFFE_ID_LEN),
        _ => assert!(
            vector.get("found").is_none(),
            "input {input:?}: no found field"
        ),
    }
}

#[test]
fn vector_file_covers_every_variant() {
    let v = vectors();
    let mut seen: Vec<&str> = list(&v, "invalid")
        .iter()
        .chain(list(&v["trust_domains"], "invalid"))
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let all = [
        "bad_path_char",
        "bad_trust_domain_char",
        "dot_segment",
        "empty",
        "empty_segment",
        "fragment",
        "missing_trust_domain",
        "percent_encoded",
        "port",
        "query",
        "too_long",
        "trailing_slash",
        "trust_domain_too_long",
        "user_info",
        "wrong_scheme",
    ];
    assert_eq!(seen, all);
    assert!(list(&v, "valid").len() >= 25);
    assert!(list(&v, "invalid").len() >= 40);
}

#[test]
fn valid_vectors_parse_and_round_trip() {
    let v = vectors();
    for vector in list(&v, "valid") {
        let input = text(&vector["id"]);
        let id = SpiffeId::new(&input).unwrap_or_else(|e| panic!("{input:?} refused: {e:?}"));
        assert_eq!(
            id.trust_domain().as_str(),
            text(&vector["trust_domain"]),
            "{input:?}"
        );
        assert_eq!(
            id.trust_domain_str(),
            text(&vector["trust_domain"]),
            "{input:?}"
        );
        assert_eq!(id.path(), text(&vector["path"]), "{input:?}");
        assert_eq!(id.to_string(), input);
        assert_eq!(id.as_str(), input);
        assert_eq!(input.parse::<SpiffeId>().unwrap(), id);
        // The trust domain of a valid ID is itself valid, and rebuilds the ID.
        let td = TrustDomain::new(id.trust_domain_str()).unwrap();
        assert_eq!(td, id.trust_domain());
        if id.path().is_empty() {
            assert_eq!(td.id_string(), input);
        } else {
            assert_eq!(td.spiffe_id(id.path()).unwrap(), id);
        }
    }
}

#[test]
fn invalid_vectors_fail_with_the_named_error() {
    let v = vectors();
    for vector in list(&v, "invalid") {
        let input = text(&vector["id"]);
        match SpiffeId::new(&input) {
            Ok(id) => panic!("{input:?} accepted as {id:?}"),
            Err(e) => check_error(&input, &e, vector),
        }
        assert!(input.parse::<SpiffeId>().is_err());
        let json = serde_json::to_string(&input).unwrap();
        assert!(
            serde_json::from_str::<SpiffeId>(&json).is_err(),
            "{input:?}"
        );
    }
}

#[test]
fn trust_domain_vectors() {
    let v = vectors();
    for vector in list(&v["trust_domains"], "valid") {
        let input = text(vector);
        let td = TrustDomain::new(&input).unwrap_or_else(|e| panic!("{input:?} refused: {e:?}"));
        assert_eq!(td.as_str(), input);
        assert_eq!(td.to_string(), input);
        assert_eq!(td.id_string(), format!("spiffe://{input}"));
        // The ID form names the same trust domain.
        assert_eq!(TrustDomain::new(&td.id_string()).unwrap(), td);
    }
    for vector in list(&v["trust_domains"], "invalid") {
        let input = text(&vector["input"]);
        match TrustDomain::new(&input) {
            Ok(td) => panic!("{input:?} accepted as {td:?}"),
            Err(e) => check_error(&input, &e, vector),
        }
    }
}

#[test]
fn trust_domain_spiffe_id_helper_checks_the_path() {
    let td = TrustDomain::new("example.org").unwrap();
    assert_eq!(
        td.spiffe_id("/a/b").unwrap().as_str(),
        "spiffe://example.org/a/b"
    );
    assert_eq!(td.spiffe_id("/a/"), Err(SpiffeIdError::TrailingSlash));
    assert_eq!(td.spiffe_id("/.."), Err(SpiffeIdError::DotSegment));
}

#[test]
fn join_appends_one_checked_segment() {
    let base = SpiffeId::new("spiffe://example.org/agents").unwrap();
    let joined = base.join("planner").unwrap();
    assert_eq!(joined.as_str(), "spiffe://example.org/agents/planner");
    assert!(joined.is_under(&base));
    assert_eq!(base.join(""), Err(SpiffeIdError::TrailingSlash));
    assert_eq!(base.join(".."), Err(SpiffeIdError::DotSegment));
    assert_eq!(base.join("a/"), Err(SpiffeIdError::TrailingSlash));
    assert_eq!(base.join("a?b"), Err(SpiffeIdError::Query));
    let long = "a".repeat(MAX_SPIFFE_ID_LEN);
    assert_eq!(
        base.join(&long),
        Err(SpiffeIdError::TooLong {
            max: MAX_SPIFFE_ID_LEN
        })
    );
}

// ---------------------------------------------------------------------------------------
// Oracle: an independent, deliberately naive reading of the SPIFFE-ID rules.
// ---------------------------------------------------------------------------------------

/// `Some((trust domain, path))` if `s` is a SPIFFE ID, by the standard's rules alone.
fn oracle(s: &str) -> Option<(&str, &str)> {
    if s.len() > 2048 {
        return None;
    }
    let rest = s.strip_prefix("spiffe://")?;
    let slash = rest.find('/').unwrap_or(rest.len());
    let (td, path) = rest.split_at(slash);
    let td_ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !td_ok {
        return None;
    }
    if !path.is_empty() {
        for segment in path[1..].split('/') {
            let seg_ok = !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !seg_ok {
                return None;
            }
        }
    }
    Some((td, path))
}

/// Parser and oracle agree on `s`; when both accept, the parse round-trips and splits
/// `s` where the oracle does.
fn assert_agrees(s: &str) -> Result<(), TestCaseError> {
    let parsed = SpiffeId::new(s);
    let expected = oracle(s);
    prop_assert_eq!(
        parsed.is_ok(),
        expected.is_some(),
        "parser {:?} vs oracle {:?} on {:?}",
        parsed,
        expected,
        s
    );
    if let (Ok(id), Some((td, path))) = (parsed, expected) {
        prop_assert_eq!(id.to_string(), s);
        prop_assert_eq!(id.trust_domain_str(), td);
        prop_assert_eq!(id.path(), path);
        prop_assert_eq!(SpiffeId::new(&id.to_string()).unwrap(), id);
    }
    Ok(())
}

#[test]
fn oracle_agrees_with_every_vector() {
    let v = vectors();
    for vector in list(&v, "valid") {
        assert!(oracle(&text(&vector["id"])).is_some(), "{}", vector["id"]);
    }
    for vector in list(&v, "invalid") {
        assert!(oracle(&text(&vector["id"])).is_none(), "{}", vector["id"]);
    }
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn trust_domain_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9._-]{1,40}",
        1 => "[a-z0-9._-]{250,255}",
    ]
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,16}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
}

/// A valid SPIFFE ID as `(text, trust domain, path)`.
fn valid_id() -> impl Strategy<Value = (String, String, String)> {
    (trust_domain_name(), prop::collection::vec(segment(), 0..10)).prop_map(|(td, segs)| {
        let path: String = segs.iter().map(|s| format!("/{s}")).collect();
        (format!("spiffe://{td}{path}"), td, path)
    })
}

/// Strings near the grammar: the right scheme (mostly), then characters that matter.
fn near_id() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::string::string_regex("spiffe://[a-zA-Z0-9._:@%?#/-]{0,40}").unwrap(),
        prop::string::string_regex("spiffe://[a-z0-9.]{1,12}(/[a-zA-Z0-9._%/ -]{0,8}){0,5}")
            .unwrap(),
        prop::string::string_regex("(spiffe|SPIFFE|spiffe:|https)(:/|://|//)[a-z./]{0,20}")
            .unwrap(),
        prop::string::string_regex("spiffe://[a-z\u{e9}\u{0} /]{0,20}").unwrap(),
        "\\PC{0,40}",
        any::<String>(),
    ]
}

/// IDs around the length limits: a trust domain of 250..=260 bytes, or a path that
/// brings the whole ID to 2040..=2056 bytes.
fn long_id() -> impl Strategy<Value = String> {
    prop_oneof![
        (250usize..=260, prop::bool::ANY).prop_map(|(n, with_path)| {
            format!(
                "spiffe://{}{}",
                "a".repeat(n),
                if with_path { "/p" } else { "" }
            )
        }),
        (2040usize..=2056, 1usize..=64).prop_map(|(total, seg)| {
            // "spiffe://example.org" is 20 bytes; fill with "/xxx.." segments.
            let mut s = String::from("spiffe://example.org");
            while s.len() < total {
                s.push('/');
                let n = seg.min(total - s.len()).max(1);
                s.push_str(&"x".repeat(n));
            }
            s
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// (a) Valid IDs round-trip through Display and parse, both ways.
    #[test]
    fn valid_ids_round_trip((s, td, path) in valid_id()) {
        let id = SpiffeId::new(&s).unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(id.trust_domain_str(), td.as_str());
        prop_assert_eq!(id.trust_domain(), TrustDomain::new(&td).unwrap());
        prop_assert_eq!(id.path(), path.as_str());
        let again = SpiffeId::new(&id.to_string()).unwrap();
        prop_assert_eq!(&again, &id);
        prop_assert_eq!(again.to_string(), s);
    }

    /// (b) Parser and oracle agree on strings near the grammar.
    #[test]
    fn parser_agrees_with_oracle(s in near_id()) {
        assert_agrees(&s)?;
    }

    /// (b) ... and around the length limits.
    #[test]
    fn parser_agrees_with_oracle_at_length_limits(s in long_id()) {
        assert_agrees(&s)?;
    }

    /// (b) ... and on single-character edits of valid IDs.
    #[test]
    fn parser_agrees_with_oracle_on_edits(
        (s, _, _) in valid_id(),
        at in any::<prop::sample::Index>(),
        c in prop::sample::select(vec!['/', '.', ':', '@', '%', '?', '#', 'A', 'a', ' ', '\u{e9}', '-']),
        op in 0u8..3,
    ) {
        let mut chars: Vec<char> = s.chars().collect();
        let i = at.index(chars.len());
        match op {
            0 => chars.insert(i, c),
            1 => { chars.remove(i); }
            _ => chars[i] = c,
        }
        let edited: String = chars.into_iter().collect();
        assert_agrees(&edited)?;
    }

    /// (c) `TrustDomain::new` accepts a path-free name exactly when `spiffe://<name>` is
    /// a SPIFFE ID, and both then name the same trust domain.
    #[test]
    fn trust_domain_agrees_with_spiffe_id(
        td in prop_oneof![
            prop::string::string_regex("[a-zA-Z0-9._:@%?# -]{0,20}").unwrap(),
            "[a-z0-9._-]{250,260}",
            "[^/]{0,30}",
        ]
    ) {
        let as_td = TrustDomain::new(&td);
        let as_id = SpiffeId::new(&format!("spiffe://{td}"));
        prop_assert_eq!(as_td.is_ok(), as_id.is_ok(), "{:?}: {:?} vs {:?}", td, as_td, as_id);
        if let (Ok(t), Ok(id)) = (as_td, as_id) {
            prop_assert_eq!(t.as_str(), td.as_str());
            prop_assert_eq!(id.trust_domain(), t);
            prop_assert_eq!(id.path(), "");
        }
    }

    /// (d) serde: a SPIFFE ID is a JSON string, and reads back equal.
    #[test]
    fn serde_round_trip((s, td, _) in valid_id()) {
        let id = SpiffeId::new(&s).unwrap();
        let json = serde_json::to_string(&id).unwrap();
        prop_assert_eq!(&json, &serde_json::to_string(&s).unwrap());
        let back: SpiffeId = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &id);

        let td = TrustDomain::new(&td).unwrap();
        let json = serde_json::to_string(&td).unwrap();
        let back: TrustDomain = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, td);
    }

    /// (d) serde refuses exactly what `SpiffeId::new` refuses.
    #[test]
    fn serde_agrees_with_new(s in near_id()) {
        let json = serde_json::to_string(&s).unwrap();
        let via_serde = serde_json::from_str::<SpiffeId>(&json);
        match SpiffeId::new(&s) {
            Ok(id) => prop_assert_eq!(via_serde.unwrap(), id),
            Err(_) => prop_assert!(via_serde.is_err()),
        }
    }
}

#[test]
fn serde_refuses_non_strings() {
    assert!(serde_json::from_str::<SpiffeId>("42").is_err());
    assert!(serde_json::from_str::<SpiffeId>("null").is_err());
    assert!(serde_json::from_str::<SpiffeId>(r#"{"id":"spiffe://example.org"}"#).is_err());
    assert!(serde_json::from_str::<TrustDomain>(r#""Example.org""#).is_err());
}
