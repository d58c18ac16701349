"""Spectrum on compiled blocks (``torch.compile`` per block, inductor on CPU): the output stays
within tolerance of eager, and the step-to-step decisions cause no recompilation, whether the
blocks are compiled before Spectrum is applied (xDiT's order) or after."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from spectrum_xdit import SpectrumConfig, apply_spectrum, spectrum_stats
from spectrum_xdit.models.tiny import build_tiny_wan_pipeline

STEPS = 12
CALL = dict(prompt="a red square", num_inference_steps=STEPS, height=32, width=32, num_frames=5,
            guidance_scale=5.0, output_type="latent")


def _pipeline():
    pipe = build_tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compile_blocks(transformer) -> None:
    for index, block in enumerate(transformer.blocks):
        transformer.blocks[index] = torch.compile(block)


def _run(pipe, callback=None):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0), callback_on_step_end=callback).frames


@pytest.mark.timeout(400)
@pytest.mark.parametrize("order", ["compile_then_apply", "apply_then_compile"])
def test_compiled_blocks_forecast_like_eager_without_recompiling(order):
    eager = _pipeline()
    apply_spectrum(eager.transformer, SpectrumConfig(num_inference_steps=STEPS))
    expected = _run(eager)
    expected_real = spectrum_stats(eager.transformer)["cond"]["real_steps"]

    torch._dynamo.reset()
    counters.clear()
    pipe = _pipeline()
    if order == "compile_then_apply":
        _compile_blocks(pipe.transformer)
        apply_spectrum(pipe.transformer, SpectrumConfig(num_inference_steps=STEPS))
    else:
        apply_spectrum(pipe.transformer, SpectrumConfig(num_inference_steps=STEPS))
        _compile_blocks(pipe.transformer)
    graphs_after_step = []

    def count(pipeline, step, timestep, callback_kwargs):
        graphs_after_step.append(counters["stats"]["unique_graphs"])
        return callback_kwargs

    out = _run(pipe, count)
    again = _run(pipe)
    assert torch.linalg.norm(out - expected) / torch.linalg.norm(expected) <= 1e-5
    assert torch.equal(out, again)
    assert spectrum_stats(pipe.transformer)["cond"]["real_steps"] == expected_real
    assert len(expected_real) < STEPS
    # Compiled at the first step (real), then nothing: not at forecast steps, not at later real
    # steps, not in a second generation.
    assert graphs_after_step[0] >= 1
    assert graphs_after_step == [graphs_after_step[0]] * STEPS, graphs_after_step
    assert counters["stats"]["unique_graphs"] == graphs_after_step[0]
    assert not [reason for reason in counters["unimplemented"] if "recompile" in reason.lower()]
