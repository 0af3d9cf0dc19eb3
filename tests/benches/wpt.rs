//! The cost of sender-constrained hops (`cargo bench -p writ-tests --bench wpt`), on one
//! core (a current-thread runtime): what verifying a WIT-SVID and a Workload Proof Token
//! adds to a request that carries a Txn-Token.
//!
//! - `WitSvid::proof`: making one WPT (the caller's cost per request);
//! - `WptVerifier::verify`: the WIT (validated once, then remembered by its SHA-256 until
//!   it expires), the WPT's signature with `cnf.jwk`, `aud`, `exp`, `wth`, `tth` and the
//!   replay cache;
//! - one axum router called in process (`tower::ServiceExt::oneshot`, no network) with
//!   `TxnLayer`: over mTLS (the peer set as `ConnectInfo<Peer>`, strict chaining), and
//!   without mTLS with a WIT and a fresh WPT per request (`TxnLayer::with_proof`), with
//!   the verified-token cache off and on. The WPTs are made before each timed round (a
//!   WPT verifies once), so only verification is timed.
//!
//! `WRIT_BENCH_OPS` (5,000) sets the operations per figure; each figure is the median of
//! 3 runs.
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step or verification should abort the run loudly"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use tower::ServiceExt as _;
use writ_identity::clock::{Clock, SystemClock};
use writ_sdk::listener::Peer;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::spiffe::bundle::{Bundle, BundleSet, Jwk};
use writ_sdk::spiffe::key::PrivateKey;
use writ_sdk::spiffe::svid::wit::{self, WitBundles, WitKey};
use writ_sdk::tls::Authorizer;
use writ_sdk::txn_token::{Jwks, JwksSource, TxnToken, TxnVerifier};
use writ_sdk::wpt::{WIT_HEADER, WPT_HEADER, WitSvid, WptVerifier};
use writ_sdk::{SpiffeId, TrustDomain};
use writ_txn_service::txn_token::SigningKeys;

const TD: &str = "example.org";
const CALLER: &str = "spiffe://example.org/gateway";
const BASE: &str = "https://orders.internal";
const ROUNDS: usize = 3;
const LIFETIME: Duration = Duration::from_secs(60);

fn count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn token(keys: &SigningKeys) -> String {
    let now = SystemClock.unix_seconds();
    keys.mint(&TxnToken {
        iss: "https://tts.example.org".into(),
        iat: now,
        exp: now + 300,
        aud: TD.into(),
        txn: "8d0c8f2e-2b1e-4e7a-9f51-3c2f0e6b7a10".into(),
        sub: "alice".into(),
        scope: "read write".into(),
        req_wl: CALLER.into(),
        tctx: None,
        rctx: None,
        act: None,
    })
    .unwrap()
}

fn verifier(keys: &SigningKeys, cache: bool) -> TxnVerifier {
    TxnVerifier::builder(
        TD.parse().unwrap(),
        JwksSource::Keys(Jwks::from_keys(keys.public_keys())),
    )
    .cache_capacity(if cache { 10_000 } else { 0 })
    .build()
}

/// The trust domain's WIT keys and a WIT-SVID for [`CALLER`].
fn wit_setup() -> (WitBundles, WitSvid) {
    let authority = PrivateKey::generate().unwrap();
    let (x, y) = authority.ec_p256_xy().unwrap();
    let mut bundle = Bundle::new(TD.parse().unwrap());
    bundle
        .put_jwt_authority("a1".into(), Jwk::ec_p256(x, y))
        .unwrap();
    let key = WitKey::generate().unwrap();
    let now = SystemClock.unix_seconds();
    let token = wit::sign(
        &authority,
        "a1",
        &SpiffeId::new(CALLER).unwrap(),
        key.public_jwk(),
        now,
        now + 3600,
    )
    .unwrap();
    (
        WitBundles::from_bundles(&BundleSet::of(bundle)),
        WitSvid::with_key(token, key).unwrap(),
    )
}

