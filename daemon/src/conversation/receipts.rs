//! Receipt cursors of one conversation, without IO: per member, "delivered up to" and "read up
//! to", which only move forward. They are not part of the sequence (a receipt per member per
//! message would multiply it); the actor persists them beside it and shows them on every
//! member's delivery stream.

use std::collections::BTreeMap;

use quip_protocol::{ErrorBody, ErrorCode, Receipt, Seq, UserName};

use crate::store::ReceiptRecord;

/// Every member's cursors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptBoard {
    cursors: BTreeMap<UserName, ReceiptRecord>,
}

impl ReceiptBoard {
    pub fn load(records: impl IntoIterator<Item = (UserName, ReceiptRecord)>) -> Self {
        ReceiptBoard {
            cursors: records.into_iter().collect(),
        }
    }

    /// A member's cursors (0 and 0 before its first receipt).
    pub fn get(&self, user: &UserName) -> ReceiptRecord {
        self.cursors.get(user).copied().unwrap_or_default()
    }

    /// A receipt from a member: moves its cursors forward to `delivered` and `read` (reading
    /// implies delivery), never back. `head` is the last durable seq: nothing past it can have
    /// been delivered. Returns the cursors after the change, and whether they changed.
    pub fn advance(
        &mut self,
        user: &UserName,
        delivered: Seq,
        read: Seq,
        head: Seq,
    ) -> Result<(ReceiptRecord, bool), ErrorBody> {
        let furthest = delivered.max(read);
        if furthest > head {
            return Err(ErrorBody::new(
                ErrorCode::INVALID_REQUEST,
                format!("seq {furthest} is past the conversation's head {head}"),
            ));
        }
        Ok(self.advance_own(user, delivered, read))
    }

    /// Moves a member's cursors forward without the head check: for the member's own events,
    /// which it has by definition (the seq is assigned, durable with this change).
    pub fn advance_own(
        &mut self,
        user: &UserName,
        delivered: Seq,
        read: Seq,
    ) -> (ReceiptRecord, bool) {
        let before = self.get(user);
        let after = ReceiptRecord {
            delivered: before.delivered.max(delivered).max(read),
            read: before.read.max(read),
        };
        if after != before {
            self.cursors.insert(user.clone(), after);
        }
        (after, after != before)
    }

    /// The cursors of `members`, as the wire carries them, in name order.
    pub fn receipts<'a>(&self, members: impl IntoIterator<Item = &'a UserName>) -> Vec<Receipt> {
        members
            .into_iter()
            .map(|user| {
                let record = self.get(user);
                Receipt {
                    user: user.clone(),
                    delivered: record.delivered,
                    read: record.read,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn user(name: &str) -> UserName {
        name.parse().unwrap()
    }

    #[test]
    fn cursors_only_move_forward_and_reading_implies_delivery() {
        let mut board = ReceiptBoard::default();
        let bob = user("bob");
        let (r, changed) = board.advance(&bob, Seq(3), Seq(0), Seq(10)).unwrap();
        assert!(changed);
        assert_eq!((r.delivered, r.read), (Seq(3), Seq(0)));
        let (r, _) = board.advance(&bob, Seq(0), Seq(5), Seq(10)).unwrap();
        assert_eq!((r.delivered, r.read), (Seq(5), Seq(5)));
        let (r, changed) = board.advance(&bob, Seq(2), Seq(1), Seq(10)).unwrap();
        assert!(!changed, "an older receipt changes nothing");
        assert_eq!((r.delivered, r.read), (Seq(5), Seq(5)));
        let err = board.advance(&bob, Seq(11), Seq(0), Seq(10)).unwrap_err();
        assert_eq!(err.code, ErrorCode::INVALID_REQUEST);
        assert_eq!(board.get(&user("carol")), ReceiptRecord::default());
    }
}
