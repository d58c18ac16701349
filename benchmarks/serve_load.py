"""Throughput and latency of `spectrum-xdit serve` under load, for each way a replica runs its jobs.

    python -m benchmarks.serve_load --quick          # ~11 min on 2 cores
    python -m benchmarks.serve_load                  # the full grid, ~45 min on 2 cores
    python -m benchmarks.serve_load --modes continuous --caches spectrum --json outputs/load.json
    python -m benchmarks.serve_load --model digits-flux --modes sequential continuous --caches spectrum \
        --concurrency 1 8 --images 1 4 --rates                                  # images, n = 1 and 4
    python -m benchmarks.serve_load --replicas 2 --model tiny-wan \
        --json benchmarks/results/serve_load_replicas_before_cpu.json           # async jobs, 2 replicas, ~1.5 min

Setup: the trained ``digits-wan`` model (50 UniPC steps, guidance 5.0, 16x16, 9 frames) or
``digits-flux`` (50 FLUX Euler steps, true CFG 2.0, 16x16) on one replica with two gloo ranks (xDiT
Ulysses=2, one thread each). Video answers are ``npy`` (no media encoding); image requests go to
``POST /v1/images/generations`` with ``n`` images each (``--images``), answered as PNGs. Modes are
the server's ``batching`` setting, each with its own server:

* ``sequential``: one job at a time in the pipeline's own loop;
* ``batched``: jobs that arrive together share the denoising steps, later ones wait for the batch;
* ``continuous``: a job joins the running steps at the next tick.

Caches are the request's ``cache.method`` (``none``, ``spectrum`` at its defaults). Load:

* closed loop: ``concurrency`` clients, each sending its next request when the last is answered
  (image models: once per ``--images`` count ``n``, each request asking for ``n`` images);
* open loop: Poisson arrivals (seeded) at multiples of the sequential server's one-client rate of
  the same cache, from below to well past its saturation.

Figures per run: requests and images (or videos) per minute (answered / wall time from the first
send to the last answer), p50/p95/p99 latency (send, or scheduled arrival, to answer), mean queue time (the
replica's ``queue_seconds``) and the mean block-stack batch (rows per block-stack call, from
``/healthz``; 1 when sequential). Writes the JSON (``--json``), and beside it a Markdown table and
a plot (throughput against offered load; latency distribution at the highest concurrency).

``--replicas N``: instead, asynchronous jobs on N replicas of one rank each (``continuous``, the
``auto`` mode of a step-batchable model): ``--jobs`` jobs (``POST /v1/videos``) at seeded Poisson
arrivals of ``--job_rate`` per minute, each polled (``GET /v1/videos/{id}`` every ``--poll_s``)
until it completes, fails or ``--job_timeout`` passes (then it is lost), then its content fetched
once. Figures: jobs per replica (the completed job's report names its replica) and the balance
(the busiest replica's count over the idlest's), p50/p95 queue time (the replica's
``queue_seconds``), polls and content fetches answered 404, jobs lost. A second replica on a
machine whose cores the first already uses cannot add throughput: the run measures how jobs are
shared and found, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from spectrum_xdit.parallel.testing import free_port

RESULTS = Path("benchmarks/results")
MODES = ("sequential", "batched", "continuous")
CACHES = ("none", "spectrum")
# Each issue's goal: at the highest concurrency with Spectrum, continuous serves at least this many
# times the sequential server's images (or videos) per minute, with a lower p95 (issue 13: video;
# issue 26: images).
GOAL_RATIO = {"wan": 3.0, "flux": 2.5}


def default_json(model: str) -> Path:
    return RESULTS / ("serve_load_cpu.json" if model == "digits-wan" else f"serve_load_{model}_cpu.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-wan")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8],
                        help="closed loop: clients (1 is needed for the open loop's rates)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="closed loop: requests per client (at least 2 in all for one client)")
    parser.add_argument("--rates", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0],
                        help="open loop: multiples of the sequential server's one-client rate")
    parser.add_argument("--poisson_requests", type=int, default=12, help="open loop: requests per rate")
    parser.add_argument("--images", type=int, nargs="+", default=[1],
                        help="image models, closed loop: images per request (n), one load each")
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seeds the arrivals and the requests")
    parser.add_argument("--quick", action="store_true",
                        help="1 and 8 clients, one round each; rates 0.5, 1, 2, 4 requests per rate")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/serve_load[_MODEL]_cpu.json")
    replicas = parser.add_argument_group("asynchronous jobs on several replicas (in place of the grid)")
    replicas.add_argument("--replicas", type=int, default=None, help="replicas of one rank each")
    replicas.add_argument("--jobs", type=int, default=20, help="jobs sent (POST /v1/videos)")
    replicas.add_argument("--job_rate", type=float, default=30.0, help="Poisson arrivals, jobs per minute")
    replicas.add_argument("--poll_s", type=float, default=0.3, help="seconds between a job's polls")
    replicas.add_argument("--job_timeout", type=float, default=300.0, help="seconds after which a job is lost")
    args = parser.parse_args(argv)
    if args.replicas is not None and args.json is None:
        parser.error("--replicas: give --json (its figures are not the grid's)")
    args.json = args.json or default_json(args.model)
    if args.quick:
        args.concurrency, args.rounds, args.rates, args.poisson_requests = [1, 8], 1, [0.5, 1.0, 2.0], 4
    return args


def prompts(model: str) -> list[str]:
    """The prompts the digits model was trained on."""
    from benchmarks.digits_data import all_image_prompts, all_prompts

    return [prompt for *_, prompt in (all_image_prompts() if is_image_model(model) else all_prompts())]


def is_image_model(model: str) -> bool:
    from spectrum_xdit.models import resolve_model

    return not resolve_model(model).is_video


class Client:
    """Requests to one server: each a different prompt and seed, drawn from ``seed``; ``images``:
    an image model's requests ask for that many images (``/v1/images/generations``)."""

    def __init__(self, url: str, args, cache: str, images: int | None = None):
        self.url, self.args, self.cache, self.images = url, args, cache, images
        self.prompts = prompts(args.model)
        self._count = 0
        self._lock = threading.Lock()

    def payload(self) -> dict:
        with self._lock:
            self._count += 1
            index = self._count
        body = {"prompt": self.prompts[(self.args.seed + index) % len(self.prompts)],
                "seed": self.args.seed * 1000 + index * (self.images or 1), "num_inference_steps": self.args.steps,
                "cache": {"method": self.cache}}
        return {**body, "n": self.images} if self.images else {**body, "output_format": "npy"}

    def send(self, started: float | None = None) -> dict:
        """One request; its latency from ``started`` (default: now) and the replica's reports."""
        import requests

        started = time.perf_counter() if started is None else started
        if self.images:
            response = requests.post(f"{self.url}/v1/images/generations", json=self.payload(), timeout=1800)
            response.raise_for_status()
            reports = response.json()["reports"]
        else:
            response = requests.post(f"{self.url}/v1/generate", json=self.payload(), timeout=1800)
            response.raise_for_status()
            reports = [json.loads(response.headers["x-spectrum-report"])]
        return {"latency": time.perf_counter() - started, "outputs": len(reports),
                "queue": float(np.mean([report["queue_seconds"] for report in reports])),
                "nfe": float(np.mean([sum(report["nfe"].values()) for report in reports])),
                "finished": time.perf_counter()}

    def counters(self) -> dict:
        import requests

        return requests.get(f"{self.url}/healthz", timeout=60).json()["counters"]


