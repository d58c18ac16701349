"""Micro-benchmark of the forecaster: time and bytes of `update` and `forecast`.

For feature sizes F (elements) and dtypes, times this project's moment-based forecaster next to
a straightforward implementation of the reference's approach (every real feature kept and
concatenated, the whole history copied to float32 at each refit, a solve with F right-hand
sides), and next to this machine's measured memory copy bandwidth.

    python -m benchmarks.forecaster                    # F = 1e6, 1e7, 1e8
    python -m benchmarks.forecaster --sizes 1e6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from numpy.polynomial.chebyshev import chebvander

from spectrum_xdit import SpectrumConfig, SpectrumForecaster

REAL_STEPS = [0, 1, 2, 3, 4, 6]   # warm-up plus the first scheduled real step (S = 50)
FORECAST_STEPS = [7, 8, 9]
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


class ReferenceStyleForecaster:
    """The reference's way, written plainly: the history grows with ``torch.cat``; each refit
    converts the whole history to float32 and solves with F right-hand sides."""

    def __init__(self, config: SpectrumConfig):
        self.config = config
        self.steps: list[int] = []
        self.history: torch.Tensor | None = None
        self.coefficients: torch.Tensor | None = None
        self.peak_bytes = 0

    def update(self, step: int, features: torch.Tensor) -> None:
        row = features.reshape(1, -1)
        self.history = row.clone() if self.history is None else torch.cat([self.history, row])
        self.steps.append(step)
        self.coefficients = None

    def forecast(self, step: int) -> torch.Tensor:
        cfg = self.config
        device = self.history.device       # the design matrices go where the history is
        if self.coefficients is None:
            history32 = self.history.float()
            X = torch.from_numpy(chebvander(2.0 * np.array(self.steps) / cfg.num_inference_steps - 1,
                                            cfg.degree)).float().to(device)
            gram = X.T @ X + cfg.ridge_lambda * torch.eye(cfg.num_basis, device=device)
            self.coefficients = torch.linalg.solve(gram, X.T @ history32)
            self.peak_bytes = max(self.peak_bytes, self.history.nbytes + history32.nbytes
                                  + self.coefficients.nbytes)
            del history32
        x = torch.from_numpy(chebvander(np.array([2.0 * step / cfg.num_inference_steps - 1]),
                                        cfg.degree)).float().to(device)
        chebyshev = (x @ self.coefficients)[0]
        k = (step - self.steps[-1]) / (self.steps[-1] - self.steps[-2])
        taylor = self.history[-1].float() + k * (self.history[-1].float() - self.history[-2].float())
        w = cfg.blend_weight
        return ((1 - w) * taylor + w * chebyshev).to(self.history.dtype)

    @property
    def nbytes(self) -> int:
        return 0 if self.history is None else self.history.nbytes


def copy_bandwidth(num_bytes: int = 400_000_000, repeats: int = 5) -> float:
    """Best-of-N bytes moved per second by a device copy (read + write counted)."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * num_bytes / min(times)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(forecaster, num_elements: int, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(num_elements, generator=generator).to(dtype)
    update_times = [_time(lambda s=s: forecaster.update(s, base * (1 + 0.01 * s))) for s in REAL_STEPS]
    forecast_times = [_time(lambda s=s: forecaster.forecast(s)) for s in FORECAST_STEPS]
    return {
        "update_ms": 1e3 * statistics.median(update_times[1:]),
        "forecast_ms": 1e3 * statistics.median(forecast_times[1:]),
        "first_forecast_ms": 1e3 * forecast_times[0],
        "state_bytes": forecaster.nbytes,
        "peak_bytes": getattr(forecaster, "peak_bytes", forecaster.nbytes),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bf16"])
    parser.add_argument("--skip_reference_above", type=float, default=1e8,
                        help="skip the reference-style forecaster above this F (its history and "
                             "float32 copy may not fit in memory)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)

    config = SpectrumConfig()
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"measured copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write)")
    print(f"K = {len(REAL_STEPS)} real steps, forecasts at {FORECAST_STEPS}; medians after the first call\n")
    header = (f"{'F':>8} {'dtype':>7} {'impl':>10} {'update ms':>10} {'forecast ms':>12} {'refit+fcst ms':>14} "
              f"{'fcst GB/s':>10} {'state MB':>9} {'peak MB':>8} {'peak MB K=14':>13}")
    print(header)
    print("-" * len(header))
    rows = []
    for size in args.sizes:
        num_elements = int(size)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            impls = [("spectrum", SpectrumForecaster(config))]
            if size <= args.skip_reference_above:
                impls.append(("reference", ReferenceStyleForecaster(config)))
            for name, forecaster in impls:
                result = measure(forecaster, num_elements, dtype)
                # Bytes a forecast must touch: the moments and the two last features read, the
                # output written (float32 accumulator plus the cast to the feature dtype).
                touched = result["state_bytes"] + num_elements * (4 + dtype.itemsize) if name == "spectrum" else None
                gbps = touched / (result["forecast_ms"] / 1e3) / 1e9 if touched else float("nan")
                peak_at_14 = (result["peak_bytes"] if name == "spectrum" else
                              num_elements * (14 * (dtype.itemsize + 4) + config.num_basis * 4))
                row = {"F": num_elements, "dtype": dtype_name, "impl": name, **result, "forecast_GBps": gbps,
                       "peak_bytes_K14": peak_at_14}
                rows.append(row)
                print(f"{num_elements:>8.0e} {dtype_name:>7} {name:>10} {result['update_ms']:>10.2f} "
                      f"{result['forecast_ms']:>12.2f} {result['first_forecast_ms']:>14.2f} {gbps:>10.2f} "
                      f"{result['state_bytes'] / 1e6:>9.1f} {result['peak_bytes'] / 1e6:>8.1f} "
                      f"{peak_at_14 / 1e6:>13.1f}")
                del forecaster
    print("\nreference: state = history of K features; peak = history + its float32 copy + coefficients"
          " at a refit (the first forecast after each real step).\n'peak MB K=14' is the peak at the"
          " end of a 50-step paper schedule: measured for spectrum (constant in K), exact arithmetic"
          " of the same buffers for the reference.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_bandwidth_Bps": bandwidth, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
