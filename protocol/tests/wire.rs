//! Wire-format tests for `quip-protocol`.
//!
//! - round trips of every frame type through `encode_frame` and `FrameDecoder` (proptest);
//! - streams split at arbitrary chunk boundaries, and streams cut inside a frame;
//! - decoding arbitrary or corrupted bytes never panics;
//! - the frame length limit, on both sides;
//! - a corpus of malformed frames with the error each must produce;
//! - golden hex vectors pinning the encoding byte for byte (the reference for other languages);
//! - `Request::validate` at every limit of `limits.rs`.
//!
//! The encoding is postcard: unsigned integers wider than a byte (u16, u32, u64, lengths, enum
//! variant indices) are LEB128 varints, `u8` and `[u8; 16]` are raw bytes, `bool` is 00/01,
//! `Option` is 00 or 01 followed by the value, a `String` or `Vec` is a varint count followed by
//! the elements, structs and newtypes are their fields in declaration order with nothing around
//! them. Each frame is a 4-byte big-endian body length followed by the body.

use std::fmt::Debug;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::ValueTree;
use proptest::test_runner::FileFailurePersistence;
use quip_protocol::limits::{
    MAX_FRAME_LEN, MAX_HISTORY_LIMIT, MAX_INITIAL_MEMBERS, MAX_TEXT_LEN, MAX_TITLE_LEN,
    MAX_TOKEN_LEN,
};
use quip_protocol::{
    decode_exact, encode_frame, encode_frame_into, ClientFrame, ClientMessageId, ConversationId,
    ConversationSummary, DeliveryFrame, Epoch, ErrorBody, ErrorCode, Event, EventBody, EventFrame,
    FrameDecoder, FrameError, InboxEntry, MessageState, Position, PresenceInfo, PresenceState,
    Reaction, Receipt, Request, RequestId, Response, Seq, ServerFrame, StartAt, UserName,
    LENGTH_PREFIX_LEN,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Failing cases are kept in `protocol/proptest-regressions/wire.txt` (cargo runs tests from
/// the package directory) and replayed first on every run.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/wire.txt",
        ))),
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// Strategies
// ------------------------------------------------------------------------------------------------

/// u64 values spread over every varint length (1 to 10 bytes) and its edges.
fn varint_u64() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        1u64..0x80,
        0x80u64..0x4000,
        0x4000u64..0x20_0000,
        any::<u64>(),
        Just(u64::MAX),
    ]
    .boxed()
}

fn varint_u32() -> BoxedStrategy<u32> {
    prop_oneof![
        Just(0u32),
        1u32..0x80,
        0x80u32..0x4000,
        any::<u32>(),
        Just(u32::MAX)
    ]
    .boxed()
}

/// Short strings, ASCII or any Unicode (multi-byte characters included).
fn text() -> BoxedStrategy<String> {
    prop_oneof!["[ -~]{0,12}", ".{0,12}"].boxed()
}

fn conversation_id() -> BoxedStrategy<ConversationId> {
    varint_u64().prop_map(ConversationId).boxed()
}

fn seq() -> BoxedStrategy<Seq> {
    varint_u64().prop_map(Seq).boxed()
}

fn request_id() -> BoxedStrategy<RequestId> {
    varint_u64().prop_map(RequestId).boxed()
}

fn client_message_id() -> BoxedStrategy<ClientMessageId> {
    any::<[u8; 16]>().prop_map(ClientMessageId).boxed()
}

fn epoch() -> BoxedStrategy<Epoch> {
    any::<[u8; 16]>().prop_map(Epoch).boxed()
}

/// Valid names mostly, but the wire carries any string: validity is checked after decoding.
fn user_name() -> BoxedStrategy<UserName> {
    prop_oneof![
        3 => "[a-z0-9][a-z0-9._-]{0,31}".prop_map(UserName),
        1 => ".{0,8}".prop_map(UserName),
    ]
    .boxed()
}

fn user_names() -> BoxedStrategy<Vec<UserName>> {
    vec(user_name(), 0..4).boxed()
}

/// Known codes and arbitrary ones (a newer peer may send codes this version does not know).
fn error_code() -> BoxedStrategy<ErrorCode> {
    prop_oneof![
        proptest::sample::select(ErrorCode::ALL),
        any::<u16>().prop_map(ErrorCode),
    ]
    .boxed()
}

fn error_body() -> BoxedStrategy<ErrorBody> {
    (error_code(), text(), proptest::option::of(varint_u32()))
        .prop_map(|(code, message, retry_after_ms)| ErrorBody {
            code,
            message,
            retry_after_ms,
        })
        .boxed()
}

fn position() -> BoxedStrategy<Position> {
    (epoch(), seq())
        .prop_map(|(epoch, seq)| Position { epoch, seq })
        .boxed()
}

fn start_at() -> BoxedStrategy<StartAt> {
    prop_oneof![
        Just(StartAt::Beginning),
        position().prop_map(StartAt::After),
        Just(StartAt::Latest),
    ]
    .boxed()
}

fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        (text(), user_names())
            .prop_map(|(title, members)| Request::CreateConversation { title, members }),
        (conversation_id(), client_message_id(), text())
            .prop_map(|(conv, id, text)| Request::Send { conv, id, text }),
        (conversation_id(), proptest::option::of(seq()), varint_u32()).prop_map(
            |(conv, before, limit)| Request::History {
                conv,
                before,
                limit
            }
        ),
        (conversation_id(), start_at())
            .prop_map(|(conv, start)| Request::Subscribe { conv, start }),
        conversation_id().prop_map(|conv| Request::Unsubscribe { conv }),
        (conversation_id(), user_name()).prop_map(|(conv, user)| Request::AddMember { conv, user }),
        (conversation_id(), user_name())
            .prop_map(|(conv, user)| Request::RemoveMember { conv, user }),
        Just(Request::ListConversations),
        Just(Request::Presence),
        any::<bool>().prop_map(|away| Request::SetAway { away }),
        (conversation_id(), client_message_id(), seq(), text()).prop_map(
            |(conv, id, target, text)| Request::Edit {
                conv,
                id,
                target,
                text
            }
        ),
        (conversation_id(), client_message_id(), seq())
            .prop_map(|(conv, id, target)| Request::Delete { conv, id, target }),
        (conversation_id(), client_message_id(), seq(), text()).prop_map(
            |(conv, id, target, emoji)| Request::React {
                conv,
                id,
                target,
                emoji
            }
        ),
        (conversation_id(), client_message_id(), seq(), text()).prop_map(
            |(conv, id, target, emoji)| Request::Unreact {
                conv,
                id,
                target,
                emoji
            }
        ),
        (conversation_id(), client_message_id(), text(), seq()).prop_map(
            |(conv, id, text, reply_to)| Request::SendReply {
                conv,
                id,
                text,
                reply_to
            }
        ),
        (conversation_id(), seq()).prop_map(|(conv, seq)| Request::MarkRead { conv, seq }),
        (conversation_id(), seq()).prop_map(|(conv, seq)| Request::MarkDelivered { conv, seq }),
        Just(Request::Inbox),
        (conversation_id(), proptest::option::of(seq()), varint_u32()).prop_map(
            |(conv, before, limit)| Request::Page {
                conv,
                before,
                limit
            }
        ),
    ]
    .boxed()
}

fn receipt() -> BoxedStrategy<Receipt> {
    (user_name(), seq(), seq())
        .prop_map(|(user, delivered, read)| Receipt {
            user,
            delivered,
            read,
        })
        .boxed()
}

fn message_state() -> BoxedStrategy<MessageState> {
    let reaction = (text(), user_names()).prop_map(|(emoji, users)| Reaction { emoji, users });
    (
        seq(),
        proptest::option::of(text()),
        proptest::option::of(seq()),
        proptest::option::of(seq()),
        vec(reaction, 0..3),
    )
        .prop_map(|(seq, text, edited, deleted, reactions)| MessageState {
            seq,
            text,
            edited,
            deleted,
            reactions,
        })
        .boxed()
}

fn event_body() -> BoxedStrategy<EventBody> {
    prop_oneof![
        (client_message_id(), text()).prop_map(|(id, text)| EventBody::Message { id, text }),
        (text(), user_names()).prop_map(|(title, members)| EventBody::Created { title, members }),
        user_name().prop_map(|user| EventBody::MemberAdded { user }),
        user_name().prop_map(|user| EventBody::MemberRemoved { user }),
        any::<u32>().prop_map(|kind| EventBody::Unsupported { kind }),
        (client_message_id(), seq(), text()).prop_map(|(id, target, text)| EventBody::Edited {
            id,
            target,
            text
        }),
        (client_message_id(), seq()).prop_map(|(id, target)| EventBody::Deleted { id, target }),
        (client_message_id(), seq(), text())
            .prop_map(|(id, target, emoji)| EventBody::ReactionAdded { id, target, emoji }),
        (client_message_id(), seq(), text())
            .prop_map(|(id, target, emoji)| EventBody::ReactionRemoved { id, target, emoji }),
        (client_message_id(), text(), seq()).prop_map(|(id, text, reply_to)| EventBody::Reply {
            id,
            text,
            reply_to
        }),
    ]
    .boxed()
}

fn event() -> BoxedStrategy<Event> {
    (seq(), user_name(), varint_u64(), event_body())
        .prop_map(|(seq, sender, at_ms, body)| Event {
            seq,
            sender,
            at_ms,
            body,
        })
        .boxed()
}

fn presence_info() -> BoxedStrategy<PresenceInfo> {
    let state = prop_oneof![
        Just(PresenceState::Offline),
        Just(PresenceState::Online),
        Just(PresenceState::Away),
    ];
    (
        user_name(),
        state,
        proptest::option::of(varint_u64()),
        varint_u64(),
    )
        .prop_map(|(user, state, last_seen_ms, version)| PresenceInfo {
            user,
            state,
            last_seen_ms,
            version,
        })
        .boxed()
}

fn conversation_summary() -> BoxedStrategy<ConversationSummary> {
    (conversation_id(), text(), user_name(), user_names(), seq())
        .prop_map(
            |(conv, title, creator, members, head)| ConversationSummary {
                conv,
                title,
                creator,
                members,
                head,
            },
        )
        .boxed()
}

