//! The enqueue API over a real socket: the server runs in process on 127.0.0.1:0 against a
//! real `redis-server` (one per test) and a real SQLite file; requests go through a real HTTP
//! client (ureq) from plain threads. Where a test needs the work done, a real worker with the
//! tiny model runs beside the API. The zip test runs the `api` binary as its own process so
//! its memory can be measured.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::moto_server::MotoServer;
use common::redis_server::RedisServer;
use popcon_worker::blobs::{self, Blobs, BlobsConfig, S3Config};
use popcon_worker::config::{StoreConfig, WorkerConfig};
use popcon_worker::enqueue::{DispatchHook, EnqueueConfig, Enqueuer, Prices};
use popcon_worker::http::api::{ApiConfig, ApiState};
use popcon_worker::job::EmojiStatus;
use popcon_worker::pipeline::post;
use popcon_worker::queue::{Queue, QueueConfig};
use popcon_worker::store::{EmojiOutcome, Store, Thumbnail};
use popcon_worker::worker::{ShutdownTrigger, Worker, shutdown_channel};
use serde_json::{Value, json};

const SECRET: &str = "api-test-secret-0123456789";

struct Api {
    rt: tokio::runtime::Runtime,
    redis: Arc<Mutex<RedisServer>>,
    dir: tempfile::TempDir,
    base: String,
    store: Store,
    queue: Queue,
    blobs: Blobs,
    blobs_cfg: BlobsConfig,
    stop: ShutdownTrigger,
    worker: Option<(ShutdownTrigger, tokio::task::JoinHandle<()>)>,
    _moto: Option<MotoServer>,
}

#[derive(Default)]
struct Options {
    hook: Option<DispatchHook>,
    worker: bool,
    /// Make every upload of the worker fail (a file where the `jobs/` folder should be).
    break_uploads: bool,
    /// Keep the images in an S3 bucket (a real moto server) instead of a folder.
    s3: bool,
    /// Read timeouts and connection limit of the server (default: the daemon's defaults).
    http_limits: Option<popcon_worker::http::HttpLimits>,
}

/// An S3 bucket on `moto` for the blobs.
fn s3_config(moto: &MotoServer) -> S3Config {
    S3Config {
        url: "s3://popcon/results".into(),
        endpoint: Some(moto.endpoint()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: true,
    }
}

use common::worker_config::db_url;

fn blobs_config(dir: &Path) -> BlobsConfig {
    BlobsConfig {
        url_secret: Some(SECRET.into()),
        ..BlobsConfig::at(dir.join("results"))
    }
}

fn queue_config(redis: &str) -> QueueConfig {
    common::worker_config::queue_config(redis, "api-test")
}

impl Api {
    fn start() -> Api {
        Api::start_with(Options::default())
    }

    fn start_with(opts: Options) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let redis = Arc::new(Mutex::new(RedisServer::start()));
        let redis_url = redis.lock().unwrap().url();
        let dir = tempfile::tempdir().unwrap();
        let mut blobs_cfg = blobs_config(dir.path());
        let moto = opts.s3.then(|| {
            let moto = MotoServer::start();
            moto.create_bucket("popcon");
            blobs_cfg.s3 = Some(s3_config(&moto));
            moto
        });
        let (store, queue, blobs) = rt.block_on(async {
            let store = Store::connect(&db_url(dir.path())).await.unwrap();
            let queue = Queue::connect(queue_config(&redis_url)).await.unwrap();
            let blobs = Blobs::open(&blobs_cfg).unwrap();
            (store, queue, blobs)
        });
        let mut enq = Enqueuer::new(
            store.clone(),
            queue.clone(),
            blobs.clone(),
            EnqueueConfig {
                prices: Prices::default(),
                ..EnqueueConfig::default()
            },
        );
        if let Some(h) = opts.hook {
            enq = enq.with_dispatch_hook(h);
        }
        let state = ApiState::new(enq, ApiConfig::default()).unwrap();
        let app = popcon_worker::http::with_fallbacks(popcon_worker::http::api::routes(state));
        let (stop, shutdown) = shutdown_channel();
        let (addr, _task) = rt
            .block_on(popcon_worker::http::serve::serve_with_limits(
                "127.0.0.1:0".parse().unwrap(),
                app,
                shutdown,
                opts.http_limits.unwrap_or_default(),
            ))
            .unwrap();
        if opts.break_uploads {
            std::fs::create_dir_all(dir.path().join("results")).unwrap();
            std::fs::write(dir.path().join("results/jobs"), b"not a folder").unwrap();
        }
        let mut api = Api {
            rt,
            redis,
            dir,
            base: format!("http://{addr}"),
            store,
            queue,
            blobs,
            blobs_cfg,
            stop,
            worker: None,
            _moto: moto,
        };
        if opts.worker {
            api.start_worker();
        }
        api
    }

    fn start_worker(&mut self) {
        self.start_worker_with(|_| {});
    }

    fn start_worker_with(&mut self, adjust: impl FnOnce(&mut WorkerConfig)) {
        let mut cfg = WorkerConfig {
            store: StoreConfig {
                url: db_url(self.dir.path()),
            },
            blobs: self.blobs_cfg.clone(),
            ..common::worker_config::worker_config(
                &self.redis.lock().unwrap().url(),
                self.dir.path(),
                "w1",
            )
        };
        adjust(&mut cfg);
        let worker = Arc::new(self.rt.block_on(Worker::start(cfg)).expect("worker starts"));
        let (trigger, shutdown) = shutdown_channel();
        let task = self
            .rt
            .spawn(async move { worker.run(shutdown).await.expect("worker loop") });
        self.worker = Some((trigger, task));
    }

    fn user(&self, name: &str, credits: i64, admin: bool) -> String {
        self.rt
            .block_on(popcon_worker::auth::add_user(
                &self.store,
                name,
                admin,
                credits,
            ))
            .unwrap()
            .1
    }

    fn balance(&self, user: &str) -> i64 {
        self.rt.block_on(self.store.balance(user)).unwrap()
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        }
    }

    /// Creates a set over the API and returns its id.
    fn set(&self, token: &str, expressions: &[&str]) -> String {
        let (status, body) = post_json(
            &self.url("/api/generate-set"),
            Some(token),
            &json!({"subject": "a red fox", "expressions": expressions, "seed": 7}),
        );
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// What a worker would do, without one: settle emoji `idx` done, with real PNGs.
    fn finish(&self, job: &str, idx: u32) {
        self.rt.block_on(common::rows::finish(
            &self.store,
            &self.blobs,
            job,
            idx,
            16,
            None,
        ));
    }

    fn fail(&self, job: &str, idx: u32) {
        self.rt
            .block_on(common::rows::fail(&self.store, job, idx, "the GPU said no"));
    }

    fn row(&self, job: &str, idx: usize) -> popcon_worker::store::EmojiRecord {
        self.rt
            .block_on(self.store.get_job(job))
            .unwrap()
            .unwrap()
            .emoji[idx]
            .clone()
    }

    fn redis_cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        self.rt.block_on(self.queue.query_idem::<T>(cmd)).unwrap()
    }

    fn stream_len(&self, lane: &str) -> i64 {
        self.redis_cmd(redis::cmd("XLEN").arg(format!("popcon:jobs:{lane}")))
    }

    /// Ledger entries of `user` as (delta, idem_key), oldest first.
    fn ledger(&self, user: &str) -> Vec<(i64, String)> {
        self.rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&db_url(self.dir.path()))
                .await
                .unwrap();
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT delta, idem_key FROM credit_ledger WHERE user_id = ? ORDER BY id",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        })
    }

    /// Polls `cond` every 50 ms until it holds; fails naming `what` after `secs`.
    fn wait_until(&self, what: &str, secs: u64, cond: impl Fn(&Api) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_job(&self, token: &str, job: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (status, body) = get(&self.url(&format!("/api/job/{job}")), Some(token));
            assert_eq!(status, 200, "{body}");
            if done(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some((trigger, task)) = self.worker.take() {
            trigger.trigger();
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await });
        }
        self.stop.trigger();
    }
}

// ---- a small HTTP client on ureq -------------------------------------------------------------

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

fn finish_response(r: Result<ureq::Response, ureq::Error>) -> ureq::Response {
    match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    }
}

fn read_json(r: ureq::Response) -> (u16, Value) {
    let status = r.status();
    let text = r.into_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn authed(req: ureq::Request, token: Option<&str>) -> ureq::Request {
    match token {
        Some(t) => req.set("Authorization", &format!("Bearer {t}")),
        None => req,
    }
}

fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    read_json(finish_response(authed(agent().get(url), token).call()))
}

