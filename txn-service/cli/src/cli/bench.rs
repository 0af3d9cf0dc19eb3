//! `writ bench`: performance figures held against bounds measured in the same run (see
//! [`crate::bench`]).

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::bench::{self, Budget, Report};
use crate::cli::out::outln;

/// `writ bench [--json] [--requests N] [--duration D] <bench>`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    which: Which,
    /// One JSON object per measured case and line, instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Most operations per measured case (warm-up excluded).
    #[arg(long, global = true, default_value_t = 20_000)]
    requests: u64,
    /// Longest wall time per measured case (e.g. `10s`).
    #[arg(long, global = true, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Exit with status 1 if a case with a target ratio falls below it.
    #[arg(long, global = true)]
    check: bool,
}

#[derive(Debug, Subcommand)]
enum Which {
    /// RFC 8693 exchanges through the token service over keep-alive mTLS.
    Exchange(bench::exchange::Args),
    /// SDK Txn-Token verification, cached and uncached, against raw signature checks.
    Verify(bench::verify::Args),
    /// SPIFFE Workload API fetches from the agent over its Unix socket.
    WorkloadApi(bench::workload_api::Args),
    /// X509-SVID and JWT-SVID issuance against the raw signing rate.
    Issue(bench::issue::Args),
    /// New mTLS connections per second against a plain rustls loop.
    Handshake(bench::handshake::Args),
    /// The token service at ten times its peak offered load: shedding and admitted p99.
    Overload(bench::overload::Args),
}

/// Runs `writ bench`: prints each case, then fails if `--check` and a case is below its
/// target.
///
/// # Errors
/// A bench that cannot set up or whose operations fail; a missed target with `--check`.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let budget = Budget {
        ops: args.requests.max(1),
        time: args.duration,
    };
    let reports = match &args.which {
        Which::Exchange(a) => bench::exchange::run(a, budget).await?,
        Which::Verify(a) => bench::verify::run(a, budget).await?,
        Which::WorkloadApi(a) => bench::workload_api::run(a, budget).await?,
        Which::Issue(a) => bench::issue::run(a, budget).await?,
        Which::Handshake(a) => bench::handshake::run(a, budget).await?,
        Which::Overload(a) => bench::overload::run(a, budget).await?,
    };
    for report in &reports {
        print(report, args.json)?;
    }
    let missed: Vec<&Report> = reports.iter().filter(|r| !r.meets_target()).collect();
    if args.check && !missed.is_empty() {
        let names: Vec<String> = missed
            .iter()
            .map(|r| format!("{} {}", r.bench, r.mode))
            .collect();
        anyhow::bail!("below target: {}", names.join(", "));
    }
    Ok(())
}

fn print(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(report)?)
    } else {
        outln!("{}", report.text())
    }
}
