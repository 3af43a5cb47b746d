//! The quip wire protocol.
//!
//! Everything that crosses the wire is defined here: the frame types (serde + postcard), the
//! length-prefixed framing, the datagram types of the ephemeral plane, the numbered error codes and the limits. This crate does no IO: bytes
//! go in, values come out, so the daemon, the SDK and the fuzzers all share one implementation.
//!
//! postcard is not self-describing: the order of fields and the index of enum variants *are* the
//! wire format. Append enum variants at the end only; any other change is a new protocol version
//! with a new ALPN.

mod datagrams;
mod error;
mod frames;
mod framing;
mod ids;
pub mod limits;

pub use datagrams::{
    decode_datagram, encode_datagram, ClientDatagram, PresenceInfo, PresenceState, ServerDatagram,
};
pub use error::{ErrorBody, ErrorCode};
pub use frames::{
    ClientFrame, ConversationSummary, DeliveryFrame, Event, EventBody, EventFrame, InboxEntry,
    MessageState, Position, Reaction, Receipt, Request, Response, ServerFrame, StartAt,
};
pub use framing::{
    decode_exact, encode_frame, encode_frame_into, FrameDecoder, FrameError, LENGTH_PREFIX_LEN,
};
pub use ids::{ClientMessageId, ConversationId, Epoch, RequestId, Seq, UserName};

/// The ALPN protocol id of this version. Carried in the TLS handshake; a server and a client that
/// share no ALPN value do not connect at all.
pub const ALPN: &[u8] = b"quip/1";

/// The protocol revision this crate speaks within `quip/1`. A revision only appends enum
/// variants (frames, requests, events, datagrams). The client states its revision in `Hello`
/// and the server answers with the revision of the session in `Welcome`; neither side sends a
/// variant the session's revision does not have, so an older peer never meets an unknown
/// variant. Anything that is not an append is a new ALPN.
pub const REVISION: u16 = 2;
