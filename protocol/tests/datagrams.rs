//! Wire-format tests for the ephemeral plane: the DATAGRAM payloads (`ClientDatagram`,
//! `ServerDatagram`) and the control-stream requests that go with them (`Request::Presence`,
//! `Request::SetAway`).
//!
//! A datagram payload is a bare postcard body: no length prefix. The golden vectors below pin
//! it byte for byte (see `wire.rs` for how postcard encodes each type).

use std::fmt::Debug;

use proptest::prelude::*;
use quip_protocol::limits::MAX_DATAGRAM_LEN;
use quip_protocol::{
    decode_datagram, encode_datagram, encode_frame, ClientDatagram, ClientFrame, ConversationId,
    FrameDecoder, FrameError, PresenceInfo, PresenceState, Request, RequestId, Response,
    ServerDatagram, ServerFrame, UserName,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn user(name: &str) -> UserName {
    UserName(name.to_owned())
}

#[track_caller]
fn assert_datagram<T>(value: &T, parts: &[&str])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let expected: String = parts.concat().split_whitespace().collect();
    let actual = encode_datagram(value).expect("the value encodes");
    assert_eq!(hex::encode(&actual), expected, "encoding of {value:?}");
    assert_eq!(decode_datagram::<T>(&actual).as_ref(), Ok(value));
}

#[track_caller]
fn assert_frame<T>(value: &T, parts: &[&str])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let expected: String = parts.concat().split_whitespace().collect();
    let actual = encode_frame(value, u32::MAX).expect("the value encodes");
    assert_eq!(hex::encode(&actual), expected, "encoding of {value:?}");
    let mut decoder = FrameDecoder::new(u32::MAX);
    decoder.push(&actual);
    let decoded = decoder
        .next_frame::<T>()
        .expect("decodes")
        .expect("complete");
    assert_eq!(&decoded, value);
}

#[test]
fn golden_client_typing() {
    assert_datagram(
        &ClientDatagram::Typing {
            conv: ConversationId(1),
        },
        &[
            "00 ", // ClientDatagram variant 0: Typing
            "01",  // conv: ConversationId(1)
        ],
    );
}

#[test]
fn golden_client_stopped_typing() {
    assert_datagram(
        &ClientDatagram::StoppedTyping {
            conv: ConversationId(300),
        },
        &[
            "01 ",  // ClientDatagram variant 1: StoppedTyping
            "ac02", // conv: ConversationId(300), varint
        ],
    );
}

#[test]
fn golden_server_typing() {
    assert_datagram(
        &ServerDatagram::Typing {
            conv: ConversationId(7),
            user: user("alice"),
        },
        &[
            "00 ",           // ServerDatagram variant 0: Typing
            "07 ",           // conv: ConversationId(7)
            "05 616c696365", // user: length 5, "alice"
        ],
    );
}

#[test]
fn golden_server_stopped_typing() {
    assert_datagram(
        &ServerDatagram::StoppedTyping {
            conv: ConversationId(7),
            user: user("alice"),
        },
        &[
            "01 ",           // ServerDatagram variant 1: StoppedTyping
            "07 ",           // conv
            "05 616c696365", // user
        ],
    );
}

#[test]
fn golden_server_presence() {
    assert_datagram(
        &ServerDatagram::Presence(PresenceInfo {
            user: user("bob"),
            state: PresenceState::Away,
            last_seen_ms: Some(1_700_000_000_000),
            version: 5,
        }),
        &[
            "02 ",              // ServerDatagram variant 2: Presence
            "03 626f62 ",       // user: length 3, "bob"
            "02 ",              // state: PresenceState variant 2: Away (0 Offline, 1 Online)
            "01 80d095ffbc31 ", // last_seen_ms: Some, varint 1700000000000
            "05",               // version: 5
        ],
    );
    assert_datagram(
        &ServerDatagram::Presence(PresenceInfo {
            user: user("bob"),
            state: PresenceState::Offline,
            last_seen_ms: None,
            version: 1,
        }),
        &["02 03626f62 00 00 01"],
    );
}

#[test]
fn golden_request_presence_and_set_away() {
    assert_frame(
        &ClientFrame::Request {
            id: RequestId(3),
            request: Request::Presence,
        },
        &[
            "00000003 ", // length prefix
            "01 03 ",    // ClientFrame::Request, id 3
            "08",        // Request variant 8: Presence
        ],
    );
    assert_frame(
        &ClientFrame::Request {
            id: RequestId(4),
            request: Request::SetAway { away: true },
        },
        &[
            "00000004 ", // length prefix
            "01 04 ",    // ClientFrame::Request, id 4
            "09 01",     // Request variant 9: SetAway, away: true
        ],
    );
}

