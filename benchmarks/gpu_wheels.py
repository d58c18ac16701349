"""The wheels a lent GPU machine needs to run this project's checks (``make gpu-wheels``).

The lent machine's image (Python 3.12, torch 2.11 with CUDA 13, no network; its package list is in
the device tool's KINDS.md) has numpy, transformers, accelerate and more, but not diffusers,
pydantic or xfuser. :data:`CARRIED` names every distribution the checks import that the image
lacks; each is downloaded without its dependencies, at the version this virtualenv runs, for the
image's interpreter and platform, into an ignored folder that travels with the tree (the device
tool's ``carry``), where ``benchmarks.gpu_device`` installs it with ``pip --target``.

    python -m benchmarks.gpu_wheels                                           # cp312 wheels into .whl/
    python -m benchmarks.gpu_wheels --python 3.11.7 --dest build/gpu-bare/wheels  # this machine's builds
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

# What the checks import (benchmarks.gpu_check, benchmarks.wan_rank: the project's core, diffusers'
# Wan models, xfuser's runtime state) and the image lacks.
CARRIED = (
    "diffusers",
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",
    # the image has one, older than pydantic needs
    "typing-extensions",
    "xfuser", "yunchang", "distvae", "beautifulsoup4", "soupsieve", "ftfy", "wcwidth",
)
# The image's own versions of what the checks import from it, where KINDS.md names them, and the
# httpx that its huggingface-hub 1.x needs (this virtualenv's 2.x moved to httpx2): the
# bare-virtualenv test (tests/test_gpu_device.py) installs these.
IMAGE_VERSIONS = {"transformers": "5.17.0", "tokenizers": "0.23.2", "huggingface-hub": "1.33.0",
                  "accelerate": "1.15.0", "httpx": "0.28.1", "httpcore": "1.0.9"}
# The rest of what the checks import that the image has (KINDS.md's package list); the test links
# this virtualenv's copies.
IMAGE = ("torch", "typing-extensions", "numpy", "safetensors", "regex", "requests", "certifi", "charset-normalizer", "idna", "urllib3",
         "filelock", "fsspec", "packaging", "pyyaml", "tqdm", "pillow", "einops", "peft", "psutil", "scipy",
         "sentencepiece", "h11", "anyio", "hf-xet", "typer", "click", "rich", "shellingham",
         "markdown-it-py", "mdurl", "pygments", "triton", "annotated-doc", "zipp")
# pip matches each manylinux tag exactly; these cover every wheel in CARRIED
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# the image's interpreter (KINDS.md); pip reads "3.12" as 3.12.0, which some wheels' Requires-Python refuses
IMAGE_PYTHON = "3.12.3"
# the tree travels too, within the 64 MiB that one call may carry
MAX_BYTES = 40 << 20


def normalized(name: str) -> str:
    """A distribution's name as wheel file names spell it."""
    return re.sub(r"[-_.]+", "_", name).lower()


def carried_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in CARRIED}


def wheel_key(path: Path) -> tuple[str, str]:
    """(name, version) of a wheel file."""
    name, version = path.name.split("-")[:2]
    return normalized(name), version


def download(dest: Path, python: str = IMAGE_PYTHON, versions: dict[str, str] | None = None) -> list[Path]:
    """The wheels of ``versions`` (default: :data:`CARRIED` at this virtualenv's versions) for CPython
    ``python`` on manylinux x86-64 in ``dest``, one of each: others there are removed; those
    already there are not downloaded again."""
    versions = carried_versions() if versions is None else versions
    wanted = {(normalized(name), version) for name, version in versions.items()}
    dest.mkdir(parents=True, exist_ok=True)
    for path in dest.glob("*.whl"):
        if wheel_key(path) not in wanted:
            path.unlink()
    have = {wheel_key(path) for path in dest.glob("*.whl")}
    missing = [f"{name}=={version}" for name, version in versions.items()
               if (normalized(name), version) not in have]
    if missing:
        platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", *platforms, "-d", str(dest),
                        *missing], check=True)
    wheels = sorted(dest.glob("*.whl"))
    found = {wheel_key(path) for path in wheels}
    if found != wanted:
        raise RuntimeError(f"{dest}: expected one wheel of each of {sorted(wanted)}, found {sorted(found)}")
    return wheels


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--python", default=IMAGE_PYTHON, help=f"the CPython version to download for (the image's: {IMAGE_PYTHON})")
    args = parser.parse_args(argv)
    wheels = download(args.dest, args.python)
    total = sum(path.stat().st_size for path in wheels)
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    if total > MAX_BYTES:
        raise SystemExit(f"the wheels take {total / 2**20:.1f} MiB, more than the {MAX_BYTES / 2**20:.0f} MiB "
                         "left for them in a device call")
    return wheels


if __name__ == "__main__":
    main(sys.argv[1:])
