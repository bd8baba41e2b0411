//! CUDA launches of `kernels/*.cu` (feature `cuda`), on candle's own device and stream.
//!
//! build.rs compiles each `.cu` to PTX with nvcc; the PTX is embedded here and handed to
//! candle's [`CudaDevice::get_or_load_custom_func`], which loads the module once per device
//! (the driver JIT-compiles it for the GPU it finds) and caches it. Launching on candle's stream
//! orders our kernel after the candle ops that produced the input, with no extra sync, and
//! cudarc's per-buffer events keep that true even if another stream is involved.
//!
//! Every kernel here has a CPU twin in [`super`]; the `#[ignore]`d test below compares them on
//! a GPU host (`scripts/gpu-check.sh`).

use candle_core::cuda::cudarc::driver::{
    CudaSlice, CudaView, DriverError, LaunchConfig, PushKernelArg, sys,
};
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

use super::{AlphaKey, KernelError};

/// PTX of kernels/postprocess.cu, built by build.rs for `compute_$CUDA_COMPUTE_CAP`.
const POSTPROCESS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/postprocess.ptx"));
/// Module name in candle's per-device cache of custom modules; unique to this crate.
const POSTPROCESS_MODULE: &str = "popcon_postprocess";
const DECODED_TO_RGBA: &str = "decoded_to_rgba_f32";

/// Threads per block: a memory-bound kernel with no shared memory; 256 keeps several blocks
/// resident per SM for latency hiding.
const BLOCK: u32 = 256;
/// Grid caps (x: blocks over one image's pixels, y: images). The kernel strides over both, so
/// these only bound the launch; CUDA allows y up to 65535.
const MAX_BLOCKS_X: u32 = 65_536;
const MAX_BLOCKS_Y: u32 = 65_535;

fn cuda_err(what: &str, e: DriverError) -> KernelError {
    KernelError::Cuda(format!("{what}: {e}"))
}

/// The post-process of a CUDA tensor `[n, 3, h, w]` (any float dtype): convert to contiguous
/// f32 on the device, one launch for the whole batch, one copy of the bytes to the host.
pub(super) fn decoded_to_rgba_cuda(
    decoded: &Tensor,
    n: usize,
    h: usize,
    w: usize,
    key: AlphaKey,
) -> Result<Vec<u8>, KernelError> {
    let Device::Cuda(dev) = decoded.device() else {
        return Err(KernelError::Shape("expected a CUDA tensor".into()));
    };
    let hw = h
        .checked_mul(w)
        .ok_or_else(|| KernelError::Shape(format!("image size {h}x{w} overflows")))?;
    let pixels = n
        .checked_mul(hw)
        .filter(|p| p.checked_mul(4).is_some())
        .ok_or_else(|| KernelError::Shape(format!("batch {n}x{h}x{w} overflows")))?;
    if pixels == 0 {
        return Ok(Vec::new());
    }
    // Both are no-ops (a cheap clone of the handle) when the input already is contiguous f32;
    // otherwise candle converts/copies on the GPU, never through the host.
    let f32_input = decoded.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = f32_input.storage_and_layout();
    let Storage::Cuda(cuda_storage) = &*storage else {
        return Err(KernelError::Shape(
            "CUDA tensor without CUDA storage".into(),
        ));
    };
    let slice = cuda_storage.as_cuda_slice::<f32>()?;
    // A contiguous view may still start inside its buffer (narrow, or a batch element).
    let start = layout.start_offset();
    let needed = 3 * pixels;
    if slice.len() < start + needed {
        return Err(KernelError::Shape(format!(
            "storage holds {} floats, the view needs {needed} from offset {start}",
            slice.len()
        )));
    }
    let src = slice.slice(start..start + needed);
    // SAFETY: the kernel writes every one of the `pixels` 4-byte words before anything reads
    // them (the test checks this with poisoned buffers), so no uninitialised byte is observed.
    let mut dst = unsafe { dev.alloc::<u8>(pixels * 4)? };
    launch_decoded_to_rgba(dev, &src, n, hw, key, &mut dst)?;
    // A synchronous copy on candle's stream: it waits for the kernel, and surfaces an
    // asynchronous launch failure as an error here.
    Ok(dev.clone_dtoh(&dst)?)
}

