"""The replica's side of the shared job queue (``job_store``): it pulls jobs when it has room,
runs them on its rank group, and writes their progress and results where every replica reads
them. Two ways to run the jobs:

* sequential: one job at a time, each in the pipeline's own denoising loop; a job is taken when
  the replica is idle;
* a step loop (``batched`` or ``continuous``): the rank group ticks, one denoising step of every
  job in the loop per tick (``step_batching``), many ticks per call. ``continuous`` takes a queued
  job into the loop at the next tick while it holds fewer than ``max_batch_size``; ``batched`` only
  into an empty loop, so the jobs that waited together run together.

Pull, not push: a replica takes a job only when it can run it, so the jobs spread over the
replicas by themselves and a busy replica never holds waiting jobs. While a job runs, this replica
renews its lease and writes its progress, and stops it after the current step once it is deleted
(``KEEPER_S``); a job whose replica died is put back in the queue by any replica (every
``lease_s / 3``).

Its tasks are created with the replica, outside any HTTP request, so the calls they make to the
ranks belong to no request: a client that hangs up cancels nothing, and its job runs to the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Optional

from ...models import ModelSpec, SizeRules
from ..validate import validate
from .contract import BatchingMode, JobError, JobStatus, Output, TickAnswer
from .job_store import JobRecord, JobStore, QueueFull
from .metrics import ServeMetrics
from .rank_group import GroupUnavailable, RankGroup, RequestFailed
from .settings import ServeSettings

logger = logging.getLogger("ray.serve")
# Longest run of ticks the ranks make in one call of the step loop: they return earlier when a job
# finishes or one waits to join or leave; this bounds how stale the loop's view of the queue gets.
TICK_RUN_S = 1.0
# How often an idle replica asks the queue for a job: the most a job waits for an idle replica.
POLL_S = 0.02
# How often the running jobs' leases are renewed, their progress written, deletes looked for, and
# (continuous) the queue looked at for jobs to join: a write per running job per period.
KEEPER_S = 0.5
# The longest wait between two reads of a job's record by a request waiting for it (the first
# reads are sooner; a job that finishes on this replica wakes its waiters at once).
WAIT_MAX_S = 0.5


@dataclasses.dataclass
class Running:
    """A job this replica took: its record as last written, and when it started here."""

    record: JobRecord
    started: float = dataclasses.field(default_factory=time.perf_counter)
    joined: bool = False                       # in the step loop (it joined at a tick)
    leaving: Optional[RequestFailed] = None    # why it leaves the step loop at the next tick


class Engine:
    def __init__(self, settings: ServeSettings, spec: ModelSpec, replica: str):
        self.settings = settings
        self.spec = spec
        self.replica = replica
        settings = settings if settings.broker_url else settings.with_job_store()
        self.store = JobStore(settings.broker_url, settings.results_url, settings.model, settings.max_queue_size,
                              settings.lease_s)
        self.group = RankGroup(settings)
        self.metrics = ServeMetrics()
        self.mode = BatchingMode(settings.step_batching or "sequential")
        self.running: dict[str, Running] = {}
        self.counters = {"dispatched": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                         "requeued": 0, "ticks": 0, "block_calls": 0, "block_rows": 0}
        self._wake = asyncio.Event()         # a job was queued here
        self._finished = asyncio.Event()     # a job finished here: its waiters read its record
        self._writes: set[asyncio.Task] = set()   # results being written (``_record_end``)
        loop = asyncio.get_running_loop()
        run = self._run_jobs() if self.mode is BatchingMode.SEQUENTIAL else self._run_steps()
        self._tasks = [loop.create_task(task) for task in (run, self._keep(), self._reap(), self._probe())]

    # -- the API's side -------------------------------------------------------------------------

    def submit(self, requests: list, kept: bool = False, remixed_from: Optional[str] = None) -> list[JobRecord]:
        """Queue ``requests`` together (the images of one request) and return their records;
        ``kept``: readable after they end, until ``result_ttl_s``. Raises :class:`QueueFull`."""
        records = [JobRecord.new(request, kept, remixed_from) for request in requests]
        try:
            self.store.submit(records)
        except QueueFull:
            self.counters["rejected"] += 1
            raise
        self._wake.set()
        if self.mode is BatchingMode.CONTINUOUS and self.running and self._free_slots() >= self.queue_depth():
            self._interrupt_ticks()   # every queued job can join now
        return records

    def get(self, job_id: str) -> JobRecord:
        """A job's record, whichever replica runs or ran it (``KeyError`` if unknown, deleted or
        expired)."""
        record = self.store.get(job_id)
        if record is None:
            raise KeyError(job_id)
        return record

    def records(self) -> list[JobRecord]:
        """The kept jobs (``/v1/videos``), oldest first."""
        return [record for record in self.store.records() if record.kept]

    def result_wait_s(self) -> float:
        """How long after it was queued a synchronous request waits for its job: time for a
        ``request_timeout_s`` in the queue and one to run, each with a lease's delay (a re-run
        after its replica died). A job lost beyond that (every replica gone) ends the wait."""
        return 2 * (self.settings.request_timeout_s + self.settings.lease_s)

    async def result(self, job_id: str) -> JobRecord:
        """The record of ``job_id`` once it completed or failed (``KeyError`` if deleted;
        ``TimeoutError`` naming ``request_timeout_s`` after :meth:`result_wait_s`)."""
        delay = POLL_S
        while True:
            record = self.get(job_id)
            if record.status.finished:
                return record
            if time.time() - record.created_at > self.result_wait_s():
                raise TimeoutError(f"the job did not finish within {self.result_wait_s():g} s of being queued "
                                   f"(2 x (request_timeout_s + lease_s))")
            finished = self._finished
            try:
                await asyncio.wait_for(finished.wait(), delay)
            except asyncio.TimeoutError:
                delay = min(WAIT_MAX_S, 1.5 * delay)

    async def output(self, record: JobRecord) -> bytes:
        """A completed job's media (``FileNotFoundError`` once evicted), read in a thread: a slow
        results store (s3://) must not stall the step loop."""
        return await asyncio.to_thread(self.store.output, record)

    def remove(self, job_id: str) -> JobRecord:
        """Cancel a queued job, stop a running one after its current step (here at once, on
        another replica at its next keeper round), forget a finished one; ``KeyError`` if unknown."""
        record = self.store.delete(job_id)
        if record is None:
            raise KeyError(job_id)
        if record.status is JobStatus.QUEUED:
            self.counters["cancelled"] += 1
        elif job_id in self.running:
            self._stop(job_id)
        return record

    def forget(self, records: list[JobRecord]) -> None:
        """Delete the records and media of synchronous jobs once their answer is read."""
        for record in records:
            self.store.delete(record.id)

    def queue_depth(self) -> int:
        """Jobs waiting in the shared queue (every replica's)."""
        return self.store.queue_depth()

    # -- running jobs ---------------------------------------------------------------------------

    async def _next_job(self) -> JobRecord:
        """The next job of the shared queue, taken by this replica; waits until there is one and
        the rank group is ready: a starting group's replica, or one whose group failed for good,
        leaves the jobs to the other replicas."""
        while True:
            if self.group.state == "ready" and not self.group.failed_for_good:
                record = self.store.take(self.replica)
                if record is not None:
                    self._start(record)
                    return record
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except asyncio.TimeoutError:
                pass

    def _start(self, record: JobRecord) -> None:
        self.running[record.id] = Running(record)
        self.counters["dispatched"] += 1

    async def _ready_group(self):
        """The ready rank group, after a ping: a rank that died since the last probe is waited
        for (its rebuild), not found by a job."""
        generation = await self.group.ready()
        if not await self.group.probe():
            generation = await self.group.ready()
        return generation

    def _check_sizes(self, record: JobRecord, generation) -> None:
        """The built model's size rules (which a hub checkpoint's spec could only guess) accept
        the job, or it fails naming the field."""
        validate(record.request, self.spec, self.settings.layout, self.settings.limits,
                 sizes=SizeRules(**generation.infos[0].sizes))

    def _finish(self, record: JobRecord, output: Optional[Output] = None, error=None) -> None:
        """End ``record`` with its output or its error (an exception or a :class:`JobError`) in
        the store, count it, and wake the requests that wait for it here."""
        self.running.pop(record.id, None)
        job_error = None
        if error is not None:
            job_error = error if isinstance(error, JobError) else JobError.of(error)
            if isinstance(error, Exception) and job_error.status >= 500 and \
                    not isinstance(error, (GroupUnavailable, RequestFailed)):
                logger.error("spectrum-xdit: job %s failed: %s: %s", record.id, type(error).__name__, error)
            self.counters["cancelled" if job_error.status == 409 else "failed"] += 1
        else:
            self.counters["succeeded"] += 1
        task = asyncio.get_running_loop().create_task(self._record_end(record, output, job_error))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _record_end(self, record: JobRecord, output: Optional[Output], error: Optional[JobError]) -> None:
        """Write how ``record`` ended in a thread (its media may go to a slow results store, such
        as s3://, which must not stall the step loop), then wake its waiters."""
        try:
            finished = await asyncio.to_thread(self.store.finish, record, output.media if output else None,
                                               output.report if output else None, error)
        except Exception:  # its lease expires and another replica runs it again
            logger.exception("spectrum-xdit: recording how job %s ended failed", record.id)
            finished = None
        status = None if finished else "cancelled" if error is not None and error.status == 409 else "failed"
        self.metrics.finished(finished or record, output, status)
        self._finished.set()
        self._finished = asyncio.Event()

    def _release(self, record: JobRecord, why: GroupUnavailable) -> None:
        """Put a job back in the queue that never reached the ranks: its group became unavailable."""
        self.running.pop(record.id, None)
        logger.warning("spectrum-xdit: job %s goes back to the queue: %s", record.id, why)
        if self.store.release(record):
            self.counters["requeued"] += 1

    def _stop(self, job_id: str) -> None:
        """Stop a running job after its current step: it was deleted."""
        running = self.running[job_id]
        if self.mode is BatchingMode.SEQUENTIAL:
            if self.group.state == "ready":
                self.group.stop(self.group.current, job_id)
        elif running.leaving is None:
            running.leaving = RequestFailed(409, "the job was cancelled")
            self._interrupt_ticks()

    # -- sequential -----------------------------------------------------------------------------

    async def _run_jobs(self) -> None:
        await self._guarded(self._run_job)

    async def _run_job(self) -> None:
        record = await self._next_job()
        try:
            generation = await self._ready_group()
        except GroupUnavailable as error:
            self._release(record, error)
            return
        try:
            self._check_sizes(record, generation)
            answer = await self.group.run(generation, record.request, record.id)
            self.metrics.block_batch(1)
            self._finish(record, output=answer.output)
        except Exception as error:  # the loop must outlive any one job
            self._finish(record, error=error)

    @staticmethod
    async def _guarded(iteration) -> None:
        """Run ``iteration`` forever: a store that fails once (a locked SQLite file, a Redis
        connection reset, a results store's error) is logged and tried again a poll later, since
        a loop that ended would leave this replica taking no job while it looks healthy."""
        while True:
            try:
                await iteration()
            except Exception:
                logger.exception("spectrum-xdit: the job loop failed; trying again")
                await asyncio.sleep(POLL_S)

    # -- the step loop --------------------------------------------------------------------------

    async def _run_steps(self) -> None:
        await self._guarded(self._step)

    async def _step(self) -> None:
        if not self.running:
            await self._next_job()
        try:
            ticking = any(running.joined for running in self.running.values())
            generation = await (self.group.ready() if ticking else self._ready_group())
        except GroupUnavailable as error:   # the jobs on the ranks fail; the others wait in the queue
            for running in list(self.running.values()):
                if running.joined:
                    self._finish(running.record, error=error)
                else:
                    self._release(running.record, error)
            return
        joins = self._admit(generation)
        drops = self._drops()
        try:
            answer = await self.group.tick(generation, [(r.id, r.request) for r in joins], list(drops),
                                           TICK_RUN_S)
        except Exception as error:  # every job in the loop ends with it; the queue waits
            for running in list(self.running.values()):
                self._finish(running.record, error=error)
            return
        self._after_tick(answer, drops)

    def _free_slots(self) -> int:
        return self.settings.max_batch_size - len(self.running)

    def _interrupt_ticks(self) -> None:
        """A job waits to join or leave the loop: the ranks' run of ticks ends after this tick."""
        if self.group.state == "ready":
            self.group.interrupt(self.group.current)

    def _admit(self, generation) -> list[JobRecord]:
        """The jobs that join at this tick: those taken since the last tick, and (``continuous``,
        or ``batched`` into an empty loop) more from the queue up to ``max_batch_size``."""
        new = [running.record for running in self.running.values() if not running.joined]
        if self.mode is BatchingMode.CONTINUOUS or len(new) == len(self.running):
            while self._free_slots() > 0 and (record := self.store.take(self.replica)) is not None:
                self._start(record)
                new.append(record)
        joins = []
        for record in new:
            running = self.running[record.id]
            if running.leaving is not None:   # deleted before it joined: it never reaches the ranks
                self._finish(record, error=running.leaving)
                continue
            running.joined = True
            try:
                self._check_sizes(record, generation)
            except Exception as error:
                self._finish(record, error=error)
                continue
            joins.append(record)
        return joins

    def _drops(self) -> dict[str, RequestFailed]:
        """The running jobs that leave the loop at this tick: deleted, or past ``request_timeout_s``."""
        timeout = self.settings.request_timeout_s
        drops = {}
        for job_id, running in self.running.items():
            if not running.joined:
                continue
            if running.leaving is None and time.perf_counter() - running.started > timeout:
                running.leaving = RequestFailed(504, f"the request did not finish within {timeout:g} s "
                                                "(request_timeout_s)")
            if running.leaving is not None:
                drops[job_id] = running.leaving
        return drops

    def _after_tick(self, answer: TickAnswer, drops: dict[str, RequestFailed]) -> None:
        for job_id, why in drops.items():
            step = answer.dropped.get(job_id)
            self._finish(self.running[job_id].record,
                         error=RequestFailed(why.status, f"{why}; it stopped after step {-1 if step is None else step - 1}"))
        for job_id, error in answer.failed.items():
            self._finish(self.running[job_id].record, error=error)
        for job_id, steps in answer.steps.items():
            running = self.running[job_id]
            running.record = running.record.model_copy(update={"steps_done": steps})
        for job_id, output in answer.finished.items():
            self._finish(self.running[job_id].record, output=output)
        for rows in answer.block_rows:
            self.counters["ticks"] += 1
            if rows:
                self.counters["block_calls"] += 1
                self.counters["block_rows"] += rows
                self.metrics.block_batch(rows)

    # -- background: leases, progress, deletes, re-delivery, eviction, health --------------------

    async def _keep(self) -> None:
        """Every ``KEEPER_S``: renew the running jobs' leases with their progress, stop the ones
        deleted on other replicas or whose lease was lost (re-queued while this replica stalled),
        and (continuous) let queued jobs join a loop with room."""
        while True:
            await asyncio.sleep(KEEPER_S)
            try:
                await self._keep_once()
            except Exception:  # a store that fails once must not end the keeping
                logger.exception("spectrum-xdit: renewing the running jobs' leases failed")

    async def _keep_once(self) -> None:
        if self.mode is BatchingMode.SEQUENTIAL and self.running and self.group.state == "ready":
            progress = await self.group.progress(self.group.current)
            running = self.running.get(progress.get("job"))
            if running is not None:
                running.record = running.record.model_copy(update={"steps_done": progress["steps"]})
        for job_id, running in list(self.running.items()):
            if self.running.get(job_id) is not running:   # finished meanwhile
                continue
            renewed = self.store.renew(running.record)
            if renewed is None:
                self._stop(job_id)
            else:
                running.record = renewed
        depth = self.store.queue_depth()
        self.metrics.queue_depth(depth)
        if self.mode is BatchingMode.CONTINUOUS and self.running and self._free_slots() > 0 and depth:
            self._interrupt_ticks()

    async def _reap(self) -> None:
        """Put back in the queue the jobs whose replica died (their lease expired), and forget
        the results past their TTL or the byte bound."""
        while True:
            await asyncio.sleep(max(0.2, self.settings.lease_s / 3))
            try:
                # full scans of the store: in a thread, off the step loop's event loop
                requeued = await asyncio.to_thread(self.store.requeue_expired, self.replica, list(self.running))
                if requeued:
                    logger.warning("spectrum-xdit: jobs %s lost their replica; queued again", requeued)
                    self.counters["requeued"] += len(requeued)
                    self._wake.set()
                await asyncio.to_thread(self.store.evict, self.settings.result_ttl_s, self.settings.max_result_bytes)
            except Exception:  # a store that fails once must not end the reaping
                logger.exception("spectrum-xdit: re-queueing expired jobs failed")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            if not self.running:
                try:
                    await self.group.probe()
                except Exception:  # a failed probe must not end the probing
                    logger.exception("spectrum-xdit: health probe failed")

    def check(self) -> None:
        """Raise if one of the engine's tasks ended (Serve's health check then replaces the replica)."""
        for task in self._tasks:
            if task.done():
                error = None if task.cancelled() else task.exception()
                raise RuntimeError(f"the engine's task {task.get_coro().__name__} ended: {error!r}")

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.group.kill()
        self.store.close()
