"""FLUX.1 under xDiT's PipeFusion (pipeline parallelism over patches), with or without Spectrum.

PipeFusion (xfuser 0.7.0, ``xfuser/model_executor/pipelines/pipeline_flux.py``,
``xFuserFluxPipeline``) splits the block stack into ``pipefusion_degree`` stages, one per rank
of a pipeline group, and the image tokens into ``num_pipeline_patch`` patches of latent rows.
The first ``warmup_steps`` denoising steps are synchronous (``_sync_pipeline``): the whole
token map goes through stage 0, then stage 1, ...; the last stage makes the scheduler step and
sends the latents back to stage 0. The other steps are asynchronous (``_async_pipeline``):
each stage runs one patch at a time and passes it on, so the stages work on different patches
at once. In that mode every attention layer keeps a key/value buffer of the whole image
(``CacheManager``, ``naive_cache``): a patch writes its own keys and values into it and
attends to all of it, so at step ``i`` patch ``p`` sees the other patches' keys and values as
its stage last computed them: at step ``i`` for the patches before it, at step ``i - 1`` for
the patches after it. In the second stage the text tokens of all patches of a step are those
stage 0 produced for patch 0. Only the last stage holds the final latents.

:func:`pipefusion_flux_pipeline` returns xDiT's own ``xFuserFluxPipeline`` with
:class:`SpectrumPipeFusion` mixed in (same loops, same stage-to-stage messages); without a
Spectrum config it is exactly xDiT's PipeFusion. With a :class:`~spectrum_xdit.SpectrumConfig`
(given at construction or to ``set_spectrum`` between generations):

* **Decision.** Every stage computes the real steps from the config (the paper's schedule,
  which depends only on the step index) and xDiT's synchronous and asynchronous loops are
  given the real steps' timesteps only. So on a forecast step no stage runs its blocks and
  nothing is sent between stages. At the start of each generation one all-gather of a
  schedule fingerprint (``spectrum_xdit.parallel.consistency``) turns differing configs into
  the same error on every rank instead of a hang. Decisions that need measurements (the
  adaptive schedule, ``blend_weight="auto"``) would have to be sent from the last stage to the
  others; they are refused.
* **State.** Only the last stage has Spectrum hooks (``spectrum_xdit.hooks.SpectrumBlockHook``
  on its blocks) and forecaster state: one :class:`~spectrum_xdit.SpectrumForecaster` per
  pipeline patch, for the final block-stack output of that patch's tokens. The fit is per
  element with a design matrix that depends only on the real steps, so the per-patch
  forecasters together are exactly one forecaster of the whole token map, with the same bytes.
  A synchronous step records the whole map split into patches, an asynchronous one the patch it
  ran. Under sequence parallelism too each last-stage rank forecasts the tokens it holds.
* **Forecast steps.** Right after the scheduler step of a real step ``i`` of a patch (or of the
  whole map), the last stage runs the forecast steps ``i + 1 .. j - 1`` up to the next real
  step ``j`` for the same tokens: xDiT's transformer forward with every block skipped and the
  last one returning the forecast (time embedding, output norm with that step's modulation and
  projection run as usual; the blocks' inputs are placeholders of the right shape that hold
  no memory), then the scheduler step. Then xDiT's loop sends the latents of
  step ``j`` on. The forecasts of a patch need only that patch's state, so the patch pipeline
  keeps its overlap.
* **Stale key/value buffers.** A forecast step runs no attention, so it leaves every buffer as
  the last real step wrote it. At the next real step ``j`` a patch therefore attends to the
  later patches' keys and values from the previous real step ``i``, which are ``j - i`` steps
  old instead of PipeFusion's one step (the earlier patches' are fresh, as in PipeFusion). This
  is deliberate: refreshing them would need a synchronous pass of the whole map after every
  forecast span, which gives up the pipelining at every real step after the warm-up; and
  forecasting keys and values of every layer would cost far more state than Spectrum's one
  feature. Measured in ``tests/test_pipefusion.py`` (tiny FLUX.1, 20 steps, gaps up to 4):
  Spectrum under PipeFusion is 4.8e-4 (relative) from Spectrum in one process, where
  PipeFusion's own deviation from one process is 1.7e-4.

The scheduler is told the step index of every call (``_step_index``), because xDiT's wrapper
counts calls and would count only real steps. Forecast steps use the same scheduler step as
real ones, so any scheduler whose state is its step index (FLUX.1's flow-matching Euler) works.

On CPU call :func:`spectrum_xdit.parallel.cpu_support.enable_cpu_support` first: it makes
PipeFusion's stage-to-stage exchange work over gloo.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch

from ..config import SpectrumConfig
from ..forecaster import SpectrumForecaster
from ..hooks import SPECTRUM_BLOCK_HOOK, SpectrumBlockHook
from ..schedule import paper_schedule
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
    ``xFuserFluxPipeline`` (no negative prompt: xDiT's FLUX.1 pipeline has no true CFG); it
    returns the output on the last stage and ``None`` on the others.
    """
    return pipefusion_flux_pipeline_class()(pipeline, engine_config, spectrum)


