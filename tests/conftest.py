"""How the suite is shared and tiered.

Tiers (markers, ``pyproject.toml``): ``distributed`` tests launch several processes (gloo worlds,
torchrun), ``ray`` tests start a Ray cluster or a server on one; ``make test-fast`` runs the rest.
A test that uses one of the Ray fixtures below is a ``ray`` test by that alone.

Workers (``-n 2 --dist loadgroup``): each test file is one group, so a file's module-scoped
fixtures (a server, a cached one-process run) are set up once, on one worker. The files that
start Ray share one group, so that no two clusters compete for the machine at once. Each worker
uses one thread (torch's, and by default the processes it starts), so that two workers on two
cores do not oversubscribe them.

Ray's actors log to files (the tests start Ray with ``log_to_driver=False``), which keeps them out
of pytest's progress lines; a failing ``ray`` test shows their tails.
"""

import os
from pathlib import Path

import pytest

RAY_FILES = {"test_serve.py", "test_serve_continuous.py", "test_serve_local.py", "test_rank_group.py",
             "test_serve_queue.py", "test_i2v.py", "test_benchmark_serve_load.py", "test_autoscaling.py",
             "test_serve_nodes.py"}
RAY_FIXTURES = {"server", "i2v_server", "local_ray"}
RAY_LOGS = Path("/tmp/ray/session_latest/logs")
LOG_FILES_SHOWN, LOG_LINES_SHOWN = 6, 40


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.get_closest_marker("ray") is not None:
        report.sections.append(("Ray's logs (latest session, most recent files)", _ray_log_tails()))
    return report


def _ray_log_tails() -> str:
    if not RAY_LOGS.is_dir():
        return f"no Ray logs at {RAY_LOGS}"
    files = sorted((path for path in RAY_LOGS.rglob("*") if path.is_file() and path.suffix in (".err", ".out", ".log")),
                   key=lambda path: path.stat().st_mtime, reverse=True)[:LOG_FILES_SHOWN]
    parts = []
    for path in files:
        lines = path.read_text(errors="replace").splitlines()[-LOG_LINES_SHOWN:]
        parts.append(f"--- {path}\n" + "\n".join(lines))
    return "\n".join(parts)
