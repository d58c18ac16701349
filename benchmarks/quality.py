"""Quality against speed: Spectrum and the baselines on the trained digits models.

    python -m benchmarks.quality                 # digits-wan, 40 (prompt, seed) pairs, ~10 min on 2 cores
    python -m benchmarks.quality --quick         # 2 pairs, every method at NFE 14, < 60 s
    python -m benchmarks.quality --json benchmarks/results/quality_cpu.json
    python -m benchmarks.quality --model digits-flux   # -> benchmarks/results/quality_digits-flux_cpu.json

``--model``: ``digits-wan`` (Wan2.1 architecture, 9-frame clips; 50 UniPC steps, guidance_scale
5.0) or ``digits-flux`` (FLUX.1 architecture, still images; 50 FLUX Euler steps, true CFG at
``digits_flux.TRUE_CFG_SCALE`` with the empty negative prompt). Every method samples the same clips
(images) as the reference, full compute, and is scored against it at budgets of block NFE per
guidance branch (``--budgets``, default 14, 10 and 7 of 50: 3.5x, 5x and 7x):

- ``plain``: the sampler itself with that many steps (its schedule changes, so its output is a
  different sample of the model, compared like the others against the 50-step one);
- ``reuse``: FORA-style reuse of the last computed block-stack output, at exactly Spectrum's
  real steps (Spectrum's hooks with the forecast replaced by the latest real feature);
- ``spectrum``: the paper's schedule, flex_window 0.75 (warm-up and window set to land on the
  budget), blend weight 0.5 (the reference recipe) and 1.0 (the paper's pure Chebyshev forecast);
- ``spectrum-auto``: that schedule with ``blend_weight="auto"`` (the weight that minimises the
  online validation error, ``spectrum_xdit.control``); ``spectrum-auto-reuse`` adds ``reuse=True``
  (the last real feature as a third validated predictor, the least-error affine combination);
- ``spectrum-budget``: ``target_nfe`` = the budget with the auto blend (exactly that many real
  steps, placed by validated error; nothing to tune), and ``spectrum-budget-reuse`` the same with
  ``reuse=True``;
- ``spectrum-default``: ``target_nfe`` alone, the budget defaults on the step grid they choose
  (below ``config.PLAIN_GRID_BELOW`` the plain sampler of that many steps);
- ``cache-dit`` (optional, the ``benchmarks`` extra): cache-dit's DBCache F1B0 with its TaylorSeer
  calibrator, the threshold bisected on held-out seeds to the budget's block NFE (dropped below its
  floor ``1 + 49/L``), and ``cache-dit-steps`` matched to the budget's fully computed steps instead;
- ``spectrum-adaptive``: the error-controlled schedule with the auto blend, its ``error_budget``
  bisected on held-out seeds to land near the budget (the real steps it chose per clip are in
  the JSON);
- ``taylorseer``: diffusers' ``TaylorSeerCacheConfig`` on every block's output (order 1 and 2;
  FLUX.1: the double- and the single-stream blocks),
  interval and warm-up chosen to give the budget exactly;
- ``fbcache`` and ``magcache``: diffusers' ``FirstBlockCacheConfig`` and ``MagCacheConfig``
  (ratios calibrated on this model; MagCache's longest run of skips ``K`` set per budget so that
  the budget is reachable at all), their thresholds bisected on held-out seeds to land near the
  budget's block NFE; the block NFE they actually used on the benchmark seeds is what the table
  reports. A budget below FirstBlockCache's floor (below) gets a row saying it was dropped.

NFE and block NFE are counted, not inferred, with forward pre-hooks on every block's feed-forward
(FLUX.1: ``ff`` of the double-stream blocks, ``proj_mlp`` of the single-stream ones), divided by
the two guidance branches. ``nfe`` counts evaluations of the last block: whole-stack
evaluations. ``block_nfe`` counts every block evaluation divided by the number of blocks ``L``,
so a step that runs only the first block costs ``1/L`` of a stack evaluation: that is what
FirstBlockCache spends on a skipped step to decide that it is one (MagCache decides from
calibrated ratios and runs nothing, the Spectrum and TaylorSeer hooks pass the input through).
Budgets are matched in block NFE, the compute actually spent. FirstBlockCache costs at least
``1 + 49/L`` (the first step full, the first block on every other): on digits-wan's 4 blocks 13.25,
so it cannot reach block NFE 10 or 7; on digits-flux's 6 (2 double + 4 single) 9.17, so not 7.

Metrics, per method: PSNR and SSIM of the decoded frames against the reference of the same seed
(mean over clips), the fraction of frames a held-out digit classifier recognises as the prompted
digit, NFE (mean, and ``nfe_max`` over clips), block NFE, ``speedup_nfe = 50 / nfe``, ``speedup_wall`` (median denoising wall time of the
reference over the method's; prompts are encoded beforehand and the methods interleaved per clip,
so machine noise hits all of them alike), and for the forecasting methods the time of one
forecast and one update of the state (``forecast_ms``, ``update_ms``) and, for the validating
methods, the extra time per real step of scoring it (``validation_ms``). The JSON holds each
method's real steps (``real_steps``, or ``real_steps_per_clip`` where the schedule adapts).

Writes the JSON (``--json``), and beside it a Markdown table (``.md``), a plot of PSNR and
accuracy against wall-clock speedup (``.png``) and a grid of frames per method (``_frames.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tqdm import tqdm

from benchmarks import digits_data as dd
from benchmarks.digits_classifier import load_classifier
from spectrum_xdit import SpectrumConfig, apply_spectrum, remove_spectrum, spectrum_stats
from spectrum_xdit.hooks import block_stack, spectrum_policy
from spectrum_xdit.models.digits_flux import TRUE_CFG_SCALE as FLUX_TRUE_CFG_SCALE

STEPS = 50
GUIDANCE = 5.0   # digits-wan's guidance_scale
DEFAULT_JSON = Path("benchmarks/results/quality_cpu.json")   # digits-wan's; other models' are named after them
PAIR_STRIDE = 11
CALIBRATION_SEED = 1000  # seeds >= this are held out from the benchmark pairs, for tuning only

# The paper's schedule at flex_window 0.75: (warmup_steps, window_size) that land on each budget.
FLEX = 0.75
SPECTRUM_SCHEDULES = {14: (5, 2), 10: (2, 3), 7: (1, 6)}
# The adaptive schedule's fixed settings; its error budget is bisected to land on each budget.
ADAPTIVE = dict(schedule="adaptive", warmup_steps=3, min_gap=1, max_gap=10)
# The budget schedule's warm-up: the adaptive one's, not tuned.
BUDGET_WARMUP = 3
# TaylorSeer computes at steps < before and at before + 1 + k * interval: (before, interval).
TAYLORSEER_SCHEDULES = {14: (2, 4), 10: (2, 6), 7: (2, 10)}
# MagCache never skips the first round(0.1 * 50) = 5 steps and at most K in a row after them, so
# it needs 5 + ceil(45 / (K + 1)) <= budget: the K per budget.
MAGCACHE_MAX_SKIP = {14: 6, 10: 12, 7: 44}
# cache-dit's DBCache: one compute block first (F1B0, the least it allows) and the shortest
# warm-up, so that it reaches the lowest block NFE it can: W + (50 - W) / L.
CACHE_DIT_FN = 1
CACHE_DIT_WARMUP = 1




@dataclass(frozen=True)
class BenchModel:
    """A model the benchmark runs: its classifier-free guidance, sampler and conditions, and the
    block names diffusers' TaylorSeer hooks (``cache_identifiers``)."""

    name: str
    family: str                   # "wan" (clips) or "flux" (still images)
    sampler: str
    guidance_field: str           # the pipeline argument of its classifier-free guidance
    guidance: float
    taylorseer_blocks: str

    @property
    def branches(self) -> int:
        """Transformer calls per step: two under classifier-free guidance."""
        return 2 if self.guidance > 1 else 1

    def conditions(self) -> list[tuple[int, str, str]]:
        """(digit, direction or position, prompt) for the 40 conditions."""
        return dd.all_prompts() if self.family == "wan" else dd.all_image_prompts()

    def default_json(self, quick: bool) -> Path:
        stem = "quality" if self.name == "digits-wan" else f"quality_{self.name}"
        return Path(f"outputs/{stem}_quick.json") if quick else DEFAULT_JSON.with_name(f"{stem}_cpu.json")


