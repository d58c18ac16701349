"""xDiT's model runner (``xfuser/runner.py`` and ``xfuser/model_executor/models/runner_models``) in
CPU processes: its CUDA-only parts get CPU stand-ins. Installed only into a runner process
(``install(runner=True)``), and only where the CPU patches are wanted (no CUDA): there each
replaced call would raise, so nothing that worked changes. Why each is needed:
docs/xfuser-0.7.0.md, "The model runner on CPU"."""

from __future__ import annotations

import time
from types import ModuleType

from .importing import Patch, is_marked, mark

# Options whose code paths exist only on CUDA or ROCm devices: FP8/FP4/FP6/INT8 GEMM kernels and
# offloading to an accelerator.
_ACCELERATOR_ONLY = ("use_fp8_gemms", "use_fp4_gemms", "use_fp6_gemms", "use_int8_gemms",
                     "enable_model_cpu_offload", "enable_sequential_cpu_offload", "enable_group_cpu_offload")


class WallClockEvent:
    """``torch.cuda.Event(enable_timing=True)`` on the host clock: ``record`` notes the time and
    ``elapsed_time`` answers in milliseconds, as CUDA's does. Work on the CPU is synchronous, so
    the time of ``record`` is the time the work before it finished."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._recorded_at = None

    def record(self, stream=None) -> None:
        self._recorded_at = time.perf_counter()

    def elapsed_time(self, end: "WallClockEvent") -> float:
        if self._recorded_at is None or end._recorded_at is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end._recorded_at - self._recorded_at) * 1000.0

    def synchronize(self) -> None:
        """Nothing is pending on a CPU."""

    def query(self) -> bool:
        return True


def patch_torch_cuda(cuda: ModuleType) -> None:
    """``xfuser/model_executor/models/runner_models/base_model.py``, ``xFuserModel.run`` and
    ``_run_timed_pipe``, and ``xfuser/runner.py``, ``xFuserModelRunner.cleanup``: they time with
    ``torch.cuda.Event`` and call ``torch.cuda.synchronize``, both of which raise without CUDA.
    ``xfuser/runner.py`` runs as ``__main__`` (its module globals are its own), so the stand-ins go
    where it looks them up: ``torch.cuda``."""
    if is_marked(cuda.synchronize):
        return
    cuda.Event = WallClockEvent
    cuda.synchronize = mark(lambda device=None: None)


def patch_placement(placement: ModuleType) -> None:
    """``xfuser/model_executor/models/runner_models/loading/placement.py``,
    ``place_pipeline_components``: it moves the pipeline to ``f"cuda:{local_rank}"``. On a CPU the
    pipeline is already where it runs: the eager fill still happens, the move does not, and the
    accelerator-only options are refused by name instead of failing inside a CUDA kernel."""
    place = placement.place_pipeline_components
    if is_marked(place):
        return

    def place_pipeline_components(loader) -> None:
        config = loader.model.config
        wanted = [f"--{name}" for name in _ACCELERATOR_ONLY if getattr(config, name, False)]
        if wanted:
            raise ValueError(f"{', '.join(wanted)}: needs a CUDA or ROCm device; this run is on CPU")
        loader.fill_eager_transformers()

    placement.place_pipeline_components = mark(place_pipeline_components)


PATCHES: dict[str, list[Patch]] = {
    "torch.cuda": [patch_torch_cuda],
    "xfuser.model_executor.models.runner_models.loading.placement": [patch_placement],
}
