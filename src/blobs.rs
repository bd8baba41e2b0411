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
//! Two backends ([`Blobs`] is an enum: a closed set, `async fn` without boxing):
//! - [`Blobs::Local`]: a directory (the default, `POPCON_RESULTS`, `./results`); signed URLs
//!   are the API's own (`/files/{key}?exp&sig`, checked by [`UrlSigner`]).
//! - [`Blobs::S3`]: an S3-compatible bucket through the `object_store` crate — AWS S3,
//!   Cloudflare R2, MinIO ([`S3Config`], `POPCON_S3_URL=s3://bucket/prefix`, credentials from
//!   the standard `AWS_*` variables). Signed URLs are the store's presigned GET URLs (SigV4),
//!   handed straight to the client; public thumbnail paths go through the API's `/files`
//!   (which reads the bucket) or a CDN in front of it (`public_base`).

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
    /// The object store failed (network, throttling, credentials).
    #[error("object store: {0}")]
    Store(#[source] object_store::Error),
    /// The operation needs the other backend (a local path of an S3 object).
    #[error("{0}")]
    Unsupported(&'static str),
}

impl From<object_store::Error> for BlobError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { path, .. } => BlobError::NotFound(path),
            other => BlobError::Store(other),
        }
    }
}

impl BlobError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BlobError::Io { .. } => true,
            // Network trouble and throttling pass; a refused credential or a bad
            // configuration does not.
            BlobError::Store(e) => !matches!(
                e,
                object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::NotImplemented
                    | object_store::Error::UnknownConfigurationKey { .. }
            ),
            _ => false,
        }
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
    /// Store in an S3-compatible bucket instead of `root`.
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket. Unset fields come from the standard environment variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, …), as the
/// AWS tools read them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    /// `s3://bucket[/prefix]` (env `POPCON_S3_URL`).
    pub url: String,
    /// e.g. `https://<account>.r2.cloudflarestorage.com` for R2, `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow a plain-HTTP endpoint (local test servers).
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl S3Config {
    /// Splits `s3://bucket[/prefix]`.
    fn bucket_and_prefix(&self) -> Result<(String, String), BlobError> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            BlobError::Config(format!("`{}`: expected s3://bucket[/prefix]", self.url))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(BlobError::Config(format!("`{}`: no bucket name", self.url)));
        }
        let prefix = prefix.trim_matches('/');
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        Ok((bucket.to_string(), prefix.to_string()))
    }
}

impl std::fmt::Debug for BlobsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobsConfig")
            .field("root", &self.root)
            .field("public_base", &self.public_base)
            .field("url_secret", &self.url_secret.as_ref().map(|_| "***"))
            .field("s3", &self.s3)
            .finish()
    }
}

impl Default for BlobsConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("results"),
            public_base: DEFAULT_PUBLIC_BASE.into(),
            url_secret: None,
            s3: None,
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
    /// An S3-compatible bucket.
    S3(S3Bucket),
}

/// The S3 backend: keys live under `prefix/` in the bucket.
#[derive(Debug, Clone)]
pub struct S3Bucket {
    store: std::sync::Arc<object_store::aws::AmazonS3>,
    bucket: String,
    prefix: String,
    public_base: String,
    signer: UrlSigner,
}

