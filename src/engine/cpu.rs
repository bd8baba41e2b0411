//! CPU f32 kernels for the two ops that dominate a diffusion forward: 2-D convolution and
//! group norm (optionally fused with SiLU).
//!
//! Why our own: candle 0.11's CPU conv2d copies the whole input to NHWC on one thread, then
//! builds its im2col tiles with scattered writes, and allocates a fresh output that its bias and
//! residual adds copy twice more; its group norm is eight broadcast ops, each a full-size
//! temporary. At 512² the VAE decoder moves ~128 MB tensors through those, so a decode spent
//! more time in page faults and copies than in the matrix multiply (perf: 27% `clear_page`,
//! 19% im2col scatter, 20% gemm). Here a convolution is, per image, bands of output rows: an
//! im2col band with contiguous row copies, then one gemm straight into the NCHW output, whose
//! bias, per-channel (timestep) add and residual are written first and accumulated into. A
//! nearest 2× upsampling can be folded into the im2col (the decoder's upsamplers), so the 4×
//! larger upsampled tensor never exists.
//!
//! Every image of a batch is computed by the same calls in the same order, so a batch is
//! bit-identical to single runs (the engine's batch tests rely on it). The summation order of
//! gemm does not depend on the thread count (it splits rows and columns, never the depth).

use std::cell::RefCell;

use rayon::prelude::*;

/// The shape of one convolution, per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    /// Input height and width, before the fused upsampling.
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    /// Square kernel side.
    pub k: usize,
    pub stride: usize,
    /// Zero padding before the first row / column (the far side's padding is implied by
    /// `ho` / `wo`: diffusers' downsamplers pad only the far side).
    pub pad_top: usize,
    pub pad_left: usize,
    /// 1, or 2 for a nearest 2× upsampling of the input folded into the convolution.
    pub up: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    /// Geometry with symmetric padding `pad`, output size derived as PyTorch does.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        up: usize,
    ) -> Self {
        Self::with_padding(cin, h, w, cout, k, stride, (pad, pad, pad, pad), up)
    }

    /// Geometry with padding (top, left, bottom, right).
    #[allow(clippy::too_many_arguments)]
    pub fn with_padding(
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        stride: usize,
        (top, left, bottom, right): (usize, usize, usize, usize),
        up: usize,
    ) -> Self {
        let out = |n: usize, a: usize, b: usize| (n * up + a + b).saturating_sub(k) / stride + 1;
        Self {
            cin,
            h,
            w,
            cout,
            k,
            stride,
            pad_top: top,
            pad_left: left,
            up,
            ho: out(h, top, bottom),
            wo: out(w, left, right),
        }
    }

    fn depth(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// A 1×1 convolution that reads the input as it is: a plain matrix product.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.up == 1 && self.pad_top == 0 && self.pad_left == 0
    }
}

/// What an output starts as, before the convolution is accumulated into it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prefill<'a> {
    /// Per output channel.
    pub bias: Option<&'a [f32]>,
    /// Per output channel, this image's (a resnet's timestep embedding).
    pub channel: Option<&'a [f32]>,
    /// This image's output-shaped addend (a resnet's shortcut).
    pub residual: Option<&'a [f32]>,
}

/// A raw output pointer shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every user hands it to tasks that write disjoint index ranges (distinct output
// columns of a band, distinct (image, head, query block) rectangles).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `i` floats on. A method, so closures capture the whole (Sync) wrapper.
    #[inline(always)]
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the allocation the pointer came from.
        unsafe { self.0.add(i) }
    }
}

