//! The forwarder: the background task that moves records from the queue to Heap.
//!
//! One pass ([`Forwarder::forward_once`]) claims a batch of one record kind, dead-letters what
//! is too old, holds back what is over its identity's rate budget, waits for the app's budget,
//! posts the rest in one bulk request (property records merged per subject first, see
//! `entries`) and records the verdict in the queue: ack, retry at a stored time, or — for a
//! batch Heap refuses — split in halves until the bad records are isolated and dead-lettered
//! alone. [`Forwarder::run`] repeats passes over its kinds (a lane runs one task for track
//! events and one for property updates, see [`control`]), lingers briefly for a batch to fill,
//! backs off while Heap fails, and stops on shutdown within the grace period (an abandoned
//! batch stays queued: its lease simply runs out). Each bulk request is a `heap.request` span
//! linked to the webhooks whose records it carries ([`crate::traces`]).
//!
//! Erasures (contract §12) may delete records this forwarder has claimed: it notes
//! [`erase::epoch`] when it claims, and before each request, if an erasure committed since,
//! sends only what is still pending ([`still_pending`]). A batch already on the wire when an
//! erasure commits may still reach Heap, and another replica's erasure is not seen here: the
//! Heap user deletion covers both.
//!
//! When it starts forwarding — at process start, or when this replica becomes the Postgres
//! leader — it charges the app rate budget with what the queue delivered in the last minute
//! (see [`limits`]), so restarts and takeovers do not reset Heap's budget.

mod control;
pub(crate) mod entries;
pub mod lanes;
pub mod limits;
pub mod retry;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, Stopwatch};
use crate::dead_letters::Reason;
use crate::erase;
use crate::heap::client::HeapClient;
use crate::heap::wire::RecordKind;
use crate::queue::{Queue, QueueError};
use crate::traces::{Origin, Traces};
pub use control::{Control, ForwarderState, HEAP_ERROR_TEXT_MAX, HeapError, KIND_GROUPS};
use entries::{Entry, entries};
use limits::Limits;
use retry::{Backoff, Verdict, classify};

/// How the forwarder is set up (from `[heap]` and `[retry]`).
#[derive(Debug, Clone)]
pub struct ForwarderConfig {
    pub linger: Duration,
    pub backoff: Backoff,
    pub max_event_age: Duration,
    /// How long a claimed batch stays leased; renewed before a request once it runs short.
    pub lease: Duration,
    pub shutdown_grace: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub claimed: usize,
    pub delivered: usize,
    pub retried: usize,
    pub dead: usize,
    /// Held back by the per-identity budget, or by a pause that came mid-pass.
    pub held: usize,
    /// Heap failed: the forwarder's group of kinds should wait this long.
    pub backoff: Option<Duration>,
}

pub struct Forwarder {
    queue: Arc<dyn Queue>,
    client: HeapClient,
    clock: Arc<dyn Clock>,
    limits: Limits,
    config: ForwarderConfig,
    control: Arc<Control>,
    jitter: Box<dyn FnMut() -> f64 + Send + Sync>,
    /// Consecutive failed Heap calls; the forwarder-wide backoff grows with it.
    failures: u32,
    /// Whether this process is the one forwarding for the app id (the Postgres leader);
    /// always, on a queue of its own.
    leading: Box<dyn Fn() -> bool + Send + Sync>,
    /// `leading` at the last pass: a change to true means the budget must be re-learnt.
    was_leading: bool,
    /// A span per Heap request, linked to the webhooks it carries (off by default).
    traces: Traces,
    /// The kinds its [`Forwarder::run`] forwards, and their group's slot in [`Control`]:
    /// every kind, in slot 0, unless [`Forwarder::for_group`] says otherwise.
    kinds: &'static [RecordKind],
    group: usize,
}

