//! Fault tests with real process deaths: the `api` binary runs as its own process and is
//! SIGKILLed by a failpoint (`POPCON_FAILPOINTS`, src/failpoint.rs) between the steps of
//! charge → flip → dispatch; Redis is restarted without its data or paused. A real worker
//! with the tiny model (and its outbox relay and reconciler, on short bounds) runs beside it.
//! Each case asserts the end state the README's reliability section promises: the work runs
//! exactly once with one charge, or nothing is charged (or it is refunded), within a bound —
//! and the next click works.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use popcon_worker::blobs::BlobsConfig;
use popcon_worker::config::WorkerConfig;
use popcon_worker::job::EmojiStatus;
use popcon_worker::store::{JobRecord, Store};
use popcon_worker::worker::reconcile::ReconcileConfig;
use popcon_worker::worker::{ShutdownTrigger, Worker, shutdown_channel};
use serde_json::{Value, json};

const SECRET: &str = "faults-test-secret-0123456789";
/// The claim TTL the `api` processes run with: after a crash, the next click waits this long.
const CLAIM_TTL: &str = "1s";
/// Everything in these tests must settle within this.
const BOUND: Duration = Duration::from_secs(60);
/// Every action costs, so a lost or doubled charge shows in the ledger.
const PRICES: &str = "generate_set=1,retry=2,regenerate=3,approve=4,approve_all=5";

struct Env {
    rt: tokio::runtime::Runtime,
    redis: RedisServer,
    dir: tempfile::TempDir,
    store: Store,
    token: String,
    worker: Option<(ShutdownTrigger, tokio::task::JoinHandle<()>, Arc<Worker>)>,
}

struct ApiProc {
    child: std::process::Child,
    base: String,
}

impl Drop for ApiProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use common::worker_config::db_url;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

