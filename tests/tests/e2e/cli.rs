//! The real `quipd` and `quip` executables, fed with every non-English language of the corpus.

use quip_tests::check::{assert_consecutive, assert_same_messages, Msg};
use quip_tests::{corpus_or_fixture_languages, load_corpus, DaemonProcess, Quip};

/// Turns taken per language, so that the whole corpus stays well under a minute in debug.
const MAX_TURNS_PER_LANGUAGE: usize = 200;

/// One event line of `quip tail --json` or `quip history --json`.
#[derive(Debug)]
struct JsonEvent {
    conv: u64,
    seq: u64,
    sender: String,
    kind: String,
    text: Option<String>,
}

fn parse_json_lines(what: &str, stdout: &str) -> Vec<JsonEvent> {
    stdout
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: line {line:?} is not JSON: {e}"));
            let field = |name: &str| {
                value
                    .get(name)
                    .unwrap_or_else(|| panic!("{what}: line {line:?} has no `{name}`"))
            };
            JsonEvent {
                conv: field("conv").as_u64().expect("`conv` is a number"),
                seq: field("seq").as_u64().expect("`seq` is a number"),
                sender: field("sender").as_str().expect("`sender` is text").into(),
                kind: field("type").as_str().expect("`type` is text").into(),
                text: value.get("text").map(|t| {
                    t.as_str()
                        .unwrap_or_else(|| panic!("{what}: `text` of {line:?} is not a string"))
                        .to_owned()
                }),
            }
        })
        .collect()
}

fn json_messages(events: &[JsonEvent]) -> Vec<Msg> {
    events
        .iter()
        .filter(|e| e.kind == "message")
        .map(|e| Msg {
            seq: e.seq,
            sender: e.sender.clone(),
            text: e.text.clone().expect("a message line has a text"),
        })
        .collect()
}

/// The turns of a language that `quip send` can carry as one stdin line each.
fn sendable_turns(language: &str) -> Vec<String> {
    load_corpus(&[language])
        .into_iter()
        .flatten()
        // One message per line: a turn with a line break would become several messages, and a
        // trailing '\r' would be taken for a CRLF line end.
        .filter(|t| !t.is_empty() && !t.contains('\n') && !t.ends_with('\r'))
        .take(MAX_TURNS_PER_LANGUAGE)
        .collect()
}

/// The whole history through `quip history --json`, paged with `--before`.
async fn cli_history(quip: &Quip, conv: &str) -> Vec<JsonEvent> {
    let mut all: Vec<JsonEvent> = Vec::new();
    loop {
        let mut args = vec!["history", conv, "--json", "--limit", "1000"];
        let before;
        if let Some(first) = all.first() {
            if first.seq == 1 {
                break;
            }
            before = first.seq.to_string();
            args.extend(["--before", before.as_str()]);
        }
        let out = quip.run(&args).await;
        out.expect_success(&format!("quip {}", args.join(" ")));
        let page = parse_json_lines("quip history", &out.stdout);
        assert!(!page.is_empty(), "quip {} printed nothing", args.join(" "));
        if let Some(first) = all.first() {
            assert_eq!(
                page.last().map(|e| e.seq + 1),
                Some(first.seq),
                "the history page before {} does not end right before it",
                first.seq
            );
        }
        all.splice(0..0, page);
    }
    all
}