/// The fields of the one line logged per Heap request (contract §8.1). `lane` is the app id
/// of the forwarder's lane ([`lanes`]).
struct RequestLog {
    endpoint: &'static str,
    lane: String,
    /// Elements of Heap's bulk array: events, users or accounts.
    events: usize,
    /// Queue records behind them (property updates about one subject are merged).
    records: usize,
    /// `None`: Heap did not answer (timeout, connection error).
    status: Option<u16>,
    duration_ms: u64,
}

/// Logs one line about a Heap request at `$level`: the fields every such line carries, its
/// `outcome`, then the line's own fields and message.
macro_rules! request_line {
    ($level:ident, $log:expr, $outcome:literal, $($rest:tt)+) => {
        tracing::$level!(
            endpoint = $log.endpoint,
            lane = %$log.lane,
            events = $log.events,
            records = $log.records,
            status = $log.status,
            duration_ms = $log.duration_ms,
            outcome = $outcome,
            $($rest)+
        )
    };
}

impl RequestLog {
    fn delivered(&self) {
        request_line!(info, self, "delivered", "heap request delivered");
    }

    fn retrying(
        &self,
        attempt: u32,
        wait: Duration,
        at: chrono::DateTime<chrono::Utc>,
        error: &str,
    ) {
        request_line!(
            warn,
            self,
            "retry",
            attempt,
            retry_in_ms = wait.as_millis() as u64,
            retry_at = %at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            error,
            "heap request failed; will retry"
        );
    }

    fn split(&self) {
        request_line!(
            info,
            self,
            "split",
            "heap refused a batch; splitting it to isolate the bad records"
        );
    }

    fn rejected(&self, ids: &[i64]) {
        request_line!(
            warn,
            self,
            "rejected",
            record_ids = ?ids,
            "heap refused a record; dead-lettered"
        );
    }
}

/// The most of a claim's lease spent before a request renews it (see
/// `Forwarder::min_lease_left_ms`).
const MAX_LEASE_SPENT_MS: i64 = 30_000;

/// Property records claimed per pass, as a multiple of the batch size: merged per subject
/// (see `entries`), they usually fill far fewer requests than they number.
const PROPERTY_CLAIM_FACTOR: usize = 10;

/// The entries of `batch` whose records are all still pending (`left`), and the ids to put
/// back in the queue: an entry merged from several records (properties, see `entries`) that
/// lost some of them to an erasure carries their values in its JSON, so its other records go
/// back, due now, to be merged again without them. Entries whose records are all gone are
/// dropped (they were erased: nothing to count).
fn still_pending(
    batch: Vec<Entry>,
    left: &std::collections::HashSet<i64>,
) -> (Vec<Entry>, Vec<i64>) {
    let mut kept = Vec::with_capacity(batch.len());
    let mut requeue = Vec::new();
    for entry in batch {
        if entry.ids.iter().all(|id| left.contains(id)) {
            kept.push(entry);
        } else {
            requeue.extend(entry.ids.into_iter().filter(|id| left.contains(id)));
        }
    }
    (kept, requeue)
}

/// Ids of the records in some entries.
fn ids(entries: &[Entry]) -> Vec<i64> {
    entries.iter().flat_map(|e| e.ids.iter().copied()).collect()
}

/// How many records some entries carry.
fn records(entries: &[Entry]) -> usize {
    entries.iter().map(|e| e.ids.len()).sum()
}

impl Forwarder {
    pub fn new(
        queue: Arc<dyn Queue>,
        client: HeapClient,
        clock: Arc<dyn Clock>,
        limits: Limits,
        config: ForwarderConfig,
        control: Arc<Control>,
    ) -> Self {
        Self {
            queue,
            client,
            clock,
            limits,
            config,
            control,
            jitter: Box::new(fastrand::f64),
            failures: 0,
            leading: Box::new(|| true),
            was_leading: false,
            traces: Traces::off(),
            kinds: &RecordKind::ALL,
            group: 0,
        }
    }

