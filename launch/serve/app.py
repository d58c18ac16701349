"""The HTTP API of `spectrum-xdit serve`: a Ray Serve deployment whose replicas each run their
requests through an engine (``engine``) on one rank group (``rank_group``).

A replica checks a request completely (the request model, the model's and the layout's rules,
the model's size rules, the server's limits) before it is queued; the engine then runs it on
every rank in lock-step, alone or in the replica's step loop with the other jobs, and rank 0
returns the latents or the encoded media. Several replicas, each with its own group, scale out
across the cluster.
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

from ..request import CONTENT_TYPES, RequestError, parse_request
from ..validate import validate
from .body import parse_json, read_body
from .engine import Engine, QueueFull
from .openai_shapes import from_openai
from .rank_group import GroupUnavailable, RequestFailed
from .settings import ServeSettings

APP_NAME = "spectrum-xdit"

api = FastAPI(title="spectrum-xdit", description="Spectrum + xDiT generation (docs/serving.md).")


def _failure(error: Exception) -> JSONResponse:
    """The answer of a job that did not complete."""
    if isinstance(error, GroupUnavailable):
        return _error(503, f"the rank group is not available: {error}", headers={"Retry-After": "30"})
    if isinstance(error, RequestError):
        return _error(error.status, str(error), error.field)
    if isinstance(error, RequestFailed):
        return _error(error.status, str(error), error.field, headers=error.headers)
    return _error(500, f"{type(error).__name__}: {error}")


def _image_count(n, most: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise RequestError("n", f"must be an integer from 1 to {most} (the server's max_images), got {n!r}")
    return n


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
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = Engine(self.settings, self.spec)

    async def _checked(self, http_request: Request, openai: Optional[tuple[str, ...]] = None):
        """The request of a body, checked completely; with ``openai`` (a tuple of names), OpenAI's
        ``model`` and ``size`` are read too, and those fields returned apart."""
        limits = self.settings.limits
        payload = parse_json(await read_body(http_request, limits.max_body_bytes))
        extra = {}
        if openai is not None:
            payload, extra = from_openai(payload, self._model_name(), openai)
        request = parse_request(payload, self.defaults)
        validate(request, self.spec, self.settings.layout, limits)
        return request, extra

    def _submit(self, request, kept: bool = False):
        try:
            return self.engine.submit(request, kept=kept), None
        except QueueFull as error:
            return None, _error(429, f"the server is busy: {error}; retry later", headers={"Retry-After": "10"})

    @api.post("/v1/generate")
    async def generate(self, http_request: Request):
        arrived = time.perf_counter()
        try:
            request, _ = await self._checked(http_request)
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        job, refused = self._submit(request)
        if refused is not None:
            return refused
        try:
            # shielded: a client that hangs up leaves its job to finish; nothing is cancelled
            answer = await asyncio.shield(job.done)
        except Exception as error:
            return _failure(error)
        output_format = request.output_format
        report = dict(self._report(job), request_seconds=time.perf_counter() - arrived)
        content_type = CONTENT_TYPES[output_format]
        if "application/json" in http_request.headers.get("accept", "").lower():
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

    # -- OpenAI's shapes ------------------------------------------------------------------------

    @api.post("/v1/videos")
    async def create_video(self, http_request: Request):
        """An asynchronous video job: answered at once with the job object; poll it, fetch its
        content once completed, or delete it."""
        if not self.spec.is_video:
            return _error(404, f"{self._model_name()} makes images: use POST /v1/images/generations")
        try:
            request, _ = await self._checked(http_request, openai=())
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        job, refused = self._submit(request, kept=True)
        return refused if refused is not None else JSONResponse(await self._video(job))

    @api.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str):
        job = self._kept(video_id)
        return job if isinstance(job, JSONResponse) else JSONResponse(await self._video(job))

    @api.get("/v1/videos/{video_id}/content")
    async def get_video_content(self, video_id: str):
        job = self._kept(video_id)
        if isinstance(job, JSONResponse):
            return job
        if job.status != "completed":
            return _error(409, f"video {video_id} is {job.status}, not completed; poll GET /v1/videos/{video_id}")
        output_format = job.request.output_format
        return Response(content=job.answer["media"], media_type=CONTENT_TYPES[output_format],
                        headers={"Content-Disposition": f'inline; filename="{video_id}.{output_format}"'})

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str):
        """Cancels a queued job, stops a running one after its current step, forgets a finished
        one; the id is unknown afterwards."""
        try:
            self.engine.remove(video_id)
        except KeyError:
            return _error(404, f"no video {video_id}", "video_id")
        return JSONResponse({"id": video_id, "object": "video", "deleted": True})

    @api.post("/v1/images/generations")
    async def create_images(self, http_request: Request):
        """OpenAI's image generation, synchronous: ``n`` images of seeds ``seed .. seed + n - 1``,
        as ``b64_json`` PNGs."""
        if self.spec.is_video:
            return _error(404, f"{self._model_name()} makes videos: use POST /v1/videos")
        arrived = time.perf_counter()
        try:
            request, extra = await self._checked(http_request, openai=("n", "response_format"))
            count = _image_count(extra.get("n", 1), self.settings.max_images)
            if extra.get("response_format", "b64_json") != "b64_json":
                raise RequestError("response_format", f"must be b64_json (this server keeps no files), got "
                                   f"{extra['response_format']!r}")
            if request.output_format != "png":
                raise RequestError("output_format", "images are answered as PNG")
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        if len(self.engine.pending) + count > self.settings.max_queue_size:
            return _error(429, f"the server is busy: {len(self.engine.pending)} jobs are waiting; retry later",
                          headers={"Retry-After": "10"})
        jobs = [self.engine.submit(request.model_copy(update={"seed": request.seed + index}))
                for index in range(count)]
        try:
            answers = await asyncio.shield(asyncio.gather(*[job.done for job in jobs]))
        except Exception as error:
            return _failure(error)
        return JSONResponse({"created": int(time.time()),
                             "data": [{"b64_json": base64.b64encode(answer["media"]).decode("ascii")}
                                      for answer in answers],
                             "reports": [dict(self._report(job), request_seconds=time.perf_counter() - arrived)
                                         for job in jobs]})

    def _kept(self, video_id: str):
        try:
            return self.engine.job(video_id)
        except KeyError:
            return _error(404, f"no video {video_id} (never created, deleted, or expired)", "video_id")

    async def _video(self, job) -> dict:
        """OpenAI's video object of a job, with this server's report once it is completed."""
        request = job.request
        steps = await self.engine.progress(job)
        body = {"id": job.id, "object": "video", "model": self._model_name(), "status": job.status,
                "progress": 100 if job.status == "completed" else int(100 * steps / request.num_inference_steps),
                "created_at": job.created_at, "size": f"{request.width}x{request.height}",
                "num_frames": request.num_frames, "output_format": request.output_format}
        if job.completed_at is not None:
            body["completed_at"] = int(job.completed_at)
        if job.status == "completed":
            body["report"] = self._report(job)
        if job.status == "failed":
            error = job.error
            body["error"] = {"message": str(error), "code": getattr(error, "status", 500),
                             "field": getattr(error, "field", None)}
        return body

    def _report(self, job) -> dict:
        request = job.request
        return dict(job.answer["report"], seed=request.seed, height=request.height, width=request.width,
                    num_frames=request.num_frames, output_format=request.output_format,
                    queue_seconds=job.queue_seconds, replica=self.replica)

    @api.get("/healthz")
    async def healthz(self):
        engine, group = self.engine, self.engine.group
        infos = group.infos or []
        shown = ("rank", "device", "pid", "node") if self.settings.debug else ("rank", "device")
        body = {"status": group.state, "replica": self.replica, "model": self._model_name(),
                "world_size": self.settings.world_size,
                "group": group.current.number, "busy": bool(engine.running),
                "batching": engine.step_batching or "sequential", "queue_depth": len(engine.pending),
                "batch_occupancy": len(engine.running),
                "max_batch_size": self.settings.max_batch_size if engine.step_batching else 1,
                "max_queue_size": self.settings.max_queue_size, "kept_jobs": len(engine.jobs),
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
            "batching": {"mode": self.engine.step_batching or "sequential",
                         "max_batch_size": settings.max_batch_size if self.engine.step_batching else 1},
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
    return SpectrumServer.options(**deployment_options(settings)).bind(settings.model_dump())


def deployment_options(settings: ServeSettings) -> dict:
    """The deployment's options: replicas (fixed or autoscaled) and one placement group per
    replica with a bundle per rank (the replica itself takes no resources and sits in the first)."""
    bundle = {"CPU": settings.worker_cpus}
    if settings.device == "cuda":
        bundle["GPU"] = 1
    autoscaling = settings.autoscaling_config()
    sizing = {"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": settings.num_replicas}
    return dict(
        sizing,
        # Requests wait in the replica's engine; health and config calls must not queue behind them.
        max_ongoing_requests=max(64, 2 * settings.max_queue_size),
        ray_actor_options={"num_cpus": 0},
        placement_group_bundles=[dict(bundle) for _ in range(settings.world_size)],
        placement_group_strategy="PACK",
    )
