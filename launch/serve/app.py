"""The HTTP API of `spectrum-xdit serve`: a Ray Serve deployment whose replicas each run their
requests through an engine (``engine``) on one rank group (``rank_group``).

A replica checks a request completely (the request model, the model's and the layout's rules,
the model's size rules, the server's limits) before it is queued; the engine then runs it on
every rank in lock-step and rank 0 returns the latents or the encoded media. Requests to a replica
run one at a time; several replicas, each with its own group, scale out across the cluster.
Start it with ``spectrum-xdit serve`` or ``serve run`` of ``launch/serve/serve_config.yaml``
(application builder :func:`build_app`).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (``Request``) at run time, through Serve's class-based ingress.
import asyncio
import base64
import dataclasses
import json
import os
import time
from typing import Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ...parallel.patches import pads_correctly
from ..request import CONTENT_TYPES, RequestError, check_request, check_sizes, parse_json, parse_request
from .engine import Engine
from .rank_group import GroupUnavailable, RequestFailed
from .settings import ServeSettings

APP_NAME = "spectrum-xdit"

api = FastAPI(title="spectrum-xdit", description="Spectrum + xDiT generation (see the README, 'Serving').")


async def read_body(http_request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as it grows past ``max_bytes``, before it is all read."""
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError("body", f"is {declared} bytes, more than the server's max_body_bytes {max_bytes}", 413)
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError("body", f"is more than the server's max_body_bytes {max_bytes}", 413)
    return bytes(body)


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(api)
class SpectrumServer:
    """A replica: the HTTP endpoints and request checks; its engine drives the rank group."""

    async def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.spec = self.settings.check()
        self.defaults = self.settings.request_defaults(self.spec)
        self.engine = Engine(self.settings, self.spec.name)

    @api.post("/v1/generate")
    async def generate(self, http_request: Request):
        arrived = time.perf_counter()
        limits = self.settings.limits
        try:
            body = await read_body(http_request, limits.max_body_bytes)
            request = parse_request(parse_json(body), self.defaults)
            check_request(request, self.spec, self.settings.layout, limits)
            check_sizes(request, self.spec.sizes, self.settings.layout, pads_correctly(), limits, self.spec.name)
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        want_json = "application/json" in http_request.headers.get("accept", "").lower()
        job = self.engine.submit(request)
        try:
            # shielded: a client that hangs up leaves its job to finish; nothing is cancelled
            answer = await asyncio.shield(job.done)
        except GroupUnavailable as error:
            return _error(503, f"the rank group is not available: {error}", headers={"Retry-After": "30"})
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        except RequestFailed as failure:
            return _error(failure.status, str(failure), failure.field, headers=failure.headers)

        output_format = request.output_format
        report = dict(answer["report"], seed=request.seed, height=request.height, width=request.width,
                      num_frames=request.num_frames, guidance_scale=request.guidance_scale,
                      output_format=output_format, queue_seconds=job.queue_seconds,
                      request_seconds=time.perf_counter() - arrived)
        content_type = CONTENT_TYPES[output_format]
        if want_json:
            return JSONResponse({"output_format": output_format, "content_type": content_type,
                                 "media": base64.b64encode(answer["media"]).decode("ascii"), "report": report})
        headers = {
            "X-Spectrum-Report": json.dumps(report, separators=(",", ":")),
            "X-Spectrum-NFE": json.dumps(report["nfe"], separators=(",", ":")),
            "X-Spectrum-Real-Steps": json.dumps(report["real_steps"], separators=(",", ":")),
            "X-Spectrum-Denoise-Seconds": f"{report['denoise_seconds']:.4f}",
            "X-Spectrum-Request-Seconds": f"{report['request_seconds']:.4f}",
            "Content-Disposition": f'inline; filename="spectrum-xdit.{output_format}"',
        }
        return Response(content=answer["media"], media_type=content_type, headers=headers)

    @api.get("/healthz")
    async def healthz(self):
        engine, group = self.engine, self.engine.group
        infos = group.infos or []
        shown = ("rank", "device", "pid", "node") if self.settings.debug else ("rank", "device")
        body = {"status": group.state, "model": self._model_name(), "world_size": self.settings.world_size,
                "group": group.current.number, "busy": engine.current is not None, "queue_depth": engine.queue.qsize(),
                "counters": dict(engine.counters, rebuilds=group.rebuilds),
                "workers": [{key: info[key] for key in shown} for info in infos],
                "xfuser_patches": infos[0]["xfuser_patches"] if infos else None}
        if self.settings.debug:
            body["replica_pid"] = os.getpid()
        if group.last_rebuild is not None:
            body["last_rebuild"] = group.last_rebuild
        if group.error is not None:
            body["error"] = group.error
        return JSONResponse(body, status_code=200 if group.state == "ready" else 503)

    @api.get("/v1/config")
    async def config(self):
        settings, spec, group = self.settings, self.spec, self.engine.group
        return {
            "model": self._model_name(),
            "family": spec.family,
            "parallel": {"world_size": settings.world_size, "ulysses_degree": settings.layout.ulysses_degree,
                         "ring_degree": settings.layout.ring_degree, "cfg_degree": 1,
                         "backend": "nccl" if settings.device == "cuda" else "gloo",
                         "device": settings.device, "num_replicas": settings.num_replicas},
            "limits": settings.limits.model_dump(),
            "defaults": settings.default_request(spec).model_dump(exclude={"prompt": True,
                                                                             "cache": {"num_inference_steps"}}),
            "output_formats": list(settings.output_formats(spec)),
            "sizes": group.infos[0]["sizes"] if group.infos else dataclasses.asdict(spec.sizes),
            "batching": "none: requests to a replica run one at a time on its rank group",
        }

    def _model_name(self) -> str:
        """The model as a client may see it: a local folder by its name alone, unless debugging."""
        name = self.spec.name
        return name if self.settings.debug or not os.path.isdir(name) else os.path.basename(os.path.normpath(name))

    def check_health(self):
        """Serve's health check: a replica whose group failed to start repeatedly is replaced."""
        group = self.engine.group
        if group.failed_for_good:
            raise RuntimeError(f"the rank group failed to start {group.setup_failures} times: {group.error}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def resolve_device(settings: ServeSettings) -> str:
    if settings.device != "auto":
        return settings.device
    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_app(args: Optional[dict] = None):
    """The Serve application (also the builder that ``serve run launch/serve/serve_config.yaml``
    calls with the config's ``args``: the flat setting names of ``spectrum-xdit serve``)."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.from_flat(dict(args or {}))
    settings.check()
    settings = settings.model_copy(update={"device": resolve_device(settings)})
    bundle = {"CPU": settings.worker_cpus}
    if settings.device == "cuda":
        bundle["GPU"] = 1
    return SpectrumServer.options(
        num_replicas=settings.num_replicas,
        # Requests wait in the replica (one runs at a time); health and config calls must not
        # queue behind them.
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0},
        placement_group_bundles=[dict(bundle) for _ in range(settings.world_size)],
        placement_group_strategy="PACK",
    ).bind(settings.model_dump())
