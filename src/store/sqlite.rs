//! SQLite backend: the default, one file next to the daemon.
//!
//! - **WAL journal.** Readers (the API polling a job, the archive) never block the writer and
//!   the writer never blocks them; `synchronous = NORMAL` is durable across application
//!   crashes in WAL mode and only risks the last transactions on power loss, which the queue's
//!   at-least-once delivery and the fences make harmless to redo.
//! - **One writer at a time, taken up front.** Every write transaction starts with
//!   `BEGIN IMMEDIATE`. A deferred transaction that reads first and writes later can fail its
//!   lock upgrade with `SQLITE_BUSY` no matter how long it waits (another writer committed
//!   since its snapshot); taking the write lock at `BEGIN` makes the wait a plain
//!   `busy_timeout` wait, and it also serializes credit charges per database, which is what
//!   keeps a balance from going below zero.
//! - **busy_timeout, then store-level retries.** SQLite waits `busy_timeout` for the lock by
//!   itself; a transaction that still gets `SQLITE_BUSY`/`SQLITE_LOCKED` is rolled back and
//!   retried whole by [`super::Store`] with backoff, a bounded number of times.
//! - **Foreign keys on** (SQLite leaves them off per connection unless asked), `STRICT` tables
//!   so a wrongly typed bind fails instead of being stored as text.
//! - Timestamps are fixed-width RFC 3339 text; lists are bound as one JSON array and read with
//!   `json_each` (SQLite has no array parameters).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::{StoreError, StoreOptions, StoreResult, format_ts, parse_ts, redact};

type Db = sqlx::Sqlite;
type DbRow = SqliteRow;
type Imp = SqliteStore;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/sqlite/0001_init.sql")),
    (
        2,
        "outbox",
        include_str!("migrations/sqlite/0002_outbox.sql"),
    ),
];

#[derive(Debug, Clone)]
pub(super) struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub(super) async fn connect(url: &str, opts: &StoreOptions) -> StoreResult<Self> {
        let bad = |reason: String| StoreError::BadUrl {
            url: redact(url),
            reason,
        };
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let options = if url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(url).map_err(|e| bad(e.to_string()))?
        } else {
            SqliteConnectOptions::new().filename(url)
        }
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(opts.busy_timeout)
        .foreign_keys(true);

        if !in_memory {
            // The default URL points into a data directory that may not exist on first start.
            if let Some(dir) = options.get_filename().parent() {
                if !dir.as_os_str().is_empty() {
                    tokio::fs::create_dir_all(dir)
                        .await
                        .map_err(|e| bad(format!("cannot create {}: {e}", dir.display())))?;
                }
            }
        }

        let mut pool = SqlitePoolOptions::new().acquire_timeout(opts.acquire_timeout);
        pool = if in_memory {
            // Each connection to `:memory:` would be its own empty database; keep exactly one,
            // forever.
            pool.max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
        } else {
            pool.max_connections(opts.max_connections.max(1))
        };
        let pool = pool.connect_with(options).await?;
        Ok(SqliteStore { pool })
    }
}

async fn migrator() -> StoreResult<sqlx::migrate::Migrator> {
    super::migrator(MIGRATIONS).await
}

fn ts(t: DateTime<Utc>) -> String {
    format_ts(t)
}

fn get_ts(row: &DbRow, col: &str) -> StoreResult<DateTime<Utc>> {
    parse_ts(&row.try_get::<String, _>(col)?)
}

fn get_opt_ts(row: &DbRow, col: &str) -> StoreResult<Option<DateTime<Utc>>> {
    row.try_get::<Option<String>, _>(col)?
        .map(|s| parse_ts(&s))
        .transpose()
}

fn text_list(items: &[&str]) -> String {
    serde_json::Value::from(items.to_vec()).to_string()
}

mod sql {
    pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
    // A deferred read transaction holds one WAL snapshot from its first read to its end.
    pub(super) const BEGIN_READ: &str = "BEGIN";
    // The write lock taken by BEGIN IMMEDIATE already serializes; this only checks existence.
    pub(super) const LOCK_JOB: &str = "SELECT id FROM jobs WHERE id = $1";
    pub(super) const LOCK_USER: &str = "SELECT id FROM users WHERE id = $1";
    pub(super) const BALANCE: &str =
        "SELECT COALESCE(SUM(delta), 0) AS balance FROM credit_ledger WHERE user_id = $1";
    pub(super) const PREFLIP: &str = "UPDATE emoji_results \
         SET status = 'pending', fence = fence + 1, error = NULL, attempts = 0, \
             animation_key = NULL, updated_at = $4 \
         WHERE job_id = $1 AND idx = $2 AND status IN (SELECT value FROM json_each($3)) \
         RETURNING fence";
    pub(super) const BUMP_FENCE: &str = "UPDATE emoji_results \
         SET fence = fence + 1, attempts = 0, updated_at = $4 \
         WHERE job_id = $1 AND idx = $2 AND status IN (SELECT value FROM json_each($3)) \
         RETURNING fence";
    pub(super) const EMOJI_OF_JOBS: &str = concat!(
        "SELECT ",
        emoji_cols!(),
        " FROM emoji_results WHERE job_id IN (SELECT value FROM json_each($1)) \
         ORDER BY job_id, idx"
    );
}

mod ops {
    include!("ops.rs");
}
