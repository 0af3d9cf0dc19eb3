//! `writ bench exchange`: RFC 8693 exchanges through the real transaction token service
//! over keep-alive mTLS on loopback, held against the crypto bound measured in the same
//! run.
//!
//! The setup, under a temporary directory: a Writ stack ([`super::stack`]: server and
//! agent) that issues two X509-SVIDs to this uid, `spiffe://example.org/bench/tts` (the
//! service) and `spiffe://example.org/bench/gateway` (the caller); an OpenID Provider on
//! 127.0.0.1 ([`super::provider`]) whose JWKS holds an RSA-2048, a P-256 and an Ed25519
//! key; and a token service (`TxnServer`, started from a `txn.toml` as `writ txn run`
//! would) whose policy lets the gateway exchange the provider's access tokens. The
//! subject token cache is on, as the service's default.
//!
//! For each subject token algorithm (`--subject-alg`), first the bound, on this thread
//! (one core): verifying one subject token with the service's own validator
//! (`OidcValidator::validate`, JWKS cached) and signing one Txn-Token with its minter
//! (`Minter::mint`), each timed alone; bound = cores / (verify + sign) exchanges per
//! second. For RS256 subject tokens the bound is sign only (RSA verification is cheap and
//! the issue holds RS256 to the sign-only bound). Then the cases (`--modes`):
//!
//! - `fresh`: every exchange presents a distinct subject token, minted before the timed
//!   run (the provider's signing is never measured); every lookup of the subject token
//!   cache misses. Closed loop: `--clients` clients (each one `TxnClient`, one keep-alive
//!   mTLS connection) send back to back. With `--http2` the clients share one HTTP/2
//!   connection instead, each exchange a stream (the report's `protocol` says which).
//!   With `--wire` the timed exchanges go through the bench's lean HTTP/1.1 client
//!   ([`super::wire`], still one keep-alive mTLS connection per client; the warm-up and
//!   the checked first tokens still use `TxnClient`): the ratios then count less of the
//!   load generator's own CPU (the report's `client` says which).
//! - `repeated`: the same subject token every time: every lookup hits the cache, so the
//!   only crypto left is the Txn-Token signature (the bound is sign only).
//! - `half-peak`: open loop at half the `fresh` throughput just measured, fresh tokens;
//!   each latency counts from the moment the request was due (a late send counts its
//!   wait), so p50/p99 are what a client sees at that load.
//!
//! Every response is checked (`issued_token_type`, `token_type`, `expires_in`); a failed
//! exchange aborts the bench. The first token of each client in each case is verified
//! against the service's keys (issuer, requesting workload, narrowed scope). At the end
//! the audit log must hold one `granted` line per exchange made. `--durable-audit` adds
//! an identity store (SQLite, in the temporary directory) and `[audit] durable = true`:
//! every decision is also a row of its hash-chained audit table, each grant waiting for
//! its batch's commit, and at the end the chain must hold one row per exchange.
//!
//! `--separate-process` runs the clients in a second `writ` process (this executable,
//! `writ bench exchange --generator`, fed a JSON spec on standard input) that gets the
//! gateway's SVID from the stack's Workload API socket: then `cpu_us_per_op` is the CPU
//! of the serving process alone (token service, agent, server) and the note gives the
//! load generator's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use writ_identity::clock::SystemClock;
use writ_identity::spiffe_id::SpiffeId;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::oauth::TokenType;
use writ_sdk::txn_token::{TxnToken, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_txn_service::config::{TxnConfig, TxnServer};
use writ_txn_service::oidc::{IssuerConfig, OidcValidator};
use writ_txn_service::txn_token::{Minter, SigningAlgorithm};

use super::generator::{self, Generator};
use super::provider::{AUDIENCE, Provider, SubjectAlg};
use super::stack::{BenchStack, TRUST_DOMAIN};
use super::wire::{Answer, Wire};
use super::{Budget, Latency, Report, cores, process_cpu};

/// `iss` of the Txn-Tokens.
const TTS_ISSUER: &str = "https://tts.bench.example.org";
/// Path of the token service's SPIFFE ID.
const TTS_PATH: &str = "/bench/tts";
/// Path of the caller's SPIFFE ID.
const GATEWAY_PATH: &str = "/bench/gateway";
/// The scope the gateway asks for (and is granted): narrower than the subject's.
const REQUESTED_SCOPE: &str = "orders.read";
/// Most operations of each part of the bound.
const BOUND_OPS: u64 = 2_000;
/// Longest time of each part of the bound.
const BOUND_TIME: Duration = Duration::from_secs(2);
/// Most warm-up exchanges per client and case.
const WARM_PER_CLIENT: usize = 25;

/// The subject token algorithms to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlgChoice {
    /// RS256 (RSA-2048).
    Rs256,
    /// ES256 (P-256).
    Es256,
    /// EdDSA (Ed25519).
    Eddsa,
    /// All three, one after the other.
    All,
}

