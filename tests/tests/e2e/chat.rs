//! What people expect of a chat (issue 8), over real QUIC against a real daemon and store:
//! several devices of one user, receipts and unread counts, edits, deletes, reactions and
//! replies (and how they replay to a client that was offline), the deleted text leaving the
//! disk, the offline push hook, and retention.

use std::path::Path;
use std::time::Duration;

use quip_client::{
    Client, ClientError, ConversationId, ErrorCode, Event, EventBody, Origin, Position, Receipt,
    Seq, StartAt, Subscription, Timeline, Update,
};
use quip_tests::check::{collect_events, next_event};
use quip_tests::hook::{HookBehaviour, HookServer};
use quip_tests::{temp_dir, user, within, TestServer};
use quipd::config::RetentionConfig;
use quipd::conversation::Retention;
use quipd::push::{self, Hook, Preview, PushConfig};
use quipd::store::BackendKind;

/// The next update of a subscription, whatever it is.
async fn next_update(subscription: &mut Subscription, what: &str) -> Update {
    match within(format_args!("{what}: waiting"), subscription.next_update()).await {
        Some(Ok(update)) => update,
        Some(Err(e)) => panic!("{what}: the subscription failed: {e}"),
        None => panic!("{what}: the subscription ended"),
    }
}

/// The next event with its origin, skipping receipts.
async fn next_with_origin(subscription: &mut Subscription, what: &str) -> (Event, Origin) {
    loop {
        if let Update::Event { event, origin } = next_update(subscription, what).await {
            return (event, origin);
        }
    }
}

/// Waits until the subscription shows `user` with at least these cursors.
async fn wait_receipt(
    subscription: &mut Subscription,
    user: &str,
    read: Seq,
    what: &str,
) -> Receipt {
    loop {
        if let Some(r) = subscription.receipts().get(&quip_tests::user(user)) {
            if r.read >= read {
                return r.clone();
            }
        }
        next_update(subscription, what).await;
    }
}

