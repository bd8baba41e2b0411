//! `GET /api/job/{id}/events`: a job's live state as server-sent events.
//!
//! The first event is the job's current state, so a client that reconnects (after a dropped
//! connection, a redeploy, a sleeping phone) is whole again at once, with no replay log to
//! keep. After that the stream sends the job again whenever its rows or its progress change,
//! and a terminal `end` event once every emoji has settled, then closes. Comment lines keep
//! idle proxies from cutting the stream.
//!
//! | event | data |
//! |---|---|
//! | `job` | the job view, as `GET /api/job/{id}` answers it (status, emoji, progress) |
//! | `end` | the final job view; the server closes the stream after it |
//!
//! Changes are found by polling the database row and the Redis progress hash every
//! [`EventsConfig::every`], per open stream: a few cheap reads a second, and no extra moving
//! part (a pub/sub channel would need the worker to publish and a fan-out here). A stream
//! lives at most [`EventsConfig::max_age`]; the client reconnects and gets the state first.
//! Streams end when the API shuts down, so a graceful stop is not held open by them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde_json::Value;
use tokio::time::Instant;

use super::ApiError;
use super::api::{ApiState, AuthUser, JobPath};
use crate::job::JobStatus;
use crate::store::JobRecord;

/// Settings of the event streams.
#[derive(Debug, Clone, Copy)]
pub struct EventsConfig {
    /// How often each stream re-reads its job.
    pub every: Duration,
    /// The keep-alive comment interval.
    pub keep_alive: Duration,
    /// The longest a stream stays open.
    pub max_age: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            every: Duration::from_millis(250),
            keep_alive: Duration::from_secs(15),
            max_age: Duration::from_secs(30 * 60),
        }
    }
}

/// What a change is measured by: the rows' statuses, fences and times and the progress time
/// (the view itself holds signed URLs, which differ on every read).
fn fingerprint(job: &JobRecord, progress: Option<&crate::queue::JobProgress>) -> String {
    let rows: Vec<_> = job
        .emoji
        .iter()
        .map(|e| (e.idx, e.status, e.fence, e.updated_at))
        .collect();
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        job.status,
        job.updated_at,
        rows,
        progress.and_then(|p| p.updated_at)
    )
}

/// Whether no work is left on the job: a settled status and every row settled.
fn settled(job: &JobRecord) -> bool {
    !matches!(job.status, JobStatus::Pending | JobStatus::Running)
        && job.emoji.iter().all(|e| e.status.is_settled())
}

enum Step {
    /// The next read (the first one at once).
    Read { first: bool },
    /// The `end` event was sent.
    Closed,
}

struct Watch {
    st: Arc<ApiState>,
    headers: HeaderMap,
    user_id: String,
    job_id: String,
    last: Option<String>,
    step: Step,
    until: Instant,
}

impl Watch {
    /// The job and its progress now; `None` when the job is gone (or no longer the caller's).
    async fn read(&self) -> Option<(JobRecord, Option<crate::queue::JobProgress>)> {
        let job = self
            .st
            .enqueuer()
            .owned_job(&self.user_id, &self.job_id)
            .await
            .ok()?;
        // Progress is best effort, as in the JSON route.
        let progress = self
            .st
            .enqueuer()
            .queue()
            .get_progress(&self.job_id)
            .await
            .ok();
        Some((job, progress))
    }

    fn event(name: &str, view: Value) -> Event {
        Event::default()
            .event(name)
            .json_data(view)
            .unwrap_or_else(|_| Event::default().event(name).data("{}"))
    }

    /// The next event, or `None` to close the stream.
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Watch)> {
        loop {
            match self.step {
                Step::Closed => return None,
                Step::Read { first } => {
                    if !first {
                        let stopping = self.st.stopping();
                        tokio::select! {
                            _ = tokio::time::sleep(self.st.events_config().every) => {}
                            _ = stopping => return None,
                        }
                        if Instant::now() >= self.until {
                            return None;
                        }
                    }
                    self.step = Step::Read { first: false };
                    let (job, progress) = self.read().await?;
                    let print = fingerprint(&job, progress.as_ref());
                    let done = settled(&job);
                    if !done && self.last.as_deref() == Some(print.as_str()) {
                        continue;
                    }
                    self.last = Some(print);
                    let view = self
                        .st
                        .job_view(&self.headers, &job, progress.as_ref())
                        .await;
                    if done {
                        self.step = Step::Closed;
                        let ev = Watch::event("end", view);
                        return Some((Ok(ev), self));
                    }
                    let ev = Watch::event("job", view);
                    return Some((Ok(ev), self));
                }
            }
        }
    }
}

/// `GET /api/job/{id}/events`. Another user's job, or none, is 404 before any stream starts.
pub(super) async fn job_events(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    st.enqueuer().owned_job(&user.id, &job_id).await?;
    let cfg = st.events_config();
    let state = Watch {
        st,
        headers,
        user_id: user.id,
        job_id,
        last: None,
        step: Step::Read { first: true },
        until: Instant::now() + cfg.max_age,
    };
    let stream = futures_util::stream::unfold(state, Watch::next);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(cfg.keep_alive)))
}
