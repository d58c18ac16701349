"""The models the launchers know: the tiny pipelines (``tiny``), the trained digits model
(``digits_wan``), and real checkpoints (local folders or hub ids) for users with GPUs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


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

    @property
    def is_video(self) -> bool:
        return self.family == "wan"


# Builders import their model code when called, so that resolving a name stays cheap.

def _build_digits_wan(torch_dtype=None):
    import torch

    from .digits_wan import build_digits_wan_pipeline

    return build_digits_wan_pipeline(dtype=torch_dtype or torch.float32)


def _build_tiny_wan(torch_dtype=None):
    from .tiny import build_tiny_wan_pipeline

    return build_tiny_wan_pipeline()


def _build_tiny_flux(torch_dtype=None):
    from .tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline()


def _from_pretrained(name_or_path: str) -> Callable[..., Any]:
    def build(torch_dtype=None):
        import torch
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=torch_dtype or torch.bfloat16)

    return build


BUILTIN_MODELS = {
    "tiny-wan": ModelSpec("tiny-wan", "wan", 2, 32, 32, 5, _build_tiny_wan),
    "tiny-flux": ModelSpec("tiny-flux", "flux", 2, 32, 32, 1, _build_tiny_flux),
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
    return ModelSpec(name_or_path, family, heads, height, width, frames, _from_pretrained(name_or_path))
