"""The one command for a lent GPU machine (``make gpu-check``): install the carried wheels, then run
the checks in order, each writing its JSON as it goes. docs/gpu.md says how to spend the minutes.

    make gpu-wheels      # here, first: the wheels into .whl/ (benchmarks.gpu_wheels)
    make gpu-check       # there, through the device tool with carry [".whl"]

The parts, in order, each in its own process with a time limit (:data:`PARTS`):

1. ``gpu_check``: the forecaster's accuracy, speed and memory at Wan2.1-14B's feature sizes;
2. ``wan_rank``: one Ulysses-8 rank of Wan2.1-14B, real and forecast steps, CFG loops, batching,
   the VAE.

Each part's output goes to the console and to ``OUT/gpu_device.log``, its JSON to ``OUT/<part>.json``,
and ``OUT/gpu_device.json`` sums up: the interpreter, the wheels, and each part's status and time.
``OUT`` is the device tool's ``$OUT`` (whose files come back), else ``build/gpu``.

Until the wheels are installed this uses the standard library only. The checks run from the
source tree (``PYTHONPATH``), never from ``pip install -e .``, whose torch pin would refuse the
image's torch 2.11.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (part, seconds it may run): with the wheels' install, within 6 minutes, so that a second run of
# the whole command fits in a 15-minute lease with the machine's start
PARTS = (("gpu_check", 75), ("wan_rank", 255))
STAMP = ".installed-wheels"


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """``pip install --target site`` of every wheel in ``wheels`` (unless the same set already is)."""
    names = sorted(path.name for path in wheels.glob("*.whl"))
    if not names:
        print(f"[gpu_device] no wheels in {wheels}: the interpreter's own packages are used", flush=True)
        return []
    stamp = site / STAMP
    if stamp.exists() and stamp.read_text().split() == names:
        print(f"[gpu_device] {len(names)} wheels already in {site}", flush=True)
        return names
    print(f"[gpu_device] installing {len(names)} wheels into {site} ...", flush=True)
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site),
                    *(str(wheels / name) for name in names)], check=True)
    stamp.write_text("\n".join(names) + "\n")
    return names


def source_view(view: Path) -> Path:
    """The package as it installs (``parallel/`` and ``launch/`` inside ``spectrum_xdit``), made of
    links into the tree, beside ``benchmarks``: the folder the checks import from."""
    package = view / "spectrum_xdit"
    shutil.rmtree(view, ignore_errors=True)
    package.mkdir(parents=True)
    for entry in (ROOT / "spectrum_xdit").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("parallel", "launch"):
        (package / name).symlink_to(ROOT / name)
    (view / "benchmarks").symlink_to(ROOT / "benchmarks")
    return view


def run_part(name: str, limit: float, args: list[str], env: dict, cwd: Path, log) -> dict:
    """One part in its own process, its output streamed to the console and ``log``; killed at ``limit``."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *args]
    print(f"[gpu_device] {name}: {' '.join(command[1:])} (at most {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    timer = threading.Timer(limit, process.kill)
    timer.start()
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
        returncode = process.wait()
    finally:
        timer.cancel()
    seconds = time.perf_counter() - t0
    timed_out = seconds >= limit and returncode != 0
    state = "timed out" if timed_out else "ok" if returncode == 0 else f"failed ({returncode})"
    print(f"[gpu_device] {name}: {state} in {seconds:.0f} s", flush=True)
    return {"returncode": returncode, "seconds": round(seconds, 1), "timed_out": timed_out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="every part at CPU size (a rehearsal)")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels (default .whl)")
    parser.add_argument("--no_wheels", action="store_true",
                        help="install none: the interpreter has every package (a rehearsal in .venv)")
    parser.add_argument("--site", type=Path, default=ROOT / "build" / "gpu-site",
                        help="where the wheels are installed (default build/gpu-site)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "build" / "gpu"),
                        help="where the JSON and the log go (default $OUT, else build/gpu)")
    parser.add_argument("--parts", nargs="+", choices=[name for name, _ in PARTS], default=[name for name, _ in PARTS])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = {"python": platform.python_version(), "platform": platform.platform(), "small": args.small,
               "parts": {}}
    summary_path = out / "gpu_device.json"

    def write() -> None:
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    summary["wheels"] = [] if args.no_wheels else install_wheels(args.wheels.resolve(), args.site.resolve())
    write()
    view = source_view(ROOT / "build" / "gpu-src")
    paths = [str(view), str(args.site.resolve()), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")
    with open(out / "gpu_device.log", "a") as log:
        for name, limit in PARTS:
            if name not in args.parts:
                continue
            part_args = ["--json", str(out / f"{name}.json")] + (["--small"] if args.small else [])
            summary["parts"][name] = run_part(name, limit, part_args, env, view, log)
            write()
    failed = [name for name, part in summary["parts"].items() if part["returncode"] != 0]
    print(f"[gpu_device] done in {time.perf_counter() - started:.0f} s; results in {out}"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
