"""The replica engine's step loop (`launch/serve/engine.py`) against a stand-in rank group that
ticks instantly, on a job store in a temporary SQLite file: who joins when (continuous, batched,
max_batch_size), and how jobs leave (finished, deleted, timed out, a failed tick) while the queue
waits."""

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from spectrum_xdit.launch.request import Limits, model_defaults, parse_request
from spectrum_xdit.launch.serve import engine as engine_module
from spectrum_xdit.launch.serve.contract import JobStatus, Output, TickAnswer
from spectrum_xdit.launch.serve.rank_group import RequestFailed
from spectrum_xdit.launch.serve.settings import ServeSettings
from spectrum_xdit.models import resolve_model

SPEC = resolve_model("tiny-wan")
pytestmark = pytest.mark.timeout(60)


class StandInGroup:
    """Ticks like the ranks: each job advances one step per tick and finishes at its step count;
    ``fail_at``: the tick (counted from 1) that fails on every rank."""

    def __init__(self, settings, fail_at=None):
        self.state, self.current, self.rebuilds = "ready", SimpleNamespace(number=1), 0
        self.failed_for_good = False
        self.steps: dict[str, int] = {}
        self.requests: dict = {}
        self.log: list[tuple[list, list, list]] = []    # (joined, dropped, in the loop) per tick
        self.fail_at = fail_at
        self.interrupts = 0

    async def ready(self):
        sizes = dataclasses.asdict(SPEC.sizes)
        return SimpleNamespace(infos=[SimpleNamespace(sizes=sizes, xfuser_patches={"installed": ["padding"]})])

    async def probe(self) -> bool:
        return True

    def interrupt(self, generation) -> None:
        self.interrupts += 1

    async def tick(self, generation, joins, drops, max_seconds):
        await asyncio.sleep(0.02)
        dropped = {job: self.steps.pop(job) for job in drops if job in self.steps}
        for job, request in joins:
            self.steps[job], self.requests[job] = 0, request
        self.log.append(([job for job, _ in joins], list(drops), sorted(self.steps)))
        if len(self.log) == self.fail_at:
            self.steps.clear()
            raise RequestFailed(500, "ValueError: the tick broke on every rank")
        finished = {}
        for job in list(self.steps):
            self.steps[job] += 1
            if self.steps[job] == self.requests[job].num_inference_steps:
                del self.steps[job]
                finished[job] = Output(media=b"x", report={"nfe": {"cond": 1}, "num_inference_steps": 1})
        return TickAnswer(0, dropped=dropped, finished=finished, steps=dict(self.steps),
                          block_rows=[len(self.steps) + len(finished)])

    def kill(self) -> None:
        pass


class NoMetrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _request(steps: int, seed: int = 0):
    return parse_request({"prompt": "x", "seed": seed, "num_inference_steps": steps},
                         {**model_defaults(SPEC), "height": 32, "width": 32, "num_frames": 5})


async def _engine(monkeypatch, tmp_path, fail_at=None, **settings):
    monkeypatch.setattr(engine_module, "RankGroup", lambda s: StandInGroup(s, fail_at))
    monkeypatch.setattr(engine_module, "ServeMetrics", NoMetrics)
    settings = ServeSettings(model="tiny-wan", broker_url=f"sqlite:///{tmp_path}/jobs-{len(list(tmp_path.iterdir()))}.db",
                             **settings).with_job_store()
    return engine_module.Engine(settings, SPEC, "replica-a")


def _submit(engine, request, kept=False):
    return engine.submit([request], kept=kept)[0]


async def _outcome(engine, job):
    """``completed``, the status of the job's error, or ``deleted``."""
    try:
        record = await asyncio.wait_for(engine.result(job.id), 10)
    except KeyError:
        return "deleted"
    return "completed" if record.status is JobStatus.COMPLETED else record.error.status


