//! The store's log: the bytes of every message, reply and edit text, and a frame for every group
//! commit, in one file the store owns.
//!
//! Why texts are not in the engine: sled and fjall never overwrite in place. A removed or
//! replaced value lingers in their logs, segments and tables until some later compaction, so
//! "delete for everyone" could not promise that the text is gone from disk. Here a text is
//! appended once and erased in place: overwritten with zeros, fdatasync'd, and its blocks
//! released (a hole punched) where the filesystem supports it. The engine keeps only where a
//! text is (`convseq_text`, see `keys.rs`).
//!
//! Why commits are framed here. A group commit is durable, and acknowledged, once its frame is
//! fdatasync'd: the frame holds the commit's texts and every engine write of the commit. Only
//! then are the writes handed to the engine, which makes them durable at its own pace, at a
//! checkpoint (`backend.rs`); the engine records in `META_CHECKPOINT` how much of the log it had
//! made durable. On open the store replays the frames after that point, so whatever an engine
//! lost or tore when a write failed or the process died comes back whole, and a write that
//! never reached its frame's fdatasync never reaches the engine at all. One fdatasync per group
//! commit, texts or not.
//!
//! Frame layout, integers big-endian: a 32-byte header, the texts, the payload.
//!
//! | bytes  | field                                                             |
//! |--------|-------------------------------------------------------------------|
//! | 0..4   | magic `QTF1`                                                      |
//! | 4..8   | texts length                                                      |
//! | 8..12  | payload length                                                    |
//! | 12..16 | zero                                                              |
//! | 16..24 | xxh3-64 of the texts                                              |
//! | 24..32 | xxh3-64 of bytes 0..24 and the payload                            |
//!
//! The payload: op count:u32, per op `0x01` key len:u32 key value len:u32 value (a put) or
//! `0x00` key len:u32 key (a remove); then erased count:u32, per erased text offset:u64 len:u32.
//!
//! Torn frames. A frame whose header or payload does not match its hash is where the log ends:
//! it, and anything after it, is cut on open. Texts are hashed separately because an erasure
//! later zeroes a text inside an older frame: a frame followed by a whole frame was durable
//! before that one was written, so a text hash that no longer matches there is an erasure; in
//! the last frame it is a tear, and that frame is cut too (it was never acknowledged). An
//! erasure is done only after the frame that records it is durable, so the last whole frame
//! never holds an erased text.
//!
//! Only the store writer thread writes (frames and erasures); readers read at offsets the
//! engine made visible, which are durable and never move.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::backend::Op;
use super::StoreError;

/// The file in the store directory.
const FILE: &str = "texts";
const FRAME_MAGIC: [u8; 4] = *b"QTF1";
/// Bytes of a frame header; the texts of a frame start this far after it.
pub const FRAME_HEADER: u64 = 32;

/// Where one text is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextRef {
    pub offset: u64,
    pub len: u32,
}

impl TextRef {
    /// The offset just past the text.
    fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// Most bytes that one read of [`TextLog::read_many`] spans.
const MAX_READ_SPAN: u64 = 256 * 1024;

/// A group commit as its frame holds it: the engine writes, and the texts it erased.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub erased: Vec<TextRef>,
}

impl Frame {
    /// The payload of a frame holding `ops` and `erased`.
    pub fn encode<'a>(ops: impl Iterator<Item = Op<'a>>, erased: &[TextRef]) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        let mut count = 0u32;
        for (key, value) in ops {
            count += 1;
            out.push(u8::from(value.is_some()));
            put_field(&mut out, key);
            if let Some(value) = value {
                put_field(&mut out, value);
            }
        }
        out[..4].copy_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&(erased.len() as u32).to_be_bytes());
        for text in erased {
            out.extend_from_slice(&text.offset.to_be_bytes());
            out.extend_from_slice(&text.len.to_be_bytes());
        }
        out
    }

    pub fn decode(mut bytes: &[u8]) -> Result<Frame, StoreError> {
        let corrupt = || StoreError::Corrupt("a log frame's payload does not parse".into());
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            if bytes.len() < n {
                return Err(corrupt());
            }
            let (head, rest) = bytes.split_at(n);
            bytes = rest;
            Ok(head)
        };
        let u32_of = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap_or_default());
        let mut frame = Frame::default();
        let ops = u32_of(take(4)?);
        for _ in 0..ops {
            let put = match take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(corrupt()),
            };
            let len = u32_of(take(4)?) as usize;
            let key = take(len)?.to_vec();
            let value = if put {
                let len = u32_of(take(4)?) as usize;
                Some(take(len)?.to_vec())
            } else {
                None
            };
            frame.ops.push((key, value));
        }
        let erased = u32_of(take(4)?);
        for _ in 0..erased {
            let offset = u64::from_be_bytes(take(8)?.try_into().unwrap_or_default());
            let len = u32_of(take(4)?);
            frame.erased.push(TextRef { offset, len });
        }
        if !bytes.is_empty() {
            return Err(corrupt());
        }
        Ok(frame)
    }
}

