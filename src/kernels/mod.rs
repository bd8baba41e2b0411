//! Our own GPU kernels (`kernels/*.cu`, feature `cuda`), each with a CPU twin.
//!
//! The one kernel today is the fused post-process of the VAE decoder output: NCHW floats in
//! roughly [-1, 1] (the diffusers convention) become RGBA8 images, HWC, straight alpha, with a
//! plain near-white background keyed out to transparency ([`AlphaKey`]). On a GPU this saves
//! the three candle ops (affine, clamp, to_dtype), the permute, a separate alpha pass, and copies
//! 4 bytes per pixel to the host instead of 12.
//!
//! Why a CPU twin for every kernel:
//! - it is the *reference*: the kernel must produce the same bytes, and the GPU test in
//!   `cuda.rs` (feature `cuda`) compares the two on the same inputs;
//! - it is what runs everywhere else (CPU builds, CI, tests), so the output of the pipeline does
//!   not depend on which device produced it;
//! - it is the only version CI can test, since CI has no GPU.
//!
//! [`decoded_to_rgba`] dispatches on the tensor's device: CPU tensors go to the twin, CUDA
//! tensors to the kernel (one launch for the whole batch, one copy of the bytes to the host).

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
pub mod cuda;

/// Background key: pixels whose darkest channel is at least `hi` become fully transparent,
/// pixels at or below `lo` stay opaque, and a linear ramp in between gives a soft edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlphaKey {
    /// When false, every pixel is opaque (alpha 255).
    pub enabled: bool,
    /// Darkest-channel value (0..=255) at and below which a pixel is opaque.
    pub lo: u8,
    /// Darkest-channel value at and above which a pixel is transparent. Must exceed `lo`.
    pub hi: u8,
}

impl Default for AlphaKey {
    /// Enabled, 230..250: the emoji prompts ask for a plain white background, which the model
    /// renders at 240-255; anti-aliased edges against it fall in the ramp.
    fn default() -> Self {
        Self {
            enabled: true,
            lo: 230,
            hi: 250,
        }
    }
}

impl AlphaKey {
    /// An enabled key; rejects `lo >= hi`, which would leave no ramp and divide by zero.
    pub fn new(lo: u8, hi: u8) -> Result<Self, KernelError> {
        if lo >= hi {
            return Err(KernelError::Shape(format!(
                "alpha key needs lo < hi, got lo {lo} and hi {hi}"
            )));
        }
        Ok(Self {
            enabled: true,
            lo,
            hi,
        })
    }

    /// A key that leaves every pixel opaque.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// Alpha for a pixel whose darkest channel is `m`. The ramp is integer arithmetic so the
    /// CUDA kernel computes exactly the same value: `(2a + b) / 2b` is `a / b` rounded half up,
    /// which for non-negative values is `round` (half away from zero).
    fn alpha(self, m: u8) -> u8 {
        // A hand-built key with lo >= hi (fields are public) keys nothing out rather than
        // dividing by zero; `new` is the checked way to build one.
        if !self.enabled || m <= self.lo || self.lo >= self.hi {
            return 255;
        }
        if m >= self.hi {
            return 0;
        }
        let num = 255 * u32::from(self.hi - m);
        let den = u32::from(self.hi - self.lo);
        // num < 255 * den, so the quotient is at most 255.
        ((2 * num + den) / (2 * den)) as u8
    }

    /// The key as the kernel takes it: (enabled, lo, hi), with a lo >= hi key disabled as
    /// [`AlphaKey::alpha`] treats it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn kernel_args(self) -> (i32, u32, u32) {
        let enabled = self.enabled && self.lo < self.hi;
        (i32::from(enabled), u32::from(self.lo), u32::from(self.hi))
    }
}

/// Errors of the kernels and their twins.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The input is not what the kernel takes (rank, channels, length, dtype, key). Permanent.
    #[error("kernel input: {0}")]
    Shape(String),
    /// A candle operation failed (dtype conversion, device copy, module load).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The CUDA driver refused an allocation, a launch or a copy of ours.
    #[cfg(feature = "cuda")]
    #[error("cuda: {0}")]
    Cuda(String),
}

