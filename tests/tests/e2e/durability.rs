//! SIGKILL of the real daemon: every acknowledged message survives, exactly once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use quip_client::{Client, ClientMessageId, ConversationId, EventBody, Sent, StartAt};
use quip_tests::check::{
    assert_consecutive, assert_same_events, assert_same_messages, collect_events, full_history,
    messages, text, Msg,
};
use quip_tests::{within, within_for, DaemonProcess, BULK};

const ROUNDS: usize = 3;
const BATCH: usize = 500;

fn round_texts(round: usize) -> Vec<String> {
    (0..BATCH)
        .map(|i| format!("round {round} · message {i} · ключ {i} · 鍵 {i} · 🔑"))
        .collect()
}

async fn create(client: &Client) -> ConversationId {
    within(
        "creating a conversation",
        client.create_conversation("durability", &[]),
    )
    .await
    .expect("creating a conversation")
}

/// Rounds of: send a batch (pipelined), SIGKILL the daemon right after the last ack, restart
/// on the same data: history holds every acknowledged message once, in order, seqs gap-free.
/// Round 0 sends with `quip send` (stdin), the others with the SDK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_after_acks_loses_nothing() {
    let mut daemon = DaemonProcess::start().await;
    let token = daemon.add_user("alice").await;
    let conv = create(&daemon.client(&token).await).await;

    let mut acked: Vec<Msg> = Vec::new();
    for round in 0..ROUNDS {
        let texts = round_texts(round);
        if round == 0 {
            let quip = daemon.quip(&token).await;
            let mut input = texts.join("\n");
            input.push('\n');
            let out = quip
                .run_with_stdin(&["send", &conv.to_string()], &input)
                .await;
            // `quip send` has printed its last ack and exited: kill now.
            daemon.kill9();
            out.expect_success("quip send");
            let seqs = out.stdout_lines();
            assert_eq!(
                seqs.len(),
                BATCH,
                "quip send acknowledged {} lines",
                seqs.len()
            );
            for (seq, text) in seqs.iter().zip(&texts) {
                let seq = seq.parse().expect("quip send prints seqs");
                acked.push(Msg::new(seq, "alice", text));
            }
        } else {
            let client = daemon.client(&token).await;
            let sends: Vec<_> = texts
                .iter()
                .map(|t| client.send(conv, t.as_str()))
                .collect();
            let results = within_for(BULK, "pipelined sends", join_all(sends)).await;
            // The last ack is in: kill before anything else happens.
            daemon.kill9();
            for (result, text) in results.into_iter().zip(&texts) {
                let sent = result.unwrap_or_else(|e| panic!("round {round}: send failed: {e}"));
                acked.push(Msg::new(sent.seq.0, "alice", text));
            }
        }
        assert_consecutive(
            &format!("acknowledged seqs after round {round}"),
            acked.iter().map(|m| m.seq),
            2,
        );

        daemon.restart().await;
        let client = daemon.client(&token).await;
        let history = full_history(&client, conv).await;
        assert!(
            matches!(history[0].body, EventBody::Created { .. }),
            "seq 1 is not the Created event after round {round}"
        );
        assert_same_messages(
            &format!("history after SIGKILL round {round}"),
            &acked,
            &messages(&history),
        );
    }
}

/// What the background sender has issued and what came back acknowledged.
#[derive(Default)]
struct Ledger {
    issued: Vec<(ClientMessageId, String)>,
    acked: HashMap<usize, Sent>,
}

fn message_id(round: usize, i: usize) -> ClientMessageId {
    let mut id = [0x5a; 16];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    id[8] = round as u8;
    ClientMessageId(id)
}

