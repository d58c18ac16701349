"""Host memory and time of making a diffusers transformer xDiT's (``xdit_setup.xdit_transformer``).

    python -m benchmarks.wrap_memory                        # a Wan2.1-shaped transformer, 0.21B parameters
    python -m benchmarks.wrap_memory --layers 30            # Wan2.1-1.3B's depth at its width
    python -m benchmarks.wrap_memory --from_config          # the way before: a random float32 wrapper,
                                                            # then a copy of every weight assigned into it

Each measurement runs in a fresh process, so that no earlier allocation hides its peak: the process
joins a one-process world, builds the transformer (1536 channels, 12 heads, FFN 8960, ``--layers``
blocks; random bf16 weights, as a checkpoint loads them), imports xDiT's model code, resets the
kernel's peak resident-memory counter (``/proc/self/clear_refs``), wraps the model, and reports
the peak resident memory above what it was before the wrapping, against the model's own bytes,
and the seconds of the build and of the wrapping.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

WAN_1_3B_WIDTH = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                      out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True,
                      qk_norm="rms_norm_across_heads", eps=1e-6)
DEFAULT_LAYERS = 4


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _wrap_from_config(model):
    """The way before: a randomly initialised float32 wrapper, then a clone of every weight."""
    from spectrum_xdit.parallel.xdit_setup import xdit_wrapper_class

    wrapper = xdit_wrapper_class(model).from_config(model.config)
    wrapper.load_state_dict({name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
                            strict=True, assign=True)
    return wrapper


def measure(layers: int, from_config: bool) -> dict:
    """In this process (which should be fresh): the figures of one wrapping."""
    import torch
    import torch.distributed as dist

    from spectrum_xdit.parallel.xdit_setup import (
        setup_xdit_parallel,
        teardown_xdit_parallel,
        xdit_transformer,
        xdit_wrapper_class,
    )

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    setup_xdit_parallel()
    from diffusers import WanTransformer3DModel

    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    model = WanTransformer3DModel(num_layers=layers, **WAN_1_3B_WIDTH)
    torch.set_default_dtype(torch.float32)
    build = time.perf_counter() - t0
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    xdit_wrapper_class(model)   # xDiT's model code imported before the clock starts
    import accelerate  # noqa: F401
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # the peak (VmHWM) starts again from now
    t0 = time.perf_counter()
    wrapper = _wrap_from_config(model) if from_config else xdit_transformer(model)
    wrap = time.perf_counter() - t0
    extra = 1024 * (_status_kib("VmHWM") - before)
    teardown_xdit_parallel()
    return {"way": "from_config + clone" if from_config else "meta + assign", "layers": layers,
            "params": sum(p.numel() for p in wrapper.parameters()), "model_bytes": model_bytes,
            "peak_extra_bytes": extra, "peak_extra_of_model": extra / model_bytes,
            "build_seconds": build, "wrap_seconds": wrap}


def run(layers: int = DEFAULT_LAYERS, from_config: bool = False) -> dict:
    """:func:`measure` in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.wrap_memory", "--layers", str(layers), "--here"]
    if from_config:
        command.append("--from_config")
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--from_config", action="store_true", help="also measure the way before, for comparison")
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)   # the measuring process
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.here:
        print(json.dumps(measure(args.layers, args.from_config)))
        return []
    rows = [run(args.layers)] + ([run(args.layers, from_config=True)] if args.from_config else [])
    for row in rows:
        print(f"{row['way']:>20}: {row['params'] / 1e9:.2f}B parameters, {row['model_bytes'] / 2**20:.0f} MiB; "
              f"peak extra host memory {row['peak_extra_bytes'] / 2**20:.0f} MiB "
              f"({100 * row['peak_extra_of_model']:.0f}% of the model); wrapping {row['wrap_seconds']:.3f} s "
              f"(the build took {row['build_seconds']:.2f} s)")
    if len(rows) == 2:
        print(f"meta + assign is {rows[1]['wrap_seconds'] / rows[0]['wrap_seconds']:.0f}x faster")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
