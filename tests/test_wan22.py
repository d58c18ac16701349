"""Wan2.2's two experts (`tiny-wan22`, in one process): each expert keeps its own forecasters,
schedule and controller over the steps it runs, and no forecast of one uses the other's features."""

import json

import pytest
import torch

from spectrum_xdit import (
    SpectrumConfig,
    apply_spectrum_to_pipeline,
    expert_steps,
    paper_schedule,
    pipeline_spectrum_stats,
    remove_spectrum_from_pipeline,
)
from spectrum_xdit.hooks import spectrum_state
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.models import resolve_model
from spectrum_xdit.models.tiny import WAN22_EXPERT_2_OFFSET, build_tiny_wan22_pipeline, build_tiny_wan_pipeline

STEPS = 20
SPLIT = {"transformer": range(0, 11), "transformer_2": range(11, 20)}   # boundary 0.75, flow_shift 3


def _pipe():
    pipe = build_tiny_wan22_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=STEPS, height=32, width=32,
                num_frames=5, guidance_scale=5.0, output_type="latent")
    return pipe, lambda **kw: pipe(**{**call, **kw}, generator=torch.Generator().manual_seed(7)).frames


def _last_block_outputs(pipe) -> dict[str, list]:
    """Each expert's last-block output at every call: the real feature or the forecast."""
    outputs = {"transformer": [], "transformer_2": []}
    for name, features in outputs.items():
        getattr(pipe, name).blocks[-1].register_forward_hook(
            lambda module, args, output, features=features: features.append(output.detach().clone()))
    return outputs


@pytest.mark.parametrize("steps", [STEPS, 10, 7])
def test_the_split_is_the_pipelines_own(steps):
    pipe, run = _pipe()
    called = []
    for name in ("transformer", "transformer_2"):
        getattr(pipe, name).register_forward_pre_hook(lambda module, args, name=name: called.append(name))
    run(num_inference_steps=steps)
    per_step = called[::2]   # cond, uncond at every step
    assert called[1::2] == per_step and len(per_step) == steps
    split = expert_steps(pipe, steps)
    assert [name for name, own in split.items() for _ in own] == per_step
    assert all(len(own) for own in split.values()), split
    if steps == STEPS:
        assert split == SPLIT
    assert expert_steps(build_tiny_wan_pipeline(), steps) == {"transformer": range(steps)}


def test_all_real_schedule_equals_the_unhooked_pipeline():
    pipe, run = _pipe()
    reference = run()
    apply_spectrum_to_pipeline(pipe, SpectrumConfig(num_inference_steps=STEPS, warmup_steps=STEPS))
    assert torch.equal(run(), reference)
    stats = pipeline_spectrum_stats(pipe)
    for name, own in SPLIT.items():
        assert {b: s["real_steps"] for b, s in stats[name].items()} == {"cond": list(own), "uncond": list(own)}
    remove_spectrum_from_pipeline(pipe)
    assert pipeline_spectrum_stats(pipe) == {}


def test_each_expert_runs_the_paper_schedule_over_its_own_steps_and_its_own_features():
    pipe, run = _pipe()
    reference = run()
    outputs = _last_block_outputs(pipe)
    apply_spectrum_to_pipeline(pipe, SpectrumConfig(num_inference_steps=STEPS))
    output = run()
    stats = pipeline_spectrum_stats(pipe)
    forecasts = {}
    for name, own in SPLIT.items():
        expected = [own.start + s for s in paper_schedule(len(own), 5, 2, 0.75)]
        assert expected[:5] == list(own)[:5]   # the warm-up restarts at the expert's first step
        for branch in ("cond", "uncond"):
            assert stats[name][branch]["real_steps"] == expected
            assert stats[name][branch]["forecast_steps"] == sorted(set(own) - set(expected))
        forecasts[name] = [step - own.start for step in stats[name]["cond"]["forecast_steps"]]
    assert forecasts == {"transformer": [5, 7, 9, 10], "transformer_2": [5, 7]}
    # Every feature of transformer_2, its forecasts too, carries its offset; transformer's does not.
    # With one stack over both experts (a fit that sees transformer's features) transformer_2's
    # outputs in this run are up to 7.4 off the offset, more than 1.5 at steps 12, 13, 14, 18, 19.
    means = {name: [f.mean().item() for f in features[::2]] for name, features in outputs.items()}
    assert len(means["transformer"]) == 11 and len(means["transformer_2"]) == 9
    assert all(abs(m) < 0.2 for m in means["transformer"]), means["transformer"]
    assert all(abs(m - WAN22_EXPERT_2_OFFSET) < 1.5 for m in means["transformer_2"]), means["transformer_2"]
    assert ((output - reference).norm() / reference.norm()).item() > 1e-4, "no block was skipped"


