#!/usr/bin/env bash
# The one prepared GPU check, for a GPU host with the NVIDIA driver, CUDA 13 libraries, no Rust
# toolchain and no network. It runs the prebuilt executables that scripts/gpu-pack.sh put in
# gpu-dist/ (built here, without a GPU, by `scripts/cuda-env.sh link`).
#
#   here:      scripts/cuda-env.sh pack        # link + gpu-pack: gpu-dist/ (git-ignored)
#   GPU host:  bash scripts/gpu-check.sh       # from the repo root, gpu-dist/ beside scripts/
#   device tool: run(command="bash scripts/gpu-check.sh", carry=["gpu-dist"], timeout_s=420)
#
# Steps, each with its own time limit, a log, and a row in the table printed last:
#   host       nvidia-smi: GPU, driver, memory
#   libs       every executable's shared libraries resolve (ldd), from LD_LIBRARY_PATH built
#              below; a missing CUDA library fails here, clearly, not later
#   tests      each test executable with `--ignored` and the filters in GPU_TEST_FILTERS
#              (default "cuda": the GPU-only tests live in `cuda` modules)
#   bench      the engine bench's CUDA groups (real-size sd-turbo / sdxl-turbo, images/s)
#   generate   `popcon-worker generate --device cuda` with the tiny model, batch 4
#   animate    `popcon-worker animate --device cuda`: a Lightning clip in the real shapes
#              (random weights, 512², 16 frames), then the tiny animation preset
#
# Environment: GPU_DIST (default gpu-dist), GPU_TEST_FILTERS (default "cuda"), STEP_TIMEOUT
# (seconds per step, default 240), CUDA_LIBS (extra dirs holding CUDA 13 libraries, ':'-separated),
# OUT (where logs and summary.txt go; default a temp dir). The exit status is non-zero if any
# step failed.
set -uo pipefail # not -e: a failed step is recorded and the others still run

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dist="${GPU_DIST:-$repo/gpu-dist}"
filters="${GPU_TEST_FILTERS:-cuda}"
step_timeout="${STEP_TIMEOUT:-240}"
work="$(mktemp -d "${TMPDIR:-/tmp}/popcon-gpu.XXXXXX")"
logs="${OUT:-$work/logs}"
mkdir -p "$logs" "$work/bin"
# The unpacked executables are large; the logs stay (under $OUT, or $work/logs).
trap 'rm -rf "$work/bin"' EXIT

rows=()
failed=0
say() { printf '\n=== %s\n' "$*"; }
# record STEP STATUS SECONDS NOTE
record() {
    rows+=("$(printf '%-9s %-6s %7s  %s' "$1" "$2" "$3" "$4")")
    [[ "$2" == FAIL ]] && failed=1
    return 0
}

# --- unpack -----------------------------------------------------------------------------------

if [[ ! -d "$dist/bin" ]]; then
    echo "gpu-check: no $dist/bin: build and pack first (scripts/cuda-env.sh pack), carry gpu-dist" >&2
    exit 2
