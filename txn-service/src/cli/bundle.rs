//! `writ bundle show`.

use std::process::ExitCode;

use writ_identity::proto::admin as pb;

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
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        format: BundleFormat,
    },
}

pub(crate) async fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    let BundleCommand::Show { server, format } = cmd;
    let bundle = server
        .connect()
        .await?
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(status)?
        .into_inner();
    match format {
        BundleFormat::Pem => print!("{}", bundle.pem),
        BundleFormat::Spiffe => {
            let doc: serde_json::Value = serde_json::from_str(&bundle.spiffe)?;
            println!("{doc:#}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
