//! The enqueue side: what the HTTP API and the `enqueue` CLI do to ask for work. One
//! [`Enqueuer`] holds the store, the queue and the blob store; both front ends call the same
//! methods, so they cannot drift apart.
//!
//! # The three dedup layers, race-free (seed log, "Three-Layer Dedup")
//!
//! An action on one emoji ([`Enqueuer::emoji_action`]) runs, in order:
//!
//! 1. **Claim** (layer 1): `SET {p}claim:{job_id}:{action}-{idx} 1 NX EX 30`. The loser of a
//!    double click answers [`ActionReply::Duplicate`] and touches nothing else.
//! 2. **Status check**, on a fresh read taken after the claim: wrong state answers
//!    [`ActionReply::WrongState`] and releases the claim (nothing was done).
//! 3. **Charge + pre-flip** (layer 2) in ONE database transaction
//!    ([`Store::preflip_charged`]): the row goes to `pending` with a new fence (approve keeps
//!    `done` and only moves the fence) and the charge is written under the key
//!    `charge:{job_id}:{action}:{idx}:{fence}`. The flip is one conditional `UPDATE`, so even
//!    without the claim two clicks could not both flip; the charge cannot exist without the
//!    flip, or the flip without the charge.
//!    The same transaction writes the outbox entry of the message (the intent to dispatch).
//!    Approve keeps the row `done`, so its status cannot refuse a second approval; instead a
//!    row that an approve or approve-all outbox entry names under its current fence is being
//!    approved: approve answers [`ActionReply::Duplicate`] and approve-all leaves it out,
//!    however long the animation waits (the claim lasts 30 s, an animation minutes).
//! 4. **Dispatch** to the interactive stream with the new fence, then mark the outbox entry
//!    published. If this process dies before that, a worker's relay publishes the entry
//!    ([`crate::worker::reconcile`]); a second publish is harmless (fence, run-once key).
//!
//! Any failure after step 3 is rolled back before the error is returned (the seed's
//! compensating rollback, completed): the outbox entry is withdrawn (if the relay had
//! published it already, the action stands), the row goes back to the status it had — only if it is
//! still exactly as the flip left it; a worker that already started it proves the entry was
//! added after all, and then the action stands — the charge is refunded (once: the refund has
//! its own idempotency key), and the claim is released, so the next click works at once.
//! After success the claim is kept for its TTL: clicks in the next 30 s are duplicates.
//!
//! Layer 3 (the frontend's busy guard) lives in the frontend; nothing here relies on it.
//!
//! # Credits
//!
//! Prices are per action ([`Prices`]). The worker refunds a charge when it dead-letters the
//! message (it derives the same key from the message), so a user never pays for work that was
//! given up. A price of 0 writes no ledger entry.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::blobs::{self, BlobError, Blobs};
use crate::job::{Action, EmojiStatus, MAX_EMOJI};
use crate::pipeline::post::{self, ImageError, ImageLimits};
use crate::pipeline::prompt::{self, PromptError};
use crate::queue::{OFF_HOURS_MAX_TTL, Queue, QueueError};
use crate::store::{
    Charge, Charged, JobRecord, NewJob, OutboxEntry, PreflipOutcome, RefundOutcome, Store,
    StoreError,
};

/// Why a request was not enqueued. Each variant says whether the caller's input was at fault
/// ([`EnqueueError::is_bad_input`]) and whether trying again can help
/// ([`EnqueueError::is_retryable`]); the HTTP layer maps them to status codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    /// The request itself is wrong (a missing index, an index out of range, a bad field).
    #[error("{0}")]
    BadInput(String),
    /// No such job for this user (another user's job is reported the same way).
    #[error("{0}")]
    NotFound(String),
    /// The off-hours flag is set: costly work is refused until it expires or is cleared.
    #[error("costly work is paused (off-hours); try again in {}s", ceil_secs(*retry_after))]
    OffHours { retry_after: Duration },
    /// The charge would take the balance below zero. Nothing was changed.
    #[error("not enough credits: the balance is {balance}, this costs {needed}")]
    InsufficientCredits { balance: i64, needed: i64 },
    /// The user is not registered (the ledger needs one).
    #[error("no user `{0}`; add one with `popcon-worker users add {0} --credits N`")]
    UnknownUser(String),
    /// The work could not be added to the queue; the charge was refunded and the claim
    /// released, so trying again is safe.
    #[error("the work could not be queued (nothing was charged): {0}")]
    Dispatch(QueueError),
    #[error("reference image: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Queue(QueueError),
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// Whole seconds, rounded up (as the `Retry-After` header says it), at least 1.
fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl From<StoreError> for EnqueueError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InsufficientCredits { balance, needed } => {
                EnqueueError::InsufficientCredits { balance, needed }
            }
            StoreError::UnknownUser(u) => EnqueueError::UnknownUser(u),
            StoreError::Invalid(m) => EnqueueError::BadInput(m.into_owned()),
            other => EnqueueError::Store(other),
        }
    }
}

