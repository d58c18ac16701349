"""The block-stack hook on tiny diffusers Wan2.1 and FLUX.1 pipelines built locally."""

import copy

import pytest
import torch

from spectrum_xdit import SpectrumConfig, apply_spectrum, paper_schedule, remove_spectrum, spectrum_stats
from diffusers.hooks import HookRegistry, ModelHook

from spectrum_xdit.hooks import block_inputs, spectrum_state, unhook_block_inputs
from spectrum_xdit.models.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline, tiny_wan_transformer

STEPS = 50
DEFAULT_REAL = paper_schedule(STEPS, 5, 2, 0.75)
ALL_REAL = SpectrumConfig(num_inference_steps=STEPS, warmup_steps=STEPS)


def _wan(**overrides):
    pipe = build_tiny_wan_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", negative_prompt="blurry", num_inference_steps=STEPS, height=32,
                width=32, num_frames=5, guidance_scale=5.0, output_type="latent")
    call.update(overrides)
    return pipe, pipe.transformer, lambda **kw: pipe(**{**call, **kw}, generator=torch.Generator().manual_seed(7)).frames


def _flux(**overrides):
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=STEPS,
                height=32, width=32, max_sequence_length=16, output_type="latent")
    call.update(overrides)
    return pipe, pipe.transformer, lambda **kw: pipe(**{**call, **kw}, generator=torch.Generator().manual_seed(7)).images


PIPELINES = {"wan": _wan, "flux": _flux}


def _relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class _CallCounter:
    """Counts real executions of a block: hooks on the block's own attention module, which only
    runs when the original block forward does."""

    def __init__(self, block):
        attention = block.attn1 if hasattr(block, "attn1") else block.attn
        self.count = 0
        self.handle = attention.register_forward_pre_hook(self._hit)

    def _hit(self, module, args):
        self.count += 1


def _blocks(transformer):
    if hasattr(transformer, "blocks"):
        return list(transformer.blocks)
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


@pytest.mark.parametrize("model", PIPELINES)
def test_all_real_schedule_is_exact(model):
    _, transformer, run = PIPELINES[model]()
    reference = run()
    apply_spectrum(transformer, ALL_REAL)
    assert torch.equal(run(), reference)
    stats = spectrum_stats(transformer)
    assert set(stats) == {"cond", "uncond"}
    assert all(branch["nfe"] == STEPS and branch["forecasts"] == 0 for branch in stats.values())


@pytest.mark.parametrize("model", PIPELINES)
def test_default_schedule_runs_the_blocks_at_the_real_steps_only(model):
    _, transformer, run = PIPELINES[model]()
    reference = run()
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS))
    counters = [_CallCounter(block) for block in _blocks(transformer)]
    output = run()
    # Two guidance branches, each running every block exactly at the schedule's real steps.
    assert [c.count for c in counters] == [2 * len(DEFAULT_REAL)] * len(counters)
    for branch in spectrum_stats(transformer).values():
        assert branch["real_steps"] == DEFAULT_REAL
        assert branch["forecasts"] == STEPS - len(DEFAULT_REAL)
    assert _relative(output, reference) > 1e-4, "forecasting changed nothing: the blocks were not skipped"
    assert torch.isfinite(output).all()


class _Count(ModelHook):
    def __init__(self, calls, name):
        super().__init__()
        self.calls, self.name = calls, name

    def new_forward(self, module, *args, **kwargs):
        self.calls[self.name] += 1
        return self.fn_ref.original_forward(*args, **kwargs)


@pytest.mark.parametrize("model", PIPELINES)
def test_forecast_steps_skip_what_only_the_blocks_read(model):
    """On a forecast step the rotary embedding and the patch and text embedders (and Wan's
    per-block timestep projection) do not run, and skipping them changes no bit of the output."""
    _, transformer, run = PIPELINES[model]()
    inputs = block_inputs(transformer)
    names = {name for name, module in transformer.named_modules() if any(module is m for m in inputs)}
    expected = ({"rope", "patch_embedding", "condition_embedder.time_proj", "condition_embedder.text_embedder"}
                if model == "wan" else {"x_embedder", "context_embedder", "pos_embed"})
    assert names == expected
    calls = dict.fromkeys(names, 0)
    for name in names:   # registered first, so inside Spectrum's hook: counts what is computed
        HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(name)).register_hook(
            _Count(calls, name), "count")
    config = SpectrumConfig(num_inference_steps=STEPS)
    apply_spectrum(transformer, config)
    skipped = run()
    assert calls == dict.fromkeys(names, 2 * len(DEFAULT_REAL)), "a block input ran on a forecast step"
    remove_spectrum(transformer)
    apply_spectrum(transformer, config)
    unhook_block_inputs(transformer)
    assert torch.equal(run(), skipped)
    assert calls == dict.fromkeys(names, 2 * len(DEFAULT_REAL) + 2 * STEPS)


