//! The sequencer of one conversation, without IO: it decides, the actor around it does the IO.
//!
//! Inputs are requests (`send`, `add_member`, `remove_member`) with the current time and the
//! answers of store lookups; outputs are [`Append`]s (an event at the next seq and the store
//! writes that make it durable) or errors. Membership is checked and changed at the moment a seq
//! is assigned, so a send ordered after a member's removal is refused, never half-applied.
//!
//! Seqs are assigned here and nowhere else: gap-free, one at a time, in request order.

use std::collections::{BTreeSet, HashMap};

use quip_protocol::{
    ClientMessageId, ConversationId, ErrorBody, ErrorCode, Event, EventBody, Seq, UserName,
};

use crate::store::{ConversationRecord, StoredEvent, WriteBatch};

/// An event at a newly assigned seq, with the writes that make it durable.
#[derive(Debug)]
pub struct Append {
    pub event: Event,
    pub writes: WriteBatch,
}

/// The outcome of a send.
#[derive(Debug)]
pub enum Appended {
    New(Append),
    /// The sender already stored this message id at this seq; nothing new is written.
    Duplicate(Seq),
}

/// What the sequencer needs to know about an earlier use of a message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredId {
    /// Not stored before.
    Unknown,
    /// Stored at `seq` with this text.
    Stored { seq: Seq, text: String },
}

#[derive(Debug)]
pub struct Sequencer {
    conv: ConversationId,
    record: ConversationRecord,
    /// The last seq assigned. It may not be durable yet.
    assigned: Seq,
    /// Message ids assigned but not yet durable, so a retry that races its original is caught
    /// before the store knows the id. Entries leave once durable.
    in_flight_ids: HashMap<(UserName, ClientMessageId), (Seq, String)>,
    /// Most members the conversation may have (`MEMBER_LIMIT` past it).
    max_members: usize,
}

/// Applies a membership event to a conversation's state; messages change nothing. The sequencer
/// applies it when it assigns the seq, the actor again when the seq is durable.
pub fn apply_membership(record: &mut ConversationRecord, body: &EventBody) {
    match body {
        EventBody::Created { members, .. } => record.members = members.iter().cloned().collect(),
        EventBody::MemberAdded { user } => {
            record.members.insert(user.clone());
        }
        EventBody::MemberRemoved { user } => {
            record.members.remove(user);
        }
        EventBody::Message { .. } | EventBody::Unsupported { .. } => {}
    }
}

impl Sequencer {
    /// A conversation loaded from the store, whose last event is `head`.
    pub fn load(conv: ConversationId, record: ConversationRecord, head: Seq) -> Self {
        Sequencer {
            conv,
            record,
            assigned: head,
            in_flight_ids: HashMap::new(),
            max_members: usize::MAX,
        }
    }

    /// Sets the most members `add_member` lets the conversation have.
    pub fn with_max_members(mut self, max_members: usize) -> Self {
        self.max_members = max_members;
        self
    }

    /// A new conversation and its first event, `Created` at seq 1.
    pub fn create(
        conv: ConversationId,
        creator: UserName,
        title: String,
        invited: Vec<UserName>,
        now_ms: u64,
    ) -> (Self, Append) {
        let mut members: BTreeSet<UserName> = invited.into_iter().collect();
        members.insert(creator.clone());
        let record = ConversationRecord {
            title: title.clone(),
            creator: creator.clone(),
            members: BTreeSet::new(),
            created_at_ms: now_ms,
        };
        let mut sequencer = Sequencer::load(conv, record, Seq::ZERO);
        let body = EventBody::Created {
            title,
            members: members.iter().cloned().collect(),
        };
        let mut writes = WriteBatch::new();
        for member in &members {
            writes.add_membership(member, conv);
        }
        let append = sequencer.append(creator, body, now_ms, writes);
        (sequencer, append)
    }

    pub fn conv(&self) -> ConversationId {
        self.conv
    }

    pub fn record(&self) -> &ConversationRecord {
        &self.record
    }

    pub fn is_member(&self, user: &UserName) -> bool {
        self.record.members.contains(user)
    }

    /// The last seq assigned (durable or not).
    pub fn assigned(&self) -> Seq {
        self.assigned
    }

    /// The message id already in flight for this sender, if any.
    pub fn in_flight(&self, sender: &UserName, id: ClientMessageId) -> Option<Seq> {
        self.in_flight_ids
            .get(&(sender.clone(), id))
            .map(|(seq, _)| *seq)
    }

