//! The frames. Three kinds of stream carry three frame types:
//!
//! - the control stream (the first bidirectional stream, opened by the client) carries
//!   [`ClientFrame`]s up and [`ServerFrame`]s down;
//! - a delivery stream (unidirectional, opened by the server, one per subscribed conversation)
//!   carries [`DeliveryFrame`]s.

use serde::{Deserialize, Serialize};

use crate::datagrams::PresenceInfo;
use crate::error::{ErrorBody, ErrorCode};
use crate::ids::{ClientMessageId, ConversationId, Epoch, RequestId, Seq, UserName};
use crate::limits;

/// Client to server, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// Must be the first frame. Anything else first closes the connection.
    Hello {
        token: String,
        /// Free text naming the client software, for the server's logs.
        client: String,
        /// The highest protocol revision the client understands (see [`crate::REVISION`]).
        revision: u16,
    },
    Request {
        id: RequestId,
        request: Request,
    },
}

/// What a client asks. Each is answered by exactly one `ServerFrame::Reply` or
/// `ServerFrame::Error` with the same `RequestId`, in any order relative to other requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Creates a conversation whose members are the caller and `members`.
    /// Answered by `Response::Created`.
    CreateConversation {
        title: String,
        members: Vec<UserName>,
    },
    /// Appends a message. Answered by `Response::Sent` once the message is durable.
    /// Sends on one control stream are sequenced in the order they were written.
    Send {
        conv: ConversationId,
        id: ClientMessageId,
        text: String,
    },
    /// The page of events with seq < `before` (or up to the head when `None`), at most `limit`,
    /// the newest ones, in ascending seq order. Answered by `Response::History`.
    History {
        conv: ConversationId,
        before: Option<Seq>,
        limit: u32,
    },
    /// Starts delivery of a conversation on a new server-opened stream.
    /// Answered by `Response::Subscribed`.
    Subscribe {
        conv: ConversationId,
        start: StartAt,
    },
    /// Stops delivery; the server finishes the conversation's stream.
    Unsubscribe { conv: ConversationId },
    /// Adds a member (creator only). Answered by `Response::MembershipChanged`.
    AddMember {
        conv: ConversationId,
        user: UserName,
    },
    /// Removes a member (the creator removes anyone, a member removes itself).
    /// Answered by `Response::MembershipChanged`.
    RemoveMember {
        conv: ConversationId,
        user: UserName,
    },
    /// The caller's conversations. Answered by `Response::Conversations`.
    ListConversations,
    /// The presence of every user who shares a conversation with the caller, now. A client asks
    /// once after connecting (datagrams may be lost; this answer is not) and then every
    /// `PRESENCE_REFRESH_MS` while it shows presence. Answered by `Response::Presence`.
    Presence,
    /// Marks this connection away (the app went to the background) or back. The user is away
    /// while every connected device is away. Answered by `Response::AwaySet`.
    SetAway { away: bool },
    /// Revision 2. Replaces the text of the message at `target`; only its author may. Answered
    /// by `Response::Sent` (the seq of the `Edited` event). Idempotent by `id`, like `Send`.
    Edit {
        conv: ConversationId,
        id: ClientMessageId,
        target: Seq,
        text: String,
    },
    /// Revision 2. Deletes the message at `target` for everyone (its author or the
    /// conversation's creator); its text and the texts of its edits are removed from the store.
    /// Answered by `Response::Sent`.
    Delete {
        conv: ConversationId,
        id: ClientMessageId,
        target: Seq,
    },
    /// Revision 2. Adds the caller's reaction `emoji` to the message at `target` (one per emoji
    /// per user). Answered by `Response::Sent`.
    React {
        conv: ConversationId,
        id: ClientMessageId,
        target: Seq,
        emoji: String,
    },
    /// Revision 2. Removes the caller's reaction `emoji` from the message at `target`.
    /// Answered by `Response::Sent`.
    Unreact {
        conv: ConversationId,
        id: ClientMessageId,
        target: Seq,
        emoji: String,
    },
    /// Revision 2. Appends a message that replies to the message at `reply_to`. Answered by
    /// `Response::Sent`; sequenced in order with `Send`s of the same control stream.
    SendReply {
        conv: ConversationId,
        id: ClientMessageId,
        text: String,
        reply_to: Seq,
    },
    /// Revision 2. Moves the caller's "read up to" cursor (and with it "delivered up to")
    /// forward to `seq`. Answered by `Response::Receipt` with the cursors after the change.
    MarkRead { conv: ConversationId, seq: Seq },
    /// Revision 2. Moves the caller's "delivered up to" cursor forward to `seq`. Answered by
    /// `Response::Receipt`.
    MarkDelivered { conv: ConversationId, seq: Seq },
    /// Revision 2. Every conversation of the caller with its head, the caller's cursors and
    /// its unread count. Answered by `Response::Inbox`.
    Inbox,
    /// Revision 2. Like `History`, with the current state of every message of the page (its
    /// latest text, whether it was deleted, its reactions). Answered by `Response::Page`.
    Page {
        conv: ConversationId,
        before: Option<Seq>,
        limit: u32,
    },
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartAt {
    /// Every event from seq 1.
    Beginning,
    /// Every event after the given position.
    After(Position),
    /// Only events appended after the subscription.
    Latest,
}

