//! Reading the `config.json` files diffusers and transformers write, into the engine's configs.
//!
//! The checkpoint's own config is the truth about its shape; presets only choose how to run it.
//! Each reader accepts the keys real SD 1.5 / 2.1 / SDXL repos use and rejects what the engine
//! can't run (an unknown block type) with the file and the reason, instead of building a
//! network that silently loads the wrong tensors.

use std::path::Path;

use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::EngineError;

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

/// The parts of `scheduler_config.json` that every scheduler shares.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerSpec {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "beta_start")]
    pub beta_start: f64,
    #[serde(default = "beta_end")]
    pub beta_end: f64,
    #[serde(default = "scaled_linear")]
    pub beta_schedule: String,
    #[serde(default = "leading")]
    pub timestep_spacing: String,
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub set_alpha_to_one: bool,
}

fn thousand() -> usize {
    1000
}
fn beta_start() -> f64 {
    0.00085
}
fn beta_end() -> f64 {
    0.012
}
fn scaled_linear() -> String {
    "scaled_linear".into()
}
fn leading() -> String {
    "leading".into()
}
fn epsilon() -> String {
    "epsilon".into()
}

pub fn read_scheduler(path: &Path) -> Result<SchedulerSpec, EngineError> {
    let spec: SchedulerSpec = read_json(path)?;
    let bad = |message: String| EngineError::Config {
        path: path.to_path_buf(),
        message,
    };
    if !matches!(spec.beta_schedule.as_str(), "scaled_linear" | "linear") {
        return Err(bad(format!(
            "beta_schedule `{}` is not supported (scaled_linear, linear)",
            spec.beta_schedule
        )));
    }
    if !matches!(spec.prediction_type.as_str(), "epsilon" | "v_prediction") {
        return Err(bad(format!(
            "prediction_type `{}` is not supported (epsilon, v_prediction)",
            spec.prediction_type
        )));
    }
    if !matches!(
        spec.timestep_spacing.as_str(),
        "leading" | "trailing" | "linspace"
    ) {
        return Err(bad(format!(
            "timestep_spacing `{}` is not supported",
            spec.timestep_spacing
        )));
    }
    Ok(spec)
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
        let scheduler: SchedulerSpec =
            serde_json::from_str(r#"{"steps_offset":1}"#).expect("built-in scheduler config");
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
        let p = write(tmp.path(), r#"{"prediction_type":"sample"}"#);
        assert!(
            read_scheduler(&p)
                .unwrap_err()
                .to_string()
                .contains("sample")
        );
        let p = write(tmp.path(), r#"{"_class_name":"DDIMScheduler"}"#);
        let s = read_scheduler(&p).unwrap();
        assert_eq!(s.num_train_timesteps, 1000);
        assert_eq!(s.timestep_spacing, "leading");
    }
}
