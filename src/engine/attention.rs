//! The UNet's transformer blocks (diffusers' `Transformer2DModel`, `BasicTransformerBlock`,
//! `Attention`, GEGLU feed-forward), with an attention whose memory does not grow with the
//! square of the tokens.
//!
//! Why our own: candle's `CrossAttention` materialises every head's score matrix at once —
//! `[batch·heads, tokens, tokens]`, 335 MB per image at 512² (4096 tokens, 5 heads) and as much
//! again for the softmax — and its sliced variant does not run (it stacks the slices into a 4-D
//! tensor its reshape then rejects). On the CPU in f32 the attention here runs per (image, head,
//! block of query rows): one gemm for the block's scores, an in-place softmax, one gemm into
//! the output already laid out `[batch, tokens, heads·dim]`; live memory is one score block per
//! thread. Elsewhere it runs candle's ops per head. diffusers' GEGLU uses the exact (erf) GELU,
//! candle's the tanh approximation; this one uses erf.

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use rayon::prelude::*;

use super::cpu::OutPtr;
use super::layers::{Conv2d, GroupNorm, cpu_f32};

/// Query rows per score block: 128 × 4096 keys × 4 B = 2 MB per thread at 512².
const QUERY_BLOCK: usize = 128;

/// diffusers' `Attention` without the optional norms: q/k/v projections without bias, the
/// output projection with one.
#[derive(Debug)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: candle_nn::linear_no_bias(dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        let out = attention(&q, &k, &v, self.heads)?;
        self.to_out.forward(&out)
    }
}

/// Scaled dot-product attention over `[b, tokens, heads·d]` inputs, output in the same layout.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let (_, nk, _) = k.dims3()?;
    if inner % heads != 0 {
        candle_core::bail!("attention width {inner} does not split into {heads} heads");
    }
    let d = inner / heads;
    let scale = 1.0 / (d as f64).sqrt();
    let cpu = matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32;
    if cpu {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let mut out = vec![0f32; b * nq * inner];
        {
            let (qs, ql) = q.storage_and_layout();
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let (Some(qf), Some(kf), Some(vf)) =
                (cpu_f32(&qs, ql), cpu_f32(&ks, kl), cpu_f32(&vs, vl))
            else {
                candle_core::bail!("attention fast path needs contiguous f32 CPU tensors");
            };
            attention_cpu(qf, kf, vf, &mut out, b, nq, nk, heads, d, scale as f32);
        }
        return Tensor::from_vec(out, (b, nq, inner), &Device::Cpu);
    }
    // Other devices: one head at a time (a head's scores, not all of them, live at once).
    let in_dtype = q.dtype();
    let mut outs = Vec::with_capacity(heads);
    for h in 0..heads {
        let qh = q.narrow(2, h * d, d)?.to_dtype(DType::F32)?.contiguous()?;
        let kh = k.narrow(2, h * d, d)?.to_dtype(DType::F32)?.contiguous()?;
        let vh = v.narrow(2, h * d, d)?.to_dtype(DType::F32)?.contiguous()?;
        let scores = (qh.matmul(&kh.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&vh)?.to_dtype(in_dtype)?);
    }
    Tensor::cat(&outs, D::Minus1)
}

