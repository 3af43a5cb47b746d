use std::time::Duration;

use quip_protocol::{Epoch, ErrorBody, ErrorCode, Seq};

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Bad local settings (address, CA file, ...).
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or the handshake failed.
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    /// The server answered the request with an error.
    #[error("{}", describe(.0))]
    Server(ErrorBody),
    /// The connection is gone; the call may or may not have taken effect (a send retried with
    /// the same message id is safe).
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The cursor of a subscription does not apply to the server's store: the store was
    /// replaced (restored from a backup: another epoch) or the cursor is past its head. Drop
    /// what is held of the conversation and subscribe again (SPEC 9.1 item 8).
    #[error(
        "cursor reset: the cursor does not apply to the server's store (epoch {epoch}, head \
         {head}); subscribe again from the start"
    )]
    CursorReset { epoch: Epoch, head: Seq },
    /// Retention removed the events asked for: the oldest still available is `oldest`.
    #[error(
        "retention removed the events before seq {oldest} (the oldest available; head {head})"
    )]
    Pruned { oldest: Seq, head: Seq },
    /// The request breaks the protocol's rules (a text or title too long, a history limit out
    /// of range, a frame too large): refused before it was sent, with the code the server would
    /// answer. Nothing was queued; retrying cannot help.
    #[error("{}", describe(.0))]
    Invalid(ErrorBody),
    /// The client made no progress for `waited` (no connection, or the server answering only
    /// `UNAVAILABLE`) and stopped, as `ClientConfig::give_up_after` asks; `last` is the last
    /// error. Unacknowledged sends stay in the state file.
    #[error("gave up after {} s without progress: {last}", waited.as_secs())]
    GaveUp {
        waited: Duration,
        last: Box<ClientError>,
    },
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) | ClientError::Invalid(body) => Some(body.code),
            ClientError::Pruned { .. } => Some(ErrorCode::PRUNED),
            ClientError::GaveUp { last, .. } => last.code(),
            _ => None,
        }
    }
}

fn describe(body: &ErrorBody) -> String {
    match body.code {
        ErrorCode::NOT_FOUND => format!("{} (NOT_FOUND)", body.message),
        ErrorCode::UNAUTHENTICATED => "the server refused the token (UNAUTHENTICATED)".into(),
        code => format!("{} ({code})", body.message),
    }
}
