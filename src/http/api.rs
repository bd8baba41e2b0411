//! The enqueue API (`popcon-worker api`): generate-set, the per-emoji actions, approve-all,
//! credits, job reads, the archive, image files, the zip download and the admin off-hours
//! switch. Every handler goes through the same [`Enqueuer`] as the CLI; this module only
//! parses, authenticates and renders.
//!
//! | route | what |
//! |---|---|
//! | `POST /api/generate-set` | JSON spec, or multipart `spec` (JSON) + optional `image` |
//! | `POST /api/{retry,regenerate,approve}/{job_id}?idx=N` | one emoji, with the dedup layers |
//! | `POST /api/approve-all/{job_id}` | every done emoji, one claim |
//! | `GET /api/credits` | the caller's balance |
//! | `GET /api/job/{id}` | status, per-emoji status, signed image URLs, progress |
//! | `GET /api/jobs?limit=&offset=` | the archive, newest first, with the thumbnail chain |
//! | `GET /api/job/{id}/download` | a zip of the done images, streamed |
//! | `GET /api/job/{id}/events` | the job's live state, server-sent events ([`super::events`]) |
//! | `GET /`, `/app.js`, `/app.css` | the web app ([`super::web`]) |
//! | `POST/DELETE/GET /api/admin/off-hours` | admin: the off-hours flag (TTL required, ≤ 20 h) |
//! | `POST /api/admin/credits` | admin: grant credits |
//! | `GET /files/{key}` | thumbnails; other images with a valid signature |
//! | `GET /static/placeholder.png` | the archive's last-resort thumbnail |
//! | `GET /healthz`, `GET /readyz` | liveness; Redis and the database reachable |
//! | `GET /metrics` | Prometheus text: requests by route, status and error code; action outcomes |
//!
//! URLs in responses are absolute: `--public-url` when set, else the request's `Host` (and
//! `X-Forwarded-Proto`), so a client can fetch them as they are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Multipart, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::ApiError;
use super::download;
use crate::auth::{self, AuthError};
use crate::blobs::{self, BlobError, SignatureError};
use crate::enqueue::{ActionReply, EnqueueError, Enqueuer, GenerateSet};
use crate::job::{Action, EmojiStatus};
use crate::pipeline::post::{self, ImageError};
use crate::queue::{JobProgress, QueueError};
use crate::store::{JobRecord, StoreError, ThumbnailSource, UserRecord};
use crate::telemetry::Registry;

/// Settings of the API server.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The origin clients reach the API at (`https://api.example.com`), for absolute URLs in
    /// responses. `None`: taken from each request's `Host` header.
    pub public_url: Option<String>,
    /// How long a signed image URL stays valid.
    pub signed_url_ttl: Duration,
    /// Archive page size when the request gives none, and the largest allowed.
    pub page_size: u32,
    pub max_page_size: u32,
    /// The live event streams (`GET /api/job/{id}/events`).
    pub events: super::events::EventsConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            public_url: None,
            signed_url_ttl: Duration::from_secs(3600),
            page_size: 20,
            max_page_size: 100,
            events: Default::default(),
        }
    }
}

/// What every API handler reads.
pub struct ApiState {
    enq: Enqueuer,
    cfg: ApiConfig,
    placeholder: Bytes,
    metrics: ApiMetrics,
    /// Ends the event streams when the server stops (set by [`ApiState::stop_streams_on`]).
    shutdown: std::sync::OnceLock<crate::worker::Shutdown>,
}

/// The API's `/metrics`, on its own [`Registry`]: every response by route template, status and
/// error code (the `code` of [`ApiError`], so the error enum decides the label as it decides the
/// status), a latency histogram per route, and the outcome of every action request.
#[derive(Debug)]
pub struct ApiMetrics {
    registry: Registry,
}

impl ApiMetrics {
    fn new() -> ApiMetrics {
        let registry = Registry::new();
        registry.with(|| {
            ::metrics::describe_counter!(
                "popcon_api_requests_total",
                "API responses by route, status and error code"
            );
            ::metrics::describe_histogram!(
                "popcon_api_request_duration_seconds",
                ::metrics::Unit::Seconds,
                "Time from a matched request to its response head, by route"
            );
            ::metrics::describe_counter!(
                "popcon_api_actions_total",
                "Action requests by action and outcome"
            );
        });
        ApiMetrics { registry }
    }

