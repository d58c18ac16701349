"""The host never waits for the device on the runner's hot path (issue 25).

A read of a tensor's values (``item``, ``float``, ``tolist``, ``cpu``, ``numpy``), a data-dependent
shape (``nonzero``) or an upload of host data into a new tensor makes the host wait for a CUDA
device's queue. On a CPU nothing waits, so :class:`HostReads` counts those operations where this
project's code makes them, by the denoising step they happen in: what would be a synchronisation
on a GPU. On CUDA the validation sums travel in a pinned non-blocking copy with an event
(``control.HostCopy``), so their one read per validated real step waits for that point of the
stream only; the step-boundary stop of a multi-rank job reduces a host flag over gloo
(``runner._StopAtStepBoundary``), which these one-process runs do not reach.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spectrum_xdit.control import SpectrumController, ValidationClock
from spectrum_xdit.config import SpectrumConfig
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / name) for name in ("spectrum_xdit", "launch", "parallel"))
NOT_CALLERS = (str(Path(torch.__file__).parent), __file__)
aten = torch.ops.aten
WAITING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.equal.default,
               aten.masked_select.default, aten.lift_fresh.default}
READS = ("item", "tolist", "cpu", "numpy")
STEPS = 12


class HostReads(TorchDispatchMode):
    """Counts the operations above that this project's code makes, per step (``next_step``
    advances it: pass it as the runner's ``stop``)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.by_step: dict[int, list[str]] = {}
        self._originals = {}

    def next_step(self) -> bool:
        self.step += 1
        return False

    def _note(self, what: str) -> None:
        """Count ``what`` if the code that asked for it (past torch's own frames) is this project's."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(NOT_CALLERS):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(PROJECT):
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


@pytest.fixture(scope="module")
def tiny_wan():
    rank_pipeline = init_rank(resolve_model("tiny-wan"), ParallelLayout())
    rank_pipeline.pipe.set_progress_bar_config(disable=True)
    return rank_pipeline


def _run(rank_pipeline, cache: dict) -> tuple[HostReads, dict]:
    request = parse_request({"prompt": "a red square", "num_inference_steps": STEPS, "cache": cache},
                            model_defaults(rank_pipeline.spec))
    reads = HostReads()
    with reads:
        result = rank_pipeline.generate(request, stop=reads.next_step)
    return reads, result.report


def test_no_host_read_on_any_step_of_the_paper_schedule(tiny_wan):
    """The default: forecasts and real steps, the hooks, the forecaster and the step-boundary stop
    read nothing back from the device."""
    reads, report = _run(tiny_wan, {"method": "spectrum"})
    assert len(report["real_steps"]["cond"]) < STEPS and "stopped_after_step" not in report
    assert reads.by_step == {}


def test_validation_reads_its_sums_once_per_real_step_and_never_on_a_run_of_forecasts(tiny_wan):
    """With validation (blend weight "auto") the host reads each real step's sums once: when the
    next blend weight needs them, or (real steps in a row) when the next sums are reduced, by which
    time the device is a step past them. A forecast step that follows a forecast step reads nothing."""
    reads, report = _run(tiny_wan, {"method": "spectrum", "blend_weight": "auto"})
    real = set(report["real_steps"]["cond"])
    validated = [entry["step"] for entry in report["validation"]]
    assert validated and set(validated) < real
    assert all(where.startswith("control.py") for sites in reads.by_step.values() for where in sites), reads.by_step
    assert sum(len(sites) for sites in reads.by_step.values()) == len(validated)
    after_forecast = [step for step in range(1, STEPS) if step not in real and step - 1 not in real]
    assert after_forecast and not any(step in reads.by_step for step in after_forecast)


def test_the_controller_reads_the_sums_when_a_decision_needs_them():
    """Settling a real step's sums only starts their way to the host; the blend weight reads them."""
    controller = SpectrumController(SpectrumConfig(num_inference_steps=10, blend_weight="auto"),
                                    reducer=lambda sums: sums)
    for step in range(3):
        controller.begin_step(step)
        controller.mark_real(step)
    controller.observe(2, 1, torch.tensor([1.0, 4.0, 1.0, 100.0], dtype=torch.float64))
    controller.begin_step(3)
    assert controller._unread is not None and controller._log == []
    assert controller.weight == pytest.approx(0.0)     # the linear predictor erred least: all weight on it
    assert controller._unread is None and [entry["step"] for entry in controller.log] == [2]


def test_validation_is_timed_by_cuda_events_on_a_gpu(monkeypatch):
    """On CUDA the clock records an event pair around the work and reads their elapsed time at the
    end; on a CPU it adds wall-clock seconds."""
    recorded = []

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.at = None

        def record(self):
            self.at = len(recorded)
            recorded.append(self)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 1000.0 * (end.at - self.at)   # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", Event)
    clock = ValidationClock()
    for _ in range(2):
        with clock.timing(torch.device("cuda")):
            recorded.append(None)   # the work, launched between the events
    assert clock.seconds == pytest.approx(4.0) and len(recorded) == 6
    with clock.timing(torch.device("cpu")):
        pass
    assert 4.0 <= clock.seconds < 5.0


def test_the_step_boundary_stop_of_one_process_makes_no_tensor():
    from spectrum_xdit.launch.runner import _StopAtStepBoundary

    boundary = _StopAtStepBoundary(iter([False, True]).__next__, world_size=1)
    pipe = types.SimpleNamespace(_interrupt=False)
    with HostReads() as reads:
        boundary(pipe, 0, None, {})
        boundary(pipe, 1, None, {})
    assert boundary.stopped_after == 1 and pipe._interrupt and reads.by_step == {}
