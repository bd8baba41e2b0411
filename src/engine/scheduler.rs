//! Denoising schedulers: Euler ancestral (turbo models), Euler and DDIM.
//!
//! Written here, mirroring diffusers' `EulerAncestralDiscreteScheduler`,
//! `EulerDiscreteScheduler` and `DDIMScheduler` step for step, for two reasons candle's own
//! schedulers can't serve: the ancestral step must take its noise from the caller (each image of
//! a batch draws from its own seeded stream, so image *i* of a batch equals the image generated
//! alone), and img2img needs diffusers' begin-index semantics. The arithmetic follows diffusers'
//! dtypes where it matters: betas and cumulative alphas in f32 as torch computes them, sigma
//! interpolation in f64 as numpy does, and rounding half to even as `np.round` does.

use candle_core::Tensor;

use super::EngineError;
use super::config::SchedulerSpec;
use super::preset::SchedulerKind;

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// A scheduler with its timesteps set for one generation.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: Prediction,
    timesteps: Vec<f64>,
    /// Euler family: one sigma per timestep plus a final 0.
    sigmas: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    /// DDIM's distance to the previous timestep: `T // steps`.
    step_ratio: usize,
    init_noise_sigma: f64,
}

impl Scheduler {
    /// Sets up `steps` inference steps. `spacing` overrides the config's timestep spacing.
    pub fn new(
        kind: SchedulerKind,
        spec: &SchedulerSpec,
        spacing: Option<&str>,
        steps: usize,
    ) -> Result<Self, EngineError> {
        let t = spec.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(EngineError::InvalidRequest(format!(
                "steps must be between 1 and {t}, got {steps}"
            )));
        }
        let prediction = match spec.prediction_type.as_str() {
            "v_prediction" => Prediction::VPrediction,
            _ => Prediction::Epsilon,
        };
        let betas: Vec<f32> = match spec.beta_schedule.as_str() {
            "linear" => linspace(spec.beta_start, spec.beta_end, t)
                .into_iter()
                .map(|b| b as f32)
                .collect(),
            _ => linspace(spec.beta_start.sqrt(), spec.beta_end.sqrt(), t)
                .into_iter()
                .map(|b| (b as f32) * (b as f32))
                .collect(),
        };
        let mut alphas_cumprod = Vec::with_capacity(t);
        let mut acc = 1f32;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let spacing = spacing.unwrap_or(spec.timestep_spacing.as_str());
        if !matches!(spacing, "leading" | "trailing" | "linspace") {
            return Err(EngineError::InvalidRequest(format!(
                "timestep spacing `{spacing}` (expected leading, trailing or linspace)"
            )));
        }
        let tf = t as f64;
        let n = steps as f64;
        let euler = kind != SchedulerKind::Ddim;
        let timesteps: Vec<f64> = match spacing {
            "linspace" => {
                let ts = linspace(0.0, tf - 1.0, steps);
                // DDIM rounds to integer timesteps; Euler keeps the fractional ones.
                ts.into_iter()
                    .rev()
                    .map(|x| if euler { x } else { x.round_ties_even() })
                    .collect()
            }
            "trailing" => {
                let ratio = tf / n;
                (0..steps)
                    .map(|k| (tf - k as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
            _ => {
                let ratio = t / steps;
                (0..steps)
                    .rev()
                    .map(|k| ((k * ratio) as f64).round_ties_even() + spec.steps_offset as f64)
                    .collect()
            }
        };
        if timesteps.iter().any(|&ts| ts < 0.0 || ts > tf - 1.0) {
            return Err(EngineError::InvalidRequest(format!(
                "{steps} steps with `{spacing}` spacing give timesteps outside 0..{t}"
            )));
        }
        let (sigmas, init_noise_sigma) = if euler {
            // numpy: sigmas of the training schedule in f32, interpolated in f64, stored as f32.
            let base: Vec<f64> = alphas_cumprod
                .iter()
                .map(|&a| ((1.0 - a) / a).sqrt() as f64)
                .collect();
            let mut sigmas: Vec<f64> = timesteps
                .iter()
                .map(|&ts| interp(ts, &base) as f32 as f64)
                .collect();
            sigmas.push(0.0);
            let max = sigmas.iter().copied().fold(0.0, f64::max);
            let init = if matches!(spacing, "linspace" | "trailing") {
                max
            } else {
                (max * max + 1.0).sqrt()
            };
            (sigmas, init)
        } else {
            (Vec::new(), 1.0)
        };
        let final_alpha_cumprod = if spec.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Ok(Self {
            kind,
            prediction,
            timesteps,
            sigmas,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: t / steps,
            init_noise_sigma,
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// The timesteps, one per step, as fed to the UNet.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Euler family's sigmas (empty for DDIM).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Scale of the initial noise for txt2img.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// Whether `step` consumes a fresh noise draw (the ancestral sampler does, every step).
    pub fn needs_step_noise(&self) -> bool {
        self.kind == SchedulerKind::EulerAncestral
    }

    /// diffusers' `get_timesteps` for img2img: the index of the first step that runs.
    pub fn img2img_start(&self, strength: f64) -> usize {
        let n = self.timesteps.len();
        let init = ((n as f64 * strength) as usize).min(n);
        n - init
    }

    /// The UNet input at step `i` (Euler divides by `sqrt(sigma² + 1)`).
    pub fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        match self.kind {
            SchedulerKind::Ddim => Ok(sample.clone()),
            _ => {
                let s = self.sigmas[i];
                sample.affine(1.0 / (s * s + 1.0).sqrt(), 0.0)
            }
        }
    }

    /// Noises clean latents to step `i` (the first img2img step).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        match self.kind {
            SchedulerKind::Ddim => {
                let a = self.alpha_at(self.timesteps[i]);
                x0.affine(a.sqrt(), 0.0)? + noise.affine((1.0 - a).sqrt(), 0.0)?
            }
            _ => x0 + noise.affine(self.sigmas[i], 0.0)?,
        }
    }

    fn alpha_at(&self, t: f64) -> f64 {
        self.alphas_cumprod[t as usize] as f64
    }

    /// One denoising step from step `i`. `noise` is required exactly when
    /// [`Scheduler::needs_step_noise`] says so.
    pub fn step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        Ok(match self.kind {
            SchedulerKind::Ddim => self.ddim_step(model_output, i, sample)?,
            SchedulerKind::Euler => self.euler_step(model_output, i, sample)?,
            SchedulerKind::EulerAncestral => {
                let noise = noise.ok_or_else(|| {
                    EngineError::InvalidRequest("the ancestral step needs noise".into())
                })?;
                self.euler_ancestral_step(model_output, i, sample, noise)?
            }
        })
    }

    fn pred_original_euler(
        &self,
        eps: &Tensor,
        sigma: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => sample - eps.affine(sigma, 0.0)?,
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                eps.affine(-sigma / s2.sqrt(), 0.0)? + sample.affine(1.0 / s2, 0.0)?
            }
        }
    }

    fn euler_step(&self, eps: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[i];
        let pred = self.pred_original_euler(eps, sigma, sample)?;
        let derivative = ((sample - pred)? / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        sample + derivative.affine(dt, 0.0)?
    }

    fn euler_ancestral_step(
        &self,
        eps: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let sigma_from = self.sigmas[i];
        let sigma_to = self.sigmas[i + 1];
        let pred = self.pred_original_euler(eps, sigma_from, sample)?;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = ((sample - pred)? / sigma_from)?;
        let prev = (sample + derivative.affine(sigma_down - sigma_from, 0.0)?)?;
        prev + noise.affine(sigma_up, 0.0)?
    }

    fn ddim_step(&self, out: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let t = self.timesteps[i];
        let prev_t = t - self.step_ratio as f64;
        let a_t = self.alpha_at(t);
        let a_prev = if prev_t >= 0.0 {
            self.alpha_at(prev_t)
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - out.affine(b_t.sqrt(), 0.0)?)? / a_t.sqrt())?;
                (x0, out.clone())
            }
            Prediction::VPrediction => {
                let x0 = (sample.affine(a_t.sqrt(), 0.0)? - out.affine(b_t.sqrt(), 0.0)?)?;
                let e = (out.affine(a_t.sqrt(), 0.0)? + sample.affine(b_t.sqrt(), 0.0)?)?;
                (x0, e)
            }
        };
        // eta = 0: no variance term, the deterministic DDIM sampler.
        pred_x0.affine(a_prev.sqrt(), 0.0)? + pred_eps.affine((1.0 - a_prev).sqrt(), 0.0)?
    }
}

fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    (0..n).map(|i| start + step * i as f64).collect()
}

/// `np.interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let lo = x.floor() as usize;
    let frac = x - lo as f64;
    ys[lo] + (ys[lo + 1] - ys[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(spacing: &str) -> SchedulerSpec {
        serde_json::from_str(&format!(
            r#"{{"timestep_spacing":"{spacing}","steps_offset":1}}"#
        ))
        .unwrap()
    }

    #[test]
    fn timestep_spacings_match_diffusers() {
        let s = Scheduler::new(SchedulerKind::EulerAncestral, &spec("trailing"), None, 4).unwrap();
        assert_eq!(s.timesteps(), [999.0, 749.0, 499.0, 249.0]);
        let s = Scheduler::new(SchedulerKind::Ddim, &spec("leading"), None, 5).unwrap();
        assert_eq!(s.timesteps(), [801.0, 601.0, 401.0, 201.0, 1.0]);
        let s = Scheduler::new(SchedulerKind::Euler, &spec("trailing"), None, 1).unwrap();
        assert_eq!(s.timesteps(), [999.0]);
        // 1000/16 = 62.5: numpy rounds the halves to even.
        let s = Scheduler::new(SchedulerKind::Euler, &spec("trailing"), None, 16).unwrap();
        assert_eq!(s.timesteps()[1], 937.0);
        assert_eq!(s.timesteps()[3], 811.0);
    }

    #[test]
    fn euler_sigmas_end_in_zero_and_set_the_initial_scale() {
        let s = Scheduler::new(SchedulerKind::EulerAncestral, &spec("trailing"), None, 4).unwrap();
        assert_eq!(s.sigmas().len(), 5);
        assert_eq!(s.sigmas()[4], 0.0);
        // Trailing spacing starts at the largest sigma itself (~14.6 for SD's betas).
        assert!((s.init_noise_sigma() - s.sigmas()[0]).abs() < 1e-12);
        assert!((s.sigmas()[0] - 14.6146).abs() < 1e-3, "{}", s.sigmas()[0]);
        let lead = Scheduler::new(SchedulerKind::Euler, &spec("leading"), None, 4).unwrap();
        let m = lead.sigmas()[0];
        assert!((lead.init_noise_sigma() - (m * m + 1.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn img2img_start_follows_get_timesteps() {
        let s = Scheduler::new(SchedulerKind::Ddim, &spec("leading"), None, 5).unwrap();
        assert_eq!(s.img2img_start(0.6), 2);
        assert_eq!(s.img2img_start(1.0), 0);
        assert_eq!(s.img2img_start(0.1), 5);
    }

    #[test]
    fn zero_steps_is_an_invalid_request() {
        let err = Scheduler::new(SchedulerKind::Euler, &spec("leading"), None, 0).unwrap_err();
        assert!(matches!(err, EngineError::InvalidRequest(_)));
    }
}
