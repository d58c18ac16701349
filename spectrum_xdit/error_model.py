"""The forecast error against the gap to the last real step, fitted to the validations seen.

Every validation scores a forecast at the gap ``g`` it actually had (``control.py``), so a
generation's validations are samples ``(g_i, e_i)`` of one curve, fitted by a power law
``e(g) = k g^p`` in logs:

- the exponent ``p`` by least squares over all the validations alike, pulled toward
  ``PRIOR_EXPONENT`` with weight ``PRIOR_WEIGHT`` (so ``p = p0`` while they are all at one gap),
  and kept in ``[MIN_EXPONENT, MAX_EXPONENT]`` so that the error always grows with the gap; all
  alike because a schedule settles on one gap for a stretch, and the latest few validations
  alone would often have no spread of gaps to tell ``p`` by;
- the level ``log k`` recency-weighted (the controller's ``error_smoothing``), because it changes
  along the trajectory.

The prior is 1, not the 2 of a first-order extrapolation of a smooth curve, because the measured
error grows about linearly with the gap (``python -m benchmarks.gap_error``); a quadratic
over-predicts longer gaps. The derivation: docs/method.md, "The error model"; the figures:
benchmarks/README.md.
"""

from __future__ import annotations

import math

PRIOR_EXPONENT = 1.0
PRIOR_WEIGHT = 0.5
MIN_EXPONENT, MAX_EXPONENT = 0.5, 3.0
# Exact forecasts (error 0) enter as this error, so that they have a logarithm: far below any
# budget, they let the schedule take its longest gap.
SMALLEST_ERROR = 1e-12


class GapErrorModel:
    """``e(g) = k g^p`` fitted to one generation's validations (module docstring)."""

    def __init__(self, smoothing: float):
        self.smoothing = smoothing
        self._x: list[float] = []
        self._y: list[float] = []
        self.exponent = PRIOR_EXPONENT
        self.level: float | None = None          # log k, recency-weighted

    @property
    def fitted(self) -> bool:
        return self.level is not None

    def observe(self, gap: int, error: float) -> None:
        """Add the relative error of a forecast made ``gap`` steps after the last real step, and refit."""
        self._x.append(math.log(gap))
        self._y.append(math.log(max(error, SMALLEST_ERROR)))
        n = len(self._x)
        x_bar, y_bar = sum(self._x) / n, sum(self._y) / n
        sxx = sum((x - x_bar) ** 2 for x in self._x)
        sxy = sum((x - x_bar) * (y - y_bar) for x, y in zip(self._x, self._y))
        p = (sxy + PRIOR_WEIGHT * PRIOR_EXPONENT) / (sxx + PRIOR_WEIGHT)
        self.exponent = min(MAX_EXPONENT, max(MIN_EXPONENT, p))
        alpha = self.smoothing
        weights = [alpha * (1 - alpha) ** (n - 1 - i) for i in range(n)]
        levels = [y - self.exponent * x for x, y in zip(self._x, self._y)]
        self.level = sum(w * level for w, level in zip(weights, levels)) / sum(weights)

    def predict(self, gap: float) -> float:
        """The predicted relative error at ``gap``."""
        return math.exp(self.level) * gap ** self.exponent

    def largest_gap(self, error: float) -> float:
        """The gap at which the predicted error reaches ``error`` (0 for error 0; beyond any gap
        a schedule allows when the forecasts were exact)."""
        if error <= 0:
            return 0.0
        return math.exp((math.log(error) - self.level) / self.exponent)
