//! Many identity servers on one PostgreSQL database (issue 16): each owns its CA slots,
//! all publish the union, none deletes another's, and a change reaches the others
//! through the store's change events.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use writ_identity::bundle::{Bundle, BundleSet};
use writ_identity::ca::{CaConfig, CertificateAuthority};
use writ_identity::clock::{Clock, ManualClock};
use writ_identity::key_manager::{KeyManager, MemoryKeyManager};
use writ_identity::server::ServerState;
use writ_identity::server::config::ServerConfig;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::Store;
use writ_identity::store::pg_harness::TempPostgres;
use writ_identity::store::postgres::PostgresStore;
use writ_identity::svid::{jwt, x509};

const HOUR: Duration = Duration::from_secs(3600);

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn id(path: &str) -> SpiffeId {
    td().spiffe_id(path).unwrap()
}

fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

async fn ca(clock: &ManualClock, keys: &Arc<MemoryKeyManager>, url: &str) -> CertificateAuthority {
    let store: Arc<dyn Store> = Arc::new(PostgresStore::connect(url).await.unwrap());
    let keys: Arc<dyn KeyManager> = keys.clone();
    CertificateAuthority::load(CaConfig::new(td()), Arc::new(clock.clone()), keys, store)
        .await
        .unwrap()
}

async fn journal_ids(url: &str) -> BTreeSet<String> {
    let store = PostgresStore::connect(url).await.unwrap();
    let ids = store
        .list_journal()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    store.close().await;
    ids
}

fn x509_roots(b: &Bundle) -> usize {
    b.x509_authorities().len()
}

/// Both directions: an SVID (X.509 and JWT) signed by one CA verifies against the
/// other's bundle.
fn cross_verify(a: &CertificateAuthority, b: &CertificateAuthority, now: SystemTime) {
    for (signer, verifier) in [(a, b), (b, a)] {
        let set = BundleSet::of((*verifier.bundle()).clone());
        let svid = signer.mint_x509_svid(&id("/w"), None, &[]).unwrap();
        x509::validate(&svid.cert_chain, &set, now).unwrap();
        let (token, _) = signer
            .sign_jwt_svid(&id("/w"), &["aud".into()], None)
            .unwrap();
        jwt::validate(&token, &["aud"], &set, now).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_publish_the_union_and_delete_nothing_of_each_other() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let url = pg.url();
    let clock = ManualClock::new(start());
    let (keys_a, keys_b) = (
        Arc::new(MemoryKeyManager::new()),
        Arc::new(MemoryKeyManager::new()),
    );
    let a = ca(&clock, &keys_a, &url).await;
    let b = ca(&clock, &keys_b, &url).await;
    a.rotate().await.unwrap();
    assert_eq!(x509_roots(&a.bundle()), 2, "both servers' roots");
    assert_eq!(
        a.bundle().jwt_authorities().len(),
        2,
        "both servers' JWT keys"
    );
    assert!(a.bundle().same_content(&b.bundle()));
    assert_eq!(
        a.bundle().sequence(),
        b.bundle().sequence(),
        "one stored bundle, one sequence"
    );
    assert_eq!(a.peer_authorities().len(), 2);
    cross_verify(&a, &b, clock.now());
    let rows = journal_ids(&url).await;
    assert_eq!(rows.len(), 4);

    // Server A dies; B keeps publishing its authorities, and deletes none.
    drop(a);
    b.rotate().await.unwrap();
    assert_eq!(
        x509_roots(&b.bundle()),
        2,
        "a dead server's root stays published"
    );
    assert_eq!(journal_ids(&url).await, rows);
    // A comes back with its keys: it rejoins and deletes nothing.
    let a = ca(&clock, &keys_a, &url).await;
    assert_eq!(journal_ids(&url).await, rows);
    assert_eq!(x509_roots(&a.bundle()), 2);
    cross_verify(&a, &b, clock.now());

    // Each rotates on its own: prepared (published), activated, the old one retired;
    // what either signs verifies against the other's bundle at every step.
    for hours in [13, 21, 25, 30] {
        clock.set(start() + HOUR * hours);
        a.rotate().await.unwrap();
        b.rotate().await.unwrap();
        a.rotate().await.unwrap();
        assert!(a.bundle().same_content(&b.bundle()), "at {hours} h");
        cross_verify(&a, &b, clock.now());
    }
    // Past the first authorities' expiry (24 h), each deleted its own only.
    let now_rows = journal_ids(&url).await;
    assert!(
        now_rows.is_disjoint(&rows),
        "expired slots deleted by their owners"
    );
    assert_eq!(x509_roots(&a.bundle()), now_rows.len() / 2);
}

/// A server that a dead server's key directory was lost for (or a new server) never
/// signs with another's authority, and its own start publishes at once to the other
/// servers, through change events rather than their rotation tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_reaches_the_others_through_change_events() {
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let server = |n: u32| {
        let url = url.clone();
        let dir = dir.path().join(format!("s{n}"));
        async move {
            let config = ServerConfig::with_defaults(td(), &dir).unwrap();
            let store = Arc::new(PostgresStore::connect(&url).await.unwrap());
            ServerState::with_parts(
                config,
                Arc::new(writ_identity::clock::SystemClock),
                store,
                Arc::new(MemoryKeyManager::new()),
            )
            .await
            .unwrap()
        }
    };
    let first = server(1).await;
    let mut bundles = first.ca.subscribe();
    assert_eq!(x509_roots(&first.ca.bundle()), 1);
    let second = server(2).await;
    assert_eq!(x509_roots(&second.ca.bundle()), 2);
    // The first server hears of the second's authorities without rotating (its
    // rotation tick is not running here), and the two settle on one bundle.
    tokio::time::timeout(
        Duration::from_secs(10),
        bundles.wait_for(|b| x509_roots(b) == 2 && b.jwt_authorities().len() == 2),
    )
    .await
    .expect("the new server's authorities reached the first server")
    .unwrap();
    let agreed = || {
        let (a, b) = (first.ca.bundle(), second.ca.bundle());
        a.same_content(&b) && a.sequence() == b.sequence()
    };
    for _ in 0..100 {
        if agreed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agreed(), "the servers settle on one stored bundle");
}

