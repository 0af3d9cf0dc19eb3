//! Writ's example programs, built on `writ-sdk` as any user's service would be, with
//! their configs and deployments (`config/`, `deploy/`). Nothing here is a library
//! other packages should build on, except that `writ-cli` runs the [`roles`] for
//! `writ demo`; the `writ` binary and its CLI are in `writ-cli`.
//!
//! - `mtls_hello` (`src/bin/`): a SPIFFE mTLS hello world, server and client, each
//!   naming whom it accepts;
//! - `verify_service` (`src/bin/`): an HTTPS service that requires a known caller *and*
//!   a valid Txn-Token on every request;
//! - `gateway`, `planner`, `sub_agent` and `tool_server` ([`roles`], with thin binaries
//!   in `src/bin/`): the four programs of `writ demo`, a user's request through a
//!   gateway, a planner agent and the sub-agent it spawns to a tool, each with its own
//!   attested identity ([`demo`]).
//!
//! This library holds what they share (the Workload API flags with the programs' own
//! default socket, serving until a signal) and their routers, so tests can call the
//! routers directly. `docs/sdk.md` walks through them.
#![cfg_attr(
    test,
    expect(
        unused_crate_dependencies,
        reason = "unit tests see the dev-dependencies of the integration tests"
    )
)]
#![forbid(unsafe_code)]

pub mod demo;
pub mod roles;

use std::net::SocketAddr;
use std::process::ExitCode;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use writ_sdk::listener::{self, Peer, ServeError};
use writ_sdk::middleware::{TxnLayer, Verified};
use writ_sdk::tls::Authorizer;
use writ_sdk::workload::{ENDPOINT_ENV, WorkloadError, X509Source};
use writ_sdk::{SpiffeId, TrustDomain};

/// The Workload API socket the example programs use when neither `--socket` nor
/// `SPIFFE_ENDPOINT_SOCKET` names one: the default socket of `writ agent run` and of
/// the README's one-machine setup. (The SDK itself has no default socket.)
pub const DEFAULT_AGENT_SOCKET: &str = "unix:///tmp/writ/agent.sock";

/// Where a program gets its identity: the Workload API socket and, when the agent
/// issues several SVIDs to this process, which one to present.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// Workload API socket (`unix:///path`).
    #[arg(long = "socket", env = ENDPOINT_ENV, default_value = DEFAULT_AGENT_SOCKET)]
    pub endpoint: String,
    /// Present the SVID with this SPIFFE ID (default: the first the agent issues).
    #[arg(long)]
    pub spiffe_id: Option<SpiffeId>,
}

impl WorkloadArgs {
    /// Opens an [`X509Source`] on the socket, waiting for the identity to be issued.
    ///
    /// # Errors
    /// [`WorkloadError`] if the agent is unreachable or issues no (such) identity.
    pub async fn source(&self) -> Result<X509Source, WorkloadError> {
        let mut builder = X509Source::builder().endpoint(self.endpoint.clone());
        if let Some(id) = &self.spiffe_id {
            builder = builder.spiffe_id(id.clone());
        }
        builder.build().await
    }
}

/// An authorizer accepting any of `ids` and any member of `trust_domains`; `None` if
/// both are empty (the examples never fall back to accepting anyone).
pub fn any_of(ids: Vec<SpiffeId>, trust_domains: Vec<TrustDomain>) -> Option<Authorizer> {
    match (ids.is_empty(), trust_domains.is_empty()) {
        (true, true) => None,
        (false, true) => Some(Authorizer::one_of(ids)),
        _ => Some(Authorizer::union(
            std::iter::once(Authorizer::one_of(ids))
                .chain(trust_domains.into_iter().map(Authorizer::member_of)),
        )),
    }
}

/// `GET /hello`, answering `hello <caller SPIFFE ID>`.
pub fn hello_router() -> Router {
    Router::new().route("/hello", get(hello))
}

async fn hello(ConnectInfo(peer): ConnectInfo<Peer>) -> Result<String, StatusCode> {
    // The listener requires a client SVID, so the ID is always there.
    let id = peer.id.ok_or(StatusCode::UNAUTHORIZED)?;
    Ok(format!("hello {id}"))
}

/// `GET /orders` behind `layer`: the verified user, caller and transaction as JSON.
pub fn orders_router(layer: TxnLayer) -> Router {
    Router::new().route("/orders", get(orders)).layer(layer)
}

async fn orders(v: Verified) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "user": v.txn.sub,
        "caller": v.caller.to_string(),
        "txn": v.txn.txn,
        "scope": v.txn.scope,
        "chain": v.txn.chain(),
    }))
}

/// Binds `listen`, prints the ready line (`listening on <addr> as <SPIFFE ID>`) and
/// serves `app` over mTLS to the clients `clients` accepts until Ctrl-C or SIGTERM.
///
/// # Errors
/// [`ServeError`] if the address cannot be bound or the listener fails.
pub async fn serve_until_signal(
    app: Router,
    source: &X509Source,
    clients: Authorizer,
    listen: SocketAddr,
) -> Result<(), ServeError> {
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    println!(
        "listening on {} as {}",
        tcp.local_addr()?,
        source.spiffe_id()
    );
    listener::serve(app, source, clients, tcp, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

/// Runs an example program: logging from `WRIT_LOG`, the aws-lc-rs crypto provider,
/// a Tokio runtime for `program`, and any error printed as one line with exit code 1.
pub fn main_with(program: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    // One crypto backend, installed explicitly as a guard against a second one.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(program));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at the level `WRIT_LOG` names (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WRIT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// An error and its causes on one line (`a: b: c`), skipping a cause whose text the
/// line already holds, for the programs' `error: ...` line.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = e.source();
    }
    line.replace('\n', " ")
}

/// The Rust snippets of the SDK guide (`docs/sdk.md`) compile as doctests of this
/// crate, so the guide cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../docs/sdk.md")]
pub struct SdkGuide;

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    async fn say_hello(peer_id: Option<SpiffeId>) -> (StatusCode, String) {
        let peer = Peer {
            addr: SocketAddr::from(([127, 0, 0, 1], 40000)),
            id: peer_id,
            cert_sha256: None,
        };
        let request = Request::get("/hello")
            .extension(ConnectInfo(peer))
            .body(Body::empty())
            .unwrap();
        let response = hello_router().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn hello_names_the_caller() {
        let caller = id("spiffe://example.org/hello-client");
        assert_eq!(
            say_hello(Some(caller)).await,
            (
                StatusCode::OK,
                "hello spiffe://example.org/hello-client".into()
            )
        );
        assert_eq!(say_hello(None).await.0, StatusCode::UNAUTHORIZED);
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn any_of_never_accepts_anyone() {
        assert!(any_of(vec![], vec![]).is_none());
        let ids = any_of(vec![id("spiffe://example.org/a")], vec![]).unwrap();
        assert!(ids.allows(&id("spiffe://example.org/a")));
        assert!(!ids.allows(&id("spiffe://example.org/b")));
        let both = any_of(
            vec![id("spiffe://other.org/a")],
            vec![TrustDomain::new("example.org").unwrap()],
        )
        .unwrap();
        assert!(both.allows(&id("spiffe://other.org/a")));
        assert!(both.allows(&id("spiffe://example.org/anyone")));
        assert!(!both.allows(&id("spiffe://other.org/b")));
    }
}
