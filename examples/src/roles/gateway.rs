//! The demo's gateway (`writ demo`): the ingress a user's client calls, over plain HTTP
//! on loopback with an OIDC access token (`Authorization: Bearer ...`). It exchanges the
//! user's token at the transaction token service (RFC 8693, authenticated by its own
//! X509-SVID) for a Txn-Token, and calls the planner over mTLS with it. The transaction's
//! W3C trace starts here (or continues the client's `traceparent`) and every later hop
//! carries it.
//!
//! ```sh
//! gateway --listen 127.0.0.1:0 --tts-url https://127.0.0.1:8443 \
//!   --tts-id spiffe://example.org/writ/tts \
//!   --planner-url https://127.0.0.1:8445 --planner-id spiffe://example.org/demo/planner
//! ```
//!
//! `POST /ask` with `{"question": "..."}` answers the chain of hop reports.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use crate::WorkloadArgs;
use crate::demo::TtsArgs;
use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use serde_json::{Value, json};
use writ_sdk::SpiffeId;
use writ_sdk::exchange::{TxnClient, TxnRequest};
use writ_sdk::tls::{self, Authorizer};
use writ_sdk::trace::{TRACEPARENT, TraceContext};
use writ_sdk::txn_token::HEADER;

/// Longest bearer token accepted.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Serve `POST /ask` to users with an OIDC access token.
#[derive(Debug, Parser)]
#[command(name = "gateway", about, long_about = None)]
struct Cli {
    /// Address to listen on, plain HTTP (port 0 picks a free one; the ready line shows it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[command(flatten)]
    tts: TtsArgs,
    /// The planner's base URL.
    #[arg(long)]
    planner_url: String,
    /// The planner's SPIFFE ID.
    #[arg(long)]
    planner_id: SpiffeId,
    /// The scope to ask for (the user's token and the policy cap it).
    #[arg(long, default_value = "docs.read docs.summarize")]
    scope: String,
    #[command(flatten)]
    workload: WorkloadArgs,
}

struct Gateway {
    me: String,
    tts: TxnClient,
    planner: reqwest::Client,
    cli: Cli,
}

type Failure = (StatusCode, Json<Value>);

fn fail(status: StatusCode, error: &str, description: impl Into<String>) -> Failure {
    (
        status,
        Json(json!({ "error": error, "error_description": description.into() })),
    )
}

/// Runs the gateway with the process's arguments (`argv[0]` is the program name).
pub fn main() -> ExitCode {
    crate::main_with(run(Cli::parse()))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let source = cli.workload.source().await.context("no identity")?;
    let tts = cli.tts.client(&source)?;
    let planner = tls::http_client(&source, Authorizer::id(cli.planner_id.clone()))?;
    let me = source.spiffe_id().to_string();
    let tcp = tokio::net::TcpListener::bind(cli.listen).await?;
    let gateway = Arc::new(Gateway {
        me,
        tts,
        planner,
        cli,
    });
    let app = Router::new()
        .route("/ask", post(ask))
        .layer(DefaultBodyLimit::max(crate::demo::MAX_BODY_BYTES))
        .with_state(gateway.clone());
    println!("listening on {} as {}", tcp.local_addr()?, gateway.me);
    axum::serve(tcp, app)
        .with_graceful_shutdown(crate::shutdown_signal())
        .await?;
    Ok(())
}

async fn ask(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Json<Value>, Failure> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES)
        .ok_or_else(|| {
            fail(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "send the user's access token as `Authorization: Bearer <token>`",
            )
        })?;
    let question = body
        .get("question")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    // The transaction's trace starts here, or continues the user's client's.
    let trace = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceContext::parse(v).ok())
        .unwrap_or_else(TraceContext::new_root);
    let issued = gateway
        .tts
        .exchange(
            TxnRequest::access_token(token)
                .scope(gateway.cli.scope.clone())
                .request_details(json!({ "action": "ask", "question": question }))
                .trace(trace.child()),
        )
        .await
        .map_err(|e| fail(StatusCode::FORBIDDEN, "exchange_refused", e.to_string()))?;
    let mut request = gateway
        .planner
        .post(format!("{}/plan", gateway.cli.planner_url))
        .header(HEADER, &issued.access_token);
    for (name, value) in trace.child().headers() {
        request = request.header(name, value);
    }
    let response = request
        .json(&json!({ "question": question }))
        .send()
        .await
        .map_err(|e| {
            fail(
                StatusCode::BAD_GATEWAY,
                "planner_unreachable",
                e.to_string(),
            )
        })?;
    let report = crate::demo::json_or_error(response, "planner")
        .await
        .map_err(|e| fail(StatusCode::BAD_GATEWAY, "planner_failed", e.to_string()))?;
    Ok(Json(json!({
        "hop": "gateway",
        "spiffe_id": gateway.me,
        "trace_id": trace.trace_id(),
        "exchanged": {
            "subject_token_type": "access_token",
            "scope": gateway.cli.scope,
            "expires_in": issued.expires_in,
        },
        "next": report,
    })))
}