/// A cursor: the last seq a client holds, in a given store epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: Epoch,
    pub seq: Seq,
}

/// Server to client, on the control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to a valid `Hello`.
    Welcome {
        user: UserName,
        epoch: Epoch,
        /// Free text naming the server software.
        server: String,
        /// The revision the session uses: the lower of the client's and the server's. Neither
        /// side sends a variant introduced after it.
        revision: u16,
    },
    Reply {
        id: RequestId,
        response: Response,
    },
    /// The request failed; the session goes on.
    Error {
        id: RequestId,
        error: ErrorBody,
    },
    /// The server is closing the connection for this reason. The QUIC close carries the same code.
    Closing {
        error: ErrorBody,
    },
}

/// The successful answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Created {
        conv: ConversationId,
        /// The seq of the `Created` event (always 1).
        seq: Seq,
    },
    Sent {
        conv: ConversationId,
        seq: Seq,
        /// Server time of the first append, milliseconds since the Unix epoch.
        at_ms: u64,
        /// True when this id had been stored before: `seq` is the original one.
        duplicate: bool,
    },
    History {
        conv: ConversationId,
        events: Vec<Event>,
        /// The conversation's last seq when the page was read.
        head: Seq,
    },
    Subscribed {
        conv: ConversationId,
        /// The last seq at the moment of subscribing; events after it arrive live.
        head: Seq,
    },
    Unsubscribed {
        conv: ConversationId,
    },
    MembershipChanged {
        conv: ConversationId,
        seq: Seq,
    },
    Conversations {
        conversations: Vec<ConversationSummary>,
    },
    /// The answer to a `Subscribe` whose cursor does not apply: it comes from another store
    /// epoch, or lies ahead of the head. No stream was opened; the client drops what it holds
    /// for this conversation (or keeps it, marked stale) and subscribes again.
    CursorReset {
        conv: ConversationId,
        epoch: Epoch,
        head: Seq,
    },
    /// The answer to `Request::Presence`: one line per contact, in name order.
    Presence {
        users: Vec<PresenceInfo>,
    },
    /// The answer to `Request::SetAway`.
    AwaySet {
        away: bool,
    },
    /// Revision 2. The caller's cursors in `conv` after a `MarkRead` or `MarkDelivered`.
    Receipt {
        conv: ConversationId,
        receipt: Receipt,
    },
    /// Revision 2. The answer to `Request::Inbox`, in ascending `ConversationId` order.
    Inbox {
        conversations: Vec<InboxEntry>,
    },
    /// Revision 2. The answer to `Request::Page`: the events (as `History` has them), the
    /// current state of each message among them (in the same order), the head, and the oldest
    /// seq still stored (1 unless retention removed older events).
    Page {
        conv: ConversationId,
        events: Vec<Event>,
        states: Vec<MessageState>,
        head: Seq,
        oldest: Seq,
    },
    /// Revision 2. The events asked for (a `Subscribe` cursor, a `History` page) were removed
    /// by the conversation's retention: `oldest` is the oldest seq still stored. No stream was
    /// opened; subscribe after `oldest - 1`, or page from `oldest` up.
    Pruned {
        conv: ConversationId,
        oldest: Seq,
        head: Seq,
    },
}

