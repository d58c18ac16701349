"""The budget schedule's defaults, chosen by a rule across models and samplers, then scored.

    python -m benchmarks.defaults --threads 1 --json benchmarks/results/defaults_cpu.json   # 48 cells, ~35 min
    python -m benchmarks.defaults --quick      # one cell per model, one candidate: < 60 s

(One torch thread: on cores other work shares, two threads wait on each other and ran ~5x slower.)

``SpectrumConfig(target_nfe=N)`` alone takes ``config.BUDGET_DEFAULTS`` and, with ``step_grid``
"auto", the plain sampler of N steps where N is below ``config.PLAIN_GRID_BELOW``. Those values
are chosen here, by the rule below, written down before the run.

**The matrix** (48 cells): both trained models (digits-wan, digits-flux) x three schedulers that
both pipelines accept with a flow-matching shift (``UniPC``, ``FlowMatch Euler``, ``DPM-Solver++``)
x two flow shifts (3, the one the models were trained at, and 6) x two guidance scales (digits-wan
``guidance_scale`` 3 and 5; digits-flux ``true_cfg_scale`` 1.5 and 2) x ``num_inference_steps`` 30
and 50. Each cell's reference is its own sampler at its own step count, full compute.

**The budgets** are ``target_nfe`` 14, 10 and 7 in every cell, as a user sets them: on 50 steps
3.5x, 5x and 7.1x, on 30 steps 2.1x, 3x and 4.3x. The plain sampler of the same NFE is the cell's
sampler run with ``num_inference_steps = target_nfe``. (A first run scaled them to the cell's
steps, 8, 6 and 4 on 30; ``--scaled_budgets`` repeats it.)

**The candidates**: the budget schedule with warm-up 3 and the auto blend, (``budget_tail``,
``reuse``) in ``CANDIDATES``, on the request's step grid.

**The rule** (held-out seeds only, ``benchmarks.quality.held_out_pairs``, never the scored pairs):

1. A candidate's margin in a cell at a budget is its mean PSNR against the cell's reference minus
   the plain sampler's. Its plain grid starts above the largest ``target_nfe`` at which any cell's
   margin is negative (``PLAIN_GRID_BELOW`` = that + 1; 1 if none is): below it the plain sampler
   runs, margin 0 by construction.
2. Choose the candidate of the largest worst-case margin, so counted, over every cell at the
   budgets 14 and 10 (where the goals ask forecasting to win); ties: the larger mean there.

**The scores**: every cell on the scored pairs (``benchmarks.quality.benchmark_pairs``), the
one-flag default (the chosen values) against the plain sampler, at each budget; and the
leave-one-model-out check: the rule applied to one model's held-out cells alone, scored on the
other model's cells. Writes the JSON, a Markdown report (``.md``) and a plot (``.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tqdm import tqdm

from benchmarks.quality import (BENCH_MODELS, STEPS, Bench, Method, SpectrumMethod, benchmark_pairs, held_out_pairs,
                                machine_description, psnr)
from spectrum_xdit.config import BUDGET_DEFAULTS, PLAIN_GRID_BELOW, SpectrumConfig

SCHEDULERS = ("UniPC", "FlowMatch Euler", "DPM-Solver++")
SHIFTS = (3.0, 6.0)
GUIDANCES = {"digits-wan": (3.0, 5.0), "digits-flux": (1.5, 2.0)}
STEP_COUNTS = (30, 50)
BUDGETS = (14, 10, 7)            # of STEPS: the speedups the issue names
FORECAST_BUDGETS = (14, 10)      # where the rule's first step asks forecasting to win
# (budget_tail, reuse): the tail the issue questions (0.2, chosen on digits-wan alone, against 0)
# and the predictor family (with and without reuse), three to fit the run on 2 cores.
CANDIDATES = ((0.2, False), (0.2, True), (0.0, False))
WARMUP = BUDGET_DEFAULTS["warmup_steps"]


SCALED_BUDGETS = False   # --scaled_budgets: the budgets at the same speedup on every step count


def target_nfe(steps: int, budget: int) -> int:
    """The cell's ``target_nfe`` for ``budget``: the budget itself, or (``--scaled_budgets``) the
    budget of 50 at the same speedup on ``steps`` steps."""
    return max(1, round(steps * budget / STEPS)) if SCALED_BUDGETS else min(budget, steps)


def make_scheduler(name: str, shift: float, family: str):
    """A flow-matching scheduler at ``shift``. FluxPipeline passes ``mu`` from the config's
    ``base_shift``/``max_shift``, which are pinned to ``ln shift`` so every size gets ``shift``."""
    mu = math.log(shift)
    if name == "UniPC":
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=shift, num_train_timesteps=1000)
    elif name == "DPM-Solver++":
        # FluxPipeline passes mu, which DPM-Solver takes only with exponential dynamic shifting
        scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=shift, algorithm_type="dpmsolver++", solver_order=2,
                                                num_train_timesteps=1000, use_dynamic_shifting=family == "flux",
                                                time_shift_type="exponential")
    elif name == "FlowMatch Euler":
        if family == "flux":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True,
                                                        base_shift=mu, max_shift=mu)
        else:
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    else:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    if family == "flux":
        scheduler.register_to_config(base_shift=mu, max_shift=mu, base_image_seq_len=64, max_image_seq_len=4096)
    return scheduler


@dataclasses.dataclass(frozen=True)
class Cell:
    model: str
    scheduler: str
    shift: float
    guidance: float
    steps: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.scheduler} shift {self.shift:g} guidance {self.guidance:g} {self.steps} steps"


def matrix(models=tuple(BENCH_MODELS)) -> list[Cell]:
    return [Cell(m, s, shift, g, n) for m in models for s in SCHEDULERS for shift in SHIFTS
            for g in GUIDANCES[m] for n in STEP_COUNTS]


def enter(bench: Bench, cell: Cell) -> None:
    """Point the benchmark's pipeline at the cell's sampler and guidance."""
    base = BENCH_MODELS[cell.model]
    bench.model = dataclasses.replace(base, guidance=cell.guidance, sampler=cell.scheduler)
    bench.pipe.scheduler = make_scheduler(cell.scheduler, cell.shift, base.family)


def candidate_key(tail: float, reuse: bool) -> str:
    return f"tail {tail:g}, reuse {reuse}"


def spectrum(cell: Cell, nfe: int, tail: float, reuse: bool) -> SpectrumMethod:
    """A candidate on the request's grid."""
    config = SpectrumConfig(num_inference_steps=cell.steps, target_nfe=nfe, warmup_steps=WARMUP, blend_weight="auto",
                            reuse=reuse, budget_tail=tail, step_grid="request")
    return SpectrumMethod("spectrum-budget", f"target_nfe {nfe}, {candidate_key(tail, reuse)}", nfe, config)


