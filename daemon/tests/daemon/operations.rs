//! Operations, end to end against the real `quipd` binary: configuration, graceful shutdown and
//! restart under load, metrics, backup and restore, certificate reload, systemd notification
//! and the systemd unit.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use quip_client::{
    Client, ClientConfig, ClientError, ClientMessageId, ConversationId, ErrorCode, Event,
    EventBody, Position, Seq, StartAt,
};
use quipd::store::{Store, StoreConfig};

use crate::harness::process::{add_user, config_file, quipd, Quipd, QUIPD, WAIT};

/// An acknowledged send.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Acked {
    conv: ConversationId,
    seq: Seq,
    id: ClientMessageId,
    text: String,
}

/// Sends to `convs` in turn, up to 16 sends in flight, until `stop` is set or a send fails;
/// returns the acked sends and the errors of the ones that failed.
async fn load(
    client: Client,
    name: String,
    convs: Vec<ConversationId>,
    stop: Arc<AtomicBool>,
) -> (Vec<Acked>, Vec<ClientError>) {
    let mut in_flight = FuturesUnordered::new();
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    let started = Instant::now();
    let mut n = 0u64;
    loop {
        let sending = errors.is_empty()
            && !stop.load(Ordering::Relaxed)
            && started.elapsed() < Duration::from_secs(60);
        if sending && in_flight.len() < 16 {
            n += 1;
            let conv = convs[n as usize % convs.len()];
            let text = format!("{name} #{n}");
            let send = client.send(conv, text.clone());
            in_flight.push(async move { (conv, text, send.await) });
            continue;
        }
        let Some((conv, text, result)) = in_flight.next().await else {
            break;
        };
        match result {
            Ok(sent) => acked.push(Acked {
                conv,
                seq: sent.seq,
                id: sent.id,
                text,
            }),
            Err(e) => errors.push(e),
        }
    }
    (acked, errors)
}

/// Every event of a conversation, ascending, read page by page.
async fn full_history(client: &Client, conv: ConversationId) -> Vec<Event> {
    let mut events = Vec::new();
    let mut before = None;
    loop {
        let (page, _head) = client.history(conv, before, 1000).await.unwrap();
        let Some(first) = page.first() else { break };
        before = Some(first.seq);
        let done = first.seq == Seq(1);
        let mut page = page;
        page.extend(events);
        events = page;
        if done {
            break;
        }
    }
    events
}

