"""What a `spectrum-xdit serve` replica needs: the model, its rank group's layout, resources,
timeouts, a request's limits and defaults. The flags and the Serve YAML's ``args`` use the same flat
names; request defaults go through the request model. Nothing here imports Ray."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ...models import DEFAULT_MODEL, ModelSpec, resolve_model
from ..flags import REQUEST_SETTINGS, add_flags, flag_fields, request_from_settings, values_from_flags
from ..request import (
    OUTPUT_FORMATS,
    GenerationRequest,
    Limits,
    ParallelLayout,
    RequestError,
    model_defaults,
    mp4_available,
    parse_request,
)
from ..validate import validate

SERVED_LAYOUT = ("ulysses_degree", "ring_degree")
BROKER_SCHEMES = ("sqlite", "redis", "rediss", "memory")


def parse_broker_url(url: str) -> tuple[str, str]:
    """``broker_url``'s scheme and the rest (a SQLite file's path): the one rule that both the
    settings and the replicas' job store read it by, so a URL the settings accept opens."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in BROKER_SCHEMES:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in BROKER_SCHEMES)}, got {url!r}")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"a SQLite file is sqlite:///PATH (three slashes; four for an absolute path), got {url!r}")
        rest = rest[1:]
    return scheme, rest
API_KEY_ENV = "SPECTRUM_XDIT_API_KEY"


