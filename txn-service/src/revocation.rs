//! The kill switch in the token service: every replica keeps the revocations in force
//! current from the identity store, refuses the exchanges and replacements they cover,
//! and serves them to verifiers as the revocation feed.
//!
//! - **Current**: [`Revocations::load`] reads every entry in force at start (so a restart
//!   keeps them); [`Revocations::spawn`] then reads `seq > last` every
//!   [`DEFAULT_POLL_INTERVAL`] (and at once when the store announces a revocation:
//!   PostgreSQL `LISTEN/NOTIFY`, or the same process's SQLite writes), and drops lapsed
//!   entries. Replicas sharing one store therefore agree within one poll.
//! - **Enforced**: [`Revocations::check`] refuses a would-be Txn-Token whose `txn`, `sub`,
//!   `req_wl` or any `act` entry a revocation covers: `invalid_client` when the caller
//!   itself is revoked, else `invalid_request` naming the subject token (RFC 8693
//!   section 2.2.2), audited as a refusal like any other.
//! - **Served**: `GET /revocations?after=N&wait=S` ([`FEED_PATH`]) on the mTLS listener, to
//!   any SVID of the trust domain: a [`FeedPage`] of the entries in force with `seq > N`
//!   (at most [`MAX_PAGE`]); with `wait`, the request is held up to `S` seconds (at most
//!   [`MAX_WAIT_SECS`]) until a newer entry arrives. A malformed query is a 400 and a
//!   caller without an SVID a 401, both as JSON `{error, error_description}`.
//!
//! ```no_run
//! # async fn demo(store: writ_identity::store::SharedStore) -> Result<(), writ_identity::store::StoreError> {
//! use std::sync::Arc;
//! use writ_txn_service::revocation::{DEFAULT_POLL_INTERVAL, Revocations};
//! let clock = Arc::new(writ_identity::clock::SystemClock);
//! let revocations = Revocations::load(store, clock).await?;
//! let _poller = revocations.clone().spawn(DEFAULT_POLL_INTERVAL);
//! println!("{} in force", revocations.page(0).revocations.len());
//! # Ok(()) }
//! ```

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use writ_identity::clock::SharedClock;
use writ_identity::spiffe_id::{SpiffeId, TrustDomain};
use writ_identity::store::revocation::MAX_LIST;
use writ_identity::store::{SharedStore, StoreChange, StoreError};
use writ_sdk::txn_token::TxnToken;

pub use writ_sdk::spiffe::revocation::{
    FEED_PATH, FeedPage, MAX_PAGE, MAX_WAIT_SECS, RevocationSet,
};

use writ_sdk::spiffe::revocation as writ_spiffe_revocation;

use crate::exchange::{CallerId, ExchangeError};

/// How often a replica reads new revocations from the store by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Longest feed query string accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 256;

/// The revocations in force, as one replica holds them.
#[derive(Debug)]
pub struct Revocations {
    store: SharedStore,
    clock: SharedClock,
    set: RwLock<RevocationSet>,
    /// The set's cursor, for long polls to wait on.
    seq: tokio::sync::watch::Sender<u64>,
}

impl Revocations {
    /// Reads every revocation in force from `store`.
    ///
    /// # Errors
    /// The store's: a replica that cannot read them does not start.
    pub async fn load(store: SharedStore, clock: SharedClock) -> Result<Arc<Self>, StoreError> {
        let this = Arc::new(Self {
            store,
            clock,
            set: RwLock::new(RevocationSet::default()),
            seq: tokio::sync::watch::channel(0).0,
        });
        this.poll().await?;
        Ok(this)
    }

