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
//!   the note): the client's own limit, not the service's.
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
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{ExchangeError, TxnClient, TxnRequest};
use writ_sdk::workload::X509Source;
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::IssuerConfig;
use writ_txn_service::policy::Policy;

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
    /// The service's `[overload] max_queue` (default: its own, `max_in_flight`).
    #[arg(long)]
    max_queue: Option<usize>,
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

/// Counts of one case.
#[derive(Default)]
struct Tally {
    admitted: Vec<Duration>,
    shed: Vec<Duration>,
    rate_limited: u64,
    /// Open loop: arrivals not sent because every connection was busy.
    client_cap: u64,
    sent: u64,
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

struct Setup {
    dev: Dev,
    tts: TxnServer,
    client: Arc<TxnClient>,
    tokens: Arc<Vec<String>>,
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

    let source = X509Source::builder()
        .endpoint(dev.state.workload_api.clone())
        .spiffe_id(tts_id.clone())
        .build()
        .await
        .context("this process's X509-SVID")?;
    let client = Arc::new(TxnClient::new(&source, &format!("https://{addr}"), tts_id)?);
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
    Ok(Setup {
        dev,
        tts,
        client,
        tokens: Arc::new(tokens),
        max_in_flight,
        _source: source,
    })
}

/// `clients` clients each exchanging back to back until `ops` are done or `time` passed.
async fn closed_loop(
    s: &Setup,
    clients: usize,
    ops: u64,
    time: Duration,
) -> anyhow::Result<(Tally, Duration)> {
    let started = Instant::now();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for c in 0..clients {
        let (client, tokens, done) = (s.client.clone(), s.tokens.clone(), done.clone());
        tasks.spawn(async move {
            let mut tally = Tally::default();
            let mut i = c;
            while started.elapsed() < time
                && done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < ops
            {
                let token = tokens.get(i % tokens.len()).map_or("", String::as_str);
                tally.add(exchange_once(&client, token).await?);
                tally.sent += 1;
                i += clients;
            }
            anyhow::Ok(tally)
        });
    }
    let mut total = Tally::default();
    while let Some(result) = tasks.join_next().await {
        let tally = result??;
        total.admitted.extend(tally.admitted);
        total.shed.extend(tally.shed);
        total.rate_limited += tally.rate_limited;
        total.sent += tally.sent;
    }
    Ok((total, started.elapsed()))
}

/// Offers `rate` requests per second for `time` (at most `max_sends`) on at most
/// `connections` requests outstanding.
async fn open_loop(
    s: &Setup,
    rate: f64,
    connections: usize,
    max_sends: u64,
    time: Duration,
) -> anyhow::Result<(Tally, Duration)> {
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
        if elapsed >= time || arrivals >= max_sends {
            break;
        }
        let due = ((elapsed.as_secs_f64() * rate) as u64).min(max_sends);
        while arrivals < due {
            arrivals += 1;
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tally.client_cap += 1;
                continue;
            };
            let client = s.client.clone();
            let tokens = s.tokens.clone();
            let i = usize::try_from(arrivals).unwrap_or(0) % tokens.len();
            tally.sent += 1;
            tasks.spawn(async move {
                let token = tokens.get(i).map_or("", String::as_str);
                let outcome = exchange_once(&client, token).await;
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
    Ok((tally, started.elapsed()))
}

fn report(mode: &str, clients: usize, tally: &Tally, elapsed: Duration, cpu: Duration) -> Report {
    Report::new("overload", mode)
        .clients(clients)
        .throughput(tally.admitted.len() as u64, elapsed)
        .latency(Latency::of(tally.admitted.clone()))
        .cpu(cpu)
        .refused(tally.refused())
}

/// Runs the overload bench: `peak`, `0.5x` and `10x`.
///
/// # Errors
/// A setup step that fails, or an exchange that fails with anything but a shed (503) or
/// rate-limited (429) refusal.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
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

    // Warm-up: every connection of the open loops opened, the JWKS and caches filled.
    let warm = args
        .connections
        .min(usize::try_from(budget.ops).unwrap_or(usize::MAX));
    open_loop(
        &s,
        1e9,
        args.connections,
        warm as u64,
        Duration::from_secs(5),
    )
    .await?;
    closed_loop(&s, clients, (clients * 20) as u64, SHORT_CASE).await?;

    let cpu = process_cpu();
    let (peak, elapsed) = closed_loop(&s, clients, budget.ops, budget.time.min(SHORT_CASE)).await?;
    let peak_report = report("peak", clients, &peak, elapsed, process_cpu() - cpu)
        .note("closed loop, the bound of the open loops");
    let peak_rate = peak_report.ops_per_s;
    anyhow::ensure!(peak_rate > 0.0, "no exchange completed in the closed loop");
    let bound = format!("peak closed loop, {clients} clients, same run");

    let rate = peak_rate * 0.5;
    let cpu = process_cpu();
    let (half, elapsed) = open_loop(
        &s,
        rate,
        args.connections,
        budget.ops,
        budget.time.min(SHORT_CASE),
    )
    .await?;
    let half_report = report(
        "0.5x",
        args.connections,
        &half,
        elapsed,
        process_cpu() - cpu,
    )
    .bound(&bound, peak_rate)
    .note(format!(
        "open loop offering {rate:.0}/s (sent {:.0}/s), client cap {}",
        half.sent as f64 / elapsed.as_secs_f64(),
        half.client_cap
    ));

    let rate = peak_rate * args.factor;
    let (rss_before, _) = memory();
    let cpu = process_cpu();
    let (over, elapsed) = open_loop(
        &s,
        rate,
        args.connections,
        budget.ops.saturating_mul(10),
        budget.time,
    )
    .await?;
    let cpu = process_cpu() - cpu;
    let (rss_after, hwm) = memory();
    let latency = Latency::of(over.admitted.clone());
    let verdict = if latency.p99 < P99_TARGET {
        "meets"
    } else {
        "MISSES"
    };
    let shed_latency = Latency::of(over.shed.clone());
    let over_report = report(
        &format!("{}x", args.factor),
        args.connections,
        &over,
        elapsed,
        cpu,
    )
    .bound(&bound, peak_rate)
    .note(format!(
        "open loop offering {rate:.0}/s (sent {:.0}/s); admitted p99 {verdict} the 20 ms target; \
         shed 503 {} (p99 {:.2} ms), 429 {}, client cap {}; RSS {:.1} -> {:.1} MiB, high-water {:.1} MiB",
        over.sent as f64 / elapsed.as_secs_f64(),
        over.shed.len(),
        shed_latency.p99.as_secs_f64() * 1e3,
        over.rate_limited,
        over.client_cap,
        mib(rss_before),
        mib(rss_after),
        mib(hwm),
    ));

    // After the storm: the service still serves, and recorded each admitted exchange.
    let (after, _) = closed_loop(&s, 1, 1, SHORT_CASE).await?;
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