def closed_loop(client: Client, concurrency: int, rounds: int) -> tuple[list[dict], float]:
    total = max(concurrency * rounds, 2)
    budget = iter(range(total))
    lock = threading.Lock()

    def client_loop() -> list[dict]:
        answers = []
        while True:
            with lock:
                if next(budget, None) is None:
                    return answers
            answers.append(client.send())

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = [answer for part in pool.map(lambda _: client_loop(), range(concurrency)) for answer in part]
    return answers, time.perf_counter() - start


def open_loop(client: Client, per_minute: float, count: int, rng: random.Random) -> tuple[list[dict], float]:
    gaps = [rng.expovariate(per_minute / 60) for _ in range(count)]
    start = time.perf_counter()
    arrivals = [start + sum(gaps[:i]) for i in range(count)]

    def arrive(at: float) -> dict:
        time.sleep(max(0.0, at - time.perf_counter()))
        return client.send(started=at)

    with ThreadPoolExecutor(max_workers=count) as pool:
        answers = list(pool.map(arrive, arrivals))
    return answers, max(answer["finished"] for answer in answers) - start


def figures(answers: list[dict], wall: float, before: dict, after: dict, mode: str) -> dict:
    latencies = np.array([answer["latency"] for answer in answers])
    calls = after["block_calls"] - before["block_calls"]
    rows = after["block_rows"] - before["block_rows"]
    outputs = sum(answer["outputs"] for answer in answers)
    return {"requests": len(answers), "wall_s": wall, "requests_per_min": 60 * len(answers) / wall,
            "outputs": outputs, "outputs_per_min": 60 * outputs / wall,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
            "p99_s": float(np.percentile(latencies, 99)),
            "mean_queue_s": float(np.mean([answer["queue"] for answer in answers])),
            "mean_block_batch": 1.0 if mode == "sequential" else (rows / calls if calls else 0.0),
            "nfe_per_request": float(np.mean([answer["nfe"] for answer in answers])),
            "latencies_s": sorted(float(v) for v in latencies)}


