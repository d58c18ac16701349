"""The support matrix of docs/parallel.md, cell by cell: each embedded model under each parallel layout
it supports, with the paper, adaptive and budget schedules, against the same request in one
process (2 gloo ranks per launch; every schedule in one launch). Under the layouts a server runs
(Ulysses 2, Ring 2) the same launch also runs the requests through the serve step loop, joined at
successive ticks, against the same one-process runs: the step loop's column."""

from __future__ import annotations

import pytest

from serving import image_base64
from step_loop import relative_error
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.validate import validate
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.testing import run_distributed

STEPS = 14
# The adaptive schedule with a budget a random-weight model can meet (its features are rougher
# than a trained model's) and the auto blend, so that it skips steps here too.
# The budget schedule at a 7-step budget, forecasting on the request's grid (step_grid "auto" would
# run the plain 7-step sampler there, which skips nothing).
SCHEDULES = {"paper": {}, "adaptive": {"schedule": "adaptive", "blend_weight": "auto", "warmup_steps": 3,
                                       "error_budget": 0.3, "max_gap": 4},
             "budget": {"target_nfe": 7, "blend_weight": "auto", "warmup_steps": 3, "step_grid": "request"}}
BUDGET = 7
LAYOUTS = {
    "ulysses2": dict(ulysses_degree=2),
    "ring2": dict(ring_degree=2),
    "cfg2": dict(use_cfg_parallel=True),
    "pipefusion2": dict(pipefusion_parallel_degree=2, num_pipeline_patch=2),
}
# (model, layout, schedules): every layout each model's family has, every schedule it takes.
# PipeFusion is FLUX.1-only and takes only the paper schedule; CFG parallel is Wan-only.
CELLS = [
    *((model, layout, schedule) for model in ("tiny-wan", "tiny-wan-i2v", "tiny-wan22")
      for layout in ("ulysses2", "ring2", "cfg2") for schedule in SCHEDULES),
    *(("tiny-flux", layout, schedule) for layout in ("ulysses2", "ring2") for schedule in SCHEDULES),
    ("tiny-flux", "pipefusion2", "paper"),
]
# PipeFusion's stale patches after its warm-up are the only semantic difference from one process
# (docs/pipefusion.md); everything else is numerics.
TOLERANCE = {"pipefusion2": 2e-3}
DEFAULT_TOLERANCE = 1e-5
# The layouts a server runs, whose cells also run the step loop.
STEP_LOOP_LAYOUTS = ("ulysses2", "ring2")


def _requests(model: str, schedules: list[str]) -> list:
    spec = resolve_model(model)
    body = {"prompt": "a red square", "seed": 1, "num_inference_steps": STEPS}
    if spec.family == "flux":
        body["height"] = body["width"] = 16
    if spec.needs_image:
        body["image"] = image_base64(0)
    return [parse_request({**body, "cache": SCHEDULES[name]}, {**model_defaults(spec)}) for name in schedules]


def _sharded(model: str, layout: dict, schedules: list[str], step_loop: bool) -> tuple[list, list]:
    """Each schedule's request in the pipeline's loop, and (``step_loop``) all of them in the step
    loop, joining at ticks 0, 1, 2, ...: (latents, real steps) of each, per schedule."""
    from step_loop import run_step_loop

    from spectrum_xdit.launch.runner import init_rank

    rank_pipeline = init_rank(resolve_model(model), ParallelLayout(**layout))
    requests = _requests(model, schedules)
    results = [rank_pipeline.generate(request) for request in requests]
    looped = run_step_loop(rank_pipeline, list(enumerate(requests)))[0] if step_loop else {}
    return ([(result.latents, result.report["real_steps"]) for result in results],
            [(looped[index].latents, looped[index].report["real_steps"]) for index in sorted(looped)])


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model,layout", sorted({(model, layout) for model, layout, _ in CELLS}))
def test_every_cell_equals_one_process(model, layout):
    from spectrum_xdit.launch.runner import init_rank

    spec = resolve_model(model)
    schedules = [schedule for m, l, schedule in CELLS if (m, l) == (model, layout)]
    parallel = ParallelLayout(**LAYOUTS[layout])
    requests = _requests(model, schedules)
    for request in requests:   # the rules every launch of this cell passes
        validate(request, spec, parallel, world_size=2)
    single = init_rank(spec, ParallelLayout())
    expected = [single.generate(request) for request in requests]
    step_loop = layout in STEP_LOOP_LAYOUTS
    sharded, looped = run_distributed(_sharded, 2, args=(model, LAYOUTS[layout], schedules, step_loop), timeout=280)
    columns = [(TOLERANCE.get(layout, DEFAULT_TOLERANCE), sharded)]
    if step_loop:
        assert len(looped) == len(schedules)
        columns.append((DEFAULT_TOLERANCE, looped))
    for column, (tolerance, outcomes) in zip(("pipeline", "step loop"), columns):
        errors = [relative_error(latents, reference.latents) for reference, (latents, _) in zip(expected, outcomes)]
        print(f"\n{model} {layout}, {column}: " + ", ".join(f"{s} {e:.1e}" for s, e in zip(schedules, errors)))
        for schedule, reference, error, (_, real_steps) in zip(schedules, expected, errors, outcomes):
            assert error <= tolerance, (schedule, error)
            assert real_steps == reference.report["real_steps"], schedule
            assert all(len(steps) < STEPS for steps in real_steps.values()), (schedule, real_steps)
            if schedule == "budget":   # per branch, and shared by a pipeline's experts
                assert all(len(steps) <= BUDGET for steps in real_steps.values()), real_steps
