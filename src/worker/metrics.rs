//! The worker's counters, gauges and stage histograms, on its own [`Registry`].
//!
//! Every handle is registered once, when the worker is built, so `/metrics` lists every series
//! (at zero) from the first scrape; a dashboard never has to tell "no data" from "none yet".

use metrics::{Counter, Gauge, Histogram, Unit};
use std::sync::Arc;
use std::time::Duration;

use crate::queue::QueueDepth;
use crate::telemetry::Registry;

/// Stages whose durations are recorded.
pub const STAGES: [&str; 6] = [
    "text_encode",
    "vae_encode",
    "denoise",
    "vae_decode",
    "upload",
    "db_write",
];

/// The job counters: field, `popcon_jobs_{name}_total`, help.
macro_rules! job_counters {
    ($($field:ident => $help:literal,)*) => {
        /// What the worker counts. Cheap to share behind an `Arc`.
        pub struct Metrics {
            $(#[doc = $help] pub $field: Counter,)*
            stages: [Histogram; 6],
            engine_busy: Gauge,
            engine_calls: Counter,
            outbox_unpublished: Gauge,
            outbox_entries: Gauge,
            outbox_oldest: Gauge,
            registry: Arc<Registry>,
        }

        impl Metrics {
            pub fn new() -> Metrics {
                let registry = Arc::new(Registry::new());
                let own = registry.clone();
                registry.with(move || {
                    $(metrics::describe_counter!(concat!("popcon_jobs_", stringify!($field), "_total"), $help);)*
                    metrics::describe_histogram!("popcon_stage_seconds", Unit::Seconds, "Time per pipeline stage");
                    metrics::describe_gauge!(
                        "popcon_engine_busy_seconds",
                        Unit::Seconds,
                        "Time the engine thread spent generating since start (monotonic; use rate())"
                    );
                    metrics::describe_counter!("popcon_engine_calls_total", "Engine calls (one batch each)");
                    metrics::describe_gauge!("popcon_outbox_unpublished", "Outbox entries not yet published");
                    metrics::describe_gauge!(
                        "popcon_outbox_entries",
                        "Outbox entries kept while their rows may need them"
                    );
                    metrics::describe_gauge!(
                        "popcon_outbox_oldest_unpublished_seconds",
                        Unit::Seconds,
                        "Age of the oldest unpublished outbox entry"
                    );
                    metrics::describe_gauge!("popcon_queue_depth", "Stream entries by lane and state");
                    Metrics {
                        $($field: metrics::counter!(concat!("popcon_jobs_", stringify!($field), "_total")),)*
                        stages: STAGES.map(|s| metrics::histogram!("popcon_stage_seconds", "stage" => s)),
                        engine_busy: metrics::gauge!("popcon_engine_busy_seconds"),
                        engine_calls: metrics::counter!("popcon_engine_calls_total"),
                        outbox_unpublished: metrics::gauge!("popcon_outbox_unpublished"),
                        outbox_entries: metrics::gauge!("popcon_outbox_entries"),
                        outbox_oldest: metrics::gauge!("popcon_outbox_oldest_unpublished_seconds"),
                        registry: own,
                    }
                })
            }

            /// A job counter's current value by its short name (`"succeeded"`), read back from
            /// the exporter: what `/metrics` shows is what this returns.
            pub fn total(&self, name: &str) -> u64 {
                self.registry
                    .counter_value(&format!("popcon_jobs_{name}_total"))
                    .unwrap_or(0)
            }
        }
    };
}

job_counters! {
    claimed => "Stream entries claimed",
    succeeded => "Entries finished and acked",
    failed => "Attempts that failed",
    dead_lettered => "Entries moved to the dead-letter stream",
    refunded => "Charges refunded for dead-lettered entries",
    superseded => "Entries acked as superseded (stale fence), no GPU",
    reclaimed => "Entries taken over from idle consumers",
    duplicates => "Deliveries deferred because the run-once key was held",
    released => "Entries released at shutdown",
    outbox_relayed => "Outbox entries published by the relay (the enqueue side had not)",
    reconciled => "Messages re-enqueued from the database after the queue lost them",
    reconcile_gave_up => "Jobs failed and refunded after their message was lost too often",
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Adds one to a counter.
pub fn inc(c: &Counter) {
    c.increment(1);
}

impl Metrics {
    /// Records one run of `stage` (a name from [`STAGES`]; others are ignored).
    pub fn observe(&self, stage: &str, d: Duration) {
        if let Some(i) = STAGES.iter().position(|s| *s == stage) {
            self.stages[i].record(d.as_secs_f64());
        }
    }

    pub fn set_outbox(&self, stats: crate::store::OutboxStats, at: chrono::DateTime<chrono::Utc>) {
        let oldest = stats.oldest_unpublished.map_or(0.0, |t| {
            ((at - t).num_milliseconds().max(0) as f64) / 1000.0
        });
        self.outbox_unpublished.set(stats.unpublished as f64);
        self.outbox_entries.set(stats.total as f64);
        self.outbox_oldest.set(oldest);
    }

    pub fn set_depth(&self, depth: QueueDepth) {
        self.registry.with(|| {
            for l in [&depth.interactive, &depth.bulk] {
                let lane = l.lane.as_str();
                metrics::gauge!("popcon_queue_depth", "lane" => lane, "state" => "pending")
                    .set(l.pending as f64);
                if let Some(u) = l.undelivered {
                    metrics::gauge!("popcon_queue_depth", "lane" => lane, "state" => "undelivered")
                        .set(u as f64);
                }
            }
            metrics::gauge!("popcon_queue_depth", "lane" => "dead", "state" => "dead")
                .set(depth.dead as f64);
        });
    }

    /// The Prometheus exposition text; `engine_busy` and `engine_calls` are the engine
    /// thread's own totals, copied in at scrape time.
    pub fn render(&self, engine_busy: Duration, engine_calls: u64) -> String {
        self.engine_busy.set(engine_busy.as_secs_f64());
        self.engine_calls.absolute(engine_calls);
        self.registry.render()
    }

    /// See [`Registry::upkeep`].
    pub fn upkeep(&self) {
        self.registry.upkeep();
    }
}
