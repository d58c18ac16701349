"""The runner: size rules of the built models, stopping a generation at a step boundary on
which every rank agrees (gloo processes on CPU), and FLUX.1's guidance conventions."""

import pytest
import torch

from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import RankPipeline, flux_text_tokens, init_rank
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


@pytest.mark.distributed
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


@pytest.fixture(scope="module")
def tiny_flux():
    rank_pipeline = init_rank(resolve_model("tiny-flux"), ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    return rank_pipeline


def _flux_run(rank_pipeline, **body) -> tuple:
    """The latents, the report and the ``guidance`` of every transformer call of one generation."""
    guidance = []
    handle = rank_pipeline.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: guidance.append(kwargs["guidance"].tolist()), with_kwargs=True)
    try:
        result = rank_pipeline.generate(parse_request({"prompt": "a red square", "num_inference_steps": STEPS,
                                                       **body}, model_defaults(rank_pipeline.spec)))
    finally:
        handle.remove()
    return result.latents, result.report, guidance


@pytest.mark.parametrize("cache", ["none", "spectrum"])
def test_flux_distilled_guidance_runs_one_branch_and_true_cfg_two(tiny_flux, cache):
    """FLUX.1-dev's conventions: guidance_scale is embedded in the one call of a step (3.5 unless
    given), true_cfg_scale above 1 adds the unconditional call."""
    _, distilled, calls = _flux_run(tiny_flux, guidance_scale=3.5, cache={"method": cache})
    assert calls == [[3.5]] * STEPS
    assert set(distilled["nfe"]) == {"cond"} and distilled["true_cfg_scale"] == 1
    _, default, calls = _flux_run(tiny_flux, cache={"method": cache})
    assert default["guidance_scale"] == 3.5 and calls == [[3.5]] * STEPS
    _, true_cfg, calls = _flux_run(tiny_flux, true_cfg_scale=4, cache={"method": cache})
    assert len(calls) == 2 * STEPS and set(true_cfg["nfe"]) == {"cond", "uncond"}
    assert true_cfg["real_steps"]["cond"] == true_cfg["real_steps"]["uncond"] == distilled["real_steps"]["cond"]
    if cache == "none":
        assert distilled["nfe"] == {"cond": STEPS}


def test_distilled_guidance_conditions_tiny_flux(tiny_flux):
    assert tiny_flux.pipe.transformer.config.guidance_embeds
    low, _, _ = _flux_run(tiny_flux, guidance_scale=1.5)
    default, _, _ = _flux_run(tiny_flux)
    again, _, _ = _flux_run(tiny_flux, guidance_scale=3.5)
    assert torch.equal(default, again)
    assert (low - default).norm() / default.norm() > 1e-3


def test_flux_from_the_hub_encodes_512_t5_tokens_and_the_embedded_models_their_own():
    """xDiT's FLUX.1 runner and diffusers' FluxPipeline run the released checkpoints at
    max_sequence_length 512; the embedded models keep the length they were built or trained at."""
    hub = resolve_model("black-forest-labs/FLUX.1-dev")
    request = parse_request({"prompt": "a red square"}, model_defaults(hub))
    assert RankPipeline(hub, None, 0, ParallelLayout(), "cpu")._pipeline_call(request)["max_sequence_length"] == 512
    assert flux_text_tokens(resolve_model("tiny-flux")) == 64 and flux_text_tokens(resolve_model("digits-flux")) == 16