# the job stores of this run, removed when it exits (its finalizer)
_STORES = tempfile.TemporaryDirectory(prefix="spectrum-xdit-load-")


def own_store() -> str:
    """A job store of the run's own, so that no job of an earlier run is taken or counted."""
    return f"sqlite:///{tempfile.mkdtemp(dir=_STORES.name)}/jobs.db"


def start_server(args, mode: str, port: int) -> str:
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    settings = {"model": args.model, "ulysses_degree": 2, "device": "cpu", "worker_cpus": 1, "batching": mode,
                "max_batch_size": args.max_batch_size, "max_queue_size": 256, "num_inference_steps": args.steps,
                "broker_url": own_store()}
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(url, timeout=900)
    return url


def run(args) -> dict:
    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME

    rows, one_client_rate = [], {}
    modes = sorted(args.modes, key=MODES.index)   # sequential first: the open loop's rates come from it
    counts = args.images if is_image_model(args.model) else [None]
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)   # its own, not a running one
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for mode in modes:
            started = time.perf_counter()
            url = start_server(args, mode, port)
            print(f"[{mode}] server ready in {time.perf_counter() - started:.0f} s", flush=True)
            for cache in args.caches:
                clients = {count: Client(url, args, cache, count) for count in counts}
                clients[counts[0]].send()   # warm-up
                rng = random.Random(args.seed)
                # the open loop's rates (of the first image count) once the sequential server's
                # one-client rate is known
                loads = [*(("closed", c, count) for count in counts for c in args.concurrency),
                         *(("poisson", None, m) for m in args.rates)]
                for load, concurrency, detail in loads:
                    if load == "poisson" and cache not in one_client_rate:
                        continue
                    client = clients[detail if load == "closed" else counts[0]]
                    rate = None if load == "closed" else one_client_rate[cache] * detail
                    before = client.counters()
                    if load == "closed":
                        answers, wall = closed_loop(client, concurrency, args.rounds)
                    else:
                        answers, wall = open_loop(client, rate, args.poisson_requests, rng)
                    row = {"mode": mode, "cache": cache, "load": load, "concurrency": concurrency,
                           "images": client.images, "offered_per_min": rate,
                           **figures(answers, wall, before, client.counters(), mode)}
                    rows.append(row)
                    if mode == "sequential" and load == "closed" and concurrency == 1 and client.images == counts[0]:
                        one_client_rate[cache] = row["requests_per_min"]
                    print(f"[{mode}] {cache:8s} {_load_label(row):12s} {row['requests_per_min']:6.1f} req/min  "
                          f"{row['outputs_per_min']:6.1f} outputs/min  p50 {row['p50_s']:5.2f} s  "
                          f"p95 {row['p95_s']:5.2f} s  block batch {row['mean_block_batch']:.2f}", flush=True)
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "model": args.model, "steps": args.steps,
            "layout": "one replica, 2 gloo ranks, Ulysses=2, one thread each", "max_batch_size": args.max_batch_size,
            "grid": {"concurrency": args.concurrency, "rounds": args.rounds, "rates": args.rates,
                     "poisson_requests": args.poisson_requests, "images": counts},
            "seed": args.seed, "rows": rows, "machine_load": os.getloadavg(),
            "goals": [goal(rows, max(args.concurrency), args.model, count) for count in counts]}


