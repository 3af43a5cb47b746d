//! The store: every durable byte of the daemon, behind one narrow interface.
//!
//! Only this module imports sled and fjall, the two embedded engines it can run on (see
//! `backend.rs`; `store = "sled"` or `"fjall"` in the configuration). Reads are plain methods;
//! every write goes through [`Store::commit`], which hands a [`WriteBatch`] to the one store
//! writer (see `writer.rs`) and resolves once the batch is on disk: applied, flushed and
//! fdatasync'd.

mod backend;
pub mod backup;
mod fjall_backend;
mod keys;
mod recovery;
mod sled_backend;
mod texts;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quip_protocol::{ClientMessageId, ConversationId, Epoch, Event, EventBody, Seq, UserName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use backend::{detect as detect_backend, BackendKind};
use backend::{Backend, Order};
use texts::{TextLog, TextRef};
pub use writer::WriterStats;

/// Version of the on-disk layout in `keys.rs`; a store with another version is refused.
/// Version 2 keeps texts in the text log; version 3 frames every commit in it (`texts.rs`).
/// An older store is read as it is and marked version 3 when opened, since an older daemon
/// could not read it after (a version 2 daemon would cut the log's frames off).
const SCHEMA_VERSION: u32 = 3;
/// The layouts this version reads.
const READABLE_SCHEMAS: [u32; 3] = [1, 2, 3];

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
    #[error(
        "the store in {path} was made with store = \"{found}\", but the configuration says \
         \"{wanted}\": set store = \"{found}\", or move the data with `quipd backup` and \
         `quipd restore --store {wanted}`"
    )]
    WrongBackend {
        path: PathBuf,
        found: BackendKind,
        wanted: BackendKind,
    },
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

/// A member's receipt cursors in one conversation (`convuser_receipt`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    pub delivered: Seq,
    pub read: Seq,
}

/// What changed a message after it was sent (`convseq_state`): written in the same atomic batch
/// as the event that changed it. A message never changed has none. It holds no text: the
/// current text is that of the latest edit event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Seqs of the `Edited` events, oldest first.
    pub edits: Vec<Seq>,
    /// Seq of the `Deleted` event.
    pub deleted: Option<Seq>,
    /// Who reacted with which emoji.
    pub reactions: BTreeMap<String, BTreeSet<UserName>>,
}

impl MessageRecord {
    /// Reactions counted as (user, emoji) pairs.
    pub fn reaction_count(&self) -> usize {
        self.reactions.values().map(BTreeSet::len).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub created_at_ms: u64,
}

/// The user a credential (token or client certificate) belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub user: UserName,
    pub created_at_ms: u64,
}

/// What kind of credential identifies a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialKind {
    /// A bearer token, sent in `Hello`.
    Token,
    /// A client certificate, presented in the TLS handshake.
    Certificate,
}

/// The device a credential stands for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub kind: CredentialKind,
    /// The operator's name for the device (`--device`); may be empty.
    pub label: String,
    /// For a certificate: the end of its validity, ms since the Unix epoch.
    pub not_after_ms: Option<u64>,
}

/// One credential as `quipd token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub hash: [u8; 32],
    pub token: TokenRecord,
    /// `None` for credentials issued before devices had records (tokens without a label).
    pub device: Option<DeviceRecord>,
    pub last_used_ms: Option<u64>,
}

/// Writes that become durable together, atomically: after a crash either all of a batch is
/// there or none of it.
///
/// Keys and values are encoded into one byte buffer (`data`), so a batch costs two growing
/// vectors, not two allocations per write; a conversation actor's batch of many messages is
/// built without a per-message allocation.
#[derive(Debug, Default)]
pub struct WriteBatch {
    data: Vec<u8>,
    ops: Vec<(Range<usize>, Option<Range<usize>>)>,
    /// Text log work, done by the writer before the engine ops (see `texts.rs`).
    texts: Vec<TextOp>,
}

