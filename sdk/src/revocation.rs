//! [`RevocationFeed`]: the kill switch as a verifier sees it. The feed follows the
//! transaction token service's revocation feed ([`FEED_PATH`], over the same mTLS as the
//! exchange client) and keeps the revocations in force in memory, so a
//! [`TxnVerifier`](crate::txn_token::TxnVerifier), a `TxnLayer` or a TLS
//! [`Authorizer`](crate::tls::Authorizer) can refuse what an operator revoked with
//! `writ txn revoke`.
//!
//! The feed long-polls: each request names the last `seq` it has (`after`) and asks the
//! service to hold the answer up to `wait` seconds until something newer exists, so a new
//! revocation reaches the verifier about one round trip after it was made. Pages are
//! checked against the limits of [`writ_spiffe::revocation`] (entries per page, value
//! sizes, `seq` order) and the body is read to at most [`MAX_FEED_BYTES`]; a bad page is
//! refused whole and the set in use is kept. On any failure the feed keeps its last set
//! and retries with exponential backoff. Entries drop out when they lapse, by the
//! injected clock.
//!
//! When the service cannot be reached the verifier goes on with the set it has (fail
//! open). [`RevocationFeedBuilder::max_staleness`] turns that into fail closed: once the
//! feed has not heard from the service for that long (or never has, that long after it
//! started), every check answers [`RevocationCheck::Stale`] and verifiers refuse.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use writ_sdk::exchange::TxnClient;
//! use writ_sdk::txn_token::TxnVerifier;
//! use writ_sdk::workload::X509Source;
//! let source = X509Source::new().await?;
//! let tts = TxnClient::new(&source, "https://127.0.0.1:8443",
//!     "spiffe://example.org/writ/tts".parse()?)?;
//! let feed = tts.revocation_feed()?;
//! // Optional: wait for the first page before serving.
//! feed.ready().await;
//! let verifier = TxnVerifier::builder(source.spiffe_id().trust_domain(), tts.jwks_source())
//!     .revocations(feed)
//!     .build();
//! # let _ = verifier; Ok(()) }
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use writ_spiffe::clock::{SharedClock, SystemClock, unix_seconds};
use writ_spiffe::revocation::{
    FEED_PATH, FeedPage, MAX_PAGE, MAX_REASON, MAX_VALUE, MAX_WAIT_SECS, Revocation,
    RevocationError, RevocationSet, Target,
};

use crate::jwks::{FetchError, fetch};
use crate::txn_token::TxnToken;

/// Largest feed response body read: a full page of the largest entries, with room for
/// JSON escaping.
pub const MAX_FEED_BYTES: usize = MAX_PAGE * (2 * (2 * MAX_VALUE + MAX_REASON) + 256);
/// How long each feed request asks the service to wait for something new, by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(MAX_WAIT_SECS);
/// First delay after a failed request, by default.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between failed requests, by default.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Least time between two requests that brought nothing new, so a service that does not
/// hold its answers is not asked in a tight loop.
const MIN_EMPTY_INTERVAL: Duration = Duration::from_millis(200);
/// Extra time a request may take beyond the wait it asked for.
const REQUEST_SLACK: Duration = Duration::from_secs(10);

/// Why the feed could not be started, or a page was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationFeedError {
    /// Started outside a Tokio runtime: the feed polls from a task of its own.
    #[error("the revocation feed needs a Tokio runtime")]
    NoRuntime,
    /// The base URL cannot carry the feed path.
    #[error("the revocation feed URL is not valid: {0}")]
    Url(String),
    /// The service could not be reached, answered an error status, or a body that is too
    /// large.
    #[error("revocation feed request failed: {0}")]
    Fetch(String),
    /// The body is not a feed page.
    #[error("revocation feed page is malformed: {0}")]
    Malformed(String),
    /// The page broke the feed's limits.
    #[error("revocation feed page refused: {0}")]
    Limits(#[from] RevocationError),
    /// The page's `seq` is behind what the feed already has.
    #[error("revocation feed went backwards: page seq {page} is behind {have}")]
    Backwards {
        /// The page's `seq`.
        page: u64,
        /// The `seq` the feed has.
        have: u64,
    },
}

/// What a check against the feed found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationCheck {
    /// Nothing in force covers it.
    Clear,
    /// This revocation covers it.
    Revoked(Box<Revocation>),
    /// The feed has not heard from the service for longer than its
    /// [`max_staleness`](RevocationFeedBuilder::max_staleness): nothing can be trusted.
    Stale,
}

