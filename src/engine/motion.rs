//! AnimateDiff's motion modules: diffusers' `MotionAdapter` (its `AnimateDiffTransformer3D`
//! blocks), read from a diffusers-format adapter and run inside our UNet
//! ([`super::unet::UNet::forward_motion`]) the way `UNetMotionModel` runs them.
//!
//! A motion module attends along time only: the frames of one clip sit in the batch
//! (`[clips·frames, c, h, w]`), every latent pixel of a clip becomes one sequence of `frames`
//! tokens, and two self-attentions with a sinusoidal position table mix the frames. Its group
//! norm takes its statistics over all frames of the clip at once (diffusers normalises the
//! `[b, c, f, h, w]` tensor), which is why a clip can't be split across batches.
//!
//! Where the modules go: after every resnet (and its spatial transformer) of each down block,
//! after the mid block's transformer, and after every resnet of each up block (one more per up
//! block than per down block, as the UNet has). An adapter fits a base when its channels and
//! layers per level are the base UNet's; [`MotionAdapter::check_fits`] says why not otherwise.

use std::path::Path;

use candle_core::{Module, Result as CandleResult, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

use super::EngineError;
use super::attention::BasicTransformerBlock;
use super::layers::GroupNorm;

/// The shape of a motion adapter (`MotionAdapter`'s config, defaults as diffusers').
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotionSpec {
    pub block_out_channels: Vec<usize>,
    /// Motion modules per down level (the up level has one more).
    pub layers_per_block: Vec<usize>,
    /// Transformer blocks inside each motion module, per level.
    pub transformer_layers_per_block: Vec<usize>,
    /// `None`: no motion module in the mid block.
    pub mid_layers: Option<usize>,
    pub transformer_layers_per_mid_block: usize,
    pub heads: Vec<usize>,
    pub norm_groups: usize,
    /// The most frames a clip may have: the length of the position table.
    pub max_frames: usize,
}

impl MotionSpec {
    /// diffusers' `MotionAdapter()` defaults: the SD 1.5 adapters (v1-5-2, v1-5-3,
    /// AnimateDiff-Lightning) have exactly this shape. Lightning ships weights without a
    /// config, which diffusers' own model card loads into `MotionAdapter()` too.
    pub fn sd15() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            transformer_layers_per_block: vec![1; 4],
            mid_layers: Some(1),
            transformer_layers_per_mid_block: 1,
            heads: vec![8; 4],
            norm_groups: 32,
            max_frames: 32,
        }
    }

    /// Reads a diffusers `MotionAdapter` `config.json`.
    pub fn read(path: &Path) -> Result<Self, EngineError> {
        let bad = |message: String| EngineError::Config {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        Self::from_json(&v).map_err(bad)
    }

    /// The config as JSON; missing keys take diffusers' defaults.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let d = Self::sd15();
        if let Some(class) = v.get("_class_name").and_then(Value::as_str)
            && class != "MotionAdapter"
        {
            return Err(format!("_class_name is {class}, not MotionAdapter"));
        }
        if v.get("conv_in_channels").is_some_and(|c| !c.is_null()) {
            return Err(
                "conv_in_channels is set: PIA-style adapters (an extra conv_in) \
                        are not supported"
                    .into(),
            );
        }
        let channels = match v.get("block_out_channels") {
            None => d.block_out_channels.clone(),
            Some(c) => list_of_usize(c, "block_out_channels")?,
        };
        let n = channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        let per_level = |key: &str, default: usize| -> Result<Vec<usize>, String> {
            match v.get(key) {
                None => Ok(vec![default; n]),
                Some(Value::Number(x)) => Ok(vec![as_usize(x, key)?; n]),
                Some(list @ Value::Array(items)) => {
                    if items.len() != n {
                        return Err(format!("{key} has {} entries for {n} levels", items.len()));
                    }
                    if items.iter().any(Value::is_array) {
                        return Err(format!(
                            "{key}: per-layer lists inside a level are not supported"
                        ));
                    }
                    list_of_usize(list, key)
                }
                Some(other) => Err(format!("{key} must be a number or a list, got {other}")),
            }
        };
        let scalar = |key: &str, default: usize| -> Result<usize, String> {
            match v.get(key) {
                None => Ok(default),
                Some(Value::Number(x)) => as_usize(x, key),
                Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
                    Value::Number(x) => as_usize(x, key),
                    other => Err(format!("{key} must be a number, got {other}")),
                },
                Some(other) => Err(format!("{key} must be a number, got {other}")),
            }
        };
        let use_mid = v
            .get("use_motion_mid_block")
            .map(|b| b.as_bool().ok_or("use_motion_mid_block must be a boolean"))
            .transpose()?
            .unwrap_or(true);
        let spec = Self {
            layers_per_block: per_level("motion_layers_per_block", 2)?,
            transformer_layers_per_block: per_level("motion_transformer_layers_per_block", 1)?,
            mid_layers: match use_mid {
                true => Some(scalar("motion_mid_block_layers_per_block", 1)?),
                false => None,
            },
            transformer_layers_per_mid_block: scalar("motion_transformer_layers_per_mid_block", 1)?,
            heads: per_level("motion_num_attention_heads", 8)?,
            norm_groups: scalar("motion_norm_num_groups", 32)?,
            max_frames: scalar("motion_max_seq_length", 32)?,
            block_out_channels: channels,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&self.heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(format!(
                    "level {i}: {c} channels do not split into {h} heads"
                ));
            }
            if self.norm_groups == 0 || c % self.norm_groups != 0 {
                return Err(format!(
                    "level {i}: {c} channels do not split into {} groups",
                    self.norm_groups
                ));
            }
        }
        if self.max_frames < 2 {
            return Err(format!(
                "motion_max_seq_length {} leaves no room for a clip",
                self.max_frames
            ));
        }
        Ok(())
    }
}

