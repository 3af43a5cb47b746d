//! The torture test: the real daemon, SIGKILLed and restarted again and again, while several
//! clients send into shared conversations over lossy, reordering paths that are cut at random.
//!
//! At the end every acknowledged message is stored exactly once, seqs are gap-free, every
//! member received exactly the stored sequence, and each sender's messages are in send order.
//!
//! CI runs a small seeded configuration. A larger one is run by setting, for example,
//! `QUIP_TORTURE_CLIENTS=6 QUIP_TORTURE_MESSAGES=2000 QUIP_TORTURE_KILLS=10 QUIP_TORTURE_SEED=7`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use quip_client::{
    Client, ClientConfig, ClientMessageId, ConversationId, Event, EventBody, Seq, StartAt, UserName,
};
use quip_tests::relay::{Faults, Relay};
use quip_tests::{within_for, DaemonProcess, BULK};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sends each client keeps in flight.
const WINDOW: usize = 8;

struct Params {
    clients: usize,
    messages: usize,
    kills: usize,
    seed: u64,
}

impl Params {
    fn from_env() -> Params {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Params {
            clients: var("QUIP_TORTURE_CLIENTS", 3) as usize,
            messages: var("QUIP_TORTURE_MESSAGES", 120) as usize,
            kills: var("QUIP_TORTURE_KILLS", 3) as usize,
            seed: var("QUIP_TORTURE_SEED", 20261203),
        }
    }
}

/// A send the sender saw acknowledged.
#[derive(Debug, Clone)]
struct Acked {
    conv: ConversationId,
    seq: Seq,
    id: ClientMessageId,
    text: String,
    /// Its place in the sender's send order.
    order: usize,
}

type Received = Arc<Mutex<HashMap<ConversationId, Vec<Event>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn client_through(relay: &Relay, daemon: &DaemonProcess, token: &str) -> Client {
    let mut config = ClientConfig::from_ca_file(relay.addr().to_string(), daemon.ca_path(), token)
        .expect("reading the CA");
    // Notice dead paths fast, and come back fast once the daemon is up again.
    config.idle_timeout = Duration::from_secs(3);
    config.reconnect_max = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(20);
    within_for(
        BULK,
        "connecting through the relay",
        Client::connect(config),
    )
    .await
    .expect("connecting through the relay")
}

/// Sends `count` messages, alternating between `convs`, keeping `WINDOW` in flight; counts
/// each ack in `progress`.
async fn send_all(
    client: Client,
    who: usize,
    convs: Vec<ConversationId>,
    count: usize,
    progress: Arc<AtomicUsize>,
) -> Vec<Acked> {
    let mut in_flight = FuturesOrdered::new();
    let mut acked = Vec::with_capacity(count);
    for order in 0..count {
        if in_flight.len() >= WINDOW {
            acked.push(in_flight.next().await.expect("a send in flight"));
            progress.fetch_add(1, Ordering::Relaxed);
        }
        let conv = convs[order % convs.len()];
        let text = format!("user{who} #{order}");
        let id = ClientMessageId(rand::random());
        let sent = client.send_with_id(conv, id, text.clone());
        in_flight.push_back(async move {
            let sent = sent
                .await
                .unwrap_or_else(|e| panic!("user{who} #{order} failed: {e}"));
            Acked {
                conv,
                seq: sent.seq,
                id,
                text,
                order,
            }
        });
    }
    while let Some(done) = in_flight.next().await {
        acked.push(done);
        progress.fetch_add(1, Ordering::Relaxed);
    }
    acked
}

/// Collects what a client's subscriptions deliver.
async fn follow(client: Client, conv: ConversationId, received: Received) {
    let mut subscription = client
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribing");
    while let Some(event) = subscription.next().await {
        let event = event.unwrap_or_else(|e| panic!("delivery of {conv} failed: {e}"));
        lock(&received).entry(conv).or_default().push(event);
    }
}

