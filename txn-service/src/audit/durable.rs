//! The durable audit sink: every decision also goes to the hash-chained table of the
//! identity store (`writ_identity::store::audit`), through a group-commit writer.
//!
//! Callers hand events to a bounded queue; one task takes whatever is queued (up to
//! [`MAX_BATCH_EVENTS`]) and appends it in one transaction. A grant whose audit must
//! not fail ([`OnFailure::Refuse`]) waits for its batch's commit, so it costs one
//! commit shared with every other request of the batch, not one of its own; other
//! events (refusals, spawns, grants with [`OnFailure::Allow`]) are queued without
//! waiting, and dropped with an error log when the queue is full.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use writ_identity::clock::SharedClock;
use writ_identity::store::SharedStore;
use writ_identity::store::audit::AuditEvent;

use super::{AuditError, AuditRecord, OnFailure};

/// Events the queue holds before callers that do not wait lose theirs.
pub const QUEUE_EVENTS: usize = 16_384;
/// Most events one transaction appends.
pub const MAX_BATCH_EVENTS: usize = 1024;
/// How often retention prunes.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);

/// Most (lease, transaction) pairs remembered so that a sub-agent's spawn is recorded
/// once per transaction.
const SPAWNS_REMEMBERED: u64 = 100_000;

type Reply = oneshot::Sender<Result<u64, String>>;

struct Job {
    events: Vec<AuditEvent>,
    done: Option<Reply>,
}

/// The group-commit writer to the store's audit table. Cheap to clone.
#[derive(Clone)]
pub struct DurableAudit {
    queue: mpsc::Sender<Job>,
    on_failure: OnFailure,
    store: SharedStore,
    dropped: Arc<AtomicU64>,
    /// (lease, txn) pairs whose spawn is recorded.
    spawns: moka::sync::Cache<(String, String), ()>,
    _writer: Arc<tokio_util::task::AbortOnDropHandle<()>>,
}

impl std::fmt::Debug for DurableAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurableAudit")
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl DurableAudit {
    /// Starts the writer (on the current Tokio runtime) appending to `store`; a grant
    /// waits for its commit when `on_failure` is [`OnFailure::Refuse`].
    pub fn spawn(store: SharedStore, on_failure: OnFailure) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_EVENTS);
        let writer = tokio::spawn(write_batches(store.clone(), rx));
        Self {
            queue,
            on_failure,
            store,
            dropped: Arc::new(AtomicU64::new(0)),
            spawns: moka::sync::Cache::builder()
                .max_capacity(SPAWNS_REMEMBERED)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            _writer: Arc::new(tokio_util::task::AbortOnDropHandle::new(writer)),
        }
    }

    /// The store written to.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Whether grants wait for their commit.
    pub fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// Events dropped because the queue was full (or the writer gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records a grant's events (a spawn first, if any): waits for the commit under
    /// [`OnFailure::Refuse`].
    ///
    /// # Errors
    /// [`AuditError::Store`] when the events were not committed and the grant must be
    /// refused.
    pub async fn grant(&self, events: Vec<AuditEvent>) -> Result<(), AuditError> {
        match self.on_failure {
            OnFailure::Refuse => self.commit(events).await.map(|_| ()),
            OnFailure::Allow => {
                self.queue_events(events);
                Ok(())
            }
        }
    }

    /// Appends `events` in one transaction (with whatever else is queued) and waits for
    /// the commit; returns the chain head after it.
    ///
    /// # Errors
    /// [`AuditError::Store`] when the events were not committed.
    pub async fn commit(&self, events: Vec<AuditEvent>) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Job {
                events,
                done: Some(done),
            })
            .await
            .map_err(|_| AuditError::Store("the audit writer has stopped".into()))?;
        wait.await
            .map_err(|_| AuditError::Store("the audit writer has stopped".into()))?
            .map_err(AuditError::Store)
    }

    /// Records a granted exchange `record` (its `decision` is set to `granted` here) at
    /// `at_ms`; for a sub-agent caller, the spawn of its lease first, once per
    /// transaction. Waits for the commit under [`OnFailure::Refuse`].
    ///
    /// # Errors
    /// [`AuditError`] when the grant must be refused because it was not recorded.
    pub async fn granted(&self, record: &AuditRecord, at_ms: i64) -> Result<(), AuditError> {
        let mut record = record.clone();
        record.decision = "granted";
        let mut events = Vec::with_capacity(2);
        if let (Some(lease), Some(parent), Some(txn), Some(child)) =
            (&record.lease, &record.parent, &record.txn, &record.caller)
        {
            let key = (lease.clone(), txn.clone());
            if !self.spawns.contains_key(&key) {
                self.spawns.insert(key, ());
                let sub = record.sub.as_deref().unwrap_or_default();
                events.push(spawn_event(txn, sub, lease, parent, child, at_ms));
            }
        }
        events.push(exchange_event(&record, at_ms)?);
        self.grant(events).await
    }

    /// Records a refusal of an authenticated caller without waiting (refusals of
    /// unauthenticated requests stay in the file log only, so garbage never floods
    /// the store).
    pub fn refused(&self, record: &AuditRecord, error: &'static str, reason: &str, at_ms: i64) {
        if record.caller.is_none() {
            return;
        }
        let mut record = record.clone();
        record.decision = "refused";
        record.error = Some(error);
        record.reason = Some(reason.to_owned());
        match exchange_event(&record, at_ms) {
            Ok(event) => self.queue_events(vec![event]),
            Err(e) => {
                tracing::error!(error = %e, "a refusal could not be encoded for the audit store")
            }
        }
    }

    /// Queues `events` without waiting; a full queue drops them (logged, counted).
    pub fn queue_events(&self, events: Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        if self.queue.try_send(Job { events, done: None }).is_err() {
            self.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::error!(
                events = n,
                "durable audit queue is full: events dropped (the file audit log has them)"
            );
        }
    }

    /// Starts retention: every [`RETENTION_INTERVAL`] (and now), rows older than
    /// `retention` are pruned, leaving a checkpoint so the chain still verifies.
    pub fn spawn_retention(
        &self,
        retention: Duration,
        clock: SharedClock,
    ) -> tokio_util::task::AbortOnDropHandle<()> {
        let store = self.store.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut tick = tokio::time::interval(RETENTION_INTERVAL);
            loop {
                tick.tick().await;
                let cutoff = unix_ms(clock.now())
                    .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
                match store.prune_audit(cutoff).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "audit retention pruned old rows"),
                    Err(e) => tracing::warn!(error = %e, "audit retention failed"),
                }
            }
        }))
    }
}

