//! JWT-SVIDs through the public API: tokens from a real CA validate, and `validate`
//! refuses every kind of bad token with the documented `JwtSvidError`, with expiry driven
//! by a `ManualClock`.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use serde_json::{Value, json};
use writ_identity::bundle::{Bundle, BundleSet, Jwk};
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::{Clock, ManualClock, unix_seconds};
use writ_identity::key_manager::{MemoryKeyManager, PrivateKey};
use writ_identity::numeric_date::TimeError;
use writ_identity::spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
use writ_identity::store::sqlite::SqliteStore;
use writ_identity::svid::jwt::{self, JwtSvidError, MAX_TOKEN_BYTES};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn start_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn planner() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/agents/planner").unwrap()
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

fn bundles(ca: &CertificateAuthority) -> BundleSet {
    BundleSet::of((*ca.bundle()).clone())
}

fn aud(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| (*a).to_owned()).collect()
}

/// A CA, its clock, and one token it signed for `planner()` and audience `aud`.
struct Setup {
    ca: CertificateAuthority,
    clock: ManualClock,
    token: String,
    expires_at: SystemTime,
}

async fn setup() -> Setup {
    let clock = ManualClock::new(start_time());
    let ca = new_ca("example.org", &clock).await;
    let (token, expires_at) = ca.sign_jwt_svid(&planner(), &aud(&["aud"]), None).unwrap();
    Setup {
        ca,
        clock,
        token,
        expires_at,
    }
}

impl Setup {
    fn validate(&self, token: &str, expected: &[&str]) -> Result<jwt::JwtSvid, JwtSvidError> {
        jwt::validate(token, expected, &bundles(&self.ca), self.clock.now())
    }

    fn kid(&self) -> String {
        self.ca
            .bundle()
            .jwt_authorities()
            .keys()
            .next()
            .unwrap()
            .clone()
    }
}

/// The three segments of a compact JWS.
fn parts(token: &str) -> [String; 3] {
    let v: Vec<&str> = token.split('.').collect();
    assert_eq!(v.len(), 3, "compact JWS");
    [v[0].to_owned(), v[1].to_owned(), v[2].to_owned()]
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

fn unb64(s: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).unwrap()).unwrap()
}

/// A token with this header, the payload and signature of `token`.
fn with_header(token: &str, header: &Value) -> String {
    let [_, p, s] = parts(token);
    format!("{}.{p}.{s}", b64(header))
}

/// A token with this payload, the header and signature of `token`.
fn with_payload(token: &str, payload: &Value) -> String {
    let [h, _, s] = parts(token);
    format!("{h}.{}.{s}", b64(payload))
}

/// A token signed by a key outside any CA, and a bundle that trusts that key as `kid`.
fn own_key_token(
    kid: &str,
    audience: &[&str],
    iat: i64,
    exp: i64,
) -> (String, BundleSet, PrivateKey) {
    let key = PrivateKey::generate().unwrap();
    let token = jwt::sign(&key, kid, &planner(), &aud(audience), iat, exp).unwrap();
    let (x, y) = key.ec_p256_xy().unwrap();
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle
        .put_jwt_authority(kid.to_owned(), Jwk::ec_p256(x, y))
        .unwrap();
    (token, BundleSet::of(bundle), key)
}

// ---------------------------------------------------------------------------------------
// Accepted tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn ca_token_validates() {
    let s = setup().await;
    let svid = s.validate(&s.token, &["aud"]).unwrap();
    assert_eq!(svid.spiffe_id, planner());
    assert_eq!(svid.audience, vec!["aud".to_owned()]);
    assert_eq!(svid.kid, s.kid());
    let now = unix_seconds(s.clock.now());
    assert_eq!(svid.issued_at, now);
    assert_eq!(svid.expires_at, unix_seconds(s.expires_at));
    assert_eq!(svid.expires_at, now + 300, "default JWT-SVID lifetime");

    // The header is what the JWT-SVID standard asks for.
    let [h, p, _] = parts(&s.token);
    let header = unb64(&h);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], json!(s.kid()));
    let claims = unb64(&p);
    assert_eq!(claims["sub"], json!(planner().to_string()));
    assert_eq!(claims["aud"], json!("aud"));
}

