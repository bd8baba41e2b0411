//! The job database: jobs, emoji rows, the credit ledger and users, on SQLite (the default, a
//! single file) or Postgres, behind one [`Store`] whose behaviour is the same on both (one
//! conformance suite, `tests/store.rs`, runs every case against each).
//!
//! # What the store guarantees, and why
//!
//! - **Fences.** Each emoji row carries a counter that the enqueue side bumps whenever it flips
//!   the row back to `pending` ([`Store::preflip_emoji`]). A queue message names the fence it
//!   was enqueued for, and every worker write is conditional on it (`WHERE fence = ?`). Redis
//!   delivers at least once and `XACK` cannot tell a stale worker from a live one, so a
//!   duplicate or stale message must be harmless *in the database*: its write matches no row
//!   and comes back [`WriteOutcome::Superseded`], nothing changed.
//! - **Emoji 0 and the thumbnail in one transaction.** `jobs.thumbnail_path/_key` cache emoji
//!   0's image. The old system wrote them in a separate step, and a concurrent regenerate of
//!   emoji 0 left them empty under a SQLite race (seed log, "Archive Card Thumbnail
//!   Fallback"). Here [`Store::finish_emoji`] for index 0 refuses to run without the thumbnail
//!   and writes it in the same transaction as the row, so "emoji 0 done ⇒ thumbnail columns
//!   set" holds at every instant any reader can observe. Reads still use the fallback chain in
//!   [`thumbnail_source`].
//! - **Race-free pre-flip and charge.** The seed's double-click incident came from
//!   read-then-write status checks. The pre-flip is a single conditional
//!   `UPDATE … RETURNING`; a charge serializes per user (`SELECT … FOR UPDATE` on the user row
//!   in Postgres, `BEGIN IMMEDIATE` in SQLite) so "balance never below zero" cannot be raced,
//!   and every ledger entry has a unique idempotency key so a retried charge or refund applies
//!   once.
//! - **Per-job serialization of emoji writes.** Every transaction that changes an emoji row
//!   first locks its job row, then derives the job's status from all its rows. Without that,
//!   two last emoji finishing at once under Postgres' READ COMMITTED would each see the other
//!   still running and the job would never settle (write skew).
//! - **Busy is retried here.** SQLite allows one writer at a time; a writer that finds the
//!   file locked waits `busy_timeout` inside SQLite, and if it still fails the store retries
//!   the whole transaction a bounded number of times with jittered backoff (Postgres
//!   serialization failures and deadlocks likewise) before reporting [`StoreError::Busy`],
//!   which is retryable. Every retried unit is a whole transaction, so a retry never half
//!   repeats a write.
//!
//! The two backends share one body of SQL logic (`ops.rs`, compiled once per backend against
//! its concrete sqlx types) and differ only where the databases do: transaction start,
//! row locks, list parameters and timestamp encoding (see `sqlite.rs` and `postgres.rs`).
//!
//! Timestamps are `DateTime<Utc>` in Rust, `TIMESTAMPTZ` in Postgres (native ordering and
//! arithmetic, readable in psql) and fixed-width RFC 3339 `TEXT` in SQLite
//! (`2026-11-29T10:00:00.000000Z`: SQLite has no time type, and a fixed width makes text order
//! equal time order for the archive's `ORDER BY created_at`). Both keep microseconds; the store
//! truncates to microseconds before writing so a value reads back equal on either backend.

// Column lists as literals so `concat!` can build `&'static str` SQL (sqlx 0.9 only accepts
// static or explicitly asserted SQL).
macro_rules! job_cols {
    () => {
        "id, user_id, status, subject, style, seed, model, reference_key, pose_key, \
         thumbnail_path, thumbnail_key, created_at, updated_at"
    };
}
macro_rules! emoji_cols {
    () => {
        "job_id, idx, label, status, fence, image_key, seed, attempts, error, animation_key, \
         updated_at"
    };
}

mod error;
mod postgres;
mod sqlite;
mod thumbnail;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::Serialize;
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

use crate::job::{Action, EmojiStatus, JobStatus, MAX_EMOJI};

pub use error::{StoreError, StoreResult};
pub use thumbnail::{ThumbnailSource, thumbnail_source};

/// A job to create: the row and one `pending` emoji row per label (index = position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub id: String,
    pub user_id: String,
    pub subject: String,
    pub style: Option<String>,
    /// The set's base seed (emoji `i` of a batch uses `seed + i`, as the engine does).
    pub seed: u64,
    pub model: Option<String>,
    pub reference_key: Option<String>,
    pub labels: Vec<String>,
}

