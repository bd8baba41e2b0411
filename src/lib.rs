//! popcon-worker: a GPU worker daemon with embedded Stable Diffusion inference.
//!
//! An API enqueues image jobs in Redis; the daemon claims them, runs the pose and emoji
//! diffusion pipeline through candle (CUDA in production, CPU anywhere), stores the images and
//! writes the results. This crate is the library behind the `popcon-worker` binary.
//!
//! Module map (one concern each; see `DESIGN.md` in the shared folder for the contracts):
//!
//! - [`engine`]: candle — model presets, weights (local folder or the Hugging Face cache, fetched
//!   with hf-hub), CLIP tokenizer and text encoders, UNet, VAE, schedulers, per-image seeded
//!   noise, batched txt2img / img2img with progress and cancellation.
//! - [`pipeline`]: what the product asks of the engine — the head-to-toe pose prompt, the emoji
//!   prompts, post-processing (background key, thumbnails, PNG). No Redis, no SQL.
//! - [`kernels`]: our own CUDA kernels (`kernels/*.cu`, feature `cuda`), each with a CPU twin
//!   that is the reference and the path used everywhere else.
//!
//! - [`job`]: ids, actions, statuses and the queue message (`RawMessage` → `ValidJob`).
//! - [`action`]: one file per action — allowed statuses, lane, costliness, price key, seed
//!   rule, pre-flip and worker step — read by the enqueue side, the queue and the worker.
//!
//! - [`queue`]: Redis streams, leases, reclaim, dead letters, run-once keys, off-hours.
//! - [`store`]: the job database (SQLite or Postgres), fenced writes.
//! - [`blobs`]: result images (a local directory; object storage later), public thumbnail
//!   paths and signed URLs.
//! - [`config`]: the daemon's settings from flags and the environment.
//! - [`worker`]: the daemon loop, the engine thread, metrics, shutdown.
//! - [`enqueue`]: the API side — claim, status check, charge + pre-flip, dispatch, and the
//!   compensating rollback; shared by the HTTP API and the `enqueue` CLI.
//!   Every dispatch goes through the transactional outbox; [`worker::reconcile`] publishes
//!   what the fast path did not and re-enqueues what Redis lost.
//! - [`failpoint`]: process-death failpoints for the fault tests (`POPCON_FAILPOINTS`).
//! - [`auth`]: API users and their hashed bearer tokens.
//! - [`http`]: axum — the enqueue API, the archive, image files and the streamed zip download,
//!   and the probes (`/healthz`, `/readyz`, `/metrics`).
//! - [`telemetry`]: the Prometheus registries behind both `/metrics` (one per worker or API,
//!   histograms for durations).

pub mod action;
pub mod auth;
pub mod blobs;
pub mod config;
pub mod engine;
pub mod enqueue;
pub mod failpoint;
pub mod http;
pub mod job;
pub mod kernels;
pub mod pipeline;
pub mod queue;
pub mod redact;
pub mod store;
pub mod telemetry;
pub mod worker;
