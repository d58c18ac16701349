"""Configuration of the Spectrum forecaster (SPEC.md: schedule, basis, fit and blend)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields


SCHEDULES = ("paper", "adaptive")


@dataclass(frozen=True)
class SpectrumConfig:
    """Settings of one Spectrum run; every field is checked when the object is built.

    Args:
        num_inference_steps: number of denoising steps ``S`` of the sampler. The time axis of the
            fit is the step index mapped to ``tau = 2 s / S - 1``.
        warmup_steps: the first ``W`` steps always run the block stack.
        window_size: initial window ``N`` of the paper's schedule; after the warm-up a real step
            comes every ``floor(n)`` steps, with ``n`` starting at ``N``.
        flex_window: growth ``alpha`` of the window after each real step (0 gives a fixed
            interval of ``N``).
        degree: degree ``M`` of the Chebyshev basis ``T_0 .. T_M``.
        ridge_lambda: ridge penalty ``lambda`` of the fit. With 0 the minimum-norm least-squares
            solution is used.
        blend_weight: weight ``w`` of the Chebyshev forecast in the blend with the local linear
            extrapolation of the last two real features; 1 is the paper's pure forecaster.
            ``"auto"`` picks, at every forecast, the weight that minimises the recent validation
            error (see ``spectrum_xdit.control``).
        schedule: ``"paper"`` (the default: the fixed rule above) or ``"adaptive"``: after each
            real step the next one is the largest gap in ``[min_gap, max_gap]`` whose predicted
            forecast error stays within ``error_budget``. The first ``warmup_steps`` steps are
            real either way; ``window_size`` and ``flex_window`` only apply to ``"paper"``.
        error_budget: the largest relative L2 error of a forecast that the adaptive schedule
            accepts (0 runs every step).
        min_gap, max_gap: bounds on the distance between two real steps of the adaptive schedule.
        error_smoothing: weight of the newest validation in the exponentially weighted averages
            the controller keeps (1 uses the latest validation alone).
    """

    num_inference_steps: int = 50
    warmup_steps: int = 5
    window_size: float = 2
    flex_window: float = 0.75
    degree: int = 4
    ridge_lambda: float = 0.1
    blend_weight: float | str = 0.5
    schedule: str = "paper"
    error_budget: float = 0.05
    min_gap: int = 1
    max_gap: int = 8
    error_smoothing: float = 0.5

    def __post_init__(self) -> None:
        _require_int("num_inference_steps", self.num_inference_steps, minimum=1)
        _require_int("warmup_steps", self.warmup_steps, minimum=1,
                     why="the forecaster needs at least one real step before it can forecast")
        _require_real("window_size", self.window_size, minimum=1.0)
        _require_real("flex_window", self.flex_window, minimum=0.0)
        _require_int("degree", self.degree, minimum=0)
        _require_real("ridge_lambda", self.ridge_lambda, minimum=0.0)
        if self.blend_weight != "auto":
            _require_real("blend_weight", self.blend_weight, minimum=0.0, maximum=1.0, extra=' or "auto"')
        if self.schedule not in SCHEDULES:
            raise ValueError(f"SpectrumConfig.schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                             f"got {self.schedule!r}")
        _require_real("error_budget", self.error_budget, minimum=0.0)
        _require_int("min_gap", self.min_gap, minimum=1)
        _require_int("max_gap", self.max_gap, minimum=self.min_gap if isinstance(self.min_gap, int) else 1,
                     why="it cannot be below min_gap")
        _require_real("error_smoothing", self.error_smoothing, minimum=0.0, maximum=1.0)
        if self.error_smoothing == 0:
            raise ValueError("SpectrumConfig.error_smoothing must be in (0, 1], got 0 (the averages would never move)")

    @property
    def validates(self) -> bool:
        """Whether every real step is scored against the forecasts (auto blend or adaptive schedule)."""
        return self.blend_weight == "auto" or self.schedule == "adaptive"

    @property
    def num_basis(self) -> int:
        """Number of Chebyshev basis functions ``P = M + 1``."""
        return self.degree + 1

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _require_int(name: str, value, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"SpectrumConfig.{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        reason = f" ({why})" if why else ""
        raise ValueError(f"SpectrumConfig.{name} must be an integer >= {minimum}{reason}, got {value!r}")


def _require_real(name: str, value, minimum: float, maximum: float | None = None, extra: str = "") -> None:
    allowed = (f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]") + extra
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"SpectrumConfig.{name} must be a finite number {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"SpectrumConfig.{name} must be {allowed}, got {value!r}")


# The fields a user sets (num_inference_steps comes from the sampler), in flag order.
SETTINGS = tuple(f.name for f in fields(SpectrumConfig) if f.name != "num_inference_steps")
_INT_SETTINGS = ("warmup_steps", "degree", "min_gap", "max_gap")


def parse_setting(name: str, text: str):
    """A command-line value of setting ``name`` in its type (``blend_weight`` also takes "auto");
    raises ``ValueError`` naming the setting. Ranges are checked when the config is built."""
    if name not in SETTINGS:
        raise ValueError(f"unknown Spectrum setting {name!r}; known: {', '.join(SETTINGS)}")
    if name == "schedule" or (name == "blend_weight" and text == "auto"):
        return text
    try:
        return int(text) if name in _INT_SETTINGS else float(text)
    except ValueError:
        kind = "an integer" if name in _INT_SETTINGS else "a number" + (' or "auto"' if name == "blend_weight" else "")
        raise ValueError(f"{name} must be {kind}, got {text!r}") from None
