//! The daemon in this process, over real QUIC on loopback, with a real store on disk.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use quip_client::ClientConfig;
use quipd::admin::{AdminRequest, AdminResponse};
use quipd::presence::EphemeralStats;
use quipd::server::ServerStats;
use quipd::store::Store;
use quipd::{Server, ServerConfig};

use super::{quic, WAIT};

/// A daemon on 127.0.0.1 with an OS-chosen port and its own temporary data directory. Test
/// modules add the methods particular to them in their own `impl Daemon`.
pub struct Daemon {
    pub addr: SocketAddr,
    pub stats: Arc<ServerStats>,
    pub ephemeral: Arc<EphemeralStats>,
    pub store: Store,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Declared last, so that the directory goes after the store handle above.
    pub data: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon with the default configuration, changed by `configure`; it has no
    /// users yet.
    pub async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Daemon {
        super::init_tracing();
        let data = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(data.path(), "127.0.0.1:0".parse().unwrap());
        configure(&mut config);
        let server = Server::bind(&config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let ephemeral = server.ephemeral_stats();
        let store = server.store();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Daemon {
            addr,
            stats,
            ephemeral,
            store,
            stop: Some(stop),
            task,
            data,
        }
    }

    /// The development CA the daemon made in its data directory.
    pub fn ca(&self) -> PathBuf {
        self.data.path().join("certs/ca.pem")
    }

    pub async fn admin(&self, request: AdminRequest) -> AdminResponse {
        quipd::admin::run(self.data.path(), request).await.unwrap()
    }

    /// Adds user `name`; the token of its first device.
    pub async fn user(&self, name: &str) -> String {
        match self
            .admin(AdminRequest::UserAdd { name: name.into() })
            .await
        {
            AdminResponse::UserAdded { token, .. } => token,
            other => panic!("user add: {other:?}"),
        }
    }

    pub fn client_config(&self, token: &str) -> ClientConfig {
        ClientConfig::from_ca_file(self.addr.to_string(), self.ca(), token).unwrap()
    }

    /// A QUIC connection that passed TLS but has not said anything yet.
    pub async fn raw_connection(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::Connection, quinn::ConnectionError> {
        quic::connect(self.addr, &self.ca(), alpn, None).await
    }

    /// Stops the daemon; it must finish within [`WAIT`].
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .expect("a clean stop");
    }
}