impl AlgChoice {
    fn algs(self) -> Vec<SubjectAlg> {
        match self {
            Self::Rs256 => vec![SubjectAlg::Rs256],
            Self::Es256 => vec![SubjectAlg::Es256],
            Self::Eddsa => vec![SubjectAlg::Eddsa],
            Self::All => SubjectAlg::ALL.to_vec(),
        }
    }
}

/// A case of the exchange bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A distinct fresh subject token per exchange (cache misses), closed loop.
    Fresh,
    /// The same subject token every time (cache hits), closed loop.
    Repeated,
    /// Open loop at half the fresh peak: latency at a sustainable load.
    HalfPeak,
    /// The transport alone (needs `--wire`): the same connections and client, each
    /// request a `GET` of the service's metadata; its `ceiling` is the highest ratio an
    /// exchange can reach on this machine.
    Transport,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Repeated => "repeated",
            Self::HalfPeak => "half-peak",
            Self::Transport => "transport",
        }
    }
}

/// The Txn-Token signature algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TxnAlg {
    /// ECDSA P-256 (the service's default).
    Es256,
    /// Ed25519.
    Eddsa,
}

impl TxnAlg {
    /// The token service's name for it.
    pub fn signing_algorithm(self) -> SigningAlgorithm {
        match self {
            Self::Es256 => SigningAlgorithm::Es256,
            Self::Eddsa => SigningAlgorithm::EdDsa,
        }
    }
}

/// Options of `writ bench exchange`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent clients, each one `TxnClient` (one keep-alive mTLS connection).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub clients: u16,
    /// Signature algorithm of the subject tokens.
    #[arg(long, value_enum, default_value_t = AlgChoice::All)]
    pub subject_alg: AlgChoice,
    /// Cases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fresh,repeated,half-peak"
    )]
    pub modes: Vec<Mode>,
    /// Run the clients in a second process, so the server's CPU is measured alone.
    #[arg(long)]
    pub separate_process: bool,
    /// Send over HTTP/2: the clients share one connection as concurrent streams
    /// (default: HTTP/1.1, one keep-alive connection per client).
    #[arg(long, conflicts_with = "wire")]
    pub http2: bool,
    /// Time the exchanges with the bench's lean HTTP/1.1 client instead of the SDK's
    /// `TxnClient` (see `writ bench overload --wire`).
    #[arg(long)]
    pub wire: bool,
    /// Also write every decision to the durable, hash-chained audit table of an
    /// identity store (SQLite in the temporary directory), each grant waiting for its
    /// batch's commit, as a service with `[identity_store]` does by default.
    #[arg(long)]
    pub durable_audit: bool,
    /// Signature algorithm of the Txn-Tokens the service mints.
    #[arg(long, value_enum, default_value_t = TxnAlg::Es256)]
    pub txn_alg: TxnAlg,
    /// Internal: be the load generator of `--separate-process` (spec on standard input).
    #[arg(long, hide = true)]
    pub generator: bool,
}

