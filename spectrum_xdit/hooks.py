"""Spectrum as a diffusers hook on the transformer block stack of Wan2.1 and FLUX.1.

Every block of the stack gets a ``SpectrumBlockHook``. The first block decides, once per
transformer call, whether this denoising step is real or forecast (from the step index of the
call's guidance branch and the schedule). On a real step the blocks run untouched and the last
block's output is recorded; on a forecast step every block passes its input through and the
last block returns the forecast instead. Everything outside the stack (embedders, rotary
embeddings, output norm with the current timestep's modulation, projection) always runs.

The module tree is left intact (only ``forward`` attributes are wrapped by diffusers'
``HookRegistry``), so state_dict keys, LoRA, offloading and per-block compilation still work.
"""

from __future__ import annotations

import time

import torch
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

from .config import SpectrumConfig
from .control import SpectrumController
from .forecaster import SpectrumForecaster

SPECTRUM_BLOCK_HOOK = "spectrum_block"
_STACK_ATTRIBUTE = "_spectrum_stack"
DEFAULT_BRANCH = "default"

# Block lists, in call order, of the supported transformers (xDiT's wrappers subclass these).
_BLOCK_STACKS = {
    "WanTransformer3DModel": ("blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
}


class BranchState(BaseState):
    """State of one guidance branch: its forecaster and where it is in the current generation."""

    def __init__(self, config: SpectrumConfig):
        self.forecaster = SpectrumForecaster(config)
        self.next_step = 0
        self.input_key = None
        self.step = 0
        self.run_blocks = True

    def reset(self) -> None:
        self.forecaster.reset()
        self.next_step = 0
        self.input_key = None


class BranchStates(StateManager):
    """diffusers' ``StateManager``, keyed by the ``cache_context`` name, with a fallback branch
    for callers (such as some xDiT pipelines) that don't open a cache context."""

    @property
    def branch(self) -> str:
        return self._context.name if self._context is not None else DEFAULT_BRANCH

    @property
    def step_context(self):
        return self._context

    def get_state(self) -> BranchState:
        if self.branch not in self._state_cache:
            self._state_cache[self.branch] = self._state_cls(*self._init_args, **self._init_kwargs)
        return self._state_cache[self.branch]


class SpectrumStack:
    """What the block hooks of one transformer share: config, schedule, branch states, stats."""

    def __init__(self, config: SpectrumConfig):
        self.config = config
        # Decides run-or-forecast and the blend weight for every branch (control.py).
        self.controller = SpectrumController(config)
        # The steps that are real whatever happens: the whole paper schedule, or the warm-up of
        # the adaptive one.
        self.real_steps = self.controller.fixed_steps
        self.states = BranchStates(BranchState, (config,))
        self.stats: dict[str, dict] = {}
        self._stats_stale = False
        self.active: BranchState | None = None
        self._finished: tuple | None = None
        # Called with this stack whenever a branch starts a generation (before its first block
        # runs); the parallel layer uses it to check that every rank follows the same schedule.
        self.generation_start_callbacks: list = []

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        """Fix the step of this call for its branch and decide whether the blocks run."""
        context = self.states.step_context
        steps = self.config.num_inference_steps
        if context is not None and context.num_inference_steps not in (None, steps):
            raise ValueError(
                f"the pipeline runs {context.num_inference_steps} denoising steps but Spectrum was "
                f"configured for {steps}; apply it with SpectrumConfig(num_inference_steps="
                f"{context.num_inference_steps})")
        state = self.states.get_state()
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        if context is not None and context.step_index is not None:
            step = int(context.step_index)
        elif key != state.input_key:
            step = 0
        else:
            # No step index from the caller: count this branch's calls; a new feature shape or
            # the call after the last step starts a new generation.
            step = state.next_step % steps
        if step >= steps:
            raise ValueError(f"step index {step} is outside the {steps} steps Spectrum was configured for")
        if self._stats_stale:
            self.stats.clear()
            self._finished = None
            self._stats_stale = False
        if step == 0 or key != state.input_key:
            state.reset()
            self.stats[self.states.branch] = {"real_steps": [], "forecast_steps": [], "state_bytes": 0,
                                              "blend_weights": []}
            for callback in self.generation_start_callbacks:
                callback(self)
        state.input_key = key
        state.step = step
        state.next_step = step + 1
        self.controller.begin_step(step)
        # A forecast needs history: a branch that starts mid-schedule runs until it has some.
        state.run_blocks = self.controller.is_real(step) or not state.forecaster.real_steps
        if state.run_blocks:
            self.controller.mark_real(step)
        record = self.stats[self.states.branch]
        record["real_steps" if state.run_blocks else "forecast_steps"].append(step)
        self.active = state

    def record(self, features: torch.Tensor) -> None:
        state = self.active
        forecaster = state.forecaster
        # (the last step's score would inform no decision: skip it)
        if self.config.validates and state.step < self.config.num_inference_steps - 1:
            t0 = time.perf_counter()
            sums = forecaster.score(state.step, features)
            if sums is not None:
                self.controller.observe(state.step, state.step - forecaster.real_steps[-1], sums,
                                        seconds=time.perf_counter() - t0)
        forecaster.update(state.step, features)
        record = self.stats[self.states.branch]
        record["state_bytes"] = max(record["state_bytes"], forecaster.nbytes)

    def forecast(self) -> torch.Tensor:
        weight = self.controller.weight
        self.stats[self.states.branch]["blend_weights"].append(weight)
        return self.active.forecaster.forecast(self.active.step, blend_weight=weight)

    def reset(self) -> None:
        """End of a generation: drop every branch's state; the stats stay readable until the
        next call starts."""
        self.states.reset()
        self.active = None
        self._finished = (list(self.controller.log), list(self.controller.plan), self.controller.validation_seconds)
        self.controller.start()
        self._stats_stale = True


class SpectrumBlockHook(ModelHook):
    """Runs, skips or replaces one block of the stack according to the stack's decision."""

    def __init__(self, stack: SpectrumStack, is_head: bool, is_tail: bool):
        super().__init__()
        self.stack = stack
        self.is_head = is_head
        self.is_tail = is_tail
        # The head hook is the stateful one: diffusers sets the cache context on the state
        # manager it holds and resets it at the end of a pipeline call.
        self._is_stateful = is_head
        self.states = stack.states if is_head else None
        self._metadata = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._metadata = TransformerBlockRegistry.get(module.__class__)
        return module

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden_states = self._metadata._get_parameter_from_args_kwargs("hidden_states", args, kwargs)
        if self.is_head:
            self.stack.begin_call(hidden_states)
        if self.stack.active.run_blocks:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                index = self._metadata.return_hidden_states_index
                self.stack.record(output[index] if isinstance(output, tuple) else output)
            return output
        if self.is_tail:
            hidden_states = self.stack.forecast()
        if self._metadata.return_encoder_hidden_states_index is None:
            return hidden_states
        output = [None, None]
        output[self._metadata.return_hidden_states_index] = hidden_states
        output[self._metadata.return_encoder_hidden_states_index] = (
            self._metadata._get_parameter_from_args_kwargs("encoder_hidden_states", args, kwargs))
        return tuple(output)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.stack.reset()
        return module


def _block_stack(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    for cls in type(transformer).__mro__:
        if cls.__name__ in _BLOCK_STACKS:
            return [block for name in _BLOCK_STACKS[cls.__name__] for block in getattr(transformer, name)]
    raise ValueError(
        f"Spectrum supports {', '.join(sorted(_BLOCK_STACKS))} (and subclasses such as xDiT's "
        f"wrappers), not {type(transformer).__name__}")


def apply_spectrum(transformer: torch.nn.Module, config: SpectrumConfig | None = None) -> None:
    """Make ``transformer`` forecast its block stack's output at the steps the schedule skips.

    State is kept per guidance branch (the pipeline's ``cache_context`` name) and cleared at the
    end of every pipeline call, at step 0 of every generation and whenever the feature shape,
    dtype or device changes.
    """
    config = config if config is not None else SpectrumConfig()
    if not isinstance(config, SpectrumConfig):
        raise TypeError(f"config must be a SpectrumConfig, got {type(config).__name__}")
    if hasattr(transformer, _STACK_ATTRIBUTE):
        raise ValueError("Spectrum is already applied to this transformer; call remove_spectrum first")
    blocks = _block_stack(transformer)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer blocks to forecast")
    stack = SpectrumStack(config)
    for index, block in enumerate(blocks):
        hook = SpectrumBlockHook(stack, is_head=index == 0, is_tail=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, SPECTRUM_BLOCK_HOOK)
    setattr(transformer, _STACK_ATTRIBUTE, stack)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def remove_spectrum(transformer: torch.nn.Module) -> None:
    """Remove the hooks ``apply_spectrum`` added; the transformer behaves exactly as before."""
    if not hasattr(transformer, _STACK_ATTRIBUTE):
        raise ValueError("Spectrum is not applied to this transformer")
    for block in _block_stack(transformer):
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(SPECTRUM_BLOCK_HOOK, recurse=False)
    delattr(transformer, _STACK_ATTRIBUTE)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def spectrum_stack(transformer: torch.nn.Module) -> SpectrumStack:
    stack = getattr(transformer, _STACK_ATTRIBUTE, None)
    if stack is None:
        raise ValueError("Spectrum is not applied to this transformer")
    return stack


def spectrum_stats(transformer: torch.nn.Module) -> dict[str, dict]:
    """Per guidance branch, for the current or last generation: the steps that ran the block
    stack (``real_steps``, ``nfe`` of them), the forecast steps (``forecasts``), the blend
    weight of each forecast (``blend_weights``) and the peak bytes of forecaster state
    (``state_bytes``). With validation on (``blend_weight="auto"`` or the adaptive schedule)
    also the job-wide validation scores (``validation``: step, gap, relative errors of the
    linear, Chebyshev and blended forecasts, blend weight), the adaptive schedule's choices
    (``plan``) and the seconds spent validating on this rank (``validation_seconds``); these
    are shared by the branches."""
    stack = spectrum_stack(transformer)
    controller = stack.controller
    log, plan, seconds = stack._finished or (controller.log, controller.plan, controller.validation_seconds)
    result = {}
    for branch, record in stack.stats.items():
        result[branch] = {
            "real_steps": list(record["real_steps"]),
            "forecast_steps": list(record["forecast_steps"]),
            "nfe": len(record["real_steps"]),
            "forecasts": len(record["forecast_steps"]),
            "blend_weights": list(record["blend_weights"]),
            "state_bytes": record["state_bytes"],
        }
        if stack.config.validates:
            result[branch].update(validation=[dict(entry) for entry in log], plan=[dict(entry) for entry in plan],
                                  validation_seconds=seconds)
    return result
