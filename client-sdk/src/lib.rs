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
//! Typing and presence travel as QUIC DATAGRAMs and may be lost: [`Client::typing`] repeats
//! while the user types, [`TypingTracker`] expires indicators by their TTL, and
//! [`Client::presence`] asks for a reliable snapshot to start from.
//!
//! One [`Client`] is one QUIC connection. Requests may be issued concurrently from many tasks;
//! sends are written to the server in the order [`Client::send`] is *called*, so a sender's
//! messages keep their order even when their acks are awaited together.

mod client;
mod config;
mod ephemeral;
mod error;
mod subscription;
mod typing;

pub use client::{Client, Sent};
pub use config::ClientConfig;
pub use ephemeral::{EphemeralEvent, EphemeralEvents};
pub use error::ClientError;
pub use quip_protocol::limits;
pub use quip_protocol::{
    ClientMessageId, ConversationId, ConversationSummary, Epoch, ErrorBody, ErrorCode, Event,
    EventBody, Position, PresenceInfo, PresenceState, Seq, StartAt, UserName,
};
pub use subscription::Subscription;
pub use typing::{TypingChange, TypingTracker};
