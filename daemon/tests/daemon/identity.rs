//! Devices, revocation, mutual TLS, the server's limits and QUIC hardening, against the daemon
//! in this process over real QUIC on loopback, with a real store on disk.

use std::sync::atomic::Ordering;
use std::time::Duration;

use quip_client::{Client, ClientConfig, ClientError, StartAt};
use quip_protocol::{
    ClientFrame, ClientMessageId, ErrorCode, EventBody, FrameDecoder, Request, RequestId, Response,
    ServerFrame,
};
use quipd::admin::{AdminRequest, AdminResponse, CredentialInfo};
use quipd::ServerConfig;

use crate::harness::quic::{self, close_code};
use crate::harness::{code, frame, name, Daemon, WAIT};

/// How soon "at once" must be: a revoked device's connection is closed within this.
const AT_ONCE: Duration = Duration::from_secs(2);

/// A daemon that waits only 2 s for a connection's Hello, then as `configure` changes it.
async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Daemon {
    Daemon::start(|config| {
        config.limits.auth_timeout = Duration::from_secs(2);
        configure(config);
    })
    .await
}

impl Daemon {
    async fn issue(&self, user: &str, device: &str) -> (String, String) {
        let request = AdminRequest::TokenIssue {
            user: user.into(),
            device: device.into(),
        };
        match self.admin(request).await {
            AdminResponse::TokenIssued { id, token, .. } => (id, token),
            other => panic!("token issue: {other:?}"),
        }
    }

    async fn list(&self, user: Option<&str>) -> Vec<CredentialInfo> {
        let request = AdminRequest::TokenList {
            user: user.map(str::to_owned),
        };
        match self.admin(request).await {
            AdminResponse::Credentials { credentials } => credentials,
            other => panic!("token list: {other:?}"),
        }
    }

    async fn revoke(&self, id: &str) -> usize {
        match self
            .admin(AdminRequest::TokenRevoke { id: id.into() })
            .await
        {
            AdminResponse::Revoked { closed, .. } => closed,
            other => panic!("token revoke: {other:?}"),
        }
    }

    async fn client(&self, token: &str) -> Client {
        self.try_client(self.client_config(token)).await.unwrap()
    }

    async fn try_client(&self, config: ClientConfig) -> Result<Client, ClientError> {
        tokio::time::timeout(WAIT, Client::connect(config))
            .await
            .expect("connect timed out")
    }

    /// A QUIC connection that passed TLS (with `identity` as client certificate, if any).
    async fn raw(&self, identity: Option<quic::Identity>) -> quinn::Connection {
        let ca = self.ca();
        let connecting = quic::connect(self.addr, &ca, quip_protocol::ALPN, identity);
        tokio::time::timeout(WAIT, connecting)
            .await
            .unwrap()
            .unwrap()
    }

    /// Says Hello with `token` on a raw connection; the session's control stream on Welcome.
    async fn hello(&self, conn: &quinn::Connection, token: &str) -> Result<Control, u64> {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let hello = ClientFrame::Hello {
            token: token.into(),
            client: "identity-test".into(),
            revision: quip_protocol::REVISION,
        };
        send.write_all(&frame(&hello)).await.unwrap();
        let mut control = Control {
            send,
            recv,
            decoder: FrameDecoder::new(u32::MAX),
        };
        match control.next().await {
            Some(ServerFrame::Welcome { .. }) => Ok(control),
            _ => Err(close_code(conn).await),
        }
    }
}

/// A raw control stream.
struct Control {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Control {
    async fn next(&mut self) -> Option<ServerFrame> {
        loop {
            if let Ok(Some(frame)) = self.decoder.next_frame::<ServerFrame>() {
                return Some(frame);
            }
            match tokio::time::timeout(WAIT, self.recv.read_chunk(64 * 1024, true)).await {
                Ok(Ok(Some(chunk))) => self.decoder.push(&chunk.bytes),
                _ => return None,
            }
        }
    }

    async fn request(&mut self, id: u64, request: Request) -> ServerFrame {
        let request = ClientFrame::Request {
            id: RequestId(id),
            request,
        };
        self.send.write_all(&frame(&request)).await.unwrap();
        self.next().await.expect("an answer")
    }
}

/// The close code, which must come within [`AT_ONCE`].
async fn closed_at_once(conn: &quinn::Connection, what: &str) -> u64 {
    match tokio::time::timeout(AT_ONCE, conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => close.error_code.into_inner(),
        Ok(other) => panic!("{what}: closed with {other}"),
        Err(_) => panic!("{what}: still open {AT_ONCE:?} after the revocation"),
    }
}

fn error_code(result: Result<impl std::fmt::Debug, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(value) => panic!("succeeded with {value:?}"),
        Err(e) => e.code(),
    }
}

