"""GPU validation of the forecaster at Wan2.1-14B feature sizes (issue 7), in one run.

    python -m benchmarks.gpu_check --json benchmarks/results/gpu_check_<card>.json   # on a CUDA GPU
    python -m benchmarks.gpu_check --small                                          # CPU rehearsal

1. Accuracy: the forecaster on the device in float32 and bf16 against a float64 host oracle
   (chebvander design, ridge solve with F right-hand sides, blend, as docs/method.md states it) on
   smooth random trajectories, and the reference vectors (``tests/data/spectrum_vectors.npz``)
   replayed on the device.
2. Speed: ``update`` and ``forecast`` at the per-rank feature sizes of Wan2.1-14B at 480x832x81
   (32,760 tokens x 5120) for a sequence-parallel degree of 1, 2, 4, 8, in bf16, timed with
   device events, with the forecast's achieved bandwidth (state read + output written) against
   a device-to-device copy measured in the same run.
3. Memory: peak device memory of the forecaster state at those sizes (two branches) against the
   reference implementation's history plus its float32 refit copy, measured the reference's way
   (``benchmarks.forecaster.ReferenceStyleForecaster``) at the sizes where it fits.

A real step of the model at a rank's size, to state the forecast against, is
``benchmarks.wan_rank``'s. ``--small`` shrinks every size so that the script runs on a CPU: a
rehearsal of the code path, not a measurement. Prints a table per section and writes the JSON
after every section (``benchmarks.device_run``).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from numpy.polynomial.chebyshev import chebvander

from benchmarks.device_run import Clock, Sections, copy_bandwidth, device_arguments
from benchmarks.forecaster import REAL_STEPS, ReferenceStyleForecaster
from spectrum_xdit import SpectrumConfig, SpectrumForecaster, paper_schedule

HIDDEN = 5120
WAN14B_TOKENS = 32760   # 480x832, 81 frames
DEGREES = (1, 2, 4, 8)
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "spectrum_vectors.npz"
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def _oracle(steps, features64, target, config):
    x = chebvander(2.0 * np.asarray(steps, np.float64) / config.num_inference_steps - 1, config.degree)
    coefficients = np.linalg.solve(x.T @ x + config.ridge_lambda * np.eye(config.num_basis), x.T @ features64)
    xt = chebvander(np.array([2.0 * target / config.num_inference_steps - 1]), config.degree)[0]
    chebyshev = xt @ coefficients
    k = (target - steps[-1]) / (steps[-1] - steps[-2])
    linear = features64[-1] + k * (features64[-1] - features64[-2])
    w = config.blend_weight
    return (1 - w) * linear + w * chebyshev


def accuracy(device: torch.device, features: int) -> dict:
    config = SpectrumConfig()
    real = paper_schedule(50, config.warmup_steps, config.window_size, config.flex_window)
    rng = np.random.default_rng(0)
    base, slope, curve = rng.normal(size=(3, features))
    trajectory = [base + slope * (s / 50) + curve * np.sin(3.0 * s / 50) for s in range(50)]
    out = {}
    for name, dtype in DTYPES.items():
        forecaster = SpectrumForecaster(config)
        seen, worst = [], 0.0
        for step in range(50):
            if step in real:
                forecaster.update(step, torch.from_numpy(trajectory[step]).to(device=device, dtype=dtype))
                # the oracle sees what the device saw: the features rounded to the dtype
                seen.append(torch.from_numpy(trajectory[step]).to(dtype).double().numpy())
                continue
            if len(seen) < 2:
                continue
            got = forecaster.forecast(step).double().cpu().numpy()
            want = _oracle(real[:len(seen)], np.stack(seen), step, config)
            worst = max(worst, float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        out[name] = worst
    data = np.load(REFERENCE)
    case, worst = 0, 0.0
    while f"case{case}_params" in data:
        steps, warmup, window, flex, degree, lam, weight = data[f"case{case}_params"].tolist()
        cfg = SpectrumConfig(num_inference_steps=int(steps), warmup_steps=int(warmup), window_size=window,
                             flex_window=flex, degree=int(degree), ridge_lambda=lam, blend_weight=weight)
        expected = dict(zip(data[f"case{case}_pred_steps"].tolist(), data[f"case{case}_pred"]))
        traj = torch.from_numpy(data[f"case{case}_traj"]).to(device)
        forecaster = SpectrumForecaster(cfg)
        for step in range(cfg.num_inference_steps):
            if step in expected:
                got = forecaster.forecast(step).cpu().numpy()
                worst = max(worst, float(np.linalg.norm(got - expected[step]) / np.linalg.norm(expected[step])))
            else:
                forecaster.update(step, traj[step])
        case += 1
    out["reference_vectors"] = worst
    return out


def speed(device: torch.device, clock: Clock, tokens: int, hidden: int) -> list[dict]:
    config = SpectrumConfig()
    rows = []
    for degree in DEGREES:
        f = math.ceil(tokens / degree) * hidden
        forecaster = SpectrumForecaster(config)
        feature = torch.randn(f, device=device, dtype=torch.bfloat16)
        update = clock(lambda: (forecaster.reset(), [forecaster.update(s, feature) for s in REAL_STEPS]),
                       repeats=3) / len(REAL_STEPS)
        fcst = clock(lambda: forecaster.forecast(REAL_STEPS[-1] + 1), repeats=5)
        moved = forecaster.nbytes + f * 2            # state read + bf16 output written
        rows.append({"sp_degree": degree, "features": f, "update_ms": 1e3 * update, "forecast_ms": 1e3 * fcst,
                     "forecast_GBps": moved / fcst / 1e9, "state_bytes": forecaster.nbytes})
        del forecaster, feature
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def memory(device: torch.device, tokens: int, hidden: int) -> list[dict]:
    """Peak device bytes while two branches' state is built (and, for the reference, refit)."""
    if device.type != "cuda":
        return []
    config = SpectrumConfig()
    real = paper_schedule(50, config.warmup_steps, config.window_size, config.flex_window)
    free = torch.cuda.mem_get_info()[0]
    rows = []
    for degree in DEGREES:
        f = math.ceil(tokens / degree) * hidden
        row = {"sp_degree": degree, "features": f}
        for impl, cls in (("spectrum", SpectrumForecaster), ("reference", ReferenceStyleForecaster)):
            need = 2 * f * (len(real) * 2 + len(real) * 4 + 6 * 4) if impl == "reference" else 2 * f * 40
            if need > 0.8 * free:
                row[impl] = None      # does not fit: see benchmarks.state_memory for the formula
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            feature = torch.randn(f, device=device, dtype=torch.bfloat16)
            forecasters = [cls(config) for _ in range(2)]
            for step in real:
                for forecaster in forecasters:
                    forecaster.update(step, feature)
                if step + 1 < 50 and step + 1 not in real:
                    for forecaster in forecasters:
                        forecaster.forecast(step + 1)
            row[impl] = torch.cuda.max_memory_allocated() - base - f * 2   # minus the input feature
            del forecasters, feature
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args, device = device_arguments(__doc__, argv)
    clock = Clock(device)
    tokens, hidden = (64, 96) if args.small else (WAN14B_TOKENS, HIDDEN)
    sections = Sections(args.json, device, "gpu_check", small=args.small)
    errors = sections.run("accuracy_max_relative_error", accuracy, device, 10_000 if args.small else 1_000_000)
    if errors is not None:
        print("accuracy (max relative L2 error vs float64):", json.dumps(errors))
    copy = sections.run("copy_GBps", lambda: copy_bandwidth(device, clock, (1 << 24) if args.small else (1 << 30)) / 1e9)
    rows = sections.run("speed", speed, device, clock, tokens, hidden)
    if copy is not None and rows is not None:
        print(f"copy bandwidth {copy:.1f} GB/s (read + write)")
        print(f"{'SP':>3} {'features':>12} {'update ms':>10} {'forecast ms':>12} {'GB/s':>8} {'of copy':>8} {'state MB':>9}")
        for r in rows:
            print(f"{r['sp_degree']:>3} {r['features']:>12} {r['update_ms']:>10.2f} {r['forecast_ms']:>12.2f} "
                  f"{r['forecast_GBps']:>8.1f} {100 * r['forecast_GBps'] / copy:>7.0f}% {r['state_bytes'] / 1e6:>9.1f}")
    for r in sections.run("memory", memory, device, tokens, hidden) or []:
        print(f"peak memory SP {r['sp_degree']}: spectrum {r['spectrum']} B, reference {r['reference']} B")
    return sections.finish()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:])["status"])
