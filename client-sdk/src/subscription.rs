use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use quip_protocol::{ConversationId, ErrorBody, Event, Receipt, Seq, UserName};
use tokio::sync::{mpsc, Notify};

use crate::ClientError;

/// Who an event came from, as this client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This client sent it (its client message id is one this client used).
    ThisDevice,
    /// The same user, from another device (or from this one before it restarted).
    OtherDevice,
    /// Another member, or the server (membership events are the member's who made them).
    Someone,
}

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The next event of the conversation.
    Event { event: Event, origin: Origin },
    /// A member's receipt cursors moved (or, right after subscribing, their current values).
    Receipt(Receipt),
}

/// What a delivery stream hands to its subscription.
#[derive(Debug)]
pub(crate) enum Delivered {
    Event(Event, Origin),
    Receipt(Receipt),
    /// The server ended the stream, saying why.
    End(ErrorBody),
    /// The stream broke (connection lost, malformed frame).
    Lost(ClientError),
}

/// The seq of the last event the app took from a subscription: what the state file keeps, so
/// that events still buffered when the app stops are delivered again by the next run.
pub(crate) type Taken = Arc<Mutex<Option<Seq>>>;

/// The live events of one conversation, in seq order with no gap and no duplicate.
///
/// Dropping it unsubscribes.
pub struct Subscription {
    pub(crate) conv: ConversationId,
    pub(crate) head: Seq,
    pub(crate) events: mpsc::Receiver<Delivered>,
    pub(crate) finished: bool,
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// The latest receipt cursors seen, per member.
    pub(crate) receipts: BTreeMap<UserName, Receipt>,
    pub(crate) taken: Taken,
    /// Wakes the state file's writer when the app took an event.
    pub(crate) persist: Option<Arc<Notify>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("conv", &self.conv)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub fn conv(&self) -> ConversationId {
        self.conv
    }

    /// The conversation's last seq when the subscription started: events after it are live.
    pub fn head(&self) -> Seq {
        self.head
    }

    /// The latest receipt cursors this subscription has seen, per member.
    pub fn receipts(&self) -> &BTreeMap<UserName, Receipt> {
        &self.receipts
    }

    /// The next event; `None` once the server ended the stream normally (after the error that
    /// says why, if any). Receipts that arrive meanwhile are kept in [`Subscription::receipts`].
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        loop {
            match self.next_update().await? {
                Ok(Update::Event { event, .. }) => return Some(Ok(event)),
                Ok(Update::Receipt(_)) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next event, with who it came from, or the next receipt change.
    pub async fn next_update(&mut self) -> Option<Result<Update, ClientError>> {
        if self.finished {
            return None;
        }
        match self.events.recv().await {
            Some(Delivered::Event(event, origin)) => {
                *self.taken.lock().unwrap_or_else(|e| e.into_inner()) = Some(event.seq);
                if let Some(persist) = &self.persist {
                    persist.notify_one();
                }
                Some(Ok(Update::Event { event, origin }))
            }
            Some(Delivered::Receipt(receipt)) => {
                self.receipts.insert(receipt.user.clone(), receipt.clone());
                Some(Ok(Update::Receipt(receipt)))
            }
            Some(Delivered::End(error)) => {
                self.finished = true;
                Some(Err(ClientError::Server(error)))
            }
            Some(Delivered::Lost(error)) => {
                self.finished = true;
                Some(Err(error))
            }
            None => {
                self.finished = true;
                Some(Err(ClientError::ConnectionLost(
                    "delivery stream closed".into(),
                )))
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(unsubscribe) = self.on_drop.take() {
            unsubscribe();
        }
    }
}