/// A `jobs` row with its emoji rows (ordered by `idx`). Field names are the column names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobRecord {
    pub id: String,
    pub user_id: String,
    pub status: JobStatus,
    pub subject: String,
    pub style: Option<String>,
    pub seed: u64,
    pub model: Option<String>,
    pub reference_key: Option<String>,
    pub pose_key: Option<String>,
    pub thumbnail_path: Option<String>,
    pub thumbnail_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub emoji: Vec<EmojiRecord>,
}

/// An `emoji_results` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmojiRecord {
    pub job_id: String,
    pub idx: u32,
    pub label: String,
    pub status: EmojiStatus,
    pub fence: u64,
    pub image_key: Option<String>,
    pub seed: Option<u64>,
    /// Starts of the current fence (reset by a pre-flip): the worker's retry budget.
    pub attempts: u32,
    pub error: Option<String>,
    pub animation_key: Option<String>,
    pub updated_at: DateTime<Utc>,
}

/// A `users` row. Deliberately not `Serialize`: the token hash must not leak into responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub id: String,
    pub token_hash: String,
    pub is_admin: bool,
    pub created_at: DateTime<Utc>,
}

/// The job's cached thumbnail, written with emoji 0's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    /// Where the thumbnail is served from as is (a path or URL).
    pub path: String,
    /// Its object-store key.
    pub key: String,
}

/// A finished emoji, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmojiOutcome {
    pub job_id: String,
    pub idx: u32,
    /// The fence of the message that produced it.
    pub fence: u64,
    pub image_key: String,
    pub seed: u64,
    /// Required for `idx == 0`, ignored otherwise.
    pub thumbnail: Option<Thumbnail>,
}

/// What [`Store::start_emoji`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOutcome {
    /// The row is `running` for this fence; `attempts` counts starts of this fence, including
    /// this one (a reclaimed message after a crash starts a `running` row again).
    Started { attempts: u32 },
    /// The row has moved on to a newer fence: the message is stale; do no work.
    Superseded { current_fence: u64 },
    /// Same fence, but the row is past starting (done, failed, approved).
    WrongState(EmojiStatus),
    /// No such job or emoji.
    Missing,
}

/// What a fenced write ([`Store::finish_emoji`], [`Store::fail_emoji`],
/// [`Store::approve_emoji`]) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written. `settled` is the job's status when this write left every emoji settled.
    Written { settled: Option<JobStatus> },
    /// The row's fence differs from the message's: nothing was written.
    Superseded { current_fence: u64 },
    /// Same fence, but the row's status does not allow this write: nothing was written.
    WrongState(EmojiStatus),
    /// No such job or emoji: nothing was written.
    Missing,
}

/// What a pre-flip did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreflipOutcome {
    /// This caller won: the row now carries `fence`, which the message must name.
    Flipped { fence: u64 },
    /// The row's status was not one of those expected (another caller won, or the action is
    /// not allowed from here): nothing changed.
    WrongState(EmojiStatus),
    /// No such job or emoji.
    Missing,
    /// An approval of this row under its current fence is already queued or running (approve
    /// keeps the row `done`, so its status cannot say so): nothing changed, nothing charged.
    InFlight,
}

/// What a ledger write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerOutcome {
    /// The entry was written; the balance after it.
    Applied { balance: i64 },
    /// An entry with this idempotency key (same user, same amount) already existed; nothing
    /// was written. The current balance.
    AlreadyApplied { balance: i64 },
}

impl LedgerOutcome {
    pub fn balance(self) -> i64 {
        match self {
            LedgerOutcome::Applied { balance } | LedgerOutcome::AlreadyApplied { balance } => {
                balance
            }
        }
    }
}

/// A credit charge taken in the same transaction as the write it pays for (job creation,
/// pre-flip), so the two commit together or not at all. Its idempotency key is derived from
/// the action and fence ([`crate::job::charge_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge<'a> {
    pub user_id: &'a str,
    /// Credits to take (> 0).
    pub amount: i64,
    /// The ledger entry's reason.
    pub reason: &'a str,
}

/// A charge that was taken (or had been taken already under the same key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Charged {
    /// Its idempotency key: refund it with [`Store::refund_charge`].
    pub key: String,
    pub amount: i64,
    /// The user's balance after it.
    pub balance: i64,
}

/// What [`Store::refund_charge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The charge was given back now.
    Refunded {
        user_id: String,
        amount: i64,
        balance: i64,
    },
    /// It had been refunded before (by another path): nothing written.
    AlreadyRefunded,
    /// No charge with that key (a free action, or one enqueued without charging).
    NoCharge,
}

/// The intent to dispatch one queue message, written in the transaction of the charge and
/// pre-flip it belongs to (the transactional outbox: README, "Reliability").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxEntry {
    /// `{job_id}:{action}:{idx or -}:{fence}`.
    pub id: String,
    pub job_id: String,
    pub user_id: String,
    pub action: Action,
    pub idx: Option<u32>,
    pub fence: u64,
    /// The `(idx, fence)` rows the message is for.
    pub targets: Vec<(u32, u64)>,
    pub created_at: DateTime<Utc>,
    /// When it was last published (by the enqueue side, the relay or the reconciler).
    pub published_at: Option<DateTime<Utc>>,
    /// How many times it was published.
    pub publishes: u32,
}

