"""Step-level batching (`launch/step_batching.py`): every request of a step batch, joined at any
tick, equals its solo run through its pipeline's own loop (Wan2.1, FLUX.1, Wan2.2's two experts);
only real rows reach the blocks, one call per expert, latent shape and decision; a forecast tick
reads nothing back from the device; the ranks of a sequence-parallel group agree on every tick
through one small collective, or fail alike. The matrix of layouts and schedules: test_matrix.py."""

import pytest
import torch
import torch.distributed as dist

from host_reads import HostReads
from serving import image_base64
from step_loop import compare_with_solo, run_step_loop
from spectrum_xdit import paper_schedule
from spectrum_xdit.launch import step_batching
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.launch.step_batching import StepBatcher
from spectrum_xdit.models import TWO_EXPERTS, ModelSpec, SizeRules, resolve_model
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
# FLUX.1 (tiny-flux, guidance-distilled): distilled guidance at two scales, true CFG (two rows), no
# cache, another size with the budget schedule, another step count, and the n = 3 images of one
# request (consecutive seeds, one tick).
FLUX_REQUESTS = [
    (0, {"prompt": "a red square", "seed": 1}),
    (0, {"prompt": "a blue circle", "seed": 2, "guidance_scale": 2.0, "true_cfg_scale": 4.0,
         "cache": {"schedule": "adaptive", "blend_weight": "auto", "error_budget": 0.3, "warmup_steps": 3}}),
    (1, {"prompt": "no cache", "seed": 3, "cache": {"method": "none"}}),
    (2, {"prompt": "a wide one", "seed": 4, "width": 32, "cache": {"target_nfe": 6, "blend_weight": "auto"}}),
    (3, {"prompt": "fewer steps", "seed": 5, "num_inference_steps": 9, "true_cfg_scale": 2.0}),
    *((4, {"prompt": "three of them", "seed": seed}) for seed in (7, 8, 9)),
]
# Wan2.2 (tiny-wan22, 20 steps: steps 0-10 on the high-noise expert, 11-19 on the low-noise one):
# jobs switch experts at different ticks, so ticks hold rows of both.
WAN22_STEPS = 20
WAN22_REQUESTS = [
    (0, {"prompt": "a red fox", "seed": 1}),
    (0, {"prompt": "no cache", "seed": 2, "cache": {"method": "none"}}),
    (3, {"prompt": "adaptive", "seed": 3, "cache": {"schedule": "adaptive", "blend_weight": "auto",
                                                       "error_budget": 0.3, "warmup_steps": 3, "max_gap": 4}}),
    (5, {"prompt": "a budget", "seed": 4, "num_inference_steps": 14, "cache": {"target_nfe": 10}}),
    (6, {"prompt": "wider", "seed": 5, "width": 64, "guidance_scale": 3.0}),
]
TOLERANCE = 1e-5
# tiny-wan22's low-noise expert adds 10 to every feature (spread 0.6) and its output norm removes
# it again, so float noise on the features is ~16x larger against the output than on tiny-wan: a
# row batched with others (a GEMM of more rows, rounded otherwise; each row alone in its call is
# 0.0 off) ends up to 2.5e-5 off where forecasts extrapolate it.
WAN22_TOLERANCE = 5e-5


def _requests(spec, bodies, **defaults):
    defaults = {**model_defaults(spec), **defaults}
    return [(tick, parse_request(body, defaults)) for tick, body in bodies]


def _wan_requests(spec):
    return _requests(spec, REQUESTS, num_inference_steps=STEPS, height=32, width=32, num_frames=5)


def _rank_pipeline(model: str, **layout):
    rank_pipeline = init_rank(resolve_model(model), ParallelLayout(**layout))
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    return rank_pipeline


@pytest.fixture(scope="module")
def tiny_wan():
    return _rank_pipeline("tiny-wan")


def _assert_equal_to_solo(outcome: dict, count: int, tolerance: float = TOLERANCE) -> None:
    assert sorted(outcome["errors"]) == list(range(count))
    for index, error in outcome["errors"].items():
        assert error <= tolerance, (index, error)
        got, expected = outcome["real_steps"][index]
        assert got == expected, index


class CallRecorder:
    """Every transformer call of the step loop, per tick: (expert, latent shape, whether its blocks
    run, rows). Its ``on_tick`` goes to the loop."""

    def __init__(self, rank_pipeline):
        from spectrum_xdit.experts import pipeline_experts

        self.ticks: list[list] = []
        self._batcher = None
        for name, expert in pipeline_experts(rank_pipeline.pipe).items():
            expert.register_forward_pre_hook(lambda module, args, kwargs, name=name: self._record(name, kwargs),
                                             with_kwargs=True)

    def _record(self, expert: str, kwargs: dict) -> None:
        if self._batcher is None:   # a solo run
            return
        hidden = kwargs["hidden_states"]
        self.ticks[-1].append((expert, tuple(hidden.shape[1:]), self._batcher.policy.run_blocks, hidden.shape[0]))

    def on_tick(self, tick: int, batcher) -> None:
        self._batcher = batcher
        self.ticks.append([])


