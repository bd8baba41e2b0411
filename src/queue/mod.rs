//! Redis: the work streams and their consumer group, leases, reclaim, dead letters, the
//! run-once guard, the enqueue-side claim keys, and the off-hours / cancel / progress keys.
//! Everything the worker and the enqueue side do with Redis goes through [`Queue`]; the key
//! names are `DESIGN.md`'s table, spelled once in [`keys`].
//!
//! # Delivery, and what makes it safe
//!
//! Delivery is at-least-once: an entry read with `XREADGROUP` stays in the group's pending list
//! (PEL) until `XACK`. A live worker keeps its entry by renewing a [`Lease`] (a self-`XCLAIM …
//! JUSTID` that resets the idle time, only while it still owns the entry); a crashed worker's
//! entry goes idle and [`Queue::reclaim_idle`] (`XAUTOCLAIM`) hands it to another worker after
//! the lease. On start a worker re-reads its own pending entries ([`Queue::own_pending`]).
//!
//! The ack is **not** what makes a stale worker harmless: `XACK` takes no consumer, so a worker
//! whose lease lapsed can still ack an entry someone else re-claimed (field notes). What makes a
//! stale or duplicate delivery harmless is the database fence (`WHERE fence = <message
//! fence>`) plus the run-once key ([`Queue::acquire_run`]) that keeps two workers from spending
//! GPU time on the same action at once. This module gives the worker the tools; the fence
//! lives in the store.
//!
//! # The off-hours gate
//!
//! While `{p}off_hours` exists no costly entry is claimed — not by a new read, not by a reclaim,
//! not by an own-pending re-read — and none is lost: it stays in its stream, undelivered or
//! pending, and is claimed by the first read after the flag is deleted or expires. Once
//! `XREADGROUP >` hands an entry over it is pending, so the gate cannot be "read, then look":
//! every claim runs in a Lua script (`scripts.rs`) that checks the flag, peeks at the exact
//! entry the read would return (`XRANGE` from the group's last-delivered id), and reads it only
//! if it is non-costly — all in one atomic step, so the flag cannot be set between check and
//! claim and no other worker can move the group's cursor in between.
//!
//! Non-costly entries (`approve`, `approve_all`) stay claimable during off-hours when no costly
//! entry is ahead of them in their stream. A stream's group has one cursor, so a non-costly
//! entry queued *behind* a costly one waits with it (head-of-line): jumping the queue would need
//! delivering the costly entry first, which is exactly what the gate forbids. Since the API
//! refuses new costly work during off-hours (429), only entries enqueued before the flag was set
//! can be ahead of a new approve.
//!
//! The flag can only be set with a TTL ([`Queue::set_off_hours`], capped at 20 h); and a flag
//! some other writer left without a TTL is given the 20 h cap by the first claim or status call
//! that sees it (logged as a warning), so a missed "off" can never wedge the system for longer.
//!
//! # Connections
//!
//! Ordinary commands go through a [`ConnectionManager`] (reconnects by itself). The blocking
//! wait for new entries (`XREAD … BLOCK`) runs on a second, separate manager whose response
//! timeout exceeds the block time: redis-rs async connections time out after 500 ms by default,
//! and a blocking command would also stall every command multiplexed behind it. The manager
//! does not resend a command that failed on a dropped connection, and neither does this module
//! for anything non-idempotent (`XADD`, `SET NX`, claims); idempotent reads and overwrites are
//! retried a couple of times ([`Queue::query_idem`]).

mod error;
pub mod keys;
mod reply;
mod scripts;
mod streams;
mod values;

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Value};
use tokio::sync::Mutex;

pub use error::{QueueError, Result};
pub use keys::{GROUP, Keys};
pub use streams::{
    DEAD_META, DeadLetter, DeadLetterOutcome, DeletedEntry, Delivery, LaneDepth, Lease,
    LeaseStatus, OwnedOutcome, QueueDepth, Taken,
};
pub use values::{CLAIM_TTL, EmojiProgress, JobProgress, OFF_HOURS_MAX_TTL, RunGuard};

use crate::job::Lane;

