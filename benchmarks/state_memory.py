"""Per-rank forecaster memory at the feature shapes of Wan2.1-T2V-14B.

    python -m benchmarks.state_memory                 # allocates up to --max_gib, ~1 min
    python -m benchmarks.state_memory --max_gib 0     # analytic figures only

Wan2.1-14B: hidden size 5120, patch (1, 2, 2) on latents of a VAE with strides (4, 8, 8), so an
``H x W`` video of ``T`` frames has ``((T - 1) / 4 + 1) * (H / 16) * (W / 16)`` tokens: 32,760 at
480x832x81 and 75,600 at 1280x720x81. A sequence-parallel rank holds ``ceil(tokens / degree)`` of
them (xDiT pads the sequence to a multiple of the degree). Classifier-free guidance gives two
branches, each with its own forecaster on every rank (with CFG parallelism each rank would hold one).

For every layout the table gives the state of this implementation for the two branches, in bf16
(the dtype Wan2.1-14B runs in) and the default config (degree 4, blend 0.5): ``P = 5`` float32
moments plus the last two features, ``F * (4 P + 2 * 2)`` bytes per branch. Where the two branches
fit under ``--max_gib`` the figure is measured: two real ``SpectrumForecaster`` objects are fed
bf16 features of the true per-rank shape and their ``nbytes`` is read (and checked against the
formula); elsewhere it is the formula, marked "analytic". Next to it: the reference
implementation's peak at its last refit of a 50-step paper-schedule run (K = 14 real steps): the
bf16 history ``K F 2`` plus its float32 copy ``K F 4`` plus the float32 coefficients ``P F 4``
(the same accounting ``benchmarks.forecaster`` measures on real tensors at F = 1e8).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from spectrum_xdit import SpectrumConfig, SpectrumForecaster, paper_schedule

HIDDEN = 5120
RESOLUTIONS = {"480x832": (480, 832), "1280x720": (720, 1280)}  # name: (height, width)
FRAMES = 81
DEGREES = (1, 2, 4, 8)
BRANCHES = 2
DEFAULT_JSON = Path("benchmarks/results/state_memory_wan14b.json")
GIB = 1024 ** 3


def wan_tokens(height: int, width: int, frames: int) -> int:
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def ours_bytes(features: int, config: SpectrumConfig, itemsize: int) -> int:
    moments = config.num_basis * 4 if config.blend_weight > 0 else 0
    last_two = 2 * itemsize if config.blend_weight < 1 else 0
    return features * (moments + last_two)


def reference_peak_bytes(features: int, config: SpectrumConfig, itemsize: int, real_steps: int) -> int:
    return features * (real_steps * itemsize + real_steps * 4 + config.num_basis * 4)


def measure(tokens: int, config: SpectrumConfig) -> int:
    """Two branches' forecasters fed two bf16 features of shape (1, tokens, 5120); total nbytes."""
    total = 0
    generator = torch.Generator().manual_seed(0)
    for _ in range(BRANCHES):
        forecaster = SpectrumForecaster(config)
        feature = torch.empty(1, tokens, HIDDEN, dtype=torch.bfloat16)
        for step in (0, 1):
            feature.normal_(generator=generator)
            forecaster.update(step, feature)
        del feature
        total += forecaster.nbytes
        forecaster.reset()
    return total


def table(max_gib: float, config: SpectrumConfig) -> list[dict]:
    real_steps = len(paper_schedule(config.num_inference_steps, config.warmup_steps, config.window_size,
                                    config.flex_window))
    rows = []
    for name, (height, width) in RESOLUTIONS.items():
        tokens = wan_tokens(height, width, FRAMES)
        for degree in DEGREES:
            local = math.ceil(tokens / degree)
            features = local * HIDDEN
            formula = BRANCHES * ours_bytes(features, config, 2)
            # measured where the state plus one bf16 feature in flight fit under the budget
            fits = formula + features * 2 <= max_gib * GIB
            measured = measure(local, config) if fits else None
            if measured is not None and measured != formula:
                raise AssertionError(f"{name} degree {degree}: measured {measured} B, formula {formula} B")
            reference = BRANCHES * reference_peak_bytes(features, config, 2, real_steps)
            rows.append({
                "resolution": name, "frames": FRAMES, "tokens": tokens, "sp_degree": degree,
                "tokens_per_rank": local, "features_per_rank": features,
                "ours_bytes": measured if measured is not None else formula,
                "ours_source": "measured" if measured is not None else "analytic",
                "reference_peak_bytes": reference, "reference_real_steps": real_steps,
                "ratio": round(reference / formula, 2),
            })
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| resolution, 81 frames | SP degree | tokens per rank | ours, 2 branches (GiB) | source "
             "| reference peak, 2 branches (GiB) | reference / ours |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} ({r['tokens']} tokens) | {r['sp_degree']} | {r['tokens_per_rank']} "
                     f"| {r['ours_bytes'] / GIB:.2f} | {r['ours_source']} | {r['reference_peak_bytes'] / GIB:.2f} "
                     f"| {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_gib", type=float, default=6.0,
                        help="allocate real state only where the two branches fit under this (GiB)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if args.max_gib < 0:
        parser.error("--max_gib must be >= 0")
    config = SpectrumConfig()
    rows = table(args.max_gib, config)
    command = "python -m benchmarks.state_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": command.strip(),
            "config": config.model_dump(), "dtype": "bfloat16", "hidden": HIDDEN, "branches": BRANCHES}
    result = {"meta": meta, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(rows)
    args.json.with_suffix(".md").write_text(f"Wan2.1-T2V-14B feature shapes, bf16, default SpectrumConfig; "
                                            f"{meta['date']}\n\n`{meta['command']}`\n\n{text}")
    print(text)
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
