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
4. A real step: one forward of a Wan2.1-14B-shaped ``WanTransformer3DModel`` (40 blocks, 40
   heads x 128, FFN 13824) with random bf16 weights at ``--frames`` latent frames, so the forecast
   can be stated as a fraction of a real step.

``--small`` shrinks every size (features, model) so the whole script runs on a CPU in about a
minute: a rehearsal of the code path, not a measurement. Prints a table per section and writes
everything to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from numpy.polynomial.chebyshev import chebvander

from benchmarks.forecaster import REAL_STEPS, ReferenceStyleForecaster
from spectrum_xdit import SpectrumConfig, SpectrumForecaster, paper_schedule

HIDDEN = 5120
WAN14B_TOKENS = 32760   # 480x832, 81 frames
DEGREES = (1, 2, 4, 8)
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "spectrum_vectors.npz"
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6)
SMALL_WAN = dict(WAN14B, num_attention_heads=4, attention_head_dim=16, ffn_dim=128, num_layers=2, text_dim=32,
                 freq_dim=32)


class Clock:
    """Median seconds of a callable, with device synchronisation (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn, repeats: int = 5, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


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


def copy_bandwidth(device: torch.device, clock: Clock, num_bytes: int) -> float:
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = clock(lambda: dst.copy_(src), repeats=10, warmup=2)
    return 2 * num_bytes / seconds


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


def real_step(device: torch.device, clock: Clock, small: bool, frames: int) -> dict:
    from diffusers import WanTransformer3DModel

    config = SMALL_WAN if small else WAN14B
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    h, w = (8, 8) if small else (60, 104)
    hidden = torch.randn(1, 16, frames, h, w, device=device, dtype=dtype)
    text = torch.randn(1, 16 if small else 512, config["text_dim"], device=device, dtype=dtype)
    timestep = torch.tensor([500.0], device=device)
    with torch.no_grad():
        seconds = clock(lambda: model(hidden, timestep, text, return_dict=False), repeats=3, warmup=1)
    tokens = frames * (h // 2) * (w // 2)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"frames": frames, "tokens": tokens, "params": params, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized rehearsal of every section")
    parser.add_argument("--frames", type=int, default=None, help="latent frames of the real step (default 21; small 2)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        parser.error("no CUDA device: run with --small for a CPU rehearsal")
    clock = Clock(device)
    tokens, hidden = (64, 96) if args.small else (WAN14B_TOKENS, HIDDEN)
    frames = args.frames or (2 if args.small else 21)
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": card,
              "torch": torch.__version__, "small": args.small}
    t0 = time.time()
    result["accuracy_max_relative_error"] = accuracy(device, 10_000 if args.small else 1_000_000)
    print("accuracy (max relative L2 error vs float64):", json.dumps(result["accuracy_max_relative_error"]))
    result["copy_GBps"] = copy_bandwidth(device, clock, (1 << 24) if args.small else (1 << 30)) / 1e9
    result["speed"] = speed(device, clock, tokens, hidden)
    print(f"copy bandwidth {result['copy_GBps']:.1f} GB/s (read + write)")
    print(f"{'SP':>3} {'features':>12} {'update ms':>10} {'forecast ms':>12} {'GB/s':>8} {'of copy':>8} {'state MB':>9}")
    for r in result["speed"]:
        print(f"{r['sp_degree']:>3} {r['features']:>12} {r['update_ms']:>10.2f} {r['forecast_ms']:>12.2f} "
              f"{r['forecast_GBps']:>8.1f} {100 * r['forecast_GBps'] / result['copy_GBps']:>7.0f}% "
              f"{r['state_bytes'] / 1e6:>9.1f}")
    result["memory"] = memory(device, tokens, hidden)
    for r in result["memory"]:
        print(f"peak memory SP {r['sp_degree']}: spectrum {r['spectrum']} B, reference {r['reference']} B")
    result["real_step"] = real_step(device, clock, args.small, frames)
    step = result["real_step"]
    print(f"real step: {step['params'] / 1e9:.2f}B params, {step['tokens']} tokens, {step['seconds'] * 1e3:.1f} ms; "
          f"forecast at SP 1 is {100 * result['speed'][0]['forecast_ms'] / 1e3 / step['seconds']:.1f}% of it")
    result["wall_seconds"] = time.time() - t0
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
