//! Delivery of one conversation to one session, on its own server-opened stream.
//!
//! The task holds a cursor, the last seq written to the stream, and writes each seq after it
//! exactly once, in order. It first replays from the store up to the head it subscribed at, then
//! follows the live feed. The live feed is a bounded ring that never waits for this task: if the
//! task falls behind (the client reads slowly), it misses live events and fills the gap from the
//! store before writing the next one, so a slow client costs the store a read, not the sequencer
//! a wait or the daemon a growing queue.
//!
//! Receipt cursors (revision 2) ride along outside the sequence: every member's right after
//! `Start` (`Opened`), then each change. They come from a `watch` of the conversation's durable
//! receipts, which holds only the latest value, so a slow reader gets the newest cursors, never a
//! backlog.
//!
//! A live event is encoded once per protocol revision in use, by the first delivery task that
//! needs it ([`LiveEvent`]); every other subscriber copies those bytes. Replayed events are
//! encoded into the stream's write buffer directly. Neither path copies the event itself unless
//! a revision-1 session must see a newer kind as `Unsupported`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use quip_protocol::{
    encode_frame_into, ConversationId, DeliveryFrame, Epoch, ErrorBody, ErrorCode, Event,
    EventBody, EventFrame, Receipt, RequestId, Seq, UserName,
};
use tokio::sync::{broadcast, oneshot, watch};

use crate::conversation::{ReceiptsView, Subscription};
use crate::store::{Store, StoreError};
use crate::wire::push_frame;

/// Events read from the store per replay page: bounds replay memory whatever the backlog.
const REPLAY_PAGE: usize = 256;
/// Bytes gathered before one stream write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// A durable event on a conversation's live feed, with its `DeliveryFrame::Event` bytes made
/// at most once per protocol revision and shared by every subscriber of that revision: a
/// message to a hundred members is encoded once, not a hundred times.
#[derive(Debug)]
pub struct LiveEvent {
    event: Event,
    /// Index `r - 1` holds the frame for sessions of revision `r`.
    frames: [OnceLock<Option<Bytes>>; quip_protocol::REVISION as usize],
}

