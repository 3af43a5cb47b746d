//! The `quipd` commands an operator types, where they can go wrong: a mistyped data directory,
//! a tokens file that cannot be written, a daemon that does not answer, commands run at once,
//! a configuration out of range, a bad RUST_LOG, and arguments that would overflow.

use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Stdio};
use std::time::{Duration, Instant};

use quipd::server::store_dir;
use quipd::store::{Store, StoreConfig};

use crate::harness::process::{command, quipd, stderr, stdout, Child};

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A `quipd serve` on `data` with text logs, and its log.
fn serve(data: &Path, env: &[(&str, &str)]) -> (Child, ChildStderr) {
    let mut command = command(&["serve", "--listen", "127.0.0.1:0", "--data", s(data)]);
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = Child::spawn(&mut command);
    let stderr = child.0.stderr.take().unwrap();
    child.wait_for_admin_socket(data);
    (child, stderr)
}

/// Without a daemon, a data directory that holds no store (mistyped, or never served) is an
/// error that names it and how to make one; nothing is created there. `user add --create`
/// makes the store when that is what is wanted.
#[test]
fn offline_commands_refuse_a_directory_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(store_dir(&empty)).unwrap();
    let out_file = dir.path().join("x.bak");
    for data in [&typo, &empty] {
        for args in [
            vec!["user", "list"],
            vec!["user", "add", "bob"],
            vec!["token", "list"],
            vec!["backup", "--out", s(&out_file)],
        ] {
            let mut args = args.clone();
            args.extend(["--data", s(data)]);
            let out = quipd(&args);
            let err = stderr(&out);
            assert!(!out.status.success(), "quipd {args:?} succeeded");
            assert!(
                err.contains("holds no quip store")
                    && err.contains(s(data))
                    && err.contains("quipd serve --data"),
                "quipd {args:?}: {err}"
            );
        }
    }
    assert!(!typo.exists(), "a mistyped data directory was created");
    assert!(!out_file.exists(), "an empty backup was written");

    let out = quipd(&["user", "add", "bob", "--create", "--data", s(&typo)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("quip_"));
    let out = quipd(&["user", "list", "--data", s(&typo)]);
    assert_eq!(stdout(&out), "bob\n");
}

