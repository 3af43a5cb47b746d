//! How the client waits when the server cannot serve it, without IO (time is an input): the
//! backoff between retry rounds after `UNAVAILABLE` answers, and the clock of how long it has
//! made no progress, which decides when a client with `give_up_after` set gives up.

use std::time::{Duration, Instant};

/// Exponential backoff that never waits less than the server asked for.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The wait before the next round: the current step scaled by `jitter` (0.5 to 1, so that
    /// clients that failed together do not come back together), and at least `asked` (the
    /// answer's `retry_after_ms`). Each call doubles the step, up to the maximum.
    pub fn next_delay(&mut self, asked: Option<Duration>, jitter: f64) -> Duration {
        let step = self.next.mul_f64(jitter.clamp(0.5, 1.0));
        self.next = (self.next * 2).min(self.max);
        step.max(asked.unwrap_or_default())
    }

    /// The server served a request: the next trouble starts from the initial step again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

/// Since when the client has been without progress.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stall {
    since: Option<Instant>,
}

impl Stall {
    /// Trouble started (again): the clock runs from the first time, not from each repeat.
    pub fn begin(&mut self, now: Instant) {
        self.since.get_or_insert(now);
    }

    /// Progress: the clock stops.
    pub fn end(&mut self) -> bool {
        self.since.take().is_some()
    }

    pub fn is_stalled(&self) -> bool {
        self.since.is_some()
    }

    /// How much of `limit` is left at `now`: `None` without a limit or a stall, zero once the
    /// limit is reached.
    pub fn left(&self, now: Instant, limit: Option<Duration>) -> Option<Duration> {
        let (since, limit) = (self.since?, limit?);
        Some(limit.saturating_sub(now.saturating_duration_since(since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_to_its_maximum_and_honours_the_servers_wait() {
        let mut backoff = Backoff::new(500 * MS, 5000 * MS);
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay(None, 1.0)).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 5000, 5000].map(|ms| ms * MS),
        );
        assert_eq!(
            backoff.next_delay(Some(9000 * MS), 1.0),
            9000 * MS,
            "never less than retry_after_ms"
        );
        backoff.reset();
        assert_eq!(backoff.next_delay(Some(1000 * MS), 0.5), 1000 * MS);
        assert_eq!(
            backoff.next_delay(None, 0.5),
            500 * MS,
            "jitter halves at most"
        );
        assert_eq!(
            backoff.next_delay(None, 0.0),
            1000 * MS,
            "jitter is clamped"
        );
    }

    #[test]
    fn the_stall_clock_runs_from_the_first_trouble_until_progress() {
        let start = Instant::now();
        let limit = Some(30_000 * MS);
        let mut stall = Stall::default();
        assert_eq!(
            stall.left(start, limit),
            None,
            "no stall, nothing to give up"
        );
        stall.begin(start);
        stall.begin(start + 10_000 * MS);
        assert_eq!(stall.left(start + 20_000 * MS, limit), Some(10_000 * MS));
        assert_eq!(stall.left(start + 40_000 * MS, limit), Some(Duration::ZERO));
        assert_eq!(stall.left(start + 40_000 * MS, None), None, "no limit");
        assert!(stall.end());
        assert!(!stall.is_stalled());
        assert!(!stall.end());
    }
}
