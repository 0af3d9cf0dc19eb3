//! OIDC ingress against a real OpenID Provider: npm `oidc-provider` 9, installed by the
//! test into `<workspace>/.interop/node` (git-ignored) and run by `tests/oidc/provider.js`.
//!
//! Without node/npm (or if the install fails) the tests are skipped with a message,
//! unless `WRIT_REQUIRE_ALL=1`, which makes them fail instead.
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use writ_identity::clock::{ManualClock, SharedClock};
use writ_sdk::oauth::TokenType;
use writ_txn_service::oidc::{DEFAULT_MAX_TOKEN_BYTES, IssuerConfig, OidcError, OidcValidator};

use writ_tests::oidc_provider;

use oidc_provider::Provider;

fn clock_now() -> (ManualClock, SharedClock) {
    let manual = ManualClock::new(SystemTime::now());
    let shared: SharedClock = Arc::new(manual.clone());
    (manual, shared)
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn segments(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

#[tokio::test]
async fn accepts_a_real_access_token() {
    let Some(op) = Provider::start() else { return };
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock).unwrap();
    let token = op.access_token("read write").await;

    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&segments(&token)[0]).unwrap()).unwrap();
    assert_eq!(header["typ"], "at+jwt");

    let subject = validator
        .validate(&token, TokenType::AccessToken)
        .await
        .unwrap();
    assert_eq!(subject.issuer, op.issuer);
    assert_eq!(subject.subject, op.client_id);
    assert_eq!(subject.scope, vec!["read", "write"]);
    assert_eq!(subject.audience, vec![op.resource.clone()]);
    assert!(subject.amr.is_empty());
    assert_eq!(subject.acr, None);
    assert_eq!(subject.claims["client_id"], op.client_id.as_str());
    assert!(
        subject.expires_at
            > SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
    );

    // The generic JWT type accepts it too; an access token never passes as an ID token.
    assert!(validator.validate(&token, TokenType::Jwt).await.is_ok());
    assert_eq!(
        validator.validate(&token, TokenType::IdToken).await,
        Err(OidcError::TokenType)
    );

    // Scope from a differently named claim.
    let mut config = op.config();
    config.scope_claim = "client_id".to_owned();
    config.subject_claim = "jti".to_owned();
    let (_, clock) = clock_now();
    let other = OidcValidator::new(vec![config], clock).unwrap();
    let subject = other
        .validate(&token, TokenType::AccessToken)
        .await
        .unwrap();
    assert_eq!(subject.scope, vec![op.client_id.clone()]);
    assert_eq!(subject.subject, subject.claims["jti"].as_str().unwrap());
}

#[tokio::test]
async fn refuses_wrong_audience() {
    let Some(op) = Provider::start() else { return };
    let mut config = op.config();
    config.audiences = vec!["https://someone-else.example".to_owned()];
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(vec![config], clock).unwrap();
    let token = op.access_token("read").await;
    assert_eq!(
        validator.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::Audience)
    );
}

#[tokio::test]
async fn refuses_expired_and_future_tokens_by_the_injected_clock() {
    let Some(op) = Provider::start() else { return };
    let (manual, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock).unwrap();
    let token = op.access_token("read").await;
    let subject = validator
        .validate(&token, TokenType::AccessToken)
        .await
        .unwrap();

    // Within the leeway after exp: still accepted.
    manual.set(UNIX_EPOCH + Duration::from_secs(subject.expires_at as u64 + 10));
    assert!(
        validator
            .validate(&token, TokenType::AccessToken)
            .await
            .is_ok()
    );
    // Past exp + leeway (30 s): refused.
    manual.set(UNIX_EPOCH + Duration::from_secs(subject.expires_at as u64 + 31));
    assert_eq!(
        validator.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::Expired)
    );
    // An hour before it was issued: iat in the future.
    manual.set(SystemTime::now() - Duration::from_secs(3600));
    assert_eq!(
        validator.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::NotYetValid)
    );
}

#[tokio::test]
async fn refuses_tampered_tokens() {
    let Some(op) = Provider::start() else { return };
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock).unwrap();
    let token = op.access_token("read").await;
    let parts = segments(&token);

    // A flipped signature byte.
    let mut sig = URL_SAFE_NO_PAD.decode(&parts[2]).unwrap();
    sig[5] ^= 0x01;
    let tampered = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(&sig));
    assert_eq!(
        validator.validate(&tampered, TokenType::AccessToken).await,
        Err(OidcError::Signature)
    );

    // A widened scope with the original signature.
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["scope"] = json!("read write admin");
    let tampered = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    assert_eq!(
        validator.validate(&tampered, TokenType::AccessToken).await,
        Err(OidcError::Signature)
    );
}

