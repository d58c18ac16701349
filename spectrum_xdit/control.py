"""Which steps run the block stack, and which blend a forecast uses: one decision for the whole job.

With the paper's schedule and a fixed blend weight this is the fixed rule of ``schedule.py``.
With ``blend_weight="auto"`` or ``schedule="adaptive"`` every real step is first used as a test
of the forecasters (``SpectrumForecaster.score``): before the new feature ``h`` joins the fit,
the local linear extrapolation ``T`` and the Chebyshev forecast ``C`` of that step are compared
with it through four sums, ``a = |T-h|^2``, ``b = |C-h|^2``, ``c = <T-h, C-h>``, ``n = |h|^2``.

Reduction. The sums of every guidance branch on this rank are added up, then summed over every
rank of the job (one all-reduce of four float64 numbers, at the first call of the next step), so
they are the sums over the whole latent of both branches, and every rank holds the same numbers
and takes the same decisions from them. Shards of one feature add up exactly because the sums are
over elements.

Blend. The controller keeps exponentially weighted averages (weight ``error_smoothing`` on the
newest) of ``a/n``, ``b/n`` and ``c/n``. The squared relative error of the blend
``(1-w) T + w C`` is ``(1-w)^2 A + w^2 B + 2 w (1-w) X`` in those averages; with ``"auto"`` a
forecast uses its minimiser ``w* = (A - X) / (A + B - 2X)``, clipped to [0, 1] (0.5 while no
validation has been seen or when the two predictors agree exactly).

More predictors. With ``reuse`` the last real feature ``R`` is a third predictor, and the sums are
the entries of the ``K x K`` Gram matrix ``G_ij = <P_i - h, P_j - h>`` of the predictors' errors
(``K(K+1)/2`` numbers, then ``n``; all in the same one all-reduce). For weights summing to 1 the
combination's error is ``sum_i w_i (P_i - h)``, of squared norm ``w^T G w``; minimising that
subject to ``1^T w = 1`` (a Lagrange multiplier: ``G w = mu 1``) gives ``w = G^-1 1 / (1^T G^-1 1)``,
computed on the averaged ``G`` plus a ridge of ``COMBINATION_RIDGE`` times its mean diagonal, so
that predictors that agree (a singular ``G``) still give finite weights. The weights are affine,
not clipped: a combination may extrapolate beyond its predictors. With ``T`` and ``C`` alone the
clipped two-predictor weight above is kept.

Degree and ridge are not scored online, though the fit's moments would give a lower degree or
another ridge for one more forecast each: scored offline the same way (``benchmarks.gap_error``,
degrees 2 to 6, ridges 0.01 to 1), the Chebyshev forecast alone moves by a factor of 4.6 in error,
but the least-error combination with ``T`` and reuse by at most 9% on digits-wan and 2.5% on
digits-flux: the combination already absorbs what the degree and the ridge would change.

Error model. Every validation is a sample of the blend's relative error at the gap it had; a
power law ``e(g) = k g^p`` fitted to them (``error_model.py``: its exponent ``p`` from the
validations at different gaps, ``p = 1`` until they differ, as measured on the trained models)
predicts the error of a gap not tried yet.

Schedule. For ``"adaptive"``, after real step ``s`` the next real step is ``s + g`` for the largest
``g`` in ``[min_gap, max_gap]`` with ``k g^p <= error_budget`` (``min_gap`` before the first
validation). Because a real step's own validation is at the gap ``g`` that was chosen, the
forecasts in between (gaps ``1 .. g-1``) are predicted to be within the budget too. The first
``warmup_steps`` steps are always real.

Budget. For ``"budget"`` the user gives the number ``B`` of real steps (``target_nfe``), not an
error level. The first ``min(warmup_steps, B)`` steps are real, and so are the last
``T = max(1, round(budget_tail * B))`` (the tail; the end of the trajectory is where the error of
a forecast grows fastest, ``benchmarks.gap_error``, and where it lands in the output unsmoothed).
Between them, after real step ``s`` with ``R`` real steps left before the tail and ``D`` steps from
``s`` to the tail's first step: if ``R = 0`` the next real step is the tail's first; if
``R >= D - 1`` every step is real; otherwise the even spread has gap ``D / (R + 1)``, stretched by
``sqrt(k_ref / k)`` with ``k`` the recency-weighted and ``k_ref`` the plain mean of the
validations' ``error / gap^2`` (a stretch harder than the generation's average gets real steps
closer together, an easier one further apart; the factor kept within ``[1/2, 2]``,
``MAX_BUDGET_STRETCH``), rounded and kept in ``[1, D - R]`` so that the ``R - 1`` real steps after
the next one and the tail still fit. So the generation uses exactly ``B`` real steps (``B`` per
branch; fewer only if warm-up and the steps left are shorter) and never more, whatever the model
does. The default ``budget_tail`` 0.2 was chosen on held-out seeds (``python -m
benchmarks.budget_tail``: 6 pairs of digits-wan, 50 steps): against no tail it took
``target_nfe=14`` from 39.4 to 45.7 dB and 10 from 32.1 to 35.4 (7, with a tail of one step,
unchanged at 20.1); 0.15 and 0.3 did no better. A pacing ratio at the power law's fitted exponent, or
of logs, was tried on the same seeds and did worse at 14 (by 2.0 and 6.4 dB, without a tail), so it
stays the quadratic's. Every input (the all-reduced
sums and the step counts) is the same on every rank, so every rank takes the same decisions.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .config import SpectrumConfig
from .error_model import GapErrorModel
from .forecaster import gram_pairs
from .schedule import fixed_real_steps

DEFAULT_AUTO_WEIGHT = 0.5
# The budget schedule moves a gap at most this factor from the even spread of the budget left, so
# that one validation (noisy, or of a stretch unlike the rest) cannot spend or hoard the budget.
MAX_BUDGET_STRETCH = 2.0
COMBINATION_RIDGE = 1e-9
# A predicted error on the adaptive schedule's budget up to rounding counts as within it.
GAP_ROUNDING = 1e-9


def all_reduce_over_job(sums: torch.Tensor) -> torch.Tensor:
    """Sum ``sums`` over every rank of the default process group (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return sums


class SpectrumController:
    """Run-or-forecast decisions and blend weights of one transformer, shared by its branches."""

    def __init__(self, config: SpectrumConfig, reducer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config
        self.reducer = reducer if reducer is not None else all_reduce_over_job
        self.adaptive = config.schedule != "paper"     # the controller chooses the real steps
        self.budget = config.nfe_budget
        self.auto_blend = config.blend_weight == "auto"
        self.predictors = config.predictors
        self.fixed_steps = fixed_real_steps(config)
        self.start()

    def start(self) -> None:
        """A new generation: forget the steps and every average."""
        self.step: int | None = None
        self.last_real: int | None = None
        self._planned_from: int | None = None
        self.next_real = 0
        self._pending: tuple[int, int, torch.Tensor] | None = None
        self._averages: tuple[float, ...] | None = None            # the Gram entries over n
        self.errors = GapErrorModel(self.config.error_smoothing)    # e(g) = k g^p
        self._pace: float | None = None                             # the budget's k: error / gap^2
        self._pace_sum, self._pace_count = 0.0, 0                   # for k_ref, the mean k
        self.real_count = 0
        self.weight: float | tuple[float, ...] = self._initial_weight()
        self.log: list[dict] = []
        self.plan: list[dict] = []
        self.validation_seconds = 0.0

    # -- called by the hooks ------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Every transformer call, before deciding: settle the previous step's validation."""
        if self.step is not None and step < self.step:
            self.start()
        if step == self.step:
            return
        self.step = step
        self._settle()
        if self.adaptive and self.last_real is not None and self._planned_from != self.last_real:
            self._plan()

    def is_real(self, step: int) -> bool:
        if step in self.fixed_steps:
            return True
        if not self.adaptive:
            return False
        return self.last_real is None or step >= self.next_real

    def mark_real(self, step: int) -> None:
        if self.last_real is None or step > self.last_real:
            self.last_real = step
            self.real_count += 1

    def observe(self, step: int, gap: int, sums: torch.Tensor, seconds: float = 0.0) -> None:
        """Add one branch's validation sums of real step ``step`` (scored at ``gap``)."""
        self.validation_seconds += seconds
        if self._pending is not None and self._pending[0] == step:
            _, pending_gap, total = self._pending
            if pending_gap != gap:
                raise RuntimeError(f"branches validated step {step} at different gaps ({pending_gap}, {gap})")
            self._pending = (step, gap, total + sums)
        else:
            self._pending = (step, gap, sums.clone())

    # -- decisions ------------------------------------------------------------------------------

    def _settle(self) -> None:
        if self._pending is None:
            return
        step, gap, sums = self._pending
        self._pending = None
        t0 = time.perf_counter()
        *entries, n = (float(v) for v in self.reducer(sums).cpu())
        self.validation_seconds += time.perf_counter() - t0
        if not n > 0:
            return   # an all-zero feature says nothing about relative error
        new = tuple(entry / n for entry in entries)
        alpha = self.config.error_smoothing
        self._averages = new if self._averages is None else tuple(
            alpha * x + (1 - alpha) * y for x, y in zip(new, self._averages))
        k = len(self.predictors)
        if k == 2:
            if self.auto_blend:
                self.weight = best_blend_weight(*self._averages)
            error = blend_error(self.weight, *new)
        else:
            self.weight = tuple(float(w) for w in best_combination(gram_matrix(self._averages, k)))
            error = combination_error(self.weight, gram_matrix(new, k))
        self.errors.observe(gap, error)
        self._pace = error / gap ** 2 if self._pace is None else alpha * error / gap ** 2 + (1 - alpha) * self._pace
        self._pace_sum += error / gap ** 2
        self._pace_count += 1
        self.log.append({"step": step, "gap": gap,
                         **{name: math.sqrt(max(new[i], 0.0)) for i, name in enumerate(self.predictors)},
                         "blend": error, "blend_weight": self.weight})

    def _initial_weight(self) -> float | tuple[float, ...]:
        if len(self.predictors) > 2:
            return (1 / len(self.predictors),) * len(self.predictors)
        return DEFAULT_AUTO_WEIGHT if self.auto_blend else self.config.blend_weight

    def _plan(self) -> None:
        s = self.last_real
        cfg = self.config
        if self.budget is not None:
            gap = self._budget_gap(s)
        elif s + 1 < cfg.warmup_steps:
            gap = 1
        elif not self.errors.fitted:
            gap = cfg.min_gap
        else:
            largest = self.errors.largest_gap(cfg.error_budget) + GAP_ROUNDING
            gap = cfg.max_gap if largest >= cfg.max_gap else max(cfg.min_gap, math.floor(largest))
        self.next_real = cfg.num_inference_steps if gap is None else s + gap
        self._planned_from = s
        fitted = self.errors.fitted and gap is not None
        self.plan.append({"after": s, "gap": gap, "predicted_error": self.errors.predict(gap) if fitted else None,
                          "exponent": self.errors.exponent if fitted else None})

    def _budget_gap(self, s: int) -> int | None:
        """The gap to the next real step under the budget (module docstring), ``None`` for none."""
        remaining = self.budget - self.real_count
        steps = self.config.num_inference_steps
        if remaining <= 0 or s >= steps - 1:
            return None
        tail = min(remaining, max(1, round(self.config.budget_tail * self.budget)))
        to_tail = steps - tail - s
        if s + 1 < self.config.warmup_steps or to_tail <= 1:
            return 1
        between = remaining - tail
        if between <= 0:
            return to_tail
        if between >= to_tail - 1:
            return 1
        factor = 1.0
        if self._pace is not None and self._pace_sum > 0:
            ratio = math.inf if self._pace == 0 else self._pace_sum / self._pace_count / self._pace
            factor = min(MAX_BUDGET_STRETCH, max(1 / MAX_BUDGET_STRETCH, math.sqrt(ratio)))
        return max(1, min(to_tail - between, round(to_tail / (between + 1) * factor)))


def blend_error(w: float, a: float, b: float, c: float) -> float:
    """Relative L2 error of ``(1-w) T + w C`` from the normalised sums ``|T-h|^2/n, |C-h|^2/n, <T-h, C-h>/n``."""
    return math.sqrt(max((1 - w) ** 2 * a + w ** 2 * b + 2 * w * (1 - w) * c, 0.0))


def best_blend_weight(a: float, b: float, c: float) -> float:
    """The ``w`` in [0, 1] minimising ``(1-w)^2 a + w^2 b + 2 w (1-w) c``."""
    curvature = a + b - 2 * c          # |T - C|^2 / n >= 0
    if not curvature > 0:
        return DEFAULT_AUTO_WEIGHT
    return min(1.0, max(0.0, (a - c) / curvature))


def gram_matrix(entries, k: int) -> np.ndarray:
    """The symmetric ``k x k`` matrix of the entries in :func:`gram_pairs` order."""
    gram = np.empty((k, k))
    for (i, j), value in zip(gram_pairs(k), entries):
        gram[i, j] = gram[j, i] = value
    return gram


def best_combination(gram: np.ndarray) -> np.ndarray:
    """The weights ``w`` with ``sum(w) = 1`` minimising ``w^T G w``: ``G^-1 1 / (1^T G^-1 1)``
    with a small ridge on ``G`` (equal weights when every predictor was exact)."""
    k = len(gram)
    scale = float(np.trace(gram)) / k
    if not scale > 0:
        return np.full(k, 1 / k)
    x = np.linalg.solve(gram + COMBINATION_RIDGE * scale * np.eye(k), np.ones(k))
    return x / x.sum()


def combination_error(weights, gram: np.ndarray) -> float:
    """Relative L2 error of ``sum_i w_i P_i`` from the normalised Gram matrix of the errors."""
    w = np.asarray(weights)
    return math.sqrt(max(float(w @ gram @ w), 0.0))
