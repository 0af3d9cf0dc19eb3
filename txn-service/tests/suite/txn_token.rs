//! Minting and verifying Txn-Tokens: the TTS's minter and the SDK's verifier agree, and
//! josekit (OpenSSL) verifies minted tokens independently, ES256 and EdDSA alike; an
//! EdDSA key ring rotates and keeps its old keys published.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use writ_identity::clock::ManualClock;
use writ_identity::key_manager::PrivateKey;
use writ_sdk::txn_token::{Actor, TxnToken, TxnTokenError, TxnVerifier};
use writ_txn_service::txn_token::{Minter, SigningAlgorithm, SigningKeys, jwk_with_kid};

fn claims(now: i64) -> TxnToken {
    TxnToken {
        iss: "https://127.0.0.1:8443".into(),
        iat: now,
        exp: now + 300,
        aud: "example.org".into(),
        txn: "0b9f2a8e-2c1d-4c43-9a36-6a3f7f0d2b11".into(),
        sub: "alice".into(),
        scope: "orders.read orders.write".into(),
        req_wl: "spiffe://example.org/gateway".into(),
        tctx: Some(BTreeMap::from([("order".into(), serde_json::json!(42))])),
        rctx: Some(BTreeMap::from([(
            "req_ip".into(),
            serde_json::json!("127.0.0.1"),
        )])),
        act: Some(
            Actor::new("spiffe://example.org/agents/sub")
                .acting_for(Actor::new("spiffe://example.org/agents/planner")),
        ),
    }
}

fn at(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs as u64)
}

fn setup() -> (Minter, TxnVerifier) {
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let keys = BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]);
    (
        minter,
        TxnVerifier::new("example.org".parse().unwrap(), keys),
    )
}

const NOW: i64 = 1_800_000_000;

#[test]
fn minted_tokens_verify_and_round_trip() {
    let (minter, verifier) = setup();
    let token = minter.mint(&claims(NOW)).unwrap();
    let verified = verifier.verify_at(&token, at(NOW + 10)).unwrap();
    assert_eq!(verified, claims(NOW));
    assert_eq!(
        verified.chain(),
        vec![
            "spiffe://example.org/agents/sub",
            "spiffe://example.org/agents/planner"
        ]
    );
    assert!(verified.has_scope("orders.write") && !verified.has_scope("orders"));

    // josekit, on OpenSSL, agrees: typ, kid and signature.
    let mut jwk = serde_json::to_value(minter.jwk())
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    jwk.insert("kid".into(), minter.kid().into());
    let jwk = josekit::jwk::Jwk::from_map(jwk).unwrap();
    let verifier = josekit::jws::ES256.verifier_from_jwk(&jwk).unwrap();
    let (payload, header) = josekit::jwt::decode_with_verifier(&token, &verifier).unwrap();
    assert_eq!(header.token_type(), Some("txntoken+jwt"));
    assert_eq!(header.key_id(), Some(minter.kid()));
    assert_eq!(payload.subject(), Some("alice"));
    assert_eq!(
        payload.claim("req_wl"),
        Some(&serde_json::json!("spiffe://example.org/gateway"))
    );
}

