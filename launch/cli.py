"""`spectrum-xdit generate`: one generation, in one process or under torchrun with xDiT's
parallelism, with or without Spectrum. `spectrum-xdit serve`: the same behind an HTTP API, on
Ray Serve (launch/serve/).

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

from ..models import DEFAULT_MODEL, resolve_model
from .quiet import quiet_engines
from .request import (
    REQUEST_SETTINGS,
    ParallelLayout,
    RequestError,
    add_flags,
    check_layout,
    check_request,
    flag_fields,
    model_defaults,
    parse_layout,
    parse_request,
    request_from_settings,
    values_from_flags,
)

DEFAULT_PROMPT = "digit 7 moving right"
_GENERATE_SETTINGS = ("prompt", *(name for name in REQUEST_SETTINGS if name != "output_format"))


def build_parser() -> argparse.ArgumentParser:
    from .serve.settings import add_serve_arguments

    parser = argparse.ArgumentParser(prog="spectrum-xdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run one generation")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="tiny-wan, tiny-flux, digits-wan, a local diffusers folder or a hub id")
    add_flags(gen, flag_fields(_GENERATE_SETTINGS), {"prompt": DEFAULT_PROMPT})
    add_flags(gen.add_argument_group("parallel layout"), ParallelLayout.model_fields)
    gen.add_argument("--output", help="media file: .gif/.mp4 for video, .png for images")
    gen.add_argument("--save_latents", help="final latents before VAE decode, .npy (written by rank 0)")
    gen.add_argument("--report", help="run report, .json (written by rank 0)")
    gen.add_argument("--verbose", action="store_true", help="show the engines' own logs and warnings")
    serve = commands.add_parser("serve", help="serve generation over HTTP with Ray Serve (see the README)")
    add_serve_arguments(serve)
    return parser


def check_arguments(args, parser, world_size: int):
    """Everything that can be checked before building a model: the model spec, the layout and the
    request, or the parser's error (exit code 2) naming the flag."""
    try:
        spec = resolve_model(args.model)
    except ValueError as error:
        parser.error(str(error))
    settings = values_from_flags(args, flag_fields(_GENERATE_SETTINGS))
    payload = request_from_settings({"prompt": DEFAULT_PROMPT, **settings})
    if args.output:
        payload["output_format"] = Path(args.output).suffix.lower().removeprefix(".")
    try:
        layout = parse_layout(values_from_flags(args, ParallelLayout.model_fields))
        check_layout(layout, spec, world_size)
        request = parse_request(payload, model_defaults(spec))
        check_request(request, spec, layout)
    except RequestError as error:
        flag = "--output" if error.field == "output_format" else error.flag
        parser.error(f"{flag}: {error.message}")
    return spec, layout, request


def generate(args, parser) -> dict:
    from .runner import finish_rank, init_rank

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    spec, layout, request = check_arguments(args, parser, world_size)
    start = time.perf_counter()
    rank_pipeline = init_rank(spec, layout)
    result = rank_pipeline.generate(request, decode=bool(args.output), started=start)
    report = result.report
    if rank_pipeline.rank == 0:
        _write_outputs(args, result)
        print(json.dumps({k: report[k] for k in ("model", "cache_method", "nfe", "denoise_seconds",
                                                  "total_seconds", "state_bytes_per_rank")}))
    finish_rank(rank_pipeline)
    return report


def _write_outputs(args, result) -> None:
    import numpy as np

    from .media import write_media

    if args.output:
        write_media(args.output, result.media)
    if args.save_latents:
        Path(args.save_latents).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_latents, result.latents.float().cpu().numpy())
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(result.report, indent=2))


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        with quiet_engines(enabled=not args.verbose):
            generate(args, parser)
    elif args.command == "serve":
        from .serve.main import serve_main

        serve_main(args, parser)


if __name__ == "__main__":
    main()
