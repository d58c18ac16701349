"""Spectrum as a diffusers hook on the transformer block stack of Wan2.1 and FLUX.1.

Every block of the stack gets a :class:`SpectrumBlockHook`, and the hooks of one stack follow
one :class:`BlockStackPolicy`, which decides once per transformer call, before the first module
that depends on it (:class:`CallStart`), whether the blocks run. On a real step they run untouched and the
last block's output goes to the policy; on a forecast step every block passes its input through
and the last one returns the policy's forecast. What only the blocks read (the rotary embedding,
the patch and text embedders, Wan's per-block timestep projection) is not computed on a forecast
step: those modules return zero placeholders of the shapes they gave before
(:class:`BlockInputHook`). The timestep embedding, the output norm with its modulation and the
projection always run. Only ``forward`` attributes are wrapped (diffusers' ``HookRegistry``), so
state_dict keys, LoRA, offloading and compilation still work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .config import SpectrumConfig
from .control import SpectrumController
from .forecaster import SpectrumForecaster

SPECTRUM_BLOCK_HOOK = "spectrum_block"
SPECTRUM_CALL_HOOK = "spectrum_call"
SPECTRUM_INPUT_HOOK = "spectrum_block_input"
_POLICY_ATTRIBUTE = "_spectrum_policy"
DEFAULT_BRANCH = "default"

# Block lists, in call order, of the supported transformers (xDiT's wrappers subclass these), and
# whether their blocks return ``(encoder_hidden_states, hidden_states)`` (FLUX.1) or the hidden
# states alone (Wan2.1). Every such block takes ``(hidden_states, encoder_hidden_states, ...)``.
_BLOCK_STACKS = {
    "WanTransformer3DModel": (("blocks",), False),
    "FluxTransformer2DModel": (("transformer_blocks", "single_transformer_blocks"), True),
}
# Submodules whose outputs the blocks alone read (in diffusers' forwards and xDiT's, which only
# chunk and pad them for sequence parallelism): a forecast step skips them.
_BLOCK_INPUTS = {
    "WanTransformer3DModel": ("rope", "patch_embedding", "condition_embedder.time_proj",
                              "condition_embedder.text_embedder", "condition_embedder.image_embedder"),
    "FluxTransformer2DModel": ("x_embedder", "context_embedder", "pos_embed"),
}
# Placeholders kept per block-input module: one per input signature (shapes, dtypes, devices).
_MAX_PLACEHOLDERS = 64


class BlockStackPolicy(Protocol):
    """What the block hooks of one stack ask: :class:`CacheContextPolicy` (a pipeline's own loop),
    :class:`RowsPolicy` (a call over rows of several requests) and the last PipeFusion stage
    (``spectrum_xdit.parallel.pipefusion``) implement it."""

    @property
    def run_blocks(self) -> bool:
        """Whether the current call runs the blocks (decided by ``begin_call``)."""

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        """A transformer call starts, or, where its stack is split over ranks (PipeFusion), reaches
        the first block (``hidden_states``: the input there, whose shape, dtype and device name
        the time series): decide whether the blocks run."""

    def record(self, features: torch.Tensor) -> None:
        """The last block's output of a call that ran the blocks."""

    def forecast(self) -> torch.Tensor:
        """The last block's output for a call that skips the blocks."""

    def reset(self) -> None:
        """The pipeline call ended."""


class CacheContextReceiver(StateManager):
    """Receives each transformer call's ``CacheContext`` (branch name, step index).

    diffusers hands the context of ``cache_context(...)`` to every ``StateManager`` a stateful
    hook holds, through its public ``set_context``; this one only keeps it for
    :class:`CacheContextPolicy`."""

    def __init__(self):
        super().__init__(BaseState)
        self.current = None

    def set_context(self, context) -> None:
        self.current = context


@dataclass
class BranchState:
    """One guidance branch of a request: its forecaster, and its decision at its current step.

    :meth:`SpectrumState.begin` returns it with ``real`` decided; the caller then gives it the
    block stack's output of that step (:meth:`record`) or asks it for the forecast (:meth:`forecast`)."""

    owner: "SpectrumState"
    name: str
    forecaster: SpectrumForecaster
    next_step: int = 0
    input_key: Optional[tuple] = None
    step: int = 0
    real: bool = True
    stats: dict = field(default_factory=dict)

    def start(self) -> None:
        self.forecaster.reset()
        self.stats = {"real_steps": [], "forecast_steps": [], "state_bytes": 0, "blend_weights": []}

    def record(self, features: torch.Tensor) -> None:
        """The last block's output of this branch at its current (real) step."""
        self.owner._record(self, features)

    def forecast(self) -> torch.Tensor:
        """The forecast of the last block's output of this branch at its current (forecast) step."""
        return self.owner._forecast(self)


class SpectrumState:
    """A request's forecasting state on one transformer: config, controller, a :class:`BranchState`
    per guidance branch, and the stats of its generation.

    The per-row API, for the pipeline hooks (:class:`CacheContextPolicy`) and for any caller that
    batches requests alike (``spectrum_xdit.launch.step_batching``; docs/method.md)::

        row = state.begin(branch, step, hidden)   # decides: row.real
        ... row.record(features) if row.real else row.forecast()

    A caller may begin every row of a step (both branches, rows of other requests with their own
    states) before it records or forecasts any of them.

    ``first_step`` and ``total_steps``: the transformer runs the pipeline's steps ``first_step ..
    first_step + config.num_inference_steps - 1`` of ``total_steps`` (an expert of a two-expert
    pipeline, ``spectrum_xdit.experts``); the schedule, the controller and the fit count the
    transformer's own steps from 0, the stats name the pipeline's."""

    def __init__(self, config: SpectrumConfig, first_step: int = 0, total_steps: Optional[int] = None):
        own_end = first_step + config.num_inference_steps
        total_steps = own_end if total_steps is None else total_steps
        if first_step < 0 or own_end > total_steps:
            raise ValueError(f"first_step {first_step} + num_inference_steps {config.num_inference_steps} must lie "
                             f"within total_steps {total_steps}")
        self.config = config
        self.first_step = first_step
        self.total_steps = total_steps
        # Decides run-or-forecast and the blend weight for every branch (control.py).
        self.controller = SpectrumController(config)
        self.branches: dict[str, BranchState] = {}
        # What the last generation left for spectrum_stats; None while one runs.
        self._finished: Optional[dict] = None
        # Called with this state whenever a branch starts a generation (before its first block
        # runs); the parallel layer uses it to check that every rank follows the same schedule.
        self.generation_start_callbacks: list[Callable[[SpectrumState], None]] = []

    def begin(self, branch: str, step: Optional[int], hidden_states: torch.Tensor) -> BranchState:
        """Start pipeline step ``step`` of ``branch`` and decide whether its blocks run.

        ``hidden_states``: the transformer's input, whose shape, dtype and device name the time
        series (a change starts a new generation). ``step`` ``None``: count this branch's calls;
        a new input signature or the call after the last step starts a new generation."""
        if self._finished is not None:
            self._finished = None
            self.branches.clear()
        state = self.branches.get(branch)
        if state is None:
            state = self.branches[branch] = BranchState(self, branch, SpectrumForecaster(self.config))
        steps = self.config.num_inference_steps
        key = (tuple(hidden_states.shape), hidden_states.dtype, hidden_states.device)
        if step is not None:
            step = int(step) - self.first_step
        elif key != state.input_key:
            step = 0
        else:
            step = state.next_step % steps
        if not 0 <= step < steps:
            first = self.first_step
            raise ValueError(f"step index {step + first} is outside the steps {first} .. {first + steps - 1} "
                             "Spectrum was configured for")
        if step == 0 or key != state.input_key:
            state.start()
            for callback in self.generation_start_callbacks:
                callback(self)
        state.input_key = key
        state.step = step
        state.next_step = step + 1
        self.controller.begin_step(step)
        # A forecast needs history: a branch that starts mid-schedule runs until it has some.
        state.real = self.controller.is_real(step) or not state.forecaster.real_steps
        if state.real:
            self.controller.mark_real(step)
        state.stats["real_steps" if state.real else "forecast_steps"].append(step + self.first_step)
        return state

    def _record(self, state: BranchState, features: torch.Tensor) -> None:
        forecaster = state.forecaster
        # (the last step's score would inform no decision: skip it)
        if self.config.validates and state.step < self.config.num_inference_steps - 1:
            with self.controller.clock.timing(features.device):
                sums = forecaster.score(state.step, features)
            if sums is not None:
                self.controller.observe(state.step, state.step - forecaster.real_steps[-1], sums)
        forecaster.update(state.step, features)
        state.stats["state_bytes"] = max(state.stats["state_bytes"], forecaster.nbytes)
        self._release_after_last_step(state)

    def _forecast(self, state: BranchState) -> torch.Tensor:
        weight = self.controller.weight
        state.stats["blend_weights"].append(weight)
        features = state.forecaster.forecast(state.step, blend_weight=weight)
        self._release_after_last_step(state)
        return features

    def _release_after_last_step(self, state: BranchState) -> None:
        """No forecast reads a branch's features after its last step: free them there, so that the
        forecasters of a pipeline's two experts never hold memory at the same time."""
        if state.step == self.config.num_inference_steps - 1:
            state.forecaster.reset()

    def reset(self) -> None:
        """End of a generation: drop every branch's features; the stats stay readable until the
        next generation begins."""
        controller = self.controller
        self._finished = {"log": list(controller.log), "plan": list(controller.plan),
                          "validation_seconds": controller.validation_seconds}
        for state in self.branches.values():
            state.forecaster.reset()
        controller.start()

    def stats(self) -> dict[str, dict]:
        controller = self.controller
        shared = self._finished or {"log": controller.log, "plan": controller.plan,
                                    "validation_seconds": controller.validation_seconds}
        result = {}
        for branch, state in self.branches.items():
            record = state.stats
            result[branch] = {
                "real_steps": list(record["real_steps"]),
                "forecast_steps": list(record["forecast_steps"]),
                "nfe": len(record["real_steps"]),
                "forecasts": len(record["forecast_steps"]),
                "blend_weights": list(record["blend_weights"]),
                "state_bytes": record["state_bytes"],
            }
            if self.config.validates:
                first = self.first_step
                result[branch].update(validation=[{**entry, "step": entry["step"] + first} for entry in shared["log"]],
                                      plan=[{**entry, "after": entry["after"] + first} for entry in shared["plan"]],
                                      validation_seconds=shared["validation_seconds"])
        return result


class CacheContextPolicy:
    """The :class:`BlockStackPolicy` of a transformer that a pipeline's own loop calls: each call's
    branch and step come from diffusers' ``cache_context`` (``DEFAULT_BRANCH`` and a call count
    without one), and its one row goes to the :class:`SpectrumState`."""

    def __init__(self, state: SpectrumState):
        self.state = state
        self.context = CacheContextReceiver()
        self.row: Optional[BranchState] = None

    @property
    def run_blocks(self) -> bool:
        return self.row.real

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        context = self.context.current
        state = self.state
        steps = state.config.num_inference_steps
        if context is not None and context.num_inference_steps not in (None, state.total_steps):
            how = ("apply_spectrum_to_pipeline(pipe, SpectrumConfig(num_inference_steps=...))"
                   if steps != state.total_steps else f"SpectrumConfig(num_inference_steps={context.num_inference_steps})")
            raise ValueError(
                f"the pipeline runs {context.num_inference_steps} denoising steps but Spectrum was "
                f"configured for {state.total_steps}; apply it with {how}")
        branch = context.name if context is not None else DEFAULT_BRANCH
        self.row = state.begin(branch, context.step_index if context is not None else None, hidden_states)

    def record(self, features: torch.Tensor) -> None:
        self.row.record(features)

    def forecast(self) -> torch.Tensor:
        return self.row.forecast()

    def reset(self) -> None:
        self.state.reset()
        self.row = None
        self.context.current = None


class RowsPolicy:
    """The :class:`BlockStackPolicy` of one transformer call over rows of different requests (a
    caller that batches requests): row ``i`` of the batch is the :class:`BranchState` ``rows[i]``,
    begun by its own request's :class:`SpectrumState`, or ``None`` for a request without Spectrum
    (always real). The rows of one call must agree on running the blocks."""

    def __init__(self):
        self.rows: list[Optional[BranchState]] = []
        self.run_blocks = True

    def set_rows(self, rows: list[Optional[BranchState]]) -> None:
        decisions = {row is None or row.real for row in rows}
        if len(decisions) != 1:
            raise ValueError("the rows of one call must all run the blocks or all be forecast")
        self.rows = rows
        self.run_blocks = decisions.pop()

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.shape[0] != len(self.rows):
            raise RuntimeError(f"a call of {len(self.rows)} rows reached the blocks with batch {hidden_states.shape[0]}")

    def record(self, features: torch.Tensor) -> None:
        for index, row in enumerate(self.rows):
            if row is not None:
                row.record(features[index:index + 1])

    def forecast(self) -> torch.Tensor:
        return torch.cat([row.forecast() for row in self.rows])

    def reset(self) -> None:
        """Nothing to drop: each request's state ends with the request."""


class CallStart:
    """The input of a transformer call whose run-or-forecast decision is still to take.

    The call hook notes it; the first module of the call that needs the decision (a block input,
    or the head block) takes it. Deciding there rather than as the call starts keeps it inside
    whatever wraps the transformer's forward (CFG parallelism switches the guidance branch there,
    or answers a call without running the transformer at all)."""

    def __init__(self, policy: BlockStackPolicy):
        self.policy = policy
        self.pending: Optional[torch.Tensor] = None

    def decide(self) -> None:
        if self.pending is not None:
            hidden_states, self.pending = self.pending, None
            _eager_policy(self.policy.begin_call, hidden_states)


class SpectrumCallHook(ModelHook):
    """On the transformer: notes each call's input for the decision (:class:`CallStart`), so
    that the block inputs (:class:`BlockInputHook`) can take it before they are computed.

    Holding the :class:`CacheContextReceiver` makes it diffusers' stateful hook: diffusers gives
    it the context of each call and calls ``reset_state`` at the end of a pipeline call."""

    def __init__(self, start: CallStart, context: Optional[CacheContextReceiver] = None):
        super().__init__()
        self.start = start
        self.context = context
        self._is_stateful = context is not None

    # Eager by design (SpectrumBlockHook.new_forward says why); the transformer's forward compiles.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.start.pending = _block_argument(args, kwargs, "hidden_states", 0)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.start.pending = None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.start.policy.reset()
        return module


class BlockInputHook(ModelHook):
    """On a module whose output only the blocks read: on a call that skips the blocks, return
    zeros (one element, expanded) of the structure it returned for the same input signature,
    instead of computing it. Until a real call has shown that structure it runs as usual."""

    def __init__(self, start: CallStart):
        super().__init__()
        self.start = start
        self.placeholders: dict[tuple, object] = {}

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.start.decide()
        key = _signature(args, kwargs)
        if not self.start.policy.run_blocks and key in self.placeholders:
            return self.placeholders[key]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if key not in self.placeholders and len(self.placeholders) < _MAX_PLACEHOLDERS:
            placeholder = _placeholder(output)
            if placeholder is not None:
                self.placeholders[key] = placeholder
        return output


def _signature(args: tuple, kwargs: dict) -> tuple:
    """What a module's output shapes depend on: each tensor's shape, dtype and device, and every
    other argument itself."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.dtype, value.device
        return value if isinstance(value, (int, float, bool, str, type(None))) else repr(value)
    return tuple(map(describe, args)), tuple((name, describe(value)) for name, value in sorted(kwargs.items()))


def _placeholder(output):
    """Zeros shaped like ``output`` (a tensor, or a tuple or list of them) costing one element
    each; ``None`` for anything else, which then always runs."""
    if isinstance(output, torch.Tensor):
        return output.new_zeros(()).expand(output.shape)
    if isinstance(output, (tuple, list)) and output and all(isinstance(t, torch.Tensor) for t in output):
        return type(output)(t.new_zeros(()).expand(t.shape) for t in output)
    return None


class SpectrumBlockHook(ModelHook):
    """Runs, skips or replaces one block of the stack according to the stack's policy.

    The head block takes the call's decision if no block input has (:class:`CallStart`), or,
    with no call hook (a stack split over ranks), asks the policy itself (``begin_call``)."""

    def __init__(self, policy: BlockStackPolicy, decides: bool, is_tail: bool, returns_text: bool,
                 start: Optional[CallStart] = None):
        super().__init__()
        self.policy = policy
        self.decides = decides
        self.start = start
        self.is_tail = is_tail
        self.returns_text = returns_text

    # Eager by design: the run-or-forecast decision reads Python state that changes every step
    # (step index, branch, schedule, forecaster history), which a compiled graph would guard on
    # and recompile for at every step. This frame stays eager (recursive=False keeps the block's
    # own forward compilable, the graph worth having) and so do the policy calls (_eager_policy).
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden_states = _block_argument(args, kwargs, "hidden_states", 0)
        if self.start is not None:
            self.start.decide()
        elif self.decides:
            _eager_policy(self.policy.begin_call, hidden_states)
        if self.policy.run_blocks:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                _eager_policy(self.policy.record, output[1] if self.returns_text else output)
            return output
        if self.is_tail:
            hidden_states = _eager_policy(self.policy.forecast)
        if not self.returns_text:
            return hidden_states
        return _block_argument(args, kwargs, "encoder_hidden_states", 1), hidden_states


@torch.compiler.disable
def _eager_policy(method, *args):
    """A policy call, never traced: its Python state is the step-to-step decision itself."""
    return method(*args)


def _block_argument(args: tuple, kwargs: dict, name: str, position: int):
    """A block's argument by name, or by its position when the caller passed it positionally."""
    return kwargs[name] if name in kwargs else args[position]


def _architecture(transformer: torch.nn.Module) -> str:
    """The supported transformer class ``transformer`` is or derives from (xDiT's wrappers do)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in _BLOCK_STACKS:
            return cls.__name__
    raise ValueError(
        f"Spectrum supports {', '.join(sorted(_BLOCK_STACKS))} (and subclasses such as xDiT's "
        f"wrappers), not {type(transformer).__name__}")


def block_stack(transformer: torch.nn.Module) -> tuple[list[torch.nn.Module], bool]:
    """The blocks of a supported transformer in call order, and whether they return text states."""
    names, returns_text = _BLOCK_STACKS[_architecture(transformer)]
    return [block for name in names for block in getattr(transformer, name)], returns_text


def block_inputs(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of a supported transformer whose outputs only its blocks read."""
    modules = []
    for name in _BLOCK_INPUTS[_architecture(transformer)]:
        try:
            module = transformer.get_submodule(name)
        except AttributeError:   # e.g. no image embedder on a text-to-video model
            continue
        if module is not None:
            modules.append(module)
    return modules


def hook_blocks(blocks: list[torch.nn.Module], policy: BlockStackPolicy, returns_text: bool,
                start: Optional[CallStart] = None) -> None:
    """Put a :class:`SpectrumBlockHook` following ``policy`` on each block of a stack; the first
    block takes each call's decision (from ``start`` where a call hook notes the calls)."""
    if not blocks:
        raise ValueError("there are no transformer blocks to forecast")
    for index, block in enumerate(blocks):
        head = index == 0
        hook = SpectrumBlockHook(policy, decides=head, is_tail=index == len(blocks) - 1,
                                 returns_text=returns_text, start=start if head else None)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, SPECTRUM_BLOCK_HOOK)


