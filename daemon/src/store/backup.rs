//! Backups: a consistent copy of a running store in one file, and a new store made from one.
//!
//! Consistency without stopping writes. The store's engines offer no snapshot we can rely on, and a plain scan racing the
//! writer could copy a message id whose message it missed. But the store writer is the only
//! writer, so between two of its group commits the store holds one consistent state. There the
//! writer takes a [`Cut`]: each conversation's head seq, and a copy of every record outside the
//! two append-only tables and the text refs. `convseq_event` and `convmsgid_seq` are never
//! overwritten (see `keys.rs`), so they are read afterwards, while writes go on, keeping only
//! what is at or below the cut's heads; the pause is a copy of the small tables, not of the
//! messages.
//!
//! Two things may change under that scan, and both only remove: retention drops a
//! conversation's oldest events (the backup then starts a little later, still gap-free up to
//! its head), and a delete for everyone erases texts (a message deleted while the backup is
//! written is in it without its text: an erased text never comes back from a backup).
//!
//! Texts are written inline in their events (the backup does not depend on the text log's
//! offsets); a restore moves them into the new store's text log.
//!
//! A restored store gets a new epoch: it may lack what clients saw after the backup, so their
//! cursors must not be trusted against it (they get `CursorReset`).
//!
//! File format, all integers big-endian:
//!
//! | part    | bytes                                                                   |
//! |---------|-------------------------------------------------------------------------|
//! | magic   | `QUIPBAK\x01`                                                           |
//! | header  | len:u32, postcard [`Header`]                                            |
//! | records | per record: `0x01`, key len:u32, key, value len:u32, value              |
//! | trailer | `0x00`, record count:u64, SHA-256 of every byte before the trailer      |

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::ops::{Bound, ControlFlow};
use std::path::Path;
use std::sync::Arc;

use quip_protocol::{ConversationId, Epoch, Seq};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::backend::{self, Backend, BackendKind, Order};
use super::texts::{TextLog, TextRef};
use super::{
    check_record, decode, keys, StoreError, StoredEvent, WriteBatch, READABLE_SCHEMAS,
    SCHEMA_VERSION,
};