impl KernelError {
    /// Whether the same call may succeed if tried again (the job goes back to the queue) or is
    /// doomed (the job fails). Shape errors are the caller's bug or a bad model output and never
    /// heal. Driver errors (out of memory, a launch failure, a lost device) may: another worker or
    /// a restarted process can succeed. Two driver errors are permanent because they are a bad
    /// build or deploy, not bad luck: PTX that this driver cannot load, and a missing kernel.
    ///
    /// Note that some driver errors (an illegal address) poison the CUDA context for the rest of
    /// the process; "retryable" means "retry the job", not "retry in this process forever".
    pub fn is_retryable(&self) -> bool {
        match self {
            KernelError::Shape(_) => false,
            KernelError::Candle(e) => candle_error_is_retryable(e),
            #[cfg(feature = "cuda")]
            KernelError::Cuda(_) => true,
        }
    }
}

/// Candle wraps errors in context/backtrace layers; only a CUDA error at the core is retryable.
fn candle_error_is_retryable(e: &candle_core::Error) -> bool {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } | E::Context { inner, .. } | E::WithPath { inner, .. } => {
            candle_error_is_retryable(inner)
        }
        #[cfg(feature = "cuda")]
        E::Cuda(inner) => cuda::driver_error_is_retryable(inner.as_ref()),
        #[cfg(not(feature = "cuda"))]
        E::Cuda(_) => true,
        _ => false,
    }
}

/// CPU twin, the reference for the kernel: `decoded` is NCHW f32, contiguous, `n` images of 3
/// channels of `h` x `w`. Returns `n * h * w * 4` bytes: RGBA, row-major, image after image.
pub fn decoded_to_rgba_cpu(
    decoded: &[f32],
    n: usize,
    h: usize,
    w: usize,
    key: AlphaKey,
) -> Result<Vec<u8>, KernelError> {
    let hw = h
        .checked_mul(w)
        .ok_or_else(|| KernelError::Shape(format!("image size {h}x{w} overflows")))?;
    let expected = n
        .checked_mul(3)
        .and_then(|v| v.checked_mul(hw))
        .ok_or_else(|| KernelError::Shape(format!("batch {n}x3x{h}x{w} overflows")))?;
    if decoded.len() != expected {
        return Err(KernelError::Shape(format!(
            "expected {n}x3x{h}x{w} = {expected} floats, got {}",
            decoded.len()
        )));
    }
    let mut out = vec![0u8; expected / 3 * 4];
    if hw == 0 {
        return Ok(out);
    }
    for (image, rgba) in decoded
        .chunks_exact(3 * hw)
        .zip(out.chunks_exact_mut(4 * hw))
    {
        let (r, gb) = image.split_at(hw);
        let (g, b) = gb.split_at(hw);
        for (i, px) in rgba.chunks_exact_mut(4).enumerate() {
            let (r, g, b) = (
                channel_to_u8(r[i]),
                channel_to_u8(g[i]),
                channel_to_u8(b[i]),
            );
            px.copy_from_slice(&[r, g, b, key.alpha(r.min(g).min(b))]);
        }
    }
    Ok(out)
}

/// `clamp(x / 2 + 0.5, 0, 1) * 255`, rounded half away from zero. The same float operations in
/// the same order as the kernel (which forbids FMA contraction), so the two agree bit for bit.
/// NaN maps to 0, as the kernel's `fmaxf` does.
fn channel_to_u8(x: f32) -> u8 {
    let v = x / 2.0 + 0.5;
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    (v * 255.0).round() as u8
}

/// Checks `[N, 3, H, W]` and returns `(n, h, w)`.
fn batch_dims(decoded: &Tensor) -> Result<(usize, usize, usize), KernelError> {
    match *decoded.dims() {
        [n, 3, h, w] => Ok((n, h, w)),
        _ => Err(KernelError::Shape(format!(
            "expected a [N, 3, H, W] tensor, got {:?}",
            decoded.dims()
        ))),
    }
}