#[tokio::test]
async fn refuses_alg_none_and_hmac() {
    let Some(op) = Provider::start() else { return };
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock.clone()).unwrap();
    let token = op.access_token("read").await;
    let parts = segments(&token);

    for header in [
        json!({"alg": "none", "typ": "at+jwt"}),
        json!({"alg": "None"}),
        json!({"typ": "JWT"}),
    ] {
        for sig in ["", "AAAA", parts[2].as_str()] {
            let forged = format!("{}.{}.{sig}", b64(&header), parts[1]);
            assert_eq!(
                validator.validate(&forged, TokenType::AccessToken).await,
                Err(OidcError::Algorithm),
                "{header} / {sig:?}"
            );
        }
    }

    // HS256 keyed with the provider's public JWKS (key confusion).
    let jwks = reqwest::get(format!("{}/jwks", op.issuer))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let claims = op.claims(clock.unix_seconds());
    for secret in [jwks.as_bytes(), b"secret".as_slice()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("ec-1".to_owned());
        let forged =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap();
        assert_eq!(
            validator.validate(&forged, TokenType::AccessToken).await,
            Err(OidcError::Algorithm)
        );
    }

    // An allow-list without the provider's ES256 refuses its tokens.
    let mut config = op.config();
    config.algorithms = vec![Algorithm::RS256];
    let strict = OidcValidator::new(vec![config], clock.clone()).unwrap();
    assert_eq!(
        strict.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::Algorithm)
    );

    // HMAC cannot even be configured.
    let mut config = op.config();
    config.algorithms = vec![Algorithm::ES256, Algorithm::HS256];
    assert!(matches!(
        OidcValidator::new(vec![config], clock),
        Err(OidcError::Config { .. })
    ));
}

#[tokio::test]
async fn refuses_unknown_issuer() {
    let Some(op) = Provider::start() else { return };
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(
        vec![IssuerConfig::new(
            "https://idp.example.com",
            [op.resource.clone()],
        )],
        clock,
    )
    .unwrap();
    let token = op.access_token("read").await;
    assert_eq!(
        validator.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::UnknownIssuer)
    );
    // A trailing slash is another issuer: comparison is exact.
    let (_, clock) = clock_now();
    let slash = OidcValidator::new(
        vec![IssuerConfig::new(
            format!("{}/", op.issuer),
            [op.resource.clone()],
        )],
        clock,
    )
    .unwrap();
    assert_eq!(
        slash.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::UnknownIssuer)
    );
}

#[tokio::test]
async fn discovery_issuer_must_match_exactly() {
    let Some(op) = Provider::start() else { return };
    // `localhost` reaches the same provider, whose metadata names `127.0.0.1`.
    let alias = op.issuer.replace("127.0.0.1", "localhost");
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(
        vec![IssuerConfig::new(alias.clone(), [op.resource.clone()])],
        clock.clone(),
    )
    .unwrap();
    let mut claims = op.claims(clock.unix_seconds());
    claims["iss"] = json!(alias);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rogue".to_owned());
    header.typ = Some("at+jwt".to_owned());
    let key = EncodingKey::from_ec_pem(op.rogue_key_pem.as_bytes()).unwrap();
    let forged = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let err = validator
        .validate(&forged, TokenType::AccessToken)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OidcError::Discovery { reason, .. } if reason.contains("issuer")),
        "{err:?}"
    );
}

