//! Users and their bearer tokens. A token is shown once, when issued; the store keeps only its
//! SHA-256, so a copy of the data directory does not hand out working tokens.

use quip_protocol::{limits, UserName};
use sha2::{Digest, Sha256};

use crate::conversation::now_ms;
use crate::store::{Store, StoreError, TokenRecord, UserRecord, WriteBatch};

/// Token prefix: makes a leaked token easy to recognise (and to scan for).
const TOKEN_PREFIX: &str = "quip_";

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("invalid user name: {0}")]
    InvalidName(String),
    #[error("user {0} already exists")]
    Exists(UserName),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// User administration over the store. Additions are serialised so that two admins adding the
/// same name cannot both succeed.
#[derive(Debug)]
pub struct Accounts {
    store: Store,
    writes: tokio::sync::Mutex<()>,
}

impl Accounts {
    pub fn new(store: Store) -> Self {
        Accounts {
            store,
            writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Creates a user and returns its first bearer token, durable before this returns.
    pub async fn add_user(&self, name: &str) -> Result<(UserName, String), AccountError> {
        let user: UserName = name.parse().map_err(AccountError::InvalidName)?;
        let _serialised = self.writes.lock().await;
        if self.store.user(&user)?.is_some() {
            return Err(AccountError::Exists(user));
        }
        let token = new_token();
        let now = now_ms();
        let mut batch = WriteBatch::new();
        batch.put_user(&user, &UserRecord { created_at_ms: now });
        batch.put_token(
            &hash_token(&token),
            &TokenRecord {
                user: user.clone(),
                created_at_ms: now,
            },
        );
        self.store.commit(batch).await?;
        Ok((user, token))
    }

    /// Creates `count` users named `prefix0`, `prefix1`, ... in one durable write and returns
    /// them with their first tokens. Fails, creating none, if any of the names is taken. For
    /// provisioning load tests and bulk imports.
    pub async fn add_users(
        &self,
        prefix: &str,
        count: u32,
    ) -> Result<Vec<(UserName, String)>, AccountError> {
        let users = (0..count)
            .map(|n| format!("{prefix}{n}").parse::<UserName>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(AccountError::InvalidName)?;
        let _serialised = self.writes.lock().await;
        let now = now_ms();
        let mut batch = WriteBatch::new();
        let mut added = Vec::with_capacity(users.len());
        for user in users {
            if self.store.user(&user)?.is_some() {
                return Err(AccountError::Exists(user));
            }
            let token = new_token();
            batch.put_user(&user, &UserRecord { created_at_ms: now });
            batch.put_token(
                &hash_token(&token),
                &TokenRecord {
                    user: user.clone(),
                    created_at_ms: now,
                },
            );
            added.push((user, token));
        }
        self.store.commit(batch).await?;
        Ok(added)
    }

    pub fn users(&self) -> Result<Vec<UserName>, AccountError> {
        Ok(self.store.users()?)
    }

    /// The user a bearer token belongs to, `None` for any token that is not valid.
    pub fn authenticate(&self, token: &str) -> Result<Option<UserName>, StoreError> {
        if token.len() > limits::MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        Ok(self
            .store
            .token(&hash_token(token))?
            .map(|record| record.user))
    }
}

fn new_token() -> String {
    let secret: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(secret))
}

fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
