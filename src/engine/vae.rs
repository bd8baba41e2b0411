//! The KL autoencoder: pixels ↔ latents.
//!
//! Assembled from our own blocks ([`super::layers`]) rather than candle's `AutoEncoderKL`, for
//! three reasons. The decoder is where a generation's memory peaks: at 512² its 128-channel
//! activations are 128 MB each, so the layers here fuse what candle runs as separate full-size
//! ops (norm + SiLU, bias + shortcut adds, upsampling into the convolution), and [`Vae::decode`]
//! decodes one image at a time, in tiles above the VAE's training size. And img2img needs the
//! latent distribution's mean and std to draw the latent with *this image's* seeded noise, and
//! candle keeps those private and samples with an unseeded RNG. And candle 0.11's VAE attention
//! block feeds a transposed, non-contiguous activation to `Linear`, whose broadcast-matmul path
//! on the CPU then computes image 1.. of a batch from the wrong rows (batch 2 decodes differ
//! from single decodes by up to ~1.0); the mid block here makes the activation contiguous first,
//! so a batch decodes each image exactly as alone. The layout and names are diffusers'
//! `AutoencoderKL`.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::VaeSpec;
use super::layers::{Conv2d, Downsample, GroupNorm, ResnetBlock, ResnetConfig, Upsample};

const EPS: f64 = 1e-6;

fn conv3(cin: usize, cout: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Conv2d::new(vb, cin, cout, 3, 1, 1)
}