#[test]
fn verifier_refuses_what_it_must() {
    let (minter, verifier) = setup();
    let token = minter.mint(&claims(NOW)).unwrap();
    assert_eq!(
        verifier.verify_at(&token, at(NOW + 300 + 31)),
        Err(TxnTokenError::Expired)
    );
    assert_eq!(
        verifier.verify_at(&token, at(NOW - 60)),
        Err(TxnTokenError::IssuedInFuture)
    );

    let other_td = TxnVerifier::new(
        "other.org".parse().unwrap(),
        BTreeMap::from([(minter.kid().to_owned(), minter.jwk().clone())]),
    );
    assert_eq!(
        other_td.verify_at(&token, at(NOW)),
        Err(TxnTokenError::Audience)
    );

    let (other_minter, _) = setup();
    let stranger = other_minter.mint(&claims(NOW)).unwrap();
    assert_eq!(
        verifier.verify_at(&stranger, at(NOW)),
        Err(TxnTokenError::UnknownKey)
    );

    // A signature that does not match the claims.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let forged = other_minter
        .mint(&TxnToken {
            sub: "mallory".into(),
            ..claims(NOW)
        })
        .unwrap();
    parts[1] = forged.split('.').nth(1).unwrap().to_owned();
    assert_eq!(
        verifier.verify_at(&parts.join("."), at(NOW)),
        Err(TxnTokenError::Signature)
    );

    // A JWT-SVID-shaped token (typ JWT) signed by the right key is not a Txn-Token.
    let header = base64url(br#"{"alg":"ES256","typ":"JWT","kid":"x"}"#);
    let body = token.split('.').nth(1).unwrap();
    let sig = token.split('.').nth(2).unwrap();
    assert_eq!(
        verifier.verify_at(&format!("{header}.{body}.{sig}"), at(NOW)),
        Err(TxnTokenError::Type)
    );
    let none = base64url(br#"{"alg":"none","typ":"txntoken+jwt"}"#);
    assert!(
        verifier
            .verify_at(&format!("{none}.{body}."), at(NOW))
            .is_err()
    );
    let hs = base64url(br#"{"alg":"HS256","typ":"txntoken+jwt","kid":"k"}"#);
    assert!(matches!(
        verifier.verify_at(&format!("{hs}.{body}.{sig}"), at(NOW)),
        Err(TxnTokenError::Algorithm(_))
    ));
    for garbage in ["", "a.b.c", "....", &"x".repeat(40_000)] {
        assert!(
            verifier.verify_at(garbage, at(NOW)).is_err(),
            "{garbage:.20}"
        );
    }

    // Missing required claims.
    let empty_sub = minter
        .mint(&TxnToken {
            sub: String::new(),
            ..claims(NOW)
        })
        .unwrap();
    assert!(matches!(
        verifier.verify_at(&empty_sub, at(NOW)),
        Err(TxnTokenError::Claims(_))
    ));
}

/// draft-11 "JWT Body Claims" and "Txn-Token Validation", at the recipient: a token
/// missing any REQUIRED claim (`iat`, `aud`, `exp`, `txn`, `sub`, `scope`, `req_wl`),
/// with an empty `scope`, or with `req_wl` other than a single string is refused; `iss`
/// (OPTIONAL in the draft) is one Writ always sets and checks.
#[test]
fn verifier_requires_every_draft_11_claim_and_a_single_string_req_wl() {
    let (minter, verifier) = setup();
    let raw = serde_json::to_value(claims(NOW)).unwrap();
    let signed = |change: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = raw.as_object().unwrap().clone();
        change(&mut c);
        minter.sign(writ_sdk::txn_token::TXN_TOKEN_TYP, &c).unwrap()
    };
    assert!(verifier.verify_at(&signed(&|_| {}), at(NOW)).is_ok());
    for claim in ["iat", "aud", "exp", "txn", "sub", "scope", "req_wl"] {
        let token = signed(&|c| {
            c.remove(claim);
        });
        assert!(
            matches!(
                verifier.verify_at(&token, at(NOW)),
                Err(TxnTokenError::Claims(_) | TxnTokenError::Time(_))
            ),
            "without {claim}: {:?}",
            verifier.verify_at(&token, at(NOW))
        );
    }
    for (claim, value) in [
        (
            "req_wl",
            serde_json::json!(["spiffe://example.org/a", "spiffe://example.org/b"]),
        ),
        ("scope", serde_json::json!("")),
        ("scope", serde_json::json!(["orders.read"])),
    ] {
        let token = signed(&|c| {
            c.insert(claim.to_owned(), value.clone());
        });
        assert!(
            verifier.verify_at(&token, at(NOW)).is_err(),
            "{claim} = {value}"
        );
    }
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn eddsa_tokens_verify_with_the_sdk_and_josekit() {
    let minter = Minter::generate(SigningAlgorithm::EdDsa).unwrap();
    assert_eq!(minter.algorithm(), SigningAlgorithm::EdDsa);
    let token = minter.mint(&claims(NOW)).unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').next().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["typ"], "txntoken+jwt");
    assert_eq!(header["kid"], minter.kid());

    // The SDK verifier takes the OKP key of the JWKS.
    let entry = jwk_with_kid(minter.jwk(), minter.kid());
    assert_eq!(entry["kty"], "OKP");
    assert_eq!(entry["crv"], "Ed25519");
    assert_eq!(entry["alg"], "EdDSA");
    assert_eq!(entry["use"], "sig");
    assert!(entry.get("y").is_none());
    let jwks = writ_sdk::txn_token::Jwks::parse(
        serde_json::to_string(&serde_json::json!({ "keys": [entry.clone()] }))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let verifier = TxnVerifier::new("example.org".parse().unwrap(), jwks.keys().clone());
    assert_eq!(
        verifier.verify_at(&token, at(NOW + 10)).unwrap(),
        claims(NOW)
    );

    // josekit, on OpenSSL, agrees.
    let jwk = josekit::jwk::Jwk::from_map(entry.as_object().unwrap().clone()).unwrap();
    let josekit_verifier = josekit::jws::EdDSA.verifier_from_jwk(&jwk).unwrap();
    let (payload, header) = josekit::jwt::decode_with_verifier(&token, &josekit_verifier).unwrap();
    assert_eq!(header.token_type(), Some("txntoken+jwt"));
    assert_eq!(header.key_id(), Some(minter.kid()));
    assert_eq!(payload.subject(), Some("alice"));

    // A flipped signature bit is refused by both.
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(verifier.verify_at(&tampered, at(NOW + 10)).is_err());
    assert!(josekit::jwt::decode_with_verifier(&tampered, &josekit_verifier).is_err());
}

#[test]
fn an_eddsa_ring_rotates_and_keeps_its_old_keys_published() {
    let clock = ManualClock::new(at(NOW));
    let keys = SigningKeys::ephemeral_with(
        SigningAlgorithm::EdDsa,
        Arc::new(clock.clone()),
        Duration::from_secs(3600),
        Duration::from_secs(900),
    )
    .unwrap();
    assert_eq!(keys.algorithm(), SigningAlgorithm::EdDsa);
    let old = keys.mint(&claims(NOW)).unwrap();
    let first = keys.current_kid();
    clock.advance(Duration::from_secs(3601));
    keys.rotate_if_due().unwrap();
    assert_ne!(keys.current_kid(), first);
    let new = keys.mint(&claims(NOW + 3601)).unwrap();
    assert_eq!(keys.signatures(), 2);

    // Both keys are published as OKP keys, and both tokens verify against them.
    let published = keys.public_keys();
    assert_eq!(published.len(), 2);
    assert!(published.values().all(|k| k.kty == "OKP"));
    let jwks = keys.jwks();
    assert!(
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["alg"] == "EdDSA")
    );
    let verifier = TxnVerifier::new("example.org".parse().unwrap(), published);
    verifier.verify_at(&old, at(NOW + 10)).unwrap();
    verifier.verify_at(&new, at(NOW + 3611)).unwrap();

    // Once the old key's tokens have all expired it is dropped.
    clock.advance(Duration::from_secs(901));
    keys.rotate_if_due().unwrap();
    assert_eq!(keys.public_keys().len(), 1);
}

#[test]
fn a_ring_file_changes_algorithm_by_rotating() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("signing-keys.json");
    let clock = ManualClock::new(at(NOW));
    let ring = |algorithm| {
        SigningKeys::load_or_create_with(
            path.clone(),
            algorithm,
            Arc::new(clock.clone()),
            Duration::from_secs(3600),
            Duration::from_secs(900),
        )
        .unwrap()
    };
    let es256 = ring(SigningAlgorithm::Es256);
    let es_kid = es256.current_kid();
    let es_token = es256.mint(&claims(NOW)).unwrap();
    drop(es256);

    // Restarted with EdDSA: a new Ed25519 key signs, the ES256 key stays published.
    let eddsa = ring(SigningAlgorithm::EdDsa);
    assert_ne!(eddsa.current_kid(), es_kid);
    let published = eddsa.public_keys();
    assert_eq!(published.len(), 2);
    assert_eq!(published[&es_kid].kty, "EC");
    assert_eq!(published[&eddsa.current_kid()].kty, "OKP");
    let ed_token = eddsa.mint(&claims(NOW)).unwrap();
    let verifier = TxnVerifier::new("example.org".parse().unwrap(), published);
    verifier.verify_at(&es_token, at(NOW + 10)).unwrap();
    verifier.verify_at(&ed_token, at(NOW + 10)).unwrap();
    let ed_kid = eddsa.current_kid();
    drop(eddsa);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Restarted again with EdDSA: the same keys, no rotation.
    let again = ring(SigningAlgorithm::EdDsa);
    assert_eq!(again.current_kid(), ed_kid);
    assert_eq!(again.public_keys().len(), 2);
}
