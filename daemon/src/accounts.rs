//! Users and their devices. A device is one credential: a bearer token, shown once when issued,
//! or a client certificate issued from the deployment's CA. The store keeps only the SHA-256 of
//! a credential, so a copy of the data directory does not hand out working tokens; a
//! credential's id (what `quipd token list` shows and `revoke` takes) is the first 8 bytes of
//! that hash, in hex.

use quip_protocol::{limits, UserName};
use sha2::{Digest, Sha256};

use crate::connected::CredentialHash;
use crate::conversation::now_ms;
use crate::store::{
    Credential, CredentialKind, DeviceRecord, Store, StoreError, TokenRecord, UserRecord,
    WriteBatch,
};

/// Token prefix: makes a leaked token easy to recognise (and to scan for).
const TOKEN_PREFIX: &str = "quip_";
/// Longest device label, in bytes.
pub const MAX_LABEL_LEN: usize = 64;
/// Hex digits of a credential id.
const ID_LEN: usize = 16;
/// A credential's last use is written at most this often (it costs a store write).
const LAST_USED_GRANULARITY_MS: u64 = 60 * 60 * 1000;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("invalid user name: {0}")]
    InvalidName(String),
    #[error("user {0} already exists")]
    Exists(UserName),
    #[error("user {0} was removed; names of removed users are not given out again")]
    Removed(UserName),
    #[error("no user named {0}")]
    NoSuchUser(UserName),
    #[error("invalid device label: {0}")]
    InvalidLabel(String),
    #[error("no token or certificate has the id {0:?}: it was never issued, or is already revoked (see `quipd token list`)")]
    NoSuchCredential(String),
    #[error("this certificate is already registered as {0}")]
    CertificateExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A token just issued: shown once, never again.
#[derive(Debug, Clone)]
pub struct Issued {
    pub user: UserName,
    pub id: String,
    pub token: String,
}

