"""`spectrum` as a cache method of xDiT (xfuser 0.7.0): `--cache_method spectrum`.

xDiT hard-codes its step caches in two places: the ``choices`` of ``--cache_method`` in
``xFuserArgs.add_cli_args`` / ``add_runner_args``, and the if-chain of
``xfuser.model_executor.cache.adapters.apply_cache``, which both its pipeline wrappers and its
runner models import at call time. :func:`register_spectrum_cache_method` extends both, so
xDiT's own flags accept ``spectrum`` and xDiT's own ``apply_cache`` applies it, with every other
method left to xDiT. ``--cache_config`` takes a JSON object of ``SpectrumConfig`` fields
(``{"flex_window": 3.0, "blend_weight": 1.0}``); ``num_inference_steps`` comes from xDiT.

Unlike xDiT's in-tree caches, which it switches off whenever CFG or pipeline parallelism is on,
Spectrum is rank-aware: under sequence parallelism each rank forecasts its own shard.
"""

from __future__ import annotations

import json

from ..config import SpectrumConfig
from ..hooks import apply_spectrum
from .xdit_fixes import apply_xdit_fixes

CACHE_METHOD = "spectrum"


def spectrum_config_from_cache_config(num_steps: int, cache_config: str | None) -> SpectrumConfig:
    overrides = {}
    if cache_config:
        try:
            overrides = json.loads(cache_config)
        except json.JSONDecodeError as error:
            raise ValueError(f"--cache_config must be a JSON object of SpectrumConfig fields: {error}") from None
        if not isinstance(overrides, dict):
            raise ValueError("--cache_config must be a JSON object of SpectrumConfig fields")
    fields = set(SpectrumConfig.__dataclass_fields__) - {"num_inference_steps"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown --cache_config keys for spectrum: {unknown}; allowed: {sorted(fields)}")
    return SpectrumConfig(num_inference_steps=num_steps, **overrides)


def register_spectrum_cache_method() -> None:
    """Make xDiT's ``--cache_method`` flags and ``apply_cache`` know ``spectrum``. Idempotent.

    Also installs the padding-path fixes (``xdit_fixes``), which xDiT's own entry points would
    otherwise run without."""
    apply_xdit_fixes()
    import xfuser.model_executor.cache.adapters as adapters
    from xfuser.config.args import xFuserArgs

    if getattr(adapters.apply_cache, "knows_spectrum", False):
        return
    xdit_apply_cache = adapters.apply_cache

    def apply_cache(cache_method, num_steps, pipe, transformer=None, preset_kwargs=None, cache_config=None,
                    adapter_config=None, transformer_attr="transformer"):
        if cache_method != CACHE_METHOD:
            return xdit_apply_cache(cache_method, num_steps, pipe, transformer=transformer,
                                    preset_kwargs=preset_kwargs, cache_config=cache_config,
                                    adapter_config=adapter_config, transformer_attr=transformer_attr)
        target = transformer if transformer is not None else getattr(pipe, transformer_attr)
        apply_spectrum(target, spectrum_config_from_cache_config(num_steps, cache_config))
        return target

    apply_cache.knows_spectrum = True
    adapters.apply_cache = apply_cache

    for name in ("add_cli_args", "add_runner_args"):
        add_args = getattr(xFuserArgs, name)

        def with_spectrum(parser, _add_args=add_args):
            parser = _add_args(parser)
            for action in parser._actions:
                if "--cache_method" in action.option_strings and CACHE_METHOD not in action.choices:
                    action.choices = [*action.choices, CACHE_METHOD]
            return parser

        setattr(xFuserArgs, name, staticmethod(with_spectrum))
