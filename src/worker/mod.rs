//! The daemon loop: claim → gates → run-once guard → pipeline → write → ack; and shutdown.
//!
//! # Gates, in order, before any GPU work
//!
//! 1. **Validation** ([`ValidJob::from_field`]): a message that does not validate is
//!    dead-lettered at once with the reason; the loop keeps going.
//! 2. **Off-hours**: inside the queue's claim script — a costly entry is never handed out while
//!    the flag exists, so the worker simply claims with `allow_costly = true`.
//! 3. **Run-once key** ([`Queue::acquire_run`]): another delivery of the same action (same job,
//!    action, idx) is being worked on right now, here or elsewhere. The duplicate is *not*
//!    acked blindly: the key does not carry the fence, so the holder may be running an older
//!    fence whose write will be superseded, and acking a newer message would lose it. Instead
//!    the database decides: a message whose fence is stale, or whose rows already settled, is
//!    acked (`superseded`); otherwise it is left pending with [`Queue::retry_after`] one lease
//!    out, and its next delivery meets the fence/status gates after the holder finished — at
//!    which point it is acked without GPU work (or runs, if the holder's work was superseded).
//! 4. **Fence** ([`Store::start_emoji`]): a row carrying a newer fence → `superseded`, acked.
//! 5. **Status**: a row already past `running` for this fence → acked as already handled.
//!
//! # Seeds
//!
//! Emoji `i` of a set uses `job.seed + i` (as the engine's batch convention and the store's
//! docs say), so a retry of a failed emoji reproduces the image the set would have had, and a
//! redelivery after a crash writes the same pixels. A regenerate must differ from what it
//! replaces yet stay reproducible for its own redeliveries: it mixes seed, idx and the fence
//! ([`regenerate_seed`]). The pose uses its own mix of the job seed ([`pose_seed`]).
//!
//! # Shutdown
//!
//! The shutdown signal stops claiming at once (a blocked claim wait is dropped; should the drop
//! land inside the claim script, the entry is found in our pending list and released). The
//! jobs in flight (one in the engine, up to `engine.prefetch` claimed ahead) get
//! `shutdown.grace` to finish; past it, a generation is cancelled at its next diffusion step
//! and its entry is [`Queue::release`]d (idle time pushed past the lease, delivery count put
//! back) so any other worker's next reclaim takes it at once. Rows it started stay `running`
//! under the same fence, which `start_emoji` accepts from the next worker; nothing was
//! written, so nothing is charged twice.
//!
//! # Lost leases
//!
//! A lost lease stops the job only when another worker now owns the entry or holds the run-once
//! key. When nobody does (Redis restarted without its data), the job finishes: stopping would
//! strand its rows `running` with no entry left to redeliver, and the fenced writes make
//! finishing safe.

pub mod engine_actor;
pub mod metrics;
pub mod reconcile;
pub mod shutdown;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::action::Step;
use crate::blobs::{self, BlobError, Blobs};
use crate::config::WorkerConfig;
use crate::engine::motion_preset::AnimationRegistry;
use crate::engine::preset::PresetRegistry;
use crate::engine::weights::ModelFiles;
use crate::engine::{Engine, EngineOptions, GenerateRequest, Progress, Stage, StageTimings};
use crate::job::{Action, EmojiStatus, ValidJob, charge_key};
use crate::pipeline::animation::AnimationError;
use crate::pipeline::post::{self, ImageError, ImageLimits};
use crate::pipeline::prompt::PromptError;
use crate::pipeline::{set, sticker};
use crate::queue::{DeadLetterOutcome, Delivery, Lease, OwnedOutcome, Queue, QueueError, RunGuard};
use crate::store::{
    EmojiOutcome, JobRecord, OutboxEntry, RefundOutcome, StartOutcome, Store, StoreError,
    StoreOptions, Thumbnail, WriteOutcome, outbox_id,
};
use engine_actor::{ActorError, EngineHandle, Engines, Rendered, RunControl};
use metrics::{Metrics, inc};
pub use shutdown::{Shutdown, ShutdownTrigger, shutdown_channel};

/// Everything that can fail a job or the daemon, each retryable or permanent.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Engine(#[from] ActorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("bad prompt input: {0}")]
    Prompt(#[from] PromptError),
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("animation: {0}")]
    Animation(#[from] AnimationError),
    #[error("job `{0}` does not exist")]
    JobMissing(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl WorkerError {
    /// Whether the same work may succeed later: each layer decides for its own errors.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Engine(e) => e.is_retryable(),
            WorkerError::Store(e) => e.is_retryable(),
            WorkerError::Queue(e) => e.is_retryable(),
            WorkerError::Blob(e) => e.is_retryable(),
            WorkerError::Prompt(_)
            | WorkerError::Image(_)
            | WorkerError::Animation(_)
            | WorkerError::JobMissing(_)
            | WorkerError::Config(_) => false,
        }
    }
}

/// The claimed entry a job runs under, with its lease and run-once key.
struct Claim<'a> {
    delivery: &'a Delivery,
    lease: &'a Lease,
    guard: &'a RunGuard,
}

/// Why a job stopped before finishing.
#[derive(Debug)]
enum Stop {
    /// The grace period ran out during shutdown: release the entry.
    Shutdown,
    /// Another worker owns the entry now (or the run-once key was lost): touch nothing.
    LeaseLost(String),
    /// `{p}cancel:{job_id}` was set: fail the rows, ack.
    Cancelled,
    Failed(WorkerError),
}

impl<E: Into<WorkerError>> From<E> for Stop {
    fn from(e: E) -> Self {
        Stop::Failed(e.into())
    }
}

/// How a job ended when it did not stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Work done and written.
    Done,
    /// Every row had a newer fence: stale message, no GPU.
    Superseded,
    /// Nothing to do (rows already settled for this fence).
    AlreadyHandled,
}

// The seeds live with the set pipeline; re-exported where the worker's users found them.
pub use crate::pipeline::set::{emoji_seed, pose_seed, regenerate_seed};

