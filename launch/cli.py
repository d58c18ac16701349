"""`spectrum-xdit generate`: one generation, in one process or under torchrun with xDiT's
sequence parallelism, with or without Spectrum.

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
import torch
import torch.distributed as dist

from ..config import SpectrumConfig
from ..hooks import apply_spectrum, spectrum_stats
from ..media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, write_media
from ..models import DEFAULT_MODEL, resolve_model

SPECTRUM_FLAGS = ("window_size", "flex_window", "warmup_steps", "degree", "ridge_lambda", "blend_weight")


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
    gen.add_argument("--use_cfg_parallel", action="store_true")
    gen.add_argument("--cache_method", choices=["spectrum", "none"], default="spectrum")
    defaults = SpectrumConfig()
    for name in SPECTRUM_FLAGS:
        gen.add_argument(f"--spectrum_{name}", type=type(getattr(defaults, name)),
                         default=getattr(defaults, name))
    gen.add_argument("--output", help="media file: .gif/.mp4 for video, .png for images")
    gen.add_argument("--save_latents", help="final latents before VAE decode, .npy (written by rank 0)")
    gen.add_argument("--report", help="run report, .json (written by rank 0)")
    return parser


def check_arguments(args, parser, world_size: int):
    """Everything that can be checked before building a model; returns the model spec."""
    try:
        spec = resolve_model(args.model)
    except ValueError as error:
        parser.error(str(error))
    for name in ("ulysses_degree", "ring_degree", "num_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    cfg = 2 if args.use_cfg_parallel else 1
    if args.ulysses_degree * args.ring_degree * cfg != world_size:
        parser.error(f"--ulysses_degree {args.ulysses_degree} x --ring_degree {args.ring_degree} x cfg {cfg} "
                     f"= {args.ulysses_degree * args.ring_degree * cfg}, but the world size is {world_size}")
    if spec.num_attention_heads is not None and spec.num_attention_heads % args.ulysses_degree:
        parser.error(f"{spec.name} has {spec.num_attention_heads} attention heads, not divisible by "
                     f"--ulysses_degree {args.ulysses_degree}")
    if args.use_cfg_parallel and spec.family == "wan":
        parser.error("xfuser 0.7.0 has no CFG parallelism for Wan2.1 text-to-video; drop --use_cfg_parallel")
    if args.use_cfg_parallel:
        parser.error("--use_cfg_parallel is not supported by spectrum-xdit yet (see the README)")
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
    return SpectrumConfig(num_inference_steps=args.num_inference_steps,
                          **{name: getattr(args, f"spectrum_{name}") for name in SPECTRUM_FLAGS})


def _decode(pipe, family: str, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The pipeline's own VAE decode and post-processing of its final latents."""
    vae = pipe.vae
    if family == "wan":
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]
    unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")[0]


def generate(args, parser) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    spec = check_arguments(args, parser, world_size)
    start = time.perf_counter()
    rank = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size > 1:
        from ..parallel.cpu_support import enable_cpu_support

        enable_cpu_support()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank = dist.get_rank()
        from ..parallel.xdit_setup import init_xdit_runtime, setup_xdit_parallel, xdit_transformer

        engine_config = setup_xdit_parallel(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = spec.build(torch_dtype=dtype)
    if world_size > 1:
        from ..parallel.consistency import enable_schedule_check

        pipe.transformer = xdit_transformer(pipe.transformer)
        init_xdit_runtime(pipe, engine_config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0)
    config = spectrum_config(args) if args.cache_method == "spectrum" else None
    if config is not None:
        apply_spectrum(pipe.transformer, config)
        if world_size > 1:
            enable_schedule_check(pipe.transformer)

    height, width = args.height or spec.height, args.width or spec.width
    call = dict(prompt=args.prompt, num_inference_steps=args.num_inference_steps, height=height, width=width,
                output_type="latent", generator=torch.Generator().manual_seed(args.seed))
    if args.negative_prompt is not None:
        call["negative_prompt"] = args.negative_prompt
    if spec.family == "wan":
        call.update(num_frames=args.num_frames or spec.num_frames, guidance_scale=args.guidance_scale)
    else:
        call.update(true_cfg_scale=args.guidance_scale, max_sequence_length=64)
        if args.negative_prompt is None:
            call["negative_prompt"] = ""
        if world_size > 1:
            from ..parallel.xdit_setup import set_flux_input_parameters

            set_flux_input_parameters(call["max_sequence_length"])
    denoise_start = time.perf_counter()
    with torch.no_grad():
        output = pipe(**call)
        latents = output.frames if spec.family == "wan" else output.images
        denoise_seconds = time.perf_counter() - denoise_start
        media = _decode(pipe, spec.family, latents, height, width) if args.output and rank == 0 else None

    stats = spectrum_stats(pipe.transformer) if args.cache_method == "spectrum" else {}
    report = {
        "model": spec.name,
        "num_inference_steps": args.num_inference_steps,
        "world_size": world_size,
        "parallel": {"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree,
                     "cfg_degree": 2 if args.use_cfg_parallel else 1},
        "cache_method": args.cache_method,
        "spectrum": config.to_dict() if config is not None else None,
        "real_steps": {b: s["real_steps"] for b, s in stats.items()},
        "nfe": {b: s["nfe"] for b, s in stats.items()},
        "denoise_seconds": denoise_seconds,
        "total_seconds": time.perf_counter() - start,
        "state_bytes_per_rank": sum(s["state_bytes"] for s in stats.values()),
    }
    if args.cache_method == "none":
        branches = ["cond", "uncond"] if args.guidance_scale > 1 else ["cond"]
        report["real_steps"] = {b: list(range(args.num_inference_steps)) for b in branches}
        report["nfe"] = {b: args.num_inference_steps for b in branches}
    if rank == 0:
        if args.output:
            write_media(args.output, media)
        if args.save_latents:
            Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
            np.save(args.save_latents, latents.float().cpu().numpy())
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(json.dumps(report, indent=2))
        print(json.dumps({k: report[k] for k in ("model", "cache_method", "nfe", "denoise_seconds",
                                                  "total_seconds", "state_bytes_per_rank")}))
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return report


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        generate(args, parser)


if __name__ == "__main__":
    main()