BENCH_MODELS = {
    "digits-wan": BenchModel("digits-wan", "wan", "UniPC", "guidance_scale", GUIDANCE, r"blocks\.\d+"),
    # FLUX.1 without guidance distillation: true CFG with the empty negative prompt, two calls a step
    "digits-flux": BenchModel("digits-flux", "flux", "FLUX Euler", "true_cfg_scale", FLUX_TRUE_CFG_SCALE,
                              r"(single_)?transformer_blocks\.\d+"),
}


# ----------------------------------------------------------------------------- metrics

def machine_description() -> str:
    """The machine a figure was taken on: architecture, torch threads, processor."""
    return f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or platform.platform()}"


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """PSNR (dB) of grey frames in [0, 1] against the reference of the same seed."""
    return float(peak_signal_noise_ratio(reference, frames, data_range=1.0))


def ssim(frames: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM over the frames ``(T, H, W)`` in [0, 1], each frame at Wang et al.'s (2004)
    settings: an 11 x 11 Gaussian window of sigma 1.5, the population covariance, K1 = 0.01 and
    K2 = 0.03."""
    return float(np.mean([
        structural_similarity(r, f, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for f, r in zip(frames, reference)]))


# The feed-forward of a block: Wan2.1's ``ffn``, FLUX.1's double-stream ``ff`` and single-stream
# ``proj_mlp``. It runs only when the block really computes (a cache's hook around the block skips it).
FEED_FORWARDS = ("ffn", "ff", "proj_mlp")


def feed_forward(block: torch.nn.Module) -> torch.nn.Module:
    name = next((n for n in FEED_FORWARDS if hasattr(block, n)), None)
    if name is None:
        raise TypeError(f"{type(block).__name__} has none of the feed-forwards {FEED_FORWARDS} to count")
    return getattr(block, name)


class StackCounter:
    """Counts real block evaluations through forward pre-hooks on each block's feed-forward.

    ``take()`` returns (whole-stack evaluations, block evaluations / number of blocks): the
    first counts the last block only; the second also charges the blocks that run on a skipped
    step (FirstBlockCache always runs the first block), in units of the whole stack. The blocks
    are those Spectrum hooks, in call order (FLUX.1: the double-stream, then the single-stream)."""

    def __init__(self, transformer):
        blocks, _ = block_stack(transformer)
        self.blocks = len(blocks)
        self.last = 0
        self.all = 0
        for index, block in enumerate(blocks):
            feed_forward(block).register_forward_pre_hook(self._count_last if index == self.blocks - 1 else self._count)

    def _count(self, module, args):
        self.all += 1

    def _count_last(self, module, args):
        self.all += 1
        self.last += 1

    def take(self) -> tuple[int, float]:
        counts = (self.last, self.all / self.blocks)
        self.last = self.all = 0
        return counts


def digit_accuracy(classifier, frames: np.ndarray, digit: int) -> float:
    """The fraction of the frames (grey, [0, 1]) the classifier recognises as ``digit``."""
    with torch.no_grad():
        pred = classifier(torch.from_numpy(frames * 2.0 - 1.0).float()).argmax(1).numpy()
    return float((pred == digit).mean())


def benchmark_pairs(count: int, conditions: list | None = None) -> list[tuple[tuple[int, str, str], int]]:
    """The scored ((digit, direction, prompt), seed) pairs: every condition (default digits-wan's)
    once (seed = its index), then again with new seeds; strided by 11 (prime to 40) so that fewer
    pairs still spread over digits and directions (positions)."""
    if count < 1:
        raise ValueError(f"--pairs must be >= 1, got {count}")
    conditions = conditions if conditions is not None else dd.all_prompts()
    return [(conditions[(PAIR_STRIDE * i) % len(conditions)], i) for i in range(count)]


def held_out_pairs(count: int, conditions: list | None = None) -> list[tuple[str, int]]:
    """(prompt, seed) pairs for tuning, seeds from ``CALIBRATION_SEED``: never scored."""
    conditions = conditions if conditions is not None else dd.all_prompts()
    return [(conditions[(7 * i + 3) % len(conditions)][2], CALIBRATION_SEED + i) for i in range(count)]


# ----------------------------------------------------------------------------- methods

@dataclass
class Method:
    """One sampler configuration: how to install it on the transformer and how to undo that."""

    method: str
    setting: str
    budget: int | None = None
    steps: int = STEPS
    timings: dict = field(default_factory=lambda: {"forecast": [], "update": [], "validation": []})
    tuned: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.setting}".strip()

    def attach(self, transformer) -> None:
        pass

    def detach(self, transformer) -> None:
        pass

    def info(self, transformer) -> dict:
        return dict(self.tuned)


class SpectrumMethod(Method):
    def __init__(self, method: str, setting: str, budget: int | None, config: SpectrumConfig,
                 tuned: dict | None = None):
        # the sampler runs the steps the schedule was made for
        super().__init__(method, setting, budget, steps=config.num_inference_steps, tuned=tuned or {})
        self.config = config

    def attach(self, transformer) -> None:
        apply_spectrum(transformer, self.config)
        policy = spectrum_policy(transformer)
        forecast, record = self._forecast_fn(policy), policy.record

        def timed_forecast():
            t0 = time.perf_counter()
            out = forecast()
            self.timings["forecast"].append(time.perf_counter() - t0)
            return out

        def timed_record(features):
            t0 = time.perf_counter()
            record(features)
            self.timings["update"].append(time.perf_counter() - t0)

        policy.forecast, policy.record = timed_forecast, timed_record

    def _forecast_fn(self, policy):
        return policy.forecast

    def detach(self, transformer) -> None:
        remove_spectrum(transformer)

    def info(self, transformer) -> dict:
        cond = spectrum_stats(transformer).get("cond")
        if cond is None:
            return dict(self.tuned)
        if cond.get("validation"):
            # per real step (both branches): the two validation forecasts, the sums, the all-reduce
            self.timings["validation"].append(cond["validation_seconds"] / len(cond["validation"]))
        return {**self.tuned, "real_steps": cond["real_steps"]}


class ReuseMethod(SpectrumMethod):
    """FORA-style: at a skipped step, the block stack's output of the latest real step."""

    def _forecast_fn(self, policy):
        # blend_weight 0 keeps the latest real feature; clone so the pipeline can't alias it
        return lambda: policy.row.forecaster.last_feature.clone()


class CacheDitMethod(Method):
    """cache-dit's DBCache on the pipeline: the first ``CACHE_DIT_FN`` blocks of every step always
    run, and the rest of the stack is skipped while their residual changes less than the
    threshold, its TaylorSeer calibrator (order 1) extrapolating the skipped residual."""

    def __init__(self, pipe, method: str, budget: int, threshold: float):
        super().__init__(method, f"DBCache F{CACHE_DIT_FN}B0 + TaylorSeer 1, threshold {threshold:.4g}, warmup "
                         f"{CACHE_DIT_WARMUP}", budget, tuned={"threshold": threshold})
        self.pipe = pipe
        self.threshold = threshold

    def attach(self, transformer) -> None:
        import cache_dit

        # both models run their guidance branches as two transformer calls a step: separate CFG
        cache_dit.enable_cache(self.pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=CACHE_DIT_FN, Bn_compute_blocks=0, residual_diff_threshold=self.threshold,
            max_warmup_steps=CACHE_DIT_WARMUP, num_inference_steps=self.steps, enable_separate_cfg=True),
            calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1))

    def detach(self, transformer) -> None:
        import cache_dit

        cache_dit.disable_cache(self.pipe)


