//! Customer authentication: argon2id hashes in the database, and a short
//! cache of recently verified credentials so a busy customer costs one
//! argon2 run per minute, not one per connection.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256};

use crate::store::Store;

const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 100_000;

/// Longest username or password accepted (SOCKS5 allows 255 bytes).
pub const MAX_CRED_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub customer_id: String,
    pub username: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("invalid credentials")]
    Invalid,
    #[error("authentication unavailable")]
    Unavailable,
}

/// A verified credential: who, a keyed digest of the password, and when.
type Cached = (Principal, [u8; 32], Instant);

pub struct Authenticator {
    store: Store,
    /// Per-process random key so cache entries are not plain password hashes.
    cache_key: [u8; 32],
    cache: Mutex<HashMap<String, Cached>>,
    dummy_hash: String,
    /// Argon2 runs at once. Each takes 19 MiB and a core for tens of
    /// milliseconds; without a bound, a flood of wrong passwords would run
    /// hundreds at a time on the blocking pool and exhaust memory. Callers
    /// wait for a permit under their handshake deadline.
    hashers: std::sync::Arc<tokio::sync::Semaphore>,
}

/// argon2id with the crate defaults (19 MiB, t=2, p=1) and a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify(password: &[u8], phc: &str) -> bool {
    Argon2::default().verify_password(password, phc).is_ok()
}

impl Authenticator {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            cache_key: rand::random(),
            cache: Mutex::new(HashMap::new()),
            dummy_hash: hash_password("cellgate-dummy-password").unwrap_or_default(),
            hashers: std::sync::Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism()
                    .map_or(2, |n| n.get())
                    .clamp(1, 16),
            )),
        }
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(password);
        h.finalize().into()
    }

    /// Check a username and password (raw bytes, as customers sent them).
    pub async fn verify(&self, username: &[u8], password: &[u8]) -> Result<Principal, AuthError> {
        if username.is_empty() || username.len() > MAX_CRED_LEN || password.len() > MAX_CRED_LEN {
            return Err(AuthError::Invalid);
        }
        let Ok(username) = std::str::from_utf8(username) else {
            return Err(AuthError::Invalid);
        };
        let digest = self.digest(password);
        if let Ok(cache) = self.cache.lock()
            && let Some((p, d, at)) = cache.get(username)
            && *d == digest
            && at.elapsed() < CACHE_TTL
        {
            return Ok(p.clone());
        }
        let row = self
            .store
            .customer_by_username(username)
            .await
            .map_err(|_| AuthError::Unavailable)?;
        // Unknown users cost the same argon2 run as wrong passwords, so
        // response timing does not reveal which usernames exist.
        let (phc, principal) = match &row {
            Some(r) if !r.disabled => (
                r.password_hash.clone(),
                Some(Principal {
                    customer_id: r.id.clone(),
                    username: r.username.clone(),
                }),
            ),
            _ => (self.dummy_hash.clone(), None),
        };
        let pw = password.to_vec();
        // The permit moves into the blocking task, so a caller that gives up
        // (deadline) does not free a slot while its hash is still running.
        let permit = self
            .hashers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthError::Unavailable)?;
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify(&pw, &phc)
        })
        .await
        .unwrap_or(false);
        match (ok, principal) {
            (true, Some(p)) => {
                if let Ok(mut cache) = self.cache.lock() {
                    if cache.len() >= CACHE_MAX {
                        cache.retain(|_, (_, _, at)| at.elapsed() < CACHE_TTL);
                    }
                    cache.insert(username.to_string(), (p.clone(), digest, Instant::now()));
                }
                Ok(p)
            }
            _ => Err(AuthError::Invalid),
        }
    }

    /// Forget a customer's cached credentials (deleted, password changed).
    pub fn invalidate(&self, username: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(username);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify(b"pw", &h));
        assert!(!verify(b"pW", &h));
        assert!(!verify(b"pw", "not a hash"));
    }
}
