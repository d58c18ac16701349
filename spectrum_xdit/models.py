"""The models the launchers know: tiny pipelines built locally, the trained digits model, and
real checkpoints (local folders or hub ids) for users with GPUs.

The tiny Wan2.1- and FLUX.1-architecture pipelines are for tests and quick runs.
Every component (transformer, text encoders, tokenizers, VAE, scheduler) is constructed from a
config with seeded random weights; nothing is fetched from a model hub. The shapes follow the
real models' structure at toy width and depth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

TEXT_DIM = 32


def byte_tokenizer(model_max_length: int = 64) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any prompt maps to its UTF-8 bytes (ids 3..258)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)


def tiny_wan_transformer(seed: int = 0, num_layers: int = 2, in_channels: int = 4) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def tiny_flux_transformer(seed: int = 0, num_layers: int = 1, num_single_layers: int = 2,
                          in_channels: int = 16) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()


def build_tiny_wan_pipeline(seed: int = 0, num_layers: int = 2) -> WanPipeline:
    """A complete ``WanPipeline`` (UniPC with flow prediction and flow_shift 3.0, as Wan2.1)."""
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=259, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=3.0, num_train_timesteps=1000)
    return WanPipeline(tokenizer=byte_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=tiny_wan_transformer(seed, num_layers=num_layers, in_channels=4))


def build_tiny_flux_pipeline(seed: int = 0, num_single_layers: int = 2) -> FluxPipeline:
    """A complete ``FluxPipeline`` with tiny CLIP and T5 text encoders and a tiny VAE."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=259, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        pad_token_id=0, bos_token_id=1, eos_token_id=1)).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=259, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    scheduler = FlowMatchEulerDiscreteScheduler()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=byte_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=byte_tokenizer(64),
                        transformer=tiny_flux_transformer(seed, num_single_layers=num_single_layers))


@dataclass(frozen=True)
class ModelSpec:
    """What the launchers need to know about a model before building it."""

    name: str
    family: str                      # "wan" (video) or "flux" (image)
    num_attention_heads: int | None  # None when unknown before loading
    height: int
    width: int
    num_frames: int                  # 1 for image models
    build: Callable[..., DiffusionPipeline]

    @property
    def is_video(self) -> bool:
        return self.family == "wan"


def _build_digits_wan(torch_dtype=torch.float32, **_) -> DiffusionPipeline:
    from .digits_wan import build_digits_wan_pipeline

    return build_digits_wan_pipeline(dtype=torch_dtype)


BUILTIN_MODELS = {
    "tiny-wan": ModelSpec("tiny-wan", "wan", 2, 32, 32, 5, lambda **_: build_tiny_wan_pipeline()),
    "tiny-flux": ModelSpec("tiny-flux", "flux", 2, 32, 32, 1, lambda **_: build_tiny_flux_pipeline()),
    "digits-wan": ModelSpec("digits-wan", "wan", 6, 16, 16, 9, _build_digits_wan),
}
DEFAULT_MODEL = "digits-wan"
_PIPELINE_FAMILIES = {"WanPipeline": "wan", "FluxPipeline": "flux"}
# Heads of public checkpoints, for checking the Ulysses degree before any download.
_KNOWN_HEADS = {"wan2.1-t2v-14b": 40, "wan2.1-t2v-1.3b": 12, "flux.1-dev": 24, "flux.1-schnell": 24}


def resolve_model(name_or_path: str) -> ModelSpec:
    """A built-in model name, a local diffusers folder, or a hub id of Wan2.1-T2V / FLUX.1."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ValueError(f"--model {name_or_path}: a local folder must be a diffusers pipeline "
                             "folder with model_index.json")
        pipeline_class = json.loads(index.read_text()).get("_class_name")
        family = _PIPELINE_FAMILIES.get(pipeline_class)
        if family is None:
            raise ValueError(f"--model {name_or_path}: {pipeline_class} is not supported; "
                             f"supported pipelines: {', '.join(_PIPELINE_FAMILIES)}")
        config = path / "transformer" / "config.json"
        heads = json.loads(config.read_text()).get("num_attention_heads") if config.exists() else None
    else:
        lowered = name_or_path.lower()
        if "/" not in name_or_path or not ("wan" in lowered or "flux" in lowered):
            raise ValueError(
                f"unknown model {name_or_path!r}: use one of {', '.join(BUILTIN_MODELS)}, a local "
                "diffusers folder, or a hub id of Wan2.1-T2V or FLUX.1 (e.g. "
                "Wan-AI/Wan2.1-T2V-14B-Diffusers, black-forest-labs/FLUX.1-dev)")
        family = "wan" if "wan" in lowered else "flux"
        heads = next((h for key, h in _KNOWN_HEADS.items() if key in lowered), None)
    height, width, frames = (480, 832, 81) if family == "wan" else (1024, 1024, 1)
    return ModelSpec(name_or_path, family, heads, height, width, frames,
                     lambda torch_dtype=torch.bfloat16, **_: DiffusionPipeline.from_pretrained(
                         name_or_path, torch_dtype=torch_dtype))
