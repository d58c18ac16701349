"""Host-side float64 math of the Spectrum fit: the time axis, the Chebyshev basis and the
small ridge solve. Nothing here touches a feature tensor."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.polynomial.chebyshev import chebvander


def step_to_tau(step, num_inference_steps: int) -> np.ndarray:
    """Map denoising step indices ``s`` to ``tau = 2 s / S - 1`` in float64."""
    return 2.0 * np.asarray(step, dtype=np.float64) / num_inference_steps - 1.0


@lru_cache(maxsize=4096)
def basis_row(step: int, num_inference_steps: int, degree: int) -> np.ndarray:
    """``[T_0(tau), ..., T_M(tau)]`` at one step, float64, shape ``(degree + 1,)``; read-only,
    because it is cached (every update, forecast and score of every branch asks for one, and
    numpy's Vandermonde costs more than the forecast's own arithmetic on a small latent)."""
    row = chebvander(step_to_tau([step], num_inference_steps), degree)[0]
    row.flags.writeable = False
    return row


def ridge_forecast_weights(gram: np.ndarray, target_row: np.ndarray, ridge_lambda: float) -> np.ndarray:
    """Weights ``b`` with ``x*^T C = b^T (X^T H)`` for the ridge fit ``C``.

    ``C = (X^T X + lambda I)^{-1} X^T H``, and the regularised Gram matrix is symmetric, so the
    forecast is ``((X^T X + lambda I)^{-1} x*)^T (X^T H)``: one P x P solve instead of a solve
    with F right-hand sides. With ``lambda == 0`` the pseudo-inverse gives the minimum-norm
    least-squares forecast, which stays defined while fewer than P steps have been seen.
    """
    if ridge_lambda > 0:
        regularised = gram + ridge_lambda * np.eye(gram.shape[0])
        return np.linalg.solve(regularised, target_row)
    return np.linalg.pinv(gram, hermitian=True) @ target_row


def linear_extrapolation_weights(target_step: int, last_steps: list[int]) -> tuple[float, float]:
    """Weights ``(on h_K, on h_{K-1})`` of ``h_K + k (h_K - h_{K-1})``, ``k = (s* - s_K) / (s_K - s_{K-1})``.

    With a single real step the extrapolation is the last feature itself.
    """
    if len(last_steps) < 2:
        return 1.0, 0.0
    previous, last = last_steps[-2], last_steps[-1]
    k = (target_step - last) / (last - previous)
    return 1.0 + k, -k
