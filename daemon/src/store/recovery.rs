//! What an open does before the store serves: replay the log, and never serve a gap.
//!
//! Replay. The frames after the engine's checkpoint (`texts.rs`) are applied again, in order:
//! every write of a frame is a put or a remove of a whole record, so applying a run of frames
//! over an engine that holds any part of them leaves exactly the state after the last one.
//!
//! Gaps. The sequencer hands out seqs in order and the writer commits them in order, so a
//! conversation's events can only be missing at its tail: a store whose engine tore a batch
//! (as sled 0.34 can after a failed write, in stores written before the log had frames) holds
//! some events of its last group commit without the ones before them. Those events were never
//! acknowledged: their commit failed. Recovery keeps each conversation's gap-free prefix and
//! removes what follows the first gap, with everything that points at it: message ids (else a
//! retry would be answered with a seq that now belongs to another message), message records,
//! texts, and receipt cursors past the new head. What such a commit changed in other records
//! (a reaction on an older message, a membership) cannot be told apart from what came before,
//! and stays.
//!
//! Which conversations are checked: those the replayed frames touched, from just before the
//! first event they hold; and, once, when a store made before the log had frames is first
//! opened, every conversation from its oldest event.

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};

use quip_protocol::{ConversationId, Seq};

use super::backend::{Backend, Order};
use super::texts::{Frame, TextLog, TextRef};
use super::{decode, keys, MessageRecord, ReceiptRecord, StoreError, WriteBatch};

/// Applies `frames` to the engine again; returns, per conversation they hold events of, the
/// lowest such seq.
pub(super) fn replay(
    backend: &dyn Backend,
    texts: &TextLog,
    frames: &[Frame],
) -> Result<BTreeMap<ConversationId, Seq>, StoreError> {
    let mut touched: BTreeMap<ConversationId, Seq> = BTreeMap::new();
    let mut erased = false;
    for frame in frames {
        for text in &frame.erased {
            texts.erase(*text)?;
            erased = true;
        }
        backend.apply(
            &mut frame
                .ops
                .iter()
                .map(|(key, value)| (key.as_slice(), value.as_deref())),
        )?;
        for (key, _) in &frame.ops {
            if key.first() != Some(&keys::CONVSEQ_EVENT) {
                continue;
            }
            if let Some((conv, seq)) = keys::conv_seq_parts(key) {
                let lowest = touched.entry(conv).or_insert(seq);
                *lowest = (*lowest).min(seq);
            }
        }
    }
    if erased {
        texts.sync()?;
    }
    Ok(touched)
}

/// Every conversation that has events, ascending: one short scan per conversation.
pub(super) fn conversations_with_events(
    backend: &dyn Backend,
) -> Result<Vec<ConversationId>, StoreError> {
    let mut convs = Vec::new();
    let mut from = vec![keys::CONVSEQ_EVENT];
    let end = [keys::CONVSEQ_EVENT + 1];
    loop {
        let mut next = None;
        backend.scan(
            (Bound::Included(from.as_slice()), Bound::Excluded(&end[..])),
            Order::Ascending,
            1,
            &mut |key, _| {
                next = keys::conv_seq_parts(key).map(|(conv, _)| conv);
                ControlFlow::Break(())
            },
        )?;
        let Some(conv) = next else {
            return Ok(convs);
        };
        convs.push(conv);
        match conv.0.checked_add(1) {
            Some(after) => from = keys::event(ConversationId(after), Seq::ZERO).to_vec(),
            None => return Ok(convs),
        }
    }
}

/// A conversation whose events stop being gap-free after `keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Gap {
    pub conv: ConversationId,
    /// The last seq of the gap-free prefix.
    pub keep: Seq,
    /// The first seq present after the gap (or whose text is missing).
    pub next: Seq,
    pub head: Seq,
}

