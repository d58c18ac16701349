"""Step-level batching (`launch/step_batching.py`): every request of a step batch, joined at any
tick, equals its solo run through WanPipeline's own loop; only real rows reach the blocks; the
ranks of a sequence-parallel group agree on every tick or fail alike."""

import pytest
import torch.distributed as dist

from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.launch.step_batching import StepBatcher
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.testing import DistributedError, run_distributed

STEPS = 16
# (tick it joins at, request): none, the paper schedule, the adaptive schedule with auto blend,
# guidance off, another size, another step count; they overlap in every way.
REQUESTS = [
    (0, {"prompt": "a red square", "seed": 1, "guidance_scale": 4.0}),
    (0, {"prompt": "a blue circle", "seed": 2, "cache": {"method": "none"}}),
    (3, {"prompt": "a green line", "seed": 3, "guidance_scale": 3.0,
         "cache": {"schedule": "adaptive", "blend_weight": "auto", "error_budget": 1.0, "warmup_steps": 3}}),
    (3, {"prompt": "a yellow dot", "seed": 4, "guidance_scale": 1.0, "cache": {"warmup_steps": 2}}),
    (6, {"prompt": "a wide frame", "seed": 5, "width": 64}),
    (7, {"prompt": "fewer steps", "seed": 6, "num_inference_steps": 12}),
]
TOLERANCE = 1e-5


def _requests(spec):
    defaults = {**model_defaults(spec), "num_inference_steps": STEPS, "height": 32, "width": 32, "num_frames": 5}
    return [(tick, parse_request(body, defaults)) for tick, body in REQUESTS]


def _run_batch(rank_pipeline, requests, drop=None):
    """Tick until every request is done; ``drop``: (tick, index) of one to remove. Results by
    index, and the rows of each tick that ran the blocks."""
    batcher = StepBatcher(rank_pipeline)
    results, rows, tick = {}, [], 0
    try:
        while tick == 0 or batcher.active or any(start >= tick for start, _ in requests):
            if drop is not None and drop[0] == tick:
                batcher.drop(str(drop[1]))
            for index, (start, request) in enumerate(requests):
                if start == tick:
                    batcher.join(str(index), request)
            finished, block_rows = batcher.tick() if batcher.active else ({}, 0)
            rows.append(block_rows)
            results.update({int(job): result for job, (_, result) in finished.items()})
            tick += 1
    finally:
        batcher.close()
    return results, rows


def _compare(rank_pipeline, requests, drop=None) -> dict:
    solo = [rank_pipeline.generate(request) for _, request in requests]
    batched, rows = _run_batch(rank_pipeline, requests, drop)
    errors, schedules = {}, {}
    for index, result in batched.items():
        expected = solo[index]
        errors[index] = float((result.latents - expected.latents).norm() / expected.latents.norm())
        schedules[index] = (result.report["real_steps"], expected.report["real_steps"])
    return {"errors": errors, "schedules": schedules, "rows": rows,
            "nfe": {i: r.report["nfe"] for i, r in batched.items()},
            "block_rows": {i: r.report["block_stack_rows"] for i, r in batched.items()}}


@pytest.fixture(scope="module")
def tiny_wan():
    spec = resolve_model("tiny-wan")
    rank_pipeline = init_rank(spec, ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    return rank_pipeline


def test_every_request_of_a_step_batch_equals_its_solo_run(tiny_wan):
    outcome = _compare(tiny_wan, _requests(tiny_wan.spec))
    print(f"\none process: worst relative error {max(outcome['errors'].values()):.1e}")
    assert sorted(outcome["errors"]) == list(range(len(REQUESTS)))
    for index, error in outcome["errors"].items():
        assert error <= TOLERANCE, (index, error)
        got, expected = outcome["schedules"][index]
        assert got == expected, index
    nfe = outcome["nfe"]
    assert nfe[1] == {"cond": STEPS, "uncond": STEPS}                 # none: every step real
    assert nfe[0]["cond"] < STEPS and nfe[3] == {"cond": nfe[3]["cond"]} and nfe[3]["cond"] < STEPS
    assert nfe[2]["cond"] < STEPS                                      # the adaptive schedule skipped some
    # a request's rows through the blocks are its real steps, one per guidance branch
    assert all(outcome["block_rows"][i] == sum(nfe[i].values()) for i in nfe)


def test_only_the_real_rows_reach_the_blocks(tiny_wan):
    requests = _requests(tiny_wan.spec)
    first_block = tiny_wan.pipe.transformer.blocks[0]
    seen = []
    handle = first_block.attn1.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        results, rows = _run_batch(tiny_wan, requests)
    finally:
        handle.remove()
    assert sum(seen) == sum(rows) == sum(sum(r.report["nfe"].values()) for r in results.values())
    # forecast steps happened, and then fewer rows than active branches ran the blocks
    branches = sum(len(r.report["nfe"]) * r.report["num_inference_steps"] for r in results.values())
    assert sum(rows) < branches


def test_a_dropped_request_leaves_the_others_unchanged(tiny_wan):
    outcome = _compare(tiny_wan, _requests(tiny_wan.spec), drop=(5, 0))
    assert 0 not in outcome["errors"] and len(outcome["errors"]) == len(REQUESTS) - 1
    assert max(outcome["errors"].values()) <= TOLERANCE, outcome["errors"]


def test_step_batching_refuses_an_image_model():
    spec = resolve_model("tiny-flux")
    rank_pipeline = init_rank(spec, ParallelLayout())
    with pytest.raises(ValueError, match="step batching runs Wan pipelines"):
        StepBatcher(rank_pipeline)


def _ulysses_batch(drop=None) -> dict:
    spec = resolve_model("tiny-wan")
    rank_pipeline = init_rank(spec, ParallelLayout(ulysses_degree=2))
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    return _compare(rank_pipeline, _requests(spec), drop)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_step_batches_under_ulysses_2_equal_solo_runs():
    outcome = run_distributed(_ulysses_batch, 2, timeout=280)
    print(f"\nUlysses=2: worst relative error {max(outcome['errors'].values()):.1e}")
    assert len(outcome["errors"]) == len(REQUESTS)
    for index, error in outcome["errors"].items():
        assert error <= TOLERANCE, (index, error)
        got, expected = outcome["schedules"][index]
        assert got == expected, index


def _divergent_joins():
    spec = resolve_model("tiny-wan")
    rank_pipeline = init_rank(spec, ParallelLayout(ulysses_degree=2))
    request = _requests(spec)[0][1]
    batcher = StepBatcher(rank_pipeline)
    batcher.join("job-a" if dist.get_rank() == 0 else "job-b", request)
    batcher.tick()


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_that_disagree_about_a_tick_fail_alike_instead_of_hanging():
    with pytest.raises(DistributedError, match="step batches differ across ranks"):
        run_distributed(_divergent_joins, 2, timeout=180)
