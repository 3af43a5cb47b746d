//! Membership changes are events of the conversation's sequence like messages.

use quip_client::{
    ClientError, ErrorBody, ErrorCode, Event, EventBody, Seq, StartAt, Subscription,
};
use quip_tests::check::{
    assert_consecutive, assert_same_events, collect_events, describe, full_history, next_event,
    next_item,
};
use quip_tests::{user, within, TestServer, STEP};

/// create (alice, bob), messages, add carol, remove bob, more messages: alice and carol see one
/// identical sequence; bob's feed is the same up to MemberRemoved(bob), then ends with
/// NOT_FOUND; bob can no longer post or read; carol, added later, reads everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_events_in_sequence() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (bob_token, bob) = server.user_client("bob").await;
    let (_, carol) = server.user_client("carol").await;
    // bob's second device: another connection of the same user.
    let bob_phone = server.client(&bob_token).await;

    let conv = within("create", alice.create_conversation("club", &[user("bob")]))
        .await
        .expect("alice creates the conversation");
    let mut alice_feed = within("subscribe", alice.subscribe(conv, StartAt::Beginning))
        .await
        .expect("alice subscribes");
    let mut bob_feed = within("subscribe", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes");
    let mut bob_phone_feed = within("subscribe", bob_phone.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes on his phone");

    let step =
        |seq: Result<Seq, ClientError>, what: &str| seq.unwrap_or_else(|e| panic!("{what}: {e}")).0;
    let mut seqs = vec![1];
    seqs.push(step(
        within("send", alice.send(conv, "hello bob"))
            .await
            .map(|s| s.seq),
        "alice sends",
    ));
    let bob_sent = within("send", bob.send(conv, "hi alice"))
        .await
        .expect("bob sends");
    seqs.push(bob_sent.seq.0);
    seqs.push(step(
        within("add", alice.add_member(conv, user("carol"))).await,
        "alice adds carol",
    ));
    seqs.push(step(
        within("send", carol.send(conv, "thanks for having me"))
            .await
            .map(|s| s.seq),
        "carol sends",
    ));
    let removed = step(
        within("remove", alice.remove_member(conv, user("bob"))).await,
        "alice removes bob",
    );
    seqs.push(removed);
    seqs.push(step(
        within("send", alice.send(conv, "bob has left"))
            .await
            .map(|s| s.seq),
        "alice sends",
    ));
    seqs.push(step(
        within("send", carol.send(conv, "noted"))
            .await
            .map(|s| s.seq),
        "carol sends",
    ));
    assert_consecutive("seqs of the requests", seqs.iter().copied(), 1);
    let head = *seqs.last().expect("events were made");

    // After his removal bob is a stranger: the same NOT_FOUND as for any unknown conversation.
    let refused = within("bob sends", bob.send(conv, "am I still here?")).await;
    match refused {
        Err(ClientError::Server(body)) => {
            assert_eq!(body, ErrorBody::not_found(), "bob's send after removal")
        }
        other => panic!("bob's send after his removal: {other:?}, expected NOT_FOUND"),
    }
    // A retry of a message stored before his removal is answered with its original ack: the
    // message is in the sequence, and the sender's outbox must learn so (dedupe comes before the
    // membership check, SPEC "Idempotent sends"). It tells bob nothing he did not know.
    let retry = within(
        "bob retries",
        bob.send_with_id(conv, bob_sent.id, "hi alice"),
    )
    .await
    .expect("a retry of a stored message is acknowledged");
    assert!(retry.duplicate, "the retry is marked as a duplicate");
    assert_eq!(retry.seq, bob_sent.seq, "the retry names the original seq");
    let refused = within("bob reads", bob.history(conv, None, 100)).await;
    assert_eq!(
        refused.as_ref().err().and_then(ClientError::code),
        Some(ErrorCode::NOT_FOUND),
        "bob's history after removal: {refused:?}"
    );
    let listed = within("bob lists", bob.conversations())
        .await
        .expect("bob lists");
    assert!(
        listed.iter().all(|c| c.conv != conv),
        "bob still lists the conversation"
    );

    // alice's feed: the whole sequence.
    let alice_events = collect_events(&mut alice_feed, head as usize, STEP, "alice's feed").await;
    assert_consecutive("alice's feed", alice_events.iter().map(|e| e.seq.0), 1);
    let kinds: Vec<String> = alice_events.iter().map(describe).collect();
    let expect_body = |event: &Event, want: &EventBody| {
        assert_eq!(
            &event.body,
            want,
            "event {} is {}",
            event.seq,
            describe(event)
        );
    };
    expect_body(
        &alice_events[0],
        &EventBody::Created {
            title: "club".into(),
            members: vec![user("alice"), user("bob")],
        },
    );
    expect_body(
        &alice_events[3],
        &EventBody::MemberAdded {
            user: user("carol"),
        },
    );
    expect_body(
        &alice_events[5],
        &EventBody::MemberRemoved { user: user("bob") },
    );
    let senders: Vec<&str> = alice_events.iter().map(|e| e.sender.as_str()).collect();
    assert_eq!(
        senders,
        ["alice", "alice", "bob", "alice", "carol", "alice", "alice", "carol"],
        "who caused each event: {kinds:#?}"
    );

    // bob's feeds, on both connections: the same events up to his removal, then the end.
    for (what, feed) in [
        ("bob's feed", &mut bob_feed),
        ("bob's phone feed", &mut bob_phone_feed),
    ] {
        let events = collect_events(feed, removed as usize, STEP, what).await;
        assert_same_events(what, &alice_events[..removed as usize], &events);
        expect_removed_end(feed, what).await;
    }

    // carol, added at seq 4, reads everything from seq 1, live and in history.
    let mut carol_feed = within("subscribe", carol.subscribe(conv, StartAt::Beginning))
        .await
        .expect("carol subscribes from the beginning");
    let carol_events = collect_events(&mut carol_feed, head as usize, STEP, "carol's feed").await;
    assert_same_events("carol's feed", &alice_events, &carol_events);
    let carol_history = full_history(&carol, conv).await;
    assert_same_events("carol's history", &alice_events, &carol_history);
    let alice_history = full_history(&alice, conv).await;
    assert_same_events("alice's history", &alice_events, &alice_history);

    // Membership state agrees with the events.
    let listed = within("alice lists", alice.conversations())
        .await
        .expect("alice lists");
    let summary = listed
        .iter()
        .find(|c| c.conv == conv)
        .expect("alice lists the conversation");
    assert_eq!(
        summary.members,
        [user("alice"), user("carol")],
        "members after the changes"
    );
    assert_eq!(summary.head, Seq(head), "head in the listing");
}

/// The end of a removed member's feed: NOT_FOUND, then nothing.
async fn expect_removed_end(feed: &mut Subscription, what: &str) {
    match next_item(feed, &format!("{what} after the removal")).await {
        Some(Err(e)) => assert_eq!(
            e.code(),
            Some(ErrorCode::NOT_FOUND),
            "{what} ended with {e:?}, expected NOT_FOUND"
        ),
        Some(Ok(event)) => panic!("{what}: received {} after the removal", describe(&event)),
        None => panic!("{what} ended without saying why"),
    }
    assert!(
        next_item(feed, &format!("{what}, ended")).await.is_none(),
        "{what} goes on after its end"
    );
}

/// A member removed and added again reads everything, including its own removal, and its feed
/// is not ended by that old removal (it is history); a new removal ends it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readded_member_follows_again() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = within(
        "create",
        alice.create_conversation("revolving door", &[user("bob")]),
    )
    .await
    .expect("alice creates the conversation");
    let ok = |what: &str, r: Result<Seq, ClientError>| r.unwrap_or_else(|e| panic!("{what}: {e}"));
    let sent = |r: Result<quip_client::Sent, ClientError>| r.map(|s| s.seq);
    ok(
        "send",
        sent(within("send", alice.send(conv, "before")).await),
    );
    ok(
        "remove bob",
        within("remove", alice.remove_member(conv, user("bob"))).await,
    );
    ok(
        "send",
        sent(within("send", alice.send(conv, "while bob is away")).await),
    );
    let added = ok(
        "add bob",
        within("add", alice.add_member(conv, user("bob"))).await,
    );
    assert_eq!(added, Seq(5));

    let mut feed = within("subscribe", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob, added again, subscribes");
    let past = collect_events(&mut feed, 5, STEP, "bob's feed of the past").await;
    let history = full_history(&alice, conv).await;
    assert_same_events("bob's feed of the past", &history, &past);
    assert_eq!(past[2].body, EventBody::MemberRemoved { user: user("bob") });

    let live = ok(
        "send",
        sent(within("send", alice.send(conv, "welcome back")).await),
    );
    let event = next_event(&mut feed, "bob's live feed").await;
    assert_eq!(
        event.seq,
        live,
        "bob's feed after his old removal: {}",
        describe(&event)
    );
    ok(
        "bob sends",
        sent(within("send", bob.send(conv, "glad to be back")).await),
    );
    let event = next_event(&mut feed, "bob's live feed").await;
    assert_eq!(
        event.seq,
        live.next(),
        "bob's own message: {}",
        describe(&event)
    );

    let removed = ok(
        "remove bob",
        within("remove", alice.remove_member(conv, user("bob"))).await,
    );
    let event = next_event(&mut feed, "bob's feed at his second removal").await;
    assert_eq!(event.seq, removed);
    assert_eq!(event.body, EventBody::MemberRemoved { user: user("bob") });
    expect_removed_end(&mut feed, "bob's feed").await;
}
