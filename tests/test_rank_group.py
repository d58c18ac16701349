"""The replica's handling of its rank group, with stand-in ranks (real Ray actors that follow the
rank protocol of ``RankWorker`` but generate nothing): which failures fail one request and which
rebuild the group, stopping at a step boundary, probing, back-off."""

import asyncio
import os
import time

import pytest

pytest.importorskip("ray")

from spectrum_xdit.launch.serve import rank_group  # noqa: E402
from spectrum_xdit.launch.serve.contract import JobError, Output, RankInfo, RunAnswer  # noqa: E402
from spectrum_xdit.launch.serve.rank_group import RankGroup, RequestFailed  # noqa: E402
from spectrum_xdit.launch.serve.settings import ServeSettings  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


class StandInRank:
    """Follows ``RankWorker``'s protocol; ``generate`` does what ``request[rank]`` says: ``ok``,
    ``error``, ``bad`` (an input error), ``steps`` (0.05 s steps until stopped), ``hang``
    (ignores stop), ``die``."""

    def __init__(self, rank: int, settings: dict):
        import threading

        self.rank = rank
        self._stop = threading.Event()

    def node(self) -> str:
        return "one-node"

    def rendezvous(self, same_node: bool) -> dict:
        return {"same_node": same_node}

    def setup(self, rendezvous: dict) -> RankInfo:
        # where the group met, shown as the node
        return RankInfo(rank=self.rank, pid=os.getpid(), node=f"same_node={rendezvous['same_node']}", device="cpu",
                        sizes={}, xfuser_patches={})

    def ping(self) -> int:
        return self.rank

    def stop(self, job: str) -> None:
        self._stop.set()

    def generate(self, request: dict, job: str) -> RunAnswer:
        self._stop.clear()
        behaviour = request[self.rank]
        if behaviour == "ok":
            return RunAnswer(self.rank, output=Output(media=b"", report={"job": job}))
        if behaviour == "error":
            return RunAnswer(self.rank, error=JobError(status=500, message="ValueError: broken on purpose"))
        if behaviour == "bad":
            return RunAnswer(self.rank, error=JobError(status=422, field="prompt", message="prompt: no"))
        if behaviour == "die":
            os._exit(1)
        for step in range(10_000):
            if self._stop.is_set() and behaviour == "steps":
                return RunAnswer(self.rank, stopped_after_step=step)
            time.sleep(0.05)
        raise AssertionError("never stopped")


@pytest.fixture(scope="module")
def local_ray():
    import sys

    import ray

    # the stand-in class travels to the workers by value: they cannot import this test module
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # a cluster of its own (never one another process started), its logs shown on failure (conftest)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def short_grace(monkeypatch):
    monkeypatch.setattr(rank_group, "GRACE_S", 1.0)


def _scenario(body, request_timeout_s: float = 60.0):
    """Run ``body(group)`` on a two-rank stand-in group inside an event loop."""
    settings = ServeSettings.from_flat({"model": "tiny-wan", "ulysses_degree": 2, "worker_cpus": 0.01,
                                       "request_timeout_s": request_timeout_s, "setup_timeout_s": 60})

    async def main():
        group = RankGroup(settings, worker_cls=StandInRank)
        try:
            await group.ready()
            return await body(group)
        finally:
            group.kill()

    return asyncio.run(main())


async def _run(group, request):
    generation = await group.ready()
    try:
        return generation.number, await group.run(generation, request, "job"), None
    except RequestFailed as failure:
        return generation.number, None, failure


def test_one_node_groups_meet_through_a_file_store(local_ray):
    async def body(group):
        return (await group.ready()).infos

    infos = _scenario(body)
    assert [info.node for info in infos] == ["same_node=True"] * 2


def test_a_request_that_fails_alike_on_every_rank_fails_alone(local_ray):
    async def body(group):
        failed = await _run(group, {0: "error", 1: "error"})
        bad = await _run(group, {0: "bad", 1: "bad"})
        good = await _run(group, {0: "ok", 1: "ok"})
        return failed, bad, good, group.rebuilds

    (number, _, failed), (_, _, bad), (after, answer, _), rebuilds = _scenario(body)
    assert failed.status == 500 and "broken on purpose" in str(failed) and not failed.rebuilt
    assert bad.status == 422 and bad.field == "prompt" and not bad.rebuilt
    assert answer == RunAnswer(0, output=Output(media=b"", report={"job": "job"}))
    assert rebuilds == 0 and after == number


def test_a_rank_left_behind_in_a_collective_rebuilds_the_group(local_ray):
    async def body(group):
        started = time.monotonic()
        outcome = await _run(group, {0: "error", 1: "hang"})
        return outcome, time.monotonic() - started, group.rebuilds, group.last_rebuild

    (_, _, failure), seconds, rebuilds, last = _scenario(body)
    assert failure.status == 500 and failure.rebuilt and "rank(s) [1] did not finish" in str(failure)
    assert seconds < 10 and rebuilds == 1 and "did not finish" in last["reason"]


def test_a_request_past_its_timeout_is_stopped_at_a_step_boundary(local_ray):
    async def body(group):
        stopped = await _run(group, {0: "steps", 1: "steps"})
        hung = await _run(group, {0: "steps", 1: "hang"})
        return stopped, hung, group.rebuilds

    (_, _, stopped), (_, _, hung), rebuilds = _scenario(body, request_timeout_s=0.5)
    assert stopped.status == 504 and not stopped.rebuilt and "stopped after step" in str(stopped)
    assert hung.status == 504 and hung.rebuilt and "rank(s) [1] did not finish" in str(hung)
    assert rebuilds == 1


def test_a_dead_rank_fails_its_request_with_503_and_rebuilds(local_ray):
    async def body(group):
        outcome = await _run(group, {0: "ok", 1: "die"})
        after = await _run(group, {0: "ok", 1: "ok"})
        return outcome, after, group.rebuilds

    (number, _, failure), (after, answer, _), rebuilds = _scenario(body)
    assert failure.status == 503 and failure.job_error.headers == {"Retry-After": "30"} and "rank 1" in str(failure)
    assert rebuilds == 1 and after == number + 1 and answer.rank == 0


def test_probes_find_a_dead_idle_rank_and_rebuilds_back_off(local_ray):
    import ray

    async def body(group):
        delays = []
        for _ in range(3):
            generation = await group.ready()
            ray.kill(generation.workers[1], no_restart=True)
            await asyncio.sleep(0.5)
            await group.probe()
            delays.append(group.last_rebuild["delay_s"])
        number = (await group.ready()).number
        await _run(group, {0: "ok", 1: "ok"})   # a served request ends the run of failures
        return delays, number, group.last_rebuild["reason"], group.consecutive_failures

    delays, number, reason, failures = _scenario(body)
    assert delays == [0.0, 2.0, 4.0] and number == 4
    assert "rank(s) [1] did not answer the health probe" in reason and failures == 0