/// Runs the exchange bench.
///
/// # Errors
/// If the stack cannot start, an exchange fails, an issued token does not verify, or the
/// audit log does not hold one grant per exchange.
pub async fn run(args: &Args, budget: Budget) -> anyhow::Result<Vec<Report>> {
    if args.generator {
        generator().await?;
        return Ok(Vec::new());
    }
    let clients = usize::from(args.clients.max(1));
    let mut modes = args.modes.clone();
    modes.dedup();
    if modes.is_empty() {
        anyhow::bail!("--modes: name at least one of fresh, repeated, half-peak, transport");
    }
    anyhow::ensure!(
        args.wire || !modes.contains(&Mode::Transport),
        "--modes transport needs --wire (the lean client sends its requests)"
    );

    let stack = BenchStack::start().await?;
    let tts_id = stack
        .register(TTS_PATH, &["localhost", "127.0.0.1"])
        .await?;
    let gateway_id = stack.register(GATEWAY_PATH, &[]).await?;
    stack.wait_for_svids(2).await?;
    let provider = Provider::start().await?;
    let dir = tempfile::Builder::new()
        .prefix("writ-bench-tts-")
        .tempdir()
        .context("temporary directory")?;
    let audit = dir.path().join("audit.log");
    let store = args
        .durable_audit
        .then(|| dir.path().join("identity.sqlite3"));
    if let Some(path) = &store {
        // The identity server creates the store; the token service only opens it.
        writ_identity::store::sqlite::SqliteStore::open(path)
            .await
            .context("the identity store")?;
    }
    let toml = txn_toml(
        &stack.endpoint(),
        &tts_id,
        &audit,
        provider.issuer(),
        clients,
        args.txn_alg.signing_algorithm(),
        store.as_deref(),
    );
    let config = TxnConfig::from_toml(&toml, dir.path()).context("the bench's txn.toml")?;
    let server = TxnServer::start(config)
        .await
        .context("the token service")?;
    let target = Target {
        url: format!("https://{}", server.addr),
        tts_id,
        gateway_id,
        workload_api: stack.endpoint(),
    };
    let verifier = TxnVerifier::new(TRUST_DOMAIN.parse()?, server.service.keys().public_keys());

    let mut reports = Vec::new();
    let mut exchanges = 0usize;
    for alg in args.subject_alg.algs() {
        let bound = Bound::measure(&provider, alg, args.txn_alg.signing_algorithm()).await?;
        let mut peak = None;
        for &mode in &modes {
            let case = Case {
                target: &target,
                provider: &provider,
                verifier: &verifier,
                alg,
                clients,
                budget,
                separate: args.separate_process,
                http2: args.http2,
                wire: args.wire,
            };
            let (report, done, rate) = match mode {
                Mode::Fresh => case.closed_loop(true, &bound).await?,
                Mode::Repeated => case.closed_loop(false, &bound).await?,
                Mode::HalfPeak => {
                    let peak = match peak {
                        Some(p) => p,
                        None => {
                            // Not asked for: measured to pace the open loop, not reported.
                            let (_, done, rate) = case.closed_loop(true, &bound).await?;
                            exchanges += done;
                            rate
                        }
                    };
                    case.half_peak(peak, &bound).await?
                }
                Mode::Transport => case.transport(&bound).await?,
            };
            if mode == Mode::Fresh {
                peak = Some(rate);
            }
            exchanges += done;
            reports.push(report);
        }
    }

    // Every exchange made, warm-up included, is one granted line of the audit log.
    server
        .shutdown()
        .await
        .context("stopping the token service")?;
    let log = std::fs::read_to_string(&audit).context("the audit log")?;
    let granted = log
        .lines()
        .filter(|l| l.contains(r#""decision":"granted""#))
        .count();
    if granted != exchanges || log.lines().count() != exchanges {
        anyhow::bail!(
            "the audit log holds {} lines, {granted} granted, for {exchanges} exchanges",
            log.lines().count()
        );
    }
    // And, with `--durable-audit`, one row of the hash-chained table.
    if let Some(path) = &store {
        use writ_identity::store::Store as _;
        let store = writ_identity::store::sqlite::SqliteStore::open_read_only(path)
            .await
            .context("the identity store")?;
        let head = store
            .audit_anchor()
            .await
            .context("the audit chain")?
            .head_seq;
        anyhow::ensure!(
            head == exchanges as u64,
            "the durable audit table holds {head} rows for {exchanges} exchanges"
        );
    }
    drop(stack);
    Ok(reports)
}

/// Where the clients go.
struct Target {
    url: String,
    tts_id: SpiffeId,
    gateway_id: SpiffeId,
    workload_api: String,
}

fn txn_toml(
    endpoint: &str,
    tts_id: &SpiffeId,
    audit: &std::path::Path,
    issuer: &str,
    clients: usize,
    signing: SigningAlgorithm,
    durable_audit: Option<&std::path::Path>,
) -> String {
    let gateway = format!("spiffe://{TRUST_DOMAIN}{GATEWAY_PATH}");
    let durable = durable_audit.map_or_else(String::new, |path| {
        format!(
            "\n[identity_store]\nbackend = \"sqlite\"\nconnection = {:?}\n\n[audit]\ndurable = true\n",
            path.display().to_string()
        )
    });
    format!(
        r#"
listen = "127.0.0.1:0"
issuer = "{TTS_ISSUER}"
workload_api = {endpoint:?}
spiffe_id = "{tts_id}"
audit_log = {audit:?}
audit_max_size = 0
signing_algorithm = "{signing}"

[connections]
max_connections_per_ip = {per_ip}

# Throughput, not shedding, is measured here (`writ bench overload` measures shedding):
# every client's request may wait for a slot.
[overload]
max_queue = {queue}
queue_timeout = "1s"

[[oidc]]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
algorithms = ["RS256", "ES256", "EdDSA"]

[policy]
[[policy.caller]]
id = "{gateway}"
subject_token_types = ["access_token"]
max_scope = ["orders.read", "orders.write"]
{durable}"#,
        audit = audit.display().to_string(),
        per_ip = clients * 2 + 16,
        queue = clients * 2,
        signing = signing.name(),
    )
}

/// The crypto of one exchange, each part timed alone on this thread.
struct Bound {
    /// Mean time of `OidcValidator::validate` (JWKS cached).
    verify: Duration,
    /// Mean time of `Minter::mint`.
    sign: Duration,
    alg: SubjectAlg,
    /// The Txn-Tokens' signature algorithm.
    signing: SigningAlgorithm,
}

impl Bound {
    async fn measure(
        provider: &Arc<Provider>,
        alg: SubjectAlg,
        signing: SigningAlgorithm,
    ) -> anyhow::Result<Self> {
        let validator = OidcValidator::new(
            vec![IssuerConfig::new(provider.issuer(), [AUDIENCE])],
            Arc::new(SystemClock),
        )?;
        let n = usize::try_from(BOUND_OPS)?;
        let tokens = provider.access_tokens(alg, n + 50).await?;
        let (warm, timed) = tokens.split_at(50);
        // The first validation fetches discovery and the JWKS.
        for token in warm {
            validator
                .validate(token, TokenType::AccessToken)
                .await
                .context("the bound's subject token validation")?;
        }
        let mut spent = Duration::ZERO;
        let mut done = 0u32;
        let started = Instant::now();
        for token in timed {
            let t = Instant::now();
            let subject = validator
                .validate(token, TokenType::AccessToken)
                .await
                .context("the bound's subject token validation")?;
            spent += t.elapsed();
            done += 1;
            anyhow::ensure!(subject.scope.len() == 3, "the subject token's scope");
            if started.elapsed() > BOUND_TIME {
                break;
            }
        }
        let verify = spent / done.max(1);

        let minter = Minter::generate(signing)?;
        let budget = Budget {
            ops: BOUND_OPS,
            time: BOUND_TIME,
        };
        let signed = super::time_loop(budget, |i| {
            let token = minter.mint(&sample_claims(i))?;
            anyhow::ensure!(token.len() > 100, "a Txn-Token");
            Ok(())
        })?;
        let sign = signed.elapsed / u32::try_from(signed.ops.max(1))?;
        Ok(Self {
            verify,
            sign,
            alg,
            signing,
        })
    }

    /// Exchanges per second on every core when the subject token is verified (`fresh`).
    fn fresh(&self) -> (String, f64) {
        let cores = cores();
        if self.alg == SubjectAlg::Rs256 {
            return self.sign_only();
        }
        let per_core = 1.0 / (self.verify + self.sign).as_secs_f64();
        (
            format!(
                "{} verify {:.1} µs + {} sign {:.1} µs, x {cores} cores",
                self.alg.jose(),
                self.verify.as_secs_f64() * 1e6,
                self.signing.name(),
                self.sign.as_secs_f64() * 1e6
            ),
            per_core * cores as f64,
        )
    }

    /// Exchanges per second on every core when only the Txn-Token is signed.
    fn sign_only(&self) -> (String, f64) {
        let cores = cores();
        (
            format!(
                "{} sign {:.1} µs (sign only; {} verify {:.1} µs), x {cores} cores",
                self.signing.name(),
                self.sign.as_secs_f64() * 1e6,
                self.alg.jose(),
                self.verify.as_secs_f64() * 1e6
            ),
            cores as f64 / self.sign.as_secs_f64(),
        )
    }

    /// The issue's target for fresh tokens of this algorithm.
    fn fresh_target(&self) -> f64 {
        if self.alg == SubjectAlg::Rs256 {
            0.5
        } else {
            0.7
        }
    }
}

/// The claims the service mints for one exchange.
fn sample_claims(i: u64) -> TxnToken {
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
    )
    .unwrap_or_default();
    let mut rctx = BTreeMap::new();
    rctx.insert("req_ip".to_owned(), json!("127.0.0.1"));
    rctx.insert("transport".to_owned(), json!("mtls"));
    TxnToken {
        iss: TTS_ISSUER.to_owned(),
        iat: now,
        exp: now + 300,
        aud: TRUST_DOMAIN.to_owned(),
        txn: format!("6f1c2a9e-0000-4000-8000-{i:012}"),
        sub: format!("user-{i}"),
        scope: REQUESTED_SCOPE.to_owned(),
        req_wl: format!("spiffe://{TRUST_DOMAIN}{GATEWAY_PATH}"),
        tctx: None,
        rctx: Some(rctx),
        act: None,
    }
}

/// One case's parameters.
struct Case<'a> {
    target: &'a Target,
    provider: &'a Arc<Provider>,
    verifier: &'a TxnVerifier,
    alg: SubjectAlg,
    clients: usize,
    budget: Budget,
    separate: bool,
    http2: bool,
    wire: bool,
}