impl OutboxEntry {
    fn new(
        job_id: &str,
        user_id: &str,
        action: Action,
        idx: Option<u32>,
        fence: u64,
        targets: Vec<(u32, u64)>,
        now: DateTime<Utc>,
    ) -> OutboxEntry {
        OutboxEntry {
            id: outbox_id(job_id, action, idx, fence),
            job_id: job_id.to_string(),
            user_id: user_id.to_string(),
            action,
            idx,
            fence,
            targets,
            created_at: now,
            published_at: None,
            publishes: 0,
        }
    }

    /// The queue message this entry stands for (stamped now).
    pub fn message(&self) -> crate::job::ValidJob {
        crate::job::ValidJob {
            v: crate::job::MESSAGE_VERSION,
            job_id: self.job_id.clone(),
            user_id: self.user_id.clone(),
            action: self.action,
            idx: self.idx,
            fence: self.fence,
            enqueued_at: Utc::now(),
        }
    }

    /// Whether the rows it names still wait for this message: each target row carries the
    /// entry's fence and has not reached the state the action leads to (`pending`/`running`
    /// for diffusion; `done` for approve, whose worker step is `done → approved`).
    pub fn unsettled_in(&self, job: &JobRecord) -> bool {
        self.targets.iter().any(|&(idx, fence)| {
            job.emoji.iter().any(|e| {
                e.idx == idx
                    && e.fence == fence
                    && if self.action.spec().step == crate::action::Step::Render {
                        matches!(e.status, EmojiStatus::Pending | EmojiStatus::Running)
                    } else {
                        // An approval waits while its row is still done (not yet animated).
                        e.status == EmojiStatus::Done
                    }
            })
        })
    }
}

/// The outbox id of a message.
pub fn outbox_id(job_id: &str, action: Action, idx: Option<u32>, fence: u64) -> String {
    match idx {
        Some(i) => format!("{job_id}:{action}:{i}:{fence}"),
        None => format!("{job_id}:{action}:-:{fence}"),
    }
}

/// The outbox's backlog, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    /// Entries never published.
    pub unpublished: u64,
    /// Entries kept (published or not) whose rows may still need them.
    pub total: u64,
    /// The oldest never-published entry's creation time.
    pub oldest_unpublished: Option<DateTime<Utc>>,
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Sqlite,
    Postgres,
}

impl BackendKind {
    /// `sqlite:…` (or a bare file path) and `postgres://…` / `postgresql://…`.
    pub fn from_url(url: &str) -> StoreResult<Self> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(BackendKind::Postgres)
        } else if url.starts_with("sqlite:") || (!url.is_empty() && !url.contains("://")) {
            Ok(BackendKind::Sqlite)
        } else {
            Err(StoreError::BadUrl {
                url: redact(url),
                reason: "expected sqlite:PATH, a file path, or postgres://…".into(),
            })
        }
    }
}

/// Connection and retry settings. The defaults suit the daemon and the API alike.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Pool size. SQLite serializes writers anyway; more connections only help readers.
    pub max_connections: u32,
    /// How long an operation waits for a pooled connection before [`StoreError::PoolTimeout`].
    pub acquire_timeout: Duration,
    /// SQLite's own wait for a lock (`PRAGMA busy_timeout`) per attempt.
    pub busy_timeout: Duration,
    /// Further attempts of a whole transaction after contention, with jittered exponential
    /// backoff from 10 ms (capped at 1 s), before [`StoreError::Busy`].
    pub busy_retries: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            busy_timeout: Duration::from_secs(5),
            busy_retries: 5,
        }
    }
}

/// The job database. Cheap to clone (it is a connection pool); share one per process.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Inner,
    busy_retries: u32,
}

#[derive(Debug, Clone)]
enum Inner {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

// Runs one backend operation, retrying the whole transaction on contention. The call is
// written once and expanded for each backend, whose methods share names and signatures.
macro_rules! with_retry {
    ($self:ident, |$b:ident| $call:expr) => {{
        use backon::Retryable;
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let run = || async {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match &$self.inner {
                Inner::Sqlite($b) => $call.await,
                Inner::Postgres($b) => $call.await,
            }
        };
        run.retry(busy_backoff($self.busy_retries))
            .when(|e: &StoreError| e.is_contention())
            .await
            .map_err(|e| e.after_attempts(attempts.load(std::sync::atomic::Ordering::Relaxed)))
    }};
}

/// 10 ms doubling to 1 s, jittered: a herd of writers that collided once must not collide again
/// in lockstep.
fn busy_backoff(retries: u32) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_secs(1))
        .with_max_times(retries as usize)
        .with_jitter()
}

