//! Agreement with the reference implementation: the engine, run on the tiny model, must compute
//! what diffusers + transformers computed with the same weights (fixtures made by
//! `scripts/make_tiny_model.py`, which also proves its loop equals diffusers' own pipelines).
//!
//! Randomness: torch's RNG and ours (ChaCha8) differ, so a seed can't mean the same noise in
//! both. Each generation case therefore *replays* every draw diffusers made — initial noise,
//! the VAE sample's noise and `add_noise`'s noise for img2img, and each Euler-ancestral step's
//! noise — through [`ReplayNoise`], in the order the engine draws them. Everything else (text
//! encoding, UNet, schedulers, VAE, pixel conversion) is computed independently here.
//! Tolerances: fp32 on CPU; latents to 1e-4 relative to their largest magnitude; pixels within
//! 2/255 (rounding differs: numpy rounds halves to even).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, IndexOp, Tensor};
use popcon_worker::engine::animate::AnimateRequest;
use popcon_worker::engine::clip::ClipTextEncoder;
use popcon_worker::engine::motion_preset::AnimationRegistry;
use popcon_worker::engine::noise::ReplayNoise;
use popcon_worker::engine::preset::{PresetRegistry, SchedulerKind};
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{
    Engine, EngineOptions, GenerateRequest, InitImage, config, no_observer,
};
use serde_json::Value;

fn fixture_dir(model: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model)
}

struct Fixture {
    json: Value,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(model: &str) -> Result<Self> {
        let dir = fixture_dir(model);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)?;
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)?;
        Ok(Self { json, tensors })
    }

    fn t(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .with_context(|| format!("fixture tensor {name} missing"))
    }
}

fn engine(model: &str) -> Result<Engine> {
    let dir = PresetRegistry::default_models_dir();
    let reg = PresetRegistry::load(&dir)?;
    let preset = reg.get(model)?;
    let files = ModelFiles::locate(preset, &dir, None)?;
    Ok(Engine::load(preset, &files, &EngineOptions::default())?)
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    if a.dims() != b.dims() {
        bail!("shape {:?} vs reference {:?}", a.dims(), b.dims());
    }
    let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) -> Result<()> {
    let e = rel_err(a, b)?;
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
    Ok(())
}

#[test]
fn tokenizer_ids_match_transformers_for_every_case() -> Result<()> {
    let fx = Fixture::load("tiny")?;
    let engine = engine("tiny")?;
    let cases = fx.json["tokenizer"].as_array().context("tokenizer cases")?;
    assert!(cases.len() >= 10);
    for case in cases {
        let prompt = case["prompt"].as_str().context("prompt")?;
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        assert_eq!(engine.tokenize(prompt)[0], want, "prompt {prompt:?}");
    }
    Ok(())
}

#[test]
fn text_encoder_last_penultimate_and_pooled_match() -> Result<()> {
    let fx = Fixture::load("tiny")?;
    let dir = PresetRegistry::default_models_dir().join("tiny");
    let spec = config::read_clip_text(&dir.join("text_encoder/config.json"))?;
    // SAFETY: read-only mmap of a file this test does not modify.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("text_encoder/model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let encoder = ClipTextEncoder::new(vb, &spec, 1313)?;
    let ids: Vec<Vec<u32>> = serde_json::from_value(fx.json["text_encoder"]["input_ids"].clone())?;
    let out = encoder.encode(&ids)?;
    assert_close(
        "last hidden state",
        &out.last,
        &fx.t("text_encoder.text_last")?,
        1e-5,
    )?;
    assert_close(
        "penultimate",
        &out.penultimate,
        &fx.t("text_encoder.text_penultimate")?,
        1e-5,
    )?;
    assert_close(
        "pooled",
        &out.pooled,
        &fx.t("text_encoder.text_pooled")?,
        1e-5,
    )?;
    Ok(())
}

#[test]
fn unet_output_matches() -> Result<()> {
    let fx = Fixture::load("tiny")?;
    let engine = engine("tiny")?;
    let out = engine.unet_forward(
        &fx.t("unet_single.sample")?,
        500.0,
        &fx.t("text_encoder.text_last")?,
        None,
    )?;
    assert_close("unet", &out, &fx.t("unet_single.out")?, 1e-4)
}

