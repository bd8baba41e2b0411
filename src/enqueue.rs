//! The bare enqueue path: create a job and its `pending` emoji rows, then add the stream entry.
//!
//! Credits and the dedup layers (claim key, pre-flip, compensating refund) arrive with the
//! enqueue issue. What is here already follows the seed's rollback lesson: if the entry cannot
//! be added after the rows were created, the rows are failed with the reason rather than left
//! `pending` with no work scheduled.

use chrono::Utc;

use crate::blobs::{self, BlobError, Blobs};
use crate::job::{Action, MESSAGE_VERSION, ValidJob};
use crate::pipeline::post::{self, ImageError, ImageLimits};
use crate::pipeline::prompt::{self, PromptError};
use crate::queue::{Queue, QueueError};
use crate::store::{JobRecord, NewJob, Store, StoreError};

/// Why a job could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("reference image: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
}

impl EnqueueError {
    pub fn is_retryable(&self) -> bool {
        match self {
            EnqueueError::Store(e) => e.is_retryable(),
            EnqueueError::Queue(e) => e.is_retryable(),
            EnqueueError::Blob(e) => e.is_retryable(),
            EnqueueError::Image(_) | EnqueueError::Prompt(_) => false,
        }
    }

    /// Whether the caller's input was at fault (the CLI exits 2 for these).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EnqueueError::Image(_)
                | EnqueueError::Prompt(_)
                | EnqueueError::Store(StoreError::Invalid(_))
        )
    }
}

/// A generate-set request.
#[derive(Debug, Clone)]
pub struct GenerateSet {
    pub user_id: String,
    pub subject: String,
    pub style: Option<String>,
    /// Expressions; empty: the default eight.
    pub expressions: Vec<String>,
    pub seed: u64,
    pub model: Option<String>,
    /// An uploaded reference photo (PNG/JPEG/WebP bytes).
    pub reference: Option<Vec<u8>>,
}

/// Creates the job and its rows, then enqueues `generate_set` on the bulk stream.
pub async fn generate_set(
    store: &Store,
    queue: &Queue,
    blobs: &Blobs,
    req: &GenerateSet,
) -> Result<JobRecord, EnqueueError> {
    // Input is checked before anything is written: a bad prompt never becomes a job.
    prompt::pose_prompt(&req.subject)?;
    let labels: Vec<String> = if req.expressions.is_empty() {
        prompt::DEFAULT_EXPRESSIONS
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        req.expressions.clone()
    };
    for l in &labels {
        prompt::emoji_prompt(&req.subject, l, req.style.as_deref().unwrap_or(""))?;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    let reference_key = match &req.reference {
        Some(bytes) => {
            let img = post::decode_image(bytes, ImageLimits::default())?;
            let png = post::encode_png(&image::DynamicImage::ImageRgb8(img).to_rgba8())?;
            let key = blobs::keys::reference(&id);
            blobs.put(&key, png).await?;
            Some(key)
        }
        None => None,
    };
    let rec = store
        .create_job(&NewJob {
            id: id.clone(),
            user_id: req.user_id.clone(),
            subject: req.subject.trim().to_string(),
            style: req.style.clone(),
            seed: req.seed,
            model: req.model.clone(),
            reference_key,
            labels,
        })
        .await?;
    let msg = ValidJob {
        v: MESSAGE_VERSION,
        job_id: id.clone(),
        user_id: req.user_id.clone(),
        action: Action::GenerateSet,
        idx: None,
        fence: 1,
        enqueued_at: Utc::now(),
    };
    if let Err(e) = queue.enqueue(&msg).await {
        let reason = format!("could not be enqueued: {e}");
        if let Err(e2) = store.fail_unsettled(&id, 1, &reason).await {
            tracing::error!(job_id = %id, error = %e2, "could not fail the rows of an unenqueued job");
        }
        return Err(e.into());
    }
    Ok(rec)
}
