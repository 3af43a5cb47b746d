//! Who is connected, by device credential and by user.
//!
//! A device is one credential: a bearer token or a client certificate, known by the SHA-256 of
//! it. The registry is what lets a revocation close a device's open connections at once, what
//! counts connections per user (`limits.max_connections_per_user`), and where each device's
//! send bucket lives, shared by its connections (`limits.sends_per_sec`).
//!
//! A connection is admitted after its credential was found in the store. A revocation deletes
//! the credential durably first and then calls [`Connected::revoke`]; a connection whose lookup
//! raced the deletion is refused at admission, because revoked credentials are remembered for
//! the life of the process (32 bytes each).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use quip_protocol::{ErrorBody, ErrorCode, UserName};

use crate::rate_limit::TokenBucket;

/// The SHA-256 of a credential (a token's UTF-8 bytes, or a certificate's DER bytes).
pub type CredentialHash = [u8; 32];

/// Closes one connection with an error; a closure so the registry itself does no IO.
pub type Closer = Box<dyn Fn(&ErrorBody) + Send + Sync>;

/// Per-device sends: one bucket shared by the device's connections, kept while the process
/// runs (so reconnecting does not refill it).
pub type SendBucket = Arc<Mutex<TokenBucket>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectedLimits {
    pub max_connections_per_user: usize,
    pub sends_per_sec: u32,
    pub sends_burst: u32,
}

impl Default for ConnectedLimits {
    fn default() -> Self {
        ConnectedLimits {
            max_connections_per_user: 32,
            sends_per_sec: 200,
            sends_burst: 10_000,
        }
    }
}

pub struct Connected {
    limits: ConnectedLimits,
    // A short std lock: admission, departure and revocation are map updates; connections are
    // closed after it is released.
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Connected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connected")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    devices: HashMap<CredentialHash, Device>,
    per_user: HashMap<UserName, usize>,
    buckets: HashMap<CredentialHash, SendBucket>,
    revoked: HashSet<CredentialHash>,
}

struct Device {
    user: UserName,
    connections: HashMap<u64, Closer>,
}

/// A connection's place in the registry; leaving it (drop) frees the place.
pub struct Admission {
    registry: Arc<Connected>,
    credential: CredentialHash,
    id: u64,
    /// The device's send bucket.
    pub sends: SendBucket,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("id", &self.id).finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.registry.depart(&self.credential, self.id);
    }
}

