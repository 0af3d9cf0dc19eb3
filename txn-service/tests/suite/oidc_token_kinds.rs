//! OIDC ingress tells token kinds apart and bounds their time claims (RFC 9068 sections
//! 2.1 and 4, RFC 8725 section 3.11), against an OpenID Provider on loopback whose
//! tokens the test signs with any header and claims:
//!
//! - an access token must be `typ: at+jwt` unless the issuer is configured otherwise
//!   (`access_token_typ`, `allow_untyped_access_tokens`);
//! - an ID token never passes as an access token, nor an access token as an ID token;
//! - `exp` too far ahead or not a sane NumericDate (`1e300`), `iat` or `nbf` in the
//!   future are refused, and the exchange answers `invalid_request` (RFC 8693 2.2.2).
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::get;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::clock::ManualClock;
use writ_identity::key_manager::PrivateKey;
use writ_identity::numeric_date::TimeError;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_txn_service::exchange::{CallerId, ExchangeService, SUBJECT_CACHE_MAX_AGE, router};
use writ_txn_service::oidc::{IssuerConfig, OidcError, OidcValidator, ValidatedSubject};
use writ_txn_service::policy::Policy;
use writ_txn_service::txn_token::{Minter, SigningKeys, jwk_with_kid};

const NOW: i64 = 1_800_000_000;
const AUDIENCE: &str = "https://tts.example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const ACCESS: &str = TokenType::AccessToken.as_urn();
const ID: &str = TokenType::IdToken.as_urn();

/// An OpenID Provider on 127.0.0.1 (plain HTTP is allowed for loopback issuers).
struct Idp {
    url: String,
    key: PrivateKey,
    minter: Minter,
    jwks: Arc<Mutex<Value>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    async fn start() -> Self {
        let key = PrivateKey::generate().unwrap();
        let minter = Minter::new(key.clone()).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", tcp.local_addr().unwrap());
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/jwks") });
        let jwks = Arc::new(Mutex::new(
            json!({ "keys": [jwk_with_kid(minter.jwk(), minter.kid())] }),
        ));
        let served = jwks.clone();
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || async move { Json(discovery) }),
            )
            .route(
                "/jwks",
                get(move || {
                    let keys = served.lock().unwrap().clone();
                    async move { Json(keys) }
                }),
            );
        let task = tokio::spawn(async move {
            axum::serve(tcp, app).await.unwrap();
        });
        Self {
            url,
            key,
            minter,
            jwks,
            task,
        }
    }

    /// The provider withdraws its key (as after a compromise): its JWKS is empty.
    fn withdraw_keys(&self) {
        *self.jwks.lock().unwrap() = json!({ "keys": [] });
    }

    fn config(&self) -> IssuerConfig {
        IssuerConfig::new(self.url.clone(), [AUDIENCE])
    }

    /// Access-token claims (RFC 9068 section 2.2), with `extra` merged in.
    fn claims(&self, extra: &Value) -> Value {
        let mut claims = json!({
            "iss": self.url,
            "sub": "alice",
            "aud": AUDIENCE,
            "iat": NOW,
            "exp": NOW + 300,
            "jti": "j1",
            "client_id": "gateway",
            "scope": "read",
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    /// Signs `claims` with header `typ` (none when `None`).
    fn sign(&self, typ: Option<&str>, claims: &Value) -> String {
        match typ {
            Some(typ) => self.minter.sign(typ, claims).unwrap(),
            None => {
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
                header.typ = None;
                header.kid = Some(self.minter.kid().to_owned());
                jsonwebtoken::encode(
                    &header,
                    claims,
                    &jsonwebtoken::EncodingKey::from_ec_der(self.key.pkcs8_der()),
                )
                .unwrap()
            }
        }
    }

    /// An ID token as an OpenID Provider issues it to a client (OpenID Connect Core
    /// section 2): `aud` the client (configured as an accepted audience here, the
    /// mistake that lets an ID token reach the audience check at all), `nonce`,
    /// `at_hash`, no `client_id`.
    fn id_token(&self) -> String {
        let claims = self.claims(&json!({
            "client_id": null,
            "jti": null,
            "nonce": "n-0S6_WzA2Mj",
            "at_hash": "77QmUPtjPfzWtF2AnpK9RQ",
            "azp": "gateway",
        }));
        self.sign(Some("JWT"), &claims)
    }
}

fn clock() -> ManualClock {
    ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64))
}

fn validator(config: IssuerConfig) -> OidcValidator {
    OidcValidator::new(vec![config], Arc::new(clock())).unwrap()
}

