//! The `popcon-worker` binary: the command line over the library.
//!
//! Exit codes: 0 success, 1 a failure while working (missing weights, a device error), 2 bad
//! arguments (clap's own code for usage errors, which our own argument checks share).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use popcon_worker::engine::animate::AnimateRequest;
use popcon_worker::engine::config::ModelSpecs;
use popcon_worker::engine::motion_preset::AnimationRegistry;
use popcon_worker::engine::preset::{ModelSource, PresetRegistry, SchedulerKind};
use popcon_worker::engine::weights::{self, ModelFiles};
use popcon_worker::engine::{
    DeviceChoice, Engine, EngineError, EngineOptions, GenerateRequest, InitImage, VaeTiling,
    no_observer,
};
use popcon_worker::kernels::AlphaKey;
use popcon_worker::pipeline::post::{self, ImageLimits};

mod local_redis;
mod ops;

#[derive(Parser, Debug)]
#[command(
    name = "popcon-worker",
    version,
    about = "GPU worker daemon with embedded Stable Diffusion"
)]
struct Cli {
    /// Folder with model presets (*.toml) and local models such as `tiny/`.
    #[arg(long, global = true, env = "POPCON_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from a prompt (txt2img, or img2img with --init-image).
    Generate(Box<GenerateArgs>),
    /// Animate a still with an animation preset (AnimateDiff): animated WebP and APNG.
    Animate(Box<AnimateArgs>),
    /// List, check and fetch model presets.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Run the worker daemon until SIGTERM/SIGINT.
    Run(Box<popcon_worker::config::RunArgs>),
    /// Serve the enqueue API (HTTP) until SIGTERM/SIGINT.
    Api(Box<ops::ApiArgs>),
    /// Submit work: generate-set, retry, regenerate, approve, approve-all (charged like the API).
    Enqueue {
        #[command(subcommand)]
        command: ops::EnqueueCommand,
    },
    /// API users and their tokens.
    Users {
        #[command(subcommand)]
        command: ops::UsersCommand,
    },
    /// Credit balances.
    Credits {
        #[command(subcommand)]
        command: ops::CreditsCommand,
    },
    /// The off-hours flag: costly work is not claimed while it is on (TTL at most 20 h).
    OffHours {
        #[command(subcommand)]
        command: ops::OffHoursCommand,
    },
    /// Inspect jobs.
    Job {
        #[command(subcommand)]
        command: ops::JobCommand,
    },
    /// Dead letters: list and requeue.
    Dead {
        #[command(subcommand)]
        command: ops::DeadCommand,
    },
    /// Probe a daemon's HTTP endpoint (container health checks): exit 0 on a 200, else 1.
    Healthcheck(HealthcheckArgs),
}

