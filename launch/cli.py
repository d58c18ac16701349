"""`spectrum-xdit generate`: one generation, in one process or under torchrun with xDiT's
sequence parallelism, with or without Spectrum. `spectrum-xdit serve`: the same behind an HTTP
API, on Ray Serve (launch/serve.py).

    spectrum-xdit generate --prompt "digit 7 moving left" --output out.gif --report out.json
    torchrun --nproc_per_node=2 --no-python spectrum-xdit generate --ulysses_degree 2 \\
        --cache_method spectrum --output out.gif --report out.json

Argument names follow xDiT's (``--model``, ``--ulysses_degree``, ``--ring_degree``, ...). Every
rank checks the arguments before any model is built, so a bad launch fails on all ranks with the
same message.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from ..config import SpectrumConfig
from ..media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, write_media
from ..models import DEFAULT_MODEL, resolve_model
from .flags import add_spectrum_flags, spectrum_settings
from .runner import GenerationRequest, finish_rank, init_rank, run_request
from .serve_api import add_serve_arguments

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrum-xdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run one generation")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="tiny-wan, tiny-flux, digits-wan, a local diffusers folder or a hub id")
    gen.add_argument("--prompt", default="digit 7 moving right")
    gen.add_argument("--negative_prompt", default=None)
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--height", type=int, default=None, help="default: the model's")
    gen.add_argument("--width", type=int, default=None, help="default: the model's")
    gen.add_argument("--num_frames", type=int, default=None, help="video models; default: the model's")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance_scale", type=float, default=5.0)
    gen.add_argument("--ulysses_degree", type=int, default=1)
    gen.add_argument("--ring_degree", type=int, default=1)
    gen.add_argument("--use_cfg_parallel", action="store_true", help="Wan2.1: one guidance branch per half of the job")
    gen.add_argument("--pipefusion_parallel_degree", type=int, default=1, help="FLUX.1: xDiT's PipeFusion stages")
    gen.add_argument("--num_pipeline_patch", type=int, default=None, help="PipeFusion patches (default: xDiT's)")
    gen.add_argument("--warmup_steps", type=int, default=1, help="PipeFusion's synchronous warm-up steps")
    gen.add_argument("--cache_method", choices=["spectrum", "none"], default="spectrum")
    add_spectrum_flags(gen)
    gen.add_argument("--output", help="media file: .gif/.mp4 for video, .png for images")
    gen.add_argument("--save_latents", help="final latents before VAE decode, .npy (written by rank 0)")
    gen.add_argument("--report", help="run report, .json (written by rank 0)")
    serve = commands.add_parser("serve", help="serve generation over HTTP with Ray Serve (see the README)")
    add_serve_arguments(serve)
    return parser


def check_arguments(args, parser, world_size: int):
    """Everything that can be checked before building a model; returns the model spec."""
    try:
        spec = resolve_model(args.model)
    except ValueError as error:
        parser.error(str(error))
    for name in ("ulysses_degree", "ring_degree", "num_inference_steps", "pipefusion_parallel_degree", "warmup_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_pipeline_patch is not None and args.num_pipeline_patch < 1:
        parser.error(f"--num_pipeline_patch must be >= 1, got {args.num_pipeline_patch}")
    cfg = 2 if args.use_cfg_parallel else 1
    pipefusion = args.pipefusion_parallel_degree
    layout = args.ulysses_degree * args.ring_degree * cfg * pipefusion
    if layout != world_size:
        parser.error(f"--ulysses_degree {args.ulysses_degree} x --ring_degree {args.ring_degree} x cfg {cfg} x "
                     f"--pipefusion_parallel_degree {pipefusion} = {layout}, but the world size is {world_size}")
    if spec.num_attention_heads is not None and spec.num_attention_heads % args.ulysses_degree:
        parser.error(f"{spec.name} has {spec.num_attention_heads} attention heads, not divisible by "
                     f"--ulysses_degree {args.ulysses_degree}")
    if args.use_cfg_parallel and spec.family != "wan":
        parser.error(f"--use_cfg_parallel is supported for Wan2.1 only, not {spec.name} (see the README)")
    if args.use_cfg_parallel and args.guidance_scale <= 1:
        parser.error("--use_cfg_parallel needs guidance: --guidance_scale > 1")
    if pipefusion > 1:
        if spec.family != "flux":
            parser.error(f"--pipefusion_parallel_degree is supported for FLUX.1 only (xDiT has no PipeFusion "
                         f"for Wan2.1), not {spec.name}")
        if args.guidance_scale > 1:
            parser.error("PipeFusion runs xDiT's FLUX.1 pipeline, which has no classifier-free guidance: "
                         "pass --guidance_scale 1")
        if args.cache_method == "spectrum" and (args.spectrum_schedule != "paper" or args.spectrum_blend_weight == "auto"):
            parser.error("under PipeFusion Spectrum supports the paper schedule with a fixed blend weight "
                         "(the adaptive controller would decide from the last stage alone)")
    if args.output:
        allowed = VIDEO_SUFFIXES if spec.is_video else IMAGE_SUFFIXES
        if Path(args.output).suffix.lower() not in allowed:
            parser.error(f"--output for {spec.name} must end in {' or '.join(allowed)}")
    if args.cache_method == "spectrum":
        try:
            spectrum_config(args)
        except ValueError as error:
            parser.error(str(error))
    return spec


def spectrum_config(args) -> SpectrumConfig:
    return SpectrumConfig(num_inference_steps=args.num_inference_steps, **spectrum_settings(args))


def generation_request(args, spec) -> GenerationRequest:
    return GenerationRequest(
        prompt=args.prompt, num_inference_steps=args.num_inference_steps,
        height=args.height or spec.height, width=args.width or spec.width,
        num_frames=(args.num_frames or spec.num_frames) if spec.is_video else 1, seed=args.seed,
        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
        spectrum=spectrum_config(args) if args.cache_method == "spectrum" else None)


def generate(args, parser) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    spec = check_arguments(args, parser, world_size)
    start = time.perf_counter()
    rank_pipeline = init_rank(spec, args.ulysses_degree, args.ring_degree, world_size,
                              cfg_degree=2 if args.use_cfg_parallel else 1,
                              pipefusion_degree=args.pipefusion_parallel_degree,
                              num_pipeline_patch=args.num_pipeline_patch, pipefusion_warmup_steps=args.warmup_steps)
    result = run_request(rank_pipeline, generation_request(args, spec), decode=bool(args.output), started=start)
    report = result.report
    if rank_pipeline.rank == 0:
        if args.output:
            write_media(args.output, result.media)
        if args.save_latents:
            Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.save_latents, result.latents.float().cpu().numpy())
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("model", "cache_method", "nfe", "denoise_seconds",
                                                  "total_seconds", "state_bytes_per_rank")}))
    finish_rank(rank_pipeline)
    return report


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args, parser)
    elif args.command == "serve":
        from .serve import serve_main

        serve_main(args, parser)


if __name__ == "__main__":
    main()
