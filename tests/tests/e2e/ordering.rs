//! Pipelined sends keep the order they were called in.

use futures_util::future::join_all;
use quip_client::{Client, ConversationId, Sent};
use quip_tests::check::{assert_consecutive, full_history, messages};
use quip_tests::{user, within, within_for, TestServer, BULK};

async fn pipeline(client: &Client, conv: ConversationId, tag: &str, n: usize) -> Vec<Sent> {
    // Every send is queued when called; nothing is awaited until all are.
    let sends: Vec<_> = (0..n)
        .map(|i| client.send(conv, format!("{tag} {i}")))
        .collect();
    within_for(
        BULK,
        format_args!("{n} pipelined sends of {tag}"),
        join_all(sends),
    )
    .await
    .into_iter()
    .enumerate()
    .map(|(i, r)| r.unwrap_or_else(|e| panic!("{tag}: send {i} failed: {e}")))
    .collect()
}

/// 2,000 sends fired without awaiting: acked seqs follow the call order, consecutively; and two
/// clients pipelining at once each keep their own order while sharing one gap-free sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_keep_order() {
    const N: usize = 2000;
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = within("create", alice.create_conversation("fast", &[user("bob")]))
        .await
        .expect("alice creates a conversation");

    let acks = pipeline(&alice, conv, "alone", N).await;
    assert_consecutive(
        "seqs of pipelined sends, in call order",
        acks.iter().map(|s| s.seq.0),
        2,
    );
    assert!(
        acks.iter().all(|s| !s.duplicate),
        "a fresh send was answered as a duplicate"
    );
    let history = full_history(&alice, conv).await;
    let texts: Vec<String> = messages(&history).into_iter().map(|m| m.text).collect();
    let expected: Vec<String> = (0..N).map(|i| format!("alone {i}")).collect();
    assert!(texts == expected, "history is not in call order");

    // Two senders at once.
    let first = (N + 2) as u64;
    let (a, b) = tokio::join!(
        pipeline(&alice, conv, "alice", N / 2),
        pipeline(&bob, conv, "bob", N / 2)
    );
    for (who, acks) in [("alice", &a), ("bob", &b)] {
        assert!(
            acks.windows(2).all(|w| w[0].seq < w[1].seq),
            "{who}'s concurrent sends were stored out of call order"
        );
    }
    let mut all: Vec<u64> = a.iter().chain(&b).map(|s| s.seq.0).collect();
    all.sort_unstable();
    assert_consecutive("seqs of both senders together", all, first);
    let history = full_history(&alice, conv).await;
    for who in ["alice", "bob"] {
        let texts: Vec<String> = messages(&history[first as usize - 1..])
            .into_iter()
            .filter(|m| m.sender == who)
            .map(|m| m.text)
            .collect();
        let expected: Vec<String> = (0..N / 2).map(|i| format!("{who} {i}")).collect();
        assert!(
            texts == expected,
            "{who}'s messages are not in call order in history"
        );
    }
}
