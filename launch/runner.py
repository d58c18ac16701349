"""One rank of a generation, shared by `spectrum-xdit generate` (torchrun) and the Serve workers.

:func:`init_rank` joins the torch.distributed world described by the usual environment variables
(``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), sets up xDiT's
parallel state and builds the pipeline with xDiT's transformer wrapper. :func:`run_request` then
runs one generation on that rank; every rank of the world calls it with the same request, in
lock-step. Spectrum is applied for the request and removed afterwards, so no forecaster state
outlives a request.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import SpectrumConfig
from ..hooks import apply_spectrum, remove_spectrum, spectrum_stats
from ..models import ModelSpec

FLUX_TEXT_TOKENS = 64   # max_sequence_length of FLUX.1 requests


@dataclass(frozen=True)
class GenerationRequest:
    """What one generation needs; identical on every rank."""

    prompt: str
    num_inference_steps: int
    height: int
    width: int
    num_frames: int
    seed: int = 0
    guidance_scale: float = 5.0
    negative_prompt: Optional[str] = None
    spectrum: Optional[SpectrumConfig] = None  # None: no cache

    @property
    def cache_method(self) -> str:
        return "spectrum" if self.spectrum is not None else "none"


@dataclass
class RankPipeline:
    """This rank's pipeline and its place in the parallel layout."""

    spec: ModelSpec
    pipe: Any
    rank: int
    world_size: int
    device: str
    ulysses_degree: int = 1
    ring_degree: int = 1
    cfg_degree: int = 1
    pipefusion_degree: int = 1
    pipefusion: Any = None     # xDiT's PipeFusion FLUX.1 pipeline when pipefusion_degree > 1

    def geometry(self) -> dict:
        """What request sizes the model accepts: ``height``/``width`` must be multiples of
        ``spatial_multiple``; for video, ``num_frames - 1`` a multiple of ``temporal_multiple``.
        ``tokens_divisor`` is the sequence-parallel degree; ``padding`` says whether a token count
        not divisible by it is padded correctly (xDiT's padding path with this project's fixes),
        which holds while the padding is shorter than each rank's shard."""
        pipe = self.pipe
        if self.spec.family == "wan":
            patch = pipe.transformer.config.patch_size
            spatial, temporal, patch_t = pipe.vae_scale_factor_spatial * patch[1], pipe.vae_scale_factor_temporal, patch[0]
        else:
            spatial, temporal, patch_t = pipe.vae_scale_factor * 2, 1, 1
        return {"family": self.spec.family, "spatial_multiple": int(spatial), "temporal_multiple": int(temporal),
                "temporal_patch": int(patch_t), "tokens_divisor": self.ulysses_degree * self.ring_degree,
                "padding": self.world_size > 1 and _padding_fixed()}


def _padding_fixed() -> bool:
    try:
        from ..parallel.xdit_fixes import apply_xdit_fixes
    except ImportError:
        return False
    return apply_xdit_fixes()