thread_local! {
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Target im2col band size in floats: large enough that gemm amortises packing the weights
/// (which it repeats per call), small enough to stay in the outer cache.
const BAND_FLOATS: usize = 1 << 21;
const MIN_BAND_PIXELS: usize = 512;

/// One image: `x` is `[cin, h, w]`, `weight` `[cout, cin, k, k]`, `out` `[cout, ho, wo]`.
pub fn conv2d_image(
    x: &[f32],
    geom: &ConvGeom,
    weight: &[f32],
    prefill: &Prefill,
    out: &mut [f32],
) {
    let g = *geom;
    let plane = g.ho * g.wo;
    debug_assert_eq!(x.len(), g.cin * g.h * g.w);
    debug_assert_eq!(weight.len(), g.cout * g.depth());
    debug_assert_eq!(out.len(), g.cout * plane);
    if plane == 0 || g.cout == 0 {
        return;
    }

    prefill_output(g.cout, plane, prefill, out);

    let depth = g.depth();
    let rows_per_band = {
        let pixels = (BAND_FLOATS / depth.max(1)).max(MIN_BAND_PIXELS);
        pixels.div_ceil(g.wo).clamp(1, g.ho)
    };
    let bands = g.ho.div_ceil(rows_per_band);
    let threads = rayon::current_num_threads();
    let dst = OutPtr(out.as_mut_ptr());

    let run_band = |band: usize, gemm_threads: usize| {
        let y0 = band * rows_per_band;
        let y1 = (y0 + rows_per_band).min(g.ho);
        let n = (y1 - y0) * g.wo;
        let par = if gemm_threads > 1 {
            gemm::Parallelism::Rayon(gemm_threads)
        } else {
            gemm::Parallelism::None
        };
        if g.is_pointwise() {
            // SAFETY: shapes checked above; this band writes output columns y0*wo.. of every
            // channel row, which no other band writes.
            unsafe {
                band_gemm(
                    &g,
                    dst.at(y0 * g.wo),
                    weight,
                    x.as_ptr().add(y0 * g.wo),
                    g.h * g.w,
                    n,
                    par,
                )
            };
            return;
        }
        COLUMNS.with(|cell| {
            let mut cols = cell.borrow_mut();
            cols.resize(depth * n, 0.0);
            im2col_band(x, &g, y0, y1, &mut cols[..depth * n], gemm_threads > 1);
            // SAFETY: as above.
            unsafe { band_gemm(&g, dst.at(y0 * g.wo), weight, cols.as_ptr(), n, n, par) };
        });
    };

    if bands >= 2 * threads {
        (0..bands).into_par_iter().for_each(|b| run_band(b, 1));
    } else {
        (0..bands).for_each(|b| run_band(b, threads));
    }
}

/// Whether a convolution runs as Winograd F(2×2, 3×3): 3×3, stride 1, and enough pixels and
/// channels that 2.25× fewer multiplies outweigh the transforms. Every 3×3 convolution of the
/// VAE decoder and of the UNet's upper levels qualifies.
pub fn use_winograd(g: &ConvGeom) -> bool {
    g.k == 3 && g.stride == 1 && g.ho * g.wo >= 1024 && g.cin >= 16 && g.cout >= 16
}

/// The Winograd weight transform `U = G·g·Gᵀ` of `[cout, cin, 3, 3]` weights, as 16 matrices
/// `[cout, cin]` (`u[e · cout · cin ..]`, `e` the 4×4 position).
pub fn winograd_weights(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let pairs = cout * cin;
    let mut u = vec![0f32; 16 * pairs];
    let dst = OutPtr(u.as_mut_ptr());
    (0..pairs).into_par_iter().with_min_len(256).for_each(|p| {
        let g = &weight[p * 9..p * 9 + 9];
        // Rows: G·g (4×3).
        let mut t = [[0f32; 3]; 4];
        for c in 0..3 {
            let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
            t[0][c] = g0;
            t[1][c] = 0.5 * (g0 + g1 + g2);
            t[2][c] = 0.5 * (g0 - g1 + g2);
            t[3][c] = g2;
        }
        for (r, row) in t.iter().enumerate() {
            let (g0, g1, g2) = (row[0], row[1], row[2]);
            let vals = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
            for (c, v) in vals.into_iter().enumerate() {
                // SAFETY: (e, p) indexes inside u; each p is written by one task.
                unsafe { *dst.at((r * 4 + c) * pairs + p) = v };
            }
        }
    });
    u
}

/// Target floats of one band's transformed input (16 · cin · tiles).
const WINOGRAD_BAND_FLOATS: usize = 1 << 21;

/// One image by Winograd F(2×2, 3×3) with `u` from [`winograd_weights`]: bands of tile rows,
/// each band's input transformed to 16 `[cin, tiles]` matrices, 16 gemms with `u`, and the
/// output transform added into the prefilled output.
pub fn conv2d_image_winograd(
    x: &[f32],
    geom: &ConvGeom,
    u: &[f32],
    prefill: &Prefill,
    out: &mut [f32],
) {
    let g = *geom;
    let plane = g.ho * g.wo;
    prefill_output(g.cout, plane, prefill, out);
    let (tiles_y, tiles_x) = (g.ho.div_ceil(2), g.wo.div_ceil(2));
    let rows_per_band =
        (WINOGRAD_BAND_FLOATS / (16 * g.cin.max(g.cout) * tiles_x).max(1)).clamp(1, tiles_y);
    let bands = tiles_y.div_ceil(rows_per_band);
    let threads = rayon::current_num_threads();
    let dst = OutPtr(out.as_mut_ptr());
    let run_band = |band: usize, gemm_threads: usize| {
        let ty0 = band * rows_per_band;
        let ty1 = (ty0 + rows_per_band).min(tiles_y);
        let n = (ty1 - ty0) * tiles_x;
        let mut v = vec![0f32; 16 * g.cin * n];
        let mut m = vec![0f32; 16 * g.cout * n];
        winograd_input(x, &g, ty0, ty1, tiles_x, &mut v);
        let par = if gemm_threads > 1 {
            gemm::Parallelism::Rayon(gemm_threads)
        } else {
            gemm::Parallelism::None
        };
        for e in 0..16 {
            // SAFETY: u[e] is [cout, cin], v[e] [cin, n], m[e] [cout, n], all in bounds.
            unsafe {
                gemm::gemm(
                    g.cout,
                    n,
                    g.cin,
                    m.as_mut_ptr().add(e * g.cout * n),
                    1,
                    n as isize,
                    false,
                    u.as_ptr().add(e * g.cout * g.cin),
                    1,
                    g.cin as isize,
                    v.as_ptr().add(e * g.cin * n),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
        }
        // Output transform Aᵀ·m·A, added into this band's output rows (2·ty0.. 2·ty1).
        for co in 0..g.cout {
            for t in 0..n {
                let at = |e: usize| m[(e * g.cout + co) * n + t];
                let mut r = [[0f32; 4]; 2];
                let [r0, r1] = &mut r;
                for (c, (a, b)) in r0.iter_mut().zip(r1.iter_mut()).enumerate() {
                    let (m0, m1, m2, m3) = (at(c), at(4 + c), at(8 + c), at(12 + c));
                    *a = m0 + m1 + m2;
                    *b = m1 - m2 - m3;
                }
                let ty = ty0 + t / tiles_x;
                let tx = t % tiles_x;
                for (i, row) in r.iter().enumerate() {
                    let y = 2 * ty + i;
                    if y >= g.ho {
                        continue;
                    }
                    let y0 = row[0] + row[1] + row[2];
                    let y1 = row[1] - row[2] - row[3];
                    let base = co * plane + y * g.wo + 2 * tx;
                    // SAFETY: inside this band's output rows, written only by this band.
                    unsafe {
                        *dst.at(base) += y0;
                        if 2 * tx + 1 < g.wo {
                            *dst.at(base + 1) += y1;
                        }
                    }
                }
            }
        }
    };
    if bands >= 2 * threads {
        (0..bands).into_par_iter().for_each(|b| run_band(b, 1));
    } else {
        (0..bands).for_each(|b| run_band(b, threads));
    }
}

/// `v[e, ci, t] = (Bᵀ·d·B)[e]` for the 4×4 input patch `d` of every tile of rows `ty0..ty1`.
fn winograd_input(x: &[f32], g: &ConvGeom, ty0: usize, ty1: usize, tiles_x: usize, v: &mut [f32]) {
    let n = (ty1 - ty0) * tiles_x;
    let (vh, vw) = ((g.h * g.up) as isize, (g.w * g.up) as isize);
    let cin = g.cin;
    let vp = OutPtr(v.as_mut_ptr());
    (0..cin).into_par_iter().for_each(|ci| {
        let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let px = |iy: isize, ix: isize| -> f32 {
            if iy < 0 || ix < 0 || iy >= vh || ix >= vw {
                0.0
            } else {
                src[(iy as usize / g.up) * g.w + ix as usize / g.up]
            }
        };
        for t in 0..n {
            let ty = ty0 + t / tiles_x;
            let tx = t % tiles_x;
            let oy = (2 * ty) as isize - g.pad_top as isize;
            let ox = (2 * tx) as isize - g.pad_left as isize;
            let mut d = [[0f32; 4]; 4];
            for (a, row) in d.iter_mut().enumerate() {
                for (b, val) in row.iter_mut().enumerate() {
                    *val = px(oy + a as isize, ox + b as isize);
                }
            }
            // Bᵀ·d (rows), then ·B (columns).
            let mut r = [[0f32; 4]; 4];
            for c in 0..4 {
                r[0][c] = d[0][c] - d[2][c];
                r[1][c] = d[1][c] + d[2][c];
                r[2][c] = d[2][c] - d[1][c];
                r[3][c] = d[1][c] - d[3][c];
            }
            for (a, row) in r.iter().enumerate() {
                let vals = [
                    row[0] - row[2],
                    row[1] + row[2],
                    row[2] - row[1],
                    row[1] - row[3],
                ];
                for (b, val) in vals.into_iter().enumerate() {
                    // SAFETY: (e, ci, t) inside v; each ci is written by one task.
                    unsafe { *vp.at(((a * 4 + b) * cin + ci) * n + t) = val };
                }
            }
        }
    });
}

/// Writes each output channel's start: bias + per-channel add + residual.
fn prefill_output(cout: usize, plane: usize, prefill: &Prefill, out: &mut [f32]) {
    out[..cout * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(co, row)| {
            let start =
                prefill.bias.map_or(0.0, |b| b[co]) + prefill.channel.map_or(0.0, |c| c[co]);
            match prefill.residual {
                Some(r) => {
                    for (o, &v) in row.iter_mut().zip(&r[co * plane..(co + 1) * plane]) {
                        *o = v + start;
                    }
                }
                None => row.fill(start),
            }
        });
}

/// `dst[cout, n] (row stride ho*wo) += weight[cout, depth] · rhs[depth, n] (row stride rs)`.
unsafe fn band_gemm(
    g: &ConvGeom,
    dst: *mut f32,
    weight: &[f32],
    rhs: *const f32,
    rhs_rs: usize,
    n: usize,
    par: gemm::Parallelism,
) {
    let depth = g.depth();
    // SAFETY: the caller guarantees dst covers cout rows of n columns at stride ho*wo, and rhs
    // depth rows of n columns at stride rhs_rs.
    unsafe {
        gemm::gemm(
            g.cout,
            n,
            depth,
            dst,
            1,
            (g.ho * g.wo) as isize,
            true,
            weight.as_ptr(),
            1,
            depth as isize,
            rhs,
            1,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The im2col rows of output rows `y0..y1`: `cols[(ci, ky, kx), (y - y0, xo)]`.
fn im2col_band(x: &[f32], g: &ConvGeom, y0: usize, y1: usize, cols: &mut [f32], parallel: bool) {
    let n = (y1 - y0) * g.wo;
    let fill = |kk: usize, row: &mut [f32]| {
        let kx = kk % g.k;
        let ky = (kk / g.k) % g.k;
        let ci = kk / (g.k * g.k);
        let src = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let (vh, vw) = (g.h * g.up, g.w * g.up);
        for (y, seg) in (y0..y1).zip(row.chunks_exact_mut(g.wo)) {
            let iy = (y * g.stride + ky) as isize - g.pad_top as isize;
            if iy < 0 || iy >= vh as isize {
                seg.fill(0.0);
                continue;
            }
            let src_row = &src[(iy as usize / g.up) * g.w..][..g.w];
            if g.stride == 1 && g.up == 1 {
                // Output columns whose input column kx + xo - pad_left lies inside the row.
                let shift = kx as isize - g.pad_left as isize;
                let lo = (-shift).clamp(0, g.wo as isize) as usize;
                let hi = (g.w as isize - shift).clamp(lo as isize, g.wo as isize) as usize;
                seg[..lo].fill(0.0);
                seg[hi..].fill(0.0);
                let from = (lo as isize + shift) as usize;
                seg[lo..hi].copy_from_slice(&src_row[from..from + (hi - lo)]);
            } else {
                for (xo, o) in seg.iter_mut().enumerate() {
                    let ix = (xo * g.stride + kx) as isize - g.pad_left as isize;
                    *o = if ix < 0 || ix >= vw as isize {
                        0.0
                    } else {
                        src_row[ix as usize / g.up]
                    };
                }
            }
        }
    };
    if parallel {
        cols.par_chunks_mut(n)
            .with_min_len(16)
            .enumerate()
            .for_each(|(kk, row)| fill(kk, row));
    } else {
        cols.chunks_mut(n)
            .enumerate()
            .for_each(|(kk, row)| fill(kk, row));
    }
}

/// Group norm over `[n, c, hw]`, with per-channel affine and optional SiLU, into a new buffer.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    c: usize,
    hw: usize,
    groups: usize,
    eps: f64,
    gamma: &[f32],
    beta: &[f32],
    silu: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let per_group = c / groups;
    let block = per_group * hw;
    if block == 0 {
        return out;
    }
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .for_each(|(i, (o, xs))| {
            let g = i % groups;
            let count = block as f64;
            let mean = (sum(xs, |v| v) / count) as f32;
            let var = sum(xs, |v| (v - mean) * (v - mean)) / count;
            let inv_std = (1.0 / (var + eps).sqrt()) as f32;
            for (j, (orow, xrow)) in o.chunks_exact_mut(hw).zip(xs.chunks_exact(hw)).enumerate() {
                let ch = g * per_group + j;
                let scale = gamma[ch] * inv_std;
                let shift = beta[ch] - mean * scale;
                if silu {
                    silu_affine(orow, xrow, scale, shift);
                } else {
                    for (y, &v) in orow.iter_mut().zip(xrow) {
                        *y = v * scale + shift;
                    }
                }
            }
        });
    out
}

/// `e^x` for softmax and SiLU: Cephes' single-precision polynomial after rounding `x / ln 2`
/// (relative error ~1e-7 over the clamped range), written so the compiler vectorises it —
/// libm's `expf` is a call per element, and softmax over 4096² scores per head is ~10⁸ of them.
#[inline(always)]
fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Runs `f` compiled for AVX2+FMA where the CPU has them (the crate itself targets baseline
/// x86-64), else as built.
macro_rules! with_avx2 {
    ($name:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        #[inline(always)]
        fn body($($arg: $ty),*) $body
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast($($arg: $ty),*) { body($($arg),*) }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the features were detected at run time.
                return unsafe { fast($($arg),*) };
            }
        }
        body($($arg),*)
    };
}

/// `out = silu(x · scale + shift)`.
fn silu_affine(out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    with_avx2!(silu_affine, (out: &mut [f32], x: &[f32], scale: f32, shift: f32), {
        for (y, &v) in out.iter_mut().zip(x) {
            let t = v * scale + shift;
            *y = t / (1.0 + exp_fast(-t));
        }
    });
}

/// Softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    with_avx2!(softmax_in_place, (row: &mut [f32]), {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l = if v > *l { v } else { *l };
            }
        }
        let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for &v in chunks.remainder() {
            max = max.max(v);
        }
        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp_fast(*v - max);
                *s += *v;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_fast(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    });
}

