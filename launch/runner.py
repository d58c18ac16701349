"""One rank of a generation, shared by `spectrum-xdit generate` (torchrun) and the Serve workers.

:func:`init_rank` joins the torch.distributed world described by the usual environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and builds this rank's
pipeline with the builder of its layout: one process or sequence parallel, CFG parallel, or
PipeFusion. Every rank then calls :meth:`RankPipeline.generate` with the same checked request, in
lock-step. Spectrum is applied for the request and removed afterwards, so no forecaster state
outlives a request.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..experts import (
    apply_spectrum_to_pipeline,
    expert_steps,
    pipeline_experts,
    pipeline_spectrum_stats,
    remove_spectrum_from_pipeline,
)
from ..config import SpectrumConfig
from ..models import ModelSpec, SizeRules, size_rules
from ..parallel import patches
from .images import decode_image
from .request import GenerationRequest, ParallelLayout, guidance_branches

# max_sequence_length of FLUX.1 requests whose model names none: that of xDiT's FLUX.1 runner and of
# diffusers' FluxPipeline, which the released checkpoints are run at
FLUX_TEXT_TOKENS = 512


def flux_text_tokens(spec: ModelSpec) -> int:
    """The T5 tokens of a FLUX.1 prompt: the model's own length (one trained at it), else ``FLUX_TEXT_TOKENS``."""
    return spec.max_sequence_length or FLUX_TEXT_TOKENS


@dataclass
class GenerationResult:
    latents: torch.Tensor
    media: Optional[np.ndarray]  # decoded frames, on rank 0 when asked for
    report: dict


