"""Spectrum inside xDiT's own model runner: `spectrum-xdit xdit ARGS` (xDiT's launcher and
``xfuser/runner.py``) and the Python path (``prepare_runner`` then ``xFuserModelRunner``), on CPU
over gloo with the embedded models."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from spectrum_xdit.parallel.testing import free_port, run_distributed


def _xdit(tmp_path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "spectrum_xdit.launch.cli", "xdit", "--master_port", str(free_port()),
               "--output_directory", str(tmp_path), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("model,branches,output", [
    ("digits-wan", ("cond", "uncond"), "digits_wan_u2r1_tc_False_16x16_0.mp4"),
    ("tiny-flux", ("cond",), "tiny_flux_u2r1_tc_False_32x32_0.png"),   # distilled guidance: one branch
])
def test_the_issue_command_runs_under_ulysses2(tmp_path, model, branches, output):
    """The command a user of xDiT types, on the embedded models: no download, no extra flag."""
    result = _xdit(tmp_path, "--model", model, "--ulysses_degree", "2", "--cache_method", "spectrum",
                   "--prompt", "digit 3 moving left", "--num_inference_steps", "20")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Step cache applied: method=spectrum" in log
    real = re.search(r"Spectrum transformer: real steps (\{.*\})", log)
    assert real, log[-3000:]
    real_steps = ast.literal_eval(real.group(1))
    assert tuple(real_steps) == branches
    assert real_steps["cond"][0] == 0 and len(real_steps["cond"]) < 20, real_steps   # Spectrum skipped evaluations
    assert (tmp_path / output).stat().st_size > 0
    assert (tmp_path / "timings.json").exists()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_the_runner_takes_the_embedded_image_to_video_model(tmp_path):
    """xDiT's Wan2.1 I2V runner, its first frame from `--input_images`, with Spectrum."""
    from PIL import Image

    image = tmp_path / "first_frame.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    result = _xdit(tmp_path, "--model", "tiny-wan-i2v", "--cache_method", "spectrum", "--prompt", "a cat",
                   "--input_images", str(image), "--num_inference_steps", "20")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    real = re.search(r"Spectrum transformer: real steps \{'cond': \[([\d, ]+)\]", log)
    assert real and len(real.group(1).split(",")) < 20, log[-3000:]
    assert (tmp_path / "tiny_wan_i2v_u1r1_tc_False_32x32_0.mp4").stat().st_size > 0


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_spectrum_is_refused_for_a_model_it_does_not_support(tmp_path):
    result = _xdit(tmp_path, "--model", "Wan2.1-VACE-1.3B", "--cache_method", "spectrum", "--prompt", "x",
                   timeout=180)
    assert result.returncode != 0
    message = re.search(r"ValueError: (--cache_method spectrum: model Wan2.1-VACE-1.3B is not supported; "
                        r"supported models: .*)", result.stderr)
    assert message, result.stderr[-3000:]
    supported = message.group(1).split("supported models: ")[1].split(", ")
    assert {"Wan2.1-T2V", "Wan2.2-T2V", "Wan2.1-I2V", "FLUX.1-dev", "digits-wan", "tiny-wan", "tiny-flux",
            "tiny-wan-i2v", "tiny-wan22"} <= set(supported)
    assert not any("VACE" in name for name in supported)


def _runner_frames(runner_argv: list[str]):
    """xDiT's documented Python path on this rank: a fresh torch.distributed world as torchrun
    leaves it (the runner starts it), then ``xFuserModelRunner``; the frames and real steps."""
    import torch.distributed as dist

    holder = [free_port()]
    dist.broadcast_object_list(holder)   # one port for the runner's world, agreed by every rank
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(holder[0])

    from spectrum_xdit.launch.xdit import prepare_runner

    prepare_runner()
    from xfuser.config import FlexibleArgumentParser, xFuserArgs
    from xfuser.runner import xFuserModelRunner

    from spectrum_xdit.experts import pipeline_spectrum_stats

    from torch._dynamo.utils import counters

    args = vars(xFuserArgs.add_runner_args(FlexibleArgumentParser()).parse_args(runner_argv))
    runner = xFuserModelRunner(args)
    input_args = runner.preprocess_args(args)
    runner.initialize(input_args)   # with --use_torch_compile: compiles and warms up here
    graphs_before_run = counters["stats"]["unique_graphs"]
    output, timings = runner.run(input_args)
    graphs = (graphs_before_run, counters["stats"]["unique_graphs"])
    real_steps = {expert: {branch: stats["real_steps"] for branch, stats in branches.items()}
                  for expert, branches in pipeline_spectrum_stats(runner.model.pipe).items()}
    runner.cleanup()
    return np.asarray(output.videos[0]), real_steps, timings, graphs


def _generate_frames(model: str = "tiny-wan"):
    """`spectrum-xdit generate`'s frames and report in one process, for the runner tests' settings."""
    from spectrum_xdit.launch.request import GenerationRequest, ParallelLayout
    from spectrum_xdit.launch.runner import init_rank
    from spectrum_xdit.models import resolve_model

    spec = resolve_model(model)
    request = GenerationRequest(prompt="a red square", seed=3, num_inference_steps=20, height=spec.height,
                                width=spec.width, num_frames=spec.num_frames, guidance_scale=5.0,
                                cache={"flex_window": 3.0})
    return init_rank(spec, ParallelLayout()).generate(request, decode=True)


RUNNER_ARGV = ["--cache_method", "spectrum", "--cache_config", '{"flex_window": 3.0}',
               "--prompt", "a red square", "--num_inference_steps", "20", "--seed", "3"]


@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("model", ["tiny-wan", "tiny-wan22"])
def test_runner_python_path_equals_generate(model):
    """xDiT's runner under Ulysses=2 with `--cache_method spectrum` gives the frames and the real
    steps of `spectrum-xdit generate` in one process, for the same settings; for Wan2.2 (xDiT's
    two-expert runner) per expert."""
    frames, real_steps, timings, _ = run_distributed(
        _runner_frames, world_size=2, args=(["--model", model, *RUNNER_ARGV, "--ulysses_degree", "2"],),
        timeout=300.0)
    result = _generate_frames(model)
    single = result.media
    assert frames.shape == single.shape
    assert np.linalg.norm(frames - single) / np.linalg.norm(single) <= 1e-5
    expected = {name: expert["real_steps"] for name, expert in result.report.get("experts", {}).items()} \
        or {"transformer": result.report["real_steps"]}
    assert real_steps == expected
    assert sum(len(steps["cond"]) for steps in real_steps.values()) < 20
    if model == "tiny-wan22":
        assert set(real_steps) == {"transformer", "transformer_2"}
    assert len(timings) == 1 and timings[0] > 0   # the runner's own timing, on the host clock


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_runner_use_torch_compile_with_spectrum_equals_eager():
    """xDiT's `--use_torch_compile`: with a cache method it compiles block by block and warms up
    before the cache is applied; Spectrum then decides outside the compiled blocks, so the timed
    run compiles nothing more and stays within tolerance of eager `generate`."""
    frames, real_steps, _, (graphs_before, graphs_after) = run_distributed(
        _runner_frames, world_size=1, args=(["--model", "tiny-wan", *RUNNER_ARGV, "--use_torch_compile"],),
        timeout=300.0)
    result = _generate_frames()
    assert np.linalg.norm(frames - result.media) / np.linalg.norm(result.media) <= 1e-5
    assert real_steps == {"transformer": result.report["real_steps"]}
    assert graphs_before >= 1 and graphs_after == graphs_before
