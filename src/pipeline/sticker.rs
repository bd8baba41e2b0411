//! Approve's pipeline as data: which engine request animates a batch of approved emoji, and
//! what a clip becomes (its loop-blended animated WebP and APNG). No I/O: the worker reads the
//! stills, runs the request on the animation engine under its lease, and writes the files and
//! the approval under each row's fence.
//!
//! The still goes in as the emoji was stored, composited over white (the sticker prompt's
//! "plain white background", which the background key had made transparent), and comes out
//! keyed the same way, so every frame is a sticker like the still. A clip's seed is the
//! action's seed rule on the row's fence: a new clip per approval, the same one per redelivery.

use image::{Rgb, RgbImage, RgbaImage};

use super::animation::{AnimationError, Clip};
use super::prompt::{self, PromptError};
use super::set::{SetSpec, seed_for};
use crate::action::SeedRule;
use crate::engine::animate::AnimateRequest;
use crate::engine::motion_preset::AnimationPreset;
use crate::kernels::AlphaKey;

/// One approved emoji to animate.
#[derive(Debug, Clone)]
pub struct StickerRow<'a> {
    pub idx: u32,
    pub label: &'a str,
    /// The row's fence: the clip's seed and the fenced write use it.
    pub fence: u64,
    pub still: &'a RgbaImage,
}

/// A batch of clips as one engine call.
#[derive(Debug)]
pub struct StickerBatch {
    pub request: AnimateRequest,
    pub seeds: Vec<u64>,
}

/// The request that animates `rows` of a set with `preset`'s clip settings.
pub fn animate_request(
    preset: &AnimationPreset,
    set: SetSpec<'_>,
    rows: &[StickerRow<'_>],
    rule: SeedRule,
) -> Result<StickerBatch, PromptError> {
    let d = &preset.defaults;
    let mut prompts = Vec::with_capacity(rows.len());
    let mut seeds = Vec::with_capacity(rows.len());
    let mut stills = Vec::with_capacity(rows.len());
    for row in rows {
        let p = prompt::emoji_prompt(set.subject, row.label, set.style.unwrap_or(""))?;
        prompts.push(p.prompt);
        seeds.push(seed_for(rule, set.seed, row.idx, row.fence));
        stills.push(over_white(row.still));
    }
    Ok(StickerBatch {
        request: AnimateRequest {
            prompts,
            negative_prompt: prompt::EMOJI_NEGATIVE.to_string(),
            seeds: seeds.clone(),
            stills,
            frames: d.frames,
            steps: d.steps,
            guidance: d.guidance,
            strength: d.strength,
            width: d.width,
            height: d.height,
            scheduler: None,
            timestep_spacing: None,
            alpha_key: AlphaKey::default(),
        },
        seeds,
    })
}

/// An RGBA still flattened onto white.
pub fn over_white(img: &RgbaImage) -> RgbImage {
    let mut out = RgbImage::new(img.width(), img.height());
    for (o, p) in out.pixels_mut().zip(img.pixels()) {
        let a = u32::from(p[3]);
        let mix = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        *o = Rgb([mix(p[0]), mix(p[1]), mix(p[2])]);
    }
    out
}

/// A finished clip's files.
#[derive(Debug)]
pub struct StickerFiles {
    pub webp: Vec<u8>,
    pub apng: Vec<u8>,
}

/// A clip's frames as stored: the loop seam blended over `blend` frames, then animated WebP
/// and APNG at `fps`.
pub fn sticker_files(
    frames: Vec<RgbaImage>,
    fps: u32,
    blend: usize,
) -> Result<StickerFiles, AnimationError> {
    let mut clip = Clip::new(frames, fps)?;
    clip.blend_loop(blend)?;
    Ok(StickerFiles {
        webp: clip.to_webp()?,
        apng: clip.to_apng()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::motion_preset::AnimationRegistry;
    use crate::engine::preset::PresetRegistry;

    #[test]
    fn a_batch_has_one_clip_per_row_with_the_presets_settings_and_fenced_seeds() {
        let reg = AnimationRegistry::load(&PresetRegistry::default_models_dir()).unwrap();
        let preset = reg.get("tiny-motion").unwrap();
        let still = RgbaImage::from_pixel(8, 8, image::Rgba([10, 20, 30, 0]));
        let rows = [
            StickerRow {
                idx: 0,
                label: "happy",
                fence: 3,
                still: &still,
            },
            StickerRow {
                idx: 2,
                label: "sad",
                fence: 5,
                still: &still,
            },
        ];
        let set = SetSpec {
            subject: "a fox",
            style: None,
            seed: 7,
        };
        let b = animate_request(preset, set, &rows, SeedRule::PerFence).unwrap();
        assert_eq!(b.request.prompts.len(), 2);
        assert!(b.request.prompts[1].contains("sad"));
        assert_eq!(b.request.frames, preset.defaults.frames);
        assert_eq!(b.request.steps, preset.defaults.steps);
        assert_eq!(
            b.seeds,
            [
                seed_for(SeedRule::PerFence, 7, 0, 3),
                seed_for(SeedRule::PerFence, 7, 2, 5)
            ]
        );
        assert_ne!(
            b.seeds[0],
            seed_for(SeedRule::PerFence, 7, 0, 4),
            "new clip per fence"
        );
        // Transparent pixels become white, not their hidden colour.
        assert!(b.request.stills[0].pixels().all(|p| p.0 == [255, 255, 255]));
        let blank = SetSpec {
            subject: " ",
            ..set
        };
        assert!(animate_request(preset, blank, &rows, SeedRule::PerFence).is_err());
    }

    #[test]
    fn over_white_keeps_opaque_pixels_and_mixes_partial_alpha() {
        let mut img = RgbaImage::new(3, 1);
        img.put_pixel(0, 0, image::Rgba([200, 100, 0, 255]));
        img.put_pixel(1, 0, image::Rgba([0, 0, 0, 128]));
        img.put_pixel(2, 0, image::Rgba([0, 0, 0, 0]));
        let out = over_white(&img);
        assert_eq!(out.get_pixel(0, 0).0, [200, 100, 0]);
        assert_eq!(out.get_pixel(1, 0).0, [127, 127, 127]);
        assert_eq!(out.get_pixel(2, 0).0, [255, 255, 255]);
    }

    #[test]
    fn sticker_files_are_animated_webp_and_apng() {
        let frames: Vec<RgbaImage> = (0..6)
            .map(|i| RgbaImage::from_pixel(8, 8, image::Rgba([i * 40, 0, 0, 255])))
            .collect();
        let f = sticker_files(frames.clone(), 8, 2).unwrap();
        assert_eq!(&f.webp[..4], b"RIFF");
        assert_eq!(&f.webp[8..12], b"WEBP");
        assert_eq!(&f.apng[1..4], b"PNG");
        assert!(f.apng.windows(4).any(|w| w == b"acTL"), "an animated PNG");
        assert!(
            sticker_files(frames[..3].to_vec(), 8, 2).is_err(),
            "blend longer than the clip allows"
        );
    }
}
