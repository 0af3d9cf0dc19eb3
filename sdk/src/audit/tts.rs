//! [`TtsSink`]: verification records sent to the transaction token service, so that the
//! record of a transaction does not stop at the token service.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::sink::{AuditSink, Counters, SinkStats};
use super::{INGEST_PATH, MAX_BATCH, MAX_BODY, VerificationBatch, VerificationRecord};
use crate::exchange::TxnClient;
use crate::jwks::error_chain;

/// Longest ingest response body read.
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// Why a [`TtsSink`] could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// Built outside a Tokio runtime: the sink sends from a task of its own.
    #[error("the token service sink needs a Tokio runtime")]
    NoRuntime,
}

enum Msg {
    Record(Box<VerificationRecord>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Sends verification records to the transaction token service: `POST` [`INGEST_PATH`]
/// with a JSON [`VerificationBatch`], over the [`TxnClient`]'s mTLS (the service's own
/// X509-SVID, the token service pinned by its SPIFFE ID). The service accepts records
/// only whose `service` is the SPIFFE ID of the connection's client certificate.
///
/// `record` never blocks: records go into a bounded queue (default
/// [`TtsSinkBuilder::DEFAULT_QUEUE`]) and are dropped, and counted, when it is full. A
/// task sends them in batches of at most [`MAX_BATCH`] records, when a batch is full or
/// every flush interval (default 1 s), retrying with back-off on transport errors, 429
/// and 5xx; a batch the service refuses (400, 401, 403, 404, 413) is counted as failed
/// and not retried. [`TtsSink::shutdown`] sends what is queued and stops the task;
/// dropping the last clone does the same if the runtime is still running.
///
/// ```no_run
/// # async fn demo(tts: writ_sdk::exchange::TxnClient, verifier: writ_sdk::txn_token::TxnVerifier,
/// #     source: writ_sdk::workload::X509Source) -> Result<(), Box<dyn std::error::Error>> {
/// use writ_sdk::audit::{LogSink, TtsSink};
/// use writ_sdk::middleware::{TxnLayer, TxnPolicy};
/// use writ_sdk::tls::Authorizer;
/// let sink = TtsSink::new(&tts)?;
/// let policy = TxnPolicy::new(Authorizer::member_of(source.spiffe_id().trust_domain()));
/// let layer = TxnLayer::new(verifier, policy)
///     .with_audit(source.spiffe_id(), (sink.clone(), LogSink));
/// // ... serve; then, on the way out:
/// sink.shutdown().await;
/// println!("{:?}", sink.stats());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TtsSink {
    tx: mpsc::Sender<Msg>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Record(_) => "Record",
            Self::Flush(_) => "Flush",
            Self::Shutdown(_) => "Shutdown",
        })
    }
}

/// Options of a [`TtsSink`].
#[derive(Debug, Clone)]
pub struct TtsSinkBuilder {
    http: reqwest::Client,
    url: String,
    queue: usize,
    flush_interval: Duration,
    attempts: u32,
    backoff: Duration,
}

impl TtsSinkBuilder {
    /// Records queued at most, by default.
    pub const DEFAULT_QUEUE: usize = 8192;

    /// Queue at most `records` records (at least 1).
    pub fn queue(mut self, records: usize) -> Self {
        self.queue = records.max(1);
        self
    }

    /// Send what is queued at least this often (default 1 s).
    pub fn flush_interval(mut self, every: Duration) -> Self {
        self.flush_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Try a batch this many times in all before counting it failed (default 5), waiting
    /// `first_backoff` after the first failure and twice as long after each next one.
    pub fn retries(mut self, attempts: u32, first_backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.backoff = first_backoff;
        self
    }

    /// Starts the sending task.
    ///
    /// # Errors
    /// [`SinkError::NoRuntime`] outside a Tokio runtime.
    pub fn build(self) -> Result<TtsSink, SinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SinkError::NoRuntime)?;
        let (tx, rx) = mpsc::channel(self.queue);
        let counters = Arc::new(Counters::default());
        runtime.spawn(run(self, rx, counters.clone()));
        Ok(TtsSink { tx, counters })
    }
}

impl TtsSink {
    /// A sink with the default options, sending through `client`.
    ///
    /// # Errors
    /// [`SinkError::NoRuntime`] outside a Tokio runtime.
    pub fn new(client: &TxnClient) -> Result<Self, SinkError> {
        Self::builder(client).build()
    }

