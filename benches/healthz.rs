//! `/healthz` latency of the real `api` binary while it takes the heaviest uploads it accepts.
//!
//! Starts a `redis-server` (no persistence), a SQLite file and `popcon-worker api` as its own
//! process, then probes `GET /healthz` on a fresh connection every 5 ms: first idle (the
//! baseline, same run), then while 4 clients upload reference photos at once, over and over:
//!
//! - `8-bit 24 Mpx`: a 4896×4896 RGB PNG, the most pixels the limits accept, decoded in full
//!   (≈ 72 MB each) on a blocking thread, resized and stored;
//! - `16-bit bomb`: the same size at 16 bits per channel (a file of a few hundred KiB), which
//!   the allocation budget refuses before decoding.
//!
//! Also prints the API process's peak resident memory (VmHWM) after each phase.
//!
//! `cargo bench --bench healthz` (`-- SECONDS` per phase, default 10). Prints a table.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;
use support::{Proc, free_port, percentile};

/// A PNG of `side`² pixels with gradients and a little texture (so it neither compresses to
/// nothing nor exceeds the 10 MiB upload cap), 8 or 16 bits per channel.
fn png(side: u32, sixteen: bool) -> Vec<u8> {
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let px = |x: u32, y: u32, c: u32| -> u16 {
        let v = (x * (3 + c) + y * (5 + 2 * c)) ^ ((x / 7) * (y / 11));
        (v & 0xffff) as u16
    };
    let mut data = Vec::with_capacity((side * side * 3 * if sixteen { 2 } else { 1 }) as usize);
    for y in 0..side {
        for x in 0..side {
            for c in 0..3 {
                let v = px(x, y, c);
                if sixteen {
                    // PNG stores 16-bit samples big-endian; the encoder takes native order.
                    data.extend_from_slice(&(v & 0xf000).to_ne_bytes());
                } else {
                    data.push((v >> 4) as u8 & 0xf8);
                }
            }
        }
    }
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::Adaptive)
        .write_image(
            &data,
            side,
            side,
            if sixteen {
                image::ExtendedColorType::Rgb16
            } else {
                image::ExtendedColorType::Rgb8
            },
        )
        .expect("png");
    out
}

/// One request on its own connection; the status and the time to the last byte.
fn request(addr: &str, head: &str, body: &[u8]) -> (u16, Duration) {
    let t = Instant::now();
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, t.elapsed());
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    s.write_all(head.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let took = t.elapsed();
    let status = std::str::from_utf8(resp.get(9..12).unwrap_or(b"000"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, took)
}

fn upload(addr: &str, token: &str, image: &[u8]) -> u16 {
    let boundary = "popconbenchboundary";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"\r\nContent-Type: application/json\r\n\r\n\
             {{\"subject\": \"a red fox\", \"expressions\": [\"happy\"]}}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"ref.png\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(image);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /api/generate-set HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    request(addr, &head, &body).0
}

fn vm_hwm_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Probes `/healthz` every 5 ms for `secs` while `load` runs in 4 threads; the probe times and
/// the loads' statuses.
fn phase(
    addr: &str,
    secs: f64,
    load: Option<Arc<dyn Fn() -> u16 + Send + Sync>>,
) -> (Vec<Duration>, Vec<u16>) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut loaders = Vec::new();
    if let Some(load) = load {
        for _ in 0..4 {
            let (stop, load, done) = (stop.clone(), load.clone(), done.clone());
            loaders.push(std::thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(load());
                    done.fetch_add(1, Ordering::Relaxed);
                }
                statuses
            }));
        }
        // Let every loader get its first upload in flight before probing.
        std::thread::sleep(Duration::from_millis(200));
    }
    let head = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut probes = Vec::new();
    while Instant::now() < until {
        let (status, took) = request(addr, &head, b"");
        assert_eq!(status, 200, "healthz failed");
        probes.push(took);
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = loaders
        .into_iter()
        .flat_map(|h| h.join().expect("loader"))
        .collect();
    probes.sort();
    (probes, statuses)
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10.0);
    let dir = tempfile::tempdir().expect("temp dir");
    let redis_port = free_port();
    let _redis = Proc(
        Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
            .args([
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH"),
    );
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let token = rt.block_on(async {
        let store = popcon_worker::store::Store::connect(&db)
            .await
            .expect("store");
        popcon_worker::auth::add_user(&store, "bench", false, 1 << 40)
            .await
            .expect("user")
            .1
    });
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let api = Proc(
        Command::new(env!("CARGO_BIN_EXE_popcon-worker"))
            .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
            .env("DATABASE_URL", &db)
            .env("POPCON_RESULTS", dir.path().join("results"))
            .env("POPCON_URL_SECRET", "bench-secret-0123456789abcdef")
            .env("RUST_LOG", "error")
            .args(["api", "--listen", &addr])
            .spawn()
            .expect("the api binary"),
    );
    let pid = api.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(
        &addr,
        &format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
        b"",
    )
    .0 != 200
    {
        assert!(Instant::now() < deadline, "the api never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    let big = Arc::new(png(4896, false));
    let bomb = Arc::new(png(4896, true));
    println!(
        "uploads: 8-bit 4896x4896 PNG {:.1} MiB, 16-bit 4896x4896 PNG {:.1} MiB; {secs} s per phase, 4 concurrent uploaders",
        big.len() as f64 / 1048576.0,
        bomb.len() as f64 / 1048576.0
    );
    let mut rows = Vec::new();
    let (idle, _) = phase(&addr, secs, None);
    rows.push(("idle (baseline)", idle, Vec::new(), vm_hwm_mib(pid)));
    for (name, image) in [("4 x 16-bit bomb", bomb), ("4 x 8-bit 24 Mpx", big)] {
        let (a, t, i) = (addr.clone(), token.clone(), image.clone());
        let (probes, statuses) = phase(&addr, secs, Some(Arc::new(move || upload(&a, &t, &i))));
        rows.push((name, probes, statuses, vm_hwm_mib(pid)));
    }
    let base_p99 = percentile(&rows[0].1, 0.99);
    println!();
    println!(
        "| phase | probes | /healthz p50 | p99 | max | p99 / idle p99 | uploads (status: count) | API peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|");
    for (name, probes, statuses, hwm) in &rows {
        let mut counts = std::collections::BTreeMap::new();
        for s in statuses {
            *counts.entry(*s).or_insert(0usize) += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        let p99 = percentile(probes, 0.99);
        println!(
            "| {name} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} | {} | {hwm:.0} MiB |",
            probes.len(),
            percentile(probes, 0.5).as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            probes.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
            p99.as_secs_f64() / base_p99.as_secs_f64(),
            if counts.is_empty() {
                "—".into()
            } else {
                counts.join(", ")
            },
        );
    }
    drop(api);
}