/// What one load generator run did.
#[derive(Debug, Serialize, Deserialize)]
struct Outcome {
    /// Latency of each timed exchange, in nanoseconds.
    samples_ns: Vec<u64>,
    /// Wall time of the timed exchanges, in nanoseconds.
    wall_ns: u64,
    /// CPU time of the generator's process over the timed exchanges, in nanoseconds.
    cpu_ns: u64,
    /// The first token each client was issued (warm-up).
    firsts: Vec<String>,
    /// Warm-up exchanges made.
    warm: usize,
}

/// What a load generator is asked to do.
#[derive(Debug, Serialize, Deserialize)]
struct Spec {
    workload_api: String,
    gateway_id: String,
    tts_id: String,
    url: String,
    clients: usize,
    /// Warm-up subject tokens, `per_client_warm` for each client in turn.
    warm: Vec<String>,
    per_client_warm: usize,
    /// Subject tokens of the timed exchanges (used in turn, round robin).
    tokens: Vec<String>,
    /// Timed exchanges to make.
    n: usize,
    /// Longest time of the timed run, in milliseconds.
    max_ms: u64,
    /// Open loop at this rate (exchanges per second); closed loop when absent.
    rate: Option<f64>,
    /// One HTTP/2 connection shared by the clients, instead of one HTTP/1.1 connection
    /// each.
    http2: bool,
    /// Time the exchanges with the lean client ([`super::wire`]).
    wire: bool,
    /// Time the lean client's metadata requests instead of exchanges (`transport`).
    #[serde(default)]
    transport: bool,
}