@dataclass
class RankPipeline:
    """This rank's pipeline and its place in the parallel layout: one process or xDiT's sequence
    parallelism (the wrapper shards inside ``forward``; every rank runs the same pipeline)."""

    spec: ModelSpec
    pipe: Any
    rank: int
    layout: ParallelLayout
    device: str
    # What the step-boundary stop agrees over: a gloo group of the world's ranks (None: the world
    # itself, already on gloo, or one process).
    host_group: Any = None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def size_rules(self) -> SizeRules:
        """The sizes the built pipeline accepts: the spec's arithmetic on the built configs."""
        return size_rules(self.spec.family, dict(self.pipe.transformer.config), dict(self.pipe.vae.config))

    def generate(self, request: GenerationRequest, decode: bool = False, started: Optional[float] = None,
                 stop: Optional[Callable[[], bool]] = None) -> GenerationResult:
        """One generation on this rank; every rank of the world calls it with the same request.

        ``decode``: rank 0 also decodes the latents into frames. ``started``: the
        ``time.perf_counter()`` the report's ``total_seconds`` counts from (default: now).
        ``stop``: asked after every denoising step whether to stop there; the ranks agree (one
        all-reduce of a host flag per step), so all of them stop after the same step, and the
        report says which (``stopped_after_step``; the latents are then those of that step).
        """
        started = time.perf_counter() if started is None else started
        pipe, (_, config) = self.pipe, step_grid(request)
        if config is not None:
            split = apply_spectrum_to_pipeline(pipe, config)
            if self.world_size > 1:
                from ..parallel.consistency import enable_schedule_check

                for name, steps in split.items():
                    if steps:
                        enable_schedule_check(getattr(pipe, name))
        call = self._pipeline_call(request)
        boundary = None
        if stop is not None:
            boundary = call["callback_on_step_end"] = _StopAtStepBoundary(stop, self.world_size, self.host_group)
        stats: dict = {}
        denoise_start = time.perf_counter()
        try:
            with torch.no_grad():
                output = pipe(**call)
                latents = output.frames if self.spec.family == "wan" else output.images
                denoise_seconds = time.perf_counter() - denoise_start
                media = self.decode(latents, request) if decode and self.rank == 0 else None
        finally:
            if config is not None:
                stats = pipeline_spectrum_stats(pipe)
                remove_spectrum_from_pipeline(pipe)
        report = self.report(request, self._job_stats(stats), peak_state_bytes(stats), denoise_seconds, started)
        if boundary is not None and boundary.stopped_after is not None:
            report["stopped_after_step"] = boundary.stopped_after
        return GenerationResult(latents, media, report)

    def _pipeline_call(self, request: GenerationRequest) -> dict:
        call = dict(prompt=request.prompt, num_inference_steps=step_grid(request)[0], height=request.height,
                    width=request.width, guidance_scale=request.guidance_scale, output_type="latent",
                    generator=torch.Generator().manual_seed(request.seed))
        if request.negative_prompt is not None:
            call["negative_prompt"] = request.negative_prompt
        if self.spec.needs_image:   # WanImageToVideoPipeline resizes it to height x width itself
            call["image"] = decode_image(request.image)
        if self.spec.family == "wan":
            call.update(num_frames=request.num_frames)
            return call
        call.update(true_cfg_scale=request.true_cfg_scale, max_sequence_length=flux_text_tokens(self.spec))
        if "uncond" in guidance_branches(request, "flux"):   # FluxPipeline runs true CFG only with a negative prompt
            call.setdefault("negative_prompt", "")
        if self.world_size > 1:
            from ..parallel.xdit_setup import set_flux_input_parameters

            set_flux_input_parameters(flux_text_tokens(self.spec))
        return call

    def _job_stats(self, stats: dict) -> dict:
        """The Spectrum stats of the whole job, per expert and branch (here: this rank's)."""
        return stats

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, request: GenerationRequest) -> np.ndarray:
        """The pipeline's own VAE decode and post-processing of its final latents."""
        pipe = self.pipe
        vae = pipe.vae
        if self.spec.family == "wan":
            mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
            return pipe.video_processor.postprocess_video(video, output_type="np")[0]
        unpacked = pipe._unpack_latents(latents, request.height, request.width, pipe.vae_scale_factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")[0]

    def report(self, request: GenerationRequest, stats: dict, own_state_bytes: int, denoise_seconds: float,
                started: float) -> dict:
        """The run report; ``stats``: the job's Spectrum stats per expert (``transformer``, and
        ``transformer_2`` of Wan2.2) and guidance branch, empty without Spectrum. ``real_steps`` and
        ``nfe`` are per branch over the whole call; a two-expert pipeline's report adds ``experts``:
        per expert its steps ``[first, end)`` and its own ``real_steps`` and ``nfe`` per branch."""
        steps, config = step_grid(request)
        layout = self.layout
        split = expert_steps(self.pipe, steps)
        if config is None:
            branches = guidance_branches(request, self.spec.family)
            stats = {name: {b: {"real_steps": list(own), "nfe": len(own)} for b in branches}
                     for name, own in split.items() if own}
        real_steps: dict = {}
        nfe: dict = {}
        for branches in stats.values():
            for branch, s in branches.items():
                real_steps.setdefault(branch, []).extend(s["real_steps"])
                nfe[branch] = nfe.get(branch, 0) + s["nfe"]
        report = {
            "model": self.spec.name,
            "num_inference_steps": steps,
            "num_inference_steps_asked": request.num_inference_steps,
            "step_grid": "plain" if config is not None and steps < request.num_inference_steps else "request",
            "world_size": self.world_size,
            "parallel": {"ulysses_degree": layout.ulysses_degree, "ring_degree": layout.ring_degree,
                         "cfg_degree": layout.cfg_degree,
                         "pipefusion_parallel_degree": layout.pipefusion_parallel_degree},
            "guidance_scale": request.guidance_scale,
            "true_cfg_scale": request.true_cfg_scale,
            "cache_method": request.cache_method,
            "spectrum": config.model_dump() if config is not None else None,
            "real_steps": real_steps,
            "nfe": nfe,
            "denoise_seconds": denoise_seconds,
            "total_seconds": time.perf_counter() - started,
            "state_bytes_per_rank": own_state_bytes,
            "xfuser_patches": patches.record(),
        }
        if config is not None and config.validates and stats:
            # job-wide numbers, identical on every rank (spectrum_xdit.control), one expert after the other
            shared = [next(iter(branches.values())) for branches in stats.values() if branches]
            report.update(validation=[entry for s in shared for entry in s["validation"]],
                          plan=[entry for s in shared for entry in s["plan"]],
                          validation_seconds=sum(s["validation_seconds"] for s in shared))
        if len(split) > 1:
            report["experts"] = {name: {"steps": [own.start, own.stop],
                                        "real_steps": {b: s["real_steps"] for b, s in stats.get(name, {}).items()},
                                        "nfe": {b: s["nfe"] for b, s in stats.get(name, {}).items()}}
                                 for name, own in split.items()}
        return report


def step_grid(request: GenerationRequest) -> tuple[int, Optional[SpectrumConfig]]:
    """The steps the sampler runs for ``request`` and its Spectrum config on them: the request's,
    or, where a budget's ``step_grid`` "auto" finds forecasting losing to the plain sampler, the
    plain sampler's grid of ``target_nfe`` steps (``SpectrumConfig.on_step_grid``)."""
    config = request.spectrum
    if config is None:
        return request.num_inference_steps, None
    grid = config.on_step_grid()
    return grid.num_inference_steps, grid


def peak_state_bytes(stats: dict) -> int:
    """The most forecaster bytes a job's Spectrum ``stats`` (per expert and branch) held at once:
    an expert frees its forecasters after its last step (``spectrum_xdit.hooks``), so one expert's."""
    return max((sum(s["state_bytes"] for s in branches.values()) for branches in stats.values()), default=0)


def text_length(pipe) -> int:
    """The text length a pipeline encodes prompts to when called: its ``__call__`` default, not
    ``encode_prompt``'s."""
    return inspect.signature(pipe.__call__).parameters["max_sequence_length"].default


class CfgParallelRankPipeline(RankPipeline):
    """Wan2.1 with the two guidance branches on the two halves of the job
    (``spectrum_xdit.parallel.cfg_parallel``): this rank computes one branch."""

    def _pipeline_call(self, request: GenerationRequest) -> dict:
        """Both prompts are encoded here and the negative one handed to the split."""
        from ..parallel.cfg_parallel import guidance_split

        call = super()._pipeline_call(request)
        positive, negative = self.pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                                     do_classifier_free_guidance=True, device=self.device,
                                                     max_sequence_length=text_length(self.pipe))
        call.pop("prompt")
        call.pop("negative_prompt", None)
        call.update(prompt_embeds=positive, negative_prompt_embeds=negative)
        for expert in pipeline_experts(self.pipe).values():
            guidance_split(expert).set_negative_embeddings(negative)
        return call

    def _job_stats(self, stats: dict) -> dict:
        """Each half of the job holds one branch of each expert: both, gathered."""
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, stats)
        job = {}
        for name in stats:
            branches = {branch: s for part in gathered for branch, s in part[name].items()}
            job[name] = {branch: branches[branch] for branch in ("cond", "uncond") if branch in branches}
        return job