/// The daemon: connected, model loaded, ready to [`Worker::run`].
pub struct Worker {
    cfg: WorkerConfig,
    queue: Queue,
    store: Store,
    blobs: Blobs,
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    /// Entry ids this process has handed to a job task.
    handled: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// Loads the configured image model and animation model on a new engine thread. Both stay
/// resident: approve (animation) and the set pipeline share one worker and one queue lane
/// set, so a worker that could do only one of them would block the other's entries behind
/// its own (see the README's "Models").
pub async fn spawn_engine(cfg: &WorkerConfig) -> Result<EngineHandle, WorkerError> {
    let e = cfg.engine.clone();
    let registry = PresetRegistry::load(&e.models_dir).map_err(ActorError::from)?;
    let preset = registry.get(&e.model).map_err(ActorError::from)?.clone();
    let files = ModelFiles::locate(&preset, &e.models_dir, e.model_dir.as_deref())
        .map_err(ActorError::from)?;
    let anims = AnimationRegistry::load(&e.models_dir).map_err(ActorError::from)?;
    let anim = anims.get(&e.animation).map_err(ActorError::from)?.clone();
    let base = registry.get(&anim.base).map_err(ActorError::from)?.clone();
    // Both located before anything loads: a missing download is one error at start-up.
    let base_files = ModelFiles::locate(&base, &e.models_dir, None).map_err(ActorError::from)?;
    let adapter_files = ModelFiles::locate(&anim, &e.models_dir, None).map_err(ActorError::from)?;
    let started = Instant::now();
    let handle = EngineHandle::spawn_engines(move || {
        let options = EngineOptions {
            device: e.device,
            dtype: None,
            ..Default::default()
        };
        let image = Engine::load(&preset, &files, &options)?;
        let animation =
            Engine::load_animation(&anim, &base, &base_files, &adapter_files, &options)?;
        Ok(Engines {
            image,
            animation: Some((animation, anim)),
        })
    })
    .await?;
    tracing::info!(
        model = %handle.preset().name,
        animation = handle.animation().map_or("", |a| a.preset.name.as_str()),
        took = ?started.elapsed(),
        "models loaded"
    );
    Ok(handle)
}

impl Worker {
    /// Start-up: database (with migrations), Redis (with backoff; groups created), server
    /// checks (logged loudly), and the model, loaded once.
    pub async fn start(cfg: WorkerConfig) -> Result<Worker, WorkerError> {
        let engine = spawn_engine(&cfg).await?;
        Self::start_with_engine(cfg, engine).await
    }

