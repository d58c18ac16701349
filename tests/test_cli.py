"""`spectrum-xdit generate`: argument checks, and torchrun with 2 gloo ranks equals one process."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from spectrum_xdit.launch.cli import build_parser, check_arguments
from spectrum_xdit.parallel.testing import free_port

REPORT_KEYS = {"model", "num_inference_steps", "world_size", "parallel", "cache_method", "real_steps", "nfe",
               "denoise_seconds", "total_seconds", "state_bytes_per_rank"}


@pytest.mark.parametrize("argv,world_size,message", [
    (["--ulysses_degree", "2"], 1, "world size is 1"),
    (["--model", "tiny-wan", "--ulysses_degree", "4"], 4, "2 attention heads, not divisible by --ulysses_degree 4"),
    (["--model", "sd-xl"], 1, "unknown model 'sd-xl'"),
    (["--model", "tiny-flux", "--use_cfg_parallel"], 2, "supported for Wan2.1 only, not tiny-flux"),
    (["--model", "tiny-wan", "--use_cfg_parallel", "--guidance_scale", "1"], 2, "needs guidance"),
    (["--model", "tiny-wan", "--use_cfg_parallel"], 1, "x cfg 2 x --pipefusion_parallel_degree 1 = 2, but the world size is 1"),
    (["--output", "x.png"], 1, "must end in .gif or .mp4"),
    (["--spectrum_blend_weight", "2"], 1, r"blend_weight must be in \[0.0, 1.0\]"),
    (["--ring_degree", "0"], 1, "--ring_degree must be >= 1"),
    (["--model", "tiny-wan", "--pipefusion_parallel_degree", "2"], 2, "FLUX.1 only"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2"], 2, "pass --guidance_scale 1"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2", "--guidance_scale", "1",
      "--spectrum_schedule", "adaptive"], 2, "paper schedule with a fixed blend weight"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2"], 4, "= 2, but the world size is 4"),
    (["--spectrum_schedule", "fast"], 1, "schedule must be one of 'paper', 'adaptive'"),
    (["--spectrum_min_gap", "5", "--spectrum_max_gap", "3"], 1, "max_gap must be an integer >= 5"),
])
def test_bad_arguments_fail_before_building_a_model(argv, world_size, message, capsys):
    parser = build_parser()
    args = parser.parse_args(["generate", *argv])
    with pytest.raises(SystemExit) as exit_info:
        check_arguments(args, parser, world_size)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag,value,message", [
    ("--spectrum_blend_weight", "best", 'blend_weight must be a number or "auto"'),
    ("--spectrum_max_gap", "2.5", "max_gap must be an integer"),
    ("--spectrum_error_budget", "small", "error_budget must be a number"),
])
def test_spectrum_flags_are_typed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", flag, value])
    assert message in capsys.readouterr().err
    assert build_parser().parse_args(["generate", "--spectrum_blend_weight", "auto"]).spectrum_blend_weight == "auto"


def _generate(tmp_path, name, nproc, extra):
    latents, report = tmp_path / f"{name}.npy", tmp_path / f"{name}.json"
    launcher = [sys.executable, "-m", "spectrum_xdit.launch.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    "--master_port", str(free_port()), "-m", "spectrum_xdit.launch.cli"]
    command = [*launcher, "generate", "--num_inference_steps", "20", "--save_latents", str(latents),
               "--report", str(report), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(latents), json.loads(report.read_text())


@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["tiny-wan", "tiny-flux"])
def test_torchrun_ulysses2_equals_single_process(tmp_path, model):
    flags = ["--model", model, "--prompt", "a red square", "--cache_method", "spectrum"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    sharded, sharded_report = _generate(tmp_path, "sharded", 2, [*flags, "--ulysses_degree", "2"])
    error = np.linalg.norm(sharded - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert REPORT_KEYS <= set(sharded_report)
    assert sharded_report["world_size"] == 2 and sharded_report["parallel"]["ulysses_degree"] == 2
    assert sharded_report["real_steps"] == single_report["real_steps"]
    assert sharded_report["nfe"] == {"cond": 9, "uncond": 9}
    assert sharded_report["state_bytes_per_rank"] * 2 == single_report["state_bytes_per_rank"]


@pytest.mark.timeout(600)
def test_torchrun_adaptive_spectrum_equals_single_process(tmp_path):
    """Error-controlled Spectrum through the CLI: the 2-rank run validates on shards, reduces
    the scores over the job and takes the single process's decisions."""
    flags = ["--model", "tiny-wan", "--prompt", "a red square", "--cache_method", "spectrum",
             "--spectrum_schedule", "adaptive", "--spectrum_blend_weight", "auto", "--spectrum_warmup_steps", "3",
             "--spectrum_error_budget", "0.3", "--spectrum_max_gap", "4"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    sharded, sharded_report = _generate(tmp_path, "sharded", 2, [*flags, "--ulysses_degree", "2"])
    error = np.linalg.norm(sharded - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert sharded_report["real_steps"] == single_report["real_steps"]
    assert 3 < sharded_report["nfe"]["cond"] < 20
    assert sharded_report["spectrum"]["schedule"] == "adaptive"
    assert [p["gap"] for p in sharded_report["plan"]] == [p["gap"] for p in single_report["plan"]]
    assert len(sharded_report["validation"]) == len(single_report["validation"]) > 0
    assert sharded_report["validation_seconds"] > 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", [["--use_cfg_parallel"], ["--use_cfg_parallel", "--ulysses_degree", "2"]],
                         ids=["cfg2", "cfg2xulysses2"])
def test_cfg_parallel_wan_equals_single_process(tmp_path, layout):
    """Wan2.1 CFG parallelism (this project's; xfuser 0.7.0 has none): each half of the job runs
    one guidance branch and keeps only that branch's forecaster."""
    flags = ["--model", "tiny-wan", "--prompt", "a red square", "--cache_method", "spectrum"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    world = 2 * (2 if "--ulysses_degree" in layout else 1)
    sharded, report = _generate(tmp_path, "cfg", world, [*flags, *layout])
    error = np.linalg.norm(sharded - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["parallel"]["cfg_degree"] == 2 and report["world_size"] == world
    assert report["real_steps"] == single_report["real_steps"] and set(report["nfe"]) == {"cond", "uncond"}
    # rank 0 holds the conditional branch only, of its sequence shard
    sp = world // 2
    assert report["state_bytes_per_rank"] * 2 * sp == single_report["state_bytes_per_rank"]


@pytest.mark.timeout(600)
def test_torchrun_pipefusion_spectrum(tmp_path):
    """`--pipefusion_parallel_degree 2`: xDiT's PipeFusion FLUX.1 pipeline with Spectrum. With the
    synchronous warm-up covering every step PipeFusion is exact, so it equals one process; the
    forecaster state lives on the last stage only."""
    flags = ["--model", "tiny-flux", "--prompt", "a red square", "--cache_method", "spectrum", "--guidance_scale", "1"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    piped, report = _generate(tmp_path, "pipefusion", 2, [*flags, "--pipefusion_parallel_degree", "2",
                                                          "--num_pipeline_patch", "2", "--warmup_steps", "20"])
    error = np.linalg.norm(piped - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["parallel"]["pipefusion_parallel_degree"] == 2
    assert report["real_steps"] == single_report["real_steps"]
    assert report["state_bytes_by_rank"] == [0, single_report["state_bytes_per_rank"]]


@pytest.mark.timeout(600)
def test_cfg_parallel_adaptive_spectrum_equals_single_process(tmp_path):
    """The adaptive controller under CFG parallelism: each half scores one branch, the job-wide
    sums cover both, so the decisions are the single process's."""
    flags = ["--model", "tiny-wan", "--prompt", "a red square", "--cache_method", "spectrum",
             "--spectrum_schedule", "adaptive", "--spectrum_blend_weight", "auto", "--spectrum_warmup_steps", "3",
             "--spectrum_error_budget", "0.3", "--spectrum_max_gap", "4"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    split, report = _generate(tmp_path, "cfg", 2, [*flags, "--use_cfg_parallel"])
    error = np.linalg.norm(split - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["real_steps"] == single_report["real_steps"] and 3 < report["nfe"]["cond"] < 20
    assert [p["gap"] for p in report["plan"]] == [p["gap"] for p in single_report["plan"]]
    for mine, theirs in zip(report["validation"], single_report["validation"]):
        assert mine["blend"] == pytest.approx(theirs["blend"], rel=1e-4)


def _xdit_cache_method_latents(generate_kwargs: dict, cache_config: str):
    """`--cache_method spectrum` parsed by xDiT's own flags and applied by xDiT's `apply_cache`."""
    from spectrum_xdit.parallel.cpu_support import enable_cpu_support

    enable_cpu_support()
    import torch
    import xfuser.model_executor.cache.adapters as adapters
    from xfuser.config import FlexibleArgumentParser, xFuserArgs

    from spectrum_xdit.models import build_tiny_wan_pipeline
    from spectrum_xdit.parallel.xdit_cache import register_spectrum_cache_method

    register_spectrum_cache_method()
    args = xFuserArgs.add_cli_args(FlexibleArgumentParser()).parse_args(
        ["--model", "tiny-wan", "--cache_method", "spectrum", "--cache_config", cache_config])
    pipe = build_tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapters.apply_cache(args.cache_method, generate_kwargs["num_inference_steps"], pipe,
                         cache_config=args.cache_config)
    return pipe(**generate_kwargs, generator=torch.Generator().manual_seed(0)).frames.numpy()


@pytest.mark.timeout(300)
def test_xdit_cache_method_spectrum_equals_generate(tmp_path):
    from spectrum_xdit.parallel.testing import run_distributed

    cli_latents, _ = _generate(tmp_path, "cli", 1, ["--model", "tiny-wan", "--prompt", "a red square",
                                                    "--spectrum_flex_window", "3.0"])
    call = dict(prompt="a red square", num_inference_steps=20, height=32, width=32, num_frames=5,
                guidance_scale=5.0, output_type="latent")
    # A fresh process: xDiT must be imported after the CPU patches are installed.
    xdit_latents = run_distributed(_xdit_cache_method_latents, world_size=1,
                                   args=(call, '{"flex_window": 3.0}'), timeout=200.0)
    assert np.array_equal(cli_latents, xdit_latents)


def test_xdit_cache_config_is_checked():
    from spectrum_xdit.parallel.xdit_cache import spectrum_config_from_cache_config

    assert spectrum_config_from_cache_config(30, '{"flex_window": 3.0}').flex_window == 3.0
    with pytest.raises(ValueError, match="unknown --cache_config keys for spectrum: \\['threshold'\\]"):
        spectrum_config_from_cache_config(30, '{"threshold": 0.1}')
    with pytest.raises(ValueError, match="JSON object"):
        spectrum_config_from_cache_config(30, "[1, 2]")
    with pytest.raises(ValueError, match="blend_weight must be in"):
        spectrum_config_from_cache_config(30, '{"blend_weight": 3}')
