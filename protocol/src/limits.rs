//! Protocol limits. A peer that exceeds one gets the error code named beside it.

/// Largest postcard body of one frame, in bytes (`FRAME_TOO_LARGE`, connection or stream closed).
pub const MAX_FRAME_LEN: u32 = 1024 * 1024;
/// Largest message text, in UTF-8 bytes (`MESSAGE_TOO_LARGE`, request refused).
pub const MAX_TEXT_LEN: usize = 64 * 1024;
/// Largest conversation title, in UTF-8 bytes (`INVALID_REQUEST`).
pub const MAX_TITLE_LEN: usize = 256;
/// Most members named in one create request (`INVALID_REQUEST`).
pub const MAX_INITIAL_MEMBERS: usize = 1024;
/// Largest history page (`INVALID_REQUEST`).
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// Longest reaction, in UTF-8 bytes (`INVALID_REQUEST`): room for one emoji of several code
/// points (a family, a flag with a skin tone), not for text.
pub const MAX_EMOJI_LEN: usize = 32;
/// Most reactions (user and emoji pairs) on one message (`TOO_MANY_REACTIONS`).
pub const MAX_REACTIONS_PER_MESSAGE: usize = 256;
/// Longest bearer token accepted in `Hello` (`UNAUTHENTICATED`).
pub const MAX_TOKEN_LEN: usize = 256;
/// Longest client description in `Hello`; a longer one is cut, not refused.
pub const MAX_CLIENT_NAME_LEN: usize = 128;
/// Largest body of the `Hello` frame (`FRAME_TOO_LARGE`, connection closed). A valid `Hello`
/// needs under 400 bytes; before it, a peer is nobody, and may not make the server buffer more.
pub const MAX_HELLO_LEN: u32 = 4096;

/// Largest DATAGRAM payload either side sends or reads, in bytes. A longer one is dropped
/// unread. Every datagram this version defines fits in well under this, and this in turn fits
/// the smallest `max_datagram_size` QUIC allows a peer to leave us (a little over a kilobyte).
pub const MAX_DATAGRAM_LEN: usize = 512;
/// While the user keeps typing, a client repeats `ClientDatagram::Typing` this often.
pub const TYPING_REFRESH_MS: u64 = 3_000;
/// A receiver shows a typing indicator for this long after the last `Typing` datagram for it:
/// two refresh periods, so one lost repeat does not make it flicker, and a lost
/// `StoppedTyping` clears on its own.
pub const TYPING_TTL_MS: u64 = 6_000;
/// A client that shows presence asks for a fresh `Request::Presence` snapshot this often, so a
/// lost presence datagram is corrected in bounded time.
pub const PRESENCE_REFRESH_MS: u64 = 60_000;
