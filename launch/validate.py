"""Every rule between a request, the model, the parallel layout and a server's limits: the one
check that the CLI, the server's endpoints, its settings and its engine call (:func:`validate`),
so that a rule is written once and refuses alike wherever a request comes from. The request model
(``request``) has already checked each field on its own.
"""

from __future__ import annotations

from typing import Optional

from ..models import ModelSpec, SizeRules
from ..parallel.patches import pads_correctly
from ..parallel.patches.padding import PaddingUnsupported, sequence_padding
from .request import CFG_FIELDS, OUTPUT_FORMATS, GenerationRequest, Limits, ParallelLayout, RequestError, \
    guidance_branches, mp4_available


def validate(request: GenerationRequest, spec: ModelSpec, layout: ParallelLayout, limits: Optional[Limits] = None,
             *, world_size: Optional[int] = None, sizes: Optional[SizeRules] = None) -> None:
    """Raise :class:`RequestError` naming the field of the first rule ``request`` breaks.

    ``limits``: a server's (none for a launch); ``world_size``: a launch's process count, which the
    layout must fill; ``sizes``: the size rules of the built model, where the spec's are a
    family's guess (a hub checkpoint) and a model has been built."""
    _layout_rules(layout, spec, world_size)
    _request_rules(request, spec, layout, limits)
    _size_rules(request, sizes or spec.sizes, layout, limits, spec.name)


def _layout_rules(layout: ParallelLayout, spec: ModelSpec, world_size: Optional[int]) -> None:
    if world_size is not None and layout.world_size != world_size:
        raise RequestError("ulysses_degree,ring_degree,use_cfg_parallel,pipefusion_parallel_degree",
                           f"ulysses {layout.ulysses_degree} x ring {layout.ring_degree} x cfg {layout.cfg_degree}"
                           f" x pipefusion {layout.pipefusion_parallel_degree} = {layout.world_size}, but the "
                           f"world size is {world_size}")
    if spec.num_attention_heads is not None and spec.num_attention_heads % layout.ulysses_degree:
        raise RequestError("ulysses_degree", f"{spec.name} has {spec.num_attention_heads} attention heads, not "
                           f"divisible by ulysses_degree {layout.ulysses_degree}")
    if layout.use_cfg_parallel and spec.family != "wan":
        raise RequestError("use_cfg_parallel", f"is supported for Wan2.1 only, not {spec.name} (docs/parallel.md)")
    if layout.pipefusion_parallel_degree > 1 and spec.family != "flux":
        raise RequestError("pipefusion_parallel_degree", f"is supported for FLUX.1 only (xDiT has no PipeFusion "
                           f"for Wan2.1), not {spec.name}")


def _request_rules(request: GenerationRequest, spec: ModelSpec, layout: ParallelLayout,
                   limits: Optional[Limits]) -> None:
    if spec.needs_image and request.image is None:
        raise RequestError("image", f"{spec.name} makes videos from an image: give the first frame (a PNG or "
                           "JPEG file, base64 over HTTP)")
    if not spec.needs_image and request.image is not None:
        raise RequestError("image", f"{spec.name} takes no image (an image-to-video model does)")
    formats = OUTPUT_FORMATS[spec.family]
    if request.output_format is not None and request.output_format not in formats:
        raise RequestError("output_format", f"must be one of {', '.join(formats)} for {spec.name}, "
                           f"got {request.output_format!r}")
    if request.output_format == "mp4" and not mp4_available():
        raise RequestError("output_format", "mp4 needs PyAV, which is not installed; use gif or npy")
    if not spec.is_video and request.num_frames != 1:
        raise RequestError("num_frames", f"{spec.name} makes images: num_frames must be 1, got {request.num_frames}")
    if limits is not None:
        for name, limit in (("height", "max_height"), ("width", "max_width"), ("num_frames", "max_frames"),
                            ("num_inference_steps", "max_steps")):
            if getattr(request, name) > getattr(limits, limit):
                raise RequestError(name, f"must be <= {getattr(limits, limit)} (the server's {limit}), got "
                                   f"{getattr(request, name)}")
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name)
            if text is not None and len(text) > limits.max_prompt_chars:
                raise RequestError(name, f"must be at most {limits.max_prompt_chars} characters (the server's "
                                   f"max_prompt_chars), got {len(text)}")
    if spec.family == "wan" and request.true_cfg_scale != 1:
        raise RequestError("true_cfg_scale", f"is FLUX.1's true classifier-free guidance; {spec.name} takes its "
                           "classifier-free guidance as guidance_scale: leave true_cfg_scale at 1")
    cfg_field = CFG_FIELDS[spec.family]
    if layout.use_cfg_parallel and len(guidance_branches(request, spec.family)) == 1:
        raise RequestError(cfg_field, f"CFG parallelism (use_cfg_parallel) needs classifier-free guidance: "
                           f"{cfg_field} > 1")
    if layout.pipefusion_parallel_degree > 1:
        if len(guidance_branches(request, spec.family)) > 1:
            raise RequestError(cfg_field, "PipeFusion runs xDiT's FLUX.1 pipeline, which has no true "
                               f"classifier-free guidance: use {cfg_field} 1 (guidance_scale, the distilled "
                               "guidance, is passed on)")
        from ..config import SettingError
        from ..parallel.pipefusion import require_pipefusion_support

        try:
            require_pipefusion_support(request.spectrum)
        except SettingError as error:
            raise RequestError(f"cache.{error.field}", error.message) from None


def _size_rules(request: GenerationRequest, rules: SizeRules, layout: ParallelLayout, limits: Optional[Limits],
                model: str) -> None:
    """The sizes the model's transformer and the sequence-parallel layout accept, and a server's
    bound on a request's work."""
    spatial = rules.spatial_multiple
    for name in ("height", "width"):
        value = getattr(request, name)
        if value % spatial:
            raise RequestError(name, f"must be a multiple of {spatial} for {model}, got {value}")
    if rules.family == "wan" and (request.num_frames - 1) % rules.temporal_multiple:
        raise RequestError("num_frames", f"must be 1 more than a multiple of {rules.temporal_multiple} for "
                           f"{model}, got {request.num_frames}")
    if rules.max_positions is not None:
        most = rules.max_positions
        positions = {"num_frames": (rules.latent_frames(request.num_frames) // rules.temporal_patch,
                                    f"{(most * rules.temporal_patch - 1) * rules.temporal_multiple + 1} frames"),
                     "height": (request.height // spatial, f"{most * spatial} pixels"),
                     "width": (request.width // spatial, f"{most * spatial} pixels")}
        for name, (count, largest) in positions.items():
            if count > most:
                raise RequestError(name, f"gives {count} positions, beyond the {most} of {model}'s rotary table "
                                   f"(at most {largest}), got {getattr(request, name)}")
    tokens = rules.tokens(request.height, request.width, request.num_frames)
    names = "height,width,num_frames" if rules.family == "wan" else "height,width"
    if limits is not None and tokens * request.num_inference_steps > limits.max_token_steps:
        raise RequestError(f"{names},num_inference_steps", f"give {tokens} tokens x {request.num_inference_steps} "
                           f"steps, more work than the server's max_token_steps {limits.max_token_steps}")
    degree = layout.sequence_degree
    if tokens % degree and not pads_correctly():
        raise RequestError(names, f"give {tokens} tokens, not divisible by the sequence-parallel degree "
                           f"{degree} (ulysses x ring), and this xfuser cannot pad them")
    try:
        sequence_padding(tokens, degree)
    except PaddingUnsupported as error:
        raise RequestError(names, str(error)) from None