/// Revision 2. One member's receipt cursors in one conversation: every seq up to `delivered`
/// reached one of the member's devices, every seq up to `read` was shown to the member. Both
/// only move forward, and `read <= delivered`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub user: UserName,
    pub delivered: Seq,
    pub read: Seq,
}

/// Revision 2. One line of `Inbox`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub summary: ConversationSummary,
    /// The caller's cursors.
    pub delivered: Seq,
    pub read: Seq,
    /// `head - read`.
    pub unread: u64,
}

/// Revision 2. The current state of one message (a `Message` or `Reply` event), after every
/// edit, delete and reaction up to the answer's head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    /// The message's seq.
    pub seq: Seq,
    /// The text of the latest edit, if the message was edited and not deleted; `None`: the
    /// event's own text is current.
    pub text: Option<String>,
    /// The seq of the latest `Edited` event of this message.
    pub edited: Option<Seq>,
    /// The seq of the `Deleted` event: the message is a tombstone, its texts are gone.
    pub deleted: Option<Seq>,
    /// The reactions, by emoji in byte order, each with its users in byte order.
    pub reactions: Vec<Reaction>,
}

/// Revision 2. One emoji on a message and who reacted with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reaction {
    pub emoji: String,
    pub users: Vec<UserName>,
}

/// One line of `ListConversations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conv: ConversationId,
    pub title: String,
    pub creator: UserName,
    pub members: Vec<UserName>,
    pub head: Seq,
}

/// Server to client, on a delivery stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryFrame {
    /// The first frame of every delivery stream: which conversation it carries.
    Start { conv: ConversationId, epoch: Epoch },
    /// The next event, in seq order with no gap.
    Event(Event),
    /// The last frame: why delivery stopped (e.g. the user was removed). The stream then finishes.
    End { error: ErrorBody },
    /// Revision 2. A member's receipt cursors: every member's current ones right after
    /// `Start` (or `Opened`), then each change. Not part of the sequence: it carries no seq of
    /// its own.
    Receipt(Receipt),
    /// Revision 2. The first frame of a delivery stream in a revision-2 session, in place of
    /// `Start`: the conversation, and the id of the `Subscribe` request the stream answers. A
    /// client that unsubscribed and subscribed again can receive the stream of the earlier
    /// request after its new subscription was made; the id tells the two apart.
    Opened {
        conv: ConversationId,
        epoch: Epoch,
        request: RequestId,
    },
}

/// `DeliveryFrame::Event` around a borrowed event: encodes to exactly the bytes of the owned
/// frame (variant index 1, then the event), without copying the event into a frame first. A
/// server encodes an event once this way and sends the bytes to every subscriber.
#[derive(Clone, Copy, Debug)]
pub struct EventFrame<'a>(pub &'a Event);

impl Serialize for EventFrame<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// `DeliveryFrame::Event`'s variant index: `Start` is 0, `Event` 1, `End` 2.
        const EVENT_VARIANT: u32 = 1;
        serializer.serialize_newtype_variant("DeliveryFrame", EVENT_VARIANT, "Event", self.0)
    }
}

/// One entry of a conversation's sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: Seq,
    /// Who caused it: the author of a message, the member who added or removed someone.
    pub sender: UserName,
    /// Server time of the append, milliseconds since the Unix epoch. Informational only:
    /// order by `seq`, never by time.
    pub at_ms: u64,
    pub body: EventBody,
}

/// What happened at one seq.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    Message {
        id: ClientMessageId,
        text: String,
    },
    /// Always seq 1. `members` includes the creator.
    Created {
        title: String,
        members: Vec<UserName>,
    },
    MemberAdded {
        user: UserName,
    },
    MemberRemoved {
        user: UserName,
    },
    /// An event of a kind introduced in a later revision than the session's, sent in its
    /// place so that the seq is still delivered: the client counts it and shows nothing.
    Unsupported {
        /// The variant index the event has in the revision that introduced it.
        kind: u32,
    },
    /// Revision 2. The author replaced the text of the message at `target`.
    Edited {
        id: ClientMessageId,
        target: Seq,
        text: String,
    },
    /// Revision 2. The message at `target` was deleted for everyone (by its author or the
    /// conversation's creator, the `sender`). The texts of the message and of its edits are
    /// gone from the server; events keep their seqs with an empty text.
    Deleted {
        id: ClientMessageId,
        target: Seq,
    },
    /// Revision 2. `sender` reacted to the message at `target` with `emoji`.
    ReactionAdded {
        id: ClientMessageId,
        target: Seq,
        emoji: String,
    },
    /// Revision 2. `sender` took back its reaction `emoji` to the message at `target`.
    ReactionRemoved {
        id: ClientMessageId,
        target: Seq,
        emoji: String,
    },
    /// Revision 2. A message that replies to (quotes) the message at `reply_to`.
    Reply {
        id: ClientMessageId,
        text: String,
        reply_to: Seq,
    },
}

