//! The sequencer of one conversation, without IO: it decides, the actor around it does the IO.
//!
//! Inputs are requests (a user's action: a message, a reply, an edit, a delete, a reaction;
//! `add_member`, `remove_member`) with the current time and the answers of store lookups (what
//! the store knows of a client message id, what is at a target seq); outputs are [`Append`]s (an
//! event at the next seq and the store writes that make it durable) or errors. Every rule is
//! checked at the moment a seq is assigned: membership, the target of an edit, delete or
//! reaction, and who may do what. So a send ordered after a member's removal is refused, and
//! an edit ordered after a delete is refused, never half-applied.
//!
//! Seqs are assigned here and nowhere else: gap-free, one at a time, in request order.

use std::collections::{BTreeSet, HashMap};

use quip_protocol::{
    limits, ClientMessageId, ConversationId, ErrorBody, ErrorCode, Event, EventBody, Seq, UserName,
};

use crate::store::{ConversationRecord, MessageRecord, StoredEvent, WriteBatch};

/// An event at a newly assigned seq, with the writes that make it durable.
#[derive(Debug)]
pub struct Append {
    pub event: Event,
    pub writes: WriteBatch,
}

/// The outcome of a user's action.
#[derive(Debug)]
pub enum Appended {
    New(Append),
    /// The sender already stored this client message id at this seq; nothing new is written.
    Duplicate(Seq),
}

/// What the sequencer needs to know about an earlier use of a client message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredId {
    /// Not stored before.
    Unknown,
    /// Stored at `seq`; `body` is that event, `None` if retention removed it since.
    Stored { seq: Seq, body: Option<EventBody> },
}

/// What is at the seq an action points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetLookup {
    /// Nothing: past the head, removed by retention, or seq 0.
    Missing,
    /// An event that is not a message (`Created`, a membership change, an edit, ...).
    NotAMessage,
    Message(TargetInfo),
}

/// A message, as the rules need it: who wrote it and what changed it since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub author: UserName,
    pub record: MessageRecord,
}

#[derive(Debug)]
pub struct Sequencer {
    conv: ConversationId,
    record: ConversationRecord,
    /// The last seq assigned. It may not be durable yet.
    assigned: Seq,
    /// Client message ids assigned but not yet durable, so a retry that races its original is
    /// caught before the store knows the id. Entries leave once durable.
    in_flight_ids: HashMap<(UserName, ClientMessageId), (Seq, EventBody)>,
    /// Messages sent or changed whose latest change is not durable yet, so that the next action
    /// on them sees it before the store does: the seq of that change, and the state after it.
    pending_targets: HashMap<Seq, (Seq, TargetInfo)>,
    /// Most members the conversation may have (`MEMBER_LIMIT` past it).
    max_members: usize,
}

/// Applies a membership event to a conversation's state; other events change nothing. The
/// sequencer applies it when it assigns the seq, the actor again when the seq is durable.
pub fn apply_membership(record: &mut ConversationRecord, body: &EventBody) {
    match body {
        EventBody::Created { members, .. } => record.members = members.iter().cloned().collect(),
        EventBody::MemberAdded { user } => {
            record.members.insert(user.clone());
        }
        EventBody::MemberRemoved { user } => {
            record.members.remove(user);
        }
        _ => {}
    }
}

fn is_membership(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::Created { .. } | EventBody::MemberAdded { .. } | EventBody::MemberRemoved { .. }
    )
}

