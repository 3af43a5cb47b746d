//! The store's conformance suite: every test runs against each engine (`on_sled::*` and
//! `on_fjall::*`), through the public `Store` interface, so both behave the same.

use super::*;

/// Runs each named `async fn(BackendKind)` once per engine.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod on_sled {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::BackendKind::Sled).await
                }
            )*
        }
        mod on_fjall {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::BackendKind::Fjall).await
                }
            )*
        }
    };
}

on_every_backend!(
    committed_events_survive_reopen_with_the_same_epoch,
    a_second_process_is_refused_with_a_clear_error,
    concurrent_commits_are_grouped_into_fewer_flushes,
    memberships_and_message_ids_are_found_again,
    a_commit_resolves_only_after_an_fdatasync,
    a_snapshot_under_writes_restores_to_a_prefix_with_a_new_epoch,
    a_damaged_backup_is_refused_before_anything_is_written,
    pages_stop_at_conversation_bounds_in_both_directions,
    a_store_is_refused_by_the_other_engine,
    empty_commits_and_syncs_resolve,
    erased_and_pruned_texts_leave_the_disk_and_backups,
    commits_the_engine_lost_are_replayed_from_the_log,
    checkpoints_made_in_the_background_complete_while_commits_go_on,
    a_torn_tail_left_by_an_older_version_is_cut_at_its_first_gap,
    a_backup_of_a_conversation_with_a_gap_is_refused,
);

fn user(name: &str) -> UserName {
    name.parse().unwrap()
}

fn config(dir: &Path, kind: BackendKind) -> StoreConfig {
    StoreConfig {
        path: dir.to_owned(),
        cache_bytes: 8 * 1024 * 1024,
        backend: kind,
    }
}

fn open(dir: &Path, kind: BackendKind) -> Store {
    Store::open(&config(dir, kind)).unwrap()
}

fn message(n: u64) -> StoredEvent {
    StoredEvent {
        sender: user("alice"),
        at_ms: n,
        body: EventBody::Message {
            id: ClientMessageId([n as u8; 16]),
            text: format!("message {n}"),
        },
    }
}

async fn committed_events_survive_reopen_with_the_same_epoch(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConversationId(1);
    let epoch = {
        let store = open(dir.path(), kind);
        let mut batch = WriteBatch::new();
        for n in 1..=300 {
            batch.append_event(conv, Seq(n), &message(n));
        }
        store.commit(batch).await.unwrap();
        store.epoch()
    };
    // The writer thread releases sled's lock once every handle is gone.
    let store = loop {
        match Store::open(&config(dir.path(), kind)) {
            Ok(store) => break store,
            Err(StoreError::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(store.epoch(), epoch);
    assert_eq!(store.head(conv).unwrap(), Seq(300));
    let page = store.events_after(conv, Seq(255), 10).unwrap();
    let seqs: Vec<u64> = page.iter().map(|e| e.seq.0).collect();
    assert_eq!(seqs, (256..=265).collect::<Vec<_>>());
    let page = store.events_before(conv, Seq(3), 10).unwrap();
    assert_eq!(page.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(store.head(ConversationId(2)).unwrap(), Seq::ZERO);
}

async fn a_second_process_is_refused_with_a_clear_error(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path(), kind);
    let err = Store::open(&config(dir.path(), kind)).unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
}

async fn concurrent_commits_are_grouped_into_fewer_flushes(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), kind);
    let commits: Vec<_> = (1..=200u64)
        .map(|n| {
            let mut batch = WriteBatch::new();
            batch.append_event(ConversationId(n), Seq(1), &message(n));
            store.commit(batch)
        })
        .collect();
    for commit in commits {
        commit.await.unwrap();
    }
    let stats = store.writer_stats();
    let flushes = stats.flushes.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stats.commits.load(std::sync::atomic::Ordering::Relaxed),
        200
    );
    assert!(
        flushes < 200,
        "200 concurrent commits took {flushes} flushes"
    );
}

async fn memberships_and_message_ids_are_found_again(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), kind);
    let conv = ConversationId(7);
    let mut batch = WriteBatch::new();
    batch.add_membership(&user("al"), conv);
    batch.add_membership(&user("alice"), ConversationId(9));
    batch.remember_message_id(conv, ClientMessageId([1; 16]), &user("al"), Seq(4));
    store.commit(batch).await.unwrap();
    assert_eq!(store.user_conversations(&user("al")).unwrap(), vec![conv]);
    assert_eq!(
        store
            .message_seq(conv, ClientMessageId([1; 16]), &user("al"))
            .unwrap(),
        Some(Seq(4))
    );
    assert_eq!(
        store
            .message_seq(conv, ClientMessageId([1; 16]), &user("alice"))
            .unwrap(),
        None
    );
    let mut batch = WriteBatch::new();
    batch.remove_membership(&user("al"), conv);
    store.commit(batch).await.unwrap();
    assert!(store.user_conversations(&user("al")).unwrap().is_empty());
}

