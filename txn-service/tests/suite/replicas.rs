//! Token service replicas as one logical TTS, on a real store (a SQLite file, and
//! PostgreSQL when installed): each replica signs with its own keys and publishes the
//! public ones through the identity store; a Txn-Token minted by one replica is replaced
//! by another; either JWKS verifies both replicas' tokens; a replica that stops leaves
//! its keys published until they expire; no private key reaches the database; a
//! malformed row is skipped.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tower::ServiceExt as _;
use writ_identity::bundle::Jwk;
use writ_identity::clock::{Clock, ManualClock};
use writ_identity::key_manager::PrivateKey;
use writ_identity::server::config::Datastore;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::pg_harness::TempPostgres;
use writ_identity::store::{SharedStore, TxnKeyRecord};
use writ_sdk::oauth::{GRANT_TYPE_TOKEN_EXCHANGE, TokenType};
use writ_sdk::txn_token::{TxnToken, TxnVerifier};
use writ_txn_service::exchange::{CallerId, ExchangeService, router};
use writ_txn_service::policy::Policy;
use writ_txn_service::replica::{Replica, ReplicaName};
use writ_txn_service::txn_token::{Minter, SigningKeys};

const NOW: i64 = 1_800_000_000;
/// Both replicas sit behind one issuer URL (the load balancer's).
const ISSUER: &str = "https://tts.example.org";
const TD: &str = "example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const WORKER: &str = "spiffe://example.org/agents/worker";
const ROTATE_EVERY: Duration = Duration::from_secs(3600);
/// The longest token lifetime plus leeway, as `writ txn run` computes it.
const RETAIN: Duration = Duration::from_secs(960);

const POLICY: &str = r#"
[[caller]]
prefix = "spiffe://example.org/agents/"
subject_token_types = ["txn_token"]
max_scope = ["orders.read", "orders.write"]
"#;

/// One replica: its service's router, and the parts a test drives directly.
struct Tts {
    app: Router,
    replica: Arc<Replica>,
}

impl Tts {
    /// Starts as `writ txn run` does: a store connection that may write but never
    /// migrates, the keys published, the other replicas' read.
    async fn start(
        name: &str,
        datastore: &Datastore,
        keys: SigningKeys,
        clock: &ManualClock,
    ) -> Self {
        let store = datastore.open_shared().await.unwrap();
        let keys = Arc::new(keys);
        let replica = Arc::new(Replica::new(
            ReplicaName::new(name).unwrap(),
            store,
            keys.clone(),
            Arc::new(clock.clone()),
        ));
        replica.publish().await.unwrap();
        replica.refresh().await.unwrap();
        let service = ExchangeService::new(
            TrustDomain::new(TD).unwrap(),
            ISSUER,
            Policy::from_toml(POLICY).unwrap(),
            keys,
            Arc::new(clock.clone()),
        )
        .with_replica(replica.clone());
        Self {
            app: router(Arc::new(service)),
            replica,
        }
    }

    async fn with_ring(name: &str, datastore: &Datastore, clock: &ManualClock) -> Self {
        let keys = SigningKeys::ephemeral(Arc::new(clock.clone()), ROTATE_EVERY, RETAIN).unwrap();
        Self::start(name, datastore, keys, clock).await
    }

    fn kid(&self) -> String {
        self.replica.keys().current_kid()
    }

    /// A Txn-Token this replica minted (as for the gateway, after an OIDC exchange).
    fn mint(&self, clock: &ManualClock) -> String {
        let now = clock.unix_seconds();
        let claims = TxnToken {
            iss: ISSUER.into(),
            iat: now,
            exp: now + 300,
            aud: TD.into(),
            txn: uuid::Uuid::new_v4().to_string(),
            sub: "alice".into(),
            scope: "orders.read orders.write".into(),
            req_wl: GATEWAY.into(),
            tctx: None,
            rctx: None,
            act: None,
        };
        self.replica.keys().mint(&claims).unwrap()
    }