class PipeFusionRankPipeline(RankPipeline):
    """FLUX.1 under xDiT's PipeFusion (``spectrum_xdit.parallel.pipefusion``; distilled guidance,
    no true CFG): the last stage's latents reach rank 0."""

    pipefusion: Any = None

    def generate(self, request: GenerationRequest, decode: bool = False, started: Optional[float] = None,
                 stop: Optional[Callable[[], bool]] = None) -> GenerationResult:
        if stop is not None:
            raise NotImplementedError("stopping at a step boundary is not supported under PipeFusion, whose "
                                      "denoising loop is xDiT's")
        started = time.perf_counter() if started is None else started
        steps, config = step_grid(request)
        self.pipefusion.set_spectrum(config)
        denoise_start = time.perf_counter()
        with torch.no_grad():
            output = self.pipefusion(prompt=request.prompt, height=request.height, width=request.width,
                                     num_inference_steps=steps,
                                     guidance_scale=request.guidance_scale, output_type="latent",
                                     max_sequence_length=flux_text_tokens(self.spec),
                                     generator=torch.Generator().manual_seed(request.seed))
            holder = [None if output is None else output.images.cpu()]
            dist.broadcast_object_list(holder, src=self.world_size - 1)   # the last stage holds the output
            latents = holder[0].to(self.device)
            denoise_seconds = time.perf_counter() - denoise_start
            media = self.decode(latents, request) if decode and self.rank == 0 else None
        stats = {"cond": self.pipefusion.spectrum_stats()} if config is not None else {}
        report = self.report(request, {"transformer": stats} if stats else {},
                             stats["cond"]["state_bytes"] if stats else 0, denoise_seconds, started)
        by_rank: list = [None] * self.world_size
        dist.all_gather_object(by_rank, report["state_bytes_per_rank"])
        report["state_bytes_by_rank"] = by_rank    # only the last stage holds forecaster state
        return GenerationResult(latents, media, report)


