//! Which image an archive card shows: the read side of the thumbnail columns.
//!
//! `jobs.thumbnail_path` / `jobs.thumbnail_key` are a denormalized copy of emoji 0's image,
//! kept for list queries. The store writes them in the same transaction as emoji 0's result,
//! so they cannot be empty while emoji 0 is done. Reads still never trust them alone: the old
//! system rendered broken cards when that cache was empty (seed log, "Archive Card Thumbnail
//! Fallback"), and a database restored from an older backup or written by another producer may
//! not keep our invariant. So the chain is, in order: the cached path, the cached key (the
//! caller signs it), emoji 0's own image, and a placeholder that always exists.
//!
//! An empty string counts as absent, exactly as the Python fallback's truthiness test did.
//! This is a pure function: URL signing and the placeholder's address belong to the caller.

use super::{EmojiRecord, JobRecord};

/// Where a job's thumbnail comes from, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThumbnailSource {
    /// `jobs.thumbnail_path`, served as is.
    Path(String),
    /// `jobs.thumbnail_key`: an object-store key to sign.
    Key(String),
    /// The cache is empty; emoji 0's own image key (to sign).
    Emoji0Image(String),
    /// Nothing to show yet (a fresh job): the placeholder image.
    Placeholder,
}

fn present(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.trim().is_empty())
}

/// The fallback chain for `job`'s card. `emoji0` is emoji row 0 when the caller has it (a row
/// with another index is ignored rather than shown as the thumbnail).
pub fn thumbnail_source(job: &JobRecord, emoji0: Option<&EmojiRecord>) -> ThumbnailSource {
    if let Some(p) = present(job.thumbnail_path.as_deref()) {
        return ThumbnailSource::Path(p.to_owned());
    }
    if let Some(k) = present(job.thumbnail_key.as_deref()) {
        return ThumbnailSource::Key(k.to_owned());
    }
    match emoji0
        .filter(|e| e.idx == 0)
        .and_then(|e| present(e.image_key.as_deref()))
    {
        Some(k) => ThumbnailSource::Emoji0Image(k.to_owned()),
        None => ThumbnailSource::Placeholder,
    }
}

impl JobRecord {
    /// [`thumbnail_source`] with this record's own emoji 0, if it was loaded.
    pub fn thumbnail_source(&self) -> ThumbnailSource {
        thumbnail_source(self, self.emoji.iter().find(|e| e.idx == 0))
    }
}
