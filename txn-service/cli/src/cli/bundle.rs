//! `writ bundle show`.

use std::process::ExitCode;

use writ_identity::proto::admin as pb;

use super::out::{self, OutputArg};
use super::{ServerSocket, status};

#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub(crate) enum BundleFormat {
    /// X.509 authorities as PEM.
    #[default]
    Pem,
    /// SPIFFE bundle JSON (X.509 authorities and JWT keys).
    Spiffe,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BundleCommand {
    /// Print the trust domain's bundle.
    Show {
        #[command(flatten)]
        server: ServerSocket,
        /// Bundle format (as `spire-server bundle show --format`).
        #[arg(long, value_enum, default_value_t)]
        format: BundleFormat,
        /// `--output json` is `--format spiffe` (the flag every command takes).
        #[command(flatten)]
        output: OutputArg,
    },
}

pub(crate) async fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    let BundleCommand::Show {
        server,
        format,
        output,
    } = cmd;
    let bundle = server
        .connect()
        .await?
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let format = if output.json() {
        BundleFormat::Spiffe
    } else {
        format
    };
    match format {
        BundleFormat::Pem => out::raw(&bundle.pem)?,
        BundleFormat::Spiffe => {
            let doc: serde_json::Value = serde_json::from_str(&bundle.spiffe)?;
            out::json(&doc)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
