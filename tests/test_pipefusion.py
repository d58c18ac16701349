"""xDiT's PipeFusion for FLUX.1 on CPU processes over gloo, with and without Spectrum.

Two launches: PipeFusion degree 2 with 4 patches (two gloo ranks), and PipeFusion 2 x Ulysses 2
with 2 patches (four ranks; Ulysses is exact, so the semantics are PipeFusion's). Every rank
computes, in one process:
plain diffusers ``FluxPipeline`` with and without Spectrum, and the *reference* below with and
without Spectrum. Then it runs xDiT's own PipeFusion pipeline (``xFuserFluxPipeline``, through
``spectrum_xdit.parallel.pipefusion``) four times: full compute and Spectrum, each with xDiT's
synchronous warm-up covering every step and with a short warm-up.

The reference: PipeFusion is exact during its synchronous warm-up, and afterwards an
approximation with these semantics, which ``_pipefusion_reference`` computes in one process
from the diffusers transformer (its own attention processor, blocks called one by one):

* the image tokens are cut into patches of latent rows; the steps after the warm-up run patch
  by patch, each patch through stage 0's blocks then stage 1's;
* every attention layer keeps a key/value buffer of the whole image: a synchronous step writes
  all of it, a patch writes its rows, and attends to the text keys plus the whole buffer;
* stage 1 gets, for every patch of a step, the text tokens stage 0 produced for patch 0;
* with Spectrum: the block stack runs only at the schedule's real steps, nothing touches the
  buffers on a forecast step, and the forecast is one ``SpectrumForecaster`` of the whole map
  (PipeFusion keeps one per patch; the fit is per element, so they must agree).

Checks: PipeFusion equals one process when the warm-up covers every step (full compute and
Spectrum), equals the reference after a short warm-up, and its deviation from one process is
PipeFusion's own (stale keys and values). Spectrum under PipeFusion: the blocks of every stage
run exactly at the real steps, each stage sends only for the real steps, the forecaster state
lives on the last stage only with the single-process bytes, and the output is within the
tolerance explained at ``test_spectrum_under_pipefusion_is_close_to_one_process``.
"""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectrum_xdit.parallel.testing import DistributedError, DistributedTimeout, run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]

STEPS = 20
TEXT_TOKENS = 16
HEIGHT = WIDTH = 16  # 4 x 4 packed latents: 16 image tokens in 4 rows
GUIDANCE = 2.5       # FLUX.1's distilled guidance; not the pipelines' default 3.5, so that the reference checks it
CALL = dict(prompt="a red square", height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            max_sequence_length=TEXT_TOKENS, output_type="latent")
# name: (Ulysses degree, pipeline patches, PipeFusion warm-up steps); PipeFusion degree 2
LAUNCHES = {"pipefusion2_patches4_warmup2": (1, 4, 2), "pipefusion2_x_ulysses2_patches2_warmup1": (2, 2, 1)}
EXACT = 1e-5
LAUNCH_TIMEOUT = 200.0


# ---- the reference: PipeFusion's semantics in one process -----------------------------------

