//! Presence, and the delivery of every ephemeral DATAGRAM (typing, presence) to connections.
//!
//! One actor owns the presence state ([`board::PresenceBoard`]: devices per user, grace timers,
//! last seen) and the datagram side of every connection (a [`DeviceSink`] per connected
//! device, with its outgoing rate limit). Sessions tell it about connects, disconnects and
//! away flags; conversation actors hand it typing datagrams to relay to their members
//! ([`PresenceHandle::relay`]). Nothing here touches the store's write path: presence is never
//! persisted.
//!
//! Nothing here ever waits on a client: a datagram that cannot go out now (the connection's
//! rate limit, its datagram size, the actor's queue) is dropped and counted.

pub mod board;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quip_protocol::{encode_datagram, PresenceInfo, ServerDatagram, UserName};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::rate_limit::TokenBucket;
use crate::store::{Store, StoreError};
pub use board::DeviceId;
use board::PresenceBoard;

/// Connects, disconnects, away flags and snapshots waiting for the actor. Senders wait when it
/// is full (these are rare and must not be lost).
const CONTROL_QUEUE: usize = 1024;
/// Relays waiting for the actor. When full, new relays are dropped: typing is perishable.
const RELAY_QUEUE: usize = 4096;

/// Limits of the ephemeral plane, per connection. Datagrams over a limit are dropped and
/// counted, never queued.
#[derive(Clone, Debug)]
pub struct EphemeralLimits {
    /// How long a user whose last device disconnected still shows as online (or away).
    pub presence_grace: Duration,
    /// Datagrams a connection may send per second, on average...
    pub datagrams_in_per_sec: u32,
    /// ...and in one burst.
    pub datagrams_in_burst: u32,
    /// Datagrams the server sends one connection per second, on average...
    pub datagrams_out_per_sec: u32,
    /// ...and in one burst.
    pub datagrams_out_burst: u32,
    /// A user's repeated `Typing` in one conversation is relayed at most this often.
    pub typing_relay_interval: Duration,
}

impl Default for EphemeralLimits {
    fn default() -> Self {
        EphemeralLimits {
            presence_grace: Duration::from_secs(15),
            datagrams_in_per_sec: 20,
            datagrams_in_burst: 40,
            datagrams_out_per_sec: 200,
            datagrams_out_burst: 400,
            typing_relay_interval: Duration::from_secs(1),
        }
    }
}

/// Counters of the ephemeral plane, for metrics and tests.
#[derive(Debug, Default)]
pub struct EphemeralStats {
    /// Datagrams received from clients.
    pub received: AtomicU64,
    /// ...dropped because they did not decode (or were too long).
    pub malformed: AtomicU64,
    /// ...dropped by the connection's incoming rate limit.
    pub rate_limited_in: AtomicU64,
    /// ...dropped because the sender is not a member of the conversation (or it does not exist).
    pub not_member: AtomicU64,
    /// ...dropped because a conversation's or the presence actor's queue was full.
    pub busy: AtomicU64,
    /// Datagrams sent to clients.
    pub sent: AtomicU64,
    /// ...dropped by the receiving connection's outgoing rate limit.
    pub rate_limited_out: AtomicU64,
    /// ...dropped because the connection takes no datagrams, or none this large.
    pub unsendable: AtomicU64,
    /// Presence changes broadcast.
    pub presence_changes: AtomicU64,
}

impl EphemeralStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A datagram to hand to every connected device of some users.
#[derive(Debug)]
pub struct Relay {
    pub to: Vec<UserName>,
    pub datagram: Bytes,
}

#[derive(Debug)]
enum Control {
    Connect {
        device: DeviceId,
        user: UserName,
        conn: quinn::Connection,
    },
    Disconnect {
        device: DeviceId,
    },
    Away {
        device: DeviceId,
        away: bool,
        done: oneshot::Sender<()>,
    },
    Snapshot {
        users: Vec<UserName>,
        reply: oneshot::Sender<Vec<PresenceInfo>>,
    },
    Connected {
        users: Vec<UserName>,
        reply: oneshot::Sender<Vec<UserName>>,
    },
}

/// The cheap, cloneable handle to the presence actor.
#[derive(Clone, Debug)]
pub struct PresenceHandle {
    control: mpsc::Sender<Control>,
    relays: mpsc::Sender<Relay>,
    next_device: Arc<AtomicU64>,
    stats: Arc<EphemeralStats>,
}

impl PresenceHandle {
    /// Starts the actor.
    pub fn start(store: Store, limits: EphemeralLimits) -> Self {
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let (relays, relays_rx) = mpsc::channel(RELAY_QUEUE);
        let stats = Arc::new(EphemeralStats::default());
        let now = Instant::now();
        let actor = PresenceActor {
            board: PresenceBoard::new(limits.presence_grace, (now, crate::conversation::now_ms())),
            sinks: HashMap::new(),
            store,
            limits,
            stats: stats.clone(),
        };
        tokio::spawn(
            actor
                .run(control_rx, relays_rx)
                .instrument(tracing::info_span!("presence")),
        );
        PresenceHandle {
            control,
            relays,
            next_device: Arc::new(AtomicU64::new(1)),
            stats,
        }
    }

    pub fn stats(&self) -> &Arc<EphemeralStats> {
        &self.stats
    }

    /// Registers a new connection of `user`; the returned id is passed to `disconnect` when it
    /// ends.
    pub async fn connect(&self, user: UserName, conn: quinn::Connection) -> DeviceId {
        let device = DeviceId(self.next_device.fetch_add(1, Ordering::Relaxed));
        let _ = self
            .control
            .send(Control::Connect { device, user, conn })
            .await;
        device
    }

