//! An HTTPS service that requires a known caller and a valid Txn-Token.
//!
//! ```sh
//! verify_service --listen 127.0.0.1:8445 --trust-domain example.org \
//!   --jwks-url https://127.0.0.1:8443/.well-known/jwks.json --tts-id spiffe://example.org/writ/tts \
//!   --allow spiffe://example.org/gateway --scope orders.read \
//!   --spiffe-id spiffe://example.org/orders
//! ```
//!
//! `GET /orders` answers `{"user", "caller", "txn", "scope", "chain"}` when the mTLS
//! caller is one of `--allow` and its `Txn-Token` header verifies against the
//! transaction token service's keys (fetched over mTLS from `--jwks-url`, or read from
//! `--jwks-file`); otherwise the JSON error of `writ_sdk::middleware`.
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use writ_examples::{WorkloadArgs, serve_until_signal};
use writ_sdk::middleware::{TxnLayer, TxnPolicy};
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::txn_token::{JwksSource, TxnVerifier};
use writ_sdk::workload::X509Source;
use writ_sdk::{SpiffeId, TrustDomain};

/// Serve `GET /orders` to known callers carrying a valid Txn-Token.
#[derive(Debug, Parser)]
#[command(name = "verify_service", about, long_about = None)]
struct Cli {
    /// Address to listen on (port 0 picks a free one; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:8445")]
    listen: SocketAddr,
    /// The trust domain: Txn-Tokens must be for it (`aud`), callers must belong to it.
    #[arg(long)]
    trust_domain: TrustDomain,
    #[command(flatten)]
    keys: KeysArgs,
    /// The transaction token service's SPIFFE ID: --jwks-url is fetched only from it.
    #[arg(long, requires = "jwks_url", conflicts_with = "jwks_file")]
    tts_id: Option<SpiffeId>,
    /// Accept a caller with this SPIFFE ID; repeat for several.
    #[arg(long, required = true)]
    allow: Vec<SpiffeId>,
    /// Require the Txn-Token to grant this scope; repeat for several.
    #[arg(long)]
    scope: Vec<String>,
    /// Require the caller to be the token's current actor (the outermost `act`, or
    /// `req_wl` when the token was not delegated).
    #[arg(long)]
    strict: bool,
    /// Also require the token's `iss` to be this.
    #[arg(long)]
    issuer: Option<String>,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Where the transaction token service's signing keys come from.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct KeysArgs {
    /// The service's JWKS URL, fetched over mTLS (needs --tts-id).
    #[arg(long, requires = "tts_id")]
    jwks_url: Option<String>,
    /// A JWKS file, read again when a token names an unknown key.
    #[arg(long)]
    jwks_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    writ_examples::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let source = cli.workload.source().await.context("no identity")?;
    let keys = jwks_source(&cli.keys, cli.tts_id.as_ref(), &source)?;
    let mut verifier = TxnVerifier::builder(cli.trust_domain.clone(), keys);
    if let Some(issuer) = cli.issuer {
        verifier = verifier.issuer(issuer);
    }
    let verifier = verifier.build();
    // Load the keys now, so a wrong URL or file shows at start; until they load,
    // requests get 503 `keys_unavailable`.
    if let Err(e) = verifier.refresh().await {
        tracing::warn!(error = %e, "Txn-Token signing keys not loaded yet");
    }
    let mut policy = TxnPolicy::new(Authorizer::one_of(cli.allow));
    for scope in cli.scope {
        policy = policy.require_scope(scope);
    }
    if cli.strict {
        policy = policy.strict_chain();
    }
    let app = writ_examples::orders_router(TxnLayer::new(verifier, policy));
    // TLS admits any member of the trust domain; the policy then names the callers, so
    // a known workload that is not allowed gets a JSON 403 rather than a TLS alert.
    let members = Authorizer::member_of(cli.trust_domain);
    serve_until_signal(app, &source, members, cli.listen).await?;
    Ok(())
}

fn jwks_source(
    keys: &KeysArgs,
    tts_id: Option<&SpiffeId>,
    source: &X509Source,
) -> anyhow::Result<JwksSource> {
    match (&keys.jwks_url, &keys.jwks_file, tts_id) {
        (Some(url), None, Some(tts)) => Ok(JwksSource::Url {
            url: url.clone(),
            http: tls::http_client(source, Authorizer::id(tts.clone()))?,
        }),
        (None, Some(file), None) => Ok(JwksSource::File(file.clone())),
        _ => anyhow::bail!("give --jwks-url with --tts-id, or --jwks-file"),
    }
}
