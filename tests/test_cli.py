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
               "denoise_seconds", "total_seconds", "state_bytes_per_rank", "xfuser_patches"}

# what xfuser's logger, transformers' notices and torch's deprecations print
ENGINE_NOISE = ("DEBUG ", "INFO ", "WARNING ", "[transformers]", "FutureWarning", "DeprecationWarning")


@pytest.mark.parametrize("argv,world_size,message", [
    (["--ulysses_degree", "2"], 1, "world size is 1"),
    (["--model", "tiny-wan", "--ulysses_degree", "4"], 4, "--ulysses_degree: tiny-wan has 2 attention heads, not divisible"),
    (["--model", "sd-xl"], 1, "unknown model 'sd-xl'"),
    (["--model", "tiny-flux", "--use_cfg_parallel"], 2, "--use_cfg_parallel: is supported for Wan2.1 only, not tiny-flux"),
    (["--model", "tiny-wan", "--use_cfg_parallel", "--guidance_scale", "1"], 2,
     "--guidance_scale: CFG parallelism .* needs classifier-free guidance: guidance_scale > 1"),
    (["--model", "tiny-wan", "--use_cfg_parallel"], 1, "x cfg 2 x pipefusion 1 = 2, but the world size is 1"),
    (["--output", "x.png"], 1, "--output: must be one of mp4, gif, npy for digits-wan"),
    (["--output", "x.webm"], 1, "--output: input should be 'mp4', 'gif', 'png' or 'npy'"),
    (["--spectrum_blend_weight", "2"], 1, r'--spectrum_blend_weight: must be a number in \[0, 1\] or "auto"'),
    (["--spectrum_blend_weight", "best"], 1, r'--spectrum_blend_weight: must be a number in \[0, 1\] or "auto"'),
    (["--spectrum_max_gap", "2.5"], 1, "--spectrum_max_gap: input should be a valid integer, got 2.5"),
    (["--spectrum_error_budget", "small"], 1, "--spectrum_error_budget: input should be a valid number"),
    (["--ring_degree", "0"], 1, "--ring_degree: input should be greater than or equal to 1"),
    (["--seed", "x"], 1, "--seed: input should be a valid integer"),
    (["--model", "tiny-wan", "--pipefusion_parallel_degree", "2"], 2, "FLUX.1 only"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2", "--true_cfg_scale", "4"], 2,
     "--true_cfg_scale: PipeFusion .* no true classifier-free guidance: use true_cfg_scale 1"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2", "--spectrum_schedule", "adaptive"], 2,
     "--spectrum_schedule: PipeFusion supports the paper schedule"),
    (["--model", "tiny-wan", "--true_cfg_scale", "4"], 1,
     "--true_cfg_scale: is FLUX.1's true classifier-free guidance; tiny-wan takes .* as guidance_scale"),
    (["--model", "tiny-flux", "--true_cfg_scale", "0.5"], 1,
     "--true_cfg_scale: input should be greater than or equal to 1"),
    (["--model", "tiny-flux", "--pipefusion_parallel_degree", "2"], 4, "= 2, but the world size is 4"),
    (["--spectrum_schedule", "fast"], 1, "--spectrum_schedule: input should be 'paper', 'adaptive' or 'budget'"),
    (["--spectrum_min_gap", "5", "--spectrum_max_gap", "3"], 1, "--spectrum_max_gap: must be at least min_gap 5"),
    (["--spectrum_degree", "17"], 1, "--spectrum_degree: input should be less than or equal to 16"),
    (["--spectrum_warmup_steps", "1000000000"], 1, "--spectrum_warmup_steps: input should be less than or equal"),
    (["--spectrum_ridge_lambda", "1e308"], 1, "--spectrum_ridge_lambda: input should be less than or equal"),
    (["--guidance_scale", "nan"], 1, "--guidance_scale: input should be a valid number"),
    (["--guidance_scale", "NaN"], 1, "--guidance_scale: input should be a finite number"),
    (["--guidance_scale", "1e30"], 1, "--guidance_scale: input should be less than or equal to 50"),
    (["--height", "33"], 1, "--height: must be a multiple of 4 for digits-wan, got 33"),
    (["--num_frames", "2"], 1, "--num_frames: must be 1 more than a multiple of 4 for digits-wan, got 2"),
    (["--model", "tiny-wan", "--height", "528"], 1, "--height: gives 33 positions, beyond the 32 of tiny-wan's"),
    (["--model", "tiny-wan", "--num_frames", "129"], 1, "--num_frames: gives 33 positions"),
    (["--model", "tiny-wan", "--ulysses_degree", "2", "--height", "16", "--width", "16", "--num_frames", "1"], 2,
     "--height, --width, --num_frames: give 1 tokens, which the sequence-parallel degree 2"),
    (["--prompt", "a\udcffb"], 1, "--prompt: is not valid Unicode text"),
    (["--report", "/"], 1, "--report: / is a directory"),
    (["--output", "{file}/x.gif"], 1, "--output: cannot be written: .* is not a directory"),
])
def test_bad_arguments_fail_before_building_a_model(argv, world_size, message, capsys, tmp_path):
    parser = build_parser()
    (tmp_path / "file").write_text("")
    argv = [arg.replace("{file}", str(tmp_path / "file")) for arg in argv]
    args = parser.parse_args(["generate", *argv])
    with pytest.raises(SystemExit) as exit_info:
        check_arguments(args, parser, world_size)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_bad_argument_fails_without_importing_the_engines():
    """Checks before imports: a bad launch costs no torch, diffusers, xfuser or ray import."""
    probe = ("import sys\nfrom spectrum_xdit.launch.cli import main\ntry:\n"
             "    main(['generate', '--spectrum_degree', '99'])\nexcept SystemExit as exit:\n"
             "    print(exit.code, sorted(m for m in ('torch', 'diffusers', 'xfuser', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []", (result.stdout, result.stderr[-2000:])
    assert "--spectrum_degree: input should be less than or equal to 16" in result.stderr


def test_flags_are_read_by_the_request_model():
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "5", "--spectrum_blend_weight", "auto", "--seed", "3",
                              "--spectrum_window_size", "3", "--cache_method", "none", "--ulysses_degree", "1"])
    spec, layout, request, _ = check_arguments(args, parser, 1)
    assert request.prompt == "5" and request.seed == 3 and request.cache.blend_weight == "auto"
    assert request.cache.window_size == 3.0 and request.spectrum is None and layout.ulysses_degree == 1
    assert (request.height, request.width, request.num_frames) == (spec.height, spec.width, spec.num_frames)


