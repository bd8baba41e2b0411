//! The diffusion engine: Stable Diffusion txt2img / img2img on candle.
//!
//! [`Engine::load`] builds the text encoder(s), UNet and VAE of a [`preset::ModelPreset`] from
//! its files ([`weights::ModelFiles`]) on one device; [`Engine::generate`] runs a whole batch —
//! one prompt and one seed per image — as one UNet batch, with classifier-free guidance when
//! guidance > 1, per-step progress and cancellation through an [`Observer`], and returns RGBA
//! images. Randomness comes only from a [`noise::NoiseSource`], one stream per image, so a
//! seed gives the same image alone or inside any batch.
//!
//! The engine is synchronous and owns its device: the daemon runs it on a dedicated OS thread
//! and talks to it through channels, so no candle call ever blocks an async runtime.

pub mod animate;
pub mod attention;
pub mod clip;
pub mod config;
pub mod cpu;
pub mod layers;
pub mod motion;
pub mod motion_preset;
pub mod noise;
pub mod preset;
pub mod random_weights;
pub mod resize;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::{self, AlphaKey, KernelError};
use clip::ClipTextEncoder;
use config::{ModelSpecs, SchedulerSpec, UNetSpec};
use noise::{NoiseSource, SeededNoise};
use preset::{Architecture, ModelPreset, SchedulerKind};
use random_weights::RandomWeights;
use scheduler::Scheduler;
use tokenizer::{ClipTokenizer, TokenizerError};
use unet::{AddedCond, UNet};
use vae::Vae;
use weights::ModelFiles;

/// Everything that can go wrong in the engine, each classified retryable or permanent.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model `{name}` (known: {known})")]
    UnknownModel { name: String, known: String },
    #[error("invalid model preset ({origin}): {message}")]
    Preset { origin: String, message: String },
    #[error(
        "model `{model}` is missing {} file(s) from {origin}: {}; {how}",
        missing.len(),
        missing.join(", ")
    )]
    MissingWeights {
        model: String,
        origin: String,
        missing: Vec<String>,
        how: String,
    },
    #[error("downloading {file} from {repo} failed: {message}")]
    Download {
        repo: String,
        file: String,
        message: String,
    },
    #[error("model config {}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("device unavailable: {0}")]
    Device(String),
    #[error("cancelled")]
    Cancelled,
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

impl EngineError {
    /// Whether trying the same work again later can succeed: downloads and device trouble
    /// (out of memory, a driver hiccup) can; bad input, bad configs and missing files can't.
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Download { .. } | EngineError::Device(_) => true,
            EngineError::Candle(e) => {
                let m = e.to_string().to_ascii_lowercase();
                m.contains("out of memory") || m.contains("cuda") || m.contains("driver")
            }
            EngineError::Kernel(k) => k.is_retryable(),
            _ => false,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::UnknownModel { .. } => "unknown_model",
            EngineError::Preset { .. } => "preset",
            EngineError::MissingWeights { .. } => "missing_weights",
            EngineError::Download { .. } => "download",
            EngineError::Config { .. } => "config",
            EngineError::Io { .. } => "io",
            EngineError::Tokenizer(_) => "tokenizer",
            EngineError::InvalidRequest(_) => "invalid_request",
            EngineError::Device(_) => "device",
            EngineError::Cancelled => "cancelled",
            EngineError::Candle(_) => "compute",
            EngineError::Kernel(_) => "kernel",
        }
    }
}

/// Which device the engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl DeviceChoice {
    fn open(self) -> Result<Device, EngineError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(EngineError::InvalidRequest(
                        "this binary was built without CUDA; rebuild with `--features cuda`".into(),
                    ));
                }
                Device::new_cuda(i).map_err(|e| EngineError::Device(format!("cuda:{i}: {e}")))
            }
        }
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    /// Weight and activation dtype; default f32 on CPU, f16 on CUDA.
    pub dtype: Option<DType>,
    /// Tiled VAE decoding of large images.
    pub vae_tiling: VaeTiling,
}

/// When the VAE decodes an image in overlapping, blended tiles (diffusers' `enable_vae_tiling`)
/// rather than whole. Images are always decoded one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Tiles of the VAE's training size (`sample_size`: 768 px for SD 2.x, 1024 for SDXL),
    /// for images larger than that; smaller ones decode whole, as in diffusers.
    #[default]
    Auto,
    /// Tiles of this many pixels (a multiple of the VAE's 8), for images larger than that.
    Pixels(usize),
    /// Whole images, whatever their size.
    Off,
}