/// `erf(x)` to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26), vectorisable like [`exp_fast`].
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let e = 1.0 - poly * exp_fast(-a * a);
    if x < 0.0 { -e } else { e }
}

/// GEGLU on `[rows, 2·half]` (value, then gate): `value · GELU(gate)` with the exact (erf)
/// GELU, `[rows, half]` out, in one pass instead of candle's four strided ones.
pub fn geglu(h: &[f32], half: usize) -> Vec<f32> {
    let rows = h.len() / (2 * half).max(1);
    let mut out = vec![0f32; rows * half];
    if half == 0 {
        return out;
    }
    out.par_chunks_mut(half)
        .zip(h.par_chunks(2 * half))
        .for_each(|(o, row)| {
            let (value, gate) = row.split_at(half);
            geglu_row(o, value, gate);
        });
    out
}

fn geglu_row(out: &mut [f32], value: &[f32], gate: &[f32]) {
    with_avx2!(geglu_row, (out: &mut [f32], value: &[f32], gate: &[f32]), {
        for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
            *o = v * 0.5 * g * (1.0 + erf_fast(g * std::f32::consts::FRAC_1_SQRT_2));
        }
    });
}

/// A sum accurate to f64 over blocks summed in eight f32 lanes (vectorisable, and the block
/// sums are small enough that f32 loses nothing that matters).
fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for chunk in xs.chunks(1024) {
        let mut lanes = [0f32; 8];
        let mut it = chunk.chunks_exact(8);
        for c8 in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c8) {
                *l += f(v);
            }
        }
        let mut s: f32 = lanes.iter().sum();
        for &v in it.remainder() {
            s += f(v);
        }
        total += f64::from(s);
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geglu_uses_the_exact_gelu() {
        let half = 37;
        let h: Vec<f32> = (0..3 * 2 * half)
            .map(|i| (i as f32 - 100.0) / 17.0)
            .collect();
        let out = geglu(&h, half);
        for r in 0..3 {
            for j in 0..half {
                let v = f64::from(h[r * 2 * half + j]);
                let g = f64::from(h[r * 2 * half + half + j]);
                // erf via its series is exact enough here (|g| < 7): integrate e^{-t²} numerically.
                let z = g / 2f64.sqrt();
                let steps = 20_000;
                let erf = (0..steps)
                    .map(|k| {
                        let t = z * (k as f64 + 0.5) / steps as f64;
                        (-t * t).exp()
                    })
                    .sum::<f64>()
                    * z
                    / steps as f64
                    * 2.0
                    / std::f64::consts::PI.sqrt();
                let want = v * 0.5 * g * (1.0 + erf);
                let got = f64::from(out[r * half + j]);
                assert!(
                    (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                    "{got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn fast_exp_is_accurate_over_the_range_softmax_and_silu_use() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let rel = ((f64::from(exp_fast(x)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
        let mut row = vec![1.0f32, 2.0, 3.0, -1e30, 0.5, 0.25, 7.0, 1.0, 2.0, 3.0];
        let want: Vec<f64> = {
            let e: Vec<f64> = row.iter().map(|&v| (f64::from(v) - 7.0).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax_in_place(&mut row);
        for (g, w) in row.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    /// The definition, one output at a time.
    fn conv_naive(x: &[f32], g: &ConvGeom, w: &[f32], bias: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; g.cout * g.ho * g.wo];
        for co in 0..g.cout {
            for yo in 0..g.ho {
                for xo in 0..g.wo {
                    let mut acc = f64::from(bias[co]);
                    for ci in 0..g.cin {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (yo * g.stride + ky) as isize - g.pad_top as isize;
                                let ix = (xo * g.stride + kx) as isize - g.pad_left as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= (g.h * g.up) as isize
                                    || ix >= (g.w * g.up) as isize
                                {
                                    continue;
                                }
                                let v = x[ci * g.h * g.w
                                    + (iy as usize / g.up) * g.w
                                    + ix as usize / g.up];
                                acc += f64::from(v)
                                    * f64::from(w[((co * g.cin + ci) * g.k + ky) * g.k + kx]);
                            }
                        }
                    }
                    out[(co * g.ho + yo) * g.wo + xo] = acc as f32;
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(40_503));
                (v >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn conv_matches_the_definition_for_every_geometry_the_models_use() {
        let cases = [
            ConvGeom::new(5, 9, 7, 6, 3, 1, 1, 1),
            ConvGeom::new(5, 9, 7, 6, 1, 1, 0, 1),
            ConvGeom::new(5, 9, 8, 6, 3, 2, 1, 1),
            ConvGeom::with_padding(5, 9, 8, 6, 3, 2, (0, 0, 1, 1), 1),
            ConvGeom::new(5, 4, 3, 6, 3, 1, 1, 2),
            ConvGeom::new(3, 70, 40, 4, 3, 1, 1, 1),
        ];
        for g in cases {
            let x = values(g.cin * g.h * g.w, 1);
            let w = values(g.cout * g.cin * g.k * g.k, 2);
            let bias = values(g.cout, 3);
            let want = conv_naive(&x, &g, &w, &bias);
            let mut got = vec![f32::NAN; want.len()];
            let pre = Prefill {
                bias: Some(&bias),
                ..Default::default()
            };
            conv2d_image(&x, &g, &w, &pre, &mut got);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{g:?}: max difference {worst}");
        }
    }

    #[test]
    fn winograd_matches_the_definition() {
        let cases = [
            ConvGeom::new(16, 40, 33, 17, 3, 1, 1, 1),
            ConvGeom::new(16, 17, 32, 16, 3, 1, 1, 2),
            ConvGeom::new(20, 45, 31, 16, 3, 1, 1, 1),
        ];
        for g in cases {
            assert!(use_winograd(&g), "{g:?}");
            let x = values(g.cin * g.h * g.w, 11);
            let w = values(g.cout * g.cin * 9, 12);
            let bias = values(g.cout, 13);
            let res = values(g.cout * g.ho * g.wo, 14);
            let mut want = conv_naive(&x, &g, &w, &bias);
            for (o, r) in want.iter_mut().zip(&res) {
                *o += r;
            }
            let u = winograd_weights(&w, g.cout, g.cin);
            let mut got = vec![f32::NAN; want.len()];
            let pre = Prefill {
                bias: Some(&bias),
                channel: None,
                residual: Some(&res),
            };
            conv2d_image_winograd(&x, &g, &u, &pre, &mut got);
            let worst = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-5, "{g:?}: max difference {worst}");
        }
    }

    #[test]
    fn conv_accumulates_into_channel_and_residual_prefill() {
        let g = ConvGeom::new(4, 6, 6, 3, 3, 1, 1, 1);
        let x = values(4 * 36, 4);
        let w = values(3 * 4 * 9, 5);
        let bias = values(3, 6);
        let chan = values(3, 7);
        let res = values(3 * 36, 8);
        let mut plain = vec![0.0; 3 * 36];
        conv2d_image(
            &x,
            &g,
            &w,
            &Prefill {
                bias: Some(&bias),
                ..Default::default()
            },
            &mut plain,
        );
        let mut fused = vec![0.0; 3 * 36];
        let pre = Prefill {
            bias: Some(&bias),
            channel: Some(&chan),
            residual: Some(&res),
        };
        conv2d_image(&x, &g, &w, &pre, &mut fused);
        for (i, (p, f)) in plain.iter().zip(&fused).enumerate() {
            let want = p + chan[i / 36] + res[i];
            assert!((want - f).abs() < 1e-5, "at {i}: {want} vs {f}");
        }
    }

    #[test]
    fn group_norm_normalises_each_group_and_applies_silu() {
        let (c, hw, groups) = (6, 10, 3);
        let x: Vec<f32> = values(2 * c * hw, 9)
            .iter()
            .map(|v| v * 4.0 + 1.0)
            .collect();
        let gamma = values(c, 10);
        let beta = values(c, 11);
        let plain = group_norm(&x, c, hw, groups, 1e-6, &gamma, &beta, false);
        let silu = group_norm(&x, c, hw, groups, 1e-6, &gamma, &beta, true);
        for (img, g) in (0..2).flat_map(|i| (0..groups).map(move |g| (i, g))) {
            let at = |ch: usize, j: usize| (img * c + ch) * hw + j;
            let chans = g * 2..g * 2 + 2;
            let xs: Vec<f64> = chans
                .clone()
                .flat_map(|ch| (0..hw).map(move |j| (ch, j)))
                .map(|(ch, j)| f64::from(x[at(ch, j)]))
                .collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / xs.len() as f64;
            for ch in chans {
                for j in 0..hw {
                    let want = (f64::from(x[at(ch, j)]) - mean) / (var + 1e-6).sqrt()
                        * f64::from(gamma[ch])
                        + f64::from(beta[ch]);
                    assert!((want - f64::from(plain[at(ch, j)])).abs() < 1e-5);
                    let want_silu = want / (1.0 + (-want).exp());
                    assert!((want_silu - f64::from(silu[at(ch, j)])).abs() < 1e-5);
                }
            }
        }
    }
}
