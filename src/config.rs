//! Daemon settings: one sub-struct per component, filled from flags, the environment and an
//! optional TOML file.
//!
//! The clap argument structs live here (not in `main.rs`) so that the mapping from flags, env
//! vars (`REDIS_URL`, `DATABASE_URL`, `POPCON_RESULTS`, `POPCON_S3_URL`, `POPCON_MODELS_DIR`,
//! `POPCON_CONFIG`; `HF_HOME` is read by the engine's weight lookup) and the file
//! ([`FileConfig`]) to
//! [`WorkerConfig`] is one tested function, and tests can build a [`WorkerConfig`] directly
//! without flags.
//!
//! Precedence, for every setting: flags > env > the `--config` file > built-in
//! [`defaults`]. clap already puts a flag before its env var; the flags therefore carry no
//! clap defaults (an absent flag is `None`), so the file can fill what neither set.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// Animation preset (`models list`): approve animates with it. Its SD 1.5 base and motion
    /// adapter stay resident beside the image model.
    pub animation: String,
    /// Clips per engine call when approve-all animates a set (memory bounds it: each clip is
    /// `frames` UNet rows, twice that with guidance).
    pub animate_batch: usize,
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
            animation: defaults::ANIMATION.into(),
            animate_batch: 2,
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
    pub reconcile: crate::worker::reconcile::ReconcileConfig,
}

/// Built-in defaults of the settings that flags, env and the file can set.
pub mod defaults {
    pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
    pub const DATABASE_URL: &str = "sqlite:./popcon.db";
    pub const RESULTS: &str = "./results";
    pub const PREFIX: &str = "popcon:";
    pub const MODEL: &str = "tiny";
    pub const ANIMATION: &str = "tiny-motion";
    pub const PREFETCH: u32 = 1;
    pub const GRACE_S: u64 = 25;
    pub const LEASE_S: u64 = 30;
    pub const MAX_DELIVERIES: u32 = 5;
    /// Where `--start-redis` keeps the Redis it starts (append-only file and snapshots).
    pub const REDIS_DATA: &str = "./redis-data";
}

/// A settings file that cannot be used. Every message names the file (and the key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: cannot read it: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad TOML, a value of the wrong type, or an unknown key (toml names the key).
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("config file {}: `{key}`: {message}", path.display())]
    Value {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// The optional TOML settings file (`--config PATH` or `POPCON_CONFIG`).
///
/// Flat keys named like the long flags with `_` for `-` (`redis_url = "redis://…"`,
/// `grace = "25s"`, `http = "127.0.0.1:9000"`). Every key is optional; an unknown key is an
/// error that names it. Precedence: flags > env > this file > built-in defaults. Relative
/// paths are taken from the working directory, as on the command line.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub redis_url: Option<String>,
    pub database_url: Option<String>,
    pub results: Option<PathBuf>,
    pub public_base: Option<String>,
    pub url_secret: Option<String>,
    pub s3_url: Option<String>,
    pub s3_endpoint: Option<String>,
    /// `generate_set=1,retry=1,…` (see `--prices`).
    pub prices: Option<String>,
    /// The API's listen address and public origin (`popcon-worker api`).
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub prefix: Option<String>,
    pub models_dir: Option<PathBuf>,
    pub model: Option<String>,
    pub model_dir: Option<PathBuf>,
    pub device: Option<String>,
    pub steps: Option<u32>,
    pub prefetch: Option<u32>,
    pub animation: Option<String>,
    pub animate_batch: Option<u32>,
    pub http: Option<String>,
    pub grace: Option<String>,
    pub lease: Option<String>,
    pub max_deliveries: Option<u32>,
    pub consumer: Option<String>,
    pub start_redis: Option<bool>,
    pub redis_data: Option<PathBuf>,
}

/// A loaded [`FileConfig`] with the path it came from (for error messages).
#[derive(Debug, Default, Clone)]
pub struct LoadedFile {
    pub path: Option<PathBuf>,
    pub file: FileConfig,
}

impl FileConfig {
    /// Parses TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

impl LoadedFile {
    /// The file at `path`, or an empty one.
    pub fn load(path: Option<&Path>) -> Result<LoadedFile, ConfigError> {
        Ok(match path {
            None => LoadedFile::default(),
            Some(p) => LoadedFile {
                path: Some(p.to_path_buf()),
                file: FileConfig::load(p)?,
            },
        })
    }

    fn bad(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Value {
            path: self.path.clone().unwrap_or_default(),
            key,
            message: message.into(),
        }
    }

