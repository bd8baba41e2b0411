//! Animating a still: diffusers' `AnimateDiffVideoToVideoPipeline` on a video that is one image
//! repeated, with the motion modules of [`super::motion`] inside the engine's UNet.
//!
//! Per clip: the still is encoded once (every frame of diffusers' video is the same image, so
//! the VAE's posterior is the same); each frame samples its own latent from it and is noised to
//! the strength's first timestep; the frames are then denoised jointly — one UNet batch of
//! `clips × frames` rows (twice that with guidance), the motion modules mixing the frames of a
//! clip — and decoded frame by frame, alpha-keyed like the stills.
//!
//! Randomness is the clip's own stream ([`super::noise`]), drawn on the host in a fixed order:
//! the frames' latent-sample noise, then `add_noise`'s, then one draw per ancestral step, each
//! `[frames, c, h, w]`. A clip is therefore the same alone or in a batch, on any device.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::motion::{MotionAdapter, MotionSpec};
use super::motion_preset::AnimationPreset;
use super::noise::{NoiseSource, SeededNoise};
use super::preset::{Architecture, ModelPreset, SchedulerKind};
use super::scheduler::Scheduler;
use super::weights::ModelFiles;
use super::{
    Conditioning, Engine, EngineError, EngineOptions, Flow, Observer, Progress, Stage,
    StageTimings, image_to_tensor, var_builder,
};
use crate::kernels::{self, AlphaKey};

/// Frames decoded by one VAE call: bounds the decoder's activations (diffusers'
/// `decode_chunk_size` does the same); the frames come out the same for any chunk size.
const DECODE_CHUNK: usize = 4;

/// One batch of clips: clip *i* animates `stills[i]` under `prompts[i]` with `seeds[i]`.
#[derive(Debug, Clone)]
pub struct AnimateRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seeds: Vec<u64>,
    pub stills: Vec<image::RgbImage>,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f64,
    /// How far from the still the clip may move, in (0, 1].
    pub strength: f64,
    pub width: usize,
    pub height: usize,
    /// Overrides the preset's scheduler.
    pub scheduler: Option<SchedulerKind>,
    pub timestep_spacing: Option<String>,
    pub alpha_key: AlphaKey,
}

/// The clips of one batch.
#[derive(Debug)]
pub struct Animation {
    /// Per clip, its frames in order.
    pub clips: Vec<Vec<image::RgbaImage>>,
    /// Final latents before VAE scaling, `[clips·frames, c, h/8, w/8]`, f32 on the CPU.
    pub latents: Tensor,
    pub timings: StageTimings,
}

impl AnimateRequest {
    /// Rejects what can't run, before any tensor work: `max_frames` is the adapter's limit.
    pub fn validate(&self, max_frames: usize) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        let n = self.prompts.len();
        if n == 0 {
            return bad("at least one clip is needed".into());
        }
        if self.seeds.len() != n || self.stills.len() != n {
            return bad(format!(
                "{n} prompts, {} seeds and {} stills: give one of each per clip",
                self.seeds.len(),
                self.stills.len()
            ));
        }
        if self.frames < 2 || self.frames > max_frames {
            return bad(format!(
                "{} frames: the motion adapter takes 2 to {max_frames} frames per clip",
                self.frames
            ));
        }
        if self.width == 0 || self.height == 0 || self.width % 8 != 0 || self.height % 8 != 0 {
            return bad(format!(
                "size {}x{} must be positive multiples of 8",
                self.width, self.height
            ));
        }
        if self.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if !self.guidance.is_finite() || self.guidance < 0.0 {
            return bad(format!("guidance must be >= 0, got {}", self.guidance));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return bad(format!("strength must be in (0, 1], got {}", self.strength));
        }
        if let Some(s) = self
            .stills
            .iter()
            .find(|s| s.width() == 0 || s.height() == 0)
        {
            return bad(format!("a still of {}x{} pixels", s.width(), s.height()));
        }
        Ok(())
    }
}

impl Engine {
    /// Loads an animation preset: its base model (which must be SD 1.5: the adapters are
    /// trained on SD 1.5's UNet), the scheduler the adapter runs with, and the adapter.
    pub fn load_animation(
        anim: &AnimationPreset,
        base: &ModelPreset,
        base_files: &ModelFiles,
        adapter_files: &ModelFiles,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        if base.architecture != Architecture::Sd15 {
            return Err(EngineError::Preset {
                origin: format!("animation preset {}", anim.name),
                message: format!(
                    "base `{}` is {:?}: AnimateDiff's motion adapters need an SD 1.5 base",
                    base.name, base.architecture
                ),
            });
        }
        let mut engine = Self::load(base, base_files, options)?;
        engine.set_animation_scheduler(anim);
        engine.attach_motion(
            anim.motion_spec(adapter_files)?,
            adapter_files.path(&anim.weights)?,
        )?;
        Ok(engine)
    }

