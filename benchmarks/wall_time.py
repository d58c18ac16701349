"""Does wall time track NFE? Where the time of a Spectrum generation goes, on digits-wan.

    python -m benchmarks.wall_time                      # budgets 14, 10, 7; ~3 min on 2 idle cores
    python -m benchmarks.wall_time --quick              # one budget, 2 repeats: a smoke run
    python -m benchmarks.wall_time --json benchmarks/results/wall_time_cpu.json

Issue 16's goal: in one process, a wall-clock speedup of at least 0.9x the NFE speedup for the
fixed (paper) schedule and 0.85x for the budget and adaptive ones. Every method generates the same
clip (50 UniPC steps, guidance 5.0, as ``benchmarks.quality``) at each budget of real steps per
branch, the methods interleaved within each repeat so that machine noise hits them alike; the
table gives medians. Per method it also splits the time, with forward hooks on the transformer:

- ``real ms`` / ``forecast ms``: one transformer call that runs the blocks / that forecasts them
  (a forecast call still runs the timestep embedding, the output norm and projection, and, in the
  ``block inputs computed`` rows, the rotary, patch and text embedders that only the blocks read
  and that Spectrum now skips on a forecast step);
- ``outside ms``: the rest of one denoising step (the scheduler's update, CFG's combination), which
  every one of the 50 steps pays whatever the schedule: with it, the ceiling of the wall/NFE ratio
  is below 1 even for free forecasts (``ceiling`` column).

The adaptive schedule's error budget per NFE budget is the one ``benchmarks.quality`` bisected on
held-out seeds (read from its JSON, ``--quality-json``); without that file its rows are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.quality import ADAPTIVE, BUDGET_WARMUP, FLEX, GUIDANCE, SPECTRUM_SCHEDULES, STEPS, machine_description
from spectrum_xdit import SpectrumConfig, apply_spectrum, remove_spectrum, spectrum_stats
from spectrum_xdit.hooks import find_spectrum_policy, unhook_block_inputs
from spectrum_xdit.models.digits_wan import GENERATION_KWARGS, build_digits_wan_pipeline

DEFAULT_JSON = Path("benchmarks/results/wall_time_cpu.json")
QUALITY_JSON = Path("benchmarks/results/quality_cpu.json")
PROMPT = "digit 3 moving left"
GOALS = {"paper": 0.9, "budget": 0.85, "adaptive": 0.85}


@dataclass
class Timed:
    """One method and the times of its runs."""

    name: str
    budget: int | None
    config: SpectrumConfig | None = None
    steps: int = STEPS
    skip_block_inputs: bool = True
    runs: list[dict] = field(default_factory=list)


class CallClock:
    """Times every transformer call and files it under real or forecast."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.calls: dict[str, list[float]] = {"real": [], "forecast": []}
        self._start = 0.0
        transformer.register_forward_pre_hook(self._before)
        transformer.register_forward_hook(self._after)

    def _before(self, module, args):
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        policy = find_spectrum_policy(module)
        real = policy is None or policy.run_blocks
        self.calls["real" if real else "forecast"].append(time.perf_counter() - self._start)

    def take(self) -> dict[str, list[float]]:
        calls, self.calls = self.calls, {"real": [], "forecast": []}
        return calls


def adaptive_error_budgets(path: Path) -> dict[int, float]:
    """The error budget ``benchmarks.quality`` bisected for each NFE budget, if it has run."""
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {row["budget"]: row["error_budget"] for row in rows if row.get("method") == "spectrum-adaptive"}


def methods_for(budget: int, error_budgets: dict[int, float]) -> list[Timed]:
    warmup, window = SPECTRUM_SCHEDULES[budget]
    paper = SpectrumConfig(num_inference_steps=STEPS, flex_window=FLEX, warmup_steps=warmup, window_size=window,
                           blend_weight=0.5)
    methods = [
        Timed("plain", budget, steps=budget),
        Timed("paper", budget, paper),
        Timed("paper, block inputs computed", budget, paper, skip_block_inputs=False),
        Timed("budget", budget, SpectrumConfig(num_inference_steps=STEPS, target_nfe=budget,
                                               warmup_steps=BUDGET_WARMUP, blend_weight="auto")),
    ]
    if budget in error_budgets:
        methods.append(Timed("adaptive", budget, SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto",
                                                                error_budget=error_budgets[budget], **ADAPTIVE)))
    return methods


def generate(pipe, embeds, clock: CallClock, method: Timed) -> dict:
    transformer = pipe.transformer
    if method.config is not None:
        apply_spectrum(transformer, method.config)
        if not method.skip_block_inputs:
            unhook_block_inputs(transformer)
    try:
        clock.take()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=method.steps,
                 guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0), output_type="latent",
                 **GENERATION_KWARGS)
        seconds = time.perf_counter() - t0
        calls = clock.take()
        nfe = spectrum_stats(transformer)["cond"]["nfe"] if method.config is not None else method.steps
    finally:
        if method.config is not None:
            remove_spectrum(transformer)
    return {"seconds": seconds, "nfe": nfe, **calls}


