"""This project's Prometheus metrics of a replica, exported through Ray's metrics agent beside
the ones Ray Serve exports itself (``ray_serve_num_http_requests``,
``ray_serve_http_request_latency_ms``, ``ray_serve_deployment_queued_queries``, ...)."""

from __future__ import annotations

import time
from typing import Optional

SECONDS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 900]


class ServeMetrics:
    """Jobs by outcome, their queue and total seconds, the block-stack batch size of each run
    and the block-stack evaluations Spectrum saved, and the queue depth."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.jobs = Counter("spectrum_xdit_jobs", "jobs finished, by status", tag_keys=("status",))
        self.queue = Histogram("spectrum_xdit_queue_seconds", "seconds a job waited for the rank group",
                               boundaries=SECONDS)
        self.latency = Histogram("spectrum_xdit_job_seconds", "seconds from a job's arrival to its end",
                                 boundaries=SECONDS)
        self.batch = Histogram("spectrum_xdit_batch_size", "rows (requests x guidance branches) in one "
                               "block-stack call of the step loop; 1 per job when sequential",
                               boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.nfe_saved = Counter("spectrum_xdit_nfe_saved",
                                 "block-stack evaluations skipped by Spectrum, summed over guidance branches")
        self.depth = Gauge("spectrum_xdit_queue_depth", "jobs waiting in the shared queue")

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def block_batch(self, rows: int) -> None:
        self.batch.observe(rows)

    def finished(self, record, output=None, status: Optional[str] = None) -> None:
        """``record``: the job's record as it ended; ``output``: its media and report, if any;
        ``status``: how it ended where its record has no word for it (``cancelled``: deleted)."""
        self.jobs.inc(tags={"status": status or record.status.value})
        if record.queue_seconds is not None:
            self.queue.observe(record.queue_seconds)
        self.latency.observe(time.time() - record.created_at)
        if output is not None:
            report = output.report
            saved = sum(report["num_inference_steps"] - nfe for nfe in report["nfe"].values())
            if saved:
                self.nfe_saved.inc(saved)