impl Case<'_> {
    /// `fresh` (distinct tokens) or `repeated` (one token), closed loop. Returns the
    /// report, the exchanges made (warm-up included) and the throughput.
    async fn closed_loop(
        &self,
        fresh: bool,
        bound: &Bound,
    ) -> anyhow::Result<(Report, usize, f64)> {
        let n = usize::try_from(self.budget.ops)?;
        let per_client_warm = self.per_client_warm(n);
        let (warm, tokens) = if fresh {
            (
                self.warm_tokens(per_client_warm).await?,
                self.provider.access_tokens(self.alg, n).await?,
            )
        } else {
            let one = self.provider.access_token(self.alg)?;
            (vec![one.clone()], vec![one])
        };
        let spec = self.spec(warm, per_client_warm, tokens, n, None);
        let (outcome, server_cpu) = self.drive(spec).await?;
        let mode = if fresh { Mode::Fresh } else { Mode::Repeated };
        let (bound_what, bound_rate) = if fresh {
            bound.fresh()
        } else {
            bound.sign_only()
        };
        let mut report = self.report(mode, &outcome, server_cpu);
        report = report.bound(bound_what, bound_rate);
        if fresh {
            report = report.target(bound.fresh_target());
        }
        let note = if fresh {
            "distinct subject tokens, subject token cache on (the default): every lookup misses"
        } else {
            "one subject token, subject token cache on: every lookup hits"
        };
        report = append_note(report, note);
        let rate = report.ops_per_s;
        Ok((report, outcome.samples_ns.len() + outcome.warm, rate))
    }

    /// Open loop at half of `peak`, fresh tokens.
    async fn half_peak(&self, peak: f64, bound: &Bound) -> anyhow::Result<(Report, usize, f64)> {
        let rate = (peak / 2.0).max(1.0);
        let by_time = (rate * self.budget.time.as_secs_f64()).floor();
        let n = usize::try_from(self.budget.ops)?
            .min(by_time as usize)
            .max(1);
        let per_client_warm = self.per_client_warm(n);
        let warm = self.warm_tokens(per_client_warm).await?;
        let tokens = self.provider.access_tokens(self.alg, n).await?;
        let spec = self.spec(warm, per_client_warm, tokens, n, Some(rate));
        let (outcome, server_cpu) = self.drive(spec).await?;
        let (bound_what, bound_rate) = bound.fresh();
        let report = self
            .report(Mode::HalfPeak, &outcome, server_cpu)
            .bound(bound_what, bound_rate);
        let report = append_note(
            report,
            &format!(
                "open loop at {rate:.0}/s = half the fresh peak of {peak:.0}/s; latency from \
                 when each request was due (p99 target < 5 ms)"
            ),
        );
        Ok((report, outcome.samples_ns.len() + outcome.warm, rate))
    }

    /// `transport`: the lean client's metadata requests, closed loop, after the usual
    /// warm-up exchanges. The ceiling: an exchange costs the machine the crypto of the
    /// `fresh` bound plus at least what this request costs it, so its ratio is at most
    /// crypto / (crypto + this request's CPU, load generator included).
    async fn transport(&self, bound: &Bound) -> anyhow::Result<(Report, usize, f64)> {
        let n = usize::try_from(self.budget.ops)?;
        let per_client_warm = self.per_client_warm(n);
        let warm = self.warm_tokens(per_client_warm).await?;
        let mut spec = self.spec(warm.clone(), per_client_warm, warm, n, None);
        spec.transport = true;
        let (outcome, server_cpu) = self.drive(spec).await?;
        let (bound_what, bound_rate) = bound.fresh();
        let ops = outcome.samples_ns.len().max(1) as f64;
        let machine_us =
            (server_cpu.unwrap_or_default().as_nanos() as f64 + outcome.cpu_ns as f64) / 1e3 / ops;
        let crypto_us = cores() as f64 * 1e6 / bound_rate;
        let ceiling = crypto_us / (crypto_us + machine_us);
        let report = self
            .report(Mode::Transport, &outcome, server_cpu)
            .bound(bound_what, bound_rate)
            .ceiling(ceiling);
        let report = append_note(
            report,
            &format!(
                "GET of the service's metadata on the exchanges' connections: no crypto, \
                 nothing audited; {machine_us:.1} µs of machine CPU per request (load generator \
                 included) against the bound's {crypto_us:.1} µs of crypto per exchange, so an \
                 exchange's ratio is at most {ceiling:.2} on this machine"
            ),
        );
        let rate = report.ops_per_s;
        Ok((report, outcome.warm, rate))
    }

    /// Warm-up exchanges per client before `n` timed ones.
    fn per_client_warm(&self, n: usize) -> usize {
        (n / 10 / self.clients).clamp(1, WARM_PER_CLIENT)
    }

    /// Fresh subject tokens for `per_client_warm` warm-up exchanges of every client.
    async fn warm_tokens(&self, per_client_warm: usize) -> anyhow::Result<Vec<String>> {
        self.provider
            .access_tokens(self.alg, per_client_warm * self.clients)
            .await
    }

    fn spec(
        &self,
        warm: Vec<String>,
        per_client_warm: usize,
        tokens: Vec<String>,
        n: usize,
        rate: Option<f64>,
    ) -> Spec {
        Spec {
            workload_api: self.target.workload_api.clone(),
            gateway_id: self.target.gateway_id.to_string(),
            tts_id: self.target.tts_id.to_string(),
            url: self.target.url.clone(),
            clients: self.clients,
            warm,
            per_client_warm,
            tokens,
            n,
            max_ms: u64::try_from(self.budget.time.as_millis()).unwrap_or(u64::MAX),
            rate,
            http2: self.http2,
            wire: self.wire,
            transport: false,
        }
    }

    /// Runs `spec` here or in a generator process; checks the first tokens. Returns the
    /// outcome and, with a separate generator, this (serving) process's CPU time over
    /// the timed run.
    async fn drive(&self, spec: Spec) -> anyhow::Result<(Outcome, Option<Duration>)> {
        let (outcome, server_cpu) = if self.separate {
            let (outcome, cpu) = spawn_generator(&spec).await?;
            (outcome, Some(cpu))
        } else {
            (load(&spec).await?, None)
        };
        for token in &outcome.firsts {
            let claims = self
                .verifier
                .verify_at(token, SystemTime::now())
                .context("an issued Txn-Token does not verify")?;
            anyhow::ensure!(
                claims.iss == TTS_ISSUER
                    && claims.req_wl == spec.gateway_id
                    && claims.scope == REQUESTED_SCOPE
                    && claims.sub.starts_with("user-"),
                "an issued Txn-Token has unexpected claims: iss {}, req_wl {}, scope {}, sub {}",
                claims.iss,
                claims.req_wl,
                claims.scope,
                claims.sub
            );
        }
        anyhow::ensure!(!outcome.samples_ns.is_empty(), "no exchange was timed");
        Ok((outcome, server_cpu))
    }

    fn report(&self, mode: Mode, outcome: &Outcome, server_cpu: Option<Duration>) -> Report {
        let samples: Vec<Duration> = outcome
            .samples_ns
            .iter()
            .map(|&ns| Duration::from_nanos(ns))
            .collect();
        let ops = samples.len() as u64;
        let report = Report::new("exchange", mode.name())
            .subject_alg(self.alg.jose())
            .http_version(self.http2)
            .generator(self.wire)
            .clients(self.clients)
            .throughput(ops, Duration::from_nanos(outcome.wall_ns))
            .latency(Latency::of(samples));
        match server_cpu {
            Some(cpu) => {
                let generator = outcome.cpu_ns as f64 / 1e3 / ops.max(1) as f64;
                report.cpu(cpu).note(format!(
                    "separate load generator: cpu_us_per_op is the serving process's; \
                     the generator's {generator:.1} µs/op"
                ))
            }
            None => report.cpu(Duration::from_nanos(outcome.cpu_ns)).note(
                "one process: cpu_us_per_op is clients, token service, agent and provider together",
            ),
        }
    }
}

