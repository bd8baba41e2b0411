//! Build script: compiles `kernels/*.cu` to PTX with nvcc, and only when the `cuda` feature is on.
//!
//! A CPU build (the default, and what CI tests) needs no CUDA toolkit at all, so without the
//! feature this script does nothing. With it, each `kernels/NAME.cu` becomes `$OUT_DIR/NAME.ptx`,
//! which `src/kernels/cuda.rs` embeds with `include_str!` and loads through candle's device at
//! run time (the driver JIT-compiles the PTX for the GPU it finds).
//!
//! Environment:
//! - `NVCC`: the compiler to use; else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`.
//! - `CUDA_COMPUTE_CAP`: the virtual architecture, e.g. `90` (H100/H200, the default) or `90a`.
//!   PTX for `compute_90` runs on 9.0 and newer GPUs; PTX built by an nvcc newer than the host's
//!   driver does NOT load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION), hence the pinned nvcc 13.0.
//! - `NVCC_CCBIN`: host compiler for nvcc's preprocessing step, if the default one is not wanted.
//!
//! `scripts/cuda-env.sh` installs a matching nvcc from NVIDIA's PyPI wheels and sets all of this.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "kernels";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Cargo sets this for `--features cuda`; a feature change re-runs the script anyway.
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    // The directory itself, so that adding a new .cu file re-runs the script.
    println!("cargo:rerun-if-changed={KERNEL_DIR}");

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let nvcc = find_nvcc();
    let arch = compute_arch();

    let sources = cuda_sources(Path::new(KERNEL_DIR));
    if sources.is_empty() {
        panic!("feature `cuda` is on but {KERNEL_DIR}/ holds no .cu file");
    }
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_else(|| panic!("kernel file name is not UTF-8: {}", src.display()));
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg("-O3")
            .arg(format!("-arch=compute_{arch}"))
            .arg("-std=c++17")
            .arg(&src)
            .arg("-o")
            .arg(&ptx);
        if let Ok(ccbin) = env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let output = cmd.output().unwrap_or_else(|e| {
            panic!(
                "could not run {} ({e}).\n{}",
                nvcc.display(),
                HOW_TO_GET_NVCC
            )
        });
        if !output.status.success() {
            panic!(
                "nvcc failed on {} ({}):\n{}\n{}",
                src.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

const HOW_TO_GET_NVCC: &str = "The `cuda` feature compiles kernels/*.cu with nvcc (CUDA 13.0). \
Get a pinned one from NVIDIA's PyPI wheels with `source scripts/cuda-env.sh` (or run \
`scripts/cuda-env.sh check`), or point NVCC / CUDA_HOME at a CUDA 13.0 toolkit.";

/// `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then the first `nvcc` on `PATH`.
fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.is_file() {
            return nvcc;
        }
        println!(
            "cargo:warning=CUDA_HOME={} has no bin/nvcc; looking on PATH",
            Path::new(&home).display()
        );
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    panic!("feature `cuda` is on but nvcc was not found.\n{HOW_TO_GET_NVCC}");
}

/// The `NN` of `compute_NN`: digits with an optional `a`/`f` suffix (e.g. `90`, `90a`).
/// Defaults to 90 (H100/H200), never to a probe of the build machine: builds here have no GPU.
fn compute_arch() -> String {
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap
        .trim()
        .trim_start_matches("sm_")
        .trim_start_matches("compute_");
    let digits = cap.trim_end_matches(['a', 'f']);
    let valid = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && cap.len() <= digits.len() + 1;
    if !valid {
        panic!("CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 90 or 90a");
    }
    cap.to_string()
}

/// The `.cu` files directly under `dir`, sorted so the build is deterministic.
fn cuda_sources(dir: &Path) -> Vec<PathBuf> {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let mut sources: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    sources
}
