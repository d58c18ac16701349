"""A replica's rank group: ``world_size`` :class:`RankWorker` actors forming one torch.distributed
world in the replica's placement-group bundles. Only a dead or hung rank rebuilds it, after a
back-off that grows with consecutive failures; a request that fails alike on every rank fails
alone, and a request that runs too long is stopped at a step boundary."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from .contract import JobError, RankInfo, RunAnswer, TickAnswer
from .settings import ServeSettings
from .worker import RankWorker

logger = logging.getLogger("ray.serve")
# After the first answer of a failed or stopped request, how long the other ranks may take to
# answer too before they count as hung (stuck in a collective their peers left).
GRACE_S = 10.0
PROBE_TIMEOUT_S = 10.0
MAX_SETUP_FAILURES = 3
MAX_BACKOFF_S = 60.0


class GroupUnavailable(RuntimeError):
    """No ready group to run on (starting, rebuilding, or failed to start)."""

    @property
    def job_error(self) -> JobError:
        return JobError(status=503, message=f"the rank group is not available: {self}", retry_after_s=30)


class RequestFailed(RuntimeError):
    """A request's answer other than its output: ``status`` and ``field`` or ``retry_after_s``;
    ``rebuilt`` says whether the group is being rebuilt for it."""

    def __init__(self, status: int, message: str, field: Optional[str] = None, retry_after_s: Optional[int] = None,
                 rebuilt: bool = False):
        super().__init__(message)
        self.status = status
        self.field = field
        self.retry_after_s = retry_after_s
        self.rebuilt = rebuilt

    @property
    def job_error(self) -> JobError:
        return JobError(status=self.status, message=str(self), field=self.field, retry_after_s=self.retry_after_s)


class _Generation:
    """One set of actors of the group and what is known of its set-up."""

    def __init__(self, number: int, workers: list):
        self.number = number
        self.workers = workers
        self.infos: Optional[list[RankInfo]] = None
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


class RankGroup:
    """Starts the actors, watches their set-up, runs requests on them, probes and rebuilds them.

    Construct it inside the replica's event loop, outside any request: the calls it makes to the
    ranks then belong to no HTTP request, and a client that hangs up cancels none of them."""

    def __init__(self, settings: ServeSettings, worker_cls: type = RankWorker):
        self.settings = settings
        self._worker = ray.remote(worker_cls)
        self.rebuilds = 0
        self.setup_failures = 0
        self.consecutive_failures = 0
        self.last_rebuild: Optional[dict] = None
        self._number = 0
        self._tasks: set = set()
        self.current = self._start(delay=0.0)

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self.current.state

    @property
    def error(self) -> Optional[str]:
        return self.current.error

    @property
    def infos(self) -> Optional[list[RankInfo]]:
        return self.current.infos

    @property
    def failed_for_good(self) -> bool:
        return self.setup_failures >= MAX_SETUP_FAILURES

    # -- life cycle ---------------------------------------------------------------------------

    def _start(self, delay: float) -> _Generation:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        settings = self.settings
        self._number += 1
        placement_group = get_current_placement_group()
        workers = []
        for rank in range(settings.world_size):
            options = {"num_cpus": settings.worker_cpus, "num_gpus": 1 if settings.device == "cuda" else 0,
                       "max_restarts": 0, "max_concurrency": 2}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank)
            workers.append(self._worker.options(**options).remote(rank, settings.model_dump()))
        generation = _Generation(self._number, workers)
        self._spawn(self._set_up(generation, delay))
        return generation

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _set_up(self, generation: _Generation, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            infos = await asyncio.wait_for(self._rendezvous_and_set_up(generation), self.settings.setup_timeout_s)
        except asyncio.TimeoutError:
            generation.error = f"the rank group was not ready after {self.settings.setup_timeout_s:.0f} s"
        except Exception as error:  # a rank failed to start or build the pipeline
            generation.error = f"the rank group failed to start: {describe(error)}"
        else:
            generation.infos = sorted(infos, key=lambda info: info.rank)
            self.setup_failures = 0
            logger.info("spectrum-xdit rank group %d ready", generation.number)
        if generation.error is not None:
            self.setup_failures += 1
            logger.error("spectrum-xdit rank group %d: %s", generation.number, generation.error)
            if self.current is generation and not self.failed_for_good:
                self.rebuild(generation, generation.error)
            generation.kill()
        generation.settled.set()

    async def _rendezvous_and_set_up(self, generation: _Generation) -> list[RankInfo]:
        workers = generation.workers
        nodes = await asyncio.gather(*[_wait(worker.node.remote()) for worker in workers])
        rendezvous = await _wait(workers[0].rendezvous.remote(len(set(nodes)) == 1))
        return await asyncio.gather(*[_wait(worker.setup.remote(rendezvous)) for worker in workers])

    def rebuild(self, generation: _Generation, reason: str) -> None:
        """Replace ``generation`` (if it is still the current one) after a back-off of 2^(n-1)
        seconds for the n-th consecutive failure, at most a minute."""
        if generation is not self.current:
            return
        self.consecutive_failures += 1
        delay = 0.0 if self.consecutive_failures == 1 else min(MAX_BACKOFF_S, 2.0 ** (self.consecutive_failures - 1))
        logger.warning("spectrum-xdit: rebuilding rank group %d in %.0f s: %s", generation.number, delay, reason)
        self.last_rebuild = {"reason": reason, "at": time.time(), "delay_s": delay,
                             "consecutive_failures": self.consecutive_failures}
        generation.kill()
        self.rebuilds += 1
        self.current = self._start(delay)

    async def ready(self) -> _Generation:
        """The current generation once it is ready; follows the rebuilds that replace a failed start."""
        deadline = time.monotonic() + self.settings.setup_timeout_s + MAX_BACKOFF_S
        for _ in range(MAX_SETUP_FAILURES + 1):
            generation = self.current
            try:
                await asyncio.wait_for(generation.settled.wait(), max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                raise GroupUnavailable("the rank group is still starting") from None
            if generation.state == "ready":
                return generation
            if self.current is generation:  # no new group is coming
                break
        raise GroupUnavailable(generation.error)

    def kill(self) -> None:
        self.current.kill()

    # -- requests -----------------------------------------------------------------------------

    async def run(self, generation: _Generation, request, job: str) -> RunAnswer:
        """Run ``request`` as ``job`` on every rank; rank 0's answer, or :class:`RequestFailed`.

        A request still running at ``request_timeout_s`` is stopped at its next step boundary
        (504). A rank that dies (503), or that has not answered ``GRACE_S`` after its peers failed
        or stopped (stuck in a collective they left), rebuilds the group; a request that fails
        alike on every rank fails alone."""
        futures = [_wait(worker.generate.remote(request, job)) for worker in generation.workers]
        pending = await self._until_done_or_failed(futures, self.settings.request_timeout_s)
        timed_out = bool(pending) and not any(_failed(f) for f in futures if f.done())
        if timed_out:
            self.stop(generation, job)
            _, pending = await asyncio.wait(pending, timeout=GRACE_S)
        results = self._settle(generation, futures, pending, "the request", 504 if timed_out else 500)
        stopped = [result.stopped_after_step for result in results if result.stopped_after_step is not None]
        if timed_out:
            raise RequestFailed(504, f"the request did not finish within {self.settings.request_timeout_s:g} s "
                                f"(request_timeout_s); it was stopped after step {max(stopped, default=-1)}")
        if stopped:
            raise RequestFailed(409, f"the job was cancelled; it stopped after step {max(stopped)}")
        return results[0]

    async def tick(self, generation: _Generation, joins: list, drops: list, max_seconds: float) -> TickAnswer:
        """A run of ticks of the step loop on every rank (``RankWorker.tick``); rank 0's answer,
        or :class:`RequestFailed` as ``run`` raises it, for every job in the loop."""
        futures = [_wait(worker.tick.remote(joins, drops, max_seconds)) for worker in generation.workers]
        pending = await self._until_done_or_failed(futures, self.settings.request_timeout_s)
        return self._settle(generation, futures, pending, "a step of the batch", 500)[0]

    def _settle(self, generation: _Generation, futures: list, pending: set, what: str, hung_status: int) -> list:
        """Every rank's answer, or :class:`RequestFailed`: a dead rank (503) or one still busy
        (``hung_status``) rebuilds the group; an error on every rank fails ``what`` alone, an
        error on some ranks rebuilds the group too."""
        dead = [rank for rank, f in enumerate(futures) if f.done() and isinstance(f.exception(), RayActorError)]
        if dead:
            self.rebuild(generation, f"rank(s) {dead} died")
            detail = "; ".join(f"rank {rank}: {describe(futures[rank].exception())}" for rank in dead)
            raise RequestFailed(503, f"a worker of this replica's rank group died during {what} ({detail}); "
                                "the group is being rebuilt, retry the request", retry_after_s=30,
                                rebuilt=True)
        if pending:
            hung = [rank for rank, f in enumerate(futures) if f in pending]
            for future in pending:
                future.cancel()
            self.rebuild(generation, f"rank(s) {hung} did not finish {what}")
            raise RequestFailed(hung_status, f"rank(s) {hung} did not finish {what}; the rank group is being rebuilt",
                                rebuilt=True)
        results = [future.result() for future in futures]
        errors = [result.error for result in results if result.error is not None]
        if errors:
            split = len(errors) < len(results)   # the ranks went separate ways: rebuild to be safe
            if split:
                self.rebuild(generation, f"the ranks disagreed about {what}")
            raise RequestFailed(errors[0].status, errors[0].message, field=errors[0].field, rebuilt=split)
        self.consecutive_failures = 0
        return results

    @staticmethod
    async def _until_done_or_failed(futures: list, timeout: float) -> set:
        """Wait for every future, but no longer than ``timeout``, nor (after one failed) ``GRACE_S``."""
        deadline = time.monotonic() + timeout
        pending = set(futures)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=max(deadline - time.monotonic(), 0),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            if any(_failed(future) for future in done):
                return (await asyncio.wait(pending, timeout=GRACE_S))[1] if pending else set()
        return pending

    def stop(self, generation: _Generation, job: str) -> None:
        """Ask every rank to stop ``job`` after its current step; ``run`` then answers 409."""
        for worker in generation.workers:
            worker.stop.remote(job)

    def interrupt(self, generation: _Generation) -> None:
        """End the ranks' current run of ticks after the tick under way (rank 0 decides it)."""
        generation.workers[0].interrupt.remote()

    async def progress(self, generation: _Generation) -> dict:
        """Rank 0's running job and its denoising steps done (``{}`` if it does not answer soon)."""
        done, _ = await asyncio.wait([_wait(generation.workers[0].progress.remote())], timeout=PROBE_TIMEOUT_S)
        answer = next(iter(done), None)
        return answer.result() if answer is not None and answer.exception() is None else {}

    async def probe(self) -> bool:
        """Ping every rank of the ready generation; a rank that is dead or does not answer
        rebuilds the group, so a dead rank is found without a user request. Whether all answered."""
        generation = self.current
        if generation.state != "ready":
            return False
        pings = [_wait(worker.ping.remote()) for worker in generation.workers]
        done, pending = await asyncio.wait(pings, timeout=PROBE_TIMEOUT_S)
        dead = sorted(rank for rank, ping in enumerate(pings) if ping in pending or ping.exception() is not None)
        for ping in pending:
            ping.cancel()
        if dead:
            self.rebuild(generation, f"rank(s) {dead} did not answer the health probe")
        return not dead


def _failed(future: asyncio.Future) -> bool:
    return future.exception() is not None or future.result().error is not None


def _wait(ref) -> asyncio.Future:
    return asyncio.wrap_future(ref.future())


def describe(error: BaseException) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