impl From<QueueError> for EnqueueError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::InvalidArgument(m) => EnqueueError::BadInput(m),
            other => EnqueueError::Queue(other),
        }
    }
}

impl EnqueueError {
    pub fn is_retryable(&self) -> bool {
        match self {
            EnqueueError::OffHours { .. } | EnqueueError::Dispatch(_) => true,
            EnqueueError::Store(e) => e.is_retryable(),
            EnqueueError::Queue(e) => e.is_retryable(),
            EnqueueError::Blob(e) => e.is_retryable(),
            EnqueueError::BadInput(_)
            | EnqueueError::NotFound(_)
            | EnqueueError::InsufficientCredits { .. }
            | EnqueueError::UnknownUser(_)
            | EnqueueError::Image(_)
            | EnqueueError::Prompt(_) => false,
        }
    }

    /// Whether the caller's input was at fault (the CLI exits 2 for these).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            EnqueueError::BadInput(_)
                | EnqueueError::NotFound(_)
                | EnqueueError::Image(_)
                | EnqueueError::Prompt(_)
                | EnqueueError::UnknownUser(_)
        )
    }
}

/// Credits per action. A price of 0 makes the action free (no ledger entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Prices {
    /// Per emoji of a new set (the pose is included).
    pub generate_set_per_emoji: i64,
    pub retry: i64,
    pub regenerate: i64,
    /// approve animates the emoji (the costliest GPU work): priced as regenerate by default.
    pub approve: i64,
    /// Per emoji approved (and animated) by approve-all.
    pub approve_all_per_emoji: i64,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            generate_set_per_emoji: 1,
            retry: 1,
            regenerate: 1,
            approve: 1,
            approve_all_per_emoji: 1,
        }
    }
}

impl Prices {
    /// Everything free: operator tools and tests that do not exercise credits.
    pub fn free() -> Prices {
        Prices {
            generate_set_per_emoji: 0,
            retry: 0,
            regenerate: 0,
            approve: 0,
            approve_all_per_emoji: 0,
        }
    }

    /// Parses `generate_set=1,retry=1,regenerate=1,approve=1,approve_all=1` (any subset; the
    /// rest keep their defaults).
    pub fn parse(s: &str) -> Result<Prices, String> {
        let mut p = Prices::default();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| format!("`{item}`: expected ACTION=CREDITS"))?;
            let v: i64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| format!("`{item}`: the price must be a whole number >= 0"))?;
            match name.trim() {
                "generate_set" => p.generate_set_per_emoji = v,
                "retry" => p.retry = v,
                "regenerate" => p.regenerate = v,
                "approve" => p.approve = v,
                "approve_all" => p.approve_all_per_emoji = v,
                other => {
                    return Err(format!(
                        "unknown action `{other}` (generate_set, retry, regenerate, approve, approve_all)"
                    ));
                }
            }
        }
        Ok(p)
    }

    /// The price of one `action` on one emoji (the per-emoji price for set actions).
    pub fn per_emoji(&self, action: Action) -> i64 {
        (action.spec().price)(self)
    }
}

/// Settings of the enqueue side.
#[derive(Debug, Clone, Copy)]
pub struct EnqueueConfig {
    pub prices: Prices,
    /// Limits on an uploaded reference image (bytes, side, pixels: decompression bombs).
    pub image_limits: ImageLimits,
    /// Reference images decoded at once; more wait their turn. Each decode may take up to the
    /// limits' allocation budget (96 MB at the defaults) plus its re-encode, so this bounds the
    /// API's memory under a burst of maximal uploads (and keeps cores for everything else).
    pub decode_concurrency: usize,
}

