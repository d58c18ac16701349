"""The budget schedule's defaults and its step grid: what ``target_nfe`` alone runs."""

import json

import pytest

from spectrum_xdit.config import BUDGET_DEFAULTS, PLAIN_GRID_BELOW, SpectrumConfig, budget_defaults
from spectrum_xdit.launch.request import GenerationRequest


def test_a_budget_alone_takes_the_budget_defaults():
    for budget in (dict(target_nfe=10), dict(speedup=5.0)):
        config = SpectrumConfig(num_inference_steps=50, **budget)
        assert config.schedule == "budget"
        assert {name: getattr(config, name) for name in BUDGET_DEFAULTS} == BUDGET_DEFAULTS
        assert config.step_grid == "auto"
        # the filled defaults are not settings the user gave
        assert config.model_fields_set == {"num_inference_steps", *budget}


def test_given_fields_win_over_the_budget_defaults():
    config = SpectrumConfig(num_inference_steps=50, target_nfe=14, warmup_steps=5, budget_tail=0.0, reuse=False)
    assert (config.warmup_steps, config.budget_tail, config.reuse, config.blend_weight) == (5, 0.0, False, "auto")
    assert config.model_fields_set == {"num_inference_steps", "target_nfe", "warmup_steps", "budget_tail", "reuse"}
    # a fixed blend weight given keeps the other defaults
    fixed = SpectrumConfig(num_inference_steps=50, target_nfe=14, blend_weight=0.5)
    assert (fixed.blend_weight, fixed.reuse, fixed.warmup_steps) == (0.5, False, BUDGET_DEFAULTS["warmup_steps"])
    with pytest.raises(ValueError, match="reuse"):
        SpectrumConfig(num_inference_steps=50, target_nfe=14, blend_weight=0.5, reuse=True)


def test_the_other_schedules_keep_the_paper_defaults():
    for config in (SpectrumConfig(), SpectrumConfig(schedule="adaptive")):
        assert (config.warmup_steps, config.blend_weight, config.reuse) == (5, 0.5, False)
    assert SpectrumConfig().model_fields_set == set()


def test_a_request_cache_with_a_budget_takes_the_defaults():
    request = GenerationRequest(prompt="3 moving left", height=16, width=16, num_frames=9,
                                guidance_scale=5.0, cache={"target_nfe": 10})
    config = request.spectrum
    assert (config.warmup_steps, config.blend_weight, config.reuse) == (3, "auto", BUDGET_DEFAULTS["reuse"])
    assert request.cache.model_fields_set == {"target_nfe", "num_inference_steps"}


@pytest.mark.parametrize("steps, nfe", [(50, PLAIN_GRID_BELOW - 1), (30, 4), (50, 1)])
def test_step_grid_auto_runs_the_plain_sampler_where_forecasting_loses(steps, nfe):
    assert nfe < PLAIN_GRID_BELOW
    config = SpectrumConfig(num_inference_steps=steps, target_nfe=nfe)
    assert config.plain_grid and config.steps_to_run == nfe
    grid = config.on_step_grid()
    assert (grid.num_inference_steps, grid.nfe_budget) == (nfe, nfe)
    # "request" keeps the request's grid
    kept = SpectrumConfig(num_inference_steps=steps, target_nfe=nfe, step_grid="request")
    assert not kept.plain_grid and kept.steps_to_run == steps and kept.on_step_grid() is kept


@pytest.mark.parametrize("steps, nfe", [(50, 14), (50, PLAIN_GRID_BELOW), (30, PLAIN_GRID_BELOW), (4, 4)])
def test_step_grid_auto_keeps_the_request_grid_where_forecasting_wins(steps, nfe):
    assert nfe >= PLAIN_GRID_BELOW or nfe == steps
    config = SpectrumConfig(num_inference_steps=steps, target_nfe=nfe)
    assert not config.plain_grid and config.steps_to_run == steps and config.on_step_grid() is config
    assert not SpectrumConfig(num_inference_steps=steps).plain_grid   # no budget, no grid change


def test_plain_grid_runs_every_step_real():
    """The shorter grid's config spends its budget on every step, so the run is the plain sampler."""
    from spectrum_xdit.control import SpectrumController

    grid = SpectrumConfig(num_inference_steps=50, target_nfe=7).on_step_grid()
    controller = SpectrumController(grid, reducer=lambda sums: sums)
    real = []
    for step in range(grid.num_inference_steps):
        controller.begin_step(step)
        if controller.is_real(step):
            controller.mark_real(step)
            real.append(step)
    assert real == list(range(7))


def test_budget_defaults_are_what_config_and_help_show():
    shown = budget_defaults()
    assert shown == {**BUDGET_DEFAULTS, "step_grid": "auto", "plain_grid_below_nfe": PLAIN_GRID_BELOW}
    json.dumps(shown)   # the /v1/config body
    description = SpectrumConfig.model_fields["step_grid"].description
    assert f"below {PLAIN_GRID_BELOW}" in description
    assert f"default: {BUDGET_DEFAULTS['warmup_steps']}" in SpectrumConfig.model_fields["warmup_steps"].description


def test_the_runner_runs_the_plain_grid_and_reports_steps_asked_and_run():
    from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
    from spectrum_xdit.launch.runner import init_rank
    from spectrum_xdit.models import resolve_model

    spec = resolve_model("tiny-wan")
    rank_pipeline = init_rank(spec, ParallelLayout())
    reports = {}
    for grid in ("auto", "request"):
        request = parse_request({"prompt": "a red square", "num_inference_steps": 10,
                                 "cache": {"target_nfe": 4, "step_grid": grid}}, model_defaults(spec))
        reports[grid] = rank_pipeline.generate(request).report
    plain, kept = reports["auto"], reports["request"]
    assert (plain["num_inference_steps"], plain["num_inference_steps_asked"], plain["step_grid"]) == (4, 10, "plain")
    assert plain["real_steps"]["cond"] == [0, 1, 2, 3] and plain["spectrum"]["num_inference_steps"] == 4
    assert (kept["num_inference_steps"], kept["num_inference_steps_asked"], kept["step_grid"]) == (10, 10, "request")
    assert len(kept["real_steps"]["cond"]) == 4 and kept["real_steps"]["cond"][-1] == 9
