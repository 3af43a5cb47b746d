//! Administration: `quipd user ...`, `quipd token ...`, `quipd certs client` and `quipd backup`.
//!
//! The daemon's pid is what a peer of the admin socket sees in its credentials
//! (`SO_PEERCRED`): tools on the same host (`quip bench`) find the daemon that way.
//!
//! sled lets one process open a store, so while the daemon runs these commands go through its
//! admin socket (`DATA/admin.sock`, mode 0600, and only the daemon's own uid is served); when it
//! does not run, the command opens the store itself. Either way the same code does the work.
//! A command offline works only on a store that exists (unless asked to make one), so that a
//! mistyped data directory is an error rather than a new, empty store; it waits a while for
//! another command that holds the store; and a daemon that does not answer is an error after a
//! timeout, never a hang.
//! The socket speaks JSON lines: one request object, one response object. A backup is answered
//! with one `backup` line, then the backup file's bytes until the daemon closes the connection.

use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quip_protocol::UserName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::accounts::{credential_id, Accounts};
use crate::config::RetentionConfig;
use crate::connected::{Connected, ConnectedLimits};
use crate::conversation::{ConversationLimits, Conversations, Services, TypingRelay};
use crate::presence::{EphemeralLimits, PresenceHandle};
use crate::server::{admin_socket, store_dir, Shared};
use crate::store::backup::{self, BackupError, BackupSummary};
use crate::store::CredentialKind;
use crate::store::{detect_backend, Store, StoreConfig, StoreError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    UserAdd {
        name: String,
    },
    /// `count` users named `prefix0`, `prefix1`, ...
    UserAddMany {
        prefix: String,
        count: u32,
    },
    UserList,
    /// Revokes every credential of the user, takes it out of its conversations and removes it.
    UserRemove {
        name: String,
    },
    TokenIssue {
        user: String,
        device: String,
    },
    /// Every credential, or one user's.
    TokenList {
        user: Option<String>,
    },
    TokenRevoke {
        id: String,
    },
    /// Registers a client certificate (DER, hex) as a device of `user`.
    CertRegister {
        user: String,
        device: String,
        der_hex: String,
        not_after_ms: Option<u64>,
    },
    Backup,
}

/// One device credential as `quipd token list` shows it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialInfo {
    pub id: String,
    pub user: UserName,
    /// `token` or `certificate`.
    pub kind: String,
    pub device: String,
    pub created_at_ms: u64,
    pub last_used_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminResponse {
    UserAdded {
        user: UserName,
        token: String,
    },
    /// Users and their tokens, in name order of creation.
    UsersAdded {
        users: Vec<(UserName, String)>,
    },
    Users {
        users: Vec<UserName>,
    },
    UserRemoved {
        user: UserName,
        /// Credentials revoked.
        credentials: usize,
        /// Connections closed.
        closed: usize,
        /// Conversations it was taken out of.
        conversations: usize,
    },
    TokenIssued {
        user: UserName,
        id: String,
        token: String,
    },
    Credentials {
        credentials: Vec<CredentialInfo>,
    },
    Revoked {
        id: String,
        user: UserName,
        device: String,
        /// Connections closed.
        closed: usize,
    },
    CertRegistered {
        id: String,
    },
    /// The backup file follows on the socket.
    Backup {
        epoch: String,
    },
    Error {
        message: String,
    },
}

/// Longest admin request line accepted.
const MAX_REQUEST_LINE: u64 = 64 * 1024;

/// How an admin command reaches the store.
#[derive(Debug, Clone, Copy)]
pub struct AdminOptions {
    /// Without a running daemon, make a new store if the data directory holds none; otherwise
    /// that is an error.
    pub create: bool,
    /// How long to wait for the running daemon's answer, and for another process to let go of
    /// the store.
    pub timeout: Duration,
}

