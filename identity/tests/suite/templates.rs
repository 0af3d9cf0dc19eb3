//! Identity templates and node aliases through a real server and in-process agents:
//! each caller gets the ID its own attested selectors render, a value that is not a
//! path segment gets nothing, the server re-renders from values and records what it
//! issued, an idle rendering is released; a node alias authorizes the entries under it
//! for every agent whose node selectors match, and no other.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Code, Request};
use writ_identity::agent::cache::Cache;
use writ_identity::agent::node_api::{LocalNode, NodeApi};
use writ_identity::agent::{self, RunningAgent};
use writ_identity::attest::workload::StaticAttestor;
use writ_identity::clock::{Clock as _, ManualClock};
use writ_identity::entry::RegistrationEntry;
use writ_identity::entry::template::{IdTemplate, TemplateValues};
use writ_identity::key_manager::PrivateKey;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::proto::admin as admin_pb;
use writ_identity::proto::admin::admin_server::Admin;
use writ_identity::proto::workload as pb;
use writ_identity::selector::Selector;
use writ_identity::server::ServerState;
use writ_identity::server::admin::AdminService;
use writ_identity::server::node::{NodeError, NodeHandler};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::AttestedAgent;
use writ_tests::{connect_raw, server_state, with_header};

const TEMPLATE: &str = "spiffe://example.org/agents/{docker:label:app}";

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn agent_id() -> SpiffeId {
    SpiffeId::new("spiffe://example.org/writ/agent/test").unwrap()
}

/// A template entry under the test agent, stored and announced.
async fn register_template(server: &ServerState, template: &str) -> RegistrationEntry {
    let td = server.config.trust_domain.clone();
    let mut entry =
        RegistrationEntry::from_template(IdTemplate::parse(template).unwrap(), agent_id(), vec![])
            .unwrap();
    entry.validate(&td).unwrap();
    entry.created_at = server.clock.unix_seconds();
    let stored = server.store.create_entry(&entry).await.unwrap();
    server.notify_change();
    stored
}

/// An agent on its own socket whose every caller has `selectors`.
async fn agent_with(
    server: &Arc<ServerState>,
    dir: &std::path::Path,
    name: &str,
    selectors: &[&str],
) -> RunningAgent {
    let node = Arc::new(LocalNode::new(server.clone(), agent_id()));
    let attestor = StaticAttestor::new(selectors.iter().map(|s| sel(s)).collect());
    let running = agent::start(node, &dir.join(format!("{name}.sock")), Arc::new(attestor))
        .await
        .unwrap();
    running.cache.refresh(true).await.unwrap();
    running
}

/// The SPIFFE IDs of the first X509-SVID response, or the status.
async fn fetch_ids(agent: &RunningAgent) -> Result<Vec<String>, tonic::Status> {
    let mut client = connect_raw(agent.socket.clone()).await;
    let mut stream = client
        .fetch_x509svid(with_header(pb::X509svidRequest {}))
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first response");
    Ok(first.svids.into_iter().map(|s| s.spiffe_id).collect())
}

fn spki(key: &PrivateKey) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap())
}