#[tokio::test]
async fn bundle_read_back_from_json_validates_too() {
    let s = setup().await;
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = Bundle::from_json(td, &s.ca.bundle().to_json()).unwrap();
    let svid = jwt::validate(&s.token, &["aud"], &BundleSet::of(bundle), s.clock.now()).unwrap();
    assert_eq!(svid.spiffe_id, planner());
}

#[tokio::test]
async fn any_expected_audience_matches() {
    let s = setup().await;
    let (token, _) =
        s.ca.sign_jwt_svid(&planner(), &aud(&["a", "b"]), None)
            .unwrap();
    let svid = s.validate(&token, &["b"]).unwrap();
    assert_eq!(svid.audience, aud(&["a", "b"]));
    assert!(s.validate(&token, &["x", "a"]).is_ok());
    assert_eq!(
        s.validate(&token, &["c"]).unwrap_err(),
        JwtSvidError::Audience
    );
    assert_eq!(s.validate(&token, &[]).unwrap_err(), JwtSvidError::Audience);
    // Matching is exact: no prefix, case or whitespace folding.
    for near in ["B", "b ", "", "bb", "a,b"] {
        assert_eq!(
            s.validate(&token, &[near]).unwrap_err(),
            JwtSvidError::Audience,
            "{near:?}"
        );
    }
}

#[test]
fn token_from_a_separate_key_validates_against_its_bundle() {
    let now = 1_800_000_000;
    let (token, set, _) = own_key_token("k1", &["aud"], now, now + 60);
    let svid = jwt::validate(
        &token,
        &["aud"],
        &set,
        UNIX_EPOCH + Duration::from_secs(1_800_000_010),
    )
    .unwrap();
    assert_eq!(svid.kid, "k1");
    assert_eq!((svid.issued_at, svid.expires_at), (now, now + 60));
}

#[tokio::test]
async fn old_tokens_validate_after_the_jwt_key_rotates() {
    let s = setup().await;
    // A long-lived token, capped by the CA to its key's 24 h lifetime.
    let (old, _) =
        s.ca.sign_jwt_svid(
            &planner(),
            &aud(&["aud"]),
            Some(Duration::from_secs(23 * 3600)),
        )
        .unwrap();
    // Past 5/6 of the key's lifetime the prepared key becomes active.
    s.clock.advance(Duration::from_secs(13 * 3600));
    s.ca.rotate().await.unwrap();
    s.clock.advance(Duration::from_secs(8 * 3600));
    s.ca.rotate().await.unwrap();
    let (new, _) =
        s.ca.sign_jwt_svid(&planner(), &aud(&["aud"]), None)
            .unwrap();
    let old_kid = s.validate(&old, &["aud"]).unwrap().kid;
    let new_kid = s.validate(&new, &["aud"]).unwrap().kid;
    assert_ne!(old_kid, new_kid);
    assert_eq!(s.ca.bundle().jwt_authorities().len(), 2);
}

// ---------------------------------------------------------------------------------------
// Refused tokens
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn wrong_audience_is_refused() {
    let s = setup().await;
    assert_eq!(
        s.validate(&s.token, &["other"]).unwrap_err(),
        JwtSvidError::Audience
    );
}

#[tokio::test]
async fn expiry_follows_the_clock() {
    let s = setup().await;
    let exp = unix_seconds(s.expires_at);
    s.clock
        .set(UNIX_EPOCH + Duration::from_secs(u64::try_from(exp).unwrap() - 1));
    assert!(
        s.validate(&s.token, &["aud"]).is_ok(),
        "one second before exp"
    );
    s.clock
        .set(UNIX_EPOCH + Duration::from_millis(u64::try_from(exp).unwrap() * 1000 - 1));
    assert!(
        s.validate(&s.token, &["aud"]).is_ok(),
        "one millisecond before exp"
    );
    s.clock.set(s.expires_at);
    assert_eq!(
        s.validate(&s.token, &["aud"]).unwrap_err(),
        JwtSvidError::Expired,
        "at exp"
    );
    s.clock.advance(Duration::from_secs(3600));
    assert_eq!(
        s.validate(&s.token, &["aud"]).unwrap_err(),
        JwtSvidError::Expired
    );
}