/// Settings for [`Queue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// `redis://host:port/db` (env `REDIS_URL` in the daemon).
    pub redis_url: String,
    /// Key prefix (`popcon:`).
    pub prefix: String,
    /// This worker's consumer name in the group: one per worker process, stable across restarts
    /// of the same process slot so [`Queue::own_pending`] finds its entries again.
    pub consumer: String,
    /// How long a claimed entry (and a run-once key) stays ours without renewal.
    pub lease: Duration,
    /// Longest single `XREAD … BLOCK` wait for new entries.
    pub block: Duration,
    /// Deliveries after which a failing entry is dead-lettered.
    pub max_deliveries: u32,
    /// Response timeout for ordinary commands.
    pub response_timeout: Duration,
    /// How long [`Queue::connect`] keeps retrying an unreachable Redis before giving up.
    pub connect_patience: Duration,
    /// Time to live of a job's progress hash after its last update.
    pub progress_ttl: Duration,
    /// How long an enqueue-side claim (the double-click window) lives when it is not
    /// released: after an `api` crash it is what keeps the next click waiting.
    pub claim_ttl: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://127.0.0.1:6379".into(),
            prefix: keys::DEFAULT_PREFIX.into(),
            consumer: default_consumer(),
            lease: Duration::from_secs(30),
            block: Duration::from_secs(5),
            max_deliveries: 5,
            response_timeout: Duration::from_secs(2),
            connect_patience: Duration::from_secs(60),
            progress_ttl: Duration::from_secs(24 * 3600),
            claim_ttl: values::CLAIM_TTL,
        }
    }
}

/// `{hostname}-{pid}`: unique per process on a host; stable for a container's pid 1.
pub fn default_consumer() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

impl QueueConfig {
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(QueueError::Config(m.to_string()));
        if self.consumer.is_empty() || self.consumer.chars().any(char::is_whitespace) {
            return bad("the consumer name must be non-empty and contain no whitespace");
        }
        if self.lease < Duration::from_millis(100) {
            return bad("the lease must be at least 100 ms");
        }
        if self.max_deliveries == 0 {
            return bad("max_deliveries must be at least 1");
        }
        if self.response_timeout.is_zero() {
            return bad("the response timeout must be positive");
        }
        if self.progress_ttl < Duration::from_secs(1) {
            return bad("the progress TTL must be at least 1 s");
        }
        Ok(())
    }
}

/// Something about the Redis server that puts queued work at risk; the worker logs these loudly
/// at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerWarning {
    /// Neither RDB snapshots (`save` empty) nor the append-only file: a restart loses every
    /// queued and pending job.
    NoPersistence,
    /// `maxmemory-policy` other than `noeviction`: under memory pressure Redis may delete
    /// streams, run-once keys or the off-hours flag.
    EvictingPolicy(String),
    /// Older than 6.2: `XAUTOCLAIM` and `XPENDING … IDLE` are missing.
    OldVersion(String),
    /// `CONFIG GET` / `INFO` refused (managed Redis): the checks could not run.
    Unchecked(String),
}

impl std::fmt::Display for ServerWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerWarning::NoPersistence => f.write_str(
                "redis has no persistence (save \"\" and appendonly no): a restart loses all queued and pending jobs",
            ),
            ServerWarning::EvictingPolicy(p) => write!(
                f,
                "redis maxmemory-policy is `{p}`: under memory pressure it may evict queue streams, run-once keys or the off-hours flag; use noeviction"
            ),
            ServerWarning::OldVersion(v) => {
                write!(f, "redis {v} is older than 6.2: XAUTOCLAIM and XPENDING IDLE are missing")
            }
            ServerWarning::Unchecked(e) => write!(f, "could not check the redis configuration: {e}"),
        }
    }
}

/// The queue: cheap to clone (connections are shared).
#[derive(Clone)]
pub struct Queue {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    cfg: QueueConfig,
    keys: Keys,
    conn: ConnectionManager,
    /// Only for `XREAD … BLOCK`; serialized so each wait gets its own full response timeout.
    blocking: Mutex<ConnectionManager>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("redis_url", &redact(&self.inner.cfg.redis_url))
            .field("prefix", &self.inner.cfg.prefix)
            .field("consumer", &self.inner.cfg.consumer)
            .finish()
    }
}

use crate::redact::redact_url as redact;

