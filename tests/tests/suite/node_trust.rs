//! Who may speak on the node API (gRPC over mTLS): the server accepts only the agent
//! SVID it issued to that agent (not any SVID of the trust domain carrying the agent's
//! ID, not an older one of the same agent once the agent has switched to its renewal),
//! and an agent accepts only the identity server's own SVID (not any SVID carrying the
//! server's ID).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tonic::transport::{Channel, Endpoint, Uri};
use writ_identity::agent::node_client::{AgentError, Bootstrap, GrpcNode, NodeClientConfig};
use writ_identity::entry::RegistrationEntry;
use writ_identity::key_manager::ToRcgen as _;
use writ_identity::key_manager::{PrivateKey, sha256};
use writ_identity::proto::node as pb;
use writ_identity::server::ServerState;
use writ_identity::server::node_service::{self, NodeClient};
use writ_identity::spiffe_id::SpiffeId;
use writ_identity::store::JoinTokenRecord;
use writ_identity::svid::x509::{X509Svid, check_leaf};
use writ_identity::tls::{SvidResolver, dangerous::AcceptAnyServer};

struct Server {
    state: Arc<ServerState>,
    addr: SocketAddr,
    _task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let state = writ_tests::server_state(dir.path(), Duration::from_secs(3600)).await;
    let listener = node_service::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = state.clone();
    let task = tokio::spawn(async move {
        node_service::serve_node_api(serving, listener, std::future::pending())
            .await
            .unwrap();
    });
    Server {
        state,
        addr,
        _task: task,
        _dir: dir,
    }
}

impl Server {
    async fn join_token(&self) -> String {
        let token = format!("tok-{}", std::process::id() as u64 * 1000 + next());
        self.state
            .store
            .create_join_token(&JoinTokenRecord {
                token_hash: sha256(token.as_bytes())
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect(),
                expires_at: self.state.clock.unix_seconds() + 600,
                selectors: Vec::new(),
            })
            .await
            .unwrap();
        token
    }

    /// An entry under `agent`, so that a sync has something to list.
    async fn entry_under(&self, agent: &SpiffeId) -> RegistrationEntry {
        let td = self.state.config.trust_domain.clone();
        let mut e = RegistrationEntry::new(
            td.spiffe_id(&format!("/workload/{}", next())).unwrap(),
            agent.clone(),
            vec!["unix:uid:1".parse().unwrap()],
        );
        e.validate(&td).unwrap();
        self.state.store.create_entry(&e).await.unwrap()
    }
}

fn next() -> u64 {
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) as u64
}

fn spki(key: &PrivateKey) -> Vec<u8> {
    rcgen::PublicKeyData::subject_public_key_info(&key.to_rcgen().unwrap())
}

/// A raw node API client presenting `svid` (or nothing), trusting any server: these
/// tests are about what the server accepts.
fn client(addr: SocketAddr, svid: Option<&X509Svid>) -> NodeClient<Channel> {
    let resolver = SvidResolver::new();
    if let Some(svid) = svid {
        resolver.set(svid).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServer::new())
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from("writ-server").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }));
    NodeClient::new(channel)
}

fn svid_from(response: pb::AgentSvidResponse, key: PrivateKey) -> X509Svid {
    let checked = check_leaf(&response.cert_chain[0]).unwrap();
    X509Svid {
        spiffe_id: checked.spiffe_id,
        cert_chain: response.cert_chain,
        private_key: Some(key),
        expires_at: checked.expires_at,
    }
}

/// Attests with a fresh join token; returns the agent SVID the server issued.
async fn attest(server: &Server) -> X509Svid {
    let key = PrivateKey::generate().unwrap();
    let response = client(server.addr, None)
        .attest_join_token(pb::AttestJoinTokenRequest {
            join_token: server.join_token().await,
            public_key: spki(&key),
        })
        .await
        .unwrap()
        .into_inner();
    svid_from(response, key)
}

async fn renew(addr: SocketAddr, svid: &X509Svid) -> Result<X509Svid, tonic::Status> {
    let key = PrivateKey::generate().unwrap();
    let response = client(addr, Some(svid))
        .renew_agent_svid(pb::RenewAgentSvidRequest {
            public_key: spki(&key),
        })
        .await?
        .into_inner();
    Ok(svid_from(response, key))
}

async fn sync(addr: SocketAddr, svid: &X509Svid) -> Result<Vec<String>, tonic::Status> {
    Ok(client(addr, Some(svid))
        .sync_entries(pb::SyncEntriesRequest::default())
        .await?
        .into_inner()
        .ids)
}

async fn sign(addr: SocketAddr, svid: &X509Svid, entry_id: &str) -> Result<usize, tonic::Status> {
    Ok(client(addr, Some(svid))
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![pb::X509SvidRequest {
                entry_id: entry_id.to_owned(),
                public_key: spki(&PrivateKey::generate().unwrap()),
                ..Default::default()
            }],
        })
        .await?
        .into_inner()
        .svids
        .len())
}

fn assert_denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status:?}"
    );
    assert!(
        status.message().contains("not the one the server issued"),
        "{what}: {status:?}"
    );
}

