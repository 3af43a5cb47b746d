//! The store: every durable byte of the daemon, behind one narrow interface.
//!
//! Only this module imports sled. Reads are plain methods; every write goes through
//! [`Store::commit`], which hands a [`WriteBatch`] to the one store writer (see `writer.rs`) and
//! resolves once the batch is on disk: applied, flushed and fdatasync'd.

pub mod backup;
mod keys;
mod writer;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use quip_protocol::{ClientMessageId, ConversationId, Epoch, Event, EventBody, Seq, UserName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use writer::WriterStats;

/// Version of the on-disk layout in `keys.rs`; a store with another version is refused.
const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store IO failed: {0}")]
    Io(String),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("the data directory {0} is in use by another process (is quipd already running?)")]
    Locked(PathBuf),
    #[error("store refuses writes after an earlier write failed; restart the daemon")]
    Poisoned,
    #[error("store is closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// One message or membership change as stored; its seq is in the key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub sender: UserName,
    pub at_ms: u64,
    pub body: EventBody,
}

impl StoredEvent {
    pub fn into_event(self, seq: Seq) -> Event {
        Event {
            seq,
            sender: self.sender,
            at_ms: self.at_ms,
            body: self.body,
        }
    }
}

/// A conversation's current state. Written in the same atomic batch as the membership event
/// that changed it, so it always matches the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub title: String,
    pub creator: UserName,
    pub members: BTreeSet<UserName>,
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub created_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: UserName,
    pub created_at_ms: u64,
}

/// Writes that become durable together, atomically: after a crash either all of a batch is
/// there or none of it.
#[derive(Debug, Default)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Moves `other`'s writes after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }

    fn put(&mut self, key: &[u8], value: &impl Serialize) {
        let value = postcard::to_stdvec(value).expect("store records always serialize");
        self.ops.push((key.to_vec(), Some(value)));
    }

    fn remove(&mut self, key: &[u8]) {
        self.ops.push((key.to_vec(), None));
    }

    pub fn append_event(&mut self, conv: ConversationId, seq: Seq, event: &StoredEvent) {
        self.put(&keys::event(conv, seq), event);
    }

    /// Remembers which seq a sender's message id was stored at, for idempotent retries.
    pub fn remember_message_id(
        &mut self,
        conv: ConversationId,
        id: ClientMessageId,
        sender: &UserName,
        seq: Seq,
    ) {
        self.put(&keys::message_id(conv, id, sender), &seq.0);
    }

    pub fn put_conversation(&mut self, conv: ConversationId, record: &ConversationRecord) {
        self.put(&keys::conversation(conv), record);
    }

    pub fn add_membership(&mut self, user: &UserName, conv: ConversationId) {
        self.put(&keys::membership(user, conv), &());
    }

    pub fn remove_membership(&mut self, user: &UserName, conv: ConversationId) {
        self.remove(&keys::membership(user, conv));
    }

    pub fn put_user(&mut self, user: &UserName, record: &UserRecord) {
        self.put(&keys::user(user), record);
    }

    pub fn put_token(&mut self, hash: &[u8; 32], record: &TokenRecord) {
        self.put(&keys::token(hash), record);
    }
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// sled's page cache. Without a cap sled's RSS grows with the data (about 300 MB per
    /// million messages at its 1 GB default).
    pub cache_bytes: u64,
}

/// The handle to the store. Cheap to clone; the writer thread lives as long as any handle.
#[derive(Clone, Debug)]
pub struct Store {
    tree: sled::Tree,
    epoch: Epoch,
    commits: mpsc::UnboundedSender<writer::Job>,
    stats: std::sync::Arc<WriterStats>,
}