    /// Options for a sink sending through `client`.
    pub fn builder(client: &TxnClient) -> TtsSinkBuilder {
        TtsSinkBuilder {
            http: client.http().clone(),
            url: client.url(INGEST_PATH),
            queue: TtsSinkBuilder::DEFAULT_QUEUE,
            flush_interval: Duration::from_secs(1),
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }

    /// Sends what is queued now and waits until it was delivered or failed.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Sends what is queued and stops the task; later records are dropped (counted).
    pub async fn shutdown(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(ack)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// What the sink has done so far.
    pub fn stats(&self) -> SinkStats {
        self.counters.snapshot()
    }
}

impl AuditSink for TtsSink {
    fn record(&self, record: VerificationRecord) {
        self.counters.recorded();
        if self.tx.try_send(Msg::Record(Box::new(record))).is_err() {
            self.counters.dropped();
        }
    }
}

async fn run(config: TtsSinkBuilder, mut rx: mpsc::Receiver<Msg>, counters: Arc<Counters>) {
    let mut pending: Vec<VerificationRecord> = Vec::new();
    let mut tick = tokio::time::interval(config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Record(record)) => {
                    pending.push(*record);
                    if pending.len() >= MAX_BATCH {
                        send_all(&config, &mut pending, &counters).await;
                    }
                }
                Some(Msg::Flush(ack)) => {
                    send_all(&config, &mut pending, &counters).await;
                    let _ = ack.send(());
                }
                Some(Msg::Shutdown(ack)) => {
                    rx.close();
                    // Records queued before the shutdown are still sent.
                    while let Ok(msg) = rx.try_recv() {
                        if let Msg::Record(record) = msg {
                            pending.push(*record);
                        }
                    }
                    send_all(&config, &mut pending, &counters).await;
                    let _ = ack.send(());
                    return;
                }
                None => {
                    send_all(&config, &mut pending, &counters).await;
                    return;
                }
            },
            _ = tick.tick() => {
                if !pending.is_empty() {
                    send_all(&config, &mut pending, &counters).await;
                }
            }
        }
    }
}

/// Sends `pending` in batches of at most [`MAX_BATCH`] records and [`MAX_BODY`] bytes.
async fn send_all(
    config: &TtsSinkBuilder,
    pending: &mut Vec<VerificationRecord>,
    counters: &Counters,
) {
    // A record the service would refuse would sink its whole batch: drop it here.
    pending.retain(|r| {
        let ok = r.check_limits().is_ok();
        if !ok {
            counters.failed(1);
        }
        ok
    });
    let mut queue: Vec<Vec<VerificationRecord>> = std::mem::take(pending)
        .chunks(MAX_BATCH)
        .map(<[_]>::to_vec)
        .collect();
    queue.reverse();
    while let Some(records) = queue.pop() {
        let count = records.len() as u64;
        let batch = VerificationBatch { records };
        let body = match serde_json::to_vec(&batch) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode verification records");
                counters.failed(count);
                continue;
            }
        };
        if body.len() > MAX_BODY {
            let mut records = batch.records;
            if records.len() > 1 {
                let second = records.split_off(records.len() / 2);
                queue.push(second);
                queue.push(records);
            } else {
                counters.failed(count);
            }
            continue;
        }
        match post(config, body).await {
            Ok(accepted) => counters.delivered(accepted.unwrap_or(count).min(count)),
            Err(e) => {
                tracing::warn!(records = count, error = %e, "the token service did not take verification records");
                counters.failed(count);
            }
        }
    }
}

/// Posts one batch, retrying transient failures; the number accepted, if the service
/// said.
async fn post(config: &TtsSinkBuilder, body: Vec<u8>) -> Result<Option<u64>, String> {
    let mut backoff = config.backoff;
    let mut last = String::new();
    for attempt in 1..=config.attempts {
        if attempt > 1 {
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2).min(Duration::from_secs(30));
        }
        let response = config
            .http
            .post(&config.url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                last = format!("cannot reach the token service: {}", error_chain(&e));
                continue;
            }
        };
        let status = response.status();
        let text = match response.bytes().await {
            Ok(b) if b.len() <= MAX_RESPONSE_BYTES => String::from_utf8_lossy(&b).into_owned(),
            Ok(_) => String::from("(response too large)"),
            Err(e) => {
                last = format!("reading the answer: {}", error_chain(&e));
                continue;
            }
        };
        if status.is_success() {
            let accepted = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("accepted").and_then(serde_json::Value::as_u64));
            return Ok(accepted);
        }
        last = format!("HTTP {status}: {text}");
        if !(status.is_server_error() || status.as_u16() == 429) {
            // Refused: sending the same batch again would be refused again.
            return Err(last);
        }
    }
    Err(last)
}
