//! `writ bench workload-api`: not built yet (issue 20).

use super::{Budget, Report};

/// Options of `writ bench workload-api`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the Workload API bench.
///
/// # Errors
/// Always, until it is built.
pub async fn run(_args: &Args, _budget: Budget) -> anyhow::Result<Vec<Report>> {
    anyhow::bail!("writ bench workload-api is not built yet")
}
