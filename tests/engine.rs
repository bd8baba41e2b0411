//! Engine behaviour on the tiny model: reproducibility per seed, batch = singles, img2img,
//! progress and cancellation, and request validation; the same for the tiny animation
//! preset's clips, and adapters that do not fit their base.

use std::sync::OnceLock;

use anyhow::Result;
use popcon_worker::engine::animate::AnimateRequest;
use popcon_worker::engine::motion_preset::AnimationRegistry;
use popcon_worker::engine::preset::{PresetRegistry, SchedulerKind};
use popcon_worker::engine::weights::ModelFiles;
use popcon_worker::engine::{
    Engine, EngineError, EngineOptions, Flow, GenerateRequest, InitImage, Progress, Stage,
    no_observer,
};

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = PresetRegistry::default_models_dir();
        let reg = PresetRegistry::load(&dir).expect("presets");
        let preset = reg.get("tiny").expect("tiny preset");
        let files = ModelFiles::locate(preset, &dir, None).expect("tiny model files");
        Engine::load(preset, &files, &EngineOptions::default()).expect("tiny model loads")
    })
}

fn request(prompts: &[&str], seed: u64) -> GenerateRequest {
    let mut req = GenerateRequest::new(
        engine().preset(),
        prompts.iter().map(|p| p.to_string()).collect(),
        seed,
    );
    req.width = 64;
    req.height = 64;
    req
}

fn init_image() -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        if (x as i32 - 32).pow(2) + (y as i32 - 32).pow(2) < 400 {
            image::Rgb([200, 60, 30])
        } else {
            image::Rgb([250, 250, 250])
        }
    })
}

#[test]
fn same_seed_same_images_other_seed_other_images() -> Result<()> {
    let a = engine().generate(&request(&["a red fox"], 7), &mut no_observer())?;
    let b = engine().generate(&request(&["a red fox"], 7), &mut no_observer())?;
    let c = engine().generate(&request(&["a red fox"], 8), &mut no_observer())?;
    assert_eq!(a.images, b.images);
    assert_ne!(a.images, c.images);
    Ok(())
}

#[test]
fn each_image_of_a_batch_equals_the_image_generated_alone() -> Result<()> {
    // Different prompts per image, guidance on (the UNet batch is 2N): still per-image exact.
    let prompts = ["a red fox", "a blue whale", "a green frog", "a cat"];
    let batch = engine().generate(&request(&prompts, 10), &mut no_observer())?;
    assert_eq!(batch.images.len(), 4);
    for (i, prompt) in prompts.iter().enumerate() {
        let alone = engine().generate(&request(&[prompt], 10 + i as u64), &mut no_observer())?;
        assert_eq!(
            batch.images[i], alone.images[0],
            "image {i} differs from its single run"
        );
    }
    Ok(())
}

#[test]
fn img2img_batches_equal_singles_and_strength_changes_the_result() -> Result<()> {
    let mut req = request(&["a fox", "a fox"], 3);
    req.init = Some(InitImage {
        image: init_image(),
        strength: 0.5,
    });
    req.scheduler = Some(SchedulerKind::Ddim);
    let batch = engine().generate(&req, &mut no_observer())?;
    let mut single = request(&["a fox"], 4);
    single.init = req.init.clone();
    single.scheduler = req.scheduler;
    let alone = engine().generate(&single, &mut no_observer())?;
    assert_eq!(batch.images[1], alone.images[0]);
    let mut stronger = single.clone();
    if let Some(init) = stronger.init.as_mut() {
        init.strength = 1.0;
    }
    let s = engine().generate(&stronger, &mut no_observer())?;
    assert_ne!(s.images[0], alone.images[0]);
    Ok(())
}