    /// Runs `anim`'s scheduler (algorithm, spacing, betas, clipping) instead of the base's.
    pub fn set_animation_scheduler(&mut self, anim: &AnimationPreset) {
        self.preset.scheduler = anim.scheduler;
        if anim.timestep_spacing.is_some() {
            self.preset.timestep_spacing = anim.timestep_spacing.clone();
        }
        self.override_scheduler(anim.beta_schedule, anim.clip_sample);
    }

    /// Loads a diffusers-format motion adapter (`weights` a `MotionAdapter` state dict) into
    /// this engine, after checking that its modules fit this engine's UNet.
    pub fn attach_motion(
        &mut self,
        spec: MotionSpec,
        weights: &std::path::Path,
    ) -> Result<(), EngineError> {
        self.check_motion_fits(&spec, weights)?;
        let vb = var_builder(weights, self.dtype, &self.device)?;
        let adapter = MotionAdapter::new(vb, spec).map_err(|e| EngineError::Config {
            path: weights.to_path_buf(),
            message: format!("not a motion adapter for this base: {e}"),
        })?;
        self.motion = Some(adapter);
        Ok(())
    }

    /// A motion adapter of `spec`'s shapes with random weights (benchmarks).
    pub fn attach_random_motion(&mut self, spec: MotionSpec) -> Result<(), EngineError> {
        self.check_motion_fits(&spec, std::path::Path::new("(random weights)"))?;
        let vb = super::random_weights::RandomWeights::var_builder(self.dtype, &self.device)
            .pp("motion");
        self.motion = Some(MotionAdapter::new(vb, spec)?);
        Ok(())
    }

    fn check_motion_fits(
        &self,
        spec: &MotionSpec,
        origin: &std::path::Path,
    ) -> Result<(), EngineError> {
        MotionAdapter::check_fits(spec, &self.unet_spec.config).map_err(|message| {
            EngineError::Config {
                path: origin.to_path_buf(),
                message: format!(
                    "motion adapter does not fit {}: {message}",
                    self.preset.name
                ),
            }
        })
    }

    /// The attached adapter's shape (`None`: an image-only engine).
    pub fn motion_spec(&self) -> Option<&MotionSpec> {
        self.motion.as_ref().map(MotionAdapter::spec)
    }

    /// Replaces what the base's scheduler config says with what the adapter was trained or
    /// distilled for (AnimateDiff runs SD 1.5 with `linear` betas, DDIM without clipping).
    pub fn override_scheduler(
        &mut self,
        beta_schedule: Option<super::config::BetaSchedule>,
        clip_sample: Option<bool>,
    ) {
        if let Some(b) = beta_schedule {
            self.scheduler_spec.beta_schedule = b;
        }
        if let Some(c) = clip_sample {
            self.scheduler_spec.clip_sample = Some(c);
        }
    }

