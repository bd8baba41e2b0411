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
//! Readers reach objects over HTTP in two ways:
//! - **Public paths** ([`Blobs::public_url`]): `{public_base}/{key}`, for thumbnails only.
//!   This is what the worker writes into `jobs.thumbnail_path`: archive cards are listed by
//!   the page and must stay cheap and cacheable. The job id in the key is 128 random bits, so
//!   the path is unguessable. The API serves `/files/{key}` for thumbnail keys without a
//!   signature; point `public_base` at a CDN instead and the API is not involved.
//! - **Signed URLs** ([`Blobs::signed_url`]): `{public_base}/{key}?exp=…&sig=…`, an HMAC-SHA256
//!   of the key and the expiry under a server secret ([`UrlSigner`]), for full-size images,
//!   pose and reference. The API checks the signature before serving the bytes. Every API
//!   process must share the secret (`POPCON_URL_SECRET`), or a URL signed by one is refused
//!   by another.
//!
//! Not yet here: S3/R2 through the `object_store` crate (a `Blobs::ObjectStore` variant whose
//! `signed_url` is the store's presigned URL). Nothing in the worker or the API depends on the
//! backend being local except the zip download, which reads local files.

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
    /// Bad settings (a short signing secret). Permanent.
    #[error("blob store settings: {0}")]
    Config(String),
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

/// Where the API serves blobs by default (relative to its own origin).
pub const DEFAULT_PUBLIC_BASE: &str = "/files";

/// Settings for [`Blobs`].
#[derive(Clone, PartialEq, Eq)]
pub struct BlobsConfig {
    /// Root folder of the local backend (env `POPCON_RESULTS`).
    pub root: PathBuf,
    /// Where readers fetch objects: `/files` (the API) or an absolute CDN URL (env
    /// `POPCON_PUBLIC_BASE`).
    pub public_base: String,
    /// The secret signed URLs are signed with (env `POPCON_URL_SECRET`, at least 16 bytes).
    /// `None`: a random one per process, so URLs die with the process and are refused by
    /// other API processes.
    pub url_secret: Option<String>,
}

impl std::fmt::Debug for BlobsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobsConfig")
            .field("root", &self.root)
            .field("public_base", &self.public_base)
            .field("url_secret", &self.url_secret.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Default for BlobsConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("results"),
            public_base: DEFAULT_PUBLIC_BASE.into(),
            url_secret: None,
        }
    }
}

impl BlobsConfig {
    /// The default settings with the local root at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
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
    public_base: String,
    signer: UrlSigner,
}

/// Why a signed URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("this URL needs a signature (`exp` and `sig` query parameters)")]
    Missing,
    #[error("the signed URL expired")]
    Expired,
    #[error("the URL's signature is not valid")]
    Invalid,
}

/// HMAC-SHA256 signatures over `{key}\n{expiry}`: a URL grants access to one object until one
/// instant, and cannot be altered to name another object or a later expiry.
#[derive(Clone)]
pub struct UrlSigner {
    secret: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(***)")
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

impl UrlSigner {
    /// The shortest secret accepted.
    pub const MIN_SECRET: usize = 16;

    pub fn new(secret: &[u8]) -> Result<UrlSigner, BlobError> {
        if secret.len() < Self::MIN_SECRET {
            return Err(BlobError::Config(format!(
                "the URL signing secret must be at least {} bytes",
                Self::MIN_SECRET
            )));
        }
        Ok(UrlSigner {
            secret: secret.into(),
        })
    }

    /// A random secret, for a single process.
    pub fn random() -> UrlSigner {
        let bytes: [u8; 32] = rand::random();
        UrlSigner {
            secret: bytes.as_slice().into(),
        }
    }

