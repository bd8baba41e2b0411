//! The daemon end to end, in process: a real `redis-server` per test, a real SQLite file, the
//! tiny model, a temp results folder. Workers run as tokio tasks with their own shutdown
//! triggers; several workers in one test share one engine thread, so its call counter counts
//! GPU runs across all of them.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::redis_server::RedisServer;
use popcon_worker::config::WorkerConfig;
use popcon_worker::enqueue::{self, GenerateSet};
use popcon_worker::http::HttpState;
use popcon_worker::job::{Action, EmojiStatus, JobStatus, Lane, ValidJob};
use popcon_worker::queue::Queue;
use popcon_worker::store::{JobRecord, NewJob, PreflipOutcome, Store};
use popcon_worker::worker::engine_actor::EngineHandle;
use popcon_worker::worker::{ShutdownTrigger, Worker, shutdown_channel, spawn_engine};
use tokio::task::JoinHandle;

struct Harness {
    redis: RedisServer,
    dir: tempfile::TempDir,
    engine: EngineHandle,
}

impl Harness {
    async fn new() -> Harness {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let engine = spawn_engine(&config_for(&redis, dir.path(), "loader"))
            .await
            .expect("tiny model loads");
        Harness { redis, dir, engine }
    }

    fn config(&self, consumer: &str) -> WorkerConfig {
        config_for(&self.redis, self.dir.path(), consumer)
    }
}

fn config_for(redis: &RedisServer, dir: &std::path::Path, consumer: &str) -> WorkerConfig {
    common::worker_config::worker_config(&redis.url(), dir, consumer)
}

impl Harness {
    async fn spawn(&self, cfg: WorkerConfig) -> Running {
        let worker = Arc::new(
            Worker::start_with_engine(cfg, self.engine.clone())
                .await
                .expect("worker starts"),
        );
        let (trigger, shutdown) = shutdown_channel();
        let w = worker.clone();
        let task = tokio::spawn(async move { w.run(shutdown).await.expect("worker loop") });
        Running {
            worker,
            trigger,
            task,
        }
    }

    async fn store(&self) -> Store {
        Store::connect(&self.config("x").store.url).await.unwrap()
    }

    async fn queue(&self) -> Queue {
        Queue::connect(self.config("tester").queue).await.unwrap()
    }

    fn engine_calls(&self) -> u64 {
        self.engine.stats().calls.load(Ordering::Relaxed)
    }
}

struct Running {
    worker: Arc<Worker>,
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) -> Arc<Worker> {
        self.trigger.trigger();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("worker stops within the grace")
            .expect("worker task ok");
        self.worker
    }
}

fn set(subject: &str, expressions: &[&str]) -> GenerateSet {
    GenerateSet {
        user_id: "u1".into(),
        subject: subject.into(),
        style: None,
        expressions: expressions.iter().map(|s| s.to_string()).collect(),
        seed: 42,
        model: None,
        reference: None,
        idempotency_key: None,
    }
}

