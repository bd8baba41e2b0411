//! One error type for both backends, sorted by what the caller should do next.
//!
//! The worker's failure policy (daemon issue, item 6) needs exactly one bit from the store:
//! *is it worth trying this again?* A busy SQLite file, a dropped Postgres connection, an
//! exhausted pool or a serialization failure are all transient: retrying the same delivery
//! later will very likely succeed. A constraint violation, a malformed URL or a migration that
//! no longer matches the database will fail the same way forever, and retrying them only burns
//! deliveries before the inevitable dead letter. [`StoreError::is_retryable`] is that bit.
//!
//! Contention (SQLite busy/locked, Postgres serialization failure or deadlock) is special: the
//! store already retried it a bounded number of times with backoff before it surfaces, so a
//! [`StoreError::Busy`] that reaches a caller means the database stayed contended for a while.
//!
//! Errors keep the underlying `sqlx::Error` as their `source`, so logs show the driver's text,
//! but callers match on our variants only; nothing outside `store` needs to know the SQLSTATE
//! or SQLite result codes.

use std::borrow::Cow;

/// Everything the job database can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL could not be used (unknown scheme, unparsable options). Permanent.
    #[error("bad database URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },

    /// The database stayed locked (SQLite busy/locked) or kept aborting the transaction
    /// (Postgres serialization failure, deadlock) through every in-store retry. Retryable.
    #[error("database busy; gave up after {attempts} attempt(s): {source}")]
    Busy {
        attempts: u32,
        #[source]
        source: sqlx::Error,
    },

    /// The connection failed or was lost (I/O error, server shutting down). Retryable.
    #[error("database connection problem: {0}")]
    Connection(#[source] sqlx::Error),

    /// No pooled connection became free in time. Retryable.
    #[error("timed out waiting for a pooled database connection")]
    PoolTimeout,

    /// A row with the same key already exists (unique or primary key). Permanent.
    #[error("already exists: {0}")]
    Conflict(#[source] sqlx::Error),

    /// Another constraint (foreign key, check, not null) refused the write. Permanent.
    #[error("constraint violated: {0}")]
    Constraint(#[source] sqlx::Error),

    /// The schema could not be brought up to date, or an applied migration was changed after
    /// the fact. Permanent: an operator has to look.
    #[error("database migration failed: {0}")]
    Migration(#[source] sqlx::migrate::MigrateError),

    /// A charge would take the balance below zero; nothing was written.
    #[error("insufficient credits: balance {balance}, needed {needed}")]
    InsufficientCredits { balance: i64, needed: i64 },

    /// A ledger entry names a user that does not exist.
    #[error("unknown user `{0}`")]
    UnknownUser(String),

    /// An idempotency key was presented again with a different user or amount: a caller bug
    /// that must not be papered over by reporting "already applied".
    #[error("idempotency key `{key}` was already used for a different ledger entry")]
    IdemKeyReused { key: String },

    /// A generate-set idempotency key this user already used; the first job's id. Nothing was
    /// written.
    #[error("idempotency key already used for job `{0}`")]
    IdemKeyTaken(String),

    /// The caller passed something the store refuses before touching the database.
    #[error("invalid argument: {0}")]
    Invalid(Cow<'static, str>),

    /// A stored value could not be read back (an unknown status string, a bad timestamp).
    #[error("unreadable stored value: {0}")]
    Corrupt(String),

    /// The store was closed.
    #[error("the job store is closed")]
    Closed,

    /// Any other database error. Permanent.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

/// A `Result` with [`StoreError`].
pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// Whether trying the same operation again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Busy { .. } | StoreError::Connection(_) | StoreError::PoolTimeout
        )
    }

    /// Contention that the store retries itself before reporting [`StoreError::Busy`].
    pub(crate) fn is_contention(&self) -> bool {
        matches!(self, StoreError::Busy { .. })
    }

    /// Records how many attempts a contention error survived.
    pub(crate) fn after_attempts(self, n: u32) -> Self {
        match self {
            StoreError::Busy { source, .. } => StoreError::Busy {
                attempts: n,
                source,
            },
            other => other,
        }
    }

    pub(crate) fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        StoreError::Invalid(msg.into())
    }
}

// SQLite extended result codes that mean "someone else holds the lock": SQLITE_BUSY (5),
// SQLITE_LOCKED (6), BUSY_RECOVERY (261), LOCKED_SHAREDCACHE (262), BUSY_SNAPSHOT (517),
// LOCKED_VTAB (518), BUSY_TIMEOUT (773).
const SQLITE_CONTENTION: &[&str] = &["5", "6", "261", "262", "517", "518", "773"];

// Postgres SQLSTATEs after which the whole transaction can simply run again:
// serialization_failure, deadlock_detected, lock_not_available.
const PG_CONTENTION: &[&str] = &["40001", "40P01", "55P03"];

// Postgres SQLSTATE classes/codes that mean the server or the link is going away or full:
// connection_exception (08), insufficient_resources (53), operator intervention
// (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now).
fn pg_transient(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || matches!(code, "57P01" | "57P02" | "57P03")
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::error::ErrorKind;
        match e {
            sqlx::Error::Database(ref db) => {
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                if SQLITE_CONTENTION.contains(&code.as_str())
                    || PG_CONTENTION.contains(&code.as_str())
                {
                    return StoreError::Busy {
                        attempts: 1,
                        source: e,
                    };
                }
                if pg_transient(&code) {
                    return StoreError::Connection(e);
                }
                match db.kind() {
                    ErrorKind::UniqueViolation => StoreError::Conflict(e),
                    ErrorKind::ForeignKeyViolation
                    | ErrorKind::NotNullViolation
                    | ErrorKind::CheckViolation
                    | ErrorKind::ExclusionViolation => StoreError::Constraint(e),
                    _ => StoreError::Database(e),
                }
            }
            // A crashed SQLite worker thread takes its connection with it; the pool opens a new
            // one, so the next attempt can succeed.
            sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => StoreError::Connection(e),
            sqlx::Error::PoolTimedOut => StoreError::PoolTimeout,
            sqlx::Error::PoolClosed => StoreError::Closed,
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
            sqlx::Error::Migrate(m) => StoreError::from(*m),
            other => StoreError::Database(other),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        match e {
            // The migration itself could not run because the database was busy or unreachable:
            // that is the transient condition, not a broken schema.
            MigrateError::Execute(inner) | MigrateError::ExecuteMigration(inner, _) => {
                match StoreError::from(inner) {
                    retryable if retryable.is_retryable() => retryable,
                    StoreError::Database(inner) => {
                        StoreError::Migration(MigrateError::Execute(inner))
                    }
                    other => other,
                }
            }
            other => StoreError::Migration(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retryable_and_the_rest_are_not() {
        let io = StoreError::from(sqlx::Error::Io(std::io::Error::other("reset")));
        assert!(matches!(io, StoreError::Connection(_)) && io.is_retryable());
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(!StoreError::from(sqlx::Error::PoolClosed).is_retryable());
        assert!(!StoreError::from(sqlx::Error::RowNotFound).is_retryable());
        let mismatch = StoreError::from(sqlx::migrate::MigrateError::VersionMismatch(1));
        assert!(matches!(mismatch, StoreError::Migration(_)) && !mismatch.is_retryable());
        let bad = StoreError::BadUrl {
            url: "x".into(),
            reason: "y".into(),
        };
        assert!(!bad.is_retryable());
        assert!(
            !StoreError::InsufficientCredits {
                balance: 0,
                needed: 1
            }
            .is_retryable()
        );
    }

    #[test]
    fn postgres_transient_classes() {
        assert!(pg_transient("08006") && pg_transient("53300") && pg_transient("57P01"));
        assert!(!pg_transient("23505") && !pg_transient("42P01"));
    }
}
