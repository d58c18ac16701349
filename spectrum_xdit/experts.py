"""Spectrum on every expert of a pipeline: Wan2.2's ``transformer`` (high noise) and
``transformer_2`` (low noise), or the one ``transformer`` of Wan2.1 and FLUX.1.

diffusers' ``WanPipeline`` gives step ``i`` to ``transformer`` while its timestep is at least
``boundary_ratio * num_train_timesteps`` and to ``transformer_2`` after that, so each expert runs
one contiguous part of the steps. Each expert gets its own state (``spectrum_xdit.hooks``) whose
config counts that expert's own steps: the paper schedule's warm-up and growing window, the
adaptive controller and the Chebyshev time axis all start over at the expert's first step, so
the second expert warms up from its own real steps and no fit ever sees the other expert's
features (their block stacks are different networks). The stats keep the pipeline's step indices.

A budget (``target_nfe`` or ``speedup``) is the pipeline's: each expert gets the share of it that
its share of the steps gives (largest remainders, at least 1 and at most its steps), so the experts'
budgets add up to the total and a generation never runs more than ``target_nfe`` block-stack
evaluations per branch over both experts.
"""

from __future__ import annotations

import math
from typing import Any

from .config import SettingError, SpectrumConfig
from .hooks import SpectrumState, apply_spectrum, find_spectrum_policy, remove_spectrum, spectrum_stats

EXPERTS = ("transformer", "transformer_2")


def pipeline_experts(pipe: Any) -> dict[str, Any]:
    """The transformers of ``pipe``, by attribute name (``transformer``, and ``transformer_2`` when set)."""
    experts = {name: getattr(pipe, name, None) for name in EXPERTS}
    return {name: module for name, module in experts.items() if module is not None}


def expert_steps(pipe: Any, num_inference_steps: int) -> dict[str, range]:
    """The pipeline steps each expert of ``pipe`` runs in a ``num_inference_steps``-step call, split
    as WanPipeline's loop splits them (on a fresh copy of its scheduler); an expert may run none.
    A pipeline without ``boundary_ratio`` runs ``transformer`` at every step."""
    boundary_ratio = pipe.config.get("boundary_ratio")
    if boundary_ratio is None:
        return {"transformer": range(num_inference_steps)}
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    high = [step for step, t in enumerate(scheduler.timesteps) if t >= boundary]
    if high != list(range(len(high))):
        raise ValueError(f"the scheduler's timesteps do not decrease, so the steps at or above the boundary "
                         f"{boundary} ({high}) are not the first ones: the experts' steps are not contiguous")
    return {"transformer": range(len(high)), "transformer_2": range(len(high), len(scheduler.timesteps))}


def expert_configs(config: SpectrumConfig, split: dict[str, range]) -> dict[str, SpectrumConfig]:
    """Each expert's own config for a ``config.num_inference_steps``-step call split as ``split``
    (:func:`expert_steps`): its own step count and its share of a budget; experts that run no
    step get none."""
    sizes = {name: len(steps) for name, steps in split.items() if steps}
    budgets = {} if config.nfe_budget is None else share_budget(config.nfe_budget, sizes)
    configs = {}
    for name in sizes:
        own = {"num_inference_steps": sizes[name]}
        if name in budgets:
            own.update(target_nfe=budgets[name], speedup=None)
        configs[name] = SpectrumConfig(**{**config.model_dump(), **own})
    return configs


def expert_states(config: SpectrumConfig, split: dict[str, range]) -> dict[str, SpectrumState]:
    """A request's :class:`~spectrum_xdit.hooks.SpectrumState` per expert, for a caller that runs
    the denoising loop itself (the step loop); the same states :func:`apply_spectrum_to_pipeline`
    gives a pipeline's own loop."""
    return {name: SpectrumState(own, split[name].start, config.num_inference_steps)
            for name, own in expert_configs(config, split).items()}


def apply_spectrum_to_pipeline(pipe: Any, config: SpectrumConfig) -> dict[str, range]:
    """Apply Spectrum to each expert of ``pipe`` for calls of ``config.num_inference_steps`` steps,
    each with that config over its own steps; returns the split (:func:`expert_steps`)."""
    split = expert_steps(pipe, config.num_inference_steps)
    for name, own in expert_configs(config, split).items():
        apply_spectrum(getattr(pipe, name), own, first_step=split[name].start, total_steps=config.num_inference_steps)
    return split


def share_budget(budget: int, sizes: dict[str, int]) -> dict[str, int]:
    """``budget`` real steps split over experts running ``sizes`` steps, in proportion (largest
    remainders), each at least 1 (a forecast needs history) and at most its steps."""
    if budget < len(sizes):
        raise SettingError("target_nfe", f"{len(sizes)} experts run at least one real step each, so the budget must "
                                         f"be at least {len(sizes)}, got {budget}")
    total = sum(sizes.values())
    exact = {name: budget * size / total for name, size in sizes.items()}
    shares = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(sizes, key=lambda name: exact[name] - shares[name], reverse=True)
    for name in by_remainder[:budget - sum(shares.values())]:
        shares[name] += 1
    for name in [name for name, share in shares.items() if share == 0]:
        shares[max(shares, key=shares.get)] -= 1
        shares[name] = 1
    return shares


def _hooked_experts(pipe: Any) -> dict[str, Any]:
    return {name: module for name, module in pipeline_experts(pipe).items() if find_spectrum_policy(module) is not None}


def remove_spectrum_from_pipeline(pipe: Any) -> None:
    """Remove Spectrum from every expert of ``pipe`` that has it."""
    for module in _hooked_experts(pipe).values():
        remove_spectrum(module)


def pipeline_spectrum_stats(pipe: Any) -> dict[str, dict[str, dict]]:
    """``spectrum_stats`` of each expert that has Spectrum, by its pipeline attribute name."""
    return {name: spectrum_stats(module) for name, module in _hooked_experts(pipe).items()}