def sequence_length(geometry: dict, height: int, width: int, num_frames: int) -> int:
    """Image or video tokens the transformer sees for a request of this size."""
    spatial = geometry["spatial_multiple"]
    tokens = (height // spatial) * (width // spatial)
    if geometry["family"] == "wan":
        latent_frames = (num_frames - 1) // geometry["temporal_multiple"] + 1
        tokens *= -(-latent_frames // geometry["temporal_patch"])
    return tokens


def init_rank(spec: ModelSpec, ulysses_degree: int = 1, ring_degree: int = 1,
              world_size: Optional[int] = None, cfg_degree: int = 1, pipefusion_degree: int = 1,
              num_pipeline_patch: Optional[int] = None, pipefusion_warmup_steps: int = 1) -> RankPipeline:
    """Join the world (when it has more than one rank), set up xDiT and build the pipeline.

    ``cfg_degree=2`` (Wan2.1 only) runs the two guidance branches on the two halves of the job
    (``spectrum_xdit.parallel.cfg_parallel``). ``pipefusion_degree > 1`` (FLUX.1 only) runs xDiT's
    PipeFusion pipeline with ``num_pipeline_patch`` patches after ``pipefusion_warmup_steps``
    synchronous steps (``spectrum_xdit.parallel.pipefusion``)."""
    if cfg_degree == 2 and spec.family != "wan":
        raise ValueError(f"CFG parallelism is supported for Wan2.1 only, not {spec.name}")
    if pipefusion_degree > 1 and spec.family != "flux":
        raise ValueError(f"PipeFusion is supported for FLUX.1 only (xDiT has none for Wan2.1), not {spec.name}")
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    rank = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if world_size > 1:
        from ..parallel.cpu_support import enable_cpu_support

        enable_cpu_support()
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank = dist.get_rank()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if world_size > 1 and pipefusion_degree > 1:
        from ..parallel.pipefusion import pipefusion_flux_pipeline, setup_pipefusion_parallel

        engine_config = setup_pipefusion_parallel(
            pipefusion_degree=pipefusion_degree, num_pipeline_patch=num_pipeline_patch,
            warmup_steps=pipefusion_warmup_steps, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
            dtype=dtype)
        pipe = spec.build(torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=rank != 0)
        pipefusion = pipefusion_flux_pipeline(pipe, engine_config)
        return RankPipeline(spec, pipe, rank, world_size, device, ulysses_degree, ring_degree,
                            pipefusion_degree=pipefusion_degree, pipefusion=pipefusion)
    if world_size > 1:
        from ..parallel.xdit_setup import init_xdit_runtime, setup_xdit_parallel, xdit_transformer

        engine_config = setup_xdit_parallel(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                            cfg_degree=cfg_degree)
    pipe = spec.build(torch_dtype=dtype)
    if world_size > 1:
        pipe.transformer = xdit_transformer(pipe.transformer)
        init_xdit_runtime(pipe, engine_config)
        if cfg_degree == 2:
            from ..parallel.cfg_parallel import enable_guidance_split

            enable_guidance_split(pipe.transformer)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=rank != 0)
    return RankPipeline(spec, pipe, rank, world_size, device, ulysses_degree, ring_degree, cfg_degree)


def decode_latents(pipe, family: str, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The pipeline's own VAE decode and post-processing of its final latents."""
    vae = pipe.vae
    if family == "wan":
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = vae.decode((latents * std + mean).to(vae.dtype), return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")[0]
    unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")[0]


@dataclass
class GenerationResult:
    latents: torch.Tensor
    media: Optional[np.ndarray]  # decoded frames, on rank 0 when asked for
    report: dict


def run_request(rp: RankPipeline, request: GenerationRequest, decode: bool = False,
                started: Optional[float] = None) -> GenerationResult:
    """One generation on this rank. Every rank of the world must call it with the same request.

    ``decode``: rank 0 also decodes the latents into frames. ``started``: the
    ``time.perf_counter()`` the report's ``total_seconds`` counts from (default: now).
    """
    started = time.perf_counter() if started is None else started
    if rp.pipefusion is not None:
        return _run_pipefusion(rp, request, decode, started)
    spec, pipe = rp.spec, rp.pipe
    config = request.spectrum
    if config is not None:
        apply_spectrum(pipe.transformer, config)
        if rp.world_size > 1:
            from ..parallel.consistency import enable_schedule_check

            enable_schedule_check(pipe.transformer)
    call = dict(prompt=request.prompt, num_inference_steps=request.num_inference_steps, height=request.height,
                width=request.width, output_type="latent", generator=torch.Generator().manual_seed(request.seed))
    if request.negative_prompt is not None:
        call["negative_prompt"] = request.negative_prompt
    if spec.family == "wan":
        call.update(num_frames=request.num_frames, guidance_scale=request.guidance_scale)
    else:
        call.update(true_cfg_scale=request.guidance_scale, max_sequence_length=FLUX_TEXT_TOKENS)
        if request.negative_prompt is None:
            call["negative_prompt"] = ""
        if rp.world_size > 1:
            from ..parallel.xdit_setup import set_flux_input_parameters

            set_flux_input_parameters(call["max_sequence_length"])
    if rp.cfg_degree == 2:
        _split_guidance(rp, request, call)
    stats: dict = {}
    denoise_start = time.perf_counter()
    try:
        with torch.no_grad():
            output = pipe(**call)
            latents = output.frames if spec.family == "wan" else output.images
            denoise_seconds = time.perf_counter() - denoise_start
            media = (decode_latents(pipe, spec.family, latents, request.height, request.width)
                     if decode and rp.rank == 0 else None)
    finally:
        if config is not None:
            stats = spectrum_stats(pipe.transformer)
            remove_spectrum(pipe.transformer)

    own_state_bytes = sum(s["state_bytes"] for s in stats.values())
    if rp.cfg_degree == 2:
        # each half of the job holds one branch: collect both for the report
        gathered: list = [None] * rp.world_size
        dist.all_gather_object(gathered, stats)
        stats = {branch: s for part in gathered for branch, s in part.items()}
        stats = {branch: stats[branch] for branch in ("cond", "uncond") if branch in stats}
    report = _report(rp, request, stats, own_state_bytes, denoise_seconds, started)
    return GenerationResult(latents, media, report)


def _run_pipefusion(rp: RankPipeline, request: GenerationRequest, decode: bool, started: float) -> GenerationResult:
    """xDiT's PipeFusion FLUX.1 pipeline (no true CFG); the last stage's latents reach rank 0."""
    if request.guidance_scale > 1:
        raise ValueError("PipeFusion runs xDiT's FLUX.1 pipeline, which has no classifier-free guidance: "
                         "use guidance_scale 1")
    config = request.spectrum
    rp.pipefusion.set_spectrum(config)
    denoise_start = time.perf_counter()
    with torch.no_grad():
        output = rp.pipefusion(prompt=request.prompt, height=request.height, width=request.width,
                               num_inference_steps=request.num_inference_steps, output_type="latent",
                               max_sequence_length=FLUX_TEXT_TOKENS,
                               generator=torch.Generator().manual_seed(request.seed))
        holder = [None if output is None else output.images.cpu()]
        dist.broadcast_object_list(holder, src=rp.world_size - 1)   # the last stage holds the output
        latents = holder[0].to(rp.device)
        denoise_seconds = time.perf_counter() - denoise_start
        media = (decode_latents(rp.pipe, "flux", latents, request.height, request.width)
                 if decode and rp.rank == 0 else None)
    stats = {"cond": rp.pipefusion.spectrum_stats()} if config is not None else {}
    report = _report(rp, request, stats, stats["cond"]["state_bytes"] if stats else 0, denoise_seconds, started)
    by_rank: list = [None] * rp.world_size
    dist.all_gather_object(by_rank, report["state_bytes_per_rank"])
    report["state_bytes_by_rank"] = by_rank    # only the last stage holds forecaster state
    return GenerationResult(latents, media, report)


def _report(rp: RankPipeline, request: GenerationRequest, stats: dict, own_state_bytes: int,
            denoise_seconds: float, started: float) -> dict:
    config = request.spectrum
    steps = request.num_inference_steps
    report = {
        "model": rp.spec.name,
        "num_inference_steps": steps,
        "world_size": rp.world_size,
        "parallel": {"ulysses_degree": rp.ulysses_degree, "ring_degree": rp.ring_degree,
                     "cfg_degree": rp.cfg_degree, "pipefusion_parallel_degree": rp.pipefusion_degree},
        "cache_method": request.cache_method,
        "spectrum": config.to_dict() if config is not None else None,
        "real_steps": {b: s["real_steps"] for b, s in stats.items()},
        "nfe": {b: s["nfe"] for b, s in stats.items()},
        "denoise_seconds": denoise_seconds,
        "total_seconds": time.perf_counter() - started,
        "state_bytes_per_rank": own_state_bytes,
    }
    if config is not None and config.validates and stats:
        # job-wide numbers, identical on every rank (spectrum_xdit.control)
        first = next(iter(stats.values()))
        report.update(validation=first["validation"], plan=first["plan"],
                      validation_seconds=first["validation_seconds"])
    if config is None:
        branches = ["cond", "uncond"] if request.guidance_scale > 1 else ["cond"]
        report["real_steps"] = {b: list(range(steps)) for b in branches}
        report["nfe"] = {b: steps for b in branches}
    return report


def _split_guidance(rp: RankPipeline, request: GenerationRequest, call: dict) -> None:
    """CFG parallelism: encode both prompts here and hand the negative one to the split."""
    from ..parallel.cfg_parallel import guidance_split

    if request.guidance_scale <= 1:
        raise ValueError("CFG parallelism needs guidance (guidance_scale > 1)")
    # the text length the pipeline itself would encode to (its __call__ default, not encode_prompt's)
    length = call.get("max_sequence_length",
                      inspect.signature(rp.pipe.__call__).parameters["max_sequence_length"].default)
    positive, negative = rp.pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                               do_classifier_free_guidance=True, device=rp.device,
                                               max_sequence_length=length)
    call.pop("prompt")
    call.pop("negative_prompt", None)
    call.update(prompt_embeds=positive, negative_prompt_embeds=negative)
    guidance_split(rp.pipe.transformer).set_negative_embeddings(negative)


def finish_rank(rp: RankPipeline) -> None:
    """Leave the world: a barrier, then the process group is destroyed."""
    if rp.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
