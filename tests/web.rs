//! The web app in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven
//! over WebDriver with fantoccini), against the real API router, a real `redis-server`, a
//! SQLite file and, where a test needs one, the real worker with the tiny model.
//!
//! A test hook wraps the API: it counts every request at the server (method and path) and can
//! hold the responses of chosen routes, so a test sees what the page shows *before* the
//! network answers: the optimistic status, the cached balance, the skeleton.
//!
//! `chromedriver` must be on `PATH` (or `CHROMEDRIVER`), Chromium at `/usr/bin/chromium` (or
//! `CHROMIUM`); a missing one fails the test with the command that installs it.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use common::redis_server::RedisServer;
use common::worker_config::{db_url, queue_config};
use fantoccini::{Client, ClientBuilder, Locator};
use popcon_worker::blobs::{Blobs, BlobsConfig};
use popcon_worker::enqueue::{EnqueueConfig, Enqueuer};
use popcon_worker::http::api::{ApiConfig, ApiState};
use popcon_worker::http::events::EventsConfig;
use popcon_worker::queue::Queue;
use popcon_worker::store::Store;
use popcon_worker::worker::{ShutdownTrigger, Worker, shutdown_channel};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const SECRET: &str = "web-test-secret-0123456789";
/// Everything a test waits for must happen within this.
const PATIENCE: Duration = Duration::from_secs(60);

// ---- the server-side hook --------------------------------------------------------------------

/// Counts requests and holds chosen responses.
#[derive(Default)]
struct Hook {
    seen: Mutex<Vec<String>>,
    holds: Mutex<Vec<(String, Arc<Semaphore>)>>,
    /// Requests starting with these are answered 503 without reaching the API.
    refused: Mutex<Vec<String>>,
}

impl Hook {
    /// Requests seen whose `METHOD /path` starts with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.starts_with(prefix))
            .count()
    }

    /// From now on, responses to requests starting with `prefix` wait until [`Hook::release`].
    fn hold(&self, prefix: &str) {
        self.holds
            .lock()
            .unwrap()
            .push((prefix.to_string(), Arc::new(Semaphore::new(0))));
    }

    /// From now on, requests starting with `prefix` get a 503 (a proxy that drops a route).
    fn refuse(&self, prefix: &str) {
        self.refused.lock().unwrap().push(prefix.to_string());
    }

    /// Lets every held response with `prefix` go, and stops holding new ones.
    fn release(&self, prefix: &str) {
        self.holds.lock().unwrap().retain(|(p, s)| {
            if p == prefix {
                // A closed semaphore fails every waiting and future acquire: all go at once.
                s.close();
                false
            } else {
                true
            }
        });
    }
}

async fn hook_layer(State(hook): State<Arc<Hook>>, req: Request, next: Next) -> Response {
    let key = format!("{} {}", req.method(), req.uri().path());
    hook.seen.lock().unwrap().push(key.clone());
    if hook
        .refused
        .lock()
        .unwrap()
        .iter()
        .any(|p| key.starts_with(p.as_str()))
    {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "refused by the test",
        )
            .into_response();
    }
    let held = hook
        .holds
        .lock()
        .unwrap()
        .iter()
        .find(|(p, _)| key.starts_with(p.as_str()))
        .map(|(_, s)| s.clone());
    // The request is served at once; only its answer waits, as on a slow network.
    let resp = next.run(req).await;
    if let Some(s) = held {
        let _ = s.acquire().await;
    }
    resp
}

// ---- the browser -----------------------------------------------------------------------------

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const INSTALL: &str = "install Debian's chromium and chromium-driver: \
                       apt-get install -y chromium chromium-driver (.ci/run does)";