/// SIGKILL while sends are in flight: after restart every acknowledged message is at its seq,
/// nothing is stored twice, seqs are gap-free; retrying the unacknowledged ones with their ids
/// stores each exactly once (a stored one is answered as a duplicate with its seq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_while_sending_keeps_every_ack() {
    const WINDOW: usize = 256;
    const KILL_AFTER: usize = 1000;
    let mut daemon = DaemonProcess::start().await;
    let token = daemon.add_user("alice").await;
    let conv = create(&daemon.client(&token).await).await;
    let mut stored_texts: HashSet<String> = HashSet::new();

    for round in 0..2 {
        let client = daemon.client(&token).await;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (progress, mut acks) = tokio::sync::mpsc::unbounded_channel::<usize>();
        // Keeps WINDOW sends in flight until the connection dies.
        let sender = {
            let (client, ledger) = (client.clone(), ledger.clone());
            tokio::spawn(async move {
                let mut in_flight = std::collections::VecDeque::new();
                for i in 0.. {
                    let id = message_id(round, i);
                    let text = format!("crash round {round} · message {i} · λ · 🚀");
                    ledger
                        .lock()
                        .expect("ledger")
                        .issued
                        .push((id, text.clone()));
                    in_flight.push_back((i, client.send_with_id(conv, id, text)));
                    if in_flight.len() >= WINDOW {
                        let (i, ack) = in_flight.pop_front().expect("window is full");
                        let Ok(sent) = ack.await else { return };
                        ledger.lock().expect("ledger").acked.insert(i, sent);
                        let _ = progress.send(i);
                    }
                }
            })
        };
        let mut seen = 0;
        while seen < KILL_AFTER {
            within("acks before the kill", acks.recv())
                .await
                .expect("the sender stopped before the kill");
            seen += 1;
        }
        daemon.kill9();
        sender.abort();
        let _ = sender.await;
        drop(client);
        let Ledger { issued, acked } = std::mem::take(&mut *ledger.lock().expect("ledger"));
        assert!(
            issued.len() > acked.len(),
            "round {round}: nothing was in flight at the kill"
        );

        daemon.restart().await;
        let client = daemon.client(&token).await;
        let history = full_history(&client, conv).await;
        let mut by_text: HashMap<&str, u64> = HashMap::new();
        for event in &history {
            if let Some(text) = text(event) {
                assert!(
                    by_text.insert(text, event.seq.0).is_none(),
                    "round {round}: {text:?} is stored twice after SIGKILL"
                );
            }
        }
        for (i, sent) in &acked {
            let text = &issued[*i].1;
            assert_eq!(
                by_text.get(text.as_str()),
                Some(&sent.seq.0),
                "round {round}: acknowledged message {i} (seq {}) is not at its seq after SIGKILL",
                sent.seq
            );
        }
        let issued_texts: HashSet<&str> = issued.iter().map(|(_, t)| t.as_str()).collect();
        for text in by_text.keys() {
            assert!(
                issued_texts.contains(text) || stored_texts.contains(*text),
                "round {round}: history holds {text:?}, which was never sent"
            );
        }

        // Retry everything unacknowledged with its id: stored ones come back as duplicates.
        let unacked: Vec<usize> = (0..issued.len())
            .filter(|i| !acked.contains_key(i))
            .collect();
        let retries: Vec<_> = unacked
            .iter()
            .map(|&i| client.send_with_id(conv, issued[i].0, issued[i].1.clone()))
            .collect();
        let results =
            within_for(BULK, "retrying the unacknowledged sends", join_all(retries)).await;
        for (&i, result) in unacked.iter().zip(results) {
            let sent = result.unwrap_or_else(|e| panic!("retrying message {i}: {e}"));
            match by_text.get(issued[i].1.as_str()) {
                Some(&seq) => {
                    assert!(
                        sent.duplicate,
                        "message {i} was stored before the kill but its retry is not a duplicate"
                    );
                    assert_eq!(
                        sent.seq.0, seq,
                        "the retry of message {i} names another seq"
                    );
                }
                None => assert!(
                    !sent.duplicate,
                    "message {i} was not stored, yet its retry is a duplicate"
                ),
            }
        }
        let history = full_history(&client, conv).await;
        let texts: Vec<String> = messages(&history).into_iter().map(|m| m.text).collect();
        let unique: HashSet<&String> = texts.iter().collect();
        assert_eq!(
            unique.len(),
            texts.len(),
            "round {round}: a message is stored twice after the retries"
        );
        stored_texts.extend(texts);
        for (_, text) in &issued {
            assert!(
                stored_texts.contains(text),
                "round {round}: {text:?} is missing after its retry"
            );
        }
    }
}

