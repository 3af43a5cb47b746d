//! Invariant 5, end to end: typing and presence travel as DATAGRAMs through a real daemon over
//! real QUIC on loopback, reach only members and contacts, expire by TTL, survive loss, and
//! never delay a message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quip_client::{
    Client, ClientConfig, ConversationId, EphemeralEvent, EphemeralEvents, EventBody,
    PresenceState, StartAt, TypingChange, TypingTracker,
};
use quip_protocol::{encode_datagram, ClientDatagram, ClientFrame, FrameDecoder, ServerFrame};
use quipd::presence::{EphemeralLimits, EphemeralStats};

use crate::harness::{frame, name, Daemon, WAIT};

async fn start(ephemeral: EphemeralLimits) -> Daemon {
    Daemon::start(|config| config.limits.ephemeral = ephemeral).await
}

impl Daemon {
    async fn connect(&self, token: &str) -> Client {
        self.connect_via(self.addr, token).await
    }

    async fn connect_via(&self, addr: SocketAddr, token: &str) -> Client {
        let mut config = ClientConfig::from_ca_file(addr.to_string(), self.ca(), token).unwrap();
        config.connect_timeout = Duration::from_secs(30);
        tokio::time::timeout(Duration::from_secs(40), Client::connect(config))
            .await
            .expect("connect timed out")
            .unwrap()
    }

    /// A connection that logs in, then speaks raw datagrams (what a hostile client could send).
    async fn raw_client(&self, token: &str) -> quinn::Connection {
        let conn = self.raw_connection(quip_protocol::ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let hello = ClientFrame::Hello {
            token: token.into(),
            client: "raw".into(),
            revision: quip_protocol::REVISION,
        };
        send.write_all(&frame(&hello)).await.unwrap();
        let mut decoder = FrameDecoder::new(u32::MAX);
        loop {
            if let Some(frame) = decoder.next_frame::<ServerFrame>().unwrap() {
                assert!(matches!(frame, ServerFrame::Welcome { .. }), "{frame:?}");
                break;
            }
            let chunk = recv.read_chunk(4096, true).await.unwrap().unwrap();
            decoder.push(&chunk.bytes);
        }
        // Keep the control stream open for the connection's lifetime.
        std::mem::forget((send, recv));
        conn
    }
}

fn stat(counter: &std::sync::atomic::AtomicU64) -> u64 {
    EphemeralStats::get(counter)
}

/// Limits for tests: a short grace period, and the default rates.
fn test_limits() -> EphemeralLimits {
    EphemeralLimits {
        presence_grace: Duration::from_millis(800),
        ..EphemeralLimits::default()
    }
}

/// The next event matching `want` within `timeout`.
async fn wait_for(
    events: &mut EphemeralEvents,
    timeout: Duration,
    mut want: impl FnMut(&EphemeralEvent) -> bool,
) -> Option<EphemeralEvent> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(event)) if want(&event) => return Some(event),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

fn is_typing(conv: ConversationId, who: &str) -> impl FnMut(&EphemeralEvent) -> bool + '_ {
    move |event| matches!(event, EphemeralEvent::Typing { conv: c, user } if *c == conv && user.as_str() == who)
}

fn is_stopped(conv: ConversationId, who: &str) -> impl FnMut(&EphemeralEvent) -> bool + '_ {
    move |event| matches!(event, EphemeralEvent::StoppedTyping { conv: c, user } if *c == conv && user.as_str() == who)
}

