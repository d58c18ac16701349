"""The forecaster's numbers: reference vectors, a float64 oracle, the schedule and the config."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.polynomial.chebyshev import chebvander
from pydantic import ValidationError

from spectrum_xdit import SpectrumConfig, SpectrumForecaster, paper_schedule
from spectrum_xdit.config import validation_problems

# Produced by the reference implementation (docs/method.md, "Reference vectors"); shipped with the
# tests so that every clone checks against it.
REFERENCE = Path(__file__).resolve().parent / "data" / "spectrum_vectors.npz"


def _reference_cases():
    data = np.load(REFERENCE)
    case = 0
    while f"case{case}_params" in data:
        yield case, {key.split("_", 1)[1]: data[key] for key in data if key.startswith(f"case{case}_")}
        case += 1


def _config_from_params(params) -> SpectrumConfig:
    steps, warmup, window, flex, degree, lam, weight = params.tolist()
    return SpectrumConfig(num_inference_steps=int(steps), warmup_steps=int(warmup), window_size=window,
                          flex_window=flex, degree=int(degree), ridge_lambda=lam, blend_weight=weight)


def test_reference_vectors():
    cases = list(_reference_cases())
    assert len(cases) == 4
    for case, arrays in cases:
        config = _config_from_params(arrays["params"])
        real = paper_schedule(config.num_inference_steps, config.warmup_steps, config.window_size,
                              config.flex_window)
        assert real == arrays["real"].tolist(), f"case {case}: schedule differs from the reference"
        expected = dict(zip(arrays["pred_steps"].tolist(), arrays["pred"]))
        assert sorted(expected) == sorted(set(range(config.num_inference_steps)) - set(real))
        forecaster = SpectrumForecaster(config)
        trajectory = torch.from_numpy(arrays["traj"])
        for step in range(config.num_inference_steps):
            if step in real:
                forecaster.update(step, trajectory[step])
                continue
            got = forecaster.forecast(step).numpy()
            error = np.linalg.norm(got - expected[step]) / np.linalg.norm(expected[step])
            assert error < 1e-4, f"case {case} step {step}: relative L2 error {error:.2e}"


def _design(steps, config):
    return chebvander(2.0 * np.asarray(steps, dtype=np.float64) / config.num_inference_steps - 1.0,
                      config.degree)


def _oracle_forecast(steps, features, target, config):
    """Float64 straight from docs/method.md: chebvander design, ridge with F right-hand sides, blend.

    Also returns the conditioning of the float32 moment form at this forecast,
    ``|sum_m |w b_m| sum_k |X_km| |h_k|| / |forecast|`` with ``b = (X^T X + lambda I)^-1 x*``:
    the factor by which float32 rounding of the moments ``X^T H`` can be amplified.
    """
    lam, w = config.ridge_lambda, config.blend_weight
    X, H = _design(steps, config), np.stack(features).astype(np.float64)
    x_target = _design([target], config)[0]
    if lam > 0:
        C = np.linalg.solve(X.T @ X + lam * np.eye(config.num_basis), X.T @ H)
        b = np.linalg.solve(X.T @ X + lam * np.eye(config.num_basis), x_target)
    else:
        C = np.linalg.lstsq(X, H, rcond=None)[0]
        b = np.linalg.pinv(X.T @ X) @ x_target
    chebyshev = x_target @ C
    if len(steps) >= 2:
        k = (target - steps[-1]) / (steps[-1] - steps[-2])
        taylor = H[-1] + k * (H[-1] - H[-2])
    else:
        taylor = H[-1]
    forecast = (1 - w) * taylor + w * chebyshev
    magnitude = np.abs(w * b) @ (np.abs(X).T @ np.abs(H)) + (1 - w) * np.abs(taylor)
    return forecast, np.linalg.norm(magnitude) / np.linalg.norm(forecast)


@pytest.mark.parametrize("degree", [0, 2, 4, 6])
@pytest.mark.parametrize("ridge_lambda", [0.0, 0.1, 2.0])
@pytest.mark.parametrize("blend_weight", [0.0, 0.5, 1.0])
def test_float64_oracle(degree, ridge_lambda, blend_weight):
    """Matches float64 within float32 rounding of the state, amplified by the fit's conditioning.

    The state is float32 moments (docs/method.md), so an ill-conditioned fit (lambda = 0, clustered
    steps, far extrapolation) loses digits exactly as any float32 normal-equation solve does; the
    bound scales float32 epsilon by that conditioning, and a wrong formula misses it by orders of
    magnitude.
    """
    rng = np.random.default_rng(degree * 100 + int(ridge_lambda * 10) + int(blend_weight * 7))
    config = SpectrumConfig(num_inference_steps=30, degree=degree, ridge_lambda=ridge_lambda,
                            blend_weight=blend_weight)
    tau = np.linspace(-1, 1, 30)
    smooth = np.stack([np.sin(3 * tau + p) + 0.3 * np.cos(7 * tau * p) for p in rng.uniform(0, 2, 257)], 1)
    forecaster = SpectrumForecaster(config)
    steps, features = [], []
    checked = 0
    for step in sorted(rng.choice(30, size=12, replace=False).tolist()):
        feature = smooth[step].astype(np.float32)
        forecaster.update(step, torch.from_numpy(feature).view(1, 257))
        steps.append(step)
        features.append(feature)
        for target in range(steps[-1] + 1, min(steps[-1] + 6, 30)):
            got = forecaster.forecast(target).double().numpy().ravel()
            want, conditioning = _oracle_forecast(steps, features, target, config)
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            bound = 1e-6 + 4 * len(steps) * np.finfo(np.float32).eps * conditioning
            assert error <= bound, (
                f"K={len(steps)} target={target}: relative error {error:.2e} > bound {bound:.2e}")
            checked += 1
    assert checked > 20


def test_bf16_features_keep_dtype_and_device():
    config = SpectrumConfig(num_inference_steps=20)
    forecaster = SpectrumForecaster(config)
    torch.manual_seed(0)
    base = torch.randn(2, 64, 8)
    steps, features = [0, 1, 2, 3, 4, 6], []
    for step in steps:
        feature = (base * (1 + 0.05 * step) + 0.01 * step ** 2).to(torch.bfloat16)
        forecaster.update(step, feature)
        features.append(feature.float().numpy().ravel())
    got = forecaster.forecast(8)
    assert got.dtype == torch.bfloat16 and got.shape == base.shape and got.device == base.device
    want, _ = _oracle_forecast(steps, features, 8, config)
    error = np.linalg.norm(got.double().numpy().ravel() - want) / np.linalg.norm(want)
    assert error < 8e-3, f"bf16 forecast off the float64 oracle by {error:.2e}"


def test_state_does_not_grow_with_real_steps():
    config = SpectrumConfig()
    forecaster = SpectrumForecaster(config)
    feature = torch.randn(3, 100)
    sizes = []
    for step in range(10):
        forecaster.update(step, feature * step)
        sizes.append(forecaster.nbytes)
    # P float32 moments + the last two features for the blend, from the second step on.
    assert sizes[-1] == sizes[2] == (config.num_basis * 4 + 2 * 4) * feature.numel()
    pure_chebyshev = SpectrumForecaster(SpectrumConfig(blend_weight=1.0))
    pure_extrapolation = SpectrumForecaster(SpectrumConfig(blend_weight=0.0))
    for step in range(5):
        pure_chebyshev.update(step, feature.to(torch.bfloat16))
        pure_extrapolation.update(step, feature.to(torch.bfloat16))
    assert pure_chebyshev.nbytes == config.num_basis * 4 * feature.numel()
    assert pure_extrapolation.nbytes == 2 * 2 * feature.numel()
    forecaster.reset()
    assert forecaster.nbytes == 0 and forecaster.real_steps == []


def test_forecaster_rejects_misuse():
    forecaster = SpectrumForecaster(SpectrumConfig(num_inference_steps=10))
    with pytest.raises(RuntimeError, match="before any real step"):
        forecaster.forecast(3)
    forecaster.update(2, torch.zeros(4))
    with pytest.raises(ValueError, match="steps must increase"):
        forecaster.update(2, torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        forecaster.update(3, torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        forecaster.forecast(10)
    with pytest.raises(ValueError, match="integer"):
        forecaster.forecast(3.0)


@pytest.mark.parametrize("args,expected", [
    ((50, 5, 2, 0.75), [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]),
    ((50, 5, 2, 3.0), [0, 1, 2, 3, 4, 6, 11, 19, 30, 44]),
    ((20, 3, 3, 0.0), [0, 1, 2, 5, 8, 11, 14, 17]),
    ((12, 2, 2, 0.0), [0, 1, 3, 5, 7, 9, 11]),
    ((6, 6, 2, 0.75), [0, 1, 2, 3, 4, 5]),
    ((6, 9, 2, 0.75), [0, 1, 2, 3, 4, 5]),
    ((1, 5, 2, 0.75), [0]),
    ((1, 1, 2, 0.75), [0]),
    ((8, 1, 1, 0.0), list(range(8))),
    ((8, 1, 1, 0.5), [0, 1, 2, 4, 6]),
    ((10, 2, 2.9, 0.0), [0, 1, 3, 5, 7, 9]),
])
def test_paper_schedule(args, expected):
    assert paper_schedule(*args) == expected


@pytest.mark.parametrize("field,value,message", [
    ("num_inference_steps", 0, "greater than or equal to 1, got 0"),
    ("num_inference_steps", 50.0, "a valid integer, got 50.0"),
    ("num_inference_steps", True, "a valid integer, got True"),
    ("warmup_steps", 0, "greater than or equal to 1, got 0"),
    ("window_size", 0.5, "greater than or equal to 1, got 0.5"),
    ("flex_window", -0.1, "greater than or equal to 0, got -0.1"),
    ("degree", -1, "greater than or equal to 0, got -1"),
    ("degree", 2.5, "a valid integer, got 2.5"),
    ("ridge_lambda", -0.1, "greater than or equal to 0, got -0.1"),
    ("ridge_lambda", float("nan"), "a finite number, got nan"),
    ("blend_weight", 1.5, r'a number in \[0, 1\] or "auto", got 1.5'),
    ("blend_weight", -0.01, r'a number in \[0, 1\] or "auto", got -0.01'),
    ("blend_weight", "0.5", r'a number in \[0, 1\] or "auto", got \'0.5\''),
    ("extrapolation", 2, "unknown field"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message):
    with pytest.raises(ValidationError) as error:
        SpectrumConfig(**{field: value})
    assert isinstance(error.value, ValueError)
    (named, why), = validation_problems(error.value)
    assert named == field and re.search(message, why), (named, why)


def test_config_defaults_match_the_paper():
    config = SpectrumConfig()
    assert (config.num_inference_steps, config.warmup_steps, config.window_size, config.flex_window,
            config.degree, config.ridge_lambda, config.blend_weight) == (50, 5, 2, 0.75, 4, 0.1, 0.5)
    assert config.num_basis == 5
