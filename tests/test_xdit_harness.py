"""The multi-process gloo harness and the switch for xDiT's CPU support."""

import time

import pytest
import torch.distributed as dist

from spectrum_xdit.parallel.patches import cpu_gloo as cpu_support
from spectrum_xdit.parallel.testing import DistributedError, DistributedTimeout, run_distributed

pytestmark = pytest.mark.timeout(120)


def _rank_and_sum():
    value = [dist.get_rank() + 1]
    total = [None] * dist.get_world_size()
    dist.all_gather_object(total, value[0])
    return dist.get_rank(), dist.get_world_size(), sum(total)


def _rank_one_fails():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    dist.barrier()


def _hang():
    time.sleep(600)


@pytest.mark.distributed
def test_returns_rank_zero_result_from_a_gloo_world():
    assert run_distributed(_rank_and_sum, 2, timeout=60) == (0, 2, 3)


@pytest.mark.distributed
def test_a_failing_rank_raises_its_traceback_without_waiting_for_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank one is broken"):
        run_distributed(_rank_one_fails, 2, timeout=90)
    assert time.monotonic() - start < 60


@pytest.mark.distributed
def test_a_hanging_run_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTimeout):
        run_distributed(_hang, 2, timeout=8)
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(("setting", "wanted"), [("1", True), ("0", False)])
def test_environment_variable_forces_cpu_support(monkeypatch, setting, wanted):
    monkeypatch.setenv(cpu_support.ENV_VAR, setting)
    assert cpu_support.cpu_support_wanted() is wanted


def test_without_the_variable_cpu_support_follows_cuda(monkeypatch):
    monkeypatch.delenv(cpu_support.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_support.torch.cuda, "is_available", lambda: True)
    assert cpu_support.cpu_support_wanted() is False
    monkeypatch.setattr(cpu_support.torch.cuda, "is_available", lambda: False)
    assert cpu_support.cpu_support_wanted() is True