fn append_note(mut report: Report, note: &str) -> Report {
    report.note = Some(match report.note.take() {
        Some(first) => format!("{note}; {first}"),
        None => note.to_owned(),
    });
    report
}

/// Checks one response of the service.
fn check(issued: &writ_sdk::exchange::Issued) -> anyhow::Result<()> {
    anyhow::ensure!(
        issued.issued_token_type == TokenType::TxnToken.as_urn()
            && issued.token_type == "N_A"
            && issued.expires_in > 0
            && issued.access_token.len() > 100,
        "unexpected response: issued_token_type {}, token_type {}, expires_in {}",
        issued.issued_token_type,
        issued.token_type,
        issued.expires_in
    );
    Ok(())
}

async fn exchange(client: &TxnClient, token: &str, what: &str) -> anyhow::Result<String> {
    let issued = client
        .exchange(TxnRequest::access_token(token).scope(REQUESTED_SCOPE))
        .await
        .with_context(|| format!("{what}: exchange failed"))?;
    check(&issued).with_context(|| what.to_owned())?;
    Ok(issued.access_token)
}

/// One exchange of the lean client's request `i`; anything but a grant fails.
async fn wire_exchange(wire: &Wire, i: usize, what: &str) -> anyhow::Result<()> {
    match wire
        .exchange(i)
        .await
        .with_context(|| format!("{what} {i}"))?
    {
        Answer::Granted => Ok(()),
        refused => anyhow::bail!("{what} {i}: refused ({refused:?})"),
    }
}