impl Default for EnqueueConfig {
    fn default() -> Self {
        EnqueueConfig {
            prices: Prices::default(),
            image_limits: ImageLimits::default(),
            decode_concurrency: 2,
        }
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
    /// The client's key for this submission (the `Idempotency-Key` header): a repeat with
    /// the same key — a double click on "generate" — returns the first job instead of
    /// creating and charging a second one.
    pub idempotency_key: Option<String>,
}

/// A created job and what it cost.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub job: JobRecord,
    /// `None` when generate-set is free, or when this was a repeat of an earlier submission.
    pub charged: Option<Charged>,
    /// True when an earlier request with the same idempotency key created the job.
    pub deduped: bool,
}

/// The answer to an action on an existing job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ActionReply {
    /// Charged, flipped and on the stream.
    Queued {
        deduped: bool,
        job_id: String,
        action: Action,
        /// The emoji (one for retry/regenerate/approve; every bumped one for approve-all).
        idx: Vec<u32>,
        /// The fence the message carries.
        fence: u64,
        /// Credits taken (0 when free).
        charged: i64,
        /// The balance after the charge, when there was one.
        #[serde(skip_serializing_if = "Option::is_none")]
        balance: Option<i64>,
    },
    /// Another request for the same action holds the claim (a double click): nothing done.
    Duplicate { deduped: bool },
    /// The emoji is not in a state the action applies to: nothing done.
    WrongState {
        deduped: bool,
        /// The emoji's status (or `none_done` for approve-all with nothing to approve).
        current: String,
        message: String,
    },
}

/// A test-only pause point between the pre-flip and the dispatch (fault injection: a test can
/// stop Redis exactly there).
pub type DispatchHook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The enqueue side over one store, queue and blob store. Cheap to clone.
#[derive(Clone)]
pub struct Enqueuer {
    store: Store,
    queue: Queue,
    blobs: Blobs,
    cfg: EnqueueConfig,
    before_dispatch: Option<DispatchHook>,
    /// Permits for reference decodes ([`EnqueueConfig::decode_concurrency`]).
    decodes: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Enqueuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enqueuer")
            .field("queue", &self.queue)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What a pre-flip changed, so it can be undone if the dispatch fails.
struct Flip {
    idx: u32,
    fence: u64,
    flipped_to: EmojiStatus,
    restore: EmojiStatus,
    error: Option<String>,
}

impl Enqueuer {
    pub fn new(store: Store, queue: Queue, blobs: Blobs, cfg: EnqueueConfig) -> Enqueuer {
        Enqueuer {
            store,
            queue,
            blobs,
            cfg,
            before_dispatch: None,
            decodes: Arc::new(tokio::sync::Semaphore::new(cfg.decode_concurrency.max(1))),
        }
    }

