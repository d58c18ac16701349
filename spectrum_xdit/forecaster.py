"""The Spectrum forecaster of one time series (one guidance branch on one rank)."""

from __future__ import annotations

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
    state with float32 accumulation. No copy of a history is ever made.
    """

    def __init__(self, config: SpectrumConfig):
        self.config = config
        self._uses_chebyshev = config.blend_weight > 0
        self._uses_extrapolation = config.blend_weight < 1
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
            row_t = torch.as_tensor(row, dtype=torch.float32).to(flat.device)
            self._moments.addr_(row_t, flat.to(torch.float32))
        if self._uses_extrapolation:
            if self._last is None:
                self._last = flat.clone()
            else:
                if self._previous is None:
                    self._previous = torch.empty_like(self._last)
                self._previous, self._last = self._last, self._previous
                self._last.copy_(flat)
        self.real_steps.append(step)

    def forecast(self, step: int) -> torch.Tensor:
        """The forecast feature at ``step``: same shape, dtype and device as the features."""
        step = self._check_step(step)
        if not self.real_steps:
            raise RuntimeError(f"forecast(step={step}) before any real step: call update() first")
        w = self.config.blend_weight
        out = None
        if self._uses_chebyshev:
            target = basis_row(step, self.config.num_inference_steps, self.config.degree)
            weights = w * ridge_forecast_weights(self._gram, target, self.config.ridge_lambda)
            weights_t = torch.as_tensor(weights, dtype=torch.float32).to(self._moments.device)
            out = weights_t @ self._moments
        if self._uses_extrapolation:
            on_last, on_previous = linear_extrapolation_weights(step, self.real_steps)
            if out is None:
                out = self._last.to(torch.float32, copy=True).mul_((1 - w) * on_last)
            else:
                out.add_(self._last, alpha=(1 - w) * on_last)
            if on_previous != 0.0:
                out.add_(self._previous, alpha=(1 - w) * on_previous)
        return out.view(self._shape).to(self._dtype)

    def _check_step(self, step) -> int:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"step must be an integer, got {step!r}")
        step = int(step)
        if not 0 <= step < self.config.num_inference_steps:
            raise ValueError(f"step must be in [0, {self.config.num_inference_steps}), got {step}")
        return step