impl Env {
    fn new() -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let store = rt.block_on(Store::connect(&db_url(dir.path()))).unwrap();
        let token = rt
            .block_on(popcon_worker::auth::add_user(&store, "alice", false, 1000))
            .unwrap()
            .1;
        Env {
            rt,
            redis,
            dir,
            store,
            token,
            worker: None,
        }
    }

    fn start_worker(&mut self) {
        let cfg = WorkerConfig {
            blobs: BlobsConfig {
                url_secret: Some(SECRET.into()),
                ..BlobsConfig::at(self.dir.path().join("results"))
            },
            reconcile: ReconcileConfig {
                every: Duration::from_millis(200),
                relay_after: Duration::from_millis(500),
                lost_after: Duration::from_secs(2),
                max_republish: 5,
            },
            ..common::worker_config::worker_config(&self.redis.url(), self.dir.path(), "w1")
        };
        let worker = Arc::new(self.rt.block_on(Worker::start(cfg)).expect("worker starts"));
        let (trigger, shutdown) = shutdown_channel();
        let w = worker.clone();
        let task = self
            .rt
            .spawn(async move { w.run(shutdown).await.expect("worker loop") });
        self.worker = Some((trigger, task, worker));
    }

    fn stop_worker(&mut self) {
        if let Some((trigger, task, _)) = self.worker.take() {
            trigger.trigger();
            self.rt.block_on(task).unwrap();
        }
    }

    /// The worker's engine calls so far (one per pose, one per emoji batch).
    fn engine_calls(&self) -> u64 {
        let text = self.worker.as_ref().expect("a worker").2.render_metrics();
        text.lines()
            .find_map(|l| l.strip_prefix("popcon_engine_calls_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("engine calls in the metrics")
    }

    /// Starts the `api` binary; with `failpoint`, it kills itself there.
    fn api(&self, failpoint: Option<&str>) -> ApiProc {
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_popcon-worker"));
        cmd.env("REDIS_URL", self.redis.url())
            .env("DATABASE_URL", db_url(self.dir.path()))
            .env("POPCON_RESULTS", self.dir.path().join("results"))
            .env("POPCON_URL_SECRET", SECRET)
            .env("POPCON_PRICES", PRICES)
            .env("POPCON_CLAIM_TTL", CLAIM_TTL)
            .env(
                "RUST_LOG",
                std::env::var("FAULTS_API_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove(popcon_worker::failpoint::ENV)
            .args(["api", "--listen", &format!("127.0.0.1:{port}")]);
        if let Some(f) = failpoint {
            cmd.env(popcon_worker::failpoint::ENV, f);
        }
        let child = cmd.spawn().expect("the api binary starts");
        let api = ApiProc {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent().get(&format!("{}/readyz", api.base)).call().is_err() {
            assert!(Instant::now() < deadline, "the api never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        api
    }

    fn post(&self, api: &ApiProc, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        let req = agent()
            .post(&format!("{}{path}", api.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let r = match body {
            Some(b) => req.set("Idempotency-Key", "set-1").send_json(b),
            None => req.call(),
        };
        let r = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(e.to_string()),
        };
        let status = r.status();
        let text = r.into_string().unwrap_or_default();
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    /// A generate-set that must succeed; its job id.
    fn new_set(&self, api: &ApiProc, expressions: &Value) -> String {
        let (status, body) = self
            .post(
                api,
                "/api/generate-set",
                Some(json!({"subject": "a red fox", "expressions": expressions, "seed": 7})),
            )
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Sends one click to an api armed with `failpoint` and checks that it died by SIGKILL
    /// without answering.
    fn click_and_die(&self, failpoint: &str, path: &str, body: Option<Value>) {
        let mut api = self.api(Some(failpoint));
        let r = self.post(&api, path, body);
        assert!(
            r.is_err(),
            "{failpoint}: the api answered {r:?} instead of dying"
        );
        let status = api.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{failpoint}: {status:?}");
    }

    fn job(&self, id: &str) -> JobRecord {
        self.rt.block_on(self.store.get_job(id)).unwrap().unwrap()
    }

    fn jobs(&self) -> Vec<JobRecord> {
        self.rt
            .block_on(self.store.list_jobs(Some("alice"), 100, 0))
            .unwrap()
    }

    fn wait_job(&self, id: &str, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
        let deadline = Instant::now() + BOUND;
        loop {
            let rec = self.job(id);
            if done(&rec) {
                return rec;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {BOUND:?}: {rec:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ledger entries of alice as (delta, idem_key), oldest first (the grant included).
    fn ledger(&self) -> Vec<(i64, String)> {
        self.rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&db_url(self.dir.path()))
                .await
                .unwrap();
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT delta, idem_key FROM credit_ledger WHERE user_id = 'alice' ORDER BY id",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            pool.close().await;
            rows
        })
    }

    /// The net credits taken for one action on one job (charges minus refunds).
    fn spent_on(&self, job: &str, action: &str) -> i64 {
        -self
            .ledger()
            .iter()
            .filter(|(_, k)| k.contains(&format!("{job}:{action}:")))
            .map(|(d, _)| d)
            .sum::<i64>()
    }

    fn charges_on(&self, job: &str, action: &str) -> usize {
        self.ledger()
            .iter()
            .filter(|(d, k)| *d < 0 && k.contains(&format!("{job}:{action}:")))
            .count()
    }

    fn outbox_len(&self) -> i64 {
        self.rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&db_url(self.dir.path()))
                .await
                .unwrap();
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM dispatch_outbox")
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        })
    }

    /// Sets a finished row failed, as a worker's failure would leave it (so retry applies).
    fn fail_row(&self, job: &str, idx: u32) {
        self.rt.block_on(async {
            let pool = sqlx::SqlitePool::connect(&db_url(self.dir.path()))
                .await
                .unwrap();
            let n = sqlx::query(
                "UPDATE emoji_results SET status = 'failed', error = 'the GPU said no' \
                 WHERE job_id = ? AND idx = ?",
            )
            .bind(job)
            .bind(i64::from(idx))
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
            assert_eq!(n, 1);
            pool.close().await;
        });
    }

    /// Clicks until the answer is `queued` (the claim of a killed request expires after
    /// [`CLAIM_TTL`]), within the bound; returns the body.
    fn click_until_queued(&self, api: &ApiProc, path: &str) -> Value {
        let deadline = Instant::now() + BOUND;
        loop {
            let (status, body) = self.post(api, path, None).expect("the api answers");
            assert_eq!(status, 200, "{path}: {body}");
            match body["status"].as_str() {
                Some("queued") => return body,
                Some("duplicate") => {}
                _ => panic!("{path}: {body}"),
            }
            assert!(
                Instant::now() < deadline,
                "{path} never went through: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn settled(r: &JobRecord) -> bool {
    r.emoji.iter().all(|e| e.status.is_settled())
}

/// The api dies after committing the charge, the pre-flip and the outbox entry (`before_publish`:
/// nothing on the stream) or after the `XADD` (`after_publish`: the outbox entry not marked, so
/// the relay publishes it a second time). Either way every action runs exactly once, is charged
/// once, and the next click on the same emoji works.
fn each_action_survives_a_kill_at(failpoint: &str) {
    let mut env = Env::new();
    env.start_worker();

    // generate-set: the reply is lost with the process; the job runs anyway.
    env.click_and_die(
        failpoint,
        "/api/generate-set",
        Some(json!({"subject": "a red fox", "expressions": ["happy", "sad"], "seed": 7})),
    );
    let jobs = env.jobs();
    assert_eq!(jobs.len(), 1, "one job: {jobs:#?}");
    let job = jobs[0].id.clone();
    let rec = env.wait_job(&job, "the set to finish", settled);
    assert!(
        rec.emoji.iter().all(|e| e.status == EmojiStatus::Done),
        "{rec:#?}"
    );
    assert_eq!(
        env.spent_on(&job, "generate_set"),
        2,
        "charged once, 1 per emoji"
    );
    assert_eq!(
        env.engine_calls(),
        2,
        "one pose and one batch: the set ran once"
    );
    // The client's retry of the lost request (same Idempotency-Key) finds the job.
    let api = env.api(None);
    let (status, body) = env
        .post(
            &api,
            "/api/generate-set",
            Some(json!({"subject": "a red fox", "expressions": ["happy", "sad"], "seed": 7})),
        )
        .unwrap();
    assert_eq!(
        (status, body["id"].as_str()),
        (200, Some(job.as_str())),
        "{body}"
    );
    assert_eq!(env.spent_on(&job, "generate_set"), 2);

    // regenerate emoji 0.
    env.click_and_die(failpoint, &format!("/api/regenerate/{job}?idx=0"), None);
    let rec = env.wait_job(&job, "the regenerate", |r| {
        r.emoji[0].fence == 2 && r.emoji[0].status == EmojiStatus::Done
    });
    assert_eq!(rec.emoji[0].attempts, 1, "{rec:#?}");
    assert_eq!(env.charges_on(&job, "regenerate"), 1);
    assert_eq!(env.spent_on(&job, "regenerate"), 3);
    assert_eq!(env.engine_calls(), 3, "one batch more: it ran once");
    // The next click on the same emoji works once the dead request's claim expired.
    env.click_until_queued(&api, &format!("/api/regenerate/{job}?idx=0"));
    env.wait_job(&job, "the second regenerate", |r| {
        r.emoji[0].fence == 3 && r.emoji[0].status == EmojiStatus::Done
    });
    assert_eq!(env.spent_on(&job, "regenerate"), 6);
    assert_eq!(env.engine_calls(), 4);

    // retry emoji 1 after a failure.
    env.fail_row(&job, 1);
    env.click_and_die(failpoint, &format!("/api/retry/{job}?idx=1"), None);
    env.wait_job(&job, "the retry", |r| {
        r.emoji[1].fence == 2 && r.emoji[1].status == EmojiStatus::Done
    });
    assert_eq!(env.charges_on(&job, "retry"), 1);
    assert_eq!(env.spent_on(&job, "retry"), 2);
    assert_eq!(env.engine_calls(), 5);

    // approve emoji 0, then approve-all takes emoji 1.
    env.click_and_die(failpoint, &format!("/api/approve/{job}?idx=0"), None);
    env.wait_job(&job, "the approve", |r| {
        r.emoji[0].status == EmojiStatus::Approved
    });
    assert_eq!(env.charges_on(&job, "approve"), 1);
    env.click_and_die(failpoint, &format!("/api/approve-all/{job}"), None);
    env.wait_job(&job, "approve-all", |r| {
        r.emoji.iter().all(|e| e.status == EmojiStatus::Approved)
    });
    assert_eq!(env.charges_on(&job, "approve_all"), 1, "emoji 1 only");
    assert_eq!(env.spent_on(&job, "approve_all"), 5);
    assert_eq!(
        env.engine_calls(),
        7,
        "each approval animated once: one clip for emoji 0, one batch for emoji 1"
    );

    // Nothing is left for the relay or the reconciler.
    let deadline = Instant::now() + BOUND;
    while env.outbox_len() > 0 {
        assert!(Instant::now() < deadline, "the outbox never drained");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(api);
    env.stop_worker();
}

#[test]
fn killed_after_commit_before_publish_every_action_runs_once_charged_once() {
    each_action_survives_a_kill_at("dispatch.before_publish");
}

#[test]
fn killed_after_publish_before_marking_every_action_runs_once_charged_once() {
    each_action_survives_a_kill_at("dispatch.after_publish");
}

/// The api dies inside the transaction (charge, pre-flip and outbox entry written, not
/// committed): nothing is charged, nothing changes, and the next click works.
#[test]
fn killed_before_commit_nothing_is_charged_or_changed() {
    let mut env = Env::new();
    let before = env.ledger();
    env.click_and_die(
        "dispatch.before_commit",
        "/api/generate-set",
        Some(json!({"subject": "a red fox", "expressions": ["happy", "sad"], "seed": 7})),
    );
    assert!(env.jobs().is_empty(), "no job was created");
    assert_eq!(env.ledger(), before, "nothing charged");

    env.start_worker();
    let api = env.api(None);
    let job = env.new_set(&api, &json!(["happy", "sad"]));
    env.wait_job(&job, "the set", settled);
    env.fail_row(&job, 1);
    let calls = env.engine_calls();
    for (path, action) in [
        (format!("/api/retry/{job}?idx=1"), "retry"),
        (format!("/api/regenerate/{job}?idx=0"), "regenerate"),
        (format!("/api/approve/{job}?idx=0"), "approve"),
        (format!("/api/approve-all/{job}"), "approve_all"),
    ] {
        let rows = env.job(&job).emoji;
        env.click_and_die("dispatch.before_commit", &path, None);
        assert_eq!(
            env.job(&job).emoji,
            rows,
            "{action}: the rows are untouched"
        );
        assert_eq!(env.charges_on(&job, action), 0, "{action}: nothing charged");
    }
    // The next click of each works (after the dead requests' claims expired), once.
    env.click_until_queued(&api, &format!("/api/retry/{job}?idx=1"));
    env.wait_job(&job, "the retry", |r| {
        r.emoji[1].fence == 2 && r.emoji[1].status == EmojiStatus::Done
    });
    assert_eq!(env.charges_on(&job, "retry"), 1);
    assert_eq!(env.engine_calls(), calls + 1);
    env.stop_worker();
}

/// Redis comes back empty (a restart without persistence, a failover to an empty replica,
/// FLUSHALL) while a charged job waits in the stream: the reconciler re-enqueues it from the
/// database and it runs once, charged once.
#[test]
fn redis_restarted_empty_queued_jobs_are_reenqueued_from_the_database() {
    let mut env = Env::new();
    let api = env.api(None);
    let job = env.new_set(&api, &json!(["happy"]));
    // No worker yet: the entry sits in the stream. Then Redis loses everything.
    env.redis.stop();
    env.redis.restart();
    env.start_worker();
    let rec = env.wait_job(&job, "the re-enqueued set", settled);
    assert_eq!(rec.emoji[0].status, EmojiStatus::Done, "{rec:#?}");
    assert_eq!(env.spent_on(&job, "generate_set"), 1);
    assert_eq!(env.engine_calls(), 2, "it ran once");
    let text = env.worker.as_ref().unwrap().2.render_metrics();
    assert!(
        text.contains("popcon_jobs_reconciled_total 1"),
        "counted: {text}"
    );
    // The next click works against the new Redis (the api reconnects).
    let body = env.click_until_queued(&api, &format!("/api/regenerate/{job}?idx=0"));
    assert_eq!(body["fence"], 2, "{body}");
    env.wait_job(&job, "the regenerate", |r| {
        r.emoji[0].fence == 2 && r.emoji[0].status == EmojiStatus::Done
    });
    env.stop_worker();
}

/// Redis stops answering for longer than the api's response timeout (`CLIENT PAUSE`): the
/// click fails cleanly or goes through, and either way the charge matches the work — one
/// charge and one run, or a refund and no run — and the next click works.
#[test]
fn redis_paused_mid_dispatch_charge_matches_the_work() {
    let mut env = Env::new();
    env.start_worker();
    let api = env.api(None);
    let job = env.new_set(&api, &json!(["happy"]));
    env.wait_job(&job, "the set", settled);
    let calls = env.engine_calls();

    let mut admin = redis::Client::open(env.redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(4000)
        .arg("ALL")
        .query(&mut admin)
        .unwrap();
    let (status, body) = env
        .post(&api, &format!("/api/regenerate/{job}?idx=0"), None)
        .expect("the api answers");
    let rec = env.wait_job(&job, "the row to settle after the pause", |r| {
        r.emoji[0].status.is_settled()
    });
    if status == 200 && body["status"] == "queued" {
        assert_eq!(rec.emoji[0].status, EmojiStatus::Done);
        assert_eq!(env.spent_on(&job, "regenerate"), 3, "charged once");
        assert_eq!(env.engine_calls(), calls + 1, "ran once");
    } else {
        assert!(status >= 500 || status == 200, "{status} {body}");
        assert_eq!(env.spent_on(&job, "regenerate"), 0, "refunded: {body}");
        // Whatever the paused Redis executed late is stale (the rollback moved the fence).
        std::thread::sleep(Duration::from_secs(5));
        assert_eq!(
            env.engine_calls(),
            calls,
            "no GPU work for a refunded click"
        );
    }
    let body = env.click_until_queued(&api, &format!("/api/regenerate/{job}?idx=0"));
    let fence = body["fence"].as_u64().unwrap();
    env.wait_job(&job, "the next regenerate", |r| {
        r.emoji[0].fence == fence && r.emoji[0].status == EmojiStatus::Done
    });
    env.stop_worker();
}

/// A worker paused (SIGSTOP) past its lease while another worker takes the job over and
/// finishes it: once resumed it finds the rows moved on and stops before writing anything —
/// no second upload of the images, no second result write.
#[test]
fn a_worker_paused_past_its_lease_stops_without_writing() {
    let mut env = Env::new();
    let api = env.api(None);
    let job = env.new_set(&api, &json!(["happy"]));

    // Worker A, its own process, slow enough to be caught mid-render.
    let log = env.dir.path().join("worker-a.log");
    let a = std::process::Command::new(env!("CARGO_BIN_EXE_popcon-worker"))
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", db_url(env.dir.path()))
        .env("POPCON_RESULTS", env.dir.path().join("results"))
        .env("POPCON_URL_SECRET", SECRET)
        .env("RUST_LOG", "popcon_worker=info")
        .args([
            "run",
            "--model",
            "tiny",
            "--steps",
            "1000",
            "--lease",
            "1s",
            "--consumer",
            "wa",
        ])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed on drop, also when an assertion fails.
    let a = ApiProc {
        child: a,
        base: String::new(),
    };
    env.wait_job(&job, "worker A to start the set", |r| {
        r.emoji[0].status == EmojiStatus::Running
    });
    let pid = a.child.id().to_string();
    signal(&pid, "STOP");

    // Worker B reclaims the idle entry once A's lease ran out, and finishes the set.
    env.start_worker();
    let done = env.wait_job(&job, "worker B to finish", settled);
    assert_eq!(done.emoji[0].status, EmojiStatus::Done, "{done:#?}");
    let files = result_files(env.dir.path());
    assert!(!files.is_empty(), "B wrote its images");

    signal(&pid, "CONT");
    let deadline = Instant::now() + BOUND;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("stopping without writing") || text.contains("rows moved on") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker A never noticed that the job moved on:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Give A the time it would need to upload, then compare.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        result_files(env.dir.path()),
        files,
        "A rewrote result files"
    );
    assert_eq!(env.job(&job).emoji, done.emoji, "A changed the rows");
    drop(a);
    env.stop_worker();
}

fn signal(pid: &str, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Every file under the results folder with its length and modification time.
fn result_files(dir: &Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    fn walk(p: &Path, out: &mut Vec<(std::path::PathBuf, u64, std::time::SystemTime)>) {
        let Ok(rd) = std::fs::read_dir(p) else { return };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                walk(&path, out);
            } else {
                out.push((path, m.len(), m.modified().unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("results"), &mut out);
    out.sort();
    out
}
