//! The binary's daemon and operator commands: `run`, `api`, `enqueue`, `users`, `credits`,
//! `off-hours`, `job`, `dead`.
//!
//! Part of the `popcon-worker` binary (not the library): argument checking, printing and exit
//! codes. Bad input is one clear message and exit 2 ([`Failure::Usage`]); trouble while working
//! (Redis down, database locked) is exit 1.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use popcon_worker::blobs::Blobs;
use popcon_worker::config::{Connection, ConnectionArgs, LoadedFile, RunConfig, parse_duration};
use popcon_worker::enqueue::{
    ActionReply, EnqueueConfig, EnqueueError, Enqueuer, GenerateSet, Prices,
};
use popcon_worker::http::HttpState;
use popcon_worker::http::api::{ApiConfig, ApiState};
use popcon_worker::job::Action;
use popcon_worker::queue::{OFF_HOURS_MAX_TTL, Queue, QueueConfig, QueueError};
use popcon_worker::store::Store;
use popcon_worker::worker::{Worker, shutdown_channel};

use super::Failure;

#[derive(Subcommand, Debug)]
pub enum EnqueueCommand {
    /// Charge the set, create the job with its pending emoji rows, add it to the bulk stream.
    GenerateSet(GenerateSetArgs),
    /// Retry one failed emoji (claim, status check, charge + pre-flip, dispatch).
    Retry(EmojiActionArgs),
    /// Regenerate one done or failed emoji with a new seed.
    Regenerate(EmojiActionArgs),
    /// Approve one done emoji.
    Approve(EmojiActionArgs),
    /// Approve every done emoji of a job.
    ApproveAll(JobActionArgs),
}

/// What actions cost.
#[derive(Args, Debug, Clone)]
pub struct PricingArgs {
    /// Credits per action, e.g. `generate_set=1,retry=1,regenerate=1,approve=1,approve_all=1`
    /// (generate_set and approve_all per emoji) [default: those values].
    #[arg(long, env = "POPCON_PRICES", value_parser = Prices::parse)]
    prices: Option<Prices>,
    /// Charge nothing (operator override; no registered user needed).
    #[arg(long)]
    free: bool,
}

impl PricingArgs {
    /// Flags > env > the settings file's `prices` > defaults.
    fn config(&self, file: &LoadedFile) -> Result<EnqueueConfig, Failure> {
        let prices = if self.free {
            Prices::free()
        } else if let Some(p) = self.prices {
            p
        } else if let Some(text) = file.api_setting("prices") {
            Prices::parse(text)
                .map_err(|m| Failure::Usage(file.invalid("prices", m).to_string()))?
        } else {
            Prices::default()
        };
        Ok(EnqueueConfig {
            prices,
            ..EnqueueConfig::default()
        })
    }
}

#[derive(Args, Debug)]
pub struct EmojiActionArgs {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    pricing: PricingArgs,
    job_id: String,
    /// The emoji index.
    #[arg(long)]
    idx: u32,
    /// The job's owner.
    #[arg(long, default_value = "local")]
    user: String,
}

#[derive(Args, Debug)]
pub struct JobActionArgs {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    pricing: PricingArgs,
    job_id: String,
    /// The job's owner.
    #[arg(long, default_value = "local")]
    user: String,
}

#[derive(Args, Debug)]
pub struct ApiArgs {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    pricing: PricingArgs,
    /// Address to serve the API on [default: 127.0.0.1:8080].
    #[arg(long, env = "POPCON_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// The origin clients reach the API at, for absolute URLs in responses (default: each
    /// request's Host header).
    #[arg(long, env = "POPCON_PUBLIC_URL")]
    public_url: Option<String>,
    /// How long signed image URLs stay valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    signed_url_ttl: Duration,
    /// Longest wait for a request's header, and for the next request on a kept-alive
    /// connection; then the connection is closed.
    #[arg(long, env = "POPCON_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    http_header_timeout: Duration,
    /// Longest wait for a request's body after its header; then 408 and the connection closes.
    #[arg(long, env = "POPCON_HTTP_BODY_TIMEOUT", default_value = "30s", value_parser = parse_timeout)]
    http_body_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog until one closes.
    #[arg(long, env = "POPCON_HTTP_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    http_max_connections: u32,
}

