//! Membership decides everything, also under races: a send racing its sender's removal is
//! either sequenced before the removal or refused, never half-applied; a non-member learns no
//! member list.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quip_client::{ClientError, ErrorCode, EventBody, Seq};
use quip_tests::check::full_history;
use quip_tests::{user, within, within_for, TestServer, BULK};

/// bob keeps sending while alice removes him: each send is acknowledged with a seq before the
/// removal's, or refused with NOT_FOUND and absent from the conversation; nothing of bob's
/// comes after his removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_racing_a_removal_is_ordered_before_it_or_refused() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let (mut total_acked, mut total_refused) = (0, 0);
    for round in 0..3 {
        let conv = within(
            "create",
            alice.create_conversation(&format!("race {round}"), &[user("bob")]),
        )
        .await
        .expect("alice creates");
        // bob keeps 16 sends in flight until he has been refused 50 times; alice removes him
        // once some of his messages are in.
        let acks = Arc::new(AtomicUsize::new(0));
        let sender = {
            let (bob, acks) = (bob.clone(), acks.clone());
            tokio::spawn(async move {
                let mut in_flight = VecDeque::new();
                let mut results = Vec::new();
                let mut refused = 0;
                for n in 0..5000 {
                    let text = format!("r{round} m{n:04}");
                    in_flight.push_back((text.clone(), bob.send(conv, text)));
                    if in_flight.len() < 16 {
                        continue;
                    }
                    let (text, send) = in_flight.pop_front().expect("in flight");
                    let result = within_for(BULK, "a racing send", send).await;
                    match &result {
                        Ok(_) => drop(acks.fetch_add(1, Ordering::Relaxed)),
                        Err(_) => refused += 1,
                    }
                    results.push((text, result));
                    if refused >= 50 {
                        break;
                    }
                }
                for (text, send) in in_flight {
                    results.push((text, within_for(BULK, "a racing send", send).await));
                }
                results
            })
        };
        while acks.load(Ordering::Relaxed) < 20 + 40 * round {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let removed = within("remove", alice.remove_member(conv, user("bob")))
            .await
            .expect("alice removes bob");
        let results = sender.await.expect("bob's sender");
        let texts: Vec<String> = results.iter().map(|(t, _)| t.clone()).collect();
        let mut acked = Vec::new();
        for (text, result) in results {
            match result {
                Ok(sent) => acked.push((sent.seq, text)),
                Err(ClientError::Server(body)) => {
                    assert_eq!(body.code, ErrorCode::NOT_FOUND, "{text}: {body:?}")
                }
                Err(e) => panic!("{text}: {e}"),
            }
        }
        total_acked += acked.len();
        total_refused += texts.len() - acked.len();
        let history = full_history(&alice, conv).await;
        let stored: Vec<(Seq, String)> = history
            .iter()
            .filter(|e| e.sender.as_str() == "bob")
            .filter_map(|e| match &e.body {
                EventBody::Message { text, .. } => Some((e.seq, text.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            stored, acked,
            "round {round}: stored is exactly what was acknowledged"
        );
        assert!(
            acked.iter().all(|(seq, _)| *seq < removed),
            "round {round}: a send acknowledged after the removal at {removed}"
        );
        // Acks keep the send order: the acknowledged ones are a prefix of what bob wrote.
        let prefix: Vec<&String> = texts.iter().take(acked.len()).collect();
        let got: Vec<&String> = acked.iter().map(|(_, t)| t).collect();
        assert_eq!(
            got, prefix,
            "round {round}: acknowledged sends are not a prefix"
        );
    }
    println!("racing sends: {total_acked} acknowledged, {total_refused} refused");
    assert!(
        total_acked > 0 && total_refused > 0,
        "the removal did not land among the sends"
    );
}

/// carol shares no conversation with alice and bob: neither their conversation nor its
/// members appear in anything she can ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_member_learns_no_member_list() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let _ = server.add_user("bob").await;
    let (_, carol) = server.user_client("carol").await;
    let conv = within(
        "create",
        alice.create_conversation("secret", &[user("bob")]),
    )
    .await
    .expect("create");
    let listed = within("list", carol.conversations()).await.expect("list");
    assert!(listed.iter().all(|c| c.conv != conv));
    let presence = within("presence", carol.presence())
        .await
        .expect("presence");
    assert!(
        presence.is_empty(),
        "carol sees the presence of strangers: {presence:?}"
    );
    let history = within("history", carol.history(conv, None, 10)).await;
    assert_eq!(
        history.err().and_then(|e| e.code()),
        Some(ErrorCode::NOT_FOUND)
    );
}
