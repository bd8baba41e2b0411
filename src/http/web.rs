//! The web app (`web/` in the repository), compiled into the binary: `GET /` serves the page,
//! `/app.js` and `/app.css` its script and style. No build step and no CDN, so a fresh clone
//! serves the same page it tests, and nothing is fetched at run time.
//!
//! The page holds no secrets; it talks to the JSON routes with the user's bearer token. Its
//! `Content-Security-Policy` allows scripts, styles and connections only from this origin,
//! and images from anywhere (signed object-store URLs live on another host).

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

const CSP: &str = "default-src 'self'; img-src * data: blob:; media-src * data: blob:; \
                   connect-src 'self'; script-src 'self'; style-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // Always revalidate: a deploy must not leave an old script beside a new API.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

/// The page and its two assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
}
