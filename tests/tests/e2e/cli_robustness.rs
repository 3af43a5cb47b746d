//! The real `quip` executable where a user (or another member) makes things hard: lines too
//! large to send, partial failures, text that tries to forge output, a store restored under a
//! saved cursor, a daemon that dies or cannot store, and bad arguments and state files.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use quip_tests::{within, within_for, Binaries, CliOutput, DaemonProcess, Quip, STEP};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// A daemon, alice's `quip`, and a conversation of alice's (seq 1 is its creation).
async fn alice_with_a_conversation(daemon: &DaemonProcess) -> (Quip, String) {
    let alice = daemon.quip(&daemon.add_user("alice").await).await;
    let created = alice.run(&["conv", "create"]).await;
    created.expect_success("quip conv create");
    (alice, created.stdout.trim().to_owned())
}

fn seqs(out: &CliOutput) -> Vec<u64> {
    out.stdout_lines()
        .iter()
        .map(|line| {
            line.parse()
                .unwrap_or_else(|_| panic!("quip send printed {line:?}, not a seq"))
        })
        .collect()
}

/// The texts of the messages of `quip history --json`.
async fn texts(quip: &Quip, conv: &str) -> Vec<String> {
    let out = quip
        .run(&["history", conv, "--json", "--limit", "1000"])
        .await;
    out.expect_success("quip history --json");
    out.stdout_lines()
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("a JSON line"))
        .filter(|event| event["type"] == "message")
        .map(|event| event["text"].as_str().expect("a text").to_owned())
        .collect()
}

async fn quipd(args: &[&str]) -> CliOutput {
    let mut command = tokio::process::Command::new(&Binaries::get().await.quipd);
    command
        .args(args)
        .env_remove("QUIPD_DATA")
        .env_remove("QUIPD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawning quipd");
    Quip::finish(child, &format!("quipd {}", args.join(" "))).await
}

/// A line over the protocol's limit (1.1 MB, more than a frame) fails at once with
/// MESSAGE_TOO_LARGE, named by its line number, and never reaches the state file; the lines
/// around it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_too_large_for_a_frame_fails_at_once_and_stays_out_of_the_state_file() {
    let daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let dir = quip_tests::temp_dir();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().expect("a UTF-8 path");
    let input = format!("before\n{}\nafter\n", "q".repeat(1_100_000));
    let started = Instant::now();
    let out = alice
        .run_with_stdin(&["--state", state_arg, "send", &conv], &input)
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "quip send took {:?}",
        started.elapsed()
    );
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert_eq!(seqs(&out), [2, 3], "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("line 2:") && out.stderr.contains("MESSAGE_TOO_LARGE"),
        "{}",
        out.stderr
    );
    let saved = std::fs::read_to_string(&state).expect("the state file");
    assert!(
        saved.len() < 4096,
        "the state file holds {} bytes",
        saved.len()
    );
    assert!(!saved.contains("qqqq"), "the line is in the state file");
    assert_eq!(texts(&alice, &conv).await, ["before", "after"]);
}

/// A state file that already holds a send no server takes (written by an older `quip`) does
/// not wedge later runs: the entry is reported and dropped, the other saved send is stored and
/// reported, and the run after that is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_send_no_server_takes_is_reported_and_dropped_not_resent_for_ever() {
    let daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let dir = quip_tests::temp_dir();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().expect("a UTF-8 path");
    let conv_id: u64 = conv.parse().expect("an id");
    let saved = serde_json::json!({
        "cursors": {},
        "outbox": [
            {"conv": conv_id, "id": vec![7u8; 16], "text": "q".repeat(1_100_000)},
            {"conv": conv_id, "id": vec![8u8; 16], "text": "left over"},
        ],
    });
    std::fs::write(&state, saved.to_string()).expect("writing the state file");

    let out = alice
        .run(&["--state", state_arg, "send", &conv, "new"])
        .await;
    assert_eq!(
        out.code(),
        Some(1),
        "the dropped send is a failure to report"
    );
    assert!(
        out.stderr.contains("MESSAGE_TOO_LARGE") && out.stderr.contains("dropped"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("1 unacknowledged sends") && out.stderr.contains("seq 2"),
        "the re-sent one is reported: {}",
        out.stderr
    );
    assert_eq!(seqs(&out), [3]);
    let saved = std::fs::read_to_string(&state).expect("the state file");
    assert!(
        !saved.contains("qqqq"),
        "the entry is still in the state file"
    );

    let again = alice
        .run(&["--state", state_arg, "send", &conv, "clean"])
        .await;
    again.expect_success("the next run");
    assert_eq!(again.stderr, "", "nothing left to report");
    assert_eq!(texts(&alice, &conv).await, ["left over", "new", "clean"]);
}

