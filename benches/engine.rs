//! Engine throughput: images per second for a whole `Engine::generate`, per batch size.
//!
//! What is measured, and why:
//!
//! - `tiny_cpu_generate/batch/{1,4,8}`: the tiny test model (`models/tiny`) on the CPU with the
//!   preset's defaults (128×128, 4 Euler-ancestral steps, guidance 4 so classifier-free guidance
//!   doubles the UNet batch). One iteration is a whole `generate` — text encode, denoise, VAE
//!   decode, RGBA conversion — so the figure is what a worker gets per batch, and the batch sizes
//!   show how much batching buys. These numbers guard the engine's own CPU path (plumbing,
//!   scheduler, conversion) and its batching, not real-model speed; on the CPU the tiny VAE,
//!   which decodes at full 128×128 resolution, takes most of the time (see BENCHMARKS.md).
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
//! few (10) and flat (every sample runs the same number of iterations) because one iteration
//! takes tens of milliseconds to seconds. Criterion warns when a flat sample would hold a single
//! iteration, so each case's measurement time comes from a timed probe run (about 20 iterations
//! per case whatever the machine). Probes, and a GPU group's model load, are skipped for cases
//! criterion won't measure: `cargo bench --bench engine -- --test` (or `cargo test --benches`)
//! runs every case once, and a filter (`cargo bench --bench engine -- tiny_cpu`) skips the rest.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use popcon_worker::engine::preset::PresetRegistry;
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{Engine, EngineOptions, GenerateRequest, no_observer};

/// The pose stage's wording (`pipeline::prompt::pose_prompt`); the prompt only changes
/// tokenization, not the shapes.
const PROMPT: &str =
    "a friendly cartoon fox, head-to-toe shot of the subject, feet visible (not shoes)";

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{PROMPT}, variant {i}")).collect()
}

/// Samples per case: criterion's minimum, as one iteration can take seconds on the CPU.
const SAMPLES: usize = 10;

/// What criterion was asked to do, read from the command line it reads itself
/// (`Criterion::configure_from_args`): whether it measures, and which ids its filter keeps.
struct Cli {
    /// `--bench` without `--test`, `--list` or `--profile-time` (`cargo test --benches` passes
    /// no `--bench`: criterion then runs each case once).
    measuring: bool,
    filter: Filter,
}

enum Filter {
    All,
    Nothing,
    Exact(String),
    Regex(regex::Regex),
}

/// criterion's options that take a value: the word after one is not the filter.
const VALUE_OPTIONS: &[&str] = &[
    "-c",
    "--color",
    "--colour",
    "-s",
    "--save-baseline",
    "-b",
    "--baseline",
    "--baseline-lenient",
    "--load-baseline",
    "--format",
    "--profile-time",
    "--sample-size",
    "--warm-up-time",
    "--measurement-time",
    "--nresamples",
    "--noise-threshold",
    "--confidence-level",
    "--significance-level",
    "--plotting-backend",
    "--output-format",
];

fn cli() -> &'static Cli {
    static CLI: OnceLock<Cli> = OnceLock::new();
    CLI.get_or_init(|| {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let flag = |f: &str| args.iter().any(|a| a == f);
        let measuring = flag("--bench")
            && !flag("--test")
            && !flag("--list")
            && !args.iter().any(|a| a.starts_with("--profile-time"));
        let mut words = args.iter();
        let mut free = None;
        while let Some(a) = words.next() {
            if VALUE_OPTIONS.contains(&a.as_str()) {
                words.next();
            } else if !a.starts_with('-') {
                free = Some(a.clone());
                break;
            }
        }
        let filter = match free {
            _ if flag("--ignored") => Filter::Nothing,
            None => Filter::All,
            Some(f) if flag("--exact") => Filter::Exact(f),
            // A bad pattern makes criterion itself stop with the reason; keep everything here.
            Some(f) => regex::Regex::new(&f).map_or(Filter::All, Filter::Regex),
        };
        Cli { measuring, filter }
    })
}

/// Whether criterion's filter keeps the case `id` (`group/function/parameter`).
fn selected(id: &str) -> bool {
    match &cli().filter {
        Filter::All => true,
        Filter::Nothing => false,
        Filter::Exact(f) => id == f,
        Filter::Regex(r) => r.is_match(id),
    }
}

/// Host CPUs are shared and noisy: allow criterion's warm-up to find a run twice as slow.
const CPU_HEADROOM: f64 = 2.0;
/// A GPU's timings are steady once warm.
#[cfg(feature = "cuda")]
const GPU_HEADROOM: f64 = 1.5;

