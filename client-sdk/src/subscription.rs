use quip_protocol::{ConversationId, ErrorBody, Event, Seq};
use tokio::sync::mpsc;

use crate::ClientError;

/// What a delivery stream hands to its subscription.
#[derive(Debug)]
pub(crate) enum Delivered {
    Event(Event),
    /// The server ended the stream, saying why.
    End(ErrorBody),
    /// The stream broke (connection lost, malformed frame).
    Lost(ClientError),
}

/// The live events of one conversation, in seq order with no gap and no duplicate.
///
/// Dropping it unsubscribes.
pub struct Subscription {
    pub(crate) conv: ConversationId,
    pub(crate) head: Seq,
    pub(crate) events: mpsc::Receiver<Delivered>,
    pub(crate) finished: bool,
    pub(crate) on_drop: Option<Box<dyn FnOnce() + Send + Sync>>,
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

    /// The next event; `None` once the server ended the stream normally (after the error that
    /// says why, if any).
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        if self.finished {
            return None;
        }
        match self.events.recv().await {
            Some(Delivered::Event(event)) => Some(Ok(event)),
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
