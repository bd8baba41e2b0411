//! The engine's schedulers against diffusers 0.42.1 on scheduler configs, and the reader's
//! refusals.
//!
//! Each `tests/fixtures/schedulers/*.json` (written by `scripts/make_scheduler_fixtures.py`)
//! holds a `scheduler_config.json` as a repo ships it, the class that runs on it, and what
//! diffusers made of it: timesteps, sigmas or cumulative alphas, the initial noise scale, and a
//! chain of `scale_model_input` + `step` calls on small fixed inputs. Here the config goes
//! through the engine's own reader from a real file, and every number is compared.
//!
//! Tolerances: timesteps exactly where diffusers' are integers or f32 casts of linspace, and to
//! 1e-6 relative where they are mapped back from re-spaced sigmas (a last-ulp difference in f32
//! `ln` moves them); schedule values (sigmas, alphas, noise scale) to 1e-6 relative (they agree
//! to an f32 ulp or two: torch's `** 0.5` is a pow, not a correctly rounded sqrt); scaled
//! model inputs to 1e-5 relative; step results to 1e-5 of the step input's largest magnitude
//! (at least 1): a step cancels terms that large, in f32, in a different order than torch.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use popcon_worker::engine::EngineError;
use popcon_worker::engine::config::read_scheduler;
use popcon_worker::engine::preset::SchedulerKind;
use popcon_worker::engine::scheduler::Scheduler;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn floats(v: &Value, what: &str) -> Result<Vec<f64>> {
    v.as_array()
        .with_context(|| format!("{what} is not a list"))?
        .iter()
        .map(|x| {
            x.as_f64()
                .with_context(|| format!("{what} holds a non-number"))
        })
        .collect()
}

fn rows(v: &Value, what: &str) -> Result<Vec<Vec<f64>>> {
    v.as_array()
        .with_context(|| format!("{what} is not a list"))?
        .iter()
        .enumerate()
        .map(|(i, r)| floats(r, &format!("{what}[{i}]")))
        .collect()
}

fn close(what: &str, got: f64, want: f64, rel: f64, abs: f64) -> Result<()> {
    ensure!(
        (got - want).abs() <= rel * want.abs() + abs,
        "{what}: got {got}, diffusers {want}"
    );
    Ok(())
}

fn close_all(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, diffusers has {}",
        got.len(),
        want.len()
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{what}[{i}]"), *g, *w, rel, abs)?;
    }
    Ok(())
}

fn tensor(values: &[f64], shape: &[usize]) -> Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn values(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect())
}

/// Writes `json` as a repo's `scheduler/scheduler_config.json` under `dir`.
fn config_file(dir: &Path, json: &str) -> Result<PathBuf> {
    let sub = dir.join("scheduler");
    std::fs::create_dir_all(&sub)?;
    let path = sub.join("scheduler_config.json");
    std::fs::write(&path, json)?;
    Ok(path)
}

