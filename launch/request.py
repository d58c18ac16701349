"""The models of a generation request, of a parallel layout and of a server's limits: every input
goes through them (the flags of ``spectrum-xdit generate`` and ``serve``, an HTTP body, the Serve
YAML), and a bad field raises :class:`RequestError` naming it, by its JSON path over HTTP
(``cache.degree``) and by its flag on the command line (``--spectrum_degree``, ``flags``). The
rules between fields, the model and the layout are ``validate``'s.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from ..config import SpectrumConfig, validation_problems
from ..models import ModelSpec
from .images import decode_image

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0   # guidance far beyond any model's range gives NaN or noise
CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "png": "image/png", "npy": "application/x-npy"}
OUTPUT_FORMATS = {"wan": ("mp4", "gif", "npy"), "flux": ("png", "npy")}
# guidance_scale per family, as diffusers' pipelines name and default it: Wan2.1's classifier-free
# guidance (WanPipeline, 5.0), FLUX.1's distilled guidance, which the transformer embeds in one call
# per step (FluxPipeline, 3.5). FLUX.1's classifier-free guidance is true_cfg_scale.
GUIDANCE_DEFAULTS = {"wan": 5.0, "flux": 3.5}
CFG_FIELDS = {"wan": "guidance_scale", "flux": "true_cfg_scale"}
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class RequestError(ValueError):
    """A bad input: ``field`` is its request path (``cache.degree``), ``status`` 400 for a body that
    is not a JSON object, 422 for a bad field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    @classmethod
    def from_validation(cls, error: ValidationError) -> "RequestError":
        field, why = validation_problems(error)[0]
        return cls(field or "body", why)


class CacheSettings(SpectrumConfig):
    """A request's cache: the method and the ``SpectrumConfig`` settings, checked by its rules;
    ``num_inference_steps`` is the request's own (copied in, never given here)."""

    method: Literal["spectrum", "none"] = Field("spectrum", description="spectrum, or none for full compute")

    def spectrum(self) -> SpectrumConfig:
        return SpectrumConfig(**self.model_dump(exclude={"method"}))