    /// Runs `hook` after the pre-flip and before every dispatch (tests: fault injection).
    #[doc(hidden)]
    pub fn with_dispatch_hook(mut self, hook: DispatchHook) -> Enqueuer {
        self.before_dispatch = Some(hook);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    pub fn config(&self) -> &EnqueueConfig {
        &self.cfg
    }

    /// The job if `user_id` owns it; another user's job is `NotFound` like a missing one, so
    /// ids cannot be probed.
    pub async fn owned_job(&self, user_id: &str, job_id: &str) -> Result<JobRecord, EnqueueError> {
        let not_found = || EnqueueError::NotFound(format!("no job `{job_id}`"));
        if crate::queue::check_id("job id", job_id).is_err() {
            return Err(not_found());
        }
        match self.store.get_job(job_id).await? {
            Some(job) if job.user_id == user_id => Ok(job),
            _ => Err(not_found()),
        }
    }

    /// The job a user's idempotency key created.
    async fn job_for_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<JobRecord>, EnqueueError> {
        match self.store.job_for_idempotency_key(user_id, key).await? {
            Some(id) => Ok(self.store.get_job(&id).await?),
            None => Ok(None),
        }
    }

    /// Refuses costly work while the off-hours flag is set.
    pub async fn check_off_hours(&self) -> Result<(), EnqueueError> {
        match self.queue.off_hours_status().await? {
            Some(left) => Err(EnqueueError::OffHours {
                retry_after: left.max(Duration::from_secs(1)),
            }),
            None => Ok(()),
        }
    }

    /// Sets (with a TTL, capped at 20 h: returns the TTL set) or clears the off-hours flag.
    pub async fn set_off_hours(
        &self,
        ttl: Option<Duration>,
    ) -> Result<Option<Duration>, EnqueueError> {
        match ttl {
            Some(ttl) if ttl.is_zero() => Err(EnqueueError::BadInput(
                "the off-hours TTL must be positive".into(),
            )),
            Some(ttl) => Ok(Some(
                self.queue.set_off_hours(ttl.min(OFF_HOURS_MAX_TTL)).await?,
            )),
            None => {
                self.queue.clear_off_hours().await?;
                Ok(None)
            }
        }
    }

    /// Validates the request, charges the set, creates the job and its `pending` rows (one
    /// transaction), stores the reference image and enqueues `generate_set` on the bulk
    /// stream. Bad input and a refused charge create nothing; a failure after the charge
    /// fails the rows with the reason and refunds it.
    pub async fn generate_set(&self, req: &GenerateSet) -> Result<Submitted, EnqueueError> {
        // Everything about the input is checked before anything is written.
        prompt::pose_prompt(&req.subject)?;
        let labels: Vec<String> = if req.expressions.is_empty() {
            prompt::DEFAULT_EXPRESSIONS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            req.expressions
                .iter()
                .map(|e| e.trim().to_string())
                .collect()
        };
        if labels.len() > MAX_EMOJI as usize {
            return Err(EnqueueError::BadInput(format!(
                "{} expressions; a set has at most {MAX_EMOJI}",
                labels.len()
            )));
        }
        if labels.iter().any(String::is_empty) {
            return Err(EnqueueError::BadInput("an expression is empty".into()));
        }
        for l in &labels {
            prompt::emoji_prompt(&req.subject, l, req.style.as_deref().unwrap_or(""))?;
        }
        if let Some(key) = &req.idempotency_key {
            let ok =
                !key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(EnqueueError::BadInput(
                    "the idempotency key must be 1-128 printable ASCII characters".into(),
                ));
            }
            // A repeat returns the first job, also during off-hours: nothing new is asked.
            if let Some(job) = self.job_for_key(&req.user_id, key).await? {
                return Ok(Submitted {
                    job,
                    charged: None,
                    deduped: true,
                });
            }
        }
        self.check_off_hours().await?;
        let price = self
            .cfg
            .prices
            .generate_set_per_emoji
            .checked_mul(labels.len() as i64)
            .ok_or_else(|| EnqueueError::BadInput("price overflow".into()))?;
        let reference_png = match &req.reference {
            Some(bytes) => {
                // The decode is the costly part of a request: the user and the credits are
                // checked first (the charge itself is taken, race-free, with the job below),
                // and it runs on a blocking thread so the runtime keeps serving.
                if price > 0 {
                    if self.store.get_user(&req.user_id).await?.is_none() {
                        return Err(EnqueueError::UnknownUser(req.user_id.clone()));
                    }
                    let balance = self.store.balance(&req.user_id).await?;
                    if balance < price {
                        return Err(EnqueueError::InsufficientCredits {
                            balance,
                            needed: price,
                        });
                    }
                }
                let bytes = bytes.clone();
                let limits = self.cfg.image_limits;
                // The semaphore is never closed; a failed acquire would only mean no limit.
                let _permit = self.decodes.acquire().await.ok();
                let png = tokio::task::spawn_blocking(move || {
                    // Stored as RGB, as decoded: an alpha channel would add a third to the
                    // memory of a maximal upload and the worker reads RGB anyway.
                    post::encode_rgb_png(&post::decode_image(&bytes, limits)?)
                })
                .await
                .map_err(|e| EnqueueError::BadInput(format!("the image decoder failed: {e}")))??;
                Some(png)
            }
            None => None,
        };
        // A random id, stored against (user, key) when there is a key: it cannot be derived
        // from the key, so knowing a user's key does not reveal their job.
        let id = uuid::Uuid::new_v4().simple().to_string();

        let new = NewJob {
            id: id.clone(),
            user_id: req.user_id.clone(),
            subject: req.subject.trim().to_string(),
            style: req.style.clone().filter(|s| !s.trim().is_empty()),
            seed: req.seed,
            model: req.model.clone(),
            reference_key: reference_png.as_ref().map(|_| blobs::keys::reference(&id)),
            labels,
        };
        let reason = format!("generate_set {id} ({} emoji)", new.labels.len());
        let charge = (price > 0).then(|| Charge {
            user_id: &req.user_id,
            amount: price,
            reason: &reason,
        });
        let created = self
            .store
            .create_job_dispatching(&new, charge, req.idempotency_key.as_deref())
            .await;
        let (job, charged, entry) = match created {
            Ok(v) => v,
            // Two repeats raced past the read above: the key's primary key let one create the
            // job (and its charge); the other returns that job.
            Err(StoreError::IdemKeyTaken(_)) | Err(StoreError::Conflict(_))
                if req.idempotency_key.is_some() =>
            {
                let key = req.idempotency_key.as_deref().unwrap_or_default();
                let job = self.job_for_key(&req.user_id, key).await?.ok_or_else(|| {
                    EnqueueError::Store(StoreError::Corrupt(format!(
                        "the job of idempotency key `{key}` vanished"
                    )))
                })?;
                return Ok(Submitted {
                    job,
                    charged: None,
                    deduped: true,
                });
            }
            Err(e) => return Err(e.into()),
        };

        let after_charge = async {
            if let (Some(png), Some(key)) = (reference_png, &new.reference_key) {
                self.blobs.put(key, png).await?;
            }
            self.dispatch(&entry).await
        };
        if let Err(e) = after_charge.await {
            match self.store.outbox_withdraw(&entry.id).await {
                // The relay published it meanwhile: the job is queued after all.
                Ok(false) => {
                    tracing::warn!(job_id = %id, error = %e, "dispatch failed but the relay had published it; the job stands");
                    return Ok(Submitted {
                        job,
                        charged,
                        deduped: false,
                    });
                }
                Ok(true) => {}
                Err(e2) => {
                    // The intent stays: the relay publishes it once the database answers.
                    tracing::error!(job_id = %id, error = %e2, "could not withdraw the outbox entry; the relay will publish it");
                    return Err(EnqueueError::Store(e2));
                }
            }
            let reason = format!("could not be queued: {e}");
            if let Err(e2) = self.store.fail_unsettled(&id, 1, &reason).await {
                tracing::error!(job_id = %id, error = %e2, "could not fail the rows of an unqueued job");
            }
            if let Some(c) = &charged {
                self.refund(&c.key, &reason).await;
            }
            return Err(match e {
                EnqueueError::Queue(q) => EnqueueError::Dispatch(q),
                other => other,
            });
        }
        tracing::info!(job_id = %id, user_id = %req.user_id, charged = price, "generate_set queued");
        Ok(Submitted {
            job,
            charged,
            deduped: false,
        })
    }

