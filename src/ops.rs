//! The binary's daemon and operator commands: `run`, `enqueue`, `off-hours`, `job`, `dead`.
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
use popcon_worker::config::{Connection, ConnectionArgs, RunConfig, parse_duration};
use popcon_worker::enqueue::{self, GenerateSet};
use popcon_worker::http::HttpState;
use popcon_worker::queue::{OFF_HOURS_MAX_TTL, Queue, QueueError};
use popcon_worker::store::Store;
use popcon_worker::worker::{Worker, shutdown_channel};

use super::Failure;

#[derive(Subcommand, Debug)]
pub enum EnqueueCommand {
    /// Create a job with its pending emoji rows and add it to the bulk stream.
    GenerateSet(GenerateSetArgs),
}

#[derive(Args, Debug)]
pub struct GenerateSetArgs {
    #[command(flatten)]
    conn: ConnectionArgs,
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

/// `popcon-worker enqueue …`.
pub fn enqueue(command: EnqueueCommand) -> Result<(), Failure> {
    let EnqueueCommand::GenerateSet(a) = command;
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
    };
    runtime()?.block_on(async {
        let store = store(&a.conn).await?;
        let queue = queue(&a.conn).await?;
        let blobs = Blobs::open(&connection(&a.conn)?.blobs_config())
            .context("opening the results folder")
            .map_err(Failure::Runtime)?;
        let rec = enqueue::generate_set(&store, &queue, &blobs, &req)
            .await
            .map_err(|e| {
                if e.is_bad_input() {
                    Failure::Usage(e.to_string())
                } else {
                    Failure::Runtime(e.into())
                }
            })?;
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&rec).map_err(|e| Failure::Runtime(e.into()))?
            );
        } else {
            println!("{}", rec.id);
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
