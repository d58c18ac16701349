"""The forecast error against the gap to the last real step, fitted to the validations seen.

Every validation scores a forecast at the gap ``g`` it actually had (``control.py``), so a
generation's validations are samples ``(g_i, e_i)`` of one curve. The model is a power law
``e(g) = k g^p``, in logs ``y = log e = log k + p x`` with ``x = log g``.

Exponent: least squares over all of the generation's validations alike, with a ridge pull toward
``PRIOR_EXPONENT`` of weight ``PRIOR_WEIGHT``,

    minimise  sum_i (y_i - c - p x_i)^2 + rho (p - p0)^2,

so with means ``x_bar``, ``y_bar`` and central sums ``Sxx = sum (x - x_bar)^2`` and
``Sxy = sum (x - x_bar)(y - y_bar)``: ``p = (Sxy + rho p0) / (Sxx + rho)``. All alike, not
recency-weighted: a schedule settles on one gap for a stretch, and the latest few validations
alone would often have no spread of gaps to tell ``p`` by. Validations at a single gap
(``Sxx = 0``) give ``p = p0``; the evidence grows with their number, and ``rho = 0.5`` weighs as
much as four validations at gaps a factor 2 apart (``Sxx = 4 log(2)^2 / 4``). ``p`` is kept in ``[MIN_EXPONENT, MAX_EXPONENT]`` so that
the error always grows with the gap.

Level: ``level_i = y_i - p x_i`` is validation ``i``'s ``log k``. The current level is their mean
with weight ``alpha (1 - alpha)^age`` (``alpha`` the controller's ``error_smoothing``: the
newest weighs most, as in its other averages), because the level changes along the trajectory.

Why not ``k g^2``, the error of a first-order extrapolation of a smooth trajectory: measured on
both trained models (``python -m benchmarks.gap_error``, 3 held-out seeds each, every step real
and each predictor scored at gaps 1 to 8), the error grows about linearly with the gap: ``p``
between 0.68 and 1.22 for every predictor and their best combination, by thirds of the trajectory.
A quadratic calibrated at one gap over-predicts the error of a longer one, so it placed real steps
closer than needed, and under-reacted to a validation that came in above or below the target.
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
