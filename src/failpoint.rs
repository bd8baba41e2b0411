//! Process-death failpoints for the fault tests: `POPCON_FAILPOINTS=name[,name…]` makes the
//! process SIGKILL itself when it reaches a named point, so a test can kill the `api` exactly
//! between two steps of charge → flip → dispatch, as a crash or an OOM kill would.
//!
//! The points (each named where it is hit):
//! - `dispatch.before_commit`: the charge, the pre-flip and the outbox entry are written, the
//!   transaction is not committed;
//! - `dispatch.before_publish`: committed, nothing on the stream yet;
//! - `dispatch.after_publish`: on the stream, the outbox entry not yet marked published.
//!
//! Unset (production), [`hit`] is one load of a cached empty list.

use std::sync::OnceLock;

/// The environment variable that arms failpoints.
pub const ENV: &str = "POPCON_FAILPOINTS";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Dies (SIGKILL, no unwinding, no destructors) if `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|a| a == name) {
        tracing::warn!(failpoint = name, "failpoint armed: killing the process");
        // SAFETY: kill(2) on our own pid with a constant signal has no memory effects.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
