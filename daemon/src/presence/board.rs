//! The presence state machine, without IO: who is connected, on how many devices, away or not,
//! when they were last seen, and whose disconnect is still inside its grace period.
//!
//! Driven quinn-proto style, with time as an input:
//! - inputs: [`handle_connect`](PresenceBoard::handle_connect),
//!   [`handle_disconnect`](PresenceBoard::handle_disconnect),
//!   [`handle_away`](PresenceBoard::handle_away) and, when the deadline of
//!   [`poll_timeout`](PresenceBoard::poll_timeout) has passed,
//!   [`handle_timeout`](PresenceBoard::handle_timeout);
//! - outputs: after any input, drain [`poll_change`](PresenceBoard::poll_change) for the
//!   presence changes to tell contacts about, then ask `poll_timeout` for the next deadline.
//!
//! A user is online while any device is connected and not away, away while every connected
//! device is away, and offline once the last device has been gone for the grace period: a
//! reconnect inside the grace period (a network change, an app restart) changes nothing anyone
//! sees. Nothing here is persisted: after a restart everyone starts offline and unseen.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use quip_protocol::{PresenceInfo, PresenceState, UserName};

/// One connection of a user, as numbered by the presence actor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub u64);

#[derive(Debug)]
struct UserEntry {
    /// Connected devices, and whether each is away.
    devices: HashMap<DeviceId, bool>,
    /// What contacts were last told.
    shown: PresenceState,
    /// When the user was last online (connected and not away), if since the board started.
    last_seen: Option<Instant>,
    /// Set while the last device is gone but the grace period runs.
    grace_until: Option<Instant>,
    version: u64,
}

#[derive(Debug)]
pub struct PresenceBoard {
    grace: Duration,
    /// Pairs an `Instant` with wall-clock time, to report `last_seen_ms`.
    clock_base: (Instant, u64),
    users: HashMap<UserName, UserEntry>,
    devices: HashMap<DeviceId, UserName>,
    /// Grace periods running, by deadline.
    deadlines: BTreeSet<(Instant, UserName)>,
    /// The last version handed out; grows with every change.
    version: u64,
    changes: VecDeque<PresenceInfo>,
}

impl PresenceBoard {
    /// `clock_base` says which wall-clock time (ms since the Unix epoch) `Instant` `.0` is.
    pub fn new(grace: Duration, clock_base: (Instant, u64)) -> Self {
        PresenceBoard {
            grace,
            clock_base,
            users: HashMap::new(),
            devices: HashMap::new(),
            deadlines: BTreeSet::new(),
            version: 0,
            changes: VecDeque::new(),
        }
    }

    pub fn handle_connect(&mut self, device: DeviceId, user: UserName, now: Instant) {
        self.devices.insert(device, user.clone());
        let entry = self.users.entry(user.clone()).or_insert(UserEntry {
            devices: HashMap::new(),
            shown: PresenceState::Offline,
            last_seen: None,
            grace_until: None,
            version: 0,
        });
        entry.devices.insert(device, false);
        if let Some(deadline) = entry.grace_until.take() {
            self.deadlines.remove(&(deadline, user.clone()));
        }
        self.refresh(&user, now);
    }

    pub fn handle_disconnect(&mut self, device: DeviceId, now: Instant) {
        let Some(user) = self.devices.remove(&device) else {
            return;
        };
        let Some(entry) = self.users.get_mut(&user) else {
            return;
        };
        entry.devices.remove(&device);
        if entry.devices.is_empty() {
            if entry.shown == PresenceState::Online {
                entry.last_seen = Some(now);
            }
            let deadline = now + self.grace;
            entry.grace_until = Some(deadline);
            self.deadlines.insert((deadline, user.clone()));
            if self.grace.is_zero() {
                self.handle_timeout(now);
            }
        } else {
            self.refresh(&user, now);
        }
    }

    /// The app on `device` went to the background (`away`) or came back.
    pub fn handle_away(&mut self, device: DeviceId, away: bool, now: Instant) {
        let Some(user) = self.devices.get(&device).cloned() else {
            return;
        };
        if let Some(flag) = self
            .users
            .get_mut(&user)
            .and_then(|entry| entry.devices.get_mut(&device))
        {
            *flag = away;
        }
        self.refresh(&user, now);
    }