impl Default for AdminOptions {
    fn default() -> Self {
        AdminOptions {
            create: false,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What admin requests act on: the running daemon's, or a store opened offline.
struct Scope<'a> {
    accounts: &'a Accounts,
    conversations: &'a Conversations,
    connected: &'a Connected,
}

async fn execute(scope: &Scope<'_>, request: AdminRequest) -> AdminResponse {
    let accounts = scope.accounts;
    let result = match request {
        AdminRequest::UserAdd { name } => accounts
            .add_user(&name)
            .await
            .map(|(user, token)| AdminResponse::UserAdded { user, token }),
        AdminRequest::UserAddMany { prefix, count } => accounts
            .add_users(&prefix, count)
            .await
            .map(|users| AdminResponse::UsersAdded { users }),
        AdminRequest::UserList => accounts.users().map(|users| AdminResponse::Users { users }),
        AdminRequest::UserRemove { name } => return remove_user(scope, &name).await,
        AdminRequest::TokenIssue { user, device } => accounts
            .issue_token(&user, &device)
            .await
            .map(|issued| AdminResponse::TokenIssued {
                user: issued.user,
                id: issued.id,
                token: issued.token,
            }),
        AdminRequest::TokenList { user } => {
            accounts
                .credentials(user.as_deref())
                .map(|credentials| AdminResponse::Credentials {
                    credentials: credentials
                        .into_iter()
                        .map(|c| {
                            let device = c.device.unwrap_or(crate::store::DeviceRecord {
                                kind: CredentialKind::Token,
                                label: String::new(),
                                not_after_ms: None,
                            });
                            CredentialInfo {
                                id: credential_id(&c.hash),
                                user: c.token.user,
                                kind: match device.kind {
                                    CredentialKind::Token => "token",
                                    CredentialKind::Certificate => "certificate",
                                }
                                .into(),
                                device: device.label,
                                created_at_ms: c.token.created_at_ms,
                                last_used_ms: c.last_used_ms,
                                not_after_ms: device.not_after_ms,
                            }
                        })
                        .collect(),
                })
        }
        AdminRequest::TokenRevoke { id } => accounts.revoke(&id).await.map(|revoked| {
            let closed = scope.connected.revoke(&[revoked.hash]);
            let device = revoked.device.map(|d| d.label).unwrap_or_default();
            tracing::info!(%id, user = %revoked.token.user, closed, "credential revoked");
            AdminResponse::Revoked {
                id,
                user: revoked.token.user,
                device,
                closed,
            }
        }),
        AdminRequest::CertRegister {
            user,
            device,
            der_hex,
            not_after_ms,
        } => {
            let Ok(der) = hex::decode(&der_hex) else {
                return AdminResponse::Error {
                    message: "the certificate is not hex".into(),
                };
            };
            accounts
                .register_certificate(&user, &device, &der, not_after_ms)
                .await
                .map(|id| AdminResponse::CertRegistered { id })
        }
        AdminRequest::Backup => {
            return AdminResponse::Error {
                message: "a backup is streamed, not answered".into(),
            }
        }
    };
    result.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}

/// `quipd user remove`: first the credentials go (durably, with the user's record), so that the
/// user cannot connect again; then its open connections are closed; then it leaves every
/// conversation, each with a `MemberRemoved` it sent itself. Its messages stay. Run again after
/// a failure, it finishes the leaving.
async fn remove_user(scope: &Scope<'_>, name: &str) -> AdminResponse {
    let result = async {
        let credentials = scope.accounts.remove_user(name).await?;
        let closed = scope.connected.revoke(&credentials);
        let user: UserName = name.parse().map_err(anyhow::Error::msg)?;
        let conversations = scope
            .conversations
            .remove_account(&user)
            .await
            .map_err(|e| anyhow::anyhow!("taking {user} out of its conversations: {e}"))?;
        tracing::info!(%user, credentials = credentials.len(), closed, conversations, "user removed");
        Ok::<_, anyhow::Error>(AdminResponse::UserRemoved {
            user,
            credentials: credentials.len(),
            closed,
            conversations,
        })
    };
    result.await.unwrap_or_else(|e| AdminResponse::Error {
        message: e.to_string(),
    })
}

/// Binds the admin socket, replacing a stale one left by a daemon that did not exit cleanly
/// (the store lock, taken first, guarantees no other daemon owns it).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(listener)
}

/// Serves admin requests, one connection at a time per task.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let own_uid = Some(current_uid());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let peer_uid = stream.peer_cred().ok().map(|cred| cred.uid());
        if peer_uid.is_none() || peer_uid != own_uid {
            tracing::warn!(?peer_uid, "admin connection from another user refused");
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &shared).await {
                tracing::warn!(error = %e, "admin connection failed");
            }
        });
    }
}

fn current_uid() -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // The uid that owns our own process directory is our uid.
        std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
    }
    #[cfg(not(unix))]
    {
        u32::MAX
    }
}