/// A read timeout: a duration of at least 1 ms (0 would close every connection at once).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) {
        return Err(format!("`{s}`: a timeout must be at least 1ms"));
    }
    Ok(d)
}

#[derive(Subcommand, Debug)]
pub enum UsersCommand {
    /// Add an API user and print its token (shown once; only its hash is stored).
    Add {
        #[command(flatten)]
        conn: ConnectionArgs,
        /// The user's name (its id: 1-64 of [A-Za-z0-9_.@-]).
        name: String,
        /// May use the admin routes.
        #[arg(long)]
        admin: bool,
        /// Sign-up credits.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        credits: i64,
        /// Print `{"token": ...}` instead of the bare token.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum CreditsCommand {
    /// A user's balance.
    Show {
        #[command(flatten)]
        conn: ConnectionArgs,
        user: String,
    },
    /// Add credits to a user's balance.
    Grant {
        #[command(flatten)]
        conn: ConnectionArgs,
        user: String,
        #[arg(value_parser = clap::value_parser!(i64).range(1..))]
        amount: i64,
        #[arg(long, default_value = "granted by an operator")]
        reason: String,
    },
}

#[derive(Args, Debug)]
pub struct GenerateSetArgs {
    #[command(flatten)]
    conn: ConnectionArgs,
    #[command(flatten)]
    pricing: PricingArgs,
    /// What the emoji show, e.g. "a red fox".
    #[arg(long)]
    subject: String,
    /// A reference photo (PNG, JPEG or WebP) the pose starts from.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Comma-separated expressions (default: the standard eight).
    #[arg(long, value_delimiter = ',')]
    expressions: Vec<String>,
    #[arg(long)]
    style: Option<String>,
    /// Base seed (default: random).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value = "local")]
    user: String,
    /// Print the job as JSON instead of its id.
    #[arg(long)]
    json: bool,
    /// A repeat with the same key returns the first job instead of creating another.
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum OffHoursCommand {
    /// Set the flag with a TTL (default and maximum 20h).
    On {
        #[command(flatten)]
        conn: ConnectionArgs,
        #[arg(long, default_value = "20h", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// Clear the flag.
    Off {
        #[command(flatten)]
        conn: ConnectionArgs,
    },
    /// Whether the flag is on, and for how long.
    Status {
        #[command(flatten)]
        conn: ConnectionArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// The job row and its emoji rows.
    Show {
        #[command(flatten)]
        conn: ConnectionArgs,
        job_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// The oldest dead letters.
    List {
        #[command(flatten)]
        conn: ConnectionArgs,
        #[arg(long, default_value_t = 100)]
        count: usize,
    },
    /// Put a dead letter back on its stream.
    Requeue {
        #[command(flatten)]
        conn: ConnectionArgs,
        /// The dead letter's id (from `dead list`).
        id: String,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .map_err(Failure::Runtime)
}

/// The connection settings: flags > env > the `--config` file > defaults. A bad file is a
/// usage error.
fn connection(conn: &ConnectionArgs) -> Result<Connection, Failure> {
    conn.resolve()
        .map(|(c, _)| c)
        .map_err(|e| Failure::Usage(e.to_string()))
}

async fn queue(conn: &ConnectionArgs) -> Result<Queue, Failure> {
    Queue::connect(connection(conn)?.queue_config())
        .await
        .context("connecting to redis")
        .map_err(Failure::Runtime)
}

async fn store(conn: &ConnectionArgs) -> Result<Store, Failure> {
    Store::connect(&connection(conn)?.database_url)
        .await
        .context("opening the job database")
        .map_err(Failure::Runtime)
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// `popcon-worker run`.
pub fn run_daemon(run: RunConfig) -> Result<(), Failure> {
    let RunConfig {
        worker: cfg,
        start_redis,
    } = run;
    // Before the runtime: a Redis we start must outlive the worker, which needs it to hand
    // its entries back at shutdown. Dropped (SHUTDOWN, append-only file flushed) last.
    let local_redis = match start_redis {
        Some(dir) => {
            crate::local_redis::ensure(&cfg.queue.redis_url, &dir).map_err(Failure::Runtime)?
        }
        None => None,
    };
    let result = runtime()?.block_on(async move {
        let (trigger, shutdown) = shutdown_channel();
        // Signals first: a SIGTERM during the (long) model load must also stop us cleanly.
        let signals = trigger.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; no new work will be claimed");
            signals.trigger();
        });
        // Probes answer from the start; /readyz says "loading" until the worker is up.
        let state = HttpState::new();
        let http = match cfg.http.addr {
            Some(addr) => Some(
                popcon_worker::http::serve(addr, state.clone(), shutdown.clone())
                    .await
                    .context("starting the HTTP endpoint")
                    .map_err(Failure::Runtime)?
                    .1,
            ),
            None => None,
        };
        let worker = tokio::select! {
            w = Worker::start(cfg) => Arc::new(w.context("starting the worker").map_err(Failure::Runtime)?),
            _ = shutdown.wait() => return Ok(()),
        };
        state.set_worker(worker.clone());
        let result = worker
            .run(shutdown)
            .await
            .context("worker loop")
            .map_err(Failure::Runtime);
        // The server saw the same signal; let requests in flight end, briefly.
        if let Some(task) = http
            && tokio::time::timeout(Duration::from_secs(5), task).await.is_err()
        {
            tracing::warn!("HTTP server still busy 5 s after shutdown; leaving it");
        }
        result
    });
    drop(local_redis);
    result
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the worker");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn enqueue_failure(e: EnqueueError) -> Failure {
    if e.is_bad_input()
        || matches!(
            e,
            EnqueueError::InsufficientCredits { .. } | EnqueueError::OffHours { .. }
        )
    {
        Failure::Usage(e.to_string())
    } else {
        Failure::Runtime(e.into())
    }
}

async fn enqueuer(conn: &ConnectionArgs, pricing: &PricingArgs) -> Result<Enqueuer, Failure> {
    enqueuer_with(conn, pricing, Duration::from_secs(5)).await
}

/// `patience`: how long to wait for an unreachable Redis (a server started at boot beside
/// Redis waits longer than an operator at a prompt).
async fn enqueuer_with(
    conn: &ConnectionArgs,
    pricing: &PricingArgs,
    patience: Duration,
) -> Result<Enqueuer, Failure> {
    let (resolved, file) = conn.resolve().map_err(|e| Failure::Usage(e.to_string()))?;
    let cfg = pricing.config(&file)?;
    let store = store(conn).await?;
    let queue = Queue::connect(QueueConfig {
        connect_patience: patience,
        ..resolved.queue_config()
    })
    .await
    .context("connecting to redis")
    .map_err(Failure::Runtime)?;
    let blobs = Blobs::open(&resolved.blobs_config())
        .context("opening the results folder")
        .map_err(Failure::Runtime)?;
    Ok(Enqueuer::new(store, queue, blobs, cfg))
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).map_err(|e| Failure::Runtime(e.into()))?
    );
    Ok(())
}

/// `popcon-worker enqueue …`.
pub fn enqueue(command: EnqueueCommand) -> Result<(), Failure> {
    match command {
        EnqueueCommand::GenerateSet(a) => enqueue_set(a),
        EnqueueCommand::Retry(a) => enqueue_action(a, Action::Retry),
        EnqueueCommand::Regenerate(a) => enqueue_action(a, Action::Regenerate),
        EnqueueCommand::Approve(a) => enqueue_action(a, Action::Approve),
        EnqueueCommand::ApproveAll(a) => runtime()?.block_on(async {
            let enq = enqueuer(&a.conn, &a.pricing).await?;
            let reply = enq
                .approve_all(&a.user, &a.job_id)
                .await
                .map_err(enqueue_failure)?;
            action_result(reply)
        }),
    }
}

fn enqueue_action(a: EmojiActionArgs, action: Action) -> Result<(), Failure> {
    runtime()?.block_on(async {
        let enq = enqueuer(&a.conn, &a.pricing).await?;
        let reply = enq
            .emoji_action(&a.user, &a.job_id, action, a.idx)
            .await
            .map_err(enqueue_failure)?;
        action_result(reply)
    })
}

/// Prints the reply; a duplicate or wrong state is exit 1 (nothing was done).
fn action_result(reply: ActionReply) -> Result<(), Failure> {
    print_json(&reply)?;
    match reply {
        ActionReply::Queued { .. } => Ok(()),
        ActionReply::Duplicate { .. } => Err(Failure::Runtime(anyhow::anyhow!(
            "duplicate: the same action was requested less than 30 s ago"
        ))),
        ActionReply::WrongState { message, .. } => Err(Failure::Runtime(anyhow::anyhow!(message))),
    }
}

fn enqueue_set(a: GenerateSetArgs) -> Result<(), Failure> {
    let reference = match &a.image {
        Some(p) => Some(std::fs::read(p).map_err(|e| {
            Failure::Usage(format!("--image {}: cannot read it: {e}", p.display()))
        })?),
        None => None,
    };
    if a.expressions.iter().any(|e| e.trim().is_empty()) {
        return Err(Failure::Usage(
            "--expressions: empty expression in the list".into(),
        ));
    }
    let req = GenerateSet {
        user_id: a.user.clone(),
        subject: a.subject.clone(),
        style: a.style.clone(),
        expressions: a.expressions.iter().map(|e| e.trim().to_string()).collect(),
        seed: a.seed.unwrap_or_else(rand::random),
        model: None,
        reference,
        idempotency_key: a.idempotency_key.clone(),
    };
    runtime()?.block_on(async {
        let enq = enqueuer(&a.conn, &a.pricing).await?;
        let submitted = enq.generate_set(&req).await.map_err(enqueue_failure)?;
        if a.json {
            print_json(&submitted.job)?;
        } else {
            println!("{}", submitted.job.id);
        }
        if let Some(c) = &submitted.charged {
            eprintln!("charged {} credits; balance {}", c.amount, c.balance);
        }
        Ok(())
    })
}

/// `popcon-worker api`.
pub fn api(a: ApiArgs) -> Result<(), Failure> {
    let (conn, file) = a
        .conn
        .resolve()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    let listen = match (a.listen, file.api_setting("listen")) {
        (Some(l), _) => l,
        (None, Some(text)) => text.parse().map_err(|e| {
            Failure::Usage(file.invalid("listen", format!("`{text}`: {e}")).to_string())
        })?,
        (None, None) => std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
    };
    let public_url = a
        .public_url
        .clone()
        .or_else(|| file.api_setting("public_url").map(str::to_string));
    if conn.url_secret.is_none() {
        tracing::warn!(
            "POPCON_URL_SECRET is not set: signed image URLs use a random per-process secret and \
             stop working when this process restarts (and on other API processes)"
        );
    }
    runtime()?.block_on(async move {
        let enq = enqueuer_with(&a.conn, &a.pricing, Duration::from_secs(60)).await?;
        let cfg = ApiConfig {
            public_url,
            signed_url_ttl: a.signed_url_ttl,
            ..ApiConfig::default()
        };
        let state = ApiState::new(enq, cfg)
            .context("preparing the API")
            .map_err(Failure::Runtime)?;
        let (trigger, shutdown) = shutdown_channel();
        state.stop_streams_on(shutdown.clone());
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; finishing requests in flight");
            trigger.trigger();
        });
        // Latency samples wait in the recorder until a scrape folds them into buckets; an API
        // nobody scrapes must not keep them all.
        let upkeep = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.metrics().upkeep();
            }
        });
        let app = popcon_worker::http::with_fallbacks(popcon_worker::http::api::routes(state));
        let limits = popcon_worker::http::HttpLimits {
            header_read: a.http_header_timeout,
            body_read: a.http_body_timeout,
            max_connections: a.http_max_connections as usize,
        };
        let (addr, task) =
            popcon_worker::http::serve::serve_with_limits(listen, app, shutdown, limits)
                .await
                .context("starting the API")
                .map_err(Failure::Runtime)?;
        tracing::info!(%addr, "API ready");
        task.await
            .context("API server task")
            .map_err(Failure::Runtime)?;
        Ok(())
    })
}

