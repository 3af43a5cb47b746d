//! Where the run's users come from: the daemon's admin socket (`DATA/admin.sock`, the same
//! JSON-lines interface as `quipd user add --count`), or a tokens file that command wrote.
//!
//! The admin socket also says which process the daemon is: its peer credentials
//! (`SO_PEERCRED`) carry the daemon's pid, from which the run reads the daemon's CPU time and
//! memory in `/proc`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A user the run may connect as.
#[derive(Clone, Debug)]
pub struct Account {
    pub name: String,
    pub token: String,
}

/// The admin requests the tool uses (a subset of the daemon's).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum AdminRequest<'a> {
    UserAddMany { prefix: &'a str, count: u32 },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum AdminResponse {
    UsersAdded { users: Vec<(String, String)> },
    Error { message: String },
}

/// Users for a run.
#[derive(Debug)]
pub enum Accounts {
    /// Made on demand through the admin socket of the daemon whose data directory this is.
    Admin { socket: PathBuf, prefix: String },
    /// Read from a `quipd user add --count N --tokens-out FILE` file.
    File { accounts: Vec<Account>, used: usize },
}

impl Accounts {
    /// Users made through the admin socket of `data_dir`, named with a prefix unique to this
    /// run so that runs never collide with each other or with real users.
    pub fn admin(data_dir: &Path) -> Accounts {
        let tag: u32 = rand::random();
        Accounts::Admin {
            socket: data_dir.join("admin.sock"),
            prefix: format!("bench{tag:08x}-"),
        }
    }

    pub fn file(path: &Path) -> anyhow::Result<Accounts> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?;
        let mut accounts = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((name, token)) = line.split_once(char::is_whitespace) else {
                bail!("{}: line {}: expected `name token`", path.display(), n + 1);
            };
            accounts.push(Account {
                name: name.to_owned(),
                token: token.trim().to_owned(),
            });
        }
        Ok(Accounts::File { accounts, used: 0 })
    }

    /// `count` users not handed out before in this run.
    pub async fn take(&mut self, count: usize) -> anyhow::Result<Vec<Account>> {
        match self {
            Accounts::Admin { socket, prefix } => {
                // Each batch gets its own sub-prefix, so that names never repeat.
                let batch: u32 = rand::random();
                let prefix = format!("{prefix}{:04x}-", batch & 0xffff);
                add_users(socket, &prefix, count).await
            }
            Accounts::File { accounts, used } => {
                let end = *used + count;
                if end > accounts.len() {
                    bail!(
                        "the tokens file holds {} users; this run needs at least {end} \
                         (make more with `quipd user add --count N --prefix P --tokens-out FILE`)",
                        accounts.len()
                    );
                }
                let taken = accounts[*used..end].to_vec();
                *used = end;
                Ok(taken)
            }
        }
    }
}

/// Asks the daemon to create `count` users at once.
async fn add_users(socket: &Path, prefix: &str, count: usize) -> anyhow::Result<Vec<Account>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to the daemon's admin socket {} (is quipd running on that data directory?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let count = u32::try_from(count).context("too many users")?;
    let mut line = serde_json::to_vec(&AdminRequest::UserAddMany { prefix, count })?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let answer = BufReader::new(read)
        .lines()
        .next_line()
        .await?
        .context("the daemon closed the admin socket without answering")?;
    match serde_json::from_str::<AdminResponse>(&answer)
        .with_context(|| format!("unexpected admin answer {answer:?}"))?
    {
        AdminResponse::UsersAdded { users } => Ok(users
            .into_iter()
            .map(|(name, token)| Account { name, token })
            .collect()),
        AdminResponse::Error { message } => bail!("the daemon refused to add users: {message}"),
    }
}

/// The pid of the daemon serving `data_dir`'s admin socket, if it runs on this host.
pub async fn daemon_pid(data_dir: &Path) -> Option<u32> {
    let stream = UnixStream::connect(data_dir.join("admin.sock"))
        .await
        .ok()?;
    let pid = stream.peer_cred().ok()?.pid()?;
    u32::try_from(pid).ok()
}

/// The store engine of a local daemon's data directory, from the marker the store writes.
pub fn store_engine(data_dir: &Path) -> Option<String> {
    let store = data_dir.join("store");
    match std::fs::read_to_string(store.join("backend")) {
        Ok(name) => Some(name.trim().to_owned()),
        // Stores made before the marker existed are sled's.
        Err(_) if store.join("db").exists() => Some("sled".into()),
        Err(_) => None,
    }
}
