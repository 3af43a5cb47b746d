//! The embedded key-value engines the store can run on, behind one small trait.
//!
//! [`Backend`] is everything the rest of the store asks of an engine: a point read, an ordered
//! scan (forward or backward, bounded) and one write operation that applies a set of puts and
//! removes atomically *and durably*. It speaks plain byte keys and values; the key layout
//! (`keys.rs`) and the record encoding stay the same whichever engine holds them. The trait is
//! narrow on purpose: a networked engine could implement it later with one round trip per call.
//!
//! Two engines implement it: sled (`sled_backend.rs`, the default) and fjall
//! (`fjall_backend.rs`). Which one a store uses is written into the store directory when it is
//! made (the `backend` file), so a configuration that names the other engine is refused instead
//! of silently starting an empty store.

use std::fmt;
use std::ops::{Bound, ControlFlow};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;

use super::writer::WriterStats;
use super::StoreError;

/// One write of a batch: a put (`Some(value)`) or a remove (`None`).
pub type Op<'a> = (&'a [u8], Option<&'a [u8]>);

/// What a scan hands each entry to: key and value; `Break` ends the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// A key range, as the engines take it.
pub type KeyRange<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The direction of a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// An embedded engine. Reads may come from any thread; writes only ever from the one store
/// writer thread (see `writer.rs`), which is what makes group commit and backup cuts work.
///
/// The engine is not where a commit becomes durable: the store's log is (`texts.rs`). A write
/// reaches the engine only after its log frame is fdatasync'd, and the engine is made durable
/// now and then by [`Backend::checkpoint`]; after a crash or a failed write the store replays
/// the log frames written since the last checkpoint. So whatever an engine does with a write
/// that fails (sled may recover part of a batch, fjall 2 may leave a torn journal that cuts off
/// the batches after it), nothing acknowledged depends on it.
pub trait Backend: Send + Sync + fmt::Debug {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Hands each entry in `range` to `visit`, in `order`, until `limit` entries were visited or
    /// `visit` breaks. Keys compare as bytes.
    fn scan(
        &self,
        range: KeyRange<'_>,
        order: Order,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError>;

    /// Applies every op, in order, as one write that readers see whole. It need not be durable
    /// yet: see [`Backend::checkpoint`].
    fn apply(&self, ops: &mut dyn Iterator<Item = Op<'_>>) -> Result<(), StoreError>;

    /// Makes every write applied so far durable (on disk and fdatasync'd) in a way that the
    /// engine's own recovery keeps whole, even if an earlier write failed without saying so.
    fn checkpoint(&self) -> Result<(), StoreError>;

    /// Starts a checkpoint of every write applied so far and returns without waiting where the
    /// engine makes it durable in the background; [`Backend::checkpoint_done`] says when it
    /// is. The writer goes on committing meanwhile, so a slow engine flush never stalls sends.
    /// By default the whole checkpoint is done here.
    fn begin_checkpoint(&self) -> Result<(), StoreError> {
        self.checkpoint()
    }

    /// Whether the checkpoint begun last (and every write applied before it) is durable.
    fn checkpoint_done(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// [`Backend::apply`], then [`Backend::checkpoint`]: for writes made outside the log
    /// (creating a store, restoring a backup).
    fn apply_durably(&self, ops: &mut dyn Iterator<Item = Op<'_>>) -> Result<(), StoreError> {
        self.apply(ops)?;
        self.checkpoint()
    }
}

impl dyn Backend + '_ {
    /// Every entry whose key starts with `prefix`.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
        order: Order,
        limit: usize,
        visit: &mut Visitor<'_>,
    ) -> Result<(), StoreError> {
        let end = prefix_end(prefix);
        let upper = match &end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        self.scan((Bound::Included(prefix), upper), order, limit, visit)
    }

    /// The last entry of a prefix, if any.
    pub fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let mut last = None;
        self.scan_prefix(prefix, Order::Descending, 1, &mut |key, _| {
            last = Some(key.to_vec());
            ControlFlow::Break(())
        })?;
        Ok(last)
    }
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Which engine a store runs on: the `store` key of the configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// sled 0.34: the default, and what every store made before this setting existed uses.
    #[default]
    Sled,
    /// fjall 2: an LSM tree with a write-ahead journal.
    Fjall,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sled => "sled",
            BackendKind::Fjall => "fjall",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "sled" => Ok(BackendKind::Sled),
            "fjall" => Ok(BackendKind::Fjall),
            other => Err(format!("unknown store {other:?}: \"sled\" or \"fjall\"")),
        }
    }
}

/// The file in a store directory that names its engine.
const MARKER: &str = "backend";
/// The file a running store holds an exclusive lock on.
const LOCK: &str = "lock";

/// The engine of the store at `dir`: `None` for a new (empty or absent) directory.
pub fn detect(dir: &Path) -> Result<Option<BackendKind>, StoreError> {
    match std::fs::read_to_string(dir.join(MARKER)) {
        Ok(name) => return name.parse().map(Some).map_err(StoreError::Corrupt),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::Io(format!("reading {}: {e}", dir.display()))),
    }
    // Stores made before the marker existed are sled's: its files are `conf` and `db`.
    if dir.join("conf").exists() || dir.join("db").exists() {
        return Ok(Some(BackendKind::Sled));
    }
    Ok(None)
}

/// An open engine with the directory lock that keeps a second process out.
pub struct Opened {
    pub backend: Arc<dyn Backend>,
    pub kind: BackendKind,
}

/// Opens (or makes) the store at `dir` with the `wanted` engine. An existing store made by the
/// other engine is refused with a message saying so.
pub fn open(
    dir: &Path,
    wanted: BackendKind,
    cache_bytes: u64,
    stats: Arc<WriterStats>,
) -> Result<Opened, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::Io(format!("creating {}: {e}", dir.display())))?;
    let lock = lock(dir)?;
    let found = detect(dir)?;
    if let Some(found) = found {
        if found != wanted {
            return Err(StoreError::WrongBackend {
                path: dir.to_owned(),
                found,
                wanted,
            });
        }
    }
    let backend: Arc<dyn Backend> = match wanted {
        BackendKind::Sled => Arc::new(super::sled_backend::SledBackend::open(
            dir,
            cache_bytes,
            stats,
            lock,
        )?),
        BackendKind::Fjall => Arc::new(super::fjall_backend::FjallBackend::open(
            dir,
            cache_bytes,
            stats,
            lock,
        )?),
    };
    if found.is_none() {
        write_marker(dir, wanted)?;
    }
    Ok(Opened {
        backend,
        kind: wanted,
    })
}

/// Takes the store directory's lock; held for as long as the returned file lives.
fn lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    use fs2::FileExt;
    let path = dir.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::Io(format!("opening {}: {e}", path.display())))?;
    file.try_lock_exclusive()
        .map_err(|_| StoreError::Locked(dir.to_owned()))?;
    Ok(file)
}

/// Writes the marker durably: the file, then its directory entry.
fn write_marker(dir: &Path, kind: BackendKind) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Io(format!("writing {}: {e}", dir.display()));
    let path = dir.join(MARKER);
    let mut file = std::fs::File::create(&path).map_err(io)?;
    std::io::Write::write_all(&mut file, format!("{kind}\n").as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
    }

    #[test]
    fn backend_names_parse() {
        assert_eq!("fjall".parse(), Ok(BackendKind::Fjall));
        assert_eq!("sled".parse(), Ok(BackendKind::Sled));
        assert!("rocksdb".parse::<BackendKind>().is_err());
    }
}
