//! The fold of a conversation's events into the current state of its messages, without IO.
//!
//! Events are immutable; edits, deletes and reactions are later events that point at the seq of
//! the message they change. Applying every event in seq order (from a subscription, or a page
//! with its states) gives what a person sees: each message's latest text, tombstones, reactions.
//! An event about a message the timeline does not hold (older than what was loaded) changes
//! nothing; a [`Client::page`](crate::Client::page) brings that message with its state.

use std::collections::{BTreeMap, BTreeSet};

use quip_protocol::{ClientMessageId, Event, EventBody, MessageState, Seq, UserName};

/// One message as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    pub seq: Seq,
    pub sender: UserName,
    pub at_ms: u64,
    pub id: ClientMessageId,
    /// The latest text: the last edit's, or the message's own; empty once deleted.
    pub text: String,
    /// The message it replies to, for a reply.
    pub reply_to: Option<Seq>,
    /// The seq of the latest edit.
    pub edited: Option<Seq>,
    /// The seq of the delete: the message is a tombstone.
    pub deleted: Option<Seq>,
    /// Who reacted with which emoji.
    pub reactions: BTreeMap<String, BTreeSet<UserName>>,
}

/// The messages of one conversation, folded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    messages: BTreeMap<Seq, MessageView>,
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the next event (events must come in seq order).
    pub fn apply(&mut self, event: &Event) {
        match &event.body {
            EventBody::Message { id, text } => self.insert(event, *id, text, None),
            EventBody::Reply { id, text, reply_to } => {
                self.insert(event, *id, text, Some(*reply_to))
            }
            EventBody::Edited { target, text, .. } => {
                if let Some(m) = self.live(*target, &event.sender) {
                    m.text = text.clone();
                    m.edited = Some(event.seq);
                }
            }
            EventBody::Deleted { target, .. } => {
                if let Some(m) = self.messages.get_mut(target) {
                    m.text.clear();
                    m.deleted = Some(event.seq);
                    m.reactions.clear();
                }
            }
            EventBody::ReactionAdded { target, emoji, .. } => {
                if let Some(m) = self
                    .messages
                    .get_mut(target)
                    .filter(|m| m.deleted.is_none())
                {
                    m.reactions
                        .entry(emoji.clone())
                        .or_default()
                        .insert(event.sender.clone());
                }
            }
            EventBody::ReactionRemoved { target, emoji, .. } => {
                if let Some(m) = self.messages.get_mut(target) {
                    if let Some(users) = m.reactions.get_mut(emoji) {
                        users.remove(&event.sender);
                        if users.is_empty() {
                            m.reactions.remove(emoji);
                        }
                    }
                }
            }
            EventBody::Created { .. }
            | EventBody::MemberAdded { .. }
            | EventBody::MemberRemoved { .. }
            | EventBody::Unsupported { .. } => {}
        }
    }

    /// Applies a page of history: its events, then the states the server computed for its
    /// messages, which include changes made after the page.
    pub fn apply_page(&mut self, events: &[Event], states: &[MessageState]) {
        for event in events {
            self.apply(event);
        }
        for state in states {
            if let Some(m) = self.messages.get_mut(&state.seq) {
                if let Some(text) = &state.text {
                    m.text = text.clone();
                }
                m.edited = state.edited;
                m.deleted = state.deleted;
                if m.deleted.is_some() {
                    m.text.clear();
                }
                m.reactions = state
                    .reactions
                    .iter()
                    .map(|r| (r.emoji.clone(), r.users.iter().cloned().collect()))
                    .collect();
            }
        }
    }

    pub fn message(&self, seq: Seq) -> Option<&MessageView> {
        self.messages.get(&seq)
    }

    /// Every message held, in seq order (tombstones included).
    pub fn messages(&self) -> impl Iterator<Item = &MessageView> {
        self.messages.values()
    }

    fn insert(&mut self, event: &Event, id: ClientMessageId, text: &str, reply_to: Option<Seq>) {
        self.messages.insert(
            event.seq,
            MessageView {
                seq: event.seq,
                sender: event.sender.clone(),
                at_ms: event.at_ms,
                id,
                text: text.to_owned(),
                reply_to,
                edited: None,
                deleted: None,
                reactions: BTreeMap::new(),
            },
        );
    }

    /// A message not deleted and written by `author`: what an edit may change.
    fn live(&mut self, seq: Seq, author: &UserName) -> Option<&mut MessageView> {
        self.messages
            .get_mut(&seq)
            .filter(|m| m.deleted.is_none() && m.sender == *author)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(seq: u64, sender: &str, body: EventBody) -> Event {
        Event {
            seq: Seq(seq),
            sender: sender.parse().unwrap(),
            at_ms: seq,
            body,
        }
    }

    #[test]
    fn edits_deletes_and_reactions_fold_into_the_current_state() {
        let id = ClientMessageId([1; 16]);
        let mut t = Timeline::new();
        t.apply(&event(
            2,
            "alice",
            EventBody::Message {
                id,
                text: "hi".into(),
            },
        ));
        t.apply(&event(
            3,
            "bob",
            EventBody::Reply {
                id,
                text: "yo".into(),
                reply_to: Seq(2),
            },
        ));
        t.apply(&event(
            4,
            "alice",
            EventBody::Edited {
                id,
                target: Seq(2),
                text: "hello".into(),
            },
        ));
        t.apply(&event(
            5,
            "bob",
            EventBody::Edited {
                id,
                target: Seq(2),
                text: "not his".into(),
            },
        ));
        t.apply(&event(
            6,
            "bob",
            EventBody::ReactionAdded {
                id,
                target: Seq(2),
                emoji: "👍".into(),
            },
        ));
        t.apply(&event(
            7,
            "carol",
            EventBody::ReactionAdded {
                id,
                target: Seq(2),
                emoji: "👍".into(),
            },
        ));
        t.apply(&event(
            8,
            "bob",
            EventBody::ReactionRemoved {
                id,
                target: Seq(2),
                emoji: "👍".into(),
            },
        ));
        let m = t.message(Seq(2)).unwrap();
        assert_eq!(m.text, "hello");
        assert_eq!(m.edited, Some(Seq(4)));
        assert_eq!(
            m.reactions["👍"]
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>(),
            ["carol"]
        );
        assert_eq!(t.message(Seq(3)).unwrap().reply_to, Some(Seq(2)));
        t.apply(&event(
            9,
            "alice",
            EventBody::Deleted { id, target: Seq(2) },
        ));
        let m = t.message(Seq(2)).unwrap();
        assert_eq!((m.text.as_str(), m.deleted), ("", Some(Seq(9))));
        assert!(m.reactions.is_empty());
    }
}
