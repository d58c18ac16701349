"""`spectrum-xdit xdit ARGS`: xDiT's own launcher and model runner with ``spectrum`` among its cache
methods and the embedded models in its registry.

    spectrum-xdit xdit --model digits-wan --ulysses_degree 2 --cache_method spectrum \\
        --prompt "digit 3 moving left" --num_inference_steps 20

The launcher is xDiT's ``xdit`` (``xfuser/cli.py``): the same torchrun flags and the same process
count from the parallel degrees; each rank then runs ``xfuser/runner.py`` as its ``__main__``,
unchanged, after this project's patches and registrations. From Python, call
:func:`prepare_runner` first and then use ``xFuserModelRunner`` as xDiT documents it.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
from typing import Optional

RANK_MODULE = "spectrum_xdit.launch.xdit"


def prepare_runner() -> list[str]:
    """Make this process ready for xDiT's runner: the patches (the runner's CPU stand-ins included
    where there is no CUDA), ``spectrum`` in its cache methods, and the embedded models in its
    ``MODEL_REGISTRY``; their names. Call it before anything imports xfuser."""
    from ..parallel import patches

    patches.install(runner=True)
    from .runner_models import register_embedded_models

    return register_embedded_models()


def main(args: Optional[list[str]] = None) -> int:
    """Launch ``nproc`` ranks of xDiT's runner through torchrun, as ``xdit`` does; the exit code."""
    args = sys.argv[1:] if args is None else list(args)
    from ..parallel import patches

    patches.install()
    from xfuser.cli import extract_torchrun_args, get_nproc_from_args

    torchrun, runner_args = extract_torchrun_args(args)
    nproc = torchrun["--nproc_per_node"] or str(get_nproc_from_args(runner_args))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               *(f"{flag}={torchrun[flag]}" for flag in ("--nnodes", "--node_rank", "--master_addr", "--master_port")),
               "-m", RANK_MODULE, *runner_args]
    ranks = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        # the ranks run in their own session: take the whole group down, as xdit does
        try:
            os.killpg(os.getpgid(ranks.pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
        sys.exit(1)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return ranks.wait()


def rank_main() -> None:
    """One rank: xDiT's ``xfuser/runner.py`` as ``__main__``, after :func:`prepare_runner`."""
    prepare_runner()
    sys.argv[0] = "xfuser/runner.py"
    runpy.run_module("xfuser.runner", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    rank_main()
