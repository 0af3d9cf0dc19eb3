//! The chain explorer in a real headless Chromium (Debian `chromium`), driven by npm
//! `puppeteer-core` ([`PUPPETEER_VERSION`], installed on first use into
//! `<workspace>/.interop/puppeteer` with `PUPPETEER_SKIP_DOWNLOAD=1`: it never downloads a
//! browser) through `explorer_driver.js` beside this file; and [`FakeApi`], the explorer
//! JSON API answering from data a test builds, with the page mounted beside it.
//!
//! Without node, npm or Chromium the tests skip with a message, unless
//! `WRIT_REQUIRE_ALL=1`, which makes them fail instead.
#![expect(
    clippy::indexing_slicing,
    reason = "test harness: JSON fields it wrote itself"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::env::skip;

/// The `puppeteer-core` release the tests pin (the last line that runs on Node 20).
pub const PUPPETEER_VERSION: &str = "24.43.1";

const WHAT: &str = "headless Chromium (Debian chromium, node and npm puppeteer-core)";

/// Whether `cmd --version` runs.
fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Chromium binary: `$WRIT_CHROMIUM`, else `chromium` or `chromium-browser` on PATH.
pub fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WRIT_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Installs `puppeteer-core@`[`PUPPETEER_VERSION`] into `.interop/puppeteer` once (across
/// test processes, under its lock) and returns its `node_modules`.
///
/// # Errors
/// Why it is unavailable.
pub fn install() -> Result<PathBuf, String> {
    static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    RESULT
        .get_or_init(|| {
            if !have("node") || !have("npm") {
                return Err("node or npm not found on PATH".to_owned());
            }
            let installed = |dir: &Path| {
                std::fs::read_to_string(dir.join("node_modules/puppeteer-core/package.json"))
                    .ok()
                    .and_then(|text| serde_json::from_str::<Value>(&text).ok())
                    .is_some_and(|p| p["version"] == PUPPETEER_VERSION)
            };
            crate::env::install_once("puppeteer", installed, |staging| {
                eprintln!(
                    "installing npm puppeteer-core@{PUPPETEER_VERSION} into {}",
                    staging.display()
                );
                let mut npm = Command::new("npm");
                npm.args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--save-exact",
                    "--prefix",
                ])
                .arg(staging)
                .arg(format!("puppeteer-core@{PUPPETEER_VERSION}"))
                .env("PUPPETEER_SKIP_DOWNLOAD", "1");
                match crate::env::run_bounded(&mut npm, Duration::from_secs(600)) {
                    Some((true, _, _)) => Ok(()),
                    Some((false, _, stderr)) => Err(format!("npm install failed: {stderr}")),
                    None => Err("npm could not be started".to_owned()),
                }
            })
            .map(|dir| dir.join("node_modules"))
        })
        .clone()
}

/// Chromium and puppeteer-core, ready to run `explorer_driver.js`.
pub struct Driver {
    modules: PathBuf,
    chromium: PathBuf,
}

impl Driver {
    /// Finds Chromium and installs puppeteer-core, or skips (`None`, saying why).
    pub fn find() -> Option<Self> {
        let Some(chromium) = chromium() else {
            return skip(WHAT, "no chromium on PATH (apt-get install chromium)");
        };
        match install() {
            Ok(modules) => Some(Self { modules, chromium }),
            Err(e) => skip(WHAT, e),
        }
    }

    /// Runs the driver in `mode` (`page`, `e2e` or `bench`) with `config` and returns the
    /// JSON object it prints last.
    ///
    /// # Panics
    /// When the driver fails (a check in the page did not hold): with its output.
    pub fn run(&self, mode: &str, mut config: Value, timeout: Duration) -> Value {
        config["mode"] = json!(mode);
        config["modules"] = json!(self.modules);
        config["chromium"] = json!(self.chromium);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/explorer_driver.js");
        let mut node = Command::new("node");
        node.arg(&script).arg(config.to_string());
        let Some((ok, stdout, stderr)) = crate::env::run_bounded(&mut node, timeout) else {
            panic!("node could not be started");
        };
        assert!(
            ok,
            "explorer driver ({mode}) failed:\n{stderr}\n--- stdout\n{stdout}"
        );
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!("explorer driver printed no result ({e}):\n{stdout}\n{stderr}")
        })
    }
}