fn put_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn header(texts: &[u8], payload: &[u8]) -> [u8; FRAME_HEADER as usize] {
    let mut header = [0u8; FRAME_HEADER as usize];
    header[..4].copy_from_slice(&FRAME_MAGIC);
    header[4..8].copy_from_slice(&(texts.len() as u32).to_be_bytes());
    header[8..12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    header[16..24].copy_from_slice(&xxh3_64(texts).to_be_bytes());
    let check = header_check(&header, payload);
    header[24..].copy_from_slice(&check.to_be_bytes());
    header
}

fn header_check(header: &[u8; FRAME_HEADER as usize], payload: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&header[..24]);
    hasher.update(payload);
    hasher.digest()
}

#[derive(Debug)]
pub struct TextLog {
    file: File,
    /// The end of the log: of the last frame written (or of the texts a restore appended).
    end: AtomicU64,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("text log: {what}: {e}"))
}

/// A frame found on open.
struct Found {
    at: u64,
    len: u64,
    texts_match: bool,
    frame: Frame,
}

impl TextLog {
    /// Opens (or creates) the log in `dir`. `checkpoint` is how much of it the engine holds
    /// durably; returns the frames after that point, for the store to replay, and cuts the log
    /// after the last whole frame.
    pub fn open(dir: &Path, checkpoint: u64) -> Result<(TextLog, Vec<Frame>), StoreError> {
        let path = dir.join(FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("opening"))?;
        let len = file.metadata().map_err(io("reading its length"))?.len();
        if len < checkpoint {
            return Err(StoreError::Corrupt(format!(
                "the text log is {len} bytes, but the engine holds commits up to byte \
                 {checkpoint} of it"
            )));
        }
        let mut found = Vec::new();
        let mut at = checkpoint;
        while let Some(frame) = read_frame(&file, at, len)? {
            at += frame.len;
            found.push(frame);
        }
        if found.last().is_some_and(|last| !last.texts_match) {
            if let Some(torn) = found.pop() {
                at = torn.at;
            }
        }
        if len > at {
            tracing::warn!(
                bytes = len - at,
                "cutting an unfinished commit off the end of the text log"
            );
            file.set_len(at)
                .map_err(io("cutting an unfinished commit"))?;
            file.sync_all().map_err(io("fsync"))?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync of the store directory"))?;
        let log = TextLog {
            file,
            end: AtomicU64::new(at),
        };
        Ok((log, found.into_iter().map(|f| f.frame).collect()))
    }

    /// The end of the log.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    /// Where the texts of the next frame start.
    pub fn next_texts_at(&self) -> u64 {
        self.end() + FRAME_HEADER
    }

    /// Appends a frame of `texts` and `payload` and fdatasyncs it; returns its length. On a
    /// failure the log is cut back to where the frame began (as far as the disk lets us), so
    /// that the bytes of a commit that failed are not left to reach the disk later.
    pub fn append_frame(&self, texts: &[u8], payload: &[u8]) -> Result<u64, StoreError> {
        let at = self.end();
        if u32::try_from(texts.len()).is_err() || u32::try_from(payload.len()).is_err() {
            return Err(StoreError::Io(format!(
                "a group commit of {} bytes of text and {} of writes",
                texts.len(),
                payload.len()
            )));
        }
        let header = header(texts, payload);
        let mut frame = Vec::with_capacity(header.len() + texts.len() + payload.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(texts);
        frame.extend_from_slice(payload);
        let written = self
            .file
            .write_all_at(&frame, at)
            .map_err(io("appending a commit"))
            .and_then(|()| self.sync());
        if let Err(e) = written {
            if let Err(cut) = self.file.set_len(at) {
                tracing::error!(error = %cut, "cannot cut the failed commit off the text log");
            }
            return Err(e);
        }
        let frame_len = frame.len() as u64;
        self.end.store(at + frame_len, Ordering::Release);
        Ok(frame_len)
    }

    /// Appends `bytes` outside any frame (not yet durable: see [`TextLog::sync`]): for a
    /// restore, which records the end in the engine's checkpoint itself. Writer thread only.
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
        self.read_many(&[text])?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("a text read returned nothing".into()))
    }

