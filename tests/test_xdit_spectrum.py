"""Spectrum under xDiT's sequence parallelism (gloo, CPU processes) equals Spectrum in one process.

Each rank builds the tiny pipeline, computes the single-process Spectrum result itself (plain
diffusers transformer), then rebuilds the transformer as xDiT's wrapper, applies Spectrum again
and reruns the same generation sharded. Under sequence parallelism each rank's hooks see only
its shard of the tokens, so the forecaster state is the shard's: the per-rank bytes must be the
single-process bytes divided by the sequence-parallel degree.

With a token count not divisible by the degree, xDiT's wrappers pad the sequence (with the
fixes of ``spectrum_xdit.parallel.patches.padding``): every rank forecasts a padded shard, so the
per-rank bytes are those of (tokens + padding) / degree tokens.
"""

import numpy as np
import pytest
import torch

from spectrum_xdit.parallel.testing import DistributedError, DistributedTimeout, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS = 20
LAYOUTS = {"ulysses2": (2, 1), "ring2": (1, 2), "usp2x2": (2, 2)}

# Generation sizes: 8 (Wan) and 16 (Flux) tokens split evenly; 15 tokens each take the padding
# path (1 x 3 x 5 latent patches for Wan, 3 x 5 packed latents for Flux).
EVEN_SIZES = {"wan": dict(height=32, width=32, num_frames=5), "flux": dict(height=16, width=16)}
UNEVEN_SIZES = {"wan": dict(height=48, width=80, num_frames=1), "flux": dict(height=12, width=20)}
UNEVEN_TOKENS = 15
UNEVEN_STEPS = 10  # 7 real steps, 3 forecasts per branch


def _spectrum_sharded_vs_single(kind: str, ulysses: int, ring: int) -> dict:
    from spectrum_xdit.parallel import patches

    patches.install()
    from spectrum_xdit.parallel.xdit_setup import setup_xdit_parallel

    engine_config = setup_xdit_parallel(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=1)
    return _compare_with_single_process(engine_config, kind, EVEN_SIZES[kind], STEPS)


def _spectrum_uneven_sharded_vs_single(ulysses: int, ring: int) -> dict:
    """Both models, one launch: a token count not divisible by the degree."""
    from spectrum_xdit.parallel import patches

    patches.install()
    from spectrum_xdit.parallel.xdit_setup import setup_xdit_parallel

    engine_config = setup_xdit_parallel(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=1)
    return {kind: _compare_with_single_process(engine_config, kind, UNEVEN_SIZES[kind], UNEVEN_STEPS)
            for kind in ("wan", "flux")}


def _compare_with_single_process(engine_config, kind: str, size: dict, steps: int, config_kwargs=None) -> dict:
    import torch.distributed as dist

    from spectrum_xdit import SpectrumConfig, apply_spectrum, spectrum_stats
    from spectrum_xdit.hooks import spectrum_state
    from spectrum_xdit.models.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline
    from spectrum_xdit.parallel.xdit_setup import (
        init_xdit_runtime,
        set_flux_input_parameters,
        xdit_transformer,
    )

    config = SpectrumConfig(num_inference_steps=steps, **(config_kwargs or {}))
    if kind == "wan":
        pipe = build_tiny_wan_pipeline(seed=0)
        call = dict(size, guidance_scale=4.0, negative_prompt="dull")
        field = "frames"
    else:
        pipe = build_tiny_flux_pipeline(seed=0)
        call = dict(size, max_sequence_length=16, true_cfg_scale=4.0, negative_prompt="dull")
        field = "images"
    pipe.set_progress_bar_config(disable=True)
    call.update(prompt="a red square", num_inference_steps=steps, output_type="latent")

    plain = pipe.transformer
    apply_spectrum(plain, config)
    spectrum_state(plain).controller.reducer = lambda sums: sums  # one process: nothing to reduce
    single = getattr(pipe(generator=torch.Generator().manual_seed(0), **call), field)
    single_stats = spectrum_stats(plain)

    pipe.transformer = xdit_transformer(plain)
    apply_spectrum(pipe.transformer, config)
    controller = spectrum_state(pipe.transformer).controller
    local_sums = []  # this rank's validation sums before the job-wide reduction
    observe = controller.observe

    def recording_observe(step, gap, sums):
        local_sums.append((step, sums.tolist()))
        observe(step, gap, sums)

    controller.observe = recording_observe
    init_xdit_runtime(pipe, engine_config)
    if kind == "flux":
        set_flux_input_parameters(call["max_sequence_length"])
    sharded = getattr(pipe(generator=torch.Generator().manual_seed(0), **call), field)
    sharded_stats = spectrum_stats(pipe.transformer)

    bytes_per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(bytes_per_rank, {b: s["state_bytes"] for b, s in sharded_stats.items()})
    stats_per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(stats_per_rank, (sharded_stats, local_sums))
    return {
        "error": ((sharded - single).norm() / single.norm()).item(),
        "single_stats": single_stats,
        "sharded_stats": sharded_stats,
        "bytes_per_rank": bytes_per_rank,
        "stats_per_rank": stats_per_rank,
    }


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["wan", "flux"])
def test_spectrum_sharded_equals_single_process(kind, layout):
    ulysses, ring = LAYOUTS[layout]
    degree = ulysses * ring
    result = run_distributed(_spectrum_sharded_vs_single, world_size=degree, args=(kind, ulysses, ring),
                             timeout=240.0)
    print(f"{kind} {layout}: relative error {result['error']:.2e}, per-rank bytes {result['bytes_per_rank']}")
    assert result["error"] <= 1e-5, f"{kind} {layout}: relative error {result['error']:.2e}"
    single, sharded = result["single_stats"], result["sharded_stats"]
    assert set(single) == set(sharded) == {"cond", "uncond"}
    for branch in single:
        assert sharded[branch]["real_steps"] == single[branch]["real_steps"]
        assert single[branch]["forecasts"] > 0
        for rank_bytes in result["bytes_per_rank"]:
            assert rank_bytes[branch] * degree == single[branch]["state_bytes"], (branch, rank_bytes)


