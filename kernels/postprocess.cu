// Fused post-process of the VAE decoder output: NCHW float in ~[-1, 1] -> RGBA8, HWC, straight
// alpha, with a near-white background keyed out to transparency.
//
// The CPU twin, `decoded_to_rgba_cpu` in src/kernels/mod.rs, is the reference for this kernel:
// any change here must be made there too, and the GPU test (src/kernels/cuda.rs) compares the two
// byte for byte. Both sides do the arithmetic in the same order, with the same IEEE float
// operations, so they agree exactly:
//   - `__fmul_rn` / `__fadd_rn` are never contracted into FMAs, which could round differently
//     from the CPU's separate multiply and add;
//   - the alpha ramp is integer arithmetic, so there is no float division to disagree on.
// Do NOT build this file with --use_fast_math: it would turn roundf and the float ops into
// approximations that no longer match the twin.
//
// Memory traffic is the whole cost (12 bytes read, 4 written per pixel): one thread per pixel
// reads the three planes at the same pixel index, so each plane's loads coalesce across a warp,
// and writes its four bytes as one aligned 32-bit store.

#include <stdint.h>

// One channel: clamp(x / 2 + 0.5, 0, 1) * 255, rounded half away from zero.
// fmaxf/fminf map NaN to the bound (0 here), as the twin does explicitly.
__device__ __forceinline__ unsigned int to_u8(float x) {
    float v = __fadd_rn(__fmul_rn(x, 0.5f), 0.5f);
    v = fminf(fmaxf(v, 0.0f), 1.0f);
    return (unsigned int)roundf(__fmul_rn(v, 255.0f));
}

// Alpha from min(r, g, b): opaque at or below `lo`, transparent at or above `hi`, and in between
// round(255 * (hi - m) / (hi - lo)) computed exactly in integers: floor((2a + b) / 2b) is a / b
// rounded half up, which for non-negative values is half away from zero.
__device__ __forceinline__ unsigned int key_alpha(unsigned int m, int enabled, unsigned int lo,
                                                  unsigned int hi) {
    if (!enabled || m <= lo) return 255u;
    if (m >= hi) return 0u;
    unsigned int num = 255u * (hi - m);
    unsigned int den = hi - lo;
    return (2u * num + den) / (2u * den);
}

// src: n images of 3 planes of hw floats each (contiguous NCHW, already offset by the caller).
// dst: n * hw * 4 bytes, 4-byte aligned (a fresh device allocation).
// Grid: y walks the images, x the pixels of one image, both grid-stride, so any n and hw fit
// whatever grid the host picks, and no thread divides by hw (a 64-bit division would cost more
// than the memory traffic of the pixel).
extern "C" __global__ void decoded_to_rgba_f32(const float* __restrict__ src,
                                               uint32_t* __restrict__ dst, uint64_t n,
                                               uint64_t hw, int key_enabled, unsigned int key_lo,
                                               unsigned int key_hi) {
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t img = blockIdx.y; img < n; img += gridDim.y) {
        const float* image = src + img * 3 * hw;
        uint32_t* out = dst + img * hw;
        for (uint64_t pix = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; pix < hw;
             pix += stride) {
            const unsigned int r = to_u8(image[pix]);
            const unsigned int g = to_u8(image[hw + pix]);
            const unsigned int b = to_u8(image[2 * hw + pix]);
            const unsigned int m = min(r, min(g, b));
            const unsigned int a = key_alpha(m, key_enabled, key_lo, key_hi);
            // Little-endian: byte 0 is R, so memory reads R, G, B, A.
            out[pix] = r | (g << 8) | (b << 16) | (a << 24);
        }
    }
}
