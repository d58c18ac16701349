"""Ray Serve application: Spectrum + xDiT generation behind an HTTP API.

Each replica of the ``SpectrumServer`` deployment owns a *rank group*: N Ray actors
(:class:`RankWorker`, N = ulysses x ring degree) that form one torch.distributed world (NCCL
with one GPU each, gloo on CPU) and hold the xDiT pipeline. The replica checks a request
completely (types, unknown fields, limits, Spectrum settings, sizes against the model and the
sequence-parallel layout) before any worker sees it, then sends it to every rank; the ranks run
it in lock-step and rank 0 (the output rank) returns the latents or the encoded media. Requests
to one replica run one at a time (an asyncio lock); several replicas, each with its own group,
scale out across the cluster. Spectrum is applied for each request and removed after it, so no
forecaster state outlives a request.

The replica and its ranks are gang-scheduled in one placement group per replica (one bundle per
rank; the replica itself takes no resources and sits in the first bundle). If a worker dies, the
request in flight is answered 503, the group is killed and rebuilt in the same bundles, and the
requests after it wait for the new group.

Start it with ``spectrum-xdit serve`` or with ``serve run launch/serve_config.yaml`` (application
builder :func:`build_app`).
"""

import asyncio
import base64
import io
import json
import logging
import os
import socket
import tempfile
import time
from typing import Optional

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from .serve_api import (
    CONTENT_TYPES,
    IMAGE_FORMATS,
    VIDEO_FORMATS,
    RequestError,
    ServeSettings,
    check_geometry,
    parse_request,
)

APP_NAME = "spectrum-xdit"
logger = logging.getLogger("ray.serve")
# After the first failure of a rank, how long to wait for the others to fail too (a rank whose
# peer died usually gets a connection error within a second), to tell a death from a bug.
FAILURE_GRACE_S = 10.0
MAX_SETUP_FAILURES = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RankWorker:
    """One rank of a replica's group: a Ray actor holding this rank's xDiT pipeline."""

    def __init__(self, rank: int, settings: dict):
        self.rank = rank
        self.settings = ServeSettings.from_dict(settings)
        self.rank_pipeline = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address and a free port for the group's TCP rendezvous."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, rendezvous: tuple[str, int]) -> dict:
        import torch

        from ..models import resolve_model
        from .runner import init_rank

        settings = self.settings
        cuda = settings.device == "cuda"
        address, port = rendezvous
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(settings.world_size),
                          # Ray shows each GPU actor only its own GPU, as device 0.
                          LOCAL_RANK="0" if cuda else str(self.rank),
                          LOCAL_WORLD_SIZE=str(settings.world_size))
        if not cuda:
            torch.set_num_threads(max(1, int(settings.worker_cpus)))
        self.rank_pipeline = init_rank(resolve_model(settings.model), settings.ulysses_degree,
                                       settings.ring_degree, settings.world_size)
        self.rank_pipeline.pipe.set_progress_bar_config(disable=True)
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": self.rank_pipeline.device, "geometry": self.rank_pipeline.geometry()}

    def generate(self, request, output_format: str) -> dict:
        """Run one request on this rank; rank 0 returns the output and the report."""
        from ..media import write_media
        from .runner import run_request

        result = run_request(self.rank_pipeline, request, decode=output_format != "npy")
        if self.rank != 0:
            return {"rank": self.rank}
        encode_start = time.perf_counter()
        if output_format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, result.latents.float().cpu().numpy())
            media = buffer.getvalue()
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = write_media(os.path.join(folder, f"output.{output_format}"), result.media,
                                   fps=self.settings.fps)
                media = path.read_bytes()
        report = dict(result.report, encode_seconds=time.perf_counter() - encode_start)
        return {"rank": 0, "media": media, "report": report}

_REMOTE_WORKER = None


def _remote_worker_class():
    global _REMOTE_WORKER
    if _REMOTE_WORKER is None:
        _REMOTE_WORKER = ray.remote(RankWorker)
    return _REMOTE_WORKER


class GroupUnavailable(RuntimeError):
    pass


class _RankGroup:
    """One generation of a replica's rank group and what is known of its set-up."""

    def __init__(self, number: int, workers: list, setup_refs: list):
        self.number = number
        self.workers = workers
        self.setup_refs = setup_refs
        self.infos: Optional[list[dict]] = None
        self.error: Optional[str] = None
        self.settled = asyncio.Event()

    @property
    def state(self) -> str:
        return "ready" if self.infos is not None else "failed" if self.error is not None else "starting"

    def kill(self) -> None:
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # already gone
                pass