def test_every_request_of_a_step_batch_equals_its_solo_run(tiny_wan):
    outcome = compare_with_solo(tiny_wan, _wan_requests(tiny_wan.spec))
    print(f"\none process: worst relative error {max(outcome['errors'].values()):.1e}")
    _assert_equal_to_solo(outcome, len(REQUESTS))
    nfe = {index: report["nfe"] for index, (report, _) in outcome["reports"].items()}
    assert nfe[1] == {"cond": STEPS, "uncond": STEPS}                 # none: every step real
    assert nfe[0]["cond"] < STEPS and nfe[3] == {"cond": nfe[3]["cond"]} and nfe[3]["cond"] < STEPS
    assert nfe[2]["cond"] < STEPS                                      # the adaptive schedule skipped some
    # a request's rows through the blocks are its real steps, one per guidance branch
    assert all(report["block_stack_rows"] == sum(nfe[i].values()) for i, (report, _) in outcome["reports"].items())


def test_only_the_real_rows_reach_the_blocks(tiny_wan):
    requests = _wan_requests(tiny_wan.spec)
    first_block = tiny_wan.pipe.transformer.blocks[0]
    seen = []
    handle = first_block.attn1.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        results, rows = run_step_loop(tiny_wan, requests)
    finally:
        handle.remove()
    assert sum(seen) == sum(rows) == sum(sum(r.report["nfe"].values()) for r in results.values())
    # forecast steps happened, and then fewer rows than active branches ran the blocks
    branches = sum(len(r.report["nfe"]) * r.report["num_inference_steps"] for r in results.values())
    assert sum(rows) < branches


def test_a_dropped_request_leaves_the_others_unchanged(tiny_wan):
    outcome = compare_with_solo(tiny_wan, _wan_requests(tiny_wan.spec), drop=(5, 0))
    assert 0 not in outcome["errors"] and len(outcome["errors"]) == len(REQUESTS) - 1
    assert max(outcome["errors"].values()) <= TOLERANCE, outcome["errors"]


def test_flux_requests_share_ticks_one_call_per_shape_and_each_equals_its_solo_run():
    rank_pipeline = _rank_pipeline("tiny-flux")
    requests = _requests(rank_pipeline.spec, FLUX_REQUESTS, num_inference_steps=12, height=16, width=16)
    recorder = CallRecorder(rank_pipeline)
    outcome = compare_with_solo(rank_pipeline, requests, on_tick=recorder.on_tick)
    print(f"\nFLUX.1: worst relative error {max(outcome['errors'].values()):.1e}")
    _assert_equal_to_solo(outcome, len(FLUX_REQUESTS))
    assert outcome["reports"][1][0]["nfe"]["uncond"] < 12               # true CFG: a forecast second row
    for tick, made in enumerate(recorder.ticks):     # one call per latent shape and decision at every tick
        keys = [(shape, real) for _, shape, real, _ in made]
        assert len(keys) == len(set(keys)), (tick, made)
    # the three images of one request: three rows of the same calls, from their first tick on
    shape = tuple(outcome["solo"][5].latents.shape[1:])
    tick_four = [rows for _, called, real, rows in recorder.ticks[4] if called == shape and real]
    assert tick_four and tick_four[0] >= 3, recorder.ticks[4]


def test_wan22_experts_in_the_step_loop_equal_their_solo_runs():
    rank_pipeline = _rank_pipeline("tiny-wan22")
    requests = _requests(rank_pipeline.spec, WAN22_REQUESTS, num_inference_steps=WAN22_STEPS)
    recorder = CallRecorder(rank_pipeline)
    outcome = compare_with_solo(rank_pipeline, requests, on_tick=recorder.on_tick)
    print(f"\nWan2.2: worst relative error {max(outcome['errors'].values()):.1e}")
    _assert_equal_to_solo(outcome, len(WAN22_REQUESTS), WAN22_TOLERANCE)
    for index, (report, expected) in outcome["reports"].items():   # per expert: steps, real steps, memory
        assert report["experts"] == expected["experts"], index
        assert report["state_bytes_per_rank"] == expected["state_bytes_per_rank"], index
    assert outcome["reports"][3][0]["nfe"]["cond"] <= 10                # the budget, over both experts
    both = 0
    for tick, made in enumerate(recorder.ticks):
        keys = [(expert, shape, real) for expert, shape, real, _ in made]
        assert len(keys) == len(set(keys)), (tick, made)   # one call per expert, shape and decision
        both += len({expert for expert, *_ in made}) == 2
    assert both, "no tick held rows of both experts"
    # rows of different jobs on the same expert and decision shared a call
    assert max(rows for made in recorder.ticks for *_, rows in made) > 2