    /// Appends a message, or finds the earlier one with the same id.
    ///
    /// `stored` is what the store knows of this (sender, id); the actor looks it up only when
    /// the id is not in flight. A retry is recognised before membership is checked: a sender
    /// removed after its message was stored still learns the seq of its own message (and
    /// nothing else, since ids are scoped to their sender).
    pub fn send(
        &mut self,
        sender: &UserName,
        id: ClientMessageId,
        text: String,
        stored: StoredId,
        now_ms: u64,
    ) -> Result<Appended, ErrorBody> {
        let key = (sender.clone(), id);
        if let Some((seq, earlier)) = self.in_flight_ids.get(&key) {
            return same_text(*earlier == text, *seq);
        }
        if let StoredId::Stored { seq, text: stored } = stored {
            return same_text(stored == text, seq);
        }
        if !self.is_member(sender) {
            return Err(ErrorBody::not_found());
        }
        let seq = self.assigned.next();
        self.in_flight_ids.insert(key, (seq, text.clone()));
        let mut writes = WriteBatch::new();
        writes.remember_message_id(self.conv, id, sender, seq);
        let body = EventBody::Message { id, text };
        Ok(Appended::New(self.append(
            sender.clone(),
            body,
            now_ms,
            writes,
        )))
    }

    /// Adds `user`; only the creator may. `user_exists` is the answer of the user directory;
    /// `may_join` is asked last, once every rule of the conversation allows the addition (it
    /// checks, and counts, the user's own limit of conversations).
    pub fn add_member(
        &mut self,
        by: &UserName,
        user: UserName,
        user_exists: bool,
        may_join: impl FnOnce(&UserName) -> Result<(), ErrorBody>,
        now_ms: u64,
    ) -> Result<Append, ErrorBody> {
        if !self.is_member(by) {
            return Err(ErrorBody::not_found());
        }
        if by != &self.record.creator {
            return Err(ErrorBody::new(
                ErrorCode::FORBIDDEN,
                "only the conversation's creator adds members",
            ));
        }
        if !user_exists {
            return Err(ErrorBody::new(
                ErrorCode::UNKNOWN_USER,
                format!("no user named {user}"),
            ));
        }
        if self.is_member(&user) {
            return Err(ErrorBody::new(
                ErrorCode::INVALID_REQUEST,
                format!("{user} is already a member"),
            ));
        }
        if self.record.members.len() >= self.max_members {
            return Err(ErrorBody::new(
                ErrorCode::MEMBER_LIMIT,
                format!(
                    "the conversation has {} members, the most this server allows",
                    self.record.members.len()
                ),
            ));
        }
        may_join(&user)?;
        let mut writes = WriteBatch::new();
        writes.add_membership(&user, self.conv);
        Ok(self.append(by.clone(), EventBody::MemberAdded { user }, now_ms, writes))
    }

    /// Removes `user`: the creator removes anyone but itself, any other member removes itself
    /// (leaves). The creator stays, so that every conversation keeps someone who can add members.
    pub fn remove_member(
        &mut self,
        by: &UserName,
        user: UserName,
        now_ms: u64,
    ) -> Result<Append, ErrorBody> {
        if !self.is_member(by) {
            return Err(ErrorBody::not_found());
        }
        if by != &self.record.creator && by != &user {
            return Err(ErrorBody::new(
                ErrorCode::FORBIDDEN,
                "only the conversation's creator removes other members",
            ));
        }
        if user == self.record.creator {
            return Err(ErrorBody::new(
                ErrorCode::FORBIDDEN,
                "the conversation's creator cannot leave it",
            ));
        }
        if !self.is_member(&user) {
            return Err(ErrorBody::new(
                ErrorCode::INVALID_REQUEST,
                format!("{user} is not a member"),
            ));
        }
        let mut writes = WriteBatch::new();
        writes.remove_membership(&user, self.conv);
        Ok(self.append(
            by.clone(),
            EventBody::MemberRemoved { user },
            now_ms,
            writes,
        ))
    }

    /// Removes a user whose account is being removed: it leaves (a `MemberRemoved` it sent
    /// itself), even if it is the creator, which then no longer administers the conversation.
    /// `None` if it is not a member.
    pub fn remove_account(&mut self, user: &UserName, now_ms: u64) -> Option<Append> {
        if !self.is_member(user) {
            return None;
        }
        let mut writes = WriteBatch::new();
        writes.remove_membership(user, self.conv);
        let body = EventBody::MemberRemoved { user: user.clone() };
        Some(self.append(user.clone(), body, now_ms, writes))
    }

