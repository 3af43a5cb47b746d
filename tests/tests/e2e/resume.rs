//! Resume after a long absence, and connection migration.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use quip_client::{EventBody, Position, Seq, StartAt};
use quip_tests::{within, within_for, DaemonProcess, TestServer, BULK};

/// Messages the offline member misses; `QUIP_RESUME_MESSAGES` overrides it.
fn backlog() -> u64 {
    std::env::var("QUIP_RESUME_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// The daemon's resident memory, from /proc (Linux).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_missing_100k_messages_gets_all_in_order_with_bounded_memory() {
    let backlog = backlog();
    // One device sends the whole backlog as fast as it can: far past the per-device send rate
    // a daemon allows by default, which this test is not about.
    let daemon = DaemonProcess::start_with_config(
        "[limits]\nsends_per_sec = 1000000\nsends_burst = 1000000\n",
    )
    .await;
    let alice = daemon.client(&daemon.add_user("alice").await).await;
    let bob_token = daemon.add_user("bob").await;
    let conv = alice
        .create_conversation("backlog", &["bob".parse().expect("name")])
        .await
        .expect("create");
    // Bob has read up to the Created event, then goes offline.
    let epoch = alice.epoch();
    let cursor = Position { epoch, seq: Seq(1) };

    let rss_before = rss_kib(daemon.pid());
    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut acked = 0u64;
    for n in 0..backlog {
        if in_flight.len() >= 512 {
            let sent: Result<quip_client::Sent, _> =
                within("an ack", in_flight.next()).await.expect("in flight");
            sent.expect("send");
            acked += 1;
        }
        in_flight.push(alice.send(conv, format!("backlog {n}")));
    }
    while let Some(sent) = within("an ack", in_flight.next()).await {
        sent.expect("send");
        acked += 1;
    }
    assert_eq!(acked, backlog);
    let sending = started.elapsed();
    let rss_after_sending = rss_kib(daemon.pid());

    // Bob comes back and resumes from his cursor; watch the daemon's memory meanwhile.
    let bob = daemon.client(&bob_token).await;
    let pid = daemon.pid();
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss_kib(pid).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let started = Instant::now();
    let mut feed = bob
        .subscribe(conv, StartAt::After(cursor))
        .await
        .expect("resume");
    let mut expected = cursor.seq;
    while expected.0 < backlog + 1 {
        let event = within("the next replayed event", feed.next())
            .await
            .expect("the subscription ended")
            .expect("delivery failed");
        assert_eq!(
            event.seq,
            expected.next(),
            "replay skipped or repeated a seq"
        );
        match &event.body {
            EventBody::Message { text, .. } => {
                assert_eq!(*text, format!("backlog {}", event.seq.0 - 2))
            }
            other => panic!("seq {} is {other:?}", event.seq),
        }
        expected = event.seq;
    }
    let replay = started.elapsed();
    sampler.abort();
    let peak = Some(peak.load(Ordering::Relaxed)).filter(|kib| *kib > 0);

    // Live messages follow on the same stream.
    let live = alice.send(conv, "live after replay").await.expect("send");
    let event = within("the live event", feed.next())
        .await
        .expect("open")
        .expect("delivered");
    assert_eq!(event.seq, live.seq);

    let rate = backlog as f64 / replay.as_secs_f64();
    println!(
        "resume: {backlog} messages sent in {sending:?}; replayed in {replay:?} = {rate:.0} msg/s; \
         daemon RSS KiB before {rss_before:?}, after sending {rss_after_sending:?}, peak during replay {peak:?}"
    );
    // The replay streams page by page: it must not hold the backlog in memory. 100,000 messages
    // of ~20 bytes are a few MB of text; sled's cache is capped at 64 MiB by default.
    if let (Some(before), Some(after)) = (rss_after_sending, peak) {
        assert!(
            after.saturating_sub(before) < 96 * 1024,
            "replaying {backlog} messages grew the daemon by {} KiB",
            after - before
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_the_client_socket_mid_stream_loses_nothing_and_needs_no_handshake() {
    let server = TestServer::start().await;
    let alice = server.client(&server.add_user("alice").await).await;
    let bob = server.client(&server.add_user("bob").await).await;
    let conv = alice
        .create_conversation("moving", &["bob".parse().expect("name")])
        .await
        .expect("create");
    let mut feed = bob
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribe");
    let connection = bob.connection_id().expect("connected");

    let mut sent = Vec::new();
    let mut addresses = Vec::new();
    for round in 0..4 {
        for n in 0..50 {
            sent.push(
                alice
                    .send(conv, format!("round {round} message {n}"))
                    .await
                    .expect("send")
                    .seq,
            );
        }
        // Bob's phone changes network: a new local socket, mid-stream. He also sends from it.
        addresses.push(bob.rebind().expect("rebind"));
        sent.push(
            bob.send(conv, format!("bob after move {round}"))
                .await
                .expect("send")
                .seq,
        );
    }
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        4,
        "each rebind moved to a new local address"
    );
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let event = within_for(BULK, "delivery after migration", feed.next())
            .await
            .expect("open")
            .expect("delivered");
        if matches!(event.body, EventBody::Message { .. }) {
            received.push(event.seq);
        }
    }
    assert_eq!(received, sent, "every message, in order, once");
    assert_eq!(
        bob.connection_id(),
        Some(connection),
        "the same QUIC connection carried on"
    );
    assert_eq!(bob.connections(), 1, "no reconnect, no new handshake");
}
