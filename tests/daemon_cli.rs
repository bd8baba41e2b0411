//! The daemon and operator commands as an operator runs them: `run` (with a real SIGTERM),
//! `enqueue generate-set`, `job show`, `off-hours`, `dead list` / `dead requeue`, exit
//! code 2 with one clear message for bad input, the `--config` file, and `run --start-redis`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;

struct Env {
    redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            redis: RedisServer::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_popcon-worker"));
        c.env(
            "POPCON_MODELS_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
        )
        .env("RUST_LOG", "warn")
        .env("REDIS_URL", self.redis.url())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", self.dir.path().join("popcon.db").display()),
        )
        .env("POPCON_RESULTS", self.dir.path().join("results"))
        // These tests are about the daemon, not credits: enqueue for free (no user needed).
        .env("POPCON_PRICES", "generate_set=0,retry=0,regenerate=0");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("the binary runs")
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn usage_error(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(want), "`{stderr}` should contain `{want}`");
}

#[test]
fn enqueue_run_show_and_sigterm_exits_zero() {
    let env = Env::new();
    let id = ok(&env.run(&[
        "enqueue",
        "generate-set",
        "--subject",
        "a red fox",
        "--expressions",
        "happy,sad",
        "--seed",
        "5",
    ]))
    .trim()
    .to_string();
    assert_eq!(id.len(), 32, "a job id: {id}");
    let printed: serde_json::Value = serde_json::from_str(&ok(&env.run(&[
        "enqueue",
        "generate-set",
        "--subject",
        "a cat",
        "--json",
    ])))
    .unwrap();
    assert_eq!(printed["status"], "pending");
    assert_eq!(
        printed["emoji"].as_array().unwrap().len(),
        8,
        "the default eight"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&env.run(&["job", "show", &id, "--json"]))).unwrap();
    assert_eq!(shown["status"], "pending");
    assert_eq!(shown["emoji"].as_array().unwrap().len(), 2);
    for col in [
        "id",
        "user_id",
        "subject",
        "seed",
        "pose_key",
        "thumbnail_path",
        "thumbnail_key",
        "created_at",
    ] {
        assert!(shown.get(col).is_some(), "column {col} in {shown}");
    }

    let mut daemon = env
        .cmd()
        .args(["run", "--model", "tiny", "--grace", "5s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&env.run(&["job", "show", &id, "--json"]))).unwrap();
        if v["status"] == "done" {
            break v;
        }
        assert!(Instant::now() < deadline, "job never finished: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(done["thumbnail_key"].is_string());
    let text = ok(&env.run(&["job", "show", &id]));
    assert!(
        text.contains("thumbnail_key") && text.contains("emoji:"),
        "{text}"
    );

    let kill = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn off_hours_on_status_off_with_the_ttl_capped_at_20h() {
    let env = Env::new();
    assert!(ok(&env.run(&["off-hours", "status"])).contains("off"));
    let out = env.run(&["off-hours", "on", "--ttl", "30h"]);
    assert!(ok(&out).contains("20h00m00s"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("capped"));
    assert!(ok(&env.run(&["off-hours", "status"])).contains("expires in 19h59m"));
    assert!(ok(&env.run(&["off-hours", "on", "--ttl", "1h"])).contains("1h00m00s"));
    assert!(ok(&env.run(&["off-hours", "off"])).contains("off-hours off"));
    assert_eq!(
        ok(&env.run(&["off-hours", "status"])).trim(),
        "off-hours off"
    );
    usage_error(&env.run(&["off-hours", "on", "--ttl", "0s"]), "positive");
    usage_error(&env.run(&["off-hours", "on", "--ttl", "soon"]), "duration");
}

#[test]
fn dead_letters_are_listed_and_requeued() {
    let env = Env::new();
    assert!(ok(&env.run(&["dead", "list"])).contains("no dead letters"));
    // A poison message, dead-lettered by a short-lived daemon.
    let mut c = redis::Client::open(env.redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("popcon:jobs:bulk")
        .arg("*")
        .arg("job")
        .arg("{not json")
        .query(&mut c)
        .unwrap();
    let mut daemon = env
        .cmd()
        .args(["run", "--model", "tiny"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let listed = loop {
        let out = ok(&env.run(&["dead", "list"]));
        if out.contains("reason") {
            break out;
        }
        assert!(Instant::now() < deadline, "never dead-lettered");
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    assert!(daemon.wait().unwrap().success());
    assert!(listed.contains("not valid JSON"), "{listed}");
    let dead_id = listed.split_whitespace().next().unwrap().to_string();
    assert!(ok(&env.run(&["dead", "requeue", &dead_id])).contains("requeued"));
    assert!(ok(&env.run(&["dead", "list"])).contains("no dead letters"));
    usage_error(&env.run(&["dead", "requeue", "1-1"]), "no dead letter");
}

#[test]
fn bad_operator_input_is_one_clear_message_and_exit_2() {
    let env = Env::new();
    usage_error(
        &env.run(&["enqueue", "generate-set", "--subject", "  "]),
        "subject is empty",
    );
    usage_error(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--subject",
            "fox",
            "--image",
            "/nonexistent.png",
        ]),
        "cannot read it",
    );
    usage_error(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--subject",
            "fox",
            "--expressions",
            "happy,,sad",
        ]),
        "empty expression",
    );
    usage_error(&env.run(&["job", "show", "nope"]), "no job `nope`");
    usage_error(&env.run(&["run", "--grace", "forever"]), "duration");
}

fn wait_exit(daemon: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = daemon.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_config_file_fills_in_settings_and_env_and_flags_override_it() {
    let env = Env::new();
    let file = env.dir.path().join("popcon.toml");
    // The file's Redis URL is dead; REDIS_URL (set by `cmd`) must win over it.
    std::fs::write(
        &file,
        "redis_url = \"redis://127.0.0.1:1\"\nprefix = \"cfg:\"\n",
    )
    .unwrap();
    let file_arg = file.to_str().unwrap();
    ok(&env.run(&["off-hours", "on", "--ttl", "1h", "--config", file_arg]));
    let mut c = redis::Client::open(env.redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let exists = |c: &mut redis::Connection, key: &str| -> bool {
        redis::cmd("EXISTS").arg(key).query::<i64>(c).unwrap() == 1
    };
    assert!(exists(&mut c, "cfg:off_hours"), "the file's prefix is used");
    assert!(!exists(&mut c, "popcon:off_hours"));
    // POPCON_CONFIG names the file too; a flag beats the file's prefix.
    let out = env
        .cmd()
        .env("POPCON_CONFIG", &file)
        .args(["off-hours", "on", "--ttl", "1h", "--prefix", "flag:"])
        .output()
        .unwrap();
    ok(&out);
    assert!(
        exists(&mut c, "flag:off_hours"),
        "the flag wins over the file"
    );

    // Unknown keys and bad values: exit 2, naming the file and the key.
    std::fs::write(&file, "reddis_url = \"redis://127.0.0.1:6379\"\n").unwrap();
    let out = env.run(&["off-hours", "status", "--config", file_arg]);
    usage_error(&out, "reddis_url");
    usage_error(&out, file_arg);
    std::fs::write(&file, "grace = \"forever\"\n").unwrap();
    let out = env.run(&["run", "--config", file_arg]);
    usage_error(&out, "`grace`");
    usage_error(&out, file_arg);
    usage_error(
        &env.run(&[
            "off-hours",
            "status",
            "--config",
            "/nonexistent/popcon.toml",
        ]),
        "/nonexistent/popcon.toml",
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 16];
    s.write_all(b"PING\r\n").is_ok() && matches!(s.read(&mut buf), Ok(n) if n > 0)
}

/// A command line with no Redis running: only `--start-redis` can bring one up.
fn bare_cmd(dir: &Path, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_popcon-worker"));
    c.env(
        "POPCON_MODELS_DIR",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    )
    .env("RUST_LOG", "warn")
    .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
    .env(
        "DATABASE_URL",
        format!("sqlite://{}", dir.join("popcon.db").display()),
    )
    .env("POPCON_RESULTS", dir.join("results"))
    .env("POPCON_PRICES", "generate_set=0,retry=0,regenerate=0");
    c
}

#[test]
fn start_redis_brings_up_a_persistent_redis_and_stops_it_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("redis-data");
    let mut daemon = bare_cmd(dir.path(), port)
        .args(["run", "--start-redis", "--grace", "5s", "--redis-data"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !redis_answers(port) {
        if let Some(s) = daemon.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("daemon exited ({s:?}) before Redis answered: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "the started Redis never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = |args: &[&str]| bare_cmd(dir.path(), port).args(args).output().unwrap();
    let id = ok(&run(&[
        "enqueue",
        "generate-set",
        "--subject",
        "a red fox",
        "--expressions",
        "happy",
        "--seed",
        "3",
    ]))
    .trim()
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&run(&["job", "show", &id, "--json"]))).unwrap();
        if v["status"] == "done" {
            break;
        }
        assert!(Instant::now() < deadline, "job never finished: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Persistence is on: the append-only file lives in the data folder.
    let aof = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("appendonly"));
    assert!(aof, "no append-only file in {}", data.display());
    let kill = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_exit(&mut daemon, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "exit status {status:?}: {err}");
    assert!(
        err.contains("STARTED A LOCAL redis-server"),
        "logged loudly: {err}"
    );
    assert!(!redis_answers(port), "the started Redis is stopped on exit");
}

#[test]
fn start_redis_without_redis_server_installed_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = bare_cmd(dir.path(), free_port())
        .env("REDIS_SERVER", "/nonexistent/redis-server")
        .args(["run", "--start-redis"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("is not installed") && stderr.contains("/nonexistent/redis-server"),
        "{stderr}"
    );
    // A remote URL is refused rather than "started" here.
    let out = bare_cmd(dir.path(), 6379)
        .env("REDIS_URL", "redis://10.255.255.1:6379")
        .args(["run", "--start-redis"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("only starts a Redis on this machine"),
        "{stderr}"
    );
}

/// Status and attempts of a job's emoji rows, from `job show --json`.
fn show(env: &Env, id: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&env.run(&["job", "show", id, "--json"]))).unwrap()
}

#[test]
fn a_daemon_killed_with_sigkill_mid_job_is_reclaimed_after_the_lease_and_finished_once() {
    let env = Env::new();
    let id = ok(&env.run(&[
        "enqueue",
        "generate-set",
        "--subject",
        "a red fox",
        "--expressions",
        "happy",
        "--seed",
        "3",
    ]))
    .trim()
    .to_string();
    // A long job (many steps) and a short lease, so the crash lands mid-diffusion and the
    // takeover comes quickly.
    let spawn = |consumer: &str, steps: &str| {
        env.cmd()
            .args([
                "run",
                "--model",
                "tiny",
                "--steps",
                steps,
                "--lease",
                "2s",
                "--consumer",
                consumer,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn("crashing", "400");
    let deadline = Instant::now() + Duration::from_secs(60);
    while show(&env, &id)["emoji"][0]["status"] != "running" {
        assert!(
            Instant::now() < deadline,
            "the first daemon never started the job"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let kill = Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let _ = first.wait();
    assert_eq!(
        show(&env, &id)["emoji"][0]["status"],
        "running",
        "nothing was released"
    );

    let mut second = spawn("survivor", "4");
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let v = show(&env, &id);
        if v["status"] == "done" {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the job was never taken over: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let emoji = &done["emoji"][0];
    assert_eq!(emoji["status"], "done");
    assert_eq!(emoji["fence"], 1, "the same message, not a new one");
    // One attempt by the crashed daemon, one by the survivor: finished once, after the takeover.
    assert_eq!(emoji["attempts"], 2, "{emoji}");
    let results = env.dir.path().join("results/jobs").join(&id).join("emoji");
    let written: Vec<_> = std::fs::read_dir(&results).unwrap().collect();
    assert_eq!(written.len(), 1, "one image written: {written:?}");
    let _ = Command::new("kill")
        .args(["-TERM", &second.id().to_string()])
        .status();
    let _ = second.wait();
}

/// A listener on a free port that answers every connection with `reply`, or holds it open
/// without a word when `reply` is `None`. Runs until the test process ends.
fn fake_http(reply: Option<&'static str>) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            match reply {
                Some(r) => {
                    let _ = conn.write_all(r.as_bytes());
                }
                None => held.push(conn),
            }
        }
    });
    port
}

fn unhealthy(out: &Output, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("unhealthy") && stderr.contains(want),
        "`{stderr}` should say unhealthy and contain `{want}`"
    );
}

#[test]
fn healthcheck_exits_0_on_the_daemons_200_and_1_with_the_reason_otherwise() {
    let env = Env::new();
    let port = free_port();
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let mut daemon = env
        .cmd()
        .args([
            "run",
            "--model",
            "tiny",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let probe = |url: &str| env.run(&["healthcheck", "--url", url, "--timeout", "2s"]);
    // /healthz answers from the start, /readyz once the model is loaded and Redis answers.
    for url in [&healthz, &readyz] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = probe(url);
            if out.status.success() || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(ok(&out).contains(&format!("healthy: {url} answered 200")));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(wait_exit(&mut daemon, Duration::from_secs(20)).success());

    // Nothing listening any more.
    unhealthy(&probe(&healthz), &healthz);
    // An answer that is not a 200: its status and body are the reason.
    let port = fake_http(Some(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 26\r\nconnection: close\r\n\r\n{\"error\": \"not ready: x\"}\n",
    ));
    unhealthy(
        &probe(&format!("http://127.0.0.1:{port}/readyz")),
        "answered 503: {\"error\": \"not ready: x\"}",
    );
    // A server that accepts and never answers: given up on after --timeout.
    let port = fake_http(None);
    let start = Instant::now();
    let out = env.run(&[
        "healthcheck",
        "--url",
        &format!("http://127.0.0.1:{port}/healthz"),
        "--timeout",
        "300ms",
    ]);
    unhealthy(&out, "timeout 300ms");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    usage_error(&env.run(&["healthcheck", "--timeout", "soon"]), "duration");
}
