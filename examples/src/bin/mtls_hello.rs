//! SPIFFE mTLS hello world.
//!
//! ```sh
//! mtls_hello server --listen 127.0.0.1:8444 --allow spiffe://example.org/hello-client \
//!   --spiffe-id spiffe://example.org/hello-server
//! mtls_hello client --url https://127.0.0.1:8444/hello \
//!   --server-id spiffe://example.org/hello-server --spiffe-id spiffe://example.org/hello-client
//! ```
//!
//! Both sides get their X509-SVID from the Workload API (`SPIFFE_ENDPOINT_SOCKET` or
//! `--socket`) and name whom they accept: the server a list of client IDs and/or trust
//! domains, the client the server's exact ID. Neither has a default that accepts anyone.
#![expect(
    unused_crate_dependencies,
    reason = "a binary target sees every dependency of its package"
)]

use std::io::Read as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use writ_examples::{WorkloadArgs, any_of, serve_until_signal};
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::txn_token::HEADER;
use writ_sdk::{SpiffeId, TrustDomain};

/// SPIFFE mTLS hello world.
#[derive(Debug, Parser)]
#[command(name = "mtls_hello", about, long_about = None)]
enum Cli {
    /// Serve `GET /hello` to the clients named by --allow / --allow-trust-domain.
    Server {
        /// Address to listen on (port 0 picks a free one; the ready line shows it).
        #[arg(long, default_value = "127.0.0.1:8444")]
        listen: SocketAddr,
        /// Accept a client with this SPIFFE ID; repeat for several.
        #[arg(long, required_unless_present = "allow_trust_domain")]
        allow: Vec<SpiffeId>,
        /// Accept every client of this trust domain; repeat for several.
        #[arg(long)]
        allow_trust_domain: Vec<TrustDomain>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Call the server and print its answer.
    Client {
        /// The URL to GET.
        #[arg(long, default_value = "https://127.0.0.1:8444/hello")]
        url: String,
        /// Accept only a server with this SPIFFE ID.
        #[arg(long)]
        server_id: SpiffeId,
        /// Send this Txn-Token (a file, or `-` for standard input) in the `Txn-Token`
        /// header, e.g. to call `verify_service`.
        #[arg(long)]
        txn_token: Option<String>,
        #[command(flatten)]
        workload: WorkloadArgs,
    },
}

fn main() -> ExitCode {
    writ_examples::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli {
        Cli::Server {
            listen,
            allow,
            allow_trust_domain,
            workload,
        } => {
            let clients = any_of(allow, allow_trust_domain)
                .context("name the clients to accept with --allow or --allow-trust-domain")?;
            let source = workload.source().await.context("no identity")?;
            serve_until_signal(writ_examples::hello_router(), &source, clients, listen).await?;
            Ok(())
        }
        Cli::Client {
            url,
            server_id,
            txn_token,
            workload,
        } => {
            let source = workload.source().await.context("no identity")?;
            let mut request = tls::http_client(&source, Authorizer::id(server_id))?.get(&url);
            if let Some(path) = txn_token {
                request = request.header(HEADER, read_token(&path)?);
            }
            let response = request.send().await.with_context(|| format!("GET {url}"))?;
            let status = response.status();
            let body = response.text().await.context("reading the answer")?;
            if !status.is_success() {
                bail!("HTTP {status}: {}", body.trim());
            }
            println!("{}", body.trim_end());
            Ok(())
        }
    }
}

/// A token from a file, or from standard input for `-`, without surrounding whitespace.
fn read_token(path: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if path == "-" {
        std::io::stdin()
            .take(64 * 1024)
            .read_to_string(&mut text)
            .context("reading the Txn-Token from standard input")?;
    } else {
        text = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    }
    Ok(text.trim().to_owned())
}
