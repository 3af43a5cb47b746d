//! The device commands of the real `quipd` and `quip` executables: `token issue|list|revoke`,
//! `user remove` and `certs client`, with the daemon running (through its admin socket) and
//! without it (on the store).

use std::path::Path;
use std::process::Stdio;

use quip_client::{ClientError, ErrorCode};
use quip_tests::{binaries, temp_dir, within, DaemonProcess, Quip, STEP};

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn quipd(data: &Path, args: &[&str]) -> Out {
    let mut command = tokio::process::Command::new(&quip_tests::Binaries::get().await.quipd);
    command
        .args(args)
        .arg("--data")
        .arg(data)
        .env_remove("QUIPD_DATA")
        .env_remove("QUIPD_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = within(format_args!("quipd {}", args.join(" ")), command.output())
        .await
        .expect("running quipd");
    Out {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn ok(data: &Path, args: &[&str]) -> String {
    let out = quipd(data, args).await;
    assert!(out.ok, "quipd {}: {}", args.join(" "), out.stderr);
    out.stdout
}

/// The id of the one credential of `device` in a `token list`.
fn id_of(listing: &str, device: &str) -> String {
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some(device))
        .unwrap_or_else(|| panic!("no device {device} in\n{listing}"));
    line.split_whitespace().next().expect("an id").to_owned()
}

/// Without a daemon: tokens are issued, listed (never shown again) and revoked on the store,
/// and users removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_commands_work_without_a_daemon() {
    let _ = binaries();
    let dir = temp_dir();
    let data = dir.path().join("data");
    // No daemon has made the store: the first command makes it, when told to.
    let first = ok(&data, &["user", "add", "alice", "--create"]).await;
    let phone = ok(&data, &["token", "issue", "alice", "--device", "phone"]).await;
    let phone = phone.trim().to_owned();
    assert!(phone.starts_with("quip_"), "{phone}");
    let listing = ok(&data, &["token", "list"]).await;
    assert!(listing.starts_with("ID "), "{listing}");
    for token in [first.trim(), &phone] {
        assert!(!listing.contains(&token[5..]), "the listing shows a token");
    }
    assert_eq!(listing.lines().count(), 3, "{listing}");
    let json = ok(&data, &["token", "list", "alice", "--json"]).await;
    assert_eq!(json.lines().count(), 2);
    assert!(json.contains("\"device\":\"phone\""), "{json}");
    let phone_id = id_of(&listing, "phone");
    let revoked = ok(&data, &["token", "revoke", &phone_id]).await;
    assert!(revoked.contains("closed 0 connections"), "{revoked}");
    let again = quipd(&data, &["token", "revoke", &phone_id]).await;
    assert!(
        !again.ok && again.stderr.contains("no token or certificate"),
        "{}",
        again.stderr
    );
    ok(&data, &["user", "add", "carol"]).await;
    let removed = ok(&data, &["user", "remove", "carol"]).await;
    assert!(removed.contains("1 credential revoked"), "{removed}");
    assert_eq!(ok(&data, &["user", "list"]).await.trim(), "alice");
}

/// With the daemon running: a revoked device's `quip tail` ends at once with REVOKED; a
/// certificate made by `quipd certs client` signs `quip` in without a token; `quipd user
/// remove` takes the user out for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_commands_against_a_running_daemon() {
    let daemon = DaemonProcess::start().await;
    let data = daemon.data_dir().to_owned();
    let alice = daemon.add_user("alice").await;
    let bob = daemon.add_user("bob").await;
    let laptop = ok(&data, &["token", "issue", "bob", "--device", "laptop"]).await;
    let laptop = laptop.trim().to_owned();

    let alice_client = daemon.client(&alice).await;
    let conv = alice_client
        .create_conversation("team", &["bob".parse().expect("name")])
        .await
        .expect("create");
    let laptop_client = daemon.client(&laptop).await;
    laptop_client
        .send(conv, "from the laptop")
        .await
        .expect("send");

    let listing = ok(&data, &["token", "list", "bob"]).await;
    let laptop_id = id_of(&listing, "laptop");
    let revoked = ok(&data, &["token", "revoke", &laptop_id]).await;
    assert!(revoked.contains("closed 1 connection\n"), "{revoked}");
    let refused = within(
        "a request after the revocation",
        laptop_client.conversations(),
    )
    .await;
    match refused {
        Err(ClientError::Server(body)) => assert_eq!(body.code, ErrorCode::REVOKED, "{body:?}"),
        Err(ClientError::ConnectionLost(_)) => {}
        other => panic!("the revoked laptop still works: {other:?}"),
    }
    // bob's first device was not touched.
    let bob_client = daemon.client(&bob).await;
    bob_client.send(conv, "from the phone").await.expect("send");

    // A client certificate for bob's tablet.
    let out_dir = temp_dir();
    let out = out_dir.path().to_str().expect("UTF-8 path").to_owned();
    let id = ok(
        &data,
        &[
            "certs", "client", "bob", "--device", "tablet", "--out", &out, "--days", "2",
        ],
    )
    .await;
    let listing = ok(&data, &["token", "list", "bob"]).await;
    assert!(
        listing.contains(id.trim()) && listing.contains("certificate"),
        "{listing}"
    );
    let quip = Quip::new(daemon.addr().to_string(), daemon.ca_path(), None).await;
    let cert = out_dir.path().join("bob-tablet.pem");
    let key = out_dir.path().join("bob-tablet.key");
    let run = quip
        .command(&[
            "--cert",
            cert.to_str().expect("UTF-8"),
            "--key",
            key.to_str().expect("UTF-8"),
            "history",
            &conv.to_string(),
        ])
        .output();
    let output = tokio::time::timeout(STEP, run)
        .await
        .expect("quip history in time")
        .expect("running quip");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("from the phone"),
        "quip with a client certificate: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let removed = ok(&data, &["user", "remove", "bob"]).await;
    assert!(removed.contains("2 credentials revoked"), "{removed}");
    assert!(removed.contains("left 1 conversation\n"), "{removed}");
    let listed = alice_client.conversations().await.expect("list");
    assert_eq!(listed[0].members, ["alice".parse().expect("name")]);
    let again = quipd(&data, &["user", "add", "bob"]).await;
    assert!(
        !again.ok && again.stderr.contains("removed"),
        "{}",
        again.stderr
    );
    let users = ok(&data, &["user", "list"]).await;
    assert_eq!(users.trim(), "alice");
}
