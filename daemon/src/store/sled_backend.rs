//! The sled engine (the default).
//!
//! Durability: sled 0.34's `flush` ends with `sync_file_range`, which neither flushes the device
//! cache nor persists a grown file's size, and it never syncs blob files. So a checkpoint is
//! `flush`, then an explicit fdatasync of sled's files ([`Durability`]). `flush` is called from
//! the store writer thread only: sled's `flush_async` deadlocks when awaited from several tasks.
//!
//! Why sled is only checkpointed, never trusted with a commit: sled writes its log buffers from
//! a thread pool, several at a time. When one of those writes fails (a full disk), sled stops
//! writing, but buffers written after the failed one may already be on disk, and its recovery
//! then brings back part of a batch: some events of a group commit without the ones before
//! them. The store's log replay (`texts.rs`) rewrites every batch since the last checkpoint
//! whole, so such a torn batch never survives an open.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::{Backend, KeyRange, Op, Order, Visitor};
use super::writer::WriterStats;
use super::StoreError;

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// How long to wait for a previous sled engine of this process to release its files.
const SLED_RELEASE_WAIT: Duration = Duration::from_secs(2);

pub struct SledBackend {
    db: sled::Db,
    tree: sled::Tree,
    /// Only the writer thread locks it; a mutex because the trait takes `&self`.
    durability: Mutex<Durability>,
    /// The directory lock, released when the engine is dropped.
    _lock: File,
}

impl std::fmt::Debug for SledBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledBackend").finish_non_exhaustive()
    }
}

impl SledBackend {
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        stats: Arc<WriterStats>,
        lock: File,
    ) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            // The writer flushes after every batch; a background flusher would only add IO.
            .flush_every_ms(None);
        // sled locks its own `db` file too, and releases it only when its last background
        // thread lets go of the engine, a moment after the engine was dropped. We already hold
        // the store's lock, so no other process has this store: a sled lock still held is this
        // process's previous engine on the way out, and worth a short wait.
        let deadline = Instant::now() + SLED_RELEASE_WAIT;
        let db = loop {
            match config.open().map_err(|e| open_error(dir, e)) {
                Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                opened => break opened?,
            }
        };
        let tree = db.open_tree("quip")?;
        let durability = Durability::open(dir, stats)?;
        Ok(SledBackend {
            db,
            tree,
            durability: Mutex::new(durability),
            _lock: lock,
        })
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn scan(
        &self,
        range: KeyRange<'_>,
        order: Order,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        let iter = self.tree.range::<&[u8], _>(range);
        let mut each = |entry: sled::Result<(sled::IVec, sled::IVec)>| {
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
        let mut batch = sled::Batch::default();
        for (key, value) in ops {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        self.durability
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync()
    }
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

/// fdatasync of the files sled writes.
struct Durability {
    db_file: File,
    stats: Arc<WriterStats>,
    blobs_dir: PathBuf,
    /// Blob files are named by increasing log sequence number; those up to here are synced.
    synced_blob: u64,
}

impl Durability {
    fn open(dir: &Path, stats: Arc<WriterStats>) -> Result<Self, StoreError> {
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

    fn sync(&mut self) -> Result<(), StoreError> {
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
