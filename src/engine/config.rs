//! Reading the `config.json` files diffusers and transformers write, into the engine's configs.
//!
//! The checkpoint's own config is the truth about its shape; presets only choose how to run it.
//! Each reader accepts the keys real SD 1.5 / 2.1 / SDXL repos use and rejects what the engine
//! can't run (an unknown block type) with the file and the reason, instead of building a
//! network that silently loads the wrong tensors.

use std::path::{Path, PathBuf};

use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::EngineError;
use super::preset::SchedulerKind;

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// An int or a per-block list, as diffusers allows for head counts and layer counts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn at(&self, i: usize) -> Option<usize> {
        match self {
            PerBlock::One(v) => Some(*v),
            PerBlock::Each(v) => v.get(i).copied(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct UNetJson {
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    #[serde(default = "two")]
    layers_per_block: usize,
    #[serde(default)]
    attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    transformer_layers_per_block: Option<PerBlock>,
    cross_attention_dim: usize,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    norm_eps: f64,
    #[serde(default = "yes")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "one")]
    downsample_padding: usize,
    #[serde(default = "one_f")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn thirty_two() -> usize {
    32
}
fn norm_eps() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}

/// SDXL's `text_time` added conditioning: the pooled text embedding and the size/crop ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeSpec {
    /// Sinusoidal width per time id (six ids).
    pub time_embed_dim: usize,
    /// Pooled text width + 6 × `time_embed_dim`: the input of `add_embedding`.
    pub input_dim: usize,
}

/// A UNet config ready for the block builders, plus the added conditioning.
#[derive(Debug, Clone)]
pub struct UNetSpec {
    pub config: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_time: Option<TextTimeSpec>,
}

pub fn read_unet(path: &Path) -> Result<UNetSpec, EngineError> {
    unet_from_json(read_json(path)?, path)
}

fn unet_from_json(j: UNetJson, path: &Path) -> Result<UNetSpec, EngineError> {
    let bad = |message: String| EngineError::Config {
        path: path.to_path_buf(),
        message,
    };
    let n = j.block_out_channels.len();
    if n == 0 || j.down_block_types.len() != n || j.up_block_types.len() != n {
        return Err(bad(
            "block_out_channels, down_block_types and up_block_types must have one entry per block"
                .into(),
        ));
    }
    // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` — the legacy
    // `attention_head_dim` key holds head counts, which is also what candle's field means.
    let heads = j
        .num_attention_heads
        .clone()
        .or(j.attention_head_dim.clone())
        .unwrap_or(PerBlock::One(8));
    let layers = j
        .transformer_layers_per_block
        .clone()
        .unwrap_or(PerBlock::One(1));
    let mut blocks = Vec::with_capacity(n);
    for (i, kind) in j.down_block_types.iter().enumerate() {
        let cross = match kind.as_str() {
            "CrossAttnDownBlock2D" => true,
            "DownBlock2D" => false,
            other => return Err(bad(format!("unsupported down block type `{other}`"))),
        };
        // candle builds up block i from block n-1-i; the config must mirror the down path.
        let up = &j.up_block_types[n - 1 - i];
        let up_cross = match up.as_str() {
            "CrossAttnUpBlock2D" => true,
            "UpBlock2D" => false,
            other => return Err(bad(format!("unsupported up block type `{other}`"))),
        };
        if up_cross != cross {
            return Err(bad(format!(
                "up block {} ({up}) does not mirror down block {i} ({kind})",
                n - 1 - i
            )));
        }
        let attention_head_dim = heads
            .at(i)
            .ok_or_else(|| bad(format!("no attention head count for block {i}")))?;
        let n_layers = layers
            .at(i)
            .ok_or_else(|| bad(format!("no transformer layer count for block {i}")))?;
        blocks.push(BlockConfig {
            out_channels: j.block_out_channels[i],
            use_cross_attn: cross.then_some(n_layers),
            attention_head_dim,
        });
    }
    let text_time = match j.addition_embed_type.as_deref() {
        None => None,
        Some("text_time") => {
            let (Some(time_embed_dim), Some(input_dim)) = (
                j.addition_time_embed_dim,
                j.projection_class_embeddings_input_dim,
            ) else {
                return Err(bad(
                    "text_time conditioning needs addition_time_embed_dim and \
                     projection_class_embeddings_input_dim"
                        .into(),
                ));
            };
            if input_dim <= 6 * time_embed_dim {
                return Err(bad(format!(
                    "projection_class_embeddings_input_dim {input_dim} leaves no room for the \
                     pooled text embedding next to 6 x {time_embed_dim} time features"
                )));
            }
            Some(TextTimeSpec {
                time_embed_dim,
                input_dim,
            })
        }
        Some(other) => return Err(bad(format!("unsupported addition_embed_type `{other}`"))),
    };
    Ok(UNetSpec {
        config: UNet2DConditionModelConfig {
            center_input_sample: j.center_input_sample,
            flip_sin_to_cos: j.flip_sin_to_cos,
            freq_shift: j.freq_shift,
            blocks,
            layers_per_block: j.layers_per_block,
            downsample_padding: j.downsample_padding,
            mid_block_scale_factor: j.mid_block_scale_factor,
            norm_num_groups: j.norm_num_groups,
            norm_eps: j.norm_eps,
            cross_attention_dim: j.cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: j.use_linear_projection,
        },
        in_channels: j.in_channels,
        out_channels: j.out_channels,
        text_time,
    })
}