    /// [`Worker::start`] with an engine that is already loaded (tests share one between
    /// several in-process workers).
    pub async fn start_with_engine(
        cfg: WorkerConfig,
        engine: EngineHandle,
    ) -> Result<Worker, WorkerError> {
        let store = Store::connect_with(&cfg.store.url, StoreOptions::default()).await?;
        let blobs = Blobs::open(&cfg.blobs)?;
        let queue = Queue::connect(cfg.queue.clone()).await?;
        match queue.check_server().await {
            Ok(warnings) => {
                for w in warnings {
                    tracing::warn!(warning = %w, "REDIS PUTS QUEUED WORK AT RISK");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not check the redis configuration"),
        }
        Ok(Worker {
            cfg,
            queue,
            store,
            blobs,
            engine,
            metrics: Arc::new(Metrics::default()),
            handled: Default::default(),
        })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The Prometheus text for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let s = self.engine.stats();
        self.metrics.render(
            Duration::from_micros(s.busy_micros.load(Ordering::Relaxed)),
            s.calls.load(Ordering::Relaxed),
        )
    }

    /// Whether Redis and the database answer (the model is loaded by construction).
    pub async fn ready(&self) -> Result<(), WorkerError> {
        // A plain PING: readiness probes must not write (the off-hours status call may).
        self.queue.query_idem::<String>(&redis::cmd("PING")).await?;
        self.store.ping().await?;
        Ok(())
    }

    /// The loop, until `shutdown` fires. Returns after the jobs in flight finished or were
    /// released.
    ///
    /// Up to `1 + engine.prefetch` jobs are in flight: while one is in the engine, the next is
    /// already claimed, gated and waiting in the engine's channel, and the previous one's
    /// uploads and database writes run beside it, so the engine is never idle waiting for
    /// I/O. The engine thread itself still runs one generation at a time.
    pub async fn run(self: &Arc<Self>, shutdown: Shutdown) -> Result<(), WorkerError> {
        tracing::info!(consumer = %self.queue.config().consumer, "worker running");
        let slots = 1 + self.cfg.engine.prefetch;
        let mut inflight = tokio::task::JoinSet::new();
        // Our own pending entries first: a restart of this consumer resumes its work.
        match self.queue.own_pending(100, true).await {
            Ok(taken) => {
                for d in taken.deleted {
                    tracing::warn!(lane = d.lane.as_str(), id = %d.id, "pending entry was deleted from its stream");
                }
                for d in taken.deliveries {
                    while inflight.len() >= slots {
                        inflight.join_next().await;
                    }
                    self.spawn_job(&mut inflight, d, &shutdown);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not re-read own pending entries"),
        }
        let mut last_reclaim: Option<Instant> = None;
        let mut last_reconcile: Option<Instant> = None;
        // A failing claim (Redis down, the group gone) backs off 100 ms doubling to 5 s, jittered
        // so a fleet of workers does not hammer a recovering Redis in lockstep; any answer resets it.
        let claim_backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times();
        let mut backoff = backon::BackoffBuilder::build(claim_backoff);
        let mut claim_interrupted = false;
        while !shutdown.is_triggered() {
            // A free slot first: claiming more than we can start would only age entries.
            if inflight.len() >= slots {
                tokio::select! {
                    _ = inflight.join_next() => {}
                    _ = shutdown.wait() => break,
                }
                continue;
            }
            if last_reclaim.is_none_or(|t| t.elapsed() >= self.cfg.retry.reclaim_every) {
                last_reclaim = Some(Instant::now());
                self.reclaim(&mut inflight, slots, &shutdown).await;
                match self.queue.depth().await {
                    Ok(depth) => self.metrics.set_depth(depth),
                    Err(e) => tracing::debug!(error = %e, "queue depth not read"),
                }
                self.metrics.upkeep();
                if inflight.len() >= slots {
                    continue;
                }
            }
            if last_reconcile.is_none_or(|t| t.elapsed() >= self.cfg.reconcile.every) {
                last_reconcile = Some(Instant::now());
                match reconcile::pass(&self.store, &self.queue, &self.cfg.reconcile, &self.metrics)
                    .await
                {
                    Ok(r) if r.relayed + r.republished + r.gave_up > 0 => {
                        tracing::info!(report = ?r, "reconcile pass")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reconcile pass failed; next pass retries")
                    }
                }
            }
            let claimed = tokio::select! {
                r = self.queue.claim_next(true) => r,
                _ = shutdown.wait() => {
                    claim_interrupted = true;
                    break;
                }
            };
            match claimed {
                Ok(Some(d)) => {
                    backoff = backon::BackoffBuilder::build(claim_backoff);
                    self.spawn_job(&mut inflight, d, &shutdown);
                }
                Ok(None) => backoff = backon::BackoffBuilder::build(claim_backoff),
                Err(e) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?delay, "claiming failed");
                    if e.is_no_group() {
                        let _ = self.queue.ensure_groups().await;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait() => break,
                    }
                }
            }
        }
        // The jobs in flight see the same signal: each finishes within the grace or is
        // cancelled and released.
        while let Some(r) = inflight.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "a job task ended abnormally");
            }
        }
        // A claim dropped mid-flight may have left an entry in our pending list: hand it
        // back now rather than after a lease.
        if claim_interrupted && let Ok(taken) = self.queue.own_pending(100, true).await {
            for d in taken.deliveries {
                // Entries this run already handled decided their own fate (acked, released,
                // or left pending on purpose for a retry or after a duplicate).
                if !self.seen(&d.id) {
                    self.release(&d).await;
                }
            }
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    fn seen(&self, id: &str) -> bool {
        self.handled.lock().map(|s| s.contains(id)).unwrap_or(true)
    }

    fn spawn_job(
        self: &Arc<Self>,
        inflight: &mut tokio::task::JoinSet<()>,
        d: Delivery,
        shutdown: &Shutdown,
    ) {
        if let Ok(mut seen) = self.handled.lock() {
            // Bounded: only the ids of one run's recent deliveries matter for the final sweep.
            if seen.len() > 10_000 {
                seen.clear();
            }
            seen.insert(d.id.clone());
        }
        let worker = self.clone();
        let shutdown = shutdown.clone();
        inflight.spawn(async move { worker.handle_or_release(d, &shutdown).await });
    }

    async fn reclaim(
        self: &Arc<Self>,
        inflight: &mut tokio::task::JoinSet<()>,
        slots: usize,
        shutdown: &Shutdown,
    ) {
        let free = slots.saturating_sub(inflight.len()).max(1);
        match self.queue.reclaim_idle(free, true).await {
            Ok(taken) => {
                for d in taken.deleted {
                    tracing::warn!(lane = d.lane.as_str(), id = %d.id, "pending entry was deleted from its stream");
                }
                for d in taken.deliveries {
                    inc(&self.metrics.reclaimed);
                    tracing::info!(id = %d.id, deliveries = d.delivery_count, "reclaimed an idle entry");
                    while inflight.len() >= slots {
                        inflight.join_next().await;
                    }
                    self.spawn_job(inflight, d, shutdown);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reclaiming idle entries failed"),
        }
    }

    async fn handle_or_release(&self, d: Delivery, shutdown: &Shutdown) {
        if shutdown.is_triggered() {
            self.release(&d).await;
        } else {
            self.handle(d, shutdown).await;
        }
    }

    async fn release(&self, d: &Delivery) {
        match self.queue.release(d).await {
            Ok(OwnedOutcome::Done) => {
                inc(&self.metrics.released);
                tracing::info!(id = %d.id, "released to another worker");
            }
            Ok(other) => tracing::info!(id = %d.id, outcome = ?other, "nothing to release"),
            Err(e) => {
                tracing::warn!(id = %d.id, error = %e, "release failed; the entry will be reclaimed after the lease")
            }
        }
    }

    /// One delivery, through every gate.
    async fn handle(&self, d: Delivery, shutdown: &Shutdown) {
        inc(&self.metrics.claimed);
        let job = match d.job() {
            Ok(job) => job,
            Err(e) => {
                tracing::warn!(id = %d.id, reason = %e, "invalid message");
                self.dead_letter(&d, &e.to_string(), None).await;
                return;
            }
        };
        let span = tracing::info_span!("job", job_id = %job.job_id, action = %job.action, idx = ?job.idx, fence = job.fence, entry = %d.id);
        self.handle_job(d, job, shutdown).instrument(span).await
    }

    async fn handle_job(&self, d: Delivery, job: ValidJob, shutdown: &Shutdown) {
        let guard = match self.queue.acquire_run(&job).await {
            Ok(Some(g)) => g,
            Ok(None) => return self.defer_duplicate(&d, &job).await,
            Err(e) => return self.failed(&d, &job, e.into()).await,
        };
        let lease = self.queue.start_lease(&d, Some(guard.clone()));
        if self.queue.exhausted(&d) && self.is_stale(&job).await {
            // A deferred duplicate can run out of deliveries while the owner works; once the
            // owner is done it is simply stale, not a failure.
            lease.stop();
            self.ack(&d).await;
            inc(&self.metrics.superseded);
            tracing::info!("out of deliveries but already handled; acked");
        } else if self.queue.exhausted(&d) {
            let reason = format!(
                "gave up after {} deliveries (the worker kept stopping mid-job)",
                d.delivery_count
            );
            self.dead_letter(&d, &reason, Some(&job)).await;
        } else {
            let started = Instant::now();
            let claim = Claim {
                delivery: &d,
                lease: &lease,
                guard: &guard,
            };
            let outcome = self.execute(&job, &claim, shutdown).await;
            lease.stop();
            match outcome {
                Ok(Finished::Done) => {
                    self.ack(&d).await;
                    inc(&self.metrics.succeeded);
                    tracing::info!(took = ?started.elapsed(), "job done");
                }
                Ok(Finished::Superseded) => {
                    self.ack(&d).await;
                    inc(&self.metrics.superseded);
                    tracing::info!("superseded by a newer fence; acked without GPU work");
                }
                Ok(Finished::AlreadyHandled) => {
                    self.ack(&d).await;
                    tracing::info!("already handled for this fence; acked");
                }
                Err(Stop::Shutdown) => self.release(&d).await,
                Err(Stop::LeaseLost(why)) => {
                    tracing::warn!(%why, "lease lost; leaving the entry to its new owner")
                }
                Err(Stop::Cancelled) => {
                    self.mark_failed(&job, "cancelled on request").await;
                    // A cancelled animation leaves its still `done` under the message's fence:
                    // without this the reconciler would publish the message again.
                    self.settle_outbox(&job).await;
                    let _ = self.queue.clear_cancel(&job.job_id).await;
                    self.ack(&d).await;
                    tracing::info!("cancelled on request");
                }
                Err(Stop::Failed(e)) => self.failed(&d, &job, e).await,
            }
        }
        if let Err(e) = guard.release().await {
            tracing::warn!(error = %e, "could not release the run-once key; it expires after the lease");
        }
    }

    /// The run-once key is held elsewhere: see the module header.
    async fn defer_duplicate(&self, d: &Delivery, job: &ValidJob) {
        inc(&self.metrics.duplicates);
        if self.is_stale(job).await {
            self.ack(d).await;
            inc(&self.metrics.superseded);
            tracing::info!("duplicate of settled or stale work; acked without GPU work");
            return;
        }
        let delay = self.queue.config().lease;
        match self.queue.retry_after(d, delay).await {
            Ok(_) => tracing::info!(
                retry_in = ?delay,
                "the same action is running elsewhere; left pending for after it"
            ),
            Err(e) => tracing::warn!(error = %e, "could not defer a duplicate"),
        }
    }

    /// Keeps in `started` the rows that are still `running` under this message's fence;
    /// returns true when none is left (the job moved on: stop without writing).
    async fn still_running(&self, job: &ValidJob, started: &mut Vec<u32>) -> Result<bool, Stop> {
        let rec = self
            .store
            .get_job(&job.job_id)
            .await?
            .ok_or_else(|| WorkerError::JobMissing(job.job_id.clone()))?;
        let before = started.len();
        started.retain(|&i| {
            rec.emoji.iter().any(|e| {
                e.idx == i && e.fence == job.fence && e.status == crate::job::EmojiStatus::Running
            })
        });
        if started.len() < before {
            tracing::warn!(
                left = started.len(),
                before,
                "rows moved on while this worker held them (another worker finished them, or a newer action)"
            );
        }
        Ok(started.is_empty())
    }

    /// Whether the database says this message has nothing left to do: every row it names
    /// carries another fence, or (for diffusion) has settled. Unknown (a read error, a missing
    /// job) counts as not stale, so the normal gates decide.
    async fn is_stale(&self, job: &ValidJob) -> bool {
        match self.store.get_job(&job.job_id).await {
            Ok(Some(rec)) => rec
                .emoji
                .iter()
                .filter(|e| job.idx.is_none_or(|i| i == e.idx))
                .all(|e| match job.action.spec().step {
                    Step::Render => e.fence != job.fence || e.status.is_settled(),
                    // An approval is done when the row left `done` (approved, or replaced).
                    Step::AnimateOne => e.fence != job.fence || e.status != EmojiStatus::Done,
                    // Each row carries the fence approve-all gave it; any still done is work.
                    Step::AnimateAll => e.status != EmojiStatus::Done,
                }),
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the job to judge staleness");
                false
            }
        }
    }

    async fn ack(&self, d: &Delivery) {
        if let Err(e) = self.queue.ack(d).await {
            // The writes are fenced, so a redelivery of this entry is harmless.
            tracing::warn!(id = %d.id, error = %e, "ack failed; a redelivery will be superseded");
        }
    }

    /// A failed attempt: retry with backoff while retryable and deliveries remain, else
    /// dead-letter and fail the rows.
    async fn failed(&self, d: &Delivery, job: &ValidJob, err: WorkerError) {
        inc(&self.metrics.failed);
        let max = u64::from(self.queue.config().max_deliveries);
        if err.is_retryable() && d.delivery_count < max {
            let exp = d.delivery_count.saturating_sub(1).min(16) as u32;
            let delay = (self.cfg.retry.base * 2u32.pow(exp)).min(self.cfg.retry.max);
            tracing::warn!(error = %err, retry_in = ?delay, deliveries = d.delivery_count, "attempt failed; will retry");
            if let Err(e) = self.queue.retry_after(d, delay).await {
                tracing::warn!(error = %e, "could not schedule the retry; the entry will be reclaimed after the lease");
            }
            return;
        }
        let reason = if err.is_retryable() {
            format!("gave up after {} deliveries: {err}", d.delivery_count)
        } else {
            err.to_string()
        };
        tracing::error!(%reason, "job failed permanently");
        self.dead_letter(d, &reason, Some(job)).await;
    }

    /// Marks the rows failed (fenced, so a newer message's rows are untouched), then moves the
    /// entry to the dead-letter stream. Rows first: if Redis is down the entry is redelivered
    /// and finds the rows settled; the other order could leave rows `running` for ever.
    async fn dead_letter(&self, d: &Delivery, reason: &str, job: Option<&ValidJob>) {
        if let Some(job) = job {
            self.mark_failed(job, reason).await;
            self.refund(job, reason).await;
            self.settle_outbox(job).await;
        }
        match self.queue.dead_letter(d, reason).await {
            Ok(DeadLetterOutcome::DeadLettered(_)) => inc(&self.metrics.dead_lettered),
            Ok(other) => tracing::info!(outcome = ?other, "dead letter not written"),
            Err(e) => tracing::error!(error = %e, "dead-lettering failed; the entry stays pending"),
        }
    }

    /// The outbox entry of this message, if it is still there (the rows it names still wait).
    async fn outbox_entry(&self, job: &ValidJob) -> Option<OutboxEntry> {
        let id = outbox_id_of(job);
        match self.store.outbox_entry(&id).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, outbox = %id, "could not read the outbox entry");
                None
            }
        }
    }