    /// retry / regenerate / approve of emoji `idx`: claim, status check, charge + pre-flip,
    /// dispatch, with the compensating rollback (module header).
    pub async fn emoji_action(
        &self,
        user_id: &str,
        job_id: &str,
        action: Action,
        idx: u32,
    ) -> Result<ActionReply, EnqueueError> {
        if !action.needs_idx() {
            return Err(EnqueueError::BadInput(format!(
                "{action} is not an action on one emoji"
            )));
        }
        // Ownership and the index before the claim: a probe of someone else's job must not
        // take the owner's claim key.
        let job = self.owned_job(user_id, job_id).await?;
        check_idx(&job, idx)?;
        if action.is_costly() {
            self.check_off_hours().await?;
        }
        let work = self.claimed_emoji_action(user_id, job_id, action, idx);
        self.under_claim(job_id, action, Some(idx), work).await
    }

    /// Layer 1: runs `work` only if this caller wins the claim (else `duplicate`). The claim
    /// is kept only when the action went through — its TTL is the double-click window;
    /// anything else (wrong state, refused charge, failed dispatch) releases it, so the user
    /// can act again at once.
    async fn under_claim(
        &self,
        job_id: &str,
        action: Action,
        idx: Option<u32>,
        work: impl Future<Output = Result<ActionReply, EnqueueError>>,
    ) -> Result<ActionReply, EnqueueError> {
        if !self.queue.try_claim_action(job_id, action, idx).await? {
            tracing::info!(job_id, %action, ?idx, "duplicate click: the claim is held");
            return Ok(ActionReply::Duplicate { deduped: true });
        }
        let result = work.await;
        if !matches!(result, Ok(ActionReply::Queued { .. })) {
            self.release_claim(job_id, action, idx).await;
        }
        result
    }