async fn wait_for<F>(store: &Store, job_id: &str, what: &str, mut done: F) -> JobRecord
where
    F: FnMut(&JobRecord) -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let rec = store.get_job(job_id).await.unwrap().expect("job exists");
        if done(&rec) {
            return rec;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {rec:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn settled(rec: &JobRecord) -> bool {
    matches!(
        rec.status,
        JobStatus::Done | JobStatus::Failed | JobStatus::Partial
    )
}

/// Waits until the dead-letter stream holds at least `n` entries. The worker settles the rows
/// first and dead-letters after (on purpose: see `Worker::dead_letter`), so a test that saw
/// the rows settle must wait for the second system's end state, not read it at once.
async fn dead_letters(queue: &Queue, n: usize) -> Vec<popcon_worker::queue::DeadLetter> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = queue.dead_list(100).await.unwrap();
        if dead.len() >= n {
            return dead;
        }
        assert!(
            Instant::now() < deadline,
            "{} dead letters, expected {n}: {dead:#?}",
            dead.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drained(queue: &Queue) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = queue.depth().await.unwrap();
        if d.interactive.pending + d.bulk.pending == 0
            && d.interactive.undelivered.unwrap_or(0) + d.bulk.undelivered.unwrap_or(0) == 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "queue not drained: {d:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn happy_path_generate_set_end_to_end() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    let cfg = h.config("w1");
    let blobs = popcon_worker::blobs::Blobs::open(&cfg.blobs).unwrap();
    let w = h.spawn(cfg).await;
    let mut req = set("a red fox", &["happy", "sad", "angry"]);
    req.reference = Some(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny/init.png"
        ))
        .unwrap(),
    );
    let rec = enqueue::generate_set(&store, &queue, &blobs, &req)
        .await
        .unwrap();
    assert_eq!(rec.status, JobStatus::Pending);
    let reference = rec.reference_key.as_deref().expect("reference stored");
    assert!(blobs.local_path(reference).unwrap().exists());
    let done = wait_for(&store, &rec.id, "the set", settled).await;
    assert_eq!(done.status, JobStatus::Done, "{done:#?}");
    for e in &done.emoji {
        assert_eq!(e.status, EmojiStatus::Done);
        assert_eq!(e.seed, Some(42 + u64::from(e.idx)));
        let key = e.image_key.as_deref().expect("image key");
        let png = std::fs::read(blobs.local_path(key).unwrap()).expect("emoji PNG exists");
        assert_eq!(&png[1..4], b"PNG");
    }
    let thumb_key = done
        .thumbnail_key
        .as_deref()
        .expect("thumbnail key set with emoji 0");
    assert!(blobs.local_path(thumb_key).unwrap().exists());
    // The public path the API serves thumbnails under, naming the same object.
    assert_eq!(
        done.thumbnail_path.as_deref(),
        Some(format!("/files/{thumb_key}").as_str())
    );
    assert!(done.pose_key.is_some());
    // One pose run and one batch for all three emoji.
    assert_eq!(h.engine_calls(), 2);
    drained(&queue).await;
    let worker = w.stop().await;
    assert_eq!(worker.metrics().total("succeeded"), 1);
    let text = worker.render_metrics();
    assert!(text.contains("popcon_jobs_succeeded_total 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_with_reasons_and_the_worker_keeps_running() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    let cfg = h.config("w1");
    let blobs = popcon_worker::blobs::Blobs::open(&cfg.blobs).unwrap();
    let w = h.spawn(cfg).await;
    let now = Utc::now().to_rfc3339();
    let poison: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("other", "x".into())], "no `job` field"),
        (vec![("job", "{not json".into())], "not valid JSON"),
        (
            vec![(
                "job",
                format!(
                    r#"{{"v":2,"job_id":"j","user_id":"u","action":"retry","idx":0,"fence":1,"enqueued_at":"{now}"}}"#
                ),
            )],
            "version 2",
        ),
        (
            vec![(
                "job",
                format!(
                    r#"{{"v":1,"job_id":"j","user_id":"u","action":"paint","idx":0,"fence":1,"enqueued_at":"{now}"}}"#
                ),
            )],
            "unknown action",
        ),
        (
            vec![(
                "job",
                format!(
                    r#"{{"v":1,"job_id":"j","user_id":"u","action":"retry","idx":0,"enqueued_at":"{now}"}}"#
                ),
            )],
            "`fence` is missing",
        ),
        (
            vec![(
                "job",
                format!(
                    r#"{{"v":1,"job_id":"nope","user_id":"u","action":"generate_set","fence":1,"enqueued_at":"{now}"}}"#
                ),
            )],
            "does not exist",
        ),
    ];
    for (fields, _) in &poison {
        let f: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        queue.enqueue_raw(Lane::Bulk, &f).await.unwrap();
    }
    // A good job behind the poison still runs.
    let rec = enqueue::generate_set(&store, &queue, &blobs, &set("a cat", &["happy"]))
        .await
        .unwrap();
    let done = wait_for(&store, &rec.id, "the good job", settled).await;
    assert_eq!(done.status, JobStatus::Done);
    let dead = dead_letters(&queue, poison.len()).await;
    assert_eq!(dead.len(), poison.len(), "{dead:#?}");
    // Jobs run concurrently (prefetch), so the dead letters' order is not the stream's.
    for (_, want) in &poison {
        assert!(
            dead.iter().any(|d| d.reason.contains(want)),
            "a reason containing `{want}` in {dead:#?}"
        );
    }
    drained(&queue).await;
    let worker = w.stop().await;
    assert_eq!(worker.metrics().total("dead_lettered"), poison.len() as u64);
}

