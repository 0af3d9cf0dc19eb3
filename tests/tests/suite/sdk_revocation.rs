//! The kill switch in the SDK: `RevocationFeed` following a feed that keeps the token
//! service's contract (`writ_tests::revocation_feed`, a stand-in on plain HTTP), and the
//! refusals built on it: `TxnVerifier` (`revoked`), `TxnLayer` (401 `revoked`, with the
//! audit record's decision deny), and `Authorizer::not_revoked`. The feed client must
//! survive garbage (bad JSON, a huge body, a page over the limits, `seq` going
//! backwards, 500s) keeping the set it has.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use serde_json::Value;
use tower::ServiceExt as _;
use writ_identity::clock::{Clock, ManualClock};
use writ_identity::key_manager::PrivateKey;
use writ_sdk::audit::{Decision, MemorySink};
use writ_sdk::listener::Peer;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::revocation::{RevocationCheck, RevocationFeed};
use writ_sdk::spiffe::revocation::{FeedPage, Revocation, Target};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{Actor, Jwks, JwksSource, TxnToken, TxnTokenError, TxnVerifier};
use writ_sdk::{SpiffeId, TrustDomain};
use writ_tests::revocation_feed::{FeedServer, Mode};
use writ_txn_service::txn_token::{Minter, SigningKeys};

const TD: &str = "example.org";
const GATEWAY: &str = "spiffe://example.org/gateway";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const CHILD: &str = "spiffe://example.org/agents/planner/sub/L1";
const START: u64 = 1_800_000_000;
/// Long enough for any step of a loaded machine; the tests never assert a duration.
const PATIENCE: Duration = Duration::from_secs(30);

struct Signer {
    keys: SigningKeys,
    clock: ManualClock,
}

impl Signer {
    fn new() -> Self {
        let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(START));
        let minter = Minter::new(PrivateKey::generate().unwrap()).unwrap();
        let keys = SigningKeys::single(minter, Arc::new(clock.clone()));
        Self { keys, clock }
    }

    fn now(&self) -> i64 {
        self.clock.unix_seconds()
    }

    fn verifier(&self, feed: &RevocationFeed) -> TxnVerifier {
        let jwks = Jwks::parse(&serde_json::to_vec(&self.keys.jwks()).unwrap()).unwrap();
        TxnVerifier::builder(TD.parse().unwrap(), JwksSource::Keys(jwks))
            .clock(Arc::new(self.clock.clone()))
            .revocations(feed.clone())
            .build()
    }

    fn mint(&self, claims: &TxnToken) -> String {
        self.keys.mint(claims).unwrap()
    }

    fn claims(&self, txn: &str, sub: &str) -> TxnToken {
        let now = self.now();
        TxnToken {
            iss: "https://tts.example.org".into(),
            iat: now,
            exp: now + 300,
            aud: TD.into(),
            txn: txn.into(),
            sub: sub.into(),
            scope: "read".into(),
            req_wl: GATEWAY.into(),
            tctx: None,
            rctx: None,
            act: None,
        }
    }
}

fn page(seq: u64, entries: Vec<Revocation>) -> FeedPage {
    FeedPage {
        seq,
        revocations: entries,
        more: false,
    }
}

fn entry(seq: u64, target: Target, lapses_at: i64) -> Revocation {
    Revocation {
        seq,
        target,
        revoked_at: START as i64,
        lapses_at,
        reason: Some("incident 7".into()),
    }
}

