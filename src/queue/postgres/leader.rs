//! Leadership among replicas, per lane: one session-level advisory lock per Heap app id
//! ([`leader_lock_key`]), all held on one dedicated connection, lets one replica forward each
//! lane at a time (replicas may lead different lanes), its probe, and the release of leases
//! held by replicas that are gone (see [`super`] for the whole story). Owns nothing but that
//! session; it never touches records except through [`RELEASE_ORPHANS`].

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{CONNECT_TIMEOUT, PostgresQueue, QueueError, storage, timed_out};

/// How often a follower retries a lane's leader lock, and its leader probes the connection.
pub const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Releases the leases in lane `$3` of replicas that have no session left; `$1` now, `$2`
/// this replica. Each lane's leader cleans up its own lane.
const RELEASE_ORPHANS: &str = "
UPDATE records SET claimed = 0, claimed_by = NULL, next_attempt_at = LEAST(next_attempt_at, $1)
WHERE state = {pending} AND claimed = 1 AND claimed_by IS DISTINCT FROM $2 AND app_id = $3
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.application_name = records.claimed_by)";

pub(super) const ROLE_LEADER: u8 = 1;
pub(super) const ROLE_FOLLOWER: u8 = 2;

/// The advisory-lock key for leadership among the replicas serving `app_id`.
pub fn leader_lock_key(app_id: &str) -> i64 {
    let digest = Sha256::digest(format!("userpilot-heap-relay leader {app_id}").as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The dedicated session that holds the lanes' leader locks, and each lane's standing.
#[derive(Default)]
pub(super) struct Leadership {
    session: Option<tokio_postgres::Client>,
    lanes: HashMap<String, Lane>,
}

#[derive(Default)]
struct Lane {
    leading: bool,
    /// When the lock was last tried (follower) or the session last probed (leader), unix ms
    /// on the queue's clock.
    checked_at_ms: Option<i64>,
}

impl PostgresQueue {
    /// Whether this replica may forward lane `app_id` now; tries to become (or checks it
    /// still is) its leader at most every [`LEADER_CHECK_EVERY`]. `now_ms` dates released
    /// orphan leases.
    pub(super) async fn lead(&self, app_id: &str, now_ms: i64) -> Result<bool, QueueError> {
        let mut state = self.leadership.lock().await;
        if state
            .session
            .as_ref()
            .is_some_and(tokio_postgres::Client::is_closed)
        {
            if state.lanes.values().any(|lane| lane.leading) {
                tracing::warn!("leader connection closed; no longer forwarding");
            }
            self.step_down(&mut state);
            // Try to reconnect right away rather than after the check interval.
            for lane in state.lanes.values_mut() {
                lane.checked_at_ms = None;
            }
        }
        // The queue's clock, not the caller's `now_ms`, paces the checks: a forwarder may claim
        // with a time of its own (tests pin it), but leadership must still be retried. A clock
        // stepped back counts as time passed.
        let now = self.clock.now_ms();
        let every = LEADER_CHECK_EVERY.as_millis() as i64;
        let lane = state.lanes.entry(app_id.to_owned()).or_default();
        if lane
            .checked_at_ms
            .is_some_and(|at| (0..every).contains(&(now - at)))
        {
            return Ok(lane.leading);
        }
        lane.checked_at_ms = Some(now);
        let outcome = self.check_leadership(&mut state, app_id, now_ms).await;
        if outcome.is_err() {
            if state.lanes.values().any(|lane| lane.leading) {
                tracing::warn!(app_id, "leader connection failed; no longer forwarding");
            }
            self.step_down(&mut state);
        }
        outcome
    }

    /// Every lane at once: their locks all live on the one session.
    fn step_down(&self, state: &mut Leadership) {
        // Dropping the client ends the session, and with it the locks, if the server still
        // has it.
        state.session = None;
        for (app_id, lane) in &mut state.lanes {
            lane.leading = false;
            self.set_role(app_id, ROLE_FOLLOWER);
        }
    }

    fn set_role(&self, app_id: &str, role: u8) {
        if let Ok(mut roles) = self.roles.lock() {
            roles.insert(app_id.to_owned(), role);
        }
        metrics::gauge!("relay_queue_leader", "app_id" => app_id.to_owned())
            .set(if role == ROLE_LEADER { 1.0 } else { 0.0 });
    }

    async fn check_leadership(
        &self,
        state: &mut Leadership,
        app_id: &str,
        now_ms: i64,
    ) -> Result<bool, QueueError> {
        let Leadership { session, lanes } = state;
        let client = match session.take() {
            Some(client) => client,
            None => self.open_session().await?,
        };
        let client = session.insert(client);
        let lane = lanes.entry(app_id.to_owned()).or_default();
        if !lane.leading {
            let row = tokio::time::timeout(
                CONNECT_TIMEOUT,
                client.query_one(
                    "SELECT pg_try_advisory_lock($1)",
                    &[&leader_lock_key(app_id)],
                ),
            )
            .await
            .map_err(|_| timed_out("leader lock"))?
            .map_err(storage)?;
            if !row.try_get::<_, bool>(0).map_err(storage)? {
                self.set_role(app_id, ROLE_FOLLOWER);
                return Ok(false);
            }
            lane.leading = true;
            self.set_role(app_id, ROLE_LEADER);
            tracing::info!(
                replica = %self.replica,
                app_id,
                "this replica now forwards the lane (queue leader)"
            );
        }
        // The probe: proves the session alive and frees the leases of replicas that are gone.
        let released = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.execute(sql!(RELEASE_ORPHANS), &[&now_ms, &self.replica, &app_id]),
        )
        .await
        .map_err(|_| timed_out("leader probe"))?
        .map_err(storage)?;
        if released > 0 {
            tracing::info!(
                records = released,
                app_id,
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
