//! The outbox relay and the reconciler: the database is the source of truth for what must
//! run, Redis only carries it.
//!
//! Every dispatch is first an outbox entry, committed with the charge and the pre-flip it
//! belongs to ([`crate::store::OutboxEntry`]). The enqueue side publishes it at once; one pass
//! here, run by every worker every [`ReconcileConfig::every`] (elected by a short Redis lock,
//! so two workers rarely do the same pass — and a repeat is harmless anyway: the worker's
//! fence and run-once key make a second entry for one message a no-op):
//!
//! 1. **Relay.** An entry never published after [`ReconcileConfig::relay_after`] (the `api`
//!    died between commit and `XADD`, or Redis was down) is published now.
//! 2. **Reconcile.** An entry published more than [`ReconcileConfig::lost_after`] ago whose
//!    rows still wait for it, and whose message is neither undelivered nor pending in any
//!    stream (Redis restarted without its data, a failover to an empty replica, `FLUSHALL`), is
//!    published again. After [`ReconcileConfig::max_republish`] publishes the job is given up:
//!    its rows are failed and its charges refunded. A charged job is run or refunded, never
//!    left.
//! 3. **Prune.** An entry whose rows have moved on (done, failed, a newer fence) is removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::job::{Action, charge_key};
use crate::queue::Queue;
use crate::store::{OutboxEntry, RefundOutcome, Store};
use crate::worker::WorkerError;
use crate::worker::metrics::{Metrics, inc};

/// When the relay and the reconciler act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// How often a worker runs a pass.
    pub every: Duration,
    /// An entry not published this long after its commit is published by the relay.
    pub relay_after: Duration,
    /// A published entry whose message is gone from the streams this long after its last
    /// publish, while its rows still wait, is published again.
    pub lost_after: Duration,
    /// Publishes after which a lost message's job is failed and refunded instead.
    pub max_republish: u32,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            every: Duration::from_secs(5),
            relay_after: Duration::from_secs(5),
            lost_after: Duration::from_secs(60),
            max_republish: 5,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Another worker held the pass lock: nothing was done.
    pub skipped: bool,
    pub relayed: u64,
    pub republished: u64,
    pub gave_up: u64,
    pub pruned: u64,
}

/// Entries read per pass (the oldest first); the next pass takes the rest.
const BATCH: u32 = 500;
/// Stream entries read per lane to judge what is still queued.
const STREAM_SCAN: usize = 100_000;

/// One relay + reconcile pass over the outbox.
pub async fn pass(
    store: &Store,
    queue: &Queue,
    cfg: &ReconcileConfig,
    metrics: &Arc<Metrics>,
) -> Result<PassReport, WorkerError> {
    let mut report = PassReport::default();
    if !queue.try_lock_pass("reconcile", cfg.every).await? {
        report.skipped = true;
        return Ok(report);
    }
    let now = Utc::now();
    let ago = |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let due = store
        .outbox_due(ago(cfg.relay_after), ago(cfg.lost_after), BATCH)
        .await?;
    let mut live: Option<HashSet<String>> = None;
    for entry in due {
        let job = store.get_job(&entry.job_id).await?;
        let waiting = job.as_ref().is_some_and(|j| entry.unsettled_in(j));
        if !waiting {
            store.outbox_remove(&entry.id).await?;
            report.pruned += 1;
            continue;
        }
        if entry.published_at.is_none() {
            publish(store, queue, &entry).await?;
            report.relayed += 1;
            inc(&metrics.outbox_relayed);
            tracing::warn!(outbox = %entry.id, "relayed an entry the enqueue side did not publish");
            continue;
        }
        if live.is_none() {
            live = Some(queue.live_messages(STREAM_SCAN).await?);
        }
        if live.as_ref().is_some_and(|l| l.contains(&entry.id)) {
            continue; // still queued or in a worker's hands
        }
        if entry.publishes >= cfg.max_republish {
            give_up(store, &entry, metrics).await?;
            report.gave_up += 1;
            continue;
        }
        publish(store, queue, &entry).await?;
        report.republished += 1;
        inc(&metrics.reconciled);
        tracing::warn!(outbox = %entry.id, publishes = entry.publishes + 1, "the queue lost this message; re-enqueued it from the database");
    }
    let stats = store.outbox_stats().await?;
    metrics.set_outbox(stats, Utc::now());
    Ok(report)
}

async fn publish(store: &Store, queue: &Queue, entry: &OutboxEntry) -> Result<(), WorkerError> {
    queue.enqueue(&entry.message()).await?;
    store.outbox_published(&entry.id).await?;
    Ok(())
}

/// The message was lost again and again: fail its rows (fenced) and refund its charges.
async fn give_up(
    store: &Store,
    entry: &OutboxEntry,
    metrics: &Arc<Metrics>,
) -> Result<(), WorkerError> {
    let reason = format!(
        "the queue lost this job {} times; given up and refunded",
        entry.publishes
    );
    tracing::error!(outbox = %entry.id, %reason);
    if entry.action.spec().step.fails_rows() {
        for &(idx, fence) in &entry.targets {
            store.fail_emoji(&entry.job_id, idx, fence, &reason).await?;
        }
    }
    let keys: Vec<String> = match entry.action {
        // Only the rows it has not animated: an earlier batch's approvals keep their charge.
        Action::ApproveAll => match store.get_job(&entry.job_id).await? {
            Some(rec) => super::unanimated(&rec, &entry.targets)
                .into_iter()
                .map(|(idx, fence)| charge_key(&entry.job_id, Action::ApproveAll, Some(idx), fence))
                .collect(),
            None => Vec::new(),
        },
        _ => vec![entry.message().charge_key()],
    };
    for key in keys {
        if let RefundOutcome::Refunded { .. } = store
            .refund_charge(&key, &format!("refund: {reason}"))
            .await?
        {
            inc(&metrics.refunded);
        }
    }
    store.outbox_remove(&entry.id).await?;
    inc(&metrics.reconcile_gave_up);
    Ok(())
}