/// Launches the kernel on candle's stream. `src` is `n * 3 * hw` contiguous floats, `dst` at
/// least `n * hw * 4` bytes from a fresh (4-byte aligned) allocation.
fn launch_decoded_to_rgba(
    dev: &CudaDevice,
    src: &CudaView<'_, f32>,
    n: usize,
    hw: usize,
    key: AlphaKey,
    dst: &mut CudaSlice<u8>,
) -> Result<(), KernelError> {
    let pixels = n.saturating_mul(hw);
    if src.len() < pixels.saturating_mul(3) || dst.len() < pixels.saturating_mul(4) {
        return Err(KernelError::Shape(format!(
            "buffers too small for {n}x{hw} pixels: src {}, dst {}",
            src.len(),
            dst.len()
        )));
    }
    if pixels == 0 {
        // A zero-sized grid is a launch error; there is nothing to do anyway.
        return Ok(());
    }
    let func = dev.get_or_load_custom_func(DECODED_TO_RGBA, POSTPROCESS_MODULE, POSTPROCESS_PTX)?;
    let blocks_x = hw.div_ceil(BLOCK as usize).min(MAX_BLOCKS_X as usize) as u32;
    let blocks_y = n.min(MAX_BLOCKS_Y as usize) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks_x, blocks_y, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    // Kernel parameters by reference, in the order of the .cu signature; they must outlive
    // the builder.
    let (n64, hw64) = (n as u64, hw as u64);
    let (enabled, lo, hi) = key.kernel_args();
    let mut args = func.builder();
    args.arg(src)
        .arg(dst)
        .arg(&n64)
        .arg(&hw64)
        .arg(&enabled)
        .arg(&lo)
        .arg(&hi);
    // SAFETY: the argument list matches `decoded_to_rgba_f32(const float*, uint32_t*, uint64_t,
    // uint64_t, int, unsigned, unsigned)`, and the lengths were checked above, so the kernel
    // reads and writes only inside `src` and `dst`.
    unsafe { args.launch(cfg) }.map_err(|e| cuda_err("launch decoded_to_rgba_f32", e))?;
    Ok(())
}

