//! The daemon in the test's own process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quip_client::{Client, ClientConfig, ClientError};
use quipd::admin::{self, AdminRequest, AdminResponse};
use quipd::push::PushStats;
use quipd::store::StoreError;
use quipd::{Server, ServerConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{temp_dir, within, within_for};

/// How long a restart retries opening a store still locked by the previous server's last tasks.
const RELOCK_WAIT: Duration = Duration::from_secs(5);

/// `quipd::Server` running on the test's tokio runtime, on its own temporary data directory.
///
/// Dropping it tells the server to stop (without waiting); [`TestServer::shutdown`] stops it and
/// waits until `run` has returned.
#[derive(Debug)]
pub struct TestServer {
    /// The QUIC address the server listens on (a fresh loopback port at every start).
    pub addr: SocketAddr,
    /// The data directory: store, certificates, admin socket.
    pub data_dir: PathBuf,
    /// Kept alive as long as the server; removed when the `TestServer` is dropped. Always
    /// `Some`, except while `restart` hands it to the next server.
    dir: Option<tempfile::TempDir>,
    running: Option<Running>,
    /// Counters of the push hook, when the configuration has one.
    pub push: Option<Arc<PushStats>>,
    setup: Setup,
}

/// Changes a test makes to the server's configuration; kept for restarts.
#[derive(Clone)]
struct Setup(Arc<dyn Fn(&mut ServerConfig) + Send + Sync>);

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Setup")
    }
}

#[derive(Debug)]
struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    /// Binds a server on a new temporary data directory and `127.0.0.1:0`, and runs it.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestServer::start`], with `setup` changing the configuration first (the push
    /// hook, retention, the store engine); restarts apply it again.
    pub async fn start_with(
        setup: impl Fn(&mut ServerConfig) + Send + Sync + 'static,
    ) -> TestServer {
        let listen = "127.0.0.1:0".parse().expect("a valid socket address");
        Self::start_in(temp_dir(), listen, Setup(Arc::new(setup))).await
    }

    /// Starts a server whose data directory is `dir/data`. While the store or the port is still
    /// held by a server of this process that is finishing its shutdown, retries for
    /// [`RELOCK_WAIT`].
    async fn start_in(dir: tempfile::TempDir, listen: SocketAddr, setup: Setup) -> TestServer {
        let data_dir = dir.path().join("data");
        let mut config = ServerConfig::new(&data_dir, listen);
        (setup.0)(&mut config);
        let deadline = Instant::now() + RELOCK_WAIT;
        let server = loop {
            let bound = within(
                format_args!("binding quipd on {}", data_dir.display()),
                Server::bind(&config),
            )
            .await;
            match bound {
                Ok(server) => break server,
                Err(e) if still_held(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!(
                    "starting the in-process quipd on {} failed: {e:#}",
                    data_dir.display()
                ),
            }
        };
        let addr = server
            .local_addr()
            .expect("the bound server has a local address");
        let push = server.push_stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            // Resolves on a stop signal, or when the `TestServer` is dropped.
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            data_dir,
            dir: Some(dir),
            running: Some(Running { stop, task }),
            push,
            setup,
        }
    }

    /// The CA certificate that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        ca_path(&self.data_dir)
    }

    /// Creates a user through the running daemon's admin socket; returns its bearer token.
    pub async fn add_user(&self, name: &str) -> String {
        assert!(
            self.running.is_some(),
            "add_user({name}) on a server that was shut down"
        );
        let request = AdminRequest::UserAdd { name: name.into() };
        let response = within(
            format_args!("adding user {name} through the admin socket"),
            admin::run(&self.data_dir, request),
        )
        .await
        .unwrap_or_else(|e| panic!("adding user {name}: {e:#}"));
        match response {
            AdminResponse::UserAdded { user, token } => {
                assert_eq!(user.as_str(), name, "the admin socket added another user");
                token
            }
            other => panic!("adding user {name}: unexpected admin answer {other:?}"),
        }
    }

    /// The configuration a client of this server uses with `token`.
    pub fn client_config(&self, token: &str) -> ClientConfig {
        ClientConfig::from_ca_file(self.addr.to_string(), self.ca_path(), token)
            .unwrap_or_else(|e| panic!("reading the server's CA {}: {e}", self.ca_path().display()))
    }

    /// Connects a client; the connection must succeed.
    pub async fn client(&self, token: &str) -> Client {
        self.try_client(token)
            .await
            .unwrap_or_else(|e| panic!("connecting a client to {}: {e}", self.addr))
    }

    /// Connects a client and returns the outcome, for tests of refused connections.
    pub async fn try_client(&self, token: &str) -> Result<Client, ClientError> {
        let config = self.client_config(token);
        within(
            format_args!("connecting to {}", self.addr),
            Client::connect(config),
        )
        .await
    }

    /// Adds a user and connects it: `(token, client)`.
    pub async fn user_client(&self, name: &str) -> (String, Client) {
        let token = self.add_user(name).await;
        let client = self.client(&token).await;
        assert_eq!(client.user().as_str(), name, "Welcome names another user");
        (token, client)
    }

    /// Stops the server and waits until it has returned from `run`.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// Shuts the server down gracefully and starts a new one on the same data directory and
    /// address, so that clients can reconnect.
    pub async fn restart(mut self) -> TestServer {
        self.stop().await;
        let dir = self.dir.take().expect("the server owns its directory");
        Self::start_in(dir, self.addr, self.setup.clone()).await
    }

    async fn stop(&mut self) {
        let Some(Running { stop, task }) = self.running.take() else {
            return;
        };
        let _ = stop.send(());
        // `run` waits at most 5 s for connections to close.
        within_for(
            Duration::from_secs(20),
            format_args!("shutting down the server on {}", self.data_dir.display()),
            task,
        )
        .await
        .expect("the server task panicked")
        .expect("the server stopped cleanly");
    }

    /// The temporary directory that holds `data/`.
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the server owns its directory")
            .path()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
        }
    }
}

pub(crate) fn ca_path(data_dir: &Path) -> PathBuf {
    quipd::server::certs_dir(data_dir).join("ca.pem")
}

/// Whether binding failed on what the previous server of this process still holds: the store's
/// lock, or the UDP port (while its last connections drain).
fn still_held(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::Locked(_))
        ) || cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
    })
}
