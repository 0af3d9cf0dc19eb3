//! `writ bench overload`: not built yet (issue 20).

use super::{Budget, Report};

/// Options of `writ bench overload`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {}

/// Runs the Overload bench.
///
/// # Errors
/// Always, until it is built.
pub async fn run(_args: &Args, _budget: Budget) -> anyhow::Result<Vec<Report>> {
    anyhow::bail!("writ bench overload is not built yet")
}
