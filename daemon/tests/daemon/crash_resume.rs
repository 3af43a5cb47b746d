//! A client rides through `kill -9` of the daemon: it reconnects by itself, resumes its
//! subscription from its cursor and re-sends what was not acknowledged.

#![allow(clippy::unwrap_used)] // test harness code: a failed unwrap is a failed test

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig, EventBody, Seq, StartAt};

const WAIT: Duration = Duration::from_secs(30);

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn quipd(args: &[&str], data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_quipd"));
    command.args(args).arg("--data").arg(data);
    command
}

/// A daemon process, killed when dropped so a failed test leaves nothing running.
struct Daemon(Child);

impl Daemon {
    fn kill9(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(data: &Path, addr: SocketAddr) -> Daemon {
    let child = quipd(&["serve", "--listen", &addr.to_string()], data)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !data.join("admin.sock").exists() {
        assert!(Instant::now() < deadline, "quipd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn add_user(data: &Path, name: &str) -> String {
    let out = quipd(&["user", "add", name], data).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn client(addr: SocketAddr, data: &Path, token: &str) -> Client {
    let mut config =
        ClientConfig::from_ca_file(addr.to_string(), data.join("certs/ca.pem"), token).unwrap();
    config.reconnect_max = Duration::from_millis(500);
    Client::connect(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_and_sender_ride_through_kill_9() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let addr = free_udp_port();
    let mut daemon = spawn_daemon(data, addr);
    let alice_token = add_user(data, "alice");
    let bob_token = add_user(data, "bob");
    let alice = client(addr, data, &alice_token).await;
    let bob = client(addr, data, &bob_token).await;
    let conv = alice
        .create_conversation("crash", &["bob".parse().unwrap()])
        .await
        .unwrap();
    let mut feed = bob.subscribe(conv, StartAt::Beginning).await.unwrap();

    let mut acked = Vec::new();
    for n in 0..20 {
        acked.push(alice.send(conv, format!("before {n}")).await.unwrap().seq);
    }
    daemon.kill9();
    // Sends made while the daemon is down wait in the outbox.
    let pending: Vec<_> = (0..20)
        .map(|n| alice.send(conv, format!("after {n}")))
        .collect();
    let _daemon = spawn_daemon(data, addr);
    let started = Instant::now();
    for send in pending {
        acked.push(tokio::time::timeout(WAIT, send).await.unwrap().unwrap().seq);
    }
    let mut texts = Vec::new();
    while texts.len() < 40 {
        let event = tokio::time::timeout(WAIT, feed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let EventBody::Message { text, .. } = event.body {
            texts.push((event.seq, text));
        }
    }
    eprintln!("recovered in {:?}", started.elapsed());
    let expected: Vec<String> = (0..20)
        .map(|n| format!("before {n}"))
        .chain((0..20).map(|n| format!("after {n}")))
        .collect();
    assert_eq!(
        texts.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        expected
    );
    let seqs: Vec<Seq> = texts.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, acked, "delivered seqs are the acked ones");
    assert_eq!(
        seqs,
        (2..=41).map(Seq).collect::<Vec<_>>(),
        "gap-free after Created"
    );
    assert!(alice.connections() >= 2 && bob.connections() >= 2);
}
