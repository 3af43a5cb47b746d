//! The store writer: one thread that makes every pending batch durable at once.
//!
//! Why one thread: group commit needs a single place that sees every pending write, and sled's
//! `flush` must not be awaited from several tasks (its `flush_async` deadlocks). The thread
//! drains every commit that arrived while the previous write ran, writes them as one frame of
//! the store's log and fdatasyncs it (`texts.rs`), hands their writes to the engine, and only
//! then answers them all. Under load the batches grow on their own, so the cost of one
//! fdatasync is shared by many messages.
//!
//! The engine is made durable by a checkpoint every [`CHECKPOINT_BYTES`] of log, and when the
//! last handle goes; the log frames since the last checkpoint are replayed on open.
//!
//! After a failed write the writer refuses every later commit (`StoreError::Poisoned`) and
//! never hands the engine anything again, not even a checkpoint at the end: what is durable is
//! the log up to its last whole frame, and the next open starts from there. The store's
//! `failed` signal tells the daemon, which stops (see `Store::failed`).
//!
//! The same thread takes backup cuts ([`super::backup`]): between two group commits nothing
//! else writes, so what it reads there is one consistent state of the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quip_protocol::{ConversationId, Seq};
use tokio::sync::{mpsc, oneshot, watch};

use super::backend::Backend;
use super::texts::{Frame, TextLog, TextRef};
use super::{decode, keys, StoreError, StoredEvent, TextOp, WriteBatch};
/// Most commits folded into one flush; bounds the latency of the first commit of a batch.
const MAX_COMMITS_PER_FLUSH: usize = 4096;
/// Log bytes after which the engine is checkpointed: bounds what an open replays.
pub(super) const CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;
/// How long a checkpoint made in the background may take before the store counts it failed.
const CHECKPOINT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);
pub(super) struct Commit {
    pub batch: WriteBatch,
    pub done: oneshot::Sender<Result<(), StoreError>>,
}

/// Work for the writer, in the order it is to be done.
pub(super) enum Job {
    Commit(Commit),
    /// Take a backup cut after every commit queued before it is durable.
    Cut(oneshot::Sender<Result<super::backup::Cut, StoreError>>),
}

/// Counters of the writer's work, readable while it runs.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Group commits (each one log frame + fdatasync).
    pub flushes: AtomicU64,
    /// Batches made durable.
    pub commits: AtomicU64,
    /// Time spent in log write + fdatasync + engine apply, in microseconds.
    pub flush_micros: AtomicU64,
    /// fdatasync calls that succeeded: of log frames, and of engine checkpoints.
    pub fdatasyncs: AtomicU64,
    /// Engine checkpoints.
    pub checkpoints: AtomicU64,
}

/// Where the writer starts: the log position the engine's checkpoint vouches for, and the
/// signal it raises when it fails.
pub(super) struct Start {
    pub verified: u64,
    pub failed: watch::Sender<bool>,
}

pub(super) struct Writer {
    backend: Arc<dyn Backend>,
    texts: Arc<TextLog>,
    stats: Arc<WriterStats>,
    /// Set after a failed write: no further write is acknowledged, none reaches the engine.
    poisoned: bool,
    /// The log position up to which the engine's last checkpoint made everything durable.
    /// Written into `META_CHECKPOINT` at the next checkpoint, never at its own: a checkpoint
    /// whose flush fails may leave its own record on disk without everything before it.
    verified: u64,
    /// A checkpoint the engine is making durable in the background: the log position it will
    /// vouch for, and when it began. Commits go on meanwhile.
    checkpointing: Option<(u64, std::time::Instant)>,
    failed: watch::Sender<bool>,
}

impl Writer {
    pub(super) fn new(
        backend: Arc<dyn Backend>,
        texts: Arc<TextLog>,
        stats: Arc<WriterStats>,
        start: Start,
    ) -> Writer {
        Writer {
            backend,
            texts,
            stats,
            poisoned: false,
            verified: start.verified,
            checkpointing: None,
            failed: start.failed,
        }
    }

    pub(super) fn spawn(self, commits: mpsc::UnboundedReceiver<Job>) -> Result<(), StoreError> {
        std::thread::Builder::new()
            .name("quip-store-writer".into())
            .spawn(move || self.run(commits))
            .map(drop)
            .map_err(|e| StoreError::Io(format!("starting the store writer: {e}")))
    }