fn is_presence(who: &str, state: PresenceState) -> impl FnMut(&EphemeralEvent) -> bool + '_ {
    move |event| matches!(event, EphemeralEvent::Presence(info) if info.user.as_str() == who && info.state == state)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_members_within_100ms_and_never_a_non_member() {
    let daemon = start(test_limits()).await;
    let (a, b, c) = (
        daemon.user("alice").await,
        daemon.user("bob").await,
        daemon.user("carol").await,
    );
    let alice = daemon.connect(&a).await;
    let bob = daemon.connect(&b).await;
    let carol = daemon.connect(&c).await;
    let conv = alice
        .create_conversation("ab", &[name("bob")])
        .await
        .unwrap();
    let mut bob_events = bob.ephemeral_events();
    let mut carol_events = carol.ephemeral_events();

    // Alternate typing and stop: each one is a change the daemon relays at once.
    let mut latencies = Vec::new();
    for round in 0..12 {
        let started = Instant::now();
        alice.typing(conv).unwrap();
        let seen = wait_for(
            &mut bob_events,
            Duration::from_secs(2),
            is_typing(conv, "alice"),
        )
        .await;
        assert!(seen.is_some(), "round {round}: bob never saw alice typing");
        latencies.push(started.elapsed());
        alice.stop_typing(conv).unwrap();
        let stopped = wait_for(
            &mut bob_events,
            Duration::from_secs(2),
            is_stopped(conv, "alice"),
        )
        .await;
        assert!(stopped.is_some(), "round {round}: bob never saw the stop");
    }
    // The first rounds warm up the conversation actor and the connections.
    let mut measured = latencies[2..].to_vec();
    measured.sort();
    let median = percentile(&measured, 0.5);
    println!(
        "typing relay on loopback (debug build): median {median:?}, max {:?}",
        measured.last().unwrap()
    );
    assert!(median < Duration::from_millis(100), "median {median:?}");

    // Carol, not a member, types into the conversation: dropped silently, counted.
    let not_member = stat(&daemon.ephemeral.not_member);
    let raw_carol = daemon.raw_client(&c).await;
    for _ in 0..3 {
        let typing = encode_datagram(&ClientDatagram::Typing { conv }).unwrap();
        raw_carol.send_datagram(typing.into()).unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while stat(&daemon.ephemeral.not_member) < not_member + 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stat(&daemon.ephemeral.not_member), not_member + 3);
    assert!(
        wait_for(
            &mut bob_events,
            Duration::from_millis(300),
            is_typing(conv, "carol")
        )
        .await
        .is_none(),
        "a non-member's typing must not be relayed"
    );
    assert!(
        wait_for(&mut carol_events, Duration::from_millis(10), |e| matches!(
            e,
            EphemeralEvent::Typing { .. } | EphemeralEvent::StoppedTyping { .. }
        ))
        .await
        .is_none(),
        "a non-member never receives typing"
    );
    // A malformed datagram (an unknown variant, as a newer client might send) is dropped and
    // counted; the connection stays open.
    let malformed = stat(&daemon.ephemeral.malformed);
    raw_carol
        .send_datagram(bytes::Bytes::from_static(&[0x7f, 0x01]))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while stat(&daemon.ephemeral.malformed) == malformed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stat(&daemon.ephemeral.malformed), malformed + 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        raw_carol.close_reason().is_none(),
        "neither a non-member's typing nor a malformed datagram closes the connection"
    );
    assert!(carol.conversations().await.is_ok());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_receiving_typing_at_once() {
    let daemon = start(test_limits()).await;
    let (a, b, d) = (
        daemon.user("alice").await,
        daemon.user("bob").await,
        daemon.user("dave").await,
    );
    let alice = daemon.connect(&a).await;
    let bob = daemon.connect(&b).await;
    let dave = daemon.connect(&d).await;
    let conv = alice
        .create_conversation("abd", &[name("bob"), name("dave")])
        .await
        .unwrap();
    let mut bob_events = bob.ephemeral_events();
    let mut dave_events = dave.ephemeral_events();
    alice.typing(conv).unwrap();
    assert!(wait_for(&mut bob_events, WAIT, is_typing(conv, "alice"))
        .await
        .is_some());
    alice.stop_typing(conv).unwrap();
    alice.remove_member(conv, name("bob")).await.unwrap();
    alice.typing(conv).unwrap();
    assert!(
        wait_for(&mut dave_events, WAIT, is_typing(conv, "alice"))
            .await
            .is_some(),
        "dave is still a member"
    );
    assert!(
        wait_for(
            &mut bob_events,
            Duration::from_millis(300),
            is_typing(conv, "alice")
        )
        .await
        .is_none(),
        "bob was removed"
    );
    daemon.stop().await;
}

