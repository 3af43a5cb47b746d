//! A disk that fills while messages are sent, on both engines: the real daemon stops with an
//! error, and after a restart every acknowledged message is there exactly once, at the seq it
//! was acknowledged with, seqs are gap-free, and the sends that failed go through once.
//!
//! Two ways to fill the disk. Without root: `RLIMIT_FSIZE` set on the running daemon (no file
//! may grow past the limit; the daemon handles SIGXFSZ, so the write fails with EFBIG like a
//! write to a full disk). As root: a small tmpfs under the data directory, enlarged before the
//! restart as an operator would free space. The tmpfs tests say so and pass when they cannot
//! mount (not root), unless `QUIP_REQUIRE_TMPFS` is set, as CI sets it where it can mount one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use futures_util::future::join_all;
use quip_client::{ClientMessageId, EventBody};
use quip_tests::check::{assert_consecutive, full_history};
use quip_tests::{temp_dir, within, within_for, DaemonProcess, BULK};

/// Messages sent; together they are far more than the disk takes.
const MESSAGES: usize = 400;
/// Bytes of each message's text.
const TEXT_BYTES: usize = 30_000;

fn text(i: usize) -> String {
    let head = format!("fill-{i:04}-");
    let body: String = (0..TEXT_BYTES - head.len())
        .map(|n| char::from(b'a' + ((n * 7 + i) % 26) as u8))
        .collect();
    head + &body
}

fn id(i: usize) -> ClientMessageId {
    let mut id = [0x5a; 16];
    id[..8].copy_from_slice(&(i as u64).to_be_bytes());
    ClientMessageId(id)
}

fn config(store: &str) -> String {
    format!("store = \"{store}\"\n")
}

/// How a test fills the disk of a running daemon, and gives the space back.
enum Fault {
    FileSizeLimit(u64),
    Tmpfs(Tmpfs),
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB, or says why it cannot.
    fn mount(mib: u32) -> Result<Tmpfs, String> {
        let dir = temp_dir();
        let mount = dir.path().join("disk");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs { _dir: dir, mount })
    }

    fn resize(&self, mib: u32) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.mount)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "enlarging the tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// Bytes of the largest file under `dir`.