/// Every line's outcome: the seqs of the stored lines on stdout in line order, each refused
/// line's number and reason on stderr (a too-large line, a line that is not UTF-8), the lines
/// after a refused one still sent, and exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quip_send_tells_every_lines_outcome() {
    let daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let input = format!("a\n{}\nb\nc\n", "z".repeat(70_000));
    let out = alice.run_with_stdin(&["send", &conv], &input).await;
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert_eq!(seqs(&out), [2, 3, 4], "b and c are stored and printed");
    assert!(
        out.stderr.contains("line 2: ") && out.stderr.contains("MESSAGE_TOO_LARGE"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("1 of the 4 lines"), "{}", out.stderr);

    let out = alice
        .run_with_input(&["send", &conv], b"good1\n\xff\xfebad\ngood2\n")
        .await;
    assert_eq!(out.code(), Some(1));
    assert_eq!(seqs(&out), [5, 6]);
    assert!(
        out.stderr.contains("line 2: not valid UTF-8"),
        "{}",
        out.stderr
    );
    assert_eq!(
        texts(&alice, &conv).await,
        ["a", "b", "c", "good1", "good2"]
    );
}

/// What other members wrote cannot forge a line, break the columns of `conv list` or reach the
/// terminal as an escape sequence; `--json` keeps the text as it is. A member who leaves is
/// shown leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_output_escapes_what_members_wrote() {
    let daemon = DaemonProcess::start().await;
    let alice = daemon.quip(&daemon.add_user("alice").await).await;
    let bob = alice.with_token(Some(&daemon.add_user("bob").await));
    let title = "\u{1b}[31mred\u{7}\tcolumn";
    let created = alice
        .run(&["conv", "create", "--member", "bob", "--title", title])
        .await;
    created.expect_success("quip conv create");
    let conv = created.stdout.trim().to_owned();
    let forged = "hello\n33 alice: I owe bob $100";
    bob.run(&["send", &conv, forged])
        .await
        .expect_success("bob sends");
    bob.run(&["react", &conv, "2", "\u{1b}"]).await; // refused: not an emoji
    bob.run(&["conv", "remove", &conv, "bob"])
        .await
        .expect_success("bob leaves");

    let history = alice.run(&["history", &conv]).await;
    history.expect_success("quip history");
    let lines = history.stdout_lines();
    assert_eq!(lines.len(), 3, "{:?}", history.stdout);
    assert!(
        lines[1].starts_with("2 bob: hello\\n33 alice: I owe bob $100"),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.starts_with("33 ")), "{lines:?}");
    assert_eq!(lines[2], "3 * bob left");
    assert!(
        lines[0].contains("\\u{1b}[31mred\\u{7}\\tcolumn"),
        "{lines:?}"
    );

    let list = alice.run(&["conv", "list"]).await;
    list.expect_success("quip conv list");
    let columns: Vec<&str> = list.stdout.trim_end().split('\t').collect();
    assert_eq!(columns.len(), 7, "{:?}", list.stdout);
    for out in [&history, &list] {
        assert!(
            !out.stdout.contains(['\u{1b}', '\u{7}']),
            "raw control characters in {:?}",
            out.stdout
        );
    }

    let json = alice.run(&["history", &conv, "--json"]).await;
    let message: serde_json::Value =
        serde_json::from_str(json.stdout_lines()[1]).expect("a JSON line");
    assert_eq!(message["text"], forged, "--json keeps the text as it is");
}