fn get_raw(url: &str) -> ureq::Response {
    finish_response(agent().get(url).call())
}

fn post_json(url: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    read_json(finish_response(
        authed(agent().post(url), token).send_json(body.clone()),
    ))
}

fn post_empty(url: &str, token: Option<&str>) -> (u16, Value) {
    read_json(finish_response(authed(agent().post(url), token).call()))
}

fn post_multipart(url: &str, token: &str, parts: &[(&str, &str, &[u8])]) -> (u16, Value) {
    let boundary = "popconboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, content_type, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let filename = if *name == "image" {
            "; filename=\"ref.png\""
        } else {
            ""
        };
        body.extend_from_slice(
            format!("Content-Disposition: form-data; name=\"{name}\"{filename}\r\nContent-Type: {content_type}\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    read_json(finish_response(
        authed(agent().post(url), Some(token))
            .set(
                "Content-Type",
                &format!("multipart/form-data; boundary={boundary}"),
            )
            .send_bytes(&body),
    ))
}

/// CRC-32 (IEEE), for forging a PNG chunk that still checks out.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Runs `f` on `n` threads released together (a burst of clicks); the results in thread order.
fn at_once<T: Send>(n: usize, f: impl Fn() -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(n);
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    f()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

fn png(w: u32, h: u32) -> Vec<u8> {
    post::encode_png(&image::RgbaImage::from_pixel(
        w,
        h,
        image::Rgba([1, 2, 3, 255]),
    ))
    .unwrap()
}

// ---- the dedup layers ------------------------------------------------------------------------

#[test]
fn fifty_concurrent_retry_clicks_charge_once_queue_once_and_flip_once() {
    let api = Api::start();
    let token = api.user("alice", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    assert_eq!(api.balance("alice"), 8, "2 emoji at 1 credit");
    api.fail(&job, 0);
    let before = api.stream_len("interactive");

    let url = api.url(&format!("/api/retry/{job}?idx=0"));
    let replies = at_once(50, || post_empty(&url, Some(&token)));
    let queued: Vec<&Value> = replies
        .iter()
        .filter(|(s, b)| *s == 200 && b["status"] == "queued")
        .map(|(_, b)| b)
        .collect();
    let duplicates = replies
        .iter()
        .filter(|(s, b)| *s == 200 && b["status"] == "duplicate" && b["deduped"] == true)
        .count();
    assert_eq!(queued.len(), 1, "{replies:?}");
    assert_eq!(duplicates, 49, "{replies:?}");
    assert_eq!(queued[0]["charged"], 1);
    assert_eq!(queued[0]["fence"], 2);

    assert_eq!(api.balance("alice"), 7, "exactly one charge");
    let retry_charges: Vec<_> = api
        .ledger("alice")
        .into_iter()
        .filter(|(_, k)| k.contains(":retry:"))
        .collect();
    assert_eq!(retry_charges, vec![(-1, format!("charge:{job}:retry:0:2"))]);
    assert_eq!(
        api.stream_len("interactive") - before,
        1,
        "exactly one stream entry"
    );
    let row = api.row(&job, 0);
    assert_eq!(
        (row.status, row.fence),
        (EmojiStatus::Pending, 2),
        "one pre-flip"
    );

    // The claim is kept for its TTL after success: the next click is still a duplicate.
    let (_, again) = post_empty(&url, Some(&token));
    assert_eq!(again, json!({"status": "duplicate", "deduped": true}));
    let ttl: i64 = api.redis_cmd(redis::cmd("TTL").arg(format!("popcon:claim:{job}:retry-0")));
    assert!((1..=30).contains(&ttl), "claim TTL {ttl}");

    // The outcomes are counted, per route template (not per job id).
    let (_, body) = post_empty(&api.url("/api/retry/nope?idx=0"), Some(&token));
    assert_eq!(body["code"], "not_found");
    let text = get_raw(&api.url("/metrics")).into_string().unwrap();
    for line in [
        r#"popcon_api_actions_total{action="retry",outcome="duplicate"} 50"#,
        r#"popcon_api_actions_total{action="retry",outcome="queued"} 1"#,
        r#"popcon_api_requests_total{route="/api/retry/{job_id}",status="200",code=""} 51"#,
        r#"popcon_api_requests_total{route="/api/retry/{job_id}",status="404",code="not_found"} 1"#,
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[test]
fn a_double_submitted_set_with_one_idempotency_key_is_created_and_charged_once() {
    let api = Api::start();
    let token = api.user("lee", 20, false);
    let url = api.url("/api/generate-set");
    let replies = at_once(10, || {
        read_json(finish_response(
            authed(agent().post(&url), Some(&token))
                .set("Idempotency-Key", "click-1")
                .send_json(json!({"subject": "a red fox", "expressions": ["a", "b"]})),
        ))
    });
    assert!(replies.iter().all(|(s, _)| *s == 200), "{replies:?}");
    let ids: std::collections::BTreeSet<&str> = replies
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "one job: {replies:?}");
    assert_eq!(
        replies
            .iter()
            .filter(|(_, b)| b["deduped"] == false)
            .count(),
        1,
        "{replies:?}"
    );
    assert_eq!(api.balance("lee"), 18, "charged once");
    assert_eq!(api.stream_len("bulk"), 1, "queued once");
    // Another key is another set; another user with the same key gets their own.
    let (status, other) = post_json(
        &url,
        Some(&token),
        &json!({"subject": "a cat", "expressions": ["a"]}),
    );
    assert_eq!(status, 200);
    assert!(!ids.contains(other["id"].as_str().unwrap()));
    let kim = api.user("kim", 5, false);
    let r = finish_response(
        authed(agent().post(&url), Some(&kim))
            .set("Idempotency-Key", "click-1")
            .send_json(json!({"subject": "a red fox", "expressions": ["a", "b"]})),
    );
    let (_, theirs) = read_json(r);
    assert!(!ids.contains(theirs["id"].as_str().unwrap()));
    assert_eq!(api.balance("kim"), 3);
}

#[test]
fn a_dispatch_failure_refunds_releases_the_claim_and_the_next_click_succeeds() {
    let armed = Arc::new(AtomicBool::new(false));
    let slot: Arc<Mutex<Option<Arc<Mutex<RedisServer>>>>> = Arc::new(Mutex::new(None));
    let hook: DispatchHook = {
        let (armed, slot) = (armed.clone(), slot.clone());
        Arc::new(move || {
            let (armed, slot) = (armed.clone(), slot.clone());
            Box::pin(async move {
                // Redis dies between the charge (+ pre-flip) and the XADD.
                if armed.swap(false, Ordering::SeqCst) {
                    if let Some(r) = slot.lock().unwrap().as_ref() {
                        r.lock().unwrap().stop();
                    }
                }
            })
        })
    };
    let api = Api::start_with(Options {
        hook: Some(hook),
        ..Options::default()
    });
    *slot.lock().unwrap() = Some(api.redis.clone());
    let token = api.user("bob", 5, false);
    let job = api.set(&token, &["happy"]);
    api.fail(&job, 0);
    let balance = api.balance("bob");

    armed.store(true, Ordering::SeqCst);
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&token));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not be queued"),
        "{body}"
    );
    // Refunded, exactly once, and the ledger balances.
    assert_eq!(api.balance("bob"), balance);
    let entries: Vec<_> = api
        .ledger("bob")
        .into_iter()
        .filter(|(_, k)| k.contains(":retry:"))
        .collect();
    assert_eq!(
        entries,
        vec![
            (-1, format!("charge:{job}:retry:0:2")),
            (1, format!("refund:charge:{job}:retry:0:2")),
        ]
    );
    // The row is back where it was, with its error, so the user can click again.
    let row = api.row(&job, 0);
    assert_eq!(row.status, EmojiStatus::Failed);
    assert_eq!(row.error.as_deref(), Some("the GPU said no"));

    api.redis.lock().unwrap().restart();
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&token));
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("queued")),
        "{body}"
    );
    assert_eq!(api.balance("bob"), balance - 1);
    assert_eq!(api.stream_len("interactive"), 1);
    assert_eq!(api.row(&job, 0).status, EmojiStatus::Pending);
}

