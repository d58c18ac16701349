"""The budget schedule's tail: how many consecutive real steps to keep at the end, on held-out seeds.

    python -m benchmarks.budget_tail                       # digits-wan, 6 held-out pairs, < 1 min
    python -m benchmarks.budget_tail --model digits-flux
    python -m benchmarks.budget_tail --json benchmarks/results/budget_tail_cpu.json

``SpectrumConfig.budget_tail`` is a share of ``target_nfe`` spent on consecutive real steps at the
end of the trajectory (``spectrum_xdit/control.py``). Its default was chosen here, on
``benchmarks.quality.held_out_pairs`` (seeds that the quality benchmark never scores): every share
of ``--shares`` at every budget of ``--budgets``, the budget schedule with the auto blend and the
quality benchmark's warm-up, scored by PSNR against the 50-step full-compute sample of the same
seed. Writes the JSON and a Markdown table beside it (``.md``), with the real steps of the first
pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from benchmarks.quality import (BENCH_MODELS, BUDGET_WARMUP, STEPS, Bench, Method, SpectrumMethod, held_out_pairs,
                                machine_description, psnr)
from spectrum_xdit import SpectrumConfig

SHARES = (0.0, 0.15, 0.2, 0.3)
BUDGETS = (14, 10, 7)


def budget_method(budget: int, share: float) -> SpectrumMethod:
    config = SpectrumConfig(num_inference_steps=STEPS, target_nfe=budget, warmup_steps=BUDGET_WARMUP,
                            blend_weight="auto", budget_tail=share)
    return SpectrumMethod("spectrum-budget", f"target_nfe {budget}, budget_tail {share}", budget, config)


def run(model: str, pairs: int, budgets: list[int], shares: list[float], threads: int, out_json: Path,
        command: str, quiet: bool = False) -> dict:
    started = time.time()
    bench = Bench(threads, model)
    held_out = held_out_pairs(pairs, bench.model.conditions())
    full = Method("full", f"{STEPS} steps")
    references = {pair: bench.sample(full, *pair)[0] for pair in tqdm(held_out, desc="references", disable=quiet)}
    rows = []
    for budget in budgets:
        for share in tqdm(shares, desc=f"target_nfe {budget}", disable=quiet):
            method = budget_method(budget, share)
            scores, first_steps, nfe_max = [], None, 0.0
            for pair in held_out:
                frames, _, nfe, info = bench.sample(method, *pair)
                scores.append(psnr(frames, references[pair]))
                first_steps = first_steps or info["real_steps"]
                nfe_max = max(nfe_max, nfe)
            rows.append({"budget": budget, "budget_tail": share, "psnr": round(statistics.mean(scores), 3),
                         "nfe_max": nfe_max, "real_steps_first_pair": first_steps})
    result = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                       "machine": machine_description(), "model": model, "steps": STEPS, "pairs": pairs,
                       "seeds": [seed for _, seed in held_out], "warmup_steps": BUDGET_WARMUP,
                       "default_budget_tail": SpectrumConfig.model_fields["budget_tail"].default,
                       "wall_seconds": round(time.time() - started, 1)},
              "rows": rows}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out_json.with_suffix(".md").write_text(table)
    if not quiet:
        print(table)
        print(f"wrote {out_json}, {out_json.with_suffix('.md')} in {result['meta']['wall_seconds']:.0f} s")
    return result


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"{meta['model']}, {meta['pairs']} held-out pairs (seeds {meta['seeds'][0]}-{meta['seeds'][-1]}), "
             f"{meta['steps']} steps; {meta['date']}; {meta['machine']}", "", f"`{meta['command']}`", "",
             "| target_nfe | budget_tail | PSNR (dB) | most NFE | real steps (first pair) |", "|---|---|---|---|---|"]
    best = {}
    for row in result["rows"]:
        if row["budget"] not in best or row["psnr"] > best[row["budget"]]["psnr"]:
            best[row["budget"]] = row
    for row in result["rows"]:
        score = f"**{row['psnr']:.2f}**" if best[row["budget"]] is row else f"{row['psnr']:.2f}"
        lines.append(f"| {row['budget']} | {row['budget_tail']} | {score} | {row['nfe_max']:g} | "
                     f"{', '.join(map(str, row['real_steps_first_pair']))} |")
    lines += ["", f"Bold: best at the budget. The default budget_tail is {meta['default_budget_tail']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(BENCH_MODELS), default="digits-wan")
    parser.add_argument("--pairs", type=int, default=6, help="held-out (prompt, seed) pairs")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None,
                        help="output JSON (default outputs/budget_tail_MODEL.json)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    for budget in args.budgets:
        if not 1 <= budget <= STEPS:
            parser.error(f"--budgets must lie in 1..{STEPS}, got {budget}")
    for share in args.shares:
        if not 0 <= share <= 1:
            parser.error(f"--shares must lie in [0, 1], got {share}")
    command = "python -m benchmarks.budget_tail " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.json or Path(f"outputs/budget_tail_{args.model}.json")
    return run(args.model, args.pairs, args.budgets, args.shares, args.threads, out, command.strip())


if __name__ == "__main__":
    main()
