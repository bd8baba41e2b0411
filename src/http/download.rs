//! `GET /api/job/{id}/download`: a zip of the job's finished images, streamed.
//!
//! A set has up to 64 full-size PNGs; buffering the archive would hold all of them in memory
//! per download. Instead a blocking thread writes the zip (the `zip` crate's streaming
//! writer: local headers with data descriptors, no seeking) into a [`ChannelWriter`], which
//! hands 64 KiB chunks to the response body through a bounded channel. A slow client makes
//! the channel full and the writer wait, so memory per download is a few chunks plus one
//! image at most (a local file is copied through a small buffer; an S3 object is fetched
//! whole, one at a time), whatever the set's size. Entries are stored, not deflated: PNGs are
//! compressed already.
//!
//! Every object is checked before the first byte goes out: once the status line is sent, a
//! missing one could only end the stream early, which a client sees as a corrupt archive.

use std::fs::File;
use std::io::{self, Write};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use zip::write::SimpleFileOptions;

use super::ApiError;
use crate::blobs::Blobs;
use crate::job::EmojiStatus;
use crate::store::JobRecord;

/// Bytes handed to the body per message.
const CHUNK: usize = 64 * 1024;
/// Messages in flight between the writer thread and the response.
const DEPTH: usize = 4;

/// A `Write` that sends its bytes, in chunks, to an async receiver. Blocks (on its own thread)
/// while the receiver is full; fails with `BrokenPipe` once the receiver is gone (the client
/// hung up), which stops the zip writer.
pub struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    pub fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// The entry name of emoji `idx`: `{idx:02}-{label}.png`, the label reduced to a safe slug.
fn entry_name(idx: u32, label: &str) -> String {
    let slug: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug.trim_matches('-');
    let slug = if slug.is_empty() { "emoji" } else { slug };
    format!("{idx:02}-{slug}.png")
}

/// The archive's entries: `(entry name, blob key)` of every done or approved emoji.
async fn entries(blobs: &Blobs, job: &JobRecord) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for e in &job.emoji {
        if !matches!(e.status, EmojiStatus::Done | EmojiStatus::Approved) {
            continue;
        }
        let Some(key) = e.image_key.as_deref() else {
            continue;
        };
        if !blobs.exists(key).await? {
            return Err(ApiError::Internal(format!(
                "emoji {} of job {} is done but its image {key} is missing",
                e.idx, job.id
            )));
        }
        out.push((entry_name(e.idx, &e.label), key.to_string()));
        // An approved emoji's animation, in both formats, when they were written.
        if let Some(anim) = e.animation_key.as_deref() {
            let stem = entry_name(e.idx, &e.label);
            let stem = stem.trim_end_matches(".png");
            if !blobs.exists(anim).await? {
                return Err(ApiError::Internal(format!(
                    "emoji {} of job {} is animated but its animation {anim} is missing",
                    e.idx, job.id
                )));
            }
            out.push((format!("{stem}.webp"), anim.to_string()));
            // The APNG is the fallback copy; a row animated before it was written has none.
            if let Some(apng) = crate::blobs::keys::animation_apng(anim)
                && blobs.exists(&apng).await?
            {
                out.push((format!("{stem}.apng"), apng));
            }
        }
    }
    Ok(out)
}

/// Writes the archive of `entries` (`(name, key)`) into `out`, reading each object through
/// `open` (on a blocking thread).
pub fn write_zip<W: Write>(
    entries: &[(String, String)],
    mut open: impl FnMut(&str) -> io::Result<Box<dyn io::Read>>,
    out: W,
) -> zip::result::ZipResult<W> {
    let mut zip = zip::ZipWriter::new_stream(out);
    let options = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o644);
    for (name, key) in entries {
        zip.start_file(name.as_str(), options)?;
        let mut src = open(key)?;
        io::copy(&mut src, &mut zip)?;
    }
    let mut stream = zip.finish()?;
    stream.flush()?;
    Ok(stream.into_inner())
}

/// Opens one object for the writer thread.
fn opener(blobs: Blobs) -> impl FnMut(&str) -> io::Result<Box<dyn io::Read>> {
    let handle = tokio::runtime::Handle::current();
    move |key: &str| -> io::Result<Box<dyn io::Read>> {
        match &blobs {
            Blobs::Local(_) => {
                let path = blobs.local_path(key).map_err(io::Error::other)?;
                Ok(Box::new(File::open(path)?))
            }
            Blobs::S3(_) => {
                let bytes = handle.block_on(blobs.get(key)).map_err(io::Error::other)?;
                Ok(Box::new(io::Cursor::new(bytes)))
            }
        }
    }
}

/// The streamed response for `job`'s download.
pub async fn zip_response(blobs: &Blobs, job: &JobRecord) -> Result<Response, ApiError> {
    let files = entries(blobs, job).await?;
    if files.is_empty() {
        return Err(ApiError::Conflict(format!(
            "job `{}` has no finished images yet",
            job.id
        )));
    }
    let (tx, mut rx) = mpsc::channel::<io::Result<Bytes>>(DEPTH);
    let job_id = job.id.clone();
    let open = opener(blobs.clone());
    tokio::task::spawn_blocking(move || {
        let err_tx = tx.clone();
        let result = write_zip(&files, open, ChannelWriter::new(tx)).and_then(|mut w| {
            w.flush()?;
            Ok(())
        });
        if let Err(e) = result {
            tracing::warn!(job_id, error = %e, "zip download stopped");
            // Ends the body with an error, so the client sees a failed transfer rather than a
            // short archive that looks complete. Ignored if the client is already gone.
            let _ = err_tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let disposition = format!("attachment; filename=\"popcon-{}.zip\"", job.id);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/zip"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_safe_slugs() {
        assert_eq!(entry_name(3, "Happy!"), "03-happy.png");
        assert_eq!(entry_name(12, "../../etc"), "12-etc.png");
        assert_eq!(entry_name(0, "???"), "00-emoji.png");
    }

    #[test]
    fn the_archive_round_trips() {
        let files: Vec<(String, String)> = (0..3u8)
            .map(|i| (entry_name(u32::from(i), "x"), i.to_string()))
            .collect();
        let open = |key: &str| -> io::Result<Box<dyn io::Read>> {
            let i: u8 = key.parse().map_err(io::Error::other)?;
            Ok(Box::new(io::Cursor::new(vec![i; 100_000 + usize::from(i)])))
        };
        let bytes = write_zip(&files, open, Vec::new()).unwrap();
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(archive.len(), 3);
        for i in 0..3u8 {
            let mut f = archive.by_name(&entry_name(u32::from(i), "x")).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut f, &mut data).unwrap();
            assert_eq!(data, vec![i; 100_000 + usize::from(i)]);
        }
    }
}