    fn request(&self, route: &str, status: u16, code: &'static str, took: Duration) {
        self.registry.with(|| {
            ::metrics::counter!(
                "popcon_api_requests_total",
                "route" => route.to_string(),
                "status" => status.to_string(),
                "code" => code,
            )
            .increment(1);
            ::metrics::histogram!("popcon_api_request_duration_seconds", "route" => route.to_string())
                .record(took.as_secs_f64());
        });
    }

    fn action(&self, action: Action, reply: &ActionReply) {
        let outcome = match reply {
            ActionReply::Queued { .. } => "queued",
            ActionReply::Duplicate { .. } => "duplicate",
            ActionReply::WrongState { .. } => "wrong_state",
        };
        self.registry.with(|| {
            ::metrics::counter!(
                "popcon_api_actions_total",
                "action" => action.as_str(),
                "outcome" => outcome,
            )
            .increment(1);
        });
    }

    /// The Prometheus exposition text.
    pub fn render(&self) -> String {
        self.registry.render()
    }

    /// See [`Registry::upkeep`].
    pub fn upkeep(&self) {
        self.registry.upkeep();
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Where the placeholder thumbnail is served.
pub const PLACEHOLDER_PATH: &str = "/static/placeholder.png";

impl ApiState {
    pub fn new(enq: Enqueuer, cfg: ApiConfig) -> Result<Arc<ApiState>, ImageError> {
        Ok(Arc::new(ApiState {
            enq,
            cfg,
            placeholder: Bytes::from(placeholder_png()?),
            metrics: ApiMetrics::new(),
            shutdown: std::sync::OnceLock::new(),
        }))
    }

    pub fn enqueuer(&self) -> &Enqueuer {
        &self.enq
    }

    pub fn metrics(&self) -> &ApiMetrics {
        &self.metrics
    }

    /// Event streams end when `shutdown` fires: a graceful stop waits for every response in
    /// flight, and a stream would otherwise never finish. Call it once, before serving.
    pub fn stop_streams_on(&self, shutdown: crate::worker::Shutdown) {
        let _ = self.shutdown.set(shutdown);
    }

    /// Resolves when the server stops (never, when [`ApiState::stop_streams_on`] was not called).
    pub(super) fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let shutdown = self.shutdown.get().cloned();
        async move {
            match shutdown {
                Some(s) => s.wait().await,
                None => std::future::pending().await,
            }
        }
    }

    pub(super) fn events_config(&self) -> super::events::EventsConfig {
        self.cfg.events
    }
}

/// A 128 px light-grey square: the floor of the thumbnail chain, always servable.
fn placeholder_png() -> Result<Vec<u8>, ImageError> {
    let img = image::RgbaImage::from_pixel(
        post::THUMBNAIL_SIZE,
        post::THUMBNAIL_SIZE,
        image::Rgba([224, 224, 224, 255]),
    );
    post::encode_png(&img)
}

/// The API's routes over `state` (the caller adds the JSON fallbacks).
pub fn routes(state: Arc<ApiState>) -> Router {
    // Room for the largest accepted image plus the spec and multipart framing; above it the
    // request is refused with 413 before the body is read.
    let body_limit = state.enq.config().image_limits.max_bytes + 256 * 1024;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/api/generate-set",
            post(generate_set).layer(DefaultBodyLimit::max(body_limit)),
        )
        .route("/api/retry/{job_id}", post(retry))
        .route("/api/regenerate/{job_id}", post(regenerate))
        .route("/api/approve/{job_id}", post(approve))
        .route("/api/approve-all/{job_id}", post(approve_all))
        .route("/api/credits", get(credits))
        .route("/api/job/{job_id}", get(job))
        .route("/api/job/{job_id}/download", get(download_zip))
        .route("/api/job/{job_id}/events", get(super::events::job_events))
        .merge(super::web::routes())
        .route("/api/jobs", get(jobs))
        .route(
            "/api/admin/off-hours",
            post(off_hours_set)
                .delete(off_hours_clear)
                .get(off_hours_get),
        )
        .route("/api/admin/credits", post(grant_credits))
        .route("/files/{*key}", get(file))
        .route(PLACEHOLDER_PATH, get(placeholder))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts every response of a matched route under its template (`/api/job/{job_id}`, never
/// the id itself: one series per route, not per job).
async fn track(
    State(st): State<Arc<ApiState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let code = resp
        .extensions()
        .get::<super::ErrorCode>()
        .map_or("", |c| c.0);
    st.metrics
        .request(&route, resp.status().as_u16(), code, started.elapsed());
    resp
}

async fn metrics(State(st): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
}

// ---- errors from the layers below, mapped once ---------------------------------------------

impl From<EnqueueError> for ApiError {
    fn from(e: EnqueueError) -> Self {
        match e {
            EnqueueError::BadInput(m) => ApiError::BadRequest(m),
            EnqueueError::NotFound(m) => ApiError::NotFound(m),
            e @ EnqueueError::OffHours { retry_after } => ApiError::TooManyRequests {
                message: e.to_string(),
                retry_after,
            },
            e @ EnqueueError::InsufficientCredits { .. } => {
                ApiError::PaymentRequired(e.to_string())
            }
            e @ EnqueueError::UnknownUser(_) => ApiError::Forbidden(e.to_string()),
            e @ EnqueueError::Dispatch(_) => ApiError::Unavailable(e.to_string()),
            EnqueueError::Image(e @ ImageError::TooManyBytes { .. }) => {
                ApiError::PayloadTooLarge(format!("image: {e}"))
            }
            EnqueueError::Image(e) => ApiError::BadRequest(format!("image: {e}")),
            e @ EnqueueError::Prompt(_) => ApiError::BadRequest(e.to_string()),
            EnqueueError::Store(e) => e.into(),
            EnqueueError::Queue(e) => e.into(),
            EnqueueError::Blob(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        // The store refused an argument before touching the database (e.g. a grant that
        // would overflow the balance): the caller's request, not a fault of ours.
        if let StoreError::Invalid(why) = &e {
            return ApiError::BadRequest(why.to_string());
        }
        if e.is_retryable() {
            ApiError::Unavailable(format!("the job database is unavailable: {e}"))
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        if e.is_retryable() {
            ApiError::Unavailable(format!("the queue is unavailable: {e}"))
        } else {
            ApiError::Internal(e.to_string())
        }
    }
}

impl From<BlobError> for ApiError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::NotFound(k) => ApiError::NotFound(format!("no file `{k}`")),
            BlobError::InvalidKey { .. } => ApiError::NotFound(e.to_string()),
            e if e.is_retryable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Store(e) => e.into(),
            e => ApiError::Unauthorized(e.to_string()),
        }
    }
}

// ---- extractors ------------------------------------------------------------------------------

/// The authenticated caller.
pub struct AuthUser(pub UserRecord);

impl FromRequestParts<Arc<ApiState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let header = match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| ApiError::from(AuthError::Malformed))?,
            ),
            None => None,
        };
        Ok(AuthUser(
            auth::authenticate(state.enq.store(), header).await?,
        ))
    }
}

