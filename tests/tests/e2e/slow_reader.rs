//! A member that does not read its feed delays nobody, and later catches up from the store.

use std::time::Duration;

use futures_util::future::join_all;
use quip_client::StartAt;
use quip_tests::check::{
    assert_consecutive, assert_same_events, assert_same_messages, collect_events, messages, Msg,
};
use quip_tests::{user, within, within_for, TestServer};

/// bob subscribes and does not read; carol reads; alice sends 5,000 messages: carol gets them
/// all in order while bob still reads nothing; then bob reads and gets all of them too, in
/// order, with no gap or duplicate, and live events after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_delay_others() {
    const N: usize = 5000;
    const GENEROUS: Duration = Duration::from_secs(90);
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let (_, carol) = server.user_client("carol").await;
    let conv = within(
        "create",
        alice.create_conversation("slow", &[user("bob"), user("carol")]),
    )
    .await
    .expect("alice creates a conversation");

    let mut bob_feed = within("subscribe", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes");
    let mut carol_feed = within("subscribe", carol.subscribe(conv, StartAt::Beginning))
        .await
        .expect("carol subscribes");
    let carol_reader = tokio::spawn(async move {
        let events = collect_events(&mut carol_feed, N + 1, GENEROUS, "carol's feed").await;
        (events, carol_feed)
    });

    let texts: Vec<String> = (0..N).map(|i| format!("message {i} — 💬 {i}")).collect();
    let sends: Vec<_> = texts.iter().map(|t| alice.send(conv, t.as_str())).collect();
    let acks = within_for(GENEROUS, "alice's 5,000 sends", join_all(sends)).await;
    let sent: Vec<Msg> = acks
        .into_iter()
        .zip(&texts)
        .map(|(ack, text)| {
            let ack = ack.unwrap_or_else(|e| panic!("alice's send failed: {e}"));
            Msg::new(ack.seq.0, "alice", text)
        })
        .collect();
    assert_consecutive("alice's acks", sent.iter().map(|m| m.seq), 2);

    let (carol_events, mut carol_feed) = within_for(GENEROUS, "carol's feed", carol_reader)
        .await
        .expect("carol's reader panicked");
    assert_consecutive("carol's feed", carol_events.iter().map(|e| e.seq.0), 1);
    assert_same_messages("carol's feed", &sent, &messages(&carol_events));

    // Only now does bob read.
    let bob_events = collect_events(&mut bob_feed, N + 1, GENEROUS, "bob's late feed").await;
    assert_same_events("bob's late feed", &carol_events, &bob_events);

    // And both stay live.
    let live = within("send", alice.send(conv, "still there?"))
        .await
        .expect("send");
    for (who, feed) in [("bob", &mut bob_feed), ("carol", &mut carol_feed)] {
        let event = quip_tests::check::next_event(feed, who).await;
        assert_eq!(event.seq, live.seq, "{who}'s next live event");
    }
}