def cache_dit_missing() -> str | None:
    """Why cache-dit cannot run here (not installed), or ``None``."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")   # it logs every enable and disable
    try:
        import cache_dit  # noqa: F401
    except ImportError as error:
        return f"cache-dit not installed (pip install -e '.[benchmarks]'): {error}"
    return None


class DiffusersCacheMethod(Method):
    def __init__(self, method: str, setting: str, budget: int | None, make_config, tuned: dict | None = None):
        super().__init__(method, setting, budget, tuned=tuned or {})
        self.make_config = make_config

    def attach(self, transformer) -> None:
        transformer.enable_cache(self.make_config())

    def detach(self, transformer) -> None:
        transformer.disable_cache()


# ----------------------------------------------------------------------------- sampling

class Bench:
    """One model's pipeline, its block counter and its prompts' embeddings (encoded once, outside
    the timed denoising)."""

    def __init__(self, threads: int, model: str = "digits-wan"):
        if model not in BENCH_MODELS:
            raise ValueError(f"--model must be one of {', '.join(BENCH_MODELS)}, got {model!r}")
        self.model = BENCH_MODELS[model]
        torch.set_num_threads(threads)
        if self.model.family == "wan":
            from spectrum_xdit.models.digits_wan import GENERATION_KWARGS, build_digits_wan_pipeline

            self.pipe = build_digits_wan_pipeline()
        else:
            from spectrum_xdit.models.digits_flux import GENERATION_KWARGS, build_digits_flux_pipeline

            self.pipe = build_digits_flux_pipeline()
        self.kwargs = GENERATION_KWARGS
        self.counter = StackCounter(self.pipe.transformer)
        self._embeds: dict[str, dict] = {}

    def embeds(self, prompt: str) -> dict:
        """The pipeline's embedding arguments for ``prompt`` and the empty negative prompt."""
        if prompt not in self._embeds:
            with torch.no_grad():
                if self.model.family == "wan":
                    positive, negative = self.pipe.encode_prompt(
                        prompt, negative_prompt="", do_classifier_free_guidance=True, device="cpu")
                    self._embeds[prompt] = {"prompt_embeds": positive, "negative_prompt_embeds": negative}
                else:
                    length = self.kwargs["max_sequence_length"]
                    positive, pooled, _ = self.pipe.encode_prompt(prompt, prompt_2=None, device="cpu",
                                                                  max_sequence_length=length)
                    negative, negative_pooled, _ = self.pipe.encode_prompt("", prompt_2=None, device="cpu",
                                                                           max_sequence_length=length)
                    self._embeds[prompt] = {"prompt_embeds": positive, "pooled_prompt_embeds": pooled,
                                            "negative_prompt_embeds": negative,
                                            "negative_pooled_prompt_embeds": negative_pooled}
        return self._embeds[prompt]

    def call(self, prompt: str, seed: int, steps: int, output_type: str):
        """The guided pipeline call; its output (``frames`` of a video, ``images`` of an image)."""
        return self.pipe(**self.embeds(prompt), num_inference_steps=steps,
                         **{self.model.guidance_field: self.model.guidance},
                         generator=torch.Generator().manual_seed(seed), output_type=output_type, **self.kwargs)

    def sample(self, method: Method, prompt: str, seed: int) -> tuple[np.ndarray, float, float, dict]:
        """Frames (T, H, W) grey in [0, 1] (an image: T = 1), denoising seconds, NFE per branch,
        method info (with ``block_nfe``: block evaluations per branch in units of the whole stack)."""
        self.embeds(prompt)
        transformer = self.pipe.transformer
        branches = self.model.branches
        method.attach(transformer)
        try:
            self.counter.take()
            t0 = time.perf_counter()
            output = self.call(prompt, seed, method.steps, "np")
            seconds = time.perf_counter() - t0
            frames = output.frames[0] if self.model.family == "wan" else output.images[:1]
            stacks, blocks = self.counter.take()
            nfe = stacks / branches
            info = {"block_nfe": blocks / branches, **method.info(transformer)}
        finally:
            method.detach(transformer)
        return frames.mean(axis=-1), seconds, nfe, info