fn check_case(path: &Path) -> Result<()> {
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let kind = match fx["run_class"].as_str() {
        Some("DDIMScheduler") => SchedulerKind::Ddim,
        Some("EulerDiscreteScheduler") => SchedulerKind::Euler,
        Some("EulerAncestralDiscreteScheduler") => SchedulerKind::EulerAncestral,
        other => bail!("unexpected run_class {other:?}"),
    };
    let tmp = tempfile::tempdir()?;
    let file = config_file(tmp.path(), &fx["config"].to_string())?;
    let spec = read_scheduler(&file)?;
    let steps = fx["steps"].as_u64().context("steps")? as usize;
    let s = Scheduler::new(kind, &spec, None, steps)?;

    let want_t = floats(&fx["timesteps"], "timesteps")?;
    let config = &fx["config"];
    let respaced = kind == SchedulerKind::Euler
        && (config["use_karras_sigmas"] == true
            || config["use_exponential_sigmas"] == true
            || config["timestep_type"] == "continuous");
    if respaced {
        close_all("timesteps", s.timesteps(), &want_t, 1e-6, 0.0)?;
    } else {
        // Compared as the f32 values both sides hold: serde_json's default float parsing may
        // land one f64 ulp off a decimal, which the f32 rounding absorbs.
        let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
        ensure!(
            as_f32(s.timesteps()) == as_f32(&want_t),
            "timesteps: got {:?}, diffusers {want_t:?}",
            s.timesteps()
        );
    }
    close(
        "init_noise_sigma",
        s.init_noise_sigma(),
        fx["init_noise_sigma"]
            .as_f64()
            .context("init_noise_sigma")?,
        1e-6,
        0.0,
    )?;
    if kind == SchedulerKind::Ddim {
        let want = floats(&fx["alphas_cumprod_at_timesteps"], "alphas")?;
        let got: Vec<f64> = s
            .timesteps()
            .iter()
            .map(|&t| f64::from(s.alphas_cumprod()[t as usize]))
            .collect();
        close_all("alphas_cumprod at timesteps", &got, &want, 1e-6, 0.0)?;
        close(
            "final_alpha_cumprod",
            s.final_alpha_cumprod(),
            fx["final_alpha_cumprod"].as_f64().context("final alpha")?,
            1e-6,
            0.0,
        )?;
    } else {
        close_all(
            "sigmas",
            s.sigmas(),
            &floats(&fx["sigmas"], "sigmas")?,
            1e-6,
            0.0,
        )?;
    }

    let shape: Vec<usize> = floats(&fx["shape"], "shape")?
        .into_iter()
        .map(|d| d as usize)
        .collect();
    let inputs = rows(&fx["model_inputs"], "model_inputs")?;
    let outputs = rows(&fx["model_outputs"], "model_outputs")?;
    let prevs = rows(&fx["prev_samples"], "prev_samples")?;
    let noise = if s.needs_step_noise() {
        rows(&fx["step_noise"], "step_noise")?
    } else {
        Vec::new()
    };
    let mut sample = floats(&fx["sample"], "sample")?;
    for i in 0..steps {
        let x = tensor(&sample, &shape)?;
        let scaled = values(&s.scale_model_input(&x, i)?)?;
        close_all(
            &format!("step {i} model input"),
            &scaled,
            &inputs[i],
            1e-5,
            1e-6,
        )?;
        let n = match noise.get(i) {
            Some(n) => Some(tensor(n, &shape)?),
            None => None,
        };
        let prev = s.step(&tensor(&outputs[i], &shape)?, i, &x, n.as_ref())?;
        // A step subtracts terms as large as its input (sigma-scaled latents reach thousands
        // under zero SNR), so its rounding is relative to that magnitude, not to the result's.
        let scale = sample.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        close_all(
            &format!("step {i} result"),
            &values(&prev)?,
            &prevs[i],
            0.0,
            1e-5 * scale,
        )?;
        // Continue from diffusers' result, as the fixture did, so each step is judged alone.
        sample = prevs[i].clone();
    }
    Ok(())
}

