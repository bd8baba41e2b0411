//! Approve every done emoji of a set, under one claim for the set, on the bulk lane: each is
//! animated (clips batched as `engine.animate_batch` allows) and approved by its own fenced
//! write under the fence the enqueue side gave that row. A row whose own approve (or an earlier
//! approve-all) is still queued is left to that one: not bumped, not charged, not animated
//! here; the worker reads the rows it owns from the message's outbox entry.

use super::{Preflip, SeedRule, Spec, Step};
use crate::job::{Action, EmojiStatus, Lane};

pub const SPEC: Spec = Spec {
    action: Action::ApproveAll,
    name: "approve_all",
    from: &[EmojiStatus::Done],
    lane: Lane::Bulk,
    costly: true,
    needs_idx: false,
    price_key: "approve_all",
    price: |p| p.approve_all_per_emoji,
    seed: SeedRule::PerFence,
    preflip: Preflip::KeepStatus,
    step: Step::AnimateAll,
};
