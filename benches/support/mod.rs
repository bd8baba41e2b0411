//! Helpers the benchmark binaries share (each bench is its own crate; they include this with
//! `#[path]`): a child process killed on drop, a free loopback port, percentiles.

#![allow(dead_code)] // each bench uses what it needs

use std::process::Child;
use std::time::Duration;

/// A child process (a `redis-server`, the API) killed and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The `p` quantile (0–1) of ascending `sorted` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
