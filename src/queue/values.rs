//! The plain keys: the enqueue side's claim keys, the worker's run-once keys, the off-hours
//! flag, cancellation and progress.
//!
//! The off-hours flag is the seed's second incident: it was set by one system and cleared by
//! another, the clearing cron was late, and the API answered 429 for hours. So there is no way
//! to set it here without a TTL, the TTL is capped at 20 h ([`OFF_HOURS_MAX_TTL`]), and a flag
//! found without one (written by something else) is given the cap.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::Value;
use redis::aio::ConnectionManager;

use super::error::{QueueError, Result, redis_retryable};
use super::{Queue, check_id, reply, scripts};
use crate::job::{Action, ValidJob};

/// The longest the off-hours flag may live: 20 h (the 18 h 35 min window plus cron slack).
pub const OFF_HOURS_MAX_TTL: Duration = Duration::from_secs(72_000);

/// Lifetime of an enqueue-side claim key (`SET NX EX 30`): if the handler dies, the user can
/// click again after this.
pub const CLAIM_TTL: Duration = Duration::from_secs(30);

/// Progress of one emoji (or of the whole set, for stages before the emoji, such as the pose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmojiProgress {
    pub step: u32,
    pub total: u32,
    pub stage: String,
}

/// `{p}progress:{job_id}` read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobProgress {
    /// Whole-set progress (`set:*` fields), e.g. the pose image of a generate-set.
    pub set: Option<EmojiProgress>,
    /// Per emoji index (`{idx}:*` fields).
    pub emoji: BTreeMap<u32, EmojiProgress>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// The worker's run-once key `{p}run:{job_id}:{action}:{idx}`, held with a random token.
/// Only the holder (same token) can renew or release it; it expires after the lease if the
/// holder dies.
#[derive(Clone)]
pub struct RunGuard {
    key: String,
    token: String,
    ttl: Duration,
    conn: ConnectionManager,
}

