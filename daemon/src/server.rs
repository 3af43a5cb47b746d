//! The server: opens the store, loads or makes certificates, binds the QUIC endpoint and the
//! admin socket, and accepts connections until told to shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn::crypto::rustls::QuicServerConfig;
use quip_protocol::ErrorCode;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::accounts::Accounts;
use crate::admin;
use crate::config::{defaults, LogConfig, LogFormat, RetentionConfig};
use crate::connected::Connected;
use crate::conversation::{Conversations, Services, TypingRelay};
use crate::presence::{EphemeralStats, PresenceHandle};
use crate::push::{PushConfig, PushHandle, PushStats};
use crate::session::{self, Limits};
use crate::store::{BackendKind, Store, StoreConfig};

/// Everything a `quipd serve` needs to start. Made from the config file by
/// [`crate::config::ConfigFile::into_server_config`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The store's engine.
    pub store: BackendKind,
    /// The store engine's cache, in bytes.
    pub cache_bytes: u64,
    pub limits: Limits,
    /// Connections served at once; more are refused.
    pub max_connections: u32,
    /// A connection without traffic for this long is closed.
    pub idle_timeout: Duration,
    pub tls: TlsSource,
    /// The CA whose client certificates identify devices (mutual TLS), if any.
    pub client_auth: ClientAuth,
    /// The bound on a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Where the Prometheus endpoint listens; `None`: no metrics.
    pub metrics_listen: Option<SocketAddr>,
    pub log: LogConfig,
    /// The offline push hook; `None`: off.
    pub push: Option<PushConfig>,
    /// What conversations keep.
    pub retention: RetentionConfig,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        ServerConfig {
            data_dir: data_dir.into(),
            listen,
            store: BackendKind::default(),
            cache_bytes: defaults::CACHE_MB * 1024 * 1024,
            limits: Limits::default(),
            max_connections: defaults::MAX_CONNECTIONS,
            idle_timeout: Duration::from_millis(defaults::IDLE_TIMEOUT_MS),
            tls: TlsSource::DataDir,
            client_auth: ClientAuth::DataDirCa,
            shutdown_timeout: Duration::from_millis(defaults::SHUTDOWN_TIMEOUT_MS),
            metrics_listen: None,
            log: LogConfig {
                format: LogFormat::Text,
                filter: defaults::LOG_FILTER.into(),
            },
            push: None,
            retention: RetentionConfig::default(),
        }
    }

    /// The certificate and key files the server loads (and reloads on SIGHUP).
    pub fn tls_files(&self) -> (PathBuf, PathBuf) {
        match &self.tls {
            TlsSource::DataDir => {
                let dir = certs_dir(&self.data_dir);
                (
                    dir.join(quip_certs::SERVER_CERT_FILE),
                    dir.join(quip_certs::SERVER_KEY_FILE),
                )
            }
            TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
        }
    }
}

/// Which client certificates the server accepts (mutual TLS is optional for clients: a client
/// without a certificate authenticates with a token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Certificates signed by `DATA/certs/ca.pem`, when that file exists.
    DataDirCa,
    /// Certificates signed by the CA in this PEM file.
    Ca(PathBuf),
    /// No client certificates: tokens only.
    Off,
}

impl ServerConfig {
    /// The CA file client certificates are checked against, `None` when mutual TLS is off.
    pub fn client_ca_file(&self) -> Option<PathBuf> {
        match &self.client_auth {
            ClientAuth::DataDirCa => {
                let ca = certs_dir(&self.data_dir).join(quip_certs::CA_CERT_FILE);
                ca.exists().then_some(ca)
            }
            ClientAuth::Ca(path) => Some(path.clone()),
            ClientAuth::Off => None,
        }
    }
}

/// Where the server's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// `DATA/certs`, with a development PKI made there on first start if it is empty.
    DataDir,
    /// Files managed elsewhere (an ACME client, an internal CA); never created or changed.
    Files { cert: PathBuf, key: PathBuf },
}

/// The paths inside a data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}
pub fn certs_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("certs")
}
pub fn admin_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// State shared by every session.
#[derive(Debug)]
pub struct Shared {
    pub store: Store,
    pub accounts: Accounts,
    pub conversations: Conversations,
    pub presence: PresenceHandle,
    /// The offline push hook, if configured.
    pub push: Option<PushHandle>,
    pub limits: Limits,
    /// Open sessions by device credential and user.
    pub connected: Arc<Connected>,
    pub stats: Arc<ServerStats>,
}

