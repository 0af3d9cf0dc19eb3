//! `writ bundle show|set|list|delete`: the trust domain's own bundle, and foreign ones
//! (SPIRE's `bundle set|list|delete`: static federated bundles).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use writ_identity::proto::admin as pb;

use super::out::{self, OutputArg, outln};
use super::{ServerSocket, status};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum BundleFormat {
    /// X.509 authorities as PEM.
    #[default]
    Pem,
    /// SPIFFE bundle JSON (X.509 authorities and JWT keys).
    Spiffe,
}

impl BundleFormat {
    /// The name the admin API takes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Pem => "pem",
            Self::Spiffe => "spiffe",
        }
    }
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
    /// Store (replace) a foreign trust domain's bundle.
    Set {
        #[command(flatten)]
        server: ServerSocket,
        /// The foreign trust domain, `spiffe://partner.test`.
        #[arg(long)]
        id: String,
        /// The bundle file.
        #[arg(long = "path", value_name = "FILE")]
        bundle_path: PathBuf,
        /// Its format.
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
    },
    /// List the foreign bundles held.
    List {
        #[command(flatten)]
        server: ServerSocket,
        /// Bundle format of the text output.
        #[arg(long, value_enum, default_value_t)]
        format: BundleFormat,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Delete a foreign bundle (refused while a federation relationship refreshes it).
    Delete {
        #[command(flatten)]
        server: ServerSocket,
        /// The foreign trust domain, `spiffe://partner.test`.
        #[arg(long)]
        id: String,
    },
}

fn json_doc(b: &pb::Bundle) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(&b.spiffe).context("the server sent a bundle that is not JSON")
}

pub(crate) async fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCommand::Show {
            server,
            format,
            output,
        } => {
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
                BundleFormat::Spiffe => out::json(&json_doc(&bundle)?)?,
            }
        }
        BundleCommand::Set {
            server,
            id,
            bundle_path,
            format,
        } => {
            let text = std::fs::read_to_string(&bundle_path)
                .with_context(|| format!("cannot read {}", bundle_path.display()))?;
            let b = server
                .connect()
                .await?
                .set_bundle(pb::SetBundleRequest {
                    trust_domain: id,
                    bundle: text,
                    format: format.name().to_owned(),
                })
                .await
                .map_err(status)?
                .into_inner();
            outln!(
                "Stored the bundle of spiffe://{} (sequence {})",
                b.trust_domain,
                b.sequence
            )?;
        }
        BundleCommand::List {
            server,
            format,
            output,
        } => {
            let list = server
                .connect()
                .await?
                .list_bundles(pb::ListBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .bundles;
            if output.json() {
                let docs = list
                    .iter()
                    .map(|b| {
                        Ok(serde_json::json!({
                            "trust_domain": b.trust_domain,
                            "sequence": b.sequence,
                            "bundle": json_doc(b)?,
                        }))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                out::json(&serde_json::Value::Array(docs))?;
            } else {
                for b in &list {
                    outln!("****************************************")?;
                    outln!("* spiffe://{}", b.trust_domain)?;
                    outln!("****************************************")?;
                    match format {
                        BundleFormat::Pem => out::raw(&b.pem)?,
                        BundleFormat::Spiffe => out::json(&json_doc(b)?)?,
                    }
                }
            }
        }
        BundleCommand::Delete { server, id } => {
            let b = server
                .connect()
                .await?
                .delete_bundle(pb::DeleteBundleRequest { trust_domain: id })
                .await
                .map_err(status)?
                .into_inner();
            outln!("Deleted the bundle of spiffe://{}", b.trust_domain)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
