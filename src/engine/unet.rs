//! The conditional UNet: our resnets, samplers and blocks ([`super::layers`]: the CPU conv and
//! group-norm kernels live there), our transformer blocks ([`super::attention`]: attention in
//! bounded memory), candle's timestep embeddings.
//!
//! candle's `UNet2DConditionModel` computes the timestep embedding once per batch row. Every
//! row holds the same timestep, but the small matmuls that embed it run different CPU kernels
//! for different row counts (gemm picks its kernel by `m`), so image *i* of a batch came out a
//! few 1e-6 off the same image generated alone — enough to flip pixels at rounding edges. This
//! UNet embeds the timestep once (`[1, d]`) and lets the resnets broadcast it, which makes a
//! batch bit-identical to single runs on the CPU. Block layout, names and arithmetic are
//! otherwise diffusers' (the agreement tests hold it to the reference).
//!
//! It also implements SDXL's `text_time` added conditioning, which candle's UNet lacks: the
//! pooled text embedding and six size/crop ids, embedded and added to the timestep embedding.
//! That embedding differs per image, so SDXL batches match single runs to float tolerance
//! rather than bit for bit.

use super::attention::{SpatialTransformer, TransformerConfig};
use super::config::TextTimeSpec;
use super::layers::{Conv2d, Downsample, GroupNorm, ResnetBlock, ResnetConfig, Upsample};
use super::motion::{MotionAdapter, TemporalTransformer};
use candle_core::{D, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};

/// A level's motion modules and the frames per clip, when the UNet runs with an adapter.
type Temporal<'a> = Option<(&'a [TemporalTransformer], usize)>;

fn temporal(xs: Tensor, t: Temporal<'_>, j: usize) -> candle_core::Result<Tensor> {
    match t.and_then(|(m, f)| m.get(j).map(|m| (m, f))) {
        Some((m, frames)) => m.forward(&xs, frames),
        None => Ok(xs),
    }
}

/// A down block: resnets, each followed by a transformer when the level has cross-attention
/// (`CrossAttnDownBlock2D`) or not (`DownBlock2D`), then an optional stride-2 downsampler.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    down: Option<Downsample>,
}

impl DownBlock {
    /// The output and the skip connections it leaves for the up path.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        motion: Temporal<'_>,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut xs = xs.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, context)?;
            }
            xs = temporal(xs, motion, j)?;
            skips.push(xs.clone());
        }
        if let Some(d) = &self.down {
            xs = d.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok((xs, skips))
    }
}

/// An up block: per resnet, the matching skip concatenated on the channels, the resnet and
/// its transformer (`CrossAttnUpBlock2D`, or none: `UpBlock2D`), then an optional upsampler.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    up: Option<Upsample>,
}

impl UpBlock {
    fn forward(
        &self,
        xs: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        size: Option<(usize, usize)>,
        context: &Tensor,
        motion: Temporal<'_>,
    ) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for (j, r) in self.resnets.iter().enumerate() {
            xs = Tensor::cat(&[&xs, &skips[skips.len() - j - 1]], 1)?;
            xs = r.forward(&xs, Some(temb))?;
            if let Some(a) = self.attentions.get(j) {
                xs = a.forward(&xs, context)?;
            }
            xs = temporal(xs, motion, j)?;
        }
        match &self.up {
            Some(u) => u.forward(&xs, size),
            None => Ok(xs),
        }
    }
}

/// resnet, then (transformer, resnet) per layer, at the lowest resolution.
#[derive(Debug)]
struct MidBlock {
    resnet: ResnetBlock,
    pairs: Vec<(SpatialTransformer, ResnetBlock)>,
}

/// SDXL's added conditioning inputs, one row per UNet batch row.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled, projected text embedding of the second encoder, `[b, d]`.
    pub text_embeds: Tensor,
    /// `[b, 6]`: original height, width, crop top, crop left, target height, width.
    pub time_ids: Tensor,
}

