//! Resuming a subscription from a cursor (epoch, seq).

use quip_client::{ClientError, Epoch, Position, Seq, StartAt};
use quip_tests::check::{assert_consecutive, collect_events, full_history, next_event, next_item};
use quip_tests::{within, TestServer, STEP};

/// After(epoch, K) delivers exactly K+1..=head, then live events; K = head delivers only live
/// ones; a cursor of another epoch or beyond the head is answered by CursorReset with the
/// server's epoch and head; the epoch, and so the cursor, survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_cursor() {
    let server = TestServer::start().await;
    let (token, alice) = server.user_client("alice").await;
    let conv = within("create", alice.create_conversation("cursor", &[]))
        .await
        .expect("alice creates a conversation");
    for i in 0..20 {
        within("send", alice.send(conv, format!("stored {i}")))
            .await
            .expect("send");
    }
    let head = Seq(21);
    let epoch = alice.epoch();
    let at = |seq: u64| {
        StartAt::After(Position {
            epoch,
            seq: Seq(seq),
        })
    };

    for k in [0, 1, 10, 20] {
        let mut feed = within("subscribe", alice.subscribe(conv, at(k)))
            .await
            .unwrap_or_else(|e| panic!("subscribing after {k}: {e}"));
        assert_eq!(
            feed.head(),
            head,
            "the head reported when subscribing after {k}"
        );
        let stored = collect_events(&mut feed, (head.0 - k) as usize, STEP, "stored events").await;
        assert_consecutive(
            &format!("events after {k}"),
            stored.iter().map(|e| e.seq.0),
            k + 1,
        );
        drop(feed);
    }

    // From the head: only what comes next.
    let mut feed = within("subscribe", alice.subscribe(conv, at(head.0)))
        .await
        .expect("subscribing at the head");
    let live = within("send", alice.send(conv, "live"))
        .await
        .expect("send");
    let event = next_event(&mut feed, "the feed from the head").await;
    assert_eq!(
        event.seq, live.seq,
        "the first event after subscribing at the head"
    );
    drop(feed);
    let head = live.seq;

    // Cursors that do not apply.
    let mut other = epoch.0;
    other[0] ^= 0xff;
    let resets = [
        (
            "another epoch",
            StartAt::After(Position {
                epoch: Epoch(other),
                seq: Seq(5),
            }),
        ),
        ("one past the head", at(head.0 + 1)),
        ("far past the head", at(u64::MAX)),
    ];
    for (what, start) in resets {
        match within("subscribe", alice.subscribe(conv, start)).await {
            Err(ClientError::CursorReset { epoch: e, head: h }) => {
                assert_eq!(e, epoch, "{what}: CursorReset names another epoch");
                assert_eq!(h, head, "{what}: CursorReset names another head");
            }
            other => panic!("{what}: expected CursorReset, got {other:?}"),
        }
    }
    // A refused cursor leaves the client able to subscribe again.
    let mut feed = within("subscribe", alice.subscribe(conv, at(head.0 - 1)))
        .await
        .expect("subscribing after a reset");
    let event = next_event(&mut feed, "the feed after a reset").await;
    assert_eq!(event.seq, head);
    drop(feed);

    // A restart keeps the epoch: the cursor still applies.
    drop(alice);
    let server = server.restart().await;
    let alice = server.client(&token).await;
    assert_eq!(
        alice.epoch(),
        epoch,
        "the store's epoch changed across a restart"
    );
    let mut feed = within("subscribe", alice.subscribe(conv, at(15)))
        .await
        .expect("subscribing with an old cursor after a restart");
    let stored = collect_events(&mut feed, (head.0 - 15) as usize, STEP, "after the restart").await;
    assert_consecutive(
        "events after 15, after the restart",
        stored.iter().map(|e| e.seq.0),
        16,
    );
    let history = full_history(&alice, conv).await;
    assert_eq!(&history[15..], &stored[..], "the feed differs from history");
    let live = within("send", alice.send(conv, "after restart"))
        .await
        .expect("send");
    let event = next_event(&mut feed, "live after the restart").await;
    assert_eq!(event.seq, live.seq);
    server.shutdown().await;
}

/// A second subscription to a conversation the client already follows is either refused, and
/// the first goes on, or replaces the first, and dropping the replaced one leaves the new one
/// working. Either way exactly one working feed remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_subscription_leaves_one_working_feed() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let conv = within("create", alice.create_conversation("twice", &[]))
        .await
        .expect("create");
    let mut first = within("subscribe", alice.subscribe(conv, StartAt::Latest))
        .await
        .expect("first subscription");
    let second = within("subscribe", alice.subscribe(conv, StartAt::Latest)).await;
    let mut working = match second {
        Err(refused) => {
            let sent = within("send", alice.send(conv, "first still there?"))
                .await
                .expect("send");
            match next_item(&mut first, "the first subscription").await {
                Some(Ok(event)) => assert_eq!(event.seq, sent.seq),
                other => {
                    panic!("a refused second subscription ({refused}) broke the first: {other:?}")
                }
            }
            drop(first);
            within("subscribe", alice.subscribe(conv, StartAt::Latest))
                .await
                .expect("subscribing again once the first is dropped")
        }
        Ok(second) => {
            drop(first);
            second
        }
    };
    let sent = within("send", alice.send(conv, "still listening?"))
        .await
        .expect("send");
    match next_item(&mut working, "the remaining subscription").await {
        Some(Ok(event)) => assert_eq!(event.seq, sent.seq),
        other => panic!(
            "the remaining subscription does not deliver: {other:?} instead of seq {}",
            sent.seq
        ),
    }
}

/// Dropping a subscription and subscribing again at once, many times over, each time yields a
/// feed that delivers what it asked for: never the events or the end of the dropped one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_right_after_dropping_gets_a_fresh_feed() {
    const ROUNDS: u64 = 30;
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let conv = within("create", alice.create_conversation("again and again", &[]))
        .await
        .expect("create");
    let epoch = alice.epoch();
    for round in 0..ROUNDS {
        // Seq 1 is Created; round r starts with head r + 1.
        let dropped = within("subscribe", alice.subscribe(conv, StartAt::Beginning))
            .await
            .unwrap_or_else(|e| panic!("round {round}: subscribing from the beginning: {e}"));
        drop(dropped);
        let head = round + 1;
        let start = StartAt::After(Position {
            epoch,
            seq: Seq(head),
        });
        let mut feed = within("subscribe", alice.subscribe(conv, start))
            .await
            .unwrap_or_else(|e| panic!("round {round}: subscribing again at once: {e}"));
        let sent = within("send", alice.send(conv, format!("round {round}")))
            .await
            .expect("send");
        match next_item(&mut feed, "the new feed").await {
            Some(Ok(event)) => assert_eq!(
                event.seq,
                sent.seq,
                "round {round}: the new feed (after {head}) delivered {} first",
                quip_tests::check::describe(&event)
            ),
            other => panic!(
                "round {round}: the new feed, subscribed right after dropping the previous one, \
                 gave {other:?} instead of seq {}",
                sent.seq
            ),
        }
    }
}