#[test]
fn expired_own_key_token_is_refused() {
    let (token, set, _) = own_key_token("k1", &["aud"], 100, 200);
    let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
    assert!(jwt::validate(&token, &["aud"], &set, at(199)).is_ok());
    assert_eq!(
        jwt::validate(&token, &["aud"], &set, at(200)).unwrap_err(),
        JwtSvidError::Expired
    );
    // Before the epoch counts as time 0, not as a panic: the token (iat 100) is then
    // issued in the future.
    let before_epoch = UNIX_EPOCH - Duration::from_secs(10);
    assert_eq!(
        jwt::validate(&token, &["aud"], &set, before_epoch).unwrap_err(),
        JwtSvidError::Time(TimeError::IssuedInFuture)
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let s = setup().await;
    let [_, p, _] = parts(&s.token);
    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": s.kid()});
        // Unsecured JWS: empty signature.
        let token = format!("{}.{p}.", b64(&header));
        // jsonwebtoken has no `none` algorithm, so the header does not even parse.
        assert!(
            matches!(
                s.validate(&token, &["aud"]),
                Err(JwtSvidError::Malformed(_))
            ),
            "{alg}: {:?}",
            s.validate(&token, &["aud"])
        );
        // Keeping the real signature does not help.
        let token = with_header(&s.token, &header);
        assert!(matches!(
            s.validate(&token, &["aud"]),
            Err(JwtSvidError::Malformed(_))
        ));
    }
}

#[tokio::test]
async fn hmac_and_other_algorithms_are_refused_before_any_key_is_used() {
    let s = setup().await;
    let [_, p, _] = parts(&s.token);
    for alg in ["HS256", "HS384", "HS512", "EdDSA"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": s.kid()});
        // A fake MAC: the algorithm must be refused before any verification.
        let token = format!("{}.{p}.{}", b64(&header), URL_SAFE_NO_PAD.encode([0u8; 32]));
        assert_eq!(
            s.validate(&token, &["aud"]).unwrap_err(),
            JwtSvidError::Algorithm(alg.to_owned())
        );
    }
}

#[tokio::test]
async fn algorithm_confusion_with_a_real_signature_is_refused() {
    let s = setup().await;
    // Allowed algorithms, but not the one the key signs with: the signature fails.
    for alg in ["ES384", "RS256", "PS256"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": s.kid()});
        let token = with_header(&s.token, &header);
        assert!(
            matches!(
                s.validate(&token, &["aud"]),
                Err(JwtSvidError::Signature(_))
            ),
            "{alg}: {:?}",
            s.validate(&token, &["aud"])
        );
    }
}

#[tokio::test]
async fn missing_kid_is_refused() {
    let s = setup().await;
    let token = with_header(&s.token, &json!({"alg": "ES256", "typ": "JWT"}));
    assert_eq!(
        s.validate(&token, &["aud"]).unwrap_err(),
        JwtSvidError::MissingKid
    );
}

#[tokio::test]
async fn unknown_kid_is_refused() {
    let s = setup().await;
    // Properly signed, by a key the CA's bundle does not hold.
    let (token, _, _) = own_key_token("k1", &["aud"], 0, i64::MAX);
    assert_eq!(
        s.validate(&token, &["aud"]).unwrap_err(),
        JwtSvidError::UnknownKey("k1".into())
    );
    // The CA's token relabelled with another kid.
    let token = with_header(
        &s.token,
        &json!({"alg": "ES256", "typ": "JWT", "kid": "x".repeat(500)}),
    );
    assert_eq!(
        s.validate(&token, &["aud"]).unwrap_err(),
        JwtSvidError::UnknownKey("x".repeat(64)),
        "the kid in the error is truncated"
    );
}

