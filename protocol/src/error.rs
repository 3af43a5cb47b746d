//! Numbered error codes, shared by replies, stream ends and QUIC close reasons.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A numbered error. The number is the contract; the name is for people. A client must accept
/// codes it does not know (a newer daemon may add some) and treat them by their hundreds:
/// 1xx the peer broke the protocol, 2xx authentication, 3xx the request, 4xx limits, 5xx the server.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u16);

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($value);)*

            /// Every code this version defines, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's name as SPEC.md writes it, or `None` for a code this version does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

error_codes! {
    /// A frame could not be decoded, or came where it is not allowed.
    PROTOCOL_VIOLATION = 100,
    /// A frame's length prefix exceeds the maximum frame length.
    FRAME_TOO_LARGE = 101,
    /// The token is missing, malformed, unknown or revoked.
    UNAUTHENTICATED = 200,
    /// The first frame did not arrive in time.
    AUTH_TIMEOUT = 201,
    /// The device's credential (token or client certificate) was revoked, or its user removed,
    /// while it was connected. Sent as a connection close.
    REVOKED = 202,
    /// The conversation does not exist, or the user is not a member: the two are not told apart.
    NOT_FOUND = 300,
    /// The user is a member but may not do this (e.g. only the creator adds members).
    FORBIDDEN = 301,
    /// A named user does not exist.
    UNKNOWN_USER = 302,
    /// A field is invalid (empty text, bad user name, limit out of range, ...).
    INVALID_REQUEST = 303,
    /// The message id was already used by this sender for another text.
    ID_REUSED = 304,
    /// The seq an edit, delete, reaction or reply points at holds no message (it is past the
    /// head, or another kind of event, or was removed by retention).
    NOT_A_MESSAGE = 305,
    /// The message an edit, reaction or reply points at was deleted.
    MESSAGE_DELETED = 306,
    /// The caller already reacted to this message with this emoji.
    REACTION_EXISTS = 307,
    /// The caller has no such reaction on this message to remove.
    NO_REACTION = 308,
    /// The events asked for were removed by the conversation's retention.
    PRUNED = 309,
    /// A message text is longer than the limit.
    MESSAGE_TOO_LARGE = 400,
    /// Too many requests; `retry_after_ms` says when to try again.
    RATE_LIMITED = 401,
    /// An answer does not fit in one frame.
    LIMIT_EXCEEDED = 402,
    /// The conversation has as many members as the server allows.
    MEMBER_LIMIT = 403,
    /// A user is a member of as many conversations as the server allows.
    CONVERSATION_LIMIT = 404,
    /// The user has as many connections open as the server allows.
    CONNECTION_LIMIT = 405,
    /// A message has as many reactions as it may hold.
    TOO_MANY_REACTIONS = 410,
    /// The server cannot serve the request now (store failure); retry later with the same id.
    UNAVAILABLE = 500,
    /// The server is shutting down; reconnect later.
    GOING_AWAY = 501,
    /// A bug in the server. Reported, never expected.
    INTERNAL = 502,
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "ErrorCode({})", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// An error as it travels in a reply, a stream end or a close frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    /// A sentence for people and logs. Clients act on `code`, never on this text.
    pub message: String,
    /// For `RATE_LIMITED` and `UNAVAILABLE`: how long to wait before retrying.
    pub retry_after_ms: Option<u32>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// The one answer for "no such conversation" and "not a member", so that a non-member
    /// learns nothing about a conversation, not even that it exists.
    pub fn not_found() -> Self {
        ErrorBody::new(ErrorCode::NOT_FOUND, "no such conversation")
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ErrorBody {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_sorted_and_named() {
        let numbers: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.0).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(numbers, sorted);
        assert_eq!(ErrorCode::NOT_FOUND.name(), Some("NOT_FOUND"));
        assert_eq!(ErrorCode(999).name(), None);
        assert_eq!(format!("{}", ErrorCode(999)), "ErrorCode(999)");
    }
}