fn as_usize(x: &serde_json::Number, key: &str) -> Result<usize, String> {
    x.as_u64()
        .map(|u| u as usize)
        .ok_or_else(|| format!("{key} must be a non-negative integer, got {x}"))
}

fn list_of_usize(v: &Value, key: &str) -> Result<Vec<usize>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| format!("{key} must be a list"))?;
    items
        .iter()
        .map(|i| match i {
            Value::Number(x) => as_usize(x, key),
            other => Err(format!("{key} entries must be integers, got {other}")),
        })
        .collect()
}

/// diffusers' `AnimateDiffTransformer3D`: group norm over the clip, frames as tokens, temporal
/// transformer blocks, residual.
#[derive(Debug)]
pub struct TemporalTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl TemporalTransformer {
    fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
        groups: usize,
        max_frames: usize,
    ) -> CandleResult<Self> {
        let head_dim = channels / heads;
        let inner = heads * head_dim;
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::temporal(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    heads,
                    head_dim,
                    max_frames,
                )
            })
            .collect::<CandleResult<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), groups, channels, 1e-6)?,
            proj_in: candle_nn::linear(channels, inner, vb.pp("proj_in"))?,
            blocks,
            proj_out: candle_nn::linear(inner, channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs` `[clips·frames, c, h, w]`, frames of a clip consecutive.
    pub fn forward(&self, xs: &Tensor, frames: usize) -> CandleResult<Tensor> {
        let (bf, c, h, w) = xs.dims4()?;
        if frames == 0 || bf % frames != 0 {
            candle_core::bail!("a batch of {bf} rows is not whole clips of {frames} frames");
        }
        let b = bf / frames;
        // [b, f, c, h, w] -> [b, c, f, h, w]: the norm's groups span every frame of the clip.
        let clip = xs
            .reshape((b, frames, c, h, w))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((b, c, frames * h, w))?;
        let normed = self.norm.forward(&clip, false)?;
        // -> [b, h, w, f, c] -> one sequence of `frames` tokens per latent pixel.
        let tokens = normed
            .reshape((b, c, frames, h, w))?
            .permute((0, 3, 4, 2, 1))?
            .contiguous()?
            .reshape((b * h * w, frames, c))?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, None)?;
        }
        let out = self
            .proj_out
            .forward(&tokens)?
            .reshape((b, h, w, frames, c))?
            .permute((0, 3, 4, 1, 2))?
            .contiguous()?
            .reshape((bf, c, h, w))?;
        out + xs
    }
}

/// A loaded motion adapter: per level of the UNet, its modules.
#[derive(Debug)]
pub struct MotionAdapter {
    pub(crate) down: Vec<Vec<TemporalTransformer>>,
    pub(crate) mid: Vec<TemporalTransformer>,
    /// In the UNet's up order (deepest level first).
    pub(crate) up: Vec<Vec<TemporalTransformer>>,
    spec: MotionSpec,
}

impl MotionAdapter {
    /// Builds the adapter from `vb` (a diffusers `MotionAdapter` state dict's names).
    pub fn new(vb: VarBuilder, spec: MotionSpec) -> CandleResult<Self> {
        let n = spec.block_out_channels.len();
        let module = |vb: VarBuilder, level: usize, depth: usize| {
            TemporalTransformer::new(
                vb,
                spec.block_out_channels[level],
                spec.heads[level],
                depth,
                spec.norm_groups,
                spec.max_frames,
            )
        };
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let vbi = vb.pp(format!("down_blocks.{i}.motion_modules"));
            down.push(
                (0..spec.layers_per_block[i])
                    .map(|j| module(vbi.pp(j), i, spec.transformer_layers_per_block[i]))
                    .collect::<CandleResult<Vec<_>>>()?,
            );
        }
        let mid = match spec.mid_layers {
            Some(layers) => {
                let vbm = vb.pp("mid_block.motion_modules");
                (0..layers)
                    .map(|j| module(vbm.pp(j), n - 1, spec.transformer_layers_per_mid_block))
                    .collect::<CandleResult<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let level = n - 1 - i;
            let vbi = vb.pp(format!("up_blocks.{i}.motion_modules"));
            up.push(
                (0..spec.layers_per_block[level] + 1)
                    .map(|j| module(vbi.pp(j), level, spec.transformer_layers_per_block[level]))
                    .collect::<CandleResult<Vec<_>>>()?,
            );
        }
        Ok(Self {
            down,
            mid,
            up,
            spec,
        })
    }

    pub fn spec(&self) -> &MotionSpec {
        &self.spec
    }

    /// Whether this adapter's modules go where `unet` has layers; the reason when not.
    pub fn check_fits(
        spec: &MotionSpec,
        unet: &candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModelConfig,
    ) -> Result<(), String> {
        let base: Vec<usize> = unet.blocks.iter().map(|b| b.out_channels).collect();
        if base != spec.block_out_channels {
            return Err(format!(
                "the adapter is for UNet levels of {:?} channels, the base has {base:?}",
                spec.block_out_channels
            ));
        }
        if let Some(l) = spec
            .layers_per_block
            .iter()
            .find(|&&l| l != unet.layers_per_block)
        {
            return Err(format!(
                "the adapter has {l} motion layers per level, the base UNet {} layers per block",
                unet.layers_per_block
            ));
        }
        if spec.mid_layers.is_some_and(|m| m > 1) {
            return Err(
                "the adapter has more than one mid-block motion layer; the base's mid \
                        block has one transformer"
                    .into(),
            );
        }
        Ok(())
    }
}