/// User administration over the store. Writes are serialised so that two admins adding the
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
        self.check_new(&user)?;
        let mut batch = WriteBatch::new();
        let now = now_ms();
        batch.put_user(&user, &UserRecord { created_at_ms: now });
        let issued = self.new_token(&user, "", now, &mut batch)?;
        self.store.commit(batch).await?;
        Ok((user, issued.token))
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
            self.check_new(&user)?;
            batch.put_user(&user, &UserRecord { created_at_ms: now });
            let issued = self.new_token(&user, "", now, &mut batch)?;
            added.push((user, issued.token));
        }
        self.store.commit(batch).await?;
        Ok(added)
    }

    fn check_new(&self, user: &UserName) -> Result<(), AccountError> {
        if self.store.user(user)?.is_some() {
            return Err(AccountError::Exists(user.clone()));
        }
        if self.store.user_removed(user)?.is_some() {
            return Err(AccountError::Removed(user.clone()));
        }
        Ok(())
    }

    pub fn users(&self) -> Result<Vec<UserName>, AccountError> {
        Ok(self.store.users()?)
    }

    /// Issues another token for `user`, for the device named `label`.
    pub async fn issue_token(&self, user: &str, label: &str) -> Result<Issued, AccountError> {
        let user = self.existing(user)?;
        let _serialised = self.writes.lock().await;
        let mut batch = WriteBatch::new();
        let issued = self.new_token(&user, label, now_ms(), &mut batch)?;
        self.store.commit(batch).await?;
        Ok(issued)
    }

    /// Registers a client certificate (its DER bytes) as a device of `user`: from now on the
    /// certificate authenticates that device, until it is revoked like a token.
    pub async fn register_certificate(
        &self,
        user: &str,
        label: &str,
        der: &[u8],
        not_after_ms: Option<u64>,
    ) -> Result<String, AccountError> {
        let user = self.existing(user)?;
        check_label(label)?;
        let hash = hash_credential(der);
        let _serialised = self.writes.lock().await;
        if self.store.token(&hash)?.is_some() {
            return Err(AccountError::CertificateExists(credential_id(&hash)));
        }
        let now = now_ms();
        let mut batch = WriteBatch::new();
        batch.put_token(
            &hash,
            &TokenRecord {
                user,
                created_at_ms: now,
            },
        );
        batch.put_device(
            &hash,
            &DeviceRecord {
                kind: CredentialKind::Certificate,
                label: label.to_owned(),
                not_after_ms,
            },
        );
        self.store.commit(batch).await?;
        Ok(credential_id(&hash))
    }

    /// Every device credential, or those of one user, in id order.
    pub fn credentials(&self, user: Option<&str>) -> Result<Vec<Credential>, AccountError> {
        let user = user.map(|name| self.existing(name)).transpose()?;
        let mut all = self.store.credentials(&[])?;
        if let Some(user) = user {
            all.retain(|c| c.token.user == user);
        }
        Ok(all)
    }

    /// Deletes the credential with this id, durably: it authenticates nobody from now on.
    /// The caller closes its open connections ([`crate::connected::Connected::revoke`]).
    pub async fn revoke(&self, id: &str) -> Result<Credential, AccountError> {
        let prefix = parse_id(id).ok_or_else(|| AccountError::NoSuchCredential(id.to_owned()))?;
        let _serialised = self.writes.lock().await;
        let mut found = self.store.credentials(&prefix)?;
        if found.len() != 1 {
            return Err(AccountError::NoSuchCredential(id.to_owned()));
        }
        let credential = found.remove(0);
        let mut batch = WriteBatch::new();
        batch.remove_credential(&credential.hash);
        self.store.commit(batch).await?;
        Ok(credential)
    }

    /// Removes a user's record and every one of its credentials in one durable write, and keeps
    /// its name as removed. Returns the credentials deleted; the caller closes their connections
    /// and takes the user out of its conversations. Removing a removed user deletes nothing.
    pub async fn remove_user(&self, name: &str) -> Result<Vec<CredentialHash>, AccountError> {
        let user: UserName = name.parse().map_err(AccountError::InvalidName)?;
        let _serialised = self.writes.lock().await;
        if self.store.user(&user)?.is_none() {
            return match self.store.user_removed(&user)? {
                Some(_) => Ok(Vec::new()),
                None => Err(AccountError::NoSuchUser(user)),
            };
        }
        let hashes: Vec<CredentialHash> = self
            .store
            .credentials(&[])?
            .into_iter()
            .filter(|c| c.token.user == user)
            .map(|c| c.hash)
            .collect();
        let mut batch = WriteBatch::new();
        for hash in &hashes {
            batch.remove_credential(hash);
        }
        batch.remove_user(&user, now_ms());
        self.store.commit(batch).await?;
        Ok(hashes)
    }

    /// The user and credential a bearer token belongs to, `None` for any token that is not
    /// valid.
    pub fn authenticate(
        &self,
        token: &str,
    ) -> Result<Option<(UserName, CredentialHash)>, StoreError> {
        if token.len() > limits::MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        self.lookup(hash_credential(token.as_bytes()))
    }

    /// The user and credential a client certificate (DER) belongs to, if it is registered.
    pub fn authenticate_certificate(
        &self,
        der: &[u8],
    ) -> Result<Option<(UserName, CredentialHash)>, StoreError> {
        self.lookup(hash_credential(der))
    }

    fn lookup(
        &self,
        hash: CredentialHash,
    ) -> Result<Option<(UserName, CredentialHash)>, StoreError> {
        let Some(record) = self.store.token(&hash)? else {
            return Ok(None);
        };
        let now = now_ms();
        let stale = self
            .store
            .last_used(&hash)?
            .is_none_or(|at| now.saturating_sub(at) >= LAST_USED_GRANULARITY_MS);
        if stale {
            let mut batch = WriteBatch::new();
            batch.put_last_used(&hash, now);
            // Not awaited: the writer applies it with the next group commit and logs a failure;
            // a lost last-use time costs nothing.
            drop(self.store.commit(batch));
        }
        Ok(Some((record.user, hash)))
    }

    fn existing(&self, name: &str) -> Result<UserName, AccountError> {
        let user: UserName = name.parse().map_err(AccountError::InvalidName)?;
        match self.store.user(&user)? {
            Some(_) => Ok(user),
            None => Err(AccountError::NoSuchUser(user)),
        }
    }

    /// A new token for `user`, added to `batch`. Its id is unique: a token whose id would
    /// collide with another credential's is drawn again.
    fn new_token(
        &self,
        user: &UserName,
        label: &str,
        now: u64,
        batch: &mut WriteBatch,
    ) -> Result<Issued, AccountError> {
        check_label(label)?;
        let (token, hash) = loop {
            let token = new_token();
            let hash = hash_credential(token.as_bytes());
            if self.store.credentials(&hash[..ID_LEN / 2])?.is_empty() {
                break (token, hash);
            }
        };
        batch.put_token(
            &hash,
            &TokenRecord {
                user: user.clone(),
                created_at_ms: now,
            },
        );
        batch.put_device(
            &hash,
            &DeviceRecord {
                kind: CredentialKind::Token,
                label: label.to_owned(),
                not_after_ms: None,
            },
        );
        Ok(Issued {
            user: user.clone(),
            id: credential_id(&hash),
            token,
        })
    }
}

