"""The runner: size rules of the built models, and stopping a generation at a step boundary on
which every rank agrees (gloo processes on CPU)."""

import pytest
import torch

from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.models import BUILTIN_MODELS, resolve_model
from spectrum_xdit.parallel.testing import run_distributed

STEPS = 8


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_a_built_model_accepts_the_sizes_its_spec_promised(name):
    spec = resolve_model(name)
    assert init_rank(spec, ParallelLayout()).size_rules() == spec.sizes


def _request(spec):
    return parse_request({"prompt": "a red square", "num_inference_steps": STEPS}, model_defaults(spec))


def _stop_wished_by_rank_zero_only(after_step: int) -> dict:
    import torch.distributed as dist

    spec = resolve_model("tiny-wan")
    rank_pipeline = init_rank(spec, ParallelLayout(ulysses_degree=2))
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    asked = []

    def stop() -> bool:
        asked.append(True)
        return dist.get_rank() == 0 and len(asked) > after_step

    stopped = rank_pipeline.generate(_request(spec), stop=stop)
    full = rank_pipeline.generate(_request(spec), stop=lambda: False)
    plain = rank_pipeline.generate(_request(spec))
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, stopped.report)
    return {"reports": reports, "full_equals_plain": torch.equal(full.latents, plain.latents),
            "full_report": full.report, "stopped_latents": stopped.latents, "full_latents": full.latents}


@pytest.mark.timeout(240)
def test_every_rank_stops_after_the_step_any_rank_asks_for():
    result = run_distributed(_stop_wished_by_rank_zero_only, 2, args=(3,), timeout=200)
    steps = [report["stopped_after_step"] for report in result["reports"]]
    assert steps == [3, 3]
    for report in result["reports"]:
        # no block ran after the stop: the real steps end at the step it stopped after
        assert all(max(real) <= 3 for real in report["real_steps"].values()), report["real_steps"]
    assert "stopped_after_step" not in result["full_report"] and result["full_equals_plain"]
    assert not torch.equal(result["stopped_latents"], result["full_latents"])
