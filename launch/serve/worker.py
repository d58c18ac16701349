"""One rank of a replica's group: a Ray actor holding this rank's xDiT pipeline.

It runs with two threads (``max_concurrency=2``): one generates, the other answers ``ping`` and
``stop`` meanwhile, so that the replica can probe a busy rank and stop a request at the next step
boundary. A request that raises returns its error instead of raising, so that the replica can see
that every rank failed alike (a bad request, not a broken group).

With step batching the replica sends every rank the same ``tick`` call (which jobs join and leave
the loop) and each rank runs ticks in its :class:`~spectrum_xdit.launch.step_batching.StepBatcher`
until rank 0 ends the run (a job finished, the replica interrupted it, or time is up): one call
per run of ticks, not per tick.
"""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import os
import socket
import tempfile
import threading
import time

import numpy as np
import ray

from ...parallel import patches
from ..quiet import silence_engines
from .contract import JobError, Output, RankInfo, RunAnswer, TickAnswer
from .settings import ServeSettings


class RankWorker:
    """Joins the group's torch.distributed world at ``setup`` and runs each request it is sent."""

    def __init__(self, rank: int, settings: dict):
        self.rank = rank
        self.settings = ServeSettings.model_validate(settings)
        if not self.settings.debug:
            silence_engines()
        self.rank_pipeline = None
        self._stopping: set[str] = set()   # jobs asked to stop, perhaps before they reach this rank
        self._job = None
        self._steps = 0
        self._batcher = None
        self._interrupt = threading.Event()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous(self, same_node: bool) -> dict:
        """Rank 0: where the group meets. On one node (one Ray node id) a file store, which listens
        on no port (a TCPStore binds every interface) and gloo on loopback; across nodes a TCP
        address, this node's Ray address (loopback where the nodes are bound to it)."""
        if same_node:
            return {"file": os.path.join(tempfile.mkdtemp(prefix="spectrum-xdit-group-"), "store")}
        address = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
        return {"address": address, "port": port}

    def setup(self, rendezvous: dict) -> RankInfo:
        import torch
        import torch.distributed as dist

        from ...models import resolve_model
        from ..runner import init_rank

        settings = self.settings
        cuda = settings.device == "cuda"
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(settings.world_size),
                          # Ray shows each GPU actor only its own GPU, as device 0.
                          LOCAL_RANK="0" if cuda else str(self.rank), LOCAL_WORLD_SIZE=str(settings.world_size))
        store = None
        if "file" in rendezvous:
            store = dist.FileStore(rendezvous["file"], settings.world_size)
            os.environ.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
        else:
            os.environ.update(MASTER_ADDR=rendezvous["address"], MASTER_PORT=str(rendezvous["port"]))
            if ipaddress.ip_address(rendezvous["address"]).is_loopback:   # Ray nodes of one machine
                os.environ.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
        if not cuda:
            torch.set_num_threads(max(1, int(settings.worker_cpus)))
        self.rank_pipeline = init_rank(resolve_model(settings.model), settings.layout, store=store)
        self.rank_pipeline.pipe.set_progress_bar_config(disable=True)
        return RankInfo(rank=self.rank, pid=os.getpid(), node=ray.util.get_node_ip_address(),
                        device=str(self.rank_pipeline.device), sizes=dataclasses.asdict(self.rank_pipeline.size_rules()),
                        xfuser_patches=patches.record())

    def ping(self) -> int:
        return self.rank

    def stop(self, job: str) -> None:
        """Stop ``job`` after its current step (or its first, if it has not started here yet)."""
        self._stopping.add(job)

    def progress(self) -> dict:
        """The running job and how many of its denoising steps are done."""
        return {"job": self._job, "steps": self._steps}

    def _step_done(self) -> bool:
        """Called after every denoising step: counts it, and says whether to stop there."""
        self._steps += 1
        return self._job in self._stopping

    def generate(self, request, job: str) -> RunAnswer:
        """Run one request on this rank: rank 0 returns the output and the report; a rank that
        raises returns the error; a stopped request returns the step it stopped after."""
        self._job, self._steps = job, 0
        try:
            result = self.rank_pipeline.generate(request, decode=request.output_format != "npy",
                                                 stop=self._step_done)
        except Exception as error:  # the replica decides, from every rank's answer, what it means
            return RunAnswer(self.rank, error=JobError.of(error))
        finally:
            self._job = None
            self._stopping.discard(job)
        stopped = result.report.get("stopped_after_step")
        if stopped is not None:
            return RunAnswer(self.rank, stopped_after_step=stopped)
        return RunAnswer(self.rank, output=self._encode(request, result) if self.rank == 0 else None)

    def interrupt(self) -> None:
        """Rank 0: end the current run of ticks after this tick (a job waits to join or leave)."""
        self._interrupt.set()

    def tick(self, joins: list, drops: list, max_seconds: float) -> TickAnswer:
        """A run of ticks of the step loop: the jobs in ``drops`` leave it, each ``(job, request)``
        of ``joins`` joins it at its step 0, then every active job does one denoising step per
        tick, until a job finishes, rank 0 is interrupted or ``max_seconds`` have passed (rank 0
        decides after each tick; every rank follows, through the one collective before each tick). The answer: the jobs that failed to join,
        the steps each active job has done, the rows that ran the block stack at each tick and
        (rank 0) the finished jobs' media and reports. A tick that raises ends every job in the
        loop and returns the error."""
        from ..step_batching import StepBatcher

        if self._batcher is None:
            self._batcher = StepBatcher(self.rank_pipeline)
        batcher = self._batcher
        answer = TickAnswer(self.rank)
        for job in drops:
            answer.dropped[job] = batcher.drop(job)
        for job, request in joins:
            try:
                batcher.join(job, request)
            except Exception as error:  # this request fails alone
                answer.failed[job] = JobError.of(error)
        deadline = time.monotonic() + max_seconds
        try:
            go_on = True
            while batcher.active and batcher.agree(go_on):
                finished, block_rows = batcher.tick()
                answer.block_rows.append(block_rows)
                self._add_finished(answer, finished)
                go_on = not finished and not self._interrupt.is_set() and time.monotonic() < deadline
        except Exception as error:  # the state of every job in the loop is now unknown
            answer.error = JobError.of(error)
            batcher.active.clear()
            return answer
        finally:
            self._interrupt.clear()   # what waited is in the replica's next call
        answer.steps = {job: active.step for job, active in batcher.active.items()}
        return answer

    def _add_finished(self, answer: TickAnswer, finished: dict) -> None:
        """Rank 0 decodes and encodes each finished job; one that fails there fails alone (the
        other ranks are already past it)."""
        for job, (request, result) in finished.items():
            if self.rank != 0:
                answer.finished[job] = None
                continue
            try:
                if request.output_format != "npy":
                    result.media = self.rank_pipeline.decode(result.latents, request)
                answer.finished[job] = self._encode(request, result)
            except Exception as error:
                answer.failed[job] = JobError.of(error)

    def _encode(self, request, result) -> Output:
        from ..media import write_media

        encode_start = time.perf_counter()
        if request.output_format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, result.latents.float().cpu().numpy())
            media = buffer.getvalue()
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = write_media(os.path.join(folder, f"output.{request.output_format}"), result.media,
                                   fps=self.settings.fps)
                media = path.read_bytes()
        return Output(media=media, report=dict(result.report, encode_seconds=time.perf_counter() - encode_start))