def unhook_blocks(blocks: list[torch.nn.Module]) -> None:
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(SPECTRUM_BLOCK_HOOK, recurse=False)


def hook_transformer(transformer: torch.nn.Module, policy: BlockStackPolicy,
                     context: Optional[CacheContextReceiver] = None) -> None:
    """Make ``transformer`` follow ``policy``: a decision as each call starts, the blocks run or
    forecast, and the block inputs skipped on a forecast."""
    start = CallStart(policy)
    blocks, returns_text = block_stack(transformer)
    hook_blocks(blocks, policy, returns_text, start=start)
    for module in block_inputs(transformer):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(BlockInputHook(start), SPECTRUM_INPUT_HOOK)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(SpectrumCallHook(start, context), SPECTRUM_CALL_HOOK)
    registry.invalidate_child_registries_cache()


def unhook_block_inputs(transformer: torch.nn.Module) -> None:
    """Compute the block inputs on forecast steps too (what the wall-time benchmark compares)."""
    for module in block_inputs(transformer):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(SPECTRUM_INPUT_HOOK, recurse=False)


def unhook_transformer(transformer: torch.nn.Module) -> None:
    """Remove what :func:`hook_transformer` added."""
    unhook_blocks(block_stack(transformer)[0])
    unhook_block_inputs(transformer)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(SPECTRUM_CALL_HOOK, recurse=False)
    registry.invalidate_child_registries_cache()