@pytest.mark.parametrize("extra,reuse", [([], True), (["--spectrum_reuse"], True), (["--spectrum_reuse", "false"], False)])
def test_a_bool_flag_alone_is_true_and_false_turns_off_a_true_default(extra, reuse):
    """``--spectrum_target_nfe`` alone takes the budget's reuse default (true); ``false`` turns it off."""
    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", "5", "--spectrum_target_nfe", "10", *extra])
    _, _, request, _ = check_arguments(args, parser, 1)
    assert request.spectrum.reuse is reuse


@pytest.mark.parametrize("model,guidance", [("digits-wan", 5.0), ("tiny-wan", 5.0), ("tiny-flux", 3.5)])
def test_guidance_scale_defaults_to_the_model_family_s(model, guidance):
    """Wan2.1's classifier-free guidance 5.0, FLUX.1's distilled guidance 3.5 (diffusers' defaults);
    true CFG off."""
    parser = build_parser()
    _, _, request, _ = check_arguments(parser.parse_args(["generate", "--model", model]), parser, 1)
    assert (request.guidance_scale, request.true_cfg_scale) == (guidance, 1.0)
    _, _, given, _ = check_arguments(parser.parse_args(["generate", "--model", model, "--guidance_scale", "2"]),
                                     parser, 1)
    assert given.guidance_scale == 2.0