#[tokio::test]
async fn garbage_and_oversized_tokens_are_refused_without_panic() {
    let Some(op) = Provider::start() else { return };
    let (_, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock).unwrap();

    let too_big = "a".repeat(DEFAULT_MAX_TOKEN_BYTES + 1);
    assert_eq!(
        validator.validate(&too_big, TokenType::AccessToken).await,
        Err(OidcError::TooLarge {
            max: DEFAULT_MAX_TOKEN_BYTES
        })
    );
    let real = op.access_token("read").await;
    let padded = format!("{real}{}", "A".repeat(DEFAULT_MAX_TOKEN_BYTES));
    assert!(matches!(
        validator.validate(&padded, TokenType::AccessToken).await,
        Err(OidcError::TooLarge { .. })
    ));

    let mut garbage: Vec<String> = [
        "",
        ".",
        "..",
        "...",
        "a.b.c",
        "eyJ.eyJ.x",
        "e30.e30.e30",
        "W10.W10.AAAA",
        "bnVsbA.bnVsbA.AAAA",
        "a.b.c.d.e",
        "\u{0}\u{ffff}.é.💥",
        "Bearer x",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Real segments recombined wrongly.
    let parts = segments(&real);
    garbage.push(format!("{}.{}", parts[0], parts[1]));
    garbage.push(format!(
        "{}.{}.{}.{}",
        parts[0], parts[1], parts[2], parts[2]
    ));
    garbage.push(format!("{}.{}.{}", parts[1], parts[0], parts[2]));
    garbage.push(format!(
        "{}.{}.{}",
        b64(&json!({"alg": "ES256", "crit": ["exp"]})),
        parts[1],
        parts[2]
    ));
    // Pseudo-random strings over the JWT alphabet and beyond.
    let alphabet: Vec<char> = "ABCxyz019-_.=+/ {}\"eyJ\u{0}é".chars().collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..500 {
        let mut s = String::new();
        let len = (seed % 200) as usize;
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            s.push(alphabet[(seed % alphabet.len() as u64) as usize]);
        }
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        garbage.push(s);
    }
    for g in &garbage {
        for t in [TokenType::AccessToken, TokenType::IdToken, TokenType::Jwt] {
            assert!(
                validator.validate(g, t).await.is_err(),
                "garbage accepted: {g:?}"
            );
        }
    }
}

#[tokio::test]
async fn unknown_kid_refetches_at_a_bounded_rate() {
    let Some(op) = Provider::start() else { return };
    let (manual, clock) = clock_now();
    let validator = OidcValidator::new(vec![op.config()], clock.clone()).unwrap();
    let token = op.access_token("read").await;
    assert_eq!(op.jwks_hits().await, 0);

    validator
        .validate(&token, TokenType::AccessToken)
        .await
        .unwrap();
    assert_eq!(op.jwks_hits().await, 1, "first validation fetches the JWKS");
    validator
        .validate(&token, TokenType::AccessToken)
        .await
        .unwrap();
    assert_eq!(op.jwks_hits().await, 1, "the JWKS is cached");

    // An unknown kid: one refetch, then refused.
    let rogue = op.rogue_token(Some("rogue-1"), clock.unix_seconds());
    assert_eq!(
        validator.validate(&rogue, TokenType::AccessToken).await,
        Err(OidcError::UnknownKey)
    );
    assert_eq!(op.jwks_hits().await, 2, "unknown kid refetches once");

    // A flood of other unknown kids within the window: no refetch.
    for i in 0..20 {
        let rogue = op.rogue_token(Some(&format!("rogue-flood-{i}")), clock.unix_seconds());
        assert_eq!(
            validator.validate(&rogue, TokenType::AccessToken).await,
            Err(OidcError::UnknownKey)
        );
    }
    assert_eq!(op.jwks_hits().await, 2, "no refetch inside the rate window");

    // No kid while the JWKS holds two keys: refused without a refetch.
    let no_kid = op.rogue_token(None, clock.unix_seconds());
    assert_eq!(
        validator.validate(&no_kid, TokenType::AccessToken).await,
        Err(OidcError::UnknownKey)
    );
    assert_eq!(op.jwks_hits().await, 2);

    // A known kid with a foreign key: the signature fails, no refetch.
    let impostor = op.rogue_token(Some("ec-1"), clock.unix_seconds());
    assert_eq!(
        validator.validate(&impostor, TokenType::AccessToken).await,
        Err(OidcError::Signature)
    );
    assert_eq!(op.jwks_hits().await, 2);

    // After the window (30 s by the injected clock) one more refetch is allowed.
    manual.advance(Duration::from_secs(31));
    let rogue = op.rogue_token(Some("rogue-2"), clock.unix_seconds());
    assert_eq!(
        validator.validate(&rogue, TokenType::AccessToken).await,
        Err(OidcError::UnknownKey)
    );
    assert_eq!(op.jwks_hits().await, 3);

    // The cached JWKS expires by the injected clock (5 min TTL): the next validation
    // refetches (the token itself has expired by then).
    manual.advance(Duration::from_secs(301));
    assert_eq!(
        validator.validate(&token, TokenType::AccessToken).await,
        Err(OidcError::Expired)
    );
    assert_eq!(op.jwks_hits().await, 4, "stale JWKS is refetched");
}