def one_flag(cell: Cell, nfe: int, choice: dict) -> SpectrumMethod:
    """What ``target_nfe`` alone runs once config.py holds ``choice``: the shipped
    ``SpectrumConfig(num_inference_steps, target_nfe)`` where it does, else the choice spelled out."""
    if shipped_match(choice):
        config = SpectrumConfig(num_inference_steps=cell.steps, target_nfe=nfe).on_step_grid()
    else:
        plain = nfe < cell.steps and nfe < choice["plain_grid_below_nfe"]
        config = SpectrumConfig(num_inference_steps=nfe if plain else cell.steps, target_nfe=nfe, step_grid="request",
                                budget_tail=choice["budget_tail"], reuse=choice["reuse"])
    return SpectrumMethod("default", f"target_nfe {nfe}", nfe, config)


def shipped_match(choice: dict) -> bool:
    shipped = SpectrumConfig(target_nfe=1)
    return (shipped.budget_tail == choice["budget_tail"] and shipped.reuse == choice["reuse"]
            and PLAIN_GRID_BELOW == choice["plain_grid_below_nfe"])


def sample_psnr(bench: Bench, method: Method, pair, reference) -> tuple[float, float]:
    frames, _, nfe, _ = bench.sample(method, *pair)
    return psnr(frames, reference), nfe


