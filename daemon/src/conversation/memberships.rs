//! How many conversations each user is a member of, for `limits.max_conversations_per_user`.
//!
//! Joins happen in many conversation actors at once, so the count is kept in one place and a
//! join takes its place under one short lock: two conversations adding the same user at the same
//! moment cannot both take the last place. A user's count is read from the store the first time
//! it is needed; every later change in this process goes through here. A join whose commit then
//! fails keeps its place until the daemon restarts (the conversation refuses writes anyway), so
//! the count errs on the safe side.

use std::collections::HashMap;
use std::sync::Mutex;

use quip_protocol::{ErrorBody, ErrorCode, UserName};

use super::store_error;
use crate::store::Store;

#[derive(Debug)]
pub struct Memberships {
    store: Store,
    max_per_user: usize,
    // A short std lock: held for map updates and, on a user's first use, one store scan.
    counts: Mutex<HashMap<UserName, usize>>,
}

impl Memberships {
    pub fn new(store: Store, max_per_user: usize) -> Self {
        Memberships {
            store,
            max_per_user,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more conversation for each of `users`, or for none of them if one is at the
    /// limit (`CONVERSATION_LIMIT`, naming that user).
    pub fn try_join(&self, users: &[&UserName]) -> Result<(), ErrorBody> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for user in users {
            let count = self.count(&mut counts, user)?;
            if count >= self.max_per_user {
                return Err(ErrorBody::new(
                    ErrorCode::CONVERSATION_LIMIT,
                    format!(
                        "{user} is a member of {count} conversations, the most this server allows"
                    ),
                ));
            }
        }
        for user in users {
            *counts.entry((*user).clone()).or_default() += 1;
        }
        Ok(())
    }

    /// Counts one conversation less for `user`.
    pub fn leave(&self, user: &UserName) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(count) = self.count(&mut counts, user) {
            counts.insert(user.clone(), count.saturating_sub(1));
        }
    }

    fn count(
        &self,
        counts: &mut HashMap<UserName, usize>,
        user: &UserName,
    ) -> Result<usize, ErrorBody> {
        if let Some(count) = counts.get(user) {
            return Ok(*count);
        }
        let count = self
            .store
            .user_conversations(user)
            .map_err(store_error)?
            .len();
        counts.insert(user.clone(), count);
        Ok(count)
    }
}