impl std::str::FromStr for VaeTiling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            n => match n.parse::<usize>() {
                Ok(px) if px >= 64 && px % 8 == 0 => Ok(Self::Pixels(px)),
                _ => Err(format!(
                    "VAE tiling is `auto`, `off` or a tile side in pixels (a multiple of 8, at \
                     least 64), not `{s}`"
                )),
            },
        }
    }
}

impl EngineOptions {
    fn default_dtype(&self, device: &Device) -> DType {
        self.dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        })
    }
}

fn vae_dtype(preset: &ModelPreset, specs: &ModelSpecs, dtype: DType) -> DType {
    if preset.vae_f32 || specs.vae.force_upcast {
        DType::F32
    } else {
        dtype
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            device: DeviceChoice::Cpu,
            dtype: None,
            vae_tiling: VaeTiling::Auto,
        }
    }
}

/// An init image for img2img, shared by every image of the batch.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: image::RgbImage,
    /// How much of the schedule to run, in (0, 1]: 1 ignores the image's content.
    pub strength: f64,
}

/// One batch: image *i* is `prompts[i]` with `seeds[i]`.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub init: Option<InitImage>,
    /// Overrides the preset's scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// Overrides the timestep spacing (`leading`, `trailing`, `linspace`).
    pub timestep_spacing: Option<String>,
    /// Background keying applied while converting to RGBA (off: opaque images).
    pub alpha_key: AlphaKey,
}

impl GenerateRequest {
    /// A request with the preset's defaults: one image per prompt, seeds `seed, seed+1, …`.
    pub fn new(preset: &ModelPreset, prompts: Vec<String>, seed: u64) -> Self {
        let seeds = (0..prompts.len() as u64)
            .map(|i| seed.wrapping_add(i))
            .collect();
        Self {
            prompts,
            negative_prompt: String::new(),
            seeds,
            steps: preset.defaults.steps,
            guidance: preset.defaults.guidance,
            width: preset.defaults.width,
            height: preset.defaults.height,
            init: None,
            scheduler: None,
            timestep_spacing: None,
            alpha_key: AlphaKey::disabled(),
        }
    }

    /// Rejects what can't run, before any tensor work.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if self.prompts.is_empty() {
            return bad("at least one prompt is needed".into());
        }
        if self.seeds.len() != self.prompts.len() {
            return bad(format!(
                "{} seeds for {} prompts: give one seed per image",
                self.seeds.len(),
                self.prompts.len()
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
        if let Some(init) = &self.init
            && !(init.strength > 0.0 && init.strength <= 1.0)
        {
            return bad(format!("strength must be in (0, 1], got {}", init.strength));
        }
        Ok(())
    }
}

/// Where a generation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    TextEncode,
    VaeEncode,
    Denoise,
    VaeDecode,
}

/// A progress report: `step` of `total` within `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub stage: Stage,
    pub step: usize,
    pub total: usize,
}

/// The observer's answer: go on, or stop the generation (it then fails with `Cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Cancel,
}

/// Receives progress before each stage and each denoising step, and may cancel.
pub trait Observer {
    fn on_progress(&mut self, progress: Progress) -> Flow;
}

impl<F: FnMut(Progress) -> Flow> Observer for F {
    fn on_progress(&mut self, progress: Progress) -> Flow {
        self(progress)
    }
}

/// An observer that never cancels.
pub fn no_observer() -> impl Observer {
    |_: Progress| Flow::Continue
}

/// Text conditioning for a batch of prompts.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[n, tokens, cross_attention_dim]`, the UNet's cross-attention input.
    pub context: Tensor,
    /// SDXL: the pooled, projected embedding of the second encoder, `[n, d]`.
    pub pooled: Option<Tensor>,
}

/// Wall time per stage of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub text_encode: Duration,
    pub vae_encode: Duration,
    pub denoise: Duration,
    pub vae_decode: Duration,
    pub postprocess: Duration,
}

impl StageTimings {
    pub fn total(&self) -> Duration {
        self.text_encode + self.vae_encode + self.denoise + self.vae_decode + self.postprocess
    }
}

/// The result of one batch.
#[derive(Debug)]
pub struct Generation {
    pub images: Vec<image::RgbaImage>,
    /// Final latents before VAE scaling, `[n, c, h/8, w/8]`, f32 on the CPU.
    pub latents: Tensor,
    pub timings: StageTimings,
}