    fn duration(
        &self,
        key: &'static str,
        v: &Option<String>,
    ) -> Result<Option<Duration>, ConfigError> {
        v.as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|m| self.bad(key, m))
    }

    fn ranged(
        &self,
        key: &'static str,
        v: Option<u32>,
        range: std::ops::RangeInclusive<u32>,
    ) -> Result<Option<u32>, ConfigError> {
        match v {
            Some(n) if !range.contains(&n) => Err(self.bad(
                key,
                format!("{n} is not in {}..={}", range.start(), range.end()),
            )),
            v => Ok(v),
        }
    }
}

/// Where the daemon and the operator commands find Redis, the database and the results.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectionArgs {
    /// A TOML settings file; flags and env override it [env: POPCON_CONFIG].
    #[arg(long = "config", env = "POPCON_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// [default: redis://127.0.0.1:6379]
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// [default: sqlite:./popcon.db]
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Result images folder [default: ./results].
    #[arg(long, env = "POPCON_RESULTS")]
    pub results: Option<PathBuf>,
    /// Redis key prefix [default: popcon:].
    #[arg(long, env = "POPCON_PREFIX")]
    pub prefix: Option<String>,
    /// Where readers fetch result images: the API's `/files` or a CDN URL [default: /files].
    #[arg(long, env = "POPCON_PUBLIC_BASE")]
    pub public_base: Option<String>,
    /// Secret for signed image URLs, shared by every API process (>= 16 bytes; prefer the env
    /// var or the settings file to a flag) [default: random per process].
    #[arg(long, env = "POPCON_URL_SECRET", hide_env_values = true)]
    pub url_secret: Option<String>,
    /// Store result images in an S3-compatible bucket, `s3://bucket[/prefix]`, instead of the
    /// results folder (credentials and region from the AWS_* variables).
    #[arg(long, env = "POPCON_S3_URL")]
    pub s3_url: Option<String>,
    /// The S3 endpoint, e.g. `https://<account>.r2.cloudflarestorage.com` for R2 [env:
    /// AWS_ENDPOINT also works].
    #[arg(long, env = "POPCON_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// How long an action's claim (the double-click window) lasts when nothing releases it,
    /// e.g. after a crash between claim and reply [default: 30s].
    #[arg(long, env = "POPCON_CLAIM_TTL", value_parser = parse_duration)]
    pub claim_ttl: Option<Duration>,
}

/// [`ConnectionArgs`] resolved against the file and the defaults. Its `Debug` hides the URL
/// secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Connection {
    pub redis_url: String,
    pub database_url: String,
    pub results: PathBuf,
    pub prefix: String,
    pub public_base: String,
    pub url_secret: Option<String>,
    pub s3_url: Option<String>,
    pub s3_endpoint: Option<String>,
    pub claim_ttl: Duration,
}

impl ConnectionArgs {
    /// Loads the settings file (if any) and resolves flags > env > file > defaults.
    pub fn resolve(&self) -> Result<(Connection, LoadedFile), ConfigError> {
        let file = LoadedFile::load(self.config.as_deref())?;
        Ok((self.resolve_with(&file), file))
    }

    /// Resolves against an already loaded file.
    pub fn resolve_with(&self, file: &LoadedFile) -> Connection {
        let f = &file.file;
        Connection {
            claim_ttl: self
                .claim_ttl
                .filter(|d| !d.is_zero())
                .unwrap_or(crate::queue::CLAIM_TTL),
            redis_url: self
                .redis_url
                .clone()
                .or_else(|| f.redis_url.clone())
                .unwrap_or_else(|| defaults::REDIS_URL.into()),
            database_url: self
                .database_url
                .clone()
                .or_else(|| f.database_url.clone())
                .unwrap_or_else(|| defaults::DATABASE_URL.into()),
            results: self
                .results
                .clone()
                .or_else(|| f.results.clone())
                .unwrap_or_else(|| defaults::RESULTS.into()),
            prefix: self
                .prefix
                .clone()
                .or_else(|| f.prefix.clone())
                .unwrap_or_else(|| defaults::PREFIX.into()),
            public_base: self
                .public_base
                .clone()
                .or_else(|| f.public_base.clone())
                .unwrap_or_else(|| crate::blobs::DEFAULT_PUBLIC_BASE.into()),
            url_secret: self.url_secret.clone().or_else(|| f.url_secret.clone()),
            s3_url: self.s3_url.clone().or_else(|| f.s3_url.clone()),
            s3_endpoint: self.s3_endpoint.clone().or_else(|| f.s3_endpoint.clone()),
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("redis_url", &self.redis_url)
            .field("database_url", &self.database_url)
            .field("results", &self.results)
            .field("prefix", &self.prefix)
            .field("public_base", &self.public_base)
            .field("url_secret", &self.url_secret.as_ref().map(|_| "***"))
            .field("s3_url", &self.s3_url)
            .field("s3_endpoint", &self.s3_endpoint)
            .finish()
    }
}

impl LoadedFile {
    /// A string setting of the API side (`prices`, `listen`, `public_url`) from the file.
    pub fn api_setting(&self, key: &'static str) -> Option<&str> {
        let f = &self.file;
        match key {
            "prices" => f.prices.as_deref(),
            "listen" => f.listen.as_deref(),
            "public_url" => f.public_url.as_deref(),
            _ => None,
        }
    }