def test_continuous_admits_at_the_next_tick_and_batched_only_into_an_empty_loop(monkeypatch, tmp_path):
    async def scenario(mode):
        engine = await _engine(monkeypatch, tmp_path, batching=mode, max_batch_size=2)
        first = _submit(engine, _request(6))
        await asyncio.sleep(0.05)                 # first is in the loop by now
        later = [_submit(engine, _request(3, seed)) for seed in (1, 2)]
        outcomes = await asyncio.gather(*[_outcome(engine, job) for job in [first, *later]])
        engine.close()
        joined = {job: tick for tick, (joins, _, _) in enumerate(engine.group.log) for job in joins}
        return outcomes, joined, [job.id for job in [first, *later]], engine.group.log, engine.group.interrupts

    outcomes, joined, (first, a, b), log, interrupts = asyncio.run(scenario("continuous"))
    assert outcomes == ["completed"] * 3
    assert interrupts == 1        # a's arrival ended the ranks' run of ticks; b found the loop full
    assert joined[a] < 6 and joined[b] >= joined[a] + 3   # a joins mid-flight; b waits for a free slot
    assert max(len(active) for _, _, active in log) == 2
    outcomes, joined, (first, a, b), log, interrupts = asyncio.run(scenario("batched"))
    assert interrupts == 0
    assert outcomes == ["completed"] * 3
    assert joined[a] == joined[b] == 6                    # both wait until the first's batch is done


def test_a_deleted_or_timed_out_job_leaves_at_the_next_tick_and_the_others_go_on(monkeypatch, tmp_path):
    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, batching="continuous", request_timeout_s=0.3,
                               limits=Limits(max_steps=10_000))
        deleted, slow, quick = (_submit(engine, _request(steps), kept=True) for steps in (9000, 10_000, 4))
        await asyncio.sleep(0.05)
        engine.remove(deleted.id)
        ended = []
        engine.metrics = SimpleNamespace(finished=lambda record, output, status: ended.append(status or record.status),
                                         block_batch=lambda rows: None, queue_depth=lambda depth: None)
        outcomes = await asyncio.gather(*[_outcome(engine, job) for job in (deleted, slow, quick)])
        engine.close()
        return outcomes, engine.get(slow.id).error.message, engine.counters, ended

    outcomes, message, counters, ended = asyncio.run(scenario())
    assert outcomes == ["deleted", 504, "completed"]
    assert sorted(map(str, ended)) == sorted(map(str, ["cancelled", JobStatus.FAILED, JobStatus.COMPLETED]))
    assert "request_timeout_s" in message and "stopped after step" in message
    assert counters["cancelled"] == 1 and counters["failed"] == 1 and counters["succeeded"] == 1


def test_a_failed_tick_fails_the_jobs_in_the_loop_and_the_queue_then_runs(monkeypatch, tmp_path):
    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, fail_at=3, batching="continuous", max_batch_size=2)
        jobs = [_submit(engine, _request(5, seed)) for seed in range(4)]
        outcomes = await asyncio.gather(*[_outcome(engine, job) for job in jobs])
        engine.close()
        return outcomes

    assert asyncio.run(scenario()) == [500, 500, "completed", "completed"]


def test_the_images_of_one_request_join_the_same_tick(monkeypatch, tmp_path):
    """As POST /v1/images/generations queues its n images: n jobs at once, into a running loop."""
    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, batching="continuous", max_batch_size=5)
        first = _submit(engine, _request(8))
        await asyncio.sleep(0.05)
        images = engine.submit([_request(4, seed) for seed in range(4)])
        outcomes = await asyncio.gather(*[_outcome(engine, job) for job in [first, *images]])
        engine.close()
        joined = {job: tick for tick, (joins, _, _) in enumerate(engine.group.log) for job in joins}
        return outcomes, {joined[job.id] for job in images}, joined[first.id]

    outcomes, image_ticks, first_tick = asyncio.run(scenario())
    assert outcomes == ["completed"] * 5
    assert len(image_ticks) == 1 and image_ticks.pop() > first_tick


def test_every_model_but_per_token_timesteps_runs_the_step_loop():
    for model in ("tiny-flux", "tiny-wan", "tiny-wan22", "digits-flux"):
        assert ServeSettings(model=model).step_batching == "continuous", model
    ti2v = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert ServeSettings(model=ti2v).step_batching is None
    with pytest.raises(ValueError, match="batching: continuous runs a timestep per sample"):
        ServeSettings(model=ti2v, batching="continuous").check()


