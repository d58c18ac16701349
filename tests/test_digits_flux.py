"""The shipped trained FLUX digits model: loads offline with the settings its spec promises, draws
the prompted digit at the prompted place, and Spectrum runs both of its block lists."""

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio

from benchmarks.digits_classifier import centroid_side, load_classifier
from spectrum_xdit import SpectrumConfig, apply_spectrum, remove_spectrum, spectrum_stats
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import RankPipeline
from spectrum_xdit.models import resolve_model
from spectrum_xdit.models.digits_flux import GENERATION_KWARGS, TRUE_CFG_SCALE, build_digits_flux_pipeline

STEPS = 20


@pytest.fixture(scope="module")
def pipe():
    return build_digits_flux_pipeline()


def generate(pipe, prompt: str, seed: int = 1):
    """(H, W) grey in [0, 1], guided as the model was evaluated."""
    image = pipe(prompt, negative_prompt="", true_cfg_scale=TRUE_CFG_SCALE, num_inference_steps=STEPS,
                 output_type="np", generator=torch.Generator().manual_seed(seed), **GENERATION_KWARGS).images[0]
    return image.mean(axis=-1)


def test_the_spec_and_the_runner_give_the_trained_settings(pipe):
    spec = resolve_model("digits-flux")
    assert spec.family == "flux" and spec.num_attention_heads == pipe.transformer.config.num_attention_heads
    assert (spec.height, spec.width) == (GENERATION_KWARGS["height"], GENERATION_KWARGS["width"])
    assert (spec.max_sequence_length, spec.true_cfg_scale) == (GENERATION_KWARGS["max_sequence_length"], TRUE_CFG_SCALE)
    # FluxPipeline's own arithmetic on the pass-through VAE: no downsampling, 2x2 packing, 64 tokens
    assert pipe.vae_scale_factor == 1 and spec.sizes.tokens(spec.height, spec.width, 1) == 64
    request = parse_request({"prompt": "digit 3 at top"}, model_defaults(spec))
    call = RankPipeline(spec, pipe, 0, ParallelLayout(), "cpu")._pipeline_call(request)
    assert call["max_sequence_length"] == GENERATION_KWARGS["max_sequence_length"]
    assert call["true_cfg_scale"] == TRUE_CFG_SCALE and call["negative_prompt"] == ""


def test_the_pass_through_vae_round_trips_grey_images(pipe):
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    latents = pipe.vae.encode(grey.repeat(1, 3, 1, 1)).latent_dist.mode()
    assert latents.shape == (2, 1, 16, 16)
    assert torch.allclose(pipe.vae.decode(latents).sample, grey.repeat(1, 3, 1, 1))


@pytest.mark.parametrize("digit,position", [(3, "left"), (7, "bottom")])
def test_it_draws_the_prompted_digit_at_the_prompted_place(pipe, digit, position):
    image = generate(pipe, f"digit {digit} at {position}")
    with torch.no_grad():
        predicted = load_classifier()(torch.from_numpy(image * 2 - 1).float()[None]).argmax(1).item()
    assert (predicted, centroid_side(image)) == (digit, position)


def test_spectrum_forecasts_both_block_lists(pipe):
    """Every double- and single-stream block runs on the real steps only, in both guidance branches."""
    transformer = pipe.transformer
    full = generate(pipe, "digit 5 at right")
    runs = {}
    blocks = [(f"double {i}", b.ff) for i, b in enumerate(transformer.transformer_blocks)] + \
             [(f"single {i}", b.proj_mlp) for i, b in enumerate(transformer.single_transformer_blocks)]
    handles = [ff.register_forward_pre_hook(lambda m, a, name=name: runs.__setitem__(name, runs.get(name, 0) + 1))
               for name, ff in blocks]
    apply_spectrum(transformer, SpectrumConfig(num_inference_steps=STEPS))
    try:
        fast = generate(pipe, "digit 5 at right")
        stats = spectrum_stats(transformer)
    finally:
        remove_spectrum(transformer)
        for handle in handles:
            handle.remove()
    assert set(stats) == {"cond", "uncond"}
    nfe = stats["cond"]["nfe"]
    assert stats["uncond"]["nfe"] == nfe < STEPS
    assert runs == {name: 2 * nfe for name, _ in blocks}
    quality = peak_signal_noise_ratio(full, fast, data_range=1.0)
    assert 15.0 < quality < float("inf"), quality
