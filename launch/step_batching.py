"""Step-level batching on one rank: each tick advances every active request by one denoising step,
and only the rows whose step is real go through the block stack, as one batch.

It runs FLUX.1 (distilled guidance, or true CFG as a second row), Wan2.1 (text- and image-to-video)
and Wan2.2's two experts. A request keeps what its pipeline's own loop would hold: its prompt
embeddings (FLUX.1: also the pooled ones; image-to-video: its first frame's image embeddings and VAE
condition), noise, scheduler, guidance scale, and a :class:`~spectrum_xdit.hooks.SpectrumState` per
expert with its own controller and forecasters (``spectrum_xdit.experts``: each expert's own steps,
schedule and share of a budget), so rows of different requests share no fit and no decision;
batching only stacks their rows into one transformer call. Each row is begun, recorded and
forecast through the core's per-row API (docs/method.md, "Batching requests"). Per expert and
latent shape, a tick makes at most two calls: one whose blocks run (the real rows) and one whose
blocks are skipped (the forecast rows: only the timestep embedding and the output projection run).
A request joins at any tick, at its own step 0, runs its first expert up to its own boundary step
and its second after it, and leaves when its last step is done.

Every rank of a sequence-parallel group runs the same ticks in lock-step. Before each tick one small
all-reduce, of three integers on the host (a gloo group, so it never waits for the device), carries
rank 0's decision to run the tick and checks that every rank's loop holds the same requests
(:meth:`StepBatcher.agree`), so a divergence is the same error on every rank, never a hang.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..experts import expert_states, expert_steps, pipeline_experts
from ..hooks import BranchState, RowsPolicy, SpectrumState, hook_transformer, unhook_transformer
from .images import decode_image
from .request import GenerationRequest, guidance_branches
from .runner import GenerationResult, RankPipeline, flux_text_tokens, peak_state_bytes, step_grid, text_length


@dataclass
class ActiveRequest:
    """One request in the loop: what its pipeline's own loop would hold for it, and its Spectrum."""

    job: str
    request: GenerationRequest
    latents: torch.Tensor
    branches: dict[str, dict[str, torch.Tensor]]   # guidance branch -> its row's own transformer inputs
    scheduler: Any
    scale: float                                    # the guidance scale that combines the branches
    split: dict[str, range]                         # expert -> the steps it runs
    states: dict[str, SpectrumState]                # expert -> the request's Spectrum on it (none: no cache)
    shared: dict[str, Any] = field(default_factory=dict)   # inputs both branches' rows take
    condition: Optional[torch.Tensor] = None        # Wan image-to-video: the first frame's mask and latents
    joined: float = field(default_factory=time.perf_counter)
    step: int = 0
    block_rows: int = 0                             # rows it sent through the block stack

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.step]

    @property
    def expert(self) -> str:
        """The expert that runs this request's current step."""
        return next(name for name, steps in self.split.items() if self.step in steps)


@dataclass
class Row:
    """One guidance branch of one request at this tick, and its decision."""

    active: ActiveRequest
    branch: str
    state: Optional[BranchState]      # None: the request runs without Spectrum

    @property
    def real(self) -> bool:
        return self.state is None or self.state.real

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return self.active.branches[self.branch]