impl S3Bucket {
    fn path_of(&self, key: &str) -> Result<object_store::path::Path, BlobError> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            object_store::path::Path::from(key)
        } else {
            object_store::path::Path::from(format!("{}/{key}", self.prefix))
        })
    }
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
        let signer = match &cfg.url_secret {
            Some(secret) => UrlSigner::new(secret.as_bytes())?,
            None => UrlSigner::random(),
        };
        let public_base = cfg.public_base.trim_end_matches('/').to_string();
        if let Some(s3) = &cfg.s3 {
            let (bucket, prefix) = s3.bucket_and_prefix()?;
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            if s3.allow_http {
                b = b.with_allow_http(true);
            }
            let store = b.build().map_err(|e| BlobError::Config(e.to_string()))?;
            return Ok(Blobs::S3(S3Bucket {
                store: std::sync::Arc::new(store),
                bucket,
                prefix,
                public_base,
                signer,
            }));
        }
        std::fs::create_dir_all(&cfg.root).map_err(|source| BlobError::Io {
            path: cfg.root.clone(),
            source,
        })?;
        // Absolute, so `file://` URLs stay valid whatever the reader's working directory is.
        let root = std::fs::canonicalize(&cfg.root).map_err(|source| BlobError::Io {
            path: cfg.root.clone(),
            source,
        })?;
        Ok(Blobs::Local(LocalDir {
            root,
            public_base,
            signer,
        }))
    }

    /// The signer of the API's own URLs (`/files/{key}?exp&sig`).
    pub fn signer(&self) -> &UrlSigner {
        match self {
            Blobs::Local(dir) => &dir.signer,
            Blobs::S3(b) => &b.signer,
        }
    }

    fn public_base(&self) -> &str {
        match self {
            Blobs::Local(dir) => &dir.public_base,
            Blobs::S3(b) => &b.public_base,
        }
    }

    /// `{public_base}/{key}`: where a thumbnail is read without a signature.
    pub fn public_url(&self, key: &str) -> Result<String, BlobError> {
        check_key(key)?;
        Ok(format!("{}/{key}", self.public_base()))
    }

    /// A URL that reads `key` for `ttl` from now: `{public_base}/{key}?exp=…&sig=…` (served by
    /// the API) for a local folder, the store's presigned GET URL for S3.
    pub async fn signed_url(
        &self,
        key: &str,
        ttl: std::time::Duration,
    ) -> Result<String, BlobError> {
        match self {
            Blobs::Local(dir) => {
                check_key(key)?;
                let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
                let expires = chrono::Utc::now().timestamp().saturating_add(secs);
                Ok(format!(
                    "{}/{key}?exp={expires}&sig={}",
                    dir.public_base,
                    dir.signer.sign(key, expires)
                ))
            }
            Blobs::S3(b) => {
                use object_store::signer::Signer;
                let url = b
                    .store
                    .signed_url(axum::http::Method::GET, &b.path_of(key)?, ttl)
                    .await?;
                Ok(url.to_string())
            }
        }
    }

    /// Whether an object exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        match self {
            Blobs::Local(dir) => Ok(tokio::fs::metadata(dir.path_of(key)?)
                .await
                .is_ok_and(|m| m.is_file())),
            Blobs::S3(b) => {
                use object_store::ObjectStore;
                match b.store.head(&b.path_of(key)?).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
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
            Blobs::S3(b) => {
                use object_store::ObjectStore;
                // A single PUT: S3 makes it visible whole or not at all. The content type is
                // stored with it, so presigned URLs serve the image as an image.
                let mut attributes = object_store::Attributes::new();
                attributes.insert(
                    object_store::Attribute::ContentType,
                    content_type(key).into(),
                );
                b.store
                    .put_opts(
                        &b.path_of(key)?,
                        object_store::PutPayload::from(bytes),
                        attributes.into(),
                    )
                    .await?;
                Ok(())
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
            Blobs::S3(b) => {
                use object_store::ObjectStore;
                let r = b.store.get(&b.path_of(key)?).await.map_err(|e| match e {
                    object_store::Error::NotFound { .. } => BlobError::NotFound(key.to_string()),
                    other => other.into(),
                })?;
                Ok(r.bytes().await?.to_vec())
            }
        }
    }

    /// Where `key` is stored: a `file://` URL, or `s3://bucket/path`.
    pub fn url_for(&self, key: &str) -> Result<String, BlobError> {
        match self {
            Blobs::Local(dir) => Ok(format!("file://{}", dir.path_of(key)?.display())),
            Blobs::S3(b) => Ok(format!("s3://{}/{}", b.bucket, b.path_of(key)?)),
        }
    }

    /// The local path of `key` (local backend only; tests and the operator CLI).
    pub fn local_path(&self, key: &str) -> Result<PathBuf, BlobError> {
        match self {
            Blobs::Local(dir) => dir.path_of(key),
            Blobs::S3(_) => Err(BlobError::Unsupported("objects in S3 have no local path")),
        }
    }
}

impl LocalDir {
    fn path_of(&self, key: &str) -> Result<PathBuf, BlobError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

/// The media type of an object, from its key's extension.
pub fn content_type(key: &str) -> &'static str {
    match key
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
    {
        Some(ext) if ext == "png" => "image/png",
        Some(ext) if ext == "jpg" || ext == "jpeg" => "image/jpeg",
        Some(ext) if ext == "webp" => "image/webp",
        Some(ext) if ext == "zip" => "application/zip",
        _ => "application/octet-stream",
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

    /// The animated WebP of emoji `idx` approved under `fence` (the row's `animation_key`).
    pub fn animation(job_id: &str, idx: u32, fence: u64) -> String {
        format!("jobs/{job_id}/anim/{idx}-{fence}.webp")
    }

    /// The APNG written beside an animation: its key with `.png` for `.webp`.
    pub fn animation_apng(animation_key: &str) -> Option<String> {
        animation_key
            .strip_suffix(".webp")
            .map(|stem| format!("{stem}.png"))
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
