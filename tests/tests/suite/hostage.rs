//! Connections cannot hold the TTS hostage: a real TTS with short, test-configured
//! `[connections]` limits, attacked over real sockets on loopback. Silent TCP
//! connections, TLS connections that never send or trickle their header or body, and
//! idle keep-alive connections are closed (the read ends); one address cannot hold more
//! than its cap, and a full set of pending handshakes gives way to a legitimate
//! exchange; an oversized `Expect: 100-continue` request gets 413 and never
//! `100 Continue`. No assertion is on time: each waits for the close with a generous
//! bound, far above the configured timeout.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::support::hostage::{Hostage, read_to_close, tcp_from, trickle_header};
use tokio::io::AsyncWriteExt;

/// Far above every timeout the tests configure: only a connection that is never
/// closed (or an exchange that is blocked) reaches it.
const GENEROUS: Duration = Duration::from_secs(60);

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn closed_within<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    tokio::time::timeout(GENEROUS, read_to_close(stream))
        .await
        .expect("the server never closed the connection")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_cannot_fill_the_caps_against_an_exchange() {
    // Handshakes may take a minute, so only the caps (not the handshake timeout) can
    // free a place for the legitimate caller.
    let tts = Hostage::start(
        "handshake_timeout = \"120s\"\nmax_pending_handshakes = 8\nmax_connections_per_ip = 4",
    )
    .await;
    // One address opens 20 silent connections: 4 are held, 16 are closed at once.
    let attacker = loopback(2);
    let mut from_one = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut conn = tcp_from(attacker, tts.addr()).await.unwrap();
        from_one.spawn(async move { read_to_close(&mut conn).await });
    }
    let closed = tokio::time::timeout(GENEROUS, async {
        for _ in 0..16 {
            let seen = from_one.join_next().await.unwrap().unwrap();
            assert!(
                seen.is_empty(),
                "the server sent something to a silent client"
            );
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "silent connections beyond the per-address cap stayed open"
    );
    // Four more addresses each hold 4: 16 more pending handshakes against a cap of 8
    // (the 4 of 127.0.0.2 are pending too).
    let mut silent = tokio::task::JoinSet::new();
    for last in 3..=6 {
        for _ in 0..4 {
            let mut conn = tcp_from(loopback(last), tts.addr()).await.unwrap();
            silent.spawn(async move { read_to_close(&mut conn).await });
        }
    }
    // The server registers each accepted connection in its own task, in no set order:
    // wait until it has registered all 16, or the legitimate caller's handshake below
    // could be older than a late silent one and give way to it. Each registration beyond
    // the cap closes the oldest pending (127.0.0.2's 4 first), so 8 of these 16 are
    // closed exactly when all 16 are registered.
    let evicted = tokio::time::timeout(GENEROUS, async {
        for _ in 0..8 {
            silent.join_next().await.unwrap().unwrap();
        }
    })
    .await;
    assert!(
        evicted.is_ok(),
        "pending handshakes beyond the cap were not dropped"
    );
    // A legitimate caller still gets through: the oldest pending handshake gives way.
    let token = tokio::time::timeout(GENEROUS, tts.exchange("alice"))
        .await
        .expect("the exchange was held up by silent connections")
        .unwrap();
    assert!(!token.is_empty());
    // And the capped address may connect again once its pending handshakes gave way.
    let conn = tokio::time::timeout(GENEROUS, tts.tls_from(loopback(2))).await;
    assert!(
        matches!(conn, Ok(Ok(_))),
        "a handshake from 127.0.0.2 failed: {conn:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_slow_header_and_slow_body_connections_are_closed() {
    let tts = Hostage::start(
        "handshake_timeout = \"3s\"\nheader_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\nidle_timeout = \"120s\"",
    )
    .await;
    let me = loopback(1);

    // Silent TCP: closed at the handshake timeout.
    let mut tcp = tcp_from(me, tts.addr()).await.unwrap();
    closed_within(&mut tcp).await;

    // Handshake done, no request: closed at the header timeout.
    let mut tls = tts.tls_from(me).await.unwrap();
    let seen = closed_within(&mut tls).await;
    assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));

    // A header trickled one byte every 200 ms: closed at the header timeout, although
    // bytes keep coming.
    let tls = tts.tls_from(me).await.unwrap();
    let (mut read, mut write) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        trickle_header(&mut write, Duration::from_millis(200), 10_000).await;
    });
    closed_within(&mut read).await;
    writer.abort();

    // A body trickled one byte every 200 ms: the request fails at the body timeout and
    // the connection closes.
    let tls = tts.tls_from(me).await.unwrap();
    let (mut read, mut write) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let head = "POST /token HTTP/1.1\r\nHost: tts\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\ngrant_type=";
        write.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..10_000 {
            // Intentional: the body trickles like a slowloris peer's.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(b"a").await.is_err() || write.flush().await.is_err() {
                return;
            }
        }
    });
    let seen = closed_within(&mut read).await;
    writer.abort();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let tts = Hostage::start("header_read_timeout = \"120s\"\nidle_timeout = \"1s\"").await;
    let mut tls = tts.tls_from(loopback(1)).await.unwrap();
    tls.write_all(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: tts\r\n\r\n")
        .await
        .unwrap();
    let seen = closed_within(&mut tls).await;
    let text = String::from_utf8_lossy(&seen);
    // The response came, the connection stayed open for the next request, and then was
    // closed when none came.
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_expect_100_continue_gets_413_and_never_100() {
    let tts = Hostage::start("").await;
    let mut tls = tts.tls_from(loopback(1)).await.unwrap();
    tls.write_all(
        b"POST /token HTTP/1.1\r\nHost: tts\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    // The server answers without reading the body, and closes (the body is unread).
    let seen = closed_within(&mut tls).await;
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(text.contains("invalid_request"), "{text}");
}