/// `popcon-worker users …`.
pub fn users(command: UsersCommand) -> Result<(), Failure> {
    let UsersCommand::Add {
        conn,
        name,
        admin,
        credits,
        json,
    } = command;
    popcon_worker::auth::check_user_name(&name).map_err(Failure::Usage)?;
    runtime()?.block_on(async {
        let store = store(&conn).await?;
        let (_, token) = popcon_worker::auth::add_user(&store, &name, admin, credits)
            .await
            .map_err(|e| match e {
                popcon_worker::store::StoreError::Conflict(_) => {
                    Failure::Usage(format!("user `{name}` already exists"))
                }
                other => Failure::Runtime(anyhow::Error::from(other).context("adding the user")),
            })?;
        if json {
            println!("{}", serde_json::json!({ "user": name, "token": token }));
        } else {
            println!("{token}");
        }
        Ok(())
    })
}

/// `popcon-worker credits …`.
pub fn credits(command: CreditsCommand) -> Result<(), Failure> {
    runtime()?.block_on(async {
        match command {
            CreditsCommand::Show { conn, user } => {
                let store = store(&conn).await?;
                if store
                    .get_user(&user)
                    .await
                    .context("reading the user")
                    .map_err(Failure::Runtime)?
                    .is_none()
                {
                    return Err(Failure::Usage(format!("no user `{user}`")));
                }
                let b = store
                    .balance(&user)
                    .await
                    .context("reading the balance")
                    .map_err(Failure::Runtime)?;
                println!("{b}");
            }
            CreditsCommand::Grant {
                conn,
                user,
                amount,
                reason,
            } => {
                let key = format!("grant:{}", uuid::Uuid::new_v4().simple());
                let out = store(&conn)
                    .await?
                    .grant(&user, amount, &reason, &key)
                    .await
                    .map_err(|e| match e {
                        popcon_worker::store::StoreError::UnknownUser(u) => {
                            Failure::Usage(format!("no user `{u}`"))
                        }
                        other => Failure::Runtime(other.into()),
                    })?;
                println!("{}", out.balance());
            }
        }
        Ok(())
    })
}

