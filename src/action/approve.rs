//! Approve one done emoji. The row keeps `done` (with a new fence) until the worker's fenced
//! write makes it `approved`, so a stale message cannot approve a replaced image.

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::Approve,
    name: "approve",
    from: &[EmojiStatus::Done],
    lane: Lane::Interactive,
    costly: false,
    needs_idx: true,
    price_key: "approve",
    price: |p| p.approve,
    seed: SeedRule::None,
    preflip: Preflip::KeepStatus,
    step: Step::ApproveOne,
};
