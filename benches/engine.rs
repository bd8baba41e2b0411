//! Engine throughput: images per second for a whole `Engine::generate`, per batch size.
//!
//! What is measured, and why:
//!
//! - `tiny_cpu_generate/batch/{1,4,8}`: the tiny test model (`models/tiny`) on the CPU with the
//!   preset's defaults (128×128, 4 Euler-ancestral steps, guidance 4 so classifier-free guidance
//!   doubles the UNet batch). One iteration is a whole `generate` — text encode, denoise, VAE
//!   decode, RGBA conversion — so the figure is what a worker gets per batch, and the batch sizes
//!   show how much batching buys. The tiny model is overhead-dominated: these numbers track the
//!   engine's own cost (tensor plumbing, scheduler, conversion), not real-model speed.
//! - `tiny_cpu_stages/*`: the stages of a batch-8 generate separately — the text encoding
//!   (8 prompts and the negative one), one UNet forward at the guided batch of 16, one VAE
//!   decode of 8 latents — so a slowdown in the `generate` rows can be placed.
//! - With `--features cuda` only, `{sd-turbo,sdxl-turbo}_cuda_generate_{real,random}_weights`:
//!   the production architectures at 512×512 with their turbo settings (guidance 0) on
//!   `cuda:0`. Real weights are used when `ModelFiles::locate` finds them in the Hugging Face
//!   cache; otherwise the reference shapes get random weights (`Engine::with_random_weights`,
//!   the tiny model's tokenizer), which costs the same arithmetic but yields noise images.
//!
//! Throughput is `Elements(batch)`, so criterion's `thrpt` line reads in images/s. Samples are
//! few and flat (every sample runs the same number of iterations) because one iteration takes
//! tens of milliseconds to seconds. `cargo bench --bench engine -- --test` runs every case once.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{Device, Tensor};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use popcon_worker::engine::preset::PresetRegistry;
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{Engine, EngineOptions, GenerateRequest, no_observer};

/// The kind of prompt the pose stage sends; its length only changes tokenization, not the shapes.
const PROMPT: &str =
    "full body, head to toe, a friendly cartoon fox standing, front view, plain white background";

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{PROMPT}, variant {i}")).collect()
}

fn models() -> (PathBuf, PresetRegistry) {
    let dir = PresetRegistry::default_models_dir();
    let registry = PresetRegistry::load(&dir).expect("the model presets must load");
    (dir, registry)
}

fn tiny_engine() -> Engine {
    let (dir, registry) = models();
    let preset = registry.get("tiny").expect("the tiny preset is built in");
    let files = ModelFiles::locate(preset, &dir, None)
        .expect("the tiny model ships in models/tiny (see scripts/make_tiny_model.py)");
    Engine::load(preset, &files, &EngineOptions::default()).expect("the tiny model must load")
}

fn tiny_cpu_generate(c: &mut Criterion) {
    let engine = tiny_engine();
    let mut group = c.benchmark_group("tiny_cpu_generate");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    for batch in [1usize, 4, 8] {
        let req = GenerateRequest::new(engine.preset(), prompts(batch), 42);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_with_input(BenchmarkId::new("batch", batch), &req, |b, req| {
            b.iter(|| {
                engine
                    .generate(black_box(req), &mut no_observer())
                    .expect("tiny generate")
            })
        });
    }
    group.finish();
}

fn tiny_cpu_stages(c: &mut Criterion) {
    const BATCH: usize = 8;
    let engine = tiny_engine();
    let req = GenerateRequest::new(engine.preset(), prompts(BATCH), 42);
    let scale = engine.vae_scale();
    let (lh, lw) = (req.height / scale, req.width / scale);
    let channels = engine.vae().spec.latent_channels;
    let timestep = engine
        .scheduler_for(&req)
        .expect("tiny scheduler")
        .timesteps()[0];
    // The guided context, as generate builds it: the negative prompt's rows, then the prompts'.
    // The tiny model is SD 2.x, so there is no SDXL added conditioning to pass.
    let mut guided_prompts = vec![req.negative_prompt.clone(); BATCH];
    guided_prompts.extend(req.prompts.iter().cloned());
    let context = engine
        .encode_prompts(&guided_prompts)
        .expect("tiny text encode")
        .context;
    let unet_in = Tensor::randn(0f32, 1f32, (2 * BATCH, channels, lh, lw), &Device::Cpu)
        .expect("random latents");
    // The VAE runs in f32 on the CPU (and the tiny VAE asks for f32 anyway).
    let vae_in =
        Tensor::randn(0f32, 1f32, (BATCH, channels, lh, lw), &Device::Cpu).expect("random latents");

    let mut group = c.benchmark_group("tiny_cpu_stages");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(BenchmarkId::new("text_encode", BATCH), |b| {
        b.iter(|| {
            let cond = engine.encode_prompts(black_box(&req.prompts));
            let uncond = engine.encode_prompts(std::slice::from_ref(&req.negative_prompt));
            (cond.expect("text encode"), uncond.expect("text encode"))
        })
    });
    group.bench_function(BenchmarkId::new("unet_forward_cfg", BATCH), |b| {
        b.iter(|| {
            engine
                .unet_forward(black_box(&unet_in), timestep, &context, None)
                .expect("unet forward")
        })
    });
    group.bench_function(BenchmarkId::new("vae_decode", BATCH), |b| {
        b.iter(|| engine.vae().decode(black_box(&vae_in)).expect("vae decode"))
    });
    group.finish();
}

