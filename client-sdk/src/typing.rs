//! Typing indicators as a receiver shows them, without IO: time is an input.
//!
//! Feed it what arrives ([`handle_event`](TypingTracker::handle_event) for datagrams,
//! [`handle_message`](TypingTracker::handle_message) for messages of subscribed conversations),
//! call [`handle_timeout`](TypingTracker::handle_timeout) once the instant of
//! [`poll_timeout`](TypingTracker::poll_timeout) has passed, and read who is typing with
//! [`typing`](TypingTracker::typing). Every input that changes what should be shown returns the
//! change. An indicator ends at `TYPING_TTL_MS` after the last `Typing` for it, so a lost
//! `StoppedTyping` never leaves one stuck.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use quip_protocol::{limits, ConversationId, UserName};

use crate::ephemeral::EphemeralEvent;

/// A change in what should be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypingChange {
    Started {
        conv: ConversationId,
        user: UserName,
    },
    Stopped {
        conv: ConversationId,
        user: UserName,
    },
}

#[derive(Debug)]
pub struct TypingTracker {
    ttl: Duration,
    /// When each indicator expires.
    expires: HashMap<(ConversationId, UserName), Instant>,
}

impl Default for TypingTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl TypingTracker {
    /// A tracker with the protocol's TTL.
    pub fn new() -> Self {
        Self::with_ttl(Duration::from_millis(limits::TYPING_TTL_MS))
    }

    pub fn with_ttl(ttl: Duration) -> Self {
        TypingTracker {
            ttl,
            expires: HashMap::new(),
        }
    }

    /// A datagram arrived. Presence events change nothing here.
    pub fn handle_event(&mut self, event: &EphemeralEvent, now: Instant) -> Option<TypingChange> {
        match event {
            EphemeralEvent::Typing { conv, user } => self.handle_typing(*conv, user, now),
            EphemeralEvent::StoppedTyping { conv, user } => self.handle_stopped(*conv, user),
            EphemeralEvent::Presence(_) => None,
        }
    }

    /// `user` is typing in `conv`: shows it, or extends it.
    pub fn handle_typing(
        &mut self,
        conv: ConversationId,
        user: &UserName,
        now: Instant,
    ) -> Option<TypingChange> {
        let until = now + self.ttl;
        match self.expires.insert((conv, user.clone()), until) {
            Some(previous) if previous > now => None,
            _ => Some(TypingChange::Started {
                conv,
                user: user.clone(),
            }),
        }
    }

    /// `user` stopped typing in `conv`.
    pub fn handle_stopped(
        &mut self,
        conv: ConversationId,
        user: &UserName,
    ) -> Option<TypingChange> {
        self.expires
            .remove(&(conv, user.clone()))
            .map(|_| TypingChange::Stopped {
                conv,
                user: user.clone(),
            })
    }

    /// A message from `sender` arrived in `conv`: the sender is done typing it.
    pub fn handle_message(
        &mut self,
        conv: ConversationId,
        sender: &UserName,
    ) -> Option<TypingChange> {
        self.handle_stopped(conv, sender)
    }