#[test]
fn known_kid_with_another_key_is_refused() {
    let (token, _, _) = own_key_token("k1", &["aud"], 0, i64::MAX);
    let (_, other_set, _) = own_key_token("k1", &["aud"], 0, i64::MAX);
    assert!(matches!(
        jwt::validate(&token, &["aud"], &other_set, start_time()),
        Err(JwtSvidError::Signature(_))
    ));
}

#[tokio::test]
async fn sub_that_is_not_a_spiffe_id_is_refused() {
    let s = setup().await;
    let [_, p, _] = parts(&s.token);
    let claims = unb64(&p);
    // `jwt::sign` only takes a SpiffeId, so a bad `sub` is made by editing the payload of
    // a real token. `validate` reads `sub` (to pick the bundle) before it checks the
    // signature, so what we observe is the Subject error, not a Signature error.
    let cases = [
        (json!("not-a-spiffe-id"), SpiffeIdError::WrongScheme),
        (json!("spiffe://example.org/"), SpiffeIdError::TrailingSlash),
        (
            json!("spiffe://EXAMPLE.org/x"),
            SpiffeIdError::BadTrustDomainChar { found: 'E' },
        ),
        (json!(""), SpiffeIdError::Empty),
    ];
    for (sub, err) in cases {
        let mut c = claims.clone();
        c["sub"] = sub;
        let token = with_payload(&s.token, &c);
        assert_eq!(
            s.validate(&token, &["aud"]).unwrap_err(),
            JwtSvidError::Subject(err)
        );
    }
    for sub in [json!(null), json!(7), json!(["spiffe://example.org/x"])] {
        let mut c = claims.clone();
        c["sub"] = sub;
        let token = with_payload(&s.token, &c);
        assert_eq!(
            s.validate(&token, &["aud"]).unwrap_err(),
            JwtSvidError::Claim("sub")
        );
    }
    let mut c = claims.clone();
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        s.validate(&with_payload(&s.token, &c), &["aud"])
            .unwrap_err(),
        JwtSvidError::Claim("sub")
    );
    // A valid SPIFFE ID swapped in fails on the signature.
    let mut c = claims;
    c["sub"] = json!("spiffe://example.org/agents/admin");
    assert!(matches!(
        s.validate(&with_payload(&s.token, &c), &["aud"]),
        Err(JwtSvidError::Signature(_))
    ));
}

#[tokio::test]
async fn edited_claims_fail_the_signature() {
    let s = setup().await;
    let [_, p, _] = parts(&s.token);
    let claims = unb64(&p);
    for (name, value) in [
        ("aud", json!("other")),
        ("exp", json!(i64::MAX)),
        ("iat", json!(0)),
    ] {
        let mut c = claims.clone();
        c[name] = value;
        assert!(matches!(
            s.validate(&with_payload(&s.token, &c), &["aud", "other"]),
            Err(JwtSvidError::Signature(_))
        ));
    }
}

#[tokio::test]
async fn oversized_token_is_refused() {
    let s = setup().await;
    let [h, p, sig] = parts(&s.token);
    let padded = format!("{h}.{p}{}.{sig}", "A".repeat(MAX_TOKEN_BYTES));
    assert_eq!(
        s.validate(&padded, &["aud"]).unwrap_err(),
        JwtSvidError::TooLarge {
            max: MAX_TOKEN_BYTES
        }
    );
    assert_eq!(
        s.validate(&"x".repeat(MAX_TOKEN_BYTES + 1), &["aud"])
            .unwrap_err(),
        JwtSvidError::TooLarge {
            max: MAX_TOKEN_BYTES
        }
    );
}

