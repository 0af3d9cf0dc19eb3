//! `writ bench overload`: the token service at ten times its peak offered load.
//!
//! The setup, all in this process and on loopback: `writ dev` on a temporary data dir
//! (identity server, agent, development issuer) and a second token service started
//! beside it with the bench's `[overload]` and `[connections]` limits (the per-address
//! connection cap raised above `--connections`, since every client connection comes from
//! 127.0.0.1); its audit log is a file in the temporary dir. The caller is this process's
//! own X509-SVID (the dev policy lets any workload of the trust domain exchange), the
//! subject tokens are access tokens of the development issuer, minted before the clock
//! starts (a pool of [`TOKENS`], so the subject token cache mostly hits). Every request is
//! a real RFC 8693 exchange over keep-alive mTLS (HTTP/1.1, one request in flight per
//! connection); one that fails with anything but 503 `temporarily_unavailable` (shed) or
//! 429 (rate limited) aborts the bench.
//!
//! Three cases, one [`Report`] each:
//! - `peak`: a closed loop of `--clients` clients (default the service's
//!   `max_in_flight`, so nothing queues): the peak rate, the bound of the other two;
//! - `0.5x`: an open loop offering half the peak (not shed: its p99 is the service's
//!   latency below saturation);
//! - `10x` (`--factor`): an open loop offering ten times the peak for `--duration`, on up
//!   to `--connections` connections: the admitted rate (`ops`, ratio = admitted / peak),
//!   the latency of admitted exchanges (issue 20: p99 under 20 ms), the refused count
//!   (503 + 429) and the resident memory before, after and at its high-water mark. An
//!   arrival that finds every connection busy is not sent (counted as `client cap` in
//!   the note): the client's own limit, not the service's. The note also holds every
//!   answer (admitted or shed) against Little's law: with a request outstanding on each
//!   connection, the mean answer takes `connections / answer rate`, whatever is admitted.
//!
//! `--wire` sends with the bench's lean HTTP/1.1 client ([`super::wire`]) instead of the
//! SDK's `TxnClient` (the report's `client` says which).
//!
//! `--separate-process` runs the clients in a second `writ` process (this executable,
//! `writ bench overload --generator`, told the service's address and the subject tokens
//! on its standard input, one JSON line per run back): the service then has its own
//! runtime, CPU accounting (`cpu_us_per_op` is the serving process's) and memory
//! figures, as a token service under a real storm does; the clients' CPU per request is
//! in the note.
//!
//! Latencies are from the moment a request's task starts sending to its response.
//! `--requests` bounds the requests sent in the closed loop and the `0.5x` case, and
//! ten times that in the `10x` case; `--duration` bounds the `10x` case (the other two
//! run at most 5 s).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use writ_identity::clock::{Clock as _, SystemClock};
use writ_identity::entry::RegistrationEntry;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{ExchangeError, TxnClient, TxnRequest};
use writ_sdk::workload::X509Source;
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::IssuerConfig;
use writ_txn_service::policy::Policy;

use serde::{Deserialize, Serialize};

use super::generator::{self, Generator};
use super::wire::{Answer, Wire};
use super::{Budget, Latency, Report, process_cpu};
use crate::dev::{Dev, DevOptions};

/// Distinct subject tokens minted before the run.
pub const TOKENS: usize = 256;
/// Longest run of the `peak` and `0.5x` cases.
const SHORT_CASE: Duration = Duration::from_secs(5);
/// The scope asked for (the dev policy grants it).
const SCOPE: &str = "orders.read";
/// Issue 20's bound on the p99 of admitted exchanges under overload.
const P99_TARGET: Duration = Duration::from_millis(20);
/// Ceiling of the `connections / answer rate` figure (a run with almost no answer).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Options of `writ bench overload`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Clients of the closed loop that measures the peak (default: the service's
    /// `max_in_flight`).
    #[arg(long)]
    clients: Option<usize>,
    /// The overload case offers this many times the peak.
    #[arg(long, default_value_t = 10.0)]
    factor: f64,
    /// Most connections (requests outstanding) of the open loops.
    #[arg(long, default_value_t = 512)]
    connections: usize,
    /// The service's `[overload] max_in_flight` (default: its own, 4 x cores).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// The service's `[overload] max_queue` (default: its own, 32 x `max_in_flight`).
    #[arg(long)]
    max_queue: Option<usize>,
    /// Run the clients in a second process: the service's CPU, memory and scheduling
    /// are then its own, and the clients' runtime does not delay its tasks.
    #[arg(long)]
    separate_process: bool,
    /// Send over HTTP/2: the open loops' requests share one connection as streams
    /// (at most the service's 200 concurrent streams; `--connections` still caps the
    /// requests outstanding).
    #[arg(long, conflicts_with = "wire")]
    http2: bool,
    /// Send with the bench's lean HTTP/1.1 client instead of the SDK's `TxnClient`
    /// (about a third of the CPU per request: more of the machine is left to the
    /// service, and more load can be offered).
    #[arg(long)]
    wire: bool,
    /// Internal: be the load generator of `--separate-process` (requests on standard
    /// input).
    #[arg(long, hide = true)]
    generator: bool,
}

