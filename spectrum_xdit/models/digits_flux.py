"""The trained FLUX digits model: a miniature FLUX.1-architecture text-to-image ``FluxPipeline``
(a handwritten digit at the left, right, top or bottom of a 16x16 grey image), rebuilt from the
assets shipped beside this module with no model-hub access.

The transformer is a ``FluxTransformer2DModel`` (double-stream and single-stream blocks, see
``transformer_config.json``) trained with the rectified-flow objective
(``benchmarks/train_digits_flux.py``, which also builds the word-level tokenizer and the frozen tiny
CLIP (pooled) and T5 text encoders whose weights ship here). The VAE is :class:`PassThroughFluxVAE`:
the latents are the pixels, so FluxPipeline's own 2x2 packing makes the 64 image tokens.

Guidance: the model is not guidance-distilled (``guidance_embeds=False``, ``guidance_scale`` is
ignored): distilling FLUX.1-dev's embedded guidance needs a guided teacher. It was trained with 10%
empty prompts instead, so it takes true classifier-free guidance as FLUX.1 pipelines do
(``true_cfg_scale`` with ``negative_prompt=""``, two transformer calls per step).
``TRUE_CFG_SCALE`` is the smallest scale with the best recognition at full compute
(``eval_info.json``; the figures: docs/models.md).

Generate at ``GENERATION_KWARGS``: 16x16 and ``max_sequence_length`` 16. FLUX attends jointly over
every T5 position with no padding mask, so the model only knows the text length it was trained at;
FluxPipeline's defaults (1024x1024, 512 tokens) are far outside what it was trained on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, load_model
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

ASSETS = Path(__file__).resolve().parent / "assets" / "digits_flux"

HEIGHT = 16
WIDTH = 16
MAX_SEQUENCE_LENGTH = 16   # T5 positions; trained at exactly this length
CLIP_LENGTH = 8            # the CLIP tokenizer's model_max_length, which FluxPipeline pads to
GENERATION_KWARGS = {"height": HEIGHT, "width": WIDTH, "max_sequence_length": MAX_SEQUENCE_LENGTH}
TRUE_CFG_SCALE = 2.0
# FLUX's resolution-dependent shift exp(mu), held at 3 for every size: the model only knows 16x16
# (64 tokens), where FLUX.1's own rule (0.5 at 256 tokens) would extrapolate to 1.6; 3 is the
# digits Wan model's shift, and training draws its sigmas with it.
FLOW_SHIFT = 3.0


class PassThroughFluxVAE(ModelMixin, ConfigMixin):
    """A weightless, lossless "autoencoder" that satisfies everything ``FluxPipeline`` reads from ``self.vae``.

    Latents are the grey pixels themselves (one channel in [-1, 1]), so the pipeline's arithmetic
    holds unchanged: ``vae_scale_factor = 2 ** (len(block_out_channels) - 1) = 1``, the latent is
    ``(B, 1, H, W)`` and FluxPipeline packs its 2x2 patches into ``H/2 * W/2`` tokens of 4 channels
    (the transformer's ``in_channels``); sides must be even. ``scaling_factor = 1`` and
    ``shift_factor = 0`` make the pipeline's un-normalisation the identity. ``decode`` clamps to
    [-1, 1] and repeats the grey channel ``out_channels`` (3) times: the RGB image in [-1, 1] that
    diffusers' ``VaeImageProcessor`` post-processes, as ``(image,)`` with ``return_dict=False``.
    ``encode`` is the exact inverse (RGB averaged to grey) with a point-mass posterior. A single
    non-persistent buffer carries the dtype/device the pipeline queries.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 1,
                 block_out_channels: list[int] = [1], scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        if latent_channels != 1:
            raise ValueError(f"latent_channels must be 1 (the grey pixels), got {latent_channels}")
        if len(block_out_channels) != 1:
            raise ValueError("block_out_channels must have one entry: FluxPipeline's vae_scale_factor is "
                             f"2 ** (len - 1) and the pixels are not downsampled, got {block_out_channels}")
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """(B, C, H, W) pixels in [-1, 1] -> the point-mass posterior of (B, 1, H, W) latents."""
        z = x.mean(dim=1, keepdim=True)
        posterior = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        image = z.clamp(-1.0, 1.0).repeat(1, self.config.out_channels, 1, 1)
        if not return_dict:
            return (image,)
        return DecoderOutput(sample=image)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(sample, return_dict=return_dict)


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's sampler (Euler, dynamic shifting) with ``mu = ln FLOW_SHIFT`` at every image size."""
    mu = math.log(FLOW_SHIFT)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=mu,
                                           max_shift=mu, base_image_seq_len=64, max_image_seq_len=4096)


def build_tokenizer(root: Path, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=model_max_length)


def build_digits_flux_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                               assets: str | Path | None = None) -> FluxPipeline:
    """Rebuild the trained digits ``FluxPipeline`` from the shipped assets (no hub access)."""
    root = Path(assets) if assets is not None else ASSETS
    tcfg = json.loads((root / "transformer_config.json").read_text())
    tcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in tcfg.items()}
    transformer = FluxTransformer2DModel(**tcfg)
    transformer.load_state_dict(load_file(str(root / "transformer.safetensors")), strict=True)

    clip = CLIPTextModel(CLIPTextConfig(**json.loads((root / "text_encoder_config.json").read_text())))
    load_model(clip, str(root / "text_encoder.safetensors"), strict=True)
    t5 = T5EncoderModel(T5Config(**json.loads((root / "text_encoder_2_config.json").read_text())))
    load_model(t5, str(root / "text_encoder_2.safetensors"), strict=True)

    vae = PassThroughFluxVAE(**json.loads((root / "vae_config.json").read_text()))
    pipe = FluxPipeline(scheduler=build_scheduler(), vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=build_tokenizer(root, CLIP_LENGTH), text_encoder_2=t5.eval(),
                        tokenizer_2=build_tokenizer(root, MAX_SEQUENCE_LENGTH), transformer=transformer.eval())
    for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:   # the weights are float32; skip the (warning-emitting) no-op cast
        pipe.to(dtype=dtype)
    return pipe.to(device)