impl EventBody {
    /// The variant index: what `Unsupported.kind` names.
    pub fn kind(&self) -> u32 {
        match self {
            EventBody::Message { .. } => 0,
            EventBody::Created { .. } => 1,
            EventBody::MemberAdded { .. } => 2,
            EventBody::MemberRemoved { .. } => 3,
            EventBody::Unsupported { .. } => 4,
            EventBody::Edited { .. } => 5,
            EventBody::Deleted { .. } => 6,
            EventBody::ReactionAdded { .. } => 7,
            EventBody::ReactionRemoved { .. } => 8,
            EventBody::Reply { .. } => 9,
        }
    }

    /// The revision that introduced this kind of event.
    pub fn revision(&self) -> u16 {
        if self.kind() <= 4 {
            1
        } else {
            2
        }
    }

    /// The event as a session of `revision` may see it: `Unsupported` if it is newer.
    pub fn for_revision(self, revision: u16) -> EventBody {
        if self.revision() <= revision {
            self
        } else {
            EventBody::Unsupported { kind: self.kind() }
        }
    }

    /// The client message id of a user's action (a message, a reply, an edit, a delete, a
    /// reaction); `None` for membership events.
    pub fn client_id(&self) -> Option<ClientMessageId> {
        match self {
            EventBody::Message { id, .. }
            | EventBody::Edited { id, .. }
            | EventBody::Deleted { id, .. }
            | EventBody::ReactionAdded { id, .. }
            | EventBody::ReactionRemoved { id, .. }
            | EventBody::Reply { id, .. } => Some(*id),
            EventBody::Created { .. }
            | EventBody::MemberAdded { .. }
            | EventBody::MemberRemoved { .. }
            | EventBody::Unsupported { .. } => None,
        }
    }

    /// The seq of the message this event changes (or replies to), if any.
    pub fn target(&self) -> Option<Seq> {
        match self {
            EventBody::Edited { target, .. }
            | EventBody::Deleted { target, .. }
            | EventBody::ReactionAdded { target, .. }
            | EventBody::ReactionRemoved { target, .. } => Some(*target),
            EventBody::Reply { reply_to, .. } => Some(*reply_to),
            _ => None,
        }
    }

    /// Whether this event is a message (plain or a reply): what edits, deletes, reactions and
    /// replies may point at.
    pub fn is_message(&self) -> bool {
        matches!(self, EventBody::Message { .. } | EventBody::Reply { .. })
    }