    /// The texts at `texts`, in their order. Texts that lie near each other in the log (the
    /// usual case: a conversation's messages were committed one after another) are read with
    /// one `pread` per run of at most [`MAX_READ_SPAN`] bytes instead of one each; what lies
    /// between them (frame headers, engine writes, other conversations' texts) is read along.
    pub fn read_many(&self, texts: &[TextRef]) -> Result<Vec<String>, StoreError> {
        let end = self.end();
        let mut out = Vec::with_capacity(texts.len());
        let mut span = Vec::new();
        let mut rest = texts;
        while let Some(first) = rest.first() {
            let start = first.offset;
            let mut span_end = first.end();
            let run = 1 + rest[1..]
                .iter()
                .take_while(|t| {
                    let fits = t.offset >= start && t.end().max(span_end) - start <= MAX_READ_SPAN;
                    if fits {
                        span_end = span_end.max(t.end());
                    }
                    fits
                })
                .count();
            if span_end > end {
                return Err(StoreError::Corrupt(format!(
                    "a text ending at byte {span_end} is past the end of the text log ({end})"
                )));
            }
            span.resize((span_end - start) as usize, 0);
            self.file
                .read_exact_at(&mut span, start)
                .map_err(io("reading"))?;
            for text in &rest[..run] {
                let at = (text.offset - start) as usize;
                let bytes = span[at..at + text.len as usize].to_vec();
                let text = String::from_utf8(bytes)
                    .map_err(|_| StoreError::Corrupt("a text is not UTF-8".into()))?;
                out.push(text);
            }
            rest = &rest[run..];
        }
        Ok(out)
    }
}