/// `popcon-worker off-hours …`.
pub fn off_hours(command: OffHoursCommand) -> Result<(), Failure> {
    runtime()?.block_on(async {
        match command {
            OffHoursCommand::On { conn, ttl } => {
                if ttl.is_zero() {
                    return Err(Failure::Usage("--ttl must be positive".into()));
                }
                if ttl > OFF_HOURS_MAX_TTL {
                    eprintln!(
                        "note: --ttl {} is capped at {}",
                        human(ttl),
                        human(OFF_HOURS_MAX_TTL)
                    );
                }
                let set = queue(&conn)
                    .await?
                    .set_off_hours(ttl)
                    .await
                    .context("setting the flag")
                    .map_err(Failure::Runtime)?;
                println!("off-hours on for {}", human(set));
            }
            OffHoursCommand::Off { conn } => {
                let existed = queue(&conn)
                    .await?
                    .clear_off_hours()
                    .await
                    .context("clearing the flag")
                    .map_err(Failure::Runtime)?;
                println!(
                    "off-hours off{}",
                    if existed { "" } else { " (was not on)" }
                );
            }
            OffHoursCommand::Status { conn } => {
                match queue(&conn)
                    .await?
                    .off_hours_status()
                    .await
                    .context("reading the flag")
                    .map_err(Failure::Runtime)?
                {
                    Some(left) => println!("off-hours on, expires in {}", human(left)),
                    None => println!("off-hours off"),
                }
            }
        }
        Ok(())
    })
}

