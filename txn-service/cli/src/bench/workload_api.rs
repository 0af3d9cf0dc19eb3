//! `writ bench workload-api`: SPIFFE Workload API calls to the agent over its Unix
//! socket, from `--clients` concurrent clients (one connection each), held against a
//! bound measured in the same run.
//!
//! The setup: a Writ stack ([`super::stack`]) under a temporary directory and one entry,
//! `spiffe://example.org/bench/caller`, for this uid. Every call is attested by the
//! agent's `unix` attestor from the socket's peer credentials, as for any workload.
//!
//! Cases (`--modes`), each a closed loop after a warm-up:
//!
//! - `x509`: `FetchX509SVID`, stream opened and its first message read (the X509-SVID
//!   and bundle the agent holds);
//! - `jwt-cached`: `FetchJWTSVID` for the same audience every time: the agent serves the
//!   token it cached (no signature);
//! - `jwt-bundles`: `FetchJWTBundles`, first message;
//! - `jwt-fresh`: `FetchJWTSVID` for a new audience every time: every call is a cache miss
//!   that the server signs (in this process, as `writ dev` and an agent beside its server
//!   do);
//! - `validate`: `ValidateJWTSVID` of a JWT-SVID: the agent verifies its signature.
//!
//! The bound: the agent caches X509-SVIDs, bundles and JWT-SVIDs, so `x509`,
//! `jwt-cached` and `jwt-bundles` do no cryptography per call; they are held against the
//! cheapest call on the same socket, the standard gRPC health check
//! (`grpc.health.v1.Health/Check`, not attested), with the same clients, measured just
//! before. `jwt-fresh` is held against a raw ES256 signature (aws-lc-rs, key parsed
//! once) on one core x the cores, `validate` against a raw ES256 verification likewise.
//! Every response is checked (the caller's SPIFFE ID, a token, the trust domain's
//! bundle); the first fresh JWT-SVID is validated by the agent.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use tonic::transport::Channel;
use writ_identity::proto::grpc::health::v1 as health;
use writ_identity::proto::workload as pb;
use writ_identity::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

use super::stack::{BenchStack, TRUST_DOMAIN};
use super::{Budget, Latency, Report, cores, process_cpu};

/// The caller's path.
const CALLER_PATH: &str = "/bench/caller";
/// The audience of `jwt-cached` and `validate`.
const AUDIENCE: &str = "bench-audience";
/// Most warm-up calls per case.
const WARM_UP: u64 = 200;

/// A case of the Workload API bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `FetchX509SVID`, first message of a new stream.
    X509,
    /// `FetchJWTSVID`, same audience (the agent's cache).
    JwtCached,
    /// `FetchJWTBundles`, first message of a new stream.
    JwtBundles,
    /// `FetchJWTSVID`, a new audience each call (signed by the server).
    JwtFresh,
    /// `ValidateJWTSVID` (one signature verification).
    Validate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::JwtCached => "jwt-cached",
            Self::JwtBundles => "jwt-bundles",
            Self::JwtFresh => "jwt-fresh",
            Self::Validate => "validate",
        }
    }
}

/// Options of `writ bench workload-api`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent clients, one connection to the agent's socket each.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub clients: u16,
    /// Cases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "x509,jwt-cached,jwt-bundles,jwt-fresh,validate"
    )]
    pub modes: Vec<Mode>,
}

