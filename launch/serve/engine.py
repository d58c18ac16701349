"""The replica's job loop: one job at a time on the rank group, a bounded queue, the jobs of the
asynchronous API kept until their results expire, and health probes of the ranks while idle.

Its tasks are created with the replica, outside any HTTP request, so the calls they make to the
ranks belong to no request: a client that hangs up cancels nothing, and its job runs to the end.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from typing import Optional

from ...models import SizeRules
from ..request import RequestError, check_sizes
from .metrics import ServeMetrics
from .rank_group import GroupUnavailable, RankGroup, RequestFailed
from .settings import ServeSettings

logger = logging.getLogger("ray.serve")


class QueueFull(RuntimeError):
    """The replica's queue holds ``max_queue_size`` jobs: answer 429."""


class Job:
    """One request: queued, running on the rank group, or finished (``completed``, ``failed``)."""

    def __init__(self, request, kept: bool):
        self.id = secrets.token_urlsafe(16)
        self.request = request
        self.kept = kept                      # kept after it finishes (the asynchronous API)
        self.created_at = int(time.time())
        self.completed_at: Optional[float] = None
        self.arrived = time.perf_counter()
        self.queue_seconds: Optional[float] = None
        self.status = "queued"
        self.steps_done = 0
        self.answer: Optional[dict] = None    # rank 0's media and report
        self.error: Optional[Exception] = None
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def nbytes(self) -> int:
        return len(self.answer["media"]) if self.answer is not None else 0

    def finish(self, answer: Optional[dict] = None, error: Optional[Exception] = None) -> None:
        self.status = "completed" if error is None else "failed"
        self.answer, self.error = answer, error
        self.completed_at = time.time()
        if error is None:
            self.done.set_result(answer)
        else:
            self.done.set_exception(error)
            self.done.exception()   # retrieved: a job nobody awaits logs no warning


class KeptJobs(dict):
    """The jobs of the asynchronous API by id, until they are removed or their results expire:
    finished ones older than ``ttl_s`` go first, then the oldest while the results kept exceed
    ``max_bytes``."""

    def __init__(self, ttl_s: float, max_bytes: int):
        super().__init__()
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes

    def evict(self, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        finished = sorted((job for job in self.values() if job.completed_at is not None),
                          key=lambda job: job.completed_at)
        total = sum(job.nbytes for job in self.values())
        for job in finished:
            if now - job.completed_at > self.ttl_s or total > self.max_bytes:
                total -= job.nbytes
                del self[job.id]


class Engine:
    def __init__(self, settings: ServeSettings, model: str):
        self.settings = settings
        self.model = model
        self.group = RankGroup(settings)
        self.metrics = ServeMetrics()
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs = KeptJobs(settings.result_ttl_s, settings.max_result_bytes)
        self.current: Optional[Job] = None
        self.counters = {"dispatched": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_jobs()), loop.create_task(self._probe())]

    # -- the API's side -------------------------------------------------------------------------

    def submit(self, request, kept: bool = False) -> Job:
        """Queue ``request``; ``kept``: the job stays readable after it ends. Raises
        :class:`QueueFull` at ``max_queue_size`` waiting jobs."""
        if len(self.pending) >= self.settings.max_queue_size:
            self.counters["rejected"] += 1
            raise QueueFull(f"{len(self.pending)} jobs are waiting, the server's max_queue_size")
        job = Job(request, kept)
        self.pending.append(job)
        if kept:
            self.jobs[job.id] = job
            self.jobs.evict()
        self._wake.set()
        self.metrics.queue_depth(len(self.pending))
        return job

    def job(self, job_id: str) -> Job:
        """A job of the asynchronous API (``KeyError`` if unknown, removed or expired)."""
        self.jobs.evict()
        return self.jobs[job_id]

    async def progress(self, job: Job) -> int:
        """Denoising steps done of ``job`` (asks rank 0 while the job runs)."""
        if job.status == "in_progress" and self.group.state == "ready":
            answer = await self.group.progress(self.group.current)
            if answer.get("job") == job.id:
                job.steps_done = answer["steps"]
        return job.steps_done

    def remove(self, job_id: str) -> Job:
        """Cancel a queued job, stop a running one after its current step, forget a finished one;
        a later lookup is a ``KeyError``."""
        job = self.jobs.pop(job_id)
        if job.status == "queued":
            self.pending.remove(job)
            job.finish(error=RequestFailed(409, "the job was cancelled before it started"))
            self.counters["cancelled"] += 1
        elif job.status == "in_progress" and self.group.state == "ready":
            self.group.stop(self.group.current, job.id)
        return job

    # -- the loop -------------------------------------------------------------------------------

    async def _run_jobs(self) -> None:
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            job = self.pending.popleft()
            self.metrics.queue_depth(len(self.pending))
            self.current = job
            try:
                job.finish(answer=await self._run(job))
                self.counters["succeeded"] += 1
            except (GroupUnavailable, RequestFailed, RequestError) as error:
                job.finish(error=error)
                if isinstance(error, RequestFailed) and error.status == 409:
                    self.counters["cancelled"] += 1
            except Exception as error:  # the loop must outlive any one job
                logger.exception("spectrum-xdit: job %s failed", job.id)
                job.finish(error=RequestFailed(500, f"{type(error).__name__}: {error}"))
            finally:
                self.current = None
                self.metrics.finished(job)
                self.jobs.evict()

    async def _run(self, job: Job) -> dict:
        job.queue_seconds = time.perf_counter() - job.arrived
        generation = await self.group.ready()
        if not await self.group.probe():   # a rank died since the last probe: wait for its rebuild
            generation = await self.group.ready()
        first = generation.infos[0]
        # the built model's size rules, which a hub checkpoint's spec could only guess
        check_sizes(job.request, SizeRules(**first["sizes"]), self.settings.layout,
                    "padding" in first["xfuser_patches"]["installed"], self.settings.limits, self.model)
        job.status = "in_progress"
        self.counters["dispatched"] += 1
        try:
            answer = await self.group.run(generation, job.request, job.id)
        except RequestFailed:
            self.counters["failed"] += 1
            raise
        job.steps_done = job.request.num_inference_steps
        return answer

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            if self.current is None:
                try:
                    await self.group.probe()
                except Exception:  # a failed probe must not end the probing
                    logger.exception("spectrum-xdit: health probe failed")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.group.kill()
