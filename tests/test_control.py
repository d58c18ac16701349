"""Error-controlled Spectrum: validation scores, the blend they pick and the adaptive schedule."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial.chebyshev import chebvander

from spectrum_xdit import SpectrumConfig, SpectrumForecaster, apply_spectrum, spectrum_stats
from spectrum_xdit.control import SpectrumController, best_blend_weight, blend_error
from spectrum_xdit.error_model import MIN_EXPONENT, PRIOR_EXPONENT, PRIOR_WEIGHT, GapErrorModel
from spectrum_xdit.hooks import spectrum_state
from spectrum_xdit.models.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline

STEPS = 30
HISTORY = [0, 1, 2, 4, 7]
TARGET = 10


def _trajectory(shape=(3, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    base, slope, curve = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return lambda s: base + slope * (s / STEPS) + curve * torch.sin(torch.tensor(3.0 * s / STEPS))


def _float64_forecasts(config, trajectory):
    """T and C at TARGET from the history, recomputed from scratch in float64."""
    feats = torch.stack([trajectory(s).to(torch.float32).double().reshape(-1) for s in HISTORY])
    x = chebvander(2.0 * np.array(HISTORY) / STEPS - 1, config.degree)
    gram = x.T @ x + config.ridge_lambda * np.eye(config.num_basis)
    coefficients = np.linalg.solve(gram, x.T @ feats.numpy())
    target = chebvander(np.array([2.0 * TARGET / STEPS - 1]), config.degree)[0]
    chebyshev = torch.from_numpy(target @ coefficients)
    k = (TARGET - HISTORY[-1]) / (HISTORY[-1] - HISTORY[-2])
    linear = feats[-1] + k * (feats[-1] - feats[-2])
    return linear, chebyshev


@pytest.mark.parametrize("blend", [0.5, "auto"])
def test_scores_equal_a_float64_recomputation(blend):
    config = SpectrumConfig(num_inference_steps=STEPS, blend_weight=blend, schedule="adaptive")
    trajectory = _trajectory()
    forecaster = SpectrumForecaster(config)
    for s in HISTORY:
        forecaster.update(s, trajectory(s).to(torch.float32))
    h = trajectory(TARGET).to(torch.float32)
    a, b, c, n = forecaster.score(TARGET, h).tolist()
    linear, chebyshev = _float64_forecasts(config, trajectory)
    h64 = h.double().reshape(-1)
    expected = [((linear - h64) ** 2).sum(), ((chebyshev - h64) ** 2).sum(),
                ((linear - h64) * (chebyshev - h64)).sum(), (h64 ** 2).sum()]
    assert [a, b, c, n] == pytest.approx([float(e) for e in expected], rel=1e-5)


def test_blend_error_from_three_inner_products_equals_the_direct_error():
    config = SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto")
    trajectory = _trajectory(seed=3)
    forecaster = SpectrumForecaster(config)
    for s in HISTORY:
        forecaster.update(s, trajectory(s).to(torch.float32))
    h = trajectory(TARGET).to(torch.float32)
    a, b, c, n = forecaster.score(TARGET, h).tolist()
    for w in (0.0, 0.2, 0.5, 0.77, 1.0):
        direct = forecaster.forecast(TARGET, blend_weight=w).double()
        error = ((direct - h.double()).norm() / h.double().norm()).item()
        assert blend_error(w, a / n, b / n, c / n) == pytest.approx(error, rel=1e-5), w


def test_best_blend_weight_minimises_the_blend_error():
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 2001)
    for _ in range(50):
        t, c_ = rng.normal(size=(2, 20))
        a, b, x = t @ t, c_ @ c_, t @ c_
        w = best_blend_weight(a, b, x)
        assert 0.0 <= w <= 1.0
        best_on_grid = min(blend_error(g, a, b, x) for g in grid)
        assert blend_error(w, a, b, x) <= best_on_grid + 1e-9
    # identical predictors: every weight is as good; the default is kept
    assert best_blend_weight(1.0, 1.0, 1.0) == 0.5


def test_score_needs_history_and_both_predictors():
    trajectory = _trajectory()
    fixed = SpectrumForecaster(SpectrumConfig(num_inference_steps=STEPS, blend_weight=1.0))
    fixed.update(0, trajectory(0).float())
    with pytest.raises(RuntimeError, match="both predictors"):
        fixed.score(1, trajectory(1).float())
    auto = SpectrumForecaster(SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto"))
    auto.update(0, trajectory(0).float())
    assert auto.score(1, trajectory(1).float()) is None     # one real step: nothing to extrapolate
    auto.update(1, trajectory(1).float())
    with pytest.raises(ValueError, match="before update"):
        auto.score(1, trajectory(1).float())
    with pytest.raises(ValueError, match="pass the weight"):
        auto.forecast(2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(blend_weight="best"), "blend_weight"),
    (dict(schedule="fast"), "schedule"),
    (dict(min_gap=0), "min_gap"),
    (dict(min_gap=4, max_gap=3), "max_gap"),
    (dict(error_budget=-0.1), "error_budget"),
    (dict(error_budget=float("nan")), "error_budget"),
    (dict(error_smoothing=0.0), "error_smoothing"),
    (dict(error_smoothing=1.5), "error_smoothing"),
])
def test_bad_control_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectrumConfig(**kwargs)


def _controller_run(config, errors_by_gap):
    """Drive a controller through one generation with synthetic validation sums: the relative
    error of both predictors at gap g is errors_by_gap(g). Returns the real steps."""
    controller = SpectrumController(config, reducer=lambda sums: sums)
    real, last = [], None
    for step in range(config.num_inference_steps):
        controller.begin_step(step)
        if controller.is_real(step):
            controller.mark_real(step)
            if last is not None and len(real) >= 2:
                e2 = errors_by_gap(step - last) ** 2
                controller.observe(step, step - last, torch.tensor([e2, e2, e2, 1.0], dtype=torch.float64))
            real.append(step)
            last = step
    return real, controller


def test_adaptive_gap_follows_the_power_law_error_model():
    config = SpectrumConfig(num_inference_steps=40, warmup_steps=4, schedule="adaptive", error_budget=0.09,
                            max_gap=10, error_smoothing=1.0)
    # the newest validation alone (smoothing 1) cannot tell the exponent: the prior's, p0 = 1;
    # error 0.03 g allows g = 3 exactly
    assert PRIOR_EXPONENT == 1.0
    real, controller = _controller_run(config, lambda g: 0.03 * g)
    assert real[:4] == [0, 1, 2, 3]
    assert all(b - a == 3 for a, b in zip(real[3:], real[4:])), real
    assert all(entry["predicted_error"] == pytest.approx(0.09) for entry in controller.plan[3:])
    # twice the error per gap: gap floor(1.5) = 1
    real, _ = _controller_run(config, lambda g: 0.06 * g)
    assert all(b - a == 1 for a, b in zip(real[3:], real[4:])), real


def test_adaptive_schedule_learns_a_steeper_exponent_from_its_gaps():
    """Errors growing as g^2.5: once validations at different gaps are in, the fitted exponent
    moves from the prior toward 2.5 and the chosen gaps keep the predicted error within budget."""
    config = SpectrumConfig(num_inference_steps=60, warmup_steps=3, schedule="adaptive", error_budget=0.05,
                            max_gap=10, error_smoothing=0.5)
    real, controller = _controller_run(config, lambda g: 0.002 * g ** 2.5)
    fitted = [entry["exponent"] for entry in controller.plan if entry["exponent"] is not None]
    assert fitted[0] == PRIOR_EXPONENT and fitted[-1] > 2.0, fitted
    assert all(entry["predicted_error"] <= 0.05 * (1 + 1e-9) for entry in controller.plan if entry["exponent"])
    # the true largest gap within budget is floor((0.05 / 0.002)^(1/2.5)) = 3
    assert [b - a for a, b in zip(real, real[1:])][-5:] == [3] * 5, real


def _penalised_fit_by_least_squares(gaps, errors, alpha):
    """(log k, p) of error_model's objective: p from one stacked least-squares problem over all
    validations and the prior, log k the recency-weighted mean of log e - p log g."""
    n = len(gaps)
    rows = np.vstack([np.c_[np.ones(n), np.log(gaps)], [0.0, math.sqrt(PRIOR_WEIGHT)]])
    target = np.append(np.log(errors), math.sqrt(PRIOR_WEIGHT) * PRIOR_EXPONENT)
    exponent = np.linalg.lstsq(rows, target, rcond=None)[0][1]
    w = np.array([alpha * (1 - alpha) ** (n - 1 - i) for i in range(n)])
    return float(w @ (np.log(errors) - exponent * np.log(gaps)) / w.sum()), float(exponent)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_gap_error_fit_equals_the_penalised_least_squares_solution(alpha):
    rng = np.random.default_rng(3)
    gaps = rng.integers(1, 9, size=12)
    errors = 0.01 * gaps ** 1.4 * np.exp(rng.normal(0, 0.2, size=12))
    model = GapErrorModel(alpha)
    for gap, error in zip(gaps, errors):
        model.observe(int(gap), float(error))
    level, exponent = _penalised_fit_by_least_squares(gaps, errors, alpha)
    assert (model.level, model.exponent) == pytest.approx((level, exponent), abs=1e-9)
    assert model.predict(5) == pytest.approx(math.exp(level) * 5 ** exponent)
    assert model.predict(model.largest_gap(0.05)) == pytest.approx(0.05)


def test_gap_error_model_keeps_the_exponent_positive_and_takes_exact_forecasts():
    model = GapErrorModel(0.5)
    for gap, error in [(1, 0.5), (8, 0.01), (2, 0.3), (6, 0.02)]:   # error falling with the gap
        model.observe(gap, error)
    assert model.exponent == MIN_EXPONENT
    exact = GapErrorModel(0.5)
    exact.observe(3, 0.0)
    assert exact.largest_gap(1e-3) > 1e6 and exact.largest_gap(0.0) == 0.0


def _wan_run(config, steps=STEPS):
    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    apply_spectrum(pipe.transformer, config)
    call = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=steps, height=32, width=32,
                num_frames=5, guidance_scale=5.0, output_type="latent")
    out = pipe(**call, generator=torch.Generator().manual_seed(7)).frames
    return pipe, call, out, spectrum_stats(pipe.transformer)


def test_error_budget_zero_runs_every_step_and_a_huge_one_only_warmup_and_max_gap():
    base = dict(num_inference_steps=STEPS, schedule="adaptive", warmup_steps=3, max_gap=5, blend_weight="auto")
    _, _, _, stats = _wan_run(SpectrumConfig(**base, error_budget=0.0))
    assert stats["cond"]["real_steps"] == stats["uncond"]["real_steps"] == list(range(STEPS))
    # every step from the third is scored, except the last, which would inform no decision
    assert [e["step"] for e in stats["cond"]["validation"]] == list(range(2, STEPS - 1))
    _, _, _, stats = _wan_run(SpectrumConfig(**base, error_budget=100.0))
    expected = [0, 1, 2] + list(range(2 + 5, STEPS, 5))
    assert stats["cond"]["real_steps"] == stats["uncond"]["real_steps"] == expected
    assert stats["cond"]["forecasts"] == STEPS - len(expected)


def test_adaptive_run_is_reset_for_every_generation_and_reports_its_choices():
    config = SpectrumConfig(num_inference_steps=STEPS, schedule="adaptive", warmup_steps=3, error_budget=0.3,
                            max_gap=6, blend_weight="auto")
    pipe, call, first, stats = _wan_run(config)
    second = pipe(**call, generator=torch.Generator().manual_seed(7)).frames
    assert torch.equal(first, second)
    def decisions(all_stats):   # everything but the timing
        return {b: {k: v for k, v in s.items() if k != "validation_seconds"} for b, s in all_stats.items()}

    assert decisions(spectrum_stats(pipe.transformer)) == decisions(stats)
    cond = stats["cond"]
    assert 3 < cond["nfe"] < STEPS and cond["forecasts"] == len(cond["blend_weights"])
    assert [p["after"] for p in cond["plan"]][-len(cond["real_steps"]) + 3:] == cond["real_steps"][3:]
    assert all(0.0 <= w <= 1.0 for w in cond["blend_weights"])
    for entry in cond["validation"]:
        assert set(entry) == {"step", "gap", "linear", "chebyshev", "blend", "blend_weight"}
        assert entry["blend"] <= max(entry["linear"], entry["chebyshev"]) + 1e-12
    assert cond["validation_seconds"] > 0
    # a fixed-blend paper run keeps no validation at all
    _, _, _, paper = _wan_run(SpectrumConfig(num_inference_steps=STEPS))
    assert "validation" not in paper["cond"] and set(paper["cond"]["blend_weights"]) == {0.5}


def test_flux_adaptive_without_step_indices():
    """FLUX.1 gives no step index: the controller follows the per-branch call count."""
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    config = SpectrumConfig(num_inference_steps=16, schedule="adaptive", warmup_steps=3, error_budget=100.0,
                            max_gap=4, blend_weight="auto")
    apply_spectrum(pipe.transformer, config)
    pipe(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=16, height=32,
         width=32, max_sequence_length=16, output_type="latent", generator=torch.Generator().manual_seed(7))
    stats = spectrum_stats(pipe.transformer)
    assert stats["cond"]["real_steps"] == stats["uncond"]["real_steps"] == [0, 1, 2, 6, 10, 14]
    assert spectrum_state(pipe.transformer).controller.step is None    # reset at the end of the call


# -- the budget schedule --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(target_nfe=0), "target_nfe"),
    (dict(target_nfe=51), "target_nfe"),
    (dict(target_nfe=10, speedup=2.0), "target_nfe"),
    (dict(speedup=0.9), "speedup"),
    (dict(speedup=float("inf")), "speedup"),
    (dict(schedule="budget"), "target_nfe"),
    (dict(schedule="adaptive", target_nfe=10), "target_nfe"),
    (dict(schedule="paper", speedup=2.0), "speedup"),
])
def test_bad_budget_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectrumConfig(num_inference_steps=50, **kwargs)


def test_a_budget_selects_the_budget_schedule():
    assert SpectrumConfig(target_nfe=10).schedule == "budget"
    assert SpectrumConfig(num_inference_steps=30, speedup=2.5).nfe_budget == 12
    assert SpectrumConfig(num_inference_steps=30, speedup=30.0).nfe_budget == 1
    assert SpectrumConfig().nfe_budget is None


def _budget_run(config, error):
    """A controller through one generation; the relative error of both predictors at real step s,
    forecast from gap g, is error(s, g). Returns the real steps and the controller."""
    controller = SpectrumController(config, reducer=lambda sums: sums)
    real = []
    for step in range(config.num_inference_steps):
        controller.begin_step(step)
        if controller.is_real(step):
            controller.mark_real(step)
            if len(real) >= 2:
                e2 = error(step, step - real[-1]) ** 2
                controller.observe(step, step - real[-1], torch.tensor([e2, e2, e2, 1.0], dtype=torch.float64))
            real.append(step)
    return real, controller


@pytest.mark.parametrize("steps, target", [(20, 7), (30, 10), (50, 14), (50, 3), (12, 12), (40, 1)])
def test_budget_is_spent_exactly_whatever_the_errors(steps, target):
    rng = np.random.default_rng(steps * 100 + target)
    for trial in range(20):
        # random error levels along the trajectory, some zero, some huge
        level = rng.choice([0.0, 1e-4, 1.0, 1e3], size=steps) * rng.random(steps)
        config = SpectrumConfig(num_inference_steps=steps, target_nfe=target, warmup_steps=int(rng.integers(1, 6)),
                                error_smoothing=float(rng.uniform(0.1, 1.0)))
        real, _ = _budget_run(config, lambda s, g: level[s] * g * g)
        warmup = min(config.warmup_steps, target)
        assert len(real) == target and real[:warmup] == list(range(warmup)), (trial, real)
        if target > warmup:
            assert real[-1] == steps - 1, (trial, real)    # the end keeps its real step


def test_budget_puts_real_steps_where_the_error_is_highest():
    """The tail's steps are real; before it, a stretch harder than the generation's average gets
    shorter gaps, an easier one longer."""
    config = SpectrumConfig(num_inference_steps=50, target_nfe=14, warmup_steps=3, error_smoothing=1.0)
    tail = round(config.budget_tail * 14)
    even, _ = _budget_run(config, lambda s, g: 1e-3 * g * g)          # uniform difficulty: even gaps
    assert len(even) == 14 and even[-tail:] == list(range(50 - tail, 50)), even
    assert np.ptp(np.diff(even[2:-tail + 1])) <= 1, even
    hard_end, _ = _budget_run(config, lambda s, g: (1e-3 if s < 30 else 1e-1) * g * g)
    easy_end, _ = _budget_run(config, lambda s, g: (1e-1 if s < 20 else 1e-3) * g * g)
    assert len(hard_end) == len(easy_end) == 14 and hard_end[-tail:] == easy_end[-tail:] == even[-tail:]

    def gaps_within(real, lo, hi):
        return [b - a for a, b in zip(real, real[1:]) if lo <= a and b < hi]

    assert np.mean(gaps_within(hard_end, 30, 50 - tail)) < min(gaps_within(hard_end, 3, 30)), hard_end
    assert min(gaps_within(easy_end, 22, 44)) > max(gaps_within(even, 22, 44)), (even, easy_end)


@pytest.mark.parametrize("steps, target", [(20, 7), (30, 10), (50, 14)])
def test_budget_holds_on_a_random_model(steps, target):
    config = SpectrumConfig(num_inference_steps=steps, target_nfe=target, warmup_steps=3, blend_weight="auto")
    _, _, _, stats = _wan_run(config, steps)
    cond, uncond = stats["cond"], stats["uncond"]
    print(f"{steps} steps, target_nfe {target}: real steps {cond['real_steps']}")
    assert cond["real_steps"] == uncond["real_steps"] and cond["nfe"] == target
    assert cond["real_steps"][:3] == [0, 1, 2] and cond["real_steps"][-1] == steps - 1
    assert cond["forecasts"] == steps - target == len(cond["blend_weights"])


def test_two_experts_share_the_budget_by_their_steps():
    from spectrum_xdit.experts import apply_spectrum_to_pipeline, pipeline_spectrum_stats, share_budget
    from spectrum_xdit.models.tiny import build_tiny_wan22_pipeline

    assert share_budget(10, {"a": 25, "b": 25}) == {"a": 5, "b": 5}
    assert share_budget(7, {"a": 3, "b": 17}) == {"a": 1, "b": 6}
    assert share_budget(2, {"a": 1, "b": 19}) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match="target_nfe"):
        share_budget(1, {"a": 3, "b": 17})
    pipe = build_tiny_wan22_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    split = apply_spectrum_to_pipeline(pipe, SpectrumConfig(num_inference_steps=20, speedup=2.5, warmup_steps=2))
    pipe(prompt="a red fox", num_inference_steps=20, height=32, width=32, num_frames=5, guidance_scale=1.0,
         output_type="latent", generator=torch.Generator().manual_seed(7))
    stats = pipeline_spectrum_stats(pipe)
    nfe = {name: next(iter(branches.values()))["nfe"] for name, branches in stats.items()}   # one branch
    assert sum(nfe.values()) == 8 and set(nfe) == {"transformer", "transformer_2"}
    assert nfe == share_budget(8, {name: len(steps) for name, steps in split.items()})


# -- more predictors: zero-order reuse ------------------------------------------------------------

def test_k_predictor_combination_equals_the_constrained_least_squares_minimiser():
    """w = G^-1 1 / (1^T G^-1 1) against lstsq on the stacked errors with w_K = 1 - sum(others)."""
    from spectrum_xdit.control import best_combination, combination_error

    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 4):
        for _ in range(20):
            errors = torch.randn(40, k, generator=g, dtype=torch.float64) * torch.rand(k, generator=g, dtype=torch.float64)
            w = best_combination((errors.T @ errors).numpy())
            # |E w| with sum(w) = 1: |E_K + sum_{i<K} w_i (E_i - E_K)|, unconstrained in w_1 .. w_{K-1}
            free = torch.linalg.lstsq(errors[:, :-1] - errors[:, -1:], -errors[:, -1:]).solution[:, 0]
            brute = torch.cat([free, 1 - free.sum().reshape(1)]).numpy()
            assert w.sum() == pytest.approx(1.0) and w == pytest.approx(brute, rel=1e-5, abs=1e-7)
            gram = (errors.T @ errors).numpy()
            assert combination_error(w, gram) == pytest.approx(float((errors @ torch.from_numpy(w)).norm()), rel=1e-6)
    # every predictor exact: equal weights; two identical predictors: finite weights that sum to 1
    assert best_combination(np.zeros((3, 3))) == pytest.approx([1 / 3] * 3)
    e = torch.randn(40, 2, generator=g, dtype=torch.float64)
    e = torch.cat([e, e[:, :1]], dim=1)
    w = best_combination((e.T @ e).numpy())
    assert np.isfinite(w).all() and w.sum() == pytest.approx(1.0)


def test_reuse_is_scored_and_combined_as_a_third_predictor():
    config = SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto", reuse=True)
    trajectory = _trajectory(seed=5)
    forecaster = SpectrumForecaster(config)
    for s in HISTORY:
        forecaster.update(s, trajectory(s).to(torch.float32))
    h = trajectory(TARGET).to(torch.float32).double().reshape(-1)
    sums = forecaster.score(TARGET, h.float().reshape(3, 50)).tolist()
    linear, chebyshev = _float64_forecasts(config, trajectory)
    reuse = trajectory(HISTORY[-1]).to(torch.float32).double().reshape(-1)
    e = [linear - h, chebyshev - h, reuse - h]
    expected = [e[0] @ e[0], e[1] @ e[1], e[2] @ e[2], e[0] @ e[1], e[0] @ e[2], e[1] @ e[2], h @ h]
    assert sums == pytest.approx([float(x) for x in expected], rel=1e-5)
    weights = (0.7, 1.1, -0.8)
    combined = forecaster.forecast(TARGET, blend_weight=weights).double().reshape(-1)
    direct = weights[0] * linear + weights[1] * chebyshev + weights[2] * reuse
    assert ((combined - direct).norm() / direct.norm()).item() < 1e-5
    with pytest.raises(ValueError, match="3 finite weights"):
        forecaster.forecast(TARGET, blend_weight=(0.5, 0.5))
    with pytest.raises(ValueError, match="reuse"):
        SpectrumConfig(blend_weight=0.5, reuse=True)


def test_reuse_in_a_run_uses_the_validated_combination():
    config = SpectrumConfig(num_inference_steps=STEPS, target_nfe=10, warmup_steps=3, blend_weight="auto",
                            reuse=True, error_smoothing=1.0)
    _, _, _, stats = _wan_run(config)
    cond = stats["cond"]
    assert cond["nfe"] == 10 and all(len(w) == 3 and sum(w) == pytest.approx(1.0) for w in cond["blend_weights"])
    for entry in cond["validation"]:
        assert set(entry) == {"step", "gap", "linear", "chebyshev", "reuse", "blend", "blend_weight"}
        # the least-error affine combination of the step's own errors is at most the best predictor's
        assert entry["blend"] <= min(entry["linear"], entry["chebyshev"], entry["reuse"]) + 1e-9