fi
[[ -f "$dist/BUILD.txt" ]] && cat "$dist/BUILD.txt"
for f in "$dist"/bin/*; do
    name="$(basename "$f")"
    case "$name" in
    *.xz)
        if command -v xz >/dev/null; then
            xz -dc "$f" >"$work/bin/${name%.xz}"
        else # python3's lzma is on any host that has python3
            python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
                "$f" "$work/bin/${name%.xz}"
        fi
        ;;
    *) cp "$f" "$work/bin/$name" ;;
    esac
done
chmod +x "$work"/bin/*

# --- libraries --------------------------------------------------------------------------------

# Candidate directories for the CUDA 13 user-space libraries, first match wins per library:
# what was carried, what the caller names, then the usual places on a GPU host (a CUDA
# toolkit, the driver's mount, and NVIDIA's wheels inside any Python environment).
lib_dirs=("$dist/lib")
IFS=: read -r -a extra <<<"${CUDA_LIBS:-}"
lib_dirs+=("${extra[@]}")
lib_dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64
    /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
for py in python3 /opt/*/.venv/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    while IFS= read -r d; do lib_dirs+=("$d"); done < <("$py" -c '
import glob, os, sys
for p in sys.path:
    for d in glob.glob(os.path.join(p, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(p, "nvidia", "*", "lib")):
        print(d)
' 2>/dev/null)
done
needed=(libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13)
ld_path=""
missing=()
for lib in "${needed[@]}"; do
    found=""
    for d in "${lib_dirs[@]}"; do
        if [[ -n "$d" && -e "$d/$lib" ]]; then
            found="$d"
            break
        fi
    done
    if [[ -z "$found" ]]; then
        missing+=("$lib")
    elif [[ ":$ld_path:" != *":$found:"* ]]; then
        ld_path="${ld_path:+$ld_path:}$found"
    fi
done
export LD_LIBRARY_PATH="${ld_path}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
# The build machine links against a stub libcuda (scripts/cuda-env.sh); if one was carried
# here by mistake, every CUDA call would fail with CUDA_ERROR_UNKNOWN: say so instead.
stub_driver=""
for b in "$work"/bin/*; do
    drv="$(ldd "$b" 2>/dev/null | awk '$1 == "libcuda.so.1" && $3 ~ /^\// {print $3}')"
    if [[ -n "$drv" ]] && grep -q POPCON_LIBCUDA_STUB "$drv" 2>/dev/null; then
        stub_driver="$drv"
    fi
done

# --- steps ------------------------------------------------------------------------------------

say "host: nvidia-smi"
start=$SECONDS
if nvidia-smi >"$logs/nvidia-smi.txt" 2>&1; then
    cat "$logs/nvidia-smi.txt"
    gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)"
    record host ok $((SECONDS - start)) "$gpu"
else
    cat "$logs/nvidia-smi.txt"
    record host FAIL $((SECONDS - start)) "nvidia-smi failed: no driver/GPU?"
fi

say "libs: ldd of each executable"
start=$SECONDS
unresolved="$(for b in "$work"/bin/*; do ldd "$b" 2>&1 | grep 'not found' | sed "s|^|$(basename "$b"): |"; done)"
{
    for b in "$work"/bin/*; do
        echo "--- $(basename "$b")"
        ldd "$b" 2>&1
    done
} >"$logs/ldd.txt"
if [[ -n "$stub_driver" ]]; then
    record libs FAIL $((SECONDS - start)) "libcuda.so.1 is the build stub ($stub_driver), not the driver"
elif [[ -z "$unresolved" ]]; then
    record libs ok $((SECONDS - start)) "all resolve${missing[*]:+; via the default search path: ${missing[*]}}"
else
    echo "$unresolved"
    record libs FAIL $((SECONDS - start)) "unresolved: $(echo "$unresolved" | awk '{print $2}' | sort -u | tr '\n' ' ')"
fi

say "tests: --ignored, filters: $filters"
read -r -a filter_args <<<"$filters"
: >"$logs/tests.log"
ran_tests=0
for b in "$work"/bin/unit-* "$work"/bin/test-*; do
    [[ -x "$b" ]] || continue
    name="$(basename "$b")"
    ran_tests=1
    start=$SECONDS
    log="$work/$name.log"
    echo "--- $name"
    RUST_BACKTRACE=1 timeout "$step_timeout" "$b" --ignored --nocapture --test-threads=1 \
        "${filter_args[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    { echo "--- $name (exit $rc)"; cat "$log"; } >>"$logs/tests.log"
    summary="$(grep -E '^test result:' "$log" | tail -n1 | sed 's/^test result: //; s/; finished in.*//')"
    diffs="$(grep -E 'pixels differ by 1 in total' "$log" | tail -n1 | sed 's/^.*: //')"
    timing="$(grep -E '^timing:' "$log" | tail -n1 | sed 's/^timing: //')"
    note="$name: ${summary:-no summary}${diffs:+; $diffs}${timing:+; $timing}"
    if ((rc == 0)); then
        record tests ok $((SECONDS - start)) "$note"
    elif ((rc == 124)); then
        record tests FAIL $((SECONDS - start)) "$name: timed out after ${step_timeout}s"
    else
        record tests FAIL $((SECONDS - start)) "exit $rc; $note"
    fi
done
((ran_tests)) || record tests FAIL 0 "no unit-* or test-* executable in $dist/bin"

# --- bench and generate ------------------------------------------------------------------------

# The engine bench's CUDA groups: sd-turbo (512², 1 step) and sdxl-turbo (512², 4 steps) at
# real size, random weights unless real ones are in the HF cache; images/s per batch size.
hook_bench() {
    local b="$work/bin/bench-engine"
    if [[ ! -x "$b" ]]; then
        record bench FAIL 0 "no bench-engine executable packed"
        return
    fi
    local start=$SECONDS log="$logs/bench.log"
    # criterion: `--bench` runs benchmarks, the positional filter keeps the CUDA groups only.
    timeout "$step_timeout" "$b" --bench --noplot cuda_generate 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    # One "name  thrpt: [lo mid hi]" line per case, for the table and BENCHMARKS.md.
    awk '/^[a-z0-9_-]+cuda_generate/ {name=$1} /thrpt:/ {print name, $4, $5}' "$log" \
        >"$logs/bench-thrpt.txt"
    local cases
    cases="$(awk '{printf "%s %s %s; ", $1, $2, $3}' "$logs/bench-thrpt.txt")"
    if ((rc == 0)); then
        record bench ok $((SECONDS - start)) "${cases:-no throughput lines (see bench.log)}"
    else
        record bench FAIL $((SECONDS - start)) "exit $rc; ${cases}"
    fi
}

# `popcon-worker generate` on the GPU with the tiny model (carried in models/): the CLI path end
# to end in f16, a batch of 4, per-stage timings, and the PNGs kept in $logs/generate.
hook_generate() {
    local b="$work/bin/bin-popcon-worker"
    if [[ ! -x "$b" ]]; then
        record generate FAIL 0 "no bin-popcon-worker packed"
        return
    fi
    local start=$SECONDS log="$logs/generate.log" out="$logs/generate"
    POPCON_MODELS_DIR="$repo/models" timeout "$step_timeout" "$b" generate --model tiny \
        --device cuda --prompt "a red fox, sticker" --seed 10 --batch 4 --alpha-key \
        --out "$out" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]} pngs
    pngs="$(find "$out" -name '*.png' 2>/dev/null | wc -l)"
    local total
    total="$(awk '$1 == "total" {print $2 " ms"}' "$log")"
    if ((rc == 0 && pngs == 4)); then
        record generate ok $((SECONDS - start)) "tiny on cuda, batch 4: $pngs PNGs, total ${total:-?}"
    else
        record generate FAIL $((SECONDS - start)) "exit $rc, $pngs PNGs (see generate.log)"
    fi
}