/// Checks seqs are 1, 2, 3, ... and no message id is stored twice.
fn assert_gap_free_and_unique(conv: ConversationId, events: &[Event]) {
    let mut ids = HashSet::new();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, Seq(i as u64 + 1), "conversation {conv}: gap");
        if let EventBody::Message { id, .. } = &event.body {
            assert!(ids.insert(*id), "conversation {conv}: message {id:?} twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_and_a_restart_has_every_acked_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &data, "shutdown_timeout_ms = 10000");
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let names: Vec<String> = (0..4).map(|n| format!("user{n}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| add_user(&data, n)).collect();

    // One conversation everyone writes to, and one per user.
    let first = daemon.connect(&tokens[0]).await;
    let members: Vec<_> = names[1..].iter().map(|n| n.parse().unwrap()).collect();
    let shared = first
        .create_conversation("everyone", &members)
        .await
        .unwrap();
    let mut clients = vec![first];
    for token in &tokens[1..] {
        clients.push(daemon.connect(token).await);
    }
    let epoch = clients[0].epoch();
    // A reader follows the shared conversation through the restart; it publishes the last seq
    // it got, and checks every event is the next one.
    let reader_client = daemon.connect(&tokens[1]).await;
    let mut reader = reader_client
        .subscribe(shared, StartAt::Beginning)
        .await
        .unwrap();
    let last_read = Arc::new(AtomicU64::new(0));
    let reading = tokio::spawn({
        let last_read = last_read.clone();
        async move {
            let mut last = Seq::ZERO;
            while let Some(event) = reader.next().await {
                let event = event.expect("the subscription must survive the restart");
                assert_eq!(event.seq, last.next(), "delivery skipped or repeated a seq");
                last = event.seq;
                last_read.store(last.0, Ordering::SeqCst);
            }
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for (client, name) in clients.iter().zip(&names) {
        let own = client.create_conversation(name, &[]).await.unwrap();
        loads.push(tokio::spawn(load(
            client.clone(),
            name.clone(),
            vec![shared, own],
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let addr = daemon.addr;
    let (status, took) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "quipd exited with {status}");
    assert!(
        took < Duration::from_secs(10),
        "graceful shutdown took {took:?}, over the 10 s bound"
    );
    let read_before_restart = last_read.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);

    // Restart on the same address: the clients reconnect by themselves, re-send what was not
    // acknowledged (the daemon answers what it already stored with the original seq), and the
    // reader resumes from its cursor.
    let daemon = Quipd::start(&config, &data, &["--listen", &addr.to_string()], &[]);
    let mut acked = Vec::new();
    for load in loads {
        let (sent, errors) = tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
        assert!(
            errors.is_empty(),
            "no send may fail across a restart: {errors:?}"
        );
        acked.extend(sent);
    }
    assert!(
        acked.len() > 50,
        "only {} sends acked under load",
        acked.len()
    );
    for client in &clients {
        assert!(
            client.connections() >= 2,
            "every client reconnected by itself"
        );
    }
    println!(
        "acked {} sends across the restart; shutdown took {took:?}; the reader had seq {read_before_restart} at SIGTERM",
        acked.len()
    );

    let client = daemon.connect(&tokens[0]).await;
    assert_eq!(client.epoch(), epoch, "a restart keeps the store's epoch");
    let mut by_conv: BTreeMap<ConversationId, Vec<Event>> = BTreeMap::new();
    for sent in &acked {
        if let std::collections::btree_map::Entry::Vacant(slot) = by_conv.entry(sent.conv) {
            let owner = if sent.conv == shared {
                &tokens[0]
            } else {
                &tokens[names
                    .iter()
                    .position(|n| sent.text.starts_with(&format!("{n} ")))
                    .unwrap()]
            };
            let reader = daemon.connect(owner).await;
            let events = full_history(&reader, sent.conv).await;
            assert_gap_free_and_unique(sent.conv, &events);
            slot.insert(events);
        }
        let events = &by_conv[&sent.conv];
        let stored = &events[sent.seq.0 as usize - 1];
        match &stored.body {
            EventBody::Message { id, text } => {
                assert_eq!(
                    (id, text),
                    (&sent.id, &sent.text),
                    "acked send at {}",
                    sent.seq
                )
            }
            other => panic!("acked send at seq {} holds {other:?}", sent.seq),
        }
    }

    // The connected reader got everything, in order, across the restart.
    let head = by_conv[&shared].len() as u64;
    let deadline = Instant::now() + WAIT;
    while last_read.load(Ordering::SeqCst) < head {
        assert!(
            Instant::now() < deadline,
            "the reader did not resume to the head {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(last_read.load(Ordering::SeqCst), head);
    assert!(
        reader_client.connections() >= 2,
        "the reader reconnected by itself"
    );

    // A fresh client resuming from the middle gets exactly the rest, then live messages.
    let middle = Seq(head / 2);
    let resumed_client = daemon.connect(&tokens[2]).await;
    let mut resumed = resumed_client
        .subscribe(shared, StartAt::After(Position { epoch, seq: middle }))
        .await
        .unwrap();
    let mut expected = middle;
    while expected < Seq(head) {
        let event = tokio::time::timeout(WAIT, resumed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(event.seq, expected.next(), "resume must not gap or repeat");
        expected = event.seq;
    }
    let sent = client.send(shared, "after the restart").await.unwrap();
    assert_eq!(sent.seq, Seq(head).next());
    let live = tokio::time::timeout(WAIT, resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(live.seq, sent.seq);
    reading.abort();
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

/// Reads `GET /metrics` into `name{labels}` → value.
async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let config = config_file(
        dir.path(),
        &data,
        &format!(
            "[metrics]\nlisten = \"{metrics_addr}\"\n\
             [push]\ncommand = [\"true\"]\nbatch_window_ms = 100\n"
        ),
    );
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let before = scrape(metrics_addr).await;
    for name in [
        "quipd_connections",
        "quipd_sessions",
        "quipd_deliveries",
        "quipd_conversations_active",
        "quipd_messages_appended_total",
        "quipd_delivery_lagged_total",
        "quipd_replays_total",
        "quipd_datagrams_relayed_total",
        "quipd_datagrams_dropped_total",
        "quipd_errors_total{code=\"NOT_FOUND\",scope=\"request\"}",
        "quipd_push_messages_queued_total",
        "quipd_push_calls_total",
        "quipd_push_batches_delivered_total",
    ] {
        assert_eq!(before.get(name), Some(&0.0), "{name} before any traffic");
    }

    let alice = add_user(&data, "alice");
    let bob = add_user(&data, "bob");
    let alice = daemon.connect(&alice).await;
    let conv = alice
        .create_conversation("metrics", &["bob".parse().unwrap()])
        .await
        .unwrap();
    let sends: Vec<_> = (0..25).map(|n| alice.send(conv, format!("m{n}"))).collect();
    let mut acked = 0;
    for send in sends {
        send.await.unwrap();
        acked += 1;
    }
    let missing = alice.send(ConversationId(999), "nobody").await.unwrap_err();
    assert_eq!(missing.code(), Some(ErrorCode::NOT_FOUND));
    // Bob is offline: the push hook (a command that accepts everything) is called for him.
    let pushed = tokio::time::timeout(WAIT, async {
        loop {
            let now = scrape(metrics_addr).await;
            if now.get("quipd_push_batches_delivered_total") >= Some(&1.0) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the push hook was never called for bob");
    assert_eq!(
        pushed["quipd_push_messages_queued_total"],
        f64::from(acked),
        "every message is handed to the hook"
    );
    assert!(pushed["quipd_push_calls_total"] >= 1.0);
    for name in [
        "quipd_push_call_failures_total",
        "quipd_push_batches_given_up_total",
        "quipd_push_messages_dropped_total",
        "quipd_push_skipped_online_total",
    ] {
        assert_eq!(pushed[name], 0.0, "{name}");
    }
    // Bob replays the conversation from the store.
    let bob = daemon.connect(&bob).await;
    let mut events = bob.subscribe(conv, StartAt::Beginning).await.unwrap();
    for seq in 1..=26 {
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(event.seq, Seq(seq));
    }

    let after = scrape(metrics_addr).await;
    let get = |name: &str| {
        *after
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from {after:#?}"))
    };
    assert_eq!(get("quipd_messages_appended_total"), f64::from(acked));
    assert_eq!(get("quipd_send_ack_seconds_count"), f64::from(acked));
    assert_eq!(get("quipd_connections"), 2.0);
    assert_eq!(get("quipd_sessions"), 2.0);
    assert_eq!(get("quipd_conversations_active"), 1.0);
    assert_eq!(get("quipd_connections_accepted_total"), 2.0);
    assert_eq!(
        get("quipd_errors_total{code=\"NOT_FOUND\",scope=\"request\"}"),
        1.0
    );
    assert_eq!(get("quipd_replays_total"), 1.0);
    assert_eq!(get("quipd_replayed_events_total"), 26.0);
    assert_eq!(get("quipd_datagrams_relayed_total"), 0.0);
    assert_eq!(get("quipd_datagrams_dropped_total"), 0.0);
    assert_eq!(get("quipd_delivery_lagged_total"), 0.0);
    let flushes = get("quipd_store_flushes_total");
    assert!(flushes >= 1.0);
    assert_eq!(get("quipd_store_flush_commits_count"), flushes);
    // Two users added and one conversation created, then the sends: a sequencer folds the
    // sends queued together into one commit, and the writer folds commits into one flush.
    let commits = get("quipd_store_flush_commits_sum");
    assert!((4.0..=28.0).contains(&commits), "{commits} commits");
    assert!(get("quipd_store_flush_seconds_sum") > 0.0);
    assert_eq!(get("quipd_store_flush_seconds_count"), flushes);
    assert_eq!(get("quipd_send_ack_seconds_bucket{le=\"+Inf\"}"), 25.0);
    println!(
        "25 sends took {flushes} group commits; ack latency sum {:.4} s",
        get("quipd_send_ack_seconds_sum")
    );

    drop(events);
    drop(alice);
    drop(bob);
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

#[test]
fn a_bad_config_file_is_rejected_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("lissten = \"127.0.0.1:4433\"\n", "lissten"),
        (
            "[limits]\nidle_timeout_ms = \"soon\"\n",
            "limits.idle_timeout_ms",
        ),
        ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[tls]\ncert = \"/etc/quipd/cert.pem\"\n", "tls.key"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = quipd(&["check-config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted");
        assert!(
            stderr.contains(&format!("`{key}`")),
            "{text:?}: the error must name {key}: {stderr}"
        );
        // `serve` refuses it the same way, before touching the data directory.
        let data = dir.path().join("data");
        let out = quipd(&[
            "serve",
            "--config",
            path.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("`{key}`")));
        assert!(!data.exists());
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/quipd.toml");
    let out = quipd(&["check-config", example.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("listen = [::]:4433"), "{stdout}");
    assert!(stdout.contains("shutdown_timeout_ms = 10000"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_line_flags_override_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file_data = dir.path().join("from-file");
    let flag_data = dir.path().join("from-flag");
    let path = dir.path().join("quipd.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:9\"\n[log]\nformat = \"text\"\n",
            file_data.display().to_string()
        ),
    )
    .unwrap();
    // JSON logs (the harness reads them), the flag's data directory and an OS-chosen port.
    let daemon = Quipd::start(
        &path,
        &flag_data,
        &[
            "--data",
            flag_data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--log-json",
        ],
        &[],
    );
    assert_ne!(daemon.addr.port(), 9);
    assert!(flag_data.join("store").is_dir());
    assert!(!file_data.exists());
    let token = add_user(&flag_data, "alice");
    let client = daemon.connect(&token).await;
    client.create_conversation("flags", &[]).await.unwrap();
    drop(client);
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

/// Opens a stopped daemon's store, whichever engine made it.
fn open_store(path: &Path) -> Store {
    Store::open(&StoreConfig::existing(path.join("store"), 8 * 1024 * 1024).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_to_gap_free_prefixes_with_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &data, "");
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let names: Vec<String> = (0..3).map(|n| format!("user{n}")).collect();
    let tokens: Vec<String> = names.iter().map(|n| add_user(&data, n)).collect();
    let first = daemon.connect(&tokens[0]).await;
    let members: Vec<_> = names[1..].iter().map(|n| n.parse().unwrap()).collect();
    let shared = first
        .create_conversation("everyone", &members)
        .await
        .unwrap();
    let original_epoch = first.epoch();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    let mut clients = vec![first];
    for token in &tokens[1..] {
        clients.push(daemon.connect(token).await);
    }
    for (client, name) in clients.iter().zip(&names) {
        let own = client.create_conversation(name, &[]).await.unwrap();
        loads.push(tokio::spawn(load(
            client.clone(),
            name.clone(),
            vec![shared, own],
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    let backup = dir.path().join("quip.backup");
    let out = {
        let args = [
            "backup".to_owned(),
            "--out".into(),
            backup.display().to_string(),
            "--data".into(),
            data.display().to_string(),
        ];
        tokio::task::spawn_blocking(move || {
            quipd(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    assert!(
        out.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    // The load goes on after the backup, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for load in loads {
        let (sent, errors) = load.await.unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        acked += sent.len();
    }
    drop(clients);
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());

    // The copy moves to the other engine: a backup of a sled store restored into fjall, which
    // the restored daemon then serves (`store = "fjall"`).
    let restored = dir.path().join("restored");
    let out = quipd(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
        "--store",
        "fjall",
    ]);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = quipd(&[
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--data",
        restored.to_str().unwrap(),
    ]);
    assert!(
        !again.status.success(),
        "restore must refuse a used directory"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    // The restored store serves: old tokens work, old cursors are reset.
    let config = config_file(dir.path(), &restored, "store = \"fjall\"");
    let daemon = Quipd::start(&config, &restored, &[], &[]);
    // The restored directory has no certificates: the daemon made new ones.
    let client = daemon.connect(&tokens[1]).await;
    let restored_epoch = client.epoch();
    assert_ne!(restored_epoch, original_epoch, "a restore gets a new epoch");
    let reset = client
        .subscribe(
            shared,
            StartAt::After(Position {
                epoch: original_epoch,
                seq: Seq(1),
            }),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(reset, ClientError::CursorReset { .. }),
        "{reset:?}"
    );
    drop(client);
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
    // With no daemon running, backup opens the store itself.
    let full = dir.path().join("offline.backup");
    let offline = quipd(&[
        "backup",
        "--out",
        full.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        offline.status.success(),
        "offline backup: {}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let offline = String::from_utf8_lossy(&offline.stdout).into_owned();

    // Offline now, both stores compare record by record.
    let mut original_total = 0;
    let backed_up = {
        let original = open_store(&data);
        let copy = open_store(&restored);
        assert_eq!(copy.epoch(), restored_epoch);
        assert_eq!(original.epoch(), original_epoch);
        assert_eq!(copy.users().unwrap(), original.users().unwrap());
        let mut backed_up = 0;
        let convs = original.conversations().unwrap();
        assert_eq!(copy.conversations().unwrap(), convs);
        for conv in convs {
            let head = copy.head(conv).unwrap();
            let restored_events = copy.events_after(conv, Seq::ZERO, usize::MAX).unwrap();
            let original_events = original.events_after(conv, Seq::ZERO, usize::MAX).unwrap();
            assert_eq!(restored_events.len() as u64, head.0);
            assert_eq!(
                restored_events[..],
                original_events[..head.0 as usize],
                "conversation {conv} is not a prefix of the original"
            );
            backed_up += restored_events.len();
            original_total += original_events.len();
        }
        backed_up
    };
    println!("{acked} sends acked; the backup holds {backed_up} of {original_total} events");
    assert!(
        offline.contains(&format!(", {original_total} events,")),
        "the offline backup holds everything: {offline}"
    );
    assert!(backed_up > 10, "the backup was taken under load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (old, new, live) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("live"),
    );
    for pki in [&old, &new] {
        let out = quipd(&[
            "certs",
            "init",
            "--hostname",
            "localhost",
            "--san",
            "127.0.0.1",
            "--dir",
            pki.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::create_dir(&live).unwrap();
    let install = |from: &Path| {
        for file in ["server.pem", "server.key"] {
            std::fs::copy(from.join(file), live.join(file)).unwrap();
        }
    };
    install(&old);
    let config = config_file(
        dir.path(),
        &data,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n",
            live.join("server.pem").display().to_string(),
            live.join("server.key").display().to_string()
        ),
    );
    let daemon = Quipd::start(&config, &data, &[], &[]);
    assert!(
        !data.join("certs").exists(),
        "with certificate files configured, no development PKI is made"
    );
    let token = add_user(&data, "alice");
    let trusting = |ca: &Path| {
        ClientConfig::from_ca_file(daemon.addr.to_string(), ca.join("ca.pem"), &token).unwrap()
    };
    let before = Client::connect(trusting(&old)).await.unwrap();
    let conv = before.create_conversation("reload", &[]).await.unwrap();
    assert!(Client::connect(trusting(&new)).await.is_err());

    install(&new);
    daemon.signal("HUP");
    daemon.wait_for_log("reloaded the server certificate");
    let after = Client::connect(trusting(&new)).await.unwrap();
    assert!(
        Client::connect(trusting(&old)).await.is_err(),
        "new connections get the new certificate"
    );
    // The connection made before the reload carries on.
    assert_eq!(before.send(conv, "still here").await.unwrap().seq, Seq(2));
    drop(after);

    // A broken file is refused and the daemon keeps the certificate it has.
    std::fs::write(live.join("server.pem"), "not a certificate").unwrap();
    daemon.signal("HUP");
    daemon.wait_for_log("certificate reload failed");
    Client::connect(trusting(&new)).await.unwrap();
    drop(before);
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let config = config_file(dir.path(), &data, "");
    let daemon = Quipd::start(
        &config,
        &data,
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let mut received = Vec::new();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.contains("READY=1"), "{ready}");
    // Ready means ready: the store is open and the port answers.
    let token = add_user(&data, "alice");
    daemon.connect(&token).await;
    while !received.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        received.push(next());
    }
    let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success());
    loop {
        let message = next();
        if message.contains("STOPPING=1") {
            break;
        }
        assert!(message.contains("WATCHDOG=1"), "{message}");
    }
}

/// `systemd-analyze verify` accepts the unit and `systemd-analyze security` rates it at most
/// 2.0 ("OK"). On a developer machine without systemd-analyze it says so and checks nothing;
/// CI (`.ci/run`) installs systemd and sets `QUIP_REQUIRE_SYSTEMD_ANALYZE`, so there a missing
/// tool fails the test instead of passing it unchecked.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(
            std::env::var_os("QUIP_REQUIRE_SYSTEMD_ANALYZE").is_none(),
            "systemd-analyze is required (QUIP_REQUIRE_SYSTEMD_ANALYZE is set) but not installed"
        );
        println!("NOTICE: systemd-analyze is not installed; the unit is not checked here");
        return;
    };
    println!(
        "{}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );
    let unit_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    let unit = std::fs::read_to_string(unit_dir.join("quipd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/quipd serve --config /etc/quipd/quipd.toml"));
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quipd.service");
    std::fs::write(&path, unit.replace("/usr/bin/quipd", QUIPD)).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout);
    let overall = report
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level: {report}{}",
                String::from_utf8_lossy(&security.stderr)
            )
        });
    println!("{}", overall.trim());
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{report}");
    assert!(security.status.success(), "{report}");

    // The sysusers file makes the unit's user, without a login shell, in a scratch root.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let sysusers = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(unit_dir.join("quipd.sysusers"))
        .output();
    match sysusers {
        Err(_) => println!("NOTICE: systemd-sysusers is not installed; skipping its check"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
            let entry = passwd.lines().find(|l| l.starts_with("quipd:")).unwrap();
            assert!(
                entry.ends_with(":/var/lib/quipd:/usr/sbin/nologin"),
                "{entry}"
            );
        }
    }
}

/// A client may allow the server no new stream (QUIC stream credit); its subscriptions then
/// wait. Unsubscribing ends such a waiting delivery: churning subscriptions without ever
/// allowing a stream leaves nothing behind (`quipd_deliveries` is the live count).
#[tokio::test]
async fn unsubscribing_ends_a_delivery_still_waiting_for_a_stream() {
    use quip_protocol::limits::MAX_FRAME_LEN;
    use quip_protocol::{
        encode_frame, ClientFrame, FrameDecoder, Request, RequestId, ServerFrame, REVISION,
    };

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let config = config_file(
        dir.path(),
        &data,
        &format!("[metrics]\nlisten = \"{metrics_addr}\"\n"),
    );
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let token = add_user(&data, "alice");
    let alice = daemon.connect(&token).await;
    let conv = alice.create_conversation("churn", &[]).await.unwrap();

    // A raw connection that allows the server no unidirectional stream.
    let ca = data.join("certs/ca.pem");
    let conn = crate::harness::quic::connect_narrow(daemon.addr, &ca, 1 << 20, 1 << 22, 0).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    const PAIRS: u64 = 500;
    let frame = |frame: &ClientFrame| encode_frame(frame, MAX_FRAME_LEN).unwrap();
    let mut bytes = frame(&ClientFrame::Hello {
        token,
        client: "allows no stream".into(),
        revision: REVISION,
    });
    for n in 0..PAIRS {
        for (id, request) in [
            (
                2 * n + 1,
                Request::Subscribe {
                    conv,
                    start: StartAt::Beginning,
                },
            ),
            (2 * n + 2, Request::Unsubscribe { conv }),
        ] {
            bytes.extend(frame(&ClientFrame::Request {
                id: RequestId(id),
                request,
            }));
        }
    }
    send.write_all(&bytes).await.unwrap();

    // Every request is answered, then the subscriptions are all gone.
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut answered = 0;
    while answered < 2 * PAIRS {
        let chunk = tokio::time::timeout(WAIT, recv.read_chunk(64 * 1024, true))
            .await
            .expect("answers")
            .unwrap()
            .expect("the control stream stays open");
        decoder.push(&chunk.bytes);
        while let Some(frame) = decoder.next_frame::<ServerFrame>().unwrap() {
            match frame {
                ServerFrame::Reply { .. } => answered += 1,
                ServerFrame::Error { error, .. } => panic!("refused: {error:?}"),
                _ => {}
            }
        }
    }
    let deadline = Instant::now() + WAIT;
    let mut running = f64::NAN;
    while Instant::now() < deadline {
        running = scrape(metrics_addr).await["quipd_deliveries"];
        if running == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running, 0.0, "deliveries left after {PAIRS} unsubscribes");

    // Its own subscription (the SDK's) is counted while it runs.
    let _feed = alice.subscribe(conv, StartAt::Beginning).await.unwrap();
    assert_eq!(scrape(metrics_addr).await["quipd_deliveries"], 1.0);
    conn.close(0u32.into(), b"");
}

/// A client that reads nothing keeps its session from finishing, so the drain of a SIGTERM
/// uses up `shutdown_timeout_ms`; the final store flush has a bound of its own and still runs,
/// and the exit status says it did.
#[tokio::test]
async fn a_stuck_client_does_not_cost_the_store_its_final_flush() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &data, "shutdown_timeout_ms = 1000");
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let token = add_user(&data, "alice");
    let alice = daemon.connect(&token).await;
    let conv = crate::harness::large_conversation(&alice, 40, 60_000).await;

    let ca = data.join("certs/ca.pem");
    let _stuck = crate::harness::quic::stuck_reader(daemon.addr, &ca, &token, conv, 64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    drop(alice);
    let Quipd { child, logs, .. } = daemon;
    let (status, _) = child.terminate();
    let logs: Vec<String> = logs.iter().collect();
    let logged = |text: &str| logs.iter().any(|line| line.contains(text));
    assert!(
        logged("shutdown timeout: closing the remaining connections"),
        "the stuck session did not hold up the drain: {logs:#?}"
    );
    assert!(logged("store flushed; stopped"), "{logs:#?}");
    assert!(status.success(), "{status}");
}