fn response() -> BoxedStrategy<Response> {
    prop_oneof![
        (conversation_id(), seq()).prop_map(|(conv, seq)| Response::Created { conv, seq }),
        (conversation_id(), seq(), varint_u64(), any::<bool>()).prop_map(
            |(conv, seq, at_ms, duplicate)| Response::Sent {
                conv,
                seq,
                at_ms,
                duplicate
            }
        ),
        (conversation_id(), vec(event(), 0..3), seq())
            .prop_map(|(conv, events, head)| Response::History { conv, events, head }),
        (conversation_id(), seq()).prop_map(|(conv, head)| Response::Subscribed { conv, head }),
        conversation_id().prop_map(|conv| Response::Unsubscribed { conv }),
        (conversation_id(), seq())
            .prop_map(|(conv, seq)| Response::MembershipChanged { conv, seq }),
        vec(conversation_summary(), 0..3)
            .prop_map(|conversations| Response::Conversations { conversations }),
        (conversation_id(), epoch(), seq()).prop_map(|(conv, epoch, head)| Response::CursorReset {
            conv,
            epoch,
            head
        }),
        vec(presence_info(), 0..3).prop_map(|users| Response::Presence { users }),
        any::<bool>().prop_map(|away| Response::AwaySet { away }),
        (conversation_id(), receipt())
            .prop_map(|(conv, receipt)| Response::Receipt { conv, receipt }),
        vec(
            (conversation_summary(), seq(), seq(), varint_u64()).prop_map(
                |(summary, delivered, read, unread)| InboxEntry {
                    summary,
                    delivered,
                    read,
                    unread
                }
            ),
            0..3
        )
        .prop_map(|conversations| Response::Inbox { conversations }),
        (
            conversation_id(),
            vec(event(), 0..3),
            vec(message_state(), 0..3),
            seq(),
            seq()
        )
            .prop_map(|(conv, events, states, head, oldest)| Response::Page {
                conv,
                events,
                states,
                head,
                oldest
            }),
        (conversation_id(), seq(), seq()).prop_map(|(conv, oldest, head)| Response::Pruned {
            conv,
            oldest,
            head
        }),
    ]
    .boxed()
}

fn client_frame() -> BoxedStrategy<ClientFrame> {
    prop_oneof![
        1 => (text(), text(), any::<u16>()).prop_map(|(token, client, revision)| ClientFrame::Hello {
            token,
            client,
            revision,
        }),
        4 => (request_id(), request()).prop_map(|(id, request)| ClientFrame::Request { id, request }),
    ]
    .boxed()
}

fn server_frame() -> BoxedStrategy<ServerFrame> {
    prop_oneof![
        1 => (user_name(), epoch(), text(), any::<u16>())
            .prop_map(|(user, epoch, server, revision)| ServerFrame::Welcome {
                user,
                epoch,
                server,
                revision,
            }),
        4 => (request_id(), response()).prop_map(|(id, response)| ServerFrame::Reply { id, response }),
        2 => (request_id(), error_body()).prop_map(|(id, error)| ServerFrame::Error { id, error }),
        1 => error_body().prop_map(|error| ServerFrame::Closing { error }),
    ]
    .boxed()
}

fn delivery_frame() -> BoxedStrategy<DeliveryFrame> {
    prop_oneof![
        1 => (conversation_id(), epoch()).prop_map(|(conv, epoch)| DeliveryFrame::Start { conv, epoch }),
        4 => event().prop_map(DeliveryFrame::Event),
        1 => error_body().prop_map(|error| DeliveryFrame::End { error }),
        1 => receipt().prop_map(DeliveryFrame::Receipt),
        1 => (conversation_id(), epoch(), request_id())
            .prop_map(|(conv, epoch, request)| DeliveryFrame::Opened { conv, epoch, request }),
    ]
    .boxed()
}

// Variant indices, by exhaustive matches: appending a variant to an enum breaks the build here,
// which is the reminder to add it to the strategy above (checked by
// `strategies_generate_every_variant`).

fn client_frame_variant(v: &ClientFrame) -> usize {
    match v {
        ClientFrame::Hello { .. } => 0,
        ClientFrame::Request { .. } => 1,
    }
}

fn request_variant(v: &Request) -> usize {
    match v {
        Request::CreateConversation { .. } => 0,
        Request::Send { .. } => 1,
        Request::History { .. } => 2,
        Request::Subscribe { .. } => 3,
        Request::Unsubscribe { .. } => 4,
        Request::AddMember { .. } => 5,
        Request::RemoveMember { .. } => 6,
        Request::ListConversations => 7,
        Request::Presence => 8,
        Request::SetAway { .. } => 9,
        Request::Edit { .. } => 10,
        Request::Delete { .. } => 11,
        Request::React { .. } => 12,
        Request::Unreact { .. } => 13,
        Request::SendReply { .. } => 14,
        Request::MarkRead { .. } => 15,
        Request::MarkDelivered { .. } => 16,
        Request::Inbox => 17,
        Request::Page { .. } => 18,
    }
}

fn start_at_variant(v: &StartAt) -> usize {
    match v {
        StartAt::Beginning => 0,
        StartAt::After(_) => 1,
        StartAt::Latest => 2,
    }
}

fn server_frame_variant(v: &ServerFrame) -> usize {
    match v {
        ServerFrame::Welcome { .. } => 0,
        ServerFrame::Reply { .. } => 1,
        ServerFrame::Error { .. } => 2,
        ServerFrame::Closing { .. } => 3,
    }
}

fn response_variant(v: &Response) -> usize {
    match v {
        Response::Created { .. } => 0,
        Response::Sent { .. } => 1,
        Response::History { .. } => 2,
        Response::Subscribed { .. } => 3,
        Response::Unsubscribed { .. } => 4,
        Response::MembershipChanged { .. } => 5,
        Response::Conversations { .. } => 6,
        Response::CursorReset { .. } => 7,
        Response::Presence { .. } => 8,
        Response::AwaySet { .. } => 9,
        Response::Receipt { .. } => 10,
        Response::Inbox { .. } => 11,
        Response::Page { .. } => 12,
        Response::Pruned { .. } => 13,
    }
}

fn delivery_frame_variant(v: &DeliveryFrame) -> usize {
    match v {
        DeliveryFrame::Start { .. } => 0,
        DeliveryFrame::Event(_) => 1,
        DeliveryFrame::End { .. } => 2,
        DeliveryFrame::Receipt(_) => 3,
        DeliveryFrame::Opened { .. } => 4,
    }
}

fn event_body_variant(v: &EventBody) -> usize {
    match v {
        EventBody::Message { .. } => 0,
        EventBody::Created { .. } => 1,
        EventBody::MemberAdded { .. } => 2,
        EventBody::MemberRemoved { .. } => 3,
        EventBody::Unsupported { .. } => 4,
        EventBody::Edited { .. } => 5,
        EventBody::Deleted { .. } => 6,
        EventBody::ReactionAdded { .. } => 7,
        EventBody::ReactionRemoved { .. } => 8,
        EventBody::Reply { .. } => 9,
    }
}

/// Draws values from `strategy` until each of `count` variants has been seen.
fn assert_covers_all_variants<T: Debug>(
    what: &str,
    strategy: impl Strategy<Value = T>,
    variant: fn(&T) -> usize,
    count: usize,
) {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut seen = vec![false; count];
    for _ in 0..2000 {
        let value = strategy
            .new_tree(&mut runner)
            .expect("the strategy generates values")
            .current();
        seen[variant(&value)] = true;
        if seen.iter().all(|s| *s) {
            return;
        }
    }
    panic!("{what} strategy never generated some variants: seen = {seen:?}");
}

#[test]
fn strategies_generate_every_variant() {
    assert_covers_all_variants("ClientFrame", client_frame(), client_frame_variant, 2);
    assert_covers_all_variants("Request", request(), request_variant, 19);
    assert_covers_all_variants("StartAt", start_at(), start_at_variant, 3);
    assert_covers_all_variants("ServerFrame", server_frame(), server_frame_variant, 4);
    assert_covers_all_variants("Response", response(), response_variant, 14);
    assert_covers_all_variants("DeliveryFrame", delivery_frame(), delivery_frame_variant, 5);
    assert_covers_all_variants("EventBody", event_body(), event_body_variant, 10);
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    encode_frame(value, MAX_FRAME_LEN).expect("encodes")
}

/// A frame header for a body of `len` bytes.
fn prefix(len: u32) -> [u8; LENGTH_PREFIX_LEN] {
    len.to_be_bytes()
}

/// `body` with its length prefix.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out =
        prefix(u32::try_from(body.len()).expect("a test body fits a u32 length")).to_vec();
    out.extend_from_slice(body);
    out
}

/// Encodes `value`, then checks the prefix, `decode_exact` and a `FrameDecoder` all agree.
fn check_round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Clone + Debug,
{
    let frame = encode(value);
    let body = &frame[LENGTH_PREFIX_LEN..];
    prop_assert_eq!(&frame[..LENGTH_PREFIX_LEN], &prefix(body.len() as u32)[..]);
    prop_assert_eq!(decode_exact::<T>(body), Ok(value.clone()));

    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&frame);
    prop_assert_eq!(decoder.next_frame::<T>(), Ok(Some(value.clone())));
    prop_assert_eq!(decoder.next_frame::<T>(), Ok(None));
    prop_assert_eq!(decoder.pending_len(), 0);
    prop_assert_eq!(decoder.finish(), Ok(()));
    Ok(())
}

/// Encodes `frames` into one stream, returning it and the offset where each frame ends.
fn encode_stream<T: Serialize>(frames: &[T]) -> (Vec<u8>, Vec<usize>) {
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for frame in frames {
        stream.extend_from_slice(&encode(frame));
        ends.push(stream.len());
    }
    (stream, ends)
}

/// Chunk boundaries from random cut points: sorted, deduplicated, ending at `len`.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
    points.push(len);
    points.sort_unstable();
    points.dedup();
    points
}