/// Median over [`ROUNDS`] runs of `ops` calls of `f(i)`, per operation; `prepare(ops)`
/// runs untimed before each round.
async fn per_op<P, T, F, Fut>(ops: usize, mut prepare: P, mut f: F) -> Duration
where
    P: FnMut(usize) -> Vec<T>,
    F: FnMut(T) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for item in prepare(ops / 10) {
        f(item).await;
    }
    let mut runs = Vec::new();
    for _ in 0..ROUNDS {
        let items = prepare(ops);
        let start = Instant::now();
        for item in items {
            f(item).await;
        }
        runs.push(start.elapsed() / u32::try_from(ops).unwrap());
    }
    runs.sort();
    runs[ROUNDS / 2]
}

fn app(layer: TxnLayer) -> Router {
    Router::new()
        .route("/orders", get(|v: Verified| async move { v.txn.sub }))
        .layer(layer)
}

async fn request(app: &Router, token: &str, proof: Option<(&str, String)>) {
    let mut request = Request::get("/orders").header("Txn-Token", token);
    if let Some((wit, wpt)) = &proof {
        request = request.header(WIT_HEADER, *wit).header(WPT_HEADER, wpt);
    }
    let mut request = request.body(Body::empty()).unwrap();
    if proof.is_none() {
        request.extensions_mut().insert(ConnectInfo(Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            id: Some(SpiffeId::new(CALLER).unwrap()),
            cert_sha256: None,
        }));
    }
    let response = app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn main() {
    let ops = count("WRIT_BENCH_OPS", 5_000).max(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = SigningKeys::ephemeral(
        Arc::new(SystemClock),
        Duration::from_secs(3600),
        Duration::from_secs(900),
    )
    .unwrap();
    let token = token(&keys);
    let (bundles, svid) = wit_setup();
    let target = format!("{BASE}/orders");
    let proofs = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                svid.proof_for(&target, Some(&token), SystemClock.now(), LIFETIME)
                    .unwrap()
            })
            .collect()
    };
    println!("wpt bench: one core, {ops} operations per figure, median of {ROUNDS} runs");
    rt.block_on(async {
        let mut rows = Vec::new();
        let make = per_op(
            ops,
            |n| vec![(); n],
            |()| {
                let wpt = svid
                    .proof(&target, Some(&token), SystemClock.now())
                    .unwrap();
                std::hint::black_box(wpt);
                async {}
            },
        )
        .await;
        rows.push(("`WitSvid::proof` (make one WPT)".to_owned(), make));
        let alone = WptVerifier::new(bundles.clone(), BASE).max_lifetime(LIFETIME);
        let verify = per_op(ops, proofs, |wpt| {
            let p = alone
                .verify(svid.token(), &wpt, "/orders", Some(&token))
                .unwrap();
            assert_eq!(p.caller.as_str(), CALLER);
            async {}
        })
        .await;
        rows.push(("`WptVerifier::verify` (WIT + WPT)".to_owned(), verify));

        let td = TrustDomain::new(TD).unwrap();
        let mut pairs = Vec::new();
        for cache in [false, true] {
            let label = if cache { "on (hit)" } else { "off" };
            let policy = || TxnPolicy::new(Authorizer::member_of(td.clone())).strict_chain();
            let mtls = app(TxnLayer::new(verifier(&keys, cache), policy()));
            let plain = per_op(ops, |n| vec![(); n], |()| request(&mtls, &token, None)).await;
            rows.push((format!("`TxnLayer` over mTLS, cache {label}"), plain));
            let proved = app(TxnLayer::new(verifier(&keys, cache), policy())
                .with_proof(WptVerifier::new(bundles.clone(), BASE).max_lifetime(LIFETIME)));
            let with = per_op(ops, proofs, |wpt| {
                let proved = proved.clone();
                let token = token.clone();
                let wit = svid.token().to_owned();
                async move { request(&proved, &token, Some((&wit, wpt))).await }
            })
            .await;
            rows.push((
                format!("`TxnLayer::with_proof`, WIT + WPT, cache {label}"),
                with,
            ));
            pairs.push((label, plain, with));
        }

        println!();
        println!("| measure (one core) | per second | per operation |");
        println!("|---|---:|---:|");
        for (name, t) in &rows {
            println!(
                "| {name} | {:.0} | {:.1} µs |",
                1.0 / t.as_secs_f64(),
                t.as_secs_f64() * 1e6
            );
        }
        println!();
        for (label, plain, with) in pairs {
            println!(
                "WIT + WPT verification added, cache {label}: {:.1} µs per request",
                (with.as_secs_f64() - plain.as_secs_f64()) * 1e6
            );
        }
    });
}