/// `quipd user add`, `quip conv create`, then per language all turns piped into `quip send`
/// while bob's `quip tail --json` (started before the sends) prints them: byte-identical texts
/// in order with consecutive seqs, in the tail and in `quip history`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_binaries_non_english_corpus() {
    let daemon = DaemonProcess::start().await;
    let alice_token = daemon.add_user("alice").await;
    let bob_token = daemon.add_user("bob").await;
    let alice = daemon.quip(&alice_token).await;
    let bob = alice.with_token(Some(&bob_token));

    let created = alice
        .run(&["conv", "create", "--member", "bob", "--title", "corpus"])
        .await;
    created.expect_success("quip conv create");
    let conv = created.stdout.trim().to_owned();
    let conv_id: u64 = conv
        .parse()
        .unwrap_or_else(|_| panic!("quip conv create printed {:?}, not an id", created.stdout));

    let plan: Vec<(String, Vec<String>)> = corpus_or_fixture_languages()
        .into_iter()
        .filter(|language| language != "english")
        .map(|language| {
            let turns = sendable_turns(&language);
            (language, turns)
        })
        .filter(|(_, turns)| !turns.is_empty())
        .collect();
    assert!(!plan.is_empty(), "no non-English text to send");
    let total: usize = plan.iter().map(|(_, turns)| turns.len()).sum();

    // Bob follows from the start: Created plus every message, then exits.
    let count = (total + 1).to_string();
    let tail = bob.spawn(&["tail", &conv, "--after", "0", "--count", &count, "--json"]);

    let mut sent: Vec<Msg> = Vec::with_capacity(total);
    for (language, turns) in &plan {
        let mut input = turns.join("\n");
        input.push('\n');
        let out = alice.run_with_stdin(&["send", &conv], &input).await;
        out.expect_success(&format!("quip send of the {language} turns"));
        let seqs: Vec<u64> = out
            .stdout_lines()
            .iter()
            .map(|line| {
                line.parse()
                    .unwrap_or_else(|_| panic!("quip send printed {line:?}, not a seq"))
            })
            .collect();
        assert_eq!(
            seqs.len(),
            turns.len(),
            "quip send acknowledged {} of the {} {language} lines; stderr:\n{}",
            seqs.len(),
            turns.len(),
            out.stderr
        );
        sent.extend(
            seqs.iter()
                .zip(turns)
                .map(|(seq, text)| Msg::new(*seq, "alice", text)),
        );
    }
    assert_consecutive("seqs printed by quip send", sent.iter().map(|m| m.seq), 2);

    let tailed = Quip::finish(tail, "bob's quip tail").await;
    tailed.expect_success("bob's quip tail");
    let events = parse_json_lines("bob's quip tail", &tailed.stdout);
    assert_eq!(
        events.len(),
        total + 1,
        "quip tail --count {count} printed {} lines",
        events.len()
    );
    assert_consecutive("seqs printed by quip tail", events.iter().map(|e| e.seq), 1);
    assert_eq!(events[0].kind, "created", "the first tailed event");
    assert!(
        events.iter().all(|e| e.conv == conv_id),
        "quip tail printed an event of another conversation"
    );
    assert_same_messages("bob's quip tail", &sent, &json_messages(&events));

    let history = cli_history(&bob, &conv).await;
    assert_consecutive("seqs of quip history", history.iter().map(|e| e.seq), 1);
    assert_same_messages("quip history", &sent, &json_messages(&history));
}

