"""What the shared job store adds to a job's queue time, against the replica's own in-memory queue
(issue 28's goal: the embedded default adds at most 50 ms on one replica).

    python -m benchmarks.queue_overhead                       # ~4 min on 2 cores
    python -m benchmarks.queue_overhead --brokers memory sqlite redis --jobs 100

Setup: one replica of ``tiny-wan`` on one rank, continuous batching (the default), one server per
broker: ``memory://`` (Huey's in-process storage: today's per-replica queue), the embedded SQLite
file (the default) and, where ``redis-server`` is installed, a Redis server started on a free
loopback port. Jobs are tiny (one 16x16 frame, one step, latents) so that the queue dominates:
``--jobs`` requests to ``/v1/generate`` one at a time (concurrency 1: the queue time is the
store's alone), then as many from ``--concurrency`` clients at once (jobs wait for each other too).
Figures: mean and p95 of the replica's ``queue_seconds`` (created to taken, from each answer's
report) and the answers per second. Writes ``benchmarks/results/queue_overhead_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from spectrum_xdit.parallel.testing import free_port

RESULTS = Path("benchmarks/results")
JOB = {"prompt": "queue", "height": 16, "width": 16, "num_frames": 1, "num_inference_steps": 1,
       "cache": {"method": "none"}, "output_format": "npy"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", nargs="+", default=["memory", "sqlite", "redis"],
                        choices=["memory", "sqlite", "redis"])
    parser.add_argument("--jobs", type=int, default=60, help="jobs per load")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", type=Path, default=RESULTS / "queue_overhead_cpu.json")
    return parser.parse_args(argv)


def redis_server(folder: str):
    """A redis-server on a free loopback port and its URL, or ``None`` where none is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed (apt-get install redis-server): no Redis figures")
        return None, None
    port = free_port()
    process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", folder],
                               stdout=subprocess.DEVNULL)
    time.sleep(1.0)
    return process, f"redis://127.0.0.1:{port}/0"


def measure(url: str, jobs: int, concurrency: int) -> dict:
    def send(seed: int) -> float:
        answer = requests.post(f"{url}/v1/generate", json=dict(JOB, seed=seed), timeout=300)
        answer.raise_for_status()
        return json.loads(answer.headers["x-spectrum-report"])["queue_seconds"]

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        queue = np.array(list(pool.map(send, range(jobs))))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "jobs": jobs, "queue_ms_mean": 1000 * float(queue.mean()),
            "queue_ms_p95": 1000 * float(np.percentile(queue, 95)), "answers_per_s": jobs / wall}


def run(args) -> dict:
    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    folder = tempfile.mkdtemp(prefix="spectrum-xdit-queue-")
    redis_process, redis_url = redis_server(folder) if "redis" in args.brokers else (None, None)
    urls = {"memory": "memory://", "sqlite": f"sqlite:///{folder}/jobs.db", "redis": redis_url}
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for broker in args.brokers:
            if urls[broker] is None:
                continue
            settings = {"model": "tiny-wan", "device": "cpu", "worker_cpus": 1, "broker_url": urls[broker],
                        "results_url": f"{folder}/results-{broker}", "max_queue_size": 256}
            serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
            url = f"http://127.0.0.1:{port}"
            wait_until_ready(url, timeout=600)
            measure(url, 5, 1)   # warm-up
            for concurrency in (1, args.concurrency):
                row = {"broker": broker, **measure(url, args.jobs, concurrency)}
                print(f"{broker:>6} concurrency {concurrency}: queue mean {row['queue_ms_mean']:.1f} ms, p95 "
                      f"{row['queue_ms_p95']:.1f} ms, {row['answers_per_s']:.1f} answers/s")
                rows.append(row)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
        if redis_process is not None:
            redis_process.terminate()
    return {"rows": rows}


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
