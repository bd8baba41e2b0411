//! The work streams: enqueue, claim (gated), leases, reclaim, ack, release, dead letters,
//! depth and trimming. See the parent module for why each step is shaped as it is.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Queue;
use super::error::{QueueError, Result, is_no_group};
use super::keys::{GROUP, LANES, parse_lane};
use super::reply;
use super::scripts;
use super::values::{OFF_HOURS_MAX_TTL, RunGuard};
use crate::job::{Action, Lane, MessageError, ValidJob};

/// Dead-letter metadata fields, appended after the original fields.
pub const DEAD_META: [&str; 5] = [
    "reason",
    "delivery_count",
    "stream",
    "original_id",
    "dead_at",
];

/// One claimed stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub lane: Lane,
    /// The stream entry id.
    pub id: String,
    /// The entry's fields (the contract has one: `job`).
    pub fields: HashMap<String, String>,
    /// How many times the group has handed this entry out, this time included.
    pub delivery_count: u64,
}

impl Delivery {
    /// The raw `job` field.
    pub fn job_field(&self) -> Option<&str> {
        self.fields.get("job").map(String::as_str)
    }

    /// The validated message, or the reason to dead-letter it.
    pub fn job(&self) -> std::result::Result<ValidJob, MessageError> {
        ValidJob::from_field(self.job_field())
    }
}

/// An entry that was deleted from its stream while pending: reported (and acked) instead of
/// silently dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedEntry {
    pub lane: Lane,
    pub id: String,
}

/// What [`Queue::reclaim_idle`] and [`Queue::own_pending`] took over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Taken {
    pub deliveries: Vec<Delivery>,
    /// Pending entries whose stream entry no longer exists; already acked.
    pub deleted: Vec<DeletedEntry>,
    /// Costly entries left alone because off-hours is on (or costly work was not allowed).
    pub held: u64,
}

/// Result of an operation that only the entry's owner may perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedOutcome {
    Done,
    /// No longer pending: acked (by anyone) or dropped.
    NotPending,
    /// Another consumer owns it now: our lease lapsed and it was reclaimed.
    OwnedBy(String),
    /// The stream entry was deleted while pending (it is gone from the PEL too).
    Deleted,
}

/// Result of [`Queue::dead_letter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterOutcome {
    /// Written to `{p}jobs:dead` under this id, and acked.
    DeadLettered(String),
    /// Nothing done: no longer pending (already acked or dead-lettered).
    NotPending,
    /// Nothing done: another consumer owns it now, and decides.
    OwnedBy(String),
}

/// One entry of `{p}jobs:dead`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: String,
    /// The stream it came from (`None` if the field is missing or unknown).
    pub lane: Option<Lane>,
    pub original_id: String,
    pub reason: String,
    pub delivery_count: u64,
    pub dead_at: String,
    /// The original entry's fields.
    pub fields: HashMap<String, String>,
}

/// Length and backlog of one work stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneDepth {
    pub lane: Lane,
    /// Entries in the stream (including acked ones not yet trimmed).
    pub length: u64,
    /// Delivered, not yet acked.
    pub pending: u64,
    /// Not yet delivered to any consumer (`None` when Redis cannot tell, before 7.0 or after
    /// deletions).
    pub undelivered: Option<u64>,
}

/// Queue depth for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub interactive: LaneDepth,
    pub bulk: LaneDepth,
    pub dead: u64,
}

/// State of a [`Lease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseStatus {
    Held,
    /// The entry is no longer ours (reclaimed by another worker, acked, deleted) or the
    /// attached run-once key was lost. Stop the job: the fence would reject its write anyway.
    Lost(String),
}

/// Keeps a claimed entry (and optionally its run-once key) ours while the job runs: a
/// background task renews both every lease/3. Dropping the lease stops the renewal.
#[derive(Debug)]
pub struct Lease {
    status: watch::Receiver<LeaseStatus>,
    task: JoinHandle<()>,
}

impl Lease {
    pub fn status(&self) -> LeaseStatus {
        self.status.borrow().clone()
    }