fn values(pairs: &[(&str, &str)]) -> TemplateValues {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_caller_gets_the_id_its_label_renders() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    let entry = register_template(&server, TEMPLATE).await;
    let web = agent_with(
        &server,
        dir.path(),
        "web",
        &["docker:label:app:web", "unix:uid:1"],
    )
    .await;
    let db = agent_with(&server, dir.path(), "db", &["docker:label:app:db"]).await;
    let bad = agent_with(&server, dir.path(), "bad", &["docker:label:app:a/b"]).await;
    let dots = agent_with(&server, dir.path(), "dots", &["docker:label:app:.."]).await;
    let two = agent_with(
        &server,
        dir.path(),
        "two",
        &["docker:label:app:x", "docker:label:app:y"],
    )
    .await;
    let none = agent_with(&server, dir.path(), "none", &["unix:uid:1"]).await;

    assert_eq!(
        fetch_ids(&web).await.unwrap(),
        vec!["spiffe://example.org/agents/web"]
    );
    assert_eq!(
        fetch_ids(&db).await.unwrap(),
        vec!["spiffe://example.org/agents/db"]
    );
    for (agent, what) in [
        (&bad, "a value with '/'"),
        (&dots, "a dot segment"),
        (&two, "two selectors for one placeholder"),
        (&none, "no selector for the placeholder"),
    ] {
        let status = fetch_ids(agent).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{what}");
        assert_eq!(status.message(), "no identity issued", "{what}");
    }

    // JWT-SVIDs carry the rendered ID too.
    let mut client = connect_raw(web.socket.clone()).await;
    let jwt = client
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec!["aud".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.svids.len(), 1);
    assert_eq!(jwt.svids[0].spiffe_id, "spiffe://example.org/agents/web");

    // The entry view lists what the template produced, on which agent.
    let admin = AdminService::new(server.clone());
    let shown = admin
        .get_entry(Request::new(admin_pb::GetEntryRequest {
            id: entry.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(shown.spiffe_id_template, TEMPLATE);
    let mut produced: Vec<(String, String)> = shown
        .template_issues
        .iter()
        .map(|i| (i.spiffe_id.clone(), i.agent_id.clone()))
        .collect();
    produced.sort();
    assert_eq!(
        produced,
        vec![
            (
                "spiffe://example.org/agents/db".to_owned(),
                agent_id().to_string()
            ),
            (
                "spiffe://example.org/agents/web".to_owned(),
                agent_id().to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn the_server_renders_from_values_and_never_takes_an_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    let entry = register_template(&server, TEMPLATE).await;
    let handler = NodeHandler::new(server.clone());
    let key = spki(&PrivateKey::generate().unwrap());

    let svid = handler
        .sign_template_x509_svid(
            &agent_id(),
            &entry.id,
            &values(&[("docker:label:app", "web")]),
            &key,
        )
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id.as_str(), "spiffe://example.org/agents/web");

    for bad in ["a/b", "..", ".", "%2F", "", "é", "sub", &"a".repeat(129)] {
        let e = handler
            .sign_template_x509_svid(
                &agent_id(),
                &entry.id,
                &values(&[("docker:label:app", bad)]),
                &key,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, NodeError::Invalid(_)), "{bad:?}: {e:?}");
    }
    // `writ` is a fine value except as the first segment, where this template puts it.
    let under = register_template(&server, "spiffe://example.org/{docker:label:app}/x").await;
    let e = handler
        .sign_template_x509_svid(
            &agent_id(),
            &under.id,
            &values(&[("docker:label:app", "writ")]),
            &key,
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("reserved namespace"), "{e}");
    // Missing and extra values.
    for v in [
        values(&[]),
        values(&[("docker:label:app", "web"), ("k8s:ns", "x")]),
    ] {
        assert!(matches!(
            handler
                .sign_template_x509_svid(&agent_id(), &entry.id, &v, &key)
                .await,
            Err(NodeError::Invalid(_))
        ));
    }
    // A plain signature of a template entry, and a JWT-SVID without values.
    assert!(matches!(
        handler
            .sign_x509_svids(&agent_id(), &[(entry.id.clone(), key.clone())])
            .await,
        Err(NodeError::Invalid(_))
    ));
    assert!(matches!(
        handler
            .sign_jwt_svid(&agent_id(), &entry.id, &["aud".to_owned()])
            .await,
        Err(NodeError::Invalid(_))
    ));
    // Another agent is not authorized for it.
    let stranger = SpiffeId::new("spiffe://example.org/writ/agent/other").unwrap();
    assert!(matches!(
        handler
            .sign_template_x509_svid(
                &stranger,
                &entry.id,
                &values(&[("docker:label:app", "web")]),
                &key
            )
            .await,
        Err(NodeError::NotAuthorized(_))
    ));
    let (token, _, _) = handler
        .sign_template_jwt_svid(
            &agent_id(),
            &entry.id,
            &values(&[("docker:label:app", "db")]),
            &["aud".to_owned()],
        )
        .await
        .unwrap();
    assert!(!token.is_empty());
    let issued = server.store.list_template_issues(&entry.id).await.unwrap();
    let ids: Vec<&str> = issued.iter().map(|i| i.spiffe_id.as_str()).collect();
    assert_eq!(issued.len(), 2, "{ids:?}");
    assert!(ids.contains(&"spiffe://example.org/agents/db"));
    // Template entries are leaves: an entry under the stand-in is never authorized.
    let mut child = RegistrationEntry::new(
        SpiffeId::new("spiffe://example.org/child").unwrap(),
        entry.spiffe_id.clone(),
        vec![sel("unix:uid:1")],
    );
    child.validate_own(&server.config.trust_domain).unwrap();
    server.store.create_entry(&child).await.unwrap();
    let authorized = handler.authorized_entries(&agent_id()).await.unwrap();
    assert!(authorized.iter().all(|e| e.id != child.id));
}

#[tokio::test]
async fn an_idle_rendering_is_released_and_a_used_one_renewed() {
    let dir = tempfile::tempdir().unwrap();
    // Server and agent read one clock, so lifetimes agree.
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let server = {
        let td = writ_identity::spiffe_id::TrustDomain::new("example.org").unwrap();
        let mut config =
            writ_identity::server::config::ServerConfig::with_defaults(td, dir.path()).unwrap();
        config.ca.default_x509_svid_ttl = Duration::from_secs(600);
        let store = Arc::new(
            writ_identity::store::sqlite::SqliteStore::open(&dir.path().join("db.sqlite3"))
                .await
                .unwrap(),
        );
        ServerState::with_parts(
            config,
            clock.clone(),
            store,
            Arc::new(writ_identity::key_manager::MemoryKeyManager::new()),
        )
        .await
        .unwrap()
    };
    register_template(&server, TEMPLATE).await;
    let node: Arc<dyn NodeApi> = Arc::new(LocalNode::new(server.clone(), agent_id()));
    let cache = Cache::new(node, clock.clone());
    cache.refresh(true).await.unwrap();
    assert!(cache.snapshot().svids.is_empty(), "nothing is signed ahead");
    assert_eq!(cache.snapshot().templates.len(), 1);

    let web = [sel("docker:label:app:web")];
    let db = [sel("docker:label:app:db")];
    cache.ensure_templates(&web).await.unwrap();
    cache.ensure_templates(&db).await.unwrap();
    let now = clock.unix_seconds();
    let snapshot = cache.snapshot();
    assert_eq!(snapshot.svids.len(), 2);
    let matched = snapshot.matching(&web, now);
    assert_eq!(matched.len(), 1);
    assert_eq!(
        matched[0].entry.spiffe_id.as_str(),
        "spiffe://example.org/agents/web"
    );
    let first_serial = matched[0].svid.cert_chain[0].clone();
    // Asking again signs nothing new.
    cache.ensure_templates(&web).await.unwrap();
    assert_eq!(cache.snapshot().generation, snapshot.generation);

    // Past half the lifetime, `web` is fetched again and renewed; `db` is not fetched.
    clock.advance(Duration::from_secs(400));
    cache.ensure_templates(&web).await.unwrap();
    cache.refresh(false).await.unwrap();
    let renewed = cache.snapshot().matching(&web, clock.unix_seconds());
    assert_eq!(renewed.len(), 1);
    assert_ne!(renewed[0].svid.cert_chain[0], first_serial, "renewed");
    // One lifetime after its last fetch, `db` is released; `web` stays.
    clock.advance(Duration::from_secs(250));
    cache.refresh(false).await.unwrap();
    let now = clock.unix_seconds();
    let snapshot = cache.snapshot();
    assert!(snapshot.matching(&db, now).is_empty(), "db released");
    assert_eq!(snapshot.matching(&web, now).len(), 1, "web kept");
    assert_eq!(snapshot.svids.len(), 1);
    // The template entry deleted: the rendering goes with the next sync.
    let entry = cache.snapshot().templates[0].clone();
    server.store.delete_entry(&entry.id).await.unwrap();
    cache.refresh(true).await.unwrap();
    assert!(cache.snapshot().svids.is_empty());
    assert!(cache.snapshot().templates.is_empty());
}

fn agent_record(id: &SpiffeId, selectors: &[&str]) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: id.clone(),
        attestation_type: "k8s_psat".into(),
        cert_serial: "01".into(),
        cert_expires_at: 4_000_000_000,
        cert_sha256: "ab".repeat(32),
        next_cert_sha256: String::new(),
        selectors: selectors.iter().map(|s| sel(s)).collect(),
        banned: false,
        created_at: 1_700_000_000,
    }
}

#[tokio::test]
async fn a_node_alias_authorizes_its_entries_for_matching_nodes_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = server_state(dir.path(), Duration::from_secs(3600)).await;
    let td = server.config.trust_domain.clone();
    let prod_a = td.spiffe_id("/writ/agent/k8s_psat/prod/node-a").unwrap();
    let prod_b = td.spiffe_id("/writ/agent/k8s_psat/prod/node-b").unwrap();
    let dev = td.spiffe_id("/writ/agent/k8s_psat/dev/node-c").unwrap();
    for (id, sels) in [
        (
            &prod_a,
            &["k8s_psat:cluster:prod", "k8s_psat:agent_ns:writ"][..],
        ),
        (&prod_b, &["k8s_psat:cluster:prod"][..]),
        (
            &dev,
            &["k8s_psat:cluster:dev", "k8s_psat:agent_ns:writ"][..],
        ),
    ] {
        server
            .store
            .create_agent(&agent_record(id, sels))
            .await
            .unwrap();
    }

    // Through the admin API, as `writ entry create --node` sends it.
    let admin = AdminService::new(server.clone());
    let create = |e: admin_pb::Entry| {
        let admin = admin.clone();
        async move {
            admin
                .create_entry(Request::new(admin_pb::CreateEntryRequest {
                    entry: Some(e),
                }))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let alias = create(admin_pb::Entry {
        spiffe_id: "spiffe://example.org/cluster/prod".into(),
        parent_id: "spiffe://example.org/writ/server".into(),
        selectors: vec!["k8s_psat:cluster:prod".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let web = create(admin_pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: alias.spiffe_id.clone(),
        selectors: vec!["unix:uid:1000".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let per_sa = create(admin_pb::Entry {
        spiffe_id_template: "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}".into(),
        parent_id: alias.spiffe_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(per_sa.spiffe_id, "spiffe://example.org/writ/template");
    // An alias in /writ/ and a template under the server are refused.
    let refused = create(admin_pb::Entry {
        spiffe_id: "spiffe://example.org/writ/cluster".into(),
        parent_id: "spiffe://example.org/writ/server".into(),
        selectors: vec!["k8s_psat:cluster:prod".into()],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(refused.message().starts_with("spiffe_id: "), "{refused:?}");
    let refused = create(admin_pb::Entry {
        spiffe_id_template: "spiffe://example.org/n/{k8s:ns}".into(),
        parent_id: "spiffe://example.org/writ/server".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(
        refused.message().starts_with("spiffe_id_template: "),
        "{refused:?}"
    );

    let handler = NodeHandler::new(server.clone());
    for (agent, expected) in [
        (&prod_a, vec![per_sa.id.clone(), web.id.clone()]),
        (&prod_b, vec![per_sa.id.clone(), web.id.clone()]),
        (&dev, vec![]),
    ] {
        let mut got: Vec<String> = handler
            .authorized_entries(agent)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect();
        got.sort();
        let mut expected = expected;
        expected.sort();
        assert_eq!(got, expected, "{agent}");
    }

    // An in-process agent on a prod node gets the workload entry's SVID; on dev, none.
    let on = |id: SpiffeId| {
        Cache::new(
            Arc::new(LocalNode::new(server.clone(), id)),
            server.clock.clone(),
        )
    };
    let prod_cache = on(prod_a.clone());
    prod_cache.refresh(true).await.unwrap();
    let ids: Vec<String> = prod_cache
        .snapshot()
        .svids
        .iter()
        .map(|c| c.entry.spiffe_id.to_string())
        .collect();
    assert_eq!(ids, vec!["spiffe://example.org/web"]);
    prod_cache
        .ensure_templates(&[sel("k8s:ns:shop"), sel("k8s:sa:cart")])
        .await
        .unwrap();
    assert!(
        prod_cache
            .snapshot()
            .svids
            .iter()
            .any(|c| c.entry.spiffe_id.as_str() == "spiffe://example.org/ns/shop/sa/cart")
    );
    let dev_cache = on(dev.clone());
    dev_cache.refresh(true).await.unwrap();
    assert!(dev_cache.snapshot().svids.is_empty());
    assert!(dev_cache.snapshot().templates.is_empty());

    // The node loses the selector: the alias no longer covers it.
    let mut record = server.store.fetch_agent(&prod_b).await.unwrap().unwrap();
    record.selectors = vec![sel("k8s_psat:cluster:staging")];
    server.store.update_agent(&record).await.unwrap();
    assert!(
        handler
            .authorized_entries(&prod_b)
            .await
            .unwrap()
            .is_empty()
    );
}
