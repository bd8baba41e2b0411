//! Enqueue API latency over a real socket: the in-process server on 127.0.0.1:0, a real
//! `redis-server` (started here, no persistence), a SQLite file in a temp folder, one
//! keep-alive client sending requests one after another. Each route's time is shown next to
//! `GET /healthz` measured in the same run (the HTTP + client floor), as a ratio.
//!
//! `cargo bench --bench api` (`-- N` for N requests per row, default 300). Prints a table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use popcon_worker::blobs::{Blobs, BlobsConfig};
use popcon_worker::enqueue::{EnqueueConfig, Enqueuer};
use popcon_worker::http::api::{ApiConfig, ApiState};
use popcon_worker::queue::{Queue, QueueConfig};
use popcon_worker::store::Store;
use serde_json::{Value, json};

#[path = "support/mod.rs"]
mod support;
use support::{Proc, free_port, percentile};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let _redis = Proc(
        Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (base, store, _server) = rt.block_on(async {
        let store = Store::connect(&format!("sqlite://{}", dir.path().join("b.db").display()))
            .await
            .expect("store");
        let queue = Queue::connect(QueueConfig {
            redis_url: format!("redis://127.0.0.1:{port}"),
            connect_patience: Duration::from_secs(10),
            ..QueueConfig::default()
        })
        .await
        .expect("redis");
        let blobs = Blobs::open(&BlobsConfig::at(dir.path().join("results"))).expect("blobs");
        let enq = Enqueuer::new(store.clone(), queue, blobs, EnqueueConfig::default());
        let state = ApiState::new(enq, ApiConfig::default()).expect("state");
        let app = popcon_worker::http::with_fallbacks(popcon_worker::http::api::routes(state));
        // The trigger lives as long as the bench: dropping it would stop the server.
        let (trigger, shutdown) = popcon_worker::worker::shutdown_channel();
        let (addr, _) =
            popcon_worker::http::serve_router("127.0.0.1:0".parse().expect("addr"), app, shutdown)
                .await
                .expect("serve");
        (format!("http://{addr}"), store, trigger)
    });
    let token = rt
        .block_on(popcon_worker::auth::add_user(
            &store,
            "bench",
            false,
            1 << 40,
        ))
        .expect("user")
        .1;
    let agent = ureq::AgentBuilder::new().build();
    let auth = format!("Bearer {token}");
    let post_set = |labels: usize| -> Value {
        agent
            .post(&format!("{base}/api/generate-set"))
            .set("Authorization", &auth)
            .send_json(json!({"subject": "a red fox", "expressions": vec!["e"; labels]}))
            .expect("generate-set")
            .into_json()
            .expect("json")
    };

    // Failed rows to retry: 64-emoji jobs whose rows are all failed.
    let mut to_retry: Vec<(String, u32)> = Vec::new();
    while to_retry.len() < n {
        let id = post_set(64)["id"].as_str().expect("id").to_string();
        rt.block_on(async {
            for idx in 0..64 {
                store.start_emoji(&id, idx, 1).await.expect("start");
                store.fail_emoji(&id, idx, 1, "bench").await.expect("fail");
            }
        });
        to_retry.extend((0..64).map(|i| (id.clone(), i)));
    }
    let dup = to_retry[0].clone();

    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut(usize)| {
        f(0); // warm-up
        let mut d = Vec::with_capacity(n);
        for i in 1..=n {
            let t = Instant::now();
            f(i);
            d.push(t.elapsed());
        }
        d.sort();
        rows.push((name, d));
    };
    time("GET /healthz (baseline)", &mut |_| {
        agent
            .get(&format!("{base}/healthz"))
            .call()
            .expect("healthz");
    });
    time("GET /api/credits (auth + read)", &mut |_| {
        agent
            .get(&format!("{base}/api/credits"))
            .set("Authorization", &auth)
            .call()
            .expect("credits");
    });
    let mut next = to_retry.iter().skip(1);
    time("POST /api/retry, queued", &mut |_| {
        let (id, idx) = next.next().expect("enough rows");
        let r: Value = agent
            .post(&format!("{base}/api/retry/{id}?idx={idx}"))
            .set("Authorization", &auth)
            .call()
            .expect("retry")
            .into_json()
            .expect("json");
        assert_eq!(r["status"], "queued", "{r}");
    });
    time("POST /api/retry, duplicate click", &mut |_| {
        let r: Value = agent
            .post(&format!("{base}/api/retry/{}?idx={}", dup.0, dup.1))
            .set("Authorization", &auth)
            .call()
            .expect("retry")
            .into_json()
            .expect("json");
        assert!(r["status"] == "duplicate" || r["status"] == "queued", "{r}");
    });
    time("POST /api/generate-set (1 emoji)", &mut |_| {
        post_set(1);
    });

    let base_mean = rows[0].1.iter().sum::<Duration>().as_secs_f64() / rows[0].1.len() as f64;
    println!("\nEnqueue API, {n} sequential requests per row, one keep-alive client\n");
    println!(
        "| {:<34} | {:>9} | {:>9} | {:>9} | {:>8} | {:>9} |",
        "route", "mean ms", "p50 ms", "p99 ms", "req/s", "× healthz"
    );
    println!(
        "|{:-<36}|{:-<11}|{:-<11}|{:-<11}|{:-<10}|{:-<11}|",
        "", "", "", "", "", ""
    );
    for (name, d) in &rows {
        let mean = d.iter().sum::<Duration>().as_secs_f64() / d.len() as f64;
        println!(
            "| {:<34} | {:>9.3} | {:>9.3} | {:>9.3} | {:>8.0} | {:>9.1} |",
            name,
            mean * 1e3,
            percentile(d, 0.5).as_secs_f64() * 1e3,
            percentile(d, 0.99).as_secs_f64() * 1e3,
            1.0 / mean,
            mean / base_mean
        );
    }
}
