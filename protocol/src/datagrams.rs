//! The ephemeral plane: typing and presence, carried as QUIC DATAGRAMs.
//!
//! One datagram carries one value, postcard-encoded *without* the length prefix of the stream
//! framing: a QUIC DATAGRAM is already delimited. Datagrams may be lost, duplicated or
//! reordered; nothing here is ever stored, and every state they carry expires on its own at the
//! receiver (see the TTLs in [`limits`](crate::limits)).
//!
//! A datagram that cannot be decoded (unknown variant from a newer peer, trailing bytes, too
//! long) is dropped and counted by the receiver; it never closes the connection, because
//! appending variants is how this plane evolves and an older peer must shrug at a newer one.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::framing::{decode_exact, FrameError};
use crate::ids::{ConversationId, UserName};
use crate::limits;

/// Client to server, one per DATAGRAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientDatagram {
    /// The sender is typing in `conv`. Repeated every `TYPING_REFRESH_MS` while typing goes on.
    Typing { conv: ConversationId },
    /// The sender stopped typing in `conv` (cleared the input, left the conversation).
    StoppedTyping { conv: ConversationId },
}

/// Server to client, one per DATAGRAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerDatagram {
    /// `user` is typing in `conv`. Show it until `TYPING_TTL_MS` after the last one of these,
    /// unless a `StoppedTyping` or a message from `user` in `conv` comes first.
    Typing {
        conv: ConversationId,
        user: UserName,
    },
    /// `user` stopped typing in `conv` (or sent a message there).
    StoppedTyping {
        conv: ConversationId,
        user: UserName,
    },
    /// The presence of a user who shares a conversation with the receiver changed.
    Presence(PresenceInfo),
}

/// Whether a user can be reached right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PresenceState {
    /// No device connected (for longer than the server's grace period).
    Offline,
    /// At least one device connected and not away.
    Online,
    /// Devices connected, every one of them marked away by its app.
    Away,
}

impl PresenceState {
    /// The lowercase name used in JSON output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceState::Offline => "offline",
            PresenceState::Online => "online",
            PresenceState::Away => "away",
        }
    }
}

/// One user's presence, as a datagram or as a line of `Response::Presence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceInfo {
    pub user: UserName,
    pub state: PresenceState,
    /// Server time, milliseconds since the Unix epoch, of the user's last presence change while
    /// it was online (SPEC 12.4); `None` if the server has not seen the user since it started.
    /// Informational.
    pub last_seen_ms: Option<u64>,
    /// Grows with every change the server makes to any user's presence, within one server run.
    /// A client ignores a datagram whose version is not above the one it holds for that user
    /// (datagrams may be reordered). A new connection may start lower (another server run): a
    /// snapshot (`Response::Presence`) replaces what the client held.
    pub version: u64,
}

/// Encodes one datagram payload: a postcard body with no length prefix.
pub fn encode_datagram<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > limits::MAX_DATAGRAM_LEN {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: limits::MAX_DATAGRAM_LEN as u32,
        });
    }
    Ok(body)
}

/// Decodes one datagram payload, refusing one longer than `MAX_DATAGRAM_LEN` before reading
/// it, and any bytes left over after the value.
pub fn decode_datagram<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > limits::MAX_DATAGRAM_LEN {
        return Err(FrameError::TooLarge {
            len: payload.len() as u64,
            max: limits::MAX_DATAGRAM_LEN as u32,
        });
    }
    decode_exact(payload)
}
