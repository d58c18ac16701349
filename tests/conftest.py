"""How pytest-xdist shares the suite between its workers (``-n 2 --dist loadgroup``, pyproject).

Each test file is one group, so a file's module-scoped fixtures (a server, a cached one-process
run) are set up once, on one worker. The files that start Ray (a local cluster each, with its own
head and workers) share one group, so that no two clusters compete for the machine at once. Each
worker uses one thread (torch's, and by default the processes it starts), so that two workers on
two cores do not oversubscribe them.
"""

import os

import pytest

RAY_FILES = {"test_serve.py", "test_serve_continuous.py", "test_serve_local.py", "test_rank_group.py",
             "test_i2v.py", "test_benchmark_serve_load.py"}


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
