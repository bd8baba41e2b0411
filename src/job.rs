//! Jobs as the queue carries them: ids, actions, statuses, and the queue message.
//!
//! An entry's `job` field holds versioned JSON (`DESIGN.md`, "Queue contract"). Anything an API
//! in any language may write is first read leniently into a [`RawMessage`], then validated into
//! a [`ValidJob`]; nothing downstream sees an unvalidated message, and every rejection carries
//! a [`MessageError`] whose text becomes the dead-letter reason.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The message format version this worker reads and writes.
pub const MESSAGE_VERSION: u32 = 1;

/// Upper bound on an emoji index: a set is at most this many emoji.
pub const MAX_EMOJI: u32 = 64;

/// What a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Pose image, then every emoji of the set.
    GenerateSet,
    /// One failed emoji again.
    Retry,
    /// One done or failed emoji with a new seed.
    Regenerate,
    /// Mark one done emoji approved.
    Approve,
    /// Mark every done emoji approved.
    ApproveAll,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::GenerateSet,
        Action::Retry,
        Action::Regenerate,
        Action::Approve,
        Action::ApproveAll,
    ];

    /// What the action is: its file under `src/action/` ([`crate::action`]).
    pub fn spec(self) -> &'static crate::action::Spec {
        crate::action::spec(self)
    }

    pub fn as_str(self) -> &'static str {
        self.spec().name
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Whether the action spends GPU time: all diffusion does. Costly work is not claimed
    /// while the off-hours flag is set.
    pub fn is_costly(self) -> bool {
        self.spec().costly
    }

    /// Whether the message must name one emoji (`idx`).
    pub fn needs_idx(self) -> bool {
        self.spec().needs_idx
    }

    /// Which stream carries it: one emoji with a person waiting, or a whole set.
    pub fn lane(self) -> Lane {
        self.spec().lane
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two work streams; interactive is always read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Interactive,
    Bulk,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Bulk => "bulk",
        }
    }
}

/// An emoji row's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EmojiStatus {
    Pending,
    Running,
    Done,
    Failed,
    Approved,
}

impl EmojiStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EmojiStatus::Pending => "pending",
            EmojiStatus::Running => "running",
            EmojiStatus::Done => "done",
            EmojiStatus::Failed => "failed",
            EmojiStatus::Approved => "approved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            EmojiStatus::Pending,
            EmojiStatus::Running,
            EmojiStatus::Done,
            EmojiStatus::Failed,
            EmojiStatus::Approved,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Whether `action` may start from this status (`DESIGN.md`, "Statuses"; the table is
    /// the actions' specs, [`crate::action`]).
    pub fn allows(self, action: Action) -> bool {
        action.spec().allows(self)
    }

    /// Whether the row has reached an outcome (no work is left on it).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            EmojiStatus::Done | EmojiStatus::Failed | EmojiStatus::Approved
        )
    }
}

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    Running,
    Done,
    Partial,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Partial => "partial",
            JobStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            JobStatus::Pending,
            JobStatus::Running,
            JobStatus::Done,
            JobStatus::Partial,
            JobStatus::Failed,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// The job's status once every emoji has settled: all good → done, none → failed.
    pub fn settled(emoji: &[EmojiStatus]) -> Option<JobStatus> {
        if emoji.is_empty() || !emoji.iter().all(|s| s.is_settled()) {
            return None;
        }
        let good = emoji
            .iter()
            .filter(|s| matches!(s, EmojiStatus::Done | EmojiStatus::Approved))
            .count();
        Some(if good == emoji.len() {
            JobStatus::Done
        } else if good == 0 {
            JobStatus::Failed
        } else {
            JobStatus::Partial
        })
    }
}

/// The message as written, before validation: every field optional, any JSON type tolerated
/// where a mistake is likely (numbers as strings), so the reason for rejecting it can be exact.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawMessage {
    pub v: Option<serde_json::Value>,
    pub job_id: Option<serde_json::Value>,
    pub user_id: Option<serde_json::Value>,
    pub action: Option<serde_json::Value>,
    pub idx: Option<serde_json::Value>,
    pub fence: Option<serde_json::Value>,
    pub enqueued_at: Option<serde_json::Value>,
}

/// A validated message: what the worker acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidJob {
    pub v: u32,
    pub job_id: String,
    pub user_id: String,
    pub action: Action,
    /// The emoji index for one-emoji actions; `None` for set actions.
    pub idx: Option<u32>,
    /// The emoji row's fence when the message was enqueued (for a set, every row's).
    pub fence: u64,
    pub enqueued_at: DateTime<Utc>,
}

/// Why a message was rejected; the text is the dead-letter reason. Always permanent: the same
/// bytes will never validate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("entry has no `job` field")]
    NoJobField,
    #[error("`job` is not valid JSON: {0}")]
    Json(String),
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("message version {0} is not supported (this worker reads version {MESSAGE_VERSION})")]
    Version(u64),
    #[error("unknown action `{0}`")]
    UnknownAction(String),
}

