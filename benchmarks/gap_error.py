"""How a forecast's error grows with the gap to the last real step, and what degree and ridge do.

    python -m benchmarks.gap_error              # both trained models, 3 held-out seeds each, < 1 min
    python -m benchmarks.gap_error --json benchmarks/results/gap_error_cpu.json

The evidence for ``spectrum_xdit/error_model.py``. Each model generates held-out (prompt, seed)
pairs (``benchmarks.quality.held_out_pairs``: never scored there) with every step real, and the
block stack's output of every step and guidance branch is kept. Offline, a forecaster is fed the
real steps of a uniform schedule (warm-up 0, 1, 2, then every ``SPACING`` steps) and, after each
of them, forecasts the next ``MAX_GAP`` steps; the relative L2 error against the true feature is
recorded per predictor:

- ``linear``, ``chebyshev``, ``reuse``: the three validated predictors (``SpectrumConfig.predictors``);
- ``blend 0.5``: the reference recipe's blend of the first two;
- ``best combination``: the affine combination of the three with the least error at that very
  step (a lower bound: the controller's weights come from earlier validations).

Per predictor and third of the trajectory, ``p`` is the slope of log(mean error) against log(gap):
the exponent of ``e(g) = k g^p``. The second table scores the degree ``M`` and the ridge
``lambda`` of the fit the same way, over the gaps inside each spacing (the forecasts a schedule of
that spacing makes). Writes the JSON, a Markdown table beside it (``.md``) and a log-log plot of
error against gap (``.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.quality import STEPS, Bench, SpectrumMethod, held_out_pairs, machine_description
from spectrum_xdit import SpectrumConfig, SpectrumForecaster
from spectrum_xdit.control import best_combination

DEFAULT_JSON = Path("benchmarks/results/gap_error_cpu.json")
MODELS = ("digits-wan", "digits-flux")
WARMUP = 3
SPACING = 3
MAX_GAP = 8
THIRDS = ((WARMUP - 1, 17), (17, 33), (33, STEPS))
PREDICTORS = ("linear", "chebyshev", "reuse", "blend 0.5", "best combination")
DEGREES = (2, 3, 4, 6)
RIDGES = (0.01, 0.1, 1.0)
SCORED_SPACINGS = (3, 5)


class TrajectoryMethod(SpectrumMethod):
    """Every step real; keeps each branch's block-stack output per step (flattened, float32)."""

    def __init__(self):
        super().__init__("trajectory", "", None, SpectrumConfig(num_inference_steps=STEPS, warmup_steps=STEPS))
        self.features: dict[str, dict[int, torch.Tensor]] = {}

    def attach(self, transformer) -> None:
        super().attach(transformer)
        from spectrum_xdit.hooks import spectrum_policy

        policy = spectrum_policy(transformer)
        record = policy.record

        def keep(features):
            self.features.setdefault(policy.row.name, {})[policy.row.step] = features.detach().float().reshape(-1)
            record(features)

        policy.record = keep

    def take(self) -> list[torch.Tensor]:
        """Each branch's (STEPS, F) trajectory of the last generation."""
        out = [torch.stack([steps[s] for s in range(STEPS)]) for steps in self.features.values()]
        self.features = {}
        return out


def capture(model: str, pairs: int, threads: int, quiet: bool) -> list[torch.Tensor]:
    bench = Bench(threads, model)
    method = TrajectoryMethod()
    trajectories = []
    for prompt, seed in tqdm(held_out_pairs(pairs, bench.model.conditions()), desc=f"{model} trajectories",
                             disable=quiet):
        bench.sample(method, prompt, seed)
        trajectories.extend(method.take())
    return trajectories


def predictor_errors(forecaster: SpectrumForecaster, step: int, truth: torch.Tensor) -> list[float]:
    """Relative errors at ``step`` of the entries of ``PREDICTORS``."""
    errors = torch.stack([forecaster.forecast(step, 0.0), forecaster.forecast(step, 1.0),
                          forecaster.last_feature.reshape(-1)]) - truth
    gram = (errors.double() @ errors.double().T).numpy() / float(truth.double().norm()) ** 2
    best = best_combination(gram)
    blend = np.array([0.5, 0.5, 0.0])
    return [*np.sqrt(np.diag(gram)), np.sqrt(blend @ gram @ blend), np.sqrt(max(best @ gram @ best, 0.0))]


def schedule(spacing: int) -> list[int]:
    return list(range(WARMUP)) + list(range(WARMUP - 1 + spacing, STEPS, spacing))


def errors_by_gap(trajectories: list[torch.Tensor], config: SpectrumConfig, spacing: int,
                  max_gap: int) -> dict[tuple[int, int], list[list[float]]]:
    """(anchor real step, gap) -> per trajectory, the errors of every predictor."""
    out: dict[tuple[int, int], list[list[float]]] = {}
    for h in trajectories:
        forecaster = SpectrumForecaster(config)
        for i, anchor in enumerate(schedule(spacing)):
            forecaster.update(anchor, h[anchor])
            if i < WARMUP - 1:
                continue
            for gap in range(1, min(max_gap, STEPS - 1 - anchor) + 1):
                out.setdefault((anchor, gap), []).append(predictor_errors(forecaster, anchor + gap, h[anchor + gap]))
    return out