#[test]
fn schedulers_agree_with_diffusers() -> Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixture_dir())?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "json"));
    paths.sort();
    ensure!(paths.len() >= 10, "scheduler fixtures missing");
    let mut failures = Vec::new();
    for p in &paths {
        if let Err(e) = check_case(p) {
            failures.push(format!("{}: {e:#}", p.display()));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// The DDIM class defaults change the image: the last step goes to alpha 1, and the predicted
/// clean sample is clamped. A config that spells out the SD 1.5 values does neither.
#[test]
fn ddim_class_defaults_differ_from_sd15_values() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let betas = r#""beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear""#;
    let silent = config_file(
        tmp.path(),
        &format!(r#"{{"_class_name":"DDIMScheduler",{betas}}}"#),
    )?;
    let silent = Scheduler::new(SchedulerKind::Ddim, &read_scheduler(&silent)?, None, 5)?;
    assert_eq!(silent.final_alpha_cumprod(), 1.0);
    let explicit = config_file(
        tmp.path(),
        &format!(
            r#"{{"_class_name":"DDIMScheduler",{betas},"set_alpha_to_one":false,"clip_sample":false}}"#
        ),
    )?;
    let explicit = Scheduler::new(SchedulerKind::Ddim, &read_scheduler(&explicit)?, None, 5)?;
    assert!(explicit.final_alpha_cumprod() < 1.0);

    // A large predicted sample: clamped to ±1 by the defaults only.
    let x = Tensor::new(&[3.0f32, -3.0], &Device::Cpu)?;
    let eps = Tensor::new(&[0.0f32, 0.0], &Device::Cpu)?;
    let last = silent.timesteps().len() - 1;
    let clipped = values(&silent.step(&eps, last, &x, None)?)?;
    let plain = values(&explicit.step(&eps, last, &x, None)?)?;
    assert_eq!(clipped, [1.0, -1.0]);
    assert!(plain[0] > 2.9, "{plain:?}");
    Ok(())
}

fn refusal(json: &str) -> Result<(PathBuf, EngineError)> {
    let tmp = tempfile::tempdir()?;
    let path = config_file(tmp.path(), json)?;
    match read_scheduler(&path) {
        Ok(spec) => bail!("{json} was accepted: {spec:?}"),
        Err(e) => Ok((path, e)),
    }
}

#[test]
fn keys_that_change_the_arithmetic_are_refused_by_name() -> Result<()> {
    for (json, key) in [
        (
            r#"{"_class_name":"DDIMScheduler","thresholding":true}"#,
            "`thresholding`",
        ),
        (
            r#"{"_class_name":"EulerDiscreteScheduler","use_beta_sigmas":true}"#,
            "`use_beta_sigmas`",
        ),
        (
            r#"{"_class_name":"EulerDiscreteScheduler","interpolation_type":"log_linear"}"#,
            "`interpolation_type`",
        ),
        (
            r#"{"use_karras_sigmas":true,"use_exponential_sigmas":true}"#,
            "`use_karras_sigmas`",
        ),
        (r#"{"use_karras_sigmas":null}"#, "`use_karras_sigmas`"),
        (r#"{"beta_schedule":"sigmoid"}"#, "`beta_schedule`"),
        (
            r#"{"final_sigmas_type":"sigma_max"}"#,
            "`final_sigmas_type`",
        ),
        (r#"{"timestep_type":"dual"}"#, "`timestep_type`"),
        (r#"{"timestep_spacing":"random"}"#, "`timestep_spacing`"),
        (
            r#"{"prediction_type":"flow_prediction"}"#,
            "`prediction_type`",
        ),
        (
            r#"{"num_train_timesteps":4,"trained_betas":[0.1,0.2,0.3]}"#,
            "`trained_betas`",
        ),
        (r#"{"_class_name":"LCMScheduler"}"#, "`_class_name`"),
        (r#"{"clip_sample":"yes"}"#, "`clip_sample`"),
        (r#"{"steps_offset":1.5}"#, "`steps_offset`"),
    ] {
        let (path, err) = refusal(json)?;
        assert_eq!(err.kind(), "config", "{json}");
        assert!(!err.is_retryable(), "{json}");
        let msg = err.to_string();
        assert!(msg.contains(key), "{json}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "{json}: {msg}");
    }
    Ok(())
}

#[test]
fn sample_prediction_is_refused_for_the_ancestral_sampler_only() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = config_file(tmp.path(), r#"{"prediction_type":"sample"}"#)?;
    let spec = read_scheduler(&path)?;
    Scheduler::new(SchedulerKind::Ddim, &spec, None, 4)?;
    Scheduler::new(SchedulerKind::Euler, &spec, None, 4)?;
    let err = Scheduler::new(SchedulerKind::EulerAncestral, &spec, None, 4)
        .err()
        .context("the ancestral sampler took sample prediction")?;
    let msg = err.to_string();
    assert_eq!(err.kind(), "config");
    assert!(msg.contains("`prediction_type`"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    Ok(())
}

/// Keys that don't change what the running class computes load: their off values, another
/// class's keys, bookkeeping, and keys no class takes (diffusers warns and ignores those too).
#[test]
fn keys_without_arithmetic_are_accepted() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for json in [
        r#"{"_class_name":"DDIMScheduler","thresholding":false,"dynamic_thresholding_ratio":0.9,
            "sample_max_value":2.0,"_diffusers_version":"0.42.1"}"#,
        r#"{"_class_name":"EulerDiscreteScheduler","use_beta_sigmas":false,
            "interpolation_type":"linear","timestep_type":"discrete","final_sigmas_type":"zero",
            "sigma_min":null,"sigma_max":null}"#,
        r#"{"_class_name":"PNDMScheduler","skip_prk_steps":true,"tensor_format":"pt"}"#,
        r#"{"clip_sample":null,"set_alpha_to_one":null,"rescale_betas_zero_snr":null}"#,
    ] {
        let path = config_file(tmp.path(), json)?;
        read_scheduler(&path).with_context(|| json.to_string())?;
    }
    Ok(())
}