/// What one request came to.
enum Outcome {
    Admitted(Duration),
    Shed(Duration),
    RateLimited,
}

async fn exchange_once(client: &TxnClient, token: &str) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let result = client
        .exchange(TxnRequest::access_token(token).scope(SCOPE))
        .await;
    let took = started.elapsed();
    match result {
        Ok(issued) if !issued.access_token.is_empty() => Ok(Outcome::Admitted(took)),
        Ok(_) => anyhow::bail!("an exchange returned an empty token"),
        Err(ExchangeError::Refused {
            status: 503, code, ..
        }) if code == "temporarily_unavailable" => Ok(Outcome::Shed(took)),
        Err(ExchangeError::Refused { status: 429, .. }) => Ok(Outcome::RateLimited),
        Err(e) => Err(e).context("exchange"),
    }
}

async fn wire_once(wire: &Wire, i: usize) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let answer = wire.exchange(i).await?;
    let took = started.elapsed();
    Ok(match answer {
        Answer::Granted => Outcome::Admitted(took),
        Answer::Shed => Outcome::Shed(took),
        Answer::RateLimited => Outcome::RateLimited,
    })
}

/// Counts of one case.
#[derive(Default, Serialize, Deserialize)]
struct Tally {
    admitted: Vec<Duration>,
    shed: Vec<Duration>,
    rate_limited: u64,
    /// Open loop: arrivals not sent because every connection was busy.
    client_cap: u64,
    sent: u64,
    /// Wall time of the run.
    elapsed: Duration,
    /// CPU time of the process that ran the clients, over the run.
    clients_cpu: Duration,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Admitted(d) => self.admitted.push(d),
            Outcome::Shed(d) => self.shed.push(d),
            Outcome::RateLimited => self.rate_limited += 1,
        }
    }

    fn refused(&self) -> u64 {
        self.shed.len() as u64 + self.rate_limited
    }

    fn merge(&mut self, other: Self) {
        self.admitted.extend(other.admitted);
        self.shed.extend(other.shed);
        self.rate_limited += other.rate_limited;
        self.client_cap += other.client_cap;
        self.sent += other.sent;
    }
}

/// The clients' side: one [`TxnClient`] (its pool opens a connection per outstanding
/// request and keeps it) and the subject tokens, used in turn; with `--wire`, the lean
/// client sends instead.
#[derive(Clone)]
struct Load {
    client: Arc<TxnClient>,
    tokens: Arc<Vec<String>>,
    wire: Option<Arc<Wire>>,
}

/// One run of the clients.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Run {
    /// `clients` clients exchanging back to back until `ops` are done or `time` passed.
    Closed {
        clients: usize,
        ops: u64,
        time: Duration,
    },
    /// `rate` arrivals per second for `time` (at most `ops`), on at most `connections`
    /// requests outstanding.
    Open {
        rate: f64,
        connections: usize,
        ops: u64,
        time: Duration,
    },
}

impl Load {
    fn new(source: &X509Source, spec: &Spec, tokens: Vec<String>) -> anyhow::Result<Self> {
        let tts_id = SpiffeId::new(&spec.tts_id)?;
        let client = txn_client(source, &spec.url, tts_id.clone(), spec.http2)?;
        let wire = if spec.wire {
            Some(Wire::new(
                source, &client, &spec.url, tts_id, &tokens, SCOPE,
            )?)
        } else {
            None
        };
        Ok(Self {
            client: Arc::new(client),
            tokens: Arc::new(tokens),
            wire,
        })
    }

    /// One exchange of subject token `i` (modulo their number).
    async fn once(&self, i: usize) -> anyhow::Result<Outcome> {
        if let Some(wire) = &self.wire {
            return wire_once(wire, i).await;
        }
        let token = self
            .tokens
            .get(i % self.tokens.len().max(1))
            .map_or("", String::as_str);
        exchange_once(&self.client, token).await
    }