async fn write_batches(store: SharedStore, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        let mut count = jobs.iter().map(|j| j.events.len()).sum::<usize>();
        while count < MAX_BATCH_EVENTS {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let events: Vec<AuditEvent> = jobs
            .iter_mut()
            .flat_map(|j| std::mem::take(&mut j.events))
            .collect();
        let mut result = Ok(0);
        // The store takes at most `MAX_APPEND` events per transaction.
        for chunk in events.chunks(writ_identity::store::audit::MAX_APPEND) {
            result = store.append_audit(chunk).await.map_err(|e| e.to_string());
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, events = events.len(),
                "audit events could not be written to the store");
        }
        for job in jobs {
            if let Some(done) = job.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

/// Unix milliseconds of `time` (0 before the epoch).
pub fn unix_ms(time: std::time::SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The event of an exchange decision `record` (whose `decision` is set) at `at_ms`.
///
/// # Errors
/// [`AuditError::Encode`] if the record cannot be encoded.
pub fn exchange_event(record: &AuditRecord, at_ms: i64) -> Result<AuditEvent, AuditError> {
    let kind = match (record.decision, record.subject_token_type) {
        ("granted", Some("txn_token")) => "replacement",
        ("granted", _) => "grant",
        _ => "refusal",
    };
    Ok(AuditEvent {
        at_ms,
        kind: kind.into(),
        decision: if kind == "refusal" { "deny" } else { "allow" }.into(),
        txn: record.txn.clone().unwrap_or_default(),
        sub: record.sub.clone().unwrap_or_default(),
        caller: record.caller.clone().unwrap_or_default(),
        service: String::new(),
        lease: record.lease.clone().unwrap_or_default(),
        record: serde_json::to_string(record).map_err(|e| AuditError::Encode(e.to_string()))?,
    })
}

/// The event of a sub-agent `child` acting in transaction `txn` under `lease` granted
/// by `parent`, at `at_ms`.
pub fn spawn_event(
    txn: &str,
    sub: &str,
    lease: &str,
    parent: &str,
    child: &str,
    at_ms: i64,
) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: "spawn".into(),
        decision: "allow".into(),
        txn: txn.into(),
        sub: sub.into(),
        caller: child.into(),
        service: String::new(),
        lease: lease.into(),
        record: serde_json::json!({"lease": lease, "parent": parent, "child": child}).to_string(),
    }
}

/// The event of a verification a service reported.
///
/// # Errors
/// [`AuditError::Encode`] if the record cannot be encoded.
pub fn verification_event(
    record: &writ_sdk::audit::VerificationRecord,
) -> Result<AuditEvent, AuditError> {
    Ok(AuditEvent {
        at_ms: record.at_ms,
        kind: "verification".into(),
        decision: match record.decision {
            writ_sdk::audit::Decision::Allow => "allow",
            writ_sdk::audit::Decision::Deny => "deny",
        }
        .into(),
        txn: record.txn.clone().unwrap_or_default(),
        sub: record.sub.clone().unwrap_or_default(),
        caller: record.caller.clone().unwrap_or_default(),
        service: record.service.clone(),
        lease: String::new(),
        record: serde_json::to_string(record).map_err(|e| AuditError::Encode(e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use writ_identity::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn grants_wait_for_their_batch_and_share_it() {
        let store: SharedStore = Arc::new(SqliteStore::open_in_memory().await.unwrap());
        let durable = DurableAudit::spawn(store.clone(), OnFailure::Refuse);
        let mut record = AuditRecord::new(std::time::UNIX_EPOCH);
        record.decision = "granted";
        record.txn = Some("t".into());
        let event = exchange_event(&record, 5).unwrap();
        assert_eq!(event.kind, "grant");
        let grants: Vec<_> = (0..50)
            .map(|_| {
                let (durable, event) = (durable.clone(), event.clone());
                tokio::spawn(async move { durable.grant(vec![event]).await })
            })
            .collect();
        for grant in grants {
            grant.await.unwrap().unwrap();
        }
        assert_eq!(store.audit_anchor().await.unwrap().head_seq, 50);
        durable.queue_events(vec![event.clone()]);
        let head = durable.commit(vec![event]).await.unwrap();
        assert_eq!(head, 52, "queued events go with the next batch, in order");
    }
}
