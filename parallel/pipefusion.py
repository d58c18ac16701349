"""FLUX.1 under xDiT's PipeFusion (pipeline parallelism over patches), with or without Spectrum.

:func:`pipefusion_flux_pipeline` returns xDiT's own ``xFuserFluxPipeline`` with
:class:`SpectrumPipeFusion` mixed in (same loops, same stage-to-stage messages); without a
Spectrum config it is exactly xDiT's PipeFusion. With one, every stage runs its blocks and sends
only at the schedule's real steps (the paper schedule, a fixed blend weight), and the last stage
keeps one forecaster per pipeline patch (:class:`LastStageSpectrum`) and runs a patch's forecast
steps right after its real step. A forecast step writes no keys or values, so the later patches'
are from the previous real step. The design and its measured cost: docs/pipefusion.md.

On CPU call :func:`spectrum_xdit.parallel.patches.install` first: it makes PipeFusion's
stage-to-stage exchange work over gloo.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch

from ..config import SettingError, SpectrumConfig
from ..forecaster import SpectrumForecaster
from ..hooks import hook_blocks, unhook_blocks
from ..schedule import fixed_real_steps
from .consistency import verify_schedule
from .xdit_setup import init_xdit_engine


def setup_pipefusion_parallel(
    pipefusion_degree: int = 2,
    num_pipeline_patch: Optional[int] = None,
    warmup_steps: int = 1,
    ulysses_degree: int = 1,
    ring_degree: int = 1,
    dtype: torch.dtype = torch.float32,
    attention_backend: Optional[str] = None,
):
    """Initialise xDiT's process groups for PipeFusion (optionally with sequence parallelism).

    Arguments are xDiT's (``--pipefusion_parallel_degree``, ``--num_pipeline_patch`` (default:
    the degree), ``--warmup_steps``, ``--ulysses_degree``, ``--ring_degree``); the world size
    must be a multiple of ``pipefusion_degree * ulysses_degree * ring_degree``, the rest is
    data parallelism. ``dtype`` is the model's: xDiT sizes its receive buffers with the
    runtime dtype, which its config leaves at float16. Returns xDiT's ``EngineConfig``.
    """
    if pipefusion_degree < 2:
        raise ValueError(f"pipefusion_degree must be at least 2, got {pipefusion_degree}")
    if num_pipeline_patch is not None and num_pipeline_patch < 1:
        raise ValueError(f"num_pipeline_patch must be positive, got {num_pipeline_patch}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    engine_config = init_xdit_engine(ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                                     pipefusion_degree=pipefusion_degree, attention_backend=attention_backend,
                                     num_pipeline_patch=num_pipeline_patch, warmup_steps=warmup_steps)
    engine_config.runtime_config.dtype = dtype
    return engine_config


def pipefusion_flux_pipeline(pipeline, engine_config, spectrum: Optional[SpectrumConfig] = None):
    """xDiT's PipeFusion pipeline for a diffusers ``FluxPipeline``, with Spectrum if given.

    The pipeline's transformer is converted in place (each rank keeps only its stage's blocks),
    so compute anything that needs the whole model first. Call the result like xDiT's
    ``xFuserFluxPipeline`` (``guidance_scale``: FLUX.1's distilled guidance; no negative prompt:
    xDiT's FLUX.1 pipeline has no true CFG); it returns the output on the last stage and ``None``
    on the others.
    """
    return pipefusion_flux_pipeline_class()(pipeline, engine_config, spectrum)


@functools.cache
def pipefusion_flux_pipeline_class() -> type:
    """``PipeFusionFluxPipeline``: :class:`SpectrumPipeFusion` on xDiT's ``xFuserFluxPipeline``.

    Built on first use, so that importing this module does not import xfuser (on CPU,
    ``spectrum_xdit.parallel.patches.install`` must run before that)."""
    from xfuser.model_executor.pipelines.pipeline_flux import xFuserFluxPipeline

    return types.new_class("PipeFusionFluxPipeline", (SpectrumPipeFusion, xFuserFluxPipeline))


class LastStageSpectrum:
    """The :class:`~spectrum_xdit.hooks.BlockStackPolicy` of the last pipeline stage: one
    forecaster per pipeline patch. The pipeline sets :attr:`step` and :attr:`patch` (``None``: the
    whole token map, in patch order) before each transformer call."""

    def __init__(self, config: SpectrumConfig, real_steps: frozenset):
        self.config = config
        self.real_steps = real_steps
        self.step: Optional[int] = None
        self.patch: Optional[int] = None
        self.run_blocks = True
        self.forecasters: list[SpectrumForecaster] = []
        self.patch_tokens: list[int] = []
        self.peak_state_bytes = 0

    def start(self, patch_tokens: list[int]) -> None:
        """A new generation over patches of ``patch_tokens`` tokens each (this rank's share)."""
        self.patch_tokens = list(patch_tokens)
        self.forecasters = [SpectrumForecaster(self.config) for _ in patch_tokens]
        self.peak_state_bytes = 0

    def begin_call(self, hidden_states: torch.Tensor) -> None:
        self.run_blocks = self.step in self.real_steps

    def record(self, features: torch.Tensor) -> None:
        if self.patch is None:
            pieces = features.split(self.patch_tokens, dim=1)
            for forecaster, piece in zip(self.forecasters, pieces):
                forecaster.update(self.step, piece)
        else:
            self.forecasters[self.patch].update(self.step, features)
        self.peak_state_bytes = max(self.peak_state_bytes, self.state_bytes)

    def forecast(self) -> torch.Tensor:
        if self.patch is None:
            return torch.cat([f.forecast(self.step) for f in self.forecasters], dim=1)
        return self.forecasters[self.patch].forecast(self.step)

    @property
    def state_bytes(self) -> int:
        return sum(forecaster.nbytes for forecaster in self.forecasters)

    def reset(self) -> None:
        self.forecasters = []


class SpectrumPipeFusion:
    """Put before xDiT's ``xFuserFluxPipeline`` in a subclass: with a ``SpectrumConfig`` xDiT's
    loops run the real steps only and the last stage forecasts the others (module docstring);
    without one, everything is xDiT's."""

    def __init__(self, pipeline, engine_config, spectrum: Optional[SpectrumConfig] = None):
        from xfuser.core.distributed import get_pipeline_parallel_world_size

        if get_pipeline_parallel_world_size() < 2:
            raise ValueError("PipeFusion needs a pipeline-parallel degree of at least 2 "
                             "(setup_pipefusion_parallel)")
        require_pipefusion_support(spectrum)
        super().__init__(pipeline, engine_config)
        self.spectrum_config: Optional[SpectrumConfig] = None
        self.real_steps: Optional[frozenset] = None
        self.last_stage_spectrum: Optional[LastStageSpectrum] = None
        # (step, patch) of every transformer call of the last generation that ran this stage's
        # blocks, in order (patch None: the whole map, a synchronous step), and of the running
        # call, forecasts included
        self.block_calls: list[tuple[int, Optional[int]]] = []
        self.current: Optional[tuple[int, Optional[int]]] = None
        # the step index of each timestep handed to xDiT's loops, by identity (_timesteps_from)
        self._step_of: dict[int, int] = {}
        self._timesteps: list = []
        # per patch, what its forecast steps pass to xDiT's forward
        self._forecast_inputs: dict = {}
        self.set_spectrum(spectrum)

    def set_spectrum(self, spectrum: Optional[SpectrumConfig]) -> None:
        """Use ``spectrum`` from the next generation on (``None``: full compute, xDiT as is).

        Every rank must make the same call: the stages' decisions come from it."""
        from xfuser.core.distributed import is_pipeline_last_stage

        require_pipefusion_support(spectrum)
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        if self.last_stage_spectrum is not None:
            unhook_blocks(blocks)
        self.spectrum_config, self.real_steps, self.last_stage_spectrum = spectrum, None, None
        if spectrum is None:
            return
        self.real_steps = fixed_real_steps(spectrum)
        if not is_pipeline_last_stage():
            return
        self.last_stage_spectrum = LastStageSpectrum(spectrum, self.real_steps)
        hook_blocks(blocks, self.last_stage_spectrum, returns_text=True)

    def __call__(self, *args, **kwargs):
        self.block_calls = []
        self.current = None
        if self.spectrum_config is not None:
            verify_schedule(self.spectrum_config)
        return super().__call__(*args, **kwargs)

    # -- xDiT's loops, given the real steps only -------------------------------------------------

    def _sync_pipeline(self, latents, *args, timesteps, sync_only: bool = False, **kwargs):
        """xDiT's synchronous loop, the first of every generation (even with no warm-up)."""
        self._step_of, self._timesteps = {}, []
        timesteps = self._timesteps_from(timesteps, first=0)
        if self.spectrum_config is None:
            return super()._sync_pipeline(latents, *args, timesteps=timesteps, sync_only=sync_only, **kwargs)
        steps = len(self.scheduler.timesteps)
        if steps != self.spectrum_config.num_inference_steps:
            raise ValueError(f"the pipeline runs {steps} denoising steps but Spectrum was configured for "
                             f"{self.spectrum_config.num_inference_steps}")
        if self.last_stage_spectrum is not None:
            from xfuser.core.distributed import get_runtime_state

            self.last_stage_spectrum.start(get_runtime_state().pp_patches_token_num)
        real = self._real_timesteps(timesteps)
        later_real = self.real_steps.intersection(range(len(timesteps), steps))
        # without real steps after this loop, xDiT's asynchronous loop returns at once and would
        # not receive the latents this loop sends back to stage 0 after its last step
        return super()._sync_pipeline(latents, *args, timesteps=real, sync_only=sync_only or not later_real, **kwargs)

    def _async_pipeline(self, latents, *args, timesteps, **kwargs):
        timesteps = self._timesteps_from(timesteps, first=len(self.scheduler.timesteps) - len(timesteps))
        if self.spectrum_config is not None:
            timesteps = self._real_timesteps(timesteps)
        return super()._async_pipeline(latents, *args, timesteps=timesteps, **kwargs)

    def _backbone_forward(self, latents, encoder_hidden_states, pooled_prompt_embeds, text_ids,
                          latent_image_ids, guidance, t):
        from xfuser.core.distributed import get_runtime_state

        runtime = get_runtime_state()
        step = self._step_of[id(t)]
        patch = runtime.pipeline_patch_idx if runtime.patch_mode else None
        self.current = (step, patch)
        self.block_calls.append(self.current)
        if self.last_stage_spectrum is not None:
            self.last_stage_spectrum.step, self.last_stage_spectrum.patch = step, patch
            self._forecast_inputs[patch] = dict(
                latents=_placeholder(latents), encoder_hidden_states=_placeholder(encoder_hidden_states),
                pooled_prompt_embeds=pooled_prompt_embeds, text_ids=text_ids,
                latent_image_ids=latent_image_ids, guidance=guidance)
        return super()._backbone_forward(latents, encoder_hidden_states, pooled_prompt_embeds, text_ids,
                                         latent_image_ids, guidance, t)

    def _scheduler_step(self, noise_pred, latents, t):
        if self.spectrum_config is None:
            return super()._scheduler_step(noise_pred, latents, t)
        step = self._step_of[id(t)]
        latents = self._scheduler_step_at(step, noise_pred, latents)
        spectrum = self.last_stage_spectrum
        patch = spectrum.patch
        all_timesteps = self.scheduler.timesteps
        for forecast_step in range(step + 1, len(all_timesteps)):
            if forecast_step in self.real_steps:
                break
            spectrum.step, spectrum.patch = forecast_step, patch
            self.current = (forecast_step, patch)
            noise_pred, _ = super()._backbone_forward(t=all_timesteps[forecast_step], **self._forecast_inputs[patch])
            latents = self._scheduler_step_at(forecast_step, noise_pred, latents)
        return latents

    # -- helpers -------------------------------------------------------------------------------

    def _scheduler_step_at(self, step: int, noise_pred, latents):
        self.scheduler._step_index = step
        return super()._scheduler_step(noise_pred, latents, self.scheduler.timesteps[step])

    def _timesteps_from(self, timesteps, first: int) -> list:
        """The timesteps of one of xDiT's loops (steps ``first`` on) as the tensors the loop will
        hand back, each noted with its step index: found by identity, not by value, whose reading
        would make the host wait for the device at every patch."""
        timesteps = list(timesteps)
        self._timesteps.extend(timesteps)     # alive for the call, so that no id is reused
        self._step_of.update((id(t), first + offset) for offset, t in enumerate(timesteps))
        return timesteps

    def _real_timesteps(self, timesteps):
        return [t for t in timesteps if self._step_of[id(t)] in self.real_steps]

    def spectrum_stats(self) -> dict:
        """This stage's view of the last generation (one branch: xDiT's FLUX.1 pipeline has no
        true classifier-free guidance): the steps that ran its blocks (``real_steps``, ``nfe`` of
        them), the others (``forecast_steps``, ``forecasts``), the ``(step, patch)`` of every
        call that ran them (``block_calls``) and the peak forecaster state (``state_bytes``,
        0 except on the last stage)."""
        spectrum = self.last_stage_spectrum
        real = sorted({step for step, _ in self.block_calls})
        forecasts = [step for step in range(len(self.scheduler.timesteps)) if step not in real]
        return {
            "real_steps": real,
            "nfe": len(real),
            "forecast_steps": forecasts,
            "forecasts": len(forecasts),
            "block_calls": list(self.block_calls),
            "state_bytes": spectrum.peak_state_bytes if spectrum is not None else 0,
        }


def require_pipefusion_support(spectrum: Optional[SpectrumConfig]) -> None:
    """PipeFusion's stages follow the paper schedule with a fixed blend weight only; raises
    :class:`~spectrum_xdit.config.SettingError` naming the setting otherwise."""
    if spectrum is not None and not isinstance(spectrum, SpectrumConfig):
        raise TypeError(f"spectrum must be a SpectrumConfig or None, got {type(spectrum).__name__}")
    if spectrum is not None and spectrum.validates:
        raise SettingError(
            "schedule" if spectrum.schedule != "paper" else "blend_weight",
            "PipeFusion supports the paper schedule with a fixed blend_weight: the adaptive schedule and "
            "blend_weight 'auto' decide from measurements on the last stage, which the other stages would "
            "have to receive")


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of ``tensor``'s shape, dtype and device that holds no memory (every element is
    one zero): a forecast step skips every block, so their inputs only need the right shape."""
    return torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