/// Each device has its own token; listing shows ids and devices but never a token; revoking
/// one closes that device's open connections at once with REVOKED and refuses it afterwards
/// with UNAUTHENTICATED, while the user's other devices carry on.
#[tokio::test]
async fn a_revoked_token_is_closed_at_once_and_refused_after() {
    let daemon = start(|_| {}).await;
    let first = daemon.user("alice").await;
    let (phone_id, phone) = daemon.issue("alice", "phone").await;
    let (_, laptop) = daemon.issue("alice", "laptop").await;
    daemon.user("bob").await;

    let listed = daemon.list(Some("alice")).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    let phone_entry = listed.iter().find(|c| c.id == phone_id).unwrap();
    assert_eq!(phone_entry.device, "phone");
    assert_eq!(phone_entry.kind, "token");
    assert_eq!(phone_entry.last_used_ms, None);
    let everything = format!("{:?}", daemon.list(None).await);
    for token in [&first, &phone, &laptop] {
        assert!(!everything.contains(&token[5..]), "a listing shows a token");
    }

    let phone_conn = daemon.raw(None).await;
    let mut phone_control = daemon.hello(&phone_conn, &phone).await.unwrap();
    let laptop_client = daemon.client(&laptop).await;
    let conv = laptop_client
        .create_conversation("mine", &[])
        .await
        .unwrap();
    let listed = daemon.list(Some("alice")).await;
    let used = listed.iter().find(|c| c.id == phone_id).unwrap();
    assert!(used.last_used_ms.is_some(), "last use is recorded");

    let started = std::time::Instant::now();
    assert_eq!(daemon.revoke(&phone_id).await, 1);
    assert_eq!(
        closed_at_once(&phone_conn, "the phone's connection").await,
        code(ErrorCode::REVOKED)
    );
    assert!(started.elapsed() < AT_ONCE);
    assert!(phone_control
        .next()
        .await
        .is_none_or(|frame| !matches!(frame, ServerFrame::Reply { .. })));

    let again = daemon.raw(None).await;
    assert_eq!(
        daemon.hello(&again, &phone).await.err(),
        Some(code(ErrorCode::UNAUTHENTICATED)),
        "a revoked token is refused like an unknown one"
    );
    let missing = daemon.raw(None).await;
    assert_eq!(
        daemon.hello(&missing, "").await.err(),
        Some(code(ErrorCode::UNAUTHENTICATED)),
        "no token and no certificate"
    );
    // The laptop never noticed.
    laptop_client.send(conv, "still here").await.unwrap();
    assert_eq!(daemon.list(Some("alice")).await.len(), 2);
    daemon.stop().await;
}