fn largest_file(dir: &Path) -> u64 {
    let mut largest = 0;
    for entry in std::fs::read_dir(dir).expect("reading the data directory") {
        let entry = entry.expect("reading the data directory");
        let meta = entry.metadata().expect("reading a file's metadata");
        largest = largest.max(if meta.is_dir() {
            largest_file(&entry.path())
        } else {
            meta.len()
        });
    }
    largest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_size_limit_during_sends_on_sled_loses_no_acknowledged_message() {
    let daemon = DaemonProcess::start_with_config(&config("sled")).await;
    let limit = largest_file(daemon.data_dir()) + 3 * 1024 * 1024;
    fill_and_recover(daemon, Fault::FileSizeLimit(limit)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_size_limit_during_sends_on_fjall_loses_no_acknowledged_message() {
    let daemon = DaemonProcess::start_with_config(&config("fjall")).await;
    // fjall's journal is 32 MiB from the start (a sparse file): the limit is on the offsets
    // written, which for the journal stay low.
    let limit = 4 * 1024 * 1024;
    fill_and_recover(daemon, Fault::FileSizeLimit(limit)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_tmpfs_during_sends_on_sled_loses_no_acknowledged_message() {
    full_tmpfs("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_tmpfs_during_sends_on_fjall_loses_no_acknowledged_message() {
    full_tmpfs("fjall").await;
}

async fn full_tmpfs(store: &str) {
    let tmpfs = match Tmpfs::mount(6) {
        Ok(tmpfs) => tmpfs,
        // CI sets QUIP_REQUIRE_TMPFS where it can mount one, so that there the check runs.
        Err(why) if std::env::var_os("QUIP_REQUIRE_TMPFS").is_some() => {
            panic!("QUIP_REQUIRE_TMPFS is set but a tmpfs cannot be mounted: {why}")
        }
        Err(why) => {
            eprintln!("skipped: mounting a tmpfs needs root ({why})");
            return;
        }
    };
    let daemon =
        DaemonProcess::start_on(Some(tmpfs.mount.join("data")), Some(&config(store))).await;
    fill_and_recover(daemon, Fault::Tmpfs(tmpfs)).await;
}

/// Sends [`MESSAGES`] large messages, pipelined, until the disk is full and the daemon stops;
/// gives the space back, restarts, and checks what the store holds.
async fn fill_and_recover(mut daemon: DaemonProcess, fault: Fault) {
    let token = daemon.add_user("filler").await;
    let client = daemon.client(&token).await;
    let conv = within(
        "creating a conversation",
        client.create_conversation("fill", &[]),
    )
    .await
    .expect("creating a conversation");
    if let Fault::FileSizeLimit(limit) = &fault {
        let pid = rustix::process::Pid::from_raw(daemon.pid() as i32).expect("a pid");
        let rlimit = rustix::process::Rlimit {
            current: Some(*limit),
            maximum: Some(*limit),
        };
        rustix::process::prlimit(Some(pid), rustix::process::Resource::Fsize, rlimit)
            .expect("setting the daemon's file size limit");
    }

    // Each send resolves with its seq once acknowledged; sends the daemon could not store stay
    // in the SDK's outbox and go again after the restart, with the same ids.
    let sends: Vec<_> = (0..MESSAGES)
        .map(|i| {
            let send = client.send_with_id(conv, id(i), text(i));
            tokio::spawn(send)
        })
        .collect();
    let status = daemon.wait_exit(BULK).await;
    let failed_log = daemon.log();
    assert_eq!(
        status.code(),
        Some(1),
        "quipd should stop with status 1 once its store failed; its log:\n{failed_log}"
    );
    assert!(
        failed_log.contains("store write failed") || failed_log.contains("checkpoint failed"),
        "the log does not say the store failed:\n{failed_log}"
    );
    // What was acknowledged before the daemon stopped.
    let mut acked: HashMap<usize, u64> = HashMap::new();
    let mut pending = Vec::new();
    for (i, send) in sends.into_iter().enumerate() {
        if send.is_finished() {
            let sent = send
                .await
                .expect("a send task panicked")
                .unwrap_or_else(|e| panic!("message {i} was refused for good: {e}"));
            acked.insert(i, sent.seq.0);
        } else {
            pending.push((i, send));
        }
    }
    eprintln!(
        "{} of {MESSAGES} messages acknowledged before the store failed",
        acked.len()
    );
    assert!(
        !acked.is_empty() && !pending.is_empty(),
        "the disk filled after {} of {MESSAGES} acks: the test did not fill it mid-way",
        acked.len()
    );

    if let Fault::Tmpfs(tmpfs) = &fault {
        tmpfs.resize(64);
    }
    daemon.restart().await;
    let recovered = daemon.log();
    // The outbox goes again: every message is acknowledged once the daemon is back.
    let rest = within_for(
        BULK,
        "the sends left in the outbox",
        join_all(pending.into_iter().map(|(i, send)| async move {
            let sent = send
                .await
                .expect("a send task panicked")
                .unwrap_or_else(|e| panic!("message {i} failed after the restart: {e}"));
            (i, sent.seq.0)
        })),
    )
    .await;
    let fresh = daemon.client(&token).await;
    let history = full_history(&fresh, conv).await;
    check_history(&history, &acked, &rest, &recovered);

    // New sends go on right after the head.
    let head = history.last().map_or(0, |e| e.seq.0);
    let next = within("a send after the recovery", fresh.send(conv, "after"))
        .await
        .expect("a send after the recovery");
    assert_eq!(
        next.seq.0,
        head + 1,
        "the first new send after the recovery"
    );
    drop(client);
}

/// Every message exactly once, acknowledged ones at their acknowledged seq, seqs gap-free.
fn check_history(
    history: &[quip_client::Event],
    acked: &HashMap<usize, u64>,
    rest: &[(usize, u64)],
    log: &str,
) {
    assert_consecutive(
        "history after the recovery",
        history.iter().map(|e| e.seq.0),
        1,
    );
    let mut at: HashMap<usize, u64> = HashMap::new();
    for event in history {
        let EventBody::Message { text, .. } = &event.body else {
            continue;
        };
        let i: usize = text
            .strip_prefix("fill-")
            .and_then(|t| t.get(..4))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("seq {}: an unexpected text", event.seq.0));
        assert_eq!(
            text,
            &self::text(i),
            "seq {}: the text of message {i}",
            event.seq.0
        );
        if let Some(first) = at.insert(i, event.seq.0) {
            panic!(
                "message {i} is stored twice: at {first} and {}",
                event.seq.0
            );
        }
    }
    for (i, seq) in acked {
        assert_eq!(
            at.get(i),
            Some(seq),
            "message {i} was acknowledged at seq {seq} before the disk filled; the restarted \
             daemon's log:\n{log}"
        );
    }
    for (i, seq) in rest {
        assert_eq!(
            at.get(i),
            Some(seq),
            "message {i}, acknowledged after the restart"
        );
    }
    assert_eq!(at.len(), MESSAGES, "messages in the history");
}