    /// A bad value of `key` in this file, as an error naming both.
    pub fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        self.bad(key, message)
    }
}

impl Connection {
    /// Queue settings for a short-lived operator command (connect patience: a few seconds).
    pub fn queue_config(&self) -> QueueConfig {
        QueueConfig {
            redis_url: self.redis_url.clone(),
            prefix: self.prefix.clone(),
            connect_patience: Duration::from_secs(5),
            claim_ttl: self.claim_ttl,
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
            public_base: self.public_base.clone(),
            url_secret: self.url_secret.clone(),
            s3: self.s3_url.as_ref().map(|url| crate::blobs::S3Config {
                url: url.clone(),
                endpoint: self.s3_endpoint.clone(),
                // Plain HTTP only when the endpoint says so (a local MinIO or test server).
                allow_http: self
                    .s3_endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
                ..crate::blobs::S3Config::default()
            }),
        }
    }
}

/// `popcon-worker run`. Options left out fall back to the settings file, then the defaults.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: ConnectionArgs,
    /// Model preset [default: tiny].
    #[arg(long)]
    pub model: Option<String>,
    /// A diffusers folder to load instead of the preset's own location.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Denoising steps (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub steps: Option<u32>,
    /// Jobs claimed ahead of the one in the engine (0: one job at a time) [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=8))]
    pub prefetch: Option<u32>,
    /// Animation preset approve animates with (`models list`) [default: tiny-motion].
    #[arg(long)]
    pub animation: Option<String>,
    /// Clips per engine call when approve-all animates a set [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub animate_batch: Option<u32>,
    /// Serve /healthz, /readyz and /metrics here, e.g. 127.0.0.1:9000.
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Time the job in flight gets to finish after SIGTERM/SIGINT [default: 25s].
    #[arg(long, value_parser = parse_duration)]
    pub grace: Option<Duration>,
    /// How long a claimed entry stays ours without renewal [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub lease: Option<Duration>,
    /// Deliveries after which a failing entry is dead-lettered [default: 5].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_deliveries: Option<u32>,
    /// How long a queued job's message may be missing from Redis (streams and pending lists)
    /// while its rows still wait, before it is re-enqueued from the database [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub reconcile_after: Option<Duration>,
    /// How long a committed dispatch may stay unpublished before a worker publishes it
    /// [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    pub relay_after: Option<Duration>,
    /// Consumer name in the group (default: hostname-pid).
    #[arg(long, env = "POPCON_CONSUMER")]
    pub consumer: Option<String>,
    /// If nothing answers at the (local) Redis URL, start `redis-server` there as a child
    /// process with persistence on (`--appendonly yes`), and stop it on exit.
    #[arg(long, env = "POPCON_START_REDIS")]
    pub start_redis: bool,
    /// Data folder of the Redis that --start-redis starts [default: ./redis-data].
    #[arg(long, env = "POPCON_REDIS_DATA")]
    pub redis_data: Option<PathBuf>,
}

/// Everything `popcon-worker run` resolved: the worker's settings and the local Redis to
/// start, if asked.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub worker: WorkerConfig,
    /// `Some(data dir)` when a local `redis-server` should be started if none answers.
    pub start_redis: Option<PathBuf>,
}

impl RunArgs {
    /// Loads the settings file and resolves flags > env > file > defaults. `models_dir` is
    /// the global flag (or `POPCON_MODELS_DIR`).
    pub fn into_config(self, models_dir: Option<PathBuf>) -> Result<RunConfig, ConfigError> {
        let file = LoadedFile::load(self.conn.config.as_deref())?;
        self.into_config_with(models_dir, &file)
    }

