//! The text log: the bytes of every message, reply and edit text, in one file the store owns.
//!
//! Why texts are not in the engine: sled and fjall never overwrite in place. A removed or
//! replaced value lingers in their logs, segments and tables until some later compaction, so
//! "delete for everyone" could not promise that the text is gone from disk. Here a text is
//! appended once and erased in place: overwritten with zeros, fdatasync'd, and its blocks
//! released (a hole punched) where the filesystem supports it. The engine keeps only where a
//! text is (`convseq_text`, see `keys.rs`).
//!
//! Only the store writer thread writes (appends and erases, between two group commits); readers
//! read at offsets the engine made visible, which are durable and never move.
//!
//! Crash safety. A group commit appends its texts and fdatasyncs this file *before* the engine
//! batch that refers to them; that batch records the new committed length (`META_TEXT_END`).
//! On open the file is cut back to that length, so the texts of a commit that never finished
//! (never acknowledged) do not linger either. Erasures are made durable before the engine batch
//! that records them: a crash in between leaves the text erased, the delete unacknowledged.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The file in the store directory.
const FILE: &str = "texts";

/// Where one text is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextRef {
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug)]
pub struct TextLog {
    file: File,
    /// The end of what was appended (committed, or being committed by the writer).
    end: AtomicU64,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("text log: {what}: {e}"))
}

impl TextLog {
    /// Opens (or creates) the log in `dir`, cut back to `committed` bytes.
    pub fn open(dir: &Path, committed: u64) -> Result<TextLog, StoreError> {
        let path = dir.join(FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("opening"))?;
        let len = file.metadata().map_err(io("reading its length"))?.len();
        if len < committed {
            return Err(StoreError::Corrupt(format!(
                "the text log is {len} bytes, but {committed} were committed"
            )));
        }
        if len > committed {
            file.set_len(committed)
                .map_err(io("cutting an unfinished commit"))?;
            file.sync_all().map_err(io("fsync"))?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync of the store directory"))?;
        Ok(TextLog {
            file,
            end: AtomicU64::new(committed),
        })
    }

    /// The end of the log.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Appends `bytes` (not yet durable: see [`TextLog::sync`]). Writer thread only.
    pub fn append(&self, bytes: &[u8]) -> Result<TextRef, StoreError> {
        let offset = self.end();
        let len = u32::try_from(bytes.len())
            .map_err(|_| StoreError::Corrupt(format!("a text of {} bytes", bytes.len())))?;
        self.file
            .write_all_at(bytes, offset)
            .map_err(io("appending"))?;
        self.end.store(offset + u64::from(len), Ordering::Release);
        Ok(TextRef { offset, len })
    }

    /// Overwrites a text with zeros (durable after [`TextLog::sync`]). Writer thread only.
    pub fn erase(&self, text: TextRef) -> Result<(), StoreError> {
        let zeros = vec![0u8; text.len as usize];
        self.file
            .write_all_at(&zeros, text.offset)
            .map_err(io("erasing"))
    }

    /// Releases the blocks of erased texts where the filesystem can (a punched hole reads as
    /// zeros); elsewhere the zeros stay. Only reclaims space: the erase already removed the text.
    pub fn release(&self, text: TextRef) {
        use rustix::fs::{fallocate, FallocateFlags};
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if let Err(e) = fallocate(&self.file, flags, text.offset, u64::from(text.len)) {
            tracing::debug!(error = %e, "the filesystem keeps erased text blocks");
        }
    }

    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(io("fdatasync"))
    }

    /// The text at `text`.
    pub fn read(&self, text: TextRef) -> Result<String, StoreError> {
        if text.offset + u64::from(text.len) > self.end() {
            return Err(StoreError::Corrupt(format!(
                "a text at {}+{} is past the end of the text log",
                text.offset, text.len
            )));
        }
        let mut bytes = vec![0u8; text.len as usize];
        self.file
            .read_exact_at(&mut bytes, text.offset)
            .map_err(io("reading"))?;
        String::from_utf8(bytes).map_err(|_| StoreError::Corrupt("a text is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn erased_texts_are_zeros_on_disk_and_an_unfinished_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = TextLog::open(dir.path(), 0).unwrap();
        let kept = log.append("kept text".as_bytes()).unwrap();
        let erased = log.append("secret text".as_bytes()).unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(erased).unwrap(), "secret text");
        log.erase(erased).unwrap();
        log.sync().unwrap();
        log.release(erased);
        let committed = log.end();
        log.append(b"never committed").unwrap();
        drop(log);

        let on_disk = std::fs::read(dir.path().join(FILE)).unwrap();
        let find = |needle: &[u8]| on_disk.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"kept text"));
        assert!(!find(b"secret text"));
        let log = TextLog::open(dir.path(), committed).unwrap();
        assert_eq!(log.end(), committed);
        assert_eq!(log.read(kept).unwrap(), "kept text");
        assert!(TextLog::open(dir.path(), committed + 1).is_err());
    }
}
