"""Generation throughput with and without Spectrum, in one process and on two ranks (xDiT Ulysses).

    python -m benchmarks.throughput                       # world 1 and 2, 3 repeats each, ~3 min on 2 cores
    python -m benchmarks.throughput --worlds 1 --repeats 1 --json outputs/throughput.json

Each run is a separate ``torchrun --nproc_per_node=N -m spectrum_xdit.launch.cli generate``
launch on the trained ``digits-wan`` model (50 UniPC steps, guidance 5.0, ``--ulysses_degree N``),
and its ``--report`` gives the figures: denoising seconds (the sampling loop), total seconds (model
build, text encoding, sampling, decode, writing), NFE per branch and per-rank forecaster state.
The table gives the median over repeats, the speedup of Spectrum over no cache at the same world
size, and the speedup of each layout over one process without cache. The runs alternate between
methods so that machine noise hits both alike. torchrun gives every rank one thread when
``N > 1``; the one-process runs use ``--threads`` (default 2), so both layouts use every core.
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
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from spectrum_xdit.parallel.testing import free_port

DEFAULT_JSON = Path("benchmarks/results/throughput_cpu.json")
# name: the CLI flags of that method. spectrum-adaptive's budget is the one benchmarks.quality
# tuned to NFE 14 on digits-wan; it also measures the cost of the online validation.
METHODS = {
    "none": ["--cache_method", "none"],
    "spectrum": ["--cache_method", "spectrum"],
    "spectrum-adaptive": ["--cache_method", "spectrum", "--spectrum_schedule", "adaptive",
                          "--spectrum_blend_weight", "auto", "--spectrum_warmup_steps", "3",
                          "--spectrum_max_gap", "10", "--spectrum_error_budget", "0.0688"],
}


def launch(world: int, method: str, report: Path, model: str, steps: int, seed: int, threads: int,
           timeout: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_port", str(free_port()), "-m", "spectrum_xdit.launch.cli", "generate",
               "--model", model, "--ulysses_degree", str(world), *METHODS[method],
               "--num_inference_steps", str(steps), "--seed", str(seed), "--report", str(report)]
    env = dict(os.environ)
    if world == 1:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(report.read_text())


def summarise(runs: dict[tuple[int, str], list[dict]]) -> list[dict]:
    rows = []
    base = statistics.median(r["denoise_seconds"] for r in runs[(1, "none")]) if (1, "none") in runs else None
    for (world, method), reports in sorted(runs.items()):
        denoise = statistics.median(r["denoise_seconds"] for r in reports)
        total = statistics.median(r["total_seconds"] for r in reports)
        none = statistics.median(r["denoise_seconds"] for r in runs[(world, "none")]) if (world, "none") in runs else None
        first = reports[0]
        rows.append({
            "world_size": world, "parallel": first["parallel"], "cache_method": method,
            "nfe": first["nfe"], "denoise_seconds": round(denoise, 3), "total_seconds": round(total, 3),
            "denoise_seconds_all": [round(r["denoise_seconds"], 3) for r in reports],
            "speedup_vs_none": None if none is None else round(none / denoise, 3),
            "speedup_vs_one_process_none": None if base is None else round(base / denoise, 3),
            "state_bytes_per_rank": first["state_bytes_per_rank"],
        })
        if first.get("validation"):
            # extra time per real step (both branches, this rank): validation forecasts, sums, all-reduce
            rows[-1]["validation_ms_per_real_step"] = round(1e3 * statistics.median(
                r["validation_seconds"] / len(r["validation"]) for r in reports), 3)
            rows[-1]["real_step_ms"] = None if none is None else round(1e3 * none / first["num_inference_steps"], 3)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| ranks | layout | cache | NFE per branch | denoise s (median) | total s | speedup vs none "
             "| speedup vs 1 process, none | forecaster state per rank | validation ms per real step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        layout = ", ".join(f"{k} {v}" for k, v in row["parallel"].items() if v != 1) or "single"
        nfe = "/".join(str(v) for v in row["nfe"].values())
        def x(v):
            return "" if v is None else f"{v:.2f}x"

        def validation(row):
            if "validation_ms_per_real_step" not in row:
                return ""
            step = row.get("real_step_ms")
            share = f" ({100 * row['validation_ms_per_real_step'] / step:.1f}% of a full step)" if step else ""
            return f"{row['validation_ms_per_real_step']:.2f}{share}"
        lines.append(f"| {row['world_size']} | {layout} | {row['cache_method']} | {nfe} | {row['denoise_seconds']:.2f} "
                     f"| {row['total_seconds']:.2f} | {x(row['speedup_vs_none'])} "
                     f"| {x(row['speedup_vs_one_process_none'])} | {row['state_bytes_per_rank'] / 1024:.0f} KiB "
                     f"| {validation(row)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="ranks per run (Ulysses degree)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--model", default="digits-wan")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one-process runs")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(w < 1 for w in args.worlds):
        parser.error("--repeats and --worlds must be >= 1")

    runs: dict[tuple[int, str], list[dict]] = {}
    plan = [(w, m) for _ in range(args.repeats) for w in args.worlds for m in args.methods]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (world, method) in enumerate(tqdm(plan, desc="throughput", unit="launch")):
            report = launch(world, method, Path(tmp) / f"{i}.json", args.model, args.num_inference_steps,
                            args.seed, args.threads, args.timeout)
            runs.setdefault((world, method), []).append(report)
    rows = summarise(runs)
    command = "python -m benchmarks.throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command.strip(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": args.model,
            "num_inference_steps": args.num_inference_steps, "repeats": args.repeats,
            "backend": "gloo (CPU)"}
    result = {"meta": meta, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rows)
    args.json.with_suffix(".md").write_text(
        f"{args.model}, {args.num_inference_steps} UniPC steps, guidance 5.0; {meta['date']}; {meta['machine']}; "
        f"{meta['backend']}\n\n`{meta['command']}`\n\n{table}")
    print(table)
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