    /// Replaces `token` for `caller`: the new token, or the error reply.
    async fn replace(&self, caller: &str, token: &str) -> Result<String, Value> {
        let body = [
            ("grant_type", GRANT_TYPE_TOKEN_EXCHANGE),
            ("requested_token_type", TokenType::TxnToken.as_urn()),
            ("audience", TD),
            ("subject_token", token),
            ("subject_token_type", TokenType::TxnToken.as_urn()),
            ("scope", "orders.read"),
        ]
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            )
        })
        .collect::<Vec<_>>()
        .join("&");
        let mut request = Request::post("/token")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(body))
            .unwrap();
        request
            .extensions_mut()
            .insert(CallerId(SpiffeId::new(caller).unwrap()));
        let (status, body) = self.get(request).await;
        if status == StatusCode::OK {
            Ok(body["access_token"].as_str().unwrap().to_owned())
        } else {
            Err(body)
        }
    }

    /// A verifier built from this replica's JWKS document alone.
    async fn jwks_verifier(&self) -> (TxnVerifier, Vec<String>) {
        let request = Request::get("/.well-known/jwks.json")
            .body(Body::empty())
            .unwrap();
        let (status, body) = self.get(request).await;
        assert_eq!(status, StatusCode::OK);
        let keys: BTreeMap<String, Jwk> = body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                let jwk: Jwk = serde_json::from_value(k.clone()).unwrap();
                assert_eq!(jwk.thumbprint().unwrap(), k["kid"].as_str().unwrap());
                (k["kid"].as_str().unwrap().to_owned(), jwk)
            })
            .collect();
        let kids = keys.keys().cloned().collect();
        (TxnVerifier::new(TrustDomain::new(TD).unwrap(), keys), kids)
    }

    async fn get(&self, request: Request<Body>) -> (StatusCode, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

/// The store the identity server owns: created and migrated by it.
async fn owner(datastore: &Datastore) -> SharedStore {
    datastore.open().await.unwrap()
}

/// Two replicas on one store: replacement across replicas both ways, at once after a
/// rotation; both JWKS verify both replicas' tokens; a stopped replica's key stays
/// published until it expires.
async fn two_replicas_act_as_one(datastore: Datastore) {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let _server = owner(&datastore).await;
    // B starts first, so it has not read A's key when A's first token reaches it.
    let b = Tts::with_ring("tts-b", &datastore, &clock).await;
    let a = Tts::with_ring("tts-a", &datastore, &clock).await;
    assert_ne!(a.kid(), b.kid());

    // A token from replica A replaced at replica B, and B's replaced at A.
    let from_a = a.mint(&clock);
    let at_b = b.replace(PLANNER, &from_a).await.unwrap();
    assert_eq!(kid_of(&at_b), b.kid(), "B signs with its own key");
    let at_a = a.replace(WORKER, &at_b).await.unwrap();
    assert_eq!(kid_of(&at_a), a.kid());

    // Either JWKS verifies both replicas' tokens.
    for replica in [&a, &b] {
        let (verifier, kids) = replica.jwks_verifier().await;
        assert!(
            kids.contains(&a.kid()) && kids.contains(&b.kid()),
            "{kids:?}"
        );
        for token in [&from_a, &at_b, &at_a] {
            let claims = verifier.verify_at(token, clock.now()).unwrap();
            assert_eq!(claims.sub, "alice");
        }
    }

    // A rotates; its first token under the new key is replaced by B at once (B reads
    // the keys again for the unknown key id; its periodic read is seconds away).
    let old_a = a.kid();
    clock.advance(Duration::from_secs(2));
    a.replica.keys().rotate().unwrap();
    let rotated = a.replace(PLANNER, &at_b).await.unwrap();
    assert_eq!(kid_of(&rotated), a.kid());
    assert_ne!(a.kid(), old_a);
    b.replace(WORKER, &rotated).await.unwrap();
    let (verifier, kids) = b.jwks_verifier().await;
    assert!(
        kids.contains(&old_a),
        "the retired key stays published: {kids:?}"
    );
    verifier.verify_at(&rotated, clock.now()).unwrap();
    verifier.verify_at(&from_a, clock.now()).unwrap();

    // A stops. Its keys stay published (and its tokens replaceable) until they expire.
    let a_kids = [old_a, a.kid()];
    drop(a);
    clock.advance(Duration::from_secs(60));
    b.replica.tick().await;
    let (_, kids) = b.jwks_verifier().await;
    assert!(a_kids.iter().all(|k| kids.contains(k)), "{kids:?}");
    b.replace(PLANNER, &rotated).await.unwrap();

    // Its retired key expires `RETAIN` after the rotation; the current one `RETAIN`
    // after its rotation was due.
    clock.advance(RETAIN);
    b.replica.tick().await;
    let (_, kids) = b.jwks_verifier().await;
    assert!(!kids.contains(&a_kids[0]), "{kids:?}");
    assert!(kids.contains(&a_kids[1]), "{kids:?}");
    clock.advance(ROTATE_EVERY);
    b.replica.tick().await;
    let (_, kids) = b.jwks_verifier().await;
    assert!(
        a_kids.iter().all(|k| !kids.contains(k)),
        "a dead replica's keys leave the JWKS once its tokens have expired: {kids:?}"
    );
    assert!(kids.contains(&b.kid()));
    let rows = owner(&datastore)
        .await
        .list_txn_keys(i64::MIN)
        .await
        .unwrap();
    assert!(
        rows.iter().all(|r| !a_kids.contains(&r.kid)),
        "expired rows are pruned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_replicas_act_as_one() {
    let dir = tempfile::tempdir().unwrap();
    two_replicas_act_as_one(Datastore::Sqlite(dir.path().join("datastore.sqlite3"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_replicas_act_as_one() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return; // skipped with a message (WRIT_REQUIRE_ALL=1 turns this into a failure)
    };
    two_replicas_act_as_one(Datastore::Postgres(pg.url())).await;
}

/// The private scalar `d` of a P-256 PKCS#8 key (inside its `ECPrivateKey`:
/// `INTEGER 1, OCTET STRING (32 bytes)`).
fn private_scalar(key: &PrivateKey) -> Vec<u8> {
    let der = key.pkcs8_der();
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .unwrap();
    der[at + 5..at + 37].to_vec()
}

/// Every spelling of the private key a careless publisher could leak.
fn private_spellings(key: &PrivateKey) -> Vec<Vec<u8>> {
    let d = private_scalar(key);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    let pem = key.to_pem();
    let pem_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    vec![
        d.clone(),
        URL_SAFE_NO_PAD.encode(&d).into_bytes(),
        hex.into_bytes(),
        key.pkcs8_der().to_vec(),
        pem_body.get(..40).unwrap().as_bytes().to_vec(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Only public keys reach the table: every row's JWK has exactly the public members,
/// and no spelling of `key` is in any column.
async fn no_private_key_in_the_store(datastore: &Datastore, key: &PrivateKey) {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let server = owner(datastore).await;
    let keys = SigningKeys::single(Minter::new(key.clone()).unwrap(), Arc::new(clock.clone()));
    let tts = Tts::start("tts-a", datastore, keys, &clock).await;
    let rows = server.list_txn_keys(i64::MIN).await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.kid, tts.kid());
    assert_eq!(row.replica, "tts-a");
    assert_eq!(row.published_at, NOW);
    let jwk: BTreeMap<String, Value> = serde_json::from_str(&row.jwk).unwrap();
    assert_eq!(
        jwk.keys().map(String::as_str).collect::<Vec<_>>(),
        ["crv", "kty", "x", "y"],
        "public members only: {jwk:?}"
    );
    let text = format!("{}{}{}", row.kid, row.jwk, row.replica);
    for spelling in private_spellings(key) {
        assert!(!contains(text.as_bytes(), &spelling));
    }
}

#[tokio::test]
async fn sqlite_no_private_key_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore.sqlite3");
    let key = PrivateKey::generate().unwrap();
    no_private_key_in_the_store(&Datastore::Sqlite(path.clone()), &key).await;
    // Nor anywhere in the database files.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(
        std::fs::read(PathBuf::from(format!("{}-wal", path.display()))).unwrap_or_default(),
    );
    assert!(contains(&bytes, b"tts-a"), "the scan sees the rows");
    for spelling in private_spellings(&key) {
        assert!(
            !contains(&bytes, &spelling),
            "a spelling of the private key is in the database files"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_no_private_key_in_the_store() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let key = PrivateKey::generate().unwrap();
    no_private_key_in_the_store(&Datastore::Postgres(pg.url()), &key).await;
}

/// A malformed row (bad JSON, a key that is not its kid's, a foreign key type) is
/// skipped with a warning: the replica keeps serving, with the good keys.
#[tokio::test]
async fn malformed_key_rows_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let datastore = Datastore::Sqlite(dir.path().join("datastore.sqlite3"));
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(NOW as u64));
    let server = owner(&datastore).await;
    let a = Tts::with_ring("tts-a", &datastore, &clock).await;
    let other = Minter::new(PrivateKey::generate().unwrap()).unwrap();
    let row = |kid: &str, jwk: String| TxnKeyRecord {
        kid: kid.into(),
        jwk,
        replica: "evil".into(),
        published_at: NOW,
        expires_at: NOW + 3600,
    };
    for bad in [
        row("not-json", "{{{".into()),
        row("wrong-kid", serde_json::to_string(other.jwk()).unwrap()),
        row(
            "rsa",
            json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"}).to_string(),
        ),
        row("\u{1b}[31m", "null".into()),
    ] {
        server.put_txn_key(&bad).await.unwrap();
    }
    let b = Tts::with_ring("tts-b", &datastore, &clock).await;
    assert_eq!(b.replica.refresh().await.unwrap(), 2, "A's key and B's own");
    let (_, kids) = b.jwks_verifier().await;
    assert_eq!(kids.len(), 2, "{kids:?}");
    assert!(kids.contains(&a.kid()) && kids.contains(&b.kid()));
    b.replace(PLANNER, &a.mint(&clock)).await.unwrap();
    // A token naming a made-up key id is refused, not a crash.
    let err = b
        .replace(
            PLANNER,
            &other
                .mint(&TxnToken {
                    iss: ISSUER.into(),
                    iat: NOW,
                    exp: NOW + 60,
                    aud: TD.into(),
                    txn: "t".into(),
                    sub: "mallory".into(),
                    scope: "orders.read".into(),
                    req_wl: GATEWAY.into(),
                    tctx: None,
                    rctx: None,
                    act: None,
                })
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(err["error"], "invalid_request", "{err}");
}
