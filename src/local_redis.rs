//! `popcon-worker run --start-redis`: "a Redis it can reach or starts for you".
//!
//! When asked (flag, `POPCON_START_REDIS`, or `start_redis = true` in the settings file) and
//! nothing answers at the Redis URL, the daemon starts `redis-server` on the URL's port as a
//! child process, with persistence on (`--appendonly yes`) in a data folder
//! (`--redis-data`, default `./redis-data`), and stops it with `SHUTDOWN` (which flushes the
//! append-only file) after the worker has stopped and handed its work back. If something
//! already answers there, that server is used and nothing is started.
//!
//! Opt-in on purpose: a worker that silently starts its own Redis when the real one is down
//! would claim nothing the API enqueued. Only loopback URLs qualify. The child runs in its own
//! process group, so a Ctrl-C in the terminal reaches the worker (which then still needs Redis
//! to release its entries) and not Redis directly. If the worker is killed with SIGKILL the
//! child keeps running, and the next `--start-redis` finds it answering and reuses it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The `redis-server` this process started; stopped when dropped.
pub struct LocalRedis {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

/// `redis-server`, or `$REDIS_SERVER`.
fn binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

/// The loopback address and port of `url`, or why it cannot be started locally.
fn local_addr(url: &str) -> anyhow::Result<(String, SocketAddr)> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .with_context(|| format!("--start-redis: cannot parse the Redis URL `{url}`"))?;
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        other => bail!("--start-redis starts a plain TCP Redis only; the URL is {other:?}"),
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (bare, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.ip().is_loopback()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--start-redis only starts a Redis on this machine (127.0.0.1, localhost or ::1); \
                 the Redis URL points at `{host}`"
            )
        })?;
    Ok((bare.to_string(), addr))
}

/// Whether a Redis answers `PING` at `addr` (a password-protected one answers `-NOAUTH`).
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && (buf[0] == b'+' || buf[0] == b'-'))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Starts `redis-server` for `url` with its data in `data_dir`, unless a Redis already
/// answers there (then `None`).
pub fn ensure(url: &str, data_dir: &Path) -> anyhow::Result<Option<LocalRedis>> {
    let (host, addr) = local_addr(url)?;
    if answers(addr) {
        tracing::info!(%addr, "a Redis already answers at the Redis URL; --start-redis starts none");
        return Ok(None);
    }
    std::fs::create_dir_all(data_dir).with_context(|| {
        format!(
            "--start-redis: creating the data folder {}",
            data_dir.display()
        )
    })?;
    let dir = data_dir
        .canonicalize()
        .with_context(|| format!("--start-redis: {}", data_dir.display()))?;
    let log_path = dir.join("redis-server.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("--start-redis: opening {}", log_path.display()))?;
    let bind = if addr.is_ipv6() { "::1" } else { "127.0.0.1" };
    let bin = binary();
    let mut cmd = Command::new(&bin);
    cmd.arg("--port")
        .arg(addr.port().to_string())
        .args(["--bind", bind])
        .arg("--dir")
        .arg(&dir)
        .args(["--appendonly", "yes", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            log.try_clone().context("--start-redis: log file")?,
        ))
        .stderr(Stdio::from(log));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "--start-redis: `{bin}` is not installed (not found on PATH). Install Redis \
                 (e.g. `apt-get install redis-server` or `brew install redis`), set \
                 REDIS_SERVER to the binary, or start Redis yourself and drop --start-redis"
            )
        } else {
            anyhow::anyhow!("--start-redis: cannot run `{bin}`: {e}")
        }
    })?;
    let mut local = LocalRedis { child, addr, dir };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if answers(addr) {
            break;
        }
        if let Ok(Some(status)) = local.child.try_wait() {
            bail!(
                "--start-redis: `{bin}` exited ({status}) before answering on {host}:{}; its log \
                 ({}):\n{}",
                addr.port(),
                log_path.display(),
                log_tail(&log_path)
            );
        }
        if Instant::now() > deadline {
            // Dropping `local` stops the child.
            bail!(
                "--start-redis: `{bin}` did not answer on {host}:{} within 15 s; see {}",
                addr.port(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::warn!(
        pid = local.child.id(),
        %addr,
        data = %local.dir.display(),
        "STARTED A LOCAL redis-server (append-only persistence) as a child of this worker; \
         it is stopped when the worker exits"
    );
    Ok(Some(local))
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        // SHUTDOWN flushes the append-only file; the server closes the connection as it goes.
        if let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"SHUTDOWN\r\n");
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    tracing::warn!(
                        pid = self.child.id(),
                        "redis-server did not stop; killing it"
                    );
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        tracing::info!(addr = %self.addr, "stopped the local redis-server");
    }
}