def held_out_cell(bench: Bench, cell: Cell, pairs: list, candidates: list[tuple[float, bool]]) -> dict:
    """Mean held-out PSNR of plain and every candidate at every budget."""
    scores: dict[str, dict[int, list[float]]] = {}
    for pair in pairs:
        reference = bench.sample(Method("full", f"{cell.steps} steps", steps=cell.steps), *pair)[0]
        for budget in BUDGETS:
            nfe = target_nfe(cell.steps, budget)
            scores.setdefault("plain", {}).setdefault(budget, []).append(
                sample_psnr(bench, Method("plain", f"{nfe} steps", nfe, steps=nfe), pair, reference)[0])
            for tail, reuse in candidates:
                scores.setdefault(candidate_key(tail, reuse), {}).setdefault(budget, []).append(
                    sample_psnr(bench, spectrum(cell, nfe, tail, reuse), pair, reference)[0])
    return {key: {str(b): round(statistics.fmean(v), 3) for b, v in by_budget.items()}
            for key, by_budget in scores.items()}


def choose(held_out: dict[str, dict], candidates: list[tuple[float, bool]]) -> dict:
    """The rule of the module docstring, on the held-out scores of the cells given."""
    def plan(key):
        pairs = [(target_nfe(cell["steps"], b), cell["scores"][key][str(b)] - cell["scores"]["plain"][str(b)])
                 for cell in held_out.values() for b in BUDGETS]
        below = max((nfe for nfe, m in pairs if m < 0), default=0) + 1
        forecast = [[0.0 if target_nfe(cell["steps"], b) < below else
                     cell["scores"][key][str(b)] - cell["scores"]["plain"][str(b)] for cell in held_out.values()]
                    for b in FORECAST_BUDGETS]
        flat = [m for level in forecast for m in level]
        return below, min(flat), statistics.fmean(flat)

    plans = {c: plan(candidate_key(*c)) for c in candidates}
    ranked = sorted(candidates, key=lambda c: plans[c][1:])
    tail, reuse = ranked[-1]
    return {"budget_tail": tail, "reuse": reuse, "plain_grid_below_nfe": plans[ranked[-1]][0],
            "ranking": [{"candidate": candidate_key(*c), "plain_grid_below_nfe": plans[c][0],
                         "worst_14_10": round(plans[c][1], 3), "mean_14_10": round(plans[c][2], 3)}
                        for c in reversed(ranked)]}


def scored_cell(bench: Bench, cell: Cell, pairs: list, choices: dict[str, dict]) -> dict:
    """PSNR of plain and of the one-flag default under each choice (named), per budget."""
    out: dict[str, dict[str, list]] = {}
    for (_, _, prompt), seed in pairs:
        pair = (prompt, seed)
        reference = bench.sample(Method("full", f"{cell.steps} steps", steps=cell.steps), *pair)[0]
        for budget in BUDGETS:
            nfe = target_nfe(cell.steps, budget)
            score, used = sample_psnr(bench, Method("plain", f"{nfe} steps", nfe, steps=nfe), pair, reference)
            out.setdefault("plain", {}).setdefault(str(budget), []).append(score)
            done = {}
            for name, choice in choices.items():
                method = one_flag(cell, nfe, choice)
                signature = (method.config.num_inference_steps, method.config.model_dump_json())
                if signature not in done:
                    done[signature] = sample_psnr(bench, method, pair, reference)
                score, used = done[signature]
                if used > nfe + 1e-9:
                    raise RuntimeError(f"{cell.name}: {name} used NFE {used} over target_nfe {nfe}")
                out.setdefault(name, {}).setdefault(str(budget), []).append(score)
                out.setdefault(f"{name} steps run", {})[str(budget)] = [method.config.num_inference_steps]
    return {key: {b: round(statistics.fmean(v), 3) for b, v in by_budget.items()} for key, by_budget in out.items()}


