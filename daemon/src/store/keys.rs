//! The key layout. Every record lives in one sled tree, `quip`, so that one group commit is one
//! atomic sled batch across all of them; the first key byte names the table. Integers are
//! fixed-width big-endian, so sled's byte order is numeric order (a conversation's events scan
//! in seq order).
//!
//! | table                | key                                              | value                |
//! |----------------------|--------------------------------------------------|----------------------|
//! | `meta`               | `0x00` name                                      | per entry            |
//! | `convseq_event`      | `0x01` conv:u64 seq:u64                          | `StoredEvent`        |
//! | `convmsgid_seq`      | `0x02` conv:u64 msgid:[16] sender                | seq:u64              |
//! | `conv_state`         | `0x03` conv:u64                                  | `ConversationRecord` |
//! | `userconv_member`    | `0x04` len:u8 user conv:u64                      | empty                |
//! | `user_record`        | `0x05` user                                      | `UserRecord`         |
//! | `tokenhash_user`     | `0x06` sha256(credential):[32]                   | `TokenRecord`        |
//! | `credential_device`  | `0x07` sha256(credential):[32]                   | `DeviceRecord`       |
//! | `credential_lastused`| `0x08` sha256(credential):[32]                   | last_used_ms:u64     |
//! | `user_removed`       | `0x09` user                                      | removed_at_ms:u64    |
//! | `convuser_receipt`   | `0x10` conv:u64 len:u8 user                      | `ReceiptRecord`      |
//! | `convseq_state`      | `0x11` conv:u64 seq:u64                          | `MessageRecord`      |
//! | `convseq_text`       | `0x12` conv:u64 seq:u64                          | `TextRef`            |
//!
//! A credential is what identifies one device: a bearer token (its UTF-8 bytes, which start with
//! `quip_`) or a client certificate (its DER bytes, which start with `0x30`), so the two kinds
//! never hash the same input. `tokenhash_user` is what authentication reads; `credential_device`
//! adds the device's label and kind (credentials issued before it existed have none: tokens
//! without a label). A credential's id, as `quipd token list` shows it, is the first 8 bytes of its
//! hash in hex: a prefix scan of `tokenhash_user` finds it. `user_removed` keeps removed names so
//! that they are never given to someone else.
//!
//! Texts (of messages, replies and edits) are not in the engine: `convseq_event` holds the event
//! with an empty text, and `convseq_text` where its bytes are in the text log (`texts.rs`), the
//! one file the store can really erase bytes from (a delete for everyone, retention). Events
//! written before schema 2 keep their text inline.
//!
//! `convseq_event` is append-only but for retention, which removes a conversation's oldest
//! events, always below its newest; `convmsgid_seq` is append-only (ids outlive their pruned
//! messages, so a late retry is still recognised). Backups rely on both (`backup.rs`).

use quip_protocol::{ClientMessageId, ConversationId, Seq, UserName};

pub const CONVSEQ_EVENT: u8 = 0x01;
pub const CONVMSGID_SEQ: u8 = 0x02;
pub const CONV_STATE: u8 = 0x03;
pub const USERCONV_MEMBER: u8 = 0x04;
pub const USER_RECORD: u8 = 0x05;
pub const TOKENHASH_USER: u8 = 0x06;
pub const CREDENTIAL_DEVICE: u8 = 0x07;
pub const CREDENTIAL_LASTUSED: u8 = 0x08;
pub const USER_REMOVED: u8 = 0x09;
pub const CONVUSER_RECEIPT: u8 = 0x10;
pub const CONVSEQ_STATE: u8 = 0x11;
pub const CONVSEQ_TEXT: u8 = 0x12;

pub const META_EPOCH: &[u8] = b"\x00epoch";
pub const META_SCHEMA: &[u8] = b"\x00schema";
pub const META_RESET_KEY: &[u8] = b"\x00reset_key";
/// The text log's committed length, u64 big-endian, as schema 2 kept it; read only to upgrade.
pub const META_TEXT_END: &[u8] = b"\x00text_end";
/// How much of the text log the engine holds durably, u64 big-endian: the log frames after it
/// are replayed on open (`texts.rs`). Absent in a store made before the log had frames.
pub const META_CHECKPOINT: &[u8] = b"\x00checkpoint";

pub fn event(conv: ConversationId, seq: Seq) -> [u8; 17] {
    conv_seq(CONVSEQ_EVENT, conv, seq)
}

/// A `table conv:u64 seq:u64` key.
pub fn conv_seq(table: u8, conv: ConversationId, seq: Seq) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = table;
    key[1..9].copy_from_slice(&conv.0.to_be_bytes());
    key[9..].copy_from_slice(&seq.0.to_be_bytes());
    key
}