    async fn run(&self, run: Run) -> anyhow::Result<Tally> {
        let cpu = process_cpu();
        let mut tally = match run {
            Run::Closed { clients, ops, time } => self.closed_loop(clients, ops, time).await?,
            Run::Open {
                rate,
                connections,
                ops,
                time,
            } => self.open_loop(rate, connections, ops, time).await?,
        };
        tally.clients_cpu = process_cpu().saturating_sub(cpu);
        Ok(tally)
    }
}

/// Where the clients run: in this process, or in a generator process.
enum Clients {
    Here(Load),
    Separate(Box<Generator>),
}

impl Clients {
    /// Runs `run`; returns its tally and the CPU time this (serving) process spent.
    async fn run(&mut self, run: Run) -> anyhow::Result<(Tally, Duration)> {
        let cpu = process_cpu();
        let tally = match self {
            Self::Here(load) => load.run(run).await?,
            Self::Separate(child) => {
                child.send(&serde_json::to_string(&run)?).await?;
                let longest = match run {
                    Run::Closed { time, .. } | Run::Open { time, .. } => time,
                };
                let line = child.receive(longest + generator::READY).await?;
                serde_json::from_str(&line).context("the load generator's tally")?
            }
        };
        Ok((tally, process_cpu().saturating_sub(cpu)))
    }
}

/// What the serving process tells a generator process: how to reach the service.
#[derive(Serialize, Deserialize)]
struct Spec {
    workload_api: String,
    caller_id: String,
    tts_id: String,
    url: String,
    tokens: Vec<String>,
    http2: bool,
    wire: bool,
}

/// What a generator prints once its client is built.
const GENERATOR_READY: &str = "ready";
/// Largest line a generator reads (the spec with its tokens).
const MAX_LINE_BYTES: u64 = 16 * 1024 * 1024;

/// `writ bench overload --generator`: reads a [`Spec`], builds the client, prints
/// `ready`, then runs each [`Run`] line it reads and prints its [`Tally`], until its
/// input ends.
async fn generator_process() -> anyhow::Result<()> {
    let line = generator::read_line(MAX_LINE_BYTES)
        .await?
        .context("no spec on standard input")?;
    let mut spec: Spec = serde_json::from_str(&line).context("the generator's spec")?;
    let source = caller_source(&spec.workload_api, &SpiffeId::new(&spec.caller_id)?).await?;
    let tokens = std::mem::take(&mut spec.tokens);
    let load = Load::new(&source, &spec, tokens)?;
    generator::say(GENERATOR_READY)?;
    while let Some(line) = generator::read_line(MAX_LINE_BYTES).await? {
        let run: Run = serde_json::from_str(&line).context("a run")?;
        let tally = load.run(run).await?;
        generator::say(&serde_json::to_string(&tally)?)?;
    }
    Ok(())
}

/// Resident memory of this process now and at its high-water mark, in KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The clients' SPIFFE ID (the dev policy lets any workload of the trust domain
/// exchange), registered for this uid so that a generator process this one starts
/// holds it too.
const CALLER_PATH: &str = "/bench/overload-client";

async fn register_caller(dev: &Dev) -> anyhow::Result<SpiffeId> {
    let td = dev.server.config.trust_domain.clone();
    let uid = crate::dev::current_uid().context("this process's uid")?;
    let id = td.spiffe_id(CALLER_PATH)?;
    let mut entry = RegistrationEntry::new(
        id.clone(),
        SpiffeId::new(&dev.state.agent_id)?,
        vec![format!("unix:uid:{uid}").parse()?],
    );
    entry.validate(&td)?;
    entry.created_at = SystemClock.unix_seconds();
    dev.server
        .store
        .create_entry(&entry)
        .await
        .context("the clients' registration entry")?;
    dev.server.notify_change();
    Ok(id)
}

