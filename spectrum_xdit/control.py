"""Which steps run the block stack, and which blend a forecast uses: one decision for the whole job.

With the paper's schedule and a fixed blend weight this is the fixed rule of ``schedule.py``.
With ``blend_weight="auto"`` or the adaptive or budget schedule every real step is first a test
of the predictors (``SpectrumForecaster.score``): the sums of their errors over the elements,
added over the guidance branches and all-reduced over every rank of the job (once per real step,
at the first call of the next step). So every rank holds the same numbers and takes the same
decisions, and no rank skips a collective that another enters. The reduced sums travel to the host
without blocking it (:class:`HostCopy`); the host waits for them only when a decision reads them.

From exponentially weighted averages of those sums the controller takes:

- the blend: the weight of least validated error, ``w* = (A - X) / (A + B - 2X)`` clipped to
  [0, 1], or with ``reuse`` the affine weights ``G^-1 1 / (1^T G^-1 1)`` of the three predictors;
- the adaptive schedule's next real step: the largest gap whose error, predicted by the power law
  of ``error_model.py``, stays within ``error_budget``;
- the budget schedule's next real step: the budget left spread evenly up to a tail of consecutive
  real steps at the end, each gap stretched by ``sqrt(k_ref / k)`` within ``[1/2, 2]``, so that a
  generation never runs more than ``target_nfe`` real steps.

The derivations, and why degree and ridge are not scored online: docs/method.md ("Validation",
"The adaptive schedule", "The budget schedule"). How the tail's default was chosen:
benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterator

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
        self.clock = ValidationClock()
        self.start()

    def start(self) -> None:
        """A new generation: forget the steps and every average."""
        self.step: int | None = None
        self.last_real: int | None = None
        self._planned_from: int | None = None
        self.next_real = 0
        self._pending: tuple[int, int, torch.Tensor] | None = None
        self._unread: tuple[int, int, HostCopy] | None = None          # reduced, on its way to the host
        self._averages: tuple[float, ...] | None = None            # the Gram entries over n
        self.errors = GapErrorModel(self.config.error_smoothing)    # e(g) = k g^p
        self._pace: float | None = None                             # the budget's k: error / gap^2
        self._pace_sum, self._pace_count = 0.0, 0                   # for k_ref, the mean k
        self.real_count = 0
        self._weight: float | tuple[float, ...] = self._initial_weight()
        self._log: list[dict] = []
        self.plan: list[dict] = []
        self.clock.reset()

    @property
    def weight(self) -> float | tuple[float, ...]:
        """The blend weight of the next forecast (with ``reuse``, one per predictor)."""
        self._read()
        return self._weight

    @property
    def log(self) -> list[dict]:
        """One entry per validated real step: its gap, each predictor's and the blend's error."""
        self._read()
        return self._log

    @property
    def validation_seconds(self) -> float:
        """Seconds of this rank's validation work in the current generation (:class:`ValidationClock`)."""
        return self.clock.seconds

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

    def observe(self, step: int, gap: int, sums: torch.Tensor) -> None:
        """Add one branch's validation sums of real step ``step`` (scored at ``gap``)."""
        if self._pending is not None and self._pending[0] == step:
            _, pending_gap, total = self._pending
            if pending_gap != gap:
                raise RuntimeError(f"branches validated step {step} at different gaps ({pending_gap}, {gap})")
            self._pending = (step, gap, total + sums)
        else:
            self._pending = (step, gap, sums.clone())

    # -- decisions ------------------------------------------------------------------------------

    def _settle(self) -> None:
        """Reduce the last real step's sums over the job and start their copy to the host; the
        adaptive and budget schedules plan the next real step from them now, the blend reads them
        at the next forecast."""
        if self._pending is None:
            return
        self._read()
        step, gap, sums = self._pending
        self._pending = None
        with self.clock.timing(sums.device):
            reduced = self.reducer(sums)
        self._unread = (step, gap, HostCopy(reduced))

    def _read(self) -> None:
        if self._unread is None:
            return
        step, gap, copy = self._unread
        self._unread = None
        *entries, n = copy.values()
        if not n > 0:
            return   # an all-zero feature says nothing about relative error
        new = tuple(entry / n for entry in entries)
        alpha = self.config.error_smoothing
        self._averages = new if self._averages is None else tuple(
            alpha * x + (1 - alpha) * y for x, y in zip(new, self._averages))
        k = len(self.predictors)
        if k == 2:
            if self.auto_blend:
                self._weight = best_blend_weight(*self._averages)
            error = blend_error(self._weight, *new)
        else:
            self._weight = tuple(float(w) for w in best_combination(gram_matrix(self._averages, k)))
            error = combination_error(self._weight, gram_matrix(new, k))
        self.errors.observe(gap, error)
        self._pace = error / gap ** 2 if self._pace is None else alpha * error / gap ** 2 + (1 - alpha) * self._pace
        self._pace_sum += error / gap ** 2
        self._pace_count += 1
        self._log.append({"step": step, "gap": gap,
                          **{name: math.sqrt(max(new[i], 0.0)) for i, name in enumerate(self.predictors)},
                          "blend": error, "blend_weight": self._weight})

    def _initial_weight(self) -> float | tuple[float, ...]:
        if len(self.predictors) > 2:
            return (1 / len(self.predictors),) * len(self.predictors)
        return DEFAULT_AUTO_WEIGHT if self.auto_blend else self.config.blend_weight

    def _plan(self) -> None:
        self._read()
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
        """The gap to the next real step under the budget (docs/method.md), ``None`` for none."""
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


class HostCopy:
    """A small device tensor's values on their way to the host: on a GPU a non-blocking copy into
    pinned memory and an event after it, so that the host queues on and waits (for that point of
    the stream only) when it reads the values; elsewhere the tensor itself."""

    def __init__(self, tensor: torch.Tensor):
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach()

    def values(self) -> list[float]:
        if self._event is not None:
            self._event.synchronize()
        return [float(v) for v in self._host.tolist()]


class ValidationClock:
    """Seconds of validation work: on a GPU CUDA events around it, so that the work is timed and not
    its launch (read at the end of a generation); elsewhere the wall clock."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._seconds = 0.0
        self._events: list = []

    @contextlib.contextmanager
    def timing(self, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._seconds += time.perf_counter() - t0

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1e3
        self._events.clear()
        return self._seconds