/// A chromedriver on a free port and a headless Chromium session of `width`×900.
async fn browser(width: u32) -> (Driver, Client) {
    let port = free_port();
    let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
    let child = Command::new(&bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{bin}` ({e}): {INSTALL}"));
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: {INSTALL}"
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", format!("--window-size={width},900"),
            ],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| panic!("no Chromium session ({e}): {INSTALL}"));
    (driver, client)
}

/// Runs `script` (a function body) in the page.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Waits until `expr` is truthy in the page.
async fn wait_for(c: &Client, expr: &str, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = js(c, &format!("return !!({expr});")).await;
        if v == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let html = js(c, "return document.body.outerHTML;").await;
            panic!("timed out waiting for {what} ({expr}); the page:\n{html}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .attr(name)
        .await
        .unwrap()
}

async fn rect(c: &Client, css: &str) -> (f64, f64, f64, f64) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .rectangle()
        .await
        .unwrap()
}

// ---- the system under test -------------------------------------------------------------------

struct Env {
    redis: RedisServer,
    dir: tempfile::TempDir,
    base: String,
    store: Store,
    blobs: Blobs,
    blobs_cfg: BlobsConfig,
    hook: Arc<Hook>,
    _stop: ShutdownTrigger,
    worker: Option<ShutdownTrigger>,
}

impl Env {
    async fn start() -> Env {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let blobs_cfg = BlobsConfig {
            url_secret: Some(SECRET.into()),
            ..BlobsConfig::at(dir.path().join("results"))
        };
        let store = Store::connect(&db_url(dir.path())).await.unwrap();
        let queue = Queue::connect(queue_config(&redis.url(), "web-test"))
            .await
            .unwrap();
        let blobs = Blobs::open(&blobs_cfg).unwrap();
        let enq = Enqueuer::new(
            store.clone(),
            queue,
            blobs.clone(),
            EnqueueConfig::default(),
        );
        let cfg = ApiConfig {
            events: EventsConfig {
                every: Duration::from_millis(50),
                ..EventsConfig::default()
            },
            ..ApiConfig::default()
        };
        let state = ApiState::new(enq, cfg).unwrap();
        let (stop, shutdown) = shutdown_channel();
        state.stop_streams_on(shutdown.clone());
        let hook = Arc::new(Hook::default());
        let app =
            popcon_worker::http::with_fallbacks(popcon_worker::http::api::routes(state)).layer(
                axum::middleware::from_fn_with_state(hook.clone(), hook_layer),
            );
        let (addr, _task) = popcon_worker::http::serve::serve_with_limits(
            "127.0.0.1:0".parse().unwrap(),
            app,
            shutdown,
            Default::default(),
        )
        .await
        .unwrap();
        Env {
            redis,
            dir,
            base: format!("http://{addr}"),
            store,
            blobs,
            blobs_cfg,
            hook,
            _stop: stop,
            worker: None,
        }
    }

    async fn start_worker(&mut self) {
        let cfg = popcon_worker::config::WorkerConfig {
            blobs: self.blobs_cfg.clone(),
            ..common::worker_config::worker_config(&self.redis.url(), self.dir.path(), "w1")
        };
        let worker = Arc::new(Worker::start(cfg).await.expect("worker starts"));
        let (trigger, shutdown) = shutdown_channel();
        tokio::spawn(async move { worker.run(shutdown).await.expect("worker loop") });
        self.worker = Some(trigger);
    }

    async fn user(&self, name: &str, credits: i64) -> String {
        popcon_worker::auth::add_user(&self.store, name, false, credits)
            .await
            .unwrap()
            .1
    }

    async fn balance(&self, user: &str) -> i64 {
        self.store.balance(user).await.unwrap()
    }

    /// Creates a set over HTTP (as another tab would), returning its id.
    async fn set(&self, token: &str, expressions: &[&str]) -> String {
        let url = format!("{}/api/generate-set", self.base);
        let auth = format!("Bearer {token}");
        let body = json!({"subject": "a red fox", "expressions": expressions, "seed": 7});
        let v: Value = tokio::task::spawn_blocking(move || {
            ureq::post(&url)
                .set("Authorization", &auth)
                .send_json(body)
                .expect("generate-set")
                .into_json()
                .expect("json")
        })
        .await
        .unwrap();
        v["id"].as_str().expect("an id").to_string()
    }

    /// What a worker would do: settle emoji `idx` done with a real PNG (the thumbnail columns
    /// set from emoji 0 unless `thumbnail_path` overrides the path).
    async fn finish(&self, job: &str, idx: u32, thumbnail_path: Option<&str>) {
        common::rows::finish(&self.store, &self.blobs, job, idx, 64, thumbnail_path).await;
    }

    async fn fail(&self, job: &str, idx: u32) {
        common::rows::fail(&self.store, job, idx, "the test failed it").await;
    }
}

/// Opens the app and signs in with `token` through the form; waits for the balance.
async fn sign_in(c: &Client, env: &Env, token: &str) {
    if !c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .starts_with(&env.base)
    {
        c.goto(&format!("{}/", env.base)).await.unwrap();
    }
    wait_for(
        c,
        "document.querySelector('#token') && !document.querySelector('#token').closest('[hidden]')",
        "the sign-in form",
    )
    .await;
    let input = c.find(Locator::Css("#token")).await.unwrap();
    input.send_keys(token).await.unwrap();
    c.find(Locator::Css("#signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        c,
        "document.querySelector('#credits').dataset.state === 'value'",
        "the balance after sign-in",
    )
    .await;
    // Signed in: the form is gone from the screen, sign-out is there.
    assert!(
        !displayed(c, "#signin-form").await,
        "the sign-in form is still shown"
    );
    assert!(displayed(c, "#signout").await, "no sign-out button");
}

async fn displayed(c: &Client, css: &str) -> bool {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .is_displayed()
        .await
        .unwrap()
}

fn cell(idx: u32) -> String {
    format!("li.emoji[data-idx='{idx}']")
}

async fn cell_status(c: &Client, idx: u32) -> String {
    attr(c, &cell(idx), "data-status").await.unwrap_or_default()
}

/// A real double click (two WebDriver clicks) and then three synchronous script clicks on the
/// same button: the gestures a user's double and triple click produce.
async fn hammer(c: &Client, css: &str) {
    let b = c.find(Locator::Css(css)).await.unwrap();
    b.click().await.unwrap();
    let _ = b.click().await;
    js(
        c,
        &format!(
            "const b = document.querySelector({css:?}); if (b) {{ b.click(); b.click(); b.click(); }} return true;"
        ),
    )
    .await;
}

// ---- the tests -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_set_generated_in_the_page_reaches_done_through_the_event_stream() {
    let mut env = Env::start().await;
    env.start_worker().await;
    let token = env.user("alice", 10).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    assert_eq!(
        attr(&c, "#credits", "data-balance").await.as_deref(),
        Some("10")
    );

    c.goto(&format!("{}/#/new", env.base)).await.unwrap();
    wait_for(&c, "document.querySelector('#gen-form')", "the form").await;
    // Record what the job page shows as it changes: the live mode and the emoji statuses.
    js(
        &c,
        "window.__seen = [];
         new MutationObserver((ms) => { for (const m of ms) {
             const t = m.target; if (t.nodeType !== 1) continue;
             if (m.attributeName === 'data-live') window.__seen.push('live:' + t.dataset.live);
             if (m.attributeName === 'data-status' && t.matches('li.emoji')) window.__seen.push('emoji:' + t.dataset.status);
             if (m.attributeName === 'value' && t.matches('li.emoji progress')) window.__seen.push('progress');
         } }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ['data-live', 'data-status', 'value']});
         return true;",
    )
    .await;
    c.find(Locator::Css("#subject"))
        .await
        .unwrap()
        .send_keys("a red fox")
        .await
        .unwrap();
    c.find(Locator::Css("#expressions"))
        .await
        .unwrap()
        .send_keys("happy, sad")
        .await
        .unwrap();
    c.find(Locator::Css("#gen-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, "location.hash.startsWith('#/job/')", "the job page").await;
    wait_for(
        &c,
        "document.querySelector('#job') && document.querySelector('#job').dataset.status === 'done'",
        "the job to reach done on the page",
    )
    .await;
    let job = attr(&c, "#job", "data-job").await.expect("the job id");
    for idx in 0..2 {
        assert_eq!(cell_status(&c, idx).await, "done");
        wait_for(
            &c,
            &format!("(() => {{ const i = document.querySelector(\"{} img.emoji-img\"); return i && i.complete && i.naturalWidth > 0; }})()", cell(idx)),
            "the emoji image",
        )
        .await;
    }
    let seen = js(&c, "return window.__seen;").await;
    let seen: Vec<String> = serde_json::from_value(seen).unwrap();
    assert!(
        seen.iter().any(|s| s == "live:sse"),
        "the page never used the event stream: {seen:?}"
    );
    assert!(
        env.hook.count(&format!("GET /api/job/{job}/events")) >= 1,
        "no events request reached the server"
    );
    // It was the stream, not polling, that carried the job to done: a poll fallback would
    // GET the job every 2 s.
    assert!(
        env.hook.count(&format!("GET /api/job/{job}"))
            - env.hook.count(&format!("GET /api/job/{job}/"))
            <= 1,
        "the page polled: {:?}",
        env.hook.seen.lock().unwrap()
    );
    // The set was charged once, and the pill says so.
    assert_eq!(env.balance("alice").await, 8);
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.balance === '8'",
        "the pill after the charge",
    )
    .await;
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn double_clicks_on_every_action_reach_the_server_once_and_show_before_the_answer() {
    let env = Env::start().await;
    let token = env.user("alice", 20).await;
    let job = env.set(&token, &["happy", "sad", "angry", "sleepy"]).await;
    env.fail(&job, 0).await;
    for idx in 1..4 {
        env.finish(&job, idx, None).await;
    }
    // Phone width: the page must stay usable there.
    let (_driver, c) = browser(390).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        &format!("document.querySelector(\"{}\") && document.querySelector(\"{}\").dataset.status === 'done'", cell(3), cell(3)),
        "the job page",
    )
    .await;
    assert_eq!(cell_status(&c, 0).await, "failed");
    let overflow = js(
        &c,
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
    )
    .await;
    assert!(
        overflow.as_f64().unwrap_or(1.0) <= 0.0,
        "horizontal scroll at 390 px: {overflow}"
    );

    env.hook.hold("POST /api/");
    for (idx, action, shown) in [
        (0, "retry", "pending"),
        (1, "regenerate", "pending"),
        (2, "approve", "approved"),
    ] {
        let route = format!("POST /api/{action}/{job}");
        hammer(&c, &format!("{} button[data-action='{action}']", cell(idx))).await;
        // The optimistic status is on screen while the answer is still held at the server.
        wait_for(
            &c,
            &format!(
                "document.querySelector(\"{}\").dataset.status === '{shown}'",
                cell(idx)
            ),
            &format!("the optimistic {action}"),
        )
        .await;
        assert_eq!(
            env.hook.count(&route),
            1,
            "{action}: requests at the server"
        );
    }
    hammer(&c, "#approve-all").await;
    wait_for(
        &c,
        &format!(
            "document.querySelector(\"{}\").dataset.status === 'approved'",
            cell(3)
        ),
        "the optimistic approve-all",
    )
    .await;
    assert_eq!(env.hook.count(&format!("POST /api/approve-all/{job}")), 1);

    // The answers arrive: the statuses stay, and no click was sent late.
    env.hook.release("POST /api/");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (idx, want) in [
        (0, "pending"),
        (1, "pending"),
        (2, "approved"),
        (3, "approved"),
    ] {
        assert_eq!(cell_status(&c, idx).await, want, "emoji {idx}");
    }
    for action in ["retry", "regenerate", "approve", "approve-all"] {
        assert_eq!(
            env.hook.count(&format!("POST /api/{action}/{job}")),
            1,
            "{action} after the answers"
        );
    }
    // Charged once per request: retry 1, regenerate 1, approve 1, and approve-all 1 per row
    // still done when its pre-flip ran: emoji 3, and emoji 2 too when the approve-all's
    // answer was released before the approve's (both clicks were the user's).
    let balance = env.balance("alice").await;
    assert!(
        [20 - 4 - 2 - 2, 20 - 4 - 2 - 3].contains(&balance),
        "balance {balance}"
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_action_is_rolled_back_with_the_reason() {
    let env = Env::start().await;
    // Two credits buy the set of two; regenerate (1 credit) is then refused with 402.
    let token = env.user("alice", 2).await;
    let job = env.set(&token, &["happy", "sad"]).await;
    env.finish(&job, 0, None).await;
    env.finish(&job, 1, None).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        &format!("document.querySelector(\"{}\") && document.querySelector(\"{}\").dataset.status === 'done'", cell(0), cell(0)),
        "the job page",
    )
    .await;
    env.hook.hold("POST /api/regenerate");
    hammer(&c, &format!("{} button[data-action='regenerate']", cell(0))).await;
    wait_for(
        &c,
        &format!(
            "document.querySelector(\"{}\").dataset.status === 'pending'",
            cell(0)
        ),
        "the optimistic regenerate",
    )
    .await;
    env.hook.release("POST /api/regenerate");
    wait_for(
        &c,
        &format!(
            "document.querySelector(\"{}\").dataset.status === 'done'",
            cell(0)
        ),
        "the roll-back",
    )
    .await;
    let alert = c
        .find(Locator::Css("#job-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(alert.contains("credits"), "the reason is shown: {alert:?}");
    assert_eq!(env.hook.count(&format!("POST /api/regenerate/{job}")), 1);
    assert_eq!(env.balance("alice").await, 0);
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_credits_pill_shows_the_cache_at_once_a_same_size_skeleton_first_and_forgets_on_sign_out()
 {
    let env = Env::start().await;
    let alice = env.user("alice", 37).await;
    let bob = env.user("bob", 5).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &alice).await;
    assert_eq!(
        attr(&c, "#credits", "data-balance").await.as_deref(),
        Some("37")
    );
    let value_box = rect(&c, "#credits").await;
    let button_box = rect(&c, "#signout").await;

    // A first visit (no cached balance) while the balance is slow: a skeleton of the same
    // size, and the button beside it does not move when the number arrives.
    js(
        &c,
        "localStorage.removeItem('popcon.credits'); return true;",
    )
    .await;
    env.hook.hold("GET /api/credits");
    c.refresh().await.unwrap();
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'skeleton'",
        "the skeleton",
    )
    .await;
    assert_eq!(rect(&c, "#credits").await, value_box, "the skeleton's box");
    assert_eq!(
        rect(&c, "#signout").await,
        button_box,
        "the button during the skeleton"
    );
    env.hook.release("GET /api/credits");
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'value'",
        "the balance",
    )
    .await;
    assert_eq!(
        rect(&c, "#signout").await,
        button_box,
        "the button after the balance"
    );

    // The next visit shows the cached balance before the network answers.
    env.hook.hold("GET /api/credits");
    let before = env.hook.count("GET /api/credits");
    c.refresh().await.unwrap();
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'cached'",
        "the cached balance",
    )
    .await;
    assert_eq!(
        attr(&c, "#credits", "data-balance").await.as_deref(),
        Some("37")
    );
    // Still no answer: the request for the fresh balance is held at the server.
    assert!(
        env.hook.count("GET /api/credits") > before,
        "the fresh balance was asked for"
    );
    env.hook.release("GET /api/credits");
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'value'",
        "the fresh balance",
    )
    .await;

    // Sign out: the cache goes with the user; the next user never sees 37.
    c.find(Locator::Css("#signout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, "!localStorage.getItem('popcon.token')", "the sign-out").await;
    assert!(
        displayed(&c, "#signin-form").await,
        "no sign-in form after sign-out"
    );
    assert!(!displayed(&c, "#signout").await, "sign-out still shown");
    assert_eq!(
        js(&c, "return localStorage.getItem('popcon.credits');").await,
        Value::Null
    );
    js(
        &c,
        "window.__balances = [];
         const p = document.querySelector('#credits');
         new MutationObserver(() => window.__balances.push(p.dataset.balance || '')).observe(p, {attributes: true, childList: true, characterData: true, subtree: true});
         return true;",
    )
    .await;
    env.hook.hold("GET /api/credits");
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(&bob)
        .await
        .unwrap();
    c.find(Locator::Css("#signin"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.hook.release("GET /api/credits");
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.balance === '5'",
        "bob's balance",
    )
    .await;
    let balances: Vec<String> =
        serde_json::from_value(js(&c, "return window.__balances || [];").await).unwrap();
    assert!(
        !balances.iter().any(|b| b == "37"),
        "the previous user's balance was shown: {balances:?}"
    );
    assert!(balances.iter().any(|b| b == "5"), "{balances:?}");
    // A reload as bob, his answer held: his own cached balance at once, never alice's.
    env.hook.hold("GET /api/credits");
    c.refresh().await.unwrap();
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'cached'",
        "bob's cached balance after a reload",
    )
    .await;
    assert_eq!(
        attr(&c, "#credits", "data-balance").await.as_deref(),
        Some("5")
    );
    env.hook.release("GET /api/credits");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn archive_cards_show_a_placeholder_never_a_broken_image() {
    let env = Env::start().await;
    let token = env.user("alice", 20).await;
    // No thumbnail columns at all (nothing finished yet).
    let empty = env.set(&token, &["happy"]).await;
    // A thumbnail path that points at nothing (a deleted file, a CDN miss).
    let broken = env.set(&token, &["sad"]).await;
    env.finish(&broken, 0, Some("/files/thumbs/gone.png")).await;
    // A good one.
    let good = env.set(&token, &["angry"]).await;
    env.finish(&good, 0, None).await;

    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/", env.base)).await.unwrap();
    wait_for(
        &c,
        "document.querySelectorAll('#archive .card').length === 3",
        "three cards",
    )
    .await;
    // Newest first.
    let order: Vec<String> = serde_json::from_value(
        js(
            &c,
            "return [...document.querySelectorAll('#archive .card')].map(c => c.dataset.job);",
        )
        .await,
    )
    .unwrap();
    assert_eq!(order, [good.clone(), broken.clone(), empty.clone()]);
    wait_for(
        &c,
        "[...document.querySelectorAll('#archive img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
        "every thumbnail to show an image",
    )
    .await;
    for (job, placeholder) in [(&empty, true), (&broken, true), (&good, false)] {
        let src = attr(&c, &format!(".card[data-job='{job}'] img.thumb"), "src")
            .await
            .unwrap_or_default();
        assert_eq!(
            src.contains("placeholder"),
            placeholder,
            "card {job}: {src}"
        );
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_event_stream_the_job_page_polls_until_done() {
    let mut env = Env::start().await;
    let token = env.user("alice", 10).await;
    let job = env.set(&token, &["happy", "sad"]).await;
    // Only the events route is refused (a proxy that does not pass streams); the JSON job
    // route still answers.
    env.hook.refuse(&format!("GET /api/job/{job}/events"));
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        "document.querySelector('#job') && document.querySelector('#job').dataset.live === 'poll'",
        "the polling fallback",
    )
    .await;
    env.start_worker().await;
    wait_for(
        &c,
        "document.querySelector('#job').dataset.status === 'done'",
        "the job to reach done by polling",
    )
    .await;
    for idx in 0..2 {
        assert_eq!(cell_status(&c, idx).await, "done");
    }
    assert!(env.hook.count(&format!("GET /api/job/{job}/events")) >= 1);
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_form_says_why_a_set_was_refused_and_keeps_what_was_typed() {
    let env = Env::start().await;
    // One credit; a set of three costs three.
    let token = env.user("alice", 1).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/new", env.base)).await.unwrap();
    wait_for(&c, "document.querySelector('#gen-form')", "the form").await;
    for (css, text) in [
        ("#subject", "a red fox"),
        ("#expressions", "happy, sad, angry"),
        ("#style", "watercolor"),
    ] {
        c.find(Locator::Css(css))
            .await
            .unwrap()
            .send_keys(text)
            .await
            .unwrap();
    }
    let submit = || async {
        c.find(Locator::Css("#gen-submit"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    };
    submit().await;
    wait_for(
        &c,
        "document.querySelector('#gen-error').textContent.length > 0",
        "the 402 sentence",
    )
    .await;
    let said = c
        .find(Locator::Css("#gen-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        said.contains("Not enough credits") && said.contains('3'),
        "{said:?}"
    );
    for (css, text) in [
        ("#subject", "a red fox"),
        ("#expressions", "happy, sad, angry"),
        ("#style", "watercolor"),
    ] {
        let v = c
            .find(Locator::Css(css))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap();
        assert_eq!(v.as_deref(), Some(text), "{css} kept");
    }
    assert_eq!(env.balance("alice").await, 1, "nothing charged");

    // Off-hours: 429, and the page says when it lifts.
    env.store
        .grant("alice", 10, "the test", "web-test-grant")
        .await
        .unwrap();
    let queue = Queue::connect(queue_config(&env.redis.url(), "web-admin"))
        .await
        .unwrap();
    queue
        .set_off_hours(Duration::from_secs(3600))
        .await
        .unwrap();
    submit().await;
    wait_for(
        &c,
        "document.querySelector('#gen-error').textContent.includes('off-hours')",
        "the 429 sentence",
    )
    .await;
    let said = c
        .find(Locator::Css("#gen-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(said.contains("Try again after"), "{said:?}");
    queue.clear_off_hours().await.unwrap();

    // A "photo" that is not an image: refused before anything is created, said as a sentence.
    let bogus = env.dir.path().join("not-a-photo.png");
    std::fs::write(&bogus, b"this is not an image").unwrap();
    c.find(Locator::Css("#photo"))
        .await
        .unwrap()
        .send_keys(&bogus.display().to_string())
        .await
        .unwrap();
    submit().await;
    wait_for(
        &c,
        "document.querySelector('#gen-error').textContent.includes('refused')",
        "the 400 sentence",
    )
    .await;
    let said = c
        .find(Locator::Css("#gen-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(said.to_lowercase().contains("image"), "{said:?}");
    assert_eq!(env.hook.count("POST /api/generate-set"), 3);
    assert_eq!(env.balance("alice").await, 11, "nothing charged");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_archive_pages_newest_first_and_the_zip_downloads_with_the_token() {
    let env = Env::start().await;
    let token = env.user("alice", 100).await;
    // 14 sets: a first page of 12 (the page's size), a second of 2.
    let mut jobs = Vec::new();
    for _ in 0..14 {
        jobs.push(env.set(&token, &["happy"]).await);
    }
    env.finish(&jobs[13], 0, None).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/", env.base)).await.unwrap();
    let cards = "[...document.querySelectorAll('#archive .card')].map(c => c.dataset.job)";
    wait_for(&c, &format!("{cards}.length === 12"), "the first page").await;
    let first: Vec<String> =
        serde_json::from_value(js(&c, &format!("return {cards};")).await).unwrap();
    let newest: Vec<String> = jobs.iter().rev().cloned().collect();
    assert_eq!(first, newest[..12]);
    c.find(Locator::Css("#next"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(&c, &format!("{cards}.length === 2"), "the second page").await;
    let second: Vec<String> =
        serde_json::from_value(js(&c, &format!("return {cards};")).await).unwrap();
    assert_eq!(second, newest[12..]);
    c.find(Locator::Css("#prev"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &c,
        &format!("{cards}.length === 12"),
        "the first page again",
    )
    .await;

    // The zip route needs the bearer header: the page fetches it with the token.
    let job = &jobs[13];
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        &format!("document.querySelector(\"{}\") && document.querySelector(\"{}\").dataset.status === 'done'", cell(0), cell(0)),
        "the job page",
    )
    .await;
    c.find(Locator::Css("#download"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while env.hook.count(&format!("GET /api/job/{job}/download")) == 0 {
        assert!(Instant::now() < deadline, "the zip was never asked for");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let said = c
        .find(Locator::Css("#job-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(said, "", "the download reported a failure");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_works_from_the_keyboard_and_every_control_has_a_name() {
    let env = Env::start().await;
    let token = env.user("alice", 20).await;
    let job = env.set(&token, &["happy", "sad"]).await;
    env.finish(&job, 0, None).await;
    env.finish(&job, 1, None).await;
    let (_driver, c) = browser(1280).await;
    c.goto(&format!("{}/", env.base)).await.unwrap();
    wait_for(&c, "document.querySelector('#token')", "the sign-in form").await;
    // Sign in with the keyboard: type the token, press Enter.
    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(&format!("{token}\u{E007}"))
        .await
        .unwrap();
    wait_for(
        &c,
        "document.querySelector('#credits').dataset.state === 'value'",
        "the balance after a keyboard sign-in",
    )
    .await;
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        &format!("document.querySelector(\"{}\") && document.querySelector(\"{}\").dataset.status === 'done'", cell(0), cell(0)),
        "the job page",
    )
    .await;
    // Every button, link and input has an accessible name (text, aria-label or a label).
    let unnamed = js(
        &c,
        "return [...document.querySelectorAll('button, a[href], input, select, textarea')]
            .filter(e => !e.closest('[hidden]'))
            .filter(e => !((e.getAttribute('aria-label') || '').trim() || (e.textContent || '').trim()
                || (e.id && document.querySelector(`label[for='${e.id}']`)) || e.closest('label')))
            .map(e => e.outerHTML);",
    )
    .await;
    assert_eq!(unnamed, json!([]), "controls without a name");
    // Tab from the top reaches emoji 1's regenerate button; Enter on it sends the action.
    js(&c, "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return true;").await;
    let target = format!("{} button[data-action='regenerate']", cell(1));
    let mut reached = false;
    for _ in 0..60 {
        c.active_element()
            .await
            .unwrap()
            .send_keys("\u{E004}")
            .await
            .unwrap();
        let here = js(
            &c,
            &format!("return document.activeElement === document.querySelector({target:?});"),
        )
        .await;
        if here == Value::Bool(true) {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached {target}");
    c.active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap();
    wait_for(
        &c,
        &format!(
            "document.querySelector(\"{}\").dataset.status === 'pending'",
            cell(1)
        ),
        "the regenerate sent with Enter",
    )
    .await;
    let deadline = Instant::now() + PATIENCE;
    while env.hook.count(&format!("POST /api/regenerate/{job}")) == 0 {
        assert!(
            Instant::now() < deadline,
            "the regenerate never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_photo_is_refused_with_a_sentence_and_nothing_is_created() {
    let env = Env::start().await;
    let token = env.user("alice", 20).await;
    let (_driver, c) = browser(1280).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/new", env.base)).await.unwrap();
    wait_for(&c, "document.querySelector('#gen-form')", "the form").await;
    c.find(Locator::Css("#subject"))
        .await
        .unwrap()
        .send_keys("a red fox")
        .await
        .unwrap();
    // Over the 10 MiB upload limit: refused with 413 before the body is read.
    let big = env.dir.path().join("huge.png");
    std::fs::write(&big, vec![7u8; 11 * 1024 * 1024]).unwrap();
    c.find(Locator::Css("#photo"))
        .await
        .unwrap()
        .send_keys(&big.display().to_string())
        .await
        .unwrap();
    c.find(Locator::Css("#gen-submit"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    wait_for(
        &c,
        "document.querySelector('#gen-error').textContent.length > 0",
        "the refusal",
    )
    .await;
    let said = c
        .find(Locator::Css("#gen-error"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(said.contains("large"), "{said:?}");
    let v = c
        .find(Locator::Css("#subject"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("a red fox"), "the form is kept");
    assert_eq!(env.balance("alice").await, 20, "nothing charged");
    assert!(
        env.store
            .list_jobs(Some("alice"), 10, 0)
            .await
            .unwrap()
            .is_empty(),
        "no job"
    );
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn screenshots_of_the_archive_and_a_job_page() {
    let mut env = Env::start().await;
    env.start_worker().await;
    let token = env.user("alice", 40).await;
    env.set(&token, &["happy", "sad"]).await;
    let job = env
        .set(&token, &["happy", "sad", "surprised", "sleepy"])
        .await;
    let (_driver, c) = browser(1100).await;
    sign_in(&c, &env, &token).await;
    c.goto(&format!("{}/#/job/{job}", env.base)).await.unwrap();
    wait_for(
        &c,
        "document.querySelector('#job') && document.querySelector('#job').dataset.status === 'done' && [...document.querySelectorAll('#job img:not(.anim)')].every(i => i.complete && i.naturalWidth > 0)",
        "the finished job",
    )
    .await;
    shot(&c, "job").await;
    // The archive: both sets done, and a third whose card has no thumbnail yet (placeholder).
    env.worker.take().expect("the worker").trigger();
    env.set(&token, &["waving"]).await;
    c.goto(&format!("{}/#/", env.base)).await.unwrap();
    wait_for(
        &c,
        "document.querySelectorAll('#archive img.thumb').length === 3 && [...document.querySelectorAll('#archive img.thumb')].every(i => i.complete && i.naturalWidth > 0)",
        "the archive",
    )
    .await;
    shot(&c, "archive").await;
    c.close().await.unwrap();
}

/// A screenshot of the page as a PNG, checked; kept in `POPCON_SCREENSHOTS` when set
/// (`scripts/screenshots.sh` sets it to `docs/`).
async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let img = image::load_from_memory(&png).expect("a PNG screenshot");
    assert!(img.width() > 100 && img.height() > 100);
    if let Ok(dir) = std::env::var("POPCON_SCREENSHOTS") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), &png).unwrap();
    }
}
