"""The Spectrum forecaster of one time series (one guidance branch on one rank)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .chebyshev import basis_row, linear_extrapolation_weights, ridge_forecast_weights
from .config import SpectrumConfig


class SpectrumForecaster:
    """Fits Chebyshev polynomials to the features of the real steps and forecasts the others.

    The fit is per element with one shared design matrix, so the state is kept as sufficient
    statistics that do not grow with the number of real steps:

    * ``moments``: ``X^T H`` as a ``(P, F)`` float32 tensor on the features' device, updated with
      one rank-1 product per real step (only when ``blend_weight > 0``);
    * the Gram matrix ``X^T X`` (``P x P``, float64, host) and the list of real steps;
    * the last two real features in their own dtype, for the local linear extrapolation of the
      blend (only when ``blend_weight < 1``).

    A forecast solves a ``P x P`` system on the host and then makes one weighted sum over the
    state with float32 accumulation. No copy of a history is ever made, and the host's numbers
    reach the device only as scalar arguments: neither an update nor a forecast copies to the
    device, which would make the host wait for the queued work (a CUDA stream synchronisation).

    With ``blend_weight="auto"`` or the adaptive schedule both parts of the state are kept, and
    ``score`` measures, at a real step, how well each predictor would have forecast it. With
    ``reuse`` the last real feature itself (zero-order reuse, kept anyway) is a third predictor.
    """

    def __init__(self, config: SpectrumConfig):
        self.config = config
        w = config.blend_weight
        self._uses_chebyshev = config.validates or w > 0
        self._uses_extrapolation = config.validates or w < 1
        self.reset()

    def reset(self) -> None:
        """Drop all state; the next ``update`` starts a new time series."""
        self.real_steps: list[int] = []
        self._gram = np.zeros((self.config.num_basis, self.config.num_basis), dtype=np.float64)
        self._moments: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor state held now (host scalars not counted)."""
        tensors = (self._moments, self._last, self._previous)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def feature_shape(self) -> torch.Size | None:
        return self._shape

    @property
    def last_feature(self) -> torch.Tensor | None:
        """The feature of the latest real step, in its own shape and dtype (kept only when
        ``blend_weight < 1``; ``None`` otherwise or before the first update). Read-only: it
        is the forecaster's buffer, not a copy."""
        return None if self._last is None else self._last.view(self._shape)

    def update(self, step: int, features: torch.Tensor) -> None:
        """Record the feature computed at a real step. Steps must increase."""
        step = self._check_step(step)
        if self.real_steps and step <= self.real_steps[-1]:
            raise ValueError(f"update(step={step}) after step {self.real_steps[-1]}: steps must increase")
        features = features.detach()
        if self._shape is None:
            self._shape, self._dtype = features.shape, features.dtype
        elif features.shape != self._shape or features.dtype != self._dtype:
            raise ValueError(
                f"update(step={step}) got features of shape {tuple(features.shape)} and dtype "
                f"{features.dtype}, but this series holds {tuple(self._shape)} {self._dtype}; "
                "call reset() before starting a series of another shape")
        flat = features.reshape(-1)
        row = basis_row(step, self.config.num_inference_steps, self.config.degree)
        self._gram += np.outer(row, row)
        if self._uses_chebyshev:
            if self._moments is None:
                self._moments = torch.zeros(self.config.num_basis, flat.numel(),
                                            dtype=torch.float32, device=flat.device)
            flat32 = flat.to(torch.float32)
            for moment, weight in zip(self._moments, row.tolist()):
                moment.add_(flat32, alpha=weight)
        if self._uses_extrapolation:
            if self._last is None:
                self._last = flat.clone()
            else:
                if self._previous is None:
                    self._previous = torch.empty_like(self._last)
                self._previous, self._last = self._last, self._previous
                self._last.copy_(flat)
        self.real_steps.append(step)

    def forecast(self, step: int, blend_weight: float | tuple[float, ...] | None = None) -> torch.Tensor:
        """The forecast feature at ``step``: same shape, dtype and device as the features.

        ``blend_weight`` overrides the config's weight (required when it is ``"auto"``); a tuple
        gives one weight per predictor of ``config.predictors`` (an affine combination)."""
        step = self._check_step(step)
        if not self.real_steps:
            raise RuntimeError(f"forecast(step={step}) before any real step: call update() first")
        if isinstance(blend_weight, tuple):
            return self._combination(step, blend_weight)
        w = self.config.blend_weight if blend_weight is None else blend_weight
        if w == "auto":
            raise ValueError("blend_weight is 'auto': pass the weight to use, forecast(step, blend_weight=w)")
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"blend_weight must be in [0, 1], got {w!r}")
        if (w > 0 and not self._uses_chebyshev) or (w < 1 and not self._uses_extrapolation):
            raise ValueError(f"blend_weight {w} needs state this forecaster does not keep "
                             f"(configured blend_weight {self.config.blend_weight})")
        out = self._chebyshev(step, scale=w) if w > 0 else None
        if w < 1:
            out = self._add_linear(out, step, scale=1 - w)
        return out.view(self._shape).to(self._dtype)

    def _combination(self, step: int, weights: tuple[float, ...]) -> torch.Tensor:
        """``sum_i weights[i] P_i`` over the predictors ``P`` of ``config.predictors``."""
        if len(weights) != len(self.config.predictors) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"need {len(self.config.predictors)} finite weights for {self.config.predictors}, "
                             f"got {weights!r}")
        on_linear, on_chebyshev, *on_reuse = weights
        out = self._chebyshev(step, scale=on_chebyshev)
        self._add_linear(out, step, scale=on_linear)
        if on_reuse:
            out.add_(self._last, alpha=on_reuse[0])
        return out.view(self._shape).to(self._dtype)

    def score(self, step: int, features: torch.Tensor) -> torch.Tensor | None:
        """How well the state forecasts the feature just computed at real step ``step``.

        Call before ``update(step, features)``. With the errors ``e_i = P_i - h`` of the
        predictors of ``config.predictors`` (``T``: local linear extrapolation, ``C``: Chebyshev
        forecast, ``R``: reuse of the last real feature; ``h``: the feature) returns the float64
        sums over this series' elements ``<e_i, e_j>`` in the order of :func:`gram_pairs` (with
        T and C: ``[|T-h|^2, |C-h|^2, <T-h, C-h>]``), then ``|h|^2``, on the features' device, or
        ``None`` while fewer than two real steps are held. The squared error of any combination
        ``sum_i w_i P_i`` with ``sum_i w_i = 1`` is ``w^T G w`` in this Gram matrix ``G``, so every
        weighting is scored from these numbers, and sums over shards are the scores of the whole
        feature.
        """
        step = self._check_step(step)
        if not (self._uses_chebyshev and self._uses_extrapolation):
            raise RuntimeError("score() needs both predictors' state: use blend_weight='auto' or the adaptive schedule")
        if len(self.real_steps) < 2:
            return None
        if step <= self.real_steps[-1]:
            raise ValueError(f"score(step={step}) after step {self.real_steps[-1]}: score a new step, before update()")
        h = features.detach().reshape(-1)
        if h.numel() != self._shape.numel():
            raise ValueError(f"score(step={step}) got {h.numel()} elements, this series holds {self._shape.numel()}")
        errors = [self._add_linear(None, step).sub_(h), self._chebyshev(step).sub_(h)]
        if self.config.reuse:
            errors.append(self._last.to(torch.float32).sub(h))
        gram = _gram64(errors + [h])
        k = len(errors)
        return torch.stack([gram[i, j] for i, j in gram_pairs(k)] + [gram[k, k]])

    def _add_linear(self, out: torch.Tensor | None, step: int, scale: float = 1.0) -> torch.Tensor:
        """``out`` (flat float32, or ``None`` for a new tensor) plus ``scale`` times the local
        linear extrapolation at ``step``, accumulated in float32."""
        on_last, on_previous = linear_extrapolation_weights(step, self.real_steps)
        if out is None:
            out = self._last.to(torch.float32, copy=True).mul_(scale * on_last)
        else:
            out.add_(self._last, alpha=scale * on_last)
        if on_previous != 0.0:
            out.add_(self._previous, alpha=scale * on_previous)
        return out

    def _chebyshev(self, step: int, scale: float = 1.0) -> torch.Tensor:
        """``scale`` times the Chebyshev forecast at ``step``, flat float32 (a new tensor)."""
        target = basis_row(step, self.config.num_inference_steps, self.config.degree)
        first, *rest = (scale * ridge_forecast_weights(self._gram, target, self.config.ridge_lambda)).tolist()
        out = self._moments[0].mul(first)
        for moment, weight in zip(self._moments[1:], rest):
            out.add_(moment, alpha=weight)
        return out

    def _check_step(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"step must be an integer, got {step!r}")
        step = int(step)
        if not 0 <= step < self.config.num_inference_steps:
            raise ValueError(f"step must be in [0, {self.config.num_inference_steps}), got {step}")
        return step


def gram_pairs(k: int) -> list[tuple[int, int]]:
    """The entries of a symmetric ``k x k`` Gram matrix that ``score`` sums: the diagonal, then
    the pairs above it in row order (``k(k+1)/2`` numbers)."""
    return [(i, i) for i in range(k)] + [(i, j) for i in range(k) for j in range(i + 1, k)]


def _gram64(vectors: list[torch.Tensor], chunk: int = 1 << 20) -> torch.Tensor:
    """``G_ij = <v_i, v_j>`` of flat tensors accumulated in float64: one matrix product per
    chunk (not one reduction per pair), a chunk at a time (no float64 copy of a whole vector)."""
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64, device=vectors[0].device)
    for start in range(0, vectors[0].numel(), chunk):
        block = torch.stack([v[start:start + chunk].to(torch.float64) for v in vectors])
        gram += block @ block.T
    return gram
