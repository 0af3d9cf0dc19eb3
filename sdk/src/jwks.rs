//! Remote key sets, fetched, cached and fetched again in one way for everyone who
//! verifies JWTs against keys published elsewhere: the SDK's
//! [`TxnVerifier`](crate::txn_token::TxnVerifier) (the service's JWKS) and the
//! transaction token service's OIDC ingress (each OpenID Provider's JWKS).
//!
//! - [`fetch`]: one bounded HTTP GET: a timeout, a body limit checked against
//!   `Content-Length` and while reading, success statuses only;
//! - [`KeyCache`]: the keys in use and when to fetch them again: when missing or older
//!   than their max age; once more for a token whose `kid` is unknown, at most once per
//!   refetch interval; never again within the refetch interval after a failed fetch (an
//!   unreachable provider must not put a fetch, and its timeout, in front of every
//!   request); concurrent callers share one fetch; a failed fetch keeps the keys already
//!   loaded. Time comes from the injected [`Clock`](writ_spiffe::clock::Clock).
//!
//! What a key set is, which keys and algorithms it keeps, and where it comes from (one
//! URL, a file, discovery then a JWKS) stay with the caller: it passes the loader.
//!
//! ```
//! # async fn demo() -> Result<(), String> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use writ_sdk::jwks::KeyCache;
//! use writ_sdk::spiffe::clock::SystemClock;
//!
//! let cache: KeyCache<Vec<String>, String> = KeyCache::new(
//!     "example JWKS",
//!     Arc::new(SystemClock),
//!     Duration::from_secs(300),
//!     Duration::from_secs(30),
//! );
//! let keys = cache.keys(|| async { Ok(vec!["k1".to_owned()]) }).await?;
//! assert_eq!(keys.as_slice(), ["k1"]);
//! // Fresh: no second fetch.
//! let again = cache.keys(|| async { Err("not called".to_owned()) }).await?;
//! assert!(Arc::ptr_eq(&keys, &again));
//! # Ok(()) }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use writ_spiffe::clock::SharedClock;

/// Most keys a JWKS may hold.
pub const MAX_KEYS: usize = 64;

/// Why a document could not be fetched. The messages carry no response content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The request or the body took longer than the timeout.
    #[error("request timed out")]
    Timeout,
    /// The request could not be sent or answered (connection, TLS, redirect refused).
    #[error("request failed: {0}")]
    Transport(String),
    /// The server answered with a status other than 2xx.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body is larger than the limit.
    #[error("document larger than {max} bytes")]
    TooLarge {
        /// The limit, in bytes.
        max: usize,
    },
    /// The body could not be read to its end.
    #[error("reading the response failed: {0}")]
    Body(String),
}

/// GETs `url` with `http` (whose redirect and TLS policy apply) and returns the body,
/// refusing one larger than `max_bytes` before reading it when the server says its
/// length, and as soon as it grows past the limit otherwise.
///
/// # Errors
/// [`FetchError`] naming what failed.
pub async fn fetch(
    http: &reqwest::Client,
    url: &str,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let transport = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::Timeout
        } else {
            FetchError::Transport(error_chain(&e))
        }
    };
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(timeout)
        .send()
        .await
        .map_err(transport)?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    let too_large = FetchError::TooLarge { max: max_bytes };
    if response
        .content_length()
        .is_some_and(|n| usize::try_from(n).map_or(true, |n| n > max_bytes))
    {
        return Err(too_large);
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len().saturating_add(chunk.len()) > max_bytes {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err(FetchError::Timeout),
            Err(e) => return Err(FetchError::Body(error_chain(&e))),
        }
    }
}

/// An error and its sources on one line (TLS alerts hide in the sources).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The keys in use, when they were loaded, and the last failure.
struct State<K, E> {
    keys: Option<Arc<K>>,
    loaded_at: Option<SystemTime>,
    failed_at: Option<SystemTime>,
    error: Option<E>,
}

impl<K, E> Default for State<K, E> {
    fn default() -> Self {
        Self {
            keys: None,
            loaded_at: None,
            failed_at: None,
            error: None,
        }
    }
}

/// A key set `K` fetched from elsewhere, with the fetch policy of the [module
/// documentation](self). `E` is the loader's error, returned while no keys were ever
/// loaded.
pub struct KeyCache<K, E> {
    name: String,
    clock: SharedClock,
    max_age: Duration,
    refetch_interval: Duration,
    fixed: bool,
    state: ArcSwap<State<K, E>>,
    /// Held while fetching, so concurrent callers share one fetch; holds the time of the
    /// last fetch caused by an unknown `kid`.
    fetch: tokio::sync::Mutex<Option<SystemTime>>,
}

impl<K, E> std::fmt::Debug for KeyCache<K, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.load();
        f.debug_struct("KeyCache")
            .field("name", &self.name)
            .field("max_age", &self.max_age)
            .field("refetch_interval", &self.refetch_interval)
            .field("loaded_at", &state.loaded_at)
            .field("failed_at", &state.failed_at)
            .finish_non_exhaustive()
    }
}

