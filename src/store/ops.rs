// The store's operations, written once and compiled into each backend module (`mod ops {
// include!("ops.rs"); }` in `sqlite.rs` and `postgres.rs`). Each backend provides, under the
// same names: `Db` (the sqlx database), `DbRow`, `Imp` (its store struct, with a `pool`), the
// `sql` constants that differ between the databases, and the `ts` / `get_ts` / `text_list`
// parameter helpers. Writing the logic once keeps the two backends from drifting apart (the
// conformance suite then checks they behave alike); compiling it per backend keeps it on
// concrete sqlx types instead of a wall of generic `Executor` bounds.
//
// Conventions that every write follows, and why:
// - Writes run in `begin_write()` transactions (`BEGIN IMMEDIATE` on SQLite: the write lock is
//   taken up front, so a transaction never fails half way on a lock upgrade).
// - Any transaction that touches emoji rows first locks the job row (`sql::LOCK_JOB`: `FOR
//   UPDATE` on Postgres; SQLite's write lock already serializes). One lock order, job then
//   emoji, everywhere: no deadlocks, and job settlement sees every committed sibling.
// - Conditional writes decide in the `WHERE` clause (fence, allowed statuses), never by a read
//   followed by a write; the read after a miss only explains the miss, inside the same
//   transaction.
// - Early returns roll back explicitly rather than leaving it to `Drop`, so a pooled SQLite
//   connection never goes back to the pool holding the write lock.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::{Row, Transaction};

use super::{Db, DbRow, Imp, get_opt_ts, get_ts, sql, text_list, ts};
use crate::job::{self, Action, EmojiStatus, JobStatus};
use crate::store::{
    Charge, Charged, EmojiOutcome, EmojiRecord, JobRecord, LedgerOutcome, NewJob, OutboxEntry,
    OutboxStats, PreflipOutcome,
    RefundOutcome, StartOutcome, StoreError, StoreResult, UserRecord, WriteOutcome, now,
    parse_emoji_status, parse_job_status, seed_from_db, seed_to_db, stored_u32, stored_u64,
};

type Tx = Transaction<'static, Db>;

/// Why a fenced conditional write matched no row.
enum Miss {
    Missing,
    Superseded(u64),
    WrongState(EmojiStatus),
}

impl From<Miss> for StartOutcome {
    fn from(m: Miss) -> Self {
        match m {
            Miss::Missing => StartOutcome::Missing,
            Miss::Superseded(f) => StartOutcome::Superseded { current_fence: f },
            Miss::WrongState(s) => StartOutcome::WrongState(s),
        }
    }
}

impl From<Miss> for WriteOutcome {
    fn from(m: Miss) -> Self {
        match m {
            Miss::Missing => WriteOutcome::Missing,
            Miss::Superseded(f) => WriteOutcome::Superseded { current_fence: f },
            Miss::WrongState(s) => WriteOutcome::WrongState(s),
        }
    }
}

fn user_from_row(row: &DbRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        id: row.try_get("id")?,
        token_hash: row.try_get("token_hash")?,
        is_admin: row.try_get("is_admin")?,
        created_at: get_ts(row, "created_at")?,
    })
}

fn job_from_row(row: &DbRow) -> StoreResult<JobRecord> {
    Ok(JobRecord {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        status: parse_job_status(&row.try_get::<String, _>("status")?)?,
        subject: row.try_get("subject")?,
        style: row.try_get("style")?,
        seed: seed_from_db(row.try_get("seed")?),
        model: row.try_get("model")?,
        reference_key: row.try_get("reference_key")?,
        pose_key: row.try_get("pose_key")?,
        thumbnail_path: row.try_get("thumbnail_path")?,
        thumbnail_key: row.try_get("thumbnail_key")?,
        created_at: get_ts(row, "created_at")?,
        updated_at: get_ts(row, "updated_at")?,
        emoji: Vec::new(),
    })
}

fn emoji_from_row(row: &DbRow) -> StoreResult<EmojiRecord> {
    Ok(EmojiRecord {
        job_id: row.try_get("job_id")?,
        idx: stored_u32(row.try_get("idx")?, "emoji index")?,
        label: row.try_get("label")?,
        status: parse_emoji_status(&row.try_get::<String, _>("status")?)?,
        fence: stored_u64(row.try_get("fence")?, "fence")?,
        image_key: row.try_get("image_key")?,
        seed: row.try_get::<Option<i64>, _>("seed")?.map(seed_from_db),
        attempts: stored_u32(row.try_get("attempts")?, "attempts")?,
        error: row.try_get("error")?,
        animation_key: row.try_get("animation_key")?,
        updated_at: get_ts(row, "updated_at")?,
    })
}