async fn a_commit_resolves_only_after_an_fdatasync(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), kind);
    let syncs = || {
        store
            .writer_stats()
            .fdatasyncs
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    for n in 1..=3 {
        let before = syncs();
        let mut batch = WriteBatch::new();
        batch.append_event(ConversationId(1), Seq(n), &message(n));
        store.commit(batch).await.unwrap();
        assert!(syncs() > before, "commit {n} resolved without an fdatasync");
    }
}

fn message_id(n: u64) -> ClientMessageId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    ClientMessageId(id)
}

async fn a_snapshot_under_writes_restores_to_a_prefix_with_a_new_epoch(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"), kind);
    let convs = [ConversationId(1), ConversationId(2), ConversationId(3)];
    let record = ConversationRecord {
        title: "t".into(),
        creator: user("alice"),
        members: [user("alice")].into(),
        created_at_ms: 0,
    };
    let mut batch = WriteBatch::new();
    for conv in convs {
        batch.put_conversation(conv, &record);
    }
    batch.put_user(&user("alice"), &UserRecord { created_at_ms: 0 });
    store.commit(batch).await.unwrap();
    // Writers append to every conversation, one commit per message, while the cut is taken.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for n in 1..=400u64 {
                let mut pending = Vec::new();
                for conv in convs {
                    let mut batch = WriteBatch::new();
                    batch.append_event(conv, Seq(n), &message(n));
                    batch.remember_message_id(conv, message_id(n), &user("alice"), Seq(n));
                    pending.push(store.commit(batch));
                }
                for commit in pending {
                    commit.await.unwrap();
                }
            }
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let snapshot = store.snapshot().await.unwrap();
    let file = dir.path().join("backup.qbk");
    let written = backup::write_file(&snapshot, &file).unwrap();
    writer.await.unwrap();
    assert_eq!(backup::inspect(&file).unwrap(), written);

    let restored_dir = dir.path().join("b");
    let summary = backup::restore(&file, &restored_dir, kind).unwrap();
    assert_ne!(summary.epoch, store.epoch());
    assert_eq!(summary.backup_epoch, store.epoch());
    let restored = open(&restored_dir, kind);
    assert_eq!(restored.epoch(), summary.epoch);
    assert_eq!(restored.users().unwrap(), vec![user("alice")]);
    for conv in convs {
        let head = restored.head(conv).unwrap();
        assert_eq!(head, snapshot.heads()[&conv]);
        let events = restored.events_after(conv, Seq::ZERO, 10_000).unwrap();
        let original = store
            .events_after(conv, Seq::ZERO, head.0 as usize)
            .unwrap();
        assert_eq!(events, original, "conversation {conv} is not a prefix");
        // A message id is restored exactly when its message is.
        for n in 1..=400u64 {
            let id = restored
                .message_seq(conv, message_id(n), &user("alice"))
                .unwrap();
            assert_eq!(
                id.is_some(),
                n <= head.0,
                "message id {n} of conversation {conv}"
            );
        }
    }
    assert!(
        backup::restore(&file, &restored_dir, kind).is_err(),
        "restore must refuse a store that is not empty"
    );
}

async fn a_damaged_backup_is_refused_before_anything_is_written(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"), kind);
    let mut batch = WriteBatch::new();
    batch.put_user(&user("alice"), &UserRecord { created_at_ms: 0 });
    store.commit(batch).await.unwrap();
    let file = dir.path().join("backup.qbk");
    backup::write_file(&store.snapshot().await.unwrap(), &file).unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let err = backup::restore(&file, &dir.path().join("b"), kind).unwrap_err();
    assert!(
        err.to_string().contains("not a usable quip backup"),
        "{err}"
    );
    assert!(!dir.path().join("b").exists());
}