/// `popcon-worker job show`.
pub fn job(command: JobCommand) -> Result<(), Failure> {
    let JobCommand::Show { conn, job_id, json } = command;
    runtime()?.block_on(async {
        let rec = store(&conn)
            .await?
            .get_job(&job_id)
            .await
            .context("reading the job")
            .map_err(Failure::Runtime)?
            .ok_or_else(|| Failure::Usage(format!("no job `{job_id}`")))?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&rec).map_err(|e| Failure::Runtime(e.into()))?
            );
            return Ok(());
        }
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        println!("id              {}", rec.id);
        println!("user_id         {}", rec.user_id);
        println!("status          {}", rec.status.as_str());
        println!("subject         {}", rec.subject);
        println!("style           {}", opt(&rec.style));
        println!("seed            {}", rec.seed);
        println!("model           {}", opt(&rec.model));
        println!("reference_key   {}", opt(&rec.reference_key));
        println!("pose_key        {}", opt(&rec.pose_key));
        println!("thumbnail_path  {}", opt(&rec.thumbnail_path));
        println!("thumbnail_key   {}", opt(&rec.thumbnail_key));
        println!("created_at      {}", rec.created_at.to_rfc3339());
        println!("updated_at      {}", rec.updated_at.to_rfc3339());
        println!("emoji:");
        println!(
            "  {:<4}{:<14}{:<10}{:<7}{:<9}{:<36}error",
            "idx", "label", "status", "fence", "attempts", "image_key"
        );
        for e in &rec.emoji {
            println!(
                "  {:<4}{:<14}{:<10}{:<7}{:<9}{:<36}{}",
                e.idx,
                e.label,
                e.status.as_str(),
                e.fence,
                e.attempts,
                opt(&e.image_key),
                opt(&e.error)
            );
        }
        Ok(())
    })
}