/// Runs the Workload API bench.
///
/// # Errors
/// If the stack cannot start or a call fails or answers something unexpected.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    let clients = usize::from(args.clients.max(1));
    let mut modes = args.modes.clone();
    modes.dedup();
    anyhow::ensure!(!modes.is_empty(), "--modes: name at least one case");
    let stack = BenchStack::start().await?;
    let caller = stack.register(CALLER_PATH, &[]).await?.to_string();
    stack.wait_for_svids(1).await?;
    let mut channels = Vec::with_capacity(clients);
    for _ in 0..clients {
        channels.push(channel(stack.socket()).await?);
    }
    let caller = Arc::new(caller);
    // The token `jwt-cached` is served and `validate` verifies.
    let token = {
        let mut client =
            SpiffeWorkloadApiClient::new(channels.first().context("a client")?.clone());
        let svid = fetch_jwt(&mut client, AUDIENCE, &caller).await?;
        Arc::new(svid)
    };

    let mut reports = Vec::new();
    for mode in modes {
        let (bound_what, bound_rate) = match mode {
            Mode::X509 | Mode::JwtCached | Mode::JwtBundles => {
                let (done, wall, _, _) = closed_loop(&channels, budget, |ch, _| async move {
                    let response = health::health_client::HealthClient::new(ch)
                        .check(health::HealthCheckRequest::default())
                        .await?
                        .into_inner();
                    anyhow::ensure!(
                        response.status() == health::health_check_response::ServingStatus::Serving,
                        "the agent is not serving"
                    );
                    Ok(())
                })
                .await?;
                (
                    format!(
                        "gRPC health Check round trip on the same socket, {clients} clients \
                         (the agent serves this case from its cache: no crypto per call)"
                    ),
                    done as f64 / wall.as_secs_f64(),
                )
            }
            Mode::JwtFresh => {
                let per_core = raw_es256_sign(budget)?;
                (
                    format!(
                        "raw ES256 sign (aws-lc-rs, key parsed once) {per_core:.0}/s x {} cores",
                        cores()
                    ),
                    per_core * cores() as f64,
                )
            }
            Mode::Validate => {
                let per_core = raw_es256_verify(budget)?;
                (
                    format!(
                        "raw ES256 verify (aws-lc-rs) {per_core:.0}/s x {} cores",
                        cores()
                    ),
                    per_core * cores() as f64,
                )
            }
        };
        let (done, wall, samples, cpu) = match mode {
            Mode::X509 => {
                let caller = caller.clone();
                closed_loop(&channels, budget, move |ch, _| {
                    let caller = caller.clone();
                    async move {
                        let mut stream = SpiffeWorkloadApiClient::new(ch)
                            .fetch_x509svid(with_header(pb::X509svidRequest {}))
                            .await?
                            .into_inner();
                        let message = stream.message().await?.context("no X509-SVID message")?;
                        anyhow::ensure!(
                            message.svids.len() == 1
                                && message.svids.iter().all(|s| s.spiffe_id == *caller
                                    && !s.x509_svid.is_empty()
                                    && !s.bundle.is_empty()),
                            "unexpected X509-SVID response"
                        );
                        Ok(())
                    }
                })
                .await?
            }
            Mode::JwtCached => {
                let caller = caller.clone();
                closed_loop(&channels, budget, move |ch, _| {
                    let caller = caller.clone();
                    async move {
                        let mut client = SpiffeWorkloadApiClient::new(ch);
                        fetch_jwt(&mut client, AUDIENCE, &caller).await?;
                        Ok(())
                    }
                })
                .await?
            }
            Mode::JwtBundles => {
                closed_loop(&channels, budget, |ch, _| async move {
                    let mut stream = SpiffeWorkloadApiClient::new(ch)
                        .fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {}))
                        .await?
                        .into_inner();
                    let message = stream.message().await?.context("no JWT bundles message")?;
                    let td = format!("spiffe://{TRUST_DOMAIN}");
                    anyhow::ensure!(
                        message.bundles.get(&td).is_some_and(|b| !b.is_empty()),
                        "no JWT bundle for {td}"
                    );
                    Ok(())
                })
                .await?
            }
            Mode::JwtFresh => {
                let caller = caller.clone();
                // A distinct audience per call, across warm-up and timed calls.
                let serial = Arc::new(AtomicU64::new(0));
                let first = {
                    let mut client =
                        SpiffeWorkloadApiClient::new(channels.first().context("a client")?.clone());
                    let aud = "bench-fresh-first";
                    let svid = fetch_jwt(&mut client, aud, &caller).await?;
                    validate(&mut client, aud, &svid, &caller).await?;
                    svid
                };
                anyhow::ensure!(first != *token, "a fresh audience got the cached token");
                closed_loop(&channels, budget, move |ch, _| {
                    let caller = caller.clone();
                    let n = serial.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut client = SpiffeWorkloadApiClient::new(ch);
                        fetch_jwt(&mut client, &format!("bench-fresh-{n}"), &caller).await?;
                        Ok(())
                    }
                })
                .await?
            }
            Mode::Validate => {
                let caller = caller.clone();
                let token = token.clone();
                closed_loop(&channels, budget, move |ch, _| {
                    let caller = caller.clone();
                    let token = token.clone();
                    async move {
                        let mut client = SpiffeWorkloadApiClient::new(ch);
                        validate(&mut client, AUDIENCE, &token, &caller).await
                    }
                })
                .await?
            }
        };
        reports.push(
            Report::new("workload-api", mode.name())
                .clients(clients)
                .throughput(done, wall)
                .latency(Latency::of(samples))
                .cpu(cpu)
                .bound(bound_what, bound_rate)
                .note("one process: cpu_us_per_op is clients, agent and server together"),
        );
    }
    drop(stack);
    Ok(reports)
}

/// A gRPC channel (one HTTP/2 connection) to the agent's socket.
async fn channel(socket: PathBuf) -> anyhow::Result<Channel> {
    tonic::transport::Endpoint::from_static("http://agent.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting to the agent's socket")
}