/// What the feed has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// The highest `seq` applied (the cursor).
    pub seq: u64,
    /// Entries held.
    pub entries: usize,
    /// Pages applied.
    pub pages: u64,
    /// Requests that failed or pages refused.
    pub errors: u64,
    /// Whether at least one page was applied.
    pub synced: bool,
}

/// Options of a [`RevocationFeed`].
#[derive(Debug, Clone)]
pub struct RevocationFeedBuilder {
    http: reqwest::Client,
    url: String,
    clock: SharedClock,
    wait: Duration,
    backoff: Duration,
    max_backoff: Duration,
    max_staleness: Option<Duration>,
}

impl RevocationFeedBuilder {
    /// Reads time from `clock` (default: the system clock): when entries lapse, and how
    /// stale the set is.
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Asks the service to hold each answer up to `wait` (default and most
    /// [`DEFAULT_WAIT`], 30 s) until a revocation newer than the feed's exists; 0 polls.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.min(DEFAULT_WAIT);
        self
    }

    /// After a failure waits `first`, then twice as long each time, at most `max`
    /// (defaults [`DEFAULT_BACKOFF`], [`DEFAULT_MAX_BACKOFF`]).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = first.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.backoff);
        self
    }

    /// Fails closed: when the feed has not applied a page from the service for longer
    /// than `limit` (measured from the last success, or from the start), every check
    /// answers [`RevocationCheck::Stale`] and verifiers refuse every token. Off by
    /// default (a feed that cannot reach the service keeps its last set). Choose a
    /// `limit` well above the wait (30 s), since a held request is a success only when
    /// it returns.
    pub fn max_staleness(mut self, limit: Duration) -> Self {
        self.max_staleness = Some(limit);
        self
    }

    /// Starts following the feed.
    ///
    /// # Errors
    /// [`RevocationFeedError::NoRuntime`] outside a Tokio runtime.
    pub fn build(self) -> Result<RevocationFeed, RevocationFeedError> {
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| RevocationFeedError::NoRuntime)?;
        reqwest::Url::parse(&self.url).map_err(|e| RevocationFeedError::Url(e.to_string()))?;
        let shared = Shared::new(self.clock.clone(), self.max_staleness);
        let task = runtime.spawn(follow(self, shared.clone()));
        Ok(RevocationFeed {
            handle: Arc::new(Handle {
                shared,
                task: Some(task),
            }),
        })
    }
}

/// The state readers and the polling task share.
#[derive(Debug)]
struct Shared {
    set: ArcSwap<Indexed>,
    clock: SharedClock,
    max_staleness: Option<Duration>,
    /// When the feed started, and when it last applied a page (for staleness).
    started: SystemTime,
    last_ok: ArcSwap<Option<SystemTime>>,
    /// The cursor and the pages applied, for whoever waits on them.
    progress: watch::Sender<Progress>,
    errors: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn new(clock: SharedClock, max_staleness: Option<Duration>) -> Arc<Self> {
        let started = clock.now();
        Arc::new(Self {
            set: ArcSwap::from_pointee(Indexed::default()),
            clock,
            max_staleness,
            started,
            last_ok: ArcSwap::from_pointee(None),
            progress: watch::channel(Progress::default()).0,
            errors: 0.into(),
        })
    }

    /// Checks `page` and applies it; the set in use is replaced in one step.
    fn apply(&self, page: FeedPage) -> Result<(), RevocationFeedError> {
        page.check()?;
        let current = self.set.load_full();
        let current = &current.set;
        if page.seq < current.seq() {
            return Err(RevocationFeedError::Backwards {
                page: page.seq,
                have: current.seq(),
            });
        }
        let now = unix_seconds(self.clock.now());
        let changed = !page.revocations.is_empty() || page.seq != current.seq();
        if changed {
            let mut next = RevocationSet::clone(current);
            next.apply(page);
            next.prune(now);
            self.set.store(Arc::new(Indexed::new(next)));
        } else if !current.is_empty() {
            // Nothing new: drop what lapsed meanwhile.
            let mut next = RevocationSet::clone(current);
            next.prune(now);
            if next.len() != current.len() {
                self.set.store(Arc::new(Indexed::new(next)));
            }
        }
        self.last_ok.store(Arc::new(Some(self.clock.now())));
        let seq = self.set.load().set.seq();
        self.progress.send_modify(|p| {
            p.seq = seq;
            p.pages += 1;
        });
        Ok(())
    }

