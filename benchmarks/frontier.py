"""A budget spent across step counts: B plain steps, or N > B sampler steps of which B are real.

    python -m benchmarks.frontier                 # 40 pairs, budgets 14 10 7
    python -m benchmarks.frontier --quick         # 2 pairs, budget 7 at 14 steps, < 60 s
    python -m benchmarks.frontier --threads 1 --json benchmarks/results/frontier_cpu.json   # 29 min

On a CPU other jobs share, ``--threads 1`` is several times faster than 2 (two threads contending
for cores spin).

Issue 16: a budget of B block-stack evaluations per guidance branch can be the plain sampler at B
steps, or Spectrum at any N > B steps with exactly B real ones. ``benchmarks.quality`` compares
methods at N = 50; this measures the whole frontier, against the same reference (50 UniPC steps,
guidance 5.0) on the same (prompt, seed) pairs, with quality's sampling, counting and scoring. For
each budget B (``--budgets``), at N = B and at each N > B of ``--steps`` (default round(1.5 B),
2 B, 3 B and 50):

- ``plain``: the sampler at N = B steps;
- ``spectrum-budget``: ``target_nfe=B`` with the auto blend and quality's warm-up of 3 (nothing to
  tune), and ``spectrum-budget-reuse`` the same with ``reuse=True``;
- ``spectrum`` (blend 0.5, the reference recipe) and ``spectrum-auto`` (blend auto): the paper
  schedule at flex_window 0.75 with the warm-up and window that run exactly B real steps of N;
  among the pairs that do (each warm-up with its smallest such window), the one of best PSNR at
  blend 0.5 on the held-out calibration seeds;
- ``reuse``: the last real feature at exactly that paper schedule's real steps (FORA-style; a
  comparator, not a setting of ``SpectrumConfig``).

Every row's NFE is counted; a row with any clip off its budget is flagged (``off_budget`` in the
JSON, ``!`` in the table). Each row is also scored on the calibration seeds (``psnr_calibration``,
seeds >= 1000, never the benchmark pairs), and per budget the setting a user can ask for (the
plain sampler or a ``SpectrumConfig``) of best calibration PSNR is the recommendation
(``recommended``): benchmarks/README.md's table quotes its PSNR on the benchmark pairs, so no
choice of N or setting is made on the pairs it is judged on.

Writes the JSON (``--json``), a Markdown table beside it (``.md``: the summary per budget and N,
then every row) and a plot of PSNR against N per budget, the plain sampler as a line (``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.digits_classifier import load_classifier
from benchmarks.quality import (BUDGET_WARMUP, FAMILY_STYLE, FLEX, GUIDANCE, STEPS, Bench, Method, ReuseMethod,
                                SpectrumMethod, benchmark_pairs, digit_accuracy, held_out_pairs, machine_description,
                                psnr, ssim, summarise)
from spectrum_xdit import SpectrumConfig
from spectrum_xdit.schedule import paper_schedule

DEFAULT_JSON = Path("benchmarks/results/frontier_cpu.json")
DEFAULT_RATIOS = (1.5, 2.0, 3.0)   # the default N per budget: these multiples of it, and STEPS
SPECTRUM_FAMILIES = ("spectrum-budget", "spectrum-budget-reuse", "spectrum", "spectrum-auto", "reuse")
COMPARATORS = ("reuse",)   # benchmark-only predictors: never recommended


def steps_grid(budget: int, steps: list[int] | None) -> list[int]:
    """B (the plain sampler), then the step counts N > B that Spectrum spreads B real steps over:
    those of ``steps``, by default round(r B) for r in DEFAULT_RATIOS, and STEPS."""
    spread = set(steps) if steps else {math.floor(r * budget + 0.5) for r in DEFAULT_RATIOS} | {STEPS}
    spread = sorted(n for n in spread if n > budget)
    if not spread:
        raise ValueError(f"--steps has no step count above the budget {budget}, got {steps}")
    return [budget] + spread


def paper_candidates(steps: int, budget: int) -> list[tuple[int, int]]:
    """(warm-up, window) pairs whose paper schedule at flex FLEX runs exactly ``budget`` of
    ``steps``: each warm-up with its smallest such window (a larger one only shifts the last)."""
    found = []
    for warmup in range(1, budget + 1):
        window = next((w for w in range(1, steps + 1)
                       if len(paper_schedule(steps, warmup, w, FLEX)) == budget), None)
        if window is not None:
            found.append((warmup, window))
    return found


class Calibration:
    """PSNR on the held-out seeds, each method sampled once: the only data any choice is made on."""

    def __init__(self, bench: Bench, pairs: list[tuple[str, int]], progress: tqdm):
        self.bench, self.pairs, self.progress = bench, pairs, progress
        full = Method("full", f"{STEPS} steps")
        self.references = [bench.sample(full, prompt, seed)[0] for prompt, seed in pairs]
        self.scores: dict[str, float] = {}

    def psnr(self, method: Method) -> float:
        if method.label not in self.scores:
            self.scores[method.label] = statistics.fmean(
                psnr(self.bench.sample(method, prompt, seed)[0], reference)
                for (prompt, seed), reference in zip(self.pairs, self.references))
            self.progress.update(1)
        return self.scores[method.label]


def paper_config(steps: int, warmup: int, window: int, **blend) -> SpectrumConfig:
    return SpectrumConfig(num_inference_steps=steps, warmup_steps=warmup, window_size=window, flex_window=FLEX,
                          **blend)


def build_methods(grids: dict[int, list[int]], calibration: Calibration, log) -> list[Method]:
    """The reference, then per budget (its ``steps_grid``) the plain sampler and Spectrum's settings
    at each N > B."""
    methods: list[Method] = [Method("full", f"{STEPS} steps")]
    for budget, grid in grids.items():
        methods.append(Method("plain", f"{budget} steps", budget, steps=budget))
        for steps in grid[1:]:
            for reuse in (False, True):
                methods.append(SpectrumMethod(
                    "spectrum-budget-reuse" if reuse else "spectrum-budget",
                    f"{steps} steps, target_nfe {budget}, warmup {BUDGET_WARMUP}, blend auto"
                    f"{' + reuse' if reuse else ''}", budget,
                    SpectrumConfig(num_inference_steps=steps, target_nfe=budget, warmup_steps=BUDGET_WARMUP,
                                   blend_weight="auto", reuse=reuse)))

            def paper(warmup, window, blend, family="spectrum"):
                return SpectrumMethod(family, f"{steps} steps, flex {FLEX}, warmup {warmup}, window {window}, "
                                      f"blend {blend}", budget, paper_config(steps, warmup, window, blend_weight=blend))
            candidates = paper_candidates(steps, budget)
            if not candidates:
                log(f"budget {budget}, {steps} steps: no paper schedule at flex {FLEX} runs exactly {budget}")
                continue
            warmup, window = max(candidates, key=lambda c: calibration.psnr(paper(*c, 0.5)))
            log(f"budget {budget}, {steps} steps: paper schedule warmup {warmup}, window {window} "
                f"(best of {len(candidates)} on the held-out seeds)")
            methods += [paper(warmup, window, 0.5), paper(warmup, window, "auto", "spectrum-auto"),
                        ReuseMethod("reuse", f"{steps} steps, flex {FLEX}, warmup {warmup}, window {window}", budget,
                                    paper_config(steps, warmup, window, blend_weight=0.0))]
    return methods


# ----------------------------------------------------------------------------- report

def summary(rows: list[dict]) -> list[dict]:
    """Per budget and N > B: the best Spectrum setting on the benchmark pairs, against the plain
    sampler at N = B and the reuse comparator at N."""
    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows if r["budget"] is not None):
        at_budget = [r for r in rows if r["budget"] == budget]
        plain = next(r for r in at_budget if r["method"] == "plain")
        for steps in dict.fromkeys(r["steps"] for r in at_budget if r["method"] != "plain"):
            at_steps = [r for r in at_budget if r["steps"] == steps]
            best = max((r for r in at_steps if r["method"] not in COMPARATORS), key=lambda r: r["psnr"])
            reuse = next((r["psnr"] for r in at_steps if r["method"] == "reuse"), None)
            out.append({"budget": budget, "steps": steps, "method": best["method"], "setting": best["setting"],
                        "psnr": best["psnr"], "plain_psnr": plain["psnr"],
                        "gain_db": round(best["psnr"] - plain["psnr"], 2), "reuse_psnr": reuse})
    return out


def markdown(rows: list[dict], best: list[dict]) -> str:
    lines = ["| budget | N | best Spectrum setting at N (on the pairs) | PSNR (dB) | plain, N = B (dB) "
             "| gain over plain (dB) | reuse at N (dB) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {b['budget']} | {b['steps']} | {b['method']} ({b['setting']}) | {b['psnr']:.2f} "
              f"| {b['plain_psnr']:.2f} | {b['gain_db']:+.2f} | "
              f"{'' if b['reuse_psnr'] is None else format(b['reuse_psnr'], '.2f')} |" for b in best]
    lines += ["", "| budget | N | method | setting | NFE | PSNR (dB) | SSIM | accuracy | speedup (wall) "
              "| calibration PSNR (dB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    top = {}
    for row in rows:
        if row["budget"] is not None:
            top[row["budget"]] = max(top.get(row["budget"], -1.0), row["psnr"])
    for row in rows:
        if row["budget"] is None:
            lines.append(f"| | {row['steps']} | {row['method']} | {row['setting']} | {row['nfe']:g} | ref | ref "
                         f"| {100 * row['accuracy']:.1f}% | 1.00x | |")
            continue
        psnr_text = f"{row['psnr']:.2f}"
        if row["psnr"] == top[row["budget"]]:
            psnr_text = f"**{psnr_text}**"
        calibration_text = f"{row['psnr_calibration']:.2f}" + (" (recommended)" if row["recommended"] else "")
        lines.append(
            f"| {row['budget']} | {row['steps']} | {row['method']} | {row['setting']} "
            f"| {row['nfe']:g}{' !' if row['off_budget'] else ''} | {psnr_text} | {row['ssim']:.4f} "
            f"| {100 * row['accuracy']:.1f}% | {row['speedup_wall']:.2f}x | {calibration_text} |")
    lines.append("")
    lines.append("NFE: counted evaluations of the whole block stack per guidance branch (mean over clips; `!`: "
                 "some clip off the budget). Bold: best PSNR at the budget on the benchmark pairs. "
                 "Recommended: of the settings a user can ask for (not `reuse`), the best PSNR on the held-out "
                 "calibration seeds, a choice made without the pairs.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r["budget"] for r in rows if r["budget"] is not None))
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4.2), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        at_budget = [r for r in rows if r["budget"] == budget]
        plain = next(r for r in at_budget if r["method"] == "plain")
        ax.axhline(plain["psnr"], color=FAMILY_STYLE["plain"][0], ls="--", lw=1.2,
                   label=f"plain, {budget} steps")
        for family in SPECTRUM_FAMILIES:
            line = sorted((r["steps"], r["psnr"]) for r in at_budget if r["method"] == family)
            if line:
                colour, marker = FAMILY_STYLE[family]
                ax.plot(*zip(*line), color=colour, marker=marker, label=family, markeredgecolor="k",
                        markeredgewidth=0.4)
        ax.set_title(f"budget {budget} real steps per branch ({STEPS / budget:.1f}x)", fontsize=10)
        ax.set_xticks(sorted({r["steps"] for r in at_budget}))
        ax.set_xlabel("sampler steps N (B of them real)")
        ax.set_ylabel("PSNR vs 50-step output (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def run(num_pairs: int, budgets: list[int], steps: list[int] | None, out_json: Path, threads: int,
        calibration_pairs: int, command: str, quiet: bool = False) -> dict:
    started = time.time()
    for budget in budgets:
        if not 1 <= budget < STEPS:
            raise ValueError(f"--budgets must be in [1, {STEPS - 1}] (real steps of the {STEPS}-step reference), "
                             f"got {budget}")
    if calibration_pairs < 1:
        raise ValueError(f"--calibration_pairs must be >= 1 (the recommendation is chosen on them), "
                         f"got {calibration_pairs}")
    pairs = benchmark_pairs(num_pairs)
    grids = {budget: steps_grid(budget, steps) for budget in budgets}   # bad --steps fail before any work

    def log(message: str) -> None:
        if not quiet:
            tqdm.write(message)

    bench = Bench(threads)
    classifier = load_classifier()
    with tqdm(desc="calibration", unit="setting", disable=quiet) as progress:
        calibration = Calibration(bench, held_out_pairs(calibration_pairs), progress)
        methods = build_methods(grids, calibration, log)
        scores = [None] + [calibration.psnr(m) for m in methods[1:]]
    runs: list[list[dict]] = [[] for _ in methods]
    for (digit, _direction, prompt), seed in tqdm(pairs, desc="frontier", unit="clip", disable=quiet):
        reference = None
        for method, method_runs in zip(methods, runs):
            frames, seconds, nfe, info = bench.sample(method, prompt, seed)
            same = reference is None
            if same:
                reference = frames
            method_runs.append({"seconds": seconds, "nfe": nfe, "info": info,
                                "psnr": None if same else psnr(frames, reference),
                                "ssim": None if same else ssim(frames, reference),
                                "accuracy": digit_accuracy(classifier, frames, digit)})
    full_seconds = statistics.median(r["seconds"] for r in runs[0])
    rows = []
    for method, method_runs, score in zip(methods, runs, scores):
        row = {"steps": method.steps, **summarise(method, method_runs, full_seconds)}
        if method.budget is not None:
            row.update(psnr_calibration=round(score, 4), recommended=False,
                       off_budget=any(r["nfe"] != method.budget for r in method_runs))
        rows.append(row)
    for budget in grids:
        settings = (r for r in rows if r["budget"] == budget and r["method"] not in COMPARATORS)
        max(settings, key=lambda r: r["psnr_calibration"])["recommended"] = True
    off = [f"{r['method']} {r['setting']}" for r in rows if r.get("off_budget")]

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "machine": machine_description(),
        "torch": torch.__version__, "model": "digits-wan (spectrum_xdit/models/assets/digits_wan)",
        "reference_steps": STEPS, "guidance_scale": GUIDANCE, "pairs": num_pairs,
        "steps": {str(budget): grid for budget, grid in grids.items()},
        "calibration_seeds": [s for _, s in calibration.pairs], "off_budget": off,
        "wall_seconds": round(time.time() - started, 1),
    }
    best = summary(rows)
    result = {"meta": meta, "summary": best, "rows": rows}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    title = (f"digits-wan, {num_pairs} clips, reference {STEPS} UniPC steps, guidance {GUIDANCE}; "
             f"{meta['date']}; {meta['machine']}")
    table = markdown(rows, best)
    out_json.with_suffix(".md").write_text(f"{title}\n\n`{command}`\n\n{table}")
    plot(rows, out_json.with_suffix(".png"), title)
    if not quiet:
        print(table)
        if off:
            print(f"WARNING: counted NFE off the budget on some clip: {off}")
        print(f"wrote {out_json}, {out_json.with_suffix('.md')}, {out_json.with_suffix('.png')} "
              f"in {meta['wall_seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2 pairs, budget 7, N = 14 only, 1 calibration pair: an end-to-end check")
    parser.add_argument("--pairs", type=int, default=None, help="(prompt, seed) pairs (default 40; quick 2)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="real steps per branch (default 14 10 7; quick: 7)")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help=f"sampler steps N to spread each budget over, those above it (default per budget: "
                             f"round(r x budget) for r in {DEFAULT_RATIOS}, and {STEPS}; quick: 14)")
    parser.add_argument("--calibration_pairs", type=int, default=None,
                        help="held-out (prompt, seed) pairs the choices are made on (default 4; quick 1)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"output JSON (default {DEFAULT_JSON}; quick: outputs/frontier_quick.json)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.frontier " + " ".join(argv if argv is not None else sys.argv[1:])
    return run(num_pairs=args.pairs if args.pairs is not None else (2 if args.quick else 40),
               budgets=args.budgets or ([7] if args.quick else [14, 10, 7]),
               steps=args.steps or ([14] if args.quick else None),
               out_json=args.json or (Path("outputs/frontier_quick.json") if args.quick else DEFAULT_JSON),
               threads=args.threads,
               calibration_pairs=args.calibration_pairs if args.calibration_pairs is not None else (1 if args.quick else 4),
               command=command.strip())


if __name__ == "__main__":
    main()
