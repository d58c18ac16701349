"""The shared job store of every replica: the queue of waiting jobs, each job's record, the
leases of running jobs, on Huey's storage layer (``huey.storage``: SQLite, Redis or memory behind
one API), and the media in a :class:`~.media_store.MediaStore`.

Huey serves as a storage and queue library only, not with its consumer: a replica pulls a job
(``take``) when its step loop has a free slot, which no task queue's push-to-worker consumer can
know. One key-value entry per job holds its record (JSON); a delete leaves a cancel mark that the
running replica sees at its next tick; a running job's replica renews its lease, and any replica
that finds a lease expired (its replica died) claims the job atomically (``put_if_empty``) and
puts it back in the queue: delivery is at least once, and a re-run gives the same output since
seeds are deterministic.

Its calls are synchronous: the records and the queue (SQLite on local disk, Redis on the cluster's
network) answer in about a millisecond, well within a tick of the step loop. The media store may
be slow (s3://), and the reaper's calls scan every record: the engine makes those in a thread.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Iterable, Optional

import redis
from huey.constants import EmptyData
from huey.storage import MemoryStorage, RedisStorage, SqliteStorage
from pydantic import BaseModel, ConfigDict, ValidationError

from ..request import GenerationRequest
from .contract import JobError, JobStatus
from .media_store import MediaStore
from .settings import parse_broker_url

logger = logging.getLogger("ray.serve")
RECORD, CANCEL, CLAIM = "job:", "cancel:", "claim:"
REDIS_TIMEOUT_S = 10.0
_MEMORY: dict[str, MemoryStorage] = {}   # memory:// stores by name: one per process, as Huey's


class QueueFull(RuntimeError):
    """The shared queue holds ``max_queue_size`` jobs: answer 429."""


class JobRecord(BaseModel):
    """A job as every replica reads it. ``kept``: a job of ``/v1/videos``, readable until its TTL
    (the synchronous endpoints' jobs are deleted once their answer is read); ``deliveries``: how
    many times a replica took it (more than 1: re-run after its replica died)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: JobStatus = JobStatus.QUEUED
    request: GenerationRequest
    kept: bool = False
    created_at: float
    queued_at: Optional[float] = None    # when it last went into the queue (None: at created_at)
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    steps_done: int = 0
    replica: Optional[str] = None
    deliveries: int = 0
    lease_until: Optional[float] = None
    error: Optional[JobError] = None
    media: Optional[str] = None          # where the results store holds the output
    media_bytes: int = 0
    report: Optional[dict] = None
    remixed_from: Optional[str] = None

    @classmethod
    def new(cls, request: GenerationRequest, kept: bool = False, remixed_from: Optional[str] = None) -> "JobRecord":
        now = time.time()
        return cls(id=secrets.token_urlsafe(16), request=request, kept=kept, created_at=now, queued_at=now,
                   remixed_from=remixed_from)

    @property
    def queue_seconds(self) -> Optional[float]:
        return None if self.started_at is None else self.started_at - self.created_at


class _SqliteStorage(SqliteStorage):
    """Huey's SQLite storage (write-ahead log) with ``synchronous=NORMAL``: a commit no longer
    waits for the disk (an fsync each, about 3 ms here, ten per job), and the file stays whole
    when a process or the whole server dies; only a power loss can drop the last commits.
    Huey's own ``fsync`` choice is FULL or OFF."""

    def _create_connection(self):
        connection = super()._create_connection()
        connection.execute("pragma synchronous=NORMAL")
        return connection


def open_storage(broker_url: str, name: str):
    """Huey's storage of ``broker_url`` (``sqlite:///PATH``, ``redis://...``, ``memory://``)."""
    scheme, location = parse_broker_url(broker_url)
    if scheme == "sqlite":
        return _SqliteStorage(name, filename=location)
    if scheme == "memory":
        return _MEMORY.setdefault(name, MemoryStorage(name))
    # not blocking: a replica polls between ticks and never waits in BRPOP; a socket timeout (the
    # URL's own socket_timeout wins), so that a Redis that stops answering raises, not hangs
    pool = redis.ConnectionPool.from_url(broker_url, socket_timeout=REDIS_TIMEOUT_S,
                                         socket_connect_timeout=REDIS_TIMEOUT_S)
    return RedisStorage(name, connection_pool=pool, blocking=False)


class JobStore:
    """Records, queue, leases and media of one model's jobs (``name``: its queue and keys)."""

    def __init__(self, broker_url: str, results_url: str, name: str, max_queue_size: int, lease_s: float):
        self.storage = open_storage(broker_url, re.sub(r"[^A-Za-z0-9_]", "_", name))
        self.media = MediaStore(results_url)
        self.max_queue_size = max_queue_size
        self.lease_s = lease_s

    # -- records --------------------------------------------------------------------------------

    @staticmethod
    def _parse(key: str, data) -> Optional[JobRecord]:
        """The record stored at ``key``, or ``None`` (logged) if it does not parse: a store file
        outlives upgrades, and one such record must not stop the queue nor every listing."""
        try:
            return JobRecord.model_validate_json(bytes(data))
        except ValidationError as error:
            logger.error("spectrum-xdit: skipping the job store's record %s, which does not parse: %s", key, error)
            return None

    def get(self, job_id: str) -> Optional[JobRecord]:
        data = self.storage.peek_data(RECORD + job_id)
        return None if data is EmptyData else self._parse(RECORD + job_id, data)

    def records(self) -> list[JobRecord]:
        """Every record that parses, oldest first."""
        records = [self._parse(key, value) for key, value in self.storage.result_items().items()
                   if key.startswith(RECORD)]
        return sorted((record for record in records if record is not None), key=lambda record: record.created_at)

    def write(self, record: JobRecord) -> bool:
        """Store the record of a job this replica runs, unless it was deleted meanwhile: a delete
        marks the job before it removes the record, so a record written before the mark is removed
        by the delete and one written after it is removed here. Whether it is still wanted."""
        self.storage.put_data(RECORD + record.id, record.model_dump_json().encode())
        if self.storage.has_data_for_key(CANCEL + record.id):
            self.storage.delete_data(RECORD + record.id)
            return False
        return True

    def delete(self, job_id: str) -> Optional[JobRecord]:
        """Forget a job (its record and media); a queued one is skipped by the queue, a running one
        stops at its replica's next tick (``cancelled``). The record it had, if any."""
        self.storage.put_data(CANCEL + job_id, json.dumps(time.time()).encode())
        data = self.storage.pop_data(RECORD + job_id)
        if data is EmptyData:
            self.storage.delete_data(CANCEL + job_id)
            return None
        record = self._parse(RECORD + job_id, data)
        if record is None:
            self.storage.delete_data(CANCEL + job_id)
            return None
        if record.media is not None:
            self.media.delete(record.media)
        if record.status.finished:   # nobody runs it to see the mark; a queued job's mark stays for a
            self.storage.delete_data(CANCEL + job_id)   # take between its read and write (evict drops it)
        return record

    def cancelled(self, job_id: str) -> bool:
        return self.storage.has_data_for_key(CANCEL + job_id)

    def forget_cancel(self, job_id: str) -> None:
        """The running replica has stopped the deleted job."""
        self.storage.delete_data(CANCEL + job_id)

    # -- the queue ------------------------------------------------------------------------------

    def submit(self, records: Iterable[JobRecord]) -> None:
        """Queue ``records`` together, or none (:class:`QueueFull`) if they would pass
        ``max_queue_size`` (checked, then written: replicas racing may pass it by a few)."""
        records = list(records)
        depth = self.queue_depth()
        if depth + len(records) > self.max_queue_size:
            raise QueueFull(f"{depth} jobs are waiting, the server's max_queue_size is {self.max_queue_size}")
        for record in records:
            self.storage.put_data(RECORD + record.id, record.model_dump_json().encode())
            self.storage.enqueue(record.id.encode())

    def queue_depth(self) -> int:
        """Jobs waiting in the shared queue (deleted ones count until a replica skips them)."""
        return self.storage.queue_size()

    def take(self, replica: str) -> Optional[JobRecord]:
        """The next queued job, now ``in_progress`` on ``replica`` under a lease; ``None`` if the
        queue is empty. Deleted jobs and ones another replica already runs are skipped."""
        while (job_id := self.storage.dequeue()) is not None:
            job_id = bytes(job_id).decode()
            record = self.get(job_id)
            if record is None or record.status is not JobStatus.QUEUED:
                continue   # a cancel mark stays for the replica that may run it; evict drops it later
            now = time.time()
            record = record.model_copy(update={
                "status": JobStatus.IN_PROGRESS, "replica": replica, "deliveries": record.deliveries + 1,
                "started_at": record.started_at or now, "lease_until": now + self.lease_s})
            if self.write(record):
                return record
            self.forget_cancel(job_id)
        return None

    # -- leases ---------------------------------------------------------------------------------

    def holds(self, record: JobRecord) -> bool:
        """Whether the replica that took ``record`` still holds its lease: a replica stalled past
        ``lease_s`` may find its job re-queued (or run elsewhere), and must then write nothing."""
        current = self.get(record.id)
        return current is not None and current.status is JobStatus.IN_PROGRESS and \
            (current.replica, current.deliveries) == (record.replica, record.deliveries)

    def renew(self, record: JobRecord, **changes) -> Optional[JobRecord]:
        """``record`` with ``changes`` and a fresh lease, written; ``None`` if it was deleted or
        its lease was lost (the replica stops it)."""
        if not self.holds(record):
            return None
        record = record.model_copy(update=dict(changes, lease_until=time.time() + self.lease_s))
        return record if self.write(record) else None

    def release(self, record: JobRecord) -> bool:
        """Put a job this replica took back in the queue, unrun (its rank group became
        unavailable before the job reached it); whether it went back."""
        if not self.holds(record):
            return False
        queued = record.model_copy(update={"status": JobStatus.QUEUED, "replica": None, "lease_until": None,
                                           "steps_done": 0, "queued_at": time.time()})
        if not self.write(queued):
            return False
        self.storage.enqueue(record.id.encode())
        return True

    def requeue_expired(self, replica: str, running: Iterable[str] = ()) -> list[str]:
        """Put back in the queue every running job whose lease expired, and every queued job
        missing from the queue for ``lease_s`` (a replica died, or its store failed, between
        writing a record and queueing its id, or between taking the id and writing the record):
        each is claimed by one replica (``put_if_empty`` of its delivery's or its queueing's
        claim), so it is queued once. A duplicate id in the queue is harmless: a take skips an id
        whose job is not queued. ``running``: the caller's own live jobs, whose leases it renews
        (late, if its event loop stalled), never re-queued by itself. Their ids."""
        now, requeued, running = time.time(), [], set(running)
        in_queue = {bytes(item).decode() for item in self.storage.enqueued_items()}   # before the records
        for record in self.records():
            if record.status is JobStatus.IN_PROGRESS:
                if record.lease_until is None or record.lease_until > now or record.id in running:
                    continue
                claim = f"{CLAIM}{record.id}:{record.deliveries}"
            elif record.status is JobStatus.QUEUED:
                queued_at = record.queued_at or record.created_at
                if record.id in in_queue or now - queued_at <= self.lease_s:
                    continue
                claim = f"{CLAIM}{record.id}:queued:{queued_at!r}"
            else:
                continue
            if not self.storage.put_if_empty(claim, replica.encode()):
                continue
            if self.get(record.id) != record:   # renewed, taken or deleted since the scan
                continue
            queued = record.model_copy(update={"status": JobStatus.QUEUED, "replica": None, "lease_until": None,
                                               "steps_done": 0, "queued_at": time.time()})
            if self.write(queued):
                self.storage.enqueue(record.id.encode())
                requeued.append(record.id)
        return requeued

    # -- results --------------------------------------------------------------------------------

    def finish(self, record: JobRecord, media: Optional[bytes] = None, report: Optional[dict] = None,
               error: Optional[JobError] = None) -> Optional[JobRecord]:
        """Record how ``record`` ended: its media in the results store and its report, or its
        error. ``None`` if it was deleted meanwhile (its media are not kept) or its lease was lost
        (nothing is written: the replica now running it, or the queue, owns the record)."""
        if not self.holds(record):
            if self.get(record.id) is None:
                self.forget_cancel(record.id)
            return None
        changes = {"completed_at": time.time(), "lease_until": None}
        if error is None:
            location = self.media.put(record.id, record.request.output_format, media)
            changes.update(status=JobStatus.COMPLETED, media=location, media_bytes=len(media), report=report,
                           steps_done=record.request.num_inference_steps)
        else:
            changes.update(status=JobStatus.FAILED, error=error)
        finished = record.model_copy(update=changes)
        if self.write(finished):
            return finished
        self.forget_cancel(record.id)
        if finished.media is not None:
            self.media.delete(finished.media)
        return None

    def close(self) -> None:
        """Close the broker's connection (the replica goes)."""
        self.storage.close()

    def output(self, record: JobRecord) -> bytes:
        return self.media.get(record.media)

    def evict(self, ttl_s: float, max_bytes: int) -> int:
        """Forget finished jobs older than ``ttl_s``, then the oldest while their media pass
        ``max_bytes``; drop the claims and cancel marks of jobs no longer here. How many went."""
        now, records = time.time(), self.records()
        finished = sorted((r for r in records if r.status.finished), key=lambda r: r.completed_at)
        total, gone = sum(r.media_bytes for r in finished), set()
        for record in finished:
            if now - record.completed_at > ttl_s or total > max_bytes:
                total -= record.media_bytes
                self.delete(record.id)
                gone.add(record.id)
        live = {r.id for r in records} - gone
        for key, value in self.storage.result_items().items():
            # a cancel mark stays while the replica that runs the job may not have seen it yet
            stale = key.startswith(CLAIM) or (key.startswith(CANCEL) and now - json.loads(bytes(value)) > 2 * self.lease_s)
            if stale and key.split(":")[1] not in live:
                self.storage.delete_data(key)
        return len(gone)
