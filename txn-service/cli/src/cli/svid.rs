//! `writ x509 mint` and `writ jwt mint`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use writ_identity::key_manager::{set_mode, write_secret_file};
use writ_identity::proto::admin as pb;

use super::entry::field_status;
use super::out::{self, OutputArg, outln};
use super::{ServerSocket, parse_ttl};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum X509Command {
    /// Mint an X509-SVID (the server generates the key).
    Mint {
        #[command(flatten)]
        server: ServerSocket,
        /// The SPIFFE ID to put in the SVID.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (e.g. 1h; default: the server's).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// A DNS SAN; repeat for several.
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Write svid.pem, key.pem (0600) and bundle.pem into this directory instead of
        /// printing them.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum JwtCommand {
    /// Mint a JWT-SVID.
    Mint {
        #[command(flatten)]
        server: ServerSocket,
        /// The SPIFFE ID (the token's `sub`).
        #[arg(long)]
        spiffe_id: String,
        /// An audience; repeat for several.
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        /// Lifetime (e.g. 5m; default: the server's).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        #[command(flatten)]
        output: OutputArg,
    },
}

fn pem_blocks(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.clone())))
        .collect()
}

pub(crate) async fn run_x509(cmd: X509Command) -> anyhow::Result<ExitCode> {
    let X509Command::Mint {
        server,
        spiffe_id,
        ttl,
        dns_names,
        write,
        output,
    } = cmd;
    let minted = server
        .connect()
        .await?
        .mint_x509_svid(pb::MintX509SvidRequest {
            spiffe_id,
            ttl: ttl.unwrap_or(0),
            dns_names,
        })
        .await
        .map_err(field_status)?
        .into_inner();
    let svid = pem_blocks("CERTIFICATE", &minted.cert_chain);
    let bundle = pem_blocks("CERTIFICATE", &minted.bundle);
    let key = zeroize::Zeroizing::new(pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        minted.private_key,
    )));
    match write {
        Some(dir) => {
            write_files(&dir, &svid, &key, &bundle)?;
            let (svid, key, bundle) = (
                dir.join("svid.pem"),
                dir.join("key.pem"),
                dir.join("bundle.pem"),
            );
            if output.json() {
                out::json(&serde_json::json!({
                    "svid_file": svid,
                    "key_file": key,
                    "bundle_file": bundle,
                }))?;
            } else {
                outln!("X509-SVID written to {}", svid.display())?;
                outln!("Private key written to {}", key.display())?;
                outln!("Root CAs written to {}", bundle.display())?;
            }
        }
        None if output.json() => {
            out::json(&serde_json::json!({
                "svid_pem": svid,
                "key_pem": key.as_str(),
                "bundle_pem": bundle,
            }))?;
        }
        None => {
            outln!("X509-SVID:\n{svid}")?;
            outln!("Private key:\n{}", key.as_str())?;
            outln!("Root CAs:\n{bundle}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_files(dir: &Path, svid: &str, key: &str, bundle: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let public = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        set_mode(&path, 0o644).with_context(|| format!("cannot chmod {}", path.display()))
    };
    public("svid.pem", svid)?;
    public("bundle.pem", bundle)?;
    write_secret_file(&dir.join("key.pem"), key.as_bytes())?;
    Ok(())
}

pub(crate) async fn run_jwt(cmd: JwtCommand) -> anyhow::Result<ExitCode> {
    let JwtCommand::Mint {
        server,
        spiffe_id,
        audience,
        ttl,
        output,
    } = cmd;
    let minted = server
        .connect()
        .await?
        .mint_jwt_svid(pb::MintJwtSvidRequest {
            spiffe_id,
            audience,
            ttl: ttl.unwrap_or(0),
        })
        .await
        .map_err(field_status)?
        .into_inner();
    if output.json() {
        out::json(&serde_json::json!({ "token": minted.token }))?;
    } else {
        outln!("{}", minted.token)?;
    }
    Ok(ExitCode::SUCCESS)
}