/// Two terminals with the real binaries: alice follows with `quip tail --receipts --json` while
/// bob reads, reacts and replies and alice edits and deletes; the ticks move in alice's tail,
/// `quip conv list` counts unread, `quip history --json` shows each message as it is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_ticks_edits_reactions_replies_and_unread_counts() {
    let daemon = DaemonProcess::start().await;
    let alice = daemon.quip(&daemon.add_user("alice").await).await;
    let bob = alice.with_token(Some(&daemon.add_user("bob").await));
    let created = alice.run(&["conv", "create", "--member", "bob"]).await;
    created.expect_success("quip conv create");
    let conv = created.stdout.trim().to_owned();
    let seq_of = |out: &quip_tests::CliOutput, what: &str| -> u64 {
        out.expect_success(what);
        out.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{what} printed {:?}, not a seq", out.stdout))
    };
    // Terminal 1: alice follows (6 events: Created, 2 messages, edit, reaction, reply).
    let tail = alice.spawn(&[
        "tail",
        &conv,
        "--after",
        "0",
        "--receipts",
        "--json",
        "--count",
        "6",
    ]);

    let first = seq_of(
        &alice.run(&["send", &conv, "noodles at noon?"]).await,
        "send",
    );
    let second = seq_of(&alice.run(&["send", &conv, "or sushi"]).await, "send");
    let list = bob.run(&["conv", "list"]).await;
    list.expect_success("bob's conv list");
    assert!(
        list.stdout.contains("\tunread=3\t"),
        "bob has Created and two messages unread: {:?}",
        list.stdout
    );
    // Terminal 2: bob reads up to the first message.
    let read = bob.run(&["read", &conv, &first.to_string()]).await;
    read.expect_success("quip read");
    assert_eq!(
        read.stdout.trim(),
        format!("read={first} delivered={first}")
    );
    let list = bob.run(&["conv", "list"]).await;
    assert!(list.stdout.contains("\tunread=1\t"), "{:?}", list.stdout);

    let edit = seq_of(
        &alice
            .run(&["edit", &conv, &first.to_string(), "noodles at one?"])
            .await,
        "edit",
    );
    let react = seq_of(
        &bob.run(&["react", &conv, &first.to_string(), "🍜"]).await,
        "react",
    );
    let reply = seq_of(
        &bob.run(&["send", &conv, "--reply-to", &first.to_string(), "one works"])
            .await,
        "reply",
    );
    let refused = bob
        .run(&["edit", &conv, &first.to_string(), "mine now"])
        .await;
    assert!(!refused.status.success(), "bob edited alice's message");
    assert!(refused.stderr.contains("FORBIDDEN"), "{}", refused.stderr);

    let tailed = Quip::finish(tail, "alice's tail").await;
    tailed.expect_success("alice's tail");
    let lines: Vec<serde_json::Value> = tailed
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let events: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("seq").is_some()).collect();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "created",
            "message",
            "message",
            "edited",
            "reaction_added",
            "reply"
        ],
        "{}",
        tailed.stdout
    );
    assert_eq!(events[3]["target"].as_u64(), Some(first));
    assert_eq!(events[3]["text"], "noodles at one?");
    assert_eq!(events[4]["emoji"], "🍜");
    assert_eq!(events[5]["reply_to"].as_u64(), Some(first));
    assert_eq!(
        events[1]["origin"], "other_device",
        "alice's send from another process"
    );
    assert_eq!(events[4]["origin"], "other");
    // The ticks: bob's read of the first message showed up in alice's tail before the edit.
    let bob_read = lines
        .iter()
        .position(|l| {
            l["event"] == "receipt" && l["user"] == "bob" && l["read"].as_u64() == Some(first)
        })
        .unwrap_or_else(|| panic!("no receipt of bob's read in {}", tailed.stdout));
    let edited_at = lines
        .iter()
        .position(|l| l["type"] == "edited")
        .expect("edit line");
    assert!(bob_read < edited_at, "{}", tailed.stdout);

    // History shows every message as it is now; then alice deletes the second.
    let deleted = seq_of(
        &alice.run(&["delete", &conv, &second.to_string()]).await,
        "delete",
    );
    let history = bob.run(&["history", &conv, "--json"]).await;
    history.expect_success("quip history");
    let page: Vec<serde_json::Value> = history
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let at = |seq: u64| {
        page.iter()
            .find(|l| l["seq"].as_u64() == Some(seq))
            .unwrap_or_else(|| panic!("seq {seq} is not in {}", history.stdout))
    };
    assert_eq!(at(first)["text"], "noodles at one?");
    assert_eq!(at(first)["edited"].as_u64(), Some(edit));
    assert_eq!(at(first)["reactions"]["🍜"][0], "bob");
    assert_eq!(at(second)["deleted"].as_u64(), Some(deleted));
    assert_eq!(at(second)["text"], "");
    assert_eq!(at(react)["type"], "reaction_added");
    assert_eq!(at(reply)["text"], "one works");
    let text = bob.run(&["history", &conv]).await;
    assert!(
        text.stdout.contains("noodles at one? (edited) [🍜 bob]"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains(&format!("{second} alice: (deleted)")),
        "{}",
        text.stdout
    );
    // A tail that replays the deleted message shows it as deleted, not as an empty line.
    let replayed = bob
        .run(&[
            "tail",
            &conv,
            "--after",
            "0",
            "--count",
            &deleted.to_string(),
        ])
        .await;
    replayed.expect_success("bob's tail from the start");
    assert!(
        replayed
            .stdout_lines()
            .contains(&format!("{second} alice: (deleted)").as_str()),
        "{}",
        replayed.stdout
    );

    // A read behind the cursor changes nothing, and says so.
    let behind = bob.run(&["read", &conv, "1"]).await;
    behind.expect_success("quip read behind the cursor");
    assert!(
        behind.stderr.contains("only moves forward"),
        "{}",
        behind.stderr
    );
}
