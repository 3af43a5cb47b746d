//! The protocol's limits, at their edges (SPEC section 7).

use std::time::Duration;

use quip_client::{ClientError, ErrorCode, Seq};
use quip_tests::check::{full_history, text};
use quip_tests::{within, within_for, TestServer};

/// The largest message text, in bytes.
const MAX_TEXT: usize = 65_536;

fn refused_with(what: &str, result: Result<impl std::fmt::Debug, ClientError>, code: ErrorCode) {
    match result {
        Err(e) => assert_eq!(
            e.code(),
            Some(code),
            "{what}: failed with {e:?}, expected {code}"
        ),
        Ok(value) => panic!("{what}: accepted ({value:?}), expected {code}"),
    }
}

/// Texts of exactly 65,536 bytes (2- and 4-byte characters up to the edge) are stored and come
/// back byte for byte; one byte more is MESSAGE_TOO_LARGE, an empty text INVALID_REQUEST; a
/// 256-byte title is fine, 257 bytes is INVALID_REQUEST; history `before` at and past the ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_at_their_edges() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let title = "t".repeat(254) + "é";
    assert_eq!(title.len(), 256);
    let conv = within("create", alice.create_conversation(&title, &[]))
        .await
        .expect("a 256-byte title is allowed");
    let long_title = title.clone() + "x";
    refused_with(
        "a 257-byte title",
        within("create", alice.create_conversation(&long_title, &[])).await,
        ErrorCode::INVALID_REQUEST,
    );

    let two_byte = "é".repeat(MAX_TEXT / 2);
    let four_byte = "🙂".repeat(MAX_TEXT / 4);
    let mixed = "a".repeat(MAX_TEXT - 4) + "🙂";
    for t in [&two_byte, &four_byte, &mixed] {
        assert_eq!(t.len(), MAX_TEXT);
        within("send", alice.send(conv, t.as_str()))
            .await
            .unwrap_or_else(|e| panic!("a text of exactly {MAX_TEXT} bytes was refused: {e}"));
    }
    refused_with(
        "a text of 65,537 bytes",
        within("send", alice.send(conv, format!("{two_byte}x"))).await,
        ErrorCode::MESSAGE_TOO_LARGE,
    );
    refused_with(
        "a text of 65,537 bytes ending in a 4-byte character",
        within("send", alice.send(conv, "a".repeat(MAX_TEXT - 3) + "🙂")).await,
        ErrorCode::MESSAGE_TOO_LARGE,
    );
    refused_with(
        "an empty text",
        within("send", alice.send(conv, "")).await,
        ErrorCode::INVALID_REQUEST,
    );

    let history = full_history(&alice, conv).await;
    let texts: Vec<&str> = history.iter().filter_map(text).collect();
    assert_eq!(history.len(), 4, "refused sends left events behind");
    assert!(
        texts == [two_byte.as_str(), four_byte.as_str(), mixed.as_str()],
        "the largest texts did not come back byte for byte"
    );

    // History edges (SPEC 8.8): before <= 1 is an empty page; a `before` past head + 1 is
    // head + 1.
    for before in [0, 1] {
        let (page, head) = within("history", alice.history(conv, Some(Seq(before)), 10))
            .await
            .expect("history");
        assert!(
            page.is_empty(),
            "history before {before} holds {} events",
            page.len()
        );
        assert_eq!(head, Seq(4));
    }
    let (page, _) = within("history", alice.history(conv, Some(Seq(1000)), 10))
        .await
        .expect("history");
    assert_eq!(page, history, "history before a seq far past the head");
}

/// A history page whose events add up to more than a frame (1 MiB) must still be answered
/// (with fewer events, or an error), not left without an answer for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_page_larger_than_a_frame_is_answered() {
    let server = TestServer::start().await;
    let (_, alice) = server.user_client("alice").await;
    let conv = within("create", alice.create_conversation("big", &[]))
        .await
        .expect("create");
    let big = "x".repeat(MAX_TEXT);
    for i in 0..20 {
        within("send", alice.send(conv, format!("{i:02}{}", &big[2..])))
            .await
            .expect("sending a large message");
    }
    // 20 events of 64 KiB: about 1.3 MB, more than one frame.
    let answer = within_for(
        Duration::from_secs(10),
        "History of 20 messages of 64 KiB with limit 1000: the request got no answer",
        alice.history(conv, None, 1000),
    )
    .await;
    if let Ok((page, head)) = answer {
        assert_eq!(head, Seq(21));
        assert!(
            !page.is_empty(),
            "an empty page for a conversation of 21 events"
        );
        assert_eq!(
            page.last().map(|e| e.seq),
            Some(head),
            "the page does not end at the head"
        );
    }
}