/// The VAE's shape and latent scaling.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeSpec {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// SDXL's VAE overflows in f16; diffusers upcasts it when this is set.
    #[serde(default)]
    pub force_upcast: bool,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// The image side the VAE was trained at: diffusers' tile size for tiled decoding.
    #[serde(default = "vae_sample_size", deserialize_with = "side_or_pair")]
    pub sample_size: usize,
}

/// diffusers' `AutoencoderKL` default.
fn vae_sample_size() -> usize {
    32
}

/// `sample_size` is one side or `[h, w]`; diffusers tiles by the first.
fn side_or_pair<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Side {
        One(usize),
        Pair(Vec<usize>),
    }
    match Side::deserialize(d)? {
        Side::One(n) => Ok(n),
        Side::Pair(v) => v
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

fn three() -> usize {
    3
}
fn sd_scaling() -> f64 {
    0.18215
}

pub fn read_vae(path: &Path) -> Result<VaeSpec, EngineError> {
    let spec: VaeSpec = read_json(path)?;
    if spec.block_out_channels.is_empty() {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            message: "block_out_channels is empty".into(),
        });
    }
    Ok(spec)
}

impl VaeSpec {
    /// Pixels per latent along each side: 2^(levels-1), 8 for every real SD VAE.
    pub fn scale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Activation of the CLIP MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

/// A transformers `CLIPTextConfig` (also the `text_config` of a full CLIP config).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipTextSpec {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "seventy_seven")]
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: ClipActivation,
    #[serde(default = "norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn seventy_seven() -> usize {
    77
}
fn quick_gelu() -> ClipActivation {
    ClipActivation::QuickGelu
}

pub fn read_clip_text(path: &Path) -> Result<ClipTextSpec, EngineError> {
    let spec: ClipTextSpec = read_json(path)?;
    if spec.num_attention_heads == 0 || spec.hidden_size % spec.num_attention_heads != 0 {
        return Err(EngineError::Config {
            path: path.to_path_buf(),
            message: "hidden_size must be a multiple of num_attention_heads".into(),
        });
    }
    Ok(spec)
}

/// The diffusers scheduler classes whose `scheduler_config.json` this reader understands: the
/// three the engine runs, and PNDM, the class SD 1.x repos ship (the sd15 preset runs DDIM on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerClass {
    Ddim,
    EulerDiscrete,
    EulerAncestralDiscrete,
    Pndm,
}

/// The keyword arguments every one of those classes' `__init__` takes (diffusers 0.42.1).
const SHARED_KEYS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
];
const DDIM_KEYS: &[&str] = &[
    "clip_sample",
    "set_alpha_to_one",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "rescale_betas_zero_snr",
];
const EULER_KEYS: &[&str] = &[
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "rescale_betas_zero_snr",
    "final_sigmas_type",
];
const EULER_ANCESTRAL_KEYS: &[&str] = &["rescale_betas_zero_snr"];
const PNDM_KEYS: &[&str] = &["skip_prk_steps", "set_alpha_to_one"];