/// Removing a user revokes every device at once, takes it out of its conversations (even the
/// one it created: it leaves, and the others see the MemberRemoved), keeps its messages and
/// never gives its name out again.
#[tokio::test]
async fn a_removed_user_is_disconnected_and_leaves_every_conversation() {
    let daemon = start(|_| {}).await;
    let alice_token = daemon.user("alice").await;
    let bob_token = daemon.user("bob").await;
    let alice = daemon.client(&alice_token).await;
    let ours = alice
        .create_conversation("ours", &[name("bob")])
        .await
        .unwrap();
    let bob = daemon.client(&bob_token).await;
    let bobs = bob
        .create_conversation("bob's", &[name("alice")])
        .await
        .unwrap();
    bob.send(ours, "bye soon").await.unwrap();
    let mut alice_feed = alice.subscribe(bobs, StartAt::Latest).await.unwrap();
    let bob_raw = daemon.raw(None).await;
    let _bob_control = daemon.hello(&bob_raw, &bob_token).await.unwrap();

    match daemon
        .admin(AdminRequest::UserRemove { name: "bob".into() })
        .await
    {
        AdminResponse::UserRemoved {
            credentials,
            closed,
            conversations,
            ..
        } => {
            assert_eq!(credentials, 1);
            assert_eq!(closed, 2, "the SDK client and the raw connection");
            assert_eq!(conversations, 2);
        }
        other => panic!("user remove: {other:?}"),
    }
    assert_eq!(
        closed_at_once(&bob_raw, "bob's connection").await,
        code(ErrorCode::REVOKED)
    );
    let event = tokio::time::timeout(WAIT, alice_feed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(event.sender, name("bob"));
    assert_eq!(event.body, EventBody::MemberRemoved { user: name("bob") });
    let listed = alice.conversations().await.unwrap();
    for summary in &listed {
        assert_eq!(summary.members, [name("alice")], "{summary:?}");
    }
    let (history, _) = alice.history(ours, None, 10).await.unwrap();
    assert!(history
        .iter()
        .any(|e| matches!(&e.body, EventBody::Message { text, .. } if text == "bye soon")));
    // Bob can neither come back nor be added again; his name is not reused.
    let conn = daemon.raw(None).await;
    assert_eq!(
        daemon.hello(&conn, &bob_token).await.err(),
        Some(code(ErrorCode::UNAUTHENTICATED))
    );
    assert_eq!(
        error_code(alice.add_member(ours, name("bob")).await),
        Some(ErrorCode::UNKNOWN_USER)
    );
    match daemon
        .admin(AdminRequest::UserAdd { name: "bob".into() })
        .await
    {
        AdminResponse::Error { message } => assert!(message.contains("removed"), "{message}"),
        other => panic!("re-adding a removed name: {other:?}"),
    }
    daemon.stop().await;
}

/// A client certificate issued from the deployment's CA and registered identifies a device
/// without a token (Hello.token empty); an unregistered one, or none, is refused; revoking it
/// closes its connection at once.
#[tokio::test]
async fn client_certificates_identify_a_device_until_revoked() {
    let daemon = start(|_| {}).await;
    daemon.user("carol").await;
    let certs = daemon.data.path().join("certs");
    let issue = |device: &str| {
        quip_certs::issue_client_certificate(
            &certs.join("ca.pem"),
            &certs.join("ca.key"),
            "carol",
            device,
            time::Duration::days(1),
        )
        .unwrap()
    };
    let tablet = issue("tablet");
    let stranger = issue("stranger");
    let id = match daemon
        .admin(AdminRequest::CertRegister {
            user: "carol".into(),
            device: "tablet".into(),
            der_hex: hex::encode(&tablet.der),
            not_after_ms: None,
        })
        .await
    {
        AdminResponse::CertRegistered { id } => id,
        other => panic!("cert register: {other:?}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = quip_certs::write_client_certificate(dir.path(), "tablet", &tablet).unwrap();
    let (stranger_cert, stranger_key) =
        quip_certs::write_client_certificate(dir.path(), "stranger", &stranger).unwrap();

    // The SDK: no token, a certificate.
    let config = daemon
        .client_config("")
        .with_client_certificate(&cert, &key)
        .unwrap();
    let client = daemon.try_client(config).await.unwrap();
    assert_eq!(client.user(), &name("carol"));
    let conv = client.create_conversation("by cert", &[]).await.unwrap();
    client
        .send(conv, "signed in with a certificate")
        .await
        .unwrap();
    drop(client);

    // A valid certificate that was never registered is not a device.
    let config = daemon
        .client_config("")
        .with_client_certificate(&stranger_cert, &stranger_key)
        .unwrap();
    assert_eq!(
        error_code(daemon.try_client(config).await),
        Some(ErrorCode::UNAUTHENTICATED)
    );

    let listed = daemon.list(Some("carol")).await;
    let entry = listed.iter().find(|c| c.id == id).unwrap();
    assert_eq!(
        (entry.kind.as_str(), entry.device.as_str()),
        ("certificate", "tablet")
    );

    let identity = quip_certs::load_client_identity(&cert, &key).unwrap();
    let conn = daemon.raw(Some(identity)).await;
    let _control = daemon.hello(&conn, "").await.unwrap();
    assert_eq!(daemon.revoke(&id).await, 1);
    assert_eq!(
        closed_at_once(&conn, "the tablet's connection").await,
        code(ErrorCode::REVOKED)
    );
    let identity = quip_certs::load_client_identity(&cert, &key).unwrap();
    let conn = daemon.raw(Some(identity)).await;
    assert_eq!(
        daemon.hello(&conn, "").await.err(),
        Some(code(ErrorCode::UNAUTHENTICATED))
    );
    daemon.stop().await;
}

/// Members per conversation and conversations per user, at their edges, at creation and when
/// adding; the refusals change nothing and others carry on.
#[tokio::test]
async fn member_and_conversation_limits() {
    let daemon = start(|config| {
        config.limits.conversations.max_members = 3;
        config.limits.conversations.max_conversations_per_user = 2;
    })
    .await;
    let alice = daemon.client(&daemon.user("alice").await).await;
    for user in ["bob", "carol", "dave"] {
        daemon.user(user).await;
    }
    assert_eq!(
        error_code(
            alice
                .create_conversation("four", &[name("bob"), name("carol"), name("dave")])
                .await
        ),
        Some(ErrorCode::MEMBER_LIMIT)
    );
    let three = alice
        .create_conversation("three", &[name("bob"), name("carol"), name("bob")])
        .await
        .expect("three members, the creator included, is the limit");
    assert_eq!(
        error_code(alice.add_member(three, name("dave")).await),
        Some(ErrorCode::MEMBER_LIMIT)
    );
    // alice is in 1 of her 2 conversations; bob too.
    let second = alice
        .create_conversation("second", &[name("bob")])
        .await
        .unwrap();
    assert_eq!(
        error_code(alice.create_conversation("third", &[]).await),
        Some(ErrorCode::CONVERSATION_LIMIT)
    );
    let dave = daemon.client(&daemon.issue("dave", "").await.1).await;
    let daves = dave.create_conversation("dave's", &[]).await.unwrap();
    assert_eq!(
        error_code(dave.add_member(daves, name("bob")).await),
        Some(ErrorCode::CONVERSATION_LIMIT),
        "bob is in two conversations already"
    );
    // Leaving frees a place.
    alice.remove_member(second, name("bob")).await.unwrap();
    dave.add_member(daves, name("bob")).await.unwrap();
    let listed = dave.conversations().await.unwrap();
    assert_eq!(listed[0].members, [name("bob"), name("dave")]);
    let (history, _) = alice.history(three, None, 10).await.unwrap();
    assert_eq!(history.len(), 1, "refused additions left no event");
    daemon.stop().await;
}

/// Connections per user: one more than allowed is closed with CONNECTION_LIMIT before
/// Welcome; other users and the open connections carry on; a departure frees the place.
#[tokio::test]
async fn connections_per_user_are_limited() {
    let daemon = start(|config| config.limits.connected.max_connections_per_user = 2).await;
    let token = daemon.user("erin").await;
    let (_, other_device) = daemon.issue("erin", "tablet").await;
    let one = daemon.client(&token).await;
    let two = daemon.client(&other_device).await;
    let conn = daemon.raw(None).await;
    assert_eq!(
        daemon.hello(&conn, &token).await.err(),
        Some(code(ErrorCode::CONNECTION_LIMIT))
    );
    let frank = daemon.client(&daemon.user("frank").await).await;
    frank.create_conversation("fine", &[]).await.unwrap();
    one.create_conversation("still", &[]).await.unwrap();
    one.close().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let conn = daemon.raw(None).await;
        match daemon.hello(&conn, &token).await {
            Ok(_) => break,
            Err(c) if c == code(ErrorCode::CONNECTION_LIMIT) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the place never freed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(c) => panic!("closed with {c}"),
        }
    }
    drop(two);
    daemon.stop().await;
}

/// Sends over the device's rate are refused with RATE_LIMITED and a retry_after_ms; the SDK
/// retries them and every message is stored once, in the order it was sent; the device's two
/// connections share one bucket.
#[tokio::test]
async fn sends_over_the_rate_are_refused_with_retry_after_and_keep_their_order() {
    let daemon = start(|config| {
        config.limits.connected.sends_per_sec = 50;
        config.limits.connected.sends_burst = 5;
    })
    .await;
    let token = daemon.user("gina").await;
    let client = daemon.client(&token).await;
    let conv = client.create_conversation("fast", &[]).await.unwrap();

    // Raw: a burst past the bucket is refused with a time to wait.
    let conn = daemon.raw(None).await;
    let mut control = daemon.hello(&conn, &token).await.unwrap();
    let mut refused = None;
    for n in 0..20u64 {
        let send = Request::Send {
            conv,
            id: ClientMessageId([n as u8 + 100; 16]),
            text: format!("raw {n}"),
        };
        if let ServerFrame::Error { error, .. } = control.request(n + 1, send).await {
            refused = Some(error);
            break;
        }
    }
    let refused = refused.expect("a burst past the bucket is refused");
    assert_eq!(refused.code, ErrorCode::RATE_LIMITED);
    let wait = refused
        .retry_after_ms
        .expect("the error says when to retry");
    assert!((1..=1000).contains(&wait), "retry after {wait} ms");
    drop(control);
    conn.close(0u32.into(), b"done");

    // The SDK pipelines 60 sends; the refused ones come back in order.
    let sends: Vec<_> = (0..60)
        .map(|n| client.send(conv, format!("m{n:02}")))
        .collect();
    let mut seqs = Vec::new();
    for send in sends {
        let sent = tokio::time::timeout(WAIT, send).await.unwrap().unwrap();
        seqs.push(sent.seq);
    }
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "acks out of order: {seqs:?}"
    );
    let (history, _) = client.history(conv, None, 1000).await.unwrap();
    let texts: Vec<String> = history
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Message { text, .. } if text.starts_with('m') => Some(text.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..60).map(|n| format!("m{n:02}")).collect();
    assert_eq!(texts, expected, "stored once each, in send order");
    daemon.stop().await;
}

/// The configured message size and frame size at their edges.
#[tokio::test]
async fn message_and_frame_sizes_at_their_configured_edges() {
    let daemon = start(|config| {
        config.limits.max_message_len = 1000;
        config.limits.max_frame_len = 4096;
    })
    .await;
    let token = daemon.user("hana").await;
    let client = daemon.client(&token).await;
    let conv = client.create_conversation("sizes", &[]).await.unwrap();
    client.send(conv, "é".repeat(500)).await.unwrap();
    assert_eq!(
        error_code(client.send(conv, "x".repeat(1001)).await),
        Some(ErrorCode::MESSAGE_TOO_LARGE)
    );
    // A Hello whose body is exactly the frame limit is read; one byte more is not.
    for (extra, closed) in [(0usize, None), (1, Some(code(ErrorCode::FRAME_TOO_LARGE)))] {
        let mut hello = ClientFrame::Hello {
            token: token.clone(),
            client: String::new(),
            revision: 1,
        };
        let base = frame(&hello).len() - 4;
        // The client string's length prefix grows to two bytes past 127.
        let fill = 4096 + extra - base - 1;
        hello = ClientFrame::Hello {
            token: token.clone(),
            client: "c".repeat(fill),
            revision: 1,
        };
        assert_eq!(frame(&hello).len() - 4, 4096 + extra);
        let conn = daemon.raw(None).await;
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame(&hello)).await.unwrap();
        let mut control = Control {
            send,
            recv,
            decoder: FrameDecoder::new(u32::MAX),
        };
        match closed {
            None => assert!(
                matches!(control.next().await, Some(ServerFrame::Welcome { .. })),
                "a Hello of exactly max_frame_len is answered"
            ),
            Some(expected) => assert_eq!(close_code(&conn).await, expected),
        }
    }
    daemon.stop().await;
}