impl Store {
    /// Connects with default options and brings the schema up to date.
    pub async fn connect(url: &str) -> StoreResult<Store> {
        Store::connect_with(url, StoreOptions::default()).await
    }

    /// Connects (`sqlite:PATH` creating the file and its directory if missing, or
    /// `postgres://…`) and runs the migrations.
    pub async fn connect_with(url: &str, options: StoreOptions) -> StoreResult<Store> {
        let inner = match BackendKind::from_url(url)? {
            BackendKind::Sqlite => {
                Inner::Sqlite(sqlite::SqliteStore::connect(url, &options).await?)
            }
            BackendKind::Postgres => {
                Inner::Postgres(postgres::PgStore::connect(url, &options).await?)
            }
        };
        let store = Store {
            inner,
            busy_retries: options.busy_retries,
        };
        // Two processes starting on a fresh SQLite file race to create the schema; the loser
        // sees a busy/stale snapshot, and on retry finds the migration applied.
        with_retry!(store, |b| b.migrate())?;
        Ok(store)
    }

    pub fn backend(&self) -> BackendKind {
        match self.inner {
            Inner::Sqlite(_) => BackendKind::Sqlite,
            Inner::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// A round trip to the database (for `/readyz`).
    pub async fn ping(&self) -> StoreResult<()> {
        with_retry!(self, |b| b.ping())
    }

    /// Closes the pool, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        match &self.inner {
            Inner::Sqlite(b) => b.close().await,
            Inner::Postgres(b) => b.close().await,
        }
    }

    // ---- users -------------------------------------------------------------------------

    /// Adds a user. An existing id or token hash is [`StoreError::Conflict`].
    pub async fn create_user(
        &self,
        id: &str,
        token_hash: &str,
        is_admin: bool,
    ) -> StoreResult<UserRecord> {
        non_empty("user id", id)?;
        non_empty("token hash", token_hash)?;
        with_retry!(self, |b| b.create_user(id, token_hash, is_admin))
    }

    pub async fn user_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<UserRecord>> {
        with_retry!(self, |b| b.user_by_token_hash(token_hash))
    }

    pub async fn get_user(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        with_retry!(self, |b| b.get_user(id))
    }

    // ---- jobs --------------------------------------------------------------------------

    /// Creates the job (`pending`) and one `pending` emoji row per label (fence 1, attempts 0)
    /// in one transaction. A job needs 1 to [`MAX_EMOJI`] labels: a job without emoji could
    /// never settle.
    pub async fn create_job(&self, job: &NewJob) -> StoreResult<JobRecord> {
        non_empty("job id", &job.id)?;
        non_empty("user id", &job.user_id)?;
        check_labels(job)?;
        Ok(with_retry!(self, |b| b.create_job(job, None))?.0)
    }

    /// [`Store::create_job`] and a charge for it, in one transaction: a refused charge
    /// ([`StoreError::InsufficientCredits`], [`StoreError::UnknownUser`]) creates nothing. The
    /// charge's key is `charge:{job_id}:generate_set:-:1`.
    pub async fn create_job_charged(
        &self,
        job: &NewJob,
        charge: Charge<'_>,
    ) -> StoreResult<(JobRecord, Charged)> {
        non_empty("job id", &job.id)?;
        non_empty("user id", &job.user_id)?;
        positive(charge.amount)?;
        check_labels(job)?;
        let (rec, charged) = with_retry!(self, |b| b.create_job(job, Some(&charge)))?;
        let charged = charged.ok_or_else(|| StoreError::Corrupt("charge not recorded".into()))?;
        Ok((rec, charged))
    }

    /// The job and its emoji rows, read from one snapshot (so a reader never sees emoji 0 done
    /// without the thumbnail written with it).
    pub async fn get_job(&self, id: &str) -> StoreResult<Option<JobRecord>> {
        with_retry!(self, |b| b.get_job(id))
    }

    /// Jobs newest first (all users when `user_id` is `None`), each with its emoji rows, for
    /// the archive.
    pub async fn list_jobs(
        &self,
        user_id: Option<&str>,
        limit: u32,
        offset: u32,
    ) -> StoreResult<Vec<JobRecord>> {
        with_retry!(self, |b| b.list_jobs(user_id, limit, offset))
    }

    /// Sets the job's status outright (the worker's bookkeeping outside emoji writes, e.g. a
    /// pose failure). Returns whether the job exists.
    pub async fn set_job_status(&self, job_id: &str, status: JobStatus) -> StoreResult<bool> {
        with_retry!(self, |b| b.set_job_status(job_id, status))
    }

    /// Records the pose image's key. Returns whether the job exists.
    pub async fn set_pose_key(&self, job_id: &str, key: &str) -> StoreResult<bool> {
        non_empty("pose key", key)?;
        with_retry!(self, |b| b.set_pose_key(job_id, key))
    }

