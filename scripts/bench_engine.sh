#!/usr/bin/env bash
# The engine against diffusers at production size, on this machine's CPU, in one invocation.
#
#   scripts/bench_engine.sh                 every case below
#   scripts/bench_engine.sh sd-turbo-b1     only the named cases
#
# Both sides run the production architectures in their real shapes with random weights
# (`generate --random-weights` here: `ModelSpecs::reference`; scripts/bench_diffusers.py
# there: the same Hub configs), f32 on the CPU, same size, steps, batch and guidance. Each run
# is its own process, so each peak RSS is that case's own; ours and diffusers' alternate per
# case so that load drifts hit both. The table comes last: time per image (the pipeline call:
# text, denoise, decode, to pixels — not model building), peak RSS, the ratios ours /
# diffusers (below 1.0: we are faster or smaller), the per-stage times (text encoders, one
# UNet step, the VAE decode) and the 1-minute load average before each run.
#
# The diffusers side gets its own venv with pinned versions (BENCH_VENV, default
# .venv-bench; ~6 GB, torch from PyPI). Our binary is built with `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.15.0
DIFFUSERS_VERSION=0.42.1
TRANSFORMERS_VERSION=5.24.0
VENV="${BENCH_VENV:-.venv-bench}"
OUT="${BENCH_OUT:-target/bench-engine}"

# name  preset  arch  steps  batch  guidance  diffusers-scheduler
CASES=(
    "sd-turbo-b1   sd-turbo   sd2  1 1 0   euler_ancestral"
    "sd-turbo-b4   sd-turbo   sd2  1 4 0   euler_ancestral"
    "sdxl-turbo-b1 sdxl-turbo sdxl 4 1 0   euler_ancestral"
    "sd15-cfg-b1   sd15       sd15 4 1 7.5 ddim"
)
SIZE=512
PROMPT="a friendly cartoon fox, head-to-toe shot of the subject, feet visible (not shoes)"

say() { printf 'bench-engine: %s\n' "$*" >&2; }

want="torch==$TORCH_VERSION diffusers==$DIFFUSERS_VERSION transformers==$TRANSFORMERS_VERSION"
if [[ ! -f "$VENV/.bench-stamp" || "$(cat "$VENV/.bench-stamp")" != "$want" ]]; then
    say "installing $want into $VENV"
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/pip" install -q --disable-pip-version-check $want safetensors numpy pillow
    printf '%s' "$want" >"$VENV/.bench-stamp"
fi

say "cargo build --release"
cargo build --release --quiet --bin popcon-worker
BIN=target/release/popcon-worker
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"

load1() { cut -d' ' -f1 /proc/loadavg; }

for spec in "${CASES[@]}"; do
    read -r name preset arch steps batch guidance sched <<<"$spec"
    if (($#)) && [[ " $* " != *" $name "* ]]; then continue; fi

    say "$name: popcon-worker"
    load="$(load1)"
    log="$OUT/$name.ours.txt"
    "$BIN" generate --model "$preset" --random-weights --prompt "$PROMPT" --seed 1 \
        --size "${SIZE}x${SIZE}" --steps "$steps" --batch "$batch" --guidance "$guidance" \
        --out "$OUT/$name.images" >"$log"
    python3 - "$log" "$name" "$steps" "$batch" "$load" >>"$RESULTS" <<'EOF'
import json, sys
log, name, steps, batch, load = sys.argv[1:]
ms = {}
for line in open(log):
    parts = line.split()
    if len(parts) == 2:
        try:
            ms[parts[0]] = float(parts[1])
        except ValueError:
            pass
steps, batch = int(steps), int(batch)
pipeline = sum(ms[k] for k in ("text_encode", "vae_encode", "denoise", "vae_decode", "to_rgba")) / 1e3
print(json.dumps({
    "case": name, "side": "ours", "load": float(load),
    "per_image_s": pipeline / batch, "peak_rss_mib": ms["peak_rss_mib"],
    "text_s": ms["text_encode"] / 1e3, "unet_step_s": ms["denoise"] / 1e3 / steps,
    "vae_decode_s": ms["vae_decode"] / 1e3,
}))
EOF

    say "$name: diffusers"
    load="$(load1)"
    "$VENV/bin/python" scripts/bench_diffusers.py --arch "$arch" --size "$SIZE" --steps "$steps" \
        --batch "$batch" --guidance "$guidance" --scheduler "$sched" >"$OUT/$name.diffusers.json"
    python3 - "$OUT/$name.diffusers.json" "$name" "$load" >>"$RESULTS" <<'EOF'
import json, sys
path, name, load = sys.argv[1:]
d = json.loads(open(path).read().strip().splitlines()[-1])
print(json.dumps({
    "case": name, "side": "diffusers", "load": float(load),
    "per_image_s": d["per_image_s"], "peak_rss_mib": d["peak_rss_mib"],
    "text_s": d["text_s"], "unet_step_s": d["unet_step_s"], "vae_decode_s": d["vae_decode_s"],
}))
EOF
done

python3 - "$RESULTS" <<'EOF'
import json, platform, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
by = {(r["case"], r["side"]): r for r in rows}
print()
print(f"CPU f32, random weights in the real shapes, 512x512; {platform.processor() or platform.machine()}")
hdr = (f"{'case':<14}{'ours s/img':>11}{'diff s/img':>11}{'time':>7}{'ours MiB':>10}{'diff MiB':>10}"
       f"{'mem':>7}  {'text o/d':>13}  {'unet step o/d':>15}  {'vae dec o/d':>13}  {'load o/d':>9}")
print(hdr)
print("-" * len(hdr))
for c in cases:
    o, d = by.get((c, "ours")), by.get((c, "diffusers"))
    if not o or not d:
        continue
    pair = lambda k: f"{o[k]:.2f}/{d[k]:.2f}"
    print(f"{c:<14}{o['per_image_s']:>11.2f}{d['per_image_s']:>11.2f}{o['per_image_s'] / d['per_image_s']:>7.2f}"
          f"{o['peak_rss_mib']:>10.0f}{d['peak_rss_mib']:>10.0f}{o['peak_rss_mib'] / d['peak_rss_mib']:>7.2f}"
          f"  {pair('text_s'):>13}  {pair('unet_step_s'):>15}  {pair('vae_decode_s'):>13}"
          f"  {o['load']:.1f}/{d['load']:.1f}")
print("time, mem: ours / diffusers (below 1.0: ours is faster / smaller)")
EOF
