//! Envoy SDS on the agent: how soon a change to a caller's secrets reaches an open
//! `StreamSecrets` stream (`cargo bench -p writ-tests --bench sds`). The caller is this
//! process, attested by the agent's `unix` attestor, streaming every secret it may have
//! (empty resource names, as Envoy's SPIRE-style config would ask for them one by one).
//!
//! Each round changes the caller's secrets: an entry matching it is registered (the
//! agent signs a new SVID), then deleted. Printed, p50/p99 over the rounds:
//! - (a) push after change: from the agent cache's change notification (its watch
//!   channel, what the SDS and Workload API streams wait on; observed by a parked OS
//!   thread) to the response arriving on the stream over the Unix socket;
//! - (b) end to end: from the entry's registration (store write + change signal) to the
//!   response arriving.
//!
//! Rounds come from `WRIT_BENCH_SDS_ROUNDS` (200; each makes two samples).
#![expect(
    unused_crate_dependencies,
    reason = "a bench target sees every dependency and dev-dependency of its package"
)]
#![expect(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "benchmark code: a failed setup step should abort the run loudly"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use writ_identity::proto::envoy::service::discovery::v3 as discovery;
use writ_identity::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use writ_tests::{Stack, uid_selector};

const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what}: n={} p50={:.3?} p99={:.3?} min={:.3?} max={:.3?}",
        samples.len(),
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[0],
        samples[samples.len() - 1],
    );
}

async fn client(socket: PathBuf) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
    let channel = writ_tests::uds_channel(socket).await;
    SecretDiscoveryServiceClient::new(channel)
}

fn svid_count(resp: &discovery::DiscoveryResponse) -> usize {
    // Bundles, `ALL`, then SVIDs: one bundle (own trust domain) here.
    resp.resources.len().saturating_sub(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::var("WRIT_BENCH_SDS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let stack = Stack::start(Duration::from_secs(3600)).await;
    let uid = uid_selector();
    stack.register("/bench/sds/base", &[&uid]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.is_empty() {
        assert!(Instant::now() < deadline, "entry did not reach the agent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut sds = client(stack.socket()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(discovery::DiscoveryRequest {
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = sds
        .stream_secrets(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|m| (m, rx))
        }))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(svid_count(&first), 1);
    let mut last = first;

    let mut push = Vec::with_capacity(rounds * 2);
    let mut end_to_end = Vec::with_capacity(rounds);
    for i in 0..rounds {
        for adding in [true, false] {
            // ACK the last response, as Envoy does.
            tx.send(discovery::DiscoveryRequest {
                version_info: last.version_info.clone(),
                type_url: SECRET_TYPE_URL.to_owned(),
                response_nonce: last.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
            // Lets the agent take in the ACK first: a render it does for the ACK could
            // otherwise pick up the new snapshot before the change notification.
            tokio::time::sleep(Duration::from_millis(20)).await;
            // Records the first cache change after the trigger, on its own OS thread
            // (woken by the notification itself, not by the runtime's scheduler).
            let mut updates = stack.agent.cache.subscribe();
            updates.borrow_and_update();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let watcher = std::thread::spawn(move || {
                futures::executor::block_on(async {
                    ready_tx.send(()).unwrap();
                    updates.changed().await.unwrap();
                });
                Instant::now()
            });
            ready_rx.recv().unwrap();
            let want = if adding { 2 } else { 1 };
            let started = Instant::now();
            let entry_id = if adding {
                let e = stack
                    .register(&format!("/bench/sds/round-{i}"), &[&uid])
                    .await;
                Some(e.id)
            } else {
                let id = format!("/bench/sds/round-{i}");
                let snapshot = stack.agent.cache.snapshot();
                let e = snapshot
                    .svids
                    .iter()
                    .find(|c| c.entry.spiffe_id.path() == id)
                    .unwrap()
                    .entry
                    .id
                    .clone();
                stack.server.store.delete_entry(&e).await.unwrap();
                stack.server.notify_change();
                None
            };
            let (resp, received_at) = loop {
                let resp = stream.message().await.unwrap().unwrap();
                if svid_count(&resp) == want {
                    break (resp, Instant::now());
                }
            };
            let changed_at = tokio::task::spawn_blocking(move || watcher.join().unwrap())
                .await
                .unwrap();
            push.push(received_at.saturating_duration_since(changed_at));
            if entry_id.is_some() {
                end_to_end.push(received_at - started);
            }
            last = resp;
        }
    }
    report("(a) SDS push after the cache's change", push);
    report("(b) SDS end to end from registration", end_to_end);
}