_uneven_results: dict = {}


@pytest.mark.parametrize("kind", ["wan", "flux"])
@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
def test_spectrum_on_the_padding_path_equals_single_process(layout, kind):
    """15 tokens on 2 ranks: each rank forecasts 8 (one is padding); the output is exact."""
    ulysses, ring = LAYOUTS[layout]
    degree = ulysses * ring
    if layout not in _uneven_results:  # one launch per layout; a failed one is not retried
        try:
            _uneven_results[layout] = run_distributed(
                _spectrum_uneven_sharded_vs_single, world_size=degree, args=(ulysses, ring), timeout=240.0
            )
        except (DistributedError, DistributedTimeout) as error:
            _uneven_results[layout] = error
    if isinstance(_uneven_results[layout], Exception):
        raise _uneven_results[layout]
    result = _uneven_results[layout][kind]
    print(f"{kind} {layout} uneven: relative error {result['error']:.2e}, per-rank bytes {result['bytes_per_rank']}")
    assert result["error"] <= 1e-5, f"{kind} {layout}: relative error {result['error']:.2e}"
    single, sharded = result["single_stats"], result["sharded_stats"]
    assert set(single) == set(sharded) == {"cond", "uncond"}
    shard_tokens = -(-UNEVEN_TOKENS // degree)
    for branch in single:
        assert sharded[branch]["real_steps"] == single[branch]["real_steps"]
        assert single[branch]["forecasts"] > 0
        for rank_bytes in result["bytes_per_rank"]:
            assert rank_bytes[branch] * UNEVEN_TOKENS == single[branch]["state_bytes"] * shard_tokens, (
                branch, rank_bytes)


def _divergent_schedule(rank_flex_windows) -> None:
    from spectrum_xdit.parallel import patches

    patches.install()
    import torch.distributed as dist

    from spectrum_xdit import SpectrumConfig, apply_spectrum
    from spectrum_xdit.models.tiny import build_tiny_wan_pipeline
    from spectrum_xdit.parallel.consistency import enable_schedule_check
    from spectrum_xdit.parallel.xdit_setup import init_xdit_runtime, setup_xdit_parallel, xdit_transformer

    engine_config = setup_xdit_parallel(ulysses_degree=2, ring_degree=1, cfg_degree=1)
    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = xdit_transformer(pipe.transformer)
    config = SpectrumConfig(num_inference_steps=STEPS, flex_window=rank_flex_windows[dist.get_rank()])
    apply_spectrum(pipe.transformer, config)
    enable_schedule_check(pipe.transformer)
    init_xdit_runtime(pipe, engine_config)
    pipe(prompt="a red square", num_inference_steps=STEPS, height=32, width=32, num_frames=5,
         guidance_scale=4.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    return "finished"


def test_divergent_schedule_fails_clearly_instead_of_hanging():
    with pytest.raises(DistributedError, match="Spectrum schedules differ across ranks"):
        run_distributed(_divergent_schedule, world_size=2, args=([0.75, 3.0],), timeout=120.0)


def test_identical_schedules_pass_the_check():
    assert run_distributed(_divergent_schedule, world_size=2, args=([0.75, 0.75],), timeout=120.0) == "finished"


ADAPTIVE = dict(warmup_steps=3, schedule="adaptive", blend_weight="auto", error_budget=0.3, max_gap=4)


def _adaptive_sharded_vs_single(ulysses: int, ring: int) -> dict:
    from spectrum_xdit.parallel import patches

    patches.install()
    from spectrum_xdit.parallel.xdit_setup import setup_xdit_parallel

    engine_config = setup_xdit_parallel(ulysses_degree=ulysses, ring_degree=ring, cfg_degree=1)
    return _compare_with_single_process(engine_config, "wan", EVEN_SIZES["wan"], STEPS, ADAPTIVE)


@pytest.mark.parametrize("layout", ["ulysses2", "ring2"])
def test_adaptive_spectrum_decides_alike_on_every_rank(layout):
    """Error-controlled Spectrum (adaptive schedule, auto blend) sharded: the ranks' local
    validation sums differ, the job-wide decisions don't, and the output equals one process."""
    ulysses, ring = LAYOUTS[layout]
    result = run_distributed(_adaptive_sharded_vs_single, world_size=ulysses * ring, args=(ulysses, ring),
                             timeout=240.0)
    single = result["single_stats"]
    print(f"adaptive {layout}: relative error {result['error']:.2e}, real steps {single['cond']['real_steps']}")
    assert result["error"] <= 1e-5, f"adaptive {layout}: relative error {result['error']:.2e}"
    (stats0, local0), (stats1, local1) = result["stats_per_rank"]
    # each rank scored its own shard: the local sums differ, at the same steps
    assert [step for step, _ in local0] == [step for step, _ in local1] and local0
    assert all(a != b for (_, a), (_, b) in zip(local0, local1))
    for branch in ("cond", "uncond"):
        # the controller did skip steps, and away from the paper rule
        assert 0 < single[branch]["forecasts"] and single[branch]["real_steps"][:3] == [0, 1, 2]
        for stats in (stats0, stats1):
            assert stats[branch]["real_steps"] == single[branch]["real_steps"]
            # a weight per predictor of each forecast (three with the budget's reuse default)
            np.testing.assert_allclose(np.array(stats[branch]["blend_weights"], dtype=float),
                                       np.array(single[branch]["blend_weights"], dtype=float), atol=1e-6)
            assert [e["step"] for e in stats[branch]["validation"]] == [e["step"] for e in single[branch]["validation"]]
        # the job-wide scores are the single process's, up to float summation order
        for sharded_entry, single_entry in zip(stats0[branch]["validation"], single[branch]["validation"]):
            assert sharded_entry["blend"] == pytest.approx(single_entry["blend"], rel=1e-4)
    assert stats0["cond"]["plan"] == stats1["cond"]["plan"]


BUDGET = dict(warmup_steps=3, target_nfe=8, blend_weight="auto")


def _budget_sharded_vs_single() -> dict:
    from spectrum_xdit.parallel import patches

    patches.install()
    from spectrum_xdit.parallel.xdit_setup import setup_xdit_parallel

    engine_config = setup_xdit_parallel(ulysses_degree=2, ring_degree=1, cfg_degree=1)
    return _compare_with_single_process(engine_config, "wan", EVEN_SIZES["wan"], STEPS, BUDGET)


def test_budget_schedule_holds_and_decides_alike_under_ulysses2():
    """target_nfe sharded: both ranks choose the single process's real steps, exactly the budget."""
    result = run_distributed(_budget_sharded_vs_single, world_size=2, timeout=240.0)
    single = result["single_stats"]
    print(f"budget ulysses2: relative error {result['error']:.2e}, real steps {single['cond']['real_steps']}")
    assert result["error"] <= 1e-5, f"budget ulysses2: relative error {result['error']:.2e}"
    (stats0, local0), (stats1, local1) = result["stats_per_rank"]
    assert local0 and all(a != b for (_, a), (_, b) in zip(local0, local1))   # each rank scored its shard
    for branch in ("cond", "uncond"):
        assert single[branch]["nfe"] == BUDGET["target_nfe"] and single[branch]["real_steps"][-1] == STEPS - 1
        for stats in (stats0, stats1):
            assert stats[branch]["real_steps"] == single[branch]["real_steps"]
            # a weight per predictor of each forecast (three with the budget's reuse default)
            np.testing.assert_allclose(np.array(stats[branch]["blend_weights"], dtype=float),
                                       np.array(single[branch]["blend_weights"], dtype=float), atol=1e-6)
    assert stats0["cond"]["plan"] == stats1["cond"]["plan"]