def run(held_out_count: int, scored_count: int, cells: list[Cell], candidates: list[tuple[float, bool]],
        threads: int, out_json: Path, command: str, quiet: bool = False) -> dict:
    started = time.time()
    benches = {model: Bench(threads, model) for model in sorted({c.model for c in cells})}
    # the held-out scores so far, so that a run cut short resumes where it stopped
    saved = Path("outputs") / f"{out_json.stem}_held_out.json"
    key = json.dumps({"pairs": held_out_count, "candidates": candidates, "scaled_budgets": SCALED_BUDGETS})
    held_out = json.loads(saved.read_text()).get(key, {}) if saved.exists() else {}
    for cell in tqdm(cells, desc="held-out", disable=quiet):
        if cell.name in held_out:
            continue
        bench = benches[cell.model]
        enter(bench, cell)
        held_out[cell.name] = {"steps": cell.steps, "scores": held_out_cell(
            bench, cell, held_out_pairs(held_out_count, bench.model.conditions()), candidates)}
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({key: held_out}))
    held_out = {cell.name: held_out[cell.name] for cell in cells}
    models = sorted(benches)
    choices = {"all": choose(held_out, candidates)}
    for model in models:
        choices[f"chosen on {model}"] = choose({k: v for k, v in held_out.items() if k.startswith(model + " ")},
                                               candidates)
    scored = {}
    for cell in tqdm(cells, desc="scored", disable=quiet):
        bench = benches[cell.model]
        enter(bench, cell)
        others = {f"chosen on {m}": choices[f"chosen on {m}"] for m in models if m != cell.model}
        scored[cell.name] = scored_cell(bench, cell, benchmark_pairs(scored_count, bench.model.conditions()),
                                        {"default": choices["all"], **others})
    shipped = SpectrumConfig(target_nfe=1)
    result = {
        "meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                 "machine": machine_description(), "held_out_pairs": held_out_count, "scored_pairs": scored_count,
                 "budgets_of_50": list(BUDGETS), "warmup_steps": WARMUP,
                 "candidates": [candidate_key(*c) for c in candidates],
                 "shipped_defaults": {"budget_tail": shipped.budget_tail, "reuse": shipped.reuse,
                                      "plain_grid_below_nfe": PLAIN_GRID_BELOW},
                 "shipped_defaults_match": shipped_match(choices["all"]),
                 "wall_seconds": round(time.time() - started, 1)},
        "choices": choices, "cells": [{**dataclasses.asdict(c), "name": c.name, "held_out": held_out[c.name]["scores"],
                                       "scored": scored[c.name]} for c in cells],
    }
    result["goals"] = goals(result)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    out_json.with_suffix(".md").write_text(report)
    plot(result, out_json.with_suffix(".png"))
    if not quiet:
        print(report)
        print(f"wrote {out_json}, {out_json.with_suffix('.md')}, {out_json.with_suffix('.png')} "
              f"in {result['meta']['wall_seconds']:.0f} s")
    return result


def margin(cell: dict, name: str, budget: int) -> float:
    return round(cell["scored"][name][str(budget)] - cell["scored"]["plain"][str(budget)], 3)


def goals(result: dict) -> dict:
    """Cells meeting the issue's goals with the one-flag default: >= 1 dB over plain at 14 and 10,
    >= 0 at 7; and the leave-one-model-out choice's worst margins."""
    cells = result["cells"]
    out = {"cells": len(cells)}
    for budget, least in ((14, 1.0), (10, 1.0), (7, 0.0)):
        margins = [margin(c, "default", budget) for c in cells]
        out[str(budget)] = {"goal_db": least, "met": sum(m >= least for m in margins), "worst": min(margins),
                            "mean": round(statistics.fmean(margins), 3)}
    for name in (k for k in result["choices"] if k.startswith("chosen on")):
        scored = [c for c in cells if name in c["scored"]]
        if scored:
            out[f"{name}, scored on the other model"] = {
                str(b): {"worst": min(margin(c, name, b) for c in scored),
                         "mean": round(statistics.fmean(margin(c, name, b) for c in scored), 3)} for b in BUDGETS}
    return out


