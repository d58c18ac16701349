"""The HTTP API of `spectrum-xdit serve` without Ray: server settings, and the checks that turn
a request body into a :class:`GenerationRequest` or a 4xx naming the offending field.

Nothing here imports Ray, so ``spectrum-xdit generate`` and the request checks work without it.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

from ..config import SpectrumConfig
from ..models import DEFAULT_MODEL, ModelSpec, resolve_model
from .flags import add_spectrum_flags, spectrum_settings
from .runner import GenerationRequest, sequence_length

# Spectrum settings with a server-wide default flag (--spectrum_<name>); a request's "cache" object
# takes every SpectrumConfig field but num_inference_steps (which is the request's own).
REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "num_inference_steps", "height", "width", "num_frames",
                  "guidance_scale", "cache", "output_format")
CACHE_FIELDS = ("method", *(f.name for f in fields(SpectrumConfig) if f.name != "num_inference_steps"))
CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "png": "image/png", "npy": "application/x-npy"}
VIDEO_FORMATS = ("mp4", "gif", "npy")
IMAGE_FORMATS = ("png", "npy")
MAX_SEED = 2**63 - 1


def mp4_available() -> bool:
    return importlib.util.find_spec("av") is not None


@dataclass
class ServeSettings:
    """Everything a replica needs; the field names are the `spectrum-xdit serve` flags."""

    model: str = DEFAULT_MODEL
    ulysses_degree: int = 1
    ring_degree: int = 1
    num_replicas: int = 1
    # Defaults of a request (None: the model's); a request must give its prompt.
    negative_prompt: Optional[str] = None
    seed: int = 0
    num_inference_steps: int = 50
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    guidance_scale: float = 5.0
    cache_method: str = "spectrum"
    spectrum_window_size: float = SpectrumConfig.window_size
    spectrum_flex_window: float = SpectrumConfig.flex_window
    spectrum_warmup_steps: int = SpectrumConfig.warmup_steps
    spectrum_degree: int = SpectrumConfig.degree
    spectrum_ridge_lambda: float = SpectrumConfig.ridge_lambda
    spectrum_blend_weight: Union[float, str] = SpectrumConfig.blend_weight
    spectrum_schedule: str = SpectrumConfig.schedule
    spectrum_error_budget: float = SpectrumConfig.error_budget
    spectrum_min_gap: int = SpectrumConfig.min_gap
    spectrum_max_gap: int = SpectrumConfig.max_gap
    spectrum_error_smoothing: float = SpectrumConfig.error_smoothing
    output_format: Optional[str] = None  # None: mp4 for video (gif without PyAV), png for images
    fps: int = 8
    # Limits of a request.
    max_height: int = 1280
    max_width: int = 1280
    max_frames: int = 129
    max_steps: int = 100
    max_prompt_chars: int = 4000
    # Resources and timeouts.
    device: str = "auto"          # auto: cuda when the Ray cluster has GPUs
    worker_cpus: float = 1.0      # CPUs of each rank's actor (and torch threads on CPU)
    setup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0

    @classmethod
    def from_dict(cls, values: dict) -> "ServeSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_args(cls, args) -> "ServeSettings":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def world_size(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def spectrum_defaults(self) -> dict:
        return spectrum_settings(self)

    def check(self) -> ModelSpec:
        """Raise ``ValueError`` on settings no request could run with; return the model spec."""
        spec = resolve_model(self.model)
        for name in ("ulysses_degree", "ring_degree", "num_replicas", "max_height", "max_width", "max_frames",
                     "max_steps", "max_prompt_chars", "fps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if spec.num_attention_heads is not None and spec.num_attention_heads % self.ulysses_degree:
            raise ValueError(f"{spec.name} has {spec.num_attention_heads} attention heads, not divisible by "
                             f"ulysses_degree {self.ulysses_degree}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not self.worker_cpus > 0:
            raise ValueError(f"worker_cpus must be > 0, got {self.worker_cpus!r}")
        if self.cache_method not in ("spectrum", "none"):
            raise ValueError(f"cache_method must be spectrum or none, got {self.cache_method!r}")
        formats = VIDEO_FORMATS if spec.is_video else IMAGE_FORMATS
        if self.output_format is not None and self.output_format not in formats:
            raise ValueError(f"output_format for {spec.name} must be one of {', '.join(formats)}")
        # The defaults must make a valid request themselves.
        try:
            parse_request({"prompt": "a check of the defaults"}, self, spec)
        except RequestError as error:
            raise ValueError(f"the default {error.field}: {error.message}") from None
        return spec

    def default_output_format(self, spec: ModelSpec) -> str:
        if self.output_format is not None:
            return self.output_format
        if not spec.is_video:
            return "png"
        return "mp4" if mp4_available() else "gif"

    def limits(self) -> dict:
        return {"max_height": self.max_height, "max_width": self.max_width, "max_frames": self.max_frames,
                "max_steps": self.max_steps, "max_prompt_chars": self.max_prompt_chars}

    def request_defaults(self, spec: ModelSpec) -> dict:
        return {
            "negative_prompt": self.negative_prompt, "seed": self.seed,
            "num_inference_steps": self.num_inference_steps, "height": self.height or spec.height,
            "width": self.width or spec.width, "num_frames": (self.num_frames or spec.num_frames) if spec.is_video else 1,
            "guidance_scale": self.guidance_scale,
            "cache": {"method": self.cache_method, **self.spectrum_defaults()},
            "output_format": self.default_output_format(spec),
        }


class RequestError(ValueError):
    """A bad request: ``status`` (400 malformed body, 422 a bad field) and the field's name."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.status = status

    def to_dict(self) -> dict:
        return {"error": f"{self.field}: {self.message}", "field": self.field}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(name: str, value, minimum: int, maximum: int, limit_name: str = "") -> int:
    if not _is_int(value):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise RequestError(name, f"must be >= {minimum}, got {value}")
    if value > maximum:
        where = f" (the server's {limit_name})" if limit_name else ""
        raise RequestError(name, f"must be <= {maximum}{where}, got {value}")
    return value