#[cfg(feature = "cuda")]
mod gpu {
    //! The production architectures on `cuda:0`; see the file header.

    use std::hint::black_box;
    use std::time::Duration;

    use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
    use popcon_worker::engine::config::ModelSpecs;
    use popcon_worker::engine::weights::ModelFiles;
    use popcon_worker::engine::{
        DeviceChoice, Engine, EngineOptions, GenerateRequest, no_observer,
    };

    /// One GPU case: a preset at 512×512 with these steps and guidance, at these batch sizes.
    struct Case {
        preset: &'static str,
        steps: usize,
        guidance: f64,
        batches: &'static [usize],
    }

    const CASES: &[Case] = &[
        Case {
            preset: "sd-turbo",
            steps: 1,
            guidance: 0.0,
            batches: &[1, 4, 8],
        },
        Case {
            preset: "sdxl-turbo",
            steps: 4,
            guidance: 0.0,
            batches: &[1, 4],
        },
    ];

    /// The preset's engine on `cuda:0` and a label saying which weights it runs.
    fn engine(name: &str) -> (Engine, &'static str) {
        let (dir, registry) = super::models();
        let preset = registry.get(name).expect("the preset is built in");
        let options = EngineOptions {
            device: DeviceChoice::Cuda(0),
            dtype: None,
        };
        if let Ok(files) = ModelFiles::locate(preset, &dir, None) {
            let engine =
                Engine::load(preset, &files, &options).expect("the real weights must load");
            return (engine, "real_weights");
        }
        let tiny = registry.get("tiny").expect("the tiny preset is built in");
        let tiny_files = ModelFiles::locate(tiny, &dir, None)
            .expect("the tiny model ships in models/tiny (its tokenizer is borrowed)");
        let tokenizer_dir = tiny_files
            .dir_of("tokenizer/vocab.json")
            .expect("the tiny model has a tokenizer");
        let engine = Engine::with_random_weights(
            preset,
            ModelSpecs::reference(preset.architecture),
            tokenizer_dir,
            &options,
        )
        .expect("the random-weight engine must build on cuda:0");
        (engine, "random_weights")
    }

    pub fn cuda_generate(c: &mut Criterion) {
        for case in CASES {
            // One engine at a time: each is dropped (and its GPU memory freed) before the next.
            let (engine, weights) = engine(case.preset);
            let mut group = c.benchmark_group(format!("{}_cuda_generate_{weights}", case.preset));
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_secs(3))
                .measurement_time(Duration::from_secs(10));
            for &batch in case.batches {
                let mut req = GenerateRequest::new(engine.preset(), super::prompts(batch), 42);
                req.width = 512;
                req.height = 512;
                req.steps = case.steps;
                req.guidance = case.guidance;
                group.throughput(Throughput::Elements(batch as u64));
                group.bench_with_input(BenchmarkId::new("batch", batch), &req, |b, req| {
                    b.iter(|| {
                        engine
                            .generate(black_box(req), &mut no_observer())
                            .expect("cuda generate")
                    })
                });
            }
            group.finish();
        }
    }
}

fn config() -> Criterion {
    // No plots: the numbers go to BENCHMARKS.md, and no plotting backend is compiled in.
    Criterion::default().without_plots()
}

#[cfg(not(feature = "cuda"))]
criterion_group! {
    name = benches;
    config = config();
    targets = tiny_cpu_generate, tiny_cpu_stages
}

#[cfg(feature = "cuda")]
criterion_group! {
    name = benches;
    config = config();
    targets = tiny_cpu_generate, tiny_cpu_stages, gpu::cuda_generate
}

criterion_main!(benches);