#[allow(clippy::too_many_arguments)]
fn attention_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    b: usize,
    nq: usize,
    nk: usize,
    heads: usize,
    d: usize,
    scale: f32,
) {
    let inner = heads * d;
    let blocks = nq.div_ceil(QUERY_BLOCK);
    let dst = OutPtr(out.as_mut_ptr());
    (0..b * heads * blocks).into_par_iter().for_each(|task| {
        let blk = task % blocks;
        let h = (task / blocks) % heads;
        let img = task / (blocks * heads);
        let r0 = blk * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(nq - r0);
        let mut scores = vec![0f32; rows * nk];
        let q0 = (img * nq + r0) * inner + h * d;
        let kv0 = img * nk * inner + h * d;
        // SAFETY: all pointers stay inside q, k, v (offsets and strides from their shapes) and
        // inside this task's own output rectangle.
        unsafe {
            // scores[rows, nk] = q_block[rows, d] · k_h[nk, d]ᵀ · scale
            gemm::gemm(
                rows,
                nk,
                d,
                scores.as_mut_ptr(),
                1,
                nk as isize,
                false,
                q.as_ptr().add(q0),
                1,
                inner as isize,
                k.as_ptr().add(kv0),
                inner as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for row in scores.chunks_exact_mut(nk) {
            super::cpu::softmax_in_place(row);
        }
        unsafe {
            // out[rows, d] = probs[rows, nk] · v_h[nk, d]
            gemm::gemm(
                rows,
                d,
                nk,
                dst.at(q0),
                1,
                inner as isize,
                false,
                scores.as_ptr(),
                1,
                nk as isize,
                v.as_ptr().add(kv0),
                1,
                inner as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` to twice the inner width, value · GELU(gate)
/// (exact GELU), `net.2` back.
#[derive(Debug)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: candle_nn::linear(dim, 2 * inner, vb.pp("net.0.proj"))?,
            proj_out: candle_nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        let half = h.dim(D::Minus1)? / 2;
        let gated = if matches!(h.device(), Device::Cpu) && h.dtype() == DType::F32 {
            let h = h.contiguous()?;
            let mut dims = h.dims().to_vec();
            let out = {
                let (st, l) = h.storage_and_layout();
                let Some(hf) = cpu_f32(&st, l) else {
                    candle_core::bail!("GEGLU fast path needs a contiguous f32 CPU tensor");
                };
                super::cpu::geglu(hf, half)
            };
            if let Some(last) = dims.last_mut() {
                *last = half;
            }
            Tensor::from_vec(out, dims, &Device::Cpu)?
        } else {
            let value = h.narrow(D::Minus1, 0, half)?;
            (value * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?
        };
        self.proj_out.forward(&gated)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, GEGLU): self-attention, then cross-attention
/// on the text context — or, in a motion module (`double_self_attention`), a second
/// self-attention — with the sinusoidal position table added after the first two norms.
#[derive(Debug)]
pub(crate) struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// `[1, max_len, dim]` (`pos_embed.pe`), in motion modules only.
    pos: Option<Tensor>,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        context: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, context, heads, head_dim)?,
            norm3: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            pos: None,
        })
    }

    /// A motion module's block: two self-attentions over the frames, positions `0..max_len`
    /// from the checkpoint's `pos_embed.pe` when it has one, else computed as diffusers'
    /// `SinusoidalPositionalEmbedding` does.
    pub(crate) fn temporal(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        max_len: usize,
    ) -> Result<Self> {
        let mut block = Self::new(vb.clone(), dim, dim, heads, head_dim)?;
        let pe = if vb.contains_tensor("pos_embed.pe") {
            vb.get((1, max_len, dim), "pos_embed.pe")?
        } else {
            sinusoidal_positions(max_len, dim, vb.device())?.to_dtype(vb.dtype())?
        };
        block.pos = Some(pe);
        Ok(block)
    }

    /// `context` `None`: the second attention attends to the tokens themselves.
    pub(crate) fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let with_pos = |t: Tensor| -> Result<Tensor> {
            match &self.pos {
                Some(pe) => t.broadcast_add(&pe.narrow(1, 0, t.dim(1)?)?),
                None => Ok(t),
            }
        };
        let xs = (self
            .attn1
            .forward(&with_pos(self.norm1.forward(xs)?)?, None)?
            + xs)?;
        let xs = (self
            .attn2
            .forward(&with_pos(self.norm2.forward(&xs)?)?, context)?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `pe[0, p, 2i] = sin(p·w_i)`, `pe[0, p, 2i+1] = cos(p·w_i)`, `w_i = 10000^(-2i/dim)`.
fn sinusoidal_positions(max_len: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let mut pe = vec![0f32; max_len * dim];
    for p in 0..max_len {
        for i in (0..dim).step_by(2) {
            let w = (-(i as f64) * (10000f64.ln() / dim as f64)).exp();
            let a = p as f64 * w;
            pe[p * dim + i] = a.sin() as f32;
            if i + 1 < dim {
                pe[p * dim + i + 1] = a.cos() as f32;
            }
        }
    }
    Tensor::from_vec(pe, (1, max_len, dim), device)
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// The shape of one [`SpatialTransformer`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub depth: usize,
    pub groups: usize,
    pub context_dim: usize,
    pub linear_projection: bool,
}

/// diffusers' `Transformer2DModel` on continuous input: group norm, projection to tokens,
/// transformer blocks, projection back, residual.
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    pub fn new(vb: VarBuilder, cfg: TransformerConfig) -> Result<Self> {
        let c = cfg.channels;
        let inner = cfg.heads * cfg.head_dim;
        let (proj_in, proj_out) = if cfg.linear_projection {
            (
                Projection::Linear(candle_nn::linear(c, inner, vb.pp("proj_in"))?),
                Projection::Linear(candle_nn::linear(inner, c, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(vb.pp("proj_in"), c, inner, 1, 1, 0)?),
                Projection::Conv(Conv2d::new(vb.pp("proj_out"), inner, c, 1, 1, 0)?),
            )
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    inner,
                    cfg.context_dim,
                    cfg.heads,
                    cfg.head_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), cfg.groups, c, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs, false)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let inner = t.dim(1)?;
            t.reshape((b, inner, h * w))?.transpose(1, 2)?.contiguous()
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(p) => to_tokens(&p.forward(&normed)?)?,
            Projection::Linear(p) => p.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, Some(context))?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            let inner = t.dim(2)?;
            t.transpose(1, 2)?.contiguous()?.reshape((b, inner, h, w))
        };
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward_fused(&to_image(&tokens)?, false, None, Some(xs))?,
            Projection::Linear(p) => (to_image(&p.forward(&tokens)?)? + xs)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: (usize, usize, usize), seed: usize) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn blocked_attention_matches_the_full_softmax() {
        // More query rows than one block, a ragged last block, keys fewer than queries.
        let (b, nq, nk, heads, d) = (2, 300, 77, 3, 8);
        let q = t((b, nq, heads * d), 1);
        let k = t((b, nk, heads * d), 2);
        let v = t((b, nk, heads * d), 3);
        let got = attention(&q, &k, &v, heads).unwrap();
        let split = |x: &Tensor, n: usize| {
            x.reshape((b, n, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (qh, kh, vh) = (split(&q, nq), split(&k, nk), split(&v, nk));
        let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&scores)
            .unwrap()
            .matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, nq, heads * d))
            .unwrap();
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
