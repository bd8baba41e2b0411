//! What a worker would write, without one: settle a row `done` with real PNGs (the image and,
//! for emoji 0, the thumbnail columns), or `failed`. Shared by the API and browser tests.

#![allow(dead_code)] // each test binary uses what it needs

use popcon_worker::blobs::{self, Blobs};
use popcon_worker::pipeline::post;
use popcon_worker::store::{EmojiOutcome, Store, Thumbnail};

/// Emoji `idx` under its current fence: started, its `size`² image stored, then `done`;
/// emoji 0 also sets the thumbnail columns (`thumbnail_path` overrides the public URL).
pub async fn finish(
    store: &Store,
    blobs: &Blobs,
    job: &str,
    idx: u32,
    size: u32,
    thumbnail_path: Option<&str>,
) {
    let fence = store.get_job(job).await.unwrap().unwrap().emoji[idx as usize].fence;
    store.start_emoji(job, idx, fence).await.unwrap();
    let img = image::RgbaImage::from_pixel(size, size, image::Rgba([200, 60, 10, 255]));
    let key = blobs::keys::emoji(job, idx, fence);
    blobs
        .put(&key, post::encode_png(&img).unwrap())
        .await
        .unwrap();
    let thumb_key = blobs::keys::thumb(job, idx, fence);
    blobs
        .put(&thumb_key, post::encode_png(&img).unwrap())
        .await
        .unwrap();
    store
        .finish_emoji(&EmojiOutcome {
            job_id: job.into(),
            idx,
            fence,
            image_key: key,
            seed: 1,
            thumbnail: (idx == 0).then(|| Thumbnail {
                path: thumbnail_path
                    .map(str::to_string)
                    .unwrap_or_else(|| blobs.public_url(&thumb_key).unwrap()),
                key: thumb_key.clone(),
            }),
        })
        .await
        .unwrap();
}

/// Emoji `idx` under its current fence: started, then `failed` with `reason`.
pub async fn fail(store: &Store, job: &str, idx: u32, reason: &str) {
    let fence = store.get_job(job).await.unwrap().unwrap().emoji[idx as usize].fence;
    store.start_emoji(job, idx, fence).await.unwrap();
    store.fail_emoji(job, idx, fence, reason).await.unwrap();
}