#[derive(Debug)]
struct TextTime {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

/// diffusers' `UNet2DConditionModel`, optionally with `text_time` added conditioning.
#[derive(Debug)]
pub struct UNet {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTime>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionModelConfig,
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::new(vb, cin, cout, 3, 1, 1)
}

impl UNet {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: UNet2DConditionModelConfig,
        text_time: Option<TextTimeSpec>,
    ) -> candle_core::Result<Self> {
        let blocks = &config.blocks;
        let n = blocks.len();
        if n == 0 {
            candle_core::bail!("a UNet needs at least one block");
        }
        let first = blocks[0].out_channels;
        let last = blocks[n - 1];
        let temb = first * 4;
        let conv_in = conv3(in_channels, first, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(first, config.flip_sin_to_cos, config.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), first, temb)?;
        let text_time = match text_time {
            Some(spec) => Some(TextTime {
                time_proj: Timesteps::new(
                    spec.time_embed_dim,
                    config.flip_sin_to_cos,
                    config.freq_shift,
                ),
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), spec.input_dim, temb)?,
            }),
            None => None,
        };

        let resnet = |vb: VarBuilder, cin: usize, cout: usize, scale: f64| {
            ResnetBlock::new(
                vb,
                ResnetConfig {
                    cin,
                    cout,
                    temb: Some(temb),
                    groups: config.norm_num_groups,
                    eps: config.norm_eps,
                    output_scale_factor: scale,
                },
            )
        };
        // `attention_head_dim` is candle's (and old diffusers configs') head count per level.
        let transformer = |vb: VarBuilder, c: usize, b: &BlockConfig, depth: usize| {
            let heads = b.attention_head_dim;
            SpatialTransformer::new(
                vb,
                TransformerConfig {
                    channels: c,
                    heads,
                    head_dim: c / heads,
                    depth,
                    groups: config.norm_num_groups,
                    context_dim: config.cross_attention_dim,
                    linear_projection: config.use_linear_projection,
                },
            )
        };

        let mut down = Vec::with_capacity(n);
        for (i, b) in blocks.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let mut cin = if i == 0 {
                first
            } else {
                blocks[i - 1].out_channels
            };
            let out = b.out_channels;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..config.layers_per_block {
                resnets.push(resnet(vbi.pp(format!("resnets.{j}")), cin, out, 1.0)?);
                if let Some(depth) = b.use_cross_attn {
                    attentions.push(transformer(
                        vbi.pp(format!("attentions.{j}")),
                        out,
                        b,
                        depth,
                    )?);
                }
                cin = out;
            }
            let down_sampler = if i + 1 < n {
                Some(Downsample::new(
                    vbi.pp("downsamplers.0"),
                    out,
                    config.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                down: down_sampler,
            });
        }

        let c = last.out_channels;
        let vbm = vb.pp("mid_block");
        let scale = config.mid_block_scale_factor;
        let depth = last.use_cross_attn.unwrap_or(1);
        let mid = MidBlock {
            resnet: resnet(vbm.pp("resnets.0"), c, c, scale)?,
            pairs: vec![(
                transformer(vbm.pp("attentions.0"), c, &last, depth)?,
                resnet(vbm.pp("resnets.1"), c, c, scale)?,
            )],
        };

        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let b: BlockConfig = blocks[n - 1 - i];
            let prev = if i == 0 {
                last.out_channels
            } else {
                blocks[n - i].out_channels
            };
            // The skip connections of this level come from the block below in the down path.
            let skip = blocks[if i == n - 1 { 0 } else { n - i - 2 }].out_channels;
            let out = b.out_channels;
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let layers = config.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let res_skip = if j == layers - 1 { skip } else { out };
                let cin = if j == 0 { prev } else { out };
                resnets.push(resnet(
                    vbi.pp(format!("resnets.{j}")),
                    cin + res_skip,
                    out,
                    1.0,
                )?);
                if let Some(depth) = b.use_cross_attn {
                    attentions.push(transformer(
                        vbi.pp(format!("attentions.{j}")),
                        out,
                        &b,
                        depth,
                    )?);
                }
            }
            let up_sampler = if i + 1 < n {
                Some(Upsample::new(vbi.pp("upsamplers.0"), out)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                up: up_sampler,
            });
        }
        let norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            config.norm_num_groups,
            first,
            config.norm_eps,
        )?;
        let conv_out = conv3(first, out_channels, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            down,
            mid,
            up,
            norm_out,
            conv_out,
            config,
        })
    }

    /// Whether the model needs [`AddedCond`] (SDXL).
    pub fn needs_added_cond(&self) -> bool {
        self.text_time.is_some()
    }

    /// Predicts the noise (or v) of `xs` `[b, c, h, w]` at `timestep`, conditioned on
    /// `context` `[b, tokens, cross_attention_dim]` (and `added` for SDXL).
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> candle_core::Result<Tensor> {
        self.forward_with(xs, timestep, context, added, None)
    }

    /// diffusers' `UNetMotionModel`: this UNet with `adapter`'s motion modules, on clips of
    /// `frames` consecutive rows of `xs` `[clips·frames, c, h, w]`; `context` has one row per
    /// frame (as the pipeline repeats it). The timestep embedding is the same for every frame,
    /// so it stays one broadcast row.
    pub fn forward_motion(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        adapter: &MotionAdapter,
        frames: usize,
    ) -> candle_core::Result<Tensor> {
        if adapter.down.len() != self.down.len() || adapter.up.len() != self.up.len() {
            candle_core::bail!(
                "the motion adapter has {} levels, the UNet {}",
                adapter.down.len(),
                self.down.len()
            );
        }
        self.forward_with(xs, timestep, context, None, Some((adapter, frames)))
    }

    fn forward_with(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
        motion: Option<(&MotionAdapter, usize)>,
    ) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let n = self.config.blocks.len();
        let factor = 1usize << (n - 1);
        let odd_size = h % factor != 0 || w % factor != 0;
        let xs = if self.config.center_input_sample {
            xs.affine(2.0, -1.0)?
        } else {
            xs.clone()
        };
        // One row for the whole batch: see the module header.
        let t = (Tensor::ones(1, xs.dtype(), xs.device())? * timestep)?;
        let mut emb = self.time_embedding.forward(&self.time_proj.forward(&t)?)?;
        match (&self.text_time, added) {
            (None, _) => {}
            (Some(tt), Some(added)) => {
                let b = added.time_ids.dim(0)?;
                let ids = added.time_ids.to_dtype(xs.dtype())?.flatten_all()?;
                let time_embeds = tt.time_proj.forward(&ids)?.reshape((b, ()))?;
                let input = Tensor::cat(
                    &[&added.text_embeds.to_dtype(xs.dtype())?, &time_embeds],
                    D::Minus1,
                )?;
                emb = emb.broadcast_add(&tt.embedding.forward(&input)?)?;
            }
            (Some(_), None) => {
                candle_core::bail!("this UNet needs the pooled text embedding and time ids (SDXL)")
            }
        }

        let xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        let mut xs = xs;
        for (i, block) in self.down.iter().enumerate() {
            let m = motion.map(|(a, f)| (a.down[i].as_slice(), f));
            let (out, res) = block.forward(&xs, &emb, context, m)?;
            skips.extend(res);
            xs = out;
        }
        let mut xs = self.mid.resnet.forward(&xs, Some(&emb))?;
        let mid_motion = motion.map(|(a, f)| (a.mid.as_slice(), f));
        for (k, (attn, resnet)) in self.mid.pairs.iter().enumerate() {
            let xa = temporal(attn.forward(&xs, context)?, mid_motion, k)?;
            xs = resnet.forward(&xa, Some(&emb))?;
        }
        for (i, block) in self.up.iter().enumerate() {
            let res = skips.split_off(skips.len() - block.resnets.len());
            // Sizes that don't halve evenly need the skip's size when upsampling.
            let target = match (odd_size && i + 1 < n, skips.last()) {
                (true, Some(s)) => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            let m = motion.map(|(a, f)| (a.up[i].as_slice(), f));
            xs = block.forward(&xs, &res, &emb, target, context, m)?;
        }
        let xs = self.norm_out.forward(&xs, true)?;
        let out = self.conv_out.forward(&xs)?;
        debug_assert_eq!(out.dim(D::Minus1)?, w);
        Ok(out)
    }
}
