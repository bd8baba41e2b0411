//! Deterministic memory guards: a counting global allocator measures the peak bytes live
//! during a VAE decode (no clock, no RSS sampling), on the tiny model.
//!
//! They pin the two properties the production sizes depend on: a batch decodes one image at
//! a time (its peak is one image's activations plus the outputs, not the batch's
//! activations), and a tiled decode's peak is a tile's, not the image's. One test function, so
//! no other test of this binary allocates concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use candle_core::{Device, Tensor};
use popcon_worker::engine::preset::PresetRegistry;
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{Engine, EngineOptions, VaeTiling};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes allocated above what was live when `f` started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn engine(tiling: VaeTiling) -> Result<Engine> {
    let dir = PresetRegistry::default_models_dir();
    let reg = PresetRegistry::load(&dir)?;
    let preset = reg.get("tiny")?;
    let files = ModelFiles::locate(preset, &dir, None)?;
    Ok(Engine::load(
        preset,
        &files,
        &EngineOptions {
            vae_tiling: tiling,
            ..Default::default()
        },
    )?)
}

fn latent(n: usize, side: usize) -> Result<Tensor> {
    let len = n * 4 * side * side;
    let v: Vec<f32> = (0..len)
        .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    Ok(Tensor::from_vec(v, (n, 4, side, side), &Device::Cpu)?)
}

#[test]
fn vae_decode_memory_is_one_image_and_one_tile() -> Result<()> {
    let whole = engine(VaeTiling::Off)?;
    let tiled = engine(VaeTiling::Pixels(64))?;
    let (z1, z4) = (latent(1, 32)?, latent(4, 32)?);
    // One output image: 3 x 256 x 256 f32.
    let image = 3 * 256 * 256 * 4;

    let (out, one) = peak_during(|| whole.vae().decode(&z1));
    drop(out?);
    let (out, four) = peak_during(|| whole.vae().decode(&z4));
    drop(out?);
    // Slicing: four images cost one image's activations plus four outputs (and their
    // concatenation), never four images' activations.
    assert!(
        four <= one + 8 * image,
        "a batch of 4 peaked at {four} bytes, one image at {one}: the decode is not per image"
    );
    assert!(
        one > 8 * image,
        "one image's activations ({one} bytes) should dwarf its output"
    );

    let (out, tile_peak) = peak_during(|| tiled.vae().decode(&z1));
    drop(out?);
    assert!(
        tile_peak * 3 < one,
        "a tiled decode peaked at {tile_peak} bytes, the whole decode at {one}"
    );
    Ok(())
}