    /// An event made durable: its message id no longer needs the in-flight map.
    pub fn durable(&mut self, event: &Event) {
        if let EventBody::Message { id, .. } = &event.body {
            self.in_flight_ids.remove(&(event.sender.clone(), *id));
        }
    }

    fn append(
        &mut self,
        sender: UserName,
        body: EventBody,
        now_ms: u64,
        mut writes: WriteBatch,
    ) -> Append {
        let seq = self.assigned.next();
        self.assigned = seq;
        apply_membership(&mut self.record, &body);
        let membership_changed = !matches!(body, EventBody::Message { .. });
        let stored = StoredEvent {
            sender,
            at_ms: now_ms,
            body,
        };
        writes.append_event(self.conv, seq, &stored);
        if membership_changed {
            writes.put_conversation(self.conv, &self.record);
        }
        Append {
            event: stored.into_event(seq),
            writes,
        }
    }
}

fn same_text(same: bool, seq: Seq) -> Result<Appended, ErrorBody> {
    if same {
        Ok(Appended::Duplicate(seq))
    } else {
        Err(ErrorBody::new(
            ErrorCode::ID_REUSED,
            format!("this message id was already used for another text (at seq {seq})"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserName {
        name.parse().unwrap()
    }

    fn anyone(_: &UserName) -> Result<(), ErrorBody> {
        Ok(())
    }

    fn new_conversation() -> Sequencer {
        let (seq, first) = Sequencer::create(
            ConversationId(1),
            user("alice"),
            "t".into(),
            vec![user("bob")],
            0,
        );
        assert_eq!(first.event.seq, Seq(1));
        seq
    }

    fn sent(s: &mut Sequencer, who: &str, id: u8, text: &str) -> Result<Appended, ErrorBody> {
        s.send(
            &user(who),
            ClientMessageId([id; 16]),
            text.into(),
            StoredId::Unknown,
            0,
        )
    }

    fn new_seq(a: Result<Appended, ErrorBody>) -> Seq {
        match a {
            Ok(Appended::New(append)) => append.event.seq,
            other => panic!("expected a new append, got {other:?}"),
        }
    }

    #[test]
    fn seqs_are_consecutive_across_event_kinds() {
        let mut s = new_conversation();
        assert_eq!(new_seq(sent(&mut s, "alice", 1, "hi")), Seq(2));
        let added = s
            .add_member(&user("alice"), user("carol"), true, anyone, 0)
            .unwrap();
        assert_eq!(added.event.seq, Seq(3));
        assert_eq!(new_seq(sent(&mut s, "carol", 2, "hey")), Seq(4));
        assert_eq!(s.assigned(), Seq(4));
    }

    #[test]
    fn retry_in_flight_or_stored_returns_the_original_seq() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 7, "once"));
        assert!(matches!(sent(&mut s, "bob", 7, "once"), Ok(Appended::Duplicate(d)) if d == seq));
        // Once durable the in-flight entry is gone and the store's answer decides.
        let event = Event {
            seq,
            sender: user("bob"),
            at_ms: 0,
            body: EventBody::Message {
                id: ClientMessageId([7; 16]),
                text: "once".into(),
            },
        };
        s.durable(&event);
        assert_eq!(s.in_flight(&user("bob"), ClientMessageId([7; 16])), None);
        let stored = StoredId::Stored {
            seq,
            text: "once".into(),
        };
        let again = s.send(
            &user("bob"),
            ClientMessageId([7; 16]),
            "once".into(),
            stored,
            0,
        );
        assert!(matches!(again, Ok(Appended::Duplicate(d)) if d == seq));
        assert_eq!(s.assigned(), seq, "a duplicate assigns nothing");
    }

    #[test]
    fn reusing_an_id_for_other_text_is_refused() {
        let mut s = new_conversation();
        new_seq(sent(&mut s, "bob", 7, "once"));
        let err = sent(&mut s, "bob", 7, "different").unwrap_err();
        assert_eq!(err.code, ErrorCode::ID_REUSED);
    }

    #[test]
    fn the_same_id_from_two_senders_is_two_messages() {
        let mut s = new_conversation();
        let a = new_seq(sent(&mut s, "alice", 7, "x"));
        let b = new_seq(sent(&mut s, "bob", 7, "x"));
        assert_ne!(a, b);
    }

    #[test]
    fn non_members_get_not_found_for_everything() {
        let mut s = new_conversation();
        let errs = [
            sent(&mut s, "mallory", 1, "x").unwrap_err(),
            s.add_member(&user("mallory"), user("eve"), true, anyone, 0)
                .unwrap_err(),
            s.remove_member(&user("mallory"), user("bob"), 0)
                .unwrap_err(),
        ];
        for err in errs {
            assert_eq!(err, ErrorBody::not_found());
        }
        assert_eq!(s.assigned(), Seq(1));
    }

    #[test]
    fn the_creator_cannot_leave() {
        let mut s = new_conversation();
        let err = s
            .remove_member(&user("alice"), user("alice"), 0)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::FORBIDDEN);
        assert!(s.is_member(&user("alice")));
    }

    #[test]
    fn a_removed_sender_still_learns_the_seq_of_its_own_stored_message() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 9, "mine"));
        s.remove_member(&user("alice"), user("bob"), 0).unwrap();
        // In flight: answered from the sequencer's memory.
        assert!(matches!(sent(&mut s, "bob", 9, "mine"), Ok(Appended::Duplicate(d)) if d == seq));
        // Durable: answered from the store's record.
        let stored = StoredId::Stored {
            seq,
            text: "mine".into(),
        };
        let retry = s.send(
            &user("bob"),
            ClientMessageId([9; 16]),
            "mine".into(),
            stored,
            0,
        );
        assert!(matches!(retry, Ok(Appended::Duplicate(d)) if d == seq));
        // A new message is refused as for any non-member.
        assert_eq!(
            sent(&mut s, "bob", 10, "new").unwrap_err(),
            ErrorBody::not_found()
        );
    }

    #[test]
    fn a_send_after_removal_is_refused() {
        let mut s = new_conversation();
        s.remove_member(&user("alice"), user("bob"), 0).unwrap();
        assert_eq!(
            sent(&mut s, "bob", 1, "late").unwrap_err(),
            ErrorBody::not_found()
        );
    }

    #[test]
    fn only_the_creator_manages_others_but_anyone_may_leave() {
        let mut s = new_conversation();
        let err = s
            .add_member(&user("bob"), user("carol"), true, anyone, 0)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::FORBIDDEN);
        let err = s.remove_member(&user("bob"), user("alice"), 0).unwrap_err();
        assert_eq!(err.code, ErrorCode::FORBIDDEN);
        let err = s
            .add_member(&user("alice"), user("nobody"), false, anyone, 0)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UNKNOWN_USER);
        s.remove_member(&user("bob"), user("bob"), 0).unwrap();
        assert!(!s.is_member(&user("bob")));
    }

    #[test]
    fn the_member_limit_is_checked_before_the_users_own_limit() {
        let mut s = new_conversation().with_max_members(3);
        s.add_member(&user("alice"), user("carol"), true, anyone, 0)
            .unwrap();
        let asked = std::cell::Cell::new(false);
        let err = s
            .add_member(
                &user("alice"),
                user("dave"),
                true,
                |_| {
                    asked.set(true);
                    Ok(())
                },
                0,
            )
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::MEMBER_LIMIT);
        assert!(
            !asked.get(),
            "a refused addition must not count against the user"
        );
        assert_eq!(s.assigned(), Seq(2));
        // Below the limit the user's own limit decides, and nothing is appended when it refuses.
        s.remove_member(&user("alice"), user("carol"), 0).unwrap();
        let full = |_: &UserName| Err(ErrorBody::new(ErrorCode::CONVERSATION_LIMIT, "full"));
        let err = s
            .add_member(&user("alice"), user("dave"), true, full, 0)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::CONVERSATION_LIMIT);
        assert_eq!(s.assigned(), Seq(3));
    }

    #[test]
    fn an_account_removal_takes_even_the_creator_out() {
        let mut s = new_conversation();
        let removed = s.remove_account(&user("alice"), 0).unwrap();
        assert_eq!(removed.event.sender, user("alice"));
        assert_eq!(
            removed.event.body,
            EventBody::MemberRemoved {
                user: user("alice")
            }
        );
        assert!(!s.is_member(&user("alice")));
        assert!(s.remove_account(&user("alice"), 0).is_none());
        // Nobody administers it now; the others still talk and may leave.
        let err = s
            .add_member(&user("bob"), user("carol"), true, anyone, 0)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::FORBIDDEN);
        assert_eq!(new_seq(sent(&mut s, "bob", 1, "still here")), Seq(3));
    }
}