/// The load generator: builds the clients, warms them up, then makes the timed
/// exchanges (closed loop, or open loop at `spec.rate`).
async fn load(spec: &Spec) -> anyhow::Result<Outcome> {
    load_with(spec, || async { Ok(()) }).await
}

/// As [`load`], awaiting `go` between the warm-up and the timed run.
async fn load_with<F, Fut>(spec: &Spec, go: F) -> anyhow::Result<Outcome>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let source = X509Source::builder()
        .endpoint(spec.workload_api.clone())
        .spiffe_id(SpiffeId::new(&spec.gateway_id)?)
        .build()
        .await
        .context("the gateway's X509-SVID from the Workload API")?;
    let tts_id = SpiffeId::new(&spec.tts_id)?;
    let clients = if spec.http2 {
        // Clones share the one client's connection.
        let one = TxnClient::builder(&source, &spec.url)
            .http2()
            .tts_id(tts_id.clone())?;
        vec![one; spec.clients]
    } else {
        (0..spec.clients)
            .map(|_| TxnClient::new(&source, &spec.url, tts_id.clone()))
            .collect::<Result<Vec<_>, _>>()?
    };

    // Warm-up: every client opens its connection (mTLS handshake) and exchanges a few.
    let warm = Arc::new(spec.warm.clone());
    let mut tasks = Vec::new();
    for (c, client) in clients.iter().cloned().enumerate() {
        let warm = warm.clone();
        let per = spec.per_client_warm;
        tasks.push(tokio::spawn(async move {
            let mut first = None;
            for k in 0..per {
                let token = warm
                    .get((c * per + k) % warm.len().max(1))
                    .context("a warm-up token")?;
                let issued = exchange(&client, token, "warm-up").await?;
                first.get_or_insert(issued);
            }
            first.context("no warm-up exchange")
        }));
    }
    let mut firsts = Vec::new();
    for task in tasks {
        firsts.push(task.await.context("a warm-up client")??);
    }
    // The lean client's requests: the warm-up tokens, then the timed ones (index
    // `warm.len() + i`). Its warm-up opens each client's connection.
    let wire = match clients.first() {
        Some(client) if spec.wire => {
            let all: Vec<String> = spec.warm.iter().chain(&spec.tokens).cloned().collect();
            let wire = Wire::new(&source, client, &spec.url, tts_id, &all, REQUESTED_SCOPE)?;
            let warm_up = (0..clients.len()).map(|c| {
                let wire = wire.clone();
                tokio::spawn(async move { wire_exchange(&wire, c, "warm-up").await })
            });
            for task in warm_up.collect::<Vec<_>>() {
                task.await.context("a warm-up client")??;
            }
            Some(wire)
        }
        _ => None,
    };
    let offset = spec.warm.len();
    go().await?;

    let tokens = Arc::new(spec.tokens.clone());
    anyhow::ensure!(!tokens.is_empty(), "no subject token");
    anyhow::ensure!(
        wire.is_some() || !spec.transport,
        "the transport case needs the lean client"
    );
    let n = spec.n;
    let max = Duration::from_millis(spec.max_ms);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut tasks = Vec::new();
    let count = clients.len();
    for (c, client) in clients.into_iter().enumerate() {
        let tokens = tokens.clone();
        let next = next.clone();
        let wire = wire.clone();
        let rate = spec.rate;
        let transport = spec.transport;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(n / count + 1);
            let mut k = 0usize;
            loop {
                let (i, due) = match rate {
                    // Closed loop: the next exchange as soon as the last one is done.
                    None => (next.fetch_add(1, Ordering::Relaxed), None),
                    // Open loop: client c makes exchanges c, c + C, c + 2C, ... each at
                    // its due time.
                    Some(rate) => {
                        let i = c + k * count;
                        k += 1;
                        (i, Some(started + Duration::from_secs_f64(i as f64 / rate)))
                    }
                };
                if i >= n || started.elapsed() >= max {
                    return Ok::<_, anyhow::Error>(samples);
                }
                let t = match due {
                    Some(due) => {
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                match &wire {
                    Some(wire) if transport => wire
                        .metadata()
                        .await
                        .with_context(|| format!("metadata request {i}"))?,
                    Some(wire) => {
                        wire_exchange(wire, offset + i % tokens.len(), "exchange").await?;
                    }
                    None => {
                        let token = tokens.get(i % tokens.len()).context("a subject token")?;
                        exchange(&client, token, &format!("exchange {i}")).await?;
                    }
                }
                samples.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
            }
        }));
    }
    let mut samples_ns = Vec::with_capacity(n);
    for task in tasks {
        samples_ns.extend(task.await.context("a client")??);
    }
    let wall = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    Ok(Outcome {
        samples_ns,
        wall_ns: u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX),
        cpu_ns: u64::try_from(cpu.as_nanos()).unwrap_or(u64::MAX),
        // The lean client's warm-up made one more exchange per client.
        warm: spec.per_client_warm * spec.clients + if spec.wire { spec.clients } else { 0 },
        firsts,
    })
}