impl Queue {
    /// Connects, retrying with exponential backoff (100 ms doubling to 5 s, with jitter) for up
    /// to `connect_patience`, logging each failed attempt; then creates the consumer groups.
    /// A permanent problem (bad URL, authentication) fails at once.
    pub async fn connect(cfg: QueueConfig) -> Result<Queue> {
        cfg.validate()?;
        let client = Client::open(cfg.redis_url.as_str())
            .map_err(|e| QueueError::Config(format!("bad redis URL: {e}")))?;
        let url = redact(&cfg.redis_url);
        let started = Instant::now();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let probe_cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(cfg.response_timeout));
        let probe = || async {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut c = client
                .get_multiplexed_async_connection_with_config(&probe_cfg)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut c).await
        };
        {
            use backon::Retryable;
            let backoff = backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(5))
                .with_jitter()
                .without_max_times()
                .with_total_delay(Some(cfg.connect_patience));
            let probed = probe
                .retry(backoff)
                .when(error::redis_retryable)
                .notify(|e, after| {
                    tracing::warn!(%url, attempts = attempts.load(std::sync::atomic::Ordering::Relaxed), retry_in = ?after, error = %e, "redis is unreachable; retrying");
                })
                .await;
            match probed {
                Ok(_) => {}
                Err(e) if !error::redis_retryable(&e) => return Err(QueueError::Redis(e)),
                Err(e) => {
                    let waited = started.elapsed();
                    let attempts = attempts.load(std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(%url, attempts, ?waited, error = %e, "redis is unreachable; giving up");
                    return Err(QueueError::Unavailable {
                        url,
                        attempts,
                        waited,
                        source: e,
                    });
                }
            }
        }
        let manager_cfg = |response: Duration| {
            ConnectionManagerConfig::new()
                .set_number_of_retries(4)
                .set_min_delay(Duration::from_millis(100))
                .set_max_delay(Duration::from_secs(2))
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(response))
        };
        let conn =
            ConnectionManager::new_with_config(client.clone(), manager_cfg(cfg.response_timeout))
                .await?;
        let blocking_timeout = cfg.block + cfg.response_timeout + Duration::from_secs(1);
        let blocking =
            ConnectionManager::new_lazy_with_config(client, manager_cfg(blocking_timeout))?;
        let queue = Queue {
            inner: std::sync::Arc::new(Inner {
                keys: Keys::new(cfg.prefix.clone()),
                cfg,
                conn,
                blocking: Mutex::new(blocking),
            }),
        };
        queue.ensure_groups().await?;
        Ok(queue)
    }

    pub fn config(&self) -> &QueueConfig {
        &self.inner.cfg
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// A handle on the ordinary connection (a cheap clone), for callers with needs of their own.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Creates the `workers` group on both streams if missing (`BUSYGROUP` is fine).
    ///
    /// The group starts at id `0`, not `$`: a stream that already exists without the group
    /// holds entries no worker has seen — enqueued before the first worker ever started, or
    /// after a Redis restart without persistence recreated the stream before the group — and `$`
    /// would skip them for good. If the group was deleted by hand, `0` re-delivers old entries;
    /// the fence turns those into `superseded` without GPU work.
    pub async fn ensure_groups(&self) -> Result<()> {
        for lane in keys::LANES {
            let stream = self.inner.keys.stream(lane);
            let r = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&stream)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async::<()>(&mut self.connection())
                .await;
            match r {
                Ok(()) => tracing::info!(%stream, group = GROUP, "created consumer group"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Checks that Redis keeps queued work safe; see [`ServerWarning`].
    pub async fn check_server(&self) -> Result<Vec<ServerWarning>> {
        let mut warnings = Vec::new();
        let config = async {
            let save = self.config_get("save").await?;
            let aof = self.config_get("appendonly").await?;
            let policy = self.config_get("maxmemory-policy").await?;
            Ok::<_, QueueError>((save, aof, policy))
        };
        match config.await {
            Ok((save, aof, policy)) => {
                if save.trim().is_empty() && aof.trim().eq_ignore_ascii_case("no") {
                    warnings.push(ServerWarning::NoPersistence);
                }
                if !policy.trim().eq_ignore_ascii_case("noeviction") {
                    warnings.push(ServerWarning::EvictingPolicy(policy.trim().to_string()));
                }
            }
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => warnings.push(ServerWarning::Unchecked(e.to_string())),
        }
        match self
            .query_idem::<String>(redis::cmd("INFO").arg("server"))
            .await
        {
            Ok(info) => {
                let version = info
                    .lines()
                    .find_map(|l| l.strip_prefix("redis_version:"))
                    .map(|v| v.trim().to_string());
                if let Some(v) = version {
                    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
                    let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
                    if (major, minor) < (6, 2) {
                        warnings.push(ServerWarning::OldVersion(v));
                    }
                }
            }
            Err(e) if e.is_retryable() => return Err(e),
            Err(e) => warnings.push(ServerWarning::Unchecked(e.to_string())),
        }
        for w in &warnings {
            tracing::warn!(warning = %w, "redis configuration puts queued work at risk");
        }
        Ok(warnings)
    }

    async fn config_get(&self, name: &str) -> Result<String> {
        let v: Value = self
            .query_idem(redis::cmd("CONFIG").arg("GET").arg(name))
            .await?;
        let pairs = reply::pairs("CONFIG GET", &v)?;
        pairs
            .into_iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| reply::string(&v))
            .ok_or_else(|| QueueError::protocol("CONFIG GET", format!("no value for `{name}`")))
    }

    /// Runs an idempotent command (a read, or an overwrite whose repeat changes nothing),
    /// retrying up to twice more on a retryable error. Never use it for `XADD`, `SET NX` or a
    /// claim.
    pub async fn query_idem<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        use backon::Retryable;
        let send = || async { cmd.query_async::<T>(&mut self.connection()).await };
        Ok(send
            .retry(idem_backoff())
            .when(error::redis_retryable)
            .notify(|e, after| tracing::debug!(error = %e, ?after, "retrying an idempotent redis command"))
            .await?)
    }

    /// Runs a non-idempotent command (`XADD`, `SET NX`), retried only when the connection
    /// was found stale — dropped or refused before the command could be sent, which is what
    /// the connection manager hands out on the first command after Redis came back. It
    /// reconnects meanwhile, so the retry runs on a fresh connection instead of the click
    /// failing with a stale error. A timeout is never retried: the command may have run.
    pub(crate) async fn query_write<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        use backon::Retryable;
        let send = || async { cmd.query_async::<T>(&mut self.connection()).await };
        Ok(send
            .retry(stale_backoff())
            .when(is_stale)
            .notify(|e, after| tracing::debug!(error = %e, ?after, "stale redis connection; retrying on a fresh one"))
            .await?)
    }

    /// A script invocation with [`Queue::query_write`]'s stale-connection retry.
    pub(crate) async fn invoke_fresh<T: FromRedisValue>(
        &self,
        inv: &redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        use backon::Retryable;
        let send = || async { inv.invoke_async::<T>(&mut self.connection()).await };
        Ok(send
            .retry(stale_backoff())
            .when(is_stale)
            .notify(|e, after| tracing::debug!(error = %e, ?after, "stale redis connection; retrying on a fresh one"))
            .await?)
    }

    fn stream(&self, lane: Lane) -> String {
        self.inner.keys.stream(lane)
    }
}

