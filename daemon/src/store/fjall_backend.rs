//! The fjall engine: an LSM tree whose writes go first to a journal (write-ahead log).
//!
//! Durability: fjall's journal is not where a commit becomes durable. fjall 2 (2.11) ignores
//! the error of the journal write in `Batch::commit` (`let _ = journal_writer.write_batch(..)`,
//! upstream issue #304, fixed in fjall 3, which needs a newer Rust than the workspace's): a
//! write that fails half way (a full disk) leaves a partial batch in the journal, the batch is
//! still applied, and when the fdatasync that follows succeeds it is reported durable. Every
//! later batch goes after the partial one, and on the next open fjall's journal recovery stops
//! at the partial batch: every batch after it is gone, acknowledged or not. So batches are
//! applied without journal durability, and a checkpoint makes them durable the way fjall's
//! recovery cannot lose: it seals the memtable and waits until fjall has flushed every sealed
//! memtable into segments and dropped their journals. Between checkpoints the store's log
//! (`texts.rs`) holds every commit; the store replays it on open.
//!
//! fjall 2 takes no lock on its directory, so the store's own lock file (`backend.rs`) is what
//! keeps a second process out. Version 2 rather than 3: fjall 3 needs Rust 1.90, above the
//! workspace's `rust-version`.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::PartitionCreateOptions;

use super::backend::{Backend, KeyRange, Op, Order, Visitor};
use super::writer::WriterStats;
use super::StoreError;

/// The keyspace lives in this subdirectory of the store directory, beside the lock and marker.
const KEYSPACE_DIR: &str = "fjall";
/// How long a checkpoint waits for fjall's flush worker before the store counts it failed.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(30);

impl From<fjall::Error> for StoreError {
    fn from(e: fjall::Error) -> Self {
        StoreError::Io(format!("fjall: {e}"))
    }
}

impl From<fjall::LsmError> for StoreError {
    fn from(e: fjall::LsmError) -> Self {
        StoreError::Io(format!("fjall: {e}"))
    }
}

pub struct FjallBackend {
    keyspace: fjall::Keyspace,
    /// Every record, in one partition: one batch is one atomic journal write across all of them.
    partition: fjall::PartitionHandle,
    stats: Arc<WriterStats>,
    _lock: File,
}

impl std::fmt::Debug for FjallBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallBackend").finish_non_exhaustive()
    }
}

impl FjallBackend {
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        stats: Arc<WriterStats>,
        lock: File,
    ) -> Result<Self, StoreError> {
        let keyspace = fjall::Config::new(dir.join(KEYSPACE_DIR))
            .cache_size(cache_bytes)
            .manual_journal_persist(true)
            .fsync_ms(None)
            // Background work shares the machine with the daemon: one thread each is plenty
            // for a chat log's write rate.
            .flush_workers(1)
            .compaction_workers(1)
            .open()?;
        let partition = keyspace.open_partition("quip", PartitionCreateOptions::default())?;
        // The keyspace's directories are new on first open: make their entries durable.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| StoreError::Io(format!("fsync of {}: {e}", dir.display())))?;
        Ok(FjallBackend {
            keyspace,
            partition,
            stats,
            _lock: lock,
        })
    }
}

impl Backend for FjallBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.partition.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        range: KeyRange<'_>,
        order: Order,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        let iter = self.partition.range::<&[u8], _>(range);
        let mut each = |entry: fjall::Result<fjall::KvPair>| {
            let (key, value) = entry?;
            Ok::<_, StoreError>(visit(&key, &value))
        };
        match order {
            Order::Ascending => {
                for entry in iter.take(limit) {
                    if each(entry)?.is_break() {
                        break;
                    }
                }
            }
            Order::Descending => {
                for entry in iter.rev().take(limit) {
                    if each(entry)?.is_break() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&self, ops: &mut dyn Iterator<Item = Op<'_>>) -> Result<(), StoreError> {
        let mut batch = self.keyspace.batch();
        for (key, value) in ops {
            match value {
                Some(value) => batch.insert(&self.partition, key, value),
                None => batch.remove(&self.partition, key),
            }
        }
        if !batch.is_empty() {
            batch.commit()?;
        }
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        self.begin_checkpoint()?;
        let deadline = Instant::now() + CHECKPOINT_WAIT;
        while !self.checkpoint_done()? {
            if Instant::now() >= deadline {
                return Err(StoreError::Io(format!(
                    "fjall did not flush its memtables within {CHECKPOINT_WAIT:?} \
                     (see its errors above)"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn begin_checkpoint(&self) -> Result<(), StoreError> {
        // Seals the memtable that holds every write so far; fjall's flush worker writes it
        // into a segment in the background.
        self.partition.rotate_memtable()?;
        Ok(())
    }

    fn checkpoint_done(&self) -> Result<bool, StoreError> {
        // The flush worker writes the sealed memtables into segments (an error there leaves
        // them sealed and their journals in place); once it is done the journals of flushed
        // memtables are deleted and only the active one is left.
        let done = self.keyspace.journal_count() <= 1;
        if done {
            self.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done)
    }
}
