//! The console's sign-in sessions (contract §11): kept in memory only, so a restart signs
//! everyone out. A session is a random id in an `HttpOnly`, `SameSite=Strict` cookie, and a
//! CSRF token of its own that every form of the console carries back.
//!
//! The store keys sessions by the SHA-256 of their id, so looking one up takes no time that
//! depends on how much of a guessed id is right, and the memory holds no usable cookie. It is
//! bounded: past [`MAX_SESSIONS`] the oldest session is signed out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// How long a session lasts from sign-in (absolute, not sliding).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);

/// Sessions kept at once. Only holders of the admin token create sessions, so this bounds a
/// script that signs in in a loop, not an attacker.
pub const MAX_SESSIONS: usize = 1024;

/// The session cookie's name.
pub const COOKIE: &str = "relay_console";

/// A signed-in session, as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The token every state-changing form must carry back (`csrf` field).
    pub csrf: String,
    /// When the session ends, in Unix milliseconds.
    pub expires_at_ms: i64,
}

/// The sessions of this process.
#[derive(Debug, Default)]
pub struct Sessions {
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
}

/// 244 random bits from the operating system's generator, as 64 hex digits.
fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Starts a session at `now_ms`: returns the id for the cookie, and the session.
    pub fn create(&self, now_ms: i64) -> (String, Session) {
        let id = random_token();
        let session = Session {
            csrf: random_token(),
            expires_at_ms: now_ms.saturating_add(SESSION_LIFETIME.as_millis() as i64),
        };
        let mut sessions = self.lock();
        sessions.retain(|_, s| s.expires_at_ms > now_ms);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_at_ms)
                .map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(digest(&id), session.clone());
        (id, session)
    }

    /// The live session with this cookie id, if any.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let key = digest(id);
        let mut sessions = self.lock();
        match sessions.get(&key) {
            Some(session) if session.expires_at_ms > now_ms => Some(session.clone()),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Signs the session out.
    pub fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    /// Sessions held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic while holding the lock leaves a consistent map (every operation is one
        // call on it), so a poisoned lock is used as is.
        self.by_digest
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 60 * 60 * 1000;

    #[test]
    fn a_session_is_found_by_its_id_until_it_expires() {
        let sessions = Sessions::default();
        let (id, session) = sessions.create(1_000);
        assert_eq!(id.len(), 64);
        assert_ne!(session.csrf, id);
        assert_eq!(sessions.get(&id, 1_000 + 11 * HOUR_MS), Some(session));
        assert_eq!(sessions.get(&id, 1_000 + 12 * HOUR_MS), None);
        assert!(
            sessions.is_empty(),
            "an expired session is dropped when seen"
        );
    }

    #[test]
    fn a_wrong_or_removed_id_finds_nothing() {
        let sessions = Sessions::default();
        let (id, _) = sessions.create(0);
        assert_eq!(sessions.get("not-a-session", 0), None);
        assert_eq!(sessions.get(&id[..63], 0), None);
        sessions.remove(&id);
        assert_eq!(sessions.get(&id, 0), None);
    }

    #[test]
    fn the_store_is_bounded_and_signs_out_the_oldest() {
        let sessions = Sessions::default();
        let (first, _) = sessions.create(0);
        for n in 1..MAX_SESSIONS as i64 + 10 {
            sessions.create(n);
        }
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert_eq!(sessions.get(&first, 100), None);
    }

    #[test]
    fn ids_and_tokens_differ_every_time() {
        let sessions = Sessions::default();
        let (a, sa) = sessions.create(0);
        let (b, sb) = sessions.create(0);
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
    }
}
