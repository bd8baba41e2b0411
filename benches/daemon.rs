//! The daemon's own overhead and the engine's feed rate (issue 3's benchmark).
//!
//! Three phases, each on its own key prefix and its own SQLite file, against one real
//! `redis-server` (`$BENCH_REDIS_URL`, else one spawned here):
//!
//! 1. **throughput** — `$BENCH_JOBS` (2000) one-emoji `generate_set` jobs pre-enqueued, then one
//!    worker with the no-op engine ([`EngineHandle::spawn_noop`], feature `bench-engine`)
//!    drains them: claim → gates → start row → pose (blank) → emoji (blank) → PNG + thumbnail
//!    upload → fenced write → ack. jobs/s = (n − 1) / (last result written − first written),
//!    from the rows' `updated_at`. Then one `approve` per row (claim → gates → one write → ack),
//!    measured the same way.
//! 2. **latency** — the worker idle, `$BENCH_LAT_JOBS` (500) jobs enqueued one at a time at
//!    `$BENCH_RATE` (50) per second; latency = the message's `enqueued_at` (read back from the
//!    stream) → the row's `updated_at` of the result write. That is claim *plus* the whole
//!    no-op job, an upper bound on enqueue→claim.
//! 3. **busy** — the real tiny model on CPU: `$BENCH_BUSY_JOBS` (12) sets of 2–4 emoji
//!    pre-enqueued; engine busy seconds (the actor's own counter) / wall time from the worker's
//!    start to the last set settled.
//!
//! Run: `cargo bench --features bench-engine --bench daemon` (or `scripts/bench_daemon.sh`,
//! which adds the Celery baseline). `$BENCH_OUT`: a file to write `key value` lines to.

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use popcon_worker::blobs::{Blobs, BlobsConfig};
use popcon_worker::config::{EngineConfig, RetryConfig, ShutdownConfig, StoreConfig, WorkerConfig};
use popcon_worker::engine::preset::PresetRegistry;
use popcon_worker::enqueue::{self, GenerateSet};
use popcon_worker::job::{Action, EmojiStatus, JobStatus, MESSAGE_VERSION, ValidJob};
use popcon_worker::queue::{Queue, QueueConfig};
use popcon_worker::store::Store;
use popcon_worker::worker::engine_actor::EngineHandle;
use popcon_worker::worker::{Worker, shutdown_channel, spawn_engine};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(redis_url: &str, dir: &std::path::Path, prefix: &str) -> WorkerConfig {
    WorkerConfig {
        queue: QueueConfig {
            redis_url: redis_url.to_string(),
            prefix: prefix.to_string(),
            consumer: "bench".into(),
            ..QueueConfig::default()
        },
        store: StoreConfig {
            url: format!("sqlite://{}", dir.join("popcon.db").display()),
        },
        blobs: BlobsConfig::at(dir.join("results")),
        engine: EngineConfig {
            model: "tiny".into(),
            models_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/models").into(),
            ..EngineConfig::default()
        },
        http: Default::default(),
        shutdown: ShutdownConfig::default(),
        retry: RetryConfig::default(),
    }
}

fn set(i: usize, expressions: &[&str]) -> GenerateSet {
    GenerateSet {
        user_id: "bench".into(),
        subject: format!("a red fox number {i}"),
        style: None,
        expressions: expressions.iter().map(|s| s.to_string()).collect(),
        seed: i as u64,
        model: None,
        reference: None,
        idempotency_key: None,
    }
}

struct Phase {
    worker: Arc<Worker>,
    store: Store,
    queue: Queue,
    blobs: Blobs,
    _dir: tempfile::TempDir,
}

impl Phase {
    async fn new(redis_url: &str, prefix: &str, engine: EngineHandle) -> Phase {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = config(redis_url, dir.path(), prefix);
        let worker = Arc::new(
            Worker::start_with_engine(cfg.clone(), engine)
                .await
                .expect("worker starts"),
        );
        let store = Store::connect(&cfg.store.url).await.expect("store");
        let queue = Queue::connect(cfg.queue.clone()).await.expect("queue");
        let blobs = Blobs::open(&cfg.blobs).expect("blobs");
        Phase {
            worker,
            store,
            queue,
            blobs,
            _dir: dir,
        }
    }

    async fn enqueue(&self, i: usize, expressions: &[&str]) -> String {
        enqueue::generate_set(&self.store, &self.queue, &self.blobs, &set(i, expressions))
            .await
            .expect("enqueue")
            .id
    }

