"""`make run`: one tiny Wan2.1-architecture generation with and without Spectrum.

Builds the pipeline locally (no hub), runs 50 guided UniPC steps twice, writes both videos as
GIFs and prints NFE per guidance branch, wall time, speedup and PSNR between the two outputs.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import SpectrumConfig, apply_spectrum, spectrum_stats
from ..media import psnr, write_media
from ..models import build_tiny_wan_pipeline


def _generate(pipe, seed: int, steps: int):
    start = time.perf_counter()
    frames = pipe(prompt="a red fox running through snow", negative_prompt="blurry, low quality",
                  num_inference_steps=steps, height=64, width=64, num_frames=9, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]
    return frames, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    args = parser.parse_args(argv)

    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(leave=False)
    _generate(pipe, args.seed, 2)  # warm-up: first-call allocations and thread start-up
    full, full_seconds = _generate(pipe, args.seed, args.num_inference_steps)
    apply_spectrum(pipe.transformer, SpectrumConfig(num_inference_steps=args.num_inference_steps))
    fast, fast_seconds = _generate(pipe, args.seed, args.num_inference_steps)

    full_path = write_media(f"{args.output_dir}/tiny-wan_none.gif", full)
    fast_path = write_media(f"{args.output_dir}/tiny-wan_spectrum.gif", fast)
    print(f"wrote {full_path} and {fast_path}")
    for branch, stats in spectrum_stats(pipe.transformer).items():
        print(f"{branch:>7}: NFE {stats['nfe']}/{args.num_inference_steps} (real steps {stats['real_steps']})")
    print(f"wall time: none {full_seconds:.2f} s, spectrum {fast_seconds:.2f} s, "
          f"speedup {full_seconds / fast_seconds:.2f}x")
    print(f"PSNR spectrum vs none: {psnr(fast, full):.2f} dB")


if __name__ == "__main__":
    main()
