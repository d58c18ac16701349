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

import types

import pytest
import torch

from host_reads import HostReads
from spectrum_xdit.control import SpectrumController, ValidationClock
from spectrum_xdit.config import SpectrumConfig
from spectrum_xdit.launch.request import ParallelLayout, model_defaults, parse_request
from spectrum_xdit.launch.runner import init_rank
from spectrum_xdit.models import resolve_model

STEPS = 12


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