/// A server on a shared PostgreSQL store, serving its node API on 127.0.0.1.
struct NodeServer {
    state: Arc<ServerState>,
    addr: std::net::SocketAddr,
    _task: tokio::task::JoinHandle<()>,
}

async fn node_server(url: &str, dir: &std::path::Path) -> NodeServer {
    let config = ServerConfig::with_defaults(td(), dir).unwrap();
    let store = Arc::new(PostgresStore::connect(url).await.unwrap());
    let state = ServerState::with_parts(
        config,
        Arc::new(writ_identity::clock::SystemClock),
        store,
        Arc::new(MemoryKeyManager::new()),
    )
    .await
    .unwrap();
    let listener = writ_identity::server::node_service::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = state.clone();
    let task = tokio::spawn(async move {
        writ_identity::server::node_service::serve_node_api(
            serving,
            listener,
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    NodeServer {
        state,
        addr,
        _task: task,
    }
}

/// The same join token presented to two servers at the same moment: exactly one agent
/// joins, the other is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_presented_to_two_servers_at_once_admits_one_agent() {
    use writ_identity::agent::node_client::{Bootstrap, GrpcNode, NodeClientConfig};
    let Some(pg) = TempPostgres::start().unwrap() else {
        return;
    };
    let url = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let a = node_server(&url, &dir.path().join("a")).await;
    let b = node_server(&url, &dir.path().join("b")).await;
    for round in 0..5 {
        let token = format!("race-{round}-{}", std::process::id());
        let hash: String = writ_identity::key_manager::sha256(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        a.state
            .store
            .create_join_token(&writ_identity::store::JoinTokenRecord {
                token_hash: hash,
                expires_at: writ_identity::clock::unix_seconds(SystemTime::now()) + 600,
                selectors: Vec::new(),
            })
            .await
            .unwrap();
        // Trust both servers' CAs (the bundle both publish).
        let mut bundle = b.state.ca.bundle();
        for _ in 0..100 {
            if x509_roots(&bundle) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            bundle = b.state.ca.bundle();
        }
        let config = |server: &NodeServer, name: &str| NodeClientConfig {
            server_addresses: server.addr.into(),
            trust_domain: td(),
            data_dir: dir.path().join(format!("agent-{round}-{name}")),
            join_token: Some(token.clone()),
            k8s_psat: None,
            bootstrap: Bootstrap::Bundle((*bundle).clone()),
            clock: Arc::new(writ_identity::clock::SystemClock),
        };
        let (first, second) = tokio::join!(
            GrpcNode::connect(config(&a, "a")),
            GrpcNode::connect(config(&b, "b"))
        );
        let joined = [first.is_ok(), second.is_ok()];
        assert_eq!(
            joined.iter().filter(|j| **j).count(),
            1,
            "round {round}: exactly one agent joins ({:?} / {:?})",
            first.as_ref().err(),
            second.as_ref().err()
        );
    }
}