    /// Ends every grace period whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((deadline, user)) = self.deadlines.first().cloned() {
            if deadline > now {
                break;
            }
            self.deadlines.remove(&(deadline, user.clone()));
            if let Some(entry) = self.users.get_mut(&user) {
                entry.grace_until = None;
            }
            self.refresh(&user, now);
        }
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(deadline, _)| *deadline)
    }

    /// The next change to tell the user's contacts, oldest first.
    pub fn poll_change(&mut self) -> Option<PresenceInfo> {
        self.changes.pop_front()
    }

    /// What a contact should see of `user` now.
    pub fn presence(&self, user: &UserName) -> PresenceInfo {
        match self.users.get(user) {
            Some(entry) => self.info(user, entry),
            None => PresenceInfo {
                user: user.clone(),
                state: PresenceState::Offline,
                last_seen_ms: None,
                version: 0,
            },
        }
    }

    /// The connected devices of `user`.
    pub fn devices(&self, user: &UserName) -> impl Iterator<Item = DeviceId> + '_ {
        self.users
            .get(user)
            .into_iter()
            .flat_map(|entry| entry.devices.keys().copied())
    }

    /// The user a device belongs to.
    pub fn device_user(&self, device: DeviceId) -> Option<&UserName> {
        self.devices.get(&device)
    }

    fn info(&self, user: &UserName, entry: &UserEntry) -> PresenceInfo {
        let (base, base_ms) = self.clock_base;
        let ms = |at: Instant| {
            if at >= base {
                base_ms.saturating_add(at.duration_since(base).as_millis() as u64)
            } else {
                base_ms.saturating_sub(base.duration_since(at).as_millis() as u64)
            }
        };
        PresenceInfo {
            user: user.clone(),
            state: entry.shown,
            last_seen_ms: entry.last_seen.map(ms),
            version: entry.version,
        }
    }

    /// Recomputes `user`'s state and queues a change if contacts see something new.
    fn refresh(&mut self, user: &UserName, now: Instant) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let state = if entry.devices.is_empty() {
            if entry.grace_until.is_some() {
                entry.shown
            } else {
                PresenceState::Offline
            }
        } else if entry.devices.values().any(|away| !away) {
            PresenceState::Online
        } else {
            PresenceState::Away
        };
        let was_or_is_online =
            entry.shown == PresenceState::Online || state == PresenceState::Online;
        if was_or_is_online && !entry.devices.is_empty() {
            entry.last_seen = Some(now);
        }
        if state == entry.shown {
            return;
        }
        entry.shown = state;
        self.version += 1;
        entry.version = self.version;
        let info = {
            let entry = &self.users[user];
            self.info(user, entry)
        };
        self.changes.push_back(info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(15);

    struct Sim {
        board: PresenceBoard,
        start: Instant,
        now: Instant,
    }

    impl Sim {
        fn new() -> Sim {
            let start = Instant::now();
            Sim {
                board: PresenceBoard::new(GRACE, (start, 1_000_000)),
                start,
                now: start,
            }
        }

        /// Advances simulated time, firing due timeouts the way the actor does.
        fn advance(&mut self, by: Duration) {
            let target = self.now + by;
            while let Some(deadline) = self.board.poll_timeout() {
                if deadline > target {
                    break;
                }
                self.now = deadline;
                self.board.handle_timeout(deadline);
            }
            self.now = target;
        }

        fn changes(&mut self) -> Vec<(String, PresenceState)> {
            std::iter::from_fn(|| self.board.poll_change())
                .map(|info| (info.user.0, info.state))
                .collect()
        }

        fn ms(&self) -> u64 {
            1_000_000 + self.now.duration_since(self.start).as_millis() as u64
        }
    }

    fn alice() -> UserName {
        UserName("alice".into())
    }

    use PresenceState::{Away, Offline, Online};

    #[test]
    fn connect_goes_online_and_disconnect_goes_offline_after_the_grace_period() {
        let mut sim = Sim::new();
        assert_eq!(sim.board.presence(&alice()).state, Offline);
        assert_eq!(sim.board.presence(&alice()).last_seen_ms, None);
        sim.board.handle_connect(DeviceId(1), alice(), sim.now);
        assert_eq!(sim.changes(), [("alice".into(), Online)]);
        sim.advance(Duration::from_secs(100));
        sim.board.handle_disconnect(DeviceId(1), sim.now);
        let left_at = sim.ms();
        assert_eq!(sim.changes(), []);
        assert_eq!(sim.board.poll_timeout(), Some(sim.now + GRACE));
        sim.advance(GRACE - Duration::from_millis(1));
        assert_eq!(sim.changes(), [], "still inside the grace period");
        assert_eq!(sim.board.presence(&alice()).state, Online);
        sim.advance(Duration::from_millis(1));
        assert_eq!(sim.changes(), [("alice".into(), Offline)]);
        let info = sim.board.presence(&alice());
        assert_eq!(info.last_seen_ms, Some(left_at), "last seen when it left");
        assert_eq!(sim.board.poll_timeout(), None);
    }

    #[test]
    fn a_reconnect_inside_the_grace_period_changes_nothing() {
        let mut sim = Sim::new();
        sim.board.handle_connect(DeviceId(1), alice(), sim.now);
        sim.changes();
        sim.board.handle_disconnect(DeviceId(1), sim.now);
        sim.advance(Duration::from_secs(3));
        sim.board.handle_connect(DeviceId(2), alice(), sim.now);
        assert_eq!(
            sim.board.poll_timeout(),
            None,
            "the grace timer is cancelled"
        );
        sim.advance(GRACE * 4);
        assert_eq!(sim.changes(), [], "no offline blip");
        assert_eq!(sim.board.presence(&alice()).state, Online);
        // The old grace deadline must not fire for the new connection either.
        sim.board.handle_timeout(sim.now + GRACE * 10);
        assert_eq!(sim.changes(), []);
    }

    #[test]
    fn online_while_any_device_is_connected() {
        let mut sim = Sim::new();
        sim.board.handle_connect(DeviceId(1), alice(), sim.now);
        sim.board.handle_connect(DeviceId(2), alice(), sim.now);
        assert_eq!(sim.changes(), [("alice".into(), Online)]);
        sim.board.handle_disconnect(DeviceId(1), sim.now);
        sim.advance(GRACE * 2);
        assert_eq!(sim.changes(), []);
        assert_eq!(
            sim.board.devices(&alice()).collect::<Vec<_>>(),
            [DeviceId(2)]
        );
        sim.board.handle_disconnect(DeviceId(2), sim.now);
        sim.advance(GRACE);
        assert_eq!(sim.changes(), [("alice".into(), Offline)]);
        assert_eq!(sim.board.devices(&alice()).count(), 0);
    }

    #[test]
    fn away_when_every_device_says_so() {
        let mut sim = Sim::new();
        sim.board.handle_connect(DeviceId(1), alice(), sim.now);
        sim.board.handle_connect(DeviceId(2), alice(), sim.now);
        sim.changes();
        sim.board.handle_away(DeviceId(1), true, sim.now);
        assert_eq!(sim.changes(), [], "the other device is still active");
        sim.advance(Duration::from_secs(10));
        sim.board.handle_away(DeviceId(2), true, sim.now);
        let went_away = sim.ms();
        assert_eq!(sim.changes(), [("alice".into(), Away)]);
        sim.advance(Duration::from_secs(10));
        assert_eq!(sim.board.presence(&alice()).last_seen_ms, Some(went_away));
        sim.board.handle_away(DeviceId(1), false, sim.now);
        assert_eq!(sim.changes(), [("alice".into(), Online)]);
        // Away then gone: offline after the grace period, last seen when it went away.
        sim.board.handle_away(DeviceId(1), true, sim.now);
        let went_away = sim.ms();
        sim.changes();
        sim.advance(Duration::from_secs(5));
        sim.board.handle_disconnect(DeviceId(1), sim.now);
        sim.board.handle_disconnect(DeviceId(2), sim.now);
        sim.advance(GRACE);
        assert_eq!(sim.changes(), [("alice".into(), Offline)]);
        assert_eq!(sim.board.presence(&alice()).last_seen_ms, Some(went_away));
    }

    #[test]
    fn versions_grow_with_every_change() {
        let mut sim = Sim::new();
        let bob = UserName("bob".into());
        sim.board.handle_connect(DeviceId(1), alice(), sim.now);
        sim.board.handle_connect(DeviceId(2), bob.clone(), sim.now);
        sim.board.handle_away(DeviceId(1), true, sim.now);
        let versions: Vec<u64> = std::iter::from_fn(|| sim.board.poll_change())
            .map(|info| info.version)
            .collect();
        assert_eq!(versions, [1, 2, 3]);
        assert_eq!(sim.board.presence(&alice()).version, 3);
        assert_eq!(sim.board.presence(&bob).version, 2);
    }

    #[test]
    fn zero_grace_goes_offline_at_once_and_unknown_devices_are_ignored() {
        let start = Instant::now();
        let mut board = PresenceBoard::new(Duration::ZERO, (start, 0));
        board.handle_disconnect(DeviceId(9), start);
        board.handle_away(DeviceId(9), true, start);
        assert!(board.poll_change().is_none());
        board.handle_connect(DeviceId(1), alice(), start);
        board.handle_disconnect(DeviceId(1), start);
        let states: Vec<_> = std::iter::from_fn(|| board.poll_change())
            .map(|i| i.state)
            .collect();
        assert_eq!(states, [Online, Offline]);
        assert_eq!(board.poll_timeout(), None);
    }

    #[test]
    fn deadlines_of_several_users_fire_in_order() {
        let mut sim = Sim::new();
        let users: Vec<UserName> = (0..5).map(|i| UserName(format!("u{i}"))).collect();
        for (i, user) in users.iter().enumerate() {
            sim.board
                .handle_connect(DeviceId(i as u64), user.clone(), sim.now);
        }
        sim.changes();
        for i in (0..5).rev() {
            sim.board.handle_disconnect(DeviceId(i), sim.now);
            sim.advance(Duration::from_secs(1));
        }
        sim.advance(GRACE);
        let order: Vec<String> = sim.changes().into_iter().map(|(u, _)| u).collect();
        assert_eq!(order, ["u4", "u3", "u2", "u1", "u0"]);
    }
}
