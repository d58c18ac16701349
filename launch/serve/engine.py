"""The replica's job loop: a bounded queue, the jobs of the asynchronous API kept until their
results expire, health probes of the ranks while idle, and one of two ways to run the jobs:

* sequential: one job at a time, each in the pipeline's own denoising loop;
* a step loop (``batched`` or ``continuous``): the rank group ticks, one denoising step of every
  job in the loop per tick (``step_batching``), many ticks per call. ``continuous`` lets a queued
  job join at the next tick (it interrupts the ranks' run of ticks); ``batched`` only when the
  loop is empty, so the jobs that arrived together run together.
  At most ``max_batch_size`` jobs are in the loop. A job asked to stop (deleted, or past
  ``request_timeout_s``) leaves it with the next call to the ranks, the others go on.

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

from ...models import ModelSpec, SizeRules
from ..request import RequestError
from ..validate import validate
from .metrics import ServeMetrics
from .rank_group import GroupUnavailable, RankGroup, RequestFailed
from .settings import ServeSettings

logger = logging.getLogger("ray.serve")
# Longest run of ticks the ranks make in one call of the step loop: they return earlier when a job
# finishes or one waits to join or leave; this bounds how stale progress and timeouts get.
TICK_RUN_S = 1.0


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
        self.started: Optional[float] = None
        self.remixed_from_video_id: Optional[str] = None   # OpenAI's remix: the video it remade
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
    def __init__(self, settings: ServeSettings, spec: ModelSpec):
        self.settings = settings
        self.spec = spec
        self.group = RankGroup(settings)
        self.metrics = ServeMetrics()
        self.pending: collections.deque[Job] = collections.deque()
        self.jobs = KeptJobs(settings.result_ttl_s, settings.max_result_bytes)
        self.running: dict[str, Job] = {}
        self.counters = {"dispatched": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                         "ticks": 0, "block_calls": 0, "block_rows": 0}
        self.step_batching = settings.step_batching
        self._leaving: dict[str, RequestFailed] = {}    # jobs to take out of the step loop, and why
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        run = self._run_steps() if self.step_batching else self._run_jobs()
        self._tasks = [loop.create_task(run), loop.create_task(self._probe())]

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
        if self.step_batching == "continuous" and self.running and (
                len(self.running) + len(self.pending) <= self.settings.max_batch_size):   # it can join now
            self._interrupt_ticks()
        return job

    def queue_depth(self) -> int:
        """Jobs waiting to run."""
        return len(self.pending)

    def job(self, job_id: str) -> Job:
        """A job of the asynchronous API (``KeyError`` if unknown, removed or expired)."""
        self.jobs.evict()
        return self.jobs[job_id]

    async def progress(self, job: Job) -> int:
        """Denoising steps done of ``job`` (asks rank 0 while the job runs)."""
        if job.status == "in_progress" and not self.step_batching and self.group.state == "ready":
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
        elif job.status == "in_progress" and self.step_batching:
            self._leaving[job.id] = RequestFailed(409, "the job was cancelled")
            self._interrupt_ticks()
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
            self.running[job.id] = job
            try:
                generation = await self._ready_group()
                self._start(job, generation)
                answer = await self.group.run(generation, job.request, job.id)
                job.steps_done = job.request.num_inference_steps
                self.metrics.block_batch(1)
                self._finish(job, answer=answer)
            except Exception as error:  # the loop must outlive any one job
                self._finish(job, error=error)

    async def _ready_group(self):
        """The ready rank group, after a ping: a rank that died since the last probe is waited
        for (its rebuild), not found by a job."""
        generation = await self.group.ready()
        if not await self.group.probe():
            generation = await self.group.ready()
        return generation

    def _start(self, job: Job, generation) -> None:
        """``job`` leaves the queue for the ranks, once the built model's size rules (which a hub
        checkpoint's spec could only guess) accept it."""
        job.queue_seconds = time.perf_counter() - job.arrived
        validate(job.request, self.spec, self.settings.layout, self.settings.limits,
                 sizes=SizeRules(**generation.infos[0]["sizes"]))
        job.status = "in_progress"
        job.started = time.perf_counter()
        self.counters["dispatched"] += 1

    def _finish(self, job: Job, answer: Optional[dict] = None, error: Optional[Exception] = None) -> None:
        """End ``job`` with its answer or its error, count it, and forget what it held."""
        self.running.pop(job.id, None)
        if error is None:
            job.finish(answer=answer)
            self.counters["succeeded"] += 1
        else:
            if not isinstance(error, (GroupUnavailable, RequestFailed, RequestError)):
                logger.error("spectrum-xdit: job %s failed: %s: %s", job.id, type(error).__name__, error)
                error = RequestFailed(500, f"{type(error).__name__}: {error}")
            if isinstance(error, RequestFailed):
                self.counters["cancelled" if error.status == 409 else "failed"] += 1
            job.finish(error=error)
        self.metrics.finished(job)
        self.jobs.evict()

    # -- the step loop --------------------------------------------------------------------------

    async def _run_steps(self) -> None:
        while True:
            while not self.pending and not self.running:
                self._wake.clear()
                await self._wake.wait()
            try:
                generation = await (self._ready_group() if not self.running else self.group.ready())
            except GroupUnavailable as error:
                for job in [*self.running.values(), *self.pending]:
                    self._finish(job, error=error)
                self.pending.clear()
                continue
            joins = self._admit(generation)
            drops = self._drops()
            try:
                answer = await self.group.tick(generation, [(job.id, job.request) for job in joins], list(drops),
                                               TICK_RUN_S)
            except Exception as error:  # every job in the loop ends with it; the queue waits
                for job in list(self.running.values()):
                    self._finish(job, error=error)
                continue
            self._after_tick(answer, drops)

    def _interrupt_ticks(self) -> None:
        """A job waits to join or leave the loop: the ranks' run of ticks ends after this tick."""
        if self.group.state == "ready":
            self.group.interrupt(self.group.current)

    def _admit(self, generation) -> list[Job]:
        """The queued jobs that join at this tick (``batched``: only into an empty loop)."""
        joins = []
        if self.step_batching == "batched" and self.running:
            return joins
        while self.pending and len(self.running) < self.settings.max_batch_size:
            job = self.pending.popleft()
            try:
                self._start(job, generation)
            except RequestError as error:
                self._finish(job, error=error)
                continue
            self.running[job.id] = job
            joins.append(job)
        self.metrics.queue_depth(len(self.pending))
        return joins

    def _drops(self) -> dict[str, RequestFailed]:
        """The running jobs that leave the loop at this tick: deleted, or past ``request_timeout_s``."""
        timeout = self.settings.request_timeout_s
        for job in self.running.values():
            if job.id not in self._leaving and time.perf_counter() - job.started > timeout:
                self._leaving[job.id] = RequestFailed(504, f"the request did not finish within {timeout:g} s "
                                                      "(request_timeout_s)")
        drops = {job_id: why for job_id, why in self._leaving.items() if job_id in self.running}
        self._leaving.clear()
        return drops

    def _after_tick(self, answer: dict, drops: dict[str, RequestFailed]) -> None:
        for job_id, why in drops.items():
            step = answer["dropped"].get(job_id)
            self._finish(self.running[job_id], error=RequestFailed(why.status, f"{why}; it stopped after step "
                                                                    f"{-1 if step is None else step - 1}"))
        for job_id, error in answer["failed"].items():
            self._finish(self.running[job_id], error=RequestFailed(error["status"], error["message"],
                                                                   field=error.get("field")))
        for job_id, steps in answer["steps"].items():
            self.running[job_id].steps_done = steps
        for job_id, result in answer["finished"].items():
            job = self.running[job_id]
            job.steps_done = job.request.num_inference_steps
            self._finish(job, answer=result)
        for rows in answer["block_rows"]:
            self.counters["ticks"] += 1
            if rows:
                self.counters["block_calls"] += 1
                self.counters["block_rows"] += rows
                self.metrics.block_batch(rows)

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            if not self.running:
                try:
                    await self.group.probe()
                except Exception:  # a failed probe must not end the probing
                    logger.exception("spectrum-xdit: health probe failed")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.group.kill()