def goal(rows: list[dict], concurrency: int, model: str, images: int | None) -> dict | None:
    """The issues' goal: at the highest concurrency with Spectrum, continuous against sequential,
    in images (or videos) per minute; per image count of an image model."""
    from spectrum_xdit.models import resolve_model

    pick = {row["mode"]: row for row in rows if row["cache"] == "spectrum" and row["load"] == "closed"
            and row["concurrency"] == concurrency and row["images"] == images}
    if "sequential" not in pick or "continuous" not in pick:
        return None
    sequential, continuous = pick["sequential"], pick["continuous"]
    speedup = continuous["outputs_per_min"] / sequential["outputs_per_min"]
    target = GOAL_RATIO[resolve_model(model).family]
    return {"concurrency": concurrency, "images": images, "throughput_ratio": speedup, "target_ratio": target,
            "p95_sequential_s": sequential["p95_s"], "p95_continuous_s": continuous["p95_s"],
            "met": speedup >= target and continuous["p95_s"] < sequential["p95_s"]}


def _load_label(row: dict) -> str:
    if row["load"] != "closed":
        return f"{row['offered_per_min']:.0f}/min"
    return f"c={row['concurrency']}" + (f", n={row['images']}" if row.get("images") else "")


def markdown(results: dict) -> str:
    load = results.get("machine_load")
    machine = results["machine"] + (f", load average {load[0]:.1f} at the end" if load else "")
    outputs = "images" if is_image_model(results["model"]) else "videos"
    lines = [f"{results['model']}, {results['steps']} steps, {results['layout']}, max_batch_size "
             f"{results['max_batch_size']}, {machine}, {results['date']}", "",
             f"| mode | cache | load | req/min | {outputs}/min | p50 s | p95 s | p99 s | queue s | block batch | "
             "NFE/output |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['mode']} | {row['cache']} | {_load_label(row)} | {row['requests_per_min']:.1f} | "
                     f"{row['outputs_per_min']:.1f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['p99_s']:.2f} | "
                     f"{row['mean_queue_s']:.2f} | {row['mean_block_batch']:.2f} | {row['nfe_per_request']:.0f} |")
    for target in filter(None, results["goals"]):
        load = f"concurrency {target['concurrency']}" + (f", n={target['images']}" if target["images"] else "")
        lines += ["", f"Goal ({load}, Spectrum): continuous serves {target['throughput_ratio']:.2f}x the sequential "
                  f"server's {outputs} per minute (goal {target['target_ratio']:g}x), p95 "
                  f"{target['p95_continuous_s']:.2f} s against {target['p95_sequential_s']:.2f} s: "
                  f"{'met' if target['met'] else 'missed'}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Throughput against offered load (Poisson), or against clients where no Poisson load ran;
    the latency distribution at the highest concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    outputs = "images" if is_image_model(results["model"]) else "videos"
    figure, (throughput, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    highest = max((row["concurrency"] for row in rows if row["load"] == "closed"), default=None)
    poisson_ran = any(row["load"] == "poisson" for row in rows)
    for mode in MODES:
        for cache, style in (("none", "--"), ("spectrum", "-")):
            for images in sorted({row.get("images") or 0 for row in rows}):
                mine = [row for row in rows if (row["mode"], row["cache"], row.get("images") or 0) == (mode, cache, images)]
                label = f"{mode}, {cache}" + (f", n={images}" if images else "")
                marker = "s" if images > 1 else "o"
                if poisson_ran:
                    points = sorted((row["offered_per_min"], row["requests_per_min"]) for row in mine
                                    if row["load"] == "poisson")
                else:
                    points = sorted((row["concurrency"], row["outputs_per_min"]) for row in mine if row["load"] == "closed")
                if points:
                    throughput.plot(*zip(*points), style, marker=marker, label=label)
                for row in mine:
                    if row["load"] == "closed" and row["concurrency"] == highest:
                        latencies = row["latencies_s"]
                        cdf.step(latencies, np.arange(1, len(latencies) + 1) / len(latencies), style, where="post",
                                 label=label)
    if poisson_ran:
        limit = max(row["offered_per_min"] for row in rows if row["load"] == "poisson")
        throughput.plot([0, limit], [0, limit], ":", color="grey", label="served = offered")
        throughput.set(xlabel="offered load (requests/min, Poisson)", ylabel="served (requests/min)",
                       title="throughput against offered load")
    else:
        throughput.set(xlabel="clients (closed loop)", ylabel=f"{outputs}/min", title=f"{outputs} per minute")
    cdf.set(xlabel="latency (s)", ylabel="fraction of requests", title=f"latency, closed loop, {highest} clients")
    for axes in (throughput, cdf):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"{results['model']}, {results['steps']} steps, {results['layout']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- asynchronous jobs on several replicas --------------------------------------------------------


def track_job(url: str, payload: dict, at: float, args) -> dict:
    """One job of the replicas run: created at its arrival ``at``, polled until it ends or is
    lost, its content fetched once; what each answer was."""
    import requests

    time.sleep(max(0.0, at - time.perf_counter()))
    created = requests.post(f"{url}/v1/videos", json=payload, timeout=60)
    if created.status_code != 200:
        return {"created": False, "status": created.status_code, "polls": 0, "polls_404": 0}
    video_id = created.json()["id"]
    polls = polls_404 = 0
    deadline = time.perf_counter() + args.job_timeout
    while time.perf_counter() < deadline:
        answer = requests.get(f"{url}/v1/videos/{video_id}", timeout=60)
        polls += 1
        polls_404 += answer.status_code == 404
        if answer.status_code == 200 and answer.json()["status"] in ("completed", "failed"):
            job = answer.json()
            break
        time.sleep(args.poll_s)
    else:
        return {"created": True, "lost": True, "polls": polls, "polls_404": polls_404}
    seen = time.perf_counter()
    content = requests.get(f"{url}/v1/videos/{video_id}/content", timeout=60) if job["status"] == "completed" else None
    report = job.get("report") or {}
    return {"created": True, "lost": False, "status": job["status"], "polls": polls, "polls_404": polls_404,
            "content_404": content is not None and content.status_code == 404,
            "fetched": content is not None and content.status_code == 200, "latency": seen - at,
            "queue": report.get("queue_seconds"), "replica": report.get("replica")}


def replicas_row(jobs: list[dict], replicas: list[str], wall: float) -> dict:
    """The figures of one replicas run; ``replicas``: the ids of the replicas deployed."""
    completed = [job for job in jobs if job.get("status") == "completed"]
    counts = {replica: sum(job["replica"] == replica for job in completed) for replica in replicas}
    busiest, idlest = max(counts.values(), default=0), min(counts.values(), default=0)
    queue = [job["queue"] for job in completed]
    latency = [job["latency"] for job in completed]
    return {"replicas": len(replicas), "jobs": len(jobs), "created": sum(job["created"] for job in jobs),
            "completed": len(completed), "failed": sum(job.get("status") == "failed" for job in jobs),
            "lost": sum(bool(job.get("lost")) for job in jobs),
            "fetched": sum(bool(job.get("fetched")) for job in jobs),
            "content_404": sum(bool(job.get("content_404")) for job in jobs),
            "polls": sum(job["polls"] for job in jobs), "polls_404": sum(job["polls_404"] for job in jobs),
            "jobs_per_replica": counts, "balance": busiest / idlest if idlest else None,
            "p50_queue_s": float(np.percentile(queue, 50)) if queue else None,
            "p95_queue_s": float(np.percentile(queue, 95)) if queue else None,
            "p95_latency_s": float(np.percentile(latency, 95)) if latency else None,
            "jobs_per_min": 60 * len(completed) / wall, "wall_s": wall, "queue_s": sorted(queue)}


def deployed_replicas(url: str, count: int, tries: int = 200) -> list[str]:
    """The ids of the ``count`` replicas, from ``/healthz`` (which reaches any of them)."""
    import requests

    seen = set()
    for _ in range(tries):
        seen.add(requests.get(f"{url}/healthz", timeout=60).json()["replica"])
        if len(seen) == count:
            return sorted(seen)
        time.sleep(0.05)
    raise RuntimeError(f"only {len(seen)} of {count} replicas answered /healthz")


def run_replicas(args) -> dict:
    import ray
    from ray import serve

    from spectrum_xdit.launch.serve.app import APP_NAME, build_app
    from spectrum_xdit.launch.serve.main import wait_until_ready

    port = free_port()
    ray.init(address="local", num_cpus=2 * args.replicas, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"model": args.model, "ulysses_degree": 1, "device": "cpu", "worker_cpus": 1, "batching": "continuous",
                "max_batch_size": args.max_batch_size, "max_queue_size": 256, "num_inference_steps": args.steps,
                "num_replicas": args.replicas, "broker_url": own_store()}
    try:
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, timeout=900)
        replicas = deployed_replicas(url, args.replicas)
        client = Client(url, args, "spectrum")
        client.send()   # warm-up, on whichever replica
        rng = random.Random(args.seed)
        gaps = [rng.expovariate(args.job_rate / 60) for _ in range(args.jobs)]
        start = time.perf_counter()
        arrivals = [start + sum(gaps[:i]) for i in range(args.jobs)]
        payloads = [client.payload() for _ in range(args.jobs)]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            jobs = list(pool.map(lambda item: track_job(url, item[1], item[0], args), zip(arrivals, payloads)))
        wall = max([job["latency"] + at for job, at in zip(jobs, arrivals) if "latency" in job] or [start]) - start
        row = replicas_row(jobs, replicas, max(wall, 1e-9))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "model": args.model, "steps": args.steps,
            "layout": f"{args.replicas} replicas, 1 gloo rank each, continuous, max_batch_size {args.max_batch_size}",
            "load": {"jobs": args.jobs, "jobs_per_min": args.job_rate, "poll_s": args.poll_s,
                     "job_timeout_s": args.job_timeout, "cache": "spectrum"},
            "seed": args.seed, "row": row, "machine_load": os.getloadavg(),
            "note": f"{os.cpu_count()} cores: a second replica cannot add throughput here; the figures are how "
                    "jobs are shared and found (balance, queue time, 404s, loss), not speed"}


