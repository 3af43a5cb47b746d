//! Who is typing in one conversation, as the server relays it; without IO, time is an input.
//!
//! The board decides which typing signals are worth relaying. A `Typing` is relayed when the
//! user was not typing, or when the last one relayed for the user is at least `relay_interval`
//! old (the refresh receivers need before their TTL runs out); repeats in between, from a fast
//! client or from several devices of one user, are absorbed here instead of multiplied by the
//! member count. A `StoppedTyping`, or a message from the user, is relayed as a stop only if a
//! `Typing` was relayed within the TTL: otherwise receivers have already expired it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use quip_protocol::UserName;

#[derive(Debug)]
pub struct TypingBoard {
    relay_interval: Duration,
    ttl: Duration,
    /// When a `Typing` of each user was last relayed.
    relayed: HashMap<UserName, Instant>,
}

impl TypingBoard {
    pub fn new(relay_interval: Duration, ttl: Duration) -> Self {
        TypingBoard {
            relay_interval,
            ttl,
            relayed: HashMap::new(),
        }
    }

    /// `user` says it is typing: whether to relay a `Typing`.
    pub fn handle_typing(&mut self, user: &UserName, now: Instant) -> bool {
        match self.relayed.get_mut(user) {
            Some(last) if now.saturating_duration_since(*last) < self.relay_interval => false,
            Some(last) => {
                *last = now;
                true
            }
            None => {
                self.relayed.insert(user.clone(), now);
                true
            }
        }
    }

    /// `user` says it stopped, or sent a message, or left: whether to relay a `StoppedTyping`.
    pub fn handle_stopped(&mut self, user: &UserName, now: Instant) -> bool {
        match self.relayed.remove(user) {
            Some(last) => now.saturating_duration_since(last) < self.ttl,
            None => false,
        }
    }

    /// Forgets users whose last `Typing` receivers have expired by now, so the board holds only
    /// live indicators.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.relayed
            .retain(|_, last| now.saturating_duration_since(*last) < ttl);
    }

    pub fn len(&self) -> usize {
        self.relayed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relayed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);
    const TTL: Duration = Duration::from_secs(6);

    fn alice() -> UserName {
        UserName("alice".into())
    }

    #[test]
    fn repeats_inside_the_interval_are_absorbed() {
        let t0 = Instant::now();
        let mut board = TypingBoard::new(INTERVAL, TTL);
        assert!(board.handle_typing(&alice(), t0));
        let relayed = (1..100)
            .filter(|i| board.handle_typing(&alice(), t0 + Duration::from_millis(*i * 10)))
            .count();
        assert_eq!(
            relayed, 0,
            "a flood inside one interval relays nothing more"
        );
        assert!(board.handle_typing(&alice(), t0 + INTERVAL));
        // The client's 3 s refresh is always relayed.
        assert!(board.handle_typing(&alice(), t0 + INTERVAL + Duration::from_secs(3)));
    }

    #[test]
    fn a_stop_is_relayed_only_for_a_live_indicator() {
        let t0 = Instant::now();
        let mut board = TypingBoard::new(INTERVAL, TTL);
        assert!(!board.handle_stopped(&alice(), t0), "never typing");
        board.handle_typing(&alice(), t0);
        assert!(board.handle_stopped(&alice(), t0 + Duration::from_secs(2)));
        assert!(
            !board.handle_stopped(&alice(), t0 + Duration::from_secs(2)),
            "once"
        );
        assert!(
            board.handle_typing(&alice(), t0 + Duration::from_secs(2)),
            "a new start"
        );
        assert!(
            !board.handle_stopped(&alice(), t0 + Duration::from_secs(2) + TTL),
            "receivers expired it already"
        );
    }

    #[test]
    fn expire_forgets_old_indicators() {
        let t0 = Instant::now();
        let mut board = TypingBoard::new(INTERVAL, TTL);
        board.handle_typing(&alice(), t0);
        board.handle_typing(&UserName("bob".into()), t0 + Duration::from_secs(3));
        board.expire(t0 + TTL);
        assert_eq!(board.len(), 1);
        board.expire(t0 + Duration::from_secs(3) + TTL);
        assert!(board.is_empty());
    }
}
