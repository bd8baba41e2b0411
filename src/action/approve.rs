//! Approve one done emoji: the worker animates it (AnimateDiff, the costliest work there is)
//! and one fenced write makes it `approved` with its animation. The row keeps `done` (with a
//! new fence) until then, so a stale message cannot approve or animate a replaced image; the
//! clip's seed mixes the fence, so a replayed message makes the same clip.

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::Approve,
    name: "approve",
    from: &[EmojiStatus::Done],
    lane: Lane::Interactive,
    costly: true,
    needs_idx: true,
    price_key: "approve",
    price: |p| p.approve,
    seed: SeedRule::PerFence,
    preflip: Preflip::KeepStatus,
    step: Step::AnimateOne,
};
