//! The ephemeral plane as the SDK hands it to an app: typing and presence events decoded from
//! the server's DATAGRAMs. They may be lost; see `TypingTracker` and `Client::presence`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quip_protocol::{decode_datagram, ConversationId, PresenceInfo, ServerDatagram, UserName};
use tokio::sync::broadcast;

/// Events buffered per listener; a listener further behind loses the oldest (they are stale).
pub(crate) const EPHEMERAL_BUFFER: usize = 1024;

/// One typing or presence event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EphemeralEvent {
    /// `user` is typing in `conv`; show it until the TTL (see `TypingTracker`).
    Typing {
        conv: ConversationId,
        user: UserName,
    },
    /// `user` stopped typing in `conv`, or sent a message there.
    StoppedTyping {
        conv: ConversationId,
        user: UserName,
    },
    /// The presence of a contact changed.
    Presence(PresenceInfo),
}

/// The latest presence version seen per user: a reordered, older datagram is not passed on.
pub(crate) type PresenceVersions = Arc<Mutex<HashMap<UserName, u64>>>;

/// Keeps `info` unless a newer version of that user's presence was already seen.
pub(crate) fn newer(versions: &PresenceVersions, info: &PresenceInfo) -> bool {
    let mut versions = versions.lock().unwrap_or_else(|e| e.into_inner());
    let seen = versions.entry(info.user.clone()).or_insert(0);
    if info.version <= *seen && info.version != 0 {
        return false;
    }
    *seen = (*seen).max(info.version);
    true
}

/// Reads the server's datagrams until the connection ends. Undecodable ones are counted and
/// dropped: a newer server may send kinds this client does not know.
pub(crate) async fn read_datagrams(
    conn: quinn::Connection,
    events: broadcast::Sender<EphemeralEvent>,
    versions: PresenceVersions,
    malformed: Arc<AtomicU64>,
) {
    while let Ok(payload) = conn.read_datagram().await {
        let event = match decode_datagram::<ServerDatagram>(&payload) {
            Ok(ServerDatagram::Typing { conv, user }) => EphemeralEvent::Typing { conv, user },
            Ok(ServerDatagram::StoppedTyping { conv, user }) => {
                EphemeralEvent::StoppedTyping { conv, user }
            }
            Ok(ServerDatagram::Presence(info)) => {
                if !newer(&versions, &info) {
                    continue;
                }
                EphemeralEvent::Presence(info)
            }
            Err(_) => {
                malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        // No listener is fine: nobody is watching right now.
        let _ = events.send(event);
    }
}

/// A listener's stream of typing and presence events, from the moment it was made, across
/// reconnects.
#[derive(Debug)]
pub struct EphemeralEvents {
    pub(crate) events: broadcast::Receiver<EphemeralEvent>,
}

impl EphemeralEvents {
    /// The next event; `None` once the client is gone. Events this listener was too slow for
    /// are skipped.
    pub async fn next(&mut self) -> Option<EphemeralEvent> {
        loop {
            match self.events.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