#[tokio::test]
async fn tampered_signature_is_refused() {
    let s = setup().await;
    let [h, p, sig] = parts(&s.token);
    let mut bytes = URL_SAFE_NO_PAD.decode(&sig).unwrap();
    assert_eq!(bytes.len(), 64, "ES256 signatures are r || s");
    for i in [0, 31, 32, 63] {
        let mut b = bytes.clone();
        b[i] ^= 1;
        let token = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&b));
        assert!(matches!(
            s.validate(&token, &["aud"]),
            Err(JwtSvidError::Signature(_))
        ));
    }
    // No signature, or a truncated one.
    bytes.truncate(32);
    for sig in [String::new(), URL_SAFE_NO_PAD.encode(&bytes)] {
        assert!(matches!(
            s.validate(&format!("{h}.{p}.{sig}"), &["aud"]),
            Err(JwtSvidError::Signature(_))
        ));
    }
}

#[tokio::test]
async fn token_of_a_trust_domain_without_bundle_is_refused() {
    let clock = ManualClock::new(start_time());
    let ours = new_ca("example.org", &clock).await;
    let theirs = new_ca("other.org", &clock).await;
    let id = SpiffeId::new("spiffe://other.org/w").unwrap();
    let (token, _) = theirs.sign_jwt_svid(&id, &aud(&["aud"]), None).unwrap();
    assert_eq!(
        jwt::validate(&token, &["aud"], &bundles(&ours), clock.now()).unwrap_err(),
        JwtSvidError::NoBundle("other.org".into())
    );
    // With both bundles it validates, against the right one.
    let mut set = bundles(&ours);
    set.insert((*theirs.bundle()).clone());
    assert_eq!(
        jwt::validate(&token, &["aud"], &set, clock.now())
            .unwrap()
            .spiffe_id,
        id
    );
    // A token claiming another trust domain's sub does not verify with its keys.
    let (ours_token, _) = ours
        .sign_jwt_svid(&planner(), &aud(&["aud"]), None)
        .unwrap();
    let [_, p, _] = parts(&ours_token);
    let mut c = unb64(&p);
    c["sub"] = json!("spiffe://other.org/w");
    let forged = with_payload(&ours_token, &c);
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": theirs.bundle().jwt_authorities().keys().next().unwrap()});
    let forged = with_header(&forged, &header);
    assert!(matches!(
        jwt::validate(&forged, &["aud"], &set, clock.now()),
        Err(JwtSvidError::Signature(_))
    ));
}

#[tokio::test]
async fn typ_other_than_jwt_or_jose_is_refused() {
    let s = setup().await;
    for typ in ["at+jwt", "jwt", "JWS", "", "secevent+jwt"] {
        let header = json!({"alg": "ES256", "typ": typ, "kid": s.kid()});
        assert_eq!(
            s.validate(&with_header(&s.token, &header), &["aud"])
                .unwrap_err(),
            JwtSvidError::Type(typ.to_owned()),
            "{typ:?}"
        );
    }
    let long = "t".repeat(1000);
    let header = json!({"alg": "ES256", "typ": long, "kid": s.kid()});
    assert_eq!(
        s.validate(&with_header(&s.token, &header), &["aud"])
            .unwrap_err(),
        JwtSvidError::Type("t".repeat(32))
    );
    // JOSE is allowed: the edited header then fails only on the signature.
    let header = json!({"alg": "ES256", "typ": "JOSE", "kid": s.kid()});
    assert!(matches!(
        s.validate(&with_header(&s.token, &header), &["aud"]),
        Err(JwtSvidError::Signature(_))
    ));
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let s = setup().await;
    let [h, p, sig] = parts(&s.token);
    for token in [
        String::new(),
        ".".into(),
        "..".into(),
        "a.b.c".into(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{sig}.{sig}"),
        format!(" {}", s.token),
        format!("{}\n", s.token),
        format!("{h}=.{p}.{sig}"),
        format!("{}.{p}.{sig}", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.{p}.{sig}", URL_SAFE_NO_PAD.encode("[]")),
    ] {
        let r = s.validate(&token, &["aud"]);
        assert!(
            matches!(
                r,
                Err(JwtSvidError::Malformed(_) | JwtSvidError::Signature(_))
            ),
            "{token:?}: {r:?}"
        );
    }
}

#[test]
fn empty_audience_claim_is_refused() {
    // `jwt::sign` encodes whatever audience list it is given (the CA refuses an empty
    // one before signing); `validate` refuses a signed token with `"aud": []`.
    let key = PrivateKey::generate().unwrap();
    let token = jwt::sign(&key, "k1", &planner(), &[], 0, i64::MAX).unwrap();
    let (x, y) = key.ec_p256_xy().unwrap();
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle
        .put_jwt_authority("k1".into(), Jwk::ec_p256(x, y))
        .unwrap();
    assert_eq!(
        jwt::validate(&token, &["aud"], &BundleSet::of(bundle), start_time()).unwrap_err(),
        JwtSvidError::Claim("aud")
    );
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

/// A CA token and the bundles and time to validate it, made once.
struct Fixture {
    token: String,
    bundles: BundleSet,
    now: SystemTime,
    kid: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let s = setup().await;
                Fixture {
                    kid: s.kid(),
                    token: s.token.clone(),
                    bundles: bundles(&s.ca),
                    now: s.clock.now(),
                }
            })
        })
        .join()
        .unwrap()
    })
}