class _StopAtStepBoundary:
    """diffusers' ``callback_on_step_end``: after each step every rank's wish to stop is
    all-reduced (max), and on the first step any rank wishes it the pipeline is interrupted (the
    remaining steps are skipped, as diffusers' ``interrupt`` does).

    The wish is a host tensor reduced over a gloo group, so that the host never waits for the
    device here: the device keeps the steps already queued, and the host queues the next one."""

    def __init__(self, stop: Callable[[], bool], world_size: int, group=None):
        self.stop = stop
        self.world_size = world_size
        self.group = group
        self.stopped_after: Optional[int] = None

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.stopped_after is None and self._agreed(self.stop()):
            self.stopped_after = step
            pipe._interrupt = True
        return callback_kwargs

    def _agreed(self, wish: bool) -> bool:
        if self.world_size == 1:
            return wish
        flag = torch.tensor([int(wish)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag[0])


def init_rank(spec: ModelSpec, layout: ParallelLayout, store=None) -> RankPipeline:
    """Join the world (when the layout has more than one rank), set up xDiT and build this rank's
    pipeline. The layout must have passed ``request.check_layout`` for ``spec``. ``store``: the
    torch.distributed store to rendezvous through (default: ``MASTER_ADDR``/``MASTER_PORT``)."""
    rank, device = _join_world(layout.world_size, store)
    host_group = _host_group() if layout.world_size > 1 else None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if layout.pipefusion_parallel_degree > 1:
        builder = _build_pipefusion
    elif layout.use_cfg_parallel:
        builder = _build_cfg_parallel
    else:
        builder = _build_sequence_parallel
    rank_pipeline = builder(spec, layout, rank, device, dtype)
    rank_pipeline.host_group = host_group
    return rank_pipeline


def _host_group():
    """A gloo group of every rank for host flags, made by every rank at the same point (after
    joining, before xDiT's groups); ``None`` where the world itself runs on gloo."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _join_world(world_size: int, store=None) -> tuple[int, str]:
    """This rank and its device, joining the world unless this process already has one;
    xfuser's patches are installed first when xDiT will run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size == 1:
        return 0, device
    patches.install()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device == "cuda" else "gloo"
    if dist.is_initialized():
        pass
    elif store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size)
    return dist.get_rank(), device


def _build_sequence_parallel(spec, layout, rank, device, dtype) -> RankPipeline:
    pipe = spec.build(torch_dtype=dtype)
    if layout.world_size > 1:
        _into_xdit(pipe, layout)
    _finish(pipe, device, rank)
    return RankPipeline(spec, pipe, rank, layout, device)


def _build_cfg_parallel(spec, layout, rank, device, dtype) -> RankPipeline:
    from ..parallel.cfg_parallel import enable_guidance_split

    pipe = spec.build(torch_dtype=dtype)
    _into_xdit(pipe, layout)
    for expert in pipeline_experts(pipe).values():
        enable_guidance_split(expert)
    _finish(pipe, device, rank)
    return CfgParallelRankPipeline(spec, pipe, rank, layout, device)


def _build_pipefusion(spec, layout, rank, device, dtype) -> RankPipeline:
    from ..parallel.pipefusion import pipefusion_flux_pipeline, setup_pipefusion_parallel

    engine_config = setup_pipefusion_parallel(
        pipefusion_degree=layout.pipefusion_parallel_degree, num_pipeline_patch=layout.num_pipeline_patch,
        warmup_steps=layout.warmup_steps, ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
        dtype=dtype)
    pipe = spec.build(torch_dtype=dtype).to(device)
    _finish(pipe, device, rank)
    rank_pipeline = PipeFusionRankPipeline(spec, pipe, rank, layout, device)
    rank_pipeline.pipefusion = pipefusion_flux_pipeline(pipe, engine_config)
    return rank_pipeline


def _into_xdit(pipe, layout: ParallelLayout) -> None:
    """xDiT's groups for the layout, and its transformer wrapper on each expert of the pipeline."""
    from ..parallel.xdit_setup import init_xdit_runtime, setup_xdit_parallel, xdit_transformer

    engine_config = setup_xdit_parallel(ulysses_degree=layout.ulysses_degree, ring_degree=layout.ring_degree,
                                        cfg_degree=layout.cfg_degree)
    for name, expert in pipeline_experts(pipe).items():
        setattr(pipe, name, xdit_transformer(expert))
    init_xdit_runtime(pipe, engine_config)


def _finish(pipe, device: str, rank: int) -> None:
    pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0)


def finish_rank(rp: RankPipeline) -> None:
    """Leave the world: a barrier, then the process group is destroyed."""
    if rp.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