const MAGIC: &[u8; 8] = b"QUIPBAK\x01";
const RECORD: u8 = 0x01;
const END: u8 = 0x00;
/// Longest key or value accepted from a file: bounds what a damaged length makes us allocate.
const MAX_FIELD: u32 = 64 * 1024 * 1024;
/// Records written per durable batch while restoring.
const RESTORE_BATCH: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Io(String),
    #[error("not a usable quip backup: {0}")]
    Format(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> BackupError {
    move |e| BackupError::Io(format!("{what}: {e}"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    schema: u32,
    epoch: [u8; 16],
    taken_at_ms: u64,
}

/// The consistent point of a backup, taken by the store writer between two group commits.
#[derive(Debug)]
pub struct Cut {
    /// Every record outside the append-only tables, as it was at the cut.
    records: Vec<(Vec<u8>, Vec<u8>)>,
    /// Each conversation's last seq at the cut.
    heads: BTreeMap<ConversationId, Seq>,
}

impl Cut {
    pub(super) fn take(backend: &dyn Backend) -> Result<Cut, StoreError> {
        let mut records = Vec::new();
        let before: &[u8] = &[keys::CONVSEQ_EVENT];
        let after: &[u8] = &[keys::CONV_STATE];
        let texts: &[u8] = &[keys::CONVSEQ_TEXT];
        let past_texts: &[u8] = &[keys::CONVSEQ_TEXT + 1];
        let mut copy = |key: &[u8], value: &[u8]| {
            // Log positions belong to this store's text log, not to one made from the backup.
            if key != keys::META_TEXT_END && key != keys::META_CHECKPOINT {
                records.push((key.to_vec(), value.to_vec()));
            }
            ControlFlow::Continue(())
        };
        let all = usize::MAX;
        backend.scan(
            (Bound::Unbounded, Bound::Excluded(before)),
            Order::Ascending,
            all,
            &mut copy,
        )?;
        backend.scan(
            (Bound::Included(after), Bound::Excluded(texts)),
            Order::Ascending,
            all,
            &mut copy,
        )?;
        backend.scan(
            (Bound::Included(past_texts), Bound::Unbounded),
            Order::Ascending,
            all,
            &mut copy,
        )?;
        let mut heads = BTreeMap::new();
        for (key, _) in &records {
            if key.first() == Some(&keys::CONV_STATE) {
                if let Some(conv) = keys::conversation_id(key) {
                    heads.insert(conv, super::head(backend, conv)?);
                }
            }
        }
        Ok(Cut { records, heads })
    }
}

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub epoch: Epoch,
    pub records: u64,
    pub conversations: u64,
    /// Messages and membership changes.
    pub events: u64,
}

/// A store's state at a cut, ready to be written out.
#[derive(Debug)]
pub struct Snapshot {
    backend: Arc<dyn Backend>,
    texts: Arc<TextLog>,
    epoch: Epoch,
    cut: Cut,
    taken_at_ms: u64,
}

impl Snapshot {
    pub(super) fn new(
        backend: Arc<dyn Backend>,
        texts: Arc<TextLog>,
        epoch: Epoch,
        cut: Cut,
    ) -> Snapshot {
        Snapshot {
            backend,
            texts,
            epoch,
            cut,
            taken_at_ms: crate::conversation::now_ms(),
        }
    }

    /// Each conversation's head at the cut.
    pub fn heads(&self) -> &BTreeMap<ConversationId, Seq> {
        &self.cut.heads
    }

    /// Writes the backup file format to `out`. Blocking: run it off the async runtime.
    pub fn write_to(&self, out: impl Write) -> Result<BackupSummary, BackupError> {
        let mut out = HashingWriter {
            inner: BufWriter::with_capacity(256 * 1024, out),
            hash: Sha256::new(),
        };
        let header = Header {
            schema: SCHEMA_VERSION,
            epoch: self.epoch.0,
            taken_at_ms: self.taken_at_ms,
        };
        let header = postcard::to_stdvec(&header)
            .map_err(|e| BackupError::Format(format!("encoding the header: {e}")))?;
        out.write_all(MAGIC).map_err(io("writing the backup"))?;
        write_field(&mut out, &header)?;
        let mut records = 0u64;
        let mut events = 0u64;
        let mut put = |out: &mut HashingWriter<_>, key: &[u8], value: &[u8]| {
            records += 1;
            out.write_all(&[RECORD]).map_err(io("writing the backup"))?;
            write_field(out, key)?;
            write_field(out, value)
        };
        for (key, value) in &self.cut.records {
            put(&mut out, key, value)?;
        }
        // Written while the scan runs: the first failure stops it and is returned.
        let mut failed: Option<BackupError> = None;
        for (&conv, &head) in &self.cut.heads {
            if head == Seq::ZERO {
                continue;
            }
            let (first, last) = (keys::event(conv, Seq(1)), keys::event(conv, head));
            let mut gaps = Gaps::default();
            self.backend.scan(
                (Bound::Included(&first), Bound::Included(&last)),
                Order::Ascending,
                usize::MAX,
                &mut |key, value| {
                    // A gap here is retention removing old events ahead of this scan, or a
                    // store damaged on disk: either way the file would not restore.
                    let written = gaps
                        .check(key)
                        .and_then(|()| self.with_text(key, value).map_err(BackupError::from))
                        .and_then(|value| put(&mut out, key, &value));
                    match written {
                        Ok(()) => {
                            events += 1;
                            ControlFlow::Continue(())
                        }
                        Err(e) => {
                            failed = Some(e);
                            ControlFlow::Break(())
                        }
                    }
                },
            )?;
            if let Some(e) = failed.take() {
                return Err(e);
            }
            if gaps.last.is_some_and(|(_, last)| last != head) {
                return Err(BackupError::Format(format!(
                    "conversation {} ends at seq {} but its head is {}",
                    conv.0,
                    gaps.last.map_or(0, |(_, last)| last.0),
                    head.0
                )));
            }
        }
        let heads = &self.cut.heads;
        self.backend.scan_prefix(
            &[keys::CONVMSGID_SEQ],
            Order::Ascending,
            usize::MAX,
            &mut |key, value| {
                let Some(head) = keys::conversation_id(key).and_then(|c| heads.get(&c)) else {
                    return ControlFlow::Continue(());
                };
                let written = match decode::<u64>(value) {
                    Ok(seq) if seq <= head.0 => put(&mut out, key, value),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                match written {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        out.write_all(&[END]).map_err(io("writing the backup"))?;
        out.write_all(&records.to_be_bytes())
            .map_err(io("writing the backup"))?;
        let digest = out.hash.clone().finalize();
        out.inner
            .write_all(&digest)
            .and_then(|()| out.inner.flush())
            .map_err(io("writing the backup"))?;
        Ok(BackupSummary {
            epoch: self.epoch,
            records,
            conversations: self.cut.heads.len() as u64,
            events,
        })
    }
}

impl Snapshot {
    /// An event record with its text inline, read from the text log (empty if erased).
    fn with_text(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut event: StoredEvent = decode(value)?;
        if !event.body.text().is_some_and(str::is_empty) {
            return Ok(value.to_vec());
        }
        let Some((conv, seq)) = keys::conv_seq_parts(key) else {
            return Err(StoreError::Corrupt("event key".into()));
        };
        if let Some(text) = self.backend.get(&keys::text(conv, seq))? {
            let text = self.texts.read(decode::<TextRef>(&text)?)?;
            if let Some(slot) = event.body.text_mut() {
                *slot = text;
            }
        }
        postcard::to_stdvec(&event).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// Checks that the events of each conversation, in key order, are gap-free: a backup holds
/// every conversation as a gap-free run of seqs (retention may have removed its start). A
/// backup is refused rather than written with a gap, and a file with one is not restored.
#[derive(Debug, Default)]
struct Gaps {
    last: Option<(ConversationId, Seq)>,
}

impl Gaps {
    fn check(&mut self, key: &[u8]) -> Result<(), BackupError> {
        let Some((conv, seq)) = keys::conv_seq_parts(key) else {
            return Err(BackupError::Format("an event key is too short".into()));
        };
        match self.last {
            Some((last_conv, last)) if last_conv == conv && seq.0 != last.0 + 1 => {
                Err(BackupError::Format(format!(
                    "conversation {} has a gap: seq {} follows {}",
                    conv.0, seq.0, last.0
                )))
            }
            Some((last_conv, _)) if last_conv > conv => Err(BackupError::Format(format!(
                "conversation {} comes after conversation {}",
                conv.0, last_conv.0
            ))),
            _ => {
                self.last = Some((conv, seq));
                Ok(())
            }
        }
    }
}

fn write_field(out: &mut impl Write, bytes: &[u8]) -> Result<(), BackupError> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|len| *len <= MAX_FIELD)
        .ok_or_else(|| BackupError::Format(format!("a record of {} bytes", bytes.len())))?;
    out.write_all(&len.to_be_bytes())
        .and_then(|()| out.write_all(bytes))
        .map_err(io("writing the backup"))
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashingReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashingReader<R> {
    fn exact<const N: usize>(&mut self) -> Result<[u8; N], BackupError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                BackupError::Format("the file is truncated".into())
            }
            _ => BackupError::Io(format!("reading the backup: {e}")),
        })?;
        self.hash.update(&*buf);
        Ok(())
    }

    fn field(&mut self) -> Result<Vec<u8>, BackupError> {
        let len = u32::from_be_bytes(self.exact()?);
        if len > MAX_FIELD {
            return Err(BackupError::Format(format!("a record claims {len} bytes")));
        }
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf)?;
        Ok(buf)
    }
}

/// Reads a backup file, handing each record to `each`; fails unless the whole file is intact.
fn read_backup(
    path: &Path,
    mut each: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), BackupError>,
) -> Result<Header, BackupError> {
    let file = File::open(path).map_err(io(path.display()))?;
    let mut input = HashingReader {
        inner: BufReader::with_capacity(256 * 1024, file),
        hash: Sha256::new(),
    };
    if &input.exact::<8>()? != MAGIC {
        return Err(BackupError::Format(format!(
            "{} does not start like a quip backup",
            path.display()
        )));
    }
    let header: Header = postcard::from_bytes(&input.field()?)
        .map_err(|e| BackupError::Format(format!("header: {e}")))?;
    if !READABLE_SCHEMAS.contains(&header.schema) {
        return Err(BackupError::Format(format!(
            "store schema {} (this quipd reads {READABLE_SCHEMAS:?})",
            header.schema
        )));
    }
    let mut records = 0u64;
    loop {
        match input.exact::<1>()?[0] {
            RECORD => {
                let key = input.field()?;
                let value = input.field()?;
                records += 1;
                each(key, value)?;
            }
            END => break,
            other => return Err(BackupError::Format(format!("unknown record tag {other}"))),
        }
    }
    let count = u64::from_be_bytes(input.exact()?);
    let expected = input.hash.clone().finalize();
    let mut digest = [0u8; 32];
    input
        .inner
        .read_exact(&mut digest)
        .map_err(|_| BackupError::Format("the file is truncated".into()))?;
    if count != records || digest[..] != expected[..] {
        return Err(BackupError::Format(
            "the checksum does not match: the file is damaged".into(),
        ));
    }
    let mut rest = [0u8; 1];
    if input.inner.read(&mut rest).map_err(io(path.display()))? != 0 {
        return Err(BackupError::Format("bytes after the end".into()));
    }
    Ok(header)
}

/// What a restore made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The epoch of the store the backup was taken from.
    pub backup_epoch: Epoch,
    /// The restored store's epoch: always a new one.
    pub epoch: Epoch,
    pub taken_at_ms: u64,
    pub records: u64,
    pub events: u64,
    /// Records of the backup not copied because the new store makes its own: its epoch and the
    /// end of its text log.
    pub remade: u64,
}