    /// The text the event carries (a message, a reply, an edit).
    pub fn text(&self) -> Option<&str> {
        match self {
            EventBody::Message { text, .. }
            | EventBody::Reply { text, .. }
            | EventBody::Edited { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The text, to change or take it.
    pub fn text_mut(&mut self) -> Option<&mut String> {
        match self {
            EventBody::Message { text, .. }
            | EventBody::Reply { text, .. }
            | EventBody::Edited { text, .. } => Some(text),
            _ => None,
        }
    }
}

impl Event {
    /// The event as a session of `revision` may see it (see [`EventBody::for_revision`]).
    pub fn for_revision(self, revision: u16) -> Event {
        Event {
            body: self.body.for_revision(revision),
            ..self
        }
    }
}

impl DeliveryFrame {
    /// The revision that introduced this kind of frame.
    pub fn revision(&self) -> u16 {
        match self {
            DeliveryFrame::Receipt(_) | DeliveryFrame::Opened { .. } => 2,
            _ => 1,
        }
    }
}

impl Response {
    /// The revision that introduced this kind of answer.
    pub fn revision(&self) -> u16 {
        match self {
            Response::Receipt { .. }
            | Response::Inbox { .. }
            | Response::Page { .. }
            | Response::Pruned { .. } => 2,
            _ => 1,
        }
    }
}

fn invalid(message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(ErrorCode::INVALID_REQUEST, message)
}

fn check_name(user: &UserName) -> Result<(), ErrorBody> {
    user.validate().map_err(invalid)
}

impl Request {
    /// Checks every field against the protocol's syntax and limits. Whether the conversation
    /// exists and the caller may act on it is for the server to decide afterwards.
    pub fn validate(&self) -> Result<(), ErrorBody> {
        match self {
            Request::CreateConversation { title, members } => {
                if title.len() > limits::MAX_TITLE_LEN {
                    return Err(invalid(format!(
                        "title is {} bytes, the limit is {}",
                        title.len(),
                        limits::MAX_TITLE_LEN
                    )));
                }
                if members.len() > limits::MAX_INITIAL_MEMBERS {
                    return Err(invalid(format!(
                        "{} members named, the limit is {}",
                        members.len(),
                        limits::MAX_INITIAL_MEMBERS
                    )));
                }
                members.iter().try_for_each(check_name)
            }
            Request::Send { text, .. }
            | Request::SendReply { text, .. }
            | Request::Edit { text, .. } => check_text(text),
            Request::History { limit, .. } | Request::Page { limit, .. } => {
                if *limit == 0 || *limit > limits::MAX_HISTORY_LIMIT {
                    return Err(invalid(format!(
                        "history limit must be 1 to {}, got {limit}",
                        limits::MAX_HISTORY_LIMIT
                    )));
                }
                Ok(())
            }
            Request::React { emoji, .. } | Request::Unreact { emoji, .. } => check_emoji(emoji),
            Request::AddMember { user, .. } | Request::RemoveMember { user, .. } => {
                check_name(user)
            }
            Request::Subscribe { .. }
            | Request::Unsubscribe { .. }
            | Request::ListConversations
            | Request::Presence
            | Request::SetAway { .. }
            | Request::Delete { .. }
            | Request::MarkRead { .. }
            | Request::MarkDelivered { .. }
            | Request::Inbox => Ok(()),
        }
    }

    /// The revision that introduced this kind of request. A session of a lower revision that
    /// sends it breaks the protocol.
    pub fn revision(&self) -> u16 {
        match self {
            Request::Edit { .. }
            | Request::Delete { .. }
            | Request::React { .. }
            | Request::Unreact { .. }
            | Request::SendReply { .. }
            | Request::MarkRead { .. }
            | Request::MarkDelivered { .. }
            | Request::Inbox
            | Request::Page { .. } => 2,
            _ => 1,
        }
    }
}

fn check_text(text: &str) -> Result<(), ErrorBody> {
    if text.is_empty() {
        return Err(invalid("message text is empty"));
    }
    if text.len() > limits::MAX_TEXT_LEN {
        return Err(ErrorBody::new(
            ErrorCode::MESSAGE_TOO_LARGE,
            format!(
                "message text is {} bytes, the limit is {}",
                text.len(),
                limits::MAX_TEXT_LEN
            ),
        ));
    }
    Ok(())
}

/// A reaction is 1 to `MAX_EMOJI_LEN` bytes with no whitespace, control or invisible format
/// character: meant for one emoji (its grapheme cluster may take several code points), not for
/// text, and never for something that shows as nothing or reorders what is around it.
fn check_emoji(emoji: &str) -> Result<(), ErrorBody> {
    if emoji.is_empty() || emoji.len() > limits::MAX_EMOJI_LEN {
        return Err(invalid(format!(
            "a reaction must be 1 to {} bytes, got {}",
            limits::MAX_EMOJI_LEN,
            emoji.len()
        )));
    }
    if emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            "a reaction holds no whitespace or control character",
        ));
    }
    if emoji.chars().any(is_invisible_format) {
        return Err(invalid(
            "a reaction holds no invisible or direction-changing character",
        ));
    }
    Ok(())
}

/// Unicode's format characters (general category Cf) that emoji do not use: zero-width spaces,
/// direction marks and overrides, the soft hyphen, the byte order mark and the like. Emoji
/// sequences keep theirs: the zero-width joiner (families, professions) and the tag characters
/// (subdivision flags).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{AD}'
        | '\u{600}'..='\u{605}'
        | '\u{61C}'
        | '\u{6DD}'
        | '\u{70F}'
        | '\u{890}'..='\u{891}'
        | '\u{8E2}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200C}'
        | '\u{200E}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}'
    )
}
