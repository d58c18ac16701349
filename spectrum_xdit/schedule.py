"""The paper's schedule: which denoising steps run the block stack (docs/method.md, "The paper's schedule")."""

from __future__ import annotations

import math

from .config import SpectrumConfig


def fixed_real_steps(config: SpectrumConfig) -> frozenset[int]:
    """The steps that run the block stack whatever is measured: the whole paper schedule, or the
    warm-up of the adaptive and budget ones (whose later real steps the controller chooses); the
    budget's warm-up never exceeds the budget."""
    steps = config.num_inference_steps
    if config.schedule == "adaptive":
        return frozenset(range(min(config.warmup_steps, steps)))
    if config.schedule == "budget":
        return frozenset(range(min(config.warmup_steps, config.nfe_budget)))
    return frozenset(paper_schedule(steps, config.warmup_steps, config.window_size, config.flex_window))


def paper_schedule(num_inference_steps: int, warmup_steps: int, window_size: float,
                   flex_window: float) -> list[int]:
    """Return the steps, in order, at which the network runs for real.

    The first ``warmup_steps`` steps are real. After that a counter ``c`` of consecutive
    forecast steps is kept; a step is real when ``(c + 1) % floor(n) == 0``, and each real step
    after the warm-up grows the window ``n`` (starting at ``window_size``) by ``flex_window``,
    rounded to 3 decimals as the reference does. The result depends only on the step index, so
    every rank of a parallel job computes the same list without communicating.
    """
    real_steps = []
    window = window_size
    consecutive_forecasts = 0
    for step in range(num_inference_steps):
        if step < warmup_steps:
            is_real = True
        elif (consecutive_forecasts + 1) % math.floor(window) == 0:
            is_real = True
            window = round(window + flex_window, 3)
        else:
            is_real = False
        if is_real:
            real_steps.append(step)
            consecutive_forecasts = 0
        else:
            consecutive_forecasts += 1
    return real_steps
