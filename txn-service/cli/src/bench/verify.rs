//! `writ bench verify`: not built yet (issue 20).

use super::{Budget, Report};

/// Options of `writ bench verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the Verify bench.
///
/// # Errors
/// Always, until it is built.
pub async fn run(_args: &Args, _budget: Budget) -> anyhow::Result<Vec<Report>> {
    anyhow::bail!("writ bench verify is not built yet")
}
