"""One rank of a replica's group: a Ray actor holding this rank's xDiT pipeline."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import time

import numpy as np
import ray

from ...parallel import patches
from .settings import ServeSettings


class RankWorker:
    """Joins the group's torch.distributed world at ``setup`` and runs each request it is sent."""

    def __init__(self, rank: int, settings: dict):
        self.rank = rank
        self.settings = ServeSettings.model_validate(settings)
        self.rank_pipeline = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: the address and a free port for the group's TCP rendezvous."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, rendezvous: tuple[str, int]) -> dict:
        import torch

        from ...models import resolve_model
        from ..runner import init_rank

        settings = self.settings
        cuda = settings.device == "cuda"
        address, port = rendezvous
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(settings.world_size),
                          # Ray shows each GPU actor only its own GPU, as device 0.
                          LOCAL_RANK="0" if cuda else str(self.rank),
                          LOCAL_WORLD_SIZE=str(settings.world_size))
        if not cuda:
            torch.set_num_threads(max(1, int(settings.worker_cpus)))
        self.rank_pipeline = init_rank(resolve_model(settings.model), settings.layout)
        self.rank_pipeline.pipe.set_progress_bar_config(disable=True)
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "device": self.rank_pipeline.device, "geometry": self.rank_pipeline.geometry(),
                "xfuser_patches": patches.record()}

    def generate(self, request) -> dict:
        """Run one request on this rank; rank 0 returns the output and the report."""
        from ..media import write_media

        output_format = request.output_format
        result = self.rank_pipeline.generate(request, decode=output_format != "npy")
        if self.rank != 0:
            return {"rank": self.rank}
        encode_start = time.perf_counter()
        if output_format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, result.latents.float().cpu().numpy())
            media = buffer.getvalue()
        else:
            with tempfile.TemporaryDirectory() as folder:
                path = write_media(os.path.join(folder, f"output.{output_format}"), result.media,
                                   fps=self.settings.fps)
                media = path.read_bytes()
        report = dict(result.report, encode_seconds=time.perf_counter() - encode_start)
        return {"rank": 0, "media": media, "report": report}
