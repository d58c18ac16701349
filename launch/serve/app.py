"""The HTTP API of `spectrum-xdit serve`: a Ray Serve deployment whose replicas each drive one
rank group (``rank_group``).

A replica checks a request completely (the request model, the model's and the layout's rules,
the sizes of the built pipeline) before any rank sees it, then sends it to every rank; the ranks
run it in lock-step and rank 0 returns the latents or the encoded media. Requests to a replica
run one at a time, queued in the replica; several replicas, each with its own group, scale out
across the cluster. Start it with ``spectrum-xdit serve`` or ``serve run`` of
``launch/serve/serve_config.yaml`` (application builder :func:`build_app`).
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# (``Request``) at run time, through Serve's class-based ingress.
import asyncio
import base64
import json
import os
import time
from typing import Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from ..request import CONTENT_TYPES, RequestError, check_geometry, check_request, parse_request
from .rank_group import GroupFailure, GroupUnavailable, RankGroup
from .settings import ServeSettings

APP_NAME = "spectrum-xdit"

api = FastAPI(title="spectrum-xdit", description="Spectrum + xDiT generation (see the README, 'Serving').")


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


@serve.deployment
@serve.ingress(api)
class SpectrumServer:
    """A replica: the HTTP endpoints, request checks, and the rank group it drives."""

    async def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.spec = self.settings.check()
        self.defaults = self.settings.request_defaults(self.spec)
        self._lock = asyncio.Lock()
        self._busy = False
        self._counters = {"dispatched": 0, "succeeded": 0, "failed": 0}
        self.group = RankGroup(self.settings)

    async def _serve(self, request, arrived: float):
        """Under the replica's lock: wait for the group, check sizes, run on every rank."""
        async with self._lock:
            queue_seconds = time.perf_counter() - arrived
            try:
                generation = await self.group.ready()
            except GroupUnavailable as error:
                return None, _error(503, f"the rank group is not available: {error}",
                                    headers={"Retry-After": "30"}), queue_seconds
            try:
                check_geometry(request, generation.infos[0]["geometry"], self.spec.name)
            except RequestError as error:
                return None, _error(error.status, str(error), error.field), queue_seconds
            self._busy = True
            self._counters["dispatched"] += 1
            try:
                answer = await self.group.run(generation, request)
            except GroupFailure as failure:
                self._counters["failed"] += 1
                return None, _error(failure.status, str(failure), headers=failure.headers), queue_seconds
            finally:
                self._busy = False
            self._counters["succeeded"] += 1
            return answer, None, queue_seconds

    @api.post("/v1/generate")
    async def generate(self, http_request: Request):
        arrived = time.perf_counter()
        body = await http_request.body()
        try:
            payload = json.loads(body) if body.strip() else None
            if payload is None:
                raise RequestError("body", "must be a JSON object with at least 'prompt'", status=400)
            request = parse_request(payload, self.defaults)
            check_request(request, self.spec, self.settings.layout, self.settings.limits)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"body: not valid JSON ({error})", "body")
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        want_json = "application/json" in http_request.headers.get("accept", "").lower()

        # Shielded: a client that hangs up does not stop the ranks half-way, and the lock is held
        # until they are done.
        answer, failure, queue_seconds = await asyncio.shield(self._serve(request, arrived))
        if failure is not None:
            return failure

        output_format = request.output_format
        report = dict(answer["report"], seed=request.seed, height=request.height, width=request.width,
                      num_frames=request.num_frames, guidance_scale=request.guidance_scale,
                      output_format=output_format, queue_seconds=queue_seconds,
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
        group = self.group
        infos = group.infos or []
        body = {"status": group.state, "model": self.spec.name, "world_size": self.settings.world_size,
                "group": group.current.number, "busy": self._busy,
                "counters": dict(self._counters, rebuilds=group.rebuilds),
                "replica_pid": os.getpid(), "workers": [{k: v for k, v in info.items() if k != "xfuser_patches"}
                                                   for info in infos],
                "xfuser_patches": infos[0]["xfuser_patches"] if infos else None}
        if group.error is not None:
            body["error"] = group.error
        return JSONResponse(body, status_code=200 if group.state == "ready" else 503)

    @api.get("/v1/config")
    async def config(self):
        settings, spec, group = self.settings, self.spec, self.group
        return {
            "model": spec.name,
            "family": spec.family,
            "parallel": {"world_size": settings.world_size, "ulysses_degree": settings.layout.ulysses_degree,
                         "ring_degree": settings.layout.ring_degree, "cfg_degree": 1,
                         "backend": "nccl" if settings.device == "cuda" else "gloo",
                         "device": settings.device, "num_replicas": settings.num_replicas},
            "limits": settings.limits.model_dump(),
            "defaults": settings.default_request(spec).model_dump(exclude={"prompt": True,
                                                                             "cache": {"num_inference_steps"}}),
            "output_formats": list(settings.output_formats(spec)),
            "sizes": group.infos[0]["geometry"] if group.infos else None,
            "batching": "none: requests to a replica run one at a time on its rank group",
        }

    def check_health(self):
        """Serve's health check: a replica whose group failed to start repeatedly is replaced."""
        if self.group.failed_for_good:
            raise RuntimeError(f"the rank group failed to start {self.group.setup_failures} times: {self.group.error}")

    def __del__(self):
        group = getattr(self, "group", None)
        if group is not None:
            group.kill()


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
