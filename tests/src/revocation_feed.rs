//! A stand-in for the token service's revocation feed (`GET /revocations?after=N&wait=S`,
//! answering `FeedPage` JSON), on plain HTTP at 127.0.0.1: it answers at once when an
//! entry newer than `after` exists and otherwise holds the request up to `wait` seconds,
//! as the token service does. It can also answer garbage, for the SDK feed client's
//! tests, and serves the revocation bench when the real service is not wanted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use writ_sdk::spiffe::revocation::{
    FEED_PATH, FeedPage, MAX_PAGE, MAX_WAIT_SECS, Revocation, Target,
};

/// What the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The contract.
    Honest,
    /// `{"not": "a page"` (truncated JSON).
    BadJson,
    /// A body larger than the SDK reads.
    Huge,
    /// A page whose `seq` is behind what was served before.
    Backwards,
    /// A page with more than `MAX_PAGE` entries.
    TooMany,
    /// HTTP 500.
    Error,
}

#[derive(Debug)]
struct Inner {
    entries: Vec<Revocation>,
    mode: Mode,
    requests: u64,
}

/// The feed server. Dropping it stops it.
#[derive(Debug, Clone)]
pub struct FeedServer {
    inner: Arc<Mutex<Inner>>,
    seq: watch::Sender<u64>,
    /// `http://127.0.0.1:<port>`, the base URL (the feed is at [`FEED_PATH`] under it).
    pub base_url: String,
    _task: Arc<AbortOnDrop>,
}

/// The server task, aborted when the last clone of the server is dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl FeedServer {
    /// Starts an honest, empty feed.
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            entries: Vec::new(),
            mode: Mode::Honest,
            requests: 0,
        }));
        let seq = watch::channel(0).0;
        let app = Router::new()
            .route(FEED_PATH, get(feed))
            .with_state((inner.clone(), seq.clone()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", tcp.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(tcp, app).await.unwrap();
        });
        Self {
            inner,
            seq,
            base_url,
            _task: Arc::new(AbortOnDrop(task)),
        }
    }

    /// Adds a revocation of `target` lapsing at `lapses_at` (Unix seconds); its `seq`.
    pub fn revoke(&self, target: Target, revoked_at: i64, lapses_at: i64) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let seq = inner.entries.last().map_or(0, |r| r.seq) + 1;
        inner.entries.push(Revocation {
            seq,
            target,
            revoked_at,
            lapses_at,
            reason: Some("test".into()),
        });
        drop(inner);
        self.seq.send_replace(seq);
        seq
    }

    /// Answers `mode` from now on (a held request answers when it wakes).
    pub fn set_mode(&self, mode: Mode) {
        self.inner.lock().unwrap().mode = mode;
        // Wake held requests so they answer in the new mode.
        self.seq.send_modify(|_| {});
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.inner.lock().unwrap().requests
    }
}

type AppState = (Arc<Mutex<Inner>>, watch::Sender<u64>);

async fn feed(
    State((inner, seq)): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let after: u64 = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let wait: u64 = query
        .get("wait")
        .and_then(|a| a.parse().ok())
        .unwrap_or(0)
        .min(MAX_WAIT_SECS);
    let mut rx = seq.subscribe();
    let honest = {
        let mut inner = inner.lock().unwrap();
        inner.requests += 1;
        inner.mode == Mode::Honest
    };
    // Garbage is answered at once; an honest answer waits for news.
    if honest && *rx.borrow_and_update() <= after && wait > 0 {
        let _ = tokio::time::timeout(Duration::from_secs(wait), rx.changed()).await;
    }
    let inner = inner.lock().unwrap();
    let latest = inner.entries.last().map_or(0, |r| r.seq);
    let newer: Vec<Revocation> = inner
        .entries
        .iter()
        .filter(|r| r.seq > after)
        .cloned()
        .collect();
    match inner.mode {
        Mode::Honest => {
            let more = newer.len() > MAX_PAGE;
            let revocations: Vec<Revocation> = newer.into_iter().take(MAX_PAGE).collect();
            let seq = if more {
                revocations.last().map_or(latest, |r| r.seq)
            } else {
                latest
            };
            axum::Json(FeedPage {
                seq,
                revocations,
                more,
            })
            .into_response()
        }
        Mode::BadJson => (
            [("content-type", "application/json")],
            r#"{"not": "a page""#,
        )
            .into_response(),
        Mode::Huge => {
            let body = format!(
                r#"{{"seq":1,"revocations":[],"padding":"{}"}}"#,
                "x".repeat(writ_sdk::revocation::MAX_FEED_BYTES + 1)
            );
            ([("content-type", "application/json")], body).into_response()
        }
        Mode::Backwards => axum::Json(FeedPage {
            seq: 0,
            revocations: Vec::new(),
            more: false,
        })
        .into_response(),
        Mode::TooMany => {
            let entry = |seq| Revocation {
                seq,
                target: Target::Txn { txn: "t".into() },
                revoked_at: 0,
                lapses_at: i64::MAX,
                reason: None,
            };
            axum::Json(FeedPage {
                seq: latest + MAX_PAGE as u64 + 1,
                revocations: (1..=MAX_PAGE as u64 + 1)
                    .map(|i| entry(latest + i))
                    .collect(),
                more: false,
            })
            .into_response()
        }
        Mode::Error => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