#[test]
fn progress_reports_every_step_and_cancellation_stops_the_run() -> Result<()> {
    let mut seen: Vec<Progress> = Vec::new();
    let mut req = request(&["a fox"], 1);
    req.steps = 3;
    engine().generate(&req, &mut |p: Progress| {
        seen.push(p);
        Flow::Continue
    })?;
    let denoise: Vec<usize> = seen
        .iter()
        .filter(|p| p.stage == Stage::Denoise)
        .map(|p| p.step)
        .collect();
    assert_eq!(denoise, [0, 1, 2, 3]);
    assert!(
        seen.iter()
            .all(|p| p.stage != Stage::Denoise || p.total == 3)
    );
    assert_eq!(seen.first().map(|p| p.stage), Some(Stage::TextEncode));
    assert_eq!(seen.last().map(|p| p.stage), Some(Stage::VaeDecode));

    let mut calls = 0;
    let err = engine()
        .generate(&req, &mut |p: Progress| {
            calls += 1;
            if p.stage == Stage::Denoise && p.step == 1 {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(calls, 3, "stopped at the second step");
    Ok(())
}

#[test]
fn invalid_requests_fail_before_any_work_with_the_reason() {
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                width: 60,
                ..request(&["x"], 1)
            },
            "multiples of 8",
        ),
        (
            GenerateRequest {
                seeds: vec![1, 2],
                ..request(&["x"], 1)
            },
            "one seed per image",
        ),
        (
            GenerateRequest {
                steps: 0,
                ..request(&["x"], 1)
            },
            "steps",
        ),
        (
            GenerateRequest {
                init: Some(InitImage {
                    image: init_image(),
                    strength: 1.5,
                }),
                ..request(&["x"], 1)
            },
            "strength",
        ),
        (
            GenerateRequest {
                init: Some(InitImage {
                    image: init_image(),
                    strength: 0.1,
                }),
                steps: 4,
                ..request(&["x"], 1)
            },
            "runs no step",
        ),
        (request(&[], 1), "at least one prompt"),
    ];
    for (req, want) in cases {
        let mut calls = 0;
        let err = engine()
            .generate(&req, &mut |_: Progress| {
                calls += 1;
                Flow::Continue
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
        assert!(
            err.to_string().contains(want),
            "{err} should mention {want}"
        );
        assert_eq!(calls, 0, "no stage started for: {err}");
    }
}

#[test]
fn alpha_key_is_applied_on_the_generated_pixels_only() -> Result<()> {
    // The tiny model's images are noise with no white background, so use a low key that
    // noise crosses; the ramp itself is unit-tested against the kernel twin.
    let plain = engine().generate(&request(&["a fox"], 5), &mut no_observer())?;
    let mut req = request(&["a fox"], 5);
    let key = popcon_worker::kernels::AlphaKey::new(100, 200)?;
    req.alpha_key = key;
    let keyed = engine().generate(&req, &mut no_observer())?;
    let (mut opaque, mut clear) = (0, 0);
    for (p, q) in keyed.images[0].pixels().zip(plain.images[0].pixels()) {
        assert_eq!(p.0[..3], q.0[..3], "keying never changes colour");
        assert_eq!(q[3], 255, "no key: opaque");
        let m = p[0].min(p[1]).min(p[2]);
        if m <= key.lo {
            assert_eq!(p[3], 255, "{p:?}");
            opaque += 1;
        }
        if m >= key.hi {
            assert_eq!(p[3], 0, "{p:?}");
            clear += 1;
        }
    }
    assert!(
        opaque > 0 && clear > 0,
        "{opaque} opaque, {clear} clear pixels"
    );
    Ok(())
}

// ---- animation (the tiny AnimateDiff preset) ----------------------------------------------------

fn animator() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let dir = PresetRegistry::default_models_dir();
        let anims = AnimationRegistry::load(&dir).expect("animation presets");
        let anim = anims.get("tiny-motion").expect("tiny animation preset");
        let reg = PresetRegistry::load(&dir).expect("presets");
        let base = reg.get(&anim.base).expect("tiny-sd15");
        Engine::load_animation(
            anim,
            base,
            &ModelFiles::locate(base, &dir, None).expect("tiny-sd15 files"),
            &ModelFiles::locate(anim, &dir, None).expect("tiny adapter files"),
            &EngineOptions::default(),
        )
        .expect("the tiny animation model loads")
    })
}

fn clip_request(prompts: &[&str], seeds: &[u64], guidance: f64) -> AnimateRequest {
    AnimateRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: "blurry".into(),
        seeds: seeds.to_vec(),
        stills: prompts.iter().map(|_| init_image()).collect(),
        frames: 6,
        steps: 4,
        guidance,
        strength: 0.75,
        width: 64,
        height: 64,
        scheduler: None,
        timestep_spacing: None,
        alpha_key: popcon_worker::kernels::AlphaKey::disabled(),
    }
}

#[test]
fn a_clip_is_reproducible_and_each_clip_of_a_batch_equals_it_alone() -> Result<()> {
    let e = animator();
    for guidance in [1.0, 3.0] {
        let batch = e.animate(
            &clip_request(&["a red fox", "a blue whale"], &[5, 9], guidance),
            &mut no_observer(),
        )?;
        assert_eq!(batch.clips.len(), 2);
        for (i, (prompt, seed)) in [("a red fox", 5), ("a blue whale", 9)]
            .into_iter()
            .enumerate()
        {
            let alone = e.animate(
                &clip_request(&[prompt], &[seed], guidance),
                &mut no_observer(),
            )?;
            assert_eq!(alone.clips[0].len(), 6);
            // A clip's group norms and attention span only its own frames, and its noise is
            // its own stream: the batch changes nothing but float rounding in the gemms.
            let worst = alone.clips[0]
                .iter()
                .zip(&batch.clips[i])
                .flat_map(|(a, b)| {
                    a.as_raw()
                        .iter()
                        .zip(b.as_raw())
                        .map(|(x, y)| x.abs_diff(*y))
                })
                .max()
                .unwrap_or(0);
            assert!(
                worst <= 1,
                "clip {i} (guidance {guidance}) is {worst}/255 off alone"
            );
        }
        let again = e.animate(
            &clip_request(&["a red fox", "a blue whale"], &[5, 9], guidance),
            &mut no_observer(),
        )?;
        assert_eq!(again.clips, batch.clips, "same seeds, same clips");
    }
    let other = e.animate(&clip_request(&["a red fox"], &[6], 1.0), &mut no_observer())?;
    let first = e.animate(&clip_request(&["a red fox"], &[5], 1.0), &mut no_observer())?;
    assert_ne!(other.clips, first.clips, "another seed, another clip");
    // The frames move: the motion is not one still repeated.
    assert_ne!(first.clips[0][0], first.clips[0][3]);
    Ok(())
}