/// `quip tail --events` prints typing and presence as text lines, like the events around them
/// (as JSON lines with --json).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_events_are_text_lines_unless_json() {
    let daemon = DaemonProcess::start().await;
    let alice = daemon.quip(&daemon.add_user("alice").await).await;
    let bob = alice.with_token(Some(&daemon.add_user("bob").await));
    let created = alice.run(&["conv", "create", "--member", "bob"]).await;
    let conv = created.stdout.trim().to_owned();
    // Alice follows from the start: once the creation is printed she listens, then bob types
    // for a while and sends.
    let mut tail = alice.spawn(&["tail", &conv, "--events", "--after", "0", "--count", "2"]);
    let mut out = tokio::io::BufReader::new(tail.stdout.take().expect("stdout is piped"));
    let mut lines = Vec::new();
    let mut line = String::new();
    within_for(STEP, "the tail's first line", out.read_line(&mut line))
        .await
        .expect("reading the tail");
    lines.push(line.trim_end().to_owned());
    let typing = bob.spawn(&["typing", &conv, "--seconds", "3"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    bob.run(&["send", &conv, "done typing"])
        .await
        .expect_success("bob sends");
    let mut rest = String::new();
    within_for(STEP, "the rest of the tail", out.read_to_string(&mut rest))
        .await
        .expect("reading the tail");
    lines.extend(rest.lines().map(str::to_owned));
    let status = within_for(STEP, "alice's tail", tail.wait())
        .await
        .expect("waiting for the tail");
    assert!(status.success(), "alice's tail: {status}");
    Quip::finish(typing, "bob's typing")
        .await
        .expect_success("quip typing");
    assert!(
        lines.iter().all(|l| !l.starts_with('{')),
        "JSON among the text lines: {lines:?}"
    );
    assert!(lines.iter().any(|l| l == "* bob is typing"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "2 bob: done typing"), "{lines:?}");

    let missing = bob.run(&["typing", "12345", "--seconds", "1"]).await;
    assert_eq!(
        missing.code(),
        Some(1),
        "typing to no conversation is an error"
    );
    assert!(missing.stderr.contains("NOT_FOUND"), "{}", missing.stderr);
}

/// After a restore the saved cursor is from another epoch: `quip --state … tail` says so and
/// follows the conversation from the start (SPEC 9.1 item 8), and the run after that goes on
/// from the new cursor. `--after` past the head is its own, clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_starts_over_after_a_restore_and_says_why() {
    let mut daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    for text in ["one", "two"] {
        alice
            .run(&["send", &conv, text])
            .await
            .expect_success("send");
    }
    let dir = quip_tests::temp_dir();
    let state = dir.path().join("state.json");
    let state_arg = state.to_str().expect("a UTF-8 path");
    alice
        .run(&[
            "--state", state_arg, "tail", &conv, "--after", "0", "--count", "3",
        ])
        .await
        .expect_success("the first tail");

    let data = daemon.data_dir().to_owned();
    let backup = dir.path().join("quip.backup");
    quipd(&["backup", "--data", path(&data), "--out", path(&backup)])
        .await
        .expect_success("quipd backup");
    daemon.kill9();
    let old = data.with_extension("old");
    std::fs::rename(&data, &old).expect("moving the data directory away");
    let restored = quipd(&["restore", "--from", path(&backup), "--data", path(&data)]).await;
    restored.expect_success("quipd restore");
    copy_dir(&old.join("certs"), &data.join("certs"));
    daemon.restart().await;

    let out = alice
        .run(&["--state", state_arg, "tail", &conv, "--count", "1"])
        .await;
    out.expect_success("tail after the restore");
    assert!(
        out.stderr.contains("restored from a backup") && out.stderr.contains("from the start"),
        "{}",
        out.stderr
    );
    assert!(
        out.stdout.starts_with("1 * alice created"),
        "{}",
        out.stdout
    );

    alice
        .run(&["send", &conv, "three"])
        .await
        .expect_success("send");
    let out = alice
        .run(&["--state", state_arg, "tail", &conv, "--count", "1"])
        .await;
    out.expect_success("the tail after that");
    assert_eq!(out.stderr, "", "the cursor is of the new store now");
    assert_eq!(out.stdout, "2 alice: one\n");

    let past = alice.run(&["tail", &conv, "--after", "999"]).await;
    assert_eq!(past.code(), Some(1));
    assert!(
        past.stderr.contains("--after 999 is past the end") && past.stderr.contains("is 4"),
        "{}",
        past.stderr
    );
    assert!(!past.stderr.contains("cursor reset"), "{}", past.stderr);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating the certificate directory");
    for entry in std::fs::read_dir(from).expect("reading the certificate directory") {
        let entry = entry.expect("a directory entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copying a certificate");
    }
}

