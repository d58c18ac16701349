"""Every change this project makes to xfuser 0.7.0, and the one entry point that installs them.

One module per concern, each patch naming the xfuser code it fixes (the long notes are in
docs/xfuser-0.7.0.md):

- ``cpu_gloo``: xDiT's sequence and pipeline parallelism on CPU processes over gloo (only
  without CUDA, or with ``SPECTRUM_XDIT_CPU=1``; before xfuser is imported);
- ``padding``: token counts not divisible by the sequence-parallel degree;
- ``cache_method``: ``spectrum`` in xDiT's ``--cache_method`` and ``apply_cache``;
- ``runner_cpu``: xDiT's model runner in CPU processes (only with ``install(runner=True)``, and
  only where ``cpu_gloo`` is wanted).

Call :func:`install` before anything imports xfuser (on CPU it must come first). Beside them, the
one change to Ray Serve 2.60.0, installed by each serve replica with its own ``install``:
``ray_serve_grpc``, the replica's gRPC server bound to loopback on a local instance.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings
from typing import Optional

XFUSER_VERSION = "0.7.0"
# imported by install(), so that asking about the patches (record, pads_correctly) stays cheap
CONCERNS = ("cpu_gloo", "padding", "cache_method")

_record: Optional[dict] = None


def install(runner: bool = False) -> dict:
    """Install the patches this process needs, once; return :func:`record`. ``runner``: this
    process runs xDiT's model runner (``spectrum-xdit xdit``), which needs ``runner_cpu`` on CPU;
    asking for it after a plain install adds it.

    With an xfuser other than 0.7.0 (or none) nothing is patched, and a ``RuntimeWarning`` says
    which patches were skipped. Raises ``RuntimeError`` if the CPU patches are needed but xfuser
    was already imported: modules that copied the unpatched values cannot be fixed afterwards.
    """
    global _record
    if _record is not None:
        if runner:
            _install_runner_cpu()
        return record()
    version = installed_xfuser_version()
    concerns = {name: importlib.import_module(f"{__name__}.{name}") for name in CONCERNS}
    skipped = {}
    if version != XFUSER_VERSION:
        skipped = dict.fromkeys(concerns, f"xfuser {version or 'is not installed'}; these patches are for "
                                          f"{XFUSER_VERSION}")
        if version is not None:
            warnings.warn(f"spectrum-xdit: xfuser {version} is installed, but its patches are written for "
                          f"xfuser {XFUSER_VERSION}; skipped: {', '.join(concerns)}", RuntimeWarning, stacklevel=2)
        concerns = {}
    elif not concerns["cpu_gloo"].cpu_support_wanted():
        skipped["cpu_gloo"] = "CUDA is available"
        del concerns["cpu_gloo"]
    else:
        imported = sorted(name for name in sys.modules if name == "xfuser" or name.startswith("xfuser."))
        if imported:
            raise RuntimeError("spectrum_xdit.parallel.patches.install() must run before xfuser is imported "
                               f"on a machine without CUDA; already imported: {', '.join(imported[:5])}")
    _record = {"xfuser_version": version, "installed": list(concerns), "skipped": skipped, "applied": []}
    by_module: dict[str, list] = {}
    for concern in concerns.values():
        for module, functions in concern.PATCHES.items():
            by_module.setdefault(module, []).extend(functions)
    from .importing import patch_on_import

    patch_on_import(by_module, _applied)
    if runner:
        _install_runner_cpu()
    return record()


def _install_runner_cpu() -> None:
    """The runner's CPU stand-ins, where the CPU patches are installed and these are not yet."""
    if "cpu_gloo" not in _record["installed"] or "runner_cpu" in _record["installed"]:
        return
    from . import runner_cpu
    from .importing import patch_on_import

    _record["installed"].append("runner_cpu")
    patch_on_import(runner_cpu.PATCHES, _applied)


def record() -> dict:
    """What :func:`install` did: the xfuser version, the concerns installed and skipped (with
    why), and each patch applied so far as ``module: function`` (patches of modules not yet
    imported apply when they are)."""
    if _record is None:
        return {"xfuser_version": installed_xfuser_version(), "installed": [], "skipped": {}, "applied": []}
    return {key: (value.copy() if isinstance(value, (dict, list)) else value) for key, value in _record.items()}


def pads_correctly() -> bool:
    """Whether xDiT's padding path (token counts not divisible by the sequence-parallel degree)
    gives correct results in this environment: with the padding patches, on xfuser 0.7.0."""
    return installed_xfuser_version() == XFUSER_VERSION


def installed_xfuser_version() -> Optional[str]:
    try:
        return importlib.metadata.version("xfuser")
    except importlib.metadata.PackageNotFoundError:
        return None


def _applied(module: str, patch) -> None:
    _record["applied"].append(f"{module}: {patch.__name__}")
