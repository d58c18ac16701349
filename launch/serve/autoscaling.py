"""Ray Serve autoscaling on the jobs a deployment holds, not on its HTTP requests.

Serve's default policy counts a replica's ongoing requests, and a ``POST /v1/videos`` job is one
only while it is being created: an asynchronous job that waits in a queue, or runs on the ranks,
is invisible to it, so one replica could hold 64 queued jobs and Serve would see none. Here each
replica reports its jobs (``SpectrumServer.record_autoscaling_stats``: ``queued`` and
``running``), Serve averages each over ``look_back_period_s``, and :class:`QueueDepthPolicy` asks
for enough replicas that each has ``target_queue_depth`` jobs. Serve applies the
``upscale_delay_s`` and ``downscale_delay_s`` of the deployment's ``autoscaling_config`` to what
it asks, and the bounds ``min_replicas`` .. ``max_replicas``.

Serve pickles this module by value into its controller: it imports nothing of the project.
"""

from __future__ import annotations

import math

# The names of the replica's autoscaling stats (``record_autoscaling_stats``).
QUEUED, RUNNING = "queued", "running"


class QueueDepthPolicy:
    """``ceil((queued + running) / target_queue_depth)`` replicas, within the deployment's bounds.

    Every replica reports the depth of the one queue they all pull from, so it counts once (the
    largest report: each is an average over its own look-back); running jobs add up. Until every
    running replica has reported, the policy keeps the replicas it has (a replica that just
    started has not)."""

    def __init__(self, target_queue_depth: float):
        if target_queue_depth <= 0:
            raise ValueError(f"target_queue_depth: must be > 0, got {target_queue_depth}")
        self.target_queue_depth = target_queue_depth

    def jobs(self, ctx) -> float | None:
        """The jobs queued and running in the deployment, or ``None`` if a replica has not reported."""
        metrics = ctx.aggregated_metrics or {}
        queued, running = metrics.get(QUEUED, {}), metrics.get(RUNNING, {})
        if any(replica not in queued or replica not in running for replica in ctx.running_replicas):
            return None
        return max(queued.values(), default=0.0) + sum(running.values())

    def __call__(self, ctx) -> tuple[int, dict]:
        jobs = self.jobs(ctx)
        if jobs is None:
            return ctx.target_num_replicas, {}
        wanted = math.ceil(jobs / self.target_queue_depth)
        return min(max(wanted, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas), {}
