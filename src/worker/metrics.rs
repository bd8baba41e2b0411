//! The worker's counters and gauges, rendered in the Prometheus text format.
//!
//! Plain atomics and a hand-written renderer: the set is small and fixed, and it keeps the
//! daemon free of a global metrics registry (each in-process worker in tests has its own).

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::queue::QueueDepth;

/// Stages whose durations are recorded.
pub const STAGES: [&str; 6] = [
    "text_encode",
    "vae_encode",
    "denoise",
    "vae_decode",
    "upload",
    "db_write",
];

/// What the worker counts. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub claimed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub refunded: AtomicU64,
    pub superseded: AtomicU64,
    pub reclaimed: AtomicU64,
    pub duplicates: AtomicU64,
    pub released: AtomicU64,
    /// Outbox entries the relay published (the enqueue side had not).
    pub outbox_relayed: AtomicU64,
    /// Messages re-enqueued from the database after the queue lost them.
    pub reconciled: AtomicU64,
    /// Jobs failed and refunded after their message was lost too often.
    pub reconcile_gave_up: AtomicU64,
    /// Per stage: (count, total microseconds), indexed like [`STAGES`].
    stages: [StageSum; 6],
    depth: Mutex<Option<QueueDepth>>,
    /// The outbox as the last reconcile pass saw it, and when.
    outbox: Mutex<Option<(crate::store::OutboxStats, chrono::DateTime<chrono::Utc>)>>,
}

#[derive(Debug, Default)]
struct StageSum {
    count: AtomicU64,
    micros: AtomicU64,
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Records one run of `stage` (a name from [`STAGES`]; others are ignored).
    pub fn observe(&self, stage: &str, d: Duration) {
        if let Some(i) = STAGES.iter().position(|s| *s == stage) {
            self.stages[i].count.fetch_add(1, Ordering::Relaxed);
            self.stages[i]
                .micros
                .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        }
    }

    pub fn set_outbox(&self, stats: crate::store::OutboxStats, at: chrono::DateTime<chrono::Utc>) {
        if let Ok(mut o) = self.outbox.lock() {
            *o = Some((stats, at));
        }
    }

    pub fn set_depth(&self, depth: QueueDepth) {
        if let Ok(mut d) = self.depth.lock() {
            *d = Some(depth);
        }
    }

    /// The Prometheus exposition text; `engine_busy` is the engine thread's busy time.
    pub fn render(&self, engine_busy: Duration, engine_calls: u64) -> String {
        let mut out = String::new();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, help, v) in [
            ("claimed", "Stream entries claimed", get(&self.claimed)),
            (
                "succeeded",
                "Entries finished and acked",
                get(&self.succeeded),
            ),
            ("failed", "Attempts that failed", get(&self.failed)),
            (
                "dead_lettered",
                "Entries moved to the dead-letter stream",
                get(&self.dead_lettered),
            ),
            (
                "refunded",
                "Charges refunded for dead-lettered entries",
                get(&self.refunded),
            ),
            (
                "superseded",
                "Entries acked as superseded (stale fence), no GPU",
                get(&self.superseded),
            ),
            (
                "reclaimed",
                "Entries taken over from idle consumers",
                get(&self.reclaimed),
            ),
            (
                "duplicates",
                "Deliveries deferred because the run-once key was held",
                get(&self.duplicates),
            ),
            (
                "released",
                "Entries released at shutdown",
                get(&self.released),
            ),
            (
                "outbox_relayed",
                "Outbox entries published by the relay (the enqueue side had not)",
                get(&self.outbox_relayed),
            ),
            (
                "reconciled",
                "Messages re-enqueued from the database after the queue lost them",
                get(&self.reconciled),
            ),
            (
                "reconcile_gave_up",
                "Jobs failed and refunded after their message was lost too often",
                get(&self.reconcile_gave_up),
            ),
        ] {
            let _ = writeln!(out, "# HELP popcon_jobs_{name}_total {help}");
            let _ = writeln!(out, "# TYPE popcon_jobs_{name}_total counter");
            let _ = writeln!(out, "popcon_jobs_{name}_total {v}");
        }
        let _ = writeln!(out, "# HELP popcon_stage_seconds Time per pipeline stage");
        let _ = writeln!(out, "# TYPE popcon_stage_seconds summary");
        for (name, s) in STAGES.iter().zip(&self.stages) {
            let secs = get(&s.micros) as f64 / 1e6;
            let _ = writeln!(out, "popcon_stage_seconds_sum{{stage=\"{name}\"}} {secs}");
            let _ = writeln!(
                out,
                "popcon_stage_seconds_count{{stage=\"{name}\"}} {}",
                get(&s.count)
            );
        }
        let _ = writeln!(
            out,
            "# HELP popcon_engine_busy_seconds_total Time the engine thread spent generating"
        );
        let _ = writeln!(out, "# TYPE popcon_engine_busy_seconds_total counter");
        let _ = writeln!(
            out,
            "popcon_engine_busy_seconds_total {}",
            engine_busy.as_secs_f64()
        );
        if let Ok(o) = self.outbox.lock()
            && let Some((stats, at)) = o.as_ref()
        {
            let oldest = stats.oldest_unpublished.map_or(0.0, |t| {
                ((*at - t).num_milliseconds().max(0) as f64) / 1000.0
            });
            for (name, help, v) in [
                (
                    "popcon_outbox_unpublished",
                    "Outbox entries not yet published",
                    stats.unpublished as f64,
                ),
                (
                    "popcon_outbox_entries",
                    "Outbox entries kept while their rows may need them",
                    stats.total as f64,
                ),
                (
                    "popcon_outbox_oldest_unpublished_seconds",
                    "Age of the oldest unpublished outbox entry",
                    oldest,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} gauge");
                let _ = writeln!(out, "{name} {v}");
            }
        }
        let _ = writeln!(out, "# TYPE popcon_engine_calls_total counter");
        let _ = writeln!(out, "popcon_engine_calls_total {engine_calls}");
        if let Ok(d) = self.depth.lock()
            && let Some(d) = d.as_ref()
        {
            let _ = writeln!(
                out,
                "# HELP popcon_queue_depth Stream entries by lane and state"
            );
            let _ = writeln!(out, "# TYPE popcon_queue_depth gauge");
            for l in [&d.interactive, &d.bulk] {
                let lane = l.lane.as_str();
                let _ = writeln!(
                    out,
                    "popcon_queue_depth{{lane=\"{lane}\",state=\"pending\"}} {}",
                    l.pending
                );
                if let Some(u) = l.undelivered {
                    let _ = writeln!(
                        out,
                        "popcon_queue_depth{{lane=\"{lane}\",state=\"undelivered\"}} {u}"
                    );
                }
            }
            let _ = writeln!(
                out,
                "popcon_queue_depth{{lane=\"dead\",state=\"dead\"}} {}",
                d.dead
            );
        }
        out
    }
}