/// An authenticated admin.
pub struct AdminUser(pub UserRecord);

impl FromRequestParts<Arc<ApiState>> for AdminUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let AuthUser(user) = AuthUser::from_request_parts(parts, state).await?;
        if !user.is_admin {
            return Err(ApiError::Forbidden(
                "this route needs an admin token".into(),
            ));
        }
        Ok(AdminUser(user))
    }
}

/// A JSON body that must be an object. serde also fills a struct from an array, field by field
/// in declaration order (`[true, 3600]` would pass as `{"on": true, "ttl_s": 3600}`), which no
/// client means on purpose; the Content-Type rules are axum's `Json`'s.
pub(super) struct JsonObject<T>(pub(super) T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(ApiError::BadRequest(format!(
                "the body must be a JSON object, got {}",
                json_kind(&value)
            )));
        }
        serde_json::from_value(value)
            .map(JsonObject)
            .map_err(|e| ApiError::BadRequest(format!("bad body: {e}")))
    }
}

/// Path parameters with a JSON error instead of axum's plain-text one.
pub(super) struct JobPath(pub(super) String);

impl<S: Send + Sync> FromRequestParts<S> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(JobPath(id))
    }
}

/// The query string as a map, with a JSON error when it does not parse.
struct Params(HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(map) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(ApiError::from)?;
        Ok(Params(map))
    }
}

impl Params {
    fn number<T: std::str::FromStr>(&self, name: &str, what: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| {
                ApiError::BadRequest(format!("query parameter `{name}`: `{v}` is not {what}"))
            }),
        }
    }
}