async fn serve_one(stream: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST_LINE)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(AdminRequest::Backup) => return stream_backup(&shared.store, write).await,
            Ok(request) => {
                let scope = Scope {
                    accounts: &shared.accounts,
                    conversations: &shared.conversations,
                    connected: &shared.connected,
                };
                execute(&scope, request).await
            }
            Err(e) => AdminResponse::Error {
                message: format!("bad admin request: {e}"),
            },
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// Sends a backup of the store down the admin connection.
async fn stream_backup(store: &Store, mut write: OwnedWriteHalf) -> anyhow::Result<()> {
    let snapshot = match store.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            let response = AdminResponse::Error {
                message: format!("backup: {e}"),
            };
            let mut out = serde_json::to_vec(&response)?;
            out.push(b'\n');
            write.write_all(&out).await?;
            return Ok(());
        }
    };
    let mut out = serde_json::to_vec(&AdminResponse::Backup {
        epoch: store.epoch().to_string(),
    })?;
    out.push(b'\n');
    write.write_all(&out).await?;
    // The snapshot is read with blocking sled calls; chunks cross to the socket through a
    // small channel, so a slow reader slows the backup, not the daemon.
    let (chunks, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || snapshot.write_to(ChannelWriter { chunks }));
    while let Some(chunk) = rx.recv().await {
        write.write_all(&chunk).await?;
    }
    let summary = writer.await??;
    write.shutdown().await?;
    tracing::info!(
        records = summary.records,
        events = summary.events,
        conversations = summary.conversations,
        "backup sent"
    );
    Ok(())
}

