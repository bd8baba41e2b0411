//! The accept loop: hyper's HTTP/1 connection builder under a connection limit, with read
//! timeouts, in place of `axum::serve` (which has none: a client that sends half a header and
//! stalls holds its connection, and its task, for as long as the TCP stack lets it).
//!
//! - **Header read timeout** ([`HttpLimits::header_read`]): hyper's `header_read_timeout`,
//!   which also runs while a kept-alive connection waits for its next request, so it is the
//!   idle timeout too: a connection that sends nothing for that long is closed.
//! - **Body read timeout** ([`HttpLimits::body_read`]): every request body is wrapped in a
//!   deadline; a body still arriving when it passes fails the read, and the request is
//!   answered `408` with `connection: close` whatever the handler made of the failed read.
//! - **Connection limit** ([`HttpLimits::max_connections`]): one semaphore permit per open
//!   connection, taken *before* `accept`: beyond the limit new connections wait in the
//!   kernel's listen backlog (and time out on the client side) instead of being accepted and
//!   dropped, so a burst is served late rather than refused.
//! - **Graceful stop**: on [`Shutdown`] the listener closes, every connection is told to finish
//!   its request in flight and close, and the server task ends when all permits are back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use super::{ApiError, HttpError};
use crate::worker::Shutdown;

/// Read timeouts and the connection limit of an HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From the first byte of a request (or the end of the previous response) to the end of
    /// its header; also the longest a kept-alive connection may sit idle.
    pub header_read: Duration,
    /// From the end of the header to the last byte of the body.
    pub body_read: Duration,
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Binds `addr` and serves `app` under `limits` until `shutdown`; returns the bound address
/// and the server task, which ends once every connection has closed.
pub async fn serve_with_limits(
    addr: SocketAddr,
    app: Router,
    shutdown: Shutdown,
    limits: HttpLimits,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(addr = %local, ?limits, "HTTP server listening");
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.body_read,
        body_deadline,
    ));
    let task = tokio::spawn(accept_loop(listener, app, shutdown, limits, local));
    Ok((local, task))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: Shutdown,
    limits: HttpLimits,
    local: SocketAddr,
) {
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    // Connections watch this to start their graceful close.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        let header_read = limits.header_read;
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let res = tokio::select! {
                r = conn.as_mut() => r,
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(e) = res {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a permit: all of them back means all connections closed.
    let _ = permits.acquire_many(max as u32).await;
    tracing::debug!(addr = %local, "HTTP server stopped");
}

/// Marks that a request body missed its deadline.
#[derive(Clone, Default)]
struct TimedOut(Arc<AtomicBool>);

async fn body_deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let timed_out = TimedOut::default();
    let flag = timed_out.clone();
    let req = req.map(|b| {
        Body::new(DeadlineBody {
            inner: b,
            sleep: Box::pin(tokio::time::sleep(limit)),
            timed_out: flag,
        })
    });
    let resp = next.run(req).await;
    if timed_out.0.load(Ordering::Acquire) {
        let mut resp = ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            limit.as_secs_f64()
        ))
        .into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    resp
}

/// A request body that fails once its deadline passes.
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    timed_out: TimedOut,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.timed_out.0.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request body read timed out",
            )))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
