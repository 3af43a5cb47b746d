//! quip-client: the async Rust SDK for quip.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quip_client::ClientError> {
//! use quip_client::{Client, ClientConfig};
//! let config = ClientConfig::from_ca_file("127.0.0.1:4433", "quip-data/certs/ca.pem", "quip_…")?;
//! let client = Client::connect(config).await?;
//! let conv = client.create_conversation("lunch", &["bob".parse().unwrap()]).await?;
//! let sent = client.send(conv, "hello").await?;
//! println!("stored at seq {}", sent.seq);
//! # Ok(()) }
//! ```
//!
//! A [`Client`] keeps one QUIC connection and replaces it by itself when it is lost: it
//! reconnects with backoff, resumes every subscription from the last seq it handed to the app,
//! and re-sends every unacknowledged message with its original id, so the app sees no gap and no
//! duplicate. Requests may be issued concurrently from many tasks; sends are written in the
//! order [`Client::send`] is *called*, so a sender's messages keep their order even when their
//! acks are awaited together, and across reconnects.
//!
//! Edits, deletes, reactions and replies are events in the conversation's sequence that point
//! at the seq they change; [`Timeline`] folds them into the current state of each message, the
//! way SPEC.md describes. Receipts ([`Receipt`]) come on the subscription too
//! ([`Subscription::next_update`]), outside the sequence.
//!
//! Typing and presence travel as QUIC DATAGRAMs and may be lost: [`Client::typing`] repeats
//! while the user types, [`TypingTracker`] expires indicators by their TTL, and
//! [`Client::presence`] asks for a reliable snapshot to start from.

pub mod bench;
mod client;
mod config;
mod ephemeral;
mod error;
mod outbox;
mod persist;
mod retry;
mod subscription;
mod timeline;
mod typing;

pub use client::{Client, Page, Resumed, Sent, Status};
pub use config::{ClientConfig, ClientIdentity};
pub use ephemeral::{EphemeralEvent, EphemeralEvents};
pub use error::ClientError;
pub use outbox::{Action, OutboxEntry};
pub use persist::SavedState;
pub use quip_protocol::limits;
pub use quip_protocol::{
    ClientMessageId, ConversationId, ConversationSummary, Epoch, ErrorBody, ErrorCode, Event,
    EventBody, InboxEntry, MessageState, Position, PresenceInfo, PresenceState, Reaction, Receipt,
    Seq, StartAt, UserName,
};
pub use subscription::{Origin, Subscription, Update};
pub use timeline::{MessageView, Timeline};
pub use typing::{TypingChange, TypingTracker};
