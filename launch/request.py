"""One model of a generation request and of a parallel layout, and the rules that relate them to a
model; every input goes through them: the flags of ``spectrum-xdit generate`` and ``serve``, an
HTTP body, the Serve YAML. A bad value raises :class:`RequestError` naming the field: its JSON path
over HTTP (``cache.degree``), its flag on the command line (``--spectrum_degree``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import importlib.util
import io
import json
import typing
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from ..config import SETTINGS, SettingError, SpectrumConfig, validation_problems
from ..models import ModelSpec, SizeRules

MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0   # guidance far beyond any model's range gives NaN or noise
MAX_JSON_DEPTH = 16   # a request is two levels deep
CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "png": "image/png", "npy": "application/x-npy"}
OUTPUT_FORMATS = {"wan": ("mp4", "gif", "npy"), "flux": ("png", "npy")}
# guidance_scale per family, as diffusers' pipelines name and default it: Wan2.1's classifier-free
# guidance (WanPipeline, 5.0), FLUX.1's distilled guidance, which the transformer embeds in one call
# per step (FluxPipeline, 3.5). FLUX.1's classifier-free guidance is true_cfg_scale.
GUIDANCE_DEFAULTS = {"wan": 5.0, "flux": 3.5}
CFG_FIELDS = {"wan": "guidance_scale", "flux": "true_cfg_scale"}
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)
# An image-to-video request's first frame: a PNG or JPEG file of at most MAX_IMAGE_BYTES, at most
# MAX_IMAGE_SIDE pixels on a side (read from the header before any pixel is decoded: a small file
# may claim a huge image).
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_BYTES = 8 << 20
MAX_IMAGE_SIDE = 4096


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

    @property
    def flag(self) -> str:
        """The command-line flag of the field."""
        return ", ".join(flag_of(part) for part in self.field.split(","))


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


def decode_image(text: str):
    """The RGB Pillow image of a request's ``image``; ``ValueError`` saying why it is not a PNG or
    JPEG file in base64 within the size caps. Whitespace is ignored (``base64`` wraps its lines)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError(f"is not valid base64 ({error})") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError(f"is a file of {len(data)} bytes, more than the {MAX_IMAGE_BYTES} an image may have")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise ValueError(f"is not a {' or '.join(IMAGE_FORMATS)} image ({len(data)} bytes)") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"is too large an image ({error})") from None
    width, height = image.size
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"is {width}x{height} pixels, more than {MAX_IMAGE_SIDE} on a side")
    try:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:   # Pillow's errors for damaged image data
        raise ValueError(f"is a damaged {image.format} image ({error})") from None


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


class HugeInteger:
    """A JSON integer too long for Python to read (over 4300 digits): kept as a value that every
    field refuses, so that the error names the field."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def parse_json(body: bytes) -> Any:
    """An HTTP body as JSON; ``RequestError`` (400, ``body``) for one that is empty, not UTF-8, not
    JSON, or nested deeper than ``MAX_JSON_DEPTH``."""
    if not body.strip():
        raise RequestError("body", "must be a JSON object with at least 'prompt'", status=400)
    try:
        value = json.loads(body.decode("utf-8"), parse_int=_parse_int)
    except UnicodeDecodeError as error:
        raise RequestError("body", f"is not UTF-8 ({error.reason} at byte {error.start})", status=400) from None
    except RecursionError:
        raise RequestError("body", f"nests deeper than {MAX_JSON_DEPTH} levels", status=400) from None
    except json.JSONDecodeError as error:
        raise RequestError("body", f"is not valid JSON ({error})", status=400) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError("body", f"nests deeper than {MAX_JSON_DEPTH} levels", status=400)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def _parse_int(text: str):
    try:
        return int(text)
    except ValueError:   # over sys.get_int_max_str_digits()
        return HugeInteger(len(text.lstrip("-")))


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


def from_openai(body: Any, served_model: str, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """OpenAI's fields of a body (``model``, ``size`` as ``"WIDTHxHEIGHT"``, and ``extra`` names)
    split from the rest, which stays this API's request; ``size`` becomes ``width`` and ``height``."""
    if not isinstance(body, dict):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}", status=400)
    body = dict(body)
    openai = {name: body.pop(name) for name in ("model", "size", *extra) if name in body}
    model = openai.get("model")
    if model is not None and model != served_model:
        raise RequestError("model", f"this server serves {served_model!r}, not {model!r}")
    size = openai.get("size")
    if size is not None:
        if "width" in body or "height" in body:
            raise RequestError("size", "give size or width and height, not both")
        width, _, height = size.partition("x") if isinstance(size, str) else ("", "", "")
        if not (width.isdigit() and height.isdigit()):
            raise RequestError("size", f'must be "WIDTHxHEIGHT" such as "832x480", got {size!r}')
        body.update(width=int(width), height=int(height))
    return body, openai


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


