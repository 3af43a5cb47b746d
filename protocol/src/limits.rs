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
/// Longest bearer token accepted in `Hello` (`UNAUTHENTICATED`).
pub const MAX_TOKEN_LEN: usize = 256;
/// Longest client description in `Hello`; a longer one is cut, not refused.
pub const MAX_CLIENT_NAME_LEN: usize = 128;