async fn pages_stop_at_conversation_bounds_in_both_directions(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), kind);
    let mut batch = WriteBatch::new();
    // Neighbours on both sides, so that a scan that runs past its conversation shows.
    for conv in [ConversationId(1), ConversationId(2), ConversationId(3)] {
        for n in 1..=50 {
            batch.append_event(conv, Seq(n), &message(n));
        }
    }
    store.commit(batch).await.unwrap();
    let conv = ConversationId(2);
    assert_eq!(store.head(conv).unwrap(), Seq(50));
    let seqs = |events: Vec<Event>| events.iter().map(|e| e.seq.0).collect::<Vec<_>>();
    assert_eq!(
        seqs(store.events_after(conv, Seq(45), 100).unwrap()),
        vec![46, 47, 48, 49, 50]
    );
    assert_eq!(
        seqs(store.events_after(conv, Seq(0), 3).unwrap()),
        vec![1, 2, 3]
    );
    assert!(store.events_after(conv, Seq(50), 10).unwrap().is_empty());
    assert_eq!(
        seqs(store.events_before(conv, Seq(51), 3).unwrap()),
        vec![48, 49, 50]
    );
    assert_eq!(
        seqs(store.events_before(conv, Seq(3), 100).unwrap()),
        vec![1, 2]
    );
    assert_eq!(
        store.event(conv, Seq(7)).unwrap().unwrap().body,
        message(7).body
    );
    assert_eq!(store.event(ConversationId(4), Seq(1)).unwrap(), None);
}

async fn a_store_is_refused_by_the_other_engine(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let other = match kind {
        BackendKind::Sled => BackendKind::Fjall,
        BackendKind::Fjall => BackendKind::Sled,
    };
    drop(open(dir.path(), kind));
    let err = loop {
        match Store::open(&config(dir.path(), other)) {
            Err(StoreError::Locked(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => break e,
            Ok(_) => panic!("a {kind} store opened as {other}"),
        }
    };
    assert!(
        matches!(err, StoreError::WrongBackend { found, wanted, .. } if found == kind && wanted == other),
        "{err}"
    );
    assert_eq!(detect_backend(dir.path()).unwrap(), Some(kind));
    let existing = StoreConfig::existing(dir.path().to_owned(), 1024 * 1024).unwrap();
    assert_eq!(existing.backend, kind);
}

async fn empty_commits_and_syncs_resolve(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), kind);
    store.sync().await.unwrap();
    store.commit(WriteBatch::new()).await.unwrap();
    assert_eq!(store.backend(), kind);
    assert!(store.disk_bytes().unwrap() > 0);
    assert_eq!(store.users().unwrap(), Vec::<UserName>::new());
    assert_eq!(store.conversations().unwrap(), Vec::<ConversationId>::new());
}

#[test]
fn a_store_made_before_the_marker_is_sled() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("conf"), b"").unwrap();
    assert_eq!(detect_backend(dir.path()).unwrap(), Some(BackendKind::Sled));
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(detect_backend(empty.path()).unwrap(), None);
}

#[test]
fn batches_keep_their_writes_in_order_when_merged() {
    let mut a = WriteBatch::new();
    a.put_raw(b"k1", b"v1");
    a.remove(b"k2");
    let mut b = WriteBatch::new();
    b.put_raw(b"k3", b"v3");
    a.extend(b);
    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = a
        .iter()
        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        ops,
        vec![
            (b"k1".to_vec(), Some(b"v1".to_vec())),
            (b"k2".to_vec(), None),
            (b"k3".to_vec(), Some(b"v3".to_vec())),
        ]
    );
    assert_eq!(a.len(), 3);
}

