"""Step-level batching on one rank: each tick advances every active request by one denoising step,
and only the requests whose step is real go through the block stack, as one batch.

A request keeps its own prompt embeddings (and, image-to-video, its first frame's image embeddings
and VAE condition), noise, scheduler, guidance scale and Spectrum state (a
:class:`SpectrumStack` of its own, with its controller and forecasters), so rows of different
requests share no fit and no decision; batching only stacks their rows into one transformer call.
Per latent shape, a tick makes at most two calls: one whose blocks run (the real rows) and one whose
blocks are skipped (the forecast rows: only the timestep embedding and the output projection run). A request
joins at any tick, at its own step 0, and leaves when its last step is done.

Every rank of a sequence-parallel group runs the same ticks in lock-step. Each tick's composition and
decisions are checked across the ranks (one all-gather of a fingerprint, as the schedule check of
``parallel.consistency``), so a divergence is the same error on every rank, never a hang.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from diffusers.hooks.hooks import CacheContext

from ..hooks import SpectrumStack, hook_transformer, unhook_transformer
from .images import decode_image
from .request import GenerationRequest
from .runner import GenerationResult, RankPipeline, text_length


@dataclass
class ActiveRequest:
    """One request in the loop: what WanPipeline's own loop would hold for it, and its Spectrum."""

    job: str
    request: GenerationRequest
    latents: torch.Tensor
    embeds: dict[str, torch.Tensor]       # guidance branch -> prompt embeddings
    scheduler: Any
    stack: Optional[SpectrumStack]
    joined: float = field(default_factory=time.perf_counter)
    step: int = 0
    block_rows: int = 0                   # rows it sent through the block stack
    condition: Optional[torch.Tensor] = None     # image-to-video: the first frame's mask and latents
    image_embeds: Optional[torch.Tensor] = None  # image-to-video: its CLIP tokens, for both branches

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    @property
    def model_input(self) -> torch.Tensor:
        """The transformer's input, as WanImageToVideoPipeline's loop joins noise and condition."""
        return self.latents if self.condition is None else torch.cat([self.latents, self.condition], dim=1)


class RowsPolicy:
    """The :class:`~spectrum_xdit.hooks.BlockStackPolicy` of one batched call: a Spectrum stack
    (``None`` for a request without Spectrum) and a guidance branch per row, and whether the call
    runs the blocks (every row's decision is taken before the call)."""

    def __init__(self):
        self.rows: list[tuple[Optional[SpectrumStack], str]] = []
        self.run_blocks = True

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.shape[0] != len(self.rows):
            raise RuntimeError(f"a step batch of {len(self.rows)} rows reached the blocks with batch "
                               f"{hidden_states.shape[0]}")

    def record(self, features: torch.Tensor) -> None:
        for index, (stack, branch) in enumerate(self.rows):
            if stack is not None:
                stack.select(branch)
                stack.record(features[index:index + 1])

    def forecast(self) -> torch.Tensor:
        parts = []
        for stack, branch in self.rows:
            stack.select(branch)
            parts.append(stack.forecast())
        return torch.cat(parts)

    def reset(self) -> None:
        """Nothing to drop: a request's state ends with the request."""