#[test]
fn golden_response_presence_and_away_set() {
    assert_frame(
        &ServerFrame::Reply {
            id: RequestId(3),
            response: Response::Presence {
                users: vec![PresenceInfo {
                    user: user("bob"),
                    state: PresenceState::Online,
                    last_seen_ms: None,
                    version: 1,
                }],
            },
        },
        &[
            "0000000b ",  // length prefix: 11-byte body
            "01 03 ",     // ServerFrame::Reply, id 3
            "08 ",        // Response variant 8: Presence
            "01 ",        // users: 1 entry
            "03 626f62 ", // user "bob"
            "01 00 01",   // Online, last_seen_ms None, version 1
        ],
    );
    assert_frame(
        &ServerFrame::Reply {
            id: RequestId(4),
            response: Response::AwaySet { away: false },
        },
        &["00000004 0104 09 00"],
    );
}

#[test]
fn malformed_datagrams_are_errors_not_panics() {
    let cases: &[(&str, &[u8])] = &[
        ("empty", &[]),
        ("unknown client variant", &[0x02, 0x01]),
        ("unknown server variant", &[0x03]),
        ("truncated varint", &[0x00, 0x80]),
        ("trailing bytes", &[0x00, 0x01, 0x00]),
    ];
    for (what, bytes) in cases {
        assert!(
            decode_datagram::<ClientDatagram>(bytes).is_err(),
            "{what} as ClientDatagram"
        );
    }
    assert!(decode_datagram::<ServerDatagram>(&[0x03]).is_err());
    // Presence with state 3 (one past Away).
    assert!(decode_datagram::<ServerDatagram>(&[0x02, 0x01, b'a', 0x03, 0x00, 0x01]).is_err());
    let long = vec![0u8; MAX_DATAGRAM_LEN + 1];
    assert_eq!(
        decode_datagram::<ClientDatagram>(&long),
        Err(FrameError::TooLarge {
            len: (MAX_DATAGRAM_LEN + 1) as u64,
            max: MAX_DATAGRAM_LEN as u32
        })
    );
}

#[test]
fn the_largest_server_datagram_fits() {
    let longest = ServerDatagram::Presence(PresenceInfo {
        user: UserName("a".repeat(UserName::MAX_LEN)),
        state: PresenceState::Away,
        last_seen_ms: Some(u64::MAX),
        version: u64::MAX,
    });
    let len = encode_datagram(&longest).expect("fits").len();
    assert!(len <= 64, "{len} bytes");
    let typing = ServerDatagram::StoppedTyping {
        conv: ConversationId(u64::MAX),
        user: UserName("a".repeat(UserName::MAX_LEN)),
    };
    assert!(encode_datagram(&typing).expect("fits").len() <= 64);
}

fn presence_state() -> impl Strategy<Value = PresenceState> {
    prop_oneof![
        Just(PresenceState::Offline),
        Just(PresenceState::Online),
        Just(PresenceState::Away),
    ]
}

fn user_name() -> impl Strategy<Value = UserName> {
    "[a-z0-9][a-z0-9._-]{0,31}".prop_map(UserName)
}

fn server_datagram() -> impl Strategy<Value = ServerDatagram> {
    prop_oneof![
        (any::<u64>(), user_name()).prop_map(|(c, user)| ServerDatagram::Typing {
            conv: ConversationId(c),
            user
        }),
        (any::<u64>(), user_name()).prop_map(|(c, user)| ServerDatagram::StoppedTyping {
            conv: ConversationId(c),
            user
        }),
        (
            user_name(),
            presence_state(),
            proptest::option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(|(user, state, last_seen_ms, version)| {
                ServerDatagram::Presence(PresenceInfo {
                    user,
                    state,
                    last_seen_ms,
                    version,
                })
            }),
    ]
}

proptest! {
    #[test]
    fn server_datagrams_round_trip(value in server_datagram()) {
        let bytes = encode_datagram(&value).expect("encodes");
        prop_assert!(bytes.len() <= MAX_DATAGRAM_LEN);
        prop_assert_eq!(decode_datagram::<ServerDatagram>(&bytes), Ok(value));
    }

    #[test]
    fn client_datagrams_round_trip(conv in any::<u64>(), stopped in any::<bool>()) {
        let conv = ConversationId(conv);
        let value = if stopped {
            ClientDatagram::StoppedTyping { conv }
        } else {
            ClientDatagram::Typing { conv }
        };
        let bytes = encode_datagram(&value).expect("encodes");
        prop_assert_eq!(decode_datagram::<ClientDatagram>(&bytes), Ok(value));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
        let _ = decode_datagram::<ClientDatagram>(&bytes);
        let _ = decode_datagram::<ServerDatagram>(&bytes);
    }
}