fn validate_fixture(token: &str) -> Result<jwt::JwtSvid, JwtSvidError> {
    let f = fixture();
    jwt::validate(token, &["aud"], &f.bundles, f.now)
}

const B64URL: &str = "[A-Za-z0-9_-]";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary strings never panic the validator and are never accepted.
    #[test]
    fn garbage_is_never_accepted(
        token in prop_oneof![
            any::<String>(),
            prop::string::string_regex(&format!("{B64URL}{{0,60}}\\.{B64URL}{{0,60}}\\.{B64URL}{{0,90}}")).unwrap(),
            prop::string::string_regex("[A-Za-z0-9_=+/. -]{0,120}").unwrap(),
        ]
    ) {
        prop_assert!(validate_fixture(&token).is_err());
    }

    /// Tokens with any header and the real claims, with a random signature, are refused.
    #[test]
    fn forged_headers_are_never_accepted(
        alg in prop::sample::select(vec!["ES256", "ES384", "RS256", "PS512", "HS256", "none", "EdDSA", "", "es256"]),
        typ in prop::option::of(prop::sample::select(vec!["JWT", "JOSE", "jwt", "x"])),
        real_kid in any::<bool>(),
        sig in prop::collection::vec(any::<u8>(), 0..80),
    ) {
        let f = fixture();
        let mut header = json!({"alg": alg});
        if let Some(t) = typ {
            header["typ"] = json!(t);
        }
        header["kid"] = json!(if real_kid { f.kid.as_str() } else { "other" });
        let [_, p, _] = parts(&f.token);
        let token = format!("{}.{p}.{}", b64(&header), URL_SAFE_NO_PAD.encode(&sig));
        prop_assert!(validate_fixture(&token).is_err());
    }

    /// Any one-character edit of a valid token is refused (and never panics).
    #[test]
    fn edited_tokens_are_never_accepted(
        at in any::<prop::sample::Index>(),
        c in prop_oneof![
            prop::sample::select(vec!['A', 'a', 'Q', 'w', '0', '-', '_', '.', '=', '+', '/', ' ']),
            any::<char>(),
        ],
        op in 0u8..3,
    ) {
        let f = fixture();
        let mut chars: Vec<char> = f.token.chars().collect();
        let i = at.index(chars.len());
        match op {
            0 => chars.insert(i, c),
            1 => { chars.remove(i); }
            _ => chars[i] = c,
        }
        let edited: String = chars.into_iter().collect();
        prop_assume!(edited != f.token);
        let r = validate_fixture(&edited);
        prop_assert!(r.is_err(), "accepted edit {:?}: {:?}", edited, r);
    }
}

#[test]
fn fixture_token_is_valid() {
    assert!(validate_fixture(&fixture().token).is_ok());
}

/// A token with exactly `claims`, signed as ES256 by a key outside any CA, and a bundle
/// that trusts that key.
fn own_key_claims_token(claims: &Value) -> (String, BundleSet) {
    let key = PrivateKey::generate().unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    header.typ = Some("JWT".into());
    let token = jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(key.pkcs8_der()),
    )
    .unwrap();
    let (x, y) = key.ec_p256_xy().unwrap();
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle
        .put_jwt_authority("k1".to_owned(), Jwk::ec_p256(x, y))
        .unwrap();
    (token, BundleSet::of(bundle))
}