def test_a_store_error_is_logged_and_the_loop_goes_on(monkeypatch, tmp_path):
    """A locked SQLite file or a dropped Redis connection at a take or a finish must not end the
    loop for good; and a task that did end shows in the health check."""
    import sqlite3

    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, batching="continuous")
        take, finish, fails = engine.store.take, engine.store.finish, {"take": 2, "finish": 1}

        def flaky(name, call):
            def wrapped(*args, **kwargs):
                if fails[name]:
                    fails[name] -= 1
                    raise sqlite3.OperationalError("database is locked")
                return call(*args, **kwargs)
            return wrapped

        monkeypatch.setattr(engine.store, "take", flaky("take", take))
        monkeypatch.setattr(engine.store, "finish", flaky("finish", finish))
        jobs = [_submit(engine, _request(2, seed)) for seed in range(2)]
        await asyncio.sleep(0.3)
        engine.check()                                # every task still runs
        outcomes = [await _outcome(engine, job) for job in jobs[1:]]   # the first's finish was lost
        engine._tasks[0].cancel()
        await asyncio.wait([engine._tasks[0]])
        with pytest.raises(RuntimeError, match="ended"):
            engine.check()
        engine.close()
        return outcomes, fails

    outcomes, fails = asyncio.run(scenario())
    assert outcomes == ["completed"] and fails == {"take": 0, "finish": 0}


def test_a_group_that_fails_leaves_its_jobs_to_the_queue(monkeypatch, tmp_path):
    """A job taken while the group looked ready, whose group then failed for good before the job
    reached the ranks, goes back to the queue (not failed with 503); and the replica takes no more."""
    from spectrum_xdit.launch.serve.rank_group import GroupUnavailable

    async def scenario(mode):
        engine = await _engine(monkeypatch, tmp_path, batching=mode)
        group, calls = engine.group, []

        async def fails_for_good():
            calls.append(1)
            group.state, group.failed_for_good = "failed", True
            raise GroupUnavailable("the rank group failed to start: boom")

        group.ready = fails_for_good
        job = _submit(engine, _request(2))
        await asyncio.sleep(0.3)
        record = engine.get(job.id)
        engine.close()
        return record.status, record.replica, engine.queue_depth(), len(calls)

    for mode in ("continuous", "sequential"):
        assert asyncio.run(scenario(mode)) == (JobStatus.QUEUED, None, 1, 1), mode


def test_a_synchronous_wait_ends_with_a_timeout_naming_request_timeout_s(monkeypatch, tmp_path):
    """A job that never finishes (its replicas gone) must not hold its request forever."""
    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, batching="continuous", request_timeout_s=0.2, lease_s=0.1)
        engine.close()                                  # nobody runs the job
        job = _submit(engine, _request(2))
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError, match=r"request_timeout_s"):
            await asyncio.wait_for(engine.result(job.id), 5)
        return asyncio.get_running_loop().time() - started

    assert 0.5 <= asyncio.run(scenario()) < 2


def test_a_slow_results_store_does_not_stall_the_step_loop(monkeypatch, tmp_path):
    """A media write that takes a second (s3://) runs in a thread: the other jobs tick on."""
    import time

    async def scenario():
        engine = await _engine(monkeypatch, tmp_path, batching="continuous", max_batch_size=2)
        put = engine.store.media.put

        def slow_put(job_id, *args):
            if job_id == quick.id:
                time.sleep(1.0)
            return put(job_id, *args)

        monkeypatch.setattr(engine.store.media, "put", slow_put)
        quick, slow = _submit(engine, _request(2)), _submit(engine, _request(10, 1))
        assert await _outcome(engine, slow) == "completed"
        status = engine.get(quick.id).status                       # its media still being written
        assert await _outcome(engine, quick) == "completed"
        engine.close()
        return status

    assert asyncio.run(scenario()) is JobStatus.IN_PROGRESS