    fn mac(&self, key: &str, expires: i64) -> HmacSha256 {
        use hmac::{KeyInit, Mac};
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The hex signature of `key` until `expires` (Unix seconds).
    pub fn sign(&self, key: &str, expires: i64) -> String {
        use hmac::Mac;
        hex::encode(self.mac(key, expires).finalize().into_bytes())
    }

    /// Checks `sig` for `key` and `expires` at `now` (Unix seconds), in constant time.
    pub fn verify(
        &self,
        key: &str,
        expires: Option<i64>,
        sig: Option<&str>,
        now: i64,
    ) -> Result<(), SignatureError> {
        use hmac::Mac;
        let (Some(expires), Some(sig)) = (expires, sig) else {
            return Err(SignatureError::Missing);
        };
        let sig = hex::decode(sig).map_err(|_| SignatureError::Invalid)?;
        self.mac(key, expires)
            .verify_slice(&sig)
            .map_err(|_| SignatureError::Invalid)?;
        if expires < now {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

/// Whether `key` is a thumbnail (`jobs/{job}/thumb/{file}`): the only objects served without a
/// signature (see the module header).
pub fn is_public_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    matches!(parts.as_slice(), ["jobs", job, "thumb", file] if !job.is_empty() && !file.is_empty())
        && check_key(key).is_ok()
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
        let signer = match &cfg.url_secret {
            Some(secret) => UrlSigner::new(secret.as_bytes())?,
            None => UrlSigner::random(),
        };
        let public_base = cfg.public_base.trim_end_matches('/').to_string();
        Ok(Blobs::Local(LocalDir {
            root,
            public_base,
            signer,
        }))
    }

    /// The signer of this store's URLs.
    pub fn signer(&self) -> &UrlSigner {
        match self {
            Blobs::Local(dir) => &dir.signer,
        }
    }

    /// `{public_base}/{key}`: where a thumbnail is read without a signature.
    pub fn public_url(&self, key: &str) -> Result<String, BlobError> {
        check_key(key)?;
        match self {
            Blobs::Local(dir) => Ok(format!("{}/{key}", dir.public_base)),
        }
    }

    /// `{public_base}/{key}?exp=…&sig=…`, valid for `ttl` from now.
    pub fn signed_url(&self, key: &str, ttl: std::time::Duration) -> Result<String, BlobError> {
        check_key(key)?;
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let expires = chrono::Utc::now().timestamp().saturating_add(ttl);
        match self {
            Blobs::Local(dir) => Ok(format!(
                "{}/{key}?exp={expires}&sig={}",
                dir.public_base,
                dir.signer.sign(key, expires)
            )),
        }
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
        let blobs = Blobs::open(&BlobsConfig::at(dir.path().join("r"))).unwrap();
        let key = keys::emoji("j1", 3, 2);
        assert_eq!(key, "jobs/j1/emoji/3-2.png");
        blobs.put(&key, b"png".to_vec()).await.unwrap();
        blobs.put(&key, b"png2".to_vec()).await.unwrap();
        assert_eq!(blobs.get(&key).await.unwrap(), b"png2");
        let url = blobs.url_for(&key).unwrap();
        assert!(url.starts_with("file:///") && url.ends_with("jobs/j1/emoji/3-2.png"));
        assert_eq!(
            blobs.public_url(&key).unwrap(),
            "/files/jobs/j1/emoji/3-2.png"
        );
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

    #[test]
    fn signed_urls_bind_key_and_expiry() {
        let s = UrlSigner::new(b"0123456789abcdef").unwrap();
        let sig = s.sign("jobs/a/emoji/0-1.png", 1000);
        assert!(
            s.verify("jobs/a/emoji/0-1.png", Some(1000), Some(&sig), 999)
                .is_ok()
        );
        assert_eq!(
            s.verify("jobs/a/emoji/0-1.png", Some(1000), Some(&sig), 1001),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            s.verify("jobs/a/emoji/1-1.png", Some(1000), Some(&sig), 999),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            s.verify("jobs/a/emoji/0-1.png", Some(2000), Some(&sig), 999),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            s.verify("jobs/a/emoji/0-1.png", None, Some(&sig), 999),
            Err(SignatureError::Missing)
        );
        let other = UrlSigner::new(b"fedcba9876543210").unwrap();
        assert_eq!(
            other.verify("jobs/a/emoji/0-1.png", Some(1000), Some(&sig), 999),
            Err(SignatureError::Invalid)
        );
        assert!(UrlSigner::new(b"short").is_err());
        assert!(is_public_key("jobs/a/thumb/0-1.png"));
        assert!(!is_public_key("jobs/a/emoji/0-1.png"));
        assert!(!is_public_key("jobs/a/thumb/../emoji/0-1.png"));
    }
}
