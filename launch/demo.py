"""`make run`: one generation of the shipped trained digits model (a Wan2.1-architecture
transformer, see spectrum_xdit/digits_wan.py) with and without Spectrum.

Builds the pipeline from the package's assets (no hub), runs 50 guided UniPC steps twice, writes
both videos as GIFs and prints NFE per guidance branch, denoising wall time (median of repeats),
speedup and PSNR between the two outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .. import SpectrumConfig, apply_spectrum, spectrum_stats
from ..media import psnr, write_media
from ..digits_wan import GENERATION_KWARGS, build_digits_wan_pipeline


def _generate(pipe, prompt: str, seed: int, steps: int, repeats: int = 1):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        frames = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(seed), output_type="np",
                      **GENERATION_KWARGS).frames[0]
        times.append(time.perf_counter() - start)
    return frames, statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--prompt", default="digit 7 moving right")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    args = parser.parse_args(argv)

    pipe = build_digits_wan_pipeline()
    _generate(pipe, args.prompt, args.seed, 2)  # warm-up: first-call allocations and thread start-up
    full, full_seconds = _generate(pipe, args.prompt, args.seed, args.num_inference_steps, args.repeats)
    apply_spectrum(pipe.transformer, SpectrumConfig(num_inference_steps=args.num_inference_steps))
    fast, fast_seconds = _generate(pipe, args.prompt, args.seed, args.num_inference_steps, args.repeats)

    full_path = write_media(f"{args.output_dir}/digits-wan_none.gif", full)
    fast_path = write_media(f"{args.output_dir}/digits-wan_spectrum.gif", fast)
    print(f"wrote {full_path} and {fast_path}")
    for branch, stats in spectrum_stats(pipe.transformer).items():
        print(f"{branch:>7}: NFE {stats['nfe']}/{args.num_inference_steps} (real steps {stats['real_steps']})")
    print(f"wall time: none {full_seconds:.2f} s, spectrum {fast_seconds:.2f} s, "
          f"speedup {full_seconds / fast_seconds:.2f}x")
    print(f"PSNR spectrum vs none: {psnr(fast, full):.2f} dB")


if __name__ == "__main__":
    main()
