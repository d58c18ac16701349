"""The models the launchers know: the tiny pipelines (``tiny``), the trained digits models
(``digits_wan``, ``digits_flux``), and real checkpoints (local folders or hub ids) for users with GPUs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class SizeRules:
    """The sizes a model's transformer accepts: height and width multiples of ``spatial_multiple``
    (VAE factor x patch), for video ``num_frames = temporal_multiple k + 1``, and (Wan's rotary
    table) at most ``max_positions`` patches along each of frames, height and width."""

    family: str
    spatial_multiple: int
    temporal_multiple: int = 1
    temporal_patch: int = 1
    max_positions: Optional[int] = None

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_multiple + 1 if self.family == "wan" else 1

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """Image or video tokens the transformer sees for a request of this size."""
        spatial = (height // self.spatial_multiple) * (width // self.spatial_multiple)
        return spatial * -(-self.latent_frames(num_frames) // self.temporal_patch)


def size_rules(family: str, transformer_config: dict, vae_config: dict) -> SizeRules:
    """The rules that a pipeline's transformer and VAE configs imply (diffusers' own arithmetic:
    ``WanPipeline`` reads the VAE's scale factors, ``FluxPipeline`` counts its VAE's blocks)."""
    if family == "wan":
        patch = transformer_config["patch_size"]
        return SizeRules("wan", int(vae_config.get("scale_factor_spatial", 8)) * int(patch[1]),
                         int(vae_config.get("scale_factor_temporal", 4)), int(patch[0]),
                         int(transformer_config.get("rope_max_seq_len", 1024)))
    return SizeRules("flux", 2 ** (len(vae_config["block_out_channels"]) - 1) * 2)


@dataclass(frozen=True)
class ModelSpec:
    """What the launchers need to know about a model before building it."""

    name: str
    family: str                      # "wan" (video) or "flux" (image)
    num_attention_heads: int | None  # None when unknown before loading
    height: int
    width: int
    num_frames: int                  # 1 for image models
    build: Callable[..., Any]        # (torch_dtype=None) -> a diffusers pipeline
    sizes: SizeRules                 # read from the configs where they are at hand, else the family's
    needs_image: bool = False        # image-to-video: every request gives the first frame
    experts: tuple[str, ...] = ("transformer",)   # Wan2.2 A14B: ("transformer", "transformer_2")
    # FLUX.1: the T5 tokens of a prompt (max_sequence_length), None for the launchers' default. A
    # model trained at one length needs it: FLUX attends over every text position, padding included.
    max_sequence_length: Optional[int] = None
    true_cfg_scale: float = 1.0      # FLUX.1: a request's default true classifier-free guidance
    per_token_timesteps: bool = False   # Wan2.2 TI2V (``expand_timesteps``): a timestep per token

    @property
    def is_video(self) -> bool:
        return self.family == "wan"

    @property
    def step_batchable(self) -> bool:
        """Whether the serve step loop (``launch/step_batching.py``: a timestep per sample) can run it."""
        return not self.per_token_timesteps


# Builders import their model code when called, so that resolving a name stays cheap.

def _build_digits_wan(torch_dtype=None):
    import torch

    from .digits_wan import build_digits_wan_pipeline

    return build_digits_wan_pipeline(dtype=torch_dtype or torch.float32)


def _build_digits_flux(torch_dtype=None):
    import torch

    from .digits_flux import build_digits_flux_pipeline

    return build_digits_flux_pipeline(dtype=torch_dtype or torch.float32)


def _build_tiny_wan(torch_dtype=None):
    from .tiny import build_tiny_wan_pipeline

    return build_tiny_wan_pipeline()


def _build_tiny_wan_i2v(torch_dtype=None):
    from .tiny import build_tiny_wan_i2v_pipeline

    return build_tiny_wan_i2v_pipeline()


def _build_tiny_wan22(torch_dtype=None):
    from .tiny import build_tiny_wan22_pipeline

    return build_tiny_wan22_pipeline()


def _build_tiny_flux(torch_dtype=None):
    from .tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline()


def _from_pretrained(name_or_path: str) -> Callable[..., Any]:
    def build(torch_dtype=None):
        import torch
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=torch_dtype or torch.bfloat16)

    return build


def _digits_sizes(family: str, name: str) -> SizeRules:
    assets = Path(__file__).resolve().parent / "assets" / name
    return size_rules(family, json.loads((assets / "transformer_config.json").read_text()),
                      json.loads((assets / "vae_config.json").read_text()))


# WanPipeline's experts of Wan2.2 A14B (high noise, low noise), as spectrum_xdit.experts names them.
TWO_EXPERTS = ("transformer", "transformer_2")
# The tiny models' rules as their builders (tiny.py) configure them; tests compare every built
# model's rules with its spec's.
BUILTIN_MODELS = {
    "tiny-wan": ModelSpec("tiny-wan", "wan", 2, 32, 32, 5, _build_tiny_wan, SizeRules("wan", 16, 4, 1, 32)),
    "tiny-flux": ModelSpec("tiny-flux", "flux", 2, 32, 32, 1, _build_tiny_flux, SizeRules("flux", 4),
                           max_sequence_length=64),
    "digits-wan": ModelSpec("digits-wan", "wan", 6, 16, 16, 9, _build_digits_wan, _digits_sizes("wan", "digits_wan")),
    # digits_flux's GENERATION_KWARGS and TRUE_CFG_SCALE (tests compare them)
    "digits-flux": ModelSpec("digits-flux", "flux", 4, 16, 16, 1, _build_digits_flux,
                             _digits_sizes("flux", "digits_flux"), max_sequence_length=16, true_cfg_scale=2.0),
    "tiny-wan-i2v": ModelSpec("tiny-wan-i2v", "wan", 2, 32, 32, 5, _build_tiny_wan_i2v, SizeRules("wan", 16, 4, 1, 32),
                              needs_image=True),
    "tiny-wan22": ModelSpec("tiny-wan22", "wan", 2, 32, 32, 5, _build_tiny_wan22, SizeRules("wan", 16, 4, 1, 32),
                            experts=TWO_EXPERTS),
}
# Wan2.1 (VAE 8 x patch 2, 4x in time, rotary table 1024) and FLUX.1 (VAE 8 x packing 2).
_FAMILY_SIZES = {"wan": SizeRules("wan", 16, 4, 1, 1024), "flux": SizeRules("flux", 16)}
DEFAULT_MODEL = "digits-wan"
_PIPELINE_FAMILIES = {"WanPipeline": "wan", "FluxPipeline": "flux", "WanImageToVideoPipeline": "wan"}
_IMAGE_PIPELINES = {"WanImageToVideoPipeline"}
# Heads of public checkpoints, for checking the Ulysses degree before any download.
_KNOWN_HEADS = {"wan2.1-t2v-14b": 40, "wan2.1-t2v-1.3b": 12, "flux.1-dev": 24, "flux.1-schnell": 24,
                "wan2.1-i2v-14b": 40, "wan2.2-t2v-a14b": 40}
# Hub ids of Wan2.2's two-expert (mixture-of-experts) checkpoints contain this.
_TWO_EXPERT_HUB_MARK = "a14b"
# ... and of Wan2.2's TI2V checkpoints (one expert, a timestep per token: ``expand_timesteps``) this.
_PER_TOKEN_TIMESTEPS_HUB_MARK = "ti2v"


def resolve_model(name_or_path: str) -> ModelSpec:
    """A built-in model name, a local diffusers folder, or a hub id of Wan2.1-T2V / -I2V,
    Wan2.2-T2V-A14B (two experts) or FLUX.1."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ValueError(f"--model {name_or_path}: a local folder must be a diffusers pipeline "
                             "folder with model_index.json")
        model_index = json.loads(index.read_text())
        pipeline_class = model_index.get("_class_name")
        family = _PIPELINE_FAMILIES.get(pipeline_class)
        needs_image = pipeline_class in _IMAGE_PIPELINES
        if family is None:
            raise ValueError(f"--model {name_or_path}: {pipeline_class} is not supported; "
                             f"supported pipelines: {', '.join(_PIPELINE_FAMILIES)}")
        config = path / "transformer" / "config.json"
        transformer_config = json.loads(config.read_text()) if config.exists() else {}
        heads = transformer_config.get("num_attention_heads")
        vae = path / "vae" / "config.json"
        sizes = size_rules(family, transformer_config, json.loads(vae.read_text())) \
            if config.exists() and vae.exists() else _FAMILY_SIZES[family]
        # diffusers writes an absent optional component as [null, null]
        two_experts = (model_index.get("transformer_2") or [None])[0] is not None
        per_token_timesteps = bool(model_index.get("expand_timesteps"))
    else:
        lowered = name_or_path.lower()
        if "/" not in name_or_path or not ("wan" in lowered or "flux" in lowered):
            raise ValueError(
                f"unknown model {name_or_path!r}: use one of {', '.join(BUILTIN_MODELS)}, a local "
                "diffusers folder, or a hub id of Wan2.1-T2V, Wan2.1-I2V, Wan2.2-T2V-A14B or FLUX.1 (e.g. "
                "Wan-AI/Wan2.1-T2V-14B-Diffusers, Wan-AI/Wan2.1-I2V-14B-480P-Diffusers, "
                "Wan-AI/Wan2.2-T2V-A14B-Diffusers, black-forest-labs/FLUX.1-dev)")
        family = "wan" if "wan" in lowered else "flux"
        needs_image = family == "wan" and "i2v" in lowered
        heads = next((h for key, h in _KNOWN_HEADS.items() if key in lowered), None)
        sizes = _FAMILY_SIZES[family]
        two_experts = family == "wan" and _TWO_EXPERT_HUB_MARK in lowered
        per_token_timesteps = family == "wan" and _PER_TOKEN_TIMESTEPS_HUB_MARK in lowered
    height, width, frames = (480, 832, 81) if family == "wan" else (1024, 1024, 1)
    if needs_image and "720p" in name_or_path.lower():   # Wan2.1-I2V-14B-720P
        height, width = 720, 1280
    return ModelSpec(name_or_path, family, heads, height, width, frames, _from_pretrained(name_or_path), sizes,
                     experts=TWO_EXPERTS if two_experts else ("transformer",), needs_image=needs_image,
                     per_token_timesteps=per_token_timesteps)