impl LiveEvent {
    pub fn new(event: Event) -> Self {
        LiveEvent {
            event,
            frames: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The encoded frame for a session of `revision`; `None` if it cannot be encoded within
    /// `max_frame_len` (the server-wide limit, the same for every caller).
    pub fn frame(&self, revision: u16, max_frame_len: u32) -> Option<Bytes> {
        let encode = || {
            let mut out = Vec::new();
            match encode_frame_into(
                &EventFrame(&for_revision(&self.event, revision)),
                &mut out,
                max_frame_len,
            ) {
                Ok(()) => Some(Bytes::from(out)),
                Err(e) => {
                    tracing::error!(error = %e, seq = %self.event.seq, "cannot encode an event");
                    None
                }
            }
        };
        match self.frames.get(usize::from(revision).wrapping_sub(1)) {
            Some(cell) => cell.get_or_init(encode).clone(),
            None => encode(),
        }
    }
}

/// The event as a session of `revision` may see it: a kind added by a later revision is shown
/// to older sessions as `EventBody::Unsupported { kind }`, so that they still receive its seq
/// (SPEC section 11).
fn for_revision(event: &Event, revision: u16) -> Cow<'_, Event> {
    if event.body.revision() <= revision {
        Cow::Borrowed(event)
    } else {
        Cow::Owned(event.clone().for_revision(revision))
    }
}

/// What a delivery task needs.
#[derive(Debug)]
pub struct Delivery {
    pub conv: ConversationId,
    pub user: UserName,
    pub epoch: Epoch,
    pub store: Store,
    pub subscription: Subscription,
    /// The last seq the client holds.
    pub after: Seq,
    pub max_frame_len: u32,
    /// The session's protocol revision: newer events go out as `Unsupported`, receipts only
    /// from revision 2.
    pub revision: u16,
    /// The `Subscribe` request this stream answers, named in its first frame (revision 2).
    pub request: RequestId,
}

#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("stream closed by the client: {0}")]
    Write(#[from] quinn::WriteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why delivery stopped.
enum Ended {
    /// The user was removed from the conversation: told with `End { NOT_FOUND }`.
    Removed,
    /// The client unsubscribed (or its session ended): the stream just finishes.
    Unsubscribed,
    /// The conversation's actor stopped: told with `End { UNAVAILABLE }`.
    ConversationClosed,
    /// Retention removed events the client had not received yet: told with `End { PRUNED }`.
    Pruned(Seq),
}

impl Delivery {
    /// Runs until the client unsubscribes (`stop`), the user is removed, or the stream fails.
    pub async fn run(self, conn: quinn::Connection, mut stop: oneshot::Receiver<()>) {
        let _running = crate::metrics::GaugeGuard::new(crate::metrics::DELIVERIES);
        let conv = self.conv;
        let Subscription {
            live,
            head,
            receipts,
            ..
        } = self.subscription;
        let stream = tokio::select! {
            opened = conn.open_uni() => match opened {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(conv = conv.0, error = %e, "could not open a delivery stream");
                    return;
                }
            },
            // Unsubscribed while the client allowed no new stream: nothing to end.
            _ = &mut stop => return,
        };
        let mut cursor = Cursor {
            stream,
            out: Vec::with_capacity(WRITE_BATCH_BYTES),
            at: self.after,
            joined: head,
            user: self.user,
            conv,
            store: self.store,
            max_frame_len: self.max_frame_len,
            stop,
            revision: self.revision,
            receipts: (self.revision >= 2).then_some(receipts),
            shown: HashMap::new(),
        };
        let first = if self.revision >= 2 {
            DeliveryFrame::Opened {
                conv,
                epoch: self.epoch,
                request: self.request,
            }
        } else {
            DeliveryFrame::Start {
                conv,
                epoch: self.epoch,
            }
        };
        cursor.push(&first);
        cursor.push_receipts();
        let end = match cursor.deliver(live, head).await {
            Ok(Ended::Unsubscribed) => None,
            Ok(Ended::Removed) => Some(ErrorBody::new(ErrorCode::NOT_FOUND, "you were removed")),
            Ok(Ended::ConversationClosed) => Some(ErrorBody::new(
                ErrorCode::UNAVAILABLE,
                "the conversation stopped; subscribe again",
            )),
            Ok(Ended::Pruned(oldest)) => Some(ErrorBody::new(
                ErrorCode::PRUNED,
                format!(
                    "retention removed the events before seq {oldest}; subscribe after seq {}",
                    oldest.0.saturating_sub(1)
                ),
            )),
            Err(DeliveryError::Store(e)) => {
                tracing::error!(conv = conv.0, error = %e, "delivery failed");
                Some(ErrorBody {
                    code: ErrorCode::UNAVAILABLE,
                    message: "the server cannot read this conversation right now".into(),
                    retry_after_ms: Some(1000),
                })
            }
            // The client stopped the stream or the connection is gone: nobody to tell.
            Err(e) => {
                tracing::debug!(conv = conv.0, error = %e, "delivery stopped");
                return;
            }
        };
        if let Some(error) = end {
            cursor.push(&DeliveryFrame::End { error });
        }
        if cursor.flush().await.is_ok() {
            let _ = cursor.stream.finish();
        }
    }
}

/// One delivery stream and its position.
struct Cursor {
    stream: quinn::SendStream,
    /// Frames encoded but not yet written.
    out: Vec<u8>,
    /// The last seq encoded.
    at: Seq,
    /// The head when the subscription started: the user was a member then, so removals at or
    /// before it are history, and a removal after it ends the stream.
    joined: Seq,
    user: UserName,
    conv: ConversationId,
    store: Store,
    max_frame_len: u32,
    /// Resolves (or is dropped) when the client unsubscribes or its session ends.
    stop: oneshot::Receiver<()>,
    revision: u16,
    /// The conversation's durable receipts; `None` for a revision-1 session, or once the
    /// conversation's actor is gone.
    receipts: Option<watch::Receiver<ReceiptsView>>,
    /// The cursors last written, per member.
    shown: HashMap<UserName, (Seq, Seq)>,
}

impl Cursor {
    /// Replays up to `head`, then follows the live feed until delivery ends.
    async fn deliver(
        &mut self,
        mut live: broadcast::Receiver<Arc<LiveEvent>>,
        head: Seq,
    ) -> Result<Ended, DeliveryError> {
        if let Some(ended) = self.replay(head).await? {
            return Ok(ended);
        }
        loop {
            self.flush().await?;
            let next = tokio::select! {
                _ = &mut self.stop => return Ok(Ended::Unsubscribed),
                next = live.recv() => next,
                changed = receipts_changed(&mut self.receipts) => {
                    match changed {
                        Ok(()) => self.push_receipts(),
                        Err(_) => self.receipts = None,
                    }
                    continue;
                }
            };
            let ended = match next {
                Ok(event) => self.on_live(event, &mut live).await?,
                // Missed events are read from the store when the next one arrives.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    metrics::counter!(crate::metrics::DELIVERY_LAGGED).increment(1);
                    metrics::counter!(crate::metrics::DELIVERY_LAGGED_EVENTS).increment(missed);
                    None
                }
                Err(broadcast::error::RecvError::Closed) => Some(Ended::ConversationClosed),
            };
            if let Some(ended) = ended {
                return Ok(ended);
            }
        }
    }