/// Locks the job row for the rest of the transaction; false when there is no such job.
async fn lock_job(tx: &mut Tx, job_id: &str) -> StoreResult<bool> {
    Ok(sqlx::query(sql::LOCK_JOB)
        .bind(job_id)
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
}

/// Explains why a fenced write on (job, idx) matched nothing: no row, a newer fence, or a
/// status the write does not apply to.
async fn explain_miss(tx: &mut Tx, job_id: &str, idx: u32, fence: i64) -> StoreResult<Miss> {
    let row = sqlx::query("SELECT status, fence FROM emoji_results WHERE job_id = $1 AND idx = $2")
        .bind(job_id)
        .bind(i64::from(idx))
        .fetch_optional(&mut **tx)
        .await?;
    let Some(row) = row else {
        return Ok(Miss::Missing);
    };
    let current: i64 = row.try_get("fence")?;
    if current != fence {
        return Ok(Miss::Superseded(stored_u64(current, "fence")?));
    }
    Ok(Miss::WrongState(parse_emoji_status(
        &row.try_get::<String, _>("status")?,
    )?))
}

/// Derives the job's status from all its emoji rows and stores it when every row has settled.
/// Runs under the job lock, so it sees every sibling write committed before ours.
async fn settle(tx: &mut Tx, job_id: &str, now: DateTime<Utc>) -> StoreResult<Option<JobStatus>> {
    let rows = sqlx::query("SELECT status FROM emoji_results WHERE job_id = $1")
        .bind(job_id)
        .fetch_all(&mut **tx)
        .await?;
    let statuses = rows
        .iter()
        .map(|r| parse_emoji_status(&r.try_get::<String, _>("status")?))
        .collect::<StoreResult<Vec<_>>>()?;
    let Some(status) = JobStatus::settled(&statuses) else {
        return Ok(None);
    };
    sqlx::query("UPDATE jobs SET status = $2, updated_at = $3 WHERE id = $1 AND status <> $2")
        .bind(job_id)
        .bind(status.as_str())
        .bind(ts(now))
        .execute(&mut **tx)
        .await?;
    Ok(Some(status))
}

async fn balance_in(tx: &mut Tx, user_id: &str) -> StoreResult<i64> {
    Ok(sqlx::query(sql::BALANCE)
        .bind(user_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get("balance")?)
}

async fn rollback<T>(tx: Tx, value: T) -> StoreResult<T> {
    tx.rollback().await?;
    Ok(value)
}

/// Rolls back, then reports `err` (the refusal that made us roll back).
async fn abort<T>(tx: Tx, err: StoreError) -> StoreResult<T> {
    tx.rollback().await?;
    Err(err)
}

/// One ledger entry inside the caller's transaction. Serializes every ledger write of the user
/// (the balance read below cannot be invalidated by a concurrent charge before our insert
/// commits). An existing entry with this idempotency key is `AlreadyApplied` when it is the
/// same entry (user and amount), else [`StoreError::IdemKeyReused`]. With `must_cover`, an
/// entry that would take the balance below zero is [`StoreError::InsufficientCredits`]. On
/// `Err` the caller must roll back.
async fn ledger_entry(
    tx: &mut Tx,
    user_id: &str,
    delta: i64,
    reason: &str,
    idem_key: &str,
    must_cover: bool,
    now: DateTime<Utc>,
) -> StoreResult<LedgerOutcome> {
    let user = sqlx::query(sql::LOCK_USER)
        .bind(user_id)
        .fetch_optional(&mut **tx)
        .await?;
    if user.is_none() {
        return Err(StoreError::UnknownUser(user_id.to_owned()));
    }
    let existing = sqlx::query("SELECT user_id, delta FROM credit_ledger WHERE idem_key = $1")
        .bind(idem_key)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(row) = existing {
        let same = row.try_get::<String, _>("user_id")? == user_id
            && row.try_get::<i64, _>("delta")? == delta;
        return if same {
            Ok(LedgerOutcome::AlreadyApplied {
                balance: balance_in(tx, user_id).await?,
            })
        } else {
            Err(StoreError::IdemKeyReused {
                key: idem_key.to_owned(),
            })
        };
    }
    let balance = balance_in(tx, user_id).await?;
    let after = balance
        .checked_add(delta)
        .ok_or_else(|| StoreError::invalid("balance would overflow"))?;
    if must_cover && after < 0 {
        return Err(StoreError::InsufficientCredits {
            balance,
            needed: -delta,
        });
    }
    sqlx::query(
        "INSERT INTO credit_ledger (user_id, delta, reason, idem_key, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user_id)
    .bind(delta)
    .bind(reason)
    .bind(idem_key)
    .bind(ts(now))
    .execute(&mut **tx)
    .await?;
    Ok(LedgerOutcome::Applied { balance: after })
}

/// Takes `charge` under `idem_key` inside the caller's transaction (see [`ledger_entry`]).
/// Writes the intent to dispatch in the caller's transaction. A repeat of the same message
/// (same id) keeps the first entry.
async fn outbox_insert(tx: &mut Tx, e: &OutboxEntry) -> StoreResult<()> {
    let targets = serde_json::to_string(&e.targets)
        .map_err(|err| StoreError::Corrupt(format!("outbox targets: {err}")))?;
    sqlx::query(
        "INSERT INTO dispatch_outbox \
         (id, job_id, user_id, action, idx, fence, targets, created_at, published_at, publishes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, 0) ON CONFLICT (id) DO NOTHING",
    )
    .bind(&e.id)
    .bind(&e.job_id)
    .bind(&e.user_id)
    .bind(e.action.as_str())
    .bind(e.idx.map(i64::from))
    .bind(i64::try_from(e.fence).map_err(|_| StoreError::invalid("fence out of range"))?)
    .bind(targets)
    .bind(ts(e.created_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn outbox_from_row(row: &DbRow) -> StoreResult<OutboxEntry> {
    let action: String = row.try_get("action")?;
    let targets: String = row.try_get("targets")?;
    Ok(OutboxEntry {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        user_id: row.try_get("user_id")?,
        action: Action::parse(&action)
            .ok_or_else(|| StoreError::Corrupt(format!("outbox action `{action}`")))?,
        idx: row
            .try_get::<Option<i64>, _>("idx")?
            .map(|i| stored_u32(i, "outbox idx"))
            .transpose()?,
        fence: stored_u64(row.try_get("fence")?, "outbox fence")?,
        targets: serde_json::from_str(&targets)
            .map_err(|e| StoreError::Corrupt(format!("outbox targets `{targets}`: {e}")))?,
        created_at: get_ts(row, "created_at")?,
        published_at: get_opt_ts(row, "published_at")?,
        publishes: stored_u32(row.try_get("publishes")?, "outbox publishes")?,
    })
}

/// The `(idx, fence)` pairs that the approve and approve-all outbox entries of `job_id` name.
/// A `done` row under one of them is being approved: approve keeps the row `done` until the
/// worker's write, so its status cannot say so, and without this a click after the claim's
/// TTL (or on the other approve button) would bump the fence, charge again and leave the first
/// animation stale. An entry leaves the outbox when its rows move on or the worker gives up on
/// it (dead letter, cancel), so a failed approval can be clicked again.
async fn approval_targets(tx: &mut Tx, job_id: &str) -> StoreResult<HashSet<(u32, u64)>> {
    let entries = sqlx::query(
        "SELECT targets FROM dispatch_outbox WHERE job_id = $1 \
         AND action IN ('approve', 'approve_all')",
    )
    .bind(job_id)
    .fetch_all(&mut **tx)
    .await?;
    let mut named = HashSet::new();
    for row in &entries {
        let targets: String = row.try_get("targets")?;
        let pairs: Vec<(u32, u64)> = serde_json::from_str(&targets)
            .map_err(|e| StoreError::Corrupt(format!("outbox targets `{targets}`: {e}")))?;
        named.extend(pairs);
    }
    Ok(named)
}

async fn take_charge(
    tx: &mut Tx,
    charge: &Charge<'_>,
    idem_key: String,
    now: DateTime<Utc>,
) -> StoreResult<Charged> {
    let delta = charge
        .amount
        .checked_neg()
        .ok_or_else(|| StoreError::invalid("amount too large"))?;
    let outcome = ledger_entry(
        tx,
        charge.user_id,
        delta,
        charge.reason,
        &idem_key,
        true,
        now,
    )
    .await?;
    Ok(Charged {
        key: idem_key,
        amount: charge.amount,
        balance: outcome.balance(),
    })
}

impl Imp {
    async fn begin_write(&self) -> StoreResult<Tx> {
        Ok(self.pool.begin_with(sql::BEGIN_WRITE).await?)
    }

    async fn begin_read(&self) -> StoreResult<Tx> {
        Ok(self.pool.begin_with(sql::BEGIN_READ).await?)
    }

    pub(in crate::store) async fn migrate(&self) -> StoreResult<()> {
        super::migrator().await?.run(&self.pool).await?;
        Ok(())
    }

    pub(in crate::store) async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(in crate::store) async fn close(&self) {
        self.pool.close().await;
    }

    // ---- users ---------------------------------------------------------------------------

    pub(in crate::store) async fn create_user(
        &self,
        id: &str,
        token_hash: &str,
        is_admin: bool,
    ) -> StoreResult<UserRecord> {
        let created_at = now();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO users (id, token_hash, is_admin, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(token_hash)
        .bind(is_admin)
        .bind(ts(created_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(UserRecord {
            id: id.to_owned(),
            token_hash: token_hash.to_owned(),
            is_admin,
            created_at,
        })
    }

    pub(in crate::store) async fn user_by_token_hash(
        &self,
        token_hash: &str,
    ) -> StoreResult<Option<UserRecord>> {
        sqlx::query("SELECT id, token_hash, is_admin, created_at FROM users WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    pub(in crate::store) async fn get_user(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        sqlx::query("SELECT id, token_hash, is_admin, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(user_from_row)
            .transpose()
    }

    // ---- jobs ----------------------------------------------------------------------------

    pub(in crate::store) async fn create_job(
        &self,
        job: &NewJob,
        charge: Option<&Charge<'_>>,
    ) -> StoreResult<(JobRecord, Option<Charged>)> {
        let (rec, charged, _) = self.create_job_outboxed(job, charge, false).await?;
        Ok((rec, charged))
    }

    pub(in crate::store) async fn create_job_outboxed(
        &self,
        job: &NewJob,
        charge: Option<&Charge<'_>>,
        outbox: bool,
    ) -> StoreResult<(JobRecord, Option<Charged>, Option<OutboxEntry>)> {
        self.create_job_keyed(job, charge, outbox, None).await
    }

    pub(in crate::store) async fn create_job_keyed(
        &self,
        job: &NewJob,
        charge: Option<&Charge<'_>>,
        outbox: bool,
        idem_key: Option<&str>,
    ) -> StoreResult<(JobRecord, Option<Charged>, Option<OutboxEntry>)> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if let Some(key) = idem_key {
            // First, so a repeat fails here (a conflict) before anything is charged.
            let taken = sqlx::query(
                "SELECT job_id FROM submission_keys WHERE user_id = $1 AND idem_key = $2",
            )
            .bind(&job.user_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = taken {
                let id: String = row.try_get("job_id")?;
                return abort(tx, StoreError::IdemKeyTaken(id)).await;
            }
        }
        // The charge first: a refused charge (unknown user, too few credits) creates nothing.
        let charged = match charge {
            Some(c) => {
                let key = job::charge_key(&job.id, Action::GenerateSet, None, 1);
                match take_charge(&mut tx, c, key, now).await {
                    Ok(ch) => Some(ch),
                    Err(e) => return abort(tx, e).await,
                }
            }
            None => None,
        };
        sqlx::query(concat!(
            "INSERT INTO jobs (",
            job_cols!(),
            ") VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7, NULL, NULL, NULL, $8, $8)"
        ))
        .bind(&job.id)
        .bind(&job.user_id)
        .bind(&job.subject)
        .bind(&job.style)
        .bind(seed_to_db(job.seed))
        .bind(&job.model)
        .bind(&job.reference_key)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        let mut emoji = Vec::with_capacity(job.labels.len());
        for (idx, label) in (0u32..).zip(&job.labels) {
            sqlx::query(concat!(
                "INSERT INTO emoji_results (",
                emoji_cols!(),
                ") VALUES ($1, $2, $3, 'pending', 1, NULL, NULL, 0, NULL, NULL, $4)"
            ))
            .bind(&job.id)
            .bind(i64::from(idx))
            .bind(label)
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
            emoji.push(EmojiRecord {
                job_id: job.id.clone(),
                idx,
                label: label.clone(),
                status: EmojiStatus::Pending,
                fence: 1,
                image_key: None,
                seed: None,
                attempts: 0,
                error: None,
                animation_key: None,
                updated_at: now,
            });
        }
        if let Some(key) = idem_key {
            sqlx::query(
                "INSERT INTO submission_keys (user_id, idem_key, job_id, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&job.user_id)
            .bind(key)
            .bind(&job.id)
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
        }
        let entry = if outbox {
            let targets = emoji.iter().map(|e| (e.idx, 1)).collect();
            let e = OutboxEntry::new(
                &job.id,
                &job.user_id,
                Action::GenerateSet,
                None,
                1,
                targets,
                now,
            );
            outbox_insert(&mut tx, &e).await?;
            crate::failpoint::hit("dispatch.before_commit");
            Some(e)
        } else {
            None
        };
        tx.commit().await?;
        let rec = JobRecord {
            id: job.id.clone(),
            user_id: job.user_id.clone(),
            status: JobStatus::Pending,
            subject: job.subject.clone(),
            style: job.style.clone(),
            seed: job.seed,
            model: job.model.clone(),
            reference_key: job.reference_key.clone(),
            pose_key: None,
            thumbnail_path: None,
            thumbnail_key: None,
            created_at: now,
            updated_at: now,
            emoji,
        };
        Ok((rec, charged, entry))
    }

    pub(in crate::store) async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        // One snapshot for the job row and its emoji rows: two autocommit reads could straddle
        // a commit and show emoji 0 done next to a job row from before its thumbnail write.
        let mut tx = self.begin_read().await?;
        let row = sqlx::query(concat!("SELECT ", job_cols!(), " FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return rollback(tx, None).await;
        };
        let mut job = job_from_row(&row)?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            emoji_cols!(),
            " FROM emoji_results WHERE job_id = $1 ORDER BY idx"
        ))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        job.emoji = rows
            .iter()
            .map(emoji_from_row)
            .collect::<StoreResult<_>>()?;
        rollback(tx, Some(job)).await
    }

    pub(in crate::store) async fn list_jobs(
        &self,
        user_id: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Vec<JobRecord>> {
        let mut tx = self.begin_read().await?;
        let rows = match user_id {
            Some(user) => {
                sqlx::query(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM jobs WHERE user_id = $1 ORDER BY created_at DESC, id DESC \
                     LIMIT $2 OFFSET $3"
                ))
                .bind(user)
                .bind(i64::from(limit))
                .bind(i64::from(offset))
                .fetch_all(&mut *tx)
                .await?
            }
            None => {
                sqlx::query(concat!(
                    "SELECT ",
                    job_cols!(),
                    " FROM jobs ORDER BY created_at DESC, id DESC LIMIT $1 OFFSET $2"
                ))
                .bind(i64::from(limit))
                .bind(i64::from(offset))
                .fetch_all(&mut *tx)
                .await?
            }
        };
        let mut jobs = rows
            .iter()
            .map(job_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        if jobs.is_empty() {
            return rollback(tx, jobs).await;
        }
        let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        let rows = sqlx::query(sql::EMOJI_OF_JOBS)
            .bind(text_list(&ids))
            .fetch_all(&mut *tx)
            .await?;
        let mut by_job: HashMap<String, Vec<EmojiRecord>> = HashMap::new();
        for row in &rows {
            let e = emoji_from_row(row)?;
            by_job.entry(e.job_id.clone()).or_default().push(e);
        }
        for job in &mut jobs {
            job.emoji = by_job.remove(&job.id).unwrap_or_default();
        }
        rollback(tx, jobs).await
    }

    pub(in crate::store) async fn set_job_status(
        &self,
        job_id: &str,
        status: JobStatus,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("UPDATE jobs SET status = $2, updated_at = $3 WHERE id = $1")
            .bind(job_id)
            .bind(status.as_str())
            .bind(ts(now()))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    pub(in crate::store) async fn set_pose_key(
        &self,
        job_id: &str,
        key: &str,
    ) -> StoreResult<bool> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query("UPDATE jobs SET pose_key = $2, updated_at = $3 WHERE id = $1")
            .bind(job_id)
            .bind(key)
            .bind(ts(now()))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(n > 0)
    }

    // ---- emoji: worker side --------------------------------------------------------------

    pub(in crate::store) async fn start_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: i64,
    ) -> StoreResult<StartOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, StartOutcome::Missing).await;
        }
        // `running` is accepted for the same fence: that is this very message redelivered
        // after its worker died mid-run (the run-once key keeps two live workers apart).
        let row = sqlx::query(
            "UPDATE emoji_results SET status = 'running', attempts = attempts + 1, updated_at = $4 \
             WHERE job_id = $1 AND idx = $2 AND fence = $3 AND status IN ('pending', 'running') \
             RETURNING attempts",
        )
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(fence)
        .bind(ts(now))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let miss = explain_miss(&mut tx, job_id, idx, fence).await?;
            return rollback(tx, miss.into()).await;
        };
        let attempts = stored_u32(row.try_get("attempts")?, "attempts")?;
        sqlx::query(
            "UPDATE jobs SET status = 'running', updated_at = $2 WHERE id = $1 AND status = 'pending'",
        )
        .bind(job_id)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(StartOutcome::Started { attempts })
    }

    pub(in crate::store) async fn finish_emoji(
        &self,
        o: &EmojiOutcome,
        fence: i64,
    ) -> StoreResult<WriteOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, &o.job_id).await? {
            return rollback(tx, WriteOutcome::Missing).await;
        }
        let n = sqlx::query(
            "UPDATE emoji_results \
             SET status = 'done', image_key = $4, seed = $5, error = NULL, updated_at = $6 \
             WHERE job_id = $1 AND idx = $2 AND fence = $3 AND status IN ('pending', 'running')",
        )
        .bind(&o.job_id)
        .bind(i64::from(o.idx))
        .bind(fence)
        .bind(&o.image_key)
        .bind(seed_to_db(o.seed))
        .bind(ts(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            let miss = explain_miss(&mut tx, &o.job_id, o.idx, fence).await?;
            return rollback(tx, miss.into()).await;
        }
        if o.idx == 0 {
            // The seed's archive incident: this write and the row's must commit together.
            let thumb = o
                .thumbnail
                .as_ref()
                .ok_or_else(|| StoreError::invalid("emoji 0 must be written with its thumbnail"))?;
            sqlx::query(
                "UPDATE jobs SET thumbnail_path = $2, thumbnail_key = $3, updated_at = $4 \
                 WHERE id = $1",
            )
            .bind(&o.job_id)
            .bind(&thumb.path)
            .bind(&thumb.key)
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
        }
        let settled = settle(&mut tx, &o.job_id, now).await?;
        tx.commit().await?;
        Ok(WriteOutcome::Written { settled })
    }

    pub(in crate::store) async fn fail_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: i64,
        error: &str,
    ) -> StoreResult<WriteOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, WriteOutcome::Missing).await;
        }
        // The previous image_key stays: it is still a real image (the thumbnail chain's
        // emoji-0 fallback can use it) until a later success replaces it.
        let n = sqlx::query(
            "UPDATE emoji_results SET status = 'failed', error = $4, updated_at = $5 \
             WHERE job_id = $1 AND idx = $2 AND fence = $3 AND status IN ('pending', 'running')",
        )
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(fence)
        .bind(error)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            let miss = explain_miss(&mut tx, job_id, idx, fence).await?;
            return rollback(tx, miss.into()).await;
        }
        let settled = settle(&mut tx, job_id, now).await?;
        tx.commit().await?;
        Ok(WriteOutcome::Written { settled })
    }

    pub(in crate::store) async fn fail_unsettled(
        &self,
        job_id: &str,
        fence: i64,
        error: &str,
    ) -> StoreResult<Option<Vec<u32>>> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, None).await;
        }
        let rows = sqlx::query(
            "UPDATE emoji_results SET status = 'failed', error = $3, updated_at = $4 \
             WHERE job_id = $1 AND fence = $2 AND status IN ('pending', 'running') RETURNING idx",
        )
        .bind(job_id)
        .bind(fence)
        .bind(error)
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        let mut failed = rows
            .iter()
            .map(|r| stored_u32(r.try_get("idx")?, "emoji index"))
            .collect::<StoreResult<Vec<_>>>()?;
        failed.sort_unstable();
        settle(&mut tx, job_id, now).await?;
        tx.commit().await?;
        Ok(Some(failed))
    }

    pub(in crate::store) async fn approve_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: i64,
        animation_key: Option<&str>,
    ) -> StoreResult<WriteOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, WriteOutcome::Missing).await;
        }
        let n = sqlx::query(
            "UPDATE emoji_results \
             SET status = 'approved', animation_key = COALESCE($5, animation_key), updated_at = $4 \
             WHERE job_id = $1 AND idx = $2 AND fence = $3 AND status = 'done'",
        )
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(fence)
        .bind(ts(now))
        .bind(animation_key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            let miss = explain_miss(&mut tx, job_id, idx, fence).await?;
            return rollback(tx, miss.into()).await;
        }
        let settled = settle(&mut tx, job_id, now).await?;
        tx.commit().await?;
        Ok(WriteOutcome::Written { settled })
    }

    pub(in crate::store) async fn approve_all(
        &self,
        job_id: &str,
    ) -> StoreResult<Option<Vec<u32>>> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, None).await;
        }
        let rows = sqlx::query(
            "UPDATE emoji_results SET status = 'approved', updated_at = $2 \
             WHERE job_id = $1 AND status = 'done' RETURNING idx",
        )
        .bind(job_id)
        .bind(ts(now))
        .fetch_all(&mut *tx)
        .await?;
        let mut approved = rows
            .iter()
            .map(|r| stored_u32(r.try_get("idx")?, "emoji index"))
            .collect::<StoreResult<Vec<_>>>()?;
        approved.sort_unstable();
        settle(&mut tx, job_id, now).await?;
        tx.commit().await?;
        Ok(Some(approved))
    }

    pub(in crate::store) async fn bump_attempts(
        &self,
        job_id: &str,
        idx: u32,
    ) -> StoreResult<Option<u32>> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE emoji_results SET attempts = attempts + 1, updated_at = $3 \
             WHERE job_id = $1 AND idx = $2 RETURNING attempts",
        )
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(ts(now()))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| stored_u32(r.try_get("attempts")?, "attempts"))
            .transpose()
    }

    // ---- emoji: enqueue side -------------------------------------------------------------

    pub(in crate::store) async fn preflip(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
        keep_status: bool,
        charge: Option<(Action, &Charge<'_>)>,
    ) -> StoreResult<(PreflipOutcome, Option<Charged>)> {
        // Without a charge or an outbox entry the action names nothing stored.
        let action = charge.map_or(Action::Regenerate, |(a, _)| a);
        let (outcome, charged, _) = self
            .preflip_outboxed(
                job_id,
                idx,
                expected,
                keep_status,
                action,
                charge.map(|(_, c)| c),
                None,
            )
            .await?;
        Ok((outcome, charged))
    }

    #[allow(clippy::too_many_arguments)]
    pub(in crate::store) async fn preflip_outboxed(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
        keep_status: bool,
        action: Action,
        charge: Option<&Charge<'_>>,
        dispatch_for: Option<&str>,
    ) -> StoreResult<(PreflipOutcome, Option<Charged>, Option<OutboxEntry>)> {
        let now = now();
        let expected: Vec<&str> = expected.iter().map(|s| s.as_str()).collect();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, (PreflipOutcome::Missing, None, None)).await;
        }
        // Under the job's lock, so no approval can be queued between this read and the bump.
        if keep_status {
            let named = approval_targets(&mut tx, job_id).await?;
            let current = if named.is_empty() {
                None
            } else {
                sqlx::query(
                    "SELECT fence FROM emoji_results \
                     WHERE job_id = $1 AND idx = $2 AND status = 'done'",
                )
                .bind(job_id)
                .bind(i64::from(idx))
                .fetch_optional(&mut *tx)
                .await?
            };
            if let Some(r) = current
                && named.contains(&(idx, stored_u64(r.try_get("fence")?, "fence")?))
            {
                return rollback(tx, (PreflipOutcome::InFlight, None, None)).await;
            }
        }
        // The decision is this one statement: of concurrent callers, the first to update the
        // row changes its status (or fence) and every later one no longer matches `expected`
        // (Postgres re-checks the WHERE clause against the committed row after the lock wait).
        let row = sqlx::query(if keep_status {
            sql::BUMP_FENCE
        } else {
            sql::PREFLIP
        })
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(text_list(&expected))
        .bind(ts(now))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            let status =
                sqlx::query("SELECT status FROM emoji_results WHERE job_id = $1 AND idx = $2")
                    .bind(job_id)
                    .bind(i64::from(idx))
                    .fetch_optional(&mut *tx)
                    .await?;
            let outcome = match status {
                None => PreflipOutcome::Missing,
                Some(r) => PreflipOutcome::WrongState(parse_emoji_status(
                    &r.try_get::<String, _>("status")?,
                )?),
            };
            return rollback(tx, (outcome, None, None)).await;
        };
        let fence = stored_u64(row.try_get("fence")?, "fence")?;
        // Charged in the flip's transaction, under a key named by the new fence: both or
        // neither commit, and the worker can name this charge from the message alone.
        let charged = match charge {
            Some(c) => {
                let key = job::charge_key(job_id, action, Some(idx), fence);
                match take_charge(&mut tx, c, key, now).await {
                    Ok(ch) => Some(ch),
                    Err(e) => return abort(tx, e).await,
                }
            }
            None => None,
        };
        if !keep_status {
            // Work is queued again: a settled job is no longer settled.
            sqlx::query(
                "UPDATE jobs SET status = 'pending', updated_at = $2 \
                 WHERE id = $1 AND status IN ('done', 'partial', 'failed')",
            )
            .bind(job_id)
            .bind(ts(now))
            .execute(&mut *tx)
            .await?;
        }
        let entry = match dispatch_for {
            Some(user_id) => {
                let e = OutboxEntry::new(
                    job_id,
                    user_id,
                    action,
                    Some(idx),
                    fence,
                    vec![(idx, fence)],
                    now,
                );
                outbox_insert(&mut tx, &e).await?;
                crate::failpoint::hit("dispatch.before_commit");
                Some(e)
            }
            None => None,
        };
        tx.commit().await?;
        Ok((PreflipOutcome::Flipped { fence }, charged, entry))
    }

    pub(in crate::store) async fn bump_done(
        &self,
        job_id: &str,
        charge: Option<&Charge<'_>>,
    ) -> StoreResult<Option<(Vec<(u32, u64)>, Vec<Charged>)>> {
        Ok(self
            .bump_done_outboxed(job_id, charge, None)
            .await?
            .map(|(b, c, _)| (b, c)))
    }

    #[allow(clippy::type_complexity)]
    pub(in crate::store) async fn bump_done_outboxed(
        &self,
        job_id: &str,
        charge: Option<&Charge<'_>>,
        dispatch_for: Option<&str>,
    ) -> StoreResult<Option<(Vec<(u32, u64)>, Vec<Charged>, Option<OutboxEntry>)>> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, None).await;
        }
        // A row whose approval is already queued is that approval's: not bumped, not charged.
        let queued = approval_targets(&mut tx, job_id).await?;
        const BUMP: &str = "UPDATE emoji_results SET fence = fence + 1, attempts = 0, \
             updated_at = $2 WHERE job_id = $1 AND status = 'done' AND idx = $3 RETURNING idx, fence";
        let done = sqlx::query(
            "SELECT idx, fence FROM emoji_results WHERE job_id = $1 AND status = 'done' ORDER BY idx",
        )
        .bind(job_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut bumped = Vec::with_capacity(done.len());
        for r in &done {
            let pair = (
                stored_u32(r.try_get("idx")?, "emoji index")?,
                stored_u64(r.try_get("fence")?, "fence")?,
            );
            if queued.contains(&pair) {
                continue;
            }
            let row = sqlx::query(BUMP)
                .bind(job_id)
                .bind(ts(now))
                .bind(i64::from(pair.0))
                .fetch_one(&mut *tx)
                .await?;
            bumped.push((
                stored_u32(row.try_get("idx")?, "emoji index")?,
                stored_u64(row.try_get("fence")?, "fence")?,
            ));
        }
        let mut charged = Vec::new();
        if let Some(c) = charge {
            for &(idx, fence) in &bumped {
                let key = job::charge_key(job_id, Action::ApproveAll, Some(idx), fence);
                match take_charge(&mut tx, c, key, now).await {
                    Ok(ch) => charged.push(ch),
                    Err(e) => return abort(tx, e).await,
                }
            }
        }
        let entry = match dispatch_for {
            Some(user_id) if !bumped.is_empty() => {
                let fence = bumped.iter().map(|&(_, f)| f).max().unwrap_or(1);
                let e = OutboxEntry::new(
                    job_id,
                    user_id,
                    Action::ApproveAll,
                    None,
                    fence,
                    bumped.clone(),
                    now,
                );
                outbox_insert(&mut tx, &e).await?;
                crate::failpoint::hit("dispatch.before_commit");
                Some(e)
            }
            _ => None,
        };
        tx.commit().await?;
        Ok(Some((bumped, charged, entry)))
    }

    pub(in crate::store) async fn revert_preflip(
        &self,
        job_id: &str,
        idx: u32,
        fence: i64,
        flipped_to: EmojiStatus,
        restore: EmojiStatus,
        error: Option<&str>,
    ) -> StoreResult<bool> {
        let now = now();
        let mut tx = self.begin_write().await?;
        if !lock_job(&mut tx, job_id).await? {
            return rollback(tx, false).await;
        }
        // Only while the row is still exactly as our flip left it: a worker that already
        // started it (the entry was added after all) keeps it. The fence moves on once more,
        // so an entry that did reach the stream is stale for good.
        let n = sqlx::query(
            "UPDATE emoji_results SET status = $5, error = $6, fence = fence + 1, updated_at = $7 \
             WHERE job_id = $1 AND idx = $2 AND fence = $3 AND status = $4",
        )
        .bind(job_id)
        .bind(i64::from(idx))
        .bind(fence)
        .bind(flipped_to.as_str())
        .bind(restore.as_str())
        .bind(error)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            return rollback(tx, false).await;
        }
        settle(&mut tx, job_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(in crate::store) async fn job_for_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> StoreResult<Option<String>> {
        let row =
            sqlx::query("SELECT job_id FROM submission_keys WHERE user_id = $1 AND idem_key = $2")
                .bind(user_id)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| r.try_get("job_id").map_err(StoreError::from))
            .transpose()
    }

    // ---- outbox --------------------------------------------------------------------------

    pub(in crate::store) async fn outbox_published(&self, id: &str) -> StoreResult<bool> {
        let n = sqlx::query(
            "UPDATE dispatch_outbox SET published_at = $2, publishes = publishes + 1 WHERE id = $1",
        )
        .bind(id)
        .bind(ts(now()))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    pub(in crate::store) async fn outbox_withdraw(&self, id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM dispatch_outbox WHERE id = $1 AND published_at IS NULL")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    pub(in crate::store) async fn outbox_entry(&self, id: &str) -> StoreResult<Option<OutboxEntry>> {
        let row = sqlx::query(
            "SELECT id, job_id, user_id, action, idx, fence, targets, created_at, published_at, \
             publishes FROM dispatch_outbox WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(outbox_from_row).transpose()
    }

    pub(in crate::store) async fn outbox_remove(&self, id: &str) -> StoreResult<bool> {
        let n = sqlx::query("DELETE FROM dispatch_outbox WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    pub(in crate::store) async fn outbox_due(
        &self,
        unpublished_before: DateTime<Utc>,
        published_before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxEntry>> {
        let rows = sqlx::query(
            "SELECT id, job_id, user_id, action, idx, fence, targets, created_at, published_at, \
             publishes FROM dispatch_outbox \
             WHERE (published_at IS NULL AND created_at < $1) OR published_at < $2 \
             ORDER BY created_at, id LIMIT $3",
        )
        .bind(ts(unpublished_before))
        .bind(ts(published_before))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(outbox_from_row).collect()
    }

    pub(in crate::store) async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             COALESCE(SUM(CASE WHEN published_at IS NULL THEN 1 ELSE 0 END), 0) AS unpublished \
             FROM dispatch_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest = sqlx::query(
            "SELECT created_at FROM dispatch_outbox WHERE published_at IS NULL \
             ORDER BY created_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(OutboxStats {
            unpublished: stored_u64(row.try_get("unpublished")?, "outbox count")?,
            total: stored_u64(row.try_get("total")?, "outbox count")?,
            oldest_unpublished: oldest.map(|r| get_ts(&r, "created_at")).transpose()?,
        })
    }

    // ---- credits -------------------------------------------------------------------------

    pub(in crate::store) async fn apply_ledger(
        &self,
        user_id: &str,
        delta: i64,
        reason: &str,
        idem_key: &str,
        must_cover: bool,
    ) -> StoreResult<LedgerOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        match ledger_entry(&mut tx, user_id, delta, reason, idem_key, must_cover, now).await {
            Ok(o @ LedgerOutcome::Applied { .. }) => {
                tx.commit().await?;
                Ok(o)
            }
            Ok(o) => rollback(tx, o).await,
            Err(e) => abort(tx, e).await,
        }
    }

    pub(in crate::store) async fn refund_charge(
        &self,
        charge_key: &str,
        reason: &str,
    ) -> StoreResult<RefundOutcome> {
        let now = now();
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT user_id, delta FROM credit_ledger WHERE idem_key = $1")
            .bind(charge_key)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return rollback(tx, RefundOutcome::NoCharge).await;
        };
        let user_id: String = row.try_get("user_id")?;
        let delta: i64 = row.try_get("delta")?;
        if delta >= 0 {
            return abort(
                tx,
                StoreError::invalid(format!("`{charge_key}` is not a charge")),
            )
            .await;
        }
        let key = job::refund_key(charge_key);
        match ledger_entry(&mut tx, &user_id, -delta, reason, &key, false, now).await {
            Ok(LedgerOutcome::Applied { balance }) => {
                tx.commit().await?;
                Ok(RefundOutcome::Refunded {
                    user_id,
                    amount: -delta,
                    balance,
                })
            }
            Ok(LedgerOutcome::AlreadyApplied { .. }) => {
                rollback(tx, RefundOutcome::AlreadyRefunded).await
            }
            Err(e) => abort(tx, e).await,
        }
    }

    pub(in crate::store) async fn balance(&self, user_id: &str) -> StoreResult<i64> {
        Ok(sqlx::query(sql::BALANCE)
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?
            .try_get("balance")?)
    }
}