/// The daemon is SIGKILLed under a running `quip send` whose stdin stays open: quip says once
/// that the connection is lost, gives up after `--give-up-after`, names the lines not stored
/// and exits 1, without waiting for more input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quip_gives_up_when_the_daemon_is_gone_and_says_so() {
    let mut daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let mut command = alice.command(&["--give-up-after", "2", "send", &conv]);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("spawning quip send");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    stdin.write_all(b"one\n").await.expect("writing a line");
    let mut first = String::new();
    within_for(STEP, "the first seq", stdout.read_line(&mut first))
        .await
        .expect("reading quip's stdout");
    assert_eq!(first, "2\n");

    daemon.kill9();
    stdin.write_all(b"two\n").await.expect("writing a line");
    let started = Instant::now();
    // The connection is noticed lost within quip's 10 s idle timeout, then 2 s of reconnecting.
    let status = within_for(Duration::from_secs(40), "quip send giving up", child.wait())
        .await
        .expect("waiting for quip");
    let mut stderr = String::new();
    child
        .stderr
        .as_mut()
        .expect("stderr is piped")
        .read_to_string(&mut stderr)
        .await
        .expect("reading stderr");
    drop(stdin);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(stderr.matches("connection lost").count(), 1, "{stderr}");
    assert!(
        stderr.contains("line 2: gave up after 2 s without progress"),
        "{stderr}"
    );
}

/// The daemon's store fails (a file-size limit makes its writes fail with EFBIG) under a bulk
/// `quip send`: the daemon stops with status 1 rather than serve on a store it cannot trust,
/// and quip prints the lines that were stored, names the ones that were not, gives up after
/// `--give-up-after` and exits 1. The daemon logs the failure a few times, not once per
/// request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_store_stops_the_daemon_and_quip_names_what_was_not_stored() {
    let mut daemon = DaemonProcess::start_with_file_size_limit("", 2048).await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let lines = 200;
    let input: String = (0..lines)
        .map(|n| format!("{n:03} {}\n", "x".repeat(30_000)))
        .collect();
    let out = alice
        .run_with_stdin(&["--give-up-after", "4", "send", &conv], &input)
        .await;
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    let stored = seqs(&out);
    assert!(
        !stored.is_empty() && stored.len() < lines,
        "{} lines stored",
        stored.len()
    );
    assert!(
        out.stderr
            .contains(&format!("to {lines}: gave up after 4 s")),
        "{}",
        out.stderr
    );
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let errors = daemon.log().lines().filter(|l| l.contains("ERROR")).count();
    assert!(
        errors <= 6,
        "{errors} ERROR lines for one store failure:\n{}",
        daemon.log()
    );
}

/// Arguments that would overflow or make no sense are refused with a clear message, never a
/// panic; a usage line never lists options taken from the environment as if required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_refused_clearly() {
    let quip = Quip::new("127.0.0.1:9", "/nonexistent/ca.pem", Some("quip_x")).await;
    for (args, expected) in [
        (
            &["typing", "1", "--seconds", "18446744073709551615"][..],
            "not in 1..=3600",
        ),
        (&["history", "1", "--limit", "0"], "not in 1..=1000"),
        (&["history", "1", "--limit", "1001"], "not in 1..=1000"),
        (
            &["--give-up-after", "18446744073709551615", "conv", "list"],
            "not in 1..=86400",
        ),
        (&["send"], "Usage: quip send [OPTIONS] <CONV> [TEXT]"),
    ] {
        let out = quip.run(args).await;
        assert_eq!(out.code(), Some(2), "quip {args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains(expected),
            "quip {args:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        assert!(!out.stderr.contains("--token <TOKEN>"), "{}", out.stderr);
    }
}