fn workload(id: &str, subtree: bool) -> Target {
    Target::Workload {
        spiffe_id: id.into(),
        subtree,
    }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

#[tokio::test]
async fn the_verifier_refuses_revoked_txn_sub_workload_and_lease() {
    let signer = Signer::new();
    let feed = RevocationFeed::manual(Arc::new(signer.clock.clone()));
    let verifier = signer.verifier(&feed);
    let lapses = signer.now() + 600;

    let txn = signer.mint(&signer.claims("t-1", "alice"));
    let user = signer.mint(&signer.claims("t-2", "bob"));
    let via_planner = signer.mint(&TxnToken {
        act: Some(Actor::new(PLANNER)),
        ..signer.claims("t-3", "carol")
    });
    let via_child = signer.mint(&TxnToken {
        act: Some(Actor::new(CHILD).acting_for(Actor::new(PLANNER))),
        ..signer.claims("t-4", "dave")
    });
    let clean = signer.mint(&signer.claims("t-5", "erin"));
    // Verified (and cached) before anything is revoked.
    for token in [&txn, &user, &via_planner, &via_child, &clean] {
        verifier.verify(token).await.unwrap();
    }

    feed.apply(page(
        1,
        vec![entry(1, Target::Txn { txn: "t-1".into() }, lapses)],
    ))
    .unwrap();
    let refused = verifier.verify(&txn).await.unwrap_err();
    assert!(
        matches!(&refused, TxnTokenError::Revoked(why) if why.contains("transaction t-1")),
        "{refused:?}"
    );
    // The cached path is checked too, and the synchronous one.
    assert!(matches!(
        verifier.verify_at(&txn, signer.clock.now()),
        Err(TxnTokenError::Revoked(_))
    ));
    verifier.verify(&user).await.unwrap();

    feed.apply(page(
        2,
        vec![entry(2, Target::Sub { sub: "bob".into() }, lapses)],
    ))
    .unwrap();
    assert!(matches!(
        verifier.verify(&user).await,
        Err(TxnTokenError::Revoked(why)) if why.contains("user bob")
    ));

    // A lease covers its child only: the token the child acts in, not the planner's own.
    feed.apply(page(
        3,
        vec![entry(
            3,
            Target::Lease {
                lease: "L1".into(),
                spiffe_id: CHILD.into(),
            },
            lapses,
        )],
    ))
    .unwrap();
    assert!(matches!(
        verifier.verify(&via_child).await,
        Err(TxnTokenError::Revoked(why)) if why.contains("lease L1")
    ));
    verifier.verify(&via_planner).await.unwrap();

    // The planner's subtree: any token it or its sub-agents act in.
    feed.apply(page(4, vec![entry(4, workload(PLANNER, true), lapses)]))
        .unwrap();
    assert!(matches!(
        verifier.verify(&via_planner).await,
        Err(TxnTokenError::Revoked(_))
    ));
    // `req_wl` is covered as well.
    feed.apply(page(5, vec![entry(5, workload(GATEWAY, false), lapses)]))
        .unwrap();
    assert!(matches!(
        verifier.verify(&clean).await,
        Err(TxnTokenError::Revoked(why)) if why.contains(GATEWAY)
    ));

    // Entries lapse by the clock: a fresh token of the revoked transaction verifies
    // again once the entry has lapsed (the operator's entry covered only what existed).
    signer.clock.advance(Duration::from_secs(601));
    let later = signer.mint(&signer.claims("t-1", "alice"));
    verifier.verify(&later).await.unwrap();
}

fn peer(id: &str) -> Peer {
    Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        id: Some(SpiffeId::new(id).unwrap()),
        cert_sha256: Some([0; 32]),
    }
}

async fn call(app: &Router, caller: &str, token: &str) -> (StatusCode, Value) {
    let mut request = Request::get("/")
        .header("Txn-Token", token)
        .body(Body::empty())
        .unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer(caller)));
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_middleware_answers_401_revoked_and_audits_the_denial() {
    let signer = Signer::new();
    let feed = RevocationFeed::manual(Arc::new(signer.clock.clone()));
    let sink = MemorySink::new();
    let td = TrustDomain::new(TD).unwrap();
    let app = Router::new()
        .route("/", get(|v: Verified| async move { v.txn.txn }))
        .layer(
            TxnLayer::new(
                signer.verifier(&feed),
                TxnPolicy::new(Authorizer::member_of(td)),
            )
            .with_audit(id("spiffe://example.org/tool"), sink.clone()),
        );
    let token = signer.mint(&signer.claims("t-9", "alice"));
    assert_eq!(call(&app, GATEWAY, &token).await.0, StatusCode::OK);

    let lapses = signer.now() + 600;
    feed.apply(page(
        1,
        vec![entry(1, Target::Txn { txn: "t-9".into() }, lapses)],
    ))
    .unwrap();
    let (status, body) = call(&app, GATEWAY, &token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "revoked");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("revocation 1 covers transaction t-9"),
        "{body}"
    );
    let last = sink.records().pop().unwrap();
    assert_eq!(last.decision, Decision::Deny);
    assert_eq!(last.error.as_deref(), Some("revoked"));
    // The record names the transaction that was refused.
    assert_eq!(last.txn.as_deref(), Some("t-9"));

    // A revoked caller is refused whatever token it carries.
    let other = signer.mint(&signer.claims("t-10", "alice"));
    assert_eq!(call(&app, PLANNER, &other).await.0, StatusCode::OK);
    feed.apply(page(2, vec![entry(2, workload(PLANNER, false), lapses)]))
        .unwrap();
    let (status, body) = call(&app, PLANNER, &other).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("revoked"))
    );
    assert_eq!(call(&app, GATEWAY, &other).await.0, StatusCode::OK);
}

