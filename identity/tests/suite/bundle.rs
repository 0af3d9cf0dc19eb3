//! SPIFFE bundles through the public API: JSON and PEM codecs on real CA material, the
//! documented `BundleError` for each kind of bad input, and property tests (no panics,
//! round-trips, agreement with a model and with `serde_json`).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use proptest::prelude::*;
use serde_json::{Value, json};
use writ_identity::bundle::{
    Bundle, BundleError, BundleSet, Jwk, MAX_BUNDLE_BYTES, MAX_BUNDLE_KEYS, parse_strict_json,
};
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::ManualClock;
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::spiffe_id::TrustDomain;
use writ_identity::store::sqlite::SqliteStore;

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

async fn new_ca(trust_domain: &str, clock: &ManualClock) -> CertificateAuthority {
    let store = SqliteStore::open_in_memory()
        .await
        .expect("in-memory store");
    CertificateAuthority::load(
        CaConfig::new(TrustDomain::new(trust_domain).unwrap()),
        Arc::new(clock.clone()),
        Arc::new(MemoryKeyManager::new()),
        Arc::new(store),
    )
    .await
    .expect("CA loads")
}

/// Real material, made once per test binary by two CAs.
struct Fixture {
    /// The bundle of a fresh CA for `example.org`.
    bundle: Bundle,
    /// The CA certificate of a second CA (`other.org`): a second real X.509 authority.
    other_cert: Vec<u8>,
    /// The JWT key of the second CA.
    other_jwk: Jwk,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A thread of its own, so this works from sync and async tests alike.
        std::thread::spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let clock = ManualClock::new(start_time());
                let a = new_ca("example.org", &clock).await;
                let b = new_ca("other.org", &clock).await;
                let other = b.bundle();
                Fixture {
                    bundle: (*a.bundle()).clone(),
                    other_cert: other.x509_authorities()[0].clone(),
                    other_jwk: other.jwt_authorities().values().next().unwrap().clone(),
                }
            })
        })
        .join()
        .unwrap()
    })
}

fn ca_cert() -> &'static [u8] {
    &fixture().bundle.x509_authorities()[0]
}

/// A bundle with two X.509 authorities, three JWT keys (EC, RSA, OKP) and a hint.
fn rich_bundle() -> Bundle {
    let f = fixture();
    let mut b = f.bundle.clone();
    b.add_x509_authority(f.other_cert.clone()).unwrap();
    b.put_jwt_authority("other".into(), f.other_jwk.clone())
        .unwrap();
    b.put_jwt_authority(
        "rsa-1".into(),
        Jwk {
            kty: "RSA".into(),
            crv: None,
            x: None,
            y: None,
            n: Some(URL_SAFE_NO_PAD.encode([0xc5; 256])),
            e: Some("AQAB".into()),
        },
    )
    .unwrap();
    b.put_jwt_authority(
        "ed-1".into(),
        Jwk {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(URL_SAFE_NO_PAD.encode([7; 32])),
            y: None,
            n: None,
            e: None,
        },
    )
    .unwrap();
    b.set_refresh_hint(Some(60));
    b
}

fn x509_entry(der: &[u8]) -> Value {
    json!({"use": "x509-svid", "kty": "EC", "x5c": [STANDARD.encode(der)]})
}

fn jwt_entry(kid: &str) -> Value {
    let mut v = serde_json::to_value(Jwk::ec_p256(&[1; 32], &[2; 32])).unwrap();
    v["use"] = json!("jwt-svid");
    v["kid"] = json!(kid);
    v
}

fn doc(keys: Vec<Value>) -> String {
    json!({"keys": keys, "spiffe_sequence": 1}).to_string()
}

fn parse(text: &str) -> Result<Bundle, BundleError> {
    Bundle::from_json(td(), text)
}

// ---------------------------------------------------------------------------------------
// Codecs on real material
// ---------------------------------------------------------------------------------------

#[test]
fn ca_bundle_holds_one_x509_authority_and_one_jwt_key() {
    let b = &fixture().bundle;
    assert_eq!(b.trust_domain(), &td());
    assert_eq!(b.x509_authorities().len(), 1);
    assert_eq!(b.jwt_authorities().len(), 1);
    assert_eq!(b.refresh_hint(), Some(300));
    assert!(b.sequence() >= 1);
    let (kid, jwk) = b.jwt_authorities().iter().next().unwrap();
    assert_eq!(b.jwt_authority(kid), Some(jwk));
    assert_eq!(
        (jwk.kty.as_str(), jwk.crv.as_deref()),
        ("EC", Some("P-256"))
    );
}