def apply_spectrum(transformer: torch.nn.Module, config: Optional[SpectrumConfig] = None, first_step: int = 0,
                   total_steps: Optional[int] = None) -> None:
    """Make ``transformer`` forecast its block stack's output at the steps the schedule skips.

    State is kept per guidance branch (the pipeline's ``cache_context`` name) and cleared at the
    end of every pipeline call, at step 0 of every generation and whenever the feature shape,
    dtype or device changes. ``first_step``, ``total_steps``: the transformer runs only the
    pipeline's steps from ``first_step`` on, ``config.num_inference_steps`` of them, of
    ``total_steps`` (default: all of them; see :class:`SpectrumState`).
    """
    config = config if config is not None else SpectrumConfig()
    if not isinstance(config, SpectrumConfig):
        raise TypeError(f"config must be a SpectrumConfig, got {type(config).__name__}")
    if hasattr(transformer, _POLICY_ATTRIBUTE):
        raise ValueError("Spectrum is already applied to this transformer; call remove_spectrum first")
    policy = CacheContextPolicy(SpectrumState(config, first_step, total_steps))
    hook_transformer(transformer, policy, context=policy.context)
    setattr(transformer, _POLICY_ATTRIBUTE, policy)


def remove_spectrum(transformer: torch.nn.Module) -> None:
    """Remove the hooks ``apply_spectrum`` added; the transformer behaves exactly as before."""
    spectrum_policy(transformer)
    unhook_transformer(transformer)
    delattr(transformer, _POLICY_ATTRIBUTE)