    fn stale(&self) -> bool {
        let Some(limit) = self.max_staleness else {
            return false;
        };
        let since = (**self.last_ok.load()).unwrap_or(self.started);
        self.clock
            .now()
            .duration_since(since)
            .is_ok_and(|age| age > limit)
    }

    fn check(&self, find: impl FnOnce(&Indexed, i64) -> Option<Revocation>) -> RevocationCheck {
        if self.stale() {
            return RevocationCheck::Stale;
        }
        let now = unix_seconds(self.clock.now());
        match find(&self.set.load(), now) {
            Some(r) => RevocationCheck::Revoked(Box::new(r)),
            None => RevocationCheck::Clear,
        }
    }
}

/// The set in use (indexed by [`RevocationSet`] itself), answering with owned entries.
#[derive(Debug, Default)]
struct Indexed {
    set: RevocationSet,
}

impl Indexed {
    fn new(set: RevocationSet) -> Self {
        Self { set }
    }

    fn workload(&self, id: &str, now: i64) -> Option<Revocation> {
        self.set.workload(id, now).cloned()
    }

    fn token<'a>(
        &self,
        txn: &str,
        sub: &str,
        workloads: impl Iterator<Item = &'a str>,
        now: i64,
    ) -> Option<Revocation> {
        self.set.token(txn, sub, workloads, now).cloned()
    }
}

/// How far the feed has come.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    seq: u64,
    pages: u64,
}

/// Owns the polling task: it stops when the last clone of the feed is dropped.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The revocations in force, kept current from the token service's feed (see the
/// module docs). Clones share one set and one polling task, which stops when the last
/// clone is dropped. Reading never waits: the set sits behind an `ArcSwap`.
#[derive(Debug, Clone)]
pub struct RevocationFeed {
    handle: Arc<Handle>,
}

impl RevocationFeed {
    /// A feed of the service at `base_url` (e.g. `https://127.0.0.1:8443`), requested
    /// with `http`, which must be the mTLS client that pins the token service (as
    /// [`TxnClient::revocation_feed`](crate::exchange::TxnClient::revocation_feed) does).
    pub fn builder(http: reqwest::Client, base_url: &str) -> RevocationFeedBuilder {
        RevocationFeedBuilder {
            http,
            url: format!("{}{FEED_PATH}", base_url.trim_end_matches('/')),
            clock: Arc::new(SystemClock),
            wait: DEFAULT_WAIT,
            backoff: DEFAULT_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_staleness: None,
        }
    }

    /// A feed that follows no service: it holds what [`RevocationFeed::apply`] gives it
    /// (for tests, or a service that learns of revocations some other way). It is never
    /// stale.
    pub fn manual(clock: SharedClock) -> Self {
        Self {
            handle: Arc::new(Handle {
                shared: Shared::new(clock, None),
                task: None,
            }),
        }
    }

    /// Applies one page, after the same checks as a page from the service.
    ///
    /// # Errors
    /// [`RevocationFeedError::Limits`] or [`RevocationFeedError::Backwards`]; the set in
    /// use is then unchanged.
    pub fn apply(&self, page: FeedPage) -> Result<(), RevocationFeedError> {
        self.handle.shared.apply(page)
    }

    /// The set in use now.
    pub fn snapshot(&self) -> Arc<RevocationSet> {
        Arc::new(self.handle.shared.set.load().set.clone())
    }

    /// The highest `seq` applied.
    pub fn seq(&self) -> u64 {
        self.handle.shared.progress.borrow().seq
    }

    /// Waits until a page was applied at least once (returns at once if it was).
    pub async fn ready(&self) {
        let mut rx = self.handle.shared.progress.subscribe();
        // The sender lives in `self`, so the wait only ends on the condition.
        let _ = rx.wait_for(|p| p.pages > 0).await;
    }

    /// Waits until the feed has applied `seq` or later (e.g. the `seq` a revoke answered).
    pub async fn wait_for(&self, seq: u64) {
        let mut rx = self.handle.shared.progress.subscribe();
        // The sender lives in `self`, so the wait only ends on the condition.
        let _ = rx.wait_for(|p| p.seq >= seq).await;
    }

    /// What the feed has done so far.
    pub fn stats(&self) -> FeedStats {
        let shared = &self.handle.shared;
        let set = shared.set.load();
        let pages = shared.progress.borrow().pages;
        FeedStats {
            seq: set.set.seq(),
            entries: set.set.len(),
            pages,
            errors: shared.errors.load(std::sync::atomic::Ordering::Relaxed),
            synced: pages > 0,
        }
    }