#[test]
fn json_round_trip_preserves_everything() {
    for b in [fixture().bundle.clone(), rich_bundle(), Bundle::new(td())] {
        let json = b.to_json();
        let back = parse(&json).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.sequence(), b.sequence());
        assert_eq!(back.refresh_hint(), b.refresh_hint());
        assert_eq!(back.to_json(), json, "to_json is stable");
        assert_eq!(b.to_string(), json, "Display is the JSON document");
    }
    let mut b = rich_bundle();
    b.set_sequence(u64::MAX);
    b.set_refresh_hint(None);
    assert_eq!(parse(&b.to_json()).unwrap(), b);
}

#[test]
fn json_document_has_the_spiffe_shape() {
    let b = rich_bundle();
    let doc: Value = serde_json::from_str(&b.to_json()).unwrap();
    assert_eq!(doc["spiffe_sequence"], json!(b.sequence()));
    assert_eq!(doc["spiffe_refresh_hint"], json!(60));
    let keys = doc["keys"].as_array().unwrap();
    let (mut x509, mut jwt) = (Vec::new(), BTreeMap::new());
    for key in keys {
        match key["use"].as_str().unwrap() {
            "x509-svid" => {
                let x5c = key["x5c"].as_array().unwrap();
                assert_eq!(x5c.len(), 1, "exactly one certificate");
                assert!(key.get("kid").is_none(), "x509-svid entries carry no kid");
                assert_eq!(key["kty"], json!("EC"));
                x509.push(STANDARD.decode(x5c[0].as_str().unwrap()).unwrap());
            }
            "jwt-svid" => {
                let kid = key["kid"].as_str().expect("jwt-svid entries carry a kid");
                assert!(key.get("x5c").is_none());
                let jwk: Jwk = serde_json::from_value(key.clone()).unwrap();
                jwt.insert(kid.to_owned(), jwk);
            }
            other => panic!("unexpected use {other}"),
        }
    }
    assert_eq!(x509, b.x509_authorities());
    assert_eq!(&jwt, b.jwt_authorities());

    // Without a hint, the member is absent.
    let mut b = b;
    b.set_refresh_hint(None);
    let doc: Value = serde_json::from_str(&b.to_json()).unwrap();
    assert!(doc.get("spiffe_refresh_hint").is_none());
}

#[test]
fn pem_round_trip_keeps_the_x509_authorities() {
    let b = rich_bundle();
    let pem = b.to_pem();
    assert_eq!(pem.matches("-----BEGIN CERTIFICATE-----").count(), 2);
    let back = Bundle::from_pem(td(), &pem).unwrap();
    assert_eq!(back.x509_authorities(), b.x509_authorities());
    assert!(back.jwt_authorities().is_empty());
    assert_eq!(back.trust_domain(), &td());
    // A certificate listed twice is one authority.
    let twice = format!("{}{}", fixture().bundle.to_pem(), fixture().bundle.to_pem());
    assert_eq!(
        Bundle::from_pem(td(), &twice)
            .unwrap()
            .x509_authorities()
            .len(),
        1
    );
}