@functools.cache
def pipefusion_flux_pipeline_class() -> type:
    """``PipeFusionFluxPipeline``: :class:`SpectrumPipeFusion` on xDiT's ``xFuserFluxPipeline``.

    Built on first use, so that importing this module does not import xfuser (on CPU,
    ``enable_cpu_support`` must run before that)."""
    from xfuser.model_executor.pipelines.pipeline_flux import xFuserFluxPipeline

    return types.new_class("PipeFusionFluxPipeline", (SpectrumPipeFusion, xFuserFluxPipeline))


class LastStageSpectrum:
    """Spectrum state of the last pipeline stage: one forecaster per pipeline patch.

    It stands in for ``spectrum_xdit.hooks.SpectrumStack`` with the ``SpectrumBlockHook`` on the
    stage's blocks: the pipeline sets :attr:`step` and :attr:`patch` (``None``: the whole token
    map, in patch order) before each transformer call, and the hooks ask :meth:`begin_call`
    whether the blocks run, hand the last block's output to :meth:`record` and take
    :meth:`forecast` in its place on a forecast step.
    """

    # SpectrumBlockHook's head keeps ``stack.states`` for diffusers' cache contexts; this stack
    # is told its step and patch directly.
    states = None

    def __init__(self, config: SpectrumConfig, real_steps: frozenset):
        self.config = config
        self.real_steps = real_steps
        self.step: Optional[int] = None
        self.patch: Optional[int] = None
        self.run_blocks = True
        self.forecasters: list[SpectrumForecaster] = []
        self.patch_tokens: list[int] = []
        self.peak_state_bytes = 0

    @property
    def active(self) -> "LastStageSpectrum":
        return self

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
        _check_spectrum_config(spectrum)
        super().__init__(pipeline, engine_config)
        self.spectrum_config: Optional[SpectrumConfig] = None
        self.real_steps: Optional[frozenset] = None
        self.last_stage_spectrum: Optional[LastStageSpectrum] = None
        # (step, patch) of every transformer call of the last generation that ran this stage's
        # blocks, in order (patch None: the whole map, a synchronous step), and of the running
        # call, forecasts included
        self.block_calls: list[tuple[int, Optional[int]]] = []
        self.current: Optional[tuple[int, Optional[int]]] = None
        self._step_of: dict[float, int] = {}
        # per patch, what its forecast steps pass to xDiT's forward
        self._forecast_inputs: dict = {}
        self.set_spectrum(spectrum)

    def set_spectrum(self, spectrum: Optional[SpectrumConfig]) -> None:
        """Use ``spectrum`` from the next generation on (``None``: full compute, xDiT as is).

        Every rank must make the same call: the stages' decisions come from it."""
        from diffusers.hooks import HookRegistry
        from xfuser.core.distributed import is_pipeline_last_stage

        _check_spectrum_config(spectrum)
        blocks = [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]
        if self.last_stage_spectrum is not None:
            for block in blocks:
                HookRegistry.check_if_exists_or_initialize(block).remove_hook(SPECTRUM_BLOCK_HOOK, recurse=False)
        self.spectrum_config, self.real_steps, self.last_stage_spectrum = spectrum, None, None
        if spectrum is None:
            return
        self.real_steps = frozenset(paper_schedule(spectrum.num_inference_steps, spectrum.warmup_steps,
                                                   spectrum.window_size, spectrum.flex_window))
        if not is_pipeline_last_stage():
            return
        if not blocks:
            raise ValueError("the last PipeFusion stage holds no transformer blocks")
        self.last_stage_spectrum = LastStageSpectrum(spectrum, self.real_steps)
        for index, block in enumerate(blocks):
            hook = SpectrumBlockHook(self.last_stage_spectrum, is_head=index == 0, is_tail=index == len(blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, SPECTRUM_BLOCK_HOOK)

    def __call__(self, *args, **kwargs):
        self.block_calls = []
        self.current = None
        if self.spectrum_config is not None:
            verify_schedule(types.SimpleNamespace(config=self.spectrum_config, real_steps=self.real_steps))
        return super().__call__(*args, **kwargs)

    # -- xDiT's loops, given the real steps only -------------------------------------------------

    def _sync_pipeline(self, latents, *args, timesteps, sync_only: bool = False, **kwargs):
        """xDiT's synchronous loop, the first of every generation (even with no warm-up)."""
        self._index_timesteps()
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
        all_timesteps = self.scheduler.timesteps
        later_real = [t for t in all_timesteps[len(timesteps):] if self._step_of[float(t)] in self.real_steps]
        # without real steps after this loop, xDiT's asynchronous loop returns at once and would
        # not receive the latents this loop sends back to stage 0 after its last step
        return super()._sync_pipeline(latents, *args, timesteps=real, sync_only=sync_only or not later_real, **kwargs)

    def _async_pipeline(self, latents, *args, timesteps, **kwargs):
        self._index_timesteps()
        if self.spectrum_config is not None:
            timesteps = self._real_timesteps(timesteps)
        return super()._async_pipeline(latents, *args, timesteps=timesteps, **kwargs)

    def _backbone_forward(self, latents, encoder_hidden_states, pooled_prompt_embeds, text_ids,
                          latent_image_ids, guidance, t):
        from xfuser.core.distributed import get_runtime_state

        runtime = get_runtime_state()
        step = self._step_of[float(t)]
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
        step = self._step_of[float(t)]
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

    def _index_timesteps(self) -> None:
        self._step_of = {float(t): index for index, t in enumerate(self.scheduler.timesteps)}

    def _real_timesteps(self, timesteps):
        return [t for t in timesteps if self._step_of[float(t)] in self.real_steps]

    def spectrum_stats(self) -> dict:
        """This stage's view of the last generation (one branch: xDiT's FLUX.1 pipeline has no
        classifier-free guidance): the steps that ran its blocks (``real_steps``, ``nfe`` of
        them), the others (``forecast_steps``, ``forecasts``), the ``(step, patch)`` of every
        call that ran them (``block_calls``) and the peak forecaster state (``state_bytes``,
        0 except on the last stage)."""
        spectrum = self.last_stage_spectrum
        real = sorted({step for step, _ in self.block_calls})
        forecasts = [step for step in range(len(self._step_of)) if step not in real]
        return {
            "real_steps": real,
            "nfe": len(real),
            "forecast_steps": forecasts,
            "forecasts": len(forecasts),
            "block_calls": list(self.block_calls),
            "state_bytes": spectrum.peak_state_bytes if spectrum is not None else 0,
        }


def _check_spectrum_config(spectrum: Optional[SpectrumConfig]) -> None:
    if spectrum is not None and not isinstance(spectrum, SpectrumConfig):
        raise TypeError(f"spectrum must be a SpectrumConfig or None, got {type(spectrum).__name__}")
    if spectrum is not None and spectrum.validates:
        raise NotImplementedError(
            "under PipeFusion Spectrum supports the paper schedule with a fixed blend_weight: the "
            "adaptive schedule and blend_weight='auto' decide from measurements on the last stage, "
            "which the other stages would have to receive")


def _placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor of ``tensor``'s shape, dtype and device that holds no memory (every element is
    one zero): a forecast step skips every block, so their inputs only need the right shape."""
    return torch.zeros((), dtype=tensor.dtype, device=tensor.device).expand(tensor.shape)