impl Store {
    /// Opens the store at `config.path`, creating it (with a new epoch) if it does not exist.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(&config.path)
            .map_err(|e| StoreError::Io(format!("creating {}: {e}", config.path.display())))?;
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_bytes)
            // The writer flushes after every batch; a background flusher would only add IO.
            .flush_every_ms(None)
            .open()
            .map_err(|e| open_error(&config.path, e))?;
        let tree = db.open_tree("quip")?;
        let stats = std::sync::Arc::new(WriterStats::default());
        let mut durability = writer::Durability::open(&config.path, stats.clone())?;

        let epoch = match tree.get(keys::META_EPOCH)? {
            Some(bytes) => Epoch(
                bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("epoch is not 16 bytes".into()))?,
            ),
            None => {
                let epoch = Epoch(rand::random());
                tree.insert(keys::META_EPOCH, &epoch.0)?;
                tree.insert(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
                durability.sync()?;
                epoch
            }
        };
        match tree.get(keys::META_SCHEMA)? {
            Some(v) if v.as_ref() == SCHEMA_VERSION.to_be_bytes() => {}
            other => {
                return Err(StoreError::Corrupt(format!(
                    "store schema {other:?} is not version {SCHEMA_VERSION}"
                )))
            }
        }

        let (commits, rx) = mpsc::unbounded_channel();
        writer::spawn(db, tree.clone(), durability, rx, stats.clone())?;
        Ok(Store {
            tree,
            epoch,
            commits,
            stats,
        })
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The secret behind QUIC stateless resets, made once per store. Because it survives a
    /// restart, a restarted daemon can tell clients of the previous process at once that their
    /// connection is gone, instead of leaving them to wait for the idle timeout.
    pub async fn stateless_reset_key(&self) -> Result<[u8; 32], StoreError> {
        if let Some(key) = self.tree.get(keys::META_RESET_KEY)? {
            return key
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("reset key is not 32 bytes".into()));
        }
        let key: [u8; 32] = rand::random();
        let mut batch = WriteBatch::new();
        batch
            .ops
            .push((keys::META_RESET_KEY.to_vec(), Some(key.to_vec())));
        self.commit(batch).await?;
        Ok(key)
    }

    pub fn writer_stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Makes `batch` durable. Batches are applied in the order `commit` is called, and each
    /// resolves only after its bytes are fdatasync'd, together with whatever else arrived
    /// meanwhile (group commit).
    pub fn commit(
        &self,
        batch: WriteBatch,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self
            .commits
            .send(writer::Job::Commit(writer::Commit { batch, done }));
        async move {
            sent.map_err(|_| StoreError::Closed)?;
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// Resolves once everything committed before this call is durable (and sled's log is
    /// flushed), for a clean shutdown.
    pub fn sync(
        &self,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        self.commit(WriteBatch::new())
    }

    /// A consistent snapshot of the store as it is once every commit queued before this call
    /// is durable; writes go on meanwhile. See [`backup`].
    pub async fn snapshot(&self) -> Result<backup::Snapshot, StoreError> {
        let (reply, cut) = oneshot::channel();
        self.commits
            .send(writer::Job::Cut(reply))
            .map_err(|_| StoreError::Closed)?;
        let cut = cut.await.map_err(|_| StoreError::Closed)??;
        Ok(backup::Snapshot::new(self.tree.clone(), self.epoch, cut))
    }

    pub fn conversation(
        &self,
        conv: ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.get(&keys::conversation(conv))
    }

    /// Every conversation, ascending by id.
    pub fn conversations(&self) -> Result<Vec<ConversationId>, StoreError> {
        self.tree
            .scan_prefix([keys::CONV_STATE])
            .keys()
            .map(|key| {
                keys::conversation_id(&key?)
                    .ok_or_else(|| StoreError::Corrupt("conversation key length".into()))
            })
            .collect()
    }

    /// The seq of the conversation's last event, `Seq::ZERO` when it has none.
    pub fn head(&self, conv: ConversationId) -> Result<Seq, StoreError> {
        let prefix = &keys::event(conv, Seq::ZERO)[..9];
        let last = self.tree.scan_prefix(prefix).next_back().transpose()?;
        Ok(last
            .and_then(|(key, _)| keys::event_seq(&key))
            .unwrap_or(Seq::ZERO))
    }

    /// Up to `limit` events with seq > `after`, ascending.
    pub fn events_after(
        &self,
        conv: ConversationId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let start = keys::event(conv, after.next());
        let end = keys::event(conv, Seq(u64::MAX));
        self.tree
            .range(start..=end)
            .take(limit)
            .map(|entry| decode_event(entry?))
            .collect()
    }

    /// Up to `limit` events with seq < `before`, the newest ones, ascending.
    pub fn events_before(
        &self,
        conv: ConversationId,
        before: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let start = keys::event(conv, Seq(1));
        let end = keys::event(conv, before);
        let mut events = self
            .tree
            .range(start..end)
            .rev()
            .take(limit)
            .map(|entry| decode_event(entry?))
            .collect::<Result<Vec<_>, _>>()?;
        events.reverse();
        Ok(events)
    }

    pub fn event(&self, conv: ConversationId, seq: Seq) -> Result<Option<Event>, StoreError> {
        let stored: Option<StoredEvent> = self.get(&keys::event(conv, seq))?;
        Ok(stored.map(|e| e.into_event(seq)))
    }

    /// The seq a sender's message id was stored at, if it was.
    pub fn message_seq(
        &self,
        conv: ConversationId,
        id: ClientMessageId,
        sender: &UserName,
    ) -> Result<Option<Seq>, StoreError> {
        Ok(self
            .get::<u64>(&keys::message_id(conv, id, sender))?
            .map(Seq))
    }

    /// The conversations `user` is a member of, ascending.
    pub fn user_conversations(&self, user: &UserName) -> Result<Vec<ConversationId>, StoreError> {
        let prefix = keys::membership_prefix(user);
        self.tree
            .scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key?;
                let bytes: [u8; 8] = key[prefix.len()..]
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("membership key length".into()))?;
                Ok(ConversationId(u64::from_be_bytes(bytes)))
            })
            .collect()
    }

    pub fn user(&self, user: &UserName) -> Result<Option<UserRecord>, StoreError> {
        self.get(&keys::user(user))
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserName>, StoreError> {
        self.tree
            .scan_prefix([keys::USER_RECORD])
            .keys()
            .map(|key| {
                let key = key?;
                String::from_utf8(key[1..].to_vec())
                    .map(UserName)
                    .map_err(|_| StoreError::Corrupt("user name is not UTF-8".into()))
            })
            .collect()
    }

    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        self.get(&keys::token(hash))
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.tree.get(key)?.map(|bytes| decode(&bytes)).transpose()
    }
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode_event((key, value): (sled::IVec, sled::IVec)) -> Result<Event, StoreError> {
    let seq = keys::event_seq(&key).ok_or_else(|| StoreError::Corrupt("event key".into()))?;
    Ok(decode::<StoredEvent>(&value)?.into_event(seq))
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
            StoreError::Locked(path.to_owned())
        }
        _ if e.to_string().contains("could not acquire lock") => {
            StoreError::Locked(path.to_owned())
        }
        _ => StoreError::Io(format!("opening {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests;
