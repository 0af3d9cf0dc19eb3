//! `writ bench handshake`: new mTLS connections per second with Writ's TLS configs
//! against a plain rustls pair with the same certificates, in the same run.
//!
//! An in-process `writ dev` stack (temporary directory, every listener on 127.0.0.1:0)
//! issues two X509-SVIDs to this process through the agent's Workload API: a server
//! (`/bench/handshake/server`, also named `localhost`) and a client
//! (`/bench/handshake/client`). Two cases, alternated in rounds so that both see the
//! same machine:
//!
//! - `writ`: [`writ_sdk::tls::server_config`] and [`writ_sdk::tls::client_config`] from
//!   the two [`X509Source`]s, each side authorizing exactly the other's SPIFFE ID (the
//!   SPIFFE verifiers, the SVID resolvers, the current snapshot at every handshake);
//! - `rustls`: the bound, a plain rustls server and client with the same certificate
//!   chains and keys, trusting the trust domain's X.509 authorities through rustls'
//!   own webpki verifiers (the client checks the server's `localhost` DNS name).
//!
//! Both sides disable session resumption (as Writ does), so every connection is a full
//! TLS 1.3 handshake with client authentication. A connection is: TCP connect over
//! loopback, the handshake, one byte echoed (so the server has finished its side too),
//! close. [`cores`] client threads connect to as many server threads; the CPU figure is
//! the whole process (clients and servers). A failed handshake on either side aborts
//! the bench.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use writ_identity::entry::RegistrationEntry;
use writ_identity::selector::Selector;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::workload::X509Source;

use super::{Budget, Report, Totals, cores, process_cpu};
use crate::dev::{Dev, DevOptions};

/// Options of `writ bench handshake`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent client connections (default: the cores this process may use).
    #[arg(long)]
    pub clients: Option<usize>,
}

/// Rounds each case is split into, alternating the cases.
const ROUNDS: u32 = 3;
/// The ratio to the plain rustls pair that issue 20 asks of Writ's configs.
const TARGET: f64 = 0.8;
const SERVER_PATH: &str = "/bench/handshake/server";
const CLIENT_PATH: &str = "/bench/handshake/client";

/// One pair of TLS configs under test.
struct Pair {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Runs the Handshake bench: `writ` (with its ratio to the bound) and `rustls`.
///
/// # Errors
/// The stack does not start, an SVID is not issued, or a handshake fails.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut options = DevOptions::new(dir.path());
    options.tts_listen = ([127, 0, 0, 1], 0).into();
    let dev = Dev::start(options).await.context("in-process writ dev")?;
    let result = measure(&dev, args, budget).await;
    dev.shutdown().await;
    result
}

async fn measure(dev: &Dev, args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    let td = dev.server.config.trust_domain.clone();
    let server_id = td.spiffe_id(SERVER_PATH)?;
    let client_id = td.spiffe_id(CLIENT_PATH)?;
    register(dev, &server_id, &["localhost".to_owned()]).await?;
    register(dev, &client_id, &[]).await?;
    let source = |id: &SpiffeId| {
        X509Source::builder()
            .endpoint(dev.state.workload_api.clone())
            .spiffe_id(id.clone())
            .wait(Duration::from_secs(20))
            .build()
    };
    let server_source = source(&server_id).await.context("server X509-SVID")?;
    let client_source = source(&client_id).await.context("client X509-SVID")?;

    let writ = Pair {
        server: Arc::new(tls::server_config(
            &server_source,
            Authorizer::id(client_id.clone()),
        )?),
        client: Arc::new(tls::client_config(
            &client_source,
            Authorizer::id(server_id.clone()),
        )?),
    };
    let plain = plain_pair(&server_source, &client_source)?;

    let clients = args.clients.unwrap_or_else(cores).max(1);
    let round = Budget {
        ops: budget.ops.div_ceil(u64::from(ROUNDS)).max(1),
        time: budget.time / ROUNDS,
    };
    let mut totals = [Totals::default(), Totals::default()];
    for _ in 0..ROUNDS {
        for (pair, total) in [&writ, &plain].into_iter().zip(totals.iter_mut()) {
            let server = pair.server.clone();
            let client = pair.client.clone();
            let done =
                tokio::task::spawn_blocking(move || handshakes(server, client, clients, round))
                    .await??;
            total.add(done);
        }
    }
    let [writ_total, plain_total] = totals;
    let bound = plain_total.rate();
    let plain_report = plain_total
        .report("handshake", "rustls")
        .clients(clients)
        .note("plain rustls + webpki verifiers, same certificates: the bound");
    let writ_report = writ_total
        .report("handshake", "writ")
        .clients(clients)
        .bound("plain rustls handshakes, same run", bound)
        .target(TARGET)
        .note("writ_sdk::tls configs from X509Sources, SPIFFE ID authorization");
    Ok(vec![writ_report, plain_report])
}