    /// The message was given up (dead letter, cancel): its outbox entry goes, so the
    /// reconciler does not publish it again and its rows can be acted on anew. A failed render
    /// has failed its rows already; a failed animation leaves its stills `done` under the
    /// message's fence, which would otherwise read as "still waiting" (and "being approved").
    async fn settle_outbox(&self, job: &ValidJob) {
        let id = outbox_id_of(job);
        if let Err(e) = self.store.outbox_remove(&id).await {
            tracing::error!(error = %e, outbox = %id, "could not remove the outbox entry; the reconciler will publish it again");
        }
    }

    /// Gives back what the enqueue side charged for this message: the work will not be done.
    /// Exactly once however often it is asked (the refund's idempotency key), and nothing
    /// when the action was free or enqueued without a charge. approve_all charged each row it
    /// bumped, under the row's fence at the time (its outbox entry's targets); rows bumped
    /// since were paid for by a newer action and are not this message's to refund.
    async fn refund(&self, job: &ValidJob, reason: &str) {
        let keys: Vec<String> = if job.action == Action::ApproveAll {
            self.approve_all_refund_keys(job).await
        } else {
            vec![job.charge_key()]
        };
        let why = format!("refund: {reason}");
        for key in keys {
            match self.store.refund_charge(&key, &why).await {
                Ok(RefundOutcome::Refunded {
                    user_id, amount, ..
                }) => {
                    inc(&self.metrics.refunded);
                    tracing::info!(%user_id, amount, charge = %key, "charge refunded");
                }
                Ok(RefundOutcome::AlreadyRefunded | RefundOutcome::NoCharge) => {}
                Err(e) => tracing::error!(error = %e, charge = %key, "could not refund the charge"),
            }
        }
    }