struct TextStack {
    tokenizer: ClipTokenizer,
    encoder: ClipTextEncoder,
}

/// A loaded model on one device.
pub struct Engine {
    preset: ModelPreset,
    device: Device,
    dtype: DType,
    vae_dtype: DType,
    text: Vec<TextStack>,
    unet: UNet,
    unet_spec: UNetSpec,
    vae: Vae,
    scheduler_spec: SchedulerSpec,
    /// AnimateDiff's motion modules, once [`Engine::attach_motion`] loaded an adapter.
    motion: Option<motion::MotionAdapter>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.preset.name)
            .field("device", &self.device)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

fn var_builder(
    path: &std::path::Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, EngineError> {
    // SAFETY: the weights are memory-mapped read-only; the files must not be modified while the
    // engine lives, which holds for a model cache (hf-hub writes new blobs, never in place).
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }.map_err(|e| {
        EngineError::Config {
            path: path.to_path_buf(),
            message: format!("cannot load weights: {e}"),
        }
    })
}

impl Engine {
    /// Loads every component of `preset` from `files` onto the chosen device.
    pub fn load(
        preset: &ModelPreset,
        files: &ModelFiles,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        let specs = ModelSpecs::read(preset, files)?;
        let device = options.device.open()?;
        let dtype = options.default_dtype(&device);
        let vae_dtype = vae_dtype(preset, &specs, dtype);
        let mut tokenizers = Vec::new();
        let mut text_vbs = Vec::new();
        for (tok, weights) in [
            ("tokenizer", Some(&preset.weights.text_encoder)),
            ("tokenizer_2", preset.weights.text_encoder_2.as_ref()),
        ] {
            if let Some(weights) = weights {
                tokenizers.push(ClipTokenizer::from_dir(
                    files.dir_of(&format!("{tok}/vocab.json"))?,
                )?);
                text_vbs.push(var_builder(files.path(weights)?, dtype, &device)?);
            }
        }
        let unet_vb = var_builder(files.path(&preset.weights.unet)?, dtype, &device)?;
        let vae_vb = var_builder(files.path(&preset.weights.vae)?, vae_dtype, &device)?;
        let mut engine = Self::build(
            preset, specs, tokenizers, text_vbs, unet_vb, vae_vb, device, dtype, vae_dtype,
        )?;
        engine.set_vae_tiling(options.vae_tiling);
        Ok(engine)
    }

