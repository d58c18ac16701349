"""The shipped trained digits model: loads offline, draws the conditioned digit, and Spectrum on
it stays close to full compute."""

import torch

from benchmarks.digits_classifier import load_classifier
from spectrum_xdit import SpectrumConfig, apply_spectrum, spectrum_stats
from spectrum_xdit.models.digits_wan import GENERATION_KWARGS, build_digits_wan_pipeline
from skimage.metrics import peak_signal_noise_ratio


def _frames_to_classifier_input(frames):
    # (T, H, W, 3) in [0, 1] -> (T, H, W) grey in [-1, 1], the classifier's input range
    return torch.from_numpy(frames[..., 0]).float() * 2 - 1


def test_digits_wan_draws_the_prompted_digit_and_spectrum_stays_close():
    pipe = build_digits_wan_pipeline()
    classifier = load_classifier()

    def generate():
        return pipe("digit 3 moving left", guidance_scale=5.0, num_inference_steps=50, output_type="np",
                    generator=torch.Generator().manual_seed(1), **GENERATION_KWARGS).frames[0]

    full = generate()
    with torch.no_grad():
        predicted = classifier(_frames_to_classifier_input(full)).argmax(1)
    assert (predicted == 3).float().mean().item() >= 0.8, predicted.tolist()

    apply_spectrum(pipe.transformer, SpectrumConfig())
    fast = generate()
    assert all(branch["nfe"] == 14 for branch in spectrum_stats(pipe.transformer).values())
    quality = peak_signal_noise_ratio(full, fast, data_range=1.0)
    assert 20.0 < quality < float("inf"), quality
