//! Invariant 8: whatever a peer sends, the daemon answers with a documented error code or closes
//! that peer, and keeps serving everyone else.

use std::time::Duration;

use quip_client::Client;
use quip_protocol::{ClientFrame, ErrorCode, Request, RequestId};

use crate::harness::quic::close_code;
use crate::harness::{code, frame, Daemon, WAIT};

/// A daemon that gives up on silent connections soon, and alice's token.
async fn start() -> (Daemon, String) {
    let daemon =
        Daemon::start(|config| config.limits.auth_timeout = Duration::from_millis(500)).await;
    let token = daemon.user("alice").await;
    (daemon, token)
}

impl Daemon {
    /// Sends `bytes` on a fresh control stream and returns the code the connection closed with.
    async fn close_code_after(&self, bytes: &[u8]) -> u64 {
        let conn = self.raw_connection(quip_protocol::ALPN).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        close_code(&conn).await
    }

    /// A well-behaved client still gets its messages stored.
    async fn still_serves(&self, token: &str) {
        let config = self.client_config(token);
        let client = tokio::time::timeout(WAIT, Client::connect(config))
            .await
            .expect("connect timed out")
            .expect("a good client must still connect");
        let conv = client.create_conversation("still here", &[]).await.unwrap();
        let sent = client.send(conv, "ok").await.unwrap();
        assert_eq!(sent.seq.0, 2);
    }
}

#[tokio::test]
async fn four_gib_length_prefix_closes_with_frame_too_large() {
    let (daemon, alice) = start().await;
    let closed = daemon.close_code_after(&[0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(closed, code(ErrorCode::FRAME_TOO_LARGE));
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

/// Before it is authenticated a peer can make the daemon buffer no more than a Hello needs:
/// a first frame over 4 KiB closes the connection at its length prefix.
#[tokio::test]
async fn a_first_frame_larger_than_a_hello_closes_with_frame_too_large() {
    let (daemon, alice) = start().await;
    let prefix = (quip_protocol::limits::MAX_HELLO_LEN + 1).to_be_bytes();
    let closed = daemon.close_code_after(&prefix).await;
    assert_eq!(closed, code(ErrorCode::FRAME_TOO_LARGE));
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

#[tokio::test]
async fn malformed_frames_close_with_protocol_violation() {
    let (daemon, alice) = start().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown frame type", vec![0, 0, 0, 1, 0x09]),
        ("empty frame", vec![0, 0, 0, 0]),
        ("truncated Hello body", vec![0, 0, 0, 3, 0x00, 0x05, b'a']),
        (
            "invalid UTF-8 token",
            vec![0, 0, 0, 5, 0x00, 0x02, 0xc3, 0x28, 0x00],
        ),
        ("trailing bytes", vec![0, 0, 0, 4, 0x00, 0x00, 0x00, 0xaa]),
        ("vec claiming 2^63 members", {
            let mut body = vec![0x01, 0x01, 0x00, 0x00];
            body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
            let mut framed = (body.len() as u32).to_be_bytes().to_vec();
            framed.extend(body);
            framed
        }),
        (
            "a request before Hello",
            frame(&ClientFrame::Request {
                id: RequestId(1),
                request: Request::ListConversations,
            }),
        ),
    ];
    for (what, bytes) in cases {
        let closed = daemon.close_code_after(&bytes).await;
        assert_eq!(closed, code(ErrorCode::PROTOCOL_VIOLATION), "{what}");
    }
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

#[tokio::test]
async fn bad_tokens_close_with_unauthenticated() {
    let (daemon, alice) = start().await;
    // A token too long to be one is refused like any other; one too long for a Hello frame is
    // refused from the frame's length.
    for (token, expected) in [
        (String::new(), ErrorCode::UNAUTHENTICATED),
        ("quip_00".into(), ErrorCode::UNAUTHENTICATED),
        ("not a token".into(), ErrorCode::UNAUTHENTICATED),
        ("x".repeat(3_000), ErrorCode::UNAUTHENTICATED),
        ("x".repeat(100_000), ErrorCode::FRAME_TOO_LARGE),
    ] {
        let hello = frame(&ClientFrame::Hello {
            token: token.clone(),
            client: "hostile".into(),
            revision: quip_protocol::REVISION,
        });
        let closed = daemon.close_code_after(&hello).await;
        assert_eq!(closed, code(expected), "token of {} bytes", token.len());
    }
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

#[tokio::test]
async fn silence_after_the_handshake_closes_with_auth_timeout() {
    let (daemon, alice) = start().await;
    let conn = daemon.raw_connection(quip_protocol::ALPN).await.unwrap();
    assert_eq!(close_code(&conn).await, code(ErrorCode::AUTH_TIMEOUT));
    // Also when the control stream is open but no frame completes.
    assert_eq!(
        daemon.close_code_after(&[0, 0]).await,
        code(ErrorCode::AUTH_TIMEOUT)
    );
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

#[tokio::test]
async fn garbage_frames_after_login_close_only_that_connection() {
    let (daemon, alice) = start().await;
    let mut bytes = frame(&ClientFrame::Hello {
        token: alice.clone(),
        client: "hostile".into(),
        revision: quip_protocol::REVISION,
    });
    bytes.extend_from_slice(&[0, 0, 0, 3, 0x01, 0x01, 0x63]);
    let closed = daemon.close_code_after(&bytes).await;
    assert_eq!(closed, code(ErrorCode::PROTOCOL_VIOLATION));
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

#[tokio::test]
async fn wrong_alpn_and_random_datagrams_do_not_disturb_the_daemon() {
    let (daemon, alice) = start().await;
    assert!(
        daemon.raw_connection(b"h3").await.is_err(),
        "a foreign ALPN must not connect"
    );
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for size in [1usize, 20, 1200, 1500, 9000] {
        for _ in 0..50 {
            let packet: Vec<u8> = (0..size)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = socket.send_to(&packet, daemon.addr).await;
        }
    }
    daemon.still_serves(&alice).await;
    daemon.stop().await;
}

/// The daemon's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A client that asks for a lot and reads nothing (its QUIC receive windows stay shut) costs
/// the daemon little memory: what it is owed waits as requests, not as encoded answers. Each
/// History page here is about a MiB; before answers were counted in bytes, 1024 requests made
/// one connection hold a quarter of a GiB.
#[tokio::test]
async fn a_client_that_reads_nothing_holds_little_memory_in_the_daemon() {
    use crate::harness::process::{add_user, config_file, Quipd};
    use crate::harness::quic;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &data, "");
    let daemon = Quipd::start(&config, &data, &[], &[]);
    let token = add_user(&data, "alice");
    let client = daemon.connect(&token).await;
    let conv = crate::harness::large_conversation(&client, 20, 64 * 1024).await;
    let pid = daemon.child.0.id();
    let before = rss_kib(pid);

    let ca = data.join("certs/ca.pem");
    let conn = quic::stuck_reader(daemon.addr, &ca, &token, conv, 1024).await;

    // Watch the daemon while it serves what it can.
    let mut peak = before;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    let grown_mib = peak.saturating_sub(before) / 1024;
    println!("a client that reads nothing: the daemon grew by {grown_mib} MiB");
    assert!(
        grown_mib < 48,
        "the daemon grew by {grown_mib} MiB ({before} KiB before, {peak} KiB at the peak)"
    );
    // Others are still served.
    let sent = client.send(conv, "still here").await.unwrap();
    assert_eq!(sent.seq.0, 22);
    conn.close(0u32.into(), b"");
}