    // ---- emoji: worker side --------------------------------------------------------------

    /// Moves the row to `running` if it still carries `fence` and is `pending` (or `running`:
    /// the same message redelivered after its worker died), counts the attempt, and moves a
    /// `pending` job to `running`.
    pub async fn start_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: u64,
    ) -> StoreResult<StartOutcome> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b.start_emoji(job_id, idx, fence))
    }

    /// Writes a result in ONE transaction: the row (`done`, image key, seed, error cleared)
    /// only if it still carries the message's fence and is `pending`/`running`; for emoji 0
    /// also `jobs.thumbnail_path/_key`; then the job's status if every emoji has settled.
    /// Emoji 0 without a (non-empty) thumbnail is refused before anything is written.
    pub async fn finish_emoji(&self, outcome: &EmojiOutcome) -> StoreResult<WriteOutcome> {
        let fence = fence_param(outcome.fence)?;
        non_empty("image key", &outcome.image_key)?;
        if outcome.idx == 0 {
            match &outcome.thumbnail {
                Some(t) if !t.path.trim().is_empty() && !t.key.trim().is_empty() => {}
                _ => {
                    return Err(StoreError::invalid(
                        "emoji 0 must be written with a non-empty thumbnail path and key",
                    ));
                }
            }
        }
        with_retry!(self, |b| b.finish_emoji(outcome, fence))
    }

    /// Marks the row `failed` with `error` (fenced, from `pending`/`running`), then settles
    /// the job as [`Store::finish_emoji`] does.
    pub async fn fail_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: u64,
        error: &str,
    ) -> StoreResult<WriteOutcome> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b.fail_emoji(job_id, idx, fence, error))
    }

    /// Fails every unsettled row of the job that still carries `fence` (a dead-lettered or
    /// failed `generate_set`), then settles the job. Returns the indexes it failed, or `None`
    /// when the job does not exist.
    pub async fn fail_unsettled(
        &self,
        job_id: &str,
        fence: u64,
        error: &str,
    ) -> StoreResult<Option<Vec<u32>>> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b.fail_unsettled(job_id, fence, error))
    }

    /// `done → approved`, fenced.
    pub async fn approve_emoji(
        &self,
        job_id: &str,
        idx: u32,
        fence: u64,
    ) -> StoreResult<WriteOutcome> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b.approve_emoji(job_id, idx, fence, None))
    }

    /// `done → approved` with the row's animation (the key of its animated WebP) written in
    /// the same fenced statement: a stale animator cannot attach a clip of a replaced image,
    /// and an approved row never lacks the animation it was approved with. A retry or
    /// regenerate of the row clears the key again (its pre-flip).
    pub async fn approve_emoji_animated(
        &self,
        job_id: &str,
        idx: u32,
        fence: u64,
        animation_key: &str,
    ) -> StoreResult<WriteOutcome> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b.approve_emoji(
            job_id,
            idx,
            fence,
            Some(animation_key)
        ))
    }

    /// Approves every `done` row of the job at once. Returns the indexes this call approved
    /// (so two concurrent calls approve each emoji once between them), or `None` when the job
    /// does not exist.
    pub async fn approve_all(&self, job_id: &str) -> StoreResult<Option<Vec<u32>>> {
        with_retry!(self, |b| b.approve_all(job_id))
    }

    /// Counts an attempt outside [`Store::start_emoji`]. Returns the new count, or `None` when
    /// the row does not exist.
    pub async fn bump_attempts(&self, job_id: &str, idx: u32) -> StoreResult<Option<u32>> {
        with_retry!(self, |b| b.bump_attempts(job_id, idx))
    }

    // ---- emoji: enqueue side -------------------------------------------------------------

    /// The synchronous pre-flip (seed log, layer 2): if the row's status is one of `expected`,
    /// set it `pending` with `fence + 1`, clear its error and attempts, and put a settled job
    /// back to `pending`; else report the status it has. One conditional `UPDATE … RETURNING`
    /// decides, so of any number of concurrent callers exactly one wins.
    pub async fn preflip_emoji(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
    ) -> StoreResult<PreflipOutcome> {
        if expected.is_empty() {
            return Err(StoreError::invalid(
                "preflip needs at least one expected status",
            ));
        }
        Ok(with_retry!(self, |b| b.preflip(job_id, idx, expected, false, None))?.0)
    }

    /// Like [`Store::preflip_emoji`] but keeps the status: only the fence moves. For actions
    /// that the worker applies to the row as it is (approve: the row must stay `done` for the
    /// worker's `done → approved`), so that an older message for the row becomes stale.
    pub async fn bump_fence(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
    ) -> StoreResult<PreflipOutcome> {
        if expected.is_empty() {
            return Err(StoreError::invalid(
                "bump_fence needs at least one expected status",
            ));
        }
        Ok(with_retry!(self, |b| b.preflip(job_id, idx, expected, true, None))?.0)
    }

    /// The pre-flip ([`Store::preflip_emoji`], or [`Store::bump_fence`] with `keep_status`)
    /// and, when it flips, `charge` for `action` on the new fence, in ONE transaction: both
    /// or neither. A refused charge leaves the row untouched. The charge key is
    /// `charge:{job_id}:{action}:{idx}:{new fence}`.
    pub async fn preflip_charged(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
        keep_status: bool,
        action: Action,
        charge: Charge<'_>,
    ) -> StoreResult<(PreflipOutcome, Option<Charged>)> {
        if expected.is_empty() {
            return Err(StoreError::invalid(
                "preflip needs at least one expected status",
            ));
        }
        positive(charge.amount)?;
        with_retry!(self, |b| b.preflip(
            job_id,
            idx,
            expected,
            keep_status,
            Some((action, &charge))
        ))
    }

    /// approve-all's pre-flip: bumps the fence of every `done` row (status kept) and, with
    /// `charge`, charges each bumped row once (`charge:{job_id}:approve_all:{idx}:{fence}`), in
    /// one transaction. Returns the bumped `(idx, new fence)` pairs and the charges, or `None`
    /// when the job does not exist.
    pub async fn bump_done(
        &self,
        job_id: &str,
        charge: Option<Charge<'_>>,
    ) -> StoreResult<Option<(Vec<(u32, u64)>, Vec<Charged>)>> {
        if let Some(c) = &charge {
            positive(c.amount)?;
        }
        with_retry!(self, |b| b.bump_done(job_id, charge.as_ref()))
    }

    /// Undoes a pre-flip whose entry could not be dispatched: if the row still carries `fence`
    /// and the status the flip gave it (`flipped_to`), it goes back to `restore` with `error`,
    /// and its fence moves on once more (so an entry that did reach the stream after all is
    /// stale). Returns false — nothing changed — when the row has moved on, e.g. a worker
    /// already started it: then the dispatch did happen.
    pub async fn revert_preflip(
        &self,
        job_id: &str,
        idx: u32,
        fence: u64,
        flipped_to: EmojiStatus,
        restore: EmojiStatus,
        error: Option<&str>,
    ) -> StoreResult<bool> {
        let fence = fence_param(fence)?;
        with_retry!(self, |b| b
            .revert_preflip(job_id, idx, fence, flipped_to, restore, error))
    }

    // ---- dispatch: the transactional outbox ---------------------------------------------

    /// [`Store::create_job`] (and its charge, when given) plus the outbox entry of its
    /// `generate_set` message, in one transaction.
    ///
    /// With `idem_key`, the job's id is stored against `(user, key)` in the same transaction;
    /// a key already used by this user is [`StoreError::IdemKeyTaken`] with the first job's id,
    /// and nothing is written or charged.
    pub async fn create_job_dispatching(
        &self,
        job: &NewJob,
        charge: Option<Charge<'_>>,
        idem_key: Option<&str>,
    ) -> StoreResult<(JobRecord, Option<Charged>, OutboxEntry)> {
        non_empty("job id", &job.id)?;
        non_empty("user id", &job.user_id)?;
        if let Some(c) = &charge {
            positive(c.amount)?;
        }
        check_labels(job)?;
        let (rec, charged, entry) = with_retry!(self, |b| b.create_job_keyed(
            job,
            charge.as_ref(),
            true,
            idem_key
        ))?;
        let entry = entry.ok_or_else(|| StoreError::Corrupt("outbox entry not written".into()))?;
        Ok((rec, charged, entry))
    }

    /// The pre-flip of one emoji for `action` (status kept with `keep_status`), its charge
    /// when given, and the outbox entry of the message, in ONE transaction.
    #[allow(clippy::too_many_arguments)]
    pub async fn preflip_dispatching(
        &self,
        job_id: &str,
        idx: u32,
        expected: &[EmojiStatus],
        keep_status: bool,
        action: Action,
        user_id: &str,
        charge: Option<Charge<'_>>,
    ) -> StoreResult<(PreflipOutcome, Option<Charged>, Option<OutboxEntry>)> {
        if expected.is_empty() {
            return Err(StoreError::invalid(
                "preflip needs at least one expected status",
            ));
        }
        if let Some(c) = &charge {
            positive(c.amount)?;
        }
        with_retry!(self, |b| b.preflip_outboxed(
            job_id,
            idx,
            expected,
            keep_status,
            action,
            charge.as_ref(),
            Some(user_id)
        ))
    }

    /// approve-all's pre-flip ([`Store::bump_done`]) plus the outbox entry of its message.
    pub async fn bump_done_dispatching(
        &self,
        job_id: &str,
        user_id: &str,
        charge: Option<Charge<'_>>,
    ) -> StoreResult<Option<(Vec<(u32, u64)>, Vec<Charged>, Option<OutboxEntry>)>> {
        if let Some(c) = &charge {
            positive(c.amount)?;
        }
        with_retry!(self, |b| b.bump_done_outboxed(
            job_id,
            charge.as_ref(),
            Some(user_id)
        ))
    }

    /// The job a user's generate-set idempotency key created, if any.
    pub async fn job_for_idempotency_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> StoreResult<Option<String>> {
        with_retry!(self, |b| b.job_for_key(user_id, key))
    }

    /// Records that `id` was published now. Returns whether the entry exists.
    pub async fn outbox_published(&self, id: &str) -> StoreResult<bool> {
        with_retry!(self, |b| b.outbox_published(id))
    }

    /// Withdraws an entry that was never published (the enqueue side's rollback after a
    /// failed dispatch). Returns false when it was already published (by the relay): then
    /// the message is out and the action stands.
    pub async fn outbox_withdraw(&self, id: &str) -> StoreResult<bool> {
        with_retry!(self, |b| b.outbox_withdraw(id))
    }

    /// The entry `id`, if it is still in the outbox.
    pub async fn outbox_entry(&self, id: &str) -> StoreResult<Option<OutboxEntry>> {
        with_retry!(self, |b| b.outbox_entry(id))
    }

    /// Removes an entry whose rows have moved on, or whose message the worker gave up on.
    pub async fn outbox_remove(&self, id: &str) -> StoreResult<bool> {
        with_retry!(self, |b| b.outbox_remove(id))
    }

    /// Entries due for the relay (never published, created before `unpublished_before`) or
    /// for the reconciler's check (last published before `published_before`), oldest first.
    pub async fn outbox_due(
        &self,
        unpublished_before: DateTime<Utc>,
        published_before: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<OutboxEntry>> {
        with_retry!(self, |b| b.outbox_due(
            unpublished_before,
            published_before,
            limit
        ))
    }

    pub async fn outbox_stats(&self) -> StoreResult<OutboxStats> {
        with_retry!(self, |b| b.outbox_stats())
    }

    // ---- credits -----------------------------------------------------------------------

    /// Takes `amount` (> 0) from the user's balance, refusing with
    /// [`StoreError::InsufficientCredits`] (nothing written) when the balance would go below
    /// zero. A repeated `idem_key` is [`LedgerOutcome::AlreadyApplied`].
    pub async fn charge(
        &self,
        user_id: &str,
        amount: i64,
        reason: &str,
        idem_key: &str,
    ) -> StoreResult<LedgerOutcome> {
        let delta = positive(amount)?
            .checked_neg()
            .ok_or_else(|| StoreError::invalid("amount too large"))?;
        non_empty("idempotency key", idem_key)?;
        with_retry!(self, |b| b
            .apply_ledger(user_id, delta, reason, idem_key, true))
    }

    /// Gives back `amount` (> 0), exactly once per `idem_key` (derive it from the charge's).
    pub async fn refund(
        &self,
        user_id: &str,
        amount: i64,
        reason: &str,
        idem_key: &str,
    ) -> StoreResult<LedgerOutcome> {
        let delta = positive(amount)?;
        non_empty("idempotency key", idem_key)?;
        with_retry!(self, |b| b
            .apply_ledger(user_id, delta, reason, idem_key, false))
    }

    /// Adds `amount` (> 0): admin top-ups and sign-up credit, once per `idem_key`.
    pub async fn grant(
        &self,
        user_id: &str,
        amount: i64,
        reason: &str,
        idem_key: &str,
    ) -> StoreResult<LedgerOutcome> {
        self.refund(user_id, amount, reason, idem_key).await
    }

    /// Gives back the charge recorded under `charge_key`, to the user it was taken from and
    /// for the amount taken, at most once (the refund's key is
    /// [`crate::job::refund_key`]`(charge_key)`), whichever path asks first: the API's
    /// compensating rollback or the worker's dead letter.
    pub async fn refund_charge(
        &self,
        charge_key: &str,
        reason: &str,
    ) -> StoreResult<RefundOutcome> {
        non_empty("charge key", charge_key)?;
        with_retry!(self, |b| b.refund_charge(charge_key, reason))
    }

    /// The sum of the user's ledger (0 for a user without entries).
    pub async fn balance(&self, user_id: &str) -> StoreResult<i64> {
        with_retry!(self, |b| b.balance(user_id))
    }
}