def test_single_branch_without_guidance():
    _, transformer, run = _wan(guidance_scale=1.0)
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS, flex_window=3.0))
    counter = _CallCounter(transformer.blocks[-1])
    run()
    assert counter.count == len(paper_schedule(STEPS, 5, 2, 3.0))
    assert list(spectrum_stats(transformer)) == ["cond"]


@pytest.mark.parametrize("model", PIPELINES)
def test_remove_restores_the_original_output(model):
    _, transformer, run = PIPELINES[model]()
    keys = list(transformer.state_dict())
    reference = run()
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS))
    assert list(transformer.state_dict()) == keys, "state_dict keys changed"
    run()
    remove_spectrum(transformer)
    assert torch.equal(run(), reference)
    with pytest.raises(ValueError, match="not applied"):
        remove_spectrum(transformer)


@pytest.mark.parametrize("model", PIPELINES)
def test_consecutive_calls_at_different_resolutions_equal_fresh_calls(model):
    config = SpectrumConfig(num_inference_steps=STEPS)
    outputs = []
    for size in [(32, 32), (48, 32), (32, 32)]:
        _, transformer, run = PIPELINES[model]()
        apply_spectrum(transformer, config)
        outputs.append(run(height=size[0], width=size[1]))
    _, transformer, run = PIPELINES[model]()
    apply_spectrum(transformer, config)
    for size, fresh in zip([(32, 32), (48, 32), (32, 32)], outputs):
        assert torch.equal(run(height=size[0], width=size[1]), fresh)


def test_shape_change_without_pipeline_reset_starts_a_new_series():
    """Callers that neither open a cache context nor reset (a bare transformer loop): a new
    feature shape in the middle of a series must not mix histories."""
    config = SpectrumConfig(num_inference_steps=12)
    # Separate builds, not deep copies: a deep copy of a hooked module shares diffusers' hook closures.
    transformer, fresh = tiny_wan_transformer(seed=1), tiny_wan_transformer(seed=1)
    apply_spectrum(transformer, config)
    apply_spectrum(fresh, config)
    text = torch.randn(1, 6, 32)

    def denoise(model, latents, steps):
        outputs = []
        for step in range(steps):
            outputs.append(model(hidden_states=latents * (1 - step / 20), timestep=torch.tensor([999 - 80 * step]),
                                 encoder_hidden_states=text, return_dict=False)[0])
        return torch.stack(outputs)

    small, large = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 4, 1, 8, 12)
    with torch.no_grad():
        denoise(transformer, small, 7)  # interrupted generation
        mixed = denoise(transformer, large, 12)
        clean = denoise(fresh, large, 12)
    assert torch.equal(mixed, clean)
    assert spectrum_stats(transformer)["default"]["real_steps"] == paper_schedule(12, 5, 2, 0.75)


def test_guidance_branches_keep_separate_state():
    """Interleaved cond/uncond calls equal two transformers each driven by one branch alone."""
    config = SpectrumConfig(num_inference_steps=20)
    both, cond_only, uncond_only = (tiny_wan_transformer(seed=2) for _ in range(3))
    for transformer in (both, cond_only, uncond_only):
        apply_spectrum(transformer, config)
    torch.manual_seed(3)
    latents = torch.randn(20, 1, 4, 1, 8, 8)
    cond_text, uncond_text = torch.randn(1, 6, 32), torch.randn(1, 6, 32)

    def call(model, name, step, text):
        with model.cache_context(name, step_index=step, num_inference_steps=20):
            return model(hidden_states=latents[step], timestep=torch.tensor([950 - 45 * step]),
                         encoder_hidden_states=text, return_dict=False)[0]

    with torch.no_grad():
        for step in range(20):
            interleaved = call(both, "cond", step, cond_text), call(both, "uncond", step, uncond_text)
            alone = call(cond_only, "cond", step, cond_text), call(uncond_only, "uncond", step, uncond_text)
            assert torch.equal(interleaved[0], alone[0]) and torch.equal(interleaved[1], alone[1]), step


