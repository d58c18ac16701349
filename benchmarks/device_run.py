"""What the benchmarks meant for a lent GPU share: a clock that times the device's work, and a JSON
report written after every section.

A lent machine is held for minutes, and a run can end in a crash, an out-of-memory error or a
timeout: every section's figures reach the JSON as the section ends, each section prints when it
starts and what it took, and a section that fails records its error and lets the next one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import torch


def device_arguments(description: str, argv: Optional[list[str]]) -> tuple[argparse.Namespace, torch.device]:
    """The flags of a device benchmark (``--small``, ``--json``) and its device: CUDA, or with
    ``--small`` the CPU."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized rehearsal of every section")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.small:
        parser.error("no CUDA device: run with --small for a CPU rehearsal")
    return args, device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


class Clock:
    """Median seconds of a callable, with device synchronisation (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self.each(fn) for _ in range(repeats))

    def each(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call."""
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def copy_bandwidth(device: torch.device, clock: Clock, num_bytes: int) -> float:
    """Bytes per second a device-to-device copy moves (read + write counted): what a pass over
    memory can reach, to state a memory-bound kernel against."""
    src = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = clock(lambda: dst.copy_(src), repeats=10, warmup=2)
    return 2 * num_bytes / seconds


class Sections:
    """A benchmark's result, run section by section and rewritten to ``path`` after each.

    ``result[name]`` holds a section's return value, or ``{"error": ...}`` if it raised;
    ``result["seconds"][name]`` its wall time and, on a GPU, ``result["peak_memory_bytes"][name]``
    the peak device memory allocated while it ran. :attr:`failed` names the sections that raised.
    """

    def __init__(self, path: Optional[Path], device: torch.device, prefix: str, **header):
        self.path = path
        self.device = device
        self.prefix = prefix
        self.result: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                             "device": device_name(device), "torch": torch.__version__, **header, "seconds": {}}
        if device.type == "cuda":
            self.result["peak_memory_bytes"] = {}
        self.failed: list[str] = []
        self._started = time.perf_counter()
        self.write()

    def run(self, name: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run one section; its value (``None`` if it raised)."""
        print(f"[{self.prefix}] {name} ...", flush=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        value = None
        try:
            value = fn(*args, **kwargs)
            self.result[name] = value
        except Exception as error:  # recorded, so that the next sections still run and report
            traceback.print_exc()
            self.result[name] = {"error": f"{type(error).__name__}: {error}"}
            self.failed.append(name)
        seconds = time.perf_counter() - t0
        self.result["seconds"][name] = round(seconds, 3)
        if cuda:
            self.result["peak_memory_bytes"][name] = torch.cuda.max_memory_allocated()
        self.result["wall_seconds"] = round(time.perf_counter() - self._started, 3)
        self.write()
        state = "failed" if name in self.failed else "done"
        print(f"[{self.prefix}] {name} {state} in {seconds:.1f} s", flush=True)
        return value

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.result, indent=2) + "\n")
        partial.replace(self.path)

    def finish(self) -> dict:
        """The result, with ``status`` 1 if a section failed (else 0), written a last time."""
        if self.failed:
            print(f"[{self.prefix}] failed sections: {', '.join(self.failed)}", file=sys.stderr, flush=True)
        self.result["status"] = 1 if self.failed else 0
        self.write()
        return self.result
