//! A fault-injecting UDP relay for loopback tests.
//!
//! Clients talk to the relay's address; the relay forwards each datagram to the daemon and back,
//! through its own upstream socket per client (so the daemon sees one address per client, as it
//! would across a real network). On the way it can drop, duplicate, delay and reorder packets,
//! and cut the path entirely for a while. Every decision comes from one seeded random generator,
//! so a failing run names the seed that reproduces its fault pattern.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// What the relay does to packets, in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// Probability that a packet is dropped.
    pub drop: f64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Probability that a packet is held back by up to `reorder_by`, letting later ones pass.
    pub reorder: f64,
    pub reorder_by: Duration,
    /// Added to every packet.
    pub delay: Duration,
}

impl Faults {
    /// A lossy, jittery path: 5% loss, 2% duplicates, 10% reordered by up to 20 ms.
    pub fn lossy() -> Faults {
        Faults {
            drop: 0.05,
            duplicate: 0.02,
            reorder: 0.10,
            reorder_by: Duration::from_millis(20),
            delay: Duration::ZERO,
        }
    }
}

/// Counters of what the relay did.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
}

/// What happens to one packet.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Drop,
    Forward { after: Duration, copies: u8 },
}

/// The relay's mutable settings and its random generator.
#[derive(Debug)]
struct Control {
    faults: Faults,
    cut_until: Option<Instant>,
    rng: StdRng,
}

impl Control {
    fn fate(&mut self, now: Instant) -> Fate {
        if self.cut_until.is_some_and(|until| now < until) {
            return Fate::Drop;
        }
        let faults = self.faults;
        if self.rng.random_bool(faults.drop.clamp(0.0, 1.0)) {
            return Fate::Drop;
        }
        let mut after = faults.delay;
        if faults.reorder_by > Duration::ZERO
            && self.rng.random_bool(faults.reorder.clamp(0.0, 1.0))
        {
            after += faults.reorder_by.mul_f64(self.rng.random::<f64>());
        }
        let copies = if self.rng.random_bool(faults.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        Fate::Forward { after, copies }
    }
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    control: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
    tasks: JoinSet<()>,
}

fn lock(control: &Mutex<Control>) -> std::sync::MutexGuard<'_, Control> {
    control.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Starts a relay on a loopback port that forwards to `upstream`.
    pub async fn start(upstream: SocketAddr, faults: Faults, seed: u64) -> Relay {
        let socket = Arc::new(
            UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("binding the relay's socket"),
        );
        let addr = socket.local_addr().expect("relay address");
        let control = Arc::new(Mutex::new(Control {
            faults,
            cut_until: None,
            rng: StdRng::seed_from_u64(seed),
        }));
        let stats = Arc::new(RelayStats::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(run(socket, upstream, control.clone(), stats.clone()));
        Relay {
            addr,
            control,
            stats,
            tasks,
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_faults(&self, faults: Faults) {
        lock(&self.control).faults = faults;
    }

    /// Drops every packet, both ways, for `duration` from now.
    pub fn cut(&self, duration: Duration) {
        lock(&self.control).cut_until = Some(Instant::now() + duration);
    }

    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Forwards client packets upstream, creating one upstream socket (and its return path) per
/// client address.
async fn run(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    control: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
) {
    let mut paths: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut returns = JoinSet::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((len, client)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let path = match paths.get(&client) {
            Some(path) => path.clone(),
            None => {
                let Ok(path) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                let path = Arc::new(path);
                returns.spawn(run_return(
                    path.clone(),
                    socket.clone(),
                    client,
                    control.clone(),
                    stats.clone(),
                ));
                paths.insert(client, path.clone());
                path
            }
        };
        let fate = lock(&control).fate(Instant::now());
        send(fate, path, upstream, buf[..len].to_vec(), &stats);
    }
}

/// Forwards the daemon's packets for one client back to it.
async fn run_return(
    path: Arc<UdpSocket>,
    socket: Arc<UdpSocket>,
    client: SocketAddr,
    control: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok((len, _)) = path.recv_from(&mut buf).await {
        let fate = lock(&control).fate(Instant::now());
        send(fate, socket.clone(), client, buf[..len].to_vec(), &stats);
    }
}

fn send(fate: Fate, via: Arc<UdpSocket>, to: SocketAddr, packet: Vec<u8>, stats: &RelayStats) {
    let (after, copies) = match fate {
        Fate::Drop => {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Fate::Forward { after, copies } => (after, copies),
    };
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    if copies > 1 {
        stats.duplicated.fetch_add(1, Ordering::Relaxed);
    }
    if after.is_zero() {
        for _ in 0..copies {
            let _ = via.try_send_to(&packet, to);
        }
        return;
    }
    stats.reordered.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        for _ in 0..copies {
            let _ = via.send_to(&packet, to).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control(faults: Faults, seed: u64) -> Control {
        Control {
            faults,
            cut_until: None,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_fates() {
        let now = Instant::now();
        let fates = |seed| {
            let mut c = control(Faults::lossy(), seed);
            (0..500).map(|_| c.fate(now)).collect::<Vec<_>>()
        };
        assert_eq!(fates(7), fates(7));
        assert_ne!(fates(7), fates(8));
    }

    #[test]
    fn rates_are_roughly_the_configured_ones() {
        let now = Instant::now();
        let mut c = control(
            Faults {
                drop: 0.2,
                ..Faults::default()
            },
            1,
        );
        let dropped = (0..10_000).filter(|_| c.fate(now) == Fate::Drop).count();
        assert!(
            (1_700..2_300).contains(&dropped),
            "{dropped} of 10000 dropped at 20%"
        );
    }

    #[test]
    fn a_cut_drops_everything_until_it_ends() {
        let now = Instant::now();
        let mut c = control(Faults::default(), 1);
        c.cut_until = Some(now + Duration::from_secs(1));
        assert!((0..100).all(|_| c.fate(now) == Fate::Drop));
        let later = now + Duration::from_secs(2);
        assert!((0..100).all(|_| c.fate(later) != Fate::Drop));
    }
}