/// Counters of the accept loop, readable while the server runs.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections handshaking or waiting for their `Hello` right now.
    pub pending: AtomicUsize,
    /// Connections asked to validate their address first (QUIC Retry).
    pub retries: AtomicU64,
}

/// Holds one place in [`ServerStats::pending`] while a connection has not authenticated.
#[derive(Debug)]
pub struct Pending(Arc<ServerStats>);

impl Pending {
    fn new(stats: &Arc<ServerStats>) -> Pending {
        stats.pending.fetch_add(1, Ordering::Relaxed);
        Pending(stats.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound, not yet running server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    admin: tokio::net::UnixListener,
    admin_path: PathBuf,
    tls: TlsReloader,
    max_connections: usize,
    shutdown_timeout: Duration,
}

/// Reloads the server certificate into a running endpoint: new connections get the new
/// certificate, established ones keep theirs.
#[derive(Clone, Debug)]
pub struct TlsReloader {
    endpoint: quinn::Endpoint,
    cert: PathBuf,
    key: PathBuf,
    transport: Arc<quinn::TransportConfig>,
    client_ca: Option<PathBuf>,
}

impl TlsReloader {
    /// Reads the certificate and key again; on any error the endpoint keeps the old ones.
    pub fn reload(&self) -> anyhow::Result<()> {
        let identity = quip_certs::ServerIdentity::from_pem_files(&self.cert, &self.key)?;
        let config = quic_config(identity, self.client_ca.as_deref(), self.transport.clone())?;
        self.endpoint.set_server_config(Some(config));
        tracing::info!(cert = %self.cert.display(), "reloaded the server certificate");
        Ok(())
    }
}

impl Server {
    /// Opens everything; fails with a message naming what could not be opened.
    pub async fn bind(config: &ServerConfig) -> anyhow::Result<Server> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
        let store = Store::open(&StoreConfig {
            path: store_dir(&config.data_dir),
            cache_bytes: config.cache_bytes,
            backend: config.store,
        })?;
        let identity = match &config.tls {
            TlsSource::DataDir => {
                let certs = certs_dir(&config.data_dir);
                let (identity, provenance) = quip_certs::load_or_create(&certs)?;
                if provenance == quip_certs::Provenance::Created {
                    tracing::info!(ca = %certs.join(quip_certs::CA_CERT_FILE).display(), "created a development CA and server certificate");
                }
                identity
            }
            TlsSource::Files { cert, key } => {
                quip_certs::ServerIdentity::from_pem_files(cert, key)?
            }
        };
        let transport = Arc::new(transport_config(config)?);
        let endpoint_config = endpoint_config(&store.stateless_reset_key().await?);
        let socket = std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("binding UDP {}", config.listen))?;
        size_socket_buffers(&socket);
        let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
        let client_ca = config.client_ca_file();
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(quic_config(
                identity,
                client_ca.as_deref(),
                transport.clone(),
            )?),
            socket,
            runtime,
        )
        .with_context(|| format!("starting QUIC on {}", config.listen))?;
        let (cert, key) = config.tls_files();
        let tls = TlsReloader {
            endpoint: endpoint.clone(),
            cert,
            key,
            transport,
            client_ca,
        };
        let admin_path = admin_socket(&config.data_dir);
        let admin = admin::bind(&admin_path)?;
        let presence = PresenceHandle::start(store.clone(), config.limits.ephemeral.clone());
        let relay = TypingRelay {
            presence: presence.clone(),
            interval: config.limits.ephemeral.typing_relay_interval,
        };
        let push = match &config.push {
            Some(push) => Some(PushHandle::start(push.clone(), presence.clone())?),
            None => None,
        };
        let services = Services {
            relay,
            push: push.clone(),
            retention: config.retention.clone(),
        };
        let shared = Arc::new(Shared {
            accounts: Accounts::new(store.clone()),
            conversations: Conversations::new(
                store.clone(),
                services,
                config.limits.conversations,
            )?,
            push,
            presence,
            store,
            limits: config.limits.clone(),
            connected: Connected::new(config.limits.connected),
            stats: Arc::new(ServerStats::default()),
        });
        Ok(Server {
            endpoint,
            shared,
            admin,
            admin_path,
            tls,
            max_connections: config.max_connections as usize,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Counters of the ephemeral plane (datagrams received, dropped, sent).
    pub fn ephemeral_stats(&self) -> Arc<EphemeralStats> {
        self.shared.presence.stats().clone()
    }

    /// Counters of the offline push hook, if one is configured.
    pub fn push_stats(&self) -> Option<Arc<PushStats>> {
        self.shared.push.as_ref().map(|push| push.stats().clone())
    }

    /// Counters of the accept loop (pending handshakes, retries).
    pub fn stats(&self) -> Arc<ServerStats> {
        self.shared.stats.clone()
    }

    /// The store the server writes to.
    pub fn store(&self) -> Store {
        self.shared.store.clone()
    }

    /// A handle that reloads the certificate files (what SIGHUP does).
    pub fn tls_reloader(&self) -> TlsReloader {
        self.tls.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully within the configured
    /// bound: refuses new connections, lets every session answer the requests it already
    /// handed to a sequencer, tells clients it is going away (`GOING_AWAY`), and returns once
    /// everything the store was given is durable. The final store flush has a bound of its
    /// own, as long again; an error says it failed or did not finish (every acknowledged
    /// message is durable regardless: the next start replays it from the store's log).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop, stopping) = watch::channel(false);
        let admin = tokio::spawn(admin::serve(self.admin, self.shared.clone()));
        let addr = self.endpoint.local_addr().ok();
        tracing::info!(listen = %addr.map_or_else(|| "?".into(), |a| a.to_string()), "quipd ready");
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = sessions.join_next(), if !sessions.is_empty() => {}
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if sessions.len() >= self.max_connections {
                        tracing::warn!(remote = %incoming.remote_address(), "connection refused: at max_connections");
                        crate::metrics::refused();
                        incoming.refuse();
                        continue;
                    }
                    let stats = &self.shared.stats;
                    let pending = stats.pending.load(Ordering::Relaxed);
                    if must_validate(pending, self.shared.limits.retry_threshold, incoming.remote_address_validated())
                        && incoming.may_retry()
                    {
                        let remote = incoming.remote_address();
                        match incoming.retry() {
                            Ok(()) => {
                                stats.retries.fetch_add(1, Ordering::Relaxed);
                                crate::metrics::retried();
                                tracing::debug!(%remote, pending, "asked to validate its address (Retry)");
                            }
                            Err(e) => tracing::debug!(%remote, error = %e, "Retry failed"),
                        }
                        continue;
                    }
                    let pending = Pending::new(stats);
                    sessions.spawn(session::serve(self.shared.clone(), incoming, pending, stopping.clone()));
                }
            }
        }
        let deadline = Instant::now() + self.shutdown_timeout;
        tracing::info!(sessions = sessions.len(), timeout = ?self.shutdown_timeout, "shutting down");
        self.endpoint.set_server_config(None);
        let _ = stop.send(true);
        admin.abort();
        let _ = std::fs::remove_file(&self.admin_path);
        let drained = tokio::time::timeout_at(deadline, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                sessions = sessions.len(),
                "shutdown timeout: closing the remaining connections"
            );
            sessions.abort_all();
        }
        self.endpoint.close(
            quinn::VarInt::from(u32::from(ErrorCode::GOING_AWAY.0)),
            b"server shutting down",
        );
        // Lets the close frames go out.
        let _ = tokio::time::timeout_at(deadline, self.endpoint.wait_idle()).await;
        // Every commit queued before this one is durable once it is. A failed store writes
        // nothing more (not even a final checkpoint): what is durable is what a restart finds.
        if self.shared.store.has_failed() {
            tracing::error!("the store failed a write; stopped without writing more");
            return Ok(());
        }
        // Its own deadline: connections that used up the shutdown timeout must not cost the
        // store its final flush.
        let flushed = tokio::time::timeout(self.shutdown_timeout, self.shared.store.sync()).await;
        match flushed {
            Ok(Ok(())) => {
                tracing::info!("store flushed; stopped");
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "final store flush failed");
                Err(anyhow::anyhow!("the final store flush failed: {e}"))
            }
            Err(_) => {
                tracing::error!("shutdown timeout: the final store flush did not finish");
                Err(anyhow::anyhow!(
                    "the final store flush did not finish within {:?}",
                    self.shutdown_timeout
                ))
            }
        }
    }
}

