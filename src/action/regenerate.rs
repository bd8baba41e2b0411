//! Regenerate one done, failed or approved emoji: a new seed per fence, so every click is a new
//! picture and a replayed message is the same one. Regenerating an approved emoji takes it
//! back to `pending` and clears its animation (the pre-flip's statement does both).

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::Regenerate,
    name: "regenerate",
    from: &[
        EmojiStatus::Done,
        EmojiStatus::Failed,
        EmojiStatus::Approved,
    ],
    lane: Lane::Interactive,
    costly: true,
    needs_idx: true,
    price_key: "regenerate",
    price: |p| p.regenerate,
    seed: SeedRule::PerFence,
    preflip: Preflip::ToPending,
    step: Step::Render,
};