/// `popcon-worker dead …`.
pub fn dead(command: DeadCommand) -> Result<(), Failure> {
    runtime()?.block_on(async {
        match command {
            DeadCommand::List { conn, count } => {
                let list = queue(&conn)
                    .await?
                    .dead_list(count)
                    .await
                    .context("reading dead letters")
                    .map_err(Failure::Runtime)?;
                if list.is_empty() {
                    println!("no dead letters");
                }
                for d in list {
                    println!(
                        "{}  {}  from {} {}  deliveries {}  reason: {}\n    job: {}",
                        d.id,
                        d.dead_at,
                        d.lane.map_or("?", |l| l.as_str()),
                        d.original_id,
                        d.delivery_count,
                        d.reason,
                        d.fields.get("job").map_or("(none)", String::as_str)
                    );
                }
            }
            DeadCommand::Requeue { conn, id } => {
                match queue(&conn).await?.dead_requeue(&id).await {
                    Ok((lane, new_id)) => {
                        println!("requeued {id} on {} as {new_id}", lane.as_str())
                    }
                    Err(QueueError::NotFound(_) | QueueError::InvalidArgument(_)) => {
                        return Err(Failure::Usage(format!("no dead letter `{id}`")));
                    }
                    Err(e) => {
                        return Err(Failure::Runtime(
                            anyhow::Error::from(e).context("requeueing"),
                        ));
                    }
                }
            }
        }
        Ok(())
    })
}
