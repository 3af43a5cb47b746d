//! The control stream as the daemon reads it, without IO: bytes in, steps out.
//!
//! [`ControlStream`] owns the frame decoder and the stream's rules: `Hello` first and only once,
//! no revision 0, every request validated (the protocol's syntax and limits, then the server's
//! configured message size) before anything acts on it. The session around it reads the QUIC
//! stream, pushes what arrives ([`ControlStream::push`], [`ControlStream::finish`] at FIN) and
//! polls [`ControlStream::poll_step`] until it says more bytes are needed. The fuzzers drive it the
//! same way, with arbitrary bytes.

use quip_protocol::{
    limits, ClientFrame, ErrorBody, ErrorCode, FrameDecoder, FrameError, Request, RequestId,
};

/// What the next bytes of the control stream mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The first frame: authenticate with it, then answer `Welcome`.
    Hello {
        token: String,
        client: String,
        revision: u16,
    },
    /// A request that passed validation: act on it.
    Request { id: RequestId, request: Request },
    /// A request refused without any effect; answer the error, the session goes on.
    Refused { id: RequestId, error: ErrorBody },
    /// The client finished its side cleanly: no more requests.
    End,
    /// The stream is unusable: close the connection with this error.
    Close(ErrorBody),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    Open,
    /// After `End` or `Close`: nothing more comes out.
    Done,
}

#[derive(Debug)]
pub struct ControlStream {
    decoder: FrameDecoder,
    phase: Phase,
    finished: bool,
    max_frame_len: u32,
    max_message_len: usize,
}

impl ControlStream {
    pub fn new(max_frame_len: u32, max_message_len: usize) -> Self {
        ControlStream {
            // Until Hello, the peer is nobody: its frame may be no larger than a Hello needs.
            decoder: FrameDecoder::new(max_frame_len.min(limits::MAX_HELLO_LEN)),
            phase: Phase::AwaitingHello,
            finished: false,
            max_frame_len,
            max_message_len,
        }
    }

