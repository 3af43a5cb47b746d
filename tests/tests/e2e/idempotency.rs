//! A retried send (same message id) is stored once, also across a daemon restart.

use quip_client::{ClientMessageId, ConversationId, ErrorCode, Sent};
use quip_tests::check::{full_history, messages, Msg};
use quip_tests::{user, within, TestServer};

async fn send(
    client: &quip_client::Client,
    conv: ConversationId,
    id: ClientMessageId,
    text: &str,
) -> Sent {
    within("send_with_id", client.send_with_id(conv, id, text))
        .await
        .unwrap_or_else(|e| panic!("{} sends {text:?}: {e}", client.user()))
}

async fn id_reused(
    client: &quip_client::Client,
    conv: ConversationId,
    id: ClientMessageId,
    text: &str,
    when: &str,
) {
    let result = within("send_with_id", client.send_with_id(conv, id, text)).await;
    match result {
        Err(e) => assert_eq!(
            e.code(),
            Some(ErrorCode::ID_REUSED),
            "{when}: reusing an id failed with {e:?}"
        ),
        Ok(sent) => panic!("{when}: reusing an id for another text was accepted: {sent:?}"),
    }
}

/// Same id and text twice: one message, the second answer a duplicate with the same seq and
/// time; same id with another text: ID_REUSED; two racing retries: one message; the same id
/// from another sender: another message. After a restart on the same data all of this holds
/// for the ids stored before it, and new messages take new seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_send_is_stored_once() {
    let server = TestServer::start().await;
    let (alice_token, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = within(
        "create",
        alice.create_conversation("retries", &[user("bob")]),
    )
    .await
    .expect("alice creates a conversation");

    let id = ClientMessageId([7; 16]);
    let first = send(&alice, conv, id, "only once").await;
    assert!(!first.duplicate, "the first send is a duplicate");
    let again = send(&alice, conv, id, "only once").await;
    assert!(again.duplicate, "the retry is not flagged as a duplicate");
    assert_eq!(again.seq, first.seq, "the retry names another seq");
    assert_eq!(again.at_ms, first.at_ms, "the retry names another time");
    id_reused(&alice, conv, id, "not the same text", "before the restart").await;

    // Retries racing their original (both in flight at once).
    let racing = ClientMessageId([8; 16]);
    let (a, b) = tokio::join!(
        alice.send_with_id(conv, racing, "racing"),
        alice.send_with_id(conv, racing, "racing")
    );
    let (a, b) = (a.expect("racing send"), b.expect("racing retry"));
    assert_eq!(
        a.seq, b.seq,
        "two racing sends of one id were stored at two seqs"
    );
    assert_eq!(
        [a.duplicate, b.duplicate].iter().filter(|d| **d).count(),
        1,
        "exactly one of two racing sends is the duplicate: {a:?} {b:?}"
    );

    // Ids are per sender.
    let bobs = send(&bob, conv, id, "only once").await;
    assert!(!bobs.duplicate, "bob's message is taken for alice's");
    assert_ne!(bobs.seq, first.seq);

    // Ids are per conversation too.
    let other_conv = within("create", alice.create_conversation("elsewhere", &[]))
        .await
        .expect("alice creates a second conversation");
    let elsewhere = send(&alice, other_conv, id, "only once").await;
    assert!(
        !elsewhere.duplicate,
        "the same id in another conversation is taken for a retry"
    );
    assert_eq!(
        elsewhere.seq.0, 2,
        "the first message of the other conversation"
    );

    let expected = vec![
        Msg::new(first.seq.0, "alice", "only once"),
        Msg::new(a.seq.0, "alice", "racing"),
        Msg::new(bobs.seq.0, "bob", "only once"),
    ];
    let history = full_history(&alice, conv).await;
    assert_eq!(messages(&history), expected, "history before the restart");
    let head = history.last().expect("history is not empty").seq;

    drop((alice, bob));
    let server = server.restart().await;
    let alice = server.client(&alice_token).await;
    let after = send(&alice, conv, id, "only once").await;
    assert!(
        after.duplicate,
        "after a restart the retry is stored again: {after:?}"
    );
    assert_eq!(
        after.seq, first.seq,
        "after a restart the retry names another seq"
    );
    assert_eq!(
        after.at_ms, first.at_ms,
        "after a restart the retry names another time"
    );
    let after = send(&alice, conv, racing, "racing").await;
    assert!(
        after.duplicate && after.seq == a.seq,
        "after a restart: {after:?}"
    );
    id_reused(&alice, conv, id, "not the same text", "after the restart").await;

    let fresh = send(&alice, conv, ClientMessageId([9; 16]), "after the restart").await;
    assert!(!fresh.duplicate);
    assert_eq!(
        fresh.seq,
        head.next(),
        "the first new message after a restart"
    );
    let again = send(&alice, conv, ClientMessageId([9; 16]), "after the restart").await;
    assert!(again.duplicate && again.seq == fresh.seq, "{again:?}");

    let mut expected = expected;
    expected.push(Msg::new(fresh.seq.0, "alice", "after the restart"));
    let history = full_history(&alice, conv).await;
    assert_eq!(messages(&history), expected, "history after the restart");
    server.shutdown().await;
}