    /// Ends every indicator whose TTL ran out at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<TypingChange> {
        let mut expired: Vec<(ConversationId, UserName)> = self
            .expires
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(key, _)| key.clone())
            .collect();
        expired.sort();
        expired
            .into_iter()
            .map(|(conv, user)| {
                self.expires.remove(&(conv, user.clone()));
                TypingChange::Stopped { conv, user }
            })
            .collect()
    }

    /// When the next indicator expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expires.values().min().copied()
    }

    /// Who is typing in `conv` at `now`, in name order.
    pub fn typing(&self, conv: ConversationId, now: Instant) -> Vec<UserName> {
        let typing: BTreeMap<&UserName, ()> = self
            .expires
            .iter()
            .filter(|((c, _), until)| *c == conv && **until > now)
            .map(|((_, user), _)| (user, ()))
            .collect();
        typing.into_keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(6);
    const CONV: ConversationId = ConversationId(1);

    fn alice() -> UserName {
        UserName("alice".into())
    }

    fn started() -> Option<TypingChange> {
        Some(TypingChange::Started {
            conv: CONV,
            user: alice(),
        })
    }

    fn stopped() -> TypingChange {
        TypingChange::Stopped {
            conv: CONV,
            user: alice(),
        }
    }

    #[test]
    fn a_lost_stop_expires_by_ttl() {
        let t0 = Instant::now();
        let mut tracker = TypingTracker::with_ttl(TTL);
        assert_eq!(tracker.handle_typing(CONV, &alice(), t0), started());
        assert_eq!(tracker.typing(CONV, t0), [alice()]);
        assert_eq!(tracker.poll_timeout(), Some(t0 + TTL));
        // The stop datagram is lost: nothing more arrives.
        let almost = t0 + TTL - Duration::from_millis(1);
        assert_eq!(tracker.handle_timeout(almost), []);
        assert_eq!(tracker.typing(CONV, almost), [alice()]);
        assert_eq!(tracker.handle_timeout(t0 + TTL), [stopped()]);
        assert!(tracker.typing(CONV, t0 + TTL).is_empty());
        assert_eq!(tracker.poll_timeout(), None);
    }

    #[test]
    fn refreshes_extend_the_indicator_without_restarting_it() {
        let t0 = Instant::now();
        let mut tracker = TypingTracker::with_ttl(TTL);
        tracker.handle_typing(CONV, &alice(), t0);
        for i in 1..10u64 {
            let at = t0 + Duration::from_secs(3 * i);
            assert_eq!(
                tracker.handle_typing(CONV, &alice(), at),
                None,
                "refresh {i}"
            );
            assert_eq!(tracker.handle_timeout(at), []);
        }
        let last = t0 + Duration::from_secs(27);
        assert_eq!(tracker.poll_timeout(), Some(last + TTL));
        // One lost refresh (3 s) does not make it flicker; two do end it.
        assert_eq!(tracker.handle_timeout(last + Duration::from_secs(5)), []);
        assert_eq!(tracker.handle_timeout(last + TTL), [stopped()]);
        // Typing after expiry is a new start.
        assert_eq!(tracker.handle_typing(CONV, &alice(), last + TTL), started());
    }

    #[test]
    fn a_stop_or_a_message_ends_it_at_once() {
        let t0 = Instant::now();
        let mut tracker = TypingTracker::with_ttl(TTL);
        tracker.handle_typing(CONV, &alice(), t0);
        assert_eq!(tracker.handle_stopped(CONV, &alice()), Some(stopped()));
        assert_eq!(tracker.handle_stopped(CONV, &alice()), None);
        tracker.handle_typing(CONV, &alice(), t0);
        assert_eq!(
            tracker.handle_message(ConversationId(2), &alice()),
            None,
            "another conversation"
        );
        assert_eq!(tracker.handle_message(CONV, &alice()), Some(stopped()));
        assert_eq!(tracker.handle_timeout(t0 + TTL * 2), []);
    }

    #[test]
    fn conversations_and_users_are_tracked_apart() {
        let t0 = Instant::now();
        let mut tracker = TypingTracker::with_ttl(TTL);
        let bob = UserName("bob".into());
        tracker.handle_typing(CONV, &bob, t0);
        tracker.handle_typing(CONV, &alice(), t0 + Duration::from_secs(1));
        tracker.handle_typing(ConversationId(2), &alice(), t0 + Duration::from_secs(2));
        assert_eq!(
            tracker.typing(CONV, t0 + Duration::from_secs(2)),
            [alice(), bob.clone()]
        );
        let expired = tracker.handle_timeout(t0 + TTL + Duration::from_secs(1));
        assert_eq!(
            expired,
            [
                TypingChange::Stopped {
                    conv: CONV,
                    user: alice()
                },
                TypingChange::Stopped {
                    conv: CONV,
                    user: bob
                },
            ]
        );
        assert_eq!(
            tracker.typing(ConversationId(2), t0 + TTL + Duration::from_secs(1)),
            [alice()]
        );
    }
}
