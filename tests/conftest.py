"""How pytest-xdist shares the suite between its workers (``-n 2 --dist loadgroup``, pyproject).

Each test file is one group, so a file's module-scoped fixtures (a server, a cached one-process
run) are set up once, on one worker. The files that start Ray (a local cluster each, with its own
head and workers) share one group, so that no two clusters compete for the machine at once.
"""

import pytest

RAY_FILES = {"test_serve.py", "test_serve_continuous.py", "test_serve_local.py", "test_rank_group.py",
             "test_i2v.py", "test_benchmark_smoke.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("ray" if name in RAY_FILES else name))