    /// [`RunArgs::into_config`] with an already loaded file.
    pub fn into_config_with(
        self,
        models_dir: Option<PathBuf>,
        file: &LoadedFile,
    ) -> Result<RunConfig, ConfigError> {
        let f = &file.file;
        let conn = self.conn.resolve_with(file);
        let file_device = f
            .device
            .as_deref()
            .map(str::parse::<DeviceChoice>)
            .transpose()
            .map_err(|m| file.bad("device", m))?;
        let file_http = f
            .http
            .as_deref()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .map_err(|e| file.bad("http", format!("`{s}`: {e} (e.g. 127.0.0.1:9000)")))
            })
            .transpose()?;
        let steps = self.steps.or(file.ranged("steps", f.steps, 1..=1000)?);
        let prefetch = self
            .prefetch
            .or(file.ranged("prefetch", f.prefetch, 0..=8)?)
            .unwrap_or(defaults::PREFETCH);
        let animate_batch = self
            .animate_batch
            .or(file.ranged("animate_batch", f.animate_batch, 1..=64)?)
            .unwrap_or(2);
        let max_deliveries = self
            .max_deliveries
            .or(file.ranged("max_deliveries", f.max_deliveries, 1..=100)?)
            .unwrap_or(defaults::MAX_DELIVERIES);
        let grace = self
            .grace
            .or(file.duration("grace", &f.grace)?)
            .unwrap_or(Duration::from_secs(defaults::GRACE_S));
        let lease = self
            .lease
            .or(file.duration("lease", &f.lease)?)
            .unwrap_or(Duration::from_secs(defaults::LEASE_S));
        if lease.is_zero() {
            return Err(file.bad("lease", "must be positive"));
        }

        let mut queue = conn.queue_config();
        queue.lease = lease;
        queue.max_deliveries = max_deliveries;
        queue.connect_patience = Duration::from_secs(3600);
        if let Some(c) = self.consumer.or_else(|| f.consumer.clone()) {
            queue.consumer = c;
        }
        let start_redis = (self.start_redis || f.start_redis.unwrap_or(false)).then(|| {
            self.redis_data
                .or_else(|| f.redis_data.clone())
                .unwrap_or_else(|| defaults::REDIS_DATA.into())
        });
        let worker = WorkerConfig {
            store: conn.store_config(),
            blobs: conn.blobs_config(),
            queue,
            engine: EngineConfig {
                model: self
                    .model
                    .or_else(|| f.model.clone())
                    .unwrap_or_else(|| defaults::MODEL.into()),
                models_dir: models_dir
                    .or_else(|| f.models_dir.clone())
                    .unwrap_or_else(PresetRegistry::default_models_dir),
                model_dir: self.model_dir.or_else(|| f.model_dir.clone()),
                device: self.device.or(file_device).unwrap_or(DeviceChoice::Cpu),
                steps: steps.map(|s| s as usize),
                strength: None,
                prefetch: prefetch as usize,
                animation: self
                    .animation
                    .or_else(|| f.animation.clone())
                    .unwrap_or_else(|| defaults::ANIMATION.into()),
                animate_batch: animate_batch as usize,
            },
            http: HttpConfig {
                addr: self.http.or(file_http),
            },
            shutdown: ShutdownConfig { grace },
            retry: RetryConfig::default(),
            reconcile: {
                let mut r = crate::worker::reconcile::ReconcileConfig::default();
                if let Some(d) = self.reconcile_after.filter(|d| !d.is_zero()) {
                    r.lost_after = d;
                }
                if let Some(d) = self.relay_after.filter(|d| !d.is_zero()) {
                    r.relay_after = d;
                    r.every = r.every.min(d);
                }
                r
            },
        };
        Ok(RunConfig {
            worker,
            start_redis,
        })
    }
}