// ---- helpers shared by the backends ---------------------------------------------------------

/// Now, at the precision both backends store (microseconds), so values read back equal.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// SQLite's timestamp text: fixed width, so text order is time order.
fn format_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("timestamp `{s}`: {e}")))
}

fn parse_emoji_status(s: &str) -> StoreResult<EmojiStatus> {
    EmojiStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("emoji status `{s}`")))
}

fn parse_job_status(s: &str) -> StoreResult<JobStatus> {
    JobStatus::parse(s).ok_or_else(|| StoreError::Corrupt(format!("job status `{s}`")))
}

/// Fences are `u64` in messages and `BIGINT` in the database; 0 is never valid.
fn fence_param(fence: u64) -> StoreResult<i64> {
    match i64::try_from(fence) {
        Ok(f) if f >= 1 => Ok(f),
        _ => Err(StoreError::invalid(format!(
            "fence {fence} is outside 1..=i64::MAX"
        ))),
    }
}

fn stored_u32(v: i64, what: &str) -> StoreResult<u32> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

fn stored_u64(v: i64, what: &str) -> StoreResult<u64> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v}")))
}

// Seeds use all 64 bits (the engine's ChaCha streams take a u64); BIGINT is signed, so the bit
// pattern is stored as is and a seed above i64::MAX reads as negative in SQL, losslessly.
fn seed_to_db(seed: u64) -> i64 {
    seed as i64
}

