//! The split-mode node API client: the agent talks to the server over mTLS, attests once
//! with a join token, then presents its agent SVID (renewed at half-life, kept in its
//! data dir so a restart needs no new token).
//!
//! The agent trusts the server it first contacts through a bootstrap bundle, or — named as
//! dangerous, as SPIRE does — `insecure_bootstrap`, which accepts any server for the first
//! contact only.
//!
//! The agent may know several servers of its trust domain
//! ([`NodeClientConfig::server_addresses`]): every connection tries them in turn, starting
//! with the last one that answered ([`super::server_address`]), and HTTP/2 keep-alive
//! pings notice a server that vanished without a word, so the change stream and the next
//! call move to another server within about two seconds. The agent SVID is valid on every
//! server of the trust domain: a switch never needs a new attestation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

use super::node_api::NodeApi;
use super::server_address::{Failover, ServerAddresses, tcp_connect};
use crate::bundle::{Bundle, BundleSet};
use crate::clock::SharedClock;
use crate::key_manager::ToRcgen as _;
use crate::key_manager::{PrivateKey, create_private_dir, write_secret_file};
use crate::proto::node as pb;
use crate::server::admin::entry_from_proto;
use crate::server::lease::{ChildRequest, lease_from_proto};
use crate::server::node::{EntrySync, NodeError};
use crate::server::node_service::{NodeClient, SERVER_PATH};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::LeaseRecord;
use crate::svid::x509::{X509Svid, chain_from_pem};
use crate::tls::{SpiffeServerVerifier, SvidResolver};

/// Why the agent could not reach or join the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// No usable agent SVID on disk and no join token given.
    #[error("this agent has not attested yet: start it with a join token (writ token generate)")]
    NeedsJoinToken,
    /// The server refused attestation.
    #[error("attestation refused: {0}")]
    Refused(String),
    /// The server could not be reached.
    #[error("cannot reach the server at {address}: {detail}")]
    Unreachable {
        /// The address.
        address: String,
        /// Why.
        detail: String,
    },
    /// Files in the data dir could not be read or written.
    #[error("agent data dir: {0}")]
    DataDir(String),
    /// A key or certificate is unusable.
    #[error("agent credentials: {0}")]
    Credentials(String),
}

/// How the agent trusts the server on first contact.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// Trust the server whose SVID chains to this bundle.
    Bundle(Bundle),
    /// DANGEROUS: trust whatever server answers, for the first contact only.
    Insecure,
}

/// Settings of a split-mode agent.
#[derive(Debug, Clone)]
pub struct NodeClientConfig {
    /// `host:port` of each server's node API, tried in turn (see
    /// [`super::server_address`]).
    pub server_addresses: ServerAddresses,
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// Where the agent keeps its SVID, key and bundle.
    pub data_dir: PathBuf,
    /// A join token, needed on first start (or after eviction).
    pub join_token: Option<String>,
    /// `k8s_psat` node attestation instead of a join token: the agent sends its
    /// projected service-account token, read fresh from its file at each attestation.
    pub k8s_psat: Option<K8sPsatAgentConfig>,
    /// How to trust the server on first contact.
    pub bootstrap: Bootstrap,
    /// The time the agent's SVID expiry and renewal schedule are read from.
    pub clock: SharedClock,
}

/// How a split-mode agent attests with `k8s_psat` (`[node_attestor.k8s_psat]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPsatAgentConfig {
    /// The cluster name the server knows this cluster by.
    pub cluster: String,
    /// The projected service-account token file (default
    /// `/var/run/secrets/tokens/writ-agent`); the kubelet rotates it.
    pub token_path: PathBuf,
}

/// Largest token file read.
const MAX_PSAT_FILE: u64 = 64 * 1024;