#[tokio::test]
async fn the_authorizer_refuses_a_revoked_peer() {
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(START));
    let feed = RevocationFeed::manual(Arc::new(clock.clone()));
    let td = TrustDomain::new(TD).unwrap();
    let authorizer = Authorizer::not_revoked(feed.clone(), Authorizer::member_of(td));
    assert!(authorizer.allows(&id(PLANNER)));
    assert!(authorizer.allows(&id(CHILD)));
    feed.apply(page(
        1,
        vec![entry(1, workload(PLANNER, true), START as i64 + 60)],
    ))
    .unwrap();
    assert!(!authorizer.allows(&id(PLANNER)));
    assert!(!authorizer.allows(&id(CHILD)), "the subtree is covered");
    assert!(authorizer.allows(&id(GATEWAY)));
    assert!(
        !authorizer.allows(&id("spiffe://other.org/agents/planner")),
        "the inner authorizer still decides"
    );
    clock.advance(Duration::from_secs(60));
    assert!(authorizer.allows(&id(PLANNER)), "lapsed");
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_feed_follows_the_service_and_survives_garbage() {
    let server = FeedServer::start().await;
    let clock = ManualClock::new(UNIX_EPOCH + Duration::from_secs(START));
    let feed = RevocationFeed::builder(reqwest::Client::new(), &server.base_url)
        .clock(Arc::new(clock.clone()))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build()
        .unwrap();
    tokio::time::timeout(PATIENCE, feed.ready()).await.unwrap();
    assert_eq!(feed.seq(), 0);

    // A revocation reaches a held request at once.
    let lapses = START as i64 + 600;
    let seq = server.revoke(Target::Txn { txn: "t-1".into() }, START as i64, lapses);
    tokio::time::timeout(PATIENCE, feed.wait_for(seq))
        .await
        .unwrap();
    assert!(matches!(
        feed.check_token(&TxnToken {
            iss: String::new(),
            iat: 0,
            exp: 0,
            aud: TD.into(),
            txn: "t-1".into(),
            sub: "x".into(),
            scope: String::new(),
            req_wl: GATEWAY.into(),
            tctx: None,
            rctx: None,
            act: None,
        }),
        RevocationCheck::Revoked(_)
    ));

    // Garbage of every kind: counted as errors, the set kept, the feed alive.
    for mode in [
        Mode::BadJson,
        Mode::Huge,
        Mode::TooMany,
        Mode::Backwards,
        Mode::Error,
    ] {
        let errors = feed.stats().errors;
        server.set_mode(mode);
        eventually(&format!("{mode:?} counted as an error"), || {
            feed.stats().errors > errors
        })
        .await;
        let stats = feed.stats();
        assert_eq!(
            (stats.seq, stats.entries),
            (1, 1),
            "{mode:?} changed the set"
        );
    }
    server.set_mode(Mode::Honest);
    let seq = server.revoke(workload(PLANNER, true), START as i64, lapses);
    tokio::time::timeout(PATIENCE, feed.wait_for(seq))
        .await
        .unwrap();
    assert!(matches!(
        feed.check_workload(CHILD),
        RevocationCheck::Revoked(r) if r.seq == 2
    ));

    // Many entries come in pages (`more`), and all are applied.
    for i in 0..1500 {
        server.revoke(
            Target::Sub {
                sub: format!("user-{i}"),
            },
            START as i64,
            lapses,
        );
    }
    tokio::time::timeout(PATIENCE, feed.wait_for(1502))
        .await
        .unwrap();
    assert_eq!(feed.stats().entries, 1502);

    // Lapsed entries are pruned by the clock (at the next answer).
    clock.advance(Duration::from_secs(601));
    let seq = server.revoke(
        Target::Txn { txn: "t-2".into() },
        START as i64 + 601,
        lapses + 601,
    );
    tokio::time::timeout(PATIENCE, feed.wait_for(seq))
        .await
        .unwrap();
    assert_eq!(feed.stats().entries, 1);
}

#[tokio::test]
async fn a_stale_feed_fails_closed_only_when_asked() {
    let signer = Signer::new();
    // Nothing listens on this port: the feed never hears from a service.
    let closed = RevocationFeed::builder(reqwest::Client::new(), "http://127.0.0.1:9")
        .clock(Arc::new(signer.clock.clone()))
        .max_staleness(Duration::from_secs(60))
        .build()
        .unwrap();
    let verifier = signer.verifier(&closed);
    let token = signer.mint(&signer.claims("t-1", "alice"));
    verifier.verify(&token).await.unwrap();
    signer.clock.advance(Duration::from_secs(61));
    let token = signer.mint(&signer.claims("t-1", "alice"));
    assert_eq!(
        verifier.verify(&token).await,
        Err(TxnTokenError::RevocationsStale)
    );
    assert_eq!(
        closed.check_workload(PLANNER),
        RevocationCheck::Stale,
        "the authorizer refuses too"
    );
    let open = RevocationFeed::builder(reqwest::Client::new(), "http://127.0.0.1:9")
        .clock(Arc::new(signer.clock.clone()))
        .build()
        .unwrap();
    signer.clock.advance(Duration::from_secs(3600));
    assert_eq!(open.check_workload(PLANNER), RevocationCheck::Clear);
}