/// The whole frame at `at` of a log of `len` bytes, or `None` where the log ends (a torn frame
/// included).
fn read_frame(file: &File, at: u64, len: u64) -> Result<Option<Found>, StoreError> {
    let mut header = [0u8; FRAME_HEADER as usize];
    if at + FRAME_HEADER > len {
        return Ok(None);
    }
    file.read_exact_at(&mut header, at)
        .map_err(io("reading a frame"))?;
    let field = |range: std::ops::Range<usize>| {
        u32::from_be_bytes(header[range].try_into().unwrap_or_default())
    };
    let (texts_len, payload_len) = (u64::from(field(4..8)), u64::from(field(8..12)));
    let frame_len = FRAME_HEADER + texts_len + payload_len;
    if header[..4] != FRAME_MAGIC || at + frame_len > len {
        return Ok(None);
    }
    let mut body = vec![0u8; (texts_len + payload_len) as usize];
    file.read_exact_at(&mut body, at + FRAME_HEADER)
        .map_err(io("reading a frame"))?;
    let (texts, payload) = body.split_at(texts_len as usize);
    let check = u64::from_be_bytes(header[24..].try_into().unwrap_or_default());
    if header_check(&header, payload) != check {
        return Ok(None);
    }
    let texts_hash = u64::from_be_bytes(header[16..24].try_into().unwrap_or_default());
    Ok(Some(Found {
        at,
        len: frame_len,
        texts_match: xxh3_64(texts) == texts_hash,
        frame: Frame::decode(payload)?,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn frame_with(ops: &[(&[u8], Option<&[u8]>)], erased: &[TextRef]) -> Vec<u8> {
        Frame::encode(ops.iter().copied(), erased)
    }

    #[test]
    fn frames_round_trip_and_are_found_again_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (log, frames) = TextLog::open(dir.path(), 0).unwrap();
        assert!(frames.is_empty());
        let first = frame_with(&[(b"k1", Some(b"v1")), (b"k2", None)], &[]);
        let text_at = log.next_texts_at();
        log.append_frame(b"hello", &first).unwrap();
        let checkpoint = log.end();
        let erased = [TextRef {
            offset: text_at,
            len: 5,
        }];
        let second = frame_with(&[(b"k3", Some(b""))], &erased);
        log.append_frame(b"", &second).unwrap();
        assert_eq!(
            log.read(TextRef {
                offset: text_at,
                len: 5
            })
            .unwrap(),
            "hello"
        );
        drop(log);

        let (_, all) = TextLog::open(dir.path(), 0).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].ops,
            vec![
                (b"k1".to_vec(), Some(b"v1".to_vec())),
                (b"k2".to_vec(), None)
            ]
        );
        assert_eq!(all[1].erased, erased.to_vec());
        let (_, after) = TextLog::open(dir.path(), checkpoint).unwrap();
        assert_eq!(after, vec![all[1].clone()]);
    }

    #[test]
    fn texts_read_together_come_back_whole_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = TextLog::open(dir.path(), 0).unwrap();
        let mut written = Vec::new();
        // Neighbours, a commit far past the read span, texts in one frame, an empty text.
        for (i, texts) in [
            vec!["héllo", "wörld"],
            vec![
                "x".repeat(MAX_READ_SPAN as usize + 10).as_str(),
                "after the big one",
            ],
            vec!["", "👋"],
        ]
        .iter()
        .enumerate()
        {
            let mut at = log.next_texts_at();
            let joined: String = texts.concat();
            for text in texts {
                written.push((
                    TextRef {
                        offset: at,
                        len: text.len() as u32,
                    },
                    text.to_string(),
                ));
                at += text.len() as u64;
            }
            log.append_frame(joined.as_bytes(), &frame_with(&[(&[i as u8], None)], &[]))
                .unwrap();
        }
        let all: Vec<TextRef> = written.iter().map(|(r, _)| *r).collect();
        let expected: Vec<String> = written.iter().map(|(_, t)| t.clone()).collect();
        assert_eq!(log.read_many(&all).unwrap(), expected);
        // Out of log order (a conversation's texts need not be in offset order).
        let reversed: Vec<TextRef> = all.iter().rev().copied().collect();
        let mut expected_reversed = expected.clone();
        expected_reversed.reverse();
        assert_eq!(log.read_many(&reversed).unwrap(), expected_reversed);
        assert_eq!(log.read_many(&[]).unwrap(), Vec::<String>::new());
        // A place past the end is corruption, not a short read.
        let past = TextRef {
            offset: log.end() - 2,
            len: 3,
        };
        assert!(matches!(
            log.read_many(&[all[0], past]),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_torn_last_frame_is_cut_and_an_erased_text_in_an_earlier_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = TextLog::open(dir.path(), 0).unwrap();
        let text = TextRef {
            offset: log.next_texts_at(),
            len: 11,
        };
        log.append_frame(b"secret text", &frame_with(&[(b"a", Some(b"1"))], &[]))
            .unwrap();
        log.append_frame(b"", &frame_with(&[(b"b", None)], &[text]))
            .unwrap();
        log.erase(text).unwrap();
        log.sync().unwrap();
        log.release(text);
        let whole = log.end();
        // A third frame whose texts never reached the disk: header and payload whole.
        let third_at = log.end();
        log.append_frame(b"lost", &frame_with(&[(b"c", Some(b"3"))], &[]))
            .unwrap();
        let texts_at = third_at + FRAME_HEADER;
        log.file.write_all_at(b"\0\0\0\0", texts_at).unwrap();
        // And bytes of a fourth that stopped half way.
        log.file.write_all_at(b"QTF1\0\0", log.end()).unwrap();
        drop(log);

        let on_disk = std::fs::read(dir.path().join(FILE)).unwrap();
        assert!(!on_disk.windows(6).any(|w| w == b"secret"));
        let (log, frames) = TextLog::open(dir.path(), 0).unwrap();
        assert_eq!(frames.len(), 2, "the frame with the erased text is kept");
        assert_eq!(log.end(), whole);
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE)).unwrap().len(),
            whole
        );
        assert!(TextLog::open(dir.path(), whole + 1).is_err());
    }

    #[test]
    fn a_frame_with_a_damaged_payload_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = TextLog::open(dir.path(), 0).unwrap();
        log.append_frame(b"one", &frame_with(&[(b"a", Some(b"1"))], &[]))
            .unwrap();
        let second = log.end();
        log.append_frame(b"two", &frame_with(&[(b"b", Some(b"2"))], &[]))
            .unwrap();
        log.append_frame(b"three", &frame_with(&[(b"c", Some(b"3"))], &[]))
            .unwrap();
        let end = log.end();
        log.file.write_all_at(b"X", end - 1).unwrap();
        drop(log);
        let (log, frames) = TextLog::open(dir.path(), 0).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(log.end() > second && log.end() < end);
    }
}