# `popcon-worker animate` on the GPU: approve's clip in its real shapes (SD 1.5 + the SD 1.5
# motion adapter, random weights, f16), Lightning's settings, 16 frames at 512², with the
# stage times and the process's peak host RSS; then the tiny preset end to end.
hook_animate() {
    local b="$work/bin/bin-popcon-worker"
    if [[ ! -x "$b" ]]; then
        record animate FAIL 0 "no bin-popcon-worker packed"
        return
    fi
    local start=$SECONDS log="$logs/animate.log" out="$logs/animate"
    POPCON_MODELS_DIR="$repo/models" timeout "$step_timeout" "$b" animate --animation lightning \
        --random-weights --device cuda --image "$repo/tests/fixtures/tiny/init.png" \
        --prompt "a red fox, happy expression, sticker" --seed 1 --alpha-key \
        --out "$out" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    POPCON_MODELS_DIR="$repo/models" timeout "$step_timeout" "$b" animate --animation tiny-motion \
        --device cuda --image "$repo/tests/fixtures/tiny/init.png" --prompt "a red fox" \
        --seed 1 --out "$out/tiny" 2>&1 | tee -a "$log"
    local rc2=${PIPESTATUS[0]}
    local denoise total
    denoise="$(awk '$1 == "denoise" {print $2 " ms"; exit}' "$log")"
    total="$(awk '$1 == "total" {print $2 " ms"; exit}' "$log")"
    if ((rc == 0 && rc2 == 0)) && [[ -f "$out/1.webp" && -f "$out/tiny/1.webp" ]]; then
        record animate ok $((SECONDS - start)) "lightning 512² x16 on cuda: denoise ${denoise:-?}, total ${total:-?}; tiny ok"
    else
        record animate FAIL $((SECONDS - start)) "exit $rc / $rc2 (see animate.log)"
    fi
}

say "bench"
hook_bench
say "generate"
hook_generate
say "animate"
hook_animate

# --- table ------------------------------------------------------------------------------------

{
    echo
    echo "=== gpu-check summary ($(date -u +%H:%M:%SZ), logs in $logs)"
    printf '%-9s %-6s %7s  %s\n' step status seconds note
    printf '%s\n' "${rows[@]}"
} | tee "$logs/summary.txt"
exit "$failed"