/// Retry: with a threshold of 0 every new connection validates its address first and still
/// connects; when connections that never say Hello pile up to the threshold, the next one is
/// retried; below it, nobody is.
#[tokio::test]
async fn retry_when_handshakes_pile_up() {
    let always = start(|config| config.limits.retry_threshold = 0).await;
    let token = always.user("ivan").await;
    let client = always.client(&token).await;
    client
        .create_conversation("after a retry", &[])
        .await
        .unwrap();
    assert!(always.stats.retries.load(Ordering::Relaxed) >= 1);
    always.stop().await;

    let daemon = start(|config| {
        config.limits.retry_threshold = 3;
        config.limits.auth_timeout = Duration::from_secs(10);
    })
    .await;
    let token = daemon.user("judy").await;
    let client = daemon.client(&token).await;
    assert_eq!(daemon.stats.retries.load(Ordering::Relaxed), 0);
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(daemon.raw(None).await);
    }
    assert_eq!(daemon.stats.pending.load(Ordering::Relaxed), 3);
    let late = daemon.client(&token).await;
    assert!(daemon.stats.retries.load(Ordering::Relaxed) >= 1);
    late.create_conversation("validated", &[]).await.unwrap();
    client.create_conversation("unaffected", &[]).await.unwrap();
    drop(silent);
    daemon.stop().await;
}