/// Feeds `stream` split at `points`, draining frames after each chunk, and checks that every
/// frame comes out as soon as its last byte is in (none is held back waiting for more bytes).
fn feed_in_chunks<T>(
    stream: &[u8],
    points: &[usize],
    ends: &[usize],
) -> Result<(Vec<T>, FrameDecoder), TestCaseError>
where
    T: DeserializeOwned + Debug,
{
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut out = Vec::new();
    let mut from = 0;
    for &to in points {
        decoder.push(&stream[from..to]);
        from = to;
        loop {
            match decoder.next_frame::<T>() {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => break,
                Err(e) => return Err(TestCaseError::fail(format!("decode error at {to}: {e}"))),
            }
        }
        let complete = ends.iter().filter(|&&end| end <= to).count();
        prop_assert_eq!(out.len(), complete, "frames decoded after {} bytes", to);
        let last_end = ends
            .iter()
            .copied()
            .filter(|&end| end <= to)
            .max()
            .unwrap_or(0);
        prop_assert_eq!(decoder.pending_len(), to - last_end);
    }
    Ok((out, decoder))
}

/// The stream split at random points, then byte by byte, yields exactly `frames`.
fn check_chunked<T>(frames: &[T], cuts: &[Index]) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let (stream, ends) = encode_stream(frames);

    let points = cut_points(stream.len(), cuts);
    let (out, decoder) = feed_in_chunks::<T>(&stream, &points, &ends)?;
    prop_assert_eq!(&out[..], frames);
    prop_assert_eq!(decoder.finish(), Ok(()));

    let one_byte: Vec<usize> = (1..=stream.len()).collect();
    let (out, decoder) = feed_in_chunks::<T>(&stream, &one_byte, &ends)?;
    prop_assert_eq!(&out[..], frames);
    prop_assert_eq!(decoder.finish(), Ok(()));
    Ok(())
}

/// The stream cut after `cut` bytes: the frames wholly before the cut come out, and `finish`
/// reports the bytes of the frame that was cut, if any.
fn check_cut<T>(frames: &[T], cut: Index) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let (stream, ends) = encode_stream(frames);
    let cut = cut.index(stream.len()); // 0 ..= len - 1: the last frame is never complete
    let (out, decoder) = feed_in_chunks::<T>(&stream[..cut], &[cut], &ends)?;
    let complete = ends.iter().filter(|&&end| end <= cut).count();
    prop_assert_eq!(&out[..], &frames[..complete]);
    let last_end = if complete == 0 { 0 } else { ends[complete - 1] };
    if cut == last_end {
        prop_assert_eq!(decoder.finish(), Ok(()));
    } else {
        let err = decoder.finish().expect_err("a frame was cut");
        prop_assert_eq!(&err, &FrameError::Truncated(cut - last_end));
        prop_assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);
    }
    Ok(())
}

/// Pushes `bytes` and pulls frames until the decoder wants more or fails; must not panic.
/// Any frame that does decode must re-encode and decode to itself.
fn drain_without_panic<T>(bytes: &[u8], max_len: u32) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let mut decoder = FrameDecoder::new(max_len);
    decoder.push(bytes);
    while let Ok(Some(frame)) = decoder.next_frame::<T>() {
        let again = encode_frame(&frame, u32::MAX).expect("re-encodes");
        prop_assert_eq!(decode_exact::<T>(&again[LENGTH_PREFIX_LEN..]), Ok(frame));
    }
    let _ = decoder.finish();
    Ok(())
}

/// `decode_exact` of `body` as every frame type; must not panic. Whatever decodes re-encodes
/// to a body that decodes to the same value.
fn decode_exact_without_panic(body: &[u8]) -> Result<(), TestCaseError> {
    fn one<T: Serialize + DeserializeOwned + PartialEq + Debug>(
        body: &[u8],
    ) -> Result<(), TestCaseError> {
        if let Ok(value) = decode_exact::<T>(body) {
            let again = encode_frame(&value, u32::MAX).expect("re-encodes");
            prop_assert_eq!(decode_exact::<T>(&again[LENGTH_PREFIX_LEN..]), Ok(value));
        }
        Ok(())
    }
    one::<ClientFrame>(body)?;
    one::<ServerFrame>(body)?;
    one::<DeliveryFrame>(body)?;
    Ok(())
}

/// Applies `(position, xor)` changes to `bytes` (a non-zero xor always changes the byte).
fn corrupt(mut bytes: Vec<u8>, changes: &[(Index, u8)]) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, xor) in changes {
            let i = at.index(bytes.len());
            bytes[i] ^= (*xor).max(1);
        }
    }
    bytes
}

// ------------------------------------------------------------------------------------------------
// 1. Round trips
// 2. Chunking and truncation
// 3. Decoding never panics
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn client_frame_round_trips(frame in client_frame()) {
        check_round_trip(&frame)?;
    }

    #[test]
    fn server_frame_round_trips(frame in server_frame()) {
        check_round_trip(&frame)?;
    }

    #[test]
    fn delivery_frame_round_trips(frame in delivery_frame()) {
        check_round_trip(&frame)?;
    }

    /// The component types are framed and decoded on their own too, so a failure points at
    /// the type that breaks rather than at the frame that contains it.
    #[test]
    fn every_component_type_round_trips(
        request in request(),
        response in response(),
        event in event(),
        body in event_body(),
        error in error_body(),
        start in start_at(),
        position in position(),
        summary in conversation_summary(),
        ids in (conversation_id(), seq(), request_id(), client_message_id(), epoch(), user_name(), error_code()),
    ) {
        check_round_trip(&request)?;
        check_round_trip(&response)?;
        check_round_trip(&event)?;
        check_round_trip(&body)?;
        check_round_trip(&error)?;
        check_round_trip(&start)?;
        check_round_trip(&position)?;
        check_round_trip(&summary)?;
        check_round_trip(&ids.0)?;
        check_round_trip(&ids.1)?;
        check_round_trip(&ids.2)?;
        check_round_trip(&ids.3)?;
        check_round_trip(&ids.4)?;
        check_round_trip(&ids.5)?;
        check_round_trip(&ids.6)?;
    }

    #[test]
    fn client_frames_survive_any_chunking(
        frames in vec(client_frame(), 1..6),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        check_chunked(&frames, &cuts)?;
    }

    #[test]
    fn server_frames_survive_any_chunking(
        frames in vec(server_frame(), 1..6),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        check_chunked(&frames, &cuts)?;
    }

    #[test]
    fn delivery_frames_survive_any_chunking(
        frames in vec(delivery_frame(), 1..6),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        check_chunked(&frames, &cuts)?;
    }

    #[test]
    fn stream_cut_inside_a_frame_is_truncated(
        client in vec(client_frame(), 1..4),
        server in vec(server_frame(), 1..4),
        delivery in vec(delivery_frame(), 1..4),
        cut in any::<Index>(),
    ) {
        check_cut(&client, cut)?;
        check_cut(&server, cut)?;
        check_cut(&delivery, cut)?;
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..256),
        max_len in prop_oneof![Just(MAX_FRAME_LEN), 0u32..64, Just(u32::MAX)],
    ) {
        drain_without_panic::<ClientFrame>(&bytes, max_len)?;
        drain_without_panic::<ServerFrame>(&bytes, max_len)?;
        drain_without_panic::<DeliveryFrame>(&bytes, max_len)?;
    }

    /// Random bodies behind correct length prefixes, so the body decoder itself is exercised
    /// (a random prefix is nearly always rejected as too large).
    #[test]
    fn decoder_never_panics_on_arbitrary_bodies(bodies in vec(vec(any::<u8>(), 0..64), 1..5)) {
        let stream: Vec<u8> = bodies.iter().flat_map(|b| framed(b)).collect();
        drain_without_panic::<ClientFrame>(&stream, MAX_FRAME_LEN)?;
        drain_without_panic::<ServerFrame>(&stream, MAX_FRAME_LEN)?;
        drain_without_panic::<DeliveryFrame>(&stream, MAX_FRAME_LEN)?;
        for body in &bodies {
            decode_exact_without_panic(body)?;
        }
    }

    /// Valid frames with a few bytes flipped, truncated or extended: close to valid, so they get
    /// deep into the decoder.
    #[test]
    fn decoding_corrupted_frames_never_panics(
        client in client_frame(),
        server in server_frame(),
        delivery in delivery_frame(),
        changes in vec((any::<Index>(), any::<u8>()), 1..4),
        keep in any::<Index>(),
        extra in vec(any::<u8>(), 0..4),
    ) {
        for frame in [encode(&client), encode(&server), encode(&delivery)] {
            let body = frame[LENGTH_PREFIX_LEN..].to_vec();
            let corrupted = corrupt(body.clone(), &changes);
            let mut cut = body[..keep.index(body.len() + 1)].to_vec();
            cut.extend_from_slice(&extra);
            for bad in [corrupted, cut] {
                decode_exact_without_panic(&bad)?;
                let stream = framed(&bad);
                drain_without_panic::<ClientFrame>(&stream, MAX_FRAME_LEN)?;
                drain_without_panic::<ServerFrame>(&stream, MAX_FRAME_LEN)?;
                drain_without_panic::<DeliveryFrame>(&stream, MAX_FRAME_LEN)?;
            }
            // Corrupting the prefix too.
            let stream = corrupt(frame, &changes);
            drain_without_panic::<ClientFrame>(&stream, MAX_FRAME_LEN)?;
            drain_without_panic::<ServerFrame>(&stream, MAX_FRAME_LEN)?;
            drain_without_panic::<DeliveryFrame>(&stream, MAX_FRAME_LEN)?;
        }
    }

    #[test]
    fn decode_exact_never_panics(bytes in vec(any::<u8>(), 0..256)) {
        decode_exact_without_panic(&bytes)?;
    }

    /// With any limit, encoder and decoder agree on which frames fit.
    #[test]
    fn encoder_and_decoder_agree_on_the_length_limit(frame in server_frame(), slack in -2i64..=2) {
        let body_len = encode(&frame).len() - LENGTH_PREFIX_LEN;
        let max_len = u32::try_from((body_len as i64 + slack).max(0)).unwrap();
        let too_large = FrameError::TooLarge { len: body_len as u64, max: max_len };
        let fits = body_len as u64 <= u64::from(max_len);

        let encoded = encode_frame(&frame, max_len);
        if fits {
            prop_assert_eq!(encoded.map(|bytes| bytes.len()), Ok(LENGTH_PREFIX_LEN + body_len));
        } else {
            prop_assert_eq!(encoded, Err(too_large.clone()));
        }

        let mut decoder = FrameDecoder::new(max_len);
        decoder.push(&encode(&frame));
        let decoded = decoder.next_frame::<ServerFrame>();
        if fits {
            prop_assert_eq!(decoded, Ok(Some(frame)));
        } else {
            prop_assert_eq!(decoded, Err(too_large));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// 4. Over-long frames
// ------------------------------------------------------------------------------------------------

/// A `Hello` whose body is exactly `body_len` bytes, for `body_len` from 2^14 + 6 to 2^21 + 5:
/// variant 00, token as a 3-byte varint length and `body_len - 6` bytes, client as 00 (empty),
/// revision 01.
fn hello_with_body_len(body_len: usize) -> ClientFrame {
    assert!(((1 << 14) + 6..(1 << 21) + 6).contains(&body_len));
    ClientFrame::Hello {
        token: "t".repeat(body_len - 6),
        client: String::new(),
        revision: quip_protocol::REVISION,
    }
}

#[test]
fn four_gib_length_prefix_is_rejected_before_any_body_byte() {
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&[0xff, 0xff, 0xff]);
    assert_eq!(
        decoder.next_frame::<ClientFrame>(),
        Ok(None),
        "3 prefix bytes: wait"
    );
    decoder.push(&[0xff]);
    assert_eq!(decoder.pending_len(), 4, "only the prefix was pushed");
    let err = decoder.next_frame::<ClientFrame>().unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: 0xFFFF_FFFF,
            max: MAX_FRAME_LEN
        }
    );
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    // The decoder stays failed: asking again gives the same answer.
    assert_eq!(decoder.next_frame::<ClientFrame>(), Err(err));
}

