//! The demo's tool server (`writ demo`): an HTTPS service that answers only the
//! planner's sub-agents, and only with a valid Txn-Token that grants `docs.read` and names
//! the caller as its current actor.
//!
//! ```sh
//! tool_server --listen 127.0.0.1:0 --trust-domain example.org \
//!   --tts-url https://127.0.0.1:8443 --tts-id spiffe://example.org/writ/tts \
//!   --caller-prefix /demo/planner/sub --scope docs.read
//! ```
//!
//! `POST /search` with `{"query": "..."}` answers what it verified (the caller's SPIFFE
//! ID from its X509-SVID, the user, the scope, the transaction and the `act` chain) and a
//! made-up search result. Each verification, allowed or refused, is recorded to the token
//! service (`writ_sdk::audit::TtsSink`) and logged.

use std::net::SocketAddr;
use std::process::ExitCode;

use crate::demo::TtsArgs;
use crate::{WorkloadArgs, serve_until_signal};
use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};
use writ_sdk::TrustDomain;
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::tls::Authorizer;

/// Serve `POST /search` to the planner's sub-agents.
#[derive(Debug, Parser)]
#[command(name = "tool_server", about, long_about = None)]
struct Cli {
    /// Address to listen on (port 0 picks a free one; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:8446")]
    listen: SocketAddr,
    /// The trust domain of callers and tokens.
    #[arg(long)]
    trust_domain: TrustDomain,
    #[command(flatten)]
    tts: TtsArgs,
    /// Accept callers whose SPIFFE ID path is this or lies under it.
    #[arg(long)]
    caller_prefix: String,
    /// Require the token to grant this scope; repeat for several.
    #[arg(long, default_value = "docs.read")]
    scope: Vec<String>,
    #[command(flatten)]
    workload: WorkloadArgs,
}

/// Runs the tool_server with the process's arguments (`argv[0]` is the program name).
pub fn main() -> ExitCode {
    crate::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let source = cli.workload.source().await.context("no identity")?;
    let verifier = cli.tts.verifier(&source, &cli.trust_domain)?;
    // Every verification goes to the token service, so `writ audit txn` shows this hop.
    let audit = cli.tts.audit_sink(&cli.tts.client(&source)?)?;
    let callers = Authorizer::path_prefix(cli.trust_domain.clone(), cli.caller_prefix);
    let mut policy = TxnPolicy::new(callers).strict_chain();
    for scope in cli.scope {
        policy = policy.require_scope(scope);
    }
    let me = source.spiffe_id().to_string();
    let app = Router::new()
        .route(
            "/search",
            post(move |v: Verified, Json(body): Json<Value>| search(me.clone(), v, body)),
        )
        .layer(TxnLayer::new(verifier, policy).with_audit(source.spiffe_id(), audit.clone()))
        .layer(DefaultBodyLimit::max(crate::demo::MAX_BODY_BYTES));
    // TLS admits the trust domain; the policy then names the callers, so a workload that
    // is not allowed gets a JSON 403 rather than a TLS alert.
    let members = Authorizer::member_of(cli.trust_domain);
    let served = serve_until_signal(app, &source, members, cli.listen).await;
    audit.0.shutdown().await;
    served?;
    Ok(())
}

async fn search(me: String, v: Verified, body: Value) -> Json<Value> {
    let query = body.get("query").and_then(Value::as_str).unwrap_or("");
    tracing::info!(caller = %v.caller, user = %v.txn.sub, txn = %v.txn.txn, "search");
    Json(json!({
        "hop": "tool_server",
        "spiffe_id": me,
        "verified": crate::demo::verified_json(&v),
        "result": [
            format!("doc-17: notes on {query}"),
            format!("doc-42: a summary of {query}"),
        ],
    }))
}
