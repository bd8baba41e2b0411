//! A real S3-compatible server per test: moto's `moto_server` on a free port, killed on drop.
//!
//! The binary is `$MOTO_SERVER`, else `moto_server` on `PATH`, else where
//! `scripts/moto-env.sh` (run by `.ci/run`) installs it. If none exists the test panics with
//! the install hint: an S3 test never skips itself.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct MotoServer {
    child: Child,
    port: u16,
}

const CI_VENV_BINARY: &str = "/var/tmp/popcon-worker-ci/venv-moto/bin/moto_server";

fn binary() -> PathBuf {
    if let Ok(b) = std::env::var("MOTO_SERVER") {
        return PathBuf::from(b);
    }
    if let Some(found) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("moto_server"))
            .find(|p| p.is_file())
    }) {
        return found;
    }
    let ci = PathBuf::from(CI_VENV_BINARY);
    if ci.is_file() {
        return ci;
    }
    panic!(
        "moto_server (a local S3 server) is not installed: run `scripts/moto-env.sh` \
         (or `pip install 'moto[server]'`) and/or set MOTO_SERVER to its path"
    );
}

impl MotoServer {
    pub fn start() -> MotoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let child = Command::new(binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let server = MotoServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server never listened on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (moto accepts the unsigned request).
    pub fn create_bucket(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ureq::put(&format!("{}/{name}", self.endpoint())).call() {
                Ok(_) => return,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("creating bucket {name}: {e}"),
            }
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
