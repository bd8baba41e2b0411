//! Result images: where the worker puts PNGs and where readers find them again.
//!
//! Keys are relative, `/`-separated names chosen by the worker ([`keys`]); a key names one
//! immutable object. Fences are part of every key, so a regenerate writes a *new* object and
//! a stale worker that uploads late never overwrites the image a newer fence's row points at.
//!
//! [`Blobs`] is an enum rather than a trait object: the backends are a closed set, and an enum
//! keeps `async fn` without boxing. The only backend today is a local directory (the default,
//! `POPCON_RESULTS`, `./results`). Writes are atomic: a temp file in the same directory, then
//! `rename`, so a reader (or a crash) never sees half a PNG under a real key.
//!
//! Not yet here: S3/R2 through the `object_store` crate (a `Blobs::ObjectStore` variant, with
//! `url_for` returning a signed URL). It arrives with the production-storage step; nothing in
//! the worker depends on the backend being local.

use std::path::{Path, PathBuf};

/// What can go wrong storing or reading a result image.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The key would escape the store or is not a plain relative name. Permanent.
    #[error("invalid blob key `{key}`: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// No object under this key.
    #[error("no blob under `{0}`")]
    NotFound(String),
    /// The filesystem refused (disk full, permissions, I/O). Retryable: the condition may pass.
    #[error("blob store I/O on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl BlobError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BlobError::Io { .. })
    }
}

/// Settings for [`Blobs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobsConfig {
    /// Root folder of the local backend (env `POPCON_RESULTS`).
    pub root: PathBuf,
}

impl Default for BlobsConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("results"),
        }
    }
}

/// The result-image store.
#[derive(Debug, Clone)]
pub enum Blobs {
    /// A local directory: the embedded default.
    Local(LocalDir),
}

/// The local-directory backend.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl Blobs {
    /// Opens the configured backend (creating the local root if missing).
    pub fn open(cfg: &BlobsConfig) -> Result<Blobs, BlobError> {
        std::fs::create_dir_all(&cfg.root).map_err(|source| BlobError::Io {
            path: cfg.root.clone(),
            source,
        })?;
        // Absolute, so `file://` URLs stay valid whatever the reader's working directory is.
        let root = std::fs::canonicalize(&cfg.root).map_err(|source| BlobError::Io {
            path: cfg.root.clone(),
            source,
        })?;
        Ok(Blobs::Local(LocalDir { root }))
    }

    /// Stores `bytes` under `key`, replacing any object there, atomically.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), BlobError> {
        match self {
            Blobs::Local(dir) => {
                let path = dir.path_of(key)?;
                tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
                    .await
                    .map_err(|e| BlobError::Io {
                        path: PathBuf::from(key),
                        source: std::io::Error::other(e.to_string()),
                    })?
            }
        }
    }

    /// Reads the object under `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>, BlobError> {
        match self {
            Blobs::Local(dir) => {
                let path = dir.path_of(key)?;
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(b),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(BlobError::NotFound(key.to_string()))
                    }
                    Err(source) => Err(BlobError::Io { path, source }),
                }
            }
        }
    }

    /// Where a reader fetches `key`: a `file://` URL for the local backend.
    pub fn url_for(&self, key: &str) -> Result<String, BlobError> {
        match self {
            Blobs::Local(dir) => Ok(format!("file://{}", dir.path_of(key)?.display())),
        }
    }

    /// The local path of `key` (local backend only; tests and the operator CLI).
    pub fn local_path(&self, key: &str) -> Result<PathBuf, BlobError> {
        match self {
            Blobs::Local(dir) => dir.path_of(key),
        }
    }
}

impl LocalDir {
    fn path_of(&self, key: &str) -> Result<PathBuf, BlobError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// Keys are relative paths of `[A-Za-z0-9._-]` segments: no `..`, no absolute paths, no empty
/// segments, so no key can reach outside the store's root.
fn check_key(key: &str) -> Result<(), BlobError> {
    let bad = |reason| {
        Err(BlobError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() || key.len() > 512 {
        return bad("must be 1-512 characters");
    }
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, `.` or `..` path segment");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("segments are [A-Za-z0-9._-]");
        }
    }
    Ok(())
}

/// Temp file in the target's directory (same filesystem, so `rename` is atomic), then rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
    let io = |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// The key scheme, in one place.
pub mod keys {
    /// The full-size PNG of emoji `idx` produced under `fence`.
    pub fn emoji(job_id: &str, idx: u32, fence: u64) -> String {
        format!("jobs/{job_id}/emoji/{idx}-{fence}.png")
    }

    /// Its thumbnail.
    pub fn thumb(job_id: &str, idx: u32, fence: u64) -> String {
        format!("jobs/{job_id}/thumb/{idx}-{fence}.png")
    }

    /// The pose image of a set, produced under `fence`.
    pub fn pose(job_id: &str, fence: u64) -> String {
        format!("jobs/{job_id}/pose-{fence}.png")
    }

    /// The user's uploaded reference image.
    pub fn reference(job_id: &str) -> String {
        format!("jobs/{job_id}/reference.png")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_url_and_key_checks() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&BlobsConfig {
            root: dir.path().join("r"),
        })
        .unwrap();
        let key = keys::emoji("j1", 3, 2);
        assert_eq!(key, "jobs/j1/emoji/3-2.png");
        blobs.put(&key, b"png".to_vec()).await.unwrap();
        blobs.put(&key, b"png2".to_vec()).await.unwrap();
        assert_eq!(blobs.get(&key).await.unwrap(), b"png2");
        let url = blobs.url_for(&key).unwrap();
        assert!(url.starts_with("file:///") && url.ends_with("jobs/j1/emoji/3-2.png"));
        // No temp files left behind.
        let files: Vec<_> = std::fs::read_dir(dir.path().join("r/jobs/j1/emoji"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
        assert!(matches!(
            blobs.get("jobs/none.png").await,
            Err(BlobError::NotFound(_))
        ));
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "a b"] {
            let e = blobs.put(bad, vec![]).await.unwrap_err();
            assert!(!e.is_retryable(), "{bad}: {e}");
        }
    }
}