const MAX_ID: usize = 128;

fn id_field(v: Option<serde_json::Value>, field: &'static str) -> Result<String, MessageError> {
    let s = match v {
        None | Some(serde_json::Value::Null) => return Err(MessageError::Missing(field)),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => {
            return Err(MessageError::Invalid {
                field,
                reason: format!("expected a string, got {other}"),
            });
        }
    };
    let ok = !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(MessageError::Invalid {
            field,
            reason: format!("`{s}` is not 1-{MAX_ID} characters of [A-Za-z0-9_-]"),
        });
    }
    Ok(s)
}

fn uint_field(v: &serde_json::Value, field: &'static str) -> Result<u64, MessageError> {
    v.as_u64().ok_or_else(|| MessageError::Invalid {
        field,
        reason: format!("expected a non-negative integer, got {v}"),
    })
}

impl RawMessage {
    /// Parses the `job` field's JSON.
    pub fn parse(json: &str) -> Result<Self, MessageError> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| MessageError::Json(e.to_string()))?;
        if !value.is_object() {
            return Err(MessageError::Json("expected a JSON object".into()));
        }
        serde_json::from_value(value).map_err(|e| MessageError::Json(e.to_string()))
    }

    /// Checks every field; the first problem found is the reason.
    pub fn validate(self) -> Result<ValidJob, MessageError> {
        let v = match &self.v {
            None | Some(serde_json::Value::Null) => return Err(MessageError::Missing("v")),
            Some(v) => uint_field(v, "v")?,
        };
        if v != u64::from(MESSAGE_VERSION) {
            return Err(MessageError::Version(v));
        }
        let action = match self.action {
            None | Some(serde_json::Value::Null) => return Err(MessageError::Missing("action")),
            Some(serde_json::Value::String(s)) => {
                Action::parse(&s).ok_or(MessageError::UnknownAction(s))?
            }
            Some(other) => return Err(MessageError::UnknownAction(other.to_string())),
        };
        let job_id = id_field(self.job_id, "job_id")?;
        let user_id = id_field(self.user_id, "user_id")?;
        let idx = match (&self.idx, action.needs_idx()) {
            (None | Some(serde_json::Value::Null), true) => {
                return Err(MessageError::Missing("idx"));
            }
            (None | Some(serde_json::Value::Null), false) => None,
            (Some(v), true) => {
                let i = uint_field(v, "idx")?;
                if i >= u64::from(MAX_EMOJI) {
                    return Err(MessageError::Invalid {
                        field: "idx",
                        reason: format!("{i} is not below {MAX_EMOJI}"),
                    });
                }
                Some(i as u32)
            }
            (Some(v), false) => {
                return Err(MessageError::Invalid {
                    field: "idx",
                    reason: format!("{action} acts on the whole set; got idx {v}"),
                });
            }
        };
        let fence = match &self.fence {
            None | Some(serde_json::Value::Null) => return Err(MessageError::Missing("fence")),
            Some(v) => uint_field(v, "fence")?,
        };
        if fence == 0 {
            return Err(MessageError::Invalid {
                field: "fence",
                reason: "fences start at 1".into(),
            });
        }
        let enqueued_at = match self.enqueued_at {
            None | Some(serde_json::Value::Null) => {
                return Err(MessageError::Missing("enqueued_at"));
            }
            Some(serde_json::Value::String(s)) => DateTime::parse_from_rfc3339(&s)
                .map_err(|e| MessageError::Invalid {
                    field: "enqueued_at",
                    reason: format!("`{s}` is not an RFC 3339 time: {e}"),
                })?
                .with_timezone(&Utc),
            Some(other) => {
                return Err(MessageError::Invalid {
                    field: "enqueued_at",
                    reason: format!("expected an RFC 3339 string, got {other}"),
                });
            }
        };
        Ok(ValidJob {
            v: MESSAGE_VERSION,
            job_id,
            user_id,
            action,
            idx,
            fence,
            enqueued_at,
        })
    }
}

impl ValidJob {
    /// Reads and validates a stream entry's `job` field (`None` when the entry lacks it).
    pub fn from_field(job: Option<&str>) -> Result<Self, MessageError> {
        RawMessage::parse(job.ok_or(MessageError::NoJobField)?)?.validate()
    }

    /// The JSON for the `job` field, as the enqueue side writes it.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "v": self.v,
            "job_id": self.job_id,
            "user_id": self.user_id,
            "action": self.action,
            "idx": self.idx,
            "fence": self.fence,
            "enqueued_at": self.enqueued_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })
        .to_string()
    }

    /// The run-once key's identity: `{job_id}:{action}:{idx}` (`-` for set actions).
    pub fn run_key_suffix(&self) -> String {
        match self.idx {
            Some(i) => format!("{}:{}:{i}", self.job_id, self.action),
            None => format!("{}:{}:-", self.job_id, self.action),
        }
    }

    /// The idempotency key of the credit charge this message was paid with (see
    /// [`charge_key`]); the worker refunds it when it dead-letters the message.
    pub fn charge_key(&self) -> String {
        charge_key(&self.job_id, self.action, self.idx, self.fence)
    }
}

