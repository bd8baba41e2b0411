//! Random weights in a checkpoint's real shapes, for benchmarks on hosts without the weights.
//!
//! candle's `VarMap` would do the initialising, but it hands out `Var`s: tensors marked
//! trainable, so every op that touches one records its inputs for backprop. A forward pass then
//! keeps its whole graph of activations alive until the output drops — several GB for a VAE
//! decode at 512², which a model loaded from safetensors (plain tensors) never holds. The
//! backend here makes plain tensors, so a random-weight engine has the memory profile of a real
//! one. Values are drawn per tensor from a ChaCha8 stream seeded by the tensor's name: the same
//! model on every run and device, and no tensor depends on the order the model asks for them.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A [`SimpleBackend`] that answers every request with a fresh tensor drawn per its init hint.
#[derive(Default)]
pub struct RandomWeights {
    made: Mutex<HashMap<String, Tensor>>,
}

impl RandomWeights {
    /// A `VarBuilder` over random weights.
    pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::<Self>::default(), dtype, device.clone())
    }
}

/// FNV-1a: a stable seed from a tensor name (std's hasher may change between releases).
fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Values for `init`: uniform with the hint's spread (a normal init is drawn uniform with the
/// same standard deviation — the arithmetic, not the distribution, is what benchmarks need).
fn draw(shape: &Shape, init: Init, name: &str) -> Vec<f32> {
    let n = shape.elem_count();
    let bound = match init {
        Init::Const(c) => return vec![c as f32; n],
        Init::Uniform { lo, up } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed_of(name));
            let (lo, up) = (lo as f32, up as f32);
            return (0..n)
                .map(|_| lo + (up - lo) * rng.r#gen::<f32>())
                .collect();
        }
        Init::Randn { stdev, .. } => 3f64.sqrt() * stdev,
        Init::Kaiming {
            fan, non_linearity, ..
        } => 3f64.sqrt() * non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt(),
    } as f32;
    let mean = match init {
        Init::Randn { mean, .. } => mean as f32,
        _ => 0.0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed_of(name));
    (0..n)
        .map(|_| mean + bound * (2.0 * rng.r#gen::<f32>() - 1.0))
        .collect()
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut made = self
            .made
            .lock()
            .map_err(|_| candle_core::Error::Msg("random weights: lock poisoned".into()))?;
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!(
                    "random weights: {name} asked for as {s:?} after {:?}",
                    t.shape()
                );
            }
            return t.to_dtype(dtype);
        }
        let t = Tensor::from_vec(draw(&s, h, name), s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let made = self
            .made
            .lock()
            .map_err(|_| candle_core::Error::Msg("random weights: lock poisoned".into()))?;
        match made.get(name) {
            Some(t) => t.to_dtype(dtype),
            None => candle_core::bail!("random weights: {name} has no shape yet"),
        }
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Answering "no" makes loaders that probe for alternative names (old conv-style VAE
        // attention, `to_q` vs `query`) take their first, diffusers-named branch.
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_plain_tensors_reproducible_by_name() {
        let vb = RandomWeights::var_builder(DType::F32, &Device::Cpu);
        let a = vb
            .get_with_hints((4, 8), "a.weight", Init::Const(0.5))
            .unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.5; 32]
        );
        let hint = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let w1 = vb.get_with_hints((16, 16), "w", hint).unwrap();
        let again = RandomWeights::var_builder(DType::F32, &Device::Cpu)
            .get_with_hints((16, 16), "w", hint)
            .unwrap();
        let v1 = w1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v1, again.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let other = vb.get_with_hints((16, 16), "w2", hint).unwrap();
        assert_ne!(v1, other.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // Kaiming-normal (ReLU gain sqrt 2) with fan-in 16: std sqrt(2)/4, drawn uniform, so
        // every value lies within sqrt(6)/4 and the spread is that std.
        assert!(v1.iter().all(|v| v.abs() <= 6f32.sqrt() / 4.0 + 1e-6));
        let std = (v1.iter().map(|v| v * v).sum::<f32>() / v1.len() as f32).sqrt();
        assert!((std - 2f32.sqrt() / 4.0).abs() < 0.05, "std {std}");
        // A result computed from a plain tensor records no graph (a Var's would).
        let y = w1.matmul(&w1).unwrap();
        assert!(!y.track_op());
    }
}