api = FastAPI(title="spectrum-xdit", description="Spectrum + xDiT generation (see the README, 'Serving').")


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(error: BaseException) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@serve.deployment
@serve.ingress(api)
class SpectrumServer:
    """A replica: the HTTP endpoints, request checks, and the rank group it drives."""

    async def __init__(self, settings: dict):
        self.settings = ServeSettings.from_dict(settings)
        self.spec = self.settings.check()
        self._lock = asyncio.Lock()
        self._busy = False
        self._counters = {"dispatched": 0, "succeeded": 0, "failed": 0, "rebuilds": 0}
        self._setup_failures = 0
        self._group_number = 0
        self._group: Optional[_RankGroup] = None
        self._watchers: set = set()
        self._start_group()

    # -- the rank group -------------------------------------------------------------------

    def _start_group(self) -> None:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        settings = self.settings
        self._group_number += 1
        placement_group = get_current_placement_group()
        worker_cls = _remote_worker_class()
        workers = []
        for rank in range(settings.world_size):
            options = {"num_cpus": settings.worker_cpus, "num_gpus": 1 if settings.device == "cuda" else 0,
                       "max_restarts": 0}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank)
            workers.append(worker_cls.options(**options).remote(rank, settings.to_dict()))
        rendezvous = workers[0].rendezvous.remote()
        group = _RankGroup(self._group_number, workers, [w.setup.remote(rendezvous) for w in workers])
        self._group = group
        watcher = asyncio.get_running_loop().create_task(self._watch_setup(group))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch_setup(self, group: _RankGroup) -> None:
        try:
            infos = await asyncio.wait_for(asyncio.gather(*[asyncio.wrap_future(ref.future()) for ref in group.setup_refs]),
                                           self.settings.setup_timeout_s)
        except asyncio.TimeoutError:
            group.error = f"the rank group was not ready after {self.settings.setup_timeout_s:.0f} s"
        except Exception as error:  # a rank failed to start or build the pipeline
            group.error = f"the rank group failed to start: {_describe(error)}"
        else:
            group.infos = sorted(infos, key=lambda info: info["rank"])
            self._setup_failures = 0
            logger.info("spectrum-xdit rank group %d ready: %s", group.number, group.infos)
        if group.error is not None:
            self._setup_failures += 1
            logger.error("spectrum-xdit rank group %d: %s", group.number, group.error)
            group.kill()
            if self._group is group and self._setup_failures < MAX_SETUP_FAILURES:
                self._rebuild(group.error)
        group.settled.set()

    def _rebuild(self, reason: str) -> None:
        logger.warning("spectrum-xdit: rebuilding rank group %d: %s", self._group.number, reason)
        self._group.kill()
        self._counters["rebuilds"] += 1
        self._start_group()

    async def _ready_group(self) -> _RankGroup:
        """The current group once it is ready; follows the rebuilds that replace a failed start."""
        deadline = time.monotonic() + self.settings.setup_timeout_s
        for _ in range(MAX_SETUP_FAILURES + 1):
            group = self._group
            try:
                await asyncio.wait_for(group.settled.wait(), max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                raise GroupUnavailable("the rank group is still starting") from None
            if group.state == "ready":
                return group
            if self._group is group:  # no new group is coming
                break
        raise GroupUnavailable(group.error)

    async def _run(self, group: _RankGroup, request, output_format: str) -> tuple[Optional[dict], Optional[JSONResponse]]:
        """Send the request to every rank; rank 0's answer, or the error response."""
        futures = [asyncio.wrap_future(worker.generate.remote(request, output_format).future())
                   for worker in group.workers]
        self._counters["dispatched"] += 1
        done, pending = await asyncio.wait(futures, timeout=self.settings.request_timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if not failed and not pending:
            self._counters["succeeded"] += 1
            return futures[0].result(), None
        self._counters["failed"] += 1
        if not failed:
            for future in pending:
                future.cancel()
            self._rebuild("request timed out")
            return None, _error(504, f"the request did not finish within {self.settings.request_timeout_s:.0f} s "
                                "(request_timeout_s); the rank group is being rebuilt")
        if pending:
            more, pending = await asyncio.wait(pending, timeout=FAILURE_GRACE_S)
            failed += [f for f in more if f.exception() is not None]
        for future in pending:
            future.cancel()
        errors = {rank: future.exception() for rank, future in enumerate(futures) if future in failed}
        dead = sorted(rank for rank, error in errors.items() if isinstance(error, RayActorError))
        if dead:
            self._rebuild(f"rank(s) {dead} died")
            detail = "; ".join(f"rank {rank}: {_describe(errors[rank])}" for rank in dead)
            return None, _error(503, f"a worker of this replica's rank group died during the request ({detail}); "
                                "the group is being rebuilt, retry the request", headers={"Retry-After": "30"})
        rank, error = min(errors.items())
        self._rebuild(f"rank {rank} failed")
        return None, _error(500, f"generation failed on rank {rank}: {_describe(error)}; "
                            "the rank group is being rebuilt")

    async def _serve(self, request, output_format: str, arrived: float):
        """Under the replica's lock: wait for the group, check sizes, run on every rank."""
        async with self._lock:
            queue_seconds = time.perf_counter() - arrived
            try:
                group = await self._ready_group()
            except GroupUnavailable as error:
                return None, _error(503, f"the rank group is not available: {error}",
                                    headers={"Retry-After": "30"}), queue_seconds
            try:
                check_geometry(request, group.infos[0]["geometry"], self.spec.name)
            except RequestError as error:
                return None, _error(error.status, str(error), error.field), queue_seconds
            self._busy = True
            try:
                answer, failure = await self._run(group, request, output_format)
            finally:
                self._busy = False
            return answer, failure, queue_seconds

    # -- HTTP -----------------------------------------------------------------------------

    @api.post("/v1/generate")
    async def generate(self, http_request: Request):
        arrived = time.perf_counter()
        body = await http_request.body()
        try:
            payload = json.loads(body) if body.strip() else None
            if payload is None:
                raise RequestError("body", "must be a JSON object with at least 'prompt'", status=400)
            request, output_format = parse_request(payload, self.settings, self.spec)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"body: not valid JSON ({error})", "body")
        except RequestError as error:
            return _error(error.status, str(error), error.field)
        want_json = "application/json" in http_request.headers.get("accept", "").lower()

        # Shielded: a client that hangs up does not stop the ranks half-way, and the lock is held
        # until they are done.
        answer, failure, queue_seconds = await asyncio.shield(self._serve(request, output_format, arrived))
        if failure is not None:
            return failure

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
        group = self._group
        body = {"status": group.state, "model": self.spec.name, "world_size": self.settings.world_size,
                "group": group.number, "busy": self._busy, "counters": dict(self._counters),
                "replica_pid": os.getpid(), "workers": group.infos or []}
        if group.error is not None:
            body["error"] = group.error
        return JSONResponse(body, status_code=200 if group.state == "ready" else 503)

    @api.get("/v1/config")
    async def config(self):
        settings, spec, group = self.settings, self.spec, self._group
        return {
            "model": spec.name,
            "family": spec.family,
            "parallel": {"world_size": settings.world_size, "ulysses_degree": settings.ulysses_degree,
                         "ring_degree": settings.ring_degree, "cfg_degree": 1,
                         "backend": "nccl" if settings.device == "cuda" else "gloo",
                         "device": settings.device, "num_replicas": settings.num_replicas},
            "limits": settings.limits(),
            "defaults": settings.request_defaults(spec),
            "output_formats": list(VIDEO_FORMATS if spec.is_video else IMAGE_FORMATS),
            "sizes": group.infos[0]["geometry"] if group.infos else None,
            "batching": "none: requests to a replica run one at a time on its rank group",
        }

    def check_health(self):
        """Serve's health check: a replica whose group failed to start repeatedly is replaced."""
        if self._setup_failures >= MAX_SETUP_FAILURES:
            raise RuntimeError(f"the rank group failed to start {self._setup_failures} times: {self._group.error}")

    def __del__(self):
        group = getattr(self, "_group", None)
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
    """The Serve application (also the builder that ``serve run launch/serve_config.yaml`` calls
    with the config's ``args``, the :class:`ServeSettings` fields)."""
    settings = args if isinstance(args, ServeSettings) else ServeSettings.from_dict(dict(args or {}))
    settings.check()
    settings = ServeSettings.from_dict(dict(settings.to_dict(), device=resolve_device(settings)))
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
    ).bind(settings.to_dict())


def wait_until_ready(url: str, timeout: float, interval: float = 1.0) -> dict:
    """Poll ``url``/healthz until it answers 200; its body. Raises ``TimeoutError``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=10) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            last = error.read().decode(errors="replace")[:500]
        except (urllib.error.URLError, OSError) as error:
            last = str(error)
        time.sleep(interval)
    raise TimeoutError(f"{url}/healthz not ready after {timeout:.0f} s: {last}")


def serve_main(args, parser) -> None:
    """`spectrum-xdit serve`: start Ray (or join --address), deploy, serve until interrupted."""
    import signal
    import threading

    settings = ServeSettings.from_args(args)
    try:
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    if args.address is None:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    else:
        ray.init(address=args.address)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        print(f"spectrum-xdit: serving {settings.model} at {url} ({settings.num_replicas} replica(s) x "
              f"{settings.world_size} rank(s)); waiting for the ranks ...", flush=True)
        health = wait_until_ready(url, settings.setup_timeout_s)
        print(f"spectrum-xdit: ready ({health['workers']}); POST {url}/v1/generate, Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        print("spectrum-xdit: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