    /// Makes [`Forwarder::run`] forward only the kinds of `KIND_GROUPS[group]`, as one of
    /// its lane's tasks (see [`control`]).
    pub fn for_group(mut self, group: usize) -> Self {
        self.kinds = KIND_GROUPS[group];
        self.group = group;
        self
    }

    /// Records a span per Heap request with `traces`.
    pub fn with_traces(mut self, traces: Traces) -> Self {
        self.traces = traces;
        self
    }

    /// Tells the forwarder whether this process currently forwards for the app id (the
    /// Postgres queue's leadership, as of the last claim). Each time it becomes true the app
    /// budget is charged with the last minute's deliveries, made by whoever forwarded before.
    pub fn with_leadership(mut self, leading: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        self.leading = Box::new(leading);
        self
    }

    /// Replaces the random source of the backoff jitter (`[0, 1)`), for exact tests.
    pub fn with_jitter(mut self, jitter: impl FnMut() -> f64 + Send + Sync + 'static) -> Self {
        self.jitter = Box::new(jitter);
        self
    }

    /// One claim → send → verdict pass for `kind`. Does not wait for anything but Heap and
    /// the app rate budget, so tests can drive the forwarder step by step.
    pub async fn forward_once(&mut self, kind: RecordKind) -> Result<Pass, QueueError> {
        let now = self.clock.now_ms();
        let max = match kind {
            RecordKind::Track => self.max_batch(),
            RecordKind::User | RecordKind::Account => self.max_batch() * PROPERTY_CLAIM_FACTOR,
        };
        let lease = self.config.lease.as_millis() as i64;
        let lane = self.client.app_id().as_str();
        // Read before the claim: an erasure committing during or after it moves the epoch.
        let epoch = erase::epoch();
        let claimed = self.queue.claim(lane, kind, max, now, lease).await?;
        // The claim is where leadership is taken: learn the budget before sending anything.
        self.charge_if_newly_leading(now).await;
        let mut pass = Pass {
            claimed: claimed.len(),
            ..Pass::default()
        };
        if claimed.is_empty() {
            return Ok(pass);
        }

        let oldest_allowed = now - self.config.max_event_age.as_millis() as i64;
        let (expired, fresh): (Vec<_>, Vec<_>) = claimed
            .into_iter()
            .partition(|r| r.received_at_ms < oldest_allowed);
        if !expired.is_empty() {
            let detail = format!(
                "not delivered within retry.max_event_age_secs ({} s)",
                self.config.max_event_age.as_secs()
            );
            let expired: Vec<i64> = expired.iter().map(|r| r.id).collect();
            self.dead_letter(expired, Reason::Expired, detail, false, &mut pass)
                .await?;
        }

        let (admitted, held) = match kind {
            RecordKind::Track => self.limits.admit(fresh),
            _ => (fresh, Vec::new()),
        };
        if let Some(wait) = held.iter().map(|(_, wait)| *wait).max() {
            let held_ids = held.iter().map(|(r, _)| r.id).collect();
            pass.held = held.len();
            let at = now + wait.as_millis() as i64;
            self.queue
                .retry_at(held_ids, at, false, String::new())
                .await?;
        }
        if admitted.is_empty() {
            return Ok(pass);
        }
        let mut leased_until = now + lease;
        if kind == RecordKind::Track {
            let before = self.clock.monotonic();
            self.limits.until_app_admits(admitted.len()).await;
            // A budget pre-charged at start can make the wait long: the claim's lease must
            // still cover the request.
            if self.clock.monotonic().saturating_sub(before) > self.config.lease / 2 {
                let ids = admitted.iter().map(|r| r.id).collect();
                leased_until = self.clock.now_ms() + lease;
                self.queue.renew(ids, leased_until).await?;
            }
        }
        let origins = self.traces.origins(&admitted);
        let mut batches: Vec<Vec<Entry>> = entries(kind, admitted)
            .chunks(self.max_batch().max(1))
            .map(<[Entry]>::to_vec)
            .collect();
        batches.reverse(); // sent first to last
        self.deliver(kind, batches, &origins, (epoch, leased_until), &mut pass)
            .await?;
        Ok(pass)
    }