def summarise(method: Timed, full: dict) -> dict:
    seconds = statistics.median(r["seconds"] for r in method.runs)
    nfe = method.runs[0]["nfe"]
    real = [t for r in method.runs for t in r["real"]]
    forecast = [t for r in method.runs for t in r["forecast"]]
    calls = sum(len(r["real"]) + len(r["forecast"]) for r in method.runs) / len(method.runs)
    outside = statistics.median(r["seconds"] - sum(r["real"]) - sum(r["forecast"]) for r in method.runs) / method.steps
    speedup_wall, speedup_nfe = full["seconds"] / seconds, STEPS / nfe
    row = {"budget": method.budget, "method": method.name, "nfe": nfe, "seconds": round(seconds, 4),
           "speedup_wall": round(speedup_wall, 3), "speedup_nfe": round(speedup_nfe, 3),
           "ratio": round(speedup_wall / speedup_nfe, 3), "transformer_calls": calls,
           "real_ms": round(1e3 * statistics.median(real), 3) if real else None,
           "forecast_ms": round(1e3 * statistics.median(forecast), 3) if forecast else None,
           "outside_ms": round(1e3 * outside, 3)}
    if method.config is not None:
        # the wall/NFE ratio with forecasts free: only the per-step work outside the transformer stays
        full_outside = full["outside_ms"] / 1e3
        ideal = nfe * 2 * full["real_ms"] / 1e3 + STEPS * full_outside
        row["ceiling"] = round(full["seconds"] / ideal / speedup_nfe, 3)
        goal = GOALS.get(method.name)
        if goal is not None:
            row["goal"] = goal
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| budget | method | NFE | wall (ms) | speedup (wall) | speedup (NFE) | wall/NFE | goal | ceiling | "
            "real ms | forecast ms | outside ms |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    def cell(value):
        return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
    return head + "".join(
        f"| {cell(r['budget'])} | {r['method']} | {cell(r['nfe'])} | {1e3 * r['seconds']:.1f} | "
        f"{r['speedup_wall']:.2f}x | {r['speedup_nfe']:.2f}x | {r['ratio']:.2f} | {cell(r.get('goal'))} | "
        f"{cell(r.get('ceiling'))} | {cell(r['real_ms'])} | {cell(r['forecast_ms'])} | {cell(r['outside_ms'])} |\n"
        for r in rows)


def run(budgets: list[int], repeats: int, threads: int, out_json: Path | None, quality_json: Path,
        command: str) -> dict:
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    torch.set_num_threads(threads)
    pipe = build_digits_wan_pipeline()
    with torch.no_grad():
        embeds = pipe.encode_prompt(PROMPT, negative_prompt="", do_classifier_free_guidance=True, device="cpu")
    clock = CallClock(pipe.transformer)
    error_budgets = adaptive_error_budgets(quality_json)
    full = Timed("full", None)
    methods = [full] + [m for b in budgets for m in methods_for(b, error_budgets)]
    generate(pipe, embeds, clock, full)   # warm-up: first-call allocations stay out of the figures
    for _ in tqdm(range(repeats), desc="wall time", unit="repeat"):
        for method in methods:
            method.runs.append(generate(pipe, embeds, clock, method))
    for method in methods:
        if method.config is not None and any(r["nfe"] != method.runs[0]["nfe"] for r in method.runs):
            raise RuntimeError(f"{method.name} at budget {method.budget} changed its NFE between repeats")
    base = {"seconds": statistics.median(r["seconds"] for r in full.runs)}
    base.update(real_ms=1e3 * statistics.median(t for r in full.runs for t in r["real"]),
                outside_ms=1e3 * statistics.median(r["seconds"] - sum(r["real"]) for r in full.runs) / STEPS)
    rows = [summarise(m, base) for m in methods]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "machine": machine_description(),
            "torch": torch.__version__, "model": "digits-wan", "steps": STEPS, "guidance_scale": GUIDANCE,
            "repeats": repeats, "prompt": PROMPT}
    result = {"meta": meta, "rows": rows}
    table = markdown(rows)
    print(table)
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2) + "\n")
        title = f"digits-wan, {STEPS} UniPC steps, guidance {GUIDANCE}, {repeats} repeats; {meta['date']}; {meta['machine']}"
        out_json.with_suffix(".md").write_text(f"{title}\n\n`{command}`\n\n{table}\n{FOOTNOTE}\n")
        print(f"wrote {out_json} and {out_json.with_suffix('.md')}")
    return result


FOOTNOTE = ("wall/NFE: the wall-clock speedup over the NFE speedup (issue 16's goal: 0.9 for the paper schedule, "
            "0.85 for the budget and adaptive ones). ceiling: that ratio if forecasts and validation cost nothing, "
            "with the full run's per-step work outside the transformer still paid at all 50 steps. real ms / "
            "forecast ms: the median transformer call that runs / forecasts the blocks; outside ms: the rest of a "
            "denoising step (scheduler, CFG).")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="budget 10 only, 2 repeats")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, choices=sorted(SPECTRUM_SCHEDULES))
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7; quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help=f"write results here (e.g. {DEFAULT_JSON})")
    parser.add_argument("--quality-json", type=Path, default=QUALITY_JSON,
                        help="benchmarks.quality's results, for the adaptive schedule's error budgets")
    args = parser.parse_args(argv)
    budgets = args.budgets or ([10] if args.quick else [14, 10, 7])
    repeats = args.repeats or (2 if args.quick else 7)
    command = "python -m benchmarks.wall_time " + " ".join(argv if argv is not None else sys.argv[1:])
    return run(budgets, repeats, args.threads, args.json, args.quality_json, command.strip())


if __name__ == "__main__":
    main()
