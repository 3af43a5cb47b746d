//! Length-prefixed framing: a 4-byte big-endian length, then that many bytes of postcard body.
//!
//! A QUIC stream may split frames anywhere, so the decoder accepts arbitrary chunks. It rejects
//! an over-long frame as soon as its length prefix is complete, before buffering the body.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ErrorCode;

/// Size of the length prefix in bytes.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Why bytes could not become a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u32 },
    #[error("malformed frame body: {0}")]
    Malformed(String),
    #[error("frame body has {0} bytes left over after the frame")]
    TrailingBytes(usize),
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

impl FrameError {
    /// The error code a peer is told when it sent these bytes.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            _ => ErrorCode::PROTOCOL_VIOLATION,
        }
    }
}

/// Encodes one frame: length prefix and postcard body.
pub fn encode_frame<T: Serialize>(value: &T, max_len: u32) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    encode_frame_into(value, &mut out, max_len)?;
    Ok(out)
}

/// Appends one frame to `out`, so that many frames share one buffer (and one stream write)
/// without an allocation each. On error `out` is left as it was.
pub fn encode_frame_into<T: Serialize>(
    value: &T,
    out: &mut Vec<u8>,
    max_len: u32,
) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; LENGTH_PREFIX_LEN]);
    let encoded = postcard::to_extend(value, std::mem::take(out));
    let mut buf = match encoded {
        Ok(buf) => buf,
        Err(e) => return Err(FrameError::Malformed(e.to_string())),
    };
    let body_len = buf.len() - start - LENGTH_PREFIX_LEN;
    if body_len as u64 > u64::from(max_len) {
        buf.truncate(start);
        *out = buf;
        return Err(FrameError::TooLarge {
            len: body_len as u64,
            max: max_len,
        });
    }
    buf[start..start + LENGTH_PREFIX_LEN].copy_from_slice(&(body_len as u32).to_be_bytes());
    *out = buf;
    Ok(())
}

/// Decodes one postcard body, rejecting bytes left over after the value.
pub fn decode_exact<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| FrameError::malformed(&e))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

impl FrameError {
    /// A body postcard could not decode, said in the words of SPEC section 3.3: postcard's own
    /// messages speak of serde and of "usize on this platform", which tells the developer of a
    /// client in another language nothing.
    pub fn malformed(error: &postcard::Error) -> FrameError {
        FrameError::Malformed(malformed_reason(error))
    }
}

fn malformed_reason(error: &postcard::Error) -> String {
    use postcard::Error as E;
    match error {
        E::DeserializeUnexpectedEnd => "the body ends inside a value",
        E::DeserializeBadVarint => "a varint is too long or too large for its integer type",
        E::DeserializeBadBool => "a bool is neither 0 nor 1",
        E::DeserializeBadChar => "a char is not a Unicode scalar value",
        E::DeserializeBadUtf8 => "a string is not UTF-8",
        E::DeserializeBadOption => "an Option tag is neither 0 nor 1",
        E::DeserializeBadEnum => "an enum variant index is too large",
        E::SerdeDeCustom => {
            "a value its type does not allow (an unknown enum variant, or one out of range)"
        }
        other => return other.to_string(),
    }
    .to_owned()
}

/// Turns a byte stream, fed in chunks of any size, into frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed; compacted lazily so a run of small frames costs no copies.
    start: usize,
    max_len: u32,
}

impl FrameDecoder {
    pub fn new(max_len: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_len,
        }
    }

    /// Changes the largest frame body accepted from the next frame on (a stream whose first
    /// frame has a tighter limit than the rest).
    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    ///
    /// After an error the stream is unusable: the caller closes it with `FrameError::code`.
    pub fn next_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_body()? {
            None => Ok(None),
            Some(range) => decode_exact(&self.buf[range]).map(Some),
        }
    }

    /// The byte range of the next complete frame body, consumed from the buffer.
    fn next_body(&mut self) -> Result<Option<std::ops::Range<usize>>, FrameError> {
        let pending = &self.buf[self.start..];
        let Some(prefix) = pending.get(..LENGTH_PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max_len,
            });
        }
        let total = LENGTH_PREFIX_LEN + len as usize;
        if pending.len() < total {
            // No reserve for the announced length: a peer's 4 bytes must not cost us a megabyte.
            return Ok(None);
        }
        let body = self.start + LENGTH_PREFIX_LEN..self.start + total;
        self.start += total;
        Ok(Some(body))
    }

    /// Bytes buffered that do not yet form a frame.
    pub fn pending_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Call when the stream has ended: an incomplete frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        match self.pending_len() {
            0 => Ok(()),
            n => Err(FrameError::Truncated(n)),
        }
    }
}
