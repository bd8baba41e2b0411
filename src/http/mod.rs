//! The HTTP layer (axum): the daemon's probes (`/healthz`, `/readyz`, `/metrics`, here) and
//! the enqueue API ([`api`]: routes, the archive, image files; [`download`]: the streamed zip).
//!
//! # Shape
//!
//! - [`HttpState`] is the shared state every handler gets (`State<Arc<HttpState>>`).
//! - [`probe_routes`] are the daemon's probes; [`router`] adds the JSON fallbacks (404, 405)
//!   and the state. More routes go in with `probe_routes().merge(api_routes())` before the
//!   fallbacks, over the same state.
//! - [`ApiError`] is the one error type handlers return: its [`ApiError::status`] and
//!   [`ApiError::code`] are the single place that maps errors to status codes, and every error
//!   answers with a JSON body `{"error": "...", "code": "..."}`.
//! - [`serve`] / [`serve_router`] bind, serve until the daemon's [`Shutdown`] fires, then stop
//!   gracefully (no new connections, requests in flight end), under [`HttpLimits`]: read
//!   timeouts and a connection limit ([`serve`](mod@serve) module).
//!
//! The probes answer with `connection: close`: a probe or a scraper opens one connection per
//! request anyway, and a plain `GET` read to EOF (what load balancers and tests do) then ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::worker::{Shutdown, Worker};

pub mod api;
pub mod download;
pub mod events;
pub mod serve;
pub mod web;

pub use serve::HttpLimits;

/// What the handlers read. The server starts before the model loads (a long load must not
/// look like a dead process to a liveness probe), so the worker is filled in later; until
/// then `/readyz` answers 503 "loading".
#[derive(Debug, Default)]
pub struct HttpState {
    worker: std::sync::OnceLock<Arc<Worker>>,
}

impl HttpState {
    pub fn new() -> Arc<HttpState> {
        Arc::new(HttpState::default())
    }

    /// A state whose worker is already up.
    pub fn for_worker(worker: Arc<Worker>) -> Arc<HttpState> {
        let s = HttpState::new();
        s.set_worker(worker);
        s
    }

    /// Marks the worker started (model loaded, connections made). Later calls are ignored.
    pub fn set_worker(&self, worker: Arc<Worker>) {
        let _ = self.worker.set(worker);
    }

    /// The worker, once started.
    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.get()
    }
}

/// Every error a handler answers with. The status code and the machine-readable `code` of
/// each variant are decided in [`ApiError::status`] and [`ApiError::code`], nowhere else.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something impossible (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or invalid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Not enough credits (402).
    #[error("{0}")]
    PaymentRequired(String),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such route or resource, or one the caller may not see (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists, the method does not (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The resource is not in a state that allows this (409), e.g. nothing to download yet.
    #[error("{0}")]
    Conflict(String),
    /// The request body did not arrive in time (408).
    #[error("{0}")]
    RequestTimeout(String),
    /// The request body is too large (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body's Content-Type is not one this route reads (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Come back later, e.g. off-hours (429 with `Retry-After`).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after: Duration,
    },
    /// The daemon cannot serve yet or right now: model loading, Redis or the DB down (503).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500). The detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::PaymentRequired(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable `code` of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::PaymentRequired(_) => "insufficient_credits",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// The `error` text sent to the client.
    fn public_message(&self) -> String {
        match self {
            // The detail may hold paths, SQL or hostnames: it goes to the log only.
            ApiError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
        }
        let body = serde_json::json!({ "error": self.public_message(), "code": self.code() });
        let mut resp = (status, axum::Json(body)).into_response();
        // The metrics middleware labels the request with this code.
        resp.extensions_mut().insert(ErrorCode(self.code()));
        if let ApiError::Unauthorized(_) = &self {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            // Whole seconds, rounded up: `Retry-After: 0` would invite an immediate retry.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// The `code` of an error response, attached to it for the metrics middleware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(r.body_text()),
            // axum's `Json` reads only `application/json` and `application/<x>+json`.
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(
                "Content-Type must be application/json (or application/<x>+json)".into(),
            ),
            _ => ApiError::BadRequest(r.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::BadRequest(r.body_text())
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl HttpError {
    /// A taken port stays taken: permanent.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// `/healthz`, `/readyz` and `/metrics`, each answering with `connection: close`.
pub fn probe_routes() -> Router<Arc<HttpState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::map_response(close_connection))
}

/// The whole application over `state`: the probes plus JSON 404/405 fallbacks.
pub fn router(state: Arc<HttpState>) -> Router {
    with_fallbacks(probe_routes()).with_state(state)
}

/// Adds the JSON 404 and 405 answers to a set of routes (call it last, after every merge).
pub fn with_fallbacks<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn close_connection(resp: Response) -> Response {
    closing(resp)
}

fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<Arc<HttpState>>) -> Result<&'static str, ApiError> {
    let worker = state
        .worker()
        .ok_or_else(|| ApiError::Unavailable("not ready: loading the model".into()))?;
    worker
        .ready()
        .await
        .map_err(|e| ApiError::Unavailable(format!("not ready: {e}")))?;
    Ok("ready\n")
}

async fn metrics(State(state): State<Arc<HttpState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state
            .worker()
            .map(|w| w.render_metrics())
            .unwrap_or_default(),
    )
}

// The fallbacks close the connection too: a client that sent a request nothing serves
// (a probe with a typo, a scanner) is read to EOF like a probe.
async fn not_found(method: Method, uri: Uri) -> Response {
    closing(ApiError::NotFound(format!("no route for {method} {}", uri.path())).into_response())
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    closing(
        ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
            .into_response(),
    )
}

/// Binds `addr` and serves the probes over `state` until `shutdown`; returns the bound
/// address (port 0 picks one) and the server task, which ends after a graceful stop.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<HttpState>,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    serve_router(addr, router(state), shutdown).await
}

/// Binds `addr` and serves `app` under the default [`HttpLimits`] until `shutdown`; see
/// [`serve`] and [`serve::serve_with_limits`].
pub async fn serve_router(
    addr: SocketAddr,
    app: Router,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    serve::serve_with_limits(addr, app, shutdown, HttpLimits::default()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn errors_are_json_with_status_and_code() {
        let resp = ApiError::NotFound("no job `x`".into()).into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            body(resp).await,
            serde_json::json!({"error": "no job `x`", "code": "not_found"})
        );
        let resp = ApiError::TooManyRequests {
            message: "off-hours".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let resp = ApiError::Internal("db at /secret/path".into()).into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let b = body(resp).await;
        assert_eq!(b["code"], "internal");
        assert!(!b["error"].as_str().unwrap().contains("secret"));
    }

    #[tokio::test]
    async fn probes_answer_before_the_worker_is_up() {
        use tower::ServiceExt;
        let app = router(HttpState::new());
        let req = |m: &str, p: &str| {
            axum::http::Request::builder()
                .method(m)
                .uri(p)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let resp = app.clone().oneshot(req("GET", "/healthz")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        let resp = app.clone().oneshot(req("GET", "/readyz")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let b = body(resp).await;
        assert_eq!(b["code"], "unavailable");
        assert!(b["error"].as_str().unwrap().contains("loading"));
        let resp = app.clone().oneshot(req("GET", "/nope")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[header::CONNECTION], "close");
        assert_eq!(body(resp).await["code"], "not_found");
        let resp = app.oneshot(req("POST", "/healthz")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body(resp).await["code"], "method_not_allowed");
    }
}