#[tokio::test]
async fn an_agent_svid_the_ca_signed_outside_attestation_is_refused() {
    let server = server().await;
    let issued = attest(&server).await;
    let entry = server.entry_under(&issued.spiffe_id).await;
    // The issued SVID works.
    assert_eq!(
        sync(server.addr, &issued).await.unwrap(),
        vec![entry.id.clone()]
    );
    assert_eq!(sign(server.addr, &issued, &entry.id).await.unwrap(), 1);

    // Same agent ID, same CA, same trust domain, but not what attestation issued (as an
    // entry with the agent's ID, or `x509 mint`, would have produced before the
    // reserved namespace existed).
    let forged = server
        .state
        .ca
        .mint_x509_svid(&issued.spiffe_id, None, &[])
        .unwrap();
    assert_eq!(forged.spiffe_id, issued.spiffe_id);
    assert_denied(sync(server.addr, &forged).await, "SyncEntries");
    assert_denied(sign(server.addr, &forged, &entry.id).await, "SignX509Svids");
    assert_denied(renew(server.addr, &forged).await, "RenewAgentSvid");

    // The refusals changed nothing: the issued SVID still works and still renews.
    assert_eq!(
        sync(server.addr, &issued).await.unwrap(),
        vec![entry.id.clone()]
    );
    renew(server.addr, &issued).await.unwrap();
}

#[tokio::test]
async fn after_a_renewal_the_old_agent_svid_stops_once_the_new_one_is_used() {
    let server = server().await;
    let first = attest(&server).await;
    let entry = server.entry_under(&first.spiffe_id).await;
    let second = renew(server.addr, &first).await.unwrap();
    assert_eq!(second.spiffe_id, first.spiffe_id);

    // Until the agent switches, both work (calls in flight on the old connection).
    assert_eq!(
        sync(server.addr, &first).await.unwrap(),
        vec![entry.id.clone()]
    );
    // The first call with the new one switches...
    assert_eq!(
        sync(server.addr, &second).await.unwrap(),
        vec![entry.id.clone()]
    );
    // ...and the old one is dead for everything, renewal included.
    assert_denied(sync(server.addr, &first).await, "old SVID: SyncEntries");
    assert_denied(
        sign(server.addr, &first, &entry.id).await,
        "old SVID: SignX509Svids",
    );
    assert_denied(renew(server.addr, &first).await, "old SVID: RenewAgentSvid");
    // The new one carries on.
    assert_eq!(sign(server.addr, &second, &entry.id).await.unwrap(), 1);
    let third = renew(server.addr, &second).await.unwrap();

    // An unused renewal is replaced by the next one: only the latest is pending.
    let fourth = renew(server.addr, &second).await.unwrap();
    assert_denied(sync(server.addr, &third).await, "superseded renewal");
    assert_eq!(
        sync(server.addr, &fourth).await.unwrap(),
        vec![entry.id.clone()]
    );
    assert_denied(sync(server.addr, &second).await, "SVID before the switch");
    let record = server
        .state
        .store
        .fetch_agent(&first.spiffe_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.next_cert_sha256, "");
    assert_eq!(
        record.cert_expires_at,
        writ_identity::clock::unix_seconds(fourth.expires_at)
    );
}

/// A TLS server presenting `svid`, recording how many bytes of application data (a join
/// token, say) reach it.
async fn fake_server(svid: X509Svid) -> (SocketAddr, Arc<AtomicUsize>) {
    let resolver = SvidResolver::new();
    resolver.set(&svid).unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        counter.fetch_add(n, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn an_agent_refuses_a_server_whose_svid_only_carries_the_server_id() {
    let server = server().await;
    let td = server.state.config.trust_domain.clone();
    let server_id = td.spiffe_id(node_service::SERVER_PATH).unwrap();
    // A valid SVID of the trust domain with the server's ID, signed by the real CA, but
    // not the server's own.
    let impostor = server
        .state
        .ca
        .mint_x509_svid(&server_id, None, &[])
        .unwrap();
    assert!(!writ_identity::ca::is_server_svid(&impostor.cert_chain[0]));
    let (addr, received) = fake_server(impostor).await;
    let dir = tempfile::tempdir().unwrap();
    let token = server.join_token().await;
    let err = GrpcNode::connect(NodeClientConfig {
        server_addresses: addr.into(),
        trust_domain: td.clone(),
        data_dir: dir.path().to_path_buf(),
        join_token: Some(token.clone()),
        k8s_psat: None,
        bootstrap: Bootstrap::Bundle((*server.state.ca.bundle()).clone()),
        clock: std::sync::Arc::new(writ_identity::clock::SystemClock),
    })
    .await
    .expect_err("the impostor must be refused");
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err:?}");
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "not a byte (the join token least of all) reached the impostor"
    );
    assert!(!dir.path().join("agent_svid.pem").exists());

    // The same agent, the same bundle and token, joins the real server.
    let node = GrpcNode::connect(NodeClientConfig {
        server_addresses: server.addr.into(),
        trust_domain: td,
        data_dir: dir.path().to_path_buf(),
        join_token: Some(token),
        k8s_psat: None,
        bootstrap: Bootstrap::Bundle((*server.state.ca.bundle()).clone()),
        clock: std::sync::Arc::new(writ_identity::clock::SystemClock),
    })
    .await
    .unwrap();
    assert!(node.has_svid());
}