def find_spectrum_policy(transformer: torch.nn.Module) -> Optional[CacheContextPolicy]:
    return getattr(transformer, _POLICY_ATTRIBUTE, None)


def spectrum_policy(transformer: torch.nn.Module) -> CacheContextPolicy:
    """What ``apply_spectrum`` put on ``transformer``: its hooks' policy, with the current call's
    ``row`` and the request's ``state``."""
    policy = find_spectrum_policy(transformer)
    if policy is None:
        raise ValueError("Spectrum is not applied to this transformer")
    return policy


def spectrum_state(transformer: torch.nn.Module) -> SpectrumState:
    """The :class:`SpectrumState` of a transformer ``apply_spectrum`` hooked."""
    return spectrum_policy(transformer).state


def spectrum_stats(transformer: torch.nn.Module) -> dict[str, dict]:
    """Per guidance branch, for the current or last generation: the steps that ran the block
    stack (``real_steps``, ``nfe`` of them), the forecast steps (``forecasts``), the blend
    weight of each forecast (``blend_weights``; with ``reuse`` a weight per predictor) and the peak bytes of forecaster state
    (``state_bytes``). With validation on (``blend_weight="auto"`` or the adaptive schedule)
    also the job-wide validation scores (``validation``: step, gap, relative errors of the
    linear, Chebyshev and blended forecasts, blend weight), the adaptive schedule's choices
    (``plan``) and the seconds spent validating on this rank (``validation_seconds``); these
    are shared by the branches."""
    return spectrum_state(transformer).stats()