    /// Whether a revocation in force covers a Txn-Token with these claims: its `txn`,
    /// its `sub`, its `req_wl` or any actor of its `act` chain.
    pub fn check_token(&self, token: &TxnToken) -> RevocationCheck {
        self.handle.shared.check(|set, now| {
            let chain = token.chain();
            let workloads = std::iter::once(token.req_wl.as_str()).chain(chain.iter().copied());
            Indexed::token(set, &token.txn, &token.sub, workloads, now)
        })
    }

    /// Whether a revocation in force covers the workload `spiffe_id` (an mTLS peer).
    pub fn check_workload(&self, spiffe_id: &str) -> RevocationCheck {
        self.handle
            .shared
            .check(|set, now| Indexed::workload(set, spiffe_id, now))
    }
}

/// What a revocation covers, in a sentence for an error body (never the reason, which is
/// the operator's note).
pub(crate) fn describe(revocation: &Revocation) -> String {
    let what = match &revocation.target {
        Target::Txn { txn } => format!("transaction {txn}"),
        Target::Sub { sub } => format!("user {sub}"),
        Target::Workload {
            spiffe_id,
            subtree: false,
        } => format!("workload {spiffe_id}"),
        Target::Workload {
            spiffe_id,
            subtree: true,
        } => format!("workload {spiffe_id} and every identity under it"),
        Target::Lease { lease, .. } => format!("sub-agent lease {lease}"),
    };
    format!("revocation {} covers {what}", revocation.seq)
}

/// The polling loop: one request at a time, the cursor moving with each applied page.
async fn follow(config: RevocationFeedBuilder, shared: Arc<Shared>) {
    let mut backoff = config.backoff;
    loop {
        let started = tokio::time::Instant::now();
        let after = shared.set.load().set.seq();
        match poll(&config, &shared, after).await {
            Ok(more) => {
                backoff = config.backoff;
                let brought_news = shared.set.load().set.seq() > after;
                if !more && !brought_news {
                    // A service that answers at once with nothing new is not asked again
                    // in a tight loop.
                    tokio::time::sleep_until(started + MIN_EMPTY_INTERVAL).await;
                }
            }
            Err(e) => {
                shared
                    .errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis(), "revocation feed: keeping the set in use");
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(config.max_backoff);
            }
        }
    }
}