#[test]
fn a_retry_on_a_done_emoji_is_wrong_state_and_charges_nothing() {
    let api = Api::start();
    let token = api.user("carol", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    api.finish(&job, 0);
    let balance = api.balance("carol");
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&token));
    assert_eq!(status, 200);
    assert_eq!(body["status"], "wrong_state");
    assert_eq!(body["deduped"], true);
    assert_eq!(body["current"], "done");
    assert_eq!(api.balance("carol"), balance);
    assert_eq!(api.stream_len("interactive"), 0);
    // Nothing was done, so the claim was released: a regenerate and then a retry of the
    // failed row work at once.
    let (_, body) = post_empty(
        &api.url(&format!("/api/regenerate/{job}?idx=0")),
        Some(&token),
    );
    assert_eq!(body["status"], "queued", "{body}");
    api.fail(&job, 1);
    let (_, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=1")), Some(&token));
    assert_eq!(body["status"], "queued", "{body}");
    assert_eq!(api.balance("carol"), balance - 2);

    // Bad indexes and missing ones are precise 400s.
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=9")), Some(&token));
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("out of range"),
        "{body}"
    );
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}")), Some(&token));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("idx"), "{body}");
    let (status, _) = post_empty(&api.url(&format!("/api/retry/{job}?idx=x")), Some(&token));
    assert_eq!(status, 400);
}

#[test]
fn not_enough_credits_is_402_and_changes_nothing() {
    let api = Api::start();
    let token = api.user("dan", 2, false);
    let job = api.set(&token, &["happy", "sad"]);
    assert_eq!(api.balance("dan"), 0);
    api.fail(&job, 0);
    let (status, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&token));
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["code"], "insufficient_credits");
    assert_eq!(api.row(&job, 0).status, EmojiStatus::Failed);
    assert_eq!(api.stream_len("interactive"), 0);
    // The claim was released with the refusal: after a top-up the click works at once.
    let admin = api.user("root", 0, true);
    let (status, _) = post_json(
        &api.url("/api/admin/credits"),
        Some(&admin),
        &json!({"user": "dan", "amount": 5}),
    );
    assert_eq!(status, 200);
    let (_, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&token));
    assert_eq!(body["status"], "queued", "{body}");
    let (status, body) = post_json(
        &api.url("/api/generate-set"),
        Some(&token),
        &json!({"subject": "a cat", "expressions": ["a", "b", "c", "d", "e"]}),
    );
    assert_eq!(status, 402, "{body}");
    let (_, list) = get(&api.url("/api/jobs"), Some(&token));
    assert_eq!(
        list["jobs"].as_array().unwrap().len(),
        1,
        "no job was created"
    );
}

#[test]
fn approve_all_twice_at_once_approves_each_emoji_once() {
    let mut api = Api::start();
    let token = api.user("erin", 10, false);
    let job = api.set(&token, &["happy", "sad", "angry"]);
    // No worker yet: settle the rows by hand (the generate_set entry will find them settled).
    let bulk = api.stream_len("bulk");
    api.finish(&job, 0);
    api.finish(&job, 1);
    api.fail(&job, 2);

    let url = api.url(&format!("/api/approve-all/{job}"));
    let replies = at_once(2, || post_empty(&url, Some(&token)));
    let mut statuses: Vec<&str> = replies
        .iter()
        .map(|(_, b)| b["status"].as_str().unwrap())
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses, ["duplicate", "queued"], "{replies:?}");
    let queued = &replies
        .iter()
        .find(|(_, b)| b["status"] == "queued")
        .unwrap()
        .1;
    assert_eq!(queued["idx"], json!([0, 1]));
    assert_eq!(api.stream_len("bulk") - bulk, 1, "one approve_all entry");

    // The animation waits for minutes, the claim lasts 30 s. Past it (the claim deleted),
    // neither button approves or charges these emoji again while their approval is queued.
    let before = api.balance("erin");
    let interactive = api.stream_len("interactive");
    api.redis_cmd::<i64>(redis::cmd("DEL").arg(format!("popcon:claim:{job}:approve_all-all")));
    let (_, all_again) = post_empty(&url, Some(&token));
    assert_eq!(all_again["status"], "duplicate", "{all_again}");
    let (_, one) = post_empty(&api.url(&format!("/api/approve/{job}?idx=0")), Some(&token));
    assert_eq!(one["status"], "duplicate", "{one}");
    assert_eq!(api.balance("erin"), before, "nothing charged again");
    assert_eq!(
        api.stream_len("bulk") - bulk,
        1,
        "still one approve_all entry"
    );
    assert_eq!(
        api.stream_len("interactive"),
        interactive,
        "no approve entry"
    );
    let fences: Vec<u64> = (0..2).map(|i| api.row(&job, i).fence).collect();

    api.start_worker();
    let done = api.wait_job(&token, &job, "the approvals", |b| {
        b["emoji"][0]["status"] == "approved" && b["emoji"][1]["status"] == "approved"
    });
    assert_eq!(
        done["emoji"][2]["status"], "failed",
        "a failed emoji is not approved"
    );
    for (i, fence) in fences.iter().enumerate() {
        let row = api.row(&job, i);
        assert_eq!(row.fence, *fence, "approved under approve-all's fence");
        assert_eq!(
            row.animation_key.as_deref(),
            Some(format!("jobs/{job}/anim/{i}-{fence}.webp").as_str())
        );
    }
    // Once approved, approving again is a wrong state, and approve-all has nothing to do.
    std::thread::sleep(Duration::from_millis(300));
    api.redis_cmd::<i64>(redis::cmd("DEL").arg(format!("popcon:claim:{job}:approve_all-all")));
    let (_, again) = post_empty(&url, Some(&token));
    assert_eq!(again["status"], "wrong_state", "{again}");
}

#[test]
fn approve_all_leaves_out_an_emoji_whose_own_approve_is_queued() {
    let mut api = Api::start();
    let token = api.user("fay", 10, false);
    let job = api.set(&token, &["happy", "sad", "angry"]);
    for i in 0..3 {
        api.finish(&job, i);
    }
    let before = api.balance("fay");
    let (_, one) = post_empty(&api.url(&format!("/api/approve/{job}?idx=0")), Some(&token));
    assert_eq!(one["status"], "queued", "{one}");
    let fence0 = one["fence"].as_u64().unwrap();
    // Past the claim's TTL a second click on the same button is still a duplicate.
    api.redis_cmd::<i64>(redis::cmd("DEL").arg(format!("popcon:claim:{job}:approve-0")));
    let (_, again) = post_empty(&api.url(&format!("/api/approve/{job}?idx=0")), Some(&token));
    assert_eq!(again["status"], "duplicate", "{again}");
    // approve-all takes the other two and charges for them only.
    let (_, all) = post_empty(&api.url(&format!("/api/approve-all/{job}")), Some(&token));
    assert_eq!(
        (all["status"].as_str(), all["charged"].as_i64()),
        (Some("queued"), Some(2)),
        "{all}"
    );
    assert_eq!(all["idx"], json!([1, 2]));
    assert_eq!(api.balance("fay"), before - 3);
    assert_eq!(
        api.row(&job, 0).fence,
        fence0,
        "emoji 0 left to its approve"
    );

    api.start_worker();
    api.wait_job(&token, &job, "the approvals", |b| {
        (0..3).all(|i| b["emoji"][i]["status"] == "approved")
    });
    assert_eq!(
        api.row(&job, 0).animation_key.as_deref(),
        Some(format!("jobs/{job}/anim/0-{fence0}.webp").as_str()),
        "animated once, by its own approve"
    );
    assert_eq!(
        api.balance("fay"),
        before - 3,
        "three animations, three credits"
    );
    assert_eq!(api.stream_len("dead"), 0);
}