class GenerationRequest(BaseModel):
    """One generation: identical on every rank."""

    model_config = _STRICT

    prompt: str = Field(description="what to generate")
    negative_prompt: Optional[str] = Field(None, description=(
        "the unconditional branch's prompt under classifier-free guidance (default: the pipeline's; FLUX.1: empty)"))
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the initial noise")
    num_inference_steps: int = Field(50, ge=1, description="denoising steps")
    height: int = Field(ge=1, description="pixels (default: the model's)")
    width: int = Field(ge=1, description="pixels (default: the model's)")
    num_frames: int = Field(ge=1, description="frames of a video (default: the model's)")
    guidance_scale: float = Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, description=(
        "Wan2.1: classifier-free guidance (1: off); FLUX.1: distilled guidance, embedded in one transformer call "
        "(default: the model family's, 5.0 for Wan2.1, 3.5 for FLUX.1)"))
    true_cfg_scale: float = Field(1.0, ge=1, le=MAX_GUIDANCE, allow_inf_nan=False, description=(
        "FLUX.1: true classifier-free guidance, a second transformer call per step with the negative prompt "
        "(1: off; a model trained for it, such as digits-flux, defaults to the scale it was evaluated at)"))
    output_format: Optional[Literal["mp4", "gif", "png", "npy"]] = Field(
        None, description="mp4, gif or npy for video models, png or npy for image models (npy: the final latents)")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="the step cache and its settings")
    image: Optional[str] = Field(None, description=(
        "image-to-video models: the first frame, a PNG or JPEG file in base64 (resized to height x width)"))

    @model_validator(mode="before")
    @classmethod
    def _steps_into_cache(cls, data):
        if isinstance(data, dict) and isinstance(data.get("cache", {}), dict):
            cache = dict(data.get("cache", {}))
            steps = data.get("num_inference_steps", cls.model_fields["num_inference_steps"].default)
            if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
                cache["num_inference_steps"] = steps
            data = {**data, "cache": cache}
        return data

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _encodable(cls, value: Optional[str]) -> Optional[str]:
        """A tokenizer takes UTF-8 text; a lone surrogate (JSON allows ``"\\ud800"``) is not."""
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(f"is not valid Unicode text ({error.reason} at character {error.start})") from None
        return value

    @field_validator("image")
    @classmethod
    def _an_image(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            decode_image(value)
        return value

    @property
    def spectrum(self) -> Optional[SpectrumConfig]:
        """The Spectrum config of this request, or ``None`` without a cache."""
        return self.cache.spectrum() if self.cache.method == "spectrum" else None

    @property
    def cache_method(self) -> str:
        return self.cache.method


class ParallelLayout(BaseModel):
    """How the ranks of one job split the work, in xDiT's names."""

    model_config = _STRICT

    ulysses_degree: int = Field(1, ge=1, description="xDiT's Ulysses (all-to-all) sequence-parallel degree")
    ring_degree: int = Field(1, ge=1, description="xDiT's Ring sequence-parallel degree")
    use_cfg_parallel: bool = Field(False, description="Wan2.1: one guidance branch per half of the job")
    pipefusion_parallel_degree: int = Field(1, ge=1, description="FLUX.1: xDiT's PipeFusion stages")
    num_pipeline_patch: Optional[int] = Field(None, ge=1, description="PipeFusion patches (default: xDiT's)")
    warmup_steps: int = Field(1, ge=1, description="PipeFusion's synchronous warm-up steps")

    @property
    def cfg_degree(self) -> int:
        return 2 if self.use_cfg_parallel else 1

    @property
    def sequence_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def world_size(self) -> int:
        return self.sequence_degree * self.cfg_degree * self.pipefusion_parallel_degree


class Limits(BaseModel):
    """What a server accepts of one request."""

    model_config = _STRICT

    max_height: int = Field(1280, ge=1, description="largest height of a request")
    max_width: int = Field(1280, ge=1, description="largest width of a request")
    max_frames: int = Field(129, ge=1, description="most frames of a request")
    max_steps: int = Field(100, ge=1, description="most denoising steps of a request")
    max_prompt_chars: int = Field(4000, ge=1, description="longest prompt and negative prompt")
    max_token_steps: int = Field(4_000_000, ge=1, description=(
        "most work of a request: transformer tokens x denoising steps (Wan2.1 at 1280x720, 81 frames, "
        "50 steps: 3.78e6)"))
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest HTTP request body")


def mp4_available() -> bool:
    return importlib.util.find_spec("av") is not None


def parse_request(body: Any, defaults: dict) -> GenerationRequest:
    """The request ``body`` asks for, fields it leaves out or sets to null taken from ``defaults``
    (request-shaped, ``cache`` merged field by field)."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}", status=400)
    given = {name: value for name, value in body.items() if value is not None}
    merged = {**defaults, **given}
    cache = given.get("cache", {})
    if isinstance(cache, dict):
        if "num_inference_steps" in cache:
            raise RequestError("cache.num_inference_steps", "unknown field: the request's num_inference_steps sets it")
        merged["cache"] = {**defaults.get("cache", {}), **{k: v for k, v in cache.items() if v is not None}}
    try:
        return GenerationRequest.model_validate(merged)
    except ValidationError as error:
        problem = RequestError.from_validation(error)
    if problem.message == "unknown field":
        model, known = (CacheSettings, ("num_inference_steps",)) if problem.field.startswith("cache.") else \
            (GenerationRequest, ())
        allowed = [name for name in model.model_fields if name not in known]
        problem = RequestError(problem.field, f"unknown field; allowed: {', '.join(allowed)}")
    raise problem


def from_text(values: dict, model: type[BaseModel] = GenerationRequest) -> dict:
    """Values that came as text (a multipart form's fields) read as ``model``'s fields read text
    (``"8"`` for an integer is 8, ``"true"`` for a flag is true, ``"0.5"`` or ``"auto"`` for the
    blend weight), nested models too. A text no field type reads, or of an unknown field, stays
    text, for the model to refuse naming the field; constraints are the model's, as for JSON."""
    read = {}
    for name, value in values.items():
        field = model.model_fields.get(name)
        annotation = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            read[name] = from_text(value, annotation)
        elif isinstance(value, str) and field is not None:
            try:
                read[name] = _text_reader(model, name).validate_python(value, strict=False)
            except ValidationError:
                read[name] = value
        else:
            read[name] = value
    return read


@functools.cache
def _text_reader(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(model.model_fields[name].annotation)


def parse_layout(values: dict) -> ParallelLayout:
    try:
        return ParallelLayout.model_validate(values)
    except ValidationError as error:
        raise RequestError.from_validation(error) from None


def model_defaults(spec: ModelSpec) -> dict:
    """The sizes and guidance a request for ``spec`` takes when it gives none (FLUX.1's true
    classifier-free guidance: the model's, off unless it was trained for it)."""
    defaults = {"height": spec.height, "width": spec.width, "num_frames": spec.num_frames if spec.is_video else 1,
                "guidance_scale": GUIDANCE_DEFAULTS[spec.family]}
    if spec.family == "flux":
        defaults["true_cfg_scale"] = spec.true_cfg_scale
    return defaults


def guidance_branches(request: GenerationRequest, family: str) -> tuple[str, ...]:
    """The transformer calls of one denoising step, by diffusers' ``cache_context`` names: ``uncond``
    too under classifier-free guidance (the family's field in ``CFG_FIELDS`` above 1, as diffusers
    decides; FLUX.1's negative prompt is then the empty one by default)."""
    return ("cond", "uncond") if getattr(request, CFG_FIELDS[family]) > 1 else ("cond",)