#[test]
fn over_long_prefix_is_rejected_for_every_frame_type() {
    for len in [MAX_FRAME_LEN + 1, 0x8000_0000, u32::MAX] {
        let expected = FrameError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_LEN,
        };
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        decoder.push(&prefix(len));
        assert_eq!(decoder.next_frame::<ClientFrame>(), Err(expected.clone()));
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        decoder.push(&prefix(len));
        assert_eq!(decoder.next_frame::<ServerFrame>(), Err(expected.clone()));
        let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
        decoder.push(&prefix(len));
        assert_eq!(decoder.next_frame::<DeliveryFrame>(), Err(expected));
    }
}

#[test]
fn over_long_prefix_after_a_good_frame_is_rejected_after_that_frame() {
    let hello = ClientFrame::Hello {
        token: "tok".into(),
        client: "c".into(),
        revision: quip_protocol::REVISION,
    };
    let mut stream = encode(&hello);
    stream.extend_from_slice(&prefix(MAX_FRAME_LEN + 1));
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&stream);
    assert_eq!(decoder.next_frame::<ClientFrame>(), Ok(Some(hello)));
    assert_eq!(
        decoder.next_frame::<ClientFrame>().unwrap_err().code(),
        ErrorCode::FRAME_TOO_LARGE
    );
}

#[test]
fn frame_of_exactly_max_len_is_accepted() {
    let hello = hello_with_body_len(MAX_FRAME_LEN as usize);
    let frame = encode_frame(&hello, MAX_FRAME_LEN).unwrap();
    assert_eq!(frame.len(), LENGTH_PREFIX_LEN + MAX_FRAME_LEN as usize);
    assert_eq!(&frame[..LENGTH_PREFIX_LEN], &[0x00, 0x10, 0x00, 0x00]);

    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut chunks = frame.chunks(64 * 1024).peekable();
    while let Some(chunk) = chunks.next() {
        decoder.push(chunk);
        let got = decoder.next_frame::<ClientFrame>().unwrap();
        if chunks.peek().is_some() {
            assert_eq!(got, None);
        } else {
            assert_eq!(got.as_ref(), Some(&hello));
        }
    }
    assert_eq!(decoder.finish(), Ok(()));
}

#[test]
fn encode_frame_refuses_a_body_one_byte_over_max_len() {
    let hello = hello_with_body_len(MAX_FRAME_LEN as usize + 1);
    let err = encode_frame(&hello, MAX_FRAME_LEN).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: u64::from(MAX_FRAME_LEN) + 1,
            max: MAX_FRAME_LEN
        }
    );
    assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
    // The same frame under a larger limit is refused by a decoder with the real limit.
    let frame = encode_frame(&hello, MAX_FRAME_LEN + 1).unwrap();
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&frame[..LENGTH_PREFIX_LEN]);
    assert_eq!(decoder.next_frame::<ClientFrame>(), Err(err));
}

#[test]
fn small_limits_are_exact_on_both_sides() {
    let frame = ClientFrame::Hello {
        token: "tok".into(),
        client: "quip-cli/0.1".into(),
        revision: quip_protocol::REVISION,
    };
    let bytes = encode(&frame);
    let body_len = (bytes.len() - LENGTH_PREFIX_LEN) as u32; // 18
    assert!(encode_frame(&frame, body_len).is_ok());
    assert_eq!(
        encode_frame(&frame, body_len - 1),
        Err(FrameError::TooLarge {
            len: u64::from(body_len),
            max: body_len - 1
        })
    );
    let mut exact = FrameDecoder::new(body_len);
    exact.push(&bytes);
    assert_eq!(exact.next_frame::<ClientFrame>(), Ok(Some(frame)));
    let mut short = FrameDecoder::new(body_len - 1);
    short.push(&bytes[..LENGTH_PREFIX_LEN]);
    assert_eq!(
        short.next_frame::<ClientFrame>().unwrap_err().code(),
        ErrorCode::FRAME_TOO_LARGE
    );
}

// ------------------------------------------------------------------------------------------------
// 5. Malformed frames
// ------------------------------------------------------------------------------------------------

/// `FrameError::Malformed` says which of postcard's errors the body hit; comparing with the
/// error (not its wording) pins the reason each corpus entry is refused.
fn malformed(reason: postcard::Error) -> FrameError {
    FrameError::malformed(&reason)
}

#[test]
fn malformed_reasons_are_in_the_spec_s_words() {
    let cases = [
        (&[0x09][..], "an unknown enum variant"),
        (&[0x01, 0x07, 0x13][..], "an unknown enum variant"),
        (&[0x01][..], "the body ends inside a value"),
        (
            &[
                0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ][..],
            "a varint",
        ),
    ];
    for (body, words) in cases {
        let reason = decode_exact::<ClientFrame>(body).unwrap_err().to_string();
        assert!(reason.contains(words), "{}: {reason}", hex::encode(body));
        assert!(
            !reason.contains("Serde") && !reason.contains("usize"),
            "{reason}"
        );
    }
}

/// The body ended inside a value.
fn unexpected_end() -> FrameError {
    malformed(postcard::Error::DeserializeUnexpectedEnd)
}

/// An enum variant index this version does not define (reported through serde's custom error).
fn unknown_variant() -> FrameError {
    malformed(postcard::Error::SerdeDeCustom)
}

/// `body` must be rejected as a `T` with `expected`, both by `decode_exact` and by a decoder fed
/// the framed body, and the peer must be told `PROTOCOL_VIOLATION`.
#[track_caller]
fn assert_rejected<T: DeserializeOwned + PartialEq + Debug>(body: &[u8], expected: FrameError) {
    let hex = hex::encode(body);
    let direct = decode_exact::<T>(body);
    assert_eq!(direct, Err(expected.clone()), "decode_exact({hex})");
    assert_eq!(expected.code(), ErrorCode::PROTOCOL_VIOLATION);

    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&framed(body));
    assert_eq!(decoder.next_frame::<T>(), Err(expected), "framed {hex}");
}

#[test]
fn truncated_body_is_malformed() {
    let send = ClientFrame::Request {
        id: RequestId(7),
        request: Request::Send {
            conv: ConversationId(1),
            id: ClientMessageId([0x11; 16]),
            text: "héllo 👋".into(),
        },
    };
    let body = encode(&send)[LENGTH_PREFIX_LEN..].to_vec();
    // Every proper prefix of the body, from empty to one byte short (a cut inside a varint, inside
    // the raw id, inside the text's UTF-8 ...).
    for len in 0..body.len() {
        assert_rejected::<ClientFrame>(&body[..len], unexpected_end());
    }
}

#[test]
fn truncated_body_in_a_stream_waits_then_is_truncated() {
    let frame = encode(&ServerFrame::Closing {
        error: ErrorBody::new(ErrorCode::GOING_AWAY, "bye"),
    });
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&frame[..frame.len() - 1]);
    assert_eq!(decoder.next_frame::<ServerFrame>(), Ok(None));
    let err = decoder.finish().unwrap_err();
    assert_eq!(err, FrameError::Truncated(frame.len() - 1));
    assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);

    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&frame[..2]);
    assert_eq!(decoder.next_frame::<ServerFrame>(), Ok(None));
    assert_eq!(
        decoder.finish(),
        Err(FrameError::Truncated(2)),
        "cut inside the prefix"
    );
}

#[test]
fn unknown_variant_index_is_malformed() {
    assert_rejected::<ClientFrame>(&[0x09], unknown_variant());
    assert_rejected::<ClientFrame>(&[0x02], unknown_variant()); // one past Request
    assert_rejected::<ServerFrame>(&[0x04], unknown_variant()); // one past Closing
    assert_rejected::<DeliveryFrame>(&[0x05], unknown_variant()); // one past Opened
    assert_rejected::<ClientFrame>(&[0xff, 0xff, 0xff, 0xff, 0x0f], unknown_variant()); // u32::MAX
                                                                                        // Request 19 (one past Page) inside ClientFrame::Request { id: 7 }.
    assert_rejected::<ClientFrame>(&[0x01, 0x07, 0x13], unknown_variant());
    // Subscribe { conv: 1, start: StartAt 3 (one past Latest) }.
    assert_rejected::<ClientFrame>(&[0x01, 0x07, 0x03, 0x01, 0x03], unknown_variant());
    // Response 14 (one past Pruned) inside ServerFrame::Reply { id: 7 }.
    assert_rejected::<ServerFrame>(&[0x01, 0x07, 0x0e], unknown_variant());
    // DeliveryFrame::Event { seq 1, sender "a", at_ms 0, body: EventBody 10 (one past Reply) }.
    assert_rejected::<DeliveryFrame>(&[0x01, 0x01, 0x01, b'a', 0x00, 0x0a], unknown_variant());
}

