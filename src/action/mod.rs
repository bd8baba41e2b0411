//! One file per action: everything that differs between generate-set, retry, regenerate,
//! approve and approve-all is written once, in that action's file, as a [`Spec`]; the enqueue
//! side, the queue and the worker read it instead of matching on [`Action`] themselves.
//!
//! | file | from | lane | costly | price key | seed | pre-flip | worker step |
//! |---|---|---|---|---|---|---|---|
//! | [`generate_set`] | pending (new rows) | bulk | yes | `generate_set` (per emoji) | the set's | creates the rows | render the set |
//! | [`retry`] | failed | interactive | yes | `retry` | the row's | → pending, new fence | render one |
//! | [`regenerate`] | done, failed, approved | interactive | yes | `regenerate` | new per fence | → pending, new fence, animation cleared | render one |
//! | [`approve`] | done | interactive | yes | `approve` | new per fence | keeps done, new fence | animate one, approve |
//! | [`approve_all`] | done | bulk | yes | `approve_all` (per emoji) | new per row fence | keeps done, new fences | animate all done, approve each |
//!
//! Adding an action: a variant of [`Action`], a file here with its `SPEC`, a line in [`spec`].
//! What a step *does* (the diffusion pipelines, the fenced writes) stays with the worker, the
//! pipelines and the store; the spec says which one runs.

pub mod approve;
pub mod approve_all;
pub mod generate_set;
pub mod regenerate;
pub mod retry;

use crate::enqueue::Prices;
use crate::job::{Action, EmojiStatus, Lane};

/// How the worker picks an emoji's seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedRule {
    /// Derived from the set's seed and the emoji's index: the same image again.
    Row,
    /// Derived from the set's seed, the index and the row's fence: a new image per click.
    PerFence,
    /// No image is made.
    None,
}

/// What the enqueue side does to the row in the charge transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preflip {
    /// The rows are created `pending` with the job (fence 1).
    CreateRows,
    /// The row goes to `pending` with a new fence: the old result is being replaced.
    ToPending,
    /// The row keeps its status and gets a new fence: the worker's write is the change.
    KeepStatus,
}

/// Which worker step runs a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Diffusion: the pose when the set has none, then the message's emoji as one batch.
    Render,
    /// Animate one done row, then its fenced approval with the animation.
    AnimateOne,
    /// The same for every done row of the set, clips batched.
    AnimateAll,
}

impl Step {
    /// Whether the step makes pixels on the GPU (every step does now: animation included).
    pub fn is_gpu_work(self) -> bool {
        matches!(self, Step::Render | Step::AnimateOne | Step::AnimateAll)
    }

    /// Whether a failure fails the rows: a failed render leaves no image, while a failed
    /// animation leaves the still `done` (refunded, approvable again).
    pub fn fails_rows(self) -> bool {
        self == Step::Render
    }
}

/// Everything an action is, apart from the code of its step.
#[derive(Debug)]
pub struct Spec {
    pub action: Action,
    /// The wire name (queue messages, claim keys, prices, metrics labels).
    pub name: &'static str,
    /// The statuses a row may have for the action to start on it.
    pub from: &'static [EmojiStatus],
    pub lane: Lane,
    /// Whether it spends GPU time: not claimed while the off-hours flag is set.
    pub costly: bool,
    /// Whether the message names one emoji (`idx`).
    pub needs_idx: bool,
    /// The key in `--prices` / the `prices` setting.
    pub price_key: &'static str,
    /// Its price for one emoji (per emoji of the set for set actions).
    pub price: fn(&Prices) -> i64,
    pub seed: SeedRule,
    pub preflip: Preflip,
    pub step: Step,
}

/// The spec of `action`.
pub fn spec(action: Action) -> &'static Spec {
    match action {
        Action::GenerateSet => &generate_set::SPEC,
        Action::Retry => &retry::SPEC,
        Action::Regenerate => &regenerate::SPEC,
        Action::Approve => &approve::SPEC,
        Action::ApproveAll => &approve_all::SPEC,
    }
}

impl Spec {
    /// Whether a row in `status` may start this action.
    pub fn allows(&self, status: EmojiStatus) -> bool {
        self.from.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_has_its_own_spec_under_its_own_name() {
        for a in Action::ALL {
            let s = spec(a);
            assert_eq!(s.action, a);
            assert_eq!(s.name, a.as_str());
            assert_eq!(s.price_key, a.as_str());
            assert!(!s.from.is_empty());
            // Every action makes pixels now (approve animates), so all are costly and seeded.
            assert_eq!(s.costly, s.step.is_gpu_work(), "{a}");
            assert_eq!(s.seed != SeedRule::None, s.step.is_gpu_work(), "{a}");
        }
    }

    #[test]
    fn prices_are_read_through_the_spec() {
        let p =
            Prices::parse("generate_set=2,retry=3,regenerate=4,approve=5,approve_all=6").unwrap();
        let got: Vec<i64> = Action::ALL.iter().map(|&a| (spec(a).price)(&p)).collect();
        assert_eq!(got, [2, 3, 4, 5, 6]);
    }
}