impl SchedulerClass {
    const ALL: [SchedulerClass; 4] = [
        SchedulerClass::Ddim,
        SchedulerClass::EulerDiscrete,
        SchedulerClass::EulerAncestralDiscrete,
        SchedulerClass::Pndm,
    ];

    /// The name diffusers writes in `_class_name`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerClass::Ddim => "DDIMScheduler",
            SchedulerClass::EulerDiscrete => "EulerDiscreteScheduler",
            SchedulerClass::EulerAncestralDiscrete => "EulerAncestralDiscreteScheduler",
            SchedulerClass::Pndm => "PNDMScheduler",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The class whose arithmetic the engine runs for a preset's algorithm.
    pub fn of(kind: SchedulerKind) -> Self {
        match kind {
            SchedulerKind::Ddim => SchedulerClass::Ddim,
            SchedulerKind::Euler => SchedulerClass::EulerDiscrete,
            SchedulerKind::EulerAncestral => SchedulerClass::EulerAncestralDiscrete,
        }
    }

    /// Whether the class's `__init__` takes `key`.
    fn defines(self, key: &str) -> bool {
        let own = match self {
            SchedulerClass::Ddim => DDIM_KEYS,
            SchedulerClass::EulerDiscrete => EULER_KEYS,
            SchedulerClass::EulerAncestralDiscrete => EULER_ANCESTRAL_KEYS,
            SchedulerClass::Pndm => PNDM_KEYS,
        };
        SHARED_KEYS.contains(&key) || own.contains(&key)
    }

    /// diffusers' default `timestep_spacing` for the class.
    fn default_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerClass::Ddim | SchedulerClass::Pndm => TimestepSpacing::Leading,
            SchedulerClass::EulerDiscrete | SchedulerClass::EulerAncestralDiscrete => {
                TimestepSpacing::Linspace
            }
        }
    }
}

/// How the training betas are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    /// The Glide cosine schedule (`squaredcos_cap_v2`).
    SquaredCosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    /// The clean sample itself (DDIM and Euler; diffusers' Euler ancestral refuses it).
    Sample,
}

/// Where the inference timesteps sit in the training range (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            "linspace" => Some(Self::Linspace),
            _ => None,
        }
    }
}

/// Euler's sigma schedule: interpolated at the spaced timesteps, or re-spaced from that range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSchedule {
    Interpolated,
    /// `use_karras_sigmas`: Karras et al.'s rho = 7 spacing between sigma_max and sigma_min.
    Karras,
    /// `use_exponential_sigmas`: evenly spaced in log sigma.
    Exponential,
}

/// A `scheduler_config.json`, read the way diffusers 0.42.1 reads it.
///
/// Every key one of the classes above takes is either applied as diffusers applies it or, when
/// it is set to something that changes the arithmetic and this engine doesn't implement it,
/// refused by [`read_scheduler`] with a message naming the key and the file. The check covers
/// every class the engine can run, not only the preset's, because a request may pick another.
///
/// Keys no class above takes are accepted with a warning and otherwise ignored: that is what
/// diffusers does with them ("… are not expected and will be ignored"), so they can't make its
/// image differ from ours. Keys starting with `_` (`_diffusers_version`, …) are bookkeeping.
///
/// Defaults follow diffusers' `from_config`: a key the file omits takes the default of the class
/// that *runs* (so `timestep_spacing` is `leading` for DDIM and `linspace` for Euler), and a key
/// the file sets carries over to whichever class runs, whatever class wrote it (SD 1.5's
/// `PNDMScheduler` file sets `clip_sample: false`, which its DDIM run then reads). One
/// exception: DDIM's two switches `clip_sample` and `set_alpha_to_one`, which DDIMScheduler
/// defaults to true, default to true only when the file is a DDIM config, names no class, or
/// names one that takes the key (PNDM's `set_alpha_to_one`); in a file written for a class
/// without them (Euler's, say) they are off, where `DDIMScheduler.from_config` would turn them
/// on. That keeps DDIM on a turbo or tiny model's Euler config a plain DDIM sampler, as the
/// agreement references for the tiny model were generated.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSpec {
    /// The file it was read from, for messages about it at generation time.
    pub source: PathBuf,
    /// `_class_name`, or `None` when the file names none.
    pub class: Option<SchedulerClass>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit training betas, one per training timestep; they replace the schedule.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// `None` when the file doesn't say: the running class's default then.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    /// DDIM: clamp the predicted clean sample to ±`clip_sample_range` (`None`: file silent).
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDIM: the last step goes to alpha 1 instead of the first training alpha.
    pub set_alpha_to_one: Option<bool>,
    /// Euler's sigma schedule, with the optional bounds it uses.
    pub sigma_schedule: SigmaSchedule,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// Euler: the last sigma is the first training sigma (`final_sigmas_type: sigma_min`)
    /// instead of 0.
    pub final_sigma_min: bool,
    /// Euler: `timestep_type: continuous`, which with v-prediction feeds the UNet
    /// `0.25 * ln(sigma)` instead of a training timestep.
    pub continuous_timesteps: bool,
}

