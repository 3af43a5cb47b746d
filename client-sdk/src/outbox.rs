//! The SDK's delivery bookkeeping, without IO: the outbox of unacknowledged sends and the
//! per-conversation cursor that keeps duplicates and gaps away from the app.

use std::collections::BTreeMap;

use quip_protocol::{ClientMessageId, ConversationId, Request, Seq};
use serde::{Deserialize, Serialize};

use crate::ClientError;

/// One unacknowledged action: pending, for optimistic display, until it resolves with its seq
/// (acked) or with the server's reason (failed for good, not retried). Every action has a client
/// message id, so a retry after a reconnect is stored once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub conv: ConversationId,
    pub id: ClientMessageId,
    /// The text of a message, a reply or an edit; empty for the others.
    pub text: String,
    /// What the entry does; a plain message in state files written before actions existed.
    #[serde(default, skip_serializing_if = "Action::is_message")]
    pub action: Action,
}

/// The kinds of user action a client sends (each is an event in the conversation's sequence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    #[default]
    Message,
    Reply {
        reply_to: Seq,
    },
    Edit {
        target: Seq,
    },
    Delete {
        target: Seq,
    },
    React {
        target: Seq,
        emoji: String,
    },
    Unreact {
        target: Seq,
        emoji: String,
    },
}

impl Action {
    fn is_message(&self) -> bool {
        *self == Action::Message
    }
}

impl OutboxEntry {
    /// A plain message.
    pub fn message(conv: ConversationId, id: ClientMessageId, text: impl Into<String>) -> Self {
        OutboxEntry {
            conv,
            id,
            text: text.into(),
            action: Action::Message,
        }
    }

    /// The request that carries it (the same on every attempt).
    pub fn request(&self) -> Request {
        let (conv, id, text) = (self.conv, self.id, self.text.clone());
        match &self.action {
            Action::Message => Request::Send { conv, id, text },
            Action::Reply { reply_to } => Request::SendReply {
                conv,
                id,
                text,
                reply_to: *reply_to,
            },
            Action::Edit { target } => Request::Edit {
                conv,
                id,
                target: *target,
                text,
            },
            Action::Delete { target } => Request::Delete {
                conv,
                id,
                target: *target,
            },
            Action::React { target, emoji } => Request::React {
                conv,
                id,
                target: *target,
                emoji: emoji.clone(),
            },
            Action::Unreact { target, emoji } => Request::Unreact {
                conv,
                id,
                target: *target,
                emoji: emoji.clone(),
            },
        }
    }
}

/// Unacknowledged sends in the order they were made. That order is the order they are
/// (re-)sent in, so a sender's messages keep their order across reconnects.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    next: u64,
    pending: BTreeMap<u64, OutboxEntry>,
}

impl Outbox {
    /// Adds a message; returns its place in the send order.
    pub fn push(&mut self, entry: OutboxEntry) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, entry);
        self.next
    }

    /// The message left the outbox (acked, or failed for good).
    pub fn remove(&mut self, key: u64) -> Option<OutboxEntry> {
        self.pending.remove(&key)
    }

    pub fn get(&self, key: u64) -> Option<&OutboxEntry> {
        self.pending.get(&key)
    }

    /// Every pending message, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = (u64, &OutboxEntry)> {
        self.pending.iter().map(|(k, e)| (*k, e))
    }
}

/// Whether a server error means "retrying the same send cannot help".
pub(crate) fn is_permanent(error: &ClientError) -> bool {
    match error {
        ClientError::Server(body) => {
            // 5xx: the server could not do it now; everything else is about the request.
            !(500..600).contains(&body.code.0)
                && body.code != quip_protocol::ErrorCode::RATE_LIMITED
        }
        ClientError::Config(_) | ClientError::Invalid(_) => true,
        _ => false,
    }
}

/// What a cursor says of the next delivered seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// The next seq: hand it to the app.
    Deliver,
    /// Already delivered (a resumed stream may overlap): drop it.
    Duplicate,
    /// Seqs are missing before it: the stream broke the protocol.
    Gap { expected: Seq },
}

/// The last seq handed to the app for one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Cursor {
    /// `None` until the first event or the subscription's head is known (a subscription that
    /// starts at the latest seq learns it from the server).
    pub at: Option<Seq>,
}

impl Cursor {
    pub fn admit(&mut self, seq: Seq) -> Admit {
        match self.at {
            Some(at) if seq <= at => Admit::Duplicate,
            Some(at) if seq > at.next() => Admit::Gap {
                expected: at.next(),
            },
            _ => {
                self.at = Some(seq);
                Admit::Deliver
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> OutboxEntry {
        OutboxEntry::message(ConversationId(1), ClientMessageId([n; 16]), format!("m{n}"))
    }

    #[test]
    fn outbox_keeps_send_order_across_acks() {
        let mut outbox = Outbox::default();
        let keys: Vec<u64> = (1..=4).map(|n| outbox.push(entry(n))).collect();
        outbox.remove(keys[1]);
        let order: Vec<String> = outbox.pending().map(|(_, e)| e.text.clone()).collect();
        assert_eq!(order, ["m1", "m3", "m4"]);
    }

    #[test]
    fn cursor_drops_overlap_and_flags_gaps() {
        let mut cursor = Cursor { at: Some(Seq(5)) };
        assert_eq!(cursor.admit(Seq(4)), Admit::Duplicate);
        assert_eq!(cursor.admit(Seq(5)), Admit::Duplicate);
        assert_eq!(cursor.admit(Seq(6)), Admit::Deliver);
        assert_eq!(cursor.admit(Seq(8)), Admit::Gap { expected: Seq(7) });
        let mut fresh = Cursor::default();
        assert_eq!(fresh.admit(Seq(42)), Admit::Deliver);
        assert_eq!(fresh.at, Some(Seq(42)));
    }

    #[test]
    fn only_request_errors_are_permanent() {
        use quip_protocol::{ErrorBody, ErrorCode};
        let server = |code| ClientError::Server(ErrorBody::new(code, ""));
        assert!(is_permanent(&server(ErrorCode::NOT_FOUND)));
        assert!(is_permanent(&server(ErrorCode::MESSAGE_TOO_LARGE)));
        assert!(!is_permanent(&server(ErrorCode::UNAVAILABLE)));
        assert!(!is_permanent(&server(ErrorCode::GOING_AWAY)));
        assert!(!is_permanent(&server(ErrorCode::RATE_LIMITED)));
        assert!(!is_permanent(&ClientError::ConnectionLost("x".into())));
        let invalid = ErrorBody::new(ErrorCode::MESSAGE_TOO_LARGE, "");
        assert!(is_permanent(&ClientError::Invalid(invalid)));
    }
}
