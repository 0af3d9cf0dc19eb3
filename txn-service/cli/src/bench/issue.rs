//! `writ bench issue`: not built yet (issue 20).

use super::{Budget, Report};

/// Options of `writ bench issue`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the Issue bench.
///
/// # Errors
/// Always, until it is built.
pub async fn run(_args: &Args, _budget: Budget) -> anyhow::Result<Vec<Report>> {
    anyhow::bail!("writ bench issue is not built yet")
}
