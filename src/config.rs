//! Daemon settings: one sub-struct per component, filled from flags and the environment.
//!
//! The clap argument structs live here (not in `main.rs`) so that the mapping from flags and
//! env vars (`REDIS_URL`, `DATABASE_URL`, `POPCON_RESULTS`, `POPCON_MODELS_DIR`; `HF_HOME` is
//! read by the engine's weight lookup) to [`WorkerConfig`] is one tested function, and tests
//! can build a [`WorkerConfig`] directly without flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::blobs::BlobsConfig;
use crate::engine::DeviceChoice;
use crate::engine::preset::PresetRegistry;
use crate::queue::QueueConfig;

/// The job database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `sqlite:PATH` or `postgres://…` (env `DATABASE_URL`).
    pub url: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite:./popcon.db".into(),
        }
    }
}

/// The model and how the pipeline drives it.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Preset name (`models list`).
    pub model: String,
    /// Presets folder (env `POPCON_MODELS_DIR`).
    pub models_dir: PathBuf,
    /// A diffusers folder to load instead of the preset's own location.
    pub model_dir: Option<PathBuf>,
    pub device: DeviceChoice,
    /// Denoising steps; `None`: the preset's.
    pub steps: Option<usize>,
    /// img2img strength of the emoji from the pose; `None`: the preset's.
    pub strength: Option<f64>,
    /// Jobs claimed ahead of the one in the engine (so the engine never waits for a claim,
    /// an upload or a database write). 0: strictly one job at a time.
    pub prefetch: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: "tiny".into(),
            models_dir: PresetRegistry::default_models_dir(),
            model_dir: None,
            device: DeviceChoice::Cpu,
            steps: None,
            strength: None,
            prefetch: 1,
        }
    }
}

/// The observability endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None`: not served.
    pub addr: Option<SocketAddr>,
}

/// Stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long the job in flight may take to finish after SIGTERM before it is cancelled and
    /// released to another worker.
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(25),
        }
    }
}

/// Retrying failed work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// First backoff after a retryable failure; doubles per delivery.
    pub base: Duration,
    /// Longest backoff.
    pub max: Duration,
    /// How often idle entries of crashed workers are looked for.
    pub reclaim_every: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(2),
            max: Duration::from_secs(60),
            reclaim_every: Duration::from_secs(5),
        }
    }
}

/// Everything `popcon-worker run` needs.
#[derive(Debug, Clone, Default)]
pub struct WorkerConfig {
    pub queue: QueueConfig,
    pub store: StoreConfig,
    pub blobs: BlobsConfig,
    pub engine: EngineConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub retry: RetryConfig,
}

/// Where the daemon and the operator commands find Redis, the database and the results.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite:./popcon.db")]
    pub database_url: String,
    /// Result images folder.
    #[arg(long, env = "POPCON_RESULTS", default_value = "./results")]
    pub results: PathBuf,
    /// Redis key prefix.
    #[arg(long, env = "POPCON_PREFIX", default_value = "popcon:")]
    pub prefix: String,
}

impl ConnectionArgs {
    /// Queue settings for a short-lived operator command (connect patience: a few seconds).
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            redis_url: self.redis_url.clone(),
            prefix: self.prefix.clone(),
            connect_patience: Duration::from_secs(5),
            ..QueueConfig::default()
        }
    }

    pub fn store_config(&self) -> StoreConfig {
        StoreConfig {
            url: self.database_url.clone(),
        }
    }

    pub fn blobs_config(&self) -> BlobsConfig {
        BlobsConfig {
            root: self.results.clone(),
        }
    }
}

/// `popcon-worker run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: ConnectionArgs,
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// A diffusers folder to load instead of the preset's own location.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Denoising steps (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub steps: Option<u32>,
    /// Jobs claimed ahead of the one in the engine (0: one job at a time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=8))]
    pub prefetch: u32,
    /// Serve /healthz, /readyz and /metrics here, e.g. 127.0.0.1:9000.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Time the job in flight gets to finish after SIGTERM/SIGINT, e.g. 25s.
    #[arg(long, default_value = "25s", value_parser = parse_duration)]
    pub grace: Duration,
    /// How long a claimed entry stays ours without renewal, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,
    /// Deliveries after which a failing entry is dead-lettered.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_deliveries: u32,
    /// Consumer name in the group (default: hostname-pid).
    #[arg(long, env = "POPCON_CONSUMER")]
    pub consumer: Option<String>,
}

impl RunArgs {
    /// The daemon's settings; `models_dir` comes from the global flag.
    pub fn into_config(self, models_dir: PathBuf) -> WorkerConfig {
        let mut queue = self.conn.queue_config();
        queue.lease = self.lease;
        queue.max_deliveries = self.max_deliveries;
        queue.connect_patience = Duration::from_secs(3600);
        if let Some(c) = self.consumer {
            queue.consumer = c;
        }
        WorkerConfig {
            store: self.conn.store_config(),
            blobs: self.conn.blobs_config(),
            queue,
            engine: EngineConfig {
                model: self.model,
                models_dir,
                model_dir: self.model_dir,
                device: self.device,
                steps: self.steps.map(|s| s as usize),
                strength: None,
                prefetch: self.prefetch as usize,
            },
            http: HttpConfig { addr: self.http },
            shutdown: ShutdownConfig { grace: self.grace },
            retry: RetryConfig::default(),
        }
    }
}

/// `500ms`, `25s`, `5m`, `20h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 500ms, 25s, 5m, 20h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("25s").unwrap(), Duration::from_secs(25));
        assert_eq!(parse_duration("20h").unwrap(), Duration::from_secs(72_000));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
