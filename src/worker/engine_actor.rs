//! The engines on their own OS thread: the image model and, when the worker animates, the
//! animation model (an SD 1.5 base with its motion adapter), both resident.
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

use crate::engine::animate::AnimateRequest;
use crate::engine::motion_preset::AnimationPreset;
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

/// What a clip batch returns: per clip, its frames.
#[derive(Debug)]
pub struct Animated {
    pub clips: Vec<Vec<image::RgbaImage>>,
    pub timings: StageTimings,
}

enum Work {
    Generate(
        GenerateRequest,
        oneshot::Sender<Result<Rendered, ActorError>>,
    ),
    Animate(
        AnimateRequest,
        oneshot::Sender<Result<Animated, ActorError>>,
    ),
}

struct Job {
    work: Work,
    control: RunControl,
}

/// The models one engine thread holds.
pub struct Engines {
    pub image: Engine,
    /// With its preset; `None`: this worker does not animate.
    pub animation: Option<(Engine, AnimationPreset)>,
}

/// What the async side knows of the animation model.
#[derive(Debug, Clone)]
pub struct AnimationInfo {
    pub preset: AnimationPreset,
    /// The adapter's longest clip.
    pub max_frames: usize,
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
    animation: Option<Arc<AnimationInfo>>,
    stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Starts the engine thread and loads the model there with `load`; returns once the model
    /// is resident (or its load failed).
    pub async fn spawn<F>(load: F) -> Result<EngineHandle, ActorError>
    where
        F: FnOnce() -> Result<Engine, EngineError> + Send + 'static,
    {
        Self::spawn_engines(move || {
            Ok(Engines {
                image: load()?,
                animation: None,
            })
        })
        .await
    }

    /// [`EngineHandle::spawn`] for both models: `load` builds the image engine and the
    /// animation engine, which then share the thread (one generation at a time on the device).
    pub async fn spawn_engines<F>(load: F) -> Result<EngineHandle, ActorError>
    where
        F: FnOnce() -> Result<Engines, EngineError> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job>(4);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(EngineStats::default());
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("popcon-engine".into())
            .spawn(move || {
                let engines = match std::panic::catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(engines)) => engines,
                    Ok(Err(e)) => {
                        let _ = ready_tx.send(Err(ActorError::Engine(e)));
                        return;
                    }
                    Err(p) => {
                        let _ = ready_tx.send(Err(ActorError::Panicked(panic_text(&*p))));
                        return;
                    }
                };
                let info = engines.animation.as_ref().map(|(e, p)| AnimationInfo {
                    preset: p.clone(),
                    max_frames: e.motion_spec().map_or(0, |s| s.max_frames),
                });
                let _ = ready_tx.send(Ok((engines.image.preset().clone(), info)));
                // Ends when every handle is dropped.
                while let Some(job) = rx.blocking_recv() {
                    serve(&engines, job, &thread_stats);
                }
                tracing::info!("engine thread stopped");
            })
            .map_err(|e| ActorError::Engine(EngineError::Device(format!("engine thread: {e}"))))?;
        let (preset, animation) = ready_rx.await.map_err(|_| ActorError::Stopped)??;
        Ok(EngineHandle {
            tx,
            preset: Arc::new(preset),
            animation: animation.map(Arc::new),
            stats,
        })
    }

    /// The animation model's preset and limits (`None`: this worker does not animate).
    pub fn animation(&self) -> Option<&AnimationInfo> {
        self.animation.as_deref()
    }

    /// Animates one batch of clips on the engine thread.
    pub async fn animate(
        &self,
        req: AnimateRequest,
        control: RunControl,
    ) -> Result<Animated, ActorError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                work: Work::Animate(req, reply),
                control,
            })
            .await
            .map_err(|_| ActorError::Stopped)?;
        rx.await.map_err(|_| ActorError::Stopped)?
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
                work: Work::Generate(req, reply),
                control,
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
                    match job.work {
                        Work::Generate(req, reply) => {
                            let (w, h) = (req.width as u32, req.height as u32);
                            let images = (0..req.prompts.len())
                                .map(|_| image::RgbaImage::new(w, h))
                                .collect();
                            let _ = reply.send(Ok(Rendered {
                                images,
                                timings: StageTimings::default(),
                            }));
                        }
                        Work::Animate(req, reply) => {
                            let (w, h) = (req.width as u32, req.height as u32);
                            let clips = (0..req.prompts.len())
                                .map(|_| vec![image::RgbaImage::new(w, h); req.frames])
                                .collect();
                            let _ = reply.send(Ok(Animated {
                                clips,
                                timings: StageTimings::default(),
                            }));
                        }
                    }
                    thread_stats
                        .busy_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
            })
            .expect("spawn the no-op engine thread");
        EngineHandle {
            tx,
            preset: Arc::new(preset),
            animation: None,
            stats,
        }
    }
}

fn serve(engines: &Engines, job: Job, stats: &EngineStats) {
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
    match job.work {
        Work::Generate(req, reply) => {
            let r = guarded(|| engines.image.generate(&req, &mut observer)).map(|g| Rendered {
                images: g.images,
                timings: g.timings,
            });
            let _ = reply.send(r);
        }
        Work::Animate(req, reply) => {
            let r = match &engines.animation {
                Some((engine, _)) => {
                    guarded(|| engine.animate(&req, &mut observer)).map(|a| Animated {
                        clips: a.clips,
                        timings: a.timings,
                    })
                }
                None => Err(ActorError::Engine(EngineError::InvalidRequest(
                    "this worker loaded no animation model (see --animation)".into(),
                ))),
            };
            let _ = reply.send(r);
        }
    }
    let busy = started
        .elapsed()
        .min(Duration::from_secs(u64::MAX / 1_000_000));
    stats
        .busy_micros
        .fetch_add(busy.as_micros() as u64, Ordering::Relaxed);
}

/// Runs one engine call, turning a panic into this request's error.
fn guarded<T>(f: impl FnOnce() -> Result<T, EngineError>) -> Result<T, ActorError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
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