impl std::fmt::Debug for RunGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunGuard")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl RunGuard {
    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Extends the key by the lease if it is still ours (compare-and-`PEXPIRE`).
    pub async fn renew(&self) -> Result<bool> {
        let mut inv = scripts::RUN_RENEW_SCRIPT.prepare_invoke();
        inv.key(&self.key)
            .arg(&self.token)
            .arg(self.ttl.as_millis().min(u128::from(u64::MAX)) as u64);
        let n: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(n == 1)
    }

    /// Deletes the key if it is still ours (compare-and-`DEL`).
    pub async fn release(&self) -> Result<bool> {
        let mut inv = scripts::RUN_RELEASE_SCRIPT.prepare_invoke();
        inv.key(&self.key).arg(&self.token);
        let n: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(n == 1)
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

impl Queue {
    /// Takes the run-once key for `job`: `SET {p}run:… <token> NX PX <lease>`. `None` when
    /// another holder has it. If the reply is lost on a dropped connection, the key is read back
    /// to learn whether this token won (the `SET` itself is never resent).
    pub async fn acquire_run(&self, job: &ValidJob) -> Result<Option<RunGuard>> {
        let key = self.keys().run(job);
        let token = uuid::Uuid::new_v4().to_string();
        let ttl = self.config().lease;
        let set = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async::<Option<String>>(&mut self.connection())
            .await;
        let won = match set {
            Ok(v) => v.is_some(),
            Err(e) if redis_retryable(&e) => {
                let held: Option<String> = self.query_idem(redis::cmd("GET").arg(&key)).await?;
                held.as_deref() == Some(token.as_str())
            }
            Err(e) => return Err(e.into()),
        };
        Ok(won.then(|| RunGuard {
            key,
            token,
            ttl,
            conn: self.connection(),
        }))
    }

    /// The enqueue side's double-click guard (seed, layer 1):
    /// `SET {p}claim:{job_id}:{action}-{idx} 1 NX EX 30`. `true` = this caller won.
    /// `idx` is `None` for whole-set actions (`approve_all`), which use the suffix `all`.
    pub async fn try_claim_action(
        &self,
        job_id: &str,
        action: Action,
        idx: Option<u32>,
    ) -> Result<bool> {
        check_id("job id", job_id)?;
        // After a reset mid-reply the retry may meet our own claim and answer "duplicate":
        // conservative, and only after a connection fault.
        let v: Option<String> = self
            .query_write(
                redis::cmd("SET")
                    .arg(self.keys().claim(job_id, action, idx))
                    .arg("1")
                    .arg("NX")
                    .arg("PX")
                    .arg(self.config().claim_ttl.as_millis().max(1) as u64),
            )
            .await?;
        Ok(v.is_some())
    }

    /// Takes the `{prefix}lock:{name}` pass lock for `hold` if nobody holds it (one worker
    /// runs a periodic pass at a time; the lock expires by itself, so a dead holder never
    /// blocks the others for longer than `hold`).
    pub async fn try_lock_pass(&self, name: &str, hold: Duration) -> Result<bool> {
        let ms = (hold.as_millis() as u64 * 9 / 10).max(100);
        let v: Option<String> = redis::cmd("SET")
            .arg(format!("{}lock:{name}", self.keys().prefix()))
            .arg(&self.config().consumer)
            .arg("NX")
            .arg("PX")
            .arg(ms)
            .query_async(&mut self.connection())
            .await?;
        Ok(v.is_some())
    }

    /// Drops a claim key (compensating rollback). Returns whether it existed.
    pub async fn release_claim(
        &self,
        job_id: &str,
        action: Action,
        idx: Option<u32>,
    ) -> Result<bool> {
        check_id("job id", job_id)?;
        let n: i64 = self
            .query_idem(redis::cmd("DEL").arg(self.keys().claim(job_id, action, idx)))
            .await?;
        Ok(n > 0)
    }

    /// Sets `{p}off_hours` to `true` with a TTL — the only way this crate sets it. The TTL is
    /// capped at [`OFF_HOURS_MAX_TTL`]; returns the TTL actually set. A zero TTL is refused.
    pub async fn set_off_hours(&self, ttl: Duration) -> Result<Duration> {
        if ttl < Duration::from_millis(1) {
            return Err(QueueError::InvalidArgument(
                "the off-hours flag needs a positive TTL".into(),
            ));
        }
        let ttl = ttl.min(OFF_HOURS_MAX_TTL);
        let ttl = Duration::from_millis(ms(ttl));
        self.query_idem::<()>(
            redis::cmd("SET")
                .arg(self.keys().off_hours())
                .arg("true")
                .arg("PX")
                .arg(ms(ttl)),
        )
        .await?;
        tracing::info!(ttl_s = ttl.as_secs_f64(), "off-hours on");
        Ok(ttl)
    }

    /// Deletes the flag. Returns whether it existed.
    pub async fn clear_off_hours(&self) -> Result<bool> {
        let n: i64 = self
            .query_idem(redis::cmd("DEL").arg(self.keys().off_hours()))
            .await?;
        tracing::info!(existed = n > 0, "off-hours off");
        Ok(n > 0)
    }

    /// `Some(remaining)` while the flag exists, `None` when it does not. A flag found without a
    /// TTL is given [`OFF_HOURS_MAX_TTL`] first (and a warning is logged).
    pub async fn off_hours_status(&self) -> Result<Option<Duration>> {
        let mut inv = scripts::OFF_HOURS_STATUS_SCRIPT.prepare_invoke();
        inv.key(self.keys().off_hours()).arg(ms(OFF_HOURS_MAX_TTL));
        let v: Value = self.invoke_fresh(&inv).await?;
        let a = reply::req_array("off-hours status", Some(&v))?;
        if reply::req_int("off-hours status", a.get(1))? == 1 {
            self.warn_healed();
        }
        let ttl = reply::req_int("off-hours status", a.first())?;
        Ok((ttl >= 0).then(|| Duration::from_millis(ttl as u64)))
    }

    /// Asks the worker running `job_id` to stop at the next step: `{p}cancel:{job_id}` with a TTL.
    pub async fn request_cancel(&self, job_id: &str, ttl: Duration) -> Result<()> {
        check_id("job id", job_id)?;
        if ttl < Duration::from_millis(1) {
            return Err(QueueError::InvalidArgument(
                "a cancel request needs a positive TTL".into(),
            ));
        }
        self.query_idem::<()>(
            redis::cmd("SET")
                .arg(self.keys().cancel(job_id))
                .arg("1")
                .arg("PX")
                .arg(ms(ttl)),
        )
        .await
    }

    pub async fn is_cancelled(&self, job_id: &str) -> Result<bool> {
        check_id("job id", job_id)?;
        let n: i64 = self
            .query_idem(redis::cmd("EXISTS").arg(self.keys().cancel(job_id)))
            .await?;
        Ok(n > 0)
    }

    pub async fn clear_cancel(&self, job_id: &str) -> Result<()> {
        check_id("job id", job_id)?;
        self.query_idem::<i64>(redis::cmd("DEL").arg(self.keys().cancel(job_id)))
            .await
            .map(|_| ())
    }

    /// Records progress in `{p}progress:{job_id}`: fields `{idx}:step`, `{idx}:total`,
    /// `{idx}:stage` (`set:` instead of `{idx}:` when `idx` is `None`) and `updated_at`, and
    /// renews the hash's TTL — in one `MULTI`.
    pub async fn set_progress(
        &self,
        job_id: &str,
        idx: Option<u32>,
        step: u32,
        total: u32,
        stage: &str,
    ) -> Result<()> {
        check_id("job id", job_id)?;
        let key = self.keys().progress(job_id);
        let slot = idx.map_or_else(|| "set".to_string(), |i| i.to_string());
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HSET")
            .arg(&key)
            .arg(format!("{slot}:step"))
            .arg(step)
            .arg(format!("{slot}:total"))
            .arg(total)
            .arg(format!("{slot}:stage"))
            .arg(stage)
            .arg("updated_at")
            .arg(now)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ms(self.config().progress_ttl))
            .ignore();
        // Idempotent (overwrites), so a retry is harmless.
        use backon::Retryable;
        let send = || async { pipe.query_async::<()>(&mut self.connection()).await };
        Ok(send
            .retry(super::idem_backoff())
            .when(redis_retryable)
            .await?)
    }

    pub async fn get_progress(&self, job_id: &str) -> Result<JobProgress> {
        check_id("job id", job_id)?;
        let v: Value = self
            .query_idem(redis::cmd("HGETALL").arg(self.keys().progress(job_id)))
            .await?;
        let mut out = JobProgress::default();
        for (field, value) in reply::pairs("HGETALL", &v)? {
            let value = reply::string(&value).unwrap_or_default();
            if field == "updated_at" {
                out.updated_at = DateTime::parse_from_rfc3339(&value)
                    .ok()
                    .map(|t| t.with_timezone(&Utc));
                continue;
            }
            let Some((slot, what)) = field.split_once(':') else {
                continue;
            };
            let entry = if slot == "set" {
                out.set.get_or_insert_with(empty_progress)
            } else if let Ok(i) = slot.parse::<u32>() {
                out.emoji.entry(i).or_insert_with(empty_progress)
            } else {
                continue;
            };
            match what {
                "step" => entry.step = value.parse().unwrap_or(0),
                "total" => entry.total = value.parse().unwrap_or(0),
                "stage" => entry.stage = value,
                _ => {}
            }
        }
        Ok(out)
    }
}

fn empty_progress() -> EmojiProgress {
    EmojiProgress {
        step: 0,
        total: 0,
        stage: String::new(),
    }
}
