//! A set's pipeline as data: which engine request makes a set's pose and which makes a batch of
//! its emoji (prompts, seeds, the pose as the img2img start, the background key), and what a
//! finished emoji becomes (its PNG and thumbnail). No I/O: the worker reads the rows, runs
//! these requests on the engine under its lease, and writes the results under the fence.
//!
//! Seeds are derived, never drawn, so a redelivered message makes the same picture: the pose
//! from the set's seed, an emoji from the set's seed and its index, and a regenerated emoji
//! also from its fence (a new picture per click, the same one per redelivery).

use image::{RgbImage, RgbaImage};

use super::post::{self, ImageError};
use super::prompt::{self, PromptError};
use crate::action::SeedRule;
use crate::engine::preset::ModelPreset;
use crate::engine::{GenerateRequest, InitImage};
use crate::kernels::AlphaKey;

/// Seed of emoji `idx` for `generate_set` and `retry`.
pub fn emoji_seed(job_seed: u64, idx: u32) -> u64 {
    job_seed.wrapping_add(u64::from(idx))
}

/// Seed of emoji `idx` regenerated under `fence`: new per fence, the same for redeliveries.
pub fn regenerate_seed(job_seed: u64, idx: u32, fence: u64) -> u64 {
    mix(emoji_seed(job_seed, idx) ^ mix(fence.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

/// Seed of a set's pose image.
pub fn pose_seed(job_seed: u64) -> u64 {
    mix(job_seed ^ 0x706F_7365) // "pose"
}

/// splitmix64's finalizer: a bijection that spreads nearby inputs far apart.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of emoji `idx` under `rule`.
pub fn seed_for(rule: SeedRule, job_seed: u64, idx: u32, fence: u64) -> u64 {
    match rule {
        SeedRule::PerFence => regenerate_seed(job_seed, idx, fence),
        SeedRule::Row | SeedRule::None => emoji_seed(job_seed, idx),
    }
}

/// What the worker's settings change in a request: the preset's step count and img2img
/// strength, when set.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub steps: Option<usize>,
    pub strength: Option<f64>,
}

/// The set being made: what its rows and job record say.
#[derive(Debug, Clone, Copy)]
pub struct SetSpec<'a> {
    pub subject: &'a str,
    pub style: Option<&'a str>,
    pub seed: u64,
}

/// The request for a set's pose: the head-to-toe prompt, txt2img, or img2img from the
/// reference photo at the preset's strength when there is one.
pub fn pose_request(
    preset: &ModelPreset,
    set: SetSpec<'_>,
    reference: Option<RgbImage>,
    over: Overrides,
) -> Result<GenerateRequest, PromptError> {
    let mut req = GenerateRequest::new(
        preset,
        vec![prompt::pose_prompt(set.subject)?],
        pose_seed(set.seed),
    );
    if let Some(steps) = over.steps {
        req.steps = steps;
    }
    req.init = reference.map(|image| InitImage {
        image,
        strength: preset.defaults.strength,
    });
    Ok(req)
}

/// A batch of emoji of one set, as one engine call.
#[derive(Debug)]
pub struct EmojiBatch {
    pub request: GenerateRequest,
    /// The seed of each image, in the order of the request's prompts.
    pub seeds: Vec<u64>,
}

/// The request for emoji `rows` (index, label) of a set under `fence`: img2img from the pose,
/// the sticker prompts and negative prompt, seeds by `rule`, and the background key.
pub fn emoji_request(
    preset: &ModelPreset,
    set: SetSpec<'_>,
    rows: &[(u32, &str)],
    fence: u64,
    rule: SeedRule,
    pose: RgbImage,
    over: Overrides,
) -> Result<EmojiBatch, PromptError> {
    let mut prompts = Vec::with_capacity(rows.len());
    let mut seeds = Vec::with_capacity(rows.len());
    for &(idx, label) in rows {
        prompts.push(prompt::emoji_prompt(set.subject, label, set.style.unwrap_or(""))?.prompt);
        seeds.push(seed_for(rule, set.seed, idx, fence));
    }
    let mut request = GenerateRequest::new(preset, prompts, 0);
    request.seeds = seeds.clone();
    request.negative_prompt = prompt::EMOJI_NEGATIVE.to_string();
    if let Some(steps) = over.steps {
        request.steps = steps;
    }
    request.init = Some(InitImage {
        image: pose,
        strength: over.strength.unwrap_or(preset.defaults.strength),
    });
    request.alpha_key = AlphaKey::default();
    Ok(EmojiBatch { request, seeds })
}

/// A finished emoji's files.
#[derive(Debug)]
pub struct EmojiFiles {
    pub image_png: Vec<u8>,
    pub thumbnail_png: Vec<u8>,
}

/// An emoji as it is stored: enclosed background pixels the key took restored, then the PNG
/// and the archive thumbnail.
pub fn emoji_files(mut img: RgbaImage) -> Result<EmojiFiles, ImageError> {
    post::restore_enclosed(&mut img);
    let thumbnail = post::thumbnail(&img, post::THUMBNAIL_SIZE);
    Ok(EmojiFiles {
        image_png: post::encode_png(&img)?,
        thumbnail_png: post::encode_png(&thumbnail)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_follow_the_documented_derivation() {
        assert_eq!(emoji_seed(42, 0), 42);
        assert_eq!(emoji_seed(42, 3), 45);
        assert_eq!(emoji_seed(u64::MAX, 1), 0, "wraps, never panics");
        // A regenerate differs from the original and from every other fence, but is stable
        // for redeliveries of the same message.
        let r2 = regenerate_seed(42, 1, 2);
        assert_eq!(r2, regenerate_seed(42, 1, 2));
        assert_ne!(r2, emoji_seed(42, 1));
        assert_ne!(r2, regenerate_seed(42, 1, 3));
        assert_ne!(r2, regenerate_seed(42, 2, 2));
        assert_ne!(pose_seed(42), emoji_seed(42, 0));
        assert_eq!(seed_for(SeedRule::Row, 42, 3, 9), 45);
        assert_eq!(seed_for(SeedRule::PerFence, 42, 1, 2), r2);
    }

    fn tiny() -> ModelPreset {
        let reg = crate::engine::preset::PresetRegistry::load(
            &crate::engine::preset::PresetRegistry::default_models_dir(),
        )
        .expect("presets");
        reg.get("tiny").expect("the tiny preset").clone()
    }

    #[test]
    fn an_emoji_batch_is_img2img_from_the_pose_with_one_seed_per_row() {
        let preset = tiny();
        let set = SetSpec {
            subject: "a red fox",
            style: Some("flat"),
            seed: 42,
        };
        let pose = RgbImage::new(8, 8);
        let rows = [(1, "happy"), (3, "sad")];
        let over = Overrides {
            steps: Some(3),
            strength: None,
        };
        let b = emoji_request(&preset, set, &rows, 2, SeedRule::PerFence, pose, over).unwrap();
        assert_eq!(
            b.seeds,
            [regenerate_seed(42, 1, 2), regenerate_seed(42, 3, 2)]
        );
        assert_eq!(b.request.seeds, b.seeds);
        assert_eq!(b.request.prompts.len(), 2);
        assert!(
            b.request.prompts[1].contains("sad"),
            "{:?}",
            b.request.prompts
        );
        assert_eq!(b.request.steps, 3);
        assert_eq!(b.request.negative_prompt, prompt::EMOJI_NEGATIVE);
        let init = b.request.init.as_ref().expect("img2img from the pose");
        assert_eq!(init.strength, preset.defaults.strength);

        let p = pose_request(&preset, set, None, Overrides::default()).unwrap();
        assert_eq!(p.seeds, [pose_seed(42)]);
        assert!(p.init.is_none(), "txt2img without a reference");
        assert_eq!(p.steps, preset.defaults.steps);
        assert!(
            emoji_request(
                &preset,
                SetSpec {
                    subject: " ",
                    ..set
                },
                &rows,
                1,
                SeedRule::Row,
                RgbImage::new(8, 8),
                over
            )
            .is_err()
        );
    }
}