    /// Reads the entries newer than the last one held and drops the lapsed ones; returns
    /// how many were added.
    ///
    /// # Errors
    /// The store's (the set held stays as it was).
    pub async fn poll(&self) -> Result<usize, StoreError> {
        let now = self.clock.unix_seconds();
        let mut added = 0;
        loop {
            let after = self.cursor();
            let found = self.store.list_revocations(after, now, MAX_LIST).await?;
            let full = found.len() >= usize::try_from(MAX_LIST).unwrap_or(usize::MAX);
            added += found.len();
            if let Ok(mut set) = self.set.write() {
                for r in found {
                    set.insert(r.revocation);
                }
                set.prune(now);
            }
            if !full {
                break;
            }
        }
        let seq = self.cursor();
        self.seq.send_if_modified(|s| {
            let changed = *s != seq;
            *s = seq;
            changed
        });
        Ok(added)
    }

    fn cursor(&self) -> u64 {
        self.set.read().map(|s| s.seq()).unwrap_or(0)
    }

    /// Keeps the set current: polls every `interval`, and at once when the store
    /// announces a revocation. Stops when the returned handle is dropped.
    pub fn spawn(self: Arc<Self>, interval: Duration) -> tokio_util::task::AbortOnDropHandle<()> {
        let mut changes = self.store.changes();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    change = changes.recv() => match change {
                        Ok(StoreChange::Revocation | StoreChange::Resync)
                        | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            changes = self.store.changes();
                        }
                    },
                }
                if let Err(e) = self.poll().await {
                    tracing::warn!(error = %e, "reading revocations failed; keeping the ones held");
                }
            }
        }))
    }

    /// Refuses the would-be token `token` for `caller` if a revocation in force covers
    /// its `txn`, `sub`, `req_wl` or any `act` entry.
    ///
    /// # Errors
    /// [`ExchangeError::InvalidClient`] when the caller is revoked,
    /// [`ExchangeError::InvalidRequest`] (the subject token) otherwise.
    pub fn check(&self, token: &TxnToken, caller: &SpiffeId) -> Result<(), ExchangeError> {
        let now = self.clock.unix_seconds();
        let Ok(set) = self.set.read() else {
            return Ok(());
        };
        if set.is_empty() {
            return Ok(());
        }
        if let Some(r) = set.workload(caller.as_str(), now) {
            return Err(ExchangeError::InvalidClient {
                reason: format!("the caller's identity is revoked (revocation {})", r.seq),
            });
        }
        let chain = token.chain();
        let workloads = std::iter::once(token.req_wl.as_str()).chain(chain.iter().copied());
        if let Some(r) = set.token(&token.txn, &token.sub, workloads, now) {
            let what = match &r.target {
                writ_spiffe_revocation::Target::Txn { .. } => "the transaction",
                writ_spiffe_revocation::Target::Sub { .. } => "the user",
                _ => "a workload in the delegation chain",
            };
            return Err(ExchangeError::InvalidRequest {
                reason: format!("subject_token: {what} is revoked (revocation {})", r.seq),
            });
        }
        Ok(())
    }

    /// The feed page after `after`: entries in force with a greater `seq`, oldest
    /// first, at most [`MAX_PAGE`].
    pub fn page(&self, after: u64) -> FeedPage {
        let now = self.clock.unix_seconds();
        let Ok(set) = self.set.read() else {
            return FeedPage::default();
        };
        let mut revocations: Vec<_> = set
            .in_force(now)
            .filter(|r| r.seq > after)
            .take(MAX_PAGE + 1)
            .cloned()
            .collect();
        let more = revocations.len() > MAX_PAGE;
        revocations.truncate(MAX_PAGE);
        let seq = if more {
            revocations.last().map_or(set.seq(), |r| r.seq)
        } else {
            set.seq()
        };
        FeedPage {
            seq,
            revocations,
            more,
        }
    }

    /// As [`Self::page`], waiting up to `wait` for an entry newer than `after` when
    /// there is none yet.
    pub async fn wait_page(&self, after: u64, wait: Duration) -> FeedPage {
        let page = self.page(after);
        if !page.revocations.is_empty() || wait.is_zero() {
            return page;
        }
        let mut rx = self.seq.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|s| *s > after)).await;
        self.page(after)
    }
}