#[test]
fn invalid_utf8_in_a_string_is_malformed() {
    // Hello { token: <bytes>, client: "" }
    for bad in [
        &[0xc3, 0x28][..],         // 2-byte lead followed by a non-continuation
        &[0x80],                   // lone continuation byte
        &[0xc0, 0x80],             // overlong encoding of NUL
        &[0xed, 0xa0, 0x80],       // UTF-16 surrogate U+D800
        &[0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
        &[0xf0, 0x9f, 0x91],       // 👋 missing its last byte
    ] {
        let mut body = vec![0x00, bad.len() as u8];
        body.extend_from_slice(bad);
        body.push(0x00);
        assert_rejected::<ClientFrame>(&body, malformed(postcard::Error::DeserializeBadUtf8));
    }
    // A bad user name in Welcome is caught the same way.
    let mut welcome = vec![0x00, 0x02, 0xff, 0xfe];
    welcome.extend_from_slice(&[0u8; 16]);
    welcome.push(0x00);
    assert_rejected::<ServerFrame>(&welcome, malformed(postcard::Error::DeserializeBadUtf8));
}

#[test]
fn trailing_bytes_after_a_valid_value_are_rejected() {
    let hello = encode(&ClientFrame::Hello {
        token: "tok".into(),
        client: "quip-cli/0.1".into(),
        revision: quip_protocol::REVISION,
    });
    let mut body = hello[LENGTH_PREFIX_LEN..].to_vec();
    body.push(0x00);
    assert_rejected::<ClientFrame>(&body, FrameError::TrailingBytes(1));
    body.extend_from_slice(b"xy");
    assert_rejected::<ClientFrame>(&body, FrameError::TrailingBytes(3));
    // ListConversations is 3 bytes (01 07 07); a fourth is left over.
    assert_rejected::<ClientFrame>(&[0x01, 0x07, 0x07, 0x00], FrameError::TrailingBytes(1));
}

#[test]
fn zero_length_frame_is_malformed() {
    assert_rejected::<ClientFrame>(&[], unexpected_end());
    assert_rejected::<ServerFrame>(&[], unexpected_end());
    assert_rejected::<DeliveryFrame>(&[], unexpected_end());
    // Exactly the 4 zero bytes of the prefix are enough to fail.
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&[0, 0, 0, 0]);
    let err = decoder.next_frame::<ClientFrame>().unwrap_err();
    assert_eq!(err, unexpected_end());
    assert_eq!(err.code(), ErrorCode::PROTOCOL_VIOLATION);
}

/// A count that claims billions of elements in a body of a few bytes must fail on the missing
/// bytes, not first try to reserve room for the elements: reserving 4 billion `UserName`s
/// (~100 GB) would abort the test process, and 2^63 of them would panic on capacity overflow.
#[test]
fn huge_element_counts_fail_fast_without_allocating() {
    let huge_counts: [&[u8]; 4] = [
        &[0xff, 0xff, 0xff, 0xff, 0x0f], // u32::MAX
        &[0x80, 0xd0, 0xac, 0xf3, 0x0e], // 4_000_000_000
        &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01], // 2^63
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], // u64::MAX
    ];
    let started = std::time::Instant::now();
    for count in huge_counts {
        let with = |head: &[u8], tail: &[u8]| [head, count, tail].concat();
        // CreateConversation { title: "", members: <count> × UserName }, one name present.
        assert_rejected::<ClientFrame>(
            &with(&[0x01, 0x07, 0x00, 0x00], &[0x01, b'a']),
            unexpected_end(),
        );
        // Reply { Conversations { conversations: <count> × ConversationSummary } }
        assert_rejected::<ServerFrame>(&with(&[0x01, 0x07, 0x06], &[]), unexpected_end());
        // Reply { History { conv: 1, events: <count> × Event } }
        assert_rejected::<ServerFrame>(&with(&[0x01, 0x07, 0x02, 0x01], &[0x01]), unexpected_end());
        // Event { Created { title: "", members: <count> × UserName } }
        assert_rejected::<DeliveryFrame>(
            &with(&[0x01, 0x01, 0x01, b'a', 0x00, 0x01, 0x00], &[]),
            unexpected_end(),
        );
        // Strings claiming billions of bytes: Hello { token: <count> bytes }, Send { text }.
        assert_rejected::<ClientFrame>(&with(&[0x00], b"tok"), unexpected_end());
        let mut send = vec![0x01, 0x07, 0x01, 0x01];
        send.extend_from_slice(&[0x11; 16]);
        assert_rejected::<ClientFrame>(&with(&send, b"hi"), unexpected_end());
    }
    // Generous bound: each case is a handful of bytes; this only catches an element-by-element walk.
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn bad_bool_option_and_varint_encodings_are_malformed() {
    // Reply { Sent { conv 1, seq 42, at_ms 0, duplicate: 02 } }: a bool is 00 or 01 only.
    assert_rejected::<ServerFrame>(
        &[0x01, 0x07, 0x01, 0x01, 0x2a, 0x00, 0x02],
        malformed(postcard::Error::DeserializeBadBool),
    );
    // History { conv 1, before: tag 02, limit 50 }: an Option tag is 00 or 01 only.
    assert_rejected::<ClientFrame>(
        &[0x01, 0x07, 0x02, 0x01, 0x02, 0x32],
        malformed(postcard::Error::DeserializeBadOption),
    );
    // A u64 varint of 11 bytes (more than the 10 a u64 can take).
    let mut long_id = vec![0x01];
    long_id.extend_from_slice(&[0x80; 10]);
    long_id.extend_from_slice(&[0x01, 0x07]);
    assert_rejected::<ClientFrame>(&long_id, malformed(postcard::Error::DeserializeBadVarint));
    // A 10-byte u64 varint whose last byte carries bits above 2^64.
    let mut overflow_id = vec![0x01];
    overflow_id.extend_from_slice(&[0xff; 9]);
    overflow_id.extend_from_slice(&[0x02, 0x07]);
    assert_rejected::<ClientFrame>(
        &overflow_id,
        malformed(postcard::Error::DeserializeBadVarint),
    );
    // Error { id 7, code 70000 (does not fit the u16 ErrorCode), "", None }.
    assert_rejected::<ServerFrame>(
        &[0x02, 0x07, 0xf0, 0xa2, 0x04, 0x00, 0x00],
        malformed(postcard::Error::DeserializeBadVarint),
    );
    // History { conv 1, before: None, limit: 2^32 } (does not fit the u32 limit).
    assert_rejected::<ClientFrame>(
        &[0x01, 0x07, 0x02, 0x01, 0x00, 0x80, 0x80, 0x80, 0x80, 0x10],
        malformed(postcard::Error::DeserializeBadVarint),
    );
}

// ------------------------------------------------------------------------------------------------
// 6. Golden vectors
// ------------------------------------------------------------------------------------------------

/// `value` must encode to exactly the concatenation of `parts` (hex, spaces ignored), and those
/// bytes must decode back to `value`.
#[track_caller]
fn assert_golden<T>(value: &T, parts: &[&str])
where
    T: Serialize + DeserializeOwned + PartialEq + Clone + Debug,
{
    let expected_hex: String = parts.concat().split_whitespace().collect();
    let expected = hex::decode(&expected_hex).expect("valid hex in the vector");
    let actual = encode_frame(value, MAX_FRAME_LEN).expect("the value encodes");
    assert_eq!(hex::encode(&actual), expected_hex, "encoding of {value:?}");

    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    decoder.push(&expected);
    assert_eq!(decoder.next_frame::<T>(), Ok(Some(value.clone())));
    assert_eq!(decoder.finish(), Ok(()));
}

const EPOCH_0_TO_15: Epoch = Epoch([
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
]);

#[test]
fn golden_client_hello() {
    assert_golden(
        &ClientFrame::Hello {
            token: "tok".into(),
            client: "quip-cli/0.1".into(),
            revision: 1,
        },
        &[
            "00000013 ",                    // length prefix: 19-byte body (u32 big-endian)
            "00 ",                          // ClientFrame variant 0: Hello
            "03 746f6b ",                   // token: length 3, "tok"
            "0c 717569702d636c692f302e31 ", // client: length 12, "quip-cli/0.1"
            "01",                           // revision: 1 (varint)
        ],
    );
}

#[test]
fn golden_client_request_send() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(7),
            request: Request::Send {
                conv: ConversationId(1),
                id: ClientMessageId([0x11; 16]),
                text: "héllo 👋".into(),
            },
        },
        &[
            "00000020 ",                         // length prefix: 32-byte body
            "01 ",                               // ClientFrame variant 1: Request
            "07 ",                               // id: RequestId(7)
            "01 ",                               // Request variant 1: Send
            "01 ",                               // conv: ConversationId(1)
            "11111111111111111111111111111111 ", // id: ClientMessageId, 16 raw bytes
            "0b ",                               // text: length 11 (bytes, not characters)
            "68 c3a9 6c 6c 6f 20 f09f918b",      // "h" "é" "l" "l" "o" " " "👋" in UTF-8
        ],
    );
}

#[test]
fn golden_client_request_history_with_before() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(8),
            request: Request::History {
                conv: ConversationId(1),
                before: Some(Seq(100)),
                limit: 50,
            },
        },
        &[
            "00000007 ", // length prefix: 7-byte body
            "01 ",       // ClientFrame variant 1: Request
            "08 ",       // id: RequestId(8)
            "02 ",       // Request variant 2: History
            "01 ",       // conv: ConversationId(1)
            "01 64 ",    // before: Some, Seq(100)
            "32",        // limit: 50
        ],
    );
}