#[test]
fn every_change_bumps_the_sequence() {
    let f = fixture();
    let mut b = f.bundle.clone();
    let mut seq = b.sequence();
    let mut check = |b: &Bundle, bumped: bool, what: &str| {
        if bumped {
            seq += 1;
        }
        assert_eq!(b.sequence(), seq, "{what}");
    };
    b.add_x509_authority(f.other_cert.clone()).unwrap();
    check(&b, true, "add x509");
    b.add_x509_authority(f.other_cert.clone()).unwrap();
    check(&b, false, "add the same x509 again");
    b.remove_x509_authority(&f.other_cert);
    check(&b, true, "remove x509");
    b.remove_x509_authority(&f.other_cert);
    check(&b, false, "remove an absent x509");
    b.put_jwt_authority("k2".into(), f.other_jwk.clone())
        .unwrap();
    check(&b, true, "put jwt");
    b.put_jwt_authority("k2".into(), f.other_jwk.clone())
        .unwrap();
    check(&b, false, "put the same jwt again");
    b.put_jwt_authority("k2".into(), Jwk::ec_p256(&[9; 32], &[9; 32]))
        .unwrap();
    check(&b, true, "replace jwt");
    b.remove_jwt_authority("k2");
    check(&b, true, "remove jwt");
    b.remove_jwt_authority("k2");
    check(&b, false, "remove an absent jwt");
    b.set_refresh_hint(Some(300));
    check(&b, false, "same hint");
    b.set_refresh_hint(Some(301));
    check(&b, true, "new hint");
    b.set_refresh_hint(None);
    check(&b, true, "hint removed");
    assert!(b.same_content(&{
        let mut c = f.bundle.clone();
        c.set_refresh_hint(None);
        c
    }));
    // The sequence saturates instead of wrapping.
    b.set_sequence(u64::MAX);
    b.set_refresh_hint(Some(1));
    assert_eq!(b.sequence(), u64::MAX);
}

#[tokio::test]
async fn ca_rotation_publishes_a_higher_sequence() {
    let clock = ManualClock::new(start_time());
    let ca = new_ca("example.org", &clock).await;
    let mut rx = ca.subscribe();
    let first = ca.bundle();
    // Past half of the 24 h CA lifetime a next authority is prepared and published.
    clock.advance(Duration::from_secs(13 * 3600));
    assert!(ca.rotate().await.unwrap());
    let second = ca.bundle();
    assert!(second.sequence() > first.sequence());
    assert_eq!(second.x509_authorities().len(), 2);
    assert_eq!(second.jwt_authorities().len(), 2);
    assert!(rx.has_changed().unwrap());
    assert_eq!(**rx.borrow_and_update(), *second);
    assert_eq!(parse(&second.to_json()).unwrap(), *second);
}

#[test]
fn bundle_set_finds_bundles_by_trust_domain() {
    let f = fixture();
    let mut set = BundleSet::of(f.bundle.clone());
    assert_eq!(set.get(&td()), Some(&f.bundle));
    assert_eq!(set.get_by_name("example.org"), Some(&f.bundle));
    assert_eq!(set.get_by_name("other.org"), None);
    let other = Bundle::new(TrustDomain::new("other.org").unwrap());
    set.insert(other.clone());
    assert_eq!(set.iter().count(), 2);
    let mut replacement = f.bundle.clone();
    replacement.set_refresh_hint(Some(1));
    set.insert(replacement.clone());
    assert_eq!(set.iter().count(), 2);
    assert_eq!(set.get(&td()), Some(&replacement));
    assert_eq!(set.get_by_name("other.org"), Some(&other));
}

// ---------------------------------------------------------------------------------------
// Bad input gives the documented error
// ---------------------------------------------------------------------------------------

#[test]
fn not_json_is_a_json_error() {
    for text in [
        "",
        "nope",
        "{",
        "{\"keys\":[]",
        "{\"keys\":[]} trailing",
        "{'keys':[]}",
        "{\"keys\":[],}",
        "\u{feff}{\"keys\":[]}",
        "\"\\ud800\"",
    ] {
        assert!(matches!(parse(text), Err(BundleError::Json(_))), "{text:?}");
    }
}

