//! The malformed-frame corpus (SPEC sections 3 and 6): each case is sent to the real daemon
//! over QUIC, and each is answered with its documented code: a connection close for what
//! breaks the stream (PROTOCOL_VIOLATION, FRAME_TOO_LARGE), an error reply for a request that
//! decodes but breaks a limit (the session goes on). After all of them the daemon still serves.
//!
//! No type of the protocol is recursive, so "deep" input is bounded by the types themselves
//! (the deepest client value, `Request::Subscribe{After(Position)}`, is four levels); what
//! stands in for depth here are length claims far beyond the bytes that follow.

use std::time::Duration;

use quip_protocol::{
    limits, ClientFrame, ErrorCode, FrameDecoder, Request, RequestId, ServerFrame,
};

use crate::harness::{frame, Daemon, WAIT};

/// What the daemon must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// The connection is closed with this code.
    Close(ErrorCode),
    /// The request is answered with `Error` of this code, and the session goes on.
    Reply(ErrorCode),
}

struct Case {
    name: &'static str,
    /// Whether a valid `Hello` goes first.
    after_hello: bool,
    bytes: Vec<u8>,
    /// Whether the client finishes the stream after the bytes.
    fin: bool,
    answer: Answer,
}

fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn string(bytes: &[u8]) -> Vec<u8> {
    [varint(bytes.len() as u64), bytes.to_vec()].concat()
}

/// A length prefix and `body`.
fn framed(body: &[u8]) -> Vec<u8> {
    [(body.len() as u32).to_be_bytes().to_vec(), body.to_vec()].concat()
}

/// The body of `Request{id 1, <request bytes>}`.
fn request(request: &[u8]) -> Vec<u8> {
    framed(&[&[0x01, 0x01][..], request].concat())
}

fn encoded(request: Request) -> Vec<u8> {
    frame(&ClientFrame::Request {
        id: RequestId(1),
        request,
    })
}

fn hello_body(token: &[u8], client: &[u8], revision: Vec<u8>) -> Vec<u8> {
    [vec![0x00], string(token), string(client), revision].concat()
}

fn corpus() -> Vec<Case> {
    use Answer::{Close, Reply};
    let pv = ErrorCode::PROTOCOL_VIOLATION;
    let too_large = ErrorCode::FRAME_TOO_LARGE;
    let max = limits::MAX_FRAME_LEN;
    let conv = varint(12345);
    let case = |name, after_hello, bytes, answer| Case {
        name,
        after_hello,
        bytes,
        fin: false,
        answer,
    };
    let truncated = |name, after_hello, bytes| Case {
        name,
        after_hello,
        bytes,
        fin: true,
        answer: Close(pv),
    };
    vec![
        // Framing.
        truncated(
            "truncated body, then FIN",
            false,
            [10u32.to_be_bytes().to_vec(), vec![0, 1, 2]].concat(),
        ),
        truncated("truncated length prefix, then FIN", false, vec![0, 0]),
        truncated("FIN inside a request", true, vec![0, 0, 0, 5, 1, 1]),
        case(
            "length one over the limit",
            false,
            (max + 1).to_be_bytes().to_vec(),
            Close(too_large),
        ),
        case(
            "a 4 GiB length claim",
            false,
            u32::MAX.to_be_bytes().to_vec(),
            Close(too_large),
        ),
        case(
            "a 4 GiB length claim after Hello",
            true,
            u32::MAX.to_be_bytes().to_vec(),
            Close(too_large),
        ),
        case("empty body", false, framed(&[]), Close(pv)),
        // Unknown types.
        case("unknown frame type", false, framed(&[0x09]), Close(pv)),
        case("unknown request type", true, request(&[0x63]), Close(pv)),
        case(
            "unknown StartAt",
            true,
            request(&[&[0x03][..], &conv, &[0x07]].concat()),
            Close(pv),
        ),
        case(
            "bool that is neither 0 nor 1",
            true,
            request(&[0x09, 0x02]),
            Close(pv),
        ),
        case(
            "Option tag that is neither 0 nor 1",
            true,
            request(&[&[0x02][..], &conv, &[0x02, 0x05, 0x0a]].concat()),
            Close(pv),
        ),
        // Invalid UTF-8 text.
        case(
            "invalid UTF-8 token",
            false,
            framed(&hello_body(&[0xc3, 0x28], b"x", vec![1])),
            Close(pv),
        ),
        case(
            "invalid UTF-8 message text",
            true,
            request(&[&[0x01][..], &conv, &[0x11; 16], &string(&[0xff, 0xfe])].concat()),
            Close(pv),
        ),
        case(
            "invalid UTF-8 user name",
            true,
            request(&[&[0x05][..], &conv, &string(&[0x80])].concat()),
            Close(pv),
        ),
        // Integers.
        case(
            "over-long varint",
            false,
            framed(&hello_body(b"t", b"c", vec![0x80; 11])),
            Close(pv),
        ),
        case(
            "revision that overflows a u16",
            false,
            framed(&hello_body(b"t", b"c", varint(70_000))),
            Close(pv),
        ),
        case(
            "trailing bytes after Hello",
            false,
            framed(&[hello_body(b"t", b"c", vec![1]), vec![0xaa]].concat()),
            Close(pv),
        ),
        // Huge length claims.
        case(
            "token claiming 4 GiB",
            false,
            framed(&[vec![0x00], varint(u64::from(u32::MAX))].concat()),
            Close(pv),
        ),
        case(
            "member list claiming 2^63 names",
            true,
            request(&[&[0x00][..], &string(b"t"), &varint(1 << 63)].concat()),
            Close(pv),
        ),
        case(
            "message text claiming more than the frame",
            true,
            request(&[&[0x01][..], &conv, &[0x11; 16], &varint(1 << 40)].concat()),
            Close(pv),
        ),
        // Decodes, but breaks a request limit: answered, the session goes on.
        case(
            "message text one byte over 64 KiB",
            true,
            encoded(Request::Send {
                conv: quip_protocol::ConversationId(12345),
                id: quip_protocol::ClientMessageId([1; 16]),
                text: "x".repeat(limits::MAX_TEXT_LEN + 1),
            }),
            Reply(ErrorCode::MESSAGE_TOO_LARGE),
        ),
        case(
            "empty message text",
            true,
            encoded(Request::Send {
                conv: quip_protocol::ConversationId(12345),
                id: quip_protocol::ClientMessageId([1; 16]),
                text: String::new(),
            }),
            Reply(ErrorCode::INVALID_REQUEST),
        ),
        case(
            "a title of almost a whole frame",
            true,
            encoded(Request::CreateConversation {
                title: "t".repeat(max as usize - 64),
                members: vec![],
            }),
            Reply(ErrorCode::INVALID_REQUEST),
        ),
        case(
            "1025 members named",
            true,
            encoded(Request::CreateConversation {
                title: String::new(),
                members: (0..1025)
                    .map(|n| format!("u{n}").parse().unwrap())
                    .collect(),
            }),
            Reply(ErrorCode::INVALID_REQUEST),
        ),
        case(
            "a user name that breaks the syntax",
            true,
            encoded(Request::AddMember {
                conv: quip_protocol::ConversationId(12345),
                user: quip_protocol::UserName("Bob!".into()),
            }),
            Reply(ErrorCode::INVALID_REQUEST),
        ),
        case(
            "history limit 0",
            true,
            encoded(Request::History {
                conv: quip_protocol::ConversationId(12345),
                before: None,
                limit: 0,
            }),
            Reply(ErrorCode::INVALID_REQUEST),
        ),
    ]
}