def parse_request(payload: Any, settings: ServeSettings, spec: ModelSpec) -> tuple[GenerationRequest, str]:
    """The request a body asks for, with the server's defaults filled in, and its output format.

    Checks everything that does not depend on the built pipeline; :func:`check_geometry` checks
    the sizes against it. Raises :class:`RequestError`.
    """
    if not isinstance(payload, dict):
        raise RequestError("body", f"must be a JSON object, got {type(payload).__name__}", status=400)
    unknown = [name for name in payload if name not in REQUEST_FIELDS]
    if unknown:
        raise RequestError(unknown[0], f"unknown field; allowed: {', '.join(REQUEST_FIELDS)}")
    defaults = settings.request_defaults(spec)
    values = {name: payload.get(name) for name in REQUEST_FIELDS}
    for name, value in values.items():
        if value is None and name in defaults:
            values[name] = defaults[name]

    prompt = values["prompt"]
    if prompt is None:
        raise RequestError("prompt", "is required")
    for name in ("prompt", "negative_prompt"):
        value = values[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise RequestError(name, f"must be a string, got {type(value).__name__}")
        if len(value) > settings.max_prompt_chars:
            raise RequestError(name, f"must be at most {settings.max_prompt_chars} characters (the server's "
                               f"max_prompt_chars), got {len(value)}")
    if not prompt.strip():
        raise RequestError("prompt", "must not be empty")

    seed = _int_field("seed", values["seed"], 0, MAX_SEED)
    steps = _int_field("num_inference_steps", values["num_inference_steps"], 1, settings.max_steps, "max_steps")
    height = _int_field("height", values["height"], 1, settings.max_height, "max_height")
    width = _int_field("width", values["width"], 1, settings.max_width, "max_width")
    if spec.is_video:
        num_frames = _int_field("num_frames", values["num_frames"], 1, settings.max_frames, "max_frames")
    else:
        num_frames = values["num_frames"]
        if not (_is_int(num_frames) and num_frames == 1):
            raise RequestError("num_frames", f"{spec.name} makes images: num_frames must be 1 or absent, "
                               f"got {num_frames!r}")
    guidance = values["guidance_scale"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise RequestError("guidance_scale", f"must be a finite number >= 0, got {guidance!r}")

    cache = payload.get("cache")
    if cache is None:
        cache = {}
    if not isinstance(cache, dict):
        raise RequestError("cache", f"must be a JSON object with fields {', '.join(CACHE_FIELDS)}, "
                           f"got {type(cache).__name__}")
    unknown = [name for name in cache if name not in CACHE_FIELDS]
    if unknown:
        raise RequestError(f"cache.{unknown[0]}", f"unknown field; allowed: {', '.join(CACHE_FIELDS)}")
    cache = {**defaults["cache"], **{k: v for k, v in cache.items() if v is not None}}
    method = cache.pop("method")
    if method not in ("spectrum", "none"):
        raise RequestError("cache.method", f"must be 'spectrum' or 'none', got {method!r}")
    try:
        spectrum = SpectrumConfig(num_inference_steps=steps, **cache)
    except ValueError as error:
        message = str(error)
        name = message.split(" ", 1)[0].removeprefix("SpectrumConfig.")
        raise RequestError(f"cache.{name}" if name in CACHE_FIELDS else name,
                           message.removeprefix(f"SpectrumConfig.{name} ")) from None

    output_format = values["output_format"]
    formats = VIDEO_FORMATS if spec.is_video else IMAGE_FORMATS
    if output_format not in formats:
        raise RequestError("output_format", f"must be one of {', '.join(formats)} for {spec.name}, "
                           f"got {output_format!r}")
    if output_format == "mp4" and not mp4_available():
        raise RequestError("output_format", "mp4 needs PyAV, which this server lacks; use gif or npy")

    request = GenerationRequest(
        prompt=prompt, num_inference_steps=steps, height=height, width=width, num_frames=num_frames, seed=seed,
        guidance_scale=float(guidance), negative_prompt=values["negative_prompt"],
        spectrum=spectrum if method == "spectrum" else None)
    return request, output_format


def check_geometry(request: GenerationRequest, geometry: dict, model: str) -> None:
    """Sizes the built pipeline and the sequence-parallel layout accept; raises :class:`RequestError`."""
    spatial = geometry["spatial_multiple"]
    for name in ("height", "width"):
        value = getattr(request, name)
        if value % spatial:
            raise RequestError(name, f"must be a multiple of {spatial} for {model}, got {value}")
    if geometry["family"] == "wan" and (request.num_frames - 1) % geometry["temporal_multiple"]:
        multiple = geometry["temporal_multiple"]
        raise RequestError("num_frames", f"must be 1 more than a multiple of {multiple} for {model}, "
                           f"got {request.num_frames}")
    divisor = geometry["tokens_divisor"]
    tokens = sequence_length(geometry, request.height, request.width, request.num_frames)
    padding = -tokens % divisor
    if not padding:
        return
    names = "height,width,num_frames" if geometry["family"] == "wan" else "height,width"
    if not geometry.get("padding"):
        raise RequestError(names, f"give {tokens} tokens, not divisible by the sequence-parallel degree "
                           f"{divisor} (ulysses x ring), and this server cannot pad them")
    if padding >= (tokens + padding) // divisor:
        raise RequestError(names, f"give {tokens} tokens, which the sequence-parallel degree {divisor} "
                           f"(ulysses x ring) would pad by {padding}, not fewer than each rank's "
                           f"{(tokens + padding) // divisor}; use at least {divisor * (divisor - 1)} tokens")


def add_serve_arguments(parser) -> None:
    """The flags of `spectrum-xdit serve`: one per :class:`ServeSettings` field, plus where to run."""
    defaults = ServeSettings()
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto); default: start a local Ray instance")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--model", default=defaults.model,
                        help="tiny-wan, tiny-flux, digits-wan, a local diffusers folder or a hub id")
    parser.add_argument("--ulysses_degree", type=int, default=1)
    parser.add_argument("--ring_degree", type=int, default=1)
    parser.add_argument("--num_replicas", type=int, default=1, help="replicas, each with its own rank group")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: one GPU per rank when the Ray cluster has GPUs")
    parser.add_argument("--worker_cpus", type=float, default=defaults.worker_cpus,
                        help="CPUs reserved for each rank (torch threads on CPU)")
    request = parser.add_argument_group("request defaults")
    request.add_argument("--negative_prompt", default=None)
    request.add_argument("--seed", type=int, default=defaults.seed)
    request.add_argument("--num_inference_steps", type=int, default=defaults.num_inference_steps)
    request.add_argument("--height", type=int, default=None, help="default: the model's")
    request.add_argument("--width", type=int, default=None, help="default: the model's")
    request.add_argument("--num_frames", type=int, default=None, help="default: the model's")
    request.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale)
    request.add_argument("--cache_method", choices=["spectrum", "none"], default=defaults.cache_method)
    add_spectrum_flags(request, defaults.spectrum_defaults())
    request.add_argument("--output_format", choices=sorted(CONTENT_TYPES), default=None,
                         help="default: mp4 for video (gif without PyAV), png for images")
    request.add_argument("--fps", type=int, default=defaults.fps, help="frame rate of mp4 and gif answers")
    limits = parser.add_argument_group("limits")
    for name in ("max_height", "max_width", "max_frames", "max_steps", "max_prompt_chars"):
        limits.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    limits.add_argument("--setup_timeout_s", type=float, default=defaults.setup_timeout_s)
    limits.add_argument("--request_timeout_s", type=float, default=defaults.request_timeout_s)