#[test]
fn keys_missing_or_not_an_array() {
    for text in [
        "{}",
        "[]",
        "null",
        "42",
        r#""keys""#,
        r#"{"keys":null}"#,
        r#"{"keys":{}}"#,
        r#"{"keys":"[]"}"#,
        r#"{"Keys":[]}"#,
    ] {
        assert_eq!(parse(text), Err(BundleError::Member("keys")), "{text:?}");
    }
    assert_eq!(parse(r#"{"keys":[1]}"#), Err(BundleError::Member("keys[]")));
    assert_eq!(
        parse(r#"{"keys":[[]]}"#),
        Err(BundleError::Member("keys[]"))
    );
}

#[test]
fn sequence_and_hint_must_be_unsigned_integers() {
    for bad in [r#""1""#, "-1", "1.5", "null", "18446744073709551616"] {
        let text = format!(r#"{{"keys":[],"spiffe_sequence":{bad}}}"#);
        assert_eq!(
            parse(&text),
            Err(BundleError::Member("spiffe_sequence")),
            "{bad}"
        );
        let text = format!(r#"{{"keys":[],"spiffe_refresh_hint":{bad}}}"#);
        assert_eq!(
            parse(&text),
            Err(BundleError::Member("spiffe_refresh_hint")),
            "{bad}"
        );
    }
    let b = parse(r#"{"keys":[]}"#).unwrap();
    assert_eq!((b.sequence(), b.refresh_hint()), (0, None));
}

#[test]
fn x5c_must_hold_exactly_one_certificate() {
    let one = STANDARD.encode(ca_cert());
    for x5c in [
        json!([]),
        json!([one, one]),
        json!(one),
        json!([1]),
        json!(null),
    ] {
        let text = doc(vec![json!({"use": "x509-svid", "x5c": x5c})]);
        assert_eq!(
            parse(&text),
            Err(BundleError::X5cCount { index: 0 }),
            "{x5c}"
        );
    }
    let text = doc(vec![json!({"use": "x509-svid", "kty": "EC"})]);
    assert_eq!(parse(&text), Err(BundleError::X5cCount { index: 0 }));
    // The index names the offending key.
    let text = doc(vec![
        x509_entry(ca_cert()),
        jwt_entry("k"),
        json!({"use": "x509-svid", "x5c": []}),
    ]);
    assert_eq!(parse(&text), Err(BundleError::X5cCount { index: 2 }));
}

#[test]
fn x5c_must_be_base64_of_a_certificate() {
    // Not the alphabet, whitespace, the URL-safe alphabet, missing padding, bad length.
    for bad in ["!!!", "MIIB\nAAAA", "AB-_", "QQ", "A"] {
        let text = doc(vec![json!({"use": "x509-svid", "x5c": [bad]})]);
        assert_eq!(
            parse(&text),
            Err(BundleError::Certificate {
                index: 0,
                detail: "x5c is not base64".into()
            }),
            "{bad:?}"
        );
    }
    let mut trailing = ca_cert().to_vec();
    trailing.push(0);
    let truncated = &ca_cert()[..ca_cert().len() - 1];
    let private_key = PrivateKey::generate().unwrap();
    for der in [
        &b"not a certificate"[..],
        &[][..],
        &trailing[..],
        truncated,
        private_key.pkcs8_der(),
    ] {
        let text = doc(vec![x509_entry(ca_cert()), x509_entry(der)]);
        assert!(
            matches!(parse(&text), Err(BundleError::Certificate { index: 1, .. })),
            "{:?}",
            parse(&text)
        );
    }
}

#[test]
fn jwt_keys_need_a_kid() {
    let mut no_kid = jwt_entry("x");
    no_kid.as_object_mut().unwrap().remove("kid");
    let empty_kid = jwt_entry("");
    let mut number_kid = jwt_entry("x");
    number_kid["kid"] = json!(7);
    for (i, key) in [no_kid, empty_kid, number_kid].into_iter().enumerate() {
        let text = doc(vec![jwt_entry("ok"), key]);
        assert_eq!(
            parse(&text),
            Err(BundleError::MissingKid { index: 1 }),
            "case {i}"
        );
    }
}

#[test]
fn duplicate_kid_is_refused() {
    let text = doc(vec![
        jwt_entry("k1"),
        x509_entry(ca_cert()),
        jwt_entry("k1"),
    ]);
    assert_eq!(parse(&text), Err(BundleError::DuplicateKid("k1".into())));
    // The same kid on an ignored key (unknown kty) is not a duplicate.
    let ignored = json!({"use": "jwt-svid", "kty": "oct", "kid": "k1", "k": "AA"});
    assert!(parse(&doc(vec![jwt_entry("k1"), ignored])).is_ok());
}

#[test]
fn malformed_jwt_keys_are_refused() {
    let short = Jwk::ec_p256(&[1; 31], &[2; 32]);
    let mut p521 = Jwk::ec_p256(&[1; 32], &[2; 32]);
    p521.crv = Some("P-521".into());
    let mut no_y = Jwk::ec_p256(&[1; 32], &[2; 32]);
    no_y.y = None;
    let mut not_b64 = Jwk::ec_p256(&[1; 32], &[2; 32]);
    not_b64.x = Some("+/+/".into());
    let short_rsa = Jwk {
        kty: "RSA".into(),
        crv: None,
        x: None,
        y: None,
        n: Some(URL_SAFE_NO_PAD.encode([1; 128])),
        e: Some("AQAB".into()),
    };
    for jwk in [short, p521, no_y, not_b64, short_rsa] {
        let mut key = serde_json::to_value(&jwk).unwrap();
        key["use"] = json!("jwt-svid");
        key["kid"] = json!("bad");
        assert!(
            matches!(parse(&doc(vec![key])), Err(BundleError::Jwk { ref kid, .. }) if kid == "bad"),
            "{jwk:?}"
        );
    }
    // A member of the wrong type is a Jwk error too, not a panic.
    let mut key = jwt_entry("bad");
    key["x"] = json!(1);
    assert!(matches!(
        parse(&doc(vec![key])),
        Err(BundleError::Jwk { .. })
    ));
}

#[test]
fn unknown_use_and_kty_are_ignored() {
    let text = doc(vec![
        json!({"use": "enc", "kty": "EC"}),
        json!({"kty": "EC", "x5c": []}),
        json!({"use": "jwt-svid", "kty": "oct", "k": "AA"}),
        json!({"use": "jwt-svid"}),
        json!({"use": 5}),
        x509_entry(ca_cert()),
    ]);
    let b = parse(&text).unwrap();
    assert_eq!(b.x509_authorities(), [ca_cert().to_vec()]);
    assert!(b.jwt_authorities().is_empty());
}

#[test]
fn duplicate_member_names_are_refused_at_every_depth() {
    let dups = [
        r#"{"keys":[],"keys":[]}"#.to_owned(),
        r#"{"keys":[],"spiffe_sequence":1,"spiffe_sequence":2}"#.to_owned(),
        r#"{"keys":[],"a":1,"\u0061":2}"#.to_owned(),
        r#"{"keys":[{"use":"x509-svid","use":"jwt-svid"}]}"#.to_owned(),
        format!(
            r#"{{"keys":[{{"use":"x509-svid","x5c":["{c}"],"x5c":["{c}"]}}]}}"#,
            c = STANDARD.encode(ca_cert())
        ),
        r#"{"keys":[],"x":{"y":[{"z":1,"z":1}]}}"#.to_owned(),
    ];
    for text in &dups {
        assert!(
            serde_json::from_str::<Value>(text).is_ok(),
            "plain serde accepts"
        );
        assert!(parse_strict_json(text).is_err(), "{text}");
        assert!(matches!(parse(text), Err(BundleError::Json(_))), "{text}");
    }
    // The same name in different objects is fine.
    assert!(parse(r#"{"keys":[{"use":"a"},{"use":"b"}],"x":{"use":1}}"#).is_ok());
}

#[test]
fn oversized_documents_are_refused_before_parsing() {
    let base = doc(vec![x509_entry(ca_cert())]);
    let pad = |total: usize| format!("{base}{}", " ".repeat(total - base.len()));
    assert!(parse(&pad(MAX_BUNDLE_BYTES)).is_ok(), "exactly the limit");
    let too_big = pad(MAX_BUNDLE_BYTES + 1);
    let max = MAX_BUNDLE_BYTES;
    assert_eq!(parse(&too_big), Err(BundleError::TooLarge { max }));
    // Even if it is not JSON at all.
    assert_eq!(
        parse(&"x".repeat(max + 1)),
        Err(BundleError::TooLarge { max })
    );
    let pem = format!("{}{}", ca_pem(), " ".repeat(max));
    assert_eq!(
        Bundle::from_pem(td(), &pem),
        Err(BundleError::TooLarge { max })
    );
}

#[test]
fn too_many_keys_are_refused() {
    let keys = |n: usize| doc(vec![json!({"use": "other"}); n]);
    assert!(parse(&keys(MAX_BUNDLE_KEYS)).is_ok());
    assert_eq!(
        parse(&keys(MAX_BUNDLE_KEYS + 1)),
        Err(BundleError::TooManyKeys {
            max: MAX_BUNDLE_KEYS
        })
    );
    let pem = ca_pem().repeat(MAX_BUNDLE_KEYS + 1);
    assert_eq!(
        Bundle::from_pem(td(), &pem),
        Err(BundleError::TooManyKeys {
            max: MAX_BUNDLE_KEYS
        })
    );
}

#[test]
fn deep_nesting_is_refused_without_overflow() {
    let nested = |depth: usize| {
        format!(
            r#"{{"keys":[],"x":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    };
    assert!(parse(&nested(8)).is_ok());
    for depth in [32, 200, 100_000] {
        assert!(
            matches!(parse(&nested(depth)), Err(BundleError::Json(_))),
            "{depth}"
        );
    }
    let objects = format!(
        r#"{{"keys":[]{}}}"#,
        r#","x":{"y":1"#.repeat(64) + &"}".repeat(64)
    );
    assert!(matches!(parse(&objects), Err(BundleError::Json(_))));
    assert!(parse_strict_json(&"[".repeat(1_000_000)).is_err());
}

fn ca_pem() -> String {
    fixture().bundle.to_pem()
}

#[test]
fn pem_with_other_blocks_is_refused() {
    let key_pem = PrivateKey::generate().unwrap().to_pem();
    for text in [
        (*key_pem).clone(),
        format!("{}{}", ca_pem(), *key_pem),
        format!("{}{}", *key_pem, ca_pem()),
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n".into(),
        String::new(),
        "no pem here".into(),
    ] {
        assert!(
            matches!(Bundle::from_pem(td(), &text), Err(BundleError::Pem(_))),
            "{:?}",
            Bundle::from_pem(td(), &text)
        );
    }
    let junk = "-----BEGIN CERTIFICATE-----\nAAECAw==\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        Bundle::from_pem(td(), junk),
        Err(BundleError::Certificate { index: 0, .. })
    ));
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

/// An accepted document reads back equal after `to_json`, and `to_json` is a fixed point.
fn assert_round_trips(text: &str) -> Result<(), TestCaseError> {
    if let Ok(b) = parse(text) {
        let json = b.to_json();
        let back = parse(&json);
        prop_assert_eq!(back.as_ref(), Ok(&b), "accepted {:?}", text);
        prop_assert_eq!(back.unwrap().to_json(), json);
    }
    Ok(())
}

/// One entry of a generated bundle document, with the outcome the rules give it.
#[derive(Debug, Clone)]
enum Entry {
    X509(usize),
    Jwt(String),
    Ignored(Value),
    X5cCount,
    NotBase64,
    NotCertificate,
    NoKid,
    BadJwk(String),
    NotObject,
}

fn entry() -> impl Strategy<Value = Entry> {
    let kid = prop_oneof![
        prop::sample::select(vec!["k1", "k2", "k\"3", "ключ", "a/b", " "]).prop_map(String::from),
        "[a-zA-Z0-9_-]{1,12}",
    ];
    prop_oneof![
        6 => (0usize..2).prop_map(Entry::X509),
        6 => kid.clone().prop_map(Entry::Jwt),
        2 => prop::sample::select(vec![
            json!({"use": "enc"}),
            json!({"use": "jwt-svid", "kty": "oct", "kid": "k1"}),
            json!({"use": "jwt-svid", "kid": "k1"}),
            json!({"kty": "EC"}),
            json!({"use": null, "x5c": 1}),
        ])
        .prop_map(Entry::Ignored),
        1 => Just(Entry::X5cCount),
        1 => Just(Entry::NotBase64),
        1 => Just(Entry::NotCertificate),
        1 => Just(Entry::NoKid),
        1 => kid.prop_map(Entry::BadJwk),
        1 => Just(Entry::NotObject),
    ]
}

fn certificate(i: usize) -> &'static [u8] {
    if i == 0 {
        ca_cert()
    } else {
        &fixture().other_cert
    }
}

fn render(e: &Entry) -> Value {
    match e {
        Entry::X509(i) => x509_entry(certificate(*i)),
        Entry::Jwt(kid) => jwt_entry(kid),
        Entry::Ignored(v) => v.clone(),
        Entry::X5cCount => json!({"use": "x509-svid", "x5c": []}),
        Entry::NotBase64 => json!({"use": "x509-svid", "x5c": ["***"]}),
        Entry::NotCertificate => json!({"use": "x509-svid", "x5c": ["AAAA"]}),
        Entry::NoKid => json!({"use": "jwt-svid", "kty": "EC"}),
        Entry::BadJwk(kid) => json!({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": kid}),
        Entry::NotObject => json!("key"),
    }
}

/// The model: what `from_json` must return for a document of these entries.
fn model(entries: &[Entry], sequence: u64, hint: Option<u64>) -> Result<Bundle, BundleError> {
    let mut b = Bundle::new(td());
    for (index, e) in entries.iter().enumerate() {
        match e {
            Entry::X509(i) => b.add_x509_authority(certificate(*i).to_vec()).unwrap(),
            Entry::Jwt(kid) => {
                if b.jwt_authority(kid).is_some() {
                    return Err(BundleError::DuplicateKid(kid.clone()));
                }
                b.put_jwt_authority(kid.clone(), Jwk::ec_p256(&[1; 32], &[2; 32]))
                    .unwrap();
            }
            Entry::Ignored(_) => {}
            Entry::X5cCount => return Err(BundleError::X5cCount { index }),
            Entry::NotBase64 | Entry::NotCertificate => {
                return Err(BundleError::Certificate {
                    index,
                    detail: String::new(),
                });
            }
            Entry::NoKid => return Err(BundleError::MissingKid { index }),
            Entry::BadJwk(kid) => {
                return Err(BundleError::Jwk {
                    kid: kid.clone(),
                    detail: String::new(),
                });
            }
            Entry::NotObject => return Err(BundleError::Member("keys[]")),
        }
    }
    b.set_refresh_hint(hint);
    b.set_sequence(sequence);
    Ok(b)
}

/// Errors compared without their free-text detail.
fn shape(r: &Result<Bundle, BundleError>) -> Result<&Bundle, BundleError> {
    match r {
        Ok(b) => Ok(b),
        Err(BundleError::Certificate { index, .. }) => Err(BundleError::Certificate {
            index: *index,
            detail: String::new(),
        }),
        Err(BundleError::Jwk { kid, .. }) => Err(BundleError::Jwk {
            kid: kid.clone(),
            detail: String::new(),
        }),
        Err(e) => Err(e.clone()),
    }
}

/// A JSON value without duplicate member names (maps are `BTreeMap`s), shallower than the
/// strict parser's depth limit.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,8}".prop_map(Value::String),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\"\\\\\u{e9}]{0,4}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    Replace(prop::sample::Index, char),
    Insert(prop::sample::Index, char),
    Delete(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let c = prop_oneof![
        prop::sample::select(vec![
            '"', '{', '}', '[', ']', ',', ':', '\\', ' ', '0', '9', '-', 'e', '.', 'A', '+', '/',
            '=', 'x', 'n', '\u{e9}', '\u{0}',
        ]),
        any::<char>(),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), c.clone()).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (any::<prop::sample::Index>(), c).prop_map(|(i, c)| Mutation::Insert(i, c)),
        any::<prop::sample::Index>().prop_map(Mutation::Delete),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for m in mutations {
        match *m {
            Mutation::Replace(i, c) if !chars.is_empty() => {
                let i = i.index(chars.len());
                chars[i] = c;
            }
            Mutation::Insert(i, c) => {
                let i = i.index(chars.len() + 1);
                chars.insert(i, c);
            }
            Mutation::Delete(i) if !chars.is_empty() => {
                let i = i.index(chars.len());
                chars.remove(i);
            }
            _ => {}
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (a) Arbitrary text never panics the parser; whatever it accepts round-trips.
    #[test]
    fn arbitrary_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            prop::string::string_regex(
                r#"\{"keys":\[(\{("(use|kid|kty|x5c|crv)":"[a-z0-9-]{0,9}",?){0,4}\},?){0,3}\](,"spiffe_(sequence|refresh_hint)":-?[0-9]{0,21})?\}"#
            ).unwrap(),
        ]
    ) {
        assert_round_trips(&text)?;
    }

    /// (a) Arbitrary bytes, read as text lossily, never panic either.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        assert_round_trips(&text)?;
        let _ = Bundle::from_pem(td(), &text);
    }

    /// (a) Generated documents give exactly the model's result; accepted ones round-trip.
    #[test]
    fn from_json_agrees_with_the_model(
        entries in prop::collection::vec(entry(), 0..8),
        sequence in any::<u64>(),
        hint in prop::option::of(any::<u64>()),
    ) {
        let mut d = json!({
            "keys": entries.iter().map(render).collect::<Vec<_>>(),
            "spiffe_sequence": sequence,
        });
        if let Some(h) = hint {
            d["spiffe_refresh_hint"] = json!(h);
        }
        let text = d.to_string();
        let got = parse(&text);
        let want = model(&entries, sequence, hint);
        prop_assert_eq!(shape(&got), shape(&want));
        assert_round_trips(&text)?;
        // Pretty-printed, the same document means the same bundle.
        let pretty = parse(&serde_json::to_string_pretty(&d).unwrap());
        prop_assert_eq!(shape(&pretty), shape(&got));
    }

    /// (b) Random edits of a real bundle document never panic; accepted results
    /// round-trip.
    #[test]
    fn mutated_bundles_never_panic(
        rich in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let base = if rich { rich_bundle() } else { fixture().bundle.clone() };
        let text = mutate(&base.to_json(), &mutations);
        assert_round_trips(&text)?;
    }

    /// (c) Without duplicate names, the strict parser reads exactly what serde_json reads.
    #[test]
    fn strict_parser_agrees_with_serde_json(value in json_value(), pretty in any::<bool>()) {
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            serde_json::to_string(&value).unwrap()
        };
        let plain: Value = serde_json::from_str(&text).unwrap();
        let strict = parse_strict_json(&text);
        prop_assert_eq!(strict.as_ref().ok(), Some(&plain), "{}", text);
    }

    /// (c) ... and refuses the same documents with one duplicate name injected, at any
    /// depth, which serde_json alone accepts.
    #[test]
    fn strict_parser_refuses_injected_duplicates(
        object in prop::collection::btree_map("[a-z]{0,3}", json_value(), 1..5),
        extra in json_value(),
        pick in any::<prop::sample::Index>(),
        wrappers in prop::collection::vec(any::<bool>(), 0..6),
    ) {
        let keys: Vec<&String> = object.keys().collect();
        let key = keys[pick.index(keys.len())];
        let rendered = serde_json::to_string(&Value::Object(object.clone().into_iter().collect())).unwrap();
        // Insert `"key":extra,` right after the opening brace.
        let mut text = format!(
            "{{{}:{},{}",
            serde_json::to_string(key).unwrap(),
            extra,
            &rendered[1..]
        );
        for in_array in wrappers {
            text = if in_array { format!("[1,{text}]") } else { format!(r#"{{"w":{text}}}"#) };
        }
        prop_assert!(serde_json::from_str::<Value>(&text).is_ok(), "serde_json accepts {}", text);
        prop_assert!(parse_strict_json(&text).is_err(), "strict parser accepted {}", text);
    }
}

/// What the mutators accept, the codec must read back: input the parser would refuse is
/// refused by the mutators too, and leaves the bundle (and its sequence) unchanged.
#[test]
fn mutators_refuse_what_the_codec_would_refuse() {
    type Change = Box<dyn Fn(&mut Bundle) -> Result<(), BundleError>>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "DER that is not a certificate",
            Box::new(|b| b.add_x509_authority(b"not a certificate".to_vec())),
        ),
        (
            "empty kid",
            Box::new(|b| b.put_jwt_authority(String::new(), Jwk::ec_p256(&[1; 32], &[2; 32]))),
        ),
        (
            "EC coordinate of the wrong length",
            Box::new(|b| b.put_jwt_authority("k".into(), Jwk::ec_p256(&[1; 31], &[2; 32]))),
        ),
        (
            "unknown kty",
            Box::new(|b| {
                b.put_jwt_authority(
                    "k".into(),
                    Jwk {
                        kty: "oct".into(),
                        crv: None,
                        x: None,
                        y: None,
                        n: None,
                        e: None,
                    },
                )
            }),
        ),
    ];
    for (what, change) in cases {
        let mut b = fixture().bundle.clone();
        let before = b.clone();
        assert!(change(&mut b).is_err(), "{what} must be refused");
        assert_eq!(b, before, "{what}: bundle unchanged");
        assert_eq!(parse(&b.to_json()), Ok(b), "{what}: still round-trips");
    }
}