    /// approve-all's charges for the rows it bumped (its outbox entry's targets) that are still
    /// `done` under that fence: a row approved by an earlier batch of this message got its
    /// animation and keeps its charge. Without the entry nothing is this message's to refund:
    /// it is removed only once every target moved on, and the charge keys of rows as they are
    /// now could name a newer approve-all's charges.
    async fn approve_all_refund_keys(&self, job: &ValidJob) -> Vec<String> {
        let Some(entry) = self.outbox_entry(job).await else {
            tracing::info!("no outbox entry for this approve-all; nothing to refund");
            return Vec::new();
        };
        let rec = match self.store.get_job(&job.job_id).await {
            Ok(Some(rec)) => rec,
            Ok(None) => return Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "could not read the job to refund approve_all");
                return Vec::new();
            }
        };
        unanimated(&rec, &entry.targets)
            .into_iter()
            .map(|(idx, fence)| charge_key(&job.job_id, Action::ApproveAll, Some(idx), fence))
            .collect()
    }

    async fn mark_failed(&self, job: &ValidJob, reason: &str) {
        if !job.action.spec().step.fails_rows() {
            return; // a failed animation leaves the still as it was (done, approvable)
        }
        let r = match job.idx {
            Some(idx) => self
                .store
                .fail_emoji(&job.job_id, idx, job.fence, reason)
                .await
                .map(|_| ()),
            None => self
                .store
                .fail_unsettled(&job.job_id, job.fence, reason)
                .await
                .map(|_| ()),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "could not mark the rows failed");
        }
    }

    async fn execute(
        &self,
        job: &ValidJob,
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<Finished, Stop> {
        match job.action.spec().step {
            Step::AnimateOne | Step::AnimateAll => self.animate(job, claim, shutdown).await,
            Step::Render => self.diffuse(job, claim, shutdown).await,
        }
    }

    /// Pose (if needed) and the emoji of the message, as one batch.
    async fn diffuse(
        &self,
        job: &ValidJob,
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<Finished, Stop> {
        let rec = self
            .store
            .get_job(&job.job_id)
            .await?
            .ok_or_else(|| WorkerError::JobMissing(job.job_id.clone()))?;
        let wanted: Vec<u32> = match job.idx {
            Some(i) => vec![i],
            None => rec.emoji.iter().map(|e| e.idx).collect(),
        };
        let mut started = Vec::new();
        let mut superseded = 0;
        for idx in wanted {
            match self.store.start_emoji(&job.job_id, idx, job.fence).await? {
                StartOutcome::Started { .. } => started.push(idx),
                StartOutcome::Superseded { .. } => superseded += 1,
                StartOutcome::WrongState(s) => {
                    tracing::debug!(idx, status = s.as_str(), "row already past running")
                }
                StartOutcome::Missing => {
                    return Err(
                        WorkerError::JobMissing(format!("{} emoji {idx}", job.job_id)).into(),
                    );
                }
            }
        }
        if started.is_empty() {
            return Ok(if superseded > 0 {
                Finished::Superseded
            } else {
                Finished::AlreadyHandled
            });
        }

        // Checked again right before each costly stage: a worker that stalled after
        // starting the rows may resume after another worker finished them.
        if self.still_running(job, &mut started).await? {
            return Ok(Finished::AlreadyHandled);
        }
        let pose = self.pose_image(&rec, job, claim, shutdown).await?;
        if self.still_running(job, &mut started).await? {
            return Ok(Finished::AlreadyHandled);
        }
        let rows: Vec<(u32, &str)> = started
            .iter()
            .map(|&idx| {
                let label = rec
                    .emoji
                    .iter()
                    .find(|e| e.idx == idx)
                    .map_or("", |e| e.label.as_str());
                (idx, label)
            })
            .collect();
        let set::EmojiBatch {
            request: req,
            seeds,
        } = set::emoji_request(
            self.engine.preset(),
            set_spec(&rec),
            &rows,
            job.fence,
            job.action.spec().seed,
            pose,
            self.overrides(),
        )?;
        let progress_slots: Vec<Option<u32>> = started.iter().map(|&i| Some(i)).collect();
        let rendered = self
            .render(req, job, &progress_slots, "emoji", claim, shutdown)
            .await?;

        let rendered_for = started.clone();
        if self.still_running(job, &mut started).await? {
            return Ok(Finished::AlreadyHandled);
        }
        for ((idx, seed), img) in rendered_for.iter().copied().zip(seeds).zip(rendered.images) {
            if !started.contains(&idx) {
                continue; // another worker wrote this row meanwhile
            }
            let files = set::emoji_files(img)?;
            let upload = Instant::now();
            let image_key = blobs::keys::emoji(&job.job_id, idx, job.fence);
            self.blobs.put(&image_key, files.image_png).await?;
            let thumb_key = blobs::keys::thumb(&job.job_id, idx, job.fence);
            self.blobs.put(&thumb_key, files.thumbnail_png).await?;
            self.metrics.observe("upload", upload.elapsed());
            let write = Instant::now();
            let outcome = EmojiOutcome {
                job_id: job.job_id.clone(),
                idx,
                fence: job.fence,
                image_key,
                seed,
                thumbnail: (idx == 0)
                    .then(|| {
                        self.blobs.public_url(&thumb_key).map(|path| Thumbnail {
                            path,
                            key: thumb_key.clone(),
                        })
                    })
                    .transpose()?,
            };
            match self.store.finish_emoji(&outcome).await? {
                WriteOutcome::Written { settled } => {
                    if let Some(s) = settled {
                        tracing::info!(status = s.as_str(), "job settled");
                    }
                }
                other => {
                    tracing::info!(idx, outcome = ?other, "result not written (row moved on)")
                }
            }
            self.metrics.observe("db_write", write.elapsed());
        }
        Ok(Finished::Done)
    }

    /// approve / approve-all: animate the done rows the message names, then approve each with
    /// its animation in one fenced write. Clips go to the engine `engine.animate_batch` at a
    /// time; each batch re-checks that its rows are still `done` under their fence first, so
    /// a row regenerated meanwhile costs no GPU time.
    async fn animate(
        &self,
        job: &ValidJob,
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<Finished, Stop> {
        let info =
            self.engine.animation().cloned().ok_or_else(|| {
                WorkerError::Config("this worker loaded no animation model".into())
            })?;
        let rec = self
            .store
            .get_job(&job.job_id)
            .await?
            .ok_or_else(|| WorkerError::JobMissing(job.job_id.clone()))?;
        let mut targets: Vec<(u32, u64)> = Vec::new();
        match job.idx {
            Some(idx) => {
                let row = rec.emoji.iter().find(|e| e.idx == idx).ok_or_else(|| {
                    WorkerError::JobMissing(format!("{} emoji {idx}", job.job_id))
                })?;
                if row.fence > job.fence {
                    return Ok(Finished::Superseded);
                }
                if row.fence != job.fence || row.status != EmojiStatus::Done {
                    tracing::debug!(
                        idx,
                        status = row.status.as_str(),
                        "row is not done under this fence"
                    );
                    return Ok(Finished::AlreadyHandled);
                }
                targets.push((idx, row.fence));
            }
            // The rows this approve-all bumped (and charged), from its outbox entry: not every
            // done row, since one that became done later, or is being approved by its own
            // button, is not this message's.
            None => match self.outbox_entry(job).await {
                Some(entry) => targets.extend(unanimated(&rec, &entry.targets)),
                None => {
                    tracing::info!("no outbox entry for this approve-all: settled or given up");
                    return Ok(Finished::AlreadyHandled);
                }
            },
        }
        if targets.is_empty() {
            return Ok(Finished::AlreadyHandled);
        }
        let batch = self.cfg.engine.animate_batch.max(1);
        let mut written = 0usize;
        for chunk in targets.chunks(batch) {
            // Fresh rows right before the costly call: a stalled worker may resume late.
            let now = self
                .store
                .get_job(&job.job_id)
                .await?
                .ok_or_else(|| WorkerError::JobMissing(job.job_id.clone()))?;
            let mut rows = Vec::with_capacity(chunk.len());
            for &(idx, fence) in chunk {
                match now.emoji.iter().find(|e| e.idx == idx) {
                    Some(e) if e.fence == fence && e.status == EmojiStatus::Done => {
                        let key = e.image_key.clone().ok_or_else(|| {
                            WorkerError::Config(format!("done emoji {idx} has no image"))
                        })?;
                        rows.push((idx, fence, e.label.clone(), key));
                    }
                    _ => tracing::info!(idx, "row moved on before its animation; skipped"),
                }
            }
            if rows.is_empty() {
                continue;
            }
            let mut stills = Vec::with_capacity(rows.len());
            for (_, _, _, key) in &rows {
                let bytes = self.blobs.get(key).await?;
                let img = image::load_from_memory(&bytes)
                    .map_err(|e| ImageError::Decode(format!("stored emoji {key}: {e}")))?
                    .to_rgba8();
                stills.push(img);
            }
            let sticker_rows: Vec<sticker::StickerRow<'_>> = rows
                .iter()
                .zip(&stills)
                .map(|((idx, fence, label, _), still)| sticker::StickerRow {
                    idx: *idx,
                    label,
                    fence: *fence,
                    still,
                })
                .collect();
            let sticker::StickerBatch { request, .. } = sticker::animate_request(
                &info.preset,
                set_spec(&rec),
                &sticker_rows,
                job.action.spec().seed,
            )?;
            let slots: Vec<Option<u32>> = rows.iter().map(|r| Some(r.0)).collect();
            let animated = self
                .animate_clips(request, job, &slots, claim, shutdown)
                .await?;
            for ((idx, fence, _, _), frames) in rows.iter().zip(animated.clips) {
                let files = sticker::sticker_files(
                    frames,
                    info.preset.defaults.fps,
                    info.preset.defaults.loop_blend,
                )?;
                let upload = Instant::now();
                let key = blobs::keys::animation(&job.job_id, *idx, *fence);
                self.blobs.put(&key, files.webp).await?;
                if let Some(apng) = blobs::keys::animation_apng(&key) {
                    self.blobs.put(&apng, files.apng).await?;
                }
                self.metrics.observe("upload", upload.elapsed());
                let write = Instant::now();
                match self
                    .store
                    .approve_emoji_animated(&job.job_id, *idx, *fence, &key)
                    .await?
                {
                    WriteOutcome::Written { .. } => written += 1,
                    WriteOutcome::Missing => {
                        return Err(WorkerError::JobMissing(job.job_id.clone()).into());
                    }
                    other => {
                        tracing::info!(idx, outcome = ?other, "animation not written (row moved on)")
                    }
                }
                self.metrics.observe("db_write", write.elapsed());
            }
        }
        Ok(if written > 0 || job.idx.is_none() {
            Finished::Done
        } else {
            Finished::Superseded
        })
    }

    /// The set's pose image: the stored one when there is one, else generated (img2img from
    /// the reference when the job has one) and stored with its key on the job.
    async fn pose_image(
        &self,
        rec: &JobRecord,
        job: &ValidJob,
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<image::RgbImage, Stop> {
        if let Some(key) = rec.pose_key.as_deref() {
            match self.blobs.get(key).await {
                Ok(bytes) => return Ok(post::decode_image(&bytes, ImageLimits::default())?),
                Err(BlobError::NotFound(_)) => {
                    tracing::warn!(%key, "pose image missing; generating it again")
                }
                Err(e) => return Err(e.into()),
            }
        }
        let reference = match rec.reference_key.as_deref() {
            Some(key) => Some(post::decode_image(
                &self.blobs.get(key).await?,
                ImageLimits::default(),
            )?),
            None => None,
        };
        let req = set::pose_request(
            self.engine.preset(),
            set_spec(rec),
            reference,
            self.overrides(),
        )?;
        let rendered = self
            .render(req, job, &[None], "pose", claim, shutdown)
            .await?;
        let img = rendered
            .images
            .into_iter()
            .next()
            .ok_or_else(|| WorkerError::Config("the engine returned no pose image".into()))?;
        if self.is_stale(job).await {
            // Paused past the lease while another worker finished the set: write nothing.
            return Err(Stop::LeaseLost(
                "the rows moved on during the pose; stopping without writing".into(),
            ));
        }
        let key = blobs::keys::pose(&job.job_id, job.fence);
        self.blobs.put(&key, post::encode_png(&img)?).await?;
        self.store.set_pose_key(&job.job_id, &key).await?;
        Ok(image::DynamicImage::ImageRgba8(img).to_rgb8())
    }

    fn overrides(&self) -> set::Overrides {
        set::Overrides {
            steps: self.cfg.engine.steps,
            strength: self.cfg.engine.strength,
        }
    }

    /// One engine call, with progress written to Redis, cancellation polled, the lease
    /// watched and the shutdown grace enforced.
    async fn render(
        &self,
        req: GenerateRequest,
        job: &ValidJob,
        slots: &[Option<u32>],
        what: &str,
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<Rendered, Stop> {
        let (control, progress) = RunControl::new();
        let cancel = control.cancel.clone();
        let fut = self.engine.generate(req, control);
        let r = self
            .supervise(
                fut,
                cancel,
                progress,
                job,
                slots,
                (what, 1),
                claim,
                shutdown,
            )
            .await?;
        self.observe_timings(&r.timings);
        Ok(r)
    }

    /// [`Worker::render`] for a batch of clips: progress counts frames × steps.
    #[allow(clippy::too_many_arguments)]
    async fn animate_clips(
        &self,
        req: crate::engine::animate::AnimateRequest,
        job: &ValidJob,
        slots: &[Option<u32>],
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<engine_actor::Animated, Stop> {
        let frames = req.frames as u32;
        let (control, progress) = RunControl::new();
        let cancel = control.cancel.clone();
        let fut = self.engine.animate(req, control);
        let r = self
            .supervise(
                fut,
                cancel,
                progress,
                job,
                slots,
                ("animate", frames),
                claim,
                shutdown,
            )
            .await?;
        self.observe_timings(&r.timings);
        Ok(r)
    }

    fn observe_timings(&self, t: &StageTimings) {
        for (stage, d) in [
            ("text_encode", t.text_encode),
            ("vae_encode", t.vae_encode),
            ("denoise", t.denoise),
            ("vae_decode", t.vae_decode),
        ] {
            self.metrics.observe(stage, d);
        }
    }

    /// Awaits an engine call while writing its progress (denoise steps scaled by `scale`:
    /// the frames of a clip), polling cancellation, watching the lease and enforcing the
    /// shutdown grace.
    #[allow(clippy::too_many_arguments)]
    async fn supervise<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, ActorError>>,
        cancel: Arc<std::sync::atomic::AtomicBool>,
        mut progress: tokio::sync::watch::Receiver<Option<Progress>>,
        job: &ValidJob,
        slots: &[Option<u32>],
        (what, scale): (&str, u32),
        claim: &Claim<'_>,
        shutdown: &Shutdown,
    ) -> Result<T, Stop> {
        let job_id = job.job_id.as_str();
        tokio::pin!(fut);
        let mut poll = tokio::time::interval(Duration::from_millis(250));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop: Option<Stop> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut progress_open = true;
        let mut orphaned = false;
        let result = loop {
            tokio::select! {
                r = &mut fut => break r,
                changed = progress.changed(), if progress_open => {
                    if changed.is_err() {
                        progress_open = false;
                        continue;
                    }
                    let p = *progress.borrow_and_update();
                    if let Some(p) = p {
                        self.write_progress(job_id, slots, what, scale, p).await;
                    }
                }
                _ = poll.tick(), if stop.is_none() => {
                    if let Ok(true) = self.queue.is_cancelled(job_id).await {
                        stop = Some(Stop::Cancelled);
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                why = claim.lease.lost(), if stop.is_none() && !orphaned => {
                    // A worker that was paused (SIGSTOP, a long GC-like stall) past its lease
                    // may find the job finished by another: the database says so even when
                    // Redis no longer does, and then nothing is written twice.
                    if self.is_stale(job).await {
                        tracing::warn!(%why, "lease lost and the rows moved on; stopping without writing");
                        stop = Some(Stop::LeaseLost(why));
                        cancel.store(true, Ordering::Relaxed);
                    } else if self.taken_over(claim).await {
                        stop = Some(Stop::LeaseLost(why));
                        cancel.store(true, Ordering::Relaxed);
                    } else {
                        // Nobody else has it (e.g. Redis restarted without its data): stopping
                        // would strand the rows `running` with no entry left to redeliver.
                        // Finishing is safe: the writes are fenced.
                        tracing::warn!(%why, "lease lost but no other worker holds the job; finishing it");
                        orphaned = true;
                    }
                }
                _ = shutdown.wait(), if deadline.is_none() => {
                    tracing::info!(grace = ?self.cfg.shutdown.grace, "shutting down; the job in flight may finish within the grace period");
                    deadline = Some(tokio::time::Instant::now() + self.cfg.shutdown.grace);
                }
                _ = sleep_until(deadline), if deadline.is_some() && stop.is_none() => {
                    tracing::warn!("grace period over; cancelling the job in flight");
                    stop = Some(Stop::Shutdown);
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        };
        match result {
            Ok(r) => Ok(r),
            Err(e) if e.is_cancelled() => Err(stop.unwrap_or(Stop::Cancelled)),
            Err(e) => Err(e.into()),
        }
    }

    /// After a lost lease: whether another worker now owns the entry or holds the run-once
    /// key (then it does the work, and we stop). When Redis cannot tell, assume it does: two
    /// runs cost GPU time, but a stranded job costs the user the result.
    async fn taken_over(&self, claim: &Claim<'_>) -> bool {
        match self.queue.renew(claim.delivery).await {
            Ok(OwnedOutcome::OwnedBy(owner)) => {
                tracing::info!(%owner, "another worker owns the entry now");
                return true;
            }
            // No group: Redis lost its data, so no other worker can hold the entry either.
            Ok(_) => {}
            Err(e) if e.is_no_group() => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot check who owns the entry");
                return true;
            }
        }
        match self
            .queue
            .query_idem::<Option<String>>(redis::cmd("GET").arg(claim.guard.key()))
            .await
        {
            Ok(Some(token)) => token != claim.guard.token(),
            Ok(None) => false,
            Err(_) => true,
        }
    }

    async fn write_progress(
        &self,
        job_id: &str,
        slots: &[Option<u32>],
        what: &str,
        scale: u32,
        p: Progress,
    ) {
        // Denoising a clip works on all its frames at each step: frames × steps in all.
        let (step, total) = match p.stage {
            Stage::Denoise => (p.step as u32 * scale, p.total as u32 * scale),
            _ => (p.step as u32, p.total as u32),
        };
        let stage = match p.stage {
            Stage::TextEncode => "text_encode",
            Stage::VaeEncode => "vae_encode",
            Stage::Denoise => "denoise",
            Stage::VaeDecode => "vae_decode",
        };
        let stage = format!("{what}:{stage}");
        for &slot in slots {
            if let Err(e) = self
                .queue
                .set_progress(job_id, slot, step, total, &stage)
                .await
            {
                tracing::debug!(error = %e, "progress not written");
                return;
            }
        }
    }
}

fn set_spec(rec: &JobRecord) -> set::SetSpec<'_> {
    set::SetSpec {
        subject: &rec.subject,
        style: rec.style.as_deref(),
        seed: rec.seed,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The id of the outbox entry `job` was published from.
fn outbox_id_of(job: &ValidJob) -> String {
    outbox_id(&job.job_id, job.action, job.idx, job.fence)
}

/// The rows of `targets` that are still `done` under the fence named there: what an
/// approve-all has not animated yet.
pub(crate) fn unanimated(rec: &JobRecord, targets: &[(u32, u64)]) -> Vec<(u32, u64)> {
    rec.emoji
        .iter()
        .filter(|e| e.status == EmojiStatus::Done)
        .map(|e| (e.idx, e.fence))
        .filter(|pair| targets.contains(pair))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_their_layer() {
        assert!(!WorkerError::JobMissing("j".into()).is_retryable());
        assert!(!WorkerError::Prompt(PromptError::Empty { field: "subject" }).is_retryable());
        assert!(
            WorkerError::Blob(BlobError::Io {
                path: "x".into(),
                source: std::io::Error::other("disk full"),
            })
            .is_retryable()
        );
        assert!(!WorkerError::Engine(ActorError::Panicked("bug".into())).is_retryable());
        assert!(
            WorkerError::Engine(ActorError::Engine(crate::engine::EngineError::Device(
                "out of memory".into()
            )))
            .is_retryable()
        );
        assert!(WorkerError::Store(StoreError::PoolTimeout).is_retryable());
    }
}