def tune_threshold(bench: Bench, build, target: float, prompts: list[tuple[str, int]], lo: float, hi: float,
                   iterations: int, measure: str = "block_nfe") -> tuple[float, float]:
    """Bisect a threshold (block NFE falls as it grows) on held-out (prompt, seed) pairs.

    Returns the tried threshold whose mean ``measure`` (block NFE, or ``nfe``: whole-stack
    evaluations) is closest to ``target`` (ties: the higher)."""
    tried = []
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        method = build(mid)
        nfe = statistics.fmean(_measured(bench.sample(method, p, s), measure) for p, s in prompts)
        tried.append((abs(nfe - target), -nfe, mid, nfe))
        if nfe > target:
            lo = mid
        elif nfe < target:
            hi = mid
        else:
            break
    _, _, threshold, nfe = min(tried)
    return threshold, nfe


def _measured(sample: tuple, measure: str) -> float:
    _, _, nfe, info = sample
    return nfe if measure == "nfe" else info["block_nfe"]


def calibrate_magcache(bench: Bench, prompt: str, seed: int) -> list[float]:
    """MagCache's own calibration run (no skipping); diffusers prints the ratios per branch."""
    transformer = bench.pipe.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    buffer = io.StringIO()
    try:
        bench.embeds(prompt)
        with contextlib.redirect_stdout(buffer), torch.no_grad():
            bench.call(prompt, seed, STEPS, "latent")
    finally:
        transformer.disable_cache()
    ratios = [ast.literal_eval(line) for line in buffer.getvalue().splitlines() 
              if line.startswith("[") and not line.startswith("[MagCache")]
    if not ratios or any(len(r) != STEPS for r in ratios):
        raise RuntimeError(f"MagCache calibration printed no usable ratios: {buffer.getvalue()[:500]!r}")
    return np.mean(np.asarray(ratios, dtype=np.float64), axis=0).tolist()


