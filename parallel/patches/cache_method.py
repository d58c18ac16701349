"""``spectrum`` as one of xDiT's step-cache methods: ``--cache_method spectrum`` in xDiT's own
flags and in its ``apply_cache``, with ``--cache_config`` a JSON object of ``SpectrumConfig``
fields (``num_inference_steps`` comes from xDiT). Every other method is left to xDiT."""

from __future__ import annotations

import functools
import inspect
import json
from types import ModuleType

from pydantic import ValidationError

from ...config import SpectrumConfig, validation_problems
from ...experts import apply_spectrum_to_pipeline, pipeline_experts
from ...hooks import apply_spectrum
from .importing import Patch, is_marked, mark

CACHE_METHOD = "spectrum"
_FLAG = "--cache_method"


def spectrum_config_from_cache_config(num_steps: int, cache_config: str | None) -> SpectrumConfig:
    """The ``SpectrumConfig`` of xDiT's ``--cache_config`` text; ``ValueError`` naming the key."""
    try:
        overrides = json.loads(cache_config) if cache_config else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"--cache_config must be a JSON object of SpectrumConfig fields: {error}") from None
    if not isinstance(overrides, dict):
        raise ValueError("--cache_config must be a JSON object of SpectrumConfig fields")
    if "num_inference_steps" in overrides:
        raise ValueError("--cache_config num_inference_steps: comes from xDiT's --num_inference_steps")
    try:
        return SpectrumConfig(num_inference_steps=num_steps, **overrides)
    except ValidationError as error:
        field, why = validation_problems(error)[0]
        raise ValueError(f"--cache_config {field}: {why}") from None


def patch_adapters(adapters: ModuleType) -> None:
    """``xfuser/model_executor/cache/adapters/__init__.py``, ``apply_cache``: an if-chain over
    xDiT's own methods that raises for any other."""
    xdit_apply_cache = adapters.apply_cache
    if is_marked(xdit_apply_cache):
        return
    signature = inspect.signature(xdit_apply_cache)

    @functools.wraps(xdit_apply_cache)
    def apply_cache(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        arguments = call.arguments
        if arguments["cache_method"] != CACHE_METHOD:
            return xdit_apply_cache(*args, **kwargs)
        config = spectrum_config_from_cache_config(arguments["num_steps"], arguments["cache_config"])
        target, pipe = arguments["transformer"], arguments["pipe"]
        if target is not None:
            apply_spectrum(target, config)
            return target
        if len(pipeline_experts(pipe)) > 1:   # Wan2.2: every expert, each over its own steps
            apply_spectrum_to_pipeline(pipe, config)
        else:
            apply_spectrum(getattr(pipe, arguments["transformer_attr"]), config)
        return getattr(pipe, arguments["transformer_attr"])

    adapters.apply_cache = mark(apply_cache)


def patch_args(args: ModuleType) -> None:
    """``xfuser/config/args.py``, ``xFuserArgs.add_cli_args`` and ``add_runner_args``: the choices
    of ``--cache_method`` are a literal list of xDiT's own methods."""
    xfuser_args = args.xFuserArgs
    for name in ("add_cli_args", "add_runner_args"):
        add_args = getattr(xfuser_args, name)
        if is_marked(add_args):
            continue

        def with_spectrum(parser, _add_args=add_args):
            _add_args(_AddingSpectrumChoice(parser))
            return parser

        setattr(xfuser_args, name, staticmethod(mark(functools.wraps(add_args)(with_spectrum))))


class _AddingSpectrumChoice:
    """Stands in for a parser (and its groups) while xDiT adds its flags, through argparse's
    public ``add_argument``: ``--cache_method`` gets ``spectrum`` among its choices."""

    def __init__(self, target):
        self._target = target

    def add_argument(self, *names, **kwargs):
        if _FLAG in names and kwargs.get("choices") is not None and CACHE_METHOD not in kwargs["choices"]:
            kwargs["choices"] = [*kwargs["choices"], CACHE_METHOD]
        return self._target.add_argument(*names, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _AddingSpectrumChoice(self._target.add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return _AddingSpectrumChoice(self._target.add_mutually_exclusive_group(*args, **kwargs))

    def __getattr__(self, name):
        return getattr(self._target, name)


PATCHES: dict[str, list[Patch]] = {
    "xfuser.model_executor.cache.adapters": [patch_adapters],
    "xfuser.config.args": [patch_args],
}
