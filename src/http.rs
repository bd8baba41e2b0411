//! `/healthz`, `/readyz` and `/metrics` for the daemon.
//!
//! A deliberately tiny HTTP/1.1 responder on tokio rather than axum: these three GETs are all
//! the daemon serves today, and the crate registry was unreachable from the build host when
//! this was written. The enqueue API (with the `http` module's routes in DESIGN.md) replaces it
//! with axum; the handlers' answers stay the same.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::worker::{Shutdown, Worker};

/// What the endpoints read. The server starts before the model loads (a long load must not
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
}

/// Why the endpoint could not start.
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

/// Binds `addr` and serves until `shutdown`; returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    state: Arc<HttpState>,
    shutdown: Shutdown,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    tracing::info!(addr = %local, "serving /healthz, /readyz and /metrics");
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _ =
                            tokio::time::timeout(Duration::from_secs(10), respond(stream, &state))
                                .await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok((local, task))
}

async fn respond(mut stream: TcpStream, state: &HttpState) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Read the request head only; these endpoints take no body.
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => match state.worker.get() {
            None => (
                "503 Service Unavailable",
                "text/plain",
                "not ready: loading the model\n".to_string(),
            ),
            Some(worker) => match worker.ready().await {
                Ok(()) => ("200 OK", "text/plain", "ready\n".to_string()),
                Err(e) => (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not ready: {e}\n"),
                ),
            },
        },
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            state
                .worker
                .get()
                .map(|w| w.render_metrics())
                .unwrap_or_default(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