def build_methods(bench: Bench, budgets: list[int], calibration: list[tuple[str, int]], iterations: int,
                  log, only: set[str] | None = None) -> tuple[list[Method], list[dict]]:
    """The methods to run, and a row for each baseline that cannot reach a budget at all; ``only``:
    these families (and always ``full`` and ``plain``), the others not even tuned."""
    def want(family: str) -> bool:
        return only is None or family in only or family in ("full", "plain")

    methods: list[Method] = [Method("full", f"{STEPS} steps")]
    dropped: list[dict] = []
    magcache_ratios = None
    fbcache_floor = 1 + (STEPS - 1) / bench.counter.blocks
    for budget in budgets:
        methods.append(Method("plain", f"{budget} steps", budget, steps=budget))
        warmup, window = SPECTRUM_SCHEDULES[budget]
        base = dict(num_inference_steps=STEPS, warmup_steps=warmup, window_size=window, flex_window=FLEX)
        schedule = f"flex {FLEX}, warmup {warmup}, window {window}"
        methods.append(ReuseMethod("reuse", schedule, budget, SpectrumConfig(**base, blend_weight=0.0)))
        for blend in (0.5, 1.0):
            methods.append(SpectrumMethod("spectrum", f"{schedule}, blend {blend}", budget,
                                          SpectrumConfig(**base, blend_weight=blend)))
        methods.append(SpectrumMethod("spectrum-auto", f"{schedule}, blend auto", budget,
                                      SpectrumConfig(**base, blend_weight="auto")))
        methods.append(SpectrumMethod("spectrum-auto-reuse", f"{schedule}, blend auto + reuse", budget,
                                      SpectrumConfig(**base, blend_weight="auto", reuse=True)))
        for reuse in (False, True):
            methods.append(SpectrumMethod(
                "spectrum-budget-reuse" if reuse else "spectrum-budget",
                f"target_nfe {budget}, warmup {BUDGET_WARMUP}, blend auto{' + reuse' if reuse else ''}", budget,
                SpectrumConfig(num_inference_steps=STEPS, target_nfe=budget, warmup_steps=BUDGET_WARMUP,
                               blend_weight="auto", reuse=reuse)))
        methods.append(default_method(budget))

        def adaptive(error_budget):
            config = SpectrumConfig(num_inference_steps=STEPS, blend_weight="auto", error_budget=error_budget,
                                    **ADAPTIVE)
            return SpectrumMethod("spectrum-adaptive", f"budget {error_budget:.4g}, warmup {config.warmup_steps}, "
                                  f"gaps {config.min_gap}-{config.max_gap}, blend auto", budget, config,
                                  {"error_budget": error_budget})
        if want("spectrum-adaptive"):
            error_budget, nfe = tune_threshold(bench, adaptive, budget, calibration, 0.005, 2.0, iterations)
            log(f"spectrum-adaptive: error budget {error_budget:.4g} gives NFE {nfe:.1f} on the held-out seeds "
                f"(target {budget})")
            methods.append(adaptive(error_budget))
        before, interval = TAYLORSEER_SCHEDULES[budget]
        for order in (1, 2):
            def taylorseer(before=before, interval=interval, order=order):
                return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=before,
                                             max_order=order, taylor_factors_dtype=torch.float32,
                                             cache_identifiers=[bench.model.taylorseer_blocks])
            methods.append(DiffusersCacheMethod("taylorseer", f"order {order}, interval {interval}, warmup {before}",
                                                budget, taylorseer))

        def fbcache(threshold):
            return DiffusersCacheMethod("fbcache", f"threshold {threshold:.4g}", budget,
                                        lambda: FirstBlockCacheConfig(threshold=threshold),
                                        {"threshold": threshold})
        if not want("fbcache"):
            pass
        elif budget < fbcache_floor:
            dropped.append({"method": "fbcache", "budget": budget, "dropped": True,
                            "setting": f"dropped: its first block on every step costs block NFE >= {fbcache_floor:g}"})
        else:
            threshold, nfe = tune_threshold(bench, fbcache, budget, calibration, 0.01, 10.0, iterations)
            log(f"fbcache: threshold {threshold:.4g} gives block NFE {nfe:.2f} on the held-out seeds "
                f"(target {budget})")
            methods.append(fbcache(threshold))

        if want("magcache") and magcache_ratios is None:
            magcache_ratios = calibrate_magcache(bench, *calibration[0])

        def magcache(threshold, ratios=magcache_ratios, skips=MAGCACHE_MAX_SKIP[budget]):
            def config():
                return MagCacheConfig(threshold=threshold, max_skip_steps=skips, retention_ratio=0.1,
                                      num_inference_steps=STEPS, mag_ratios=list(ratios))
            return DiffusersCacheMethod("magcache", f"threshold {threshold:.4g}, K {skips}, retention 0.1", budget,
                                        config, {"threshold": threshold})
        if want("magcache"):
            threshold, nfe = tune_threshold(bench, magcache, budget, calibration, 1e-3, 10.0, iterations)
            log(f"magcache: threshold {threshold:.4g} gives block NFE {nfe:.2f} on the held-out seeds "
                f"(target {budget})")
            methods.append(magcache(threshold))
        if want("cache-dit") and want("fbcache") and bench.model.family == "flux":
            # seen 2026-12-07: after cache_dit.disable_cache, diffusers' FirstBlockCache on the FLUX
            # transformer fails (head_block_output None, first_block_cache.py:173)
            dropped.append({"method": "cache-dit", "budget": budget, "dropped": True, "setting": (
                "skipped beside fbcache on FLUX.1 (its disable breaks FirstBlockCache): run --methods cache-dit")})
        elif want("cache-dit"):
            methods += cache_dit_methods(bench, budget, calibration, iterations, log, dropped)
    return [m for m in methods if want(m.method) or m.method == "cache-dit-steps"], dropped