/// Every event of a conversation, ascending.
async fn full_history(client: &Client, conv: ConversationId) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    let mut before = None;
    loop {
        let (page, _) = client.history(conv, before, 1000).await.expect("history");
        let Some(first) = page.first() else { break };
        before = Some(first.seq);
        let done = first.seq == Seq(1);
        events.splice(0..0, page);
        if done {
            break;
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_kill9_lossy_paths_and_cuts_lose_and_duplicate_nothing() {
    let params = Params::from_env();
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut daemon = DaemonProcess::start().await;
    let mut tokens = Vec::new();
    for i in 0..params.clients {
        tokens.push(daemon.add_user(&format!("user{i}")).await);
    }
    let mut relays = Vec::new();
    for i in 0..params.clients {
        relays.push(Relay::start(daemon.addr(), Faults::lossy(), params.seed + i as u64).await);
    }
    let mut clients = Vec::new();
    for (relay, token) in relays.iter().zip(&tokens) {
        clients.push(client_through(relay, &daemon, token).await);
    }
    let members: Vec<UserName> = (1..params.clients)
        .map(|i| format!("user{i}").parse().expect("valid name"))
        .collect();
    let mut convs = Vec::new();
    for title in ["one", "two"] {
        convs.push(
            clients[0]
                .create_conversation(title, &members)
                .await
                .expect("creating a conversation"),
        );
    }

    let received: Vec<Received> = (0..params.clients).map(|_| Received::default()).collect();
    let mut followers = Vec::new();
    for (client, received) in clients.iter().zip(&received) {
        for conv in &convs {
            followers.push(tokio::spawn(follow(
                client.clone(),
                *conv,
                received.clone(),
            )));
        }
    }
    let progress = Arc::new(AtomicUsize::new(0));
    let senders: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(who, client)| {
            tokio::spawn(send_all(
                client.clone(),
                who,
                convs.clone(),
                params.messages,
                progress.clone(),
            ))
        })
        .collect();

    // Chaos while they send: kill -9 and restart at evenly spread points of the run, and cut
    // paths for a while around each kill.
    let total = params.clients * params.messages;
    let mut cuts = 0;
    for kill in 1..=params.kills {
        let at = total * kill / (params.kills + 1);
        within_for(BULK, format!("{at} acks before kill {kill}"), async {
            while progress.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        for relay in &relays {
            if rng.random_bool(0.5) {
                relay.cut(Duration::from_millis(rng.random_range(200..1500)));
                cuts += 1;
            }
        }
        daemon.kill9();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
        daemon.restart().await;
    }

    let mut acked_by: Vec<Vec<Acked>> = Vec::new();
    for sender in senders {
        let acked = within_for(BULK * 2, "the senders to finish", sender)
            .await
            .expect("a sender task");
        acked_by.push(acked);
    }

    // The truth: the store's history, read directly (no relay).
    let reader = daemon.client(&tokens[0]).await;
    let mut stored: BTreeMap<ConversationId, Vec<Event>> = BTreeMap::new();
    for conv in &convs {
        stored.insert(*conv, full_history(&reader, *conv).await);
    }
    let mut lost = 0;
    let mut duplicated = 0;
    for (conv, events) in &stored {
        for (i, event) in events.iter().enumerate() {
            assert_eq!(
                event.seq,
                Seq(i as u64 + 1),
                "conversation {conv}: seqs have a gap"
            );
        }
        let mut ids = HashSet::new();
        for event in events {
            if let EventBody::Message { id, .. } = &event.body {
                if !ids.insert((event.sender.clone(), *id)) {
                    duplicated += 1;
                }
            }
        }
    }
    for (who, acked) in acked_by.iter().enumerate() {
        for sent in acked {
            let event = stored[&sent.conv].get(sent.seq.0 as usize - 1);
            match event.map(|e| (&e.sender, &e.body)) {
                Some((sender, EventBody::Message { id, text }))
                    if sender.as_str() == format!("user{who}")
                        && *id == sent.id
                        && *text == sent.text => {}
                other => {
                    lost += 1;
                    eprintln!("acked {sent:?} is not stored at its seq: {other:?}");
                }
            }
        }
        // Each sender's messages, per conversation, in send order.
        for conv in &convs {
            let mut mine: Vec<&Acked> = acked.iter().filter(|a| a.conv == *conv).collect();
            mine.sort_by_key(|a| a.seq);
            let orders: Vec<usize> = mine.iter().map(|a| a.order).collect();
            let mut sorted = orders.clone();
            sorted.sort_unstable();
            assert_eq!(
                orders, sorted,
                "user{who}'s messages in {conv} are out of send order"
            );
        }
    }

    // Every member received exactly the stored sequence.
    for (who, received) in received.iter().enumerate() {
        for (conv, events) in &stored {
            let head = events.len();
            within_for(BULK, format!("user{who} to receive all of {conv}"), async {
                while lock(received).get(conv).map_or(0, Vec::len) < head {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            let got = lock(received).get(conv).cloned().unwrap_or_default();
            assert_eq!(got.len(), head, "user{who} got more than stored in {conv}");
            for (got, want) in got.iter().zip(events) {
                assert_eq!(
                    got, want,
                    "user{who} received something else than stored in {conv}"
                );
            }
        }
    }
    for follower in &followers {
        follower.abort();
    }
    let acked_total: usize = acked_by.iter().map(Vec::len).sum();
    let stats = relays.iter().fold((0, 0), |(d, f), r| {
        (
            d + r.stats().dropped.load(Ordering::Relaxed),
            f + r.stats().forwarded.load(Ordering::Relaxed),
        )
    });
    println!(
        "torture: seed {}, {} clients x {} messages, {} kills, {} cuts, relays dropped {} of {} packets; \
         acked {acked_total}, lost {lost}, duplicated {duplicated}; reconnects {:?}",
        params.seed,
        params.clients,
        params.messages,
        params.kills,
        cuts,
        stats.0,
        stats.0 + stats.1,
        clients.iter().map(|c| c.connections() - 1).collect::<Vec<_>>(),
    );
    assert_eq!(lost, 0, "acknowledged messages were lost");
    assert_eq!(duplicated, 0, "messages were stored twice");
    assert_eq!(acked_total, total);
}