/// A write to the text log.
#[derive(Debug, Clone)]
enum TextOp {
    /// Append the bytes at `data` as the text of an event.
    Put {
        conv: ConversationId,
        seq: Seq,
        data: Range<usize>,
    },
    /// Erase the text of an event, wherever it is.
    Erase { conv: ConversationId, seq: Seq },
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty() && self.texts.is_empty()
    }

    /// Number of writes (puts and removes).
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Moves `other`'s writes after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        if self.ops.is_empty() {
            *self = other;
            return;
        }
        let base = self.data.len();
        self.data.extend_from_slice(&other.data);
        let shift = |r: Range<usize>| r.start + base..r.end + base;
        self.ops.extend(
            other
                .ops
                .into_iter()
                .map(|(key, value)| (shift(key), value.map(shift))),
        );
        self.texts
            .extend(other.texts.into_iter().map(|op| match op {
                TextOp::Put { conv, seq, data } => TextOp::Put {
                    conv,
                    seq,
                    data: shift(data),
                },
                erase => erase,
            }));
    }

    /// The writes, in order.
    fn iter(&self) -> impl Iterator<Item = backend::Op<'_>> + '_ {
        self.ops.iter().map(|(key, value)| {
            (
                &self.data[key.clone()],
                value.as_ref().map(|v| &self.data[v.clone()]),
            )
        })
    }

    fn push_key(&mut self, key: &[u8]) -> Range<usize> {
        let start = self.data.len();
        self.data.extend_from_slice(key);
        start..self.data.len()
    }

    fn put(&mut self, key: &[u8], value: &impl Serialize) {
        let key = self.push_key(key);
        let start = self.data.len();
        self.data = postcard::to_extend(value, std::mem::take(&mut self.data))
            .expect("store records always serialize");
        self.ops.push((key, Some(start..self.data.len())));
    }

    fn put_raw(&mut self, key: &[u8], value: &[u8]) {
        let key = self.push_key(key);
        let value = self.push_key(value);
        self.ops.push((key, Some(value)));
    }

    fn remove(&mut self, key: &[u8]) {
        let key = self.push_key(key);
        self.ops.push((key, None));
    }

    /// Appends an event. Its text (if any) goes to the text log, the rest to the engine.
    pub fn append_event(&mut self, conv: ConversationId, seq: Seq, event: &StoredEvent) {
        match event.body.text() {
            Some(text) if !text.is_empty() => {
                let data = self.push_key(text.as_bytes());
                self.texts.push(TextOp::Put { conv, seq, data });
                let mut without = event.clone();
                if let Some(text) = without.body.text_mut() {
                    text.clear();
                }
                self.put(&keys::event(conv, seq), &without);
            }
            _ => self.put(&keys::event(conv, seq), event),
        }
    }

    /// Removes the text of the event at `seq` from the store, for good: from the text log (or,
    /// for an event older than the log, from its record).
    pub fn erase_text(&mut self, conv: ConversationId, seq: Seq) {
        self.texts.push(TextOp::Erase { conv, seq });
    }

    /// Removes an event that retention dropped, with its text and its message record.
    pub fn prune_event(&mut self, conv: ConversationId, seq: Seq) {
        self.erase_text(conv, seq);
        self.remove(&keys::event(conv, seq));
        self.remove(&keys::message_state(conv, seq));
    }

    /// The seqs whose texts this batch erases, in order (for tests of the rules that erase).
    pub fn erased_texts(&self) -> Vec<Seq> {
        self.texts
            .iter()
            .filter_map(|op| match op {
                TextOp::Erase { seq, .. } => Some(*seq),
                TextOp::Put { .. } => None,
            })
            .collect()
    }

    pub fn put_receipt(&mut self, conv: ConversationId, user: &UserName, record: &ReceiptRecord) {
        self.put(&keys::receipt(conv, user), record);
    }

    pub fn put_message_record(&mut self, conv: ConversationId, seq: Seq, record: &MessageRecord) {
        self.put(&keys::message_state(conv, seq), record);
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

    pub fn put_device(&mut self, hash: &[u8; 32], record: &DeviceRecord) {
        self.put(&keys::device(hash), record);
    }

    pub fn put_last_used(&mut self, hash: &[u8; 32], at_ms: u64) {
        self.put(&keys::last_used(hash), &at_ms);
    }

    /// Forgets a credential: it no longer authenticates anyone.
    pub fn remove_credential(&mut self, hash: &[u8; 32]) {
        self.remove(&keys::token(hash));
        self.remove(&keys::device(hash));
        self.remove(&keys::last_used(hash));
    }

    /// Removes a user's record and keeps its name as removed, so it is never reused.
    pub fn remove_user(&mut self, user: &UserName, at_ms: u64) {
        self.remove(&keys::user(user));
        self.put(&keys::user_removed(user), &at_ms);
    }
}

