"""The HTTP API of `spectrum-xdit serve`: a Ray Serve deployment whose replicas each run their
requests through an engine (``engine``) on one rank group (``rank_group``).

A replica checks a request completely (the request model, the model's and the layout's rules,
the model's size rules, the server's limits) before it queues it in the job store that every
replica shares (``job_store``); whichever replica has room takes it (``engine``) and runs it on
every rank in lock-step, alone or in its step loop with the other jobs, and rank 0 returns the
latents or the encoded media. Any replica answers for any job, since they all read its record
there. Several replicas, each with its own group, scale out across the cluster. Beside ``/v1/generate`` the replica speaks OpenAI's video and image APIs as
the official SDK calls them (``openai_shapes``, ``openai_answers``), with OpenAI's error shape on
every endpoint (``errors``) and, when configured, API keys (``auth``).
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
import sys
import time
from typing import Literal, Optional

import ray
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException

from ...config import budget_defaults
from ...parallel.patches import ray_serve_grpc
from ..media import IMAGE_CONTENT_TYPES, SPRITE_SHEET_FORMAT, THUMBNAIL_FORMAT, sprite_sheet, thumbnail, transcode_image
from ..request import CONTENT_TYPES, RequestError, from_text, parse_request
from ..validate import validate
from .auth import RequireApiKey
from .autoscaling import QUEUED, RUNNING, QueueDepthPolicy
from .body import read_payload
from .contract import BatchingMode, JobError, JobStatus
from .engine import Engine
from .errors import error_object, error_response
from .job_store import QueueFull
from .openai_answers import VideoJob, images_answer, list_page, page_of, poll_after_ms, video_object
from .openai_shapes import (
    ImageFields,
    VideoFields,
    openai_names,
    renamed,
    request_body,
    split_fields,
    video_request_body,
)
from .settings import ServeSettings

APP_NAME = "spectrum-xdit"
FILE_SUFFIXES = {"jpeg": "jpg"}


def _replica_api_keys() -> list:
    """The API keys of the replica that serves the request (its settings)."""
    return serve.get_replica_context().servable_object.settings.api_key


api = FastAPI(title="spectrum-xdit", description="Spectrum + xDiT generation (docs/serving.md).")
api.add_middleware(RequireApiKey, keys=_replica_api_keys)


@api.exception_handler(HTTPException)
async def _http_error(http_request: Request, error: HTTPException):
    """FastAPI's own answers (an unknown path, a wrong method) in OpenAI's shape."""
    return error_response(error.status_code, str(error.detail), headers=error.headers)


@api.exception_handler(RequestValidationError)
async def _bad_parameter(http_request: Request, error: RequestValidationError):
    """A bad query parameter (``limit``, ``order``, ``variant``), named."""
    problem = error.errors()[0]
    param = str(problem["loc"][-1])
    return error_response(422, f"{param}: {problem['msg'][0].lower()}{problem['msg'][1:]}, got "
                               f"{problem.get('input')!r}", param)


def _failure(error: JobError) -> JSONResponse:
    """The answer of a job that did not complete."""
    return error_response(error.status, error.message, error.field, error.headers)


def _gone(job_id: str) -> JSONResponse:
    """The answer of a synchronous request whose job was deleted (or evicted) while it waited."""
    return error_response(409, f"job {job_id} was deleted before it completed")


def _refusal(error: RequestError) -> JSONResponse:
    return error_response(error.status, str(error), error.field)


@serve.deployment
@serve.ingress(api)
class SpectrumServer:
    """A replica: the HTTP endpoints and request checks; its engine drives the rank group."""

    async def __init__(self, settings: dict):
        self.settings = ServeSettings.model_validate(settings)
        self.spec = self.settings.check()
        self.defaults = self.settings.request_defaults(self.spec)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.ray_patches = ray_serve_grpc.install()
        self.engine = Engine(self.settings, self.spec, self.replica)

    async def _checked(self, http_request: Request, fields=None, defaults: Optional[dict] = None):
        """The request of a body (JSON or a multipart form), checked completely, and OpenAI's
        ``fields`` of it (``VideoFields``, ``ImageFields``; none for this API's own body);
        ``defaults``: what the body leaves out (the server's)."""
        limits = self.settings.limits
        payload, as_text = await read_payload(http_request, limits.max_body_bytes)
        given, names = None, {}
        if fields is None:
            body = from_text(payload) if as_text else payload
        else:
            given, rest = split_fields(payload, fields, as_text)
            if fields is VideoFields:
                body = video_request_body(given, rest, self._model_name(), self.settings.fps, self.spec.sizes)
            else:
                body = dict(request_body(given, rest, self._model_name()), output_format="png")
            names = openai_names(given, rest)
        try:
            request = parse_request(body, self.defaults if defaults is None else defaults)
            validate(request, self.spec, self.settings.layout, limits)
        except RequestError as error:
            raise renamed(error, names, body, self.settings.fps) from None
        return request, given

    def _submit(self, requests: list, kept: bool = False, remixed_from: Optional[str] = None):
        """The records of ``requests``, queued together, or the 429 of a full queue."""
        try:
            return self.engine.submit(requests, kept=kept, remixed_from=remixed_from), None
        except QueueFull as error:
            return None, error_response(429, f"the server is busy: {error}; retry later", headers={"Retry-After": "10"})

    async def _results(self, records: list):
        """The finished records of synchronous jobs and their media, or the answer of the first
        that failed; their records and media are then forgotten (nobody can ask for them again).
        A client that hangs up leaves its jobs to finish (shielded) and their records to expire."""
        try:
            finished = await asyncio.shield(asyncio.gather(*[self.engine.result(r.id) for r in records]))
        except KeyError as error:
            self.engine.forget(records)
            return None, None, _gone(error.args[0])
        except TimeoutError as error:   # its job was lost: the client gets an answer, not a hang
            self.engine.forget(records)
            return None, None, error_response(504, str(error))
        failed = next((record for record in finished if record.status is JobStatus.FAILED), None)
        try:
            media = [] if failed is not None else [await self.engine.output(record) for record in finished]
        except FileNotFoundError:   # evicted meanwhile (max_result_bytes)
            return None, None, _gone(records[0].id)
        finally:
            self.engine.forget(records)
        if failed is not None:
            return None, None, _failure(failed.error)
        return finished, media, None

    @api.post("/v1/generate")
    async def generate(self, http_request: Request):
        arrived = time.perf_counter()
        try:
            request, _ = await self._checked(http_request)
        except RequestError as error:
            return _refusal(error)
        records, refused = self._submit([request])
        if refused is not None:
            return refused
        finished, media, refused = await self._results(records)
        if refused is not None:
            return refused
        output_format = request.output_format
        report = dict(self._report(finished[0]), request_seconds=time.perf_counter() - arrived)
        content_type = CONTENT_TYPES[output_format]
        if "application/json" in http_request.headers.get("accept", "").lower():
            return JSONResponse({"output_format": output_format, "content_type": content_type,
                                 "media": base64.b64encode(media[0]).decode("ascii"), "report": report})
        headers = {
            "X-Spectrum-Report": json.dumps(report, separators=(",", ":")),
            "X-Spectrum-NFE": json.dumps(report["nfe"], separators=(",", ":")),
            "X-Spectrum-Real-Steps": json.dumps(report["real_steps"], separators=(",", ":")),
            "X-Spectrum-Denoise-Seconds": f"{report['denoise_seconds']:.4f}",
            "X-Spectrum-Request-Seconds": f"{report['request_seconds']:.4f}",
            "Content-Disposition": f'inline; filename="spectrum-xdit.{output_format}"',
        }
        return Response(content=media[0], media_type=content_type, headers=headers)

    # -- OpenAI's video and image APIs ----------------------------------------------------------

    @api.post("/v1/videos")
    async def create_video(self, http_request: Request):
        """An asynchronous video job: answered at once with the video object; poll it, fetch its
        content once completed, remix it, or delete it."""
        if not self.spec.is_video:
            return error_response(404, f"{self._model_name()} makes images: use POST /v1/images/generations")
        try:
            request, _ = await self._checked(http_request, VideoFields)
        except RequestError as error:
            return _refusal(error)
        return await self._new_video(request)

    @api.get("/v1/videos")
    async def list_videos(self, after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc"):
        """The kept video jobs, newest first unless ``order=asc``, a page of ``limit`` after the id
        ``after``, as the SDK's pagination reads them."""
        records = {record.id: record for record in self.engine.records()}
        try:
            ids, more = page_of(list(records), after, limit, order)
        except RequestError as error:
            return _refusal(error)
        return JSONResponse(list_page([self._video_object(self._video_job(records[i])) for i in ids], more))

    @api.get("/v1/videos/{video_id}")
    async def get_video(self, video_id: str):
        record = self._kept(video_id)
        if isinstance(record, JSONResponse):
            return record
        view = self._video_job(record)
        return JSONResponse(self._video_object(view), headers={"openai-poll-after-ms": str(poll_after_ms(view))})

    @api.get("/v1/videos/{video_id}/content")
    async def get_video_content(self, video_id: str,
                                variant: Literal["video", "thumbnail", "spritesheet"] = "video"):
        """The video as made (``output_format``), its first frame (WebP) or a sprite sheet of its
        frames (JPEG), both made from the stored media."""
        record = self._kept(video_id)
        if isinstance(record, JSONResponse):
            return record
        if record.status is not JobStatus.COMPLETED:
            return _refusal(RequestError("video_id", f"video {video_id} is {record.status.value}, not completed; poll "
                                         f"GET /v1/videos/{video_id}", 409))
        output_format = record.request.output_format
        try:
            media = await self.engine.output(record)
        except FileNotFoundError:
            return _refusal(RequestError("video_id", f"video {video_id} has expired", 404))
        if variant == "video":
            return Response(content=media, media_type=CONTENT_TYPES[output_format],
                            headers={"Content-Disposition": f'inline; filename="{video_id}.{output_format}"'})
        if output_format == "npy":
            return _refusal(RequestError("variant", f"video {video_id} was made as latents (output_format npy), "
                                         f"which have no {variant}", 404))
        make, image_format = (thumbnail, THUMBNAIL_FORMAT) if variant == "thumbnail" else \
            (sprite_sheet, SPRITE_SHEET_FORMAT)
        image = await asyncio.to_thread(make, media, output_format)
        suffix = FILE_SUFFIXES.get(image_format, image_format)
        return Response(content=image, media_type=IMAGE_CONTENT_TYPES[image_format],
                        headers={"Content-Disposition": f'inline; filename="{video_id}-{variant}.{suffix}"'})

    @api.post("/v1/videos/{video_id}/remix")
    async def remix_video(self, video_id: str, http_request: Request):
        """A new video job of a completed one's request with a new prompt: the same seed, size and
        settings, but for what the body gives."""
        record = self._kept(video_id)
        if isinstance(record, JSONResponse):
            return record
        if record.status is not JobStatus.COMPLETED:
            return _refusal(RequestError("video_id", f"video {video_id} is {record.status.value}: remix a completed "
                                         "video", 409))
        source = record.request.model_dump(exclude={"cache": {"num_inference_steps"}})
        try:
            request, _ = await self._checked(http_request, VideoFields, defaults=source)
        except RequestError as error:
            return _refusal(error)
        return await self._new_video(request, remixed_from=video_id)

    @api.delete("/v1/videos/{video_id}")
    async def delete_video(self, video_id: str):
        """Cancels a queued job, stops a running one after its current step, forgets a finished
        one; the id is unknown afterwards."""
        record = self._kept(video_id)
        if isinstance(record, JSONResponse):
            return record
        try:
            self.engine.remove(video_id)
        except KeyError:   # deleted meanwhile
            return _refusal(RequestError("video_id", f"no video {video_id}", 404))
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @api.post("/v1/images/generations")
    async def create_images(self, http_request: Request):
        """OpenAI's image generation, synchronous: ``n`` images of seeds ``seed .. seed + n - 1``,
        as ``b64_json`` in the ``output_format`` asked (PNG from the ranks, re-encoded here)."""
        if self.spec.is_video:
            return error_response(404, f"{self._model_name()} makes videos: use POST /v1/videos")
        arrived = time.perf_counter()
        try:
            request, fields = await self._checked(http_request, ImageFields)
            count = fields.n or 1
            if count > self.settings.max_images:
                raise RequestError("n", f"must be at most {self.settings.max_images} (the server's max_images), "
                                   f"got {count}")
        except RequestError as error:
            return _refusal(error)
        records, refused = self._submit([request.model_copy(update={"seed": request.seed + index})
                                         for index in range(count)])
        if refused is not None:
            return refused
        finished, media, refused = await self._results(records)
        if refused is not None:
            return refused
        images = await asyncio.to_thread(
            lambda: [transcode_image(png, fields.image_format, fields.output_compression) for png in media])
        reports = [dict(self._report(record), request_seconds=time.perf_counter() - arrived) for record in finished]
        return JSONResponse(images_answer(images, fields, request, reports))

    async def _new_video(self, request, remixed_from: Optional[str] = None) -> JSONResponse:
        records, refused = self._submit([request], kept=True, remixed_from=remixed_from)
        if refused is not None:
            return refused
        return JSONResponse(self._video_object(self._video_job(records[0])))

    def _video_object(self, view: VideoJob) -> dict:
        return video_object(view, self._model_name(), self.settings.fps, self.settings.result_ttl_s)

    # -- the jobs, as the answers read them from their records ---------------------------------

    def _kept(self, video_id: str):
        """The record of a ``/v1/videos`` job, or the 404 of one unknown, deleted or expired."""
        try:
            record = self.engine.get(video_id)
            if record.kept:
                return record
        except KeyError:
            pass
        return _refusal(RequestError("video_id", f"no video {video_id} (never created, deleted, or expired)", 404))

    def _video_job(self, record) -> VideoJob:
        steps = record.steps_done
        running = record.status is JobStatus.IN_PROGRESS and record.started_at is not None and steps > 0
        error = record.error
        return VideoJob(id=record.id, status=record.status.value, request=record.request,
                        created_at=int(record.created_at), completed_at=record.completed_at, steps_done=steps,
                        step_seconds=(time.time() - record.started_at) / steps if running else None,
                        report=self._report(record) if record.status is JobStatus.COMPLETED else None,
                        error=error_object(error.status, error.message, error.field) if error else None,
                        remixed_from_video_id=record.remixed_from)

    @staticmethod
    def _report(record) -> dict:
        """A completed job's report, with the request's settings and where and how long it waited
        (``replica``: the one that ran it; ``deliveries``: more than 1 if it was re-run)."""
        request = record.request
        return dict(record.report, seed=request.seed, height=request.height, width=request.width,
                    num_frames=request.num_frames, output_format=request.output_format,
                    queue_seconds=record.queue_seconds, replica=record.replica, deliveries=record.deliveries)

    @api.get("/healthz")
    async def healthz(self):
        engine, group = self.engine, self.engine.group
        infos = [dataclasses.asdict(info) for info in group.infos or []]
        shown = ("rank", "device", "pid", "node") if self.settings.debug else ("rank", "device")
        sequential = engine.mode is BatchingMode.SEQUENTIAL
        body = {"status": group.state, "replica": self.replica, "model": self._model_name(),
                "world_size": self.settings.world_size,
                "group": group.current.number, "busy": bool(engine.running),
                "batching": engine.mode.value, "queue_depth": engine.queue_depth(),
                "batch_occupancy": len(engine.running),
                "max_batch_size": 1 if sequential else self.settings.max_batch_size,
                "max_queue_size": self.settings.max_queue_size,
                "counters": dict(engine.counters, rebuilds=group.rebuilds),
                "workers": [{key: info[key] for key in shown} for info in infos],
                "xfuser_patches": infos[0]["xfuser_patches"] if infos else None, "ray_patches": self.ray_patches}
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
            "budget_defaults": budget_defaults(),
            "output_formats": list(settings.output_formats(spec)),
            "fps": settings.fps,
            "sizes": group.infos[0].sizes if group.infos else dataclasses.asdict(spec.sizes),
            "batching": {"mode": self.engine.mode.value,
                         "max_batch_size": 1 if self.engine.mode is BatchingMode.SEQUENTIAL else settings.max_batch_size},
        }

    def _model_name(self) -> str:
        """The model as a client may see it: a local folder by its name alone, unless debugging."""
        name = self.spec.name
        return name if self.settings.debug or not os.path.isdir(name) else os.path.basename(os.path.normpath(name))

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metrics of this replica: the jobs it holds (``autoscaling``)."""
        return {QUEUED: self.engine.queue_depth(), RUNNING: len(self.engine.running)}

    def check_health(self):
        """Serve's health check: a replica whose engine stopped, or whose group failed to start
        repeatedly, is replaced."""
        self.engine.check()
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


def warn_of_split_queue(settings: ServeSettings) -> None:
    """A SQLite broker on a cluster of several machines splits the queue (each node opens its own
    file): say so. Nodes on one machine (the same address) share the file, which is fine."""
    if not settings.broker_url.startswith("sqlite://") or not ray.is_initialized():
        return
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")}
    if len(addresses) > 1:
        print(f"spectrum-xdit serve: warning: broker_url {settings.broker_url} is a file on each of the cluster's "
              f"{len(addresses)} machines, so each has its own queue; use redis://HOST:PORT/DB", file=sys.stderr)


def build_app(args: Optional[dict] = None):
    """The Serve application (also the builder that ``serve run launch/serve/serve_config.yaml``
    calls with the config's ``args``: the flat setting names of ``spectrum-xdit serve``)."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.from_flat(dict(args or {}))
    settings.check()
    settings = settings.with_api_keys().with_job_store()
    settings = settings.model_copy(update={"device": resolve_device(settings)})
    warn_of_split_queue(settings)
    return SpectrumServer.options(**deployment_options(settings)).bind(settings.model_dump())


def deployment_options(settings: ServeSettings) -> dict:
    """The deployment's options: replicas (fixed, or autoscaled on the jobs they hold) and one
    placement group per replica with a bundle per rank, placed by ``placement_strategy`` (the
    replica itself takes no resources and sits in the first bundle)."""
    bundle = {"CPU": settings.worker_cpus}
    if settings.device == "cuda":
        bundle["GPU"] = 1
    autoscaling = settings.autoscaling_config()
    if autoscaling is not None:
        policy = {"policy_function": QueueDepthPolicy, "policy_kwargs": {"target_queue_depth": settings.jobs_per_replica}}
        sizing = {"autoscaling_config": dict(autoscaling, policy=policy)}
    else:
        sizing = {"num_replicas": settings.num_replicas}
    return dict(
        sizing,
        # Requests wait in the replica's engine; health and config calls must not queue behind them.
        max_ongoing_requests=max(64, 2 * settings.max_queue_size),
        ray_actor_options={"num_cpus": 0},
        placement_group_bundles=[dict(bundle) for _ in range(settings.world_size)],
        placement_group_strategy=settings.placement_strategy,
    )