/// Makes a new store at `store_dir` (which must not exist, or be empty) from a backup file, on
/// the engine `kind` (a backup can move a store from one engine to the other). The file is
/// checked whole before anything is written; the new store gets a new epoch.
pub fn restore(
    backup: &Path,
    store_dir: &Path,
    kind: BackendKind,
) -> Result<RestoreSummary, BackupError> {
    let occupied = std::fs::read_dir(store_dir)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(BackupError::Io(format!(
            "{} is not empty: restore makes a new store and never overwrites one",
            store_dir.display()
        )));
    }
    // Every record is read and decoded before anything is written: a damaged file (even one
    // whose checksum was made to match) leaves no half-restored store behind.
    let mut gaps = Gaps::default();
    read_backup(backup, |key, value| {
        check_record(&key, &value)?;
        if key.first() == Some(&keys::CONVSEQ_EVENT) {
            gaps.check(&key)?;
        }
        Ok(())
    })?;

    let opened = backend::open(store_dir, kind, 16 * 1024 * 1024, Arc::default())?;
    let engine = opened.backend;
    let (texts, _) = TextLog::open(store_dir, 0)?;
    let mut batch = WriteBatch::new();
    let mut records = 0u64;
    let mut events = 0u64;
    let mut remade = 0u64;
    // Texts are appended to the log and made durable before the engine batch that points at them.
    let flush = |batch: &mut WriteBatch| -> Result<(), StoreError> {
        texts.sync()?;
        batch.put_raw(keys::META_CHECKPOINT, &texts.end().to_be_bytes());
        engine.apply_durably(&mut std::mem::take(batch).iter())
    };
    let header = read_backup(backup, |key, value| {
        if key == keys::META_EPOCH || key == keys::META_TEXT_END || key == keys::META_CHECKPOINT {
            remade += 1;
            return Ok(());
        }
        records += 1;
        match keys::conv_seq_parts(&key).filter(|_| key.first() == Some(&keys::CONVSEQ_EVENT)) {
            Some((conv, seq)) => {
                events += 1;
                let mut event: StoredEvent = decode(&value)?;
                match event.body.text_mut().filter(|t| !t.is_empty()) {
                    Some(text) => {
                        let at = texts.append(text.as_bytes())?;
                        text.clear();
                        batch.put(&key, &event);
                        batch.put(&keys::text(conv, seq), &at);
                    }
                    None => batch.put_raw(&key, &value),
                }
            }
            None => batch.put_raw(&key, &value),
        }
        if batch.len() >= RESTORE_BATCH {
            flush(&mut batch)?;
        }
        Ok(())
    })?;
    let epoch = Epoch(rand::random());
    batch.put_raw(keys::META_EPOCH, &epoch.0);
    batch.put_raw(keys::META_SCHEMA, &SCHEMA_VERSION.to_be_bytes());
    flush(&mut batch)?;
    Ok(RestoreSummary {
        backup_epoch: Epoch(header.epoch),
        epoch,
        taken_at_ms: header.taken_at_ms,
        records,
        events,
        remade,
    })
}

