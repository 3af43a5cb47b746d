//! A client rides through `kill -9` of the daemon: it reconnects by itself, resumes its
//! subscription from its cursor and re-sends what was not acknowledged.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig, EventBody, Seq, StartAt};

use crate::harness::process::{add_user, command, Child, WAIT};

fn free_udp_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A daemon on `addr`, the same address after a restart, logging to this test's stderr.
fn spawn_daemon(data: &Path, addr: SocketAddr) -> Child {
    let mut command = command(&[
        "serve",
        "--listen",
        &addr.to_string(),
        "--data",
        data.to_str().unwrap(),
    ]);
    command.stdout(Stdio::null()).stderr(Stdio::inherit());
    // Its log is for whoever runs the test: let RUST_LOG reach it, as it reaches the client.
    if let Some(filter) = std::env::var_os("RUST_LOG") {
        command.env("RUST_LOG", filter);
    }
    let daemon = Child::spawn(&mut command);
    daemon.wait_for_admin_socket(data);
    daemon
}

async fn client(addr: SocketAddr, data: &Path, token: &str) -> Client {
    let mut config =
        ClientConfig::from_ca_file(addr.to_string(), data.join("certs/ca.pem"), token).unwrap();
    config.reconnect_max = Duration::from_millis(500);
    Client::connect(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_and_sender_ride_through_kill_9() {
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
