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