    async fn claimed_emoji_action(
        &self,
        user_id: &str,
        job_id: &str,
        action: Action,
        idx: u32,
    ) -> Result<ActionReply, EnqueueError> {
        // A fresh read under the claim: the one before it may predate another click's flip.
        let job = self.owned_job(user_id, job_id).await?;
        let row =
            job.emoji.iter().find(|e| e.idx == idx).ok_or_else(|| {
                EnqueueError::NotFound(format!("no emoji {idx} in job `{job_id}`"))
            })?;
        if !row.status.allows(action) {
            return Ok(wrong_state(action, row.status));
        }
        let expected = action.spec().from;
        let keep_status = action.spec().preflip == crate::action::Preflip::KeepStatus;
        let price = self.cfg.prices.per_emoji(action);
        let reason = format!("{action} {job_id} emoji {idx}");
        let charge = (price > 0).then(|| Charge {
            user_id,
            amount: price,
            reason: &reason,
        });
        let (outcome, charged, entry) = self
            .store
            .preflip_dispatching(job_id, idx, expected, keep_status, action, user_id, charge)
            .await?;
        let fence = match outcome {
            PreflipOutcome::Flipped { fence } => fence,
            // Another action on this row (a different claim key) flipped it first.
            PreflipOutcome::WrongState(s) => return Ok(wrong_state(action, s)),
            // Layer 2 for approve: the row stays `done` while its animation is queued, so the
            // outbox says it is already being approved (by this button or approve-all).
            PreflipOutcome::InFlight => {
                tracing::info!(job_id, %action, idx, "already being approved; nothing charged");
                return Ok(ActionReply::Duplicate { deduped: true });
            }
            PreflipOutcome::Missing => {
                return Err(EnqueueError::NotFound(format!(
                    "no emoji {idx} in job `{job_id}`"
                )));
            }
        };
        let flip = Flip {
            idx,
            fence,
            flipped_to: if keep_status {
                EmojiStatus::Done
            } else {
                EmojiStatus::Pending
            },
            restore: row.status,
            error: row.error.clone(),
        };
        let entry = entry.ok_or_else(|| {
            EnqueueError::Store(StoreError::Corrupt("outbox entry not written".into()))
        })?;
        if let Err(e) = self.dispatch(&entry).await {
            return self
                .roll_back(&entry, &[flip], charged.iter().collect(), e)
                .await;
        }
        tracing::info!(job_id, %action, idx, fence, charged = price, "action queued");
        Ok(ActionReply::Queued {
            deduped: false,
            job_id: job_id.to_string(),
            action,
            idx: vec![idx],
            fence,
            charged: charged.as_ref().map_or(0, |c| c.amount),
            balance: charged.as_ref().map(|c| c.balance),
        })
    }

    /// approve-all: one claim for the whole set, then every `done` emoji's fence bumped and
    /// charged in one transaction (except those whose approval is already queued: they are
    /// that approval's), then one `approve_all` entry on the bulk stream. Two
    /// concurrent calls approve each emoji once: the second is a duplicate, and even without
    /// the claim the worker's `done → approved` write succeeds once per emoji.
    pub async fn approve_all(
        &self,
        user_id: &str,
        job_id: &str,
    ) -> Result<ActionReply, EnqueueError> {
        let action = Action::ApproveAll;
        self.owned_job(user_id, job_id).await?;
        if action.is_costly() {
            self.check_off_hours().await?;
        }
        let work = self.claimed_approve_all(user_id, job_id);
        self.under_claim(job_id, action, None, work).await
    }