/// 0-RTT is refused: a client that holds a session ticket cannot send early data.
#[tokio::test]
async fn zero_rtt_is_never_accepted() {
    let daemon = start(|_| {}).await;
    let token = daemon.user("kim").await;
    let mut tls = quic::tls_config(&daemon.ca(), quip_protocol::ALPN, None);
    tls.enable_early_data = true;
    let endpoint = quic::endpoint(tls);
    let first = endpoint
        .connect(daemon.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let _ = daemon.hello(&first, &token).await.unwrap();
    // Let the session ticket arrive, then try to resume with early data.
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.close(0u32.into(), b"");
    let connecting = endpoint.connect(daemon.addr, "localhost").unwrap();
    match connecting.into_0rtt() {
        Err(connecting) => {
            connecting.await.unwrap();
        }
        Ok((conn, accepted)) => {
            assert!(!accepted.await, "the server accepted 0-RTT");
            drop(conn);
        }
    }
    daemon.stop().await;
}

/// Idle timeout: a connection that sends nothing (no keep-alive) is closed after
/// `idle_timeout`; one that keeps alive stays.
#[tokio::test]
async fn silent_connections_end_at_the_idle_timeout() {
    let daemon = start(|config| config.idle_timeout = Duration::from_millis(600)).await;
    let token = daemon.user("lee").await;
    let mut config = daemon.client_config(&token);
    config.idle_timeout = Duration::from_millis(300);
    let kept = daemon.try_client(config).await.unwrap();
    let conn = daemon.raw(None).await;
    let _control = daemon.hello(&conn, &token).await.unwrap();
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(WAIT, conn.closed()).await.unwrap();
    assert!(
        matches!(ended, quinn::ConnectionError::TimedOut),
        "ended with {ended}"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    // The reference client pings every third of its idle timeout; with one below the server's
    // it stays.
    tokio::time::sleep(Duration::from_millis(700)).await;
    kept.create_conversation("alive", &[]).await.unwrap();
    assert_eq!(kept.connections(), 1);
    daemon.stop().await;
}

/// The client may open exactly one bidirectional stream and no unidirectional one: the
/// transport gives it no credit for more.
#[tokio::test]
async fn client_stream_counts_are_enforced_by_flow_control() {
    let daemon = start(|_| {}).await;
    let token = daemon.user("mo").await;
    let conn = daemon.raw(None).await;
    let mut control = daemon.hello(&conn, &token).await.unwrap();
    let more = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(more.is_err(), "a second bidirectional stream got credit");
    let uni = tokio::time::timeout(Duration::from_millis(500), conn.open_uni()).await;
    assert!(uni.is_err(), "a unidirectional stream got credit");
    let answer = control.request(1, Request::ListConversations).await;
    assert!(matches!(
        answer,
        ServerFrame::Reply {
            response: Response::Conversations { .. },
            ..
        }
    ));
    daemon.stop().await;
}

/// A daemon whose frames are barely larger than its messages (a configuration `check-config`
/// refuses, set here directly) still never skips: an event that does not fit a frame ends the
/// delivery with an error, and a history page that could not hold its newest event is
/// `LIMIT_EXCEEDED`, never an empty page (which would read as "no earlier events").
#[tokio::test]
async fn an_event_larger_than_a_frame_is_never_skipped_or_hidden() {
    let daemon = start(|config| {
        config.limits.max_message_len = 4096;
        config.limits.max_frame_len = 4096;
    })
    .await;
    let long_name = "h".repeat(32);
    let token = daemon.user(&long_name).await;
    let client = daemon.client(&token).await;
    let conv = client.create_conversation("edge", &[]).await.unwrap();
    // A text whose Send fits a frame (about 35 bytes besides the text) while its stored
    // event, with the 32-byte sender and the server's time, does not (about 60).
    let sent = client.send(conv, "x".repeat(4040)).await.unwrap().seq;
    client.send(conv, "after").await.unwrap();

    // The newest page holds what fits after the large event; the page before it cannot.
    let (page, _) = client.history(conv, None, 10).await.unwrap();
    let seqs: Vec<u64> = page.iter().map(|e| e.seq.0).collect();
    assert_eq!(seqs, [sent.0 + 1]);
    let older = client.history(conv, Some(sent.next()), 10).await;
    assert_eq!(
        error_code(older),
        Some(ErrorCode::LIMIT_EXCEEDED),
        "a page whose newest event does not fit"
    );

    let mut feed = client.subscribe(conv, StartAt::Beginning).await.unwrap();
    let mut seen = Vec::new();
    let ended = loop {
        match tokio::time::timeout(WAIT, feed.next())
            .await
            .expect("an event or the end")
        {
            Some(Ok(event)) => seen.push(event.seq.0),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert_eq!(seen, [1], "delivered {seen:?}, then {ended:?}");
    daemon.stop().await;
}