/// Invariant 5: typing and presence never reach the store. The store writer's counters stand
/// still while indicators and presence changes flow, and move again for the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_and_presence_are_never_written_to_the_store() {
    let daemon = start(test_limits()).await;
    let (a, b) = (daemon.user("alice").await, daemon.user("bob").await);
    let alice = daemon.connect(&a).await;
    let bob = daemon.connect(&b).await;
    let conv = alice
        .create_conversation("ab", &[name("bob")])
        .await
        .unwrap();
    let mut bob_events = bob.ephemeral_events();
    let writes = |store: &quipd::store::Store| {
        let stats = store.writer_stats();
        (stat(&stats.commits), stat(&stats.flushes))
    };
    let before = writes(&daemon.store);

    for _ in 0..20 {
        alice.stop_typing(conv).unwrap();
        assert!(alice.typing(conv).unwrap());
        wait_for(&mut bob_events, WAIT, is_typing(conv, "alice"))
            .await
            .expect("bob sees alice typing");
    }
    alice.set_away(true).await.unwrap();
    wait_for(
        &mut bob_events,
        WAIT,
        is_presence("alice", PresenceState::Away),
    )
    .await
    .expect("bob sees alice away");
    alice.set_away(false).await.unwrap();
    wait_for(
        &mut bob_events,
        WAIT,
        is_presence("alice", PresenceState::Online),
    )
    .await
    .expect("bob sees alice back");
    assert_eq!(
        writes(&daemon.store),
        before,
        "typing and presence must not write to the store"
    );

    // The counters are live: a message moves them.
    alice.send(conv, "now a real message").await.unwrap();
    let after = writes(&daemon.store);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "{before:?} -> {after:?}"
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indicator_expires_by_ttl_when_the_stop_is_lost_and_a_message_ends_it() {
    let daemon = start(test_limits()).await;
    let (a, b) = (daemon.user("alice").await, daemon.user("bob").await);
    let alice = daemon.connect(&a).await;
    let bob = daemon.connect(&b).await;
    let conv = alice
        .create_conversation("ab", &[name("bob")])
        .await
        .unwrap();
    let mut bob_events = bob.ephemeral_events();
    let ttl = Duration::from_millis(600);
    let mut tracker = TypingTracker::with_ttl(ttl);

    // Alice announces once and never says she stopped (as if the stop was lost).
    alice.typing(conv).unwrap();
    let event = wait_for(&mut bob_events, WAIT, is_typing(conv, "alice"))
        .await
        .unwrap();
    let shown_at = Instant::now();
    assert!(tracker.handle_event(&event, shown_at).is_some());
    assert_eq!(tracker.typing(conv, Instant::now()), [name("alice")]);
    let expires = tracker.poll_timeout().unwrap();
    tokio::time::sleep_until(tokio::time::Instant::from_std(expires)).await;
    let ended = tracker.handle_timeout(Instant::now());
    assert_eq!(
        ended,
        [TypingChange::Stopped {
            conv,
            user: name("alice")
        }]
    );
    assert!(shown_at.elapsed() >= ttl);
    assert!(tracker.typing(conv, Instant::now()).is_empty());

    // Sending a message clears the sender's typing for the others: the daemon sends a stop,
    // and the message itself ends the indicator in the tracker.
    let mut subscription = bob.subscribe(conv, StartAt::Latest).await.unwrap();
    // The SDK sends one announcement per refresh period; clearing the input resets that.
    alice.stop_typing(conv).unwrap();
    assert!(alice.typing(conv).unwrap());
    let event = wait_for(&mut bob_events, WAIT, is_typing(conv, "alice"))
        .await
        .unwrap();
    tracker.handle_event(&event, Instant::now());
    alice.send(conv, "done typing").await.unwrap();
    assert!(
        wait_for(&mut bob_events, WAIT, is_stopped(conv, "alice"))
            .await
            .is_some(),
        "the daemon sends a stop when the message is sequenced"
    );
    let message = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(message.body, EventBody::Message { .. }));
    assert_eq!(
        tracker.handle_message(conv, &message.sender),
        Some(TypingChange::Stopped {
            conv,
            user: name("alice")
        })
    );
    // And the next keystroke after a send announces at once.
    assert!(alice.typing(conv).unwrap());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_survives_a_quick_reconnect_and_goes_offline_after_the_grace_period() {
    let limits = test_limits();
    let grace = limits.presence_grace;
    let daemon = start(limits).await;
    let (a, b, c) = (
        daemon.user("alice").await,
        daemon.user("bob").await,
        daemon.user("carol").await,
    );
    let bob = daemon.connect(&b).await;
    let mut bob_events = bob.ephemeral_events();
    let alice = daemon.connect(&a).await;
    let carol = daemon.connect(&c).await;
    alice
        .create_conversation("ab", &[name("bob")])
        .await
        .unwrap();

    // A contact that connects later gets everyone's presence at once, in the snapshot; carol
    // shares no conversation with bob and is not in it.
    let late = daemon.connect(&b).await;
    let snapshot = late.presence().await.unwrap();
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    assert_eq!(snapshot[0].user, name("alice"));
    assert_eq!(snapshot[0].state, PresenceState::Online);
    late.close().await;
    drop(carol);

    // Away, and back.
    alice.set_away(true).await.unwrap();
    assert!(wait_for(
        &mut bob_events,
        WAIT,
        is_presence("alice", PresenceState::Away)
    )
    .await
    .is_some());
    alice.set_away(false).await.unwrap();
    assert!(wait_for(
        &mut bob_events,
        WAIT,
        is_presence("alice", PresenceState::Online)
    )
    .await
    .is_some());

    // A quick reconnect (a network change, an app restart): no offline blip.
    alice.close().await;
    tokio::time::sleep(grace / 4).await;
    let alice = daemon.connect(&a).await;
    let blip = wait_for(
        &mut bob_events,
        grace * 3,
        |e| matches!(e, EphemeralEvent::Presence(info) if info.user.as_str() == "alice"),
    )
    .await;
    assert!(blip.is_none(), "no presence change expected, got {blip:?}");
    let snapshot = bob.presence().await.unwrap();
    assert_eq!(snapshot[0].state, PresenceState::Online);

    // Gone for good: offline once the grace period is over, with the time it left.
    let left = Instant::now();
    alice.close().await;
    let offline = wait_for(
        &mut bob_events,
        WAIT,
        is_presence("alice", PresenceState::Offline),
    )
    .await
    .expect("alice goes offline");
    let took = left.elapsed();
    assert!(
        took >= grace,
        "offline after {took:?}, the grace is {grace:?}"
    );
    let EphemeralEvent::Presence(info) = offline else {
        unreachable!()
    };
    assert!(info.last_seen_ms.is_some());
    let snapshot = bob.presence().await.unwrap();
    assert_eq!(snapshot[0].state, PresenceState::Offline);
    daemon.stop().await;
}