    /// An engine with `specs`' shapes and freshly initialised random weights: the same
    /// arithmetic as the real model, for benchmarks on hosts without the (gated, multi-GB)
    /// checkpoints. Its images are noise. `tokenizer_dir` supplies a CLIP tokenizer for every
    /// text encoder (its ids must fit the specs' vocabulary).
    pub fn with_random_weights(
        preset: &ModelPreset,
        specs: ModelSpecs,
        tokenizer_dir: &std::path::Path,
        options: &EngineOptions,
    ) -> Result<Self, EngineError> {
        let device = options.device.open()?;
        let dtype = options.default_dtype(&device);
        let vae_dtype = vae_dtype(preset, &specs, dtype);
        let mut tokenizers = Vec::new();
        let mut text_vbs = Vec::new();
        for i in 0..specs.text.len() {
            tokenizers.push(ClipTokenizer::from_dir(tokenizer_dir)?);
            text_vbs.push(RandomWeights::var_builder(dtype, &device).pp(format!("text{i}")));
        }
        let unet_vb = RandomWeights::var_builder(dtype, &device).pp("unet");
        let vae_vb = RandomWeights::var_builder(vae_dtype, &device).pp("vae");
        let mut engine = Self::build(
            preset, specs, tokenizers, text_vbs, unet_vb, vae_vb, device, dtype, vae_dtype,
        )?;
        engine.set_vae_tiling(options.vae_tiling);
        Ok(engine)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        preset: &ModelPreset,
        specs: ModelSpecs,
        tokenizers: Vec<ClipTokenizer>,
        text_vbs: Vec<VarBuilder>,
        unet_vb: VarBuilder,
        vae_vb: VarBuilder,
        device: Device,
        dtype: DType,
        vae_dtype: DType,
    ) -> Result<Self, EngineError> {
        let ModelSpecs {
            text: text_specs,
            unet: unet_spec,
            vae: vae_spec,
            scheduler: scheduler_spec,
        } = specs;
        if text_specs.len() != tokenizers.len() || text_specs.len() != text_vbs.len() {
            return Err(EngineError::InvalidRequest(
                "one tokenizer and one weight set per text encoder".into(),
            ));
        }
        let mut text = Vec::new();
        for ((spec, tokenizer), vb) in text_specs.iter().zip(tokenizers).zip(text_vbs) {
            if spec.vocab_size < tokenizer.vocab_size() {
                return Err(EngineError::Config {
                    path: "text_encoder/config.json".into(),
                    message: format!(
                        "vocab_size {} is smaller than the tokenizer's {}",
                        spec.vocab_size,
                        tokenizer.vocab_size()
                    ),
                });
            }
            let encoder = ClipTextEncoder::new(vb, spec, tokenizer.eos_id())?;
            text.push(TextStack { tokenizer, encoder });
        }
        let ctx_dim: usize = text_specs.iter().map(|s| s.hidden_size).sum();
        if ctx_dim != unet_spec.config.cross_attention_dim {
            return Err(EngineError::Config {
                path: "unet/config.json".into(),
                message: format!(
                    "cross_attention_dim {} does not match the text encoders' width {ctx_dim}",
                    unet_spec.config.cross_attention_dim
                ),
            });
        }
        if let Some(tt) = &unet_spec.text_time {
            let pooled = text_specs
                .last()
                .and_then(|s| s.projection_dim)
                .unwrap_or(0);
            if pooled + 6 * tt.time_embed_dim != tt.input_dim {
                return Err(EngineError::Config {
                    path: "unet/config.json".into(),
                    message: format!(
                        "projection_class_embeddings_input_dim {} is not the pooled width {pooled} \
                         plus 6 x {}",
                        tt.input_dim, tt.time_embed_dim
                    ),
                });
            }
        }
        let unet = UNet::new(
            unet_vb,
            unet_spec.in_channels,
            unet_spec.out_channels,
            unet_spec.config.clone(),
            unet_spec.text_time,
        )?;
        let vae = Vae::new(vae_vb, vae_spec)?;
        Ok(Self {
            preset: preset.clone(),
            device,
            dtype,
            vae_dtype,
            text,
            unet,
            unet_spec,
            vae,
            scheduler_spec,
            motion: None,
        })
    }

    pub fn preset(&self) -> &ModelPreset {
        &self.preset
    }

