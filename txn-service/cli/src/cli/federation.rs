//! `writ federation create|list|show|update|delete|refresh`: SPIFFE federation
//! relationships, in SPIRE's shape (`spire-server federation ...`). docs/federation.md.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use writ_identity::proto::admin as pb;

use super::bundle::BundleFormat;
use super::out::{self, OutputArg, outln};
use super::{ServerSocket, status};

/// How the foreign bundle endpoint is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum EndpointProfile {
    /// The endpoint presents an X509-SVID of the foreign trust domain with
    /// `--endpoint-spiffe-id`, verified against the bundle held for it.
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    /// The endpoint presents a Web PKI certificate (system roots, or `--web-ca-path`).
    #[value(name = "https_web")]
    HttpsWeb,
}

impl EndpointProfile {
    fn name(self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

/// The settings `create` and `update` take.
#[derive(Debug, clap::Args)]
pub(crate) struct RelationshipArgs {
    /// The foreign trust domain (`partner.test`).
    #[arg(long)]
    trust_domain: String,
    /// Its bundle endpoint (`https://host:port/`).
    #[arg(long)]
    bundle_endpoint_url: String,
    /// How its endpoint is authenticated.
    #[arg(long, value_enum)]
    bundle_endpoint_profile: EndpointProfile,
    /// https_spiffe: the endpoint server's SPIFFE ID (a Writ server's is
    /// `spiffe://<td>/writ/server`).
    #[arg(long)]
    endpoint_spiffe_id: Option<String>,
    /// https_web: PEM CA certificates to verify the endpoint with instead of the system
    /// roots.
    #[arg(long, value_name = "FILE")]
    web_ca_path: Option<PathBuf>,
    /// A bundle of the trust domain to start from (https_spiffe authenticates the
    /// endpoint with it; `writ bundle show --format spiffe` on the other side).
    #[arg(long, value_name = "FILE")]
    trust_domain_bundle_path: Option<PathBuf>,
    /// The format of `--trust-domain-bundle-path`.
    #[arg(long, value_enum, default_value = "spiffe")]
    trust_domain_bundle_format: BundleFormat,
}

impl RelationshipArgs {
    fn to_proto(&self) -> anyhow::Result<pb::FederationRelationship> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(pb::FederationRelationship {
            trust_domain: self.trust_domain.clone(),
            bundle_endpoint_url: self.bundle_endpoint_url.clone(),
            bundle_endpoint_profile: self.bundle_endpoint_profile.name().to_owned(),
            endpoint_spiffe_id: self.endpoint_spiffe_id.clone().unwrap_or_default(),
            web_ca_pem: self
                .web_ca_path
                .as_ref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            trust_domain_bundle: self
                .trust_domain_bundle_path
                .as_ref()
                .map(read)
                .transpose()?
                .unwrap_or_default(),
            trust_domain_bundle_format: self.trust_domain_bundle_format.name().to_owned(),
            ..pb::FederationRelationship::default()
        })
    }
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum FederationCommand {
    /// Federate with a foreign trust domain: fetch its bundle from its endpoint.
    Create {
        #[command(flatten)]
        server: ServerSocket,
        #[command(flatten)]
        relationship: RelationshipArgs,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Replace a relationship's settings.
    Update {
        #[command(flatten)]
        server: ServerSocket,
        #[command(flatten)]
        relationship: RelationshipArgs,
        #[command(flatten)]
        output: OutputArg,
    },
    /// List relationships.
    List {
        #[command(flatten)]
        server: ServerSocket,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show one relationship with its last refresh and last error.
    Show {
        #[command(flatten)]
        server: ServerSocket,
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Stop federating (the held bundle stays until `writ bundle delete`).
    Delete {
        #[command(flatten)]
        server: ServerSocket,
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Fetch the foreign bundle now and show the outcome.
    Refresh {
        #[command(flatten)]
        server: ServerSocket,
        /// The foreign trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        output: OutputArg,
    },
}

fn unix(t: i64) -> String {
    if t <= 0 {
        return "never".into();
    }
    u64::try_from(t)
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|_| t.to_string())
}

fn to_json(r: &pb::FederationRelationship) -> serde_json::Value {
    serde_json::json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "bundle_endpoint_profile": r.bundle_endpoint_profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "web_ca": !r.web_ca_pem.is_empty(),
        "created_at": r.created_at,
        "last_refresh_at": r.last_refresh_at,
        "last_error": r.last_error,
        "next_refresh_at": r.next_refresh_at,
        "bundle_sequence": r.bundle_sequence,
        "has_bundle": r.has_bundle,
    })
}

fn print_one(r: &pb::FederationRelationship) -> anyhow::Result<()> {
    outln!("Trust domain         : {}", r.trust_domain)?;
    outln!("Bundle endpoint URL  : {}", r.bundle_endpoint_url)?;
    outln!("Profile              : {}", r.bundle_endpoint_profile)?;
    if !r.endpoint_spiffe_id.is_empty() {
        outln!("Endpoint SPIFFE ID   : {}", r.endpoint_spiffe_id)?;
    }
    if !r.web_ca_pem.is_empty() {
        outln!("Web CA               : given (not the system roots)")?;
    }
    if r.has_bundle {
        outln!("Bundle sequence      : {}", r.bundle_sequence)?;
    } else {
        outln!("Bundle               : none held yet")?;
    }
    outln!("Last refresh         : {}", unix(r.last_refresh_at))?;
    if !r.last_error.is_empty() {
        outln!("Last error           : {}", r.last_error)?;
    }
    outln!("Next refresh         : {}", unix(r.next_refresh_at))?;
    Ok(())
}

fn print(r: &pb::FederationRelationship, output: OutputArg) -> anyhow::Result<()> {
    if output.json() {
        out::json(&to_json(r))
    } else {
        print_one(r)
    }
}

pub(crate) async fn run(cmd: FederationCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        FederationCommand::Create {
            server,
            relationship,
            output,
        } => {
            let r = server
                .connect()
                .await?
                .create_federation(relationship.to_proto()?)
                .await
                .map_err(status)?
                .into_inner();
            print(&r, output)?;
        }
        FederationCommand::Update {
            server,
            relationship,
            output,
        } => {
            let r = server
                .connect()
                .await?
                .update_federation(relationship.to_proto()?)
                .await
                .map_err(status)?
                .into_inner();
            print(&r, output)?;
        }
        FederationCommand::List { server, output } => {
            let list = server
                .connect()
                .await?
                .list_federations(pb::ListFederationsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .relationships;
            if output.json() {
                out::json(&serde_json::Value::Array(
                    list.iter().map(to_json).collect(),
                ))?;
            } else {
                outln!("Found {} federation relationship(s)", list.len())?;
                for r in &list {
                    outln!()?;
                    print_one(r)?;
                }
            }
        }
        FederationCommand::Show {
            server,
            trust_domain,
            output,
        } => {
            let r = server
                .connect()
                .await?
                .get_federation(pb::FederationRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            print(&r, output)?;
        }
        FederationCommand::Delete {
            server,
            trust_domain,
            output,
        } => {
            let r = server
                .connect()
                .await?
                .delete_federation(pb::FederationRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            if output.json() {
                out::json(&to_json(&r))?;
            } else {
                outln!(
                    "Deleted the federation relationship with {} (its bundle stays until `writ bundle delete --id spiffe://{}`)",
                    r.trust_domain,
                    r.trust_domain
                )?;
            }
        }
        FederationCommand::Refresh {
            server,
            trust_domain,
            output,
        } => {
            let r = server
                .connect()
                .await?
                .refresh_federation(pb::FederationRequest { trust_domain })
                .await
                .map_err(status)?
                .into_inner();
            print(&r, output)?;
            if !r.last_error.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