/// `--tokens-out` that cannot be written creates no user; one that can is written 0600.
#[test]
fn tokens_out_is_checked_before_any_user_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = ["user", "add", "--data", s(&data)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        all.extend(extra.iter().map(|a| a.to_string()));
        all
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        quipd(&args)
    };
    assert!(run(args(&["alice", "--create"])).status.success());
    let nowhere = dir.path().join("missing").join("tokens.txt");
    let out = run(args(&[
        "--count",
        "2",
        "--prefix",
        "tok",
        "--tokens-out",
        s(&nowhere),
    ]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no user was created"),
        "{}",
        stderr(&out)
    );
    let listed = quipd(&["user", "list", "--data", s(&data)]);
    assert_eq!(
        stdout(&listed),
        "alice\n",
        "users were created without their tokens"
    );

    let tokens = dir.path().join("tokens.txt");
    let out = run(args(&[
        "--count",
        "2",
        "--prefix",
        "tok",
        "--tokens-out",
        s(&tokens),
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    let written = std::fs::read_to_string(&tokens).unwrap();
    assert_eq!(written.lines().count(), 2, "{written}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&tokens).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

/// A daemon that is stopped (SIGSTOP) does not hang an admin command: it fails after
/// `--timeout` and says the request may still take effect, and how to get a token then.
#[test]
fn a_daemon_that_does_not_answer_fails_the_command_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (daemon, _stderr) = serve(&data, &[]);
    daemon.signal("STOP");
    let started = Instant::now();
    let out = quipd(&[
        "user",
        "add",
        "frozen",
        "--timeout",
        "1",
        "--data",
        s(&data),
    ]);
    let waited = started.elapsed();
    daemon.signal("CONT");
    assert!(!out.status.success());
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    let err = stderr(&out);
    assert!(
        err.contains("did not answer") && err.contains("quipd token issue"),
        "{err}"
    );
}

/// Commands run at once with the daemon stopped wait for each other's hold on the store; one
/// held for longer than the timeout is named as another command, not as a running daemon.
#[test]
fn offline_commands_at_once_wait_for_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(
        quipd(&["user", "add", "first", "--create", "--data", s(&data)])
            .status
            .success()
    );
    let children: Vec<_> = (0..8)
        .map(|n| {
            command(&["user", "add", &format!("user{n}"), "--data", s(&data)])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let listed = quipd(&["user", "list", "--data", s(&data)]);
    assert_eq!(stdout(&listed).lines().count(), 9, "{}", stdout(&listed));

    // This process holds the store: the command names another command, not a daemon.
    let config = StoreConfig::existing(store_dir(&data), 8 * 1024 * 1024).unwrap();
    let store = Store::open(&config).unwrap();
    let out = quipd(&["user", "list", "--timeout", "1", "--data", s(&data)]);
    drop(store);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("another quipd command") && !err.contains("already running"),
        "{err}"
    );
}

/// check-config refuses values out of range with the file, the line and the key, before
/// `serve` would make anything; it says a missing file's OS error once; it prints every
/// setting, in the file's spelling.
#[test]
fn check_config_checks_ranges_by_line_and_prints_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quipd.toml");
    std::fs::write(&path, "[limits]\nidle_timeout_ms = 18446744073709551615\n").unwrap();
    let out = quipd(&["check-config", s(&path)]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("{}: line 2: `limits.idle_timeout_ms`: ", s(&path))),
        "{}",
        stderr(&out)
    );
    let data = dir.path().join("data");
    let out = quipd(&["serve", "--config", s(&path), "--data", s(&data)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`limits.idle_timeout_ms`"));
    assert!(
        !data.exists(),
        "serve made the data directory before refusing"
    );

    let missing = dir.path().join("missing.toml");
    let err = stderr(&quipd(&["check-config", s(&missing)]));
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");

    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/quipd.toml");
    let out = quipd(&["check-config", s(&example)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    for line in [
        "limits.presence_grace_ms = 15000",
        "limits.datagrams_in_per_sec = 20",
        "limits.datagrams_out_burst = 400",
        "limits.typing_relay_interval_ms = 1000",
        "log.format = text",
        "push.preview = sender",
        "retention.keep_days = 0",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "no {line:?} in\n{printed}"
        );
    }
    // Client certificates are on, against the CA the first start makes ("... (made on the
    // first start)" until then), not "off".
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("tls.client_ca = /var/lib/quipd/certs/ca.pem")),
        "{printed}"
    );
}

/// A RUST_LOG that does not parse is warned about and the configured filter used (before, it
/// silenced every line); logs written to a pipe carry no colour codes.
#[test]
fn a_bad_rust_log_falls_back_to_the_configured_filter_without_colours() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (daemon, stderr) = serve(&data, &[("RUST_LOG", "[[[bad")]);
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if lines.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.iter().any(|l: &String| l.contains("quipd ready")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => log.push(line),
            Err(_) => panic!("no ready line in the log: {log:?}"),
        }
    }
    drop(daemon);
    let log = log.join("\n");
    assert!(log.contains("RUST_LOG is not a valid filter"), "{log}");
    assert!(
        log.contains(" INFO "),
        "info lines of the configured filter: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log that is a pipe: {log:?}"
    );
}

/// Arguments that would overflow are refused by the argument parser, never a panic; restore
/// says how its count of records relates to the backup's.
#[test]
fn bad_arguments_are_refused_and_restore_counts_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(
        quipd(&["user", "add", "alice", "--create", "--data", s(&data)])
            .status
            .success()
    );
    for args in [
        vec![
            "certs",
            "client",
            "alice",
            "--device",
            "d",
            "--days",
            "4294967295",
        ],
        vec!["user", "add", "--count", "0", "--prefix", "p"],
        vec!["user", "add", "--count", "4294967295", "--prefix", "p"],
        vec!["serve", "--cache-mb", "18446744073709551615"],
        vec!["user", "list", "--timeout", "0"],
    ] {
        let mut args = args.clone();
        args.extend(["--data", s(&data)]);
        let out = quipd(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "quipd {args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }

    let backup = dir.path().join("quip.backup");
    let out = quipd(&["backup", "--data", s(&data), "--out", s(&backup)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let records = |text: &str, before: &str| -> u64 {
        let at = text
            .find(before)
            .unwrap_or_else(|| panic!("{before:?} in {text:?}"));
        text[..at]
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count before {before:?} in {text:?}"))
    };
    let backed_up = records(&stdout(&out), " records");
    let restored_dir = dir.path().join("restored");
    let out = quipd(&["restore", "--from", s(&backup), "--data", s(&restored_dir)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let said = stdout(&out);
    assert!(
        said.contains(&format!("of the backup's {backed_up} records")),
        "{said}"
    );
}

/// What a command prints goes to a pipe that may be closed (`quipd token list | head -1`):
/// that is one error line and exit 1, never a panic.
#[test]
fn output_to_a_closed_pipe_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    assert!(
        quipd(&["user", "add", "alice", "--create", "--data", s(&data)])
            .status
            .success()
    );
    let config = dir.path().join("quipd.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", s(&data))).unwrap();
    for args in [
        vec!["user", "list", "--data", s(&data)],
        vec!["token", "list", "--data", s(&data)],
        vec!["user", "add", "bob", "--data", s(&data)],
        vec!["check-config", s(&config)],
    ] {
        // The reading end is closed before the command starts, so its first write fails.
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        drop(reader);
        let out = command(&args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "quipd {args:?}: {err}");
        assert!(
            err.contains("writing output") && !err.contains("panicked"),
            "quipd {args:?}: {err}"
        );

        // Both outputs on the closed pipe (`quipd ... 2>&1 | head`): the error cannot be
        // written either, and that is still exit status 1, not a panic's 101.
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        drop(reader);
        let status = command(&args)
            .stdout(Stdio::from(writer.try_clone().unwrap()))
            .stderr(Stdio::from(writer))
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "quipd {args:?} 2>&1 into a closed pipe"
        );
    }
}

/// `certs client` whose files cannot be written registers nothing: a certificate whose key
/// nobody has would be a working credential nobody can use or knows to revoke. A `restore`
/// that fails leaves no data directory behind.
#[test]
fn failed_commands_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out_dir = dir.path().join("client-certs");
    let certs = |extra: &[&str]| {
        let mut args = vec!["certs", "client", "alice", "--device", "phone"];
        args.extend(["--out", s(&out_dir), "--data", s(&data)]);
        args.extend(extra);
        quipd(&args)
    };
    let credentials = || -> Vec<serde_json::Value> {
        let out = quipd(&["token", "list", "alice", "--json", "--data", s(&data)]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    // The CA comes from the development PKI of a first start.
    let mut daemon = serve(&data, &[]).0;
    assert!(quipd(&["user", "add", "alice", "--data", s(&data)])
        .status
        .success());
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();

    let first = certs(&[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let key = std::fs::read(out_dir.join("alice-phone.key")).unwrap();
    assert_eq!(credentials().len(), 2, "a token and a certificate");

    let again = certs(&[]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists") && !stderr(&again).contains("registered"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        credentials().len(),
        2,
        "the refused certificate was registered"
    );
    assert_eq!(std::fs::read(out_dir.join("alice-phone.key")).unwrap(), key);

    let unknown = quipd(&[
        "certs",
        "client",
        "nobody",
        "--device",
        "x",
        "--out",
        s(&out_dir),
        "--data",
        s(&data),
    ]);
    assert!(!unknown.status.success());
    assert!(
        !out_dir.join("nobody-x.pem").exists() && !out_dir.join("nobody-x.key").exists(),
        "files of a certificate that was not registered were left"
    );

    let restored = dir.path().join("restored");
    let missing = dir.path().join("no.backup");
    let out = quipd(&["restore", "--from", s(&missing), "--data", s(&restored)]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(s(&missing)), "{}", stderr(&out));
    assert!(
        !restored.exists(),
        "a failed restore left {}",
        restored.display()
    );
}