/// The first gap of `conv` among its events from `from` on, if any. An event whose text ref
/// points past the end of the text log (`log_end`) counts as missing: its commit never
/// finished.
pub(super) fn find_gap(
    backend: &dyn Backend,
    conv: ConversationId,
    from: Seq,
    log_end: u64,
) -> Result<Option<Gap>, StoreError> {
    let start = keys::event(conv, from);
    let end = keys::event(conv, Seq(u64::MAX));
    let mut prev: Option<Seq> = None;
    let mut gap = None;
    let mut failed = None;
    backend.scan(
        (Bound::Included(&start), Bound::Included(&end)),
        Order::Ascending,
        usize::MAX,
        &mut |key, _| {
            let Some(seq) = keys::event_seq(key) else {
                failed = Some(StoreError::Corrupt("event key".into()));
                return ControlFlow::Break(());
            };
            match prev {
                Some(p) if seq.0 != p.0 + 1 => {
                    gap = Some((p, seq));
                    ControlFlow::Break(())
                }
                _ => {
                    prev = Some(seq);
                    ControlFlow::Continue(())
                }
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    // A text past the log's end cuts the prefix there too.
    let text_start = keys::text(conv, from);
    let text_end = keys::text(conv, Seq(u64::MAX));
    let mut unfinished = None;
    backend.scan(
        (Bound::Included(&text_start), Bound::Included(&text_end)),
        Order::Ascending,
        usize::MAX,
        &mut |key, value| match (keys::event_seq(key), decode::<TextRef>(value)) {
            (Some(seq), Ok(text)) if text.offset + u64::from(text.len) > log_end => {
                unfinished = Some(seq);
                ControlFlow::Break(())
            }
            (Some(_), Ok(_)) => ControlFlow::Continue(()),
            (_, Err(e)) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
            (None, Ok(_)) => {
                failed = Some(StoreError::Corrupt("text key".into()));
                ControlFlow::Break(())
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let head = super::head(backend, conv)?;
    let cut = match (gap, unfinished) {
        (Some((keep, _)), Some(bad)) if bad <= keep => Some((Seq(bad.0.saturating_sub(1)), bad)),
        (Some(gap), _) => Some(gap),
        (None, Some(bad)) => Some((Seq(bad.0.saturating_sub(1)), bad)),
        (None, None) => None,
    };
    Ok(cut.map(|(keep, next)| Gap {
        conv,
        keep,
        next,
        head,
    }))
}

/// Adds to `batch` the writes that remove everything of `gap.conv` after `gap.keep`.
pub(super) fn repair(
    backend: &dyn Backend,
    gap: &Gap,
    batch: &mut WriteBatch,
) -> Result<(), StoreError> {
    let conv = gap.conv;
    let keep = gap.keep;
    let after = |key: fn(ConversationId, Seq) -> [u8; 17]| {
        (key(conv, keep.next()), key(conv, Seq(u64::MAX)))
    };
    let mut seqs = Vec::new();
    for (start, end) in [
        after(keys::event),
        after(keys::text),
        after(keys::message_state),
    ] {
        backend.scan(
            (Bound::Included(&start), Bound::Included(&end)),
            Order::Ascending,
            usize::MAX,
            &mut |key, _| {
                if let Some(seq) = keys::event_seq(key) {
                    seqs.push(seq);
                }
                ControlFlow::Continue(())
            },
        )?;
    }
    seqs.sort_unstable();
    seqs.dedup();
    for seq in seqs {
        batch.prune_event(conv, seq);
    }

    let mut failed = None;
    let mut stale_ids = Vec::new();
    backend.scan_prefix(
        &keys::message_id_prefix(conv),
        Order::Ascending,
        usize::MAX,
        &mut |key, value| match decode::<u64>(value) {
            Ok(seq) => {
                if seq > keep.0 {
                    stale_ids.push(key.to_vec());
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    for key in stale_ids {
        batch.remove(&key);
    }

    let mut receipts = Vec::new();
    backend.scan_prefix(
        &keys::receipt_prefix(conv),
        Order::Ascending,
        usize::MAX,
        &mut |key, value| match decode::<ReceiptRecord>(value) {
            Ok(record) => {
                if record.delivered > keep || record.read > keep {
                    let clamped = ReceiptRecord {
                        delivered: record.delivered.min(keep),
                        read: record.read.min(keep),
                    };
                    receipts.push((key.to_vec(), clamped));
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    for (key, record) in receipts {
        batch.put(&key, &record);
    }

    let (start, end) = (
        keys::message_state(conv, Seq(1)),
        keys::message_state(conv, keep),
    );
    let mut records = Vec::new();
    backend.scan(
        (Bound::Included(&start), Bound::Included(&end)),
        Order::Ascending,
        usize::MAX,
        &mut |key, value| match decode::<MessageRecord>(value) {
            Ok(mut record) => {
                let before = record.clone();
                record.edits.retain(|seq| *seq <= keep);
                record.deleted = record.deleted.filter(|seq| *seq <= keep);
                if record != before {
                    records.push((key.to_vec(), record));
                }
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    for (key, record) in records {
        batch.put(&key, &record);
    }
    failed.map_or(Ok(()), Err)
}