/// The X509-SVID of `id` from the Workload API, once the agent holds it (at most
/// [`generator::READY`]).
async fn caller_source(workload_api: &str, id: &SpiffeId) -> anyhow::Result<X509Source> {
    let deadline = Instant::now() + generator::READY;
    loop {
        match X509Source::builder()
            .endpoint(workload_api.to_owned())
            .spiffe_id(id.clone())
            .build()
            .await
        {
            Ok(source) => return Ok(source),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("the X509-SVID of {id}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn txn_client(
    source: &X509Source,
    url: &str,
    tts_id: SpiffeId,
    http2: bool,
) -> Result<TxnClient, ExchangeError> {
    let builder = TxnClient::builder(source, url);
    if http2 {
        builder.http2().tts_id(tts_id)
    } else {
        builder.tts_id(tts_id)
    }
}

struct Setup {
    dev: Dev,
    tts: TxnServer,
    load: Load,
    spec: Spec,
    max_in_flight: usize,
    _source: X509Source,
}

async fn setup(args: &Args, dir: &Path) -> anyhow::Result<Setup> {
    let mut options = DevOptions::new(dir.join("dev"));
    options.tts_listen = ([127, 0, 0, 1], 0).into();
    let dev = Dev::start(options).await.context("writ dev")?;
    let tts_id = SpiffeId::new(&dev.state.tts_id).context("the token service's SPIFFE ID")?;

    let mut toml = format!(
        "[connections]\nmax_connections_per_ip = {}\nmax_pending_handshakes = {}\n[overload]\n",
        args.connections + 64,
        args.connections.max(256)
    );
    if let Some(n) = args.max_in_flight {
        toml.push_str(&format!("max_in_flight = {n}\n"));
    }
    if let Some(n) = args.max_queue {
        toml.push_str(&format!("max_queue = {n}\n"));
    }
    let mut config = TxnConfig::from_toml(&toml, dir).context("the bench's txn.toml")?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = tcp.local_addr()?;
    config.listen = addr;
    config.issuer = format!("https://{addr}");
    config.workload_api = dev.state.workload_api.clone();
    config.spiffe_id = Some(tts_id.clone());
    config.data_dir = None;
    config.audit_log = Some(dir.join("audit.log"));
    config.oidc = vec![IssuerConfig::new(
        dev.state.oidc_issuer.clone(),
        [dev.state.oidc_audience.clone()],
    )];
    config.accept_dev_tokens = true;
    let policy = std::fs::read_to_string(&dev.state.policy_file)?;
    config.policy = Policy::from_toml(&policy).context("the dev policy")?;
    let max_in_flight = config.overload.max_in_flight;
    let tts = TxnServer::start_on(config, Arc::new(SystemClock), tcp)
        .await
        .context("the bench's token service")?;

    let caller_id = register_caller(&dev).await?;
    let source = caller_source(&dev.state.workload_api, &caller_id).await?;
    let now = SystemClock.unix_seconds();
    let tokens = (0..TOKENS)
        .map(|i| {
            dev.issuer()
                .access_token(
                    &format!("bench-user-{i}"),
                    SCOPE,
                    Duration::from_secs(3600),
                    now,
                )
                .context("a subject token")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = Spec {
        workload_api: dev.state.workload_api.clone(),
        caller_id: caller_id.to_string(),
        tts_id: tts_id.to_string(),
        url: format!("https://{addr}"),
        tokens: tokens.clone(),
        http2: args.http2,
        wire: args.wire,
    };
    Ok(Setup {
        dev,
        tts,
        load: Load::new(&source, &spec, tokens)?,
        spec,
        max_in_flight,
        _source: source,
    })
}

impl Load {
    /// `clients` clients each exchanging back to back until `ops` are done or `time`
    /// passed.
    async fn closed_loop(&self, clients: usize, ops: u64, time: Duration) -> anyhow::Result<Tally> {
        let started = Instant::now();
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for c in 0..clients {
            let (load, done) = (self.clone(), done.clone());
            tasks.spawn(async move {
                let mut tally = Tally::default();
                let mut i = c;
                while started.elapsed() < time
                    && done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < ops
                {
                    tally.add(load.once(i).await?);
                    tally.sent += 1;
                    i += clients;
                }
                anyhow::Ok(tally)
            });
        }
        let mut total = Tally::default();
        while let Some(result) = tasks.join_next().await {
            total.merge(result??);
        }
        total.elapsed = started.elapsed();
        Ok(total)
    }

    /// Offers `rate` requests per second for `time` (sending at most `max_sends`) on at most
    /// `connections` requests outstanding.
    async fn open_loop(
        &self,
        rate: f64,
        connections: usize,
        max_sends: u64,
        time: Duration,
    ) -> anyhow::Result<Tally> {
        let slots = Arc::new(Semaphore::new(connections));
        let mut tasks = JoinSet::new();
        let mut tally = Tally::default();
        let mut arrivals: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let started = Instant::now();
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if elapsed >= time || tally.sent >= max_sends {
                break;
            }
            // Arrivals the client cap turns away cost nothing: `max_sends` bounds the
            // requests sent, and `time` the run.
            let due = (elapsed.as_secs_f64() * rate) as u64;
            while arrivals < due && tally.sent < max_sends {
                arrivals += 1;
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tally.client_cap += 1;
                    continue;
                };
                let load = self.clone();
                let i = usize::try_from(arrivals).unwrap_or(0);
                tally.sent += 1;
                tasks.spawn(async move {
                    let outcome = load.once(i).await;
                    drop(slot);
                    outcome
                });
            }
            while let Some(result) = tasks.try_join_next() {
                tally.add(result??);
            }
        }
        while let Some(result) = tasks.join_next().await {
            tally.add(result??);
        }
        tally.elapsed = started.elapsed();
        Ok(tally)
    }
}

/// Every timed answer of a run (admitted or shed) against Little's law: while each of
/// `connections` holds a request outstanding, an answer takes `connections / rate` on
/// average, however the service chooses what to admit; the wait is in its sockets.
struct Answers {
    rate: f64,
    mean: Duration,
    little: Duration,
}

impl Answers {
    fn of(tally: &Tally, connections: usize) -> Self {
        let all = || tally.admitted.iter().chain(&tally.shed);
        let count = all().count();
        let total: Duration = all().sum();
        let rate = count as f64 / tally.elapsed.as_secs_f64().max(1e-9);
        Self {
            rate,
            mean: total / u32::try_from(count.max(1)).unwrap_or(u32::MAX),
            little: Duration::from_secs_f64(connections as f64 / rate.max(1e-9)).min(MAX_WAIT),
        }
    }
}

impl std::fmt::Display for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "every answer {:.0}/s, mean {:.1} ms (connections / answer rate: {:.1} ms)",
            self.rate,
            self.mean.as_secs_f64() * 1e3,
            self.little.as_secs_f64() * 1e3
        )
    }
}

