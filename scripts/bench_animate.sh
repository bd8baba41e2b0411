#!/usr/bin/env bash
# Animation (approve's AnimateDiff clip) against diffusers, on this machine's CPU, in one run.
#
#   scripts/bench_animate.sh                 every case below
#   scripts/bench_animate.sh tiny-8f         only the named cases
#
# `tiny-*` cases time our tiny preset alone (the CI-sized model; diffusers has no counterpart
# to compare at that size worth the startup). `sd15-*` cases run SD 1.5 + the SD 1.5 motion
# adapter in their real shapes with random weights on both sides (`animate --random-weights`
# here; scripts/bench_animate_diffusers.py there: AnimateDiffVideoToVideoPipeline), f32 on the
# CPU, same size, frames, steps and strength, each in its own process so each peak RSS is its
# own. The table comes last: seconds per clip (text, VAE encode, denoise, decode, to pixels;
# not model building or file writing), peak RSS, the ratios ours / diffusers, and the stages.
#
# The diffusers side uses the venv of scripts/bench_engine.sh (BENCH_VENV, default .venv-bench).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${BENCH_VENV:-.venv-bench}"
OUT="${BENCH_OUT:-target/bench-animate}"
# name  animation  size  frames  steps  strength  diffusers?
CASES=(
    "tiny-8f        tiny-motion  64  8  4 0.75 no"
    "sd15-256-16f   lightning   256 16  4 0.25 yes"
    "sd15-512-16f   lightning   512 16  4 0.25 yes"
)

say() { printf 'bench-animate: %s\n' "$*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }

say "cargo build --release"
cargo build --release --quiet --bin popcon-worker
BIN=target/release/popcon-worker
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
STILL="tests/fixtures/tiny/init.png"

for spec in "${CASES[@]}"; do
    read -r name anim size frames steps strength diff <<<"$spec"
    if (($#)) && [[ " $* " != *" $name "* ]]; then continue; fi
    random=()
    [[ "$anim" == tiny-motion ]] || random=(--random-weights)
    say "$name: popcon-worker"
    load="$(load1)"
    log="$OUT/$name.ours.txt"
    "$BIN" animate --animation "$anim" "${random[@]}" --image "$STILL" \
        --prompt "a red fox, happy expression, sticker" --seed 1 --size "${size}x${size}" \
        --frames "$frames" --steps "$steps" --strength "$strength" --out "$OUT/$name.clips" >"$log"
    python3 - "$log" "$name" "$load" >>"$RESULTS" <<'PY'
import json, re, sys
log, name, load = sys.argv[1:]
ms, steps = {}, None
for line in open(log):
    parts = line.split()
    if len(parts) == 2:
        try:
            ms[parts[0]] = float(parts[1])
        except ValueError:
            pass
clip = sum(ms[k] for k in ("text_encode", "vae_encode", "denoise", "vae_decode", "to_rgba")) / 1e3
print(json.dumps({"case": name, "side": "ours", "load": float(load), "clip_s": clip,
                  "peak_rss_mib": ms["peak_rss_mib"], "text_s": ms["text_encode"] / 1e3,
                  "denoise_s": ms["denoise"] / 1e3, "vae_decode_s": ms["vae_decode"] / 1e3}))
PY
    [[ "$diff" == yes ]] || continue
    say "$name: diffusers"
    load="$(load1)"
    "$VENV/bin/python" scripts/bench_animate_diffusers.py --size "$size" --frames "$frames" \
        --steps "$steps" --strength "$strength" --image "$STILL" >"$OUT/$name.diffusers.json"
    python3 - "$OUT/$name.diffusers.json" "$name" "$load" >>"$RESULTS" <<'PY'
import json, sys
path, name, load = sys.argv[1:]
d = json.loads(open(path).read().strip().splitlines()[-1])
print(json.dumps({"case": name, "side": "diffusers", "load": float(load), "clip_s": d["clip_s"],
                  "peak_rss_mib": d["peak_rss_mib"], "text_s": d["text_s"],
                  "denoise_s": d["unet_step_s"] * d["steps_run"], "vae_decode_s": d["vae_decode_s"]}))
PY
done

python3 - "$RESULTS" <<'PY'
import json, platform, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
by = {(r["case"], r["side"]): r for r in rows}
print()
print(f"CPU f32, one clip; sd15 cases: random weights in the real shapes; {platform.machine()}")
hdr = (f"{'case':<15}{'ours s':>9}{'diff s':>9}{'time':>6}{'ours MiB':>10}{'diff MiB':>10}{'mem':>6}"
       f"  {'denoise o/d s':>17}  {'vae dec o/d s':>15}  {'load o/d':>9}")
print(hdr)
print("-" * len(hdr))
for c in cases:
    o, d = by.get((c, "ours")), by.get((c, "diffusers"))
    if not o:
        continue
    if not d:
        print(f"{c:<15}{o['clip_s']:>9.2f}{'-':>9}{'-':>6}{o['peak_rss_mib']:>10.0f}{'-':>10}{'-':>6}"
              f"  {o['denoise_s']:>17.2f}  {o['vae_decode_s']:>15.2f}  {o['load']:.1f}")
        continue
    print(f"{c:<15}{o['clip_s']:>9.2f}{d['clip_s']:>9.2f}{o['clip_s'] / d['clip_s']:>6.2f}"
          f"{o['peak_rss_mib']:>10.0f}{d['peak_rss_mib']:>10.0f}{o['peak_rss_mib'] / d['peak_rss_mib']:>6.2f}"
          f"  {o['denoise_s']:>8.2f}/{d['denoise_s']:<8.2f}  {o['vae_decode_s']:>7.2f}/{d['vae_decode_s']:<7.2f}"
          f"  {o['load']:.1f}/{d['load']:.1f}")
print("time, mem: ours / diffusers (below 1.0: ours is faster / smaller)")
PY