/// Forwards UDP between one client and the daemon, dropping `loss` of the packets each way,
/// chosen by a seeded generator. Returns the address clients connect to, and the counts of
/// packets forwarded and dropped.
async fn lossy_proxy(
    daemon: SocketAddr,
    loss: f64,
    seed: u64,
) -> (SocketAddr, Arc<[AtomicU64; 2]>) {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(daemon).await.unwrap();
    let addr = front.local_addr().unwrap();
    let mut rng = seed | 1;
    let mut drop = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - loss
    };
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let counted = counts.clone();
    let mut drop = move || {
        let dropped = drop();
        counted[usize::from(dropped)].fetch_add(1, Ordering::Relaxed);
        dropped
    };
    tokio::spawn(async move {
        let mut client = None;
        let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                Ok((n, from)) = front.recv_from(&mut up) => {
                    client = Some(from);
                    if !drop() {
                        let _ = back.send(&up[..n]).await;
                    }
                }
                Ok(n) = back.recv(&mut down) => {
                    if let Some(client) = client {
                        if !drop() {
                            let _ = front.send_to(&down[..n], client).await;
                        }
                    }
                }
            }
        }
    });
    (addr, counts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_20_percent_datagram_loss_messages_arrive_in_order_and_typing_shows_up() {
    let daemon = start(test_limits()).await;
    let (a, b) = (daemon.user("alice").await, daemon.user("bob").await);
    let (alice_proxy, alice_counts) = lossy_proxy(daemon.addr, 0.2, 0x5eed_0001).await;
    let (bob_proxy, bob_counts) = lossy_proxy(daemon.addr, 0.2, 0x5eed_0002).await;
    let alice = daemon.connect_via(alice_proxy, &a).await;
    let bob = daemon.connect_via(bob_proxy, &b).await;
    let conv = alice
        .create_conversation("lossy", &[name("bob")])
        .await
        .unwrap();
    let mut subscription = bob.subscribe(conv, StartAt::Beginning).await.unwrap();
    let mut bob_events = bob.ephemeral_events();

    // Typing: the SDK repeats while the user keeps typing (here: a keystroke every 100 ms),
    // so a lost datagram is made up for by the next refresh.
    let typing = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen: Option<EphemeralEvent> = None;
        while seen.is_none() && Instant::now() < deadline {
            alice.typing(conv).unwrap();
            seen = wait_for(
                &mut bob_events,
                Duration::from_millis(100),
                is_typing(conv, "alice"),
            )
            .await;
        }
        seen.is_some()
    };
    assert!(typing.await, "typing never showed up through 20% loss");

    const N: usize = 100;
    let sends: Vec<_> = (0..N)
        .map(|i| tokio::spawn(alice.send(conv, format!("m{i}"))))
        .collect();
    for (i, send) in sends.into_iter().enumerate() {
        let sent = tokio::time::timeout(Duration::from_secs(60), send)
            .await
            .expect("send timed out")
            .unwrap()
            .unwrap();
        assert_eq!(sent.seq.0, i as u64 + 2, "sends keep their order");
    }
    let created = tokio::time::timeout(WAIT, subscription.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(created.seq.0, 1);
    for i in 0..N {
        let event = tokio::time::timeout(Duration::from_secs(60), subscription.next())
            .await
            .expect("delivery timed out")
            .unwrap()
            .unwrap();
        assert_eq!(event.seq.0, i as u64 + 2, "gap-free, in order");
        match event.body {
            EventBody::Message { text, .. } => assert_eq!(text, format!("m{i}")),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    for (who, counts) in [("alice", alice_counts), ("bob", bob_counts)] {
        let forwarded = counts[0].load(Ordering::Relaxed);
        let dropped = counts[1].load(Ordering::Relaxed);
        println!("proxy of {who}: {forwarded} packets forwarded, {dropped} dropped");
        let share = dropped as f64 / (forwarded + dropped) as f64;
        assert!((0.05..0.4).contains(&share), "{who}: dropped {share:.2}");
    }
    daemon.stop().await;
}

/// Sends `n` messages from `from` and waits until `to` has them all; returns the time taken.
async fn deliver(
    from: &Client,
    to: &mut quip_client::Subscription,
    conv: ConversationId,
    n: usize,
) -> Duration {
    let started = Instant::now();
    let sends: Vec<_> = (0..n)
        .map(|i| tokio::spawn(from.send(conv, format!("m{i}"))))
        .collect();
    let mut received = 0;
    while received < n {
        let event = tokio::time::timeout(Duration::from_secs(60), to.next())
            .await
            .expect("delivery stalled")
            .unwrap()
            .unwrap();
        if let EventBody::Message { .. } = event.body {
            received += 1;
        }
    }
    for send in sends {
        send.await.unwrap().unwrap();
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typing_flood_does_not_slow_message_delivery() {
    let daemon = start(test_limits()).await;
    let (a, b, m) = (
        daemon.user("alice").await,
        daemon.user("bob").await,
        daemon.user("mallory").await,
    );
    let alice = daemon.connect(&a).await;
    let bob = daemon.connect(&b).await;
    let conv = alice
        .create_conversation("abm", &[name("bob"), name("mallory")])
        .await
        .unwrap();
    let mut subscription = bob.subscribe(conv, StartAt::Latest).await.unwrap();
    let mut bob_events = bob.ephemeral_events();
    const N: usize = 2000;
    deliver(&alice, &mut subscription, conv, 50).await; // warm up
    let quiet = deliver(&alice, &mut subscription, conv, N).await;

    // Mallory, a member, floods typing datagrams (and some garbage) at ~10,000 a second.
    let mallory = daemon.raw_client(&m).await;
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = tokio::spawn({
        let flooding = flooding.clone();
        async move {
            let typing =
                bytes::Bytes::from(encode_datagram(&ClientDatagram::Typing { conv }).unwrap());
            let garbage = bytes::Bytes::from_static(&[0xff, 0xff, 0xff]);
            let mut sent = 0u64;
            while flooding.load(Ordering::Relaxed) {
                for i in 0..20 {
                    let datagram = if i == 0 {
                        garbage.clone()
                    } else {
                        typing.clone()
                    };
                    if mallory.send_datagram(datagram).is_ok() {
                        sent += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        }
    });
    let flood_started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = deliver(&alice, &mut subscription, conv, N).await;
    flooding.store(false, Ordering::Relaxed);
    let flood_time = flood_started.elapsed();
    let sent = flood.await.unwrap();

    // What bob saw of the flood: the daemon absorbs repeats, so at most about one relay per
    // second of flooding (the relay interval), not thousands.
    let mut relayed = 0;
    while wait_for(
        &mut bob_events,
        Duration::from_millis(50),
        is_typing(conv, "mallory"),
    )
    .await
    .is_some()
    {
        relayed += 1;
    }
    let ratio = flooded.as_secs_f64() / quiet.as_secs_f64();
    println!(
        "delivery of {N} messages: {quiet:?} quiet, {flooded:?} during a flood of {sent} datagrams \
         (ratio {ratio:.2}); daemon: {} received, {} rate-limited, {} malformed; bob saw {relayed} \
         typing relays",
        stat(&daemon.ephemeral.received),
        stat(&daemon.ephemeral.rate_limited_in),
        stat(&daemon.ephemeral.malformed),
    );
    assert!(sent > 1000, "the flood must be a flood: {sent}");
    assert!(stat(&daemon.ephemeral.rate_limited_in) > 0);
    let allowed = flood_time.as_secs() + 2;
    assert!(
        relayed as u64 <= allowed,
        "{relayed} relays in {flood_time:?}"
    );
    // Generous: this is a shared 2-core machine; the point is that delivery completes and is
    // not stalled behind the flood.
    assert!(
        ratio < 10.0,
        "delivery took {ratio:.1}x as long during the flood"
    );
    daemon.stop().await;
}