class _KeyValueBuffer:
    """diffusers' ``FluxAttnProcessor`` with PipeFusion's key/value buffer of the image tokens.

    ``window.tokens`` is ``None`` for the whole map (writes the whole buffer) or the
    ``(start, end)`` image tokens of the running patch (writes those rows); the queries attend
    to the text keys and the whole buffer.
    """

    def __init__(self, window):
        self.window = window
        self.keys = self.values = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            text_query, text_key, text_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if self.window.tokens is None:
            self.keys, self.values = key[:, TEXT_TOKENS:].clone(), value[:, TEXT_TOKENS:].clone()
        else:
            start, end = self.window.tokens
            self.keys[:, start:end] = key[:, TEXT_TOKENS:]
            self.values[:, start:end] = value[:, TEXT_TOKENS:]
        key = torch.cat([key[:, :TEXT_TOKENS], self.keys], dim=1)
        value = torch.cat([value[:, :TEXT_TOKENS], self.values], dim=1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, out = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(text_out)


def _pipefusion_reference(pipe, num_patches: int, warmup_steps: int, config=None) -> torch.Tensor:
    """PipeFusion (degree 2) in one process, with Spectrum if ``config``; packed latents."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from spectrum_xdit import SpectrumForecaster, paper_schedule

    transformer, scheduler = pipe.transformer, pipe.scheduler
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=CALL["prompt"], prompt_2=None, max_sequence_length=TEXT_TOKENS)
    latents, image_ids = pipe.prepare_latents(
        1, transformer.config.in_channels // 4, HEIGHT, WIDTH, prompt_embeds.dtype, torch.device("cpu"),
        torch.Generator().manual_seed(0))
    mu = calculate_shift(latents.shape[1], scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                         scheduler.config.base_shift, scheduler.config.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", None, np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)

    window = types.SimpleNamespace(tokens=None)
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    for block in blocks:
        block.attn.set_processor(_KeyValueBuffer(window))
    per_stage = math.ceil(len(blocks) / 2)
    stages = (blocks[:per_stage], blocks[per_stage:])
    rows = HEIGHT // (pipe.vae_scale_factor * 2)
    columns = latents.shape[1] // rows
    rows_per_patch = math.ceil(rows / num_patches)
    patches = [(r * columns, min(r + rows_per_patch, rows) * columns) for r in range(0, rows, rows_per_patch)]

    guidance = torch.full([1], GUIDANCE, dtype=latents.dtype) * 1000   # as the transformer scales it
    real = set(range(STEPS)) if config is None else set(
        paper_schedule(STEPS, config.warmup_steps, config.window_size, config.flex_window))
    forecaster = None if config is None else SpectrumForecaster(config)

    def run(stage, hidden, text, temb, rope):
        for block in stage:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rope)
        return text, hidden

    def scheduler_step(step, noise, sample):
        scheduler._step_index = step
        return scheduler.step(noise, timesteps[step], sample, return_dict=False)[0]

    with torch.no_grad():
        for step, t in enumerate(timesteps):
            timestep = t.expand(1).to(latents.dtype) / 1000
            temb = transformer.time_text_embed(timestep.to(latents.dtype) * 1000, guidance, pooled)
            if step not in real:
                noise = transformer.proj_out(transformer.norm_out(forecaster.forecast(step), temb))
                latents = scheduler_step(step, noise, latents)
                continue
            pieces = [None] if step < warmup_steps else patches
            outputs, noises, boundary_text = [], [], None
            for piece in pieces:
                window.tokens = piece
                start, end = piece or (0, latents.shape[1])
                rope = transformer.pos_embed(torch.cat([text_ids, image_ids[start:end]]))
                text, hidden = run(stages[0], transformer.x_embedder(latents[:, start:end]),
                                   transformer.context_embedder(prompt_embeds), temb, rope)
                boundary_text = text if boundary_text is None else boundary_text
                _, hidden = run(stages[1], hidden, boundary_text, temb, rope)
                outputs.append(hidden)
                noises.append(transformer.proj_out(transformer.norm_out(hidden, temb)))
            if forecaster is not None:
                forecaster.update(step, torch.cat(outputs, dim=1))
            latents = scheduler_step(step, torch.cat(noises, dim=1), latents)
    return latents


# ---- rank side ------------------------------------------------------------------------------

def _expected_sends(last_stage: bool, real_steps, warmup_steps: int, num_patches: int) -> int:
    """Stage-to-stage sends xDiT's loops make for these real steps (degree 2).

    Stage 0 sends latents and text tokens after each synchronous step, text once and every
    patch after each asynchronous one. The last stage sends the latents back after each
    synchronous step (not after the last when no asynchronous step follows) and every patch
    after each asynchronous step but the last.
    """
    synchronous = [s for s in real_steps if s < warmup_steps]
    asynchronous = [s for s in real_steps if s >= warmup_steps]
    if not last_stage:
        return 2 * len(synchronous) + (1 + num_patches) * len(asynchronous)
    return len(synchronous) - (0 if asynchronous else 1) + num_patches * max(len(asynchronous) - 1, 0)


class _Observer:
    """Records, on this rank, each attention layer's calls and the stage-to-stage sends."""

    def __init__(self, xdit_pipe):
        from xfuser.core.distributed import get_pp_group

        self.pipe = xdit_pipe
        transformer = xdit_pipe.transformer
        self.attention_calls = []
        for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
            calls = []
            block.attn.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(xdit_pipe.current))
            self.attention_calls.append(calls)
        self.sends = 0
        group = get_pp_group()
        for name in ("pipeline_send", "pipeline_isend"):
            setattr(group, name, self._counting(getattr(group, name)))

    def _counting(self, method):
        def counted(*args, **kwargs):
            self.sends += 1
            return method(*args, **kwargs)
        return counted

    def generate(self, spectrum, warmup_steps: int, **call) -> dict:
        """One generation with xDiT's warm-up set to ``warmup_steps``; what every rank saw."""
        import torch.distributed as dist
        from xfuser.core.distributed import get_runtime_state, is_pipeline_last_stage

        for calls in self.attention_calls:
            calls.clear()
        self.sends = 0
        self.pipe.set_spectrum(spectrum)
        runtime = get_runtime_state().runtime_config
        configured_warmup, runtime.warmup_steps = runtime.warmup_steps, warmup_steps
        try:
            output = self.pipe(generator=torch.Generator().manual_seed(0), **dict(CALL, **call))
        finally:
            runtime.warmup_steps = configured_warmup
        observed = dict(self.pipe.spectrum_stats(), attention_calls=[list(c) for c in self.attention_calls],
                        sends=self.sends, last_stage=is_pipeline_last_stage())
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (None if output is None else output.images, observed))
        return {"latents": per_rank[-1][0], "ranks": [observed for _, observed in per_rank]}