fn resnet(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    groups: usize,
) -> candle_core::Result<ResnetBlock> {
    ResnetBlock::new(
        vb,
        ResnetConfig {
            cin,
            cout,
            temb: None,
            groups,
            eps: EPS,
            output_scale_factor: 1.0,
        },
    )
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
            norm: GroupNorm::new(vb.pp("group_norm"), groups, c, EPS)?,
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
            .forward(xs, false)?
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
    res0: ResnetBlock,
    attn: Attention,
    res1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> candle_core::Result<Self> {
        Ok(Self {
            res0: resnet(vb.pp("resnets.0"), c, c, groups)?,
            attn: Attention::new(vb.pp("attentions.0"), c, groups)?,
            res1: resnet(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.res0.forward(xs, None)?;
        let xs = self.attn.forward(&xs)?;
        self.res1.forward(&xs, None)
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets, then a stride-2 downsampler (far-side padding).
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    down: Option<Downsample>,
}

/// diffusers' `UpDecoderBlock2D`: resnets, then a nearest-2× upsampler with its convolution.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    up: Option<Upsample>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, spec: &VaeSpec) -> candle_core::Result<Self> {
        let ch = &spec.block_out_channels;
        let groups = spec.norm_num_groups;
        let conv_in = conv3(spec.in_channels, ch[0], vb.pp("conv_in"))?;
        let mut down = Vec::with_capacity(ch.len());
        for (i, &out) in ch.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let mut cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let mut resnets = Vec::with_capacity(spec.layers_per_block);
            for j in 0..spec.layers_per_block {
                resnets.push(resnet(vbi.pp(format!("resnets.{j}")), cin, out, groups)?);
                cin = out;
            }
            let down_sampler = if i + 1 < ch.len() {
                Some(Downsample::new(vbi.pp("downsamplers.0"), out, 0)?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                down: down_sampler,
            });
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), last, groups)?,
            norm: GroupNorm::new(vb.pp("conv_norm_out"), groups, last, EPS)?,
            conv_out: conv3(last, 2 * spec.latent_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = &block.down {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.norm.forward(&self.mid.forward(&xs)?, true)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, spec: &VaeSpec) -> candle_core::Result<Self> {
        let rev: Vec<usize> = spec.block_out_channels.iter().rev().copied().collect();
        let groups = spec.norm_num_groups;
        let last = rev[0];
        let conv_in = conv3(spec.latent_channels, last, vb.pp("conv_in"))?;
        let mid = MidBlock::new(vb.pp("mid_block"), last, groups)?;
        let mut up = Vec::with_capacity(rev.len());
        for (i, &out) in rev.iter().enumerate() {
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let mut cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let mut resnets = Vec::with_capacity(spec.layers_per_block + 1);
            for j in 0..spec.layers_per_block + 1 {
                resnets.push(resnet(vbi.pp(format!("resnets.{j}")), cin, out, groups)?);
                cin = out;
            }
            let up_sampler = if i + 1 < rev.len() {
                Some(Upsample::new(vbi.pp("upsamplers.0"), out)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                up: up_sampler,
            });
        }
        let first = spec.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid,
            up,
            norm: GroupNorm::new(vb.pp("conv_norm_out"), groups, first, EPS)?,
            conv_out: conv3(first, spec.out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.mid.forward(&self.conv_in.forward(xs)?)?;
        for block in &self.up {
            for r in &block.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = &block.up {
                xs = u.forward(&xs, None)?;
            }
        }
        let xs = self.norm.forward(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}

/// The latent distribution of an encoded image.
#[derive(Debug)]
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

/// When the decoder works in overlapping tiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Tile side in pixels; a latent larger than `sample / scale` on either side is tiled.
    pub sample: usize,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub overlap: f64,
}

/// diffusers' `AutoencoderKL`, decoding one image at a time (diffusers' `enable_vae_slicing`)
/// and, for images larger than the VAE's training size, in blended tiles
/// (`enable_vae_tiling`), so a decode's memory is one image's, or one tile's, whatever the
/// batch and size.
#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    tiling: Option<Tiling>,
    pub spec: VaeSpec,
}

impl Vae {
    pub fn new(vb: VarBuilder, spec: VaeSpec) -> candle_core::Result<Self> {
        let l = spec.latent_channels;
        let quant_conv = if spec.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if spec.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &spec)?,
            decoder: Decoder::new(vb.pp("decoder"), &spec)?,
            quant_conv,
            post_quant_conv,
            tiling: Some(Tiling {
                sample: spec.sample_size,
                overlap: 0.25,
            }),
            spec,
        })
    }

    /// Tiled decoding of large images: `None` always decodes whole images (diffusers'
    /// default); the default is the VAE's `sample_size` with diffusers' overlap.
    pub fn set_tiling(&mut self, tiling: Option<Tiling>) {
        self.tiling = tiling;
    }

    pub fn tiling(&self) -> Option<Tiling> {
        self.tiling
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

    /// Unscaled latents `[n, latent, h, w]` → the raw decoder output (roughly [-1, 1]), one
    /// image at a time, each tiled when it is larger than the tile.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let n = z.dim(0)?;
        let mut images = Vec::with_capacity(n);
        for i in 0..n {
            images.push(self.decode_image(&z.narrow(0, i, 1)?)?);
        }
        if n == 1 {
            return Ok(images.remove(0));
        }
        Tensor::cat(&images, 0)
    }

    /// The whole image at once, whatever its size (no tiling, no slicing).
    pub fn decode_whole(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    fn decode_image(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match self.tiling {
            Some(t) if h.max(w) > t.sample / self.spec.scale() => self.decode_tiled(z, t),
            _ => self.decode_whole(z),
        }
    }

    /// diffusers' `AutoencoderKL.tiled_decode`: tiles of `sample / scale` latents every
    /// `(1 - overlap)` of a tile, each decoded alone; each tile is blended into the one above
    /// and the one to its left (those already blended, as diffusers' in-place blends do) over
    /// `overlap × sample` pixels, then cropped to `(1 - overlap) × sample` and stitched.
    pub fn decode_tiled(&self, z: &Tensor, tiling: Tiling) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let tile = tiling.sample / self.spec.scale();
        // diffusers truncates each of these with int().
        let stride = (tile as f64 * (1.0 - tiling.overlap)) as usize;
        let blend = (tiling.sample as f64 * tiling.overlap) as usize;
        let keep = tiling.sample - blend;
        if tile == 0 || stride == 0 {
            candle_core::bail!(
                "VAE tile of {} pixels with overlap {} leaves no stride",
                tiling.sample,
                tiling.overlap
            );
        }
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(stride) {
            let mut row = Vec::new();
            for j in (0..w).step_by(stride) {
                let part = z
                    .narrow(2, i, tile.min(h - i))?
                    .narrow(3, j, tile.min(w - j))?;
                let mut t = self.decode_whole(&part)?;
                if let Some(above) = rows.last().and_then(|r: &Vec<Tensor>| r.get(row.len())) {
                    t = blend_edge(above, &t, blend, 2)?;
                }
                if let Some(left) = row.last() {
                    t = blend_edge(left, &t, blend, 3)?;
                }
                row.push(t);
            }
            rows.push(row);
        }
        let mut stitched_rows = Vec::with_capacity(rows.len());
        for row in &rows {
            let cropped = row
                .iter()
                .map(|t| crop(t, keep))
                .collect::<candle_core::Result<Vec<_>>>()?;
            stitched_rows.push(Tensor::cat(&cropped, 3)?);
        }
        Tensor::cat(&stitched_rows, 2)
    }
}

fn crop(t: &Tensor, keep: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = t.dims4()?;
    t.narrow(2, 0, keep.min(h))?.narrow(3, 0, keep.min(w))
}

/// `b`'s first `extent` rows (`dim` 2) or columns (3) faded in from `a`'s last ones:
/// `a[-e + y] · (1 - y/e) + b[y] · (y/e)`.
fn blend_edge(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let e = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let ramp: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let r = Tensor::from_vec(ramp, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let one_minus = r.affine(-1.0, 1.0)?;
    let a_edge = a.narrow(dim, a.dim(dim)? - e, e)?;
    let b_edge = b.narrow(dim, 0, e)?;
    let mixed = (a_edge.broadcast_mul(&one_minus)? + b_edge.broadcast_mul(&r)?)?;
    let rest = b.dim(dim)? - e;
    if rest == 0 {
        return Ok(mixed);
    }
    Tensor::cat(&[&mixed, &b.narrow(dim, e, rest)?], dim)
}