/// A daemon that waits 3 s for a Hello, and alice's token.
async fn start() -> (Daemon, String) {
    let daemon = Daemon::start(|config| config.limits.auth_timeout = Duration::from_secs(3)).await;
    let token = daemon.user("alice").await;
    (daemon, token)
}

/// Reads server frames until one that is not `Welcome`; `None` when the stream ends.
async fn next_answer(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> Option<ServerFrame> {
    loop {
        match decoder.next_frame::<ServerFrame>() {
            Ok(Some(ServerFrame::Welcome { .. })) => continue,
            Ok(Some(frame)) => return Some(frame),
            Ok(None) => {}
            Err(_) => return None,
        }
        match tokio::time::timeout(WAIT, recv.read_chunk(64 * 1024, true)).await {
            Ok(Ok(Some(chunk))) => decoder.push(&chunk.bytes),
            _ => return None,
        }
    }
}

#[tokio::test]
async fn every_malformed_frame_gets_its_documented_answer() {
    let (daemon, token) = start().await;
    let hello = frame(&ClientFrame::Hello {
        token: token.clone(),
        client: "corpus".into(),
        revision: quip_protocol::REVISION,
    });
    for case in corpus() {
        let conn = daemon.raw_connection(quip_protocol::ALPN).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        if case.after_hello {
            send.write_all(&hello).await.unwrap();
        }
        send.write_all(&case.bytes).await.unwrap();
        if case.fin {
            send.finish().unwrap();
        }
        let mut decoder = FrameDecoder::new(u32::MAX);
        match case.answer {
            Answer::Close(code) => {
                let closed = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();
                match closed {
                    quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
                        close.error_code.into_inner(),
                        u64::from(code.0),
                        "{}: closed with {:?}",
                        case.name,
                        close
                    ),
                    other => panic!("{}: ended with {other}", case.name),
                }
            }
            Answer::Reply(code) => {
                match next_answer(&mut recv, &mut decoder).await {
                    Some(ServerFrame::Error { id, error }) => {
                        assert_eq!(id, RequestId(1), "{}", case.name);
                        assert_eq!(error.code, code, "{}: {}", case.name, error.message);
                    }
                    other => panic!("{}: answered {other:?}", case.name),
                }
                // The session goes on.
                let list = ClientFrame::Request {
                    id: RequestId(2),
                    request: Request::ListConversations,
                };
                send.write_all(&frame(&list)).await.unwrap();
                match next_answer(&mut recv, &mut decoder).await {
                    Some(ServerFrame::Reply { id, .. }) => assert_eq!(id, RequestId(2)),
                    other => panic!("{}: after the error, {other:?}", case.name),
                }
                conn.close(0u32.into(), b"");
            }
        }
    }
    // Everyone else is still served.
    let config = daemon.client_config(&token);
    let client = quip_client::Client::connect(config).await.unwrap();
    let conv = client
        .create_conversation("after the corpus", &[])
        .await
        .unwrap();
    client.send(conv, "fine").await.unwrap();
    daemon.stop().await;
}
