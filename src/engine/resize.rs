//! PIL-compatible antialiased Lanczos resize for init images.
//!
//! diffusers' `VaeImageProcessor` resizes a PIL init image with
//! `image.resize((w, h), resample=LANCZOS)`, so the latents an img2img run starts from depend on
//! exactly how Pillow resamples. The `image` crate's Lanczos3 follows the same idea but not the
//! same arithmetic (vertical pass always first, f32 weights, an unrounded and unclipped float
//! intermediate), and lands up to 37/255 away from Pillow on the fixtures (12/255 on a
//! photo-like 200×150 → 128² downscale). This module reimplements Pillow's algorithm for 8-bit
//! RGB, written from its description:
//!
//! * separable: a horizontal and a vertical pass, each rounded and clipped to `u8` (the
//!   intermediate rounding is part of what Pillow outputs, so it is reproduced, and so is
//!   Pillow's choice of which pass runs first);
//! * per axis, `scale = in / out`; the kernel is widened by `max(scale, 1)` so a downscale
//!   averages every source pixel it covers (antialiasing) — support `3 · max(scale, 1)`;
//! * output pixel `i` is centred at `(i + 0.5) · scale` in source coordinates; source pixel `j`
//!   gets weight `lanczos3((j + 0.5 − centre) / max(scale, 1))`, weights normalised to sum 1;
//! * the weights are then quantised to 22-bit fixed point and the sums done in integers with
//!   round-half-up, which is how Pillow computes 8-bit images (its float weights are never used
//!   directly on 8-bit data).
//!
//! Following the same float expressions in the same order is meant to match Pillow bit for bit;
//! `tests/resize.rs` holds it to 2/255 against fixtures made through diffusers
//! (`scripts/make_resize_fixture.py`, Pillow 13.0).

use image::RgbImage;

/// Why a resize was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResizeError {
    #[error("cannot resize an image of size {width}×{height}: both sides must be at least 1")]
    EmptyInput { width: u32, height: u32 },
    #[error("cannot resize to {width}×{height}: both sides must be at least 1")]
    EmptyOutput { width: u32, height: u32 },
    #[error("resizing to {width}×{height} would need a buffer larger than memory can address")]
    TooLarge { width: u32, height: u32 },
}

/// Fixed-point precision of the quantised weights. 8 bits are left for the pixel value and 2
/// for the overshoot of a kernel with negative lobes (partial sums beyond [0, 255]) — the same
/// split Pillow uses, which matters because the quantisation error is part of its output.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Lanczos-3 support radius in (unscaled) source pixels.
const SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Lanczos-3 window. The half-open interval [-3, 3) is deliberate: it is the one Pillow uses,
/// and a tap exactly at +3 must get weight 0 to match it.
fn lanczos3(x: f64) -> f64 {
    if (-SUPPORT..SUPPORT).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// The quantised filter taps of one axis: output pixel `i` reads source pixels
/// `start[i] .. start[i] + len[i]` with weights `weights[i * stride ..][.. len[i]]`.
struct Taps {
    stride: usize,
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
}

impl Taps {
    fn new(in_size: usize, out_size: usize) -> Taps {
        // Pillow computes these in f64 from the integer sizes; the same expressions in the same
        // order give the same taps and the same rounding decisions at tap boundaries.
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = SUPPORT * filter_scale;
        let stride = support.ceil() as usize * 2 + 1;
        let inv_filter_scale = 1.0 / filter_scale;

        let mut start = Vec::with_capacity(out_size);
        let mut len = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * stride];
        let mut row = vec![0f64; stride];
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // `as` truncates toward zero, as C's int conversion does; a negative bound becomes 0
            // either way after the clamp.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            let n = hi.saturating_sub(lo).min(stride);
            let mut sum = 0.0;
            for (t, w) in row.iter_mut().enumerate().take(n) {
                *w = lanczos3((((t + lo) as f64) - center + 0.5) * inv_filter_scale);
                sum += *w;
            }
            // Divide (not multiply by a reciprocal) so the normalised weights round as Pillow's.
            let out = &mut weights[i * stride..i * stride + n];
            for (q, &w) in out.iter_mut().zip(&row[..n]) {
                let w = if sum != 0.0 { w / sum } else { w };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                // Round half away from zero, then truncate (C's `(int)` semantics).
                *q = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            start.push(lo);
            len.push(n);
        }
        Taps {
            stride,
            start,
            len,
            weights,
        }
    }

    fn of(&self, i: usize) -> (usize, &[i32]) {
        let w = &self.weights[i * self.stride..i * self.stride + self.len[i]];
        (self.start[i], w)
    }
}

