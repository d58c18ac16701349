"""A trained miniature Wan2.1-architecture text-to-video model: handwritten digits moving across the frame.

Random-weight toy models prove wiring, not quality. This module rebuilds, from the assets shipped in
``spectrum_xdit/assets/digits_wan/`` and with no model-hub access, a diffusers ``WanPipeline`` whose
transformer is a small ``WanTransformer3DModel`` (the real Wan2.1 architecture: 3D patch embedding,
3D RoPE, AdaLN timestep modulation, cross-attention to UMT5 text states) trained with Wan's
flow-matching objective on 16x16, 9-frame clips of scikit-learn's ``load_digits`` handwriting moving
one pixel per frame (see ``benchmarks/digits_data.py`` and ``benchmarks/train_digits_wan.py``).

Components
----------
- tokenizer: a word-level ``tokenizers`` model wrapped in ``PreTrainedTokenizerFast`` (``<pad>``
  id 0, ``</s>`` id 1 appended like T5, ``<unk>`` id 2; lower-cased, whitespace split), so
  ``WanPipeline`` can call it with ``padding="max_length"``.
- text_encoder: a tiny ``UMT5EncoderModel``, randomly initialised from a fixed seed and frozen
  (never trained); its weights ship so the embeddings are bit-stable across torch versions.
- transformer: the trained ``WanTransformer3DModel`` (width 192 = 6 heads x 32, 4 blocks, FFN 768,
  patch (1, 2, 2), 16 latent channels; ~2.7 M parameters), an EMA of the trained weights.
- vae: ``PassThroughWanVAE``, a weightless lossless rearrangement: latents *are* the pixels in
  [-1, 1], laid out like Wan latents. Time goes 4-to-1 into channels the way Wan's VAE turns ``4k+1``
  frames into ``k+1`` latent frames (``scale_factor_temporal = 4``), and each 2x2 pixel block goes to
  channels (``scale_factor_spatial = 2``): a 9x16x16 clip is a (16, 3, 8, 8) latent, 3*4*4 = 48
  tokens after the (1, 2, 2) patch embedding. ``decode`` unpacks, clamps and repeats grey to RGB.
- scheduler: ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=3.0)``, as Wan2.1.

Usage::

    from spectrum_xdit.digits_wan import build_digits_wan_pipeline, GENERATION_KWARGS
    pipe = build_digits_wan_pipeline()
    frames = pipe("digit 7 moving left", guidance_scale=5.0, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0), output_type="np",
                  **GENERATION_KWARGS).frames   # (1, 9, 16, 16, 3) in [0, 1]

``GENERATION_KWARGS`` holds height/width/num_frames (16, 16, 9); WanPipeline's own defaults
(480x832x81) are far outside what the model was trained on. The model was trained with the
pipeline's default ``max_sequence_length=226`` and the default empty negative prompt, so leave those
as they are.
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
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

ASSETS = Path(__file__).resolve().parent / "assets" / "digits_wan"

HEIGHT = 16
WIDTH = 16
NUM_FRAMES = 9
GENERATION_KWARGS = {"height": HEIGHT, "width": WIDTH, "num_frames": NUM_FRAMES}
FLOW_SHIFT = 3.0
MAX_SEQUENCE_LENGTH = 226  # WanPipeline's default; the model was trained with it

WORDS = ("digit", "moving", "left", "right", "up", "down") + tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "</s>", "<unk>")

TEXT_ENCODER_CONFIG = dict(
    vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
    relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
TEXT_ENCODER_SEED = 1234

VAE_CONFIG = dict(z_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_temporal=4,
                  scale_factor_spatial=2)

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=6, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=TEXT_ENCODER_CONFIG["d_model"], freq_dim=64, ffn_dim=768, num_layers=4,
    cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)


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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the prompt vocabulary; appends ``</s>`` like T5/UMT5."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=MAX_SEQUENCE_LENGTH)


def build_text_encoder(seed: int = TEXT_ENCODER_SEED) -> UMT5EncoderModel:
    """The frozen tiny UMT5 encoder from its seed (training builds it once and ships its weights)."""
    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG)).eval()
    model.requires_grad_(False)
    return model


def build_transformer(seed: int = 0, **overrides) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides})


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
