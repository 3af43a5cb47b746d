//! Errors that repeat, logged once instead of once per request. No IO: time is an input.
//!
//! A failed store fails every request after the failure, and a client retrying its outbox
//! makes hundreds of requests a second: an ERROR line each would bury the one line that says
//! what broke. [`Repeats`] lets the first occurrence of a message through, counts the ones after
//! it, and lets one through again (with the count) once `every` has passed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Distinct messages remembered; past this the oldest memory is dropped (a flood of distinct
/// messages is logged, not silently lost).
const MAX_MESSAGES: usize = 64;

#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    /// Per message: when it was last logged, and how many were held back since.
    seen: HashMap<String, (Instant, u64)>,
}

impl Repeats {
    pub fn new(every: Duration) -> Self {
        Repeats {
            every,
            seen: HashMap::new(),
        }
    }

    /// Whether to log `message` now: `Some(n)` with the number held back since it was last
    /// logged (0 the first time), `None` to hold it back.
    pub fn admit(&mut self, message: &str, now: Instant) -> Option<u64> {
        if let Some((logged, held)) = self.seen.get_mut(message) {
            if now.saturating_duration_since(*logged) < self.every {
                *held += 1;
                return None;
            }
            let repeats = *held;
            *logged = now;
            *held = 0;
            return Some(repeats);
        }
        if self.seen.len() >= MAX_MESSAGES {
            let oldest = self
                .seen
                .iter()
                .min_by_key(|(_, (logged, _))| *logged)
                .map(|(message, _)| message.clone());
            if let Some(oldest) = oldest {
                self.seen.remove(&oldest);
            }
        }
        self.seen.insert(message.to_owned(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_message_is_logged_once_a_minute_with_the_count() {
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        let mut repeats = Repeats::new(minute);
        assert_eq!(repeats.admit("store refuses writes", start), Some(0));
        for n in 1..=15_000 {
            let at = start + Duration::from_millis(n * 3);
            assert_eq!(repeats.admit("store refuses writes", at), None);
        }
        assert_eq!(repeats.admit("another failure", start), Some(0));
        assert_eq!(
            repeats.admit("store refuses writes", start + minute),
            Some(15_000)
        );
        assert_eq!(repeats.admit("store refuses writes", start + minute), None);
    }

    #[test]
    fn many_distinct_messages_are_all_logged() {
        let now = Instant::now();
        let mut repeats = Repeats::new(Duration::from_secs(60));
        for n in 0..(MAX_MESSAGES * 3) {
            assert_eq!(repeats.admit(&format!("failure {n}"), now), Some(0));
        }
        assert!(repeats.seen.len() <= MAX_MESSAGES);
    }
}