    pub async fn disconnect(&self, device: DeviceId) {
        let _ = self.control.send(Control::Disconnect { device }).await;
    }

    /// Marks the device away or back; resolves once the actor has applied it.
    pub async fn set_away(&self, device: DeviceId, away: bool) {
        let (done, applied) = oneshot::channel();
        let sent = self
            .control
            .send(Control::Away { device, away, done })
            .await;
        if sent.is_ok() {
            let _ = applied.await;
        }
    }

    /// The presence of each of `users`, now.
    pub async fn snapshot(&self, users: Vec<UserName>) -> Vec<PresenceInfo> {
        let (reply, answer) = oneshot::channel();
        if self
            .control
            .send(Control::Snapshot { users, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Those of `users` with at least one device connected now (a device inside its presence
    /// grace period is gone, so it does not count). What the push hook asks.
    pub async fn connected(&self, users: Vec<UserName>) -> Vec<UserName> {
        let (reply, answer) = oneshot::channel();
        if self
            .control
            .send(Control::Connected { users, reply })
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Queues a datagram for every connected device of `to`; never waits (a full queue drops it).
    pub fn relay(&self, relay: Relay) {
        if self.relays.try_send(relay).is_err() {
            EphemeralStats::count(&self.stats.busy);
        }
    }
}

/// Everyone who shares a conversation with `user`, in name order, `user` excluded. Read from
/// the store's durable membership.
pub fn contacts(store: &Store, user: &UserName) -> Result<Vec<UserName>, StoreError> {
    let mut contacts = BTreeSet::new();
    for conv in store.user_conversations(user)? {
        if let Some(record) = store.conversation(conv)? {
            contacts.extend(record.members);
        }
    }
    contacts.remove(user);
    Ok(contacts.into_iter().collect())
}

/// The datagram side of one connection: its outgoing rate limit and size check.
#[derive(Debug)]
pub struct DeviceSink {
    conn: quinn::Connection,
    bucket: TokenBucket,
}

impl DeviceSink {
    fn send(&mut self, datagram: &Bytes, now: Instant, stats: &EphemeralStats) {
        if !self.bucket.try_take(now) {
            return EphemeralStats::count(&stats.rate_limited_out);
        }
        match self.conn.max_datagram_size() {
            Some(max) if datagram.len() <= max => {}
            _ => return EphemeralStats::count(&stats.unsendable),
        }
        // When the connection's datagram send buffer is full quinn drops the oldest queued
        // datagram: the freshest typing state wins, and the buffer stays small (see server.rs).
        match self.conn.send_datagram(datagram.clone()) {
            Ok(()) => EphemeralStats::count(&stats.sent),
            Err(_) => EphemeralStats::count(&stats.unsendable),
        }
    }
}

struct PresenceActor {
    board: PresenceBoard,
    sinks: HashMap<DeviceId, DeviceSink>,
    store: Store,
    limits: EphemeralLimits,
    stats: Arc<EphemeralStats>,
}

impl PresenceActor {
    async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        mut relays: mpsc::Receiver<Relay>,
    ) {
        loop {
            let deadline = self.board.poll_timeout();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Priorities: connects and disconnects (rare, and what presence is made of), then
                // grace timers, then relays (many, and perishable: dropped when they pile up).
                biased;
                command = control.recv() => match command {
                    Some(command) => self.on_control(command),
                    None => break,
                },
                () = timer => self.board.handle_timeout(Instant::now()),
                Some(relay) = relays.recv() => self.on_relay(relay),
            }
            self.broadcast_changes();
        }
    }

    fn on_control(&mut self, command: Control) {
        let now = Instant::now();
        match command {
            Control::Connect { device, user, conn } => {
                let bucket = TokenBucket::new(
                    self.limits.datagrams_out_per_sec,
                    self.limits.datagrams_out_burst,
                    now,
                );
                self.sinks.insert(device, DeviceSink { conn, bucket });
                self.board.handle_connect(device, user, now);
            }
            Control::Disconnect { device } => {
                self.sinks.remove(&device);
                self.board.handle_disconnect(device, now);
            }
            Control::Away { device, away, done } => {
                self.board.handle_away(device, away, now);
                let _ = done.send(());
            }
            Control::Snapshot { users, reply } => {
                let snapshot = users.iter().map(|u| self.board.presence(u)).collect();
                let _ = reply.send(snapshot);
            }
            Control::Connected { users, reply } => {
                let connected = users
                    .into_iter()
                    .filter(|u| self.board.devices(u).next().is_some())
                    .collect();
                let _ = reply.send(connected);
            }
        }
    }

    fn on_relay(&mut self, relay: Relay) {
        let now = Instant::now();
        for user in &relay.to {
            for device in self.board.devices(user) {
                if let Some(sink) = self.sinks.get_mut(&device) {
                    sink.send(&relay.datagram, now, &self.stats);
                }
            }
        }
    }

    /// Tells the contacts of each user whose presence changed.
    fn broadcast_changes(&mut self) {
        while let Some(info) = self.board.poll_change() {
            EphemeralStats::count(&self.stats.presence_changes);
            tracing::debug!(user = %info.user, state = info.state.as_str(), "presence");
            let to = match contacts(&self.store, &info.user) {
                Ok(to) => to,
                Err(e) => {
                    tracing::error!(error = %e, "reading contacts for a presence change");
                    continue;
                }
            };
            match encode_datagram(&ServerDatagram::Presence(info)) {
                Ok(datagram) => self.on_relay(Relay {
                    to,
                    datagram: datagram.into(),
                }),
                Err(e) => tracing::error!(error = %e, "encoding a presence datagram"),
            }
        }
    }
}
