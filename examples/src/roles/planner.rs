//! The demo's planner agent (`writ demo`): an HTTPS service that the gateway calls with
//! a Txn-Token. It verifies the caller (the gateway's SVID) and the token, replaces the
//! token so that it names the planner as the current actor, spawns the sub-agent program
//! through the SDK (a child SVID under the planner's, a lease that ends with it) with the
//! replaced token, and answers with the sub-agent's report. Each verification is
//! recorded to the token service (`writ audit txn` shows it), and the gateway's
//! `traceparent` is continued in the exchange and handed to the sub-agent (`TRACEPARENT`).
//!
//! ```sh
//! planner --listen 127.0.0.1:0 --trust-domain example.org \
//!   --tts-url https://127.0.0.1:8443 --tts-id spiffe://example.org/writ/tts \
//!   --gateway spiffe://example.org/demo/gateway --sub-agent target/release/sub_agent \
//!   --tool-url https://127.0.0.1:8446 --tool-id spiffe://example.org/demo/tool-server
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::demo::TtsArgs;
use crate::{WorkloadArgs, serve_until_signal};
use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::middleware::{TxnLayer, TxnPolicy, Verified};
use writ_sdk::spawn::Spawn;
use writ_sdk::tls::Authorizer;
use writ_sdk::{SpiffeId, TrustDomain};

/// Serve `POST /plan` to the gateway; spawn a sub-agent per request.
#[derive(Debug, Parser)]
#[command(name = "planner", about, long_about = None)]
struct Cli {
    /// Address to listen on (port 0 picks a free one; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:8445")]
    listen: SocketAddr,
    /// The trust domain of callers and tokens.
    #[arg(long)]
    trust_domain: TrustDomain,
    #[command(flatten)]
    tts: TtsArgs,
    /// The only caller accepted.
    #[arg(long)]
    gateway: SpiffeId,
    /// The sub-agent program.
    #[arg(long)]
    sub_agent: PathBuf,
    /// The sub-agent's lease, in seconds (the entry's spawn policy caps it).
    #[arg(long, default_value_t = 60)]
    sub_agent_ttl: u64,
    /// The tool server the sub-agent calls.
    #[arg(long)]
    tool_url: String,
    /// The tool server's SPIFFE ID.
    #[arg(long)]
    tool_id: SpiffeId,
    #[command(flatten)]
    workload: WorkloadArgs,
}

struct Planner {
    me: String,
    tts: TxnClient,
    cli: Cli,
}

/// Runs the planner with the process's arguments (`argv[0]` is the program name).
pub fn main() -> ExitCode {
    crate::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let source = cli.workload.source().await.context("no identity")?;
    let tts = cli.tts.client(&source)?;
    let verifier = cli.tts.verifier(&source, &cli.trust_domain)?;
    // Every verification goes to the token service, so `writ audit txn` shows this hop.
    let audit = cli.tts.audit_sink(&tts)?;
    let policy = TxnPolicy::new(Authorizer::id(cli.gateway.clone()))
        .require_scope("docs.summarize")
        .strict_chain();
    let listen = cli.listen;
    let members = Authorizer::member_of(cli.trust_domain.clone());
    let planner = Arc::new(Planner {
        me: source.spiffe_id().to_string(),
        tts,
        cli,
    });
    let app = Router::new()
        .route("/plan", post(plan))
        .layer(TxnLayer::new(verifier, policy).with_audit(source.spiffe_id(), audit.clone()))
        .layer(DefaultBodyLimit::max(crate::demo::MAX_BODY_BYTES))
        .with_state(planner);
    let served = serve_until_signal(app, &source, members, listen).await;
    audit.0.shutdown().await;
    served?;
    Ok(())
}

async fn plan(
    State(planner): State<Arc<Planner>>,
    v: Verified,
    Json(body): Json<Value>,
) -> Result<Json<Value>, (StatusCode, Json<Value>)> {
    let question = body.get("question").and_then(Value::as_str).unwrap_or("");
    match delegate(&planner, &v, question).await {
        Ok(report) => Ok(Json(report)),
        Err(e) => {
            let reason = crate::one_line(e.as_ref());
            tracing::warn!(error = %reason, "delegation failed");
            Err((
                StatusCode::BAD_GATEWAY,
                Json(json!({ "error": "delegation_failed", "error_description": reason })),
            ))
        }
    }
}

/// Replaces the token, runs the sub-agent with it, and returns the planner's report.
async fn delegate(planner: &Planner, v: &Verified, question: &str) -> anyhow::Result<Value> {
    let cli = &planner.cli;
    // Name the planner in the chain before handing the token on, in the caller's trace.
    let replaced = planner
        .tts
        .exchange(TxnRequest::txn_token(v.token.clone()).trace(v.next_trace()))
        .await
        .context("replacing the Txn-Token")?;
    let mut command = std::process::Command::new(&cli.sub_agent);
    command
        .arg("--tts-url")
        .arg(&cli.tts.tts_url)
        .arg("--tts-id")
        .arg(cli.tts.tts_id.to_string())
        .arg("--tool-url")
        .arg(&cli.tool_url)
        .arg("--tool-id")
        .arg(cli.tool_id.to_string())
        .arg("--scope")
        .arg("docs.read")
        .arg("--query")
        .arg(question)
        // The sub-agent continues the trace (`TRACEPARENT`, `TRACESTATE`).
        .envs(v.next_trace().env());
    let mut child = Spawn::new("summarize", command)
        .ttl(Duration::from_secs(cli.sub_agent_ttl))
        .txn_token(replaced.access_token)
        .stdout(Stdio::piped())
        .spawn()
        .await
        .context("spawning the sub-agent")?;
    let lease = child.lease().clone();
    tracing::info!(child = %lease.child_id, pid = lease.pid, "sub-agent spawned");
    let mut stdout = child
        .child_mut()
        .stdout
        .take()
        .context("no sub-agent stdout")?;
    let mut out = Vec::new();
    (&mut stdout)
        .take(crate::demo::MAX_BODY_BYTES as u64)
        .read_to_end(&mut out)
        .await
        .context("reading the sub-agent's report")?;
    let status = child.wait().await.context("waiting for the sub-agent")?;
    anyhow::ensure!(status.success(), "the sub-agent failed ({status})");
    let report: Value =
        serde_json::from_slice(&out).context("the sub-agent's report is not JSON")?;
    Ok(json!({
        "hop": "planner",
        "spiffe_id": planner.me,
        "verified": crate::demo::verified_json(v),
        "lease": {
            "id": lease.id,
            "child_id": lease.child_id,
            "pid": lease.pid,
            "expires_in": lease
                .expires_at
                .duration_since(std::time::SystemTime::now())
                .map(|d| d.as_secs())
                .unwrap_or(0),
        },
        "next": report,
    }))
}