/// An idempotent command is tried three times in all: 50 ms, then 200 ms apart.
pub(crate) fn idem_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_factor(4.0)
        .with_max_times(2)
}

/// The connection manager reconnects in the background after a dropped connection; a few
/// short waits cover that.
fn stale_backoff() -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(500))
        .with_max_times(5)
        .with_jitter()
}

/// A connection found dead or refused (not a timeout: then the command may have run).
fn is_stale(e: &redis::RedisError) -> bool {
    !e.is_timeout() && (e.is_connection_dropped() || e.is_connection_refusal())
}

/// Job ids become parts of key names: the same rule as the message validation
/// (1–128 characters of `[A-Za-z0-9_-]`), so no id can reach into another key.
pub(crate) fn check_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(QueueError::InvalidArgument(format!(
            "{what} `{id}` is not 1-128 characters of [A-Za-z0-9_-]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_and_redaction() {
        assert!(QueueConfig::default().validate().is_ok());
        let bad = QueueConfig {
            lease: Duration::ZERO,
            ..QueueConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = QueueConfig {
            consumer: "a b".into(),
            ..QueueConfig::default()
        };
        assert!(bad.validate().is_err());
        assert_eq!(redact("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        assert!(check_id("job id", "j-1_A").is_ok());
        assert!(check_id("job id", "a:b").is_err());
        assert!(check_id("job id", "").is_err());
    }
}