pub fn message_state(conv: ConversationId, seq: Seq) -> [u8; 17] {
    conv_seq(CONVSEQ_STATE, conv, seq)
}

pub fn text(conv: ConversationId, seq: Seq) -> [u8; 17] {
    conv_seq(CONVSEQ_TEXT, conv, seq)
}

/// The conversation and seq of a `conv_seq` key.
pub fn conv_seq_parts(key: &[u8]) -> Option<(ConversationId, Seq)> {
    let conv: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    let seq = event_seq(key)?;
    Some((ConversationId(u64::from_be_bytes(conv)), seq))
}

/// The prefix of a conversation's receipts.
pub fn receipt_prefix(conv: ConversationId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = CONVUSER_RECEIPT;
    key[1..].copy_from_slice(&conv.0.to_be_bytes());
    key
}

pub fn receipt(conv: ConversationId, user: &UserName) -> Vec<u8> {
    let name = user.as_str().as_bytes();
    let mut key = receipt_prefix(conv).to_vec();
    key.push(name.len() as u8);
    key.extend_from_slice(name);
    key
}

/// The seq of an `event` key.
pub fn event_seq(key: &[u8]) -> Option<Seq> {
    let bytes: [u8; 8] = key.get(9..17)?.try_into().ok()?;
    Some(Seq(u64::from_be_bytes(bytes)))
}

pub fn message_id(conv: ConversationId, id: ClientMessageId, sender: &UserName) -> Vec<u8> {
    let mut key = Vec::with_capacity(25 + sender.as_str().len());
    key.push(CONVMSGID_SEQ);
    key.extend_from_slice(&conv.0.to_be_bytes());
    key.extend_from_slice(&id.0);
    key.extend_from_slice(sender.as_str().as_bytes());
    key
}

/// The prefix of a conversation's `convmsgid_seq` keys.
pub fn message_id_prefix(conv: ConversationId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = CONVMSGID_SEQ;
    key[1..].copy_from_slice(&conv.0.to_be_bytes());
    key
}

pub fn conversation(conv: ConversationId) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = CONV_STATE;
    key[1..].copy_from_slice(&conv.0.to_be_bytes());
    key
}

/// The conversation id of a `conversation` key.
pub fn conversation_id(key: &[u8]) -> Option<ConversationId> {
    let bytes: [u8; 8] = key.get(1..9)?.try_into().ok()?;
    Some(ConversationId(u64::from_be_bytes(bytes)))
}

/// The prefix of a user's `userconv_member` keys: length-prefixed, so that no name is a prefix
/// of another's keys.
pub fn membership_prefix(user: &UserName) -> Vec<u8> {
    let name = user.as_str().as_bytes();
    let mut key = Vec::with_capacity(2 + name.len() + 8);
    key.push(USERCONV_MEMBER);
    key.push(name.len() as u8);
    key.extend_from_slice(name);
    key
}

pub fn membership(user: &UserName, conv: ConversationId) -> Vec<u8> {
    let mut key = membership_prefix(user);
    key.extend_from_slice(&conv.0.to_be_bytes());
    key
}

pub fn user(user: &UserName) -> Vec<u8> {
    let mut key = vec![USER_RECORD];
    key.extend_from_slice(user.as_str().as_bytes());
    key
}

pub fn token(hash: &[u8; 32]) -> [u8; 33] {
    credential(TOKENHASH_USER, hash)
}

pub fn device(hash: &[u8; 32]) -> [u8; 33] {
    credential(CREDENTIAL_DEVICE, hash)
}

pub fn last_used(hash: &[u8; 32]) -> [u8; 33] {
    credential(CREDENTIAL_LASTUSED, hash)
}

fn credential(table: u8, hash: &[u8; 32]) -> [u8; 33] {
    let mut key = [0u8; 33];
    key[0] = table;
    key[1..].copy_from_slice(hash);
    key
}

/// The credential hash of a `tokenhash_user` key.
pub fn credential_hash(key: &[u8]) -> Option<[u8; 32]> {
    key.get(1..33)?.try_into().ok()
}

pub fn user_removed(user: &UserName) -> Vec<u8> {
    let mut key = vec![USER_REMOVED];
    key.extend_from_slice(user.as_str().as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_sort_by_conversation_then_seq() {
        let a = event(ConversationId(1), Seq(255));
        let b = event(ConversationId(1), Seq(256));
        let c = event(ConversationId(2), Seq(1));
        assert!(a < b && b < c);
        assert_eq!(event_seq(&b), Some(Seq(256)));
    }

    #[test]
    fn membership_prefixes_do_not_overlap() {
        let al: UserName = "al".parse().unwrap();
        let alice: UserName = "alice".parse().unwrap();
        assert!(!membership(&alice, ConversationId(1)).starts_with(&membership_prefix(&al)));
    }
}