def test_batch_of_two_equals_each_prompt_alone():
    config = SpectrumConfig(num_inference_steps=STEPS)
    prompts = ["a red fox", "a blue whale"]
    _, transformer, run = _wan(negative_prompt=None)
    apply_spectrum(transformer, config)
    batched = run(prompt=prompts)
    assert batched.shape[0] == 2
    for index, prompt in enumerate(prompts):
        _, single_transformer, single_run = _wan(negative_prompt=None)
        apply_spectrum(single_transformer, config)
        generator = torch.Generator().manual_seed(7)
        noise = torch.randn(2, *batched.shape[1:], generator=generator)[index:index + 1]
        alone = single_run(prompt=prompt, latents=noise)
        assert _relative(batched[index:index + 1], alone) < 1e-5


def test_bf16_transformer_keeps_dtype():
    config = SpectrumConfig(num_inference_steps=10)
    transformer = tiny_wan_transformer(seed=4).to(torch.bfloat16)
    reference = copy.deepcopy(transformer)
    apply_spectrum(transformer, config)
    latents, text = torch.randn(1, 4, 1, 8, 8, dtype=torch.bfloat16), torch.randn(1, 6, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        for step in range(10):
            kwargs = dict(hidden_states=latents, timestep=torch.tensor([900 - 90 * step]),
                          encoder_hidden_states=text, return_dict=False)
            with transformer.cache_context("cond", step_index=step):
                out = transformer(**kwargs)[0]
            full = reference(**kwargs)[0]
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            if step < 5:
                assert torch.equal(out, full)
    assert spectrum_stats(transformer)["cond"]["forecasts"] == 10 - len(paper_schedule(10, 5, 2, 0.75))


def test_misuse_raises_clear_errors():
    pipe, transformer, run = _wan()
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=30))
    with pytest.raises(ValueError, match="already applied"):
        apply_spectrum(transformer, SpectrumConfig())
    with pytest.raises(ValueError, match=r"runs 50 denoising steps.*num_inference_steps=50"):
        run()
    with pytest.raises(ValueError, match="supports FluxTransformer2DModel, WanTransformer3DModel"):
        apply_spectrum(torch.nn.Linear(2, 2), SpectrumConfig())
    with pytest.raises(TypeError, match="SpectrumConfig"):
        apply_spectrum(pipe.vae, {"degree": 4})


def test_a_transformer_that_runs_part_of_the_steps_counts_its_own():
    """An expert of a two-expert pipeline: steps 3-7 of 8 run its own 5-step schedule (warm-up
    first), the stats name the pipeline's steps, and its state is freed after its last step."""
    transformer = tiny_wan_transformer(seed=5)
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=5, warmup_steps=2), first_step=3, total_steps=8)
    state = spectrum_state(transformer)
    latents, text = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 6, 32)

    def call(step, total=8):
        with transformer.cache_context("cond", step_index=step, num_inference_steps=total):
            return transformer(hidden_states=latents, timestep=torch.tensor([900 - 100 * step]),
                               encoder_hidden_states=text, return_dict=False)[0]

    with torch.no_grad():
        with pytest.raises(ValueError, match=r"step index 2 is outside the steps 3 \.\. 7"):
            call(2)
        for step in range(3, 8):
            call(step)
            held = state.branches["cond"].forecaster.nbytes
            assert (held == 0) == (step == 7), (step, held)
        with pytest.raises(ValueError, match=r"runs 9 denoising steps .* configured for 8.*apply_spectrum_to_pipeline"):
            call(3, total=9)
    stats = spectrum_stats(transformer)["cond"]
    assert stats["real_steps"] == [3 + s for s in paper_schedule(5, 2, 2, 0.75)] == [3, 4, 6]
    assert stats["forecast_steps"] == [5, 7] and stats["state_bytes"] > 0
    with pytest.raises(ValueError, match="must lie within total_steps 6"):
        apply_spectrum(tiny_wan_transformer(seed=5), SpectrumConfig(num_inference_steps=5), first_step=3, total_steps=6)
