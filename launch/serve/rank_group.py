"""A replica's rank group: ``world_size`` :class:`RankWorker` actors forming one torch.distributed
world, started in the replica's placement-group bundles and rebuilt there when a rank dies,
fails or hangs."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Optional

import ray
from ray.exceptions import RayActorError, RayTaskError

from .settings import ServeSettings
from .worker import RankWorker

logger = logging.getLogger("ray.serve")
# After the first failure of a rank, how long to wait for the others to fail too (a rank whose
# peer died usually gets a connection error within a second), to tell a death from a bug.
FAILURE_GRACE_S = 10.0
MAX_SETUP_FAILURES = 3


class GroupUnavailable(RuntimeError):
    """No ready group to run on (still starting, or failed to start)."""


class GroupFailure(RuntimeError):
    """A request failed on the ranks: ``status`` and ``headers`` of its answer; the group is
    being rebuilt."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


class _Generation:
    """One set of actors of the group and what is known of its set-up."""

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


class RankGroup:
    """Starts the actors, watches their set-up, runs requests on them, rebuilds them."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.rebuilds = 0
        self.setup_failures = 0
        self._number = 0
        self._watchers: set = set()
        self.current: _Generation = self._start()

    @property
    def state(self) -> str:
        return self.current.state

    @property
    def error(self) -> Optional[str]:
        return self.current.error

    @property
    def infos(self) -> Optional[list[dict]]:
        return self.current.infos

    @property
    def failed_for_good(self) -> bool:
        return self.setup_failures >= MAX_SETUP_FAILURES

    def _start(self) -> _Generation:
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        settings = self.settings
        self._number += 1
        placement_group = get_current_placement_group()
        worker_cls = _remote_worker()
        workers = []
        for rank in range(settings.world_size):
            options = {"num_cpus": settings.worker_cpus, "num_gpus": 1 if settings.device == "cuda" else 0,
                       "max_restarts": 0}
            if placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=rank)
            workers.append(worker_cls.options(**options).remote(rank, settings.model_dump()))
        rendezvous = workers[0].rendezvous.remote()
        generation = _Generation(self._number, workers, [w.setup.remote(rendezvous) for w in workers])
        watcher = asyncio.get_running_loop().create_task(self._watch_setup(generation))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return generation

    async def _watch_setup(self, generation: _Generation) -> None:
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*[asyncio.wrap_future(ref.future()) for ref in generation.setup_refs]),
                self.settings.setup_timeout_s)
        except asyncio.TimeoutError:
            generation.error = f"the rank group was not ready after {self.settings.setup_timeout_s:.0f} s"
        except Exception as error:  # a rank failed to start or build the pipeline
            generation.error = f"the rank group failed to start: {describe(error)}"
        else:
            generation.infos = sorted(infos, key=lambda info: info["rank"])
            self.setup_failures = 0
            logger.info("spectrum-xdit rank group %d ready: %s", generation.number, generation.infos)
        if generation.error is not None:
            self.setup_failures += 1
            logger.error("spectrum-xdit rank group %d: %s", generation.number, generation.error)
            generation.kill()
            if self.current is generation and not self.failed_for_good:
                self.rebuild(generation.error)
        generation.settled.set()

    def rebuild(self, reason: str) -> None:
        logger.warning("spectrum-xdit: rebuilding rank group %d: %s", self.current.number, reason)
        self.current.kill()
        self.rebuilds += 1
        self.current = self._start()

    async def ready(self) -> _Generation:
        """The current generation once it is ready; follows the rebuilds that replace a failed start."""
        deadline = asyncio.get_running_loop().time() + self.settings.setup_timeout_s
        for _ in range(MAX_SETUP_FAILURES + 1):
            generation = self.current
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(generation.settled.wait(), max(remaining, 0.01))
            except asyncio.TimeoutError:
                raise GroupUnavailable("the rank group is still starting") from None
            if generation.state == "ready":
                return generation
            if self.current is generation:  # no new group is coming
                break
        raise GroupUnavailable(generation.error)

    async def run(self, generation: _Generation, request) -> dict:
        """Send the request to every rank; rank 0's answer. Raises :class:`GroupFailure`."""
        futures = [asyncio.wrap_future(worker.generate.remote(request).future()) for worker in generation.workers]
        done, pending = await asyncio.wait(futures, timeout=self.settings.request_timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if not failed and not pending:
            return futures[0].result()
        if not failed:
            for future in pending:
                future.cancel()
            self.rebuild("request timed out")
            raise GroupFailure(504, f"the request did not finish within {self.settings.request_timeout_s:.0f} s "
                               "(request_timeout_s); the rank group is being rebuilt")
        if pending:
            more, pending = await asyncio.wait(pending, timeout=FAILURE_GRACE_S)
            failed += [f for f in more if f.exception() is not None]
        for future in pending:
            future.cancel()
        errors = {rank: future.exception() for rank, future in enumerate(futures) if future in failed}
        dead = sorted(rank for rank, error in errors.items() if isinstance(error, RayActorError))
        if dead:
            self.rebuild(f"rank(s) {dead} died")
            detail = "; ".join(f"rank {rank}: {describe(errors[rank])}" for rank in dead)
            raise GroupFailure(503, f"a worker of this replica's rank group died during the request ({detail}); "
                               "the group is being rebuilt, retry the request", headers={"Retry-After": "30"})
        rank, error = min(errors.items())
        self.rebuild(f"rank {rank} failed")
        raise GroupFailure(500, f"generation failed on rank {rank}: {describe(error)}; the rank group is being rebuilt")

    def kill(self) -> None:
        self.current.kill()


@functools.cache
def _remote_worker():
    return ray.remote(RankWorker)


def describe(error: BaseException) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if getattr(error, "cause", None) is not None else error
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