class WanRows:
    """Wan2.1 and Wan2.2 rows, as ``WanPipeline`` and ``WanImageToVideoPipeline`` make and call them."""

    def __init__(self, rank_pipeline: RankPipeline):
        if rank_pipeline.pipe.config.get("expand_timesteps"):
            raise ValueError("step batching runs one timestep per sample, not Wan2.2 TI2V's per-token timesteps")
        self.rank_pipeline = rank_pipeline

    def prepare(self, request: GenerationRequest, device: str, dtype: torch.dtype) -> dict:
        rp = self.rank_pipeline
        pipe = rp.pipe
        guided = request.guidance_scale > 1
        positive, negative = pipe.encode_prompt(prompt=request.prompt, negative_prompt=request.negative_prompt,
                                                do_classifier_free_guidance=guided, num_videos_per_prompt=1,
                                                max_sequence_length=text_length(pipe), device=device)
        branches = {"cond": {"encoder_hidden_states": positive.to(dtype)}}
        if guided:
            branches["uncond"] = {"encoder_hidden_states": negative.to(dtype)}
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(step_grid(request)[0], device=device)
        scheduler.set_begin_index(0)
        generator = torch.Generator().manual_seed(request.seed)
        prepared = {"branches": branches, "scheduler": scheduler, "scale": request.guidance_scale}
        first = next(iter(pipeline_experts(pipe).values()))
        if not rp.spec.needs_image:
            prepared["latents"] = pipe.prepare_latents(1, first.config.in_channels, request.height, request.width,
                                                       request.num_frames, torch.float32, device, generator, None)
            return prepared
        image = decode_image(request.image)
        if first.config.image_dim is not None:   # Wan2.1 I2V attends to CLIP tokens; Wan2.2 I2V has none
            prepared["shared"] = {"encoder_hidden_states_image": pipe.encode_image(image, device).to(dtype)}
        frame = pipe.video_processor.preprocess(image, height=request.height, width=request.width)
        prepared["latents"], prepared["condition"] = pipe.prepare_latents(
            frame.to(device, torch.float32), 1, pipe.vae.config.z_dim, request.height, request.width,
            request.num_frames, torch.float32, device, generator, None)
        return prepared

    def call(self, transformer: torch.nn.Module, rows: list[Row]) -> torch.Tensor:
        inputs = [row.active.latents if row.active.condition is None else
                  torch.cat([row.active.latents, row.active.condition], dim=1) for row in rows]
        images = None   # one model in the loop: every request has image embeddings or none does
        if "encoder_hidden_states_image" in rows[0].active.shared:
            images = torch.cat([row.active.shared["encoder_hidden_states_image"] for row in rows])
        return transformer(hidden_states=torch.cat(inputs).to(transformer.dtype),
                           timestep=torch.stack([row.active.timestep for row in rows]),
                           encoder_hidden_states=torch.cat([row.inputs["encoder_hidden_states"] for row in rows]),
                           encoder_hidden_states_image=images, return_dict=False)[0]


class FluxRows:
    """FLUX.1 rows, as ``FluxPipeline`` makes and calls them: distilled guidance as a per-row input,
    true CFG as a second row with the negative prompt's embeddings."""

    def __init__(self, rank_pipeline: RankPipeline):
        self.rank_pipeline = rank_pipeline
        self.text_tokens = flux_text_tokens(rank_pipeline.spec)
        if rank_pipeline.world_size > 1:
            from ..parallel.xdit_setup import set_flux_input_parameters

            set_flux_input_parameters(self.text_tokens)

    def prepare(self, request: GenerationRequest, device: str, dtype: torch.dtype) -> dict:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        pipe = self.rank_pipeline.pipe
        branches = {}
        for branch in guidance_branches(request, "flux"):
            prompt = request.prompt if branch == "cond" else request.negative_prompt or ""
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                          num_images_per_prompt=1,
                                                          max_sequence_length=self.text_tokens)
            branches[branch] = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        generator = torch.Generator().manual_seed(request.seed)
        latents, image_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, request.height,
                                                  request.width, branches["cond"]["encoder_hidden_states"].dtype,
                                                  device, generator, None)
        steps = step_grid(request)[0]
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        shared = {"txt_ids": text_ids, "img_ids": image_ids}
        if pipe.transformer.config.guidance_embeds:
            shared["guidance"] = torch.full([1], request.guidance_scale, device=device, dtype=torch.float32)
        return {"branches": branches, "scheduler": scheduler, "scale": request.true_cfg_scale, "latents": latents,
                "shared": shared}

    def call(self, transformer: torch.nn.Module, rows: list[Row]) -> torch.Tensor:
        shared = rows[0].active.shared   # the ids are the same for one latent shape and text length
        guidance = None
        if "guidance" in shared:
            guidance = torch.cat([row.active.shared["guidance"] for row in rows])
        timestep = torch.cat([row.active.timestep.expand(1).to(row.active.latents.dtype) for row in rows])
        return transformer(hidden_states=torch.cat([row.active.latents for row in rows]), timestep=timestep / 1000,
                           guidance=guidance,
                           pooled_projections=torch.cat([row.inputs["pooled_projections"] for row in rows]),
                           encoder_hidden_states=torch.cat([row.inputs["encoder_hidden_states"] for row in rows]),
                           txt_ids=shared["txt_ids"], img_ids=shared["img_ids"], joint_attention_kwargs={},
                           return_dict=False)[0]


FAMILIES = {"wan": WanRows, "flux": FluxRows}