def default_method(budget: int) -> SpectrumMethod:
    """``target_nfe`` alone: the budget schedule's defaults, on the step grid they choose."""
    config = SpectrumConfig(num_inference_steps=STEPS, target_nfe=budget)
    grid = config.on_step_grid()
    shown = (f"plain grid of {grid.num_inference_steps} steps" if config.plain_grid else
             f"warmup {config.warmup_steps}, blend {config.blend_weight}, reuse {config.reuse}, "
             f"tail {config.budget_tail}")
    return SpectrumMethod("spectrum-default", f"target_nfe {budget} alone: {shown}", budget, grid)


def cache_dit_methods(bench: Bench, budget: int, calibration: list[tuple[str, int]], iterations: int, log,
                      dropped: list[dict]) -> list[Method]:
    """cache-dit at the budget's block NFE (where its always-computed first block allows it), and
    at the budget's count of fully computed steps (``cache-dit-steps``, spending more block NFE)."""
    missing = cache_dit_missing()
    if missing is not None:
        dropped.append({"method": "cache-dit", "budget": budget, "dropped": True, "setting": f"skipped: {missing}"})
        return []
    methods: list[Method] = []
    floor = CACHE_DIT_WARMUP + (STEPS - CACHE_DIT_WARMUP) * CACHE_DIT_FN / bench.counter.blocks
    for method, measure in (("cache-dit", "block_nfe"), ("cache-dit-steps", "nfe")):
        if measure == "block_nfe" and budget < floor:
            dropped.append({"method": method, "budget": budget, "dropped": True,
                            "setting": f"dropped: its first block on every step costs block NFE >= {floor:g}"})
            continue
        def build(threshold, method=method):
            return CacheDitMethod(bench.pipe, method, budget, threshold)
        threshold, nfe = tune_threshold(bench, build, budget, calibration, 1e-3, 10.0, iterations, measure)
        log(f"{method}: threshold {threshold:.4g} gives {measure} {nfe:.2f} on the held-out seeds (target {budget})")
        methods.append(build(threshold))
    return methods


# ----------------------------------------------------------------------------- report

def summarise(method: Method, runs: list[dict], full_seconds: float) -> dict:
    def mean(key):
        values = [r[key] for r in runs]
        return None if any(v is None for v in values) else round(statistics.fmean(values), 4)

    seconds = statistics.median(r["seconds"] for r in runs)
    nfe = statistics.fmean(r["nfe"] for r in runs)
    row = {
        "method": method.method, "setting": method.setting, "budget": method.budget,
        "nfe": round(nfe, 2), "nfe_max": max(r["nfe"] for r in runs), "psnr": mean("psnr"), "ssim": mean("ssim"), "accuracy": mean("accuracy"),
        "block_nfe": round(statistics.fmean(r["info"]["block_nfe"] for r in runs), 2),
        "speedup_wall": round(full_seconds / seconds, 3), "speedup_nfe": round(STEPS / nfe, 3),
        "seconds_median": round(seconds, 4),
    }
    for kind in ("forecast", "update", "validation"):
        if method.timings[kind]:
            row[f"{kind}_ms"] = round(1e3 * statistics.median(method.timings[kind]), 4)
    row.update({k: v for k, v in runs[0]["info"].items() if k != "block_nfe"})
    if method.method in ("spectrum-adaptive", "spectrum-budget", "spectrum-budget-reuse", "spectrum-default"):
        row.pop("real_steps")
        row["real_steps_per_clip"] = [r["info"]["real_steps"] for r in runs]
    return row