impl Connected {
    pub fn new(limits: ConnectedLimits) -> Arc<Self> {
        Arc::new(Connected {
            limits,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection of `user` authenticated by `credential`: `UNAUTHENTICATED` if the
    /// credential was revoked meanwhile, `CONNECTION_LIMIT` if the user has as many connections
    /// as allowed.
    pub fn admit(
        self: &Arc<Self>,
        credential: CredentialHash,
        user: &UserName,
        close: Closer,
        now: Instant,
    ) -> Result<Admission, ErrorBody> {
        let mut inner = self.lock();
        if inner.revoked.contains(&credential) {
            return Err(ErrorBody::new(ErrorCode::UNAUTHENTICATED, "invalid token"));
        }
        let count = inner.per_user.get(user).copied().unwrap_or(0);
        if count >= self.limits.max_connections_per_user {
            return Err(ErrorBody::new(
                ErrorCode::CONNECTION_LIMIT,
                format!("{user} has {count} connections open, the most this server allows"),
            ));
        }
        inner.per_user.insert(user.clone(), count + 1);
        inner.next_id += 1;
        let id = inner.next_id;
        inner
            .devices
            .entry(credential)
            .or_insert_with(|| Device {
                user: user.clone(),
                connections: HashMap::new(),
            })
            .connections
            .insert(id, close);
        let limits = self.limits;
        let sends = inner
            .buckets
            .entry(credential)
            .or_insert_with(|| {
                Arc::new(Mutex::new(TokenBucket::new(
                    limits.sends_per_sec,
                    limits.sends_burst,
                    now,
                )))
            })
            .clone();
        Ok(Admission {
            registry: self.clone(),
            credential,
            id,
            sends,
        })
    }

    fn depart(&self, credential: &CredentialHash, id: u64) {
        let mut inner = self.lock();
        let Some(device) = inner.devices.get_mut(credential) else {
            return;
        };
        if device.connections.remove(&id).is_none() {
            return;
        }
        let user = device.user.clone();
        if device.connections.is_empty() {
            inner.devices.remove(credential);
        }
        leave(&mut inner.per_user, &user, 1);
    }

    /// Closes every connection of these credentials with `REVOKED`, and refuses them from now
    /// on. Returns how many connections were closed.
    pub fn revoke(&self, credentials: &[CredentialHash]) -> usize {
        let mut closers = Vec::new();
        {
            let mut inner = self.lock();
            for credential in credentials {
                inner.revoked.insert(*credential);
                inner.buckets.remove(credential);
                if let Some(device) = inner.devices.remove(credential) {
                    leave(&mut inner.per_user, &device.user, device.connections.len());
                    closers.extend(device.connections.into_values());
                }
            }
        }
        let error = ErrorBody::new(ErrorCode::REVOKED, "this device's credential was revoked");
        for close in &closers {
            close(&error);
        }
        closers.len()
    }

    /// Open connections of `user`.
    pub fn connections_of(&self, user: &UserName) -> usize {
        self.lock().per_user.get(user).copied().unwrap_or(0)
    }
}

fn leave(per_user: &mut HashMap<UserName, usize>, user: &UserName, n: usize) {
    if let Some(count) = per_user.get_mut(user) {
        *count = count.saturating_sub(n);
        if *count == 0 {
            per_user.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn limits(max: usize) -> ConnectedLimits {
        ConnectedLimits {
            max_connections_per_user: max,
            ..ConnectedLimits::default()
        }
    }

    fn counting(closed: &Arc<AtomicUsize>) -> Closer {
        let closed = closed.clone();
        Box::new(move |error| {
            assert_eq!(error.code, ErrorCode::REVOKED);
            closed.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn revoking_closes_every_connection_of_the_credential_and_refuses_it_later() {
        let registry = Connected::new(limits(10));
        let alice: UserName = "alice".parse().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let phone = registry
            .admit([1; 32], &alice, counting(&closed), now)
            .unwrap();
        let phone_again = registry
            .admit([1; 32], &alice, counting(&closed), now)
            .unwrap();
        let laptop = registry
            .admit([2; 32], &alice, counting(&closed), now)
            .unwrap();
        assert_eq!(registry.connections_of(&alice), 3);
        assert_eq!(registry.revoke(&[[1; 32]]), 2);
        assert_eq!(closed.load(Ordering::SeqCst), 2);
        assert_eq!(registry.connections_of(&alice), 1);
        let err = registry
            .admit([1; 32], &alice, counting(&closed), now)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::UNAUTHENTICATED);
        // The closed connections' sessions end afterwards; that frees nothing twice.
        drop((phone, phone_again));
        assert_eq!(registry.connections_of(&alice), 1);
        drop(laptop);
        assert_eq!(registry.connections_of(&alice), 0);
    }

    #[test]
    fn connections_per_user_are_limited_and_freed_on_departure() {
        let registry = Connected::new(limits(2));
        let bob: UserName = "bob".parse().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let a = registry
            .admit([1; 32], &bob, counting(&closed), now)
            .unwrap();
        let _b = registry
            .admit([2; 32], &bob, counting(&closed), now)
            .unwrap();
        let err = registry
            .admit([3; 32], &bob, counting(&closed), now)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::CONNECTION_LIMIT);
        drop(a);
        registry
            .admit([3; 32], &bob, counting(&closed), now)
            .unwrap();
    }

    #[test]
    fn a_device_shares_one_send_bucket_across_its_connections() {
        let registry = Connected::new(ConnectedLimits {
            max_connections_per_user: 4,
            sends_per_sec: 1,
            sends_burst: 2,
        });
        let carol: UserName = "carol".parse().unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let now = Instant::now();
        let one = registry
            .admit([7; 32], &carol, counting(&closed), now)
            .unwrap();
        let two = registry
            .admit([7; 32], &carol, counting(&closed), now)
            .unwrap();
        assert!(one.sends.lock().unwrap().try_take(now));
        assert!(two.sends.lock().unwrap().try_take(now));
        assert!(!one.sends.lock().unwrap().try_take(now));
        // Reconnecting does not refill it.
        drop((one, two));
        let three = registry
            .admit([7; 32], &carol, counting(&closed), now)
            .unwrap();
        assert!(!three.sends.lock().unwrap().try_take(now));
    }
}
