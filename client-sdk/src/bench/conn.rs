//! A lean protocol connection for load generation.
//!
//! The SDK's [`crate::Client`] reconnects, keeps an outbox and a cursor per conversation, and
//! takes a lock per event: right for apps, but on a machine the daemon shares it would bill
//! the daemon's figures with the tool's bookkeeping. A [`BenchConn`] is one real QUIC
//! connection, TLS-verified and authenticated with `Hello` like any client, whose owner drives
//! the control stream itself: it writes requests in batches and reads answers as they come.
//! Many connections share a few endpoints (UDP sockets), as thousands of devices behind one
//! address would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use quip_protocol::{
    encode_frame, limits, ClientFrame, DeliveryFrame, Epoch, ErrorBody, FrameDecoder, Request,
    RequestId, Response, ServerFrame,
};
use rustls_pki_types::CertificateDer;
use serde::de::DeserializeOwned;

/// Socket buffer size asked for each of the tool's UDP sockets (capped by the kernel).
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Bytes read from a stream at once.
const READ_CHUNK: usize = 256 * 1024;

/// Why a bench connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("server refused: {} ({})", .0.message, .0.code)]
    Server(ErrorBody),
}

/// Where and how the tool connects.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// The name the server certificate must carry.
    pub server_name: String,
    pub ca: Vec<CertificateDer<'static>>,
}

impl Target {
    /// A client endpoint on its own UDP socket; connections made through it share the socket.
    pub fn endpoint(&self) -> Result<quinn::Endpoint, ConnError> {
        let bind: SocketAddr = if self.addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let connect = |e: std::io::Error| ConnError::Connect(e.to_string());
        let socket = std::net::UdpSocket::bind(bind).map_err(connect)?;
        // The tool's sockets each carry many connections: large buffers, so that the tool
        // does not drop its own packets in a burst and bill the daemon for the retransmits.
        let state = quinn::udp::UdpSocketState::new((&socket).into()).map_err(connect)?;
        let _ = state.set_recv_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        let _ = state.set_send_buffer_size((&socket).into(), SOCKET_BUFFER_BYTES);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ConnError::Connect("no async runtime".into()))?;
        let mut endpoint =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(connect)?;
        endpoint.set_default_client_config(self.quic_config()?);
        Ok(endpoint)
    }

    fn quic_config(&self) -> Result<quinn::ClientConfig, ConnError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| ConnError::Connect(format!("CA certificate unusable: {e}")))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ConnError::Connect(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![quip_protocol::ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls)
            .map_err(|e| ConnError::Connect(format!("TLS config unusable for QUIC: {e}")))?;
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_uni_streams(4096u32.into());
        transport.max_concurrent_bidi_streams(0u32.into());
        // Large receive windows: the tool measures the daemon, not flow-control stalls.
        transport.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
        transport.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
        transport.keep_alive_interval(Some(Duration::from_secs(10)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30))
                .map_err(|e| ConnError::Connect(e.to_string()))?,
        ));
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

/// Frames of one receive stream.
#[derive(Debug)]
pub struct FrameStream {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FrameStream {
    pub fn new(stream: quinn::RecvStream) -> Self {
        FrameStream {
            stream,
            decoder: FrameDecoder::new(limits::MAX_FRAME_LEN),
        }
    }

    /// A frame already received, without waiting.
    pub fn buffered<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ConnError> {
        self.decoder
            .next_frame()
            .map_err(|e| ConnError::Protocol(e.to_string()))
    }

    /// The next frame; `None` once the server finished the stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ConnError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            match self.stream.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder
                        .finish()
                        .map_err(|e| ConnError::Protocol(e.to_string()))?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Writes requests on the control stream, gathered until [`ControlWriter::flush`].
#[derive(Debug)]
pub struct ControlWriter {
    send: quinn::SendStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl ControlWriter {
    /// Queues a request; returns its id.
    pub fn queue(&mut self, request: Request) -> Result<RequestId, ConnError> {
        self.next_id += 1;
        let id = RequestId(self.next_id);
        let bytes = encode_frame(&ClientFrame::Request { id, request }, limits::MAX_FRAME_LEN)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.buf.extend_from_slice(&bytes);
        Ok(id)
    }

    /// Writes everything queued in one stream write.
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.buf.is_empty() {
            self.send.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }
}

/// One authenticated connection.
#[derive(Debug)]
pub struct BenchConn {
    pub conn: quinn::Connection,
    pub writer: ControlWriter,
    pub replies: FrameStream,
    pub epoch: Epoch,
}

impl BenchConn {
    /// Connects through `endpoint`, verifies the server, and authenticates with `token`.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        target: &Target,
        token: &str,
    ) -> Result<BenchConn, ConnError> {
        let conn = endpoint
            .connect(target.addr, &target.server_name)
            .map_err(|e| ConnError::Connect(e.to_string()))?
            .await?;
        let (mut send, recv) = conn.open_bi().await?;
        let hello = ClientFrame::Hello {
            token: token.to_owned(),
            client: concat!("quip-bench/", env!("CARGO_PKG_VERSION")).into(),
            revision: quip_protocol::REVISION,
        };
        let bytes = encode_frame(&hello, limits::MAX_FRAME_LEN)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        send.write_all(&bytes).await?;
        let mut replies = FrameStream::new(recv);
        let welcome = match replies.next::<ServerFrame>().await {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return Err(conn.closed().await.into()),
        };
        match welcome {
            ServerFrame::Welcome { epoch, .. } => Ok(BenchConn {
                conn,
                writer: ControlWriter {
                    send,
                    buf: Vec::new(),
                    next_id: 0,
                },
                replies,
                epoch,
            }),
            ServerFrame::Closing { error } => Err(ConnError::Server(error)),
            other => Err(ConnError::Protocol(format!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }

    /// Sends one request and waits for its answer (for setting up a run, not for load).
    pub async fn call(&mut self, request: Request) -> Result<Response, ConnError> {
        let id = self.writer.queue(request)?;
        self.writer.flush().await?;
        loop {
            match self.replies.next::<ServerFrame>().await? {
                Some(ServerFrame::Reply { id: got, response }) if got == id => return Ok(response),
                Some(ServerFrame::Error { id: got, error }) if got == id => {
                    return Err(ConnError::Server(error))
                }
                Some(ServerFrame::Closing { error }) => return Err(ConnError::Server(error)),
                Some(_) => {}
                None => return Err(ConnError::Protocol("the server ended the session".into())),
            }
        }
    }

    /// The next delivery stream the server opens, after its `Start` frame.
    pub async fn accept_delivery(&self) -> Result<FrameStream, ConnError> {
        let stream = self.conn.accept_uni().await?;
        let mut frames = FrameStream::new(stream);
        match frames.next::<DeliveryFrame>().await? {
            Some(DeliveryFrame::Start { .. } | DeliveryFrame::Opened { .. }) => Ok(frames),
            other => Err(ConnError::Protocol(format!(
                "a delivery stream began with {other:?}"
            ))),
        }
    }

    /// Closes the connection politely.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"bench done");
    }
}