async fn validate(
    v: &OidcValidator,
    token: &str,
    kind: TokenType,
) -> Result<ValidatedSubject, OidcError> {
    v.validate(token, kind).await
}

#[tokio::test]
async fn access_tokens_must_be_at_jwt_unless_the_issuer_allows_more() {
    let idp = Idp::start().await;
    let strict = validator(idp.config());
    let mut config = idp.config();
    config.access_token_typ = vec!["at+jwt".into(), "JWT".into()];
    let with_jwt = validator(config.clone());
    config.allow_untyped_access_tokens = true;
    let with_untyped = validator(config);
    let claims = idp.claims(&json!({}));

    for typ in ["at+jwt", "application/at+jwt", "AT+JWT"] {
        let token = idp.sign(Some(typ), &claims);
        let ok = validate(&strict, &token, TokenType::AccessToken).await;
        assert_eq!(ok.unwrap().subject, "alice", "{typ}");
    }

    let typed_jwt = idp.sign(Some("JWT"), &claims);
    let untyped = idp.sign(None, &claims);
    for token in [&typed_jwt, &untyped] {
        assert_eq!(
            validate(&strict, token, TokenType::AccessToken)
                .await
                .unwrap_err(),
            OidcError::TokenType
        );
    }
    assert!(
        validate(&with_jwt, &typed_jwt, TokenType::AccessToken)
            .await
            .is_ok()
    );
    assert_eq!(
        validate(&with_jwt, &untyped, TokenType::AccessToken)
            .await
            .unwrap_err(),
        OidcError::TokenType
    );
    assert!(
        validate(&with_untyped, &untyped, TokenType::AccessToken)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_id_token_never_passes_as_an_access_token_nor_the_reverse() {
    let idp = Idp::start().await;
    let mut config = idp.config();
    // The most permissive access-token setting and `aud` = the client: only the claims
    // tell the ID token apart now.
    config.audiences = vec![AUDIENCE.into(), "gateway".into()];
    config.access_token_typ = vec!["at+jwt".into(), "JWT".into()];
    config.allow_untyped_access_tokens = true;
    let v = validator(config);

    let id_token = idp.id_token();
    assert!(validate(&v, &id_token, TokenType::IdToken).await.is_ok());
    assert_eq!(
        validate(&v, &id_token, TokenType::AccessToken)
            .await
            .unwrap_err(),
        OidcError::TokenKind {
            expected: "access token",
            claim: "nonce"
        }
    );
    // Without nonce, at_hash still gives it away.
    let no_nonce = idp.sign(
        None,
        &idp.claims(&json!({"client_id": null, "at_hash": "x"})),
    );
    assert_eq!(
        validate(&v, &no_nonce, TokenType::AccessToken)
            .await
            .unwrap_err(),
        OidcError::TokenKind {
            expected: "access token",
            claim: "at_hash"
        }
    );

    // An access token is not an ID token: by typ, and, untyped, by `client_id`.
    let access = idp.sign(Some("at+jwt"), &idp.claims(&json!({})));
    assert_eq!(
        validate(&v, &access, TokenType::IdToken).await.unwrap_err(),
        OidcError::TokenType
    );
    let untyped_access = idp.sign(None, &idp.claims(&json!({})));
    assert_eq!(
        validate(&v, &untyped_access, TokenType::IdToken)
            .await
            .unwrap_err(),
        OidcError::TokenKind {
            expected: "ID token",
            claim: "client_id"
        }
    );
}

#[tokio::test]
async fn time_claims_out_of_range_are_refused() {
    let idp = Idp::start().await;
    let v = validator(idp.config());
    let at = |extra: Value| idp.sign(Some("at+jwt"), &idp.claims(&extra));
    let refused = |token: String| {
        let v = &v;
        async move {
            validate(v, &token, TokenType::AccessToken)
                .await
                .unwrap_err()
        }
    };
    assert_eq!(
        refused(at(json!({"exp": 1e300}))).await,
        OidcError::MissingClaim {
            claim: "exp".into()
        }
    );
    assert_eq!(
        refused(at(json!({"exp": NOW + 5 * 365 * 86_400}))).await,
        OidcError::Time(TimeError::TooFarAhead { max_secs: 86_400 })
    );
    assert_eq!(
        refused(at(json!({"iat": NOW + 3600}))).await,
        OidcError::NotYetValid
    );
    assert_eq!(
        refused(at(json!({"nbf": NOW + 3600}))).await,
        OidcError::NotYetValid
    );
    assert_eq!(
        refused(at(json!({"nbf": 1e300}))).await,
        OidcError::MissingClaim {
            claim: "nbf".into()
        }
    );
    // Up to the configured lifetime (plus leeway) is fine; the setting moves the bound.
    assert!(
        validate(
            &v,
            &at(json!({"exp": NOW + 86_400})),
            TokenType::AccessToken
        )
        .await
        .is_ok()
    );
    let mut config = idp.config();
    config.max_token_lifetime = Duration::from_secs(600);
    let short = validator(config);
    assert_eq!(
        validate(
            &short,
            &at(json!({"exp": NOW + 3600})),
            TokenType::AccessToken
        )
        .await
        .unwrap_err(),
        OidcError::Time(TimeError::TooFarAhead { max_secs: 600 })
    );
}

/// Through the exchange endpoint, with the validation cache on: each refusal is
/// `invalid_request` (RFC 8693 section 2.2.2), and a cached validation does not outlive
/// the cache's own bound even for a token valid for a day.
#[tokio::test]
async fn the_exchange_refuses_them_as_invalid_request_and_bounds_its_cache() {
    let idp = Idp::start().await;
    let clock = clock();
    let oidc = OidcValidator::new(vec![idp.config()], Arc::new(clock.clone())).unwrap();
    let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let policy = Policy::from_toml(&format!(
        r#"
        [[caller]]
        id = "{GATEWAY}"
        subject_token_types = ["access_token", "id_token"]
        max_scope = ["read"]
        "#
    ))
    .unwrap();
    let service = ExchangeService::new(
        TrustDomain::new("example.org").unwrap(),
        "https://tts.example.org",
        policy,
        Arc::new(SigningKeys::single(minter, Arc::new(clock.clone()))),
        Arc::new(clock.clone()),
    )
    .with_oidc(Arc::new(oidc))
    .with_subject_cache();
    let app = router(Arc::new(service));
    let exchange = |token: String, kind: &'static str| {
        let app = app.clone();
        async move {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("grant_type", GRANT_TYPE_TOKEN_EXCHANGE)
                .append_pair("requested_token_type", TokenType::TxnToken.as_urn())
                .append_pair("audience", "example.org")
                .append_pair("subject_token", &token)
                .append_pair("subject_token_type", kind)
                .append_pair("scope", "read")
                .finish();
            let mut request = Request::post("/token")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap();
            request
                .extensions_mut()
                .insert(CallerId(SpiffeId::new(GATEWAY).unwrap()));
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        }
    };
    let at = |extra: Value| idp.sign(Some("at+jwt"), &idp.claims(&extra));
    for (token, kind, what) in [
        (
            idp.sign(Some("JWT"), &idp.claims(&json!({}))),
            ACCESS,
            "typ",
        ),
        (idp.id_token(), ACCESS, "typ"),
        (at(json!({})), ID, "typ"),
        (at(json!({"exp": 1e300})), ACCESS, "exp"),
        (
            at(json!({"exp": NOW + 5 * 365 * 86_400})),
            ACCESS,
            "expires more than",
        ),
        (at(json!({"iat": NOW + 3600})), ACCESS, "not valid yet"),
        (at(json!({"nbf": NOW + 3600})), ACCESS, "not valid yet"),
        // draft-11: a subject token whose scope is unknown is refused, never taken as
        // unconstrained.
        (at(json!({"scope": null})), ACCESS, "scope is unknown"),
        // draft-11 "Txn-Token Lifetime": never issued once the subject token expired,
        // even inside the validator's clock-skew leeway.
        (
            at(json!({"iat": NOW - 100, "exp": NOW - 1})),
            ACCESS,
            "expired",
        ),
    ] {
        let (status, body) = exchange(token, kind).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["error"], "invalid_request", "{what}: {body}");
        let description = body["error_description"].as_str().unwrap();
        assert!(description.contains(what), "{what}: {description}");
    }

    // A token good for a day is validated and cached; the provider then withdraws its
    // key. The cached validation answers only until SUBJECT_CACHE_MAX_AGE (by the
    // clock), not until the token's `exp` a day later.
    let day = at(json!({"exp": NOW + 86_000}));
    assert_eq!(exchange(day.clone(), ACCESS).await.0, StatusCode::OK);
    idp.withdraw_keys();
    assert_eq!(exchange(day.clone(), ACCESS).await.0, StatusCode::OK);
    clock.advance(SUBJECT_CACHE_MAX_AGE + Duration::from_secs(1));
    let (status, body) = exchange(day, ACCESS).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
}