/// The id of a credential: the first 8 bytes of its hash, in hex.
pub fn credential_id(hash: &CredentialHash) -> String {
    hex::encode(&hash[..ID_LEN / 2])
}

fn parse_id(id: &str) -> Option<Vec<u8>> {
    let id = id.trim();
    if id.len() != ID_LEN {
        return None;
    }
    hex::decode(id.to_ascii_lowercase()).ok()
}

fn check_label(label: &str) -> Result<(), AccountError> {
    if label.len() > MAX_LABEL_LEN || label.chars().any(char::is_control) {
        return Err(AccountError::InvalidLabel(format!(
            "{label:?}: at most {MAX_LABEL_LEN} bytes, no control characters"
        )));
    }
    Ok(())
}

fn new_token() -> String {
    let secret: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(secret))
}

fn hash_credential(credential: &[u8]) -> CredentialHash {
    Sha256::digest(credential).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("store"),
            cache_bytes: 1024 * 1024,
            backend: Default::default(),
        })
        .unwrap()
    }

    #[tokio::test]
    async fn tokens_are_listed_by_id_and_revoked_by_it() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::new(store(dir.path()));
        let (alice, first) = accounts.add_user("alice").await.unwrap();
        let phone = accounts.issue_token("alice", "phone").await.unwrap();
        accounts.add_user("bob").await.unwrap();
        let listed = accounts.credentials(Some("alice")).unwrap();
        assert_eq!(listed.len(), 2);
        let labels: Vec<&str> = listed
            .iter()
            .map(|c| c.device.as_ref().unwrap().label.as_str())
            .collect();
        assert!(
            labels.contains(&"phone") && labels.contains(&""),
            "{labels:?}"
        );
        assert_eq!(accounts.credentials(None).unwrap().len(), 3);
        // Nothing listed holds the token itself.
        for c in &listed {
            assert!(!format!("{c:?}").contains(&phone.token[5..]));
        }
        assert!(accounts.authenticate(&phone.token).unwrap().is_some());
        let revoked = accounts.revoke(&phone.id).await.unwrap();
        assert_eq!(credential_id(&revoked.hash), phone.id);
        assert!(accounts.authenticate(&phone.token).unwrap().is_none());
        assert_eq!(
            accounts.authenticate(&first).unwrap().map(|(u, _)| u),
            Some(alice)
        );
        assert!(matches!(
            accounts.revoke(&phone.id).await,
            Err(AccountError::NoSuchCredential(_))
        ));
        assert!(matches!(
            accounts.revoke("not-an-id").await,
            Err(AccountError::NoSuchCredential(_))
        ));
    }

    #[tokio::test]
    async fn a_removed_user_loses_every_credential_and_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = Accounts::new(store(dir.path()));
        let (_, token) = accounts.add_user("carol").await.unwrap();
        let laptop = accounts.issue_token("carol", "laptop").await.unwrap();
        let cert = accounts
            .register_certificate("carol", "tablet", b"\x30fake der", None)
            .await
            .unwrap();
        assert_eq!(accounts.credentials(Some("carol")).unwrap().len(), 3);
        let removed = accounts.remove_user("carol").await.unwrap();
        assert_eq!(removed.len(), 3);
        assert!(removed.iter().any(|h| credential_id(h) == cert));
        assert!(accounts.authenticate(&token).unwrap().is_none());
        assert!(accounts.authenticate(&laptop.token).unwrap().is_none());
        assert!(accounts
            .authenticate_certificate(b"\x30fake der")
            .unwrap()
            .is_none());
        assert!(accounts.users().unwrap().is_empty());
        assert!(matches!(
            accounts.add_user("carol").await,
            Err(AccountError::Removed(_))
        ));
        assert!(accounts.remove_user("carol").await.unwrap().is_empty());
        assert!(matches!(
            accounts.remove_user("dave").await,
            Err(AccountError::NoSuchUser(_))
        ));
    }
}
