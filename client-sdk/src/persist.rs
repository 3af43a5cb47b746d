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
    /// Reads the file; a missing file is an empty state. An empty or unreadable file is an
    /// error that says how to get going again, never silently an empty state: it may hold
    /// sends that were never acknowledged.
    pub fn load(path: &Path) -> Result<SavedState, ClientError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SavedState::default()),
            Err(e) => {
                return Err(ClientError::Config(format!(
                    "state file {}: {e}",
                    path.display()
                )))
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ClientError::Config(format!(
                "state file {} is empty; it holds nothing: remove it and run again (quip \
                 writes a new one)",
                path.display()
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::Config(format!(
                "state file {} is not a quip state file ({e}); move it aside and run again to \
                 start afresh (the unacknowledged sends it may hold are then not re-sent)",
                path.display()
            ))
        })
    }

    /// Reads the file of a client that starts: [`SavedState::load`], and an error if the
    /// directory it is to be written in does not exist.
    pub fn open(path: &Path) -> Result<SavedState, ClientError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(ClientError::Config(format!(
                    "state file {}: the directory {} does not exist",
                    path.display(),
                    dir.display()
                )));
            }
        }
        Self::load(path)
    }

    /// Replaces the file with this state, atomically. Mode 0600: it holds message texts.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = temporary_path(path);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        // A temporary file left behind by a crash keeps its old mode through `open`.
        #[cfg(unix)]
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
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

    #[test]
    fn the_file_is_private_and_bad_files_say_how_to_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        // A temporary file left behind with a looser mode does not keep it.
        std::fs::write(temporary_path(&path), b"{}").unwrap();
        SavedState::default().save(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");

        std::fs::write(&path, b"").unwrap();
        let empty = SavedState::load(&path).unwrap_err().to_string();
        assert!(
            empty.contains("is empty") && empty.contains("remove it"),
            "{empty}"
        );
        std::fs::write(&path, b"{\"cursors\": [").unwrap();
        let corrupt = SavedState::load(&path).unwrap_err().to_string();
        assert!(corrupt.contains("move it aside"), "{corrupt}");

        let nowhere = dir.path().join("missing").join("state.json");
        let missing = SavedState::open(&nowhere).unwrap_err().to_string();
        assert!(missing.contains("does not exist"), "{missing}");
    }
}
