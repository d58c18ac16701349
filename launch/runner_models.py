"""The project's embedded models as models of xDiT's runner (``MODEL_REGISTRY``), so that
``xdit --model digits-wan ...`` runs on CPU with no download.

Each is xDiT's own runner class for its family (``xFuserWan21T2VModel``, ``xFuserWan21I2VModel``
with ``--input_images``, ``xFuserWan22T2VModel`` for two experts, ``xFuserFluxModel``):
flags, checks, default handling, pipeline call, timing and saving are xDiT's; only the loading
differs, a locally built pipeline whose transformer becomes xDiT's wrapper, as xDiT's loader makes
it. Import this module only after ``patches.install(runner=True)`` (it imports xfuser).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from xfuser.model_executor.models.runner_models.base_model import (
    MODEL_REGISTRY,
    DefaultInputValues,
    xFuserModel,
)
from xfuser.model_executor.models.runner_models.flux import xFuserFluxModel
from xfuser.model_executor.models.runner_models.wan import (
    _build_attention_kwargs,
    xFuserWan21I2VModel,
    xFuserWan21T2VModel,
    xFuserWan22T2VModel,
)

from ..experts import pipeline_experts
from ..models import BUILTIN_MODELS, ModelSpec
from ..parallel.xdit_setup import xdit_transformer
from .request import GUIDANCE_DEFAULTS
from .runner import flux_text_tokens


class _EmbeddedModel:
    """Mixin of the embedded runner models: the pipeline comes from the project's builder."""

    spec: ModelSpec

    def _customize_settings(self, config) -> None:
        """xDiT's Wan2.2 runner names its checkpoint here; the embedded model keeps its own name."""
        super()._customize_settings(config)
        self.settings.model_name = self.spec.name
        self.settings.output_name = self.spec.name.replace("-", "_")

    def _load_model(self):
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        pipe = self.spec.build(torch_dtype=dtype)
        for name, transformer in pipeline_experts(pipe).items():
            setattr(pipe, name, xdit_transformer(transformer, **self._wrapper_kwargs()))
        return pipe

    def _wrapper_kwargs(self) -> dict:
        return {}


class _EmbeddedWan(_EmbeddedModel):
    """Mixin of the embedded Wan models: xDiT's attention options, the pipeline's own shift."""

    def _wrapper_kwargs(self) -> dict:
        return {"attention_kwargs": _build_attention_kwargs(self.config)}

    def _post_load_and_state_initialization(self, input_args: dict) -> None:
        """xDiT's Wan runners write ``--flow_shift`` into the scheduler; without the flag the
        embedded pipeline keeps the shift it was built (and trained) with."""
        if input_args.get("flow_shift") is None:
            xFuserModel._post_load_and_state_initialization(self, input_args)
        else:
            super()._post_load_and_state_initialization(input_args)


class EmbeddedWanModel(_EmbeddedWan, xFuserWan21T2VModel):
    """An embedded Wan2.1-architecture text-to-video model in xDiT's Wan2.1 T2V runner."""


class EmbeddedWan22Model(_EmbeddedWan, xFuserWan22T2VModel):
    """An embedded Wan2.2-architecture two-expert model in xDiT's Wan2.2 T2V runner."""


class EmbeddedWanI2VModel(_EmbeddedWan, xFuserWan21I2VModel):
    """An embedded Wan2.1-architecture image-to-video model in xDiT's Wan2.1 I2V runner (the first
    frame from ``--input_images``, fitted to the default area as xDiT does)."""


class EmbeddedFluxModel(_EmbeddedModel, xFuserFluxModel):
    """An embedded FLUX.1-architecture model in xDiT's FLUX.1 runner (without PipeFusion, whose
    pipeline xDiT's runner loads from a checkpoint)."""

    capabilities = replace(xFuserFluxModel.capabilities, pipefusion_parallel_degree=False)


def _runner_class(spec: ModelSpec) -> type:
    """The runner class of one embedded model, with its sizes as xDiT's default inputs."""
    name = spec.name.replace("-", "_")
    if spec.family == "wan":
        base = EmbeddedWanI2VModel if spec.needs_image else EmbeddedWan22Model if len(spec.experts) > 1 \
            else EmbeddedWanModel
        defaults = DefaultInputValues(
            height=spec.height, width=spec.width, num_frames=spec.num_frames, num_inference_steps=50,
            guidance_scale=GUIDANCE_DEFAULTS["wan"])
    else:
        base, defaults = EmbeddedFluxModel, DefaultInputValues(
            height=spec.height, width=spec.width, num_inference_steps=50, guidance_scale=GUIDANCE_DEFAULTS["flux"],
            max_sequence_length=flux_text_tokens(spec))
    return type(f"xFuser_{name}", (base,), {"spec": spec, "default_input_values": defaults,
                                             "__doc__": f"{spec.name} in xDiT's runner."})


def register_embedded_models() -> list[str]:
    """Put every embedded model into xDiT's ``MODEL_REGISTRY`` (idempotent); their names."""
    for name, spec in BUILTIN_MODELS.items():
        if name not in MODEL_REGISTRY:
            MODEL_REGISTRY[name] = _runner_class(spec)
    return list(BUILTIN_MODELS)
