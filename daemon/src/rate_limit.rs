//! A token bucket, and the gate that rate-limits sends without reordering them. No IO: time is
//! an input.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use quip_protocol::{ClientMessageId, ConversationId};

/// Allows `rate` events per second on average and bursts of up to `burst`. An event that finds
/// the bucket empty is refused, never queued: the caller drops it and counts it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate_per_sec),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until a token is available (zero if one is now).
    pub fn wait(&self) -> Duration {
        self.wait_for(1)
    }

    /// How long until `n` tokens are available, counted from the last `try_take`.
    pub fn wait_for(&self, n: usize) -> Duration {
        let missing = n as f64 - self.tokens;
        if missing <= 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.rate)
    }
}

/// Sends refused and remembered per conversation, past which a connection is closed instead
/// (its client reconnects and re-sends its outbox in order).
pub const MAX_REFUSED_SENDS: usize = 1024;

/// What the gate says of one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// `RATE_LIMITED`: try again after this long.
    Refuse(Duration),
    /// More refused sends outstanding than [`MAX_REFUSED_SENDS`].
    Overflow,
}

/// Rate-limits one connection's sends while keeping each conversation's sends in the order the
/// client wrote them (invariant 1): once a send is refused, the later sends of that
/// conversation are refused too until the refused ones have come back, in their order. A client
/// that pipelines A, B, C and sees A refused cannot have B stored before A's retry, whatever
/// the timing of its retries.
#[derive(Debug, Default)]
pub struct SendGate {
    /// Per conversation, the ids refused so far that have not passed yet, oldest first.
    refused: HashMap<ConversationId, VecDeque<ClientMessageId>>,
}

impl SendGate {
    /// Decides one send of message `id` in `conv`, taking a token from the device's `bucket`
    /// when it passes.
    pub fn admit(
        &mut self,
        conv: ConversationId,
        id: ClientMessageId,
        bucket: &mut TokenBucket,
        now: Instant,
    ) -> Gate {
        let queue = self.refused.entry(conv).or_default();
        let position = queue.iter().position(|queued| *queued == id);
        let turn = matches!(position, None | Some(0)) && (position.is_some() || queue.is_empty());
        if turn && bucket.try_take(now) {
            if position == Some(0) {
                queue.pop_front();
            }
            if queue.is_empty() {
                self.refused.remove(&conv);
            }
            return Gate::Pass;
        }
        let ahead = match position {
            Some(at) => at,
            None if queue.len() >= MAX_REFUSED_SENDS => return Gate::Overflow,
            None => {
                queue.push_back(id);
                queue.len() - 1
            }
        };
        let wait = bucket.wait_for(ahead + 1).max(Duration::from_millis(1));
        Gate::Refuse(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 5, start);
        assert_eq!((0..20).filter(|_| bucket.try_take(start)).count(), 5);
        assert!(bucket.wait() > Duration::ZERO);
        // 10 per second: one token every 100 ms.
        assert!(!bucket.try_take(start + Duration::from_millis(50)));
        assert!(bucket.try_take(start + Duration::from_millis(101)));
        assert!(!bucket.try_take(start + Duration::from_millis(102)));
        // A long pause refills to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| bucket.try_take(later)).count(), 5);
    }

    fn id(n: u8) -> ClientMessageId {
        ClientMessageId([n; 16])
    }

    #[test]
    fn a_refused_send_holds_back_the_later_ones_until_it_passes() {
        let start = Instant::now();
        let conv = ConversationId(1);
        let other = ConversationId(2);
        let mut bucket = TokenBucket::new(10, 1, start);
        let mut gate = SendGate::default();
        assert_eq!(gate.admit(conv, id(1), &mut bucket, start), Gate::Pass);
        // The bucket is empty: 2 is refused, and 3 must wait behind it.
        assert!(matches!(
            gate.admit(conv, id(2), &mut bucket, start),
            Gate::Refuse(_)
        ));
        let later = start + Duration::from_millis(150);
        match gate.admit(conv, id(3), &mut bucket, later) {
            Gate::Refuse(wait) => assert!(wait >= Duration::from_millis(50), "{wait:?}"),
            other => panic!("3 passed before 2: {other:?}"),
        }
        // Another conversation has no refused sends of its own: it is only rate-limited.
        assert_eq!(gate.admit(other, id(9), &mut bucket, later), Gate::Pass);
        let later = later + Duration::from_millis(100);
        // 3 retried first is still behind 2; then 2, then 3 pass.
        assert!(matches!(
            gate.admit(conv, id(3), &mut bucket, later),
            Gate::Refuse(_)
        ));
        assert_eq!(gate.admit(conv, id(2), &mut bucket, later), Gate::Pass);
        let later = later + Duration::from_millis(100);
        assert_eq!(gate.admit(conv, id(3), &mut bucket, later), Gate::Pass);
        assert!(gate.refused.is_empty());
    }

    #[test]
    fn too_many_refused_sends_overflow() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1, 1, start);
        let mut gate = SendGate::default();
        assert_eq!(
            gate.admit(ConversationId(1), id(0), &mut bucket, start),
            Gate::Pass
        );
        for n in 0..MAX_REFUSED_SENDS {
            let id = ClientMessageId((n as u128 + 1).to_be_bytes());
            let gate = gate.admit(ConversationId(1), id, &mut bucket, start);
            assert!(matches!(gate, Gate::Refuse(_)), "{n}: {gate:?}");
        }
        let last = ClientMessageId([0xff; 16]);
        assert_eq!(
            gate.admit(ConversationId(1), last, &mut bucket, start),
            Gate::Overflow
        );
    }

    #[test]
    fn time_going_backwards_takes_nothing_extra() {
        let start = Instant::now() + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(1, 1, start);
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start - Duration::from_secs(5)));
        assert!(!bucket.try_take(start));
    }
}