// ---- URLs ------------------------------------------------------------------------------------

/// Makes a server-relative URL absolute for this request's client.
fn absolute(cfg: &ApiConfig, headers: &HeaderMap, url: String) -> String {
    if !url.starts_with('/') {
        return url;
    }
    let origin = match &cfg.public_url {
        Some(base) => base.trim_end_matches('/').to_string(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            let proto = headers
                .get("x-forwarded-proto")
                .and_then(|h| h.to_str().ok())
                .filter(|p| *p == "https" || *p == "http")
                .unwrap_or("http");
            format!("{proto}://{host}")
        }
    };
    format!("{origin}{url}")
}

impl ApiState {
    async fn signed(&self, headers: &HeaderMap, key: Option<&str>) -> Option<String> {
        let key = key?;
        match self
            .enq
            .blobs()
            .signed_url(key, self.cfg.signed_url_ttl)
            .await
        {
            Ok(u) => Some(absolute(&self.cfg, headers, u)),
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot sign a stored key");
                None
            }
        }
    }

    /// The archive card's thumbnail: path → signed URL of key → emoji 0's image → placeholder.
    async fn thumbnail(&self, headers: &HeaderMap, job: &JobRecord) -> (String, &'static str) {
        let placeholder = || absolute(&self.cfg, headers, PLACEHOLDER_PATH.to_string());
        match job.thumbnail_source() {
            ThumbnailSource::Path(p) => (absolute(&self.cfg, headers, p), "path"),
            ThumbnailSource::Key(k) => match self.signed(headers, Some(&k)).await {
                Some(u) => (u, "key"),
                None => (placeholder(), "placeholder"),
            },
            ThumbnailSource::Emoji0Image(k) => match self.signed(headers, Some(&k)).await {
                Some(u) => (u, "emoji0"),
                None => (placeholder(), "placeholder"),
            },
            ThumbnailSource::Placeholder => (placeholder(), "placeholder"),
        }
    }

    pub(super) async fn job_view(
        &self,
        headers: &HeaderMap,
        job: &JobRecord,
        progress: Option<&JobProgress>,
    ) -> Value {
        let (thumbnail_url, thumbnail_source) = self.thumbnail(headers, job).await;
        let mut emoji = Vec::with_capacity(job.emoji.len());
        for e in &job.emoji {
            let p = progress.and_then(|p| p.emoji.get(&e.idx));
            emoji.push(json!({
                "idx": e.idx,
                "label": e.label,
                "status": e.status,
                "fence": e.fence,
                "url": self.signed(headers, e.image_key.as_deref()).await,
                "animation_url": self.signed(headers, e.animation_key.as_deref()).await,
                "animation_apng_url": self.signed(
                    headers,
                    e.animation_key.as_deref().and_then(blobs::keys::animation_apng).as_deref(),
                ).await,
                "seed": e.seed,
                "attempts": e.attempts,
                "error": e.error,
                "updated_at": e.updated_at,
                "progress": p.map(|p| json!({"step": p.step, "total": p.total, "stage": p.stage})),
            }));
        }
        json!({
            "id": job.id,
            "status": job.status,
            "subject": job.subject,
            "style": job.style,
            "seed": job.seed,
            "created_at": job.created_at,
            "updated_at": job.updated_at,
            "thumbnail_url": thumbnail_url,
            "thumbnail_source": thumbnail_source,
            "pose_url": self.signed(headers, job.pose_key.as_deref()).await,
            "reference_url": self.signed(headers, job.reference_key.as_deref()).await,
            "download_url": absolute(&self.cfg, headers, format!("/api/job/{}/download", job.id)),
            "emoji_total": job.emoji.len(),
            "emoji_done": done_count(job),
            "progress": progress.and_then(|p| p.set.as_ref()).map(|p| json!({"step": p.step, "total": p.total, "stage": p.stage})),
            "progress_updated_at": progress.and_then(|p| p.updated_at),
            "emoji": emoji,
        })
    }
}

/// Emoji with a finished image (done or approved).
fn done_count(job: &JobRecord) -> usize {
    job.emoji
        .iter()
        .filter(|e| matches!(e.status, EmojiStatus::Done | EmojiStatus::Approved))
        .count()
}

// ---- handlers --------------------------------------------------------------------------------