class StepBatcher:
    """The active requests of one rank and their ticks (Wan2.1-style pipelines: one transformer,
    one timestep per sample)."""

    def __init__(self, rank_pipeline: RankPipeline):
        pipe = rank_pipeline.pipe
        if rank_pipeline.spec.family != "wan":
            raise ValueError(f"step batching runs Wan pipelines; {rank_pipeline.spec.name} is "
                             f"{rank_pipeline.spec.family}")
        config = getattr(pipe, "config", {})
        if config.get("boundary_ratio") is not None or config.get("expand_timesteps"):
            raise ValueError("step batching runs Wan2.1-style pipelines (one transformer, one timestep per "
                             "sample), not Wan2.2's two experts or per-token timesteps")
        self.rank_pipeline = rank_pipeline
        self.active: dict[str, ActiveRequest] = {}
        self.policy = RowsPolicy()
        hook_transformer(pipe.transformer, self.policy)

    def close(self) -> None:
        """Take the hooks off: the pipeline serves solo calls again."""
        unhook_transformer(self.rank_pipeline.pipe.transformer)
        self.active.clear()

    def join(self, job: str, request: GenerationRequest) -> None:
        """Start ``request`` at its step 0: its embeddings, noise and scheduler, as WanPipeline makes them."""
        if job in self.active:
            raise ValueError(f"job {job} is already in the loop")
        rp = self.rank_pipeline
        pipe, device = rp.pipe, rp.device
        guided = request.guidance_scale > 1
        with torch.no_grad():
            positive, negative = pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                                    do_classifier_free_guidance=guided, num_videos_per_prompt=1,
                                                    max_sequence_length=text_length(pipe), device=device)
        dtype = pipe.transformer.dtype
        embeds = {"cond": positive.to(dtype)}
        if guided:
            embeds["uncond"] = negative.to(dtype)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(request.num_inference_steps, device=device)
        scheduler.set_begin_index(0)
        generator = torch.Generator().manual_seed(request.seed)
        condition = image_embeds = None
        if rp.spec.needs_image:
            with torch.no_grad():
                image = decode_image(request.image)
                image_embeds = pipe.encode_image(image, device).to(dtype)
                frame = pipe.video_processor.preprocess(image, height=request.height, width=request.width)
                latents, condition = pipe.prepare_latents(frame.to(device, torch.float32), 1, pipe.vae.config.z_dim,
                                                          request.height, request.width, request.num_frames,
                                                          torch.float32, device, generator, None)
        else:
            latents = pipe.prepare_latents(1, pipe.transformer.config.in_channels, request.height, request.width,
                                           request.num_frames, torch.float32, device, generator, None)
        stack = SpectrumStack(request.spectrum) if request.spectrum is not None else None
        self.active[job] = ActiveRequest(job, request, latents, embeds, scheduler, stack, condition=condition,
                                         image_embeds=image_embeds)

    def drop(self, job: str) -> Optional[int]:
        """Remove ``job`` from the loop; the steps it had done (``None`` if it was not in it)."""
        active = self.active.pop(job, None)
        return None if active is None else active.step

    def tick(self) -> tuple[dict[str, tuple[GenerationRequest, GenerationResult]], int]:
        """One denoising step of every active request: those it finished, with their requests and
        results (latents and reports), and how many rows ran the block stack."""
        rows = self._decide()
        self._verify(rows)
        outputs, block_rows = {}, 0
        groups: dict[tuple, list] = {}
        for row in rows:
            groups.setdefault((tuple(row[0].latents.shape), row[2]), []).append(row)
        with torch.no_grad():
            for (_, real), group in groups.items():
                out = self._call(group, real)
                for index, (active, branch, _) in enumerate(group):
                    outputs[active.job, branch] = out[index:index + 1]
                    active.block_rows += real
                block_rows += len(group) if real else 0
            finished = {}
            for active in list(self.active.values()):
                noise = outputs[active.job, "cond"]
                if "uncond" in active.embeds:
                    uncond = outputs[active.job, "uncond"]
                    noise = uncond + active.request.guidance_scale * (noise - uncond)
                active.latents = active.scheduler.step(noise, active.timestep, active.latents, return_dict=False)[0]
                active.step += 1
                if active.step == active.steps:
                    finished[active.job] = active.request, self._finish(self.active.pop(active.job))
        return finished, block_rows

    def follow_rank_zero(self, wish: bool) -> bool:
        """Rank 0's ``wish`` on every rank (one broadcast): a decision all ranks must take alike."""
        if self.rank_pipeline.world_size == 1:
            return wish
        import torch.distributed as dist

        flag = torch.tensor([1 if wish else 0], dtype=torch.int64, device=self.rank_pipeline.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _decide(self) -> list[tuple[ActiveRequest, str, bool]]:
        """Every row's decision, each request's from its own Spectrum state."""
        rows = []
        for active in self.active.values():
            real = True
            for branch in active.embeds:
                if active.stack is not None:
                    active.stack.context.set_context(CacheContext(branch, step_index=active.step,
                                                                  num_inference_steps=active.steps))
                    active.stack.begin_call(active.latents)
                    real = active.stack.run_blocks
                rows.append((active, branch, real))
        return rows

    def _verify(self, rows: list) -> None:
        if self.rank_pipeline.world_size == 1:
            return
        from ..parallel.consistency import verify_agreement

        composition = ";".join(f"{active.job}:{active.step}:{branch}:{int(real)}" for active, branch, real in rows)
        verify_agreement(zlib.crc32(composition.encode()), "step batches",
                         f"This rank's tick: {len(rows)} rows ({composition[:200]}).")

    def _call(self, group: list, real: bool) -> torch.Tensor:
        """One transformer call over ``group``'s rows; the blocks run only when ``real``."""
        transformer = self.rank_pipeline.pipe.transformer
        self.policy.rows = [(active.stack, branch) for active, branch, _ in group]
        self.policy.run_blocks = real
        images = None   # one model in the loop: every request has image embeddings or none does
        if group[0][0].image_embeds is not None:
            images = torch.cat([active.image_embeds for active, _, _ in group])
        return transformer(
            hidden_states=torch.cat([active.model_input for active, _, _ in group]).to(transformer.dtype),
            timestep=torch.stack([active.timestep for active, _, _ in group]),
            encoder_hidden_states=torch.cat([active.embeds[branch] for active, branch, _ in group]),
            encoder_hidden_states_image=images, return_dict=False)[0]

    def _finish(self, active: ActiveRequest) -> GenerationResult:
        rp = self.rank_pipeline
        stats = {}
        if active.stack is not None:
            stats = active.stack.stats()
            active.stack.reset()
        denoise_seconds = time.perf_counter() - active.joined
        report = rp.report(active.request, {"transformer": stats} if stats else {},
                           sum(s["state_bytes"] for s in stats.values()), denoise_seconds, active.joined)
        report["block_stack_rows"] = active.block_rows
        return GenerationResult(active.latents, None, report)