/// A blocking `Write` whose bytes go to an async task.
struct ChannelWriter {
    chunks: mpsc::Sender<Vec<u8>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.chunks
            .blocking_send(buf.to_vec())
            .map_err(|_| std::io::Error::from(ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes a consistent backup of the data directory's store to `out`: taken by the running
/// daemon if there is one, from the store directly if not.
pub async fn backup(data_dir: &Path, out: &Path) -> anyhow::Result<BackupSummary> {
    backup_with(data_dir, out, AdminOptions::default()).await
}

/// [`backup`], with these options; a daemon that sends nothing for `options.timeout` fails
/// it.
pub async fn backup_with(
    data_dir: &Path,
    out: &Path,
    options: AdminOptions,
) -> anyhow::Result<BackupSummary> {
    let socket = admin_socket(data_dir);
    let path = out.to_owned();
    let silent = || unanswered(&socket, options.timeout, &AdminRequest::Backup);
    match UnixStream::connect(&socket).await {
        Ok(stream) => {
            let (read, mut write) = stream.into_split();
            let mut line = serde_json::to_vec(&AdminRequest::Backup)?;
            line.push(b'\n');
            write.write_all(&line).await?;
            let mut read = BufReader::new(read);
            let mut answer = String::new();
            tokio::time::timeout(options.timeout, read.read_line(&mut answer))
                .await
                .map_err(|_| silent())??;
            match serde_json::from_str(&answer) {
                Ok(AdminResponse::Backup { .. }) => {}
                Ok(AdminResponse::Error { message }) => anyhow::bail!(message),
                _ => anyhow::bail!("the daemon did not start the backup: {answer:?}"),
            }
            // Received into memory-bounded chunks and written by a blocking task.
            let (chunks, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
            let out = path.clone();
            let file = tokio::task::spawn_blocking(move || {
                backup::write_file_with(&out, |file| {
                    for chunk in rx {
                        std::io::Write::write_all(file, &chunk)
                            .map_err(|e| BackupError::Io(format!("writing the backup: {e}")))?;
                    }
                    Ok(())
                })
            });
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = tokio::time::timeout(options.timeout, read.read(&mut buf))
                    .await
                    .map_err(|_| silent())??;
                if n == 0 || chunks.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
            drop(chunks);
            file.await??;
            // Read back whole: proves the copy complete and intact, and says what it holds.
            Ok(tokio::task::spawn_blocking(move || backup::inspect(&path)).await??)
        }
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            let store = match open_offline(data_dir, options).await? {
                Offline::Store(store) => store,
                // A daemon started meanwhile: it takes the backup.
                Offline::DaemonStarted => {
                    return Box::pin(backup_with(data_dir, out, options)).await
                }
            };
            let snapshot = store.snapshot().await?;
            Ok(tokio::task::spawn_blocking(move || backup::write_file(&snapshot, &path)).await??)
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {}", socket.display())),
    }
}

/// What an admin command without a running daemon got.
enum Offline {
    Store(Store),
    /// The store was locked, and a daemon answers on the admin socket now.
    DaemonStarted,
}

/// Opens the store of a data directory whose daemon is not running: one that exists (or,
/// with `options.create`, a new one). Another process holding it (a command like this one) is
/// waited for, up to `options.timeout`.
async fn open_offline(data_dir: &Path, options: AdminOptions) -> anyhow::Result<Offline> {
    let dir = store_dir(data_dir);
    if !options.create && detect_backend(&dir)?.is_none() {
        anyhow::bail!(
            "{} holds no quip store ({} is missing or empty): check --data (or QUIPD_DATA, or the \
             configuration's data_dir); to make a store there, start the daemon once with \
             `quipd serve --data {}`, or pass --create to `quipd user add`",
            data_dir.display(),
            dir.display(),
            data_dir.display()
        );
    }
    let config = StoreConfig::existing(dir, 16 * 1024 * 1024)?;
    let deadline = tokio::time::Instant::now() + options.timeout;
    loop {
        match Store::open(&config) {
            Ok(store) => return Ok(Offline::Store(store)),
            Err(StoreError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                if UnixStream::connect(admin_socket(data_dir)).await.is_ok() {
                    return Ok(Offline::DaemonStarted);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(StoreError::Locked(path)) => anyhow::bail!(
                "the store in {} has been in use by another process for {} s, and no daemon \
                 answers on {}: another quipd command is working on it (or a daemon is \
                 starting); try again when it is done",
                path.display(),
                options.timeout.as_secs(),
                admin_socket(data_dir).display()
            ),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs an admin request against the data directory: through the running daemon if there is
/// one, on the store directly if not.
pub async fn run(data_dir: &Path, request: AdminRequest) -> anyhow::Result<AdminResponse> {
    run_with(data_dir, request, AdminOptions::default()).await
}

/// [`run`], with these options.
pub async fn run_with(
    data_dir: &Path,
    request: AdminRequest,
    options: AdminOptions,
) -> anyhow::Result<AdminResponse> {
    let socket = admin_socket(data_dir);
    match UnixStream::connect(&socket).await {
        Ok(stream) => tokio::time::timeout(options.timeout, ask_daemon(stream, &request))
            .await
            .map_err(|_| unanswered(&socket, options.timeout, &request))?,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            let store = match open_offline(data_dir, options).await? {
                Offline::Store(store) => store,
                Offline::DaemonStarted => {
                    return Box::pin(run_with(data_dir, request, options)).await
                }
            };
            // Nobody is connected; conversations run their sequencers in this process.
            let presence = PresenceHandle::start(store.clone(), EphemeralLimits::default());
            let relay = TypingRelay {
                interval: EphemeralLimits::default().typing_relay_interval,
                presence,
            };
            // No hook and no pruning: both belong to the running daemon.
            let services = Services {
                relay,
                push: None,
                retention: RetentionConfig::default(),
            };
            let conversations =
                Conversations::new(store.clone(), services, ConversationLimits::default())?;
            let accounts = Accounts::new(store.clone());
            let connected = Connected::new(ConnectedLimits::default());
            let scope = Scope {
                accounts: &accounts,
                conversations: &conversations,
                connected: &connected,
            };
            let response = execute(&scope, request).await;
            // Everything answered was committed; the store closes with the last handle.
            store.sync().await?;
            Ok(response)
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {}", socket.display())),
    }
}

/// A daemon that took the request and did not answer in time.
fn unanswered(socket: &Path, timeout: Duration, request: &AdminRequest) -> anyhow::Error {
    let effect = match request {
        AdminRequest::UserAdd { .. }
        | AdminRequest::UserAddMany { .. }
        | AdminRequest::TokenIssue { .. } => {
            "; it may still act on the request when it resumes, and the token it makes is then \
             lost: issue one with `quipd token issue NAME`"
        }
        AdminRequest::UserList | AdminRequest::TokenList { .. } | AdminRequest::Backup => "",
        _ => "; it may still act on the request when it resumes",
    };
    anyhow::anyhow!(
        "the daemon did not answer on {} within {} s (is it stopped or overloaded?){effect}",
        socket.display(),
        timeout.as_secs()
    )
}

async fn ask_daemon(stream: UnixStream, request: &AdminRequest) -> anyhow::Result<AdminResponse> {
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines
        .next_line()
        .await?
        .context("the daemon closed the admin socket without answering")?;
    Ok(serde_json::from_str(&answer)?)
}