def check_layout(layout: ParallelLayout, spec: ModelSpec, world_size: Optional[int] = None) -> None:
    """The rules between a parallel layout, a model and (for a launch) the world size."""
    if world_size is not None and layout.world_size != world_size:
        raise RequestError("ulysses_degree,ring_degree,use_cfg_parallel,pipefusion_parallel_degree",
                           f"ulysses {layout.ulysses_degree} x ring {layout.ring_degree} x cfg {layout.cfg_degree}"
                           f" x pipefusion {layout.pipefusion_parallel_degree} = {layout.world_size}, but the "
                           f"world size is {world_size}")
    if spec.num_attention_heads is not None and spec.num_attention_heads % layout.ulysses_degree:
        raise RequestError("ulysses_degree", f"{spec.name} has {spec.num_attention_heads} attention heads, not "
                           f"divisible by ulysses_degree {layout.ulysses_degree}")
    if layout.use_cfg_parallel and spec.family != "wan":
        raise RequestError("use_cfg_parallel", f"is supported for Wan2.1 only, not {spec.name} (see the README)")
    if layout.pipefusion_parallel_degree > 1 and spec.family != "flux":
        raise RequestError("pipefusion_parallel_degree", f"is supported for FLUX.1 only (xDiT has no PipeFusion "
                           f"for Wan2.1), not {spec.name}")


def check_request(request: GenerationRequest, spec: ModelSpec, layout: ParallelLayout,
                  limits: Optional[Limits] = None) -> None:
    """The rules between a request, the model, the parallel layout and a server's limits."""
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
        from ..parallel.pipefusion import require_pipefusion_support

        try:
            require_pipefusion_support(request.spectrum)
        except SettingError as error:
            raise RequestError(f"cache.{error.field}", error.message) from None


def check_sizes(request: GenerationRequest, rules: SizeRules, layout: ParallelLayout, padded: bool,
                limits: Optional[Limits] = None, model: str = "the model") -> None:
    """The sizes the model's transformer and the sequence-parallel layout accept, and a server's
    bound on a request's work; ``padded``: token counts not divisible by the sequence-parallel
    degree are padded correctly (xDiT's padding path with this project's patches)."""
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
    divisor = layout.sequence_degree
    padding = -tokens % divisor
    if not padding:
        return
    if not padded:
        raise RequestError(names, f"give {tokens} tokens, not divisible by the sequence-parallel degree "
                           f"{divisor} (ulysses x ring), and this xfuser cannot pad them")
    if padding >= (tokens + padding) // divisor:
        raise RequestError(names, f"give {tokens} tokens, which the sequence-parallel degree {divisor} "
                           f"(ulysses x ring) would pad by {padding}, not fewer than each rank's "
                           f"{(tokens + padding) // divisor}; use at least {divisor * (divisor - 1)} tokens")


# ---- flags: one per field, with the same names in the Serve YAML ------------------------------

_REQUEST_FLAGS = ("negative_prompt", "seed", "num_inference_steps", "height", "width", "num_frames",
                  "guidance_scale", "true_cfg_scale")
REQUEST_SETTINGS = (*_REQUEST_FLAGS, "output_format", "cache_method", *(f"spectrum_{name}" for name in SETTINGS))


def flag_of(field: str) -> str:
    """The flag of a request path: ``cache.degree`` is ``--spectrum_degree``."""
    if field == "cache.method":
        return "--cache_method"
    if field.startswith("cache."):
        return f"--spectrum_{field.removeprefix('cache.')}"
    return f"--{field}"


def request_from_settings(values: dict) -> dict:
    """Request-shaped values from flat setting names (``seed``, ``cache_method``,
    ``spectrum_<name>``: the flags and the Serve YAML's names)."""
    request, cache = {}, {}
    for name, value in values.items():
        if name == "cache_method":
            cache["method"] = value
        elif name.startswith("spectrum_"):
            cache[name.removeprefix("spectrum_")] = value
        else:
            request[name] = value
    if cache:
        request["cache"] = cache
    return request


def add_flags(parser, fields: dict, defaults: Optional[dict] = None) -> None:
    """One flag per field (name: pydantic field), its help from the field's description and the
    default (``defaults`` overriding the field's); a flag not given is absent from the parsed
    namespace, and the values stay text until :func:`values_from_flags`."""
    for name, field in fields.items():
        default = (defaults or {}).get(name, field.default)
        shown = "" if default is PydanticUndefined else f" (default: {default})"
        if field.annotation is bool:
            parser.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=field.description)
        else:
            parser.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=name.upper(),
                                help=f"{field.description or ''}{shown}")


def values_from_flags(args: argparse.Namespace, fields: dict) -> dict:
    """The flags given among ``fields`` (name: pydantic field), their text read as JSON where the
    field does not take text; the models then check the values as they check a JSON body."""
    values = {}
    for name, field in fields.items():
        if not hasattr(args, name):
            continue
        text = getattr(args, name)
        values[name] = text if not isinstance(text, str) or _takes_text(field) else _json_or_text(text)
    return values


def flag_fields(names) -> dict:
    """The pydantic field behind each request or layout flag name."""
    return {name: _field_of(name) for name in names}


def _field_of(name: str):
    if name == "cache_method":
        return CacheSettings.model_fields["method"]
    if name.startswith("spectrum_"):
        return CacheSettings.model_fields[name.removeprefix("spectrum_")]
    if name in ParallelLayout.model_fields:
        return ParallelLayout.model_fields[name]
    return GenerationRequest.model_fields[name]


def _takes_text(field) -> bool:
    return field.annotation is str or str in typing.get_args(field.annotation)


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