    /// Changes when the VAE decodes in tiles (see [`VaeTiling`]).
    pub fn set_vae_tiling(&mut self, tiling: VaeTiling) {
        let sample = match tiling {
            VaeTiling::Auto => Some(self.vae.spec.sample_size),
            VaeTiling::Pixels(px) => Some(px),
            VaeTiling::Off => None,
        };
        self.vae.set_tiling(sample.map(|sample| vae::Tiling {
            sample,
            overlap: 0.25,
        }));
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn vae(&self) -> &Vae {
        &self.vae
    }

    /// Pixels per latent along a side (8 for every SD VAE).
    pub fn vae_scale(&self) -> usize {
        self.vae.spec.scale()
    }

    /// The scheduler a request would run with.
    pub fn scheduler_for(&self, req: &GenerateRequest) -> Result<Scheduler, EngineError> {
        Scheduler::new(
            req.scheduler.unwrap_or(self.preset.scheduler),
            &self.scheduler_spec,
            req.timestep_spacing
                .as_deref()
                .or(self.preset.timestep_spacing.as_deref()),
            req.steps,
        )
    }

    /// Token ids of `prompt` for each text encoder.
    pub fn tokenize(&self, prompt: &str) -> Vec<Vec<u32>> {
        self.text
            .iter()
            .map(|t| t.tokenizer.encode(prompt))
            .collect()
    }

    /// The UNet's conditioning for each prompt: `[n, 77, cross_attention_dim]` in the model
    /// dtype, and for SDXL the pooled embedding of the last encoder, `[n, d]`.
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Conditioning, EngineError> {
        let mut parts = Vec::with_capacity(self.text.len());
        let mut pooled = None;
        for stack in &self.text {
            let ids: Vec<Vec<u32>> = prompts.iter().map(|p| stack.tokenizer.encode(p)).collect();
            let enc = stack.encoder.encode(&ids)?;
            pooled = Some(enc.pooled);
            parts.push(match self.preset.architecture {
                // SD 2.x checkpoints already drop the last layer; their last state is the one.
                Architecture::Sd15 | Architecture::Sd2 => enc.last,
                Architecture::Sdxl => enc.penultimate,
            });
        }
        Ok(Conditioning {
            context: Tensor::cat(&parts, 2)?,
            pooled: if self.unet.needs_added_cond() {
                pooled
            } else {
                None
            },
        })
    }

    /// The UNet's conditioning for a batch: with guidance, the negative prompt's rows first
    /// (`[uncond; cond]`, as diffusers concatenates them), else the prompts' alone.
    pub(crate) fn guided_conditioning(
        &self,
        prompts: &[String],
        negative: &str,
        guided: bool,
    ) -> Result<Conditioning, EngineError> {
        let n = prompts.len();
        let cond = self.encode_prompts(prompts)?;
        if !guided {
            return Ok(cond);
        }
        let uncond = if self.preset.architecture == Architecture::Sdxl && negative.is_empty() {
            // SDXL repos set `force_zeros_for_empty_prompt`: no negative means zeros.
            Conditioning {
                context: cond.context.zeros_like()?,
                pooled: cond.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
            }
        } else {
            let one = self.encode_prompts(&[negative.to_string()])?;
            Conditioning {
                context: one.context.repeat((n, 1, 1))?,
                pooled: one.pooled.map(|p| p.repeat((n, 1))).transpose()?,
            }
        };
        let pooled = match (uncond.pooled, cond.pooled) {
            (Some(u), Some(c)) => Some(Tensor::cat(&[&u, &c], 0)?),
            _ => None,
        };
        Ok(Conditioning {
            context: Tensor::cat(&[&uncond.context, &cond.context], 0)?,
            pooled,
        })
    }

    /// SDXL's size/crop ids for a `width`x`height` image generated uncropped at its own size:
    /// `[h, w, 0, 0, h, w]` per row.
    pub fn time_ids(
        &self,
        rows: usize,
        width: usize,
        height: usize,
    ) -> Result<Tensor, EngineError> {
        let (h, w) = (height as f32, width as f32);
        let row = [h, w, 0.0, 0.0, h, w];
        let data: Vec<f32> = (0..rows).flat_map(|_| row).collect();
        Ok(Tensor::from_vec(data, (rows, 6), &self.device)?)
    }

    /// One UNet evaluation (exposed for agreement tests and benchmarks).
    pub fn unet_forward(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor, EngineError> {
        let out = self.unet.forward(
            &latents.to_dtype(self.dtype)?,
            timestep,
            &context.to_dtype(self.dtype)?,
            added,
        )?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// Generates with the request's seeds.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        observer: &mut dyn Observer,
    ) -> Result<Generation, EngineError> {
        let mut noise = SeededNoise::new(&req.seeds);
        self.generate_with_noise(req, &mut noise, observer)
    }

    /// Generates drawing randomness from `noise` (one stream per image, see [`noise`]).
    pub fn generate_with_noise(
        &self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        observer: &mut dyn Observer,
    ) -> Result<Generation, EngineError> {
        req.validate()?;
        let n = req.prompts.len();
        let scale = self.vae_scale();
        if req.width % scale != 0 || req.height % scale != 0 {
            return Err(EngineError::InvalidRequest(format!(
                "size {}x{} must be a multiple of {scale}",
                req.width, req.height
            )));
        }
        let (lh, lw) = (req.height / scale, req.width / scale);
        let lc = self.unet_spec.in_channels;
        let latent_len = lc * lh * lw;
        let scheduler = self.scheduler_for(req)?;
        let total_steps = scheduler.timesteps().len();
        let start = match &req.init {
            Some(init) => {
                let s = scheduler.img2img_start(init.strength);
                if s >= total_steps {
                    return Err(EngineError::InvalidRequest(format!(
                        "strength {} with {} steps runs no step; raise either",
                        init.strength, req.steps
                    )));
                }
                s
            }
            None => 0,
        };
        let mut check = |stage, step, total| -> Result<(), EngineError> {
            match observer.on_progress(Progress { stage, step, total }) {
                Flow::Continue => Ok(()),
                Flow::Cancel => Err(EngineError::Cancelled),
            }
        };
        let mut timings = StageTimings::default();
        let guided = req.guidance > 1.0;

        // Text.
        check(Stage::TextEncode, 0, 1)?;
        let t0 = Instant::now();
        let Conditioning { context, pooled } =
            self.guided_conditioning(&req.prompts, &req.negative_prompt, guided)?;
        let added = match pooled {
            Some(text_embeds) => Some(AddedCond {
                time_ids: self.time_ids(text_embeds.dim(0)?, req.width, req.height)?,
                text_embeds,
            }),
            None => None,
        };
        self.device.synchronize()?;
        timings.text_encode = t0.elapsed();

        // Initial latents.
        let draw = |noise: &mut dyn NoiseSource| -> Result<Tensor, EngineError> {
            let mut rows = Vec::with_capacity(n);
            for i in 0..n {
                let v = noise.draw(i, latent_len)?;
                rows.push(Tensor::from_vec(v, (lc, lh, lw), &self.device)?);
            }
            Ok(Tensor::stack(&rows, 0)?)
        };
        let mut latents = match &req.init {
            None => draw(noise)?.affine(scheduler.init_noise_sigma(), 0.0)?,
            Some(init) => {
                check(Stage::VaeEncode, 0, 1)?;
                let t0 = Instant::now();
                let pixels = image_to_tensor(&init.image, req.width, req.height, &self.device)?;
                let dist = self.vae.encode(&pixels.to_dtype(self.vae_dtype)?)?;
                let mean = dist.mean.to_dtype(DType::F32)?;
                let std = dist.std.to_dtype(DType::F32)?;
                let sample = mean
                    .broadcast_add(&draw(noise)?.broadcast_mul(&std)?)?
                    .affine(self.vae.spec.scaling_factor, 0.0)?;
                let lat = scheduler.add_noise(&sample, &draw(noise)?, start)?;
                self.device.synchronize()?;
                timings.vae_encode = t0.elapsed();
                lat
            }
        };

        // Denoise.
        let t0 = Instant::now();
        let steps = total_steps - start;
        for (k, i) in (start..total_steps).enumerate() {
            check(Stage::Denoise, k, steps)?;
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let mut eps =
                self.unet_forward(&input, scheduler.timesteps()[i], &context, added.as_ref())?;
            if guided {
                let uncond = eps.narrow(0, 0, n)?;
                let text = eps.narrow(0, n, n)?;
                eps = (&uncond + ((text - &uncond)? * req.guidance)?)?;
            }
            let step_noise = if scheduler.needs_step_noise() {
                Some(draw(noise)?)
            } else {
                None
            };
            latents = scheduler.step(&eps, i, &latents, step_noise.as_ref())?;
        }
        check(Stage::Denoise, steps, steps)?;
        self.device.synchronize()?;
        timings.denoise = t0.elapsed();

        // Decode and convert.
        check(Stage::VaeDecode, 0, 1)?;
        let t0 = Instant::now();
        let z = latents.affine(1.0 / self.vae.spec.scaling_factor, 0.0)?;
        let decoded = self.vae.decode(&z.to_dtype(self.vae_dtype)?)?;
        self.device.synchronize()?;
        timings.vae_decode = t0.elapsed();
        let t0 = Instant::now();
        let rgba = kernels::decoded_to_rgba(&decoded, req.alpha_key)?;
        let frame = req.width * req.height * 4;
        let images = rgba
            .chunks_exact(frame)
            .map(|c| {
                image::RgbaImage::from_raw(req.width as u32, req.height as u32, c.to_vec())
                    .ok_or_else(|| EngineError::InvalidRequest("image buffer size".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        timings.postprocess = t0.elapsed();
        Ok(Generation {
            images,
            latents: latents.to_device(&Device::Cpu)?,
            timings,
        })
    }
}

/// RGB8 → `[1, 3, h, w]` f32 in [-1, 1], resized to `width`×`height` when it differs
/// ([`resize::resize_lanczos`], PIL-compatible).
pub fn image_to_tensor(
    img: &image::RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor, EngineError> {
    let resized;
    let img = if img.width() as usize != width || img.height() as usize != height {
        // As diffusers' image processor resizes (PIL's antialiased Lanczos), so an init image
        // of another size starts from the latents diffusers would encode.
        resized = resize::resize_lanczos(img, width as u32, height as u32)
            .map_err(|e| EngineError::InvalidRequest(format!("init image: {e}")))?;
        &resized
    } else {
        img
    };
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    let t = Tensor::from_vec(data, (height, width, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .affine(2.0, -1.0)?;
    Ok(t)
}