def exponents(errors: dict[tuple[int, int], list[list[float]]]) -> list[dict]:
    """Per third of the trajectory: mean error per gap and the fitted exponent, per predictor."""
    rows = []
    for lo, hi in THIRDS:
        by_gap = {}
        for gap in range(1, MAX_GAP + 1):
            samples = [e for (anchor, g), runs in errors.items() if g == gap and lo <= anchor < hi for e in runs]
            if samples:
                by_gap[gap] = np.mean(samples, axis=0)
        gaps = np.array(sorted(by_gap))
        for j, name in enumerate(PREDICTORS):
            mean = np.array([by_gap[g][j] for g in gaps])
            slope = float(np.polyfit(np.log(gaps), np.log(mean), 1)[0])
            rows.append({"anchors": [lo, hi], "predictor": name, "exponent": round(slope, 3),
                         "mean_error_by_gap": {int(g): round(float(e), 5) for g, e in zip(gaps, mean)}})
    return rows


def degree_ridge(trajectories: list[torch.Tensor]) -> list[dict]:
    rows = []
    for degree in DEGREES:
        for ridge in RIDGES:
            config = SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto", degree=degree, ridge_lambda=ridge)
            samples = [e for spacing in SCORED_SPACINGS
                       for runs in errors_by_gap(trajectories, config, spacing, spacing - 1).values() for e in runs]
            mean = np.mean(samples, axis=0)
            rows.append({"degree": degree, "ridge_lambda": ridge, "chebyshev": round(float(mean[1]), 5),
                         "best_combination": round(float(mean[4]), 5)})
    return rows


def markdown(result: dict) -> str:
    lines = []
    for model, part in result["models"].items():
        lines += [f"### {model}", "", "Exponent p of e(g) = k g^p (gaps 1 to %d, spacing %d), by the real step the "
                  "forecasts start from:" % (MAX_GAP, SPACING), "",
                  "| predictor | " + " | ".join(f"steps {lo}-{hi - 1}" for lo, hi in THIRDS) + " |",
                  "|---|" + "---|" * len(THIRDS)]
        for name in PREDICTORS:
            cells = [f"{r['exponent']:.2f}" for r in part["exponents"] if r["predictor"] == name]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", f"Mean relative error over the gaps inside spacings {SCORED_SPACINGS}:", "",
                  "| degree | ridge lambda | chebyshev | best combination |", "|---|---|---|---|"]
        lines += [f"| {r['degree']} | {r['ridge_lambda']} | {r['chebyshev']:.4f} | {r['best_combination']:.4f} |"
                  for r in part["degree_ridge"]]
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, (model, part) in zip(axes[0], models.items()):
        middle = [row for row in part["exponents"] if row["anchors"] == list(THIRDS[1])]
        for row in middle:
            ax.loglog(list(row["mean_error_by_gap"]), list(row["mean_error_by_gap"].values()), "o-",
                      label=f"{row['predictor']} (p {row['exponent']:.2f})")
        g = np.arange(1, MAX_GAP + 1)
        e1 = middle[PREDICTORS.index("blend 0.5")]["mean_error_by_gap"][1]
        ax.loglog(g, e1 * g, "k:", label="slope 1")
        ax.loglog(g, e1 * g ** 2, "k--", label="slope 2")
        ax.set_xticks(g, [str(v) for v in g])
        ax.minorticks_off()
        ax.set(title=f"{model}: forecasts from steps {THIRDS[1][0]}-{THIRDS[1][1] - 1}", xlabel="gap (steps)",
               ylabel="relative L2 error")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(models: list[str], pairs: int, threads: int, out_json: Path, command: str, quiet: bool = False) -> dict:
    started = time.time()
    result = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
                       "torch": torch.__version__, "pairs": pairs, "steps": STEPS, "warmup": WARMUP,
                       "spacing": SPACING},
              "models": {}}
    for model in models:
        trajectories = capture(model, pairs, threads, quiet)
        config = SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto")
        result["models"][model] = {"exponents": exponents(errors_by_gap(trajectories, config, SPACING, MAX_GAP)),
                                   "degree_ridge": degree_ridge(trajectories)}
    result["meta"]["machine"] = machine_description()
    result["meta"]["wall_seconds"] = round(time.time() - started, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    out_json.with_suffix(".md").write_text(f"{result['meta']['date']}; {result['meta']['machine']}\n\n`{command}`\n\n{table}")
    plot(result, out_json.with_suffix(".png"))
    if not quiet:
        print(table)
        print(f"wrote {out_json}, {out_json.with_suffix('.md')}, {out_json.with_suffix('.png')} "
              f"in {result['meta']['wall_seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--pairs", type=int, default=3, help="held-out (prompt, seed) pairs per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    command = "python -m benchmarks.gap_error " + " ".join(argv if argv is not None else sys.argv[1:])
    return run(args.models, args.pairs, args.threads, args.json, command.strip())


if __name__ == "__main__":
    main()