impl<K, E> KeyCache<K, E>
where
    E: Clone + Display,
{
    /// An empty cache: the keys are fetched at first use, used for at most `max_age`,
    /// and fetched again for an unknown `kid` (or after a failure) at most once per
    /// `refetch_interval`. `name` says whose keys these are in logs.
    pub fn new(
        name: impl Into<String>,
        clock: SharedClock,
        max_age: Duration,
        refetch_interval: Duration,
    ) -> Self {
        Self {
            name: name.into(),
            clock,
            max_age,
            refetch_interval,
            fixed: false,
            state: ArcSwap::from_pointee(State::default()),
            fetch: tokio::sync::Mutex::new(None),
        }
    }

    /// A cache of fixed `keys`, never fetched: every loader passed to it is ignored.
    pub fn fixed(name: impl Into<String>, clock: SharedClock, keys: K) -> Self {
        let now = clock.now();
        let cache = Self::new(name, clock, Duration::MAX, Duration::MAX);
        cache.state.store(Arc::new(State {
            keys: Some(Arc::new(keys)),
            loaded_at: Some(now),
            failed_at: None,
            error: None,
        }));
        Self {
            fixed: true,
            ..cache
        }
    }

    /// The keys loaded last, without fetching.
    pub fn current(&self) -> Option<Arc<K>> {
        self.state.load().keys.clone()
    }

    /// The keys, fetched first with `load` when they are missing or older than their max
    /// age, unless a fetch failed within the refetch interval.
    ///
    /// # Errors
    /// The loader's error (the last one) while no keys were ever loaded.
    pub async fn keys<F, Fut>(&self, load: F) -> Result<Arc<K>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<K, E>>,
    {
        if !self.stale()
            && let Some(settled) = self.settled()
        {
            return settled;
        }
        self.load(false, load).await
    }

    /// The keys after a token named a `kid` they lack: fetched again with `load` unless
    /// a fetch for an unknown `kid`, or a failed one, happened within the refetch
    /// interval (then the current keys).
    ///
    /// # Errors
    /// As [`KeyCache::keys`].
    pub async fn refetch<F, Fut>(&self, load: F) -> Result<Arc<K>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<K, E>>,
    {
        self.load(true, load).await
    }

    /// Fetches the keys now with `load`, whatever their age.
    ///
    /// # Errors
    /// As [`KeyCache::keys`]; when earlier keys exist they stay in use and this returns
    /// them (the failure is logged).
    pub async fn refresh<F, Fut>(&self, load: F) -> Result<Arc<K>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<K, E>>,
    {
        if self.fixed
            && let Some(settled) = self.settled()
        {
            return settled;
        }
        let _guard = self.fetch.lock().await;
        self.fetch_now(load).await
    }

    /// Whether `at` is unset, at least `limit` ago, or in the future (the clock went
    /// back).
    fn older_than(&self, at: Option<SystemTime>, limit: Duration) -> bool {
        let now = self.clock.now();
        at.is_none_or(|at| now.duration_since(at).map_or(true, |age| age >= limit))
    }

    /// Whether `at` is set and less than the refetch interval ago.
    fn within_interval(&self, at: Option<SystemTime>) -> bool {
        let now = self.clock.now();
        at.is_some_and(|at| {
            now.duration_since(at)
                .is_ok_and(|since| since < self.refetch_interval)
        })
    }

    fn stale(&self) -> bool {
        if self.fixed {
            return false;
        }
        let state = self.state.load();
        self.older_than(state.loaded_at, self.max_age) && !self.within_interval(state.failed_at)
    }

    async fn load<F, Fut>(&self, unknown_kid: bool, load: F) -> Result<Arc<K>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<K, E>>,
    {
        if self.fixed
            && let Some(settled) = self.settled()
        {
            return settled;
        }
        let attempt = |s: &State<K, E>| (s.loaded_at, s.failed_at);
        let before = attempt(&self.state.load());
        let mut last_refetch = self.fetch.lock().await;
        if attempt(&self.state.load()) != before
            && let Some(settled) = self.settled()
        {
            // Another caller fetched (or failed to) while this one waited.
            return settled;
        }
        if unknown_kid
            && (self.within_interval(*last_refetch)
                || self.within_interval(self.state.load().failed_at))
            && let Some(settled) = self.settled()
        {
            return settled;
        }
        if unknown_kid {
            *last_refetch = Some(self.clock.now());
            tracing::info!(keys = %self.name, "unknown key id: fetching the keys again");
        }
        self.fetch_now(load).await
    }

    async fn fetch_now<F, Fut>(&self, load: F) -> Result<Arc<K>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<K, E>>,
    {
        let result = load().await;
        let now = Some(self.clock.now());
        match result {
            Ok(keys) => {
                let keys = Arc::new(keys);
                self.state.store(Arc::new(State {
                    keys: Some(Arc::clone(&keys)),
                    loaded_at: now,
                    failed_at: None,
                    error: None,
                }));
                Ok(keys)
            }
            Err(e) => {
                let old = self.state.load_full();
                tracing::warn!(
                    keys = %self.name,
                    error = %e,
                    keeping_earlier_keys = old.keys.is_some(),
                    "keys could not be fetched"
                );
                self.state.store(Arc::new(State {
                    keys: old.keys.clone(),
                    loaded_at: old.loaded_at,
                    failed_at: now,
                    error: Some(e.clone()),
                }));
                // Keep verifying with the keys we have, if any.
                old.keys.clone().ok_or(e)
            }
        }
    }

    /// The keys, once loaded at least once; else the last error; `None` before the
    /// first fetch.
    fn settled(&self) -> Option<Result<Arc<K>, E>> {
        let state = self.state.load();
        match (&state.keys, &state.error) {
            (Some(keys), _) => Some(Ok(Arc::clone(keys))),
            (None, Some(e)) => Some(Err(e.clone())),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use writ_spiffe::clock::Clock;

    #[derive(Debug)]
    struct TestClock(std::sync::Mutex<SystemTime>);

    impl Clock for TestClock {
        fn now(&self) -> SystemTime {
            *self.0.lock().unwrap()
        }
    }

    impl TestClock {
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    fn setup() -> (Arc<TestClock>, KeyCache<u32, String>, Arc<AtomicUsize>) {
        let clock = Arc::new(TestClock(std::sync::Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        )));
        let cache = KeyCache::new(
            "test",
            clock.clone(),
            Duration::from_secs(300),
            Duration::from_secs(30),
        );
        (clock, cache, Arc::new(AtomicUsize::new(0)))
    }

    fn loader(
        calls: &Arc<AtomicUsize>,
        result: Result<u32, &str>,
    ) -> impl FnOnce() -> std::future::Ready<Result<u32, String>> {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            std::future::ready(result.map_err(str::to_owned))
        }
    }

    #[tokio::test]
    async fn fetches_when_missing_or_old_and_keeps_keys_on_failure() {
        let (clock, cache, calls) = setup();
        assert_eq!(cache.keys(loader(&calls, Ok(1))).await.as_deref(), Ok(&1));
        assert_eq!(cache.keys(loader(&calls, Ok(2))).await.as_deref(), Ok(&1));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(300));
        assert_eq!(cache.keys(loader(&calls, Ok(2))).await.as_deref(), Ok(&2));
        clock.advance(Duration::from_secs(300));
        // Down: the old keys stay, and no fetch per call within the interval.
        assert_eq!(
            cache.keys(loader(&calls, Err("down"))).await.as_deref(),
            Ok(&2)
        );
        assert_eq!(
            cache.keys(loader(&calls, Err("down"))).await.as_deref(),
            Ok(&2)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        clock.advance(Duration::from_secs(30));
        assert_eq!(cache.keys(loader(&calls, Ok(3))).await.as_deref(), Ok(&3));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn never_loaded_returns_the_last_error_without_hammering() {
        let (clock, cache, calls) = setup();
        for _ in 0..3 {
            assert_eq!(
                cache.keys(loader(&calls, Err("down"))).await,
                Err("down".to_owned())
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(31));
        assert_eq!(cache.keys(loader(&calls, Ok(1))).await.as_deref(), Ok(&1));
    }

    #[tokio::test]
    async fn unknown_kid_refetches_at_a_bounded_rate() {
        let (clock, cache, calls) = setup();
        cache.keys(loader(&calls, Ok(1))).await.unwrap();
        assert_eq!(
            cache.refetch(loader(&calls, Ok(2))).await.as_deref(),
            Ok(&2)
        );
        for _ in 0..5 {
            assert_eq!(
                cache.refetch(loader(&calls, Ok(3))).await.as_deref(),
                Ok(&2)
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        clock.advance(Duration::from_secs(30));
        assert_eq!(
            cache.refetch(loader(&calls, Ok(3))).await.as_deref(),
            Ok(&3)
        );
        // refresh ignores the rate bound.
        assert_eq!(
            cache.refresh(loader(&calls, Ok(4))).await.as_deref(),
            Ok(&4)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let (_clock, cache, calls) = setup();
        let cache = Arc::new(cache);
        let gate = Arc::new(tokio::sync::Notify::new());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let calls = calls.clone();
                let gate = gate.clone();
                tokio::spawn(async move {
                    cache
                        .keys(|| async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            Ok::<_, String>(7)
                        })
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for task in tasks {
            assert_eq!(task.await.unwrap().as_deref(), Ok(&7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn fixed_keys_are_never_fetched() {
        let clock: SharedClock = Arc::new(writ_spiffe::clock::SystemClock);
        let cache: KeyCache<u32, String> = KeyCache::fixed("fixed", clock, 5);
        let calls = Arc::new(AtomicUsize::new(0));
        assert_eq!(cache.keys(loader(&calls, Ok(1))).await.as_deref(), Ok(&5));
        assert_eq!(
            cache.refetch(loader(&calls, Ok(1))).await.as_deref(),
            Ok(&5)
        );
        assert_eq!(
            cache.refresh(loader(&calls, Ok(1))).await.as_deref(),
            Ok(&5)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