#[tokio::test]
async fn minted_jwt_svids_carry_a_unique_jti() {
    let s = setup().await;
    let first = s.validate(&s.token, &["aud"]).unwrap();
    let jti = first.jti.clone().expect("a jti");
    assert!(!jti.is_empty());
    let (again, _) =
        s.ca.sign_jwt_svid(&planner(), &aud(&["aud"]), None)
            .unwrap();
    let second = s.validate(&again, &["aud"]).unwrap();
    assert_ne!(second.jti, Some(jti), "every JWT-SVID gets its own jti");
}

#[test]
fn time_claims_out_of_range_are_refused() {
    let now: i64 = 1_800_000_000;
    let at = UNIX_EPOCH + Duration::from_secs(now as u64);
    let claims = |extra: Value| {
        let mut c = serde_json::json!({
            "sub": planner().to_string(),
            "aud": "aud",
            "iat": now,
            "exp": now + 300,
            "jti": "j",
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let check = |extra: Value| {
        let (token, set) = own_key_claims_token(&claims(extra));
        jwt::validate(&token, &["aud"], &set, at)
    };
    assert!(check(serde_json::json!({})).is_ok());
    // exp = 1e300 used to mean "valid forever".
    assert_eq!(
        check(serde_json::json!({"exp": 1e300})).unwrap_err(),
        JwtSvidError::Claim("exp")
    );
    assert_eq!(
        check(serde_json::json!({"exp": now + 5 * 365 * 86_400})).unwrap_err(),
        JwtSvidError::Time(TimeError::TooFarAhead {
            max_secs: jwt::MAX_LIFETIME.as_secs()
        })
    );
    assert_eq!(
        check(serde_json::json!({"iat": now + 3600, "exp": now + 7200})).unwrap_err(),
        JwtSvidError::Time(TimeError::IssuedInFuture)
    );
    assert_eq!(
        check(serde_json::json!({"nbf": now + 120})).unwrap_err(),
        JwtSvidError::Time(TimeError::NotYetValid)
    );
    assert_eq!(
        check(serde_json::json!({"nbf": 1e300})).unwrap_err(),
        JwtSvidError::Time(TimeError::Invalid { claim: "nbf" })
    );
    assert_eq!(
        check(serde_json::json!({"jti": 5})).unwrap_err(),
        JwtSvidError::Claim("jti")
    );
    // Within the leeway, nbf and iat pass.
    assert!(check(serde_json::json!({"nbf": now + 30, "iat": now + 30})).is_ok());
}

#[tokio::test]
async fn a_configured_issuer_is_the_iss_claim_and_validation_accepts_both() {
    let clock = ManualClock::new(start_time());
    let store = SqliteStore::open_in_memory().await.unwrap();
    let mut config = CaConfig::new(TrustDomain::new("example.org").unwrap());
    config.jwt_issuer = Some("https://oidc.example.org".into());
    let ca = CertificateAuthority::load(
        config,
        Arc::new(clock.clone()),
        Arc::new(MemoryKeyManager::new()),
        Arc::new(store),
    )
    .await
    .unwrap();
    let (token, _) = ca.sign_jwt_svid(&planner(), &aud(&["aud"]), None).unwrap();
    let [_, payload, _] = parts(&token);
    assert_eq!(unb64(&payload)["iss"], "https://oidc.example.org");
    let svid = jwt::validate(&token, &["aud"], &bundles(&ca), clock.now()).unwrap();
    assert_eq!(svid.spiffe_id, planner());

    // Without an issuer there is no `iss` at all, and that validates too.
    let plain = setup().await;
    let [_, payload, _] = parts(&plain.token);
    assert!(unb64(&payload).get("iss").is_none());
    plain.validate(&plain.token, &["aud"]).unwrap();
}