/// One SDK client lives through a SIGKILL and restart of the daemon: it reconnects by itself and
/// re-sends what was not acknowledged, so every send of a pipelined burst resolves once, at
/// seqs that follow the call order with no gap; a subscriber that also lives through it sees
/// every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_through_daemon_kill9() {
    const N: usize = 5000;
    const KILL_AFTER: usize = 200;
    // A client with nothing unacknowledged in QUIC terms notices the dead server at its next
    // packet, its keep-alive (every 10 s); the restarted daemon must then reset it at once,
    // instead of the client waiting for the 30 s idle timeout.
    const RECOVERY: std::time::Duration = std::time::Duration::from_secs(20);
    let mut daemon = DaemonProcess::start().await;
    let alice_token = daemon.add_user("alice").await;
    let bob_token = daemon.add_user("bob").await;
    let alice = daemon.client(&alice_token).await;
    let bob = daemon.client(&bob_token).await;
    let conv = within(
        "creating a conversation",
        alice.create_conversation("rides through", &[quip_tests::user("bob")]),
    )
    .await
    .expect("creating a conversation");
    let mut feed = within("bob subscribes", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes");

    let texts: Vec<String> = (0..N)
        .map(|i| format!("through the crash {i} · ✈️"))
        .collect();
    // All queued now, in this order.
    let sends: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| alice.send_with_id(conv, message_id(9, i), t.as_str()))
        .collect();
    let (progress, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
    let waiter = tokio::spawn(async move {
        let mut results = Vec::with_capacity(N);
        for send in sends {
            results.push(send.await);
            let _ = progress.send(());
        }
        results
    });
    for _ in 0..KILL_AFTER {
        within("acks before the kill", acks.recv())
            .await
            .expect("the waiter stopped before the kill");
    }
    daemon.kill9();
    daemon.restart().await;
    let restarted = std::time::Instant::now();

    let results = within_for(BULK, "every send resolving after the restart", waiter)
        .await
        .expect("the waiter panicked");
    let recovered = restarted.elapsed();
    let seqs: Vec<u64> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("send {i} failed across the restart: {e}"))
                .seq
                .0
        })
        .collect();
    assert_consecutive(
        "seqs of the burst, in call order, across the restart",
        seqs.iter().copied(),
        2,
    );
    assert!(alice.connections() >= 2, "alice's client did not reconnect");

    let checker = daemon.client(&alice_token).await;
    let history = full_history(&checker, conv).await;
    let expected: Vec<Msg> = seqs
        .iter()
        .zip(&texts)
        .map(|(seq, t)| Msg::new(*seq, "alice", t))
        .collect();
    assert_same_messages("history after the restart", &expected, &messages(&history));

    let events = collect_events(&mut feed, N + 1, BULK, "bob's feed across the restart").await;
    assert_same_events("bob's feed across the restart", &history, &events);

    assert!(
        recovered < RECOVERY,
        "the sends took {recovered:?} to resolve after the restart (limit {RECOVERY:?}): the \
         clients of the killed daemon were not reset by the restarted one (stateless reset) and \
         waited for the 30 s idle timeout"
    );
}

/// One SDK client lives through a graceful restart of the in-process daemon (GOING_AWAY): it
/// reconnects, re-sends what was not answered, and every send of a pipelined burst resolves
/// once at seqs that follow the call order; a subscriber resumes without gap or duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_through_graceful_restart() {
    const N: usize = 3000;
    const RESTART_AFTER: usize = 300;
    let server = quip_tests::TestServer::start().await;
    let (alice_token, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = within(
        "creating a conversation",
        alice.create_conversation("graceful", &[quip_tests::user("bob")]),
    )
    .await
    .expect("creating a conversation");
    let mut feed = within("bob subscribes", bob.subscribe(conv, StartAt::Beginning))
        .await
        .expect("bob subscribes");

    let texts: Vec<String> = (0..N)
        .map(|i| format!("across the restart {i} · ♻️"))
        .collect();
    let sends: Vec<_> = texts.iter().map(|t| alice.send(conv, t.as_str())).collect();
    let (progress, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
    let waiter = tokio::spawn(async move {
        let mut results = Vec::with_capacity(N);
        for send in sends {
            results.push(send.await);
            let _ = progress.send(());
        }
        results
    });
    for _ in 0..RESTART_AFTER {
        within("acks before the restart", acks.recv())
            .await
            .expect("the waiter stopped before the restart");
    }
    let server = server.restart().await;

    let results = within_for(BULK, "every send resolving after the restart", waiter)
        .await
        .expect("the waiter panicked");
    let seqs: Vec<u64> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("send {i} failed across the restart: {e}"))
                .seq
                .0
        })
        .collect();
    assert_consecutive(
        "seqs of the burst, in call order, across the restart",
        seqs.iter().copied(),
        2,
    );
    assert!(alice.connections() >= 2, "alice's client did not reconnect");

    let checker = server.client(&alice_token).await;
    let history = full_history(&checker, conv).await;
    let expected: Vec<Msg> = seqs
        .iter()
        .zip(&texts)
        .map(|(seq, t)| Msg::new(*seq, "alice", t))
        .collect();
    assert_same_messages("history after the restart", &expected, &messages(&history));
    let events = collect_events(&mut feed, N + 1, BULK, "bob's feed across the restart").await;
    assert_same_events("bob's feed across the restart", &history, &events);
}