    fn run(mut self, mut commits: mpsc::UnboundedReceiver<Job>) {
        let mut pending = Vec::new();
        while let Some(first) = commits.blocking_recv() {
            let mut next = Some(first);
            let mut cut = None;
            while let Some(job) = next.take() {
                match job {
                    Job::Commit(commit) => pending.push(commit),
                    Job::Cut(reply) => {
                        cut = Some(reply);
                        break;
                    }
                }
                if pending.len() < MAX_COMMITS_PER_FLUSH {
                    next = commits.try_recv().ok();
                }
            }
            if !pending.is_empty() {
                let batches: Vec<&WriteBatch> = pending.iter().map(|c| &c.batch).collect();
                let result = self.commit(&batches);
                for commit in pending.drain(..) {
                    let _ = commit.done.send(result.clone());
                }
            }
            self.poll_checkpoint();
            if self.checkpointing.is_none() && self.backlog() >= CHECKPOINT_BYTES {
                self.begin_checkpoint();
            }
            if let Some(reply) = cut {
                // Writes wait while the cut is taken: log how long, for operators.
                let started = std::time::Instant::now();
                let cut = if self.poisoned {
                    Err(StoreError::Poisoned)
                } else {
                    super::backup::Cut::take(&*self.backend)
                };
                tracing::info!(paused = ?started.elapsed(), "backup cut taken; writes resume");
                let _ = reply.send(cut);
            }
        }
        // Every handle is gone: checkpoint twice, the second to record the first, so that the
        // next open has nothing to replay. (A checkpoint still in the background is covered.)
        self.checkpointing = None;
        if !self.poisoned && self.checkpoint().and_then(|()| self.checkpoint()).is_ok() {
            tracing::debug!("store checkpointed");
        }
    }

    /// Log bytes not yet vouched for by a checkpoint.
    fn backlog(&self) -> u64 {
        self.texts.end().saturating_sub(self.verified)
    }

    /// Makes `batches` one durable group commit: one log frame, then the engine.
    pub(super) fn commit(&mut self, batches: &[&WriteBatch]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let result = self.write(batches);
        if let Err(e) = &result {
            self.fail(e, "store write failed; refusing further writes");
        }
        result
    }

    fn fail(&mut self, e: &StoreError, what: &str) {
        tracing::error!(error = %e, "{what}");
        self.poisoned = true;
        self.failed.send_replace(true);
    }