async fn readyz(State(st): State<Arc<ApiState>>) -> Result<&'static str, ApiError> {
    st.enq
        .queue()
        .query_idem::<String>(&redis::cmd("PING"))
        .await
        .map_err(|e| ApiError::Unavailable(format!("not ready: redis: {e}")))?;
    st.enq
        .store()
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("not ready: database: {e}")))?;
    Ok("ready\n")
}

/// The generate-set spec (the JSON body, or the multipart `spec` part).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    subject: String,
    #[serde(default)]
    style: Option<String>,
    #[serde(default)]
    expressions: Option<Vec<String>>,
    #[serde(default)]
    seed: Option<u64>,
}

/// Parses the spec, which must be a JSON object: serde's derived `Deserialize` for a struct
/// also accepts a sequence of its fields in order, so `["subject"]` would otherwise be read as
/// `{"subject": "subject"}` and queue a job nobody meant.
fn parse_spec(bytes: &[u8]) -> Result<Spec, ApiError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("spec: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "spec: must be a JSON object like {{\"subject\": \"...\"}}, got {}",
            json_kind(&value)
        )));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("spec: {e}")))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether a `Content-Type` names JSON: `application/json` or `application/<x>+json`, with
/// any parameters (`; charset=utf-8`). A prefix test would take `application/jsonp`.
pub(crate) fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.strip_prefix("application/") {
        Some("json") => true,
        Some(sub) => sub.len() > "+json".len() && sub.ends_with("+json") && !sub.contains('/'),
        None => false,
    }
}

/// The essence of a `Content-Type` (`type/subtype`, lower case, no parameters).
fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn body_error(e: impl std::fmt::Display, status: StatusCode, limit: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(format!("the request body is larger than {limit} bytes"))
    } else {
        ApiError::BadRequest(format!("could not read the request body: {e}"))
    }
}

async fn generate_set(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let limit = st.enq.config().image_limits.max_bytes + 256 * 1024;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (spec, image) = if is_json_content_type(&content_type) {
        let body = Bytes::from_request(req, &st)
            .await
            .map_err(|e| body_error(e.body_text(), e.status(), limit))?;
        (parse_spec(&body)?, None)
    } else if media_type(&content_type) == "multipart/form-data" {
        let mut mp = Multipart::from_request(req, &st)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let (mut spec, mut image) = (None, None);
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(body_error(e.body_text(), e.status(), limit)),
            };
            let name = field.name().unwrap_or("").to_string();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| body_error(e.body_text(), e.status(), limit))?;
            match name.as_str() {
                "spec" if spec.is_none() => spec = Some(parse_spec(&bytes)?),
                "image" if image.is_none() => image = Some(bytes.to_vec()),
                "spec" | "image" => {
                    return Err(ApiError::BadRequest(format!("part `{name}` given twice")));
                }
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown part `{other}`; expected `spec` (JSON) and optionally `image`"
                    )));
                }
            }
        }
        let spec = spec.ok_or_else(|| {
            ApiError::BadRequest("multipart body without a `spec` part (the JSON spec)".into())
        })?;
        (spec, image)
    } else {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json (or application/<x>+json) or \
             multipart/form-data, got `{content_type}`"
        )));
    };
    let req = GenerateSet {
        user_id: user.id.clone(),
        subject: spec.subject,
        style: spec.style,
        expressions: spec.expressions.unwrap_or_default(),
        seed: spec.seed.unwrap_or_else(rand::random),
        model: None,
        reference: image,
        idempotency_key: match headers.get("idempotency-key") {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| {
                        ApiError::BadRequest("the Idempotency-Key header is not ASCII".into())
                    })?
                    .to_string(),
            ),
            None => None,
        },
    };
    let submitted = st.enq.generate_set(&req).await?;
    let mut view = st.job_view(&headers, &submitted.job, None).await;
    view["charged"] = json!(submitted.charged.as_ref().map_or(0, |c| c.amount));
    view["deduped"] = json!(submitted.deduped);
    if let Some(c) = &submitted.charged {
        view["balance"] = json!(c.balance);
    }
    Ok((StatusCode::OK, axum::Json(view)).into_response())
}

fn idx_of(params: &Params) -> Result<u32, ApiError> {
    params
        .number::<u32>("idx", "an emoji index (a whole number >= 0)")?
        .ok_or_else(|| {
            ApiError::BadRequest("missing query parameter `idx` (the emoji index)".into())
        })
}