def replicas_markdown(results: dict) -> str:
    row, load = results["row"], results["load"]
    balance = f"{row['balance']:.2f}" if row["balance"] is not None else "inf (a replica ran no job)"
    counts = ", ".join(f"{replica[:8]}: {count}" for replica, count in row["jobs_per_replica"].items())
    return "\n".join([
        f"{results['model']}, {results['steps']} steps, {results['layout']}, {results['machine']}, {results['date']}",
        f"{load['jobs']} jobs (POST /v1/videos) at Poisson {load['jobs_per_min']:g}/min, polled every "
        f"{load['poll_s']:g} s, Spectrum; {results['note']}.", "",
        "| replicas | jobs | completed | lost | polls | polls 404 | content 404 | jobs per replica | balance | "
        "p50 queue s | p95 queue s | p95 latency s | jobs/min |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {row['replicas']} | {row['jobs']} | {row['completed']} | {row['lost']} | {row['polls']} | "
        f"{row['polls_404']} | {row['content_404']} | {counts} | {balance} | {_fmt(row['p50_queue_s'])} | "
        f"{_fmt(row['p95_queue_s'])} | {_fmt(row['p95_latency_s'])} | {row['jobs_per_min']:.1f} |"]) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def replicas_plot(results: dict, path: Path) -> None:
    """Jobs per replica; the distribution of queue times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = results["row"]
    figure, (counts, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [replica[:8] for replica in row["jobs_per_replica"]]
    counts.bar(names, list(row["jobs_per_replica"].values()), color="tab:blue")
    counts.set(xlabel="replica", ylabel="jobs completed", title=f"jobs per replica (polls 404: {row['polls_404']} "
               f"of {row['polls']})")
    queue = row["queue_s"]
    if queue:
        cdf.step(queue, np.arange(1, len(queue) + 1) / len(queue), where="post")
    cdf.set(xlabel="queue time (s)", ylabel="fraction of jobs", title="queue time")
    for axes in (counts, cdf):
        axes.grid(alpha=0.3)
    figure.suptitle(f"{results['model']}, {results['layout']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args) if args.replicas is None else run_replicas(args)
    table = markdown(results) if args.replicas is None else replicas_markdown(results)
    print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    args.json.with_suffix(".md").write_text(table)
    (plot if args.replicas is None else replicas_plot)(results, args.json.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
