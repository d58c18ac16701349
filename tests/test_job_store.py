"""The shared job store (`launch/serve/job_store.py`) on each broker, no Ray: records, queue order,
the bound, leases and re-delivery, cancel marks, TTL and byte eviction. The Redis cases run
against a real ``redis-server`` on a free loopback port (skipped, with the install hint, where
there is none)."""

import shutil
import subprocess
import time

import pytest

from spectrum_xdit.launch.request import model_defaults, parse_request
from spectrum_xdit.launch.serve.contract import JobError, JobStatus
from spectrum_xdit.launch.serve.job_store import JobRecord, JobStore, QueueFull
from spectrum_xdit.models import resolve_model
from spectrum_xdit.parallel.testing import free_port

pytestmark = pytest.mark.timeout(60)
SPEC = resolve_model("tiny-wan")
LEASE_S = 0.3


def _request(seed: int = 0):
    return parse_request({"prompt": "x", "seed": seed, "output_format": "npy"}, model_defaults(SPEC))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server of this test module's own, on a free port of 127.0.0.1."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and server.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(params=["sqlite", "redis", "memory"])
def make_store(request, tmp_path):
    """A function making stores of one broker that share their queue and records, as the replicas
    of one server do (two SQLite connections to one file, two Redis clients, or one process's
    memory)."""
    if request.param == "sqlite":
        broker = f"sqlite:///{tmp_path}/jobs.db"
    elif request.param == "redis":
        broker = request.getfixturevalue("redis_url")
    else:
        broker = "memory://"
    name = f"test-{request.node.name}"   # a queue of this test's own (Redis and memory outlive it)

    def make(max_queue_size: int = 8, lease_s: float = LEASE_S) -> JobStore:
        return JobStore(broker, str(tmp_path / "results"), name, max_queue_size, lease_s)

    yield make
    store = make()
    store.storage.flush_all()


def test_jobs_are_taken_in_order_once_and_any_store_reads_them(make_store):
    a, b = make_store(), make_store()
    records = [JobRecord.new(_request(seed), kept=True) for seed in range(3)]
    a.submit(records[:2])
    b.submit(records[2:])
    assert a.queue_depth() == b.queue_depth() == 3
    taken = [b.take("replica-b"), a.take("replica-a"), b.take("replica-b"), a.take("replica-a")]
    assert [t.id for t in taken[:3]] == [r.id for r in records] and taken[3] is None
    seen = a.get(records[0].id)
    assert seen.status is JobStatus.IN_PROGRESS and seen.replica == "replica-b" and seen.deliveries == 1
    assert seen.request == records[0].request
    assert [r.id for r in b.records()] == [r.id for r in records]


def test_the_queue_is_bounded_and_a_batch_goes_in_whole_or_not_at_all(make_store):
    store = make_store(max_queue_size=3)
    store.submit([JobRecord.new(_request(seed)) for seed in range(2)])
    with pytest.raises(QueueFull, match="2 jobs are waiting"):
        store.submit([JobRecord.new(_request(seed)) for seed in range(2)])
    assert store.queue_depth() == 2 and len(store.records()) == 2
    store.submit([JobRecord.new(_request(9))])
    assert store.queue_depth() == 3


def test_an_expired_lease_requeues_the_job_once_and_the_rerun_is_counted(make_store):
    a, b, c = make_store(), make_store(), make_store()
    record = JobRecord.new(_request(), kept=True)
    a.submit([record])
    taken = a.take("dead-replica")
    assert b.requeue_expired("replica-b") == []                    # the lease holds
    time.sleep(LEASE_S + 0.05)
    assert sorted([*b.requeue_expired("replica-b"), *c.requeue_expired("replica-c")]) == [record.id]  # one claim
    assert b.queue_depth() == 1 and b.get(record.id).status is JobStatus.QUEUED
    again = c.take("replica-c")
    assert again.id == record.id and again.deliveries == 2 and again.started_at == taken.started_at
    finished = c.finish(again, media=b"latents", report={"nfe": {}})
    assert finished.status is JobStatus.COMPLETED and a.output(a.get(record.id)) == b"latents"


def test_a_renewed_lease_keeps_the_job_and_records_progress(make_store):
    a, b = make_store(), make_store()
    a.submit([JobRecord.new(_request())])
    record = a.take("replica-a")
    for steps in range(1, 5):
        time.sleep(LEASE_S / 3)
        record = a.renew(record, steps_done=steps)
    assert b.requeue_expired("replica-b") == [] and b.get(record.id).steps_done == 4