#[test]
fn a_failed_approve_all_refunds_only_the_emoji_it_could_not_animate() {
    let mut api = Api::start();
    let token = api.user("gus", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    api.finish(&job, 0);
    api.finish(&job, 1);
    let before = api.balance("gus");
    let (_, all) = post_empty(&api.url(&format!("/api/approve-all/{job}")), Some(&token));
    assert_eq!(
        (all["status"].as_str(), all["charged"].as_i64()),
        (Some("queued"), Some(2)),
        "{all}"
    );
    let fence1 = api.row(&job, 1).fence;
    // One clip per batch, and emoji 1's still is lost: emoji 0 is approved by the first
    // batch, the second fails for good.
    let still = api.row(&job, 1).image_key.unwrap();
    std::fs::remove_file(api.dir.path().join("results").join(&still)).unwrap();
    api.start_worker_with(|c| c.engine.animate_batch = 1);
    api.wait_until("approve-all's dead letter", 120, |a| {
        a.stream_len("dead") == 1
    });
    let row0 = api.row(&job, 0);
    assert_eq!(row0.status, EmojiStatus::Approved, "{row0:?}");
    assert!(row0.animation_key.is_some());
    let row1 = api.row(&job, 1);
    assert_eq!(row1.status, EmojiStatus::Done, "{row1:?}");
    assert!(row1.animation_key.is_none());
    assert_eq!(
        api.balance("gus"),
        before - 1,
        "emoji 0's animation stays paid"
    );
    let refunds: Vec<String> = api
        .ledger("gus")
        .into_iter()
        .filter(|(_, key)| key.starts_with("refund:"))
        .map(|(_, key)| key)
        .collect();
    assert_eq!(
        refunds,
        vec![format!("refund:charge:{job}:approve_all:1:{fence1}")]
    );
}

// ---- off-hours -------------------------------------------------------------------------------

#[test]
fn off_hours_answers_429_and_the_flag_always_has_a_ttl() {
    let api = Api::start();
    let token = api.user("fay", 10, false);
    let admin = api.user("root", 0, true);
    let job = api.set(&token, &["happy"]);
    api.finish(&job, 0);
    let flag = |api: &Api| -> i64 { api.redis_cmd(redis::cmd("PTTL").arg("popcon:off_hours")) };
    let url = api.url("/api/admin/off-hours");

    // Admin only; the TTL is required and capped at 20 h.
    let (status, _) = post_json(&url, Some(&token), &json!({"on": true, "ttl_s": 60}));
    assert_eq!(status, 403);
    let (status, body) = post_json(&url, Some(&admin), &json!({"on": true}));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("ttl_s"), "{body}");
    assert_eq!(flag(&api), -2, "a refused request sets nothing");
    let (status, body) = post_json(&url, Some(&admin), &json!({"on": true, "ttl_s": 0}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = post_json(&url, Some(&admin), &json!({"on": true, "ttl_s": 500000}));
    assert_eq!(
        (status, body["ttl_s"].as_u64(), body["capped"].as_bool()),
        (200, Some(72000), Some(true))
    );
    let pttl = flag(&api);
    assert!(pttl > 71_000_000 && pttl <= 72_000_000, "PTTL {pttl}");
    let (status, body) = post_json(&url, Some(&admin), &json!({"on": true, "ttl_s": 72000}));
    assert_eq!(status, 200, "{body}");
    assert!(flag(&api) > 0, "the flag always carries a TTL");

    // Costly work is refused with 429 + Retry-After; nothing is charged or queued.
    let balance = api.balance("fay");
    let r = finish_response(
        authed(agent().post(&api.url("/api/generate-set")), Some(&token))
            .send_json(json!({"subject": "a cat"})),
    );
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!(
        retry_after > 71_000 && retry_after <= 72_000,
        "{retry_after}"
    );
    let (_, body) = read_json(r);
    assert_eq!(body["code"], "too_many_requests");
    let (status, _) = post_empty(
        &api.url(&format!("/api/regenerate/{job}?idx=0")),
        Some(&token),
    );
    assert_eq!(status, 429);
    assert_eq!(api.balance("fay"), balance);
    // Approve animates the emoji (GPU work): refused too, approve-all as well.
    for path in [
        format!("/api/approve/{job}?idx=0"),
        format!("/api/approve-all/{job}"),
    ] {
        let (status, body) = post_empty(&api.url(&path), Some(&token));
        assert_eq!(status, 429, "{path}: {body}");
    }
    assert_eq!(api.balance("fay"), balance, "nothing was charged");

    let r = finish_response(authed(agent().get(&url), Some(&admin)).call());
    let (_, body) = read_json(r);
    assert_eq!(body["on"], true);
    let r = finish_response(authed(agent().delete(&url), Some(&admin)).call());
    assert_eq!(r.status(), 200);
    assert_eq!(flag(&api), -2);
    let (status, _) = post_json(
        &api.url("/api/generate-set"),
        Some(&token),
        &json!({"subject": "a cat", "expressions": ["x"]}),
    );
    assert_eq!(status, 200);
    // {"on": false} clears as well.
    post_json(&url, Some(&admin), &json!({"on": true, "ttl_s": 30}));
    let (status, body) = post_json(&url, Some(&admin), &json!({"on": false}));
    assert_eq!((status, body["on"].as_bool()), (200, Some(false)));
    assert_eq!(flag(&api), -2);
}

// ---- auth and isolation ----------------------------------------------------------------------

#[test]
fn tokens_are_required_and_users_see_only_their_own_jobs() {
    let api = Api::start();
    let alice = api.user("alice", 10, false);
    let mallory = api.user("mallory", 10, false);
    let job = api.set(&alice, &["happy"]);
    api.fail(&job, 0);

    for (token, want) in [(None, "missing"), (Some("pcw_nope"), "invalid")] {
        let r = finish_response(authed(agent().get(&api.url("/api/credits")), token).call());
        assert_eq!(r.status(), 401);
        assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
        let (_, body) = read_json(r);
        assert_eq!(body["code"], "unauthorized");
        assert!(body["error"].as_str().unwrap().contains(want), "{body}");
    }
    let r = finish_response(
        agent()
            .get(&api.url("/api/credits"))
            .set("Authorization", "Basic abc")
            .call(),
    );
    assert_eq!(r.status(), 401);

    let (status, body) = get(&api.url(&format!("/api/job/{job}")), Some(&mallory));
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_found");
    for path in [
        format!("/api/retry/{job}?idx=0"),
        format!("/api/regenerate/{job}?idx=0"),
        format!("/api/approve-all/{job}"),
    ] {
        let (status, _) = post_empty(&api.url(&path), Some(&mallory));
        assert_eq!(status, 404, "{path}");
    }
    let (status, _) = get(
        &api.url(&format!("/api/job/{job}/download")),
        Some(&mallory),
    );
    assert_eq!(status, 404);
    let (_, list) = get(&api.url("/api/jobs"), Some(&mallory));
    assert_eq!(list["jobs"], json!([]));
    assert_eq!(api.balance("mallory"), 10);
    // The probe did not take the owner's claim: alice's retry goes through.
    let (_, body) = post_empty(&api.url(&format!("/api/retry/{job}?idx=0")), Some(&alice));
    assert_eq!(body["status"], "queued", "{body}");
    let (status, body) = get(&api.url("/api/credits"), Some(&alice));
    assert_eq!((status, body["balance"].as_i64()), (200, Some(8)));
    let (status, _) = get(&api.url("/api/nope"), Some(&alice));
    assert_eq!(status, 404);
}

// ---- uploads ---------------------------------------------------------------------------------

#[test]
fn uploads_are_validated_before_anything_is_created() {
    let api = Api::start();
    let token = api.user("gus", 50, false);
    let spec = br#"{"subject": "a red fox", "expressions": ["happy"]}"#;
    let url = api.url("/api/generate-set");

    let (status, body) = post_multipart(
        &url,
        &token,
        &[
            ("spec", "application/json", spec),
            ("image", "image/png", b"this is not an image"),
        ],
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not an image"),
        "{body}"
    );

    // A valid PNG header claiming 50000 x 50000 pixels (a decompression bomb): refused from
    // the header, before any pixel is decoded.
    let mut bomb = png(1, 1);
    bomb[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let (status, body) = post_multipart(
        &url,
        &token,
        &[
            ("spec", "application/json", spec),
            ("image", "image/png", &bomb),
        ],
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("50000x50000"),
        "{body}"
    );

    // Over the image byte limit (10 MiB) but inside the request limit: a precise 413.
    let big = vec![0u8; 10 * 1024 * 1024 + 64 * 1024];
    let (status, body) = post_multipart(
        &url,
        &token,
        &[
            ("spec", "application/json", spec),
            ("image", "image/png", &big),
        ],
    );
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("bytes"), "{body}");

    let (status, body) = post_multipart(&url, &token, &[("image", "image/png", &png(8, 8))]);
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("spec"), "{body}");
    let (status, body) = post_json(
        &url,
        Some(&token),
        &json!({"subject": "fox", "colour": "red"}),
    );
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");
    let (status, body) = post_json(&url, Some(&token), &json!({"subject": "   "}));
    assert_eq!(status, 400, "{body}");
    let r = finish_response(
        authed(agent().post(&url), Some(&token))
            .set("Content-Type", "text/plain")
            .send_string("fox"),
    );
    assert_eq!(r.status(), 415);

    assert_eq!(api.balance("gus"), 50, "nothing charged");
    let (_, list) = get(&api.url("/api/jobs"), Some(&token));
    assert_eq!(list["jobs"], json!([]), "nothing created");
    assert_eq!(api.stream_len("bulk"), 0, "nothing queued");

    // A good upload: the job keeps the reference, readable through its signed URL.
    let (status, body) = post_multipart(
        &url,
        &token,
        &[
            ("spec", "application/json", spec),
            ("image", "image/png", &png(32, 24)),
        ],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["charged"], 1);
    let reference = body["reference_url"].as_str().unwrap();
    let r = get_raw(reference);
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("Content-Type"), Some("image/png"));
}