/// The measurement time for case `id`: long enough that every flat sample holds at least two
/// iterations of `run`, which is when criterion stays quiet (it warns "Unable to complete N
/// samples" when a sample would hold one). Times the last of `warm_runs + 1` calls, then allows
/// `headroom` × two runs per sample; a nominal second, without running anything, for a case
/// criterion won't measure.
fn measurement_time(id: &str, warm_runs: usize, headroom: f64, mut run: impl FnMut()) -> Duration {
    if !cli().measuring || !selected(id) {
        return Duration::from_secs(1);
    }
    let mut once = Duration::ZERO;
    for _ in 0..=warm_runs {
        let t0 = Instant::now();
        run();
        once = t0.elapsed();
    }
    once.mul_f64(headroom * SAMPLES as f64)
        .max(Duration::from_secs(2))
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

const BATCHES: [usize; 3] = [1, 4, 8];

fn tiny_cpu_generate(c: &mut Criterion) {
    const GROUP: &str = "tiny_cpu_generate";
    if !BATCHES
        .iter()
        .any(|b| selected(&format!("{GROUP}/batch/{b}")))
    {
        return;
    }
    let engine = tiny_engine();
    let mut group = c.benchmark_group(GROUP);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1));
    for batch in BATCHES {
        let req = GenerateRequest::new(engine.preset(), prompts(batch), 42);
        let generate = || {
            engine
                .generate(black_box(&req), &mut no_observer())
                .expect("tiny generate")
        };
        group
            .throughput(Throughput::Elements(batch as u64))
            .measurement_time(measurement_time(
                &format!("{GROUP}/batch/{batch}"),
                0,
                CPU_HEADROOM,
                || drop(generate()),
            ));
        group.bench_function(BenchmarkId::new("batch", batch), |b| b.iter(generate));
    }
    group.finish();
}

fn tiny_cpu_stages(c: &mut Criterion) {
    const GROUP: &str = "tiny_cpu_stages";
    const BATCH: usize = 8;
    const STAGES: [&str; 3] = ["text_encode", "unet_forward_cfg", "vae_decode"];
    let id = |stage: &str| format!("{GROUP}/{stage}/{BATCH}");
    if !STAGES.iter().any(|s| selected(&id(s))) {
        return;
    }
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

    let text_encode = || {
        let cond = engine.encode_prompts(black_box(&req.prompts));
        let uncond = engine.encode_prompts(std::slice::from_ref(&req.negative_prompt));
        (cond.expect("text encode"), uncond.expect("text encode"))
    };
    let unet_forward = || {
        engine
            .unet_forward(black_box(&unet_in), timestep, &context, None)
            .expect("unet forward")
    };
    let vae_decode = || engine.vae().decode(black_box(&vae_in)).expect("vae decode");

    let mut group = c.benchmark_group(GROUP);
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(BATCH as u64));
    let [text_id, unet_id, vae_id] = STAGES;
    group.measurement_time(measurement_time(&id(text_id), 0, CPU_HEADROOM, || {
        drop(text_encode())
    }));
    group.bench_function(BenchmarkId::new(text_id, BATCH), |b| b.iter(text_encode));
    group.measurement_time(measurement_time(&id(unet_id), 0, CPU_HEADROOM, || {
        drop(unet_forward())
    }));
    group.bench_function(BenchmarkId::new(unet_id, BATCH), |b| b.iter(unet_forward));
    group.measurement_time(measurement_time(&id(vae_id), 0, CPU_HEADROOM, || {
        drop(vae_decode())
    }));
    group.bench_function(BenchmarkId::new(vae_id, BATCH), |b| b.iter(vae_decode));
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
            ..Default::default()
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
            // The group name says which weights ran, known only once loaded; skip the (slow)
            // load when the filter keeps none of this preset's cases under either name.
            let id = |weights: &str, batch: usize| {
                format!("{}_cuda_generate_{weights}/batch/{batch}", case.preset)
            };
            let wanted = case.batches.iter().any(|&b| {
                ["real_weights", "random_weights"]
                    .iter()
                    .any(|w| super::selected(&id(w, b)))
            });
            if !wanted {
                continue;
            }
            // One engine at a time: each is dropped (and its GPU memory freed) before the next.
            let (engine, weights) = engine(case.preset);
            let mut group = c.benchmark_group(format!("{}_cuda_generate_{weights}", case.preset));
            // The probe's first run and criterion's warm-up absorb first-call costs: kernel
            // loading, cuBLAS handles, the allocator growing its pools.
            group
                .sampling_mode(SamplingMode::Flat)
                .sample_size(super::SAMPLES)
                .warm_up_time(Duration::from_secs(3));
            for &batch in case.batches {
                let mut req = GenerateRequest::new(engine.preset(), super::prompts(batch), 42);
                req.width = 512;
                req.height = 512;
                req.steps = case.steps;
                req.guidance = case.guidance;
                let generate = || {
                    engine
                        .generate(black_box(&req), &mut no_observer())
                        .expect("cuda generate")
                };
                group
                    .throughput(Throughput::Elements(batch as u64))
                    .measurement_time(super::measurement_time(
                        &id(weights, batch),
                        1,
                        super::GPU_HEADROOM,
                        || drop(generate()),
                    ));
                group.bench_function(BenchmarkId::new("batch", batch), |b| b.iter(generate));
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