/// `message` with the `workload.spiffe.io: true` security header.
fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// `FetchJWTSVID` for `audience`; checks one token for `caller`.
async fn fetch_jwt(
    client: &mut SpiffeWorkloadApiClient<Channel>,
    audience: &str,
    caller: &str,
) -> anyhow::Result<String> {
    let response = client
        .fetch_jwtsvid(with_header(pb::JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: String::new(),
        }))
        .await?
        .into_inner();
    match response.svids.as_slice() {
        [one] if one.spiffe_id == caller && one.svid.split('.').count() == 3 => {
            Ok(one.svid.clone())
        }
        _ => anyhow::bail!("unexpected JWT-SVID response for audience {audience}"),
    }
}

/// `ValidateJWTSVID`; checks that the agent names `caller`.
async fn validate(
    client: &mut SpiffeWorkloadApiClient<Channel>,
    audience: &str,
    token: &str,
    caller: &str,
) -> anyhow::Result<()> {
    let response = client
        .validate_jwtsvid(with_header(pb::ValidateJwtsvidRequest {
            audience: audience.to_owned(),
            svid: token.to_owned(),
        }))
        .await?
        .into_inner();
    anyhow::ensure!(
        response.spiffe_id == caller,
        "the agent validated the JWT-SVID as {}",
        response.spiffe_id
    );
    Ok(())
}

/// `op` by one task per channel, back to back, after a warm-up: until `budget.ops`
/// calls are done or `budget.time` has passed. Returns the calls, their wall time, their
/// latencies and this process's CPU time over them.
async fn closed_loop<F, Fut>(
    channels: &[Channel],
    budget: Budget,
    op: F,
) -> anyhow::Result<(u64, Duration, Vec<Duration>, Duration)>
where
    F: Fn(Channel, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let warm = Budget {
        ops: (budget.ops / 10).clamp(channels.len() as u64, WARM_UP.max(channels.len() as u64)),
        time: budget.time.min(Duration::from_secs(2)),
    };
    timed(channels, warm, op.clone()).await?;
    timed(channels, budget, op).await
}

async fn timed<F, Fut>(
    channels: &[Channel],
    budget: Budget,
    op: F,
) -> anyhow::Result<(u64, Duration, Vec<Duration>, Duration)>
where
    F: Fn(Channel, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(channels.len());
    for ch in channels {
        let (ch, next, op) = (ch.clone(), next.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= budget.ops || started.elapsed() >= budget.time {
                    return Ok::<_, anyhow::Error>(samples);
                }
                let t = Instant::now();
                op(ch.clone(), i)
                    .await
                    .with_context(|| format!("Workload API call {i}"))?;
                samples.push(t.elapsed());
            }
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.context("a client")??);
    }
    let wall = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    anyhow::ensure!(!samples.is_empty(), "no call was timed");
    Ok((samples.len() as u64, wall, samples, cpu))
}

/// Raw ES256 signatures per second on this thread (key parsed once).
fn raw_es256_sign(budget: Budget) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
    let input = signing_input();
    let budget = bound_budget(budget);
    let timed = super::time_loop(budget, |_| {
        key.sign(&rng, &input)
            .map(|_| ())
            .map_err(|_| anyhow::anyhow!("ES256 signature failed"))
    })?;
    Ok(timed.rate())
}

/// Raw ES256 verifications per second on this thread.
fn raw_es256_verify(budget: Budget) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
        .map_err(|_| anyhow::anyhow!("cannot generate a P-256 key"))?;
    let input = signing_input();
    let signature = key
        .sign(&rng, &input)
        .map_err(|_| anyhow::anyhow!("ES256 signature failed"))?;
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key().as_ref());
    let budget = bound_budget(budget);
    let timed = super::time_loop(budget, |_| {
        public
            .verify(&input, signature.as_ref())
            .map_err(|_| anyhow::anyhow!("ES256 verification failed"))
    })?;
    Ok(timed.rate())
}

/// The bound's own budget: at most 2000 operations or 2 s.
fn bound_budget(budget: Budget) -> Budget {
    Budget {
        ops: budget.ops.clamp(100, 2_000),
        time: budget.time.min(Duration::from_secs(2)),
    }
}

/// A JWT-SVID-sized signing input.
fn signing_input() -> Vec<u8> {
    let header = r#"{"alg":"ES256","kid":"k","typ":"JWT"}"#;
    let claims = format!(
        r#"{{"aud":["{AUDIENCE}"],"exp":2000000000,"iat":1700000000,"sub":"spiffe://{TRUST_DOMAIN}{CALLER_PATH}"}}"#
    );
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}", b64.encode(header), b64.encode(claims)).into_bytes()
}
