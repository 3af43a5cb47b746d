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
    /// The cursor of a subscription does not apply to the server's store.
    #[error("cursor reset: the server's store is epoch {epoch} with head {head}")]
    CursorReset { epoch: Epoch, head: Seq },
    /// Retention removed the events asked for: the oldest still available is `oldest`.
    #[error(
        "retention removed the events before seq {oldest} (the oldest available; head {head})"
    )]
    Pruned { oldest: Seq, head: Seq },
}

impl ClientError {
    /// The server's error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(body) => Some(body.code),
            ClientError::Pruned { .. } => Some(ErrorCode::PRUNED),
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