/// The feed's query: `after` and `wait`, each at most once, nothing else.
fn parse_query(query: Option<&str>) -> Result<(u64, u64), String> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_BYTES {
        return Err(format!("the query is longer than {MAX_QUERY_BYTES} bytes"));
    }
    let (mut after, mut wait) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match key {
            "after" => &mut after,
            "wait" => &mut wait,
            _ => return Err(format!("unknown query parameter {:?}", truncate(key))),
        };
        if slot.is_some() {
            return Err(format!("`{key}` is given twice"));
        }
        let n: u64 = value
            .parse()
            .map_err(|_| format!("`{key}` must be a non-negative integer"))?;
        *slot = Some(n);
    }
    let wait = wait.unwrap_or(0);
    if wait > MAX_WAIT_SECS {
        return Err(format!("`wait` is at most {MAX_WAIT_SECS} seconds"));
    }
    Ok((after.unwrap_or(0), wait))
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

fn error(status: StatusCode, code: &str, description: &str) -> Response {
    no_store(
        (
            status,
            axum::Json(json!({"error": code, "error_description": description})),
        )
            .into_response(),
    )
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Clone)]
struct FeedState {
    revocations: Arc<Revocations>,
    trust_domain: TrustDomain,
}

/// The feed's route ([`FEED_PATH`]) for the mTLS listener (which puts the caller's
/// [`CallerId`] in the request).
pub fn router(revocations: Arc<Revocations>, trust_domain: TrustDomain) -> Router {
    Router::new()
        .route(FEED_PATH, get(feed))
        .with_state(FeedState {
            revocations,
            trust_domain,
        })
}

