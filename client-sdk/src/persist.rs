//! The optional state file: cursors and unacknowledged sends, so an app restart resumes too.
//!
//! Written atomically (a temporary file, fsync, rename) and coalesced: many changes in quick
//! succession cost one write. A crash loses at most the changes of the last few milliseconds;
//! the server's dedupe makes re-sending an already stored message harmless.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use quip_protocol::{ConversationId, Position};
use serde::{Deserialize, Serialize};

use crate::outbox::OutboxEntry;
use crate::ClientError;

/// What the state file holds.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Per conversation, the last seq the app was given, with its store epoch.
    pub cursors: BTreeMap<ConversationId, Position>,
    /// Sends not yet acknowledged, oldest first.
    pub outbox: Vec<OutboxEntry>,
}

impl SavedState {
    /// Reads the file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<SavedState, ClientError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ClientError::Config(format!("state file {} is unreadable: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SavedState::default()),
            Err(e) => Err(ClientError::Config(format!(
                "state file {}: {e}",
                path.display()
            ))),
        }
    }

    /// Replaces the file with this state, atomically.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = temporary_path(path);
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quip_protocol::{ClientMessageId, Epoch, Seq};

    #[test]
    fn round_trips_and_missing_is_empty() {
        let dir = std::env::temp_dir().join(format!("quip-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let _ = std::fs::remove_file(&path);
        assert_eq!(SavedState::load(&path).unwrap(), SavedState::default());
        let mut state = SavedState::default();
        state.cursors.insert(
            ConversationId(3),
            Position {
                epoch: Epoch([7; 16]),
                seq: Seq(42),
            },
        );
        state.outbox.push(OutboxEntry::message(
            ConversationId(3),
            ClientMessageId([1; 16]),
            "pending ✓",
        ));
        state.outbox.push(OutboxEntry {
            conv: ConversationId(3),
            id: ClientMessageId([2; 16]),
            text: String::new(),
            action: crate::outbox::Action::React {
                target: Seq(4),
                emoji: "👍".into(),
            },
        });
        state.save(&path).unwrap();
        assert_eq!(SavedState::load(&path).unwrap(), state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_file_from_before_actions_reads_as_messages() {
        let old = r#"{"cursors":{},"outbox":[{"conv":3,"id":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"text":"hi"}]}"#;
        let state: SavedState = serde_json::from_str(old).unwrap();
        assert_eq!(state.outbox[0].action, crate::outbox::Action::Message);
    }
}