async fn emoji_action(
    st: &ApiState,
    user: &UserRecord,
    job_id: &str,
    action: Action,
    params: &Params,
) -> Result<axum::Json<ActionReply>, ApiError> {
    let idx = idx_of(params)?;
    let reply = st.enq.emoji_action(&user.id, job_id, action, idx).await?;
    st.metrics.action(action, &reply);
    Ok(axum::Json(reply))
}

async fn retry(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
    params: Params,
) -> Result<axum::Json<ActionReply>, ApiError> {
    emoji_action(&st, &user, &job_id, Action::Retry, &params).await
}

async fn regenerate(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
    params: Params,
) -> Result<axum::Json<ActionReply>, ApiError> {
    emoji_action(&st, &user, &job_id, Action::Regenerate, &params).await
}

async fn approve(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
    params: Params,
) -> Result<axum::Json<ActionReply>, ApiError> {
    emoji_action(&st, &user, &job_id, Action::Approve, &params).await
}

async fn approve_all(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
) -> Result<axum::Json<ActionReply>, ApiError> {
    let reply = st.enq.approve_all(&user.id, &job_id).await?;
    st.metrics.action(Action::ApproveAll, &reply);
    Ok(axum::Json(reply))
}

async fn credits(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
) -> Result<axum::Json<Value>, ApiError> {
    let balance = st.enq.store().balance(&user.id).await?;
    Ok(axum::Json(json!({"user": user.id, "balance": balance})))
}

async fn job(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let job = st.enq.owned_job(&user.id, &job_id).await?;
    // Progress is best effort: a read of the database-backed state must not fail because
    // Redis is briefly away.
    let progress = match st.enq.queue().get_progress(&job_id).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(job_id, error = %e, "progress unavailable");
            None
        }
    };
    Ok(axum::Json(
        st.job_view(&headers, &job, progress.as_ref()).await,
    ))
}

async fn jobs(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    params: Params,
    headers: HeaderMap,
) -> Result<axum::Json<Value>, ApiError> {
    let limit = params
        .number::<u32>("limit", "a whole number")?
        .unwrap_or(st.cfg.page_size);
    if limit == 0 || limit > st.cfg.max_page_size {
        return Err(ApiError::BadRequest(format!(
            "query parameter `limit` must be 1-{}",
            st.cfg.max_page_size
        )));
    }
    let offset = params
        .number::<u32>("offset", "a whole number")?
        .unwrap_or(0);
    // One more than asked, to know whether a next page exists.
    let mut list = st
        .enq
        .store()
        .list_jobs(Some(&user.id), limit + 1, offset)
        .await?;
    let more = list.len() > limit as usize;
    list.truncate(limit as usize);
    let mut cards = Vec::with_capacity(list.len());
    for j in &list {
        let (thumbnail_url, source) = st.thumbnail(&headers, j).await;
        cards.push(json!({
            "id": j.id,
            "status": j.status,
            "subject": j.subject,
            "style": j.style,
            "created_at": j.created_at,
            "emoji_total": j.emoji.len(),
            "emoji_done": done_count(j),
            "thumbnail_url": thumbnail_url,
            "thumbnail_source": source,
            "url": absolute(&st.cfg, &headers, format!("/api/job/{}", j.id)),
        }));
    }
    Ok(axum::Json(json!({
        "jobs": cards,
        "limit": limit,
        "offset": offset,
        "next_offset": more.then_some(offset + limit),
    })))
}

async fn download_zip(
    State(st): State<Arc<ApiState>>,
    AuthUser(user): AuthUser,
    JobPath(job_id): JobPath,
) -> Result<Response, ApiError> {
    let job = st.enq.owned_job(&user.id, &job_id).await?;
    download::zip_response(st.enq.blobs(), &job).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffHoursBody {
    on: bool,
    #[serde(default)]
    ttl_s: Option<u64>,
}

#[derive(Debug, Serialize)]
struct OffHoursState {
    on: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_s: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    capped: bool,
}

async fn off_hours_set(
    State(st): State<Arc<ApiState>>,
    AdminUser(admin): AdminUser,
    JsonObject(body): JsonObject<OffHoursBody>,
) -> Result<axum::Json<OffHoursState>, ApiError> {
    if !body.on {
        st.enq.set_off_hours(None).await?;
        tracing::info!(admin = %admin.id, "off-hours cleared");
        return Ok(axum::Json(OffHoursState {
            on: false,
            ttl_s: None,
            capped: false,
        }));
    }
    let ttl_s = body.ttl_s.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "`ttl_s` is required with \"on\": true (seconds, at most {})",
            crate::queue::OFF_HOURS_MAX_TTL.as_secs()
        ))
    })?;
    if ttl_s == 0 {
        return Err(ApiError::BadRequest("`ttl_s` must be at least 1".into()));
    }
    let asked = Duration::from_secs(ttl_s);
    let set = st.enq.set_off_hours(Some(asked)).await?.unwrap_or(asked);
    tracing::info!(admin = %admin.id, ttl_s = set.as_secs(), "off-hours set");
    Ok(axum::Json(OffHoursState {
        on: true,
        ttl_s: Some(set.as_secs()),
        capped: set < asked,
    }))
}