fn seed_from_db(v: i64) -> u64 {
    v as u64
}

/// A job needs 1 to [`MAX_EMOJI`] labels: a job without emoji could never settle.
fn check_labels(job: &NewJob) -> StoreResult<()> {
    if job.labels.is_empty() || job.labels.len() > MAX_EMOJI as usize {
        return Err(StoreError::invalid(format!(
            "a job needs 1 to {MAX_EMOJI} emoji labels, got {}",
            job.labels.len()
        )));
    }
    Ok(())
}

fn non_empty(what: &'static str, s: &str) -> StoreResult<()> {
    if s.trim().is_empty() {
        return Err(StoreError::invalid(format!("{what} must not be empty")));
    }
    Ok(())
}

fn positive(amount: i64) -> StoreResult<i64> {
    if amount <= 0 {
        return Err(StoreError::invalid(format!(
            "credit amounts are positive, got {amount}"
        )));
    }
    Ok(amount)
}

use crate::redact::redact_url as redact;

/// Migrations compiled into the binary (`include_str!`, so editing a file rebuilds the
/// crate), checked by sqlx's migrator: an applied migration whose text changed is refused.
#[derive(Debug)]
struct Embedded(&'static [(i64, &'static str, &'static str)]);

type BoxDynError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|&(version, description, sql)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(description),
                        MigrationType::Simple,
                        sql.into_sql_str(),
                        false,
                    )
                })
                .collect())
        })
    }
}

