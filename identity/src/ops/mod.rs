//! The operations listener every part (identity server, agent, token service) can run:
//! plain HTTP, off unless configured (`[ops] listen = "127.0.0.1:9464"` in server.toml,
//! agent.toml or txn.toml; SPIRE's telemetry is opt-in too), serving
//!
//! - `GET /metrics`: the part's own metrics ([`metrics`]), OpenMetrics text as
//!   Prometheus scrapes it;
//! - `GET /healthz`: alive, always `200 {"status":"alive"}` while the process answers;
//! - `GET /readyz`: ready, `200` when every check of the part's [`Readiness`] passes,
//!   `503` with a JSON body naming the failing check otherwise. The readiness function is
//!   the one the part's gRPC health answer (`writ healthcheck`) uses, so both agree.
//!
//! Each part builds its own [`Ops`] (its own registry: `writ dev`'s three parts stay
//! apart); [`router`] turns it into an `axum::Router`, which a part may extend (the token
//! service merges its explorer into it) before [`start`] serves it.
//!
//! ```no_run
//! use std::sync::Arc;
//! use writ_identity::ops::{self, Ops, OpsConfig, Readiness};
//! use writ_identity::ops::metrics::ServerMetrics;
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let metrics = Arc::new(ServerMetrics::new());
//! let ops = Ops::new(metrics.registry(), Arc::new(|| Box::pin(async { Readiness::new(vec![]) })));
//! let config = OpsConfig::parse("127.0.0.1:9464")?;
//! let running = ops::start(&config, ops::router(ops)).await?;
//! println!("metrics on http://{}/metrics", running.addr());
//! # Ok(()) }
//! ```

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use writ_spiffe::accept::{AcceptBackoff, ConnectionLimits, Gate};

pub use prometheus_client;

/// The metrics path.
pub const METRICS_PATH: &str = "/metrics";
/// The liveness path.
pub const HEALTHZ_PATH: &str = "/healthz";
/// The readiness path.
pub const READYZ_PATH: &str = "/readyz";
/// The largest request head (request line and headers) the listener reads; a larger one
/// is refused with `431`.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// The longest a connection may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The content type of `/metrics`.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the operations listener could not be configured or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpsError {
    /// `[ops] listen` is not an `ip:port` address.
    #[error("[ops] listen = {value:?}: not an ip:port address (e.g. \"127.0.0.1:9464\")")]
    Listen {
        /// The value as written.
        value: String,
    },
    /// The address could not be bound.
    #[error("operations listener {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// `[ops]` as written in server.toml, agent.toml or txn.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOps {
    /// `ip:port` of the operations listener (port 0 picks one).
    pub listen: Option<String>,
}

/// The validated `[ops]` section: where the listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpsConfig {
    /// The address (plain HTTP: keep it on loopback or a private network).
    pub listen: SocketAddr,
}

impl OpsConfig {
    /// Parses an `ip:port` address.
    ///
    /// # Errors
    /// [`OpsError::Listen`] if it is not one.
    pub fn parse(listen: &str) -> Result<Self, OpsError> {
        listen
            .trim()
            .parse()
            .map(|listen| Self { listen })
            .map_err(|_| OpsError::Listen {
                value: listen.chars().take(256).collect(),
            })
    }

    /// The listener an `[ops]` section asks for: `None` when the section or its `listen`
    /// is absent (no listener).
    ///
    /// # Errors
    /// [`OpsError::Listen`] for an address that does not parse.
    pub fn from_file(file: Option<FileOps>) -> Result<Option<Self>, OpsError> {
        file.and_then(|f| f.listen)
            .map(|l| Self::parse(&l))
            .transpose()
    }
}

/// One readiness check: its name, whether it passed and, if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What is checked (`identity`, `store`, `keys`, `registration`, ...).
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// Why it failed (one line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Check {
    /// A passed check.
    pub fn pass(name: &'static str) -> Self {
        Self {
            name,
            ok: true,
            error: None,
        }
    }

    /// A failed check and why.
    pub fn fail(name: &'static str, error: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            error: Some(error.into()),
        }
    }

    /// Passed when `result` is `Ok`, failed with its error otherwise.
    pub fn of<T, E: std::fmt::Display>(name: &'static str, result: Result<T, E>) -> Self {
        match result {
            Ok(_) => Self::pass(name),
            Err(e) => Self::fail(name, e.to_string()),
        }
    }
}

/// A part's readiness: the `/readyz` body (and, as one line, the gRPC health answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// Whether every check passed.
    pub ready: bool,
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl Readiness {
    /// The readiness of these checks.
    pub fn new(checks: Vec<Check>) -> Self {
        Self {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// The first failing check.
    pub fn failing(&self) -> Option<&Check> {
        self.checks.iter().find(|c| !c.ok)
    }

    /// Why the part is not ready, in one line (`check: error; check: error`), or `None`.
    pub fn reason(&self) -> Option<String> {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.error.as_deref().unwrap_or("failed")))
            .collect();
        (!failed.is_empty()).then(|| failed.join("; "))
    }
}