    pub fn is_lost(&self) -> bool {
        matches!(*self.status.borrow(), LeaseStatus::Lost(_))
    }

    /// Resolves when the lease is lost (never while it holds); for `select!` against a job.
    pub async fn lost(&self) -> String {
        let mut rx = self.status.clone();
        loop {
            if let LeaseStatus::Lost(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                // The renewal task ended without reporting a loss: it was stopped.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops renewing (the entry is then acked, released or dead-lettered by the caller).
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lane_index(i: i64) -> Result<Lane> {
    match i {
        1 => Ok(Lane::Interactive),
        2 => Ok(Lane::Bulk),
        other => Err(QueueError::protocol("claim", format!("lane index {other}"))),
    }
}

fn cheap_actions() -> Vec<&'static str> {
    Action::ALL
        .into_iter()
        .filter(|a| !a.is_costly())
        .map(Action::as_str)
        .collect()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// `OwnedOutcome` from a `{code, owner}` script reply.
fn owned_outcome(v: &Value) -> Result<OwnedOutcome> {
    let a = reply::req_array("owner check", Some(v))?;
    Ok(match reply::req_int("owner check", a.first())? {
        1 => OwnedOutcome::Done,
        0 => OwnedOutcome::NotPending,
        -1 => OwnedOutcome::OwnedBy(reply::req_string("owner check", a.get(1))?),
        -2 => OwnedOutcome::Deleted,
        other => return Err(QueueError::protocol("owner check", format!("code {other}"))),
    })
}

impl Queue {
    /// Adds a validated job to its lane's stream: `XADD <stream> * job <json>`. Not retried:
    /// after an error the entry may or may not exist (the caller's rollback decides).
    pub async fn enqueue(&self, job: &ValidJob) -> Result<String> {
        let json = job.to_json();
        self.enqueue_raw(job.action.lane(), &[("job", json.as_str())])
            .await
    }

    /// Adds an entry with arbitrary fields (tests, tools, poison-message drills).
    pub async fn enqueue_raw(&self, lane: Lane, fields: &[(&str, &str)]) -> Result<String> {
        if fields.is_empty() {
            return Err(QueueError::InvalidArgument(
                "a stream entry needs at least one field".into(),
            ));
        }
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.stream(lane)).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(*v);
        }
        // A duplicate entry after a reset mid-reply is harmless (fence and run-once key).
        self.query_write::<String>(&cmd).await
    }

    /// Claims the next entry, interactive first, waiting up to the configured block time.
    /// See [`Queue::claim`].
    pub async fn claim_next(&self, allow_costly: bool) -> Result<Option<Delivery>> {
        self.claim(allow_costly, self.inner.cfg.block).await
    }

    /// Claims the next new entry, interactive before bulk, waiting up to `wait` for one.
    ///
    /// Costly entries are claimed only when `allow_costly` is true **and** the off-hours flag
    /// does not exist at the instant of the claim (checked inside the claiming script). A
    /// costly entry that is not claimed stays undelivered in its stream. Waiting uses `XREAD
    /// BLOCK` on the blocking connection from each stream's newest id, which returns as soon as
    /// anything is added; it claims nothing, so it cannot take a costly entry past the gate.
    /// A flag that is deleted or expires is noticed within one block time.
    pub async fn claim(&self, allow_costly: bool, wait: Duration) -> Result<Option<Delivery>> {
        let deadline = Instant::now() + wait;
        let mut recreated = false;
        loop {
            let v = match self.claim_once(allow_costly).await {
                Ok(v) => v,
                Err(QueueError::Redis(e)) if is_no_group(&e) && !recreated => {
                    tracing::warn!(error = %e, "consumer group missing (redis restarted without persistence?); recreating");
                    self.ensure_groups().await?;
                    recreated = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match v {
                ClaimReply::Claimed(d) => return Ok(Some(d)),
                ClaimReply::Empty { tails, held } => {
                    if held > 0 {
                        tracing::debug!(held, "costly entries held back by the off-hours gate");
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left < Duration::from_millis(1) {
                        return Ok(None);
                    }
                    self.wait_for_entries(&tails, left.min(self.inner.cfg.block))
                        .await?;
                    if Instant::now() >= deadline {
                        // One last look: something may have arrived as the wait ended.
                        return match self.claim_once(allow_costly).await? {
                            ClaimReply::Claimed(d) => Ok(Some(d)),
                            ClaimReply::Empty { .. } => Ok(None),
                        };
                    }
                }
            }
        }
    }

    async fn claim_once(&self, allow_costly: bool) -> Result<ClaimReply> {
        let keys = &self.inner.keys;
        let mut inv = scripts::CLAIM_SCRIPT.prepare_invoke();
        inv.key(keys.stream(Lane::Interactive))
            .key(keys.stream(Lane::Bulk))
            .key(keys.off_hours())
            .arg(GROUP)
            .arg(&self.inner.cfg.consumer)
            .arg(if allow_costly { "1" } else { "0" })
            .arg(ms(OFF_HOURS_MAX_TTL));
        for a in cheap_actions() {
            inv.arg(a);
        }
        let v: Value = inv.invoke_async(&mut self.connection()).await?;
        let a = reply::req_array("claim", Some(&v))?;
        if reply::req_int("claim", a.get(1))? == 1 {
            self.warn_healed();
        }
        if reply::req_int("claim", a.first())? == 1 {
            let lane = lane_index(reply::req_int("claim", a.get(2))?)?;
            let id = reply::req_string("claim", a.get(3))?;
            let fields = reply::fields("claim", a.get(4).unwrap_or(&Value::Nil))?;
            tracing::debug!(lane = lane.as_str(), %id, "claimed");
            return Ok(ClaimReply::Claimed(Delivery {
                lane,
                id,
                fields,
                delivery_count: 1,
            }));
        }
        Ok(ClaimReply::Empty {
            tails: [
                reply::req_string("claim", a.get(2))?,
                reply::req_string("claim", a.get(3))?,
            ],
            held: reply::req_int("claim", a.get(4))?.max(0) as u64,
        })
    }

    pub(crate) fn warn_healed(&self) {
        tracing::warn!(
            key = %self.inner.keys.off_hours(),
            ttl_s = OFF_HOURS_MAX_TTL.as_secs(),
            "the off-hours flag had no TTL (set by a writer that skips it); gave it the maximum TTL"
        );
    }

    /// `XREAD BLOCK` on both streams from their newest ids; returns when either grows or the
    /// time is up. Claims nothing.
    async fn wait_for_entries(&self, tails: &[String; 2], wait: Duration) -> Result<()> {
        let keys = &self.inner.keys;
        let mut conn = self.inner.blocking.lock().await;
        redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms(wait).max(1))
            .arg("STREAMS")
            .arg(keys.stream(Lane::Interactive))
            .arg(keys.stream(Lane::Bulk))
            .arg(&tails[0])
            .arg(&tails[1])
            .query_async::<Value>(&mut *conn)
            .await?;
        Ok(())
    }

    /// Takes over entries idle for longer than the lease (their worker crashed or stalled),
    /// up to `count` per stream, interactive first. Gated like [`Queue::claim`]: while off-hours
    /// is on (or `allow_costly` is false) costly entries are left pending where they are.
    /// Each taken entry's delivery count is incremented.
    pub async fn reclaim_idle(&self, count: usize, allow_costly: bool) -> Result<Taken> {
        self.take_pending(count, allow_costly, false, self.inner.cfg.lease)
            .await
    }

    /// Re-reads this consumer's own pending entries (after a restart), up to `count` per
    /// stream. Gated like [`Queue::claim`].
    pub async fn own_pending(&self, count: usize, allow_costly: bool) -> Result<Taken> {
        self.take_pending(count, allow_costly, true, Duration::ZERO)
            .await
    }

    async fn take_pending(
        &self,
        count: usize,
        allow_costly: bool,
        own: bool,
        min_idle: Duration,
    ) -> Result<Taken> {
        let mut taken = Taken::default();
        if count == 0 {
            return Ok(taken);
        }
        for lane in LANES {
            let stream = self.stream(lane);
            let mut inv = scripts::TAKE_PENDING_SCRIPT.prepare_invoke();
            inv.key(&stream)
                .key(self.inner.keys.off_hours())
                .arg(GROUP)
                .arg(&self.inner.cfg.consumer)
                .arg(ms(min_idle))
                .arg(count)
                .arg(if allow_costly { "1" } else { "0" })
                .arg(ms(OFF_HOURS_MAX_TTL))
                .arg(if own { "1" } else { "0" });
            for a in cheap_actions() {
                inv.arg(a);
            }
            let v: Value = match inv.invoke_async(&mut self.connection()).await {
                Ok(v) => v,
                Err(e) if is_no_group(&e) => {
                    // Nothing can be pending in a group that does not exist; recreate it for
                    // the next claim.
                    tracing::warn!(error = %e, "consumer group missing; recreating");
                    self.ensure_groups().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let a = reply::req_array("take pending", Some(&v))?;
            if reply::req_int("take pending", a.first())? == 1 {
                self.warn_healed();
            }
            for e in reply::req_array("take pending", a.get(1))? {
                let e = reply::req_array("take pending", Some(e))?;
                let d = Delivery {
                    lane,
                    id: reply::req_string("take pending", e.first())?,
                    fields: reply::fields("take pending", e.get(1).unwrap_or(&Value::Nil))?,
                    delivery_count: reply::req_int("take pending", e.get(2))?.max(0) as u64,
                };
                tracing::info!(lane = lane.as_str(), id = %d.id, deliveries = d.delivery_count, own, "took over a pending entry");
                taken.deliveries.push(d);
            }
            for id in reply::req_array("take pending", a.get(2))? {
                let id = reply::req_string("take pending", Some(id))?;
                tracing::warn!(lane = lane.as_str(), %id, "pending entry was deleted from its stream before it was processed; acked it");
                taken.deleted.push(DeletedEntry { lane, id });
            }
            taken.held += reply::req_int("take pending", a.get(3))?.max(0) as u64;
        }
        Ok(taken)
    }

    /// Acknowledges a finished entry (`XACK`; idempotent, so retried). Returns whether it was
    /// still pending. `XACK` checks no owner: see the module header for why that is safe here.
    pub async fn ack(&self, delivery: &Delivery) -> Result<bool> {
        let n: i64 = self
            .query_idem(
                redis::cmd("XACK")
                    .arg(self.stream(delivery.lane))
                    .arg(GROUP)
                    .arg(&delivery.id),
            )
            .await?;
        Ok(n > 0)
    }

    async fn owned(&self, d: &Delivery, mode: &str, idle: Duration) -> Result<OwnedOutcome> {
        let mut inv = scripts::OWNED_SCRIPT.prepare_invoke();
        inv.key(self.stream(d.lane))
            .arg(GROUP)
            .arg(&self.inner.cfg.consumer)
            .arg(&d.id)
            .arg(mode)
            .arg(ms(idle));
        let v: Value = inv.invoke_async(&mut self.connection()).await?;
        owned_outcome(&v)
    }

    /// Renews the lease on `delivery` once (resets its idle time) if this consumer still owns
    /// it. [`Queue::start_lease`] does this periodically.
    pub async fn renew(&self, delivery: &Delivery) -> Result<OwnedOutcome> {
        self.owned(delivery, "renew", Duration::ZERO).await
    }

    /// Hands an entry back at shutdown so another worker takes it at once: its idle time is
    /// set far past any lease (the next `reclaim_idle` anywhere takes it) and its delivery
    /// count is put back, so an interrupted attempt does not count toward dead-lettering.
    /// Only while this consumer owns it.
    pub async fn release(&self, delivery: &Delivery) -> Result<OwnedOutcome> {
        self.owned(
            delivery,
            "release",
            Duration::from_millis(u64::from(u32::MAX)),
        )
        .await
    }

    /// Leaves an entry pending for another attempt after `delay` (retry with backoff): its idle
    /// time is set so that it passes the lease `delay` from now. The delivery count is kept.
    pub async fn retry_after(&self, delivery: &Delivery, delay: Duration) -> Result<OwnedOutcome> {
        let idle = self.inner.cfg.lease.saturating_sub(delay);
        self.owned(delivery, "retry", idle).await
    }

    /// Whether the entry has used up its deliveries (`delivery_count > max_deliveries`): it
    /// must be dead-lettered, not run again.
    pub fn exhausted(&self, delivery: &Delivery) -> bool {
        delivery.delivery_count > u64::from(self.inner.cfg.max_deliveries)
    }

    /// Starts renewing `delivery` (and `run_guard`, if given) every lease/3 until the returned
    /// [`Lease`] is stopped or dropped, or ownership is lost. Transient Redis errors are logged
    /// and retried at the next tick; only a definite loss ends the lease.
    pub fn start_lease(&self, delivery: &Delivery, run_guard: Option<RunGuard>) -> Lease {
        let (tx, rx) = watch::channel(LeaseStatus::Held);
        let queue = self.clone();
        let d = delivery.clone();
        let every = (self.inner.cfg.lease / 3).max(Duration::from_millis(10));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let lost = match queue.renew(&d).await {
                    Ok(OwnedOutcome::Done) => None,
                    Ok(other) => Some(format!("stream entry {}: {other:?}", d.id)),
                    Err(e) => {
                        tracing::warn!(id = %d.id, error = %e, "lease renewal failed; will retry");
                        None
                    }
                };
                let lost = match (lost, &run_guard) {
                    (None, Some(g)) => match g.renew().await {
                        Ok(true) => None,
                        Ok(false) => Some(format!("run-once key {} is no longer ours", g.key())),
                        Err(e) => {
                            tracing::warn!(key = g.key(), error = %e, "run-once key renewal failed; will retry");
                            None
                        }
                    },
                    (lost, _) => lost,
                };
                if let Some(why) = lost {
                    tracing::warn!(id = %d.id, reason = %why, "lease lost");
                    let _ = tx.send(LeaseStatus::Lost(why));
                    return;
                }
            }
        });
        Lease { status: rx, task }
    }

    /// Moves an entry this consumer owns to `{p}jobs:dead` with its original fields plus
    /// `reason`, `delivery_count`, `stream`, `original_id` and `dead_at`, and acks it — in one
    /// script, dead letter first, so neither happens without the other. A repeated call finds
    /// the entry no longer pending and writes nothing.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> Result<DeadLetterOutcome> {
        let mut inv = scripts::DEAD_LETTER_SCRIPT.prepare_invoke();
        inv.key(self.stream(delivery.lane))
            .key(self.inner.keys.dead())
            .arg(GROUP)
            .arg(&self.inner.cfg.consumer)
            .arg(&delivery.id);
        let mut names: Vec<&String> = delivery.fields.keys().collect();
        names.sort();
        for k in names
            .into_iter()
            .filter(|k| !DEAD_META.contains(&k.as_str()))
        {
            inv.arg(k).arg(&delivery.fields[k]);
        }
        let dead_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        inv.arg("reason")
            .arg(reason)
            .arg("delivery_count")
            .arg(delivery.delivery_count)
            .arg("stream")
            .arg(delivery.lane.as_str())
            .arg("original_id")
            .arg(&delivery.id)
            .arg("dead_at")
            .arg(dead_at);
        let v: Value = inv.invoke_async(&mut self.connection()).await?;
        let a = reply::req_array("dead letter", Some(&v))?;
        let out = match reply::req_int("dead letter", a.first())? {
            1 => DeadLetterOutcome::DeadLettered(reply::req_string("dead letter", a.get(1))?),
            0 => DeadLetterOutcome::NotPending,
            -1 => DeadLetterOutcome::OwnedBy(reply::req_string("dead letter", a.get(1))?),
            other => return Err(QueueError::protocol("dead letter", format!("code {other}"))),
        };
        if let DeadLetterOutcome::DeadLettered(dead_id) = &out {
            tracing::warn!(lane = delivery.lane.as_str(), id = %delivery.id, %dead_id, deliveries = delivery.delivery_count, %reason, "dead-lettered");
        }
        Ok(out)
    }

    /// The oldest `count` dead letters.
    pub async fn dead_list(&self, count: usize) -> Result<Vec<DeadLetter>> {
        let v: Value = self
            .query_idem(
                redis::cmd("XRANGE")
                    .arg(self.inner.keys.dead())
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(count.max(1)),
            )
            .await?;
        let mut out = Vec::new();
        for e in reply::req_array("dead list", Some(&v))? {
            let e = reply::req_array("dead list", Some(e))?;
            let id = reply::req_string("dead list", e.first())?;
            let mut fields = reply::fields("dead list", e.get(1).unwrap_or(&Value::Nil))?;
            let mut take = |k: &str| fields.remove(k).unwrap_or_default();
            let reason = take("reason");
            let delivery_count = take("delivery_count").parse().unwrap_or(0);
            let lane = parse_lane(&take("stream"));
            let original_id = take("original_id");
            let dead_at = take("dead_at");
            out.push(DeadLetter {
                id,
                lane,
                original_id,
                reason,
                delivery_count,
                dead_at,
                fields,
            });
        }
        Ok(out)
    }

    /// Puts a dead letter's original fields back on the stream it came from (a new entry, so
    /// its delivery count starts over) and deletes the dead letter, atomically. Returns the
    /// lane and the new entry id.
    pub async fn dead_requeue(&self, dead_id: &str) -> Result<(Lane, String)> {
        let keys = &self.inner.keys;
        let mut inv = scripts::REQUEUE_SCRIPT.prepare_invoke();
        inv.key(keys.dead())
            .key(keys.stream(Lane::Interactive))
            .key(keys.stream(Lane::Bulk))
            .arg(dead_id);
        for m in DEAD_META {
            inv.arg(m);
        }
        let v: Value = inv.invoke_async(&mut self.connection()).await?;
        let a = reply::req_array("dead requeue", Some(&v))?;
        if reply::req_int("dead requeue", a.first())? != 1 {
            return Err(QueueError::NotFound(format!("dead letter {dead_id}")));
        }
        let id = reply::req_string("dead requeue", a.get(1))?;
        let lane = parse_lane(&reply::req_string("dead requeue", a.get(2))?)
            .ok_or_else(|| QueueError::protocol("dead requeue", "unknown lane"))?;
        tracing::info!(%dead_id, lane = lane.as_str(), %id, "requeued a dead letter");
        Ok((lane, id))
    }

    /// Per-lane length, pending and undelivered counts, and the dead-letter count.
    pub async fn depth(&self) -> Result<QueueDepth> {
        let interactive = self.lane_depth(Lane::Interactive).await?;
        let bulk = self.lane_depth(Lane::Bulk).await?;
        let dead: u64 = self
            .query_idem(redis::cmd("XLEN").arg(self.inner.keys.dead()))
            .await?;
        Ok(QueueDepth {
            interactive,
            bulk,
            dead,
        })
    }

    async fn lane_depth(&self, lane: Lane) -> Result<LaneDepth> {
        let stream = self.stream(lane);
        let length: u64 = self.query_idem(redis::cmd("XLEN").arg(&stream)).await?;
        let mut depth = LaneDepth {
            lane,
            length,
            pending: 0,
            undelivered: None,
        };
        if length == 0 {
            depth.undelivered = Some(0);
        }
        let groups: Value = match self
            .query_idem(redis::cmd("XINFO").arg("GROUPS").arg(&stream))
            .await
        {
            Ok(v) => v,
            // No stream yet: nothing queued.
            Err(QueueError::Redis(e)) if e.to_string().contains("no such key") => return Ok(depth),
            Err(e) => return Err(e),
        };
        for g in reply::req_array("XINFO GROUPS", Some(&groups))? {
            let g = reply::pairs("XINFO GROUPS", g)?;
            let get = |k: &str| g.iter().find(|(n, _)| n == k).map(|(_, v)| v);
            if get("name").and_then(reply::string).as_deref() != Some(GROUP) {
                continue;
            }
            depth.pending = get("pending").and_then(reply::int).unwrap_or(0).max(0) as u64;
            if let Some(lag) = get("lag").and_then(reply::int) {
                depth.undelivered = Some(lag.max(0) as u64);
            }
        }
        Ok(depth)
    }

    /// The messages the queue still holds for some worker: entries not yet delivered to the
    /// group, or delivered and not acked (pending, also while a retry waits). Each as its
    /// outbox id ([`crate::store::outbox_id`]); unreadable entries are left out (the workers
    /// dead-letter them). The reconciler's view of "the entry is gone". Reads at most
    /// `limit` entries per lane.
    pub async fn live_messages(&self, limit: usize) -> Result<std::collections::HashSet<String>> {
        let mut live = std::collections::HashSet::new();
        for lane in LANES {
            let stream = self.stream(lane);
            let groups: Value = match self
                .query_idem(redis::cmd("XINFO").arg("GROUPS").arg(&stream))
                .await
            {
                Ok(v) => v,
                // No stream (Redis lost its data, or nothing was ever queued): nothing lives.
                Err(QueueError::Redis(e)) if e.to_string().contains("no such key") => continue,
                Err(e) => return Err(e),
            };
            let mut last_delivered: Option<(u64, u64)> = None;
            for g in reply::req_array("XINFO GROUPS", Some(&groups))? {
                let g = reply::pairs("XINFO GROUPS", g)?;
                let get = |k: &str| g.iter().find(|(n, _)| n == k).map(|(_, v)| v);
                if get("name").and_then(reply::string).as_deref() != Some(GROUP) {
                    continue;
                }
                last_delivered = get("last-delivered-id")
                    .and_then(reply::string)
                    .as_deref()
                    .and_then(parse_entry_id);
            }
            // Without our group no worker has taken anything: every entry is undelivered.
            let last_delivered = last_delivered.unwrap_or((0, 0));
            let pending: Vec<Value> = self
                .query_idem(
                    redis::cmd("XPENDING")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg("-")
                        .arg("+")
                        .arg(limit),
                )
                .await
                .or_else(|e| {
                    if e.is_no_group() {
                        Ok(Vec::new())
                    } else {
                        Err(e)
                    }
                })?;
            let pending: std::collections::HashSet<String> = pending
                .iter()
                .filter_map(|p| match p {
                    Value::Array(items) => items.first().and_then(reply::string),
                    _ => None,
                })
                .collect();
            let entries: redis::streams::StreamRangeReply = self
                .query_idem(
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(limit),
                )
                .await?;
            for e in entries.ids {
                let undelivered = parse_entry_id(&e.id).is_some_and(|id| id > last_delivered);
                if !undelivered && !pending.contains(&e.id) {
                    continue;
                }
                let job: Option<String> = e.get("job");
                if let Some(job) = job.and_then(|j| ValidJob::from_field(Some(&j)).ok()) {
                    live.insert(crate::store::outbox_id(
                        &job.job_id,
                        job.action,
                        job.idx,
                        job.fence,
                    ));
                }
            }
        }
        Ok(live)
    }

    /// Removes entries every consumer is done with (below the oldest pending one, or below the
    /// first undelivered one). Never removes a pending or undelivered entry. Returns how many
    /// entries were removed.
    pub async fn trim_acked(&self) -> Result<u64> {
        let mut removed = 0;
        for lane in LANES {
            let mut inv = scripts::TRIM_SCRIPT.prepare_invoke();
            inv.key(self.stream(lane)).arg(GROUP);
            let n: i64 = inv.invoke_async(&mut self.connection()).await?;
            removed += n.max(0) as u64;
        }
        Ok(removed)
    }
}

/// `ms-seq` as a comparable pair.
fn parse_entry_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

enum ClaimReply {
    Claimed(Delivery),
    Empty { tails: [String; 2], held: u64 },
}