/// Classifies the error inside a candle `Error::Cuda`: driver errors are retryable except those
/// that mean the build does not fit the host (PTX this driver cannot load, no such kernel).
pub(super) fn driver_error_is_retryable(
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> bool {
    use candle_core::cuda::CudaError;
    let code = match e.downcast_ref::<CudaError>() {
        Some(CudaError::Cuda(DriverError(code))) => *code,
        // cuBLAS, cuRAND and the other library failures: resources, mostly.
        Some(CudaError::Cublas(_) | CudaError::Curand(_)) => return true,
        // Missing kernels, unsupported dtypes, internal errors: a bug, not bad luck.
        Some(_) => return false,
        None => match e.downcast_ref::<DriverError>() {
            Some(DriverError(code)) => *code,
            None => return true,
        },
    };
    !matches!(
        code,
        sys::CUresult::CUDA_ERROR_INVALID_PTX
            | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION
            | sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
            | sys::CUresult::CUDA_ERROR_INVALID_IMAGE
            | sys::CUresult::CUDA_ERROR_JIT_COMPILER_NOT_FOUND
            | sys::CUresult::CUDA_ERROR_NOT_FOUND
    )
}

#[cfg(test)]
mod tests {
    use super::super::{decoded_to_rgba, decoded_to_rgba_cpu};
    use super::*;

    /// The PTX is built for the architecture CI and the GPU host agree on; a check that runs
    /// without a GPU.
    #[test]
    fn ptx_is_embedded() {
        assert!(POSTPROCESS_PTX.contains(".entry decoded_to_rgba_f32"));
        assert!(POSTPROCESS_PTX.contains(".target sm_"));
    }

    #[test]
    fn driver_errors_classify() {
        let oom = DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        assert!(driver_error_is_retryable(
            &candle_core::cuda::CudaError::Cuda(oom)
        ));
        let ptx = DriverError(sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION);
        assert!(!driver_error_is_retryable(
            &candle_core::cuda::CudaError::Cuda(ptx)
        ));
        // Through candle's wrapping, as get_or_load_custom_func returns it.
        let wrapped = candle_core::Error::Cuda(Box::new(candle_core::cuda::CudaError::Cuda(
            DriverError(sys::CUresult::CUDA_ERROR_INVALID_PTX),
        )))
        .bt();
        assert!(!KernelError::Candle(wrapped).is_retryable());
        let launch = DriverError(sys::CUresult::CUDA_ERROR_LAUNCH_FAILED);
        let wrapped =
            candle_core::Error::Cuda(Box::new(candle_core::cuda::CudaError::Cuda(launch)));
        assert!(KernelError::Candle(wrapped).is_retryable());
    }

    /// Deterministic "random" floats (an LCG: no rand dependency, same inputs on every host)
    /// over [-1.3, 1.3], salted with the values where the two sides could disagree: exact
    /// bounds, rounding half-points, NaN and infinities.
    fn inputs(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let specials = [
            -1.0f32,
            1.0,
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            // x with x/2 + 0.5 = (k + 0.5) / 255: half-way between two u8 values.
            2.0 * (64.5 / 255.0) - 1.0,
            2.0 * (240.5 / 255.0) - 1.0,
            2.0 * (0.5 / 255.0) - 1.0,
        ];
        (0..len)
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 97 == 0 {
                    return specials[(state >> 33) as usize % specials.len()];
                }
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
                unit * 2.6 - 1.3
            })
            .collect()
    }

    /// Pixels whose bytes differ, and the largest difference; fails on a difference above 1.
    fn compare(label: &str, gpu: &[u8], cpu: &[u8]) -> usize {
        assert_eq!(gpu.len(), cpu.len(), "{label}: length");
        let mut differing = 0usize;
        let mut worst = 0u8;
        for (g, c) in gpu.chunks_exact(4).zip(cpu.chunks_exact(4)) {
            let d = g
                .iter()
                .zip(c)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            if d > 0 {
                differing += 1;
                worst = worst.max(d);
            }
        }
        eprintln!(
            "{label}: {} pixels, {differing} differ, max difference {worst}",
            gpu.len() / 4
        );
        assert!(
            worst <= 1,
            "{label}: a byte differs by {worst} (only 1 is allowed, at a rounding boundary)"
        );
        differing
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run scripts/gpu-check.sh on a GPU host"]
    fn kernel_matches_cpu_twin() -> Result<(), KernelError> {
        let device = Device::new_cuda(0)?;
        let Device::Cuda(dev) = &device else {
            return Err(KernelError::Shape(
                "Device::new_cuda gave a non-CUDA device".into(),
            ));
        };
        let keys = [
            AlphaKey::default(),
            AlphaKey::disabled(),
            AlphaKey::new(0, 255)?,
            AlphaKey::new(100, 101)?,
        ];
        let shapes = [
            (1, 1, 1),
            (1, 2, 3),
            (2, 7, 13),
            (3, 64, 64),
            (4, 512, 512),
            (2, 1024, 768),
        ];
        let mut total_differing = 0usize;
        for (s, &(n, h, w)) in shapes.iter().enumerate() {
            let data = inputs(n * 3 * h * w, s as u64);
            let t = Tensor::from_vec(data.clone(), (n, 3, h, w), &device)?;
            for key in keys {
                let gpu = decoded_to_rgba(&t, key)?;
                let cpu = decoded_to_rgba_cpu(&data, n, h, w, key)?;
                total_differing += compare(&format!("f32 {n}x3x{h}x{w} {key:?}"), &gpu, &cpu);
            }
            // A non-zero layout offset: the last image of the batch, via narrow.
            let last = t.narrow(0, n - 1, 1)?;
            let gpu = decoded_to_rgba(&last, AlphaKey::default())?;
            let cpu =
                decoded_to_rgba_cpu(&data[(n - 1) * 3 * h * w..], 1, h, w, AlphaKey::default())?;
            total_differing += compare(&format!("narrow {n}x3x{h}x{w}"), &gpu, &cpu);
            // f16 and bf16 inputs: the twin gets the same values, widened to f32.
            for dtype in [DType::F16, DType::BF16] {
                let half = t.to_dtype(dtype)?;
                let widened = half.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let gpu = decoded_to_rgba(&half, AlphaKey::default())?;
                let cpu = decoded_to_rgba_cpu(&widened, n, h, w, AlphaKey::default())?;
                total_differing += compare(&format!("{dtype:?} {n}x3x{h}x{w}"), &gpu, &cpu);
            }
        }
        // A non-contiguous input (NHWC data viewed as NCHW): converted on the device first.
        let (n, h, w) = (2, 33, 17);
        let nhwc = inputs(n * h * w * 3, 99);
        let t = Tensor::from_vec(nhwc, (n, h, w, 3), &device)?.permute((0, 3, 1, 2))?;
        let nchw = t.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let gpu = decoded_to_rgba(&t, AlphaKey::default())?;
        let cpu = decoded_to_rgba_cpu(&nchw, n, h, w, AlphaKey::default())?;
        total_differing += compare("permuted 2x3x33x17", &gpu, &cpu);

        // Every output word is written: launch into buffers poisoned with 0x00 and 0xFF; an
        // unwritten byte would equal the poison in both, which no single twin value can.
        let (n, h, w) = (3, 45, 29);
        let data = inputs(n * 3 * h * w, 7);
        let t = Tensor::from_vec(data.clone(), (n, 3, h, w), &device)?;
        let cpu = decoded_to_rgba_cpu(&data, n, h, w, AlphaKey::default())?;
        for poison in [0x00u8, 0xFF] {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(KernelError::Shape("expected CUDA storage".into()));
            };
            let src = cs.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
            let mut dst = dev
                .cuda_stream()
                .clone_htod(&vec![poison; n * h * w * 4])
                .map_err(|e| cuda_err("poison", e))?;
            launch_decoded_to_rgba(dev, &src, n, h * w, AlphaKey::default(), &mut dst)?;
            let gpu = dev.clone_dtoh(&dst)?;
            total_differing += compare(&format!("poison {poison:#04x}"), &gpu, &cpu);
        }

        // A rough time for a realistic batch (8 images of 1024x1024), after a warm-up.
        let t = Tensor::from_vec(inputs(8 * 3 * 1024 * 1024, 3), (8, 3, 1024, 1024), &device)?;
        decoded_to_rgba(&t, AlphaKey::default())?;
        let start = std::time::Instant::now();
        let reps = 20;
        for _ in 0..reps {
            decoded_to_rgba(&t, AlphaKey::default())?;
        }
        eprintln!(
            "timing: 8x3x1024x1024 f32 -> RGBA + copy to host: {:.3} ms per call (mean of {reps})",
            start.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
        );
        eprintln!("kernel_matches_cpu_twin: {total_differing} pixels differ by 1 in total");
        Ok(())
    }
}
