"""The Celery baseline for `benches/daemon.rs` (issue 3): the system popcon-worker replaces.

A Celery app with a no-op task, `acks_late`, 2 prefork processes, prefetch 1, broker = the
same redis-server the popcon bench uses. Two measurements, mirroring the Rust bench:

- throughput: N tasks pre-enqueued, then the worker starts and drains them;
  jobs/s = (N - 1) / (last task start - first task start), from the tasks' own timestamps.
- latency: the worker idle, M tasks enqueued one at a time at R per second; latency =
  time.time() just before `apply_async` -> time.time() at the start of the task body.

Each task records its start time in a Redis hash (one HSET: its only work).

    python scripts/bench_celery.py --redis redis://127.0.0.1:6379/0 --out results.txt

`scripts/bench_daemon.sh` runs it next to the Rust bench and prints the ratios.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

import redis
from celery import Celery

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "celery-bench"
HASH = "celery-bench:start"

app = Celery("bench_celery", broker=REDIS_URL)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_conn = None


def _redis():
    global _conn
    if _conn is None:  # one connection per worker process (after fork)
        _conn = redis.Redis.from_url(REDIS_URL)
    return _conn


@app.task(name="noop")
def noop(key):
    _redis().hset(HASH, key, repr(time.time()))


def start_worker():
    env = dict(os.environ, BENCH_REDIS_URL=REDIS_URL)
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        sys.executable, "-m", "celery", "-A", "bench_celery", "worker",
        "-Q", QUEUE, "-P", "prefork", "--concurrency", "2", "--prefetch-multiplier", "1",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "--loglevel", "WARNING", "-n", f"bench-{os.getpid()}@%h",
    ]
    # Its log (the root-user warning, errors) goes to $CELERY_BENCH_LOG, else nowhere.
    log = open(os.environ.get("CELERY_BENCH_LOG", os.devnull), "a")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def stop_worker(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_count(r, n, timeout=900):
    deadline = time.time() + timeout
    while r.hlen(HASH) < n:
        if time.time() > deadline:
            raise SystemExit(f"celery: only {r.hlen(HASH)} of {n} tasks ran")
        time.sleep(0.02)


def reset(r):
    r.delete(HASH, QUEUE)


def throughput(r, n):
    reset(r)
    for i in range(n):
        noop.apply_async(args=[f"tp-{i}"])
    proc = start_worker()
    try:
        wait_count(r, n)
    finally:
        stop_worker(proc)
    starts = sorted(float(v) for v in r.hgetall(HASH).values())
    span = starts[-1] - starts[0]
    rate = (n - 1) / span
    print(f"celery throughput: {n} tasks, {rate:.1f} tasks/s (first->last task start {span:.2f}s)")
    return rate


def latency(r, m, rate):
    reset(r)
    proc = start_worker()
    try:
        noop.apply_async(args=["warmup"])  # the worker is up and idle before measuring
        wait_count(r, 1, timeout=60)
        time.sleep(0.3)
        r.delete(HASH)
        enq = {}
        period = 1.0 / rate
        next_at = time.perf_counter()
        for i in range(m):
            now = time.perf_counter()
            if now < next_at:
                time.sleep(next_at - now)
            next_at += period
            key = f"lat-{i}"
            enq[key] = time.time()
            noop.apply_async(args=[key])
        wait_count(r, m)
    finally:
        stop_worker(proc)
    got = {k.decode(): float(v) for k, v in r.hgetall(HASH).items()}
    lat = sorted((got[k] - t) * 1e3 for k, t in enq.items())

    def pct(p):
        return lat[min(len(lat) - 1, round(p / 100 * (len(lat) - 1)))]

    p50, p99 = pct(50), pct(99)
    print(f"celery latency: {m} tasks at {rate}/s, enqueue->task start p50 {p50:.2f} ms, "
          f"p99 {p99:.2f} ms, max {lat[-1]:.2f} ms")
    return p50, p99


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--lat-jobs", type=int, default=500)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--out")
    a = ap.parse_args()
    r = redis.Redis.from_url(REDIS_URL)
    rate = throughput(r, a.jobs)
    p50, p99 = latency(r, a.lat_jobs, a.rate)
    reset(r)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"celery_jobs_per_s {rate:.3f}\ncelery_p50_ms {p50:.3f}\n"
                    f"celery_p99_ms {p99:.3f}\ncelery_jobs {a.jobs}\ncelery_lat_jobs {a.lat_jobs}\n")


if __name__ == "__main__":
    main()
