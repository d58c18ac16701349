"""Request latency and throughput of `spectrum-xdit serve` against one torchrun launch per request.

    python -m benchmarks.serve_vs_cli                        # digits-wan, Ulysses 2, 6 requests, ~4 min on 2 cores
    python -m benchmarks.serve_vs_cli --requests 3 --json outputs/serve_vs_cli.json

The same work both ways: ``--requests`` generations of the trained ``digits-wan`` model (50 UniPC
steps, guidance 5.0, Spectrum, gif output) with different seeds on two gloo ranks (xDiT
Ulysses=2, one thread each).

* ``cli``: one ``torchrun --nproc_per_node=2 ... spectrum-xdit generate --output x.gif`` per
  request, wall time of the whole launch (interpreters, imports, process group, model build,
  generation, decode, writing).
* ``serve sequential``: one request at a time over HTTP to a running server (one replica, its two
  rank actors already built); latency from sending the request to the last byte of the gif.
* ``serve concurrent``: all requests sent at once; the replica runs them one at a time, so
  throughput is requests / wall time of the batch and latency includes queueing.

The server's start-up (Ray, Serve, the rank group) is measured once and reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from spectrum_xdit.parallel.testing import free_port

DEFAULT_JSON = Path("benchmarks/results/serve_vs_cli_cpu.json")


def cli_run(args, seed: int, folder: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
               str(free_port()), "-m", "spectrum_xdit.launch.cli", "generate", "--model", args.model,
               "--ulysses_degree", "2", "--num_inference_steps", str(args.steps), "--seed", str(seed),
               "--prompt", args.prompt, "--output", str(folder / f"cli_{seed}.gif"),
               "--report", str(folder / f"cli_{seed}.json")]
    start = time.perf_counter()
    subprocess.run(command, check=True, timeout=600, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.perf_counter() - start, json.loads((folder / f"cli_{seed}.json").read_text())


def post(url: str, args, seed: int) -> tuple[float, dict]:
    import requests

    start = time.perf_counter()
    response = requests.post(f"{url}/v1/generate", timeout=600, json={
        "prompt": args.prompt, "seed": seed, "num_inference_steps": args.steps, "output_format": "gif"})
    seconds = time.perf_counter() - start
    response.raise_for_status()
    return seconds, json.loads(response.headers["x-spectrum-report"])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-wan")
    parser.add_argument("--prompt", default="digit 7 moving right")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    seeds = list(range(args.requests))

    with tempfile.TemporaryDirectory() as folder:
        cli_runs = [cli_run(args, seed, Path(folder)) for seed in seeds]
    cli = [seconds for seconds, _ in cli_runs]

    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    port = free_port()
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": args.model, "ulysses_degree": 2, "device": "cpu", "worker_cpus": 1}),
                  name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout=600)
        startup = time.perf_counter() - start
        post(url, args, 1000)  # warm-up
        sequential = [post(url, args, seed) for seed in seeds]
        batch_start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
            concurrent = list(pool.map(lambda seed: post(url, args, seed), seeds))
        batch_seconds = time.perf_counter() - batch_start
    finally:
        serve.shutdown()
        ray.shutdown()

    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": args.model, "steps": args.steps, "requests": args.requests, "layout": "2 gloo ranks, Ulysses=2",
        "cli_seconds_per_request": summary(cli),
        "cli_denoise_seconds": summary([report["denoise_seconds"] for _, report in cli_runs]),
        "cli_requests_per_minute": 60 * len(cli) / sum(cli),
        "serve_startup_seconds": startup,
        "serve_sequential_latency_seconds": summary([s for s, _ in sequential]),
        "serve_sequential_denoise_seconds": summary([r["denoise_seconds"] for _, r in sequential]),
        "serve_sequential_requests_per_minute": 60 * len(sequential) / sum(s for s, _ in sequential),
        "serve_concurrent_latency_seconds": summary([s for s, _ in concurrent]),
        "serve_concurrent_requests_per_minute": 60 * len(concurrent) / batch_seconds,
        "nfe": sequential[0][1]["nfe"],
    }
    print(f"{args.model}, {args.steps} steps, Spectrum, 2 gloo ranks (Ulysses=2), {args.requests} requests")
    print(f"  torchrun CLI, one launch per request: {results['cli_seconds_per_request']['median']:.2f} s/request "
          f"(denoise {results['cli_denoise_seconds']['median']:.2f} s), "
          f"{results['cli_requests_per_minute']:.1f} requests/min")
    print(f"  serve start-up (once): {startup:.1f} s")
    print(f"  serve, sequential: latency {results['serve_sequential_latency_seconds']['median']:.2f} s "
          f"(denoise {results['serve_sequential_denoise_seconds']['median']:.2f} s), "
          f"{results['serve_sequential_requests_per_minute']:.1f} requests/min")
    print(f"  serve, {args.requests} at once: latency median {results['serve_concurrent_latency_seconds']['median']:.2f} s"
          f" (max {results['serve_concurrent_latency_seconds']['max']:.2f}), "
          f"{results['serve_concurrent_requests_per_minute']:.1f} requests/min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
