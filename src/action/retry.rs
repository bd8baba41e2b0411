//! Retry one failed emoji: the same seed again (a transient failure should not change the
//! picture), on the interactive lane.

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::Retry,
    name: "retry",
    from: &[EmojiStatus::Failed],
    lane: Lane::Interactive,
    costly: true,
    needs_idx: true,
    price_key: "retry",
    price: |p| p.retry,
    seed: SeedRule::Row,
    preflip: Preflip::ToPending,
    step: Step::Render,
};