#[test]
fn golden_client_request_subscribe_after_position() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(9),
            request: Request::Subscribe {
                conv: ConversationId(300),
                start: StartAt::After(Position {
                    epoch: EPOCH_0_TO_15,
                    seq: Seq(42),
                }),
            },
        },
        &[
            "00000017 ",                         // length prefix: 23-byte body
            "01 ",                               // ClientFrame variant 1: Request
            "09 ",                               // id: RequestId(9)
            "03 ",                               // Request variant 3: Subscribe
            "ac02 ",                             // conv: ConversationId(300), 2-byte varint
            "01 ",                               // start: StartAt variant 1: After
            "000102030405060708090a0b0c0d0e0f ", // position.epoch: 16 raw bytes
            "2a",                                // position.seq: Seq(42)
        ],
    );
}

#[test]
fn golden_client_request_list_conversations() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(10),
            request: Request::ListConversations,
        },
        &[
            "00000003 ", // length prefix: 3-byte body
            "01 ",       // ClientFrame variant 1: Request
            "0a ",       // id: RequestId(10)
            "07",        // Request variant 7: ListConversations (a unit variant: no more bytes)
        ],
    );
}

#[test]
fn golden_server_welcome() {
    assert_golden(
        &ServerFrame::Welcome {
            user: UserName("alice".into()),
            epoch: EPOCH_0_TO_15,
            server: "quipd/0.1".into(),
            revision: 1,
        },
        &[
            "00000022 ",                         // length prefix: 34-byte body
            "00 ",                               // ServerFrame variant 0: Welcome
            "05 616c696365 ",                    // user: length 5, "alice"
            "000102030405060708090a0b0c0d0e0f ", // epoch: 16 raw bytes
            "09 71756970642f302e31 ",            // server: length 9, "quipd/0.1"
            "01",                                // revision: 1 (varint)
        ],
    );
}

#[test]
fn golden_server_reply_sent() {
    assert_golden(
        &ServerFrame::Reply {
            id: RequestId(7),
            response: Response::Sent {
                conv: ConversationId(1),
                seq: Seq(42),
                at_ms: 1_700_000_000_000,
                duplicate: false,
            },
        },
        &[
            "0000000c ",     // length prefix: 12-byte body
            "01 ",           // ServerFrame variant 1: Reply
            "07 ",           // id: RequestId(7)
            "01 ",           // Response variant 1: Sent
            "01 ",           // conv: ConversationId(1)
            "2a ",           // seq: Seq(42)
            "80d095ffbc31 ", // at_ms: 1_700_000_000_000 = 0x18B_CFE5_6800, 6-byte varint
            "00",            // duplicate: false
        ],
    );
}

#[test]
fn golden_server_error_not_found() {
    assert_golden(
        &ServerFrame::Error {
            id: RequestId(7),
            error: ErrorBody::not_found(),
        },
        &[
            "0000001a ",                                 // length prefix: 26-byte body
            "02 ",                                       // ServerFrame variant 2: Error
            "07 ",                                       // id: RequestId(7)
            "ac02 ",                                     // error.code: 300 NOT_FOUND (varint u16)
            "14 ",                                       // error.message: length 20
            "6e6f207375636820636f6e766572736174696f6e ", // "no such conversation"
            "00",                                        // error.retry_after_ms: None
        ],
    );
}

#[test]
fn golden_server_error_rate_limited_with_retry_after() {
    assert_golden(
        &ServerFrame::Error {
            id: RequestId(9),
            error: ErrorBody {
                code: ErrorCode::RATE_LIMITED,
                message: "slow down".into(),
                retry_after_ms: Some(250),
            },
        },
        &[
            "00000011 ",              // length prefix: 17-byte body
            "02 ",                    // ServerFrame variant 2: Error
            "09 ",                    // id: RequestId(9)
            "9103 ",                  // error.code: 401 RATE_LIMITED
            "09 736c6f7720646f776e ", // error.message: length 9, "slow down"
            "01 fa01",                // error.retry_after_ms: Some, 250
        ],
    );
}

#[test]
fn golden_delivery_start() {
    assert_golden(
        &DeliveryFrame::Start {
            conv: ConversationId(1),
            epoch: EPOCH_0_TO_15,
        },
        &[
            "00000012 ",                        // length prefix: 18-byte body
            "00 ",                              // DeliveryFrame variant 0: Start
            "01 ",                              // conv: ConversationId(1)
            "000102030405060708090a0b0c0d0e0f", // epoch: 16 raw bytes
        ],
    );
}

#[test]
fn golden_delivery_opened() {
    assert_golden(
        &DeliveryFrame::Opened {
            conv: ConversationId(1),
            epoch: EPOCH_0_TO_15,
            request: RequestId(300),
        },
        &[
            "00000014 ",                         // length prefix: 20-byte body
            "04 ",                               // DeliveryFrame variant 4: Opened
            "01 ",                               // conv: ConversationId(1)
            "000102030405060708090a0b0c0d0e0f ", // epoch: 16 raw bytes
            "ac02",                              // request: RequestId(300), varint
        ],
    );
}

#[test]
fn golden_delivery_event_message() {
    assert_golden(
        &DeliveryFrame::Event(Event {
            seq: Seq(42),
            sender: UserName("alice".into()),
            at_ms: 1_700_000_000_000,
            body: EventBody::Message {
                id: ClientMessageId([0x11; 16]),
                text: "hi".into(),
            },
        }),
        &[
            "00000022 ",                         // length prefix: 34-byte body
            "01 ",            // DeliveryFrame variant 1: Event, then the Event struct
            "2a ",            // event.seq: Seq(42)
            "05 616c696365 ", // event.sender: length 5, "alice"
            "80d095ffbc31 ",  // event.at_ms: 1_700_000_000_000
            "00 ",            // event.body: EventBody variant 0: Message
            "11111111111111111111111111111111 ", // body.id: ClientMessageId, 16 raw bytes
            "02 6869",        // body.text: length 2, "hi"
        ],
    );
}

// Revision 2: edits, deletes, reactions, replies, receipts, inbox, pages with state, pruning.

#[test]
fn golden_client_request_edit() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(21),
            request: Request::Edit {
                conv: ConversationId(1),
                id: ClientMessageId([0x33; 16]),
                target: Seq(42),
                text: "hey".into(),
            },
        },
        &[
            "00000019 ",                         // length prefix: 25-byte body
            "01 ",                               // ClientFrame variant 1: Request
            "15 ",                               // id: RequestId(21)
            "0a ",                               // Request variant 10: Edit
            "01 ",                               // conv: ConversationId(1)
            "33333333333333333333333333333333 ", // id: ClientMessageId, 16 raw bytes
            "2a ",                               // target: Seq(42)
            "03 686579",                         // text: length 3, "hey"
        ],
    );
}

#[test]
fn golden_client_request_delete() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(22),
            request: Request::Delete {
                conv: ConversationId(1),
                id: ClientMessageId([0x44; 16]),
                target: Seq(42),
            },
        },
        &[
            "00000015 ",                         // length prefix: 21-byte body
            "01 16 ",                            // Request, id 22
            "0b ",                               // Request variant 11: Delete
            "01 ",                               // conv: 1
            "44444444444444444444444444444444 ", // id
            "2a",                                // target: 42
        ],
    );
}

#[test]
fn golden_client_request_react_and_unreact() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(23),
            request: Request::React {
                conv: ConversationId(1),
                id: ClientMessageId([0x55; 16]),
                target: Seq(42),
                emoji: "👍".into(),
            },
        },
        &[
            "0000001a ",                         // length prefix: 26-byte body
            "01 17 ",                            // Request, id 23
            "0c ",                               // Request variant 12: React
            "01 ",                               // conv: 1
            "55555555555555555555555555555555 ", // id
            "2a ",                               // target: 42
            "04 f09f918d",                       // emoji: 4 bytes, U+1F44D
        ],
    );
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(24),
            request: Request::Unreact {
                conv: ConversationId(1),
                id: ClientMessageId([0x56; 16]),
                target: Seq(42),
                emoji: "👍".into(),
            },
        },
        &[
            "0000001a 01 18 ", // length, Request, id 24
            "0d ",             // Request variant 13: Unreact
            "01 56565656565656565656565656565656 2a 04 f09f918d",
        ],
    );
}

#[test]
fn golden_client_request_send_reply() {
    assert_golden(
        &ClientFrame::Request {
            id: RequestId(25),
            request: Request::SendReply {
                conv: ConversationId(1),
                id: ClientMessageId([0x66; 16]),
                text: "ok".into(),
                reply_to: Seq(42),
            },
        },
        &[
            "00000018 ",                         // length prefix: 24-byte body
            "01 19 ",                            // Request, id 25
            "0e ",                               // Request variant 14: SendReply
            "01 ",                               // conv: 1
            "66666666666666666666666666666666 ", // id
            "02 6f6b ",                          // text: "ok"
            "2a",                                // reply_to: 42
        ],
    );
}

#[test]
fn golden_client_requests_receipts_inbox_page() {
    let request = |id, request| ClientFrame::Request {
        id: RequestId(id),
        request,
    };
    let conv = ConversationId(1);
    // MarkRead { conv 1, seq 43 }: Request, id 26, variant 15, conv, seq.
    assert_golden(
        &request(26, Request::MarkRead { conv, seq: Seq(43) }),
        &["00000005 01 1a 0f 01 2b"],
    );
    // MarkDelivered { conv 1, seq 43 }: variant 16.
    assert_golden(
        &request(27, Request::MarkDelivered { conv, seq: Seq(43) }),
        &["00000005 01 1b 10 01 2b"],
    );
    // Inbox: variant 17, a unit variant.
    assert_golden(&request(28, Request::Inbox), &["00000003 01 1c 11"]);
    // Page { conv 1, before None, limit 50 }: variant 18.
    assert_golden(
        &request(
            29,
            Request::Page {
                conv,
                before: None,
                limit: 50,
            },
        ),
        &["00000006 01 1d 12 01 00 32"],
    );
}

