//! Invariant 8: whatever a peer sends, the daemon answers with a documented error code or closes
//! that peer, and keeps serving everyone else.

#![allow(clippy::unwrap_used)] // test harness code: a failed unwrap is a failed test

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quip_client::{Client, ClientConfig};
use quip_protocol::{encode_frame, ClientFrame, ErrorCode, Request, RequestId};
use quipd::admin::{AdminRequest, AdminResponse};
use quipd::{Server, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const WAIT: Duration = Duration::from_secs(20);

struct Daemon {
    addr: SocketAddr,
    data: tempfile::TempDir,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Daemon {
    async fn start() -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(data.path(), "127.0.0.1:0".parse().unwrap());
        config.limits.auth_timeout = Duration::from_millis(500);
        let server = Server::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        let request = AdminRequest::UserAdd {
            name: "alice".into(),
        };
        let token = match quipd::admin::run(data.path(), request).await.unwrap() {
            AdminResponse::UserAdded { token, .. } => token,
            other => panic!("user add: {other:?}"),
        };
        Daemon {
            addr,
            data,
            token,
            stop: Some(stop),
            task,
        }
    }

    fn ca(&self) -> PathBuf {
        self.data.path().join("certs/ca.pem")
    }

    /// A QUIC connection that passed TLS but has not said anything yet.
    async fn raw_connection(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca()).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(config);
        endpoint.connect(self.addr, "localhost").unwrap().await
    }

    /// Sends `bytes` on a fresh control stream and returns the code the connection closed with.
    async fn close_code_after(&self, bytes: &[u8]) -> u64 {
        let conn = self.raw_connection(quip_protocol::ALPN).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        close_code(&conn).await
    }

    /// A well-behaved client still gets its messages stored.
    async fn still_serves(&self) {
        let config =
            ClientConfig::from_ca_file(self.addr.to_string(), self.ca(), &self.token).unwrap();
        let client = tokio::time::timeout(WAIT, Client::connect(config))
            .await
            .expect("connect timed out")
            .expect("a good client must still connect");
        let conv = client.create_conversation("still here", &[]).await.unwrap();
        let sent = client.send(conv, "ok").await.unwrap();
        assert_eq!(sent.seq.0, 2);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn close_code(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the daemon must close the connection")
    {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

fn frame(value: &ClientFrame) -> Vec<u8> {
    encode_frame(value, u32::MAX).unwrap()
}

fn code(c: ErrorCode) -> u64 {
    u64::from(c.0)
}

#[tokio::test]
async fn four_gib_length_prefix_closes_with_frame_too_large() {
    let daemon = Daemon::start().await;
    let closed = daemon.close_code_after(&[0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(closed, code(ErrorCode::FRAME_TOO_LARGE));
    daemon.still_serves().await;
    daemon.stop().await;
}

#[tokio::test]
async fn malformed_frames_close_with_protocol_violation() {
    let daemon = Daemon::start().await;
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
    daemon.still_serves().await;
    daemon.stop().await;
}

#[tokio::test]
async fn bad_tokens_close_with_unauthenticated() {
    let daemon = Daemon::start().await;
    for token in ["", "quip_00", "not a token", &"x".repeat(100_000)] {
        let hello = frame(&ClientFrame::Hello {
            token: token.to_owned(),
            client: "hostile".into(),
            revision: quip_protocol::REVISION,
        });
        let closed = daemon.close_code_after(&hello).await;
        assert_eq!(
            closed,
            code(ErrorCode::UNAUTHENTICATED),
            "token of {} bytes",
            token.len()
        );
    }
    daemon.still_serves().await;
    daemon.stop().await;
}

#[tokio::test]
async fn silence_after_the_handshake_closes_with_auth_timeout() {
    let daemon = Daemon::start().await;
    let conn = daemon.raw_connection(quip_protocol::ALPN).await.unwrap();
    assert_eq!(close_code(&conn).await, code(ErrorCode::AUTH_TIMEOUT));
    // Also when the control stream is open but no frame completes.
    assert_eq!(
        daemon.close_code_after(&[0, 0]).await,
        code(ErrorCode::AUTH_TIMEOUT)
    );
    daemon.still_serves().await;
    daemon.stop().await;
}

#[tokio::test]
async fn garbage_frames_after_login_close_only_that_connection() {
    let daemon = Daemon::start().await;
    let mut bytes = frame(&ClientFrame::Hello {
        token: daemon.token.clone(),
        client: "hostile".into(),
        revision: quip_protocol::REVISION,
    });
    bytes.extend_from_slice(&[0, 0, 0, 3, 0x01, 0x01, 0x63]);
    let closed = daemon.close_code_after(&bytes).await;
    assert_eq!(closed, code(ErrorCode::PROTOCOL_VIOLATION));
    daemon.still_serves().await;
    daemon.stop().await;
}

#[tokio::test]
async fn wrong_alpn_and_random_datagrams_do_not_disturb_the_daemon() {
    let daemon = Daemon::start().await;
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
    daemon.still_serves().await;
    daemon.stop().await;
}