// ---- reads: the thumbnail chain, signed URLs, pagination -------------------------------------

fn card<'a>(list: &'a Value, job: &str) -> &'a Value {
    list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == job)
        .unwrap()
}

fn fetch_png(url: &str) {
    let r = get_raw(url);
    assert_eq!(r.status(), 200, "{url}");
    assert_eq!(r.header("Content-Type"), Some("image/png"), "{url}");
    let mut bytes = Vec::new();
    r.into_reader().read_to_end(&mut bytes).unwrap();
    image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{url}: not an image: {e}"));
}

#[test]
fn every_case_of_the_thumbnail_chain_points_at_an_image_that_exists() {
    let api = Api::start();
    let token = api.user("hal", 50, false);
    let path_job = api.set(&token, &["a"]);
    api.finish(&path_job, 0);
    let key_job = api.set(&token, &["a"]);
    api.finish(&key_job, 0);
    let emoji0_job = api.set(&token, &["a"]);
    api.finish(&emoji0_job, 0);
    let fresh_job = api.set(&token, &["a"]);
    // Damage the cache the way the old system's race did (or an older writer would).
    api.rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&db_url(api.dir.path()))
            .await
            .unwrap();
        sqlx::query("UPDATE jobs SET thumbnail_path = NULL WHERE id = ?")
            .bind(&key_job)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("UPDATE jobs SET thumbnail_path = '', thumbnail_key = '' WHERE id = ?")
            .bind(&emoji0_job)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    let (status, list) = get(&api.url("/api/jobs"), Some(&token));
    assert_eq!(status, 200);
    for (job, source) in [
        (&path_job, "path"),
        (&key_job, "key"),
        (&emoji0_job, "emoji0"),
        (&fresh_job, "placeholder"),
    ] {
        let c = card(&list, job);
        assert_eq!(c["thumbnail_source"], source, "{c}");
        fetch_png(c["thumbnail_url"].as_str().unwrap());
    }
    assert!(
        card(&list, &path_job)["thumbnail_url"]
            .as_str()
            .unwrap()
            .contains("/files/jobs/")
    );
    assert!(
        card(&list, &fresh_job)["thumbnail_url"]
            .as_str()
            .unwrap()
            .ends_with("/static/placeholder.png")
    );

    // Signed URLs (emoji 0's full image is not public): altered or missing signatures are
    // refused.
    let signed = card(&list, &emoji0_job)["thumbnail_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(signed.contains("sig="), "{signed}");
    let (status, body) = read_json(get_raw(&signed.replace("sig=", "sig=00")));
    assert_eq!(status, 403, "{body}");
    let (status, body) = read_json(get_raw(&format!(
        "{}/files/{}",
        api.base,
        blobs::keys::emoji(&key_job, 0, 1)
    )));
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("signature"),
        "{body}"
    );
    let (status, _) = read_json(get_raw(&format!("{}/files/jobs/x/thumb/0-1.png", api.base)));
    assert_eq!(status, 404);

    // The job view: per-emoji status and signed URLs.
    let (_, view) = get(&api.url(&format!("/api/job/{path_job}")), Some(&token));
    assert_eq!(view["status"], "done");
    assert_eq!(view["emoji"][0]["status"], "done");
    fetch_png(view["emoji"][0]["url"].as_str().unwrap());

    // Newest first, paginated.
    let (_, page) = get(&api.url("/api/jobs?limit=3"), Some(&token));
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [fresh_job.as_str(), emoji0_job.as_str(), key_job.as_str()]
    );
    assert_eq!(page["next_offset"], 3);
    let (_, page2) = get(&api.url("/api/jobs?limit=3&offset=3"), Some(&token));
    assert_eq!(page2["jobs"][0]["id"], path_job);
    assert_eq!(page2["next_offset"], Value::Null);
    let (status, _) = get(&api.url("/api/jobs?limit=0"), Some(&token));
    assert_eq!(status, 400);
}

// ---- the worker's side of credits ------------------------------------------------------------

