//! The engine on its own OS thread.
//!
//! candle calls are long and synchronous; on a tokio worker thread one would stall every task
//! behind it (lease renewals included, which would let another worker reclaim a live job). So
//! one `std::thread` loads the model, owns the device and serves requests from a channel; async
//! code awaits a oneshot reply. Progress crosses back through a `watch` channel (a send never
//! blocks and only the latest value matters), cancellation through an `Arc<AtomicBool>` the
//! observer reads before every step. A panic inside a generation is caught on the engine thread
//! and fails that request only; the thread and the loaded model stay up.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::engine::preset::ModelPreset;
use crate::engine::{Engine, EngineError, Flow, GenerateRequest, Progress, StageTimings};

/// Why the actor could not produce images.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The generation panicked; the engine thread survived it.
    #[error("the engine panicked: {0}")]
    Panicked(String),
    /// The engine thread is gone (load failed, or the daemon is shutting down).
    #[error("the engine thread has stopped")]
    Stopped,
}

impl ActorError {
    /// Engine errors decide for themselves; a panic is a bug that the same input would hit
    /// again, so it is permanent; a stopped engine is not coming back in this process.
    pub fn is_retryable(&self) -> bool {
        match self {
            ActorError::Engine(e) => e.is_retryable(),
            ActorError::Panicked(_) | ActorError::Stopped => false,
        }
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self, ActorError::Engine(EngineError::Cancelled))
    }
}

/// What a generation returns across the thread boundary: pixels, no device tensors.
#[derive(Debug)]
pub struct Rendered {
    pub images: Vec<image::RgbaImage>,
    pub timings: StageTimings,
}

/// The async side's handle on a generation in flight.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Set to stop at the next step (the generation then fails with `Cancelled`).
    pub cancel: Arc<AtomicBool>,
    /// The latest progress report.
    pub progress: watch::Sender<Option<Progress>>,
}

impl RunControl {
    pub fn new() -> (Self, watch::Receiver<Option<Progress>>) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                cancel: Arc::new(AtomicBool::new(false)),
                progress: tx,
            },
            rx,
        )
    }
}

struct Job {
    req: GenerateRequest,
    control: RunControl,
    reply: oneshot::Sender<Result<Rendered, ActorError>>,
}

/// Counters the actor keeps (for metrics and tests).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Generations started (one per batch).
    pub calls: AtomicU64,
    /// Time spent inside the engine, in microseconds.
    pub busy_micros: AtomicU64,
}

/// A cheap, cloneable handle on the engine thread.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    preset: Arc<ModelPreset>,
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Starts the engine thread and loads the model there with `load`; returns once the model
    /// is resident (or its load failed).
    pub async fn spawn<F>(load: F) -> Result<EngineHandle, ActorError>
    where
        F: FnOnce() -> Result<Engine, EngineError> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("popcon-engine".into())
            .spawn(move || {
                let engine = match std::panic::catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(engine)) => engine,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(ActorError::Engine(e)));
                        return;
                    }
                    Err(p) => {
                        let _ = ready_tx.send(Err(ActorError::Panicked(panic_text(&*p))));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(engine.preset().clone()));
                // Ends when every handle is dropped.
                while let Some(job) = rx.blocking_recv() {
                    let result = serve(&engine, &job, &thread_stats);
                    let _ = job.reply.send(result);
                }
                tracing::info!("engine thread stopped");
            })
            .map_err(|e| ActorError::Engine(EngineError::Device(format!("engine thread: {e}"))))?;
        let preset = ready_rx.await.map_err(|_| ActorError::Stopped)??;
        Ok(EngineHandle {
            tx,
            preset: Arc::new(preset),
            stats,
        })
    }

    /// The loaded model's preset (defaults for steps, size, strength).
    pub fn preset(&self) -> &ModelPreset {
        &self.preset
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Runs one batch on the engine thread.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        control: RunControl,
    ) -> Result<Rendered, ActorError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                req,
                control,
                reply,
            })
            .await
            .map_err(|_| ActorError::Stopped)?;
        rx.await.map_err(|_| ActorError::Stopped)?
    }
}

/// Bench only (cargo feature `bench-engine`, never in a default build): an engine that does
/// no diffusion. Each request is answered at once with blank images of the requested size, so
/// a benchmark measures the daemon's own claim → gates → write → ack overhead. It runs on its
/// own thread and keeps the same stats as the real actor.
#[cfg(feature = "bench-engine")]
impl EngineHandle {
    pub fn spawn_noop(preset: ModelPreset) -> EngineHandle {
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("popcon-engine-noop".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    thread_stats.calls.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let (w, h) = (job.req.width as u32, job.req.height as u32);
                    let images = (0..job.req.prompts.len())
                        .map(|_| image::RgbaImage::new(w, h))
                        .collect();
                    thread_stats
                        .busy_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    let _ = job.reply.send(Ok(Rendered {
                        images,
                        timings: StageTimings::default(),
                    }));
                }
            })
            .expect("spawn the no-op engine thread");
        EngineHandle {
            tx,
            preset: Arc::new(preset),
            stats,
        }
    }
}

fn serve(engine: &Engine, job: &Job, stats: &EngineStats) -> Result<Rendered, ActorError> {
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let cancel = job.control.cancel.clone();
    let progress = job.control.progress.clone();
    let mut observer = move |p: Progress| {
        // `send_replace` never blocks and works with no receiver left.
        progress.send_replace(Some(p));
        if cancel.load(Ordering::Relaxed) {
            Flow::Cancel
        } else {
            Flow::Continue
        }
    };
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        engine.generate(&job.req, &mut observer)
    }));
    let busy = started
        .elapsed()
        .min(Duration::from_secs(u64::MAX / 1_000_000));
    stats
        .busy_micros
        .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
    match result {
        Ok(Ok(g)) => Ok(Rendered {
            images: g.images,
            timings: g.timings,
        }),
        Ok(Err(e)) => Err(ActorError::Engine(e)),
        Err(p) => {
            let text = panic_text(&*p);
            tracing::error!(panic = %text, "the engine panicked; failing this job only");
            Err(ActorError::Panicked(text))
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_or_failing_load_is_an_error_not_a_crash() {
        let err = EngineHandle::spawn(|| panic!("boom in load"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ActorError::Panicked(m) if m.contains("boom")),
            "{err}"
        );
        assert!(!err.is_retryable());
        let err = EngineHandle::spawn(|| Err(EngineError::InvalidRequest("nope".into())))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            ActorError::Engine(EngineError::InvalidRequest(_))
        ));
    }
}
