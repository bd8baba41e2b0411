//! The enqueue side's command line, as an operator uses it: `users add`, `credits`, and the
//! `enqueue` actions charged like the API (real processes, a real `redis-server`, a real
//! SQLite file).

mod common;

use std::path::Path;
use std::process::{Command, Output};

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

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_popcon-worker"))
            .env(
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
            .env_remove("POPCON_PRICES")
            .args(args)
            .output()
            .expect("the binary runs")
    }

    fn balance(&self, user: &str) -> i64 {
        ok(&self.run(&["credits", "show", user]))
            .trim()
            .parse()
            .unwrap()
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

fn fails(out: &Output, code: i32, want: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    assert!(stderr.contains(want), "`{stderr}` should contain `{want}`");
}

#[test]
fn users_get_a_token_once_and_credits_can_be_shown_and_granted() {
    let env = Env::new();
    let token = ok(&env.run(&["users", "add", "ann", "--credits", "5"]));
    let token = token.trim();
    assert!(token.starts_with("pcw_") && token.len() == 68, "{token}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&env.run(&["users", "add", "root", "--admin", "--json"])))
            .unwrap();
    assert!(json["token"].as_str().unwrap().starts_with("pcw_"));
    assert_ne!(json["token"], token);
    fails(&env.run(&["users", "add", "ann"]), 2, "already exists");
    fails(&env.run(&["users", "add", "a b"]), 2, "[A-Za-z0-9_.@-]");
    fails(
        &env.run(&["users", "add", "neg", "--credits", "-1"]),
        2,
        "-1",
    );
    assert_eq!(env.balance("ann"), 5);
    assert_eq!(ok(&env.run(&["credits", "grant", "ann", "3"])).trim(), "8");
    assert_eq!(env.balance("ann"), 8);
    fails(
        &env.run(&["credits", "show", "ghost"]),
        2,
        "no user `ghost`",
    );
    fails(
        &env.run(&["credits", "grant", "ghost", "3"]),
        2,
        "no user `ghost`",
    );
    fails(&env.run(&["credits", "grant", "ann", "0"]), 2, "0");
}

#[test]
fn enqueue_charges_like_the_api_and_reports_dedup() {
    let env = Env::new();
    ok(&env.run(&["users", "add", "ann", "--credits", "5"]));
    let set = |extra: &[&str]| {
        let mut args = vec![
            "enqueue",
            "generate-set",
            "--user",
            "ann",
            "--subject",
            "a red fox",
            "--expressions",
            "happy,sad",
        ];
        args.extend_from_slice(extra);
        env.run(&args)
    };
    let id = ok(&set(&[])).trim().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(env.balance("ann"), 3, "2 emoji at the default 1 credit");

    // Once per idempotency key.
    let a = ok(&set(&["--idempotency-key", "k1"]));
    let b = ok(&set(&["--idempotency-key", "k1"]));
    assert_eq!(a, b);
    assert_eq!(env.balance("ann"), 1);
    fails(&set(&[]), 2, "not enough credits");
    assert_eq!(env.balance("ann"), 1, "a refused charge takes nothing");
    fails(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--user",
            "ghost",
            "--subject",
            "fox",
        ]),
        2,
        "users add ghost",
    );
    // An operator can enqueue without charging.
    ok(&env.run(&[
        "enqueue",
        "generate-set",
        "--user",
        "ghost",
        "--subject",
        "fox",
        "--free",
    ]));
    fails(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--user",
            "ann",
            "--subject",
            "fox",
            "--prices",
            "retry=x",
        ]),
        2,
        "retry=x",
    );

    // A retry on a pending emoji: nothing done, the reply says why, exit 1.
    let out = env.run(&["enqueue", "retry", &id, "--idx", "0", "--user", "ann"]);
    assert_eq!(out.status.code(), Some(1));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["status"], "wrong_state");
    assert_eq!(reply["current"], "pending");
    let out = env.run(&["enqueue", "approve-all", &id, "--user", "ann"]);
    assert_eq!(out.status.code(), Some(1));
    // Someone else's job is not found, whatever its id.
    fails(
        &env.run(&[
            "enqueue",
            "regenerate",
            &id,
            "--idx",
            "0",
            "--user",
            "ghost",
        ]),
        2,
        "no job",
    );
    assert_eq!(env.balance("ann"), 1);
}

#[test]
fn the_settings_file_sets_prices_and_off_hours_refuses_costly_work() {
    let env = Env::new();
    ok(&env.run(&["users", "add", "ann", "--credits", "10"]));
    let file = env.dir.path().join("popcon.toml");
    std::fs::write(&file, "prices = \"generate_set=3\"\n").unwrap();
    let cfg = file.to_str().unwrap();
    ok(&env.run(&[
        "enqueue",
        "generate-set",
        "--config",
        cfg,
        "--user",
        "ann",
        "--subject",
        "fox",
        "--expressions",
        "a,b",
    ]));
    assert_eq!(env.balance("ann"), 4, "2 emoji at 3 credits");
    std::fs::write(&file, "prices = \"nonsense\"\n").unwrap();
    fails(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--config",
            cfg,
            "--user",
            "ann",
            "--subject",
            "fox",
        ]),
        2,
        "prices",
    );

    ok(&env.run(&["off-hours", "on", "--ttl", "10m"]));
    fails(
        &env.run(&[
            "enqueue",
            "generate-set",
            "--user",
            "ann",
            "--subject",
            "fox",
            "--expressions",
            "a",
        ]),
        2,
        "off-hours",
    );
    assert_eq!(env.balance("ann"), 4);
}
