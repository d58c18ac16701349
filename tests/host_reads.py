"""What would make the host wait for a GPU, counted on a CPU (tests of the runner's and the step
loop's hot paths: test_host_syncs.py, test_step_batching.py).

A read of a tensor's values (``item``, ``float``, ``tolist``, ``cpu``, ``numpy``), a data-dependent
shape (``nonzero``) or an upload of host data into a new tensor makes the host wait for a CUDA
device's queue. On a CPU nothing waits, so :class:`HostReads` counts those operations by the code
that makes them."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / name) for name in ("spectrum_xdit", "launch", "parallel"))
NOT_CALLERS = (str(Path(torch.__file__).parent), str(ROOT / "tests"))
aten = torch.ops.aten
WAITING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
               aten.masked_select.default, aten.lift_fresh.default}
READS = ("item", "tolist", "cpu", "numpy")


class HostReads(TorchDispatchMode):
    """Counts the operations above, per step (``next_step`` advances it: pass it as the runner's
    ``stop``), that this project's code makes, or (``everywhere``) any code past torch's own and
    the tests': diffusers' and xDiT's too."""

    def __init__(self, everywhere: bool = False):
        super().__init__()
        self.everywhere = everywhere
        self.step = 0
        self.by_step: dict[int, list[str]] = {}
        self._originals = {}

    def next_step(self) -> bool:
        self.step += 1
        return False

    def _note(self, what: str) -> None:
        """Count ``what`` if the code that asked for it (past torch's own frames) is counted."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(NOT_CALLERS):
            frame = frame.f_back
        if frame is not None and (self.everywhere or frame.f_code.co_filename.startswith(PROJECT)):
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {what}"
            self.by_step.setdefault(self.step, []).append(where)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in WAITING_OPS:
            self._note(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in READS:   # on a CPU tensor these reach no dispatch: count them where they are called
            original = self._originals[name] = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, _name=name, **kwargs):
                self._note(_name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)