/// Whether a new connection must first prove it can receive at its address (a QUIC Retry costs
/// the client one round trip and the server no state): when `pending` connections are already
/// handshaking or waiting for their `Hello`, at `threshold` or more. A flood of spoofed
/// Initials then costs the server a stateless answer each instead of a connection each.
pub fn must_validate(pending: usize, threshold: usize, validated: bool) -> bool {
    !validated && pending >= threshold
}

/// Socket buffer size asked of the kernel for the endpoint's one UDP socket, both ways (the
/// kernel caps it at `net.core.rmem_max` / `wmem_max`).
const SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Every connection shares one UDP socket, so bursts (a wave of handshakes, a message fanned
/// out to many members) arrive faster than the endpoint task drains them. With the kernel's
/// default buffer (208 KiB) 64 concurrent handshakes overflowed it, and each dropped Initial
/// cost its client a retransmission timeout of about a second.
fn size_socket_buffers(socket: &std::net::UdpSocket) {
    use quinn::udp::UdpSocketState;
    let state = match UdpSocketState::new(socket.into()) {
        Ok(state) => state,
        Err(e) => return tracing::warn!(error = %e, "cannot inspect the UDP socket"),
    };
    let _ = state.set_recv_buffer_size(socket.into(), SOCKET_BUFFER_BYTES);
    let _ = state.set_send_buffer_size(socket.into(), SOCKET_BUFFER_BYTES);
    tracing::info!(
        recv_buffer = state.recv_buffer_size(socket.into()).unwrap_or(0),
        send_buffer = state.send_buffer_size(socket.into()).unwrap_or(0),
        gso_segments = state.max_gso_segments(),
        gro_segments = state.gro_segments(),
        "UDP socket"
    );
}

/// QUIC endpoint settings that survive a restart: the stateless-reset key, and the key that
/// signs connection ids. Together they let a restarted daemon recognise the connection ids of
/// its previous life and answer them with a stateless reset, so clients reconnect at once
/// instead of waiting for their idle timeout.
fn endpoint_config(secret: &[u8; 32]) -> quinn::EndpointConfig {
    use sha2::{Digest, Sha256};
    let derive = |label: &[u8]| -> [u8; 32] {
        Sha256::new()
            .chain_update(label)
            .chain_update(secret)
            .finalize()
            .into()
    };
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &derive(b"quip stateless reset"));
    let cid = derive(b"quip connection id");
    let cid_key = u64::from_le_bytes(cid[..8].try_into().expect("8 bytes"));
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

fn transport_config(config: &ServerConfig) -> anyhow::Result<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    // The client opens exactly one stream, the control stream; the server opens the others.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    // Explicit windows: a peer can make us buffer at most this much per stream and connection.
    let max_frame = u64::from(config.limits.max_frame_len);
    transport.stream_receive_window(quinn::VarInt::from_u64(2 * max_frame)?);
    transport.receive_window(quinn::VarInt::from_u64(4 * max_frame)?);
    transport.send_window(8 * max_frame);
    transport.max_idle_timeout(Some(config.idle_timeout.try_into()?));
    transport.datagram_receive_buffer_size(Some(64 * 1024));
    // quinn puts queued datagrams into a packet before stream data: a short send buffer (the
    // oldest datagram is dropped when it is full) keeps typing from ever queueing ahead of
    // messages for long.
    transport.datagram_send_buffer_size(16 * 1024);
    Ok(transport)
}

fn quic_config(
    identity: quip_certs::ServerIdentity,
    client_ca: Option<&Path>,
    transport: Arc<quinn::TransportConfig>,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM with SHA-256 first, and chosen whatever the client prefers: its key schedule
    // runs on the CPU's SHA extensions where SHA-384's does not (a sixth of a handshake's CPU
    // went to SHA-512 blocks), and every packet is encrypted with 10 AES rounds instead of 14.
    // It is a standard TLS 1.3 suite, the one QUIC's Initial packets use anyway.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        // Optional mutual TLS: a certificate, when the client presents one, must chain to the
        // CA (and is then looked up as a device credential); a client without one uses a token.
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in quip_certs::load_ca_certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("client CA {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder
        .with_single_cert(identity.chain, identity.key)
        .context("loading the server certificate")?;
    tls.alpn_protocols = vec![quip_protocol::ALPN.to_vec()];
    tls.ignore_client_order = true;
    // No 0-RTT: early data can be replayed, and a replayed send must never be accepted. (quinn
    // setups often set u32::MAX here, which accepts replayable early data.)
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    let crypto = QuicServerConfig::try_from(tls).context("TLS config unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport);
    Ok(config)
}