/// The ledger idempotency key of the charge for one action on one fence:
/// `charge:{job_id}:{action}:{idx|-}:{fence}`. Both sides derive it from what the message
/// carries, so the worker can refund exactly the charge the enqueue side made without the
/// message naming it, and one action on one fence can never be charged twice.
pub fn charge_key(job_id: &str, action: Action, idx: Option<u32>, fence: u64) -> String {
    match idx {
        Some(i) => format!("charge:{job_id}:{action}:{i}:{fence}"),
        None => format!("charge:{job_id}:{action}:-:{fence}"),
    }
}

/// The idempotency key of the refund of the charge `charge_key`: one refund per charge, however
/// many paths (API rollback, worker dead letter) try to give it back.
pub fn refund_key(charge_key: &str) -> String {
    format!("refund:{charge_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"v":1,"job_id":"j1","user_id":"u1","action":"retry","idx":2,"fence":3,"enqueued_at":"2026-11-29T10:00:00Z"}"#;

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        if value == "<absent>" {
            v.as_object_mut().unwrap().remove(field);
        } else {
            v[field] = serde_json::from_str(value).unwrap();
        }
        v.to_string()
    }

    #[test]
    fn a_good_message_validates_and_round_trips() {
        let job = ValidJob::from_field(Some(GOOD)).unwrap();
        assert_eq!(job.action, Action::Retry);
        assert_eq!(job.idx, Some(2));
        assert_eq!(job.fence, 3);
        assert_eq!(ValidJob::from_field(Some(&job.to_json())).unwrap(), job);
        assert_eq!(job.run_key_suffix(), "j1:retry:2");
    }

    #[test]
    fn every_kind_of_bad_message_has_a_precise_reason() {
        let cases = [
            (with("v", "2"), "version 2"),
            (with("v", "<absent>"), "`v` is missing"),
            (with("action", "\"paint\""), "unknown action `paint`"),
            (with("job_id", "<absent>"), "`job_id` is missing"),
            (with("job_id", "\"a b\""), "`job_id` is invalid"),
            (with("user_id", "7"), "`user_id` is invalid"),
            (with("idx", "null"), "`idx` is missing"),
            (with("idx", "-1"), "`idx` is invalid"),
            (with("idx", "64"), "not below 64"),
            (with("fence", "0"), "fences start at 1"),
            (with("fence", "\"3\""), "`fence` is invalid"),
            (with("enqueued_at", "\"yesterday\""), "RFC 3339"),
            ("not json".to_string(), "not valid JSON"),
            ("[1,2]".to_string(), "JSON object"),
        ];
        for (msg, want) in cases {
            let err = ValidJob::from_field(Some(&msg)).unwrap_err().to_string();
            assert!(err.contains(want), "{msg}: `{err}` should contain `{want}`");
        }
        assert_eq!(ValidJob::from_field(None), Err(MessageError::NoJobField));
        let set = with("action", "\"generate_set\"");
        assert!(
            ValidJob::from_field(Some(&set))
                .unwrap_err()
                .to_string()
                .contains("whole set")
        );
        let set = with("action", "\"generate_set\"").replace("\"idx\":2", "\"idx\":null");
        assert_eq!(ValidJob::from_field(Some(&set)).unwrap().idx, None);
    }

    #[test]
    fn actions_know_their_lane_cost_and_allowed_states() {
        assert!(Action::GenerateSet.is_costly() && Action::Retry.is_costly());
        assert!(Action::Approve.is_costly() && Action::ApproveAll.is_costly());
        assert_eq!(Action::Retry.lane(), Lane::Interactive);
        assert_eq!(Action::ApproveAll.lane(), Lane::Bulk);
        assert!(EmojiStatus::Failed.allows(Action::Retry));
        assert!(!EmojiStatus::Done.allows(Action::Retry));
        assert!(EmojiStatus::Done.allows(Action::Regenerate));
        assert!(EmojiStatus::Failed.allows(Action::Regenerate));
        assert!(!EmojiStatus::Pending.allows(Action::Regenerate));
        assert!(EmojiStatus::Done.allows(Action::Approve));
        assert!(!EmojiStatus::Failed.allows(Action::Approve));
    }

    #[test]
    fn job_status_settles_only_when_every_emoji_has() {
        use EmojiStatus::*;
        assert_eq!(JobStatus::settled(&[Done, Running]), None);
        assert_eq!(JobStatus::settled(&[Done, Approved]), Some(JobStatus::Done));
        assert_eq!(
            JobStatus::settled(&[Done, Failed]),
            Some(JobStatus::Partial)
        );
        assert_eq!(
            JobStatus::settled(&[Failed, Failed]),
            Some(JobStatus::Failed)
        );
        assert_eq!(JobStatus::settled(&[]), None);
    }
}