async fn unread(client: &Client, conv: ConversationId) -> u64 {
    let inbox = within("inbox", client.inbox()).await.expect("inbox");
    inbox
        .iter()
        .find(|e| e.summary.conv == conv)
        .unwrap_or_else(|| panic!("conversation {conv} is not in the inbox"))
        .unread
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_user_get_everything_keep_their_own_cursors_and_share_reads() {
    let server = TestServer::start().await;
    let alice_token = server.add_user("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let dir = temp_dir();
    let device = |name: &str| {
        let mut config = server.client_config(&alice_token);
        config.state_file = Some(dir.path().join(format!("{name}.json")));
        config
    };
    let phone = within("phone", Client::connect(device("phone")))
        .await
        .expect("phone");
    let laptop = within("laptop", Client::connect(device("laptop")))
        .await
        .expect("laptop");
    let conv = phone
        .create_conversation("lunch", &[user("bob")])
        .await
        .expect("create");
    // Creating reads too: the creator has nothing unread, the invited member has Created.
    assert_eq!(unread(&laptop, conv).await, 0);
    assert_eq!(unread(&bob, conv).await, 1);
    let mut on_phone = phone
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribe");
    let mut on_laptop = laptop
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribe");

    let from_phone = phone.send(conv, "from my phone").await.expect("send").seq;
    let from_bob = bob.send(conv, "hi alice").await.expect("send").seq;
    let from_laptop = laptop.send(conv, "from my laptop").await.expect("send").seq;
    assert_eq!(
        (from_phone, from_bob, from_laptop),
        (Seq(2), Seq(3), Seq(4))
    );

    // Both devices get every event, their own sends included, each marked as whose it is.
    for (subscription, name, own) in [
        (&mut on_phone, "phone", from_phone),
        (&mut on_laptop, "laptop", from_laptop),
    ] {
        let (created, _) = next_with_origin(subscription, name).await;
        assert_eq!(created.seq, Seq(1));
        for seq in [from_phone, from_bob, from_laptop] {
            let (event, origin) = next_with_origin(subscription, name).await;
            assert_eq!(event.seq, seq, "{name}");
            let expected = if seq == from_bob {
                Origin::Someone
            } else if seq == own {
                Origin::ThisDevice
            } else {
                Origin::OtherDevice
            };
            assert_eq!(origin, expected, "{name}: the origin of seq {seq}");
        }
    }
    // Writing reads: alice's own message moved her read cursor to 4, so nothing is unread.
    assert_eq!(unread(&phone, conv).await, 0);
    bob.send(conv, "one").await.expect("send");
    let last = bob.send(conv, "two").await.expect("send").seq;
    for (subscription, name) in [(&mut on_phone, "phone"), (&mut on_laptop, "laptop")] {
        next_event(subscription, name).await;
        assert_eq!(next_event(subscription, name).await.seq, last, "{name}");
    }
    assert_eq!(unread(&laptop, conv).await, 2);
    assert_eq!(unread(&phone, conv).await, 2);

    // A read on the phone clears the unread count on the laptop, and the laptop is told.
    let receipt = phone.mark_read(conv, last).await.expect("mark read");
    assert_eq!((receipt.read, receipt.delivered), (last, last));
    assert_eq!(unread(&laptop, conv).await, 0);
    let shown = wait_receipt(&mut on_laptop, "alice", last, "the laptop sees the read").await;
    assert_eq!(shown.read, last);
    // Bob sees alice's ticks too.
    let mut on_bob = bob
        .subscribe(conv, StartAt::Latest)
        .await
        .expect("subscribe");
    let seen = wait_receipt(&mut on_bob, "alice", last, "bob sees alice's read").await;
    assert_eq!(seen.read, last);
    // A cursor never moves back.
    let back = laptop.mark_read(conv, Seq(2)).await.expect("an old read");
    assert_eq!(back.read, last);

    // Separate cursors: the laptop stops (its state file keeps its cursor), more happens that
    // only the phone gets, and each device resumes from its own cursor.
    drop(on_laptop);
    laptop.close().await;
    let later = bob
        .send(conv, "while the laptop is off")
        .await
        .expect("send")
        .seq;
    assert_eq!(next_event(&mut on_phone, "phone").await.seq, later);
    phone.close().await;
    drop(on_phone);

    let laptop = within("laptop again", Client::connect(device("laptop")))
        .await
        .expect("laptop again");
    let saved = laptop.saved_position(conv).expect("the laptop's cursor");
    assert_eq!(saved.seq, Seq(6), "the laptop's own cursor");
    let mut resumed = laptop
        .subscribe(conv, StartAt::After(saved))
        .await
        .expect("resume");
    assert_eq!(next_event(&mut resumed, "laptop resumed").await.seq, later);
    let phone = within("phone again", Client::connect(device("phone")))
        .await
        .expect("phone again");
    let saved = phone.saved_position(conv).expect("the phone's cursor");
    assert_eq!(
        saved.seq, later,
        "the phone's own cursor, further than the laptop's"
    );
}

/// Events of `conv` from seq 1 to the head, through a fresh subscription.
async fn all_events(client: &Client, conv: ConversationId, head: Seq) -> Vec<Event> {
    let mut subscription = client
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribe");
    let events = collect_events(
        &mut subscription,
        head.0 as usize,
        Duration::from_secs(30),
        "replay from the beginning",
    )
    .await;
    drop(subscription);
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_deletes_reactions_and_replies_replay_to_a_client_that_was_offline() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let bob_token = server.add_user("bob").await;
    let conv = alice
        .create_conversation("plans", &[user("bob")])
        .await
        .expect("create");
    let first = alice.send(conv, "lunch at noon?").await.expect("send").seq;
    let second = alice.send(conv, "or sushi").await.expect("send").seq;

    // Bob reads up to here, then goes offline.
    let bob = server.client(&bob_token).await;
    let mut live = bob
        .subscribe(conv, StartAt::Beginning)
        .await
        .expect("subscribe");
    let seen = collect_events(&mut live, 3, Duration::from_secs(30), "bob before").await;
    let cursor = Position {
        epoch: bob.epoch(),
        seq: seen.last().expect("events").seq,
    };
    drop(live);
    bob.close().await;

    // Meanwhile: an edit, reactions (one taken back), a reply, a delete.
    let edited = alice
        .edit(conv, first, "lunch at one?")
        .await
        .expect("edit")
        .seq;
    let carol = server.user_client("carol").await.1;
    alice.add_member(conv, user("carol")).await.expect("add");
    let liked = carol.react(conv, first, "👍").await.expect("react").seq;
    carol.react(conv, first, "🍜").await.expect("react");
    carol.unreact(conv, first, "🍜").await.expect("unreact");
    let reply = carol
        .reply(conv, first, "one works")
        .await
        .expect("reply")
        .seq;
    let gone = alice.delete(conv, second).await.expect("delete").seq;
    let head = gone;

    // Bob comes back and resumes after his cursor: exactly what he missed, in order.
    let bob = server.client(&bob_token).await;
    let mut resumed = bob
        .subscribe(conv, StartAt::After(cursor))
        .await
        .expect("resume");
    let missed = collect_events(
        &mut resumed,
        (head.0 - cursor.seq.0) as usize,
        Duration::from_secs(30),
        "bob's replay",
    )
    .await;
    let seqs: Vec<u64> = missed.iter().map(|e| e.seq.0).collect();
    assert_eq!(seqs, ((cursor.seq.0 + 1)..=head.0).collect::<Vec<_>>());
    assert!(
        matches!(&missed[0].body, EventBody::Edited { target, text, .. }
        if *target == first && text == "lunch at one?")
    );
    assert!(missed.iter().any(|e| e.seq == liked
        && matches!(&e.body, EventBody::ReactionAdded { target, emoji, .. } if *target == first && emoji == "👍")));
    assert!(missed.iter().any(|e| e.seq == reply
        && matches!(&e.body, EventBody::Reply { reply_to, text, .. } if *reply_to == first && text == "one works")));
    assert!(
        matches!(&missed.last().expect("events").body, EventBody::Deleted { target, .. } if *target == second)
    );

    // Folding what bob has gives the state the server keeps, which history returns.
    let mut timeline = Timeline::new();
    for event in seen.iter().chain(&missed) {
        timeline.apply(event);
    }
    let message = timeline.message(first).expect("the first message");
    assert_eq!(message.text, "lunch at one?");
    assert_eq!(message.edited, Some(edited));
    assert_eq!(
        message.reactions.keys().collect::<Vec<_>>(),
        ["👍"],
        "the 🍜 was taken back"
    );
    let tombstone = timeline.message(second).expect("the tombstone");
    assert_eq!(
        (tombstone.text.as_str(), tombstone.deleted),
        ("", Some(gone))
    );
    assert_eq!(
        timeline.message(reply).expect("reply").reply_to,
        Some(first)
    );

    let page = bob.page(conv, None, 100).await.expect("page");
    assert_eq!(page.head, head);
    let mut from_page = Timeline::new();
    from_page.apply_page(&page.events, &page.states);
    let folded: Vec<_> = timeline.messages().collect();
    let paged: Vec<_> = from_page.messages().collect();
    assert_eq!(
        folded, paged,
        "the fold of the events and the page's states agree"
    );
    // A page that ends before the changes still shows them: the states are current.
    let early = bob
        .page(conv, Some(second.next()), 10)
        .await
        .expect("early page");
    let state = early
        .states
        .iter()
        .find(|s| s.seq == first)
        .expect("a state");
    assert_eq!(state.text.as_deref(), Some("lunch at one?"));
    assert_eq!(state.reactions.len(), 1);
    let state = early
        .states
        .iter()
        .find(|s| s.seq == second)
        .expect("a state");
    assert_eq!(state.deleted, Some(gone));

    // A member joining later replays the whole sequence and folds to the same.
    let replayed = all_events(&carol, conv, head).await;
    let mut carols = Timeline::new();
    for event in &replayed {
        carols.apply(event);
    }
    assert_eq!(carols.messages().collect::<Vec<_>>(), folded);
}

/// Whether any file under `dir` holds `needle`.
fn on_disk(dir: &Path, needle: &[u8]) -> bool {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
    }
    false
}

async fn author_rules_and_deleted_text_leaves_the_disk(engine: BackendKind) {
    let server = TestServer::start_with(move |config| config.store = engine).await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let (_, carol) = server.user_client("carol").await;
    let conv = alice
        .create_conversation("rules", &[user("bob"), user("carol")])
        .await
        .expect("create");
    let secret = format!("the door code is {}", rand::random::<u64>());
    let edit = format!("the new door code is {}", rand::random::<u64>());
    let seq = bob.send(conv, secret.clone()).await.expect("send").seq;

    // Only the author edits: not another member, not even the creator.
    for other in [&alice, &carol] {
        let err = other
            .edit(conv, seq, "hacked")
            .await
            .expect_err("not the author");
        assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN), "{err}");
    }
    bob.edit(conv, seq, edit.clone())
        .await
        .expect("the author edits");
    // A member who is neither the author nor the creator cannot delete.
    let err = carol.delete(conv, seq).await.expect_err("not an admin");
    assert_eq!(err.code(), Some(ErrorCode::FORBIDDEN), "{err}");
    // Pointing at something that is no message is refused with a clear code.
    let err = bob
        .edit(conv, Seq(1), "x")
        .await
        .expect_err("Created is no message");
    assert_eq!(err.code(), Some(ErrorCode::NOT_A_MESSAGE), "{err}");
    let err = bob
        .react(conv, Seq(999), "👍")
        .await
        .expect_err("past the head");
    assert_eq!(err.code(), Some(ErrorCode::NOT_A_MESSAGE), "{err}");

    let store = server.data_dir.join("store");
    assert!(
        on_disk(&store, secret.as_bytes()),
        "the text is on disk before the delete"
    );
    assert!(on_disk(&store, edit.as_bytes()));
    // The creator deletes it for everyone.
    let deleted = alice
        .delete(conv, seq)
        .await
        .expect("the creator deletes")
        .seq;
    assert!(
        !on_disk(&store, secret.as_bytes()),
        "the deleted text is still in the store's files ({engine})"
    );
    assert!(
        !on_disk(&store, edit.as_bytes()),
        "the edit's text too ({engine})"
    );
    // A tombstone stays; the message cannot be changed any more.
    let (events, _) = bob.history(conv, None, 100).await.expect("history");
    let message = events
        .iter()
        .find(|e| e.seq == seq)
        .expect("the message is still there");
    assert!(matches!(&message.body, EventBody::Message { text, .. } if text.is_empty()));
    let page = bob.page(conv, None, 100).await.expect("page");
    let state = page.states.iter().find(|s| s.seq == seq).expect("state");
    assert_eq!(
        (state.deleted, state.text.as_deref()),
        (Some(deleted), None)
    );
    let err = bob.edit(conv, seq, "back").await.expect_err("deleted");
    assert_eq!(err.code(), Some(ErrorCode::MESSAGE_DELETED), "{err}");

    // It stays gone across a restart, and the store reads as before.
    let server = server.restart().await;
    assert!(!on_disk(&server.data_dir.join("store"), secret.as_bytes()));
    let bob = server.client(&server.add_user("dave").await).await;
    let err = bob
        .history(conv, None, 10)
        .await
        .expect_err("dave is no member");
    assert_eq!(err.code(), Some(ErrorCode::NOT_FOUND));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_author_edits_a_non_admin_cannot_delete_and_deleted_text_leaves_the_disk() {
    author_rules_and_deleted_text_leaves_the_disk(BackendKind::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_text_leaves_the_disk_on_fjall_too() {
    author_rules_and_deleted_text_leaves_the_disk(BackendKind::Fjall).await;
}

fn push_config(url: &str) -> PushConfig {
    PushConfig {
        hook: Hook::Http { url: url.into() },
        preview: Preview::Text,
        batch_window: Duration::from_millis(50),
        per_user_interval: Duration::from_millis(50),
        max_attempts: 3,
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        timeout: Duration::from_secs(60),
        queue: 64,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_hook_is_called_for_offline_members_only() {
    let hook = HookServer::start(HookBehaviour::Accept).await;
    let url = hook.url.clone();
    let server = TestServer::start_with(move |config| config.push = Some(push_config(&url))).await;
    let (_, alice) = server.user_client("alice").await;
    let (_, carol) = server.user_client("carol").await;
    server.add_user("bob").await;
    let conv = alice
        .create_conversation("push", &[user("bob"), user("carol")])
        .await
        .expect("create");
    let seq = alice
        .send(conv, "bob, are you there?")
        .await
        .expect("send")
        .seq;
    let calls = hook.wait_for(1).await;
    // Give a wrong call (carol, online; alice, the sender) the time to arrive too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = if hook.bodies().len() > calls.len() {
        hook.bodies()
    } else {
        calls
    };
    let users: Vec<&str> = calls.iter().filter_map(|c| c["user"].as_str()).collect();
    assert!(
        users.iter().all(|u| *u == "bob"),
        "the hook was called for {users:?}"
    );
    let note = &calls[0]["notifications"][0];
    assert_eq!(note["conv"].as_u64(), Some(conv.0));
    assert_eq!(note["seq"].as_u64(), Some(seq.0));
    assert_eq!(note["sender"], "alice");
    assert_eq!(note["text"], "bob, are you there?");
    let stats = server.push.clone().expect("push stats");
    assert!(push::get(&stats.online) >= 1, "carol was online");
    drop(carol);
}

async fn hook_does_not_delay_delivery(behaviour: HookBehaviour) {
    let hook = HookServer::start(behaviour).await;
    let url = hook.url.clone();
    let server = TestServer::start_with(move |config| config.push = Some(push_config(&url))).await;
    let (_, alice) = server.user_client("alice").await;
    let (_, carol) = server.user_client("carol").await;
    server.add_user("bob").await;
    let conv = alice
        .create_conversation("push", &[user("bob"), user("carol")])
        .await
        .expect("create");
    let mut on_carol = carol
        .subscribe(conv, StartAt::Latest)
        .await
        .expect("subscribe");
    alice.send(conv, "first").await.expect("send");
    // The hook has the first call for bob (who is offline) and is hanging on it or failing it.
    hook.wait_for(1).await;
    let stats = server.push.clone().expect("push stats");
    let sends: Vec<_> = (0..50).map(|n| alice.send(conv, format!("m{n}"))).collect();
    for send in sends {
        within("an ack while the hook misbehaves", send)
            .await
            .expect("send");
    }
    let got = collect_events(&mut on_carol, 51, Duration::from_secs(30), "carol").await;
    assert_eq!(got.len(), 51);
    if behaviour == HookBehaviour::Hang {
        assert_eq!(hook.bodies().len(), 1, "the first call still hangs");
        assert_eq!(push::get(&stats.delivered), 0);
    } else {
        // Failures are retried with backoff, then given up.
        within("the hook's retries", async {
            while push::get(&stats.given_up) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(push::get(&stats.failures) >= 3, "each attempt failed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_hangs_does_not_delay_delivery() {
    hook_does_not_delay_delivery(HookBehaviour::Hang).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_fails_does_not_delay_delivery() {
    hook_does_not_delay_delivery(HookBehaviour::Fail(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_old_messages_and_names_the_oldest_seq() {
    let server = TestServer::start_with(|config| {
        config.retention = RetentionConfig {
            default: Retention {
                keep_events: Some(10),
                keep_for: None,
            },
            ..RetentionConfig::default()
        };
    })
    .await;
    let (_, alice) = server.user_client("alice").await;
    let (_, bob) = server.user_client("bob").await;
    let conv = alice
        .create_conversation("short memory", &[user("bob")])
        .await
        .expect("create");
    let mut last = Seq(1);
    for n in 0..30 {
        last = alice
            .send(conv, format!("old {n}"))
            .await
            .expect("send")
            .seq;
    }
    assert_eq!(last, Seq(31));
    let oldest = Seq(22);
    // Pruning follows the commits; wait for it.
    let page = within("retention", async {
        loop {
            let page = bob.page(conv, None, 100).await.expect("page");
            if page.oldest == oldest {
                return page;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let seqs: Vec<u64> = page.events.iter().map(|e| e.seq.0).collect();
    assert_eq!(
        seqs,
        (22..=31).collect::<Vec<_>>(),
        "the newest ten are kept"
    );

    // History below what is kept is answered with the oldest available seq.
    match bob.history(conv, Some(oldest), 10).await {
        Err(ClientError::Pruned { oldest: o, head }) => assert_eq!((o, head), (oldest, last)),
        other => panic!("expected Pruned, got {other:?}"),
    }
    // ... and paging from there works.
    let (events, _) = bob.history(conv, Some(Seq(25)), 10).await.expect("history");
    assert_eq!(
        events.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
        [22, 23, 24]
    );
    // A subscription from an old cursor, or from the beginning, is told the same.
    for start in [
        StartAt::Beginning,
        StartAt::After(Position {
            epoch: bob.epoch(),
            seq: Seq(5),
        }),
    ] {
        match bob.subscribe(conv, start).await {
            Err(ClientError::Pruned { oldest: o, .. }) => assert_eq!(o, oldest),
            other => panic!("expected Pruned for {start:?}, got {other:?}"),
        }
    }
    // From just before the oldest, delivery is gap-free.
    let mut from_oldest = bob
        .subscribe(
            conv,
            StartAt::After(Position {
                epoch: bob.epoch(),
                seq: Seq(oldest.0 - 1),
            }),
        )
        .await
        .expect("subscribe at the oldest");
    assert_eq!(
        next_event(&mut from_oldest, "from the oldest").await.seq,
        oldest
    );
    // The pruned texts are gone from the disk too.
    assert!(!on_disk(&server.data_dir.join("store"), b"old 3"));
    assert!(on_disk(&server.data_dir.join("store"), b"old 29"));
}