#[test]
fn vae_decode_and_encode_match() -> Result<()> {
    let fx = Fixture::load("tiny")?;
    let engine = engine("tiny")?;
    let vae = engine.vae();
    let decoded = vae.decode(&fx.t("vae.vae_decode_in")?)?;
    assert_close("vae decode", &decoded, &fx.t("vae.vae_decode_out")?, 1e-4)?;
    let dist = vae.encode(&fx.t("vae.vae_encode_in")?)?;
    assert_close("vae mean", &dist.mean, &fx.t("vae.vae_encode_mean")?, 1e-4)?;
    assert_close("vae std", &dist.std, &fx.t("vae.vae_encode_std")?, 1e-4)?;
    Ok(())
}

/// Runs one generation case of `model`'s fixture through the engine with replayed noise.
fn run_case(model: &str, name: &str) -> Result<()> {
    let fx = Fixture::load(model)?;
    let engine = engine(model)?;
    let case = &fx.json[name];
    let prompts: Vec<String> = serde_json::from_value(case["prompts"].clone())?;
    // Cases without guidance encode no negative prompt (null in the manifest).
    let negatives: Vec<String> =
        serde_json::from_value(case["negative_prompts"].clone()).unwrap_or_default();
    let n = prompts.len();
    let mut req = GenerateRequest::new(engine.preset(), prompts, 0);
    req.negative_prompt = negatives.first().cloned().unwrap_or_default();
    req.steps = case["num_inference_steps"].as_u64().context("steps")? as usize;
    req.guidance = case["guidance_scale"].as_f64().context("guidance")?;
    req.width = case["width"].as_u64().context("width")? as usize;
    req.height = case["height"].as_u64().context("height")? as usize;
    req.scheduler = Some(match case["scheduler_class"].as_str() {
        Some("EulerAncestralDiscreteScheduler") => SchedulerKind::EulerAncestral,
        Some("EulerDiscreteScheduler") => SchedulerKind::Euler,
        Some("DDIMScheduler") => SchedulerKind::Ddim,
        other => bail!("unexpected scheduler {other:?}"),
    });
    req.timestep_spacing = case["scheduler_config"]["timestep_spacing"]
        .as_str()
        .map(str::to_string);

    let mut noise = ReplayNoise::new(n);
    let per_image = |t: &Tensor, noise: &mut ReplayNoise| -> Result<()> {
        for i in 0..n {
            noise.push(i, t.i(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(())
    };
    if case["kind"] == "img2img" {
        let png = std::fs::read(fixture_dir(model).join("init.png"))?;
        let image = image::load_from_memory(&png)?.to_rgb8();
        let strength = case["strength"].as_f64().context("strength")?;
        req.init = Some(InitImage { image, strength });
        per_image(&fx.t(&format!("{name}.encode_noise"))?, &mut noise)?;
        per_image(&fx.t(&format!("{name}.add_noise"))?, &mut noise)?;
    } else {
        per_image(&fx.t(&format!("{name}.init_noise"))?, &mut noise)?;
    }
    if let Ok(steps) = fx.t(&format!("{name}.step_noise")) {
        for s in 0..steps.dim(0)? {
            per_image(&steps.i(s)?, &mut noise)?;
        }
    }

    let out = engine.generate_with_noise(&req, &mut noise, &mut no_observer())?;
    assert_eq!(noise.remaining(), 0, "{name}: every recorded draw is used");
    assert_close(
        &format!("{name} final latents"),
        &out.latents,
        &fx.t(&format!("{name}.final_latents"))?,
        1e-4,
    )?;
    let pixels = fx.t(&format!("{name}.pixels"))?.to_dtype(DType::U8)?;
    for (i, img) in out.images.iter().enumerate() {
        let want = pixels.i(i)?.flatten_all()?.to_vec1::<u8>()?;
        let got: Vec<u8> = img.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert!(worst <= 2, "{name} image {i}: a pixel is {worst}/255 off");
        assert!(img.pixels().all(|p| p[3] == 255), "no alpha key was asked");
    }
    Ok(())
}

#[test]
fn txt2img_euler_ancestral_with_guidance_batch_of_two() -> Result<()> {
    run_case("tiny", "t2i_euler_a")
}

#[test]
fn txt2img_euler_without_guidance() -> Result<()> {
    run_case("tiny", "t2i_euler")
}

#[test]
fn txt2img_ddim_with_negative_prompt() -> Result<()> {
    run_case("tiny", "t2i_ddim")
}

#[test]
fn img2img_euler_ancestral() -> Result<()> {
    run_case("tiny", "i2i_euler_a")
}

#[test]
fn img2img_ddim() -> Result<()> {
    run_case("tiny", "i2i_ddim")
}

// SDXL: two text encoders (penultimate layers concatenated), encoder 2's pooled and projected
// embedding, and the UNet's `text_time` added conditioning, against `StableDiffusionXLPipeline`.

#[test]
fn sdxl_tokenizers_match_both_of_transformers() -> Result<()> {
    let fx = Fixture::load("tiny-xl")?;
    let engine = engine("tiny-xl")?;
    for case in fx.json["tokenizer"].as_array().context("tokenizer cases")? {
        let prompt = case["prompt"].as_str().context("prompt")?;
        let ids = engine.tokenize(prompt);
        let want1: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        let want2: Vec<u32> = serde_json::from_value(case["ids_2"].clone())?;
        assert_eq!(ids, [want1, want2], "prompt {prompt:?}");
    }
    Ok(())
}

#[test]
fn sdxl_prompt_embeddings_and_pooled_match_encode_prompt() -> Result<()> {
    let fx = Fixture::load("tiny-xl")?;
    let engine = engine("tiny-xl")?;
    let prompts: Vec<String> = vec!["a cheerful cat, sticker".into(), "a red fox".into()];
    let cond = engine.encode_prompts(&prompts)?;
    assert_close(
        "prompt_embeds",
        &cond.context,
        &fx.t("text.prompt_embeds")?,
        1e-5,
    )?;
    let pooled = cond.pooled.context("SDXL yields a pooled embedding")?;
    assert_close("pooled", &pooled, &fx.t("text.pooled_prompt_embeds")?, 1e-5)?;
    Ok(())
}

#[test]
fn sdxl_unet_with_text_time_conditioning_matches() -> Result<()> {
    let fx = Fixture::load("tiny-xl")?;
    let engine = engine("tiny-xl")?;
    let added = popcon_worker::engine::unet::AddedCond {
        text_embeds: fx.t("text.pooled_prompt_embeds")?,
        time_ids: engine.time_ids(2, 64, 64)?,
    };
    assert_close(
        "time ids",
        &added.time_ids.narrow(0, 0, 1)?,
        &fx.t("add_time_ids.time_ids")?,
        0.0,
    )?;
    let out = engine.unet_forward(
        &fx.t("unet_single.sample")?,
        500.0,
        &fx.t("text.prompt_embeds")?,
        Some(&added),
    )?;
    assert_close("sdxl unet", &out, &fx.t("unet_single.out")?, 1e-4)?;
    // Without the added conditioning the model refuses rather than guessing.
    let err = engine.unet_forward(
        &fx.t("unet_single.sample")?,
        500.0,
        &fx.t("text.prompt_embeds")?,
        None,
    );
    assert!(err.is_err());
    Ok(())
}

#[test]
fn sdxl_txt2img_with_guidance_and_zeroed_negative() -> Result<()> {
    run_case("tiny-xl", "t2i_cfg")
}

#[test]
fn sdxl_txt2img_without_guidance() -> Result<()> {
    run_case("tiny-xl", "t2i_nocfg")
}

// ---- AnimateDiff: the motion UNet and video-to-video (fixtures: scripts/make_tiny_motion.py) --

fn animation_engine() -> Result<Engine> {
    let dir = PresetRegistry::default_models_dir();
    let anims = AnimationRegistry::load(&dir)?;
    let anim = anims.get("tiny-motion")?;
    let reg = PresetRegistry::load(&dir)?;
    let base = reg.get(&anim.base)?;
    Ok(Engine::load_animation(
        anim,
        base,
        &ModelFiles::locate(base, &dir, None)?,
        &ModelFiles::locate(anim, &dir, None)?,
        &EngineOptions::default(),
    )?)
}

/// `[rows, …]` with each row repeated `frames` times in place (torch's `repeat_interleave`).
fn per_frame(t: &Tensor, frames: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let mut rep = vec![1; dims.len() + 1];
    rep[1] = frames;
    let mut out = dims.clone();
    out[0] *= frames;
    Ok(t.unsqueeze(1)?.repeat(rep)?.reshape(out)?)
}

#[test]
fn motion_unet_matches_diffusers_unet_motion_model() -> Result<()> {
    let fx = Fixture::load("tiny-motion")?;
    let engine = animation_engine()?;
    let frames = fx.json["motion_unet"]["frames"]
        .as_u64()
        .context("frames")? as usize;
    let sample = fx.t("motion_unet.sample")?; // [clips, frames, 4, 8, 8]
    let (clips, f, c, h, w) = sample.dims5()?;
    assert_eq!(f, frames);
    let ctx = fx.t("motion_unet.context")?;
    let ctx = per_frame(&Tensor::cat(&[&ctx, &(&ctx * 0.5)?], 0)?, frames)?;
    let out =
        engine.motion_unet_forward(&sample.reshape((clips * f, c, h, w))?, 500.0, &ctx, frames)?;
    let want = fx.t("motion_unet.out")?.reshape((clips * f, c, h, w))?;
    assert_close("motion unet", &out, &want, 1e-4)?;
    // Without the adapter's modules the same UNet computes something else: they do act.
    let plain = engine.unet_forward(&sample.reshape((clips * f, c, h, w))?, 500.0, &ctx, None)?;
    assert!(
        rel_err(&plain, &want)? > 1e-2,
        "motion modules changed nothing"
    );
    Ok(())
}

fn v2v_request(case: &Value, still: image::RgbImage) -> Result<AnimateRequest> {
    Ok(AnimateRequest {
        prompts: vec![case["prompt"].as_str().context("prompt")?.to_string()],
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").to_string(),
        seeds: vec![0],
        stills: vec![still],
        frames: case["frames"].as_u64().context("frames")? as usize,
        steps: case["num_inference_steps"].as_u64().context("steps")? as usize,
        guidance: case["guidance_scale"].as_f64().context("guidance")?,
        strength: case["strength"].as_f64().context("strength")?,
        width: case["width"].as_u64().context("width")? as usize,
        height: case["height"].as_u64().context("height")? as usize,
        scheduler: Some(match case["scheduler_class"].as_str() {
            Some("EulerAncestralDiscreteScheduler") => SchedulerKind::EulerAncestral,
            Some("EulerDiscreteScheduler") => SchedulerKind::Euler,
            other => bail!("unexpected scheduler {other:?}"),
        }),
        timestep_spacing: case["scheduler_config"]["timestep_spacing"]
            .as_str()
            .map(str::to_string),
        alpha_key: popcon_worker::kernels::AlphaKey::disabled(),
    })
}

fn run_v2v_case(name: &str) -> Result<()> {
    let fx = Fixture::load("tiny-motion")?;
    let engine = animation_engine()?;
    let png = std::fs::read(fixture_dir("tiny-motion").join("init.png"))?;
    let still = image::load_from_memory(&png)?.to_rgb8();
    let case = &fx.json[name];
    let req = v2v_request(case, still)?;
    let mut noise = ReplayNoise::new(1);
    let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    noise.push(0, flat(fx.t(&format!("{name}.encode_noise"))?)?);
    noise.push(0, flat(fx.t(&format!("{name}.add_noise"))?)?);
    if let Ok(steps) = fx.t(&format!("{name}.step_noise")) {
        for s in 0..steps.dim(0)? {
            noise.push(0, flat(steps.i(s)?)?);
        }
    }
    let out = engine.animate_with_noise(&req, &mut noise, &mut no_observer())?;
    assert_eq!(noise.remaining(), 0, "{name}: every recorded draw is used");
    assert_close(
        &format!("{name} final latents"),
        &out.latents,
        &fx.t(&format!("{name}.final_latents"))?,
        1e-4,
    )?;
    let pixels = fx.t(&format!("{name}.pixels"))?.to_dtype(DType::U8)?;
    assert_eq!(out.clips.len(), 1);
    assert_eq!(out.clips[0].len(), req.frames);
    for (i, img) in out.clips[0].iter().enumerate() {
        let want = pixels.i(i)?.flatten_all()?.to_vec1::<u8>()?;
        let got: Vec<u8> = img.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        assert!(worst <= 2, "{name} frame {i}: a pixel is {worst}/255 off");
    }
    Ok(())
}

#[test]
fn video_to_video_euler_ancestral_with_guidance_matches_the_pipeline() -> Result<()> {
    run_v2v_case("v2v_euler_a")
}

#[test]
fn video_to_video_lightning_settings_match_the_pipeline() -> Result<()> {
    run_v2v_case("v2v_euler_lightning")
}