impl SchedulerSpec {
    /// diffusers' class defaults (the same for every class above, spacing and DDIM's switches
    /// aside, which are resolved per running class).
    fn defaults(source: &Path, class: Option<SchedulerClass>) -> Self {
        Self {
            source: source.to_path_buf(),
            class,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            sigma_schedule: SigmaSchedule::Interpolated,
            sigma_min: None,
            sigma_max: None,
            final_sigma_min: false,
            continuous_timesteps: false,
        }
    }

    /// The spacing `class` runs with when neither preset nor request overrides it.
    pub fn timestep_spacing_for(&self, class: SchedulerClass) -> TimestepSpacing {
        self.timestep_spacing
            .unwrap_or_else(|| class.default_spacing())
    }

    /// DDIM's `clip_sample` (see the type's doc for when a silent file means true).
    pub fn ddim_clip_sample(&self) -> bool {
        self.ddim_switch("clip_sample", self.clip_sample)
    }

    /// DDIM's `set_alpha_to_one` (see the type's doc for when a silent file means true).
    pub fn ddim_set_alpha_to_one(&self) -> bool {
        self.ddim_switch("set_alpha_to_one", self.set_alpha_to_one)
    }

    fn ddim_switch(&self, key: &str, value: Option<bool>) -> bool {
        value.unwrap_or(match self.class {
            None | Some(SchedulerClass::Ddim) => true,
            Some(class) => class.defines(key),
        })
    }

