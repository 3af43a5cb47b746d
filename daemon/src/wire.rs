//! Frames over quinn streams: the thin IO edge around `quip_protocol`'s framing.

use quip_protocol::{encode_frame_into, FrameDecoder, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest chunk read from a stream at once; bounds what is buffered past a frame's limit.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

/// Reads frames from a receive stream.
#[derive(Debug)]
pub struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream, max_frame_len: u32) -> Self {
        FrameReader {
            stream,
            decoder: FrameDecoder::new(max_frame_len),
        }
    }

    /// The next frame, `None` once the peer finished the stream cleanly.
    ///
    /// Cancel-safe: bytes read are kept in the decoder, so a `select!` may drop this future.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Appends one encoded frame to `buf`, so that several frames go out in one stream write.
pub fn push_frame<T: Serialize>(buf: &mut Vec<u8>, frame: &T, max_frame_len: u32) {
    match encode_frame_into(frame, buf, max_frame_len) {
        Ok(()) => {}
        // Only our own bug can make an outgoing frame too large: replies are built within limits.
        Err(e) => tracing::error!(error = %e, "dropping an outgoing frame that cannot be encoded"),
    }
}
