//! One error type for everything the queue does, split into what a retry can fix and what it
//! cannot.
//!
//! Retryable: the connection (refused, dropped, timed out), a server that is loading its data
//! set or running a slow script (`LOADING`, `BUSY`), a missing consumer group after a Redis
//! restart without persistence (`NOGROUP`: the next start-up or claim recreates it), fail-over
//! states (`READONLY`, `MASTERDOWN`, `TRYAGAIN`) and `OOM`. Permanent: a bad URL or argument, an
//! authentication failure, a reply this code does not understand, a wrong key type.
//!
//! "Retryable" says the *condition* may pass; it does not say the *command* may be resent. A
//! non-idempotent command (`XADD`, `SET NX`, a claim) that failed on a dropped connection may
//! or may not have run; the callers in this module never resend those blindly.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis could not be reached at start-up within the configured patience.
    #[error(
        "redis at {url} is unreachable after {attempts} attempts over {waited:?} \
         (is redis-server running and REDIS_URL right?): {source}"
    )]
    Unavailable {
        url: String,
        attempts: u32,
        waited: Duration,
        #[source]
        source: RedisError,
    },
    /// An error from Redis or the connection to it.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// The queue configuration cannot work (bad URL, zero lease, ...).
    #[error("invalid queue configuration: {0}")]
    Config(String),
    /// A caller passed something the queue refuses (a zero TTL, a job id that would break the
    /// key scheme).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Redis answered with something this code does not understand.
    #[error("unexpected reply to {what}: {detail}")]
    Protocol { what: &'static str, detail: String },
    /// The named entry does not exist (e.g. a dead letter that was already requeued).
    #[error("not found: {0}")]
    NotFound(String),
}

pub type Result<T, E = QueueError> = std::result::Result<T, E>;

impl QueueError {
    /// Whether waiting and trying again can succeed (see the module header for the split).
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Unavailable { .. } => true,
            QueueError::Redis(e) => redis_retryable(e),
            QueueError::Config(_)
            | QueueError::InvalidArgument(_)
            | QueueError::Protocol { .. }
            | QueueError::NotFound(_) => false,
        }
    }

    /// Whether the error says the consumer group (or its stream) is missing, as after a
    /// Redis restart without persistence.
    pub fn is_no_group(&self) -> bool {
        matches!(self, QueueError::Redis(e) if is_no_group(e))
    }

    pub(crate) fn protocol(what: &'static str, detail: impl Into<String>) -> Self {
        QueueError::Protocol {
            what,
            detail: detail.into(),
        }
    }
}

pub(crate) fn is_no_group(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// The retryable/permanent split for a raw redis error.
pub(crate) fn redis_retryable(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    match e.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => true,
        ErrorKind::AuthenticationFailed
        | ErrorKind::InvalidClientConfig
        | ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType => false,
        _ => {
            matches!(
                e.code(),
                Some(
                    "BUSY" | "LOADING" | "NOGROUP" | "OOM" | "MASTERDOWN" | "TRYAGAIN" | "READONLY"
                )
            ) || is_no_group(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_retryable_and_config_errors_are_not() {
        let io = QueueError::Redis(RedisError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(io.is_retryable());
        let timeout = QueueError::Redis(RedisError::from(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )));
        assert!(timeout.is_retryable());
        let bad_type = QueueError::Redis(RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "not a stream",
        )));
        assert!(!bad_type.is_retryable());
        assert!(!QueueError::Config("lease is zero".into()).is_retryable());
        assert!(!QueueError::protocol("XPENDING", "odd").is_retryable());
    }
}