/// The token in `path` (trimmed), read with a size limit.
fn read_psat(path: &Path) -> Result<String, AgentError> {
    let bytes = writ_spiffe::process::read_bounded(path, MAX_PSAT_FILE)
        .map_err(|e| AgentError::Credentials(format!("k8s_psat token_path: {e}")))?;
    let token = String::from_utf8(bytes)
        .map_err(|_| AgentError::Credentials(format!("{}: not UTF-8", path.display())))?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(AgentError::Credentials(format!(
            "{}: the token file is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// The node API over gRPC and mTLS.
#[derive(Debug)]
pub struct GrpcNode {
    agent_id: SpiffeId,
    /// Replaced by a fresh connection after each renewal, so that the new SVID is
    /// presented (and the server retires the old one) without waiting for a reconnect.
    client: Arc<ArcSwap<NodeClient<Channel>>>,
    resolver: Arc<SvidResolver>,
    trust: Arc<ArcSwap<Bundle>>,
    changes: watch::Receiver<u64>,
    /// When the current agent SVID expires; moved by each renewal.
    expires_at: Arc<std::sync::Mutex<SystemTime>>,
    /// The servers, and the one that answered last.
    failover: Arc<Failover>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for GrpcNode {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

const SVID_FILE: &str = "agent_svid.pem";
const KEY_FILE: &str = "agent_key.pem";
const BUNDLE_FILE: &str = "bundle.json";

/// What the agent attests with.
enum Evidence {
    JoinToken(String),
    K8sPsat { cluster: String, token: String },
}

struct Stored {
    svid: X509Svid,
    bundle: Bundle,
}

fn load_stored(
    dir: &Path,
    td: &TrustDomain,
    clock: &SharedClock,
) -> Result<Option<Stored>, AgentError> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let (Ok(chain), Ok(key), Ok(bundle)) = (read(SVID_FILE), read(KEY_FILE), read(BUNDLE_FILE))
    else {
        return Ok(None);
    };
    let chain = chain_from_pem(&chain).map_err(|e| AgentError::Credentials(e.to_string()))?;
    let key = PrivateKey::from_pem(&zeroize::Zeroizing::new(key))
        .map_err(|e| AgentError::Credentials(e.to_string()))?;
    let bundle = Bundle::from_json(td.clone(), &bundle)
        .map_err(|e| AgentError::Credentials(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| AgentError::Credentials("empty SVID file".into()))?;
    let checked =
        crate::svid::x509::check_leaf(leaf).map_err(|e| AgentError::Credentials(e.to_string()))?;
    if checked.expires_at <= clock.now() {
        return Ok(None);
    }
    Ok(Some(Stored {
        svid: X509Svid {
            spiffe_id: checked.spiffe_id,
            cert_chain: chain,
            private_key: Some(key),
            expires_at: checked.expires_at,
        },
        bundle,
    }))
}

fn save(dir: &Path, svid: &X509Svid, bundle: &Bundle) -> Result<(), AgentError> {
    let err = |e: &dyn std::fmt::Display| AgentError::DataDir(e.to_string());
    create_private_dir(dir).map_err(|e| err(&format!("{}: {e}", dir.display())))?;
    let key = svid
        .private_key
        .as_ref()
        .ok_or_else(|| AgentError::Credentials("SVID without key".into()))?;
    write_secret_file(&dir.join(KEY_FILE), key.to_pem().as_bytes()).map_err(|e| err(&e))?;
    std::fs::write(dir.join(SVID_FILE), svid.chain_pem()).map_err(|e| err(&e))?;
    std::fs::write(dir.join(BUNDLE_FILE), bundle.to_json()).map_err(|e| err(&e))?;
    Ok(())
}

/// How long the TLS handshake with one server may take before the next is tried.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive: a ping this often, also while idle...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// ...and the connection is dropped when its answer takes longer than this.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A lazily connected channel whose every (re)connection tries the servers in turn
/// through `failover`, starting with the server that answered last; a reconnection (the
/// connection broke: its server died or went silent) tries that connection's server
/// last, so a black hole is not waited on again.
fn channel(
    failover: Arc<Failover>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    resolver: Arc<SvidResolver>,
) -> Result<Channel, AgentError> {
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // The URI only names the channel; the connector below picks the server.
    let endpoint = Endpoint::from_static("http://writ-server")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .timeout(Duration::from_secs(30));
    // The server of this channel's current connection.
    let connected: Arc<std::sync::Mutex<Option<std::net::SocketAddr>>> = Arc::default();
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let failover = failover.clone();
            let broken = *connected.lock().unwrap_or_else(|e| e.into_inner());
            let connected = connected.clone();
            async move {
                let (io, server) = failover
                    .first_answer(broken, |addr| {
                        let connector = connector.clone();
                        async move {
                            let tcp = tcp_connect(addr).await?;
                            // The verifier checks the SPIFFE ID; the name only fills SNI.
                            let name = ServerName::try_from("writ-server")
                                .map_err(std::io::Error::other)?;
                            match tokio::time::timeout(
                                HANDSHAKE_TIMEOUT,
                                connector.connect(name, tcp),
                            )
                            .await
                            {
                                Ok(tls) => tls,
                                Err(_) => Err(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    "TLS handshake timed out",
                                )),
                            }
                        }
                    })
                    .await?;
                *connected.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        })),
    )
}

/// The server's node API SVID: it chains to the trust bundle, names
/// `spiffe://<td>/writ/server`, and carries the mark only the CA's server path sets
/// ([`crate::ca::SERVER_SVID_MARKER`]). The ID alone is not enough: any SVID of the trust
/// domain that carried it (an entry's, a mint's) would otherwise pass for the server.
fn server_verifier(
    trust: Arc<ArcSwap<Bundle>>,
    server_id: SpiffeId,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    Arc::new(ServerSvidVerifier {
        chain: SpiffeServerVerifier::new(
            Arc::new(move || BundleSet::of((**trust.load()).clone())),
            Arc::new(move |id: &SpiffeId| *id == server_id),
        ),
    })
}

/// See [`server_verifier`].
#[derive(Debug)]
struct ServerSvidVerifier {
    chain: Arc<SpiffeServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for ServerSvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified =
            self.chain
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if !crate::ca::is_server_svid(end_entity) {
            tracing::warn!(
                "refused a server whose SVID carries the server's SPIFFE ID but was not issued to the identity server"
            );
            return Err(rustls::Error::General(
                "peer is not the identity server: its SVID names the server but lacks the \
                 server mark only the CA's server path sets"
                    .into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

fn unreachable(address: &ServerAddresses, e: &tonic::Status) -> AgentError {
    AgentError::Unreachable {
        address: address.to_string(),
        detail: e.message().to_owned(),
    }
}

impl GrpcNode {
    /// `SignJwtSvid` for an entry, with the placeholder values of a template entry
    /// (empty for a fixed ID): `(token, issued_at, expires_at)`.
    async fn jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
        template_values: std::collections::HashMap<String, String>,
    ) -> Result<(String, i64, i64), NodeError> {
        let r = self
            .client()
            .sign_jwt_svid(pb::SignJwtSvidRequest {
                entry_id: entry_id.to_owned(),
                audience: audience.to_vec(),
                template_values,
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok((r.token, r.issued_at, r.expires_at))
    }

    /// Joins the server: reuses the agent SVID in the data dir if it is still valid,
    /// otherwise attests with the join token. Then keeps the SVID renewed and listens for
    /// change signals in the background.
    ///
    /// # Errors
    /// [`AgentError`] if neither works.
    pub async fn connect(config: NodeClientConfig) -> Result<Arc<Self>, AgentError> {
        let td = config.trust_domain.clone();
        let server_id = td
            .spiffe_id(SERVER_PATH)
            .map_err(|e| AgentError::Credentials(e.to_string()))?;
        let resolver = SvidResolver::new();
        create_private_dir(&config.data_dir)
            .map_err(|e| AgentError::DataDir(format!("{}: {e}", config.data_dir.display())))?;
        let stored = match load_stored(&config.data_dir, &td, &config.clock)? {
            Some(s) => s,
            None => Self::attest(&config, &server_id).await?,
        };
        resolver
            .set(&stored.svid)
            .map_err(|e| AgentError::Credentials(e.to_string()))?;
        let trust = Arc::new(ArcSwap::from_pointee(stored.bundle));
        let failover = Failover::new(config.server_addresses.clone());
        let connector = Connector {
            failover: failover.clone(),
            verifier: server_verifier(trust.clone(), server_id),
            resolver: resolver.clone(),
        };
        let client = Arc::new(ArcSwap::from_pointee(connector.client()?));
        let (changes_tx, changes) = watch::channel(0);
        let (renewed_tx, renewed) = watch::channel(0);
        let watch_task = tokio::spawn(watch_changes(client.clone(), changes_tx, renewed));
        let expires_at = Arc::new(std::sync::Mutex::new(stored.svid.expires_at));
        let renew_task = tokio::spawn(renew_loop(
            client.clone(),
            connector,
            trust.clone(),
            config.data_dir.clone(),
            expires_at.clone(),
            renewed_tx,
            config.clock.clone(),
        ));
        tracing::info!(spiffe_id = %stored.svid.spiffe_id, servers = %config.server_addresses, "agent joined the server");
        Ok(Arc::new(Self {
            agent_id: stored.svid.spiffe_id,
            client,
            resolver,
            trust,
            changes,
            expires_at,
            failover,
            tasks: vec![watch_task, renew_task],
        }))
    }

    async fn attest(config: &NodeClientConfig, server_id: &SpiffeId) -> Result<Stored, AgentError> {
        // A PSAT is read fresh from its file at each attestation (the kubelet rotates it).
        let evidence = match &config.k8s_psat {
            Some(psat) => Evidence::K8sPsat {
                cluster: psat.cluster.clone(),
                token: read_psat(&psat.token_path)?,
            },
            None => Evidence::JoinToken(
                config
                    .join_token
                    .clone()
                    .ok_or(AgentError::NeedsJoinToken)?,
            ),
        };
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match &config.bootstrap
        {
            Bootstrap::Bundle(b) => server_verifier(
                Arc::new(ArcSwap::from_pointee(b.clone())),
                server_id.clone(),
            ),
            Bootstrap::Insecure => {
                tracing::warn!(
                    "insecure_bootstrap: trusting whatever server answers for this first contact"
                );
                crate::tls::dangerous::AcceptAnyServer::new()
            }
        };
        // Tried in the configured order; the first server that answers attests.
        let mut client = NodeClient::new(channel(
            Failover::new(config.server_addresses.clone()),
            verifier,
            SvidResolver::new(),
        )?);
        let key = PrivateKey::generate().map_err(|e| AgentError::Credentials(e.to_string()))?;
        let spki = spki(&key)?;
        let response = match evidence {
            Evidence::JoinToken(token) => {
                client
                    .attest_join_token(pb::AttestJoinTokenRequest {
                        join_token: token,
                        public_key: spki,
                    })
                    .await
            }
            Evidence::K8sPsat { cluster, token } => {
                tracing::info!(%cluster, token_sha256 = %writ_spiffe::fingerprint::token(&token), "attesting with k8s_psat");
                client
                    .attest_k8s_psat(pb::AttestK8sPsatRequest {
                        cluster,
                        token,
                        public_key: spki,
                    })
                    .await
            }
        }
        .map_err(|e| match e.code() {
                tonic::Code::PermissionDenied
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => {
                    AgentError::Refused(e.message().to_owned())
                }
                _ => unreachable(&config.server_addresses, &e),
            })?
            .into_inner();
        let stored = svid_from_response(response, key, &config.trust_domain)?;
        save(&config.data_dir, &stored.svid, &stored.bundle)?;
        Ok(stored)
    }

    /// The trust bundle the agent verifies the server with.
    pub fn trust_bundle(&self) -> Arc<Bundle> {
        self.trust.load_full()
    }

    /// The server address that answered the agent's last connection, if any did.
    pub fn current_server(&self) -> Option<std::net::SocketAddr> {
        self.failover.current()
    }

    /// The server addresses this agent tries.
    pub fn server_addresses(&self) -> &ServerAddresses {
        self.failover.addresses()
    }

    /// Whether the agent currently has an SVID to present.
    pub fn has_svid(&self) -> bool {
        self.resolver.is_set()
    }

    /// The current connection's client.
    fn client(&self) -> NodeClient<Channel> {
        self.client.load().as_ref().clone()
    }
}

/// Makes node API connections: the server verifier and the agent's current SVID.
struct Connector {
    /// The servers, and the one that answered last; shared by every channel.
    failover: Arc<Failover>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    resolver: Arc<SvidResolver>,
}

impl Connector {
    /// A client on a new (lazily connected) channel.
    fn client(&self) -> Result<NodeClient<Channel>, AgentError> {
        Ok(NodeClient::new(channel(
            self.failover.clone(),
            self.verifier.clone(),
            self.resolver.clone(),
        )?)
        .max_decoding_message_size(64 * 1024 * 1024))
    }
}

fn spki(key: &PrivateKey) -> Result<Vec<u8>, AgentError> {
    Ok(rcgen::PublicKeyData::subject_public_key_info(
        &key.to_rcgen()
            .map_err(|e| AgentError::Credentials(e.to_string()))?,
    ))
}

fn svid_from_response(
    r: pb::AgentSvidResponse,
    key: PrivateKey,
    td: &TrustDomain,
) -> Result<Stored, AgentError> {
    let bundle = Bundle::from_json(td.clone(), &r.bundle)
        .map_err(|e| AgentError::Credentials(e.to_string()))?;
    let leaf = r
        .cert_chain
        .first()
        .ok_or_else(|| AgentError::Credentials("server sent no certificate".into()))?;
    let checked =
        crate::svid::x509::check_leaf(leaf).map_err(|e| AgentError::Credentials(e.to_string()))?;
    Ok(Stored {
        svid: X509Svid {
            spiffe_id: checked.spiffe_id,
            cert_chain: r.cert_chain,
            private_key: Some(key),
            expires_at: checked.expires_at,
        },
        bundle,
    })
}

async fn renew_loop(
    client: Arc<ArcSwap<NodeClient<Channel>>>,
    connector: Connector,
    trust: Arc<ArcSwap<Bundle>>,
    data_dir: PathBuf,
    current: Arc<std::sync::Mutex<SystemTime>>,
    renewed_tx: watch::Sender<u64>,
    clock: SharedClock,
) {
    let mut expires_at = *current.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let life = expires_at.duration_since(clock.now()).unwrap_or_default();
        tokio::time::sleep((life / 2).max(Duration::from_secs(1))).await;
        let renewed = async {
            let key = PrivateKey::generate().map_err(|e| AgentError::Credentials(e.to_string()))?;
            let response = client
                .load()
                .as_ref()
                .clone()
                .renew_agent_svid(pb::RenewAgentSvidRequest {
                    public_key: spki(&key)?,
                })
                .await
                .map_err(|e| AgentError::Refused(e.message().to_owned()))?
                .into_inner();
            let td = trust.load().trust_domain().clone();
            let stored = svid_from_response(response, key, &td)?;
            connector
                .resolver
                .set(&stored.svid)
                .map_err(|e| AgentError::Credentials(e.to_string()))?;
            save(&data_dir, &stored.svid, &stored.bundle)?;
            trust.store(Arc::new(stored.bundle));
            // Calls from now on go over a new connection that presents the new SVID;
            // the server retires the old one at its first use.
            client.store(Arc::new(connector.client()?));
            renewed_tx.send_modify(|g| *g += 1);
            Ok::<_, AgentError>(stored.svid.expires_at)
        }
        .await;
        match renewed {
            Ok(exp) => {
                tracing::info!("agent SVID renewed");
                expires_at = exp;
                *current.lock().unwrap_or_else(|e| e.into_inner()) = exp;
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                // Retry sooner, but never spin.
                expires_at = clock.now() + Duration::from_secs(10);
            }
        }
    }
}

/// Follows the server's change signals; after a renewal, the stream is opened again on
/// the new connection.
async fn watch_changes(
    client: Arc<ArcSwap<NodeClient<Channel>>>,
    tx: watch::Sender<u64>,
    mut renewed: watch::Receiver<u64>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        renewed.borrow_and_update();
        let mut current = client.load().as_ref().clone();
        match current.watch_changes(pb::WatchChangesRequest {}).await {
            Ok(response) => {
                let mut stream = response.into_inner();
                backoff = Duration::from_millis(200);
                // Reconnected: whatever happened meanwhile is a change.
                tx.send_modify(|g| *g += 1);
                loop {
                    tokio::select! {
                        message = stream.message() => match message {
                            Ok(Some(_)) => tx.send_modify(|g| *g += 1),
                            _ => break,
                        },
                        changed = renewed.changed() => {
                            if changed.is_err() {
                                // The renewal task is gone: keep following this stream.
                                while let Ok(Some(_)) = stream.message().await {
                                    tx.send_modify(|g| *g += 1);
                                }
                                break;
                            }
                            // Renewed: open the stream again with the new SVID, at once.
                            backoff = Duration::ZERO;
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "change stream unavailable"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(10));
    }
}

fn status(e: tonic::Status) -> NodeError {
    match e.code() {
        tonic::Code::PermissionDenied => NodeError::NotAuthorized(e.message().to_owned()),
        tonic::Code::InvalidArgument => NodeError::Invalid(e.message().to_owned()),
        tonic::Code::FailedPrecondition => NodeError::SpawnRefused(e.message().to_owned()),
        tonic::Code::ResourceExhausted => NodeError::SpawnLimit(e.message().to_owned()),
        tonic::Code::NotFound => NodeError::LeaseEnded(e.message().to_owned()),
        _ => NodeError::Unavailable(e.message().to_owned()),
    }
}

#[async_trait::async_trait]
impl NodeApi for GrpcNode {
    fn agent_id(&self) -> &SpiffeId {
        &self.agent_id
    }

    async fn sync_entries(&self, known: &BTreeMap<String, i64>) -> Result<EntrySync, NodeError> {
        let response = self
            .client()
            .sync_entries(pb::SyncEntriesRequest {
                known: known.clone().into_iter().collect(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let td = self.trust.load().trust_domain().clone();
        let changed = response
            .changed
            .into_iter()
            .map(|p| entry_from_proto(p, &td).map_err(|e| NodeError::Invalid(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(EntrySync {
            changed,
            ids: response.ids,
        })
    }

    async fn sign_x509_svids(
        &self,
        requests: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, X509Svid)>, NodeError> {
        let response = self
            .client()
            .sign_x509_svids(pb::SignX509SvidsRequest {
                requests: requests
                    .iter()
                    .map(|(entry_id, public_key)| pb::X509SvidRequest {
                        entry_id: entry_id.clone(),
                        public_key: public_key.clone(),
                        template_values: Default::default(),
                    })
                    .collect(),
            })
            .await
            .map_err(status)?
            .into_inner();
        response
            .svids
            .into_iter()
            .map(|s| Ok((s.entry_id.clone(), svid_from_signed(s)?)))
            .collect()
    }

    async fn sign_jwt_svid(
        &self,
        entry_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        self.jwt_svid(entry_id, audience, Default::default()).await
    }

    async fn sign_wit_svid(
        &self,
        entry_id: &str,
        values: Option<&crate::entry::template::TemplateValues>,
        cnf_jwk: &str,
    ) -> Result<(String, i64, i64), NodeError> {
        let r = self
            .client()
            .sign_wit_svid(pb::SignWitSvidRequest {
                entry_id: entry_id.to_owned(),
                cnf_jwk: cnf_jwk.to_owned(),
                template_values: values
                    .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok((r.token, r.issued_at, r.expires_at))
    }

    async fn sign_template_x509_svid(
        &self,
        entry_id: &str,
        values: &crate::entry::template::TemplateValues,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        let response = self
            .client()
            .sign_x509_svids(pb::SignX509SvidsRequest {
                requests: vec![pb::X509SvidRequest {
                    entry_id: entry_id.to_owned(),
                    public_key: spki.to_vec(),
                    template_values: values.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                }],
            })
            .await
            .map_err(status)?
            .into_inner();
        let signed = response
            .svids
            .into_iter()
            .find(|s| s.entry_id == entry_id)
            .ok_or_else(|| NodeError::Invalid("the server returned no SVID".into()))?;
        svid_from_signed(signed)
    }

    async fn sign_template_jwt_svid(
        &self,
        entry_id: &str,
        values: &crate::entry::template::TemplateValues,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let values = values.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.jwt_svid(entry_id, audience, values).await
    }

    async fn bundles(&self) -> Result<BundleSet, NodeError> {
        let r = self
            .client()
            .get_bundles(pb::GetBundlesRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let own = self.trust.load().trust_domain().clone();
        let mut set = BundleSet::new();
        for (td_id, doc) in &r.bundles {
            let td = TrustDomain::new(td_id).map_err(|e| NodeError::Invalid(e.to_string()))?;
            let bundle = Bundle::from_json(td.clone(), doc)
                .map_err(|e| NodeError::Invalid(e.to_string()))?;
            if td == own {
                // CA rotations reach the agent's own trust in the server this way.
                self.trust.store(Arc::new(bundle.clone()));
            }
            set.insert(bundle);
        }
        Ok(set)
    }

    fn agent_svid_expires_at(&self) -> Option<SystemTime> {
        Some(*self.expires_at.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    async fn register_child(&self, request: &ChildRequest) -> Result<LeaseRecord, NodeError> {
        let r = self
            .client()
            .register_child(pb::RegisterChildRequest {
                parent_spiffe_id: request.parent_id.to_string(),
                parent_entry_id: request.parent_entry_id.clone().unwrap_or_default(),
                child_pid: request.child_pid,
                child_start_time: request.child_start_time,
                task: request.task.clone(),
                ttl_seconds: request.ttl_seconds,
                parent_expires_at: request.parent_expires_at,
            })
            .await
            .map_err(status)?
            .into_inner();
        lease_from_proto(r, &self.agent_id)
    }

    async fn release_child(&self, lease_id: &str) -> Result<Vec<LeaseRecord>, NodeError> {
        let r = self
            .client()
            .release_child(pb::ReleaseChildRequest {
                id: lease_id.to_owned(),
            })
            .await
            .map_err(status)?
            .into_inner();
        r.released
            .into_iter()
            .map(|l| lease_from_proto(l, &self.agent_id))
            .collect()
    }

    async fn list_children(&self) -> Result<Vec<LeaseRecord>, NodeError> {
        let r = self
            .client()
            .list_children(pb::ListChildrenRequest {})
            .await
            .map_err(status)?
            .into_inner();
        r.leases
            .into_iter()
            .map(|l| lease_from_proto(l, &self.agent_id))
            .collect()
    }

    async fn sign_child_x509_svid(
        &self,
        lease_id: &str,
        spki: &[u8],
    ) -> Result<X509Svid, NodeError> {
        let r = self
            .client()
            .sign_child_x509_svid(pb::SignChildX509SvidRequest {
                lease_id: lease_id.to_owned(),
                public_key: spki.to_vec(),
            })
            .await
            .map_err(status)?
            .into_inner();
        svid_from_signed(r)
    }

    async fn sign_child_jwt_svid(
        &self,
        lease_id: &str,
        audience: &[String],
    ) -> Result<(String, i64, i64), NodeError> {
        let r = self
            .client()
            .sign_child_jwt_svid(pb::SignChildJwtSvidRequest {
                lease_id: lease_id.to_owned(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(status)?
            .into_inner();
        Ok((r.token, r.issued_at, r.expires_at))
    }
}

/// An X509-SVID (without its key) from a signing response, its leaf checked.
fn svid_from_signed(s: pb::SignedX509Svid) -> Result<X509Svid, NodeError> {
    let leaf = s
        .cert_chain
        .first()
        .ok_or_else(|| NodeError::Invalid("empty chain".into()))?;
    let checked =
        crate::svid::x509::check_leaf(leaf).map_err(|e| NodeError::Invalid(e.to_string()))?;
    Ok(X509Svid {
        spiffe_id: checked.spiffe_id,
        cert_chain: s.cert_chain,
        private_key: None,
        expires_at: checked.expires_at,
    })
}