/// Starts `writ bench exchange --generator`, gives it `spec`, lets it warm up, then
/// times this process's CPU over its timed run.
async fn spawn_generator(spec: &Spec) -> anyhow::Result<(Outcome, Duration)> {
    let mut child = Generator::spawn("exchange")?;
    child.send(&serde_json::to_string(spec)?).await?;
    let ready = child.receive(generator::READY).await?;
    anyhow::ensure!(
        ready == GENERATOR_WARM,
        "the load generator failed during warm-up (see its error above)"
    );
    let cpu_before = process_cpu();
    child.send("go").await?;
    let result = child
        .receive(Duration::from_millis(spec.max_ms) + generator::READY)
        .await?;
    let cpu = process_cpu().saturating_sub(cpu_before);
    let outcome: Outcome = serde_json::from_str(&result).context("the load generator's result")?;
    child.finish().await?;
    Ok((outcome, cpu))
}

/// What the generator prints once warmed up.
const GENERATOR_WARM: &str = "warm";
/// Largest spec a generator reads (the subject tokens of one case).
const MAX_SPEC_BYTES: u64 = 256 * 1024 * 1024;

/// `writ bench exchange --generator`: reads a [`Spec`] line, warms up, prints `warm`,
/// waits for a `go` line, runs, prints the [`Outcome`] as one JSON line.
async fn generator() -> anyhow::Result<()> {
    let line = generator::read_line(MAX_SPEC_BYTES)
        .await?
        .context("no spec on standard input")?;
    let spec: Spec = serde_json::from_str(&line).context("the generator's spec")?;
    let outcome = load_with(&spec, || async {
        generator::say(GENERATOR_WARM)?;
        match generator::read_line(16).await?.as_deref() {
            Some("go") => Ok(()),
            other => anyhow::bail!("expected `go`, got {other:?}"),
        }
    })
    .await?;
    generator::say(&serde_json::to_string(&outcome)?)
}