    /// Whether the client unsubscribed (checked between replay pages, so a long replay stops
    /// promptly).
    fn stopped(&mut self) -> bool {
        !matches!(
            self.stop.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    fn push(&mut self, frame: &DeliveryFrame) {
        push_frame(&mut self.out, frame, self.max_frame_len);
    }

    /// Encodes the receipt cursors that changed since the last ones written.
    fn push_receipts(&mut self) {
        let Some(receipts) = &mut self.receipts else {
            return;
        };
        let current: ReceiptsView = receipts.borrow_and_update().clone();
        let changed: Vec<Receipt> = current
            .iter()
            .filter(|r| self.shown.get(&r.user) != Some(&(r.delivered, r.read)))
            .cloned()
            .collect();
        for receipt in changed {
            self.shown
                .insert(receipt.user.clone(), (receipt.delivered, receipt.read));
            self.push(&DeliveryFrame::Receipt(receipt));
        }
    }

    async fn flush(&mut self) -> Result<(), DeliveryError> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Encodes `event` if it is the next one (or copies its shared frame, for a live event);
    /// says whether it ends delivery. A seq that is not the next one is a broken store, never
    /// skipped.
    fn write(
        &mut self,
        event: &Event,
        shared: Option<&LiveEvent>,
    ) -> Result<Option<Ended>, DeliveryError> {
        if event.seq <= self.at {
            return Ok(None);
        }
        if event.seq != self.at.next() {
            return Err(StoreError::Corrupt(format!(
                "conversation {}: seq {} follows {}",
                self.conv, event.seq, self.at
            ))
            .into());
        }
        match shared {
            // An event that cannot be encoded is never skipped: the stream ends instead.
            Some(live) => match live.frame(self.revision, self.max_frame_len) {
                Some(frame) => self.out.extend_from_slice(&frame),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "conversation {}: seq {} cannot be encoded",
                        self.conv, event.seq
                    ))
                    .into())
                }
            },
            None => {
                let event = for_revision(event, self.revision);
                let at = self.out.len();
                if let Err(e) =
                    encode_frame_into(&EventFrame(&event), &mut self.out, self.max_frame_len)
                {
                    self.out.truncate(at);
                    return Err(StoreError::Corrupt(format!(
                        "conversation {}: seq {} cannot be encoded: {e}",
                        self.conv, event.seq
                    ))
                    .into());
                }
            }
        }
        self.at = event.seq;
        Ok(match &event.body {
            EventBody::MemberRemoved { user } if *user == self.user && event.seq > self.joined => {
                Some(Ended::Removed)
            }
            _ => None,
        })
    }

    /// Writes every stored event after the cursor up to `until`, page by page.
    async fn replay(&mut self, until: Seq) -> Result<Option<Ended>, DeliveryError> {
        if self.at < until {
            metrics::counter!(crate::metrics::REPLAYS).increment(1);
        }
        while self.at < until {
            if self.stopped() {
                return Ok(Some(Ended::Unsubscribed));
            }
            let want = (until.0 - self.at.0).min(REPLAY_PAGE as u64) as usize;
            let page = self.store.events_after(self.conv, self.at, want)?;
            if page.first().map(|e| e.seq) != Some(self.at.next()) {
                // Retention may have removed what this client missed: say so; anything else
                // is a gap the store cannot fill.
                let oldest = self.store.oldest(self.conv)?;
                if oldest > self.at.next() {
                    return Ok(Some(Ended::Pruned(oldest)));
                }
                return Err(StoreError::Corrupt(format!(
                    "conversation {}: seq {} is durable but missing",
                    self.conv,
                    self.at.next()
                ))
                .into());
            }
            metrics::counter!(crate::metrics::REPLAYED_EVENTS).increment(page.len() as u64);
            for event in &page {
                if let Some(ended) = self.write(event, None)? {
                    return Ok(Some(ended));
                }
            }
            self.flush().await?;
        }
        Ok(None)
    }

    /// Encodes a live event, after filling any gap before it from the store, and whatever
    /// live events are already queued behind it.
    async fn on_live(
        &mut self,
        mut live_event: Arc<LiveEvent>,
        live: &mut broadcast::Receiver<Arc<LiveEvent>>,
    ) -> Result<Option<Ended>, DeliveryError> {
        loop {
            let event = live_event.event();
            if event.seq > self.at.next() {
                if let Some(ended) = self.replay(Seq(event.seq.0 - 1)).await? {
                    return Ok(Some(ended));
                }
            }
            if let Some(ended) = self.write(event, Some(&live_event))? {
                return Ok(Some(ended));
            }
            if self.out.len() >= WRITE_BATCH_BYTES {
                return Ok(None);
            }
            match live.try_recv() {
                Ok(next) => live_event = next,
                Err(_) => return Ok(None),
            }
        }
    }
}

/// Resolves when the receipts change (an error once the conversation's actor is gone); never
/// for a session without receipts.
async fn receipts_changed(
    receipts: &mut Option<watch::Receiver<ReceiptsView>>,
) -> Result<(), watch::error::RecvError> {
    match receipts {
        Some(receipts) => receipts.changed().await,
        None => std::future::pending().await,
    }
}
