//! Denoising schedulers: Euler ancestral (turbo models), Euler and DDIM.
//!
//! Written here, mirroring diffusers' `EulerAncestralDiscreteScheduler`,
//! `EulerDiscreteScheduler` and `DDIMScheduler` step for step, for two reasons candle's own
//! schedulers can't serve: the ancestral step must take its noise from the caller (each image of
//! a batch draws from its own seeded stream, so image *i* of a batch equals the image generated
//! alone), and img2img needs diffusers' begin-index semantics. The arithmetic follows diffusers'
//! dtypes where it matters: betas and cumulative alphas in f32 as torch computes them (its
//! linspace is a fused multiply-add in f32, its cumulative product accumulates in f64), sigma
//! interpolation and re-spacing in f64 as numpy does, and rounding half to even as `np.round`
//! does.
//!
//! Which config keys apply, and their defaults, is [`SchedulerSpec`]'s business
//! (`config.rs`); this module turns a spec into timesteps, sigmas and steps.

use candle_core::Tensor;

use super::EngineError;
use super::config::{
    BetaSchedule, PredictionType, SchedulerClass, SchedulerSpec, SigmaSchedule, TimestepSpacing,
};
use super::preset::SchedulerKind;

/// A scheduler with its timesteps set for one generation.
#[derive(Debug, Clone)]
pub struct Scheduler {
    kind: SchedulerKind,
    prediction: PredictionType,
    timesteps: Vec<f64>,
    /// Euler family: one sigma per timestep plus the final one (0 unless `sigma_min`).
    sigmas: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    /// DDIM's clamp of the predicted clean sample, when `clip_sample` is on.
    clip_range: Option<f64>,
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
        let class = SchedulerClass::of(kind);
        let t = spec.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(EngineError::InvalidRequest(format!(
                "steps must be between 1 and {t}, got {steps}"
            )));
        }
        if kind == SchedulerKind::EulerAncestral && spec.prediction_type == PredictionType::Sample {
            // diffusers' ancestral step raises NotImplementedError for it.
            return Err(EngineError::Config {
                path: spec.source.clone(),
                message: "`prediction_type` `sample` is not supported by \
                          EulerAncestralDiscreteScheduler (diffusers does not implement it)"
                    .into(),
            });
        }
        let spacing = match spacing {
            Some(s) => TimestepSpacing::parse(s).ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "timestep spacing `{s}` (expected leading, trailing or linspace)"
                ))
            })?,
            None => spec.timestep_spacing_for(class),
        };
        let euler = kind != SchedulerKind::Ddim;
        let mut betas = training_betas(spec);
        if spec.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut alphas_cumprod = cumprod_f32(betas.iter().map(|b| 1.0 - b));
        if euler
            && spec.rescale_betas_zero_snr
            && let Some(last) = alphas_cumprod.last_mut()
        {
            // Zero terminal SNR makes the last sigma infinite; diffusers' Euler classes pin the
            // last alpha to 2^-24 instead (DDIM keeps the 0: its pred_x0 stays finite under
            // v-prediction, which zero-SNR models use).
            *last = 2f32.powi(-24);
        }
        let timesteps = spaced_timesteps(spacing, t, steps, spec.steps_offset, euler);
        if timesteps.iter().any(|&ts| ts < 0.0 || ts > (t - 1) as f64) {
            return Err(EngineError::InvalidRequest(format!(
                "{steps} steps with {spacing:?} spacing give timesteps outside 0..{t}"
            )));
        }
        let (timesteps, sigmas, init_noise_sigma) = if euler {
            let (timesteps, sigmas) = euler_schedule(kind, spec, &alphas_cumprod, timesteps);
            let max = sigmas.iter().copied().fold(0.0, f64::max);
            let init = match spacing {
                TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
                TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
            };
            (timesteps, sigmas, init)
        } else {
            (timesteps, Vec::new(), 1.0)
        };
        let ddim = kind == SchedulerKind::Ddim;
        let final_alpha_cumprod = if ddim && spec.ddim_set_alpha_to_one() {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        let clip_range = (ddim && spec.ddim_clip_sample()).then_some(spec.clip_sample_range);
        Ok(Self {
            kind,
            prediction: spec.prediction_type,
            timesteps,
            sigmas,
            alphas_cumprod,
            final_alpha_cumprod,
            clip_range,
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

    /// The cumulative alphas of the training schedule (f32, as torch holds them).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// DDIM's alpha for the step after the last training timestep.
    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
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
        out: &Tensor,
        sigma: f64,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => sample - out.affine(sigma, 0.0)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                out.affine(-sigma / s2.sqrt(), 0.0)? + sample.affine(1.0 / s2, 0.0)?
            }
            // Refused for the ancestral sampler in `new`, as diffusers refuses it.
            PredictionType::Sample => Ok(out.clone()),
        }
    }

    fn euler_step(&self, out: &Tensor, i: usize, sample: &Tensor) -> candle_core::Result<Tensor> {
        let sigma = self.sigmas[i];
        let pred = self.pred_original_euler(out, sigma, sample)?;
        let derivative = ((sample - pred)? / sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        sample + derivative.affine(dt, 0.0)?
    }

    fn euler_ancestral_step(
        &self,
        out: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let sigma_from = self.sigmas[i];
        let sigma_to = self.sigmas[i + 1];
        let pred = self.pred_original_euler(out, sigma_from, sample)?;
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
            PredictionType::Epsilon => {
                let x0 = ((sample - out.affine(b_t.sqrt(), 0.0)?)? / a_t.sqrt())?;
                (x0, out.clone())
            }
            PredictionType::VPrediction => {
                let x0 = (sample.affine(a_t.sqrt(), 0.0)? - out.affine(b_t.sqrt(), 0.0)?)?;
                let e = (out.affine(a_t.sqrt(), 0.0)? + sample.affine(b_t.sqrt(), 0.0)?)?;
                (x0, e)
            }
            PredictionType::Sample => {
                let e = ((sample - out.affine(a_t.sqrt(), 0.0)?)? / b_t.sqrt())?;
                (out.clone(), e)
            }
        };
        // The clamp applies to x0 only: diffusers keeps the unclipped epsilon for the direction
        // term unless asked for `use_clipped_model_output`, which the pipelines don't.
        let pred_x0 = match self.clip_range {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        // eta = 0: no variance term, the deterministic DDIM sampler.
        pred_x0.affine(a_prev.sqrt(), 0.0)? + pred_eps.affine((1.0 - a_prev).sqrt(), 0.0)?
    }
}