class ServeSettings(BaseModel):
    """Settings of every replica; ``defaults`` are request-shaped (``{"seed": 1, "cache": {...}}``)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    model: str = Field(DEFAULT_MODEL, description="tiny-wan, tiny-flux, digits-wan, a local diffusers folder or a hub id")
    layout: ParallelLayout = Field(default_factory=ParallelLayout)
    num_replicas: int = Field(1, ge=1, description="replicas, each with its own rank group")
    min_replicas: Optional[int] = Field(None, ge=0, description=(
        "Ray Serve autoscaling: fewest replicas (with max_replicas, in place of num_replicas)"))
    max_replicas: Optional[int] = Field(None, ge=1, validate_default=True,
                                        description="Ray Serve autoscaling: most replicas")
    # Autoscaling on the jobs a replica holds (``autoscaling``): Serve's own target of ongoing
    # requests never sees a queued or running /v1/videos job, only the request that created it.
    target_queue_depth: Optional[float] = Field(None, gt=0, description=(
        "Ray Serve autoscaling: jobs (queued and running) per replica it aims at; default max_batch_size "
        "(1 when sequential), a replica's full step loop"))
    upscale_delay_s: Optional[float] = Field(None, ge=0, description=(
        "Ray Serve autoscaling: seconds the jobs must ask for more replicas before one is added (Serve's 30)"))
    downscale_delay_s: Optional[float] = Field(None, ge=0, description=(
        "Ray Serve autoscaling: seconds the jobs must ask for fewer replicas before one is removed (Serve's 600)"))
    look_back_period_s: Optional[float] = Field(None, gt=0, description=(
        "Ray Serve autoscaling: seconds over which each replica's job counts are averaged (Serve's 30)"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: one GPU per rank when the Ray cluster has GPUs")
    worker_cpus: float = Field(1.0, gt=0, description="CPUs reserved for each rank (torch threads on CPU)")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field("STRICT_PACK", description=(
        "Ray placement of a replica's ranks: STRICT_PACK keeps them on one node, whose links carry their "
        "all-to-alls; PACK lets a group spread over nodes when one node cannot hold it; SPREAD, STRICT_SPREAD "
        "put its ranks on different nodes"))
    fps: int = Field(8, ge=1, description="frame rate of mp4 and gif answers")
    setup_timeout_s: float = Field(900.0, gt=0, description="seconds a rank group may take to start")
    request_timeout_s: float = Field(3600.0, gt=0, description=(
        "seconds a request may run on the ranks before it is stopped at a step boundary (504)"))
    probe_interval_s: float = Field(5.0, gt=0, description="seconds between health probes of idle ranks")
    max_queue_size: int = Field(64, ge=1, description="jobs waiting in the shared queue; one more is answered 429")
    result_ttl_s: float = Field(3600.0, gt=0, description="seconds a finished job's record and media stay readable")
    max_result_bytes: int = Field(1 << 30, ge=0, description=(
        "bytes of finished media the results store keeps; past it the oldest jobs are forgotten"))
    # The shared job queue (job_store): every replica pulls from it and reads every job's record.
    broker_url: Optional[str] = Field(None, description=(
        "where jobs wait and their records live: sqlite:///PATH (default: $XDG_STATE_HOME/spectrum-xdit/"
        "jobs.db, replicas on one node), redis://HOST:PORT/DB (replicas on several nodes), or memory:// "
        "(in the replica's memory: one replica, nothing survives it)"))
    results_url: Optional[str] = Field(None, description=(
        "where finished media go: a folder or any fsspec URL (default: results/ beside the SQLite file; "
        "memory:// with the memory broker)"))
    lease_s: float = Field(30.0, gt=0, description=(
        "seconds a running job's lease lasts; its replica renews it, and a job whose lease expired (its "
        "replica died) goes back to the queue"))
    max_images: int = Field(4, ge=1, le=16, description="most images (n) of one /v1/images/generations request")
    batching: Literal["auto", "sequential", "batched", "continuous"] = Field("auto", description=(
        "sequential: one request at a time; batched: requests that arrive together share the denoising "
        "steps; continuous: a request joins the running steps at once; auto: continuous (sequential for "
        "Wan2.2 TI2V, whose timesteps are per token)"))
    max_batch_size: int = Field(8, ge=1, le=256, description=(
        "most requests in a replica's batch (their block-stack rows are at most this, twice with guidance)"))
    debug: bool = Field(False, description="show PIDs, node addresses and model paths in /healthz and /v1/config")
    api_key: list[str] = Field(default_factory=list, repr=False, description=(
        "a key every request but /healthz must give as Authorization: Bearer KEY (repeat for several; also "
        f"api_key_file and {API_KEY_ENV})"))
    api_key_file: Optional[str] = Field(None, description="a file of API keys, one per line (# starts a comment)")
    limits: Limits = Field(default_factory=Limits)
    defaults: dict = Field(default_factory=dict, description="request defaults, request-shaped")

    @field_validator("api_key", mode="before")
    @classmethod
    def _one_or_more_keys(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _printable_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            _check_key(key, "a key")
        return keys

    @field_validator("api_key_file")
    @classmethod
    def _readable_key_file(cls, path: Optional[str]) -> Optional[str]:
        if path is not None:
            _file_keys(path)
        return path

    def with_api_keys(self) -> "ServeSettings":
        """These settings with every API key in ``api_key``: the flags' or YAML's, the file's and
        the environment's, read here (on the machine that deploys, not on the replicas' nodes)."""
        keys = [*self.api_key, *(_file_keys(self.api_key_file) if self.api_key_file else ())]
        if os.environ.get(API_KEY_ENV):
            keys.append(_check_key(os.environ[API_KEY_ENV], API_KEY_ENV))
        return self.model_copy(update={"api_key": list(dict.fromkeys(keys)), "api_key_file": None})

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, url: Optional[str]) -> Optional[str]:
        if url is not None:
            parse_broker_url(url)
        return url

    def with_job_store(self) -> "ServeSettings":
        """These settings with ``broker_url`` and ``results_url`` resolved here, on the machine that
        deploys: the default SQLite file and results folder as absolute paths, since the replicas
        run in Ray's working directories. The memory broker serves one replica only."""
        broker = self.broker_url or f"sqlite:///{state_dir() / 'jobs.db'}"
        scheme, location = parse_broker_url(broker)
        if scheme == "sqlite":
            location = Path(location).expanduser().absolute()
            broker = f"sqlite:///{location}"
        results = self.results_url or ("memory://spectrum-xdit/results" if scheme == "memory"
                                        else str(location.parent / "results") if scheme == "sqlite"
                                        else str(state_dir() / "results"))
        if "://" not in results:
            results = str(Path(results).expanduser().absolute())
        if scheme == "memory" and (self.num_replicas > 1 or (self.max_replicas or 1) > 1):
            raise ValueError("broker_url: memory:// keeps each replica's jobs to itself; with several replicas "
                             "use sqlite:///PATH (one node) or redis://HOST:PORT/DB")
        return self.model_copy(update={"broker_url": broker, "results_url": results})

    @field_validator("min_replicas")
    @classmethod
    def _not_with_num_replicas(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and info.data.get("num_replicas", 1) != 1:
            raise ValueError("give num_replicas or min_replicas and max_replicas, not both")
        return value

    @field_validator("max_replicas")
    @classmethod
    def _with_min_replicas(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        least = info.data.get("min_replicas")
        if (value is None) != (least is None) and "min_replicas" in info.data:
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if value is not None and least is not None and least > value:
            raise ValueError(f"must be at least min_replicas {least}, got {value}")
        return value

    @field_validator("target_queue_depth", "upscale_delay_s", "downscale_delay_s", "look_back_period_s")
    @classmethod
    def _autoscaled(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        if value is not None and info.data.get("max_replicas") is None:
            raise ValueError("needs min_replicas and max_replicas")
        return value

    def autoscaling_config(self) -> Optional[dict]:
        """Ray Serve's ``autoscaling_config`` but its policy (``app.deployment_options``), or
        ``None`` for a fixed ``num_replicas``."""
        if self.min_replicas is None:
            return None
        config = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas}
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        return config

    @property
    def jobs_per_replica(self) -> float:
        """The autoscaling target: ``target_queue_depth``, else what one replica runs at once."""
        if self.target_queue_depth is not None:
            return self.target_queue_depth
        return float(self.max_batch_size if self.step_batching else 1)

    @field_validator("layout")
    @classmethod
    def _sequence_parallel_only(cls, layout: ParallelLayout) -> ParallelLayout:
        if layout.use_cfg_parallel or layout.pipefusion_parallel_degree > 1:
            raise ValueError("the server runs sequence-parallel rank groups (ulysses_degree x ring_degree)")
        return layout

    @property
    def step_batching(self) -> Optional[str]:
        """``"batched"`` or ``"continuous"`` when the replicas run a step loop, else ``None``."""
        if self.batching == "auto":
            return "continuous" if resolve_model(self.model).step_batchable else None
        return None if self.batching == "sequential" else self.batching

    @classmethod
    def from_flat(cls, values: dict) -> "ServeSettings":
        """From the flags' and the Serve YAML's names; ``ValueError`` naming the setting."""
        values = dict(values)
        layout = {name: values.pop(name) for name in ParallelLayout.model_fields if name in values}
        limits = {name: values.pop(name) for name in Limits.model_fields if name in values}
        defaults = request_from_settings({name: values.pop(name) for name in REQUEST_SETTINGS if name in values})
        try:
            return cls(layout=layout, limits=limits, defaults=defaults, **values)
        except ValidationError as error:
            problem = RequestError.from_validation(error)
        name = problem.field.removeprefix("layout.").removeprefix("limits.")
        if problem.message == "unknown field":
            raise ValueError(f"unknown serve setting {name!r}; known: {', '.join(sorted(known_settings()))}")
        raise ValueError(f"{name}: {problem.message}")

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def request_defaults(self, spec: ModelSpec) -> dict:
        """What a request takes for each field it leaves out."""
        family_format = "png" if not spec.is_video else "mp4" if mp4_available() else "gif"
        base = {**model_defaults(spec), "output_format": family_format}
        return {**base, **self.defaults, "cache": dict(self.defaults.get("cache", {}))}

    def default_request(self, spec: ModelSpec) -> GenerationRequest:
        """What a body with a prompt alone asks for (``RequestError`` if the defaults are bad)."""
        return parse_request({"prompt": "the defaults"}, self.request_defaults(spec))

    def check(self) -> ModelSpec:
        """Raise ``ValueError`` on settings no request could run with; return the model spec."""
        spec = resolve_model(self.model)
        if self.batching in ("batched", "continuous") and not spec.step_batchable:
            raise ValueError(f"batching: {self.batching} runs a timestep per sample; serve Wan2.2 TI2V models "
                             "(a timestep per token) with batching sequential (or auto)")
        try:
            defaults = self.default_request(spec)
            if spec.needs_image:   # checked as a request that gives its first frame, as each must
                defaults = defaults.model_copy(update={"image": "the request's own"})
            validate(defaults, spec, self.layout, self.limits)
        except RequestError as error:
            if error.field in ParallelLayout.model_fields:
                raise ValueError(str(error)) from None
            raise ValueError(f"the default {error.field}: {error.message}") from None
        return spec

    def output_formats(self, spec: ModelSpec) -> tuple[str, ...]:
        return OUTPUT_FORMATS[spec.family]


def state_dir() -> Path:
    """Where the embedded job store lives by default (the XDG base directory spec's state home)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "spectrum-xdit"


def _check_key(key: str, what: str) -> str:
    """A key as a Bearer token carries it: printable ASCII, no spaces (never shown in errors)."""
    if not key or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"{what} must be printable ASCII without spaces")
    return key


def _file_keys(path: str) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    keys = [line.split("#", 1)[0].strip() for line in lines]
    keys = [_check_key(key, f"each key of {path}") for key in keys if key]
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys


def setting_fields() -> dict:
    """Every flat setting name and its field."""
    own = {name: field for name, field in ServeSettings.model_fields.items() if name not in ("layout", "limits", "defaults")}
    layout = {name: ParallelLayout.model_fields[name] for name in SERVED_LAYOUT}
    return {**own, **layout, **Limits.model_fields, **flag_fields(REQUEST_SETTINGS)}


def known_settings() -> set[str]:
    return set(setting_fields())


def add_serve_arguments(parser) -> None:
    """The flags of `spectrum-xdit serve`: where to run, then one per setting."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (e.g. auto); default: start a local Ray instance")
    parser.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray instance")
    fields = setting_fields()
    groups = {"replica": [*(n for n in ServeSettings.model_fields if n in fields), *SERVED_LAYOUT],
              "request defaults": REQUEST_SETTINGS, "limits of a request": list(Limits.model_fields)}
    for title, names in groups.items():
        add_flags(parser.add_argument_group(title), {name: fields[name] for name in names})


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings.from_flat(values_from_flags(args, setting_fields()))