/// `500ms`, `25s`, `5m`, `20h`, `1h 30m` (humantime's syntax), or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..=1e9).contains(&secs) => {
            Duration::from_secs_f64(secs)
        }
        Ok(_) => return Err(format!("`{s}` is out of range")),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("`{s}` is not a duration ({e}; e.g. 500ms, 25s, 5m, 20h)"))?,
    };
    if d > Duration::from_secs(1_000_000_000) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(d)
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
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("5 fortnights").is_err());
        assert!(parse_duration("-3").is_err());
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn args(argv: &[&str]) -> RunArgs {
        use clap::Parser;
        let mut all = vec!["run"];
        all.extend_from_slice(argv);
        Cli::try_parse_from(all).unwrap().run
    }

    fn file(text: &str) -> LoadedFile {
        let path = PathBuf::from("/etc/popcon.toml");
        LoadedFile {
            file: FileConfig::parse(text, &path).unwrap(),
            path: Some(path),
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = args(&[])
            .into_config_with(None, &LoadedFile::default())
            .unwrap();
        assert_eq!(c.worker.queue.redis_url, defaults::REDIS_URL);
        assert_eq!(c.worker.store.url, defaults::DATABASE_URL);
        assert_eq!(c.worker.blobs.root, PathBuf::from(defaults::RESULTS));
        assert_eq!(c.worker.engine.model, "tiny");
        assert_eq!(c.worker.engine.device, DeviceChoice::Cpu);
        assert_eq!(c.worker.engine.prefetch, 1);
        assert_eq!(c.worker.shutdown.grace, Duration::from_secs(25));
        assert_eq!(c.worker.queue.lease, Duration::from_secs(30));
        assert_eq!(c.worker.queue.max_deliveries, 5);
        assert_eq!(c.worker.http.addr, None);
        assert_eq!(c.start_redis, None);
    }

    #[test]
    fn the_file_fills_what_flags_leave_out_and_flags_win() {
        let f = file(
            r#"
            redis_url = "redis://10.0.0.5:6380"
            database_url = "sqlite:/var/lib/popcon.db"
            results = "/srv/results"
            prefix = "staging:"
            models_dir = "/opt/models"
            model = "sd15"
            device = "cuda:1"
            steps = 12
            prefetch = 2
            http = "127.0.0.1:9100"
            grace = "40s"
            lease = "1m"
            max_deliveries = 7
            consumer = "gpu-a"
            start_redis = true
            redis_data = "/var/lib/redis-popcon"
            "#,
        );
        let c = args(&[]).into_config_with(None, &f).unwrap();
        let w = &c.worker;
        assert_eq!(w.queue.redis_url, "redis://10.0.0.5:6380");
        assert_eq!(w.queue.prefix, "staging:");
        assert_eq!(w.store.url, "sqlite:/var/lib/popcon.db");
        assert_eq!(w.blobs.root, PathBuf::from("/srv/results"));
        assert_eq!(w.engine.models_dir, PathBuf::from("/opt/models"));
        assert_eq!(w.engine.model, "sd15");
        assert_eq!(w.engine.device, DeviceChoice::Cuda(1));
        assert_eq!(w.engine.steps, Some(12));
        assert_eq!(w.engine.prefetch, 2);
        assert_eq!(w.http.addr, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(w.shutdown.grace, Duration::from_secs(40));
        assert_eq!(w.queue.lease, Duration::from_secs(60));
        assert_eq!(w.queue.max_deliveries, 7);
        assert_eq!(w.queue.consumer, "gpu-a");
        assert_eq!(c.start_redis, Some(PathBuf::from("/var/lib/redis-popcon")));

        let c = args(&[
            "--redis-url",
            "redis://127.0.0.1:7000",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--grace",
            "5s",
            "--prefetch",
            "0",
        ])
        .into_config_with(Some("/flag/models".into()), &f)
        .unwrap();
        let w = &c.worker;
        assert_eq!(w.queue.redis_url, "redis://127.0.0.1:7000");
        assert_eq!(w.engine.model, "tiny");
        assert_eq!(w.engine.device, DeviceChoice::Cpu);
        assert_eq!(w.engine.models_dir, PathBuf::from("/flag/models"));
        assert_eq!(w.shutdown.grace, Duration::from_secs(5));
        assert_eq!(w.engine.prefetch, 0);
        // Untouched by flags: still the file's.
        assert_eq!(w.store.url, "sqlite:/var/lib/popcon.db");
        assert_eq!(w.queue.lease, Duration::from_secs(60));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_the_key() {
        let path = PathBuf::from("/etc/popcon.toml");
        let e = FileConfig::parse("redis_url = \"redis://x\"\nreddis = 1\n", &path)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/popcon.toml") && e.contains("reddis"),
            "{e}"
        );
        for (text, key) in [
            ("grace = \"forever\"", "grace"),
            ("device = \"tpu\"", "device"),
            ("prefetch = 99", "prefetch"),
            ("http = \"nope\"", "http"),
        ] {
            let e = args(&[])
                .into_config_with(None, &file(text))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("/etc/popcon.toml") && e.contains(&format!("`{key}`")),
                "{text}: {e}"
            );
        }
        let e = LoadedFile::load(Some(Path::new("/nonexistent/popcon.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/popcon.toml"), "{e}");
    }
}
