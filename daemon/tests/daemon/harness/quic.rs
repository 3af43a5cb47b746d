//! Raw QUIC to the daemon, below the SDK: what a broken or hostile client could send.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::WAIT;

/// A client certificate chain and its key.
pub type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// TLS 1.3 trusting only `ca`, offering `alpn`, with `identity` as client certificate if any.
pub fn tls_config(ca: &Path, alpn: &[u8], identity: Option<Identity>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((chain, key)) => tls.with_client_auth_cert(chain, key).unwrap(),
        None => tls.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// A client endpoint on its own port that connects with `tls`.
pub fn endpoint(tls: rustls::ClientConfig) -> quinn::Endpoint {
    let config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// A connection to `addr` that passed TLS (see [`tls_config`]) and has said nothing yet.
pub async fn connect(
    addr: SocketAddr,
    ca: &Path,
    alpn: &[u8],
    identity: Option<Identity>,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = endpoint(tls_config(ca, alpn, identity));
    endpoint.connect(addr, "localhost").unwrap().await
}

/// The application code the daemon closes `conn` with, within [`WAIT`].
pub async fn close_code(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the daemon must close the connection")
    {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other}"),
    }
}

/// A connection to `addr` whose receive windows are `stream_window` per stream and
/// `window` in all, and that allows the server `uni_streams` streams of its own: a client
/// that reads little or nothing, seen from the server.
pub async fn connect_narrow(
    addr: SocketAddr,
    ca: &Path,
    stream_window: u32,
    window: u32,
    uni_streams: u32,
) -> quinn::Connection {
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(stream_window.into());
    transport.receive_window(window.into());
    transport.max_concurrent_uni_streams(uni_streams.into());
    let tls = tls_config(ca, quip_protocol::ALPN, None);
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
    config.transport_config(Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint
        .connect_with(config, addr, "localhost")
        .unwrap()
        .await
        .unwrap()
}

/// A client that asks for a lot and reads nothing: a connection that accepts 1 KiB of answers,
/// on which `Hello` (as `token`) and `requests` History requests for the newest 1000 events of
/// `conv` are written. Keep it open for as long as the client is to stay stuck.
pub async fn stuck_reader(
    addr: SocketAddr,
    ca: &Path,
    token: &str,
    conv: quip_protocol::ConversationId,
    requests: u64,
) -> quinn::Connection {
    use quip_protocol::{ClientFrame, Request, RequestId, REVISION};
    let conn = connect_narrow(addr, ca, 1024, 2048, 100).await;
    let (mut send, _unread) = conn.open_bi().await.unwrap();
    let mut bytes = super::frame(&ClientFrame::Hello {
        token: token.to_owned(),
        client: "reads nothing".into(),
        revision: REVISION,
    });
    for id in 1..=requests {
        bytes.extend(super::frame(&ClientFrame::Request {
            id: RequestId(id),
            request: Request::History {
                conv,
                before: None,
                limit: 1000,
            },
        }));
    }
    send.write_all(&bytes).await.unwrap();
    conn
}