/// Registers `id` for this process's uid under the dev agent.
async fn register(dev: &Dev, id: &SpiffeId, dns_names: &[String]) -> anyhow::Result<()> {
    let uid = rustix::process::getuid().as_raw();
    let selector: Selector = format!("unix:uid:{uid}").parse()?;
    let agent: SpiffeId = dev.state.agent_id.parse()?;
    let mut entry = RegistrationEntry::new(id.clone(), agent, vec![selector]);
    entry.dns_names = dns_names.to_vec();
    entry.created_at = dev.server.clock.unix_seconds();
    entry.validate(&dev.server.config.trust_domain)?;
    dev.server.store.create_entry(&entry).await?;
    dev.server.notify_change();
    Ok(())
}

/// rustls' own configs over the same SVIDs: webpki verifiers trusting the bundle's
/// X.509 authorities, no resumption, the same ALPN list as Writ's.
fn plain_pair(server: &X509Source, client: &X509Source) -> anyhow::Result<Pair> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_snapshot = server.snapshot();
    let mut roots = RootCertStore::empty();
    let bundle = server_snapshot
        .bundles
        .get(&server_snapshot.svid.spiffe_id.trust_domain())
        .context("no bundle for the trust domain")?;
    for authority in bundle.x509_authorities() {
        roots.add(CertificateDer::from(authority.clone()))?;
    }
    let roots = Arc::new(roots);
    let identity = |source: &X509Source| -> anyhow::Result<_> {
        let svid = source.svid();
        let key = svid.private_key.as_ref().context("SVID without a key")?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        Ok((chain, key))
    };
    let (chain, key) = identity(server)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()?;
    let mut server_config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_config.send_tls13_tickets = 0;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (chain, key) = identity(client)?;
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()?;
    let mut client_config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    client_config.resumption = rustls::client::Resumption::disabled();
    client_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Pair {
        server: Arc::new(server_config),
        client: Arc::new(client_config),
    })
}

/// `clients` threads opening connections to as many server threads until `budget`
/// (operations over all clients, or time) is spent.
fn handshakes(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    clients: usize,
    budget: Budget,
) -> anyhow::Result<Totals> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let servers: Vec<_> = (0..clients)
        .map(|_| {
            let listener = listener.try_clone()?;
            let (server, stop, failure) = (server.clone(), stop.clone(), failure.clone());
            Ok(std::thread::spawn(move || {
                serve(&listener, &server, &stop, &failure);
            }))
        })
        .collect::<std::io::Result<_>>()?;

    // Warm-up: a few connections per client, not counted.
    for _ in 0..clients * 2 {
        connect(addr, &client).context("warm-up handshake")?;
    }
    let started = AtomicU64::new(0);
    let cpu = process_cpu();
    let start = Instant::now();
    let per_client: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (client, started) = (&client, &started);
                scope.spawn(move || {
                    let mut samples = Vec::new();
                    while started.fetch_add(1, Ordering::Relaxed) < budget.ops
                        && start.elapsed() < budget.time
                    {
                        let t = Instant::now();
                        connect(addr, client)?;
                        samples.push(t.elapsed());
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a client thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu);

    stop.store(true, Ordering::SeqCst);
    for _ in &servers {
        // Wakes each server thread from accept; it sees `stop` and returns.
        let _ = TcpStream::connect(addr);
    }
    for handle in servers {
        let _ = handle.join();
    }
    if let Some(why) = failure.lock().ok().and_then(|mut f| f.take()) {
        anyhow::bail!("server handshake failed: {why}");
    }
    let mut samples = Vec::new();
    for client in per_client {
        samples.extend(client?);
    }
    Ok(Totals {
        ops: samples.len() as u64,
        elapsed,
        cpu,
        samples,
    })
}

/// Accepts connections until `stop`: handshake, echo one byte, close. The first failure
/// is kept for the bench to report.
fn serve(
    listener: &TcpListener,
    config: &Arc<ServerConfig>,
    stop: &AtomicBool,
    failure: &std::sync::Mutex<Option<String>>,
) {
    while let Ok((tcp, _)) = listener.accept() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = echo_one(tcp, config)
            && let Ok(mut f) = failure.lock()
        {
            f.get_or_insert(e.to_string());
        }
    }
}

fn echo_one(tcp: TcpStream, config: &Arc<ServerConfig>) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let conn = ServerConnection::new(config.clone())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte)?;
    tls.write_all(&byte)?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    Ok(())
}

/// One new connection: handshake, one byte sent and echoed back.
fn connect(addr: std::net::SocketAddr, config: &Arc<ClientConfig>) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    let conn = ClientConnection::new(config.clone(), ServerName::try_from("localhost")?)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(&[0x5a])?;
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).context("handshake or echo")?;
    anyhow::ensure!(byte == [0x5a], "the server echoed {byte:?}");
    Ok(())
}
