"""`spectrum-xdit generate`: one generation, in one process or under torchrun with xDiT's
parallelism, with or without Spectrum. `spectrum-xdit serve`: the same behind an HTTP API, on
Ray Serve (launch/serve/). `spectrum-xdit xdit ARGS`: xDiT's own launcher and runner with
Spectrum (launch/xdit.py).

    spectrum-xdit generate --prompt "digit 7 moving left" --output out.gif --report out.json
    torchrun --nproc_per_node=2 --no-python spectrum-xdit generate --ulysses_degree 2 \\
        --cache_method spectrum --output out.gif --report out.json

Argument names follow xDiT's (``--model``, ``--ulysses_degree``, ``--ring_degree``, ...). Every
rank checks the arguments before any model is built, so a bad launch fails on all ranks with the
same message.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..models import DEFAULT_MODEL, resolve_model
from .flags import REQUEST_SETTINGS, add_flags, flag_fields, flag_of, request_from_settings, values_from_flags
from .images import MAX_IMAGE_BYTES
from .quiet import quiet_engines
from .request import ParallelLayout, RequestError, model_defaults, parse_layout, parse_request
from .validate import validate

DEFAULT_PROMPT = "digit 7 moving right"
_GENERATE_SETTINGS = ("prompt", *(name for name in REQUEST_SETTINGS if name != "output_format"))


class OutputPaths(BaseModel):
    """Where rank 0 writes: checked before any model is built, so that no work is lost to a path
    that cannot be written."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    output: Optional[str] = Field(None, description="media file: .gif/.mp4 for video, .png for images")
    save_latents: Optional[str] = Field(None, description="final latents before VAE decode, .npy (written by rank 0)")
    report: Optional[str] = Field(None, description="run report, .json (written by rank 0)")

    @field_validator("output", "save_latents", "report")
    @classmethod
    def _writable(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return value
        path = Path(value)
        if path.is_dir():
            raise ValueError(f"{value} is a directory")
        existing = path.absolute().parent
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise ValueError(f"cannot be written: {existing} is not a directory")
        if not os.access(existing, os.W_OK):
            raise ValueError(f"cannot be written: {existing} is not writable")
        return value


def build_parser() -> argparse.ArgumentParser:
    from .serve.settings import add_serve_arguments

    parser = argparse.ArgumentParser(prog="spectrum-xdit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run one generation")
    gen.add_argument("--model", default=DEFAULT_MODEL,
                     help="tiny-wan, tiny-flux, digits-wan, digits-flux, a local diffusers folder or a hub id")
    add_flags(gen, flag_fields(_GENERATE_SETTINGS), {"prompt": DEFAULT_PROMPT})
    gen.add_argument("--image", metavar="PATH", default=None,
                     help="image-to-video models: the first frame, a PNG or JPEG file (resized to height x width)")
    add_flags(gen.add_argument_group("parallel layout"), ParallelLayout.model_fields)
    add_flags(gen.add_argument_group("outputs"), OutputPaths.model_fields)
    gen.add_argument("--verbose", action="store_true", help="show the engines' own logs and warnings")
    serve = commands.add_parser("serve", help="serve generation over HTTP with Ray Serve (docs/serving.md)")
    add_serve_arguments(serve)
    commands.add_parser("xdit", help="xDiT's own `xdit` launcher and runner, with --cache_method spectrum and "
                                     "the embedded models (every argument is xDiT's)", add_help=False)
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
    try:
        outputs = OutputPaths.model_validate(values_from_flags(args, OutputPaths.model_fields))
    except ValidationError as error:
        problem = RequestError.from_validation(error)
        parser.error(f"{flag_of(problem.field)}: {problem.message}")
    if outputs.output:
        payload["output_format"] = Path(outputs.output).suffix.lower().removeprefix(".")
    if args.image is not None:
        payload["image"] = _read_image(args.image, parser)
    try:
        layout = parse_layout(values_from_flags(args, ParallelLayout.model_fields))
        request = parse_request(payload, model_defaults(spec))
        validate(request, spec, layout, world_size=world_size)
    except RequestError as error:
        fail(parser, error)
    return spec, layout, request, outputs


def _read_image(path: str, parser) -> str:
    """The file as the request's ``image`` (base64, as over HTTP), so that the request model checks
    it; one byte past the cap is enough for it to refuse a file that is too large."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_IMAGE_BYTES + 1)
    except OSError as error:
        parser.error(f"--image: cannot read {path} ({error.strerror})")
    return base64.b64encode(data).decode("ascii")


def fail(parser, error: RequestError) -> None:
    """The parser's error (exit code 2) naming the flag of the request field."""
    flag = "--output" if error.field == "output_format" else flag_of(error.field)
    parser.error(f"{flag}: {error.message}")


def generate(args, parser) -> dict:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    spec, layout, request, outputs = check_arguments(args, parser, world_size)
    start = time.perf_counter()
    from .runner import finish_rank, init_rank   # torch and diffusers: only for a launch that passed the checks

    rank_pipeline = init_rank(spec, layout)
    try:   # the built model is the truth where the spec's size rules were a family's defaults
        validate(request, spec, layout, world_size=world_size, sizes=rank_pipeline.size_rules())
    except RequestError as error:
        fail(parser, error)
    result = rank_pipeline.generate(request, decode=bool(outputs.output), started=start)
    report = result.report
    if rank_pipeline.rank == 0:
        _write_outputs(outputs, result)
        shown = {k: report[k] for k in ("model", "cache_method", "nfe", "denoise_seconds", "total_seconds",
                                         "state_bytes_per_rank")}
        if "experts" in report:
            shown["nfe_by_expert"] = {name: expert["nfe"] for name, expert in report["experts"].items()}
        print(json.dumps(shown))
    finish_rank(rank_pipeline)
    return report


def _write_outputs(outputs: OutputPaths, result) -> None:
    import numpy as np

    from .media import write_media

    if outputs.output:
        write_media(outputs.output, result.media)
    if outputs.save_latents:
        Path(outputs.save_latents).parent.mkdir(parents=True, exist_ok=True)
        np.save(outputs.save_latents, result.latents.float().cpu().numpy())
    if outputs.report:
        Path(outputs.report).parent.mkdir(parents=True, exist_ok=True)
        Path(outputs.report).write_text(json.dumps(result.report, indent=2))


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["xdit"]:   # every other argument is xDiT's, passed on untouched
        from .xdit import main as xdit_main

        sys.exit(xdit_main(argv[1:]))
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