/// One output channel value from a fixed-point weighted sum: add half (round half up), shift
/// out the fraction (arithmetic shift = floor, also for negative sums), clip to a byte.
#[inline]
fn finish(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i64 = 1 << (PRECISION_BITS - 1);

/// Resample rows: `src` is `w_in`×`h` RGB8, the result `w_out`×`h`.
fn horizontal(src: &[u8], w_in: usize, h: usize, w_out: usize) -> Vec<u8> {
    let taps = Taps::new(w_in, w_out);
    let mut dst = vec![0u8; w_out * h * 3];
    for (src_row, dst_row) in src
        .chunks_exact(w_in * 3)
        .zip(dst.chunks_exact_mut(w_out * 3))
    {
        for (x, px) in dst_row.chunks_exact_mut(3).enumerate() {
            let (lo, ws) = taps.of(x);
            let mut acc = [HALF; 3];
            for (t, &w) in ws.iter().enumerate() {
                let s = &src_row[(lo + t) * 3..(lo + t) * 3 + 3];
                for c in 0..3 {
                    acc[c] += i64::from(s[c]) * i64::from(w);
                }
            }
            for c in 0..3 {
                px[c] = finish(acc[c]);
            }
        }
    }
    dst
}

/// Resample columns: `src` is `w`×`h_in` RGB8, the result `w`×`h_out`.
fn vertical(src: &[u8], w: usize, h_in: usize, h_out: usize) -> Vec<u8> {
    let taps = Taps::new(h_in, h_out);
    let row_len = w * 3;
    let mut dst = vec![0u8; row_len * h_out];
    let mut acc = vec![0i64; row_len];
    for (y, dst_row) in dst.chunks_exact_mut(row_len).enumerate() {
        let (lo, ws) = taps.of(y);
        acc.fill(HALF);
        // Row-major accumulation: the same integer sum as Pillow's per-pixel loop (integer
        // addition is exact, so the order does not matter) but it walks memory contiguously.
        for (t, &wt) in ws.iter().enumerate() {
            let s = &src[(lo + t) * row_len..(lo + t + 1) * row_len];
            for (a, &v) in acc.iter_mut().zip(s) {
                *a += i64::from(v) * i64::from(wt);
            }
        }
        for (d, &a) in dst_row.iter_mut().zip(&acc) {
            *d = finish(a);
        }
    }
    dst
}

/// Resizes an RGB8 image to `width`×`height` the way Pillow's
/// `Image.resize(size, Image.Resampling.LANCZOS)` does (no `box`, no `reducing_gap` — the call
/// diffusers makes). The same size returns an identical copy, as Pillow does.
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage, ResizeError> {
    let (w_in, h_in) = img.dimensions();
    if w_in == 0 || h_in == 0 {
        return Err(ResizeError::EmptyInput {
            width: w_in,
            height: h_in,
        });
    }
    if width == 0 || height == 0 {
        return Err(ResizeError::EmptyOutput { width, height });
    }
    // The output buffer size must be addressable; checked here so that an absurd request is
    // an error instead of an allocation panic.
    (width as usize)
        .checked_mul(height as usize)
        .and_then(|n| n.checked_mul(3))
        .ok_or(ResizeError::TooLarge { width, height })?;
    if (w_in, h_in) == (width, height) {
        return Ok(img.clone());
    }

    let (w_in, h_in, w_out, h_out) = (
        w_in as usize,
        h_in as usize,
        width as usize,
        height as usize,
    );
    let src = img.as_raw().as_slice();
    let need_h = w_out != w_in;
    let need_v = h_out != h_in;
    // Pillow (13.0, the version diffusers runs against in scripts/) runs the vertical pass
    // first when the height shrinks by more than twice as many pixels as the width does (a
    // speed choice on its side); the order decides where the intermediate u8 rounding and
    // clipping happen, so it is followed here. Earlier Pillows always went horizontal first
    // (12.2–12.3 except for sources over 100× taller than wide).
    let shrink_h = h_in as i64 - h_out as i64;
    let shrink_w = w_in as i64 - w_out as i64;
    let vertical_first = shrink_h > 0 && shrink_h > 2 * shrink_w;
    let out = match (need_h, need_v) {
        (true, true) if vertical_first => {
            let tmp = vertical(src, w_in, h_in, h_out);
            horizontal(&tmp, w_in, h_out, w_out)
        }
        (true, true) => {
            let tmp = horizontal(src, w_in, h_in, w_out);
            vertical(&tmp, w_out, h_in, h_out)
        }
        (true, false) => horizontal(src, w_in, h_in, w_out),
        (false, true) => vertical(src, w_in, h_in, h_out),
        (false, false) => src.to_vec(),
    };
    RgbImage::from_raw(width, height, out).ok_or(ResizeError::TooLarge { width, height })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 37 + y * 11) as u8,
                ((x ^ y) as u8).wrapping_mul(7),
                ((x * y) % 251) as u8,
            ])
        })
    }

    #[test]
    fn same_size_is_identity() {
        let img = pattern(37, 23);
        let out = resize_lanczos(&img, 37, 23).expect("same size");
        assert_eq!(out.dimensions(), (37, 23));
        assert_eq!(out.as_raw(), img.as_raw());
    }

    #[test]
    fn one_axis_only_keeps_the_other_untouched() {
        // A constant image stays constant through any resize (weights sum to one and the
        // fixed-point rounding is half-up), on either single axis and on both.
        let img = RgbImage::from_pixel(19, 13, image::Rgb([200, 3, 128]));
        for (w, h) in [(19, 40), (7, 13), (64, 5)] {
            let out = resize_lanczos(&img, w, h).expect("resize");
            assert_eq!(out.dimensions(), (w, h));
            assert!(out.pixels().all(|p| p.0 == [200, 3, 128]), "{w}×{h}");
        }
    }

    #[test]
    fn zero_sizes_are_errors_not_panics() {
        let img = pattern(8, 8);
        assert_eq!(
            resize_lanczos(&img, 0, 8),
            Err(ResizeError::EmptyOutput {
                width: 0,
                height: 8
            })
        );
        assert_eq!(
            resize_lanczos(&img, 8, 0),
            Err(ResizeError::EmptyOutput {
                width: 8,
                height: 0
            })
        );
        let empty = RgbImage::new(0, 5);
        let err = resize_lanczos(&empty, 8, 8).expect_err("empty input");
        assert_eq!(
            err,
            ResizeError::EmptyInput {
                width: 0,
                height: 5
            }
        );
        assert!(err.to_string().contains("0×5"), "{err}");
    }

    #[test]
    fn extreme_ratios_do_not_panic() {
        let img = pattern(300, 2);
        assert_eq!(
            resize_lanczos(&img, 1, 1).expect("down").dimensions(),
            (1, 1)
        );
        let tiny = pattern(1, 1);
        let up = resize_lanczos(&tiny, 50, 3).expect("up");
        assert!(up.pixels().all(|p| p == tiny.get_pixel(0, 0)));
        let tall = pattern(2, 500);
        assert_eq!(
            resize_lanczos(&tall, 3, 7).expect("tall").dimensions(),
            (3, 7)
        );
    }

    #[test]
    fn taps_of_a_downscale_are_widened() {
        // 200 → 128: scale 1.5625, so each output pixel reads up to ceil(2·3·1.5625) source
        // pixels — the antialiasing the `image` crate's Lanczos3 lacks.
        let taps = Taps::new(200, 128);
        assert_eq!(taps.stride, 2 * 5 + 1);
        let (lo, ws) = taps.of(64);
        assert!(ws.len() >= 9, "{lo} {}", ws.len());
        let sum: i64 = ws.iter().map(|&w| i64::from(w)).sum();
        assert!(
            (sum - (1 << PRECISION_BITS)).abs() <= ws.len() as i64,
            "{sum}"
        );
    }
}
