//! The conditional UNet, assembled from candle's public Stable Diffusion blocks.
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

use super::config::TextTimeSpec;
use candle_core::{D, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    CrossAttnDownBlock2D, CrossAttnDownBlock2DConfig, CrossAttnUpBlock2D, CrossAttnUpBlock2DConfig,
    DownBlock2D, DownBlock2DConfig, UNetMidBlock2DCrossAttn, UNetMidBlock2DCrossAttnConfig,
    UpBlock2D, UpBlock2DConfig,
};

#[derive(Debug)]
enum Down {
    Plain(DownBlock2D),
    Cross(CrossAttnDownBlock2D),
}

#[derive(Debug)]
enum Up {
    Plain(UpBlock2D),
    Cross(CrossAttnUpBlock2D),
}

impl Up {
    fn resnet_count(&self) -> usize {
        match self {
            Up::Plain(b) => b.resnets.len(),
            Up::Cross(b) => b.upblock.resnets.len(),
        }
    }
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
    down: Vec<Down>,
    mid: UNetMidBlock2DCrossAttn,
    up: Vec<Up>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionModelConfig,
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, 3, cfg, vb)
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

        let mut down = Vec::with_capacity(n);
        for (i, b) in blocks.iter().enumerate() {
            let cin = if i == 0 {
                first
            } else {
                blocks[i - 1].out_channels
            };
            let base = DownBlock2DConfig {
                num_layers: config.layers_per_block,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_downsample: i + 1 < n,
                downsample_padding: config.downsample_padding,
                ..Default::default()
            };
            let vbi = vb.pp(format!("down_blocks.{i}"));
            down.push(match b.use_cross_attn {
                Some(layers) => Down::Cross(CrossAttnDownBlock2D::new(
                    vbi,
                    cin,
                    b.out_channels,
                    Some(temb),
                    false,
                    CrossAttnDownBlock2DConfig {
                        downblock: base,
                        attn_num_head_channels: b.attention_head_dim,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: config.sliced_attention_size,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: layers,
                    },
                )?),
                None => Down::Plain(DownBlock2D::new(
                    vbi,
                    cin,
                    b.out_channels,
                    Some(temb),
                    base,
                )?),
            });
        }

        let mid = UNetMidBlock2DCrossAttn::new(
            vb.pp("mid_block"),
            last.out_channels,
            Some(temb),
            false,
            UNetMidBlock2DCrossAttnConfig {
                resnet_eps: config.norm_eps,
                output_scale_factor: config.mid_block_scale_factor,
                cross_attn_dim: config.cross_attention_dim,
                attn_num_head_channels: last.attention_head_dim,
                resnet_groups: Some(config.norm_num_groups),
                use_linear_projection: config.use_linear_projection,
                transformer_layers_per_block: last.use_cross_attn.unwrap_or(1),
                ..Default::default()
            },
        )?;

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
            let base = UpBlock2DConfig {
                num_layers: config.layers_per_block + 1,
                resnet_eps: config.norm_eps,
                resnet_groups: config.norm_num_groups,
                add_upsample: i + 1 < n,
                ..Default::default()
            };
            let vbi = vb.pp(format!("up_blocks.{i}"));
            up.push(match b.use_cross_attn {
                Some(layers) => Up::Cross(CrossAttnUpBlock2D::new(
                    vbi,
                    skip,
                    prev,
                    b.out_channels,
                    Some(temb),
                    false,
                    CrossAttnUpBlock2DConfig {
                        upblock: base,
                        attn_num_head_channels: b.attention_head_dim,
                        cross_attention_dim: config.cross_attention_dim,
                        sliced_attention_size: config.sliced_attention_size,
                        use_linear_projection: config.use_linear_projection,
                        transformer_layers_per_block: layers,
                    },
                )?),
                None => Up::Plain(UpBlock2D::new(
                    vbi,
                    skip,
                    prev,
                    b.out_channels,
                    Some(temb),
                    base,
                )?),
            });
        }
        let norm_out = candle_nn::group_norm(
            config.norm_num_groups,
            first,
            config.norm_eps,
            vb.pp("conv_norm_out"),
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
        for block in &self.down {
            let (out, res) = match block {
                Down::Plain(b) => b.forward(&xs, Some(&emb))?,
                Down::Cross(b) => b.forward(&xs, Some(&emb), Some(context))?,
            };
            skips.extend(res);
            xs = out;
        }
        let mut xs = self.mid.forward(&xs, Some(&emb), Some(context))?;
        for (i, block) in self.up.iter().enumerate() {
            let res = skips.split_off(skips.len() - block.resnet_count());
            // Sizes that don't halve evenly need the skip's size when upsampling.
            let target = match (odd_size && i + 1 < n, skips.last()) {
                (true, Some(s)) => {
                    let (_, _, sh, sw) = s.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = match block {
                Up::Plain(b) => b.forward(&xs, &res, Some(&emb), target)?,
                Up::Cross(b) => b.forward(&xs, &res, Some(&emb), target, Some(context))?,
            };
        }
        let xs = candle_nn::ops::silu(&self.norm_out.forward(&xs)?)?;
        let out = self.conv_out.forward(&xs)?;
        debug_assert_eq!(out.dim(D::Minus1)?, w);
        Ok(out)
    }
}