    /// Sends batches (the last one first), splitting a refused batch in halves until the bad
    /// entries stand alone. Each request is logged once, when its verdict is known: endpoint,
    /// lane, elements and records in it, Heap's status, duration and outcome. `epoch` is
    /// [`erase::epoch`] as of the claim, `leased_until` when the claim's lease ends (unix ms).
    async fn deliver(
        &mut self,
        kind: RecordKind,
        batches: Vec<Vec<Entry>>,
        origins: &HashMap<i64, Origin>,
        (epoch, leased_until): (u64, i64),
        pass: &mut Pass,
    ) -> Result<(), QueueError> {
        let mut pending = batches;
        while let Some(mut batch) = pending.pop() {
            // An erasure committed since the claim: what it deleted is not sent (see
            // `still_pending`). Every batch from then on is checked, not only the first: the
            // erasure may have deleted records of any of them, and each check sees every
            // erasure committed before it.
            if erase::epoch() != epoch {
                let left = self.queue.still_pending(ids(&batch)).await?;
                let (kept, requeue) = still_pending(batch, &left.into_iter().collect());
                if !requeue.is_empty() {
                    self.queue
                        .retry_at(requeue, self.clock.now_ms(), false, String::new())
                        .await?;
                }
                if kept.is_empty() {
                    continue;
                }
                batch = kept;
            }
            if self.control.is_paused() {
                // Paused mid-pass (or while waiting for the rate budget): what is not sent yet
                // goes back, due now, unharmed.
                pending.push(batch);
                let now = self.clock.now_ms();
                for rest in pending.drain(..) {
                    pass.held += records(&rest);
                    self.queue
                        .retry_at(ids(&rest), now, false, String::new())
                        .await?;
                }
                return Ok(());
            }
            // Renewed only once the claim's lease runs short: a renewal is a write per
            // record, and the claim's lease covers the whole pass as long as Heap answers
            // promptly (see `min_lease_left_ms`).
            let now = self.clock.now_ms();
            if leased_until - now < self.min_lease_left_ms() {
                let lease_end = now + self.config.lease.as_millis() as i64;
                self.queue.renew(ids(&batch), lease_end).await?;
            }
            let jsons: Vec<&str> = batch.iter().map(|r| r.json.as_str()).collect();
            let carried = batch.iter().flat_map(|e| &e.ids);
            let span = self.traces.heap_request(
                kind,
                records(&batch),
                carried.filter_map(|id| origins.get(id)),
            );
            let started = Stopwatch::start();
            let outcome = self.client.send(kind, &jsons).await;
            span.finish(&outcome);
            let request = RequestLog {
                endpoint: kind.as_str(),
                lane: self.client.app_id().as_str().to_owned(),
                events: batch.len(),
                records: records(&batch),
                status: outcome.as_ref().ok().map(|response| response.status),
                duration_ms: started.elapsed().as_millis() as u64,
            };
            match classify(&outcome) {
                Verdict::Delivered => {
                    self.failures = 0;
                    self.queue.ack(ids(&batch), self.clock.now_ms()).await?;
                    request.delivered();
                    pass.delivered += records(&batch);
                    if kind == RecordKind::Track {
                        metrics::counter!(
                            "relay_events_forwarded_total",
                            "app_id" => self.client.app_id().to_string()
                        )
                        .increment(batch.len() as u64);
                        self.control.count_forwarded(batch.len() as u64);
                    }
                }
                Verdict::Retry {
                    error,
                    retry_after,
                    throttled,
                } => {
                    self.failures = self.failures.saturating_add(1);
                    let attempts = batch.iter().map(|r| r.attempts).max().unwrap_or(0) + 1;
                    let delay = self.config.backoff.retry_delay(
                        self.failures.max(attempts),
                        (self.jitter)(),
                        retry_after,
                        throttled,
                    );
                    // The records are due after `delay` (a restarted relay honours that), but
                    // this forwarder pauses as a whole for at least `retry.initial_backoff_ms`:
                    // the next attempt comes after the longer of the two, and that is the
                    // wait logged and slept.
                    let wait = delay.max(self.config.backoff.initial);
                    let at = self.clock.now_ms() + delay.as_millis() as i64;
                    let retry_at = self.clock.now() + wait;
                    request.retrying(attempts, wait, retry_at, &error);
                    self.control
                        .record_heap_error(self.clock.now_ms(), request.status, &error);
                    pass.retried += records(&batch);
                    self.queue.retry_at(ids(&batch), at, true, error).await?;
                    // Heap is failing: the batches still waiting are not fired into it.
                    for rest in pending.drain(..) {
                        pass.retried += records(&rest);
                        self.queue
                            .retry_at(ids(&rest), at, false, String::new())
                            .await?;
                    }
                    pass.backoff = Some(wait);
                }
                Verdict::Reject { .. } if batch.len() > 1 => {
                    request.split();
                    let mut first = batch;
                    let second = first.split_off(first.len() / 2);
                    pending.push(second);
                    pending.push(first);
                }
                Verdict::Reject { status, text } => {
                    let detail = format!("heap answered {status}: {text}");
                    request.rejected(&ids(&batch));
                    self.control
                        .record_heap_error(self.clock.now_ms(), Some(status), &detail);
                    self.dead_letter(ids(&batch), Reason::Rejected, detail, true, pass)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// On starting to forward (see [`Forwarder::with_leadership`]): charges the app budget
    /// with the track events delivered in the last [`limits::RATE_WINDOW`], as if sent now.
    /// If the queue cannot say, a whole minute's budget is assumed spent.
    async fn charge_if_newly_leading(&mut self, now_ms: i64) {
        let leading = (self.leading)();
        let became_leader = leading && !self.was_leading;
        self.was_leading = leading;
        if !became_leader {
            return;
        }
        let since = now_ms - limits::RATE_WINDOW.as_millis() as i64;
        let lane = self.client.app_id().as_str();
        match self
            .queue
            .delivered_since(lane, RecordKind::Track, since)
            .await
        {
            Ok(delivered) => {
                self.limits.precharge(delivered);
                if delivered > 0 {
                    tracing::info!(
                        delivered,
                        "events delivered in the last minute count against Heap's rate budget"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot count recent deliveries; assuming a full minute's budget spent");
                self.limits.precharge(self.limits.per_minute());
            }
        }
    }

    async fn dead_letter(
        &self,
        ids: Vec<i64>,
        reason: Reason,
        detail: String,
        failed: bool,
        pass: &mut Pass,
    ) -> Result<(), QueueError> {
        let reason = reason.as_str();
        pass.dead += ids.len();
        metrics::counter!(
            "relay_events_dead_lettered_total",
            "reason" => reason,
            "app_id" => self.client.app_id().to_string()
        )
        .increment(ids.len() as u64);
        let now = self.clock.now_ms();
        self.queue
            .dead_letter(ids, reason.to_owned(), detail, failed, now)
            .await
    }

    /// Runs passes until `shutdown`, then finishes or abandons the batch in flight within the
    /// grace period.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let grace = self.config.shutdown_grace;
        let deadline = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                tokio::time::sleep(grace).await;
            }
        };
        tokio::pin!(deadline);
        let mut last_cleanup = self.clock.monotonic();
        while !shutdown.is_cancelled() {
            if self.control.is_paused() {
                self.control.end_backoff(self.group);
                tokio::select! {
                    _ = self.control.rung(self.group) => {}
                    _ = shutdown.cancelled() => {}
                }
                continue;
            }
            self.control.end_backoff(self.group);
            let mut pass_total = Pass::default();
            let mut full = false;
            for &kind in self.kinds {
                if self.control.is_paused() {
                    break;
                }
                let pass = tokio::select! {
                    pass = self.forward_once(kind) => pass,
                    _ = &mut deadline => {
                        tracing::warn!("shutdown grace period over; the batch in flight stays queued");
                        return;
                    }
                };
                match pass {
                    Ok(pass) => {
                        full |= pass.claimed >= self.max_batch();
                        pass_total.claimed += pass.claimed;
                        pass_total.backoff = pass_total.backoff.max(pass.backoff);
                    }
                    Err(error) => {
                        let wait = Duration::from_secs(1);
                        tracing::warn!(
                            %error,
                            retry_in_ms = wait.as_millis() as u64,
                            "queue unavailable to the forwarder; pausing briefly"
                        );
                        pass_total.backoff = Some(wait);
                    }
                }
                if pass_total.backoff.is_some() {
                    break;
                }
            }
            let now = self.clock.monotonic();
            if now.saturating_sub(last_cleanup) > Duration::from_secs(60) {
                self.limits.forget_idle_identities();
                last_cleanup = now;
            }
            if let Some(backoff) = pass_total.backoff {
                let until = self.clock.now_ms() + backoff.as_millis() as i64;
                self.control.back_off_until(self.group, until);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => {}
                }
            } else if pass_total.claimed == 0 {
                self.idle(&shutdown).await;
            } else if !full {
                // Only part of a batch was waiting: let the next one fill for the linger
                // time rather than sending a trickle of small requests.
                tokio::select! {
                    _ = tokio::time::sleep(self.config.linger) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }

    /// The least lease a request starts with: three quarters of the lease, and at most 30 s
    /// less than it ([`MAX_LEASE_SPENT_MS`]). The lease is Heap's timeout plus a minute, so a
    /// request always has its whole timeout and 30 s more before its records are due again.
    fn min_lease_left_ms(&self) -> i64 {
        let lease = self.config.lease.as_millis() as i64;
        lease - (lease / 4).min(MAX_LEASE_SPENT_MS)
    }

    /// The largest batch a pass claims: `heap.batch_max_events`, capped by the app budget.
    fn max_batch(&self) -> usize {
        self.limits.max_batch()
    }

    /// Nothing to send: sleep until new records arrive (then linger so a batch can fill),
    /// the next retry is due, or a second has passed.
    async fn idle(&self, shutdown: &CancellationToken) {
        let now = self.clock.now_ms();
        let mut next_due: Option<i64> = None;
        for &kind in self.kinds {
            let lane = self.client.app_id().as_str();
            if let Ok(Some(due)) = self.queue.next_due_ms(lane, kind).await {
                next_due = Some(next_due.map_or(due, |d: i64| d.min(due)));
            }
        }
        // Something due that the last pass could not claim (another replica holds the
        // forwarding lease) is not a reason to spin: wait the full second then.
        let sleep = match next_due {
            Some(due) if due > now => Duration::from_millis((due - now) as u64),
            _ => Duration::from_secs(1),
        }
        .min(Duration::from_secs(1));
        tokio::select! {
            _ = self.control.rung(self.group) => {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.linger) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
            _ = tokio::time::sleep(sleep) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ids: &[i64]) -> Entry {
        Entry {
            ids: ids.to_vec(),
            json: format!("{ids:?}"),
            attempts: 0,
        }
    }

    #[test]
    fn after_an_erasure_only_entries_whose_records_all_remain_are_sent() {
        let batch = vec![entry(&[1]), entry(&[2]), entry(&[3, 4, 5]), entry(&[6, 7])];
        let left = [1, 3, 5, 6, 7].into_iter().collect();
        let (kept, requeue) = still_pending(batch, &left);
        // 2 was erased: dropped. 4 was erased from a merged entry: 3 and 5 go back to be
        // merged again without it.
        assert_eq!(kept, vec![entry(&[1]), entry(&[6, 7])]);
        assert_eq!(requeue, [3, 5]);

        let (kept, requeue) = still_pending(vec![entry(&[8, 9])], &Default::default());
        assert!(kept.is_empty() && requeue.is_empty());
    }

    /// A fake Heap answering each request with the next scripted `(status, body)`, then 200.
    mod fake_heap {
        use std::collections::VecDeque;
        use std::sync::{Arc, Mutex};

        use axum::http::StatusCode;

        pub type Script = Arc<Mutex<VecDeque<(u16, String)>>>;

        /// Serves on a free local port until the test's runtime ends; returns its URL.
        pub async fn start(answers: &[(u16, &str)]) -> String {
            let script: Script = Arc::new(Mutex::new(
                answers.iter().map(|(s, b)| (*s, (*b).to_owned())).collect(),
            ));
            let app = axum::Router::new().fallback(move || {
                let script = script.clone();
                async move {
                    let (status, body) = script
                        .lock()
                        .unwrap()
                        .pop_front()
                        .unwrap_or((200, String::new()));
                    (StatusCode::from_u16(status).unwrap(), body)
                }
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            url
        }
    }

    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    /// A forwarder of lane `app-1` on its own queue file with `events` track events queued,
    /// a manual clock at [`T0`], no jitter, and Heap at `heap_url`.
    struct Lane {
        forwarder: Forwarder,
        control: Arc<Control>,
        clock: crate::clock::ManualClock,
        _dir: tempfile::TempDir,
    }

    impl Lane {
        async fn start(heap_url: &str, events: usize, initial_backoff: Duration) -> Lane {
            use crate::heap::mapping::{Mapper, MappingSettings};
            use crate::queue::NewWebhook;
            use crate::userpilot::Verified;

            let dir = tempfile::tempdir().unwrap();
            let queue = Arc::new(
                crate::queue::sqlite::SqliteQueue::open(&dir.path().join("q.sqlite3")).unwrap(),
            );
            let clock = crate::clock::ManualClock::at_ms(T0);
            let mapper = Mapper::new("user_id", false, false, &MappingSettings::default());
            for seq in 0..events {
                let body = bytes::Bytes::from(
                    serde_json::json!({
                        "timestamp": T0 / 1000,
                        "data": { "type": "flow", "action": "started", "flow_id": "f",
                                  "seq": seq, "user": { "user_id": format!("u{seq}") } }
                    })
                    .to_string(),
                );
                let verified = Verified::from_queue(body.clone());
                let received = chrono::DateTime::from_timestamp_millis(T0).unwrap();
                let content = crate::translate::webhook(&mapper, &verified, received).unwrap();
                queue
                    .enqueue(NewWebhook {
                        source: crate::queue::DEFAULT_SOURCE.to_owned(),
                        app_id: "app-1".to_owned(),
                        digest: verified.digest(),
                        body,
                        received_at_ms: T0,
                        content,
                        shape: None,
                    })
                    .await
                    .unwrap();
            }
            let app_id = crate::config::AppId::try_from("app-1".to_owned()).unwrap();
            let client = HeapClient::new(
                &heap_url.parse().unwrap(),
                &app_id,
                Duration::from_secs(5),
                Arc::new(clock.clone()),
            )
            .unwrap();
            let per_minute = std::num::NonZeroU32::new(10_000).unwrap();
            let limits = Limits::new(per_minute, per_minute, per_minute, Arc::new(clock.clone()));
            let config = ForwarderConfig {
                linger: Duration::ZERO,
                backoff: Backoff {
                    initial: initial_backoff,
                    max: Duration::from_secs(3600),
                },
                max_event_age: Duration::from_secs(3600),
                lease: Duration::from_secs(60),
                shutdown_grace: Duration::from_secs(1),
            };
            let control = Arc::new(Control::default());
            let forwarder = Forwarder::new(
                queue,
                client,
                Arc::new(clock.clone()),
                limits,
                config,
                control.clone(),
            )
            .with_jitter(|| 0.0);
            Lane {
                forwarder,
                control,
                clock,
                _dir: dir,
            }
        }
    }

    #[tokio::test]
    async fn events_heap_accepts_are_counted_and_no_error_is_reported() {
        let heap = fake_heap::start(&[]).await;
        let mut lane = Lane::start(&heap, 3, Duration::from_secs(1)).await;
        let pass = lane
            .forwarder
            .forward_once(RecordKind::Track)
            .await
            .unwrap();
        assert_eq!(pass.delivered, 3);
        assert_eq!(lane.control.forwarded(), 3);
        assert_eq!(lane.control.last_heap_error(), None);
    }

    #[tokio::test]
    async fn a_retryable_failure_is_kept_with_its_status_and_the_stored_error_text() {
        let long = "x".repeat(2 * HEAP_ERROR_TEXT_MAX);
        let heap = fake_heap::start(&[(503, long.as_str())]).await;
        let mut lane = Lane::start(&heap, 2, Duration::from_secs(1)).await;
        lane.clock.advance(Duration::from_millis(1500));
        let pass = lane
            .forwarder
            .forward_once(RecordKind::Track)
            .await
            .unwrap();
        assert_eq!(pass.retried, 2);
        assert_eq!(lane.control.forwarded(), 0);
        let error = lane.control.last_heap_error().unwrap();
        assert_eq!(error.at_ms, T0 + 1500);
        assert_eq!(error.status, Some(503));
        assert!(
            error.text.starts_with("heap answered 503: xxx"),
            "{}",
            error.text
        );
        assert_eq!(error.text.chars().count(), HEAP_ERROR_TEXT_MAX);
    }

    #[tokio::test]
    async fn a_refusal_that_dead_letters_is_kept_with_heaps_answer() {
        let heap = fake_heap::start(&[(400, "<b>bad</b> event")]).await;
        let mut lane = Lane::start(&heap, 1, Duration::from_secs(1)).await;
        let pass = lane
            .forwarder
            .forward_once(RecordKind::Track)
            .await
            .unwrap();
        assert_eq!(pass.dead, 1);
        let error = lane.control.last_heap_error().unwrap();
        assert_eq!(error.status, Some(400));
        assert_eq!(error.text, "heap answered 400: <b>bad</b> event");
    }

    #[tokio::test]
    async fn a_heap_that_does_not_answer_is_an_error_without_status() {
        // A port nobody listens on: bind one, then free it.
        let url = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", listener.local_addr().unwrap())
        };
        let mut lane = Lane::start(&url, 1, Duration::from_secs(1)).await;
        lane.forwarder
            .forward_once(RecordKind::Track)
            .await
            .unwrap();
        let error = lane.control.last_heap_error().unwrap();
        assert_eq!(error.status, None);
        assert!(
            error.text.starts_with("connection failed"),
            "{}",
            error.text
        );
    }

    #[tokio::test]
    async fn while_backing_off_the_next_attempt_time_is_shown_and_cleared_on_running() {
        let heap = fake_heap::start(&[(503, "down")]).await;
        let lane = Lane::start(&heap, 1, Duration::from_secs(600)).await;
        let control = lane.control.clone();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(lane.forwarder.run(shutdown.clone()));
        let backed_off = async {
            while control.backoff_until_ms().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), backed_off)
            .await
            .expect("never backed off");
        assert_eq!(control.state(), ForwarderState::BackingOff);
        // No jitter: the wait is `retry.initial_backoff_ms`, from the clock's now.
        assert_eq!(control.backoff_until_ms(), Some(T0 + 600_000));
        // A pause hides it; the loop running again clears it.
        control.set_paused(true);
        assert_eq!(control.backoff_until_ms(), None);
        control.set_paused(false);
        control.end_backoff(0);
        assert_eq!(control.backoff_until_ms(), None);
        shutdown.cancel();
        running.await.unwrap();
    }
}