async fn erased_and_pruned_texts_leave_the_disk_and_backups(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("a"), kind);
    let conv = ConversationId(5);
    let mut batch = WriteBatch::new();
    batch.put_conversation(
        conv,
        &ConversationRecord {
            title: "t".into(),
            creator: user("alice"),
            members: [user("alice")].into(),
            created_at_ms: 0,
        },
    );
    for n in 1..=6 {
        batch.append_event(conv, Seq(n), &message(n));
    }
    store.commit(batch).await.unwrap();
    let files = |dir: &Path, needle: &str| -> bool {
        let mut found = false;
        for entry in walk(dir) {
            let bytes = std::fs::read(entry).unwrap_or_default();
            found |= bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        }
        found
    };
    assert!(files(&dir.path().join("a"), "message 4"));
    let mut batch = WriteBatch::new();
    batch.erase_text(conv, Seq(4));
    batch.prune_event(conv, Seq(1));
    batch.prune_event(conv, Seq(2));
    store.commit(batch).await.unwrap();
    assert!(!files(&dir.path().join("a"), "message 4"), "erased");
    assert!(!files(&dir.path().join("a"), "message 2"), "pruned");
    assert_eq!(store.oldest(conv).unwrap(), Seq(3));
    let events = store.events_after(conv, Seq::ZERO, 100).unwrap();
    let texts: Vec<&str> = events.iter().filter_map(|e| e.body.text()).collect();
    assert_eq!(texts, ["message 3", "", "message 5", "message 6"]);

    let file = dir.path().join("backup.qbk");
    backup::write_file(&store.snapshot().await.unwrap(), &file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let holds = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(holds("message 5") && !holds("message 4") && !holds("message 2"));
    let restored_dir = dir.path().join("b");
    backup::restore(&file, &restored_dir, kind).unwrap();
    let restored = open(&restored_dir, kind);
    assert_eq!(restored.events_after(conv, Seq::ZERO, 100).unwrap(), events);
    assert_eq!(restored.oldest(conv).unwrap(), Seq(3));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Opens the store at `dir` once the previous process's writer has let go of it.
fn reopen(dir: &Path, kind: BackendKind) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(&config(dir, kind)) {
            Ok(store) => return store,
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Waits until the store's writer has let go of `dir`, so its files can be copied.
fn closed(dir: &Path, kind: BackendKind) {
    drop(reopen(dir, kind));
    // The writer of that last open checkpoints and releases the lock once it is dropped.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while backend::open(dir, kind, 1 << 20, Arc::default()).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the store stays locked"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

async fn commit_messages(store: &Store, conv: ConversationId, seqs: std::ops::RangeInclusive<u64>) {
    for n in seqs {
        let mut batch = WriteBatch::new();
        batch.append_event(conv, Seq(n), &message(n));
        batch.remember_message_id(conv, message_id(n), &user("alice"), Seq(n));
        store.commit(batch).await.unwrap();
    }
}

/// An engine that lost everything after its checkpoint (as fjall does after a torn journal,
/// and either engine does after a kill -9 between checkpoints) gets it back from the log.
async fn commits_the_engine_lost_are_replayed_from_the_log(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let (live, lost) = (dir.path().join("live"), dir.path().join("lost"));
    let conv = ConversationId(3);
    commit_messages(&open(&live, kind), conv, 1..=50).await;
    closed(&live, kind);
    copy_dir(&live, &lost);
    commit_messages(&reopen(&live, kind), conv, 51..=120).await;
    closed(&live, kind);
    // `lost` is the engine as it was at the first checkpoint, beside the whole log.
    std::fs::copy(live.join("texts"), lost.join("texts")).unwrap();

    let store = reopen(&lost, kind);
    assert_eq!(store.head(conv).unwrap(), Seq(120));
    let events = store.events_after(conv, Seq::ZERO, 1000).unwrap();
    assert_eq!(events.len(), 120);
    for (n, event) in (1..=120u64).zip(&events) {
        assert_eq!(event.seq, Seq(n));
        assert_eq!(event.body.text(), Some(format!("message {n}").as_str()));
    }
    assert_eq!(
        store
            .message_seq(conv, message_id(100), &user("alice"))
            .unwrap(),
        Some(Seq(100))
    );
    commit_messages(&store, conv, 121..=121).await;
    assert_eq!(store.head(conv).unwrap(), Seq(121));
}

/// More log than one checkpoint's worth: the engine makes its checkpoints durable while
/// commits go on (fjall flushes in the background), each completes, and a copy of the store
/// taken while it runs (a crash image) opens with every commit, the rest replayed from the log.
async fn checkpoints_made_in_the_background_complete_while_commits_go_on(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let (live, middle) = (dir.path().join("live"), dir.path().join("middle"));
    let conv = ConversationId(5);
    let big = |n: u64| StoredEvent {
        sender: user("alice"),
        at_ms: n,
        body: EventBody::Message {
            id: message_id(n),
            text: format!("{n:06} {}", "x".repeat(60_000)),
        },
    };
    let count = 700u64; // about 42 MB of text: past two checkpoints' worth of log
    let store = open(&live, kind);
    for n in 1..=count {
        let mut batch = WriteBatch::new();
        batch.append_event(conv, Seq(n), &big(n));
        store.commit(batch).await.unwrap();
    }
    // A background checkpoint is noticed at the next commit; keep committing small ones.
    let mut n = count;
    let checkpoints = || {
        store
            .writer_stats()
            .checkpoints
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    while checkpoints() < 2 {
        n += 1;
        assert!(n < count + 5_000, "no checkpoint completed");
        commit_messages(&store, conv, n..=n).await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // What a kill -9 right now would leave: the engine as it is, beside the log.
    copy_dir(&live, &middle);
    drop(store);
    let store = reopen(&middle, kind);
    assert_eq!(store.head(conv).unwrap(), Seq(n));
    let events = store.events_after(conv, Seq::ZERO, 10_000).unwrap();
    assert_eq!(events.len() as u64, n);
    for (seq, event) in (1..=n).zip(&events) {
        assert_eq!(event.seq, Seq(seq));
    }
    assert_eq!(
        events[count as usize - 1].body.text().map(|t| &t[..6]),
        Some(format!("{count:06}").as_str())
    );
}

/// What sled could leave after a failed write before commits were framed in the log: a
/// conversation's last group commit torn, some of its events (and records pointing at them)
/// on disk without the ones before them. The first open keeps the gap-free prefix.
async fn a_torn_tail_left_by_an_older_version_is_cut_at_its_first_gap(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let conv = ConversationId(4);
    {
        let store = open(dir.path(), kind);
        commit_messages(&store, conv, 1..=10).await;
        let mut batch = WriteBatch::new();
        batch.put_receipt(
            conv,
            &user("bob"),
            &ReceiptRecord {
                delivered: Seq(10),
                read: Seq(9),
            },
        );
        store.commit(batch).await.unwrap();
    }
    closed(dir.path(), kind);
    {
        let engine = backend::open(dir.path(), kind, 1 << 20, Arc::default())
            .unwrap()
            .backend;
        let mut torn = WriteBatch::new();
        let inline = |n: u64| StoredEvent {
            sender: user("alice"),
            at_ms: n,
            body: EventBody::Message {
                id: message_id(n),
                text: String::new(),
            },
        };
        torn.append_event(conv, Seq(12), &inline(12));
        torn.append_event(conv, Seq(15), &inline(15));
        torn.remember_message_id(conv, message_id(13), &user("alice"), Seq(13));
        torn.remember_message_id(conv, message_id(15), &user("alice"), Seq(15));
        torn.put_receipt(
            conv,
            &user("bob"),
            &ReceiptRecord {
                delivered: Seq(15),
                read: Seq(12),
            },
        );
        torn.put_message_record(
            conv,
            Seq(5),
            &MessageRecord {
                edits: vec![Seq(14)],
                deleted: Some(Seq(16)),
                reactions: BTreeMap::new(),
            },
        );
        torn.put(
            &keys::text(conv, Seq(16)),
            &TextRef {
                offset: 1 << 40,
                len: 4,
            },
        );
        // An older version's store: no checkpoint, and no frames after the log's end.
        torn.remove(keys::META_CHECKPOINT);
        let log_end = std::fs::metadata(dir.path().join("texts")).unwrap().len();
        torn.put_raw(keys::META_TEXT_END, &log_end.to_be_bytes());
        engine.apply_durably(&mut torn.iter()).unwrap();
    }

    let store = reopen(dir.path(), kind);
    assert_eq!(store.head(conv).unwrap(), Seq(10));
    assert_eq!(store.events_after(conv, Seq(10), 100).unwrap(), vec![]);
    for n in [13, 15] {
        assert_eq!(
            store
                .message_seq(conv, message_id(n), &user("alice"))
                .unwrap(),
            None,
            "the message id of seq {n} would answer a retry with a seq it does not hold"
        );
    }
    assert_eq!(
        store
            .message_seq(conv, message_id(10), &user("alice"))
            .unwrap(),
        Some(Seq(10))
    );
    assert_eq!(
        store.receipts(conv).unwrap(),
        vec![(
            user("bob"),
            ReceiptRecord {
                delivered: Seq(10),
                read: Seq(10)
            }
        )]
    );
    let record = store.message_record(conv, Seq(5)).unwrap().unwrap();
    assert!(record.edits.is_empty() && record.deleted.is_none());
    assert_eq!(store.backend.get(&keys::text(conv, Seq(16))).unwrap(), None);
    commit_messages(&store, conv, 11..=11).await;
    drop(store);
    let store = reopen(dir.path(), kind);
    assert_eq!(store.head(conv).unwrap(), Seq(11));
    assert_eq!(
        store.event(conv, Seq(11)).unwrap().unwrap().body.text(),
        Some("message 11")
    );
}

async fn a_backup_of_a_conversation_with_a_gap_is_refused(kind: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"), kind);
    let conv = ConversationId(5);
    let mut batch = WriteBatch::new();
    batch.put_conversation(
        conv,
        &ConversationRecord {
            title: "gap".into(),
            creator: user("alice"),
            members: [user("alice")].into(),
            created_at_ms: 1,
        },
    );
    store.commit(batch).await.unwrap();
    commit_messages(&store, conv, 1..=10).await;
    let whole = store.snapshot().await.unwrap();
    assert!(whole.write_to(Vec::new()).is_ok());

    let mut hole = WriteBatch::new();
    hole.remove(&keys::event(conv, Seq(5)));
    store.backend.apply(&mut hole.iter()).unwrap();
    let err = store
        .snapshot()
        .await
        .unwrap()
        .write_to(Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains("seq 6 follows 4"), "{err}");
}