def _failure(action) -> str:
    try:
        action()
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def _pipefusion_checks(ulysses_degree: int, num_patches: int, warmup_steps: int) -> dict:
    from spectrum_xdit.parallel import patches

    patches.install()
    import torch.distributed as dist

    from spectrum_xdit import SpectrumConfig, apply_spectrum, spectrum_stats
    from spectrum_xdit.models.tiny import build_tiny_flux_pipeline
    from spectrum_xdit.parallel.pipefusion import pipefusion_flux_pipeline, setup_pipefusion_parallel

    config = SpectrumConfig(num_inference_steps=STEPS)
    engine_config = setup_pipefusion_parallel(pipefusion_degree=2, num_pipeline_patch=num_patches,
                                              warmup_steps=warmup_steps, ulysses_degree=ulysses_degree)

    def fresh():
        pipe = build_tiny_flux_pipeline(seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    with torch.no_grad():
        single = fresh()(generator=torch.Generator().manual_seed(0), **CALL).images
        spectrum_pipe = fresh()
        apply_spectrum(spectrum_pipe.transformer, config)
        single_spectrum = spectrum_pipe(generator=torch.Generator().manual_seed(0), **CALL).images
        single_stats = spectrum_stats(spectrum_pipe.transformer)["cond"]
        reference = _pipefusion_reference(fresh(), num_patches, warmup_steps)
        reference_spectrum = _pipefusion_reference(fresh(), num_patches, warmup_steps, config)
    # one PipeFusion pipeline for every generation, Spectrum switched on and off between them
    observer = _Observer(pipefusion_flux_pipeline(fresh(), engine_config))
    runs = {
        (name, warmup): observer.generate(spectrum, warmup)
        for warmup in (STEPS, warmup_steps)
        for name, spectrum in (("full", None), ("spectrum", config))
    }
    divergent = SpectrumConfig(num_inference_steps=STEPS, flex_window=0.75 + dist.get_rank())
    failures = {
        "divergent_schedules": _failure(lambda: observer.generate(divergent, warmup_steps)),
        "other_step_count": _failure(lambda: observer.generate(config, warmup_steps, num_inference_steps=STEPS - 2)),
    }
    after_failures = observer.generate(config, warmup_steps)["latents"]
    return {"single": single, "single_spectrum": single_spectrum, "single_stats": single_stats,
            "reference": reference, "reference_spectrum": reference_spectrum, "runs": runs,
            "real_steps": sorted(single_stats["real_steps"]), "failures": failures,
            "after_failures": after_failures}


# ---- test side ------------------------------------------------------------------------------

_results: dict = {}


def _launch(name: str) -> dict:
    """One launch per layout, shared by its tests; a failed launch is not retried."""
    if name not in _results:
        try:
            ulysses_degree = LAUNCHES[name][0]
            _results[name] = run_distributed(_pipefusion_checks, world_size=2 * ulysses_degree,
                                             args=LAUNCHES[name], timeout=LAUNCH_TIMEOUT)
        except (DistributedError, DistributedTimeout) as error:
            _results[name] = error
    if isinstance(_results[name], Exception):
        raise _results[name]
    return _results[name]


def _error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("launch", LAUNCHES)
def test_pipefusion_with_warmup_over_every_step_equals_one_process(launch):
    result = _launch(launch)
    full = _error(result["runs"]["full", STEPS]["latents"], result["single"])
    spectrum = _error(result["runs"]["spectrum", STEPS]["latents"], result["single_spectrum"])
    print(f"{launch}: synchronous PipeFusion vs one process {full:.2e}, with Spectrum {spectrum:.2e}")
    assert full <= EXACT and spectrum <= EXACT


@pytest.mark.parametrize("launch", LAUNCHES)
def test_pipefusion_after_warmup_follows_the_reference_semantics(launch):
    """Patch-pipelined steps: exactly the reference; off one process by the stale keys/values."""
    result = _launch(launch)
    full = result["runs"]["full", LAUNCHES[launch][2]]["latents"]
    to_reference = _error(full, result["reference"])
    to_single = _error(full, result["single"])
    print(f"{launch}: PipeFusion vs reference {to_reference:.2e}, vs one process {to_single:.2e}")
    assert to_reference <= EXACT
    # the asynchronous path did run, and is the small approximation PipeFusion is
    assert 10 * EXACT < to_single < 1e-2


@pytest.mark.parametrize("launch", LAUNCHES)
def test_spectrum_under_pipefusion_follows_the_reference_semantics(launch):
    result = _launch(launch)
    error = _error(result["runs"]["spectrum", LAUNCHES[launch][2]]["latents"], result["reference_spectrum"])
    print(f"{launch}: Spectrum under PipeFusion vs reference {error:.2e}")
    assert error <= EXACT


@pytest.mark.parametrize("launch", LAUNCHES)
def test_spectrum_under_pipefusion_is_close_to_one_process(launch):
    """Tolerance from PipeFusion's own deviation ``d`` (full compute, same warm-up and patches).

    PipeFusion's error comes from keys and values one step old. Under Spectrum they are as
    old as the gap between two real steps (a forecast step writes none), at most ``g`` steps,
    so the error of each real step's features grows up to ``g``-fold, and the forecasts carry
    those features on: the tolerance is ``2 g d``. It is far below Spectrum's own deviation
    from full compute, so it does test something.
    """
    result = _launch(launch)
    warmup = LAUNCHES[launch][2]
    pipefusion_deviation = _error(result["runs"]["full", warmup]["latents"], result["single"])
    real = result["real_steps"]
    largest_gap = max(b - a for a, b in zip(real, real[1:]))
    tolerance = 2 * largest_gap * pipefusion_deviation
    error = _error(result["runs"]["spectrum", warmup]["latents"], result["single_spectrum"])
    spectrum_deviation = _error(result["single_spectrum"], result["single"])
    print(f"{launch}: Spectrum under PipeFusion vs Spectrum in one process {error:.2e} (tolerance "
          f"{tolerance:.2e} = 2 x gap {largest_gap} x PipeFusion's {pipefusion_deviation:.2e}; Spectrum's own "
          f"deviation {spectrum_deviation:.2e})")
    assert error <= tolerance < spectrum_deviation


@pytest.mark.parametrize("launch", LAUNCHES)
def test_every_stage_runs_its_blocks_exactly_at_the_real_steps(launch):
    result = _launch(launch)
    num_patches = LAUNCHES[launch][1]
    real = result["real_steps"]
    assert 0 < len(real) < STEPS
    for name, run_warmup in result["runs"]:
        steps = list(range(STEPS)) if name == "full" else real
        expected_calls = [(s, None) if s < run_warmup else (s, p) for s in steps
                          for p in ([None] if s < run_warmup else range(num_patches))]
        expected_calls = list(dict.fromkeys(expected_calls))
        for stage, observed in enumerate(result["runs"][name, run_warmup]["ranks"]):
            assert observed["block_calls"] == expected_calls, (name, run_warmup, stage)
            for attention in observed["attention_calls"]:
                assert attention == expected_calls, (name, run_warmup, stage)
            assert observed["real_steps"] == steps


@pytest.mark.parametrize("launch", LAUNCHES)
def test_no_stage_sends_anything_for_a_forecast_step(launch):
    result = _launch(launch)
    num_patches = LAUNCHES[launch][1]
    for (name, run_warmup), run in result["runs"].items():
        steps = list(range(STEPS)) if name == "full" else result["real_steps"]
        for observed in run["ranks"]:
            assert observed["sends"] == _expected_sends(observed["last_stage"], steps, run_warmup, num_patches), (
                name, run_warmup, observed["last_stage"])


@pytest.mark.parametrize("launch", LAUNCHES)
def test_forecaster_state_lives_on_the_last_stage_only(launch):
    """Under Ulysses each last-stage rank forecasts its share of the tokens."""
    result = _launch(launch)
    ulysses_degree = LAUNCHES[launch][0]
    for (name, run_warmup), run in result["runs"].items():
        for observed in run["ranks"]:
            if observed["last_stage"] and name == "spectrum":
                assert observed["state_bytes"] * ulysses_degree == result["single_stats"]["state_bytes"]
            else:
                assert observed["state_bytes"] == 0
        assert sum(observed["last_stage"] for observed in run["ranks"]) == ulysses_degree


@pytest.mark.parametrize("launch", LAUNCHES)
def test_mismatches_fail_clearly_on_every_rank_and_leave_the_pipeline_usable(launch):
    result = _launch(launch)
    failures = result["failures"]
    assert "Spectrum schedules differ across ranks" in failures["divergent_schedules"]
    assert f"runs {STEPS - 2} denoising steps but Spectrum was configured for {STEPS}" in failures["other_step_count"]
    assert torch.equal(result["after_failures"], result["runs"]["spectrum", LAUNCHES[launch][2]]["latents"])