#[test]
fn golden_server_reply_receipt_inbox_pruned() {
    let reply = |id, response| ServerFrame::Reply {
        id: RequestId(id),
        response,
    };
    let conv = ConversationId(1);
    let bob = UserName("bob".into());
    assert_golden(
        &reply(
            26,
            Response::Receipt {
                conv,
                receipt: Receipt {
                    user: bob.clone(),
                    delivered: Seq(43),
                    read: Seq(43),
                },
            },
        ),
        &[
            "0000000a ",  // length prefix: 10-byte body
            "01 1a ",     // Reply, id 26
            "0a ",        // Response variant 10: Receipt
            "01 ",        // conv: 1
            "03 626f62 ", // receipt.user: "bob"
            "2b 2b",      // receipt.delivered: 43, receipt.read: 43
        ],
    );
    assert_golden(
        &reply(
            28,
            Response::Inbox {
                conversations: vec![InboxEntry {
                    summary: ConversationSummary {
                        conv,
                        title: "lunch".into(),
                        creator: UserName("alice".into()),
                        members: vec![UserName("alice".into()), bob],
                        head: Seq(46),
                    },
                    delivered: Seq(46),
                    read: Seq(43),
                    unread: 3,
                }],
            },
        ),
        &[
            "00000020 ",                     // length prefix: 32-byte body
            "01 1c ",                        // Reply, id 28
            "0b ",                           // Response variant 11: Inbox
            "01 ",                           // conversations: 1 element
            "01 056c756e6368 05616c696365 ", // summary: conv 1, "lunch", creator "alice"
            "02 05616c696365 03626f62 2e ",  // members ["alice", "bob"], head 46
            "2e 2b 03",                      // delivered 46, read 43, unread 3
        ],
    );
    assert_golden(
        &reply(
            30,
            Response::Pruned {
                conv,
                oldest: Seq(40),
                head: Seq(46),
            },
        ),
        &["00000006 01 1e 0d 01 28 2e"], // Reply, id 30, variant 13: Pruned, conv 1, oldest 40, head 46
    );
}

#[test]
fn golden_server_reply_page() {
    assert_golden(
        &ServerFrame::Reply {
            id: RequestId(29),
            response: Response::Page {
                conv: ConversationId(1),
                events: vec![Event {
                    seq: Seq(42),
                    sender: UserName("alice".into()),
                    at_ms: 1_700_000_000_000,
                    body: EventBody::Message {
                        id: ClientMessageId([0x11; 16]),
                        text: "hi".into(),
                    },
                }],
                states: vec![MessageState {
                    seq: Seq(42),
                    text: Some("hey".into()),
                    edited: Some(Seq(44)),
                    deleted: None,
                    reactions: vec![Reaction {
                        emoji: "👍".into(),
                        users: vec![UserName("bob".into())],
                    }],
                }],
                head: Seq(46),
                oldest: Seq(1),
            },
        },
        &[
            "0000003d ",                            // length prefix: 61-byte body
            "01 1d ",                               // Reply, id 29
            "0c ",                                  // Response variant 12: Page
            "01 ",                                  // conv: 1
            "01 ",                                  // events: 1 element
            "2a 05616c696365 80d095ffbc31 ",        //   seq 42, "alice", at_ms
            "00 11111111111111111111111111111111 ", //   Message, id
            "026869 ",                              //   text "hi"
            "01 ",                                  // states: 1 element
            "2a ",                                  //   seq 42
            "01 03686579 ",                         //   text: Some("hey")
            "01 2c ",                               //   edited: Some(44)
            "00 ",                                  //   deleted: None
            "01 04f09f918d 01 03626f62 ",           //   reactions: [{"👍", ["bob"]}]
            "2e ",                                  // head: 46
            "01",                                   // oldest: 1
        ],
    );
}

#[test]
fn golden_delivery_receipt_and_revision_2_events() {
    assert_golden(
        &DeliveryFrame::Receipt(Receipt {
            user: UserName("bob".into()),
            delivered: Seq(43),
            read: Seq(42),
        }),
        &[
            "00000007 ",  // length prefix: 7-byte body
            "03 ",        // DeliveryFrame variant 3: Receipt
            "03 626f62 ", // user: "bob"
            "2b 2a",      // delivered: 43, read: 42
        ],
    );
    let event = |seq, sender: &str, body| {
        DeliveryFrame::Event(Event {
            seq: Seq(seq),
            sender: UserName(sender.into()),
            at_ms: 1_700_000_000_000,
            body,
        })
    };
    assert_golden(
        &event(
            44,
            "alice",
            EventBody::Edited {
                id: ClientMessageId([0x33; 16]),
                target: Seq(42),
                text: "hey".into(),
            },
        ),
        &[
            "00000024 01 2c 05616c696365 80d095ffbc31 ", // Event, seq 44, "alice", at_ms
            "05 ",                                       // EventBody variant 5: Edited
            "33333333333333333333333333333333 2a ",      // id, target 42
            "03 686579",                                 // text "hey"
        ],
    );
    assert_golden(
        &event(
            45,
            "bob",
            EventBody::ReactionAdded {
                id: ClientMessageId([0x55; 16]),
                target: Seq(42),
                emoji: "👍".into(),
            },
        ),
        &[
            "00000023 01 2d 03626f62 80d095ffbc31 ", // Event, seq 45, "bob", at_ms
            "07 ",                                   // EventBody variant 7: ReactionAdded
            "55555555555555555555555555555555 2a ",  // id, target 42
            "04 f09f918d",                           // emoji
        ],
    );
    assert_golden(
        &event(
            47,
            "bob",
            EventBody::ReactionRemoved {
                id: ClientMessageId([0x56; 16]),
                target: Seq(42),
                emoji: "👍".into(),
            },
        ),
        &[
            "00000023 01 2f 03626f62 80d095ffbc31 08 ", // variant 8: ReactionRemoved
            "56565656565656565656565656565656 2a 04 f09f918d",
        ],
    );
    let deleted = EventBody::Deleted {
        id: ClientMessageId([0x44; 16]),
        target: Seq(42),
    };
    assert_golden(
        &event(46, "alice", deleted.clone()),
        &[
            "00000020 01 2e 05616c696365 80d095ffbc31 ", // Event, seq 46, "alice", at_ms
            "06 ",                                       // EventBody variant 6: Deleted
            "44444444444444444444444444444444 2a",       // id, target 42
        ],
    );
    // The same event as a revision-1 session gets it.
    assert_golden(
        &event(46, "alice", deleted.for_revision(1)),
        &["00000010 01 2e 05616c696365 80d095ffbc31 04 06"], // Unsupported { kind 6 }
    );
    assert_golden(
        &event(
            48,
            "bob",
            EventBody::Reply {
                id: ClientMessageId([0x66; 16]),
                text: "ok".into(),
                reply_to: Seq(42),
            },
        ),
        &[
            "00000021 01 30 03626f62 80d095ffbc31 ", // Event, seq 48, "bob", at_ms
            "09 ",                                   // EventBody variant 9: Reply
            "66666666666666666666666666666666 ",     // id
            "02 6f6b 2a",                            // text "ok", reply_to 42
        ],
    );
}

#[test]
fn revisions_of_every_kind() {
    assert_eq!(quip_protocol::REVISION, 2);
    let old = EventBody::MemberAdded {
        user: UserName("a".into()),
    };
    assert_eq!(old.clone().for_revision(1), old);
    let reply = EventBody::Reply {
        id: ClientMessageId([0; 16]),
        text: "x".into(),
        reply_to: Seq(1),
    };
    assert_eq!(reply.clone().for_revision(2), reply);
    assert_eq!(reply.for_revision(1), EventBody::Unsupported { kind: 9 });
    assert_eq!(Request::Inbox.revision(), 2);
    assert_eq!(Request::ListConversations.revision(), 1);
}

#[test]
fn reactions_are_one_emoji_not_text() {
    let react = |emoji: &str| Request::React {
        conv: ConversationId(1),
        id: ClientMessageId([0; 16]),
        target: Seq(2),
        emoji: emoji.into(),
    };
    assert_eq!(react("👍").validate(), Ok(()));
    assert_eq!(react("👨‍👩‍👧‍👦").validate(), Ok(()));
    // A subdivision flag: black flag, tag letters, cancel tag.
    assert_eq!(
        react("\u{1F3F4}\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}").validate(),
        Ok(())
    );
    for bad in [
        "",
        "a b",
        "\n",
        "\u{202E}",
        "\u{202E}ab",
        "a\u{200B}b",
        "\u{FEFF}👍",
        "👍\u{2066}",
        &"x".repeat(quip_protocol::limits::MAX_EMOJI_LEN + 1),
    ] {
        assert_refused(&react(bad), ErrorCode::INVALID_REQUEST);
    }
    let edit = |text: String| Request::Edit {
        conv: ConversationId(1),
        id: ClientMessageId([0; 16]),
        target: Seq(2),
        text,
    };
    assert_refused(&edit(String::new()), ErrorCode::INVALID_REQUEST);
    assert_refused(
        &edit("a".repeat(MAX_TEXT_LEN + 1)),
        ErrorCode::MESSAGE_TOO_LARGE,
    );
}