def _tiny_wan22_i2v(torch_dtype=None):
    """Wan2.2 I2V A14B's kind at toy size: ``WanImageToVideoPipeline`` with two experts and
    ``boundary_ratio``, the first frame as VAE condition channels and no CLIP image encoder."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from spectrum_xdit.models.tiny import TEXT_DIM, WAN22_BOUNDARY_RATIO, build_tiny_wan_pipeline

    def expert(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                     in_channels=12, out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32).eval()

    base = build_tiny_wan_pipeline()
    return WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                   scheduler=base.scheduler, transformer=expert(0), transformer_2=expert(1),
                                   image_encoder=None, image_processor=None, boundary_ratio=WAN22_BOUNDARY_RATIO)


def test_wan22_image_to_video_in_the_step_loop_equals_its_solo_runs():
    spec = ModelSpec("tiny-wan22-i2v", "wan", 2, 32, 32, 5, _tiny_wan22_i2v, SizeRules("wan", 16, 4, 1, 32),
                     needs_image=True, experts=TWO_EXPERTS)
    rank_pipeline = init_rank(spec, ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    requests = _requests(spec, [(0, {"prompt": "a", "seed": 1}),
                                (2, {"prompt": "b", "seed": 2, "image": image_base64(1), "guidance_scale": 3.0})],
                         num_inference_steps=12, image=image_base64(0))
    outcome = compare_with_solo(rank_pipeline, requests)
    _assert_equal_to_solo(outcome, 2, WAN22_TOLERANCE)
    assert all(set(report["experts"]) == set(TWO_EXPERTS) for report, _ in outcome["reports"].values())


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-flux"])
def test_a_forecast_tick_reads_nothing_back_from_the_device(model, tiny_wan):
    """Counted on CPU (``HostReads``: every read of a tensor's values, data-dependent shape or upload
    of host data, by any code past torch's, diffusers' and xDiT's included): the ticks at which every
    row is a forecast (two requests with the paper schedule, in step) make none, so on a GPU the
    host queues a forecast tick's work without waiting for the device."""
    rank_pipeline = tiny_wan if model == "tiny-wan" else _rank_pipeline(model)
    spec = rank_pipeline.spec
    bodies = [(0, {"prompt": "one", "seed": 1}), (0, {"prompt": "two", "seed": 2, "true_cfg_scale": 2.0})]
    if spec.family == "wan":
        bodies[1][1].pop("true_cfg_scale")
    requests = _requests(spec, bodies, num_inference_steps=12, height=16 if spec.family == "flux" else 32,
                         width=16 if spec.family == "flux" else 32)
    real = set(paper_schedule(12, 5, 2, 0.75))
    batcher = StepBatcher(rank_pipeline)
    reads = HostReads(everywhere=True)
    try:
        for index, (_, request) in enumerate(requests):
            batcher.join(str(index), request)
        with reads:
            while batcher.active:
                assert batcher.agree(True)
                batcher.tick()
                reads.next_step()
    finally:
        batcher.close()
    forecast_ticks = sorted(set(range(12)) - real)
    assert forecast_ticks and 11 in real
    assert {step: reads.by_step.get(step, []) for step in forecast_ticks} == {step: [] for step in forecast_ticks}


class _CountingDist:
    """torch.distributed as the step loop sees it, counting its collectives by name."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(dist, name)
        if name in ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list"):
            def counted(*args, **kwargs):
                self.calls.append(name)
                return attribute(*args, **kwargs)
            return counted
        return attribute


def _ulysses_batch() -> dict:
    rank_pipeline = _rank_pipeline("tiny-wan", ulysses_degree=2)
    counting = _CountingDist()
    step_batching.dist = counting
    try:
        outcome = compare_with_solo(rank_pipeline, _wan_requests(rank_pipeline.spec))
    finally:
        step_batching.dist = dist
    outcome["collectives"] = counting.calls
    outcome.pop("solo")
    return outcome


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_step_batches_under_ulysses_2_equal_solo_runs_with_one_collective_per_tick():
    outcome = run_distributed(_ulysses_batch, 2, timeout=280)
    print(f"\nUlysses=2: worst relative error {max(outcome['errors'].values()):.1e}")
    _assert_equal_to_solo(outcome, len(REQUESTS))
    assert outcome["collectives"] == ["all_reduce"] * len(outcome["rows"]), outcome["collectives"]


def _divergent_joins():
    rank_pipeline = init_rank(resolve_model("tiny-wan"), ParallelLayout(ulysses_degree=2))
    request = _wan_requests(rank_pipeline.spec)[0][1]
    batcher = StepBatcher(rank_pipeline)
    batcher.join("job-a" if dist.get_rank() == 0 else "job-b", request)
    batcher.agree(True)


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_ranks_that_disagree_about_a_tick_fail_alike_instead_of_hanging():
    with pytest.raises(DistributedError, match="step batches differ across ranks"):
        run_distributed(_divergent_joins, 2, timeout=180)