#[test]
fn animation_progress_counts_steps_and_cancel_stops_between_them() -> Result<()> {
    let e = animator();
    let mut seen = Vec::new();
    e.animate(&clip_request(&["a cat"], &[1], 1.0), &mut |p: Progress| {
        seen.push(p);
        Flow::Continue
    })?;
    // strength 0.75 of 4 steps: 3 denoising steps, reported 0..=3 of 3.
    let denoise: Vec<usize> = seen
        .iter()
        .filter(|p| p.stage == Stage::Denoise)
        .map(|p| p.step)
        .collect();
    assert_eq!(denoise, [0, 1, 2, 3]);
    assert!(
        seen.iter()
            .all(|p| p.stage != Stage::Denoise || p.total == 3)
    );
    let mut steps = 0;
    let err = e
        .animate(&clip_request(&["a cat"], &[1], 1.0), &mut |p: Progress| {
            if p.stage == Stage::Denoise {
                steps += 1;
            }
            if steps == 2 {
                Flow::Cancel
            } else {
                Flow::Continue
            }
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    Ok(())
}

#[test]
fn bad_animation_input_is_refused_before_any_work() -> Result<()> {
    let e = animator();
    type Edit = Box<dyn Fn(&mut AnimateRequest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|r| r.frames = 1), "2 to 32 frames"),
        (Box::new(|r| r.frames = 33), "2 to 32 frames"),
        (Box::new(|r| r.width = 60), "multiples of 8"),
        (Box::new(|r| r.strength = 0.0), "strength"),
        (Box::new(|r| r.seeds.clear()), "one of each per clip"),
        (
            Box::new(|r| r.stills = vec![image::RgbImage::new(0, 0)]),
            "0x0",
        ),
        (Box::new(|r| r.strength = 0.1), "runs no step"),
    ];
    for (edit, want) in cases {
        let mut req = clip_request(&["a cat"], &[1], 1.0);
        edit(&mut req);
        let mut called = false;
        let err = e
            .animate(&req, &mut |_: Progress| {
                called = true;
                Flow::Continue
            })
            .unwrap_err();
        assert!(matches!(err, EngineError::InvalidRequest(_)), "{err}");
        assert!(err.to_string().contains(want), "{err} (wanted {want})");
        assert!(!called, "{want}: refused before any stage");
    }
    // An image-only engine cannot animate, and says so.
    let err = engine()
        .animate(&clip_request(&["a cat"], &[1], 1.0), &mut no_observer())
        .unwrap_err();
    assert!(err.to_string().contains("no motion adapter"), "{err}");
    Ok(())
}

#[test]
fn an_adapter_that_does_not_fit_the_base_is_refused_with_the_reason() -> Result<()> {
    let dir = PresetRegistry::default_models_dir();
    let anims = AnimationRegistry::load(&dir)?;
    let anim = anims.get("tiny-motion")?;
    let reg = PresetRegistry::load(&dir)?;
    // The tiny SD 2.x model has one layer per block; the adapter was made for two.
    let tiny = reg.get("tiny")?;
    let files = ModelFiles::locate(anim, &dir, None)?;
    let mut e = Engine::load(
        tiny,
        &ModelFiles::locate(tiny, &dir, None)?,
        &EngineOptions::default(),
    )?;
    let err = e
        .attach_motion(anim.motion_spec(&files)?, files.path(&anim.weights)?)
        .unwrap_err();
    assert!(err.to_string().contains("motion layers per level"), "{err}");
    // As a preset's base, an SD 2.x model is refused before loading anything.
    let err = Engine::load_animation(
        anim,
        tiny,
        &ModelFiles::locate(tiny, &dir, None)?,
        &files,
        &EngineOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("need an SD 1.5 base"), "{err}");
    // Channels that differ from the base's are named.
    let mut spec = anim.motion_spec(&files)?;
    spec.block_out_channels = vec![64, 64];
    let err = animator_base()?.attach_random_motion(spec).unwrap_err();
    assert!(err.to_string().contains("[64, 64] channels"), "{err}");
    Ok(())
}

fn animator_base() -> Result<Engine> {
    let dir = PresetRegistry::default_models_dir();
    let reg = PresetRegistry::load(&dir)?;
    let base = reg.get("tiny-sd15")?;
    Ok(Engine::load(
        base,
        &ModelFiles::locate(base, &dir, None)?,
        &EngineOptions::default(),
    )?)
}
