//! The KL autoencoder: pixels ↔ latents.
//!
//! Assembled from candle's public VAE blocks rather than candle's `AutoEncoderKL`, for two
//! reasons. img2img needs the latent distribution's mean and std to draw the latent with *this
//! image's* seeded noise, and candle keeps those private and samples with an unseeded RNG. And
//! candle 0.11's VAE attention block feeds a transposed, non-contiguous activation to `Linear`,
//! whose broadcast-matmul path on the CPU then computes image 1.. of a batch from the wrong
//! rows (batch 2 decodes differ from single decodes by up to ~1.0); the mid block here makes
//! the activation contiguous first, so a batch decodes each image exactly as alone. The layout
//! and names are diffusers' `AutoencoderKL`.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};

use super::config::VaeSpec;

const EPS: f64 = 1e-6;

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    candle_nn::conv2d(cin, cout, 3, cfg, vb)
}

/// A projection stored as `[c, c]` (diffusers) or `[c, c, 1, 1]` (old conv-style checkpoints).
fn projection(c: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let weight = match vb.get((c, c), "weight") {
        Ok(w) => w,
        Err(_) => vb.get((c, c, 1, 1), "weight")?.reshape((c, c))?,
    };
    Ok(Linear::new(weight, Some(vb.get(c, "bias")?)))
}

/// Single-head self-attention over the pixels of the lowest resolution.
#[derive(Debug)]
struct Attention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl Attention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        Ok(Self {
            norm: candle_nn::group_norm(groups, c, EPS, vb.pp("group_norm"))?,
            q: projection(c, vb.pp(names[0]))?,
            k: projection(c, vb.pp(names[1]))?,
            v: projection(c, vb.pp(names[2]))?,
            out: projection(c, vb.pp(names[3]))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        // Contiguous before the projections: see the module header.
        let x = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let dtype = x.dtype();
        let q = self.q.forward(&x)?.to_dtype(DType::F32)?;
        let k = self.k.forward(&x)?.to_dtype(DType::F32)?;
        let v = self.v.forward(&x)?.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? / (c as f64).sqrt())?;
        // diffusers upcasts this softmax; so do we.
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attended = probs.matmul(&v)?.to_dtype(dtype)?;
        let out = self
            .out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// resnet → attention → resnet, at the lowest resolution.
#[derive(Debug)]
struct MidBlock {
    res0: ResnetBlock2D,
    attn: Attention,
    res1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        let cfg = ResnetBlock2DConfig {
            groups,
            eps: EPS,
            temb_channels: None,
            output_scale_factor: 1.,
            ..Default::default()
        };
        Ok(Self {
            res0: ResnetBlock2D::new(vb.pp("resnets.0"), c, cfg)?,
            attn: Attention::new(vb.pp("attentions.0"), c, groups)?,
            res1: ResnetBlock2D::new(vb.pp("resnets.1"), c, cfg)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.res0.forward(xs, None)?;
        let xs = self.attn.forward(&xs)?;
        self.res1.forward(&xs, None)
    }
}

fn mid_block(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<MidBlock> {
    MidBlock::new(vb, channels, groups)
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownEncoderBlock2D>,
    mid: MidBlock,
    norm: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, spec: &VaeSpec) -> candle_core::Result<Self> {
        let ch = &spec.block_out_channels;
        let conv_in = conv3(spec.in_channels, ch[0], vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let cfg = DownEncoderBlock2DConfig {
                num_layers: spec.layers_per_block,
                resnet_eps: EPS,
                resnet_groups: spec.norm_num_groups,
                add_downsample: i + 1 < ch.len(),
                downsample_padding: 0,
                ..Default::default()
            };
            down.push(DownEncoderBlock2D::new(
                vb.pp(format!("down_blocks.{i}")),
                cin,
                out,
                cfg,
            )?);
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            down,
            mid: mid_block(vb.pp("mid_block"), last, spec.norm_num_groups)?,
            norm: candle_nn::group_norm(spec.norm_num_groups, last, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(last, 2 * spec.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down {
            xs = block.forward(&xs)?;
        }
        let xs = self.norm.forward(&self.mid.forward(&xs)?)?;
        self.conv_out.forward(&candle_nn::ops::silu(&xs)?)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpDecoderBlock2D>,
    norm: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, spec: &VaeSpec) -> candle_core::Result<Self> {
        let rev: Vec<usize> = spec.block_out_channels.iter().rev().copied().collect();
        let last = rev[0];
        let conv_in = conv3(spec.latent_channels, last, vb.pp("conv_in"))?;
        let mid = mid_block(vb.pp("mid_block"), last, spec.norm_num_groups)?;
        let mut up = Vec::with_capacity(rev.len());
        for (i, &out) in rev.iter().enumerate() {
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let cfg = UpDecoderBlock2DConfig {
                num_layers: spec.layers_per_block + 1,
                resnet_eps: EPS,
                resnet_groups: spec.norm_num_groups,
                add_upsample: i + 1 < rev.len(),
                ..Default::default()
            };
            up.push(UpDecoderBlock2D::new(
                vb.pp(format!("up_blocks.{i}")),
                cin,
                out,
                cfg,
            )?);
        }
        let first = spec.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            up,
            norm: candle_nn::group_norm(spec.norm_num_groups, first, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(first, spec.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.up {
            xs = block.forward(&xs)?;
        }
        let xs = self.norm.forward(&xs)?;
        self.conv_out.forward(&candle_nn::ops::silu(&xs)?)
    }
}

/// The latent distribution of an encoded image.
#[derive(Debug)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub spec: VaeSpec,
}

impl Vae {
    pub fn new(vb: VarBuilder, spec: VaeSpec) -> candle_core::Result<Self> {
        let l = spec.latent_channels;
        let quant_conv = if spec.use_quant_conv {
            Some(candle_nn::conv2d(
                2 * l,
                2 * l,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let post_quant_conv = if spec.use_post_quant_conv {
            Some(candle_nn::conv2d(
                l,
                l,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &spec)?,
            decoder: Decoder::new(vb.pp("decoder"), &spec)?,
            quant_conv,
            post_quant_conv,
            spec,
        })
    }

    /// Pixels in [-1, 1], `[n, 3, h, w]` → the latent distribution, `[n, latent, h/8, w/8]`.
    pub fn encode(&self, xs: &Tensor) -> candle_core::Result<LatentDist> {
        let mut moments = self.encoder.forward(xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.spec.latent_channels;
        let mean = moments.narrow(1, 0, l)?;
        // diffusers clamps the log-variance to [-30, 20] before taking the std.
        let logvar = moments.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }

    /// Unscaled latents → the raw decoder output (roughly [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}
