//! Identifier newtypes. Each has one meaning, so a `Seq` cannot be passed where a
//! `ConversationId` is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A conversation, assigned by the daemon when the conversation is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConversationId(pub u64);

/// A position in one conversation's sequence. The first event of a conversation has seq 1; seq 0
/// means "before the first event".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// The position before any event.
    pub const ZERO: Seq = Seq(0);

    /// The seq that follows this one.
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

/// Chosen by the client for every request on the control stream and echoed in the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A client-generated id for one message, random and unique per sender. A retried send carries
/// the same id, and the daemon answers it with the seq it stored the first time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientMessageId(pub [u8; 16]);

/// The identity of one store. It changes when a store is created anew (wiped, or restored from
/// elsewhere), which tells a client that its cursors no longer apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Epoch(pub [u8; 16]);

/// A user's name: 1 to 32 bytes of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or digit.
/// Names are the identity users see and the identity on the wire.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserName(pub String);

impl UserName {
    /// The longest valid name, in bytes.
    pub const MAX_LEN: usize = 32;

    /// Checks the name's syntax, saying what is wrong with it.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.0.as_str();
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err(format!(
                "user name must be 1 to {} bytes, got {}",
                Self::MAX_LEN,
                name.len()
            ));
        }
        let first_ok =
            name.as_bytes()[0].is_ascii_lowercase() || name.as_bytes()[0].is_ascii_digit();
        let rest_ok = name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
        if !first_ok || !rest_ok {
            return Err(format!(
                "user name {name:?} may hold only a-z, 0-9, '.', '_', '-' and must start with a letter or digit"
            ));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UserName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = UserName(s.to_owned());
        name.validate()?;
        Ok(name)
    }
}

// Identifiers display through their inner value's `Display`, so that widths and alignment
// (`{:<20}` in a table) apply to them as to any string or number.
impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for ConversationId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(ConversationId)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

fn parse_hex16(s: &str) -> Result<[u8; 16], String> {
    if s.len() != 32 || !s.is_ascii() {
        return Err(format!("expected 32 hex digits, got {s:?}"));
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("expected 32 hex digits, got {s:?}"))?;
    }
    Ok(out)
}

impl fmt::Display for ClientMessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl FromStr for ClientMessageId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex16(s).map(ClientMessageId)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl FromStr for Epoch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex16(s).map(Epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["alice", "bob-2", "a", "0x.y_z", &"a".repeat(32)] {
            assert!(ok.parse::<UserName>().is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "-bob", "al ice", "é", &"a".repeat(33), ".x"] {
            assert!(bad.parse::<UserName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_take_widths_like_strings_and_numbers() {
        let row = format!(
            "{:<8}|{:>4}|{:<3}|",
            UserName("bob".into()),
            ConversationId(7),
            Seq(42)
        );
        assert_eq!(row, "bob     |   7|42 |");
    }

    #[test]
    fn hex_ids_round_trip() {
        let id = ClientMessageId([0xab; 16]);
        assert_eq!(id.to_string(), "ab".repeat(16));
        assert_eq!(id.to_string().parse::<ClientMessageId>(), Ok(id));
        assert!("abc".parse::<Epoch>().is_err());
        assert!("zz".repeat(16).parse::<Epoch>().is_err());
    }
}