/// The state file: a missing directory is an error at the start, an empty or corrupt file says
/// how to go on, and the file is private (it holds unsent message texts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_and_bad_ones_are_errors_with_the_fix() {
    let daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let dir = quip_tests::temp_dir();
    let nowhere = dir.path().join("missing").join("state.json");
    let out = alice
        .run(&["--state", path(&nowhere), "send", &conv, "x"])
        .await;
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);

    let state = dir.path().join("state.json");
    std::fs::write(&state, "").expect("an empty file");
    let out = alice
        .run(&["--state", path(&state), "send", &conv, "x"])
        .await;
    assert_eq!(out.code(), Some(1));
    assert!(
        out.stderr.contains("is empty") && out.stderr.contains("remove it"),
        "{}",
        out.stderr
    );
    std::fs::write(&state, "{not json").expect("a corrupt file");
    let out = alice
        .run(&["--state", path(&state), "send", &conv, "x"])
        .await;
    assert_eq!(out.code(), Some(1));
    assert!(out.stderr.contains("move it aside"), "{}", out.stderr);

    std::fs::remove_file(&state).expect("removing the state file");
    alice
        .run(&["--state", path(&state), "send", &conv, "x"])
        .await
        .expect_success("send with a new state file");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state)
        .expect("the state file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    assert!(seqs(&alice.run(&["send", &conv, "y"]).await) == [3]);
}

/// Ctrl-C is how `quip tail` is stopped: it exits 130 and closes its connection, so the
/// daemon ends the session at once rather than at its idle timeout (10 s and more), and the
/// user's presence starts its grace period from the moment they left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_ends_quip_tail_and_its_session_at_once() {
    let daemon = DaemonProcess::start().await;
    let (alice, conv) = alice_with_a_conversation(&daemon).await;
    let count = |what: &str| daemon.log().matches(what).count();
    let poll_until = |what: &'static str, n: usize| async move {
        while count(what) < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (connected, disconnected) = (count(": connected"), count(": disconnected"));

    let tail = alice.spawn(&["tail", &conv]);
    within(
        "quip tail connects",
        poll_until(": connected", connected + 1),
    )
    .await;
    let pid = rustix::process::Pid::from_raw(tail.id().expect("a pid") as i32).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let interrupted = Instant::now();
    let out = Quip::finish(tail, "quip tail after Ctrl-C").await;
    assert_eq!(out.code(), Some(130), "stderr: {}", out.stderr);
    within_for(
        Duration::from_secs(5),
        "the daemon ends the session of an interrupted tail",
        poll_until(": disconnected", disconnected + 1),
    )
    .await;
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "the session outlived Ctrl-C by {:?}",
        interrupted.elapsed()
    );
}

/// The mistakes of a first connection say what to fix: a CA file that is not there, an
/// address without a port, and a CA that did not sign the server's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_mistakes_name_the_fix() {
    let daemon = DaemonProcess::start().await;
    let token = daemon.add_user("alice").await;
    let addr = daemon.addr().to_string();
    let ca = daemon.ca_path();
    let ca = ca.to_str().expect("a UTF-8 path");
    let elsewhere = tempfile::tempdir().expect("a temporary directory");
    let other_ca = elsewhere.path().join("ca.pem");
    let made = quipd(&[
        "certs",
        "init",
        "--hostname",
        "localhost",
        "--dir",
        elsewhere.path().to_str().expect("a UTF-8 path"),
    ])
    .await;
    made.expect_success("quipd certs init");
    let other_ca = other_ca.to_str().expect("a UTF-8 path");
    for (server, ca, expected) in [
        (addr.as_str(), "/nonexistent/ca.pem", "QUIP_CA"),
        ("127.0.0.1", ca, "expected HOST:PORT"),
        (addr.as_str(), other_ca, "not signed by the CA in"),
    ] {
        let quip = Quip::new(server, ca, Some(&token)).await;
        let out = quip.run(&["conv", "list"]).await;
        assert_eq!(out.code(), Some(1), "{server} {ca}: {}", out.stderr);
        assert!(
            out.stderr.contains(expected) && out.stderr.lines().count() == 1,
            "{server} {ca}: {}",
            out.stderr
        );
    }
}

/// `quip ... 2>&1 | head` where the pipe is already closed: the error cannot be written, and
/// that is exit status 1, not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_into_a_closed_pipe_is_exit_status_1() {
    let (reader, writer) = rustix::pipe::pipe().expect("a pipe");
    drop(reader);
    let status = std::process::Command::new(&Binaries::get().await.quip)
        .args([
            "--ca",
            "/nonexistent/ca.pem",
            "--token",
            "quip_x",
            "conv",
            "list",
        ])
        .env_remove("QUIP_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer.try_clone().expect("a second end")))
        .stderr(Stdio::from(writer))
        .status()
        .expect("running quip");
    assert_eq!(status.code(), Some(1));
}