/// Writes a snapshot to a new file: a temporary name first, fsync'd, then renamed, so that a
/// file at `path` is always a complete backup. Mode 0600: it holds user names and token hashes.
pub fn write_file(snapshot: &Snapshot, path: &Path) -> Result<BackupSummary, BackupError> {
    write_file_with(path, |file| snapshot.write_to(file))
}

/// Creates `path` through a temporary file, as [`write_file`] does, with `fill` writing it.
pub fn write_file_with<T>(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<T, BackupError>,
) -> Result<T, BackupError> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&partial).map_err(io(partial.display()))?;
    let result = fill(&mut file).and_then(|summary| {
        file.sync_all().map_err(io(partial.display()))?;
        std::fs::rename(&partial, path).map_err(io(path.display()))?;
        Ok(summary)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Checks a backup file whole and says what it holds, without restoring it.
pub fn inspect(path: &Path) -> Result<BackupSummary, BackupError> {
    let mut records = 0u64;
    let mut events = 0u64;
    let mut conversations = 0u64;
    let header = read_backup(path, |key, _| {
        records += 1;
        match key.first() {
            Some(&keys::CONVSEQ_EVENT) => events += 1,
            Some(&keys::CONV_STATE) => conversations += 1,
            _ => {}
        }
        Ok(())
    })?;
    Ok(BackupSummary {
        epoch: Epoch(header.epoch),
        records,
        conversations,
        events,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A backup file of `records`, well formed and with a valid checksum.
    fn backup_of(path: &Path, records: &[(Vec<u8>, Vec<u8>)]) {
        let mut out = HashingWriter {
            inner: File::create(path).unwrap(),
            hash: Sha256::new(),
        };
        let header = postcard::to_stdvec(&Header {
            schema: SCHEMA_VERSION,
            epoch: [7; 16],
            taken_at_ms: 1,
        })
        .unwrap();
        out.write_all(MAGIC).unwrap();
        write_field(&mut out, &header).unwrap();
        for (key, value) in records {
            out.write_all(&[RECORD]).unwrap();
            write_field(&mut out, key).unwrap();
            write_field(&mut out, value).unwrap();
        }
        out.write_all(&[END]).unwrap();
        out.write_all(&(records.len() as u64).to_be_bytes())
            .unwrap();
        let digest = out.hash.clone().finalize();
        out.inner.write_all(&digest).unwrap();
    }

    fn event(conv: u64, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let event = StoredEvent {
            sender: "alice".parse().unwrap(),
            at_ms: seq,
            body: quip_protocol::EventBody::Message {
                id: quip_protocol::ClientMessageId([seq as u8; 16]),
                text: format!("message {seq}"),
            },
        };
        (
            keys::event(ConversationId(conv), Seq(seq)).to_vec(),
            postcard::to_stdvec(&event).unwrap(),
        )
    }

    #[test]
    fn a_backup_with_a_gap_is_not_restored() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("gap.bak");
        let store = dir.path().join("store");
        backup_of(&file, &[event(1, 1), event(1, 2), event(2, 1), event(2, 3)]);
        let err = restore(&file, &store, BackendKind::Sled).unwrap_err();
        assert!(
            err.to_string()
                .contains("conversation 2 has a gap: seq 3 follows 1"),
            "{err}"
        );
        assert!(!store.exists(), "a refused backup must write nothing");

        // Retention may have removed a conversation's start: that is no gap.
        backup_of(&file, &[event(1, 4), event(1, 5), event(2, 1)]);
        let summary = restore(&file, &store, BackendKind::Sled).unwrap();
        assert_eq!(summary.events, 3);
    }

    /// A record that does not decode as its table's type is refused before anything is
    /// written, wherever it is in the file and whatever its table, even when the file's
    /// checksum was made to match it.
    #[test]
    fn a_backup_with_a_damaged_record_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("damaged.bak");
        let garbage = vec![0xff, 0xff, 0xff];
        let hash = [7u8; 32];
        for damaged in [
            keys::event(ConversationId(1), Seq(3)).to_vec(),
            keys::conversation(ConversationId(1)).to_vec(),
            keys::user(&"alice".parse().unwrap()).to_vec(),
            keys::token(&hash).to_vec(),
            keys::device(&hash).to_vec(),
            keys::message_state(ConversationId(1), Seq(1)).to_vec(),
            keys::receipt(ConversationId(1), &"alice".parse().unwrap()).to_vec(),
        ] {
            let store = dir.path().join(format!("store-{:02x}", damaged[0]));
            let mut records = vec![event(1, 1), event(1, 2)];
            records.push((damaged.clone(), garbage.clone()));
            records.sort();
            backup_of(&file, &records);
            let err = restore(&file, &store, BackendKind::Sled).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("table 0x{:02x}", damaged[0])),
                "{err}"
            );
            assert!(
                !store.exists(),
                "a refused backup wrote {}",
                store.display()
            );
        }
    }
}
