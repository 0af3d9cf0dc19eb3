//! The chain explorer's JSON API over the durable audit table (the contract the
//! explorer page reads): `GET /explorer/api/txns?q=&limit=`,
//! `GET /explorer/api/txns/{txn}` and `GET /explorer/api/changes?after=`. Served on the
//! token service's operations listener; every answer is JSON with
//! `Cache-Control: no-store`, errors `{"error", "error_description"}`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use writ_identity::store::SharedStore;
use writ_identity::store::audit::{MAX_QUERY_BYTES, MAX_READ, MAX_TXN_LIST};

use super::tree::TxnTree;

/// Default number of transactions a list returns.
pub const DEFAULT_LIMIT: u32 = 50;
/// Longest transaction id accepted in a path, in bytes.
pub const MAX_TXN_BYTES: usize = 128;
/// Longest query string accepted, in bytes.
const MAX_QUERY_STRING: usize = 2048;

/// What the explorer API reads: the store holding the audit table.
#[derive(Debug, Clone)]
pub struct ExplorerState {
    store: SharedStore,
}

impl ExplorerState {
    /// Reads `store`.
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }
}

/// The explorer API's routes (mounted on the operations listener by the service).
pub fn explorer_api(state: ExplorerState) -> Router {
    Router::new()
        .route("/explorer/api/txns", get(list))
        .route("/explorer/api/txns/{txn}", get(show))
        .route("/explorer/api/changes", get(changes))
        .with_state(Arc::new(state))
}

/// Why a request was refused.
#[derive(Debug)]
enum ApiError {
    BadQuery(String),
    NotFound,
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, description) = match self {
            Self::BadQuery(d) => (StatusCode::BAD_REQUEST, "invalid_request", d),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such transaction in the audit trail".to_owned(),
            ),
            Self::Unavailable(e) => {
                tracing::warn!(error = %e, "explorer API: the audit store failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "the audit store cannot be read now".to_owned(),
                )
            }
        };
        json_response(
            status,
            &json!({"error": code, "error_description": description}),
        )
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The parameters of a query string: each name at most once.
fn params(raw: Option<&str>, known: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let raw = raw.unwrap_or_default();
    if raw.len() > MAX_QUERY_STRING {
        return Err(ApiError::BadQuery(format!(
            "the query string is longer than {MAX_QUERY_STRING} bytes"
        )));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        if !known.contains(&k.as_ref()) {
            continue;
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::BadQuery(format!("`{k}` appears more than once")));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn list(State(state): State<Arc<ExplorerState>>, RawQuery(raw): RawQuery) -> Response {
    match list_inner(&state, raw.as_deref()).await {
        Ok(r) | Err(r) => r,
    }
}

async fn list_inner(state: &ExplorerState, raw: Option<&str>) -> Result<Response, Response> {
    let p = params(raw, &["q", "limit"]).map_err(IntoResponse::into_response)?;
    let q = param(&p, "q").unwrap_or_default();
    if q.len() > MAX_QUERY_BYTES {
        return Err(
            ApiError::BadQuery(format!("`q` is longer than {MAX_QUERY_BYTES} bytes"))
                .into_response(),
        );
    }
    let limit = match param(&p, "limit") {
        None => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_TXN_LIST).contains(n))
            .ok_or_else(|| {
                ApiError::BadQuery(format!("`limit` must be 1 to {MAX_TXN_LIST}")).into_response()
            })?,
    };
    let unavailable =
        |e: writ_identity::store::StoreError| ApiError::Unavailable(e.to_string()).into_response();
    let anchor = state.store.audit_anchor().await.map_err(unavailable)?;
    let txns = state
        .store
        .list_audit_txns(q, limit)
        .await
        .map_err(unavailable)?;
    let txns: Vec<_> = txns
        .into_iter()
        .map(|t| {
            json!({
                "txn": t.txn, "sub": t.sub, "started_ms": t.started_ms, "last_ms": t.last_ms,
                "workloads": t.workloads, "grants": t.grants, "refusals": t.refusals,
                "verifications": t.verifications, "spawns": t.spawns, "denied": t.denied,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"cursor": anchor.head_seq, "txns": txns}),
    ))
}

/// Whether `txn` may name a transaction: 1 to [`MAX_TXN_BYTES`] printable ASCII bytes.
pub fn valid_txn(txn: &str) -> bool {
    !txn.is_empty() && txn.len() <= MAX_TXN_BYTES && txn.bytes().all(|b| b.is_ascii_graphic())
}

async fn show(State(state): State<Arc<ExplorerState>>, Path(txn): Path<String>) -> Response {
    if !valid_txn(&txn) {
        return ApiError::BadQuery(format!(
            "the transaction id must be 1 to {MAX_TXN_BYTES} printable ASCII characters"
        ))
        .into_response();
    }
    match state.store.audit_txn(&txn, MAX_READ).await {
        Err(e) => ApiError::Unavailable(e.to_string()).into_response(),
        Ok(rows) => match TxnTree::build(&rows) {
            None => ApiError::NotFound.into_response(),
            Some(tree) => json_response(
                StatusCode::OK,
                &serde_json::to_value(&tree).unwrap_or_default(),
            ),
        },
    }
}

async fn changes(State(state): State<Arc<ExplorerState>>, RawQuery(raw): RawQuery) -> Response {
    match changes_inner(&state, raw.as_deref()).await {
        Ok(r) | Err(r) => r,
    }
}

async fn changes_inner(state: &ExplorerState, raw: Option<&str>) -> Result<Response, Response> {
    let p = params(raw, &["after"]).map_err(IntoResponse::into_response)?;
    let after = match param(&p, "after") {
        None => 0,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| i64::try_from(*n).is_ok())
            .ok_or_else(|| {
                ApiError::BadQuery("`after` must be a non-negative integer".into()).into_response()
            })?,
    };
    let unavailable =
        |e: writ_identity::store::StoreError| ApiError::Unavailable(e.to_string()).into_response();
    // The head first: rows appended meanwhile are reported again next time, never lost.
    let anchor = state.store.audit_anchor().await.map_err(unavailable)?;
    let changed = state
        .store
        .audit_txns_after(after, MAX_TXN_LIST)
        .await
        .map_err(unavailable)?;
    let full = changed.len() >= MAX_TXN_LIST as usize;
    let cursor = match changed.last() {
        Some((_, seq)) if full => *seq,
        _ => anchor.head_seq.max(after),
    };
    let txns: Vec<String> = changed.into_iter().map(|(t, _)| t).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"cursor": cursor, "txns": txns}),
    ))
}