/// Store settings.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// The engine's cache. Without a cap sled's RSS grows with the data (about 300 MB per
    /// million messages at its 1 GB default).
    pub cache_bytes: u64,
    /// The engine a new store is made with; an existing store must have been made with it.
    pub backend: BackendKind,
}

impl StoreConfig {
    /// The engine of an existing store at `path` (sled for a new one), for tools that open
    /// whatever store a data directory holds.
    pub fn existing(path: PathBuf, cache_bytes: u64) -> Result<StoreConfig, StoreError> {
        let backend = backend::detect(&path)?.unwrap_or_default();
        Ok(StoreConfig {
            path,
            cache_bytes,
            backend,
        })
    }
}

/// The handle to the store. Cheap to clone; the writer thread lives as long as any handle.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
    kind: BackendKind,
    path: PathBuf,
    epoch: Epoch,
    texts: Arc<TextLog>,
    commits: mpsc::UnboundedSender<writer::Job>,
    stats: Arc<WriterStats>,
    /// Becomes true when a write failed and the store stopped taking writes.
    failed: watch::Receiver<bool>,
}

impl Store {
    /// Opens the store at `config.path`, creating it (with a new epoch) if it does not exist.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let stats = Arc::new(WriterStats::default());
        let opened = backend::open(
            &config.path,
            config.backend,
            config.cache_bytes,
            stats.clone(),
        )?;
        let backend = opened.backend;

