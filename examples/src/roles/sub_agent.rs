//! The demo's sub-agent (`writ demo`): a short-lived program the planner spawns through
//! the SDK (`writ_sdk::spawn::Spawn`). It gets its own SPIFFE ID from its lease, under the
//! planner's (`.../planner/sub/summarize-<8 hex>`), replaces the planner's Txn-Token
//! (from `WRIT_TXN_TOKEN`) for a narrower one naming itself as the current actor, calls
//! the tool server over mTLS with it, and prints one JSON report on standard output.

use std::process::ExitCode;

use crate::WorkloadArgs;
use crate::demo::TtsArgs;
use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use writ_sdk::SpiffeId;
use writ_sdk::exchange::TxnRequest;
use writ_sdk::spawn::TXN_TOKEN_ENV;
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::trace::TraceContext;
use writ_sdk::txn_token::HEADER;

/// Replace the inherited Txn-Token and call the tool server with it.
#[derive(Debug, Parser)]
#[command(name = "sub_agent", about, long_about = None)]
struct Cli {
    #[command(flatten)]
    tts: TtsArgs,
    /// The tool server's base URL.
    #[arg(long)]
    tool_url: String,
    /// The tool server's SPIFFE ID.
    #[arg(long)]
    tool_id: SpiffeId,
    /// The scope to narrow the token to.
    #[arg(long, default_value = "docs.read")]
    scope: String,
    /// What to search for.
    #[arg(long, default_value = "")]
    query: String,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Runs the sub_agent with the process's arguments (`argv[0]` is the program name).
pub fn main() -> ExitCode {
    crate::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let token = std::env::var(TXN_TOKEN_ENV)
        .with_context(|| format!("no Txn-Token in {TXN_TOKEN_ENV}: run me through Spawn"))?;
    let source = cli.workload.source().await.context("no identity")?;
    let tts = cli.tts.client(&source)?;
    // The planner's trace, handed down in the environment (a new one if it sent none).
    let trace = TraceContext::from_env().unwrap_or_else(TraceContext::new_root);
    let replaced = tts
        .exchange(
            TxnRequest::txn_token(token)
                .scope(cli.scope.clone())
                .trace(trace.child()),
        )
        .await
        .context("replacing the Txn-Token")?;
    let tool = tls::http_client(&source, Authorizer::id(cli.tool_id))?;
    let mut request = tool
        .post(format!("{}/search", cli.tool_url))
        .header(HEADER, &replaced.access_token);
    for (name, value) in trace.child().headers() {
        request = request.header(name, value);
    }
    let response = request
        .json(&json!({ "query": cli.query }))
        .send()
        .await
        .context("calling the tool server")?;
    let report = crate::demo::json_or_error(response, "tool server").await?;
    let out: Value = json!({
        "hop": "sub_agent",
        "spiffe_id": source.spiffe_id().to_string(),
        "replaced": { "scope": cli.scope, "expires_in": replaced.expires_in },
        "next": report,
    });
    println!("{out}");
    Ok(())
}
