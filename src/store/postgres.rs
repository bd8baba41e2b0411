//! Postgres backend: for deployments with several API and worker hosts on one database.
//!
//! - **READ COMMITTED plus explicit row locks**, not SERIALIZABLE. Every emoji write locks its
//!   job row (`SELECT … FOR UPDATE`) before touching emoji rows, and every ledger write locks
//!   the user's row: writers of one job (or one user) queue behind each other, writers of
//!   different jobs don't, and nothing has to be retried for serialization failures in the
//!   normal case. After a lock wait, each later statement of the transaction sees what the
//!   previous holder committed, which is what job settlement and the balance check rely on.
//! - **Conditional `UPDATE … RETURNING`** for fences and pre-flips: when two transactions
//!   update the same row, the second waits, then re-evaluates its `WHERE` against the committed
//!   row, so exactly one of them matches.
//! - **Reads of a job use REPEATABLE READ, READ ONLY**, so the job row and its emoji rows come
//!   from one snapshot (READ COMMITTED would take a new snapshot per statement).
//! - Deadlocks and serialization failures, should they happen anyway, are retried whole by
//!   [`super::Store`] like SQLite's busy errors.
//! - Timestamps are `TIMESTAMPTZ`; lists are bound as `TEXT[]` and matched with `= ANY($n)`.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};

use super::{StoreError, StoreOptions, StoreResult, redact};

type Db = sqlx::Postgres;
type DbRow = PgRow;
type Imp = PgStore;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/postgres/0001_init.sql")),
    (
        2,
        "outbox",
        include_str!("migrations/postgres/0002_outbox.sql"),
    ),
];

#[derive(Debug, Clone)]
pub(super) struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub(super) async fn connect(url: &str, opts: &StoreOptions) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|e| StoreError::BadUrl {
            url: redact(url),
            reason: e.to_string(),
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(PgStore { pool })
    }
}

async fn migrator() -> StoreResult<sqlx::migrate::Migrator> {
    super::migrator(MIGRATIONS).await
}

fn ts(t: DateTime<Utc>) -> DateTime<Utc> {
    t
}

fn get_ts(row: &DbRow, col: &str) -> StoreResult<DateTime<Utc>> {
    Ok(row.try_get::<DateTime<Utc>, _>(col)?)
}

fn get_opt_ts(row: &DbRow, col: &str) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(row.try_get::<Option<DateTime<Utc>>, _>(col)?)
}

fn text_list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

mod sql {
    pub(super) const BEGIN_WRITE: &str = "BEGIN";
    pub(super) const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
    pub(super) const LOCK_JOB: &str = "SELECT id FROM jobs WHERE id = $1 FOR UPDATE";
    pub(super) const LOCK_USER: &str = "SELECT id FROM users WHERE id = $1 FOR UPDATE";
    // SUM(BIGINT) is NUMERIC in Postgres.
    pub(super) const BALANCE: &str =
        "SELECT COALESCE(SUM(delta), 0)::BIGINT AS balance FROM credit_ledger WHERE user_id = $1";
    pub(super) const PREFLIP: &str = "UPDATE emoji_results \
         SET status = 'pending', fence = fence + 1, error = NULL, attempts = 0, \
             animation_key = NULL, updated_at = $4 \
         WHERE job_id = $1 AND idx = $2 AND status = ANY($3) \
         RETURNING fence";
    pub(super) const BUMP_FENCE: &str = "UPDATE emoji_results \
         SET fence = fence + 1, attempts = 0, updated_at = $4 \
         WHERE job_id = $1 AND idx = $2 AND status = ANY($3) \
         RETURNING fence";
    pub(super) const EMOJI_OF_JOBS: &str = concat!(
        "SELECT ",
        emoji_cols!(),
        " FROM emoji_results WHERE job_id = ANY($1) ORDER BY job_id, idx"
    );
}

mod ops {
    include!("ops.rs");
}
