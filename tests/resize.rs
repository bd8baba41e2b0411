//! Init-image resizing against Pillow: every case in `tests/fixtures/resize/` (made by
//! `scripts/make_resize_fixture.py` through diffusers' `VaeImageProcessor.resize`) must come out
//! of `engine::resize::resize_lanczos` within 2/255 of what Pillow wrote, per channel.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use image::RgbImage;
use popcon_worker::engine::resize::resize_lanczos;

/// The acceptance bound of issue #8 item 6, in 8-bit levels.
const TOLERANCE: u8 = 2;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize")
}

fn load(name: &str) -> Result<RgbImage> {
    let path = fixture_dir().join(name);
    let img = image::open(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(img.to_rgb8())
}

struct Case {
    name: String,
    input: RgbImage,
    expected: RgbImage,
}

fn cases() -> Result<Vec<Case>> {
    let path = fixture_dir().join("manifest.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let manifest: serde_json::Value = serde_json::from_str(&text)?;
    let list = manifest["cases"].as_array().context("manifest: cases")?;
    let mut out = Vec::new();
    for c in list {
        let name = c["name"].as_str().context("case name")?.to_string();
        let input = load(c["input"].as_str().context("case input")?)?;
        let expected = load(c["expected"].as_str().context("case expected")?)?;
        let size = |key: &str, i: usize| -> Result<u32> {
            let v = c[key][i]
                .as_u64()
                .with_context(|| format!("{name}: {key}[{i}]"))?;
            Ok(u32::try_from(v)?)
        };
        ensure!(
            input.dimensions() == (size("input_size", 0)?, size("input_size", 1)?),
            "{name}: input PNG size disagrees with the manifest"
        );
        ensure!(
            expected.dimensions() == (size("output_size", 0)?, size("output_size", 1)?),
            "{name}: expected PNG size disagrees with the manifest"
        );
        out.push(Case {
            name,
            input,
            expected,
        });
    }
    ensure!(!out.is_empty(), "manifest lists no cases");
    Ok(out)
}

/// Largest per-channel difference, with where it is (x, y, channel) for the failure message.
fn max_diff(a: &RgbImage, b: &RgbImage) -> (u8, (u32, u32, usize)) {
    let mut worst = (0u8, (0, 0, 0));
    for (x, y, pa) in a.enumerate_pixels() {
        let pb = b.get_pixel(x, y);
        for c in 0..3 {
            let d = pa[c].abs_diff(pb[c]);
            if d > worst.0 {
                worst = (d, (x, y, c));
            }
        }
    }
    worst
}

#[test]
fn matches_pillow_lanczos_within_two_levels() -> Result<()> {
    let mut report = Vec::new();
    let mut failed = Vec::new();
    for case in cases()? {
        let (w, h) = case.expected.dimensions();
        let got = resize_lanczos(&case.input, w, h)?;
        assert_eq!(got.dimensions(), (w, h), "{}", case.name);
        let (d, (x, y, c)) = max_diff(&got, &case.expected);
        let (iw, ih) = case.input.dimensions();
        let mut line = format!("{}: {iw}×{ih} → {w}×{h}: max |Δ| = {d}/255", case.name);
        if d > 0 {
            line += &format!(" (at x={x} y={y} channel {c})");
        }
        if d > TOLERANCE {
            failed.push(line.clone());
        }
        report.push(line);
    }
    // Printed on success too (visible with --nocapture): the measured figures per case.
    println!("{}", report.join("\n"));
    assert!(
        failed.is_empty(),
        "over {TOLERANCE}/255 from Pillow:\n{}",
        failed.join("\n")
    );
    Ok(())
}

/// Why this module exists: the `image` crate's Lanczos3 (the previous resize) is far from
/// Pillow on these cases. If this ever starts passing, the crate changed and the custom
/// resampler could be reconsidered.
#[test]
fn image_crate_lanczos3_is_not_pillow() -> Result<()> {
    let mut worst = 0;
    for case in cases()? {
        let (w, h) = case.expected.dimensions();
        let old = image::imageops::resize(&case.input, w, h, image::imageops::FilterType::Lanczos3);
        let (d, _) = max_diff(&old, &case.expected);
        println!("image crate Lanczos3, {}: max |Δ| = {d}/255", case.name);
        worst = worst.max(d);
    }
    assert!(
        worst > TOLERANCE,
        "image crate Lanczos3 within {worst}/255 of Pillow"
    );
    Ok(())
}

#[test]
fn engine_tensor_uses_the_pillow_resize() -> Result<()> {
    // image_to_tensor is what img2img encodes; it must carry exactly the resized pixels.
    let case = cases()?
        .into_iter()
        .find(|c| c.name == "down")
        .context("the `down` case")?;
    let (w, h) = case.expected.dimensions();
    let t = popcon_worker::engine::image_to_tensor(
        &case.input,
        w as usize,
        h as usize,
        &candle_core::Device::Cpu,
    )?;
    assert_eq!(t.dims(), &[1, 3, h as usize, w as usize]);
    let ours = resize_lanczos(&case.input, w, h)?;
    let vals = t
        .squeeze(0)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (v, &p) in vals.iter().zip(ours.as_raw()) {
        let expect = p as f32 / 255.0 * 2.0 - 1.0;
        assert!((v - expect).abs() < 1e-6, "{v} vs {expect}");
    }
    Ok(())
}

#[test]
fn zero_sized_request_is_an_engine_error() {
    let img = RgbImage::new(4, 4);
    let err = popcon_worker::engine::image_to_tensor(&img, 0, 8, &candle_core::Device::Cpu)
        .expect_err("zero width");
    assert!(err.to_string().contains("init image"), "{err}");
}
