//! Generate a set: the pose image, then every emoji of the set, on the bulk lane. The rows are
//! created with the job (`pending`, fence 1) in the transaction that charges the set.

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::GenerateSet,
    name: "generate_set",
    from: &[EmojiStatus::Pending],
    lane: Lane::Bulk,
    costly: true,
    needs_idx: false,
    price_key: "generate_set",
    price: |p| p.generate_set_per_emoji,
    seed: SeedRule::Row,
    preflip: Preflip::CreateRows,
    step: Step::Render,
};
