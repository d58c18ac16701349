"""Flags from the request model: one per field, with the same flat names in the Serve YAML
(``seed``, ``cache_method``, ``spectrum_<setting>``), their help from the fields' descriptions and
their values checked by the models as a JSON body's are."""

from __future__ import annotations

import argparse
import json
import typing
from typing import Optional

from pydantic_core import PydanticUndefined

from ..config import SETTINGS
from .request import CacheSettings, GenerationRequest, ParallelLayout

_REQUEST_FLAGS = ("negative_prompt", "seed", "num_inference_steps", "height", "width", "num_frames",
                  "guidance_scale", "true_cfg_scale")
REQUEST_SETTINGS = (*_REQUEST_FLAGS, "output_format", "cache_method", *(f"spectrum_{name}" for name in SETTINGS))


def flag_of(field: str) -> str:
    """The flag of a request path (``cache.degree`` is ``--spectrum_degree``), or the flags of a
    comma-separated list of them."""
    return ", ".join(_flag(part) for part in field.split(","))


def _flag(field: str) -> str:
    if field == "cache.method":
        return "--cache_method"
    if field.startswith("cache."):
        return f"--spectrum_{field.removeprefix('cache.')}"
    return f"--{field}"


def request_from_settings(values: dict) -> dict:
    """Request-shaped values from flat setting names (``seed``, ``cache_method``,
    ``spectrum_<name>``: the flags and the Serve YAML's names)."""
    request, cache = {}, {}
    for name, value in values.items():
        if name == "cache_method":
            cache["method"] = value
        elif name.startswith("spectrum_"):
            cache[name.removeprefix("spectrum_")] = value
        else:
            request[name] = value
    if cache:
        request["cache"] = cache
    return request


def add_flags(parser, fields: dict, defaults: Optional[dict] = None) -> None:
    """One flag per field (name: pydantic field), its help from the field's description and the
    default (``defaults`` overriding the field's); a flag not given is absent from the parsed
    namespace, and the values stay text until :func:`values_from_flags`."""
    for name, field in fields.items():
        default = (defaults or {}).get(name, field.default)
        shown = "" if default is PydanticUndefined else f" (default: {default})"
        if field.annotation is bool:
            # alone it sets true; "false" turns off a default that is true (reuse under a budget)
            parser.add_argument(f"--{name}", nargs="?", const=True, default=argparse.SUPPRESS, metavar="false",
                                help=f"{field.description or ''}{shown}")
        elif typing.get_origin(field.annotation) is list:
            parser.add_argument(f"--{name}", action="append", default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f"{field.description or ''} (repeatable)")
        else:
            parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f"{field.description or ''}{shown}")


def values_from_flags(args: argparse.Namespace, fields: dict) -> dict:
    """The flags given among ``fields`` (name: pydantic field), their text read as JSON where the
    field does not take text; the models then check the values as they check a JSON body."""
    values = {}
    for name, field in fields.items():
        if not hasattr(args, name):
            continue
        text = getattr(args, name)
        values[name] = text if not isinstance(text, str) or _takes_text(field) else _json_or_text(text)
    return values


def flag_fields(names) -> dict:
    """The pydantic field behind each request or layout flag name."""
    return {name: _field_of(name) for name in names}


def _field_of(name: str):
    if name == "cache_method":
        return CacheSettings.model_fields["method"]
    if name.startswith("spectrum_"):
        return CacheSettings.model_fields[name.removeprefix("spectrum_")]
    if name in ParallelLayout.model_fields:
        return ParallelLayout.model_fields[name]
    return GenerationRequest.model_fields[name]


def _takes_text(field) -> bool:
    return field.annotation is str or str in typing.get_args(field.annotation)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
