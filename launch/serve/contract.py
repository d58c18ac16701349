"""What crosses the Ray boundary and the job store, typed in one place: the ranks' answers to the
replica (:class:`RankInfo`, :class:`RunAnswer`, :class:`TickAnswer`), a job's error
(:class:`JobError`) and the names of a job's status and of the batching modes.

A job's error changes form once: whatever raised (a bad request on the ranks, a dead rank, a
cancel) becomes a :class:`JobError` where it is caught (``JobError.of``), travels in that form
through the ranks' answers and the job's record, and ``errors.error_response`` renders it.
Plain dataclasses: Ray pickles them, and the job record (``job_store``) is a pydantic model
that validates them from JSON.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from pydantic import BaseModel, ConfigDict

from ..request import RequestError


class JobStatus(str, enum.Enum):
    """OpenAI's video job statuses (a cancelled job's record is deleted: it has none)."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED)


class BatchingMode(str, enum.Enum):
    """How a replica runs its jobs (``settings.batching`` resolved): one at a time, or in a step
    loop that admits jobs into an empty loop only (``batched``) or at any tick (``continuous``)."""

    SEQUENTIAL = "sequential"
    BATCHED = "batched"
    CONTINUOUS = "continuous"


class JobError(BaseModel):
    """A job that did not complete: the HTTP status of its answer, the message, the request field
    at fault and how long to wait before retrying (503 of a rebuilding group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: int
    message: str
    field: Optional[str] = None
    retry_after_s: Optional[int] = None

    @classmethod
    def of(cls, error: BaseException) -> "JobError":
        """The one conversion of an exception: a bad request names its field; the replica's own
        errors (``RequestFailed``, ``GroupUnavailable``) carry theirs; anything else is a 500."""
        if isinstance(error, RequestError):
            return cls(status=error.status, message=str(error), field=error.field)
        job_error = getattr(error, "job_error", None)
        if isinstance(job_error, JobError):
            return job_error
        return cls(status=500, message=f"{type(error).__name__}: {error}")

    @property
    def headers(self) -> Optional[dict]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None


@dataclasses.dataclass(frozen=True)
class RankInfo:
    """A rank once set up: where it runs, the built model's size rules, the xfuser patches."""

    rank: int
    pid: int
    node: str
    device: str
    sizes: dict
    xfuser_patches: dict


@dataclasses.dataclass
class Output:
    """Rank 0's result of a job: the encoded media (or latents) and the generation report."""

    media: bytes
    report: dict


@dataclasses.dataclass
class RunAnswer:
    """A rank's answer to one sequential job: rank 0's output, an error, or the step it stopped
    after (cancelled or timed out); other ranks answer with none of them when it completed."""

    rank: int
    output: Optional[Output] = None
    error: Optional[JobError] = None
    stopped_after_step: Optional[int] = None


@dataclasses.dataclass
class TickAnswer:
    """A rank's answer to a run of ticks of the step loop: the steps at which dropped jobs left
    (``None``: never joined), the jobs that failed alone, rank 0's outputs of the finished jobs,
    the steps done by each job still in the loop, the block-stack rows of each tick, and the
    error that ended every job in the loop, if one did."""

    rank: int
    dropped: dict[str, Optional[int]] = dataclasses.field(default_factory=dict)
    failed: dict[str, JobError] = dataclasses.field(default_factory=dict)
    finished: dict[str, Optional[Output]] = dataclasses.field(default_factory=dict)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)
    block_rows: list[int] = dataclasses.field(default_factory=list)
    error: Optional[JobError] = None
