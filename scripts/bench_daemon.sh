#!/usr/bin/env bash
# Issue 3's benchmark: popcon-worker (no-op engine) vs a Celery worker (acks_late, 2 processes,
# prefetch 1) draining no-op work from ONE redis-server, plus the engine's busy fraction with
# the tiny model. Prints one table with the ratios.
#
#   bash scripts/bench_daemon.sh
#
# Env: BENCH_JOBS (2000), BENCH_LAT_JOBS (500), BENCH_RATE (50 per s), BENCH_BUSY_JOBS (12),
# REDIS_SERVER (redis-server), CARGO_TARGET_DIR (as cargo). Creates .venv-bench/ (celery[redis]).
set -euo pipefail
cd "$(dirname "$0")/.."

export BENCH_JOBS="${BENCH_JOBS:-2000}" BENCH_LAT_JOBS="${BENCH_LAT_JOBS:-500}"
export BENCH_RATE="${BENCH_RATE:-50}" BENCH_BUSY_JOBS="${BENCH_BUSY_JOBS:-12}"

if [ ! -x .venv-bench/bin/celery ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q 'celery[redis]'
fi

work="$(mktemp -d)"
redis_pid=""
cleanup() { [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"${REDIS_SERVER:-redis-server}" --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" --daemonize no &
redis_pid=$!
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export BENCH_REDIS_URL="redis://127.0.0.1:$port/0"

# Build first, so compiling does not overlap the measurements.
cargo bench --features bench-engine --bench daemon --no-run

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
( while sleep 5; do cut -d' ' -f1 /proc/loadavg; done ) > "$work/load" &
sampler=$!

echo "== celery (baseline) =="
CELERY_BENCH_LOG="$work/celery.log" .venv-bench/bin/python scripts/bench_celery.py \
  --jobs "$BENCH_JOBS" --lat-jobs "$BENCH_LAT_JOBS" --rate "$BENCH_RATE" --out "$work/celery.txt"
echo "== popcon-worker =="
BENCH_OUT="$work/popcon.txt" cargo bench --features bench-engine --bench daemon

kill "$sampler" 2>/dev/null || true
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

.venv-bench/bin/python - "$work/popcon.txt" "$work/celery.txt" "$work/load" "$load_before" "$load_after" <<'PY'
import sys
vals = {}
for path in sys.argv[1:3]:
    for line in open(path):
        k, v = line.split()
        vals[k] = float(v)
samples = [float(x) for x in open(sys.argv[3]).read().split()] or [float("nan")]
v = vals.get
rows = [
    ("jobs/s, generate_set of 1 emoji, saturated queue (%d jobs)" % v("popcon_jobs"), v("popcon_jobs_per_s"), v("celery_jobs_per_s"), "higher is better"),
    ("jobs/s, approve (claim, gates, one write, ack) (%d jobs)" % v("popcon_jobs"), v("popcon_approve_per_s"), v("celery_jobs_per_s"), "higher is better"),
    ("enqueue->claim p50, ms (%d jobs at steady rate)" % v("popcon_lat_jobs"), v("popcon_p50_ms"), v("celery_p50_ms"), "lower is better"),
    ("enqueue->claim p99, ms", v("popcon_p99_ms"), v("celery_p99_ms"), "lower is better"),
]
print()
print("| metric | popcon-worker | celery | popcon / celery | |")
print("|---|---:|---:|---:|---|")
for name, p, c, note in rows:
    print(f"| {name} | {p:.2f} | {c:.2f} | {p / c:.2f}x | {note} |")
print(f"| engine busy fraction, tiny model on CPU ({int(v('busy_sets'))} sets, {int(v('busy_emoji'))} emoji) "
      f"| {100 * v('busy_fraction'):.1f} % ({v('busy_s'):.1f} s of {v('busy_wall_s'):.1f} s) | - | - | aim >= 97 % |")
print()
print(f"load average: before {sys.argv[4]}, after {sys.argv[5]}; 1-min samples during the run: "
      f"min {min(samples):.2f}, mean {sum(samples) / len(samples):.2f}, max {max(samples):.2f}")
PY