/// Hand-computed LEB128 varints of the values the vectors use, so a reader can check them.
#[test]
fn golden_varints() {
    let cases: [(u64, &str); 8] = [
        (0, "00"),
        (42, "2a"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (16_384, "808001"),
        (1_700_000_000_000, "80d095ffbc31"),
        (u64::MAX, "ffffffffffffffffff01"),
    ];
    for (value, hex) in cases {
        let frame = encode(&Seq(value));
        assert_eq!(
            hex::encode(&frame[LENGTH_PREFIX_LEN..]),
            hex,
            "varint of {value}"
        );
    }
}

// ------------------------------------------------------------------------------------------------
// 7. Request::validate at the limits
// ------------------------------------------------------------------------------------------------

fn name(s: &str) -> UserName {
    UserName(s.to_owned())
}

fn send(text: String) -> Request {
    Request::Send {
        conv: ConversationId(1),
        id: ClientMessageId([0; 16]),
        text,
    }
}

#[track_caller]
fn assert_refused(request: &Request, code: ErrorCode) {
    let err = request.validate().expect_err("must be refused");
    assert_eq!(err.code, code, "{err}");
    assert_eq!(err.retry_after_ms, None);
}

#[test]
fn send_text_at_max_text_len_is_accepted() {
    assert_eq!(send("a".repeat(MAX_TEXT_LEN)).validate(), Ok(()));
    assert_eq!(send("x".into()).validate(), Ok(()));
}

#[test]
fn send_text_one_byte_over_max_text_len_is_message_too_large() {
    assert_refused(
        &send("a".repeat(MAX_TEXT_LEN + 1)),
        ErrorCode::MESSAGE_TOO_LARGE,
    );
}

#[test]
fn send_text_limit_counts_utf8_bytes_not_characters() {
    assert_eq!(MAX_TEXT_LEN % 4, 0);
    let emoji_at_limit = "👋".repeat(MAX_TEXT_LEN / 4); // 4 bytes each
    assert_eq!(send(emoji_at_limit.clone()).validate(), Ok(()));
    assert_refused(&send(emoji_at_limit + "a"), ErrorCode::MESSAGE_TOO_LARGE);
    // Half as many characters as the limit, but over it in bytes.
    assert_refused(
        &send("é".repeat(MAX_TEXT_LEN / 2 + 1)),
        ErrorCode::MESSAGE_TOO_LARGE,
    );
}

#[test]
fn send_with_empty_text_is_invalid_request() {
    assert_refused(&send(String::new()), ErrorCode::INVALID_REQUEST);
}

#[test]
fn a_message_of_max_text_len_fits_in_a_frame() {
    let frame = ClientFrame::Request {
        id: RequestId(u64::MAX),
        request: send("a".repeat(MAX_TEXT_LEN)),
    };
    assert!(encode_frame(&frame, MAX_FRAME_LEN).is_ok());
}

fn create(title: String, members: Vec<UserName>) -> Request {
    Request::CreateConversation { title, members }
}

#[test]
fn title_at_max_title_len_is_accepted_and_one_over_is_invalid_request() {
    assert_eq!(create("t".repeat(MAX_TITLE_LEN), vec![]).validate(), Ok(()));
    assert_eq!(
        create(String::new(), vec![]).validate(),
        Ok(()),
        "an empty title is allowed"
    );
    assert_refused(
        &create("t".repeat(MAX_TITLE_LEN + 1), vec![]),
        ErrorCode::INVALID_REQUEST,
    );
    // In bytes: 128 two-byte characters are at the limit, one more is over.
    assert_eq!(
        create("é".repeat(MAX_TITLE_LEN / 2), vec![]).validate(),
        Ok(())
    );
    assert_refused(
        &create("é".repeat(MAX_TITLE_LEN / 2 + 1), vec![]),
        ErrorCode::INVALID_REQUEST,
    );
}

#[test]
fn initial_members_at_max_are_accepted_and_one_over_is_invalid_request() {
    let members = |n: usize| {
        (0..n)
            .map(|i| name(&format!("user{i}")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        create("t".into(), members(MAX_INITIAL_MEMBERS)).validate(),
        Ok(())
    );
    assert_refused(
        &create("t".into(), members(MAX_INITIAL_MEMBERS + 1)),
        ErrorCode::INVALID_REQUEST,
    );
}

#[test]
fn a_create_with_max_members_of_max_len_names_fits_in_a_frame() {
    let members = (0..MAX_INITIAL_MEMBERS)
        .map(|i| name(&format!("{i:0>32}")))
        .collect::<Vec<_>>();
    let request = create("t".repeat(MAX_TITLE_LEN), members);
    assert_eq!(request.validate(), Ok(()));
    let frame = ClientFrame::Request {
        id: RequestId(u64::MAX),
        request,
    };
    assert!(encode_frame(&frame, MAX_FRAME_LEN).is_ok());
}

#[test]
fn create_with_a_bad_member_name_is_invalid_request() {
    assert_refused(
        &create("t".into(), vec![name("alice"), name("Bob")]),
        ErrorCode::INVALID_REQUEST,
    );
}

#[test]
fn history_limit_from_1_to_max_is_accepted_outside_is_invalid_request() {
    let history = |limit| Request::History {
        conv: ConversationId(1),
        before: None,
        limit,
    };
    assert_eq!(history(1).validate(), Ok(()));
    assert_eq!(history(MAX_HISTORY_LIMIT).validate(), Ok(()));
    assert_refused(&history(0), ErrorCode::INVALID_REQUEST);
    assert_refused(&history(MAX_HISTORY_LIMIT + 1), ErrorCode::INVALID_REQUEST);
    assert_refused(&history(u32::MAX), ErrorCode::INVALID_REQUEST);
}

const GOOD_NAMES: &[&str] = &["a", "0", "alice", "bob-2", "0x.y_z", "a-", "a.", "a_"];
const BAD_NAMES: &[&str] = &[
    "",       // empty
    "Alice",  // upper case
    "-bob",   // starts with '-'
    ".bob",   // starts with '.'
    "_bob",   // starts with '_'
    "al ice", // space
    "é",      // non-ASCII
    "a/b",    // '/'
    "a\0",    // NUL
];

#[test]
fn add_and_remove_member_accept_valid_names_up_to_32_bytes() {
    let longest = "a".repeat(UserName::MAX_LEN);
    for user in GOOD_NAMES.iter().copied().chain([longest.as_str()]) {
        let conv = ConversationId(1);
        assert_eq!(
            Request::AddMember {
                conv,
                user: name(user)
            }
            .validate(),
            Ok(()),
            "{user:?}"
        );
        assert_eq!(
            Request::RemoveMember {
                conv,
                user: name(user)
            }
            .validate(),
            Ok(()),
            "{user:?}"
        );
    }
}

#[test]
fn add_and_remove_member_refuse_bad_names_with_invalid_request() {
    let too_long = "a".repeat(UserName::MAX_LEN + 1);
    for user in BAD_NAMES.iter().copied().chain([too_long.as_str()]) {
        let conv = ConversationId(1);
        assert_refused(
            &Request::AddMember {
                conv,
                user: name(user),
            },
            ErrorCode::INVALID_REQUEST,
        );
        assert_refused(
            &Request::RemoveMember {
                conv,
                user: name(user),
            },
            ErrorCode::INVALID_REQUEST,
        );
    }
}

#[test]
fn requests_without_limited_fields_always_validate() {
    let conv = ConversationId(u64::MAX);
    for start in [
        StartAt::Beginning,
        StartAt::Latest,
        StartAt::After(Position {
            epoch: Epoch([0xff; 16]),
            seq: Seq(u64::MAX),
        }),
    ] {
        assert_eq!(Request::Subscribe { conv, start }.validate(), Ok(()));
    }
    assert_eq!(Request::Unsubscribe { conv }.validate(), Ok(()));
    assert_eq!(Request::ListConversations.validate(), Ok(()));
}

/// `MAX_TOKEN_LEN` and `MAX_CLIENT_NAME_LEN` apply to `Hello`, which is not a `Request`: this
/// crate does not enforce them (the daemon does). The wire carries a token at the limit.
#[test]
fn hello_with_a_token_of_max_token_len_round_trips() {
    let hello = ClientFrame::Hello {
        token: "t".repeat(MAX_TOKEN_LEN),
        client: "c".repeat(quip_protocol::limits::MAX_CLIENT_NAME_LEN),
        revision: quip_protocol::REVISION,
    };
    let frame = encode(&hello);
    assert_eq!(
        decode_exact::<ClientFrame>(&frame[LENGTH_PREFIX_LEN..]),
        Ok(hello)
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn validate_never_panics(request in request()) {
        let _ = request.validate();
    }

    #[test]
    fn well_formed_names_validate(user in "[a-z0-9][a-z0-9._-]{0,31}") {
        prop_assert_eq!(name(&user).validate(), Ok(()));
    }

    #[test]
    fn a_name_with_any_forbidden_byte_is_refused(
        user in "[a-z0-9][a-z0-9._-]{0,30}",
        bad in "[^a-z0-9._-]",
        at in any::<Index>(),
    ) {
        let at = at.index(user.len() + 1);
        let bad_name = format!("{}{}{}", &user[..at], bad, &user[at..]);
        prop_assert!(name(&bad_name).validate().is_err(), "{:?}", bad_name);
        prop_assert_eq!(
            Request::AddMember { conv: ConversationId(1), user: name(&bad_name) }.validate().map_err(|e| e.code),
            Err(ErrorCode::INVALID_REQUEST)
        );
    }
}

// The borrowed encodings a server uses on its hot paths produce the owned frames' bytes.
proptest! {
    #![proptest_config(config())]

    #[test]
    fn event_frame_encodes_as_the_owned_delivery_frame(event in event()) {
        let owned = encode_frame(&DeliveryFrame::Event(event.clone()), MAX_FRAME_LEN).unwrap();
        let borrowed = encode_frame(&EventFrame(&event), MAX_FRAME_LEN).unwrap();
        prop_assert_eq!(&borrowed, &owned);
        let back: DeliveryFrame = decode_exact(&borrowed[LENGTH_PREFIX_LEN..]).unwrap();
        prop_assert_eq!(back, DeliveryFrame::Event(event));
    }

    #[test]
    fn frames_encoded_into_one_buffer_are_the_frames_one_after_another(
        frames in vec(delivery_frame(), 0..8)
    ) {
        let mut joined = b"left alone".to_vec();
        let mut expected = joined.clone();
        for frame in &frames {
            encode_frame_into(frame, &mut joined, MAX_FRAME_LEN).unwrap();
            expected.extend_from_slice(&encode_frame(frame, MAX_FRAME_LEN).unwrap());
        }
        prop_assert_eq!(joined, expected);
    }
}

#[test]
fn a_frame_too_large_for_the_buffer_leaves_it_unchanged() {
    let mut buf = b"earlier frames".to_vec();
    let event = Event {
        seq: Seq(1),
        sender: name("alice"),
        at_ms: 0,
        body: EventBody::Message {
            id: ClientMessageId([1; 16]),
            text: "x".repeat(100),
        },
    };
    let err = encode_frame_into(&EventFrame(&event), &mut buf, 64).unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { max: 64, .. }),
        "{err:?}"
    );
    assert_eq!(buf, b"earlier frames");
}