#[derive(Subcommand, Debug)]
enum ModelsCommand {
    /// Every known model and animation preset and whether its files are present.
    List,
    /// Download a preset's files (an animation preset: its motion adapter) from the Hugging
    /// Face Hub into the local cache.
    Fetch {
        /// Preset name (see `models list`).
        name: String,
    },
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// A diffusers folder to load instead of the preset's own location.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the first image; image i of the batch uses seed + i.
    #[arg(long)]
    seed: u64,
    /// Denoising steps (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    steps: Option<u32>,
    /// Images in one batch (one UNet batch).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    batch: u32,
    /// Classifier-free guidance scale; <= 1 disables it (default: the preset's).
    #[arg(long)]
    guidance: Option<f64>,
    /// An init image for img2img (PNG, JPEG or WebP).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img strength in (0, 1] (default: the preset's).
    #[arg(long, requires = "init_image")]
    strength: Option<f64>,
    /// Output size WIDTHxHEIGHT, multiples of 8 (default: the preset's).
    #[arg(long)]
    size: Option<String>,
    /// euler_ancestral, euler or ddim (default: the preset's).
    #[arg(long)]
    scheduler: Option<SchedulerKind>,
    /// Key a plain near-white background to transparency (emoji style).
    #[arg(long)]
    alpha_key: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// Run the preset's architecture at its real size with random weights instead of loading
    /// a checkpoint (benchmarks on hosts without the weights; the images are noise). The CLIP
    /// tokenizer comes from the tiny model in the models folder.
    #[arg(long, conflicts_with = "model_dir")]
    random_weights: bool,
    /// VAE decoding in overlapping tiles: `auto` (tiles of the VAE's training size, for
    /// larger images), `off`, or a tile side in pixels.
    #[arg(long, default_value = "auto")]
    vae_tiling: VaeTiling,
    /// Output folder; images are written as <seed>.png.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct AnimateArgs {
    /// Animation preset (`models list`).
    #[arg(long, default_value = "tiny-motion")]
    animation: String,
    /// The still to animate (PNG, JPEG or WebP); transparency is flattened onto white.
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    /// Seed of the first clip; clip i of the batch uses seed + i.
    #[arg(long)]
    seed: u64,
    /// Frames per clip (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=64))]
    frames: Option<u32>,
    /// Denoising steps before the strength cut (default: the preset's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    steps: Option<u32>,
    /// How far the clip may move from the still, in (0, 1] (default: the preset's).
    #[arg(long)]
    strength: Option<f64>,
    /// Classifier-free guidance scale; <= 1 disables it (default: the preset's).
    #[arg(long)]
    guidance: Option<f64>,
    /// Output size WIDTHxHEIGHT, multiples of 8 (default: the preset's).
    #[arg(long)]
    size: Option<String>,
    /// Clips in one batch (one UNet batch of clips x frames rows).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    batch: u32,
    /// Key a plain near-white background to transparency (sticker style).
    #[arg(long)]
    alpha_key: bool,
    #[arg(long, default_value = "cpu")]
    device: DeviceChoice,
    /// SD 1.5 and the motion adapter at their real size with random weights (benchmarks).
    #[arg(long)]
    random_weights: bool,
    /// Output folder: <seed>.webp and <seed>.apng per clip.
    #[arg(long)]
    out: PathBuf,
}