        let epoch = match backend.get(keys::META_EPOCH)? {
            Some(bytes) => Epoch(
                bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("epoch is not 16 bytes".into()))?,
            ),
            None => {
                let epoch = Epoch(rand::random());
                let mut batch = WriteBatch::new();
                batch.put_raw(keys::META_EPOCH, &epoch.0);
                batch.put_raw(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes());
                batch.put_raw(keys::META_CHECKPOINT, &0u64.to_be_bytes());
                backend.apply_durably(&mut batch.iter())?;
                epoch
            }
        };
        let schema = backend
            .get(keys::META_SCHEMA)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_be_bytes);
        let upgrade = match schema {
            Some(SCHEMA_VERSION) => None,
            Some(old) if READABLE_SCHEMAS.contains(&old) => Some(old),
            other => {
                return Err(StoreError::Corrupt(format!(
                    "store schema {other:?} is not one this version reads ({READABLE_SCHEMAS:?})"
                )))
            }
        };
        let position = |key: &[u8]| -> Result<Option<u64>, StoreError> {
            backend
                .get(key)?
                .map(|bytes| {
                    <[u8; 8]>::try_from(bytes.as_slice())
                        .map(u64::from_be_bytes)
                        .map_err(|_| StoreError::Corrupt("a log position is not 8 bytes".into()))
                })
                .transpose()
        };
        // A store made before the log had frames: its engine held everything up to the text
        // log's committed end, and it is checked for gaps once, whole.
        let (checkpoint, unchecked) = match position(keys::META_CHECKPOINT)? {
            Some(at) => (at, false),
            None => (position(keys::META_TEXT_END)?.unwrap_or(0), true),
        };
        let (texts, frames) = TextLog::open(&config.path, checkpoint)?;
        let texts = Arc::new(texts);

        let touched = recovery::replay(&*backend, &texts, &frames)?;
        if !frames.is_empty() {
            tracing::info!(
                commits = frames.len(),
                "store recovered: replayed the commits the engine had not made durable"
            );
        }
        let suspects: Vec<(ConversationId, Seq)> = if unchecked {
            let mut all = Vec::new();
            for conv in recovery::conversations_with_events(&*backend)? {
                all.push((conv, Seq(1)));
            }
            all
        } else {
            touched
                .into_iter()
                .map(|(conv, lowest)| (conv, Seq(lowest.0.saturating_sub(1).max(1))))
                .collect()
        };
        let mut repair = WriteBatch::new();
        for (conv, from) in suspects {
            if let Some(gap) = recovery::find_gap(&*backend, conv, from, texts.end())? {
                tracing::error!(
                    conversation = %conv.0,
                    keep = gap.keep.0,
                    next = gap.next.0,
                    head = gap.head.0,
                    "store recovery: the conversation's events have a gap after a failed \
                     write; removing the events after it, which were never acknowledged"
                );
                recovery::repair(&*backend, &gap, &mut repair)?;
            }
        }

        let (failed_tx, failed) = watch::channel(false);
        let mut writer = writer::Writer::new(
            backend.clone(),
            texts.clone(),
            stats.clone(),
            writer::Start {
                verified: checkpoint,
                failed: failed_tx,
            },
        );
        if let Some(old) = upgrade {
            repair.put_raw(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes());
            tracing::info!(from = old, to = SCHEMA_VERSION, "store schema upgraded");
        }
        if !repair.is_empty() {
            writer.commit(&[&repair])?;
        }
        if unchecked {
            writer.checkpoint()?;
        }

        let (commits, rx) = mpsc::unbounded_channel();
        writer.spawn(rx)?;
        Ok(Store {
            backend,
            kind: opened.kind,
            path: config.path.clone(),
            epoch,
            texts,
            commits,
            stats,
            failed,
        })
    }

    /// Resolves once a write has failed and the store refuses writes: the daemon then stops,
    /// and the next start recovers the durable state (see `writer.rs`).
    pub async fn failed(&self) {
        let mut failed = self.failed.clone();
        let _ = failed.wait_for(|failed| *failed).await;
    }

    /// Whether a write has failed (see [`Store::failed`]).
    pub fn has_failed(&self) -> bool {
        *self.failed.borrow()
    }

    /// The engine this store runs on.
    pub fn backend(&self) -> BackendKind {
        self.kind
    }

    /// Bytes the store's files take on disk (their lengths, summed).
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        fn walk(dir: &Path) -> std::io::Result<u64> {
            let mut total = 0;
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let meta = entry.metadata()?;
                total += if meta.is_dir() {
                    walk(&entry.path())?
                } else {
                    meta.len()
                };
            }
            Ok(total)
        }
        walk(&self.path).map_err(|e| StoreError::Io(format!("{}: {e}", self.path.display())))
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The secret behind QUIC stateless resets, made once per store. Because it survives a
    /// restart, a restarted daemon can tell clients of the previous process at once that their
    /// connection is gone, instead of leaving them to wait for the idle timeout.
    pub async fn stateless_reset_key(&self) -> Result<[u8; 32], StoreError> {
        if let Some(key) = self.backend.get(keys::META_RESET_KEY)? {
            return key
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("reset key is not 32 bytes".into()));
        }
        let key: [u8; 32] = rand::random();
        let mut batch = WriteBatch::new();
        batch.put_raw(keys::META_RESET_KEY, &key);
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

    /// Resolves once everything committed before this call is durable, for a clean shutdown.
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
        Ok(backup::Snapshot::new(
            self.backend.clone(),
            self.texts.clone(),
            self.epoch,
            cut,
        ))
    }

    pub fn conversation(
        &self,
        conv: ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.get(&keys::conversation(conv))
    }

    /// Every conversation, ascending by id.
    pub fn conversations(&self) -> Result<Vec<ConversationId>, StoreError> {
        conversation_ids(&*self.backend)
    }

    /// The seq of the conversation's last event, `Seq::ZERO` when it has none.
    pub fn head(&self, conv: ConversationId) -> Result<Seq, StoreError> {
        head(&*self.backend, conv)
    }

    /// The seq of the conversation's oldest stored event (retention removes older ones),
    /// `Seq::ZERO` when it has none.
    pub fn oldest(&self, conv: ConversationId) -> Result<Seq, StoreError> {
        let prefix = &keys::event(conv, Seq::ZERO)[..9];
        let mut first = Seq::ZERO;
        self.backend
            .scan_prefix(prefix, Order::Ascending, 1, &mut |key, _| {
                first = keys::event_seq(key).unwrap_or(Seq::ZERO);
                ControlFlow::Break(())
            })?;
        Ok(first)
    }

    /// Up to `limit` events with seq > `after`, ascending.
    pub fn events_after(
        &self,
        conv: ConversationId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut events = Vec::with_capacity(limit.min(1024));
        self.visit_stored_after(conv, after, limit, &mut |event| {
            events.push(event);
            ControlFlow::Continue(())
        })?;
        self.fill_texts(conv, &mut events)?;
        Ok(events)
    }

    /// Events as the engine holds them: texts of schema 2 not yet read from the text log.
    fn visit_stored_after(
        &self,
        conv: ConversationId,
        after: Seq,
        limit: usize,
        visit: &mut dyn FnMut(Event) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let start = keys::event(conv, after.next());
        let end = keys::event(conv, Seq(u64::MAX));
        let mut failed = None;
        self.backend.scan(
            (Bound::Included(&start), Bound::Included(&end)),
            Order::Ascending,
            limit,
            &mut |key, value| match decode_event(key, value) {
                Ok(event) => visit(event),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        failed.map_or(Ok(()), Err)
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
        let mut events = Vec::new();
        let mut failed = None;
        self.backend.scan(
            (Bound::Included(&start), Bound::Excluded(&end)),
            Order::Descending,
            limit,
            &mut |key, value| match decode_event(key, value) {
                Ok(event) => {
                    events.push(event);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        events.reverse();
        self.fill_texts(conv, &mut events)?;
        Ok(events)
    }

    pub fn event(&self, conv: ConversationId, seq: Seq) -> Result<Option<Event>, StoreError> {
        let Some(mut event) = self.event_without_text(conv, seq)? else {
            return Ok(None);
        };
        self.fill_texts(conv, std::slice::from_mut(&mut event))?;
        Ok(Some(event))
    }

    /// The event with its text left empty (unless inline): for the sequencer's rules, which
    /// need who wrote what kind of event, not its text.
    pub fn event_without_text(
        &self,
        conv: ConversationId,
        seq: Seq,
    ) -> Result<Option<Event>, StoreError> {
        let stored: Option<StoredEvent> = self.get(&keys::event(conv, seq))?;
        Ok(stored.map(|e| e.into_event(seq)))
    }

    /// Reads the texts of `events` (ascending, of `conv`) from the text log. A text that was
    /// erased stays empty.
    fn fill_texts(&self, conv: ConversationId, events: &mut [Event]) -> Result<(), StoreError> {
        let needs = |e: &Event| e.body.text().is_some_and(str::is_empty);
        let (Some(first), Some(last)) = (
            events.iter().find(|e| needs(e)).map(|e| e.seq),
            events.iter().rev().find(|e| needs(e)).map(|e| e.seq),
        ) else {
            return Ok(());
        };
        let mut refs = BTreeMap::new();
        let mut failed = None;
        let (start, end) = (keys::text(conv, first), keys::text(conv, last));
        self.backend.scan(
            (Bound::Included(&start), Bound::Included(&end)),
            Order::Ascending,
            usize::MAX,
            &mut |key, value| match (keys::event_seq(key), decode::<TextRef>(value)) {
                (Some(seq), Ok(text)) => {
                    refs.insert(seq, text);
                    ControlFlow::Continue(())
                }
                (_, Err(e)) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
                (None, _) => ControlFlow::Continue(()),
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        let wanted: Vec<TextRef> = events
            .iter()
            .filter(|e| needs(e))
            .filter_map(|e| refs.get(&e.seq).copied())
            .collect();
        let mut read = self.texts.read_many(&wanted)?.into_iter();
        for event in events.iter_mut().filter(|e| needs(e)) {
            if refs.contains_key(&event.seq) {
                if let (Some(slot), Some(text)) = (event.body.text_mut(), read.next()) {
                    *slot = text;
                }
            }
        }
        Ok(())
    }

    /// Every member's receipt cursors in `conv`.
    pub fn receipts(
        &self,
        conv: ConversationId,
    ) -> Result<Vec<(UserName, ReceiptRecord)>, StoreError> {
        let prefix = keys::receipt_prefix(conv);
        let mut out = Vec::new();
        let mut failed = None;
        self.backend
            .scan_prefix(&prefix, Order::Ascending, usize::MAX, &mut |key, value| {
                let name = key
                    .get(prefix.len() + 1..)
                    .and_then(|n| String::from_utf8(n.to_vec()).ok());
                match (name, decode::<ReceiptRecord>(value)) {
                    (Some(name), Ok(record)) => {
                        out.push((UserName(name), record));
                        ControlFlow::Continue(())
                    }
                    (_, Err(e)) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                    (None, _) => {
                        failed = Some(StoreError::Corrupt("receipt key".into()));
                        ControlFlow::Break(())
                    }
                }
            })?;
        failed.map_or(Ok(out), Err)
    }

    /// What changed the message at `seq`, if anything did.
    pub fn message_record(
        &self,
        conv: ConversationId,
        seq: Seq,
    ) -> Result<Option<MessageRecord>, StoreError> {
        self.get(&keys::message_state(conv, seq))
    }

    /// The message records of seqs `first..=last`.
    pub fn message_records(
        &self,
        conv: ConversationId,
        first: Seq,
        last: Seq,
    ) -> Result<BTreeMap<Seq, MessageRecord>, StoreError> {
        let (start, end) = (
            keys::message_state(conv, first),
            keys::message_state(conv, last),
        );
        let mut out = BTreeMap::new();
        let mut failed = None;
        self.backend.scan(
            (Bound::Included(&start), Bound::Included(&end)),
            Order::Ascending,
            usize::MAX,
            &mut |key, value| match (keys::event_seq(key), decode::<MessageRecord>(value)) {
                (Some(seq), Ok(record)) => {
                    out.insert(seq, record);
                    ControlFlow::Continue(())
                }
                (_, Err(e)) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
                (None, _) => ControlFlow::Continue(()),
            },
        )?;
        failed.map_or(Ok(out), Err)
    }

    /// Seqs and server times of up to `limit` events after `after`, without their texts: what
    /// retention by age needs.
    pub fn event_times_after(
        &self,
        conv: ConversationId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<(Seq, u64)>, StoreError> {
        let mut out = Vec::new();
        self.visit_stored_after(conv, after, limit, &mut |event| {
            out.push((event.seq, event.at_ms));
            ControlFlow::Continue(())
        })?;
        Ok(out)
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
        let mut convs = Vec::new();
        let mut failed = false;
        self.backend.scan_prefix(
            &prefix,
            Order::Ascending,
            usize::MAX,
            &mut |key, _| match key[prefix.len()..].try_into() {
                Ok(bytes) => {
                    convs.push(ConversationId(u64::from_be_bytes(bytes)));
                    ControlFlow::Continue(())
                }
                Err(_) => {
                    failed = true;
                    ControlFlow::Break(())
                }
            },
        )?;
        if failed {
            return Err(StoreError::Corrupt("membership key length".into()));
        }
        Ok(convs)
    }

    pub fn user(&self, user: &UserName) -> Result<Option<UserRecord>, StoreError> {
        self.get(&keys::user(user))
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserName>, StoreError> {
        let mut users = Vec::new();
        let mut failed = false;
        self.backend.scan_prefix(
            &[keys::USER_RECORD],
            Order::Ascending,
            usize::MAX,
            &mut |key, _| match String::from_utf8(key[1..].to_vec()) {
                Ok(name) => {
                    users.push(UserName(name));
                    ControlFlow::Continue(())
                }
                Err(_) => {
                    failed = true;
                    ControlFlow::Break(())
                }
            },
        )?;
        if failed {
            return Err(StoreError::Corrupt("user name is not UTF-8".into()));
        }
        Ok(users)
    }

    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<TokenRecord>, StoreError> {
        self.get(&keys::token(hash))
    }

    pub fn last_used(&self, hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        self.get(&keys::last_used(hash))
    }

    /// When the user of this name was removed, if it was.
    pub fn user_removed(&self, user: &UserName) -> Result<Option<u64>, StoreError> {
        self.get(&keys::user_removed(user))
    }

    /// Every credential whose hash starts with `hash_prefix` (all of them for an empty prefix),
    /// in hash order, with its device record and when it was last used.
    pub fn credentials(&self, hash_prefix: &[u8]) -> Result<Vec<Credential>, StoreError> {
        let mut prefix = vec![keys::TOKENHASH_USER];
        prefix.extend_from_slice(hash_prefix);
        let mut found = Vec::new();
        let mut failed = None;
        self.backend
            .scan_prefix(&prefix, Order::Ascending, usize::MAX, &mut |key, value| {
                let record = keys::credential_hash(key)
                    .ok_or_else(|| StoreError::Corrupt("token key length".into()))
                    .and_then(|hash| Ok((hash, decode::<TokenRecord>(value)?)));
                match record {
                    Ok(record) => {
                        found.push(record);
                        ControlFlow::Continue(())
                    }
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            })?;
        if let Some(e) = failed {
            return Err(e);
        }
        found
            .into_iter()
            .map(|(hash, token)| {
                Ok(Credential {
                    hash,
                    token,
                    device: self.get(&keys::device(&hash))?,
                    last_used_ms: self.last_used(&hash)?,
                })
            })
            .collect()
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.backend
            .get(key)?
            .map(|bytes| decode(&bytes))
            .transpose()
    }
}

/// Every conversation, ascending by id.
fn conversation_ids(backend: &dyn Backend) -> Result<Vec<ConversationId>, StoreError> {
    let mut ids = Vec::new();
    let mut corrupt = false;
    backend.scan_prefix(
        &[keys::CONV_STATE],
        Order::Ascending,
        usize::MAX,
        &mut |key, _| match keys::conversation_id(key) {
            Some(id) => {
                ids.push(id);
                ControlFlow::Continue(())
            }
            None => {
                corrupt = true;
                ControlFlow::Break(())
            }
        },
    )?;
    if corrupt {
        return Err(StoreError::Corrupt("conversation key length".into()));
    }
    Ok(ids)
}

/// The seq of a conversation's last event, `Seq::ZERO` when it has none.
fn head(backend: &dyn Backend, conv: ConversationId) -> Result<Seq, StoreError> {
    let prefix = &keys::event(conv, Seq::ZERO)[..9];
    let last = backend.last_with_prefix(prefix)?;
    Ok(last
        .and_then(|key| keys::event_seq(&key))
        .unwrap_or(Seq::ZERO))
}

/// Decodes `value` as the record its key's table holds (see `keys`), to refuse a damaged
/// record before anything is written: a restore checks every record of a backup this way.
/// `meta` entries are the restore's to remake or copy by name.
fn check_record(key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    fn check<T: DeserializeOwned>(value: &[u8]) -> Result<(), StoreError> {
        decode::<T>(value).map(drop)
    }
    let table = key.first().copied().unwrap_or_default();
    let checked = match table {
        keys::CONVSEQ_EVENT => check::<StoredEvent>(value),
        keys::CONV_STATE => check::<ConversationRecord>(value),
        keys::USER_RECORD => check::<UserRecord>(value),
        keys::TOKENHASH_USER => check::<TokenRecord>(value),
        keys::CREDENTIAL_DEVICE => check::<DeviceRecord>(value),
        keys::CONVUSER_RECEIPT => check::<ReceiptRecord>(value),
        keys::CONVSEQ_STATE => check::<MessageRecord>(value),
        keys::CONVSEQ_TEXT => check::<TextRef>(value),
        keys::CONVMSGID_SEQ | keys::CREDENTIAL_LASTUSED | keys::USER_REMOVED => check::<u64>(value),
        _ => Ok(()),
    };
    checked.map_err(|e| StoreError::Corrupt(format!("a record of table 0x{table:02x}: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode_event(key: &[u8], value: &[u8]) -> Result<Event, StoreError> {
    let seq = keys::event_seq(key).ok_or_else(|| StoreError::Corrupt("event key".into()))?;
    Ok(decode::<StoredEvent>(value)?.into_event(seq))
}

#[cfg(test)]
mod tests;
