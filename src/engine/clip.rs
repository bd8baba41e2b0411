//! The CLIP text encoder, as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.
//!
//! Written here rather than taken from candle because candle 0.11's configurable CLIP only
//! knows quick-GELU (SD 2.x and SDXL's second encoder use exact GELU) and exposes no
//! penultimate layer (SDXL conditions on it). Tensor names are those of the real SD
//! checkpoints (`text_model.…`); a checkpoint saved without that prefix (as transformers 5
//! writes) is accepted too.

use candle_core::{D, DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::EngineError;
use super::config::{ClipActivation, ClipTextSpec};

/// What one forward pass yields for a batch of token ids.
#[derive(Debug)]
pub struct TextEncoding {
    /// Final hidden states after the last layer norm, `[batch, seq, hidden]`.
    pub last: Tensor,
    /// Hidden states entering the last layer (no final layer norm), `[batch, seq, hidden]`.
    pub penultimate: Tensor,
    /// The final hidden state at each sequence's first end-of-text token, `[batch, hidden]`,
    /// projected by `text_projection` when the checkpoint has one.
    pub pooled: Tensor,
}

#[derive(Debug)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, spec: &ClipTextSpec) -> candle_core::Result<Self> {
        let h = spec.hidden_size;
        Ok(Self {
            q: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: spec.num_attention_heads,
            head_dim: h / spec.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q.forward(xs)? * scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal)?;
        // Softmax in f32: the masked entries are large negatives that f16 rounds badly.
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out.forward(&ctx)
    }
}

#[derive(Debug)]
struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl Layer {
    fn new(vb: VarBuilder, spec: &ClipTextSpec) -> candle_core::Result<Self> {
        let h = spec.hidden_size;
        Ok(Self {
            ln1: candle_nn::layer_norm(h, spec.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), spec)?,
            ln2: candle_nn::layer_norm(h, spec.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, spec.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(spec.intermediate_size, h, vb.pp("mlp.fc2"))?,
            act: spec.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, causal: &Tensor) -> candle_core::Result<Tensor> {
        let residual = xs;
        let xs = (residual + self.attn.forward(&self.ln1.forward(xs)?, causal)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&xs)?)?;
        let h = match self.act {
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => h.gelu_erf()?,
        };
        xs + self.fc2.forward(&h)?
    }
}

/// A loaded CLIP text encoder.
#[derive(Debug)]
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    eos_id: u32,
    device: Device,
    dtype: DType,
}

impl ClipTextEncoder {
    /// Builds the encoder from `vb` rooted at the checkpoint's top level. `eos_id` is the
    /// tokenizer's end-of-text id, whose first position gives the pooled output.
    pub fn new(vb: VarBuilder, spec: &ClipTextSpec, eos_id: u32) -> Result<Self, EngineError> {
        let with_prefix = vb.contains_tensor("text_model.embeddings.token_embedding.weight");
        let tm = if with_prefix {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let h = spec.hidden_size;
        let token_embedding =
            candle_nn::embedding(spec.vocab_size, h, tm.pp("embeddings.token_embedding"))?;
        let position_embedding = tm.get(
            (spec.max_position_embeddings, h),
            "embeddings.position_embedding.weight",
        )?;
        let layers = (0..spec.num_hidden_layers)
            .map(|i| Layer::new(tm.pp(format!("encoder.layers.{i}")), spec))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_norm = candle_nn::layer_norm(h, spec.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let projection = if vb.contains_tensor("text_projection.weight") {
            let p = spec.projection_dim.unwrap_or(h);
            Some(candle_nn::linear_no_bias(h, p, vb.pp("text_projection"))?)
        } else {
            None
        };
        if spec.num_hidden_layers < 2 {
            return Err(EngineError::Config {
                path: "text_encoder/config.json".into(),
                message: "at least two layers are needed (SDXL reads the penultimate one)".into(),
            });
        }
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_norm,
            projection,
            eos_id,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Encodes a batch of equal-length id sequences.
    pub fn encode(&self, ids: &[Vec<u32>]) -> Result<TextEncoding, EngineError> {
        let b = ids.len();
        let s = ids.first().map(Vec::len).unwrap_or(0);
        if b == 0 || s == 0 || ids.iter().any(|r| r.len() != s) {
            return Err(EngineError::InvalidRequest(
                "text encoder needs a non-empty batch of equal-length token sequences".into(),
            ));
        }
        let max_pos = self.position_embedding.dim(0)?;
        if s > max_pos {
            return Err(EngineError::InvalidRequest(format!(
                "{s} tokens exceed the encoder's {max_pos} positions"
            )));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (b, s), &self.device)?;
        let pos = self.position_embedding.narrow(0, 0, s)?;
        let mut xs = self.token_embedding.forward(&input)?.broadcast_add(&pos)?;
        let causal = causal_mask(s, &self.device)?.to_dtype(self.dtype)?;
        let mut penultimate = None;
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == n {
                penultimate = Some(xs.clone());
            }
            xs = layer.forward(&xs, &causal)?;
        }
        let last = self.final_norm.forward(&xs)?;
        // transformers pools at the first end-of-text token (argmax of ids in the legacy path,
        // which is the same position when eos is the largest id).
        let mut rows = Vec::with_capacity(b);
        for (bi, row) in ids.iter().enumerate() {
            let at = row.iter().position(|&t| t == self.eos_id).unwrap_or(s - 1);
            rows.push(last.i((bi, at))?);
        }
        let mut pooled = Tensor::stack(&rows, 0)?;
        if let Some(p) = &self.projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(TextEncoding {
            last,
            penultimate: penultimate.unwrap_or_else(|| xs.clone()),
            pooled,
        })
    }

    pub fn hidden_size(&self) -> candle_core::Result<usize> {
        self.position_embedding.dim(D::Minus1)
    }
}

fn causal_mask(s: usize, device: &Device) -> candle_core::Result<Tensor> {
    // A large finite negative rather than -inf: f16 turns -inf arithmetic into NaN.
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { -65504.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (1, 1, s, s), device)
}
