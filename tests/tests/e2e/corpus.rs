//! A real dialog replayed by two users, checked on both live feeds and in history.

use quip_client::{ClientMessageId, EventBody, StartAt};
use quip_tests::check::{
    assert_consecutive, assert_same_events, assert_same_messages, collect_events, full_history,
    messages, Msg,
};
use quip_tests::{load_corpus, user, within, TestServer, BULK};

/// Every English conversation, turn by turn, alice on even turns and bob on odd ones, each turn
/// acknowledged before the next: both live feeds and history hold exactly what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_english_two_users() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = within(
        "alice creates the conversation",
        alice.create_conversation("english corpus", &[user("bob")]),
    )
    .await
    .expect("alice creates a conversation with bob");

    let mut alice_feed = within(
        "alice subscribes",
        alice.subscribe(conv, StartAt::Beginning),
    )
    .await
    .expect("alice subscribes from the beginning");
    let mut bob_feed = within("bob subscribes", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes from the beginning");

    let conversations = load_corpus(&["english"]);
    let turns: Vec<(usize, &String)> = conversations
        .iter()
        .flat_map(|turns| turns.iter().enumerate())
        // The protocol refuses empty messages; the corpus has none, but stay safe.
        .filter(|(_, text)| !text.is_empty())
        .collect();
    assert!(!turns.is_empty(), "the English corpus has no turn");
    let total = turns.len();

    // Both feeds are read while the dialog goes on: Created, then every message.
    let alice_reader = tokio::spawn(async move {
        let events = collect_events(&mut alice_feed, total + 1, BULK, "alice's feed").await;
        (events, alice_feed)
    });
    let bob_reader = tokio::spawn(async move {
        let events = collect_events(&mut bob_feed, total + 1, BULK, "bob's feed").await;
        (events, bob_feed)
    });

    let mut sent: Vec<Msg> = Vec::with_capacity(total);
    let mut ids: Vec<ClientMessageId> = Vec::with_capacity(total);
    for (n, (turn, text)) in turns.iter().enumerate() {
        let (speaker, client) = if turn % 2 == 0 {
            ("alice", &alice)
        } else {
            ("bob", &bob)
        };
        let ack = within(
            format_args!("{speaker} sends turn {n} of {total}"),
            client.send(conv, text.as_str()),
        )
        .await
        .unwrap_or_else(|e| panic!("{speaker} sending turn {n} ({text:?}): {e}"));
        assert!(!ack.duplicate, "a fresh send was answered as a duplicate");
        assert_eq!(ack.conv, conv);
        sent.push(Msg::new(ack.seq.0, speaker, text));
        ids.push(ack.id);
    }
    assert_consecutive("acknowledged seqs", sent.iter().map(|m| m.seq), 2);

    for (who, reader) in [("alice", alice_reader), ("bob", bob_reader)] {
        let (events, _feed) = within(format_args!("{who}'s feed"), reader)
            .await
            .expect("the reader task panicked");
        let what = format!("{who}'s live feed");
        assert_consecutive(&what, events.iter().map(|e| e.seq.0), 1);
        match &events[0].body {
            EventBody::Created { members, .. } => {
                assert_eq!(members, &[user("alice"), user("bob")], "{what}: members")
            }
            other => panic!("{what}: seq 1 is {other:?}, not Created"),
        }
        assert_same_messages(&what, &sent, &messages(&events));
        for (event, id) in events[1..].iter().zip(&ids) {
            match &event.body {
                EventBody::Message { id: got, .. } => {
                    assert_eq!(got, id, "{what}: seq {} carries another id", event.seq)
                }
                other => panic!("{what}: seq {} is {other:?}", event.seq),
            }
        }
        let history = full_history(if who == "alice" { &alice } else { &bob }, conv).await;
        assert_same_events(
            &format!("{who}: history against the live feed"),
            &events,
            &history,
        );
    }
}
