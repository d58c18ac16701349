"""Run a function on N local CPU processes joined in a gloo world, with a hard timeout.

For tests and benchmarks: :func:`run_distributed` starts ``world_size`` fresh interpreters
(multiprocessing ``spawn``), gives each the environment ``torchrun`` would (``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ...), initialises the default
process group with gloo, calls ``target(*args, **kwargs)`` and returns rank 0's return value.
If any rank raises, the others are killed and the first traceback is re-raised in the parent;
if the whole run exceeds ``timeout`` seconds, every child is killed and
:class:`DistributedTimeout` is raised. Nothing is left running either way.

``target`` must be picklable (a module-level function of an importable module) and its
return value picklable; tensors come back as copies.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional


class DistributedTimeout(TimeoutError):
    """The distributed run did not finish in time; all of its processes were killed."""


class DistributedError(RuntimeError):
    """A rank failed; the message holds its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_distributed(
    target: Callable[..., Any],
    world_size: int,
    *,
    args: tuple = (),
    kwargs: Optional[dict] = None,
    timeout: float = 120.0,
    env: Optional[dict[str, str]] = None,
    threads_per_process: Optional[int] = None,
) -> Any:
    """Run ``target`` on ``world_size`` gloo ranks; return rank 0's result.

    ``env`` adds environment variables in every child. ``threads_per_process`` sets torch's
    intra-op threads in each child (default: the CPU count divided among the ranks, at least
    one), so that N ranks do not oversubscribe the cores.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if threads_per_process is None:
        threads_per_process = max(1, (os.cpu_count() or 1) // world_size)
    port = free_port()
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    processes = []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            rank_env = {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size),
                **(env or {}),
            }
            process = context.Process(
                target=_run_rank,
                args=(target, args, kwargs or {}, rank_env, threads_per_process, timeout, messages),
                name=f"gloo-rank-{rank}",
                daemon=True,
            )
            process.start()
            processes.append(process)
        return _collect(processes, messages, deadline, timeout)
    finally:
        _stop(processes)
        messages.close()
        messages.join_thread()


def _collect(processes, messages, deadline: float, timeout: float) -> Any:
    """Wait for one message per rank; fail fast on an error, a silent death, or the deadline."""
    results: dict[int, Any] = {}
    while len(results) < len(processes):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(len(processes))) - set(results))
            raise DistributedTimeout(
                f"distributed run exceeded {timeout:.0f}s; ranks {missing} had not finished "
                "and all ranks were killed"
            )
        try:
            rank, ok, payload = messages.get(timeout=min(remaining, 0.2))
        except queue.Empty:
            for rank, process in enumerate(processes):
                if rank not in results and process.exitcode is not None:
                    _drain_errors(messages)
                    raise DistributedError(
                        f"rank {rank} exited with code {process.exitcode} without reporting"
                    )
            continue
        if not ok:
            raise DistributedError(f"rank {rank} failed:\n{payload}")
        results[rank] = payload
    return pickle.loads(results[0])


def _drain_errors(messages) -> None:
    """Raise the first error another rank managed to report before a silent death."""
    while True:
        try:
            rank, ok, payload = messages.get(timeout=0.5)
        except queue.Empty:
            return
        if not ok:
            raise DistributedError(f"rank {rank} failed:\n{payload}")


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=10)


def _run_rank(target, args, kwargs, rank_env, threads, timeout, messages) -> None:
    os.environ.update(rank_env)
    rank = int(rank_env["RANK"])
    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=int(rank_env["WORLD_SIZE"]),
            timeout=datetime.timedelta(seconds=timeout),
        )
        result = target(*args, **kwargs)
        messages.put((rank, True, pickle.dumps(result) if rank == 0 else None))
    except BaseException:
        messages.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
