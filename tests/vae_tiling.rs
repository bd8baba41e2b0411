//! The VAE decode's bounded-memory modes on the tiny model: tiles (diffusers'
//! `enable_vae_tiling`) and one image at a time (`enable_vae_slicing`).
//!
//! Reference: tests/fixtures/vae_tiling/tiny.safetensors, made by
//! `scripts/make_vae_tiling_fixture.py` — diffusers' whole and tiled decodes of one latent at
//! a 64-pixel tile. Tolerance: the agreement tests' VAE tolerance, 1e-4 relative to the
//! reference's largest magnitude, f32 on the CPU.
//!
//! Tiling is not free: each tile normalises with its own group-norm statistics, so on the
//! tiny model's random weights a tiled decode differs from the whole one by up to ~2.1 (mean
//! ~0.18) — exactly as much as diffusers' own tiled decode does (checked below). A tile that
//! covers the whole image decodes it exactly as the whole decode.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use popcon_worker::engine::preset::PresetRegistry;
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{Engine, EngineOptions, VaeTiling};

fn fixture() -> Result<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae_tiling/tiny.safetensors");
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn get(fx: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    fx.get(name)
        .cloned()
        .with_context(|| format!("fixture tensor {name} missing"))
}

fn engine(tiling: VaeTiling) -> Result<Engine> {
    let dir = PresetRegistry::default_models_dir();
    let reg = PresetRegistry::load(&dir)?;
    let preset = reg.get("tiny")?;
    let files = ModelFiles::locate(preset, &dir, None)?;
    let options = EngineOptions {
        vae_tiling: tiling,
        ..Default::default()
    };
    Ok(Engine::load(preset, &files, &options)?)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    if a.dims() != b.dims() {
        bail!("shape {:?} vs reference {:?}", a.dims(), b.dims());
    }
    Ok(max_abs(&(a - b)?)? / max_abs(b)?.max(1e-12))
}

#[test]
fn tiled_decode_matches_diffusers_tiled_decode() -> Result<()> {
    let fx = fixture()?;
    let z = get(&fx, "latent")?;
    let engine = engine(VaeTiling::Pixels(64))?;
    let tiled = engine.vae().decode(&z)?;
    let e = rel_err(&tiled, &get(&fx, "tiled")?)?;
    assert!(
        e <= 1e-4,
        "tiled decode vs diffusers' tiled decode: relative error {e:e}"
    );

    // Whole decode vs diffusers' whole decode, and the tiling's own effect equal on both sides.
    let whole = engine.vae().decode_whole(&z)?;
    let e = rel_err(&whole, &get(&fx, "whole")?)?;
    assert!(e <= 1e-4, "whole decode vs diffusers: relative error {e:e}");
    let ours = max_abs(&(&tiled - &whole)?)?;
    let theirs = max_abs(&(get(&fx, "tiled")? - get(&fx, "whole")?)?)?;
    assert!(
        ours > 0.0,
        "the 64-pixel tile should have tiled a 160x112 decode"
    );
    assert!(
        (ours - theirs).abs() <= 1e-3 * theirs,
        "tiling moved ours by {ours}, diffusers' by {theirs}"
    );
    Ok(())
}

#[test]
fn auto_tiling_leaves_images_up_to_the_training_size_whole() -> Result<()> {
    // The tiny VAE's sample_size is 128: 160x112 is larger, so auto tiles it; a crop of the
    // latent to 16x14 (128x112 pixels) is not, and decodes exactly as the whole decode.
    let fx = fixture()?;
    let z = get(&fx, "latent")?;
    let auto = engine(VaeTiling::Auto)?;
    let off = engine(VaeTiling::Off)?;
    let small = z.narrow(2, 0, 16)?;
    let a = auto.vae().decode(&small)?;
    let b = off.vae().decode(&small)?;
    assert_eq!(
        max_abs(&(&a - &b)?)?,
        0.0,
        "at the training size auto must not tile"
    );
    let big_auto = auto.vae().decode(&z)?;
    let big_off = off.vae().decode(&z)?;
    assert!(
        max_abs(&(&big_auto - &big_off)?)? > 0.0,
        "above the training size auto must tile"
    );
    Ok(())
}

#[test]
fn batch_decodes_equal_single_decodes_tiled_or_not() -> Result<()> {
    let fx = fixture()?;
    let z = get(&fx, "latent")?;
    let z2 = Tensor::cat(&[&z, &z.affine(-0.5, 0.1)?], 0)?;
    for tiling in [VaeTiling::Off, VaeTiling::Pixels(64)] {
        let engine = engine(tiling)?;
        let batch = engine.vae().decode(&z2)?;
        for i in 0..2 {
            let one = engine.vae().decode(&z2.narrow(0, i, 1)?)?;
            let d = max_abs(&(batch.narrow(0, i, 1)? - one)?)?;
            assert_eq!(d, 0.0, "{tiling:?}: image {i} of the batch differs by {d}");
        }
    }
    Ok(())
}

#[test]
fn tiling_setting_parses_and_refuses_precisely() {
    assert_eq!("auto".parse::<VaeTiling>(), Ok(VaeTiling::Auto));
    assert_eq!("off".parse::<VaeTiling>(), Ok(VaeTiling::Off));
    assert_eq!("512".parse::<VaeTiling>(), Ok(VaeTiling::Pixels(512)));
    for bad in ["", "on", "60", "100", "-8"] {
        let err = bad.parse::<VaeTiling>().expect_err(bad);
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
}