class StepBatcher:
    """The active requests of one rank and their ticks."""

    def __init__(self, rank_pipeline: RankPipeline):
        self.rank_pipeline = rank_pipeline
        self.rows = FAMILIES[rank_pipeline.spec.family](rank_pipeline)
        self.experts = pipeline_experts(rank_pipeline.pipe)
        self.active: dict[str, ActiveRequest] = {}
        self.policy = RowsPolicy()
        for expert in self.experts.values():
            hook_transformer(expert, self.policy)
        self._composition: Optional[int] = None

    def close(self) -> None:
        """Take the hooks off: the pipeline serves solo calls again."""
        for expert in self.experts.values():
            unhook_transformer(expert)
        self.active.clear()
        self._composition = None

    def join(self, job: str, request: GenerationRequest) -> None:
        """Start ``request`` at its step 0: its embeddings, noise and scheduler, as its pipeline makes them."""
        if job in self.active:
            raise ValueError(f"job {job} is already in the loop")
        rp = self.rank_pipeline
        dtype = next(iter(self.experts.values())).dtype
        with torch.no_grad():
            prepared = self.rows.prepare(request, rp.device, dtype)
        run, config = step_grid(request)
        split = {name: steps for name, steps in expert_steps(rp.pipe, run).items() if steps}
        states = expert_states(config, split) if config is not None else {}
        self.active[job] = ActiveRequest(job, request, split=split, states=states, **prepared)
        self._composition = None

    def drop(self, job: str) -> Optional[int]:
        """Remove ``job`` from the loop; the steps it had done (``None`` if it was not in it)."""
        active = self.active.pop(job, None)
        self._composition = None
        return None if active is None else active.step

    def agree(self, wish: bool) -> bool:
        """Whether every rank runs the next tick: rank 0's ``wish``, and a check that every rank's
        loop holds the same requests, in one all-reduce (max) of ``[wish, fingerprint,
        -fingerprint]``, host integers over the rank pipeline's gloo group. The fingerprint is of
        the requests and their order, recomputed when they change; their steps follow, since every
        rank ticks in lock-step from each request's step 0, and so do their decisions, which the
        requests' own settings and job-wide sums make alike on every rank (docs/method.md, "Ranks
        agree")."""
        rp = self.rank_pipeline
        if rp.world_size == 1:
            return wish
        fingerprint = self.fingerprint()
        values = torch.tensor([int(wish) if rp.rank == 0 else 0, fingerprint, -fingerprint], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=rp.host_group)
        go_on, highest, negated_lowest = values.tolist()
        if highest != -negated_lowest:
            from ..parallel.consistency import verify_agreement

            composition = ", ".join(f"{job} at step {active.step}" for job, active in self.active.items())
            verify_agreement(fingerprint, "step batches",
                             f"This rank's loop: {len(self.active)} requests ({composition[:200]}).", rp.host_group)
        return bool(go_on)

    def fingerprint(self) -> int:
        """A CRC32 of the requests in the loop (each job and its request), in join order."""
        if self._composition is None:
            text = ";".join(f"{job}:{zlib.crc32(active.request.model_dump_json().encode())}"
                            for job, active in self.active.items())
            self._composition = zlib.crc32(text.encode())
        return self._composition

    def tick(self) -> tuple[dict[str, tuple[GenerationRequest, GenerationResult]], int]:
        """One denoising step of every active request: those it finished, with their requests and
        results (latents and reports), and how many rows ran the block stack."""
        groups: dict[tuple, list[Row]] = {}
        for row in self._decide():
            active = row.active
            groups.setdefault((active.expert, tuple(active.latents.shape), row.real), []).append(row)
        outputs, block_rows = {}, 0
        with torch.no_grad():
            for (expert, _, real), rows in groups.items():
                self.policy.set_rows([row.state for row in rows])
                out = self.rows.call(self.experts[expert], rows)
                for index, row in enumerate(rows):
                    outputs[row.active.job, row.branch] = out[index:index + 1]
                    row.active.block_rows += real
                block_rows += len(rows) if real else 0
            finished = {}
            for active in list(self.active.values()):
                noise = outputs[active.job, "cond"]
                if "uncond" in active.branches:
                    uncond = outputs[active.job, "uncond"]
                    noise = uncond + active.scale * (noise - uncond)
                active.latents = active.scheduler.step(noise, active.timestep, active.latents, return_dict=False)[0]
                active.step += 1
                if active.step == active.steps:
                    finished[active.job] = active.request, self._finish(self.active.pop(active.job))
        if finished:
            self._composition = None
        return finished, block_rows

    def _decide(self) -> list[Row]:
        """Every row's decision, each request's from its own Spectrum state on the expert of its step."""
        rows = []
        for active in self.active.values():
            state = active.states.get(active.expert)
            for branch in active.branches:
                begun = state.begin(branch, active.step, active.latents) if state is not None else None
                rows.append(Row(active, branch, begun))
        return rows

    def _finish(self, active: ActiveRequest) -> GenerationResult:
        stats = {}
        for name, state in active.states.items():
            stats[name] = state.stats()
            state.reset()
        report = self.rank_pipeline.report(active.request, stats, peak_state_bytes(stats),
                                           time.perf_counter() - active.joined, active.joined)
        report["block_stack_rows"] = active.block_rows
        return GenerationResult(active.latents, None, report)
