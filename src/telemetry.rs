//! Prometheus metrics for both `/metrics` endpoints (the worker's and the API's), through the
//! `metrics` facade and `metrics-exporter-prometheus`.
//!
//! Each [`Registry`] is its own recorder, never the process-global one: tests run several
//! workers and APIs in one process, and each must count only its own work. Handles
//! (`Counter`, `Gauge`, `Histogram`) are registered through [`Registry::with`] and then used
//! anywhere. Durations are true Prometheus histograms (buckets, not the exporter's default
//! summaries), so they can be aggregated across workers.

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Buckets of pipeline stages: milliseconds (a database write) to minutes (a big batch).
pub const STAGE_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets of HTTP requests: a probe answers in well under a millisecond, an upload decode in
/// up to a few seconds.
pub const REQUEST_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One recorder and the handle that renders it.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A recorder whose `*_request_duration_seconds` histograms use [`REQUEST_BUCKETS`] and
    /// every other `*_seconds` histogram [`STAGE_BUCKETS`].
    pub fn new() -> Registry {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_request_duration_seconds".into()),
                &REQUEST_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &STAGE_BUCKETS)
            });
        // The exporter refuses only an empty bucket list; ours are constants.
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(e) => unreachable!("constant histogram buckets refused: {e}"),
        };
        let handle = recorder.handle();
        Registry { recorder, handle }
    }

    /// Runs `f` with this registry as the recorder of the `metrics` macros (`counter!`,
    /// `gauge!`, `histogram!`, `describe_*!`), e.g. to register a handle.
    pub fn with<R>(&self, f: impl FnOnce() -> R) -> R {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets. Rendering does this too; call it
    /// periodically so a process nobody scrapes does not keep every sample.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The value of an unlabelled counter, read back from the rendered text (tests and the
    /// CLI's summaries; `None` when it was never registered).
    pub fn counter_value(&self, name: &str) -> Option<u64> {
        self.render().lines().find_map(|l| {
            let (n, v) = l.split_once(' ')?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        })
    }
}