    fn write(&mut self, batches: &[&WriteBatch]) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        if batches.iter().all(|batch| batch.is_empty()) {
            // A sync: every commit before it is durable already; this checks the disk still
            // takes an fdatasync.
            return self.texts.sync();
        }
        let (texts, engine, erased) = self.place_texts(batches)?;
        let ops = || {
            batches
                .iter()
                .flat_map(|batch| batch.iter())
                .chain(engine.iter())
        };
        let payload = Frame::encode(ops(), &erased);
        self.texts.append_frame(&texts, &payload)?;
        self.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        // The commit is durable. Erase only now: the last whole frame of the log must never
        // hold an erased text (see `texts.rs`).
        if !erased.is_empty() {
            for text in &erased {
                self.texts.erase(*text)?;
            }
            self.texts.sync()?;
        }
        self.backend.apply(&mut ops())?;
        for text in erased {
            self.texts.release(text);
        }

        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .commits
            .fetch_add(batches.len() as u64, Ordering::Relaxed);
        self.stats
            .flush_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::STORE_FLUSHES).increment(1);
        metrics::histogram!(crate::metrics::STORE_FLUSH_COMMITS).record(batches.len() as f64);
        metrics::histogram!(crate::metrics::STORE_FLUSH_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::trace!(commits = batches.len(), elapsed = ?started.elapsed(), "group commit");
        Ok(())
    }

    /// Makes what the engine holds durable and records the previous checkpoint in it.
    pub(super) fn checkpoint(&mut self) -> Result<(), StoreError> {
        let at = self.texts.end();
        let result = self
            .record_checkpoint()
            .and_then(|()| self.backend.checkpoint());
        self.checkpointed(at, result)
    }

    /// Starts a checkpoint that the engine makes durable in the background, if it can
    /// ([`Backend::begin_checkpoint`]); [`Writer::poll_checkpoint`] notices when it is.
    fn begin_checkpoint(&mut self) {
        let at = self.texts.end();
        match self
            .record_checkpoint()
            .and_then(|()| self.backend.begin_checkpoint())
        {
            Ok(()) => self.checkpointing = Some((at, std::time::Instant::now())),
            Err(e) => {
                let _ = self.checkpointed(at, Err(e));
            }
        }
    }

    /// Completes the background checkpoint once the engine says it is durable.
    fn poll_checkpoint(&mut self) {
        let Some((at, began)) = self.checkpointing else {
            return;
        };
        let result = match self.backend.checkpoint_done() {
            Ok(false) if began.elapsed() < CHECKPOINT_DEADLINE => return,
            Ok(false) => Err(StoreError::Io(format!(
                "the engine did not finish a checkpoint within {CHECKPOINT_DEADLINE:?}"
            ))),
            Ok(true) => Ok(()),
            Err(e) => Err(e),
        };
        self.checkpointing = None;
        let _ = self.checkpointed(at, result);
    }

    /// Applies the record of the previous checkpoint, which the one starting now makes durable.
    fn record_checkpoint(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let mut record = WriteBatch::new();
        record.put_raw(keys::META_CHECKPOINT, &self.verified.to_be_bytes());
        let applied = self.backend.apply(&mut record.iter());
        applied
    }

    /// A checkpoint of the log up to `at` ended with `result`.
    fn checkpointed(&mut self, at: u64, result: Result<(), StoreError>) -> Result<(), StoreError> {
        match result {
            Ok(()) => {
                self.verified = at;
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(StoreError::Poisoned) => Err(StoreError::Poisoned),
            Err(e) => {
                self.fail(&e, "store checkpoint failed; refusing further writes");
                Err(e)
            }
        }
    }

    /// The text log's part of a group commit: the texts to append (one buffer, where the next
    /// frame puts them), the engine writes that go with them (where each text is, which refs
    /// are gone) and the texts to erase. A text put and erased in the same group commit is
    /// never written.
    fn place_texts(
        &self,
        batches: &[&WriteBatch],
    ) -> Result<(Vec<u8>, WriteBatch, Vec<TextRef>), StoreError> {
        let mut puts: Vec<Option<(ConversationId, Seq, &[u8])>> = Vec::new();
        let mut placed: HashMap<(ConversationId, Seq), usize> = HashMap::new();
        let mut engine = WriteBatch::new();
        let mut erased = Vec::new();
        for batch in batches {
            for op in &batch.texts {
                match op {
                    TextOp::Put { conv, seq, data } => {
                        placed.insert((*conv, *seq), puts.len());
                        puts.push(Some((*conv, *seq, &batch.data[data.clone()])));
                    }
                    TextOp::Erase { conv, seq } => {
                        if let Some(put) = placed.remove(&(*conv, *seq)) {
                            puts[put] = None;
                            continue;
                        }
                        let key = keys::text(*conv, *seq);
                        let text = self
                            .backend
                            .get(&key)?
                            .map(|bytes| decode::<TextRef>(&bytes))
                            .transpose()?;
                        match text {
                            // A ref past the log's end (left by an unfinished commit of an
                            // older version) has no bytes to erase.
                            Some(text)
                                if !erased.contains(&text)
                                    && text.offset + u64::from(text.len) <= self.texts.end() =>
                            {
                                erased.push(text);
                                engine.remove(&key);
                            }
                            Some(_) => engine.remove(&key),
                            None => self.erase_inline(*conv, *seq, &mut engine)?,
                        }
                    }
                }
            }
        }
        let mut texts = Vec::new();
        let at = self.texts.next_texts_at();
        for (conv, seq, bytes) in puts.into_iter().flatten() {
            let text = TextRef {
                offset: at + texts.len() as u64,
                len: u32::try_from(bytes.len())
                    .map_err(|_| StoreError::Io(format!("a text of {} bytes", bytes.len())))?,
            };
            texts.extend_from_slice(bytes);
            engine.put(&keys::text(conv, seq), &text);
        }
        Ok((texts, engine, erased))
    }

    /// An event stored before the text log keeps its text in its record: rewrite it without.
    fn erase_inline(
        &self,
        conv: ConversationId,
        seq: Seq,
        engine: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let key = keys::event(conv, seq);
        let Some(bytes) = self.backend.get(&key)? else {
            return Ok(());
        };
        let mut event: StoredEvent = decode(&bytes)?;
        if let Some(text) = event.body.text_mut().filter(|t| !t.is_empty()) {
            text.clear();
            engine.put(&key, &event);
        }
        Ok(())
    }
}