    /// Reads a parsed `scheduler_config.json`; `source` names it in errors.
    pub fn from_json(value: &serde_json::Value, source: &Path) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Config {
            path: source.to_path_buf(),
            message,
        };
        let Some(map) = value.as_object() else {
            return Err(bad("a scheduler config must be a JSON object".into()));
        };
        let class = match map.get("_class_name") {
            None => None,
            Some(serde_json::Value::String(name)) => {
                Some(SchedulerClass::from_name(name).ok_or_else(|| {
                    let known: Vec<_> = SchedulerClass::ALL.iter().map(|c| c.name()).collect();
                    bad(format!(
                        "`_class_name` `{name}` is not a scheduler class this engine reads \
                         (it reads {})",
                        known.join(", ")
                    ))
                })?)
            }
            Some(other) => {
                return Err(bad(format!("`_class_name` must be a string, got {other}")));
            }
        };
        let mut spec = Self::defaults(source, class);
        let (mut karras, mut exponential) = (false, false);
        for (key, v) in map {
            // Private keys are diffusers' bookkeeping (`_class_name` was read above).
            if key.starts_with('_') {
                continue;
            }
            let k = key.as_str();
            match k {
                "num_train_timesteps" => spec.num_train_timesteps = count(k, v, 1).map_err(bad)?,
                "beta_start" => spec.beta_start = number(k, v).map_err(bad)?,
                "beta_end" => spec.beta_end = number(k, v).map_err(bad)?,
                "beta_schedule" => {
                    spec.beta_schedule = match text(k, v).map_err(bad)? {
                        "linear" => BetaSchedule::Linear,
                        "scaled_linear" => BetaSchedule::ScaledLinear,
                        "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
                        other => {
                            return Err(bad(format!(
                                "`beta_schedule` `{other}` is not one diffusers implements \
                                 (linear, scaled_linear, squaredcos_cap_v2)"
                            )));
                        }
                    }
                }
                "trained_betas" => {
                    spec.trained_betas = match v {
                        serde_json::Value::Null => None,
                        serde_json::Value::Array(items) => Some(
                            items
                                .iter()
                                .map(|b| number(k, b))
                                .collect::<Result<_, _>>()
                                .map_err(bad)?,
                        ),
                        other => {
                            return Err(bad(format!(
                                "`trained_betas` must be null or a list of numbers, got {other}"
                            )));
                        }
                    }
                }
                "prediction_type" => {
                    spec.prediction_type = match text(k, v).map_err(bad)? {
                        "epsilon" => PredictionType::Epsilon,
                        "v_prediction" => PredictionType::VPrediction,
                        "sample" => PredictionType::Sample,
                        other => {
                            return Err(bad(format!(
                                "`prediction_type` `{other}` is not supported \
                                 (epsilon, v_prediction, sample)"
                            )));
                        }
                    }
                }
                "timestep_spacing" => {
                    let s = text(k, v).map_err(bad)?;
                    spec.timestep_spacing = Some(TimestepSpacing::parse(s).ok_or_else(|| {
                        bad(format!(
                            "`timestep_spacing` `{s}` is not supported (leading, trailing, linspace)"
                        ))
                    })?);
                }
                "steps_offset" => spec.steps_offset = count(k, v, 0).map_err(bad)?,
                "rescale_betas_zero_snr" => {
                    spec.rescale_betas_zero_snr = truthy(k, v).map_err(bad)?
                }
                "clip_sample" => spec.clip_sample = Some(truthy(k, v).map_err(bad)?),
                "clip_sample_range" => spec.clip_sample_range = number(k, v).map_err(bad)?,
                "set_alpha_to_one" => spec.set_alpha_to_one = Some(truthy(k, v).map_err(bad)?),
                "thresholding" => {
                    if truthy(k, v).map_err(bad)? {
                        return Err(bad(
                            "`thresholding` = true is not supported: DDIMScheduler would apply \
                             dynamic thresholding to the predicted sample, which this engine \
                             does not implement"
                                .into(),
                        ));
                    }
                }
                // Read by DDIM only under `thresholding`, which is refused above when set.
                "dynamic_thresholding_ratio" | "sample_max_value" => {}
                // PNDM's own step variant; no class the engine runs reads it.
                "skip_prk_steps" => {}
                "interpolation_type" => match text(k, v).map_err(bad)? {
                    "linear" => {}
                    "log_linear" => {
                        return Err(bad("`interpolation_type` `log_linear` is not supported: \
                             EulerDiscreteScheduler would space its sigmas evenly in log space, \
                             which this engine does not implement (linear)"
                            .into()));
                    }
                    other => {
                        return Err(bad(format!(
                            "`interpolation_type` `{other}` is not one diffusers implements (linear)"
                        )));
                    }
                },
                "use_karras_sigmas" => karras = strict_bool(k, v).map_err(bad)?,
                "use_exponential_sigmas" => exponential = strict_bool(k, v).map_err(bad)?,
                "use_beta_sigmas" => {
                    if strict_bool(k, v).map_err(bad)? {
                        return Err(bad(
                            "`use_beta_sigmas` = true is not supported: EulerDiscreteScheduler \
                             would re-space its sigmas by a beta distribution, which this engine \
                             does not implement"
                                .into(),
                        ));
                    }
                }
                "sigma_min" => spec.sigma_min = optional_positive(k, v).map_err(bad)?,
                "sigma_max" => spec.sigma_max = optional_positive(k, v).map_err(bad)?,
                "timestep_type" => {
                    spec.continuous_timesteps = match text(k, v).map_err(bad)? {
                        "discrete" => false,
                        "continuous" => true,
                        other => {
                            return Err(bad(format!(
                                "`timestep_type` `{other}` is not supported (discrete, continuous)"
                            )));
                        }
                    }
                }
                "final_sigmas_type" => {
                    spec.final_sigma_min = match text(k, v).map_err(bad)? {
                        "zero" => false,
                        "sigma_min" => true,
                        other => {
                            return Err(bad(format!(
                                "`final_sigmas_type` `{other}` is not one diffusers implements \
                                 (zero, sigma_min)"
                            )));
                        }
                    }
                }
                _ => tracing::warn!(
                    file = %source.display(),
                    key = k,
                    "scheduler config key not taken by DDIM, Euler, Euler ancestral or PNDM; \
                     ignored, as diffusers ignores it"
                ),
            }
        }
        spec.sigma_schedule = match (karras, exponential) {
            (true, true) => {
                return Err(bad(
                    "`use_karras_sigmas` and `use_exponential_sigmas` are both true; diffusers \
                     allows only one"
                        .into(),
                ));
            }
            (true, false) => SigmaSchedule::Karras,
            (false, true) => SigmaSchedule::Exponential,
            (false, false) => SigmaSchedule::Interpolated,
        };
        if let Some(betas) = &spec.trained_betas
            && betas.len() != spec.num_train_timesteps
        {
            return Err(bad(format!(
                "`trained_betas` has {} entries for {} training timesteps",
                betas.len(),
                spec.num_train_timesteps
            )));
        }
        Ok(spec)
    }
}