/// The training betas in f32: the file's own, or its schedule laid out as torch does.
fn training_betas(spec: &SchedulerSpec) -> Vec<f32> {
    let t = spec.num_train_timesteps;
    if let Some(betas) = &spec.trained_betas {
        return betas.iter().map(|&b| b as f32).collect();
    }
    match spec.beta_schedule {
        BetaSchedule::Linear => torch_linspace_f32(spec.beta_start, spec.beta_end, t),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(spec.beta_start.sqrt(), spec.beta_end.sqrt(), t)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        BetaSchedule::SquaredCosCapV2 => {
            // Glide's cosine alpha-bar, discretized in f64 (Python floats), capped at 0.999.
            let alpha_bar = |x: f64| {
                ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..t)
                .map(|i| {
                    let t1 = i as f64 / t as f64;
                    let t2 = (i + 1) as f64 / t as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
    }
}

/// Lin et al.'s zero-terminal-SNR rescale: shift √ᾱ so its last value is 0, scale it back to
/// its first value, and turn it back into betas — all in f32 as diffusers computes it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut sqrt_bar: Vec<f32> = cumprod_f32(betas.iter().map(|b| 1.0 - b))
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let (Some(&first), Some(&last)) = (sqrt_bar.first(), sqrt_bar.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for s in &mut sqrt_bar {
        *s -= last;
        *s *= scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for w in bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// The inference timesteps, in diffusers' dtype's values: DDIM's are integers, Euler's are f32
/// (fractional under `linspace`).
fn spaced_timesteps(
    spacing: TimestepSpacing,
    t: usize,
    steps: usize,
    offset: usize,
    euler: bool,
) -> Vec<f64> {
    let tf = t as f64;
    match spacing {
        TimestepSpacing::Linspace => numpy_linspace(0.0, tf - 1.0, steps)
            .into_iter()
            .rev()
            .map(|x| {
                if euler {
                    x as f32 as f64
                } else {
                    x.round_ties_even()
                }
            })
            .collect(),
        TimestepSpacing::Trailing => {
            let ratio = tf / steps as f64;
            (0..steps)
                .map(|k| (tf - k as f64 * ratio).round_ties_even() - 1.0)
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|k| ((k * ratio) as f64).round_ties_even() + offset as f64)
                .collect()
        }
    }
}

/// Euler's timesteps and sigmas (the final sigma appended), from the spaced timesteps.
fn euler_schedule(
    kind: SchedulerKind,
    spec: &SchedulerSpec,
    alphas_cumprod: &[f32],
    timesteps: Vec<f64>,
) -> (Vec<f64>, Vec<f64>) {
    // The training sigmas in f32 as torch computes them; numpy interpolates them in f64.
    let train: Vec<f32> = alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect();
    let train64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
    let interpolated: Vec<f64> = timesteps.iter().map(|&ts| interp(ts, &train64)).collect();
    // Only EulerDiscreteScheduler has the re-spaced schedules, the final-sigma choice and
    // continuous timesteps; the ancestral class ignores those keys.
    let full_euler = kind == SchedulerKind::Euler;
    let schedule = if full_euler {
        spec.sigma_schedule
    } else {
        SigmaSchedule::Interpolated
    };
    let n = timesteps.len();
    let (sigmas, timesteps) = match schedule {
        SigmaSchedule::Interpolated => (interpolated, timesteps),
        SigmaSchedule::Karras | SigmaSchedule::Exponential => {
            // The bounds default to the interpolated range's ends, not the training ones.
            let lo = spec.sigma_min.unwrap_or(interpolated[n - 1]);
            let hi = spec.sigma_max.unwrap_or(interpolated[0]);
            let sigmas: Vec<f64> = if schedule == SigmaSchedule::Karras {
                let rho = 7.0;
                let (lo_r, hi_r) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
                numpy_linspace(0.0, 1.0, n)
                    .into_iter()
                    .map(|r| (hi_r + r * (lo_r - hi_r)).powf(rho))
                    .collect()
            } else {
                numpy_linspace(hi.ln(), lo.ln(), n)
                    .into_iter()
                    .map(f64::exp)
                    .collect()
            };
            let log_train: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_train) as f32 as f64)
                .collect();
            (sigmas, timesteps)
        }
    };
    let last = if full_euler && spec.final_sigma_min {
        train[0] as f64
    } else {
        0.0
    };
    let mut sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    sigmas.push(last);
    let timesteps = if full_euler
        && spec.continuous_timesteps
        && spec.prediction_type == PredictionType::VPrediction
    {
        // diffusers feeds the UNet 0.25·ln σ (f32) for continuous-time v models.
        sigmas[..n]
            .iter()
            .map(|&s| (0.25f32 * (s as f32).ln()) as f64)
            .collect()
    } else {
        timesteps
    };
    (timesteps, sigmas)
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log sigma is `sigma`'s,
/// interpolated linearly between the two neighbouring training log sigmas (f32, as numpy holds
/// them) and clamped to the training range.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is at or below ours (0 when none is), kept one short of the
    // end so there is a neighbour above.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len().saturating_sub(2));
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    // numpy: f32 - f32 stays f32; mixed with the f64 log sigma it widens.
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `torch.cumprod` of f32 values on the CPU: the running product is kept in f64 (torch's
/// accumulation type for float) and each prefix rounded to f32.
fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: f32 endpoints and step, each
/// value one fused multiply-add from the nearer end.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// `np.linspace(start, end, n)` in f64: `i * step + start`, the last value exactly `end`.
fn numpy_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = end;
    v
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
    use std::path::Path;

    use super::*;

    /// SD's training schedule with the given spacing.
    fn spec(spacing: &str) -> SchedulerSpec {
        let json = serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "timestep_spacing": spacing, "steps_offset": 1,
        });
        SchedulerSpec::from_json(&json, Path::new("<test>")).unwrap()
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

    #[test]
    fn torch_linspace_hits_both_ends() {
        let v = torch_linspace_f32(0.0001, 0.02, 1000);
        assert_eq!(v[0], 0.0001f32);
        assert_eq!(v[999], 0.02f32);
        assert_eq!(torch_linspace_f32(0.5, 1.0, 1), [0.5f32]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero_alpha() {
        let betas = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000)
            .into_iter()
            .map(|b| b * b)
            .collect::<Vec<_>>();
        let r = rescale_zero_terminal_snr(&betas);
        assert_eq!(r.len(), 1000);
        assert_eq!(r[999], 1.0, "the last beta takes all the signal");
        assert!((r[0] - betas[0]).abs() < 1e-6);
    }

    #[test]
    fn sigma_to_t_inverts_the_training_sigmas() {
        let log: Vec<f32> = (1..=10).map(|i| (i as f32).ln()).collect();
        assert!((sigma_to_t(3.0, &log) - 2.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.5, &log), 0.0);
        assert_eq!(sigma_to_t(100.0, &log), 9.0);
    }
}