/// The seq whose message an event sends or changes: its own for a message, its target for an
/// edit, delete or reaction.
fn changed_message(event: &Event) -> Option<Seq> {
    match &event.body {
        EventBody::Message { .. } | EventBody::Reply { .. } => Some(event.seq),
        EventBody::Edited { target, .. }
        | EventBody::Deleted { target, .. }
        | EventBody::ReactionAdded { target, .. }
        | EventBody::ReactionRemoved { target, .. } => Some(*target),
        _ => None,
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
            pending_targets: HashMap::new(),
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

    /// The seq of the client message id already in flight for this sender, if any.
    pub fn in_flight(&self, sender: &UserName, id: ClientMessageId) -> Option<Seq> {
        self.in_flight_ids
            .get(&(sender.clone(), id))
            .map(|(seq, _)| *seq)
    }

    /// The state of a message whose latest change is not durable yet, if `seq` is one.
    pub fn pending_target(&self, seq: Seq) -> Option<&TargetInfo> {
        self.pending_targets.get(&seq).map(|(_, info)| info)
    }

    /// Appends a message. See [`Sequencer::act`].
    pub fn send(
        &mut self,
        sender: &UserName,
        id: ClientMessageId,
        text: String,
        stored: StoredId,
        now_ms: u64,
    ) -> Result<Appended, ErrorBody> {
        self.act(
            sender,
            EventBody::Message { id, text },
            stored,
            None,
            now_ms,
        )
    }

    /// Appends a user's action — `body` is a `Message`, `Reply`, `Edited`, `Deleted`,
    /// `ReactionAdded` or `ReactionRemoved` — or finds the earlier one with the same client id.
    ///
    /// `stored` is what the store knows of this (sender, id); the actor looks it up only when
    /// the id is not in flight. `target` is what is at the seq the action points at (`None`
    /// for a plain message). The checks, in order: a retry (recognised before membership, so a
    /// sender removed since still learns the seq of its own action, and nothing else: ids are
    /// scoped to their sender); membership; that the target is a message and not deleted; who
    /// may (only the author edits; the author or the conversation's creator deletes); the
    /// reaction rules (one per emoji per user).
    pub fn act(
        &mut self,
        sender: &UserName,
        body: EventBody,
        stored: StoredId,
        target: Option<TargetLookup>,
        now_ms: u64,
    ) -> Result<Appended, ErrorBody> {
        let Some(id) = body.client_id() else {
            return Err(ErrorBody::new(
                ErrorCode::INVALID_REQUEST,
                "not a user's action",
            ));
        };
        let key = (sender.clone(), id);
        if let Some((seq, earlier)) = self.in_flight_ids.get(&key) {
            return same_request(Some(earlier), &body, *seq);
        }
        if let StoredId::Stored { seq, body: earlier } = stored {
            return same_request(earlier.as_ref(), &body, seq);
        }
        if !self.is_member(sender) {
            return Err(ErrorBody::not_found());
        }
        let changed = match body.target() {
            Some(at) => Some((at, self.check(sender, &body, target)?)),
            None => None,
        };
        let seq = self.assigned.next();
        self.in_flight_ids.insert(key, (seq, body.clone()));
        let mut writes = WriteBatch::new();
        writes.remember_message_id(self.conv, id, sender, seq);
        match changed {
            Some((at, info)) if !body.is_message() => {
                let mut info = info;
                apply_change(&mut info.record, sender, &body, seq);
                writes.put_message_record(self.conv, at, &info.record);
                if let EventBody::Deleted { .. } = body {
                    writes.erase_text(self.conv, at);
                    for edit in &info.record.edits {
                        writes.erase_text(self.conv, *edit);
                    }
                }
                self.pending_targets.insert(at, (seq, info));
            }
            _ => {
                let info = TargetInfo {
                    author: sender.clone(),
                    record: MessageRecord::default(),
                };
                self.pending_targets.insert(seq, (seq, info));
            }
        }
        Ok(Appended::New(self.append(
            sender.clone(),
            body,
            now_ms,
            writes,
        )))
    }

    /// The rules for an action on the message at `body.target()`; its state on success.
    fn check(
        &self,
        sender: &UserName,
        body: &EventBody,
        target: Option<TargetLookup>,
    ) -> Result<TargetInfo, ErrorBody> {
        let at = body.target().unwrap_or(Seq::ZERO);
        let info = match target {
            Some(TargetLookup::Message(info)) => info,
            Some(TargetLookup::NotAMessage) => {
                return Err(ErrorBody::new(
                    ErrorCode::NOT_A_MESSAGE,
                    format!("seq {at} is not a message"),
                ))
            }
            Some(TargetLookup::Missing) | None => {
                return Err(ErrorBody::new(
                    ErrorCode::NOT_A_MESSAGE,
                    format!("there is no message at seq {at}"),
                ))
            }
        };
        if let Some(deleted) = info.record.deleted {
            return Err(ErrorBody::new(
                ErrorCode::MESSAGE_DELETED,
                format!("the message at seq {at} was deleted (at seq {deleted})"),
            ));
        }
        match body {
            EventBody::Edited { .. } if info.author != *sender => Err(ErrorBody::new(
                ErrorCode::FORBIDDEN,
                "only the author edits a message",
            )),
            EventBody::Deleted { .. }
                if info.author != *sender && *sender != self.record.creator =>
            {
                Err(ErrorBody::new(
                    ErrorCode::FORBIDDEN,
                    "only the author or the conversation's creator deletes a message",
                ))
            }
            EventBody::ReactionAdded { emoji, .. } => {
                if info
                    .record
                    .reactions
                    .get(emoji)
                    .is_some_and(|users| users.contains(sender))
                {
                    Err(ErrorBody::new(
                        ErrorCode::REACTION_EXISTS,
                        format!("you already reacted with {emoji} to seq {at}"),
                    ))
                } else if info.record.reaction_count() >= limits::MAX_REACTIONS_PER_MESSAGE {
                    Err(ErrorBody::new(
                        ErrorCode::TOO_MANY_REACTIONS,
                        format!(
                            "the message at seq {at} has {} reactions, the most it may hold",
                            limits::MAX_REACTIONS_PER_MESSAGE
                        ),
                    ))
                } else {
                    Ok(info)
                }
            }
            EventBody::ReactionRemoved { emoji, .. }
                if !info
                    .record
                    .reactions
                    .get(emoji)
                    .is_some_and(|users| users.contains(sender)) =>
            {
                Err(ErrorBody::new(
                    ErrorCode::NO_REACTION,
                    format!("you have no reaction {emoji} on seq {at}"),
                ))
            }
            _ => Ok(info),
        }
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

    /// An event made durable: its client id no longer needs the in-flight map, and the state of
    /// the message it sent or changed is in the store (unless a later change is in flight).
    pub fn durable(&mut self, event: &Event) {
        if let Some(id) = event.body.client_id() {
            self.in_flight_ids.remove(&(event.sender.clone(), id));
        }
        if let Some(at) = changed_message(event) {
            if self
                .pending_targets
                .get(&at)
                .is_some_and(|(seq, _)| *seq == event.seq)
            {
                self.pending_targets.remove(&at);
            }
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
        let membership_changed = is_membership(&body);
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

/// What an edit, delete or reaction at `seq` does to its message's record.
pub fn apply_change(record: &mut MessageRecord, sender: &UserName, body: &EventBody, seq: Seq) {
    match body {
        EventBody::Edited { .. } => record.edits.push(seq),
        EventBody::Deleted { .. } => {
            record.deleted = Some(seq);
            record.reactions.clear();
        }
        EventBody::ReactionAdded { emoji, .. } => {
            record
                .reactions
                .entry(emoji.clone())
                .or_default()
                .insert(sender.clone());
        }
        EventBody::ReactionRemoved { emoji, .. } => {
            if let Some(users) = record.reactions.get_mut(emoji) {
                users.remove(sender);
                if users.is_empty() {
                    record.reactions.remove(emoji);
                }
            }
        }
        _ => {}
    }
}

/// A retry must be the same action: the same kind, target and text. A text the store no longer
/// has (the message was deleted) cannot be compared, and a body retention removed not at all:
/// the id alone then answers the retry.
fn same_request(
    earlier: Option<&EventBody>,
    now: &EventBody,
    seq: Seq,
) -> Result<Appended, ErrorBody> {
    let same = match earlier {
        None => true,
        Some(earlier) if earlier.text().is_some_and(str::is_empty) => {
            let mut now = now.clone();
            if let Some(text) = now.text_mut() {
                text.clear();
            }
            *earlier == now
        }
        Some(earlier) => earlier == now,
    };
    if same {
        Ok(Appended::Duplicate(seq))
    } else {
        Err(ErrorBody::new(
            ErrorCode::ID_REUSED,
            format!("this message id was already used for another request (at seq {seq})"),
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
            body: Some(EventBody::Message {
                id: ClientMessageId([7; 16]),
                text: "once".into(),
            }),
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
            body: Some(EventBody::Message {
                id: ClientMessageId([9; 16]),
                text: "mine".into(),
            }),
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

    // Edits, deletes, reactions and replies: the rules at seq assignment.

    fn msg(author: &str) -> TargetLookup {
        TargetLookup::Message(TargetInfo {
            author: user(author),
            record: MessageRecord::default(),
        })
    }

    fn act(
        s: &mut Sequencer,
        who: &str,
        body: EventBody,
        target: Option<TargetLookup>,
    ) -> Result<Appended, ErrorBody> {
        s.act(&user(who), body, StoredId::Unknown, target, 0)
    }

    fn edit(id: u8, target: u64, text: &str) -> EventBody {
        EventBody::Edited {
            id: ClientMessageId([id; 16]),
            target: Seq(target),
            text: text.into(),
        }
    }

    fn delete(id: u8, target: u64) -> EventBody {
        EventBody::Deleted {
            id: ClientMessageId([id; 16]),
            target: Seq(target),
        }
    }

    fn react(id: u8, target: u64, emoji: &str) -> EventBody {
        EventBody::ReactionAdded {
            id: ClientMessageId([id; 16]),
            target: Seq(target),
            emoji: emoji.into(),
        }
    }

    fn unreact(id: u8, target: u64, emoji: &str) -> EventBody {
        EventBody::ReactionRemoved {
            id: ClientMessageId([id; 16]),
            target: Seq(target),
            emoji: emoji.into(),
        }
    }

    fn code(result: Result<Appended, ErrorBody>) -> ErrorCode {
        result.expect_err("must be refused").code
    }

    #[test]
    fn only_the_author_edits() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 1, "typo"));
        assert_eq!(
            code(act(&mut s, "alice", edit(2, seq.0, "x"), Some(msg("bob")))),
            ErrorCode::FORBIDDEN,
            "not even the creator edits another's message"
        );
        let target = s.pending_target(seq).cloned().map(TargetLookup::Message);
        assert_eq!(
            new_seq(act(&mut s, "bob", edit(3, seq.0, "fixed"), target)),
            Seq(3)
        );
        assert_eq!(s.pending_target(seq).unwrap().record.edits, vec![Seq(3)]);
    }

    #[test]
    fn the_author_or_the_creator_deletes_nobody_else() {
        let mut s = new_conversation();
        s.add_member(&user("alice"), user("carol"), true, anyone, 0)
            .unwrap();
        let bobs = new_seq(sent(&mut s, "bob", 1, "mine"));
        assert_eq!(
            code(act(&mut s, "carol", delete(2, bobs.0), Some(msg("bob")))),
            ErrorCode::FORBIDDEN,
            "a member who is not the creator cannot delete another's message"
        );
        // The creator can; and then it is gone for every later action.
        new_seq(act(&mut s, "alice", delete(3, bobs.0), Some(msg("bob"))));
        let target = s.pending_target(bobs).cloned().map(TargetLookup::Message);
        assert!(s.pending_target(bobs).unwrap().record.deleted.is_some());
        for body in [
            edit(4, bobs.0, "x"),
            react(5, bobs.0, "👍"),
            delete(6, bobs.0),
        ] {
            assert_eq!(
                code(act(&mut s, "bob", body, target.clone())),
                ErrorCode::MESSAGE_DELETED
            );
        }
        // The author deletes its own.
        let carols = new_seq(sent(&mut s, "carol", 7, "hers"));
        new_seq(act(
            &mut s,
            "carol",
            delete(8, carols.0),
            Some(msg("carol")),
        ));
    }

    #[test]
    fn a_delete_erases_the_message_and_its_edits() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 1, "secret"));
        let target = || {
            Some(TargetLookup::Message(TargetInfo {
                author: user("bob"),
                record: MessageRecord {
                    edits: vec![Seq(3), Seq(4)],
                    ..MessageRecord::default()
                },
            }))
        };
        match act(&mut s, "bob", delete(2, seq.0), target()) {
            Ok(Appended::New(append)) => {
                let erased = append.writes.erased_texts();
                assert_eq!(erased, vec![seq, Seq(3), Seq(4)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_reaction_per_emoji_per_user() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "alice", 1, "lunch?"));
        let current = |s: &Sequencer| s.pending_target(seq).cloned().map(TargetLookup::Message);
        let t = current(&s);
        new_seq(act(&mut s, "bob", react(2, seq.0, "👍"), t));
        let t = current(&s);
        assert_eq!(
            code(act(&mut s, "bob", react(3, seq.0, "👍"), t)),
            ErrorCode::REACTION_EXISTS
        );
        let t = current(&s);
        new_seq(act(&mut s, "bob", react(4, seq.0, "🍜"), t));
        let t = current(&s);
        new_seq(act(&mut s, "alice", react(5, seq.0, "👍"), t));
        let t = current(&s);
        assert_eq!(
            code(act(&mut s, "alice", unreact(6, seq.0, "🍜"), t)),
            ErrorCode::NO_REACTION
        );
        let t = current(&s);
        new_seq(act(&mut s, "bob", unreact(7, seq.0, "👍"), t));
        let reactions = &s.pending_target(seq).unwrap().record.reactions;
        assert_eq!(reactions["👍"], [user("alice")].into());
        assert_eq!(reactions["🍜"], [user("bob")].into());
    }

    #[test]
    fn targets_must_be_messages_that_exist() {
        let mut s = new_conversation();
        for target in [None, Some(TargetLookup::Missing)] {
            assert_eq!(
                code(act(&mut s, "bob", edit(1, 99, "x"), target)),
                ErrorCode::NOT_A_MESSAGE
            );
        }
        assert_eq!(
            code(act(
                &mut s,
                "bob",
                react(2, 1, "👍"),
                Some(TargetLookup::NotAMessage)
            )),
            ErrorCode::NOT_A_MESSAGE,
            "the Created event is no message"
        );
        let reply = EventBody::Reply {
            id: ClientMessageId([3; 16]),
            text: "re".into(),
            reply_to: Seq(1),
        };
        assert_eq!(
            code(act(&mut s, "bob", reply, Some(TargetLookup::NotAMessage))),
            ErrorCode::NOT_A_MESSAGE
        );
        assert_eq!(s.assigned(), Seq(1), "nothing refused takes a seq");
    }

    #[test]
    fn a_non_member_learns_nothing_from_an_action() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 1, "hi"));
        let err = act(&mut s, "mallory", react(2, seq.0, "👍"), Some(msg("bob"))).unwrap_err();
        assert_eq!(err, ErrorBody::not_found());
    }

    #[test]
    fn retried_actions_answer_the_original_seq_even_after_a_delete() {
        let mut s = new_conversation();
        let seq = new_seq(sent(&mut s, "bob", 1, "hi"));
        let first = new_seq(act(
            &mut s,
            "alice",
            react(2, seq.0, "👍"),
            Some(msg("bob")),
        ));
        // In flight: the same id and body is the same reaction.
        assert!(matches!(
            act(&mut s, "alice", react(2, seq.0, "👍"), Some(msg("bob"))),
            Ok(Appended::Duplicate(d)) if d == first
        ));
        // Another body under that id is refused.
        assert_eq!(
            code(act(
                &mut s,
                "alice",
                react(2, seq.0, "🍜"),
                Some(msg("bob"))
            )),
            ErrorCode::ID_REUSED
        );
        // Stored with its text erased (the message was deleted since): the id answers.
        let stored = StoredId::Stored {
            seq,
            body: Some(EventBody::Message {
                id: ClientMessageId([1; 16]),
                text: String::new(),
            }),
        };
        let retry = s.act(
            &user("bob"),
            EventBody::Message {
                id: ClientMessageId([1; 16]),
                text: "hi".into(),
            },
            stored,
            None,
            0,
        );
        assert!(matches!(retry, Ok(Appended::Duplicate(d)) if d == seq));
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