def test_delete_forgets_queued_running_and_finished_jobs(make_store):
    a, b = make_store(), make_store()
    queued, running, finished = (JobRecord.new(_request(seed), kept=True) for seed in range(3))
    a.submit([running, finished])
    running, finished = a.take("replica-a"), a.take("replica-a")
    done = a.finish(finished, media=b"video", report={})
    a.submit([queued])
    assert b.delete(queued.id).status is JobStatus.QUEUED
    assert b.take("replica-b") is None and b.queue_depth() == 0       # the queue skipped it
    assert b.delete(running.id).status is JobStatus.IN_PROGRESS
    assert a.renew(running, steps_done=3) is None and a.get(running.id) is None   # its replica sees the mark
    assert a.finish(running, media=b"late", report={}) is None          # nor does its result come back
    assert b.delete(finished.id).status is JobStatus.COMPLETED
    with pytest.raises(FileNotFoundError):
        a.output(done)
    assert [a.get(r.id) for r in (queued, running, finished)] == [None] * 3 and b.delete(queued.id) is None


def test_finished_jobs_expire_after_their_ttl_then_the_oldest_past_the_byte_bound(make_store):
    store = make_store()
    records = [JobRecord.new(_request(seed), kept=True) for seed in range(4)]
    store.submit(records)
    for size in (100, 100, 100):
        store.finish(store.take("replica-a"), media=b"x" * size, report={})
        time.sleep(0.02)
    running = store.take("replica-a")
    assert store.evict(ttl_s=60, max_bytes=250) == 1            # 300 bytes: the oldest goes
    assert [r.id for r in store.records()] == [r.id for r in records[1:]]
    time.sleep(0.1)
    assert store.evict(ttl_s=0.05, max_bytes=1 << 20) == 2      # both finished ones are past their TTL
    assert [r.id for r in store.records()] == [running.id]      # a running job never expires


def test_a_failed_job_keeps_its_error(make_store):
    store = make_store()
    store.submit([JobRecord.new(_request())])
    record = store.take("replica-a")
    error = JobError(status=422, message="height: must be a multiple of 16", field="height")
    assert store.finish(record, error=error).error == error
    assert store.get(record.id).error == error and store.get(record.id).status is JobStatus.FAILED


def test_the_sqlite_store_outlives_its_process(tmp_path):
    """A whole server's restart: what one process queued and finished, a new one reads and runs."""
    import sys

    script = f"""
from spectrum_xdit.launch.request import model_defaults, parse_request
from spectrum_xdit.launch.serve.job_store import JobRecord, JobStore
from spectrum_xdit.models import resolve_model
request = parse_request({{"prompt": "x", "output_format": "npy"}}, model_defaults(resolve_model("tiny-wan")))
store = JobStore("sqlite:///{tmp_path}/jobs.db", "{tmp_path}/results", "tiny-wan", 8, 30)
done, queued = JobRecord.new(request, kept=True), JobRecord.new(request, kept=True)
store.submit([done, queued])
store.finish(store.take("before"), media=b"kept", report={{}})
print(done.id, queued.id)
"""
    done, queued = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                  timeout=60).stdout.split()
    store = JobStore(f"sqlite:///{tmp_path}/jobs.db", f"{tmp_path}/results", "tiny-wan", 8, 30)
    assert store.output(store.get(done)) == b"kept"
    assert store.take("after").id == queued


def test_the_store_settings_resolve_where_the_app_is_built(tmp_path, monkeypatch):
    from spectrum_xdit.launch.serve.settings import ServeSettings

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    default = ServeSettings.from_flat({"model": "tiny-wan"}).with_job_store()
    assert default.broker_url == f"sqlite:///{tmp_path}/spectrum-xdit/jobs.db"
    assert default.results_url == f"{tmp_path}/spectrum-xdit/results"
    monkeypatch.chdir(tmp_path)
    relative = ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "sqlite:///jobs.db",
                                        "results_url": "media"}).with_job_store()
    assert (relative.broker_url, relative.results_url) == (f"sqlite:///{tmp_path}/jobs.db", f"{tmp_path}/media")
    memory = ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "memory://"}).with_job_store()
    assert memory.results_url.startswith("memory://")
    with pytest.raises(ValueError, match="broker_url: memory:// keeps each replica's jobs to itself"):
        ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "memory://", "num_replicas": 2}).with_job_store()
    with pytest.raises(ValueError, match="broker_url: must start with one of sqlite://"):
        ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "amqp://host"})
    with pytest.raises(ValueError, match="broker_url: a SQLite file is sqlite:///PATH"):
        ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "sqlite://jobs.db"})
    with pytest.raises(ValueError, match="lease_s"):
        ServeSettings.from_flat({"model": "tiny-wan", "lease_s": 0})


