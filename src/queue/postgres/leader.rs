//! Leadership among replicas: the session-level advisory lock on a dedicated connection that
//! lets one replica forward at a time, its probe, and the release of leases held by replicas
//! that are gone (see [`super`] for the whole story). Owns nothing but that session; it never
//! touches records except through [`RELEASE_ORPHANS`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{CONNECT_TIMEOUT, PostgresQueue, QueueError, storage, timed_out};

/// How often a follower retries the leader lock, and the leader probes its connection.
pub const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Releases the leases of replicas that have no session left; `$1` now, `$2` this replica.
const RELEASE_ORPHANS: &str = "
UPDATE records SET claimed = 0, claimed_by = NULL, next_attempt_at = LEAST(next_attempt_at, $1)
WHERE state = {pending} AND claimed = 1 AND claimed_by IS DISTINCT FROM $2
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = records.claimed_by)";

pub(super) const ROLE_UNKNOWN: u8 = 0;
pub(super) const ROLE_LEADER: u8 = 1;
pub(super) const ROLE_FOLLOWER: u8 = 2;

/// The advisory-lock key for leadership among the replicas serving `app_id`.
pub fn leader_lock_key(app_id: &str) -> i64 {
    let digest = Sha256::digest(format!("userpilot-heap-relay leader {app_id}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The dedicated session that holds the leader lock.
#[derive(Default)]
pub(super) struct Leadership {
    session: Option<tokio_postgres::Client>,
    leading: bool,
    /// When the lock was last tried (follower) or the session last probed (leader), unix ms
    /// on the queue's clock.
    checked_at_ms: Option<i64>,
}

impl PostgresQueue {
    /// Whether this replica may forward now; tries to become (or checks it still is) the
    /// leader at most every [`LEADER_CHECK_EVERY`]. `now_ms` dates released orphan leases.
    pub(super) async fn lead(&self, now_ms: i64) -> Result<bool, QueueError> {
        let mut state = self.leadership.lock().await;
        if state
            .session
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed)
        {
            if state.leading {
                tracing::warn!("leader connection closed; no longer forwarding");
            }
            self.step_down(&mut state);
            // Try to reconnect right away rather than after the check interval.
            state.checked_at_ms = None;
        }
        // The queue's clock, not the caller's `now_ms`, paces the checks: a forwarder may claim
        // with a time of its own (tests pin it), but leadership must still be retried. A clock
        // stepped back counts as time passed.
        let now = self.clock.now_ms();
        let every = LEADER_CHECK_EVERY.as_millis() as i64;
        if state
            .checked_at_ms
            .is_some_and(|at| (0..every).contains(&(now - at)))
        {
            return Ok(state.leading);
        }
        state.checked_at_ms = Some(now);
        let outcome = self.check_leadership(&mut state, now_ms).await;
        if outcome.is_err() {
            if state.leading {
                tracing::warn!("leader connection failed; no longer forwarding");
            }
            self.step_down(&mut state);
        }
        outcome
    }

    fn step_down(&self, state: &mut Leadership) {
        // Dropping the client ends the session, and with it the lock, if the server still
        // has it.
        state.session = None;
        state.leading = false;
        self.set_role(ROLE_FOLLOWER);
    }

    fn set_role(&self, role: u8) {
        self.role.store(role, Ordering::Relaxed);
        metrics::gauge!("relay_queue_leader").set(if role == ROLE_LEADER { 1.0 } else { 0.0 });
    }

    async fn check_leadership(
        &self,
        state: &mut Leadership,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let session = match state.session.take() {
            Some(session) => session,
            None => self.open_session().await?,
        };
        let session = state.session.insert(session);
        if !state.leading {
            let row = tokio::time::timeout(
                CONNECT_TIMEOUT,
                session.query_one("SELECT pg_try_advisory_lock($1)", &[&self.lock_key]),
            )
            .await
            .map_err(|_| timed_out("leader lock"))?
            .map_err(storage)?;
            if !row.try_get::<_, bool>(0).map_err(storage)? {
                self.set_role(ROLE_FOLLOWER);
                return Ok(false);
            }
            state.leading = true;
            self.set_role(ROLE_LEADER);
            tracing::info!(replica = %self.replica, "this replica now forwards (queue leader)");
        }
        // The probe: proves the session alive and frees the leases of replicas that are gone.
        let released = tokio::time::timeout(
            CONNECT_TIMEOUT,
            session.execute(sql!(RELEASE_ORPHANS), &[&now_ms, &self.replica]),
        )
        .await
        .map_err(|_| timed_out("leader probe"))?
        .map_err(storage)?;
        if released > 0 {
            tracing::info!(
                records = released,
                "released the leases of a replica that is gone"
            );
        }
        Ok(true)
    }

    async fn open_session(&self) -> Result<tokio_postgres::Client, QueueError> {
        let (client, connection) =
            tokio::time::timeout(CONNECT_TIMEOUT, self.config.connect(self.connector.clone()))
                .await
                .map_err(|_| timed_out("connect"))?
                .map_err(storage)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "leader connection ended");
            }
        });
        Ok(client)
    }
}
