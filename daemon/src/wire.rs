//! Frames onto quinn streams: the thin IO edge around `quip_protocol`'s framing.

use quip_protocol::encode_frame_into;
use serde::Serialize;

/// Appends one encoded frame to `buf`, so that several frames go out in one stream write.
pub fn push_frame<T: Serialize>(buf: &mut Vec<u8>, frame: &T, max_frame_len: u32) {
    match encode_frame_into(frame, buf, max_frame_len) {
        Ok(()) => {}
        // Only our own bug can make an outgoing frame too large: replies are built within limits.
        Err(e) => tracing::error!(error = %e, "dropping an outgoing frame that cannot be encoded"),
    }
}