def markdown(result: dict) -> str:
    meta, chosen = result["meta"], result["choices"]["all"]
    lines = [f"{len(result['cells'])} cells, {meta['held_out_pairs']} held-out pairs to choose, "
             f"{meta['scored_pairs']} scored pairs per cell; {meta['date']}; {meta['machine']}", "",
             f"`{meta['command']}`", "",
             "Chosen (all cells): " + ", ".join(f"{k} {chosen[k]}" for k in ("budget_tail", "reuse",
                                                                             "plain_grid_below_nfe"))
             + f"; shipped defaults {meta['shipped_defaults']} (match: {meta['shipped_defaults_match']})", "",
             "Held-out ranking (margin over plain at target_nfe 14 and 10, dB, plain grid below the NFE given): "
             + "; ".join(f"{r['candidate']}: below {r['plain_grid_below_nfe']}, worst {r['worst_14_10']:+.2f}, "
                         f"mean {r['mean_14_10']:+.2f}" for r in chosen["ranking"]), ""]
    for name, choice in result["choices"].items():
        if name != "all":
            lines.append(f"{name}: budget_tail {choice['budget_tail']}, reuse {choice['reuse']}, "
                         f"plain grid below target_nfe {choice['plain_grid_below_nfe']}")
    lines += ["", "| cell | " + " | ".join(f"plain {b} | default {b} | margin {b}" for b in BUDGETS) + " | steps run |",
              "|---|" + "---|---|---|" * len(BUDGETS) + "---|"]
    for cell in result["cells"]:
        s = cell["scored"]
        row = " | ".join(f"{s['plain'][str(b)]:.2f} | {s['default'][str(b)]:.2f} | {margin(cell, 'default', b):+.2f}"
                         for b in BUDGETS)
        steps = ", ".join(f"{target_nfe(cell['steps'], b)}: {int(s['default steps run'][str(b)])}" for b in BUDGETS)
        lines.append(f"| {cell['name']} | {row} | {steps} |")
    g = result["goals"]
    lines += ["", "Goals with the one-flag default (margin over the plain sampler of the same NFE, scored pairs):"]
    for b in BUDGETS:
        lines.append(f"- target_nfe {b}: {g[str(b)]['met']}/{g['cells']} cells >= {g[str(b)]['goal_db']:g} dB; "
                     f"worst {g[str(b)]['worst']:+.2f} dB, mean {g[str(b)]['mean']:+.2f} dB")
    for key, value in g.items():
        if key.startswith("chosen on"):
            lines.append(f"- {key}: " + "; ".join(f"{b}: worst {v['worst']:+.2f}, mean {v['mean']:+.2f}"
                                                  for b, v in value.items()))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = [c["name"] for c in result["cells"]]
    for offset, (budget, colour) in enumerate(zip(BUDGETS, ("tab:blue", "tab:orange", "tab:red"))):
        ax.bar([i + (offset - 1) * 0.27 for i in range(len(names))],
               [margin(c, "default", budget) for c in result["cells"]], width=0.27, color=colour,
               label=f"target_nfe {budget}")
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(names)), [n.replace(" shift", "\nshift").replace(" guidance", " g") for n in names],
                  rotation=90, fontsize=5)
    ax.set_ylabel("one-flag default minus plain (dB)")
    ax.legend(fontsize=8)
    fig.suptitle(f"target_nfe alone vs the plain sampler of the same NFE; {result['meta']['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one cell per model (UniPC, shift 3, 30 steps), one candidate, one pair each: a smoke test")
    parser.add_argument("--held-out", type=int, default=None, help="held-out pairs per cell for the choice (default 1)")
    parser.add_argument("--pairs", type=int, default=None, help="scored pairs per cell (default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaled_budgets", action="store_true",
                        help="target_nfe at the speedup of 14, 10, 7 of 50 on every step count (8, 6, 4 on 30)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default benchmarks/results/defaults_cpu.json; quick: outputs/defaults_quick.json)")
    args = parser.parse_args(argv)
    global SCALED_BUDGETS
    SCALED_BUDGETS = args.scaled_budgets
    cells = matrix()
    candidates = list(CANDIDATES)
    if args.quick:
        cells = [c for c in cells if c.scheduler == "UniPC" and c.shift == SHIFTS[0] and c.steps == 30
                 and c.guidance == GUIDANCES[c.model][-1]]
        candidates = [(BUDGET_DEFAULTS["budget_tail"], BUDGET_DEFAULTS["reuse"])]
    held = args.held_out if args.held_out is not None else 1
    pairs = args.pairs if args.pairs is not None else 1
    if held < 1 or pairs < 1:
        parser.error(f"--held-out and --pairs must be >= 1, got {held} and {pairs}")
    out = args.json or (Path("outputs/defaults_quick.json") if args.quick else Path("benchmarks/results/defaults_cpu.json"))
    command = "python -m benchmarks.defaults " + " ".join(argv if argv is not None else sys.argv[1:])
    return run(held, pairs, cells, candidates, args.threads, out, command.strip())


if __name__ == "__main__":
    main()