#[test]
fn a_dead_lettered_set_is_refunded_exactly_once() {
    let api = Api::start_with(Options {
        worker: true,
        break_uploads: true,
        ..Options::default()
    });
    let token = api.user("ivy", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    assert_eq!(api.balance("ivy"), 8);
    let view = api.wait_job(&token, &job, "the set to fail", |b| b["status"] == "failed");
    assert!(
        view["emoji"][0]["error"]
            .as_str()
            .unwrap()
            .contains("gave up"),
        "{view}"
    );
    api.wait_until("the refund", 10, |a| a.balance("ivy") == 10);
    let entries = api.ledger("ivy");
    assert_eq!(
        entries
            .iter()
            .filter(|(_, k)| k.starts_with("refund:"))
            .count(),
        1,
        "{entries:?}"
    );
}

// ---- end to end ------------------------------------------------------------------------------

#[test]
fn a_set_submitted_over_http_is_finished_by_the_daemon_and_its_card_shows_a_thumbnail() {
    let api = Api::start_with(Options {
        worker: true,
        ..Options::default()
    });
    let token = api.user("jo", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    let view = api.wait_job(&token, &job, "the set", |b| b["status"] == "done");
    assert_eq!(view["emoji_done"], 2);
    for e in view["emoji"].as_array().unwrap() {
        fetch_png(e["url"].as_str().unwrap());
    }
    let (_, list) = get(&api.url("/api/jobs"), Some(&token));
    let c = card(&list, &job);
    assert_eq!(c["thumbnail_source"], "path", "{c}");
    fetch_png(c["thumbnail_url"].as_str().unwrap());
    assert_eq!(api.balance("jo"), 8);

    let r = finish_response(
        authed(
            agent().get(&api.url(&format!("/api/job/{job}/download"))),
            Some(&token),
        )
        .call(),
    );
    assert_eq!(r.status(), 200);
    assert_eq!(r.header("Content-Type"), Some("application/zip"));
    let mut bytes = Vec::new();
    r.into_reader().read_to_end(&mut bytes).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["00-happy.png", "01-sad.png"]);
    let mut f = zip.by_name("00-happy.png").unwrap();
    let mut data = Vec::new();
    f.read_to_end(&mut data).unwrap();
    image::load_from_memory(&data).unwrap();

    // Regenerate the finished emoji 0 and see it come back with a new fence.
    let (_, body) = post_empty(
        &api.url(&format!("/api/regenerate/{job}?idx=0")),
        Some(&token),
    );
    assert_eq!(body["status"], "queued", "{body}");
    let view = api.wait_job(&token, &job, "the regenerate", |b| {
        b["emoji"][0]["status"] == "done" && b["emoji"][0]["fence"] == 2
    });
    assert_eq!(view["status"], "done");
    assert_eq!(api.balance("jo"), 7);
}

// ---- images in an S3 bucket (a real moto server) ---------------------------------------------

#[test]
fn s3_blobs_round_trip_and_hand_out_presigned_urls() {
    let moto = MotoServer::start();
    moto.create_bucket("popcon");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let blobs = Blobs::open(&BlobsConfig {
        s3: Some(s3_config(&moto)),
        ..BlobsConfig::at("/nonexistent-never-created")
    })
    .unwrap();
    let key = blobs::keys::emoji("j1", 0, 1);
    let data = png(12, 7);
    rt.block_on(async {
        assert!(!blobs.exists(&key).await.unwrap());
        assert!(matches!(
            blobs.get(&key).await.unwrap_err(),
            popcon_worker::blobs::BlobError::NotFound(_)
        ));
        blobs.put(&key, data.clone()).await.unwrap();
        assert!(blobs.exists(&key).await.unwrap());
        assert_eq!(blobs.get(&key).await.unwrap(), data);
        assert_eq!(
            blobs.url_for(&key).unwrap(),
            format!("s3://popcon/results/{key}")
        );
        assert_eq!(blobs.public_url(&key).unwrap(), format!("/files/{key}"));
        assert!(blobs.local_path(&key).is_err());
        assert!(blobs.put("../escape", vec![1]).await.is_err());
    });
    assert!(!Path::new("/nonexistent-never-created").exists());
    // The presigned URL reads the object straight from the bucket, without our API.
    let url = rt
        .block_on(blobs.signed_url(&key, Duration::from_secs(60)))
        .unwrap();
    assert!(url.starts_with(&moto.endpoint()), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let mut body = Vec::new();
    get_raw(&url).into_reader().read_to_end(&mut body).unwrap();
    assert_eq!(body, data);
    // A bad location is a precise, permanent error.
    let err = Blobs::open(&BlobsConfig {
        s3: Some(S3Config {
            url: "popcon/results".into(),
            ..s3_config(&moto)
        }),
        ..BlobsConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("s3://bucket"), "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn with_images_in_s3_a_set_is_finished_and_served_thumbnail_urls_and_zip() {
    let api = Api::start_with(Options {
        worker: true,
        s3: true,
        ..Options::default()
    });
    let token = api.user("sam", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    let view = api.wait_job(&token, &job, "the set", |b| b["status"] == "done");
    // Full images: presigned URLs into the bucket.
    for e in view["emoji"].as_array().unwrap() {
        let url = e["url"].as_str().unwrap();
        assert!(url.contains("X-Amz-Signature="), "{url}");
        fetch_png(url);
    }
    // The card's thumbnail: the public path the worker wrote, served by the API from the bucket.
    let (_, list) = get(&api.url("/api/jobs"), Some(&token));
    let c = card(&list, &job);
    assert_eq!(c["thumbnail_source"], "path", "{c}");
    fetch_png(c["thumbnail_url"].as_str().unwrap());
    // Nothing went to the local folder.
    assert!(!api.dir.path().join("results/jobs").exists());

    let r = finish_response(
        authed(
            agent().get(&api.url(&format!("/api/job/{job}/download"))),
            Some(&token),
        )
        .call(),
    );
    assert_eq!(r.status(), 200);
    let mut bytes = Vec::new();
    r.into_reader().read_to_end(&mut bytes).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    assert_eq!(zip.len(), 2);
    let mut data = Vec::new();
    zip.by_name("01-sad.png")
        .unwrap()
        .read_to_end(&mut data)
        .unwrap();
    image::load_from_memory(&data).unwrap();
}

// ---- the zip download, streamed with bounded memory (the binary, its own process) ------------

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_zip_of_a_64_emoji_set_streams_with_bounded_memory() {
    const N: u32 = 64;
    const SIZE: usize = 1536 * 1024;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bin = env!("CARGO_BIN_EXE_popcon-worker");
    let env = |c: &mut std::process::Command| {
        c.env("REDIS_URL", redis.url())
            .env("DATABASE_URL", db_url(dir.path()))
            .env("POPCON_RESULTS", dir.path().join("results"))
            .env("POPCON_URL_SECRET", SECRET)
            .env("RUST_LOG", "warn");
    };
    let mut add = std::process::Command::new(bin);
    env(&mut add);
    let out = add
        .args(["users", "add", "kim", "--credits", "100"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();

    // A finished 64-emoji set of incompressible 1.5 MiB images (96 MiB in all).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = "zipjob64";
    let mut expected = Vec::new();
    rt.block_on(async {
        let store = Store::connect(&db_url(dir.path())).await.unwrap();
        let blobs = Blobs::open(&blobs_config(dir.path())).unwrap();
        store
            .create_job(&popcon_worker::store::NewJob {
                id: job.into(),
                user_id: "kim".into(),
                subject: "a red fox".into(),
                style: None,
                seed: 1,
                model: None,
                reference_key: None,
                labels: (0..N).map(|i| format!("e{i}")).collect(),
            })
            .await
            .unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(9);
        for idx in 0..N {
            let mut data = vec![0u8; SIZE];
            rand::RngCore::fill_bytes(&mut rng, &mut data);
            let key = blobs::keys::emoji(job, idx, 1);
            blobs.put(&key, data.clone()).await.unwrap();
            expected.push(data);
            store.start_emoji(job, idx, 1).await.unwrap();
            store
                .finish_emoji(&EmojiOutcome {
                    job_id: job.into(),
                    idx,
                    fence: 1,
                    image_key: key.clone(),
                    seed: 1,
                    thumbnail: (idx == 0).then(|| Thumbnail {
                        path: format!("/files/{key}"),
                        key,
                    }),
                })
                .await
                .unwrap();
        }
        store.close().await;
    });

    let mut cmd = std::process::Command::new(bin);
    env(&mut cmd);
    let child = Child(
        cmd.args(["api", "--listen", &format!("127.0.0.1:{port}")])
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent().get(&format!("{base}/readyz")).call().is_err() {
        assert!(Instant::now() < deadline, "the api never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Warm up the paths a download uses, then take the baseline peak.
    let (status, _) = get(&format!("{base}/api/job/{job}"), Some(&token));
    assert_eq!(status, 200);
    let before = vm_hwm_kib(child.0.id());

    let r = finish_response(
        authed(
            agent().get(&format!("{base}/api/job/{job}/download")),
            Some(&token),
        )
        .call(),
    );
    assert_eq!(r.status(), 200);
    let path: PathBuf = dir.path().join("download.zip");
    let mut file = std::fs::File::create(&path).unwrap();
    let total = std::io::copy(&mut r.into_reader(), &mut file).unwrap();
    drop(file);
    let after = vm_hwm_kib(child.0.id());
    assert!(total > (N as u64) * SIZE as u64, "{total} bytes");
    let grown_mib = (after.saturating_sub(before)) as f64 / 1024.0;
    eprintln!(
        "zip {:.0} MiB; api peak RSS {before} kB -> {after} kB (+{grown_mib:.1} MiB)",
        total as f64 / 1048576.0
    );
    assert!(
        grown_mib < 24.0,
        "the server's peak memory grew by {grown_mib:.1} MiB for a {} MiB archive: it buffers",
        total / 1048576
    );

    let mut zip = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(zip.len(), N as usize);
    for (idx, want) in expected.iter().enumerate() {
        let mut f = zip.by_name(&format!("{idx:02}-e{idx}.png")).unwrap();
        let mut data = Vec::with_capacity(SIZE);
        f.read_to_end(&mut data).unwrap();
        assert!(data == *want, "entry {idx} differs");
    }
}

// ---- input rules -----------------------------------------------------------------------------

#[test]
fn a_spec_must_be_a_json_object_and_json_needs_a_json_content_type() {
    let api = Api::start();
    let token = api.user("ida", 50, false);
    let url = api.url("/api/generate-set");
    // `["subject"]` used to be read as `{"subject": "subject"}` (serde reads a struct from a
    // sequence of its fields) and queued a set.
    for body in [json!(["subject"]), json!("x"), json!(3), json!(null)] {
        let (status, b) = post_json(&url, Some(&token), &body);
        assert_eq!(status, 400, "{body}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{body}: {b}"
        );
    }
    let (status, b) = post_multipart(&url, &token, &[("spec", "application/json", b"[\"fox\"]")]);
    assert_eq!(status, 400, "{b}");
    assert!(
        b["error"]
            .as_str()
            .unwrap()
            .contains("must be a JSON object"),
        "{b}"
    );

    let send = |ct: &str, body: &str| {
        read_json(finish_response(
            authed(agent().post(&url), Some(&token))
                .set("Content-Type", ct)
                .send_string(body),
        ))
    };
    for ct in [
        "text/plain",
        "application/jsonp",
        "application/x-www-form-urlencoded",
        "json",
    ] {
        let (status, b) = send(ct, r#"{"subject": "fox"}"#);
        assert_eq!(status, 415, "{ct}: {b}");
        assert!(
            b["error"].as_str().unwrap().contains("application/json"),
            "{ct}: {b}"
        );
    }
    assert_eq!(api.balance("ida"), 50, "nothing charged");
    assert_eq!(api.stream_len("bulk"), 0, "nothing queued");
    for ct in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.popcon+json",
    ] {
        let (status, b) = send(ct, r#"{"subject": "fox", "expressions": ["happy"]}"#);
        assert_eq!(status, 200, "{ct}: {b}");
    }

    // The admin routes read JSON through axum's extractor: the same 415.
    let admin = api.user("root", 0, true);
    let r = finish_response(
        authed(agent().post(&api.url("/api/admin/credits")), Some(&admin))
            .set("Content-Type", "text/plain")
            .send_string(r#"{"user": "ida", "amount": 1}"#),
    );
    let (status, b) = read_json(r);
    assert_eq!(status, 415, "{b}");
    assert_eq!(b["code"], "unsupported_media_type");
}

#[test]
fn a_grant_out_of_range_or_overflowing_the_balance_is_400_not_500() {
    let api = Api::start();
    let admin = api.user("root", 0, true);
    api.user("jo", 5, false);
    let url = api.url("/api/admin/credits");
    for amount in [0, -1, i64::MAX, popcon_worker::http::api::MAX_GRANT + 1] {
        let (status, b) = post_json(&url, Some(&admin), &json!({"user": "jo", "amount": amount}));
        assert_eq!(status, 400, "{amount}: {b}");
        assert!(
            b["error"].as_str().unwrap().contains("`amount` must be"),
            "{b}"
        );
    }
    // A balance near the top (put there through the store: no grant route allows it), then
    // a grant in range that would overflow it: the store refuses it, as the caller's error.
    api.rt
        .block_on(api.store.grant("jo", i64::MAX - 10, "test", "near-max"))
        .unwrap();
    let before = api.balance("jo");
    let (status, b) = post_json(&url, Some(&admin), &json!({"user": "jo", "amount": 100}));
    assert_eq!(status, 400, "{b}");
    assert_eq!(b["code"], "bad_request");
    assert!(b["error"].as_str().unwrap().contains("overflow"), "{b}");
    assert_eq!(api.balance("jo"), before, "nothing written");

    // Admin bodies are JSON objects: serde would read an array field by field.
    for (path, body) in [
        ("/api/admin/credits", json!(["jo", 5])),
        ("/api/admin/off-hours", json!([true, 3600])),
    ] {
        let (status, b) = post_json(&api.url(path), Some(&admin), &body);
        assert_eq!(status, 400, "{path}: {b}");
        assert!(
            b["error"]
                .as_str()
                .unwrap()
                .contains("must be a JSON object"),
            "{b}"
        );
    }
    assert_eq!(api.balance("jo"), before, "nothing written");
    let (_, state) = get(&api.url("/api/admin/off-hours"), Some(&admin));
    assert_eq!(state["on"], false, "{state}");
}

// ---- HTTP read timeouts and the connection limit ---------------------------------------------

fn limited(header_read: Duration, body_read: Duration, max_connections: usize) -> Api {
    Api::start_with(Options {
        http_limits: Some(popcon_worker::http::HttpLimits {
            header_read,
            body_read,
            max_connections,
        }),
        ..Options::default()
    })
}

fn raw(api: &Api, first_bytes: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let addr = api.base.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(first_bytes).unwrap();
    s
}

/// Reads until the server closes; `None` if it has not closed within `wait`.
fn read_until_closed(s: &mut std::net::TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset is the server closing too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn healthz_ok(api: &Api) {
    let r = get_raw(&api.url("/healthz"));
    assert_eq!(r.status(), 200);
}

#[test]
fn stalled_headers_bodies_and_idle_connections_are_closed_after_the_read_timeouts() {
    let timeout = Duration::from_secs(1);
    let api = limited(timeout, timeout, 1024);
    let token = api.user("kim", 50, false);
    const N: usize = 50;
    let half_header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Ag".to_vec();
    let half_body = format!(
        "POST /api/generate-set HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"subj"
    );
    let mut headers: Vec<_> = (0..N).map(|_| raw(&api, &half_header)).collect();
    let mut bodies: Vec<_> = (0..N).map(|_| raw(&api, half_body.as_bytes())).collect();
    let mut idle: Vec<_> = (0..5).map(|_| raw(&api, b"")).collect();
    // A normal request is served while all of them stall.
    healthz_ok(&api);
    // Closed within the timeout plus generous slack for a loaded machine; without the
    // timeouts they would stay open indefinitely.
    let wait = timeout + Duration::from_secs(10);
    for (i, s) in headers.iter_mut().chain(idle.iter_mut()).enumerate() {
        let got = read_until_closed(s, wait)
            .unwrap_or_else(|| panic!("header/idle connection {i} still open after {wait:?}"));
        // hyper may answer 408 or just close; it must never have served the half request.
        assert!(!String::from_utf8_lossy(&got).contains("200 OK"), "{i}");
    }
    for (i, s) in bodies.iter_mut().enumerate() {
        let got = read_until_closed(s, wait)
            .unwrap_or_else(|| panic!("body connection {i} still open after {wait:?}"));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{i}: {text}");
        assert!(text.contains("request_timeout"), "{i}: {text}");
    }
    healthz_ok(&api);
    assert_eq!(api.balance("kim"), 50, "nothing charged");
    assert_eq!(api.stream_len("bulk"), 0, "nothing queued");
}

#[test]
fn beyond_the_connection_limit_new_connections_wait_until_one_closes() {
    use std::io::Write;
    let api = limited(Duration::from_secs(60), Duration::from_secs(60), 2);
    // Two stalled connections hold both permits (their header timeout is a minute away).
    let holder = raw(&api, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    let _holder2 = raw(&api, b"GET /healthz HTTP/1.1\r\nHost: x\r\n");
    // A third connects (the kernel's backlog takes it) and sends a whole request...
    let mut third = raw(&api, b"");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    // ...which is not served while both permits are held,
    assert!(
        read_until_closed(&mut third, Duration::from_secs(1)).is_none(),
        "served beyond the limit"
    );
    // and is served once a holder goes away.
    drop(holder);
    let got = read_until_closed(&mut third, Duration::from_secs(20))
        .expect("served once a connection closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");
}

#[test]
fn a_tiny_16_bit_png_of_24_megapixels_is_refused_before_it_is_decoded() {
    let api = Api::start();
    let token = api.user("lou", 50, false);
    // 4896² 16-bit RGB, all zero: a small file whose decode would take ~144 MB.
    let img = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::new(4896, 4896);
    let mut bomb = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bomb),
        image::ImageFormat::Png,
    )
    .unwrap();
    drop(img);
    assert!(bomb.len() < 1024 * 1024, "{} bytes", bomb.len());
    let (status, body) = post_multipart(
        &api.url("/api/generate-set"),
        &token,
        &[
            ("spec", "application/json", br#"{"subject": "fox"}"#),
            ("image", "image/png", &bomb),
        ],
    );
    assert_eq!(status, 400, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("4896x4896") && msg.contains("bytes to decode"),
        "{body}"
    );
    assert_eq!(api.balance("lou"), 50, "nothing charged");
    assert_eq!(api.stream_len("bulk"), 0, "nothing queued");
}

// ---- live events (server-sent events) --------------------------------------------------------

/// One server-sent event: its `event:` name and its `data:` as JSON.
fn next_event(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> Option<(String, Value)> {
    let (mut name, mut data) = (String::new(), String::new());
    for line in lines {
        let line = line.ok()?;
        if line.is_empty() {
            if !data.is_empty() {
                return Some((
                    name,
                    serde_json::from_str(&data).expect("event data is JSON"),
                ));
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    None
}

fn events(api: &Api, token: &str, job: &str) -> ureq::Response {
    finish_response(
        authed(
            agent().get(&api.url(&format!("/api/job/{job}/events"))),
            Some(token),
        )
        .call(),
    )
}

#[test]
fn job_events_stream_the_current_state_then_progress_then_a_terminal_event() {
    use std::io::BufRead;
    let mut api = Api::start();
    let alice = api.user("alice", 10, false);
    let bob = api.user("bob", 10, false);
    let job = api.set(&alice, &["happy", "sad"]);

    // Same auth and isolation as the JSON routes.
    let (status, body) = read_json(finish_response(
        agent()
            .get(&api.url(&format!("/api/job/{job}/events")))
            .call(),
    ));
    assert_eq!(status, 401, "{body}");
    let (status, body) = read_json(events(&api, &bob, &job));
    assert_eq!(status, 404, "{body}");
    let (status, _) = read_json(events(&api, &alice, "0123456789abcdef0123456789abcdef"));
    assert_eq!(status, 404);

    // No worker yet: the first event is the current (pending) state, sent at once.
    let r = events(&api, &alice, &job);
    assert_eq!(r.status(), 200);
    assert!(
        r.header("Content-Type")
            .unwrap_or("")
            .starts_with("text/event-stream"),
        "{:?}",
        r.header("Content-Type")
    );
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    let (name, first) = next_event(&mut lines).expect("a first event");
    assert_eq!(name, "job");
    assert_eq!(first["id"], job.as_str());
    assert_eq!(first["status"], "pending");

    // The worker runs it: progress and status changes arrive, then `end` with the done view,
    // then the stream closes.
    api.start_worker();
    let mut seen_progress = false;
    let mut seen_running = false;
    let last = loop {
        let (name, view) = next_event(&mut lines).expect("the stream ends with `end`");
        seen_progress |= view["emoji"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["progress"]["total"].as_u64().is_some_and(|t| t > 0))
            || view["progress"]["total"].as_u64().is_some_and(|t| t > 0);
        seen_running |= view["status"] == "running";
        if name == "end" {
            break view;
        }
        assert_eq!(name, "job");
    };
    assert_eq!(last["status"], "done", "{last}");
    assert_eq!(last["emoji_done"], 2);
    assert!(seen_running, "no running state was streamed");
    assert!(seen_progress, "no progress was streamed");
    assert!(
        next_event(&mut lines).is_none(),
        "the stream closes after `end`"
    );

    // A client that reconnects to a settled job gets its state at once, as `end`.
    let r = events(&api, &alice, &job);
    let mut lines = std::io::BufReader::new(r.into_reader()).lines();
    let (name, view) = next_event(&mut lines).expect("the state");
    assert_eq!(name, "end");
    assert_eq!(view["status"], "done");

    // Every request was counted under its route template, with its latency in a histogram.
    let text = get_raw(&api.url("/metrics")).into_string().unwrap();
    assert!(
        text.contains(
            r#"popcon_api_requests_total{route="/api/job/{job_id}/events",status="200",code=""} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"popcon_api_request_duration_seconds_bucket{route="/api/job/{job_id}/events",le="+Inf"} "#),
        "{text}"
    );
    assert!(
        text.contains("# TYPE popcon_api_request_duration_seconds histogram"),
        "{text}"
    );
}

#[test]
fn the_web_app_is_served_from_the_binary_with_its_assets() {
    let api = Api::start();
    for (path, ty, needle) in [
        ("/", "text/html", "app.js"),
        ("/app.js", "text/javascript", "/api/job/"),
        ("/app.css", "text/css", "{"),
    ] {
        let r = get_raw(&api.url(path));
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            r.header("Content-Type").unwrap_or("").starts_with(ty),
            "{path}"
        );
        assert!(r.header("Content-Security-Policy").is_some(), "{path}");
        let body = r.into_string().unwrap();
        assert!(body.contains(needle), "{path}: {body:.200}");
    }
}

// ---- animations of approved emoji --------------------------------------------------------------

#[test]
fn an_approved_emojis_animation_is_served_signed_and_zipped_in_both_formats() {
    use popcon_worker::pipeline::animation::Clip;
    let api = Api::start();
    let token = api.user("jo", 10, false);
    let job = api.set(&token, &["happy", "sad"]);
    api.finish(&job, 0);
    api.finish(&job, 1);
    // What the animate step writes: both files, then the approval with the key, fenced.
    let frames: Vec<image::RgbaImage> = (0..4)
        .map(|i| image::RgbaImage::from_pixel(16, 16, image::Rgba([40 * i, 90, 200, 255])))
        .collect();
    let clip = Clip::new(frames, 8).unwrap();
    api.rt.block_on(async {
        let fence = match api
            .store
            .bump_fence(&job, 0, &[EmojiStatus::Done])
            .await
            .unwrap()
        {
            popcon_worker::store::PreflipOutcome::Flipped { fence } => fence,
            other => panic!("{other:?}"),
        };
        let key = blobs::keys::animation(&job, 0, fence);
        api.blobs.put(&key, clip.to_webp().unwrap()).await.unwrap();
        let apng = blobs::keys::animation_apng(&key).unwrap();
        api.blobs.put(&apng, clip.to_apng().unwrap()).await.unwrap();
        api.store
            .approve_emoji_animated(&job, 0, fence, &key)
            .await
            .unwrap();
    });

    let (_, view) = get(&api.url(&format!("/api/job/{job}")), Some(&token));
    let e0 = &view["emoji"][0];
    assert_eq!(e0["status"], "approved", "{view}");
    for (field, ty) in [
        ("animation_url", "image/webp"),
        ("animation_apng_url", "image/png"),
    ] {
        let url = e0[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {e0}"));
        assert!(url.contains("sig="), "{field} is signed: {url}");
        let r = get_raw(url);
        assert_eq!(r.status(), 200, "{field}");
        assert_eq!(r.header("Content-Type"), Some(ty), "{field}");
        // Unsigned, the same file is refused.
        let bare = url.split('?').next().unwrap();
        assert_ne!(get_raw(bare).status(), 200, "{field} without its signature");
    }
    assert_eq!(view["emoji"][1]["animation_url"], Value::Null);

    let r = finish_response(
        authed(
            agent().get(&api.url(&format!("/api/job/{job}/download"))),
            Some(&token),
        )
        .call(),
    );
    let mut bytes = Vec::new();
    r.into_reader().read_to_end(&mut bytes).unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut names: Vec<String> = zip.file_names().map(|n| n.unwrap().into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "00-happy.apng",
            "00-happy.png",
            "00-happy.webp",
            "01-sad.png"
        ]
    );
    let mut webp = Vec::new();
    zip.by_name("00-happy.webp")
        .unwrap()
        .read_to_end(&mut webp)
        .unwrap();
    assert_eq!(webp, clip.to_webp().unwrap());
}

#[test]
fn approve_animates_for_a_price_refunds_a_failed_animation_and_regenerate_clears_it() {
    let mut api = Api::start();
    let token = api.user("kim", 10, false);
    let job = api.set(&token, &["happy", "sad", "angry"]);
    api.finish(&job, 0);
    api.finish(&job, 1);
    api.fail(&job, 2);
    let before = api.balance("kim");

    // Only a done emoji can be approved; the refusal charges nothing.
    let (_, body) = post_empty(&api.url(&format!("/api/approve/{job}?idx=2")), Some(&token));
    assert_eq!(
        (body["status"].as_str(), body["current"].as_str()),
        (Some("wrong_state"), Some("failed")),
        "{body}"
    );
    // A priced approve of emoji 0 (as regenerate by default), and of emoji 1 whose still is
    // then lost: its animation fails for good.
    let (_, one) = post_empty(&api.url(&format!("/api/approve/{job}?idx=0")), Some(&token));
    assert_eq!(
        (one["status"].as_str(), one["charged"].as_i64()),
        (Some("queued"), Some(1)),
        "{one}"
    );
    let (_, two) = post_empty(&api.url(&format!("/api/approve/{job}?idx=1")), Some(&token));
    assert_eq!(two["status"], "queued", "{two}");
    assert_eq!(api.balance("kim"), before - 2);
    let still = api.row(&job, 1).image_key.unwrap();
    std::fs::remove_file(api.dir.path().join("results").join(&still)).unwrap();

    api.start_worker();
    let view = api.wait_job(&token, &job, "the approval", |b| {
        b["emoji"][0]["status"] == "approved"
    });
    let url = view["emoji"][0]["animation_url"]
        .as_str()
        .unwrap_or_else(|| panic!("approved with an animation: {view}"));
    let r = get_raw(url);
    assert_eq!(r.header("Content-Type"), Some("image/webp"));
    // The failed animation: refunded, the still stays done and approvable.
    api.wait_until("emoji 1's refund", 60, |a| a.balance("kim") == before - 1);
    let row1 = api.row(&job, 1);
    assert_eq!(row1.status, EmojiStatus::Done, "{row1:?}");
    assert!(row1.animation_key.is_none());
    // The refund comes before the dead letter (rows and ledger first, then Redis).
    api.wait_until("emoji 1's dead letter", 60, |a| a.stream_len("dead") == 1);
    // Given up, the approval no longer holds the row: nothing republishes it, and it can be
    // approved (and paid for) again.
    let outbox = api.rt.block_on(api.store.outbox_entry(&format!(
        "{job}:approve:1:{}",
        two["fence"].as_u64().unwrap()
    )));
    assert_eq!(
        outbox.unwrap(),
        None,
        "the dead letter settled its outbox entry"
    );
    api.redis_cmd::<i64>(redis::cmd("DEL").arg(format!("popcon:claim:{job}:approve-1")));
    let (_, retry) = post_empty(&api.url(&format!("/api/approve/{job}?idx=1")), Some(&token));
    assert_eq!(
        (retry["status"].as_str(), retry["charged"].as_i64()),
        (Some("queued"), Some(1)),
        "{retry}"
    );

    // Re-approving the approved emoji is a wrong state (once the double-click claim is gone).
    api.redis_cmd::<i64>(redis::cmd("DEL").arg(format!("popcon:claim:{job}:approve-0")));
    let (_, again) = post_empty(&api.url(&format!("/api/approve/{job}?idx=0")), Some(&token));
    assert_eq!(
        (again["status"].as_str(), again["current"].as_str()),
        (Some("wrong_state"), Some("approved")),
        "{again}"
    );
    // Regenerating it makes a new still and drops the old animation.
    let (_, regen) = post_empty(
        &api.url(&format!("/api/regenerate/{job}?idx=0")),
        Some(&token),
    );
    assert_eq!(regen["status"], "queued", "{regen}");
    let fence = regen["fence"].as_u64().unwrap();
    let view = api.wait_job(&token, &job, "the regenerate", |b| {
        b["emoji"][0]["status"] == "done" && b["emoji"][0]["fence"] == fence
    });
    assert_eq!(view["emoji"][0]["animation_url"], Value::Null, "{view}");
    assert!(api.row(&job, 0).animation_key.is_none());
}