async fn feed(State(state): State<FeedState>, request: Request) -> Response {
    let Some(CallerId(caller)) = request.extensions().get::<CallerId>().cloned() else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "a client X509-SVID is required",
        );
    };
    if caller.trust_domain_str() != state.trust_domain.as_str() {
        return error(
            StatusCode::FORBIDDEN,
            "unauthorized_client",
            "the revocation feed serves workloads of this trust domain only",
        );
    }
    let (after, wait) = match parse_query(request.uri().query()) {
        Ok(q) => q,
        Err(reason) => return error(StatusCode::BAD_REQUEST, "invalid_request", &reason),
    };
    let page = state
        .revocations
        .wait_page(after, Duration::from_secs(wait))
        .await;
    no_store(axum::Json(page).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;
    use writ_identity::store::revocation::NewRevocation;
    use writ_identity::store::sqlite::SqliteStore;
    use writ_sdk::spiffe::revocation::Target;
    use writ_sdk::txn_token::Actor;

    async fn revoke(store: &SharedStore, target: Target) -> u64 {
        let now = writ_identity::clock::Clock::unix_seconds(&writ_identity::clock::SystemClock);
        store
            .insert_revocation(&NewRevocation {
                target,
                revoked_at: now,
                lapses_at: now + 3600,
                reason: None,
                revoked_by: "test".into(),
            })
            .await
            .unwrap()
            .seq
    }

    async fn setup() -> (SharedStore, Arc<Revocations>) {
        let store: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        revoke(
            &store,
            Target::Txn {
                txn: "t-revoked".into(),
            },
        )
        .await;
        revoke(
            &store,
            Target::Workload {
                spiffe_id: "spiffe://example.org/agents/rogue".into(),
                subtree: true,
            },
        )
        .await;
        let revocations =
            Revocations::load(store.clone(), Arc::new(writ_identity::clock::SystemClock))
                .await
                .unwrap();
        (store, revocations)
    }

    fn token(txn: &str, req_wl: &str, act: Option<&str>) -> TxnToken {
        TxnToken {
            iss: "https://tts".into(),
            iat: 0,
            exp: i64::MAX,
            aud: "example.org".into(),
            txn: txn.into(),
            sub: "alice".into(),
            scope: "read".into(),
            req_wl: req_wl.into(),
            tctx: None,
            rctx: None,
            act: act.map(Actor::new),
        }
    }

    #[tokio::test]
    async fn exchanges_a_revocation_covers_are_refused() {
        let (_store, revocations) = setup().await;
        let gw = SpiffeId::new("spiffe://example.org/gateway").unwrap();
        let rogue = SpiffeId::new("spiffe://example.org/agents/rogue/sub/1").unwrap();
        let gw_id = gw.as_str();
        assert!(revocations.check(&token("t-ok", gw_id, None), &gw).is_ok());
        let err = revocations
            .check(&token("t-revoked", gw_id, None), &gw)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(
            err.description().contains("transaction is revoked"),
            "{err}"
        );
        let err = revocations
            .check(&token("t-ok", rogue.as_str(), None), &rogue)
            .unwrap_err();
        assert_eq!(err.code(), "invalid_client");
        // A revoked workload earlier in the chain.
        let err = revocations
            .check(
                &token("t-ok", gw_id, Some("spiffe://example.org/agents/rogue")),
                &gw,
            )
            .unwrap_err();
        assert!(err.description().contains("delegation chain"), "{err}");
    }

    async fn get(app: Router, path: &str, caller: Option<&str>) -> (StatusCode, Value) {
        let mut request = axum::http::Request::get(path).body(Body::empty()).unwrap();
        if let Some(id) = caller {
            request
                .extensions_mut()
                .insert(CallerId(SpiffeId::new(id).unwrap()));
        }
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        assert_eq!(
            response.headers().get(header::CACHE_CONTROL).unwrap(),
            "no-store"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    use serde_json::Value;

    #[tokio::test]
    async fn the_feed_serves_pages_waits_and_refuses_what_it_must() {
        let (store, revocations) = setup().await;
        let td = TrustDomain::new("example.org").unwrap();
        let app = router(revocations.clone(), td);
        let me = Some("spiffe://example.org/tool");
        let (status, body) = get(app.clone(), FEED_PATH, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "invalid_client");
        let (status, _) = get(app.clone(), FEED_PATH, Some("spiffe://other.org/x")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        for bad in ["?after=x", "?wait=31", "?since=1", "?after=1&after=2"] {
            let (status, body) = get(app.clone(), &format!("{FEED_PATH}{bad}"), me).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(body["error"], "invalid_request", "{bad}");
        }
        let (status, body) = get(app.clone(), FEED_PATH, me).await;
        assert_eq!(status, StatusCode::OK);
        let page: FeedPage = serde_json::from_value(body).unwrap();
        page.check().unwrap();
        assert_eq!(page.revocations.len(), 2);
        assert!(!page.more);
        let (_, body) = get(app.clone(), &format!("{FEED_PATH}?after=1"), me).await;
        let after_one: FeedPage = serde_json::from_value(body).unwrap();
        assert_eq!(after_one.revocations.len(), 1);

        // A long poll returns as soon as a newer entry is read.
        let path = format!("{FEED_PATH}?after={}&wait=30", page.seq);
        let waiting = {
            let app = app.clone();
            tokio::spawn(async move { get(app, &path, me).await })
        };
        let seq = revoke(
            &store,
            Target::Sub {
                sub: "mallory".into(),
            },
        )
        .await;
        revocations.poll().await.unwrap();
        let (status, body) = waiting.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let next: FeedPage = serde_json::from_value(body).unwrap();
        assert_eq!(
            next.revocations.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![seq]
        );
        assert_eq!(next.seq, seq);
    }

    #[test]
    fn the_lapse_rule_knows_the_txn_token_ceiling() {
        assert_eq!(
            writ_identity::server::revocation::TXN_TOKEN_CEILING,
            crate::policy::HARD_MAX_LIFETIME
        );
    }

    #[test]
    fn queries_are_parsed_strictly() {
        assert_eq!(parse_query(None), Ok((0, 0)));
        assert_eq!(parse_query(Some("after=7&wait=30")), Ok((7, 30)));
        for bad in [
            "after=-1",
            "after=x",
            "wait=31",
            "after=1&after=2",
            "since=1",
            "after",
            "wait=99999999999999999999999",
        ] {
            assert!(parse_query(Some(bad)).is_err(), "{bad}");
        }
        assert!(parse_query(Some(&"a".repeat(MAX_QUERY_BYTES + 1))).is_err());
    }
}