/// Computes a part's readiness when asked.
pub type ReadyFn = Arc<dyn Fn() -> BoxFuture<'static, Readiness> + Send + Sync>;
/// Brings the gauges that are read from state (expiries, cache sizes) up to date before
/// a scrape.
pub type RefreshFn = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// What a part's operations listener serves: its registry, its readiness and the gauge
/// refresh run before each scrape.
#[derive(Clone)]
pub struct Ops {
    registry: Arc<Registry>,
    ready: ReadyFn,
    refresh: Option<RefreshFn>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("refresh", &self.refresh.is_some())
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// Serves `registry` and the readiness `ready` computes.
    pub fn new(registry: Arc<Registry>, ready: ReadyFn) -> Self {
        Self {
            registry,
            ready,
            refresh: None,
        }
    }

    /// Runs `refresh` before every scrape.
    pub fn with_refresh(mut self, refresh: RefreshFn) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// The readiness now.
    pub async fn readiness(&self) -> Readiness {
        (self.ready)().await
    }

    /// The OpenMetrics exposition now (refreshed first).
    pub async fn exposition(&self) -> String {
        if let Some(refresh) = &self.refresh {
            refresh().await;
        }
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "could not encode the metrics");
        }
        text
    }
}

/// The operations router: `GET /metrics`, `/healthz`, `/readyz`; any other path `404`
/// ([`not_found`]), any other method `405`.
pub fn router(ops: Ops) -> Router {
    routes(ops).fallback(not_found)
}

/// The JSON `404` of the operations listener.
pub async fn not_found() -> Response {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({"error": "not_found"}),
    )
}

/// [`router`] without its fallback, for a part that merges more routes into it (axum
/// refuses to merge two routers that both have a fallback): add [`not_found`] last.
pub fn routes(ops: Ops) -> Router {
    let metrics = ops.clone();
    let ready = ops;
    Router::new()
        .route(
            METRICS_PATH,
            get(move || {
                let ops = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
                        )],
                        ops.exposition().await,
                    )
                }
            }),
        )
        .route(
            HEALTHZ_PATH,
            get(|| async { json(StatusCode::OK, &serde_json::json!({"status": "alive"})) }),
        )
        .route(
            READYZ_PATH,
            get(move || {
                let ops = ready.clone();
                async move {
                    let readiness = ops.readiness().await;
                    let status = if readiness.ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    json(status, &readiness)
                }
            }),
        )
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".to_owned());
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        text,
    )
        .into_response()
}

/// A running operations listener; stops when dropped.
#[derive(Debug)]
pub struct RunningOps {
    addr: SocketAddr,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl RunningOps {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Binds `config.listen` and serves `router` on it until the returned handle is dropped.
///
/// # Errors
/// [`OpsError::Bind`] if the address cannot be bound.
pub async fn start(config: &OpsConfig, router: Router) -> Result<RunningOps, OpsError> {
    let bind_err = |source| OpsError::Bind {
        addr: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    tracing::info!(address = %addr, "operations listener (/metrics, /healthz, /readyz) ready");
    let task = tokio::spawn(serve(listener, router));
    Ok(RunningOps {
        addr,
        _task: tokio_util::task::AbortOnDropHandle::new(task),
    })
}

/// Serves `router` on `listener` over plain HTTP/1.1, each connection held to
/// [`MAX_HEADER_BYTES`], the default header read timeout and [`CONNECTION_TIMEOUT`],
/// with the default per-address and per-listener caps. Runs until dropped.
pub async fn serve(listener: TcpListener, router: Router) {
    let gate = Gate::new("operations listener", ConnectionLimits::default());
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, _peer, admitted) = gate.accept(&listener, &mut backoff).await;
        let router = router.clone();
        tokio::spawn(async move {
            let _admitted = admitted;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(writ_spiffe::accept::DEFAULT_HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            let conn =
                builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "operations connection failed"),
                Err(_) => tracing::debug!("operations connection closed at its deadline"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_refuses_garbage() {
        assert_eq!(OpsConfig::from_file(None).unwrap(), None);
        assert_eq!(
            OpsConfig::from_file(Some(FileOps::default())).unwrap(),
            None
        );
        let c = OpsConfig::from_file(Some(FileOps {
            listen: Some("127.0.0.1:9464".into()),
        }))
        .unwrap()
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9464".parse().unwrap());
        for bad in [
            "",
            "localhost",
            "127.0.0.1",
            ":9464",
            "x:1",
            &"9".repeat(10_000),
        ] {
            let e = OpsConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("[ops] listen"), "{e}");
            assert!(e.len() < 400, "{e}");
        }
        let toml_err = toml::from_str::<FileOps>("listen = \"127.0.0.1:1\"\nport = 3\n");
        assert!(toml_err.is_err());
    }

    #[test]
    fn readiness_names_the_failing_check() {
        let r = Readiness::new(vec![
            Check::pass("identity"),
            Check::fail("store", "connection refused"),
        ]);
        assert!(!r.ready);
        assert_eq!(r.failing().unwrap().name, "store");
        assert_eq!(r.reason().unwrap(), "store: connection refused");
        let body = serde_json::to_value(&r).unwrap();
        assert_eq!(body["ready"], false);
        assert_eq!(body["checks"][1]["error"], "connection refused");
        assert!(body["checks"][0].get("error").is_none());
        assert!(Readiness::new(vec![Check::pass("a")]).ready);
        assert_eq!(Readiness::new(vec![Check::pass("a")]).reason(), None);
    }
}
