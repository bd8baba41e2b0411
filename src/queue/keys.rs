//! Key names: exactly the table of `DESIGN.md` ("Queue contract"), under a configurable prefix.
//!
//! Every Redis key this crate touches is spelled here and nowhere else, so an API written in
//! another language can be checked against one file.

use crate::job::{Action, Lane, ValidJob};

/// The consumer group on both work streams.
pub const GROUP: &str = "workers";

/// The prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "popcon:";

/// Key names under one prefix (`popcon:` by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{p}jobs:interactive` or `{p}jobs:bulk`.
    pub fn stream(&self, lane: Lane) -> String {
        format!("{}jobs:{}", self.prefix, lane.as_str())
    }

    /// `{p}jobs:dead`: dead letters (original fields + reason + delivery count).
    pub fn dead(&self) -> String {
        format!("{}jobs:dead", self.prefix)
    }

    /// `{p}claim:{job_id}:{action}-{idx}`: the enqueue side's double-click guard (`SET NX EX
    /// 30`). A whole-set action (`approve_all`) has no index and uses `all`.
    pub fn claim(&self, job_id: &str, action: Action, idx: Option<u32>) -> String {
        match idx {
            Some(i) => format!("{}claim:{job_id}:{action}-{i}", self.prefix),
            None => format!("{}claim:{job_id}:{action}-all", self.prefix),
        }
    }

    /// `{p}run:{job_id}:{action}:{idx}` (`-` for set actions): the worker's run-once guard.
    pub fn run(&self, job: &ValidJob) -> String {
        format!("{}run:{}", self.prefix, job.run_key_suffix())
    }

    /// `{p}off_hours`: string `true` with a TTL of at most 20 h.
    pub fn off_hours(&self) -> String {
        format!("{}off_hours", self.prefix)
    }

    /// `{p}cancel:{job_id}`: checked between diffusion steps.
    pub fn cancel(&self, job_id: &str) -> String {
        format!("{}cancel:{job_id}", self.prefix)
    }

    /// `{p}progress:{job_id}`: hash of step / total / stage per emoji.
    pub fn progress(&self, job_id: &str) -> String {
        format!("{}progress:{job_id}", self.prefix)
    }
}

/// Both work streams in the order they are read: interactive first.
pub const LANES: [Lane; 2] = [Lane::Interactive, Lane::Bulk];

/// The lane a stream field (`stream` in a dead letter) names.
pub fn parse_lane(s: &str) -> Option<Lane> {
    LANES.into_iter().find(|l| l.as_str() == s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_design_table() {
        let k = Keys::default();
        assert_eq!(k.stream(Lane::Interactive), "popcon:jobs:interactive");
        assert_eq!(k.stream(Lane::Bulk), "popcon:jobs:bulk");
        assert_eq!(k.dead(), "popcon:jobs:dead");
        assert_eq!(
            k.claim("j1", Action::Retry, Some(3)),
            "popcon:claim:j1:retry-3"
        );
        assert_eq!(
            k.claim("j1", Action::ApproveAll, None),
            "popcon:claim:j1:approve_all-all"
        );
        assert_eq!(k.off_hours(), "popcon:off_hours");
        assert_eq!(k.cancel("j1"), "popcon:cancel:j1");
        assert_eq!(k.progress("j1"), "popcon:progress:j1");
        let job = ValidJob::from_field(Some(
            r#"{"v":1,"job_id":"j1","user_id":"u","action":"regenerate","idx":4,"fence":2,"enqueued_at":"2026-11-29T10:00:00Z"}"#,
        ))
        .unwrap();
        assert_eq!(k.run(&job), "popcon:run:j1:regenerate:4");
        assert_eq!(Keys::new("t:").dead(), "t:jobs:dead");
        assert_eq!(parse_lane("bulk"), Some(Lane::Bulk));
        assert_eq!(parse_lane("x"), None);
    }
}
