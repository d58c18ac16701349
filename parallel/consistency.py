"""Rank-consistent decisions: every rank must skip or run the block stack at the same steps.

A rank that skips the blocks also skips the collectives inside them (Ulysses all-to-all, Ring
exchange); if another rank enters them, the job hangs. The paper schedule depends only on the
step index, so identical configs give identical decisions by construction. This module checks
that assumption once per generation with one small all-gather, and turns a mismatch into the
same clear error on every rank instead of a hang.
"""

from __future__ import annotations

import zlib

import torch.distributed as dist

from ..config import SpectrumConfig
from ..hooks import spectrum_stack
from ..schedule import fixed_real_steps


def schedule_fingerprint(config: SpectrumConfig) -> int:
    """A CRC32 of everything the skip decisions depend on: the config (step count, schedule,
    error budget, ...) and the fixed real steps. The adaptive schedule's later choices are made
    from job-wide reduced numbers (control.py), so they agree when these do."""
    text = f"{sorted(config.model_dump().items())}:{sorted(fixed_real_steps(config))}"
    return zlib.crc32(text.encode())


def verify_schedule(config: SpectrumConfig, group=None) -> None:
    """All-gather this rank's schedule fingerprint and raise on every rank if any differs."""
    if not dist.is_available() or not dist.is_initialized():
        return
    mine = schedule_fingerprint(config)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if len(set(gathered)) > 1:
        ranks = {}
        for rank, fingerprint in enumerate(gathered):
            ranks.setdefault(fingerprint, []).append(rank)
        groups = "; ".join(f"ranks {members} share fingerprint {fp:#010x}" for fp, members in ranks.items())
        raise RuntimeError(
            "Spectrum schedules differ across ranks, so some ranks would skip collectives that "
            f"others enter (a hang). {groups}. This rank runs real steps {sorted(fixed_real_steps(config))}"
            f" of {config.num_inference_steps}. Give every rank the same SpectrumConfig.")


def enable_schedule_check(transformer, group=None) -> None:
    """Verify the schedule across ``group`` (default: the whole job) at every generation start."""
    spectrum_stack(transformer).generation_start_callbacks.append(lambda stack: verify_schedule(stack.config, group))
