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
from ..hooks import spectrum_state
from ..schedule import fixed_real_steps


def schedule_fingerprint(config: SpectrumConfig) -> int:
    """A CRC32 of everything the skip decisions depend on: the config (step count, schedule,
    error budget, ...) and the fixed real steps. The adaptive schedule's later choices are made
    from job-wide reduced numbers (control.py), so they agree when these do."""
    text = f"{sorted(config.model_dump().items())}:{sorted(fixed_real_steps(config))}"
    return zlib.crc32(text.encode())


def verify_schedule(config: SpectrumConfig, group=None) -> None:
    """All-gather this rank's schedule fingerprint and raise on every rank if any differs."""
    verify_agreement(
        schedule_fingerprint(config), "Spectrum schedules",
        f"This rank runs real steps {sorted(fixed_real_steps(config))} of {config.num_inference_steps}. "
        "Give every rank the same SpectrumConfig.", group)


def verify_agreement(fingerprint: int, what: str, detail: str, group=None) -> None:
    """All-gather ``fingerprint`` (of the decisions ``what`` names) and raise the same error on
    every rank if any rank's differs; ``detail`` (this rank's side) ends the message."""
    if not dist.is_available() or not dist.is_initialized():
        return
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fingerprint, group=group)
    if len(set(gathered)) > 1:
        ranks = {}
        for rank, value in enumerate(gathered):
            ranks.setdefault(value, []).append(rank)
        groups = "; ".join(f"ranks {members} share fingerprint {value:#010x}" for value, members in ranks.items())
        raise RuntimeError(f"{what} differ across ranks, so some ranks would skip collectives that others "
                           f"enter (a hang). {groups}. {detail}")


def enable_schedule_check(transformer, group=None) -> None:
    """Verify the schedule across ``group`` (default: the whole job) at every generation start."""
    spectrum_state(transformer).generation_start_callbacks.append(lambda state: verify_schedule(state.config, group))