fn report(mode: &str, clients: usize, tally: &Tally, serving_cpu: Duration, args: &Args) -> Report {
    Report::new("overload", mode)
        .http_version(args.http2)
        .generator(args.wire)
        .clients(clients)
        .throughput(tally.admitted.len() as u64, tally.elapsed)
        .latency(Latency::of(tally.admitted.clone()))
        .cpu(serving_cpu)
        .refused(tally.refused())
}

/// Runs the overload bench: `peak`, `0.5x` and `10x`.
///
/// # Errors
/// A setup step that fails, or an exchange that fails with anything but a shed (503) or
/// rate-limited (429) refusal.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    if args.generator {
        generator_process().await?;
        return Ok(Vec::new());
    }
    anyhow::ensure!(
        args.factor.is_finite() && args.factor >= 1.0 && args.factor <= 1000.0,
        "--factor must be 1 to 1000"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.connections),
        "--connections must be 1 to 10000"
    );
    let dir = tempfile::tempdir()?;
    let s = setup(args, dir.path()).await?;
    let clients = args.clients.unwrap_or(s.max_in_flight).clamp(1, 10_000);
    let mut load = if args.separate_process {
        let mut child = Generator::spawn("overload")?;
        child.send(&serde_json::to_string(&s.spec)?).await?;
        let ready = child.receive(generator::READY).await?;
        anyhow::ensure!(ready == GENERATOR_READY, "the load generator did not start");
        Clients::Separate(Box::new(child))
    } else {
        Clients::Here(s.load.clone())
    };
    let where_ = if args.separate_process {
        "clients in a separate process (cpu_us_per_op is the serving process's)"
    } else {
        "clients in this process"
    };

    // Warm-up: every connection of the open loops opened, the JWKS and caches filled.
    let warm = args
        .connections
        .min(usize::try_from(budget.ops).unwrap_or(usize::MAX));
    load.run(Run::Open {
        rate: 1e9,
        connections: args.connections,
        ops: warm as u64,
        time: SHORT_CASE,
    })
    .await?;
    load.run(Run::Closed {
        clients,
        ops: (clients * 20) as u64,
        time: SHORT_CASE,
    })
    .await?;

    let (peak, cpu) = load
        .run(Run::Closed {
            clients,
            ops: budget.ops,
            time: budget.time.min(SHORT_CASE),
        })
        .await?;
    let peak_report = report("peak", clients, &peak, cpu, args).note(format!(
        "closed loop, the bound of the open loops; {where_}"
    ));
    let peak_rate = peak_report.ops_per_s;
    anyhow::ensure!(peak_rate > 0.0, "no exchange completed in the closed loop");
    let bound = format!("peak closed loop, {clients} clients, same run");

    let rate = peak_rate * 0.5;
    let (half, cpu) = load
        .run(Run::Open {
            rate,
            connections: args.connections,
            ops: budget.ops,
            time: budget.time.min(SHORT_CASE),
        })
        .await?;
    let half_report = report("0.5x", args.connections, &half, cpu, args)
        .bound(&bound, peak_rate)
        .note(format!(
            "open loop offering {rate:.0}/s (sent {:.0}/s), client cap {}",
            half.sent as f64 / half.elapsed.as_secs_f64(),
            half.client_cap
        ));

    let rate = peak_rate * args.factor;
    let (rss_before, _) = memory();
    let (over, cpu) = load
        .run(Run::Open {
            rate,
            connections: args.connections,
            ops: budget.ops.saturating_mul(10),
            time: budget.time,
        })
        .await?;
    let (rss_after, hwm) = memory();
    let latency = Latency::of(over.admitted.clone());
    let verdict = if latency.p99 < P99_TARGET {
        "meets"
    } else {
        "MISSES"
    };
    let shed_latency = Latency::of(over.shed.clone());
    let seconds = over.elapsed.as_secs_f64();
    let answers = Answers::of(&over, args.connections);
    let over_report = report(
        &format!("{}x", args.factor),
        args.connections,
        &over,
        cpu,
        args,
    )
    .bound(&bound, peak_rate)
    .note(format!(
        "open loop offering {rate:.0}/s (sent {:.0}/s, refused {:.0}/s); admitted p99 {verdict} \
             the 20 ms target; shed 503 {} (p50 {:.2} ms, p99 {:.2} ms), 429 {}, client cap \
             {}; {answers}; serving process RSS {:.1} -> {:.1} MiB, high-water {:.1} MiB; \
             clients' CPU {:.1} µs per request sent; {where_}",
        over.sent as f64 / seconds,
        over.refused() as f64 / seconds,
        over.shed.len(),
        shed_latency.p50.as_secs_f64() * 1e3,
        shed_latency.p99.as_secs_f64() * 1e3,
        over.rate_limited,
        over.client_cap,
        mib(rss_before),
        mib(rss_after),
        mib(hwm),
        over.clients_cpu.as_secs_f64() * 1e6 / over.sent.max(1) as f64,
    ));
    if let Clients::Separate(child) = load {
        child.finish().await?;
    }

    // After the storm: the service still serves, and recorded each admitted exchange.
    let after = s.load.closed_loop(1, 1, SHORT_CASE).await?;
    anyhow::ensure!(
        after.admitted.len() == 1,
        "the service did not serve after the overload"
    );
    let admitted = peak.admitted.len() + half.admitted.len() + over.admitted.len() + 1;
    s.tts
        .shutdown()
        .await
        .context("the bench's token service")?;
    let log = std::fs::read_to_string(dir.path().join("audit.log"))?;
    let granted = log.matches("\"decision\":\"granted\"").count();
    anyhow::ensure!(
        granted >= admitted,
        "the audit log has {granted} grants for at least {admitted} admitted exchanges"
    );
    s.dev.shutdown().await;
    Ok(vec![peak_report, half_report, over_report])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_held_to_littles_law() {
        let tally = Tally {
            admitted: vec![Duration::from_millis(30); 300],
            shed: vec![Duration::from_millis(10); 100],
            rate_limited: 7,
            elapsed: Duration::from_secs(2),
            ..Tally::default()
        };
        let answers = Answers::of(&tally, 10);
        // 400 timed answers in 2 s; 429s carry no latency and are left out.
        assert!((answers.rate - 200.0).abs() < 1e-9);
        assert_eq!(answers.mean, Duration::from_millis(25));
        assert_eq!(answers.little, Duration::from_millis(50));
        assert_eq!(
            answers.to_string(),
            "every answer 200/s, mean 25.0 ms (connections / answer rate: 50.0 ms)"
        );
        // A run without an answer reports zeros and the ceiling, not a division by zero.
        let none = Answers::of(&Tally::default(), 512);
        assert_eq!(
            (none.rate, none.mean, none.little),
            (0.0, Duration::ZERO, MAX_WAIT)
        );
    }
}