/// A JSON number (diffusers would fail on anything else, null included).
fn number(key: &str, v: &serde_json::Value) -> Result<f64, String> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("`{key}` must be a number, got {v}"))
}

/// A positive number or null (diffusers' `None`: derive it from the schedule).
fn optional_positive(key: &str, v: &serde_json::Value) -> Result<Option<f64>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let x = number(key, v)?;
    if x <= 0.0 {
        return Err(format!("`{key}` must be positive or null, got {v}"));
    }
    Ok(Some(x))
}

/// A JSON integer of at least `min`.
fn count(key: &str, v: &serde_json::Value, min: u64) -> Result<usize, String> {
    v.as_u64()
        .filter(|&n| n >= min)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("`{key}` must be an integer of at least {min}, got {v}"))
}

fn text<'a>(key: &str, v: &'a serde_json::Value) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("`{key}` must be a string, got {v}"))
}

/// A switch diffusers tests with Python truthiness, where null reads as false.
fn truthy(key: &str, v: &serde_json::Value) -> Result<bool, String> {
    match v {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Null => Ok(false),
        other => Err(format!("`{key}` must be true or false, got {other}")),
    }
}

/// A switch diffusers sums with its siblings (Euler's sigma schedules), where null fails.
fn strict_bool(key: &str, v: &serde_json::Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("`{key}` must be true or false, got {v}"))
}

pub fn read_scheduler(path: &Path) -> Result<SchedulerSpec, EngineError> {
    let value: serde_json::Value = read_json(path)?;
    SchedulerSpec::from_json(&value, path)
}

/// Everything about a checkpoint's shapes the engine needs, one spec per component.
#[derive(Debug, Clone)]
pub struct ModelSpecs {
    /// One per text encoder (two for SDXL), in conditioning order.
    pub text: Vec<ClipTextSpec>,
    pub unet: UNetSpec,
    pub vae: VaeSpec,
    pub scheduler: SchedulerSpec,
}

impl ModelSpecs {
    /// Reads the configs a preset's files include.
    pub fn read(
        preset: &super::preset::ModelPreset,
        files: &super::weights::ModelFiles,
    ) -> Result<Self, EngineError> {
        let mut text = vec![read_clip_text(files.path("text_encoder/config.json")?)?];
        if preset.weights.text_encoder_2.is_some() {
            text.push(read_clip_text(files.path("text_encoder_2/config.json")?)?);
        }
        Ok(Self {
            text,
            unet: read_unet(files.path("unet/config.json")?)?,
            vae: read_vae(files.path("vae/config.json")?)?,
            scheduler: read_scheduler(files.path("scheduler/scheduler_config.json")?)?,
        })
    }