fn message(job_id: &str, action: Action, idx: Option<u32>, fence: u64) -> ValidJob {
    ValidJob {
        v: 1,
        job_id: job_id.into(),
        user_id: "u1".into(),
        action,
        idx,
        fence,
        enqueued_at: Utc::now(),
    }
}

async fn create(store: &Store, id: &str, labels: &[&str]) -> JobRecord {
    store
        .create_job(&NewJob {
            id: id.into(),
            user_id: "u1".into(),
            subject: "a red fox".into(),
            style: None,
            seed: 7,
            model: None,
            reference_key: None,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_message_after_a_regenerate_preflip_is_superseded_without_gpu() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "job1", &["happy"]).await;
    // The enqueue side flipped the row again (fence 2): a fence-1 message is stale.
    assert_eq!(
        store
            .preflip_emoji("job1", 0, &[EmojiStatus::Pending])
            .await
            .unwrap(),
        PreflipOutcome::Flipped { fence: 2 }
    );
    queue
        .enqueue(&message("job1", Action::Regenerate, Some(0), 1))
        .await
        .unwrap();
    queue
        .enqueue(&message("job1", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let w = h.spawn(h.config("w1")).await;
    drained(&queue).await;
    let worker = w.stop().await;
    assert_eq!(h.engine_calls(), 0, "no GPU work for stale messages");
    assert_eq!(worker.metrics().total("superseded"), 2);
    let rec = store.get_job("job1").await.unwrap().unwrap();
    assert_eq!(rec.emoji[0].status, EmojiStatus::Pending);
    assert_eq!(rec.emoji[0].fence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_action_delivered_20_times_concurrently_runs_the_gpu_once() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "job20", &["happy", "sad"]).await;
    for _ in 0..20 {
        queue
            .enqueue(&message("job20", Action::GenerateSet, None, 1))
            .await
            .unwrap();
    }
    let workers = [
        h.spawn(h.config("w1")).await,
        h.spawn(h.config("w2")).await,
        h.spawn(h.config("w3")).await,
    ];
    let rec = wait_for(&store, "job20", "the set", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    drained(&queue).await;
    for w in workers {
        w.stop().await;
    }
    // One pose run plus one batch: every other delivery found the work done or in flight.
    assert_eq!(h.engine_calls(), 2);
    let rec = store.get_job("job20").await.unwrap().unwrap();
    assert!(rec.emoji.iter().all(|e| e.attempts == 1), "{rec:#?}");
    assert!(queue.dead_list(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn off_hours_holds_costly_work_until_the_flag_is_cleared() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    queue.set_off_hours(Duration::from_secs(60)).await.unwrap();
    create(&store, "night", &["happy"]).await;
    queue
        .enqueue(&message("night", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let w = h.spawn(h.config("w1")).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.engine_calls(), 0, "nothing costly while off-hours is on");
    let rec = store.get_job("night").await.unwrap().unwrap();
    assert_eq!(rec.status, JobStatus::Pending);
    queue.clear_off_hours().await.unwrap();
    let rec = wait_for(&store, "night", "the set after the flag cleared", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_when_idle_returns_promptly() {
    let h = Harness::new().await;
    let w = h.spawn(h.config("w1")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    w.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_job_past_the_grace_releases_it_to_another_worker() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "long", &["happy", "sad"]).await;
    queue
        .enqueue(&message("long", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    // Worker A runs very long generations and has almost no grace.
    let mut a_cfg = h.config("wa");
    a_cfg.engine.steps = Some(400);
    a_cfg.shutdown.grace = Duration::from_millis(50);
    let a = h.spawn(a_cfg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.engine_calls() == 0 {
        assert!(Instant::now() < deadline, "worker A never started the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = Instant::now();
    let a = a.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(a.metrics().total("released"), 1);
    let rec = store.get_job("long").await.unwrap().unwrap();
    assert!(!settled(&rec), "A wrote nothing: {rec:#?}");
    // B takes it at once (released entries are past the lease) and finishes it.
    let b = h.spawn(h.config("wb")).await;
    let rec = wait_for(&store, "long", "worker B to finish", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    drained(&queue).await;
    let b = b.stop().await;
    assert_eq!(b.metrics().total("succeeded"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_is_reclaimed_after_the_lease_and_finished_once() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "crash", &["happy"]).await;
    queue
        .enqueue(&message("crash", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let mut a_cfg = h.config("wa");
    a_cfg.engine.steps = Some(200);
    let a = h.spawn(a_cfg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.engine_calls() == 0 {
        assert!(Instant::now() < deadline, "worker A never started the job");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // kill -9, in process: the task dies with its lease renewal; nothing is released.
    a.task.abort();
    let b = h.spawn(h.config("wb")).await;
    let rec = wait_for(&store, "crash", "worker B to finish", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    drained(&queue).await;
    let b = b.stop().await;
    assert_eq!(b.metrics().total("reclaimed"), 1);
    assert_eq!(b.metrics().total("succeeded"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn regenerate_reuses_the_pose_with_a_new_seed_and_approve_animates_rows() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    let cfg = h.config("w1");
    let blobs = popcon_worker::blobs::Blobs::open(&cfg.blobs).unwrap();
    let w = h.spawn(cfg).await;
    let rec = enqueue::generate_set(&store, &queue, &blobs, &set("a red fox", &["happy", "sad"]))
        .await
        .unwrap();
    let first = wait_for(&store, &rec.id, "the set", settled).await;
    assert_eq!(h.engine_calls(), 2);

    // Regenerate emoji 1: the enqueue side pre-flips (fence 2), then enqueues.
    let PreflipOutcome::Flipped { fence } = store
        .preflip_emoji(&rec.id, 1, &[EmojiStatus::Done, EmojiStatus::Failed])
        .await
        .unwrap()
    else {
        panic!("preflip")
    };
    queue
        .enqueue(&message(&rec.id, Action::Regenerate, Some(1), fence))
        .await
        .unwrap();
    let regen = wait_for(&store, &rec.id, "the regenerate", |r| {
        r.emoji[1].status == EmojiStatus::Done && r.emoji[1].fence == fence
    })
    .await;
    assert_eq!(h.engine_calls(), 3, "one batch; the stored pose is reused");
    assert_eq!(
        regen.emoji[1].seed,
        Some(popcon_worker::worker::regenerate_seed(42, 1, fence))
    );
    assert_ne!(regen.emoji[1].seed, first.emoji[1].seed);
    assert_eq!(
        regen.emoji[1].image_key.as_deref(),
        Some(format!("jobs/{}/emoji/1-{fence}.png", rec.id).as_str())
    );
    assert_eq!(regen.pose_key, first.pose_key);
    assert_eq!(
        regen.thumbnail_key, first.thumbnail_key,
        "emoji 0 untouched"
    );

    // Approve emoji 0 (fence bumped, status kept), then approve the rest.
    let PreflipOutcome::Flipped { fence } = store
        .bump_fence(&rec.id, 0, &[EmojiStatus::Done])
        .await
        .unwrap()
    else {
        panic!("bump")
    };
    queue
        .enqueue(&message(&rec.id, Action::Approve, Some(0), fence))
        .await
        .unwrap();
    let one = wait_for(&store, &rec.id, "approve", |r| {
        r.emoji[0].status == EmojiStatus::Approved
    })
    .await;
    // Approved with its animation, written under the approve's fence.
    let key0 = one.emoji[0]
        .animation_key
        .clone()
        .expect("approved with its animation");
    assert_eq!(key0, format!("jobs/{}/anim/0-{fence}.webp", rec.id));
    assert_eq!(h.engine_calls(), 4, "one clip for the approve");
    assert!(one.emoji[1].animation_key.is_none());
    // approve-all as the enqueue side makes it: the bump and its outbox entry, whose
    // targets are the rows the worker animates.
    let (bumped, _, entry) = store
        .bump_done_dispatching(&rec.id, "u1", None)
        .await
        .unwrap()
        .expect("the job");
    assert_eq!(bumped.len(), 1, "emoji 0 is approved already");
    queue
        .enqueue(&entry.expect("an outbox entry").message())
        .await
        .unwrap();
    let all = wait_for(&store, &rec.id, "approve all", |r| {
        r.emoji.iter().all(|e| e.status == EmojiStatus::Approved)
    })
    .await;
    assert_eq!(all.status, JobStatus::Done);
    assert_eq!(
        h.engine_calls(),
        5,
        "approve-all animated the one done emoji left"
    );
    assert_eq!(
        all.emoji[0].animation_key.as_deref(),
        Some(key0.as_str()),
        "kept"
    );
    let key1 = all.emoji[1]
        .animation_key
        .clone()
        .expect("animated by approve-all");
    for key in [&key0, &key1] {
        let webp = blobs.get(key).await.unwrap();
        assert_eq!(
            (&webp[..4], &webp[8..12]),
            (&b"RIFF"[..], &b"WEBP"[..]),
            "{key}"
        );
        let frames = webp_frames(&webp);
        assert_eq!(frames, 8, "the tiny preset's 8 frames");
        let apng_key = popcon_worker::blobs::keys::animation_apng(key).unwrap();
        let apng = blobs.get(&apng_key).await.unwrap();
        assert!(
            apng.windows(4).any(|w| w == b"acTL"),
            "{apng_key} is an APNG"
        );
    }
    drained(&queue).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_request_stops_the_job_between_steps_and_fails_its_rows() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "cancelme", &["happy"]).await;
    queue
        .enqueue(&message("cancelme", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let mut cfg = h.config("w1");
    cfg.engine.steps = Some(400);
    let w = h.spawn(cfg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.engine_calls() == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    queue
        .request_cancel("cancelme", Duration::from_secs(60))
        .await
        .unwrap();
    let rec = wait_for(&store, "cancelme", "the cancel", settled).await;
    assert_eq!(rec.status, JobStatus::Failed);
    assert!(rec.emoji[0].error.as_deref().unwrap().contains("cancelled"));
    // The rows are failed first, the cancel key cleared after: wait for that end state too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while queue.is_cancelled("cancelme").await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "the cancel key was never cleared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let progress = queue.get_progress("cancelme").await.unwrap();
    assert!(
        progress.set.is_some(),
        "pose progress was written: {progress:?}"
    );
    drained(&queue).await;
    w.stop().await;
    assert_eq!(h.engine_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retryable_failure_is_retried_with_backoff_then_dead_lettered_and_failed() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    let cfg = h.config("w1");
    // The results folder cannot hold `jobs/…`: every upload fails with an I/O error.
    std::fs::create_dir_all(&cfg.blobs.root).unwrap();
    std::fs::write(cfg.blobs.root.join("jobs"), b"not a folder").unwrap();
    create(&store, "disk", &["happy"]).await;
    queue
        .enqueue(&message("disk", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let w = h.spawn(cfg).await;
    let rec = wait_for(&store, "disk", "the job to fail", settled).await;
    assert_eq!(rec.status, JobStatus::Failed);
    let err = rec.emoji[0].error.as_deref().unwrap();
    assert!(err.contains("gave up after 3 deliveries"), "{err}");
    let dead = dead_letters(&queue, 1).await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.contains("blob store I/O"),
        "{}",
        dead[0].reason
    );
    assert_eq!(h.engine_calls(), 3, "one pose run per delivery");
    drained(&queue).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_the_worker_recovers_and_runs_new_work() {
    let mut h = Harness::new().await;
    let store = h.store().await;
    let w = h.spawn(h.config("w1")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.redis.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h.redis.restart();
    // The restarted Redis has no data: no streams, no group. The worker recreates them.
    let queue = h.queue().await;
    create(&store, "after", &["happy"]).await;
    queue
        .enqueue(&message("after", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let rec = wait_for(&store, "after", "the job after the restart", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    w.stop().await;
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics_are_served() {
    let mut h = Harness::new().await;
    let w = h.spawn(h.config("w1")).await;
    let (trigger, shutdown) = shutdown_channel();
    let state = HttpState::new();
    let (addr, task) =
        popcon_worker::http::serve("127.0.0.1:0".parse().unwrap(), state.clone(), shutdown)
            .await
            .unwrap();
    // Before the worker is up (model loading): alive, not ready.
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    let loading = get(addr, "/readyz").await;
    assert!(
        loading.starts_with("HTTP/1.1 503") && loading.contains("loading"),
        "{loading}"
    );
    state.set_worker(w.worker.clone());
    assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    // The depth gauge appears after the worker's first housekeeping round.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = get(addr, "/metrics").await;
        if m.contains("popcon_queue_depth") || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in [
        "popcon_jobs_claimed_total",
        "popcon_jobs_succeeded_total",
        "popcon_jobs_failed_total",
        "popcon_jobs_dead_lettered_total",
        "popcon_jobs_superseded_total",
        "popcon_jobs_reclaimed_total",
        "popcon_stage_seconds_sum{stage=\"denoise\"}",
        "popcon_engine_busy_seconds",
        "popcon_queue_depth{lane=\"bulk\",state=\"pending\"}",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    h.redis.stop();
    assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
    trigger.trigger();
    task.await.unwrap();
    h.redis.restart();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_long_job_is_never_reclaimed_by_another_worker() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "slow", &["happy"]).await;
    queue
        .enqueue(&message("slow", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let mut a_cfg = h.config("wa");
    a_cfg.queue.lease = Duration::from_millis(800);
    // Long enough to outlive several leases on an idle fast machine too (about 12 ms a step
    // on the tiny model there; 60 steps once finished inside one lease).
    a_cfg.engine.steps = Some(400);
    let started = Instant::now();
    let a = h.spawn(a_cfg).await;
    // b starts only once a holds the job: the question is whether b steals it, not who wins
    // the first read (under load b could, and would run it with the default steps).
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.worker.metrics().total("claimed") == 0 {
        assert!(Instant::now() < deadline, "worker a never claimed the job");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b_cfg = h.config("wb");
    b_cfg.queue.lease = Duration::from_millis(800);
    let b = h.spawn(b_cfg).await;
    let rec = wait_for(&store, "slow", "the slow job", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    assert!(
        started.elapsed() > Duration::from_millis(2400),
        "the job must outlive several leases for this test to mean anything: {:?}",
        started.elapsed()
    );
    drained(&queue).await;
    let (a, b) = (a.stop().await, b.stop().await);
    assert_eq!(b.metrics().total("reclaimed"), 0);
    assert_eq!(b.metrics().total("claimed"), 0);
    assert_eq!(a.metrics().total("succeeded"), 1);
    assert_eq!(rec.emoji[0].attempts, 1);
    assert_eq!(h.engine_calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiring_off_hours_flag_releases_the_held_work() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    queue
        .set_off_hours(Duration::from_millis(1500))
        .await
        .unwrap();
    create(&store, "ttl", &["happy"]).await;
    queue
        .enqueue(&message("ttl", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let w = h.spawn(h.config("w1")).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(h.engine_calls(), 0);
    // Nobody clears it: the TTL does.
    let rec = wait_for(&store, "ttl", "the set after the flag expired", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emoji_0_regenerated_during_completion_never_shows_done_without_a_thumbnail() {
    let h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    let cfg = h.config("w1");
    let blobs = popcon_worker::blobs::Blobs::open(&cfg.blobs).unwrap();
    let workers = [h.spawn(cfg).await, h.spawn(h.config("w2")).await];
    let rec = enqueue::generate_set(&store, &queue, &blobs, &set("a red fox", &["happy", "sad"]))
        .await
        .unwrap();
    let id = rec.id.clone();
    // A reader polls the archive view the whole time.
    let reader_store = store.clone();
    let reader_id = id.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut seen_done = 0;
        while !reader_stop.load(Ordering::Relaxed) {
            let r = reader_store.get_job(&reader_id).await.unwrap().unwrap();
            if matches!(r.emoji[0].status, EmojiStatus::Done | EmojiStatus::Approved) {
                seen_done += 1;
                assert!(
                    r.thumbnail_path.as_deref().is_some_and(|p| !p.is_empty())
                        && r.thumbnail_key.as_deref().is_some_and(|k| !k.is_empty()),
                    "emoji 0 done with empty thumbnail columns: {r:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen_done
    });
    // Regenerate emoji 0 a few times, racing the set's own completion.
    let mut fence = 1;
    for _ in 0..3 {
        let r = wait_for(&store, &id, "emoji 0 settled", |r| {
            r.emoji[0].status.is_settled()
        })
        .await;
        assert!(r.emoji[0].status == EmojiStatus::Done, "{r:#?}");
        let PreflipOutcome::Flipped { fence: f } = store
            .preflip_emoji(&id, 0, &[EmojiStatus::Done, EmojiStatus::Failed])
            .await
            .unwrap()
        else {
            panic!("preflip")
        };
        fence = f;
        queue
            .enqueue(&message(&id, Action::Regenerate, Some(0), fence))
            .await
            .unwrap();
    }
    let last = wait_for(&store, &id, "the last regenerate", |r| {
        r.emoji[0].fence == fence && r.emoji[0].status == EmojiStatus::Done && settled(r)
    })
    .await;
    assert!(
        last.thumbnail_key
            .as_deref()
            .unwrap()
            .ends_with(&format!("0-{fence}.png"))
    );
    stop.store(true, Ordering::Relaxed);
    assert!(reader.await.unwrap() > 0, "the reader saw emoji 0 done");
    drained(&queue).await;
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_mid_job_the_job_still_finishes_once() {
    let mut h = Harness::new().await;
    let store = h.store().await;
    let queue = h.queue().await;
    create(&store, "midredis", &["happy"]).await;
    queue
        .enqueue(&message("midredis", Action::GenerateSet, None, 1))
        .await
        .unwrap();
    let mut cfg = h.config("w1");
    cfg.engine.steps = Some(60);
    let w = h.spawn(cfg).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.engine_calls() == 0 {
        assert!(Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.redis.stop();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    h.redis.restart();
    // Progress, lease renewals and the ack fail while Redis is away; the database write does
    // not depend on Redis, and the fence makes any later redelivery harmless.
    let rec = wait_for(&store, "midredis", "the job across the restart", settled).await;
    assert_eq!(rec.status, JobStatus::Done);
    assert_eq!(rec.emoji[0].attempts, 1);
    let worker = w.stop().await;
    assert_eq!(worker.metrics().total("succeeded"), 1);
}

/// Frames of an animated WebP: its top-level `ANMF` chunks, walking the RIFF chunk list.
fn webp_frames(webp: &[u8]) -> usize {
    let mut at = 12;
    let mut frames = 0;
    while at + 8 <= webp.len() {
        let size = u32::from_le_bytes(webp[at + 4..at + 8].try_into().unwrap()) as usize;
        if &webp[at..at + 4] == b"ANMF" {
            frames += 1;
        }
        at += 8 + size + (size & 1);
    }
    frames
}
