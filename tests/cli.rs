//! The `popcon-worker` command line as a user runs it: `generate` reproducibility and batch
//! equality on the files it writes, precise messages and exit code 2 for bad arguments, and
//! the missing-weights message.

use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_popcon-worker"));
    c.env(
        "POPCON_MODELS_DIR",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
    );
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

fn generate(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["generate", "--prompt", "a red fox", "--out"];
    let out = out.to_str().expect("utf-8 temp path");
    args.push(out);
    if !extra.contains(&"--model") {
        args.extend_from_slice(&["--model", "tiny"]);
    }
    if !extra.contains(&"--size") {
        args.extend_from_slice(&["--size", "64x64"]);
    }
    args.extend_from_slice(extra);
    run(&args)
}

fn read(p: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(p.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.as_ref().display()))
}

#[test]
fn same_seed_writes_identical_pngs_and_a_batch_equals_single_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, batch) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("batch"),
    );
    let out = generate(&a, &["--seed", "10"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for stage in ["text_encode", "denoise", "vae_decode", "total"] {
        assert!(stdout.contains(stage), "timings list {stage}: {stdout}");
    }
    assert!(generate(&b, &["--seed", "10"]).status.success());
    assert_eq!(read(a.join("10.png")), read(b.join("10.png")));
    assert!(generate(&b, &["--seed", "11"]).status.success());
    assert_ne!(read(a.join("10.png")), read(b.join("11.png")));

    let out = generate(&batch, &["--seed", "10", "--batch", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for seed in 10..14 {
        let single = tmp.path().join(format!("single{seed}"));
        assert!(
            generate(&single, &["--seed", &seed.to_string()])
                .status
                .success()
        );
        assert_eq!(
            read(batch.join(format!("{seed}.png"))),
            read(single.join(format!("{seed}.png"))),
            "batch image with seed {seed} equals its single run"
        );
    }
}

#[test]
fn img2img_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/init.png");
    let out = generate(
        tmp.path(),
        &[
            "--seed",
            "1",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let img = image::open(tmp.path().join("1.png")).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
}

#[test]
fn bad_arguments_get_one_clear_message_and_exit_code_2() {
    let tmp = tempfile::tempdir().unwrap();
    let not_image = tmp.path().join("notes.txt");
    std::fs::write(&not_image, "hello").unwrap();
    let init = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/init.png");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--seed".into(),
                "1".into(),
                "--size".into(),
                "100x64".into(),
            ],
            "multiples of 8",
        ),
        (
            vec!["--seed".into(), "1".into(), "--size".into(), "big".into()],
            "WIDTHxHEIGHT",
        ),
        (
            vec![
                "--seed".into(),
                "1".into(),
                "--init-image".into(),
                init.display().to_string(),
                "--strength".into(),
                "1.5".into(),
            ],
            "--strength 1.5",
        ),
        (
            vec![
                "--seed".into(),
                "1".into(),
                "--init-image".into(),
                not_image.display().to_string(),
            ],
            "not an image",
        ),
        (
            vec![
                "--seed".into(),
                "1".into(),
                "--init-image".into(),
                "/nonexistent/x.png".into(),
            ],
            "cannot read",
        ),
        (
            vec!["--seed".into(), "1".into(), "--model".into(), "sd99".into()],
            "unknown model `sd99`",
        ),
        (
            vec![
                "--seed".into(),
                "1".into(),
                "--strength".into(),
                "0.5".into(),
            ],
            "--init-image",
        ),
        (vec!["--seed".into(), "x".into()], "invalid value"),
    ];
    for (extra, want) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = generate(&tmp.path().join("o"), &extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{extra:?}: `{stderr}` should say {want}"
        );
        assert!(
            !tmp.path().join("o").exists(),
            "nothing written for {extra:?}"
        );
    }
}

#[test]
fn a_hub_model_without_weights_names_the_files_and_the_fetch_command() {
    let hf = tempfile::tempdir().unwrap();
    let out = bin()
        .env("HF_HOME", hf.path())
        .args([
            "generate", "--model", "sd-turbo", "--prompt", "x", "--seed", "1", "--out",
        ])
        .arg(hf.path().join("o"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stabilityai/sd-turbo@"), "{stderr}");
    assert!(
        stderr.contains("unet/diffusion_pytorch_model.fp16.safetensors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("popcon-worker models fetch sd-turbo"),
        "{stderr}"
    );
}

#[test]
fn models_list_shows_presets_and_what_is_present() {
    let hf = tempfile::tempdir().unwrap();
    let out = bin()
        .env("HF_HOME", hf.path())
        .args(["models", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} listed: {stdout}"))
            .to_string()
    };
    assert!(line("tiny ").contains("present"));
    assert!(line("sd-turbo").contains("missing"));
    assert!(line("sdxl-turbo").contains("sdxl"));
    assert!(line("sd15").contains("missing"));
}

#[test]
fn a_bad_database_url_is_reported_without_its_password() {
    // Passwords with a raw `@`: a split at `@` would print `ss@…`; the messages come from our
    // checks and from sqlx's URL parser, and neither may carry the secret.
    for url in [
        "postgres://u:p@ss@127.0.0.1:1/db?sslmode=bogus",
        "postgres://u:p@ss@127.0.0.1:abc/db",
        "postgres://u:p@ss@[::1/db",
    ] {
        let out = run(&["users", "add", "x", "--database-url", url]);
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("bad database URL"), "{url}: {err}");
        assert!(
            !err.contains("p@ss") && !err.contains("ss@"),
            "{url}: {err}"
        );
    }
}
