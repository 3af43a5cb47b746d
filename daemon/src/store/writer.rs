//! The store writer: one thread that makes every pending batch durable at once.
//!
//! Why one thread: group commit needs a single place that sees every pending write, and sled's
//! `flush` must not be awaited from several tasks (its `flush_async` deadlocks). The thread
//! drains every commit that arrived while the previous write ran, hands them to the engine as
//! one atomic write that returns once it is fdatasync'd ([`Backend::apply_durably`]), and only
//! then answers them all. Under load the batches grow on their own, so the cost of one
//! fdatasync is shared by many messages.
//!
//! The same thread takes backup cuts ([`super::backup`]): between two group commits nothing
//! else writes, so what it reads there is one consistent state of the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use quip_protocol::{ConversationId, Seq};
use tokio::sync::{mpsc, oneshot};

use super::backend::Backend;
use super::texts::{TextLog, TextRef};
use super::{decode, keys, StoreError, StoredEvent, TextOp, WriteBatch};
/// Most commits folded into one flush; bounds the latency of the first commit of a batch.
const MAX_COMMITS_PER_FLUSH: usize = 4096;

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
    /// Group commits (each one flush + fdatasync).
    pub flushes: AtomicU64,
    /// Batches made durable.
    pub commits: AtomicU64,
    /// Time spent in apply + flush + fdatasync, in microseconds.
    pub flush_micros: AtomicU64,
    /// fdatasync calls on the engine's log that succeeded.
    pub fdatasyncs: AtomicU64,
}

pub(super) fn spawn(
    backend: Arc<dyn Backend>,
    texts: Arc<TextLog>,
    commits: mpsc::UnboundedReceiver<Job>,
    stats: Arc<WriterStats>,
) -> Result<(), StoreError> {
    let writer = Writer {
        backend,
        texts,
        commits,
        stats,
        poisoned: false,
    };
    std::thread::Builder::new()
        .name("quip-store-writer".into())
        .spawn(move || writer.run())
        .map(drop)
        .map_err(|e| StoreError::Io(format!("starting the store writer: {e}")))
}

struct Writer {
    backend: Arc<dyn Backend>,
    texts: Arc<TextLog>,
    commits: mpsc::UnboundedReceiver<Job>,
    stats: Arc<WriterStats>,
    /// Set after a failed write: what the engine holds in memory may differ from the disk, so
    /// no further write is acknowledged.
    poisoned: bool,
}

impl Writer {
    fn run(mut self) {
        let mut pending = Vec::new();
        while let Some(first) = self.commits.blocking_recv() {
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
                    next = self.commits.try_recv().ok();
                }
            }
            if !pending.is_empty() {
                let result = self.make_durable(&pending);
                if let Err(e) = &result {
                    tracing::error!(error = %e, commits = pending.len(), "store write failed; refusing further writes");
                    self.poisoned = true;
                }
                for commit in pending.drain(..) {
                    let _ = commit.done.send(result.clone());
                }
            }
            if let Some(reply) = cut {
                // Writes wait while the cut is taken: log how long, for operators.
                let started = std::time::Instant::now();
                let cut = super::backup::Cut::take(&*self.backend);
                tracing::info!(paused = ?started.elapsed(), "backup cut taken; writes resume");
                let _ = reply.send(cut);
            }
        }
        // Every handle is gone: leave a clean log behind for a fast next start.
        if let Err(e) = self.backend.close() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }

    fn make_durable(&mut self, commits: &[Commit]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let started = std::time::Instant::now();
        let (texts, erased) = self.write_texts(commits)?;
        let mut ops = commits
            .iter()
            .flat_map(|commit| commit.batch.iter())
            .chain(texts.iter());
        self.backend.apply_durably(&mut ops)?;
        for text in erased {
            self.texts.release(text);
        }

        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .commits
            .fetch_add(commits.len() as u64, Ordering::Relaxed);
        self.stats
            .flush_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        metrics::counter!(crate::metrics::STORE_FLUSHES).increment(1);
        metrics::histogram!(crate::metrics::STORE_FLUSH_COMMITS).record(commits.len() as f64);
        metrics::histogram!(crate::metrics::STORE_FLUSH_SECONDS)
            .record(started.elapsed().as_secs_f64());
        tracing::trace!(commits = commits.len(), elapsed = ?started.elapsed(), "group commit");
        Ok(())
    }

    /// Does the text log's part of a group commit, durably, before the engine's: appends the
    /// new texts, erases the removed ones, fdatasyncs. Returns the engine writes that go with
    /// it (where each new text is, which refs are gone, the log's new end) and what was erased.
    fn write_texts(&self, commits: &[Commit]) -> Result<(WriteBatch, Vec<TextRef>), StoreError> {
        let mut engine = WriteBatch::new();
        let mut placed: HashMap<(ConversationId, Seq), TextRef> = HashMap::new();
        let mut erased = Vec::new();
        let mut appended = false;
        for commit in commits {
            for op in &commit.batch.texts {
                match op {
                    TextOp::Put { conv, seq, data } => {
                        let text = self.texts.append(&commit.batch.data[data.clone()])?;
                        placed.insert((*conv, *seq), text);
                        engine.put(&keys::text(*conv, *seq), &text);
                        appended = true;
                    }
                    TextOp::Erase { conv, seq } => {
                        let key = keys::text(*conv, *seq);
                        let text = match placed.remove(&(*conv, *seq)) {
                            Some(text) => Some(text),
                            None => self
                                .backend
                                .get(&key)?
                                .map(|bytes| decode::<TextRef>(&bytes))
                                .transpose()?,
                        };
                        match text {
                            Some(text) => {
                                self.texts.erase(text)?;
                                erased.push(text);
                                engine.remove(&key);
                            }
                            None => self.erase_inline(*conv, *seq, &mut engine)?,
                        }
                    }
                }
            }
        }
        if appended || !erased.is_empty() {
            self.texts.sync()?;
        }
        if appended {
            engine.put_raw(keys::META_TEXT_END, &self.texts.end().to_be_bytes());
        }
        Ok((engine, erased))
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