    /// The real checkpoints' shapes per architecture (SD 1.5, SD 2.1 / sd-turbo, SDXL), as
    /// their config files on the Hub give them: what a random-weight benchmark runs so its
    /// arithmetic is the production model's.
    pub fn reference(arch: super::preset::Architecture) -> Self {
        use super::preset::Architecture;
        let clip_l = ClipTextSpec {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: Some(768),
        };
        let vae = |scaling_factor: f64, force_upcast: bool, sample_size: usize| VaeSpec {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor,
            force_upcast,
            use_quant_conv: true,
            use_post_quant_conv: true,
            sample_size,
        };
        let sd_unet = |heads: &str, cross: usize, linear: bool| -> UNetJson {
            let json = format!(
                r#"{{"block_out_channels":[320,640,1280,1280],
                "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
                "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
                "attention_head_dim":{heads},"cross_attention_dim":{cross},"use_linear_projection":{linear}}}"#
            );
            serde_json::from_str(&json).expect("built-in UNet config parses")
        };
        // SD 1.5's scheduler config (its PNDM class; the sd15 preset runs DDIM on it), with the
        // spacing PNDM defaults to stated, so Euler runs of a benchmark space the same way.
        let scheduler = SchedulerSpec::from_json(
            &serde_json::json!({
                "_class_name": "PNDMScheduler",
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "beta_start": 0.00085,
                "clip_sample": false,
                "num_train_timesteps": 1000,
                "set_alpha_to_one": false,
                "skip_prk_steps": true,
                "steps_offset": 1,
                "timestep_spacing": "leading",
                "trained_betas": null
            }),
            Path::new("<built-in>"),
        )
        .expect("built-in scheduler config is valid");
        let (text, unet, vae) = match arch {
            Architecture::Sd15 => (
                vec![clip_l],
                sd_unet("8", 768, false),
                vae(0.18215, false, 512),
            ),
            Architecture::Sd2 => (
                vec![ClipTextSpec {
                    hidden_size: 1024,
                    intermediate_size: 4096,
                    num_hidden_layers: 23,
                    num_attention_heads: 16,
                    hidden_act: ClipActivation::Gelu,
                    projection_dim: Some(512),
                    ..clip_l
                }],
                sd_unet("[5,10,20,20]", 1024, true),
                vae(0.18215, false, 768),
            ),
            Architecture::Sdxl => {
                let big_g = ClipTextSpec {
                    hidden_size: 1280,
                    intermediate_size: 5120,
                    num_hidden_layers: 32,
                    num_attention_heads: 20,
                    hidden_act: ClipActivation::Gelu,
                    projection_dim: Some(1280),
                    ..clip_l.clone()
                };
                let unet: UNetJson = serde_json::from_str(
                    r#"{"block_out_channels":[320,640,1280],
                    "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
                    "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
                    "attention_head_dim":[5,10,20],"transformer_layers_per_block":[1,2,10],
                    "cross_attention_dim":2048,"use_linear_projection":true,
                    "addition_embed_type":"text_time","addition_time_embed_dim":256,
                    "projection_class_embeddings_input_dim":2816}"#,
                )
                .expect("built-in SDXL UNet config parses");
                (vec![clip_l, big_g], unet, vae(0.13025, true, 1024))
            }
        };
        Self {
            text,
            unet: unet_from_json(unet, Path::new("<built-in>"))
                .expect("built-in UNet config is valid"),
            vae,
            scheduler,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> std::path::PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn sdxl_style_unet_config_maps_heads_and_layers_per_block() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(
            tmp.path(),
            r#"{"block_out_channels":[320,640,1280],
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
            "attention_head_dim":[5,10,20],"transformer_layers_per_block":[1,2,10],
            "cross_attention_dim":2048,"use_linear_projection":true,
            "addition_embed_type":"text_time","addition_time_embed_dim":256,
            "projection_class_embeddings_input_dim":2816}"#,
        );
        let spec = read_unet(&p).unwrap();
        let b = &spec.config.blocks;
        assert_eq!(b[0].use_cross_attn, None);
        assert_eq!(b[1].use_cross_attn, Some(2));
        assert_eq!(b[2].use_cross_attn, Some(10));
        assert_eq!(b[2].attention_head_dim, 20);
        assert_eq!(
            spec.text_time,
            Some(TextTimeSpec {
                time_embed_dim: 256,
                input_dim: 2816
            })
        );
    }

    #[test]
    fn unet_config_with_unknown_block_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(
            tmp.path(),
            r#"{"block_out_channels":[32],"down_block_types":["SimpleCrossAttnDownBlock2D"],
            "up_block_types":["UpBlock2D"],"cross_attention_dim":32}"#,
        );
        let err = read_unet(&p).unwrap_err().to_string();
        assert!(err.contains("SimpleCrossAttnDownBlock2D"), "{err}");
    }

    #[test]
    fn reference_specs_are_consistent_per_architecture() {
        use crate::engine::preset::Architecture;
        for arch in [Architecture::Sd15, Architecture::Sd2, Architecture::Sdxl] {
            let s = ModelSpecs::reference(arch);
            let width: usize = s.text.iter().map(|t| t.hidden_size).sum();
            assert_eq!(width, s.unet.config.cross_attention_dim, "{arch:?}");
            assert_eq!(s.vae.scale(), 8);
        }
    }

    #[test]
    fn scheduler_config_rejects_unsupported_prediction() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), r#"{"prediction_type":"flow"}"#);
        let err = read_scheduler(&p).unwrap_err().to_string();
        assert!(err.contains("`prediction_type` `flow`"), "{err}");
        assert!(err.contains(&p.display().to_string()), "{err}");
    }

    #[test]
    fn scheduler_defaults_are_the_class_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let p = write(tmp.path(), r#"{"_class_name":"DDIMScheduler"}"#);
        let s = read_scheduler(&p).unwrap();
        assert_eq!(s.num_train_timesteps, 1000);
        assert_eq!((s.beta_start, s.beta_end), (0.0001, 0.02));
        assert_eq!(s.beta_schedule, BetaSchedule::Linear);
        assert_eq!(
            s.timestep_spacing_for(SchedulerClass::Ddim),
            TimestepSpacing::Leading
        );
        assert_eq!(
            s.timestep_spacing_for(SchedulerClass::EulerDiscrete),
            TimestepSpacing::Linspace
        );
        assert!(s.ddim_clip_sample() && s.ddim_set_alpha_to_one());
        // A class without DDIM's switches leaves them off; PNDM has `set_alpha_to_one`.
        let p = write(tmp.path(), r#"{"_class_name":"EulerDiscreteScheduler"}"#);
        let s = read_scheduler(&p).unwrap();
        assert!(!s.ddim_clip_sample() && !s.ddim_set_alpha_to_one());
        let p = write(tmp.path(), r#"{"_class_name":"PNDMScheduler"}"#);
        let s = read_scheduler(&p).unwrap();
        assert!(!s.ddim_clip_sample() && s.ddim_set_alpha_to_one());
        // What the file says wins, whichever class wrote it.
        let p = write(
            tmp.path(),
            r#"{"_class_name":"PNDMScheduler","clip_sample":false,"set_alpha_to_one":false}"#,
        );
        let s = read_scheduler(&p).unwrap();
        assert!(!s.ddim_clip_sample() && !s.ddim_set_alpha_to_one());
    }

    #[test]
    fn scheduler_refusals_name_the_key_and_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        for (json, key) in [
            (r#"{"thresholding":true}"#, "`thresholding`"),
            (r#"{"use_beta_sigmas":true}"#, "`use_beta_sigmas`"),
            (
                r#"{"interpolation_type":"log_linear"}"#,
                "`interpolation_type`",
            ),
            (r#"{"_class_name":"LCMScheduler"}"#, "`_class_name`"),
            (r#"{"trained_betas":[0.1,0.2]}"#, "`trained_betas`"),
            (r#"{"steps_offset":-1}"#, "`steps_offset`"),
        ] {
            let p = write(tmp.path(), json);
            let err = read_scheduler(&p).unwrap_err();
            assert_eq!(err.kind(), "config");
            assert!(!err.is_retryable());
            let msg = err.to_string();
            assert!(msg.contains(key), "{json}: {msg}");
            assert!(msg.contains(&p.display().to_string()), "{json}: {msg}");
        }
        // Off values of the same keys, and keys no class takes, are accepted.
        let p = write(
            tmp.path(),
            r#"{"thresholding":false,"use_beta_sigmas":false,"interpolation_type":"linear",
                "skip_prk_steps":true,"_diffusers_version":"0.6.0","tensor_format":"pt"}"#,
        );
        read_scheduler(&p).unwrap();
    }
}
