"""``spectrum`` as one of xDiT's step-cache methods: ``--cache_method spectrum`` in xDiT's own
flags, in its model runner's checks and in its ``apply_cache``, with ``--cache_config`` a JSON
object of ``SpectrumConfig`` fields (``num_inference_steps`` comes from xDiT). Every other method
is left to xDiT."""

from __future__ import annotations

import functools
import inspect
import json
from types import ModuleType

from pydantic import ValidationError

from ...config import SpectrumConfig, validation_problems
from ...experts import apply_spectrum_to_pipeline, pipeline_experts, pipeline_spectrum_stats
from ...hooks import apply_spectrum
from .importing import Patch, is_marked, mark

CACHE_METHOD = "spectrum"
_FLAG = "--cache_method"
# xDiT's runner models (xfuser/model_executor/models/runner_models) whose transformers are
# diffusers' WanTransformer3DModel or FluxTransformer2DModel, the stacks the hook knows; checked by
# class name along the MRO, so subclasses (this project's embedded models) count too.
SUPPORTED_RUNNER_MODELS = ("xFuserWan21T2VModel", "xFuserWan21I2VModel", "xFuserFluxModel",
                           "xFuserFluxKontextModel")


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


def patch_model_validation(base_model: ModuleType) -> None:
    """``xfuser/model_executor/models/runner_models/base_model.py``, ``xFuserModel._validate_config``:
    ``--cache_method`` must be a key of the model's ``settings.step_cache_config``, a literal dict
    of xDiT's methods per model. For the supported models ``spectrum`` joins that dict (it takes no
    preset: ``_apply_step_cache`` then hands ``apply_cache`` the ``--cache_config`` text); any
    other model is refused with the list of those that are supported, and so are PipeFusion (the
    runner's pipeline is not ours) and FSDP (``--fully_shard_degree``: its gathers would run on
    forecast steps too, until those skip them)."""

    def _validate_config(validate, self, config):
        if config.cache_method == CACHE_METHOD:
            if not supports_spectrum(type(self)):
                supported = sorted(name for name, cls in base_model.MODEL_REGISTRY.items() if supports_spectrum(cls))
                raise ValueError(f"--cache_method spectrum: model {config.model} is not supported; supported "
                                 f"models: {', '.join(supported)}")
            if getattr(config, "pipefusion_parallel_degree", 1) > 1:
                raise ValueError("--cache_method spectrum with --pipefusion_parallel_degree > 1: xDiT's runner "
                                 "builds its own PipeFusion pipeline; use `spectrum-xdit generate` for PipeFusion")
            if getattr(config, "fully_shard_degree", 1) > 1:
                raise ValueError("--cache_method spectrum with --fully_shard_degree > 1: FSDP all-gathers each "
                                 "block's weights in hooks that run before the block, so a forecast step would "
                                 "still gather every block it skips; run Spectrum without --fully_shard_degree")
            self.settings.step_cache_config = {**(self.settings.step_cache_config or {}), CACHE_METHOD: None}
        return validate(self, config)

    _wrap_method(base_model.xFuserModel, "_validate_config", _validate_config)


def patch_run_report(base_model: ModuleType) -> None:
    """``xfuser/model_executor/models/runner_models/base_model.py``, ``xFuserModel._run_timed_pipe``:
    xDiT's runner reports the time of each pipeline call but nothing of a step cache's decisions.
    After each call with Spectrum applied, its real steps per guidance branch are logged (through
    xDiT's ``log``, so on the last rank), which is what the call's time is the price of."""

    def _run_timed_pipe(run_timed, self, input_args):
        result = run_timed(self, input_args)
        for name, branches in pipeline_spectrum_stats(self.pipe).items():
            real = {branch: stats["real_steps"] for branch, stats in branches.items()}
            base_model.log(f"Spectrum {name}: real steps {real}")
        return result

    _wrap_method(base_model.xFuserModel, "_run_timed_pipe", _run_timed_pipe)


def _wrap_method(cls: type, name: str, replacement) -> None:
    """``cls.name`` becomes ``replacement(original, self, ...)``, once."""
    original = getattr(cls, name)
    if is_marked(original):
        return

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return replacement(original, self, *args, **kwargs)

    setattr(cls, name, mark(method))


def supports_spectrum(model_class: type) -> bool:
    """Whether an xDiT runner model class loads a transformer the Spectrum hook supports."""
    return any(cls.__name__ in SUPPORTED_RUNNER_MODELS for cls in model_class.__mro__)


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
    "xfuser.model_executor.models.runner_models.base_model": [patch_model_validation, patch_run_report],
    "xfuser.config.args": [patch_args],
}