    async fn claimed_approve_all(
        &self,
        user_id: &str,
        job_id: &str,
    ) -> Result<ActionReply, EnqueueError> {
        let action = Action::ApproveAll;
        let job = self.owned_job(user_id, job_id).await?;
        if !job.emoji.iter().any(|e| e.status == EmojiStatus::Done) {
            return Ok(ActionReply::WrongState {
                deduped: true,
                current: "none_done".into(),
                message: "no emoji of this job is done; approve-all approves done emoji".into(),
            });
        }
        let price = self.cfg.prices.approve_all_per_emoji;
        let reason = format!("approve_all {job_id}");
        let charge = (price > 0).then(|| Charge {
            user_id,
            amount: price,
            reason: &reason,
        });
        let Some((bumped, charged, entry)) = self
            .store
            .bump_done_dispatching(job_id, user_id, charge)
            .await?
        else {
            return Err(EnqueueError::NotFound(format!("no job `{job_id}`")));
        };
        if bumped.is_empty() {
            let fresh = self.owned_job(user_id, job_id).await?;
            if fresh.emoji.iter().any(|e| e.status == EmojiStatus::Done) {
                // Every done emoji's approval is already queued (approve or an earlier
                // approve-all): nothing bumped, nothing charged.
                tracing::info!(job_id, "every done emoji is already being approved");
                return Ok(ActionReply::Duplicate { deduped: true });
            }
            return Ok(ActionReply::WrongState {
                deduped: true,
                current: "none_done".into(),
                message: "no emoji of this job is done any more".into(),
            });
        }
        let entry = entry.ok_or_else(|| {
            EnqueueError::Store(StoreError::Corrupt("outbox entry not written".into()))
        })?;
        let fence = entry.fence;
        if let Err(e) = self.dispatch(&entry).await {
            let flips: Vec<Flip> = bumped
                .iter()
                .map(|&(idx, fence)| Flip {
                    idx,
                    fence,
                    flipped_to: EmojiStatus::Done,
                    restore: EmojiStatus::Done,
                    error: None,
                })
                .collect();
            return self
                .roll_back(&entry, &flips, charged.iter().collect(), e)
                .await;
        }
        let idx: Vec<u32> = bumped.iter().map(|&(i, _)| i).collect();
        tracing::info!(job_id, emoji = idx.len(), "approve_all queued");
        Ok(ActionReply::Queued {
            deduped: false,
            job_id: job_id.to_string(),
            action,
            idx,
            fence,
            charged: charged.iter().map(|c| c.amount).sum(),
            balance: charged.last().map(|c| c.balance),
        })
    }

    /// The fast path: publishes the committed outbox entry at once and marks it published.
    /// Whatever it does not finish (a crash, Redis down), the workers' relay publishes later.
    async fn dispatch(&self, entry: &OutboxEntry) -> Result<(), EnqueueError> {
        if let Some(hook) = &self.before_dispatch {
            hook().await;
        }
        crate::failpoint::hit("dispatch.before_publish");
        self.queue
            .enqueue(&entry.message())
            .await
            .map_err(EnqueueError::Queue)?;
        crate::failpoint::hit("dispatch.after_publish");
        if let Err(e) = self.store.outbox_published(&entry.id).await {
            // The entry is on the stream: a second publish by the relay is harmless (fence
            // and run-once key), so this is not the request's failure.
            tracing::warn!(outbox = %entry.id, error = %e, "could not mark the outbox entry published");
        }
        Ok(())
    }

    /// The compensating rollback after a failed dispatch. First withdraws the outbox entry;
    /// if the relay had published it already, the action stands. Then undoes each flip whose
    /// row is still as the flip left it, refunds the charges, and reports the dispatch error.
    /// If no row could be reverted because a worker already took them, the entry did reach
    /// the stream (the reply was lost, not the write): the action stands and nothing is
    /// refunded.
    async fn roll_back(
        &self,
        entry: &OutboxEntry,
        flips: &[Flip],
        charged: Vec<&Charged>,
        err: EnqueueError,
    ) -> Result<ActionReply, EnqueueError> {
        let job_id = entry.job_id.as_str();
        let action = entry.action;
        let stands = || ActionReply::Queued {
            deduped: false,
            job_id: job_id.to_string(),
            action,
            idx: flips.iter().map(|f| f.idx).collect(),
            fence: entry.fence,
            charged: charged.iter().map(|c| c.amount).sum(),
            balance: charged.last().map(|c| c.balance),
        };
        match self.store.outbox_withdraw(&entry.id).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(job_id, %action, error = %err, "dispatch failed but the relay had published it; the action stands");
                return Ok(stands());
            }
            Err(e) => {
                // The intent is durable: the relay publishes it when the database answers.
                tracing::error!(job_id, %action, error = %e, "could not withdraw the outbox entry; the relay will publish it");
                return Ok(stands());
            }
        }
        let reason = format!("refund: could not be queued: {err}");
        let mut reverted = 0;
        let mut revert_failed = false;
        for f in flips {
            match self
                .store
                .revert_preflip(
                    job_id,
                    f.idx,
                    f.fence,
                    f.flipped_to,
                    f.restore,
                    f.error.as_deref(),
                )
                .await
            {
                Ok(true) => reverted += 1,
                Ok(false) => {
                    tracing::warn!(
                        job_id,
                        idx = f.idx,
                        "row moved on after a failed dispatch: the entry was queued after all"
                    )
                }
                Err(e) => {
                    revert_failed = true;
                    tracing::error!(job_id, idx = f.idx, error = %e, "could not revert the pre-flip; the row stays pending without an entry");
                }
            }
        }
        if reverted == 0 && !revert_failed && !flips.is_empty() {
            // Every row was taken by a worker: the dispatch happened.
            return Ok(stands());
        }
        for c in charged {
            self.refund(&c.key, &reason).await;
        }
        Err(match err {
            EnqueueError::Queue(q) => EnqueueError::Dispatch(q),
            other => other,
        })
    }

    async fn refund(&self, charge_key: &str, reason: &str) {
        match self.store.refund_charge(charge_key, reason).await {
            Ok(RefundOutcome::Refunded {
                user_id, amount, ..
            }) => tracing::info!(%user_id, amount, charge = charge_key, "charge refunded"),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(charge = charge_key, error = %e, "could not refund the charge")
            }
        }
    }

    /// Releases a claim; if Redis cannot be reached, keeps trying in the background for the
    /// claim's TTL (after which it is gone anyway), so a recovered Redis frees the user at once.
    async fn release_claim(&self, job_id: &str, action: Action, idx: Option<u32>) {
        if self.queue.release_claim(job_id, action, idx).await.is_ok() {
            return;
        }
        let queue = self.queue.clone();
        let job_id = job_id.to_string();
        // The configured TTL (`--claim-ttl`): past it the claim is gone and trying is moot.
        let ttl = queue.config().claim_ttl;
        tokio::spawn(async move {
            use backon::Retryable;
            let backoff = backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .without_max_times()
                .with_total_delay(Some(ttl));
            let release = || queue.release_claim(&job_id, action, idx);
            if release
                .retry(backoff)
                .notify(|e, _| tracing::debug!(error = %e, "claim release still failing"))
                .await
                .is_ok()
            {
                return;
            }
            tracing::warn!(job_id, %action, "could not release the claim; it expires by itself");
        });
    }
}

