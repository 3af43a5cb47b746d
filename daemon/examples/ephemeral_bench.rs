//! Measures the ephemeral plane of an in-process daemon over loopback QUIC:
//!
//! - `latency`: one typing datagram at a time from A to B through the daemon, each sent once
//!   the previous one arrived; prints p50/p99/max of send-to-receive time.
//! - `rate`: every member of one conversation sends typing datagrams as fast as it can; prints
//!   how many datagrams per second the daemon relays and the receivers get.
//!
//! The daemon's rate limits and relay interval are lifted for the run (the defaults would cap
//! each connection at 20 datagrams a second). Daemon and clients share this process and the
//! machine's cores.
//!
//! ```sh
//! cargo run --release -p quipd --example ephemeral_bench -- latency 1000
//! cargo run --release -p quipd --example ephemeral_bench -- rate 8 5
//! ```

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a measuring tool, not library code

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig, ConversationId, EphemeralEvent, UserName};
use quipd::admin::{AdminRequest, AdminResponse};
use quipd::presence::{EphemeralLimits, EphemeralStats};
use quipd::{Server, ServerConfig};

struct Bench {
    data: tempfile::TempDir,
    addr: std::net::SocketAddr,
    stats: Arc<EphemeralStats>,
}

impl Bench {
    async fn start() -> Bench {
        let data = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(data.path(), "127.0.0.1:0".parse().unwrap());
        config.limits.ephemeral = EphemeralLimits {
            datagrams_in_per_sec: 10_000_000,
            datagrams_in_burst: 1_000_000,
            datagrams_out_per_sec: 10_000_000,
            datagrams_out_burst: 1_000_000,
            typing_relay_interval: Duration::ZERO,
            ..EphemeralLimits::default()
        };
        let server = Server::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let stats = server.ephemeral_stats();
        tokio::spawn(server.run(std::future::pending()));
        Bench { data, addr, stats }
    }

    async fn client(&self, name: &str) -> Client {
        let request = AdminRequest::UserAdd { name: name.into() };
        let token = match quipd::admin::run(self.data.path(), request).await.unwrap() {
            AdminResponse::UserAdded { token, .. } => token,
            other => panic!("user add: {other:?}"),
        };
        let ca = self.data.path().join("certs/ca.pem");
        let config = ClientConfig::from_ca_file(self.addr.to_string(), ca, token).unwrap();
        Client::connect(config).await.unwrap()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn latency(count: usize) {
    let bench = Bench::start().await;
    let a = bench.client("alice").await;
    let b = bench.client("bob").await;
    let conv = a
        .create_conversation("bench", &["bob".parse().unwrap()])
        .await
        .unwrap();
    let mut events = b.ephemeral_events();
    let mut samples = Vec::with_capacity(count);
    let mut lost = 0;
    // Warm-up rounds are not counted. Typing and stop alternate: each is a change the daemon
    // relays at once (a repeated `Typing` would be absorbed by the relay interval otherwise).
    for i in 0..count + 50 {
        let started = Instant::now();
        let typing = i % 2 == 0;
        if typing {
            a.typing(conv).unwrap();
        } else {
            a.stop_typing(conv).unwrap();
        }
        let arrived = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match events.next().await {
                    Some(EphemeralEvent::Typing { .. }) if typing => return,
                    Some(EphemeralEvent::StoppedTyping { .. }) if !typing => return,
                    Some(_) => {}
                    None => panic!("connection lost"),
                }
            }
        })
        .await;
        match arrived {
            Ok(()) if i >= 50 => samples.push(started.elapsed()),
            Ok(()) => {}
            Err(_) => lost += 1,
        }
    }
    samples.sort();
    println!(
        "typing relay A -> daemon -> B, {} datagrams ({lost} lost): p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples.last().unwrap(),
    );
}

async fn rate(members: usize, seconds: u64) {
    let bench = Bench::start().await;
    let mut clients = Vec::new();
    for i in 0..members {
        clients.push(bench.client(&format!("u{i}")).await);
    }
    let others: Vec<UserName> = (1..members)
        .map(|i| format!("u{i}").parse().unwrap())
        .collect();
    let conv: ConversationId = clients[0]
        .create_conversation("bench", &others)
        .await
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let mut tasks = Vec::new();
    for client in &clients {
        let mut events = client.ephemeral_events();
        let received = received.clone();
        tokio::spawn(async move {
            while events.next().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
        let client = client.clone();
        let running = running.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while running.load(Ordering::Relaxed) {
                for _ in 0..32 {
                    let _ = client.typing(conv);
                    let _ = client.stop_typing(conv);
                    sent += 2;
                }
                tokio::task::yield_now().await;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await; // warm up
    let (r0, s0) = (
        received.load(Ordering::Relaxed),
        EphemeralStats::get(&bench.stats.sent),
    );
    let in0 = EphemeralStats::get(&bench.stats.received);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (r1, s1) = (
        received.load(Ordering::Relaxed),
        EphemeralStats::get(&bench.stats.sent),
    );
    let in1 = EphemeralStats::get(&bench.stats.received);
    running.store(false, Ordering::Relaxed);
    let mut offered = 0;
    for task in tasks {
        offered += task.await.unwrap();
    }
    println!(
        "{members} members, each typing as fast as it can for {seconds} s: the daemon received \
         {:.0} datagrams/s and sent {:.0} datagrams/s; receivers got {:.0}/s \
         (clients offered {offered} datagrams in all; busy drops {}, unsendable {})",
        (in1 - in0) as f64 / elapsed,
        (s1 - s0) as f64 / elapsed,
        (r1 - r0) as f64 / elapsed,
        EphemeralStats::get(&bench.stats.busy),
        EphemeralStats::get(&bench.stats.unsendable),
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("latency") => latency(arg(1, 1000) as usize).await,
        Some("rate") => rate(arg(1, 8) as usize, arg(2, 5)).await,
        _ => eprintln!("usage: ephemeral_bench latency [COUNT] | rate [MEMBERS] [SECONDS]"),
    }
}
