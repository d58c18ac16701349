"""`make run`: the trained digits model (a Wan2.1-architecture transformer, see
spectrum_xdit/models/digits_wan.py) on two gloo ranks with xDiT's Ulysses=2, once without and once
with Spectrum, through `torchrun ... spectrum-xdit generate`.

Writes both videos and reports under --output_dir and prints NFE per guidance branch, denoising
wall time, speedup, per-rank forecaster state and PSNR between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
from skimage.metrics import peak_signal_noise_ratio

from ..parallel.testing import free_port


def _launch(method: str, args, out: Path) -> dict:
    stem = out / f"digits-wan_{method}"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               "--master_port", str(args.master_port), "-m", "spectrum_xdit.launch.cli", "generate",
               "--ulysses_degree", str(args.nproc), "--cache_method", method, "--prompt", args.prompt,
               "--seed", str(args.seed), "--num_inference_steps", str(args.num_inference_steps),
               "--output", f"{stem}.gif", "--report", f"{stem}.json"]
    print("$", " ".join(command[2:]), flush=True)
    # one thread per rank, as torchrun would set (and announce) by itself
    subprocess.run(command, check=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(Path(f"{stem}.json").read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--prompt", default="digit 7 moving right")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--master_port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    args.master_port = args.master_port or free_port()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    reports = {method: _launch(method, args, out) for method in ("none", "spectrum")}
    full = iio.imread(out / "digits-wan_none.gif") / 255.0
    fast = iio.imread(out / "digits-wan_spectrum.gif") / 255.0
    print(f"\nmodel digits-wan, {args.num_inference_steps} UniPC steps, guidance 5.0, "
          f"{args.nproc} gloo ranks, Ulysses={args.nproc}")
    for method, report in reports.items():
        nfe = ", ".join(f"{branch} {count}" for branch, count in report["nfe"].items())
        print(f"{method:>9}: NFE per branch {nfe}; denoise {report['denoise_seconds']:.2f} s; "
              f"total {report['total_seconds']:.2f} s; forecaster state per rank "
              f"{report['state_bytes_per_rank'] / 1024:.0f} KiB")
    speedup = reports["none"]["denoise_seconds"] / reports["spectrum"]["denoise_seconds"]
    print(f"speedup (denoising wall time): {speedup:.2f}x")
    print(f"PSNR spectrum vs none: {peak_signal_noise_ratio(full, fast, data_range=1.0):.2f} dB")
    print(f"outputs: {out / 'digits-wan_none.gif'}, {out / 'digits-wan_spectrum.gif'}")


if __name__ == "__main__":
    main()