async fn off_hours_clear(
    State(st): State<Arc<ApiState>>,
    AdminUser(admin): AdminUser,
) -> Result<axum::Json<OffHoursState>, ApiError> {
    st.enq.set_off_hours(None).await?;
    tracing::info!(admin = %admin.id, "off-hours cleared");
    Ok(axum::Json(OffHoursState {
        on: false,
        ttl_s: None,
        capped: false,
    }))
}

async fn off_hours_get(
    State(st): State<Arc<ApiState>>,
    AdminUser(_): AdminUser,
) -> Result<axum::Json<OffHoursState>, ApiError> {
    let left = st.enq.queue().off_hours_status().await?;
    Ok(axum::Json(OffHoursState {
        on: left.is_some(),
        ttl_s: left.map(|d| d.as_secs()),
        capped: false,
    }))
}

/// The largest single grant: far above any real top-up, far below where sums of a few
/// grants could overflow an `i64` balance (which the store refuses too, as a 400).
pub const MAX_GRANT: i64 = 1_000_000_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    user: String,
    amount: i64,
    #[serde(default)]
    reason: Option<String>,
    /// Makes a retried grant apply once.
    #[serde(default)]
    idempotency_key: Option<String>,
}

async fn grant_credits(
    State(st): State<Arc<ApiState>>,
    AdminUser(admin): AdminUser,
    JsonObject(body): JsonObject<GrantBody>,
) -> Result<axum::Json<Value>, ApiError> {
    if body.amount <= 0 || body.amount > MAX_GRANT {
        return Err(ApiError::BadRequest(format!(
            "`amount` must be 1-{MAX_GRANT}, got {}",
            body.amount
        )));
    }
    let key = format!(
        "grant:{}",
        body.idempotency_key
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
    );
    let reason = body
        .reason
        .unwrap_or_else(|| format!("granted by {}", admin.id));
    let outcome = st
        .enq
        .store()
        .grant(&body.user, body.amount, &reason, &key)
        .await
        .map_err(|e| match e {
            StoreError::UnknownUser(u) => ApiError::NotFound(format!("no user `{u}`")),
            StoreError::IdemKeyReused { key } => ApiError::BadRequest(format!(
                "idempotency key `{key}` was used for another grant"
            )),
            other => other.into(),
        })?;
    Ok(axum::Json(
        json!({"user": body.user, "balance": outcome.balance()}),
    ))
}

async fn file(
    State(st): State<Arc<ApiState>>,
    Path(key): Path<String>,
    params: Params,
) -> Result<Response, ApiError> {
    let public = blobs::is_public_key(&key);
    if !public {
        let exp = params.number::<i64>("exp", "a Unix time")?;
        let sig = params.0.get("sig").map(String::as_str);
        st.enq
            .blobs()
            .signer()
            .verify(&key, exp, sig, chrono::Utc::now().timestamp())
            .map_err(|e: SignatureError| ApiError::Forbidden(e.to_string()))?;
    }
    let bytes = st.enq.blobs().get(&key).await?;
    let content_type = blobs::content_type(&key);
    // Keys name immutable objects (the fence is in the name): a public thumbnail can be
    // cached for good; a signed URL only by this client, at most until it expires.
    let cache = if public {
        "public, max-age=31536000, immutable"
    } else {
        "private, max-age=3600"
    };
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ],
        Body::from(bytes),
    )
        .into_response())
}

async fn placeholder(State(st): State<Arc<ApiState>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=86400"),
            ),
        ],
        st.placeholder.clone(),
    )
        .into_response()
}
