"""The replica's job loop: one request at a time on the rank group, and health probes of the
ranks while it is idle.

Its tasks are created with the replica, outside any HTTP request, so the calls they make to the
ranks belong to no request: a client that hangs up cancels nothing, and its job runs to the end.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Optional

from ...models import SizeRules
from ..request import RequestError, check_sizes
from .rank_group import GroupUnavailable, RankGroup, RequestFailed
from .settings import ServeSettings

logger = logging.getLogger("ray.serve")


class Job:
    """One request waiting for, or running on, the rank group."""

    def __init__(self, request):
        self.id = secrets.token_urlsafe(16)
        self.request = request
        self.arrived = time.perf_counter()
        self.queue_seconds: Optional[float] = None
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()


class Engine:
    def __init__(self, settings: ServeSettings, model: str):
        self.settings = settings
        self.model = model
        self.group = RankGroup(settings)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.current: Optional[Job] = None
        self.counters = {"dispatched": 0, "succeeded": 0, "failed": 0}
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_jobs()), loop.create_task(self._probe())]

    def submit(self, request) -> Job:
        job = Job(request)
        self.queue.put_nowait(job)
        return job

    async def _run_jobs(self) -> None:
        while True:
            job = await self.queue.get()
            self.current = job
            try:
                job.done.set_result(await self._run(job))
                self.counters["succeeded"] += 1
            except (GroupUnavailable, RequestFailed, RequestError) as error:
                job.done.set_exception(error)
            except Exception as error:  # the loop must outlive any one job
                logger.exception("spectrum-xdit: job %s failed", job.id)
                job.done.set_exception(RequestFailed(500, f"{type(error).__name__}: {error}"))
            finally:
                self.current = None

    async def _run(self, job: Job) -> dict:
        job.queue_seconds = time.perf_counter() - job.arrived
        generation = await self.group.ready()
        first = generation.infos[0]
        # the built model's size rules, which a hub checkpoint's spec could only guess
        check_sizes(job.request, SizeRules(**first["sizes"]), self.settings.layout,
                    "padding" in first["xfuser_patches"]["installed"], self.settings.limits, self.model)
        self.counters["dispatched"] += 1
        try:
            return await self.group.run(generation, job.request, job.id)
        except RequestFailed:
            self.counters["failed"] += 1
            raise

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