    fn adapter(&self) -> Result<&MotionAdapter, EngineError> {
        self.motion.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(format!(
                "model {} has no motion adapter loaded: it cannot animate",
                self.preset.name
            ))
        })
    }

    /// One motion-UNet evaluation on `[clips·frames, c, h, w]` with one context row per frame
    /// (agreement tests, benchmarks).
    pub fn motion_unet_forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        frames: usize,
    ) -> Result<Tensor, EngineError> {
        let out = self.unet.forward_motion(
            &latents.to_dtype(self.dtype)?,
            timestep,
            &context.to_dtype(self.dtype)?,
            self.adapter()?,
            frames,
        )?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// The scheduler an animation runs with.
    pub fn animation_scheduler(&self, req: &AnimateRequest) -> Result<Scheduler, EngineError> {
        Scheduler::new(
            req.scheduler.unwrap_or(self.preset.scheduler),
            &self.scheduler_spec,
            req.timestep_spacing
                .as_deref()
                .or(self.preset.timestep_spacing.as_deref()),
            req.steps,
        )
    }

    /// Animates with the request's seeds.
    pub fn animate(
        &self,
        req: &AnimateRequest,
        observer: &mut dyn Observer,
    ) -> Result<Animation, EngineError> {
        let mut noise = SeededNoise::new(&req.seeds);
        self.animate_with_noise(req, &mut noise, observer)
    }

    /// Animates drawing randomness from `noise` (one stream per clip).
    pub fn animate_with_noise(
        &self,
        req: &AnimateRequest,
        noise: &mut dyn NoiseSource,
        observer: &mut dyn Observer,
    ) -> Result<Animation, EngineError> {
        let adapter = self.adapter()?;
        req.validate(adapter.spec().max_frames)?;
        let (n, frames) = (req.prompts.len(), req.frames);
        let scale = self.vae_scale();
        let (lh, lw) = (req.height / scale, req.width / scale);
        let lc = self.unet_spec.in_channels;
        let frame_len = lc * lh * lw;
        let scheduler = self.animation_scheduler(req)?;
        let total_steps = scheduler.timesteps().len();
        let start = scheduler.img2img_start(req.strength);
        if start >= total_steps {
            return Err(EngineError::InvalidRequest(format!(
                "strength {} with {} steps runs no step; raise either",
                req.strength, req.steps
            )));
        }
        let mut check = |stage, step, total| -> Result<(), EngineError> {
            match observer.on_progress(Progress { stage, step, total }) {
                Flow::Continue => Ok(()),
                Flow::Cancel => Err(EngineError::Cancelled),
            }
        };
        let mut timings = StageTimings::default();
        let guided = req.guidance > 1.0;

        check(Stage::TextEncode, 0, 1)?;
        let t0 = Instant::now();
        let Conditioning { context, .. } =
            self.guided_conditioning(&req.prompts, &req.negative_prompt, guided)?;
        // One context row per frame, clip by clip ([uncond clips; cond clips] with guidance).
        let (rows, tokens, dim) = context.dims3()?;
        let context = context.unsqueeze(1)?.repeat((1, frames, 1, 1))?.reshape((
            rows * frames,
            tokens,
            dim,
        ))?;
        self.device.synchronize()?;
        timings.text_encode = t0.elapsed();

        // Each clip's frames: a latent sampled per frame from the still's posterior, noised.
        check(Stage::VaeEncode, 0, 1)?;
        let t0 = Instant::now();
        let draw = |noise: &mut dyn NoiseSource, i: usize| -> Result<Tensor, EngineError> {
            let v = noise.draw(i, frames * frame_len)?;
            Ok(Tensor::from_vec(v, (frames, lc, lh, lw), &self.device)?)
        };
        let mut clips = Vec::with_capacity(n);
        for (i, still) in req.stills.iter().enumerate() {
            let pixels = image_to_tensor(still, req.width, req.height, &self.device)?;
            let dist = self.vae.encode(&pixels.to_dtype(self.vae_dtype)?)?;
            let mean = dist.mean.to_dtype(DType::F32)?;
            let std = dist.std.to_dtype(DType::F32)?;
            let sample = mean
                .broadcast_add(&draw(noise, i)?.broadcast_mul(&std)?)?
                .affine(self.vae.spec.scaling_factor, 0.0)?;
            clips.push(scheduler.add_noise(&sample, &draw(noise, i)?, start)?);
        }
        let mut latents = Tensor::cat(&clips, 0)?;
        drop(clips);
        self.device.synchronize()?;
        timings.vae_encode = t0.elapsed();

        let t0 = Instant::now();
        let steps = total_steps - start;
        let clip_rows = n * frames;
        for (k, i) in (start..total_steps).enumerate() {
            check(Stage::Denoise, k, steps)?;
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let mut eps = self.unet.forward_motion(
                &input.to_dtype(self.dtype)?,
                scheduler.timesteps()[i],
                &context.to_dtype(self.dtype)?,
                adapter,
                frames,
            )?;
            eps = eps.to_dtype(DType::F32)?;
            if guided {
                let uncond = eps.narrow(0, 0, clip_rows)?;
                let text = eps.narrow(0, clip_rows, clip_rows)?;
                eps = (&uncond + ((text - &uncond)? * req.guidance)?)?;
            }
            let step_noise = if scheduler.needs_step_noise() {
                let per_clip = (0..n)
                    .map(|c| draw(noise, c))
                    .collect::<Result<Vec<_>, _>>()?;
                Some(Tensor::cat(&per_clip, 0)?)
            } else {
                None
            };
            latents = scheduler.step(&eps, i, &latents, step_noise.as_ref())?;
        }
        check(Stage::Denoise, steps, steps)?;
        self.device.synchronize()?;
        timings.denoise = t0.elapsed();

        check(Stage::VaeDecode, 0, 1)?;
        let t0 = Instant::now();
        let z = latents.affine(1.0 / self.vae.spec.scaling_factor, 0.0)?;
        let mut rgba = Vec::with_capacity(clip_rows * req.width * req.height * 4);
        let mut decode_time = std::time::Duration::ZERO;
        for first in (0..clip_rows).step_by(DECODE_CHUNK) {
            let len = DECODE_CHUNK.min(clip_rows - first);
            let t1 = Instant::now();
            let decoded = self
                .vae
                .decode(&z.narrow(0, first, len)?.to_dtype(self.vae_dtype)?)?;
            self.device.synchronize()?;
            decode_time += t1.elapsed();
            rgba.extend(kernels::decoded_to_rgba(&decoded, req.alpha_key)?);
        }
        timings.vae_decode = decode_time;
        timings.postprocess = t0.elapsed().saturating_sub(decode_time);
        let frame = req.width * req.height * 4;
        let mut images = rgba.chunks_exact(frame).map(|c| {
            image::RgbaImage::from_raw(req.width as u32, req.height as u32, c.to_vec())
                .ok_or_else(|| EngineError::InvalidRequest("frame buffer size".into()))
        });
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(
                images
                    .by_ref()
                    .take(frames)
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        Ok(Animation {
            clips: out,
            latents: latents.to_device(&Device::Cpu)?,
            timings,
        })
    }
}
