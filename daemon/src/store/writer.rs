//! The store writer: one thread that makes every pending batch durable at once.
//!
//! Why one thread: sled's `flush` must not be awaited from several tasks (its `flush_async`
//! deadlocks), and group commit needs a single place that sees every pending write. The thread
//! drains every commit that arrived while the previous flush ran, applies them as one atomic
//! sled batch, flushes, fdatasyncs sled's files and only then answers them all. Under load the
//! batches grow on their own, so the cost of one fdatasync is shared by many messages.
//!
//! The same thread takes backup cuts ([`super::backup`]): between two group commits nothing
//! else writes, so what it reads there is one consistent state of the store.
//!
//! Why the explicit fdatasync: sled 0.34's `flush` ends with `sync_file_range`, which neither
//! flushes the device cache nor persists a grown file's size, and it never syncs blob files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{StoreError, WriteBatch};

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
    /// fdatasync calls on sled's log file that succeeded.
    pub fdatasyncs: AtomicU64,
}

/// fdatasync of the files sled writes.
pub(super) struct Durability {
    db_file: File,
    stats: Arc<WriterStats>,
    blobs_dir: PathBuf,
    /// Blob files are named by increasing log sequence number; those up to here are synced.
    synced_blob: u64,
}

impl Durability {
    pub fn open(dir: &Path, stats: Arc<WriterStats>) -> Result<Self, StoreError> {
        let io = |what: &Path, e: std::io::Error| {
            StoreError::Io(format!("opening {} for fdatasync: {e}", what.display()))
        };
        let db_path = dir.join("db");
        let db_file = File::open(&db_path).map_err(|e| io(&db_path, e))?;
        // sled created its files; make their directory entries durable once.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        let mut durability = Durability {
            db_file,
            stats,
            blobs_dir: dir.join("blobs"),
            synced_blob: 0,
        };
        durability.sync()?;
        Ok(durability)
    }

    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.db_file
            .sync_data()
            .map_err(|e| StoreError::Io(format!("fdatasync of sled's db file: {e}")))?;
        self.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        self.sync_new_blobs()
            .map_err(|e| StoreError::Io(format!("fdatasync of sled's blob files: {e}")))
    }

    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut newest = self.synced_blob;
        for entry in entries {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if lsn > self.synced_blob {
                File::open(entry.path())?.sync_data()?;
                newest = newest.max(lsn);
            }
        }
        if newest > self.synced_blob {
            File::open(&self.blobs_dir)?.sync_all()?;
            self.synced_blob = newest;
        }
        Ok(())
    }
}

pub(super) fn spawn(
    db: sled::Db,
    tree: sled::Tree,
    durability: Durability,
    commits: mpsc::UnboundedReceiver<Job>,
    stats: Arc<WriterStats>,
) -> Result<(), StoreError> {
    let writer = Writer {
        db,
        tree,
        durability,
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
    db: sled::Db,
    tree: sled::Tree,
    durability: Durability,
    commits: mpsc::UnboundedReceiver<Job>,
    stats: Arc<WriterStats>,
    /// Set after a failed flush: what sled holds in memory may differ from the disk, so no
    /// further write is acknowledged.
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
                let cut = super::backup::Cut::take(&self.tree);
                tracing::info!(paused = ?started.elapsed(), "backup cut taken; writes resume");
                let _ = reply.send(cut);
            }
        }
        // Every handle is gone: leave a clean log behind for a fast next start.
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final store flush failed");
        }
    }

    fn make_durable(&mut self, commits: &[Commit]) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let started = std::time::Instant::now();
        let mut batch = sled::Batch::default();
        for commit in commits {
            for (key, value) in &commit.batch.ops {
                match value {
                    Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                    None => batch.remove(key.as_slice()),
                }
            }
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.durability.sync()?;

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
}
