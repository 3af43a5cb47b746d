//! Retention, without IO: which of a conversation's oldest events go. The newest event always
//! stays (the conversation's head is where its next seq comes from); the actor does the pruning
//! through the store, in bounded batches.

use std::time::Duration;

use quip_protocol::Seq;

/// How much of a conversation to keep; `None` for a limit means no limit. Both limits apply
/// together (whichever removes more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the newest this many events.
    pub keep_events: Option<u64>,
    /// Keep events younger than this (by their server time).
    pub keep_for: Option<Duration>,
}

impl Retention {
    pub fn is_off(&self) -> bool {
        self.keep_events.is_none() && self.keep_for.is_none()
    }
}

/// Most events removed in one commit, so pruning a long backlog never makes one huge batch.
pub const PRUNE_BATCH: u64 = 1000;

/// The oldest seq to keep by count, given the current oldest `floor` and `head`.
pub fn floor_by_count(keep: u64, floor: Seq, head: Seq) -> Seq {
    let keep = keep.max(1);
    let by_count = Seq(head.0.saturating_sub(keep - 1).max(1));
    by_count.max(floor)
}

/// The oldest seq to keep by age, from the (seq, at_ms) of the oldest events in order: the
/// first one that is not older than `cutoff_ms`, or, when every one given is older, the one
/// after the last given. Never past `head`.
pub fn floor_by_age(oldest: &[(Seq, u64)], cutoff_ms: u64, head: Seq) -> Option<Seq> {
    let (first, _) = oldest.first()?;
    let keep_from = match oldest.iter().find(|(_, at)| *at >= cutoff_ms) {
        Some((seq, _)) => *seq,
        None => oldest.last().map_or(*first, |(seq, _)| seq.next()),
    };
    Some(keep_from.min(head))
}

/// The next floor to prune to: at most `PRUNE_BATCH` events past the current one.
pub fn next_step(floor: Seq, wanted: Seq) -> Option<Seq> {
    if wanted <= floor {
        return None;
    }
    Some(wanted.min(Seq(floor.0 + PRUNE_BATCH)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_count_keeps_the_newest_and_never_the_head_away() {
        assert_eq!(floor_by_count(10, Seq(1), Seq(25)), Seq(16));
        assert_eq!(floor_by_count(10, Seq(1), Seq(5)), Seq(1));
        assert_eq!(floor_by_count(0, Seq(1), Seq(5)), Seq(5), "the head stays");
        assert_eq!(floor_by_count(10, Seq(20), Seq(25)), Seq(20), "never back");
    }

    #[test]
    fn by_age_stops_at_the_first_young_event() {
        let events = [(Seq(4), 100), (Seq(5), 200), (Seq(6), 300)];
        assert_eq!(floor_by_age(&events, 150, Seq(9)), Some(Seq(5)));
        assert_eq!(floor_by_age(&events, 50, Seq(9)), Some(Seq(4)));
        assert_eq!(floor_by_age(&events, 1000, Seq(9)), Some(Seq(7)));
        assert_eq!(
            floor_by_age(&events, 1000, Seq(6)),
            Some(Seq(6)),
            "the head stays"
        );
        assert_eq!(floor_by_age(&[], 1000, Seq(6)), None);
    }

    #[test]
    fn pruning_goes_in_bounded_steps() {
        assert_eq!(next_step(Seq(1), Seq(1)), None);
        assert_eq!(next_step(Seq(1), Seq(50)), Some(Seq(50)));
        assert_eq!(next_step(Seq(1), Seq(5000)), Some(Seq(1 + PRUNE_BATCH)));
    }
}