fn wrong_state(action: Action, status: EmojiStatus) -> ActionReply {
    let allowed: Vec<&str> = action.spec().from.iter().map(|s| s.as_str()).collect();
    ActionReply::WrongState {
        deduped: true,
        current: status.as_str().to_string(),
        message: format!(
            "{action} applies to {} emoji; this one is {}",
            allowed.join(" or "),
            status.as_str()
        ),
    }
}

fn check_idx(job: &JobRecord, idx: u32) -> Result<(), EnqueueError> {
    if job.emoji.iter().any(|e| e.idx == idx) {
        return Ok(());
    }
    Err(EnqueueError::BadInput(format!(
        "idx {idx} is out of range: job `{}` has {} emoji (0-{})",
        job.id,
        job.emoji.len(),
        job.emoji.len().saturating_sub(1)
    )))
}

/// The free enqueue path (no credits): creates the job and enqueues `generate_set`. For
/// operator tools and tests; the API and `enqueue generate-set` go through [`Enqueuer`] with
/// prices.
pub async fn generate_set(
    store: &Store,
    queue: &Queue,
    blobs: &Blobs,
    req: &GenerateSet,
) -> Result<JobRecord, EnqueueError> {
    let cfg = EnqueueConfig {
        prices: Prices::free(),
        ..EnqueueConfig::default()
    };
    Enqueuer::new(store.clone(), queue.clone(), blobs.clone(), cfg)
        .generate_set(req)
        .await
        .map(|s| s.job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_parse_with_precise_errors() {
        let p = Prices::parse("retry=3, approve_all=2").unwrap();
        assert_eq!(p.retry, 3);
        assert_eq!(p.approve_all_per_emoji, 2);
        assert_eq!(p.generate_set_per_emoji, 1);
        assert_eq!(Prices::parse("").unwrap(), Prices::default());
        assert!(
            Prices::parse("retry")
                .unwrap_err()
                .contains("ACTION=CREDITS")
        );
        assert!(Prices::parse("retry=-1").unwrap_err().contains(">= 0"));
        assert!(
            Prices::parse("fly=1")
                .unwrap_err()
                .contains("unknown action")
        );
    }

    #[test]
    fn wrong_state_names_the_allowed_statuses() {
        let ActionReply::WrongState {
            current, message, ..
        } = wrong_state(Action::Retry, EmojiStatus::Done)
        else {
            panic!("not wrong_state")
        };
        assert_eq!(current, "done");
        assert!(message.contains("failed"), "{message}");
        let json = serde_json::to_value(ActionReply::Duplicate { deduped: true }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"status": "duplicate", "deduped": true})
        );
    }
}
