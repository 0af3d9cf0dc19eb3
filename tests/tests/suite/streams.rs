//! Many Workload API streams on one agent: 1,000 concurrent `FetchX509SVID` streams (10
//! HTTP/2 connections on the agent's Unix socket, 100 streams each) all get their first
//! X509-SVID and then the rotated one, within a bounded time.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use writ_identity::proto::workload as pb;
use writ_tests::{Stack, connect_raw, uid_selector, with_header};

/// HTTP/2 connections to the agent.
const CONNECTIONS: usize = 10;
/// Streams on each connection (under the 200 concurrent streams HTTP/2 servers allow by
/// default).
const STREAMS_PER_CONNECTION: usize = 100;
/// Everything (opening all streams, first messages, rotation) must be done by then.
const OVERALL: Duration = Duration::from_secs(30);

/// The first DER element of a concatenated chain: the leaf certificate.
fn leaf_der(chain: &[u8]) -> &[u8] {
    assert_eq!(chain.first(), Some(&0x30), "a DER SEQUENCE");
    let first = usize::from(chain[1]);
    let (header, len) = if first < 0x80 {
        (2, first)
    } else {
        let n = first & 0x7f;
        assert!((1..=4).contains(&n), "DER length of {n} bytes");
        let len = chain[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (2 + n, len)
    };
    &chain[..header + len]
}

/// The default SVID's SPIFFE ID and leaf certificate from one stream message.
fn default_leaf(msg: &pb::X509svidResponse) -> (String, Vec<u8>) {
    let svid = msg.svids.first().expect("at least one SVID");
    (svid.spiffe_id.clone(), leaf_der(&svid.x509_svid).to_vec())
}

#[derive(Default)]
struct Progress {
    opened: AtomicUsize,
    first: AtomicUsize,
    rotated: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_all_receive_the_rotation() {
    // SVIDs live 4 s, so the agent renews them at about 2 s.
    let stack = Stack::start(Duration::from_secs(4)).await;
    stack.register("/many", &[&uid_selector()]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.agent.cache.snapshot().svids.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the entry did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let client = connect_raw(stack.socket()).await;
        for _ in 0..STREAMS_PER_CONNECTION {
            let mut client = client.clone();
            let progress = progress.clone();
            tasks.spawn(async move {
                let mut stream = client
                    .fetch_x509svid(with_header(pb::X509svidRequest {}))
                    .await
                    .map_err(|s| format!("open: {s:?}"))?
                    .into_inner();
                progress.opened.fetch_add(1, Ordering::Relaxed);
                let first = stream
                    .message()
                    .await
                    .map_err(|s| format!("first message: {s:?}"))?
                    .ok_or("stream ended before the first message")?;
                let (id, first_leaf) = default_leaf(&first);
                if id != "spiffe://example.org/many" {
                    return Err(format!("first message for {id}"));
                }
                let first_at = started.elapsed();
                progress.first.fetch_add(1, Ordering::Relaxed);
                loop {
                    let msg = stream
                        .message()
                        .await
                        .map_err(|s| format!("waiting for rotation: {s:?}"))?
                        .ok_or("stream ended before the rotation")?;
                    let (id, leaf) = default_leaf(&msg);
                    if id != "spiffe://example.org/many" {
                        return Err(format!("update for {id}"));
                    }
                    if leaf != first_leaf {
                        progress.rotated.fetch_add(1, Ordering::Relaxed);
                        return Ok::<_, String>((first_at, started.elapsed()));
                    }
                }
            });
        }
    }

    let total = CONNECTIONS * STREAMS_PER_CONNECTION;
    let mut firsts = Vec::with_capacity(total);
    let mut rotations = Vec::with_capacity(total);
    let mut failures = Vec::new();
    let all = tokio::time::timeout(OVERALL, async {
        while let Some(joined) = tasks.join_next().await {
            match joined.unwrap() {
                Ok((first, rotated)) => {
                    firsts.push(first);
                    rotations.push(rotated);
                }
                Err(e) => failures.push(e),
            }
        }
    })
    .await;
    tasks.abort_all();
    let (opened, first, rotated) = (
        progress.opened.load(Ordering::Relaxed),
        progress.first.load(Ordering::Relaxed),
        progress.rotated.load(Ordering::Relaxed),
    );
    assert!(
        all.is_ok(),
        "not done within {OVERALL:?}: {opened} opened, {first} first messages, {rotated} rotations of {total}"
    );
    assert!(
        failures.is_empty(),
        "{} of {total} streams failed, e.g. {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(rotations.len(), total, "every stream saw the rotation");
    firsts.sort();
    rotations.sort();
    eprintln!(
        "{total} streams: last first message at {:?}, rotations seen from {:?} to {:?}",
        firsts[total - 1],
        rotations[0],
        rotations[total - 1]
    );
}
