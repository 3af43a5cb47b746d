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
            Request::Send { text, .. } => {
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
            Request::History { limit, .. } => {
                if *limit == 0 || *limit > limits::MAX_HISTORY_LIMIT {
                    return Err(invalid(format!(
                        "history limit must be 1 to {}, got {limit}",
                        limits::MAX_HISTORY_LIMIT
                    )));
                }
                Ok(())
            }
            Request::AddMember { user, .. } | Request::RemoveMember { user, .. } => {
                check_name(user)
            }
            Request::Subscribe { .. }
            | Request::Unsubscribe { .. }
            | Request::ListConversations
            | Request::Presence
            | Request::SetAway { .. } => Ok(()),
        }
    }
}