def test_a_record_that_does_not_parse_is_skipped_not_raised(make_store):
    """A store file outlives upgrades: a record of another version must not stop the queue."""
    store = make_store()
    store.storage.put_data("job:old", b'{"id": "old", "field_of_another_version": 1}')
    store.storage.enqueue(b"old")
    record = JobRecord.new(_request())
    store.submit([record])
    assert store.take("replica-a").id == record.id
    assert [r.id for r in store.records()] == [record.id] and store.get("old") is None


def test_a_delete_between_a_takes_read_and_write_is_not_undone(make_store):
    """DELETE of a queued job while another replica takes it: the take must not write the job back."""
    a, b = make_store(), make_store()
    record = JobRecord.new(_request(), kept=True)
    a.submit([record])
    read = a.get

    def read_then_deleted(job_id):
        found = read(job_id)
        assert b.delete(job_id).status is JobStatus.QUEUED
        return found

    a.get = read_then_deleted
    assert a.take("replica-a") is None
    assert b.get(record.id) is None and not b.cancelled(record.id)   # gone, and the take cleared the mark


def test_a_queued_job_missing_from_the_queue_is_queued_again_once(make_store):
    """A replica that died (or whose store failed) between taking a job's id from the queue and
    writing its record leaves a queued record with no queue entry: the reaper queues it again."""
    a, b, c = make_store(), make_store(), make_store()
    record = JobRecord.new(_request(), kept=True)
    a.submit([record])
    assert bytes(a.storage.dequeue()).decode() == record.id        # the take that died here
    assert b.requeue_expired("replica-b") == []                    # not yet: a take may be writing it
    time.sleep(LEASE_S + 0.05)
    assert sorted([*b.requeue_expired("replica-b"), *c.requeue_expired("replica-c")]) == [record.id]  # one claim
    assert b.requeue_expired("replica-b") == [] and b.queue_depth() == 1
    assert c.take("replica-c").id == record.id
    a.storage.enqueue(record.id.encode())                          # a duplicate entry is skipped
    assert a.take("replica-a") is None and a.get(record.id).replica == "replica-c"


def test_a_replica_late_past_its_lease_writes_nothing_and_a_delete_survives(make_store):
    """A replica whose event loop stalled past ``lease_s``: its job was re-queued and taken by
    another; its late renew and finish write nothing, and a duplicate queue entry's skip keeps the
    cancel mark of a DELETE that the running replica has yet to see."""
    late, reaper, other = make_store(), make_store(), make_store()
    record = JobRecord.new(_request(), kept=True)
    late.submit([record])
    taken = late.take("replica-late")
    time.sleep(LEASE_S + 0.05)
    assert late.requeue_expired("replica-late", running=[record.id]) == []   # never its own live job
    assert reaper.requeue_expired("replica-b") == [record.id]
    assert late.renew(taken, steps_done=3) is None and reaper.get(record.id).status is JobStatus.QUEUED
    assert late.finish(taken, media=b"late", report={}) is None and reaper.get(record.id).status is JobStatus.QUEUED
    running = other.take("replica-c")
    assert running.deliveries == 2 and late.finish(taken, error=JobError.of(RuntimeError("x"))) is None
    assert other.get(record.id).status is JobStatus.IN_PROGRESS and other.get(record.id).replica == "replica-c"
    reaper.delete(record.id)
    late.storage.enqueue(record.id.encode())
    assert late.take("replica-late") is None and other.cancelled(record.id)
    assert other.renew(running, steps_done=1) is None


def test_a_sqlite_broker_on_several_machines_is_warned_of(monkeypatch, capsys):
    """Each machine would open its own file: warn. Two Ray nodes of one machine share it: quiet."""
    import ray

    from spectrum_xdit.launch.serve import app
    from spectrum_xdit.launch.serve.settings import ServeSettings

    settings = ServeSettings.from_flat({"model": "tiny-wan", "broker_url": "sqlite:////tmp/jobs.db"})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    for addresses, warned in ((["127.0.0.1", "127.0.0.1"], False), (["10.0.0.1", "10.0.0.2"], True)):
        monkeypatch.setattr(ray, "nodes", lambda: [{"NodeManagerAddress": a, "Alive": True} for a in addresses])
        app.warn_of_split_queue(settings)
        err = capsys.readouterr().err
        assert ("broker_url sqlite:////tmp/jobs.db" in err and "redis://" in err) is warned


def test_a_redis_broker_has_a_socket_timeout(redis_url):
    """A Redis that stops answering raises (and the loop goes on) instead of hanging a replica."""
    store = JobStore(redis_url, "memory://results", "test-timeout", 8, LEASE_S)
    assert store.storage.conn.connection_pool.connection_kwargs["socket_timeout"] == 10.0
    url = JobStore(redis_url + "?socket_timeout=2", "memory://results", "test-timeout", 8, LEASE_S)
    assert url.storage.conn.connection_pool.connection_kwargs["socket_timeout"] == 2.0
