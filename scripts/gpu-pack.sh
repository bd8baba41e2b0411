#!/usr/bin/env bash
# Bundles the CUDA release executables built by `scripts/cuda-env.sh link` into gpu-dist/, the
# folder carried to a GPU host (no Rust, no network there) and run by scripts/gpu-check.sh.
#
#   scripts/gpu-pack.sh              (after scripts/cuda-env.sh link)
#
# What goes in, within GPU_DIST_BUDGET_MB (default 56: the whole carried working tree must
# stay under 64 MiB):
#   bin/NAME[.xz]     each executable from target/cuda/release/gpu-artifacts.tsv, debug info
#                     stripped, xz-compressed when that is needed to fit (candle's embedded
#                     PTX is text and compresses about tenfold)
#   lib/              libcudart.so.13 (small). cuBLAS(Lt), cuRAND and NVRTC are 50-540 MB each
#                     and do not fit: the GPU host must have CUDA 13 copies of them (the H200
#                     image does, in its PyTorch venv); gpu-check.sh finds them
#   MANIFEST.tsv      name, size, sha256 of the uncompressed file, source path
#   BUILD.txt         git revision, date, nvcc version, CUDA_COMPUTE_CAP
#
# Environment: CUDA_TARGET_DIR (default target/cuda), GPU_DIST (default gpu-dist),
# GPU_DIST_BUDGET_MB (default 56), CUDA_VENV (default .venv-cuda).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CUDA_TARGET_DIR:-$repo/target/cuda}"
dist="${GPU_DIST:-$repo/gpu-dist}"
budget_mb="${GPU_DIST_BUDGET_MB:-56}"
venv="${CUDA_VENV:-$repo/.venv-cuda}"
list="$target/release/gpu-artifacts.tsv"

say() { printf 'gpu-pack: %s\n' "$*" >&2; }
die() {
    printf 'gpu-pack: ERROR: %s\n' "$*" >&2
    exit 1
}

[[ -s "$list" ]] || die "no $list: run scripts/cuda-env.sh link first"
command -v xz >/dev/null || die "xz is needed (apt-get install xz-utils)"

rm -rf "$dist"
mkdir -p "$dist/bin" "$dist/lib"
: >"$dist/MANIFEST.tsv"

while IFS=$'\t' read -r name path; do
    [[ -x "$path" ]] || die "$path (from $list) is missing: rebuild with scripts/cuda-env.sh link"
    cp "$path" "$dist/bin/$name"
    # Debug info only: symbols stay, so a panic's backtrace still names functions.
    strip --strip-debug "$dist/bin/$name"
    printf '%s\t%s\t%s\t%s\n' "$name" "$(stat -c %s "$dist/bin/$name")" \
        "$(sha256sum "$dist/bin/$name" | cut -d' ' -f1)" "$path" >>"$dist/MANIFEST.tsv"
done <"$list"

# The wheels' CUDA tree, wherever the venv's Python version put it.
cuda_home=""
for d in "$venv"/lib/python3*/site-packages/nvidia/cu13; do
    [[ -d "$d" ]] && cuda_home="$d"
done
cudart="$cuda_home/lib/libcudart.so.13"
if [[ -n "$cuda_home" && -f "$cudart" ]]; then
    cp "$cudart" "$dist/lib/"
else
    say "libcudart.so.13 not found under $venv; the GPU host must provide it"
fi

total_kb() { du -sk "$dist" | cut -f1; }
budget_kb=$((budget_mb * 1024))
if ((budget_kb < $(total_kb))); then
    say "$(($(total_kb) / 1024)) MiB is over the ${budget_mb} MiB budget: compressing executables with xz"
    for f in "$dist"/bin/*; do
        xz -T0 -6 "$f"
    done
fi
size_mb=$(($(total_kb) / 1024))
((size_mb * 1024 <= budget_kb)) ||
    die "gpu-dist is ${size_mb} MiB even compressed (budget ${budget_mb} MiB): carry fewer executables"

{
    echo "git: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo none)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "nvcc: $("$cuda_home/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
    echo "CUDA_COMPUTE_CAP: ${CUDA_COMPUTE_CAP:-90}"
} >"$dist/BUILD.txt"

say "gpu-dist ready: ${size_mb} MiB in $dist"
ls -l "$dist/bin" "$dist/lib" >&2