/// Where the tests save their screenshots: `<workspace>/target/explorer-screenshots`.
pub fn screenshot_dir() -> PathBuf {
    let dir = crate::env::workspace_root().join("target/explorer-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts that `path` is a non-empty PNG image (signature, IHDR, a width and a height).
pub fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() > 1000,
        "{}: {} bytes",
        path.display(),
        bytes.len()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert!(width > 100 && height > 100, "{width}x{height}");
}

/// Transactions for [`FakeApi`]: summaries (newest activity first) and trees, shaped as
/// the explorer contract says.
#[derive(Default, Clone)]
pub struct FakeData {
    summaries: Vec<Value>,
    trees: HashMap<String, Value>,
}

/// The workloads of the demo-shaped transactions.
pub const GATEWAY: &str = "spiffe://example.org/demo/gateway";
/// The planner.
pub const PLANNER: &str = "spiffe://example.org/demo/planner";
/// The sub-agent the planner spawns.
pub const SUB_AGENT: &str = "spiffe://example.org/demo/planner/sub/summarize-1";
/// The tool server.
pub const TOOL: &str = "spiffe://example.org/demo/tool-server";

/// A transaction of the four hops (gateway grant, planner replacement, sub-agent spawn
/// and replacement, tool verification), all allowed: `(summary, tree)`.
pub fn four_hops(txn: &str, sub: &str, start: u64) -> (Value, Value) {
    let event = |seq: u64, at: u64, kind: &str, extra: Value| {
        let mut e = json!({"seq": seq, "at_ms": start + at, "kind": kind, "decision": "allow"});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let tool = json!({"id": TOOL, "kind": "service", "children": [], "events": [
        event(5, 41, "verification", json!({"route": "GET /docs/42", "caller": SUB_AGENT,
            "service": TOOL, "latency_us": 180, "scope": "docs.read"}))]});
    let sub_agent = json!({"id": SUB_AGENT, "kind": "workload", "children": [tool], "events": [
        event(3, 20, "spawn", json!({"lease": "lease-7f3a", "parent": PLANNER})),
        event(4, 31, "replacement", json!({"scope": "docs.read", "caller": SUB_AGENT, "expires_in": 120}))]});
    let planner = json!({"id": PLANNER, "kind": "workload", "children": [sub_agent], "events": [
        event(2, 12, "replacement", json!({"scope": "docs.read docs.summarize", "caller": PLANNER, "expires_in": 300}))]});
    let gateway = json!({"id": GATEWAY, "kind": "workload", "children": [planner], "events": [
        event(1, 0, "grant", json!({"scope": "docs.read docs.summarize", "caller": GATEWAY, "expires_in": 300,
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}))]});
    let tree = json!({"txn": txn, "sub": sub, "started_ms": start, "last_ms": start + 41,
        "root": {"id": format!("user:{sub}"), "kind": "user", "events": [], "children": [gateway]}});
    let summary = json!({"txn": txn, "sub": sub, "started_ms": start, "last_ms": start + 41,
        "workloads": [GATEWAY, PLANNER, SUB_AGENT, TOOL],
        "grants": 1, "refusals": 0, "verifications": 1, "spawns": 1, "denied": false});
    (summary, tree)
}

/// A transaction whose planner was refused a wider scope: `(summary, tree)`.
pub fn refused(txn: &str, sub: &str, start: u64) -> (Value, Value) {
    let planner = json!({"id": PLANNER, "kind": "workload", "children": [], "events": [
        {"seq": 7, "at_ms": start + 9, "kind": "refusal", "decision": "deny", "error": "invalid_scope",
         "reason": "requested scope orders.write is not allowed for this caller", "scope": "orders.write",
         "caller": PLANNER}]});
    let gateway = json!({"id": GATEWAY, "kind": "workload", "children": [planner], "events": [
        {"seq": 6, "at_ms": start, "kind": "grant", "decision": "allow", "scope": "orders.read",
         "caller": GATEWAY, "expires_in": 300}]});
    let tree = json!({"txn": txn, "sub": sub, "started_ms": start, "last_ms": start + 9,
        "root": {"id": format!("user:{sub}"), "kind": "user", "events": [], "children": [gateway]}});
    let summary = json!({"txn": txn, "sub": sub, "started_ms": start, "last_ms": start + 9,
        "workloads": [GATEWAY, PLANNER], "grants": 1, "refusals": 1, "verifications": 0,
        "spawns": 0, "denied": true});
    (summary, tree)
}

impl FakeData {
    /// No transactions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a transaction as the newest.
    pub fn push(&mut self, (summary, tree): (Value, Value)) {
        let txn = summary["txn"].as_str().unwrap().to_owned();
        self.summaries.insert(0, summary);
        self.trees.insert(txn, tree);
    }

    /// Adds `n` ordinary four-hop transactions (`filler-00000`, users `user-00000`...),
    /// older than everything added later.
    pub fn fill(&mut self, n: usize, start: u64) {
        self.summaries.reserve(n);
        let mut older = Vec::with_capacity(n);
        for i in 0..n {
            let at = start + i as u64 * 1000;
            let (summary, tree) = four_hops(&format!("filler-{i:05}"), &format!("user-{i:05}"), at);
            self.trees.insert(format!("filler-{i:05}"), tree);
            older.push(summary);
        }
        older.reverse();
        self.summaries.extend(older);
    }
}

struct Live {
    data: FakeData,
    /// `(seq, txn)` of every change.
    changes: Vec<(u64, String)>,
    cursor: u64,
    live: u64,
}

type Shared = Arc<Mutex<Live>>;

/// The explorer JSON API (the contract's three routes) on data a test built, plus the page
/// ([`writ_txn_service::explorer::router`]), on 127.0.0.1:0 in a thread of its own. The
/// query `q=fail` answers 503 (an unreachable store); `POST /__test/live` adds a new
/// transaction (a live change) and answers its id.
pub struct FakeApi {
    /// `http://127.0.0.1:<port>`.
    pub base_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl FakeApi {
    /// Serves `data`.
    pub fn start(data: FakeData) -> Self {
        let cursor = 1000;
        let live = Arc::new(Mutex::new(Live {
            data,
            changes: Vec::new(),
            cursor,
            live: 0,
        }));
        let app = axum::Router::new()
            .route("/explorer/api/txns", get(list))
            .route("/explorer/api/txns/{txn}", get(one))
            .route("/explorer/api/changes", get(changes))
            .route("/__test/live", post(add_live))
            .with_state(live)
            .merge(writ_txn_service::explorer::router());
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Self {
            base_url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

fn bad(code: &str, description: &str, status: StatusCode) -> Response {
    answer(
        status,
        json!({"error": code, "error_description": description}),
    )
}

async fn list(
    State(live): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let limit = match query.get("limit").map(|l| l.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=200).contains(&n) => n,
        Some(_) => {
            return bad(
                "invalid_request",
                "limit must be 1..=200",
                StatusCode::BAD_REQUEST,
            );
        }
    };
    let q = query.get("q").map(|q| q.to_lowercase()).unwrap_or_default();
    if q.len() > 256 {
        return bad(
            "invalid_request",
            "q is over 256 bytes",
            StatusCode::BAD_REQUEST,
        );
    }
    if q == "fail" {
        return bad(
            "store_unavailable",
            "the audit store is unreachable (test)",
            StatusCode::SERVICE_UNAVAILABLE,
        );
    }
    let live = live.lock().unwrap();
    let hit = |s: &Value| {
        q.is_empty()
            || [&s["txn"], &s["sub"]]
                .into_iter()
                .chain(s["workloads"].as_array().into_iter().flatten())
                .any(|v| v.as_str().is_some_and(|v| v.to_lowercase().contains(&q)))
    };
    let txns: Vec<&Value> = live
        .data
        .summaries
        .iter()
        .filter(|s| hit(s))
        .take(limit)
        .collect();
    answer(StatusCode::OK, json!({"cursor": live.cursor, "txns": txns}))
}

async fn one(State(live): State<Shared>, UrlPath(txn): UrlPath<String>) -> Response {
    let live = live.lock().unwrap();
    match live.data.trees.get(&txn) {
        Some(tree) => answer(StatusCode::OK, tree.clone()),
        None => bad(
            "not_found",
            &format!("no transaction {txn}"),
            StatusCode::NOT_FOUND,
        ),
    }
}

async fn changes(
    State(live): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(Ok(after)) = query.get("after").map(|a| a.parse::<u64>()) else {
        return bad(
            "invalid_request",
            "after must be a non-negative integer",
            StatusCode::BAD_REQUEST,
        );
    };
    let live = live.lock().unwrap();
    let mut txns: Vec<&str> = Vec::new();
    for (_, txn) in live.changes.iter().filter(|(seq, _)| *seq > after) {
        if !txns.contains(&txn.as_str()) && txns.len() < 200 {
            txns.push(txn);
        }
    }
    answer(StatusCode::OK, json!({"cursor": live.cursor, "txns": txns}))
}

async fn add_live(State(live): State<Shared>) -> Response {
    let mut live = live.lock().unwrap();
    live.live += 1;
    let txn = format!("live-{:04}", live.live);
    let start = 1_790_000_000_000 + 86_400_000 + live.live * 1000;
    live.data.push(four_hops(&txn, "carol", start));
    live.cursor += 5;
    let seq = live.cursor;
    live.changes.push((seq, txn.clone()));
    answer(StatusCode::OK, json!({"txn": txn}))
}