/// One request; whether the service said more pages follow at once.
async fn poll(
    config: &RevocationFeedBuilder,
    shared: &Shared,
    after: u64,
) -> Result<bool, RevocationFeedError> {
    // Until the first page is applied, ask for what is in force without waiting, so a
    // new verifier knows the set at once.
    let wait = if shared.progress.borrow().pages == 0 {
        Duration::ZERO
    } else {
        config.wait
    };
    let url = format!("{}?after={after}&wait={}", config.url, wait.as_secs());
    let body = fetch(&config.http, &url, MAX_FEED_BYTES, wait + REQUEST_SLACK)
        .await
        .map_err(|e: FetchError| RevocationFeedError::Fetch(e.to_string()))?;
    let page: FeedPage =
        serde_json::from_slice(&body).map_err(|e| RevocationFeedError::Malformed(e.to_string()))?;
    let more = page.more;
    let count = page.revocations.len();
    shared.apply(page)?;
    if count > 0 {
        tracing::info!(
            entries = count,
            seq = shared.set.load().set.seq(),
            "revocation feed: applied"
        );
    }
    Ok(more)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug)]
    struct TestClock(Mutex<SystemTime>);

    impl writ_spiffe::clock::Clock for TestClock {
        fn now(&self) -> SystemTime {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    fn at(secs: u64) -> Arc<TestClock> {
        Arc::new(TestClock(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        )))
    }

    fn entry(seq: u64, target: Target, lapses_at: i64) -> Revocation {
        Revocation {
            seq,
            target,
            revoked_at: 100,
            lapses_at,
            reason: None,
        }
    }

    #[test]
    fn pages_apply_and_bad_ones_change_nothing() {
        let clock = at(150);
        let feed = RevocationFeed::manual(clock.clone());
        let page = FeedPage {
            seq: 2,
            revocations: vec![
                entry(1, Target::Txn { txn: "t".into() }, 200),
                entry(
                    2,
                    Target::Workload {
                        spiffe_id: "spiffe://td/a".into(),
                        subtree: true,
                    },
                    300,
                ),
            ],
            more: false,
        };
        assert_eq!(feed.apply(page), Ok(()));
        assert_eq!(feed.seq(), 2);
        assert!(matches!(
            feed.check_workload("spiffe://td/a/b"),
            RevocationCheck::Revoked(r) if r.seq == 2
        ));
        assert_eq!(feed.check_workload("spiffe://td/b"), RevocationCheck::Clear);
        // Backwards, oversized values, entries beyond the page: refused, set unchanged.
        let back = FeedPage {
            seq: 1,
            ..FeedPage::default()
        };
        assert_eq!(
            feed.apply(back),
            Err(RevocationFeedError::Backwards { page: 1, have: 2 })
        );
        let huge = FeedPage {
            seq: 3,
            revocations: vec![entry(
                3,
                Target::Sub {
                    sub: "x".repeat(MAX_VALUE + 1),
                },
                400,
            )],
            more: false,
        };
        assert!(matches!(
            feed.apply(huge),
            Err(RevocationFeedError::Limits(_))
        ));
        assert_eq!(feed.stats().entries, 2);
        assert_eq!(feed.seq(), 2);
        // By the clock, the txn entry lapses and is pruned at the next page.
        *clock
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            SystemTime::UNIX_EPOCH + Duration::from_secs(250);
        assert_eq!(
            feed.apply(FeedPage {
                seq: 2,
                ..FeedPage::default()
            }),
            Ok(())
        );
        assert_eq!(feed.stats().entries, 1);
        assert!(
            describe(
                &feed
                    .snapshot()
                    .in_force(250)
                    .next()
                    .cloned()
                    .unwrap_or_else(|| entry(0, Target::Txn { txn: "-".into() }, 0))
            )
            .contains("every identity under")
        );
    }

    #[test]
    fn the_index_agrees_with_a_scan() {
        let mut set = RevocationSet::default();
        let targets = [
            Target::Txn { txn: "t".into() },
            Target::Sub { sub: "u".into() },
            Target::Workload {
                spiffe_id: "spiffe://td/a".into(),
                subtree: true,
            },
            Target::Workload {
                spiffe_id: "spiffe://td/b/c".into(),
                subtree: false,
            },
            Target::Lease {
                lease: "L".into(),
                spiffe_id: "spiffe://td/p/sub/L".into(),
            },
        ];
        for (i, t) in targets.into_iter().enumerate() {
            set.insert(entry(i as u64 + 1, t, 200 + i as i64 * 10));
        }
        let indexed = Indexed::new(set.clone());
        let ids = [
            "spiffe://td/a",
            "spiffe://td/a/x",
            "spiffe://td/a/x/y",
            "spiffe://td/ab",
            "spiffe://td/b",
            "spiffe://td/b/c",
            "spiffe://td/b/c/d",
            "spiffe://td/p/sub/L",
            "spiffe://td/p",
            "spiffe://td",
            "spiffe://a/td",
        ];
        for now in [150, 205, 215, 235, 245] {
            for id in ids {
                // The definition: a scan of every entry in force.
                let scanned = set
                    .in_force(now)
                    .find(|r| r.target.covers_workload(id))
                    .cloned();
                assert_eq!(indexed.workload(id, now), scanned, "{id} at {now}");
            }
            for (txn, sub) in [("t", "x"), ("x", "u"), ("x", "x")] {
                let scanned = set
                    .in_force(now)
                    .any(|r| r.target.covers_token(txn, sub, ids.iter().copied().skip(3)));
                assert_eq!(
                    indexed
                        .token(txn, sub, ids.iter().copied().skip(3), now)
                        .is_some(),
                    scanned,
                    "{txn} {sub} at {now}"
                );
            }
        }
    }

    #[test]
    fn staleness_fails_closed_only_when_asked() {
        let clock = at(1000);
        let shared = Shared::new(clock.clone(), Some(Duration::from_secs(60)));
        assert_eq!(shared.check(|_: &Indexed, _| None), RevocationCheck::Clear);
        *clock
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            SystemTime::UNIX_EPOCH + Duration::from_secs(1061);
        assert_eq!(shared.check(|_: &Indexed, _| None), RevocationCheck::Stale);
        assert_eq!(shared.apply(FeedPage::default()), Ok(()));
        assert_eq!(shared.check(|_: &Indexed, _| None), RevocationCheck::Clear);
        let open = Shared::new(clock, None);
        assert_eq!(open.check(|_: &Indexed, _| None), RevocationCheck::Clear);
    }
}