    /// Bytes read from the stream, in any chunks.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.phase != Phase::Done && !self.finished {
            self.decoder.push(chunk);
        }
    }

    /// The client finished (FIN) its side of the stream.
    pub fn finish(&mut self) {
        self.finished = true;
    }

    /// Whether the session has read `Hello` and may act on requests.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The next step, `None` while more bytes are needed (or after the last step).
    pub fn poll_step(&mut self) -> Option<Step> {
        if self.phase == Phase::Done {
            return None;
        }
        let step = match self.decoder.next_frame::<ClientFrame>() {
            Ok(Some(frame)) => self.on_frame(frame),
            Ok(None) if self.finished => match self.decoder.finish() {
                Err(e) => close_for(&e),
                Ok(()) if self.phase == Phase::AwaitingHello => Step::Close(ErrorBody::new(
                    ErrorCode::PROTOCOL_VIOLATION,
                    "the control stream ended before Hello",
                )),
                Ok(()) => Step::End,
            },
            Ok(None) => return None,
            Err(e) => close_for(&e),
        };
        if matches!(step, Step::End | Step::Close(_)) {
            self.phase = Phase::Done;
        }
        Some(step)
    }

    fn on_frame(&mut self, frame: ClientFrame) -> Step {
        match (self.phase, frame) {
            (
                Phase::AwaitingHello,
                ClientFrame::Hello {
                    token,
                    client,
                    revision,
                },
            ) => {
                if revision == 0 {
                    return Step::Close(ErrorBody::new(
                        ErrorCode::PROTOCOL_VIOLATION,
                        "revision 0 does not exist; the first revision is 1",
                    ));
                }
                self.phase = Phase::Open;
                self.decoder.set_max_len(self.max_frame_len);
                Step::Hello {
                    token,
                    client,
                    revision,
                }
            }
            (Phase::AwaitingHello, ClientFrame::Request { .. }) => Step::Close(ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "the first frame must be Hello",
            )),
            (_, ClientFrame::Hello { .. }) => Step::Close(ErrorBody::new(
                ErrorCode::PROTOCOL_VIOLATION,
                "Hello sent twice",
            )),
            (_, ClientFrame::Request { id, request }) => match self.validate(&request) {
                Ok(()) => Step::Request { id, request },
                Err(error) => Step::Refused { id, error },
            },
        }
    }

    fn validate(&self, request: &Request) -> Result<(), ErrorBody> {
        request.validate()?;
        match request {
            Request::Send { text, .. }
            | Request::SendReply { text, .. }
            | Request::Edit { text, .. }
                if text.len() > self.max_message_len =>
            {
                Err(ErrorBody::new(
                    ErrorCode::MESSAGE_TOO_LARGE,
                    format!(
                        "message text is {} bytes, this server's limit is {}",
                        text.len(),
                        self.max_message_len
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

fn close_for(e: &FrameError) -> Step {
    Step::Close(ErrorBody::new(e.code(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use quip_protocol::{encode_frame, limits, ClientMessageId, ConversationId};

    use super::*;

    fn bytes(frame: &ClientFrame) -> Vec<u8> {
        encode_frame(frame, limits::MAX_FRAME_LEN).unwrap()
    }

    fn hello() -> ClientFrame {
        ClientFrame::Hello {
            token: "quip_x".into(),
            client: "test".into(),
            revision: 1,
        }
    }

    fn send(id: u64, text: &str) -> ClientFrame {
        ClientFrame::Request {
            id: RequestId(id),
            request: Request::Send {
                conv: ConversationId(1),
                id: ClientMessageId([1; 16]),
                text: text.into(),
            },
        }
    }

    fn code(step: Option<Step>) -> ErrorCode {
        match step {
            Some(Step::Close(e)) | Some(Step::Refused { error: e, .. }) => e.code,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// Before Hello the peer is unknown: a first frame larger than a Hello needs is refused
    /// from its length prefix alone; after Hello, frames up to the configured limit are read.
    #[test]
    fn the_first_frame_is_limited_to_a_hello_and_later_ones_to_the_frame_limit() {
        let mut control = ControlStream::new(limits::MAX_FRAME_LEN, limits::MAX_TEXT_LEN);
        control.push(&(limits::MAX_HELLO_LEN + 1).to_be_bytes());
        assert_eq!(code(control.poll_step()), ErrorCode::FRAME_TOO_LARGE);

        let mut control = ControlStream::new(limits::MAX_FRAME_LEN, limits::MAX_TEXT_LEN);
        let big = ClientFrame::Hello {
            token: "quip_x".into(),
            client: "c".repeat(limits::MAX_HELLO_LEN as usize),
            revision: 1,
        };
        control.push(&bytes(&big));
        assert_eq!(code(control.poll_step()), ErrorCode::FRAME_TOO_LARGE);

        let mut control = ControlStream::new(limits::MAX_FRAME_LEN, limits::MAX_TEXT_LEN);
        control.push(&bytes(&hello()));
        control.push(&bytes(&send(1, &"x".repeat(limits::MAX_TEXT_LEN))));
        assert!(matches!(control.poll_step(), Some(Step::Hello { .. })));
        assert!(matches!(control.poll_step(), Some(Step::Request { .. })));
    }

    #[test]
    fn hello_first_then_validated_requests_then_end() {
        let mut control = ControlStream::new(limits::MAX_FRAME_LEN, 5);
        let mut all = bytes(&hello());
        all.extend(bytes(&send(1, "12345")));
        all.extend(bytes(&send(2, "123456")));
        // One byte at a time: framing is the decoder's job.
        for b in &all {
            control.push(std::slice::from_ref(b));
        }
        assert!(matches!(
            control.poll_step(),
            Some(Step::Hello { revision: 1, .. })
        ));
        assert!(matches!(
            control.poll_step(),
            Some(Step::Request {
                id: RequestId(1),
                ..
            })
        ));
        assert_eq!(code(control.poll_step()), ErrorCode::MESSAGE_TOO_LARGE);
        assert_eq!(control.poll_step(), None);
        control.finish();
        assert_eq!(control.poll_step(), Some(Step::End));
        assert_eq!(control.poll_step(), None);
    }

    #[test]
    fn the_rules_of_the_stream_close_it() {
        let cases: Vec<(Vec<u8>, bool, ErrorCode)> = vec![
            (bytes(&send(1, "x")), false, ErrorCode::PROTOCOL_VIOLATION),
            (
                [bytes(&hello()), bytes(&hello())].concat(),
                false,
                ErrorCode::PROTOCOL_VIOLATION,
            ),
            (
                bytes(&ClientFrame::Hello {
                    token: String::new(),
                    client: String::new(),
                    revision: 0,
                }),
                false,
                ErrorCode::PROTOCOL_VIOLATION,
            ),
            (vec![], true, ErrorCode::PROTOCOL_VIOLATION),
            (vec![0, 0, 0, 9, 0], true, ErrorCode::PROTOCOL_VIOLATION),
            (vec![0xff; 4], false, ErrorCode::FRAME_TOO_LARGE),
        ];
        for (input, fin, expected) in cases {
            let mut control = ControlStream::new(limits::MAX_FRAME_LEN, limits::MAX_TEXT_LEN);
            control.push(&input);
            if fin {
                control.finish();
            }
            let mut step = control.poll_step();
            if matches!(step, Some(Step::Hello { .. })) {
                step = control.poll_step();
            }
            assert_eq!(code(step), expected, "{input:?}");
            assert_eq!(control.poll_step(), None, "nothing after a close");
        }
    }
}