@pytest.mark.parametrize("flags", [["--guidance_scale", "3.5"], ["--guidance_scale", "1"], []])
def test_pipefusion_takes_flux_distilled_guidance(flags):
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny-flux", "--pipefusion_parallel_degree", "2", *flags])
    _, layout, request, _ = check_arguments(args, parser, 2)
    assert layout.pipefusion_parallel_degree == 2 and request.guidance_scale == float((flags or [0, 3.5])[1])


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """``_generate`` in one process, once per set of flags for the whole module: several tests
    compare their layouts against the same one-process run."""
    runs = {}

    def run(flags):
        key = tuple(flags)
        if key not in runs:
            runs[key] = _generate(tmp_path_factory.mktemp("single"), "single", 1, flags)
        return runs[key]

    return run


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
    # the engines' chatter stays off the terminal without --verbose
    noise = [line for line in (result.stdout + result.stderr).splitlines() if any(mark in line for mark in ENGINE_NOISE)]
    assert not noise, noise[:5]
    return np.load(latents), json.loads(report.read_text())


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", ["tiny-wan", "tiny-flux"])
def test_torchrun_ulysses2_equals_single_process(tmp_path, model, single_process):
    flags = ["--model", model, "--prompt", "a red square", "--cache_method", "spectrum"]
    single, single_report = single_process(flags)
    sharded, sharded_report = _generate(tmp_path, "sharded", 2, [*flags, "--ulysses_degree", "2"])
    error = np.linalg.norm(sharded - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert REPORT_KEYS <= set(sharded_report)
    assert sharded_report["world_size"] == 2 and sharded_report["parallel"]["ulysses_degree"] == 2
    assert sharded_report["real_steps"] == single_report["real_steps"]
    # Wan2.1 guides with CFG by default, FLUX.1 with its distilled guidance in one call
    assert sharded_report["nfe"] == ({"cond": 9, "uncond": 9} if model == "tiny-wan" else {"cond": 9})
    assert sharded_report["state_bytes_per_rank"] * 2 == single_report["state_bytes_per_rank"]
    # one process runs no xDiT, so patches nothing; the ranks record what they patched
    assert single_report["xfuser_patches"]["installed"] == [] and not single_report["xfuser_patches"]["applied"]
    assert sharded_report["xfuser_patches"]["installed"] == ["cpu_gloo", "padding", "cache_method"]
    assert "xfuser.envs: patch_envs" in sharded_report["xfuser_patches"]["applied"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", [["--use_cfg_parallel"], ["--use_cfg_parallel", "--ulysses_degree", "2"]],
                         ids=["cfg2", "cfg2xulysses2"])
def test_cfg_parallel_wan_equals_single_process(tmp_path, layout, single_process):
    """Wan2.1 CFG parallelism (this project's; xfuser 0.7.0 has none): each half of the job runs
    one guidance branch and keeps only that branch's forecaster."""
    flags = ["--model", "tiny-wan", "--prompt", "a red square", "--cache_method", "spectrum"]
    single, single_report = single_process(flags)
    world = 2 * (2 if "--ulysses_degree" in layout else 1)
    sharded, report = _generate(tmp_path, "cfg", world, [*flags, *layout])
    error = np.linalg.norm(sharded - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["parallel"]["cfg_degree"] == 2 and report["world_size"] == world
    assert report["real_steps"] == single_report["real_steps"] and set(report["nfe"]) == {"cond", "uncond"}
    # rank 0 holds the conditional branch only, of its sequence shard
    sp = world // 2
    assert report["state_bytes_per_rank"] * 2 * sp == single_report["state_bytes_per_rank"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_wan22_two_experts_under_sequence_and_cfg_parallel_equal_single_process(tmp_path):
    """tiny-wan22: each layout wraps or splits both experts; each expert keeps its own schedule and
    forecasters of its own shard (or branch), so the per-rank peak is one expert's, halved (Ring
    attention's equality is test_matrix's, in-process)."""
    flags = ["--model", "tiny-wan22", "--prompt", "a red square", "--cache_method", "spectrum"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    real = {"transformer": [0, 1, 2, 3, 4, 6, 8], "transformer_2": [11, 12, 13, 14, 15, 17, 19]}
    assert single_report["experts"] == {
        name: {"steps": steps, "real_steps": {"cond": real[name], "uncond": real[name]}, "nfe": {"cond": 7, "uncond": 7}}
        for name, steps in (("transformer", [0, 11]), ("transformer_2", [11, 20]))}
    assert single_report["nfe"] == {"cond": 14, "uncond": 14}
    for name, layout in (("ulysses2", ["--ulysses_degree", "2"]), ("cfg2", ["--use_cfg_parallel"])):
        parallel, report = _generate(tmp_path, name, 2, [*flags, *layout])
        error = np.linalg.norm(parallel - single) / np.linalg.norm(single)
        assert error <= 1e-5, (name, error)
        assert report["experts"] == single_report["experts"] and report["real_steps"] == single_report["real_steps"]
        assert report["state_bytes_per_rank"] * 2 == single_report["state_bytes_per_rank"], name


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_torchrun_pipefusion_spectrum(tmp_path):
    """`--pipefusion_parallel_degree 2`: xDiT's PipeFusion FLUX.1 pipeline with Spectrum and distilled
    guidance (not the default 3.5 of both pipelines, so that equality shows it is passed on). With
    the synchronous warm-up covering every step PipeFusion is exact, so it equals one process; the
    forecaster state lives on the last stage only."""
    flags = ["--model", "tiny-flux", "--prompt", "a red square", "--cache_method", "spectrum", "--guidance_scale", "2"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    piped, report = _generate(tmp_path, "pipefusion", 2, [*flags, "--pipefusion_parallel_degree", "2",
                                                          "--num_pipeline_patch", "2", "--warmup_steps", "20"])
    error = np.linalg.norm(piped - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["parallel"]["pipefusion_parallel_degree"] == 2
    assert report["real_steps"] == single_report["real_steps"] and set(report["nfe"]) == {"cond"}
    assert report["guidance_scale"] == 2.0
    assert report["state_bytes_by_rank"] == [0, single_report["state_bytes_per_rank"]]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_cfg_parallel_adaptive_spectrum_equals_single_process(tmp_path):
    """Error-controlled Spectrum through the CLI under CFG parallelism: each half scores one branch,
    the job-wide sums cover both, so the decisions are the single process's (under Ulysses, where
    each rank scores a shard: test_matrix)."""
    flags = ["--model", "tiny-wan", "--prompt", "a red square", "--cache_method", "spectrum",
             "--spectrum_schedule", "adaptive", "--spectrum_blend_weight", "auto", "--spectrum_warmup_steps", "3",
             "--spectrum_error_budget", "0.3", "--spectrum_max_gap", "4"]
    single, single_report = _generate(tmp_path, "single", 1, flags)
    split, report = _generate(tmp_path, "cfg", 2, [*flags, "--use_cfg_parallel"])
    error = np.linalg.norm(split - single) / np.linalg.norm(single)
    assert error <= 1e-5, error
    assert report["real_steps"] == single_report["real_steps"] and 3 < report["nfe"]["cond"] < 20
    assert report["spectrum"]["schedule"] == "adaptive" and report["validation_seconds"] > 0
    assert [p["gap"] for p in report["plan"]] == [p["gap"] for p in single_report["plan"]]
    assert len(report["validation"]) == len(single_report["validation"]) > 0
    for mine, theirs in zip(report["validation"], single_report["validation"]):
        assert mine["blend"] == pytest.approx(theirs["blend"], rel=1e-4)


def _xdit_cache_method_latents(generate_kwargs: dict, cache_config: str, model: str = "tiny-wan"):
    """`--cache_method spectrum` parsed by xDiT's own flags and applied by xDiT's `apply_cache`."""
    from spectrum_xdit.parallel import patches

    patches.install()
    import torch
    import xfuser.model_executor.cache.adapters as adapters
    from xfuser.config import FlexibleArgumentParser, xFuserArgs

    from spectrum_xdit.models import resolve_model

    args = xFuserArgs.add_cli_args(FlexibleArgumentParser()).parse_args(
        ["--model", model, "--cache_method", "spectrum", "--cache_config", cache_config])
    pipe = resolve_model(model).build()
    pipe.set_progress_bar_config(disable=True)
    adapters.apply_cache(args.cache_method, generate_kwargs["num_inference_steps"], pipe,
                         cache_config=args.cache_config)
    return pipe(**generate_kwargs, generator=torch.Generator().manual_seed(0)).frames.numpy()


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["tiny-wan", "tiny-wan22"])
def test_xdit_cache_method_spectrum_equals_generate(tmp_path, model):
    """tiny-wan22: xDiT's apply_cache is given the pipeline and applies Spectrum to both experts."""
    from spectrum_xdit.parallel.testing import run_distributed

    cli_latents, _ = _generate(tmp_path, "cli", 1, ["--model", model, "--prompt", "a red square",
                                                    "--spectrum_flex_window", "3.0"])
    call = dict(prompt="a red square", num_inference_steps=20, height=32, width=32, num_frames=5,
                guidance_scale=5.0, output_type="latent")
    # A fresh process: xDiT must be imported after the CPU patches are installed.
    xdit_latents = run_distributed(_xdit_cache_method_latents, world_size=1,
                                   args=(call, '{"flex_window": 3.0}', model), timeout=200.0)
    assert np.array_equal(cli_latents, xdit_latents)


def test_xdit_cache_config_is_checked():
    from spectrum_xdit.parallel.patches.cache_method import spectrum_config_from_cache_config

    assert spectrum_config_from_cache_config(30, '{"flex_window": 3.0}').flex_window == 3.0
    with pytest.raises(ValueError, match="--cache_config threshold: unknown field"):
        spectrum_config_from_cache_config(30, '{"threshold": 0.1}')
    with pytest.raises(ValueError, match="JSON object"):
        spectrum_config_from_cache_config(30, "[1, 2]")
    with pytest.raises(ValueError, match="--cache_config blend_weight: must be a number in"):
        spectrum_config_from_cache_config(30, '{"blend_weight": 3}')
    with pytest.raises(ValueError, match="--cache_config num_inference_steps: comes from xDiT"):
        spectrum_config_from_cache_config(30, '{"num_inference_steps": 3}')


def test_xdit_runner_refuses_spectrum_under_fsdp():
    """``--fully_shard_degree``: FSDP gathers a block's weights before it runs, so forecast steps
    would still gather every block; the patched validation says so before anything loads."""
    from types import SimpleNamespace

    from spectrum_xdit.parallel.patches.cache_method import patch_model_validation

    class xFuserModel:   # stands in for xfuser's base class, whose check the patch wraps
        def _validate_config(self, config):
            self.validated = config

    class xFuserWan21T2VModel(xFuserModel):
        settings = SimpleNamespace(step_cache_config={"teacache": None})

    patch_model_validation(SimpleNamespace(xFuserModel=xFuserModel, MODEL_REGISTRY={}))
    model = xFuserWan21T2VModel()
    config = dict(cache_method="spectrum", model="Wan2.1-T2V", pipefusion_parallel_degree=1)
    with pytest.raises(ValueError, match="--cache_method spectrum with --fully_shard_degree > 1"):
        model._validate_config(SimpleNamespace(**config, fully_shard_degree=2))
    model._validate_config(SimpleNamespace(**config, fully_shard_degree=1))
    assert model.validated.fully_shard_degree == 1 and "spectrum" in model.settings.step_cache_config


@pytest.mark.parametrize("flags, budget", [(["--spectrum_target_nfe", "7"], 7), (["--spectrum_speedup", "2.5"], 8)])
def test_budget_flags_select_the_budget_schedule(flags, budget):
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny-wan", "--num_inference_steps", "20", *flags])
    _, _, request, _ = check_arguments(args, parser, 1)
    assert request.cache.schedule == "budget" and request.spectrum.nfe_budget == budget


def test_budget_flags_are_checked_together(capsys):
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "tiny-wan", "--num_inference_steps", "20",
                              "--spectrum_target_nfe", "7", "--spectrum_speedup", "2"])
    with pytest.raises(SystemExit):
        check_arguments(args, parser, 1)
    assert "--spectrum_target_nfe: give target_nfe or speedup, not both" in capsys.readouterr().err