def markdown_table(rows: list[dict], real_step_ms: float, blocks: int, branches: int) -> str:
    lines = ["| budget | method | setting | NFE | block NFE | PSNR (dB) | SSIM | accuracy | speedup (wall) "
             "| speedup (NFE) | forecast ms | validation ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for row in rows:
        # cache-dit-steps spends more block NFE than the budget (matched in fully computed steps)
        if row["budget"] is not None and not row.get("dropped") and row["method"] != "cache-dit-steps":
            best[row["budget"]] = max(best.get(row["budget"], -1.0), row["psnr"])
    for row in rows:
        if row.get("dropped"):
            lines.append(f"| {row['budget']} | {row['method']} | {row['setting']} |" + " |" * 9)
            continue
        psnr_text = "ref" if row["psnr"] is None else f"{row['psnr']:.2f}"
        if row["psnr"] is not None and row["psnr"] == best.get(row["budget"]):
            psnr_text = f"**{psnr_text}**"
        ssim_text = "ref" if row["ssim"] is None else f"{row['ssim']:.4f}"
        lines.append(
            f"| {row['budget'] or STEPS} | {row['method']} | {row['setting']} | {row['nfe']:g} | {row['block_nfe']:g} "
            f"| {psnr_text} "
            f"| {ssim_text} | {100 * row['accuracy']:.1f}% | {row['speedup_wall']:.2f}x | {row['speedup_nfe']:.2f}x "
            f"| {row.get('forecast_ms', '')} | {row.get('validation_ms', '')} |")
    lines.append("")
    lines.append(f"NFE: evaluations of the whole block stack per guidance branch; block NFE counts every "
                 f"block evaluation in units of the stack (FirstBlockCache's first block on a skipped step: "
                 f"1/{blocks}), the measure the budgets are matched in. Bold: best PSNR at the budget. "
                 f"A full-compute transformer call (one branch, one step) takes {real_step_ms:.2f} ms here "
                 f"(denoising time / {branches * STEPS} calls); forecast ms is the median time of one forecast, "
                 f"validation ms the median extra time per real step (all branches) of scoring it.")
    return "\n".join(lines) + "\n"


FAMILY_STYLE = {"full": ("black", "*"), "plain": ("tab:gray", "s"), "reuse": ("tab:brown", "v"),
                "spectrum": ("tab:red", "o"), "spectrum-auto": ("tab:orange", "o"),
                "spectrum-auto-reuse": ("tab:pink", "o"), "spectrum-adaptive": ("gold", "h"),
                "spectrum-budget": ("tab:cyan", "X"), "spectrum-budget-reuse": ("tab:olive", "X"), "taylorseer": ("tab:blue", "^"), "fbcache": ("tab:green", "D"),
                "magcache": ("tab:purple", "P"), "spectrum-default": ("tab:red", "*"),
                "cache-dit": ("darkgreen", "d"), "cache-dit-steps": ("lime", "d")}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "psnr", "PSNR vs 50-step output (dB)"),
                           (axes[1], "accuracy", "frames (images) recognised as the prompted digit")):
        seen = set()
        for row in rows:
            if row.get("dropped") or row[key] is None:
                continue
            colour, marker = FAMILY_STYLE[row["method"]]
            name = row["method"] if row["method"] not in seen else None
            seen.add(row["method"])
            size = 6 * (row["budget"] or 15)
            ax.scatter(row["speedup_wall"], row[key], c=colour, marker=marker, s=size, label=name,
                       edgecolors="k", linewidths=0.4)
        ax.set_xlabel("denoising wall-clock speedup over 50 steps (marker area: block NFE budget)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    full = next(r for r in rows if r["method"] == "full")
    axes[1].axhline(full["accuracy"], color="black", lw=0.8, ls="--")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frame_grid(samples: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(samples)
    frames = samples[labels[0]].shape[0]
    fig, axes = plt.subplots(len(labels), frames, figsize=(frames * 0.9 + 3.2, len(labels) * 0.9 + 0.6),
                             squeeze=False)
    for i, label in enumerate(labels):
        for t in range(frames):
            ax = axes[i][t]
            ax.imshow(samples[label][t], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def run(num_pairs: int, budgets: list[int], out_json: Path, threads: int, tune_iterations: int,
        calibration_pairs: int, command: str, quiet: bool = False, model: str = "digits-wan",
        only: set[str] | None = None, merge_into: Path | None = None) -> dict:
    started = time.time()

    def log(message: str) -> None:
        if not quiet:
            tqdm.write(message)

    bench = Bench(threads, model)
    spec = bench.model
    unit = "clip" if spec.family == "wan" else "image"
    classifier = load_classifier()
    conditions = spec.conditions()
    pairs = benchmark_pairs(num_pairs, conditions)
    calibration = held_out_pairs(calibration_pairs, conditions)

    methods, dropped = build_methods(bench, budgets, calibration, tune_iterations, log, only)
    runs: dict[str, list[dict]] = {m.label: [] for m in methods}
    grid: dict[str, np.ndarray] = {}
    for (digit, _where, prompt), seed in tqdm(pairs, desc="quality", unit=unit, disable=quiet):
        reference = None
        for method in methods:
            frames, seconds, nfe, info = bench.sample(method, prompt, seed)
            if reference is None:
                reference = frames
            same = method.method == "full"
            runs[method.label].append({
                "seconds": seconds, "nfe": nfe, "info": info,
                "psnr": None if same else psnr(frames, reference),
                "ssim": None if same else ssim(frames, reference),
                "accuracy": digit_accuracy(classifier, frames, digit),
            })
            if seed == 0:
                grid[f"{method.label} (NFE {nfe:g})"] = frames
    full_seconds = statistics.median(r["seconds"] for r in runs[methods[0].label])
    rows = [summarise(m, runs[m.label], full_seconds) for m in methods]
    # each dropped baseline after its budget's last row
    for drop in dropped:
        rows.insert(max(i for i, r in enumerate(rows) if r["budget"] == drop["budget"]) + 1, drop)
    real_step_ms = 1e3 * full_seconds / (spec.branches * STEPS)

    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "machine": machine_description(),
        "torch": torch.__version__,
        "model": f"{spec.name} (spectrum_xdit/models/assets/{spec.name.replace('-', '_')})",
        "steps": STEPS, spec.guidance_field: spec.guidance, "pairs": num_pairs,
        "calibration_seeds": [s for _, s in calibration], "real_step_ms": round(real_step_ms, 3),
        "wall_seconds": round(time.time() - started, 1),
    }
    result = {"meta": meta, "rows": rows}
    if merge_into is not None:
        result = merge_rows(json.loads(merge_into.read_text()), result)
        out_json, rows, meta, command = merge_into, result["rows"], result["meta"], result["meta"]["command"]
        num_pairs = meta["pairs"]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    guidance = "guidance" if spec.guidance_field == "guidance_scale" else "true CFG"
    title = (f"{spec.name}, {num_pairs} {unit}s, {STEPS} {spec.sampler} steps, {guidance} {spec.guidance}; "
             f"{meta['date']}; {meta['machine']}")
    table = markdown_table(rows, meta["real_step_ms"], bench.counter.blocks, spec.branches)
    header = f"`{command}`"
    for merged in meta.get("merged", []):
        header += (f"; rows of {', '.join(merged['families'])} added {merged['date']} by `{merged['command']}` on "
                   f"the same pairs (the rows both runs have differ by at most {merged['largest_psnr_difference']:.4f}"
                   f" dB; wall speedups are each run's own)")
    out_json.with_suffix(".md").write_text(f"{title}\n\n{header}\n\n{table}")
    plot(rows, out_json.with_suffix(".png"), title)
    if merge_into is None:
        frame_grid(grid, out_json.with_name(out_json.stem + "_frames.png"),
                   f"'{pairs[0][0][2]}', seed 0: " + ("the 9 frames of each method" if unit == "clip" else
                                                       "each method's image"))
    if not quiet:
        print(table)
        print(f"wrote {out_json}, {out_json.with_suffix('.md')}, {out_json.with_suffix('.png')}, "
              f"{out_json.with_name(out_json.stem + '_frames.png')} in {meta['wall_seconds']:.0f} s")
    return result


def merge_rows(base: dict, added: dict) -> dict:
    """``base``'s result with the families only ``added`` ran inserted after each budget's rows;
    the rows both ran stay ``base``'s, and an entry of ``meta.merged`` says how far ``added``
    differs on them (the same pairs and seeds: float noise)."""
    new = {r["method"] for r in added["rows"]} - {r["method"] for r in base["rows"]}
    if added["meta"]["pairs"] != base["meta"]["pairs"]:
        raise ValueError(f"--merge-into needs the same --pairs ({base['meta']['pairs']}), got {added['meta']['pairs']}")
    rows = list(base["rows"])
    for row in added["rows"]:
        if row["method"] in new:
            rows.insert(max(i for i, r in enumerate(rows) if r["budget"] == row["budget"]) + 1, row)
    shared = {(r["method"], r["setting"]): r["psnr"] for r in added["rows"] if r["method"] not in new}
    differences = [abs(shared[r["method"], r["setting"]] - r["psnr"]) for r in base["rows"]
                   if (r["method"], r["setting"]) in shared and r["psnr"] is not None]
    merged = {"command": added["meta"]["command"], "date": added["meta"]["date"], "families": sorted(new),
              "shared_rows": len(differences), "largest_psnr_difference": round(max(differences, default=0.0), 4),
              "wall_seconds": added["meta"]["wall_seconds"]}
    return {"meta": {**base["meta"], "merged": [*base["meta"].get("merged", []), merged]}, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(BENCH_MODELS), default="digits-wan")
    parser.add_argument("--quick", action="store_true", help="2 pairs, budget 14, short tuning: an end-to-end check")
    parser.add_argument("--pairs", type=int, default=None, help="(prompt, seed) pairs (default 40; quick 2)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, choices=sorted(TAYLORSEER_SCHEDULES),
                        help="block NFE per branch to match (default 14 10 7; quick: 14)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"output JSON (default {DEFAULT_JSON}, other models quality_MODEL_cpu.json beside "
                             "it; quick: outputs/quality_quick.json, quality_MODEL_quick.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(FAMILY_STYLE),
                        help="only these method families (full and plain always run; cache-dit includes "
                             "cache-dit-steps); default: all")
    parser.add_argument("--merge-into", type=Path, default=None,
                        help="add the families this run has and that result has not to that result (the same "
                             "pairs), rewriting its JSON, Markdown and plot")
    args = parser.parse_args(argv)
    pairs = args.pairs if args.pairs is not None else (2 if args.quick else 40)
    out = args.json or BENCH_MODELS[args.model].default_json(args.quick)
    command = "python -m benchmarks.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    budgets = args.budgets or ([14] if args.quick else [14, 10, 7])
    return run(pairs, budgets, out, args.threads, tune_iterations=3 if args.quick else 7,
               calibration_pairs=1 if args.quick else 2, command=command.strip(), model=args.model,
               only=set(args.methods) if args.methods else None, merge_into=args.merge_into)


if __name__ == "__main__":
    main()