/// A failure and the exit code it maps to.
enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        // Errors that mean "the command line asked for something impossible" are usage errors.
        match e.downcast_ref::<EngineError>() {
            Some(EngineError::UnknownModel { .. } | EngineError::InvalidRequest(_)) => {
                Failure::Usage(format!("{e:#}"))
            }
            _ => Failure::Runtime(e),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let models_dir = cli
        .models_dir
        .clone()
        .unwrap_or_else(PresetRegistry::default_models_dir);
    let result = match cli.command {
        Command::Generate(args) => generate(&models_dir, *args),
        Command::Animate(args) => animate(&models_dir, *args),
        Command::Models { command } => models(&models_dir, command),
        Command::Run(args) => args
            .into_config(cli.models_dir.clone())
            .map_err(|e| Failure::Usage(e.to_string()))
            .and_then(ops::run_daemon),
        Command::Api(args) => ops::api(*args),
        Command::Enqueue { command } => ops::enqueue(command),
        Command::Users { command } => ops::users(command),
        Command::Credits { command } => ops::credits(command),
        Command::OffHours { command } => ops::off_hours(command),
        Command::Job { command } => ops::job(command),
        Command::Dead { command } => ops::dead(command),
        Command::Healthcheck(args) => healthcheck(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("--size `{s}`: expected WIDTHxHEIGHT, e.g. 512x512"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("--size `{s}`: `{v}` is not a whole number"))
    };
    let (w, h) = (parse(w)?, parse(h)?);
    if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 {
        return Err(format!(
            "--size {w}x{h}: width and height must be positive multiples of 8"
        ));
    }
    if w > 4096 || h > 4096 {
        return Err(format!("--size {w}x{h}: at most 4096 a side"));
    }
    Ok((w, h))
}

fn generate(models_dir: &Path, args: GenerateArgs) -> Result<(), Failure> {
    let registry = PresetRegistry::load(models_dir).map_err(anyhow::Error::from)?;
    let preset = registry
        .get(&args.model)
        .map_err(anyhow::Error::from)?
        .clone();

    // Every argument is checked before the model is loaded: a typo costs no GPU time.
    let (width, height) = match &args.size {
        Some(s) => parse_size(s).map_err(Failure::Usage)?,
        None => (preset.defaults.width, preset.defaults.height),
    };
    if let Some(g) = args.guidance
        && (!g.is_finite() || g < 0.0)
    {
        return Err(Failure::Usage(format!(
            "--guidance {g}: must be a number >= 0"
        )));
    }
    let init = match &args.init_image {
        None => None,
        Some(path) => {
            let strength = args.strength.unwrap_or(preset.defaults.strength);
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(Failure::Usage(format!(
                    "--strength {strength}: must be greater than 0 and at most 1"
                )));
            }
            let bytes = std::fs::read(path).map_err(|e| {
                Failure::Usage(format!(
                    "--init-image {}: cannot read it: {e}",
                    path.display()
                ))
            })?;
            let image = post::decode_image(&bytes, ImageLimits::default())
                .map_err(|e| Failure::Usage(format!("--init-image {}: {e}", path.display())))?;
            Some(InitImage { image, strength })
        }
    };
    let prompts = vec![args.prompt.clone(); args.batch as usize];
    let mut req = GenerateRequest::new(&preset, prompts, args.seed);
    req.negative_prompt = args.negative.clone();
    if let Some(steps) = args.steps {
        req.steps = steps as usize;
    }
    if let Some(g) = args.guidance {
        req.guidance = g;
    }
    req.width = width;
    req.height = height;
    req.init = init;
    req.scheduler = args.scheduler;
    if args.alpha_key {
        req.alpha_key = AlphaKey::default();
    }
    req.validate().map_err(anyhow::Error::from)?;

    let options = EngineOptions {
        device: args.device,
        dtype: None,
        vae_tiling: args.vae_tiling,
    };
    let load_start = std::time::Instant::now();
    let engine = if args.random_weights {
        let tokenizer = models_dir.join("tiny/tokenizer");
        Engine::with_random_weights(
            &preset,
            ModelSpecs::reference(preset.architecture),
            &tokenizer,
            &options,
        )
        .context("building the model with random weights")?
    } else {
        let files = ModelFiles::locate(&preset, models_dir, args.model_dir.as_deref())
            .map_err(anyhow::Error::from)?;
        Engine::load(&preset, &files, &options).context("loading the model")?
    };
    let load = load_start.elapsed();
    let out = engine
        .generate(&req, &mut no_observer())
        .context("generating")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let post_start = std::time::Instant::now();
    for (img, seed) in out.images.iter().zip(&req.seeds) {
        let mut img = img.clone();
        if args.alpha_key {
            post::restore_enclosed(&mut img);
        }
        let png = post::encode_png(&img).context("encoding PNG")?;
        let path = args.out.join(format!("{seed}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    let write = post_start.elapsed();
    let t = out.timings;
    let ms = |d: Duration| format!("{:>10.1}", d.as_secs_f64() * 1e3);
    println!(
        "model {} on {:?}, {}x{}, batch {}, {} steps",
        preset.name, args.device, width, height, args.batch, req.steps
    );
    println!("{:<14}{:>10}", "stage", "ms");
    for (name, d) in [
        ("load", load),
        ("text_encode", t.text_encode),
        ("vae_encode", t.vae_encode),
        ("denoise", t.denoise),
        ("vae_decode", t.vae_decode),
        ("to_rgba", t.postprocess),
        ("png_write", write),
    ] {
        println!("{name:<14}{}", ms(d));
    }
    println!("{:<14}{}", "total", ms(load + t.total() + write));
    if let Some(kb) = peak_rss_kib() {
        println!("{:<14}{:>10.1}", "peak_rss_mib", kb as f64 / 1024.0);
    }
    Ok(())
}

fn animate(models_dir: &Path, args: AnimateArgs) -> Result<(), Failure> {
    let anims = AnimationRegistry::load(models_dir).map_err(anyhow::Error::from)?;
    let anim = anims
        .get(&args.animation)
        .map_err(anyhow::Error::from)?
        .clone();
    let registry = PresetRegistry::load(models_dir).map_err(anyhow::Error::from)?;
    let base = registry
        .get(&anim.base)
        .map_err(anyhow::Error::from)?
        .clone();
    let d = &anim.defaults;
    let (width, height) = match &args.size {
        Some(s) => parse_size(s).map_err(Failure::Usage)?,
        None => (d.width, d.height),
    };
    let bytes = std::fs::read(&args.image).map_err(|e| {
        Failure::Usage(format!(
            "--image {}: cannot read it: {e}",
            args.image.display()
        ))
    })?;
    let still = image::load_from_memory(&bytes)
        .map_err(|e| Failure::Usage(format!("--image {}: {e}", args.image.display())))?
        .to_rgba8();
    let n = args.batch as usize;
    let req = AnimateRequest {
        prompts: vec![args.prompt.clone(); n],
        negative_prompt: args.negative.clone(),
        seeds: (0..n as u64).map(|i| args.seed.wrapping_add(i)).collect(),
        stills: vec![popcon_worker::pipeline::sticker::over_white(&still); n],
        frames: args.frames.map_or(d.frames, |f| f as usize),
        steps: args.steps.map_or(d.steps, |s| s as usize),
        guidance: args.guidance.unwrap_or(d.guidance),
        strength: args.strength.unwrap_or(d.strength),
        width,
        height,
        scheduler: None,
        timestep_spacing: None,
        alpha_key: if args.alpha_key {
            AlphaKey::default()
        } else {
            AlphaKey::disabled()
        },
    };
    // Checked before loading: a typo costs no GPU time (the frame limit is checked against
    // the adapter once it is loaded).
    req.validate(usize::MAX).map_err(anyhow::Error::from)?;
    let options = EngineOptions {
        device: args.device,
        dtype: None,
        vae_tiling: VaeTiling::Auto,
    };
    let load_start = std::time::Instant::now();
    let engine = if args.random_weights {
        let tokenizer = models_dir.join("tiny/tokenizer");
        let mut e = Engine::with_random_weights(
            &base,
            ModelSpecs::reference(base.architecture),
            &tokenizer,
            &options,
        )
        .context("building the base with random weights")?;
        e.set_animation_scheduler(&anim);
        e.attach_random_motion(popcon_worker::engine::motion::MotionSpec::sd15())
            .context("building the motion adapter with random weights")?;
        e
    } else {
        let base_files =
            ModelFiles::locate(&base, models_dir, None).map_err(anyhow::Error::from)?;
        let adapter_files =
            ModelFiles::locate(&anim, models_dir, None).map_err(anyhow::Error::from)?;
        Engine::load_animation(&anim, &base, &base_files, &adapter_files, &options)
            .context("loading the animation model")?
    };
    let load = load_start.elapsed();
    let out = engine
        .animate(&req, &mut no_observer())
        .context("animating")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let write_start = std::time::Instant::now();
    for (frames, seed) in out.clips.into_iter().zip(&req.seeds) {
        let files = popcon_worker::pipeline::sticker::sticker_files(frames, d.fps, d.loop_blend)
            .context("encoding the clip")?;
        for (ext, data) in [("webp", files.webp), ("apng", files.apng)] {
            let path = args.out.join(format!("{seed}.{ext}"));
            std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    let write = write_start.elapsed();
    let t = out.timings;
    let ms = |d: Duration| format!("{:>10.1}", d.as_secs_f64() * 1e3);
    println!(
        "animation {} on {:?}, {}x{}, {} clip(s) of {} frames, {} steps at strength {}",
        anim.name, args.device, width, height, n, req.frames, req.steps, req.strength
    );
    println!("{:<14}{:>10}", "stage", "ms");
    for (name, d) in [
        ("load", load),
        ("text_encode", t.text_encode),
        ("vae_encode", t.vae_encode),
        ("denoise", t.denoise),
        ("vae_decode", t.vae_decode),
        ("to_rgba", t.postprocess),
        ("encode_write", write),
    ] {
        println!("{name:<14}{}", ms(d));
    }
    println!("{:<14}{}", "total", ms(load + t.total() + write));
    if let Some(kb) = peak_rss_kib() {
        println!("{:<14}{:>10.1}", "peak_rss_mib", kb as f64 / 1024.0);
    }
    Ok(())
}

/// The process's peak resident set (`VmHWM`), where the OS reports it (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn models(models_dir: &Path, command: ModelsCommand) -> Result<(), Failure> {
    let registry = PresetRegistry::load(models_dir).map_err(anyhow::Error::from)?;
    match command {
        ModelsCommand::List => {
            println!(
                "{:<12}{:<7}{:<12}{:<55}source",
                "name", "arch", "files", "description"
            );
            for p in registry.iter() {
                let status = match ModelFiles::locate(p, models_dir, None) {
                    Ok(_) => "present".to_string(),
                    Err(EngineError::MissingWeights { missing, .. }) => {
                        format!("missing {}", missing.len())
                    }
                    Err(_) => "error".to_string(),
                };
                let source = match &p.source {
                    ModelSource::Hub { repo, revision } => {
                        format!("{repo}@{}", &revision[..revision.len().min(12)])
                    }
                    ModelSource::Local { dir } => models_dir.join(dir).display().to_string(),
                };
                println!(
                    "{:<12}{:<7}{:<12}{:<55}{source}",
                    p.name,
                    format!("{:?}", p.architecture).to_lowercase(),
                    status,
                    p.description
                );
            }
            let anims = AnimationRegistry::load(models_dir).map_err(anyhow::Error::from)?;
            println!();
            println!(
                "{:<16}{:<11}{:<12}{:<55}adapter",
                "animation", "base", "files", "description"
            );
            for a in anims.iter() {
                let status = match ModelFiles::locate(a, models_dir, None) {
                    Ok(_) => "present".to_string(),
                    Err(EngineError::MissingWeights { missing, .. }) => {
                        format!("missing {}", missing.len())
                    }
                    Err(_) => "error".to_string(),
                };
                let source = match &a.source {
                    ModelSource::Hub { repo, revision } => {
                        format!("{repo}@{}", &revision[..revision.len().min(12)])
                    }
                    ModelSource::Local { dir } => models_dir.join(dir).display().to_string(),
                };
                println!(
                    "{:<16}{:<11}{:<12}{:<55}{source}",
                    a.name, a.base, status, a.description
                );
            }
            println!("hub cache: {}", weights::hub_cache_dir().display());
            Ok(())
        }
        ModelsCommand::Fetch { name } => {
            let anims = AnimationRegistry::load(models_dir).map_err(anyhow::Error::from)?;
            if registry.get(&name).is_err()
                && let Ok(anim) = anims.get(&name)
            {
                // An animation preset: its adapter here; its base is a model preset of its own.
                let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
                weights::fetch(anim, progress).with_context(|| format!("fetching {name}"))?;
                let base = match registry
                    .get(&anim.base)
                    .map(|b| ModelFiles::locate(b, models_dir, None))
                {
                    Ok(Ok(_)) => "present".to_string(),
                    _ => format!("missing: run `popcon-worker models fetch {}`", anim.base),
                };
                println!("{name}: adapter files present; base {} {base}", anim.base);
                return Ok(());
            }
            let preset = registry.get(&name).map_err(anyhow::Error::from)?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let files =
                weights::fetch(preset, progress).with_context(|| format!("fetching {name}"))?;
            let unet = files
                .path(&preset.weights.unet)
                .map_err(anyhow::Error::from)?;
            println!(
                "{name}: all {} files present ({})",
                preset.files().len(),
                unet.display()
            );
            Ok(())
        }
    }
}

#[derive(Args, Debug)]
struct HealthcheckArgs {
    /// The URL to probe: the daemon's `--http` address and `/healthz` (or `/readyz`).
    #[arg(
        long,
        env = "POPCON_HEALTHCHECK_URL",
        default_value = "http://127.0.0.1:9000/healthz"
    )]
    url: String,
    /// Give up after this long (connecting and the answer together).
    #[arg(long, default_value = "3s", value_parser = popcon_worker::config::parse_duration)]
    timeout: Duration,
}

/// For images without curl: one GET, no redirects; healthy only on a 200.
fn healthcheck(args: &HealthcheckArgs) -> Result<(), Failure> {
    let agent = ureq::AgentBuilder::new()
        .timeout(args.timeout)
        .redirects(0)
        .build();
    let url = &args.url;
    match agent.get(url).call() {
        Ok(resp) if resp.status() == 200 => {
            println!("healthy: {url} answered 200");
            Ok(())
        }
        Ok(resp) => Err(Failure::Runtime(anyhow::anyhow!(
            "unhealthy: {url} answered {}",
            resp.status()
        ))),
        Err(ureq::Error::Status(code, resp)) => {
            let body: String = resp
                .into_string()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            Err(Failure::Runtime(anyhow::anyhow!(
                "unhealthy: {url} answered {code}: {}",
                body.trim()
            )))
        }
        Err(e) => Err(Failure::Runtime(anyhow::anyhow!(
            "unhealthy: {url}: {e} (timeout {:?})",
            args.timeout
        ))),
    }
}
