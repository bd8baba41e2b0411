//! Per-image random draws.
//!
//! Every image of a batch owns one noise stream seeded by its own seed, and draws from it in a
//! fixed order: (img2img) the latent sample's noise, then the noise that brings the latent to the
//! first timestep — or (txt2img) the initial latent noise — then one draw per ancestral step.
//! Because no draw depends on the batch, image *i* of a batch equals the same image generated
//! alone with its seed, and a seed means the same image on CPU and GPU: the draws are made on
//! the host with a portable RNG (ChaCha8), never with a device RNG.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::EngineError;

/// A source of standard-normal draws, one independent stream per image of the batch.
pub trait NoiseSource: Send {
    /// The next `len` draws of image `image`'s stream.
    fn draw(&mut self, image: usize, len: usize) -> Result<Vec<f32>, EngineError>;
}

/// The production source: ChaCha8 seeded with each image's seed.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    streams: Vec<ChaCha8Rng>,
}

impl SeededNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self {
            streams: seeds
                .iter()
                .map(|&s| ChaCha8Rng::seed_from_u64(s))
                .collect(),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn draw(&mut self, image: usize, len: usize) -> Result<Vec<f32>, EngineError> {
        let rng = self.streams.get_mut(image).ok_or_else(|| {
            EngineError::InvalidRequest(format!("no noise stream for image {image}"))
        })?;
        Ok((0..len).map(|_| StandardNormal.sample(rng)).collect())
    }
}

/// Replays recorded draws in order (tests replaying a reference implementation's noise, whose
/// RNG differs from ours). Each image's queue is consumed front to back; asking for more, or a
/// different length, than was recorded is an error rather than silent new noise.
#[derive(Debug, Clone, Default)]
pub struct ReplayNoise {
    queues: Vec<std::collections::VecDeque<Vec<f32>>>,
}

impl ReplayNoise {
    pub fn new(images: usize) -> Self {
        Self {
            queues: vec![Default::default(); images],
        }
    }

    /// Appends one recorded draw to image `image`'s queue.
    pub fn push(&mut self, image: usize, draw: Vec<f32>) {
        if image >= self.queues.len() {
            self.queues.resize(image + 1, Default::default());
        }
        self.queues[image].push_back(draw);
    }

    /// Draws left over, summed over images (a test asserts they were all used).
    pub fn remaining(&self) -> usize {
        self.queues.iter().map(|q| q.len()).sum()
    }
}

impl NoiseSource for ReplayNoise {
    fn draw(&mut self, image: usize, len: usize) -> Result<Vec<f32>, EngineError> {
        let next = self
            .queues
            .get_mut(image)
            .and_then(|q| q.pop_front())
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!("replay has no draw left for image {image}"))
            })?;
        if next.len() != len {
            return Err(EngineError::InvalidRequest(format!(
                "replayed draw for image {image} has {} values, {len} asked",
                next.len()
            )));
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_depend_only_on_their_own_seed() {
        let mut batch = SeededNoise::new(&[10, 11, 12]);
        let mut alone = SeededNoise::new(&[11]);
        let _ = batch.draw(0, 64).unwrap();
        assert_eq!(batch.draw(1, 64).unwrap(), alone.draw(0, 64).unwrap());
        assert_ne!(
            batch.draw(2, 8).unwrap(),
            SeededNoise::new(&[10]).draw(0, 8).unwrap()
        );
    }

    #[test]
    fn draws_look_standard_normal() {
        let v = SeededNoise::new(&[7]).draw(0, 20_000).unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn replay_refuses_to_invent_noise() {
        let mut r = ReplayNoise::new(1);
        r.push(0, vec![1.0, 2.0]);
        assert!(r.draw(0, 3).is_err());
        let mut r = ReplayNoise::new(1);
        r.push(0, vec![1.0, 2.0]);
        assert_eq!(r.draw(0, 2).unwrap(), [1.0, 2.0]);
        assert!(r.draw(0, 2).is_err());
        assert_eq!(r.remaining(), 0);
    }
}