    /// Waits until every job settled (they settle in about enqueue order, so the cursor only
    /// moves forward); returns the instant the last one was seen settled.
    async fn wait_settled(&self, ids: &[String]) -> Instant {
        let mut next = 0;
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            while next < ids.len() {
                let rec = self
                    .store
                    .get_job(&ids[next])
                    .await
                    .expect("read")
                    .expect("job");
                if !matches!(
                    rec.status,
                    JobStatus::Done | JobStatus::Failed | JobStatus::Partial
                ) {
                    break;
                }
                next += 1;
            }
            if next == ids.len() {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "jobs did not settle in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Result-write time of every emoji of each job, and how many rows ended `done`.
    async fn done_times(&self, ids: &[String]) -> (Vec<(String, DateTime<Utc>)>, usize) {
        let mut out = Vec::new();
        let mut done = 0;
        for id in ids {
            let rec = self.store.get_job(id).await.expect("read").expect("job");
            for e in &rec.emoji {
                if e.status == EmojiStatus::Done {
                    done += 1;
                }
                out.push((id.clone(), e.updated_at));
            }
        }
        (out, done)
    }

    /// job id → the `enqueued_at` its stream message carries.
    async fn enqueued_at(&self) -> HashMap<String, DateTime<Utc>> {
        let key = format!("{}jobs:bulk", self.queue.config().prefix);
        let reply: redis::streams::StreamRangeReply = self
            .queue
            .query_idem(redis::cmd("XRANGE").arg(&key).arg("-").arg("+"))
            .await
            .expect("XRANGE");
        let mut out = HashMap::new();
        for entry in reply.ids {
            let Some(job) = entry.get::<String>("job") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(&job).expect("job json");
            let (Some(id), Some(at)) = (v["job_id"].as_str(), v["enqueued_at"].as_str()) else {
                continue;
            };
            let at = DateTime::parse_from_rfc3339(at).expect("enqueued_at");
            out.insert(id.to_string(), at.with_timezone(&Utc));
        }
        out
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn throughput(
    redis_url: &str,
    preset: &popcon_worker::engine::preset::ModelPreset,
) -> (f64, f64) {
    let n: usize = env_or("BENCH_JOBS", 2000);
    let p = Phase::new(
        redis_url,
        "bench-tp:",
        EngineHandle::spawn_noop(preset.clone()),
    )
    .await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(p.enqueue(i, &["happy"]).await);
    }
    let (trigger, shutdown) = shutdown_channel();
    let w = p.worker.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { w.run(shutdown).await });
    let end = p.wait_settled(&ids).await;
    trigger.trigger();
    task.await.expect("join").expect("worker loop");
    let (times, done) = p.done_times(&ids).await;
    assert_eq!(done, n, "every row done");
    let first = times.iter().map(|t| t.1).min().unwrap();
    let last = times.iter().map(|t| t.1).max().unwrap();
    let span = (last - first).num_microseconds().unwrap() as f64 / 1e6;
    let rate = (n - 1) as f64 / span;
    let wall = end.duration_since(started).as_secs_f64();
    println!(
        "popcon throughput: {n} jobs, {rate:.1} jobs/s (first→last result write {span:.2}s; wall incl. start {wall:.2}s = {:.1} jobs/s)",
        n as f64 / wall
    );
    // The same rows, now `done`: one `approve` each (interactive lane), the lightest path:
    // claim → gates → one fenced write → ack.
    for id in &ids {
        let job = ValidJob {
            v: MESSAGE_VERSION,
            job_id: id.clone(),
            user_id: "bench".into(),
            action: Action::Approve,
            idx: Some(0),
            fence: p.store.get_job(id).await.expect("read").expect("job").emoji[0].fence,
            enqueued_at: Utc::now(),
        };
        p.queue.enqueue(&job).await.expect("enqueue approve");
    }
    let (trigger, shutdown) = shutdown_channel();
    let w = p.worker.clone();
    let task = tokio::spawn(async move { w.run(shutdown).await });
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut next = 0;
    while next < ids.len() {
        let rec = p
            .store
            .get_job(&ids[next])
            .await
            .expect("read")
            .expect("job");
        if rec.emoji[0].status == EmojiStatus::Approved {
            next += 1;
            continue;
        }
        assert!(
            Instant::now() < deadline,
            "approvals did not finish in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    trigger.trigger();
    task.await.expect("join").expect("worker loop");
    let (times, _) = p.done_times(&ids).await;
    let first = times.iter().map(|t| t.1).min().unwrap();
    let last = times.iter().map(|t| t.1).max().unwrap();
    let span = (last - first).num_microseconds().unwrap() as f64 / 1e6;
    let approve = (n - 1) as f64 / span;
    println!(
        "popcon throughput, approve: {n} jobs, {approve:.1} jobs/s (first→last write {span:.2}s)"
    );
    (rate, approve)
}

async fn latency(
    redis_url: &str,
    preset: &popcon_worker::engine::preset::ModelPreset,
) -> (f64, f64, usize) {
    let n: usize = env_or("BENCH_LAT_JOBS", 500);
    let rate: f64 = env_or("BENCH_RATE", 50.0);
    let p = Phase::new(
        redis_url,
        "bench-lat:",
        EngineHandle::spawn_noop(preset.clone()),
    )
    .await;
    let (trigger, shutdown) = shutdown_channel();
    let w = p.worker.clone();
    let task = tokio::spawn(async move { w.run(shutdown).await });
    tokio::time::sleep(Duration::from_millis(300)).await; // the worker is idle, blocked in its read
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        tick.tick().await;
        ids.push(p.enqueue(i, &["happy"]).await);
    }
    p.wait_settled(&ids).await;
    trigger.trigger();
    task.await.expect("join").expect("worker loop");
    let enq = p.enqueued_at().await;
    let (times, done) = p.done_times(&ids).await;
    assert_eq!(done, n, "every row done");
    let mut lat: Vec<f64> = times
        .iter()
        .map(|(id, t)| (*t - enq[id]).num_microseconds().unwrap() as f64 / 1e3)
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(&lat, 50.0), percentile(&lat, 99.0));
    println!(
        "popcon latency: {n} jobs at {rate}/s, enqueue→result written p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        lat.last().unwrap()
    );
    (p50, p99, n)
}

async fn busy(redis_url: &str) -> (f64, f64, f64, usize, usize) {
    let n: usize = env_or("BENCH_BUSY_JOBS", 12);
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = spawn_engine(&config(redis_url, dir.path(), "bench-busy:"))
        .await
        .expect("tiny model loads");
    let p = Phase::new(redis_url, "bench-busy:", engine.clone()).await;
    let all = ["happy", "sad", "angry", "surprised"];
    let mut ids = Vec::with_capacity(n);
    let mut emoji = 0;
    for i in 0..n {
        let k = 2 + i % 3; // 2, 3, 4 emoji
        emoji += k;
        ids.push(p.enqueue(i, &all[..k]).await);
    }
    let busy0 = engine.stats().busy_micros.load(Ordering::Relaxed);
    let (trigger, shutdown) = shutdown_channel();
    let w = p.worker.clone();
    let started = Instant::now();
    let task = tokio::spawn(async move { w.run(shutdown).await });
    let end = p.wait_settled(&ids).await;
    let wall = end.duration_since(started).as_secs_f64();
    let busy = (engine.stats().busy_micros.load(Ordering::Relaxed) - busy0) as f64 / 1e6;
    trigger.trigger();
    task.await.expect("join").expect("worker loop");
    let (_, done) = p.done_times(&ids).await;
    assert_eq!(done, emoji, "every row done");
    let frac = busy / wall;
    println!(
        "popcon engine busy (tiny, CPU): {n} sets / {emoji} emoji, busy {busy:.2}s of wall {wall:.2}s = {:.1} %",
        frac * 100.0
    );
    (frac, busy, wall, n, emoji)
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks phases (default: all).
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let _own;
    let redis_url = match std::env::var("BENCH_REDIS_URL") {
        Ok(u) => u,
        Err(_) => {
            _own = redis_server::RedisServer::start();
            _own.url()
        }
    };
    let registry = PresetRegistry::load(concat!(env!("CARGO_MANIFEST_DIR"), "/models").as_ref())
        .expect("presets");
    let preset = registry.get("tiny").expect("tiny preset").clone();
    let mut out = Vec::new();
    if want("throughput") {
        let (rate, approve) = throughput(&redis_url, &preset).await;
        out.push(format!("popcon_jobs_per_s {rate:.3}"));
        out.push(format!("popcon_approve_per_s {approve:.3}"));
        out.push(format!("popcon_jobs {}", env_or("BENCH_JOBS", 2000usize)));
    }
    if want("latency") {
        let (p50, p99, n) = latency(&redis_url, &preset).await;
        out.push(format!("popcon_p50_ms {p50:.3}"));
        out.push(format!("popcon_p99_ms {p99:.3}"));
        out.push(format!("popcon_lat_jobs {n}"));
    }
    if want("busy") {
        let (frac, busy, wall, n, emoji) = busy(&redis_url).await;
        out.push(format!("busy_fraction {frac:.4}"));
        out.push(format!("busy_s {busy:.3}"));
        out.push(format!("busy_wall_s {wall:.3}"));
        out.push(format!("busy_sets {n}"));
        out.push(format!("busy_emoji {emoji}"));
    }
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(&path, out.join("\n") + "\n").expect("write BENCH_OUT");
    }
}
