//! The fjall engine: an LSM tree whose writes go first to a journal (write-ahead log).
//!
//! Durability: a write batch is committed with `durability(Some(PersistMode::SyncData))`, so
//! fjall writes the batch to its journal, flushes its buffer and fdatasyncs the journal file
//! *before* the batch is applied to the memtable and becomes visible. An ack therefore still
//! means fdatasync'd, and a reader never sees a write that is not durable. fjall fsyncs the
//! journal directory itself when it starts a new journal file. Journal persistence is manual
//! (no background fsync thread): the store writer is the only one that makes writes durable.
//!
//! fjall 2 takes no lock on its directory, so the store's own lock file (`backend.rs`) is what
//! keeps a second process out. Version 2 rather than 3: fjall 3 needs Rust 1.90, above the
//! workspace's `rust-version`.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fjall::{PartitionCreateOptions, PersistMode};

use super::backend::{Backend, KeyRange, Op, Order, Visitor};
use super::writer::WriterStats;
use super::StoreError;

/// The keyspace lives in this subdirectory of the store directory, beside the lock and marker.
const KEYSPACE_DIR: &str = "fjall";

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

    fn apply_durably(&self, ops: &mut dyn Iterator<Item = Op<'_>>) -> Result<(), StoreError> {
        let mut batch = self
            .keyspace
            .batch()
            .durability(Some(PersistMode::SyncData));
        for (key, value) in ops {
            match value {
                Some(value) => batch.insert(&self.partition, key, value),
                None => batch.remove(&self.partition, key),
            }
        }
        if batch.is_empty() {
            // Nothing to write, but the caller still wants everything before it durable.
            self.keyspace.persist(PersistMode::SyncData)?;
        } else {
            batch.commit()?;
        }
        self.stats.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn close(&self) -> Result<(), StoreError> {
        self.keyspace.persist(PersistMode::SyncData)?;
        Ok(())
    }
}