def test_adaptive_controller_per_expert():
    pipe, run = _pipe()
    config = SpectrumConfig(num_inference_steps=STEPS, schedule="adaptive", blend_weight="auto", warmup_steps=3,
                            error_budget=0.3, max_gap=4)
    apply_spectrum_to_pipeline(pipe, config)
    for name in SPLIT:
        spectrum_state(getattr(pipe, name)).controller.reducer = lambda sums: sums   # one process
    run()
    stats = pipeline_spectrum_stats(pipe)
    for name, own in SPLIT.items():
        cond = stats[name]["cond"]
        assert cond["real_steps"][:3] == list(own)[:3] and cond["real_steps"] == stats[name]["uncond"]["real_steps"]
        # its validations and plans are of its own steps, from its own warm-up on
        assert cond["validation"] and all(entry["step"] in own for entry in cond["validation"])
        assert cond["plan"][0]["after"] == own.start and all(entry["after"] in own for entry in cond["plan"])
    assert len(stats["transformer"]["cond"]["real_steps"]) < len(SPLIT["transformer"])   # it did skip


def test_the_runners_report_is_keyed_by_expert_and_stops_cleanly():
    spec = resolve_model("tiny-wan22")
    rank_pipeline = init_rank(spec, ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    defaults = {**model_defaults(spec), "num_inference_steps": STEPS}
    report = rank_pipeline.generate(parse_request({"prompt": "a red square"}, defaults)).report
    real = {"transformer": [0, 1, 2, 3, 4, 6, 8], "transformer_2": [11, 12, 13, 14, 15, 17, 19]}
    assert report["experts"] == {
        name: {"steps": [own.start, own.stop], "real_steps": {"cond": real[name], "uncond": real[name]},
               "nfe": {"cond": 7, "uncond": 7}} for name, own in SPLIT.items()}
    assert report["real_steps"]["cond"] == real["transformer"] + real["transformer_2"]
    assert report["nfe"] == {"cond": 14, "uncond": 14}
    one_expert_state = report["state_bytes_per_rank"]
    none = rank_pipeline.generate(parse_request({"prompt": "x", "cache": {"method": "none"}}, defaults)).report
    assert none["experts"]["transformer_2"]["real_steps"]["uncond"] == list(range(11, 20))
    assert none["nfe"] == {"cond": STEPS, "uncond": STEPS}
    # stopped before transformer_2 ever ran: it reports no branch, and nothing else breaks
    stopped = rank_pipeline.generate(parse_request({"prompt": "x"}, defaults), stop=iter([False] * 5 + [True]).__next__)
    assert stopped.report["stopped_after_step"] == 5 and stopped.report["experts"]["transformer_2"]["real_steps"] == {}
    json.dumps(stopped.report)
    assert one_expert_state == 2 * 28 * 8 * 32   # two branches x (4 P + 2 x 4) bytes x 8 tokens x 32 channels


def test_resolve_model_recognises_two_expert_checkpoints(tmp_path):
    spec = resolve_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    assert spec.experts == ("transformer", "transformer_2") and spec.num_attention_heads == 40
    assert spec.step_batchable
    assert resolve_model("Wan-AI/Wan2.1-T2V-14B-Diffusers").experts == ("transformer",)
    for name, transformer_2, experts in (("wan22", ["diffusers", "WanTransformer3DModel"], 2),
                                         ("wan21", [None, None], 1)):
        folder = tmp_path / name
        folder.mkdir()
        index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875 if experts == 2 else None,
                 "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": transformer_2}
        (folder / "model_index.json").write_text(json.dumps(index))
        assert len(resolve_model(str(folder)).experts) == experts