async fn migrator(list: &'static [(i64, &'static str, &'static str)]) -> StoreResult<Migrator> {
    Ok(Migrator::new(Embedded(list)).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend_and_bad_ones_are_permanent() {
        assert_eq!(
            BackendKind::from_url("sqlite://x.db").unwrap(),
            BackendKind::Sqlite
        );
        assert_eq!(
            BackendKind::from_url("sqlite::memory:").unwrap(),
            BackendKind::Sqlite
        );
        assert_eq!(
            BackendKind::from_url("data/popcon.db").unwrap(),
            BackendKind::Sqlite
        );
        assert_eq!(
            BackendKind::from_url("postgres://u@h/db").unwrap(),
            BackendKind::Postgres
        );
        let err = BackendKind::from_url("mysql://u:secret@h/db").unwrap_err();
        assert!(!err.is_retryable());
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn timestamps_are_fixed_width_and_round_trip() {
        let a = DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let b = a + chrono::Duration::microseconds(1500);
        assert_eq!(format_ts(a), "2026-11-29T10:00:00.000000Z");
        assert_eq!(format_ts(a).len(), format_ts(b).len());
        assert!(format_ts(a) < format_ts(b));
        assert_eq!(parse_ts(&format_ts(b)).unwrap(), b);
    }

    #[test]
    fn fences_and_seeds_convert_losslessly_or_refuse() {
        assert!(fence_param(0).is_err());
        assert!(fence_param(u64::MAX).is_err());
        assert_eq!(fence_param(7).unwrap(), 7);
        for s in [0, 1, i64::MAX as u64, u64::MAX] {
            assert_eq!(seed_from_db(seed_to_db(s)), s);
        }
    }

    #[test]
    fn busy_backoff_is_bounded_in_count_and_size() {
        let delays: Vec<Duration> = backon::BackoffBuilder::build(busy_backoff(6)).collect();
        assert_eq!(delays.len(), 6, "{delays:?}");
        // Jitter adds up to one more delay's worth on top of each step.
        assert!(delays[0] <= Duration::from_millis(20), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(2)),
            "{delays:?}"
        );
        assert!(
            backon::BackoffBuilder::build(busy_backoff(0))
                .next()
                .is_none()
        );
    }
}