/// Post-process a decoded batch on the device it lives on: a CPU tensor goes to the twin, a
/// CUDA tensor (any float dtype) to the kernel. Returns `N * H * W * 4` bytes, RGBA, HWC.
pub fn decoded_to_rgba(decoded: &Tensor, key: AlphaKey) -> Result<Vec<u8>, KernelError> {
    let (n, h, w) = batch_dims(decoded)?;
    if !decoded.dtype().is_float() {
        return Err(KernelError::Shape(format!(
            "expected a float tensor, got {:?}",
            decoded.dtype()
        )));
    }
    match decoded.device() {
        Device::Cpu => {
            // to_vec1 walks any layout, so a narrowed or permuted view needs no extra copy.
            let data = decoded
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            decoded_to_rgba_cpu(&data, n, h, w, key)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::decoded_to_rgba_cuda(decoded, n, h, w, key),
        other => Err(KernelError::Candle(candle_core::Error::Msg(format!(
            "decoded_to_rgba: no kernel for device {:?} in this build",
            other.location()
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn px(decoded: &[f32], key: AlphaKey) -> Vec<u8> {
        decoded_to_rgba_cpu(decoded, 1, 1, 1, key).expect("valid 1x1 input")
    }

    #[test]
    fn channel_values_map_like_diffusers() {
        // -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (half away from zero).
        assert_eq!(
            px(&[-1.0, 1.0, 0.0], AlphaKey::disabled()),
            [0, 255, 128, 255]
        );
    }

    #[test]
    fn out_of_range_clamps_and_nan_is_zero() {
        assert_eq!(
            px(&[-7.5, 3.0, f32::NAN], AlphaKey::disabled()),
            [0, 255, 0, 255]
        );
        assert_eq!(
            px(
                &[f32::NEG_INFINITY, f32::INFINITY, -1.0001],
                AlphaKey::disabled()
            ),
            [0, 255, 0, 255]
        );
    }

    #[test]
    fn rounding_is_to_nearest() {
        // x = 2 * (k / 255) - 1 lands on k; nudged by a quarter step either way still rounds to k.
        for k in [0u8, 1, 17, 128, 200, 254, 255] {
            let x = 2.0 * (f32::from(k) / 255.0) - 1.0;
            let quarter = 0.5 / 255.0;
            for dx in [-quarter, 0.0, quarter] {
                let v = (x + dx).clamp(-1.0, 1.0);
                assert_eq!(px(&[v, v, v], AlphaKey::disabled())[0], k, "x {v}");
            }
        }
    }

    #[test]
    fn white_is_transparent_and_grey_is_opaque() {
        let key = AlphaKey::default();
        assert_eq!(px(&[1.0, 1.0, 1.0], key), [255, 255, 255, 0]);
        assert_eq!(px(&[0.0, 0.0, 0.0], key), [128, 128, 128, 255]);
        // Darkest channel decides: a white-ish pixel with a dark blue channel stays opaque.
        assert_eq!(px(&[1.0, 1.0, -1.0], key), [255, 255, 0, 255]);
    }

    #[test]
    fn ramp_between_lo_and_hi() {
        let key = AlphaKey::new(230, 250).expect("lo < hi");
        // Exact values of the ramp: m = 240 -> round(255 * 10 / 20) = 127.5 -> 128.
        assert_eq!(key.alpha(230), 255);
        assert_eq!(key.alpha(231), 242); // 255 * 19 / 20 = 242.25
        assert_eq!(key.alpha(240), 128);
        assert_eq!(key.alpha(249), 13); // 12.75
        assert_eq!(key.alpha(250), 0);
        // Through the whole path: channel value 240 is x = 2 * 240 / 255 - 1.
        let x = 2.0 * (240.0 / 255.0) - 1.0;
        assert_eq!(px(&[x, x, x], key), [240, 240, 240, 128]);
    }

    #[test]
    fn disabled_key_is_opaque_everywhere() {
        let data: Vec<f32> = (0..3 * 16).map(|i| (i as f32 / 24.0) - 1.0).collect();
        let out = decoded_to_rgba_cpu(&data, 1, 4, 4, AlphaKey::disabled()).expect("4x4");
        assert!(out.chunks_exact(4).all(|p| p[3] == 255));
        let white = vec![1.0f32; 3 * 16];
        let out = decoded_to_rgba_cpu(&white, 1, 4, 4, AlphaKey::disabled()).expect("4x4");
        assert!(out.chunks_exact(4).all(|p| p[3] == 255));
    }

    #[test]
    fn key_constructor_rejects_empty_ramp() {
        assert!(AlphaKey::new(250, 250).is_err());
        assert!(AlphaKey::new(251, 250).is_err());
        assert!(AlphaKey::new(0, 1).is_ok());
        // A hand-built bad key does not divide by zero: it keys nothing out.
        let bad = AlphaKey {
            enabled: true,
            lo: 250,
            hi: 250,
        };
        assert_eq!(px(&[1.0, 1.0, 1.0], bad)[3], 255);
    }

    #[test]
    fn nchw_becomes_hwc() {
        // 2 rows x 3 columns; channel c, pixel i holds a distinct value that maps to 10c + i.
        let (h, w) = (2, 3);
        let to_x = |v: u8| 2.0 * (f32::from(v) / 255.0) - 1.0;
        let data: Vec<f32> = (0..3u8)
            .flat_map(|c| (0..6u8).map(move |i| 10 * c + i))
            .map(to_x)
            .collect();
        let out = decoded_to_rgba_cpu(&data, 1, h, w, AlphaKey::default()).expect("2x3");
        let expected: Vec<u8> = (0..6u8).flat_map(|i| [i, 10 + i, 20 + i, 255]).collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn batch_images_stay_in_order() {
        // Image 0 black, image 1 white: the second image's bytes come second.
        let mut data = vec![-1.0f32; 3 * 4];
        data.extend(vec![1.0f32; 3 * 4]);
        let out = decoded_to_rgba_cpu(&data, 2, 2, 2, AlphaKey::default()).expect("2x2x2");
        assert_eq!(&out[..16], [0, 0, 0, 255].repeat(4).as_slice());
        assert_eq!(&out[16..], [255, 255, 255, 0].repeat(4).as_slice());
    }

    #[test]
    fn shape_mismatch_is_a_permanent_error() {
        let err = decoded_to_rgba_cpu(&[0.0; 5], 1, 1, 2, AlphaKey::default())
            .expect_err("5 floats are not 1x3x1x2");
        assert!(matches!(err, KernelError::Shape(_)));
        assert!(!err.is_retryable());
        assert!(decoded_to_rgba_cpu(&[0.0; 6], 1, usize::MAX, 2, AlphaKey::default()).is_err());
    }

    #[test]
    fn tensor_dispatch_on_cpu_matches_twin() -> Result<(), KernelError> {
        let data: Vec<f32> = (0..2 * 3 * 5 * 7)
            .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let t = Tensor::from_vec(data.clone(), (2, 3, 5, 7), &Device::Cpu)?;
        let want = decoded_to_rgba_cpu(&data, 2, 5, 7, AlphaKey::default())?;
        assert_eq!(decoded_to_rgba(&t, AlphaKey::default())?, want);
        // f16 input and a non-zero layout offset (the second image of a batch of two).
        let second = t.narrow(0, 1, 1)?;
        let want2 = decoded_to_rgba_cpu(&data[3 * 35..], 1, 5, 7, AlphaKey::default())?;
        assert_eq!(decoded_to_rgba(&second, AlphaKey::default())?, want2);
        let f16 = t.to_dtype(DType::F16)?;
        assert_eq!(
            decoded_to_rgba(&f16, AlphaKey::default())?.len(),
            want.len()
        );
        Ok(())
    }

    #[test]
    fn tensor_dispatch_rejects_bad_shapes() -> Result<(), KernelError> {
        let t = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(matches!(
            decoded_to_rgba(&t, AlphaKey::default()),
            Err(KernelError::Shape(_))
        ));
        let t = Tensor::zeros((3, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(decoded_to_rgba(&t, AlphaKey::default()).is_err());
        let t = Tensor::zeros((1, 3, 2, 2), DType::U8, &Device::Cpu)?;
        assert!(decoded_to_rgba(&t, AlphaKey::default()).is_err());
        Ok(())
    }

    #[test]
    fn candle_errors_classify() {
        let shape = KernelError::Candle(candle_core::Error::Msg("bad".into()));
        assert!(!shape.is_retryable());
        let wrapped = candle_core::Error::Msg("bad".into()).bt();
        assert!(!KernelError::Candle(wrapped).is_retryable());
    }
}
