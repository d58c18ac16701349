"""The trained digits model: a miniature Wan2.1-architecture text-to-video ``WanPipeline``
(handwritten digits moving across a 16x16 frame), rebuilt from the assets shipped beside this
module with no model-hub access.

The transformer is a ``WanTransformer3DModel`` (6 heads x 32, 4 blocks, ~2.7 M parameters) trained
with Wan's flow-matching objective (``benchmarks/train_digits_wan.py``, which also builds the
tokenizer and the frozen tiny UMT5 text encoder whose weights ship here). The VAE is
:class:`PassThroughWanVAE`: the latents are the pixels, laid out as Wan's VAE lays out a video.
Generate at ``GENERATION_KWARGS`` (16x16, 9 frames); WanPipeline's own defaults are far outside
what the model was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, load_model
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

ASSETS = Path(__file__).resolve().parent / "assets" / "digits_wan"

HEIGHT = 16
WIDTH = 16
NUM_FRAMES = 9
GENERATION_KWARGS = {"height": HEIGHT, "width": WIDTH, "num_frames": NUM_FRAMES}
FLOW_SHIFT = 3.0
MAX_SEQUENCE_LENGTH = 226  # WanPipeline's default; the model was trained with it


class PassThroughWanVAE(ModelMixin, ConfigMixin):
    """A weightless, lossless "autoencoder" that satisfies everything ``WanPipeline`` reads from ``self.vae``.

    Latents are the pixels themselves (grey levels in [-1, 1]), only rearranged the way Wan's causal
    VAE lays out a video, so the pipeline's frame and size arithmetic holds unchanged:

    - time: a ``4k+1``-frame video becomes ``k+1`` latent frames (``scale_factor_temporal = 4``).
      Latent frame 0 holds video frame 0 repeated 4 times; latent frame ``j >= 1`` holds video frames
      ``4j-3 .. 4j``. (WanPipeline's ``num_frames % 4 == 1`` rule therefore applies as for Wan.)
    - space: each ``p x p`` pixel block goes to channels (space-to-depth, ``scale_factor_spatial = p``).

    ``z_dim = 4 * p * p`` channels, ordered (frame-in-group, row-in-block, column-in-block).
    ``latents_mean = 0`` and ``latents_std = 1`` make the pipeline's un-normalisation the identity.
    ``decode`` unpacks (frame 0 is the mean of its four copies), clamps to [-1, 1] and repeats the grey
    channel ``out_channels`` (3) times: the RGB video in [-1, 1] that diffusers' ``VideoProcessor``
    post-processes, as ``(video,)`` with ``return_dict=False``. ``encode`` is the exact inverse (RGB is
    averaged to grey) with a point-mass posterior. ``temperal_downsample`` is recorded as in
    AutoencoderKLWan for code that reads it. A single non-persistent buffer carries the dtype/device
    the pipeline queries (``vae.dtype``).
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, z_dim: int = 16, out_channels: int = 3, latents_mean: list[float] = [0.0] * 16,
                 latents_std: list[float] = [1.0] * 16, temperal_downsample: list[bool] = [False, True, True],
                 scale_factor_temporal: int = 4, scale_factor_spatial: int = 2):
        super().__init__()
        if z_dim != scale_factor_temporal * scale_factor_spatial ** 2:
            raise ValueError("z_dim must be scale_factor_temporal * scale_factor_spatial**2")
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError("latents_mean and latents_std need z_dim entries")
        self.z_dim = z_dim
        self.temperal_downsample = list(temperal_downsample)
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    def pack(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, 4k+1, H, W) pixels in [-1, 1] -> (B, z_dim, k+1, H/p, W/p) latents."""
        grey = video.mean(dim=1) if video.shape[1] != 1 else video[:, 0]   # (B, F, H, W)
        s, p = self.config.scale_factor_temporal, self.config.scale_factor_spatial
        b, f, h, w = grey.shape
        if f % s != 1 or h % p or w % p:
            raise ValueError(f"need {s}k+1 frames and sides divisible by {p}, got {tuple(grey.shape[1:])}")
        first = grey[:, :1].expand(b, s, h, w).unsqueeze(2)                    # (B, s, 1, H, W)
        rest = grey[:, 1:].reshape(b, (f - 1) // s, s, h, w).transpose(1, 2)  # (B, s, k, H, W)
        z = torch.cat([first, rest], dim=2)                                   # (B, s, n, H, W)
        n = z.shape[2]
        z = z.reshape(b, s, n, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
        return z.reshape(b, s * p * p, n, h // p, w // p)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, k+1, H/p, W/p) latents -> (B, 1, 4k+1, H, W) grey pixels (not clamped)."""
        s, p = self.config.scale_factor_temporal, self.config.scale_factor_spatial
        b, _, n, hp, wp = latents.shape
        z = latents.reshape(b, s, p, p, n, hp, wp).permute(0, 1, 4, 5, 2, 6, 3).reshape(b, s, n, hp * p, wp * p)
        first = z[:, :, :1].mean(dim=1, keepdim=True)                          # (B, 1, 1, H, W)
        rest = z[:, :, 1:].transpose(1, 2).reshape(b, 1, (n - 1) * s, hp * p, wp * p)
        return torch.cat([first, rest], dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        z = self.pack(x)
        posterior = DiagonalGaussianDistribution(torch.cat([z, torch.full_like(z, -30.0)], dim=1))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        video = self.unpack(z).clamp(-1.0, 1.0)
        if self.config.out_channels != 1:
            video = video.repeat(1, self.config.out_channels, 1, 1, 1)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        return self.decode(sample, return_dict=return_dict)


def build_scheduler() -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=FLOW_SHIFT, num_train_timesteps=1000)


def build_digits_wan_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                              assets: str | Path | None = None) -> WanPipeline:
    """Rebuild the trained digits ``WanPipeline`` from the shipped assets (no hub access)."""
    root = Path(assets) if assets is not None else ASSETS
    tcfg = json.loads((root / "transformer_config.json").read_text())
    tcfg = {k: tuple(v) if isinstance(v, list) else v for k, v in tcfg.items()}
    transformer = WanTransformer3DModel(**tcfg)
    transformer.load_state_dict(load_file(str(root / "transformer.safetensors")), strict=True)

    ecfg = json.loads((root / "text_encoder_config.json").read_text())
    text_encoder = UMT5EncoderModel(UMT5Config(**ecfg))
    missing, unexpected = load_model(text_encoder, str(root / "text_encoder.safetensors"), strict=True)
    del missing, unexpected

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), pad_token="<pad>",
                                        eos_token="</s>", unk_token="<unk>",
                                        model_max_length=MAX_SEQUENCE_LENGTH)
    vae = PassThroughWanVAE(**json.loads((root / "vae_config.json").read_text()))
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=build_scheduler(), transformer=transformer.eval())
    pipe.text_encoder.requires_grad_(False)
    pipe.transformer.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:   # the weights are float32; skip the (warning-emitting) no-op cast
        pipe.to(dtype=dtype)
    return pipe.to(device)
